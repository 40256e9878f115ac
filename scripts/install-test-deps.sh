#!/usr/bin/env bash
# Installs the system tools the integration tests need (Debian/Ubuntu, apt-get), or with
# `package=command` arguments those packages instead (bench/run.sh). Idempotent: does nothing when everything is already installed; runs
# `apt-get update` only when something is missing. Fails loudly otherwise.
#
#   skopeo           - real OCI client for tests/skopeo.rs
#   curl             - chunked-upload checks and manual debugging
#   docker-registry  - CNCF Distribution, used as an upstream in proxy tests
#   containerd       - containerd + ctr, a real mirror client in tests/clients.rs
#   podman           - podman (registries.conf mirrors), tests/clients.rs
#   docker.io        - dockerd + docker CLI (registry-mirrors), tests/clients.rs
#   runc             - OCI runtime the three above depend on (checked explicitly)
#   redis-server     - Debian's Redis: coordination of several replicas, tests/replicas.rs
#   strace           - traces the server's mkdir/fsync calls, tests/writer.rs
#   chromium         - headless browser that renders /status in tests/status.rs
#   prometheus       - for promtool (check/test the alert rules, tests/dashboards.rs); its
#                      service is never started (policy-rc.d below, unit masked after)
#   moto_server      - PyPI moto[server] (pip, in a virtualenv): S3 for the *_s3 test twins
# The container engines are installed without their services running: a policy-rc.d
# refuses every service start during the install, and systemd units are disabled after
# it when systemd runs. The tests start private daemons with state in temporary dirs.
set -euo pipefail
# dockerd and runc live in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

packages=(skopeo curl docker-registry containerd podman docker.io runc redis-server strace chromium prometheus)
# The command each package must provide; checked after install as well.
declare -A provides=([skopeo]=skopeo [curl]=curl [docker-registry]=docker-registry
    [containerd]=ctr [podman]=podman [docker.io]=dockerd [runc]=runc [redis-server]=redis-server [strace]=strace
    [chromium]=chromium [prometheus]=promtool)
# Other callers (bench/run.sh) name their own set as `package=command` arguments;
# `moto=moto_server` among them asks for moto_server (pip, below) as well.
want_moto=1
if (($#)); then
    packages=()
    want_moto=0
    for arg in "$@"; do
        if [[ "$arg" == moto=moto_server ]]; then
            want_moto=1
            continue
        fi
        packages+=("${arg%%=*}")
        provides[${arg%%=*}]=${arg#*=}
    done
fi
# systemd units a package ships that must not keep running (disabled only for packages this
# run installed, so a machine's own docker or containerd service is left alone).
declare -A units=([docker-registry]="docker-registry" [containerd]="containerd"
    [podman]="podman.socket podman podman-restart podman-auto-update.timer"
    [docker.io]="docker.socket docker" [redis-server]="redis-server"
    [prometheus]="prometheus prometheus-node-exporter")

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

# moto_server (PyPI `moto[server]`): S3 for the `*_s3` twins of the suites. Installed with
# pip into a virtualenv of its own (~/.cache/stevedore-test-venv, where tests/common/s3.rs
# looks when it is not on PATH), so no system Python is touched. For the default set, or when
# asked for by `moto=moto_server`.
install_moto() {
    if command -v moto_server >/dev/null 2>&1; then
        return 0
    fi
    local venv="${HOME}/.cache/stevedore-test-venv"
    if [[ -x "$venv/bin/moto_server" ]]; then
        return 0
    fi
    echo "install-test-deps: installing moto[server] (pip) into $venv"
    if ! command -v python3 >/dev/null 2>&1; then
        echo "install-test-deps: ERROR: python3 not found; moto_server (PyPI moto[server]) is needed for the S3 tests" >&2
        exit 1
    fi
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 lacks venv without python3-venv.
        "${sudo[@]}" apt-get install -y -q --no-install-recommends python3-venv python3-pip </dev/null || true
        python3 -m venv "$venv" || { echo "install-test-deps: ERROR: cannot create a virtualenv at $venv" >&2; exit 1; }
    fi
    "$venv/bin/pip" install -q 'moto[server]>=5,<6' || {
        echo "install-test-deps: ERROR: pip install moto[server] failed" >&2
        exit 1
    }
    [[ -x "$venv/bin/moto_server" ]] || { echo "install-test-deps: ERROR: moto_server missing after install" >&2; exit 1; }
}

sudo=()
if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1; then
    sudo=(sudo -n)
fi
if ((want_moto)); then
    install_moto
fi

missing=()
for p in "${packages[@]}"; do
    if ! is_installed "$p" || ! command -v "${provides[$p]}" >/dev/null 2>&1; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install-test-deps: all present (${packages[*]})"
    exit 0
fi

echo "install-test-deps: installing ${missing[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: ERROR: apt-get not found; install manually: ${missing[*]}" >&2
    exit 1
fi

sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo -n)
    else
        echo "install-test-deps: ERROR: not root and no sudo; install manually: ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Packaged services (docker-registry) must not be started by the install:
# the tests run their own instances. Only add a policy-rc.d if none exists.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 0755 "$policy"
    added_policy=1
fi
cleanup() { if ((added_policy)); then "${sudo[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

"${sudo[@]}" apt-get update -q || { echo "install-test-deps: ERROR: apt-get update failed" >&2; exit 1; }
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null || {
    echo "install-test-deps: ERROR: apt-get install ${missing[*]} failed" >&2
    exit 1
}

# The packaged services are not wanted; stop them if an init system started them anyway.
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    for p in "${missing[@]}"; do
        for unit in ${units[$p]:-}; do
            "${sudo[@]}" systemctl disable --now "$unit" >/dev/null 2>&1 || true
        done
    done
    # prometheus's unit is masked as well: only its promtool is wanted.
    for p in "${missing[@]}"; do
        if [[ "$p" == prometheus ]]; then
            "${sudo[@]}" systemctl mask prometheus >/dev/null 2>&1 || true
        fi
    done
fi

for p in "${packages[@]}"; do
    if ! is_installed "$p" || ! command -v "${provides[$p]}" >/dev/null 2>&1; then
        echo "install-test-deps: ERROR: $p still missing after install" >&2
        exit 1
    fi
done
echo "install-test-deps: installed ${missing[*]}"
