//! The edge mesh: QUIC links between edges, so that a request reaching an
//! edge with no tunnel of its app's group is served through an edge that
//! has one.
//!
//! - **Links.** An edge dials another edge's mesh listener (`--mesh-listen`,
//!   ALPN [`portico_proto::MESH_ALPN`]) with its own edge certificate; the
//!   listener's verifier admits edge certificates only
//!   ([`pki::Role::Edge`]), so a connector's is refused in the TLS
//!   handshake, and the dialer checks the peer's server name
//!   (`edge_server_name(id)`). The dialer opens the control stream and
//!   drives `proto::control::Control` in its mesh role (`MeshHello` /
//!   `Welcome`, pings both ways for RTT and liveness, `Drain`, `Goodbye`):
//!   the same machine as a tunnel's, not a copy. One link per peer, dialled
//!   on first use and kept while it lives, at the peer's advertised mesh
//!   address unless `Config::mesh_dial_overrides` names another for it
//!   (the server name check is the same either way).
//! - **Forwarding.** The dialer opens one stream per request and writes the
//!   request's `StreamHead` with the hop count 1 and itself as the origin
//!   edge (the head's extension area); the rest of the stream is what a
//!   tunnel stream carries. The receiving edge serves it on a tunnel of its
//!   own and relays the stream both ways, or answers `Error`: a head past
//!   the hop limit ([`MAX_MESH_HOPS`]), whose origin is not the peer, or for
//!   an unknown app is refused with its code, and one for a group it holds
//!   no tunnel of gets `MeshUnreachable`. It never forwards again: at most
//!   one hop, as DERP does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use portico_agent::pki;
use portico_proto::api::{edge_server_name, Identity, PeerEdge};
use portico_proto::control::{By, Closed, Control, ControlConfig, Event, Link, PeerHello};
use portico_proto::io::{read_frame, write_frame};
use portico_proto::{
    capabilities, CloseCode, EdgeId, ErrorCode, Frame, MeshHello, RegionId, StreamError,
    StreamHead, MAX_MESH_HOPS, MESH_ALPN, PROTOCOL_VERSION,
};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use tracing::Instrument as _;

use crate::certs::CertStore;
use crate::error::Error;
use crate::{MeshDialOverrides, Shared};

/// How long dialing a peer and its `Welcome` may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a forwarded stream's head may take to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a peer may have open on a link at once.
const MESH_STREAMS: u32 = 4096;
/// The most read from a control stream at once.
const READ_CHUNK: usize = 2048;
/// The most relayed from one stream to the other per read.
const RELAY_CHUNK: usize = 64 * 1024;

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A live link to another edge.
#[derive(Debug)]
pub(crate) struct MeshLink {
    pub(crate) peer: EdgeId,
    pub(crate) region: RegionId,
    pub(crate) conn: quinn::Connection,
    /// The smoothed RTT of the link's pings in µs; 0 until measured.
    srtt_us: AtomicU64,
    /// The peer said `Drain`: it is shutting down, so forward to it only
    /// when no other edge holds the group.
    draining: std::sync::atomic::AtomicBool,
}

impl MeshLink {
    /// The measured round trip to the peer, once there is one.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.srtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

/// What a mesh endpoint is made of: this edge's certificate (the client
/// side of the mTLS), the CA, the address family to bind, the receive
/// window and the peers dialled elsewhere than at their advertised address.
#[derive(Debug)]
pub(crate) struct Params {
    pub(crate) cert: Arc<CertStore>,
    pub(crate) ca_pem: String,
    pub(crate) family: SocketAddr,
    pub(crate) receive_window: u64,
    pub(crate) dial_overrides: MeshDialOverrides,
}

/// This edge's side of the mesh (one per shard): the links it dialled.
pub(crate) struct Mesh {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// One slot per peer; its lock is held while the link is dialled, so
    /// that concurrent requests share one dial.
    links: Mutex<HashMap<EdgeId, Arc<LinkSlot>>>,
    /// Where to dial a peer instead of its advertised address.
    dial_overrides: MeshDialOverrides,
}

/// Where the link to one peer lives once dialled.
type LinkSlot = tokio::sync::Mutex<Option<Arc<MeshLink>>>;

impl Mesh {
    /// Binds the endpoint mesh links are dialled from (an ephemeral UDP
    /// port of `family`'s address family).
    pub(crate) fn new(params: &Params) -> Result<Mesh, Error> {
        let Params {
            cert,
            ca_pem,
            family,
            receive_window,
            dial_overrides,
        } = params;
        let (cert, family, receive_window) = (Arc::clone(cert), *family, *receive_window);
        let roots = pki::root_store(ca_pem)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| Error::Tls {
                what: "mesh",
                source,
            })?
            .with_root_certificates(roots)
            .with_client_cert_resolver(cert);
        tls.alpn_protocols = vec![MESH_ALPN.to_vec()];
        tls.enable_early_data = false;
        let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        // The acceptor opens no stream to the dialer. The window is the
        // tunnels' (twice what stalled responses may hold together), so
        // that users who stop reading cannot take the link's window from
        // everyone else's responses: the same rule as a tunnel's.
        let mut transport = portico_agent::quic::tunnel_transport(0);
        transport
            .receive_window(quinn::VarInt::from_u64(receive_window).unwrap_or(quinn::VarInt::MAX));
        client.transport_config(Arc::new(transport));
        let bind: SocketAddr = if family.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(|source| Error::Bind {
            what: "mesh client",
            addr: bind,
            source,
        })?;
        // Not counted in the tracker (the edge holds this endpoint until it
        // is dropped); the drain closes it, which ends every link.
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| Error::Bind {
            what: "mesh client",
            addr: bind,
            source,
        })?;
        Ok(Mesh {
            endpoint,
            client,
            links: Mutex::new(HashMap::new()),
            dial_overrides: dial_overrides.clone(),
        })
    }

    /// The live link to `peer`, dialled now if there is none.
    pub(crate) async fn link(
        &self,
        shared: &Shared,
        peer: &PeerEdge,
    ) -> Result<Arc<MeshLink>, String> {
        let slot = {
            let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(links.entry(peer.id.clone()).or_default())
        };
        let mut held = slot.lock().await;
        if let Some(link) = held.as_ref().filter(|l| l.is_alive()) {
            return Ok(Arc::clone(link));
        }
        let link = tokio::time::timeout(DIAL_TIMEOUT, self.dial(shared, peer))
            .await
            .map_err(|_| format!("no Welcome from edge {} within {DIAL_TIMEOUT:?}", peer.id))??;
        *held = Some(Arc::clone(&link));
        Ok(link)
    }

    /// The endpoint the links are dialled from: closed with the tunnel
    /// endpoints at the end of the drain, which ends every link.
    pub(crate) fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// What the live link to `peer` says of it, for ranking peers (one
    /// lookup per peer): whether it said `Drain`, and the measured RTT.
    pub(crate) fn link_state(&self, peer: &EdgeId) -> (bool, Option<Duration>) {
        self.live(peer)
            .map_or((false, None), |l| (l.is_draining(), l.rtt()))
    }

    fn live(&self, peer: &EdgeId) -> Option<Arc<MeshLink>> {
        let slot = {
            let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            links.get(peer).cloned()?
        };
        let held = slot.try_lock().ok()?;
        held.as_ref().filter(|l| l.is_alive()).cloned()
    }

    async fn dial(&self, shared: &Shared, peer: &PeerEdge) -> Result<Arc<MeshLink>, String> {
        let raw = peer
            .mesh_addr
            .as_deref()
            .ok_or_else(|| format!("edge {} takes no mesh links", peer.id))?;
        // An override changes where the link goes, not whom it may reach:
        // the server name below still pins the peer's id.
        let overridden = self.dial_overrides.get(&peer.id);
        let addr = match overridden {
            Some(addr) => addr,
            None => resolve(raw).await?,
        };
        let conn = self
            .endpoint
            .connect_with(self.client.clone(), addr, &edge_server_name(&peer.id))
            .map_err(|e| format!("cannot dial edge {} at {addr}: {e}", peer.id))?
            .await
            .map_err(|e| format!("mesh handshake with edge {} at {addr}: {e}", peer.id))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| format!("mesh link to edge {}: {e}", peer.id))?;
        let hello = MeshHello {
            version: PROTOCOL_VERSION,
            capabilities: capabilities::ALL,
            edge_id: shared.edge_id.clone(),
            region: shared.region.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let mut ctl = Control::dial_mesh(ControlConfig::EDGE, hello, now());
        let welcome = match handshake(&mut ctl, &mut send, &mut recv).await {
            Ok(Event::Welcomed(w)) => w,
            Ok(_) => return Err("unexpected event".into()),
            Err(closed) => {
                conn.close(closed.code.to_wire().into(), closed.reason.as_bytes());
                return Err(format!(
                    "edge {} refused the mesh link ({}): {}",
                    peer.id, closed.code, closed.reason
                ));
            }
        };
        if welcome.edge_id != peer.id {
            conn.close(CloseCode::ProtocolError.to_wire().into(), b"wrong edge");
            return Err(format!(
                "dialled edge {} but {} answered",
                peer.id, welcome.edge_id
            ));
        }
        let link = Arc::new(MeshLink {
            peer: peer.id.clone(),
            region: welcome.region,
            conn: conn.clone(),
            srtt_us: AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        tracing::info!(peer = %peer.id, region = %link.region, %addr, advertised = raw,
            overridden = overridden.is_some(), "mesh link up");
        shared.metrics.mesh_links.inc();
        let link2 = Arc::clone(&link);
        let metrics = Arc::clone(&shared.metrics);
        shared.tracker.spawn(
            async move {
                let closed = drive(&mut ctl, &mut send, &mut recv, &link2.conn, Some(&link2), None).await;
                metrics.mesh_links.dec();
                tracing::info!(peer = %link2.peer, code = %closed.code, reason = %closed.reason, "mesh link down");
            }
            .in_current_span(),
        );
        Ok(link)
    }
}

async fn resolve(raw: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = raw.parse() {
        return Ok(a);
    }
    tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host(raw))
        .await
        .map_err(|_| format!("resolving {raw} timed out"))?
        .map_err(|e| format!("cannot resolve {raw}: {e}"))?
        .next()
        .ok_or_else(|| format!("{raw} has no address"))
}

/// The QUIC server config of the mesh listener: edge certificates only,
/// with the tunnels' receive window.
pub(crate) fn server_config(
    cert: Arc<CertStore>,
    ca_pem: &str,
    receive_window: u64,
) -> Result<quinn::ServerConfig, Error> {
    let mut transport = portico_agent::quic::tunnel_transport(MESH_STREAMS);
    transport.receive_window(quinn::VarInt::from_u64(receive_window).unwrap_or(quinn::VarInt::MAX));
    crate::tunnel_acceptor::quic_server_config(cert, ca_pem, pki::Role::Edge, MESH_ALPN, transport)
}

/// Accepts mesh links until shutdown; refuses them while the edge drains.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = shared.hard_stop.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        if shared.shutdown.is_cancelled() {
            // Draining: peers forward elsewhere.
            incoming.refuse();
            continue;
        }
        let span = tracing::info_span!("mesh", remote = %incoming.remote_address());
        shared
            .tracker
            .spawn(accept_link(incoming, Arc::clone(&shared)).instrument(span));
    }
    endpoint.set_server_config(None);
}

async fn accept_link(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let conn = match tokio::time::timeout(DIAL_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            // A connector's certificate on this port ends here, in TLS.
            tracing::info!(error = %portico_agent::error_chain(&e), "mesh handshake refused");
            shared.metrics.mesh_refused.inc();
            return;
        }
        Err(_) => return,
    };
    let peer = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(pki::identity_of));
    let Some(Ok(Identity::Edge { id: peer, .. })) = peer else {
        conn.close(CloseCode::ProtocolError.to_wire().into(), b"not an edge");
        return;
    };
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(DIAL_TIMEOUT, conn.accept_bi()).await
    else {
        conn.close(
            CloseCode::ProtocolError.to_wire().into(),
            b"no control stream",
        );
        return;
    };
    let mut ctl = Control::accept(Link::Mesh, ControlConfig::EDGE, now(), conn.rtt());
    match handshake(&mut ctl, &mut send, &mut recv).await {
        Ok(Event::Hello(PeerHello::Edge(h))) if h.edge_id == peer => {
            ctl.welcome(
                shared.edge_id.clone(),
                shared.region.clone(),
                shared.table.load().version(),
                now(),
            );
        }
        Ok(Event::Hello(PeerHello::Edge(h))) => {
            let reason = format!(
                "MeshHello names edge {}, but the certificate names {peer}",
                h.edge_id
            );
            ctl.refuse(CloseCode::ProtocolError, &reason);
        }
        Ok(_) => ctl.refuse(CloseCode::ProtocolError, "unexpected hello"),
        Err(closed) => {
            tracing::info!(%peer, code = %closed.code, reason = %closed.reason, "mesh link refused");
            let _ = flush(&mut ctl, &mut send).await;
            conn.close(closed.code.to_wire().into(), closed.reason.as_bytes());
            return;
        }
    }
    tracing::info!(%peer, "mesh link accepted");
    let closed = drive(
        &mut ctl,
        &mut send,
        &mut recv,
        &conn,
        None,
        Some((&shared, &peer)),
    )
    .await;
    tracing::info!(%peer, code = %closed.code, reason = %closed.reason, "mesh link closed");
}

/// Writes what the machine queued.
async fn flush(ctl: &mut Control, send: &mut SendStream) -> Result<(), ()> {
    while let Some(frame) = ctl.poll_transmit() {
        write_frame(send, &frame).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Runs the handshake: the first `Hello` (acceptor) or `Welcomed` (dialer)
/// event, or how the link closed.
async fn handshake(
    ctl: &mut Control,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<Event, Closed> {
    let mut buf = [0u8; READ_CHUNK];
    loop {
        if flush(ctl, send).await.is_err() {
            return Err(lost("the control stream failed in the handshake"));
        }
        while let Some(event) = ctl.poll_event() {
            match event {
                Event::Hello(_) | Event::Welcomed(_) => return Ok(event),
                Event::Closed(c) => return Err(c),
                _ => {}
            }
        }
        tokio::select! {
            () = sleep_until(ctl.poll_timeout()) => ctl.handle_timeout(now()),
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => ctl.handle_data(&buf[..n], now()),
                Ok(None) => ctl.handle_finish(now()),
                Err(_) => return Err(lost("the control stream failed in the handshake")),
            },
        }
    }
}

fn lost(reason: &str) -> Closed {
    Closed {
        code: CloseCode::Internal,
        reason: reason.to_owned(),
        by: By::Peer,
    }
}

/// Drives an open link's control machine until it closes, recording the
/// RTT on `link` (dialer); the acceptor (`serve`) also takes the peer's
/// forwarded streams.
async fn drive(
    ctl: &mut Control,
    send: &mut SendStream,
    recv: &mut RecvStream,
    conn: &quinn::Connection,
    link: Option<&MeshLink>,
    serve: Option<(&Arc<Shared>, &EdgeId)>,
) -> Closed {
    let mut buf = [0u8; READ_CHUNK];
    // The acceptor tells its peer when this edge starts draining.
    let draining = async {
        match serve {
            Some((shared, _)) => shared.shutdown.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(draining);
    let mut drain_sent = false;
    loop {
        let flushed = flush(ctl, send).await;
        while let Some(event) = ctl.poll_event() {
            match event {
                Event::Rtt(_) => {
                    if let (Some(link), Some(srtt)) = (link, ctl.srtt()) {
                        link.srtt_us
                            .store(srtt.as_micros().max(1) as u64, Ordering::Relaxed);
                    }
                }
                Event::PeerDraining => {
                    if let Some(link) = link {
                        tracing::info!(peer = %link.peer, "the peer is draining; forwarding elsewhere while another edge holds the group");
                        link.draining.store(true, Ordering::Relaxed);
                    }
                }
                Event::Closed(closed) => {
                    let _ = flush(ctl, send).await;
                    let _ = send.finish();
                    conn.close(closed.code.to_wire().into(), closed.reason.as_bytes());
                    return closed;
                }
                _ => {}
            }
        }
        if flushed.is_err() {
            let closed = lost("the control stream failed");
            conn.close(
                CloseCode::Internal.to_wire().into(),
                b"control stream failed",
            );
            return closed;
        }
        tokio::select! {
            () = &mut draining, if !drain_sent => {
                drain_sent = true;
                ctl.drain();
            }
            () = sleep_until(ctl.poll_timeout()) => ctl.handle_timeout(now()),
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => ctl.handle_data(&buf[..n], now()),
                Ok(None) => ctl.handle_finish(now()),
                Err(_) => {
                    let reason = conn.close_reason().map_or_else(|| "control stream failed".to_owned(), |e| e.to_string());
                    return lost(&reason);
                }
            },
            accepted = async {
                match serve {
                    Some(_) => conn.accept_bi().await,
                    None => std::future::pending().await,
                }
            } => match (accepted, serve) {
                (Ok((s, r)), Some((shared, peer))) => {
                    let shared2 = Arc::clone(shared);
                    let peer = peer.clone();
                    shared.conns.spawn(serve_forwarded(shared2, peer, s, r).in_current_span());
                }
                (Err(e), _) => return lost(&e.to_string()),
                _ => {}
            },
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Answers a forwarded stream with `Error{code, message}` and ends it.
async fn refuse(send: &mut SendStream, shared: &Shared, code: ErrorCode, message: String) {
    tracing::info!(%code, %message, "forwarded request refused");
    shared
        .metrics
        .mesh_served
        .with_label_values(&[code.as_str()])
        .inc();
    let frame = Frame::Error(StreamError { code, message });
    let _ = write_frame(send, &frame).await;
    let _ = send.finish();
}

/// Serves one request another edge forwarded: checks its head, sends it
/// down a tunnel of this edge and relays the stream both ways. Never
/// forwards it again.
async fn serve_forwarded(
    shared: Arc<Shared>,
    peer: EdgeId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let started = Instant::now();
    let mut head: StreamHead = match tokio::time::timeout(HEAD_TIMEOUT, read_frame(&mut recv)).await
    {
        Ok(Ok(Some(Frame::StreamHead(h)))) => h,
        Ok(Ok(Some(other))) => {
            let message = format!(
                "a forwarded stream starts with {:?}, not StreamHead",
                other.frame_type()
            );
            return refuse(&mut send, &shared, ErrorCode::BadRequest, message).await;
        }
        Ok(Err(e)) => {
            let message = format!(
                "malformed forwarded head: {}",
                portico_agent::error_chain(&e)
            );
            return refuse(&mut send, &shared, ErrorCode::BadRequest, message).await;
        }
        Ok(Ok(None)) | Err(_) => {
            let _ = send.reset(CloseCode::ProtocolError.to_wire().into());
            return;
        }
    };
    let hops = head.ext.hop_count.unwrap_or(0);
    if hops == 0 || hops > MAX_MESH_HOPS {
        let message = format!(
            "a forwarded head must carry a hop count of 1 to {MAX_MESH_HOPS}; this one carries {hops}: \
             an edge never forwards a request it got from another edge"
        );
        return refuse(&mut send, &shared, ErrorCode::MeshUnreachable, message).await;
    }
    if head.ext.origin_edge.as_ref() != Some(&peer) {
        let message = format!(
            "the head names origin edge {}, but it came from edge {peer}",
            head.ext
                .origin_edge
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), ToString::to_string)
        );
        return refuse(&mut send, &shared, ErrorCode::MeshUnreachable, message).await;
    }
    let table = shared.table.load_full();
    let Some(app) = table.app_by_id(head.app.as_str()).cloned() else {
        let message = format!("no app {} is published", head.app);
        return refuse(&mut send, &shared, ErrorCode::AppNotFound, message).await;
    };
    // A signed-in user's claims go only to a connector that reads them.
    let signed_in = head.ext.identity_claims.is_some() || head.ext.assertion.is_some();
    let able = |t: &crate::tunnels::Tunnel| {
        !signed_in || t.capabilities & capabilities::HEAD_EXTENSIONS != 0
    };
    let Some(tunnel) = shared.tunnels.pick(&app.connector_group, able) else {
        let message = format!(
            "edge {} holds no tunnel of group {} (a forwarded request is never forwarded again)",
            shared.edge_id, app.connector_group
        );
        return refuse(&mut send, &shared, ErrorCode::MeshUnreachable, message).await;
    };
    if tunnel.capabilities & capabilities::HEAD_EXTENSIONS == 0 {
        head.ext = Default::default();
    }
    let request_id = head.request_id;
    let span = tracing::info_span!("forwarded", request.id = %request_id, origin = %peer, tunnel.id = %tunnel.id);
    let _guard = tunnel.stream_guard();
    let bytes = match Frame::StreamHead(head).to_bytes() {
        Ok(b) => b,
        Err(e) => {
            return refuse(&mut send, &shared, ErrorCode::BadRequest, e.to_string()).await;
        }
    };
    let (mut tsend, mut trecv) = match tunnel.conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            let message = format!("the tunnel to the connector failed: {e}");
            return refuse(&mut send, &shared, ErrorCode::ConnectorNotFound, message).await;
        }
    };
    if tsend.write_chunk(bytes).await.is_err() {
        let message = "the tunnel to the connector failed".to_owned();
        return refuse(&mut send, &shared, ErrorCode::ConnectorNotFound, message).await;
    }
    // The request body flows up while the response comes down.
    let up = relay(recv, tsend);
    let down = async {
        let first = read_frame(&mut trecv).await;
        let status = match &first {
            Ok(Some(Frame::ResponseHead(h))) => h.status.as_str().to_owned(),
            Ok(Some(Frame::Error(e))) => e.code.as_str().to_owned(),
            _ => String::new(),
        };
        match first {
            Ok(Some(frame)) => {
                if write_frame(&mut send, &frame).await.is_err() {
                    let _ = trecv.stop(CloseCode::Cancelled.to_wire().into());
                    return (status, 0);
                }
            }
            Err(portico_proto::io::ReadError::Io(e)) => {
                let code = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<quinn::ReadError>())
                    .and_then(|r| match r {
                        quinn::ReadError::Reset(c) => Some(*c),
                        _ => None,
                    })
                    .unwrap_or(CloseCode::Internal.to_wire().into());
                let _ = send.reset(code);
                return (status, 0);
            }
            _ => {
                let _ = send.reset(CloseCode::ProtocolError.to_wire().into());
                return (status, 0);
            }
        }
        let n = relay(trecv, send).await;
        (status, n)
    };
    let (bytes_in, (status, bytes_out)) = tokio::join!(up, down);
    shared
        .metrics
        .mesh_served
        .with_label_values(&[if status.is_empty() { "lost" } else { &status }])
        .inc();
    tracing::info!(
        target: "portico::access",
        parent: &span,
        app = %app.id,
        status = %status,
        bytes_in,
        bytes_out,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "forwarded request"
    );
}

/// Copies one stream into another until its end, passing a reset on in
/// either direction. Returns the bytes copied.
async fn relay(mut from: RecvStream, mut to: SendStream) -> u64 {
    let mut n = 0u64;
    loop {
        tokio::select! {
            r = from.read_chunk(RELAY_CHUNK, true) => match r {
                Ok(Some(chunk)) => {
                    n += chunk.bytes.len() as u64;
                    if let Err(e) = to.write_chunk(chunk.bytes).await {
                        let code = match e {
                            quinn::WriteError::Stopped(c) => c,
                            _ => CloseCode::Cancelled.to_wire().into(),
                        };
                        let _ = from.stop(code);
                        return n;
                    }
                }
                Ok(None) => {
                    let _ = to.finish();
                    return n;
                }
                Err(quinn::ReadError::Reset(code)) => {
                    let _ = to.reset(code);
                    return n;
                }
                Err(_) => {
                    let _ = to.reset(CloseCode::Cancelled.to_wire().into());
                    return n;
                }
            },
            stopped = to.stopped() => {
                let code = match stopped {
                    Ok(Some(c)) => c,
                    _ => CloseCode::Cancelled.to_wire().into(),
                };
                let _ = from.stop(code);
                return n;
            }
        }
    }
}

/// The head a forwarded request carries: the one sent to a tunnel, with
/// the hop count 1 and this edge as the origin.
pub(crate) fn forwarded_head(local: &Bytes, origin: &EdgeId) -> Result<Bytes, String> {
    let mut buf = &local[..];
    let Frame::StreamHead(mut head) = Frame::decode(&mut buf).map_err(|e| e.to_string())? else {
        return Err("not a stream head".into());
    };
    head.ext.hop_count = Some(1);
    head.ext.origin_edge = Some(origin.clone());
    Frame::StreamHead(head)
        .to_bytes()
        .map_err(|e| e.to_string())
}
