#!/usr/bin/env bash
# The Stevedore benchmark: one command.
#
#   bash bench/run.sh
#
# Installs the tools it needs (Debian packages: docker-registry, skopeo, hey, wrk, curl,
# python3, openssl), builds Stevedore as shipped (`--profile dist`), then runs bench/bench.py: an upstream CNCF
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
    python3=python3 openssl=openssl moto=moto_server

# Garage (crates.io garage 2.5.0, a real S3 server: the S3 rows of bench.py and scale.py) is a
# test tool, never linked: built once in the background, at low priority, into
# ~/.cache/stevedore-bench/bin/garage when missing (log: ~/.cache/stevedore-bench/garage-build.log).
# A run while it builds says so in its S3 rows (with the log's last lines); a later run uses it.
garage_root="$HOME/.cache/stevedore-bench"
if [[ ! -x "$garage_root/bin/garage" && -z "${BENCH_GARAGE:-}" ]]; then
    mkdir -p "$garage_root"
    # One build at a time: the build holds the lock (fd 9) until it ends; cargo's own lock on
    # the target directory keeps it from racing a build started by hand.
    (
        exec 9>"$garage_root/garage-build.lock"
        if flock -n 9; then
            echo "bench: building Garage in the background (log: $garage_root/garage-build.log)" >&2
            nohup nice -n 19 cargo install --locked garage@2.5.0 --root "$garage_root" \
                --target-dir "${BENCH_GARAGE_TARGET_DIR:-$garage_root/target}" >>"$garage_root/garage-build.log" 2>&1 &
        fi
    ) 9>/dev/null
fi

if [[ -z "${BENCH_STEVEDORE:-}" ]]; then
    build_start=$SECONDS
    # The shipped binary: the `dist` profile (fat LTO), as deploy/Dockerfile builds it.
    cargo build --profile dist --locked --bin stevedore
    export BENCH_BUILD_SECS=$((SECONDS - build_start))
    echo "bench: dist build took $BENCH_BUILD_SECS s" >&2
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
