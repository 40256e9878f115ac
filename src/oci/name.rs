//! Repository names and tags, validated against the distribution-spec grammar.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

/// Longest repository name accepted (distribution's limit, host included).
pub const MAX_NAME_LEN: usize = 255;

/// A repository name such as `library/nginx` or `docker.io/library/nginx`.
///
/// Grammar: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
/// Every component starts with `[a-z0-9]`, so no component is `.`, `..` or starts with `_`:
/// a name is safe to join onto a path and cannot collide with the store's `_`-prefixed dirs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*")]
    Grammar,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn is_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: ".", "_", "__" or "-+", followed by an alphanumeric
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name's `/`-separated components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<RepoName, NameError> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if s.split('/').all(is_component) {
            Ok(RepoName(s.to_string()))
        } else {
            Err(NameError::Grammar)
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`. Never `.` or `..`, so safe as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
pub struct TagError;

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = TagError;

    fn from_str(s: &str) -> Result<Tag, TagError> {
        let b = s.as_bytes();
        let first_ok = b.first().is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok =
            b.len() <= 128 && b.iter().skip(1).all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if first_ok && rest_ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(TagError)
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        // A tag can never contain ':', so anything with one is meant as a digest.
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in ["a", "library/nginx", "docker.io/library/nginx", "a__b", "a-----b", "a.b_c/d0", "0"] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok} rejected");
        }
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "_a",
            "a/_layers",
            "a/../b",
            "..",
            ".",
            "a b",
            "a%2fb",
            "a:b",
            "a.-b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad} accepted");
        }
        assert_eq!("a".repeat(256).parse::<RepoName>(), Err(NameError::TooLong));
    }

    #[test]
    fn tags_and_references() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok} rejected");
        }
        for bad in ["", ".", "..", "-a", ".a", "a/b", "a:b", &"a".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad} accepted");
        }
        assert!(matches!("latest".parse::<Reference>(), Ok(Reference::Tag(_))));
        assert!(matches!("sha256:zz".parse::<Reference>(), Err(ReferenceError::Digest(_))));
    }

    proptest! {
        #[test]
        fn accepted_names_are_safe_paths(s in "[a-z0-9._/-]{1,40}") {
            if let Ok(n) = s.parse::<RepoName>() {
                for c in n.components() {
                    prop_assert!(c != "." && c != ".." && !c.is_empty() && !c.starts_with('_'));
                }
            }
        }

        #[test]
        fn generated_names_are_accepted(parts in proptest::collection::vec("[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,3}", 1..5)) {
            let s = parts.join("/");
            prop_assume!(s.len() <= MAX_NAME_LEN);
            prop_assert!(s.parse::<RepoName>().is_ok(), "{} rejected", s);
        }

        #[test]
        fn any_input_never_panics(s in "\\PC*") {
            let _ = s.parse::<RepoName>();
            let _ = s.parse::<Reference>();
        }

        #[test]
        fn accepted_tags_are_safe_file_names(s in "[a-zA-Z0-9._/:-]{1,20}") {
            if let Ok(t) = s.parse::<Tag>() {
                prop_assert!(t.as_str() != "." && t.as_str() != ".." && !t.as_str().contains('/'));
            }
        }
    }
}
