"""Servers started by the benchmark, and /proc accounting.

Every server is a child of this process, started with PR_SET_PDEATHSIG=SIGKILL so it dies
with us even if we are killed hard, and registered in ``SERVERS`` so that the normal exit
path (and SIGINT/SIGTERM/SIGHUP) stops it.
"""

import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
SERVERS = []

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name, argv, logdir, env=None, unset=()):
        self.name = name
        self.argv = argv
        self.out_path = os.path.join(logdir, name + ".out")
        self.err_path = os.path.join(logdir, name + ".err")
        self.env = env
        self.unset = unset
        self.proc = None

    def start(self):
        out = open(self.out_path, "ab")
        err = open(self.err_path, "ab")
        env = dict(os.environ)
        env.update(self.env or {})
        for k in self.unset:
            env.pop(k, None)
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=_die_with_parent)
        out.close()
        err.close()
        SERVERS.append(self)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self in SERVERS:
            SERVERS.remove(self)

    def log_tail(self, n=3000):
        out = []
        for p in (self.out_path, self.err_path):
            try:
                with open(p, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    f.seek(max(0, size - n))
                    out.append("--- %s\n%s" % (p, f.read().decode(errors="replace")))
            except OSError:
                pass
        return "\n".join(out)


def stop_all():
    for s in list(SERVERS):
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - best effort on the way out
            try:
                s.proc.kill()
            except Exception:  # noqa: BLE001
                pass


def wait_http(url, server, timeout=30):
    """Waits until `url` answers (any HTTP status); fails if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError("%s exited during start-up:\n%s" % (server.name, server.log_tail()))
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not answer %s within %d s:\n%s" % (server.name, url, timeout, server.log_tail()))


def wait_line(server, prefix, timeout=30):
    """Waits for a stdout line starting with `prefix`; returns the rest of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError("%s exited during start-up:\n%s" % (server.name, server.log_tail()))
        with open(server.out_path, "rb") as f:
            for line in f.read().decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        time.sleep(0.05)
    raise RuntimeError("%s printed no %r within %d s:\n%s" % (server.name, prefix, timeout, server.log_tail()))


# ---- /proc accounting -------------------------------------------------------------------

def _stat(pid):
    """The fields of /proc/PID/stat after the command name (field 3 first), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rfind(")") + 2:].split()


def cpu_seconds(pid):
    """utime+stime of a live process, in seconds (all its threads)."""
    r = cpu_sys_faults(pid)
    return r[0] if r else None


def cpu_sys_faults(pid):
    """(utime+stime, stime, minor page faults, major page faults) of a live process, all its
    threads, from one reading: its CPU, and where it went besides user code (a major fault
    read a page from disk: code or data the kernel had dropped). None once it is gone."""
    rest = _stat(pid)
    return ((int(rest[11]) + int(rest[12])) / CLK_TCK, int(rest[12]) / CLK_TCK, int(rest[7]),
            int(rest[9])) if rest else None


VMSTAT_KEYS = ("allocstall_normal", "allocstall_movable", "compact_stall", "pgscan_direct", "pgsteal_direct",
               "pgscan_kswapd", "pgsteal_kswapd", "nr_dirtied", "nr_written", "pgfault",
               "pgmajfault", "workingset_refault_file")


def vmstat():
    """The machine's memory-management counters of `VMSTAT_KEYS` (/proc/vmstat)."""
    out = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k in VMSTAT_KEYS:
                    out[k] = int(v)
    except OSError:
        pass
    return out


def status_kib(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm(pid):
    """Resets VmHWM to the current RSS (writes 5 to clear_refs). False if not allowed."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def system_cpu():
    """(busy, total) jiffies of all CPUs from /proc/stat, in seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def self_cpu():
    """CPU of this process (all threads) plus its waited-for children (the client tools)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Phase:
    """Accounts one measured phase: wall time, CPU and peak RSS of the measured servers, the
    benchmark's own (client) CPU, and the CPU everything else on the machine used.

    `main` is the process under test (its VmHWM is reset at the start when the kernel
    allows it, so the peak is this phase's own); `others` are further servers we run (the
    upstream). Servers must not be restarted inside a phase."""

    def __init__(self, name, main=None, others=()):
        self.name = name
        self.main = main
        self.others = [o for o in others if o is not None]
        self.result = {}

    def __enter__(self):
        self.hwm_reset = reset_hwm(self.main.pid) if self.main else None
        self.t0 = time.monotonic()
        self.sys0 = system_cpu()
        self.self0 = self_cpu()
        self.main_start = cpu_sys_faults(self.main.pid) if self.main else None
        self.main0 = self.main_start[0] if self.main_start else 0.0  # bench.py: CPU to idle
        self.vm0 = vmstat()
        self.others0 = [cpu_seconds(o.pid) or 0.0 for o in self.others]
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.t0
        busy1, tot1 = system_cpu()
        client = self_cpu() - self.self0
        main1 = cpu_sys_faults(self.main.pid) if self.main else None
        main_cpu = (main1[0] if main1 else 0.0) - self.main0 if self.main else 0.0
        others = [(cpu_seconds(o.pid) or 0.0) - c for o, c in zip(self.others, self.others0)]
        busy = busy1 - self.sys0[0]
        total = tot1 - self.sys0[1]
        foreign = max(0.0, busy - client - main_cpu - sum(others))
        r = {
            "wall_s": round(wall, 3),
            "client_cpu_s": round(client, 2),
            "machine_busy_pct": round(100 * busy / total, 1) if total > 0 else None,
            "foreign_cpu_s": round(foreign, 2),
            "foreign_pct": round(100 * foreign / total, 1) if total > 0 else None,
        }
        if self.main:
            r["cpu_s"] = round(main_cpu, 2)
            r["peak_rss_kib"] = status_kib(self.main.pid, "VmHWM")
            r["rss_end_kib"] = status_kib(self.main.pid, "VmRSS")
            r["peak_rss_scope"] = "phase" if self.hwm_reset else "since process start"
            if main1 and self.main_start:
                r["sys_cpu_s"] = round(main1[1] - self.main_start[1], 2)
                r["minor_faults"] = main1[2] - self.main_start[2]
                r["major_faults"] = main1[3] - self.main_start[3]
        for o, c in zip(self.others, others):
            r[o.name + "_cpu_s"] = round(c, 2)
        vm1 = vmstat()
        r["vmstat"] = {k: vm1[k] - self.vm0[k] for k in vm1 if k in self.vm0}
        self.result = r
        return False


def wait_idle(servers, log_path=None, quiet=1.0, timeout=60.0, step=0.2):
    """Waits until the servers use no CPU (at most one clock tick per step) and `log_path`
    stops growing, for `quiet` seconds. Bounded by `timeout`; returns seconds waited."""
    t0 = time.monotonic()
    last_change = t0

    def sample():
        cpu = sum(cpu_seconds(s.pid) or 0.0 for s in servers if s is not None)
        size = os.path.getsize(log_path) if log_path else 0
        return cpu, size

    prev = sample()
    while True:
        time.sleep(step)
        now = time.monotonic()
        cur = sample()
        if cur[1] != prev[1] or cur[0] - prev[0] > 1.5 / CLK_TCK:
            last_change = now
        prev = cur
        if now - last_change >= quiet:
            return round(now - t0, 2)
        if now - t0 >= timeout:
            return round(now - t0, 2)
