//! `[cache]`: the cache's size cap, watermarks, age limit and lifecycle intervals.

#[allow(unused_imports)]
use super::*;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Entries in the in-memory descriptor cache (digest → size, repository links).
    pub descriptors: u64,
    /// The most bytes of proxied content kept (`"200GiB"`); unset: no cap. Pushed and
    /// imported content is reported beside it and never evicted by it.
    pub max_size: Option<ByteSize>,
    /// Past this much proxied content (a fraction of `max_size` or a size), least recently
    /// used proxied content is evicted ...
    pub high_watermark: Watermark,
    /// ... until it is under this much.
    pub low_watermark: Watermark,
    /// Evict proxied content nobody used for this long (unset: no age limit).
    #[serde(with = "humantime_serde")]
    pub max_unused: Option<Duration>,
    /// How often usage is measured (and the cap and age limit applied).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Accesses are batched in memory and recorded in the store this often (and at shutdown).
    #[serde(with = "humantime_serde")]
    pub access_flush_interval: Duration,
    /// How often the online garbage collection of pushed repositories runs (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Content and links younger than this (or used since) are never collected: a blob
    /// uploaded for a manifest not pushed yet stays this long.
    #[serde(with = "humantime_serde")]
    pub gc_grace: Duration,
}

/// A watermark: a fraction of `cache.max_size` (`0.95`) or a size (`"190GiB"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Watermark {
    Fraction(f64),
    Size(ByteSize),
}

impl Watermark {
    /// The watermark in bytes for a cap of `max` bytes.
    pub fn bytes(&self, max: u64) -> u64 {
        match self {
            Watermark::Fraction(f) => (max as f64 * f) as u64,
            Watermark::Size(s) => s.0.min(max),
        }
    }
}

impl<'de> Deserialize<'de> for Watermark {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Watermark, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Float(f) if f > 0.0 && f <= 1.0 => Ok(Watermark::Fraction(f)),
            Raw::Float(f) => Err(serde::de::Error::custom(format!("{f} is not a fraction in (0, 1] (or give a size)"))),
            Raw::Text(s) => s.parse().map(Watermark::Size).map_err(serde::de::Error::custom),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            descriptors: 100_000,
            max_size: None,
            high_watermark: Watermark::Fraction(0.95),
            low_watermark: Watermark::Fraction(0.85),
            max_unused: None,
            check_interval: Duration::from_secs(60),
            access_flush_interval: Duration::from_secs(30),
            gc_interval: Duration::from_secs(3600),
            gc_grace: Duration::from_secs(3600),
        }
    }
}
