//! Relaying a blob between replicas (`[redis]` fleets): the asking side ([`Registry::relay_from`],
//! a follower streams the leader's fill) and the serving side ([`Registry::peer_fill`],
//! behind `GET /_stevedore/cluster/fill/<digest>`). Both apply the repository rule of
//! [`super::blobs`]: a replica's copy of another repository is relayed only `checked`.

use reqwest::header::{HeaderValue, RANGE};
use reqwest::StatusCode;

use super::blobs::{fill_body, BlobAnswer, BlobBody, Relay};
use super::{Missing, Registry, RegistryError};
use crate::cluster::Holder;
pub use crate::cluster::PEER_PREFIX;
use crate::oci::Digest;
use crate::proxy::ProxyRepo;
use crate::storage::Repo;

/// What a replica's fill endpoint answered, in this header: the bytes from its fill
/// (`fill`) or its store (`stored`); an answer for the client as it is (`error`: the fill
/// failed upstream, an unsatisfiable range); `none`: it has neither; or
/// [`OTHER_REPOSITORY`].
pub const PEER_SOURCE: &str = "x-stevedore-peer";

/// Headers of a peer's answer the client gets as they are.
pub const RELAYED: [&str; 7] = [
    "content-length",
    "content-range",
    "content-type",
    "docker-content-digest",
    "etag",
    "accept-ranges",
    "retry-after",
];

/// [`PEER_SOURCE`] of a replica's refusal: its fill (or stored copy) of the digest is not
/// known to be the asking repository's; the asker checks the upstream and asks again.
pub const OTHER_REPOSITORY: &str = "other-repository";

/// The repository of a relay request (`?host=<upstream host>&name=<repository>`, the cache
/// repository the client asked in) and whether the asking replica checked that the upstream
/// has the digest there (`checked=1`).
struct PeerAsk {
    repo: Repo,
    checked: bool,
}

impl PeerAsk {
    /// From a relay request's query; `None` without a valid repository (a replica of an
    /// older version): such a request gets [`OTHER_REPOSITORY`] and nothing is relayed.
    fn from_query(query: Option<&str>) -> Option<PeerAsk> {
        let (mut host, mut name, mut checked) = (None, None, false);
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "host" => host = Some(v.into_owned()),
                "name" => name = Some(v.into_owned()),
                "checked" => checked = v == "1",
                _ => {}
            }
        }
        let host = host.filter(|h| !h.is_empty() && !h.contains('/') && h != "." && h != "..")?;
        let name = name?.parse().ok()?;
        Some(PeerAsk { repo: Repo::cache(&host, name), checked })
    }
}

/// What this replica answers a relay request ([`Registry::peer_fill`]).
pub enum PeerAnswer {
    /// It has neither a fill nor the content (`none`).
    None,
    /// Its copy is another repository's ([`OTHER_REPOSITORY`]).
    OtherRepository,
    /// From its fill (`fill`) or its store (`stored`).
    Blob(BlobAnswer, &'static str),
    /// An answer for the client as it is (`error`).
    Error(RegistryError),
}

impl Registry {
    /// Relays the leader's stream of `d` (`GET <advertise>/_stevedore/cluster/fill/<digest>`,
    /// `range` passed on, `p`'s cache repository named): the body flows through as it
    /// arrives, never buffered; a stream that breaks breaks the client's.
    /// [`Relay::OtherRepository`] when the leader's copy is another repository's and
    /// `checked` is false. `Err` (why) when the leader cannot serve it: unreachable, it has
    /// no such fill, or it answered something else than a blob or an error for the client.
    pub(super) async fn relay_from(
        &self,
        leader: &Holder,
        p: &ProxyRepo,
        d: &Digest,
        range: Option<&str>,
        checked: bool,
    ) -> Result<Relay, String> {
        use futures::TryStreamExt;
        let path = format!("{PEER_PREFIX}/fill/{d}");
        let Repo::Cache { host, name } = &p.cache else { return Err("not a cache repository".into()) };
        let mut query = vec![("host", host.to_string()), ("name", name.to_string())];
        if checked {
            query.push(("checked", "1".into()));
        }
        let mut rb = self.cluster.peer_request(reqwest::Method::GET, leader, &path).query(&query);
        if let Some(r) = range {
            rb = rb.header(RANGE, r);
        }
        let resp = rb.send().await.map_err(|e| format!("unreachable: {}", crate::upstream::error_chain(&e)))?;
        let status = resp.status();
        let source = resp.headers().get(PEER_SOURCE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if source == OTHER_REPOSITORY && !checked {
            return Ok(Relay::OtherRepository);
        }
        let bytes = matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT)
            && matches!(source.as_str(), "fill" | "stored");
        if !bytes && source != "error" {
            return Err(format!(
                "answered {status} ({})",
                if source.is_empty() { "not a replica's answer" } else { &source }
            ));
        }
        if bytes && resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) != Some(&d.to_string()) {
            return Err("answered another digest".into());
        }
        let headers: Vec<(&'static str, HeaderValue)> =
            RELAYED.iter().filter_map(|name| resp.headers().get(*name).map(|v| (*name, v.clone()))).collect();
        let stream: super::ByteStream = if bytes && status == StatusCode::OK {
            Box::pin(verified_relay(d.clone(), resp.bytes_stream()))
        } else if bytes {
            // A range cannot be hashed against the digest: the leader holds its last byte back
            // until it verified the whole blob, as for its own clients.
            Box::pin(resp.bytes_stream().map_err(std::io::Error::other))
        } else {
            // An error body: small, read whole (bounded).
            if resp.content_length().is_some_and(|n| n > 64 << 10) {
                return Err(format!("answered {status} with a large error body"));
            }
            let body = resp.bytes().await.map_err(|e| format!("reading its answer: {e}"))?;
            Box::pin(futures::stream::once(async move { Ok(body) }))
        };
        Ok(Relay::Body(BlobBody::Relayed { status: status.as_u16(), headers, stream }))
    }

    /// A replica's relay request for `d` (`query`: `host=…&name=…[&checked=1]`, `range`: its
    /// `Range`): the blob from this replica's fill while it runs (the last byte after the
    /// verification, as for local followers), else from the store. As for a local request: a
    /// fill of another repository, or content not linked in the asking one, is served only
    /// `checked` (the asking replica found the upstream has it there).
    pub async fn peer_fill(&self, d: &Digest, query: Option<&str>, range: Option<&str>) -> PeerAnswer {
        // A request of this replica may be claiming the lease right now: its fill is coming.
        self.proxy.fills.wait_claim(d, self.cluster.lease_ttl()).await;
        let Some(ask) = PeerAsk::from_query(query) else { return PeerAnswer::OtherRepository };
        let answer = |body, source| {
            crate::metrics::cluster_peer_served();
            PeerAnswer::Blob(BlobAnswer { digest: d.clone(), outcome: None, body }, source)
        };
        match self.proxy.fills.get(d) {
            Some(fill) if fill.repo() != &ask.repo && !ask.checked => PeerAnswer::OtherRepository,
            Some(fill) => match fill_body(fill, range).await {
                Ok(body) => answer(body, "fill"),
                Err(e) => PeerAnswer::Error(e),
            },
            None => match self.store.blob_size(d).await {
                Ok(Some(_))
                    if !ask.checked && !matches!(self.store.repo_blob_size(&ask.repo, d).await, Ok(Some(_))) =>
                {
                    PeerAnswer::OtherRepository
                }
                Ok(Some(size)) => match self.content(d, size, range, false).await {
                    Ok(body) => answer(body, "stored"),
                    Err(RegistryError::Unknown(Missing::Blob, _)) => PeerAnswer::None,
                    Err(e) => PeerAnswer::Error(e),
                },
                Ok(None) => PeerAnswer::None,
                Err(e) => PeerAnswer::Error(e.into()),
            },
        }
    }
}

/// A peer's whole blob, verified on its way through: hashed as it passes, its last chunk held
/// back until the digest matched, so a client never receives a complete response of bytes
/// that are not the blob; on a mismatch (or a broken stream) the client's stream breaks.
fn verified_relay(
    d: Digest,
    body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    use futures::StreamExt;
    let hasher = Some(crate::oci::Hasher::new(d.algorithm()));
    // (body, hasher — `None` once the stream ended or broke, the chunk held back)
    let state = (Box::pin(body), hasher, None::<bytes::Bytes>);
    futures::stream::unfold(state, move |(mut body, hasher, mut held)| {
        let d = d.clone();
        async move {
            let mut hasher = hasher?;
            loop {
                match body.next().await {
                    Some(Ok(b)) if b.is_empty() => {}
                    Some(Ok(b)) => {
                        hasher.update(&b);
                        if let Some(prev) = held.replace(b) {
                            return Some((Ok(prev), (body, Some(hasher), held)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(std::io::Error::other(e)), (body, None, None))),
                    None => {
                        let got = hasher.finish();
                        if got != d {
                            tracing::warn!(digest = %d, got = %got, "a peer's relayed blob does not match its digest; the client's stream is cut");
                            crate::metrics::cluster_relay_mismatch();
                            let e = std::io::Error::other("the relayed bytes do not match the digest");
                            return Some((Err(e), (body, None, None)));
                        }
                        return held.take().map(|b| (Ok(b), (body, None, None)));
                    }
                }
            }
        }
    })
}
