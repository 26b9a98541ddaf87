//! Link translation through edge → tunnel → connector → backend: a backend
//! published at `http://<addr>/hr/` redirects to its internal URL and
//! serves HTML that links to it and to another app's internal URL; through
//! the edge (curl, and hyper for a streamed 1 MiB page) the user sees the
//! external URLs, and with the app's settings off, what the backend sent.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Stack};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use portico_proto::api::{App, AppPatch, AppSpec};
use portico_proto::AppId;
use tokio::sync::{mpsc, Notify};

/// Bounds every wait: a hang guard, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);
/// The streamed page: its size, and the size of its first part.
const BIG: usize = 1 << 20;
const FIRST: usize = 64 << 10;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The backend. `/hr/old` redirects to `/hr/new` by its internal URL and
/// sets a cookie for `/hr`; `/hr/page` is HTML linking to itself and to
/// the demo app's internal URL; `/hr/big` is a 1 MiB HTML page whose first
/// 64 KiB are sent at once and the rest only once `release` is notified.
struct Backend {
    addr: SocketAddr,
    release: Arc<Notify>,
}

async fn backend(demo: SocketAddr) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(Notify::new());
    let released = release.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let released = released.clone();
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let released = released.clone();
                async move { Ok::<_, Infallible>(answer(req.uri().path(), addr, demo, released)) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Backend { addr, release }
}

fn full(text: String) -> Body {
    http_body_util::Full::new(Bytes::from(text))
        .map_err(|e| match e {})
        .boxed()
}

fn answer(
    path: &str,
    me: SocketAddr,
    demo: SocketAddr,
    release: Arc<Notify>,
) -> http::Response<Body> {
    let b = http::Response::builder();
    match path {
        "/hr/old" => b
            .status(302)
            .header("location", format!("http://{me}/hr/new?from=old"))
            .header("set-cookie", "sid=1; Path=/hr/; HttpOnly")
            .body(full(String::new())),
        "/hr/page" => {
            let html = format!(
                "<html><body><a href=\"http://{me}/hr/x\">x</a>\
                 <img src=\"http://{demo}/logo.png\">\
                 <div style=\"background:url(/hr/bg.png)\"></div></body></html>"
            );
            b.header("content-type", "text/html; charset=utf-8")
                .header("content-length", html.len())
                .header("etag", "\"v1\"")
                .header("accept-ranges", "bytes")
                .header("content-digest", "sha-256=:AAAA:")
                .body(full(html))
        }
        "/hr/part" => {
            let part = format!("<a href=\"http://{me}/hr/x\">");
            b.status(206)
                .header("content-type", "text/html")
                .header("content-range", format!("bytes 0-{}/100", part.len() - 1))
                .header("content-length", part.len())
                .body(full(part))
        }
        "/hr/big" => {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from(big_part(me, 0, FIRST))).await;
                release.notified().await;
                let mut at = FIRST;
                while at < BIG {
                    let n = (BIG - at).min(FIRST);
                    if tx.send(Bytes::from(big_part(me, at, n))).await.is_err() {
                        return;
                    }
                    at += n;
                }
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                let data = rx.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(data)), rx))
            });
            b.header("content-type", "text/html")
                .header("content-length", BIG)
                .body(StreamBody::new(stream).boxed())
        }
        _ => b.status(404).body(full(String::new())),
    }
    .unwrap()
}

/// Bytes `[at, at + n)` of the big page.
fn big_part(me: SocketAddr, at: usize, n: usize) -> Vec<u8> {
    let page = big_page(me);
    page[at..at + n].to_vec()
}

/// The big page: numbered links to the internal URL, padded to exactly
/// `BIG` bytes.
fn big_page(me: SocketAddr) -> Vec<u8> {
    let mut page = Vec::with_capacity(BIG);
    for i in 0.. {
        let line = format!("<p><a href=\"http://{me}/hr/n{i}\">line {i}</a></p>\n");
        if page.len() + line.len() > BIG {
            break;
        }
        page.extend_from_slice(line.as_bytes());
    }
    page.resize(BIG, b'\n');
    page
}

async fn publish(s: &Stack, backend: SocketAddr, translate_body: bool) -> App {
    let spec = AppSpec {
        translate_body,
        ..AppSpec::new(AppId::new("hr").unwrap(), format!("http://{backend}/hr/"))
    };
    s.d.admin.post_json("/v1/apps", &spec).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_cookies_and_html_are_translated_and_not_when_the_settings_are_off() {
    let s = Stack::start().await;
    let b = backend(s.d.demo.addr).await;
    let app = publish(&s, b.addr, true).await;
    assert!(app.translate_headers && app.translate_body);
    let port = s.port();
    let old = s.app_url("hr", "/old");
    let r = eventually("the edge routes hr", HANG_GUARD, || async {
        let r = s.curl(&[&old]).await;
        (r.status == 302).then_some(r)
    })
    .await;
    assert_eq!(
        r.header("location"),
        Some(format!("https://hr.apps.localhost:{port}/new?from=old"))
    );
    assert_eq!(
        r.header("set-cookie").as_deref(),
        Some("sid=1; Path=/; HttpOnly")
    );

    let page = s.curl(&[&s.app_url("hr", "/page")]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.text(),
        format!(
            "<html><body><a href=\"https://hr.apps.localhost:{port}/x\">x</a>\
             <img src=\"https://hello.apps.localhost:{port}/logo.png\">\
             <div style=\"background:url(/bg.png)\"></div></body></html>"
        ),
        "this app's and the demo app's internal URLs are their external ones"
    );
    // Another representation: a weak ETag, no digest of the backend's
    // bytes, no ranges.
    assert_eq!(page.header("etag").as_deref(), Some("W/\"v1\""));
    assert_eq!(page.header("accept-ranges").as_deref(), Some("none"));
    assert_eq!(page.header("content-digest"), None);
    // A part of a body is the backend's bytes, untouched.
    let part = s.curl(&[&s.app_url("hr", "/part")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.text(), format!("<a href=\"http://{}/hr/x\">", b.addr));
    assert_eq!(
        part.header("content-length"),
        Some(part.body.len().to_string())
    );

    // Both settings off: what the backend sent.
    let patch = AppPatch {
        translate_headers: Some(false),
        translate_body: Some(false),
        ..AppPatch::default()
    };
    let app: App = s.d.admin.patch_json("/v1/apps/hr", &patch).await.unwrap();
    assert!(!app.translate_headers && !app.translate_body);
    let internal = format!("http://{}/hr/new?from=old", b.addr);
    let r = eventually("the connector has the new settings", HANG_GUARD, || async {
        let r = s.curl(&[&old]).await;
        (r.header("location").as_deref() == Some(internal.as_str())).then_some(r)
    })
    .await;
    assert_eq!(
        r.header("set-cookie").as_deref(),
        Some("sid=1; Path=/hr/; HttpOnly")
    );
    let page = s.curl(&[&s.app_url("hr", "/page")]).await;
    assert!(
        page.text()
            .contains(&format!("<a href=\"http://{}/hr/x\">", b.addr)),
        "{}",
        page.text()
    );
    assert!(page.text().contains("url(/hr/bg.png)"), "{}", page.text());
    assert_eq!(
        page.header("content-length"),
        Some(page.body.len().to_string()),
        "an untouched body keeps its length"
    );
    assert_eq!(
        page.header("etag").as_deref(),
        Some("\"v1\""),
        "and its ETag"
    );
    assert_eq!(page.header("accept-ranges").as_deref(), Some("bytes"));
    s.stop().await;
}

/// A 1 MiB page streams through the rewriter: the user has its translated
/// first part while the backend still holds the rest (it sends the rest
/// only then), so the connector cannot have waited for the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_page_is_rewritten_as_it_streams() {
    let s = Stack::start().await;
    let b = backend(s.d.demo.addr).await;
    publish(&s, b.addr, true).await;
    let port = s.port();
    eventually("the edge routes hr", HANG_GUARD, || async {
        let r = s.curl(&[&s.app_url("hr", "/old")]).await;
        (r.status == 302).then_some(())
    })
    .await;

    let mut sender = common::h2_connection(&s, "hr.apps.localhost").await;
    sender.ready().await.unwrap();
    let req = http::Request::get(format!("https://hr.apps.localhost:{port}/big"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(HANG_GUARD, sender.send_request(req))
        .await
        .expect("a response head")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("content-length").is_none(),
        "a rewritten body has no length: {:?}",
        resp.headers()
    );
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let marker = format!("<a href=\"https://hr.apps.localhost:{port}/n100\">");
    while !got.windows(marker.len()).any(|w| w == marker.as_bytes()) {
        let frame = tokio::time::timeout(HANG_GUARD, body.frame())
            .await
            .expect("the first part arrives before the backend sends the rest")
            .expect("the body goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    assert!(got.len() < BIG, "only the first part has come");
    b.release.notify_one();
    while let Some(frame) = tokio::time::timeout(HANG_GUARD, body.frame())
        .await
        .expect("the rest arrives")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            got.extend_from_slice(&data);
        }
    }
    let internal = format!("http://{}/hr/", b.addr);
    let external = format!("https://hr.apps.localhost:{port}/");
    let want = String::from_utf8(big_page(b.addr))
        .unwrap()
        .replace(&internal, &external);
    assert_eq!(got.len(), want.len());
    assert!(
        got == want.as_bytes(),
        "the whole page, every link translated"
    );
    s.stop().await;
}
