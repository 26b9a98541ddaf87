//! In-crate tests of the tunnel acceptor and the request path, with a real
//! quinn client as the connector and real TLS clients, but no router: the
//! edge is built by `serve` from test credentials and a routing table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico_agent::pki;
use portico_proto::api::{edge_server_name, App, BackendTimeout, EdgeConfig, Identity};
use portico_proto::io::{read_frame, write_frame};
use portico_proto::{
    AppId, CloseCode, ConnectorId, EdgeId, ErrorCode, Frame, GroupId, Hello, RegionId,
    ResponseHead, StreamError, StreamKind,
};
use quinn::crypto::rustls::QuicClientConfig;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::certs::CertStore;
use crate::{serve, Handle, Parts};

const DEADLINE: Duration = Duration::from_secs(20);
/// The body `/big` answers with.
const BIG: usize = 8 << 20;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(name: &str) -> anyhow::Result<Pki> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;
        let ca_pem = ca.pem();
        Ok(Pki { ca, ca_pem })
    }

    fn leaf(
        &self,
        dns: Vec<String>,
        uris: Vec<String>,
        eku: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(dns)?;
        for u in uris {
            p.subject_alt_names.push(SanType::URI(u.try_into()?));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.ca)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// An edge's identity certificate, server and client (mesh) use.
    fn edge(
        &self,
        id: &EdgeId,
        region: &RegionId,
    ) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![edge_server_name(id)])?;
        let identity = Identity::Edge {
            id: id.clone(),
            region: region.clone(),
        };
        for u in identity.to_uris() {
            p.subject_alt_names.push(SanType::URI(u.try_into()?));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.ca)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    fn connector(
        &self,
        id: &str,
    ) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let identity = Identity::Connector {
            id: ConnectorId::new(id)?,
            group: GroupId::default_group(),
        };
        self.leaf(
            Vec::new(),
            identity.to_uris(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn roots(&self) -> rustls::RootCertStore {
        pki::root_store(&self.ca_pem).expect("test CA parses")
    }
}

fn edge_id() -> EdgeId {
    EdgeId::new("e-test").unwrap()
}

fn app(id: &str, host: &str, timeout: BackendTimeout) -> App {
    App {
        id: AppId::new(id).unwrap(),
        external_host: host.to_owned(),
        external_url: format!("https://{host}/"),
        internal_url: "http://127.0.0.1:1/".to_owned(),
        connector_group: GroupId::default_group(),
        backend_timeout: timeout,
        validate_backend_tls: true,
        translate_headers: true,
        translate_body: false,
        required_features: vec![],
        preauth: Default::default(),
        assignment: Default::default(),
        identity_headers: Default::default(),
        hidden: false,
        maintenance: false,
        home_url: String::new(),
        backend_ca_sha256: None,
        http_only: true,
        persistent: false,
        oidc_client_id: None,
        created_at: 0,
        certificate: None,
    }
}

fn edge_config(version: u64, revoked: Vec<ConnectorId>) -> EdgeConfig {
    EdgeConfig {
        version,
        changed_at_ms: 0,
        region: RegionId::default_region(),
        apps_domain: "apps.test".into(),
        apps: vec![
            app("hr", "hr.apps.test", BackendTimeout::Seconds(30)),
            app("slow", "slow.apps.test", BackendTimeout::Seconds(1)),
            App {
                required_features: vec!["sign-in-from-the-future".into()],
                ..app("locked", "locked.apps.test", BackendTimeout::Seconds(30))
            },
        ],
        groups: vec![GroupId::default_group()],
        revoked,
        presence: Vec::new(),
        peers: Vec::new(),
        sign_in: None,
        certificates: Vec::new(),
        signed_out: Vec::new(),
        signed_out_users: Vec::new(),
    }
}

/// An edge on 127.0.0.1 with test certificates and a loaded config.
async fn test_edge(pki: &Pki, shutdown: &CancellationToken) -> anyhow::Result<Handle> {
    test_edge_with(pki, shutdown, |_| {}).await
}

/// As [`test_edge`], with the limits and periods of a config `tune`d.
async fn test_edge_with(
    pki: &Pki,
    shutdown: &CancellationToken,
    tune: impl FnOnce(&mut crate::Config),
) -> anyhow::Result<Handle> {
    let mut config = crate::Config::new("https://unused", "/unused");
    config.http3 = true;
    // Tests of the drain set their own delay.
    config.drain_delay = Duration::ZERO;
    tune(&mut config);
    edge_as(pki, shutdown, edge_id(), RegionId::default_region(), config).await
}

/// Edge `id` of `region` on 127.0.0.1 with test certificates (its identity
/// certificate for server and client use, as the router issues it), the
/// test config loaded, and `config`'s limits, periods, HTTP/3 and mesh
/// listener.
async fn edge_as(
    pki: &Pki,
    shutdown: &CancellationToken,
    id: EdgeId,
    region: RegionId,
    config: crate::Config,
) -> anyhow::Result<Handle> {
    config.validate()?;
    let (chain, key) = pki.edge(&id, &region)?;
    let tunnel_cert = CertStore::new();
    tunnel_cert.set(chain, key)?;
    let (chain, key) = pki.leaf(
        vec!["*.apps.test".into()],
        Vec::new(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let public_cert = CertStore::new();
    public_cert.set(chain, key)?;
    let handle = serve(
        Parts {
            edge_id: id,
            region,
            tunnel_cert,
            ca_pem: pki.ca_pem.clone(),
            public_cert,
            initial_config: Some(edge_config(1, Vec::new())),
            public_listen: "127.0.0.1:0".parse()?,
            http3: config.http3,
            tunnel_listen: "127.0.0.1:0".parse()?,
            mesh_listen: config.mesh_listen,
            mesh_dial_overrides: config.mesh_dial_overrides.clone(),
            metrics_listen: Some("127.0.0.1:0".parse()?),
            drain_delay: config.drain_delay,
            grace: Duration::from_secs(2),
            connector_timeout_grace: Duration::from_millis(200),
            access_log: true,
            limits: config.user_limits(),
            tunnels: config.tunnel_policy(),
            shards: config.shards,
        },
        shutdown.clone(),
    )
    .await?;
    assert!(handle.is_ready());
    Ok(handle)
}

/// A QUIC client endpoint presenting `identity`'s certificate.
fn quic_client(
    trust: &Pki,
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> anyhow::Result<quinn::Endpoint> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quic_client_config(trust, cert)?);
    Ok(ep)
}

/// A connector's QUIC client settings with `cert`, trusting `trust`.
fn quic_client_config(
    trust: &Pki,
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(trust.roots())
        .with_client_auth_cert(cert.0, cert.1)?;
    tls.alpn_protocols = vec![portico_proto::ALPN.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )))
}

async fn dial(ep: &quinn::Endpoint, edge: SocketAddr) -> anyhow::Result<quinn::Connection> {
    Ok(ep.connect(edge, &edge_server_name(&edge_id()))?.await?)
}

/// Dials a tunnel for connector `name` whose first connection ID starts
/// with `first`, which picks a sharded edge's shard `first % shards`, as a
/// connector's tunnel slot does.
async fn dial_shard(
    pki: &Pki,
    name: &str,
    edge: SocketAddr,
    first: u8,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let ep = quic_client(pki, pki.connector(name)?)?;
    let mut config = quic_client_config(pki, pki.connector(name)?)?;
    config.initial_dst_cid_provider(Arc::new(move || {
        portico_agent::quic::initial_connection_id(first)
    }));
    let conn = ep
        .connect_with(config, edge, &edge_server_name(&edge_id()))?
        .await?;
    Ok((ep, conn))
}

fn hello(id: &str, version: u32) -> Frame {
    Frame::Hello(Hello {
        version,
        capabilities: portico_proto::capabilities::ALL,
        connector_id: ConnectorId::new(id).unwrap(),
        group: GroupId::default_group(),
        agent_version: "test".into(),
    })
}

/// Opens the control stream and completes Hello/Welcome.
async fn handshake(conn: &quinn::Connection, id: &str) -> anyhow::Result<Control> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &hello(id, 1)).await?;
    match tokio::time::timeout(DEADLINE, read_frame(&mut recv)).await?? {
        Some(Frame::Welcome(w)) => {
            assert_eq!(w.edge_id, edge_id());
            assert_eq!(w.config_version, 1);
        }
        other => anyhow::bail!("expected Welcome, got {other:?}"),
    }
    Ok(Control::start(send, recv))
}

/// A test connector's control stream after `Welcome`. It answers the
/// edge's pings, as a real connector does, and hands every other frame to
/// the test.
struct Control {
    send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    frames: tokio::sync::mpsc::UnboundedReceiver<Frame>,
    /// Pings the edge sent.
    pings: Arc<std::sync::atomic::AtomicU64>,
}

impl Control {
    fn start(send: quinn::SendStream, mut recv: quinn::RecvStream) -> Control {
        use std::sync::atomic::{AtomicU64, Ordering};
        let send = Arc::new(tokio::sync::Mutex::new(send));
        let pings = Arc::new(AtomicU64::new(0));
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let (s, p) = (Arc::clone(&send), Arc::clone(&pings));
        tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut recv).await {
                match frame {
                    Frame::Ping(v) => {
                        p.fetch_add(1, Ordering::Relaxed);
                        let _ = write_frame(&mut *s.lock().await, &Frame::Pong(v)).await;
                    }
                    other => {
                        let _ = tx.send(other);
                    }
                }
            }
        });
        Control {
            send,
            frames,
            pings,
        }
    }

    /// The next frame that is not a Ping; `None` when the stream ended.
    async fn next(&mut self) -> anyhow::Result<Option<Frame>> {
        Ok(tokio::time::timeout(DEADLINE, self.frames.recv()).await?)
    }

    async fn send(&self, frame: &Frame) -> anyhow::Result<()> {
        write_frame(&mut *self.send.lock().await, frame).await?;
        Ok(())
    }

    /// Pings the edge and waits for its Pong.
    async fn ping(&mut self, v: u64) -> anyhow::Result<()> {
        self.send(&Frame::Ping(v)).await?;
        match self.next().await? {
            Some(Frame::Pong(got)) if got == v => Ok(()),
            other => anyhow::bail!("expected Pong({v}), got {other:?}"),
        }
    }

    fn pings(&self) -> u64 {
        self.pings.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The application close code of a closed connection.
async fn close_code(conn: &quinn::Connection) -> anyhow::Result<(CloseCode, String)> {
    match tokio::time::timeout(DEADLINE, conn.closed()).await? {
        quinn::ConnectionError::ApplicationClosed(c) => Ok((
            CloseCode::from_wire(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        other => anyhow::bail!("expected an application close, got {other:#}"),
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        anyhow::ensure!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test]
async fn bad_peers_get_closed_and_good_tunnels_stay_up() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;

    let good_ep = quic_client(&pki, pki.connector("c-good")?)?;
    let good = dial(&good_ep, edge.tunnel_addr).await?;
    let mut gc = handshake(&good, "c-good").await?;
    gc.ping(1).await?;
    wait_until("the good tunnel to attach", || edge.tunnel_count() == 1).await?;

    let cases: [(&str, Vec<u8>, CloseCode); 4] = [
        // A Hello type byte followed by bytes that are no Hello.
        (
            "garbage",
            vec![0x01, 0x04, 0xde, 0xad, 0xbe, 0xef],
            CloseCode::ProtocolError,
        ),
        // A StreamHead-typed frame claiming 1 MiB.
        (
            "oversized head",
            vec![0x10, 0x80, 0x10, 0x00, 0x00],
            CloseCode::ProtocolError,
        ),
        ("unknown type", vec![0x7f, 0x00], CloseCode::ProtocolError),
        (
            "version 99",
            hello("c-bad", 99).to_bytes()?.to_vec(),
            CloseCode::VersionMismatch,
        ),
    ];
    let bad_ep = quic_client(&pki, pki.connector("c-bad")?)?;
    for (i, (name, bytes, want)) in cases.into_iter().enumerate() {
        let conn = dial(&bad_ep, edge.tunnel_addr).await.context(name)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&bytes).await?;
        if want == CloseCode::VersionMismatch {
            match tokio::time::timeout(DEADLINE, read_frame(&mut recv)).await?? {
                Some(Frame::Goodbye(g)) => {
                    assert_eq!(CloseCode::from_wire(g.code), CloseCode::VersionMismatch);
                    assert!(g.reason.contains("99"), "{}", g.reason);
                }
                other => anyhow::bail!("{name}: expected Goodbye, got {other:?}"),
            }
        }
        let (code, reason) = close_code(&conn).await.context(name)?;
        assert_eq!(code, want, "{name}: closed with {code} ({reason})");
        assert!(
            !reason.is_empty(),
            "{name}: the close carries the decode error"
        );
        // Meanwhile the good tunnel still answers.
        gc.ping(100 + i as u64).await.context(name)?;
    }
    assert_eq!(edge.tunnel_count(), 1);
    let text = edge.shared.metrics.render();
    assert!(
        text.contains("portico_edge_tunnel_closes_total{reason=\"protocol_error\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("portico_edge_tunnel_closes_total{reason=\"version_mismatch\"} 1"),
        "{text}"
    );

    shutdown.cancel();
    // Shutdown asks every connector to drain, then closes with Shutdown.
    match gc.next().await? {
        Some(Frame::Drain) => {}
        other => anyhow::bail!("expected Drain on shutdown, got {other:?}"),
    }
    let (code, _) = close_code(&good).await?;
    assert_eq!(code, CloseCode::Shutdown);
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let rogue = Pki::new("rogue CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;

    // Trusts the real CA for the edge, but presents a rogue-signed cert.
    let ep = quic_client(&pki, rogue.connector("c-rogue")?)?;
    let refused = match dial(&ep, edge.tunnel_addr).await {
        Err(_) => true,
        Ok(conn) => {
            let attempt = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                write_frame(&mut send, &hello("c-rogue", 1)).await?;
                anyhow::Ok(read_frame(&mut recv).await?)
            };
            let r = tokio::time::timeout(DEADLINE, attempt).await?;
            assert!(
                matches!(
                    conn.close_reason(),
                    Some(
                        quinn::ConnectionError::TransportError(_)
                            | quinn::ConnectionError::ConnectionClosed(_)
                    )
                ),
                "{:?}",
                conn.close_reason()
            );
            r.is_err()
        }
    };
    assert!(
        refused,
        "a rogue client certificate must fail the handshake"
    );
    assert_eq!(edge.tunnel_count(), 0);
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// A connector that answers every stream: `/error` with an `Error` frame,
/// `/hang` never, `/ws` with a 101 and an echo, anything else with a 200
/// whose body names the connector, the head and the request body.
fn fake_connector(conn: quinn::Connection, name: &'static str) {
    fake_connector_with(conn, name, Arc::new(tokio::sync::Notify::new()));
}

/// As [`fake_connector`]; `/held` answers once `release` is notified.
fn fake_connector_with(
    conn: quinn::Connection,
    name: &'static str,
    release: Arc<tokio::sync::Notify>,
) {
    fake_connector_full(
        conn,
        name,
        release,
        tokio::sync::mpsc::unbounded_channel().0,
    );
}

/// As [`fake_connector_with`]; `/cancel-me` never answers and reports the
/// code the edge stopped the stream with on `stopped`.
fn fake_connector_full(
    conn: quinn::Connection,
    name: &'static str,
    release: Arc<tokio::sync::Notify>,
    stopped: tokio::sync::mpsc::UnboundedSender<Option<u64>>,
) {
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let release = Arc::clone(&release);
            let stopped = stopped.clone();
            tokio::spawn(async move {
                let Ok(Some(Frame::StreamHead(head))) = read_frame(&mut recv).await else {
                    return;
                };
                match std::str::from_utf8(&head.path).unwrap_or_default() {
                    "/error" => {
                        let e = Frame::Error(StreamError {
                            code: ErrorCode::BackendUnreachable,
                            message: "connection refused".into(),
                        });
                        let _ = write_frame(&mut send, &e).await;
                        let _ = send.finish();
                    }
                    "/big" => {
                        // 8 MiB, far more than one stream window: a client
                        // that reads nothing leaves the edge holding some.
                        let mut headers = http::HeaderMap::new();
                        headers.insert("content-length", (BIG as u64).into());
                        let r = Frame::ResponseHead(ResponseHead {
                            status: StatusCode::OK,
                            headers,
                        });
                        let _ = write_frame(&mut send, &r).await;
                        let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                        let mut sent = 0;
                        let mut code = None;
                        while sent < BIG {
                            if let Err(quinn::WriteError::Stopped(c)) =
                                send.write_chunk(chunk.clone()).await
                            {
                                code = Some(c.into_inner());
                                break;
                            }
                            sent += chunk.len();
                        }
                        let _ = send.finish();
                        if code.is_none() {
                            code = send.stopped().await.ok().flatten().map(|c| c.into_inner());
                        }
                        let _ = stopped.send(code);
                    }
                    "/cancel-me" => {
                        let code = send.stopped().await.ok().flatten().map(|c| c.into_inner());
                        let _ = stopped.send(code);
                    }
                    "/sized" => {
                        // A body framed by Content-Length, its FIN in the
                        // same write; reports whether the edge stopped the
                        // stream (a STOP_SENDING) or read it to its end.
                        let mut headers = http::HeaderMap::new();
                        headers.insert("content-length", "5".parse().unwrap());
                        let r = Frame::ResponseHead(ResponseHead {
                            status: StatusCode::OK,
                            headers,
                        });
                        let mut out = bytes::BytesMut::new();
                        let _ = r.encode(&mut out);
                        out.extend_from_slice(b"sized");
                        let _ = send.write_all(&out).await;
                        let _ = send.finish();
                        let code = send.stopped().await.ok().flatten().map(|c| c.into_inner());
                        let _ = stopped.send(code);
                    }
                    "/hang" => {
                        let _ = recv.read_to_end(1 << 20).await;
                        let _ = send.stopped().await;
                    }
                    "/ws" => {
                        assert_eq!(head.kind, StreamKind::WebSocket);
                        assert_eq!(head.headers["upgrade"], "websocket");
                        let mut headers = http::HeaderMap::new();
                        headers.insert("upgrade", "websocket".parse().unwrap());
                        headers.insert("connection", "upgrade".parse().unwrap());
                        headers.insert("sec-websocket-accept", "test".parse().unwrap());
                        let r = Frame::ResponseHead(ResponseHead {
                            status: StatusCode::SWITCHING_PROTOCOLS,
                            headers,
                        });
                        let _ = write_frame(&mut send, &r).await;
                        let _ = tokio::io::copy(&mut recv, &mut send).await;
                        let _ = send.finish();
                    }
                    path => {
                        if path == "/held" {
                            release.notified().await;
                        }
                        let body = recv.read_to_end(1 << 20).await.unwrap_or_default();
                        let mut headers = http::HeaderMap::new();
                        headers.insert("x-served-by", name.parse().unwrap());
                        headers.insert("connection", "close".parse().unwrap());
                        let r = Frame::ResponseHead(ResponseHead {
                            status: StatusCode::OK,
                            headers,
                        });
                        let _ = write_frame(&mut send, &r).await;
                        let text = format!(
                            "{name}|{}|{}|{}|{}|{}",
                            head.app,
                            head.method,
                            String::from_utf8_lossy(&head.authority),
                            String::from_utf8_lossy(&head.path),
                            String::from_utf8_lossy(&body)
                        );
                        let _ = send.write_all(text.as_bytes()).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                }
            });
        }
    });
}

/// Attaches connector `c-1` to `edge` as [`fake_connector_full`], whose
/// streams report how the edge stopped them on the returned receiver.
async fn attach_reporting_connector(
    pki: &Pki,
    edge: &Handle,
) -> anyhow::Result<(
    quinn::Endpoint,
    quinn::Connection,
    Control,
    tokio::sync::mpsc::UnboundedReceiver<Option<u64>>,
)> {
    let ep = quic_client(pki, pki.connector("c-1")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let control = handshake(&conn, "c-1").await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    fake_connector_full(
        conn.clone(),
        "c-1",
        Arc::new(tokio::sync::Notify::new()),
        tx,
    );
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;
    Ok((ep, conn, control, rx))
}

/// One HTTPS request over a fresh connection, HTTP/2 or HTTP/1.1 by ALPN.
async fn https(
    pki: &Pki,
    addr: SocketAddr,
    host: &str,
    h2: bool,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<Response<Bytes>> {
    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from(host.to_owned())?, tcp)
        .await?;
    let io = TokioIo::new(tls);
    let resp = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    };
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await??
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}

fn get(host: &str, path: &str, h2: bool) -> Request<Full<Bytes>> {
    let b = if h2 {
        Request::get(format!("https://{host}{path}"))
    } else {
        Request::get(path).header("host", host)
    };
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn requests_route_by_host_and_errors_are_branded() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let addr = edge.public_addr;

    // No connector yet: the app exists, but nothing can reach it.
    let r = https(
        &pki,
        addr,
        "hr.apps.test",
        false,
        get("hr.apps.test", "/", false),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers()["x-portico-error"], "ConnectorNotFound");

    // Two Host headers (RFC 9112 §3.2), and an HTTP/2 Host that disagrees
    // with :authority: refused before routing, and counted.
    let req = Request::get("/")
        .header("host", "hr.apps.test")
        .header("host", "nope.apps.test")
        .body(Full::new(Bytes::new()))?;
    let r = https(&pki, addr, "hr.apps.test", false, req).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["x-portico-error"], "BadRequest");
    let req = Request::get("https://hr.apps.test/")
        .header("host", "nope.apps.test")
        .body(Full::new(Bytes::new()))?;
    let r = https(&pki, addr, "hr.apps.test", true, req).await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Unknown host: AppNotFound, as HTML or JSON as the client prefers.
    let r = https(
        &pki,
        addr,
        "nope.apps.test",
        false,
        get("NOPE.apps.test:8443", "/", false),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["x-portico-error"], "AppNotFound");
    assert!(r.headers()["content-type"]
        .to_str()?
        .starts_with("text/html"));
    let id = r.headers()["x-portico-request-id"].to_str()?.to_owned();
    let text = String::from_utf8(r.body().to_vec())?;
    assert!(
        text.contains("AppNotFound") && text.contains(&id) && text.contains("Portico"),
        "{text}"
    );
    let mut req = get("nope.apps.test", "/", true);
    req.headers_mut()
        .insert("accept", "application/json".parse()?);
    let r = https(&pki, addr, "nope.apps.test", true, req).await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: serde_json::Value = serde_json::from_slice(r.body())?;
    assert_eq!(v["error"], "AppNotFound");
    assert_eq!(v["status"], 404);
    assert_eq!(
        v["request_id"],
        r.headers()["x-portico-request-id"].to_str()?
    );

    // A connector attaches: requests reach it over HTTP/1.1 and HTTP/2.
    let ep = quic_client(&pki, pki.connector("c-1")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let _control = handshake(&conn, "c-1").await?;
    fake_connector(conn.clone(), "c-1");
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;

    let mut req = Request::post("/submit?x=1")
        .header("host", "HR.apps.test:443")
        .body(Full::new(Bytes::from_static(b"hello body")))?;
    req.headers_mut()
        .insert("connection", "keep-alive".parse()?);
    let r = https(&pki, addr, "hr.apps.test", false, req).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("x-portico-request-id"));
    assert!(!r.headers().contains_key("x-portico-error"));
    assert_eq!(
        r.body(),
        "c-1|hr|POST|HR.apps.test:443|/submit?x=1|hello body"
    );

    let r = https(
        &pki,
        addr,
        "hr.apps.test",
        true,
        get("Hr.Apps.Test:8443", "/h2", true),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.body(), "c-1|hr|GET|Hr.Apps.Test:8443|/h2|");

    // The connector's Error frame becomes the code's page.
    let r = https(
        &pki,
        addr,
        "hr.apps.test",
        false,
        get("hr.apps.test", "/error", false),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers()["x-portico-error"], "BackendUnreachable");

    // An app that needs a feature this edge lacks is refused (fail
    // closed), though a connector is there to serve it.
    let r = https(
        &pki,
        addr,
        "locked.apps.test",
        false,
        get("locked.apps.test", "/", false),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["x-portico-error"], "FeatureUnsupported");

    // No answer within the app's timeout plus the grace: ConnectorTimeout.
    let r = https(
        &pki,
        addr,
        "slow.apps.test",
        false,
        get("slow.apps.test", "/hang", false),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.headers()["x-portico-error"], "ConnectorTimeout");

    let text = edge.shared.metrics.render();
    assert!(
        text.contains(r#"portico_edge_requests_total{app="hr",code="",status="200"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"portico_edge_requests_total{app="",code="AppNotFound",status="404"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"portico_edge_requests_total{app="slow",code="ConnectorTimeout",status="504"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"portico_edge_bytes_total{direction="in"} 10"#),
        "{text}"
    );
    assert!(
        text.contains(r#"portico_edge_requests_total{app="",code="BadRequest",status="400"} 2"#),
        "{text}"
    );

    // The metrics listener serves the same registry, and readiness.
    let metrics_addr = edge.metrics_addr.context("metrics bound")?;
    let mut tcp = tokio::net::TcpStream::connect(metrics_addr).await?;
    tcp.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

#[tokio::test]
async fn draining_tunnels_are_skipped_and_revoked_ones_closed() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let addr = edge.public_addr;

    let ep_a = quic_client(&pki, pki.connector("c-a")?)?;
    let a = dial(&ep_a, edge.tunnel_addr).await?;
    let a_control = handshake(&a, "c-a").await?;
    fake_connector(a.clone(), "c-a");
    let ep_b = quic_client(&pki, pki.connector("c-b")?)?;
    let b = dial(&ep_b, edge.tunnel_addr).await?;
    let _b_control = handshake(&b, "c-b").await?;
    fake_connector(b.clone(), "c-b");
    wait_until("both tunnels to attach", || edge.tunnel_count() == 2).await?;

    // c-a drains: every request goes to c-b.
    a_control.send(&Frame::Drain).await?;
    wait_until("c-a to drain", || {
        edge.shared
            .tunnels
            .snapshot()
            .iter()
            .any(|t| t.connector.as_str() == "c-a" && t.is_draining())
    })
    .await?;
    for _ in 0..6 {
        let r = https(
            &pki,
            addr,
            "hr.apps.test",
            true,
            get("hr.apps.test", "/", true),
        )
        .await?;
        assert_eq!(r.headers()["x-served-by"], "c-b");
        assert!(
            !r.headers().contains_key("connection"),
            "hop-by-hop headers are dropped"
        );
    }

    // The router revokes c-b: its tunnel closes with Revoked, and a new
    // tunnel from it is refused.
    edge.shared
        .apply_config(edge_config(2, vec![ConnectorId::new("c-b")?]));
    let (code, _) = close_code(&b).await?;
    assert_eq!(code, CloseCode::Revoked);
    wait_until("c-b to detach", || edge.tunnel_count() == 1).await?;
    let again = dial(&ep_b, edge.tunnel_addr).await?;
    let (code, _) = close_code(&again).await?;
    assert_eq!(code, CloseCode::Revoked);

    // Only the draining tunnel is left: nothing may be sent to it.
    let r = https(
        &pki,
        addr,
        "hr.apps.test",
        false,
        get("hr.apps.test", "/", false),
    )
    .await?;
    assert_eq!(r.headers()["x-portico-error"], "ConnectorNotFound");

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

#[tokio::test]
async fn websocket_upgrades_become_byte_pipes() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let ep = quic_client(&pki, pki.connector("c-ws")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let _control = handshake(&conn, "c-ws").await?;
    fake_connector(conn.clone(), "c-ws");
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;

    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(edge.public_addr).await?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("hr.apps.test")?, tcp)
        .await?;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: hr.apps.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut byte)).await??;
        head.push(byte[0]);
    }
    let head = String::from_utf8(head)?.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-portico-request-id"), "{head}");
    s.write_all(b"ping over the pipe").await?;
    let mut back = [0u8; 18];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back)).await??;
    assert_eq!(&back, b"ping over the pipe");
    drop(s);

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// SIGTERM starts the drain: the edge asks its connector to drain, says
/// `/ready` 503, refuses new tunnels at once, and keeps serving users
/// through the tunnels it has for the drain delay (here an hour: the test
/// holds the edge in it). The hard stop (a second signal) ends it early
/// and closes the tunnel with `Shutdown`.
#[tokio::test]
async fn a_draining_edge_keeps_serving_users_through_its_tunnels_and_refuses_new_ones(
) -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.drain_delay = Duration::from_secs(3600);
    })
    .await?;
    let addr = edge.public_addr;
    let ep = quic_client(&pki, pki.connector("c-1")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let mut control = handshake(&conn, "c-1").await?;
    fake_connector(conn.clone(), "c-1");
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;
    assert!(edge.is_ready());

    shutdown.cancel();
    match control.next().await? {
        Some(Frame::Drain) => {}
        other => anyhow::bail!("expected Drain on shutdown, got {other:?}"),
    }
    assert!(!edge.is_ready(), "/ready says 503 while draining");
    assert!(edge
        .shared
        .metrics
        .render()
        .contains("portico_edge_draining 1"));
    // A new tunnel is refused in the handshake, not left to time out.
    let refused = dial(&ep, edge.tunnel_addr).await;
    let err = refused.expect_err("a draining edge takes no new tunnel");
    assert!(
        format!("{err:#}").to_ascii_lowercase().contains("refused"),
        "{err:#}"
    );
    // Users are still served, over HTTP/1.1 and HTTP/2, new connections
    // included, through the drained tunnel.
    for h2 in [false, true] {
        let r = https(
            &pki,
            addr,
            "hr.apps.test",
            h2,
            get("hr.apps.test", "/while-draining", h2),
        )
        .await?;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.body(), "c-1|hr|GET|hr.apps.test|/while-draining|");
    }
    assert!(conn.close_reason().is_none(), "the tunnel stays up");

    edge.hard_stop().cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    let (code, _) = close_code(&conn).await?;
    assert_eq!(code, CloseCode::Shutdown);
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_in_flight_requests_finish() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let addr = edge.public_addr;
    let ep = quic_client(&pki, pki.connector("c-1")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let mut control = handshake(&conn, "c-1").await?;
    let release = Arc::new(tokio::sync::Notify::new());
    fake_connector_with(conn.clone(), "c-1", Arc::clone(&release));
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;

    let in_flight = tokio::spawn({
        let pki = Pki {
            ca: Pki::new("unused")?.ca,
            ca_pem: pki.ca_pem.clone(),
        };
        async move {
            https(
                &pki,
                addr,
                "hr.apps.test",
                false,
                get("hr.apps.test", "/held", false),
            )
            .await
        }
    });
    let streams = edge.shared.metrics.streams.clone();
    wait_until("the request to be in flight", || streams.get() == 1).await?;

    shutdown.cancel();
    match control.next().await? {
        Some(Frame::Drain) => {}
        other => anyhow::bail!("expected Drain on shutdown, got {other:?}"),
    }
    // New users are turned away while the old request is still running.
    let end = tokio::time::Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        anyhow::ensure!(
            tokio::time::Instant::now() < end,
            "the public listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!in_flight.is_finished());
    release.notify_one();
    let r = tokio::time::timeout(DEADLINE, in_flight).await???;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.body(), "c-1|hr|GET|hr.apps.test|/held|");
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    let (code, _) = close_code(&conn).await?;
    assert_eq!(code, CloseCode::Shutdown);
    Ok(())
}

/// Log lines as JSON objects, captured for the whole test binary (a
/// subscriber per test would miss events: tracing caches each call site's
/// interest across threads). Tests pick their lines by a unique path.
#[derive(Clone, Default)]
struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// The binary's capture, installed as the global subscriber on first use.
    fn global() -> &'static LogCapture {
        static CAPTURE: std::sync::OnceLock<LogCapture> = std::sync::OnceLock::new();
        CAPTURE.get_or_init(|| {
            let capture = LogCapture::default();
            let w = capture.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || w.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in the edge's tests");
            capture
        })
    }

    /// The access-log lines so far of requests for `path`.
    fn access_lines(&self, path: &str) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "portico::access" && v["path"] == path)
            .collect()
    }
}

/// A response framed by Content-Length ends at its last byte without
/// waiting for the stream's FIN; when the FIN came with that byte, the
/// edge still takes it, so the stream ends read to its end: the
/// connector's stream sees no STOP_SENDING, and the tunnel's driver is
/// not woken to send one (BENCHMARKS.md: about 900 instructions per
/// request at the edge).
#[tokio::test]
async fn a_response_read_to_its_length_takes_the_fin_that_came_with_it() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let (_ep, conn, _control, mut rx) = attach_reporting_connector(&pki, &edge).await?;
    for h2 in [false, true, false, true] {
        let r = https(
            &pki,
            edge.public_addr,
            "hr.apps.test",
            h2,
            get("hr.apps.test", "/sized", h2),
        )
        .await?;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.body().as_ref(), b"sized");
        let stopped = tokio::time::timeout(DEADLINE, rx.recv()).await?;
        assert_eq!(stopped, Some(None), "the edge stopped the stream");
    }
    assert_eq!(conn.stats().frame_rx.stop_sending, 0);
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_stream() -> anyhow::Result<()> {
    let logs = LogCapture::global();
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let (_ep, _conn, _control, mut rx) = attach_reporting_connector(&pki, &edge).await?;

    let addr = edge.public_addr;
    let ca_pem = pki.ca_pem.clone();
    let client = tokio::spawn(async move {
        let pki = Pki {
            ca: Pki::new("unused")?.ca,
            ca_pem,
        };
        https(
            &pki,
            addr,
            "hr.apps.test",
            true,
            get("hr.apps.test", "/cancel-me", true),
        )
        .await
    });
    let streams = edge.shared.metrics.streams.clone();
    wait_until("the request to be in flight", || streams.get() == 1).await?;
    client.abort(); // the user goes away (HTTP/2 connection dropped)
    let code = tokio::time::timeout(DEADLINE, rx.recv())
        .await?
        .context("connector reported")?;
    assert_eq!(code.map(CloseCode::from_wire), Some(CloseCode::Cancelled));
    wait_until("the stream to be released", || streams.get() == 0).await?;
    assert!(edge
        .shared
        .tunnels
        .snapshot()
        .iter()
        .all(|t| t.outstanding() == 0));
    // Recorded once, as the client's cancel: 499 in metrics and the log.
    let text = edge.shared.metrics.render();
    assert!(
        text.contains(
            r#"portico_edge_requests_total{app="hr",code="ClientClosed",status="499"} 1"#
        ),
        "{text}"
    );
    let lines = logs.access_lines("/cancel-me");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["status"], 499);
    assert_eq!(line["code"], "ClientClosed");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/cancel-me");
    assert_eq!(line["host"], "hr.apps.test");
    assert_eq!(line["app"], "hr");
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(line["request.id"].as_str().map(str::len), Some(32));

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

#[tokio::test]
async fn a_renewed_public_certificate_is_presented_without_a_restart() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let store = CertStore::new();
    let first = pki.leaf(
        vec!["*.apps.test".into()],
        Vec::new(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let first_der = first.0[0].clone();
    store.set(first.0, first.1)?;
    let tls = crate::listener::tls_config(crate::certs::SniCerts::new(Arc::clone(&store)))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    let presented = || async {
        let tls = rustls::ClientConfig::builder_with_provider(pki::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(pki.roots())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let s = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from("hr.apps.test")?, tcp)
            .await?;
        let cert = s.get_ref().1.peer_certificates().context("server cert")?[0].clone();
        anyhow::Ok(cert)
    };
    assert_eq!(presented().await?, first_der);
    let second = pki.leaf(
        vec!["*.apps.test".into()],
        Vec::new(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let second_der = second.0[0].clone();
    store.set(second.0, second.1)?;
    assert_eq!(presented().await?, second_der);
    assert_ne!(first_der, second_der);
    Ok(())
}

/// Uploaded certificates are chosen by SNI before the edge's own: a
/// custom-domain host gets the uploaded one that covers it (the exact name
/// before a wildcard), any other name the fallback; an unusable upload is
/// left out; the expiry gauge follows what is installed.
#[tokio::test]
async fn uploaded_certificates_are_presented_by_sni_before_the_edges_own() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let store = CertStore::new();
    let own = pki.leaf(
        vec!["*.apps.test".into()],
        Vec::new(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let own_der = own.0[0].clone();
    store.set(own.0, own.1)?;
    let upload = |id: &str, names: &[&str], not_after: u64| -> anyhow::Result<_> {
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &pki.ca)?;
        anyhow::Ok((
            portico_proto::api::EdgeCertificate {
                id: id.into(),
                names: names.iter().map(|n| n.to_string()).collect(),
                not_after,
                chain_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
            cert.der().clone(),
        ))
    };
    let (wild, wild_der) = upload("wild", &["*.corp.test"], 2_000_000_000)?;
    let (exact, exact_der) = upload("exact", &["hr.corp.test"], 1_900_000_000)?;
    let (mut broken, _) = upload("broken", &["pay.corp.test"], 2_100_000_000)?;
    broken.key_pem = wild.key_pem.clone(); // not its key
    let sni = crate::certs::SniCerts::new(Arc::clone(&store));
    let installed = sni.set_uploaded(&[wild, exact, broken]);
    assert_eq!(
        installed.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        ["wild", "exact"],
        "the unusable one is left out"
    );
    let metrics = crate::metrics::Metrics::new(&EdgeId::new("e1")?, &RegionId::default_region());
    metrics.set_certificate_expiry(&installed);
    let text = metrics.render();
    assert!(
        text.contains(r#"portico_edge_certificate_expiry_timestamp_seconds{certificate="exact",host="hr.corp.test"} 1900000000"#),
        "{text}"
    );

    let tls = crate::listener::tls_config(Arc::clone(&sni))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    let roots = pki.roots();
    let presented = |host: &'static str| {
        let roots = roots.clone();
        async move {
            let tls = rustls::ClientConfig::builder_with_provider(pki::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let s = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(ServerName::try_from(host)?, tcp)
                .await?;
            let cert = s.get_ref().1.peer_certificates().context("server cert")?[0].clone();
            anyhow::Ok(cert)
        }
    };
    assert_eq!(
        presented("hr.corp.test").await?,
        exact_der,
        "the exact name first"
    );
    assert_eq!(
        presented("wiki.corp.test").await?,
        wild_der,
        "then the wildcard"
    );
    assert_eq!(
        presented("hr.apps.test").await?,
        own_der,
        "else the edge's own"
    );
    assert_eq!(
        presented("pay.corp.test").await?,
        wild_der,
        "the unusable upload's host falls to what else covers it"
    );
    Ok(())
}

/// An HTTP/3 client of the edge's public port, trusting the test CA.
async fn h3_client(
    pki: &Pki,
    edge: &Handle,
    host: &str,
    tracker: &tokio_util::task::TaskTracker,
) -> anyhow::Result<portico_loadtest::h3::H3Client> {
    let addr = edge.h3_addr.context("HTTP/3 is on")?;
    Ok(portico_loadtest::h3::H3Client::connect(
        addr,
        host,
        portico_loadtest::h3::Trust::Roots(pki.roots()),
        tracker,
    )
    .await?)
}

fn h3_get(host: &str, path: &str) -> Request<Bytes> {
    Request::get(format!("https://{host}{path}"))
        .body(Bytes::new())
        .unwrap()
}

#[tokio::test]
async fn http3_shares_the_port_routing_errors_and_metrics() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let h3_addr = edge.h3_addr.context("HTTP/3 is on by default")?;
    assert_eq!(h3_addr.port(), edge.public_addr.port());
    let tracker = tokio_util::task::TaskTracker::new();

    // HTTP/1.1 and HTTP/2 answers advertise the UDP port, errors included.
    for h2 in [false, true] {
        let r = https(
            &pki,
            edge.public_addr,
            "hr.apps.test",
            h2,
            get("nope.apps.test", "/", h2),
        )
        .await?;
        assert_eq!(
            r.headers()["alt-svc"],
            format!("h3=\":{}\"; ma=86400", h3_addr.port())
        );
    }

    let h3 = h3_client(&pki, &edge, "hr.apps.test", &tracker).await?;
    // No connector yet.
    let r = h3.request(h3_get("hr.apps.test", "/")).await?;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers()["x-portico-error"], "ConnectorNotFound");
    assert!(!r.headers().contains_key("alt-svc"));

    // Unknown host on the same connection (the certificate is a wildcard).
    let mut req = h3_get("NOPE.apps.test:8443", "/");
    req.headers_mut()
        .insert("accept", "application/json".parse()?);
    let r = h3.request(req).await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["x-portico-error"], "AppNotFound");
    let v: serde_json::Value = serde_json::from_slice(r.body())?;
    assert_eq!(v["error"], "AppNotFound");
    assert_eq!(
        v["request_id"],
        r.headers()["x-portico-request-id"].to_str()?
    );
    let r = h3.request(h3_get("nope.apps.test", "/")).await?;
    assert!(r.headers()["content-type"]
        .to_str()?
        .starts_with("text/html"));
    assert!(String::from_utf8(r.body().to_vec())?.contains("AppNotFound"));

    // CONNECT (WebSocket over HTTP/3 would be an extended CONNECT): refused.
    let connect = Request::builder()
        .method(http::Method::CONNECT)
        .uri("https://hr.apps.test")
        .body(Bytes::new())?;
    let r = h3.request(connect).await?;
    assert_eq!(r.headers()["x-portico-error"], "BadRequest");

    // A connector attaches: GET and POST reach it.
    let ep = quic_client(&pki, pki.connector("c-1")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let _control = handshake(&conn, "c-1").await?;
    fake_connector(conn.clone(), "c-1");
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;

    let r = h3.request(h3_get("Hr.Apps.Test", "/h3?q=1")).await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-served-by"], "c-1");
    assert!(r.headers().contains_key("x-portico-request-id"));
    assert!(!r.headers().contains_key("connection"));
    assert_eq!(r.body(), "c-1|hr|GET|Hr.Apps.Test|/h3?q=1|");

    let body: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let req = Request::post("https://hr.apps.test/up").body(Bytes::from(body.clone()))?;
    let r = h3.request(req).await?;
    assert_eq!(r.status(), StatusCode::OK);
    let mut want = b"c-1|hr|POST|hr.apps.test|/up|".to_vec();
    want.extend_from_slice(&body);
    assert_eq!(r.body().as_ref(), want.as_slice());

    // Requests in parallel on one connection.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let h3 = h3.clone();
        set.spawn(async move { h3.request(h3_get("hr.apps.test", &format!("/p{i}"))).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r??.status(), StatusCode::OK);
    }

    let r = h3.request(h3_get("hr.apps.test", "/error")).await?;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers()["x-portico-error"], "BackendUnreachable");

    // A body that breaks its Content-Length is the client's fault.
    for declared in ["10", "3", "five"] {
        let req = Request::post("https://hr.apps.test/up")
            .header("content-length", declared)
            .body(Bytes::from_static(b"hello"))?;
        let r = h3.request(req).await?;
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "content-length {declared}"
        );
        assert_eq!(r.headers()["x-portico-error"], "BadRequestBody");
    }

    let text = edge.shared.metrics.render();
    for line in [
        r#"portico_edge_requests_total{app="hr",code="",status="200"} 22"#,
        r#"portico_edge_requests_total{app="hr",code="ConnectorNotFound",status="502"} 1"#,
        r#"portico_edge_requests_total{app="hr",code="BackendUnreachable",status="502"} 1"#,
        // Two over HTTP/1.1 and HTTP/2, two over HTTP/3.
        r#"portico_edge_requests_total{app="",code="AppNotFound",status="404"} 4"#,
        r#"portico_edge_requests_total{app="",code="BadRequest",status="400"} 1"#,
        r#"portico_edge_requests_total{app="hr",code="BadRequestBody",status="400"} 3"#,
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }

    h3.close();
    drop(h3);
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    tracker.close();
    tokio::time::timeout(DEADLINE, tracker.wait()).await?;
    Ok(())
}

#[tokio::test]
async fn http3_requests_in_flight_finish_on_shutdown() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let ep = quic_client(&pki, pki.connector("c-1")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let _control = handshake(&conn, "c-1").await?;
    let release = Arc::new(tokio::sync::Notify::new());
    fake_connector_with(conn.clone(), "c-1", Arc::clone(&release));
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;
    let tracker = tokio_util::task::TaskTracker::new();
    let h3 = h3_client(&pki, &edge, "hr.apps.test", &tracker).await?;

    let in_flight = tokio::spawn({
        let h3 = h3.clone();
        async move { h3.request(h3_get("hr.apps.test", "/held")).await }
    });
    let streams = edge.shared.metrics.streams.clone();
    wait_until("the request to be in flight", || streams.get() == 1).await?;
    shutdown.cancel();
    // After the GOAWAY, new requests on the connection are refused.
    let end = tokio::time::Instant::now() + DEADLINE;
    while h3.request(h3_get("hr.apps.test", "/late")).await.is_ok() {
        anyhow::ensure!(
            tokio::time::Instant::now() < end,
            "the edge still takes new HTTP/3 requests"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!in_flight.is_finished());
    release.notify_one();
    let r = tokio::time::timeout(DEADLINE, in_flight).await???;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.body(), "c-1|hr|GET|hr.apps.test|/held|");
    let h3_addr = edge.h3_addr.context("HTTP/3 is on")?;
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    // The UDP port is released once the edge is done.
    std::net::UdpSocket::bind(h3_addr)?;
    drop(h3);
    tracker.close();
    tokio::time::timeout(DEADLINE, tracker.wait()).await?;
    Ok(())
}

/// A TLS connection to the public listener with ALPN `http/1.1`, for
/// requests hyper's client would not send.
async fn raw_tls(
    pki: &Pki,
    addr: SocketAddr,
    host: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from(host.to_owned())?, tcp)
        .await?)
}

/// Reads an HTTP/1.1 answer up to the end of its head.
async fn read_head(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        if tokio::time::timeout(DEADLINE, io.read(&mut byte)).await?? == 0 {
            break;
        }
        out.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A malformed chunked body is the client's fault: 400 `BadRequestBody`,
/// not a gateway error, and counted so.
#[tokio::test]
async fn a_malformed_request_body_is_a_client_error() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;
    let ep = quic_client(&pki, pki.connector("c-1")?)?;
    let conn = dial(&ep, edge.tunnel_addr).await?;
    let _control = handshake(&conn, "c-1").await?;
    fake_connector(conn.clone(), "c-1");
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;

    let mut tls = raw_tls(&pki, edge.public_addr, "hr.apps.test").await?;
    tls.write_all(
        b"POST /submit HTTP/1.1\r\nhost: hr.apps.test\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await?;
    let head = read_head(&mut tls).await?;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-portico-error: badrequestbody"),
        "{head}"
    );
    let text = edge.shared.metrics.render();
    assert!(
        text.contains(
            r#"portico_edge_requests_total{app="hr",code="BadRequestBody",status="400"} 1"#
        ),
        "{text}"
    );
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// A TCP connection from `local` (another loopback address, a second client).
async fn connect_from(local: &str, to: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{local}:0").parse()?)?;
    Ok(socket.connect(to).await?)
}

async fn tls_over(
    pki: &Pki,
    tcp: tokio::net::TcpStream,
    alpn: &[u8],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("hr.apps.test")?, tcp)
        .await?)
}

/// Reads until the edge closes the connection (or resets it).
async fn until_closed(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> anyhow::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, io.read(&mut buf)).await? {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A head trickled and never finished, a connection that never sends one,
/// and a keep-alive connection left idle are all closed; metrics say why.
#[tokio::test]
async fn slow_and_silent_connections_are_closed() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.header_read_timeout = Duration::from_millis(500);
        c.keepalive_idle_timeout = Duration::from_millis(800);
        c.h2_idle_timeout = Duration::from_millis(800);
    })
    .await?;
    let addr = edge.public_addr;
    // An HTTP/2 connection with no stream gets a GOAWAY, then closes.
    let mut h2 = tls_over(&pki, tokio::net::TcpStream::connect(addr).await?, b"h2").await?;
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await?;

    let mut trickle = raw_tls(&pki, addr, "hr.apps.test").await?;
    trickle.write_all(b"GET / HTTP/1.1\r\nhost: hr.a").await?;
    let mut silent = raw_tls(&pki, addr, "hr.apps.test").await?;
    let mut idle = raw_tls(&pki, addr, "hr.apps.test").await?;
    idle.write_all(b"GET / HTTP/1.1\r\nhost: nope.apps.test\r\n\r\n")
        .await?;
    let head = read_head(&mut idle).await?;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // A TCP connection that never starts TLS.
    let mut no_tls = tokio::net::TcpStream::connect(addr).await?;

    until_closed(&mut trickle).await?;
    until_closed(&mut silent).await?;
    until_closed(&mut idle).await?;
    until_closed(&mut no_tls).await?;
    until_closed(&mut h2).await?;
    let text = edge.shared.metrics.render();
    assert_eq!(
        counter(
            &text,
            r#"portico_edge_connection_closes_total{reason="header_timeout"}"#
        ),
        2,
        "{text}"
    );
    assert_eq!(
        counter(
            &text,
            r#"portico_edge_connection_closes_total{reason="idle"}"#
        ),
        2,
        "{text}"
    );
    assert!(
        counter(
            &text,
            "portico_edge_tls_handshakes_total{result=\"failed\"}"
        ) >= 1
    );
    wait_until("the connections to be gone", || {
        edge.shared.metrics.connections.get() == 0
    })
    .await?;
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// One client at its cap is refused; another client is served.
#[tokio::test]
async fn a_client_at_its_connection_cap_does_not_lock_others_out() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.max_connections = Some(10);
        c.max_connections_per_client = Some(3);
    })
    .await?;
    let addr = edge.public_addr;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls_over(&pki, connect_from("127.0.0.1", addr).await?, b"http/1.1").await?);
    }
    wait_until("three connections", || {
        edge.shared.metrics.connections.get() == 3
    })
    .await?;
    // The fourth from the same client: TCP is accepted, then dropped.
    let fourth = tls_over(&pki, connect_from("127.0.0.1", addr).await?, b"http/1.1").await;
    assert!(fourth.is_err(), "the fourth connection must be refused");
    // Another client is served.
    let mut other = tls_over(&pki, connect_from("127.0.0.2", addr).await?, b"http/1.1").await?;
    other
        .write_all(b"GET / HTTP/1.1\r\nhost: nope.apps.test\r\n\r\n")
        .await?;
    let head = read_head(&mut other).await?;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let text = edge.shared.metrics.render();
    assert_eq!(
        counter(
            &text,
            r#"portico_edge_connections_refused_total{cap="per_client"}"#
        ),
        1,
        "{text}"
    );
    drop(held);
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// Responses whose clients stopped reading (HTTP/1.1 connections that
/// never read, an HTTP/2 client that grants no stream window) do not block
/// the tunnel's other requests, and are reset after the stall time, their
/// tunnel streams stopped with `Stalled` and the requests recorded so.
#[tokio::test]
async fn clients_that_stop_reading_are_reset_and_stall_nobody() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.stall_timeout = Duration::from_secs(3);
        c.max_stalled_per_client = 16;
    })
    .await?;
    let (_ep, _conn, _control, mut stopped) = attach_reporting_connector(&pki, &edge).await?;
    let addr = edge.public_addr;

    // Four HTTP/1.1 clients ask for 8 MiB and read nothing.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut tls = raw_tls(&pki, addr, "hr.apps.test").await?;
        tls.write_all(b"GET /big HTTP/1.1\r\nhost: hr.apps.test\r\n\r\n")
            .await?;
        readers.push(tls);
    }
    // One HTTP/2 client asks for 8 MiB four times and grants no window.
    let tls = tls_over(&pki, tokio::net::TcpStream::connect(addr).await?, b"h2").await?;
    let (h2, h2conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tls)
        .await?;
    tokio::spawn(h2conn);
    let mut h2 = h2.ready().await?;
    let mut held = Vec::new();
    for _ in 0..4 {
        let req = Request::get("https://hr.apps.test/big").body(())?;
        let (resp, _) = h2.send_request(req, true)?;
        held.push(resp);
        h2 = h2.ready().await?;
    }
    wait_until("eight streams to be in flight", || {
        edge.shared.metrics.streams.get() == 8
    })
    .await?;

    // 200 requests on the same tunnel meanwhile, all answered.
    for i in 0..200 {
        let r = https(
            &pki,
            addr,
            "hr.apps.test",
            i % 2 == 0,
            get("hr.apps.test", &format!("/n{i}"), i % 2 == 0),
        )
        .await?;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
    }

    // Each stalled response is reset, and its stream stopped as stalled.
    for _ in 0..8 {
        let code = tokio::time::timeout(DEADLINE, stopped.recv())
            .await?
            .context("connector reported")?;
        assert_eq!(code.map(CloseCode::from_wire), Some(CloseCode::Stalled));
    }
    wait_until("the stalled streams to be released", || {
        edge.shared.metrics.streams.get() == 0
    })
    .await?;
    let text = edge.shared.metrics.render();
    assert_eq!(
        counter(
            &text,
            r#"portico_edge_stalled_responses_total{reason="timeout"}"#
        ),
        8,
        "{text}"
    );
    assert_eq!(
        counter(
            &text,
            r#"portico_edge_requests_total{app="hr",code="ClientStalled",status="200"}"#
        ),
        8,
        "{text}"
    );
    drop((readers, held));
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// Over its client's stall budget, a newly stalled response is reset at
/// once (after the one-second detection), not after the stall time.
#[tokio::test]
async fn a_client_over_its_stall_budget_is_reset_early() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.stall_timeout = Duration::from_secs(600);
        c.max_stalled_per_client = 2;
    })
    .await?;
    let (_ep, _conn, _control, mut stopped) = attach_reporting_connector(&pki, &edge).await?;
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut tls = raw_tls(&pki, edge.public_addr, "hr.apps.test").await?;
        tls.write_all(b"GET /big HTTP/1.1\r\nhost: hr.apps.test\r\n\r\n")
            .await?;
        readers.push(tls);
    }
    let code = tokio::time::timeout(DEADLINE, stopped.recv())
        .await?
        .context("connector reported")?;
    assert_eq!(code.map(CloseCode::from_wire), Some(CloseCode::Stalled));
    let text = edge.shared.metrics.render();
    assert_eq!(
        counter(
            &text,
            r#"portico_edge_stalled_responses_total{reason="over_budget"}"#
        ),
        1,
        "{text}"
    );
    assert_eq!(
        edge.shared.metrics.streams.get(),
        2,
        "two stay within the budget"
    );
    drop(readers);
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// A quinn client that believes the edge lets it open `bidi` bidirectional
/// streams: its session reports the edge's transport parameters with
/// `initial_max_streams_bidi` replaced. So it opens streams the edge never
/// granted, as a hostile peer would.
struct LyingClient {
    inner: Arc<QuicClientConfig>,
    bidi: u64,
}

impl quinn::crypto::ClientConfig for LyingClient {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &quinn_proto::transport_parameters::TransportParameters,
    ) -> Result<Box<dyn quinn::crypto::Session>, quinn::ConnectError> {
        let inner = Arc::clone(&self.inner).start_session(version, server_name, params)?;
        Ok(Box::new(LyingSession {
            inner,
            bidi: self.bidi,
        }))
    }
}

struct LyingSession {
    inner: Box<dyn quinn::crypto::Session>,
    bidi: u64,
}

impl quinn::crypto::Session for LyingSession {
    fn initial_keys(
        &self,
        dst_cid: &quinn::ConnectionId,
        side: quinn::Side,
    ) -> quinn::crypto::Keys {
        self.inner.initial_keys(dst_cid, side)
    }
    fn handshake_data(&self) -> Option<Box<dyn std::any::Any>> {
        self.inner.handshake_data()
    }
    fn peer_identity(&self) -> Option<Box<dyn std::any::Any>> {
        self.inner.peer_identity()
    }
    fn early_crypto(
        &self,
    ) -> Option<(
        Box<dyn quinn::crypto::HeaderKey>,
        Box<dyn quinn::crypto::PacketKey>,
    )> {
        self.inner.early_crypto()
    }
    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }
    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }
    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, quinn_proto::TransportError> {
        self.inner.read_handshake(buf)
    }
    fn transport_parameters(
        &self,
    ) -> Result<
        Option<quinn_proto::transport_parameters::TransportParameters>,
        quinn_proto::TransportError,
    > {
        use quinn_proto::coding::Codec;
        let Some(real) = self.inner.transport_parameters()? else {
            return Ok(None);
        };
        // Re-encode them, replacing initial_max_streams_bidi (id 0x08).
        let mut wire = Vec::new();
        real.write(&mut wire);
        let mut rest = &wire[..];
        let mut forged = Vec::new();
        while !rest.is_empty() {
            let id = quinn::VarInt::decode(&mut rest).expect("parameter id");
            let len = quinn::VarInt::decode(&mut rest).expect("parameter length");
            let len = usize::try_from(len.into_inner()).expect("small");
            let (value, tail) = rest.split_at(len);
            rest = tail;
            id.encode(&mut forged);
            if id.into_inner() == 0x08 {
                let lie = quinn::VarInt::from_u64(self.bidi).expect("small");
                let mut v = Vec::new();
                lie.encode(&mut v);
                quinn::VarInt::from_u64(v.len() as u64)
                    .expect("small")
                    .encode(&mut forged);
                forged.extend_from_slice(&v);
            } else {
                quinn::VarInt::from_u64(len as u64)
                    .expect("small")
                    .encode(&mut forged);
                forged.extend_from_slice(value);
            }
        }
        let params = quinn_proto::transport_parameters::TransportParameters::read(
            quinn::Side::Client,
            &mut &forged[..],
        )
        .expect("the forged parameters parse");
        Ok(Some(params))
    }
    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<quinn::crypto::Keys> {
        self.inner.write_handshake(buf)
    }
    fn next_1rtt_keys(
        &mut self,
    ) -> Option<quinn::crypto::KeyPair<Box<dyn quinn::crypto::PacketKey>>> {
        self.inner.next_1rtt_keys()
    }
    fn is_valid_retry(
        &self,
        orig_dst_cid: &quinn::ConnectionId,
        header: &[u8],
        payload: &[u8],
    ) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }
    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), quinn::crypto::ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

/// A client endpoint whose connections believe they may open `bidi`
/// streams (see [`LyingClient`]).
fn lying_quic_client(
    trust: &Pki,
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    bidi: u64,
) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(trust.roots())
        .with_client_auth_cert(cert.0, cert.1)?;
    tls.alpn_protocols = vec![portico_proto::ALPN.to_vec()];
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(LyingClient {
        inner: Arc::new(QuicClientConfig::try_from(tls)?),
        bidi,
    })));
    Ok(ep)
}

/// Finding 5 of issue 9: a connector could open 7 streams besides its
/// control stream and fill the tunnel's window with bytes the edge never
/// read. Now QUIC grants it one stream: an honest quinn client cannot open
/// another (nor any unidirectional one), and one that lies about the limit
/// and opens a second stream anyway gets the tunnel closed by quinn
/// (STREAM_LIMIT_ERROR), counted as `stream_limit`, while other tunnels
/// stay up.
#[tokio::test]
async fn a_connector_may_open_only_its_control_stream() -> anyhow::Result<()> {
    use futures::FutureExt as _;
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge(&pki, &shutdown).await?;

    let honest_ep = quic_client(&pki, pki.connector("c-honest")?)?;
    let honest = dial(&honest_ep, edge.tunnel_addr).await?;
    let mut control = handshake(&honest, "c-honest").await?;
    // Opening a stream completes locally at once when the peer granted
    // one; without credit it waits for a MAX_STREAMS that never comes.
    assert!(
        honest.open_bi().now_or_never().is_none(),
        "the edge granted a second bidirectional stream"
    );
    assert!(
        honest.open_uni().now_or_never().is_none(),
        "the edge granted a unidirectional stream"
    );
    control.ping(1).await?;

    let liar_ep = lying_quic_client(&pki, pki.connector("c-liar")?, 8)?;
    let liar = dial(&liar_ep, edge.tunnel_addr).await?;
    let _liar_control = handshake(&liar, "c-liar").await?;
    wait_until("both tunnels to attach", || edge.tunnel_count() == 2).await?;
    let (mut extra, _) = liar
        .open_bi()
        .now_or_never()
        .context("the lying client believes it may open another stream")??;
    extra.write_all(&[0u8; 1024]).await?;
    let closed = tokio::time::timeout(DEADLINE, liar.closed()).await?;
    match &closed {
        quinn::ConnectionError::ConnectionClosed(c) => assert_eq!(
            c.error_code,
            quinn::TransportErrorCode::STREAM_LIMIT_ERROR,
            "{closed}"
        ),
        other => anyhow::bail!("expected the edge to close with STREAM_LIMIT_ERROR, got {other}"),
    }
    let closes = edge.shared.metrics.tunnel_closes.clone();
    wait_until("the close to be counted", || {
        closes.with_label_values(&["stream_limit"]).get() == 1
    })
    .await?;
    assert_eq!(edge.tunnel_count(), 1);
    control.ping(2).await?;

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// Finding 5 again: one connector id could hold any number of tunnels. Now
/// the edge counts them (those still in their handshake too) and refuses
/// one more at `Hello` with a `Goodbye` and a close, both `TooManyTunnels`
/// and naming the cap, counted as `too_many_tunnels`; another connector is
/// not affected, and once a tunnel closes its place is free again.
#[tokio::test]
async fn tunnels_per_connector_are_capped_at_hello() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| c.max_tunnels_per_connector = 2).await?;

    let ep = quic_client(&pki, pki.connector("c-many")?)?;
    let first = dial(&ep, edge.tunnel_addr).await?;
    let _first_control = handshake(&first, "c-many").await?;
    let second = dial(&ep, edge.tunnel_addr).await?;
    let _second_control = handshake(&second, "c-many").await?;

    let third = dial(&ep, edge.tunnel_addr).await?;
    let (mut send, mut recv) = third.open_bi().await?;
    write_frame(&mut send, &hello("c-many", 1)).await?;
    match tokio::time::timeout(DEADLINE, read_frame(&mut recv)).await?? {
        Some(Frame::Goodbye(g)) => {
            assert_eq!(CloseCode::from_wire(g.code), CloseCode::TooManyTunnels);
            assert!(
                g.reason.contains("c-many") && g.reason.contains("2 tunnels"),
                "{}",
                g.reason
            );
            assert!(
                g.reason.contains("max_tunnels_per_connector"),
                "{}",
                g.reason
            );
        }
        other => anyhow::bail!("expected Goodbye(TooManyTunnels), got {other:?}"),
    }
    let (code, reason) = close_code(&third).await?;
    assert_eq!(code, CloseCode::TooManyTunnels, "{reason}");
    let closes = edge.shared.metrics.tunnel_closes.clone();
    wait_until("the refusal to be counted", || {
        closes.with_label_values(&["too_many_tunnels"]).get() == 1
    })
    .await?;
    assert_eq!(edge.tunnel_count(), 2);

    let other_ep = quic_client(&pki, pki.connector("c-other")?)?;
    let other = dial(&other_ep, edge.tunnel_addr).await?;
    let _other_control = handshake(&other, "c-other").await?;
    wait_until("the other connector's tunnel", || edge.tunnel_count() == 3).await?;

    first.close(0u32.into(), b"done");
    wait_until("the first tunnel to go", || edge.tunnel_count() == 2).await?;
    let again = dial(&ep, edge.tunnel_addr).await?;
    let _again_control = handshake(&again, "c-many").await?;
    wait_until("the replacement to attach", || edge.tunnel_count() == 3).await?;

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

/// Finding 7 of issue 9, in process: connector A goes silent (its path is
/// cut, as when it is killed). The edge pings it, finds it suspect (out of
/// the pick set) and, after the dead time, closes the tunnel itself,
/// without waiting for QUIC's 10 s idle timeout. What was in flight on it
/// then fails at once and follows the retry rules: a GET is replayed once
/// on connector B; a POST that A acknowledged is not replayed (502); a POST
/// sent after the cut, which A never acknowledged, is retried on B and
/// succeeds. The order of events is fixed by signals, not sleeps: A is the
/// only tunnel until the three requests are in flight, its Pong proves the
/// edge heard from it after the acknowledged POST's head, and B attaches
/// before A is judged dead (the dead time is seconds; B's handshake on
/// loopback is milliseconds).
#[tokio::test]
async fn a_silent_tunnel_is_suspect_then_closed_and_its_requests_follow_the_retry_rules(
) -> anyhow::Result<()> {
    use portico_loadtest::wan;
    let logs = LogCapture::global();
    let pki = Arc::new(Pki::new("test CA")?);
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.tunnel_dead_after = Duration::from_secs(2)
    })
    .await?;
    let addr = edge.public_addr;
    let m = Arc::clone(&edge.shared.metrics);

    // A reaches the edge through a relay that can cut the path.
    let path = wan::start(
        wan::PathConfig::new("127.0.0.1:0".parse()?, edge.tunnel_addr),
        shutdown.child_token(),
    )
    .await?;
    let ep_a = quic_client(&pki, pki.connector("c-a")?)?;
    let a = dial(&ep_a, path.local_addr()).await?;
    let mut a_control = handshake(&a, "c-a").await?;
    fake_connector_with(a.clone(), "c-a", Arc::new(tokio::sync::Notify::new()));
    wait_until("A to attach", || edge.tunnel_count() == 1).await?;
    wait_until("A to answer a ping", || {
        m.tunnel_rtt.get_sample_count() >= 1
    })
    .await?;

    let request = |method: http::Method, path: &'static str, body: &'static str| {
        let pki = Arc::clone(&pki);
        tokio::spawn(async move {
            let req = Request::builder()
                .method(method)
                .uri(format!("https://hr.apps.test{path}"))
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            https(&pki, addr, "hr.apps.test", true, req).await
        })
    };
    // In flight on A (the only tunnel), held by its backend.
    let get = request(http::Method::GET, "/held", "");
    wait_until("the GET to be in flight", || m.streams.get() == 1).await?;
    let acked_post = request(http::Method::POST, "/held", "acked");
    wait_until("the POST to be in flight", || m.streams.get() == 2).await?;
    // A Ping from A after it took the POST's head: the edge has heard
    // from A since it wrote that head.
    a_control.ping(7).await?;

    path.blackhole(true);
    let late_post = request(http::Method::POST, "/late", "late");
    wait_until("the late POST to be in flight", || m.streams.get() == 3).await?;

    let ep_b = quic_client(&pki, pki.connector("c-b")?)?;
    let b = dial(&ep_b, edge.tunnel_addr).await?;
    let _b_control = handshake(&b, "c-b").await?;
    let release_b = Arc::new(tokio::sync::Notify::new());
    release_b.notify_one(); // B answers the replayed GET /held at once
    fake_connector_with(b.clone(), "c-b", release_b);
    wait_until("B to attach", || edge.tunnel_count() == 2).await?;

    wait_until("A to be suspect", || {
        m.health_changes.with_label_values(&["suspect"]).get() >= 1
    })
    .await?;
    // While A is suspect (or already gone), requests go to B.
    for _ in 0..10 {
        let r = https(&pki, addr, "hr.apps.test", true, get_req("/")).await?;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-served-by"], "c-b");
    }

    let r = tokio::time::timeout(DEADLINE, get).await???;
    assert_eq!(r.status(), StatusCode::OK, "the GET is replayed on B");
    assert!(r.body().starts_with(b"c-b|hr|GET|"), "{:?}", r.body());
    let r = tokio::time::timeout(DEADLINE, late_post).await???;
    assert_eq!(r.status(), StatusCode::OK, "the late POST is retried on B");
    assert_eq!(&r.body()[..], b"c-b|hr|POST|hr.apps.test|/late|late");
    let r = tokio::time::timeout(DEADLINE, acked_post).await???;
    assert_eq!(
        r.status(),
        StatusCode::BAD_GATEWAY,
        "A may have run it: not replayed"
    );
    assert_eq!(r.headers()["x-portico-error"], "ConnectorNotFound");

    assert_eq!(
        m.tunnel_closes.with_label_values(&["unresponsive"]).get(),
        1
    );
    assert_eq!(m.health_changes.with_label_values(&["dead"]).get(), 1);
    assert_eq!(m.retries.with_label_values(&["not_delivered"]).get(), 1);
    assert_eq!(m.retries.with_label_values(&["idempotent"]).get(), 1);
    assert_eq!(
        m.tunnels_suspect.get(),
        0,
        "the closed tunnel is not counted"
    );
    assert_eq!(edge.tunnel_count(), 1);
    let late = logs.access_lines("/late");
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["attempts"], 2);
    assert_eq!(late[0]["replayed"], true);
    assert_eq!(late[0]["connector"], "c-b");
    let held = logs.access_lines("/held");
    let post = held
        .iter()
        .find(|l| l["method"] == "POST")
        .expect("POST logged");
    assert_eq!(post["attempts"], 1);
    assert_eq!(post["status"], 502);
    assert!(a_control.pings() >= 1, "the edge pinged A");

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

fn get_req(path: &str) -> Request<Full<Bytes>> {
    get("hr.apps.test", path, true)
}

/// Two shards (two single-thread runtimes): the tunnel port is one
/// `SO_REUSEPORT` group, and 16 tunnels that ask for shard `i % 2` land on
/// both shards. Every request is served over HTTP/1.1
/// and HTTP/2 whichever shard accepted its connection, by a tunnel of that
/// same shard while it holds one; a shard without a usable tunnel of its
/// own takes another shard's. The drain closes both shards' endpoints,
/// `wait` joins the shard thread, and both ports can be bound again.
#[tokio::test]
async fn two_shards_share_the_ports_and_keep_requests_on_their_own_thread() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.shards = std::num::NonZeroUsize::new(2).expect("2 is not 0");
    })
    .await?;
    let (public, tunnel_addr) = (edge.public_addr, edge.tunnel_addr);

    let mut controls = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..16 {
        let name: &'static str = Box::leak(format!("c-{i}").into_boxed_str());
        let (ep, conn) = dial_shard(&pki, name, tunnel_addr, i).await?;
        controls.push((name, handshake(&conn, name).await?));
        fake_connector(conn, name);
        endpoints.push(ep);
    }
    wait_until("16 tunnels to attach", || edge.tunnel_count() == 16).await?;
    let shard_of = |name: &str| {
        edge.shared
            .tunnels
            .snapshot()
            .iter()
            .find(|t| t.connector.as_str() == name)
            .map(|t| t.shard)
    };
    let on: std::collections::BTreeSet<usize> = edge
        .shared
        .tunnels
        .snapshot()
        .iter()
        .map(|t| t.shard)
        .collect();
    assert_eq!(on, [0, 1].into(), "tunnels on both shards");

    // Both shards hold tunnels: no request leaves its shard.
    for i in 0..40 {
        let h2 = i % 2 == 0;
        let r = https(
            &pki,
            public,
            "hr.apps.test",
            h2,
            get("hr.apps.test", "/", h2),
        )
        .await?;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let text = edge.shared.metrics.render();
    assert_eq!(
        counter(&text, r#"portico_edge_tunnel_picks_total{shard="own"}"#),
        40,
        "{text}"
    );
    assert_eq!(
        counter(&text, r#"portico_edge_tunnel_picks_total{shard="other"}"#),
        0
    );

    // Each shard picks its own tunnels, as the request path does.
    let group = GroupId::default_group();
    for shard in [0, 1] {
        let t = crate::shard::as_shard(shard, || edge.shared.tunnels.pick(&group, |_| true));
        assert_eq!(t.map(|t| t.shard), Some(shard));
    }
    // Shard 1's connectors drain: shard 1 falls back to shard 0's tunnels,
    // and requests still succeed wherever they land.
    for (name, control) in &controls {
        if shard_of(name) == Some(1) {
            control.send(&Frame::Drain).await?;
        }
    }
    wait_until("shard 1's tunnels to drain", || {
        edge.shared
            .tunnels
            .snapshot()
            .iter()
            .all(|t| t.shard == 0 || t.is_draining())
    })
    .await?;
    let t = crate::shard::as_shard(1, || edge.shared.tunnels.pick(&group, |_| true));
    assert_eq!(t.map(|t| t.shard), Some(0));
    for i in 0..20 {
        let h2 = i % 2 == 0;
        let r = https(
            &pki,
            public,
            "hr.apps.test",
            h2,
            get("hr.apps.test", "/", h2),
        )
        .await?;
        assert_eq!(r.status(), StatusCode::OK);
        let by = r.headers()["x-served-by"].to_str()?.to_owned();
        assert_eq!(shard_of(&by), Some(0), "served by {by}");
    }

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    // Nothing of the edge is left on either port.
    std::net::UdpSocket::bind(tunnel_addr)?;
    std::net::TcpListener::bind(public)?;
    Ok(())
}

/// A sharded edge's tunnel lands on the shard its connector asked for by
/// the first byte of its Initial's connection ID, and stays there when the
/// connector's address changes (as behind a NAT that rebinds): the
/// tunnel port's steering program follows the connection ID, not the
/// address, so the moved tunnel's datagrams still reach the shard that
/// holds the connection, and its pings keep being answered. (With the
/// kernel's hash of the address, each move would go to a shard that knows
/// nothing of the connection half the time, which answers with a stateless
/// reset.)
#[tokio::test]
async fn a_sharded_edge_keeps_a_tunnel_on_the_shard_it_asked_for_when_the_connector_moves(
) -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let edge = test_edge_with(&pki, &shutdown, |c| {
        c.shards = std::num::NonZeroUsize::new(2).expect("2 is not 0");
    })
    .await?;
    let tunnel_addr = edge.tunnel_addr;
    let mut tunnels = Vec::new();
    for first in 0u8..8 {
        let name: &'static str = Box::leak(format!("c-{first}").into_boxed_str());
        let (ep, conn) = dial_shard(&pki, name, tunnel_addr, first).await?;
        let control = handshake(&conn, name).await?;
        fake_connector(conn.clone(), name);
        tunnels.push((name, first, ep, conn, control));
    }
    wait_until("8 tunnels to attach", || edge.tunnel_count() == 8).await?;
    let at_edge = |name: &str| {
        edge.shared
            .tunnels
            .snapshot()
            .iter()
            .find(|t| t.connector.as_str() == name)
            .map(|t| (t.shard, t.conn.remote_address()))
    };
    for (name, first, ..) in &tunnels {
        assert_eq!(
            at_edge(name).map(|(shard, _)| shard),
            Some(usize::from(*first) % 2),
            "{name}"
        );
    }

    let mut v = 0;
    for round in 0..3 {
        for (name, first, ep, conn, control) in &mut tunnels {
            ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
            let moved_to = ep.local_addr()?;
            v += 1;
            control
                .ping(v)
                .await
                .map_err(|e| anyhow::anyhow!("{name} after move {round}: {e:#}"))?;
            assert!(conn.close_reason().is_none(), "{name} after move {round}");
            wait_until("the edge to see the new address", || {
                at_edge(name).is_some_and(|(_, remote)| remote.port() == moved_to.port())
            })
            .await?;
            assert_eq!(
                at_edge(name).map(|(shard, _)| shard),
                Some(usize::from(*first) % 2)
            );
        }
    }
    assert_eq!(edge.tunnel_count(), 8);
    let text = edge.shared.metrics.render();
    for reason in ["lost", "transport_error", "unresponsive", "protocol_error"] {
        assert_eq!(
            counter(
                &text,
                &format!(r#"portico_edge_tunnel_closes_total{{reason="{reason}"}}"#)
            ),
            0,
            "{text}"
        );
    }

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, edge.wait()).await??;
    Ok(())
}

// ---- the edge mesh ----

/// An edge `id` of `region` that takes mesh links, with the test config.
async fn mesh_edge(
    pki: &Pki,
    shutdown: &CancellationToken,
    id: &str,
    region: &str,
) -> anyhow::Result<Handle> {
    mesh_edge_with(pki, shutdown, id, region, |_| {}).await
}

/// As [`mesh_edge`], with a config `tune`d.
async fn mesh_edge_with(
    pki: &Pki,
    shutdown: &CancellationToken,
    id: &str,
    region: &str,
    tune: impl FnOnce(&mut crate::Config),
) -> anyhow::Result<Handle> {
    let mut config = crate::Config::new("https://unused", "/unused");
    config.drain_delay = Duration::ZERO;
    tune(&mut config);
    config.http3 = false;
    config.mesh_listen = Some("127.0.0.1:0".parse()?);
    edge_as(
        pki,
        shutdown,
        EdgeId::new(id)?,
        RegionId::new(region)?,
        config,
    )
    .await
}

/// Tells `edge` that the default group's tunnels sit on `holders`, which
/// take mesh links at their mesh addresses.
fn point_at(edge: &Handle, version: u64, holders: &[&Handle]) {
    let mut config = edge_config(version, Vec::new());
    config.presence = vec![portico_proto::api::GroupPresence {
        group: GroupId::default_group(),
        edges: holders.iter().map(|h| h.id.clone()).collect(),
    }];
    config.peers = holders
        .iter()
        .map(|h| portico_proto::api::PeerEdge {
            id: h.id.clone(),
            region: h.region.clone(),
            mesh_addr: h.mesh_addr.map(|a| a.to_string()),
            healthy: true,
            draining: false,
            tunnels: 1,
        })
        .collect();
    edge.shared.apply_config(config);
}

/// Attaches a fake connector `name` to `edge` (its tunnel certificate
/// trusted as the edge's, whatever the edge's id).
async fn attach(
    pki: &Pki,
    edge: &Handle,
    name: &'static str,
) -> anyhow::Result<(
    quinn::Endpoint,
    quinn::Connection,
    Control,
    tokio::sync::mpsc::UnboundedReceiver<Option<u64>>,
)> {
    let ep = quic_client(pki, pki.connector(name)?)?;
    let conn = ep
        .connect(edge.tunnel_addr, &edge_server_name(&edge.id))?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &hello(name, 1)).await?;
    let Some(Frame::Welcome(_)) = tokio::time::timeout(DEADLINE, read_frame(&mut recv)).await??
    else {
        anyhow::bail!("no Welcome");
    };
    let (tx, stopped) = tokio::sync::mpsc::unbounded_channel();
    fake_connector_full(conn.clone(), name, Arc::new(tokio::sync::Notify::new()), tx);
    wait_until("the tunnel to attach", || edge.tunnel_count() == 1).await?;
    Ok((ep, conn, Control::start(send, recv), stopped))
}

#[tokio::test]
async fn a_request_for_a_group_with_no_tunnel_here_crosses_the_mesh_once() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let a = mesh_edge(&pki, &shutdown, "e-a", "eu-west").await?;
    let b = mesh_edge(&pki, &shutdown, "e-b", "us-east").await?;
    let _c1 = attach(&pki, &a, "c-1").await?;

    // Without presence, b has nowhere to send it.
    let r = https(
        &pki,
        b.public_addr,
        "hr.apps.test",
        true,
        get("hr.apps.test", "/x", true),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);

    point_at(&b, 2, &[&a]);
    for h2 in [true, false] {
        let r = https(
            &pki,
            b.public_addr,
            "hr.apps.test",
            h2,
            get("hr.apps.test", "/hello", h2),
        )
        .await?;
        assert_eq!(r.status(), StatusCode::OK, "{:?}", r.body());
        assert_eq!(r.body().as_ref(), b"c-1|hr|GET|hr.apps.test|/hello|");
        assert_eq!(r.headers()["portico-route"], "e-b, e-a");
    }
    // A body goes up the mesh and the tunnel.
    let post = Request::post("https://hr.apps.test/echo")
        .body(Full::new(Bytes::from_static(b"over two hops")))?;
    let r = https(&pki, b.public_addr, "hr.apps.test", true, post).await?;
    assert_eq!(
        r.body().as_ref(),
        b"c-1|hr|POST|hr.apps.test|/echo|over two hops"
    );
    // Served on a itself: one edge on the route.
    let r = https(
        &pki,
        a.public_addr,
        "hr.apps.test",
        true,
        get("hr.apps.test", "/", true),
    )
    .await?;
    assert_eq!(r.headers()["portico-route"], "e-a");

    let am = a.shared.metrics.render();
    assert_eq!(
        counter(&am, "portico_edge_mesh_served_total{result=\"200\"}"),
        3,
        "{am}"
    );
    let bm = b.shared.metrics.render();
    assert_eq!(counter(&bm, "portico_edge_mesh_forwarded_total"), 3, "{bm}");
    // One link carried all three.
    assert_eq!(counter(&bm, "portico_edge_mesh_links"), 1, "{bm}");
    // A live link does not keep the edges from stopping.
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, b.wait()).await??;
    tokio::time::timeout(DEADLINE, a.wait()).await??;
    Ok(())
}

#[tokio::test]
async fn a_forwarded_request_is_never_forwarded_again() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    // b believes a holds the group; a believes c does; only c has a tunnel.
    // If a forwarded what it got from b, the request would reach c.
    let a = mesh_edge(&pki, &shutdown, "e-a", "eu-west").await?;
    let b = mesh_edge(&pki, &shutdown, "e-b", "us-east").await?;
    let c = mesh_edge(&pki, &shutdown, "e-c", "eu-west").await?;
    let _c1 = attach(&pki, &c, "c-1").await?;
    point_at(&b, 2, &[&a]);
    point_at(&a, 2, &[&c]);

    let r = https(
        &pki,
        b.public_addr,
        "hr.apps.test",
        true,
        get("hr.apps.test", "/x", true),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body = String::from_utf8_lossy(r.body());
    assert!(body.contains("MeshUnreachable"), "{body}");
    let am = a.shared.metrics.render();
    assert_eq!(
        counter(
            &am,
            "portico_edge_mesh_served_total{result=\"MeshUnreachable\"}"
        ),
        1,
        "{am}"
    );
    assert_eq!(counter(&am, "portico_edge_mesh_forwarded_total"), 0, "{am}");
    let cm = c.shared.metrics.render();
    assert_eq!(
        counter(&cm, "portico_edge_mesh_served_total{result=\"200\"}"),
        0,
        "{cm}"
    );
    // a itself, reached by a user, does forward to c.
    let r = https(
        &pki,
        a.public_addr,
        "hr.apps.test",
        true,
        get("hr.apps.test", "/y", true),
    )
    .await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["portico-route"], "e-a, e-c");
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_dial_override_moves_the_mesh_link_but_still_pins_the_peer() -> anyhow::Result<()> {
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let a = mesh_edge(&pki, &shutdown, "e-a", "eu-west").await?;
    let c = mesh_edge(&pki, &shutdown, "e-c", "eu-west").await?;
    let overrides = crate::MeshDialOverrides::default();
    let b = mesh_edge_with(&pki, &shutdown, "e-b", "us-east", |cfg| {
        cfg.mesh_dial_overrides = overrides.clone();
    })
    .await?;
    let _c1 = attach(&pki, &a, "c-1").await?;
    let (a_mesh, c_mesh) = (
        a.mesh_addr.context("a's mesh")?,
        c.mesh_addr.context("c's mesh")?,
    );
    // b is told that a holds the group and takes mesh links at c's port:
    // a wrong address, which only an override can correct.
    point_at(&b, 2, &[&a]);
    let mut config = b.shared.table.load().config.clone();
    config.version = 3;
    config.peers[0].mesh_addr = Some(c_mesh.to_string());
    b.shared.apply_config(config);
    let fetch = |path: &'static str| {
        https(
            &pki,
            b.public_addr,
            "hr.apps.test",
            true,
            get("hr.apps.test", path, true),
        )
    };

    // Overridden to c's port: c's certificate is not a's, so the dial
    // fails in the handshake; nothing reaches c.
    overrides.set(a.id.clone(), c_mesh);
    let r = fetch("/wrong").await?;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{:?}", r.body());
    let cm = c.shared.metrics.render();
    assert_eq!(
        counter(&cm, "portico_edge_mesh_served_total{result=\"200\"}"),
        0,
        "{cm}"
    );

    // Overridden to a's real port: the next dial goes there.
    overrides.set(a.id.clone(), a_mesh);
    let r = fetch("/right").await?;
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.body());
    assert_eq!(r.body().as_ref(), b"c-1|hr|GET|hr.apps.test|/right|");
    assert_eq!(r.headers()["portico-route"], "e-b, e-a");
    let bm = b.shared.metrics.render();
    assert_eq!(counter(&bm, "portico_edge_mesh_links"), 1, "{bm}");
    shutdown.cancel();
    Ok(())
}

/// A QUIC client for `edge`'s mesh port presenting `cert`.
fn mesh_client(
    pki: &Pki,
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(pki.roots())
        .with_client_auth_cert(cert.0, cert.1)?;
    tls.alpn_protocols = vec![portico_proto::MESH_ALPN.to_vec()];
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )));
    Ok(ep)
}

fn forwarded(app: &str, hops: Option<u8>, origin: Option<&str>) -> Frame {
    Frame::StreamHead(portico_proto::StreamHead {
        kind: StreamKind::Http,
        request_id: portico_proto::RequestId(7),
        app: AppId::new(app).unwrap(),
        method: http::Method::GET,
        authority: Bytes::from_static(b"hr.apps.test"),
        path: Bytes::from_static(b"/"),
        headers: http::HeaderMap::new(),
        client_addr: "192.0.2.1:1".parse().unwrap(),
        identity: None,
        timeout_ms: 5_000,
        ext: portico_proto::HeadExtensions {
            hop_count: hops,
            origin_edge: origin.map(|o| EdgeId::new(o).unwrap()),
            ..Default::default()
        },
    })
}

#[tokio::test]
async fn the_mesh_port_takes_edges_only_and_refuses_bad_heads_with_their_code() -> anyhow::Result<()>
{
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let a = mesh_edge(&pki, &shutdown, "e-a", "eu-west").await?;
    let mesh = a.mesh_addr.context("mesh listener")?;
    let _c1 = attach(&pki, &a, "c-1").await?;

    // A connector's certificate on the mesh port: refused in TLS.
    let ep = mesh_client(&pki, pki.connector("c-2")?)?;
    let refused = async {
        ep.connect(mesh, &edge_server_name(&a.id))?
            .await?
            .accept_uni()
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from)
    };
    assert!(tokio::time::timeout(DEADLINE, refused).await?.is_err());
    // An edge's certificate on the tunnel port: refused in TLS too.
    let ep = quic_client(
        &pki,
        pki.edge(&EdgeId::new("e-x")?, &RegionId::new("eu-west")?)?,
    )?;
    let refused = async {
        ep.connect(a.tunnel_addr, &edge_server_name(&a.id))?
            .await?
            .accept_uni()
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from)
    };
    assert!(tokio::time::timeout(DEADLINE, refused).await?.is_err());
    wait_until("the refusal to count", || {
        a.shared.metrics.mesh_refused.get() >= 1
    })
    .await?;

    // An edge: MeshHello, Welcome, then heads.
    let ep = mesh_client(
        &pki,
        pki.edge(&EdgeId::new("e-x")?, &RegionId::new("us-east")?)?,
    )?;
    let conn = ep.connect(mesh, &edge_server_name(&a.id))?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Frame::MeshHello(portico_proto::MeshHello {
        version: 1,
        capabilities: portico_proto::capabilities::ALL,
        edge_id: EdgeId::new("e-x")?,
        region: RegionId::new("us-east")?,
        agent_version: "test".into(),
    });
    write_frame(&mut send, &hello).await?;
    let Some(Frame::Welcome(w)) = tokio::time::timeout(DEADLINE, read_frame(&mut recv)).await??
    else {
        anyhow::bail!("no Welcome");
    };
    assert_eq!(w.edge_id, a.id);
    // Answers the edge's pings, as an edge does.
    let _control = Control::start(send, recv);
    for (head, want) in [
        (
            forwarded("hr", Some(2), Some("e-x")),
            ErrorCode::MeshUnreachable,
        ),
        (
            forwarded("hr", None, Some("e-x")),
            ErrorCode::MeshUnreachable,
        ),
        (
            forwarded("hr", Some(1), Some("e-other")),
            ErrorCode::MeshUnreachable,
        ),
        (
            forwarded("nope", Some(1), Some("e-x")),
            ErrorCode::AppNotFound,
        ),
    ] {
        let (mut s, mut r) = conn.open_bi().await?;
        write_frame(&mut s, &head).await?;
        let _ = s.finish();
        match tokio::time::timeout(DEADLINE, read_frame(&mut r)).await?? {
            Some(Frame::Error(e)) => assert_eq!(e.code, want, "{}", e.message),
            other => anyhow::bail!("expected an Error, got {other:?}"),
        }
    }
    // Nothing of those reached the connector; a good head does.
    assert_eq!(a.shared.metrics.streams.get(), 0);
    let (mut s, mut r) = conn.open_bi().await?;
    write_frame(&mut s, &forwarded("hr", Some(1), Some("e-x"))).await?;
    let _ = s.finish();
    let Some(Frame::ResponseHead(h)) = tokio::time::timeout(DEADLINE, read_frame(&mut r)).await??
    else {
        anyhow::bail!("no response head");
    };
    assert_eq!(h.status, StatusCode::OK);
    let body = tokio::time::timeout(DEADLINE, r.read_to_end(1 << 16)).await??;
    assert_eq!(body, b"c-1|hr|GET|hr.apps.test|/|");
    shutdown.cancel();
    Ok(())
}

/// Users who stop reading responses that cross the mesh stall nobody
/// else's: 200 requests over the same link meanwhile are all answered, the
/// forwarding edge resets the stalled streams as it does a tunnel's, and
/// the tunnel edge passes the `Stalled` stop on to the connector.
#[tokio::test]
async fn clients_that_stop_reading_across_the_mesh_stall_nobody() -> anyhow::Result<()> {
    const STALLED: u32 = 8;
    let pki = Pki::new("test CA")?;
    let shutdown = CancellationToken::new();
    let a = mesh_edge(&pki, &shutdown, "e-a", "eu-west").await?;
    let b = mesh_edge_with(&pki, &shutdown, "e-b", "us-east", |c| {
        c.stall_timeout = Duration::from_secs(3);
        c.max_stalled_per_client = 16;
    })
    .await?;
    let (_ep, _conn, _control, mut stopped) = attach(&pki, &a, "c-1").await?;
    point_at(&b, 2, &[&a]);

    // Eight clients of b ask for 8 MiB each and read nothing, all over one
    // mesh link.
    let mut readers = Vec::new();
    for _ in 0..STALLED {
        let mut tls = raw_tls(&pki, b.public_addr, "hr.apps.test").await?;
        tls.write_all(b"GET /big HTTP/1.1\r\nhost: hr.apps.test\r\n\r\n")
            .await?;
        readers.push(tls);
    }
    wait_until("eight streams through the mesh", || {
        b.shared.metrics.streams.get() == i64::from(STALLED)
    })
    .await?;
    for i in 0..200 {
        let h2 = i % 2 == 0;
        let r = https(
            &pki,
            b.public_addr,
            "hr.apps.test",
            h2,
            get("hr.apps.test", &format!("/n{i}"), h2),
        )
        .await?;
        assert_eq!(r.status(), StatusCode::OK, "request {i}: {:?}", r.body());
        assert_eq!(r.headers()["portico-route"], "e-b, e-a");
    }
    // Each stalled response is reset at b, and the stop reaches the
    // connector through a as Stalled.
    for _ in 0..STALLED {
        let code = tokio::time::timeout(DEADLINE, stopped.recv())
            .await?
            .context("connector reported")?;
        assert_eq!(code.map(CloseCode::from_wire), Some(CloseCode::Stalled));
    }
    let text = b.shared.metrics.render();
    assert_eq!(
        counter(
            &text,
            r#"portico_edge_stalled_responses_total{reason="timeout"}"#
        ),
        8,
        "{text}"
    );
    drop(readers);
    shutdown.cancel();
    Ok(())
}
