//! The public listener (HTTPS, HTTP/1.1 and HTTP/2 by ALPN) and the request
//! path every protocol shares (HTTP/3 too, see `http3.rs`): host → app →
//! tunnel, one QUIC stream per request, bodies streamed both ways,
//! WebSocket upgrades as byte pipes, branded errors, metrics, one log line.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, ALT_SVC, CONNECTION, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico_agent::pki;
use portico_proto::api::App;
use portico_proto::io::ReadError;
use portico_proto::{
    CloseCode, ErrorCode, Frame, HeadExtensionsRef, RequestId, ResponseHead, StreamHeadRef,
    StreamKind,
};
use prometheus::IntCounter;
use quinn::{RecvStream, SendStream};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::certs::CertStore;
use crate::error::Error;
use crate::pages::{self, REQUEST_ID_HEADER};
use crate::routing::request_host;
use crate::tunnels::{StreamGuard, Tunnel};
use crate::Shared;

/// The error type of response bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the edge sends.
pub(crate) type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A request body the edge can stream into a tunnel: hyper's `Incoming`
/// (HTTP/1.1, HTTP/2) or an HTTP/3 request stream.
pub(crate) trait RequestBody:
    http_body::Body<Data = Bytes, Error: std::fmt::Display + Send> + Send + Unpin + 'static
{
}

impl<T> RequestBody for T where
    T: http_body::Body<Data = Bytes, Error: std::fmt::Display + Send> + Send + Unpin + 'static
{
}

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest chunk read from a QUIC stream at once.
const CHUNK: usize = 64 * 1024;

/// Binds the public TCP listener with a deep accept queue.
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let bind_err = |source| Error::Bind {
        what: "public",
        addr,
        source,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    socket.set_nodelay(true).map_err(bind_err)?;
    socket.bind(addr).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)
}

/// The TLS config of the public listener: the swappable public certificate,
/// ALPN `h2` and `http/1.1`.
pub(crate) fn tls_config(cert: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Tls {
            what: "public",
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Accepts users until shutdown; each connection drains gracefully.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, client) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "public accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared2 = Arc::clone(&shared);
        shared.conns.spawn(async move {
            let metrics = &shared2.metrics;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics.tls_failed.inc();
                    tracing::debug!(%client, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_failed.inc();
                    tracing::debug!(%client, "TLS handshake timed out");
                    return;
                }
            };
            if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                metrics.tls_resumed.inc();
            } else {
                metrics.tls_full.inc();
            }
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_connection(TokioIo::new(tls), h2, client, shared2).await;
        });
    }
}

/// Serves one TLS connection with the protocol its ALPN chose: HTTP/2 for
/// `h2`, HTTP/1.1 (with upgrades) otherwise. HTTP/2 over TLS needs ALPN
/// (RFC 9113 §3.2), so a client that offered none speaks HTTP/1.1, and no
/// read-ahead is needed to guess.
async fn serve_connection<I>(io: I, h2: bool, client: SocketAddr, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let shared2 = Arc::clone(&shared);
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&shared2);
        async move {
            let mut resp = handle(req, Arc::clone(&shared), client).await;
            if let Some(alt_svc) = &shared.alt_svc {
                resp.headers_mut().insert(ALT_SVC, alt_svc.clone());
            }
            Ok::<_, Infallible>(resp)
        }
    });
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), client, &shared).await;
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), client, &shared).await;
    }
}

/// Runs a connection to its end. On shutdown it is asked to finish
/// gracefully (requests in flight complete), and on the hard stop dropped.
async fn drive<C, E>(
    conn: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    client: SocketAddr,
    shared: &Shared,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%client, error = %e, "connection ended with an error");
            }
            return;
        }
        () = shared.shutdown.cancelled() => graceful_shutdown(conn.as_mut()),
    }
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shared.hard_stop.cancelled() => {}
    }
}

/// Serves one request of any protocol: never fails, always carries a
/// request id, and is counted and logged once.
pub(crate) async fn handle<B: RequestBody>(
    req: Request<B>,
    shared: Arc<Shared>,
    client: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let request_id = RequestId(fastrand::u128(..));
    let span = tracing::info_span!("request", request.id = %request_id, app = tracing::field::Empty, method = %req.method(), version = ?req.version());
    async move {
        let mut accept = HeaderMap::new();
        for v in req.headers().get_all(http::header::ACCEPT).iter().take(8) {
            accept.append(http::header::ACCEPT, v.clone());
        }
        let (app, outcome) = proxy(req, &shared, client, request_id).await;
        let app_label = app.as_ref().map(|a| a.id.as_str()).unwrap_or("");
        let (mut resp, code) = match outcome {
            Ok(resp) => (resp, ""),
            Err(code) => (
                pages::error_response::<Full<Bytes>>(code, request_id, &accept)
                    .map(|b| b.map_err(|never| match never {}).boxed_unsync()),
                code.as_str(),
            ),
        };
        resp.headers_mut()
            .insert(REQUEST_ID_HEADER, request_id.header_value());
        let status = resp.status();
        let elapsed = started.elapsed();
        shared
            .metrics
            .requests
            .with_label_values(&[app_label, status.as_str(), code])
            .inc();
        shared.metrics.duration.with_label_values(&[app_label]).observe(elapsed.as_secs_f64());
        tracing::info!(request.id = %request_id, app = app_label, status = status.as_u16(), code, duration_ms = elapsed.as_secs_f64() * 1000.0, "request");
        resp
    }
    .instrument(span)
    .await
}

/// What one request needs while its stream is open: the receive half and
/// the guards. Dropping it before the response ended cancels the stream.
struct Inflight {
    recv: Option<RecvStream>,
    done: bool,
    _cancel_body: DropGuard,
    _stream: StreamGuard,
    _active: ActiveStream,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        if !self.done {
            if let Some(recv) = self.recv.as_mut() {
                let _ = recv.stop(CloseCode::Cancelled.to_wire().into());
            }
        }
    }
}

/// Counts one active stream in `portico_edge_streams`.
struct ActiveStream(prometheus::IntGauge);

impl ActiveStream {
    fn new(g: &prometheus::IntGauge) -> Self {
        g.inc();
        ActiveStream(g.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn proxy<B: RequestBody>(
    req: Request<B>,
    shared: &Shared,
    client: SocketAddr,
    request_id: RequestId,
) -> (Option<Arc<App>>, Result<Response<Body>, ErrorCode>) {
    if req.method() == Method::CONNECT && req.version() == Version::HTTP_3 {
        // Extended CONNECT (WebSocket over HTTP/3) is not carried.
        return (None, Err(ErrorCode::BadRequest));
    }
    let Some(host) = request_host(&req) else {
        return (None, Err(ErrorCode::BadRequest));
    };
    let table = shared.table.load_full();
    let Some(app) = table.app_for_host(&host).cloned() else {
        tracing::debug!(%host, "no app for this host");
        return (None, Err(ErrorCode::AppNotFound));
    };
    tracing::Span::current().record("app", app.id.as_str());
    let result = forward(req, &app, shared, client, request_id).await;
    (Some(app), result)
}

async fn forward<B: RequestBody>(
    mut req: Request<B>,
    app: &App,
    shared: &Shared,
    client: SocketAddr,
    request_id: RequestId,
) -> Result<Response<Body>, ErrorCode> {
    let websocket = is_websocket(&req);
    let timeout = app.backend_timeout.duration();
    // The request's headers are not needed after this: move them out (the
    // authority may borrow from them), and encode the head from borrowed
    // parts of the request.
    let headers = forward_headers(std::mem::take(req.headers_mut()), websocket);
    let head = StreamHeadRef {
        kind: if websocket {
            StreamKind::WebSocket
        } else {
            StreamKind::Http
        },
        request_id,
        app: app.id.as_str(),
        method: req.method(),
        authority: authority_of(req.uri(), &headers),
        path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
        headers: &headers,
        client_addr: client,
        identity: None,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        ext: HeadExtensionsRef::NONE,
    }
    .to_bytes()
    .map_err(|e| {
        tracing::info!(error = %e, "request head too large for a stream head");
        ErrorCode::BadRequest
    })?;
    // Encoded: not kept for the life of the stream.
    drop(headers);
    let deadline = tokio::time::Instant::now() + timeout + shared.connector_timeout_grace;
    let (tunnel, stream_guard, mut send, recv) =
        tokio::time::timeout_at(deadline, open_stream(shared, app, head))
            .await
            .map_err(|_| ErrorCode::ConnectorTimeout)??;
    let cancel = shared.hard_stop.child_token();
    let mut inflight = Inflight {
        recv: Some(recv),
        done: false,
        _cancel_body: cancel.clone().drop_guard(),
        _stream: stream_guard,
        _active: ActiveStream::new(&shared.metrics.streams),
    };
    let on_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let mut ws_send = None;
    if websocket {
        ws_send = Some(send);
    } else {
        let body = req.into_body();
        if body.is_end_stream() {
            // Nothing to stream (a GET, say): FIN leaves in the same packet
            // as the head, the connector need not wait for it, and no task
            // is spawned for this request.
            let _ = send.finish();
        } else {
            let bytes_in = shared.metrics.bytes_in.clone();
            shared
                .conns
                .spawn(pump_request_body(body, send, cancel, bytes_in).in_current_span());
        }
    }
    let recv = inflight.recv.as_mut().expect("set above");
    let first = tokio::time::timeout_at(deadline, portico_proto::io::read_frame(recv)).await;
    let head: ResponseHead = match first {
        Err(_) => {
            tracing::info!(tunnel.id = %tunnel.id, "no response head in time");
            return Err(ErrorCode::ConnectorTimeout);
        }
        Ok(Ok(Some(Frame::ResponseHead(h)))) => h,
        Ok(Ok(Some(Frame::Error(e)))) => {
            inflight.done = true;
            tracing::info!(tunnel.id = %tunnel.id, code = %e.code, message = %e.message, "connector answered with an error");
            return Err(e.code);
        }
        Ok(Ok(Some(other))) => {
            let reason = format!("unexpected {:?} frame on a data stream", other.frame_type());
            tracing::warn!(tunnel.id = %tunnel.id, %reason, "closing tunnel");
            tunnel.close(CloseCode::ProtocolError, &reason);
            return Err(ErrorCode::Internal);
        }
        Ok(Err(ReadError::Decode(e))) => {
            let reason = e.to_string();
            tracing::warn!(tunnel.id = %tunnel.id, %reason, "malformed response head, closing tunnel");
            tunnel.close(CloseCode::ProtocolError, &reason);
            return Err(ErrorCode::Internal);
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            tracing::info!(tunnel.id = %tunnel.id, "stream lost before a response head");
            return Err(ErrorCode::ConnectorNotFound);
        }
    };
    let upgraded = head.status == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded && !websocket {
        tracing::warn!(tunnel.id = %tunnel.id, "connector answered 101 to a plain request");
        return Err(ErrorCode::Internal);
    }
    let mut builder = Response::builder().status(head.status);
    if let Some(h) = builder.headers_mut() {
        *h = response_headers(head.headers, upgraded);
    }
    if let (Some(on_upgrade), Some(mut send)) = (on_upgrade, ws_send) {
        if !upgraded {
            // The backend refused the upgrade: an ordinary answer follows.
            let _ = send.finish();
        } else {
            let recv = inflight.recv.take().expect("set above");
            let hard_stop = shared.hard_stop.clone();
            let bytes_in = shared.metrics.bytes_in.clone();
            let bytes_out = shared.metrics.bytes_out.clone();
            shared.conns.spawn(
                async move {
                    let _inflight = inflight;
                    websocket_pipe(on_upgrade, send, recv, hard_stop, bytes_in, bytes_out).await;
                }
                .in_current_span(),
            );
            return builder
                .body(
                    Full::new(Bytes::new())
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .map_err(|_| ErrorCode::Internal);
        }
    }
    let bytes_out = shared.metrics.bytes_out.clone();
    builder
        .body(response_body(inflight, bytes_out))
        .map_err(|_| ErrorCode::Internal)
}

/// Picks a tunnel, opens a stream and writes the head. A tunnel that fails
/// before the head is written is skipped once (nothing reached a backend).
async fn open_stream(
    shared: &Shared,
    app: &App,
    head: Bytes,
) -> Result<(Arc<Tunnel>, StreamGuard, SendStream, RecvStream), ErrorCode> {
    let mut exclude = None;
    for _attempt in 0..2 {
        let Some(tunnel) = shared.tunnels.pick(&app.connector_group, exclude) else {
            break;
        };
        let guard = tunnel.stream_guard();
        match tunnel.conn.open_bi().await {
            Ok((mut send, recv)) => match send.write_chunk(head.clone()).await {
                Ok(()) => return Ok((tunnel, guard, send, recv)),
                Err(e) => {
                    tracing::info!(tunnel.id = %tunnel.id, error = %e, "writing the stream head failed")
                }
            },
            Err(e) => tracing::info!(tunnel.id = %tunnel.id, error = %e, "opening a stream failed"),
        }
        exclude = Some(tunnel.id);
    }
    Err(ErrorCode::ConnectorNotFound)
}

/// Streams the request body into the QUIC stream, then finishes it. On
/// cancel (the response ended or the client left) the stream is reset.
async fn pump_request_body<B: RequestBody>(
    mut body: B,
    mut send: SendStream,
    cancel: CancellationToken,
    bytes_in: IntCounter,
) {
    let cancelled = CloseCode::Cancelled.to_wire().into();
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => {
                let _ = send.reset(cancelled);
                return;
            }
            f = body.frame() => f,
        };
        match frame {
            None => {
                let _ = send.finish();
                return;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                }; // trailers are not carried
                bytes_in.inc_by(data.len() as u64);
                tokio::select! {
                    () = cancel.cancelled() => {
                        let _ = send.reset(cancelled);
                        return;
                    }
                    // quinn holds the chunk until the connector acknowledges it.
                    r = send.write_chunk(portico_agent::quic::detach_small(data)) => if r.is_err() { return },
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body from the client failed");
                let _ = send.reset(cancelled);
                return;
            }
        }
    }
}

/// The response body: chunks read from the QUIC stream as they come.
fn response_body(inflight: Inflight, bytes_out: IntCounter) -> Body {
    let stream = futures::stream::unfold(Some(inflight), move |state| {
        let bytes_out = bytes_out.clone();
        async move {
            let mut inflight = state?;
            let recv = inflight.recv.as_mut()?;
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    bytes_out.inc_by(chunk.bytes.len() as u64);
                    Some((Ok(hyper::body::Frame::data(chunk.bytes)), Some(inflight)))
                }
                Ok(None) => {
                    inflight.done = true;
                    None
                }
                Err(e) => {
                    tracing::info!(error = %e, "response body stream failed");
                    Some((Err(BoxError::from(e)), None))
                }
            }
        }
    });
    // One box (the body), not two: the stream needs no box of its own.
    StreamBody::new(stream).boxed_unsync()
}

async fn websocket_pipe(
    on_upgrade: hyper::upgrade::OnUpgrade,
    send: SendStream,
    recv: RecvStream,
    hard_stop: CancellationToken,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
) {
    let upgraded = tokio::select! {
        () = hard_stop.cancelled() => return,
        r = on_upgrade => match r {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(error = %e, "client upgrade failed");
                return;
            }
        },
    };
    let mut client = TokioIo::new(upgraded);
    let mut tunnel = tokio::io::join(recv, send);
    tokio::select! {
        () = hard_stop.cancelled() => {}
        r = tokio::io::copy_bidirectional(&mut client, &mut tunnel) => match r {
            Ok((up, down)) => {
                bytes_in.inc_by(up);
                bytes_out.inc_by(down);
                tracing::debug!(up, down, "websocket closed");
            }
            Err(e) => tracing::debug!(error = %e, "websocket ended with an error"),
        },
    }
}

/// Whether this is an HTTP/1.1 WebSocket upgrade request.
pub(crate) fn is_websocket<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && header_has_token(req.headers(), &CONNECTION, "upgrade")
        && header_has_token(req.headers(), &UPGRADE, "websocket")
}

fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The authority the user asked for, as sent: the request target's (HTTP/2
/// and HTTP/3 `:authority`, an absolute-form HTTP/1.1 target), else `Host`.
fn authority_of<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> &'a str {
    if let Some(a) = uri.authority() {
        return a.as_str();
    }
    headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}

/// The request headers to carry to the connector: hop-by-hop ones dropped,
/// except the upgrade pair of a WebSocket request.
pub(crate) fn forward_headers(mut headers: HeaderMap, websocket: bool) -> HeaderMap {
    portico_agent::headers::strip_hop_by_hop(&mut headers, websocket);
    headers
}

/// The response headers to give the user: hop-by-hop ones dropped, except
/// the upgrade pair of a `101`.
fn response_headers(mut headers: HeaderMap, upgraded: bool) -> HeaderMap {
    portico_agent::headers::strip_hop_by_hop(&mut headers, upgraded);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules themselves are tested in `portico_agent::headers`; here,
    /// that both directions apply them.
    #[test]
    fn both_directions_drop_hop_by_hop_headers() {
        let mut ws = HeaderMap::new();
        ws.insert("connection", "Upgrade".parse().unwrap());
        ws.insert("upgrade", "websocket".parse().unwrap());
        ws.insert("keep-alive", "timeout=5".parse().unwrap());
        ws.insert("accept", "*/*".parse().unwrap());
        let out = forward_headers(ws.clone(), true);
        assert_eq!(out["connection"], "upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert!(!out.contains_key("keep-alive"));
        let out = forward_headers(ws.clone(), false);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["accept"]);
        let resp = response_headers(ws.clone(), false);
        assert_eq!(resp.keys().collect::<Vec<_>>(), ["accept"]);
        let resp = response_headers(ws, true);
        assert_eq!(resp["upgrade"], "websocket");
    }

    #[test]
    fn websocket_requests_are_recognized() {
        let req = |v: Version, m: Method, conn: &str, up: &str| {
            Request::builder()
                .version(v)
                .method(m)
                .header("connection", conn)
                .header("upgrade", up)
                .body(())
                .unwrap()
        };
        assert!(is_websocket(&req(
            Version::HTTP_11,
            Method::GET,
            "keep-alive, Upgrade",
            "WebSocket"
        )));
        assert!(!is_websocket(&req(
            Version::HTTP_11,
            Method::POST,
            "upgrade",
            "websocket"
        )));
        assert!(!is_websocket(&req(
            Version::HTTP_11,
            Method::GET,
            "keep-alive",
            "websocket"
        )));
        assert!(!is_websocket(&req(
            Version::HTTP_11,
            Method::GET,
            "upgrade",
            "h2c"
        )));
        assert!(!is_websocket(&req(
            Version::HTTP_2,
            Method::GET,
            "upgrade",
            "websocket"
        )));
    }
}
