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

from benchlib import client, imagegen, procs, report, tools  # noqa: E402
from benchlib.procs import Phase, wait_idle  # noqa: E402
from benchlib.servers import Distribution, Stevedore  # noqa: E402

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
    "deadline_s": env_int("BENCH_DEADLINE_SECS", 570),
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

def run_phase(name, main, others, uplog, fn):
    """Runs `fn` as phase `name` once the servers are idle. Its result gains the phase's
    figures, how long the servers took to go idle after it, and the upstream requests it
    caused; also returns the upstream log mark taken before it."""
    settle([main] + others, uplog)
    mark = uplog.mark()
    with Phase(name, main, others) as ph:
        r = fn()
    r["phase"] = ph.result
    r["settle_s"] = settle([main] + others, uplog)
    r["upstream_requests"] = uplog.count(mark)
    return r, mark


def measure_pulls(ctx, t, upstream, uplog, images, direct=False, repeat=None):
    """Cold then warm pull of `big`, each repetition on a fresh (empty) proxy."""
    out = {"cold": [], "warm": []}
    big = images["big"]
    for i in range(repeat or P["repeat"]):
        if not ctx.allow("%s pull rep %d" % (t.name, i + 1), 30):
            break
        if not direct:
            t.fresh()
        others = [] if direct else [upstream.server]
        pull = lambda: client.pull(t.hostport, repo("big"), "1", big["manifest"]["digest"])  # noqa: E731
        r, _ = run_phase("cold", t.server, others, uplog, pull)
        out["cold"].append(r)
        log("   %s cold pull %d: %.0f MB/s %s (settled %.1f s, %d upstream requests)" %
            (t.name, i + 1, r["mb_s"], r["outcomes"], r["settle_s"], r["upstream_requests"]))
        if direct:
            continue
        r, _ = run_phase("warm", t.server, others, uplog, pull)
        out["warm"].append(r)
        log("   %s warm pull %d: %.0f MB/s %s (%d upstream requests)" %
            (t.name, i + 1, r["mb_s"], r["outcomes"], r["upstream_requests"]))
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
            log("   %s %s %d: %s rps p50 %s ms p99 %s ms, %d upstream requests%s" %
                (t.name, name, i + 1, r["rps"], r["p50_ms"], r["p99_ms"], r["upstream_requests"],
                 " FAILED %r" % (r["failed"],) if "failed" in r else ""))
    return out


def measure_concurrent(ctx, t, upstream, uplog, images, direct=False):
    layer = big_layer(images)
    path = "/v2/%s/blobs/%s" % (repo("big"), layer["digest"])
    out = []
    reps = 1 if direct else P["conc_repeat"]
    for i in range(reps):
        if not ctx.allow("%s concurrent rep %d" % (t.name, i + 1), 60):
            break
        if not direct:
            t.fresh()
        others = [] if direct else [upstream.server]
        r, mark = run_phase("concurrent", t.server, others, uplog,
                            lambda: client.concurrent_get(t.hostport, repo("big"), layer, P["concurrent"]))
        r["upstream_gets"] = uplog.count(mark, "GET", path)
        r["upstream_heads"] = uplog.count(mark, "HEAD", path)
        out.append(r)
        log("   %s %d concurrent GETs %d: %.2f s, all match %s, %s, upstream GETs %d (settled %.1f s)%s" %
            (t.name, P["concurrent"], i + 1, r["wall_s"], r["all_match"], r["outcomes"], r["upstream_gets"],
             r["settle_s"], " ERRORS %s" % r["errors"][:3] if r["errors"] else ""))
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
                             lambda: {"secs": sk.copy(src, "dir:" + dest)})  # noqa: B023 - called at once
            secs = r["secs"]
            out[kind].append(r)
            sk.cleanup()
            shutil.rmtree(dest, ignore_errors=True)
            log("   %s skopeo copy many %s %d: %.2f s, %d upstream requests" %
                (t.name, kind, i + 1, secs, r["upstream_requests"]))
    return out


def measure_push(ctx, t, images, layout, others=(), repeat=None):
    """skopeo copy of `big` from the OCI layout, each repetition into an empty registry."""
    out = []
    total = image_bytes(images["big"])
    for i in range(repeat or P["repeat"]):
        if not ctx.allow("%s push rep %d" % (t.name, i + 1), 40):
            break
        t.fresh()
        sk = tools.Skopeo(os.path.dirname(layout))
        dest = "docker://%s/local/big:1" % t.hostport
        settle([t.server] + list(others), None)
        with Phase("push", t.server, others) as ph:
            secs = sk.copy("oci:%s:big" % layout, dest)
        sk.cleanup()
        status, digest = client.head_digest(t.hostport, "local/big", "1")
        ok = status == 200 and digest == images["big"]["manifest"]["digest"]
        r = {"secs": secs, "bytes": total, "mb_s": round(total / secs / 1e6, 1), "phase": ph.result, "verified": ok}
        out.append(r)
        log("   %s push big %d: %.2f s, %.0f MB/s, verified %s" % (t.name, i + 1, secs, r["mb_s"], ok))
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


def run_target(ctx, t, upstream, uplog, images, workdir):
    direct = isinstance(t, Direct)
    res = {}
    with ctx.step("%s: pulls" % t.name):
        res["pull"] = measure_pulls(ctx, t, upstream, uplog, images, direct)
    if not direct:
        res["index_check"] = measure_index(t, images)
    with ctx.step("%s: loads" % t.name):
        res["loads"] = measure_loads(ctx, t, upstream, uplog, images, direct)
    with ctx.step("%s: concurrent" % t.name):
        res["concurrent"] = measure_concurrent(ctx, t, upstream, uplog, images, direct)
    with ctx.step("%s: skopeo" % t.name):
        res["skopeo"] = measure_skopeo(ctx, t, upstream, uplog, images, workdir, direct)
    if not direct:
        t.stop()
    return res


def versions(binary):
    def out(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return None
    return {
        "stevedore_git": out(["git", "-C", REPO, "describe", "--always", "--dirty"]),
        "stevedore_binary_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(binary))),
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
    ctx = Ctx()
    binary = os.environ.get("BENCH_STEVEDORE", os.path.join(REPO, "target", "release", "stevedore"))
    if not os.access(binary, os.X_OK):
        sys.exit("no Stevedore binary at %s: run bench/run.sh (it builds one)" % binary)
    tmp_parent = os.environ.get("BENCH_TMPDIR") or None
    workdir = tempfile.mkdtemp(prefix="stevedore-bench-", dir=tmp_parent)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "params": dict(P), "workdir": workdir,
                        "versions": versions(binary)}}
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
        if want("stevedore"):
            results["stevedore"] = run_target(ctx, stev, upstream, uplog, images, workdir)

        # Pushes into empty registries. The upstream keeps running: Stevedore, configured as a
        # proxy with a default upstream, asks it about blobs a client HEADs before uploading.
        if want("push"):
            plain = Distribution("distribution-plain", workdir)
            with ctx.step("push: plain distribution"):
                results.setdefault("push", {})["distribution"] = measure_push(ctx, plain, images, layout,
                                                                              [upstream.server])
                plain.stop()
            with ctx.step("push: stevedore"):
                results["push"]["stevedore"] = measure_push(ctx, stev, images, layout, [upstream.server])
                stev.stop()

        if P["fsync_off"] and want("fsync_off"):
            nofs = Stevedore("stevedore-nofsync", workdir, binary, upstream.hostport, fsync=False)
            with ctx.step("stevedore fsync=false: pulls, push"):
                n = P["fsync_off_repeat"]
                r = {"pull": measure_pulls(ctx, nofs, upstream, uplog, images, repeat=n)}
                r["push"] = measure_push(ctx, nofs, images, layout, [upstream.server], repeat=n)
                nofs.stop()
            results["stevedore_fsync_off"] = r
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
