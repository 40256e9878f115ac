//! Checks on the server's on-disk store (`<root>/blobs`, `repos`, `ingest`).

use super::data::hex;
use sha2::{Digest, Sha256, Sha512};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Every file under `<root>/blobs` as `alg:hex`, sorted; a name stored twice (under two
/// prefix directories) is listed twice.
pub fn blob_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for alg in std::fs::read_dir(root.join("blobs")).into_iter().flatten().flatten() {
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for pre in std::fs::read_dir(alg.path()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(pre.path()).into_iter().flatten().flatten() {
                out.push(format!("{alg_name}:{}", f.file_name().to_string_lossy()));
            }
        }
    }
    out.sort();
    out
}

/// The path of blob `digest` (`alg:hex`) in the store.
pub fn blob_path(root: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("alg:hex");
    root.join("blobs").join(alg).join(&hex[..2]).join(hex)
}

/// Entries left under `<root>/ingest` (upload sessions and fills: `ingest/<uuid>/`).
pub fn ingest_leftovers(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("ingest")).into_iter().flatten().flatten().map(|e| e.path()).collect()
}

/// Repositories in the store: directories under `repos/` (local) and `cache/` (upstreams'
/// caches, as `<host>/<name>`) that hold `_layers` or `_manifests`, relative to those trees.
pub fn repo_dirs(root: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('_') {
                out.insert(dir.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            } else {
                walk(base, &e.path(), out);
            }
        }
    }
    let mut out = BTreeSet::new();
    for tree in ["repos", "cache"] {
        let base = root.join(tree);
        walk(&base, &base, &mut out);
    }
    out
}

fn hash_file(path: &Path, alg: &str) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    macro_rules! run {
        ($h:expr) => {{
            let mut h = $h;
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            hex(&h.finalize())
        }};
    }
    match alg {
        "sha256" => run!(Sha256::new()),
        "sha512" => run!(Sha512::new()),
        other => panic!("unexpected digest algorithm directory blobs/{other}"),
    }
}

/// Every file under `<root>/blobs` must be `blobs/<alg>/<first 2 hex>/<hex>` and hash (with
/// `<alg>`) to `<hex>`. Returns how many blobs were checked.
pub fn assert_blobs_intact(root: &Path) -> usize {
    let blobs = root.join("blobs");
    let mut checked = 0;
    let Ok(algs) = std::fs::read_dir(&blobs) else {
        return 0;
    };
    for alg in algs {
        let alg = alg.unwrap();
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        assert!(alg.file_type().unwrap().is_dir(), "stray file {} in blobs/", alg.path().display());
        let hex_len = match alg_name.as_str() {
            "sha256" => 64,
            "sha512" => 128,
            other => panic!("unexpected directory blobs/{other}"),
        };
        for pre in std::fs::read_dir(alg.path()).unwrap() {
            let pre = pre.unwrap();
            let pre_name = pre.file_name().to_string_lossy().into_owned();
            assert!(pre.file_type().unwrap().is_dir(), "stray file {}", pre.path().display());
            for f in std::fs::read_dir(pre.path()).unwrap() {
                let f = f.unwrap();
                let name = f.file_name().to_string_lossy().into_owned();
                let path = f.path();
                assert!(f.file_type().unwrap().is_file(), "{} is not a regular file", path.display());
                assert!(
                    name.len() == hex_len && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "{}: file name is not a {alg_name} hex digest",
                    path.display()
                );
                assert_eq!(&name[..2], pre_name, "{}: wrong prefix directory", path.display());
                let got = hash_file(&path, &alg_name);
                assert_eq!(got, name, "{} does not hash to its name (torn or corrupt blob)", path.display());
                checked += 1;
            }
        }
    }
    checked
}

// --- The same checks on a running server's store, whichever backend it is on (the `*_s3`
// twin binaries run the suites on S3: see `super::s3`).

use super::stevedore::Stevedore;

/// Committed blobs as `alg:hex`, sorted: files under `blobs/`, or objects in the bucket.
pub fn stored_blobs(sd: &Stevedore) -> Vec<String> {
    match &sd.bucket {
        Some(b) => b.blobs(),
        None => blob_files(sd.root()),
    }
}

/// A committed blob's bytes, `None` when it is not committed.
pub fn stored_blob(sd: &Stevedore, digest: &str) -> Option<Vec<u8>> {
    match &sd.bucket {
        Some(b) => {
            let (alg, hex) = digest.split_once(':').expect("alg:hex");
            b.get(&format!("blobs/{alg}/{}/{hex}", &hex[..2]))
        }
        None => std::fs::read(blob_path(sd.root(), digest)).ok(),
    }
}

/// Repositories in the store (see [`repo_dirs`]).
pub fn stored_repos(sd: &Stevedore) -> BTreeSet<String> {
    let Some(b) = &sd.bucket else { return repo_dirs(sd.root()) };
    let mut out = BTreeSet::new();
    for tree in ["repos/", "cache/"] {
        for (key, _) in b.objects(tree) {
            let rest = &key[tree.len()..];
            if let Some(at) = rest.find("/_") {
                out.insert(rest[..at].to_string());
            }
        }
    }
    out
}

/// What is left of ingests (upload sessions, fills): entries under `<root>/ingest`, and on S3
/// also ingest objects and unfinished multipart uploads in the bucket.
pub fn ingests_left(sd: &Stevedore) -> Vec<String> {
    let mut out: Vec<String> = ingest_leftovers(sd.root()).iter().map(|p| p.display().to_string()).collect();
    if let Some(b) = &sd.bucket {
        out.extend(b.objects("ingest/").into_iter().map(|(k, _)| format!("object {k}")));
        out.extend(b.multipart_uploads().into_iter().map(|(k, id)| format!("multipart upload {id} of {k}")));
    }
    out
}

/// Every committed blob hashes to its name; how many were checked.
pub fn assert_stored_blobs_intact(sd: &Stevedore) -> usize {
    match &sd.bucket {
        Some(b) => b.assert_blobs_intact(),
        None => assert_blobs_intact(sd.root()),
    }
}

/// Keys (`/`-separated, relative to the store root or the bucket prefix) of the files or
/// objects whose key starts with `under`, sorted.
pub fn stored_keys(sd: &Stevedore, under: &str) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(root, &e.path(), out),
                Ok(_) => out.push(e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned()),
                Err(_) => {}
            }
        }
    }
    match &sd.bucket {
        Some(b) => b.objects(under).into_iter().map(|(k, _)| k).collect(),
        None => {
            // The deepest directory `under` names, walked and filtered by the whole prefix.
            let dir = under.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let mut out = Vec::new();
            walk(sd.root(), &sd.root().join(dir), &mut out);
            out.retain(|k| k.starts_with(under));
            out.sort();
            out
        }
    }
}

/// A file's or object's bytes (key as in [`stored_keys`]), `None` when absent.
pub fn stored_object(sd: &Stevedore, key: &str) -> Option<Vec<u8>> {
    match &sd.bucket {
        Some(b) => b.get(key),
        None => std::fs::read(sd.root().join(key)).ok(),
    }
}

fn blob_key(digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').expect("alg:hex");
    format!("blobs/{alg}/{}/{hex}", &hex[..2])
}

/// Whether blob `digest` is committed (a file under `blobs/`, or an object in the bucket).
pub fn has_blob(sd: &Stevedore, digest: &str) -> bool {
    match &sd.bucket {
        Some(b) => b.has(&blob_key(digest)),
        None => blob_path(sd.root(), digest).exists(),
    }
}

/// Replaces the bytes of committed blob `digest` behind the server's back (to corrupt it).
pub fn overwrite_blob(sd: &Stevedore, digest: &str, bytes: &[u8]) {
    match &sd.bucket {
        Some(b) => b.put(&blob_key(digest), bytes),
        None => std::fs::write(blob_path(sd.root(), digest), bytes).unwrap(),
    }
}

/// Removes committed blob `digest` behind the server's back.
pub fn remove_blob(sd: &Stevedore, digest: &str) {
    match &sd.bucket {
        Some(b) => b.delete(&blob_key(digest)),
        None => std::fs::remove_file(blob_path(sd.root(), digest)).unwrap(),
    }
}

/// `(repo, rest)` for a key under `repos/` or `cache/` that has `marker` in it: the
/// repository (relative to its tree, as in [`repo_dirs`]) and what follows the marker.
fn repo_entries(sd: &Stevedore, marker: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for tree in ["repos/", "cache/"] {
        for key in stored_keys(sd, tree) {
            if let Some(at) = key.find(marker) {
                out.push((key[tree.len()..at].to_string(), key[at + marker.len()..].to_string(), key.clone()));
            }
        }
    }
    out
}

/// Every manifest revision in the store as `(repo, digest)` (`repo` relative to `repos/` or
/// `cache/`, as in [`repo_dirs`]), sorted.
pub fn revisions(sd: &Stevedore) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = repo_entries(sd, "/_manifests/revisions/")
        .into_iter()
        .filter_map(|(repo, rest, _)| rest.split_once('/').map(|(alg, hex)| (repo, format!("{alg}:{hex}"))))
        .collect();
    out.sort();
    out
}

/// Every tag in the store as `(repo, tag, the digest it holds)`, sorted.
pub fn stored_tags(sd: &Stevedore) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = repo_entries(sd, "/_manifests/tags/")
        .into_iter()
        .map(|(repo, tag, key)| {
            let target = stored_object(sd, &key).unwrap_or_default();
            (repo, tag, String::from_utf8_lossy(&target).trim().to_string())
        })
        .collect();
    out.sort();
    out
}

/// What is present but references something absent that it needs: a manifest revision
/// whose bytes, config or layers are missing from the committed blobs, a tag pointing at a
/// manifest the repository does not hold. Empty for a coherent store.
pub fn dangling(sd: &Stevedore) -> Vec<String> {
    let mut out = Vec::new();
    let blobs: BTreeSet<String> = stored_blobs(sd).into_iter().collect();
    let revs = revisions(sd);
    for (repo, d) in &revs {
        let Some(bytes) = stored_blob(sd, d) else {
            out.push(format!("{repo}@{d}: manifest bytes absent"));
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let needs = v["config"]["digest"]
            .as_str()
            .into_iter()
            .chain(v["layers"].as_array().into_iter().flatten().filter_map(|l| l["digest"].as_str()));
        for n in needs {
            if !blobs.contains(n) {
                out.push(format!("{repo}@{d}: needs absent {n}"));
            }
        }
    }
    for (repo, tag, target) in stored_tags(sd) {
        if !revs.iter().any(|(r, d)| r == &repo && d == &target) {
            out.push(format!("{repo}:{tag} → {target}: no such manifest"));
        }
    }
    out
}

// --- Checks on a store a server is changing right now (eviction and GC run on timers): a
// file removed between listing and reading is skipped, never a failure.

/// Every committed blob under `<root>/blobs` as `(alg:hex, size)`, sorted; a blob removed
/// while listing is left out.
pub fn blob_sizes_live(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for alg in std::fs::read_dir(root.join("blobs")).into_iter().flatten().flatten() {
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for pre in std::fs::read_dir(alg.path()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(pre.path()).into_iter().flatten().flatten() {
                if let Ok(m) = f.metadata() {
                    out.push((format!("{alg_name}:{}", f.file_name().to_string_lossy()), m.len()));
                }
            }
        }
    }
    out.sort();
    out
}

/// [`assert_blobs_intact`] as a list instead of a panic, on a live store: every blob file
/// under `<root>/blobs` whose bytes do not hash to its name (or whose place is wrong), one
/// line each. A file removed while being checked is skipped. Returns (files hashed,
/// problems).
pub fn blob_problems_live(root: &Path) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (digest, _) in blob_sizes_live(root) {
        let (alg, hex_name) = digest.split_once(':').unwrap();
        let hex_len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            other => {
                problems.push(format!("unexpected directory blobs/{other}"));
                continue;
            }
        };
        if hex_name.len() != hex_len || !hex_name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            problems.push(format!("blobs/{alg}/…/{hex_name}: file name is not a {alg} hex digest"));
            continue;
        }
        let path = blob_path(root, &digest);
        let Ok(mut f) = std::fs::File::open(&path) else { continue };
        let mut buf = vec![0u8; 1 << 20];
        macro_rules! run {
            ($h:expr) => {{
                let mut h = $h;
                loop {
                    match f.read(&mut buf) {
                        Ok(0) => break Some(hex(&h.finalize())),
                        Ok(n) => h.update(&buf[..n]),
                        Err(_) => break None,
                    }
                }
            }};
        }
        let got = if alg == "sha256" { run!(Sha256::new()) } else { run!(Sha512::new()) };
        checked += 1;
        match got {
            Some(g) if g == hex_name => {}
            Some(g) => {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                problems.push(format!("{}: {len} bytes hash to {alg}:{g}, not to its name", path.display()));
            }
            None => problems.push(format!("{}: unreadable", path.display())),
        }
    }
    (checked, problems)
}

/// The digests a local repository (under `<root>/repos`) links as a layer or holds as a
/// manifest revision: content the store counts as pushed.
pub fn local_repo_digests(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let links = match name.as_str() {
                "_layers" => Some(e.path()),
                "_manifests" => Some(e.path().join("revisions")),
                _ if name.starts_with('_') => None,
                _ => {
                    walk(&e.path(), out);
                    None
                }
            };
            for alg in links.iter().flat_map(|l| std::fs::read_dir(l).into_iter().flatten().flatten()) {
                let alg_name = alg.file_name().to_string_lossy().into_owned();
                for f in std::fs::read_dir(alg.path()).into_iter().flatten().flatten() {
                    out.insert(format!("{alg_name}:{}", f.file_name().to_string_lossy()));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root.join("repos"), &mut out);
    out
}
