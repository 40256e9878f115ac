//! Discovery: a repository's tags (an upstream's list, the cache's through an outage), the
//! catalog of the store's repositories, a subject's referrers.

use serde_json::Value;

use super::{Missing, Registry, RegistryError, RegistryResult};
use crate::oci::Digest;
use crate::proxy::{tags_from_upstream, ProxyRepo, Target};
use crate::storage::Repo;
use crate::upstream::UpstreamError;

impl Registry {
    /// Every tag of `target`'s repository, sorted as stored or listed upstream.
    pub async fn tags(&self, target: &Target) -> RegistryResult<Vec<String>> {
        let (shown, tags) = match target {
            Target::Local(name) => (name, self.local_tags(&Repo::Local(name.clone())).await?),
            Target::Proxy { repo, .. } => (&repo.remote, self.upstream_tags(repo).await?),
        };
        tags.ok_or_else(|| RegistryError::Unknown(Missing::Name, shown.to_string()))
    }

    async fn local_tags(&self, repo: &Repo) -> RegistryResult<Option<Vec<String>>> {
        Ok(self.store.list_tags(repo).await?.map(|t| t.into_iter().map(|t| t.as_str().to_string()).collect()))
    }

    /// The upstream's tag list; the cached tags when the upstream is in trouble.
    async fn upstream_tags(&self, p: &ProxyRepo) -> RegistryResult<Option<Vec<String>>> {
        match p.upstream.get_json(&p.remote, &format!("/v2/{}/tags/list", p.remote)).await {
            Ok((_, body)) => Ok(tags_from_upstream(&body)),
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => {
                tracing::warn!(upstream = %p.upstream.host, repo = %p.remote, error = %e, "tags list from the cache");
                match self.local_tags(&p.cache).await? {
                    Some(t) => Ok(Some(t)),
                    None => Err(RegistryError::Upstream(Missing::Name, e)),
                }
            }
        }
    }

    /// Up to `n` repositories of the store after `last`, and whether there are more.
    pub async fn catalog(&self, last: Option<&str>, n: usize) -> RegistryResult<(Vec<String>, bool)> {
        Ok(self.store.catalog(last, n).await?)
    }

    /// The descriptors of the manifests that refer to `subject` in `target`'s repository.
    pub async fn referrers(&self, target: &Target, subject: &Digest) -> RegistryResult<Vec<Value>> {
        match target {
            Target::Local(name) => Ok(self.store.referrers(&Repo::Local(name.clone()), subject).await?),
            Target::Proxy { repo, .. } => self.upstream_referrers(repo, subject).await,
        }
    }

    /// The upstream's referrers; the cached ones when it has no answer.
    async fn upstream_referrers(&self, p: &ProxyRepo, subject: &Digest) -> RegistryResult<Vec<Value>> {
        match p.upstream.get_json(&p.remote, &format!("/v2/{}/referrers/{subject}", p.remote)).await {
            Ok((_, body)) => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                Ok(v.get("manifests").and_then(Value::as_array).cloned().unwrap_or_default())
            }
            Err(e) => {
                tracing::debug!(upstream = %p.upstream.host, error = %e, "referrers from the cache");
                Ok(self.store.referrers(&p.cache, subject).await?)
            }
        }
    }
}
