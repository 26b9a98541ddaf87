//! Drain and failover with nothing lost (issue 10, point 8), through real
//! processes: a router with its DNS authority, two edges of one region
//! (on 127.0.0.2 and 127.0.0.3, with the mesh), one connector with four
//! tunnels, and `portico loadtest` sending 200 requests a second to both
//! edges, failing over between them as a client with both A records does.
//! The edges share a tunnel port, so the connector finds them by the
//! region's name, `default.tunnel.drain.test`, asking the router's DNS.
//!
//! 1. A rolling restart (SIGTERM, wait for the exit, start again on the
//!    same addresses) of both edges under HTTP/2 load fails no request.
//!    Each draining edge is out of the DNS answers and shown `draining` at
//!    once, and still serves users for its drain delay.
//! 2. SIGKILL of an edge: requests at the other edge never fail, the
//!    connector's tunnels all move there, and a load sent afterwards to
//!    both addresses (one dead) fails nothing.
//! 3. The router stopped for 60 s under HTTP/1.1 load, with an edge
//!    restarted in that minute: no request fails, the restarted edge
//!    serves (through the mesh, from its saved config), and changes resume
//!    when the router returns.
//!
//! The order of events comes from what the test observes (metrics, the
//! router's edge list, DNS answers, processes exiting), never from sleeps.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    admin_cli, assert_nothing_failed, curl, curl_plain, dig, eventually, metric_value, Child,
};
use portico_proto::api::{Edge, Status};

/// A hang guard for each wait (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(90);
/// The edges' drain delay: long enough for the test to see the draining
/// edge out of DNS while it still serves.
const DRAIN_DELAY: &str = "5s";
const EDGE_NAME: &str = "default.edge.drain.test";

struct Router {
    child: Option<Child>,
    dir: PathBuf,
    api: String,
    listen: SocketAddr,
    dns: SocketAddr,
}

impl Router {
    async fn start(dir: &Path, listen: &str, dns: &str) -> Router {
        let data = dir.join("router");
        let mut child = Child::spawn(&[
            "router",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            listen,
            "--dns-listen",
            dns,
            "--apps-domain",
            "drain.test",
        ]);
        let line = child.line_starting("listening ", LIMIT).await;
        let api = Child::field(&line, "api").unwrap().to_owned();
        let dns = Child::field(&line, "dns").unwrap().parse().unwrap();
        let listen = api
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|e| panic!("api {api}: {e}"));
        Router {
            child: Some(child),
            dir: data,
            api,
            listen,
            dns,
        }
    }

    async fn admin(&self, args: &[&str]) -> String {
        admin_cli(&self.api, &self.dir, args).await
    }

    async fn edge_status(&self, id: &str) -> Status {
        let out = self.admin(&["edge", "list", "--json"]).await;
        let edges: Vec<Edge> = serde_json::from_str(&out).unwrap();
        edges
            .into_iter()
            .find(|e| e.id.as_str() == id)
            .unwrap_or_else(|| panic!("edge {id} not listed: {out}"))
            .status
    }

    async fn edge_ips(&self) -> Vec<String> {
        dig(self.dns, &[EDGE_NAME, "A"]).await.answer_data("A")
    }
}

/// One edge process on its own loopback address; its ports are kept
/// across restarts.
struct EdgeProc {
    ip: &'static str,
    state: PathBuf,
    id: String,
    public: SocketAddr,
    tunnel: SocketAddr,
    mesh: SocketAddr,
    metrics: String,
    child: Option<Child>,
}

impl EdgeProc {
    async fn start(router: &Router, dir: &Path, ip: &'static str, tunnel_port: u16) -> EdgeProc {
        let token = router.admin(&["token", "create", "--edge"]).await;
        let any = format!("{ip}:0");
        let mut e = EdgeProc {
            ip,
            state: dir.join(format!("edge-{ip}")),
            id: String::new(),
            public: any.parse().unwrap(),
            tunnel: SocketAddr::new(ip.parse().unwrap(), tunnel_port),
            mesh: any.parse().unwrap(),
            metrics: String::new(),
            child: None,
        };
        e.spawn(&router.api, Some(token.trim())).await;
        e
    }

    async fn spawn(&mut self, api: &str, token: Option<&str>) {
        let (public, tunnel, mesh) = (
            self.public.to_string(),
            self.tunnel.to_string(),
            self.mesh.to_string(),
        );
        let mut args = vec![
            "--log-format",
            "json",
            "edge",
            "--router",
            api,
            "--state",
            self.state.to_str().unwrap(),
            "--public-listen",
            &public,
            "--tunnel-listen",
            &tunnel,
            "--mesh-listen",
            &mesh,
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-http3",
            "--drain-delay",
            DRAIN_DELAY,
        ];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        let mut child = Child::spawn(&args);
        // "listening edge=ID region=R public=A tunnel=A mesh=udp://A metrics=http://A"
        let line = child.line_starting("listening ", LIMIT).await;
        let field = |k: &str| Child::field(&line, k).unwrap_or_else(|| panic!("no {k} in {line}"));
        let addr = |k: &str| -> SocketAddr {
            let v = field(k);
            v.rsplit("://").next().unwrap().parse().unwrap()
        };
        self.public = addr("public");
        self.tunnel = addr("tunnel");
        self.mesh = addr("mesh");
        self.metrics = format!("{}/metrics", field("metrics"));
        self.id = field("edge").to_owned();
        self.child = Some(child);
    }

    async fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&curl_plain(&self.metrics).await.text(), name_and_labels)
    }

    fn pid(&self) -> String {
        self.child.as_ref().unwrap().child.id().unwrap().to_string()
    }

    fn signal(&self, sig: &str) {
        assert!(std::process::Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap()
            .success());
    }

    /// SIGTERM, then the exit; returns everything it printed.
    async fn drain_and_exit(&mut self) -> String {
        self.signal("-TERM");
        let (status, out) = self.child.take().unwrap().exit(LIMIT).await;
        assert!(status.success(), "edge {}: {status:?}\n{out}", self.ip);
        out
    }
}

/// `portico loadtest` against app `dr` at the edges' public addresses.
fn load(
    dir: &Path,
    name: &str,
    ca: &Path,
    to: &[&EdgeProc],
    protocol: &str,
    duration: &str,
) -> (Child, PathBuf) {
    let report = dir.join(format!("{name}.json"));
    let mut args: Vec<String> = [
        "loadtest",
        "https://dr.drain.test/",
        "--rate",
        "200",
        "--duration",
        duration,
        "--protocol",
        protocol,
        "--connections",
        "4",
        "--timeout",
        "30s",
        "--cacert",
        ca.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
        "--quiet",
    ]
    .map(str::to_owned)
    .to_vec();
    for e in to {
        args.push("--connect-to".into());
        args.push(e.public.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (Child::spawn(&refs), report)
}

/// Waits for a load to end; its report.
async fn finished(load: Child, report: &Path) -> portico_loadtest::Report {
    let (status, out) = load.exit(Duration::from_secs(180)).await;
    assert!(status.success(), "portico loadtest failed:\n{out}");
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// The JSON log lines of an edge's output, in order.
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

fn message_index(lines: &[serde_json::Value], starts: &str) -> usize {
    lines
        .iter()
        .position(|v| v["message"].as_str().is_some_and(|m| m.starts_with(starts)))
        .unwrap_or_else(|| panic!("no {starts:?} line"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_sigkill_and_router_outage_under_load_lose_nothing() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut router = Router::start(d, "127.0.0.1:0", "127.0.0.1:0").await;
    let ca = router.dir.join("ca.pem");
    let port = shared_udp_port(&["127.0.0.2", "127.0.0.3"]);
    let mut edges = [
        EdgeProc::start(&router, d, "127.0.0.2", port).await,
        EdgeProc::start(&router, d, "127.0.0.3", port).await,
    ];
    let demo = portico::demo::start(
        "127.0.0.1:0".parse().unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let internal = format!("http://{}/", demo.addr);
    router
        .admin(&["app", "create", "dr", "--internal-url", &internal])
        .await;
    let token = router
        .admin(&["token", "create", "--group", "Default"])
        .await;
    let mut connector = Child::spawn(&[
        "connector",
        "--router",
        &router.api,
        "--state",
        d.join("connector").to_str().unwrap(),
        "--token",
        token.trim(),
        "--tunnels",
        "4",
        "--nameserver",
        &router.dns.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let line = connector.line_starting("listening ", LIMIT).await;
    let connector_metrics = format!("{}/metrics", Child::field(&line, "metrics").unwrap());
    for e in &edges {
        eventually("tunnels on both edges", LIMIT, || async {
            (e.metric("portico_edge_tunnels").await >= 1.0).then_some(())
        })
        .await;
        eventually("the app served at each edge", LIMIT, || async {
            let url = format!("https://dr.drain.test:{}/", e.public.port());
            let resolve = format!("dr.drain.test:{}:{}", e.public.port(), e.ip);
            let r = curl(&ca, &["--resolve", &resolve, &url]).await;
            (r.status == 200).then_some(())
        })
        .await;
    }
    eventually("both edges in DNS", LIMIT, || async {
        (router.edge_ips().await == ["127.0.0.2", "127.0.0.3"]).then_some(())
    })
    .await;

    // 1. A rolling restart of the region under HTTP/2 load.
    let (l, report) = load(d, "rolling", &ca, &[&edges[0], &edges[1]], "h2", "45s");
    for e in &edges {
        eventually("users on both edges", LIMIT, || async {
            (e.metric("portico_edge_connections").await >= 1.0).then_some(())
        })
        .await;
    }
    for (e, other) in edges.iter_mut().zip(["127.0.0.3", "127.0.0.2"]) {
        let (id, ip) = (e.id.clone(), e.ip);
        e.signal("-TERM");
        eventually("the router to show it draining", LIMIT, || async {
            (router.edge_status(&id).await == Status::Draining).then_some(())
        })
        .await;
        // Out of DNS with the same commit (the zone follows the store's
        // watch), while it still serves.
        eventually("the draining edge out of DNS", LIMIT, || async {
            (router.edge_ips().await == [other]).then_some(())
        })
        .await;
        assert!(
            e.child
                .as_mut()
                .unwrap()
                .child
                .try_wait()
                .unwrap()
                .is_none(),
            "{ip} still runs"
        );
        let out = {
            let (status, out) = e.child.take().unwrap().exit(LIMIT).await;
            assert!(status.success(), "edge {ip}: {status:?}\n{out}");
            out
        };
        // It served users after it had left DNS, until its drain delay
        // was over.
        let lines = json_lines(&out);
        let (from, to) = (
            message_index(&lines, "shutting down: draining"),
            message_index(&lines, "drain delay over"),
        );
        let served = lines[from..to]
            .iter()
            .filter(|v| v["target"] == "portico::access")
            .count();
        assert!(served > 0, "{ip} served nobody while draining");
        e.spawn(&router.api, None).await;
        eventually("the restarted edge back in DNS", LIMIT, || async {
            (router.edge_ips().await == ["127.0.0.2", "127.0.0.3"]).then_some(())
        })
        .await;
        let e = &*e;
        eventually("tunnels back on the restarted edge", LIMIT, || async {
            (e.metric("portico_edge_tunnels").await >= 1.0).then_some(())
        })
        .await;
    }
    let r = finished(l, &report).await;
    assert_nothing_failed("rolling restart", &r, 8000);
    eprintln!(
        "rolling restart: {} requests, {} retried, {} failovers",
        r.requests.scheduled, r.requests.retried, r.requests.failovers
    );

    // 2. SIGKILL of an edge: the other edge serves throughout, and the
    // connector's tunnels all land there.
    let (l, report) = load(d, "sigkill-other", &ca, &[&edges[1]], "h1", "20s");
    eventually("requests at the other edge", LIMIT, || async {
        (edges[1].metric("portico_edge_connections").await >= 1.0).then_some(())
    })
    .await;
    edges[0].signal("-KILL");
    edges[0].child.take().unwrap().exit(LIMIT).await;
    eventually("all four tunnels on the other edge", LIMIT, || async {
        (edges[1].metric("portico_edge_tunnels").await >= 4.0).then_some(())
    })
    .await;
    let r = finished(l, &report).await;
    assert_nothing_failed("requests at the other edge while one is killed", &r, 3000);
    // Both addresses, one dead: the load fails over and nothing fails.
    let (l, report) = load(d, "after-kill", &ca, &[&edges[0], &edges[1]], "h2", "10s");
    let r = finished(l, &report).await;
    assert_nothing_failed("after the reconnect, with a dead address", &r, 1500);
    assert!(r.requests.failovers > 0, "{:?}", r.requests);
    edges[0].spawn(&router.api, None).await;
    let e = &edges[0];
    eventually("tunnels back on the restarted edge", LIMIT, || async {
        (e.metric("portico_edge_tunnels").await >= 1.0).then_some(())
    })
    .await;

    // 3. The router stopped for 60 s; an edge restarted meanwhile.
    let mut old = router.child.take().unwrap();
    old.kill().await;
    let (l, report) = load(d, "router-down", &ca, &[&edges[0], &edges[1]], "h1", "60s");
    eventually("users on both edges", LIMIT, || async {
        (edges[1].metric("portico_edge_connections").await >= 1.0).then_some(())
    })
    .await;
    let _ = edges[1].drain_and_exit().await;
    edges[1].spawn(&router.api, None).await;
    // A new user of the restarted edge is served, with no router to ask.
    let e = &edges[1];
    let url = format!("https://dr.drain.test:{}/", e.public.port());
    let resolve = format!("dr.drain.test:{}:{}", e.public.port(), e.ip);
    let r = curl(&ca, &["--resolve", &resolve, &url]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let route = r.header("portico-route").unwrap_or_default();
    assert!(route.starts_with(&e.id), "{route}");
    let r = finished(l, &report).await;
    assert_nothing_failed("the router down for 60 s", &r, 11000);
    // Still without the router, the connector's tunnels spread over both
    // edges again once the drained edge is no longer passed over.
    eventually(
        "tunnels back on the edge restarted without a router",
        Duration::from_secs(120),
        || async { (e.metric("portico_edge_tunnels").await >= 1.0).then_some(()) },
    )
    .await;

    // The router returns on its address: changes resume.
    let (listen, dns) = (router.listen.to_string(), router.dns.to_string());
    let back = Router::start(d, &listen, &dns).await;
    back.admin(&["app", "create", "dr2", "--internal-url", &internal])
        .await;
    for e in &edges {
        eventually("the new app served at each edge", LIMIT, || async {
            let url = format!("https://dr2.drain.test:{}/", e.public.port());
            let resolve = format!("dr2.drain.test:{}:{}", e.public.port(), e.ip);
            let r = curl(&ca, &["--resolve", &resolve, &url]).await;
            (r.status == 200).then_some(())
        })
        .await;
    }
    // The connector found the edges by the region's name all along, and
    // used its saved answer while the router (and its DNS) was down.
    let m = curl_plain(&connector_metrics).await.text();
    assert!(
        metric_value(
            &m,
            r#"portico_connector_dns_resolutions_total{result="ok"}"#
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric_value(&m, "portico_connector_dns_saved_answers_total") >= 1.0,
        "{m}"
    );
    drop(connector);
}

/// A UDP port free on each of `ips` now (the edges' common tunnel port,
/// which the region's name needs).
fn shared_udp_port(ips: &[&str]) -> u16 {
    for _ in 0..100 {
        let first = std::net::UdpSocket::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        if ips[1..]
            .iter()
            .all(|ip| std::net::UdpSocket::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no UDP port free on all of {ips:?}");
}
