//! Blobs: a digest in a repository, from the store (local, or an upstream's cache), from a
//! fill (started or joined), or relayed from the replica that fills it ([`super::relay`]).
//!
//! Repository membership: in an upstream's namespace, content that reached the store through
//! another repository, a fill of another repository, or a replica's copy of another
//! repository is served only once that upstream said it has the digest in the asking
//! repository ([`Registry::upstream_has`]): one rule for a hit, a joined fill and a relay.

use std::sync::Arc;

use reqwest::header::HeaderValue;

use super::{ByteStream, Registry, RegistryError, RegistryResult, Writable};
use crate::cluster::Holder;
use crate::oci::range::{parse_range, RangeRequest};
use crate::oci::Digest;
use crate::proxy::fill::Fill;
use crate::proxy::{BlobSource, Outcome, ProxyRepo, Target};
use crate::storage::Repo;

/// A blob as the registry has it for one request.
pub struct BlobAnswer {
    pub digest: Digest,
    /// How a pull through an upstream was answered, and that upstream's host (`None`: a
    /// local repository).
    pub outcome: Option<(Outcome, String)>,
    pub body: BlobBody,
}

/// Where a blob's bytes come from.
pub enum BlobBody {
    /// `len` bytes from `start` (`None`: to the end, not known yet) of a blob of `size` bytes
    /// (`None`: not known until the upstream says); `partial` when a range was honoured;
    /// `stream` is `None` for a HEAD.
    Content { partial: bool, start: u64, len: Option<u64>, size: Option<u64>, stream: Option<ByteStream> },
    /// The client reads it from there (`storage.s3.redirect`).
    Redirect(String),
    /// A replica's answer, for the client as it is (its status, the headers of
    /// `relay::RELAYED`, its body): the blob's bytes, or an error.
    Relayed { status: u16, headers: Vec<(&'static str, HeaderValue)>, stream: ByteStream },
}

/// A replica's answer to a relay request (`Registry::relay_from`, in `relay.rs`).
pub(super) enum Relay {
    /// For the client as it is: the blob's bytes, or an error ([`BlobBody::Relayed`]).
    Body(BlobBody),
    /// `relay::OTHER_REPOSITORY`: ask again, `checked`, once the upstream said it has the blob in
    /// the asking repository.
    OtherRepository,
}

/// The range a `Range` header value asks of a blob of `size` bytes.
fn range_of(range: Option<&str>, size: u64) -> RangeRequest {
    match range {
        Some(r) => parse_range(r, size),
        None => RangeRequest::Full,
    }
}

/// How many leaders a request tries before it gives up (each failure waits for the lease to
/// be let go, so a takeover follows).
const PEER_ROUNDS: usize = 3;

impl Registry {
    /// `d` in `target`'s repository, `range` (a `Range` header's value) honoured; `head`:
    /// no bytes, only what a HEAD answers.
    pub async fn blob(
        &self,
        target: &Target,
        d: &Digest,
        range: Option<&str>,
        head: bool,
    ) -> RegistryResult<BlobAnswer> {
        let (outcome, body) = match target {
            Target::Local(name) => (None, self.local_blob(&Repo::Local(name.clone()), d, range, head).await?),
            Target::Proxy { repo, .. } => {
                let (outcome, body) = self.proxied_blob(repo, d, range, head).await?;
                (Some((outcome, repo.upstream.host.clone())), body)
            }
        };
        Ok(BlobAnswer { digest: d.clone(), outcome, body })
    }

    async fn local_blob(&self, repo: &Repo, d: &Digest, range: Option<&str>, head: bool) -> RegistryResult<BlobBody> {
        let Some(size) = self.store.repo_blob_size(repo, d).await? else {
            return Err(RegistryError::blob_unknown(d));
        };
        let span = crate::trace_span!("store read", digest = %d, bytes = size);
        tracing::Instrument::instrument(self.content(d, size, range, head), span).await
    }

    /// Committed content of `size` bytes, `range` honoured.
    pub(super) async fn content(
        &self,
        d: &Digest,
        size: u64,
        range: Option<&str>,
        head: bool,
    ) -> RegistryResult<BlobBody> {
        let (partial, start, len) = match range_of(range, size) {
            RangeRequest::Full => (false, 0, size),
            RangeRequest::Partial(r) => (true, r.start, r.len()),
            RangeRequest::Unsatisfiable => return Err(RegistryError::Unsatisfiable(size)),
        };
        if head {
            return Ok(BlobBody::Content { partial, start, len: Some(len), size: Some(size), stream: None });
        }
        // (`storage.s3.redirect`) The client reads from the bucket: every request here has
        // passed authorization. `Range` is the client's to send again.
        if let Some(url) = self.store.blob_redirect(d).await? {
            return Ok(BlobBody::Redirect(url));
        }
        let Some(stream) = self.store.read_blob(d, start, len).await? else {
            return Err(RegistryError::blob_unknown(d));
        };
        Ok(BlobBody::Content { partial, start, len: Some(len), size: Some(size), stream: Some(stream) })
    }

    /// Whether `d` is served from `p`'s cache: linked there, or stored through another
    /// repository and linked now that the upstream says it has it in `p`'s.
    pub(super) async fn cached(&self, p: &ProxyRepo, d: &Digest) -> RegistryResult<bool> {
        if self.store.repo_blob_size(&p.cache, d).await?.is_some() {
            return Ok(true);
        }
        if self.store.blob_size(d).await?.is_some() && self.upstream_has(p, d).await? {
            // Content-addressed: the same bytes arrived through another repository, and the
            // upstream serves them in this one.
            // Linked only if the content is still there (the backend's word, under its guard).
            if self.store.link_blob(&p.cache, d).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the upstream has `d` in `p`'s repository (its answer to a HEAD, cached
    /// briefly): content already in the store from elsewhere is served under an upstream's
    /// name only if that upstream serves it there.
    pub(super) async fn upstream_has(&self, p: &ProxyRepo, d: &Digest) -> RegistryResult<bool> {
        let size = self.proxy.blob_head(p, d).await.map_err(|e| RegistryError::Upstream(super::Missing::Blob, e))?;
        Ok(size.is_some())
    }

    /// A blob in an upstream's namespace: from the cache, else from the fill (started or
    /// joined; in a fleet, the fill of whichever replica holds the digest's lease).
    async fn proxied_blob(
        &self,
        p: &ProxyRepo,
        d: &Digest,
        range: Option<&str>,
        head: bool,
    ) -> RegistryResult<(Outcome, BlobBody)> {
        if self.cached(p, d).await? {
            return Ok((Outcome::Hit, self.local_blob(&p.cache, d, range, head).await?));
        }
        if head {
            let size =
                self.proxy.blob_head(p, d).await.map_err(|e| RegistryError::Upstream(super::Missing::Blob, e))?;
            let Some(size) = size else { return Err(RegistryError::blob_unknown(d)) };
            let body = BlobBody::Content { partial: false, start: 0, len: Some(size), size: Some(size), stream: None };
            return Ok((Outcome::Miss, body));
        }
        let hit = || async { Ok((Outcome::Hit, self.local_blob(&p.cache, d, range, false).await?)) };
        let lease = crate::cluster::fill_lease(d);
        let mut gone: Option<Holder> = None;
        for _ in 0..PEER_ROUNDS {
            let source = self.proxy.blob_source(&self.store, p, d, gone.as_ref()).await.map_err(RegistryError::fill)?;
            let leader = match source {
                BlobSource::Fill(fill, leader) => {
                    // Another repository's fill: its bytes are this repository's only if the
                    // upstream serves the digest here too (the check stored content gets).
                    if fill.repo() != &p.cache && !self.upstream_has(p, d).await? {
                        return Err(RegistryError::blob_unknown(d));
                    }
                    let body = fill_body(fill, range).await?;
                    return Ok((if leader { Outcome::Miss } else { Outcome::Joined }, body));
                }
                BlobSource::Stored => {
                    if !self.cached(p, d).await? {
                        return Err(RegistryError::blob_unknown(d));
                    }
                    return hit().await;
                }
                BlobSource::Peer(h) => h,
            };
            let mut relayed = self.relay_from(&leader, p, d, range, false).await;
            if let Ok(Relay::OtherRepository) = relayed {
                // The leader fills (or stored) it through another repository: the upstream
                // must serve it in this one before its bytes are relayed here.
                if !self.upstream_has(p, d).await? {
                    return Err(RegistryError::blob_unknown(d));
                }
                relayed = self.relay_from(&leader, p, d, range, true).await;
            }
            match relayed {
                Ok(Relay::OtherRepository) => {
                    tracing::warn!(digest = %d, leader = %leader.replica, peer = %leader.advertise, "a replica refused a relay the upstream check allowed; taking the fill over once its lease is let go");
                }
                Ok(Relay::Body(body)) => {
                    crate::metrics::cluster_peer_stream();
                    return Ok((Outcome::Peer, body));
                }
                Err(why) => {
                    tracing::warn!(digest = %d, leader = %leader.replica, peer = %leader.advertise, why = %why, "the replica filling a blob cannot serve it; taking the fill over once its lease is let go");
                }
            }
            // Committed meanwhile, or wait for the lease to expire (its holder died) or pass on.
            if self.cached(p, d).await? {
                return hit().await;
            }
            let limit = self.cluster.lease_ttl() + std::time::Duration::from_secs(2);
            self.cluster.wait_not_held_by(&lease, &leader, limit).await;
            gone = Some(leader);
        }
        Err(RegistryError::Busy(format!("no replica could fill {d}")))
    }

    /// Unlinks `d` from a local repository.
    pub async fn delete_blob(&self, repo: &Writable, d: &Digest) -> RegistryResult<()> {
        if !self.store.unlink_blob(repo.repo(), d).await? {
            return Err(RegistryError::blob_unknown(d));
        }
        Ok(())
    }
}

/// The bytes of `fill` (once the upstream answered), `range` honoured. Every reader's last
/// byte waits for the verification.
pub(super) async fn fill_body(fill: Arc<Fill>, range: Option<&str>) -> RegistryResult<BlobBody> {
    let size = fill.started().await.map_err(RegistryError::fill)?;
    let (partial, start, end) = match size.map(|s| (s, range_of(range, s))) {
        Some((s, RangeRequest::Unsatisfiable)) => return Err(RegistryError::Unsatisfiable(s)),
        Some((_, RangeRequest::Partial(r))) => (true, r.start, Some(r.end + 1)),
        _ => (false, 0, None),
    };
    let len = end.or(size).map(|e| e - start);
    let stream: ByteStream = Box::pin(fill.read(start, end));
    Ok(BlobBody::Content { partial, start, len, size, stream: Some(stream) })
}
