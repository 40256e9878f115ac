//! The lifecycle suite (`tests/lifecycle.rs`) against the S3 backend: the same tests, every
//! server and one-shot command on moto (see `tests/common/s3.rs`), but the full-disk test
//! (filesystem only: moto has no quota).
#[path = "lifecycle.rs"]
mod suite;
