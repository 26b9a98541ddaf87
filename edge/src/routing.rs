//! The routing table: external host → app (exact hosts first, then
//! wildcard apps), plus the set of revoked connectors. Built from an
//! `EdgeConfig` snapshot and swapped atomically.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use portico_proto::api::{is_ldh_label, wildcard_suffix, App, EdgeConfig, PeerEdge};
use portico_proto::{ConnectorId, GroupId, RegionId};

/// One immutable snapshot of what the edge routes.
#[derive(Debug)]
pub(crate) struct RoutingTable {
    pub(crate) config: EdgeConfig,
    by_host: HashMap<String, Arc<App>>,
    /// Wildcard apps (`*.corp.apps.example.com`) by the suffix after the
    /// `*.` (`corp.apps.example.com`).
    by_wildcard: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
    revoked: HashSet<ConnectorId>,
}

impl RoutingTable {
    pub(crate) fn new(config: EdgeConfig) -> Self {
        let mut by_host = HashMap::new();
        let mut by_wildcard = HashMap::new();
        for app in &config.apps {
            match wildcard_suffix(&app.external_host) {
                Some(suffix) => {
                    if let Some(suffix) = normalize_host(suffix) {
                        by_wildcard.insert(suffix.into_owned(), Arc::new(app.clone()));
                    }
                }
                None => {
                    if let Some(host) = normalize_host(&app.external_host) {
                        by_host.insert(host.into_owned(), Arc::new(app.clone()));
                    }
                }
            }
        }
        let by_id = config
            .apps
            .iter()
            .map(|app| (app.id.as_str().to_owned(), Arc::new(app.clone())))
            .collect();
        let revoked = config.revoked.iter().cloned().collect();
        RoutingTable {
            config,
            by_host,
            by_wildcard,
            by_id,
            revoked,
        }
    }

    /// The table of an edge that has no config yet: routes nothing.
    pub(crate) fn empty(region: RegionId) -> Self {
        RoutingTable::new(EdgeConfig {
            version: 0,
            changed_at_ms: 0,
            region,
            apps_domain: String::new(),
            apps: Vec::new(),
            groups: Vec::new(),
            revoked: Vec::new(),
            presence: Vec::new(),
            peers: Vec::new(),
            sign_in: None,
            certificates: Vec::new(),
            signed_out: Vec::new(),
            signed_out_users: Vec::new(),
        })
    }

    pub(crate) fn version(&self) -> u64 {
        self.config.version
    }

    /// The app published at this (already normalized) host: the app of
    /// exactly this host, else the wildcard app whose `*` stands for the
    /// host's first label, `*.<parent>` (a wildcard stands for one LDH
    /// label, as in a certificate: see `api::wildcard_label`). So an exact
    /// host wins over a wildcard, and of `*.corp.apps.test` and
    /// `*.apps.test`, `hr.corp.apps.test` can only be the first's.
    pub(crate) fn app_for_host(&self, host: &str) -> Option<&Arc<App>> {
        if let Some(app) = self.by_host.get(host) {
            return Some(app);
        }
        if self.by_wildcard.is_empty() {
            return None;
        }
        let (label, parent) = host.split_once('.')?;
        if !is_ldh_label(label) {
            return None;
        }
        self.by_wildcard.get(parent)
    }

    /// The app with this id: how a request forwarded by another edge is
    /// routed (its head names the app, not the host).
    pub(crate) fn app_by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }

    /// The other edges that hold tunnels of `group` and take mesh links
    /// (healthy, with a mesh address), by id.
    pub(crate) fn peers_holding(&self, group: &GroupId) -> Vec<&PeerEdge> {
        let Some(presence) = self.config.presence.iter().find(|p| p.group == *group) else {
            return Vec::new();
        };
        self.config
            .peers
            .iter()
            .filter(|p| p.healthy && p.mesh_addr.is_some() && presence.edges.contains(&p.id))
            .collect()
    }

    /// Every other edge of `region` that takes mesh links, whatever the
    /// presence says: where to look when the router cannot be asked and
    /// the presence may be out of date.
    pub(crate) fn mesh_peers_in(&self, region: &RegionId) -> Vec<&PeerEdge> {
        self.config
            .peers
            .iter()
            .filter(|p| p.region == *region && p.mesh_addr.is_some())
            .collect()
    }

    pub(crate) fn is_revoked(&self, connector: &ConnectorId) -> bool {
        self.revoked.contains(connector)
    }
}

/// Lower-cases a host, strips its port and one trailing dot. IPv6 literals
/// keep their brackets. `None` for anything that is not a plausible host
/// (a userinfo part's `@` included). Borrows when nothing needs
/// lower-casing (the usual request), and classes the bytes in one pass
/// without a branch per byte: this runs for every request.
pub(crate) fn normalize_host(raw: &str) -> Option<Cow<'_, str>> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 1024 {
        return None;
    }
    // One pass, without a branch per byte: OR together each byte's class.
    let seen = raw
        .bytes()
        .fold(0, |seen, b| seen | HOST_BYTE[usize::from(b)]);
    if seen & NOT_IN_HOST != 0 {
        return None;
    }
    let upper = seen & UPPER != 0;
    let host = if raw.starts_with('[') {
        let end = raw.find(']')?;
        let rest = &raw[end + 1..];
        if !(rest.is_empty() || valid_port(rest.strip_prefix(':')?)) {
            return None;
        }
        &raw[..=end]
    } else {
        match raw.rfind(':') {
            Some(at) => {
                if !valid_port(&raw[at + 1..]) {
                    return None;
                }
                &raw[..at]
            }
            None => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    // A port is digits, so any capital is the host's.
    if upper {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

/// [`HOST_BYTE`] classes: a byte no host or port has, and a capital.
const NOT_IN_HOST: u8 = 1;
const UPPER: u8 = 2;

/// The class of every byte for [`normalize_host`]: letters, digits, `.`,
/// `-`, `_`, `[`, `]` and `:` may appear (the port's `:` and IPv6
/// literals' included); capitals are marked.
const HOST_BYTE: [u8; 256] = {
    let mut class = [NOT_IN_HOST; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(c, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        {
            class[b] = 0;
        } else if c.is_ascii_uppercase() {
            class[b] = UPPER;
        }
        b += 1;
    }
    class
};

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The straightforward version `normalize_host` replaced (one pass per
    /// rule); the property below holds them to the same answers.
    fn normalize_host_by_rules(raw: &str) -> Option<String> {
        let raw = raw.trim();
        if raw.is_empty() || raw.contains('@') || raw.len() > 1024 {
            return None;
        }
        let host = if raw.starts_with('[') {
            let end = raw.find(']')?;
            let rest = &raw[end + 1..];
            if !(rest.is_empty() || valid_port(rest.strip_prefix(':')?)) {
                return None;
            }
            &raw[..=end]
        } else {
            match raw.rsplit_once(':') {
                Some((host, port)) => {
                    if !valid_port(port) {
                        return None;
                    }
                    host
                }
                None => raw,
            }
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty()
            || !host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
            })
        {
            return None;
        }
        Some(host.to_ascii_lowercase())
    }

    proptest::proptest! {
        #[test]
        fn normalize_host_gives_what_its_rules_say(
            raw in "[ a-zA-Z0-9.:_\\[\\]@/%-]{0,24}",
        ) {
            proptest::prop_assert_eq!(
                normalize_host(&raw).map(|h| h.into_owned()),
                normalize_host_by_rules(&raw)
            );
        }
    }
    use portico_proto::api::BackendTimeout;
    use portico_proto::{AppId, GroupId};

    pub(crate) fn app(id: &str, host: &str) -> App {
        App {
            id: AppId::new(id).unwrap(),
            external_host: host.to_owned(),
            external_url: format!("https://{host}/"),
            internal_url: "http://127.0.0.1:1/".to_owned(),
            connector_group: GroupId::default_group(),
            backend_timeout: BackendTimeout::Seconds(5),
            validate_backend_tls: true,
            translate_headers: true,
            translate_body: false,
            required_features: vec![],
            preauth: Default::default(),
            assignment: Default::default(),
            identity_headers: Default::default(),
            hidden: false,
            maintenance: false,
            home_url: String::new(),
            backend_ca_sha256: None,
            http_only: true,
            persistent: false,
            oidc_client_id: None,
            created_at: 0,
            certificate: None,
        }
    }

    #[test]
    fn host_parsing_strips_port_and_case() {
        assert_eq!(
            normalize_host("HR.Apps.Example.com:8443").as_deref(),
            Some("hr.apps.example.com")
        );
        assert_eq!(
            normalize_host("hr.apps.example.com.").as_deref(),
            Some("hr.apps.example.com")
        );
        assert_eq!(
            normalize_host("hr.apps.example.com").as_deref(),
            Some("hr.apps.example.com")
        );
        assert_eq!(normalize_host("[::1]:443").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("user@host"), None);
        assert_eq!(normalize_host("host:abc"), None);
        assert_eq!(normalize_host("host:"), None);
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("a b"), None);
        assert_eq!(normalize_host("[::1"), None);
    }

    #[test]
    fn table_finds_apps_by_exact_host() {
        let table = RoutingTable::new(EdgeConfig {
            version: 3,
            changed_at_ms: 0,
            region: RegionId::default_region(),
            apps_domain: "apps.test".into(),
            apps: vec![app("hr", "hr.apps.test"), app("wiki", "Wiki.apps.test")],
            groups: vec![GroupId::default_group()],
            revoked: vec![ConnectorId::new("c-bad").unwrap()],
            presence: Vec::new(),
            peers: Vec::new(),
            sign_in: None,
            certificates: Vec::new(),
            signed_out: Vec::new(),
            signed_out_users: Vec::new(),
        });
        assert_eq!(
            table.app_for_host("hr.apps.test").unwrap().id.as_str(),
            "hr"
        );
        assert_eq!(
            table.app_for_host("wiki.apps.test").unwrap().id.as_str(),
            "wiki"
        );
        assert!(table.app_for_host("x.hr.apps.test").is_none());
        assert!(table.app_for_host("apps.test").is_none());
        assert!(table.is_revoked(&ConnectorId::new("c-bad").unwrap()));
        assert!(!table.is_revoked(&ConnectorId::new("c-good").unwrap()));
        assert_eq!(table.version(), 3);
    }

    /// Which app each host goes to, with exact, wildcard and nested
    /// wildcard apps published together: exact first, then the wildcard
    /// of the host's parent; a wildcard stands for one LDH label only.
    #[test]
    fn exact_hosts_win_then_the_most_specific_wildcard() {
        let table = RoutingTable::new(EdgeConfig {
            version: 1,
            changed_at_ms: 0,
            region: RegionId::default_region(),
            apps_domain: "apps.test".into(),
            apps: vec![
                app("any", "*.apps.test"),
                app("corp", "*.corp.apps.test"),
                app("deep", "*.eu.corp.apps.test"),
                app("hr", "hr.corp.apps.test"),
                app("wiki", "wiki.apps.test"),
            ],
            groups: vec![GroupId::default_group()],
            revoked: vec![],
            presence: Vec::new(),
            peers: Vec::new(),
            sign_in: None,
            certificates: Vec::new(),
            signed_out: Vec::new(),
            signed_out_users: Vec::new(),
        });
        for (host, want) in [
            // Exact hosts, also under a wildcard.
            ("hr.corp.apps.test", Some("hr")),
            ("wiki.apps.test", Some("wiki")),
            // The wildcard of the host's parent, the longest that applies.
            ("payroll.corp.apps.test", Some("corp")),
            ("paris.eu.corp.apps.test", Some("deep")),
            ("corp.apps.test", Some("any")),
            ("eu.corp.apps.test", Some("corp")),
            ("x-1.apps.test", Some("any")),
            // More than one label, or not LDH: no wildcard takes it.
            ("a.b.corp.apps.test", None),
            ("a.paris.eu.corp.apps.test", None),
            ("a_b.corp.apps.test", None),
            ("-a.corp.apps.test", None),
            ("*.corp.apps.test", None),
            // Not under any of them.
            ("apps.test", None),
            ("x.example.com", None),
        ] {
            assert_eq!(
                table.app_for_host(host).map(|a| a.id.as_str()),
                want,
                "{host}"
            );
        }
    }
}
