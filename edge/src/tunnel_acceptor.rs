//! The tunnel acceptor: QUIC with mutual TLS, the `Hello`/`Welcome`
//! handshake on the control stream, and the control loop.
//!
//! A peer that breaks the protocol gets its connection closed with
//! `CloseCode::ProtocolError` and the decode error as the reason; nothing it
//! sends can panic the edge or touch other tunnels.

use std::sync::Arc;
use std::time::Duration;

use portico_agent::pki;
use portico_proto::api::Identity;
use portico_proto::io::{read_frame, write_frame, ReadError};
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
use crate::tunnels::Tunnel;
use crate::Shared;

/// How long a connector has to finish the QUIC handshake and send `Hello`.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bidirectional streams a connector may open (only the control stream is
/// used).
const CONNECTOR_BIDI_STREAMS: u32 = 8;

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
                    _ => Ended::Lost,
                }
            }
            _ => Ended::Lost,
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
        Ok(Ok((tunnel, send, recv))) => {
            let span = tracing::Span::current();
            span.record("tunnel.id", tracing::field::display(tunnel.id));
            span.record("connector", tracing::field::display(&tunnel.connector));
            span.record("group", tracing::field::display(&tunnel.group));
            shared.tunnels.attach(Arc::clone(&tunnel));
            shared.metrics.tunnels.inc();
            tracing::info!(agent_version = %tunnel.agent_version, "tunnel attached");
            let mut ended = control_loop(&tunnel, send, recv, &shared).await;
            match tunnel.closed_with() {
                Some(CloseCode::Revoked) => ended = Ended::Revoked,
                Some(CloseCode::ProtocolError) => ended = Ended::ProtocolError,
                _ => {}
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

/// Checks the certificate, reads `Hello`, answers `Welcome`.
async fn hello(
    conn: &quinn::Connection,
    shared: &Shared,
) -> Result<(Arc<Tunnel>, SendStream, RecvStream), Ended> {
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
    let version = match negotiate_version(hello.version) {
        Ok(v) => v,
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(connector = %id, %reason, "protocol version mismatch");
            let bye = Frame::Goodbye(Goodbye {
                code: u64::from(CloseCode::VersionMismatch.to_wire()),
                reason: reason.clone(),
            });
            if write_frame(&mut send, &bye).await.is_ok() && send.finish().is_ok() {
                // Let the Goodbye reach the peer before the close does.
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            }
            close(conn, CloseCode::VersionMismatch, &reason);
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
    Ok((Arc::new(tunnel), send, recv))
}

/// Answers pings and follows `Drain`/`Goodbye` until the tunnel ends.
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
    loop {
        let frame = tokio::select! {
            () = tunnel.drain_request.cancelled(), if !drain_sent => {
                drain_sent = true;
                tracing::debug!("sending Drain");
                let _ = write_frame(&mut send, &Frame::Drain).await;
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
            Some(Ok(Some(Frame::Pong(_)))) => {}
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

fn context_of(ty: FrameType) -> &'static str {
    if ty.is_control() {
        "control (after Hello)"
    } else {
        "control"
    }
}
