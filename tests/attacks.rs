//! A real edge process attacked as the issue's findings describe: clients
//! that stop reading, header tricklers, HTTP/2 rapid reset, and one client
//! holding every connection at a low open-file limit. Each test fails on
//! the build before the fix (the findings' measurements) and passes after.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{curl_plain, eventually, metric_value, Child, Stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A second edge, a real `portico edge` process, enrolled with the stack's
/// router; the stack's connector opens a tunnel to it too.
struct ProcEdge {
    child: Child,
    public: SocketAddr,
    metrics: SocketAddr,
}

impl ProcEdge {
    async fn start(s: &Stack, extra: &[&str]) -> ProcEdge {
        ProcEdge::start_with(s, None, extra).await
    }

    /// With `nofile`, under `prlimit --nofile=N` (soft and hard).
    async fn start_with(s: &Stack, nofile: Option<u64>, extra: &[&str]) -> ProcEdge {
        let token = portico::dev::create_token(
            &s.d.admin,
            portico_proto::api::TokenScope::Edge {
                region: portico_proto::RegionId::default_region(),
            },
        )
        .await
        .unwrap();
        let state = s.dir.path().join(format!("edge-{}", fastrand::u32(..)));
        let mut args: Vec<String> = [
            "edge",
            "--router",
            &s.d.router.url(),
            "--state",
            state.to_str().unwrap(),
            "--token",
            &token,
            "--public-listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-http3",
            "--log-format",
            "json",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = tokio::process::Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(common::BIN);
                c
            }
            None => tokio::process::Command::new(common::BIN),
        };
        cmd.args(&args);
        let mut child = Child::spawn_cmd(cmd);
        let line = child
            .line_starting("listening ", Duration::from_secs(60))
            .await;
        let public = Child::field(&line, "public").unwrap().parse().unwrap();
        let metrics = Child::field(&line, "metrics")
            .and_then(|m| m.strip_prefix("http://"))
            .unwrap()
            .parse()
            .unwrap();
        let edge = ProcEdge {
            child,
            public,
            metrics,
        };
        eventually(
            "the connector to open a tunnel to the new edge",
            Duration::from_secs(60),
            || async { (edge.metric("portico_edge_tunnels").await >= 1.0).then_some(()) },
        )
        .await;
        edge
    }

    async fn metrics_text(&self) -> String {
        curl_plain(&format!("http://{}/metrics", self.metrics))
            .await
            .text()
    }

    async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics_text().await, series)
    }

    fn url(&self, path: &str) -> String {
        format!("https://hello.apps.localhost:{}{path}", self.public.port())
    }

    /// The edge process's resident set size, in bytes.
    fn rss(&self) -> u64 {
        common::rss_of(self.child.child.id().unwrap())
    }

    /// The edge's access-log lines (JSON), with `status`.
    fn access_lines(&self, status: u64) -> usize {
        self.child
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "portico::access" && v["status"] == status)
            .count()
    }
}

/// curl for many URLs on one connection: the status of each.
async fn curl_statuses(s: &Stack, extra: &[&str], urls: &[String]) -> Vec<u16> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "120", "--cacert"])
        .arg(s.d.ca_path())
        .args(extra)
        .args(["-o", "/dev/null", "-w", "%{http_code}\\n"])
        .args(urls)
        .output()
        .await
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn tls_config(s: &Stack, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read_to_string(s.d.ca_path()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(portico_agent::pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(portico_agent::pki::root_store(&pem).unwrap())
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(tls)
}

async fn tls_connect(
    tls: &Arc<rustls::ClientConfig>,
    local: &str,
    to: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse().unwrap())?;
    let tcp = socket.connect(to).await?;
    tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("hello.apps.localhost").unwrap(),
            tcp,
        )
        .await
}

/// Reads until the edge closes the connection; the bytes read.
async fn read_to_close(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(120), io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return n,
            Ok(Ok(k)) => n += k as u64,
            Err(_) => panic!("the edge never closed the connection"),
        }
    }
}

/// Finding 1: five HTTP/1.1 clients that never read and one HTTP/2 client
/// that grants no window hold ten 20 MiB downloads on the edge's tunnel;
/// 200 other requests on that tunnel all succeed meanwhile, the stalled
/// downloads are reset after the stall time, and the edge's memory stays
/// bounded. Before the fix, four such streams filled the 32 MiB tunnel
/// window and every other request timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_downloads_hold_no_tunnel_hostage() {
    let s = Stack::start().await;
    let edge = ProcEdge::start(
        &s,
        &["--stall-timeout", "6s", "--max-stalled-per-client", "16"],
    )
    .await;
    let warm: Vec<String> = (0..20).map(|i| edge.url(&format!("/?warm={i}"))).collect();
    assert!(curl_statuses(&s, &[], &warm)
        .await
        .iter()
        .all(|&c| c == 200));
    let base = edge.rss();

    let big = "/bytes/20971520";
    let h1 = tls_config(&s, b"http/1.1");
    let mut readers = Vec::new();
    for _ in 0..5 {
        let mut t = tls_connect(&h1, "127.0.0.1", edge.public).await.unwrap();
        t.write_all(format!("GET {big} HTTP/1.1\r\nhost: hello.apps.localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        readers.push(t);
    }
    let h2tls = tls_connect(&tls_config(&s, b"h2"), "127.0.0.1", edge.public)
        .await
        .unwrap();
    let (h2, h2conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(h2tls)
        .await
        .unwrap();
    tokio::spawn(h2conn);
    let mut h2 = h2.ready().await.unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        let req = http::Request::get(edge.url(big)).body(()).unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        held.push(resp);
        h2 = h2.ready().await.unwrap();
    }
    eventually("ten stalled downloads", Duration::from_secs(60), || async {
        (edge.metric("portico_edge_streams").await >= 10.0).then_some(())
    })
    .await;

    let urls: Vec<String> = (0..100).map(|i| edge.url(&format!("/?n={i}"))).collect();
    let h1_codes = curl_statuses(&s, &["--http1.1"], &urls).await;
    let h2_codes = curl_statuses(&s, &["--http2"], &urls).await;
    assert_eq!(h1_codes.len() + h2_codes.len(), 200);
    assert!(
        h1_codes.iter().chain(&h2_codes).all(|&c| c == 200),
        "every request answered while ten downloads stall: {h1_codes:?} {h2_codes:?}"
    );
    let during = edge.rss();
    assert!(
        during < base + (64 << 20),
        "edge memory bounded: {} MiB before, {} MiB with ten stalled downloads",
        base >> 20,
        during >> 20
    );

    eventually(
        "the stalled downloads to be reset",
        Duration::from_secs(90),
        || async {
            let m = edge.metrics_text().await;
            (metric_value(
                &m,
                r#"portico_edge_stalled_responses_total{reason="timeout"}"#,
            ) >= 10.0)
                .then_some(())
        },
    )
    .await;
    // Each HTTP/1.1 download ends short of its 20 MiB, and its connection
    // closes; the HTTP/2 streams have released their tunnel streams.
    for r in &mut readers {
        assert!(read_to_close(r).await < 20 << 20);
    }
    eventually(
        "the tunnel streams released",
        Duration::from_secs(30),
        || async { (edge.metric("portico_edge_streams").await == 0.0).then_some(()) },
    )
    .await;
    let m = edge.metrics_text().await;
    assert_eq!(
        metric_value(
            &m,
            r#"portico_edge_requests_total{app="hello",code="ClientStalled",status="200"}"#
        ),
        10.0,
        "{m}"
    );
    drop((readers, held));
    s.stop().await;
}

/// Finding 3: 2,000 connections that trickle a request head a byte at a
/// time are closed at the header-read timeout, and a normal request gets
/// 200 during the attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_request_heads_are_cut_at_the_header_timeout() {
    portico_agent::nofile::raise().unwrap();
    assert!(
        portico_agent::nofile::soft_limit() > 4500,
        "this test needs 2,000 connections at both ends: raise the open-file limit"
    );
    let s = Stack::start().await;
    let edge = ProcEdge::start(
        &s,
        &[
            "--header-read-timeout",
            "3s",
            "--max-connections-per-client",
            "5000",
        ],
    )
    .await;
    let tls = tls_config(&s, b"http/1.1");
    let closed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let opened = Arc::new(AtomicU64::new(0));
    for i in 0..2000u32 {
        // Spread over a few loopback addresses, as a botnet would be.
        let local = format!("127.0.1.{}", 1 + i % 8);
        let tls = Arc::clone(&tls);
        let to = edge.public;
        let closed = Arc::clone(&closed);
        let connected = Arc::clone(&opened);
        tasks.spawn(async move {
            let mut t = tls_connect(&tls, &local, to).await.expect("connects");
            connected.fetch_add(1, Ordering::Relaxed);
            // On a loaded machine the header deadline (which runs from the
            // accept) may pass before this first write: closed all the same.
            if t.write_all(b"GET / HTTP/1.1\r\nhost: hello.apps.localhost\r\nx-slow: ")
                .await
                .is_err()
            {
                closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // One byte every 500 ms, never the end of the head.
            let mut probe = [0u8; 1];
            for _ in 0..600 {
                tokio::select! {
                    r = t.read(&mut probe) => {
                        if matches!(r, Ok(0) | Err(_)) {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        if t.write_all(b"a").await.is_err() {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
            panic!("still open after five minutes of trickling");
        });
        if i % 200 == 199 {
            let want = u64::from(i) + 1;
            eventually("the tricklers to connect", Duration::from_secs(120), || {
                let opened = Arc::clone(&opened);
                async move { (opened.load(Ordering::Relaxed) >= want).then_some(()) }
            })
            .await;
        }
    }
    // During the attack, a user is served.
    let codes = curl_statuses(&s, &[], &[edge.url("/")]).await;
    assert_eq!(codes, [200]);
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(closed.load(Ordering::Relaxed), 2000);
    let m = edge.metrics_text().await;
    assert!(
        metric_value(
            &m,
            r#"portico_edge_connection_closes_total{reason="header_timeout"}"#
        ) >= 2000.0,
        "{m}"
    );
    s.stop().await;
}

/// A backend that counts its requests and answers each after `delay`.
async fn counting_backend(delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    seen.fetch_add(1, Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"ok")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

/// Finding 6: HTTP/2 rapid reset over several connections. Every request
/// the client resets after the edge accepted it is counted in the metrics
/// and the access log, as 499 ClientClosed, and charged to the client's
/// cancel budget; once that is spent its connections are closed, so the
/// backend sees a bounded number of requests. Before the fix one
/// connection produced ~2,900 backend requests in 1.6 s, none recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_bounded_and_every_reset_is_recorded() {
    let s = Stack::start().await;
    let (backend, seen) = counting_backend(Duration::from_millis(200)).await;
    portico::dev::publish(
        &s.d.admin,
        "count",
        &format!("http://{backend}/"),
        portico_proto::GroupId::default_group(),
    )
    .await
    .unwrap();
    let edge = ProcEdge::start(
        &s,
        &["--client-reset-burst", "100", "--client-reset-rate", "10"],
    )
    .await;
    let url = format!("https://count.apps.localhost:{}/r", edge.public.port());
    eventually("the app to be routed", Duration::from_secs(30), || {
        let s = &s;
        let url = url.clone();
        async move { (curl_statuses(s, &[], &[url]).await == [200]).then_some(()) }
    })
    .await;
    let before = seen.load(Ordering::Relaxed);

    let tls = tls_config(&s, b"h2");
    let attempted = Arc::new(AtomicU64::new(0));
    let mut conns = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let tls = Arc::clone(&tls);
        let to = edge.public;
        let url = url.clone();
        let attempted = Arc::clone(&attempted);
        conns.spawn(async move {
            let Ok(t) = tls_connect(&tls, "127.0.0.1", to).await else {
                return;
            };
            let Ok((h2, conn)) = h2::client::handshake(t).await else {
                return;
            };
            tokio::spawn(conn);
            let mut h2 = h2;
            for _ in 0..1000 {
                let Ok(ready) = h2.clone().ready().await else {
                    return;
                };
                h2 = ready;
                let req = http::Request::get(url.as_str()).body(()).unwrap();
                let Ok((resp, _)) = h2.send_request(req, true) else {
                    return;
                };
                attempted.fetch_add(1, Ordering::Relaxed);
                // Give the edge a moment to accept it (and send it on),
                // then cancel: dropping the response resets the stream.
                let _ = tokio::time::timeout(Duration::from_millis(2), resp).await;
            }
        });
    }
    while conns.join_next().await.is_some() {}
    let attempted = attempted.load(Ordering::Relaxed);
    // Whatever reached the connector has ended.
    eventually(
        "the tunnel streams to end",
        Duration::from_secs(30),
        || async { (edge.metric("portico_edge_streams").await == 0.0).then_some(()) },
    )
    .await;
    let reached = seen.load(Ordering::Relaxed) - before;
    let m = edge.metrics_text().await;
    let cancelled = metric_value(
        &m,
        r#"portico_edge_requests_total{app="count",code="ClientClosed",status="499"}"#,
    );
    assert!(
        metric_value(
            &m,
            r#"portico_edge_connection_closes_total{reason="resets"}"#
        ) >= 1.0,
        "the client's connections were closed once its budget was spent:\n{m}"
    );
    assert!(
        reached < 800,
        "the backend saw {reached} requests of {attempted} reset ones"
    );
    assert!(cancelled >= 1.0, "{m}");
    eventually(
        "the access log to carry every cancel",
        Duration::from_secs(10),
        || async { (edge.access_lines(499) as f64 == cancelled).then_some(()) },
    )
    .await;
    // A user from the same address is still served afterwards.
    assert_eq!(
        curl_statuses(&s, &[], std::slice::from_ref(&url)).await,
        [200]
    );
    s.stop().await;
}

/// Finding 3 again, at a soft open-file limit of ~1,000: one client holding
/// a thousand idle connections used to lock every new user out. Now the
/// per-client cap refuses that client's surplus, another client is served,
/// and the edge does not flood its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_connection_at_a_low_fd_limit() {
    portico_agent::nofile::raise().unwrap();
    let s = Stack::start().await;
    let edge = ProcEdge::start_with(&s, Some(1300), &[]).await;
    let tls = tls_config(&s, b"http/1.1");
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..1000 {
        match tls_connect(&tls, "127.0.0.1", edge.public).await {
            Ok(t) => held.push(t),
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 900, "refused {refused} of 1,000 from one client");
    // Another client address still gets in and is served.
    let codes = curl_statuses(&s, &["--interface", "127.0.0.2"], &[edge.url("/")]).await;
    assert_eq!(codes, [200]);
    let m = edge.metrics_text().await;
    assert!(
        metric_value(
            &m,
            r#"portico_edge_connections_refused_total{cap="per_client"}"#
        ) >= f64::from(refused),
        "{m}"
    );
    let accept_failures = edge
        .child
        .output()
        .lines()
        .filter(|l| l.contains("public accept failing"))
        .count();
    assert!(accept_failures <= 1, "{}", edge.child.output());
    drop(held);
    s.stop().await;
}
