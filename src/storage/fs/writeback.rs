//! Writeback started while a file is still being written, so the fsync that makes it durable
//! at the end is short.
//!
//! Starting writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`) blocks while the disk's queue
//! is full, so it runs on a thread of its own: a disk slower than the network never slows the
//! stream that writes the file (the dirty pages wait in the page cache meanwhile).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc;

/// Writeback is asked for after this many new bytes.
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// The writeback of one file. Its thread starts with the first request (small files never
/// start one) and ends when this is dropped.
pub struct Writeback {
    state: State,
    asked: u64,
}

enum State {
    Idle(File),
    Running(mpsc::Sender<u64>),
    Failed,
}

impl Writeback {
    /// For `file` (a handle of its own: `try_clone` of the writer's).
    pub fn new(file: File) -> Writeback {
        Writeback { state: State::Idle(file), asked: 0 }
    }

    /// Tells the thread that the file has `len` bytes; asks for writeback once enough new
    /// bytes accumulated. Never waits.
    pub fn written(&mut self, len: u64) {
        if len.saturating_sub(self.asked) < WRITEBACK_EVERY {
            return;
        }
        self.asked = len;
        self.state = match std::mem::replace(&mut self.state, State::Failed) {
            State::Idle(file) => {
                let (tx, rx) = mpsc::channel::<u64>();
                let spawned = std::thread::Builder::new().name("writeback".into()).spawn(move || run(&file, rx));
                // Without the thread, the final fsync does all the work: slower, still correct.
                spawned.map_or(State::Failed, |_| State::Running(tx))
            }
            other => other,
        };
        if let State::Running(tx) = &self.state {
            let _ = tx.send(len);
        }
    }
}

fn run(file: &File, rx: mpsc::Receiver<u64>) {
    let mut done = 0u64;
    while let Ok(upto) = rx.recv() {
        // Requests that queued while the disk was busy become one.
        let upto = rx.try_iter().last().unwrap_or(upto);
        // From one window back: pages that were still on their way into the file when the
        // previous range was started.
        let from = done.saturating_sub(WRITEBACK_EVERY);
        start_writeback(file, from, upto.saturating_sub(from));
        done = done.max(upto);
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` back to disk without waiting.
fn start_writeback(file: &File, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    // SAFETY: a plain syscall on a valid, open file descriptor; it only schedules writeback.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}
