#!/usr/bin/env bash
# The one test command: installs the system tools the tests need, then runs every test
# (unit, API, real-client, crash-safety and memory tests) in release mode.
#
#   bash scripts/test.sh [extra cargo test args...]
#
# The exit code is cargo's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-test-deps.sh

# --no-fail-fast: one failing test binary must not hide the results of the others.
exec cargo test --release --locked --features test-hooks --no-fail-fast "$@"
