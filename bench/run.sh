#!/usr/bin/env bash
# The Stevedore benchmark: one command.
#
#   bash bench/run.sh
#
# Installs the tools it needs (Debian packages: docker-registry, skopeo, hey, wrk, curl,
# python3), builds Stevedore in release mode, then runs bench/bench.py: an upstream CNCF
# Distribution on 127.0.0.1 with generated images, measured directly, through Distribution
# in proxy mode and through Stevedore. Prints one table and writes the raw figures to
# bench/results/<timestamp>.json. Loopback only; every loop is bounded; every server it
# starts is stopped on exit. Knobs (environment): see bench/README.md; e.g.
#   BENCH_BASELINE=<git rev> bash bench/run.sh
# also builds that commit's Stevedore (cached in bench/.baseline/) and measures it beside.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The same installer as the tests (policy-rc.d guard, packaged services disabled).
# moto_server (PyPI moto[server], in a virtualenv) is the S3 endpoint of the `stevedore_s3` target.
bash scripts/install-test-deps.sh docker-registry=docker-registry skopeo=skopeo hey=hey wrk=wrk curl=curl \
    python3=python3 moto=moto_server

if [[ -z "${BENCH_STEVEDORE:-}" ]]; then
    build_start=$SECONDS
    cargo build --release --locked --bin stevedore
    export BENCH_BUILD_SECS=$((SECONDS - build_start))
    echo "bench: release build took $BENCH_BUILD_SECS s" >&2
fi

# bench.py stops its servers on exit (and they die with it: PR_SET_PDEATHSIG); this trap
# makes an interrupted run.sh stop bench.py first.
python3 bench/bench.py "$@" &
bench_pid=$!
trap 'kill -TERM "$bench_pid" 2>/dev/null || true; wait "$bench_pid" 2>/dev/null || true' EXIT INT TERM HUP
status=0
wait "$bench_pid" || status=$?
trap - EXIT INT TERM HUP
exit "$status"
