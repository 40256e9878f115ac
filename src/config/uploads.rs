//! `[uploads]`: upload sessions.

#[allow(unused_imports)]
use super::*;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadsConfig {
    /// An upload session untouched for this long is removed.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// How often idle sessions are looked for.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Open upload sessions at most, in all; past it a new session gets `429`.
    pub max_sessions: usize,
    /// Open upload sessions at most per client address.
    pub max_sessions_per_client: usize,
    /// The largest blob a client may upload (`"100GiB"`, or a number of bytes).
    pub max_size: ByteSize,
}

impl Default for UploadsConfig {
    fn default() -> UploadsConfig {
        UploadsConfig {
            session_ttl: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(600),
            max_sessions: 10_000,
            max_sessions_per_client: 1_000,
            max_size: ByteSize(100 << 30),
        }
    }
}
