//! The API suite (`tests/api.rs`) against the S3 backend: the same tests, every server on
//! moto (see `tests/common/s3.rs`).
#[path = "api.rs"]
mod suite;
