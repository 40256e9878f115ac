//! The spec's vocabulary, parsed and validated in one place: digests, names, tags, references,
//! byte ranges and manifests. Nothing here does I/O.

pub mod digest;
pub mod manifest;
pub mod name;
pub mod range;

pub use digest::{Algorithm, Digest, Hasher};
pub use name::{Reference, RepoName, Tag};
