//! Byte ranges: the `Range` request header on blob GETs and `Content-Range` on upload PATCHes.

/// An inclusive byte range `start..=end` resolved against a known size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The outcome of applying a `Range` header to a blob of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable single range: serve the whole blob (RFC 9110 lets a server ignore a
    /// syntactically invalid or multi-part `Range`).
    Full,
    Partial(ByteRange),
    /// Well-formed but outside the blob: 416.
    Unsatisfiable,
}

fn num(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `Range: bytes=a-b | bytes=a- | bytes=-n` against a blob of `size` bytes.
pub fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeRequest::Full,
        (true, false) => {
            // suffix: the last n bytes
            let Some(n) = num(b) else { return RangeRequest::Full };
            if n == 0 || size == 0 {
                return RangeRequest::Unsatisfiable;
            }
            let n = n.min(size);
            RangeRequest::Partial(ByteRange { start: size - n, end: size - 1 })
        }
        (false, _) => {
            let Some(start) = num(a) else { return RangeRequest::Full };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) => e,
                    None => return RangeRequest::Full,
                }
            };
            if end < start {
                return RangeRequest::Full;
            }
            if start >= size {
                return RangeRequest::Unsatisfiable;
            }
            RangeRequest::Partial(ByteRange { start, end: end.min(size - 1) })
        }
    }
}

/// Parses an upload chunk's `Content-Range`: `a-b` as the spec writes it, also accepting
/// `bytes a-b/*`, `bytes a-b/total` and `bytes=a-b`. Returns `(start, end)` inclusive.
pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
    let s = header.trim();
    let s = s.strip_prefix("bytes=").or_else(|| s.strip_prefix("bytes ")).unwrap_or(s).trim();
    let s = s.split_once('/').map_or(s, |(r, _)| r);
    let (a, b) = s.split_once('-')?;
    let (start, end) = (num(a.trim())?, num(b.trim())?);
    (end >= start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: u64, e: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start: s, end: e })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), p(0, 9));
        assert_eq!(parse_range("bytes=10-", 100), p(10, 99));
        assert_eq!(parse_range("bytes=90-200", 100), p(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), p(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), p(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=0-1,3-4", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=99999999999999999999999-", 100), RangeRequest::Full);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes=5-5"), Some((5, 5)));
        assert_eq!(parse_content_range("9-1"), None);
        assert_eq!(parse_content_range("a-b"), None);
        assert_eq!(parse_content_range("-5"), None);
        assert_eq!(parse_content_range("99999999999999999999999-99999999999999999999999"), None);
    }

    proptest! {
        #[test]
        fn partial_ranges_lie_inside_the_blob(h in "\\PC{0,30}", size in 0u64..10_000) {
            if let RangeRequest::Partial(r) = parse_range(&h, size) {
                prop_assert!(r.start <= r.end && r.end < size);
            }
        }

        #[test]
        fn explicit_ranges_parse(a in 0u64..1_000_000, len in 1u64..1_000_000, size in 1u64..2_000_000) {
            let b = a + len - 1;
            match parse_range(&format!("bytes={a}-{b}"), size) {
                RangeRequest::Partial(r) => prop_assert_eq!((r.start, r.end), (a, b.min(size - 1))),
                RangeRequest::Unsatisfiable => prop_assert!(a >= size),
                RangeRequest::Full => prop_assert!(false, "full"),
            }
            prop_assert_eq!(parse_content_range(&format!("{a}-{b}")), Some((a, b)));
        }

        #[test]
        fn content_range_never_panics(h in "\\PC{0,40}") {
            if let Some((s, e)) = parse_content_range(&h) {
                prop_assert!(s <= e);
            }
        }
    }
}
