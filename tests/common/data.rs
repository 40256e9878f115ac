//! Deterministic test data and digests.
//!
//! Byte streams are a pure function of `(seed, offset)`, so any range of a blob can be
//! regenerated on demand: a 1 GiB blob is never held in memory, and a chunked upload can be
//! resumed at whatever offset the server reports.

use bytes::Bytes;
use sha2::{Digest, Sha256, Sha512};

/// splitmix64 finaliser: a good 64-bit mix, cheap enough for gigabytes.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline]
fn word(seed: u64, index: u64) -> u64 {
    mix64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ mix64(index.wrapping_add(seed)))
}

/// Fills `buf` with the bytes at `offset..offset+buf.len()` of the stream named by `seed`.
pub fn fill_at(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = 0usize;
    let mut off = offset;
    // Unaligned head.
    if !off.is_multiple_of(8) {
        let w = word(seed, off / 8).to_le_bytes();
        let start = (off % 8) as usize;
        let n = (8 - start).min(buf.len());
        buf[..n].copy_from_slice(&w[start..start + n]);
        pos += n;
        off += n as u64;
    }
    let mut idx = off / 8;
    while pos + 8 <= buf.len() {
        buf[pos..pos + 8].copy_from_slice(&word(seed, idx).to_le_bytes());
        pos += 8;
        idx += 1;
    }
    if pos < buf.len() {
        let w = word(seed, idx).to_le_bytes();
        let n = buf.len() - pos;
        buf[pos..].copy_from_slice(&w[..n]);
    }
}

/// `len` bytes of the stream `seed`, starting at `offset`.
pub fn bytes_at(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_at(seed, offset, &mut v);
    v
}

/// The first `len` bytes of the stream `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    bytes_at(seed, 0, len)
}

/// Small deterministic PRNG for choices (sizes, timings).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `sha256:<hex>`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn sha512_hex(data: &[u8]) -> String {
    hex(&Sha512::digest(data))
}

/// `sha512:<hex>`.
pub fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", sha512_hex(data))
}

/// Chunk size used when streaming generated data.
pub const STREAM_CHUNK: usize = 1 << 20;

/// Digest (`sha256:<hex>`) of `seed`'s bytes `offset..offset+len`, computed in 1 MiB pieces.
pub fn stream_digest(seed: u64, offset: u64, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(STREAM_CHUNK as u64) as usize;
        fill_at(seed, offset + done, &mut buf[..n]);
        h.update(&buf[..n]);
        done += n as u64;
    }
    format!("sha256:{}", hex(&h.finalize()))
}

/// A `Stream` of `seed`'s bytes `offset..offset+len` in 1 MiB `Bytes`, for
/// `reqwest::Body::wrap_stream`. Generates lazily: at most one chunk is alive per poll.
pub fn byte_stream(
    seed: u64,
    offset: u64,
    len: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(0u64, move |done| async move {
        if done >= len {
            return None;
        }
        let n = (len - done).min(STREAM_CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        fill_at(seed, offset + done, &mut buf);
        Some((Ok(Bytes::from(buf)), done + n as u64))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_at_is_consistent_for_any_split() {
        let whole = bytes(7, 1000);
        for (off, len) in [(0, 1), (1, 7), (3, 20), (8, 16), (13, 987), (999, 1)] {
            assert_eq!(bytes_at(7, off, len), &whole[off as usize..off as usize + len]);
        }
    }
}
