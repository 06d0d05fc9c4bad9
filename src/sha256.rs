//! SHA-256: Signet's one implementation, AWS-LC's (through `aws-lc-rs`), the library TLS, the
//! signature check and the vault use. Every digest Signet computes goes through here: the
//! evidence log's Merkle hashes, request and policy hashes, certificate fingerprints,
//! checkpoints and timestamps.
//!
//! Why AWS-LC and not the `sha2` crate (issue 20, figures in `benches/README.md`): on a CPU
//! with the SHA extensions both run them; on one without (and under callgrind, which hides
//! them) AWS-LC's vector code takes about a third fewer instructions than `sha2`'s portable
//! rounds, a cost every evidence entry pays. And one cryptographic library is one thing to
//! keep current and the path to a FIPS build.

use aws_lc_rs::digest::{Context, Digest, SHA256, digest};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// SHA-256 of `data`. In one call to AWS-LC: a Merkle node's 65 bytes hash in about 100 ns,
/// against about 170 ns through a [`Hasher`].
pub fn sha256(data: impl AsRef<[u8]>) -> Hash {
    hash(digest(&SHA256, data.as_ref()))
}

fn hash(digest: Digest) -> Hash {
    let mut out = [0u8; 32];
    // SHA-256's output is 32 bytes: the lengths always match.
    out.copy_from_slice(digest.as_ref());
    out
}

/// SHA-256 over data given in parts.
#[derive(Clone)]
pub struct Hasher(Context);

impl Hasher {
    pub fn new() -> Self {
        Self(Context::new(&SHA256))
    }

    /// Hash `data` next.
    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        self.0.update(data.as_ref());
    }

    /// [`Hasher::update`], by value.
    pub fn chain(mut self, data: impl AsRef<[u8]>) -> Self {
        self.update(data);
        self
    }

    pub fn finish(self) -> Hash {
        hash(self.0.finish())
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn agrees_with_an_independent_implementation_and_the_standard_vectors() {
        // FIPS 180-2 appendix B.1 and the empty string.
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex::encode(sha256([])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Parts of every length around the block size, against `sha2`.
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for cut in [0, 1, 55, 56, 63, 64, 65, 127, 128, 299, 300] {
            let mut h = Hasher::new();
            h.update(&data[..cut]);
            h.update(&data[cut..]);
            let ours = h.finish();
            assert_eq!(
                ours,
                <[u8; 32]>::from(sha2::Sha256::digest(&data)),
                "cut {cut}"
            );
            assert_eq!(
                sha256(&data[..cut]),
                <[u8; 32]>::from(sha2::Sha256::digest(&data[..cut]))
            );
        }
    }
}
