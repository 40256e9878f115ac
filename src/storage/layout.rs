//! The one place that turns validated names and digests into storage keys. Nothing else in
//! the crate formats a key or a path. Keys are relative, `/`-separated; the filesystem
//! backend puts them under its root, an object-storage backend under its prefix.
//!
//! ```text
//! blobs/<alg>/<hex[0..2]>/<hex>              committed content (blobs and manifest bytes),
//!                                            only ever created by a writer's commit after
//!                                            its digest and size were verified
//! ingest/<uuid>/data                         an ingest's bytes so far (upload session or fill)
//! ingest/<uuid>/state.json                   {kind, started_at, offset, hash state} at the
//!                                            last checkpoint (written tmp + rename)
//! ingest/<uuid>/piece/<start>                (S3) bytes from <start> of the part not sent
//!                                            yet, PUT at a checkpoint: any process sharing
//!                                            the bucket can rebuild the session's spool
//! ingest/tmp-<uuid>                          small atomic writes in flight
//! repos/<name>/                              a local (pushed) repository
//! cache/<upstream host>/<name>/              an upstream's repository as cached: a tree no
//!                                            client-writable name can reach
//!   …/_layers/<alg>/<hex>                    link: the blob is visible in the repository
//!   …/_manifests/revisions/<alg>/<hex>       link: the manifest is in the repository; holds
//!                                            its media type
//!   …/_manifests/tags/<tag>                  holds the tagged manifest's digest
//!   …/_referrers/<alg>/<subject-hex>/<alg>-<hex>
//!                                            the referrer's descriptor (JSON) for the subject
//! meta/access/<alg>/<hex>                    when the content was last used (unix millis;
//!                                            batched in memory, written periodically)
//! meta/refs/<alg>/<hex>                      what a manifest references (JSON: needs,
//!                                            children, subject); rebuilt from the manifest
//! meta/imported/<alg>/<hex>                  the content was imported (air gap): never
//!                                            evicted by the cache cap
//! meta/lifecycle/index                      the lifecycle's index (JSON: content, links,
//!                                            manifests, GC queue), saved at a clean stop
//! meta/lifecycle/clean                       the clean-shutdown marker: the digest of the
//!                                            saved index; removed when a server starts
//! meta/lifecycle/generation                 changed by every offline tool that changes the
//!                                            store: a server's index is rebuilt after it
//! meta/replicas/<uuid>                       a serving replica's heartbeat (JSON: its
//!                                            advertised URL, host, pid, whether it has Redis)
//! ```
//!
//! Name components never start with `_` (see [`RepoName`]), so they cannot collide with the
//! `_layers`, `_manifests` and `_referrers` directories; local and cached repositories live in
//! separate trees, so no push can ever land in an upstream's cache.

use std::fmt;

use super::ids::IngestId;
use super::Repo;
use crate::oci::{Digest, Tag};

/// A storage key: a relative, `/`-separated path of validated components.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `self/part` (appended in place: keys are built on every lookup of the hot paths).
    fn join(mut self, part: &str) -> Key {
        self.0.reserve(part.len() + 1);
        self.0.push('/');
        self.0.push_str(part);
        self
    }

    /// Keys of `parts` joined with `/`, in one allocation.
    fn of(parts: &[&str]) -> Key {
        let mut s = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                s.push('/');
            }
            s.push_str(p);
        }
        Key(s)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub const BLOBS: &str = "blobs";
pub const INGEST: &str = "ingest";
pub const LOCAL_REPOS: &str = "repos";
pub const CACHE_REPOS: &str = "cache";
pub const META: &str = "meta";

/// When content was last used.
pub fn access(d: &Digest) -> Key {
    Key::of(&[META, "access", d.algorithm().as_str(), &d.hex()])
}

/// What a manifest references.
pub fn refs(d: &Digest) -> Key {
    Key::of(&[META, "refs", d.algorithm().as_str(), &d.hex()])
}

/// The content was imported.
pub fn imported(d: &Digest) -> Key {
    Key::of(&[META, "imported", d.algorithm().as_str(), &d.hex()])
}

/// The replicas' heartbeats (`<uuid>` below).
pub fn index_state() -> Key {
    Key::of(&["meta", "lifecycle", "index"])
}

pub fn index_generation() -> Key {
    Key::of(&["meta", "lifecycle", "generation"])
}

pub fn index_clean() -> Key {
    Key::of(&["meta", "lifecycle", "clean"])
}

pub fn replicas_dir() -> Key {
    Key(format!("{META}/replicas"))
}

/// One replica's heartbeat.
pub fn replica(id: &uuid::Uuid) -> Key {
    replicas_dir().join(&id.to_string())
}

/// A repository's blob links (`<alg>/<hex>` below).
pub fn layers_dir(r: &Repo) -> Key {
    repo(r).join("_layers")
}

/// A repository's manifest revisions (`<alg>/<hex>` below).
pub fn revisions_dir(r: &Repo) -> Key {
    repo(r).join("_manifests/revisions")
}

pub fn blob(d: &Digest) -> Key {
    let hex = d.hex();
    Key::of(&[BLOBS, d.algorithm().as_str(), &hex[..2], &hex])
}

pub fn ingest_dir(id: &IngestId) -> Key {
    Key(format!("{INGEST}/{id}"))
}

pub fn ingest_data(id: &IngestId) -> Key {
    ingest_dir(id).join("data")
}

pub fn ingest_state(id: &IngestId) -> Key {
    ingest_dir(id).join("state.json")
}

/// (S3) An upload's piece: bytes from `start` of the part not yet sent.
pub fn ingest_piece(id: &IngestId, start: u64) -> Key {
    ingest_dir(id).join("piece").join(&start.to_string())
}

/// A fresh temporary key beside the ingests.
pub fn tmp() -> Key {
    Key(format!("{INGEST}/tmp-{}", uuid::Uuid::new_v4().simple()))
}

pub fn root(name: &str) -> Key {
    Key(name.to_string())
}

/// The root of a repository's tree.
pub fn repo(r: &Repo) -> Key {
    in_repo(r, &[])
}

/// A key in a repository's tree: its root, then `parts`.
fn in_repo(r: &Repo, parts: &[&str]) -> Key {
    let mut all: Vec<&str> = Vec::with_capacity(parts.len() + 3);
    match r {
        Repo::Local(name) => all.extend([LOCAL_REPOS, name.as_str()]),
        Repo::Cache { host, name } => all.extend([CACHE_REPOS, host, name.as_str()]),
    }
    all.extend_from_slice(parts);
    Key::of(&all)
}

/// The repository whose key [`repo`] drew (`repos/team/app`, `cache/docker.io/library/x`):
/// how replicas name a repository to each other.
pub fn repo_of(key: &str) -> Option<Repo> {
    if let Some(name) = key.strip_prefix(LOCAL_REPOS).and_then(|k| k.strip_prefix('/')) {
        return name.parse().ok().map(Repo::Local);
    }
    let rest = key.strip_prefix(CACHE_REPOS)?.strip_prefix('/')?;
    let (host, name) = rest.split_once('/')?;
    if host.is_empty() || host == "." || host == ".." {
        return None;
    }
    Some(Repo::cache(host, name.parse().ok()?))
}

pub fn layer_link(r: &Repo, d: &Digest) -> Key {
    in_repo(r, &["_layers", d.algorithm().as_str(), &d.hex()])
}

pub fn revision(r: &Repo, d: &Digest) -> Key {
    in_repo(r, &["_manifests/revisions", d.algorithm().as_str(), &d.hex()])
}

pub fn tags_dir(r: &Repo) -> Key {
    in_repo(r, &["_manifests/tags"])
}

pub fn tag(r: &Repo, t: &Tag) -> Key {
    in_repo(r, &["_manifests/tags", t.as_str()])
}

pub fn referrers_dir(r: &Repo, subject: &Digest) -> Key {
    in_repo(r, &["_referrers", subject.algorithm().as_str(), &subject.hex()])
}

pub fn referrer(r: &Repo, subject: &Digest, referrer: &Digest) -> Key {
    referrers_dir(r, subject).join(&format!("{}-{}", referrer.algorithm().as_str(), referrer.hex()))
}

/// A key below `base` named by a listing of `base` (a name [`super::Backend::list`] returned).
pub fn child(base: &Key, name: &str) -> Key {
    base.clone().join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_round_trip_through_their_keys() {
        for r in
            [Repo::Local("team/app".parse().unwrap()), Repo::cache("127.0.0.1:5301", "library/nginx".parse().unwrap())]
        {
            assert_eq!(repo_of(repo(&r).as_str()), Some(r.clone()));
        }
        for bad in ["repos/", "repos/_x", "cache/host", "cache//x", "cache/../x", "blobs/sha256", "reposx/a"] {
            assert_eq!(repo_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys() {
        let d = Digest::sha256(b"");
        let local = Repo::Local("team/app".parse().unwrap());
        let cached = Repo::cache("127.0.0.1:5301", "library/nginx".parse().unwrap());
        assert_eq!(
            blob(&d).as_str(),
            "blobs/sha256/e3/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(layer_link(&local, &d).as_str(), format!("repos/team/app/_layers/sha256/{}", d.hex()));
        assert_eq!(
            tag(&cached, &"v1".parse().unwrap()).as_str(),
            "cache/127.0.0.1:5301/library/nginx/_manifests/tags/v1"
        );
        // A local name that spells an upstream's host stays in the local tree.
        let spoof = Repo::Local("127.0.0.1-5301/library/nginx".parse().unwrap());
        assert!(repo(&spoof).as_str().starts_with("repos/"));
    }
}
