//! HTTP/3 on the public port (h3 over quinn, UDP at the TCP listener's port
//! number): binding the pair, the QUIC/TLS config (the same swappable
//! public certificate, ALPN `h3`), the accept loop, and the adapter that
//! hands each request to the request path HTTP/1.1 and HTTP/2 use
//! (`request::handle`), so routing, errors, metrics and logs are the same.
//!
//! It does not carry WebSockets (an extended CONNECT is answered with
//! `BadRequest`), server push, or 0-RTT.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::error::Code;
use http::header::HeaderValue;
use http::Response;
use http_body_util::BodyExt;
use portico_agent::pki;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::VarInt;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::certs::SniCerts;
use crate::client_conn::{deadline_at, ClientConn, Proto};
use crate::error::Error;
use crate::listener;
use crate::request;
use crate::stall::now_us;
use crate::Shared;

/// The QUIC close code of a clean HTTP/3 close (`H3_NO_ERROR`).
pub(crate) const NO_ERROR: VarInt = VarInt::from_u32(0x100);
/// How long `Alt-Svc` tells clients to remember the HTTP/3 endpoint.
const ALT_SVC_MAX_AGE: u32 = 86_400;
/// Fresh port pairs tried when the public port is 0 and the UDP port the
/// kernel gave TCP is taken.
const BIND_ATTEMPTS: usize = 16;
/// How long a client has to finish the QUIC handshake and the h3 setup.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest header section accepted (QPACK-decoded size).
const MAX_FIELD_SECTION: u64 = 64 * 1024;
/// An idle user connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the public TCP listener and, with `h3_cert`, the HTTP/3 endpoint
/// on UDP at the same port. With port 0 the kernel picks the TCP port; if
/// that port is taken on UDP, a fresh pair is tried (bounded).
pub(crate) fn bind_public(
    listen: SocketAddr,
    h3_cert: Option<Arc<SniCerts>>,
    max_streams: u32,
    tracker: &TaskTracker,
) -> Result<(TcpListener, Option<quinn::Endpoint>), Error> {
    let Some(cert) = h3_cert else {
        return Ok((listener::bind(listen)?, None));
    };
    let config = server_config(cert, max_streams)?;
    let attempts = if listen.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tcp = listener::bind(listen)?;
        let port = tcp
            .local_addr()
            .map_err(|source| Error::Bind {
                what: "public",
                addr: listen,
                source,
            })?
            .port();
        let udp = SocketAddr::new(listen.ip(), port);
        match portico_agent::quic::bind_endpoint(udp, Some(config.clone()), tracker) {
            Ok(endpoint) => return Ok((tcp, Some(endpoint))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < attempts => {
                tracing::debug!(port, "UDP port taken; trying another port pair");
            }
            Err(source) => {
                return Err(Error::Bind {
                    what: "http3",
                    addr: udp,
                    source,
                })
            }
        }
    }
}

/// The `Alt-Svc` value that advertises HTTP/3 on `port`.
pub(crate) fn alt_svc(port: u16) -> HeaderValue {
    HeaderValue::try_from(format!("h3=\":{port}\"; ma={ALT_SVC_MAX_AGE}"))
        .expect("a port number makes a valid header value")
}

/// The QUIC server config: TLS 1.3 with the public certificate resolver,
/// ALPN `h3`, room for h3's uni streams and `max_streams` requests.
pub(crate) fn server_config(
    cert: Arc<SniCerts>,
    max_streams: u32,
) -> Result<quinn::ServerConfig, Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            what: "http3",
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(max_streams.into())
        // Control, QPACK encoder and decoder, plus room for extensions.
        .max_concurrent_uni_streams(16u32.into())
        .stream_receive_window((2u32 << 20).into())
        .receive_window((16u32 << 20).into())
        .send_window(16 << 20)
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("the idle timeout fits a QUIC varint"),
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts HTTP/3 connections until shutdown, then refuses new ones.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = shared.closing.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let client = incoming.remote_address();
        let Some(permit) = shared.admit_client(client, "http3") else {
            incoming.refuse();
            continue;
        };
        let conn = Arc::new(ClientConn::new(client, Proto::H3, permit));
        let shared2 = Arc::clone(&shared);
        shared.conns.spawn(
            serve_connection(incoming, conn, shared2)
                .instrument(tracing::debug_span!("h3", %client)),
        );
    }
    endpoint.set_server_config(None);
}

/// One user connection: accepts requests until the client leaves; on
/// shutdown sends GOAWAY, lets the requests in flight finish (until the
/// hard stop), then closes.
async fn serve_connection(incoming: quinn::Incoming, client: Arc<ClientConn>, shared: Arc<Shared>) {
    let setup = async {
        let conn = incoming.accept()?.await?;
        let h3c = h3::server::builder()
            .max_field_section_size(MAX_FIELD_SECTION)
            .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await?;
        Ok::<_, SetupError>((conn, h3c))
    };
    let (conn, mut h3c) = tokio::select! {
        () = shared.closing.cancelled() => return,
        r = tokio::time::timeout(shared.timeouts.header_read.min(HANDSHAKE_TIMEOUT), setup) => match r {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::debug!(error = %portico_agent::error_chain(&e), "HTTP/3 connection setup failed");
                return;
            }
            Err(_) => {
                tracing::debug!("HTTP/3 connection setup timed out");
                return;
            }
        },
    };
    let requests = TaskTracker::new();
    let mut closing = false;
    let mut next = now_us();
    loop {
        tokio::select! {
            r = h3c.accept() => match r {
                Ok(Some(resolver)) => {
                    let shared2 = Arc::clone(&shared);
                    shared.conns.spawn(
                        requests
                            .track_future(serve_request(resolver, Arc::clone(&client), shared2))
                            .in_current_span(),
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(error = %portico_agent::error_chain(&e), "HTTP/3 connection ended");
                    }
                    break;
                }
            },
            () = shared.closing.cancelled(), if !closing => {
                closing = true;
                requests.close();
                // GOAWAY: the client sends nothing new; one racing
                // request is still served.
                if let Err(e) = h3c.shutdown(1).await {
                    tracing::debug!(error = %portico_agent::error_chain(&e), "sending GOAWAY failed");
                    break;
                }
            }
            () = requests.wait(), if closing => break,
            () = shared.hard_stop.cancelled() => break,
            () = client.kill.cancelled() => break,
            () = std::future::poll_fn(|cx| client.poll_woken(cx)) => next = now_us(),
            // Stall checks of the responses in flight (QUIC's own idle
            // timeout closes idle connections).
            () = tokio::time::sleep_until(deadline_at(next)) => {
                next = client
                    .tick(now_us(), &shared.timeouts, &shared.stalls, &shared.metrics)
                    .unwrap_or_else(|_| now_us() + 1_000_000);
            }
        }
    }
    requests.close();
    tokio::select! {
        () = requests.wait() => {}
        () = shared.hard_stop.cancelled() => {}
    }
    drop(h3c);
    conn.close(NO_ERROR, b"");
}

/// Why a user connection could not be set up.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Quic(#[from] quinn::ConnectionError),
    #[error(transparent)]
    H3(#[from] h3::error::ConnectionError),
}

/// One request: reads the head, runs the shared request path with the
/// request stream as the body, then streams the answer back.
async fn serve_request(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    client: Arc<ClientConn>,
    shared: Arc<Shared>,
) {
    let resolved = tokio::select! {
        () = shared.hard_stop.cancelled() => return,
        r = tokio::time::timeout(shared.timeouts.header_read, resolver.resolve_request()) => r,
    };
    let (req, stream) = match resolved {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(error = %portico_agent::error_chain(&e), "bad HTTP/3 request head");
            return;
        }
        Err(_) => {
            tracing::debug!("no HTTP/3 request head in time");
            return;
        }
    };
    let (mut send, recv) = stream.split();
    let length = declared_length(req.headers());
    let req = req.map(|()| H3Body {
        recv,
        done: false,
        reading: false,
        remaining: length,
    });
    // Cancelled by the stall check if the client stops reading.
    let stalled = tokio_util::sync::CancellationToken::new();
    let resp = tokio::select! {
        () = shared.hard_stop.cancelled() => {
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
            return;
        }
        r = request::handle(req, Arc::clone(&shared), client, Some(stalled.clone())) => r,
    };
    let (parts, mut body) = resp.into_parts();
    if let Err(e) = send.send_response(Response::from_parts(parts, ())).await {
        tracing::debug!(error = %portico_agent::error_chain(&e), "sending the HTTP/3 response head failed");
        return;
    }
    loop {
        let frame = tokio::select! {
            () = shared.hard_stop.cancelled() => {
                send.stop_stream(Code::H3_REQUEST_CANCELLED);
                return;
            }
            f = body.frame() => f,
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue, // trailers are not carried
            },
            Some(Err(e)) => {
                tracing::debug!(error = %portico_agent::error_chain(&*e), "response body failed; resetting the stream");
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return;
            }
        };
        tokio::select! {
            () = shared.hard_stop.cancelled() => {
                send.stop_stream(Code::H3_REQUEST_CANCELLED);
                return;
            }
            () = stalled.cancelled() => {
                send.stop_stream(Code::H3_REQUEST_CANCELLED);
                return;
            }
            r = send.send_data(data) => if let Err(e) = r {
                // The client left or reset the stream: dropping the body
                // cancels the tunnel stream.
                tracing::debug!(error = %portico_agent::error_chain(&e), "sending HTTP/3 data failed");
                return;
            },
        }
    }
    if let Err(e) = send.finish().await {
        tracing::debug!(error = %portico_agent::error_chain(&e), "finishing the HTTP/3 response failed");
    }
}

/// What the request's `Content-Length` says: `Ok(None)` without one, `Err`
/// for one that is not a number (or several that disagree).
fn declared_length(headers: &http::HeaderMap) -> Result<Option<u64>, ()> {
    let mut length = None;
    for v in headers.get_all(http::header::CONTENT_LENGTH) {
        let n = v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or(())?;
        if length.is_some_and(|l| l != n) {
            return Err(());
        }
        length = Some(n);
    }
    Ok(length)
}

/// Why an HTTP/3 request body failed: the stream, or a body that breaks
/// its `Content-Length` (RFC 9114 §4.1.2: a malformed request). hyper
/// checks this for HTTP/1.1 and HTTP/2; h3 leaves it to us.
#[derive(Debug, thiserror::Error)]
enum H3BodyError {
    #[error("the HTTP/3 request stream failed")]
    Stream(#[source] h3::error::StreamError),
    #[error("the request's Content-Length is not a number")]
    BadLength,
    #[error("the request body is longer than its Content-Length")]
    TooLong,
    #[error("the request body ended {missing} bytes short of its Content-Length")]
    TooShort { missing: u64 },
}

/// The request body of an HTTP/3 request as an `http_body::Body`: DATA
/// frames as they arrive, with QUIC flow control as the backpressure.
struct H3Body {
    recv: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
    done: bool,
    /// What is left of the `Content-Length`, if one was given.
    remaining: Result<Option<u64>, ()>,
    /// The last poll was pending: h3-quinn then holds the QUIC stream in
    /// its read future, and its `stop_sending` would panic on the empty
    /// slot (h3-quinn 0.0.10), so the drop leaves the stop to quinn.
    reading: bool,
}

impl http_body::Body for H3Body {
    type Data = Bytes;
    type Error = H3BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.remaining.is_err() {
            self.done = true;
            return Poll::Ready(Some(Err(H3BodyError::BadLength)));
        }
        let Poll::Ready(r) = self.recv.poll_recv_data(cx) else {
            self.reading = true;
            return Poll::Pending;
        };
        self.reading = false;
        let this = &mut *self;
        Poll::Ready(match r {
            Ok(Some(mut buf)) => {
                let data = buf.copy_to_bytes(buf.remaining());
                if let Ok(Some(rem)) = &mut this.remaining {
                    match rem.checked_sub(data.len() as u64) {
                        Some(left) => *rem = left,
                        None => {
                            this.done = true;
                            return Poll::Ready(Some(Err(H3BodyError::TooLong)));
                        }
                    }
                }
                Some(Ok(http_body::Frame::data(data)))
            }
            Ok(None) => {
                this.done = true;
                match this.remaining {
                    Ok(Some(missing)) if missing > 0 => {
                        Some(Err(H3BodyError::TooShort { missing }))
                    }
                    _ => None,
                }
            }
            Err(e) => {
                this.done = true;
                Some(Err(H3BodyError::Stream(e)))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.remaining {
            Ok(Some(n)) => http_body::SizeHint::with_exact(n),
            _ => http_body::SizeHint::default(),
        }
    }
}

impl Drop for H3Body {
    fn drop(&mut self) {
        // While a read is pending, dropping the stream stops it (quinn
        // sends STOP_SENDING for an unfinished stream it drops).
        if !self.done && !self.reading {
            // The answer is complete without the rest of the upload.
            self.recv.stop_sending(Code::H3_NO_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alt_svc_names_the_port() {
        assert_eq!(alt_svc(8443), "h3=\":8443\"; ma=86400");
    }

    #[tokio::test]
    async fn tcp_and_udp_share_the_port_and_a_taken_udp_port_is_an_error() {
        let tracker = TaskTracker::new();
        let cert = SniCerts::new(crate::certs::CertStore::new());
        let (tcp, udp) = bind_public(
            "127.0.0.1:0".parse().unwrap(),
            Some(Arc::clone(&cert)),
            128,
            &tracker,
        )
        .unwrap();
        let udp = udp.expect("HTTP/3 endpoint bound");
        let port = tcp.local_addr().unwrap().port();
        assert_eq!(udp.local_addr().unwrap().port(), port);

        // A fixed port whose UDP half is taken: no retry, a clear error.
        // The TCP port of the same number may belong to another test running
        // alongside; then try another port (bounded).
        let mut checked = false;
        for _ in 0..20 {
            let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let listen = taken.local_addr().unwrap();
            match bind_public(listen, Some(Arc::clone(&cert)), 128, &tracker) {
                Err(Error::Bind {
                    what: "http3",
                    addr,
                    ..
                }) => {
                    assert_eq!(addr, listen);
                    checked = true;
                    break;
                }
                Err(Error::Bind { what: "public", .. }) => continue,
                other => panic!("expected an http3 bind error, got {other:?}"),
            }
        }
        assert!(
            checked,
            "no free TCP port matched a taken UDP port in 20 tries"
        );
        udp.close(NO_ERROR, b"");
    }
}
