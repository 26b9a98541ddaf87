//! Path confinement: the request path's dot segments are removed (RFC 3986
//! §5.2.4) before it is joined under the app's published prefix, reading
//! the path the way backends will once they decode it, and a path that
//! climbs above its root is refused. Pure functions.
//!
//! The rules (ARCHITECTURE.md, "Path confinement", says why):
//!
//! - The path ends at the first `?` or `#`; what follows is passed on
//!   untouched.
//! - Separators: `/`, `\`, and the single-encoded `%2f` and `%5c` (either
//!   case). Backends that decode them, or that run on Windows, split there.
//! - A segment is a dot segment when, ignoring a `;parameter` tail (`;` or
//!   `%3b`: Tomcat and Jetty read `..;x` as `..`), it is one or two dots,
//!   each written as `.` or `%2e` (either case). `%252e` is not a dot: a
//!   backend decodes it once, to the text `%2e`. Neither are `...`,
//!   `%c0%ae` (overlong UTF-8) or `%u002e` (IIS's old `%u` form).
//! - `.` is removed and `..` removes the segment before it, as in RFC 3986;
//!   a `..` with nothing left to remove would leave the prefix, and the
//!   request is refused.
//! - A path without dot segments is forwarded byte for byte. One with them
//!   keeps its other segments byte for byte, each with the separator that
//!   preceded it, except that it always starts with `/`; a path that ended
//!   in a dot segment ends with `/`.
//!
//! So whatever a backend decodes, the path it gets has no segment it could
//! read as a dot segment, and it starts with the app's prefix.

/// What confinement does to a request target.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Confined {
    /// No dot segments: forward the target as it is.
    Unchanged,
    /// Dot segments removed: forward these bytes (path, then the
    /// untouched query) instead.
    Normalized(Vec<u8>),
    /// A `..` would climb above the root: refuse the request.
    Escapes,
}

/// Removes the dot segments of `target` (a path, optionally with a query),
/// read as backends decode it; see the module's rules.
pub(crate) fn confine(target: &[u8]) -> Confined {
    let end = target
        .iter()
        .position(|b| matches!(b, b'?' | b'#'))
        .unwrap_or(target.len());
    let (path, rest) = target.split_at(end);
    if !Segments::new(path).any(|s| dots(&path[s.text.clone()]).is_some()) {
        return Confined::Unchanged;
    }
    let mut kept: Vec<Segment> = Vec::new();
    let mut trailing = false;
    for segment in Segments::new(path) {
        match dots(&path[segment.text.clone()]) {
            None => {
                kept.push(segment);
                trailing = false;
            }
            Some(Dots::One) => trailing = true,
            Some(Dots::Two) => {
                if kept.pop().is_none() {
                    return Confined::Escapes;
                }
                trailing = true;
            }
        }
    }
    let mut out = Vec::with_capacity(target.len());
    for (i, segment) in kept.iter().enumerate() {
        if i == 0 {
            out.push(b'/');
        } else {
            out.extend_from_slice(&path[segment.separator.clone()]);
        }
        out.extend_from_slice(&path[segment.text.clone()]);
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(rest);
    Confined::Normalized(out)
}

/// One segment: the separator before it (empty for a first segment that
/// has none) and its text, as ranges of the path.
#[derive(Debug, Clone)]
struct Segment {
    separator: std::ops::Range<usize>,
    text: std::ops::Range<usize>,
}

/// The segments of a path, split at every separator form.
struct Segments<'a> {
    path: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> Segments<'a> {
    fn new(path: &'a [u8]) -> Self {
        Segments {
            path,
            at: 0,
            done: false,
        }
    }
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if self.done {
            return None;
        }
        let start = self.at;
        let separator = match separator_len(&self.path[start..]) {
            0 => start..start,
            n => start..start + n,
        };
        let mut i = separator.end;
        loop {
            if i >= self.path.len() {
                self.done = true;
                break;
            }
            if separator_len(&self.path[i..]) > 0 {
                break;
            }
            i += 1;
        }
        self.at = i;
        Some(Segment {
            text: separator.end..i,
            separator,
        })
    }
}

/// The length of the separator `rest` starts with, or 0.
fn separator_len(rest: &[u8]) -> usize {
    match rest {
        [b'/' | b'\\', ..] => 1,
        [b'%', b'2', b'f' | b'F', ..] | [b'%', b'5', b'c' | b'C', ..] => 3,
        _ => 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dots {
    One,
    Two,
}

/// Whether a segment is a dot segment once decoded: `.` or `..`, each dot
/// literal or `%2e`, with any `;parameter` tail (`;` or `%3b`) ignored.
fn dots(segment: &[u8]) -> Option<Dots> {
    let mut name = segment;
    for (i, rest) in (0..segment.len()).map(|i| (i, &segment[i..])) {
        if matches!(rest, [b';', ..] | [b'%', b'3', b'b' | b'B', ..]) {
            name = &segment[..i];
            break;
        }
    }
    let mut count = 0;
    let mut rest = name;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return None,
        };
        count += 1;
        if count > 2 {
            return None;
        }
    }
    match count {
        1 => Some(Dots::One),
        2 => Some(Dots::Two),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(target: &str) -> Result<String, &'static str> {
        match confine(target.as_bytes()) {
            Confined::Unchanged => Ok(target.to_owned()),
            Confined::Normalized(v) => Ok(String::from_utf8(v).unwrap()),
            Confined::Escapes => Err("escapes"),
        }
    }

    #[test]
    fn the_table() {
        let escapes = [
            "/..",
            "/../",
            "/../secret",
            "/%2e%2e/secret",
            "/%2E%2e/secret",
            "/%2e%2E/secret",
            "/.%2e/secret",
            "/%2e./secret",
            "/..%2fsecret",
            "/..%2Fsecret",
            "/..%5csecret",
            "/..%5Csecret",
            "/..\\secret",
            "\\..\\secret",
            "%2f..%2fsecret",
            "/a/../../secret",
            "/a/b/../../../secret",
            "/a/%2e%2e/%2e%2e/secret",
            "/./../secret",
            "/..;x/secret",
            "/..;/secret",
            "/%2e%2e;jsessionid=1/secret",
            "/..%3bx/secret",
            "/.%2e%3B/secret",
            "/a/..%2f..%2fsecret",
            "/sub/..%2F..%2Fsecret",
            "/%2e%2e%5csecret?x=1",
            "//../../secret",
            "..",
            "../secret",
            "/a/./../b/../../c",
        ];
        for t in escapes {
            assert_eq!(run(t), Err("escapes"), "{t}");
        }
        let table = [
            // No dot segments: byte for byte, whatever else they hold.
            ("/", "/"),
            ("/index.html", "/index.html"),
            ("/a.b/c..d/...", "/a.b/c..d/..."),
            ("/.well-known/x", "/.well-known/x"),
            ("/a%2fb", "/a%2fb"),
            ("/a\\b", "/a\\b"),
            ("/%252e%252e/secret", "/%252e%252e/secret"),
            ("/%25%32%65%25%32%65/x", "/%25%32%65%25%32%65/x"),
            ("/%c0%ae%c0%ae/x", "/%c0%ae%c0%ae/x"),
            ("/%u002e%u002e/x", "/%u002e%u002e/x"),
            ("/.../x", "/.../x"),
            ("/.hidden", "/.hidden"),
            ("/..a/b", "/..a/b"),
            ("/%2ea", "/%2ea"),
            ("/%2", "/%2"),
            ("/%2e%2", "/%2e%2"),
            ("/x?../../y", "/x?../../y"),
            ("/x?a=%2e%2e%2f", "/x?a=%2e%2e%2f"),
            ("/x#../../y", "/x#../../y"),
            ("//a//b", "//a//b"),
            ("*", "*"),
            ("", ""),
            // Dot segments that stay inside: removed, RFC 3986 §5.2.4.
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/a/..", "/"),
            ("/a/../", "/"),
            ("/.", "/"),
            ("/./", "/"),
            ("/a/.", "/a/"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a//../b", "/a/b"),
            ("/sub/../file", "/file"),
            ("/sub/%2e%2e/file", "/file"),
            ("/sub/%2E%2E/file", "/file"),
            ("/./file", "/file"),
            ("/a/b/../../sub/nested?q=%2e%2e", "/sub/nested?q=%2e%2e"),
            ("/a/..;x/b", "/b"),
            ("/a/.;x/b", "/a/b"),
            ("/a/..%3b/b", "/b"),
            ("/a;x/../b;y", "/b;y"),
            ("/a%3b../b", "/a%3b../b"),
            // Encoded separators inside are kept as they were.
            ("/a/b%2f..%2fc", "/a%2fc"),
            ("/a%2fb/../c", "/a/c"),
            ("/a\\b\\..\\c", "/a\\c"),
            ("/a/..%2fb", "/b"),
            ("%2fa%2f..%2fb", "/b"),
            ("/a/../b?x=/../..#f", "/b?x=/../..#f"),
            ("./a", "/a"),
            ("a/../b", "/b"),
        ];
        for (input, want) in table {
            assert_eq!(run(input).as_deref(), Ok(want), "{input}");
        }
    }

    /// How a liberal backend reads a path: percent-decoded once, `\` as
    /// `/`, `;parameters` dropped from each segment, then resolved with a
    /// stack. `None` when it climbs above the root.
    fn liberal_resolve(path: &str) -> Option<Vec<String>> {
        let decoded = percent_decode(path).replace('\\', "/");
        let mut stack: Vec<String> = Vec::new();
        for seg in decoded
            .split('/')
            .skip(usize::from(decoded.starts_with('/')))
        {
            let name = seg.split(';').next().unwrap_or("");
            match name {
                "." => {}
                ".." => {
                    stack.pop()?;
                }
                _ => stack.push(seg.to_owned()),
            }
        }
        Some(stack)
    }

    /// Decodes each `%XX` once (the bytes as Latin-1, enough to spot dots
    /// and separators).
    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = String::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                    out.push(char::from(h * 16 + l));
                    i += 3;
                    continue;
                }
            }
            out.push(char::from(b[i]));
            i += 1;
        }
        out
    }

    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }

    /// Paths built from the pieces that matter: every separator and dot
    /// form, parameters, double encoding, names, and a query.
    fn target() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "/", "/", "/", "\\", "%2f", "%2F", "%5c", "%5C", ".", "..", "%2e", "%2E", "%25",
            "%252e", "%2", ";", ";x", "%3b", "%3B", "a", "b", "sub", "...", "?", "#", "%c0%ae",
            "=",
        ]);
        prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever comes in, what goes out holds no dot segment under the
        /// most liberal reading, and a path a liberal backend would resolve
        /// above its root is refused.
        #[test]
        fn no_output_leaves_the_root(target in target()) {
            let path_end = target.find(['?', '#']).unwrap_or(target.len());
            let climbs = liberal_resolve(&target[..path_end]).is_none();
            match run(&target) {
                Err(_) => prop_assert!(climbs, "{target} refused but stays inside"),
                Ok(out) => {
                    prop_assert!(!climbs, "{target} climbs but became {out}");
                    let end = out.find(['?', '#']).unwrap_or(out.len());
                    let (path, rest) = out.split_at(end);
                    prop_assert_eq!(rest, &target[path_end..], "the query is untouched");
                    if path != &target[..path_end] {
                        prop_assert!(path.starts_with('/'), "{} -> {}", target, out);
                    }
                    let decoded = percent_decode(path).replace('\\', "/");
                    for seg in decoded.split('/') {
                        let name = seg.split(';').next().unwrap_or("");
                        prop_assert!(name != "." && name != "..", "{} -> {} keeps {:?}", target, out, seg);
                    }
                    // Confining again changes nothing.
                    prop_assert_eq!(run(&out), Ok(out.clone()));
                }
            }
        }
    }
}
