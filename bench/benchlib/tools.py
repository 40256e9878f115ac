"""hey, wrk and skopeo: bounded runs and output parsing."""

import os
import re
import shutil
import subprocess
import tempfile
import time

from .client import ACCEPT

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run(argv, timeout, **kw):
    """Runs a tool with a hard time limit; returns CompletedProcess (text)."""
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)


def hey(url, method, secs, conns):
    """`hey -z <secs>s -c <conns>`: rps, p50/p99 ms, status counts."""
    p = run(["hey", "-z", "%ds" % secs, "-c", str(conns), "-m", method, "-H", "Accept: " + ACCEPT, url],
            timeout=secs + 60)
    out = p.stdout
    res = {"tool": "hey", "method": method, "secs": secs, "conns": conns}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    for pct in ("50", "90", "99"):
        m = re.search(r"\s%s%% in ([\d.]+) secs" % pct, out)
        res["p%s_ms" % pct] = round(float(m.group(1)) * 1e3, 3) if m else None
    res["status"] = {k: int(v) for k, v in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    res["requests"] = sum(res["status"].values())
    err = re.search(r"Error distribution:(.*)", out, re.S)
    res["errors"] = err.group(1).strip()[:500] if err else ""
    if p.returncode != 0 or res["rps"] is None:
        res["failed"] = (p.returncode, out[-1000:], p.stderr[-1000:])
    return res


def wrk(url, secs, conns, threads=2):
    """`wrk -t<threads> -c<conns> -d<secs>s --latency` GET: rps, p50/p99 ms, non-2xx."""
    p = run(["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % secs, "--latency", "--timeout", "10s",
             "-H", "Accept: " + ACCEPT, url], timeout=secs + 60)
    out = p.stdout
    res = {"tool": "wrk", "method": "GET", "secs": secs, "conns": conns}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    for pct in ("50", "90", "99"):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % pct, out, re.M)
        res["p%s_ms" % pct] = round(float(m.group(1)) * _UNIT[m.group(2)], 3) if m else None
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = m.group(1) if m else ""
    if p.returncode != 0 or res["rps"] is None:
        res["failed"] = (p.returncode, out[-1000:], p.stderr[-1000:])
    return res


class Skopeo:
    """skopeo with a throwaway HOME. As root, containers/image keeps its blob info cache in
    /var/lib/containers/cache, shared by every run, which makes later copies skip blobs;
    `_CONTAINERS_ROOTLESS_UID` makes it treat us as a rootless user whose cache lives under
    $XDG_DATA_HOME, i.e. in the throwaway HOME. `check_isolated` verifies it landed there."""

    TIMEOUT = 300

    def __init__(self, tmp_root):
        self.home = tempfile.mkdtemp(prefix="skopeo-home-", dir=tmp_root)
        for d in ("share", "config", "cache", "run"):
            os.makedirs(os.path.join(self.home, d))
        os.chmod(os.path.join(self.home, "run"), 0o700)

    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")
               and k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "CONTAINERS_CONF",
                             "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF")}
        uid = os.geteuid() or 65534
        env.update({
            "HOME": self.home,
            "XDG_DATA_HOME": os.path.join(self.home, "share"),
            "XDG_CONFIG_HOME": os.path.join(self.home, "config"),
            "XDG_CACHE_HOME": os.path.join(self.home, "cache"),
            "XDG_RUNTIME_DIR": os.path.join(self.home, "run"),
            "TMPDIR": self.home,
            "_CONTAINERS_ROOTLESS_UID": str(uid),
            "_CONTAINERS_ROOTLESS_GID": str(uid),
        })
        return env

    def copy(self, src, dst, all_images=False):
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                "--dest-tls-verify=false", "--preserve-digests"]
        if all_images:
            argv.append("--all")
        t0 = time.perf_counter()
        p = run(argv + [src, dst], timeout=self.TIMEOUT, env=self.env())
        secs = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError("skopeo copy %s %s failed (%d):\n%s" % (src, dst, p.returncode, p.stderr[-3000:]))
        self.check_isolated()
        return round(secs, 3)

    def check_isolated(self):
        cache = os.path.join(self.home, "share", "containers", "cache")
        if not os.path.isdir(cache) or not os.listdir(cache):
            raise RuntimeError("skopeo's blob info cache is not in the throwaway HOME (%s): "
                               "runs would not be isolated" % cache)

    def cleanup(self):
        shutil.rmtree(self.home, ignore_errors=True)
