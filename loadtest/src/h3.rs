//! Portico's own HTTP/3 client (h3 + h3-quinn over quinn): one QUIC
//! connection per [`H3Client`], shared by its clones, with whole-body
//! requests ([`H3Client::request`]) and a streaming variant
//! ([`H3Client::open`]) for large bodies. The tests use it (curl cannot
//! speak HTTP/3 on these machines) and so does the load generator.
//!
//! It does not pool connections, follow redirects, decompress, or retry: a
//! caller that wants more connections makes more clients from one
//! [`H3Connector`] (one UDP socket for all of them).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h3::error::Code;
use portico_agent::pki;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The ALPN protocol of HTTP/3.
pub const ALPN: &[u8] = b"h3";
/// The largest response body [`H3Client::request`] collects by default.
pub const DEFAULT_MAX_BODY: usize = 256 << 20;
/// The QUIC close code of a clean HTTP/3 close.
const H3_NO_ERROR: quinn::VarInt = quinn::VarInt::from_u32(0x100);
/// The size of the DATA frames a whole request body is cut into.
const SEND_CHUNK: usize = 256 * 1024;

/// Which server certificates the client accepts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Chains to one of these roots, naming the server name dialed.
    Roots(RootCertStore),
    /// Anything (benchmarks against self-signed servers only). Handshake
    /// signatures are still checked.
    Insecure,
}

impl Trust {
    /// Trusts the certificates of a PEM bundle (for example the router CA).
    pub fn ca_pem(pem: &str) -> Result<Trust, H3Error> {
        Ok(Trust::Roots(
            pki::root_store(pem).map_err(|source| H3Error::Ca { source })?,
        ))
    }
}

/// Why an HTTP/3 exchange failed. `retry_safe` says whether the request
/// can have reached the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum H3Error {
    /// The CA bundle could not be read.
    #[error("cannot use the CA bundle")]
    Ca {
        #[source]
        source: portico_agent::error::PkiError,
    },
    /// The TLS client config was refused.
    #[error("TLS client setup failed")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    /// The TLS config has no TLS 1.3 initial cipher suite.
    #[error("QUIC client setup failed")]
    Quic {
        #[source]
        source: quinn::crypto::rustls::NoInitialCipherSuite,
    },
    /// The local UDP socket could not be bound.
    #[error("cannot bind the client UDP socket on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid server name {name:?}")]
    ServerName { name: String },
    /// The connection could not be started (bad address, endpoint closed).
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    /// The QUIC handshake failed (refused, TLS alert, timeout).
    #[error("QUIC handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    /// The HTTP/3 connection failed to set up (SETTINGS exchange).
    #[error("HTTP/3 connection setup failed")]
    Connection {
        #[source]
        source: h3::error::ConnectionError,
    },
    /// A request stream failed (reset, connection lost, bad response).
    #[error("HTTP/3 request failed")]
    Stream {
        #[source]
        source: h3::error::StreamError,
    },
    /// The response body was larger than the limit.
    #[error("response body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
}

impl H3Error {
    /// Whether the failure happened before any request could reach the
    /// server (setup and connection errors), so a retry cannot repeat it.
    pub fn retry_safe(&self) -> bool {
        !matches!(self, H3Error::Stream { .. } | H3Error::BodyTooLarge { .. })
    }
}

impl From<h3::error::StreamError> for H3Error {
    fn from(source: h3::error::StreamError) -> Self {
        H3Error::Stream { source }
    }
}

/// A UDP socket and TLS config from which many [`H3Client`]s connect.
/// Drivers of its clients are tasks of `tracker`.
#[derive(Debug, Clone)]
pub struct H3Connector {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    tracker: TaskTracker,
}

impl H3Connector {
    /// Binds a client socket on `bind` (for example `127.0.0.1:0`). The
    /// socket counts as a task of `tracker` until every client and the
    /// connector are gone.
    pub fn new(bind: SocketAddr, trust: Trust, tracker: &TaskTracker) -> Result<Self, H3Error> {
        let endpoint = portico_agent::quic::bind_endpoint(bind, None, tracker)
            .map_err(|source| H3Error::Bind { addr: bind, source })?;
        Ok(H3Connector {
            endpoint,
            config: client_config(trust)?,
            tracker: tracker.clone(),
        })
    }

    /// Opens one QUIC connection to `addr`, verifying the certificate for
    /// `server_name` (also sent as SNI), and sets up HTTP/3 on it.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<H3Client, H3Error> {
        if ServerName::try_from(server_name).is_err() {
            return Err(H3Error::ServerName {
                name: server_name.to_owned(),
            });
        }
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), addr, server_name)
            .map_err(|source| H3Error::Connect { addr, source })?
            .await
            .map_err(|source| H3Error::Handshake { addr, source })?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|source| H3Error::Connection { source })?;
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        self.tracker.spawn(
            async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    e = poll_fn(|cx| driver.poll_close(cx)) => {
                        if !e.is_h3_no_error() {
                            tracing::debug!(error = %portico_agent::error_chain(&e), "HTTP/3 connection closed");
                        }
                    }
                }
            }
            .instrument(tracing::debug_span!("h3_client", server = %addr)),
        );
        Ok(H3Client {
            shared: Arc::new(Conn {
                conn,
                _endpoint: self.endpoint.clone(),
                _stop_driver: cancel.drop_guard(),
            }),
            send,
            max_body: DEFAULT_MAX_BODY,
        })
    }

    /// The local address of the client socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }
}

/// One HTTP/3 connection. Clones share it; it closes when the last clone
/// is dropped (or on [`H3Client::close`]).
#[derive(Clone)]
pub struct H3Client {
    shared: Arc<Conn>,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    max_body: usize,
}

impl std::fmt::Debug for H3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H3Client")
            .field("remote", &self.shared.conn.remote_address())
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

struct Conn {
    conn: quinn::Connection,
    /// Keeps a private endpoint (from [`H3Client::connect`]) alive.
    _endpoint: quinn::Endpoint,
    /// Ends the driver task once the last clone is gone.
    _stop_driver: tokio_util::sync::DropGuard,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.conn.close(H3_NO_ERROR, b"");
    }
}

impl H3Client {
    /// Connects to `addr` from a fresh socket on the loopback or unspecified
    /// address of the same family, with its driver tracked by `tracker`.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        trust: Trust,
        tracker: &TaskTracker,
    ) -> Result<H3Client, H3Error> {
        let bind: SocketAddr = match (addr.is_ipv4(), addr.ip().is_loopback()) {
            (true, true) => (std::net::Ipv4Addr::LOCALHOST, 0).into(),
            (true, false) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            (false, true) => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
            (false, false) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        H3Connector::new(bind, trust, tracker)?
            .connect(addr, server_name)
            .await
    }

    /// The same connection, collecting response bodies up to `limit` bytes.
    pub fn with_max_body(mut self, limit: usize) -> Self {
        self.max_body = limit;
        self
    }

    /// Sends `req` with its whole body and collects the whole response
    /// (at most the client's body limit). The body is sent while the
    /// response is read, so an echoing server cannot deadlock it.
    pub async fn request(
        &self,
        req: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, H3Error> {
        let (parts, mut body) = req.into_parts();
        let stream = self.open(http::Request::from_parts(parts, ())).await?;
        let (mut tx, mut rx) = stream.split();
        let send = async move {
            while !body.is_empty() {
                let chunk = body.split_to(body.len().min(SEND_CHUNK));
                tx.send_data(chunk).await?;
            }
            tx.finish().await
        };
        let max_body = self.max_body;
        let recv = async move {
            let head = rx.response().await?;
            let mut buf = BytesMut::new();
            while let Some(chunk) = rx.data().await? {
                if buf.len() + chunk.len() > max_body {
                    rx.stop();
                    return Err(H3Error::BodyTooLarge { limit: max_body });
                }
                if buf.is_empty() {
                    buf = BytesMut::from(chunk);
                } else {
                    buf.put(chunk);
                }
            }
            Ok(head.map(|()| buf.freeze()))
        };
        let (sent, resp) = tokio::join!(send, recv);
        let resp = resp?;
        // A server may answer before reading the whole request (an error
        // page): a refused upload is then not an error of the exchange.
        if let Err(e) = sent {
            tracing::debug!(error = %portico_agent::error_chain(&e), "request body not fully sent");
        }
        Ok(resp)
    }

    /// Opens a request stream and sends the head; the body and the
    /// response are up to the caller.
    pub async fn open(&self, req: http::Request<()>) -> Result<H3Stream, H3Error> {
        let inner = self.send.clone().send_request(req).await?;
        Ok(H3Stream { inner })
    }

    /// The server's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.shared.conn.remote_address()
    }

    /// The QUIC connection, for its statistics (RTT, lost packets).
    pub fn quic(&self) -> &quinn::Connection {
        &self.shared.conn
    }

    /// Closes the connection now, for every clone.
    pub fn close(&self) {
        self.shared.conn.close(H3_NO_ERROR, b"");
    }
}

/// One request stream: send body chunks, then read the response.
pub struct H3Stream {
    inner: h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
}

impl H3Stream {
    /// Sends one chunk of the request body (waits for flow control).
    pub async fn send_data(&mut self, chunk: Bytes) -> Result<(), H3Error> {
        Ok(self.inner.send_data(chunk).await?)
    }

    /// Ends the request body.
    pub async fn finish(&mut self) -> Result<(), H3Error> {
        Ok(self.inner.finish().await?)
    }

    /// Waits for the response head.
    pub async fn response(&mut self) -> Result<http::Response<()>, H3Error> {
        Ok(self.inner.recv_response().await?)
    }

    /// The next chunk of the response body; `None` at its end.
    pub async fn data(&mut self) -> Result<Option<Bytes>, H3Error> {
        Ok(self
            .inner
            .recv_data()
            .await?
            .map(|mut b| b.copy_to_bytes(b.remaining())))
    }

    /// Splits the stream so the body can be sent while the response is read.
    pub fn split(self) -> (H3SendHalf, H3RecvHalf) {
        let (send, recv) = self.inner.split();
        (H3SendHalf { inner: send }, H3RecvHalf { inner: recv })
    }
}

/// The sending half of an [`H3Stream`].
pub struct H3SendHalf {
    inner: h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
}

impl H3SendHalf {
    /// Sends one chunk of the request body (waits for flow control).
    pub async fn send_data(&mut self, chunk: Bytes) -> Result<(), H3Error> {
        Ok(self.inner.send_data(chunk).await?)
    }

    /// Ends the request body.
    pub async fn finish(&mut self) -> Result<(), H3Error> {
        Ok(self.inner.finish().await?)
    }
}

/// The receiving half of an [`H3Stream`].
pub struct H3RecvHalf {
    inner: h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
}

impl H3RecvHalf {
    /// Waits for the response head.
    pub async fn response(&mut self) -> Result<http::Response<()>, H3Error> {
        Ok(self.inner.recv_response().await?)
    }

    /// The next chunk of the response body; `None` at its end.
    pub async fn data(&mut self) -> Result<Option<Bytes>, H3Error> {
        Ok(self
            .inner
            .recv_data()
            .await?
            .map(|mut b| b.copy_to_bytes(b.remaining())))
    }

    /// Tells the server to stop sending the response.
    pub fn stop(&mut self) {
        self.inner.stop_sending(Code::H3_REQUEST_CANCELLED);
    }
}

/// The QUIC client config: TLS 1.3, ALPN `h3`, windows for a fast link.
fn client_config(trust: Trust) -> Result<quinn::ClientConfig, H3Error> {
    let builder = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| H3Error::Tls { source })?;
    let mut tls = match trust {
        Trust::Roots(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(pki::insecure_verifier())
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|source| H3Error::Quic { source })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_uni_streams(16u32.into())
        .max_concurrent_bidi_streams(0u32.into())
        .stream_receive_window((4u32 << 20).into())
        .receive_window((16u32 << 20).into())
        .send_window(16 << 20)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(
            Duration::from_secs(30)
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
