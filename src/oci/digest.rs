//! `Digest` (the spec's `algorithm:encoded`) and the streaming, resumable `Hasher`.

use std::fmt;
use std::str::FromStr;

use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest as _, Sha256, Sha512};

/// The digest algorithms Stevedore stores content under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(s: &str) -> Option<Algorithm> {
        match s {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// A validated content digest, e.g. `sha256:e3b0…b855`. The hex part is lowercase and of the
/// algorithm's exact length, so it is safe to use as a path component.
///
/// Held as the raw hash bytes: a sha256 digest is 40 bytes inline and no heap block (the
/// index and the caches hold one per piece of content, several times over), a sha512 one boxes
/// its 64 bytes. The hex form is rendered on demand ([`Digest::hex`], on the stack). Ordered as
/// the text form is (algorithm, then hex, which orders as the bytes do).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(Raw);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Raw {
    Sha256([u8; 32]),
    Sha512(Box<[u8; 64]>),
}

/// A digest's lowercase hex encoding, rendered on the stack: dereferences to `&str`.
#[derive(Clone, Copy)]
pub struct Hex {
    buf: [u8; 128],
    len: u8,
}

impl Hex {
    fn of(raw: &[u8]) -> Hex {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 128];
        for (i, b) in raw.iter().enumerate() {
            buf[2 * i] = HEX[(b >> 4) as usize];
            buf[2 * i + 1] = HEX[(b & 15) as usize];
        }
        Hex { buf, len: (raw.len() * 2) as u8 }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.buf[..self.len as usize]).expect("hex is ASCII")
    }
}

impl std::ops::Deref for Hex {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Hex {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

fn unhex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'a' + 10,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest must be <algorithm>:<encoded>")]
    Malformed,
    #[error("unsupported digest algorithm {0:?} (sha256 and sha512 are supported)")]
    UnsupportedAlgorithm(String),
    #[error("{alg} digest must be {len} lowercase hex characters")]
    BadEncoding { alg: &'static str, len: usize },
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        match self.0 {
            Raw::Sha256(_) => Algorithm::Sha256,
            Raw::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// The raw hash bytes (32 for sha256, 64 for sha512).
    pub fn raw(&self) -> &[u8] {
        match &self.0 {
            Raw::Sha256(b) => b,
            Raw::Sha512(b) => &b[..],
        }
    }

    /// The lowercase hex encoding (rendered on the stack, no allocation).
    pub fn hex(&self) -> Hex {
        Hex::of(self.raw())
    }

    /// Builds a digest from a raw hash output.
    ///
    /// # Panics
    /// If `raw` is not the algorithm's output length (a hash's own output always is).
    pub fn from_raw(alg: Algorithm, raw: &[u8]) -> Digest {
        Digest(match alg {
            Algorithm::Sha256 => Raw::Sha256(raw.try_into().expect("a sha256 output is 32 bytes")),
            Algorithm::Sha512 => Raw::Sha512(Box::new(raw.try_into().expect("a sha512 output is 64 bytes"))),
        })
    }

    /// The digest of `bytes` with `alg`.
    pub fn of(alg: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(alg);
        h.update(bytes);
        h.finish()
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }
}

fn is_algorithm_component(s: &str) -> bool {
    // algorithm-component ::= [a-z0-9]+ ; separated by [+._-]
    !s.is_empty()
        && s.split(['+', '.', '_', '-'])
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let (alg, enc) = s.split_once(':').ok_or(DigestError::Malformed)?;
        if !is_algorithm_component(alg)
            || enc.is_empty()
            || !enc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'=' || b == b'_' || b == b'-')
        {
            return Err(DigestError::Malformed);
        }
        let alg = Algorithm::from_name(alg).ok_or_else(|| DigestError::UnsupportedAlgorithm(alg.to_string()))?;
        let ok = enc.len() == alg.hex_len() && enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !ok {
            return Err(DigestError::BadEncoding { alg: alg.as_str(), len: alg.hex_len() });
        }
        let mut raw = [0u8; 64];
        let raw = &mut raw[..alg.hex_len() / 2];
        for (o, pair) in raw.iter_mut().zip(enc.as_bytes().chunks_exact(2)) {
            *o = (unhex(pair[0]) << 4) | unhex(pair[1]);
        }
        Ok(Digest::from_raw(alg, raw))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm().as_str(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A streaming hasher whose state can be saved at a chunk boundary and restored later, so an
/// upload resumed after a restart never re-reads what it already hashed.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Box<Sha256>),
    Sha512(Box<Sha512>),
}

impl Hasher {
    pub fn new(alg: Algorithm) -> Hasher {
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(Box::default()),
            Algorithm::Sha512 => Hasher::Sha512(Box::default()),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_raw(Algorithm::Sha256, &h.finalize()),
            Hasher::Sha512(h) => Digest::from_raw(Algorithm::Sha512, &h.finalize()),
        }
    }

    /// The opaque internal state (sha2's hazmat serialisation; only read back by the same build).
    pub fn save(&self) -> Vec<u8> {
        match self {
            Hasher::Sha256(h) => h.serialize().to_vec(),
            Hasher::Sha512(h) => h.serialize().to_vec(),
        }
    }

    /// Restores a state written by [`Hasher::save`]; `None` if it does not decode.
    pub fn restore(alg: Algorithm, state: &[u8]) -> Option<Hasher> {
        Some(match alg {
            Algorithm::Sha256 => {
                let st = SerializedState::<Sha256>::try_from(state).ok()?;
                Hasher::Sha256(Box::new(Sha256::deserialize(&st).ok()?))
            }
            Algorithm::Sha512 => {
                let st = SerializedState::<Sha512>::try_from(state).ok()?;
                Hasher::Sha512(Box::new(Sha512::deserialize(&st).ok()?))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::sha256(b""));
        assert_eq!(std::mem::size_of::<Digest>(), 40);
        let long: Digest = Digest::of(Algorithm::Sha512, b"").to_string().parse().unwrap();
        assert_eq!(long, Digest::of(Algorithm::Sha512, b""));
        assert_eq!(long.hex().len(), 128);
        assert_eq!(
            Digest::of(Algorithm::Sha512, b"").to_string(),
            "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
        );
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:../../../../etc/passwd",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256+b64:abc",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn state_round_trip_mid_stream() {
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let mut a = Hasher::new(alg);
            a.update(b"hello ");
            let mut b = Hasher::restore(alg, &a.save()).unwrap();
            a.update(b"world");
            b.update(b"world");
            assert_eq!(a.finish(), b.finish());
            assert_eq!(Digest::of(alg, b"hello world"), {
                let mut c = Hasher::new(alg);
                c.update(b"hello world");
                c.finish()
            });
        }
        assert!(Hasher::restore(Algorithm::Sha256, b"short").is_none());
    }

    proptest! {
        #[test]
        fn any_string_never_panics(s in "\\PC*") {
            let _ = s.parse::<Digest>();
        }

        #[test]
        fn valid_hex_round_trips(bytes in proptest::collection::vec(any::<u8>(), 32)) {
            let s = format!("sha256:{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
            let d: Digest = s.parse().unwrap();
            prop_assert_eq!(&d.to_string(), &s);
            prop_assert_eq!(&*d.hex(), &s["sha256:".len()..]);
            prop_assert_eq!(d.raw(), &bytes[..]);
        }

        #[test]
        fn orders_as_text(a in proptest::collection::vec(any::<u8>(), 32), b in proptest::collection::vec(any::<u8>(), 64)) {
            let x = Digest::from_raw(Algorithm::Sha256, &a);
            let y = Digest::from_raw(Algorithm::Sha512, &b);
            let z = Digest::from_raw(Algorithm::Sha256, &b[..32]);
            for (p, q) in [(&x, &y), (&x, &z), (&z, &y), (&y, &x)] {
                prop_assert_eq!(p.cmp(q), p.to_string().cmp(&q.to_string()));
            }
        }

        #[test]
        fn split_updates_match(data in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..512) {
            let cut = cut.min(data.len());
            let mut h = Hasher::new(Algorithm::Sha256);
            h.update(&data[..cut]);
            let mut h = Hasher::restore(Algorithm::Sha256, &h.save()).unwrap();
            h.update(&data[cut..]);
            prop_assert_eq!(h.finish(), Digest::sha256(&data));
        }
    }
}
