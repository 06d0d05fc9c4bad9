//! The tail head of the file backend: after every group commit, the tree head of the log as
//! acknowledged, authenticated with HMAC-SHA256 under a key that never leaves the token, in
//! `tail-head` (two fixed 512-byte slots written alternately, so a torn write leaves the other
//! intact). Start-up checks the entries after the last checkpoint against it, and cuts complete
//! entries beyond it: they were written but never acknowledged (the process died before the
//! head was durable), exactly like a request that failed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::audit::anchor::{TokenAnchor, TokenFailure, TreeHead};
use crate::audit::merkle::Hash;

pub const TAIL_HEAD_FILE: &str = "tail-head";
const SLOT: usize = 512;

/// One slot of `tail-head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Slot {
    origin: String,
    size: u64,
    root: String,
    seq: u64,
    mac: String,
}

/// The message the tail head's MAC covers.
fn mac_message(origin: &str, size: u64, root_b64: &str, seq: u64) -> Vec<u8> {
    format!("signet evidence log tail v1\n{origin}\n{size}\n{root_b64}\n{seq}\n").into_bytes()
}

/// Why the tail head could not be trusted.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the token could not compute the tail MAC: {0}")]
    Token(TokenFailure),
    #[error(
        "{TAIL_HEAD_FILE} slot {slot} does not verify with the token's MAC key: the file was edited or copied from another log"
    )]
    BadMac { slot: usize },
    #[error("{TAIL_HEAD_FILE} slot {slot} is for log `{found}`, not `{expected}`")]
    WrongOrigin {
        slot: usize,
        found: String,
        expected: String,
    },
    #[error("the log origin is too long for a {TAIL_HEAD_FILE} slot")]
    TooLong,
}

/// The last acknowledged tree head, read and checked at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailHead {
    pub head: TreeHead,
    pub seq: u64,
}

/// Read `tail-head` in `dir`: the newest slot whose MAC verifies. `None` if the file does not
/// exist or holds no complete slot. A complete slot whose MAC fails is an edit, not a torn
/// write: refused.
pub fn read_tail(
    dir: &Path,
    origin: &str,
    token: &dyn TokenAnchor,
) -> Result<Option<TailHead>, TailError> {
    let path = dir.join(TAIL_HEAD_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TailError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let mut best: Option<TailHead> = None;
    for (n, raw) in data.chunks(SLOT).enumerate() {
        let text = raw.split(|&b| b == b'\n').next().unwrap_or_default();
        // A torn or never-written slot does not parse: skip it.
        let Ok(slot) = serde_json::from_slice::<Slot>(text) else {
            continue;
        };
        if slot.origin != origin {
            return Err(TailError::WrongOrigin {
                slot: n,
                found: slot.origin,
                expected: origin.to_owned(),
            });
        }
        let want = token
            .mac(&mac_message(origin, slot.size, &slot.root, slot.seq))
            .map_err(TailError::Token)?;
        let got = B64.decode(&slot.mac).unwrap_or_default();
        if !bool::from(got.as_slice().ct_eq(&want)) {
            return Err(TailError::BadMac { slot: n });
        }
        let Some(root) = B64
            .decode(&slot.root)
            .ok()
            .and_then(|r| Hash::try_from(r.as_slice()).ok())
        else {
            return Err(TailError::BadMac { slot: n });
        };
        let head = TailHead {
            head: TreeHead {
                size: slot.size,
                root,
            },
            seq: slot.seq,
        };
        if best.is_none_or(|b| head.seq > b.seq) {
            best = Some(head);
        }
    }
    Ok(best)
}

/// Writes the tail head after each group commit (owned by the writer thread).
pub struct TailWriter {
    file: File,
    path: String,
    origin: String,
    next_seq: u64,
    fsync: bool,
}

impl TailWriter {
    /// Open (creating durably) `tail-head` in `dir`; `last` is the head read at start-up.
    pub fn open(
        dir: &Path,
        origin: &str,
        last: Option<TailHead>,
        fsync: bool,
    ) -> Result<Self, TailError> {
        if mac_message(origin, u64::MAX, &B64.encode([0u8; 32]), u64::MAX).len() + 200 > SLOT {
            return Err(TailError::TooLong);
        }
        let path = dir.join(TAIL_HEAD_FILE);
        let io_err = |source| TailError::Io {
            path: path.display().to_string(),
            source,
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        if last.is_none() {
            // A new tail (or one an accepted restore replaces): no slot of an earlier one may
            // survive beside it.
            file.set_len(0).map_err(io_err)?;
            file.set_len((2 * SLOT) as u64).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        if !existed {
            crate::fsutil::sync_dir(dir).map_err(io_err)?;
        }
        Ok(Self {
            file,
            path: path.display().to_string(),
            origin: origin.to_owned(),
            next_seq: last.map_or(0, |l| l.seq + 1),
            fsync,
        })
    }

    /// Make `head` the acknowledged tail: MAC it in the token, write the next slot, fdatasync.
    pub fn write(&mut self, head: TreeHead, token: &dyn TokenAnchor) -> Result<(), TailError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let root = B64.encode(head.root);
        let mac = token
            .mac(&mac_message(&self.origin, head.size, &root, seq))
            .map_err(TailError::Token)?;
        let slot = Slot {
            origin: self.origin.clone(),
            size: head.size,
            root,
            seq,
            mac: B64.encode(mac),
        };
        // Invariant: a struct of strings and integers always serialises.
        let mut buf = serde_json::to_vec(&slot).unwrap_or_default();
        buf.push(b'\n');
        buf.resize(SLOT, b' ');
        let io_err = |source| TailError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&buf, (seq % 2) * SLOT as u64)
            .map_err(io_err)?;
        if self.fsync {
            self.file.sync_data().map_err(io_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::sync::Mutex;

    /// A software stand-in for the token: these tests are about the files, not the token.
    pub(crate) struct SoftAnchor {
        key: [u8; 32],
        pub(crate) stored: Mutex<Option<Vec<u8>>>,
    }

    impl SoftAnchor {
        pub(crate) fn new() -> Self {
            Self {
                key: rand::random(),
                stored: Mutex::new(None),
            }
        }
    }

    impl TokenAnchor for SoftAnchor {
        fn mac(&self, message: &[u8]) -> Result<[u8; 32], TokenFailure> {
            // HMAC-SHA256 (RFC 2104) with a 32-byte key.
            let pad = |b: u8| {
                let mut k = [b; 64];
                for (i, x) in self.key.iter().enumerate() {
                    k[i] ^= x;
                }
                k
            };
            let inner = Sha256::new()
                .chain_update(pad(0x36))
                .chain_update(message)
                .finalize();
            Ok(Sha256::new()
                .chain_update(pad(0x5c))
                .chain_update(inner)
                .finalize()
                .into())
        }
        fn load(&self) -> Result<Vec<Vec<u8>>, TokenFailure> {
            Ok(self.stored.lock().unwrap().iter().cloned().collect())
        }
        fn store(&self, value: &[u8]) -> Result<(), TokenFailure> {
            *self.stored.lock().unwrap() = Some(value.to_vec());
            Ok(())
        }
    }

    #[test]
    fn the_newest_verified_slot_wins_and_an_edited_slot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = SoftAnchor::new();
        assert_eq!(read_tail(dir.path(), "o", &token).unwrap(), None);
        let mut w = TailWriter::open(dir.path(), "o", None, true).unwrap();
        for size in 1..=3 {
            w.write(
                TreeHead {
                    size,
                    root: [size as u8; 32],
                },
                &token,
            )
            .unwrap();
        }
        let t = read_tail(dir.path(), "o", &token).unwrap().unwrap();
        assert_eq!((t.head.size, t.seq), (3, 2));
        // A torn slot (garbage) falls back to the other one.
        let path = dir.path().join(TAIL_HEAD_FILE);
        let mut data = std::fs::read(&path).unwrap();
        data[..10].copy_from_slice(b"\0\0\0\0\0\0\0\0\0\0");
        std::fs::write(&path, &data).unwrap();
        let t = read_tail(dir.path(), "o", &token).unwrap().unwrap();
        assert_eq!(t.head.size, 2);
        // A well-formed slot with another size is an edit.
        let data = String::from_utf8_lossy(&std::fs::read(&path).unwrap())
            .replace("\"size\":2", "\"size\":9");
        std::fs::write(&path, data).unwrap();
        assert!(matches!(
            read_tail(dir.path(), "o", &token),
            Err(TailError::BadMac { slot: 1 })
        ));
        // Another token's MAC key does not verify it either.
        let w2 = SoftAnchor::new();
        assert!(read_tail(dir.path(), "o", &w2).is_err());
    }

    #[test]
    fn a_new_tail_leaves_no_slot_of_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (SoftAnchor::new(), SoftAnchor::new());
        let mut w = TailWriter::open(dir.path(), "o", None, true).unwrap();
        for size in 1..=3 {
            w.write(
                TreeHead {
                    size,
                    root: [1; 32],
                },
                &old,
            )
            .unwrap();
        }
        // Replaced (an accepted restore under another MAC key): one write, then it reads back.
        let mut w = TailWriter::open(dir.path(), "o", None, true).unwrap();
        w.write(
            TreeHead {
                size: 9,
                root: [2; 32],
            },
            &new,
        )
        .unwrap();
        let t = read_tail(dir.path(), "o", &new).unwrap().unwrap();
        assert_eq!(t.head.size, 9);
    }
}
