//! Lookup indexes over the evidence log, so auditors' questions never scan the log: the
//! entries of a transaction ID, and each tenant's entries in log order with their times.
//!
//! Held in memory beside the tree (built at start-up, extended by the writer after each
//! commit). Pure: no I/O.

use std::collections::HashMap;

/// Entries of one tenant in log order, with their times (µs since the epoch) and the running
/// maximum of those times (entry times are almost, not strictly, in log order).
#[derive(Debug, Default)]
struct TenantEntries {
    index: Vec<u64>,
    time_us: Vec<i64>,
    max_time_us: Vec<i64>,
}

/// What an entry contributes to the indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Indexed {
    pub tenant: Option<String>,
    pub transaction_id: Option<String>,
    /// Entry time, µs since the epoch.
    pub time_us: i64,
}

/// How far past `until` a page keeps looking for entries written slightly out of time order.
const TIME_SLACK_US: i64 = 60_000_000;

#[derive(Debug, Default)]
pub struct Index {
    by_transaction: HashMap<String, Vec<u64>>,
    by_tenant: HashMap<String, TenantEntries>,
}

/// One page of a tenant's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub indexes: Vec<u64>,
    /// Pass as `after` for the next page; `None` when this page was the last one so far.
    pub next_cursor: Option<u64>,
}

impl Index {
    /// Index entry `index` (entries are added in log order).
    pub fn add(&mut self, index: u64, fields: Indexed) {
        if let Some(t) = fields.transaction_id {
            self.by_transaction.entry(t).or_default().push(index);
        }
        if let Some(tenant) = fields.tenant {
            let e = self.by_tenant.entry(tenant).or_default();
            let max = e.max_time_us.last().copied().unwrap_or(i64::MIN);
            e.index.push(index);
            e.time_us.push(fields.time_us);
            e.max_time_us.push(max.max(fields.time_us));
        }
    }

    /// Forget entries from `size` on (a failed commit's, or a cut tail's).
    pub fn truncate(&mut self, size: u64) {
        for v in self.by_transaction.values_mut() {
            v.retain(|&i| i < size);
        }
        self.by_transaction.retain(|_, v| !v.is_empty());
        for e in self.by_tenant.values_mut() {
            let keep = e.index.partition_point(|&i| i < size);
            e.index.truncate(keep);
            e.time_us.truncate(keep);
            e.max_time_us.truncate(keep);
        }
    }

    /// The entries that carry `transaction_id`, in log order.
    pub fn transaction(&self, transaction_id: &str) -> &[u64] {
        self.by_transaction
            .get(transaction_id)
            .map_or(&[], Vec::as_slice)
    }

    /// Up to `limit` entries of `tenant` with `since_us <= time < until_us`, after entry
    /// `after` (exclusive), in log order. Stable while the log grows: a cursor is an index.
    pub fn tenant_page(
        &self,
        tenant: &str,
        since_us: i64,
        until_us: i64,
        after: Option<u64>,
        limit: usize,
    ) -> Page {
        let Some(e) = self.by_tenant.get(tenant) else {
            return Page {
                indexes: Vec::new(),
                next_cursor: None,
            };
        };
        // Every entry before `from_time` is older than `since` (the running maximum says so).
        let from_time = e.max_time_us.partition_point(|&t| t < since_us);
        let from_cursor = after.map_or(0, |a| e.index.partition_point(|&i| i <= a));
        let mut indexes = Vec::new();
        for pos in from_time.max(from_cursor)..e.index.len() {
            let t = e.time_us[pos];
            if t >= until_us.saturating_add(TIME_SLACK_US) {
                break;
            }
            if t >= since_us && t < until_us {
                indexes.push(e.index[pos]);
                if indexes.len() == limit {
                    return Page {
                        next_cursor: Some(e.index[pos]),
                        indexes,
                    };
                }
            }
        }
        Page {
            indexes,
            next_cursor: None,
        }
    }
}

/// RFC 3339 to µs since the epoch.
pub fn parse_time_us(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(ix: &mut Index, i: u64, tenant: &str, tx: Option<&str>, t: i64) {
        ix.add(
            i,
            Indexed {
                tenant: Some(tenant.into()),
                transaction_id: tx.map(Into::into),
                time_us: t,
            },
        );
    }

    #[test]
    fn transactions_and_tenant_pages() {
        let mut ix = Index::default();
        // Tenant a at times 10, 20, 15 (slightly out of order), 30, 40; tenant b between.
        add(&mut ix, 0, "a", Some("t1"), 10);
        add(&mut ix, 1, "b", Some("t1"), 11);
        add(&mut ix, 2, "a", None, 20);
        add(&mut ix, 3, "a", Some("t2"), 15);
        add(&mut ix, 4, "a", None, 30);
        add(&mut ix, 5, "a", Some("t1"), 40);
        assert_eq!(ix.transaction("t1"), &[0, 1, 5]);
        assert_eq!(ix.transaction("none"), &[] as &[u64]);
        // since 15, until 35: entries 2 (20), 3 (15), 4 (30) in log order.
        let p = ix.tenant_page("a", 15, 35, None, 10);
        assert_eq!((p.indexes, p.next_cursor), (vec![2, 3, 4], None));
        // Pages of 2 with a cursor; the cursor stays valid while the log grows.
        let p1 = ix.tenant_page("a", i64::MIN, i64::MAX, None, 2);
        assert_eq!((p1.indexes.clone(), p1.next_cursor), (vec![0, 2], Some(2)));
        add(&mut ix, 6, "a", None, 50);
        let p2 = ix.tenant_page("a", i64::MIN, i64::MAX, p1.next_cursor, 2);
        assert_eq!((p2.indexes, p2.next_cursor), (vec![3, 4], Some(4)));
        let p3 = ix.tenant_page("a", i64::MIN, i64::MAX, Some(4), 2);
        assert_eq!((p3.indexes, p3.next_cursor), (vec![5, 6], Some(6)));
        assert!(
            ix.tenant_page("a", i64::MIN, i64::MAX, Some(6), 2)
                .indexes
                .is_empty()
        );
        assert!(ix.tenant_page("c", 0, 100, None, 2).indexes.is_empty());
        ix.truncate(4);
        assert_eq!(ix.transaction("t1"), &[0, 1]);
        assert_eq!(
            ix.tenant_page("a", i64::MIN, i64::MAX, None, 10).indexes,
            vec![0, 2, 3]
        );
        assert_eq!(
            parse_time_us("1970-01-01T00:00:01.000002Z"),
            Some(1_000_002)
        );
    }
}
