//! The token's queue, fair between tenants: the scarce resource is the token, so this is
//! where one tenant's flood must not set every other tenant's latency.
//!
//! Calls wait here for a worker session. Signet's own calls (checkpoints, rotation, health)
//! go first. Signing calls are queued per tenant, and per client within a tenant; workers
//! take them by deficit round robin: tenants take turns, each taking up to its weight in
//! signatures per turn (a batch costs its number of signatures and waits until its tenant
//! has saved up enough turns), and within a tenant its clients take turns. The queue stays
//! deep enough to keep the sessions busy; only the order is fair. A tenant's and a client's
//! waiting calls are bounded: beyond, a call is refused at once ([`Refused`]) instead of
//! delaying everyone; beyond the whole queue's capacity, [`Full::Busy`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender};
use std::time::{Duration, Instant};

/// Why a signing call was not queued: its tenant's or its client's share of the queue is
/// full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("tenant {tenant} already has {limit} signing requests waiting for the token")]
    TenantQueueFull { tenant: String, limit: usize },
    #[error("client {client} already has {limit} signing requests waiting for the token")]
    ClientQueueFull { client: String, limit: usize },
}

impl Refused {
    /// Bounded label for the refusal metrics.
    pub fn limit(&self) -> &'static str {
        match self {
            Refused::TenantQueueFull { .. } => "tenant_queue",
            Refused::ClientQueueFull { .. } => "client_queue",
        }
    }
}

/// Why a call was not queued.
#[derive(Debug)]
pub enum Full {
    /// The whole queue is full (`hsm.queue_depth`).
    Busy,
    /// The pool is shutting down.
    Closed,
    /// The tenant's or the client's share is.
    Refused(Refused),
}

/// The bounds and weights, from `[limits]` (reloadable). The default bounds nothing (until
/// the configuration's are set, only Signet's own calls are made).
#[derive(Debug, Clone)]
pub struct Shares {
    pub max_queued_per_tenant: usize,
    pub max_queued_per_client: usize,
    /// Signatures per turn, by tenant; 1 for the others.
    pub weights: HashMap<String, u32>,
}

impl Default for Shares {
    fn default() -> Self {
        Self {
            max_queued_per_tenant: usize::MAX,
            max_queued_per_client: usize::MAX,
            weights: HashMap::new(),
        }
    }
}

/// Whose call this is, and how many signatures it makes.
#[derive(Debug, Clone)]
pub struct Share {
    pub tenant: String,
    pub client: String,
    pub cost: usize,
}

/// A queued call and when it was queued.
pub struct Queued<T> {
    pub item: T,
    pub since: Instant,
    /// The tenant it waited for (None: Signet's own call).
    pub tenant: Option<String>,
}

/// The queue. Shared between callers and worker threads.
pub struct FairQueue<T> {
    state: Mutex<State<T>>,
    /// One ring per queued call, sent after the call is queued and taken before one is
    /// taken out, so a worker that got a ring always finds a call. A channel rather than a
    /// condition variable: a worker that has just finished spins briefly before it sleeps,
    /// so the token's one busy session is not left waiting for the scheduler to wake it.
    bell: Sender<()>,
    rings: Receiver<()>,
}

struct State<T> {
    capacity: usize,
    queued: usize,
    closed: bool,
    own: VecDeque<Queued<T>>,
    /// Tenants with waiting calls, in turn order; the first one's turn it is.
    turns: VecDeque<String>,
    /// Whether the first tenant got its weight for its current turn.
    granted: bool,
    tenants: HashMap<String, TenantQueue<T>>,
    shares: Shares,
}

/// A client's waiting calls, each with its cost.
type ClientCalls<T> = (String, VecDeque<(usize, Queued<T>)>);

struct TenantQueue<T> {
    /// Clients with waiting calls, in turn order, each with its calls and their costs.
    clients: VecDeque<ClientCalls<T>>,
    waiting: usize,
    /// Signatures this tenant may still take before its turn ends.
    deficit: usize,
}

impl<T> FairQueue<T> {
    /// A queue of at most `capacity` calls in all.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // Room for a ring per call and one more per worker (at most 64) to wake on close.
        let (bell, rings) = crossbeam_channel::bounded(capacity + 64);
        Self {
            state: Mutex::new(State {
                capacity,
                queued: 0,
                closed: false,
                own: VecDeque::new(),
                turns: VecDeque::new(),
                granted: false,
                tenants: HashMap::new(),
                shares: Shares::default(),
            }),
            bell,
            rings,
        }
    }

    /// New bounds and weights (a configuration reload); waiting calls stay.
    pub fn set_shares(&self, shares: Shares) {
        self.lock().shares = shares;
    }

    /// Queue `item`: Signet's own call with `share` None, else a signing call.
    pub fn push(&self, share: Option<&Share>, item: T) -> Result<(), Full> {
        let mut st = self.lock();
        if st.closed {
            return Err(Full::Closed);
        }
        if st.queued >= st.capacity {
            return Err(Full::Busy);
        }
        let since = Instant::now();
        match share {
            None => st.own.push_back(Queued {
                item,
                since,
                tenant: None,
            }),
            Some(s) => st.enqueue(s, item, since).map_err(Full::Refused)?,
        }
        st.queued += 1;
        drop(st);
        // Never full: at most `capacity` calls are queued, and a ring is taken before its
        // call is.
        let _ = self.bell.try_send(());
        Ok(())
    }

    /// The next call by turn, waiting up to `wait` for one; None on timeout.
    pub fn pop_timeout(&self, wait: Duration) -> Option<Queued<T>> {
        self.rings.recv_timeout(wait).ok()?;
        let mut st = self.lock();
        let call = st.next();
        st.queued -= usize::from(call.is_some());
        call
    }

    /// Refuse further calls from now on; workers still drain what is queued.
    pub fn close(&self) {
        self.lock().closed = true;
        // Wake every waiting worker: a ring without a call means "nothing more".
        while self.bell.try_send(()).is_ok() {}
    }

    /// Waiting signing calls per tenant (for the metrics).
    pub fn depths(&self) -> Vec<(String, usize)> {
        self.lock()
            .tenants
            .iter()
            .map(|(t, q)| (t.clone(), q.waiting))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T> State<T> {
    fn enqueue(&mut self, s: &Share, item: T, since: Instant) -> Result<(), Refused> {
        let (max_tenant, max_client) = (
            self.shares.max_queued_per_tenant,
            self.shares.max_queued_per_client,
        );
        let q = self
            .tenants
            .entry(s.tenant.clone())
            .or_insert_with(|| TenantQueue {
                clients: VecDeque::new(),
                waiting: 0,
                deficit: 0,
            });
        if q.waiting >= max_tenant {
            return Err(Refused::TenantQueueFull {
                tenant: s.tenant.clone(),
                limit: max_tenant,
            });
        }
        let queued = Queued {
            item,
            since,
            tenant: Some(s.tenant.clone()),
        };
        let cost = s.cost.max(1);
        match q.clients.iter_mut().find(|(c, _)| *c == s.client) {
            Some((_, calls)) if calls.len() >= max_client => {
                return Err(Refused::ClientQueueFull {
                    client: s.client.clone(),
                    limit: max_client,
                });
            }
            Some((_, calls)) => calls.push_back((cost, queued)),
            None => q
                .clients
                .push_back((s.client.clone(), VecDeque::from([(cost, queued)]))),
        }
        q.waiting += 1;
        if q.waiting == 1 {
            self.turns.push_back(s.tenant.clone());
        }
        Ok(())
    }

    /// Signet's own calls first; then deficit round robin over the tenants: the tenant whose
    /// turn it is gets its weight in signatures when its turn begins, takes calls while it
    /// has enough, and passes the turn on when it has not (keeping what it saved, so a batch
    /// goes after as many turns as it costs) or when it has no more calls (keeping nothing).
    fn next(&mut self) -> Option<Queued<T>> {
        if let Some(q) = self.own.pop_front() {
            return Some(q);
        }
        loop {
            let tenant = self.turns.front()?.clone();
            let weight = self
                .shares
                .weights
                .get(&tenant)
                .copied()
                .unwrap_or(1)
                .max(1) as usize;
            let Some(q) = self.tenants.get_mut(&tenant) else {
                // Not reachable: a tenant is in `turns` exactly while it has calls.
                self.turns.pop_front();
                self.granted = false;
                continue;
            };
            if !self.granted {
                q.deficit = q.deficit.saturating_add(weight);
                self.granted = true;
            }
            let cost = q.head_cost().unwrap_or(0);
            if cost <= q.deficit {
                q.deficit -= cost;
                let call = q.pop();
                if q.waiting == 0 {
                    self.tenants.remove(&tenant);
                    self.turns.pop_front();
                    self.granted = false;
                }
                return call;
            }
            self.turns.rotate_left(1);
            self.granted = false;
        }
    }
}

impl<T> TenantQueue<T> {
    fn head_cost(&self) -> Option<usize> {
        self.clients
            .front()
            .and_then(|(_, c)| c.front())
            .map(|c| c.0)
    }

    /// The first client's next call; that client then goes to the back of the line.
    fn pop(&mut self) -> Option<Queued<T>> {
        let (client, mut calls) = self.clients.pop_front()?;
        let call = calls.pop_front().map(|(_, q)| q);
        if !calls.is_empty() {
            self.clients.push_back((client, calls));
        }
        self.waiting -= usize::from(call.is_some());
        call
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tenant: &str, client: &str, cost: usize) -> Share {
        Share {
            tenant: tenant.into(),
            client: client.into(),
            cost,
        }
    }

    fn queue(weights: &[(&str, u32)], per_tenant: usize, per_client: usize) -> FairQueue<String> {
        let q = FairQueue::new(1000);
        q.set_shares(Shares {
            max_queued_per_tenant: per_tenant,
            max_queued_per_client: per_client,
            weights: weights.iter().map(|(t, w)| (t.to_string(), *w)).collect(),
        });
        q
    }

    /// Queue `calls` (tenant, client, cost) in this order, then take them all.
    fn order(q: &FairQueue<String>, calls: &[(&str, &str, usize)]) -> Vec<String> {
        for (t, c, n) in calls {
            q.push(Some(&share(t, c, *n)), format!("{t}/{c}")).unwrap();
        }
        std::iter::from_fn(|| q.pop_timeout(Duration::ZERO).map(|c| c.item)).collect()
    }

    #[test]
    fn tenants_take_turns_by_weight_and_clients_within_a_tenant_too() {
        // A flood from tenant a queued before one call of b: b waits for one of a, not all.
        let q = queue(&[], 100, 100);
        let mut calls = vec![("a", "a1", 1); 5];
        calls.push(("b", "b1", 1));
        let got = order(&q, &calls);
        assert_eq!(got[..3], ["a/a1", "b/b1", "a/a1"], "{got:?}");
        // Weight 2 for a: two of a per turn of b.
        let q = queue(&[("a", 2)], 100, 100);
        let calls = [("a", "x", 1); 4]
            .into_iter()
            .chain([("b", "y", 1); 2])
            .collect::<Vec<_>>();
        let got = order(&q, &calls);
        assert_eq!(got, ["a/x", "a/x", "b/y", "a/x", "a/x", "b/y"], "{got:?}");
        // Within a tenant, its clients alternate.
        let q = queue(&[], 100, 100);
        let got = order(
            &q,
            &[
                ("a", "noisy", 1),
                ("a", "noisy", 1),
                ("a", "noisy", 1),
                ("a", "quiet", 1),
            ],
        );
        assert_eq!(got[..2], ["a/noisy", "a/quiet"], "{got:?}");
        // Signet's own calls go first.
        let q = queue(&[], 100, 100);
        q.push(Some(&share("a", "x", 1)), "a/x".into()).unwrap();
        q.push(None, "own".into()).unwrap();
        assert_eq!(q.pop_timeout(Duration::ZERO).unwrap().item, "own");
    }

    #[test]
    fn a_batch_costs_its_signatures() {
        // A batch of 4 from a against single calls of b: b signs 4 times before a's batch
        // (both weight 1), and a's batch does not wait forever either.
        let q = queue(&[], 100, 100);
        let got = order(
            &q,
            &[
                ("a", "x", 4),
                ("b", "y", 1),
                ("b", "y", 1),
                ("b", "y", 1),
                ("b", "y", 1),
                ("b", "y", 1),
                ("b", "y", 1),
            ],
        );
        let batch = got.iter().position(|c| c == "a/x").unwrap();
        assert!((3..=5).contains(&batch), "{got:?}");
        // Alone, a batch goes at once.
        let q = queue(&[], 100, 100);
        assert_eq!(order(&q, &[("a", "x", 64)]), ["a/x"]);
    }

    #[test]
    fn full_shares_refuse_at_once_and_the_whole_queue_is_bounded() {
        let q = queue(&[], 3, 2);
        q.push(Some(&share("a", "c1", 1)), String::new()).unwrap();
        q.push(Some(&share("a", "c1", 1)), String::new()).unwrap();
        match q.push(Some(&share("a", "c1", 1)), String::new()) {
            Err(Full::Refused(r)) => assert_eq!(r.limit(), "client_queue"),
            other => panic!("{:?}", other.err()),
        }
        q.push(Some(&share("a", "c2", 1)), String::new()).unwrap();
        match q.push(Some(&share("a", "c3", 1)), String::new()) {
            Err(Full::Refused(r)) => assert_eq!(r.limit(), "tenant_queue"),
            other => panic!("{:?}", other.err()),
        }
        // Another tenant is not affected.
        q.push(Some(&share("b", "c4", 1)), String::new()).unwrap();
        assert_eq!(q.depths().len(), 2);
        let small = FairQueue::new(1);
        small.push(None, 1).unwrap();
        assert!(matches!(small.push(None, 2), Err(Full::Busy)));
        // Closed: what is queued is still taken, then nothing.
        small.close();
        assert!(matches!(small.push(None, 3), Err(Full::Closed)));
        assert_eq!(small.pop_timeout(Duration::from_secs(5)).unwrap().item, 1);
        let start = Instant::now();
        assert!(small.pop_timeout(Duration::from_secs(5)).is_none());
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "a closed queue wakes its workers"
        );
    }
}
