//! What edges and connectors are told: pure functions of one store
//! snapshot ([`StoreState`]) and the time, tested without HTTP, a store
//! or a clock. The handlers read the snapshot and call these; the DNS zone
//! (`crate::dns::zone`) is built the same way.
//!
//! Freshness is the store's: an edge is healthy while its `last_seen` is
//! within [`REPORT_FRESH`] of `now` (unix seconds), and its presence counts
//! only then. The presence sweeper (`crate::presence_sweeper`) empties a
//! stale edge's groups in the store, which bumps the version, so edges hear
//! of it over their watch.

use std::collections::BTreeMap;

use portico_proto::api::{
    App, AppClient, AppLink, BackendCa, ConnectorConfig, EdgeCertificate, EdgeConfig, EdgeEndpoint,
    GroupPresence, PeerEdge, SignInSettings, Status, MAX_APP_LINKS,
};
use portico_proto::ids::{EdgeId, GroupId, RegionId};

use crate::config::Config;
use crate::presence::REPORT_FRESH;
use crate::snapshot::StoreState;
use crate::store::{AppRecord, EdgeRecord, PresenceRecord};

/// When a config is built (unix seconds), and since when the router has
/// run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At {
    pub now: u64,
    pub started: u64,
}

impl At {
    /// Reports older than this are stale: those more than [`REPORT_FRESH`]
    /// old, but none while the router has run for less than that (it has
    /// not had a window to hear every edge yet: after a restart, what the
    /// store last knew stands instead of nothing, and no edge leaves the
    /// presence for the router's own absence).
    pub(crate) fn stale_before(self) -> u64 {
        let window = REPORT_FRESH.as_secs();
        if self.now.saturating_sub(self.started) < window {
            0
        } else {
            self.now + 1 - window
        }
    }
}

/// Whether `edge` reported within the freshness window.
pub(crate) fn is_fresh(edge: &EdgeRecord, at: At) -> bool {
    edge.last_seen.is_some_and(|seen| seen >= at.stale_before())
}

/// The port users reach the edges on, for `App.external_url`: the
/// configured one, else that of the first enrolled edge that reported one,
/// else 443.
fn public_port(s: &StoreState, config: &Config) -> u16 {
    if let Some(port) = config.public_port {
        return port;
    }
    s.edges
        .iter()
        .filter_map(|e| {
            let port = e
                .public_addr
                .as_deref()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok())?;
            Some(((e.enrolled_at, e.id.clone()), port))
        })
        .min()
        .map_or(443, |(_, port)| port)
}

/// Every app, with its external URL.
pub(crate) fn apps(s: &StoreState, config: &Config) -> Vec<App> {
    let port = public_port(s, config);
    s.apps
        .iter()
        .cloned()
        .map(|a: AppRecord| {
            crate::api::with_certificate(crate::api::to_app(a, port), &s.certificates)
        })
        .collect()
}

/// The uploaded certificates, as edges get them.
pub(crate) fn certificates(s: &StoreState) -> Vec<EdgeCertificate> {
    s.certificates
        .iter()
        .take(portico_proto::api::MAX_CERTIFICATES)
        .map(|c| EdgeCertificate {
            id: c.id.clone(),
            names: c.names.clone(),
            not_after: c.not_after,
            chain_pem: c.chain_pem.clone(),
            key_pem: c.key_pem.clone(),
        })
        .collect()
}

/// Whether `edge`'s latest report said it is shutting down.
pub(crate) fn is_draining(s: &StoreState, edge: &EdgeId) -> bool {
    draining_in(&s.presence, edge)
}

fn draining_in(presence: &[PresenceRecord], edge: &EdgeId) -> bool {
    presence.iter().any(|p| p.edge == *edge && p.draining)
}

/// An edge's state as `edge list`, `region list`, the metrics and the DNS
/// zone judge it, from the store alone: draining while its fresh report
/// says so, active (healthy) while fresh, else inactive (unhealthy).
pub(crate) fn edge_status(edge: &EdgeRecord, presence: &[PresenceRecord], at: At) -> Status {
    if !is_fresh(edge, at) {
        Status::Inactive
    } else if draining_in(presence, &edge.id) {
        Status::Draining
    } else {
        Status::Active
    }
}

/// Which fresh edges hold tunnels of which group, groups and edges sorted.
/// A draining edge is left out: other edges stop forwarding to it.
pub(crate) fn presence(s: &StoreState, at: At) -> Vec<GroupPresence> {
    let fresh: Vec<&EdgeId> = s
        .edges
        .iter()
        .filter(|e| is_fresh(e, at))
        .map(|e| &e.id)
        .collect();
    let mut by_group: BTreeMap<&GroupId, Vec<EdgeId>> = BTreeMap::new();
    for p in &s.presence {
        if p.draining || !fresh.contains(&&p.edge) {
            continue;
        }
        for (group, tunnels) in &p.groups {
            if *tunnels > 0 {
                by_group.entry(group).or_default().push(p.edge.clone());
            }
        }
    }
    by_group
        .into_iter()
        .map(|(group, mut edges)| {
            edges.sort();
            edges.dedup();
            GroupPresence {
                group: group.clone(),
                edges,
            }
        })
        .collect()
}

/// The config of edge `edge`: every app, the groups, the revocations still
/// worth knowing (deleted within two certificate lifetimes), where each
/// group's tunnels are, and every other live edge as a mesh peer.
pub(crate) fn edge_config(
    s: &StoreState,
    edge: &EdgeRecord,
    config: &Config,
    sign_in: Option<&portico_proto::api::SignInSettings>,
    at: At,
) -> EdgeConfig {
    let now = at.now;
    let keep = 2 * config.cert_ttl.as_secs();
    let mesh_addr = |id: &EdgeId| {
        s.presence
            .iter()
            .find(|p| p.edge == *id)
            .and_then(|p| p.mesh_addr.clone())
    };
    EdgeConfig {
        version: s.version,
        changed_at_ms: s.changed_at_ms,
        region: edge.region.clone(),
        apps_domain: config.apps_domain.clone(),
        apps: apps(s, config),
        groups: s.groups.iter().map(|g| g.id.clone()).collect(),
        revoked: s
            .deleted_connectors
            .iter()
            .filter(|(_, at)| now.saturating_sub(*at) <= keep)
            .map(|(id, _)| id.clone())
            .collect(),
        presence: presence(s, at),
        peers: s
            .edges
            .iter()
            .filter(|e| e.id != edge.id)
            .map(|e| PeerEdge {
                id: e.id.clone(),
                region: e.region.clone(),
                mesh_addr: mesh_addr(&e.id),
                healthy: is_fresh(e, at),
                draining: is_draining(s, &e.id),
                tunnels: e.tunnels,
            })
            .collect(),
        sign_in: sign_in.map(|settings| SignInSettings {
            clients: app_clients(s),
            ..settings.clone()
        }),
        certificates: certificates(s),
        // The API adds the sign-outs since the version the edge asked
        // after (a delta, read from the store apart from the snapshot).
        signed_out: Vec::new(),
        signed_out_users: Vec::new(),
    }
}

/// The apps' own OpenID clients, with their secrets: for edges only (an
/// admin's listing shows the client id alone).
fn app_clients(s: &StoreState) -> Vec<AppClient> {
    s.apps
        .iter()
        .filter_map(|a| match (&a.oidc_client_id, &a.oidc_client_secret) {
            (Some(id), Some(secret)) => Some(AppClient {
                app: a.id.clone(),
                client_id: id.clone(),
                client_secret: secret.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// The config of a connector of `group`: the group's apps, every app's
/// internal → external URL (for link translation), and the edges to dial
/// (its pinned region's, or every region's for `auto`), healthy edges
/// first, then by id. A draining edge is left out: it takes no new
/// tunnels, and its connectors move theirs elsewhere.
pub(crate) fn connector_config(
    s: &StoreState,
    group: &GroupId,
    config: &Config,
    at: At,
) -> ConnectorConfig {
    let record = s.groups.iter().find(|g| g.id == *group);
    let region: Option<RegionId> = record
        .filter(|g| g.region != "auto")
        .and_then(|g| g.region.parse().ok());
    let mut edges: Vec<(bool, EdgeEndpoint)> = s
        .edges
        .iter()
        .filter(|e| region.as_ref().is_none_or(|r| *r == e.region))
        .filter(|e| !is_draining(s, &e.id))
        .filter_map(|e| {
            e.tunnel_addr.clone().map(|tunnel_addr| {
                (
                    is_fresh(e, at),
                    EdgeEndpoint {
                        id: e.id.clone(),
                        region: e.region.clone(),
                        tunnel_addr,
                    },
                )
            })
        })
        .collect();
    edges.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let edges: Vec<EdgeEndpoint> = edges.into_iter().map(|(_, e)| e).collect();
    // Names under `localhost` never reach this zone: resolvers answer them
    // with loopback themselves (RFC 6761).
    let localhost = config.apps_domain == "localhost" || config.apps_domain.ends_with(".localhost");
    let tunnel_names = if config.dns_listen.is_some() && !localhost {
        tunnel_names(s, &edges, &config.apps_domain)
    } else {
        BTreeMap::new()
    };
    let all = apps(s, config);
    let links = links(&all);
    let backend_cas = s
        .apps
        .iter()
        .filter(|a| a.connector_group == *group)
        .filter_map(|a| {
            a.backend_ca_pem.as_ref().map(|pem| BackendCa {
                app: a.id.clone(),
                pem: pem.clone(),
            })
        })
        .collect();
    ConnectorConfig {
        version: s.version,
        group: group.clone(),
        apps: all
            .into_iter()
            .filter(|a| a.connector_group == *group)
            .collect(),
        edges,
        region,
        tunnel_names,
        links,
        backend_cas,
    }
}

/// Every app's internal and external URL, in the store's order (by id), at
/// most [`MAX_APP_LINKS`]: a config stays bounded however many apps are
/// published, and the apps past the bound are named in the log.
fn links(apps: &[App]) -> Vec<AppLink> {
    if apps.len() > MAX_APP_LINKS {
        tracing::warn!(
            apps = apps.len(),
            max = MAX_APP_LINKS,
            first_left_out = %apps[MAX_APP_LINKS].id,
            "more apps than a connector config lists for link translation; links to the rest are not translated"
        );
    }
    apps.iter()
        .take(MAX_APP_LINKS)
        .map(|a| AppLink {
            internal_url: a.internal_url.clone(),
            external_url: a.external_url.clone(),
        })
        .collect()
}

/// `<region>.tunnel.<domain>:<port>` for each region of `edges` whose
/// every edge the zone answers for (an IP address, or an unspecified one
/// the report's source replaces: `dns::edge_ip`), all on one port; a
/// region with an edge whose tunnel address is a name, or with edges on
/// different ports, has none (its connectors use the list).
fn tunnel_names(
    s: &StoreState,
    edges: &[EdgeEndpoint],
    domain: &str,
) -> BTreeMap<RegionId, String> {
    let mut ports: BTreeMap<&RegionId, Option<u16>> = BTreeMap::new();
    for e in edges {
        let from = s
            .presence
            .iter()
            .find(|p| p.edge == e.id)
            .and_then(|p| p.reported_from);
        let port = crate::dns::zone_port(&e.tunnel_addr, from);
        ports
            .entry(&e.region)
            .and_modify(|p| {
                if *p != port {
                    *p = None;
                }
            })
            .or_insert(port);
    }
    ports
        .into_iter()
        .filter_map(|(region, port)| {
            port.map(|port| (region.clone(), format!("{region}.tunnel.{domain}:{port}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::Builder;
    use crate::store::PresenceRecord;

    /// `now`, on a router up for an hour.
    fn at(now: u64) -> At {
        At {
            now,
            started: now - 3600,
        }
    }

    fn config() -> Config {
        let mut c = Config::new("/unused");
        c.apps_domain = "apps.test".into();
        c
    }

    /// Two regions, an edge in each and a stale one; the group's tunnels
    /// sit on `e-eu`.
    fn state(now: u64) -> StoreState {
        let mut b = Builder::new();
        b.region("eu").region("us");
        b.edge("e-eu", "eu", Some("127.0.0.1:8001"), Some("127.0.0.1:7001"));
        b.edge("e-us", "us", Some("127.0.0.1:8002"), Some("127.0.0.1:7002"));
        b.edge(
            "e-old",
            "us",
            Some("127.0.0.1:8003"),
            Some("127.0.0.1:7003"),
        );
        let mut s = b.store.clone();
        for e in &mut s.edges {
            e.last_seen = Some(if e.id.as_str() == "e-old" {
                now - 60
            } else {
                now - 1
            });
        }
        let g = GroupId::default_group();
        s.presence = vec![
            PresenceRecord {
                edge: EdgeId::new("e-eu").unwrap(),
                mesh_addr: Some("127.0.0.1:9001".into()),
                groups: vec![(g.clone(), 2)],
                draining: false,
                reported_from: None,
            },
            PresenceRecord {
                edge: EdgeId::new("e-old").unwrap(),
                mesh_addr: Some("127.0.0.1:9003".into()),
                // Not yet swept: its report is stale, so it does not count.
                groups: vec![(g.clone(), 4)],
                draining: false,
                reported_from: None,
            },
            PresenceRecord {
                edge: EdgeId::new("e-us").unwrap(),
                mesh_addr: None,
                groups: vec![],
                draining: false,
                reported_from: None,
            },
        ];
        s.version = 42;
        s
    }

    #[test]
    fn an_edge_learns_where_each_group_is_and_its_peers() {
        let now = 10_000;
        let s = state(now);
        let us = s.edges.iter().find(|e| e.id.as_str() == "e-us").unwrap();
        let c = edge_config(&s, us, &config(), None, at(now));
        assert_eq!(c.version, 42);
        assert_eq!(c.region.as_str(), "us");
        assert_eq!(
            c.presence,
            vec![GroupPresence {
                group: GroupId::default_group(),
                edges: vec![EdgeId::new("e-eu").unwrap()],
            }]
        );
        let peers: Vec<(&str, Option<&str>, bool)> = c
            .peers
            .iter()
            .map(|p| (p.id.as_str(), p.mesh_addr.as_deref(), p.healthy))
            .collect();
        assert_eq!(
            peers,
            vec![
                ("e-eu", Some("127.0.0.1:9001"), true),
                ("e-old", Some("127.0.0.1:9003"), false),
            ]
        );
    }

    #[test]
    fn presence_follows_freshness_and_tunnel_counts() {
        let now = 10_000;
        let mut s = state(now);
        // Everyone stale: nobody holds anything.
        assert!(presence(&s, at(now + 3600)).is_empty());
        // A group with zero tunnels is not held.
        s.presence[0].groups = vec![(GroupId::default_group(), 0)];
        assert!(presence(&s, at(now)).is_empty());
    }

    #[test]
    fn a_router_just_started_keeps_what_the_store_knew_for_one_window() {
        let now = 10_000;
        let s = state(now);
        // Up for 5 s after an outage: every edge's last report is old, but
        // the router has not had a window to hear them; the stale e-old
        // counts too, until the window has passed.
        let early = At {
            now,
            started: now - 5,
        };
        let holders = &presence(&s, early)[0].edges;
        assert_eq!(holders.len(), 2, "{holders:?}");
        assert_eq!(early.stale_before(), 0);
        let later = At {
            now: now + 15,
            started: now - 5,
        };
        assert_eq!(presence(&s, later), Vec::new(), "all stale by then");
        // 14 s old is fresh, 15 s is not.
        let up = at(now);
        assert_eq!(up.stale_before(), now - 14);
    }

    #[test]
    fn a_connector_gets_its_groups_apps_and_healthy_edges_first() {
        let now = 10_000;
        let s = state(now);
        let c = connector_config(&s, &GroupId::default_group(), &config(), at(now));
        let edges: Vec<&str> = c.edges.iter().map(|e| e.id.as_str()).collect();
        // Healthy first (by id), then the stale one.
        assert_eq!(edges, vec!["e-eu", "e-us", "e-old"]);
        assert_eq!(c.region, None);
        assert_eq!(c.version, 42);
    }

    #[test]
    fn a_connector_gets_the_links_of_every_groups_apps_but_only_its_groups_apps() {
        let now = 10_000;
        let mut b = Builder::new();
        b.group("other", "auto");
        b.app("hr.apps.test", "Default")
            .app("wiki.apps.test", "other");
        b.store.apps[0].internal_url = "http://hr.corp:8080/hr/".into();
        b.store.apps[1].internal_url = "https://wiki.corp/".into();
        let mut s = b.store.clone();
        s.version = 7;
        let mut c = config();
        c.public_port = Some(8443);
        let got = connector_config(&s, &GroupId::default_group(), &c, at(now));
        let ids: Vec<&str> = got.apps.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["hr"]);
        let links: Vec<(&str, &str)> = got
            .links
            .iter()
            .map(|l| (l.internal_url.as_str(), l.external_url.as_str()))
            .collect();
        assert_eq!(
            links,
            [
                ("http://hr.corp:8080/hr/", "https://hr.apps.test:8443/"),
                ("https://wiki.corp/", "https://wiki.apps.test:8443/"),
            ]
        );
        // The other group's connector gets the same links.
        let other = connector_config(&s, &GroupId::new("other").unwrap(), &c, at(now));
        assert_eq!(other.links, got.links);
        // Bounded however many apps there are.
        for i in 0..MAX_APP_LINKS {
            b.app(&format!("a{i}.apps.test"), "Default");
        }
        let s = b.store.clone();
        let got = connector_config(&s, &GroupId::default_group(), &c, at(now));
        assert_eq!(got.links.len(), MAX_APP_LINKS);
        assert_eq!(got.apps.len(), MAX_APP_LINKS + 1, "apps are not cut");
        // The first apps, in the store's order, are the ones kept.
        assert_eq!(got.links[0].internal_url, "http://hr.corp:8080/hr/");
    }

    #[test]
    fn an_edge_is_active_while_fresh_draining_while_it_says_so_and_inactive_once_stale() {
        let now = 10_000;
        let mut s = state(now);
        let of = |s: &StoreState, id: &str, at: At| {
            let e = s.edges.iter().find(|e| e.id.as_str() == id).unwrap();
            edge_status(e, &s.presence, at)
        };
        assert_eq!(of(&s, "e-eu", at(now)), Status::Active);
        assert_eq!(of(&s, "e-old", at(now)), Status::Inactive);
        s.presence[0].draining = true;
        assert_eq!(of(&s, "e-eu", at(now)), Status::Draining);
        // A draining edge that went silent is just gone.
        assert_eq!(of(&s, "e-eu", at(now + 60)), Status::Inactive);
        // A router just started judges nobody stale yet.
        let early = At {
            now,
            started: now - 5,
        };
        assert_eq!(of(&s, "e-old", early), Status::Active);
    }

    #[test]
    fn a_draining_edge_leaves_the_presence_and_the_connectors_edge_lists() {
        let now = 10_000;
        let mut s = state(now);
        s.presence[0].draining = true;
        assert!(presence(&s, at(now)).is_empty(), "e-eu held the group");
        let us = s.edges.iter().find(|e| e.id.as_str() == "e-us").unwrap();
        let c = edge_config(&s, us, &config(), None, at(now));
        let eu = c.peers.iter().find(|p| p.id.as_str() == "e-eu").unwrap();
        assert!(eu.draining && eu.healthy);
        let c = connector_config(&s, &GroupId::default_group(), &config(), at(now));
        let edges: Vec<&str> = c.edges.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(edges, vec!["e-us", "e-old"]);
    }

    #[test]
    fn a_region_gets_a_tunnel_name_when_dns_is_served_and_its_edges_are_in_the_zone_on_one_port() {
        let now = 10_000;
        let s = state(now);
        let g = GroupId::default_group();
        // No DNS: no names.
        let c = connector_config(&s, &g, &config(), at(now));
        assert!(c.tunnel_names.is_empty(), "{:?}", c.tunnel_names);
        let mut dns = config();
        dns.dns_listen = Some("127.0.0.1:0".parse().unwrap());
        // us's two edges are on different ports: only eu has a name.
        let c = connector_config(&s, &g, &dns, at(now));
        let names: Vec<(&str, &str)> = c
            .tunnel_names
            .iter()
            .map(|(r, n)| (r.as_str(), n.as_str()))
            .collect();
        assert_eq!(names, vec![("eu", "eu.tunnel.apps.test:7001")]);
        // One port for us, and an unspecified address its report's source
        // fills in: us has one too. A name as an address: none.
        let mut s = state(now);
        for e in &mut s.edges {
            if e.region.as_str() == "us" {
                e.tunnel_addr = Some(if e.id.as_str() == "e-old" {
                    "0.0.0.0:7002".into()
                } else {
                    "127.0.0.1:7002".into()
                });
            }
        }
        s.presence[1].reported_from = Some("192.0.2.9".parse().unwrap());
        let c = connector_config(&s, &g, &dns, at(now));
        assert_eq!(
            c.tunnel_names
                .get(&"us".parse().unwrap())
                .map(String::as_str),
            Some("us.tunnel.apps.test:7002")
        );
        s.presence[1].reported_from = None;
        let c = connector_config(&s, &g, &dns, at(now));
        assert!(!c.tunnel_names.contains_key(&"us".parse().unwrap()));
        for e in &mut s.edges {
            if e.id.as_str() == "e-eu" {
                e.tunnel_addr = Some("edge.example:7001".into());
            }
        }
        let c = connector_config(&s, &g, &dns, at(now));
        assert!(c.tunnel_names.is_empty(), "{:?}", c.tunnel_names);
        // An apps domain under localhost: no names either.
        let s = state(now);
        dns.apps_domain = "apps.localhost".into();
        let c = connector_config(&s, &g, &dns, at(now));
        assert!(c.tunnel_names.is_empty(), "{:?}", c.tunnel_names);
    }
}
