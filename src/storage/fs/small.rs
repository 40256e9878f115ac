//! Small-file reads (tags, revision links, access records, manifests) and existence checks on
//! the calling (async) thread when the kernel can answer from its caches, the way
//! [`super::read`] reads blob bytes: the path is resolved with `openat2(RESOLVE_CACHED)`
//! (fails with `EAGAIN` rather than read a directory from disk) and the bytes are read with
//! `preadv2(RWF_NOWAIT)` (fails rather than wait for the disk). Only what would wait moves to
//! the blocking pool, in one hop. A cache hit's lookups so cost a few syscalls and no thread
//! hand-off: `HEAD` of a cached manifest by tag made six blocking-pool round trips before.
//!
//! Whatever the answer, it is the file's: a fast path that cannot answer says
//! [`Cached::WouldBlock`], never a guess.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Largest file read on the async thread (larger ones take the blocking pool: a copy this
/// size out of the page cache is a few microseconds).
pub const MAX_CACHED_READ: usize = 256 << 10;

/// Cleared the first time the kernel (or a seccomp filter) refuses `openat2` or one of the
/// flags: from then on everything takes the blocking pool.
static FAST: AtomicBool = AtomicBool::new(true);

/// The answer of a fast path: the result, or "would have to wait" (ask the blocking pool).
#[derive(Debug)]
pub enum Cached<T> {
    Ready(io::Result<T>),
    WouldBlock,
}

/// A file's size and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub len: u64,
    pub modified: SystemTime,
}

/// `path` as the blocking fallbacks take it.
pub fn as_path(path: &CStr) -> &Path {
    Path::new(OsStr::from_bytes(path.to_bytes()))
}

/// Opens `path` if every component is in the kernel's lookup cache. `O_PATH` for a stat only.
fn open(c: &CStr, flags: libc::c_int) -> Cached<OwnedFd> {
    if !FAST.load(Ordering::Relaxed) {
        return Cached::WouldBlock;
    }
    // SAFETY: `open_how` is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_CACHED;
    loop {
        // SAFETY: `c` is a NUL-terminated path and `how` a valid `open_how` of the size passed;
        // the kernel reads both and returns a new descriptor or an error.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                libc::AT_FDCWD,
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a descriptor the kernel just returned, owned by nobody else.
            return Cached::Ready(Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Cached::WouldBlock,
            // No openat2 (kernel < 5.6, or filtered), or no RESOLVE_CACHED (< 5.12).
            Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EINVAL) | Some(libc::E2BIG) => {
                FAST.store(false, Ordering::Relaxed);
                return Cached::WouldBlock;
            }
            _ => return Cached::Ready(Err(e)),
        }
    }
}

fn fstat(fd: &OwnedFd) -> io::Result<Stat> {
    // SAFETY: `st` is written by the kernel before it is read; `fd` is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Stat { len: st.st_size as u64, modified: system_time(st.st_mtime, st.st_mtime_nsec) })
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let ns = Duration::from_nanos(nsecs.clamp(0, 999_999_999) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + ns
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + ns
    }
}

/// Size and modification time of `path` (following symlinks, like `metadata`).
pub fn stat(path: &CStr) -> Cached<Stat> {
    match open(path, libc::O_PATH) {
        Cached::Ready(Ok(fd)) => Cached::Ready(fstat(&fd)),
        Cached::Ready(Err(e)) => Cached::Ready(Err(e)),
        Cached::WouldBlock => Cached::WouldBlock,
    }
}

/// The whole of a file of at most [`MAX_CACHED_READ`] bytes, with its modification time.
/// `WouldBlock` when the path, the inode or any page is not cached, or the file is larger.
pub fn read(path: &CStr) -> Cached<(Bytes, SystemTime)> {
    let fd = match open(path, libc::O_RDONLY) {
        Cached::Ready(Ok(fd)) => fd,
        Cached::Ready(Err(e)) => return Cached::Ready(Err(e)),
        Cached::WouldBlock => return Cached::WouldBlock,
    };
    let st = match fstat(&fd) {
        Ok(st) => st,
        Err(e) => return Cached::Ready(Err(e)),
    };
    let len = st.len as usize;
    if len > MAX_CACHED_READ {
        return Cached::WouldBlock;
    }
    // One byte more than the size: a file that grew since the stat is left to the slow path.
    let mut buf = vec![0u8; len + 1];
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let got = loop {
        // SAFETY: the iovec covers `buf`, writable for its length; the kernel writes at most
        // that many bytes and reports how many.
        let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Cached::WouldBlock,
            Some(libc::EOPNOTSUPP) => {
                FAST.store(false, Ordering::Relaxed);
                return Cached::WouldBlock;
            }
            _ => return Cached::Ready(Err(e)),
        }
    };
    // Short (a page not cached: RWF_NOWAIT stops there) or longer than the stat said: the
    // blocking path decides.
    if got != len {
        return Cached::WouldBlock;
    }
    buf.truncate(len);
    Cached::Ready(Ok((Bytes::from(buf), st.modified)))
}

/// Opens `path` for reading if that needs no disk access for the lookup.
pub fn open_read(path: &CStr) -> Cached<File> {
    match open(path, libc::O_RDONLY) {
        Cached::Ready(r) => Cached::Ready(r.map(File::from)),
        Cached::WouldBlock => Cached::WouldBlock,
    }
}

/// The slow path of [`read`] (any size), for the blocking pool: one open, one stat, the reads.
pub fn read_blocking(path: &Path) -> io::Result<(Bytes, SystemTime)> {
    use std::io::Read as _;
    let mut f = File::open(path)?;
    let m = f.metadata()?;
    let mut buf = Vec::with_capacity(m.len() as usize);
    f.read_to_end(&mut buf)?;
    Ok((Bytes::from(buf), m.modified().unwrap_or(UNIX_EPOCH)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn c(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    fn ready<T: std::fmt::Debug>(c: Cached<T>) -> io::Result<T> {
        match c {
            Cached::Ready(r) => r,
            Cached::WouldBlock => {
                panic!("a file just written is in the caches (kernel without openat2 RESOLVE_CACHED?)")
            }
        }
    }

    #[test]
    fn reads_and_stats_match_the_blocking_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a").join("tag");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"sha256:abc").unwrap();

        let (bytes, t) = ready(read(&c(&p))).unwrap();
        assert_eq!(&bytes[..], b"sha256:abc");
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(t, m.modified().unwrap());
        assert_eq!(read_blocking(&p).unwrap(), (bytes, t));
        assert_eq!(ready(stat(&c(&p))).unwrap(), Stat { len: 10, modified: m.modified().unwrap() });
        // Directories exist too (a repository's tree).
        assert!(ready(stat(&c(p.parent().unwrap()))).is_ok());

        // Empty files (blob links) read as empty.
        let empty = dir.path().join("link");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(&ready(read(&c(&empty))).unwrap().0[..], b"");

        // Absent files, and absent directories on the way, are NotFound, as std reports them.
        for missing in [dir.path().join("nope"), dir.path().join("no/such/dir/file")] {
            let _ = std::fs::metadata(&missing);
            for e in [ready(read(&c(&missing))).unwrap_err(), ready(stat(&c(&missing))).unwrap_err()] {
                assert_eq!(e.kind(), io::ErrorKind::NotFound, "{missing:?}");
            }
        }

        // A replaced file reads as its new content, and an open file keeps the old one.
        let f = ready(open_read(&c(&p))).unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, b"sha256:def").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_eq!(&ready(read(&c(&p))).unwrap().0[..], b"sha256:def");
        let mut old = String::new();
        std::io::Read::read_to_string(&mut &f, &mut old).unwrap();
        assert_eq!(old, "sha256:abc");
    }

    #[test]
    fn large_files_take_the_slow_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        let data = vec![7u8; MAX_CACHED_READ + 1];
        std::fs::write(&p, &data).unwrap();
        assert!(matches!(read(&c(&p)), Cached::WouldBlock));
        assert_eq!(read_blocking(&p).unwrap().0.len(), data.len());
        let at_max = dir.path().join("max");
        std::fs::write(&at_max, &data[..MAX_CACHED_READ]).unwrap();
        assert_eq!(ready(read(&c(&at_max))).unwrap().0.len(), MAX_CACHED_READ);
    }
}
