//! The test side of the binary's named pause points (`src/hooks.rs`, cargo feature
//! `test-hooks`): start a process with `STEVEDORE_PAUSE=name` (and, where the store is not a
//! directory, `STEVEDORE_PAUSE_DIR`), wait until it reached the point, run the other
//! operation, then let it go.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A pause directory (`<root>/.pause` for a filesystem store).
#[derive(Clone, Debug)]
pub struct Pauses {
    dir: PathBuf,
}

impl Pauses {
    pub fn in_dir(dir: &Path) -> Pauses {
        Pauses { dir: dir.to_path_buf() }
    }

    /// The pause directory of a filesystem store at `root`.
    pub fn of_root(root: &Path) -> Pauses {
        Pauses::in_dir(&root.join(".pause"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_reached(&self, name: &str) -> bool {
        self.dir.join(format!("{name}.reached")).exists()
    }

    /// Waits until a process paused at `name`; panics after `limit`.
    pub async fn reached(&self, name: &str, limit: Duration) {
        let start = Instant::now();
        while !self.is_reached(name) {
            assert!(
                start.elapsed() < limit,
                "pause point {name} not reached within {limit:?} ({})",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Makes the next pass through `name` pause (a point the process was started with in
    /// `STEVEDORE_PAUSE_ON_ARM`).
    pub fn arm(&self, name: &str) {
        std::fs::create_dir_all(&self.dir).unwrap();
        std::fs::write(self.dir.join(format!("{name}.arm")), b"").unwrap();
    }

    /// Lets the process paused at `name` go on, and waits until it has.
    pub async fn go(&self, name: &str) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let go = self.dir.join(format!("{name}.go"));
        std::fs::write(&go, b"").unwrap();
        let start = Instant::now();
        while go.exists() {
            assert!(start.elapsed() < Duration::from_secs(30), "pause point {name} was not resumed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
