//! Requests through edge → tunnel → connector → backend, with the real curl
//! binary over HTTP/1.1 and HTTP/2, WebSockets, many concurrent requests,
//! and 256 MiB bodies both ways with bounded memory.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::{metric_value, rss_bytes, Stack};
use portico::demo::pattern_byte;
use portico::dev::DevOptions;

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fastrand::fill(&mut v);
    v
}

fn sha256_hex(data: &[u8]) -> String {
    portico_agent::pki::sha256_hex(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_get_and_post_over_http1_and_http2_are_byte_exact() {
    let s = Stack::start().await;
    let url = s.d.app_url();
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let r = s.curl(&[flag, &url]).await;
        assert_eq!(r.status, 200, "{flag}: {}", r.text());
        assert_eq!(r.http_version, version);
        assert!(r.text().contains("Hello from behind the tunnel"));
        assert!(r
            .header("x-portico-request-id")
            .is_some_and(|id| id.len() == 32));

        // A body with every byte value, posted and echoed back byte-exact.
        let payload = random_bytes(3 * 1024 * 1024 + 17);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("payload");
        std::fs::write(&file, &payload).unwrap();
        let data = format!("@{}", file.display());
        let r = s
            .curl(&[
                flag,
                "-X",
                "POST",
                "-H",
                "content-type: application/octet-stream",
                "--data-binary",
                &data,
                &s.app_url("hello", "/echo"),
            ])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.http_version, version);
        assert_eq!(r.body.len(), payload.len());
        assert!(r.body == payload, "{flag}: echoed body differs");
    }
    s.stop().await;
}

/// A client that comes back resumes its TLS session, and the edge counts
/// it. curl fetches one URL twice in one run over two connections
/// (`Connection: close`); the second presents the ticket the edge issued on
/// the first. Resumption spares the edge the certificate and its signature,
/// the biggest cost of a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_client_resumes_its_tls_session() {
    let s = Stack::start().await;
    let url = s.d.app_url();
    let count = |m: &str, result: &str| {
        metric_value(
            m,
            &format!("portico_edge_tls_handshakes_total{{result=\"{result}\"}}"),
        )
    };
    let before = s.edge_metrics().await;
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "60", "--cacert"])
        .arg(s.d.ca_path())
        .args([
            "-H",
            "Connection: close",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code} %{num_connects}\n", &url, &url])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "200 1\n200 1\n",
        "two requests, each on a new connection; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = s.edge_metrics().await;
    assert_eq!(
        count(&after, "full") - count(&before, "full"),
        1.0,
        "{after}"
    );
    assert_eq!(
        count(&after, "resumed") - count(&before, "resumed"),
        1.0,
        "{after}"
    );
    assert_eq!(count(&after, "failed"), count(&before, "failed"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_id_reach_the_backend() {
    let s = Stack::start().await;
    let r = s
        .curl(&[
            "-H",
            "x-forwarded-for: 203.0.113.7",
            "-H",
            "x-portico-user: mallory",
            &s.app_url("hello", "/headers"),
        ])
        .await;
    assert_eq!(r.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let h = &doc["headers"];
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.7, 127.0.0.1", "{doc}");
    assert_eq!(h["x-forwarded-proto"][0], "https");
    assert_eq!(
        h["x-forwarded-host"][0].as_str().unwrap(),
        format!("hello.apps.localhost:{}", s.port())
    );
    assert!(
        h.get("x-portico-user").is_none(),
        "client-sent identity header must be stripped: {doc}"
    );
    assert_eq!(
        h["x-request-id"][0].as_str().unwrap(),
        r.header("x-portico-request-id").unwrap()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_over_one_tunnel() {
    let s = Stack::start_with(DevOptions {
        connector_tunnels: 1,
        ..DevOptions::default()
    })
    .await;
    assert_eq!(s.d.edge.tunnel_count(), 1);
    // Five HTTP/2 connections of 200 streams each: all 1,000 requests can be
    // in flight at once, and all of them share the one tunnel.
    let mut senders = Vec::new();
    for _ in 0..5 {
        senders.push(common::h2_connection(&s, "hello.apps.localhost").await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let mut sender = senders[i as usize % senders.len()].clone();
        let barrier = barrier.clone();
        let uri = format!(
            "https://hello.apps.localhost:{}/bytes/{}",
            s.port(),
            1000 + i
        );
        tasks.spawn(async move {
            barrier.wait().await;
            sender.ready().await.expect("connection usable");
            let req = http::Request::get(uri)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.expect("request completes");
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            (i, status, body)
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let (i, status, body) = r.unwrap();
        assert_eq!(status, 200, "request {i}");
        let expected: Vec<u8> = (0..u64::from(1000 + i)).map(pattern_byte).collect();
        assert!(body == expected, "request {i}: body differs");
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(s.d.edge.tunnel_count(), 1, "all of it went over one tunnel");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_tunnel() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let s = Stack::start().await;
    let roots = portico_agent::pki::root_store(&s.d.router.ca_pem).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(portico_agent::pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // WebSocket upgrades are HTTP/1.1: offer only that.
    let tcp = tokio::net::TcpStream::connect(s.d.edge.public_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("hello.apps.localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let url = format!("wss://hello.apps.localhost:{}/ws", s.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("upgrade through the tunnel");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("message {i} {}", "x".repeat(i * 1000));
        ws.send(Message::text(text.clone())).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo, Message::text(text));
    }
    let blob = random_bytes(1 << 20);
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();
    s.stop().await;
}

/// 256 MiB up and 256 MiB down, streamed; this whole process (edge,
/// connector, router, backend) must not grow by 64 MiB or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarter_gigabyte_bodies_stream_with_bounded_memory() {
    const SIZE: u64 = 256 << 20;
    const BOUND: u64 = 64 << 20;
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();

    // The upload file, written in chunks, and its digest.
    let up = dir.path().join("up");
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&up).unwrap());
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..(SIZE >> 20) {
            fastrand::fill(&mut chunk);
            digest.update(&chunk);
            f.write_all(&chunk).unwrap();
        }
    }
    let expected = sha256_hex_of(digest);

    // Warm up, then measure the peak RSS while the transfers run.
    let r = s.curl(&[&s.app_url("hello", "/bytes/1000")]).await;
    assert_eq!(r.status, 200);
    let baseline = rss_bytes();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_bytes(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let upload = s
        .curl(&[
            "-X",
            "POST",
            "-T",
            up.to_str().unwrap(),
            &s.app_url("hello", "/digest"),
        ])
        .await;
    assert_eq!(upload.status, 200, "{}", upload.text());
    let got: serde_json::Value = serde_json::from_slice(&upload.body).unwrap();
    assert_eq!(got["len"], SIZE);
    assert_eq!(got["sha256"], expected.as_str());

    let down = dir.path().join("down");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "300", "--cacert"])
        .arg(s.d.ca_path())
        .arg("-o")
        .arg(&down)
        .args(["-w", "%{http_code}"])
        .arg(s.app_url("hello", &format!("/bytes/{SIZE}")))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    stop.cancel();
    sampler.await.unwrap();

    let mut f = std::io::BufReader::new(std::fs::File::open(&down).unwrap());
    let mut offset = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                pattern_byte(offset + i as u64),
                "byte {} differs",
                offset + i as u64
            );
        }
        offset += n as u64;
    }
    assert_eq!(offset, SIZE);

    let growth = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(baseline);
    assert!(
        growth < BOUND,
        "RSS grew by {} MiB while streaming 2 × 256 MiB",
        growth >> 20
    );
    s.stop().await;
}

fn sha256_hex_of(ctx: ring::digest::Context) -> String {
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn digest_helper_matches_agent() {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"abc");
    assert_eq!(sha256_hex_of(ctx), sha256_hex(b"abc"));
}
