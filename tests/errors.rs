//! Every stable error code the edge can produce, each from a real cause,
//! as an HTML page or JSON, counted in the edge's metrics.

mod common;

use std::sync::Arc;

use common::Stack;
use portico_proto::api::{App, AppSpec, BackendTimeout};
use portico_proto::AppId;

async fn publish_with(s: &Stack, spec: AppSpec) -> App {
    s.d.admin
        .post_json("/v1/apps", &spec)
        .await
        .expect("app published")
}

fn spec(id: &str, internal_url: &str) -> AppSpec {
    AppSpec::new(AppId::new(id).unwrap(), internal_url)
}

/// Waits until the edge routes `host` (config reaches edges by long-poll).
async fn routed(s: &Stack, app: &str) {
    common::eventually(
        &format!("edge routes {app}"),
        std::time::Duration::from_secs(20),
        || async {
            let r = s.curl(&[&s.app_url(app, "/")]).await;
            (r.header("x-portico-error").as_deref() != Some("AppNotFound")).then_some(())
        },
    )
    .await;
}

fn assert_error(r: &common::Curl, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some(code),
        "headers: {}",
        r.headers
    );
    let text = r.text();
    assert!(text.contains(code), "page names the code: {text}");
    let id = r.header("x-portico-request-id").expect("request id header");
    assert!(text.contains(&id), "page shows the request id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_not_found_as_html_and_json() {
    let s = Stack::start().await;
    let r = s.curl(&[&s.app_url("nope", "/")]).await;
    assert_error(&r, 404, "AppNotFound");
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(
        r.text().contains("UTC") || r.text().contains('Z'),
        "page shows the UTC time"
    );

    let r = s
        .curl(&["-H", "accept: application/json", &s.app_url("nope", "/")])
        .await;
    assert_eq!(r.status, 404);
    let doc: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error body");
    assert_eq!(doc["error"], "AppNotFound");
    assert_eq!(doc["status"], 404);
    assert_eq!(
        doc["request_id"].as_str(),
        r.header("x-portico-request-id").as_deref()
    );
    assert!(doc["time"].as_str().is_some());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_not_found_when_the_group_has_no_connector() {
    let s = Stack::start().await;
    s.publish_demo_in_new_group("lonely", "empty").await;
    routed(&s, "lonely").await;
    let r = s.curl(&[&s.app_url("lonely", "/")]).await;
    assert_error(&r, 502, "ConnectorNotFound");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_unreachable_when_its_port_is_closed() {
    let s = Stack::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    publish_with(&s, spec("closed", &format!("http://{closed}/"))).await;
    routed(&s, "closed").await;
    let r = s.curl(&[&s.app_url("closed", "/")]).await;
    assert_error(&r, 502, "BackendUnreachable");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_timeout_when_the_backend_sleeps_past_the_app_timeout() {
    let s = Stack::start().await;
    let mut sp = spec("sleepy", &format!("http://{}/", s.d.demo.addr));
    sp.backend_timeout = BackendTimeout::Seconds(1);
    publish_with(&s, sp).await;
    routed(&s, "sleepy").await;
    let r = s.curl(&[&s.app_url("sleepy", "/sleep/4000")]).await;
    assert_error(&r, 504, "BackendTimeout");
    // A quick path of the same app still works.
    let r = s.curl(&[&s.app_url("sleepy", "/headers")]).await;
    assert_eq!(r.status, 200);

    let metrics = s.edge_metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("portico_edge_requests_total")
                && l.contains("BackendTimeout")
                && l.contains("sleepy")),
        "edge metrics count the error:\n{metrics}"
    );
    s.stop().await;
}

/// An https backend whose certificate no one trusts.
async fn self_signed_backend(
    shutdown: tokio_util::sync::CancellationToken,
) -> std::net::SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(portico_agent::pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(
                            b"secret internal page",
                        )),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_cert_invalid_when_validation_is_on_and_ok_when_off() {
    let s = Stack::start().await;
    let backend = self_signed_backend(s.shutdown.clone()).await;
    publish_with(&s, spec("strict", &format!("https://{backend}/"))).await;
    let mut lax = spec("lax", &format!("https://{backend}/"));
    lax.validate_backend_tls = false;
    publish_with(&s, lax).await;
    routed(&s, "strict").await;
    routed(&s, "lax").await;

    let r = s.curl(&[&s.app_url("strict", "/")]).await;
    assert_error(&r, 502, "BackendCertInvalid");
    let r = s.curl(&[&s.app_url("lax", "/")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "secret internal page");
    s.stop().await;
}
