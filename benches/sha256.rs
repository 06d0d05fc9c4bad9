//! SHA-256 as the evidence log uses it: a leaf (0x00 and a 700-byte entry) and a node (0x01
//! and two hashes), through Signet's `sha256` module (AWS-LC) and through the `sha2` crate,
//! on the current core. `cargo bench --bench sha256 [-- ITERATIONS]`; run it under
//! `taskset -c 1` for steadier figures, or under `valgrind --tool=callgrind` (with a small
//! count) for instructions.

use std::hint::black_box;
use std::time::Instant;

use sha2::Digest as _;

fn sha2_leaf(e: &[u8]) -> [u8; 32] {
    sha2::Sha256::new()
        .chain_update([0u8])
        .chain_update(e)
        .finalize()
        .into()
}

fn sha2_node(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
    sha2::Sha256::new()
        .chain_update([1u8])
        .chain_update(l)
        .chain_update(r)
        .finalize()
        .into()
}

fn time(name: &str, n: u64, mut f: impl FnMut()) {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "{name:<32} {:>8.0} ns",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let entry = vec![0x41u8; 700];
    let (l, r) = ([7u8; 32], [9u8; 32]);
    assert_eq!(signet::audit::merkle::leaf_hash(&entry), sha2_leaf(&entry));
    assert_eq!(signet::audit::merkle::node_hash(&l, &r), sha2_node(&l, &r));
    println!("SHA-256, {n} iterations each");
    time("leaf, 700 B, Signet (AWS-LC)", n, || {
        black_box(signet::audit::merkle::leaf_hash(black_box(&entry)));
    });
    time("leaf, 700 B, sha2", n, || {
        black_box(sha2_leaf(black_box(&entry)));
    });
    time("node, 65 B, Signet (AWS-LC)", n, || {
        black_box(signet::audit::merkle::node_hash(
            black_box(&l),
            black_box(&r),
        ));
    });
    time("node, 65 B, sha2", n, || {
        black_box(sha2_node(black_box(&l), black_box(&r)));
    });
}
