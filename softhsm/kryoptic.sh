#!/usr/bin/env bash
# Build kryoptic, a second PKCS#11 soft token (Rust, from crates.io), into target/kryoptic/,
# for the integration tests' second pass (SIGNET_TEST_TOKEN=kryoptic). Pinned version, checksum
# and features; reused when present. kryoptic's default features need OpenSSL >= 3.2, so on
# Debian 12 it is built "minimal" against the system OpenSSL 3.0 (dynamic), which has
# everything Signet uses (P-256 ECDSA, HMAC-SHA256, data objects, certificates).
# Needs: libssl-dev, libclang-dev, pkg-config (installed by softhsm/setup.sh --test). ~3 min cold.
set -euo pipefail

version=1.5.4
sha256=21b64b7679ce821f19a7a48b7e40146f26fbb9daa64ee2acb6376788a26d7ae8
features=minimal,kryoptic-lib/dynamic

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/kryoptic"
lib="$out/libkryoptic_pkcs11.so"
stamp="$out/VERSION"
if [ -f "$lib" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version $features" ]; then
  exit 0
fi

mkdir -p "$out"
src="$out/src"
rm -rf "$src" && mkdir -p "$src"
crate="$out/kryoptic-$version.crate"
if [ ! -f "$crate" ] || ! echo "$sha256  $crate" | sha256sum -c --quiet - 2>/dev/null; then
  echo "downloading kryoptic $version from crates.io" >&2
  curl -sSfL -o "$crate" "https://static.crates.io/crates/kryoptic/kryoptic-$version.crate"
fi
echo "$sha256  $crate" | sha256sum -c --quiet - || { echo "kryoptic $version: checksum mismatch" >&2; exit 1; }
tar xzf "$crate" -C "$src"
echo "building kryoptic $version ($features) into $out" >&2
(cd "$src/kryoptic-$version" &&
  cargo build --release --locked --quiet --no-default-features --features "$features" \
    --target-dir "$out/build")
cp "$out/build/release/libkryoptic_pkcs11.so" "$lib"
rm -rf "$src"
echo "$version $features" > "$stamp"
