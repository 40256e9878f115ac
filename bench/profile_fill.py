#!/usr/bin/env python3
"""The cold pull's cost in instructions, reproducible on a busy machine.

    python3 bench/profile_fill.py [stevedore|stevedore-garage|distribution|floor-seq|floor-pipe|...] (default: stevedore, distribution)

Starts an upstream Distribution with the generated `big` image, then, per target, a fresh
proxy on an empty store, and counts with `perf stat -e instructions,cycles,task-clock -p PID`
(all threads of the proxy) over one cold pull of `big` (manifest, config, every layer, one
keep-alive connection, the client does not hash). Prints instructions and CPU per GB of
bodies. `PROFILE_REPEAT` (default 2) cold pulls per target, each on a fresh proxy;
`BENCH_BIG_MIB` (default 512); `BENCH_STEVEDORE` (default target/dist/stevedore);
`PROFILE_EVENTS=a,b` counts more events (e.g.
`syscalls:sys_enter_writev`), each reported per GB; `PROFILE_FSYNC=0` for Stevedore with `storage.fsync = false`; `PROFILE_PERF_RECORD=1` also
writes `perf record -g` data per run into the work directory (kept, path printed).
`stevedore-garage`: Stevedore with backend = "s3" on a Garage bucket (started once, as
`bench/run.sh` builds it). Loopback only; every server stopped on exit.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import client, imagegen, procs, tools  # noqa: E402
from benchlib.procs import wait_idle  # noqa: E402
from benchlib.servers import Distribution, FloorRelay, Garage, Stevedore, build_floor  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def perf_counts(path):
    out = {}
    with open(path) as f:
        for ln in f:
            parts = ln.strip().split(",")
            # -x, : value,unit,event,...
            if len(parts) >= 3 and parts[0] and parts[0][0].isdigit():
                out[parts[2]] = float(parts[0])
                out.setdefault(parts[2].split(":")[0], float(parts[0]))
    return out


def profile(t, upstream, images, workdir, record):
    big = images["big"]
    blobs = [big["config"]] + big["layers"]
    total = big["manifest"]["size"] + sum(b["size"] for b in blobs)
    bufs = client.body_buffers([b["size"] for b in blobs], client.mem_available() // 2)
    t.fresh()
    wait_idle([t.server, upstream.server], None, quiet=0.6, timeout=30)
    stat_path = os.path.join(workdir, "%s-%d.perfstat" % (t.name, t.starts))
    extra = [e for e in os.environ.get("PROFILE_EVENTS", "").split(",") if e]
    events = ",".join(["instructions", "cycles", "task-clock", "page-faults", "context-switches"] + extra)
    argv = ["perf", "stat", "-x,", "-o", stat_path, "-e", events, "-p", str(t.server.pid)]
    if record:
        data = os.path.join(workdir, "%s-%d.perf.data" % (t.name, t.starts))
        argv = ["perf", "record", "-e", "cpu-clock", "-F", "2000", "-g", "-o", data, "-p", str(t.server.pid)]
    cpu0 = procs.cpu_seconds(t.server.pid)
    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)  # perf attached
    r = client.pull_timed(t.hostport, "bench/big", "1", big["manifest"]["digest"], blobs, bufs)
    # The fill's commit (fsync, rename) follows the last byte: count it too.
    wait_idle([t.server], None, quiet=0.6, timeout=30)
    cpu = procs.cpu_seconds(t.server.pid) - cpu0
    rss = {"peak_rss_mib": round((procs.status_kib(t.server.pid, "VmHWM") or 0) / 1024, 1),
           "rss_end_mib": round((procs.status_kib(t.server.pid, "VmRSS") or 0) / 1024, 1)}
    perf.send_signal(signal.SIGINT)
    perf.wait(timeout=60)
    client.verify_pull(t.hostport, "bench/big", "1", big["manifest"]["digest"], blobs, bufs, r)
    res = {"mb_s": r["mb_s"], "cpu_s": round(cpu, 2), "cpu_s_per_gb": round(cpu / (total / 1e9), 3),
           "verified": r["verified"], **rss}
    if record:
        res["perf_data"] = data
    else:
        c = perf_counts(stat_path)
        res["ginstr_per_gb"] = round(c.get("instructions", 0) / 1e9 / (total / 1e9), 3)
        res["gcycles_per_gb"] = round(c.get("cycles", 0) / 1e9 / (total / 1e9), 3)
        res["task_clock_s_per_gb"] = round(c.get("task-clock", 0) / 1e3 / (total / 1e9), 3)
        res["page_faults_per_gb"] = round(c.get("page-faults", 0) / (total / 1e9))
        res["ctx_switches_per_gb"] = round(c.get("context-switches", 0) / (total / 1e9))
        for e in extra:
            res[e.split(":")[-1] + "_per_gb"] = round(c.get(e, 0) / (total / 1e9))
    t.stop()
    return res


def main():
    targets = sys.argv[1:] or ["distribution", "stevedore"]
    binary = os.environ.get("BENCH_STEVEDORE", os.path.join(REPO, "target", "dist", "stevedore"))
    repeat = int(os.environ.get("PROFILE_REPEAT", "2"))
    record = os.environ.get("PROFILE_PERF_RECORD") == "1"
    workdir = tempfile.mkdtemp(prefix="stevedore-profile-", dir=os.environ.get("BENCH_TMPDIR") or None)
    try:
        layout = os.path.join(workdir, "layout")
        images = imagegen.generate(layout, int(os.environ.get("BENCH_BIG_MIB", "512")))
        upstream = Distribution("upstream", workdir).fresh()
        sk = tools.Skopeo(workdir)
        sk.copy("oci:%s:big" % layout, "docker://%s/bench/big:1" % upstream.hostport)
        sk.cleanup()
        garage = None
        for name in targets:
            if name == "distribution":
                t = Distribution("distribution", workdir, remote=upstream.hostport)
            elif name.startswith("floor-"):
                t = FloorRelay(name, workdir, build_floor(REPO), upstream.hostport, name[len("floor-"):])
            else:
                s3 = None
                if name == "stevedore-garage":
                    if garage is None:
                        garage = Garage("garage", workdir)
                        garage.start()
                    s3 = garage
                t = Stevedore(name, workdir, binary, upstream.hostport, fsync=os.environ.get("PROFILE_FSYNC") != "0",
                              s3=s3,
                              env=dict(kv.split("=", 1) for kv in os.environ.get("PROFILE_ENV", "").split() if "=" in kv))
            for i in range(repeat):
                res = profile(t, upstream, images, workdir, record)
                print("%s cold %d: %s" % (name, i + 1, res), flush=True)
    finally:
        procs.stop_all()
        if record:
            print("kept %s" % workdir)
        else:
            subprocess.run(["rm", "-rf", workdir])


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    sys.exit(main())
