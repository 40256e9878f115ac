//! `stevedore export --output PATH [REF...]`: writes references from the store (no reference:
//! every tag of every repository, cached or pushed) as an OCI image layout: a directory, or a
//! tar stream when PATH ends in `.tar` (`.tar.zst`: zstd-compressed).
//!
//! Entries of `index.json` carry full references (`docker.io/library/nginx:1.27`); referrers
//! and manifests selected by digest are named `repository@digest`. Manifests are the stored
//! bytes, so every digest holds; with `--platform`, an index keeps its exact bytes and only
//! the child manifests of the platforms asked for (and those without a platform) are written.
//! Blobs stream from the store to the output; the output appears under PATH only once it is
//! complete (written beside it, then renamed).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;

use super::reference::{wanted, ImageRef, Platform, Selector};
use super::REF_NAME;
use crate::oci::manifest::{self, Kind, OCI_INDEX};
use crate::oci::{Digest, Reference, Tag};
use crate::progress::Tally;
use crate::registry::Registry;
use crate::storage::{Repo, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{reference}: {why}")]
    Ref { reference: String, why: String },
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("{path}: {err}")]
    Output { path: String, err: std::io::Error },
}

pub struct ExportOptions<'a> {
    pub refs: &'a [String],
    /// Empty: every platform.
    pub platforms: &'a [Platform],
    pub referrers: bool,
    pub output: &'a Path,
    /// Counts each blob written (a terminal's progress bar).
    pub progress: Tally,
}

#[derive(Debug, Default)]
pub struct ExportReport {
    /// Names written to `index.json`.
    pub refs: Vec<String>,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// What goes into the layout.
#[derive(Default)]
struct Plan {
    entries: Vec<Value>,
    names: Vec<String>,
    /// Every blob (manifests included) once, in the order found.
    blobs: Vec<(Digest, u64)>,
    seen: HashSet<Digest>,
    manifests: usize,
}

pub async fn export(registry: &Registry, opts: &ExportOptions<'_>) -> Result<ExportReport, ExportError> {
    let store = registry.store();
    let mut plan = Plan::default();
    let mut roots: Vec<(Repo, Reference)> = Vec::new();
    if opts.refs.is_empty() {
        for repo in store.repositories().await? {
            for t in store.list_tags(&repo).await?.unwrap_or_default() {
                roots.push((repo.clone(), Reference::Tag(t)));
            }
        }
    }
    for r in opts.refs {
        let bad = |why: String| ExportError::Ref { reference: r.clone(), why };
        let parsed: ImageRef = r.parse().map_err(|e: super::reference::RefError| bad(e.to_string()))?;
        // An upstream no longer configured: its cache is still in the store.
        let repo = registry.stored_repo(parsed.host.as_deref(), &parsed.name);
        let tags = |pattern: Option<&str>| {
            let (store, repo) = (store.clone(), repo.clone());
            let pattern = pattern.map(str::to_string);
            async move {
                let all = store.list_tags(&repo).await?.unwrap_or_default();
                Ok::<Vec<Tag>, StoreError>(
                    all.into_iter()
                        .filter(|t| pattern.as_ref().is_none_or(|p| crate::oci::glob::matches(p, t.as_str())))
                        .collect(),
                )
            }
        };
        let found: Vec<Reference> = match &parsed.selector {
            Selector::Tag(t) => vec![Reference::Tag(t.clone())],
            Selector::Digest(d) => vec![Reference::Digest(d.clone())],
            Selector::Pattern(p) => tags(Some(p)).await?.into_iter().map(Reference::Tag).collect(),
            Selector::None => tags(None).await?.into_iter().map(Reference::Tag).collect(),
        };
        if found.is_empty() {
            return Err(bad(format!("no tag of {repo} in the store matches")));
        }
        roots.extend(found.into_iter().map(|f| (repo.clone(), f)));
    }
    for (repo, reference) in &roots {
        plan.root(store, repo, reference, opts).await?;
    }
    let report = ExportReport {
        refs: plan.names.clone(),
        manifests: plan.manifests,
        blobs: plan.blobs.len(),
        bytes: plan.blobs.iter().map(|(_, s)| s).sum(),
    };
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": plan.entries,
    }))
    .expect("index serialises");
    write(store, &plan.blobs, &index, opts.output, &opts.progress).await?;
    Ok(report)
}

impl Plan {
    /// Adds a named entry and everything under it.
    async fn root(
        &mut self,
        store: &Store,
        repo: &Repo,
        r: &Reference,
        opts: &ExportOptions<'_>,
    ) -> Result<(), ExportError> {
        let missing = |why: &str| ExportError::Ref { reference: format!("{repo}{}", shown(r)), why: why.to_string() };
        let d = match r {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => store.resolve_tag(repo, t).await?.ok_or_else(|| missing("not in the store"))?,
        };
        let Some((info, _)) = store.read_manifest(repo, &d).await? else { return Err(missing("not in the store")) };
        let name = match r {
            Reference::Tag(t) => format!("{repo}:{t}"),
            Reference::Digest(d) => format!("{repo}@{d}"),
        };
        self.entry(&info.media_type, &d, info.size, &name);
        self.walk(store, repo, &d, opts).await
    }

    fn entry(&mut self, media_type: &str, d: &Digest, size: u64, name: &str) {
        self.entries.push(json!({
            "mediaType": media_type,
            "digest": d.to_string(),
            "size": size,
            "annotations": { REF_NAME: name },
        }));
        self.names.push(name.to_string());
    }

    /// The manifest `d` in `repo`, its blobs, the children asked for, and its referrers.
    async fn walk(
        &mut self,
        store: &Store,
        repo: &Repo,
        d: &Digest,
        opts: &ExportOptions<'_>,
    ) -> Result<(), ExportError> {
        let mut stack = vec![d.clone()];
        while let Some(d) = stack.pop() {
            if self.seen.contains(&d) {
                continue;
            }
            let incomplete = |why: String| ExportError::Ref { reference: format!("{repo}@{d}"), why };
            let Some((info, bytes)) = store.read_manifest(repo, &d).await? else {
                return Err(incomplete("not in the store".into()));
            };
            self.seen.insert(d.clone());
            self.blobs.push((d.clone(), info.size));
            self.manifests += 1;
            let m = manifest::parse(&bytes, Some(&info.media_type))
                .map_err(|e| incomplete(format!("stored manifest: {e}")))?;
            match m.kind {
                Kind::Image => {
                    for b in m.config.iter().chain(&m.layers) {
                        if b.embedded || b.is_non_distributable() || !self.seen.insert(b.digest.clone()) {
                            continue;
                        }
                        let Some(size) = store.repo_blob_size(repo, &b.digest).await? else {
                            return Err(incomplete(format!("blob {} is not in the store", b.digest)));
                        };
                        self.blobs.push((b.digest.clone(), size));
                    }
                }
                Kind::Index => {
                    let raw: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    for c in raw["manifests"].as_array().into_iter().flatten() {
                        let Some(cd) = c["digest"].as_str().and_then(|s| s.parse::<Digest>().ok()) else { continue };
                        // A platform not asked for, or one the cache never pulled, stays out.
                        if wanted(opts.platforms, c) && store.manifest_info(repo, &cd).await?.is_some() {
                            stack.push(cd);
                        }
                    }
                }
            }
            if opts.referrers {
                for r in store.referrers(repo, &d).await? {
                    let Some(rd) = r["digest"].as_str().and_then(|s| s.parse::<Digest>().ok()) else { continue };
                    if self.seen.contains(&rd) {
                        continue;
                    }
                    let Some(info) = store.manifest_info(repo, &rd).await? else { continue };
                    self.entry(&info.media_type, &rd, info.size, &format!("{repo}@{rd}"));
                    stack.push(rd);
                }
            }
        }
        Ok(())
    }
}

fn shown(r: &Reference) -> String {
    match r {
        Reference::Tag(t) => format!(":{t}"),
        Reference::Digest(d) => format!("@{d}"),
    }
}

const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// `blobs/<alg>/<hex>`
fn blob_path(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
}

/// Writes the layout beside `out`, then renames it into place.
async fn write(
    store: &Arc<Store>,
    blobs: &[(Digest, u64)],
    index: &[u8],
    out: &Path,
    progress: &Tally,
) -> Result<(), ExportError> {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let output = |p: &Path, err: std::io::Error| ExportError::Output { path: p.display().to_string(), err };
    let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let archive = name.ends_with(".tar") || name.ends_with(".tar.zst");
    if out.exists() {
        let empty_dir = !archive && std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty_dir {
            return Err(output(out, std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists")));
        }
    }
    let res = if archive {
        write_tar(store, blobs, index, &tmp, name.ends_with(".zst"), progress).await
    } else {
        write_dir(store, blobs, index, &tmp, progress).await
    };
    if let Err(e) = res {
        let _ = if archive { tokio::fs::remove_file(&tmp).await } else { tokio::fs::remove_dir_all(&tmp).await };
        return Err(e);
    }
    if !archive && out.exists() {
        tokio::fs::remove_dir(out).await.map_err(|e| output(out, e))?;
    }
    tokio::fs::rename(&tmp, out).await.map_err(|e| output(out, e))
}

async fn write_dir(
    store: &Store,
    blobs: &[(Digest, u64)],
    index: &[u8],
    dir: &Path,
    progress: &Tally,
) -> Result<(), ExportError> {
    let output = |p: &Path, err: std::io::Error| ExportError::Output { path: p.display().to_string(), err };
    tokio::fs::create_dir_all(dir).await.map_err(|e| output(dir, e))?;
    for (d, size) in blobs {
        let path = dir.join(blob_path(d));
        tokio::fs::create_dir_all(path.parent().expect("parent")).await.map_err(|e| output(&path, e))?;
        let Some(mut stream) = store.read_blob(d, 0, *size).await? else {
            return Err(ExportError::Ref { reference: d.to_string(), why: "left the store during the export".into() });
        };
        let mut f = tokio::fs::File::create(&path).await.map_err(|e| output(&path, e))?;
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            let chunk = chunk.map_err(|e| output(&path, e))?;
            f.write_all(&chunk).await.map_err(|e| output(&path, e))?;
        }
        f.sync_all().await.map_err(|e| output(&path, e))?;
        progress.add(*size);
    }
    for (name, bytes) in [("oci-layout", LAYOUT), ("index.json", index)] {
        let path = dir.join(name);
        tokio::fs::write(&path, bytes).await.map_err(|e| output(&path, e))?;
    }
    Ok(())
}

async fn write_tar(
    store: &Arc<Store>,
    blobs: &[(Digest, u64)],
    index: &[u8],
    path: &Path,
    zstd: bool,
    progress: &Tally,
) -> Result<(), ExportError> {
    let (store, blobs, index, path) = (store.clone(), blobs.to_vec(), index.to_vec(), path.to_path_buf());
    let (handle, progress) = (Handle::current(), progress.clone());
    tokio::task::spawn_blocking(move || tar_blocking(&handle, &store, &blobs, &index, &path, zstd, &progress))
        .await
        .map_err(|e| ExportError::Output { path: "export task".into(), err: std::io::Error::other(e.to_string()) })?
}

/// The tar, written on a blocking thread: `oci-layout` and `index.json` first (a reader learns
/// the structure before the blobs), then every blob streamed from the store.
fn tar_blocking(
    handle: &Handle,
    store: &Arc<Store>,
    blobs: &[(Digest, u64)],
    index: &[u8],
    path: &PathBuf,
    zstd: bool,
    progress: &Tally,
) -> Result<(), ExportError> {
    let output = |err: std::io::Error| ExportError::Output { path: path.display().to_string(), err };
    let file = std::fs::File::create(path).map_err(output)?;
    let buffered = std::io::BufWriter::with_capacity(1 << 20, file.try_clone().map_err(output)?);
    let sink = if zstd { Sink::Zstd(zstd::Encoder::new(buffered, 3).map_err(output)?) } else { Sink::Plain(buffered) };
    let mut tar = tar::Builder::new(sink);
    let header = |size: u64, dir: bool| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_mtime(0);
        h.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
        h
    };
    tar.append_data(&mut header(LAYOUT.len() as u64, false), "oci-layout", LAYOUT).map_err(output)?;
    tar.append_data(&mut header(index.len() as u64, false), "index.json", index).map_err(output)?;
    tar.append_data(&mut header(0, true), "blobs/", std::io::empty()).map_err(output)?;
    let mut dirs = HashSet::new();
    for (d, size) in blobs {
        let alg = d.algorithm().as_str();
        if dirs.insert(alg) {
            tar.append_data(&mut header(0, true), format!("blobs/{alg}/"), std::io::empty()).map_err(output)?;
        }
        let Some(stream) = handle.block_on(store.read_blob(d, 0, *size))? else {
            return Err(ExportError::Ref { reference: d.to_string(), why: "left the store during the export".into() });
        };
        let reader =
            tokio_util::io::SyncIoBridge::new_with_handle(tokio_util::io::StreamReader::new(stream), handle.clone());
        tar.append_data(&mut header(*size, false), blob_path(d), reader).map_err(output)?;
        progress.add(*size);
    }
    tar.into_inner().map_err(output)?.finish().map_err(output)?;
    file.sync_all().map_err(output)?;
    Ok(())
}

/// Where the tar goes: the file, or a zstd frame into it.
enum Sink {
    Plain(std::io::BufWriter<std::fs::File>),
    Zstd(zstd::Encoder<'static, std::io::BufWriter<std::fs::File>>),
}

impl Sink {
    /// Ends the zstd frame (if any) and flushes everything to the file.
    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Plain(mut w) => w.flush(),
            Sink::Zstd(e) => e.finish()?.flush(),
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}
