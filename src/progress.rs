//! Progress of long CLI work (`prefetch`, `export`, `import`, `gc`, `fsck`): on a terminal an
//! `indicatif` spinner with the elapsed time, the items done and the latest line; otherwise
//! (a pipe, a file, a CI log) nothing but the plain lines the commands always print.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A spinner while `what` runs, when stdout and stderr are terminals; else nothing.
pub struct Progress {
    bar: Option<ProgressBar>,
    /// A line not yet complete (`Write` may get a line in pieces).
    pending: Vec<u8>,
}

impl Progress {
    pub fn start(what: &str) -> Progress {
        let terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        Progress::new(what, terminal)
    }

    fn new(what: &str, terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed_precise}] {pos} done {wide_msg}")
                    .expect("a valid template"),
            );
            bar.set_prefix(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress { bar, pending: Vec::new() }
    }

    /// A counter of the items (blobs) the work does and their bytes, shown on the bar.
    pub fn tally(&self) -> Tally {
        Tally { bar: self.bar.clone(), bytes: Arc::default() }
    }

    /// Whether a bar is shown.
    pub fn is_shown(&self) -> bool {
        self.bar.is_some()
    }

    /// One line of output: printed above the bar (and counted) on a terminal, else to stdout.
    pub fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(line.trim().to_string());
                bar.println(line);
            }
            None => println!("{line}"),
        }
    }

    /// Removes the bar (the plain summary follows).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
            self.line(&rest);
        }
        self.finish();
    }
}

/// Items and bytes done, for a [`Progress`] bar; does nothing without a bar (off a
/// terminal, or [`Tally::default`] for work no person watches). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    bar: Option<ProgressBar>,
    bytes: Arc<AtomicU64>,
}

impl Tally {
    /// One item of `bytes` done.
    pub fn add(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
            bar.inc(1);
            bar.set_message(format!("({})", HumanBytes(total)));
        }
    }
}

/// Lines written (by `prefetch`) go through [`Progress::line`].
impl Write for Progress {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=at).collect();
            self.line(String::from_utf8_lossy(&line[..line.len() - 1]).as_ref());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.bar.is_none() {
            std::io::stdout().flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_bar_off_a_terminal_and_lines_split() {
        let mut p = Progress::new("test", false);
        assert!(!p.is_shown());
        p.write_all(b"one\ntw").unwrap();
        assert_eq!(p.pending, b"tw");
        p.write_all(b"o\n").unwrap();
        assert!(p.pending.is_empty());
        // Off a terminal a tally counts nothing anyone sees, and costs nothing.
        let t = p.tally();
        t.add(10);
        assert_eq!(t.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_tally_counts_items_and_bytes_on_the_bar() {
        let p = Progress::new("test", true);
        let t = p.tally();
        t.clone().add(1024);
        t.add(2048);
        let bar = p.bar.as_ref().unwrap();
        assert_eq!(bar.position(), 2);
        assert_eq!(bar.message(), "(3.00 KiB)");
    }
}
