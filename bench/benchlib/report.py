"""The summary table: each metric for upstream-direct, Distribution (proxy), Stevedore, the
Stevedore/Distribution ratio, and the issue's target next to it."""

import statistics

COLS = ("direct", "distribution", "stevedore")


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _max(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _sum(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


def _get(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _phases(runs):
    return [r.get("phase", {}) for r in runs or []]


def summarize(res):
    """Rows of (key, label, {col: value}, ratio, target text, verdict)."""
    rows = []

    def add(key, label, vals, target=None, check=None, ratio=True, fmt="%.1f"):
        d, s = vals.get("distribution"), vals.get("stevedore")
        r = round(s / d, 2) if ratio and d and s is not None else None
        verdict = None
        if check is not None and s is not None:
            try:
                verdict = bool(check(vals, r))
            except TypeError:
                verdict = None
        rows.append({"key": key, "label": label, "values": vals, "ratio": r, "target": target,
                     "met": verdict, "fmt": fmt})

    def per(fn):
        return {c: fn(res.get(c) or {}) for c in COLS}

    # Pulls of `big` (one client, manifest by tag + every blob, each body hashed).
    direct_pull = _med([r["mb_s"] for r in _get(res, "direct", "pull", "cold") or []])
    cold = per(lambda t: _med([r["mb_s"] for r in _get(t, "pull", "cold") or []]))
    cold["direct"] = direct_pull
    add("pull_cold_mb_s", "pull big cold, MB/s", cold, "S >= 0.6 x direct",
        lambda v, r: v["stevedore"] >= 0.6 * v["direct"])
    warm = per(lambda t: _med([r["mb_s"] for r in _get(t, "pull", "warm") or []]))
    warm["direct"] = direct_pull
    add("pull_warm_mb_s", "pull big warm, MB/s", warm, "S >= 1.2 x D", lambda v, r: r >= 1.2)

    # Concurrent cold GETs of the big layer.
    add("conc_wall_s", "concurrent cold GETs of big layer: wall s",
        per(lambda t: _med([r["wall_s"] for r in t.get("concurrent") or []])), "S <= 0.5 x D",
        lambda v, r: r <= 0.5, fmt="%.2f")
    add("conc_upstream_gets", "  upstream GETs of that blob (max)",
        per(lambda t: _max([r["upstream_gets"] for r in t.get("concurrent") or []])), "S == 1",
        lambda v, r: v["stevedore"] == 1, ratio=False, fmt="%d")
    add("conc_all_match", "  every response's sha256 matches",
        per(lambda t: (all(r["all_match"] for r in t["concurrent"]) if t.get("concurrent") else None)),
        "all", lambda v, r: v["stevedore"] is True, ratio=False, fmt="%s")

    # Loads.
    for key, label, target, check in (
        ("head_manifest", "HEAD manifest by tag (hey)", "S >= 10 x D", lambda v, r: r >= 10),
        ("head_blob", "HEAD blob (hey)", "S >= 1.2 x D", lambda v, r: r >= 1.2),
        ("get_manifest", "GET manifest by tag (wrk)", None, None),
    ):
        add(key + "_rps", label + ": rps", per(lambda t: _med([r["rps"] for r in _get(t, "loads", key) or []])),
            target, check, fmt="%.0f")
        add(key + "_p50", "  p50 ms", per(lambda t: _med([r["p50_ms"] for r in _get(t, "loads", key) or []])),
            fmt="%.2f")
        add(key + "_p99", "  p99 ms", per(lambda t: _med([r["p99_ms"] for r in _get(t, "loads", key) or []])),
            fmt="%.2f")
        up = per(lambda t: _sum([r["upstream_requests"] for r in _get(t, "loads", key) or []]))
        up["direct"] = None  # every request is an upstream request there
        add(key + "_upstream", "  upstream requests (all runs)", up,
            "S == 0" if key == "head_manifest" else None,
            (lambda v, r: v["stevedore"] == 0) if key == "head_manifest" else None, ratio=False, fmt="%d")
        add(key + "_errors", "  non-2xx / errors (all runs)", per(lambda t: _sum([_errors(r) for r in _get(t, "loads", key) or []])),
            ratio=False, fmt="%d")

    # skopeo copy of `many`.
    add("skopeo_cold_s", "skopeo copy many cold, s",
        per(lambda t: _med([r["secs"] for r in _get(t, "skopeo", "cold") or []])), fmt="%.2f")
    add("skopeo_warm_s", "skopeo copy many warm, s",
        per(lambda t: _med([r["secs"] for r in _get(t, "skopeo", "warm") or []])), fmt="%.2f")

    # Push of `big` (Distribution column: a plain, non-proxy Distribution).
    push = {"direct": None,
            "distribution": _med([r["mb_s"] for r in _get(res, "push", "distribution") or []]),
            "stevedore": _med([r["mb_s"] for r in _get(res, "push", "stevedore") or []])}
    add("push_mb_s", "push big (skopeo), MB/s [D = plain registry]", push, "S >= 1.2 x D", lambda v, r: r >= 1.2)

    # Peak RSS and CPU of the process under test, per phase (direct: the upstream itself).
    def phase_runs(t, which):
        return {
            "cold pull": _get(t, "pull", "cold"),
            "warm pull": _get(t, "pull", "warm"),
            "concurrent": t.get("concurrent"),
            "HEAD manifest": _get(t, "loads", "head_manifest"),
            "HEAD blob": _get(t, "loads", "head_blob"),
            "GET manifest": _get(t, "loads", "get_manifest"),
            "skopeo cold": _get(t, "skopeo", "cold"),
            "skopeo warm": _get(t, "skopeo", "warm"),
        }[which]

    phases = ("cold pull", "warm pull", "concurrent", "HEAD manifest", "HEAD blob", "GET manifest", "skopeo cold",
              "skopeo warm")
    for ph in phases:
        vals = per(lambda t: _max([p.get("peak_rss_kib") for p in _phases(phase_runs(t, ph))]))
        vals = {k: (v / 1024 if v else None) for k, v in vals.items()}
        tgt = chk = None
        if ph in ("cold pull", "concurrent"):
            tgt, chk = "S <= 20 MiB", (lambda v, r: v["stevedore"] <= 20)
        add("rss_" + ph, "peak RSS MiB, %s" % ph, vals, tgt, chk)
    push_rss = {"direct": None,
                "distribution": _max([p.get("peak_rss_kib") for p in _phases(_get(res, "push", "distribution"))]),
                "stevedore": _max([p.get("peak_rss_kib") for p in _phases(_get(res, "push", "stevedore"))])}
    add("rss_push", "peak RSS MiB, push", {k: (v / 1024 if v else None) for k, v in push_rss.items()})
    for ph in phases:
        add("cpu_" + ph, "CPU s (median run), %s" % ph,
            per(lambda t: _med([p.get("cpu_s") for p in _phases(phase_runs(t, ph))])), fmt="%.2f")
    add("cpu_push", "CPU s (median run), push",
        {"direct": None,
         "distribution": _med([p.get("cpu_s") for p in _phases(_get(res, "push", "distribution"))]),
         "stevedore": _med([p.get("cpu_s") for p in _phases(_get(res, "push", "stevedore"))])}, fmt="%.2f")

    # Noise: CPU used by processes that are not ours, as % of all CPUs, worst run.
    for ph in phases:
        add("noise_" + ph, "foreign CPU %% (worst run), %s" % ph,
            per(lambda t: _max([p.get("foreign_pct") for p in _phases(phase_runs(t, ph))])), ratio=False)
    add("noise_push", "foreign CPU % (worst run), push",
        {"direct": None,
         "distribution": _max([p.get("foreign_pct") for p in _phases(_get(res, "push", "distribution"))]),
         "stevedore": _max([p.get("foreign_pct") for p in _phases(_get(res, "push", "stevedore"))])}, ratio=False)

    extra = {}
    nofs = res.get("stevedore_fsync_off")
    if nofs:
        extra["fsync_off"] = {
            "pull_cold_mb_s": _med([r["mb_s"] for r in _get(nofs, "pull", "cold") or []]),
            "pull_warm_mb_s": _med([r["mb_s"] for r in _get(nofs, "pull", "warm") or []]),
            "push_mb_s": _med([r["mb_s"] for r in nofs.get("push") or []]),
            "peak_rss_cold_mib": (_max([p.get("peak_rss_kib") for p in _phases(_get(nofs, "pull", "cold"))]) or 0) / 1024,
        }
    return {"rows": rows, "extra": extra}


def _errors(r):
    if "failed" in r:
        return 1
    if r.get("tool") == "hey":
        return sum(v for k, v in r.get("status", {}).items() if not k.startswith("2")) + (1 if r.get("errors") else 0)
    return (r.get("non_2xx") or 0) + (0 if not r.get("socket_errors") or set(r["socket_errors"]) <= set("connectradwiemou ,0")
                                      else 1)


def _fmt(v, fmt):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    try:
        return fmt % v
    except TypeError:
        return str(v)


def render(res):
    s = res["summary"]
    m = res["meta"]
    lines = []
    head = ("metric", "direct", "Distribution", "Stevedore", "S/D", "target", "met")
    rows = [head]
    for r in s["rows"]:
        v = r["values"]
        rows.append((r["label"], _fmt(v.get("direct"), r["fmt"]), _fmt(v.get("distribution"), r["fmt"]),
                     _fmt(v.get("stevedore"), r["fmt"]), _fmt(r["ratio"], "%.2f"), r["target"] or "",
                     "" if r["met"] is None else ("yes" if r["met"] else "NO")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    p = m["params"]
    lines.append("Stevedore benchmark  %s  (%s)" % (m.get("started"), m["versions"].get("stevedore_git")))
    lines.append("big = %d MiB layer + 2 small; medians of %d runs (concurrent: %d runs of %d clients; loads: %d x %d s,"
                 " %d connections); each cold run starts from an empty cache"
                 % (p["big_mib"], p["repeat"], p["conc_repeat"], p["concurrent"], p["load_repeat"], p["load_secs"],
                    p["conns"]))
    lines.append("direct = the upstream Distribution itself; Distribution = Distribution in proxy mode "
                 "(push row: a plain Distribution); MB = 10^6 bytes")
    lines.append("")
    for i, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(widths[j]) if j == 0 else str(c).rjust(widths[j]) if j < 5
                               else str(c).ljust(widths[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("peak RSS = VmHWM of the process under test, reset at the start of each phase (clear_refs 5); "
                 "CPU = its utime+stime during the phase; direct column = the upstream process.")
    lines.append("foreign CPU = machine CPU (/proc/stat) minus the servers we run and this benchmark with its tools, "
                 "as %% of %d CPUs." % m["versions"].get("cpus", 0))
    fo = s["extra"].get("fsync_off")
    if fo:
        rows_by = {r["key"]: r for r in s["rows"]}
        lines.append("for information, Stevedore with storage.fsync = false: cold pull %s MB/s (fsync on: %s), warm %s MB/s,"
                     " push %s MB/s (fsync on: %s), peak RSS cold %s MiB"
                     % (_fmt(fo["pull_cold_mb_s"], "%.0f"), _fmt(rows_by["pull_cold_mb_s"]["values"]["stevedore"], "%.0f"),
                        _fmt(fo["pull_warm_mb_s"], "%.0f"), _fmt(fo["push_mb_s"], "%.0f"),
                        _fmt(rows_by["push_mb_s"]["values"]["stevedore"], "%.0f"), _fmt(fo["peak_rss_cold_mib"], "%.1f")))
    wr = m.get("whole_run")
    if wr:
        lines.append("noise over the whole run: other processes used %.1f%% of the machine's CPU (machine busy %.1f%%);"
                     " load average at start %s, at end %s" % (wr["foreign_pct"], wr["machine_busy_pct"],
                                                               "/".join(m.get("loadavg_start", [])),
                                                               "/".join(wr["loadavg_end"])))
    steps = ", ".join("%s %.0f s" % (st["step"], st["secs"]) for st in m.get("steps", []))
    build = " (release build before it: %d s)" % m["build_secs"] if m.get("build_secs") is not None else ""
    lines.append("time: total %.0f s%s; %s" % (m.get("total_secs", 0), build, steps))
    if m.get("skipped"):
        lines.append("SKIPPED (time budget): %s" % ", ".join(m["skipped"]))
    if res.get("error"):
        lines.append("ERROR: %s" % res["error"].strip().splitlines()[-1])
    return "\n".join(lines)
