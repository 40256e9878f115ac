//! Manifest parsing for validation only: the stored and served bytes are always the exact bytes
//! received. This reads what a registry must check (schema, media type, descriptors, subject)
//! and lists the content a manifest references.

use base64::Engine as _;
use serde_json::{Map, Value};

use super::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest accepted on PUT (and fetched from an upstream).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// OCI image manifest or Docker schema2: a config and layers.
    Image,
    /// OCI index or Docker manifest list: child manifests.
    Index,
}

pub fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        _ => None,
    }
}

/// A content descriptor as found in a manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// `data` was present and matches the digest.
    pub embedded: bool,
    pub urls: bool,
}

impl Descriptor {
    /// Non-distributable ("foreign") layers need not exist in the registry.
    pub fn is_non_distributable(&self) -> bool {
        self.media_type.contains(".nondistributable.")
            || self.media_type == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    }
}

/// What a manifest references that must already be in the repository.
#[derive(Clone, Debug, PartialEq)]
pub enum Required {
    Blob(Digest),
    Manifest(Digest),
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub media_type: String,
    pub kind: Kind,
    pub subject: Option<Descriptor>,
    /// `artifactType`, else (image manifests) the config's media type: what referrers report.
    pub artifact_type: Option<String>,
    pub annotations: Option<Map<String, Value>>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError(msg.into()))
}

fn descriptor(v: &Value, at: &str) -> Result<Descriptor, ManifestError> {
    let Some(o) = v.as_object() else { return err(format!("{at}: descriptor must be an object")) };
    let Some(media_type) = o.get("mediaType").and_then(Value::as_str) else {
        return err(format!("{at}: mediaType is required"));
    };
    let Some(digest) = o.get("digest").and_then(Value::as_str) else {
        return err(format!("{at}: digest is required"));
    };
    let digest: Digest = digest.parse().map_err(|e| ManifestError(format!("{at}: {e}")))?;
    let Some(size) = o.get("size").and_then(Value::as_u64) else {
        return err(format!("{at}: size must be a non-negative integer"));
    };
    let embedded = match o.get("data") {
        None => false,
        Some(Value::String(b64)) => {
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                return err(format!("{at}: data is not base64"));
            };
            if bytes.len() as u64 != size || Digest::of(digest.algorithm(), &bytes) != digest {
                return err(format!("{at}: data does not match size and digest"));
            }
            true
        }
        Some(_) => return err(format!("{at}: data must be a string")),
    };
    Ok(Descriptor { media_type: media_type.to_string(), digest, size, embedded, urls: o.contains_key("urls") })
}

fn descriptors(o: &Map<String, Value>, key: &str, required: bool) -> Result<Vec<Descriptor>, ManifestError> {
    match o.get(key) {
        None if !required => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().enumerate().map(|(i, v)| descriptor(v, &format!("{key}[{i}]"))).collect(),
        _ => err(format!("{key} must be an array")),
    }
}

fn strip_params(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Parses and validates a manifest body. `content_type` is the request's `Content-Type`.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(bytes) else {
        return err("manifest is not a JSON object");
    };
    if o.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return err("schemaVersion must be 2");
    }
    let body_type = match o.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return err("mediaType must be a string"),
    };
    let header_type = content_type.map(strip_params).filter(|t| !t.is_empty() && kind_of(t).is_some());
    let media_type = match (header_type, body_type) {
        (Some(h), Some(b)) if h != b => return err(format!("Content-Type {h} does not match mediaType {b}")),
        (Some(h), _) => h.to_string(),
        (None, Some(b)) => b.to_string(),
        (None, None) if o.contains_key("manifests") => OCI_INDEX.to_string(),
        (None, None) if o.contains_key("config") => OCI_MANIFEST.to_string(),
        (None, None) => return err("cannot tell the manifest's media type"),
    };
    let Some(kind) = kind_of(&media_type) else {
        return err(format!("unsupported manifest media type {media_type}"));
    };
    let subject = o.get("subject").map(|v| descriptor(v, "subject")).transpose()?;
    let artifact_type = match o.get("artifactType") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return err("artifactType must be a string"),
    };
    let annotations = match o.get("annotations") {
        None => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return err("annotations must be an object"),
    };
    let mut m = Manifest {
        media_type,
        kind,
        subject,
        artifact_type,
        annotations,
        config: None,
        layers: Vec::new(),
        manifests: Vec::new(),
    };
    match kind {
        Kind::Image => {
            let Some(config) = o.get("config") else { return err("config is required") };
            let config = descriptor(config, "config")?;
            if m.artifact_type.is_none() {
                m.artifact_type = Some(config.media_type.clone());
            }
            m.config = Some(config);
            m.layers = descriptors(&o, "layers", false)?;
        }
        Kind::Index => m.manifests = descriptors(&o, "manifests", true)?,
    }
    Ok(m)
}

impl Manifest {
    /// Content that must be present in the repository before this manifest is accepted.
    pub fn required(&self) -> Vec<Required> {
        let mut out = Vec::new();
        if let Some(c) = &self.config {
            if !c.embedded {
                out.push(Required::Blob(c.digest.clone()));
            }
        }
        for l in &self.layers {
            if !l.embedded && !l.is_non_distributable() {
                out.push(Required::Blob(l.digest.clone()));
            }
        }
        for m in &self.manifests {
            out.push(Required::Manifest(m.digest.clone()));
        }
        out
    }

    /// The descriptor this manifest contributes to its subject's referrers list.
    pub fn referrer_descriptor(&self, digest: &Digest, size: u64) -> Value {
        let mut d = Map::new();
        d.insert("mediaType".into(), Value::String(self.media_type.clone()));
        d.insert("digest".into(), Value::String(digest.to_string()));
        d.insert("size".into(), Value::from(size));
        if let Some(t) = &self.artifact_type {
            d.insert("artifactType".into(), Value::String(t.clone()));
        }
        if let Some(a) = &self.annotations {
            d.insert("annotations".into(), Value::Object(a.clone()));
        }
        Value::Object(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> String {
        Digest::sha256(b).to_string()
    }

    #[test]
    fn image_manifest() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":1}},
                      {{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{}","size":1,"urls":["http://x"]}}],
            "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9}},"x-unknown":1}}"#,
            d(b"{}"),
            d(b"a"),
            d(b"b"),
            d(b"s")
        );
        let m = parse(body.as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(m.kind, Kind::Image);
        assert_eq!(m.required(), vec![Required::Blob(Digest::sha256(b"{}")), Required::Blob(Digest::sha256(b"a"))]);
        assert_eq!(m.subject.unwrap().digest, Digest::sha256(b"s"));
        assert_eq!(m.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
    }

    #[test]
    fn embedded_data_must_match() {
        let ok = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{}","size":2,"data":"e30="}},"layers":[]}}"#,
            d(b"{}")
        );
        let m = parse(ok.as_bytes(), None).unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
        assert!(m.required().is_empty());
        let bad = ok.replace("e30=", "e31=");
        assert!(parse(bad.as_bytes(), None).is_err());
    }

    #[test]
    fn invalid_manifests() {
        for bad in [
            "not json",
            "[]",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#,
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:abc","size":1}]}"#,
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","size":-1}]}"#,
            r#"{"schemaVersion":2,"mediaType":"text/plain","manifests":[]}"#,
        ] {
            assert!(parse(bad.as_bytes(), None).is_err(), "{bad} accepted");
        }
        let idx = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(parse(idx.as_bytes(), Some(OCI_MANIFEST)).is_err(), "mismatched Content-Type accepted");
        assert_eq!(parse(idx.as_bytes(), Some("application/json")).unwrap().kind, Kind::Index);
    }
}
