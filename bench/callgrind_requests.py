#!/usr/bin/env python3
"""Instructions per request, reproducible on a noisy machine (valgrind's callgrind).

    python3 bench/callgrind_requests.py <stevedore binary> head_manifest|head_blob|get_manifest|get_blob <N>

Starts the binary under callgrind on a fresh filesystem store (loopback, access log on),
pushes a 4 KiB blob and a manifest to local/app, sends 200 warm-up requests of the kind,
zeroes the counters, sends N keep-alive requests, dumps, and prints instructions per request
(the dump's total over N). Compare two binaries with the same N."""
import hashlib, http.client, json, os, shutil, socket, subprocess, sys, tempfile, time

binary, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = tempfile.mkdtemp(prefix="cg-requests-")
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
cfg = f'''[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"

[storage]
root = "{d}/store"

[proxy]
default_upstream = "up.test"
local_namespaces = ["local/*"]

[[upstreams]]
host = "up.test"
endpoints = ["http://127.0.0.1:1"]
'''
open(f"{d}/c.toml", "w").write(cfg)
out = f"{d}/cg.out"
p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                      binary, "serve", "--config", f"{d}/c.toml"], stdout=open(f"{d}/log", "w"), stderr=subprocess.STDOUT,
                     env=dict(os.environ, RUST_LOG="info"))
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5); c.request("GET", "/v2/"); c.getresponse().read(); break
    except Exception:
        time.sleep(0.1)
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
def req(m, path, body=None, headers={}):
    c.request(m, path, body=body, headers=headers); r = c.getresponse(); b = r.read(); return r, b
blob = os.urandom(4096); bd = "sha256:" + hashlib.sha256(blob).hexdigest()
cfgb = b"{}"; cd = "sha256:" + hashlib.sha256(cfgb).hexdigest()
for data, dg in ((blob, bd), (cfgb, cd)):
    r, _ = req("POST", "/v2/local/app/blobs/uploads/")
    loc = r.getheader("Location")
    sep = "&" if "?" in loc else "?"
    r, b = req("PUT", f"{loc}{sep}digest={dg}", data, {"Content-Type": "application/octet-stream"})
    assert r.status == 201, (r.status, b)
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(cfgb)},
                  "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": bd, "size": len(blob)}]}).encode()
r, b = req("PUT", "/v2/local/app/manifests/v1", man, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
assert r.status == 201, (r.status, b)
H = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
one = {"head_manifest": ("HEAD", "/v2/local/app/manifests/v1", H), "head_blob": ("HEAD", f"/v2/local/app/blobs/{bd}", {}),
       "get_manifest": ("GET", "/v2/local/app/manifests/v1", H), "get_blob": ("GET", f"/v2/local/app/blobs/{bd}", {})}[kind]
for _ in range(200):
    req(one[0], one[1], None, one[2])
subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
for _ in range(n):
    r, _ = req(one[0], one[1], None, one[2]); assert r.status == 200
subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True)
time.sleep(1)
p.terminate(); p.wait(timeout=60)
# The dump taken after the N requests is <out>.1 (<out> holds what ran after it, until exit).
tot = next(int(line.split()[1]) for line in open(out + ".1") if line.startswith("summary:"))
shutil.rmtree(d, ignore_errors=True)
print(f"{kind} {os.path.basename(binary)}: {tot / n:.0f} Ir/request ({tot} over {n})")
