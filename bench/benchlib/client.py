"""A minimal registry client: pulls that hash every body, and concurrent blob GETs."""

import hashlib
import http.client
import json
import threading
import time

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
BUF = 1 << 20
CACHE_HEADER = "x-stevedore-cache"


class PullError(Exception):
    pass


def _conn(hostport, timeout=120):
    host, port = hostport.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _read_hash(resp, buf, mv):
    h = hashlib.sha256()
    n = 0
    while True:
        k = resp.readinto(mv)
        if not k:
            break
        h.update(mv[:k])
        n += k
    return "sha256:" + h.hexdigest(), n


def get_manifest(conn, repo, ref):
    conn.request("GET", "/v2/%s/manifests/%s" % (repo, ref), headers={"Accept": ACCEPT})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise PullError("GET manifest %s:%s: HTTP %d %s" % (repo, ref, r.status, body[:300]))
    d = "sha256:" + hashlib.sha256(body).hexdigest()
    want = r.getheader("docker-content-digest")
    if want and want != d:
        raise PullError("manifest %s:%s hashes to %s, header says %s" % (repo, ref, d, want))
    return body, d, r.getheader(CACHE_HEADER)


def get_blob(conn, repo, desc, buf, mv):
    conn.request("GET", "/v2/%s/blobs/%s" % (repo, desc["digest"]))
    r = conn.getresponse()
    if r.status != 200:
        raise PullError("GET blob %s: HTTP %d %s" % (desc["digest"], r.status, r.read()[:300]))
    d, n = _read_hash(r, buf, mv)
    if d != desc["digest"] or n != desc["size"]:
        raise PullError("blob %s: got %s, %d bytes (want %d)" % (desc["digest"], d, n, desc["size"]))
    return n, r.getheader(CACHE_HEADER)


def pull(hostport, repo, tag, expect_digest=None):
    """GET manifest by tag, then every blob (config first), on one keep-alive connection,
    hashing every body. For an index, pulls every child manifest and its blobs."""
    buf = bytearray(BUF)
    mv = memoryview(buf)
    conn = _conn(hostport)
    outcomes = {}
    total = 0
    t0 = time.perf_counter()
    try:
        body, d, oc = get_manifest(conn, repo, tag)
        outcomes.setdefault(str(oc), 0)
        outcomes[str(oc)] += 1
        total += len(body)
        if expect_digest and d != expect_digest:
            raise PullError("%s:%s is %s, expected %s" % (repo, tag, d, expect_digest))
        m = json.loads(body)
        manifests = [m]
        if "manifests" in m:
            manifests = []
            for child in m["manifests"]:
                cb, cd, oc = get_manifest(conn, repo, child["digest"])
                outcomes[str(oc)] = outcomes.get(str(oc), 0) + 1
                if cd != child["digest"]:
                    raise PullError("child manifest %s hashes to %s" % (child["digest"], cd))
                total += len(cb)
                manifests.append(json.loads(cb))
        for man in manifests:
            for desc in [man["config"]] + man["layers"]:
                n, oc = get_blob(conn, repo, desc, buf, mv)
                outcomes[str(oc)] = outcomes.get(str(oc), 0) + 1
                total += n
    finally:
        conn.close()
    secs = time.perf_counter() - t0
    return {"bytes": total, "secs": round(secs, 4), "mb_s": round(total / secs / 1e6, 1), "outcomes": outcomes}


def concurrent_get(hostport, repo, desc, n, timeout=300):
    """`n` clients GET one blob at the same moment (a barrier releases them), each on its
    own connection, hashing its body. Returns wall time and per-client results."""
    barrier = threading.Barrier(n + 1)
    results = [None] * n

    def worker(i):
        buf = bytearray(BUF)
        mv = memoryview(buf)
        conn = _conn(hostport, timeout=timeout)
        try:
            conn.connect()
            barrier.wait()
            t = time.perf_counter()
            conn.request("GET", "/v2/%s/blobs/%s" % (repo, desc["digest"]))
            r = conn.getresponse()
            if r.status != 200:
                results[i] = {"error": "HTTP %d %s" % (r.status, r.read()[:200])}
                return
            d, size = _read_hash(r, buf, mv)
            results[i] = {"sha256": d, "bytes": size, "secs": round(time.perf_counter() - t, 3),
                          "outcome": r.getheader(CACHE_HEADER), "ok": d == desc["digest"] and size == desc["size"]}
        except Exception as e:  # noqa: BLE001 - reported per client
            results[i] = {"error": repr(e)}
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(timeout=30)
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout)
    wall = time.perf_counter() - t0
    ok = all(r and r.get("ok") for r in results)
    digests = sorted({r.get("sha256") for r in results if r})
    outcomes = {}
    for r in results:
        k = str((r or {}).get("outcome"))
        outcomes[k] = outcomes.get(k, 0) + 1
    return {"wall_s": round(wall, 3), "all_match": ok, "distinct_sha256": digests, "outcomes": outcomes,
            "client_secs": sorted(r.get("secs", -1) for r in results if r),
            "errors": [r["error"] for r in results if r and "error" in r]}


def head_digest(hostport, repo, ref):
    conn = _conn(hostport, timeout=30)
    try:
        conn.request("HEAD", "/v2/%s/manifests/%s" % (repo, ref), headers={"Accept": ACCEPT})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("docker-content-digest")
    finally:
        conn.close()
