//! Request target and header rewriting between the edge's `StreamHead` and
//! the backend request, and back for the response head. Pure functions.

use std::io::Write as _;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use portico_proto::{RequestId, StreamKind};

use crate::error::ProxyError;
use crate::path::{confine, Confined};

/// The parsed internal URL of an app: where its requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InternalUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The path prefix without a trailing `/` (empty for the root).
    pub prefix: String,
    /// The `Host` header for the backend, made once per app.
    pub host: HeaderValue,
}

impl InternalUrl {
    /// Parses an `http://` or `https://` URL with an optional path. A query
    /// or fragment in the internal URL is ignored.
    pub fn parse(url: &str) -> Result<InternalUrl, ProxyError> {
        let bad = |reason: &str| ProxyError::BadRequest {
            reason: format!("internal URL {url:?}: {reason}"),
        };
        let url = url.split('#').next().unwrap_or(url);
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad("scheme must be http or https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info is not allowed"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| bad("host is not a valid Host header"))?;
        Ok(InternalUrl {
            scheme,
            authority,
            prefix,
            host,
        })
    }

    /// Whether its host's first label is `*`: a wildcard app's internal
    /// URL (`http://*.internal.corp/`), whose `*` each request replaces
    /// with the label its external host matched ([`Self::with_label`]).
    pub fn is_wildcard(&self) -> bool {
        let a = self.authority.as_str();
        a.starts_with("*.") || a.starts_with("*:") || a == "*"
    }

    /// This URL with its host's leading `*` replaced by `label` (one LDH
    /// label, checked by the caller with `api::wildcard_label`):
    /// `http://*.internal.corp:8080/x/` for `hr` is
    /// `http://hr.internal.corp:8080/x/`.
    pub fn with_label(&self, label: &str) -> Result<InternalUrl, ProxyError> {
        let bad = || ProxyError::BadRequest {
            reason: format!("host label {label:?} does not form a valid internal host"),
        };
        if !portico_proto::api::is_ldh_label(label) {
            return Err(bad());
        }
        let rest = self.authority.as_str().strip_prefix('*').ok_or_else(bad)?;
        let authority: Authority = format!("{}{rest}", label.to_ascii_lowercase())
            .parse()
            .map_err(|_| bad())?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| bad())?;
        Ok(InternalUrl {
            scheme: self.scheme.clone(),
            authority,
            prefix: self.prefix.clone(),
            host,
        })
    }

    /// The internal URL joined with the request's path and query:
    /// `http://h:8080/app/` + `/x?y` → `http://h:8080/app/x?y`, after the
    /// path's dot segments are removed (`crate::path`): a path that would
    /// climb above the prefix is [`ProxyError::PathOutsidePrefix`].
    ///
    /// Built from parts: only the path is parsed, not the whole URL. For an
    /// internal URL without a path, the URI keeps `path_and_query` itself
    /// (a slice of the stream head, not a copy) unless dot segments had to
    /// be removed; else one buffer is built.
    pub fn join(&self, path_and_query: Bytes) -> Result<Uri, ProxyError> {
        let bad = || ProxyError::BadRequest {
            reason: format!(
                "request target {:?} does not form a valid URL",
                String::from_utf8_lossy(&path_and_query)
            ),
        };
        let target = match confine(&path_and_query) {
            Confined::Unchanged => path_and_query.clone(),
            Confined::Normalized(v) => Bytes::from(v),
            Confined::Escapes => {
                return Err(ProxyError::PathOutsidePrefix {
                    path: excerpt(&path_and_query),
                })
            }
        };
        let rooted = target.starts_with(b"/");
        let path = if self.prefix.is_empty() && rooted {
            target
        } else {
            let mut path = BytesMut::with_capacity(self.prefix.len() + target.len() + 1);
            path.extend_from_slice(self.prefix.as_bytes());
            if !rooted {
                path.extend_from_slice(b"/");
            }
            path.extend_from_slice(&target);
            path.freeze()
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(path).map_err(|_| bad())?);
        Uri::from_parts(parts).map_err(|_| bad())
    }
}

/// At most the first 200 bytes of a request target, for a log line.
fn excerpt(target: &[u8]) -> String {
    const MAX: usize = 200;
    let mut text = String::from_utf8_lossy(&target[..target.len().min(MAX)]).into_owned();
    if target.len() > MAX {
        text.push('…');
    }
    text
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the connector knows about a request besides its headers.
pub(crate) struct RequestMeta {
    pub kind: StreamKind,
    pub request_id: RequestId,
    /// The external authority the user asked for.
    pub authority: Bytes,
    pub client_ip: std::net::IpAddr,
}

/// Whether a client-sent header claims an identity, so the backend must
/// never see it: Portico's own `X-Portico-*`, the names other proxies set
/// (`X-Forwarded-User`, `-Email`, `-Groups`, `-Preferred-Username`,
/// `-Access-Token`, `X-Auth-Request-*`, `Remote-User`, `X-Remote-User`),
/// and the app's own identity headers. Names arrive lower-case; `_` counts
/// as `-`, since CGI, WSGI, PHP and nginx's `underscores_in_headers` turn
/// both into the same variable.
fn claims_identity(name: &str, mapped: &[String]) -> bool {
    let n = name.as_bytes();
    let is = |want: &str| {
        n.len() == want.len()
            && n.iter()
                .zip(want.bytes())
                .all(|(&a, b)| a == b || (a == b'_' && b == b'-'))
    };
    let starts = |want: &str| n.len() >= want.len() && is_prefix(n, want);
    starts("x-portico-")
        || starts("x-auth-request-")
        || is("x-forwarded-user")
        || is("x-forwarded-email")
        || is("x-forwarded-groups")
        || is("x-forwarded-preferred-username")
        || is("x-forwarded-access-token")
        || is("remote-user")
        || is("x-remote-user")
        || mapped.iter().any(|m| is(m))
}

fn is_prefix(name: &[u8], prefix: &str) -> bool {
    name.iter()
        .zip(prefix.bytes())
        .all(|(&a, b)| a == b || (a == b'_' && b == b'-'))
}

/// Rewrites the user's request headers for the backend: hop-by-hop and
/// identity headers the client sent removed ([`claims_identity`];
/// `mapped` is the app's identity header names, lower-case),
/// `X-Forwarded-For` appended, `X-Forwarded-Proto`/`-Host`, `Host` and
/// `X-Request-Id` set.
pub(crate) fn request_headers(
    mut headers: HeaderMap,
    meta: RequestMeta,
    host: HeaderValue,
    mapped: &[String],
) -> HeaderMap {
    portico_agent::headers::strip_hop_by_hop(&mut headers, meta.kind == StreamKind::WebSocket);
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| claims_identity(k.as_str(), mapped))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
    // The edge already answered any `Expect: 100-continue`; the body is
    // streamed as it comes.
    headers.remove(header::EXPECT);

    // Written straight into the buffer the header keeps, sized exactly: a
    // `Bytes` made from a full buffer needs no second allocation to share.
    let previous = || {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let (ip, ip_len) = ip_text(meta.client_ip);
    let len = previous().map(|v| v.len() + 2).sum::<usize>() + ip_len;
    let mut xff = BytesMut::with_capacity(len);
    for v in previous() {
        xff.extend_from_slice(v.as_bytes());
        xff.extend_from_slice(b", ");
    }
    xff.extend_from_slice(&ip[..ip_len]);
    if let Ok(v) = HeaderValue::from_maybe_shared(xff.freeze()) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    match HeaderValue::from_maybe_shared(meta.authority) {
        Ok(v) => {
            headers.insert(X_FORWARDED_HOST, v);
        }
        Err(_) => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    headers.insert(header::HOST, host);
    headers.insert(X_REQUEST_ID, meta.request_id.header_value());
    headers
}

/// Sets the signed-in user's identity for the backend: each of the app's
/// identity headers (header → claim; `groups` comma-separated, a claim the
/// user lacks sets no header) and the edge's assertion as
/// `X-Portico-Jwt-Assertion`. Runs after [`request_headers`] removed what
/// the client sent under those names.
pub(crate) fn identity_headers(
    headers: &mut HeaderMap,
    mapping: &std::collections::BTreeMap<String, String>,
    ext: &portico_proto::HeadExtensions,
) {
    if let Some(claims) = &ext.identity_claims {
        for (header, claim) in mapping {
            let value = if claim == "groups" {
                let all: Vec<&str> = claims.get_all("groups").collect();
                if all.is_empty() {
                    continue;
                }
                all.join(",")
            } else {
                match claims.get(claim) {
                    Some(v) => v.to_owned(),
                    None => continue,
                }
            };
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(header.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
    }
    if let Some(a) = ext
        .assertion
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(
            HeaderName::from_static(portico_proto::api::ASSERTION_HEADER),
            a,
        );
    }
}

/// An address as text in a stack buffer, and its length. IPv4, nearly
/// every client, is written digit by digit: `core::fmt` costs about a
/// thousand instructions here, more than the rest of the `X-Forwarded-For`
/// header. The longest text, an IPv6 address, is 45 bytes; a longer write
/// would stop at the buffer's end, not panic.
fn ip_text(ip: std::net::IpAddr) -> ([u8; 48], usize) {
    let mut out = std::io::Cursor::new([0u8; 48]);
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                let digits = [
                    b'0' + octet / 100,
                    b'0' + octet / 10 % 10,
                    b'0' + octet % 10,
                ];
                let skip = match octet {
                    100.. => 0,
                    10..=99 => 1,
                    _ => 2,
                };
                let dot: &[u8] = if i > 0 { b"." } else { b"" };
                let _ = out.write_all(dot);
                let _ = out.write_all(&digits[skip..]);
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
    let len = usize::try_from(out.position()).unwrap_or(0);
    (out.into_inner(), len)
}

/// The backend's response headers as the edge gets them: hop-by-hop
/// removed, except `Upgrade`/`Connection` on a `101`.
pub(crate) fn response_headers(mut headers: HeaderMap, switching: bool) -> HeaderMap {
    portico_agent::headers::strip_hop_by_hop(&mut headers, switching);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        let samples = [
            "0.0.0.0",
            "9.10.99.100",
            "203.0.113.9",
            "255.255.255.255",
            "10.200.7.250",
            "::1",
            "2001:db8::8:800:200c:417a",
            "::ffff:192.0.2.1",
        ];
        let every_octet =
            (0..=255u8).map(|o| std::net::Ipv4Addr::new(o, 255 - o, o / 3, 7).to_string());
        for text in samples.iter().map(|s| s.to_string()).chain(every_octet) {
            let ip: std::net::IpAddr = text.parse().unwrap();
            let (buf, len) = ip_text(ip);
            assert_eq!(&buf[..len], ip.to_string().as_bytes(), "{text}");
        }
    }

    fn meta(kind: StreamKind) -> RequestMeta {
        RequestMeta {
            kind,
            request_id: RequestId(0xabc),
            authority: Bytes::from_static(b"hr.apps.example.com"),
            client_ip: "203.0.113.9".parse().unwrap(),
        }
    }

    #[test]
    fn path_joins_with_prefix_and_query() {
        let u = InternalUrl::parse("http://h:8080/app/").unwrap();
        assert_eq!(
            u.join(Bytes::from_static(b"/x?y")).unwrap().to_string(),
            "http://h:8080/app/x?y"
        );
        assert_eq!(
            u.join(Bytes::from_static(b"/")).unwrap().to_string(),
            "http://h:8080/app/"
        );
        let u = InternalUrl::parse("http://h:8080/app").unwrap();
        assert_eq!(
            u.join(Bytes::from_static(b"/x/z?a=1&b=2"))
                .unwrap()
                .to_string(),
            "http://h:8080/app/x/z?a=1&b=2"
        );
        let u = InternalUrl::parse("https://10.0.0.5").unwrap();
        assert_eq!(u.scheme, Scheme::HTTPS);
        assert_eq!(
            u.join(Bytes::from_static(b"/?q")).unwrap().to_string(),
            "https://10.0.0.5/?q"
        );
        assert_eq!(
            u.join(Bytes::from_static(b"x")).unwrap().to_string(),
            "https://10.0.0.5/x"
        );
        // Dot segments are removed under the prefix, never above it.
        let u = InternalUrl::parse("http://h:8080/app/").unwrap();
        assert_eq!(
            u.join(Bytes::from_static(b"/a/%2e%2e/b?c=/../d"))
                .unwrap()
                .to_string(),
            "http://h:8080/app/b?c=/../d"
        );
        assert_eq!(
            u.join(Bytes::from_static(b"/a/..")).unwrap().to_string(),
            "http://h:8080/app/"
        );
        for escape in ["/../secret", "/%2e%2e/secret", "/..%2fsecret", "/a/../../x"] {
            let e = u.join(Bytes::from(escape)).unwrap_err();
            assert!(
                matches!(&e, ProxyError::PathOutsidePrefix { path } if path == escape),
                "{escape}: {e:?}"
            );
            assert_eq!(e.code(), portico_proto::ErrorCode::PathOutsidePrefix);
        }
        let root = InternalUrl::parse("http://h/").unwrap();
        assert!(root.join(Bytes::from_static(b"/../etc/passwd")).is_err());
        let long = format!("/{}/../../x", "a".repeat(500));
        match root.join(Bytes::from(long)).unwrap_err() {
            ProxyError::PathOutsidePrefix { path } => {
                assert!(path.chars().count() <= 201, "{path}")
            }
            other => panic!("{other:?}"),
        }
        assert!(InternalUrl::parse("ftp://h/").is_err());
        assert!(InternalUrl::parse("/relative").is_err());
        assert!(u.join(Bytes::from_static(b"/bad path")).is_err());
    }

    /// Identity headers a client may send to pass as someone, in the
    /// spellings a backend may read (`_` for `-`).
    const SPOOFED: &[&str] = &[
        "x_portico_user",
        "x-forwarded-user",
        "x_forwarded_user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x_forwarded_groups",
        "x-forwarded-preferred-username",
        "x-forwarded-access-token",
        "x-auth-request-user",
        "x_auth_request_email",
        "remote-user",
        "x-remote-user",
        "x_remote_user",
    ];

    #[test]
    fn request_headers_are_rewritten() {
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.1.1.1, 10.2.2.2"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("10.3.3.3"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-connection", HeaderValue::from_static("close"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("trailer", HeaderValue::from_static("x-sum"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-portico-user", HeaderValue::from_static("admin"));
        h.insert("x-portico-identity", HeaderValue::from_static("evil"));
        for spoof in SPOOFED {
            h.insert(
                HeaderName::from_static(spoof),
                HeaderValue::from_static("admin"),
            );
        }
        // Alike, but not identity headers.
        h.insert("x-forwarded-users", HeaderValue::from_static("kept"));
        h.insert("x-remote", HeaderValue::from_static("kept"));
        h.insert("host", HeaderValue::from_static("hr.apps.example.com"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        h.insert("accept", HeaderValue::from_static("text/html"));
        h.insert("content-length", HeaderValue::from_static("12"));
        h.insert("expect", HeaderValue::from_static("100-continue"));
        let target = InternalUrl::parse("http://backend.internal:8080/app/").unwrap();
        let out = request_headers(
            h,
            meta(StreamKind::Http),
            target.host,
            &["x-remote-user".to_owned()],
        );

        assert_eq!(
            out["x-forwarded-for"],
            "10.1.1.1, 10.2.2.2, 10.3.3.3, 203.0.113.9"
        );
        assert_eq!(out.get_all("x-forwarded-for").iter().count(), 1);
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "x-portico-user",
            "x-portico-identity",
            "expect",
        ]
        .iter()
        .chain(SPOOFED)
        {
            assert!(!out.contains_key(*gone), "{gone} must be removed: {out:?}");
        }
        assert_eq!(out["x-forwarded-users"], "kept");
        assert_eq!(out["x-remote"], "kept");
        assert_eq!(out["host"], "backend.internal:8080");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "hr.apps.example.com");
        assert_eq!(out["x-request-id"], "00000000000000000000000000000abc");
        assert_eq!(out["accept"], "text/html");
        assert_eq!(out["content-length"], "12");
    }

    #[test]
    fn identity_headers_come_from_the_heads_claims_only() {
        let mut claims = portico_proto::IdentityClaims::new();
        claims.push("sub", "alice").unwrap();
        claims.push("email", "alice@example.test").unwrap();
        claims.push("groups", "admins").unwrap();
        claims.push("groups", "devs").unwrap();
        let ext = portico_proto::HeadExtensions {
            identity_claims: Some(claims),
            assertion: Some("h.p.s".into()),
            ..Default::default()
        };
        let mapping: std::collections::BTreeMap<String, String> = [
            ("X-Remote-User", "email"),
            ("X-Remote-Groups", "groups"),
            ("X-Remote-Name", "name"),
        ]
        .into_iter()
        .map(|(h, c)| (h.to_owned(), c.to_owned()))
        .collect();
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", HeaderValue::from_static("mallory"));
        h.insert("x-remote-name", HeaderValue::from_static("Mallory"));
        let target = InternalUrl::parse("http://b/").unwrap();
        let names: Vec<String> = mapping.keys().map(|k| k.to_ascii_lowercase()).collect();
        let mut out = request_headers(h, meta(StreamKind::Http), target.host, &names);
        identity_headers(&mut out, &mapping, &ext);
        assert_eq!(out["x-remote-user"], "alice@example.test");
        assert_eq!(out["x-remote-groups"], "admins,devs");
        // The user has no name claim: no header, and not the client's.
        assert!(!out.contains_key("x-remote-name"), "{out:?}");
        assert_eq!(out["x-portico-jwt-assertion"], "h.p.s");
        // A head without claims sets nothing.
        let mut none = HeaderMap::new();
        identity_headers(&mut none, &mapping, &Default::default());
        assert!(none.is_empty());
    }

    #[test]
    fn first_hop_gets_a_fresh_forwarded_for() {
        let target = InternalUrl::parse("http://b/").unwrap();
        let out = request_headers(HeaderMap::new(), meta(StreamKind::Http), target.host, &[]);
        assert_eq!(out["x-forwarded-for"], "203.0.113.9");
        assert_eq!(out["host"], "b");
    }

    #[test]
    fn websocket_keeps_its_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h.insert("sec-websocket-version", HeaderValue::from_static("13"));
        let target = InternalUrl::parse("http://b/").unwrap();
        let out = request_headers(h, meta(StreamKind::WebSocket), target.host, &[]);
        assert_eq!(out["connection"], "upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert_eq!(out["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(out["sec-websocket-version"], "13");
    }

    #[test]
    fn response_headers_lose_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("set-cookie", HeaderValue::from_static("a=b"));
        let out = response_headers(h, false);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out["content-type"], "text/plain");
    }

    /// A wildcard internal URL's `*` becomes the label, and nothing but one
    /// LDH label is put there.
    #[test]
    fn a_wildcard_internal_host_takes_the_matched_label() {
        let url = InternalUrl::parse("http://*.internal.corp:8080/app/").unwrap();
        assert!(url.is_wildcard());
        let hr = url.with_label("HR").unwrap();
        assert!(!hr.is_wildcard());
        assert_eq!(hr.host, "hr.internal.corp:8080");
        assert_eq!(
            hr.join(Bytes::from_static(b"/x?y")).unwrap().to_string(),
            "http://hr.internal.corp:8080/app/x?y"
        );
        for bad in ["", "a.b", "a_b", "-a", "a:1", "a/b", "a@b", &"a".repeat(64)] {
            assert!(url.with_label(bad).is_err(), "{bad:?}");
        }
        let flat = InternalUrl::parse("http://*:8080/").unwrap();
        assert!(flat.is_wildcard());
        assert_eq!(flat.with_label("payroll").unwrap().host, "payroll:8080");
        let plain = InternalUrl::parse("http://intra.corp/").unwrap();
        assert!(!plain.is_wildcard());
        assert!(plain.with_label("hr").is_err());
    }
}
