#!/usr/bin/env python3
"""Stevedore vs CNCF Distribution (proxy mode) against a local upstream Distribution.

Run through bench/run.sh (installs tools, builds Stevedore). Everything is on 127.0.0.1,
every loop is bounded in count and time, and every server started is stopped on exit.
Settings come from the environment (see README.md beside this file).
"""

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import baseline, client, imagegen, procs, report, tools  # noqa: E402
from benchlib.procs import Phase, wait_idle  # noqa: E402
from benchlib.servers import (Distribution, FloorRelay, Garage, Stevedore, TestTls, build_floor,  # noqa: E402
                               requests_delta)  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def env_int(name, default):
    return int(os.environ.get(name, default))


P = {
    "big_mib": env_int("BENCH_BIG_MIB", 512),
    "repeat": env_int("BENCH_REPEAT", 3),
    "conc_repeat": env_int("BENCH_CONC_REPEAT", 3),
    "concurrent": env_int("BENCH_CONCURRENT", 16),
    "load_secs": env_int("BENCH_LOAD_SECS", 4),
    "load_repeat": env_int("BENCH_LOAD_REPEAT", 3),
    "conns": env_int("BENCH_CONNS", 32),
    "fsync_off": env_int("BENCH_FSYNC_OFF", 1),
    "fsync_off_repeat": env_int("BENCH_FSYNC_OFF_REPEAT", 2),
    "baseline_repeat": env_int("BENCH_BASELINE_REPEAT", 2),
    "deadline_s": env_int("BENCH_DEADLINE_SECS", 600),
    "baseline_deadline_extra_s": env_int("BENCH_BASELINE_DEADLINE_EXTRA_SECS", 150),
    "s3": env_int("BENCH_S3", 1),
    "s3_repeat": env_int("BENCH_S3_REPEAT", 2),
    "s3_deadline_extra_s": env_int("BENCH_S3_DEADLINE_EXTRA_SECS", 150),
    "tls": env_int("BENCH_TLS", 1),
    "tls_repeat": env_int("BENCH_TLS_REPEAT", 2),
    "tls_deadline_extra_s": env_int("BENCH_TLS_DEADLINE_EXTRA_SECS", 120),
    "garage": env_int("BENCH_GARAGE_S3", 1),
    "garage_repeat": env_int("BENCH_GARAGE_REPEAT", 3),
    "garage_deadline_extra_s": env_int("BENCH_GARAGE_DEADLINE_EXTRA_SECS", 300),
    "floor": env_int("BENCH_FLOOR", 1),
    "floor_repeat": env_int("BENCH_FLOOR_REPEAT", 3),
    "client_mem_mib": env_int("BENCH_CLIENT_MEM_MIB", 0),
    "idle_timeout_s": env_int("BENCH_IDLE_TIMEOUT_SECS", 60),
    "only": os.environ.get("BENCH_ONLY", ""),
}
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))  # for development
REPO_NAME = "bench"  # images are bench/<name>:1 upstream


class Ctx:
    def __init__(self):
        self.t0 = time.monotonic()
        self.steps = []
        self.skipped = []

    def left(self):
        return P["deadline_s"] - (time.monotonic() - self.t0)

    def step(self, name):
        ctx = self

        class _S:
            def __enter__(self):
                self.t = time.monotonic()
                log("== %s" % name)

            def __exit__(self, *exc):
                ctx.steps.append({"step": name, "secs": round(time.monotonic() - self.t, 1)})
                return False

        return _S()

    def allow(self, what, need_s):
        """False (and noted) when less than `need_s` seconds of the time budget are left."""
        if self.left() < need_s:
            self.skipped.append(what)
            log("   skipped %s: %.0f s of the budget left, %d s needed" % (what, self.left(), need_s))
            return False
        return True


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def repo(name):
    return "%s/%s" % (REPO_NAME, name)


def big_layer(images):
    return max(images["big"]["layers"], key=lambda d: d["size"])


def image_bytes(img):
    return img["manifest"]["size"] + img["config"]["size"] + sum(d["size"] for d in img["layers"])


class UpLog:
    """The upstream's access log: Distribution writes one line per request when it ends,
    stamped with its start time, so lines are counted, never ordered."""

    def __init__(self, upstream):
        self.path = upstream.out_log

    def mark(self):
        return os.path.getsize(self.path)

    def since(self, mark):
        with open(self.path, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        return [ln for ln in lines if '"' in ln]

    def count(self, mark, method=None, path=None):
        n = 0
        for ln in self.since(mark):
            req = ln.split('"')[1] if ln.count('"') >= 2 else ""
            parts = req.split(" ")
            if len(parts) < 2:
                continue
            if method and parts[0] != method:
                continue
            if path and parts[1].split("?")[0] != path:
                continue
            n += 1
        return n


def settle(servers, uplog):
    """Waits until the servers are idle: no CPU and no upstream access-log growth for 0.6 s."""
    return wait_idle([s for s in servers if s is not None], uplog.path if uplog else None,
                     quiet=0.6, timeout=P["idle_timeout_s"])


# ---- measurements ---------------------------------------------------------------------

def add_cost(r):
    """The server's cost beside the rate: CPU seconds of the process under test per GB
    (10^9 bytes) of bodies it served or received in the phase, or CPU microseconds per
    request for the request-rate loads."""
    ph = r.get("phase") or {}
    cpu = ph.get("cpu_s")
    if cpu is None:
        return r
    if r.get("bytes"):
        ph["cpu_s_per_gb"] = round(cpu / (r["bytes"] / 1e9), 3)
    elif r.get("requests"):
        ph["cpu_us_per_req"] = round(cpu / r["requests"] * 1e6, 1)
    return r


def run_phase(name, main, others, uplog, fn, s3=None):
    """Runs `fn` as phase `name` once the servers are idle. Its result gains the phase's
    figures (with the server's CPU per GB or per request), how long the servers took to go
    idle after it, the server's CPU up to then (`cpu_s_to_idle`: work a server leaves for
    after the last byte, such as Distribution's background fill, counts too), the upstream
    requests it caused and, with `s3` (a target's `s3_requests`), the S3 requests answered by
    the store from the start to idle; also returns the upstream log mark taken before it.
    Whatever `fn` returns must be verified by the caller afterwards."""
    settle([main] + others, uplog)
    mark = uplog.mark()
    s3_0 = s3() if s3 else None
    with Phase(name, main, others) as ph:
        r = fn()
    r["phase"] = ph.result
    add_cost(r)
    r["settle_s"] = settle([main] + others, uplog)
    idle_cpu = procs.cpu_seconds(main.pid) if main else None
    if idle_cpu is not None and "cpu_s" in ph.result:
        ph.result["cpu_s_to_idle"] = round(idle_cpu - ph.main0, 2)
        if r.get("bytes"):
            ph.result["cpu_s_per_gb_to_idle"] = round((idle_cpu - ph.main0) / (r["bytes"] / 1e9), 3)
    r["upstream_requests"] = uplog.count(mark)
    if s3:
        r["s3_requests"] = requests_delta(s3_0, s3())
    return r, mark


def mem_limit():
    """Bytes the timed clients may hold in pre-allocated body buffers (see client.py)."""
    if P["client_mem_mib"]:
        return P["client_mem_mib"] << 20
    return client.mem_available() // 2


def measure_pulls(ctx, t, upstream, uplog, images, direct=False, repeat=None, kinds=("cold", "warm")):
    """Cold then warm pull of `big`, each repetition on a fresh (empty) proxy."""
    out = {"cold": [], "warm": []}
    big = images["big"]
    blobs = [big["config"]] + big["layers"]
    bufs = client.body_buffers([b["size"] for b in blobs], mem_limit())  # allocated off the clock
    args = (t.hostport, repo("big"), "1", big["manifest"]["digest"], blobs, bufs)
    for i in range(repeat or P["repeat"]):
        if not ctx.allow("%s pull rep %d" % (t.name, i + 1), 30):
            break
        if not direct:
            t.fresh()
        others = [] if direct else [upstream.server] + t.backends()
        for kind in kinds:
            if direct and kind == "warm":
                break
            r, _ = run_phase(kind, t.server, others, uplog, lambda: client.pull_timed(*args),
                             s3=getattr(t, "s3_requests", None))
            client.verify_pull(*args, r)  # off the clock
            out[kind].append(r)
            log("   %s %s pull %d: %.0f MB/s, server %.2f CPU s/GB (%.2f to idle), %s, verified %s (settled %.1f s, "
                "%d upstream requests%s)%s" % (t.name, kind, i + 1, r["mb_s"], r["phase"].get("cpu_s_per_gb", -1),
                                              r["phase"].get("cpu_s_per_gb_to_idle", -1), r["outcomes"], r["verified"],
                                              r["settle_s"], r["upstream_requests"],
                                              ", S3 requests %s" % r["s3_requests"] if r.get("s3_requests") else "",
                                              " " + r.get("verify_error", "")))
    return out


def measure_loads(ctx, t, upstream, uplog, images, direct=False):
    """HEAD manifest by tag and HEAD blob (hey), GET manifest by tag (wrk), on a warm cache."""
    base = "http://%s/v2/%s" % (t.hostport, repo("big"))
    layer = big_layer(images)
    loads = {
        "head_manifest": lambda: tools.hey(base + "/manifests/1", "HEAD", P["load_secs"], P["conns"]),
        "head_blob": lambda: tools.hey(base + "/blobs/" + layer["digest"], "HEAD", P["load_secs"], P["conns"]),
        "get_manifest": lambda: tools.wrk(base + "/manifests/1", P["load_secs"], P["conns"]),
    }
    others = [] if direct else [upstream.server]
    out = {}
    for name, fn in loads.items():
        out[name] = []
        for i in range(P["load_repeat"]):
            if not ctx.allow("%s %s rep %d" % (t.name, name, i + 1), P["load_secs"] + 20):
                break
            r, _ = run_phase(name, t.server, others, uplog, fn)
            out[name].append(r)
            log("   %s %s %d: %s rps p50 %s ms p99 %s ms, server %s CPU us/request, %d upstream requests%s" %
                (t.name, name, i + 1, r["rps"], r["p50_ms"], r["p99_ms"], r["phase"].get("cpu_us_per_req"),
                 r["upstream_requests"], " FAILED %r" % (r["failed"],) if "failed" in r else ""))
    return out


def measure_concurrent(ctx, t, upstream, uplog, images, direct=False, repeat=None):
    layer = big_layer(images)
    path = "/v2/%s/blobs/%s" % (repo("big"), layer["digest"])
    out = []
    reps = 1 if direct else (repeat or P["conc_repeat"])
    n = P["concurrent"]
    bufs = None
    for i in range(reps):
        if not ctx.allow("%s concurrent rep %d" % (t.name, i + 1), 60):
            break
        if not direct:
            t.fresh()
        if bufs is None:  # allocated (and every page touched) off the clock, reused by the runs
            bufs = client.body_buffers([layer["size"]] * n, mem_limit()) or False
        others = [] if direct else [upstream.server] + t.backends()
        r, mark = run_phase("concurrent", t.server, others, uplog,
                            lambda: client.concurrent_get(t.hostport, repo("big"), layer, n, bufs or None),
                            s3=getattr(t, "s3_requests", None))
        r["upstream_gets"] = uplog.count(mark, "GET", path)
        r["upstream_heads"] = uplog.count(mark, "HEAD", path)
        client.verify_concurrent(t.hostport, repo("big"), layer, bufs or None, r)  # off the clock
        out.append(r)
        log("   %s %d concurrent GETs %d: %.2f s, server %.2f CPU s/GB, all match %s (%s), %s, upstream GETs %d "
            "(settled %.1f s)%s" %
            (t.name, n, i + 1, r["wall_s"], r["phase"].get("cpu_s_per_gb", -1), r["all_match"], r["read"],
             r["outcomes"], r["upstream_gets"], r["settle_s"], " ERRORS %s" % r["errors"][:3] if r["errors"] else ""))
    bufs = None
    return out


def measure_skopeo(ctx, t, upstream, uplog, images, workdir, direct=False):
    """skopeo copy of `many` to a dir: cold (fresh proxy) then warm."""
    out = {"cold": [], "warm": []}
    src = "docker://%s/%s:1" % (t.hostport, repo("many"))
    for i in range(P["repeat"]):
        if not ctx.allow("%s skopeo rep %d" % (t.name, i + 1), 40):
            break
        if not direct:
            t.fresh()
        others = [] if direct else [upstream.server]
        for kind in ("cold", "warm"):
            if direct and kind == "warm":
                break
            sk = tools.Skopeo(workdir)
            dest = tempfile.mkdtemp(prefix="many-", dir=workdir)
            r, _ = run_phase("skopeo_" + kind, t.server, others, uplog,
                             lambda: {"secs": sk.copy(src, "dir:" + dest),  # noqa: B023 - called at once
                                      "bytes": image_bytes(images["many"])})
            secs = r["secs"]
            out[kind].append(r)
            sk.cleanup()
            shutil.rmtree(dest, ignore_errors=True)
            log("   %s skopeo copy many %s %d: %.2f s, %d upstream requests" %
                (t.name, kind, i + 1, secs, r["upstream_requests"]))
    return out


def measure_push(ctx, targets, images, layout, others=()):
    """skopeo copy of `big` from the OCI layout, each repetition into an empty registry, the
    `targets` ((key, registry, repetitions), ...) interleaved run by run (A B C A B C ...) so
    that a slow spell of the machine or the disk hits them alike. Timed: the copy; then, off
    the clock, the pushed image is pulled back and every body hashed (verified). Returns
    {key: [runs]}."""
    out = {key: [] for key, _, _ in targets}
    total = image_bytes(images["big"])
    digest = images["big"]["manifest"]["digest"]
    for i in range(max(reps for _, _, reps in targets)):
        for key, t, reps in targets:
            if i >= reps or not ctx.allow("%s push rep %d" % (key, i + 1), 40):
                continue
            t.fresh()
            sk = tools.Skopeo(os.path.dirname(layout))
            dest = "docker://%s/local/big:1" % t.hostport
            deps = list(others) + t.backends()
            settle([t.server] + deps, None)
            s3 = getattr(t, "s3_requests", None)
            s3_0 = s3() if s3 else None
            with Phase("push", t.server, deps) as ph:
                secs = sk.copy("oci:%s:big" % layout, dest)
            sk.cleanup()
            r = add_cost({"secs": secs, "bytes": total, "mb_s": round(total / secs / 1e6, 1), "phase": ph.result})
            if s3:
                settle([t.server] + deps, None)
                r["s3_requests"] = requests_delta(s3_0, s3())
            try:  # off the clock: the registry serves back exactly what was pushed
                client.pull(t.hostport, "local/big", "1", digest)
                r["verified"] = True
            except Exception as e:  # noqa: BLE001 - reported
                r["verified"] = False
                r["verify_error"] = repr(e)[:500]
            out[key].append(r)
            t.stop()
            log("   %s push big %d: %.2f s, %.0f MB/s, server %.2f CPU s/GB, verified %s" %
                (key, i + 1, secs, r["mb_s"], r["phase"].get("cpu_s_per_gb", -1), r["verified"]))
    return out


def measure_index(t, images):
    """The two-platform index and `small` pull through the target (correctness check)."""
    res = {}
    for name in ("multi", "small"):
        try:
            r = client.pull(t.hostport, repo(name), "1", images[name]["manifest"]["digest"])
            res[name] = {"ok": True, "secs": r["secs"], "outcomes": r["outcomes"]}
        except Exception as e:  # noqa: BLE001 - reported
            res[name] = {"ok": False, "error": repr(e)}
    log("   %s index/small pull: %s" % (t.name, {k: v["ok"] for k, v in res.items()}))
    return res


class Direct:
    """The upstream itself, measured as a target ("direct")."""

    def __init__(self, upstream):
        self.name = "direct"
        self.server = upstream.server
        self.hostport = upstream.hostport


FLOOR_MODES = ("relay", "seq", "pipe", "pipe3")


def measure_floor(ctx, workdir, binary, upstream, uplog, images, up_tls=None, tag="", base=None):
    """Cold pulls of `big`, interleaved: Distribution, Stevedore (and the baseline, with
    `base`) and bench/floor's relay in every mode (`relay`: copy only; `seq`, `pipe`, `pipe3`:
    verifying fills, see bench/floor/src/main.rs). `up_tls`: the upstream is HTTPS, trusted
    through this TestTls."""
    floor_bin = build_floor(REPO)
    targets = [("distribution", Distribution("distribution-floor" + tag, workdir, remote=upstream.hostport,
                                             remote_tls=up_tls)),
               ("stevedore", Stevedore("stevedore-floor" + tag, workdir, binary, upstream.hostport, fsync=True,
                                       up_tls=up_tls))]
    if base:
        targets.append(("baseline", Stevedore("baseline-floor" + tag, workdir, base["binary"], upstream.hostport,
                                              fsync=True, up_tls=up_tls)))
    targets += [(m, FloorRelay("floor-%s%s" % (m, tag), workdir, floor_bin, upstream.hostport, m, tls=up_tls))
                for m in FLOOR_MODES]
    out = {k: {"pull": {"cold": []}} for k, _ in targets}
    for i in range(P["floor_repeat"]):
        # Each round starts one target later: no target always follows the same one.
        for key, t in targets[i % len(targets):] + targets[:i % len(targets)]:
            out[key]["pull"]["cold"] += measure_pulls(ctx, t, upstream, uplog, images, repeat=1, kinds=("cold",))["cold"]
    for _, t in targets:
        t.stop()
    return out


def run_target(ctx, t, upstream, uplog, images, workdir, repeat=None, conc_repeat=None, skopeo=True):
    """Every pull-side phase of one target. `repeat` and `conc_repeat` (the baseline's)
    override the pull and concurrent repetitions; the baseline skips skopeo."""
    direct = isinstance(t, Direct)
    res = {}
    with ctx.step("%s: pulls" % t.name):
        res["pull"] = measure_pulls(ctx, t, upstream, uplog, images, direct, repeat=repeat)
    if not direct:
        res["index_check"] = measure_index(t, images)
    with ctx.step("%s: loads" % t.name):
        res["loads"] = measure_loads(ctx, t, upstream, uplog, images, direct)
    with ctx.step("%s: concurrent" % t.name):
        res["concurrent"] = measure_concurrent(ctx, t, upstream, uplog, images, direct, repeat=conc_repeat)
    if skopeo:
        with ctx.step("%s: skopeo" % t.name):
            res["skopeo"] = measure_skopeo(ctx, t, upstream, uplog, images, workdir, direct)
    if not direct:
        t.stop()
    return res


def versions(binary, base):
    def out(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return None
    return {
        "stevedore_git": out(["git", "-C", REPO, "describe", "--always", "--dirty"]),
        "stevedore_binary_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(binary))),
        "baseline": base,
        "docker-registry": out(["docker-registry", "--version"]),
        "skopeo": out(["skopeo", "--version"]),
        "wrk": out(["sh", "-c", "wrk -v 2>&1"]),
        "hey": "hey (Debian package %s)" % out(["dpkg-query", "-W", "-f=${Version}", "hey"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": procs.NCPU,
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None),
        "mem_total_kib": int(open("/proc/meminfo").readline().split()[1]),
    }


def main():
    binary = os.environ.get("BENCH_STEVEDORE", os.path.join(REPO, "target", "dist", "stevedore"))
    if not os.access(binary, os.X_OK):
        sys.exit("no Stevedore binary at %s: run bench/run.sh (it builds one)" % binary)
    base = baseline.resolve()  # may build it (minutes, once per commit): before the clock starts
    if base and "BENCH_DEADLINE_SECS" not in os.environ:
        P["deadline_s"] += P["baseline_deadline_extra_s"]
    if "BENCH_DEADLINE_SECS" not in os.environ:
        for part in ("s3", "tls", "garage"):
            if P[part] and (not ONLY or part in ONLY):
                P["deadline_s"] += P[part + "_deadline_extra_s"]
    ctx = Ctx()
    tmp_parent = os.environ.get("BENCH_TMPDIR") or None
    workdir = tempfile.mkdtemp(prefix="stevedore-bench-", dir=tmp_parent)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "params": dict(P), "workdir": workdir,
                        "versions": versions(binary, base)}}
    if os.environ.get("BENCH_BUILD_SECS"):
        results["meta"]["build_secs"] = int(os.environ["BENCH_BUILD_SECS"])
    results["meta"]["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    sys0, self0 = procs.system_cpu(), procs.self_cpu()
    log("stevedore bench: workdir %s, params %s" % (workdir, json.dumps(P)))
    try:
        layout = os.path.join(workdir, "layout")
        with ctx.step("generate images"):
            images = imagegen.generate(layout, P["big_mib"])
        results["images"] = {k: {"manifest": v["manifest"]["digest"], "bytes": image_bytes(v) if "config" in v else None}
                             for k, v in images.items()}
        log("   images: %s" % {k: v["manifest"] for k, v in results["images"].items()})

        upstream = Distribution("upstream", workdir)
        with ctx.step("start upstream and push images"):
            upstream.fresh()
            sk = tools.Skopeo(workdir)
            push_secs = {}
            for name in ("big", "small", "many", "multi"):
                push_secs[name] = sk.copy("oci:%s:%s" % (layout, name),
                                          "docker://%s/%s:1" % (upstream.hostport, repo(name)),
                                          all_images=(name == "multi"))
                status, digest = client.head_digest(upstream.hostport, repo(name), "1")
                if status != 200 or digest != images[name]["manifest"]["digest"]:
                    raise RuntimeError("upstream has %s:1 as %s (HTTP %d), generated %s" %
                                       (name, digest, status, images[name]["manifest"]["digest"]))
            sk.cleanup()
            results["upstream_seed_push_secs"] = push_secs
        uplog = UpLog(upstream)

        def want(part):
            return not ONLY or part in ONLY

        if want("direct"):
            results["direct"] = run_target(ctx, Direct(upstream), upstream, uplog, images, workdir)

        if want("distribution"):
            dist = Distribution("distribution", workdir, remote=upstream.hostport)
            results["distribution"] = run_target(ctx, dist, upstream, uplog, images, workdir)

        stev = Stevedore("stevedore", workdir, binary, upstream.hostport, fsync=True)
        results["meta"]["config_keys"] = {"stevedore": stev.keys}
        if want("stevedore"):
            results["stevedore"] = run_target(ctx, stev, upstream, uplog, images, workdir)
            stev.stop()

        # The floor of a cold pull on this machine: bench/floor's relays (no framework, no
        # runtime: the least work) beside Distribution and Stevedore, cold pulls interleaved
        # run by run, each round rotated (D S R V P T, S R V P T D, ...), so noise and what a
        # target leaves behind fall on all alike.
        if P["floor"] and want("floor"):
            with ctx.step("floor: cold pulls, distribution, stevedore and the floor relays interleaved"):
                results["floor"] = measure_floor(ctx, workdir, binary, upstream, uplog, images, base=base)

        bstev = None
        if base:
            bstev = Stevedore("baseline", workdir, base["binary"], upstream.hostport, fsync=True)
            results["meta"]["config_keys"]["baseline"] = bstev.keys
            if want("baseline"):
                results["baseline"] = run_target(ctx, bstev, upstream, uplog, images, workdir,
                                                 repeat=min(P["repeat"], P["baseline_repeat"]),
                                                 conc_repeat=min(P["conc_repeat"], P["baseline_repeat"]),
                                                 skopeo=False)
                bstev.stop()

        # Pushes into empty registries, at equal durability: the plain Distribution never
        # fsyncs, so the headline compares it with Stevedore at storage.fsync = false; the
        # default (fsync = true: every byte on disk before the 201) is measured beside it.
        # The upstream keeps running: Stevedore, configured as a proxy with a default
        # upstream, asks it about blobs a client HEADs before uploading.
        if want("push"):
            with ctx.step("push: plain distribution, stevedore fsync off/on%s" % (", baseline" if base else "")):
                nofs = Stevedore("stevedore-nofsync", workdir, binary, upstream.hostport, fsync=False)
                n = P["repeat"]
                targets = [("distribution", Distribution("distribution-plain", workdir), n),
                           ("stevedore_nofsync", nofs, n), ("stevedore", stev, n)]
                if base:
                    nb = min(n, P["baseline_repeat"])
                    targets += [("baseline_nofsync", Stevedore("baseline-nofsync", workdir, base["binary"],
                                                               upstream.hostport, fsync=False), nb),
                                ("baseline", bstev, nb)]
                results["push"] = measure_push(ctx, targets, images, layout, [upstream.server])

        # For information: Stevedore's cold and warm pull with fsync off (what fsync costs a fill).
        if P["fsync_off"] and want("fsync_off"):
            nofs_pull = Stevedore("stevedore-nofsync-pull", workdir, binary, upstream.hostport, fsync=False)
            with ctx.step("stevedore fsync=false: pulls"):
                results["stevedore_fsync_off"] = {
                    "pull": measure_pulls(ctx, nofs_pull, upstream, uplog, images, repeat=P["fsync_off_repeat"])}
                nofs_pull.stop()

        # The S3 backend: the same binary with its content in a moto_server bucket (moto
        # restarted empty with every fresh start). Cold and warm pulls, concurrent cold GETs,
        # push (storage.fsync as default: the spool is fsync'd; a part is durable once the
        # bucket acknowledged it). moto is Python and keeps objects in memory: these rows
        # measure the S3 code path against a slow store, not S3 itself.
        if P["s3"] and want("s3"):
            s3 = Stevedore("stevedore-s3", workdir, binary, upstream.hostport, fsync=True, s3=True)
            n = P["s3_repeat"]
            with ctx.step("stevedore on S3 (moto): pulls, concurrent, push"):
                res = {"pull": measure_pulls(ctx, s3, upstream, uplog, images, repeat=n)}
                res["concurrent"] = measure_concurrent(ctx, s3, upstream, uplog, images, repeat=1)
                res["push"] = measure_push(ctx, [("stevedore_s3", s3, n)], images, layout,
                                           [upstream.server])["stevedore_s3"]
                s3.stop()
                results["stevedore_s3"] = res

        # A TLS upstream: a second upstream Distribution serving the same store over HTTPS
        # with a test certificate (CA + leaf, openssl); Distribution trusts the CA through
        # SSL_CERT_FILE, Stevedore through upstreams.ca_file. Cold pulls and concurrent cold GETs.
        if P["tls"] and want("tls"):
            with ctx.step("TLS upstream: distribution, stevedore: cold pulls, concurrent"):
                tls = TestTls(workdir)
                up_tls = Distribution("upstream-tls", workdir, tls=tls, shared_root=os.path.join(upstream.dir, "store"))
                up_tls.fresh()
                tlog = UpLog(up_tls)
                res = {}
                n = P["tls_repeat"]
                for key, t in (("distribution", Distribution("distribution-tlsup", workdir, remote=up_tls.hostport,
                                                             remote_tls=tls)),
                               ("stevedore", Stevedore("stevedore-tlsup", workdir, binary, up_tls.hostport, fsync=True,
                                                       up_tls=tls))):
                    res[key] = {"pull": measure_pulls(ctx, t, up_tls, tlog, images, repeat=n, kinds=("cold",)),
                                "concurrent": measure_concurrent(ctx, t, up_tls, tlog, images, repeat=n)}
                    t.stop()
                if P["floor"] and want("floor"):
                    res["floor"] = measure_floor(ctx, workdir, binary, up_tls, tlog, images, up_tls=tls, tag="-tlsup",
                                                 base=base)
                up_tls.stop()
                results["tls_upstream"] = res

        # A real S3 server: Garage (single node, on 127.0.0.1), Distribution's `s3` driver and
        # Stevedore's backend = "s3" each on a new bucket of it per start: cold, warm,
        # concurrent cold GETs, push; the S3 requests each made, from Garage's metrics.
        if P["garage"] and want("garage"):
            with ctx.step("S3 on Garage: distribution, stevedore: pulls, concurrent, push"):
                try:
                    garage = Garage("garage", workdir)
                except RuntimeError as e:
                    results["garage_s3"] = {"error": str(e)}
                    log("   %s" % e)
                    garage = None
                if garage:
                    garage.start()
                    n = P["garage_repeat"]
                    res = {}
                    # With a baseline, its binary on the same Garage too (pulls and concurrent).
                    bgarage = ([("baseline", Stevedore("baseline-garage", workdir, base["binary"],
                                                       upstream.hostport, fsync=True, s3=garage))] if base else [])
                    targets = [("distribution", Distribution("distribution-garage", workdir,
                                                             remote=upstream.hostport, s3=garage)),
                               ("stevedore", Stevedore("stevedore-garage", workdir, binary, upstream.hostport,
                                                       fsync=True, s3=garage))] + bgarage
                    # Pulls interleaved round by round (Distribution, Stevedore, ...), each on a
                    # fresh server and bucket: what Garage and the disk still do from earlier
                    # rounds falls on every target alike, not on whichever ran second.
                    for key, _ in targets:
                        res[key] = {"pull": {"cold": [], "warm": []}}
                    # bench/floor's verifying relays in the same rounds (cold only): what a
                    # fill that hashes and writes its bytes to a local file before the last
                    # byte costs with the memory and disk as this section leaves them (a
                    # Stevedore fill on S3 spools locally; the bucket gets it at the commit).
                    relays = []
                    if P["floor"] and want("floor"):
                        floor_bin = build_floor(REPO)
                        relays = [(m, FloorRelay("floor-%s-garage" % m, workdir, floor_bin, upstream.hostport, m))
                                  for m in report.FLOOR_VERIFYING]
                        res["floor"] = {m: {"pull": {"cold": [], "warm": []}} for m, _ in relays}
                    # Each round starts one target later (D S seq pipe pipe3, S seq pipe pipe3 D, ...).
                    order = [(key, t, res[key]["pull"], ("cold", "warm")) for key, t in targets] + \
                            [(m, t, res["floor"][m]["pull"], ("cold",)) for m, t in relays]
                    for i in range(n):
                        for key, t, into, kinds in order[i % len(order):] + order[:i % len(order)]:
                            for kind, runs in measure_pulls(ctx, t, upstream, uplog, images, repeat=1,
                                                            kinds=kinds).items():
                                into[kind] += runs
                    for _, t in relays:
                        t.stop()
                    for key, t in targets:
                        res[key]["concurrent"] = measure_concurrent(ctx, t, upstream, uplog, images, repeat=1)
                        t.stop()
                    pushed = measure_push(ctx, [
                        ("distribution", Distribution("distribution-plain-garage", workdir, s3=garage), n),
                        ("stevedore", Stevedore("stevedore-garage-push", workdir, binary, upstream.hostport,
                                                fsync=True, s3=garage), n)]
                        + ([("baseline", Stevedore("baseline-garage-push", workdir, base["binary"], upstream.hostport,
                                                   fsync=True, s3=garage), n)] if base else []),
                        images, layout, [upstream.server])
                    for key, _ in targets:
                        res[key]["push"] = pushed.get(key)
                    garage.stop()
                    results["garage_s3"] = res
    except Exception:
        results["error"] = traceback.format_exc()
        log(results["error"])
        for s in list(procs.SERVERS):
            log(s.log_tail(1500))
    finally:
        procs.stop_all()
        # Whole run: every server we ran is a reaped child by now, so self_cpu() covers them.
        busy1, tot1 = procs.system_cpu()
        foreign = max(0.0, (busy1 - sys0[0]) - (procs.self_cpu() - self0))
        results["meta"]["whole_run"] = {
            "foreign_cpu_s": round(foreign, 1),
            "foreign_pct": round(100 * foreign / max(1e-9, tot1 - sys0[1]), 1),
            "machine_busy_pct": round(100 * (busy1 - sys0[0]) / max(1e-9, tot1 - sys0[1]), 1),
            "loadavg_end": open("/proc/loadavg").read().split()[:3],
        }
        results["meta"]["steps"] = ctx.steps
        results["meta"]["skipped"] = ctx.skipped
        results["meta"]["total_secs"] = round(time.monotonic() - ctx.t0, 1)
        outdir = os.environ.get("BENCH_RESULTS", os.path.join(HERE, "results"))
        os.makedirs(outdir, exist_ok=True)
        if "images" in results:
            results["summary"] = report.summarize(results)
        path = os.path.join(outdir, "%s.json" % stamp)
        with open(path, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        if "summary" in results:
            print(report.render(results))
        print("raw results: %s" % os.path.relpath(path, os.getcwd()))
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("kept workdir %s" % workdir)
    return 1 if "error" in results else 0


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        sys.exit(main())
    finally:
        procs.stop_all()
