//! S3 for the tests: `moto_server` (PyPI `moto[server]`, installed by
//! `scripts/install-test-deps.sh`) on 127.0.0.1 on a free port, one per test process, and a
//! small unsigned client for what tests check in the bucket (moto accepts unsigned requests
//! for these): objects under a prefix, unfinished multipart uploads.
//!
//! The suites run against S3 through their `*_s3` twin binaries (`tests/api_s3.rs`
//! `include!`s `tests/api.rs`): the launcher ([`super::stevedore::Builder`]) puts every
//! server of a binary whose crate name ends in `_s3` on moto (see [`suite_backend`]), one
//! bucket per store root, so a restart on the same root finds its bucket.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::proc::{self, Daemon};

/// Which backend servers of this test binary run on, unless a test says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Fs,
    S3,
}

/// `S3` in the `*_s3` twin binaries, `Fs` elsewhere.
pub fn suite_backend() -> Backend {
    if env!("CARGO_CRATE_NAME").ends_with("_s3") {
        Backend::S3
    } else {
        Backend::Fs
    }
}

/// `text` as the config of a one-shot command (`import`, `gc`, `fsck`) on the store at
/// `root`, on the suite's backend as the launcher puts servers there (S3: the root's bucket).
pub fn cli_config(root: &Path, text: &str) -> String {
    match suite_backend() {
        Backend::S3 => format!("{text}\n[storage]\n{}", Bucket::for_root(root).config()),
        Backend::Fs => text.to_string(),
    }
}

/// The prefix every test store uses in its bucket (so prefixes are exercised).
pub const PREFIX: &str = "stevedore";
/// The multipart part size test servers use: S3's minimum, so small test data spans parts.
pub const PART_SIZE: u64 = 5 << 20;

/// The moto server of this test process.
pub struct Moto {
    pub port: u16,
    pub log: PathBuf,
}

/// Where `moto_server` is: `$STEVEDORE_MOTO_SERVER`, else on `PATH`, else in the virtualenv
/// the install script makes. Panics with the install hint when it is in none of them.
fn moto_bin() -> PathBuf {
    if let Ok(p) = std::env::var("STEVEDORE_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("moto_server");
        if p.is_file() {
            return p;
        }
    }
    let venv =
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/stevedore-test-venv/bin/moto_server");
    if venv.is_file() {
        return venv;
    }
    panic!(
        "moto_server (PyPI `moto[server]`) is required by the S3 tests and was not found: run \
         `bash scripts/install-test-deps.sh`"
    );
}

/// The moto server of this test process, started on first use. It is started from a thread
/// that lives as long as the process (`--pdeathsig` fires when the spawning *thread* exits),
/// and dies with the process.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let dir = tempfile::Builder::new().prefix("moto-").tempdir().expect("tempdir").keep();
            let log = dir.join("moto.log");
            let port = proc::closed_port();
            let mut cmd = proc::with_pdeathsig(moto_bin());
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            cmd.env("PYTHONUNBUFFERED", "1");
            let mut daemon = Daemon::spawn("moto_server", cmd, &log);
            daemon.wait_ready(Duration::from_secs(60), || proc::http_get_status(port, "/").is_some());
            tx.send(Moto { port, log }).unwrap();
            // Keep the daemon (and this thread, its parent) alive until the process exits.
            loop {
                std::thread::park();
                let _ = &daemon;
            }
        });
        rx.recv_timeout(Duration::from_secs(90)).expect("moto_server did not start")
    })
}

/// One HTTP/1.1 request to moto, unsigned; (status, body).
pub fn request(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to moto");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("moto response");
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.get(9..12).and_then(|c| c.parse().ok()).expect("status code");
    let mut body = resp[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

/// Every `<tag>…</tag>` in `xml`, in order.
fn tags(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open).skip(1).filter_map(|s| s.split(&close).next()).map(|s| s.to_string()).collect()
}

/// A test store's bucket on moto.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub port: u16,
    pub name: String,
    /// `stevedore/`
    pub prefix: String,
}

impl Bucket {
    /// The bucket of the store rooted at `root` (created if need be): one per root, so a
    /// server restarted on a root finds its content.
    pub fn for_root(root: &Path) -> Bucket {
        let m = moto();
        let h = {
            use sha2::Digest;
            super::data::hex(&sha2::Sha256::digest(root.to_string_lossy().as_bytes()))
        };
        let name = format!("st-{}", &h[..20]);
        let (status, body) = request(m.port, "PUT", &format!("/{name}"), b"");
        assert!(status == 200 || status == 409, "creating bucket {name}: {status} {}", String::from_utf8_lossy(&body));
        Bucket { port: m.port, name, prefix: format!("{PREFIX}/") }
    }

    /// The `[storage]` settings of a server on this bucket.
    pub fn config(&self) -> String {
        format!(
            "backend = \"s3\"\n\n[storage.s3]\nbucket = \"{}\"\nregion = \"us-east-1\"\nendpoint = \"http://127.0.0.1:{}\"\n\
             allow_http = true\nprefix = \"{PREFIX}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n\
             part_size = \"{}\"\n",
            self.name, self.port, PART_SIZE
        )
    }

    /// Keys (below the store's prefix) and sizes of the objects whose key starts with `under`.
    pub fn objects(&self, under: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = format!("/{}?list-type=2&prefix={}{}", self.name, self.prefix, under);
            if let Some(t) = &token {
                q.push_str(&format!("&continuation-token={}", urlencode(t)));
            }
            let (status, body) = request(self.port, "GET", &q, b"");
            let xml = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(status, 200, "listing {q}: {xml}");
            for c in tags(&xml, "Contents") {
                let key = tags(&c, "Key").pop().unwrap_or_default();
                let size = tags(&c, "Size").pop().and_then(|s| s.parse().ok()).unwrap_or(0);
                out.push((key.strip_prefix(&self.prefix).unwrap_or(&key).to_string(), size));
            }
            token = tags(&xml, "NextContinuationToken").pop();
            if token.is_none() {
                break;
            }
        }
        out.sort();
        out
    }

    /// Committed blobs as `alg:hex`, sorted.
    pub fn blobs(&self) -> Vec<String> {
        self.objects("blobs/")
            .into_iter()
            .filter_map(|(k, _)| {
                let parts: Vec<&str> = k.split('/').collect();
                (parts.len() == 4).then(|| format!("{}:{}", parts[1], parts[3]))
            })
            .collect()
    }

    /// An object's bytes (key below the prefix), `None` when absent. moto refuses unsigned
    /// object GETs: this one is signed, by curl (`--aws-sigv4`).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test", "-w", "%{http_code}", "-o"])
            .arg(out.path())
            .arg(format!("http://127.0.0.1:{}/{}/{}{key}", self.port, self.name, self.prefix));
        let res = proc::run("curl (signed S3 GET)", cmd, Duration::from_secs(60));
        let status = res.stdout.trim().to_string();
        match status.as_str() {
            "200" => Some(std::fs::read(out.path()).unwrap()),
            "404" => None,
            s => panic!("GET {key}: {s}: {}", String::from_utf8_lossy(&std::fs::read(out.path()).unwrap_or_default())),
        }
    }

    /// Writes an object (key below the prefix) with `bytes`, signed by curl as [`Bucket::get`].
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), bytes).unwrap();
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test", "-w", "%{http_code}", "-o"])
            .arg("/dev/null")
            .arg("-T")
            .arg(file.path())
            .arg(format!("http://127.0.0.1:{}/{}/{}{key}", self.port, self.name, self.prefix));
        let res = proc::run("curl (signed S3 PUT)", cmd, Duration::from_secs(60));
        assert_eq!(res.stdout.trim(), "200", "PUT {key}");
    }

    /// Deletes an object (key below the prefix), signed by curl as [`Bucket::get`].
    pub fn delete(&self, key: &str) {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test", "-w", "%{http_code}", "-o"])
            .arg("/dev/null")
            .args(["-X", "DELETE"])
            .arg(format!("http://127.0.0.1:{}/{}/{}{key}", self.port, self.name, self.prefix));
        let res = proc::run("curl (signed S3 DELETE)", cmd, Duration::from_secs(60));
        assert_eq!(res.stdout.trim(), "204", "DELETE {key}");
    }

    /// The ETag (as listed, quotes included) of the object `key` (below the prefix).
    pub fn etag(&self, key: &str) -> Option<String> {
        let q = format!("/{}?list-type=2&prefix={}{key}", self.name, self.prefix);
        let (status, body) = request(self.port, "GET", &q, b"");
        let xml = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "listing {q}: {xml}");
        let full = format!("{}{key}", self.prefix);
        tags(&xml, "Contents")
            .iter()
            .find(|c| tags(c, "Key").pop().as_deref() == Some(full.as_str()))
            .and_then(|c| tags(c, "ETag").pop())
            .map(|e| e.replace("&quot;", "\"").replace("&#34;", "\""))
    }

    /// Whether the object `key` (below the prefix) exists.
    pub fn has(&self, key: &str) -> bool {
        self.objects(key).iter().any(|(k, _)| k == key)
    }

    /// Unfinished multipart uploads: (key below the prefix, upload id).
    pub fn multipart_uploads(&self) -> Vec<(String, String)> {
        let (status, body) = request(self.port, "GET", &format!("/{}?uploads", self.name), b"");
        let xml = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "listing multipart uploads: {xml}");
        tags(&xml, "Upload")
            .iter()
            .map(|u| {
                let key = tags(u, "Key").pop().unwrap_or_default();
                (
                    key.strip_prefix(&self.prefix).unwrap_or(&key).to_string(),
                    tags(u, "UploadId").pop().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The part numbers a multipart upload (`key` below the prefix) holds so far, in order.
    /// (`ListParts`, signed by curl as [`Bucket::get`].)
    pub fn parts(&self, key: &str, upload: &str) -> Vec<u32> {
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "test:test", "-w", "%{http_code}", "-o"])
            .arg(out.path())
            .arg(format!(
                "http://127.0.0.1:{}/{}/{}{key}?uploadId={}",
                self.port,
                self.name,
                self.prefix,
                urlencode(upload)
            ));
        let res = proc::run("curl (signed S3 ListParts)", cmd, Duration::from_secs(60));
        let xml = String::from_utf8_lossy(&std::fs::read(out.path()).unwrap_or_default()).into_owned();
        assert_eq!(res.stdout.trim(), "200", "listing the parts of {key}: {xml}");
        tags(&xml, "Part").iter().filter_map(|p| tags(p, "PartNumber").pop()?.parse().ok()).collect()
    }

    /// Every committed blob's bytes hash to its name. Returns how many were checked.
    pub fn assert_blobs_intact(&self) -> usize {
        let blobs = self.blobs();
        for b in &blobs {
            let (alg, hex) = b.split_once(':').unwrap();
            let bytes = self.get(&format!("blobs/{alg}/{}/{hex}", &hex[..2])).expect("listed blob");
            let got = match alg {
                "sha256" => {
                    use sha2::Digest;
                    super::data::hex(&sha2::Sha256::digest(&bytes))
                }
                "sha512" => {
                    use sha2::Digest;
                    super::data::hex(&sha2::Sha512::digest(&bytes))
                }
                other => panic!("unexpected algorithm {other}"),
            };
            assert_eq!(&got, hex, "blob {b} in the bucket does not hash to its name");
        }
        blobs.len()
    }
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
