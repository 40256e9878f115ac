//! Named pause points for tests that make races deterministic (cargo feature `test-hooks`).
//!
//! A process started with `STEVEDORE_PAUSE=name,…` stops at the first pass through each named
//! point: it creates `<dir>/<name>.reached` and waits (asynchronously: nothing else in the
//! process is held up) until `<dir>/<name>.go` exists, then removes both and goes on. Later
//! passes through the same point go straight on. `<dir>` is `STEVEDORE_PAUSE_DIR`, else
//! `<storage.root>/.pause` (set by [`init`] when a process opens its store).
//!
//! Without the feature, [`pause`] is an empty inline function: release builds carry nothing.
//!
//! Points (grep `hooks::pause(`) are named `<operation>.<step>`, e.g. `commit.after_publish`.
//!
//! A point named in `STEVEDORE_PAUSE_ON_ARM=name,…` pauses instead at each pass made while
//! `<dir>/<name>.arm` exists (the test writes it; the pass removes it): "the next pass after
//! now", for points passed many times before the one a test is about.
//!
//! Failure points do what a pause cannot: make a write fail (stand in for EIO). A process
//! started with `STEVEDORE_FAIL=name@N,…` gets `true` from [`fail`] at the Nth pass through
//! `name` (`name` alone: the first), and only then; the caller returns its layer's error.
//! Points (grep `hooks::fail(`) are named like pause points, e.g. `import.commit_repo`.

#[cfg(feature = "test-hooks")]
mod imp {
    use std::collections::{HashMap, HashSet};
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    struct Hooks {
        dir: Mutex<Option<PathBuf>>,
        /// Points still to pause at (each pauses once).
        armed: Mutex<HashSet<String>>,
        /// Points that pause at a pass while their `.arm` file exists.
        on_arm: HashSet<String>,
    }

    fn names(var: &str) -> HashSet<String> {
        std::env::var(var)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn hooks() -> &'static Hooks {
        static H: OnceLock<Hooks> = OnceLock::new();
        H.get_or_init(|| Hooks {
            dir: Mutex::new(std::env::var_os("STEVEDORE_PAUSE_DIR").map(PathBuf::from)),
            armed: Mutex::new(names("STEVEDORE_PAUSE")),
            on_arm: names("STEVEDORE_PAUSE_ON_ARM"),
        })
    }

    /// Failure points: name → (the pass that fails, passes so far).
    fn failures() -> &'static Mutex<HashMap<String, (u64, u64)>> {
        static F: OnceLock<Mutex<HashMap<String, (u64, u64)>>> = OnceLock::new();
        F.get_or_init(|| {
            let spec = std::env::var("STEVEDORE_FAIL").unwrap_or_default();
            let mut points = HashMap::new();
            for p in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (name, nth) = match p.split_once('@') {
                    Some((name, n)) => (name, n.parse().expect("STEVEDORE_FAIL: name@N with N a pass number")),
                    None => (p, 1),
                };
                points.insert(name.to_string(), (nth, 0));
            }
            Mutex::new(points)
        })
    }

    /// Whether the named failure point fails this pass.
    pub fn fail(name: &str) -> bool {
        let mut points = failures().lock().unwrap();
        let Some((nth, seen)) = points.get_mut(name) else { return false };
        *seen += 1;
        let fails = *seen == *nth;
        if fails {
            tracing::warn!(point = name, pass = *seen, "failing at a test failure point");
        }
        fails
    }

    pub fn init(root: &std::path::Path) {
        let mut dir = hooks().dir.lock().unwrap();
        if dir.is_none() {
            *dir = Some(root.join(".pause"));
        }
    }

    /// The `.go` file to wait for, once `.reached` is written; `None`: go straight on.
    fn arrive(name: &str) -> Option<(PathBuf, PathBuf)> {
        let h = hooks();
        let once = h.armed.lock().unwrap().remove(name);
        if !once && !h.on_arm.contains(name) {
            return None;
        }
        let Some(dir) = h.dir.lock().unwrap().clone() else {
            eprintln!("stevedore: pause point {name} armed but no pause directory (STEVEDORE_PAUSE_DIR)");
            return None;
        };
        // Only the pass that removes the `.arm` file pauses.
        if !once && std::fs::remove_file(dir.join(format!("{name}.arm"))).is_err() {
            return None;
        }
        let _ = std::fs::create_dir_all(&dir);
        let reached = dir.join(format!("{name}.reached"));
        let go = dir.join(format!("{name}.go"));
        std::fs::write(&reached, std::process::id().to_string()).expect("writing a pause point's .reached file");
        tracing::warn!(point = name, "paused at a test pause point");
        Some((reached, go))
    }

    fn leave(name: &str, reached: PathBuf, go: PathBuf) {
        let _ = std::fs::remove_file(&go);
        let _ = std::fs::remove_file(&reached);
        tracing::warn!(point = name, "resumed from a test pause point");
    }

    pub async fn pause(name: &str) {
        let Some((reached, go)) = arrive(name) else { return };
        while !go.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        leave(name, reached, go);
    }

    /// [`pause`] for code on the blocking pool (the thread waits).
    pub fn pause_blocking(name: &str) {
        let Some((reached, go)) = arrive(name) else { return };
        while !go.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        leave(name, reached, go);
    }
}

#[cfg(feature = "test-hooks")]
pub use imp::{fail, init, pause, pause_blocking};

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn init(_root: &std::path::Path) {}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub async fn pause(_name: &str) {}

/// Whether the named failure point fails this pass (never, without the feature).
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn fail(_name: &str) -> bool {
    false
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn pause_blocking(_name: &str) {}

/// The serving runtime's bound on blocking-pool threads, for tests that show no client can
/// hold them all (`STEVEDORE_TEST_MAX_BLOCKING_THREADS`); Tokio's default (512) otherwise,
/// and always without the feature.
pub fn max_blocking_threads() -> Option<usize> {
    if cfg!(feature = "test-hooks") {
        std::env::var("STEVEDORE_TEST_MAX_BLOCKING_THREADS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0)
    } else {
        None
    }
}
