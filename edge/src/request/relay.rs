//! Relaying a request once its stream is open: the request body pumped
//! into the tunnel (kept for a replay while no connector can have seen
//! it), the response body streamed back to the client, and WebSocket
//! pipes after a `101`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, CONNECTION, UPGRADE};
use http::{HeaderMap, Method, Request, Version};
use http_body::{Body as HttpBody, Frame as BodyFrame};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use portico_proto::{CloseCode, ErrorCode};
use prometheus::IntCounter;
use quinn::{RecvStream, SendStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::client_conn::ClientConn;
use crate::request::{BoxError, Fault, Record, RequestBody};
use crate::stall::{now_us, Response, StallBudget, StreamSlot};
use crate::tunnels::StreamGuard;
use crate::Shared;

/// The largest chunk read from a QUIC stream at once.
const CHUNK: usize = 64 * 1024;
/// The most request-body bytes kept for a replay. Bytes are kept only
/// while nothing at all has come back on the tunnel since the head was
/// written (so no connector can have acknowledged them); on a live tunnel
/// that ends within a round trip, on a dead one it bounds the memory.
pub(crate) const REPLAY_LIMIT: usize = 1 << 20;

/// The client's request body, and what of it has been sent on so far.
pub(crate) struct BodySource<B> {
    body: B,
    /// Every chunk taken from `body` while `replayable`, in order.
    sent: Vec<Bytes>,
    sent_len: usize,
    /// `sent` holds everything taken from `body`: another attempt can
    /// replay the body from its start.
    replayable: bool,
    /// `body` is finished.
    ended: bool,
}

impl<B: RequestBody> BodySource<B> {
    pub(crate) fn new(body: B) -> Self {
        let ended = body.is_end_stream();
        BodySource {
            body,
            sent: Vec::new(),
            sent_len: 0,
            replayable: true,
            ended,
        }
    }

    /// Nothing to send: the stream can be finished with the head.
    pub(crate) fn is_empty(&self) -> bool {
        self.ended && self.sent.is_empty()
    }

    pub(crate) fn replayable(&self) -> bool {
        self.replayable
    }

    fn keep(&mut self, chunk: &Bytes) {
        if !self.replayable {
            return;
        }
        if self.sent_len + chunk.len() > REPLAY_LIMIT {
            self.forget();
        } else {
            self.sent_len += chunk.len();
            self.sent.push(chunk.clone());
        }
    }

    /// Some of the body may have reached a connector: it can no longer
    /// be replayed, and what was kept for that is freed.
    fn forget(&mut self) {
        self.replayable = false;
        self.sent = Vec::new();
        self.sent_len = 0;
    }
}

/// Tells whether a tunnel's peer can have acknowledged what was written
/// after a point: not while no datagram at all has arrived from it since
/// (an acknowledgement comes in a datagram received after the data left).
#[derive(Clone)]
pub(crate) struct AckWatch {
    conn: quinn::Connection,
    baseline: Option<u64>,
}

impl AckWatch {
    /// Starts watching now, before anything is written; `track` false
    /// makes every answer "may have been acknowledged".
    pub(crate) fn start(conn: &quinn::Connection, track: bool) -> AckWatch {
        AckWatch {
            conn: conn.clone(),
            baseline: track.then(|| conn.stats().udp_rx.datagrams),
        }
    }

    /// Whether nothing has arrived from the peer since the start.
    pub(crate) fn unacked(&self) -> bool {
        self.baseline == Some(self.conn.stats().udp_rx.datagrams)
    }
}

/// How a pump ended.
pub(crate) enum PumpEnd {
    /// The whole body went into the stream, and the stream was finished.
    Sent,
    /// The client's body failed (malformed chunking, a length mismatch,
    /// the client reset it): the client's fault.
    ClientFailed(BoxError),
    /// The tunnel stream failed under the pump.
    StreamFailed,
    /// The response ended first, or the edge stopped.
    Cancelled,
}

/// A finished pump gives the body back, for another attempt.
pub(crate) struct Pumped<B> {
    pub(crate) source: BodySource<B>,
    pub(crate) end: PumpEnd,
}

/// Streams the request body into the QUIC stream: first what an earlier
/// attempt already took from the client, then the rest as it comes, and
/// finishes the stream. Chunks are kept for a replay while `ack` says no
/// connector can have seen them. On cancel the stream is reset.
pub(crate) async fn pump<B: RequestBody>(
    mut source: BodySource<B>,
    mut send: SendStream,
    cancel: CancellationToken,
    ack: AckWatch,
    bytes_in: (IntCounter, Arc<AtomicU64>),
) -> Pumped<B> {
    let cancelled = CloseCode::Cancelled.to_wire().into();
    let end = |source, end| Pumped { source, end };
    for chunk in source.sent.clone() {
        tokio::select! {
            () = cancel.cancelled() => {
                let _ = send.reset(cancelled);
                return end(source, PumpEnd::Cancelled);
            }
            r = send.write_chunk(chunk) => if r.is_err() {
                return end(source, PumpEnd::StreamFailed);
            },
        }
    }
    loop {
        if source.ended {
            let _ = send.finish();
            return end(source, PumpEnd::Sent);
        }
        let frame = tokio::select! {
            () = cancel.cancelled() => {
                let _ = send.reset(cancelled);
                return end(source, PumpEnd::Cancelled);
            }
            f = source.body.frame() => f,
        };
        let data = match frame {
            None => {
                source.ended = true;
                continue;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers are not carried
            },
            Some(Err(e)) => {
                tracing::debug!(error = %portico_agent::error_chain(&e), "request body from the client failed");
                let _ = send.reset(cancelled);
                return end(source, PumpEnd::ClientFailed(Box::new(e)));
            }
        };
        bytes_in.0.inc_by(data.len() as u64);
        bytes_in.1.fetch_add(data.len() as u64, Ordering::Relaxed);
        // quinn holds the chunk until the connector acknowledges it.
        let data = portico_agent::quic::detach_small(data);
        if source.replayable {
            if ack.unacked() {
                source.keep(&data);
            } else {
                source.forget();
            }
        }
        tokio::select! {
            () = cancel.cancelled() => {
                let _ = send.reset(cancelled);
                return end(source, PumpEnd::Cancelled);
            }
            r = send.write_chunk(data) => if r.is_err() {
                return end(source, PumpEnd::StreamFailed);
            },
        }
    }
}

/// What one request needs while its stream is open: the receive half and
/// the guards. Dropping it before the response ended cancels the stream.
pub(crate) struct Inflight {
    pub(crate) recv: Option<RecvStream>,
    pub(crate) done: bool,
    pub(crate) _cancel_body: DropGuard,
    pub(crate) _stream: Option<StreamGuard>,
    pub(crate) _active: ActiveStream,
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
pub(crate) struct ActiveStream(prometheus::IntGauge);

impl ActiveStream {
    pub(crate) fn new(g: &prometheus::IntGauge) -> Self {
        g.inc();
        ActiveStream(g.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The response body: chunks read from the QUIC stream as the client takes
/// them. Its stream, guards and the request's [`Record`] sit in a
/// [`StreamSlot`] that the connection's stall check watches; the request
/// is recorded when the body ends, is dropped, or is reset for stalling.
pub(crate) struct ResponseBody {
    slot: Arc<StreamSlot>,
    key: usize,
    conn: Arc<ClientConn>,
    stalls: Arc<StallBudget>,
    done: bool,
    bytes_out: IntCounter,
    /// What is left of a `Content-Length`: the client reads no further
    /// (HTTP/1.1 frames the response by it), so the body ends there.
    remaining: Option<u64>,
}

impl ResponseBody {
    /// `length` is the response's `Content-Length`, if it has one. A
    /// response with no body at all (`length == Some(0)`, a HEAD, a 204 or
    /// 304) is complete as it stands.
    pub(crate) fn new(
        mut inflight: Inflight,
        mut record: Record,
        length: Option<u64>,
        shared: &Shared,
        conn: &Arc<ClientConn>,
        abort: Option<CancellationToken>,
    ) -> Self {
        let recv = inflight.recv.take().expect("a response has its stream");
        // The stream is the slot's from now on; `inflight` keeps the guards.
        inflight.done = true;
        let done = length == Some(0);
        if done {
            record.complete();
        }
        let slot = Arc::new(StreamSlot::new(
            Response {
                recv,
                inflight,
                record,
            },
            abort,
        ));
        let key = conn.watch(Arc::clone(&slot));
        ResponseBody {
            slot,
            key,
            conn: Arc::clone(conn),
            stalls: Arc::clone(&shared.stalls),
            done,
            bytes_out: shared.metrics.bytes_out.clone(),
            remaining: length,
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        this.slot.asked(&this.stalls, &this.conn.permit);
        let mut state = this.slot.state();
        let Some(response) = state.as_mut() else {
            // Reset by the stall check.
            this.done = true;
            return Poll::Ready(Some(Err(BoxError::from(
                "the client stopped reading; the response was reset",
            ))));
        };
        // `read_chunk` is cancel safe: a fresh future per poll loses
        // nothing, and its waker registration is the stream's.
        let polled = std::pin::pin!(response.recv.read_chunk(CHUNK, true)).poll(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => {
                let n = chunk.bytes.len() as u64;
                this.bytes_out.inc_by(n);
                response.record.add_bytes_out(n);
                if let Some(rem) = this.remaining.as_mut() {
                    *rem = rem.saturating_sub(n);
                    if *rem == 0 {
                        // The last byte the client will read: the stream's
                        // FIN is not waited for. It usually came with these
                        // bytes, though: take it, without a waker, so the
                        // stream ends read to its end. One dropped before
                        // its FIN wakes the tunnel's driver to stop it
                        // (about 900 instructions a request).
                        this.done = true;
                        response.record.complete();
                        let mut quiet = Context::from_waker(std::task::Waker::noop());
                        let _ =
                            std::pin::pin!(response.recv.read_chunk(CHUNK, true)).poll(&mut quiet);
                    }
                }
                drop(state);
                this.slot.handed_out(now_us());
                Poll::Ready(Some(Ok(BodyFrame::data(chunk.bytes))))
            }
            Poll::Ready(Ok(None)) => {
                this.done = true;
                response.record.complete();
                // Recorded now.
                let ended = state.take();
                drop(state);
                drop(ended);
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                tracing::info!(error = %portico_agent::error_chain(&e), "response body stream failed");
                this.done = true;
                response
                    .record
                    .failed(ErrorCode::ConnectorNotFound, Fault::Connector);
                Poll::Ready(Some(Err(BoxError::from(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.remaining {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.conn.unwatch(self.key, &self.slot);
        self.slot.uncharge(&self.stalls, &self.conn.permit);
        let response = self.slot.state().take();
        if let Some(Response { mut recv, .. }) = response {
            if !self.done {
                // The client left mid-body.
                let _ = recv.stop(CloseCode::Cancelled.to_wire().into());
            }
        }
    }
}

/// After a `101`: the client's upgraded connection and the tunnel stream
/// become one byte pipe, until either side ends. The request is recorded
/// when the pipe ends.
pub(crate) async fn websocket_pipe(
    on_upgrade: hyper::upgrade::OnUpgrade,
    inflight: Inflight,
    send: SendStream,
    mut record: Record,
    hard_stop: CancellationToken,
    bytes: (IntCounter, IntCounter),
) {
    let mut inflight = inflight;
    let Some(recv) = inflight.recv.take() else {
        return;
    };
    let upgraded = tokio::select! {
        () = hard_stop.cancelled() => return,
        r = on_upgrade => match r {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(error = %portico_agent::error_chain(&e), "client upgrade failed");
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
                bytes.0.inc_by(up);
                bytes.1.inc_by(down);
                record.add_bytes_out(down);
                record.complete();
                tracing::debug!(up, down, "websocket closed");
            }
            Err(e) => tracing::debug!(error = %portico_agent::error_chain(&e), "websocket ended with an error"),
        },
    }
    inflight.done = true;
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

/// The request headers to carry to the connector: hop-by-hop ones dropped,
/// except the upgrade pair of a WebSocket request.
pub(crate) fn forward_headers(mut headers: HeaderMap, websocket: bool) -> HeaderMap {
    portico_agent::headers::strip_hop_by_hop(&mut headers, websocket);
    headers
}

/// The response headers to give the user: hop-by-hop ones dropped, except
/// the upgrade pair of a `101`.
pub(crate) fn response_headers(mut headers: HeaderMap, upgraded: bool) -> HeaderMap {
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

    /// A body is kept for a replay up to the limit, and forgotten at once
    /// past it (a replay needs all of it).
    #[test]
    fn replay_keeps_the_body_up_to_its_limit() {
        let mut s = BodySource::new(http_body_util::Empty::<Bytes>::new());
        assert!(s.is_empty());
        let half = Bytes::from(vec![0u8; REPLAY_LIMIT / 2]);
        s.keep(&half);
        s.keep(&half);
        assert!(s.replayable());
        assert_eq!(s.sent_len, REPLAY_LIMIT);
        s.keep(&Bytes::from_static(b"x"));
        assert!(!s.replayable());
        assert!(s.sent.is_empty());
        s.keep(&half);
        assert!(s.sent.is_empty(), "nothing is kept once forgotten");
    }
}
