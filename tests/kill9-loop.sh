#!/usr/bin/env bash
# On demand, not in CI: SIGKILL the service under signing load ROUNDS times (default 100);
# after each restart every acknowledged signature must be in the log and start-up must never
# refuse the log it wrote itself. Usage: tests/kill9-loop.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-100}" cargo test --release --features insecure-test-hooks --test integrity \
  -- --ignored --nocapture kill_9_loop_loses_nothing_and_never_refuses_its_own_log
