//! The router's DNS authority for the apps domain: the zone, computed as a
//! pure function of a [`Snapshot`] ([`zone`]), and how a query is answered
//! from it ([`Zone::answer`]). `server` puts it on UDP and TCP and keeps it
//! current.
//!
//! The zone holds:
//!
//! - at the apex, an SOA and an NS (`ns.<domain>`, with the authority's own
//!   address when it listens on a specific one);
//! - `<region>.edge.<domain>`: A/AAAA of the region's healthy edges' public
//!   addresses, and `<region>.tunnel.<domain>`: of their tunnel addresses
//!   ([`EDGE_TTL`]). When no edge of a region is healthy, all of them (fail
//!   open). A region without edges is a name without addresses (NODATA);
//! - each app host: a CNAME to `<region>.edge.<domain>` of the region that
//!   serves its group ([`Snapshot::group_region`], [`APP_TTL`]);
//! - each wildcard app (`*.corp.<domain>`): the same CNAME for every name
//!   one LDH label under `corp.<domain>` that the zone has no records for
//!   (exact names first, as RFC 4592 has it, but one label only, as the
//!   edge routes and the edge's `*.corp.<domain>` certificate covers; and
//!   unlike RFC 4592, also for a name with only names below it, again as
//!   the edge routes). The suffix itself is never NXDOMAIN.
//!
//! DNS carries no port: users and connectors use the port they know (443,
//! or the one in the app's URL).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use portico_proto::ids::{AppId, EdgeId, RegionId};

use crate::error::Error;
use crate::snapshot::{RegionEdge, Snapshot};

pub(crate) mod server;

/// TTL of an app host's CNAME: how long a resolver may keep sending users
/// to a region.
pub(crate) const APP_TTL: u32 = 60;
/// TTL of an edge or tunnel address: how long a resolver may keep an edge
/// that has just become unhealthy.
pub(crate) const EDGE_TTL: u32 = 30;
/// TTL of the apex's SOA and NS records.
const APEX_TTL: u32 = 300;
/// How long a resolver keeps a "no such name" or "no such record": the
/// SOA's minimum, and the TTL of the SOA sent with it (RFC 2308).
pub(crate) const NEGATIVE_TTL: u32 = 30;
/// The most CNAMEs followed inside the zone for one answer.
const MAX_CHAIN: usize = 8;

/// The zone's fixed part: its apex and the authority's own addresses.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    apex: Name,
    ns: Name,
    ns_addrs: Vec<IpAddr>,
}

impl Origin {
    /// The zone of `apps_domain`, served at `listen` (its address is the
    /// NS's when it is a specific one).
    pub(crate) fn new(apps_domain: &str, listen: Option<SocketAddr>) -> Result<Origin, Error> {
        let bad = |source| Error::DnsDomain {
            domain: apps_domain.to_owned(),
            source,
        };
        let mut apex = Name::from_ascii(apps_domain).map_err(bad)?;
        apex.set_fqdn(true);
        let ns = apex.prepend_label("ns").map_err(bad)?;
        let ns_addrs = listen
            .map(|a| a.ip().to_canonical())
            .filter(|ip| !ip.is_unspecified())
            .into_iter()
            .collect();
        Ok(Origin { apex, ns, ns_addrs })
    }
}

/// Something in the snapshot the zone could not serve as it stands; the
/// server logs each once, when it first appears.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Note {
    /// An edge's reported address names a host: a DNS answer can carry
    /// only addresses, so the edge is left out of it.
    AddressIsAName {
        edge: EdgeId,
        kind: AddrKind,
        addr: String,
    },
    /// An edge reported an unspecified address (0.0.0.0 or ::) and the
    /// address its report came from is not known: left out.
    AddressUnknown {
        edge: EdgeId,
        kind: AddrKind,
        addr: String,
    },
    /// An edge reported an unspecified address: the address its report
    /// came from stands in for it.
    AddressFromReport {
        edge: EdgeId,
        kind: AddrKind,
        addr: String,
        used: IpAddr,
    },
    /// A region id that is not one DNS label (it has a dot, is too long,
    /// or equals another but for case): it has no names, and its apps none.
    RegionNotALabel { region: RegionId },
    /// An app host that is the apex, `ns.<domain>`, or lies under
    /// `edge.<domain>` or `tunnel.<domain>`: the zone keeps those.
    AppHostReserved { app: AppId, host: String },
}

/// Which of an edge's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddrKind {
    /// Where users reach it (`<region>.edge`).
    Public,
    /// Where connectors dial it (`<region>.tunnel`).
    Tunnel,
}

impl fmt::Display for AddrKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrKind::Public => "public",
            AddrKind::Tunnel => "tunnel",
        })
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |kind: &AddrKind| match kind {
            AddrKind::Public => "--advertise-public",
            AddrKind::Tunnel => "--advertise-tunnel",
        };
        match self {
            Note::AddressIsAName { edge, kind, addr } => write!(
                f,
                "edge {edge} reports its {kind} address as {addr:?}, a name: DNS answers carry \
                 addresses only, so it is left out of them; give the edge an IP address with {}",
                flag(kind)
            ),
            Note::AddressUnknown { edge, kind, addr } => write!(
                f,
                "edge {edge} reports its {kind} address as {addr:?} and the address its report \
                 came from is unknown: it is left out of DNS answers; set {}",
                flag(kind)
            ),
            Note::AddressFromReport {
                edge,
                kind,
                addr,
                used,
            } => write!(
                f,
                "edge {edge} reports its {kind} address as {addr:?}: DNS answers carry {used}, \
                 the address its report came from; set {} if that is not where it is reached",
                flag(kind)
            ),
            Note::RegionNotALabel { region } => write!(
                f,
                "region {region} is not a single DNS label (or differs from another only by \
                 case): it has no DNS names, and apps it serves have none"
            ),
            Note::AppHostReserved { app, host } => write!(
                f,
                "app {app}'s host {host} is a name the DNS zone keeps for itself (the apex, ns, \
                 *.edge, *.tunnel): it has no DNS record"
            ),
        }
    }
}

/// The records of the apps domain at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    apex: LowerName,
    /// The SOA sent in AUTHORITY with a negative answer.
    negative_soa: Record,
    /// Every record, by owner name.
    names: BTreeMap<LowerName, Vec<Record>>,
    /// Wildcard apps' CNAMEs (owner `*.<suffix>`), by suffix: the answer
    /// for a name one label under the suffix that `names` lacks.
    wildcards: BTreeMap<LowerName, Record>,
    /// Names that own nothing but have names below them (`edge.<domain>`):
    /// NODATA, not NXDOMAIN (RFC 8020).
    non_terminals: BTreeSet<LowerName>,
    /// What could not be served, for the log.
    pub notes: Vec<Note>,
}

/// How one query is answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer<'z> {
    pub rcode: ResponseCode,
    /// The AA bit: set for every name in the zone.
    pub authoritative: bool,
    /// Borrowed from the zone, or made for the name asked (a wildcard's
    /// CNAME, owned by that name).
    pub answers: Vec<Cow<'z, Record>>,
    pub authorities: Vec<&'z Record>,
}

/// The zone that `snapshot` calls for.
pub(crate) fn zone(snapshot: &Snapshot, origin: &Origin) -> Zone {
    let apex = origin.apex.clone();
    let mut notes = Vec::new();
    let mut names: BTreeMap<LowerName, Vec<Record>> = BTreeMap::new();
    let serial = u32::try_from(snapshot.store.version % (1 << 32)).unwrap_or(0);
    let soa = |ttl| {
        Record::from_rdata(
            apex.clone(),
            ttl,
            RData::SOA(SOA::new(
                origin.ns.clone(),
                apex.prepend_label("hostmaster")
                    .unwrap_or_else(|_| apex.clone()),
                serial,
                300,
                60,
                86400,
                NEGATIVE_TTL,
            )),
        )
    };
    names.insert(
        LowerName::from(&apex),
        vec![
            soa(APEX_TTL),
            Record::from_rdata(apex.clone(), APEX_TTL, RData::NS(NS(origin.ns.clone()))),
        ],
    );
    names.insert(
        LowerName::from(&origin.ns),
        address_records(&origin.ns, APEX_TTL, origin.ns_addrs.iter().copied()),
    );
    let negative_soa = soa(NEGATIVE_TTL);

    // <region>.edge and <region>.tunnel.
    let edge_parent = apex.prepend_label("edge").ok();
    let tunnel_parent = apex.prepend_label("tunnel").ok();
    let mut region_names: HashMap<&RegionId, Name> = HashMap::new();
    // A lower-case id keeps its name against one that differs by case.
    let mut regions: Vec<&RegionId> = snapshot.store.regions.iter().map(|r| &r.id).collect();
    regions.sort_by_key(|r| (r.as_str() != r.as_str().to_ascii_lowercase(), *r));
    for region in regions {
        let label = region.as_str().to_ascii_lowercase();
        let named = |parent: &Option<Name>| {
            parent
                .as_ref()
                .filter(|_| !label.contains('.'))
                .and_then(|p| p.prepend_label(label.as_str()).ok())
        };
        let (Some(edge_name), Some(tunnel_name)) = (named(&edge_parent), named(&tunnel_parent))
        else {
            notes.push(Note::RegionNotALabel {
                region: region.clone(),
            });
            continue;
        };
        if names.contains_key(&LowerName::from(&edge_name)) {
            notes.push(Note::RegionNotALabel {
                region: region.clone(),
            });
            continue;
        }
        let edges: Vec<RegionEdge<'_>> = snapshot.region_edges(region).collect();
        for (name, kind) in [
            (&edge_name, AddrKind::Public),
            (&tunnel_name, AddrKind::Tunnel),
        ] {
            let ips = region_addresses(snapshot, &edges, kind, &mut notes);
            names.insert(
                LowerName::from(name),
                address_records(name, EDGE_TTL, ips.into_iter()),
            );
        }
        region_names.insert(region, edge_name);
    }

    // App hosts.
    let reserved = |name: &Name| {
        *name == apex
            || *name == origin.ns
            || edge_parent.as_ref().is_some_and(|p| p.zone_of(name))
            || tunnel_parent.as_ref().is_some_and(|p| p.zone_of(name))
    };
    let mut wildcards = BTreeMap::new();
    // Each app's external host; then, for an app whose host is in a
    // custom domain, its default host `<id>.<domain>`, which the custom
    // host is a CNAME to (an app's own host wins a clash with another's
    // default).
    let custom_defaults = snapshot.store.apps.iter().filter_map(|app| {
        let host = Name::from_ascii(&app.external_host).ok()?.to_lowercase();
        if apex.zone_of(&host) {
            return None;
        }
        Some((
            app,
            format!("{}.{}", app.id, origin.apex).to_ascii_lowercase(),
        ))
    });
    let hosts: Vec<(&crate::store::AppRecord, String)> = snapshot
        .store
        .apps
        .iter()
        .map(|app| (app, app.external_host.clone()))
        .chain(custom_defaults)
        .collect();
    for (app, host) in hosts {
        let host = Name::from_ascii(&host).map(|mut n| {
            n.set_fqdn(true);
            n
        });
        let Ok(host) = host.map(|n| n.to_lowercase()) else {
            continue; // the API checked it; nothing to serve
        };
        if !apex.zone_of(&host) {
            continue; // a custom domain's host: its default host is served
        }
        if reserved(&host) {
            notes.push(Note::AppHostReserved {
                app: app.id.clone(),
                host: app.external_host.clone(),
            });
            continue;
        }
        let region = snapshot.group_region(&app.connector_group);
        let Some(target) = region_names.get(&region) else {
            continue; // its region is not a label: noted above
        };
        if host.is_wildcard() {
            let suffix = host.base_name();
            if reserved(&suffix) && suffix != apex {
                notes.push(Note::AppHostReserved {
                    app: app.id.clone(),
                    host: app.external_host.clone(),
                });
                continue;
            }
            wildcards
                .entry(LowerName::from(&suffix))
                .or_insert_with(|| {
                    Record::from_rdata(host.clone(), APP_TTL, RData::CNAME(CNAME(target.clone())))
                });
            continue;
        }
        names.entry(LowerName::from(&host)).or_insert_with(|| {
            vec![Record::from_rdata(
                host.clone(),
                APP_TTL,
                RData::CNAME(CNAME(target.clone())),
            )]
        });
    }

    let apex_lower = LowerName::from(&apex);
    let mut non_terminals = BTreeSet::new();
    // A wildcard's suffix exists (as a name without records at least).
    for suffix in wildcards.keys() {
        if *suffix != apex_lower && !names.contains_key(suffix) {
            non_terminals.insert(suffix.clone());
        }
    }
    for name in names.keys().chain(wildcards.keys()) {
        let mut up = name.base_name();
        while up != apex_lower && apex_lower.zone_of(&up) {
            if !names.contains_key(&up) {
                non_terminals.insert(up.clone());
            }
            up = up.base_name();
        }
    }
    Zone {
        apex: apex_lower,
        negative_soa,
        names,
        wildcards,
        non_terminals,
        notes,
    }
}

impl Zone {
    /// The answer to one query (the handler has checked the opcode).
    pub(crate) fn answer(
        &self,
        qname: &LowerName,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Answer<'_> {
        let refused = Answer {
            rcode: ResponseCode::Refused,
            authoritative: false,
            answers: vec![],
            authorities: vec![],
        };
        if !matches!(qclass, DNSClass::IN | DNSClass::ANY) || !self.apex.zone_of(qname) {
            return refused;
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT) {
            // No zone transfers: the zone changes every few seconds, and is
            // nobody's to copy.
            return Answer {
                authoritative: true,
                ..refused
            };
        }
        let mut answers: Vec<Cow<'_, Record>> = Vec::new();
        let mut name = qname.clone();
        for _ in 0..MAX_CHAIN {
            let Some(records) = self.names.get(&name) else {
                // A wildcard app's, as the edge routes it: also for a name
                // that only has names below it (`corp.<domain>` under
                // `*.<domain>`).
                let Some(cname) = self.wildcard(&name) else {
                    let rcode = if self.non_terminals.contains(&name) {
                        ResponseCode::NoError
                    } else {
                        ResponseCode::NXDomain
                    };
                    return self.negative(rcode, answers);
                };
                // A wildcard app's name holds only its CNAME.
                if matches!(qtype, RecordType::CNAME | RecordType::ANY) {
                    answers.push(Cow::Owned(cname));
                    return self.positive(answers);
                }
                let Some(target) = cname_target(&cname) else {
                    return self.negative(ResponseCode::NoError, answers);
                };
                answers.push(Cow::Owned(cname));
                if !self.apex.zone_of(&target) {
                    return self.positive(answers);
                }
                name = target;
                continue;
            };
            let matching: Vec<&Record> = records
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .collect();
            if !matching.is_empty() {
                answers.extend(matching.into_iter().map(Cow::Borrowed));
                return self.positive(answers);
            }
            let Some((cname, target)) =
                records.iter().find_map(|r| cname_target(r).map(|t| (r, t)))
            else {
                return self.negative(ResponseCode::NoError, answers);
            };
            answers.push(Cow::Borrowed(cname));
            if !self.apex.zone_of(&target) {
                return self.positive(answers);
            }
            name = target;
        }
        self.positive(answers)
    }

    /// The CNAME a wildcard app gives `name`, owned by `name`: when `name`
    /// is one LDH label under a wildcard's suffix.
    fn wildcard(&self, name: &LowerName) -> Option<Record> {
        if self.wildcards.is_empty() || name.num_labels() == 0 {
            return None;
        }
        let first = Name::from(name).iter().next()?.to_vec();
        let label = std::str::from_utf8(&first).ok()?;
        if !portico_proto::api::is_ldh_label(label) {
            return None;
        }
        let template = self.wildcards.get(&name.base_name())?;
        let mut record = template.clone();
        record.name = Name::from(name);
        Some(record)
    }

    fn positive<'z>(&'z self, answers: Vec<Cow<'z, Record>>) -> Answer<'z> {
        Answer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers,
            authorities: vec![],
        }
    }

    /// NXDOMAIN, or NOERROR without data (NODATA), with the SOA.
    fn negative<'z>(&'z self, rcode: ResponseCode, answers: Vec<Cow<'z, Record>>) -> Answer<'z> {
        Answer {
            rcode,
            authoritative: true,
            answers,
            authorities: vec![&self.negative_soa],
        }
    }
}

/// Where a CNAME record points.
fn cname_target(r: &Record) -> Option<LowerName> {
    match &r.data {
        RData::CNAME(CNAME(target)) => Some(LowerName::from(target)),
        _ => None,
    }
}

/// The addresses `<region>.edge` (or `.tunnel`) answers with: those of the
/// healthy edges, or of every edge when none is healthy (fail open).
fn region_addresses(
    snapshot: &Snapshot,
    edges: &[RegionEdge<'_>],
    kind: AddrKind,
    notes: &mut Vec<Note>,
) -> BTreeSet<IpAddr> {
    let mut healthy = BTreeSet::new();
    let mut all = BTreeSet::new();
    for e in edges {
        let addr = match kind {
            AddrKind::Public => e.edge.public_addr.as_deref(),
            AddrKind::Tunnel => e.edge.tunnel_addr.as_deref(),
        };
        let Some(addr) = addr else {
            continue; // it has not reported yet
        };
        let from = snapshot.reported_from(&e.edge.id);
        let ip = match edge_ip(addr, from) {
            EdgeIp::Literal(ip) => ip,
            EdgeIp::FromReport(ip) => {
                notes.push(Note::AddressFromReport {
                    edge: e.edge.id.clone(),
                    kind,
                    addr: addr.to_owned(),
                    used: ip,
                });
                ip
            }
            EdgeIp::Unknown => {
                notes.push(Note::AddressUnknown {
                    edge: e.edge.id.clone(),
                    kind,
                    addr: addr.to_owned(),
                });
                continue;
            }
            EdgeIp::Name => {
                notes.push(Note::AddressIsAName {
                    edge: e.edge.id.clone(),
                    kind,
                    addr: addr.to_owned(),
                });
                continue;
            }
        };
        if e.healthy {
            healthy.insert(ip);
        }
        all.insert(ip);
    }
    if healthy.is_empty() {
        all
    } else {
        healthy
    }
}

/// What a reported `host:port` gives DNS.
#[derive(Debug, PartialEq, Eq)]
enum EdgeIp {
    /// An IP literal.
    Literal(IpAddr),
    /// 0.0.0.0 or ::, replaced by the address the report came from.
    FromReport(IpAddr),
    /// 0.0.0.0 or ::, and where the report came from is not known.
    Unknown,
    /// A host name.
    Name,
}

/// The address rule: an IP literal is used as it is (an IPv4-mapped IPv6
/// address as IPv4); an unspecified one is replaced by `from`, the address
/// the edge's report came from; a name gives nothing.
fn edge_ip(addr: &str, from: Option<IpAddr>) -> EdgeIp {
    let ip = addr.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
    });
    match ip.map(|ip| ip.to_canonical()) {
        Ok(ip) if !ip.is_unspecified() => EdgeIp::Literal(ip),
        Ok(_) => match from.map(|f| f.to_canonical()) {
            Some(f) if !f.is_unspecified() => EdgeIp::FromReport(f),
            _ => EdgeIp::Unknown,
        },
        Err(_) => EdgeIp::Name,
    }
}

/// The port of a reported `host:port` whose address the zone holds
/// (an IP literal, or an unspecified one replaced by `from`); `None` for a
/// name, or an address the zone cannot know.
pub(crate) fn zone_port(addr: &str, from: Option<IpAddr>) -> Option<u16> {
    match edge_ip(addr, from) {
        EdgeIp::Literal(_) | EdgeIp::FromReport(_) => {
            addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
        }
        EdgeIp::Unknown | EdgeIp::Name => None,
    }
}

fn address_records(name: &Name, ttl: u32, ips: impl Iterator<Item = IpAddr>) -> Vec<Record> {
    ips.map(|ip| {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Record::from_rdata(name.clone(), ttl, data)
    })
    .collect()
}

#[cfg(test)]
mod tests;
