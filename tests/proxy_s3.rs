//! The proxy suite (`tests/proxy.rs`) against the S3 backend: the same tests, every server on
//! moto (see `tests/common/s3.rs`).
#[path = "proxy.rs"]
mod suite;
