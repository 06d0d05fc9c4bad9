//! Fuzz the parsers an auditor runs on untrusted files: evidence entries, C2SP signed notes,
//! checkpoint bodies and tlog-proofs. Any input must give a value or an error, never a panic.
//!
//!     cargo fuzz run --fuzz-dir tests/fuzz evidence_parsers -- -max_total_time=60
#![no_main]

use libfuzzer_sys::fuzz_target;
use signet::audit::{entry, note};

fuzz_target!(|data: &[u8]| {
    let _ = entry::parse_stored(data, 0);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(n) = note::SignedNote::parse(text) {
            let _ = note::Checkpoint::parse_body(&n.text);
            let _ = n.render();
        }
        let _ = note::Checkpoint::parse_body(text);
        if let Ok(p) = note::TlogProof::parse(text) {
            let _ = p.render();
        }
    }
});
