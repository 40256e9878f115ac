"""The registries under test: the upstream Distribution, Distribution as a pull-through
proxy, a plain Distribution (push comparison), and Stevedore. Each target can be restarted
with an empty store."""

import functools
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

from .procs import Server, free_port, wait_http, wait_line

DIST_CONFIG = """version: 0.1
log:
  level: error
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
{extra}"""

STEVEDORE_CONFIG = """[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "2s"

[storage]
root = "{root}"
fsync = {fsync}

[proxy]
default_upstream = "{up_host}"
{local_ns}
[[upstreams]]
host = "{up_host}"
endpoints = ["http://{up_host}"]
"""


class Registry:
    """A server we (re)start with an empty store under `workdir/<name>/`."""

    kind = "?"

    def __init__(self, name, workdir):
        self.name = name
        self.dir = os.path.join(workdir, name)
        self.server = None
        self.hostport = None
        self.starts = 0

    def fresh(self):
        """(Re)starts the server with an empty store."""
        self.stop()
        root = os.path.join(self.dir, "store")
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        # Nothing an earlier run left unsynced (Distribution never fsyncs its 512 MiB) is
        # written back by the kernel during this one.
        os.sync()
        self.starts += 1
        self._start(root)
        return self

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    def backends(self):
        """Further servers this target depends on (accounted beside the upstream)."""
        return []

    def _rotate_logs(self):
        """Moves the last start's stdout and stderr aside (`.N`): `wait_line` looks for the
        listen line in the whole file, so each start needs a fresh one."""
        for ext in (".out", ".err"):
            p = os.path.join(self.dir, self.name + ext)
            if os.path.exists(p):
                os.replace(p, p + ".%d" % (self.starts - 1))

    @property
    def out_log(self):
        return self.server.out_path


class Distribution(Registry):
    kind = "distribution"

    def __init__(self, name, workdir, remote=None, tls=None, remote_tls=None, s3=None, shared_root=None):
        """`tls`: serve HTTPS with this `TestTls`'s leaf; `remote_tls`: the remote is HTTPS,
        trusted through this `TestTls`'s CA (`SSL_CERT_FILE`); `s3`: the `s3` storage driver
        on this `Garage` (a new bucket every fresh start); `shared_root`: serve the store of
        another Distribution as it is (never emptied)."""
        super().__init__(name, workdir)
        self.remote = remote
        self.tls = tls
        self.remote_tls = remote_tls
        self.s3 = s3
        self.shared_root = shared_root
        self.bucket = None
        self.port = free_port()
        self.hostport = "127.0.0.1:%d" % self.port

    def fresh(self):
        if self.shared_root:
            self.stop()
            os.makedirs(self.dir, exist_ok=True)
            self.starts += 1
            self._start(self.shared_root)
            return self
        return super().fresh()

    def backends(self):
        return [self.s3.server] if self.s3 and self.s3.server else []

    def s3_requests(self):
        return self.s3.requests() if self.s3 else None

    def _start(self, root):
        extra = ""
        if self.remote:
            extra += "proxy:\n  remoteurl: %s://%s\n" % ("https" if self.remote_tls else "http", self.remote)
        text = DIST_CONFIG.format(root=root, port=self.port, extra=extra)
        if self.tls:
            text = text.replace("http:\n  addr:", "http:\n  tls:\n    certificate: %s\n    key: %s\n  addr:"
                                % (self.tls.leaf_crt, self.tls.leaf_key))
        if self.s3:
            self.bucket = self.s3.new_bucket(self.name)
            # Blob GETs streamed through Distribution (no 307 to the bucket), as Stevedore's.
            text = text.replace("  filesystem:\n    rootdirectory: %s\n" % root, (
                "  s3:\n    accesskey: %s\n    secretkey: %s\n    region: %s\n    regionendpoint: %s\n"
                "    bucket: %s\n    secure: false\n    v4auth: true\n  redirect:\n    disable: true\n")
                % (self.s3.key_id, self.s3.secret, self.s3.REGION, self.s3.endpoint, self.bucket))
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(text)
        env = {"SSL_CERT_FILE": self.remote_tls.ca_crt} if self.remote_tls else None
        # The AWS SDK of Distribution's s3 driver fails at start with an AWS_CA_BUNDLE in the
        # environment (its HTTP transport cannot take one); the endpoint is plain HTTP anyway.
        self.server = Server(self.name, ["docker-registry", "serve", cfg], self.dir, env=env,
                             unset=("AWS_CA_BUNDLE",) if self.s3 else ()).start()
        if self.tls:
            wait_tcp(self.port, self.server)
        else:
            wait_http("http://%s/v2/" % self.hostport, self.server)


def wait_tcp(port, server, timeout=30):
    """Waits until 127.0.0.1:`port` accepts a connection; fails if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError("%s exited during start-up:\n%s" % (server.name, server.log_tail()))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not listen on %d within %d s:\n%s" % (server.name, port, timeout, server.log_tail()))


class TestTls:
    """A throwaway CA and a leaf for 127.0.0.1 / localhost (EC P-256), made with the openssl CLI."""

    def __init__(self, workdir):
        d = os.path.join(workdir, "tls")
        os.makedirs(d, exist_ok=True)
        self.ca_crt, self.ca_key = os.path.join(d, "ca.crt"), os.path.join(d, "ca.key")
        self.leaf_crt, self.leaf_key = os.path.join(d, "leaf.crt"), os.path.join(d, "leaf.key")
        csr, ext = os.path.join(d, "leaf.csr"), os.path.join(d, "leaf.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        for argv in (
            ["openssl", "req", "-x509"] + ec + ["-keyout", self.ca_key, "-out", self.ca_crt, "-days", "2",
                                                "-subj", "/CN=stevedore bench CA",
                                                "-addext", "basicConstraints=critical,CA:TRUE",
                                                "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["openssl", "req"] + ec + ["-keyout", self.leaf_key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            ["openssl", "x509", "-req", "-in", csr, "-CA", self.ca_crt, "-CAkey", self.ca_key, "-CAcreateserial",
             "-out", self.leaf_crt, "-days", "2", "-extfile", ext],
        ):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                raise RuntimeError("%s failed: %s" % (" ".join(argv[:3]), p.stderr[-1500:]))


def moto_binary():
    """moto_server (PyPI `moto[server]`) where the tests look for it: `$STEVEDORE_MOTO_SERVER`,
    else on PATH, else in the virtualenv scripts/install-test-deps.sh makes."""
    if os.environ.get("STEVEDORE_MOTO_SERVER"):
        return os.environ["STEVEDORE_MOTO_SERVER"]
    found = shutil.which("moto_server")
    if found:
        return found
    venv = os.path.join(os.path.expanduser("~"), ".cache", "stevedore-test-venv", "bin", "moto_server")
    if os.access(venv, os.X_OK):
        return venv
    raise RuntimeError("moto_server (PyPI moto[server]) not found: run bash scripts/install-test-deps.sh "
                       "moto=moto_server (bench/run.sh does)")


class Moto:
    """moto_server on 127.0.0.1 with one bucket: an S3 endpoint (in memory) for a target."""

    BUCKET = "bench"

    def __init__(self, name, workdir):
        self.name = name
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.server = None

    def fresh(self):
        """(Re)starts moto (its content is in memory: a restart empties it) and makes the bucket."""
        self.stop()
        self.server = Server(self.name, [moto_binary(), "-H", "127.0.0.1", "-p", str(self.port)], self.dir,
                             env={"PYTHONUNBUFFERED": "1"}).start()
        wait_http("http://127.0.0.1:%d/" % self.port, self.server, timeout=60)
        # moto accepts unsigned requests.
        req = urllib.request.Request("http://127.0.0.1:%d/%s" % (self.port, self.BUCKET), method="PUT")
        urllib.request.urlopen(req, timeout=30).close()
        return self

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None

    # The interface a target's S3 store offers (see `Garage`).
    REGION = "us-east-1"
    key_id = secret = "bench"

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.port

    def new_bucket(self, owner):
        """A restarted (empty) moto with its one bucket."""
        self.fresh()
        return self.BUCKET

    def requests(self):
        return None


def garage_binary():
    """Garage (crates.io `garage` 2.5.0) where bench/run.sh builds it: `$BENCH_GARAGE`, else
    ~/.cache/stevedore-bench/bin/garage."""
    return os.environ.get("BENCH_GARAGE") or os.path.join(os.path.expanduser("~"), ".cache", "stevedore-bench",
                                                          "bin", "garage")


GARAGE_CONFIG = """metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{admin_token}"
metrics_token = "{metrics_token}"
"""


class Garage:
    """A single-node Garage (a real S3 server, Rust) on 127.0.0.1: one layout, one key, a new
    bucket per target start (`new_bucket`), requests counted from its metrics
    (`api_s3_request_counter` on the admin port). Started once, empty, for the whole run."""

    REGION = "garage"

    def __init__(self, name, workdir):
        self.name = name
        self.dir = os.path.join(workdir, name)
        self.binary = garage_binary()
        if not os.access(self.binary, os.X_OK):
            log = os.path.join(os.path.expanduser("~"), ".cache", "stevedore-bench", "garage-build.log")
            try:
                with open(log, errors="replace") as f:
                    tail = " | ".join(ln.strip() for ln in f.readlines()[-5:])
            except OSError:
                tail = "no build log"
            raise RuntimeError("no Garage at %s (bench/run.sh builds it in the background); last lines of %s: %s"
                               % (self.binary, log, tail))
        self.s3, self.rpc, self.admin = free_port(), free_port(), free_port()
        self.endpoint = "http://127.0.0.1:%d" % self.s3
        self.key_id = "GK" + secrets.token_hex(12)
        self.secret = secrets.token_hex(32)
        self.metrics_token = secrets.token_hex(16)
        self.server = None
        self.buckets = 0

    def cli(self, *args, timeout=60):
        p = subprocess.run([self.binary, "-c", self.cfg] + list(args), capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"))
        if p.returncode != 0:
            raise RuntimeError("garage %s failed (%d): %s%s" % (" ".join(args), p.returncode, p.stdout[-1500:],
                                                                p.stderr[-1500:]))
        return p.stdout

    def start(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.cfg = os.path.join(self.dir, "garage.toml")
        with open(self.cfg, "w") as f:
            f.write(GARAGE_CONFIG.format(dir=self.dir, rpc=self.rpc, s3=self.s3, admin=self.admin,
                                         rpc_secret=secrets.token_hex(32), admin_token=secrets.token_hex(16),
                                         metrics_token=self.metrics_token))
        os.chmod(self.cfg, 0o600)
        self.server = Server(self.name, [self.binary, "-c", self.cfg, "server"], self.dir,
                             env={"RUST_LOG": "warn"}).start()
        wait_tcp(self.rpc, self.server)
        wait_tcp(self.s3, self.server)
        node = None
        deadline = time.monotonic() + 30
        while node is None:
            try:
                node = self.cli("node", "id", "-q").strip().split("@")[0]
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.cli("layout", "assign", "-z", "dc1", "-c", "20G", node)
        self.cli("layout", "apply", "--version", "1")
        self.cli("key", "import", "--yes", "-n", "bench", self.key_id, self.secret)
        return self

    def new_bucket(self, owner):
        """A new empty bucket the key may read, write and own."""
        self.buckets += 1
        name = re.sub(r"[^a-z0-9-]", "-", "%s-%d" % (owner.lower(), self.buckets))[:60]
        self.cli("bucket", "create", name)
        self.cli("bucket", "allow", "--read", "--write", "--owner", name, "--key", self.key_id)
        return name

    def requests(self):
        """{S3 API endpoint: requests answered so far} from the metrics (None if unreadable)."""
        req = urllib.request.Request("http://127.0.0.1:%d/metrics" % self.admin,
                                     headers={"Authorization": "Bearer " + self.metrics_token})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return None
        out = {}
        for ln in text.splitlines():
            if ln.startswith("api_s3_request_counter"):
                m = re.search(r'api_endpoint="([^"]+)"', ln)
                key = m.group(1) if m else "?"
                out[key] = out.get(key, 0) + int(float(ln.rsplit(" ", 1)[1]))
        return out

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None


def requests_delta(before, after):
    """The S3 requests between two `requests()` snapshots: {"total": n, endpoint: n, ...}."""
    if before is None or after is None:
        return None
    d = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    d["total"] = sum(d.values())
    return d


# Pushes go to 127.0.0.1:PORT/local/big:1. Newer binaries refuse pushes to plain names while a
# default upstream is configured unless the name matches `[proxy] local_namespaces`; older ones
# refuse that key (unknown keys are errors). `config_keys` finds out which, per binary.
LOCAL_NS = 'local_namespaces = ["local/*"]\n'
_KEYS = {}


S3_CONFIG = """
[storage.s3]
bucket = "{bucket}"
region = "{region}"
endpoint = "{endpoint}"
allow_http = true
access_key_id = "{key_id}"
secret_access_key = "{secret}"
"""


def _stevedore_config(port, root, fsync, up_host, local_ns, s3=None, bucket=None, up_tls=None):
    cfg = STEVEDORE_CONFIG.format(root=root, port=port, fsync="true" if fsync else "false", up_host=up_host,
                                  local_ns=LOCAL_NS if local_ns else "")
    if up_tls:
        cfg = cfg.replace('endpoints = ["http://', 'endpoints = ["https://').rstrip("\n") + \
            '\nca_file = "%s"\n' % up_tls.ca_crt
    if s3:
        cfg = cfg.replace("fsync = ", 'backend = "s3"\nfsync = ', 1) + S3_CONFIG.format(
            bucket=bucket, region=s3.REGION, endpoint=s3.endpoint, key_id=s3.key_id, secret=s3.secret)
    return cfg


def config_keys(binary, workdir):
    """{"local_namespaces": bool}: whether `binary check-config` accepts the key. Raises if
    the binary accepts neither config (then the benchmark's config itself is wrong)."""
    if binary in _KEYS:
        return _KEYS[binary]
    d = tempfile.mkdtemp(prefix="config-probe-", dir=workdir)
    verdicts = {}
    try:
        for local_ns in (True, False):
            cfg = os.path.join(d, "probe.toml")
            with open(cfg, "w") as f:
                f.write(_stevedore_config(free_port(), os.path.join(d, "store"), True, "127.0.0.1:1", local_ns))
            env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
            p = subprocess.run([binary, "check-config", "--config", cfg], capture_output=True, text=True, timeout=30,
                               env=env)
            verdicts[local_ns] = (p.returncode == 0, (p.stdout + p.stderr).strip()[:2000])
            if p.returncode == 0:
                break
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if verdicts[True][0]:
        keys = {"local_namespaces": True}
    elif verdicts.get(False, (False,))[0] and "local_namespaces" in verdicts[True][1]:
        keys = {"local_namespaces": False, "local_namespaces_refused": verdicts[True][1][:300]}
    else:
        raise RuntimeError("%s check-config refuses the benchmark's config: %s" % (binary, verdicts))
    _KEYS[binary] = keys
    return keys


class Stevedore(Registry):
    kind = "stevedore"

    def __init__(self, name, workdir, binary, upstream_hostport, fsync=True, s3=False, env=None, up_tls=None):
        """`s3`: True for a moto of its own, or a shared S3 server (`Garage`) on which every
        fresh start takes a new bucket; `up_tls`: the upstream is HTTPS, trusted through
        this `TestTls`'s CA (`upstreams.ca_file`)."""
        super().__init__(name, workdir)
        self.env = env
        self.binary = binary
        self.up = upstream_hostport
        self.fsync = fsync
        self.up_tls = up_tls
        # backend = "s3": the content in a moto bucket, restarted empty with the target (or a
        # new bucket of the shared server); storage.root is then scratch space (spools, part buffers).
        self.moto = (Moto(name + "-moto", workdir) if s3 is True else s3) if s3 else None
        self.bucket = None
        self.port = free_port()
        self.hostport = "127.0.0.1:%d" % self.port
        self.keys = config_keys(binary, workdir)

    def backends(self):
        return [self.moto.server] if self.moto and self.moto.server else []

    def s3_requests(self):
        return self.moto.requests() if self.moto else None

    def stop(self):
        super().stop()
        if isinstance(self.moto, Moto):
            self.moto.stop()

    def _start(self, root):
        if self.moto:
            self.bucket = self.moto.new_bucket(self.name)
        cfg = os.path.join(self.dir, "stevedore.toml")
        with open(cfg, "w") as f:
            f.write(_stevedore_config(self.port, root, self.fsync, self.up, self.keys["local_namespaces"], self.moto,
                                      self.bucket, self.up_tls))
        self._rotate_logs()
        # The binary's default log filter (RUST_LOG unset), as shipped.
        self.server = Server(self.name, [self.binary, "serve", "--config", cfg], self.dir, env=self.env,
                             unset=("RUST_LOG",)).start()
        addr = wait_line(self.server, "stevedore listening on")
        if addr != self.hostport:
            raise RuntimeError("stevedore listens on %s, configured %s" % (addr, self.hostport))
        wait_http("http://%s/v2/" % self.hostport, self.server)


class FloorRelay(Registry):
    """`bench/floor` (floor-relay): the least work a digest-verifying fill does, as a target.
    `mode`: `relay` (copy only), `seq` (read, send, hash, write in turn), `pipe` (hash and
    write on a second thread), `pipe3` (send on a second, hash and write on a third). Only
    cold pulls mean anything: it stores, never serves from its store. `tls`: the upstream is
    HTTPS, trusted through this `TestTls`'s CA."""

    kind = "floor"

    def __init__(self, name, workdir, binary, upstream_hostport, mode, tls=None):
        super().__init__(name, workdir)
        self.binary = binary
        self.up = upstream_hostport
        self.mode = mode
        self.tls = tls
        self.port = free_port()
        self.hostport = "127.0.0.1:%d" % self.port

    def _start(self, root):
        self._rotate_logs()
        argv = [self.binary, self.hostport, self.up, root, self.mode] + ([self.tls.ca_crt] if self.tls else [])
        self.server = Server(self.name, argv, self.dir).start()
        wait_line(self.server, "floor-relay listening on")


@functools.lru_cache(maxsize=None)
def build_floor(repo):
    """Builds bench/floor (its own workspace and target directory) once per process; returns
    the binary."""
    target = os.environ.get("BENCH_FLOOR_TARGET_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "stevedore-bench", "floor-target")
    subprocess.run(["cargo", "build", "--release", "--locked", "--quiet", "--manifest-path",
                    os.path.join(repo, "bench", "floor", "Cargo.toml"), "--target-dir", target], check=True,
                   timeout=900)
    return os.path.join(target, "release", "floor-relay")
