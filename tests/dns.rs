//! The router's DNS authority through real processes and Debian's `dig`
//! and `nsupdate` (dnsutils): a `portico router --dns-listen`, `portico
//! edge` processes in two or three regions, each on its own loopback
//! address (127.0.0.2, .3, .4) so that each is one A record, and a
//! `portico connector`.
//!
//! - The chain app host → CNAME `<region>.edge` → the edges' A records is
//!   whole in ANSWER (and not in ADDITIONAL), over UDP and TCP, with AA;
//!   the app's region follows its group's connectors; tunnel names,
//!   NXDOMAIN/NODATA with the SOA, the apex, a pinned region without
//!   edges; out-of-zone names and UPDATE are refused; garbage datagrams and
//!   a truncated TCP message leave it answering.
//! - An edge killed with SIGKILL leaves the answers once its reports are
//!   stale (15 s); when every edge of the region is, all come back (fail
//!   open).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{admin_cli, curl_plain, dig, eventually, metric_value, Child, Dig};
use tokio::io::AsyncWriteExt as _;

/// A hang guard for each wait (never a timing assertion). Waits for an
/// edge to go stale take 15-20 s.
const LIMIT: Duration = Duration::from_secs(90);

/// A router with its DNS authority, and its admin CLI.
struct Router {
    child: Child,
    dir: PathBuf,
    api: String,
    dns: SocketAddr,
    metrics: String,
}

impl Router {
    async fn start(dir: &Path) -> Router {
        let dir = dir.join("router");
        let mut child = Child::spawn(&[
            "router",
            "--data",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
        ]);
        let line = child.line_starting("listening ", LIMIT).await;
        let api = Child::field(&line, "api").unwrap().to_owned();
        let dns = Child::field(&line, "dns")
            .unwrap_or_else(|| panic!("no dns= in {line:?}"))
            .parse()
            .unwrap();
        let metrics = format!("{}/metrics", Child::field(&line, "metrics").unwrap());
        Router {
            child,
            dir,
            api,
            dns,
            metrics,
        }
    }

    async fn admin(&self, args: &[&str]) -> String {
        admin_cli(&self.api, &self.dir, args).await
    }

    /// `portico edge` in `region`, listening on `ip`; `extra` flags.
    async fn edge(&self, dir: &Path, region: &str, ip: &str, extra: &[&str]) -> Child {
        let token = self
            .admin(&["token", "create", "--edge", "--region", region])
            .await;
        let state = dir.join(format!("edge-{ip}"));
        let public = format!("{ip}:0");
        let mut args = vec![
            "edge",
            "--router",
            &self.api,
            "--state",
            state.to_str().unwrap(),
            "--token",
            token.trim(),
            "--public-listen",
            &public,
            "--tunnel-listen",
            &public,
            "--no-http3",
        ];
        args.extend_from_slice(extra);
        let mut edge = Child::spawn(&args);
        edge.line_starting("listening ", LIMIT).await;
        edge
    }

    async fn dig(&self, args: &[&str]) -> Dig {
        dig(self.dns, args).await
    }

    /// The sorted A records `name` is answered with.
    async fn a(&self, name: &str) -> Vec<String> {
        self.dig(&[name, "A"]).await.answer_data("A")
    }

    /// Waits until `name`'s A records are `want`.
    async fn wait_a(&self, what: &str, name: &str, want: &[&str]) {
        eventually(what, LIMIT, || async {
            (self.a(name).await == want).then_some(())
        })
        .await;
    }
}

/// `(name, type, data)` of each record.
fn rrs(records: &[common::Rr]) -> Vec<(&str, &str, &str)> {
    records
        .iter()
        .map(|r| (r.name.as_str(), r.rtype.as_str(), r.data.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_is_whole_in_the_answer_section_and_bad_queries_are_refused() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut router = Router::start(d).await;
    for region in ["eu-west", "ap-south", "us-east"] {
        router.admin(&["region", "create", region]).await;
    }
    router
        .admin(&["group", "create", "us", "--region", "us-east"])
        .await;
    router
        .admin(&[
            "app",
            "create",
            "hello",
            "--internal-url",
            "http://127.0.0.1:9/",
        ])
        .await;
    router
        .admin(&[
            "app",
            "create",
            "crm",
            "--internal-url",
            "http://127.0.0.1:9/",
            "--group",
            "us",
        ])
        .await;
    let _eu1 = router.edge(d, "eu-west", "127.0.0.2", &[]).await;
    let _eu2 = router.edge(d, "eu-west", "127.0.0.3", &[]).await;
    // ap-south's edge advertises a tunnel address nothing listens on, so
    // the connector's tunnels all end up in eu-west.
    let _ap = router
        .edge(
            d,
            "ap-south",
            "127.0.0.4",
            &["--advertise-tunnel", "127.0.0.9:9"],
        )
        .await;

    // No connector of the Default group anywhere: `default` has no edge,
    // so the first region that has one serves it.
    router
        .wait_a("hello in ap-south", "hello.apps.localhost", &["127.0.0.4"])
        .await;
    let dig = router.dig(&["hello.apps.localhost", "A"]).await;
    assert_eq!(
        dig.answer_data("CNAME"),
        ["ap-south.edge.apps.localhost."],
        "{}",
        dig.text
    );

    // Its connector attaches to eu-west's edges: the app follows.
    let token = router
        .admin(&["token", "create", "--group", "Default"])
        .await;
    let connector_state = d.join("connector");
    let mut connector = Child::spawn(&[
        "connector",
        "--router",
        &router.api,
        "--state",
        connector_state.to_str().unwrap(),
        "--token",
        token.trim(),
        "--tunnels",
        "2",
    ]);
    connector.line_starting("listening ", LIMIT).await;
    router
        .wait_a(
            "hello in eu-west",
            "hello.apps.localhost",
            &["127.0.0.2", "127.0.0.3"],
        )
        .await;

    // The whole chain in ANSWER, nothing in ADDITIONAL, AA set, short TTLs;
    // over UDP and over TCP.
    for transport in ["+notcp", "+tcp"] {
        let dig = router.dig(&[transport, "hello.apps.localhost", "A"]).await;
        assert_eq!(dig.status, "NOERROR", "{}", dig.text);
        assert!(dig.aa(), "authoritative: {}", dig.text);
        assert_eq!(
            rrs(&dig.answer),
            [
                (
                    "hello.apps.localhost.",
                    "CNAME",
                    "eu-west.edge.apps.localhost."
                ),
                ("eu-west.edge.apps.localhost.", "A", "127.0.0.2"),
                ("eu-west.edge.apps.localhost.", "A", "127.0.0.3"),
            ],
            "{transport}: {}",
            dig.text
        );
        assert!(dig.answer[0].ttl <= 60, "{}", dig.text);
        assert!(dig.answer[1..].iter().all(|r| r.ttl <= 30), "{}", dig.text);
        assert!(dig.additional.is_empty(), "{}", dig.text);
        assert!(dig.authority.is_empty(), "{}", dig.text);
        let expected_transport = if transport == "+tcp" {
            "(TCP)"
        } else {
            "(UDP)"
        };
        assert!(dig.text.contains(expected_transport), "{}", dig.text);
    }
    // As a user would look: `+noall +answer` prints the chain, and
    // `+noall +additional` prints nothing.
    let out = dig_text(
        router.dns,
        &["+noall", "+answer", "hello.apps.localhost", "A"],
    )
    .await;
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines[0][3..],
        ["CNAME", "eu-west.edge.apps.localhost."],
        "{out}"
    );
    assert_eq!(lines[1][3..], ["A", "127.0.0.2"], "{out}");
    assert_eq!(lines[2][3..], ["A", "127.0.0.3"], "{out}");
    let out = dig_text(
        router.dns,
        &["+noall", "+additional", "hello.apps.localhost", "A"],
    )
    .await;
    assert_eq!(out.trim(), "", "nothing in ADDITIONAL");

    // Tunnel endpoints carry tunnel addresses.
    assert_eq!(
        router.a("eu-west.tunnel.apps.localhost").await,
        ["127.0.0.2", "127.0.0.3"]
    );
    assert_eq!(
        router.a("ap-south.tunnel.apps.localhost").await,
        ["127.0.0.9"]
    );
    // A pinned group's region without edges: the CNAME, no address.
    let dig = router.dig(&["crm.apps.localhost", "A"]).await;
    assert_eq!(dig.status, "NOERROR", "{}", dig.text);
    assert_eq!(
        rrs(&dig.answer),
        [(
            "crm.apps.localhost.",
            "CNAME",
            "us-east.edge.apps.localhost."
        )],
        "{}",
        dig.text
    );
    assert_eq!(dig.authority[0].rtype, "SOA", "{}", dig.text);

    // Other types, other names.
    let dig = router.dig(&["hello.apps.localhost", "AAAA"]).await;
    assert_eq!(dig.status, "NOERROR", "{}", dig.text);
    assert_eq!(dig.answer_data("AAAA"), Vec::<String>::new());
    assert_eq!(dig.answer_data("CNAME"), ["eu-west.edge.apps.localhost."]);
    let dig = router.dig(&["eu-west.edge.apps.localhost", "TXT"]).await;
    assert_eq!(
        (dig.status.as_str(), dig.answer.len()),
        ("NOERROR", 0),
        "{}",
        dig.text
    );
    assert_eq!(rrs(&dig.authority)[0].1, "SOA", "NODATA carries the SOA");
    let dig = router.dig(&["nope.apps.localhost", "A"]).await;
    assert_eq!(dig.status, "NXDOMAIN", "{}", dig.text);
    assert!(dig.aa(), "{}", dig.text);
    let soa = rrs(&dig.authority);
    assert_eq!(
        (soa.len(), soa[0].0, soa[0].1),
        (1, "apps.localhost.", "SOA"),
        "{}",
        dig.text
    );
    let dig = router.dig(&["apps.localhost", "SOA"]).await;
    assert_eq!(dig.answer_data("SOA").len(), 1, "{}", dig.text);
    let dig = router.dig(&["apps.localhost", "NS"]).await;
    assert_eq!(
        dig.answer_data("NS"),
        ["ns.apps.localhost."],
        "{}",
        dig.text
    );
    assert_eq!(router.a("ns.apps.localhost").await, ["127.0.0.1"]);

    // Outside the zone: refused, not authoritative.
    for name in ["example.com", "localhost", "apps.localhost.example.com"] {
        let dig = router.dig(&[name, "A"]).await;
        assert_eq!(dig.status, "REFUSED", "{name}: {}", dig.text);
        assert!(!dig.aa() && dig.answer.is_empty(), "{}", dig.text);
    }
    // A zone transfer is refused too.
    let out = dig_text(router.dns, &["apps.localhost", "AXFR"]).await;
    assert!(out.contains("Transfer failed"), "{out}");

    // Dynamic UPDATE, from Debian's nsupdate: refused, and nothing changes.
    let update = format!(
        "server {} {}\nzone apps.localhost\nupdate add evil.apps.localhost. 60 A 127.0.0.66\nsend\n",
        router.dns.ip(),
        router.dns.port()
    );
    let out = nsupdate(&update).await;
    assert!(out.contains("REFUSED"), "{out}");
    let dig = router.dig(&["evil.apps.localhost", "A"]).await;
    assert_eq!(dig.status, "NXDOMAIN", "{}", dig.text);

    // Garbage: short, random, header-only, a response, oversized
    // datagrams; a truncated TCP message; an endless TCP length prefix.
    // The authority keeps answering over both.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 11],
        vec![0; 12],
        (0..512).map(|_| fastrand::u8(..)).collect(),
        (0..65_000).map(|_| fastrand::u8(..)).collect(),
    ];
    // A header that claims 65535 questions and carries none; one with a
    // compression pointer loop as its question name.
    garbage.push(vec![0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
    garbage.push(vec![
        0x12, 0x35, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ]);
    for _ in 0..20 {
        garbage.push(
            (0..fastrand::usize(12..600))
                .map(|_| fastrand::u8(..))
                .collect(),
        );
    }
    for g in &garbage {
        udp.send_to(g, router.dns).await.unwrap();
    }
    let mut truncated = tokio::net::TcpStream::connect(router.dns).await.unwrap();
    truncated
        .write_all(&[0x01, 0x00, 0x12, 0x34, 0x01])
        .await
        .unwrap();
    drop(truncated);
    let mut hanging = tokio::net::TcpStream::connect(router.dns).await.unwrap();
    hanging.write_all(&[0xff, 0xff, 0x00]).await.unwrap();
    for transport in ["+notcp", "+tcp"] {
        let dig = router.dig(&[transport, "hello.apps.localhost", "A"]).await;
        assert_eq!(
            dig.answer.len(),
            3,
            "{transport} after garbage: {}",
            dig.text
        );
    }
    drop(hanging);
    assert!(
        router.child.child.try_wait().unwrap().is_none(),
        "the router is still running:\n{}",
        router.child.output()
    );

    // The answers are counted by rcode.
    let metrics = curl_plain(&router.metrics).await.text();
    for (rcode, at_least) in [("noerror", 10.0), ("nxdomain", 2.0), ("refused", 4.0)] {
        let n = metric_value(
            &metrics,
            &format!("portico_router_dns_queries_total{{rcode=\"{rcode}\"}}"),
        );
        assert!(n >= at_least, "{rcode}: {n}\n{metrics}");
    }
    drop(connector);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_edges_leave_the_answers_and_a_region_with_none_healthy_fails_open() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let router = Router::start(d).await;
    router.admin(&["region", "create", "eu-west"]).await;
    let mut eu1 = router.edge(d, "eu-west", "127.0.0.2", &[]).await;
    let mut eu2 = router.edge(d, "eu-west", "127.0.0.3", &[]).await;
    let _default = router.edge(d, "default", "127.0.0.4", &[]).await;
    let edge_name = "eu-west.edge.apps.localhost";
    let tunnel_name = "eu-west.tunnel.apps.localhost";
    router
        .wait_a("both eu-west edges", edge_name, &["127.0.0.2", "127.0.0.3"])
        .await;
    assert_eq!(router.a(tunnel_name).await, ["127.0.0.2", "127.0.0.3"]);

    // SIGKILL: its reports stop, and once the last one is stale (15 s) it
    // is out of both names.
    eu1.kill().await;
    router
        .wait_a("127.0.0.2 out", edge_name, &["127.0.0.3"])
        .await;
    router
        .wait_a(
            "127.0.0.2 out of the tunnel name",
            tunnel_name,
            &["127.0.0.3"],
        )
        .await;
    assert_eq!(router.a("default.edge.apps.localhost").await, ["127.0.0.4"]);

    // The last healthy edge of eu-west goes too: both are answered again.
    eu2.kill().await;
    router
        .wait_a("eu-west fails open", edge_name, &["127.0.0.2", "127.0.0.3"])
        .await;
    assert_eq!(router.a(tunnel_name).await, ["127.0.0.2", "127.0.0.3"]);
    assert_eq!(router.a("default.edge.apps.localhost").await, ["127.0.0.4"]);
    let list = router.admin(&["edge", "list"]).await;
    assert_eq!(
        list.lines().filter(|l| l.contains(" unhealthy")).count(),
        2,
        "both eu-west edges are unhealthy, as DNS saw:\n{list}"
    );
}

/// `dig` against `server` with `args`, its stdout as printed.
async fn dig_text(server: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=5", "+tries=3"])
        .args(args)
        .output()
        .await
        .expect("dig is installed (scripts/test.sh installs dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's `nsupdate` with `script` on its standard input; its output.
async fn nsupdate(script: &str) -> String {
    let mut child = tokio::process::Command::new("nsupdate")
        .arg("-t")
        .arg("10")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nsupdate is installed (scripts/test.sh installs dnsutils)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("nsupdate ends")
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
