#!/usr/bin/env python3
"""What an idle Stevedore costs as its store grows: a table by N.

    python3 bench/scale.py            (bench/run.sh builds the binary; BENCH_STEVEDORE=... to pick one)

For each N in `SCALE_N` (default 1000,20000) and each backend in `SCALE_BACKENDS` (default
fs,s3; s3 = a Garage of its own per N, see bench/README.md), a Stevedore with default
settings except `cache.gc_interval = "10m"` and `uploads.sweep_interval = "5m"` pulls N
small blobs through from an upstream Distribution (N/10 images of a config and 9 layers,
pulled by manifest digest; the upstream's store is written directly, in Distribution's
layout, so seeding 20k blobs takes seconds). Once the pulls' access records are flushed
(`settle s`: at most 3 backend requests in 10 s, the heartbeat's apart, for 40 s), every server
sits idle together for one
window (`SCALE_IDLE_SECS`, default 900 as in issue 25; their CPU is sampled every minute) and
the table shows, per N and backend: the pull-through's rate, the idle server's CPU s/min
(mean and worst minute) and backend requests/min (from `stevedore_backend_requests_total`
when the binary exports it, the heartbeat's apart; else, on S3, counted by Garage; else
n/a), RSS at rest, `stevedore gc` and `stevedore fsck` times (offline, server stopped),
restart time (start until /v2/ answers), RSS after the restart and HEAD blob p99 (hey).
Raw figures: bench/results/scale-<timestamp>.json. Loopback only, every loop bounded
(`SCALE_DEADLINE_SECS`, default 1500, stops the pull-through early), every server stopped on exit.
"""

import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import procs, tools  # noqa: E402
from benchlib.procs import Server, free_port, wait_http, wait_line  # noqa: E402
from benchlib.servers import Distribution, Garage, _stevedore_config, config_keys  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NS = [int(x) for x in os.environ.get("SCALE_N", "1000,20000").split(",") if x.strip()]
BACKENDS = [x for x in os.environ.get("SCALE_BACKENDS", "fs,s3").split(",") if x.strip()]
IDLE_S = int(os.environ.get("SCALE_IDLE_SECS", "900"))
DEADLINE_S = int(os.environ.get("SCALE_DEADLINE_SECS", "1500"))
WORKERS = int(os.environ.get("SCALE_WORKERS", "16"))
HEAD_SECS = int(os.environ.get("SCALE_HEAD_SECS", "5"))
BLOB_BYTES = 512
PER_IMAGE = 10  # a config and 9 layers
REPO_NAME = "bench/scale"
T0 = time.monotonic()

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EXTRA = '\n[cache]\ngc_interval = "10m"\n\n[uploads]\nsweep_interval = "5m"\n'


def log(msg):
    print("[%5.0f s] %s" % (time.monotonic() - T0, msg), file=sys.stderr, flush=True)


def seed_upstream(root, n):
    """Writes n blobs (n / 10 images) into a Distribution store under `root`, in its layout;
    returns [(manifest digest, [blob digests])]."""
    v2 = os.path.join(root, "docker", "registry", "v2")
    repo = os.path.join(v2, "repositories", REPO_NAME)

    def put(data, link_dir):
        hexd = hashlib.sha256(data).hexdigest()
        d = os.path.join(v2, "blobs", "sha256", hexd[:2], hexd)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "data"), "wb") as f:
            f.write(data)
        ld = os.path.join(repo, link_dir, "sha256", hexd)
        os.makedirs(ld, exist_ok=True)
        with open(os.path.join(ld, "link"), "w") as f:
            f.write("sha256:" + hexd)
        return "sha256:" + hexd, len(data)

    images = []
    for i in range((n + PER_IMAGE - 1) // PER_IMAGE):
        descs = []
        for j in range(PER_IMAGE):
            body = (b"stevedore scale blob %d/%d of N=%d\n" % (i, j, n)).ljust(BLOB_BYTES, b".")
            descs.append(put(body, "_layers"))
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": descs[0][0],
                       "size": descs[0][1]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}
                       for d, s in descs[1:]],
        }, separators=(",", ":")).encode()
        md, _ = put(manifest, "_layers")
        # A manifest's revision link (and its bytes in blobs/, written above).
        ld = os.path.join(repo, "_manifests", "revisions", "sha256", md.split(":")[1])
        os.makedirs(ld, exist_ok=True)
        with open(os.path.join(ld, "link"), "w") as f:
            f.write(md)
        images.append((md, [d for d, _ in descs]))
    return images


def pull_through(hostport, images, deadline):
    """GETs every image's manifest by digest, then its blobs, on WORKERS keep-alive
    connections; checks every body's sha256. Returns (images done, blobs, seconds, errors)."""
    t0 = time.monotonic()
    errors = []

    def worker(chunk):
        conn = http.client.HTTPConnection(hostport, timeout=60)
        done = blobs = 0
        for md, ds in chunk:
            if time.monotonic() > deadline:
                break
            for path, want in [("/v2/%s/manifests/%s" % (REPO_NAME, md), md)] + \
                    [("/v2/%s/blobs/%s" % (REPO_NAME, d), d) for d in ds]:
                conn.request("GET", path, headers={"Accept": OCI_MANIFEST})
                r = conn.getresponse()
                body = r.read()
                if r.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != want:
                    errors.append("%s: HTTP %d" % (path, r.status))
                    if len(errors) > 20:
                        return done, blobs
                elif want != md:
                    blobs += 1
            done += 1
        conn.close()
        return done, blobs

    chunks = [images[i::WORKERS] for i in range(WORKERS)]
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
        res = list(ex.map(worker, chunks))
    return sum(r[0] for r in res), sum(r[1] for r in res), time.monotonic() - t0, errors


def backend_requests(hostport):
    """{"total": n, "heartbeat": n} from `stevedore_backend_requests_total` at /metrics, or
    None when the binary does not export it."""
    try:
        with urllib.request.urlopen("http://%s/metrics" % hostport, timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = heartbeat = 0
    found = False
    by = {}
    for ln in text.splitlines():
        if ln.startswith("stevedore_backend_requests_total"):
            found = True
            v = int(float(ln.rsplit(" ", 1)[1]))
            total += v
            if "heartbeat" in ln:
                heartbeat += v
            labels = ln[ln.find("{") + 1:ln.rfind("}")]
            by[labels] = v
    return {"total": total, "heartbeat": heartbeat, "by": by} if found else None


def ops_between(m0, m1):
    """The backend requests made between two samples, by label set (only those that grew)."""
    if not (m0 and m1):
        return None
    return {k: v - m0["by"].get(k, 0) for k, v in m1["by"].items() if v - m0["by"].get(k, 0) > 0}


class Target:
    """One Stevedore over its own store (and, on S3, its own Garage), restarted without
    emptying it."""

    def __init__(self, n, backend, workdir, binary, up_hostport):
        self.name = "stevedore-%s-%d" % (backend, n)
        self.n, self.backend, self.binary = n, backend, binary
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(self.dir)
        self.port = free_port()
        self.hostport = "127.0.0.1:%d" % self.port
        self.garage = Garage("garage-%d" % n, workdir).start() if backend == "s3" else None
        bucket = self.garage.new_bucket(self.name) if self.garage else None
        self.cfg = os.path.join(self.dir, "stevedore.toml")
        keys = config_keys(binary, workdir)
        with open(self.cfg, "w") as f:
            f.write(_stevedore_config(self.port, os.path.join(self.dir, "store"), True, up_hostport,
                                      keys["local_namespaces"], self.garage, bucket) + EXTRA)
        self.server = None
        self.starts = 0

    def start(self):
        """Starts the server; returns seconds until /v2/ answered."""
        self.starts += 1
        t0 = time.monotonic()
        self.server = Server("%s-%d" % (self.name, self.starts), [self.binary, "serve", "--config", self.cfg],
                             self.dir, unset=("RUST_LOG",)).start()
        wait_line(self.server, "stevedore listening on", timeout=600)
        wait_http("http://%s/v2/" % self.hostport, self.server, timeout=600)
        return round(time.monotonic() - t0, 2)

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    def offline(self, cmd):
        """`stevedore <cmd> --config` with the server stopped: (seconds, exit code)."""
        t0 = time.monotonic()
        p = subprocess.run([self.binary, cmd, "--config", self.cfg], capture_output=True, text=True, timeout=900,
                           stdin=subprocess.DEVNULL)
        secs = round(time.monotonic() - t0, 2)
        if p.returncode != 0:
            log("   %s %s exited %d: %s" % (self.name, cmd, p.returncode, (p.stdout + p.stderr)[-600:]))
        return secs, p.returncode

    def s3_count(self):
        r = self.garage.requests() if self.garage else None
        return r and sum(r.values())


def rss_mib(pid):
    v = procs.status_kib(pid, "VmRSS")
    return round(v / 1024, 1) if v else None


def main():
    binary = os.environ.get("BENCH_STEVEDORE", os.path.join(REPO, "target", "dist", "stevedore"))
    if not os.access(binary, os.X_OK):
        sys.exit("no Stevedore binary at %s: build it (cargo build --profile dist) or set BENCH_STEVEDORE" % binary)
    workdir = tempfile.mkdtemp(prefix="stevedore-scale-", dir=os.environ.get("BENCH_TMPDIR") or None)
    deadline = T0 + DEADLINE_S
    out = {"params": {"n": NS, "backends": BACKENDS, "idle_s": IDLE_S, "blob_bytes": BLOB_BYTES,
                      "per_image": PER_IMAGE, "workers": WORKERS}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "rows": []}
    targets = []
    try:
        ups = {}
        for n in NS:
            up = Distribution("upstream-%d" % n, workdir)
            root = os.path.join(up.dir, "store")
            os.makedirs(root)
            t0 = time.monotonic()
            images = seed_upstream(root, n)
            up.shared_root = root  # serve what was written, as it is
            up.fresh()
            log("upstream N=%d: %d images seeded in %.1f s" % (n, len(images), time.monotonic() - t0))
            ups[n] = (up, images)
        for n in NS:
            up, images = ups[n]
            for backend in BACKENDS:
                try:
                    t = Target(n, backend, workdir, binary, up.hostport)
                except RuntimeError as e:  # no Garage built
                    log("   %s N=%d: not run: %s" % (backend, n, e))
                    out["rows"].append({"n": n, "backend": backend, "error": str(e)[:500]})
                    continue
                row = {"n": n, "backend": backend, "first_start_s": t.start()}
                done, blobs, secs, errors = pull_through(t.hostport, images, deadline)
                row.update({"images_pulled": done, "blobs_pulled": blobs, "pull_s": round(secs, 1),
                            "pull_blobs_per_s": round(blobs / secs, 1) if secs else None, "pull_errors": errors[:5]})
                log("   %s: %d images, %d blobs pulled through in %.1f s%s" %
                    (t.name, done, blobs, secs, ", ERRORS %s" % errors[:3] if errors else ""))
                targets.append((t, row))
        # The pulls' uses are flushed to the store after them (`cache.access_flush_interval`,
        # a record per blob used): activity, not idle cost. Wait until no server has made
        # more than a few non-heartbeat backend requests (an idle server's usage check and
        # sweep) in any 10 s for 40 s (bounded), and report that settling apart from the
        # idle window.
        settle_start = time.monotonic()
        for t, row in targets:
            row["_settle0"] = backend_requests(t.hostport)
        last = {t.name: None for t, _ in targets}
        quiet_since = time.monotonic()
        while time.monotonic() - settle_start < 600:
            grew = False
            for t, _ in targets:
                m = backend_requests(t.hostport)
                busy = m and (m["total"] - m["heartbeat"])
                if busy is not None and last[t.name] is not None and busy - last[t.name] > 3:
                    grew = True
                last[t.name] = busy
            if grew:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 40:
                break
            time.sleep(10)
        for t, row in targets:
            m0, m1 = row.pop("_settle0"), backend_requests(t.hostport)
            row["settle_s"] = round(time.monotonic() - settle_start, 1)
            row["settle_requests"] = ops_between(m0, m1)
        log("settled after %.0f s (the pulls' access records flushed)" % (time.monotonic() - settle_start))
        # Every server idle at once, for one window: CPU sampled every minute.
        for t, row in targets:
            row["_t"] = [time.monotonic()]
            row["_cpu"] = [procs.cpu_seconds(t.server.pid)]
            row["_s3"] = [t.s3_count()]
            row["_metrics0"] = backend_requests(t.hostport)
        log("idle window: %d s" % IDLE_S)
        start = time.monotonic()
        step = min(60, IDLE_S)
        while time.monotonic() - start < IDLE_S:
            time.sleep(max(0.0, min(step, IDLE_S - (time.monotonic() - start))))
            for t, row in targets:
                row["_t"].append(time.monotonic())
                row["_cpu"].append(procs.cpu_seconds(t.server.pid))
                row["_s3"].append(t.s3_count())
                # What each minute's backend requests were, by op and purpose (for a row
                # whose worst minute stands out).
                m = backend_requests(t.hostport)
                row.setdefault("idle_minutes_ops", []).append(ops_between(row.get("_last_metrics", row["_metrics0"]), m))
                row["_last_metrics"] = m
        window_min = (time.monotonic() - start) / 60
        for t, row in targets:
            cpu, ts = row.pop("_cpu"), row.pop("_t")
            spans = [b - a for a, b in zip(ts, ts[1:])]

            def rates(xs):  # per minute, over the sampled spans of at least half a minute
                return [(b - a) * 60 / d for a, b, d in zip(xs, xs[1:], spans) if d >= min(30, step / 2)]
            per_min = rates(cpu)
            row["idle_cpu_s_per_min"] = round((cpu[-1] - cpu[0]) / window_min, 4)
            row["idle_cpu_s_worst_min"] = round(max(per_min), 4) if per_min else None
            m1 = backend_requests(t.hostport)
            m0 = row.pop("_metrics0")
            row.pop("_last_metrics", None)
            if m0 and m1:
                row["backend_requests_per_min"] = round((m1["total"] - m0["total"] - m1["heartbeat"] + m0["heartbeat"])
                                                        / window_min, 1)
                row["heartbeat_requests_per_min"] = round((m1["heartbeat"] - m0["heartbeat"]) / window_min, 1)
                row["requests_source"] = "stevedore_backend_requests_total"
            s3 = row.pop("_s3")
            if t.garage and None not in s3:
                per = rates(s3)
                row["s3_requests_per_min"] = round((s3[-1] - s3[0]) / window_min, 1)
                row["s3_requests_worst_min"] = round(max(per), 1) if per else None
                if "requests_source" not in row:
                    row["requests_source"] = "garage metrics (heartbeat included)"
            row["rss_rest_mib"] = rss_mib(t.server.pid)
            t.stop()
            row["gc_s"], row["gc_exit"] = t.offline("gc")
            row["fsck_s"], row["fsck_exit"] = t.offline("fsck")
            row["restart_s"] = t.start()
            row["rss_after_restart_mib"] = rss_mib(t.server.pid)
            blob = ups[t.n][1][0][1][1]
            h = tools.hey("http://%s/v2/%s/blobs/%s" % (t.hostport, REPO_NAME, blob), "HEAD", HEAD_SECS, 16)
            row["head_blob_p99_ms"], row["head_blob_rps"] = h["p99_ms"], h["rps"]
            row["head_blob_non_2xx"] = sum(v for k, v in h["status"].items() if not k.startswith("2"))
            t.stop()
            if t.garage:
                t.garage.stop()
            out["rows"].append(row)
            log("   %s: %s" % (t.name, row))
    finally:
        procs.stop_all()
        outdir = os.environ.get("BENCH_RESULTS", os.path.join(HERE, "results"))
        os.makedirs(outdir, exist_ok=True)
        path = os.path.join(outdir, "scale-%s.json" % time.strftime("%Y%m%dT%H%M%S"))
        out["total_secs"] = round(time.monotonic() - T0, 1)
        with open(path, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
        print(render(out))
        print("raw results: %s" % os.path.relpath(path, os.getcwd()))
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def render(out):
    cols = [("N", "n", "%d"), ("backend", "backend", "%s"), ("pulled blobs", "blobs_pulled", "%d"),
            ("blobs/s", "pull_blobs_per_s", "%.0f"), ("settle s", "settle_s", "%.0f"),
            ("idle CPU s/min", "idle_cpu_s_per_min", "%.3f"),
            ("worst min", "idle_cpu_s_worst_min", "%.3f"), ("backend req/min", "backend_requests_per_min", "%.1f"),
            ("heartbeat req/min", "heartbeat_requests_per_min", "%.1f"), ("S3 req/min (Garage)", "s3_requests_per_min",
                                                                         "%.1f"),
            ("S3 worst min", "s3_requests_worst_min", "%.0f"), ("RSS rest MiB", "rss_rest_mib", "%.1f"),
            ("gc s", "gc_s", "%.2f"), ("fsck s", "fsck_s", "%.2f"), ("restart s", "restart_s", "%.2f"),
            ("RSS restart MiB", "rss_after_restart_mib", "%.1f"), ("HEAD p99 ms", "head_blob_p99_ms", "%.2f")]
    rows = [[c[0] for c in cols]]
    for r in out["rows"]:
        cells = []
        for _, k, fmt in cols:
            v = r.get(k)
            cells.append("n/a" if v is None else (fmt % v if not isinstance(v, str) or fmt == "%s" else v))
        rows.append(cells)
    w = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    lines = ["Stevedore at scale: idle window %d s (cache.gc_interval 10m, uploads.sweep_interval 5m), %d-byte blobs"
             % (out["params"]["idle_s"], out["params"]["blob_bytes"])]
    for i, row in enumerate(rows):
        lines.append("  ".join(str(c).rjust(w[j]) for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * x for x in w))
    for r in out["rows"]:
        if r.get("error"):
            lines.append("N=%d %s not run: %s" % (r["n"], r["backend"], r["error"]))
    lines.append("settle s: from the last pull until the pulls' access records were flushed (at most 3 backend "
                 "requests per 10 s but the heartbeat's, for 40 s), before the idle window")
    lines.append("backend req/min: stevedore_backend_requests_total without the heartbeat's (n/a: the binary does not "
                 "export it); S3 req/min: every request Garage answered (the heartbeat's included)")
    lines.append("total %.0f s" % out.get("total_secs", 0))
    return "\n".join(lines)


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    try:
        sys.exit(main())
    finally:
        procs.stop_all()
