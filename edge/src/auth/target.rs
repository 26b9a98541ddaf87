//! Where a browser goes back to after signing in: a path on the app's own
//! host, never anywhere else. Anything that a browser could read as
//! another origin (`//evil`, `/\evil`, `https:evil`, `%2f%2fevil`,
//! `javascript:`), or that carries control characters, becomes `/`.

/// The longest path kept.
const MAX_TARGET: usize = 2048;

/// `to` if it is a safe path (with its query) on the same host, else `/`.
pub(super) fn safe(to: &str) -> String {
    if is_safe(to) {
        to.to_owned()
    } else {
        "/".to_owned()
    }
}

fn is_safe(to: &str) -> bool {
    if to.len() > MAX_TARGET || !to.starts_with('/') {
        return false;
    }
    // Judge what a browser would see once percent-decoded (twice: a
    // target may be decoded again by the page it reaches).
    let once = decode(to);
    let twice = decode(&once);
    [to, once.as_str(), twice.as_str()].iter().all(|t| {
        t.starts_with('/')
            && !t.starts_with("//")
            && !t.starts_with("/\\")
            && !t.chars().any(|c| c.is_control() || c == '\\')
    })
}

fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_redirects_land_on_the_root() {
        for bad in [
            "//evil",
            "//evil.example/x",
            "/\\evil",
            "\\\\evil",
            "https:evil",
            "https://evil.example/",
            "%2f%2fevil",
            "/%2f%2fevil",
            "/%2F%5Cevil",
            "/%252f%252fevil",
            "javascript:alert(1)",
            "/\tjavascript:x",
            "/a\r\nLocation: x",
            "",
            "evil",
        ] {
            assert_eq!(safe(bad), "/", "{bad:?}");
        }
        for good in ["/", "/x", "/a/b?c=d&e=%2F", "/search?q=a+b", "/%E2%82%AC"] {
            assert_eq!(safe(good), good, "{good:?}");
        }
        assert_eq!(safe(&format!("/{}", "a".repeat(MAX_TARGET))), "/");
    }
}
