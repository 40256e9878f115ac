"""The registries under test: the upstream Distribution, Distribution as a pull-through
proxy, a plain Distribution (push comparison), and Stevedore. Each target can be restarted
with an empty store."""

import os
import shutil
import subprocess
import tempfile
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

    @property
    def out_log(self):
        return self.server.out_path


class Distribution(Registry):
    kind = "distribution"

    def __init__(self, name, workdir, remote=None):
        super().__init__(name, workdir)
        self.remote = remote
        self.port = free_port()
        self.hostport = "127.0.0.1:%d" % self.port

    def _start(self, root):
        extra = "proxy:\n  remoteurl: http://%s\n" % self.remote if self.remote else ""
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(DIST_CONFIG.format(root=root, port=self.port, extra=extra))
        self.server = Server(self.name, ["docker-registry", "serve", cfg], self.dir).start()
        wait_http("http://%s/v2/" % self.hostport, self.server)


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


# Pushes go to 127.0.0.1:PORT/local/big:1. Newer binaries refuse pushes to plain names while a
# default upstream is configured unless the name matches `[proxy] local_namespaces`; older ones
# refuse that key (unknown keys are errors). `config_keys` finds out which, per binary.
LOCAL_NS = 'local_namespaces = ["local/*"]\n'
_KEYS = {}


S3_CONFIG = """
[storage.s3]
bucket = "{bucket}"
region = "us-east-1"
endpoint = "http://127.0.0.1:{port}"
allow_http = true
access_key_id = "bench"
secret_access_key = "bench"
"""


def _stevedore_config(port, root, fsync, up_host, local_ns, s3=None):
    cfg = STEVEDORE_CONFIG.format(root=root, port=port, fsync="true" if fsync else "false", up_host=up_host,
                                  local_ns=LOCAL_NS if local_ns else "")
    if s3:
        cfg = cfg.replace("fsync = ", 'backend = "s3"\nfsync = ', 1) + S3_CONFIG.format(bucket=s3.BUCKET, port=s3.port)
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

    def __init__(self, name, workdir, binary, upstream_hostport, fsync=True, s3=False, env=None):
        super().__init__(name, workdir)
        self.env = env
        self.binary = binary
        self.up = upstream_hostport
        self.fsync = fsync
        # backend = "s3": the content in a moto bucket, restarted empty with the target;
        # storage.root is then scratch space (spools, part buffers).
        self.moto = Moto(name + "-moto", workdir) if s3 else None
        self.port = free_port()
        self.hostport = "127.0.0.1:%d" % self.port
        self.keys = config_keys(binary, workdir)

    def backends(self):
        return [self.moto.server] if self.moto and self.moto.server else []

    def stop(self):
        super().stop()
        if self.moto:
            self.moto.stop()

    def _start(self, root):
        if self.moto:
            self.moto.fresh()
        cfg = os.path.join(self.dir, "stevedore.toml")
        with open(cfg, "w") as f:
            f.write(_stevedore_config(self.port, root, self.fsync, self.up, self.keys["local_namespaces"], self.moto))
        # Fresh log per start: wait_line looks for the listen line in the whole file.
        for ext in (".out", ".err"):
            p = os.path.join(self.dir, self.name + ext)
            if os.path.exists(p):
                os.replace(p, p + ".%d" % (self.starts - 1))
        # The binary's default log filter (RUST_LOG unset), as shipped.
        self.server = Server(self.name, [self.binary, "serve", "--config", cfg], self.dir, env=self.env,
                             unset=("RUST_LOG",)).start()
        addr = wait_line(self.server, "stevedore listening on")
        if addr != self.hostport:
            raise RuntimeError("stevedore listens on %s, configured %s" % (addr, self.hostport))
        wait_http("http://%s/v2/" % self.hostport, self.server)
