#!/usr/bin/env python3
"""Writes `deploy/stevedore.order`: the functions a serving Stevedore runs, for the linker to
lay out together (lld `--symbol-ordering-file`, passed by build.rs).

    python3 bench/orderfile.py [<stevedore binary>]          (default target/dist/stevedore)
    python3 bench/orderfile.py --check [<stevedore binary>]  how many of its lines the binary has

Why: the kernel maps a binary's code 64 KiB at a time around each page a process touches
(fault-around). Without an order, the code a server runs is spread over nearly all of the
text, so nearly all of it ends up resident (9-10 MiB of a 12 MiB text); laid out together
it takes a fraction of that.

How: runs the binary under valgrind's callgrind (every function that runs is recorded, not
a sample) with the bench's configuration, three times, each from start to shutdown: a
filesystem store behind a plaintext upstream Distribution (8 concurrent cold GETs, cold and
warm pulls, HEADs, a push to a local namespace, /metrics); an HTTPS upstream (cold pulls, 8
concurrent cold GETs: rustls and ring, as with Docker Hub); backend = "s3" on moto_server
(cold and warm pulls, a push). The binary's functions that ran are written one mangled
symbol per line, grouped by the sessions they ran in (`GROUPS`: the code of a filesystem
store with either upstream is one stretch of the text), most-run first within a group
(callgrind's self instruction counts, summed).

The symbols' hashes follow the toolchain, the profile and each crate's version and features,
not the source: an edit keeps the order of what it did not rename, a dependency or toolchain
update drops that crate's lines until the file is regenerated (the link never fails on a
stale line). Regenerate after such an update, with the binary built by `cargo build
--profile dist`; `--check` shows whether a binary still matches, and the bench's peak RSS
rows what a mismatch costs.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import client, imagegen, procs, tools  # noqa: E402
from benchlib.servers import Distribution, Stevedore, TestTls  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "deploy", "stevedore.order")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def executed(path, binary_syms):
    """Self instruction counts per function of the binary, from a callgrind output file
    (name compression: `fn=(id) name` the first time, `fn=(id)` after; the cost line after
    `calls=` is that call's inclusive cost, not the caller's own)."""
    names, cost = {}, {}
    current, after_call = None, False
    for line in open(path, errors="replace"):
        m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if m.group(1) == "fn":
                current = names.get(m.group(2))
                cost.setdefault(current, 0)
            continue
        if line.startswith("calls="):
            after_call = True
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
                continue
            parts = line.split()
            if current is not None and len(parts) >= 2 and parts[1].isdigit():
                cost[current] += int(parts[1])
    return {n: c for n, c in cost.items() if n in binary_syms}


def binary_symbols(binary):
    out = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True).stdout
    return {ln.split()[-1] for ln in out.splitlines() if len(ln.split()) >= 3 and ln.split()[1] in "tTwW"}


def check(binary):
    """Prints how many of the order file's symbols `binary` defines: all of them when it was
    built by the toolchain, lock file and profile the file was made for."""
    syms = binary_symbols(binary)
    lines = [ln.strip() for ln in open(OUT) if ln.strip()]
    found = sum(1 for n in lines if n in syms)
    print("%s: %d of %d lines of %s found (%.0f%%)" % (binary, found, len(lines), os.path.relpath(OUT, REPO),
                                                      100.0 * found / max(1, len(lines))))


def under_callgrind(t, binary, wd, label):
    """Points target `t` at a wrapper that runs `binary` under callgrind; returns the output path."""
    out = os.path.join(wd, "callgrind.%s.out" % label)
    wrapper = os.path.join(wd, "under-callgrind-%s.sh" % label)
    with open(wrapper, "w") as f:
        f.write('#!/bin/sh\nexec valgrind --tool=callgrind --demangle=no --callgrind-out-file=%s "%s" "$@"\n'
                % (out, binary))
    os.chmod(wrapper, 0o755)
    t.binary = wrapper
    return out


def stop(t):
    """SIGTERM, then wait: the server shuts down and callgrind writes its profile."""
    t.server.proc.send_signal(signal.SIGTERM)
    t.server.proc.wait(timeout=600)
    t.server = None


def pull(t, img, times=1):
    blobs = [img["config"]] + img["layers"]
    bufs = client.body_buffers([b["size"] for b in blobs])
    for _ in range(times):
        client.pull_timed(t.hostport, "bench/" + img["name"], "1", img["manifest"]["digest"], blobs, bufs)


# Functions grouped by the sessions they ran in, the groups in this order: what a server with
# a filesystem store runs (fs and tls) is one stretch, with the TLS upstream's (Docker Hub's
# case) and the plaintext one's each in one stretch of it; the S3 store's code sits before.
GROUPS = [{"s3"}, {"fs", "s3"}, {"fs"}, {"fs", "tls", "s3"}, {"fs", "tls"}, {"tls"}, {"tls", "s3"}]


def layout_order(by_session):
    """The order file's lines: functions by the group of sessions they ran in (`GROUPS`),
    most instructions first within a group."""
    total, seen = {}, {}
    for label, counts in by_session.items():
        for n, c in counts.items():
            total[n] = total.get(n, 0) + c
            seen.setdefault(n, set()).add(label)
    rank = {frozenset(g): i for i, g in enumerate(GROUPS)}
    return sorted(total, key=lambda n: (rank[frozenset(seen[n])], -total[n], n))


def main():
    args = sys.argv[1:]
    checking = args[:1] == ["--check"]
    args = args[1:] if checking else args
    binary = os.path.abspath(args[0] if args else os.path.join(REPO, "target", "dist", "stevedore"))
    if checking:
        return check(binary)
    if subprocess.run(["which", "valgrind"], capture_output=True).returncode != 0:
        sys.exit("valgrind is needed (apt-get install valgrind)")
    wd = tempfile.mkdtemp(prefix="orderfile-")
    outs = []
    try:
        layout = os.path.join(wd, "layout")
        images = imagegen.generate(layout, 16)
        for name, img in images.items():
            img["name"] = name
        up = Distribution("upstream", wd).fresh()
        sk = tools.Skopeo(wd)
        for name in ("big", "small", "many", "multi"):
            sk.copy("oci:%s:%s" % (layout, name), "docker://%s/bench/%s:1" % (up.hostport, name))

        # 1. Filesystem store, plaintext upstream: the whole of a mirror's day.
        t = Stevedore("stevedore", wd, binary, up.hostport)
        outs.append(("fs", under_callgrind(t, binary, wd, "fs")))
        log("fs store: start under callgrind, 8 concurrent cold GETs, cold and warm pulls, HEADs, push, /metrics")
        t.fresh()
        client.concurrent_get(t.hostport, "bench/small", images["small"]["layers"][0], 8)
        for name in ("big", "small", "many"):
            pull(t, images[name], times=2)
        client.pull(t.hostport, "bench/multi", "1")
        for _ in range(20):
            client.head_digest(t.hostport, "bench/big", "1")
        if t.keys.get("local_namespaces"):
            sk.copy("oci:%s:small" % layout, "docker://%s/local/small:1" % t.hostport)
        urllib.request.urlopen("http://%s/metrics" % t.hostport, timeout=60).read()
        stop(t)

        # 2. An HTTPS upstream (as Docker Hub is): rustls and ring on the fill's path.
        tls = TestTls(wd)
        up_tls = Distribution("upstream-tls", wd, tls=tls, shared_root=os.path.join(up.dir, "store"))
        up_tls.fresh()
        t = Stevedore("stevedore-tlsup", wd, binary, up_tls.hostport, up_tls=tls)
        outs.append(("tls", under_callgrind(t, binary, wd, "tls")))
        log("TLS upstream: cold pulls, 8 concurrent cold GETs")
        t.fresh()
        client.concurrent_get(t.hostport, "bench/small", images["small"]["layers"][0], 8)
        pull(t, images["big"], times=2)
        stop(t)
        up_tls.stop()

        # 3. backend = "s3" (moto_server): spool, parts, commit, reads from the bucket.
        t = Stevedore("stevedore-s3", wd, binary, up.hostport, s3=True)
        outs.append(("s3", under_callgrind(t, binary, wd, "s3")))
        log("S3 store (moto): cold and warm pulls, push")
        t.fresh()
        pull(t, images["big"], times=2)
        pull(t, images["small"], times=2)
        if t.keys.get("local_namespaces"):
            sk.copy("oci:%s:small" % layout, "docker://%s/local/small:1" % t.hostport)
        stop(t)
        sk.cleanup()

        syms = binary_symbols(binary)
        order = layout_order({label: executed(out, syms) for label, out in outs})
        with open(OUT, "w") as f:
            for n in order:
                f.write(n + "\n")
        log("%d functions of %d ran; written to %s" % (len(order), len(syms), os.path.relpath(OUT, REPO)))
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", wd])


if __name__ == "__main__":
    main()
