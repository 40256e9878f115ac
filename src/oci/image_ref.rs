//! References as operators write them on the command line and as OCI image layouts name
//! their entries (`org.opencontainers.image.ref.name`): `docker.io/library/nginx:1.27`,
//! `127.0.0.1:5001/small:v1`, `nginx:1.27*` (a tag pattern), `team/app@sha256:…`.
//! Parsed once, here, as docker parses references: the first component is a registry host
//! when it has a `.` or a `:` or is `localhost`; a name without one is short and belongs to the
//! default upstream (or a local repository), as the registry layer decides (`Proxy::resolve`).

use std::fmt;
use std::str::FromStr;

use crate::oci::{Digest, RepoName, Tag};

/// What follows the name: a tag, a tag pattern (`*`, `?`), a digest, or nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// No tag and no digest (`latest` for prefetch, every tag for export).
    None,
    Tag(Tag),
    /// A glob over tags (`1.27*`).
    Pattern(String),
    Digest(Digest),
}

/// A parsed reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host (`docker.io`, `127.0.0.1:5001`), when the reference names one.
    pub host: Option<String>,
    pub name: RepoName,
    pub selector: Selector,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reference:?} is not a valid reference: {why}")]
pub struct RefError {
    pub reference: String,
    pub why: String,
}

impl FromStr for ImageRef {
    type Err = RefError;

    fn from_str(s: &str) -> Result<ImageRef, RefError> {
        let bad = |why: &str| RefError { reference: s.to_string(), why: why.to_string() };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?)),
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag (one before it is a host's port).
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[slash..].find(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        let (host, repo) = match name.split_once('/') {
            Some((first, r)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (Some(first.to_string()), r)
            }
            _ => (None, name),
        };
        if host.as_deref().is_some_and(|h| h.is_empty() || h.contains(['@', ' '])) {
            return Err(bad("bad registry host"));
        }
        let name: RepoName = repo.parse().map_err(|e: crate::oci::name::NameError| bad(&e.to_string()))?;
        let selector = match (tag, digest) {
            (Some(_), Some(_)) => return Err(bad("give a tag or a digest, not both")),
            (None, Some(d)) => Selector::Digest(d),
            (None, None) => Selector::None,
            (Some(t), None) if t.contains(['*', '?']) => {
                let probe = t.replace(['*', '?'], "x");
                if probe.parse::<Tag>().is_err() {
                    return Err(bad("bad tag pattern"));
                }
                Selector::Pattern(t.to_string())
            }
            (Some(t), None) => Selector::Tag(t.parse().map_err(|_| bad("bad tag"))?),
        };
        Ok(ImageRef { host, name, selector })
    }
}

impl ImageRef {
    /// The repository part as written (`docker.io/library/nginx`, `team/app`).
    pub fn repository(&self) -> String {
        match &self.host {
            Some(h) => format!("{h}/{}", self.name),
            None => self.name.to_string(),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repository())?;
        match &self.selector {
            Selector::None => Ok(()),
            Selector::Tag(t) => write!(f, ":{t}"),
            Selector::Pattern(p) => write!(f, ":{p}"),
            Selector::Digest(d) => write!(f, "@{d}"),
        }
    }
}

/// A platform as `--platform` gives it: `os/arch[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = RefError;

    fn from_str(s: &str) -> Result<Platform, RefError> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || RefError { reference: s.to_string(), why: "a platform is os/arch[/variant]".into() };
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Platform { os: parts[0].into(), arch: parts[1].into(), variant: parts.get(2).map(|v| v.to_string()) })
    }
}

impl Platform {
    /// A comma-separated list (`linux/amd64,linux/arm64`).
    pub fn parse_list(s: &str) -> Result<Vec<Platform>, RefError> {
        s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::parse).collect()
    }

    /// Whether an index entry's `platform` object is this platform (a variant is compared only
    /// when this one names it).
    pub fn matches(&self, platform: &serde_json::Value) -> bool {
        let field = |k: &str| platform.get(k).and_then(serde_json::Value::as_str);
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.arch.as_str())
            && self.variant.as_deref().is_none_or(|v| field("variant") == Some(v))
    }
}

/// Whether a descriptor (of an index's `manifests`) is for one of `platforms`; every
/// descriptor is when no platform was asked for, and one without a `platform` (an attestation,
/// an artifact) always is.
pub fn wanted(platforms: &[Platform], descriptor: &serde_json::Value) -> bool {
    match descriptor.get("platform") {
        _ if platforms.is_empty() => true,
        None => true,
        Some(p) => platforms.iter().any(|want| want.matches(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        s.parse().unwrap()
    }

    #[test]
    fn references_parse_as_docker_does() {
        let a = r("docker.io/library/nginx:1.27");
        assert_eq!((a.host.as_deref(), a.name.as_str()), (Some("docker.io"), "library/nginx"));
        assert_eq!(a.selector, Selector::Tag("1.27".parse().unwrap()));
        let b = r("127.0.0.1:5001/small:v1");
        assert_eq!((b.host.as_deref(), b.name.as_str()), (Some("127.0.0.1:5001"), "small"));
        let c = r("nginx:1.27*");
        assert_eq!((c.host, c.selector), (None, Selector::Pattern("1.27*".into())));
        let d = r("localhost/team/app");
        assert_eq!((d.host.as_deref(), d.selector), (Some("localhost"), Selector::None));
        let e = r("team/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(matches!(e.selector, Selector::Digest(_)));
        assert_eq!(e.to_string(), "team/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(r("127.0.0.1:5001/a/b").to_string(), "127.0.0.1:5001/a/b");
        for bad in [
            "",
            "UPPER/case",
            "a:b:c",
            "x@sha256:12",
            "a:v1@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn platforms() {
        let l = Platform::parse_list("linux/amd64, linux/arm64/v8").unwrap();
        assert_eq!(l.len(), 2);
        let arm = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let amd = serde_json::json!({"os": "linux", "architecture": "amd64"});
        assert!(l[0].matches(&amd) && !l[0].matches(&arm) && l[1].matches(&arm));
        assert!(wanted(&l[..1], &serde_json::json!({"digest": "x"})));
        assert!(!wanted(&l[..1], &serde_json::json!({"platform": arm})));
        assert!(Platform::parse_list("linux").is_err());
    }
}
