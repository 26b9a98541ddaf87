//! The router's state at one moment: what the store holds (regions, groups,
//! apps, live edges and connectors, and where each edge's tunnels are) and
//! the time it is judged at.
//!
//! A [`Snapshot`] is plain data, read once and then asked questions that
//! need no store, socket or clock: which edges of a region are healthy, and
//! which region serves a group. The DNS zone is a function of one
//! (`crate::dns::zone`), as the edge and connector configs are of its
//! [`StoreState`] (`crate::distribute`). Nothing in it comes from one
//! router's memory: a replica that did not receive an edge's report judges
//! the edge as the one that did.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use portico_proto::ids::{ConnectorId, EdgeId, GroupId, RegionId};

use crate::distribute::{edge_status, is_fresh, At};
use crate::error::StoreError;
use crate::store::{
    AppRecord, CertificateRecord, EdgeRecord, GroupRecord, PresenceRecord, RegionRecord, Store,
};

/// What the store held at one config version. Deleted edges and connectors
/// are left out.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreState {
    /// The config version read before everything else (the data is at
    /// least this new).
    pub version: u64,
    /// When the store last changed (unix ms), read with the version.
    pub changed_at_ms: u64,
    /// Every region, by id.
    pub regions: Vec<RegionRecord>,
    pub groups: Vec<GroupRecord>,
    pub apps: Vec<AppRecord>,
    /// Live edges, by id.
    pub edges: Vec<EdgeRecord>,
    /// Deleted connectors and when they were deleted: the revocations.
    pub deleted_connectors: Vec<(ConnectorId, u64)>,
    /// Where each live edge's tunnels are, by edge id.
    pub presence: Vec<PresenceRecord>,
    /// Uploaded certificates, by id.
    pub certificates: Vec<CertificateRecord>,
}

impl StoreState {
    /// Reads everything a snapshot needs (a blocking call).
    pub(crate) fn read(s: &dyn Store) -> Result<StoreState, StoreError> {
        let version = s.config_version()?;
        let changed_at_ms = s.config_changed_at_ms()?;
        let connectors = s.list_connectors()?;
        let mut edges: Vec<EdgeRecord> = s
            .list_edges()?
            .into_iter()
            .filter(|e| e.deleted_at.is_none())
            .collect();
        edges.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(StoreState {
            version,
            changed_at_ms,
            regions: s.list_regions()?,
            groups: s.list_groups()?.into_iter().map(|(g, _)| g).collect(),
            apps: s.list_apps()?,
            edges,
            deleted_connectors: connectors
                .iter()
                .filter_map(|c| c.deleted_at.map(|d| (c.id.clone(), d)))
                .collect(),
            presence: s.list_presence()?,
            certificates: s.list_certificates()?,
        })
    }
}

/// The store's state and when it is judged.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub store: Arc<StoreState>,
    pub at: At,
}

/// One live edge of a region, and whether it is healthy: its latest report
/// is fresh (`distribute::is_fresh`) and did not say it is draining.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RegionEdge<'a> {
    pub edge: &'a EdgeRecord,
    pub healthy: bool,
}

impl Snapshot {
    /// The live edges of `region`, by id.
    pub(crate) fn region_edges<'a>(
        &'a self,
        region: &'a RegionId,
    ) -> impl Iterator<Item = RegionEdge<'a>> + 'a {
        self.store
            .edges
            .iter()
            .filter(move |e| e.region == *region)
            .map(|edge| RegionEdge {
                edge,
                healthy: edge_status(edge, &self.store.presence, self.at)
                    == portico_proto::api::Status::Active,
            })
    }

    /// The address `edge`'s latest report came from, if known.
    pub(crate) fn reported_from(&self, edge: &EdgeId) -> Option<IpAddr> {
        self.store
            .presence
            .iter()
            .find(|p| p.edge == *edge)
            .and_then(|p| p.reported_from)
    }

    /// The region that serves `group`'s apps:
    ///
    /// 1. a group pinned to a region that exists: that region;
    /// 2. otherwise the region whose edges' fresh reports hold the most of
    ///    the group's tunnels (a tie goes to the lowest region id);
    /// 3. with none of its tunnels anywhere: `default` if it has an edge,
    ///    else the lowest region id that has one (so that users reach an
    ///    edge, which says `ConnectorNotFound`, rather than no address),
    ///    else `default`.
    pub(crate) fn group_region(&self, group: &GroupId) -> RegionId {
        let record = self.store.groups.iter().find(|g| g.id == *group);
        if let Some(pinned) = record
            .filter(|g| g.region != "auto")
            .and_then(|g| g.region.parse::<RegionId>().ok())
            .filter(|r| self.store.regions.iter().any(|known| known.id == *r))
        {
            return pinned;
        }
        if let Some(region) = self.busiest_region(group) {
            return region;
        }
        let default = RegionId::default_region();
        let has_edges = |r: &RegionId| self.store.edges.iter().any(|e| e.region == *r);
        if has_edges(&default) {
            return default;
        }
        self.store
            .regions
            .iter()
            .map(|r| &r.id)
            .filter(|r| has_edges(r))
            .min()
            .cloned()
            .unwrap_or(default)
    }

    /// The region holding most of `group`'s tunnels by the fresh reports,
    /// lowest id on a tie; `None` when it has none.
    fn busiest_region(&self, group: &GroupId) -> Option<RegionId> {
        let fresh: HashMap<&EdgeId, &RegionId> = self
            .store
            .edges
            .iter()
            .filter(|e| is_fresh(e, self.at))
            .map(|e| (&e.id, &e.region))
            .collect();
        let mut tunnels: BTreeMap<&RegionId, u64> = BTreeMap::new();
        for p in &self.store.presence {
            let Some(region) = fresh.get(&p.edge) else {
                continue; // stale, or deleted meanwhile
            };
            let mine: u64 = p
                .groups
                .iter()
                .filter(|(g, _)| g == group)
                .map(|(_, n)| u64::from(*n))
                .sum();
            if mine > 0 {
                *tunnels.entry(region).or_default() += mine;
            }
        }
        // Most tunnels first; between equals, the lower id compares
        // greater, so that it is the one kept.
        tunnels
            .into_iter()
            .max_by(|(ra, a), (rb, b)| a.cmp(b).then_with(|| rb.cmp(ra)))
            .map(|(r, _)| r.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use portico_proto::api::BackendTimeout;

    use super::*;
    use crate::presence::REPORT_FRESH;
    use crate::store::{CertInfo, PresenceRecord};

    /// A snapshot builder for tests of the snapshot and of the DNS zone.
    pub(crate) struct Builder {
        pub store: StoreState,
        /// Unix seconds, on a router up for an hour.
        pub now: u64,
        /// Each connector's group: what a report's tunnels count for.
        connector_groups: HashMap<ConnectorId, GroupId>,
    }

    impl Builder {
        pub(crate) fn new() -> Builder {
            let mut b = Builder {
                store: StoreState::default(),
                now: 1_000_000,
                connector_groups: HashMap::new(),
            };
            b.region("default");
            b.group("Default", "auto");
            b
        }

        pub(crate) fn region(&mut self, id: &str) -> &mut Self {
            self.store.regions.push(RegionRecord {
                id: id.parse().unwrap(),
                created_at: 0,
            });
            self.store.regions.sort_by(|a, b| a.id.cmp(&b.id));
            self
        }

        pub(crate) fn group(&mut self, id: &str, region: &str) -> &mut Self {
            self.store.groups.push(GroupRecord {
                id: GroupId::new(id).unwrap(),
                region: region.into(),
                created_at: 0,
            });
            self
        }

        pub(crate) fn app(&mut self, host: &str, group: &str) -> &mut Self {
            self.store.apps.push(AppRecord {
                // `*.corp.x` is app `corp`.
                id: portico_proto::ids::AppId::new(host.split('.').find(|l| *l != "*").unwrap())
                    .unwrap(),
                external_host: host.into(),
                internal_url: "http://intra/".into(),
                connector_group: GroupId::new(group).unwrap(),
                backend_timeout: BackendTimeout::Default,
                validate_backend_tls: true,
                translate_headers: true,
                translate_body: false,
                required_features: vec![],
                assignment: Default::default(),
                identity_headers: Default::default(),
                hidden: false,
                created_at: 0,
                maintenance: false,
                home_path: None,
                backend_ca_pem: None,
                http_only: true,
                persistent: false,
                oidc_client_id: None,
                oidc_client_secret: None,
            });
            self
        }

        /// An edge with these reported addresses (none: never reported).
        pub(crate) fn edge(
            &mut self,
            id: &str,
            region: &str,
            public: Option<&str>,
            tunnel: Option<&str>,
        ) -> &mut Self {
            self.store.edges.push(EdgeRecord {
                id: EdgeId::new(id).unwrap(),
                region: region.parse().unwrap(),
                host: "h".into(),
                version: "v".into(),
                enrolled_at: 0,
                cert: CertInfo {
                    serial: "01".into(),
                    not_after: 0,
                },
                tunnel_addr: tunnel.map(str::to_owned),
                public_addr: public.map(str::to_owned),
                last_seen: None,
                tunnels: 0,
                deleted_at: None,
            });
            self.store.edges.sort_by(|a, b| a.id.cmp(&b.id));
            self
        }

        pub(crate) fn connector(&mut self, id: &str, group: &str) -> &mut Self {
            self.connector_groups
                .insert(ConnectorId::new(id).unwrap(), GroupId::new(group).unwrap());
            self
        }

        /// What the store holds after a report from `edge` (sent from
        /// `from`) listing these connectors and tunnels, `age` before
        /// `now`: its `last_seen`, and its presence by group.
        pub(crate) fn report(
            &mut self,
            edge: &str,
            from: Option<&str>,
            connectors: &[(&str, u32)],
            age: Duration,
        ) -> &mut Self {
            let mut groups: BTreeMap<GroupId, u32> = BTreeMap::new();
            for (c, n) in connectors {
                let g = self.connector_groups[&ConnectorId::new(*c).unwrap()].clone();
                *groups.entry(g).or_default() += n;
            }
            self.seen(
                edge,
                age,
                PresenceRecord {
                    edge: EdgeId::new(edge).unwrap(),
                    mesh_addr: None,
                    groups: groups.into_iter().collect(),
                    draining: false,
                    reported_from: from.map(|f| f.parse::<IpAddr>().unwrap().to_canonical()),
                },
            )
        }

        /// A fresh report from `edge` saying it is shutting down.
        pub(crate) fn draining(&mut self, edge: &str) -> &mut Self {
            self.seen(
                edge,
                Duration::ZERO,
                PresenceRecord {
                    edge: EdgeId::new(edge).unwrap(),
                    mesh_addr: None,
                    groups: Vec::new(),
                    draining: true,
                    reported_from: None,
                },
            )
        }

        fn seen(&mut self, edge: &str, age: Duration, p: PresenceRecord) -> &mut Self {
            let e = self
                .store
                .edges
                .iter_mut()
                .find(|e| e.id.as_str() == edge)
                .expect("report of a known edge");
            e.last_seen = Some(self.now - age.as_secs());
            self.store.presence.retain(|q| q.edge != p.edge);
            self.store.presence.push(p);
            self
        }

        pub(crate) fn snapshot(&self) -> Snapshot {
            Snapshot {
                store: Arc::new(self.store.clone()),
                at: At {
                    now: self.now,
                    started: self.now - 3600,
                },
            }
        }
    }

    fn region(id: &str) -> RegionId {
        id.parse().unwrap()
    }

    fn group(id: &str) -> GroupId {
        GroupId::new(id).unwrap()
    }

    const FRESH: Duration = Duration::from_secs(1);
    const STALE: Duration = Duration::from_secs(REPORT_FRESH.as_secs() + 1);

    #[test]
    fn a_pinned_group_is_served_by_its_region_wherever_its_connectors_are() {
        let mut b = Builder::new();
        b.region("eu-west")
            .region("us-east")
            .group("eu", "eu-west")
            .edge("e-us", "us-east", None, None)
            .connector("c-1", "eu")
            .report("e-us", None, &[("c-1", 4)], FRESH);
        assert_eq!(b.snapshot().group_region(&group("eu")), region("eu-west"));
    }

    #[test]
    fn an_auto_group_is_served_where_most_of_its_tunnels_are_ties_by_region_id() {
        let mut b = Builder::new();
        b.region("eu-west")
            .region("us-east")
            .region("ap-south")
            .edge("e-eu-1", "eu-west", None, None)
            .edge("e-eu-2", "eu-west", None, None)
            .edge("e-us", "us-east", None, None)
            .edge("e-ap", "ap-south", None, None)
            .connector("c-1", "Default")
            .connector("c-2", "Default")
            .connector("c-other", "Other")
            // eu-west: 1 + 1 of the group's tunnels; us-east: 3, but one
            // connector of another group with 9 does not count.
            .report("e-eu-1", None, &[("c-1", 1)], FRESH)
            .report("e-eu-2", None, &[("c-2", 1)], FRESH)
            .report("e-us", None, &[("c-1", 3)], FRESH)
            .report("e-ap", None, &[("c-other", 9)], FRESH);
        assert_eq!(
            b.snapshot().group_region(&group("Default")),
            region("us-east")
        );
        // A tie (eu-west 2+1 = 3, us-east 3): the lower id.
        b.report("e-eu-2", None, &[("c-2", 2)], FRESH);
        assert_eq!(
            b.snapshot().group_region(&group("Default")),
            region("eu-west")
        );
        // A stale report counts for nothing.
        b.report("e-eu-1", None, &[("c-1", 1)], STALE)
            .report("e-eu-2", None, &[("c-2", 2)], STALE);
        assert_eq!(
            b.snapshot().group_region(&group("Default")),
            region("us-east")
        );
    }

    #[test]
    fn a_group_without_tunnels_is_served_by_default_or_the_first_region_with_edges() {
        let mut b = Builder::new();
        b.region("us-east").region("eu-west");
        assert_eq!(
            b.snapshot().group_region(&group("Default")),
            region("default"),
            "no edges anywhere"
        );
        b.edge("e-us", "us-east", None, None)
            .edge("e-eu", "eu-west", None, None);
        assert_eq!(
            b.snapshot().group_region(&group("Default")),
            region("eu-west"),
            "default has no edge: the lowest id that has one"
        );
        b.edge("e-d", "default", None, None);
        assert_eq!(
            b.snapshot().group_region(&group("Default")),
            region("default")
        );
        // A group that does not exist (an app outlived it) is auto.
        assert_eq!(b.snapshot().group_region(&group("Gone")), region("default"));
    }

    #[test]
    fn edges_of_a_region_are_healthy_while_their_reports_are_fresh() {
        let mut b = Builder::new();
        b.region("eu-west")
            .edge("e-1", "eu-west", None, None)
            .edge("e-2", "eu-west", None, None)
            .edge("e-3", "eu-west", None, None)
            .edge("e-d", "default", None, None)
            .report("e-1", None, &[], FRESH)
            .report("e-2", None, &[], STALE);
        let s = b.snapshot();
        let eu = region("eu-west");
        let edges: Vec<(&str, bool)> = s
            .region_edges(&eu)
            .map(|e| (e.edge.id.as_str(), e.healthy))
            .collect();
        assert_eq!(edges, [("e-1", true), ("e-2", false), ("e-3", false)]);
    }
}
