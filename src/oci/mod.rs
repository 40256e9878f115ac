//! The spec's vocabulary, parsed and validated in one place: digests, names, tags, references,
//! byte ranges, manifests, operators' image references (`image_ref`) and the glob patterns
//! names and tags are matched with. Nothing here does I/O.

pub mod digest;
pub mod glob;
pub mod image_ref;
pub mod manifest;
pub mod name;
pub mod range;

pub use digest::{Algorithm, Digest, Hasher};
pub use name::{Reference, RepoName, Tag};
