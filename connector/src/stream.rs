//! One data stream: read the edge's `StreamHead`, proxy the request to the
//! app's internal URL, answer `ResponseHead` or `Error`, then move body bytes
//! both ways (or, after a WebSocket `101`, raw bytes) with backpressure.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, Version};
use http_body::{Body, Frame as BodyFrame, SizeHint};
use http_body_util::BodyExt;
use portico_proto::api::{App, AppLink, BackendCa};
use portico_proto::io::{read_frame, ReadError, WriteError};
use portico_proto::{
    AppId, CloseCode, ErrorCode, Frame, GroupId, ResponseHead, StreamError, StreamHead, StreamKind,
};
use quinn::{RecvStream, SendStream, VarInt};
use tracing::Instrument;

use crate::error::ProxyError;
use crate::headers::{request_headers, response_headers, InternalUrl, RequestMeta};
use crate::metrics::Metrics;
use crate::origin::{classify, Backend, BoxError, Origin, ReqBody};
use crate::rewrite::{BodyKind, BodyRewriter};
use crate::translate::{Links, Translator};

/// How long the edge may take to send a stream's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The timeout used when a head carries none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(85);
/// The longest timeout a head may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(3700);
/// How long a finished stream waits for the edge to acknowledge its bytes.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// The most bytes read from the tunnel in one body chunk.
const CHUNK: usize = 64 * 1024;
/// The longest message put in an `Error` frame.
const MAX_MESSAGE: usize = 1000;

/// One published app as the connector serves it.
#[derive(Debug)]
pub(crate) struct AppEntry {
    pub app: App,
    /// The parsed internal URL, or why it cannot be used.
    pub internal: Result<InternalUrl, String>,
    /// Its backend CA bundle, which `backend` trusts.
    pub ca: Option<String>,
    /// Its client, pool and connection cap.
    pub backend: Arc<Backend>,
    /// Its link translation (every app's links, its own prefix and host),
    /// when its internal URL parses.
    pub translator: Option<Arc<Translator>>,
    /// Its identity header names, lower-case: a client's header of one of
    /// these names is dropped.
    pub identity_names: Vec<String>,
}

/// The apps of this connector's group, by id.
pub(crate) type AppTable = HashMap<AppId, Arc<AppEntry>>;

/// Builds the table of the apps in `group`, each translating links by
/// `links`; apps of other groups are left out. An app whose internal URL,
/// TLS validation, backend CA bundle and timeout are as in
/// `previous` keeps its backend (its pool, its open connections and the
/// permits they hold), so a config change neither drops warm connections
/// nor lets an app hold its cap twice.
pub(crate) fn app_table(
    apps: &[App],
    group: &GroupId,
    origin: &Origin,
    previous: &AppTable,
    links: &Arc<Links>,
    cas: &[BackendCa],
) -> AppTable {
    apps.iter()
        .filter(|a| &a.connector_group == group)
        .map(|a| {
            let internal = InternalUrl::parse(&a.internal_url).map_err(|e| e.to_string());
            let ca = cas.iter().find(|c| c.app == a.id).map(|c| c.pem.as_str());
            let backend = match previous.get(&a.id) {
                Some(p)
                    if p.app.internal_url == a.internal_url
                        && p.app.validate_backend_tls == a.validate_backend_tls
                        && p.app.backend_timeout == a.backend_timeout
                        && p.app.backend_ca_sha256 == a.backend_ca_sha256
                        && p.ca.as_deref() == ca =>
                {
                    p.backend.clone()
                }
                _ => Arc::new(origin.backend(a, ca)),
            };
            (
                a.id.clone(),
                Arc::new(AppEntry {
                    app: a.clone(),
                    internal,
                    ca: ca.map(str::to_owned),
                    backend,
                    translator: Translator::new(links.clone(), &a.internal_url).map(Arc::new),
                    identity_names: a
                        .identity_headers
                        .keys()
                        .map(|h| h.to_ascii_lowercase())
                        .collect(),
                }),
            )
        })
        .collect()
}

/// What every stream handler needs.
#[derive(Debug)]
pub(crate) struct StreamCtx {
    pub group: GroupId,
    pub apps: ArcSwap<AppTable>,
    pub origin: Origin,
    pub metrics: Metrics,
    /// `portico_connector_shard_streams_total{shard}`, resolved per shard.
    pub shard_streams: Vec<prometheus::IntCounter>,
}

/// The per-shard stream counters of `metrics` for `shards` shards.
pub(crate) fn shard_streams(metrics: &Metrics, shards: usize) -> Vec<prometheus::IntCounter> {
    (0..shards.max(1))
        .map(|i| metrics.shard_streams.with_label_values(&[&i.to_string()]))
        .collect()
}

impl StreamCtx {
    /// Serves `apps` (this group's) from now on, translating `links`
    /// (every published app's; with none, those of `apps`), each app's
    /// backend trusting its bundle of `cas`; see [`app_table`].
    pub fn set_apps(&self, apps: &[App], links: &[AppLink], cas: &[BackendCa]) {
        let previous = self.apps.load();
        let links = Arc::new(Links::of_config(links, apps));
        let table = app_table(apps, &self.group, &self.origin, &previous, &links, cas);
        self.apps.store(Arc::new(table));
    }
}

/// Serves one stream the edge opened, to its end. Never panics on what the
/// edge sends: a malformed head resets this stream with `ProtocolError` and
/// leaves the tunnel alone.
pub(crate) async fn serve_stream(ctx: Arc<StreamCtx>, mut send: SendStream, mut recv: RecvStream) {
    let _gauge = GaugeGuard::new(&ctx.metrics.streams);
    if let Some(c) = ctx.shard_streams.get(crate::shard::current()) {
        c.inc();
    }
    let started = Instant::now();
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(Some(Frame::StreamHead(head)))) => head,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            tracing::warn!(frame = ?other.frame_type(), "stream did not start with a StreamHead; resetting it");
            reset(&mut send, &mut recv, CloseCode::ProtocolError);
            return;
        }
        Ok(Err(ReadError::Io(e))) => {
            tracing::debug!(error = %portico_agent::error_chain(&e), "stream closed before its head");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %portico_agent::error_chain(&e), "malformed stream head; resetting the stream");
            reset(&mut send, &mut recv, CloseCode::ProtocolError);
            return;
        }
        Err(_) => {
            tracing::warn!("no stream head within {HEAD_TIMEOUT:?}; resetting the stream");
            reset(&mut send, &mut recv, CloseCode::ProtocolError);
            return;
        }
    };
    let span = tracing::info_span!("stream", request.id = %head.request_id, app = %head.app);
    async move {
        let entry = ctx.apps.load().get(&head.app).cloned();
        // A second handle on the entry (a reference count) for the label,
        // not a copy of the id.
        let labelled = entry.clone();
        let app_label = labelled.as_ref().map_or("", |e| e.app.id.as_str());
        let outcome = proxy(&ctx, entry, head, &mut send, recv).await;
        let (status, code) = match &outcome {
            Outcome::Answered { status } => (status.as_u16(), None),
            Outcome::Failed { error } => (error.code().http_status().as_u16(), Some(error.code())),
            Outcome::Gone { status } => (status.map_or(0, |s| s.as_u16()), None),
        };
        let code_label = code.map_or("", ErrorCode::as_str);
        // "0" when the stream ended before any status; no allocation else.
        let status_code = StatusCode::from_u16(status).ok();
        let status_label = status_code.as_ref().map_or("0", StatusCode::as_str);
        ctx.metrics
            .requests
            .with_label_values(&[app_label, status_label, code_label])
            .inc();
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &outcome {
            Outcome::Failed { error: error @ ProxyError::PathOutsidePrefix { .. } } => {
                tracing::warn!(status, code = code_label, duration_ms, error = %portico_agent::error_chain(error), "refused a path that leaves the app's prefix; the backend never saw it")
            }
            Outcome::Failed { error } => {
                tracing::info!(status, code = code_label, duration_ms, error = %portico_agent::error_chain(error), "stream done")
            }
            Outcome::Gone { .. } => {
                tracing::info!(status, code = code_label, duration_ms, "stream cancelled by the edge")
            }
            Outcome::Answered { .. } => tracing::info!(status, code = code_label, duration_ms, "stream done"),
        }
        // Stay until the edge has every byte, so a draining tunnel does not
        // close under a stream's last bytes.
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, send.stopped()).await;
    }
    .instrument(span)
    .await
}

/// How a stream ended.
enum Outcome {
    /// A response head was sent and the body (or pipe) ran to its end.
    Answered { status: StatusCode },
    /// An `Error` frame was sent instead of a response head.
    Failed { error: ProxyError },
    /// The edge went away mid-way (the user cancelled).
    Gone { status: Option<StatusCode> },
}

async fn proxy(
    ctx: &StreamCtx,
    entry: Option<Arc<AppEntry>>,
    mut head: StreamHead,
    send: &mut SendStream,
    mut recv: RecvStream,
) -> Outcome {
    let prepared = match prepare(ctx, entry, &head) {
        Ok(p) => p,
        Err(error) => return fail(send, error).await,
    };
    let Prepared { entry, uri, host } = prepared;
    let meta = RequestMeta {
        kind: head.kind,
        request_id: head.request_id,
        authority: std::mem::take(&mut head.authority),
        client_ip: head.client_addr.ip(),
    };
    // The head is ours: move its headers instead of copying them.
    let incoming = std::mem::take(&mut head.headers);
    let mut headers = request_headers(incoming, meta, host, &entry.identity_names);
    crate::headers::identity_headers(&mut headers, &entry.app.identity_headers, &head.ext);
    if entry.app.translate_body {
        // A compressed body could not be rewritten.
        headers.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
    }
    let websocket = head.kind == StreamKind::WebSocket;
    let timeout = match head.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms).min(MAX_TIMEOUT),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    // Only an error names the target: format it then, not per request.
    let timeout_error = || ProxyError::Timeout {
        target: uri.to_string(),
        timeout_ms: timeout.as_millis() as u64,
    };

    // The request body: none for an upgrade; otherwise streamed from the
    // tunnel, with its exact length when the user sent one.
    let mut pipe_recv = None;
    let body: ReqBody = if websocket {
        pipe_recv = Some(recv);
        http_body_util::Empty::new()
            .map_err(|e| match e {})
            .boxed_unsync()
    } else {
        let length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let first = if length.is_none() {
            // No length: peek, so a body-less request stays body-less.
            match tokio::time::timeout_at(deadline, recv.read_chunk(CHUNK, true)).await {
                Err(_) => return fail(send, timeout_error()).await,
                Ok(Ok(first)) => match first {
                    Some(c) => Some(c.bytes),
                    None => {
                        return Box::pin(send_request(
                            ctx,
                            &entry,
                            head.kind,
                            head.method.clone(),
                            &uri,
                            headers,
                            empty_body(),
                            None,
                            deadline,
                            send,
                            timeout_error,
                        ))
                        .await
                    }
                },
                Ok(Err(e)) => {
                    tracing::debug!(error = %portico_agent::error_chain(&e), "request body failed before it was sent");
                    return Outcome::Gone { status: None };
                }
            }
        } else {
            None
        };
        if length == Some(0) {
            empty_body()
        } else {
            TunnelBody::new(recv, first, length, ctx.metrics.bytes_in.clone()).boxed_unsync()
        }
    };
    Box::pin(send_request(
        ctx,
        &entry,
        head.kind,
        head.method.clone(),
        &uri,
        headers,
        body,
        pipe_recv,
        deadline,
        send,
        timeout_error,
    ))
    .await
}

fn empty_body() -> ReqBody {
    http_body_util::Empty::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

struct Prepared {
    entry: Arc<AppEntry>,
    uri: http::Uri,
    /// The backend's `Host` header.
    host: http::HeaderValue,
}

fn prepare(
    ctx: &StreamCtx,
    entry: Option<Arc<AppEntry>>,
    head: &StreamHead,
) -> Result<Prepared, ProxyError> {
    let entry = match entry {
        Some(e) if e.app.connector_group == ctx.group => e,
        _ => {
            return Err(ProxyError::AppNotFound {
                app: head.app.to_string(),
            })
        }
    };
    match head.kind {
        StreamKind::Http | StreamKind::WebSocket => {}
        other => {
            return Err(ProxyError::BadRequest {
                reason: format!("stream kind {other:?} is not supported by this connector"),
            })
        }
    }
    // Borrowed, not cloned: the stream keeps the entry.
    let (uri, host) = match &entry.internal {
        Ok(target) if target.is_wildcard() => {
            let target = target.with_label(wildcard_label_of(&entry.app, head)?)?;
            (target.join(head.path.clone())?, target.host)
        }
        Ok(target) => (target.join(head.path.clone())?, target.host.clone()),
        Err(reason) => {
            return Err(ProxyError::Unreachable {
                target: entry.app.internal_url.clone(),
                reason: reason.clone(),
            })
        }
    };
    Ok(Prepared { entry, uri, host })
}

/// The label a wildcard app's request matched: its authority's host
/// (port and a trailing dot dropped, lower-cased) less the app's
/// `*.<suffix>`, one LDH label. The edge routed the request by that rule,
/// so anything else is a bad request, never a guess.
fn wildcard_label_of<'h>(app: &App, head: &'h StreamHead) -> Result<&'h str, ProxyError> {
    let bad = |why: &str| ProxyError::BadRequest {
        reason: format!(
            "request host {:?} for wildcard app {} ({}): {why}",
            String::from_utf8_lossy(&head.authority),
            app.id,
            app.external_host
        ),
    };
    let suffix = portico_proto::api::wildcard_suffix(&app.external_host)
        .ok_or_else(|| bad("the app's external host is not a wildcard, its internal host is"))?;
    let authority = std::str::from_utf8(&head.authority).map_err(|_| bad("not UTF-8"))?;
    let host = authority
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(host, _)| host);
    let host = host.strip_suffix('.').unwrap_or(host);
    let (label, parent) = host
        .split_once('.')
        .ok_or_else(|| bad("not under the wildcard"))?;
    if !parent.eq_ignore_ascii_case(suffix) || !portico_proto::api::is_ldh_label(label) {
        return Err(bad("not one label under the wildcard"));
    }
    Ok(label)
}

#[allow(clippy::too_many_arguments)]
async fn send_request(
    ctx: &StreamCtx,
    entry: &AppEntry,
    kind: StreamKind,
    method: http::Method,
    target: &http::Uri,
    headers: http::HeaderMap,
    body: ReqBody,
    pipe_recv: Option<RecvStream>,
    deadline: tokio::time::Instant,
    send: &mut SendStream,
    timeout_error: impl Fn() -> ProxyError,
) -> Outcome {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = target.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    let client = entry.backend.client();
    let sent = Instant::now();
    let response = tokio::select! {
        r = tokio::time::timeout_at(deadline, client.request(req)) => r,
        _ = send.stopped() => return Outcome::Gone { status: None },
    };
    ctx.metrics
        .backend_duration
        .with_label_values(&[entry.app.id.as_str()])
        .observe(sent.elapsed().as_secs_f64());
    let response = match response {
        Err(_) => return fail(send, timeout_error()).await,
        Ok(Err(e)) => return fail(send, classify(&e, &target.to_string())).await,
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let switching = kind == StreamKind::WebSocket && status == StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = response.into_parts();
    // An upgrade hands `parts` back to hyper below; otherwise the headers
    // are moved, not copied.
    let headers = if switching {
        parts.headers.clone()
    } else {
        std::mem::take(&mut parts.headers)
    };
    let mut headers = response_headers(headers, switching);
    let translator = entry.translator.as_ref();
    if let Some(t) = translator.filter(|_| entry.app.translate_headers) {
        crate::translate::response_headers(&mut headers, t);
    }
    // A part of a body (206) keeps the backend's bytes: its range is of
    // them, and a rewrite would break the offsets.
    let rewriter = match translator {
        Some(t)
            if entry.app.translate_body && !switching && status != StatusCode::PARTIAL_CONTENT =>
        {
            BodyKind::of(&headers).map(|kind| BodyRewriter::new(kind, t.clone()))
        }
        _ => None,
    };
    if rewriter.is_some() {
        rewritten_representation(&mut headers);
    }
    let head = ResponseHead { status, headers };
    if let Err(e) = send_frame(send, &Frame::ResponseHead(head)).await {
        return match e {
            WriteError::Encode(e) => {
                fail(
                    send,
                    ProxyError::Internal {
                        reason: format!("the backend's response head cannot be forwarded: {e}"),
                    },
                )
                .await
            }
            _ => Outcome::Gone {
                status: Some(status),
            },
        };
    }
    if switching {
        let Some(recv) = pipe_recv else {
            return Outcome::Gone {
                status: Some(status),
            };
        };
        let response = http::Response::from_parts(parts, body);
        return pipe_upgrade(ctx, response, recv, send).await;
    }
    drop(pipe_recv);
    copy_response_body(ctx, body, send, status, rewriter).await
}

/// Streams the backend's body to the edge, through `rewriter` when the
/// app translates this body's links.
async fn copy_response_body(
    ctx: &StreamCtx,
    mut body: hyper::body::Incoming,
    send: &mut SendStream,
    status: StatusCode,
    mut rewriter: Option<BodyRewriter>,
) -> Outcome {
    let bytes = ctx.metrics.bytes_out.clone();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    let data = match rewriter.as_mut() {
                        Some(r) => r.push(&data),
                        None => data,
                    };
                    if data.is_empty() {
                        continue;
                    }
                    let n = data.len() as u64;
                    // quinn holds the chunk until the edge acknowledges it.
                    let data = portico_agent::quic::detach_small(data);
                    if send.write_chunk(data).await.is_err() {
                        return Outcome::Gone {
                            status: Some(status),
                        };
                    }
                    bytes.inc_by(n);
                }
            }
            Err(e) => {
                tracing::warn!(error = %portico_agent::error_chain(&e), "backend response body failed; resetting the stream");
                let _ = send.reset(code(CloseCode::Internal));
                return Outcome::Answered { status };
            }
        }
    }
    if let Some(rest) = rewriter.map(BodyRewriter::finish).filter(|b| !b.is_empty()) {
        let n = rest.len() as u64;
        if send.write_chunk(rest).await.is_err() {
            return Outcome::Gone {
                status: Some(status),
            };
        }
        bytes.inc_by(n);
    }
    finish(send).await;
    Outcome::Answered { status }
}

/// After a `101`: the stream becomes a byte pipe to the upgraded backend
/// connection, until both directions have ended.
async fn pipe_upgrade(
    ctx: &StreamCtx,
    response: http::Response<hyper::body::Incoming>,
    recv: RecvStream,
    send: &mut SendStream,
) -> Outcome {
    let status = response.status();
    let upgraded = match hyper::upgrade::on(response).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %portico_agent::error_chain(&e), "backend upgrade failed after 101");
            let _ = send.reset(code(CloseCode::Internal));
            return Outcome::Answered { status };
        }
    };
    let mut backend = hyper_util::rt::TokioIo::new(upgraded);
    let mut tunnel = tokio::io::join(recv, &mut *send);
    match tokio::io::copy_bidirectional(&mut tunnel, &mut backend).await {
        Ok((up, down)) => {
            ctx.metrics.bytes_in.inc_by(up);
            ctx.metrics.bytes_out.inc_by(down);
            drop(tunnel);
            finish(send).await;
        }
        Err(e) => {
            tracing::debug!(error = %portico_agent::error_chain(&e), "upgraded connection ended with an error");
            drop(tunnel);
            let _ = send.reset(code(CloseCode::Cancelled));
        }
    }
    Outcome::Answered { status }
}

/// Answers `Error{code, message}` and ends the stream.
async fn fail(send: &mut SendStream, error: ProxyError) -> Outcome {
    let mut message = portico_agent::error_chain(&error).to_string();
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let frame = Frame::Error(StreamError {
        code: error.code(),
        message,
    });
    if send_frame(send, &frame).await.is_err() {
        return Outcome::Gone { status: None };
    }
    finish(send).await;
    Outcome::Failed { error }
}

/// Writes one frame. Its bytes (from `Frame::to_bytes`'s pooled blocks) go
/// to quinn as they are, where `write_frame`'s `write_all` would copy them.
async fn send_frame(send: &mut SendStream, frame: &Frame) -> Result<(), WriteError> {
    let bytes = frame.to_bytes()?;
    send.write_chunk(bytes)
        .await
        .map_err(|e| WriteError::Io(e.into()))
}

/// Finishes the send side; `serve_stream` then waits for the edge's
/// acknowledgement.
async fn finish(send: &mut SendStream) {
    let _ = send.finish();
}

fn reset(send: &mut SendStream, recv: &mut RecvStream, why: CloseCode) {
    let _ = send.reset(code(why));
    let _ = recv.stop(code(why));
}

pub(crate) fn code(c: CloseCode) -> VarInt {
    VarInt::from_u32(c.to_wire())
}

/// A request body read from the tunnel as the backend connection accepts
/// it: hyper polls it only when it can write, and QUIC flow control holds
/// the edge back meanwhile, so memory stays bounded.
struct TunnelBody {
    recv: RecvStream,
    first: Option<Bytes>,
    /// Bytes still expected, when the user sent a `Content-Length`.
    remaining: Option<u64>,
    buf: BytesMut,
    done: bool,
    counter: prometheus::IntCounter,
}

impl TunnelBody {
    fn new(
        recv: RecvStream,
        first: Option<Bytes>,
        length: Option<u64>,
        counter: prometheus::IntCounter,
    ) -> Self {
        TunnelBody {
            recv,
            first,
            remaining: length,
            buf: BytesMut::new(),
            done: false,
            counter,
        }
    }

    fn data(&mut self, data: Bytes) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        let n = data.len() as u64;
        if let Some(rem) = self.remaining.as_mut() {
            if n > *rem {
                self.done = true;
                return Poll::Ready(Some(Err(
                    "request body longer than its Content-Length".into()
                )));
            }
            *rem -= n;
        }
        self.counter.inc_by(n);
        Poll::Ready(Some(Ok(BodyFrame::data(data))))
    }
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            return this.data(first);
        }
        if this.done || this.remaining == Some(0) {
            return Poll::Ready(None);
        }
        if this.buf.capacity() < CHUNK / 4 {
            this.buf.reserve(CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.recv), cx, &mut this.buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(0)) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Ok(_)) => {
                let data = this.buf.split().freeze();
                this.data(data)
            }
            Poll::Ready(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.done || self.remaining == Some(0))
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first.as_ref().map_or(0, |b| b.len() as u64);
        match self.remaining {
            Some(rem) => SizeHint::with_exact(rem + first),
            None => {
                let mut h = SizeHint::new();
                h.set_lower(first);
                h
            }
        }
    }
}

/// Keeps a gauge up while alive.
struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    fn new(g: &prometheus::IntGauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The head of a body the connector rewrites: another representation of
/// the resource, so its length goes (the body goes chunked), a strong
/// `ETag` becomes weak (the same content, not the same bytes: RFC 9110,
/// 8.8.1, as nginx does for gzip), digests of the backend's bytes go, and
/// no range of it is offered (a range would be of the backend's bytes).
fn rewritten_representation(headers: &mut http::HeaderMap) {
    use http::header::{HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, ETAG};
    headers.remove(CONTENT_LENGTH);
    if let Some(tag) = headers.get(ETAG) {
        if tag.as_bytes().starts_with(b"\"") {
            let weak = [b"W/", tag.as_bytes()].concat();
            match HeaderValue::from_bytes(&weak) {
                Ok(v) => {
                    headers.insert(ETAG, v);
                }
                Err(_) => {
                    headers.remove(ETAG);
                }
            }
        }
    }
    for digest in ["content-digest", "repr-digest", "digest", "content-md5"] {
        headers.remove(digest);
    }
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("none"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_body_has_a_weak_etag_no_length_no_digest_and_no_ranges() {
        let mut h = http::HeaderMap::new();
        h.insert("etag", "\"v1\"".parse().unwrap());
        h.insert("content-length", "10".parse().unwrap());
        h.insert("accept-ranges", "bytes".parse().unwrap());
        h.insert("content-digest", "sha-256=:AA==:".parse().unwrap());
        h.insert("content-type", "text/html".parse().unwrap());
        rewritten_representation(&mut h);
        assert_eq!(h["etag"], "W/\"v1\"");
        assert_eq!(h["accept-ranges"], "none");
        assert!(h.get("content-length").is_none() && h.get("content-digest").is_none());
        assert_eq!(h["content-type"], "text/html");
        // A weak one stays as it is.
        let mut h = http::HeaderMap::new();
        h.insert("etag", "W/\"v1\"".parse().unwrap());
        rewritten_representation(&mut h);
        assert_eq!(h["etag"], "W/\"v1\"");
    }
}
