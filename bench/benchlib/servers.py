"""The registries under test: the upstream Distribution, Distribution as a pull-through
proxy, a plain Distribution (push comparison), and Stevedore. Each target can be restarted
with an empty store."""

import os
import shutil

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


class Stevedore(Registry):
    kind = "stevedore"

    def __init__(self, name, workdir, binary, upstream_hostport, fsync=True):
        super().__init__(name, workdir)
        self.binary = binary
        self.up = upstream_hostport
        self.fsync = fsync
        self.port = free_port()
        self.hostport = "127.0.0.1:%d" % self.port

    def _start(self, root):
        cfg = os.path.join(self.dir, "stevedore.toml")
        with open(cfg, "w") as f:
            f.write(STEVEDORE_CONFIG.format(root=root, port=self.port, fsync="true" if self.fsync else "false",
                                            up_host=self.up))
        # Fresh log per start: wait_line looks for the listen line in the whole file.
        for ext in (".out", ".err"):
            p = os.path.join(self.dir, self.name + ext)
            if os.path.exists(p):
                os.replace(p, p + ".%d" % (self.starts - 1))
        # The binary's default log filter (RUST_LOG unset), as shipped.
        self.server = Server(self.name, [self.binary, "serve", "--config", cfg], self.dir,
                             unset=("RUST_LOG",)).start()
        addr = wait_line(self.server, "stevedore listening on")
        if addr != self.hostport:
            raise RuntimeError("stevedore listens on %s, configured %s" % (addr, self.hostport))
        wait_http("http://%s/v2/" % self.hostport, self.server)
