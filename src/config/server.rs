//! `[server]` and `[server.rate_limit]`: listeners, connection limits, HTTP/2, timeouts.

#[allow(unused_imports)]
use super::*;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A connection must deliver a complete request head within this long (from its first
    /// byte, or from the end of the previous request on a kept-alive connection).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest silence inside a request body (an upload that sends nothing) and longest time
    /// a client may leave a response unread before the connection is cut. Never a limit on a
    /// whole transfer.
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Open client connections at most; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Open connections from one client address at most (`0`: no cap); more are closed at
    /// once. Clients behind a load balancer or NAT share one address.
    pub max_connections_per_client: usize,
    /// Streams (requests) one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Response bytes buffered per HTTP/2 stream beyond what the client's window takes.
    pub http2_max_send_buffer: ByteSize,
    /// An HTTP/2 connection with no open stream for this long is closed gracefully (GOAWAY).
    #[serde(with = "humantime_serde")]
    pub http2_idle_timeout: Duration,
    /// Requests per client address (`[server.rate_limit]`); off unless configured.
    pub rate_limit: RateLimitConfig,
    /// TLS on `listen` (`[server.tls]`): with it, `listen` speaks TLS only.
    pub tls: Option<TlsConfig>,
    /// A second listener speaking plain HTTP beside the TLS one (loopback, or behind a
    /// TLS-terminating proxy). Only with `[server.tls]`.
    pub plain_listen: Option<SocketAddr>,
}

/// A token bucket per client address: `requests_per_second` on average, bursts of up to
/// `burst` requests. Past it, `429 TOOMANYREQUESTS` with `Retry-After`. Off when
/// `requests_per_second` is 0 (the default).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    /// Requests a client may send at once after being quiet; default two seconds' worth.
    pub burst: Option<u32>,
}

impl RateLimitConfig {
    pub fn enabled(&self) -> bool {
        self.requests_per_second > 0.0
    }

    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| (self.requests_per_second * 2.0).ceil().max(1.0) as u32)
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: "0.0.0.0:5000".parse().unwrap(),
            shutdown_grace: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_client: 256,
            http2_max_concurrent_streams: 64,
            http2_max_send_buffer: ByteSize(64 << 10),
            http2_idle_timeout: Duration::from_secs(60),
            rate_limit: RateLimitConfig::default(),
            tls: None,
            plain_listen: None,
        }
    }
}
