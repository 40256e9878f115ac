//! The writer suite (`tests/writer.rs`) against the S3 backend (moto): a stale state cannot
//! replace stored content (pieces checked, conditional writes), a dropped PATCH cannot land
//! its state late, a crash after the copy to the final key is finished by the retried PUT.
//! (The directory fsync test is filesystem only.)
#[path = "writer.rs"]
mod suite;
