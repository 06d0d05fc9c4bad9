//! Fair access to the token, the scarce resource: a weighted round robin over tenants (and
//! over clients within a tenant) in front of the token's queue, so one tenant flooding at full
//! rate cannot set every other tenant's latency.
//!
//! At most `capacity` signatures are with the token at once. While there is room and nobody
//! waits, a request goes straight on. Otherwise it waits in its client's queue within its
//! tenant's; as signatures finish, tenants take turns, each taking up to its weight of requests
//! per turn (deficit round robin: a batch counts as its number of signatures), and within a
//! tenant its clients take turns. A tenant's or a client's queue is bounded: beyond it the
//! request is refused at once (429), instead of delaying everyone. Knows nothing of HTTP or the
//! token; the service asks it for a [`Turn`] around each token call.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Why a request was not queued.
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

/// The bounds and weights, from `[limits]` (reloadable).
#[derive(Debug, Clone, Default)]
pub struct Shares {
    pub max_queued_per_tenant: usize,
    pub max_queued_per_client: usize,
    pub weights: HashMap<String, u32>,
}

/// The scheduler. Shared; its state behind one mutex, never held across an `.await`.
pub struct Fair {
    capacity: usize,
    state: Mutex<State>,
}

struct Waiter {
    cost: usize,
    tx: oneshot::Sender<()>,
}

#[derive(Default)]
struct TenantQueue {
    /// Clients with waiters, in turn order, each with its waiters.
    clients: VecDeque<(String, VecDeque<Waiter>)>,
    waiting: usize,
    /// Deficit round robin: what the tenant may still take in its current turn.
    deficit: usize,
}

#[derive(Default)]
struct State {
    /// Signatures with the token now.
    with_token: usize,
    /// Tenants with waiters, in turn order.
    turns: VecDeque<String>,
    queues: HashMap<String, TenantQueue>,
    shares: Shares,
}

/// A request's turn with the token; the next one is let in when it drops.
pub struct Turn {
    fair: Arc<Fair>,
    cost: usize,
    /// How long the request waited for its turn.
    pub waited: Duration,
}

impl Fair {
    /// At most `capacity` signatures with the token at once (a batch larger than that goes
    /// alone).
    pub fn new(capacity: usize, shares: Shares) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            state: Mutex::new(State {
                shares,
                ..State::default()
            }),
        })
    }

    /// New bounds and weights (a configuration reload).
    pub fn set_shares(&self, shares: Shares) {
        self.lock().shares = shares;
    }

    /// Wait for a turn for `cost` signatures of `client` in `tenant`.
    pub async fn turn(
        self: &Arc<Self>,
        tenant: &str,
        client: &str,
        cost: usize,
    ) -> Result<Turn, Refused> {
        let asked = Instant::now();
        let cost = cost.max(1);
        let rx = {
            let mut st = self.lock();
            if st.turns.is_empty() && (st.with_token == 0 || st.with_token + cost <= self.capacity)
            {
                st.with_token += cost;
                return Ok(self.granted(cost, asked));
            }
            let (tx, rx) = oneshot::channel();
            st.enqueue(tenant, client, Waiter { cost, tx })?;
            // Room may have been left by a request that went before anyone queued.
            self.dispatch(&mut st);
            rx
        };
        let mut pending = Pending {
            fair: Arc::clone(self),
            cost,
            rx,
            taken: false,
        };
        let answer = (&mut pending.rx).await;
        pending.taken = true;
        // The sender is only dropped unsent when the scheduler itself goes (shutdown): the
        // request then goes on without being counted.
        Ok(match answer {
            Ok(()) => self.granted(cost, asked),
            Err(_) => self.granted_untracked(asked),
        })
    }

    /// Waiting requests per tenant (for the metrics).
    pub fn depths(&self) -> Vec<(String, usize)> {
        self.lock()
            .queues
            .iter()
            .map(|(t, q)| (t.clone(), q.waiting))
            .collect()
    }

    fn granted(self: &Arc<Self>, cost: usize, asked: Instant) -> Turn {
        Turn {
            fair: Arc::clone(self),
            cost,
            waited: asked.elapsed(),
        }
    }

    fn granted_untracked(self: &Arc<Self>, asked: Instant) -> Turn {
        Turn {
            fair: Arc::clone(self),
            cost: 0,
            waited: asked.elapsed(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Let waiters in while there is room: tenants in turn, each up to its weight per turn.
    fn dispatch(&self, st: &mut State) {
        while let Some(tenant) = st.turns.front().cloned() {
            let weight = st.shares.weights.get(&tenant).copied().unwrap_or(1) as usize;
            let Some(q) = st.queues.get_mut(&tenant) else {
                st.turns.pop_front();
                continue;
            };
            let Some(cost) = q.next_cost() else {
                st.queues.remove(&tenant);
                st.turns.pop_front();
                continue;
            };
            if st.with_token > 0 && st.with_token + cost > self.capacity {
                return;
            }
            if q.deficit == 0 {
                q.deficit = weight;
            }
            let waiter = q.pop();
            q.deficit = q.deficit.saturating_sub(1);
            let (exhausted, empty) = (q.deficit == 0, q.waiting == 0);
            if let Some(w) = waiter {
                // A waiter that gave up (its request was dropped) takes no room.
                if w.tx.send(()).is_ok() {
                    st.with_token += w.cost;
                }
            }
            if empty {
                st.queues.remove(&tenant);
                st.turns.pop_front();
            } else if exhausted {
                st.turns.rotate_left(1);
            }
        }
    }

    fn release(&self, cost: usize) {
        let mut st = self.lock();
        st.with_token = st.with_token.saturating_sub(cost);
        self.dispatch(&mut st);
    }
}

impl State {
    fn enqueue(&mut self, tenant: &str, client: &str, w: Waiter) -> Result<(), Refused> {
        let (max_tenant, max_client) = (
            self.shares.max_queued_per_tenant,
            self.shares.max_queued_per_client,
        );
        let q = self.queues.entry(tenant.to_owned()).or_default();
        if q.waiting >= max_tenant {
            return Err(Refused::TenantQueueFull {
                tenant: tenant.to_owned(),
                limit: max_tenant,
            });
        }
        match q.clients.iter_mut().find(|(c, _)| c == client) {
            Some((_, waiters)) if waiters.len() >= max_client => {
                return Err(Refused::ClientQueueFull {
                    client: client.to_owned(),
                    limit: max_client,
                });
            }
            Some((_, waiters)) => waiters.push_back(w),
            None => q
                .clients
                .push_back((client.to_owned(), VecDeque::from([w]))),
        }
        q.waiting += 1;
        if !self.turns.iter().any(|t| t == tenant) {
            self.turns.push_back(tenant.to_owned());
        }
        Ok(())
    }
}

impl TenantQueue {
    fn next_cost(&self) -> Option<usize> {
        self.clients
            .front()
            .and_then(|(_, w)| w.front())
            .map(|w| w.cost)
    }

    /// The next waiter: the first client's, then that client goes to the back of the line.
    fn pop(&mut self) -> Option<Waiter> {
        let (client, mut waiters) = self.clients.pop_front()?;
        let w = waiters.pop_front();
        if !waiters.is_empty() {
            self.clients.push_back((client, waiters));
        }
        self.waiting -= usize::from(w.is_some());
        w
    }
}

/// A request waiting for its turn. Dropped before the turn arrived (the request was
/// cancelled), it leaves no trace; dropped just after the turn was granted but before it was
/// taken, it hands the room back.
struct Pending {
    fair: Arc<Fair>,
    cost: usize,
    rx: oneshot::Receiver<()>,
    /// The answer was received (the room, if granted, now belongs to a [`Turn`]).
    taken: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.taken {
            self.rx.close();
            if self.rx.try_recv().is_ok() {
                self.fair.release(self.cost);
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.fair.release(self.cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: &[(&str, u32)]) -> Shares {
        Shares {
            max_queued_per_tenant: 100,
            max_queued_per_client: 50,
            weights: weights.iter().map(|(t, w)| (t.to_string(), *w)).collect(),
        }
    }

    /// The order in which queued requests get their turn, with capacity 1.
    async fn order(fair: &Arc<Fair>, requests: &[(&str, &str)]) -> Vec<String> {
        let first = fair.turn("hold", "hold", 1).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (i, (t, c)) in requests.iter().enumerate() {
            let (f, tx, t, c) = (Arc::clone(fair), tx.clone(), t.to_string(), c.to_string());
            tasks.push(tokio::spawn(async move {
                let turn = f.turn(&t, &c, 1).await.unwrap();
                tx.send(format!("{t}/{c}")).unwrap();
                drop(turn);
            }));
            // Queue them in this order.
            while fair
                .lock()
                .queues
                .values()
                .map(|q| q.waiting)
                .sum::<usize>()
                < i + 1
            {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        drop(tx);
        let mut out = Vec::new();
        while let Some(s) = rx.recv().await {
            out.push(s);
        }
        for t in tasks {
            t.await.unwrap();
        }
        out
    }

    #[tokio::test]
    async fn tenants_take_turns_by_weight_and_clients_within_a_tenant_too() {
        // A flood from tenant a queued before one request of b: b waits for one of a, not all.
        let fair = Fair::new(1, shares(&[]));
        let mut reqs = vec![("a", "a1"); 5];
        reqs.push(("b", "b1"));
        let got = order(&fair, &reqs).await;
        assert_eq!(got[..3], ["a/a1", "b/b1", "a/a1"], "{got:?}");
        // Weight 2 for a: two of a per turn of b.
        let fair = Fair::new(1, shares(&[("a", 2)]));
        let reqs = [
            ("a", "x"),
            ("a", "x"),
            ("a", "x"),
            ("a", "x"),
            ("b", "y"),
            ("b", "y"),
        ];
        let got = order(&fair, &reqs).await;
        assert_eq!(got, ["a/x", "a/x", "b/y", "a/x", "a/x", "b/y"], "{got:?}");
        // Within a tenant, its clients alternate.
        let fair = Fair::new(1, shares(&[]));
        let reqs = [
            ("a", "noisy"),
            ("a", "noisy"),
            ("a", "noisy"),
            ("a", "quiet"),
        ];
        let got = order(&fair, &reqs).await;
        assert_eq!(got[..2], ["a/noisy", "a/quiet"], "{got:?}");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_dropped_waiter_takes_no_room() {
        let fair = Fair::new(
            1,
            Shares {
                max_queued_per_tenant: 3,
                max_queued_per_client: 2,
                weights: HashMap::new(),
            },
        );
        let held = fair.turn("a", "c1", 1).await.unwrap();
        let f = Arc::clone(&fair);
        let w1 = tokio::spawn(async move { f.turn("a", "c1", 1).await.map(|_| ()) });
        let f = Arc::clone(&fair);
        let w2 = tokio::spawn(async move { f.turn("a", "c1", 1).await.map(|_| ()) });
        while fair.depths().iter().map(|(_, n)| n).sum::<usize>() < 2 {
            tokio::task::yield_now().await;
        }
        let refused = fair.turn("a", "c1", 1).await.err().unwrap();
        assert_eq!(refused.limit(), "client_queue");
        let f = Arc::clone(&fair);
        let w3 = tokio::spawn(async move { f.turn("a", "c2", 1).await.map(|_| ()) });
        while fair.depths().iter().map(|(_, n)| n).sum::<usize>() < 3 {
            tokio::task::yield_now().await;
        }
        let refused = fair.turn("a", "c3", 1).await.err().unwrap();
        assert_eq!(refused.limit(), "tenant_queue");
        // Waiters that give up leave no trace: the others still get through.
        w1.abort();
        let _ = w1.await;
        drop(held);
        assert!(w2.await.unwrap().is_ok());
        assert!(w3.await.unwrap().is_ok());
        assert_eq!(fair.lock().with_token, 0);
        assert!(fair.depths().is_empty());
    }
}
