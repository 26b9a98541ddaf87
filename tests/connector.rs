//! The connector's guards at the last hop before a backend, end to end
//! through a real edge: dot segments never leave an app's published path
//! prefix (a real `python3 -m http.server` that would serve a file outside
//! it, over HTTP/1.1, HTTP/2 and HTTP/3), and a backend that never answers
//! takes no more than its app's cap of connections while the connector's
//! other apps and its metrics keep answering.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, metric_value, PyHttpServer, Stack};
use portico_loadtest::h3::{H3Client, Trust};
use portico_proto::api::{AppSpec, BackendTimeout, TokenScope};
use portico_proto::AppId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const HANG_GUARD: Duration = Duration::from_secs(60);

/// Paths that climb above the app's root, literally or in the forms
/// backends decode (`%2e` dots, `%2f` and `%5c` separators).
const ESCAPES: [&str; 11] = [
    "/../secret",
    "/%2e%2e/secret",
    "/%2E%2e/secret",
    "/..%2fsecret",
    "/..%5csecret",
    "/a/../../secret",
    "/.%2e/secret",
    "/sub/..%2F..%2Fsecret",
    "/%2e%2e%5csecret?x=1",
    "/..\\secret",
    "/..;x/secret",
];

/// Paths whose dot segments stay inside the prefix, and the file each
/// names.
const INSIDE: [(&str, &str); 5] = [
    ("/sub/../file", "inside file"),
    ("/sub/%2e%2e/file", "inside file"),
    ("/./file", "inside file"),
    ("/sub/./nested", "nested file"),
    ("/a/b/../../sub/nested?q=%2e%2e", "nested file"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_never_leave_the_published_prefix() {
    let s = Stack::start().await;
    let secret = format!("TOP-SECRET-{:016x}", fastrand::u64(..));
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("secret"), &secret).unwrap();
    std::fs::create_dir_all(root.path().join("prefix/sub")).unwrap();
    std::fs::write(root.path().join("prefix/file"), "inside file").unwrap();
    std::fs::write(root.path().join("prefix/sub/nested"), "nested file").unwrap();
    let py = PyHttpServer::start(root.path()).await;
    // The python server really serves the secret to whoever asks it.
    let direct = common::curl_plain(&format!("http://{}/secret", py.addr)).await;
    assert_eq!(direct.status, 200);
    assert_eq!(direct.text(), secret);

    portico::dev::publish(
        &s.d.admin,
        "files",
        &format!("http://{}/prefix/", py.addr),
        portico_proto::GroupId::default_group(),
    )
    .await
    .unwrap();
    let host = "files.apps.localhost";
    eventually("the edge routes files", HANG_GUARD, || async {
        let r = s.curl(&[&s.app_url("files", "/file")]).await;
        (r.status == 200).then_some(())
    })
    .await;

    let tracker = TaskTracker::new();
    let h3 = H3Client::connect(
        s.d.edge.h3_addr.expect("the dev edge serves HTTP/3"),
        host,
        Trust::ca_pem(&s.d.router.ca_pem).unwrap(),
        &tracker,
    )
    .await
    .expect("HTTP/3 connection to the edge");

    let mut refused = 0u32;
    for path in ESCAPES {
        for flag in ["--http1.1", "--http2"] {
            let r = s
                .curl(&[flag, "--path-as-is", &s.app_url("files", path)])
                .await;
            assert_eq!(r.status, 400, "{flag} {path}: {}", r.text());
            assert_eq!(
                r.header("x-portico-error").as_deref(),
                Some("PathOutsidePrefix"),
                "{flag} {path}: {}",
                r.headers
            );
            assert!(!r.text().contains(&secret), "{flag} {path} leaked");
            refused += 1;
        }
        // JSON for a client that prefers it, over HTTP/2.
        let r = s
            .curl(&[
                "--http2",
                "--path-as-is",
                "-H",
                "accept: application/json",
                &s.app_url("files", path),
            ])
            .await;
        assert_eq!(r.status, 400, "json {path}");
        let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(doc["error"], "PathOutsidePrefix", "{path}: {doc}");
        assert_eq!(doc["status"], 400);
        refused += 1;

        let req = http::Request::get(format!("https://{host}{path}"))
            .body(Bytes::new())
            .unwrap();
        assert_eq!(req.uri().path_and_query().unwrap().as_str(), path);
        let r = h3.request(req).await.expect("HTTP/3 answer");
        assert_eq!(r.status(), 400, "h3 {path}");
        assert_eq!(
            r.headers()["x-portico-error"],
            "PathOutsidePrefix",
            "h3 {path}"
        );
        assert!(
            !String::from_utf8_lossy(r.body()).contains(&secret),
            "h3 {path} leaked"
        );
        refused += 1;
    }

    // Dot segments that stay inside are removed, and the request served.
    for (path, want) in INSIDE {
        for flag in ["--http1.1", "--http2"] {
            let r = s
                .curl(&[flag, "--path-as-is", &s.app_url("files", path)])
                .await;
            assert_eq!(r.status, 200, "{flag} {path}: {}", r.text());
            assert_eq!(r.text(), want, "{flag} {path}");
        }
        let req = http::Request::get(format!("https://{host}{path}"))
            .body(Bytes::new())
            .unwrap();
        let r = h3.request(req).await.expect("HTTP/3 answer");
        assert_eq!(r.status(), 200, "h3 {path}");
        assert_eq!(r.body().as_ref(), want.as_bytes(), "h3 {path}");
    }

    // The backend never saw a refused request: its access log (everything
    // up to a sentinel asked for last, straight from the server) names no
    // path that reached above the prefix and nothing about the secret.
    let sentinel = format!("/sentinel-{:x}", fastrand::u64(..));
    common::curl_plain(&format!("http://{}{sentinel}", py.addr)).await;
    let log = eventually("the sentinel in the access log", HANG_GUARD, || {
        let log = py.access_log();
        let seen = log.contains(&sentinel);
        async move { seen.then_some(log) }
    })
    .await;
    let requests: Vec<&str> = log.lines().filter_map(|l| l.split('"').nth(1)).collect();
    let through_portico: Vec<&&str> = requests.iter().filter(|r| r.contains("/prefix/")).collect();
    assert!(
        through_portico.len() >= INSIDE.len() * 3,
        "the inside requests reached the backend: {log}"
    );
    for r in &requests {
        let path = r.split(' ').nth(1).unwrap_or("");
        assert!(
            path == "/secret" || path == sentinel || path.starts_with("/prefix/"),
            "a request outside the prefix reached the backend: {r}\n{log}"
        );
        if path.starts_with("/prefix/") {
            let lower = path.split('?').next().unwrap_or("").to_ascii_lowercase();
            assert!(
                !lower.contains("..") && !lower.contains("%2e") && !lower.contains("secret"),
                "a dot segment or the secret reached the backend: {r}\n{log}"
            );
        }
    }
    assert_eq!(
        requests.iter().filter(|r| r.contains("secret")).count(),
        1,
        "only the direct request asked for the secret: {log}"
    );

    // The connector counted every refusal.
    let addr =
        s.d.connector
            .metrics_addr
            .expect("dev connector serves metrics");
    let metrics = common::curl_plain(&format!("http://{addr}/metrics"))
        .await
        .text();
    assert_eq!(
        metric_value(
            &metrics,
            r#"portico_connector_requests_total{app="files",code="PathOutsidePrefix",status="400"}"#
        ),
        f64::from(refused),
        "{metrics}"
    );

    s.stop_with_h3(h3, tracker).await;
    py.stop().await;
}

/// A backend that accepts connections, reads what comes and never answers:
/// the hostile backend of issue 9. Counts its connections open now, the
/// most ever open at once, and all it accepted.
struct Hostile {
    addr: SocketAddr,
    open: Arc<AtomicU64>,
    max: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

async fn hostile_backend() -> Hostile {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = Hostile {
        addr,
        open: Arc::default(),
        max: Arc::default(),
        accepted: Arc::default(),
    };
    let (open, max, accepted) = (h.open.clone(), h.max.clone(), h.accepted.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            max.fetch_max(open.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            let open = open.clone();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut tcp, &mut tokio::io::sink()).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    h
}

const CAP: u64 = 8;
const REQUESTS: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_takes_only_its_apps_cap() {
    let s = Stack::start().await;
    // A connector of its own group, with a small cap per app.
    let group = s.create_group("capped").await;
    let token = portico::dev::create_token(
        &s.d.admin,
        TokenScope::Connector {
            group: group.clone(),
        },
    )
    .await
    .unwrap();
    let mut config = portico_connector::Config::new(s.d.router.url(), s.dir.path().join("capped"));
    config.token = Some(token);
    config.tunnels = 2;
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.max_backend_connections_per_app = Some(CAP as usize);
    config.backend_connection_wait = Duration::from_secs(1);
    let stop = CancellationToken::new();
    let connector = portico_connector::start(config, stop.clone())
        .await
        .unwrap();
    connector.wait_tunnels(2).await;
    let metrics_url = format!("http://{}/metrics", connector.metrics_addr.unwrap());

    let hostile = hostile_backend().await;
    for (id, url) in [
        ("stuck", format!("http://{}/", hostile.addr)),
        ("healthy", format!("http://{}/", s.d.demo.addr)),
    ] {
        let spec = AppSpec {
            connector_group: group.clone(),
            backend_timeout: BackendTimeout::Seconds(15),
            ..AppSpec::new(AppId::new(id).unwrap(), url)
        };
        let _: portico_proto::api::App = s.d.admin.post_json("/v1/apps", &spec).await.unwrap();
    }
    eventually("the edge routes healthy", HANG_GUARD, || async {
        let r = s.curl(&[&s.app_url("healthy", "/")]).await;
        (r.status == 200).then_some(())
    })
    .await;

    // 500 requests at once, over ten HTTP/2 connections.
    let mut senders = Vec::new();
    for _ in 0..10 {
        senders.push(common::h2_connection(&s, "stuck.apps.localhost").await);
    }
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let mut sender = senders[i as usize % senders.len()].clone();
        let uri = format!("https://stuck.apps.localhost:{}/r{i}", s.port());
        requests.spawn(async move {
            sender.ready().await.expect("connection usable");
            let req = http::Request::get(uri)
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.expect("an answer");
            let code = resp
                .headers()
                .get("x-portico-error")
                .map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), code)
        });
    }

    // The connector holds its cap of connections to the stuck backend...
    eventually("the cap of connections is open", HANG_GUARD, || async {
        (hostile.open.load(Ordering::SeqCst) == CAP).then_some(())
    })
    .await;
    let gauge = r#"portico_connector_backend_connections{app="stuck"}"#;
    eventually("the connector's gauge shows the cap", HANG_GUARD, || {
        let url = metrics_url.clone();
        async move {
            let m = common::curl_plain(&url).await;
            (m.status == 200 && metric_value(&m.text(), gauge) == CAP as f64).then_some(())
        }
    })
    .await;
    // ...while its other app answers and its metrics answer.
    for _ in 0..20 {
        let r = s.curl(&["--http1.1", &s.app_url("healthy", "/")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("Hello from behind the tunnel"));
        let m = common::curl_plain(&metrics_url).await;
        assert_eq!(m.status, 200);
        assert!(metric_value(&m.text(), gauge) <= CAP as f64, "{}", m.text());
    }

    // Every request beyond the cap got BackendBusy; those that had a
    // connection waited for the app's timeout.
    let (mut busy, mut timed_out) = (0u64, 0u64);
    while let Some(r) = requests.join_next().await {
        match r.unwrap() {
            (503, Some(code)) if code == "BackendBusy" => busy += 1,
            (504, Some(code)) if code == "BackendTimeout" => timed_out += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(busy + timed_out, REQUESTS);
    assert_eq!(
        hostile.max.load(Ordering::SeqCst),
        CAP,
        "never more than the cap open"
    );
    assert_eq!(
        timed_out,
        hostile.accepted.load(Ordering::SeqCst),
        "each connection carried one request"
    );
    assert!(
        busy >= REQUESTS - 2 * CAP,
        "busy {busy}, timed out {timed_out}"
    );
    // The connector answered each of those at least once (the edge retries
    // a BackendBusy, which reached no backend, on the group's other tunnel).
    let m = common::curl_plain(&metrics_url).await.text();
    assert!(
        metric_value(
            &m,
            r#"portico_connector_requests_total{app="stuck",code="BackendBusy",status="503"}"#
        ) >= busy as f64,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            r#"portico_connector_backend_connection_waits_total{app="stuck",outcome="busy"}"#
        ) >= busy as f64,
        "{m}"
    );

    stop.cancel();
    connector.wait().await.unwrap();
    s.stop().await;
}
