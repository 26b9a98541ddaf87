//! The tunnel acceptor: QUIC with mutual TLS, and a thin driver of the
//! control protocol's state machine (`portico_proto::control`) on the
//! control stream: the `Hello`/`Welcome` handshake, the tunnel's liveness
//! (pings, suspect and dead), `Drain` and `Goodbye`.
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
use portico_proto::control::{
    liveness, By, Closed, Control, ControlConfig, Event, Link, LivenessConfig, PeerHello,
};
use portico_proto::io::write_frame;
use portico_proto::{CloseCode, ConnectorId};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use tracing::Instrument;

use crate::certs::CertStore;
use crate::error::Error;
use crate::tunnels::{Tunnel, TunnelSlot};
use crate::Shared;

/// How long a connector has to finish the QUIC handshake and send `Hello`.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = portico_proto::control::HANDSHAKE_TIMEOUT;
/// The most read from the control stream at once.
const READ_CHUNK: usize = 2048;
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
    let mut t = portico_agent::quic::tunnel_transport(CONNECTOR_BIDI_STREAMS);
    t.receive_window(quinn::VarInt::from_u64(receive_window).unwrap_or(quinn::VarInt::MAX));
    quic_server_config(cert, ca_pem, pki::Role::Connector, portico_proto::ALPN, t)
}

/// A QUIC server config with the edge's identity certificate, TLS 1.3
/// only, mutual TLS admitting certificates of `role` only, `alpn`, no
/// 0-RTT (a replayed stream head must not reach a backend), and
/// `transport`: the tunnel listener's and the mesh listener's.
pub(crate) fn quic_server_config(
    cert: Arc<CertStore>,
    ca_pem: &str,
    role: pki::Role,
    alpn: &[u8],
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, Error> {
    let verifier = pki::role_verifier(ca_pem, role)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            what: "QUIC listener",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    sc.transport_config(Arc::new(transport));
    Ok(sc)
}

/// Accepts tunnels until shutdown; while the edge drains, refuses them at
/// once (QUIC `CONNECTION_REFUSED`), so that connectors dial another edge
/// instead of waiting for a handshake timeout.
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
            tracing::debug!(remote = %incoming.remote_address(), "draining: tunnel refused");
            shared
                .metrics
                .tunnel_closes
                .with_label_values(&["draining"])
                .inc();
            incoming.refuse();
            continue;
        }
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
    /// A connector's RTT probe, closed after its handshake (never a tunnel).
    Probe,
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
            Ended::Probe => "probe",
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
                    CloseCode::Probe => Ended::Probe,
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

/// Writes what the control machine queued before it closed from this side
/// (its `Goodbye` last) and finishes the stream; when the connector will act
/// on the code (a refusal, not a protocol error or silence), gives the
/// `Goodbye` a moment to arrive. The caller then closes the connection.
async fn send_goodbye(send: &mut SendStream, ctl: &mut Control, closed: &Closed) {
    let wait = !matches!(
        closed.code,
        CloseCode::ProtocolError | CloseCode::Unresponsive
    );
    let flush = async {
        while let Some(frame) = ctl.poll_transmit() {
            write_frame(send, &frame).await?;
        }
        let _ = send.finish();
        if wait {
            let _ = send.stopped().await;
        }
        Ok::<_, portico_proto::io::WriteError>(())
    };
    let _ = tokio::time::timeout(GOODBYE_WAIT, flush).await;
}

/// How a tunnel closed by its control machine ended, for the metrics.
fn ended_by(closed: &Closed) -> Ended {
    match (closed.by, closed.code) {
        (By::Peer, _) => Ended::Goodbye,
        (By::Local, CloseCode::VersionMismatch) => Ended::VersionMismatch,
        (By::Local, CloseCode::TooManyTunnels) => Ended::TooManyTunnels,
        (By::Local, CloseCode::Unresponsive) => Ended::Unresponsive,
        (By::Local, CloseCode::Revoked) => Ended::Revoked,
        (By::Local, CloseCode::Shutdown) => Ended::Shutdown,
        (By::Local, _) => Ended::ProtocolError,
    }
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
            ctl,
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
            let mut ended = control_loop(&tunnel, ctl, send, recv, &shared).await;
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

/// A tunnel past `Hello`/`Welcome`, with its control stream, the control
/// machine, and its count against the connector's cap.
struct Welcomed {
    tunnel: Arc<Tunnel>,
    ctl: Control,
    send: SendStream,
    recv: RecvStream,
    _slot: TunnelSlot,
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
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
    let config = ControlConfig {
        liveness: shared.tunnel_policy.liveness,
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };
    let mut ctl = Control::accept(Link::Tunnel, config, now(), conn.rtt());
    let mut buf = [0u8; READ_CHUNK];
    let hello = loop {
        match ctl.poll_event() {
            Some(Event::Hello(PeerHello::Connector(h))) => break h,
            Some(Event::Closed(closed)) => {
                let ended = ended_by(&closed);
                match ended {
                    Ended::VersionMismatch => {
                        tracing::warn!(connector = %id, reason = %closed.reason, "protocol version mismatch")
                    }
                    _ => tracing::warn!(reason = %closed.reason, "protocol error, closing tunnel"),
                }
                send_goodbye(&mut send, &mut ctl, &closed).await;
                close(conn, closed.code, &closed.reason);
                return Err(ended);
            }
            Some(_) => continue,
            None => {}
        }
        tokio::select! {
            () = sleep_until(ctl.poll_timeout().map(tokio::time::Instant::from_std)) => ctl.handle_timeout(now()),
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => ctl.handle_data(&buf[..n], now()),
                Ok(None) => ctl.handle_finish(now()),
                Err(e) => {
                    tracing::debug!(error = %portico_agent::error_chain(&e), "tunnel lost before Hello");
                    return Err(Ended::from_close(conn.close_reason()));
                }
            },
        }
    };
    let slot = match slot {
        Ok(slot) => slot,
        Err(at_cap) => {
            let reason = too_many_tunnels(&id, at_cap.cap);
            tracing::warn!(connector = %id, %reason, "refusing a tunnel");
            ctl.refuse(CloseCode::TooManyTunnels, &reason);
            if let Some(closed) = ctl.closed().cloned() {
                send_goodbye(&mut send, &mut ctl, &closed).await;
            }
            close(conn, CloseCode::TooManyTunnels, &reason);
            return Err(Ended::TooManyTunnels);
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
    ctl.welcome(
        shared.edge_id.clone(),
        shared.region.clone(),
        shared.table.load().version(),
        now(),
    );
    // The Welcome, and the first Ping with it.
    while let Some(frame) = ctl.poll_transmit() {
        if let Err(e) = write_frame(&mut send, &frame).await {
            tracing::debug!(error = %portico_agent::error_chain(&e), "tunnel lost before Welcome");
            return Err(Ended::from_close(conn.close_reason()));
        }
    }
    let tunnel = Tunnel::new(
        shared.tunnels.next_id(),
        id,
        group,
        hello.agent_version,
        conn.clone(),
        ctl.capabilities(),
    );
    Ok(Welcomed {
        tunnel: Arc::new(tunnel),
        ctl,
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

/// Drives the tunnel's control machine until the tunnel ends: pings and
/// their answers (liveness), the connector's pings, `Drain` either way and
/// `Goodbye`.
async fn control_loop(
    tunnel: &Arc<Tunnel>,
    mut ctl: Control,
    mut send: SendStream,
    mut recv: RecvStream,
    shared: &Shared,
) -> Ended {
    let conn = &tunnel.conn;
    let mut buf = [0u8; READ_CHUNK];
    let mut drain_sent = false;
    loop {
        while let Some(event) = ctl.poll_event() {
            match event {
                Event::Rtt(rtt) => shared.metrics.tunnel_rtt.observe(rtt.as_secs_f64()),
                Event::Health(change) => health_changed(tunnel, shared, change),
                Event::PeerDraining => {
                    tracing::info!("connector is draining this tunnel");
                    tunnel.set_draining();
                }
                Event::Closed(closed) => {
                    return closed_tunnel(tunnel, &mut send, &mut ctl, &closed).await
                }
                Event::Hello(_) | Event::Welcomed(_) | Event::ConfigChanged(_) => {}
            }
        }
        while let Some(frame) = ctl.poll_transmit() {
            if write_frame(&mut send, &frame).await.is_err() {
                return Ended::from_close(conn.close_reason());
            }
        }
        tokio::select! {
            // The edge drains: the connector opens a replacement elsewhere
            // and keeps serving this tunnel's streams until the edge closes
            // it, at the end of the drain.
            () = shared.shutdown.cancelled(), if !drain_sent => {
                drain_sent = true;
                tracing::debug!("sending Drain");
                ctl.drain();
            }
            () = sleep_until(ctl.poll_timeout().map(tokio::time::Instant::from_std)) => ctl.handle_timeout(now()),
            // quinn's read is cancel safe, and the machine keeps a partial
            // frame, so waking for something else loses nothing.
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => ctl.handle_data(&buf[..n], now()),
                Ok(None) => ctl.handle_finish(now()),
                Err(_) => return Ended::from_close(conn.close_reason()),
            },
        }
    }
}

/// Ends a tunnel whose control stream is over.
async fn closed_tunnel(
    tunnel: &Tunnel,
    send: &mut SendStream,
    ctl: &mut Control,
    closed: &Closed,
) -> Ended {
    let conn = &tunnel.conn;
    match closed.by {
        By::Peer => {
            tracing::info!(code = %closed.code, reason = %closed.reason, "connector said goodbye");
            close(conn, CloseCode::NoError, "goodbye");
        }
        By::Local => {
            if closed.code == CloseCode::ProtocolError {
                tracing::warn!(reason = %closed.reason, "protocol error, closing tunnel");
            }
            send_goodbye(send, ctl, closed).await;
            tunnel.close(closed.code, &closed.reason);
        }
    }
    ended_by(closed)
}

/// Applies a change of the tunnel's health: a suspect tunnel leaves the
/// pick set. A dead one is closed by the machine (`Event::Closed`, code
/// `Unresponsive`): what is in flight on it fails now, and is retried where
/// that is safe.
fn health_changed(tunnel: &Tunnel, shared: &Shared, event: liveness::Event) {
    let m = &shared.metrics;
    match event {
        liveness::Event::Suspect { silent, deadline } => {
            if tunnel.set_suspect(true) {
                m.tunnels_suspect.inc();
            }
            m.health_changes.with_label_values(&["suspect"]).inc();
            tracing::info!(
                ?silent,
                ?deadline,
                "no Pong within the deadline: tunnel suspect, not picked while others are healthy"
            );
        }
        liveness::Event::Recovered { silent } => {
            if tunnel.set_suspect(false) {
                m.tunnels_suspect.dec();
            }
            m.health_changes.with_label_values(&["healthy"]).inc();
            tracing::info!(?silent, "Pong again: tunnel healthy");
        }
        liveness::Event::Dead { silent } => {
            m.health_changes.with_label_values(&["dead"]).inc();
            tracing::warn!(?silent, "no Pong within the dead time: closing the tunnel");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
