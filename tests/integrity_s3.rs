//! The integrity suite (`tests/integrity.rs`) against the S3 backend (moto): eviction and GC
//! against pushes and manifest PUTs, and the offline gc beside a live server (scenarios 1
//! and 2); the fsck scenario runs on the filesystem only (its path does not differ on S3).
#[path = "integrity.rs"]
mod suite;
