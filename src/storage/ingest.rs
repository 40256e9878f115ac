//! Digest-verifying ingest: bytes are hashed on the way into a file under `ingest/`, and only
//! [`Store::commit_ingest`](super::Store::commit_ingest) moves a verified file into `blobs/`.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::Writeback;
use crate::oci::{Algorithm, Digest, Hasher};

/// Writes go to the file in large blocks: few syscalls and blocking-pool hops per MiB.
const WRITE_BUFFER: usize = 1 << 20;

/// An open ingest file: everything written so far is `size` bytes whose running hash is `hasher`.
pub struct Ingest {
    path: PathBuf,
    file: BufWriter<File>,
    hasher: Hasher,
    size: u64,
    /// Set when the file will be fsynced: its writeback starts as it grows.
    writeback: Option<Writeback>,
}

impl Ingest {
    /// Creates (or truncates) `path` and starts hashing with `alg`. `durable`: the file will
    /// be fsynced, so writeback starts while it is written.
    pub async fn create(path: &Path, alg: Algorithm, durable: bool) -> std::io::Result<Ingest> {
        let file = OpenOptions::new().create(true).write(true).truncate(true).open(path).await?;
        Ingest::wrap(path, file, Hasher::new(alg), 0, durable).await
    }

    /// Reopens `path` at `size` bytes with a restored hash state. Bytes past `size` (a chunk
    /// that was being written when the process died) are cut off; a file shorter than `size`
    /// cannot be resumed.
    pub async fn resume(path: &Path, hasher: Hasher, size: u64, durable: bool) -> std::io::Result<Ingest> {
        let mut file = OpenOptions::new().write(true).open(path).await?;
        let len = file.metadata().await?.len();
        if len < size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("ingest file has {len} bytes, state says {size}"),
            ));
        }
        if len > size {
            file.set_len(size).await?;
        }
        file.seek(SeekFrom::Start(size)).await?;
        Ingest::wrap(path, file, hasher, size, durable).await
    }

    async fn wrap(path: &Path, file: File, hasher: Hasher, size: u64, durable: bool) -> std::io::Result<Ingest> {
        let writeback = if durable { Some(Writeback::new(file.try_clone().await?.into_std().await)) } else { None };
        let file = BufWriter::with_capacity(WRITE_BUFFER, file);
        Ok(Ingest { path: path.to_path_buf(), file, hasher, size, writeback })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.file.write_all(chunk).await?;
        self.size += chunk.len() as u64;
        if let Some(wb) = &mut self.writeback {
            wb.written(self.size - self.file.buffer().len() as u64);
        }
        Ok(())
    }

    /// Flushes buffered bytes to the file and, with `fsync`, to the disk.
    pub async fn flush(&mut self, fsync: bool) -> std::io::Result<()> {
        self.file.flush().await?;
        if fsync {
            self.file.get_ref().sync_data().await?;
        }
        Ok(())
    }

    /// Flushes and returns the digest of everything written, in `alg` (re-reading the file
    /// only when `alg` is not the one hashed on the way in).
    pub async fn finish(mut self, alg: Algorithm, fsync: bool) -> std::io::Result<(PathBuf, Digest, u64)> {
        self.flush(fsync).await?;
        let digest =
            if self.hasher.algorithm() == alg { self.hasher.finish() } else { hash_file(&self.path, alg).await? };
        Ok((self.path, digest, self.size))
    }
}

/// Hashes a whole file with `alg` on the blocking pool.
pub async fn hash_file(path: &Path, alg: Algorithm) -> std::io::Result<Digest> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
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
    .map_err(std::io::Error::other)?
}
