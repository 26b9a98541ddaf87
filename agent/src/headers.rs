//! HTTP header rules the edge and the connector share.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// At most this many names listed in `Connection` are honoured.
const MAX_CONNECTION_TOKENS: usize = 64;

/// The hop-by-hop headers with fixed names besides `Connection` (RFC 9110
/// §7.6.1), in the order `strip_hop_by_hop` marks them; every `Proxy-*`
/// header is hop-by-hop too.
static FIXED: [HeaderName; 5] = [
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

/// Removes the hop-by-hop headers: `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding` and
/// `Upgrade`. With `keep_upgrade`, `Upgrade` survives and `Connection` is
/// set to `upgrade` (a WebSocket handshake).
///
/// One pass over the names finds what is there; then only those are
/// removed, by name. The usual case, a response with `Connection:
/// keep-alive` alone, allocates nothing.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let (mut connection, mut proxy, mut fixed) = (false, false, [false; 5]);
    for name in headers.keys() {
        // A match on the text is a switch on its length and one compare.
        match name.as_str() {
            "connection" => connection = true,
            "te" => fixed[0] = true,
            "trailer" => fixed[1] = true,
            "transfer-encoding" => fixed[2] = true,
            "upgrade" => fixed[3] = true,
            "keep-alive" => fixed[4] = true,
            n => proxy |= n.starts_with("proxy-"),
        }
    }
    if !connection && !proxy && !fixed.contains(&true) {
        return;
    }
    let upgrade = match keep_upgrade {
        true => headers.get(header::UPGRADE).cloned(),
        false => None,
    };
    if connection {
        // The values are cloned (a reference count) so that the names they
        // list can be removed from the map they came from.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        headers.remove(header::CONNECTION);
        let listed = first
            .iter()
            .chain(&rest)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .take(MAX_CONNECTION_TOKENS);
        for name in listed {
            // A token that is not a header name removes nothing.
            headers.remove(name);
        }
    }
    for (name, present) in FIXED.iter().zip(fixed) {
        if present {
            headers.remove(name);
        }
    }
    if proxy {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
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
    fn every_connection_header_is_honoured_and_odd_tokens_are_harmless() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close"));
        h.append(
            "connection",
            HeaderValue::from_static(" X-A ,, bad name ,x-b"),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("2"));
        h.insert("x-c", HeaderValue::from_static("3"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-c"]);
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
