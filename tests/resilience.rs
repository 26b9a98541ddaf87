//! Static stability and restarts: edges and connectors keep serving from
//! their saved state while the router is down, even across their own
//! restarts; connectors come back when an edge restarts; a second edge with
//! the operator's own certificate joins and serves; a tunnel slot whose edge
//! is gone dials the next edge.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{eventually, Stack};
use portico::dev::create_token;
use portico_proto::api::{App, TokenScope};
use portico_proto::RegionId;
use tokio_util::sync::CancellationToken;

/// Enrolls a second edge of the default region (state in `edge2`) on
/// ephemeral ports, with the operator's `public_cert` if given, and waits
/// until it is ready.
async fn another_edge(
    s: &Stack,
    public_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    stop: CancellationToken,
) -> portico_edge::Handle {
    let token = create_token(
        &s.d.admin,
        TokenScope::Edge {
            region: RegionId::default_region(),
        },
    )
    .await
    .unwrap();
    let mut c = portico_edge::Config::new(s.d.router.url(), s.dir.path().join("edge2"));
    c.token = Some(token);
    c.public_listen = "127.0.0.1:0".parse().unwrap();
    c.tunnel_listen = "127.0.0.1:0".parse().unwrap();
    c.public_cert = public_cert;
    c.drain_delay = Duration::ZERO;
    let edge = portico_edge::start(c, stop)
        .await
        .expect("second edge starts");
    tokio::time::timeout(Duration::from_secs(10), edge.ready())
        .await
        .unwrap();
    edge
}

/// Starts an edge on fixed addresses from an existing state directory.
async fn edge_at(
    router: &str,
    state: &std::path::Path,
    public: SocketAddr,
    tunnel: SocketAddr,
    stop: CancellationToken,
) -> portico_edge::Handle {
    let mut c = portico_edge::Config::new(router, state);
    c.public_listen = public;
    c.tunnel_listen = tunnel;
    c.drain_delay = Duration::ZERO;
    portico_edge::start(c, stop)
        .await
        .expect("edge restarts from its state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_router_down_edge_and_connector_serve_and_even_restart() {
    let s = Stack::start().await;
    let Stack { d, shutdown, dir } = s;
    let router_url = d.router.url();
    let url = d.app_url();
    d.router_stop.cancel();
    d.router.wait().await.expect("router stops");
    assert!(
        d.admin.get_json::<Vec<App>>("/v1/apps").await.is_err(),
        "the router is down"
    );
    let ca = dir.path().join("router").join("ca.pem");
    for _ in 0..5 {
        assert_eq!(common::curl(&ca, &[&url]).await.status, 200);
    }

    // Restart the edge on the same addresses: it serves from its snapshot.
    let (public, tunnel) = (d.edge.public_addr, d.edge.tunnel_addr);
    d.edge_stop.cancel();
    d.edge.wait().await.expect("edge stops");
    let edge = edge_at(
        &router_url,
        &dir.path().join("edge"),
        public,
        tunnel,
        shutdown.child_token(),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), edge.ready())
        .await
        .expect("ready from the saved config");

    // Restart the connector: saved credentials and config, no router.
    d.connector_stop.cancel();
    d.connector.wait().await.expect("connector stops");
    let mut cc = portico_connector::Config::new(&router_url, dir.path().join("connector"));
    cc.tunnels = 2;
    let connector = portico_connector::start(cc, shutdown.child_token())
        .await
        .expect("the connector starts from its saved state");
    tokio::time::timeout(Duration::from_secs(30), connector.wait_tunnels(1))
        .await
        .expect("tunnels come up without the router");
    let r = common::curl(&ca, &[&url]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    shutdown.cancel();
    let _ = connector.wait().await;
    let _ = edge.wait().await;
    d.demo.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_reconnect_when_their_edge_restarts() {
    let s = Stack::start().await;
    let Stack { d, shutdown, dir } = s;
    let (public, tunnel) = (d.edge.public_addr, d.edge.tunnel_addr);
    let url = d.app_url();
    d.edge_stop.cancel();
    d.edge.wait().await.expect("edge stops");
    eventually("the connector notices", Duration::from_secs(30), || async {
        (d.connector.tunnel_count() == 0).then_some(())
    })
    .await;
    let edge = edge_at(
        &d.router.url(),
        &dir.path().join("edge"),
        public,
        tunnel,
        shutdown.child_token(),
    )
    .await;
    eventually(
        "the connector reconnects",
        Duration::from_secs(60),
        || async { (edge.tunnel_count() == 2).then_some(()) },
    )
    .await;
    let r = common::curl(&dir.path().join("router").join("ca.pem"), &[&url]).await;
    assert_eq!(r.status, 200);
    shutdown.cancel();
    let _ = d.connector.wait().await;
    let _ = edge.wait().await;
    d.demo.wait().await;
    let _ = d.router.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_edge_with_the_operators_certificate_joins_and_serves() {
    let s = Stack::start().await;
    // The operator's own CA and wildcard certificate, as PEM files.
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Operator Test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["*.apps.localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let certs = s.dir.path().join("operator");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(
        certs.join("cert.pem"),
        format!("{}{}", leaf.pem(), ca.pem()),
    )
    .unwrap();
    std::fs::write(certs.join("key.pem"), key.serialize_pem()).unwrap();

    let edge2 = another_edge(
        &s,
        Some((certs.join("cert.pem"), certs.join("key.pem"))),
        s.shutdown.child_token(),
    )
    .await;

    // The connector learns of the new edge from the router and spreads its
    // tunnels over both.
    eventually(
        "a tunnel to the second edge",
        Duration::from_secs(60),
        || async { (edge2.tunnel_count() >= 1).then_some(()) },
    )
    .await;
    let url = format!("https://hello.apps.localhost:{}/", edge2.public_addr.port());
    let r = common::curl(&certs.join("ca.pem"), &[&url]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("Hello from behind the tunnel"));
    // It really is the operator's certificate, not one from the router CA.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--cacert"])
        .arg(s.d.ca_path())
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "the router CA must not verify the operator's certificate"
    );
    assert!(
        s.d.edge.tunnel_count() >= 1,
        "the first edge keeps a tunnel too"
    );

    s.shutdown.cancel();
    let _ = edge2.wait().await;
    s.stop().await;
}

/// The router keeps listing an edge that stopped (edges are not expired).
/// A connector whose one tunnel slot points at it must not wait for it: after
/// a failed dial the slot tries the region's next edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_whose_edge_is_gone_dials_the_next_edge() {
    let s = Stack::start().await;
    let edge2_stop = s.shutdown.child_token();
    let edge2 = another_edge(&s, None, edge2_stop.clone()).await;

    // Stop the edge a lone slot dials first (edges are taken in id order).
    let live_port = if s.d.edge.id < edge2.id {
        s.d.edge_stop.cancel();
        edge2.public_addr.port()
    } else {
        edge2_stop.cancel();
        s.d.edge.public_addr.port()
    };

    s.publish_demo_in_new_group("lone", "lone").await;
    let token = create_token(
        &s.d.admin,
        TokenScope::Connector {
            group: portico_proto::GroupId::new("lone").unwrap(),
        },
    )
    .await
    .unwrap();
    let mut cc = portico_connector::Config::new(s.d.router.url(), s.dir.path().join("lone"));
    cc.token = Some(token);
    cc.tunnels = 1;
    let _lone = portico_connector::start(cc, s.shutdown.child_token())
        .await
        .expect("the connector enrolls");
    let url = format!("https://lone.apps.localhost:{live_port}/");
    let r = eventually(
        "the lone connector serves through the live edge",
        Duration::from_secs(60),
        || async {
            let r = s.curl(&["--max-time", "10", &url]).await;
            (r.status == 200).then_some(r)
        },
    )
    .await;
    assert!(r.text().contains("Hello from behind the tunnel"));
    s.stop().await;
}
