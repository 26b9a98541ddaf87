//! HTTP/3 at the edge, end to end: Portico's own h3 client (curl cannot
//! speak HTTP/3 here) through edge → tunnel → connector → demo backend,
//! with the same routing, errors and metrics as HTTP/1.1, found through the
//! `Alt-Svc` header an HTTP/1.1 answer carries.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::Stack;
use http::{Request, StatusCode};
use portico::demo::pattern_byte;
use portico_loadtest::h3::{H3Client, Trust};
use tokio_util::task::TaskTracker;

const HANG_GUARD: Duration = Duration::from_secs(60);

/// The UDP port an `Alt-Svc: h3=":PORT"; ma=...` value names.
fn alt_svc_port(value: &str) -> Option<u16> {
    let rest = value.split("h3=\"").nth(1)?;
    rest.split('"').next()?.strip_prefix(':')?.parse().ok()
}

async fn client(s: &Stack, host: &str, tracker: &TaskTracker) -> H3Client {
    let addr = s.d.edge.h3_addr.expect("the dev edge serves HTTP/3");
    H3Client::connect(
        addr,
        host,
        Trust::ca_pem(&s.d.router.ca_pem).expect("router CA parses"),
        tracker,
    )
    .await
    .expect("HTTP/3 connection to the edge")
}

fn get(host: &str, path: &str) -> Request<Bytes> {
    Request::get(format!("https://{host}{path}"))
        .body(Bytes::new())
        .unwrap()
}

/// The value of `portico_edge_requests_total` with these labels (0 if absent).
fn requests_total(metrics: &str, app: &str, status: u16, code: &str) -> u64 {
    let want =
        format!(r#"portico_edge_requests_total{{app="{app}",code="{code}",status="{status}"}} "#);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_svc_leads_to_http3_with_byte_exact_bodies() {
    let s = Stack::start().await;
    let host = s.d.app.external_host.clone();

    // An HTTP/1.1 answer names the UDP port; HTTP/3 is reached there.
    let r = s.curl(&["--http1.1", &s.d.app_url()]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.http_version, "1.1");
    let alt_svc = r.header("alt-svc").expect("Alt-Svc on an HTTP/1.1 answer");
    let port = alt_svc_port(&alt_svc).expect("Alt-Svc names an h3 port");
    assert!(alt_svc.contains("ma=86400"), "{alt_svc}");
    assert_eq!(port, s.port(), "HTTP/3 shares the HTTPS port number");
    let tracker = TaskTracker::new();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let h3 = H3Client::connect(
        addr,
        &host,
        Trust::ca_pem(&s.d.router.ca_pem).unwrap(),
        &tracker,
    )
    .await
    .expect("HTTP/3 at the advertised port");

    // GET: a large body, byte for byte (the pattern catches reordering).
    const N: u64 = 3 * 1024 * 1024 + 17;
    let r = h3
        .request(get(&host, &format!("/bytes/{N}")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), http::Version::HTTP_3);
    assert!(r.headers().contains_key("x-portico-request-id"));
    assert!(r.headers().get("x-portico-error").is_none());
    assert_eq!(r.body().len() as u64, N);
    assert!(
        r.body()
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64)),
        "the body is the demo's pattern"
    );

    // POST: random bytes echoed back and digested, streamed both ways.
    let mut up = vec![0u8; 4 * 1024 * 1024 + 5];
    fastrand::fill(&mut up);
    let up = Bytes::from(up);
    let r = h3
        .request(
            Request::post(format!("https://{host}/echo"))
                .header("content-type", "application/octet-stream")
                .body(up.clone())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.body().len(), up.len());
    assert!(r.body() == &up, "the echo is byte-exact");

    let r = h3
        .request(
            Request::post(format!("https://{host}/digest"))
                .body(up.clone())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    let want: String = ring::digest::digest(&ring::digest::SHA256, &up)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(doc["len"], up.len() as u64);
    assert_eq!(doc["sha256"], want);

    // The backend saw an ordinary proxied request.
    let r = h3.request(get(&host, "/headers")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    let text = doc.to_string().to_ascii_lowercase();
    assert!(text.contains("x-forwarded-proto"), "{text}");

    // Counted in the edge's metrics with its app and status.
    let app = s.d.app.id.to_string();
    let metrics = s.edge_metrics().await;
    assert!(
        requests_total(&metrics, &app, 200, "") >= 5,
        "HTTP/3 requests are counted:\n{metrics}"
    );
    s.stop_with_h3(h3, tracker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_errors_match_http1() {
    let s = Stack::start().await;
    let tracker = TaskTracker::new();
    let h3 = client(&s, "nope.apps.localhost", &tracker).await;

    // AppNotFound: page and JSON, with the same headers as over HTTP/1.1.
    let r = h3.request(get("nope.apps.localhost", "/")).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["x-portico-error"], "AppNotFound");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let id = r.headers()["x-portico-request-id"].to_str().unwrap();
    let text = String::from_utf8_lossy(r.body());
    assert!(text.contains("AppNotFound") && text.contains(id), "{text}");
    let h1 = s.curl(&[&s.app_url("nope", "/")]).await;
    assert_eq!(h1.status, 404);
    assert_eq!(h1.header("x-portico-error").as_deref(), Some("AppNotFound"));

    let mut req = get("nope.apps.localhost", "/");
    req.headers_mut()
        .insert("accept", "application/json".parse().unwrap());
    let r = h3.request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let doc: serde_json::Value = serde_json::from_slice(r.body()).expect("JSON error body");
    assert_eq!(doc["error"], "AppNotFound");
    assert_eq!(doc["status"], 404);
    assert_eq!(
        doc["request_id"].as_str(),
        r.headers()["x-portico-request-id"].to_str().ok()
    );

    // ConnectorNotFound: an app whose group has no connector.
    s.publish_demo_in_new_group("lonely", "empty").await;
    let r = common::eventually("the edge routes lonely", HANG_GUARD, || {
        let h3 = h3.clone();
        async move {
            let r = h3.request(get("lonely.apps.localhost", "/")).await.ok()?;
            (r.headers().get("x-portico-error").map(|v| v.as_bytes()) != Some(b"AppNotFound"))
                .then_some(r)
        }
    })
    .await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers()["x-portico-error"], "ConnectorNotFound");
    assert!(String::from_utf8_lossy(r.body()).contains("ConnectorNotFound"));
    let h1 = s.curl(&[&s.app_url("lonely", "/")]).await;
    assert_eq!(h1.status, 502);
    assert_eq!(
        h1.header("x-portico-error").as_deref(),
        Some("ConnectorNotFound")
    );

    let metrics = s.edge_metrics().await;
    assert!(
        requests_total(&metrics, "", 404, "AppNotFound") >= 3,
        "{metrics}"
    );
    assert!(
        requests_total(&metrics, "lonely", 502, "ConnectorNotFound") >= 2,
        "{metrics}"
    );
    s.stop_with_h3(h3, tracker).await;
}

#[test]
fn alt_svc_values_parse() {
    assert_eq!(alt_svc_port("h3=\":8443\"; ma=86400"), Some(8443));
    assert_eq!(alt_svc_port("h2=\":1\", h3=\":2\""), Some(2));
    assert_eq!(alt_svc_port("clear"), None);
}
