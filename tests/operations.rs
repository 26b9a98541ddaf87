//! What an operator relies on: certificates renewed before they expire,
//! metrics and health endpoints on every process, config changes applied
//! without dropping traffic, and `portico dev` working as the README says.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{eventually, Stack};
use portico::dev::{publish, DevOptions};
use portico_agent::StateDir;
use portico_proto::GroupId;
use tokio::io::AsyncBufReadExt;

fn serial(state: &std::path::Path) -> String {
    let creds = StateDir::open(state)
        .unwrap()
        .load_credentials()
        .unwrap()
        .unwrap();
    let chain = creds.cert_chain().unwrap();
    portico_agent::pki::serial_hex(&chain[0]).unwrap()
}

/// With 12-second certificates, edge and connector renew at two thirds of
/// the life and keep serving long after their first certificates expired,
/// including over brand-new tunnels (which check both sides' certificates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_before_they_expire() {
    let s = Stack::start_with(DevOptions {
        cert_ttl: Some(Duration::from_secs(12)),
        ..DevOptions::default()
    })
    .await;
    let edge_state = s.dir.path().join("edge");
    let connector_state = s.dir.path().join("connector");
    let (edge0, conn0) = (serial(&edge_state), serial(&connector_state));
    let first_expiry = StateDir::open(&connector_state)
        .unwrap()
        .load_credentials()
        .unwrap()
        .unwrap()
        .not_after;
    eventually("both renewed", Duration::from_secs(60), || async {
        (serial(&edge_state) != edge0 && serial(&connector_state) != conn0).then_some(())
    })
    .await;
    // Past the first certificates' expiry...
    eventually(
        "the first certificates expired",
        Duration::from_secs(60),
        || async {
            (std::time::SystemTime::now() > first_expiry + Duration::from_secs(2)).then_some(())
        },
    )
    .await;
    let r = s.curl(&[&s.d.app_url()]).await;
    assert_eq!(r.status, 200);
    // ...a new connector process state from the same directory dials fresh
    // tunnels with renewed certificates on both ends.
    let Stack { d, shutdown, dir } = s;
    let cshutdown = tokio_util::sync::CancellationToken::new();
    let mut config = portico_connector::Config::new(d.router.url(), dir.path().join("connector"));
    config.tunnels = 1;
    let c2 = portico_connector::start(config, cshutdown.clone())
        .await
        .expect("restart from renewed state");
    tokio::time::timeout(Duration::from_secs(30), c2.wait_tunnels(1))
        .await
        .expect("a new tunnel with renewed certificates");
    cshutdown.cancel();
    let _ = c2.wait().await;
    let s = Stack { d, shutdown, dir };
    s.stop().await;
}

async fn get(url: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", url])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_metrics_health_and_readiness() {
    let s = Stack::start().await;
    let r = s.curl(&[&s.d.app_url()]).await;
    assert_eq!(r.status, 200);
    let endpoints = [
        (
            "router",
            s.d.router.metrics_addr.unwrap(),
            vec![
                "portico_router_config_version",
                "portico_router_api_requests_total",
            ],
        ),
        (
            "edge",
            s.d.edge.metrics_addr.unwrap(),
            vec![
                "portico_edge_requests_total",
                "portico_edge_request_duration_seconds_bucket",
                "portico_edge_tunnels",
                "portico_edge_streams",
                "portico_edge_bytes_total",
            ],
        ),
        (
            "connector",
            s.d.connector.metrics_addr.unwrap(),
            vec![
                "portico_connector_requests_total",
                "portico_connector_tunnels",
                "portico_connector_streams",
                "portico_connector_bytes_total",
            ],
        ),
    ];
    for (who, addr, names) in endpoints {
        let (code, body) = get(&format!("http://{addr}/metrics")).await;
        assert_eq!(code, 200, "{who} /metrics");
        for name in names {
            assert!(body.contains(name), "{who} /metrics lacks {name}:\n{body}");
        }
        assert_eq!(
            get(&format!("http://{addr}/healthz")).await.0,
            200,
            "{who} /healthz"
        );
        assert_eq!(
            get(&format!("http://{addr}/ready")).await.0,
            200,
            "{who} /ready"
        );
    }
    let (_, body) = get(&format!(
        "http://{}/metrics",
        s.d.edge.metrics_addr.unwrap()
    ))
    .await;
    assert!(
        body.lines()
            .any(|l| l.starts_with("portico_edge_requests_total")
                && l.contains("app=\"hello\"")
                && l.contains("status=\"200\"")),
        "requests are counted by app and status:\n{body}"
    );
    s.stop().await;
}

/// Apps come and go while traffic flows: no request to the existing app
/// fails, and each new app becomes reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_apply_without_dropping_traffic() {
    let s = Stack::start().await;
    let url = s.d.app_url();
    let ca = s.d.ca_path();
    let traffic = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..60 {
            statuses.push(common::curl(&ca, &[&url]).await.status);
        }
        statuses
    });
    for i in 0..10 {
        let id = format!("app{i}");
        publish(
            &s.d.admin,
            &id,
            &format!("http://{}/", s.d.demo.addr),
            GroupId::default_group(),
        )
        .await
        .unwrap();
        eventually(
            &format!("{id} is routed"),
            Duration::from_secs(10),
            || async { (s.curl(&[&s.app_url(&id, "/headers")]).await.status == 200).then_some(()) },
        )
        .await;
        if i % 2 == 0 {
            s.d.admin.delete(&format!("/v1/apps/{id}")).await.unwrap();
        }
    }
    let statuses = traffic.await.unwrap();
    assert!(statuses.iter().all(|&c| c == 200), "{statuses:?}");
    s.stop().await;
}

/// `portico dev`, as the README tells a new user to run it: the printed curl
/// line works, the printed dig line shows the DNS chain, and Ctrl-C
/// (SIGINT) stops everything cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portico_dev_prints_working_curl_and_dig_lines_and_stops_on_ctrl_c() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["dev", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (curl_line, dig_line) = tokio::time::timeout(Duration::from_secs(120), async {
        let mut curl = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(cmd) = line.trim().strip_prefix("Try it:") {
                curl = Some(cmd.trim().to_owned());
            }
            if let Some(cmd) = line.trim().strip_prefix("DNS:") {
                let curl = curl.expect("the curl line comes first");
                return (curl, cmd.trim().to_owned());
            }
        }
        panic!("portico dev exited without printing a curl and a dig line");
    })
    .await
    .expect("portico dev starts");
    assert!(curl_line.starts_with("curl --cacert "), "{curl_line}");
    let args: Vec<&str> = curl_line.split_whitespace().skip(1).collect();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(&args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hello from behind the tunnel"));

    // The dig line shows the chain: the demo app's host, a CNAME to the
    // edge's region (`default`), then the edge's loopback address.
    let args: Vec<&str> = dig_line.split_whitespace().collect();
    assert_eq!(args.len(), 6, "{dig_line}");
    assert_eq!(
        [args[0], args[1], args[2], args[4], args[5]],
        ["dig", "@127.0.0.1", "-p", "hello.apps.localhost", "A"],
        "{dig_line}"
    );
    assert!(args[3].parse::<u16>().is_ok_and(|p| p != 0), "{dig_line}");
    let dig = common::dig_raw(&args[1..]).await;
    assert_eq!(dig.status, "NOERROR", "{}", dig.text);
    assert_eq!(
        dig.answer
            .iter()
            .map(|r| (r.name.as_str(), r.rtype.as_str(), r.data.as_str()))
            .collect::<Vec<_>>(),
        [
            (
                "hello.apps.localhost.",
                "CNAME",
                "default.edge.apps.localhost."
            ),
            ("default.edge.apps.localhost.", "A", "127.0.0.1"),
        ],
        "{}",
        dig.text
    );

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("portico dev stops after Ctrl-C")
        .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
}
