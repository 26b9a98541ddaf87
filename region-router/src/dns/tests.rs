//! The zone as a function of snapshots: no sockets, no clock.

use std::time::Duration;

use super::*;
use crate::presence::REPORT_FRESH;
use crate::snapshot::tests::Builder;

const FRESH: Duration = Duration::from_secs(1);
const STALE: Duration = Duration::from_secs(REPORT_FRESH.as_secs() + 1);

fn origin() -> Origin {
    Origin::new("apps.test", Some("127.0.0.53:53".parse().unwrap())).unwrap()
}

fn name(s: &str) -> LowerName {
    LowerName::from(Name::from_ascii(s).unwrap())
}

/// A query's answer as `(rcode, aa, answers, authorities)`, records as
/// `name ttl TYPE data` lines.
fn ask(
    zone: &Zone,
    qname: &str,
    qtype: RecordType,
) -> (ResponseCode, bool, Vec<String>, Vec<String>) {
    let a = zone.answer(&name(qname), qtype, DNSClass::IN);
    let show = |rs: &mut dyn Iterator<Item = &Record>| {
        rs.map(|r| format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data))
            .collect::<Vec<_>>()
    };
    (
        a.rcode,
        a.authoritative,
        show(&mut a.answers.iter().map(|r| r.as_ref())),
        show(&mut a.authorities.iter().copied()),
    )
}

/// Two eu-west edges and one in default; the Default group's connector
/// sits on the eu-west edges; app `hr` in group Default.
fn two_regions() -> Builder {
    let mut b = Builder::new();
    b.region("eu-west")
        .edge(
            "e-eu-1",
            "eu-west",
            Some("192.0.2.1:443"),
            Some("192.0.2.1:7844"),
        )
        .edge(
            "e-eu-2",
            "eu-west",
            Some("192.0.2.2:443"),
            Some("198.51.100.2:7844"),
        )
        .edge(
            "e-d",
            "default",
            Some("203.0.113.9:443"),
            Some("203.0.113.9:7844"),
        )
        .connector("c-1", "Default")
        .app("hr.apps.test", "Default")
        .report("e-eu-1", None, &[("c-1", 2)], FRESH)
        .report("e-eu-2", None, &[("c-1", 2)], FRESH)
        .report("e-d", None, &[], FRESH);
    b
}

#[test]
fn an_app_host_is_a_cname_to_its_region_whose_edges_follow_in_the_answer() {
    let zone = super::zone(&two_regions().snapshot(), &origin());
    let (rcode, aa, answers, authorities) = ask(&zone, "hr.apps.test.", RecordType::A);
    assert_eq!((rcode, aa), (ResponseCode::NoError, true));
    assert_eq!(
        answers,
        [
            "hr.apps.test. 60 CNAME eu-west.edge.apps.test.",
            "eu-west.edge.apps.test. 30 A 192.0.2.1",
            "eu-west.edge.apps.test. 30 A 192.0.2.2",
        ]
    );
    assert!(authorities.is_empty());
    // Case does not matter; the tunnel name carries tunnel addresses.
    let (_, _, answers, _) = ask(&zone, "HR.Apps.TEST.", RecordType::A);
    assert_eq!(answers.len(), 3);
    let (_, _, answers, _) = ask(&zone, "eu-west.tunnel.apps.test.", RecordType::A);
    assert_eq!(
        answers,
        [
            "eu-west.tunnel.apps.test. 30 A 192.0.2.1",
            "eu-west.tunnel.apps.test. 30 A 198.51.100.2",
        ]
    );
    let (_, _, answers, _) = ask(&zone, "default.edge.apps.test.", RecordType::A);
    assert_eq!(answers, ["default.edge.apps.test. 30 A 203.0.113.9"]);
    // Asking for the CNAME itself gives only it.
    let (_, _, answers, _) = ask(&zone, "hr.apps.test.", RecordType::CNAME);
    assert_eq!(answers, ["hr.apps.test. 60 CNAME eu-west.edge.apps.test."]);
    assert!(zone.notes.is_empty(), "{:?}", zone.notes);
}

#[test]
fn an_unhealthy_edge_leaves_the_answers_and_a_region_without_healthy_edges_fails_open() {
    let mut b = two_regions();
    b.report("e-eu-1", None, &[("c-1", 2)], STALE);
    let zone = super::zone(&b.snapshot(), &origin());
    let (_, _, answers, _) = ask(&zone, "hr.apps.test.", RecordType::A);
    assert_eq!(
        answers,
        [
            "hr.apps.test. 60 CNAME eu-west.edge.apps.test.",
            "eu-west.edge.apps.test. 30 A 192.0.2.2",
        ]
    );
    let (_, _, answers, _) = ask(&zone, "eu-west.tunnel.apps.test.", RecordType::A);
    assert_eq!(answers, ["eu-west.tunnel.apps.test. 30 A 198.51.100.2"]);

    // Both stale: eu-west answers with both (fail open). The app moves to
    // default: its tunnels there are on stale reports, which count for
    // nothing, and default has an edge.
    b.report("e-eu-2", None, &[("c-1", 2)], STALE);
    let zone = super::zone(&b.snapshot(), &origin());
    let (_, _, answers, _) = ask(&zone, "eu-west.edge.apps.test.", RecordType::A);
    assert_eq!(
        answers,
        [
            "eu-west.edge.apps.test. 30 A 192.0.2.1",
            "eu-west.edge.apps.test. 30 A 192.0.2.2",
        ]
    );
    let (_, _, answers, _) = ask(&zone, "hr.apps.test.", RecordType::A);
    assert_eq!(
        answers,
        [
            "hr.apps.test. 60 CNAME default.edge.apps.test.",
            "default.edge.apps.test. 30 A 203.0.113.9",
        ]
    );
}

#[test]
fn a_draining_edge_leaves_the_answers_at_once() {
    let mut b = two_regions();
    b.draining("e-eu-1");
    let zone = super::zone(&b.snapshot(), &origin());
    let (_, _, answers, _) = ask(&zone, "eu-west.edge.apps.test.", RecordType::A);
    assert_eq!(answers, ["eu-west.edge.apps.test. 30 A 192.0.2.2"]);
    let (_, _, answers, _) = ask(&zone, "eu-west.tunnel.apps.test.", RecordType::A);
    assert_eq!(answers, ["eu-west.tunnel.apps.test. 30 A 198.51.100.2"]);
}

#[test]
fn a_router_that_has_heard_no_report_yet_answers_with_every_edge() {
    let mut b = two_regions();
    b.store.presence.clear();
    for e in &mut b.store.edges {
        e.last_seen = None;
    }
    let zone = super::zone(&b.snapshot(), &origin());
    let (_, _, answers, _) = ask(&zone, "eu-west.edge.apps.test.", RecordType::A);
    assert_eq!(answers.len(), 2, "{answers:?}");
}

/// The zone is judged from the store alone: a router that has just
/// started (a restart, or a second replica of the store) answers with the
/// edges the store last saw, however old, for its first window, then drops
/// the stale ones.
#[test]
fn a_router_just_started_answers_from_what_the_store_last_saw() {
    let mut b = two_regions();
    b.report("e-eu-1", None, &[("c-1", 2)], Duration::from_secs(3600));
    let mut snapshot = b.snapshot();
    snapshot.at.started = snapshot.at.now - 5;
    let zone = super::zone(&snapshot, &origin());
    let (_, _, answers, _) = ask(&zone, "eu-west.edge.apps.test.", RecordType::A);
    assert_eq!(answers.len(), 2, "{answers:?}");
    snapshot.at.started = snapshot.at.now - 3600;
    let zone = super::zone(&snapshot, &origin());
    let (_, _, answers, _) = ask(&zone, "eu-west.edge.apps.test.", RecordType::A);
    assert_eq!(answers, ["eu-west.edge.apps.test. 30 A 192.0.2.2"]);
}

#[test]
fn addresses_ipv6_mapped_unspecified_and_names() {
    let mut b = Builder::new();
    b.edge(
        "e-v6",
        "default",
        Some("[2001:db8::7]:443"),
        Some("[::ffff:192.0.2.7]:7844"),
    )
    .edge("e-any", "default", Some("0.0.0.0:443"), Some("[::]:7844"))
    .edge("e-silent", "default", Some("0.0.0.0:443"), None)
    .edge("e-name", "default", Some("edge1.example.com:443"), None)
    .report("e-v6", None, &[], FRESH)
    .report("e-any", Some("::ffff:192.0.2.8"), &[], FRESH)
    .report("e-name", None, &[], FRESH);
    let zone = super::zone(&b.snapshot(), &origin());
    let (_, _, a, _) = ask(&zone, "default.edge.apps.test.", RecordType::A);
    assert_eq!(
        a,
        ["default.edge.apps.test. 30 A 192.0.2.8"],
        "0.0.0.0: where the report came from"
    );
    let (_, _, aaaa, _) = ask(&zone, "default.edge.apps.test.", RecordType::AAAA);
    assert_eq!(aaaa, ["default.edge.apps.test. 30 AAAA 2001:db8::7"]);
    let (_, _, any, _) = ask(&zone, "default.edge.apps.test.", RecordType::ANY);
    assert_eq!(any.len(), 2);
    let (_, _, tunnel, _) = ask(&zone, "default.tunnel.apps.test.", RecordType::A);
    assert_eq!(
        tunnel,
        [
            "default.tunnel.apps.test. 30 A 192.0.2.7",
            "default.tunnel.apps.test. 30 A 192.0.2.8",
        ],
        "a mapped address is IPv4; [::] is the report's address"
    );
    let e = |id: &str| EdgeId::new(id).unwrap();
    assert_eq!(
        zone.notes,
        [
            Note::AddressFromReport {
                edge: e("e-any"),
                kind: AddrKind::Public,
                addr: "0.0.0.0:443".into(),
                used: "192.0.2.8".parse().unwrap(),
            },
            Note::AddressIsAName {
                edge: e("e-name"),
                kind: AddrKind::Public,
                addr: "edge1.example.com:443".into(),
            },
            Note::AddressUnknown {
                edge: e("e-silent"),
                kind: AddrKind::Public,
                addr: "0.0.0.0:443".into(),
            },
            Note::AddressFromReport {
                edge: e("e-any"),
                kind: AddrKind::Tunnel,
                addr: "[::]:7844".into(),
                used: "192.0.2.8".parse().unwrap(),
            },
        ]
    );
    assert!(zone.notes[1].to_string().contains("--advertise-public"));
    assert!(zone.notes[3].to_string().contains("--advertise-tunnel"));
}

#[test]
fn edge_ip_rule() {
    let from = Some("192.0.2.1".parse().unwrap());
    assert_eq!(
        edge_ip("127.0.0.2:80", from),
        EdgeIp::Literal("127.0.0.2".parse().unwrap())
    );
    assert_eq!(
        edge_ip("[::1]:80", None),
        EdgeIp::Literal("::1".parse().unwrap())
    );
    assert_eq!(
        edge_ip("::1:80", None),
        EdgeIp::Literal("::1".parse().unwrap())
    );
    assert_eq!(
        edge_ip("0.0.0.0:80", from),
        EdgeIp::FromReport("192.0.2.1".parse().unwrap())
    );
    assert_eq!(
        edge_ip("0.0.0.0:80", Some("0.0.0.0".parse().unwrap())),
        EdgeIp::Unknown
    );
    assert_eq!(edge_ip("[::]:80", None), EdgeIp::Unknown);
    assert_eq!(edge_ip("edge.example:80", from), EdgeIp::Name);
    assert_eq!(edge_ip("garbage", from), EdgeIp::Name);
}

#[test]
fn negative_answers_carry_the_soa_and_names_outside_are_refused() {
    let zone = super::zone(&two_regions().snapshot(), &origin());
    let soa = "apps.test. 30 SOA ns.apps.test. hostmaster.apps.test. 0 300 60 86400 30";
    // No such name.
    let (rcode, aa, answers, authorities) = ask(&zone, "nope.apps.test.", RecordType::A);
    assert_eq!((rcode, aa), (ResponseCode::NXDomain, true));
    assert!(answers.is_empty());
    assert_eq!(authorities, [soa]);
    let (rcode, _, _, _) = ask(&zone, "x.eu-west.edge.apps.test.", RecordType::A);
    assert_eq!(rcode, ResponseCode::NXDomain);
    // A name with other types only: NODATA.
    let (rcode, aa, answers, authorities) = ask(&zone, "eu-west.edge.apps.test.", RecordType::TXT);
    assert_eq!((rcode, aa), (ResponseCode::NoError, true));
    assert!(answers.is_empty());
    assert_eq!(authorities, [soa]);
    // No AAAA at the end of the chain: the CNAME, then NODATA.
    let (rcode, _, answers, authorities) = ask(&zone, "hr.apps.test.", RecordType::AAAA);
    assert_eq!(rcode, ResponseCode::NoError);
    assert_eq!(answers, ["hr.apps.test. 60 CNAME eu-west.edge.apps.test."]);
    assert_eq!(authorities, [soa]);
    // `edge.apps.test` owns nothing but has names below it.
    for ent in ["edge.apps.test.", "tunnel.apps.test."] {
        let (rcode, _, answers, authorities) = ask(&zone, ent, RecordType::A);
        assert_eq!(
            (rcode, answers.len(), authorities.len()),
            (ResponseCode::NoError, 0, 1),
            "{ent}"
        );
    }
    // Outside the zone, another class, a zone transfer: refused.
    for (q, class, qtype) in [
        ("example.com.", DNSClass::IN, RecordType::A),
        ("test.", DNSClass::IN, RecordType::SOA),
        ("hr.apps.test.", DNSClass::CH, RecordType::A),
        ("apps.test.", DNSClass::IN, RecordType::AXFR),
        ("apps.test.", DNSClass::IN, RecordType::IXFR),
    ] {
        let a = zone.answer(&name(q), qtype, class);
        assert_eq!(a.rcode, ResponseCode::Refused, "{q} {class} {qtype}");
        assert!(a.answers.is_empty() && a.authorities.is_empty());
    }
}

#[test]
fn the_apex_has_an_soa_and_an_ns_with_the_authority_s_address() {
    let mut b = two_regions();
    b.store.version = 42;
    let zone = super::zone(&b.snapshot(), &origin());
    let (rcode, aa, answers, _) = ask(&zone, "apps.test.", RecordType::SOA);
    assert_eq!((rcode, aa), (ResponseCode::NoError, true));
    assert_eq!(
        answers,
        ["apps.test. 300 SOA ns.apps.test. hostmaster.apps.test. 42 300 60 86400 30"],
        "the serial is the config version"
    );
    let (_, _, answers, _) = ask(&zone, "apps.test.", RecordType::NS);
    assert_eq!(answers, ["apps.test. 300 NS ns.apps.test."]);
    let (_, _, answers, _) = ask(&zone, "ns.apps.test.", RecordType::A);
    assert_eq!(answers, ["ns.apps.test. 300 A 127.0.0.53"]);
    // Listening on every address: ns has no address of its own.
    let wildcard = Origin::new("apps.test", Some("0.0.0.0:53".parse().unwrap())).unwrap();
    let zone = super::zone(&b.snapshot(), &wildcard);
    let (rcode, _, answers, _) = ask(&zone, "ns.apps.test.", RecordType::A);
    assert_eq!((rcode, answers.len()), (ResponseCode::NoError, 0));
}

#[test]
fn a_pinned_region_without_edges_is_a_name_without_addresses() {
    let mut b = two_regions();
    b.region("us-east")
        .group("us", "us-east")
        .app("crm.apps.test", "us");
    let zone = super::zone(&b.snapshot(), &origin());
    let (rcode, _, answers, authorities) = ask(&zone, "crm.apps.test.", RecordType::A);
    assert_eq!(rcode, ResponseCode::NoError);
    assert_eq!(answers, ["crm.apps.test. 60 CNAME us-east.edge.apps.test."]);
    assert_eq!(authorities.len(), 1);
}

#[test]
fn reserved_hosts_and_regions_that_are_not_labels_are_noted_not_served() {
    let mut b = two_regions();
    b.region("eu.north")
        .region("EU-West")
        .app("ns.apps.test", "Default")
        .app("x.edge.apps.test", "Default");
    let zone = super::zone(&b.snapshot(), &origin());
    let regions: Vec<&Note> = zone
        .notes
        .iter()
        .filter(|n| matches!(n, Note::RegionNotALabel { .. }))
        .collect();
    assert_eq!(regions.len(), 2, "{:?}", zone.notes);
    let reserved: Vec<String> = zone
        .notes
        .iter()
        .filter_map(|n| match n {
            Note::AppHostReserved { host, .. } => Some(host.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reserved, ["ns.apps.test", "x.edge.apps.test"]);
    let (rcode, _, _, _) = ask(&zone, "x.edge.apps.test.", RecordType::A);
    assert_eq!(rcode, ResponseCode::NXDomain);
    // The lower-case id keeps the name; the other is the one noted.
    assert!(regions.contains(&&Note::RegionNotALabel {
        region: "EU-West".parse().unwrap()
    }));
    let (_, _, answers, _) = ask(&zone, "hr.apps.test.", RecordType::A);
    assert_eq!(answers.len(), 3, "{answers:?}");
}

/// An app whose host is in a custom domain gets no record for that host
/// (the domain is not this zone's), but its default host `<id>.<domain>`,
/// which the custom host is a CNAME to, is answered like any app host.
#[test]
fn an_app_in_a_custom_domain_has_its_default_host_answered() {
    let mut b = two_regions();
    b.app("pay.corp.example.com", "Default");
    let zone = super::zone(&b.snapshot(), &origin());
    let (rcode, _, answers, _) = ask(&zone, "pay.apps.test.", RecordType::A);
    assert_eq!(rcode, ResponseCode::NoError);
    assert_eq!(
        answers,
        [
            "pay.apps.test. 60 CNAME eu-west.edge.apps.test.",
            "eu-west.edge.apps.test. 30 A 192.0.2.1",
            "eu-west.edge.apps.test. 30 A 192.0.2.2",
        ]
    );
    let (rcode, ..) = ask(&zone, "pay.corp.example.com.", RecordType::A);
    assert_eq!(rcode, ResponseCode::Refused, "outside the zone");
}

/// Wildcard apps: a name one LDH label under a wildcard's suffix gets its
/// CNAME, owned by the name asked; an exact app host wins; deeper names,
/// and labels that are not LDH, get nothing; the suffix is never NXDOMAIN.
#[test]
fn wildcard_apps_answer_for_one_label_under_them_and_exact_hosts_win() {
    let mut b = two_regions();
    b.group("Home", "default")
        .app("*.corp.apps.test", "Default")
        .app("payroll.corp.apps.test", "Home")
        .app("*.eu.corp.apps.test", "Home");
    let zone = super::zone(&b.snapshot(), &origin());
    assert!(zone.notes.is_empty(), "{:?}", zone.notes);
    let (rcode, aa, answers, _) = ask(&zone, "X-1.Corp.apps.test.", RecordType::A);
    assert_eq!((rcode, aa), (ResponseCode::NoError, true));
    assert_eq!(
        answers,
        [
            "x-1.corp.apps.test. 60 CNAME eu-west.edge.apps.test.",
            "eu-west.edge.apps.test. 30 A 192.0.2.1",
            "eu-west.edge.apps.test. 30 A 192.0.2.2",
        ]
    );
    let (_, _, answers, _) = ask(&zone, "hr.corp.apps.test.", RecordType::CNAME);
    assert_eq!(
        answers,
        ["hr.corp.apps.test. 60 CNAME eu-west.edge.apps.test."]
    );
    // The exact host, in its own group's region.
    let (_, _, answers, _) = ask(&zone, "payroll.corp.apps.test.", RecordType::A);
    assert_eq!(
        answers,
        [
            "payroll.corp.apps.test. 60 CNAME default.edge.apps.test.",
            "default.edge.apps.test. 30 A 203.0.113.9",
        ]
    );
    // The more specific wildcard for names under eu.corp; eu.corp itself
    // is one label under corp.
    let (_, _, answers, _) = ask(&zone, "paris.eu.corp.apps.test.", RecordType::A);
    assert_eq!(
        answers[0],
        "paris.eu.corp.apps.test. 60 CNAME default.edge.apps.test."
    );
    let (_, _, answers, _) = ask(&zone, "eu.corp.apps.test.", RecordType::A);
    assert_eq!(
        answers[0],
        "eu.corp.apps.test. 60 CNAME eu-west.edge.apps.test."
    );
    // Two labels under a wildcard, or a label that is no LDH label.
    for name in ["a.b.corp.apps.test.", "a_b.corp.apps.test."] {
        let (rcode, _, answers, authorities) = ask(&zone, name, RecordType::A);
        assert_eq!(rcode, ResponseCode::NXDomain, "{name}");
        assert!(answers.is_empty() && authorities.len() == 1, "{name}");
    }
    // The suffix has names below it: NODATA, not NXDOMAIN.
    let (rcode, _, answers, _) = ask(&zone, "corp.apps.test.", RecordType::A);
    assert_eq!(rcode, ResponseCode::NoError);
    assert!(answers.is_empty());
    // The literal `*` name is the wildcard's own.
    let (rcode, _, _, _) = ask(&zone, "*.corp.apps.test.", RecordType::A);
    assert_eq!(rcode, ResponseCode::NXDomain);
}

/// A wildcard under a name the zone keeps (`*.edge.<domain>`) gets no
/// records, and says so; `*.<domain>` is allowed and takes what is left.
#[test]
fn wildcards_keep_off_the_zones_own_names() {
    let mut b = two_regions();
    b.app("*.edge.apps.test", "Default")
        .app("*.apps.test", "Default");
    let zone = super::zone(&b.snapshot(), &origin());
    assert_eq!(zone.notes.len(), 1, "{:?}", zone.notes);
    assert!(
        matches!(&zone.notes[0], Note::AppHostReserved { host, .. } if host == "*.edge.apps.test")
    );
    let (_, _, answers, _) = ask(&zone, "eu-west.edge.apps.test.", RecordType::A);
    assert_eq!(answers.len(), 2, "{answers:?}");
    let (_, _, answers, _) = ask(&zone, "x.edge.apps.test.", RecordType::A);
    assert!(answers.is_empty());
    let (_, _, answers, _) = ask(&zone, "hr.apps.test.", RecordType::CNAME);
    assert_eq!(
        answers,
        ["hr.apps.test. 60 CNAME eu-west.edge.apps.test."],
        "the exact app"
    );
    let (_, _, answers, _) = ask(&zone, "wiki.apps.test.", RecordType::CNAME);
    assert_eq!(
        answers,
        ["wiki.apps.test. 60 CNAME eu-west.edge.apps.test."]
    );
    let (_, _, answers, _) = ask(&zone, "ns.apps.test.", RecordType::A);
    assert!(
        answers.iter().all(|a| a.starts_with("ns.apps.test. 300 A")),
        "{answers:?}"
    );
}
