//! The vault engine on an in-memory token (software AES-GCM standing in for the token's
//! key-encryption keys, with generations that can be destroyed) and the real file store in a
//! temp dir.

use std::collections::BTreeMap;
use std::sync::Mutex;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use futures::future::BoxFuture;
use zeroize::Zeroizing;

use super::*;
use crate::storage::file::vault::{FileHolds, FileVault};

/// Key-encryption keys by generation, in memory.
#[derive(Default)]
struct FakeKeys {
    keks: Mutex<BTreeMap<u32, [u8; 32]>>,
}

impl FakeKeys {
    fn kek(&self, g: u32) -> Result<LessSafeKey, crate::hsm::Error> {
        let keks = self.keks.lock().unwrap();
        let k = keks
            .get(&g)
            .ok_or_else(|| crate::hsm::Error::NotFound(format!("secret key {g}")))?;
        Ok(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).unwrap()))
    }
}

impl VaultKeys for FakeKeys {
    fn ensure_kek(&self, g: u32) -> BoxFuture<'_, Result<(), crate::hsm::Error>> {
        self.keks
            .lock()
            .unwrap()
            .entry(g)
            .or_insert_with(|| *format::random_key());
        Box::pin(async { Ok(()) })
    }
    fn has_kek(&self, g: u32) -> BoxFuture<'_, Result<bool, crate::hsm::Error>> {
        let has = self.keks.lock().unwrap().contains_key(&g);
        Box::pin(async move { Ok(has) })
    }
    fn wrap(
        &self,
        g: u32,
        key: Key,
        aad: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u8>, crate::hsm::Error>> {
        let out = self.kek(g).map(|k| {
            let mut buf = key.to_vec();
            k.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([7; 12]),
                Aad::from(&aad),
                &mut buf,
            )
            .unwrap();
            buf
        });
        Box::pin(async move { out })
    }
    fn unwrap(
        &self,
        g: u32,
        wrapped: Vec<u8>,
        aad: Vec<u8>,
    ) -> BoxFuture<'_, Result<Key, crate::hsm::Error>> {
        let out = self.kek(g).and_then(|k| {
            let mut buf = wrapped;
            let plain = k
                .open_in_place(
                    Nonce::assume_unique_for_key([7; 12]),
                    Aad::from(&aad),
                    &mut buf,
                )
                .map_err(|_| crate::hsm::Error::Malformed("wrapped key"))?;
            let mut key = Zeroizing::new([0u8; 32]);
            key.copy_from_slice(plain);
            Ok(key)
        });
        Box::pin(async move { out })
    }
    fn destroy_kek(&self, g: u32) -> BoxFuture<'_, Result<bool, crate::hsm::Error>> {
        let had = self.keks.lock().unwrap().remove(&g).is_some();
        Box::pin(async move { Ok(had) })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    keys: Arc<FakeKeys>,
    store: Arc<FileVault>,
    vault: Vault,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(FakeKeys::default());
    let store = Arc::new(FileVault::new(dir.path()));
    let vault = Vault::open(
        Arc::clone(&keys) as _,
        Arc::clone(&store) as _,
        Arc::new(FileHolds::new(dir.path())),
        vec!["email".into()],
        false,
        "2026-12-05T00:00:00Z",
    )
    .await
    .unwrap();
    Fixture {
        _dir: dir,
        keys,
        store,
        vault,
    }
}

fn ctx() -> Context {
    Context {
        tenant: "payroll".into(),
        transaction_id: Some("tx".into()),
        time_us: 1_000_000,
        retain_until_us: Some(2_000_000),
        retention_class: "short".into(),
    }
}

/// Seal `email`'s evidence as entry `index` and store it, as the writer would.
async fn stored(f: &Fixture, index: u64, email: &str) -> Row {
    let (commitment, mut row, _written) = f
        .vault
        .seal(&serde_json::json!({"email": email}), &ctx())
        .await
        .unwrap();
    assert_eq!(row.commitment, commitment);
    row.index = index;
    f.store.append(std::slice::from_ref(&row)).unwrap();
    *row
}

#[tokio::test]
async fn sealed_evidence_reads_back_checked_is_found_by_subject_and_erased_for_good() {
    let f = fixture().await;
    let row = stored(&f, 3, "Ann@Example.com").await;
    stored(&f, 4, "bob@example.com").await;
    match f.vault.read(3, &row.commitment).await.unwrap() {
        Reading::Present(ev) => assert_eq!(ev.signer["email"], "Ann@Example.com"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        f.vault.read(3, &"0".repeat(64)).await.unwrap(),
        Reading::Unreadable(_)
    ));
    assert_eq!(
        f.vault.read(9, &row.commitment).await.unwrap(),
        Reading::Missing
    );
    let found = f.vault.subject_rows(" ann@example.com").await.unwrap();
    assert_eq!(found.iter().map(|r| r.index).collect::<Vec<_>>(), vec![3]);
    assert_eq!(f.store.due(2_000_000, None, 10).await.unwrap().len(), 2);
    assert!(f.store.due(1_999_999, None, 10).await.unwrap().is_empty());

    let erasure = Erasure {
        erased_at: "2026-12-05T00:00:01Z".into(),
        cause: "subject".into(),
        reason: "request 1".into(),
        entry: 7,
    };
    assert_eq!(f.store.erase(&[3], &erasure).await.unwrap(), 1);
    assert_eq!(f.store.erase(&[3], &erasure).await.unwrap(), 0, "once");
    assert_eq!(
        f.vault.read(3, &row.commitment).await.unwrap(),
        Reading::Erased(erasure)
    );
    assert!(
        f.vault
            .subject_rows("ann@example.com")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(f.store.counts().await.unwrap(), (1, 1));
}

#[tokio::test]
async fn a_key_rotation_rewraps_live_keys_destroys_the_old_generation_and_strands_old_copies() {
    let f = fixture().await;
    let before = stored(&f, 1, "a@example.com").await;
    let hash_before = f
        .vault
        .request_signer_hash(&serde_json::json!({"email": "a@example.com"}))
        .unwrap();
    // A record sealed under generation 1 and not written yet holds the rotation back.
    let (_, _, pending) = f
        .vault
        .seal(&serde_json::json!({"email": "p@example.com"}), &ctx())
        .await
        .unwrap();
    let (from, to) = f
        .vault
        .begin_rotation("2026-12-06T00:00:00Z")
        .await
        .unwrap();
    assert_eq!((from, to), (1, 2));
    let t = std::time::Instant::now();
    f.vault.quiesce(2, Duration::from_millis(60)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(60),
        "waited for the pending record"
    );
    drop(pending);
    let t = std::time::Instant::now();
    f.vault.quiesce(2, Duration::from_secs(5)).await;
    assert!(t.elapsed() < Duration::from_secs(1), "none pending");
    // Sealed under generation 1 just before the switch, written just after: caught too.
    let late = {
        let mut r = before.clone();
        r.index = 2;
        r
    };
    f.store.append(std::slice::from_ref(&late)).unwrap();
    let after = stored(&f, 5, "c@example.com").await;
    assert!(matches!(&after.content, Content::Sealed(s) if s.kek == 2));

    let (destroyed, rewrapped) = f
        .vault
        .finish_rotation(Duration::from_millis(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((destroyed, rewrapped), (vec![1], 2));
    assert!(!f.keys.keks.lock().unwrap().contains_key(&1));
    assert_eq!(f.vault.meta().await.unwrap().retiring, Vec::<u32>::new());
    assert!(
        f.vault
            .finish_rotation(Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );
    for i in [1, 2, 5] {
        let row = f.store.get(i).await.unwrap().unwrap();
        assert!(
            matches!(f.vault.open_row(&row).await, Reading::Present(_)),
            "{i}"
        );
    }
    // The subject index key survives rotations: tags and request hashes stay the same.
    assert_eq!(
        f.vault.subject_rows("a@example.com").await.unwrap().len(),
        2
    );
    assert_eq!(
        f.vault
            .request_signer_hash(&serde_json::json!({"email": "a@example.com"}))
            .unwrap(),
        hash_before
    );
    // A copy from before the rotation (a backup) no longer opens.
    match f.vault.open_row(&before).await {
        Reading::Unreadable(d) => assert!(d.contains("generation 1"), "{d}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn holds_cover_their_transaction_or_their_tenant_window_until_released() {
    let row = |tenant: &str, tx: Option<&str>, time_us: i64| Row {
        index: 0,
        tenant: tenant.into(),
        transaction_id: tx.map(str::to_owned),
        time_us,
        retain_until_us: None,
        retention_class: "c".into(),
        commitment: String::new(),
        content: Content::Erased(Erasure {
            erased_at: String::new(),
            cause: String::new(),
            reason: String::new(),
            entry: 0,
        }),
    };
    let hold =
        |tx: Option<&str>, tenant: Option<&str>, since: Option<&str>, until: Option<&str>| Hold {
            id: "h".into(),
            transaction_id: tx.map(str::to_owned),
            tenant: tenant.map(str::to_owned),
            since: since.map(str::to_owned),
            until: until.map(str::to_owned),
            reason: "r".into(),
            placed_by: "p".into(),
            placed_at: "t".into(),
            placed_entry: 0,
            released: None,
        };
    let t0 = crate::clock::parse_rfc3339_micros("2026-01-01T00:00:00Z").unwrap();
    let t1 = crate::clock::parse_rfc3339_micros("2026-02-01T00:00:00Z").unwrap();
    let cases = [
        (
            hold(Some("tx"), None, None, None),
            row("a", Some("tx"), t0),
            true,
        ),
        (
            hold(Some("tx"), None, None, None),
            row("a", Some("other"), t0),
            false,
        ),
        (
            hold(Some("tx"), None, None, None),
            row("a", None, t0),
            false,
        ),
        (hold(None, Some("a"), None, None), row("a", None, t0), true),
        (hold(None, Some("a"), None, None), row("b", None, t0), false),
        (
            hold(None, Some("a"), Some("2026-01-15T00:00:00Z"), None),
            row("a", None, t0),
            false,
        ),
        (
            hold(None, Some("a"), Some("2026-01-15T00:00:00Z"), None),
            row("a", None, t1),
            true,
        ),
        (
            hold(None, Some("a"), None, Some("2026-02-01T00:00:00Z")),
            row("a", None, t1),
            false,
        ),
        (
            hold(None, Some("a"), None, Some("2026-02-01T00:00:00Z")),
            row("a", None, t0),
            true,
        ),
        (hold(None, None, None, None), row("a", None, t0), false),
    ];
    for (i, (h, r, want)) in cases.iter().enumerate() {
        assert_eq!(h.covers(r), *want, "case {i}");
    }
    let mut released = cases[0].0.clone();
    released.released = Some(Release {
        released_by: "p".into(),
        released_at: "t".into(),
        reason: "r".into(),
        entry: 1,
    });
    assert!(!released.covers(&cases[0].1));
}
