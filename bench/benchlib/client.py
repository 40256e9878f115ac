"""A minimal registry client: timed pulls and concurrent blob GETs that do not hash (their
bodies are verified afterwards, off the clock), and a hashing pull for checks."""

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
    hashing every body. For an index, pulls every child manifest and its blobs. Untimed
    uses only (correctness checks, verification passes): it hashes."""
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


# ---- timed clients: no hashing while the clock runs ----------------------------------------
#
# A timed body is either read straight into a pre-allocated, pre-faulted buffer of exactly its
# expected size ("mem": the kernel copies the socket data to where it stays, no extra copy; the
# sha256 is computed after the clock stops, over the very bytes that were received), or, when
# the buffers would not fit in memory, read into one reusable buffer and dropped ("discard":
# verified afterwards by GETting every body again and hashing it).

SCRATCH = 4 << 20  # the reusable buffer of "discard" reads (and of bytes beyond a body's size)


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def body_buffers(sizes, limit=None):
    """Pre-faulted buffers (bytearray(n) writes every page) for bodies of `sizes`, or None
    when they exceed `limit` bytes (default: half of MemAvailable): then reads discard."""
    need = sum(sizes)
    if need > (limit if limit is not None else mem_available() // 2):
        return None
    return [bytearray(s) for s in sizes]


def _read_body(resp, dest, scratch):
    """Reads a whole body without looking at it: into `dest` (a memoryview) until it is
    full, the rest (if any) into `scratch`. Returns the byte count."""
    n = 0
    if dest is not None:
        while n < len(dest):
            k = resp.readinto(dest[n:])
            if not k:
                return n
            n += k
    while True:
        k = resp.readinto(scratch)
        if not k:
            return n
        n += k


def pull_timed(hostport, repo, tag, expect_digest, blobs, bufs):
    """The timed pull: GET manifest by tag (a few KiB, hashed to parse it safely), then every
    blob on the same keep-alive connection, read without hashing. `blobs` are the expected
    descriptors (config first, then layers), `bufs` their buffers from `body_buffers` (or
    None: discard). `verify_pull` must run afterwards, off the clock."""
    scratch = memoryview(bytearray(SCRATCH))
    views = [memoryview(b) for b in bufs] if bufs else [None] * len(blobs)
    conn = _conn(hostport)
    outcomes = {}
    got = []
    total = 0
    t0 = time.perf_counter()
    try:
        body, d, oc = get_manifest(conn, repo, tag)
        outcomes[str(oc)] = outcomes.get(str(oc), 0) + 1
        total += len(body)
        if d != expect_digest:
            raise PullError("%s:%s is %s, expected %s" % (repo, tag, d, expect_digest))
        m = json.loads(body)
        listed = [(x["digest"], x["size"]) for x in [m["config"]] + m["layers"]]
        if listed != [(x["digest"], x["size"]) for x in blobs]:
            raise PullError("manifest lists %s, expected %s" % (listed, blobs))
        for desc, view in zip(blobs, views):
            conn.request("GET", "/v2/%s/blobs/%s" % (repo, desc["digest"]))
            r = conn.getresponse()
            if r.status != 200:
                raise PullError("GET blob %s: HTTP %d %s" % (desc["digest"], r.status, r.read()[:300]))
            n = _read_body(r, view, scratch)
            oc = r.getheader(CACHE_HEADER)
            outcomes[str(oc)] = outcomes.get(str(oc), 0) + 1
            got.append(n)
            total += n
    finally:
        conn.close()
    secs = time.perf_counter() - t0
    return {"bytes": total, "secs": round(secs, 4), "mb_s": round(total / secs / 1e6, 1), "outcomes": outcomes,
            "body_bytes": got, "read": "mem" if bufs else "discard"}


def verify_pull(hostport, repo, tag, expect_digest, blobs, bufs, r):
    """Off the clock: the sha256 and size of every body `pull_timed` received (mem), or of
    every body GET again (discard). Sets r["verified"] and r["verify"]."""
    try:
        if len(r.get("body_bytes", [])) != len(blobs):
            raise PullError("received %d bodies, expected %d" % (len(r.get("body_bytes", [])), len(blobs)))
        for desc, n in zip(blobs, r["body_bytes"]):
            if n != desc["size"]:
                raise PullError("blob %s: %d bytes, expected %d" % (desc["digest"], n, desc["size"]))
        if bufs:
            r["verify"] = "sha256 of the bytes received"
            for desc, b in zip(blobs, bufs):
                d = "sha256:" + hashlib.sha256(b).hexdigest()
                if d != desc["digest"]:
                    raise PullError("blob %s: received bytes hash to %s" % (desc["digest"], d))
        else:
            r["verify"] = "sizes received; sha256 of a second GET of every body"
            pull(hostport, repo, tag, expect_digest)
        r["verified"] = True
    except Exception as e:  # noqa: BLE001 - reported
        r["verified"] = False
        r["verify_error"] = repr(e)[:500]
    return r


def concurrent_get(hostport, repo, desc, n, bufs=None, timeout=300):
    """`n` clients GET one blob at the same moment (a barrier releases them), each on its
    own connection, reading without hashing (into `bufs[i]`, or discarding when `bufs` is
    None). Wall time from the release to the last client done. `verify_concurrent` checks
    the bytes afterwards, off the clock."""
    barrier = threading.Barrier(n + 1)
    results = [None] * n

    def worker(i):
        scratch = memoryview(bytearray(SCRATCH))
        view = memoryview(bufs[i]) if bufs else None
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
            size = _read_body(r, view, scratch)
            results[i] = {"bytes": size, "secs": round(time.perf_counter() - t, 3),
                          "outcome": r.getheader(CACHE_HEADER)}
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
    outcomes = {}
    for r in results:
        k = str((r or {}).get("outcome"))
        outcomes[k] = outcomes.get(k, 0) + 1
    return {"wall_s": round(wall, 3), "outcomes": outcomes, "bytes": sum((r or {}).get("bytes", 0) for r in results),
            "client_secs": sorted(r.get("secs", -1) for r in results if r),
            "errors": [r["error"] for r in results if r and "error" in r],
            "read": "mem" if bufs else "discard", "_clients": results}


def verify_concurrent(hostport, repo, desc, bufs, r, timeout=300):
    """Off the clock. mem: every client's buffer is compared byte for byte with the first
    one's, and every distinct content is hashed (so each client's sha256 is known without
    hashing n copies); discard: every client GETs the blob again and hashes it. Sets
    r["all_match"], r["distinct_sha256"], r["verify"]."""
    clients = r.pop("_clients")
    ok = all(c and "error" not in c and c.get("bytes") == desc["size"] for c in clients)
    digests = set()
    if bufs:
        r["verify"] = "sha256 of the bytes each client received"
        reps = []  # distinct contents: (buffer, digest)
        for c, b in zip(clients, bufs):
            if not c or "error" in c:
                continue
            same = next((d for rb, d in reps if rb == b), None)
            if same is None:
                same = "sha256:" + hashlib.sha256(memoryview(b)[:c["bytes"]]).hexdigest()
                reps.append((b, same))
            c["sha256"] = same
            digests.add(same)
    else:
        r["verify"] = "sizes received; sha256 of a second GET by every client"
        out = [None] * len(clients)

        def again(i):
            try:
                conn = _conn(hostport, timeout=timeout)
                try:
                    buf = bytearray(BUF)
                    out[i] = get_blob(conn, repo, desc, buf, memoryview(buf)) and desc["digest"]
                finally:
                    conn.close()
            except Exception as e:  # noqa: BLE001 - reported
                out[i] = "error: %r" % (e,)

        threads = [threading.Thread(target=again, args=(i,), daemon=True) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        digests = set(o for o in out if o)
    r["distinct_sha256"] = sorted(digests)
    r["all_match"] = ok and digests == {desc["digest"]}
    return r


def head_digest(hostport, repo, ref):
    conn = _conn(hostport, timeout=30)
    try:
        conn.request("HEAD", "/v2/%s/manifests/%s" % (repo, ref), headers={"Accept": ACCEPT})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("docker-content-digest")
    finally:
        conn.close()
