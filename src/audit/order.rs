//! The signing-order rule of the log: once an entry has made a version of a tenant's key
//! active, no `signature` entry of that tenant made with another version may follow it.
//!
//! The writer applies the rule while it sequences entries (a late signature made with the
//! replaced version is refused before it is written, and the service signs again with the
//! active one), and `signet audit verify` applies the same rule offline, so an auditor can
//! check that a retiring or retired version never signed after it was replaced.
//!
//! A `key_revoked` entry ends a version for good: no `signature` entry made with it may follow,
//! whatever the activations say.
//!
//! Pure: no I/O. Activations are `key_activated` (rotation) and `rotation_rolled_back` when it
//! restores a previous version (`details.restored_key_id`).

use std::collections::HashMap;

use super::entry::{Entry, event};

/// Which version each tenant's log has made active, and at which index. Serialised as the
/// PostgreSQL backend's sequencing state (`{"by_tenant": {tenant: {key_id, index}}}`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ActiveVersions {
    by_tenant: HashMap<String, Activation>,
    /// Revoked versions and the index of their `key_revoked` entry.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    revoked: HashMap<String, u64>,
}

/// The entry that made `key_id` the active version of its tenant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Activation {
    pub key_id: String,
    pub index: u64,
}

/// A signature entry made with a version after another one was made active, or after the
/// version was revoked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error(
        "a signature with {key_id} follows entry {} that made {} the active version of tenant {tenant}",
        active.index, active.key_id
    )]
    Superseded {
        tenant: String,
        key_id: String,
        active: Activation,
    },
    #[error("a signature with {key_id} follows entry {revoked_at} that revoked it")]
    Revoked {
        tenant: String,
        key_id: String,
        revoked_at: u64,
    },
}

impl Violation {
    pub fn tenant(&self) -> &str {
        match self {
            Violation::Superseded { tenant, .. } | Violation::Revoked { tenant, .. } => tenant,
        }
    }
}

impl ActiveVersions {
    /// The tenant's active version as far as the log has said.
    pub fn active(&self, tenant: &str) -> Option<&Activation> {
        self.by_tenant.get(tenant)
    }

    /// Check `entry` (at its `index`) against the rule and, if it is an activation, record it.
    pub fn observe(&mut self, entry: &Entry) -> Result<(), Violation> {
        self.check(entry)?;
        self.record(entry);
        Ok(())
    }

    /// Every revoked version and the index of its `key_revoked` entry.
    pub fn all_revoked(&self) -> impl Iterator<Item = (&str, u64)> {
        self.revoked.iter().map(|(k, i)| (k.as_str(), *i))
    }

    /// The index of the entry that revoked `key_id`, if one did.
    pub fn revoked(&self, key_id: &str) -> Option<u64> {
        self.revoked.get(key_id).copied()
    }

    /// If `entry` is an activation or a revocation, remember it (no check: for entries already
    /// in the log).
    pub fn record(&mut self, entry: &Entry) {
        if entry.event == event::KEY_REVOKED
            && let Some(key_id) = &entry.key_id
        {
            self.revoked.insert(key_id.clone(), entry.index);
        }
        if let Some((tenant, key_id)) = activation(entry) {
            self.by_tenant.insert(
                tenant.to_owned(),
                Activation {
                    key_id: key_id.to_owned(),
                    index: entry.index,
                },
            );
        }
    }

    /// Check `entry` without recording anything.
    pub fn check(&self, entry: &Entry) -> Result<(), Violation> {
        if entry.event != event::SIGNATURE {
            return Ok(());
        }
        let (Some(tenant), Some(key_id)) = (&entry.tenant, &entry.key_id) else {
            return Ok(());
        };
        if let Some(&revoked_at) = self.revoked.get(key_id) {
            return Err(Violation::Revoked {
                tenant: tenant.clone(),
                key_id: key_id.clone(),
                revoked_at,
            });
        }
        match self.by_tenant.get(tenant) {
            Some(active) if active.key_id != *key_id => Err(Violation::Superseded {
                tenant: tenant.clone(),
                key_id: key_id.clone(),
                active: active.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// Does `entry` change what may sign (an activation or a revocation)?
pub fn changes_order(entry: &Entry) -> bool {
    entry.event == event::KEY_REVOKED || activation(entry).is_some()
}

/// `(tenant, key_id)` if `entry` makes a version active.
pub fn activation(entry: &Entry) -> Option<(&str, &str)> {
    let tenant = entry.tenant.as_deref()?;
    match entry.event.as_str() {
        event::KEY_ACTIVATED => Some((tenant, entry.key_id.as_deref()?)),
        event::ROTATION_ROLLED_BACK => {
            let restored = entry.details.as_ref()?.get("restored_key_id")?.as_str()?;
            Some((tenant, restored))
        }
        _ => None,
    }
}

/// Could the canonical line `bytes` be an activation or a revocation? A cheap pre-filter for
/// start-up, so only these rare entries are parsed. (Inside a JSON string a quote is escaped,
/// so these patterns only match the top-level `event` member.)
pub fn may_change_order(bytes: &[u8]) -> bool {
    const PATTERNS: [&[u8]; 3] = [
        b"\"event\":\"key_activated\"",
        b"\"event\":\"rotation_rolled_back\"",
        b"\"event\":\"key_revoked\"",
    ];
    PATTERNS
        .iter()
        .any(|p| memchr::memmem::find(bytes, p).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Actor;

    fn entry(index: u64, ev: &str, tenant: &str, key_id: &str) -> Entry {
        let mut e = Entry::new(
            ev,
            "2026-01-01T00:00:00.000000Z".into(),
            Actor {
                identity: "t".into(),
                subject: String::new(),
                san: vec![],
                fingerprint_sha256: String::new(),
            },
        );
        e.index = index;
        e.tenant = Some(tenant.into());
        e.key_id = Some(key_id.into());
        e
    }

    fn rollback(index: u64, tenant: &str, restored: &str) -> Entry {
        let mut e = entry(index, event::ROTATION_ROLLED_BACK, tenant, restored);
        e.details = Some(serde_json::json!({"restored_key_id": restored}));
        e
    }

    #[test]
    fn signatures_follow_the_latest_activation_of_their_tenant() {
        use event::{KEY_ACTIVATED as ACT, SIGNATURE as SIG};
        // (log, index of the first violation)
        let cases: Vec<(Vec<Entry>, Option<u64>)> = vec![
            (
                vec![entry(0, SIG, "a", "a/v1"), entry(1, SIG, "a", "a/v1")],
                None,
            ),
            (
                vec![
                    entry(0, SIG, "a", "a/v1"),
                    entry(1, ACT, "a", "a/v2"),
                    entry(2, SIG, "a", "a/v2"),
                ],
                None,
            ),
            (
                vec![entry(0, ACT, "a", "a/v2"), entry(1, SIG, "a", "a/v1")],
                Some(1),
            ),
            // Another tenant's activation changes nothing for this one.
            (
                vec![entry(0, ACT, "b", "b/v2"), entry(1, SIG, "a", "a/v1")],
                None,
            ),
            // A revoked version never signs again, even while no other version is active.
            (
                vec![
                    entry(0, SIG, "a", "a/v1"),
                    entry(1, event::KEY_REVOKED, "a", "a/v1"),
                    entry(2, SIG, "a", "a/v1"),
                ],
                Some(2),
            ),
            // ... nor after a later activation names it again.
            (
                vec![
                    entry(0, event::KEY_REVOKED, "a", "a/v1"),
                    rollback(1, "a", "a/v1"),
                    entry(2, SIG, "a", "a/v1"),
                ],
                Some(2),
            ),
            // A rollback restores the previous version: the newer one may no longer sign.
            (
                vec![
                    entry(0, ACT, "a", "a/v2"),
                    rollback(1, "a", "a/v1"),
                    entry(2, SIG, "a", "a/v1"),
                    entry(3, SIG, "a", "a/v2"),
                ],
                Some(3),
            ),
        ];
        for (n, (log, want)) in cases.into_iter().enumerate() {
            let mut active = ActiveVersions::default();
            let got = log
                .iter()
                .find_map(|e| active.observe(e).err().map(|_| e.index));
            assert_eq!(got, want, "case {n}");
        }
    }

    #[test]
    fn prefilter_finds_activations_and_revocations_only_in_the_event_member() {
        let act = entry(0, event::KEY_ACTIVATED, "a", "a/v2")
            .canonical()
            .unwrap();
        assert!(may_change_order(&act));
        let revoked = entry(0, event::KEY_REVOKED, "a", "a/v2")
            .canonical()
            .unwrap();
        assert!(may_change_order(&revoked));
        let mut sig = entry(1, event::SIGNATURE, "a", "a/v1");
        sig.signer = Some(serde_json::json!({"note": "\"event\":\"key_activated\""}));
        assert!(!may_change_order(&sig.canonical().unwrap()));
    }
}
