//! HTTP header rules the edge and the connector share.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// At most this many names listed in `Connection` are honoured.
const MAX_CONNECTION_TOKENS: usize = 64;

/// Whether a header describes one connection and is never forwarded by a
/// proxy (RFC 9110 §7.6.1): `Connection`, `Keep-Alive`, `Proxy-*`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str().starts_with("proxy-")
        || name.as_str() == "keep-alive"
}

/// Removes the hop-by-hop headers: `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding` and
/// `Upgrade`. With `keep_upgrade`, `Upgrade` survives and `Connection` is
/// set to `upgrade` (a WebSocket handshake). One pass over the names; most
/// requests carry none of these, and then nothing is allocated.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k))
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .take(MAX_CONNECTION_TOKENS)
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok()),
    );
    let upgrade = headers.get(header::UPGRADE).cloned();
    for name in &doomed {
        headers.remove(name);
    }
    if keep_upgrade {
        if let Some(upgrade) = upgrade {
            headers.insert(header::UPGRADE, upgrade);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let sent = [
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("accept", "*/*"),
            ("x-multi", "a"),
            ("x-multi", "b"),
        ];
        let mut h = HeaderMap::new();
        for (name, value) in sent {
            h.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-multi"]);
        assert_eq!(h.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn an_upgrade_keeps_its_pair_only_when_asked() {
        let mut ws = HeaderMap::new();
        ws.insert("connection", HeaderValue::from_static("Upgrade"));
        ws.insert("upgrade", HeaderValue::from_static("websocket"));
        ws.insert("sec-websocket-key", HeaderValue::from_static("k"));
        let mut plain = ws.clone();
        strip_hop_by_hop(&mut ws, true);
        assert_eq!(ws["connection"], "upgrade");
        assert_eq!(ws["upgrade"], "websocket");
        assert_eq!(ws["sec-websocket-key"], "k");
        strip_hop_by_hop(&mut plain, false);
        assert!(!plain.contains_key("upgrade") && !plain.contains_key("connection"));
    }

    #[test]
    fn a_clean_map_is_left_alone() {
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h, before);
    }
}
