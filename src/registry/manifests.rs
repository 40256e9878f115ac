//! Manifests: by tag or digest from a local repository, or from an upstream's cache filled or
//! revalidated through the proxy (served stale through an outage); pushed (checked complete
//! and stored under the digests' guards) and deleted in local repositories.

use bytes::Bytes;

use super::{Missing, Registry, RegistryError, RegistryResult, Writable};
use crate::oci::manifest;
use crate::oci::{Algorithm, Digest, Reference, Tag};
use crate::proxy::{Outcome, ProxyRepo, Target};
use crate::storage::{ManifestPut, Repo, StoredManifest};

/// A manifest as the registry has it for one request.
pub struct ManifestAnswer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// The exact bytes (`None` for a HEAD).
    pub bytes: Option<Bytes>,
    /// How a pull through an upstream was answered, and that upstream's host (`None`: a
    /// local repository).
    pub outcome: Option<(Outcome, String)>,
}

/// A manifest stored.
pub struct PutManifest {
    pub digest: Digest,
    /// The digest of the manifest it refers to (`subject`), if any.
    pub subject: Option<Digest>,
}

fn unknown(r: &Reference) -> RegistryError {
    RegistryError::Unknown(Missing::Manifest, r.to_string())
}

impl Registry {
    /// The manifest `r` names in `target`'s repository; `head`: without its bytes.
    pub async fn manifest(&self, target: &Target, r: &Reference, head: bool) -> RegistryResult<ManifestAnswer> {
        match target {
            Target::Local(name) => self.local_manifest(&Repo::Local(name.clone()), r, head).await,
            Target::Proxy { repo, .. } => self.proxied_manifest(repo, r, head).await,
        }
    }

    /// The digest a reference names in `repo`.
    async fn resolve_reference(&self, repo: &Repo, r: &Reference) -> RegistryResult<Digest> {
        match r {
            Reference::Digest(d) => Ok(d.clone()),
            Reference::Tag(t) => self.store.resolve_tag(repo, t).await?.ok_or_else(|| unknown(r)),
        }
    }

    async fn local_manifest(&self, repo: &Repo, r: &Reference, head: bool) -> RegistryResult<ManifestAnswer> {
        let d = self.resolve_reference(repo, r).await?;
        let info = self.store.manifest_info(repo, &d).await?.ok_or_else(|| unknown(r))?;
        self.stored_manifest(info, r, head).await
    }

    /// A manifest found in the store (`r`: how the client named it).
    async fn stored_manifest(&self, info: StoredManifest, r: &Reference, head: bool) -> RegistryResult<ManifestAnswer> {
        let bytes = match head {
            true => None,
            false => Some(self.store.manifest_bytes(&info).await?.ok_or_else(|| unknown(r))?),
        };
        Ok(ManifestAnswer { digest: info.digest, media_type: info.media_type, size: info.size, bytes, outcome: None })
    }

    /// Fills the cache from the upstream when needed, then serves from the cache.
    async fn proxied_manifest(&self, p: &ProxyRepo, r: &Reference, head: bool) -> RegistryResult<ManifestAnswer> {
        let (d, outcome, stored) =
            self.proxy.manifest(&self.store, p, r).await.map_err(|e| RegistryError::proxy(&e, Missing::Manifest))?;
        let by_digest = Reference::Digest(d);
        let mut answer = match stored {
            // A hit: the cache's record was just read.
            Some(info) => self.stored_manifest(info, &by_digest, head).await?,
            None => self.local_manifest(&p.cache, &by_digest, head).await?,
        };
        answer.outcome = Some((outcome, p.upstream.host.clone()));
        Ok(answer)
    }

    /// Stores a pushed manifest (`content_type`: the request's) under `r` and `tags` (the
    /// `?tag=` parameters, parsed here after the manifest): parsed,
    /// its digest checked against a digest reference, what it requires checked present, all
    /// under the digests' guards (nothing it needs can be collected in between).
    pub async fn put_manifest(
        &self,
        repo: &Writable,
        r: &Reference,
        bytes: &Bytes,
        content_type: Option<&str>,
        tags: &[&str],
    ) -> RegistryResult<PutManifest> {
        let m = manifest::parse(bytes, content_type).map_err(|e| RegistryError::ManifestInvalid(e.0))?;
        let digest = match r {
            Reference::Digest(want) => {
                let got = Digest::of(want.algorithm(), bytes);
                if &got != want {
                    return Err(RegistryError::DigestInvalid(format!("manifest digest is {got}, not {want}")));
                }
                got
            }
            Reference::Tag(_) => Digest::of(Algorithm::Sha256, bytes),
        };
        let mut all: Vec<Tag> = Vec::new();
        if let Reference::Tag(t) = r {
            all.push(t.clone());
        }
        for t in tags {
            all.push(t.parse().map_err(|e: crate::oci::name::TagError| RegistryError::TagInvalid(e.to_string()))?);
        }
        let subject = m.subject.as_ref().map(|s| s.digest.clone());
        let referrer = subject.as_ref().map(|s| (s, m.referrer_descriptor(&digest, bytes.len() as u64)));
        let put = ManifestPut { media_type: &m.media_type, bytes, digest: &digest, tags: &all, referrer };
        if let Err(missing) = self.store.put_manifest_checked(repo.repo(), put, &m.required()).await? {
            return Err(RegistryError::ManifestBlobUnknown(missing));
        }
        Ok(PutManifest { digest, subject })
    }

    /// Deletes a tag, or a manifest by digest (and its entry among its subject's referrers).
    pub async fn delete_manifest(&self, repo: &Writable, r: &Reference) -> RegistryResult<()> {
        let repo = repo.repo();
        match r {
            Reference::Tag(t) => {
                if !self.store.delete_tag(repo, t).await? {
                    return Err(unknown(r));
                }
            }
            Reference::Digest(d) => {
                let (info, bytes) = self.store.read_manifest(repo, d).await?.ok_or_else(|| unknown(r))?;
                let subject =
                    manifest::parse(&bytes, Some(&info.media_type)).ok().and_then(|m| m.subject).map(|s| s.digest);
                self.store.delete_manifest(repo, d, subject.as_ref()).await?;
            }
        }
        Ok(())
    }
}
