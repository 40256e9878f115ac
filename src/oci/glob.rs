//! Glob patterns on names and tags (`auth.rules` repositories, `proxy.local_namespaces`,
//! `upstreams.immutable_tags`, prefetch and export tag patterns): the one matcher.
//!
//! `*` matches any run of bytes, `/` included (`team/*` matches `team/a/b`); `?` matches one
//! byte; every other byte matches itself. There is no `{}`, `[]`, `**` and no escaping.
//!
//! Matching is a two-pointer scan that backtracks only to the last `*` seen: at most
//! `pattern.len() × text.len()` steps, whatever the pattern (a recursive matcher is
//! exponential in the number of `*`; patterns are also bounded, [`check`], so a client-supplied
//! name or a prefetch pattern costs microseconds).

/// The longest pattern accepted (bytes).
pub const MAX_PATTERN_BYTES: usize = 256;
/// The most `*` a pattern may hold.
pub const MAX_STARS: usize = 16;

/// Why a pattern is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("a pattern may be at most {MAX_PATTERN_BYTES} bytes long ({0} given)")]
    TooLong(usize),
    #[error("a pattern may hold at most {MAX_STARS} `*` ({0} given)")]
    TooManyStars(usize),
}

/// Whether `pattern` is within the limits (at config load and at the endpoints).
pub fn check(pattern: &str) -> Result<(), GlobError> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(GlobError::TooLong(pattern.len()));
    }
    let stars = pattern.bytes().filter(|b| *b == b'*').count();
    if stars > MAX_STARS {
        return Err(GlobError::TooManyStars(stars));
    }
    Ok(())
}

/// Whether `text` matches `pattern` as a whole.
pub fn matches(pattern: &str, text: &str) -> bool {
    matches_bytes(pattern.as_bytes(), text.as_bytes())
}

fn matches_bytes(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // The last `*` seen and where in `s` its run ends so far: on a mismatch, that `*` takes
    // one byte more and the rest of the pattern is tried again from there. An earlier `*`
    // never needs to take more: whatever it could, the last one can too.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, end)) => {
                    star = Some((sp, end + 1));
                    pi = sp + 1;
                    si = end + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The recursive matcher this one replaces (exponential in the number of `*`): the
    /// reference for the meaning.
    fn recursive(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => recursive(&p[1..], s) || (!s.is_empty() && recursive(p, &s[1..])),
            (Some(b'?'), Some(_)) => recursive(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => recursive(&p[1..], &s[1..]),
            _ => false,
        }
    }

    #[test]
    fn meaning() {
        assert!(matches("v*", "v1.2.3"));
        assert!(matches("v?.?", "v1.2"));
        assert!(matches("*", ""));
        assert!(matches("team/*", "team/a/b"));
        assert!(matches("*-amd64", "1.27-alpine-amd64"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("v*", "latest"));
        assert!(!matches("1.?", "1.10"));
        assert!(!matches("team/*", "team"));
        assert!(!matches("?", ""));
        assert!(!matches("[ab]", "a"), "no character classes");
        assert!(matches("[ab]", "[ab]"));
        assert!(matches("**", "a/b"), "** is two stars");
        // A literal `*` or `?` in the text is matched by `*`/`?` only.
        assert!(matches("a?c", "a*c"));
        assert!(!matches("abc", "a*c"));
    }

    #[test]
    fn the_backtracking_trap_is_fast() {
        let text = "a".repeat(128);
        let p = format!("{}b", "*a".repeat(16));
        let start = std::time::Instant::now();
        assert!(!matches(&p, &text));
        let cosign = format!("sha256-{}.sig", "0".repeat(64));
        assert!(!matches("*0*0*0*0*0*0*0*x", &cosign));
        assert!(matches("sha256-*.sig", &cosign));
        assert!(start.elapsed() < std::time::Duration::from_millis(100), "{:?}", start.elapsed());
    }

    #[test]
    fn limits() {
        assert_eq!(check(&"*".repeat(16)), Ok(()));
        assert_eq!(check(&"*".repeat(17)), Err(GlobError::TooManyStars(17)));
        assert_eq!(check(&"a".repeat(256)), Ok(()));
        assert_eq!(check(&"a".repeat(257)), Err(GlobError::TooLong(257)));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
        #[test]
        fn same_as_the_recursive_matcher(p in "[ab*?/]{0,8}", s in "[ab*?/]{0,12}") {
            prop_assert_eq!(matches(&p, &s), recursive(p.as_bytes(), s.as_bytes()), "{:?} on {:?}", p, s);
        }
    }
}
