//! Pushes into local repositories: upload sessions, their commit through the store's one
//! verifying writer, and cross-repository mounts. Every call takes a [`Writable`]: the
//! namespace rule was checked.

use super::{Registry, RegistryResult, Writable};
use crate::oci::{Algorithm, Digest, RepoName};
use crate::proxy::Target;
use crate::storage::{Repo, StoreError, Upload, UploadId, UploadWriter};

impl Registry {
    pub async fn create_upload(&self, repo: &Writable, alg: Algorithm) -> Result<UploadId, StoreError> {
        self.store.create_upload(repo.repo(), alg).await
    }

    /// Opens a session to append to it (one writer at a time).
    pub async fn open_upload(&self, repo: &Writable, id: &UploadId) -> Result<UploadWriter, StoreError> {
        self.store.open_upload(repo.repo(), id).await
    }

    pub async fn upload_status(&self, repo: &Writable, id: &UploadId) -> Result<Upload, StoreError> {
        self.store.upload_status(repo.repo(), id).await
    }

    pub async fn cancel_upload(&self, repo: &Writable, id: &UploadId) -> Result<(), StoreError> {
        self.store.cancel_upload(repo.repo(), id).await
    }

    /// Verifies the session's content against `d` and publishes it linked in `repo`; the
    /// session ends whatever the outcome.
    pub async fn commit_upload(&self, w: UploadWriter, repo: &Writable, d: &Digest) -> Result<u64, StoreError> {
        w.commit(&self.store, repo.repo(), d).await
    }

    /// Whether a session that is gone was committed as `d` by a request interrupted after its
    /// commit (the retry of that request succeeds).
    pub async fn recover_interrupted_commit(
        &self,
        repo: &Writable,
        id: &UploadId,
        d: &Digest,
    ) -> Result<bool, StoreError> {
        self.store.recover_interrupted_commit(repo.repo(), id, d).await
    }

    /// Cross-repository mount: links `d`, already in `from` (named as a client names a
    /// repository: a local one, or an upstream's), into `repo`. `false` when it is not there.
    pub async fn mount(&self, repo: &Writable, d: &Digest, from: &RepoName) -> RegistryResult<bool> {
        let from = match self.proxy.resolve(from, None) {
            Target::Local(n) => Repo::Local(n),
            Target::Proxy { repo, .. } => repo.cache,
        };
        // Checked and linked under the digest's guard, with the backend's word.
        Ok(self.store.mount_blob(&from, repo.repo(), d).await?)
    }
}
