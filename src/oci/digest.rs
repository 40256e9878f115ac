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
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    alg: Algorithm,
    hex: String,
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
        self.alg
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Builds a digest from a raw hash output.
    pub fn from_raw(alg: Algorithm, raw: &[u8]) -> Digest {
        Digest { alg, hex: hex_encode(raw) }
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
        Ok(Digest { alg, hex: enc.to_string() })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg.as_str(), self.hex)
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

pub fn hex_encode(raw: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(raw.len() * 2);
    for b in raw {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
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
            let s = format!("sha256:{}", hex_encode(&bytes));
            let d: Digest = s.parse().unwrap();
            prop_assert_eq!(d.to_string(), s);
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
