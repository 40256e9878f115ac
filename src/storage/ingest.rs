//! Digest-verifying ingest: bytes are hashed on the way into a file under `ingest/`, and only
//! [`Store::commit_ingest`](super::Store::commit_ingest) moves a verified file into `blobs/`.

use std::fs::File;
use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::Writeback;
use crate::oci::{Algorithm, Digest, Hasher};

/// Received chunks are handed to the blocking pool in batches of about this size: one thread
/// hop, one hashing pass and one vectored write per batch, no copy in user space.
const BATCH_BYTES: usize = 1 << 20;

/// The file and the running hash, owned by whoever works on them: the `Ingest` itself, or the
/// blocking-pool job hashing and writing the batch in flight.
struct Sink {
    file: File,
    hasher: Hasher,
}

/// An open ingest file: everything written so far is `size` bytes whose running hash is `hasher`.
///
/// Writes are pipelined: while one batch is hashed and written on the blocking pool, the next
/// one is collected from the network. At most one batch is in flight.
pub struct Ingest {
    path: PathBuf,
    /// `None` while a batch is in flight.
    sink: Option<Sink>,
    in_flight: Option<JoinHandle<(Sink, std::io::Result<()>)>>,
    batch: Vec<Bytes>,
    batch_bytes: usize,
    /// Bytes accepted, including the batch being collected and the one in flight.
    size: u64,
    /// Bytes in the file (the batches written).
    written: u64,
    /// Set when the file will be fsynced: its writeback starts as it grows.
    writeback: Option<Writeback>,
}

impl Ingest {
    /// Creates (or truncates) `path` and starts hashing with `alg`. `durable`: the file will
    /// be fsynced, so writeback starts while it is written.
    pub async fn create(path: &Path, alg: Algorithm, durable: bool) -> std::io::Result<Ingest> {
        let owned = path.to_path_buf();
        let file =
            blocking(move || std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(owned)).await?;
        Ingest::wrap(path, file, Hasher::new(alg), 0, durable)
    }

    /// Reopens `path` at `size` bytes with a restored hash state. Bytes past `size` (a chunk
    /// that was being written when the process died) are cut off; a file shorter than `size`
    /// cannot be resumed.
    pub async fn resume(path: &Path, hasher: Hasher, size: u64, durable: bool) -> std::io::Result<Ingest> {
        let owned = path.to_path_buf();
        let file = blocking(move || {
            let mut file = std::fs::OpenOptions::new().write(true).open(owned)?;
            let len = file.metadata()?.len();
            if len < size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("ingest file has {len} bytes, state says {size}"),
                ));
            }
            if len > size {
                file.set_len(size)?;
            }
            file.seek(SeekFrom::Start(size))?;
            Ok(file)
        })
        .await?;
        Ingest::wrap(path, file, hasher, size, durable)
    }

    fn wrap(path: &Path, file: File, hasher: Hasher, size: u64, durable: bool) -> std::io::Result<Ingest> {
        let writeback = if durable { Some(Writeback::new(file.try_clone()?)) } else { None };
        Ok(Ingest {
            path: path.to_path_buf(),
            sink: Some(Sink { file, hasher }),
            in_flight: None,
            batch: Vec::new(),
            batch_bytes: 0,
            size,
            written: size,
            writeback,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hash of everything written, after [`flush`](Self::flush) (or before any write).
    pub fn hasher(&self) -> &Hasher {
        &self.sink.as_ref().expect("no batch in flight after a flush").hasher
    }

    pub async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.size += chunk.len() as u64;
        self.batch_bytes += chunk.len();
        self.batch.push(chunk);
        if self.batch_bytes >= BATCH_BYTES {
            self.send_batch().await?;
        }
        Ok(())
    }

    /// Waits for the batch in flight, then starts the collected one.
    async fn send_batch(&mut self) -> std::io::Result<()> {
        self.settle().await?;
        let batch = std::mem::take(&mut self.batch);
        let len = std::mem::take(&mut self.batch_bytes) as u64;
        let mut sink = self.sink.take().expect("settled");
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            for chunk in &batch {
                sink.hasher.update(chunk);
            }
            let res = write_all_vectored(&mut sink.file, &batch);
            (sink, res)
        }));
        self.written += len;
        Ok(())
    }

    /// Waits for the batch in flight, if any. Also what a rollback must do before it cuts the
    /// file: no write may land after it.
    pub async fn settle(&mut self) -> std::io::Result<()> {
        let Some(job) = self.in_flight.take() else { return Ok(()) };
        let (sink, res) = job.await.map_err(std::io::Error::other)?;
        self.sink = Some(sink);
        res?;
        if let Some(wb) = &mut self.writeback {
            wb.written(self.written);
        }
        Ok(())
    }

    /// Writes every byte accepted to the file and, with `fsync`, to the disk.
    pub async fn flush(&mut self, fsync: bool) -> std::io::Result<()> {
        if !self.batch.is_empty() {
            self.send_batch().await?;
        }
        self.settle().await?;
        if fsync {
            let file = self.sink.as_ref().expect("settled").file.try_clone()?;
            blocking(move || file.sync_data()).await?;
        }
        Ok(())
    }

    /// Flushes and returns the digest of everything written, in `alg` (re-reading the file
    /// only when `alg` is not the one hashed on the way in).
    pub async fn finish(mut self, alg: Algorithm, fsync: bool) -> std::io::Result<(PathBuf, Digest, u64)> {
        self.flush(fsync).await?;
        let hasher = self.sink.take().expect("settled").hasher;
        let digest = if hasher.algorithm() == alg { hasher.finish() } else { hash_file(&self.path, alg).await? };
        Ok((self.path, digest, self.size))
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}

/// Writes every chunk, in order, with as few `writev` calls as the kernel allows.
pub fn write_all_vectored(file: &mut File, chunks: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Hashes a whole file with `alg` on the blocking pool.
pub async fn hash_file(path: &Path, alg: Algorithm) -> std::io::Result<Digest> {
    let path = path.to_path_buf();
    blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut h = Hasher::new(alg);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finish());
            }
            h.update(&buf[..n]);
        }
    })
    .await
}
