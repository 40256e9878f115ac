//! Air-gapped sites: fill the cache from a list ([`prefetch`], the registry's own
//! [`crate::registry::Registry::prefetch`]), carry it across the gap as
//! an OCI image layout ([`export`], [`import`]), and serve with no upstream at all
//! (`proxy.offline`, see [`crate::registry::Registry::is_offline`]).
//!
//! The format is the OCI image layout (image-spec `image-layout.md`): `oci-layout`,
//! `index.json` whose entries are named with `org.opencontainers.image.ref.name`, and
//! `blobs/<alg>/<hex>`; as a directory, a tar, or a zstd-compressed tar. Stevedore writes full
//! references (`docker.io/library/nginx:1.27`; an entry that has no tag, a referrer or a
//! manifest selected by digest, as `docker.io/library/nginx@sha256:…`) so the upstream host
//! survives the gap, and reads tag-only names (`v1`, as skopeo writes them) with
//! `--repository`.
//!
//! Every byte that comes in goes through the store's one verifying writer; nothing is
//! committed before every blob of the archive was verified and every present manifest found
//! complete.

pub mod export;
pub mod import;
pub mod prefetch;

pub use crate::oci::image_ref as reference;
pub use crate::registry::human_bytes;

/// The annotation naming an entry of `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
