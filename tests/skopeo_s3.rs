//! The skopeo suite (`tests/skopeo.rs`) against the S3 backend: the same tests, every server on
//! moto (see `tests/common/s3.rs`).
#[path = "skopeo.rs"]
mod suite;
