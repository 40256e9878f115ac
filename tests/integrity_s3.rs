//! The integrity suite (`tests/integrity.rs`) against the S3 backend (moto): eviction and GC
//! against pushes and manifest PUTs, the offline tools beside a live server, every server and
//! one-shot command on the bucket of its root.
#[path = "integrity.rs"]
mod suite;
