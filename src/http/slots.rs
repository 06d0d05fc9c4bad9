//! Shares of a budget held per key (a source network, a client identity): a slot is taken with
//! its weight and given back when its guard drops. What keeps one client or one network from
//! holding every global slot.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Weights held per key; guarded by its mutex, never held across an `.await`.
pub struct Slots<K: Hash + Eq + Clone> {
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Default for Slots<K> {
    fn default() -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
        }
    }
}

/// A share taken; given back on drop.
pub struct Slot<K: Hash + Eq + Clone> {
    table: Arc<Slots<K>>,
    key: K,
    weight: usize,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    /// Take `weight` for `key` if that keeps `key` within `limit`.
    pub fn try_take(self: &Arc<Self>, key: &K, weight: usize, limit: usize) -> Option<Slot<K>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key.clone()).or_default();
        if *n + weight > limit {
            if *n == 0 {
                held.remove(key);
            }
            return None;
        }
        *n += weight;
        Some(Slot {
            table: Arc::clone(self),
            key: key.clone(),
            weight,
        })
    }

    /// What `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut held = self.table.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(self.weight);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// The network `ip` belongs to for the per-address limits: its first `v4` (IPv4) or `v6` (IPv6)
/// bits. An IPv4-mapped IPv6 address counts as IPv4.
pub fn network(ip: IpAddr, v4: u8, v6: u8) -> IpAddr {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_limit_and_gets_it_back_on_drop() {
        let t = Arc::new(Slots::<String>::default());
        let a = "a".to_owned();
        let s1 = t.try_take(&a, 3, 5).unwrap();
        assert!(t.try_take(&a, 3, 5).is_none(), "3 + 3 > 5");
        let s2 = t.try_take(&a, 2, 5).unwrap();
        assert!(
            t.try_take(&"b".to_owned(), 5, 5).is_some(),
            "another key has its own share"
        );
        drop(s1);
        assert_eq!(t.held(&a), 2);
        drop(s2);
        assert_eq!(t.held(&a), 0);
        assert!(
            t.held.lock().unwrap().is_empty(),
            "no key is kept once empty"
        );
    }

    #[test]
    fn addresses_are_grouped_by_network() {
        let n = |s: &str, v4, v6| network(s.parse().unwrap(), v4, v6).to_string();
        assert_eq!(n("127.0.0.17", 24, 64), "127.0.0.0");
        assert_eq!(n("127.0.1.17", 24, 64), "127.0.1.0");
        assert_eq!(n("10.1.2.3", 32, 64), "10.1.2.3");
        assert_eq!(n("2001:db8:1:2:3:4:5:6", 24, 64), "2001:db8:1:2::");
        assert_eq!(n("::ffff:192.168.7.9", 24, 64), "192.168.7.0");
    }
}
