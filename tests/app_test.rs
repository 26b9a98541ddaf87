//! `portico app test`: the real `portico` binary asks a deployment on
//! loopback (router with its DNS authority, an edge, a connector, the demo
//! backend; `tests/common`) for its report, as text and as JSON, on a
//! healthy app, on wrong internal URLs (a port nothing listens on, a host
//! that does not exist) and on a group with no connector.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{admin_cli_result, eventually, Stack};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;
use portico_proto::api::{AppTestReport, CheckKind, CheckStatus, Connector, Status, TestCheck};
use portico_proto::GroupId;

/// Runs `portico app test <args>`: its exit status, the report (with
/// `--json`) or the text, and stderr.
async fn app_test(s: &Stack, args: &[&str]) -> (bool, String, String) {
    let dir: PathBuf = s.d.data.join("router");
    let mut full = vec!["app", "test"];
    full.extend_from_slice(args);
    admin_cli_result(&s.d.router.url(), &dir, &full).await
}

async fn report(s: &Stack, args: &[&str]) -> (bool, AppTestReport) {
    let mut full = args.to_vec();
    full.push("--json");
    let (ok, stdout, stderr) = app_test(s, &full).await;
    let report: AppTestReport = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a report ({e}): {stdout}{stderr}"));
    // The exit status says what the report says.
    assert_eq!(ok, report.passed(), "{stdout}{stderr}");
    if !ok {
        assert!(stderr.contains("checks failed"), "{stderr}");
    }
    (ok, report)
}

fn kinds(r: &AppTestReport) -> Vec<CheckKind> {
    r.checks.iter().map(|c| c.check).collect()
}

fn the(r: &AppTestReport, kind: CheckKind) -> &TestCheck {
    r.checks
        .iter()
        .find(|c| c.check == kind)
        .unwrap_or_else(|| panic!("no {kind} check in {r:#?}"))
}

fn step<'a>(c: &'a TestCheck, name: &str) -> &'a portico_proto::api::ProbeStep {
    c.steps
        .iter()
        .find(|s| s.step == name)
        .unwrap_or_else(|| panic!("no {name} step in {c:#?}"))
}

/// Whether the probe got past the connector's config (a new app reaches
/// the connector's config a moment after it is published).
fn probed(r: &AppTestReport) -> bool {
    r.checks
        .iter()
        .any(|c| c.check == CheckKind::Probe && c.steps.iter().any(|s| s.step == "dns"))
}

/// Waits until the router's presence shows the deployment's connector
/// active (the edge reports its tunnels at once, but asynchronously).
async fn connector_active(s: &Stack) {
    eventually(
        "the connector to be active",
        Duration::from_secs(20),
        || async {
            let list: Vec<Connector> = s.d.admin.get_json("/v1/connectors").await.ok()?;
            list.iter()
                .any(|c| c.id == s.d.connector.id && c.status == Status::Active)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_test_reports_a_healthy_app_wrong_internal_urls_and_a_group_without_connectors() {
    let s = Stack::start().await;
    connector_active(&s).await;
    let dns =
        s.d.router
            .dns_addr
            .expect("the dev router serves DNS")
            .to_string();

    // A healthy app: every check passes, and the resolver pointed at the
    // router's DNS sees the same chain.
    let (ok, r) = report(&s, &["hello", "--nameserver", &dns]).await;
    assert!(ok, "{r:#?}");
    assert_eq!(
        kinds(&r),
        [
            CheckKind::Dns,
            CheckKind::Resolver,
            CheckKind::Certificate,
            CheckKind::Connectors,
            CheckKind::Probe
        ]
    );
    let host = "hello.apps.localhost";
    // A resolver answers names under localhost itself (RFC 6761): the
    // resolver's view is checked against a zone of its own below.
    let resolver = the(&r, CheckKind::Resolver);
    assert_eq!(resolver.status, CheckStatus::Skip, "{resolver:#?}");
    assert!(
        r.checks
            .iter()
            .filter(|c| c.check != CheckKind::Resolver)
            .all(|c| c.status == CheckStatus::Ok),
        "{r:#?}"
    );
    let dns_check = the(&r, CheckKind::Dns);
    assert_eq!(dns_check.addresses, ["127.0.0.1"]);
    assert_eq!(
        dns_check.details[0],
        format!("{host}. CNAME default.edge.apps.localhost. (ttl 60)")
    );
    let cert = the(&r, CheckKind::Certificate);
    assert_eq!(
        cert.details[1], "names: *.apps.localhost, apps.localhost",
        "{cert:#?}"
    );
    let hours: u64 = cert
        .summary
        .strip_prefix(&format!("covers {host}, "))
        .and_then(|rest| rest.strip_suffix(" h left"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", cert.summary));
    // The router's edge certificates live 24 h by default.
    assert!((1..=24).contains(&hours), "{}", cert.summary);
    let probe = the(&r, CheckKind::Probe);
    assert_eq!(probe.connector.as_ref(), Some(&s.d.connector.id));
    assert_eq!(
        probe
            .steps
            .iter()
            .map(|s| (s.step.as_str(), s.status))
            .collect::<Vec<_>>(),
        [
            ("dns", CheckStatus::Ok),
            ("tcp", CheckStatus::Ok),
            ("http", CheckStatus::Ok)
        ]
    );
    assert_eq!(step(probe, "http").detail, "http: 200 OK for GET /");
    assert_eq!(
        step(probe, "tcp").detail,
        format!("tcp: connected to {}", s.d.demo.addr)
    );

    // The same as text, exit status 0.
    let (ok, text, stderr) = app_test(&s, &["hello"]).await;
    assert!(ok, "{text}{stderr}");
    assert!(
        text.lines().any(|l| l.starts_with("ok    certificate")),
        "{text}"
    );
    assert_eq!(text.lines().last(), Some("all 4 checks passed"), "{text}");

    // A port nothing listens on: tcp refused, named, with its hint.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    portico::dev::publish(
        &s.d.admin,
        "refused",
        &format!("http://{closed}/"),
        GroupId::default_group(),
    )
    .await
    .unwrap();
    // The connector gets the new app's config within moments; until then
    // its probe says it serves no such app.
    let r = eventually(
        "the connector to probe the new app",
        Duration::from_secs(10),
        || async {
            let (_, r) = report(&s, &["refused"]).await;
            probed(&r).then_some(r)
        },
    )
    .await;
    let probe = the(&r, CheckKind::Probe);
    assert_eq!(probe.status, CheckStatus::Fail);
    assert_eq!(probe.summary, format!("tcp: connection refused {closed}"));
    assert_eq!(step(probe, "tcp").status, CheckStatus::Fail);
    assert_eq!(step(probe, "http").status, CheckStatus::Skip);
    assert!(
        probe
            .hint
            .as_deref()
            .unwrap()
            .starts_with("nothing accepts connections"),
        "{probe:#?}"
    );
    // Everything in front of the connector is still fine.
    for kind in [
        CheckKind::Dns,
        CheckKind::Certificate,
        CheckKind::Connectors,
    ] {
        assert_eq!(the(&r, kind).status, CheckStatus::Ok, "{r:#?}");
    }
    let (ok, text, _) = app_test(&s, &["refused"]).await;
    assert!(!ok);
    assert!(
        text.lines().any(|l| l.starts_with("FAIL  probe ")
            && l.ends_with(&format!("tcp: connection refused {closed}"))),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("hint: nothing accepts")),
        "{text}"
    );
    assert_eq!(text.lines().last(), Some("1 of 4 checks failed"), "{text}");

    // A host that does not exist (.invalid never resolves, RFC 6761).
    portico::dev::publish(
        &s.d.admin,
        "nohost",
        "http://backend.invalid:8080/",
        GroupId::default_group(),
    )
    .await
    .unwrap();
    let r = eventually(
        "the connector to probe the new app",
        Duration::from_secs(10),
        || async {
            let (_, r) = report(&s, &["nohost"]).await;
            probed(&r).then_some(r)
        },
    )
    .await;
    let probe = the(&r, CheckKind::Probe);
    assert_eq!(probe.status, CheckStatus::Fail);
    assert!(
        probe
            .summary
            .starts_with("dns: no such host backend.invalid"),
        "{probe:#?}"
    );
    assert_eq!(
        probe
            .steps
            .iter()
            .map(|s| (s.step.as_str(), s.status))
            .collect::<Vec<_>>(),
        [
            ("dns", CheckStatus::Fail),
            ("tcp", CheckStatus::Skip),
            ("http", CheckStatus::Skip)
        ]
    );
    assert!(
        probe.hint.as_deref().unwrap().contains("does not resolve"),
        "{probe:#?}"
    );

    // A group with no connector: named, with the hint, and nothing probed.
    s.publish_demo_in_new_group("lonely", "empty").await;
    let (ok, r) = report(&s, &["lonely"]).await;
    assert!(!ok);
    let connectors = the(&r, CheckKind::Connectors);
    assert_eq!(connectors.status, CheckStatus::Fail);
    assert_eq!(connectors.summary, "no active connector in group empty");
    assert!(
        connectors
            .hint
            .as_deref()
            .unwrap()
            .starts_with("install and start a connector of group empty"),
        "{connectors:#?}"
    );
    let probe = the(&r, CheckKind::Probe);
    assert_eq!(probe.status, CheckStatus::Skip);
    assert!(probe.connector.is_none());
    // Only that failed: DNS and the certificate are the region's.
    assert_eq!(
        r.checks
            .iter()
            .filter(|c| c.status == CheckStatus::Fail)
            .count(),
        1,
        "{r:#?}"
    );

    // An app that does not exist is an error, not a report.
    let (ok, _, stderr) = app_test(&s, &["nothing-here"]).await;
    assert!(!ok);
    assert!(stderr.contains("not found"), "{stderr}");

    s.stop().await;
}

type Zone = InMemoryZoneHandler<hickory_server::net::runtime::TokioRuntimeProvider>;

fn n(s: &str) -> Name {
    Name::from_ascii(format!("{s}.corp.test.")).unwrap()
}

/// `corp.test.`: `hr` → `hop` → `default.edge` → 127.0.0.1, served by
/// hickory-server on UDP at 127.0.0.1 (a nameserver that is not Portico's).
async fn corp_zone() -> (Server<Catalog>, std::net::SocketAddr) {
    let origin = Name::from_ascii("corp.test.").unwrap();
    let mut zone = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = Record::from_rdata(
        origin.clone(),
        3600,
        RData::SOA(SOA::new(
            origin.prepend_label("ns").unwrap(),
            origin.prepend_label("admin").unwrap(),
            1,
            60,
            60,
            600,
            5,
        )),
    );
    let records = [
        soa,
        Record::from_rdata(n("hr"), 300, RData::CNAME(CNAME(n("hop")))),
        Record::from_rdata(n("hop"), 120, RData::CNAME(CNAME(n("default.edge")))),
        Record::from_rdata(
            n("default.edge"),
            30,
            RData::A(A("127.0.0.1".parse().unwrap())),
        ),
    ];
    for r in records {
        assert!(zone.upsert_mut(r, 1));
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![std::sync::Arc::new(zone)]);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    (server, addr)
}

fn authority(addresses: &[&str]) -> TestCheck {
    TestCheck {
        check: CheckKind::Dns,
        status: CheckStatus::Ok,
        summary: String::new(),
        hint: None,
        connector: None,
        details: vec![],
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        steps: vec![],
    }
}

#[tokio::test]
async fn the_resolver_check_shows_the_chain_a_nameserver_gives_and_names_a_mismatch() {
    common::init_tracing();
    let (mut server, ns) = corp_zone().await;

    let c = portico::app_test::resolver_check(ns, "hr.corp.test", Some(&authority(&["127.0.0.1"])))
        .await;
    assert_eq!(c.status, CheckStatus::Ok, "{c:#?}");
    assert_eq!(
        c.details[1],
        "chain: hr.corp.test -> hop.corp.test -> default.edge.corp.test"
    );
    assert_eq!(c.addresses, ["127.0.0.1"]);

    // The router would answer another address: the resolver's view is
    // stale or points elsewhere.
    let c = portico::app_test::resolver_check(ns, "hr.corp.test", Some(&authority(&["127.0.0.9"])))
        .await;
    assert_eq!(c.status, CheckStatus::Fail, "{c:#?}");
    assert_eq!(
        c.summary,
        format!("{ns} answers 127.0.0.1 for hr.corp.test, the router's DNS 127.0.0.9")
    );
    assert!(c.hint.is_some());

    // A name the nameserver does not know.
    let c = portico::app_test::resolver_check(ns, "gone.corp.test", None).await;
    assert_eq!(c.status, CheckStatus::Fail, "{c:#?}");
    assert!(c.summary.contains("NXDOMAIN"), "{c:#?}");
    assert!(
        c.hint
            .as_deref()
            .unwrap()
            .contains("does not know gone.corp.test"),
        "{c:#?}"
    );
    server.shutdown_gracefully().await.unwrap();
}
