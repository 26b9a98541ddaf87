//! The connector's CNAME-chain-aware resolution through real processes: a
//! test zone served in this process by hickory-server (UDP on 127.0.0.1)
//! gives a 3-hop chain `api -> hop1 -> hop2 -> edge` to an edge's tunnel
//! address and a loop `loop1 -> loop2 -> loop1` to another edge's; a
//! `portico connector --nameserver` follows the first and attaches, logs
//! the loop with its chain, saves the answer; with the nameserver stopped,
//! and the router killed too, the connector restarted on its state
//! directory starts from the saved answer (and its saved config), with a
//! warning, and attaches again.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{admin_cli, curl_plain, eventually, https_status, metric_value, Child};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

/// A hang guard for each wait (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(90);
/// The edge reached through the chain listens here.
const EDGE_IP: &str = "127.0.0.23";

type Zone = InMemoryZoneHandler<hickory_server::net::runtime::TokioRuntimeProvider>;

fn n(s: &str) -> Name {
    Name::from_ascii(format!("{s}.mesh.test.")).unwrap()
}

fn cname(from: &str, to: &str, ttl: u32) -> Record {
    Record::from_rdata(n(from), ttl, RData::CNAME(CNAME(n(to))))
}

fn a(name: &str, ip: &str, ttl: u32) -> Record {
    Record::from_rdata(n(name), ttl, RData::A(A(ip.parse().unwrap())))
}

/// `mesh.test.` with an SOA and `records`, served on UDP at 127.0.0.1; the
/// zone can change while it serves.
async fn serve_zone(records: Vec<Record>) -> (Server<Catalog>, SocketAddr, Arc<Zone>) {
    serve_zone_at("mesh.test", records).await
}

/// The zone `domain` with an SOA and `records`, as [`serve_zone`].
async fn serve_zone_at(
    domain: &str,
    records: Vec<Record>,
) -> (Server<Catalog>, SocketAddr, Arc<Zone>) {
    let origin = Name::from_ascii(format!("{domain}.")).unwrap();
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
    for r in std::iter::once(soa).chain(records) {
        assert!(zone.upsert_mut(r, 1));
    }
    let zone = Arc::new(zone);
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![zone.clone()]);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    (server, addr, zone)
}

/// A UDP port free on `ip` right now, for an edge whose advertised tunnel
/// address (a name) must carry its port.
fn free_udp_port(ip: &str) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn metrics(url: &str) -> String {
    curl_plain(url).await.text()
}

fn connector(api: &str, state: &Path, token: Option<&str>, dns: SocketAddr) -> Child {
    let dns = dns.to_string();
    let mut args = vec![
        "connector",
        "--router",
        api,
        "--state",
        state.to_str().unwrap(),
        "--tunnels",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        "--nameserver",
        &dns,
    ];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    Child::spawn(&args)
}

async fn metrics_url(c: &mut Child) -> String {
    let line = c.line_starting("listening ", LIMIT).await;
    format!("{}/metrics", Child::field(&line, "metrics").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_follows_a_cname_chain_refuses_a_loop_and_starts_from_its_saved_answer_while_dns_is_down(
) {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (mut dns, dns_addr, _zone) = serve_zone(vec![
        cname("api", "hop1", 300),
        cname("hop1", "hop2", 200),
        cname("hop2", "edge", 100),
        a("edge", EDGE_IP, 30),
        cname("loop1", "loop2", 60),
        cname("loop2", "loop1", 60),
    ])
    .await;

    let router_dir = d.join("router");
    let mut router = Child::spawn(&[
        "router",
        "--data",
        router_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let line = router.line_starting("listening ", LIMIT).await;
    let api = Child::field(&line, "api").unwrap().to_owned();
    let admin = |args: &'static [&'static str]| {
        let (api, dir) = (api.clone(), router_dir.clone());
        async move { admin_cli(&api, &dir, args).await }
    };

    // Edge 1 advertises the head of the chain; edge 2 the loop.
    let port = free_udp_port(EDGE_IP);
    let tunnel_listen = format!("{EDGE_IP}:{port}");
    let advertise = format!("api.mesh.test:{port}");
    let mut edges = Vec::new();
    for (ip, listen, adv) in [
        (EDGE_IP, tunnel_listen.as_str(), advertise.as_str()),
        ("127.0.0.24", "127.0.0.24:0", "loop1.mesh.test:4433"),
    ] {
        let token = admin(&["token", "create", "--edge"]).await;
        let state = d.join(format!("edge-{ip}"));
        let public = format!("{ip}:0");
        let mut edge = Child::spawn(&[
            "edge",
            "--router",
            &api,
            "--state",
            state.to_str().unwrap(),
            "--token",
            token.trim(),
            "--public-listen",
            &public,
            "--tunnel-listen",
            listen,
            "--advertise-tunnel",
            adv,
            "--no-http3",
        ]);
        edge.line_starting("listening ", LIMIT).await;
        edges.push(edge);
    }

    // The connector follows the chain and attaches both tunnels to edge 1;
    // the loop is logged with its chain and leaves edge 2 out.
    let token = admin(&["token", "create", "--group", "Default"]).await;
    let state = d.join("connector");
    let mut c = connector(&api, &state, Some(token.trim()), dns_addr);
    let url = metrics_url(&mut c).await;
    eventually("two tunnels through the chain", LIMIT, || async {
        (metric_value(&metrics(&url).await, "portico_connector_tunnels") == 2.0).then_some(())
    })
    .await;
    let loop_line = c
        .line_containing(
            "loop1.mesh.test -> loop2.mesh.test -> loop1.mesh.test: CNAME loop",
            LIMIT,
        )
        .await;
    assert!(loop_line.contains("no saved answer"), "{loop_line}");
    eprintln!("{loop_line}");
    let m = metrics(&url).await;
    assert!(
        metric_value(
            &m,
            r#"portico_connector_dns_resolutions_total{result="ok"}"#
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            r#"portico_connector_dns_resolutions_total{result="loop"}"#
        ) >= 1.0,
        "{m}"
    );
    // One resolution of 3 hops (re-resolutions after the 30 s TTL add 3 each).
    let hops = metric_value(&m, "portico_connector_dns_chain_length_sum");
    let count = metric_value(&m, "portico_connector_dns_chain_length_count");
    assert!(count >= 1.0 && hops == 3.0 * count, "{m}");
    assert_eq!(
        metric_value(&m, "portico_connector_dns_saved_answers_total"),
        0.0,
        "{m}"
    );
    assert!(
        metric_value(&m, r#"portico_connector_dns_chain_length_bucket{le="2"}"#) == 0.0,
        "{m}"
    );

    // The answer is saved in the state directory, with its chain.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("resolved-names.json")).unwrap())
            .unwrap();
    let entry = &saved["names"]["api.mesh.test"];
    assert_eq!(entry["addrs"], serde_json::json!([EDGE_IP]), "{saved}");
    assert_eq!(
        entry["chain"],
        serde_json::json!([
            "api.mesh.test",
            "hop1.mesh.test",
            "hop2.mesh.test",
            "edge.mesh.test"
        ]),
        "{saved}"
    );
    assert!(saved["names"].get("loop1.mesh.test").is_none(), "{saved}");

    // The nameserver stops, and the router too; the connector is killed
    // and starts again on the same state: the saved answer (and the saved
    // config) get it attached.
    dns.shutdown_gracefully().await.unwrap();
    drop(dns);
    router.kill().await;
    c.kill().await;
    let _ = c.exit(LIMIT).await;
    let mut c = connector(&api, &state, None, dns_addr);
    let url = metrics_url(&mut c).await;
    eventually("two tunnels from the saved answer", LIMIT, || async {
        (metric_value(&metrics(&url).await, "portico_connector_tunnels") == 2.0).then_some(())
    })
    .await;
    let warning = c
        .line_containing("DNS failed; using the last good answer", LIMIT)
        .await;
    assert!(warning.contains("api.mesh.test"), "{warning}");
    assert!(warning.contains(EDGE_IP), "{warning}");
    assert!(warning.contains("age=\""), "{warning}");
    eprintln!("{warning}");
    let m = metrics(&url).await;
    assert!(
        metric_value(&m, "portico_connector_dns_saved_answers_total") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            r#"portico_connector_dns_resolutions_total{result="ok"}"#
        ),
        0.0,
        "{m}"
    );
    drop(edges);
}

/// The tunnel addresses of the connector's slots, sorted.
fn tunnel_addrs(c: &portico_connector::Handle) -> Vec<String> {
    let mut v: Vec<String> = c
        .tunnel_edges()
        .into_iter()
        .map(|e| e.tunnel_addr)
        .collect();
    v.sort();
    v
}

/// In process: one edge whose tunnel port listens on every address, named
/// `api -> hop1 -> hop2 -> edge-a` (TTL 1 s on the last hop). The chain
/// changes to end at `edge-b` (another address of the same edge): the
/// connector's tunnels move there, and requests sent all along (bounded,
/// about 20/s) never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_answer_changes_the_tunnels_move_without_a_failed_request() {
    use portico_proto::api::TokenScope;
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = tokio_util::sync::CancellationToken::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (ip_a, ip_b) = ("127.0.0.27", "127.0.0.28");
    let (_dns, dns_addr, zone) = serve_zone(vec![
        cname("api", "hop1", 300),
        cname("hop1", "hop2", 200),
        cname("hop2", "edge-a", 1),
        a("edge-a", ip_a, 30),
        a("edge-b", ip_b, 30),
    ])
    .await;

    let mut rc = portico_router::Config::new(d.join("router"));
    rc.listen = loopback;
    rc.metrics_listen = None;
    rc.apps_domain = portico::dev::DEV_APPS_DOMAIN.to_owned();
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    let admin = common::router_admin(&router);

    let port = free_udp_port("0.0.0.0");
    let edge = common::start_edge(&router, &admin, &d.join("edge"), root.child_token(), |ec| {
        ec.tunnel_listen = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
        ec.advertise_tunnel_addr = Some(format!("api.mesh.test:{port}"));
        ec.grace = Duration::from_secs(1);
    })
    .await;

    let demo = portico::demo::start(loopback, root.child_token())
        .await
        .unwrap();
    let group = portico_proto::GroupId::default_group();
    portico::dev::publish(
        &admin,
        "moving",
        &format!("http://{}/", demo.addr),
        group.clone(),
    )
    .await
    .unwrap();
    let mut cc = portico_connector::Config::new(router.url(), d.join("connector"));
    cc.token = Some(
        portico::dev::create_token(&admin, TokenScope::Connector { group })
            .await
            .unwrap(),
    );
    cc.tunnels = 2;
    cc.nameservers = vec![dns_addr];
    let c = portico_connector::start(cc, root.child_token())
        .await
        .unwrap();
    let on_a = vec![format!("{ip_a}:{port}"); 2];
    eventually("both tunnels on edge-a's address", LIMIT, || async {
        (tunnel_addrs(&c) == on_a).then_some(())
    })
    .await;

    // Load through the edge while the answer changes.
    let host = format!("moving.{}", portico::dev::DEV_APPS_DOMAIN);
    let load = Load::start(&router.ca_pem, edge.public_addr, &host);
    load.served(10).await;
    assert!(zone.upsert(cname("hop2", "edge-b", 1), 2).await);
    let on_b = vec![format!("{ip_b}:{port}"); 2];
    eventually("both tunnels moved to edge-b's address", LIMIT, || async {
        (tunnel_addrs(&c) == on_b).then_some(())
    })
    .await;
    load.served(10).await;
    load.finish().await;
    let m = c.metrics().render();
    assert_eq!(
        metric_value(&m, "portico_connector_dns_saved_answers_total"),
        0.0
    );
    assert!(
        metric_value(
            &m,
            r#"portico_connector_dns_resolutions_total{result="ok"}"#
        ) >= 2.0,
        "{m}"
    );
    root.cancel();
    c.wait().await.unwrap();
}

/// Requests to `host` at `public`, about 20/s (32 at most in flight, each
/// bounded at 20 s), counted until [`Load::finish`].
struct Load {
    ok: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(ca: &str, public: SocketAddr, host: &str) -> Load {
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = {
            let (ok, failures, stop, ca, host) = (
                ok.clone(),
                failures.clone(),
                stop.clone(),
                ca.to_owned(),
                host.to_owned(),
            );
            tokio::spawn(async move {
                let mut set = tokio::task::JoinSet::new();
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    while set.len() >= 32 {
                        set.join_next().await;
                    }
                    let (ok, failures, ca, host) =
                        (ok.clone(), failures.clone(), ca.clone(), host.clone());
                    set.spawn(async move {
                        match tokio::time::timeout(
                            Duration::from_secs(20),
                            https_status(&ca, public, &host),
                        )
                        .await
                        {
                            Ok(Ok(200)) => {
                                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(Ok(s)) => failures.lock().unwrap().push(format!("status {s}")),
                            Ok(Err(e)) => failures.lock().unwrap().push(e),
                            Err(_) => failures.lock().unwrap().push("timed out".into()),
                        }
                    });
                }
                while set.join_next().await.is_some() {}
            })
        };
        Load {
            ok,
            failures,
            stop,
            task,
        }
    }

    /// Waits until `n` more requests than now have been served.
    async fn served(&self, n: u64) {
        let before = self.ok.load(std::sync::atomic::Ordering::Relaxed);
        eventually("requests served", LIMIT, || async {
            (self.ok.load(std::sync::atomic::Ordering::Relaxed) >= before + n).then_some(())
        })
        .await;
    }

    /// Stops, and checks that no request failed.
    async fn finish(self) {
        self.stop.cancel();
        self.task.await.unwrap();
        let failures = self.failures.lock().unwrap().clone();
        let ok = self.ok.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{} failed, {ok} ok: {failures:?}",
            failures.len()
        );
    }
}

/// In process: a router that serves DNS for `byname.test` (so it gives
/// connectors the name `default.tunnel.byname.test:PORT`), and one edge
/// whose tunnel port listens on every address but advertises
/// 127.0.0.41. The connector's nameserver, a test zone, answers the
/// region's name with a chain `default.tunnel -> pool` to 127.0.0.42 and
/// .43, addresses the router does not list: the two tunnels go one to
/// each (every address dialled, each verified as an edge of the region,
/// and named after the edge that answered). The answer changes to the
/// listed address: both tunnels move there, and requests sent all along
/// never fail. With `--find-edges list`, a second connector ignores the
/// name and dials the listed address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_finds_its_regions_edges_by_the_region_name_and_dials_every_address() {
    use portico_proto::api::TokenScope;
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = tokio_util::sync::CancellationToken::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let domain = "byname.test";
    let name = |s: &str| Name::from_ascii(format!("{s}.{domain}.")).unwrap();
    let addr =
        |at: &str, ip: &str| Record::from_rdata(name(at), 1, RData::A(A(ip.parse().unwrap())));
    let region_name_to =
        |to: &str| Record::from_rdata(name("default.tunnel"), 1, RData::CNAME(CNAME(name(to))));
    let (_dns, dns_addr, zone) = serve_zone_at(
        domain,
        vec![
            region_name_to("pool"),
            addr("pool", "127.0.0.42"),
            addr("pool", "127.0.0.43"),
            addr("listed", "127.0.0.41"),
        ],
    )
    .await;

    let mut rc = portico_router::Config::new(d.join("router"));
    rc.listen = loopback;
    rc.metrics_listen = None;
    rc.apps_domain = domain.to_owned();
    rc.dns_listen = Some(loopback);
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    let admin = common::router_admin(&router);

    let port = free_udp_port("0.0.0.0");
    let edge = common::start_edge(&router, &admin, &d.join("edge"), root.child_token(), |ec| {
        ec.tunnel_listen = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
        ec.advertise_tunnel_addr = Some(format!("127.0.0.41:{port}"));
        ec.grace = Duration::from_secs(1);
    })
    .await;

    let demo = portico::demo::start(loopback, root.child_token())
        .await
        .unwrap();
    let group = portico_proto::GroupId::default_group();
    portico::dev::publish(
        &admin,
        "byname",
        &format!("http://{}/", demo.addr),
        group.clone(),
    )
    .await
    .unwrap();
    let connector = |state: &str, find_edges| {
        let (admin, group, router_url) = (&admin, group.clone(), router.url());
        let (state, token) = (d.join(state), root.child_token());
        async move {
            let mut cc = portico_connector::Config::new(router_url, state);
            cc.token = Some(
                portico::dev::create_token(admin, TokenScope::Connector { group })
                    .await
                    .unwrap(),
            );
            cc.tunnels = 2;
            cc.nameservers = vec![dns_addr];
            cc.find_edges = find_edges;
            portico_connector::start(cc, token).await.unwrap()
        }
    };
    let c = connector("connector", portico_connector::FindEdges::Dns).await;
    let edge_id = edge.id.to_string();
    let tunnels = |c: &portico_connector::Handle| {
        let mut v: Vec<(String, String)> = c
            .tunnel_edges()
            .into_iter()
            .map(|e| (e.id.to_string(), e.tunnel_addr))
            .collect();
        v.sort();
        v
    };
    let by_name = vec![
        (edge_id.clone(), format!("127.0.0.42:{port}")),
        (edge_id.clone(), format!("127.0.0.43:{port}")),
    ];
    eventually("a tunnel on each address of the name", LIMIT, || async {
        (tunnels(&c) == by_name).then_some(())
    })
    .await;

    let load = Load::start(
        &router.ca_pem,
        edge.public_addr,
        &format!("byname.{domain}"),
    );
    load.served(10).await;
    // The name now leads to the listed address only.
    assert!(zone.upsert(region_name_to("listed"), 2).await);
    let listed = vec![(edge_id.clone(), format!("127.0.0.41:{port}")); 2];
    eventually(
        "both tunnels moved to the listed address",
        LIMIT,
        || async { (tunnels(&c) == listed).then_some(()) },
    )
    .await;
    load.served(10).await;
    load.finish().await;

    // By the list only: the name is not asked.
    assert!(zone.upsert(region_name_to("pool"), 3).await);
    let listing = connector("listing", portico_connector::FindEdges::List).await;
    eventually("the list's address", LIMIT, || async {
        (tunnels(&listing) == listed).then_some(())
    })
    .await;
    root.cancel();
    c.wait().await.unwrap();
    listing.wait().await.unwrap();
}
