//! The demo backend that `portico dev` publishes, also used by the
//! end-to-end tests as a real HTTP/1.1 origin.
//!
//! | path | answer |
//! |---|---|
//! | `/` | a small HTML page showing what the backend received |
//! | `/headers` | the request headers as JSON |
//! | `/echo` | the request body, streamed back |
//! | `/digest` | SHA-256 and length of the request body, streamed in |
//! | `/bytes/N` | N bytes of a fixed pattern, streamed out |
//! | `/sleep/MS` | waits MS milliseconds (at most 10 minutes), then answers |
//! | `/ws` | a WebSocket echo |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

type Body = BoxBody<Bytes, hyper::Error>;

/// A running demo backend.
#[derive(Debug)]
pub struct Demo {
    pub addr: SocketAddr,
    tracker: TaskTracker,
}

impl Demo {
    /// Waits until the server and its connections have stopped.
    pub async fn wait(self) {
        self.tracker.wait().await;
    }
}

/// The byte at offset `i` of `/bytes/N`: a pattern that catches reordering.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 13)) as u8
}

/// Starts the demo backend on `addr` (use port 0 for a free port).
pub async fn start(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<Demo> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let tracker = TaskTracker::new();
    let t = tracker.clone();
    tracker.spawn(
        async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = shutdown.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => { debug!(error = %portico_agent::error_chain(&e), "accept failed"); continue; }
                    },
                };
                let shutdown = shutdown.clone();
                t.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let svc = hyper::service::service_fn(move |req| handle(req, peer));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades();
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => { let _ = r; }
                        () = shutdown.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                        }
                    }
                });
            }
            t.close();
        }
        .instrument(tracing::info_span!("demo", %addr)),
    );
    Ok(Demo { addr, tracker })
}

async fn handle(req: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = if path == "/" {
        html_page(&req, peer)
    } else if path == "/headers" {
        headers_json(&req)
    } else if path == "/echo" {
        let ct = req.headers().get(header::CONTENT_TYPE).cloned();
        let mut resp = Response::new(req.into_body().boxed());
        if let Some(ct) = ct {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        resp
    } else if path == "/digest" {
        digest(req.into_body()).await
    } else if path == "/ws" {
        websocket(req)
    } else if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let mut resp = Response::new(PatternBody { offset: 0, len: n }.boxed());
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
        resp
    } else if let Some(ms) = path
        .strip_prefix("/sleep/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
        text(StatusCode::OK, "slept\n")
    } else {
        text(StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(resp)
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn header_str<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html_page(req: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let rows = [
        ("Method", req.method().as_str().to_owned()),
        ("Path", req.uri().to_string()),
        ("Host", header_str(req, "host").to_owned()),
        (
            "X-Forwarded-For",
            header_str(req, "x-forwarded-for").to_owned(),
        ),
        (
            "X-Forwarded-Host",
            header_str(req, "x-forwarded-host").to_owned(),
        ),
        (
            "X-Forwarded-Proto",
            header_str(req, "x-forwarded-proto").to_owned(),
        ),
        ("X-Request-Id", header_str(req, "x-request-id").to_owned()),
        ("TCP peer", peer.to_string()),
    ];
    let rows: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th>{k}</th><td><code>{}</code></td></tr>", escape(v)))
        .collect();
    let body = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Hello from Portico</title>\
         <style>body{{font:16px system-ui,sans-serif;margin:3rem auto;max-width:44rem;color:#1d2330}}\
         th{{text-align:left;padding-right:1rem;color:#56607a}}h1{{color:#3b5bdb}}</style></head>\
         <body><h1>Hello from behind the tunnel</h1>\
         <p>This page was served by an internal app that has no inbound port open. \
         Your request reached it through a Portico edge and an outbound QUIC tunnel.</p>\
         <table>{rows}</table></body></html>\n"
    );
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn headers_json(req: &Request<Incoming>) -> Response<Body> {
    let mut map = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<serde_json::Value> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        map.insert(name.as_str().to_owned(), values.into());
    }
    let doc = serde_json::json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "headers": map,
    });
    let mut resp = Response::new(full(doc.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn digest(mut body: Incoming) -> Response<Body> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(data) = f.data_ref() {
                    ctx.update(data);
                    len += data.len() as u64;
                }
            }
            Err(_) => return text(StatusCode::BAD_REQUEST, "body broken\n"),
        }
    }
    let hex: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut resp = Response::new(full(format!("{{\"len\":{len},\"sha256\":\"{hex}\"}}")));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a websocket request\n");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            io,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                let _ = ws.close(None).await;
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// Streams `len` bytes of [`pattern_byte`] in 64 KiB chunks.
struct PatternBody {
    offset: u64,
    len: u64,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.offset).min(64 * 1024);
        let start = self.offset;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.len
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len - self.offset)
    }
}
