//! The tunnel acceptor: QUIC with mutual TLS, the `Hello`/`Welcome`
//! handshake on the control stream, and the control loop, which drives the
//! tunnel's liveness (`liveness.rs`): pings, suspect and dead.
//!
//! A peer that breaks the protocol gets its connection closed with
//! `CloseCode::ProtocolError` and the decode error as the reason; nothing it
//! sends can panic the edge or touch other tunnels. A connector may open
//! one stream, its control stream: QUIC's stream limit refuses any other
//! (a peer that opens one anyway breaks the limit, and quinn closes the
//! connection with STREAM_LIMIT_ERROR), so nothing it opens is buffered.
//! And it may hold [`TunnelPolicy::max_per_connector`] tunnels to this edge;
//! one more is refused with a `Goodbye` naming the cap.

use std::sync::Arc;
use std::time::Duration;

use portico_agent::pki;
use portico_proto::api::Identity;
use portico_proto::io::{read_frame, write_frame, ReadError};
use portico_proto::ConnectorId;
use portico_proto::{
    capabilities, negotiate_version, CloseCode, DecodeError, Frame, FrameType, Goodbye, Hello,
    Welcome,
};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::certs::CertStore;
use crate::error::Error;
use crate::liveness::{Event, Liveness, LivenessConfig};
use crate::tunnels::{Tunnel, TunnelSlot};
use crate::Shared;

/// How long a connector has to finish the QUIC handshake and send `Hello`.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bidirectional streams a connector may open: its control stream. Data
/// streams are opened by the edge; a connector that could open more would
/// make the edge buffer each one up to its stream window, unread.
/// (Unidirectional ones: none, `tunnel_transport` grants no peer any.)
const CONNECTOR_BIDI_STREAMS: u32 = 1;
/// How long a refused tunnel's `Goodbye` may take to reach the connector
/// before the connection is closed.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// What the acceptor enforces on tunnels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TunnelPolicy {
    /// Tunnels one connector may hold to this edge, those in their
    /// handshake included.
    pub(crate) max_per_connector: usize,
    pub(crate) liveness: LivenessConfig,
}

/// The QUIC server config of the tunnel listener.
pub(crate) fn server_config(
    cert: Arc<CertStore>,
    ca_pem: &str,
    receive_window: u64,
) -> Result<quinn::ServerConfig, Error> {
    let verifier = pki::client_verifier(ca_pem, false)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            what: "tunnel",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![portico_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0; // no 0-RTT: a replayed stream head must not reach a backend
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut t = portico_agent::quic::tunnel_transport(CONNECTOR_BIDI_STREAMS);
    t.receive_window(quinn::VarInt::from_u64(receive_window).unwrap_or(quinn::VarInt::MAX));
    sc.transport_config(Arc::new(t));
    Ok(sc)
}

/// Accepts tunnels until shutdown.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let shared2 = Arc::clone(&shared);
        let remote = incoming.remote_address();
        let span = tracing::info_span!(
            "tunnel",
            remote = %remote,
            tunnel.id = tracing::field::Empty,
            connector = tracing::field::Empty,
            group = tracing::field::Empty,
        );
        shared
            .tracker
            .spawn(handle_incoming(incoming, shared2).instrument(span));
    }
    // Refuse new connections from here on; existing tunnels keep running
    // until the drain ends.
    endpoint.set_server_config(None);
}

/// Why a tunnel ended, as the `reason` label of
/// `portico_edge_tunnel_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Goodbye,
    ProtocolError,
    VersionMismatch,
    Revoked,
    Shutdown,
    Lost,
    /// Refused at `Hello`: the connector holds as many tunnels as it may.
    TooManyTunnels,
    /// The connector opened a stream beyond its limit (QUIC
    /// STREAM_LIMIT_ERROR).
    StreamLimit,
    /// Another QUIC protocol violation by the connector.
    TransportError,
    /// The connector stopped answering pings; the edge closed the tunnel.
    Unresponsive,
}

impl Ended {
    fn label(self) -> &'static str {
        match self {
            Ended::Goodbye => "goodbye",
            Ended::ProtocolError => "protocol_error",
            Ended::VersionMismatch => "version_mismatch",
            Ended::Revoked => "revoked",
            Ended::Shutdown => "shutdown",
            Ended::Lost => "lost",
            Ended::TooManyTunnels => "too_many_tunnels",
            Ended::StreamLimit => "stream_limit",
            Ended::TransportError => "transport_error",
            Ended::Unresponsive => "unresponsive",
        }
    }

    fn from_close(reason: Option<quinn::ConnectionError>) -> Ended {
        match reason {
            Some(quinn::ConnectionError::LocallyClosed) => Ended::Shutdown,
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                match CloseCode::from_wire(c.error_code.into_inner()) {
                    CloseCode::Revoked => Ended::Revoked,
                    CloseCode::ProtocolError => Ended::ProtocolError,
                    CloseCode::VersionMismatch => Ended::VersionMismatch,
                    CloseCode::Shutdown => Ended::Shutdown,
                    CloseCode::NoError => Ended::Goodbye,
                    CloseCode::TooManyTunnels => Ended::TooManyTunnels,
                    CloseCode::Unresponsive => Ended::Unresponsive,
                    _ => Ended::Lost,
                }
            }
            // quinn closed the connection for a violation by the peer.
            Some(quinn::ConnectionError::TransportError(e)) => {
                if e.code == quinn::TransportErrorCode::STREAM_LIMIT_ERROR {
                    Ended::StreamLimit
                } else {
                    Ended::TransportError
                }
            }
            _ => Ended::Lost,
        }
    }

    /// How the edge itself closed a tunnel, when it did.
    fn from_own_close(code: CloseCode) -> Option<Ended> {
        match code {
            CloseCode::Revoked => Some(Ended::Revoked),
            CloseCode::ProtocolError => Some(Ended::ProtocolError),
            CloseCode::Unresponsive => Some(Ended::Unresponsive),
            _ => None,
        }
    }
}

fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    conn.close(code.to_wire().into(), reason);
}

fn protocol_error(conn: &quinn::Connection, reason: &str) -> Ended {
    tracing::warn!(%reason, "protocol error, closing tunnel");
    close(conn, CloseCode::ProtocolError, reason);
    Ended::ProtocolError
}

/// Refuses a tunnel on its control stream: a `Goodbye` with `code` and
/// `reason`, a moment for it to arrive, then the close.
async fn refuse(conn: &quinn::Connection, send: &mut SendStream, code: CloseCode, reason: &str) {
    let bye = Frame::Goodbye(Goodbye {
        code: u64::from(code.to_wire()),
        reason: reason.to_owned(),
    });
    if write_frame(send, &bye).await.is_ok() && send.finish().is_ok() {
        // Let the Goodbye reach the peer before the close does.
        let _ = tokio::time::timeout(GOODBYE_WAIT, send.stopped()).await;
    }
    close(conn, code, reason);
}

async fn handle_incoming(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %portico_agent::error_chain(&e), "tunnel handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("tunnel handshake timed out");
            return;
        }
    };
    let ended = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hello(&conn, &shared)).await {
        Err(_) => protocol_error(&conn, "no Hello within the handshake timeout"),
        Ok(Err(ended)) => ended,
        Ok(Ok(Welcomed {
            tunnel,
            send,
            recv,
            _slot,
        })) => {
            let span = tracing::Span::current();
            span.record("tunnel.id", tracing::field::display(tunnel.id));
            span.record("connector", tracing::field::display(&tunnel.connector));
            span.record("group", tracing::field::display(&tunnel.group));
            shared.tunnels.attach(Arc::clone(&tunnel));
            shared.metrics.tunnels.inc();
            tracing::info!(agent_version = %tunnel.agent_version, "tunnel attached");
            let mut ended = control_loop(&tunnel, send, recv, &shared).await;
            if let Some(own) = tunnel.closed_with().and_then(Ended::from_own_close) {
                ended = own;
            }
            if tunnel.set_suspect(false) {
                shared.metrics.tunnels_suspect.dec();
            }
            shared.tunnels.detach(tunnel.id);
            shared.metrics.tunnels.dec();
            tracing::info!(reason = ended.label(), "tunnel detached");
            ended
        }
    };
    shared
        .metrics
        .tunnel_closes
        .with_label_values(&[ended.label()])
        .inc();
}

/// A tunnel past `Hello`/`Welcome`, with its control stream and its count
/// against the connector's cap.
struct Welcomed {
    tunnel: Arc<Tunnel>,
    send: SendStream,
    recv: RecvStream,
    _slot: TunnelSlot,
}

/// Checks the certificate and the connector's tunnel count, reads
/// `Hello`, answers `Welcome`.
async fn hello(conn: &quinn::Connection, shared: &Shared) -> Result<Welcomed, Ended> {
    let identity = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(pki::identity_of));
    let (id, group) = match identity {
        Some(Ok(Identity::Connector { id, group })) => (id, group),
        Some(Ok(other)) => {
            return Err(protocol_error(
                conn,
                &format!("certificate names {other}, not a connector"),
            ))
        }
        Some(Err(e)) => {
            return Err(protocol_error(
                conn,
                &format!(
                    "unusable client certificate: {}",
                    portico_agent::error_chain(&e)
                ),
            ))
        }
        None => return Err(protocol_error(conn, "no client certificate")),
    };
    if shared.table.load().is_revoked(&id) {
        tracing::info!(connector = %id, "refusing a tunnel from a revoked connector");
        close(conn, CloseCode::Revoked, "connector revoked");
        return Err(Ended::Revoked);
    }
    // Counted from here, before the control stream: a connector's tunnels
    // still in their handshake take their place under the cap too.
    let slot = shared
        .tunnels
        .reserve(&id, shared.tunnel_policy.max_per_connector);
    let (mut send, mut recv) = match conn.accept_bi().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %portico_agent::error_chain(&e), "tunnel closed before its control stream");
            return Err(Ended::from_close(Some(e)));
        }
    };
    let hello: Hello = match read_frame(&mut recv).await {
        Ok(Some(Frame::Hello(h))) => h,
        Ok(Some(other)) => {
            let e = DecodeError::UnexpectedFrame {
                ty: other.frame_type(),
                context: "control (expected Hello)",
            };
            return Err(protocol_error(conn, &e.to_string()));
        }
        Ok(None) => return Err(protocol_error(conn, "control stream ended before Hello")),
        Err(ReadError::Io(e)) => {
            tracing::debug!(error = %portico_agent::error_chain(&e), "tunnel lost before Hello");
            return Err(Ended::from_close(conn.close_reason()));
        }
        Err(e) => {
            return Err(protocol_error(
                conn,
                &portico_agent::error_chain(&e).to_string(),
            ))
        }
    };
    let slot = match slot {
        Ok(slot) => slot,
        Err(at_cap) => {
            let reason = too_many_tunnels(&id, at_cap.cap);
            tracing::warn!(connector = %id, %reason, "refusing a tunnel");
            refuse(conn, &mut send, CloseCode::TooManyTunnels, &reason).await;
            return Err(Ended::TooManyTunnels);
        }
    };
    let version = match negotiate_version(hello.version) {
        Ok(v) => v,
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(connector = %id, %reason, "protocol version mismatch");
            refuse(conn, &mut send, CloseCode::VersionMismatch, &reason).await;
            return Err(Ended::VersionMismatch);
        }
    };
    if hello.connector_id != id || hello.group != group {
        return Err(protocol_error(
            conn,
            &format!(
                "Hello names connector {} in group {}, but the certificate names {id} in {group}",
                hello.connector_id, hello.group
            ),
        ));
    }
    let welcome = Frame::Welcome(Welcome {
        version,
        capabilities: capabilities::ALL & hello.capabilities,
        edge_id: shared.edge_id.clone(),
        region: shared.region.clone(),
        config_version: shared.table.load().version(),
    });
    if let Err(e) = write_frame(&mut send, &welcome).await {
        tracing::debug!(error = %portico_agent::error_chain(&e), "tunnel lost before Welcome");
        return Err(Ended::from_close(conn.close_reason()));
    }
    let tunnel = Tunnel::new(
        shared.tunnels.next_id(),
        id,
        group,
        hello.agent_version,
        conn.clone(),
    );
    Ok(Welcomed {
        tunnel: Arc::new(tunnel),
        send,
        recv,
        _slot: slot,
    })
}

/// The reason a tunnel over the cap is refused with: it names the cap and
/// the setting.
fn too_many_tunnels(connector: &ConnectorId, cap: usize) -> String {
    format!(
        "connector {connector} already holds {cap} tunnels to this edge, the most it may \
         (the edge's max_tunnels_per_connector)"
    )
}

/// Pings the connector and judges its answers (`liveness`), answers its
/// pings, and follows `Drain`/`Goodbye` until the tunnel ends.
async fn control_loop(
    tunnel: &Arc<Tunnel>,
    mut send: SendStream,
    recv: RecvStream,
    shared: &Shared,
) -> Ended {
    // Frames are read by their own task so that a half-read frame is never
    // lost when the loop below wakes for something else.
    let (tx, mut rx) = mpsc::channel::<Result<Option<Frame>, ReadError>>(8);
    // Not a child of the shutdown token: the tunnel must live through the
    // drain (dropping the last connection handle would close it early).
    let reader_stop = CancellationToken::new();
    let reader_stop2 = reader_stop.clone();
    shared.tracker.spawn(
        async move {
            let mut recv = recv;
            loop {
                let r = tokio::select! {
                    () = reader_stop2.cancelled() => return,
                    r = read_frame(&mut recv) => r,
                };
                let last = !matches!(r, Ok(Some(_)));
                if tx.send(r).await.is_err() || last {
                    return;
                }
            }
        }
        .in_current_span(),
    );
    let _stop_reader = reader_stop.drop_guard();
    let conn = &tunnel.conn;
    let mut drain_sent = false;
    let now = || tokio::time::Instant::now().into_std();
    let mut live = Liveness::new(shared.tunnel_policy.liveness, now(), conn.rtt());
    loop {
        while let Some(v) = live.poll_transmit() {
            if write_frame(&mut send, &Frame::Ping(v)).await.is_err() {
                return Ended::from_close(conn.close_reason());
            }
        }
        while let Some(event) = live.poll_event() {
            if let Some(ended) = health_changed(tunnel, shared, event) {
                return ended;
            }
        }
        let wake = live.poll_timeout().map(tokio::time::Instant::from_std);
        let frame = tokio::select! {
            () = tunnel.drain_request.cancelled(), if !drain_sent => {
                drain_sent = true;
                tracing::debug!("sending Drain");
                let _ = write_frame(&mut send, &Frame::Drain).await;
                continue;
            }
            () = sleep_until(wake) => {
                live.handle_timeout(now());
                continue;
            }
            r = rx.recv() => r,
        };
        match frame {
            Some(Ok(Some(Frame::Ping(v)))) => {
                if write_frame(&mut send, &Frame::Pong(v)).await.is_err() {
                    return Ended::from_close(conn.close_reason());
                }
            }
            Some(Ok(Some(Frame::Pong(v)))) => {
                if let Some(rtt) = live.handle_pong(v, now()) {
                    shared.metrics.tunnel_rtt.observe(rtt.as_secs_f64());
                }
            }
            Some(Ok(Some(Frame::Drain))) => {
                tracing::info!("connector is draining this tunnel");
                tunnel.set_draining();
            }
            Some(Ok(Some(Frame::Goodbye(g)))) => {
                tracing::info!(code = %CloseCode::from_wire(g.code), reason = %g.reason, "connector said goodbye");
                close(conn, CloseCode::NoError, "goodbye");
                return Ended::Goodbye;
            }
            Some(Ok(Some(other))) => {
                let e = DecodeError::UnexpectedFrame {
                    ty: other.frame_type(),
                    context: context_of(other.frame_type()),
                };
                return protocol_error(conn, &e.to_string());
            }
            Some(Ok(None)) => {
                // The connector finished its control stream without Goodbye.
                close(conn, CloseCode::NoError, "control stream closed");
                return Ended::Goodbye;
            }
            Some(Err(ReadError::Io(_))) | None => return Ended::from_close(conn.close_reason()),
            Some(Err(e)) => {
                return protocol_error(conn, &portico_agent::error_chain(&e).to_string())
            }
        }
    }
}

/// Applies a change of the tunnel's health: a suspect tunnel leaves the
/// pick set, a dead one is closed (what is in flight on it fails now, and
/// is retried where that is safe). Returns how the tunnel ended, if it did.
fn health_changed(tunnel: &Tunnel, shared: &Shared, event: Event) -> Option<Ended> {
    let m = &shared.metrics;
    match event {
        Event::Suspect { silent, deadline } => {
            if tunnel.set_suspect(true) {
                m.tunnels_suspect.inc();
            }
            m.health_changes.with_label_values(&["suspect"]).inc();
            tracing::info!(
                ?silent,
                ?deadline,
                "no Pong within the deadline: tunnel suspect, not picked while others are healthy"
            );
            None
        }
        Event::Recovered { silent } => {
            if tunnel.set_suspect(false) {
                m.tunnels_suspect.dec();
            }
            m.health_changes.with_label_values(&["healthy"]).inc();
            tracing::info!(?silent, "Pong again: tunnel healthy");
            None
        }
        Event::Dead { silent } => {
            m.health_changes.with_label_values(&["dead"]).inc();
            tracing::warn!(?silent, "no Pong within the dead time: closing the tunnel");
            tunnel.close(
                CloseCode::Unresponsive,
                &format!("no Pong for {} ms", silent.as_millis()),
            );
            Some(Ended::Unresponsive)
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn context_of(ty: FrameType) -> &'static str {
    if ty.is_control() {
        "control (after Hello)"
    } else {
        "control"
    }
}
