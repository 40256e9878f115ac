"""The baseline Stevedore: a second binary, built from a given commit, measured in the same run
as the new one so that "does not regress" is a ratio from one run on one machine.

`BENCH_BASELINE_BIN=/path` uses a binary as it is. `BENCH_BASELINE=<git rev>` builds the
commit's `stevedore` once and caches it by full commit hash in `bench/.baseline/<sha>/stevedore`
(git-ignored): the source is `git archive`d into a temporary directory (no worktree is
registered) and built as that commit ships it (`cargo build --profile dist --locked --bin
stevedore` when its Cargo.toml has the `dist` profile, `--release` before) with its own
target directory, `bench/.baseline/target`, shared by every baseline commit (so a second
commit only recompiles what changed). The first build of that target directory is seeded
with the dependencies already compiled in the repository's `target/<profile>` when there are
any, otherwise it is a cold build (about 6 minutes on 2 cores). The build is not part of the
benchmark's time budget.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
REPO = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".baseline")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _git(*args):
    return subprocess.run(["git", "-C", REPO] + list(args), capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def _seed(target, profile):
    """Copies the repository's dependencies compiled for `profile` into the baseline target
    dir when it has none for that profile yet (cargo reuses a registry crate's artifacts when
    its fingerprint matches; the workspace crate itself is rebuilt)."""
    src = os.path.join(REPO, "target", profile)
    dst = os.path.join(target, profile)
    if os.path.isdir(dst) or not os.path.isdir(os.path.join(src, "deps")):
        return
    os.makedirs(dst)
    for sub in ("deps", "build", ".fingerprint"):
        if os.path.isdir(os.path.join(src, sub)):
            subprocess.run(["cp", "-a", os.path.join(src, sub), dst], check=True, timeout=600)


def resolve():
    """Returns {"binary", "rev", "commit", "build_secs"} for the configured baseline, or None."""
    given = os.environ.get("BENCH_BASELINE_BIN")
    if given:
        if not os.access(given, os.X_OK):
            raise RuntimeError("BENCH_BASELINE_BIN=%s is not an executable" % given)
        return {"binary": os.path.abspath(given), "rev": None, "commit": None, "build_secs": None}
    rev = os.environ.get("BENCH_BASELINE")
    if not rev:
        return None
    sha = _git("rev-parse", "--verify", "%s^{commit}" % rev)
    out_dir = os.path.join(CACHE, sha)
    binary = os.path.join(out_dir, "stevedore")
    info = {"binary": binary, "rev": rev, "commit": sha, "subject": _git("log", "-1", "--format=%s", sha)[:120],
            "build_secs": None}
    if os.access(binary, os.X_OK):
        log("baseline %s (%s): cached %s" % (rev, sha[:10], binary))
        return info
    target = os.path.join(CACHE, "target")
    src = tempfile.mkdtemp(prefix="stevedore-baseline-src-")
    t0 = time.monotonic()
    try:
        log("baseline %s (%s): building into %s (target dir %s)" % (rev, sha[:10], binary, target))
        archive = subprocess.Popen(["git", "-C", REPO, "archive", "--format=tar", sha], stdout=subprocess.PIPE)
        # -m: the files get the current time, not the commit's, so cargo never takes the
        # seeded (newer) artifacts of the workspace crate for this commit's.
        subprocess.run(["tar", "-x", "-m", "-C", src], stdin=archive.stdout, check=True, timeout=300)
        archive.stdout.close()
        if archive.wait(timeout=60) != 0:
            raise RuntimeError("git archive %s failed" % sha)
        env = dict(os.environ, CARGO_TARGET_DIR=target)
        with open(os.path.join(src, "Cargo.toml")) as f:
            profile = "dist" if "[profile.dist]" in f.read() else "release"
        _seed(target, profile)
        subprocess.run(["cargo", "build", "--profile", profile, "--locked", "--bin", "stevedore"], cwd=src, env=env,
                       check=True, timeout=3600)
        os.makedirs(out_dir, exist_ok=True)
        tmp = binary + ".tmp"
        shutil.copy2(os.path.join(target, profile, "stevedore"), tmp)
        os.replace(tmp, binary)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    info["build_secs"] = round(time.monotonic() - t0)
    log("baseline %s: built in %d s" % (rev, info["build_secs"]))
    return info
