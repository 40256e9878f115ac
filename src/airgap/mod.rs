//! Air-gapped sites: fill the cache from a list ([`prefetch`]), carry it across the gap as
//! an OCI image layout ([`export`], [`import`]), and serve with no upstream at all
//! (`proxy.offline`, see [`crate::proxy::Proxy::is_offline`]).
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
pub mod reference;

use crate::oci::RepoName;
use crate::proxy::{Proxy, Target};
use crate::storage::Repo;

/// The annotation naming an entry of `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The store repository a reference's repository names: an upstream's cache for a configured
/// host (or a plain name the default upstream mirrors), else a local repository the
/// configuration allows. `Err` says why neither.
pub fn store_repo(proxy: &Proxy, host: Option<&str>, name: &RepoName) -> Result<Repo, String> {
    match proxy.named(host, name) {
        Some(Target::Proxy { repo, .. }) => Ok(repo.cache),
        Some(t @ Target::Local(_)) => proxy.writable(name, &t).map(|n| Repo::Local(n.clone())),
        None => Err(format!(
            "{} is not a configured upstream: add an [[upstreams]] entry with host = \"{}\" (it need not be reachable)",
            host.unwrap_or_default(),
            host.unwrap_or_default()
        )),
    }
}

/// `12.3 MB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
