//! `[storage]` and `[storage.s3]`: where the store lives.

#[allow(unused_imports)]
use super::*;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where content lives: `fs` (under `root`) or `s3` (`[storage.s3]`).
    pub backend: BackendKind,
    /// Root directory of the filesystem store; with `backend = "s3"`, local scratch space
    /// (spools of writes in progress), never the content.
    pub root: PathBuf,
    /// fsync content and directories before each rename (off only for throw-away caches).
    pub fsync: bool,
    /// The object store, with `backend = "s3"`.
    pub s3: S3Config,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Fs,
    S3,
}

/// An S3-compatible bucket. `Debug` is written by hand: it never shows the secret key.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// The service URL (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:9000`);
    /// empty: AWS for `region`. A custom endpoint is addressed path-style.
    pub endpoint: String,
    /// Every object's key starts with this (`stevedore/`); empty for the bucket's root.
    pub prefix: String,
    /// Credentials; when none are given, the AWS environment (`AWS_ACCESS_KEY_ID`, ...,
    /// instance metadata) is used.
    pub access_key_id: Option<String>,
    pub access_key_id_file: Option<PathBuf>,
    pub access_key_id_env: Option<String>,
    pub secret_access_key: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    pub secret_access_key_env: Option<String>,
    /// Allow an `http://` endpoint (tests, a store on the same host); off: TLS only.
    pub allow_http: bool,
    /// Multipart upload part size (at least 5 MiB, S3's minimum).
    pub part_size: ByteSize,
    /// Memory for parts being uploaded, for the whole process (at least one part): writes
    /// spool to `storage.root` and wait for this budget before a part is sent.
    pub buffer_memory: ByteSize,
    /// The largest object the store copies in one `CopyObject` (S3: 5 GiB; some compatible
    /// stores allow less). A pushed blob larger than this is made visible by a server-side
    /// multipart copy (`UploadPartCopy`) in parts of at most this size.
    pub max_copy_size: ByteSize,
    /// Blob GETs are answered `307` to a presigned GET URL of the object (valid for
    /// `redirect_expiry`) instead of streamed through Stevedore; only for requests that
    /// passed authorization, the client fetches from the bucket's endpoint itself.
    pub redirect: bool,
    #[serde(with = "humantime_serde")]
    pub redirect_expiry: Duration,
    /// Blobs are written with conditional writes (`If-None-Match: *`), so that content in
    /// place is never replaced (first writer wins): `auto` detects them at start-up (a probe
    /// key in `meta/`), `always` / `never` say so. Without them a HEAD before each write keeps
    /// a blob in place (a narrower guard: two writers may both see it absent).
    pub conditional_put: ConditionalPut,
}

/// `storage.s3.conditional_put`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConditionalPut {
    #[default]
    Auto,
    Always,
    Never,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |set: bool| if set { Some("<redacted>") } else { None };
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &redact_url(&self.endpoint))
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("access_key_id_file", &self.access_key_id_file)
            .field("access_key_id_env", &self.access_key_id_env)
            .field("secret_access_key", &redacted(self.secret_access_key.is_some()))
            .field("secret_access_key_file", &self.secret_access_key_file)
            .field("secret_access_key_env", &self.secret_access_key_env)
            .field("allow_http", &self.allow_http)
            .field("part_size", &self.part_size)
            .field("buffer_memory", &self.buffer_memory)
            .field("max_copy_size", &self.max_copy_size)
            .field("redirect", &self.redirect)
            .field("redirect_expiry", &self.redirect_expiry)
            .field("conditional_put", &self.conditional_put)
            .finish()
    }
}

impl Default for S3Config {
    fn default() -> S3Config {
        S3Config {
            bucket: String::new(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            prefix: String::new(),
            access_key_id: None,
            access_key_id_file: None,
            access_key_id_env: None,
            secret_access_key: None,
            secret_access_key_file: None,
            secret_access_key_env: None,
            allow_http: false,
            part_size: ByteSize(8 << 20),
            buffer_memory: ByteSize(256 << 20),
            max_copy_size: ByteSize(5 << 30),
            redirect: false,
            redirect_expiry: Duration::from_secs(300),
            conditional_put: ConditionalPut::Auto,
        }
    }
}

/// One secret given inline, in a file (trailing newline trimmed) or in an environment
/// variable; `key` names it in errors.
pub fn read_secret(
    key: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<Option<String>, String> {
    match (inline, file, env) {
        (Some(v), _, _) => Ok(Some(v.clone())),
        (_, Some(f), _) => std::fs::read_to_string(f)
            .map(|s| Some(s.trim_end().to_string()))
            .map_err(|e| format!("{key}_file {}: {e}", f.display())),
        (_, _, Some(v)) => std::env::var(v).map(Some).map_err(|_| format!("{key}_env {v} is not set")),
        _ => Ok(None),
    }
}

impl S3Config {
    /// The access key id and secret key, if configured (both or neither).
    pub fn credentials(&self) -> Result<Option<(String, String)>, String> {
        let id = read_secret("access_key_id", &self.access_key_id, &self.access_key_id_file, &self.access_key_id_env)?;
        let secret = read_secret(
            "secret_access_key",
            &self.secret_access_key,
            &self.secret_access_key_file,
            &self.secret_access_key_env,
        )?;
        match (id, secret) {
            (Some(i), Some(s)) => Ok(Some((i, s))),
            (None, None) => Ok(None),
            _ => Err("give both access_key_id and secret_access_key (or neither, for the AWS environment)".into()),
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: String| Err(ConfigError::Invalid { key, why });
        if self.bucket.is_empty() {
            return invalid("storage.s3.bucket", "must be set with storage.backend = \"s3\"".into());
        }
        if self.region.is_empty() {
            return invalid("storage.s3.region", "must not be empty".into());
        }
        if !self.endpoint.is_empty() {
            match reqwest::Url::parse(&self.endpoint) {
                Ok(u) if u.scheme() == "https" || (u.scheme() == "http" && self.allow_http) => {}
                Ok(u) if u.scheme() == "http" => {
                    return invalid("storage.s3.endpoint", "is http:// but storage.s3.allow_http is off".into())
                }
                _ => {
                    return invalid(
                        "storage.s3.endpoint",
                        format!("{:?} is not an http(s) URL", redact_url(&self.endpoint)),
                    )
                }
            }
        }
        if self.prefix.starts_with('/') || self.prefix.split('/').any(|c| c == "." || c == "..") {
            return invalid("storage.s3.prefix", format!("{:?} must be a relative key prefix", self.prefix));
        }
        for (key, n) in [
            (
                "storage.s3.access_key_id",
                self.access_key_id.is_some() as u8
                    + self.access_key_id_file.is_some() as u8
                    + self.access_key_id_env.is_some() as u8,
            ),
            (
                "storage.s3.secret_access_key",
                self.secret_access_key.is_some() as u8
                    + self.secret_access_key_file.is_some() as u8
                    + self.secret_access_key_env.is_some() as u8,
            ),
        ] {
            if n > 1 {
                return invalid(key, "give one of the value, _file and _env".into());
            }
        }
        if let Err(why) = self.credentials() {
            return invalid("storage.s3.secret_access_key", why);
        }
        if self.part_size.0 < 5 << 20 || self.part_size.0 > 5 << 30 {
            return invalid("storage.s3.part_size", "must be between 5MiB and 5GiB".into());
        }
        if self.buffer_memory.0 < self.part_size.0 {
            return invalid("storage.s3.buffer_memory", "must hold at least one part (storage.s3.part_size)".into());
        }
        if self.max_copy_size.0 < 5 << 20 || self.max_copy_size.0 > 5 << 30 {
            return invalid("storage.s3.max_copy_size", "must be between 5MiB and 5GiB".into());
        }
        // SigV4 presigned URLs are valid for 7 days at most.
        if self.redirect
            && (self.redirect_expiry < Duration::from_secs(1) || self.redirect_expiry > Duration::from_secs(7 * 86400))
        {
            return invalid("storage.s3.redirect_expiry", "must be between 1s and 7 days".into());
        }
        Ok(())
    }
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig { backend: BackendKind::Fs, root: PathBuf::from("./data"), fsync: true, s3: S3Config::default() }
    }
}
