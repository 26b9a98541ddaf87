//! Link translation, as Entra's "translate URLs": a URL that points at the
//! internal URL of a published app (scheme, host, port and the app's path
//! prefix) becomes that app's external URL; a root-relative path under the
//! serving app's own prefix loses the prefix. This module has the link map,
//! one URL's translation and the response headers'; `crate::rewrite`
//! applies the same translation to HTML and CSS bodies. Pure functions: no
//! IO, no allocation for a URL that does not change.
//!
//! What a header translation touches: `Location`, `Content-Location`, the
//! `url=` of `Refresh`, and in each `Set-Cookie` the `Path` (under the
//! app's prefix: the prefix is cut, `Path=/hr/x` → `Path=/x`) and the
//! `Domain`: a `Domain` that the app's internal host lies in is dropped, so
//! the browser keeps the cookie for the external host alone (a `Domain` of
//! the external host would also send it to every host under it, and one of
//! the internal host would make the browser refuse the cookie). Everything
//! else stays as the backend sent it.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use portico_proto::api::{AppLink, MAX_APP_LINKS};

/// Every published app's internal URL → external URL, found by the
/// internal host and port.
#[derive(Debug, Default)]
pub(crate) struct Links {
    /// By (lower-case host, port): the apps there, longest prefix first.
    by_origin: HashMap<(String, u16), Vec<Link>>,
}

#[derive(Debug)]
struct Link {
    https: bool,
    /// The internal path prefix without its trailing `/` (empty for `/`).
    prefix: String,
    /// The external URL without its trailing `/`: `https://h[:port]`.
    external: String,
}

impl Links {
    /// The map of `links` (at most [`MAX_APP_LINKS`]); a pair whose URLs do
    /// not parse is left out. For one internal URL the first pair counts.
    pub fn new<'a>(links: impl IntoIterator<Item = (&'a str, &'a str)>) -> Links {
        let mut by_origin: HashMap<(String, u16), Vec<Link>> = HashMap::new();
        for (internal, external) in links.into_iter().take(MAX_APP_LINKS) {
            let (Some(from), Some(to)) = (Absolute::parse(internal), Absolute::parse(external))
            else {
                tracing::debug!(
                    internal,
                    external,
                    "an app link that does not parse is left out"
                );
                continue;
            };
            let origin = (from.host.to_ascii_lowercase(), from.port_or_default());
            let prefix = from.path.trim_end_matches('/').to_owned();
            let entries = by_origin.entry(origin).or_default();
            if entries
                .iter()
                .any(|l| l.https == from.https && l.prefix == prefix)
            {
                continue;
            }
            let scheme = if to.https { "https" } else { "http" };
            let default = if to.https { 443 } else { 80 };
            let external = match to.port {
                Some(port) if port != default => {
                    format!("{scheme}://{}:{port}", to.host)
                }
                _ => format!("{scheme}://{}", to.host),
            };
            entries.push(Link {
                https: from.https,
                prefix,
                external,
            });
        }
        for entries in by_origin.values_mut() {
            entries.sort_by_key(|l| std::cmp::Reverse(l.prefix.len()));
        }
        Links { by_origin }
    }

    /// The map of a connector config's links; with none (an older router),
    /// of `apps`, the apps this connector knows.
    pub fn of_config(links: &[AppLink], apps: &[portico_proto::api::App]) -> Links {
        if links.is_empty() {
            Links::new(
                apps.iter()
                    .map(|a| (a.internal_url.as_str(), a.external_url.as_str())),
            )
        } else {
            Links::new(
                links
                    .iter()
                    .map(|l| (l.internal_url.as_str(), l.external_url.as_str())),
            )
        }
    }

    /// `url` translated when it is absolute (or scheme-relative) and points
    /// at a published app's internal URL; `None` otherwise.
    fn absolute(&self, url: &str) -> Option<String> {
        let parsed = Absolute::parse(url)?;
        let host = parsed.host.to_ascii_lowercase();
        // A scheme-relative URL takes its page's scheme: without a port it
        // may mean either default one.
        let ports: &[u16] = match parsed.port {
            Some(p) => &[p],
            None if parsed.scheme_relative => &[443, 80],
            None if parsed.https => &[443],
            None => &[80],
        };
        ports.iter().find_map(|port| {
            let entries = self.by_origin.get(&(host.clone(), *port))?;
            let link = entries.iter().find(|l| {
                let default = if l.https { 443 } else { 80 };
                let scheme = if parsed.scheme_relative {
                    parsed.port.is_some() || *port == default
                } else {
                    l.https == parsed.https
                };
                scheme && under(parsed.rest, &l.prefix).is_some()
            })?;
            let rest = under(parsed.rest, &link.prefix)?;
            Some(join(&link.external, rest))
        })
    }
}

/// One app's translation: the link map, and the app's own internal host
/// and prefix (for relative paths and cookies).
#[derive(Debug)]
pub(crate) struct Translator {
    links: Arc<Links>,
    /// The app's internal host, lower-case, without its port.
    host: String,
    /// The app's internal path prefix without its trailing `/`.
    prefix: String,
}

impl Translator {
    /// The translator of the app at `internal_url`; `None` if it does not
    /// parse (such an app serves nothing anyway).
    pub fn new(links: Arc<Links>, internal_url: &str) -> Option<Translator> {
        let parsed = Absolute::parse(internal_url)?;
        Some(Translator {
            links,
            host: parsed.host.to_ascii_lowercase(),
            prefix: parsed.path.trim_end_matches('/').to_owned(),
        })
    }

    /// `url` translated: a published app's internal URL becomes its
    /// external URL; a root-relative path under this app's prefix loses
    /// the prefix (`/hr/x` → `/x` for the prefix `/hr`); `None` when it
    /// stays as it is.
    pub fn url(&self, url: &str) -> Option<String> {
        let trimmed = url.trim_start_matches([' ', '\t', '\n', '\r', '\x0c']);
        let lead = &url[..url.len() - trimmed.len()];
        let translated = if trimmed.starts_with('/') && !is_scheme_relative(trimmed) {
            self.path(trimmed)?
        } else {
            self.links.absolute(trimmed)?
        };
        Some(format!("{lead}{translated}"))
    }

    /// A root-relative path (with its query and fragment) under this app's
    /// prefix, without the prefix; `None` for any other.
    fn path(&self, path: &str) -> Option<String> {
        if self.prefix.is_empty() {
            return None;
        }
        let rest = under(path, &self.prefix)?;
        Some(join("", rest))
    }
}

/// Translates the URLs of a backend's response headers in place (see the
/// module docs); a value that is not text, or does not change, is kept.
pub(crate) fn response_headers(headers: &mut HeaderMap, t: &Translator) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        if let Some(new) = headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| t.url(v))
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            headers.insert(name, new);
        }
    }
    let refresh = header::HeaderName::from_static("refresh");
    if let Some(new) = headers
        .get(&refresh)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| refresh_value(v, t))
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(refresh, new);
    }
    if headers.contains_key(header::SET_COOKIE) {
        let cookies: Vec<HeaderValue> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| set_cookie(s, t))
                    .and_then(|s| HeaderValue::from_str(&s).ok())
                    .unwrap_or_else(|| v.clone())
            })
            .collect();
        headers.remove(header::SET_COOKIE);
        for c in cookies {
            headers.append(header::SET_COOKIE, c);
        }
    }
}

/// A `Refresh` value (`5; url=http://…`, as in `<meta http-equiv>` too)
/// with its URL translated; `None` when it stays.
pub(crate) fn refresh_value(value: &str, t: &Translator) -> Option<String> {
    let lower = value.to_ascii_lowercase();
    let at = lower.find("url")?;
    let after = &value[at + 3..];
    let eq = after.trim_start();
    let eq = eq.strip_prefix('=')?;
    let spaces = eq.len() - eq.trim_start().len();
    let url_start = value.len() - eq.len() + spaces;
    let mut url = &value[url_start..];
    let mut end = value.len();
    if let Some(q) = url.chars().next().filter(|c| *c == '"' || *c == '\'') {
        url = &url[1..];
        let close = url.find(q).unwrap_or(url.len());
        url = &url[..close];
        end = url_start + 1 + close;
        let new = t.url(url)?;
        return Some(format!("{}{new}{}", &value[..url_start + 1], &value[end..]));
    }
    let new = t.url(url.trim_end())?;
    end -= url.len() - url.trim_end().len();
    Some(format!("{}{new}{}", &value[..url_start], &value[end..]))
}

/// A `Set-Cookie` value with its `Domain` dropped when the app's internal
/// host lies in it, and its `Path` moved out of the app's prefix; `None`
/// when neither applies.
fn set_cookie(value: &str, t: &Translator) -> Option<String> {
    let mut changed = false;
    let mut parts: Vec<String> = Vec::new();
    for (i, part) in value.split(';').enumerate() {
        if i > 0 {
            let attr = part.trim_start();
            let (key, val) = attr.split_once('=').unwrap_or((attr, ""));
            let key = key.trim_end();
            if key.eq_ignore_ascii_case("domain") {
                let domain = val.trim().trim_start_matches('.').to_ascii_lowercase();
                let inside = !domain.is_empty()
                    && (t.host == domain
                        || t.host
                            .strip_suffix(domain.as_str())
                            .is_some_and(|h| h.ends_with('.')));
                if inside {
                    changed = true;
                    continue;
                }
            } else if key.eq_ignore_ascii_case("path") {
                if let Some(new) = t.path(val.trim()) {
                    let lead = &part[..part.len() - attr.len()];
                    parts.push(format!("{lead}{key}={new}"));
                    changed = true;
                    continue;
                }
            }
        }
        parts.push(part.to_owned());
    }
    changed.then(|| parts.join(";"))
}

/// What follows `prefix` in `path` (a path with its query and fragment)
/// when the path lies under it: `""`, or from a `/`, `?` or `#` on.
fn under<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    match rest.as_bytes().first() {
        None | Some(b'/' | b'?' | b'#') => Some(rest),
        _ => None,
    }
}

/// `base` (no trailing `/`) and what followed the prefix: `""` → `/`,
/// `?q` → `/?q`, `/x` → `/x`.
fn join(base: &str, rest: &str) -> String {
    if rest.starts_with('/') {
        format!("{base}{rest}")
    } else {
        format!("{base}/{rest}")
    }
}

fn is_scheme_relative(url: &str) -> bool {
    url.starts_with("//") || url.starts_with("/\\")
}

/// An absolute (or scheme-relative) http(s) URL, cut into its parts.
struct Absolute<'a> {
    https: bool,
    scheme_relative: bool,
    /// As written (case kept; an IPv6 address keeps its brackets).
    host: &'a str,
    /// As written, if it was.
    port: Option<u16>,
    /// The path (may be empty), without query and fragment.
    path: &'a str,
    /// The path with its query and fragment.
    rest: &'a str,
}

impl<'a> Absolute<'a> {
    fn parse(url: &'a str) -> Option<Absolute<'a>> {
        let (https, scheme_relative, after) = if let Some(r) = strip_prefix_ci(url, "http://") {
            (false, false, r)
        } else if let Some(r) = strip_prefix_ci(url, "https://") {
            (true, false, r)
        } else if let Some(r) = url.strip_prefix("//") {
            (true, true, r)
        } else {
            return None;
        };
        let end = after.find(['/', '?', '#', '\\']).unwrap_or(after.len());
        let (authority, rest) = after.split_at(end);
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                let port = &authority[i + 1..];
                let port = if port.is_empty() {
                    None
                } else {
                    Some(port.parse::<u16>().ok()?)
                };
                (&authority[..i], port)
            }
            _ => (authority, None),
        };
        if host.is_empty() {
            return None;
        }
        let path_end = rest.find(['?', '#']).unwrap_or(rest.len());
        Some(Absolute {
            https,
            scheme_relative,
            host,
            port,
            path: &rest[..path_end],
            rest,
        })
    }
}

impl Absolute<'_> {
    fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(if self.https { 443 } else { 80 })
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hr at `http://hr.corp:8080/hr/`, wiki at `https://wiki.corp/`, and
    /// the root app of `http://hr.corp:8080/` (another app on hr's host).
    pub(crate) fn links() -> Arc<Links> {
        Arc::new(Links::new([
            ("http://hr.corp:8080/hr/", "https://hr.apps.example.com/"),
            ("https://WIKI.corp", "https://wiki.apps.example.com:8443/"),
            ("http://hr.corp:8080/", "https://root.apps.example.com/"),
        ]))
    }

    fn hr() -> Translator {
        Translator::new(links(), "http://hr.corp:8080/hr/").unwrap()
    }

    #[test]
    fn absolute_urls_of_any_app_become_its_external_url() {
        let t = hr();
        let cases = [
            (
                "http://hr.corp:8080/hr/x?y=1#z",
                Some("https://hr.apps.example.com/x?y=1#z"),
            ),
            (
                "http://hr.corp:8080/hr",
                Some("https://hr.apps.example.com/"),
            ),
            (
                "http://hr.corp:8080/hr/",
                Some("https://hr.apps.example.com/"),
            ),
            (
                "http://hr.corp:8080/hr?q",
                Some("https://hr.apps.example.com/?q"),
            ),
            (
                "HTTP://HR.Corp:8080/hr/a",
                Some("https://hr.apps.example.com/a"),
            ),
            // Longest prefix first: not under /hr, so the root app's.
            (
                "http://hr.corp:8080/hrx",
                Some("https://root.apps.example.com/hrx"),
            ),
            (
                "http://hr.corp:8080/",
                Some("https://root.apps.example.com/"),
            ),
            (
                "http://hr.corp:8080",
                Some("https://root.apps.example.com/"),
            ),
            // Another app, its default port written or not.
            (
                "https://wiki.corp/page",
                Some("https://wiki.apps.example.com:8443/page"),
            ),
            (
                "https://wiki.corp:443/page",
                Some("https://wiki.apps.example.com:8443/page"),
            ),
            // Scheme-relative.
            (
                "//wiki.corp/p",
                Some("https://wiki.apps.example.com:8443/p"),
            ),
            ("//hr.corp:8080/hr/p", Some("https://hr.apps.example.com/p")),
            // Not an app: other scheme, port or host, user info, garbage.
            ("http://wiki.corp/page", None),
            ("http://hr.corp/hr/x", None),
            ("http://hr.corp:8081/hr/x", None),
            ("https://example.org/hr/x", None),
            ("http://user@hr.corp:8080/hr/x", None),
            ("http://hr.corp:99999/hr/x", None),
            ("mailto:hr@hr.corp", None),
            ("http://", None),
            ("", None),
        ];
        for (url, want) in cases {
            assert_eq!(t.url(url).as_deref(), want, "{url}");
        }
    }

    #[test]
    fn relative_urls_stay_but_paths_under_the_prefix_lose_it() {
        let t = hr();
        assert_eq!(t.url("/hr/x").as_deref(), Some("/x"));
        assert_eq!(t.url("/hr").as_deref(), Some("/"));
        assert_eq!(t.url("/hr?a=b").as_deref(), Some("/?a=b"));
        assert_eq!(t.url("/hrx/y"), None);
        assert_eq!(t.url("/other"), None);
        assert_eq!(t.url("x/y"), None);
        assert_eq!(t.url("../hr/x"), None);
        assert_eq!(t.url("?q"), None);
        // An app at the root has no prefix to cut.
        let root = Translator::new(links(), "http://hr.corp:8080/").unwrap();
        assert_eq!(root.url("/hr/x"), None);
        assert_eq!(
            root.url("http://hr.corp:8080/hr/x").as_deref(),
            Some("https://hr.apps.example.com/x"),
            "a link into another app on the same host is that app's"
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn location_and_content_location_are_translated() {
        let t = hr();
        for (location, want) in [
            (
                "http://hr.corp:8080/hr/login?next=/hr/x",
                "https://hr.apps.example.com/login?next=/hr/x",
            ),
            ("/hr/x", "/x"),
            ("https://wiki.corp/", "https://wiki.apps.example.com:8443/"),
            (
                "https://example.org/elsewhere",
                "https://example.org/elsewhere",
            ),
            ("relative/x", "relative/x"),
        ] {
            let mut h = headers(&[("location", location), ("content-location", location)]);
            response_headers(&mut h, &t);
            assert_eq!(h["location"], want, "{location}");
            assert_eq!(h["content-location"], want, "{location}");
        }
        // A value that is not text is left alone.
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            HeaderValue::from_bytes(b"http://hr.corp:8080/hr/\xff").unwrap(),
        );
        response_headers(&mut h, &t);
        assert_eq!(h["location"].as_bytes(), b"http://hr.corp:8080/hr/\xff");
    }

    #[test]
    fn refresh_gets_its_url_translated() {
        let t = hr();
        for (value, want) in [
            (
                "5; url=http://hr.corp:8080/hr/x",
                "5; url=https://hr.apps.example.com/x",
            ),
            ("0;URL='/hr/y'", "0;URL='/y'"),
            (
                "3, url = \"https://wiki.corp/a\" ",
                "3, url = \"https://wiki.apps.example.com:8443/a\" ",
            ),
            ("5; url=https://example.org/", "5; url=https://example.org/"),
            ("10", "10"),
        ] {
            let mut h = headers(&[("refresh", value)]);
            response_headers(&mut h, &t);
            assert_eq!(h["refresh"], want, "{value}");
        }
    }

    #[test]
    fn set_cookie_domain_and_path_follow_the_external_url() {
        let t = hr();
        let mut h = headers(&[
            ("set-cookie", "sid=1; Path=/hr; Domain=hr.corp; HttpOnly"),
            ("set-cookie", "a=2; path=/hr/app; domain=.corp; Secure"),
            ("set-cookie", "b=3; Path=/other; Domain=example.org"),
            ("set-cookie", "c=4"),
            ("set-cookie", "d=5; Path=/hrx; Domain=wiki.corp"),
        ]);
        response_headers(&mut h, &t);
        let got: Vec<&str> = h
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "sid=1; Path=/; HttpOnly",
                "a=2; path=/app; Secure",
                "b=3; Path=/other; Domain=example.org",
                "c=4",
                "d=5; Path=/hrx; Domain=wiki.corp",
            ]
        );
    }

    #[test]
    fn other_headers_and_unrelated_urls_are_untouched() {
        let t = hr();
        let mut h = headers(&[
            ("link", "<http://hr.corp:8080/hr/style.css>; rel=preload"),
            ("location", "https://example.org/hr/x"),
            ("content-type", "text/html"),
        ]);
        let before = h.clone();
        response_headers(&mut h, &t);
        assert_eq!(h, before);
    }

    #[test]
    fn a_bad_link_is_left_out_and_the_rest_serve() {
        let links = Links::new([
            ("not a url", "https://x.apps.example.com/"),
            ("http://a.corp/", "also not"),
            ("http://b.corp/", "https://b.apps.example.com/"),
        ]);
        let t = Translator::new(Arc::new(links), "http://b.corp/").unwrap();
        assert_eq!(
            t.url("http://b.corp/x").as_deref(),
            Some("https://b.apps.example.com/x")
        );
        assert_eq!(t.url("http://a.corp/x"), None);
    }
}
