//! Phases 3 and 4 and the retry loop: select an upstream (a tunnel of the
//! app's group on this edge, else another edge that holds one, over the
//! mesh), open a stream on it, write the head and pump the body, and wait
//! for the response head. A failed attempt is tried again on another
//! upstream when its error says that is safe ([`Retry`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use portico_proto::api::App;
use portico_proto::io::{read_frame, ReadError};
use portico_proto::{
    capabilities, CloseCode, Frame, HeadExtensionsRef, ResponseHead, StreamHeadRef, StreamKind,
};
use tokio::task::JoinHandle;

use crate::client_conn::ClientConn;
use crate::mesh::MeshLink;
use crate::request::relay::{
    self, forward_headers, is_websocket, response_headers, AckWatch, ActiveStream, BodySource,
    Inflight, PumpEnd, Pumped, ResponseBody,
};
use crate::request::{Body, ProxyError, Record, RequestBody, Retry};
use crate::tunnels::{StreamGuard, Tunnel};
use crate::Shared;
use portico_proto::api::PeerEdge;
use portico_proto::EdgeId;

/// The most attempts one request gets, the first included.
const MAX_ATTEMPTS: u8 = 3;

/// An upstream a request can be sent to.
pub(crate) enum Upstream {
    /// A tunnel on this edge, to a connector of the app's group.
    Tunnel(Arc<Tunnel>),
    /// Another edge that holds a tunnel of the group: the request goes
    /// over a mesh link to it.
    Peer(PeerEdge),
}

/// What an attempt is sent on.
#[derive(Clone)]
pub(crate) enum Via {
    Tunnel(Arc<Tunnel>),
    Mesh(Arc<MeshLink>),
}

impl Via {
    fn conn(&self) -> &quinn::Connection {
        match self {
            Via::Tunnel(t) => &t.conn,
            Via::Mesh(l) => &l.conn,
        }
    }

    fn stream_guard(&self) -> Option<StreamGuard> {
        match self {
            Via::Tunnel(t) => Some(t.stream_guard()),
            Via::Mesh(_) => None,
        }
    }

    /// Closes the connection for a protocol error of its peer.
    fn close(&self, code: CloseCode, reason: &str) {
        match self {
            Via::Tunnel(t) => t.close(code, reason),
            Via::Mesh(l) => l.conn.close(code.to_wire().into(), reason.as_bytes()),
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Tunnel(t) => write!(f, "tunnel {} of connector {}", t.id, t.connector),
            Via::Mesh(l) => write!(f, "mesh link to edge {}", l.peer),
        }
    }
}

/// Phase 3: an upstream for the app, not one of `tried`. Among the
/// group's tunnels on this edge, those of connectors not tried yet come
/// first (a retry goes to another connector when there is one). With none
/// here, another edge that holds one and was not tried: one that is not
/// draining first, then of this edge's region, then the nearest by the
/// link's measured RTT, then the least loaded. While the router cannot be
/// reached and the presence names nobody, any edge of this region.
pub(crate) fn select(
    shared: &Shared,
    app: &App,
    tried: &[Arc<Tunnel>],
    tried_peers: &[EdgeId],
    needs_extensions: bool,
) -> Result<Upstream, ProxyError> {
    match select_tunnel(shared, app, tried, needs_extensions) {
        Ok(t) => Ok(Upstream::Tunnel(t)),
        Err(no_tunnel) => {
            let table = shared.table.load();
            let untried = |p: &&PeerEdge| p.id != shared.edge_id && !tried_peers.contains(&p.id);
            let mut peers: Vec<&PeerEdge> = table
                .peers_holding(&app.connector_group)
                .into_iter()
                .filter(untried)
                .collect();
            // Without the router, the presence is as old as the last
            // config: a connector may have moved its tunnels to another
            // edge of this region since (when this edge drained and
            // restarted). Ask those edges; one without a tunnel of the
            // group answers MeshUnreachable at once, and the next is tried.
            if peers.is_empty() && !shared.router_reachable.load(Ordering::Relaxed) {
                peers = table
                    .mesh_peers_in(&shared.region)
                    .into_iter()
                    .filter(untried)
                    .collect();
            }
            let mesh = shared.mesh();
            peers.sort_by_cached_key(|p| {
                let (link_draining, rtt) = mesh.link_state(&p.id);
                (
                    p.draining || link_draining,
                    p.region != shared.region,
                    rtt.unwrap_or(std::time::Duration::MAX),
                    p.tunnels,
                    p.id.clone(),
                )
            });
            match peers.first() {
                Some(p) => Ok(Upstream::Peer((*p).clone())),
                None => Err(no_tunnel),
            }
        }
    }
}

fn select_tunnel(
    shared: &Shared,
    app: &App,
    tried: &[Arc<Tunnel>],
    needs_extensions: bool,
) -> Result<Arc<Tunnel>, ProxyError> {
    // A signed-in user's head carries claims in the extension area: only
    // a connector that reads it may get the request (an older one would
    // refuse the head, or serve the app without the identity).
    let able =
        |t: &Tunnel| !needs_extensions || t.capabilities & capabilities::HEAD_EXTENSIONS != 0;
    let fresh = shared.tunnels.pick(&app.connector_group, |t| {
        able(t)
            && !tried
                .iter()
                .any(|u| u.id == t.id || u.connector == t.connector)
    });
    let tunnel = fresh
        .or_else(|| {
            shared.tunnels.pick(&app.connector_group, |t| {
                able(t) && !tried.iter().any(|u| u.id == t.id)
            })
        })
        .ok_or_else(|| ProxyError::NoTunnel {
            group: app.connector_group.clone(),
        })?;
    if shared.tunnels.shards() > 1 {
        if tunnel.shard == crate::shard::current() {
            shared.metrics.picks_own_shard.inc();
        } else {
            shared.metrics.picks_other_shard.inc();
        }
    }
    Ok(tunnel)
}

/// Phases 3 to 5 with retries: what the request gets back, a response
/// head with its body, or the error of the last attempt.
pub(crate) async fn forward<B: RequestBody>(
    mut req: Request<B>,
    app: &Arc<App>,
    shared: &Shared,
    client: std::net::SocketAddr,
    record: &mut Record,
    identity: Option<&crate::auth::Identity>,
) -> Result<Relayed, ProxyError> {
    let websocket = is_websocket(&req);
    let timeout = app.backend_timeout.duration();
    // The request's headers are not needed after this: move them out (the
    // authority may borrow from them), and encode the head from borrowed
    // parts of the request, once for every attempt.
    let headers = forward_headers(std::mem::take(req.headers_mut()), websocket);
    let head = StreamHeadRef {
        kind: if websocket {
            StreamKind::WebSocket
        } else {
            StreamKind::Http
        },
        request_id: record.id,
        app: app.id.as_str(),
        method: req.method(),
        authority: authority_of(req.uri(), &headers),
        path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
        headers: &headers,
        client_addr: client,
        identity: identity.map(|i| i.sub()),
        // The claims and the assertion go only to a peer that negotiated
        // the extension area: `select` skips tunnels without it.
        ext: match identity {
            None => HeadExtensionsRef::NONE,
            Some(i) => {
                let ext =
                    HeadExtensionsRef::for_peer(capabilities::ALL).with_identity_claims(i.claims());
                match &i.assertion {
                    Some(a) => ext.with_assertion(a),
                    None => ext,
                }
            }
        },
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    }
    .to_bytes()
    .map_err(ProxyError::HeadTooLarge)?;
    drop(headers);
    let deadline = tokio::time::Instant::now() + timeout + shared.connector_timeout_grace;
    let method = req.method().clone();
    let mut on_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let mut body = Some(BodySource::new(req.into_body()));
    let mut tried: Vec<Arc<Tunnel>> = Vec::new();
    let mut tried_peers: Vec<EdgeId> = Vec::new();
    // The head with the hop count and this edge as the origin, made on
    // the first mesh attempt.
    let mut mesh_head: Option<Bytes> = None;
    let mut replayed_idempotent = false;
    // The error of the last failed attempt: once no upstream is left to
    // try, it is the answer (a BackendBusy stays BackendBusy).
    let mut last: Option<ProxyError> = None;
    loop {
        let via = match select(shared, app, &tried, &tried_peers, identity.is_some()) {
            Ok(Upstream::Tunnel(tunnel)) => Via::Tunnel(tunnel),
            Ok(Upstream::Peer(peer)) => {
                tried_peers.push(peer.id.clone());
                match shared.mesh().link(shared, &peer).await {
                    Ok(link) => Via::Mesh(link),
                    Err(reason) => {
                        tracing::info!(peer = %peer.id, %reason, "no mesh link; trying another upstream");
                        last = Some(ProxyError::Mesh {
                            peer: peer.id,
                            reason,
                        });
                        continue;
                    }
                }
            }
            Err(none_left) => return Err(last.unwrap_or(none_left)),
        };
        let head = match &via {
            Via::Tunnel(_) => &head,
            Via::Mesh(_) => {
                if mesh_head.is_none() {
                    let forwarded = crate::mesh::forwarded_head(&head, &shared.edge_id)
                        .map_err(|reason| ProxyError::Protocol { reason })?;
                    mesh_head = Some(forwarded);
                }
                mesh_head.as_ref().expect("set above")
            }
        };
        if let Via::Mesh(_) = via {
            shared.metrics.mesh_forwarded.inc();
        }
        record.attempt(&via);
        let attempt = Attempt {
            via: &via,
            head,
            method: &method,
            websocket,
            shared,
        };
        let result =
            tokio::time::timeout_at(deadline, attempt.run(&mut body, &mut on_upgrade, record))
                .await
                .unwrap_or(Err(ProxyError::ConnectorTimeout));
        let error = match result {
            Ok(relayed) => return Ok(relayed),
            Err(e) => e,
        };
        let retry = error.retry();
        let allowed = match retry {
            Retry::Safe => true,
            Retry::IfIdempotent => is_idempotent(&method) && !replayed_idempotent,
            Retry::Never => false,
        };
        let body_ready = body.as_ref().is_some_and(BodySource::replayable);
        if !allowed || !body_ready || record.attempts() >= MAX_ATTEMPTS {
            return Err(error);
        }
        replayed_idempotent |= retry == Retry::IfIdempotent;
        tracing::info!(
            upstream = %via,
            attempt = record.attempts(),
            error = %portico_agent::error_chain(&error),
            "retrying the request on another upstream"
        );
        shared
            .metrics
            .retries
            .with_label_values(&[retry_label(retry)])
            .inc();
        if let Via::Tunnel(tunnel) = via {
            tried.push(tunnel);
        }
        last = Some(error);
    }
}

fn retry_label(r: Retry) -> &'static str {
    match r {
        Retry::Safe => "not_delivered",
        Retry::IfIdempotent => "idempotent",
        Retry::Never => "never",
    }
}

/// GET, HEAD and OPTIONS: replayed once when the tunnel died before the
/// first response byte.
fn is_idempotent(m: &Method) -> bool {
    *m == Method::GET || *m == Method::HEAD || *m == Method::OPTIONS
}

/// What a successful attempt hands back: the response head, and what the
/// body (or the WebSocket pipe) needs.
pub(crate) struct Relayed {
    pub(crate) status: StatusCode,
    pub(crate) headers: http::HeaderMap,
    pub(crate) inflight: Inflight,
    /// After a `101`: the client's upgrade and the stream's send half.
    pub(crate) upgrade: Option<(hyper::upgrade::OnUpgrade, quinn::SendStream)>,
    /// A response that has no body whatever its headers say: to a HEAD,
    /// or a 204 or 304.
    pub(crate) bodiless: bool,
    /// The edge it crossed over the mesh, if it did.
    pub(crate) peer: Option<EdgeId>,
}

impl Relayed {
    /// The response: its body streams from the tunnel and carries the
    /// record; a `101` starts the pipe, which carries it instead.
    pub(crate) fn into_response(
        self,
        mut record: Record,
        shared: &Shared,
        conn: &Arc<ClientConn>,
        abort: Option<tokio_util::sync::CancellationToken>,
    ) -> Response<Body> {
        record.responded(self.status, None, None);
        let mut resp = Response::new(());
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers;
        let route = match &self.peer {
            None => Some(shared.route.clone()),
            Some(peer) => http::HeaderValue::try_from(format!("{}, {peer}", shared.edge_id)).ok(),
        };
        if let Some(route) = route {
            resp.headers_mut().insert(ROUTE, route);
        }
        match self.upgrade {
            Some((on_upgrade, send)) => {
                shared
                    .conns
                    .spawn(tracing::Instrument::in_current_span(relay::websocket_pipe(
                        on_upgrade,
                        self.inflight,
                        send,
                        record,
                        shared.hard_stop.clone(),
                        (
                            shared.metrics.bytes_in.clone(),
                            shared.metrics.bytes_out.clone(),
                        ),
                    )));
                resp.map(|()| Empty::new().map_err(|never| match never {}).boxed_unsync())
            }
            None => {
                let length = if self.bodiless {
                    Some(0)
                } else {
                    resp.headers()
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                };
                let body = ResponseBody::new(self.inflight, record, length, shared, conn, abort);
                resp.map(|()| body.boxed_unsync())
            }
        }
    }
}

/// `Portico-Route`: the edges a response crossed, the one the user reached
/// first.
pub(crate) const ROUTE: http::HeaderName = http::HeaderName::from_static("portico-route");

/// One attempt on one upstream.
struct Attempt<'a> {
    via: &'a Via,
    head: &'a Bytes,
    method: &'a Method,
    websocket: bool,
    shared: &'a Shared,
}

impl Attempt<'_> {
    /// Phase 4 and the start of 5: open a stream, write the head, start
    /// the body, read the response head.
    async fn run<B: RequestBody>(
        &self,
        body: &mut Option<BodySource<B>>,
        on_upgrade: &mut Option<hyper::upgrade::OnUpgrade>,
        record: &mut Record,
    ) -> Result<Relayed, ProxyError> {
        let via = self.via;
        let stream_guard = via.stream_guard();
        let (mut send, recv) = via.conn().open_bi().await.map_err(ProxyError::Open)?;
        // Whether the connector can have seen the head is what makes a
        // lost POST safe to retry: watched for every method but the ones
        // replayed anyway (and it costs a connection lock, so only then).
        let ack = AckWatch::start(via.conn(), !is_idempotent(self.method));
        send.write_chunk(self.head.clone())
            .await
            .map_err(ProxyError::HeadWrite)?;
        let cancel = self.shared.hard_stop.child_token();
        // From here on, dropping `inflight` (the client left) cancels the
        // stream with `Cancelled`.
        let mut inflight = Inflight {
            recv: Some(recv),
            done: false,
            _cancel_body: cancel.clone().drop_guard(),
            _stream: stream_guard,
            _active: ActiveStream::new(&self.shared.metrics.streams),
        };
        let mut ws_send = None;
        let mut pump: Option<JoinHandle<Pumped<B>>> = None;
        if self.websocket {
            ws_send = Some(send);
        } else if body.as_ref().is_none_or(BodySource::is_empty) {
            // Nothing to stream (a GET, say): FIN leaves in the same packet
            // as the head, the connector need not wait for it, and no task
            // is spawned for this request.
            let _ = send.finish();
        } else if let Some(source) = body.take() {
            let bytes_in = (
                self.shared.metrics.bytes_in.clone(),
                record.bytes_in_counter(),
            );
            pump = Some(
                self.shared
                    .conns
                    .spawn(tracing::Instrument::in_current_span(relay::pump(
                        source,
                        send,
                        cancel.clone(),
                        ack.clone(),
                        bytes_in,
                    ))),
            );
        }

        let first = {
            let recv = inflight.recv.as_mut().expect("set above");
            let read = read_frame(recv);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    r = &mut read => break r,
                    pumped = async { pump.as_mut().expect("guarded").await }, if pump.is_some() => {
                        pump = None;
                        match pumped {
                            Ok(Pumped { source, end: PumpEnd::ClientFailed(e) }) => {
                                *body = Some(source);
                                return Err(ProxyError::ClientBody(e));
                            }
                            Ok(Pumped { source, .. }) => *body = Some(source),
                            Err(e) => tracing::warn!(error = %portico_agent::error_chain(&e), "request body pump failed"),
                        }
                    }
                }
            }
        };
        let head: ResponseHead = match first {
            Ok(Some(Frame::ResponseHead(h))) => h,
            Ok(Some(Frame::Error(e))) => {
                inflight.done = true;
                tracing::info!(upstream = %via, code = %e.code, message = %e.message, "connector answered with an error");
                let error = ProxyError::Connector {
                    code: e.code,
                    message: e.message,
                };
                return Err(settle(pump, &cancel, body, error).await);
            }
            Ok(Some(other)) => {
                let reason = format!("unexpected {:?} frame on a data stream", other.frame_type());
                tracing::warn!(upstream = %via, %reason, "closing the upstream's connection");
                via.close(CloseCode::ProtocolError, &reason);
                return Err(ProxyError::Protocol { reason });
            }
            Err(ReadError::Decode(e)) => {
                let reason = portico_agent::error_chain(&e).to_string();
                tracing::warn!(upstream = %via, %reason, "malformed response head, closing the upstream's connection");
                via.close(CloseCode::ProtocolError, &reason);
                return Err(ProxyError::Protocol { reason });
            }
            Ok(None) | Err(ReadError::Truncated) => {
                // The connector ended the stream without an answer: it read
                // the head, so it may have sent the request on.
                let error = ProxyError::Lost {
                    acked: true,
                    source: None,
                };
                return Err(settle(pump, &cancel, body, error).await);
            }
            Err(ReadError::Io(e)) => {
                let error = classify_read_error(e, &ack);
                tracing::info!(upstream = %via, error = %portico_agent::error_chain(&error), "stream lost before a response head");
                return Err(settle(pump, &cancel, body, error).await);
            }
            Err(e) => {
                let error = ProxyError::Protocol {
                    reason: portico_agent::error_chain(&e).to_string(),
                };
                return Err(settle(pump, &cancel, body, error).await);
            }
        };
        let upgraded = head.status == StatusCode::SWITCHING_PROTOCOLS;
        if upgraded && !self.websocket {
            let reason = "the connector answered 101 to a plain request".to_owned();
            tracing::warn!(upstream = %via, %reason);
            return Err(ProxyError::Protocol { reason });
        }
        let headers = response_headers(head.headers, upgraded);
        let upgrade = match (upgraded, ws_send) {
            (true, Some(send)) => on_upgrade.take().map(|u| (u, send)),
            (false, Some(mut send)) => {
                // The backend refused the upgrade: an ordinary answer follows.
                let _ = send.finish();
                None
            }
            _ => None,
        };
        let bodiless = *self.method == Method::HEAD
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        Ok(Relayed {
            status: head.status,
            headers,
            inflight,
            upgrade,
            bodiless,
            peer: match via {
                Via::Mesh(l) => Some(l.peer.clone()),
                Via::Tunnel(_) => None,
            },
        })
    }
}

/// After a failed attempt: stops the pump, if one runs, and takes the
/// body back from it for another attempt. A client fault the pump met
/// (a malformed body) wins over the tunnel's error: the stream failed
/// because the pump reset it.
async fn settle<B: RequestBody>(
    pump: Option<JoinHandle<Pumped<B>>>,
    cancel: &tokio_util::sync::CancellationToken,
    body: &mut Option<BodySource<B>>,
    error: ProxyError,
) -> ProxyError {
    let Some(handle) = pump else { return error };
    // The pump waits on the client or the stream in a select with its
    // token, so it returns at once.
    cancel.cancel();
    match handle.await {
        Ok(Pumped { source, end }) => {
            *body = Some(source);
            match end {
                PumpEnd::ClientFailed(e) => ProxyError::ClientBody(e),
                _ => error,
            }
        }
        Err(e) => {
            tracing::warn!(error = %portico_agent::error_chain(&e), "request body pump failed");
            error
        }
    }
}

/// A stream error before the response head: the connector's reset (with
/// its code), or the tunnel itself lost, with whether the connector can
/// have seen the head.
fn classify_read_error(e: std::io::Error, ack: &AckWatch) -> ProxyError {
    let quinn_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<quinn::ReadError>());
    match quinn_error {
        Some(quinn::ReadError::Reset(code)) => match CloseCode::from_wire(code.into_inner()) {
            CloseCode::Refused => ProxyError::Refused,
            code => ProxyError::Reset { code },
        },
        _ => ProxyError::Lost {
            acked: !ack.unacked(),
            source: Some(e),
        },
    }
}

/// The authority the user asked for, as sent: the request target's (HTTP/2
/// and HTTP/3 `:authority`, an absolute-form HTTP/1.1 target), else `Host`.
fn authority_of<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> &'a str {
    if let Some(a) = uri.authority() {
        return a.as_str();
    }
    headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}
