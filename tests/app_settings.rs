//! App settings from Entra Application Proxy, end to end through the real
//! `portico app` CLI, the router, the edge, a connector and a backend of
//! this test, with curl as the user: maintenance mode.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{admin_cli, admin_cli_result, eventually, Stack};
use http_body_util::Full;

/// Bounds every wait: a hang guard, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// A backend that answers `<name> <host> <path>` and counts the requests
/// that reach it.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

async fn backend(name: &'static str) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                counted.fetch_add(1, Ordering::SeqCst);
                let host = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let text = format!("{name} {host} {}", req.uri().path());
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text)))) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Backend { addr, hits }
}

/// `portico ARGS` against the stack's router.
async fn portico(s: &Stack, args: &[&str]) -> String {
    admin_cli(&s.d.router.url(), &s.d.data.join("router"), args).await
}

/// `portico ARGS` that must fail: its stderr.
async fn portico_fails(s: &Stack, args: &[&str]) -> String {
    let (ok, stdout, stderr) =
        admin_cli_result(&s.d.router.url(), &s.d.data.join("router"), args).await;
    assert!(!ok, "portico {args:?} succeeded: {stdout}");
    stderr
}

/// Maintenance mode, set by `app create --maintenance` and ended by `app
/// update --no-maintenance`: 503 `Maintenance` with the branded page and
/// `Retry-After`, and the backend never sees the request; then 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_answers_503_without_reaching_the_backend_until_it_ends() {
    let s = Stack::start().await;
    let b = backend("hr").await;
    let internal = format!("http://{}/", b.addr);
    let shown = portico(
        &s,
        &[
            "app",
            "create",
            "hr",
            "--internal-url",
            &internal,
            "--maintenance",
        ],
    )
    .await;
    assert!(
        shown
            .lines()
            .any(|l| l.split_whitespace().eq(["maintenance", "true"])),
        "{shown}"
    );
    let url = s.app_url("hr", "/page");
    let r = eventually("the edge has the app", HANG_GUARD, || async {
        let r = s.curl(&[&url]).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(r.header("x-portico-error").as_deref(), Some("Maintenance"));
    assert_eq!(r.header("retry-after").as_deref(), Some("120"));
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    let page = r.text();
    assert!(
        page.contains("This application is down for maintenance.") && page.contains("Portico"),
        "{page}"
    );
    // A JSON client gets the same code as JSON.
    let r = s.curl(&["-H", "accept: application/json", &url]).await;
    assert_eq!(r.status, 503);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"], "Maintenance");
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );

    // The update needs one of the two switches, not both.
    let err = portico_fails(
        &s,
        &["app", "update", "hr", "--maintenance", "--no-maintenance"],
    )
    .await;
    assert!(err.contains("cannot be used with"), "{err}");
    portico(&s, &["app", "update", "hr", "--no-maintenance"]).await;
    let r = eventually("the edge serves the app again", HANG_GUARD, || async {
        let r = s.curl(&[&url]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    let text = r.text();
    assert!(
        text.starts_with("hr ") && text.ends_with(" /page"),
        "{text}"
    );
    assert!(b.hits.load(Ordering::SeqCst) >= 1);

    // And back on: the app's other settings are kept.
    portico(&s, &["app", "update", "hr", "--maintenance"]).await;
    eventually("the edge has maintenance again", HANG_GUARD, || async {
        (s.curl(&[&url]).await.status == 503).then_some(())
    })
    .await;
    let json = portico(&s, &["app", "show", "hr", "--json"]).await;
    let app: portico_proto::api::App = serde_json::from_str(&json).unwrap();
    assert!(app.maintenance);
    assert_eq!(app.internal_url, internal);
    s.stop().await;
}
