"""The summary table: each metric for upstream-direct, Distribution (proxy), Stevedore, the
Stevedore/Distribution ratio, the baseline Stevedore and the new/baseline ratio when one ran,
and the issue's target next to it."""

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


def _cost(runs, key="cpu_s_per_gb"):
    return _med([p.get(key) for p in _phases(runs)])


def _verified(runs, key="verified"):
    runs = runs or []
    return all(r.get(key) for r in runs) if runs else None


def summarize(res):
    """Rows of {key, label, values {col: value}, ratio (S/D), bratio (S/B), target, met}."""
    rows = []
    cols = COLS + (("baseline",) if res.get("baseline") or _get(res, "push", "baseline") else ())

    def add(key, label, vals, target=None, check=None, ratio=True, fmt="%.1f"):
        d, s, b = vals.get("distribution"), vals.get("stevedore"), vals.get("baseline")
        r = round(s / d, 2) if ratio and d and s is not None else None
        br = round(s / b, 2) if ratio and b and s is not None else None
        verdict = None
        if check is not None and s is not None:
            try:
                verdict = bool(check(vals, r))
            except TypeError:
                verdict = None
        rows.append({"key": key, "label": label, "values": vals, "ratio": r, "bratio": br, "target": target,
                     "met": verdict, "fmt": fmt})

    def per(fn):
        return {c: fn(res.get(c) or {}) for c in cols}

    # Pulls of `big` (one client, manifest by tag + every blob; bodies read without hashing,
    # verified after the clock stopped).
    direct_cold = _get(res, "direct", "pull", "cold")
    cold = per(lambda t: _med([r["mb_s"] for r in _get(t, "pull", "cold") or []]))
    add("pull_cold_mb_s", "pull big cold, MB/s", cold, "S >= 0.6 x direct",
        lambda v, r: v["stevedore"] >= 0.6 * v["direct"])
    add("pull_cold_cpu_gb", "  server CPU s/GB", per(lambda t: _cost(_get(t, "pull", "cold"))), fmt="%.2f")
    add("pull_cold_cpu_gb_idle", "  server CPU s/GB to idle (Distribution's background fill too)",
        per(lambda t: _cost(_get(t, "pull", "cold"), "cpu_s_per_gb_to_idle")), "S <= D",
        lambda v, r: r <= 1.0, fmt="%.2f")
    warm = per(lambda t: _med([r["mb_s"] for r in _get(t, "pull", "warm") or []]))
    warm["direct"] = cold["direct"]
    add("pull_warm_mb_s", "pull big warm, MB/s [direct: its only pull]", warm, "S >= 1.2 x D", lambda v, r: r >= 1.2)
    wc = per(lambda t: _cost(_get(t, "pull", "warm")))
    wc["direct"] = _cost(direct_cold)
    add("pull_warm_cpu_gb", "  server CPU s/GB", wc, fmt="%.2f")
    add("pull_verified", "  every body's sha256 and size (checked off the clock)",
        per(lambda t: _verified((_get(t, "pull", "cold") or []) + (_get(t, "pull", "warm") or []))),
        "all", lambda v, r: v["stevedore"] is True, ratio=False, fmt="%s")

    # Concurrent cold GETs of the big layer.
    add("conc_wall_s", "concurrent cold GETs of big layer: wall s",
        per(lambda t: _med([r["wall_s"] for r in t.get("concurrent") or []])), "S <= 0.5 x D",
        lambda v, r: r <= 0.5, fmt="%.2f")
    add("conc_mb_s", "  MB/s (all clients' bytes / wall)",
        per(lambda t: _med([r["bytes"] / r["wall_s"] / 1e6 for r in t.get("concurrent") or [] if r.get("wall_s")])),
        fmt="%.0f")
    add("conc_cpu_gb", "  server CPU s/GB (of all clients' bytes)", per(lambda t: _cost(t.get("concurrent"))),
        fmt="%.2f")
    add("conc_upstream_gets", "  upstream GETs of that blob (max)",
        per(lambda t: _max([r["upstream_gets"] for r in t.get("concurrent") or []])), "S == 1",
        lambda v, r: v["stevedore"] == 1, ratio=False, fmt="%d")
    add("conc_all_match", "  every client's sha256 and size (checked off the clock)",
        per(lambda t: _verified(t.get("concurrent"), "all_match")),
        "all", lambda v, r: v["stevedore"] is True, ratio=False, fmt="%s")

    # Loads.
    for key, label, target, check in (
        ("head_manifest", "HEAD manifest by tag (hey)", "S >= 10 x D", lambda v, r: r >= 10),
        ("head_blob", "HEAD blob (hey)", "S >= 1.2 x D", lambda v, r: r >= 1.2),
        ("get_manifest", "GET manifest by tag (wrk)", None, None),
    ):
        runs = lambda t: _get(t, "loads", key) or []  # noqa: E731
        add(key + "_rps", label + ": rps", per(lambda t: _med([r["rps"] for r in runs(t)])), target, check, fmt="%.0f")
        add(key + "_cpu_req", "  server CPU us/request", per(lambda t: _cost(runs(t), "cpu_us_per_req")), fmt="%.0f")
        add(key + "_p50", "  p50 ms", per(lambda t: _med([r["p50_ms"] for r in runs(t)])), fmt="%.2f")
        add(key + "_p99", "  p99 ms", per(lambda t: _med([r["p99_ms"] for r in runs(t)])), fmt="%.2f")
        up = per(lambda t: _sum([r["upstream_requests"] for r in runs(t)]))
        up["direct"] = None  # every request is an upstream request there
        add(key + "_upstream", "  upstream requests (all runs)", up,
            "S == 0" if key == "head_manifest" else None,
            (lambda v, r: v["stevedore"] == 0) if key == "head_manifest" else None, ratio=False, fmt="%d")
        add(key + "_errors", "  non-2xx / errors (all runs)", per(lambda t: _sum([_errors(r) for r in runs(t)])),
            ratio=False, fmt="%d")

    # skopeo copy of `many` (skopeo itself verifies every digest, inside the timing).
    for kind in ("cold", "warm"):
        add("skopeo_%s_s" % kind, "skopeo copy many %s, s" % kind,
            per(lambda t: _med([r["secs"] for r in _get(t, "skopeo", kind) or []])), fmt="%.2f")
        add("skopeo_%s_cpu_gb" % kind, "  server CPU s/GB", per(lambda t: _cost(_get(t, "skopeo", kind))), fmt="%.2f")

    # Push of `big` into empty registries, at equal durability first.
    push = res.get("push") or {}

    def pvals(skey, bkey, fn):
        return {"direct": None, "distribution": fn(push.get("distribution")), "stevedore": fn(push.get(skey)),
                "baseline": fn(push.get(bkey)) if "baseline" in cols else None}

    mbs = lambda runs: _med([r["mb_s"] for r in runs or []])  # noqa: E731
    add("push_mb_s", "push big, MB/s, no fsync [D = plain Distribution; S, B: fsync = false]",
        pvals("stevedore_nofsync", "baseline_nofsync", mbs), "S >= 1.2 x D", lambda v, r: r >= 1.2)
    add("push_cpu_gb", "  server CPU s/GB", pvals("stevedore_nofsync", "baseline_nofsync", _cost), fmt="%.2f")
    add("push_fsync_mb_s", "push big, MB/s, S and B with fsync = true (default) [D: no fsync]",
        pvals("stevedore", "baseline", mbs))
    add("push_fsync_cpu_gb", "  server CPU s/GB", pvals("stevedore", "baseline", _cost), fmt="%.2f")
    add("push_verified", "  pushed image pulled back, every sha256 (off the clock)",
        {"direct": None, "distribution": _verified(push.get("distribution")),
         "stevedore": _verified((push.get("stevedore") or []) + (push.get("stevedore_nofsync") or [])),
         "baseline": (_verified((push.get("baseline") or []) + (push.get("baseline_nofsync") or []))
                      if "baseline" in cols else None)},
        "all", lambda v, r: v["stevedore"] is True, ratio=False, fmt="%s")

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

    def push_runs(fn, default_key="stevedore"):
        return {"direct": None, "distribution": fn(_phases(push.get("distribution"))),
                "stevedore": fn(_phases(push.get(default_key))),
                "baseline": fn(_phases(push.get("baseline"))) if "baseline" in cols else None}

    phases = ("cold pull", "warm pull", "concurrent", "HEAD manifest", "HEAD blob", "GET manifest", "skopeo cold",
              "skopeo warm")
    mib = lambda v: {k: (x / 1024 if x else None) for k, x in v.items()}  # noqa: E731
    for ph in phases:
        vals = mib(per(lambda t: _max([p.get("peak_rss_kib") for p in _phases(phase_runs(t, ph))])))
        tgt = chk = None
        if ph in ("cold pull", "concurrent"):
            tgt, chk = "S <= 20 MiB", (lambda v, r: v["stevedore"] <= 20)
        add("rss_" + ph, "peak RSS MiB, %s" % ph, vals, tgt, chk)
    add("rss_push", "peak RSS MiB, push (fsync on)",
        mib(push_runs(lambda ps: _max([p.get("peak_rss_kib") for p in ps]))))
    for ph in phases:
        add("cpu_" + ph, "CPU s (median run), %s" % ph,
            per(lambda t: _med([p.get("cpu_s") for p in _phases(phase_runs(t, ph))])), fmt="%.2f")
    add("cpu_push", "CPU s (median run), push (fsync on)", push_runs(lambda ps: _med([p.get("cpu_s") for p in ps])),
        fmt="%.2f")

    # Noise: CPU used by processes that are not ours, as % of all CPUs, worst run.
    for ph in phases:
        add("noise_" + ph, "foreign CPU %% (worst run), %s" % ph,
            per(lambda t: _max([p.get("foreign_pct") for p in _phases(phase_runs(t, ph))])), ratio=False)
    add("noise_push", "foreign CPU % (worst run), push",
        {"direct": None,
         "distribution": _max([p.get("foreign_pct") for p in _phases(push.get("distribution"))]),
         "stevedore": _max([p.get("foreign_pct") for k in ("stevedore", "stevedore_nofsync")
                            for p in _phases(push.get(k))]),
         "baseline": (_max([p.get("foreign_pct") for k in ("baseline", "baseline_nofsync")
                            for p in _phases(push.get(k))]) if "baseline" in cols else None)}, ratio=False)

    extra = {"cols": list(cols)}
    nofs = res.get("stevedore_fsync_off")
    if nofs:
        extra["fsync_off"] = {
            "pull_cold_mb_s": _med([r["mb_s"] for r in _get(nofs, "pull", "cold") or []]),
            "pull_cold_cpu_gb": _cost(_get(nofs, "pull", "cold")),
            "pull_warm_mb_s": _med([r["mb_s"] for r in _get(nofs, "pull", "warm") or []]),
            "peak_rss_cold_mib": (_max([p.get("peak_rss_kib") for p in _phases(_get(nofs, "pull", "cold"))]) or 0) / 1024,
            "verified": _verified((_get(nofs, "pull", "cold") or []) + (_get(nofs, "pull", "warm") or [])),
        }
    s3 = res.get("stevedore_s3")
    if s3:
        extra["s3"] = _s3_rows(res.get("stevedore") or {}, push.get("stevedore"), s3)
    if res.get("tls_upstream"):
        extra["tls"] = _pair_rows(res["tls_upstream"], "upstream-tls")
    g = res.get("garage_s3")
    if g:
        extra["garage"] = {"error": g["error"]} if "error" in g else _pair_rows(g, "garage", s3=True)
    if res.get("floor"):
        extra["floor"] = _floor(res["floor"], "upstream")
    if _get(res, "tls_upstream", "floor"):
        extra["floor_tls"] = _floor(res["tls_upstream"]["floor"], "upstream-tls")
    vf = (extra.get("floor") or {}).get("verifying_floor")
    if g and "error" not in g and g.get("floor"):
        # bench/floor's verifying relays ran in the Garage rounds: a Stevedore fill on S3
        # spools locally and the bucket gets it at the commit, after the last byte.
        fl = dict(g["floor"], distribution=g.get("distribution") or {}, stevedore=g.get("stevedore") or {})
        extra["garage_floor_rounds"] = _floor(fl, "upstream")
        gv = extra["garage_floor_rounds"].get("verifying_floor")
        if gv:
            extra["garage_floor"] = {"target_mb_s": extra["garage_floor_rounds"]["target_mb_s"], "floor_mode": gv["mode"],
                                     "floor_from": "Garage rounds", "floor_mb_s": gv["mb_s"],
                                     "floor_over_target": extra["garage_floor_rounds"].get("floor_over_target"),
                                     "stevedore_over_floor": extra["garage_floor_rounds"].get("stevedore_over_floor")}
    elif g and "error" not in g and vf:
        # Without relays in its rounds: a proxy on S3 streams to its client what a proxy on a
        # file does, so the plaintext floor bounds its cold pull too.
        d = _med([r["mb_s"] for r in _get(g, "distribution", "pull", "cold") or []])
        st = _med([r["mb_s"] for r in _get(g, "stevedore", "pull", "cold") or []])
        if d and st:
            extra["garage_floor"] = {"target_mb_s": round(1.2 * d, 1), "floor_mode": vf["mode"],
                                     "floor_from": "plaintext floor rows",
                                     "floor_mb_s": vf["mb_s"], "floor_over_target": round(vf["mb_s"] / (1.2 * d), 2),
                                     "stevedore_over_floor": round(st / vf["mb_s"], 2)}
    return {"rows": rows, "extra": extra}


FLOOR_KEYS = ("distribution", "stevedore", "baseline", "relay", "seq", "pipe", "pipe3")
FLOOR_VERIFYING = ("seq", "pipe", "pipe3")


def _floor(fl, upstream):
    """The floor section (bench.py `measure_floor`): per target the median cold pull MB/s,
    the CPU per GB of the server, the upstream and the client, the machine's busy share; then
    the target (1.2 x Distribution), the verifying floor (the best of bench/floor's verifying
    modes) and Stevedore against both."""
    rows = []
    for k in FLOOR_KEYS:
        runs = _get(fl, k, "pull", "cold") or []
        if not runs:
            continue
        gb = lambda r: (r.get("bytes") or 0) / 1e9  # noqa: E731
        per_gb = lambda key: _med([r["phase"].get(key) / gb(r) for r in runs  # noqa: E731
                                   if gb(r) and r.get("phase", {}).get(key) is not None])
        rows.append({"key": k, "mb_s": _med([r["mb_s"] for r in runs]), "server_cpu_gb": _cost(runs),
                     "upstream_cpu_gb": per_gb(upstream + "_cpu_s"), "client_cpu_gb": per_gb("client_cpu_s"),
                     "busy_pct": _med([r["phase"].get("machine_busy_pct") for r in runs]),
                     "peak_rss_mib": (_max([r["phase"].get("peak_rss_kib") for r in runs]) or 0) / 1024 or None,
                     "foreign_pct": _max([r["phase"].get("foreign_pct") for r in runs]),
                     "verified": _verified(runs), "runs": len(runs)})
    by = {r["key"]: r for r in rows}
    d, st = (by.get("distribution") or {}).get("mb_s"), (by.get("stevedore") or {}).get("mb_s")
    for r in rows:
        r["x_d"] = round(r["mb_s"] / d, 2) if d and r["mb_s"] else None
    fl_rows = [by[k] for k in FLOOR_VERIFYING if k in by and by[k]["mb_s"]]
    best = max(fl_rows, key=lambda r: r["mb_s"]) if fl_rows else None
    out = {"rows": rows, "target_mb_s": round(1.2 * d, 1) if d else None}
    if best:
        out["verifying_floor"] = {"mode": best["key"], "mb_s": best["mb_s"]}
        if d:
            out["floor_over_target"] = round(best["mb_s"] / (1.2 * d), 2)
        if st:
            out["stevedore_over_floor"] = round(st / best["mb_s"], 2)
    return out


def _pair_rows(res, backend, s3=False):
    """Distribution against Stevedore in one extra setting (TLS upstream, S3 on Garage):
    [(label, distribution, stevedore, S/D, fmt)]. `backend`: the name whose CPU is shown
    (the TLS upstream's, or Garage's)."""
    d, st = res.get("distribution") or {}, res.get("stevedore") or {}
    mbs = lambda runs: _med([r["mb_s"] for r in runs or []])  # noqa: E731
    rss = lambda runs: (_max([p.get("peak_rss_kib") for p in _phases(runs)]) or 0) / 1024 or None  # noqa: E731
    idle = lambda runs: _med([p.get("cpu_s_per_gb_to_idle") for p in _phases(runs)])  # noqa: E731
    other = lambda runs: _med([p.get(backend + "_cpu_s") for p in _phases(runs)])  # noqa: E731
    s3req = lambda runs: _med([(r.get("s3_requests") or {}).get("total") for r in runs or []])  # noqa: E731
    out = []

    def add(label, a, b, fmt="%.1f", ratio=True):
        out.append((label, a, b, round(b / a, 2) if ratio and a and b is not None else None, fmt))

    for kind in ("cold", "warm"):
        a, b = _get(d, "pull", kind), _get(st, "pull", kind)
        if not a and not b:
            continue
        add("pull big %s, MB/s" % kind, mbs(a), mbs(b))
        add("  server CPU s/GB (to the last byte)", _cost(a), _cost(b), "%.2f")
        add("  server CPU s/GB (to idle: background work too)", idle(a), idle(b), "%.2f")
        add("  peak RSS MiB", rss(a), rss(b))
        add("  %s CPU s (median run)" % backend, other(a), other(b), "%.2f")
        if s3:
            add("  S3 requests per pulled image (to idle)", s3req(a), s3req(b), "%.0f")
        add("  every body's sha256 and size (off the clock)", _verified(a), _verified(b), "%s", False)
    a, b = d.get("concurrent") or [], st.get("concurrent") or []
    add("concurrent cold GETs of big layer: wall s", _med([r["wall_s"] for r in a]), _med([r["wall_s"] for r in b]),
        "%.2f")
    add("  server CPU s/GB (of all clients' bytes, to the last byte)", _cost(a), _cost(b), "%.2f")
    add("  server CPU s/GB (to idle)", idle(a), idle(b), "%.2f")
    add("  peak RSS MiB", rss(a), rss(b))
    add("  upstream GETs of that blob (max)", _max([r["upstream_gets"] for r in a]),
        _max([r["upstream_gets"] for r in b]), "%d", False)
    if s3:
        add("  S3 requests (to idle)", s3req(a), s3req(b), "%.0f")
    add("  every client's sha256 and size", _verified(a, "all_match"), _verified(b, "all_match"), "%s", False)
    a, b = d.get("push"), st.get("push")
    if a or b:
        add("push big, MB/s (Stevedore: fsync = true)", mbs(a), mbs(b))
        add("  server CPU s/GB", _cost(a), _cost(b), "%.2f")
        add("  peak RSS MiB", rss(a), rss(b))
        add("  %s CPU s (median run)" % backend, other(a), other(b), "%.2f")
        add("  S3 requests per push", s3req(a), s3req(b), "%.0f")
        add("  pushed image pulled back, every sha256", _verified(a), _verified(b), "%s", False)
    return out


def _table(lines, srows):
    """Appends `srows` (strings; the first row the heading, underlined) as columns: the first
    left-aligned, the others right-aligned."""
    w = [max(len(row[i]) for row in srows) for i in range(len(srows[0]))]
    for i, row in enumerate(srows):
        lines.append("  ".join(c.ljust(w[j]) if j == 0 else c.rjust(w[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * x for x in w))


def _render_pair(lines, title, rows):
    lines.append("")
    lines.append(title)
    srows = [("metric", "Distribution", "Stevedore", "S/D")] + [(lb, _fmt(a, fmt), _fmt(b, fmt), _fmt(r, "%.2f"))
                                                               for lb, a, b, r, fmt in rows]
    _table(lines, srows)


def _render_floor(lines, title, fl, repeat):
    lines.append("")
    lines.append("Floor of a cold pull (%s): bench/floor beside Distribution and Stevedore, cold pulls "
                 "interleaved, medians of %d; relay = copy only, seq/pipe/pipe3 = the least work of a fill that "
                 "verifies before the last byte and stores (sha256, a file, fsync)" % (title, repeat))
    head = ("target", "MB/s", "x D", "server CPU s/GB", "upstream CPU s/GB", "client CPU s/GB", "machine busy %",
            "peak RSS MiB", "verified")
    srows = [head] + [(r["key"], _fmt(r["mb_s"], "%.0f"), _fmt(r["x_d"], "%.2f"), _fmt(r["server_cpu_gb"], "%.2f"),
                       _fmt(r["upstream_cpu_gb"], "%.2f"), _fmt(r["client_cpu_gb"], "%.2f"), _fmt(r["busy_pct"], "%.0f"),
                       _fmt(r["peak_rss_mib"], "%.1f"), _fmt(r["verified"], "%s"))
                      for r in fl["rows"]]
    _table(lines, srows)
    vf = fl.get("verifying_floor")
    if vf:
        lines.append("  target 1.2 x D = %s MB/s; verifying floor (%s) %s MB/s = %s x the target; Stevedore = %s x "
                     "the floor" % (_fmt(fl.get("target_mb_s"), "%.0f"), vf["mode"], _fmt(vf["mb_s"], "%.0f"),
                                    _fmt(fl.get("floor_over_target"), "%.2f"),
                                    _fmt(fl.get("stevedore_over_floor"), "%.2f")))


def _s3_rows(fs, fs_push, s3):
    """Stevedore on the filesystem against Stevedore on S3 (moto), same binary, same run:
    [(label, fs, s3, s3/fs, fmt)]."""
    mbs = lambda runs: _med([r["mb_s"] for r in runs or []])  # noqa: E731
    rss = lambda runs: (_max([p.get("peak_rss_kib") for p in _phases(runs)]) or 0) / 1024 or None  # noqa: E731
    moto = lambda runs: _med([p.get("stevedore-s3-moto_cpu_s") for p in _phases(runs)])  # noqa: E731
    conc = lambda t: t.get("concurrent") or []  # noqa: E731
    out = []

    def add(label, f, s, fmt="%.1f", ratio=True):
        r = round(s / f, 2) if ratio and f and s is not None else None
        out.append((label, f, s, r, fmt))

    for kind in ("cold", "warm"):
        f, t = _get(fs, "pull", kind), _get(s3, "pull", kind)
        add("pull big %s, MB/s" % kind, mbs(f), mbs(t))
        add("  server CPU s/GB", _cost(f), _cost(t), "%.2f")
        add("  peak RSS MiB", rss(f), rss(t))
        add("  moto CPU s (median run)", None, moto(t), "%.2f", False)
    add("  every body's sha256 and size (off the clock)",
        _verified((_get(fs, "pull", "cold") or []) + (_get(fs, "pull", "warm") or [])),
        _verified((_get(s3, "pull", "cold") or []) + (_get(s3, "pull", "warm") or [])), "%s", False)
    add("concurrent cold GETs of big layer: wall s", _med([r["wall_s"] for r in conc(fs)]),
        _med([r["wall_s"] for r in conc(s3)]), "%.2f")
    add("  server CPU s/GB (of all clients' bytes)", _cost(conc(fs)), _cost(conc(s3)), "%.2f")
    add("  peak RSS MiB", rss(conc(fs)), rss(conc(s3)))
    add("  upstream GETs of that blob (max)", _max([r["upstream_gets"] for r in conc(fs)]),
        _max([r["upstream_gets"] for r in conc(s3)]), "%d", False)
    add("  every client's sha256 and size", _verified(conc(fs), "all_match"), _verified(conc(s3), "all_match"),
        "%s", False)
    p = s3.get("push")
    add("push big (fsync = true), MB/s", mbs(fs_push), mbs(p))
    add("  server CPU s/GB", _cost(fs_push), _cost(p), "%.2f")
    add("  peak RSS MiB", rss(fs_push), rss(p))
    add("  moto CPU s (median run)", None, moto(p), "%.2f", False)
    add("  pushed image pulled back, every sha256", _verified(fs_push), _verified(p), "%s", False)
    return out


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
    base = "baseline" in s["extra"].get("cols", [])
    lines = []
    head = ["metric", "direct", "Distribution", "Stevedore", "S/D"] + (["Baseline", "S/B"] if base else []) + \
        ["target", "met"]
    nright = len(head) - 2  # numeric columns are right-aligned
    rows = [head]
    for r in s["rows"]:
        v = r["values"]
        row = [r["label"], _fmt(v.get("direct"), r["fmt"]), _fmt(v.get("distribution"), r["fmt"]),
               _fmt(v.get("stevedore"), r["fmt"]), _fmt(r["ratio"], "%.2f")]
        if base:
            row += [_fmt(v.get("baseline"), r["fmt"]), _fmt(r["bratio"], "%.2f")]
        row += [r["target"] or "", "" if r["met"] is None else ("yes" if r["met"] else "NO")]
        rows.append(row)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    p = m["params"]
    lines.append("Stevedore benchmark  %s  (%s)" % (m.get("started"), m["versions"].get("stevedore_git")))
    lines.append("big = %d MiB layer + 2 small; medians of %d runs (concurrent: %d runs of %d clients; loads: %d x %d s,"
                 " %d connections); each cold run starts from an empty cache"
                 % (p["big_mib"], p["repeat"], p["conc_repeat"], p["concurrent"], p["load_repeat"], p["load_secs"],
                    p["conns"]))
    lines.append("direct = the upstream Distribution itself; Distribution = Distribution in proxy mode "
                 "(push rows: a plain Distribution); MB = 10^6 bytes, GB = 10^9 bytes")
    b = m["versions"].get("baseline")
    if base and b:
        what = ("built from %s (%s: %s)" % (b["rev"], b["commit"][:10], b.get("subject", "")) if b.get("rev")
                else "binary %s" % b["binary"])
        lines.append("Baseline = Stevedore %s, same config; medians of %d runs of pulls, concurrent and push; "
                     "S/B = new / baseline (lower is better for s, ms, CPU)" % (what, min(p["repeat"], p["baseline_repeat"])))
    lines.append("")
    for i, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(widths[j]) if j == 0 else str(c).rjust(widths[j]) if j < nright
                               else str(c).ljust(widths[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Timed clients do not hash: bodies go straight into pre-allocated buffers (or are dropped when those "
                 "would not fit in memory, then GET again); sha256 and sizes are checked after the clock stops.")
    lines.append("server CPU s/GB = utime+stime of the process under test during the phase / GB of bodies it served "
                 "(pushes: received); us/request likewise for the loads. peak RSS = VmHWM, reset at the start of each "
                 "phase (clear_refs 5); direct column = the upstream process.")
    lines.append("foreign CPU = machine CPU (/proc/stat) minus the servers we run and this benchmark with its tools, "
                 "as %% of %d CPUs." % m["versions"].get("cpus", 0))
    fo = s["extra"].get("fsync_off")
    if fo:
        rows_by = {r["key"]: r for r in s["rows"]}
        lines.append("for information, Stevedore pull with storage.fsync = false: cold %s MB/s, %s CPU s/GB (fsync on: "
                     "%s MB/s), warm %s MB/s, peak RSS cold %s MiB, verified %s"
                     % (_fmt(fo["pull_cold_mb_s"], "%.0f"), _fmt(fo["pull_cold_cpu_gb"], "%.2f"),
                        _fmt(rows_by["pull_cold_mb_s"]["values"]["stevedore"], "%.0f"),
                        _fmt(fo["pull_warm_mb_s"], "%.0f"), _fmt(fo["peak_rss_cold_mib"], "%.1f"),
                        _fmt(fo["verified"], "%s")))
    s3 = s["extra"].get("s3")
    if s3:
        lines.append("")
        lines.append("S3 backend: the same Stevedore with backend = \"s3\" on moto_server (in-memory, Python; one bucket, "
                     "restarted empty with every cold run), beside Stevedore on the filesystem from the table above; "
                     "medians of %d runs (concurrent: 1)" % p["s3_repeat"])
        srows = [("metric", "fs", "S3", "S3/fs")] + [(lb, _fmt(f, fmt), _fmt(v, fmt), _fmt(r, "%.2f"))
                                                     for lb, f, v, r, fmt in s3]
        _table(lines, srows)
        lines.append("")
    for key, title in (("floor", "plaintext upstream"), ("floor_tls", "TLS upstream")):
        if s["extra"].get(key):
            _render_floor(lines, title, s["extra"][key], p.get("floor_repeat", 0))
    if s["extra"].get("tls"):
        _render_pair(lines, "TLS upstream: the upstream Distribution over HTTPS (test CA, EC P-256 leaf); Distribution "
                     "trusts it by SSL_CERT_FILE, Stevedore by upstreams.ca_file; medians of %d runs (cold only)"
                     % p.get("tls_repeat", 0), s["extra"]["tls"])
    g = s["extra"].get("garage")
    if g:
        if isinstance(g, dict):
            lines.append("")
            lines.append("S3 on Garage: NOT RUN: %s" % g["error"])
        else:
            _render_pair(lines, "S3 on Garage 2.5 (a real S3 server, single node on 127.0.0.1, a new bucket per start): "
                         "Distribution's s3 driver (redirect off) vs Stevedore backend = \"s3\"; medians of %d runs "
                         "(concurrent: 1); push: a plain Distribution" % p.get("garage_repeat", 0), g)
            if s["extra"].get("garage_floor_rounds"):
                _render_floor(lines, "Garage rounds: the verifying relays interleaved with the cold pulls above",
                              s["extra"]["garage_floor_rounds"], p.get("garage_repeat", 0))
            gf = s["extra"].get("garage_floor")
            # The floor rounds print their verdict; without them, the plaintext floor's.
            if gf and not s["extra"].get("garage_floor_rounds"):
                lines.append("  cold pull on Garage: target 1.2 x D = %s MB/s; verifying floor (%s, %s) %s MB/s = %s x "
                             "the target; Stevedore on Garage = %s x the floor"
                             % (_fmt(gf["target_mb_s"], "%.0f"), gf.get("floor_from", "plaintext floor rows"),
                                gf["floor_mode"], _fmt(gf["floor_mb_s"], "%.0f"),
                                _fmt(gf["floor_over_target"], "%.2f"), _fmt(gf["stevedore_over_floor"], "%.2f")))
    lines.append("")
    ck = m.get("config_keys") or {}
    if any(not v.get("local_namespaces") for v in ck.values()):
        lines.append("config: [proxy] local_namespaces left out for %s (the binary refuses the key)"
                     % ", ".join(k for k, v in ck.items() if not v.get("local_namespaces")))
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
