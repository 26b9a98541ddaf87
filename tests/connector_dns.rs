//! The connector's CNAME-chain-aware resolution through real processes: a
//! test zone served in this process by hickory-server (UDP on 127.0.0.1)
//! gives a 3-hop chain `api -> hop1 -> hop2 -> edge` to an edge's tunnel
//! address and a loop `loop1 -> loop2 -> loop1` to another edge's; a
//! `portico connector --nameserver` follows the first and attaches, logs
//! the loop with its chain, saves the answer; with the nameserver stopped,
//! the connector restarted on its state directory starts from the saved
//! answer, with a warning, and attaches again.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{admin_cli, curl_plain, eventually, metric_value, Child};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;

/// A hang guard for each wait (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(90);
/// The edge reached through the chain listens here.
const EDGE_IP: &str = "127.0.0.23";

/// `mesh.test.`: the chain, the loop, an SOA.
async fn serve_zone() -> (Server<Catalog>, SocketAddr) {
    let origin = Name::from_ascii("mesh.test.").unwrap();
    let n = |s: &str| Name::from_ascii(format!("{s}.mesh.test.")).unwrap();
    let mut zone = InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let records = [
        Record::from_rdata(
            origin.clone(),
            3600,
            RData::SOA(SOA::new(n("ns"), n("admin"), 1, 60, 60, 600, 5)),
        ),
        Record::from_rdata(n("api"), 300, RData::CNAME(CNAME(n("hop1")))),
        Record::from_rdata(n("hop1"), 200, RData::CNAME(CNAME(n("hop2")))),
        Record::from_rdata(n("hop2"), 100, RData::CNAME(CNAME(n("edge")))),
        Record::from_rdata(n("edge"), 30, RData::A(A(EDGE_IP.parse().unwrap()))),
        Record::from_rdata(n("loop1"), 60, RData::CNAME(CNAME(n("loop2")))),
        Record::from_rdata(n("loop2"), 60, RData::CNAME(CNAME(n("loop1")))),
    ];
    for r in records {
        assert!(zone.upsert_mut(r, 1));
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(origin), vec![Arc::new(zone)]);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    (server, addr)
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
    let (mut dns, dns_addr) = serve_zone().await;

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

    // The nameserver stops; the connector is killed and starts again on
    // the same state: the saved answer gets it attached.
    dns.shutdown_gracefully().await.unwrap();
    drop(dns);
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
    assert!(warning.contains("age="), "{warning}");
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
