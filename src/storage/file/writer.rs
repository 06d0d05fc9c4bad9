//! The writer thread: group commit (one write, one fdatasync for every request waiting), the
//! tail head, and the signing-order check. The commit points are marked in [`commit`].

use super::recovery::indexed;
use super::*;
use crate::storage::Inbound;

/// What the writer thread writes to: the entries file and the tail head.
pub(super) struct Sink {
    pub(super) log: File,
    pub(super) tail: TailWriter,
    pub(super) fsync: FsyncPolicy,
}

/// The writer thread: group commit.
pub(super) fn writer_main(
    inner: Arc<Inner>,
    sink: &mut Sink,
    rx: crossbeam_channel::Receiver<Request>,
    max_group: usize,
) {
    let mut buf = Vec::with_capacity(1 << 16);
    let mut stopping = false;
    while !stopping {
        let first = match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(r) => r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if !inner.writable.load(Ordering::Acquire) {
                    probe_writable(&inner, &mut sink.log);
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        let deadline = Instant::now() + super::super::COMMIT_WINDOW;
        let group;
        (group, stopping) = take_group(first, &rx, max_group, &inner.inbound, deadline);
        if group.is_empty() {
            continue;
        }
        commit(&inner, sink, group, &mut buf);
    }
    // Answer anything still queued after a stop.
    while let Ok(Request::Append { reply, .. }) = rx.try_recv() {
        let _ = reply.send(Err(Error::Closed));
    }
}

/// The group that starts with `first`: everything waiting now, and the appends of the
/// signatures that were on their way ([`Inbound`]) when it started, as they arrive until
/// `deadline` ([`crate::storage::Owed`]) — one write, one fsync and one tail head for all of
/// it, up to `max_group` entries. Also says whether a stop was asked.
fn take_group(
    first: Request,
    rx: &crossbeam_channel::Receiver<Request>,
    max_group: usize,
    inbound: &Inbound,
    deadline: Instant,
) -> (Group, bool) {
    let mut group = Vec::new();
    let mut count = 0;
    let mut owed = inbound.owed();
    let mut next = Some(first);
    while let Some(req) = next.take() {
        match req {
            Request::Stop => return (group, true),
            Request::Append { entries, reply } => {
                count += entries.len();
                group.push((entries, reply));
            }
        }
        if count >= max_group {
            break;
        }
        next = match rx.try_recv() {
            Ok(r) => Some(r),
            Err(_) if owed.worth_waiting() => rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok(),
            Err(_) => None,
        };
        if let Some(Request::Append { entries, .. }) = &next {
            owed.arrived(entries.len());
        }
    }
    (group, false)
}

pub(super) type Group = Vec<(
    Vec<Entry>,
    tokio::sync::oneshot::Sender<Result<Vec<Receipt>, Error>>,
)>;

/// Sequence one group: assign indexes and hash links, refuse requests whose signatures were
/// made with a replaced version (the order rule), write, fsync, publish, answer.
pub(super) fn commit(inner: &Inner, sink: &mut Sink, group: Group, buf: &mut Vec<u8>) {
    buf.clear();
    let (edge, base_len, previous, active) = {
        let st = read(&inner.state);
        (
            Arc::clone(&st.edge),
            st.file_len,
            st.last_leaf,
            Arc::clone(&st.active),
        )
    };
    let base_index = edge.size();
    let mut batch = Batch {
        buf,
        base_len,
        next: base_index,
        previous,
        leaves: Vec::new(),
        ends: Vec::new(),
        events: Vec::new(),
        lookups: Vec::new(),
        staged: None,
        sealed: Vec::new(),
    };
    let mut receipts: Vec<Result<Vec<Receipt>, Error>> = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    for (entries, reply) in group {
        replies.push(reply);
        receipts.push(batch.add(&inner.origin, entries, &active));
    }
    let Batch {
        buf,
        leaves,
        ends,
        events,
        lookups,
        staged,
        sealed,
        ..
    } = batch;

    // Commit point 1: after write_all + fdatasync the entries in `buf` are durable; their end
    // offsets follow in `entries.idx`.
    // Commit point 2 (acknowledgement): the tail head for the new size, MACed in the token, is
    // durable. Only then are the entries published and answered. On a failure the entries file
    // is cut back to `base_len`; at start-up, complete entries beyond the tail head are cut the
    // same way (they were never acknowledged), and a torn final write is cut.
    let mut grown = (*edge).clone();
    let mut completed = Vec::new();
    for l in &leaves {
        completed.extend(grown.push(*l));
    }
    let head = TreeHead {
        size: grown.size(),
        root: grown.root(),
    };
    // Commit point 0: the group's sealed signer evidence is durable in the vault before its
    // entries are written (a record without its entry is cut at the next start).
    let vault_before = match (sealed.is_empty(), inner.vault.get()) {
        (true, _) => Ok(Vec::new()),
        (false, Some(v)) => v
            .append(&sealed)
            .map_err(|e| Error::Unwritable(e.to_string())),
        (false, None) => Err(Error::Storage(
            "no signer-evidence vault is attached".into(),
        )),
    };
    let written = vault_before.and_then(|before| {
        write_durably(inner, sink, buf, &ends, head).inspect_err(|_| {
            if let Some(v) = inner.vault.get() {
                v.undo(&before);
            }
        })
    });
    if let Err(e) = written {
        let previous = TreeHead {
            size: base_index,
            root: edge.root(),
        };
        undo_append(inner, sink, base_len, previous, &e);
        for reply in replies {
            let _ = reply.send(Err(Error::Unwritable(e.to_string())));
        }
        return;
    }

    inner.store.index.add(lookups);
    inner.store.tiles.put(completed);
    {
        let mut st = write(&inner.state);
        if let Some(s) = staged {
            st.active = Arc::new(s);
        }
        st.edge = Arc::new(grown);
        if let Some(l) = leaves.last() {
            st.last_leaf = Some(*l);
        }
        st.file_len = base_len + buf.len() as u64;
        inner.metrics.audit_tree_size.set(st.edge.size() as i64);
    }
    if !inner.writable.swap(true, Ordering::AcqRel) {
        tracing::info!("evidence log writable again");
    }
    inner.metrics.audit_writable.set(1);
    inner.metrics.audit_group_size.observe(leaves.len() as f64);
    for ev in &events {
        inner
            .metrics
            .audit_entries
            .with_label_values(&[ev.as_str()])
            .inc();
    }
    for (reply, r) in replies.into_iter().zip(receipts) {
        let _ = reply.send(r);
    }
}

/// A group being sequenced: the bytes to write and what each entry adds.
struct Batch<'a> {
    buf: &'a mut Vec<u8>,
    /// The entries file's length before the group.
    base_len: u64,
    /// The next entry's index.
    next: u64,
    /// The last entry's leaf hash (the next entry's link).
    previous: Option<Hash>,
    leaves: Vec<Hash>,
    /// Each entry's end offset in the entries file.
    ends: Vec<u64>,
    events: Vec<String>,
    lookups: Vec<(u64, index::Indexed)>,
    /// The order state as of this group; becomes `active` only once the group is durable.
    staged: Option<order::ActiveVersions>,
    /// The vault records of the group's entries (with their indexes).
    sealed: Vec<crate::vault::Row>,
}

impl Batch<'_> {
    /// Add one request's entries (indexes, hash links, canonical bytes); all or none: on a
    /// refusal (a signature made with a replaced version) this request's entries are dropped
    /// and the others in the group go ahead.
    fn add(
        &mut self,
        origin: &str,
        entries: Vec<Entry>,
        active: &order::ActiveVersions,
    ) -> Result<Vec<Receipt>, Error> {
        let mark = (
            self.buf.len(),
            self.next,
            self.leaves.len(),
            self.previous,
            self.staged.clone(),
        );
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            match self.push(origin, e, active) {
                Ok(r) => out.push(r),
                Err(err) => {
                    self.buf.truncate(mark.0);
                    self.ends.truncate(mark.2);
                    self.leaves.truncate(mark.2);
                    self.events
                        .truncate(self.events.len() - (self.next - mark.1) as usize);
                    self.lookups.retain(|(i, _)| *i < mark.1);
                    self.sealed.retain(|r| r.index < mark.1);
                    self.next = mark.1;
                    self.previous = mark.3;
                    self.staged = mark.4;
                    return Err(err);
                }
            }
        }
        Ok(out)
    }

    fn push(
        &mut self,
        origin: &str,
        mut e: Entry,
        active: &order::ActiveVersions,
    ) -> Result<Receipt, Error> {
        e.index = self.next;
        e.previous_leaf_hash = self.previous.map(|h| B64.encode(h));
        let order = self.staged.as_ref().unwrap_or(active);
        order.check(&e).map_err(Error::Superseded)?;
        if let Some(mut row) = e.sealed.take() {
            row.index = self.next;
            self.sealed.push(*row);
        }
        if order::changes_order(&e) {
            self.staged.get_or_insert_with(|| active.clone()).record(&e);
        }
        let bytes = e
            .canonical()
            .map_err(|err| Error::Serialize(err.to_string()))?;
        let leaf = merkle::leaf_hash(&bytes);
        self.previous = Some(leaf);
        self.buf.extend_from_slice(&bytes);
        self.buf.push(b'\n');
        self.ends.push(self.base_len + self.buf.len() as u64);
        self.leaves.push(leaf);
        self.lookups
            .push((self.next, indexed(&e.time, e.tenant, e.transaction_id)));
        self.events.push(e.event);
        let receipt = Receipt {
            log_origin: origin.to_owned(),
            index: self.next,
            leaf_hash: B64.encode(leaf),
        };
        self.next += 1;
        Ok(receipt)
    }
}

/// Commit points 1 and 2 for the group in `buf`: the entries written and made durable, their
/// end offsets appended, then the tail head for the new size written (MACed in the token).
fn write_durably(
    inner: &Inner,
    sink: &mut Sink,
    buf: &[u8],
    ends: &[u64],
    head: TreeHead,
) -> Result<(), Error> {
    if buf.is_empty() {
        return Ok(());
    }
    let entries = || io_err(Path::new(ENTRIES_FILE));
    sink.log.write_all(buf).map_err(entries())?;
    if sink.fsync == FsyncPolicy::Always {
        let t = Instant::now();
        sink.log.sync_data().map_err(entries())?;
        inner
            .metrics
            .audit_fsync_duration
            .observe(t.elapsed().as_secs_f64());
    }
    inner
        .store
        .offsets
        .append(ends)
        .map_err(io_err(Path::new(OFFSETS_FILE)))?;
    Ok(sink.tail.write(head, inner.token.as_ref())?)
}

/// A group that could not be made durable: the log is marked unwritable, and the entries file,
/// the offsets and the tail head are put back to `previous` (the head before the group).
fn undo_append(inner: &Inner, sink: &mut Sink, base_len: u64, previous: TreeHead, e: &Error) {
    inner.metrics.audit_write_errors.inc();
    inner.writable.store(false, Ordering::Release);
    inner.metrics.audit_writable.set(0);
    tracing::error!(error = %e, "evidence log append failed; signing is refused until it is writable again");
    if let Err(t) = sink.log.set_len(base_len) {
        tracing::error!(error = %t, "cannot cut the failed append back off the evidence log");
    }
    if let Err(t) = inner.store.offsets.truncate(previous.size) {
        tracing::error!(error = %t, "cannot cut the failed append back off {OFFSETS_FILE}");
    }
    // The tail head may now claim the cut entries: put the previous head back.
    if let Err(e) = sink.tail.write(previous, inner.token.as_ref()) {
        tracing::error!(error = %e, "cannot restore the tail head after a failed append");
    }
}

/// While unwritable, try to append (and remove) 4 KiB at the end of the log: succeeds only
/// when the log itself can grow again (disk space, quota, file size limit).
pub(super) fn probe_writable(inner: &Inner, log: &mut File) {
    let len = read(&inner.state).file_len;
    let ok = (|| -> io::Result<()> {
        log.write_all(&[b' '; 4096])?;
        log.sync_data()?;
        Ok(())
    })();
    let _ = log.set_len(len);
    if ok.is_ok() {
        inner.writable.store(true, Ordering::Release);
        inner.metrics.audit_writable.set(1);
        tracing::info!("evidence log writable again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An append of one entry.
    fn request() -> Request {
        let (reply, _) = tokio::sync::oneshot::channel();
        Request::Append {
            entries: vec![super::super::tests::entry(0)],
            reply,
        }
    }

    #[test]
    fn a_group_waits_for_the_signatures_on_their_way_and_only_for_them() {
        let inbound = Arc::new(Inbound::default());
        let far = Instant::now() + Duration::from_secs(30);

        // Nothing on the way: the group is what is waiting now, at once.
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(request()).unwrap();
        let t = Instant::now();
        let (group, stop) = take_group(request(), &rx, 64, &inbound, far);
        assert_eq!((group.len(), stop), (2, false));
        assert!(t.elapsed() < Duration::from_secs(10), "it did not wait");

        // Two signatures on their way: the group takes both as they arrive, and commits as
        // soon as none is left on the way (long before the deadline).
        let guards = [inbound.expect(1), inbound.expect(1)];
        let sender = std::thread::spawn(move || {
            for g in guards {
                std::thread::sleep(Duration::from_millis(50));
                tx.send(request()).unwrap();
                drop(g);
            }
            tx
        });
        let t = Instant::now();
        let (group, _) = take_group(request(), &rx, 64, &inbound, far);
        assert_eq!(group.len(), 3, "the first and the two announced");
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "it waited past the last one"
        );
        assert_eq!(inbound.count(), 0);
        let tx = sender.join().unwrap();

        // Signatures announced after the group started do not extend it.
        let (tx2, rx2) = crossbeam_channel::unbounded();
        let (first, guard) = (request(), inbound.expect(1));
        let announcer = Arc::clone(&inbound);
        let feeder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let later = announcer.expect(1);
            tx2.send(request()).unwrap();
            drop(guard);
            std::thread::sleep(Duration::from_millis(50));
            tx2.send(request()).unwrap();
            drop(later);
            tx2
        });
        let (group, _) = take_group(first, &rx2, 64, &inbound, far);
        assert_eq!(
            group.len(),
            2,
            "the first and the one on its way when it started"
        );
        drop(feeder.join().unwrap());

        // One on the way that does not come: the group waits until the deadline only.
        let _late = inbound.expect(1);
        let t = Instant::now();
        let (group, _) = take_group(
            request(),
            &rx,
            64,
            &inbound,
            Instant::now() + Duration::from_millis(100),
        );
        assert_eq!(group.len(), 1);
        assert!(t.elapsed() >= Duration::from_millis(100));

        // A group holds at most `max_group` entries, however many are waiting.
        let (tx3, rx3) = crossbeam_channel::unbounded();
        for _ in 0..3 {
            tx3.send(request()).unwrap();
        }
        let (group, _) = take_group(request(), &rx3, 2, &inbound, far);
        assert_eq!(group.len(), 2);
        assert_eq!(rx3.len(), 2, "the rest wait for the next group");

        // A stop ends the group; what came before it is still committed.
        tx.send(Request::Stop).unwrap();
        let (group, stop) = take_group(request(), &rx, 64, &inbound, far);
        assert_eq!((group.len(), stop), (1, true));
    }
}
