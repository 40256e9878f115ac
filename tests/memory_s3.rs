//! The memory suite (`tests/memory.rs`) against the S3 backend: the same tests, every server on
//! moto (see `tests/common/s3.rs`).
#[path = "memory.rs"]
mod suite;
