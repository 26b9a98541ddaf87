//! Stream handler and origin proxy tests over a real in-process QUIC
//! connection and real hyper backends on 127.0.0.1 (no router, no edge).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portico_proto::api::{App, BackendTimeout};
use portico_proto::io::{read_frame, write_frame};
use portico_proto::{
    AppId, CloseCode, ErrorCode, Frame, GroupId, RequestId, StreamHead, StreamKind,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::origin::{BackendLimits, Origin};
use crate::stream::{serve_stream, StreamCtx};

const DEADLINE: Duration = Duration::from_secs(60);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn app(id: &str, internal_url: String, validate: bool) -> App {
    App {
        id: AppId::new(id).unwrap(),
        external_host: format!("{id}.apps.example.com"),
        external_url: format!("https://{id}.apps.example.com/"),
        internal_url,
        connector_group: GroupId::default_group(),
        backend_timeout: BackendTimeout::Default,
        validate_backend_tls: validate,
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

fn ctx(apps: Vec<App>) -> Arc<StreamCtx> {
    ctx_with(
        apps,
        &[],
        BackendLimits::new(None, Duration::from_secs(5), 1024),
    )
    .unwrap()
}

fn ctx_with(
    apps: Vec<App>,
    backend_ca: &[std::path::PathBuf],
    limits: BackendLimits,
) -> anyhow::Result<Arc<StreamCtx>> {
    ctx_sharded(apps, backend_ca, limits, 1)
}

fn ctx_sharded(
    apps: Vec<App>,
    backend_ca: &[std::path::PathBuf],
    limits: BackendLimits,
    shards: usize,
) -> anyhow::Result<Arc<StreamCtx>> {
    let metrics = Metrics::new()?;
    let ctx = Arc::new(StreamCtx {
        apps: ArcSwap::from_pointee(Default::default()),
        group: GroupId::default_group(),
        origin: Origin::new(backend_ca, limits, metrics.clone(), shards)?,
        shard_streams: crate::stream::shard_streams(&metrics, shards),
        metrics,
    });
    ctx.set_apps(&apps, &[], &[]);
    Ok(ctx)
}

fn self_signed(names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    (ck.cert.der().clone(), key)
}

/// A QUIC connection: the returned `Connection` plays the edge (it opens
/// streams); the other end runs the connector's stream handler for every
/// stream, as a tunnel does.
async fn tunnel(
    ctx: Arc<StreamCtx>,
) -> anyhow::Result<(quinn::Endpoint, quinn::Endpoint, quinn::Connection)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = self_signed(&["edge.test"]);
    let mut stls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    stls.alpn_protocols = vec![portico_proto::ALPN.to_vec()];
    let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(stls)?));
    let edge = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse()?)?;
    let edge_addr = edge.local_addr()?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut ctls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    ctls.alpn_protocols = vec![portico_proto::ALPN.to_vec()];
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(ctls)?));
    client_cfg.transport_config(Arc::new(crate::tunnel::transport_config(1024)));
    let mut connector = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    connector.set_default_client_config(client_cfg);

    let connecting = connector.connect(edge_addr, "edge.test")?;
    let accept = async { anyhow::Ok(edge.accept().await.context("no incoming")?.await?) };
    let (edge_conn, conn) = tokio::join!(accept, connecting);
    let (edge_conn, conn) = (edge_conn?, conn?);
    tokio::spawn(async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(serve_stream(ctx.clone(), send, recv));
        }
    });
    Ok((edge, connector, edge_conn))
}

fn head(app: &str, method: Method, path: &str, headers: HeaderMap) -> StreamHead {
    StreamHead {
        kind: StreamKind::Http,
        request_id: RequestId(0x1234_5678_9abc),
        app: AppId::new(app).unwrap(),
        method,
        authority: format!("{app}.apps.example.com").into(),
        path: path.to_owned().into(),
        headers,
        client_addr: "198.51.100.7:55000".parse().unwrap(),
        identity: None,
        timeout_ms: 30_000,
        ext: Default::default(),
    }
}

/// Sends one request the way an edge does; returns the answer frame and
/// the body bytes.
async fn exchange(
    conn: &quinn::Connection,
    head: StreamHead,
    body: &[u8],
) -> anyhow::Result<(Frame, Vec<u8>)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Frame::StreamHead(head)).await?;
    let writer = async {
        for chunk in body.chunks(256 * 1024) {
            send.write_all(chunk).await?;
        }
        send.finish()?;
        anyhow::Ok(send)
    };
    let reader = async {
        let frame = read_frame(&mut recv).await?.context("no answer frame")?;
        let rest = recv.read_to_end(64 << 20).await?;
        anyhow::Ok((frame, rest))
    };
    let (sent, answer) = tokio::join!(writer, reader);
    let _send = sent?;
    answer
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

type RespBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// The test backend: `/big` (5 MiB), `/echo` (streams the body back),
/// `/hang` (never answers), `/ws` (101 + byte echo); every answer reports
/// what the backend saw in `x-seen-*` headers.
async fn backend_handler(req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let mut seen = HeaderMap::new();
    let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
    seen.insert(
        "x-seen-names",
        HeaderValue::from_str(&names.join(",")).unwrap(),
    );
    seen.insert(
        "x-seen-uri",
        HeaderValue::from_str(&req.uri().to_string()).unwrap(),
    );
    seen.insert(
        "x-seen-method",
        HeaderValue::from_str(req.method().as_str()).unwrap(),
    );
    for h in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "content-length",
    ] {
        if let Some(v) = req.headers().get(h) {
            seen.insert(
                http::HeaderName::from_bytes(format!("x-seen-{h}").as_bytes()).unwrap(),
                v.clone(),
            );
        }
    }
    let path = req.uri().path().to_owned();
    let mut resp = match path.as_str() {
        p if p.ends_with("/big") => Response::new(full(pattern(5 << 20))),
        p if p.ends_with("/echo") => Response::new(req.into_body().boxed()),
        p if p.ends_with("/hang") => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        p if p.ends_with("/ws") => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("upgrade", HeaderValue::from_static("websocket"));
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("Upgrade"));
            r.headers_mut().insert(
                "sec-websocket-accept",
                HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            );
            tokio::spawn(async move {
                if let Ok(upgraded) = hyper::upgrade::on(req).await {
                    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                }
            });
            r
        }
        _ => Response::new(full("hello from the backend")),
    };
    resp.headers_mut().extend(seen);
    resp.headers_mut()
        .insert("connection", HeaderValue::from_static("x-backend-hop"));
    resp.headers_mut()
        .insert("x-backend-hop", HeaderValue::from_static("1"));
    resp.headers_mut()
        .insert("keep-alive", HeaderValue::from_static("timeout=5"));
    if path.ends_with("/ws") {
        resp.headers_mut()
            .insert("connection", HeaderValue::from_static("Upgrade"));
    }
    Ok(resp)
}

/// Serves `backend_handler` over plain HTTP/1.1.
async fn http_backend() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(backend_handler))
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Serves `backend_handler` over TLS with a self-signed certificate.
async fn https_backend() -> anyhow::Result<SocketAddr> {
    let (cert, key) = self_signed(&["localhost", "127.0.0.1"]);
    https_backend_with(vec![cert], key).await
}

/// Serves `backend_handler` over TLS with the given certificate chain.
async fn https_backend_with(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<SocketAddr> {
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service_fn(backend_handler))
                    .await;
            });
        }
    });
    Ok(addr)
}

fn expect_head(frame: Frame) -> anyhow::Result<portico_proto::ResponseHead> {
    match frame {
        Frame::ResponseHead(h) => Ok(h),
        other => bail!("expected a ResponseHead, got {other:?}"),
    }
}

fn expect_error(frame: Frame, code: ErrorCode) -> anyhow::Result<String> {
    match frame {
        Frame::Error(e) if e.code == code => Ok(e.message),
        other => bail!("expected Error {code}, got {other:?}"),
    }
}

async fn with_deadline<F: std::future::Future<Output = anyhow::Result<()>>>(
    f: F,
) -> anyhow::Result<()> {
    init_tracing();
    tokio::time::timeout(DEADLINE, f)
        .await
        .context("test deadline passed")?
}

#[tokio::test]
async fn headers_are_rewritten_through_a_real_stream() -> anyhow::Result<()> {
    with_deadline(async {
        let backend = http_backend().await?;
        let ctx = ctx(vec![app("hr", format!("http://{backend}/app/"), true)]);
        let (_e, _c, conn) = tunnel(ctx).await?;
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.1, 10.0.0.2"),
        );
        h.insert("connection", HeaderValue::from_static("x-client-hop"));
        h.insert("x-client-hop", HeaderValue::from_static("1"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert("x-portico-user", HeaderValue::from_static("forged"));
        h.insert("host", HeaderValue::from_static("hr.apps.example.com"));
        h.insert("x-custom", HeaderValue::from_static("kept"));
        let (frame, body) =
            exchange(&conn, head("hr", Method::GET, "/x/y?q=1&r=two", h), b"").await?;
        let resp = expect_head(frame)?;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(body, b"hello from the backend");
        let hv = |n: &str| {
            resp.headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(hv("x-seen-uri"), "/app/x/y?q=1&r=two");
        assert_eq!(hv("x-seen-host"), backend.to_string());
        assert_eq!(
            hv("x-seen-x-forwarded-for"),
            "10.0.0.1, 10.0.0.2, 198.51.100.7"
        );
        assert_eq!(hv("x-seen-x-forwarded-proto"), "https");
        assert_eq!(hv("x-seen-x-forwarded-host"), "hr.apps.example.com");
        assert_eq!(
            hv("x-seen-x-request-id"),
            RequestId(0x1234_5678_9abc).to_string()
        );
        let names = hv("x-seen-names");
        assert!(names.contains("x-custom"), "{names}");
        for gone in [
            "x-client-hop",
            "proxy-authorization",
            "x-portico-user",
            "transfer-encoding",
        ] {
            assert!(
                !names.split(',').any(|n| n == gone),
                "{gone} reached the backend: {names}"
            );
        }
        // Hop-by-hop headers of the backend's answer do not reach the edge.
        for gone in ["connection", "x-backend-hop", "keep-alive"] {
            assert!(
                !resp.headers.contains_key(gone),
                "{gone} in {:?}",
                resp.headers
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn get_and_post_bodies_are_byte_exact() -> anyhow::Result<()> {
    with_deadline(async {
        let backend = http_backend().await?;
        let ctx = ctx(vec![app("files", format!("http://{backend}"), true)]);
        let (_e, _c, conn) = tunnel(ctx.clone()).await?;

        let (frame, body) = exchange(
            &conn,
            head("files", Method::GET, "/big", HeaderMap::new()),
            b"",
        )
        .await?;
        assert_eq!(expect_head(frame)?.status, StatusCode::OK);
        assert!(
            body == pattern(5 << 20),
            "GET body differs ({} bytes)",
            body.len()
        );

        // A POST with a Content-Length.
        let upload = pattern(6 << 20);
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from(upload.len()));
        let (frame, body) =
            exchange(&conn, head("files", Method::POST, "/echo", h), &upload).await?;
        let resp = expect_head(frame)?;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(
            resp.headers["x-seen-content-length"],
            upload.len().to_string().as_str()
        );
        assert!(body == upload, "POST echo differs ({} bytes)", body.len());

        // A POST without a length (HTTP/2 client, chunked upload).
        let upload = pattern(3 << 20 | 17);
        let (frame, body) = exchange(
            &conn,
            head("files", Method::PUT, "/echo", HeaderMap::new()),
            &upload,
        )
        .await?;
        assert_eq!(expect_head(frame)?.status, StatusCode::OK);
        assert!(
            body == upload,
            "chunked echo differs ({} bytes)",
            body.len()
        );

        // The handler counts a stream once the edge acknowledged its last byte.
        let counted = || {
            ctx.metrics
                .requests
                .with_label_values(&["files", "200", ""])
                .get()
                == 3
        };
        while !counted() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = ctx.metrics.render();
        assert!(
            text.contains(r#"portico_connector_bytes_total{direction="in"}"#),
            "{text}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dot_segments_are_removed_or_refused_before_the_backend() -> anyhow::Result<()> {
    with_deadline(async {
        let backend = http_backend().await?;
        let ctx = ctx(vec![app("hr", format!("http://{backend}/app/"), true)]);
        let metrics = ctx.metrics.clone();
        let (_e, _c, conn) = tunnel(ctx).await?;
        for (path, seen) in [
            ("/a/../b", "/app/b"),
            ("/a/%2e%2e/b?x=/../y", "/app/b?x=/../y"),
            ("/a/b/..%2f..%2fc", "/app/c"),
        ] {
            let (frame, _) =
                exchange(&conn, head("hr", Method::GET, path, HeaderMap::new()), b"").await?;
            let head = expect_head(frame)?;
            assert_eq!(head.headers["x-seen-uri"], seen, "{path}");
        }
        for path in [
            "/../secret",
            "/%2E%2e/secret",
            "/..%5csecret",
            "/a/../../secret",
        ] {
            let (frame, rest) = exchange(
                &conn,
                head("hr", Method::POST, path, HeaderMap::new()),
                b"a body that goes nowhere",
            )
            .await?;
            let message = expect_error(frame, ErrorCode::PathOutsidePrefix)?;
            assert!(message.contains(path), "{message}");
            assert!(rest.is_empty());
        }
        let refused = metrics
            .requests
            .with_label_values(&["hr", "400", "PathOutsidePrefix"])
            .get();
        assert_eq!(refused, 4);
        Ok(())
    })
    .await
}

/// A backend that accepts connections, reads what comes and never answers;
/// the gauge counts its connections open now, the maximum the most ever.
async fn hostile_backend() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (open, max) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (o, m) = (open.clone(), max.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut tcp, &mut sink).await;
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok((addr, open, max))
}

/// Serves `backend_handler` and counts the connections it accepted.
async fn counting_backend() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(backend_handler)),
            );
        }
    });
    Ok((addr, accepted))
}

#[tokio::test]
async fn backend_connections_are_capped_per_app_with_a_bounded_wait() -> anyhow::Result<()> {
    with_deadline(async {
        let (stuck, open, max) = hostile_backend().await?;
        let (healthy, accepted) = counting_backend().await?;
        let limits = BackendLimits::new(Some(3), Duration::from_millis(300), 1024);
        let ctx = ctx_with(
            vec![
                app("stuck", format!("http://{stuck}/"), true),
                app("fine", format!("http://{healthy}/"), true),
            ],
            &[],
            limits,
        )?;
        let metrics = ctx.metrics.clone();
        let (_e, _c, conn) = tunnel(ctx).await?;

        // Ten requests at once to the backend that never answers: three get
        // a connection (and wait for the app's timeout), seven get
        // BackendBusy once the wait is over.
        let mut held = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let conn = conn.clone();
            held.spawn(async move {
                exchange(
                    &conn,
                    head("stuck", Method::GET, "/", HeaderMap::new()),
                    b"",
                )
                .await
            });
        }
        let mut busy = 0;
        while busy < 7 {
            let (frame, _) = held.join_next().await.context("a stuck request")???;
            let message = expect_error(frame, ErrorCode::BackendBusy)?;
            assert!(message.contains("all 3 connections"), "{message}");
            busy += 1;
        }
        assert_eq!(held.len(), 3, "three requests hold the three connections");
        assert_eq!(max.load(Ordering::SeqCst), 3);
        assert_eq!(open.load(Ordering::SeqCst), 3);
        let gauge = |app: &str| metrics.backend_connections.with_label_values(&[app]).get();
        assert_eq!(gauge("stuck"), 3);
        let waits = |app: &str, outcome: &str| {
            metrics
                .backend_waits
                .with_label_values(&[app, outcome])
                .get()
        };
        assert_eq!(waits("stuck", "busy"), 7);
        let refused = metrics
            .requests
            .with_label_values(&["stuck", "503", "BackendBusy"])
            .get();
        assert_eq!(refused, 7);

        // Meanwhile another app is served; with its own cap of 3, five
        // requests at once share at most three connections, and a waiter
        // takes a connection another request hands back.
        let mut fine = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let conn = conn.clone();
            fine.spawn(async move {
                exchange(&conn, head("fine", Method::GET, "/", HeaderMap::new()), b"").await
            });
        }
        while let Some(r) = fine.join_next().await {
            let (frame, body) = r??;
            assert_eq!(expect_head(frame)?.status, StatusCode::OK);
            assert_eq!(body, b"hello from the backend");
        }
        assert!(accepted.load(Ordering::SeqCst) <= 3);
        assert!(gauge("fine") <= 3);
        // Idle keepalive connections count: they are still open.
        assert_eq!(gauge("fine") as u64, accepted.load(Ordering::SeqCst));

        // The held requests end at the app's timeout; their connections
        // close and give their permits back.
        held.abort_all();
        drop(held);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unknown_app_is_app_not_found() -> anyhow::Result<()> {
    with_deadline(async {
        let mut other = app("other", "http://127.0.0.1:1/".into(), true);
        other.connector_group = GroupId::new("elsewhere").unwrap();
        let ctx = ctx(vec![other]);
        let (_e, _c, conn) = tunnel(ctx).await?;
        for id in ["nope", "other"] {
            let (frame, _) =
                exchange(&conn, head(id, Method::GET, "/", HeaderMap::new()), b"").await?;
            expect_error(frame, ErrorCode::AppNotFound)?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn closed_port_is_backend_unreachable() -> anyhow::Result<()> {
    with_deadline(async {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let ctx = ctx(vec![app("down", format!("http://127.0.0.1:{port}/"), true)]);
        let (_e, _c, conn) = tunnel(ctx).await?;
        let (frame, _) =
            exchange(&conn, head("down", Method::GET, "/", HeaderMap::new()), b"").await?;
        let msg = expect_error(frame, ErrorCode::BackendUnreachable)?;
        assert!(msg.contains(&port.to_string()), "{msg}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn slow_backend_is_backend_timeout() -> anyhow::Result<()> {
    with_deadline(async {
        let backend = http_backend().await?;
        let ctx = ctx(vec![app("slow", format!("http://{backend}/"), true)]);
        let (_e, _c, conn) = tunnel(ctx).await?;
        let mut h = head("slow", Method::GET, "/hang", HeaderMap::new());
        h.timeout_ms = 1000;
        let (frame, _) = exchange(&conn, h, b"").await?;
        expect_error(frame, ErrorCode::BackendTimeout)?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn self_signed_backend_fails_validation_unless_disabled() -> anyhow::Result<()> {
    with_deadline(async {
        let backend = https_backend().await?;
        let ctx = ctx(vec![
            app(
                "strict",
                format!("https://localhost:{}/", backend.port()),
                true,
            ),
            app(
                "lax",
                format!("https://localhost:{}/", backend.port()),
                false,
            ),
        ]);
        let (_e, _c, conn) = tunnel(ctx).await?;
        let (frame, _) = exchange(
            &conn,
            head("strict", Method::GET, "/", HeaderMap::new()),
            b"",
        )
        .await?;
        let msg = expect_error(frame, ErrorCode::BackendCertInvalid)?;
        assert!(msg.to_lowercase().contains("certificate"), "{msg}");

        let (frame, body) =
            exchange(&conn, head("lax", Method::GET, "/", HeaderMap::new()), b"").await?;
        assert_eq!(expect_head(frame)?.status, StatusCode::OK);
        assert_eq!(body, b"hello from the backend");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn backend_ca_files_add_trusted_roots() -> anyhow::Result<()> {
    with_deadline(async {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &ca)?;
        let backend = https_backend_with(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let ca_file = dir.path().join("backend-ca.pem");
        std::fs::write(&ca_file, ca.pem())?;

        let apps = vec![app(
            "intranet",
            format!("https://localhost:{}/", backend.port()),
            true,
        )];
        let with_ca = ctx_with(
            apps.clone(),
            std::slice::from_ref(&ca_file),
            BackendLimits::new(None, Duration::from_secs(5), 1024),
        )?;
        let (_e, _c, conn) = tunnel(with_ca).await?;
        let (frame, body) = exchange(
            &conn,
            head("intranet", Method::GET, "/", HeaderMap::new()),
            b"",
        )
        .await?;
        assert_eq!(expect_head(frame)?.status, StatusCode::OK);
        assert_eq!(body, b"hello from the backend");

        // Without the file, the same backend is refused.
        let (_e2, _c2, conn) = tunnel(ctx(apps.clone())).await?;
        let (frame, _) = exchange(
            &conn,
            head("intranet", Method::GET, "/", HeaderMap::new()),
            b"",
        )
        .await?;
        expect_error(frame, ErrorCode::BackendCertInvalid)?;

        // A file without certificates is a clear configuration error.
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here")?;
        assert!(matches!(
            ctx_with(
                apps,
                &[empty],
                BackendLimits::new(None, Duration::ZERO, 1024)
            )
            .unwrap_err()
            .downcast::<crate::Error>(),
            Ok(crate::Error::BackendCa { .. })
        ));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn websocket_upgrade_becomes_a_byte_pipe() -> anyhow::Result<()> {
    with_deadline(async {
        let backend = http_backend().await?;
        let ctx = ctx(vec![app("chat", format!("http://{backend}/"), true)]);
        let (_e, _c, conn) = tunnel(ctx).await?;
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h.insert("sec-websocket-version", HeaderValue::from_static("13"));
        let mut ws = head("chat", Method::GET, "/ws", h);
        ws.kind = StreamKind::WebSocket;

        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &Frame::StreamHead(ws)).await?;
        let resp = expect_head(read_frame(&mut recv).await?.context("no answer")?)?;
        assert_eq!(resp.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(resp.headers["upgrade"], "websocket");
        assert_eq!(
            resp.headers["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let names = resp.headers["x-seen-names"].to_str()?.to_owned();
        assert!(
            names.contains("sec-websocket-key") && names.contains("upgrade"),
            "{names}"
        );

        for msg in [&b"ping 1"[..], b"second message", &[0u8, 255, 7, 9]] {
            send.write_all(msg).await?;
            let mut back = vec![0u8; msg.len()];
            recv.read_exact(&mut back).await?;
            assert_eq!(back, msg);
        }
        let big = pattern(1 << 20);
        let (w, r) = tokio::join!(
            async {
                send.write_all(&big).await?;
                send.finish()?;
                anyhow::Ok(())
            },
            async { anyhow::Ok(recv.read_to_end(4 << 20).await?) }
        );
        w?;
        assert!(r? == big, "echoed bytes differ");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn malformed_head_resets_only_that_stream() -> anyhow::Result<()> {
    with_deadline(async {
        let backend = http_backend().await?;
        let ctx = ctx(vec![app("hr", format!("http://{backend}/"), true)]);
        let (_e, _c, conn) = tunnel(ctx).await?;

        // A StreamHead frame whose payload is garbage.
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[0x10, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .await?;
        send.finish()?;
        let mut buf = [0u8; 16];
        match recv.read(&mut buf).await {
            Err(quinn::ReadError::Reset(code)) => {
                assert_eq!(
                    code.into_inner(),
                    u64::from(CloseCode::ProtocolError.to_wire())
                )
            }
            other => bail!("expected a reset stream, got {other:?}"),
        }

        // A frame that is not a StreamHead.
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &Frame::Ping(1)).await?;
        match recv.read(&mut buf).await {
            Err(quinn::ReadError::Reset(code)) => {
                assert_eq!(
                    code.into_inner(),
                    u64::from(CloseCode::ProtocolError.to_wire())
                )
            }
            other => bail!("expected a reset stream, got {other:?}"),
        }

        // The tunnel still serves.
        assert!(conn.close_reason().is_none());
        let (frame, body) =
            exchange(&conn, head("hr", Method::GET, "/", HeaderMap::new()), b"").await?;
        assert_eq!(expect_head(frame)?.status, StatusCode::OK);
        assert_eq!(body, b"hello from the backend");
        Ok(())
    })
    .await
}

/// Polls `value` until it stops growing (five equal samples in a row),
/// and returns where it stalled.
async fn stalls(value: &AtomicU64) -> u64 {
    let mut last = u64::MAX;
    let mut same = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = value.load(Ordering::Relaxed);
        if now == last && now > 0 {
            same += 1;
            if same == 5 {
                return now;
            }
        } else {
            same = 0;
        }
        last = now;
    }
}

/// Far below the 256 MiB a run-away buffer would reach: QUIC windows
/// (2 MiB per stream), socket buffers and hyper's buffers.
const BOUNDED: u64 = 48 << 20;

#[tokio::test]
async fn download_backpressure_stalls_the_backend() -> anyhow::Result<()> {
    with_deadline(async {
        // A backend that would send 256 MiB, counting what it got rid of.
        let produced = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counter = produced.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let counter = counter.clone();
                        async move {
                            let chunk = Bytes::from(pattern(64 * 1024));
                            let body = futures::stream::unfold(0usize, move |sent| {
                                let chunk = chunk.clone();
                                let counter = counter.clone();
                                async move {
                                    if sent >= 256 << 20 {
                                        return None;
                                    }
                                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                                    Some((
                                        Ok::<_, Infallible>(http_body::Frame::data(chunk.clone())),
                                        sent + chunk.len(),
                                    ))
                                }
                            });
                            Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(
                                body,
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        let ctx = ctx(vec![app("bulk", format!("http://{addr}"), true)]);
        let (_e, _c, conn) = tunnel(ctx.clone()).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(
            &mut send,
            &Frame::StreamHead(head("bulk", Method::GET, "/", HeaderMap::new())),
        )
        .await?;
        send.finish()?;
        let resp = expect_head(read_frame(&mut recv).await?.context("no answer")?)?;
        assert_eq!(resp.status, StatusCode::OK);
        // The edge reads nothing more: the backend must stall.
        let stalled = stalls(&produced).await;
        tracing::info!(stalled, "download stalled");
        assert!(
            stalled < BOUNDED,
            "the connector buffered {stalled} bytes of a download nobody reads"
        );
        // Reading resumes the flow.
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < 2 * stalled {
            got += recv.read(&mut buf).await?.context("body ended early")? as u64;
        }
        assert!(produced.load(Ordering::Relaxed) > stalled);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn upload_backpressure_stalls_the_edge() -> anyhow::Result<()> {
    with_deadline(async {
        // A backend that never reads the request body nor answers.
        let backend = http_backend().await?;
        let ctx = ctx(vec![app("bulk", format!("http://{backend}"), true)]);
        let (_e, _c, conn) = tunnel(ctx.clone()).await?;
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from(256u64 << 20));
        let (mut send, _recv) = conn.open_bi().await?;
        write_frame(
            &mut send,
            &Frame::StreamHead(head("bulk", Method::POST, "/hang", h)),
        )
        .await?;
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let writer = tokio::spawn(async move {
            let chunk = pattern(64 * 1024);
            for _ in 0..(256 << 20) / chunk.len() {
                if send.write_all(&chunk).await.is_err() {
                    return;
                }
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        let stalled = stalls(&written).await;
        tracing::info!(stalled, "upload stalled");
        assert!(
            stalled < BOUNDED,
            "the connector accepted {stalled} bytes of an upload nobody reads"
        );
        writer.abort();
        Ok(())
    })
    .await
}

// ---- the tunnel pool against a minimal in-process edge ----

mod pool {
    use super::*;
    use crate::tunnel::{bind_endpoint, transport_config, Pool};
    use portico_agent::{Credentials, Secret};
    use portico_proto::api::{ConnectorConfig, EdgeEndpoint, Identity};
    use portico_proto::{ConnectorId, EdgeId, Goodbye, RegionId, Welcome};
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
        SanType,
    };
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    struct Pki {
        ca_pem: String,
        /// Per edge: its certificate chain and key.
        edges: Vec<(EdgeId, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        connector: Credentials,
    }

    /// A CA, certificates for `edges`, and the connector's credentials.
    fn pki(edges: &[&EdgeId], connector: &ConnectorId) -> anyhow::Result<Pki> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

        let mut edge_certs = Vec::new();
        for edge in edges {
            let key = KeyPair::generate()?;
            // As the router's CA issues them: the edge's name and its
            // identity.
            let mut params =
                CertificateParams::new(vec![portico_proto::api::edge_server_name(edge)])?;
            let identity = Identity::Edge {
                id: (*edge).clone(),
                region: RegionId::default_region(),
            };
            for uri in identity.to_uris() {
                params
                    .subject_alt_names
                    .push(SanType::URI(rcgen::string::Ia5String::try_from(uri)?));
            }
            let cert = params.signed_by(&key, &ca)?;
            edge_certs.push((
                (*edge).clone(),
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ));
        }

        let identity = Identity::Connector {
            id: connector.clone(),
            group: GroupId::default_group(),
        };
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for uri in identity.to_uris() {
            params
                .subject_alt_names
                .push(SanType::URI(rcgen::string::Ia5String::try_from(uri)?));
        }
        let cert = params.signed_by(&key, &ca)?;
        let connector = Credentials::new(
            identity,
            Secret::new(key.serialize_pem()),
            cert.pem(),
            ca.pem(),
        )?;
        Ok(Pki {
            ca_pem: ca.pem(),
            edges: edge_certs,
            connector,
        })
    }

    /// A welcomed tunnel as the fake edge sees it.
    struct EdgeSide {
        conn: quinn::Connection,
        ctl_send: quinn::SendStream,
        _ctl_recv: quinn::RecvStream,
        /// The first byte of the connector's first connection ID, which
        /// picks a sharded edge's shard.
        first_cid_byte: u8,
    }

    /// Config version 7: app `hr` on `backend`, behind the one edge `edge`.
    fn hr_behind(
        edge: &EdgeId,
        edge_ep: &quinn::Endpoint,
        backend: std::net::SocketAddr,
    ) -> anyhow::Result<ConnectorConfig> {
        Ok(ConnectorConfig {
            version: 7,
            group: GroupId::default_group(),
            apps: vec![app("hr", format!("http://{backend}/"), true)],
            edges: vec![EdgeEndpoint {
                id: edge.clone(),
                region: RegionId::default_region(),
                tunnel_addr: edge_ep.local_addr()?.to_string(),
            }],
            region: None,
            tunnel_names: Default::default(),
            links: vec![],
            backend_cas: vec![],
        })
    }

    /// An edge that checks the client certificate, answers `Hello` with
    /// `Welcome` and hands every tunnel to the test.
    async fn fake_edge(
        pki: &Pki,
        edge: EdgeId,
    ) -> anyhow::Result<(quinn::Endpoint, mpsc::Receiver<EdgeSide>)> {
        let (_, chain, key) = pki
            .edges
            .iter()
            .find(|(id, ..)| *id == edge)
            .context("no cert for edge")?;
        let verifier = portico_agent::pki::client_verifier(&pki.ca_pem, false)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(portico_agent::pki::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        tls.alpn_protocols = vec![portico_proto::ALPN.to_vec()];
        let config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
        let (tx, rx) = mpsc::channel(16);
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let tx = tx.clone();
                let edge = edge.clone();
                tokio::spawn(async move {
                    let first_cid_byte = incoming.orig_dst_cid()[0];
                    let conn = incoming.await?;
                    let (mut ctl_send, mut ctl_recv) = conn.accept_bi().await?;
                    let Some(Frame::Hello(hello)) = read_frame(&mut ctl_recv).await? else {
                        bail!("no Hello")
                    };
                    assert_eq!(hello.version, portico_proto::PROTOCOL_VERSION);
                    assert!(!hello.agent_version.is_empty());
                    let welcome = Welcome {
                        version: hello.version,
                        capabilities: portico_proto::capabilities::ALL,
                        edge_id: edge,
                        region: RegionId::default_region(),
                        config_version: 1,
                    };
                    write_frame(&mut ctl_send, &Frame::Welcome(welcome)).await?;
                    let _ = tx
                        .send(EdgeSide {
                            conn,
                            ctl_send,
                            _ctl_recv: ctl_recv,
                            first_cid_byte,
                        })
                        .await;
                    anyhow::Ok(())
                });
            }
        });
        Ok((endpoint, rx))
    }

    #[tokio::test]
    async fn pool_serves_replaces_drained_tunnels_and_stops_when_revoked() -> anyhow::Result<()> {
        with_deadline(async {
            let edge_id = EdgeId::new("e-test")?;
            let id = ConnectorId::new("c-test")?;
            let pki = pki(&[&edge_id], &id)?;
            let (edge_ep, mut tunnels) = fake_edge(&pki, edge_id.clone()).await?;
            let backend = http_backend().await?;

            let stop = CancellationToken::new();
            let tracker = TaskTracker::new();
            let streams = ctx(vec![]);
            let (_creds_tx, creds_rx) = watch::channel(Arc::new(pki.connector.clone()));
            let (config_tx, config_rx) = watch::channel(None);
            let sockets = TaskTracker::new();
            let endpoint = bind_endpoint(&sockets)?;
            let pool = Arc::new(Pool::new(
                id.clone(),
                GroupId::default_group(),
                vec![endpoint.clone()],
                Arc::new(transport_config(64)),
                creds_rx,
                config_rx,
                streams,
                stop.clone(),
                tracker.clone(),
            ));
            let config = hr_behind(&edge_id, &edge_ep, backend)?;
            crate::watch::apply(&pool, &config_tx, Arc::new(config));
            pool.spawn_slots(
                2,
                &crate::shard::Shards::start(std::num::NonZeroUsize::MIN)?,
            );

            let mut first = tunnels.recv().await.context("first tunnel")?;
            let second = tunnels.recv().await.context("second tunnel")?;
            pool.up.subscribe().wait_for(|n| *n == 2).await?;

            // Both tunnels carry requests.
            for t in [&first, &second] {
                let (frame, body) =
                    exchange(&t.conn, head("hr", Method::GET, "/", HeaderMap::new()), b"").await?;
                assert_eq!(expect_head(frame)?.status, StatusCode::OK);
                assert_eq!(body, b"hello from the backend");
            }

            // The edge drains the first: a replacement comes (to the same
            // edge, the only one there is), and the drained tunnel keeps
            // serving the edge's streams until the edge closes it.
            write_frame(&mut first.ctl_send, &Frame::Drain).await?;
            let third = tunnels.recv().await.context("replacement tunnel")?;
            pool.up.subscribe().wait_for(|n| *n == 2).await?;
            let (frame, body) = exchange(
                &first.conn,
                head("hr", Method::GET, "/", HeaderMap::new()),
                b"",
            )
            .await?;
            assert_eq!(expect_head(frame)?.status, StatusCode::OK);
            assert_eq!(body, b"hello from the backend");
            assert!(first.conn.close_reason().is_none());
            first
                .conn
                .close(CloseCode::Shutdown.to_wire().into(), b"edge drained");
            pool.up.subscribe().wait_for(|n| *n == 2).await?;
            let (frame, _) = exchange(
                &third.conn,
                head("hr", Method::GET, "/", HeaderMap::new()),
                b"",
            )
            .await?;
            assert_eq!(expect_head(frame)?.status, StatusCode::OK);

            // Revocation stops the whole pool with Error::Revoked.
            let mut ctl = second.ctl_send;
            let bye = Goodbye {
                code: u64::from(CloseCode::Revoked.to_wire()),
                reason: "connector revoked".into(),
            };
            write_frame(&mut ctl, &Frame::Goodbye(bye)).await?;
            second.conn.close(
                crate::stream::code(CloseCode::Revoked),
                b"connector revoked",
            );
            stop.cancelled().await;
            let fatal = pool.fatal.lock().unwrap().take();
            match fatal {
                Some(crate::Error::Revoked { connector, detail }) => {
                    assert_eq!(connector, id);
                    assert!(detail.contains("connector revoked"), "{detail}");
                }
                other => bail!("expected Revoked, got {other:?}"),
            }
            tracker.close();
            tracker.wait().await;
            // The remaining tunnel was drained and closed for shutdown.
            match third.conn.closed().await {
                quinn::ConnectionError::ApplicationClosed(c) => {
                    assert_eq!(
                        CloseCode::from_wire(c.error_code.into_inner()),
                        CloseCode::Shutdown
                    )
                }
                other => bail!("third tunnel ended with {other}"),
            }
            assert_eq!(*pool.up.borrow(), 0);
            Ok(())
        })
        .await
    }

    /// Two shards, four slots: each slot dials from a socket of its own
    /// (four source ports at the edge), asks for consecutive shards of a
    /// sharded edge by its first connection ID (so any edge's shards get
    /// them evenly), slot `i` serves its streams on shard `i % 2`, and each
    /// shard has its own backend pool, so both open a backend connection.
    /// Stopping joins the shard thread.
    #[tokio::test]
    async fn slots_serve_on_their_shards_with_a_backend_pool_each() -> anyhow::Result<()> {
        with_deadline(async {
            let edge_id = EdgeId::new("e-test")?;
            let id = ConnectorId::new("c-shards")?;
            let pki = pki(&[&edge_id], &id)?;
            let (edge_ep, mut tunnels) = fake_edge(&pki, edge_id.clone()).await?;
            let (backend, accepted) = counting_backend().await?;

            let shards = crate::shard::Shards::start(std::num::NonZeroUsize::new(2).context("2")?)?;
            let stop = CancellationToken::new();
            let tracker = TaskTracker::new();
            let streams = ctx_sharded(
                vec![],
                &[],
                BackendLimits::new(None, Duration::from_secs(5), 1024),
                2,
            )?;
            let (_creds_tx, creds_rx) = watch::channel(Arc::new(pki.connector.clone()));
            let (config_tx, config_rx) = watch::channel(None);
            let sockets = TaskTracker::new();
            let endpoints = (0..4)
                .map(|slot| {
                    let _on = shards.for_slot(slot).enter();
                    bind_endpoint(&sockets)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let pool = Arc::new(Pool::new(
                id.clone(),
                GroupId::default_group(),
                endpoints.clone(),
                Arc::new(transport_config(64)),
                creds_rx,
                config_rx,
                streams.clone(),
                stop.clone(),
                tracker.clone(),
            ));
            let config = hr_behind(&edge_id, &edge_ep, backend)?;
            crate::watch::apply(&pool, &config_tx, Arc::new(config));
            pool.spawn_slots(4, &shards);

            let mut sides = Vec::new();
            for _ in 0..4 {
                sides.push(tunnels.recv().await.context("tunnel")?);
            }
            let ports: std::collections::BTreeSet<u16> = sides
                .iter()
                .map(|s| s.conn.remote_address().port())
                .collect();
            assert_eq!(ports.len(), 4, "one source port per slot");
            let asked: std::collections::BTreeSet<u8> =
                sides.iter().map(|s| s.first_cid_byte).collect();
            assert!(
                asked
                    .iter()
                    .any(|b| (0..4).all(|k| asked.contains(&b.wrapping_add(k)))),
                "four consecutive shards asked for: {asked:?}"
            );
            for side in &sides {
                let (frame, body) = exchange(
                    &side.conn,
                    head("hr", Method::GET, "/", HeaderMap::new()),
                    b"",
                )
                .await?;
                assert_eq!(expect_head(frame)?.status, StatusCode::OK);
                assert_eq!(body, b"hello from the backend");
            }
            // Slots 0 and 2 on shard 0, 1 and 3 on shard 1.
            let served: Vec<u64> = streams.shard_streams.iter().map(|c| c.get()).collect();
            assert_eq!(served, [2, 2]);
            assert!(
                accepted.load(Ordering::SeqCst) >= 2,
                "each shard dials the backend from its own pool"
            );

            stop.cancel();
            tracker.close();
            tracker.wait().await;
            drop((pool, endpoints));
            shards.stop().await;
            Ok(())
        })
        .await
    }

    #[tokio::test]
    async fn slots_move_to_new_edges_when_the_list_changes() -> anyhow::Result<()> {
        with_deadline(async {
            let (a, b) = (EdgeId::new("e-a")?, EdgeId::new("e-b")?);
            let id = ConnectorId::new("c-move")?;
            let pki = pki(&[&a, &b], &id)?;
            let (ep_a, mut tunnels_a) = fake_edge(&pki, a.clone()).await?;
            let (ep_b, mut tunnels_b) = fake_edge(&pki, b.clone()).await?;

            let stop = CancellationToken::new();
            let tracker = TaskTracker::new();
            let (_creds_tx, creds_rx) = watch::channel(Arc::new(pki.connector.clone()));
            let (config_tx, config_rx) = watch::channel(None);
            let pool = Arc::new(Pool::new(
                id,
                GroupId::default_group(),
                vec![bind_endpoint(&TaskTracker::new())?],
                Arc::new(transport_config(64)),
                creds_rx,
                config_rx,
                ctx(vec![]),
                stop.clone(),
                tracker.clone(),
            ));
            let endpoint = |id: &EdgeId, ep: &quinn::Endpoint| -> anyhow::Result<EdgeEndpoint> {
                Ok(EdgeEndpoint {
                    id: id.clone(),
                    region: RegionId::default_region(),
                    tunnel_addr: ep.local_addr()?.to_string(),
                })
            };
            let config = |version, edges| ConnectorConfig {
                version,
                group: GroupId::default_group(),
                apps: vec![],
                edges,
                region: None,
                tunnel_names: Default::default(),
                links: vec![],
                backend_cas: vec![],
            };
            crate::watch::apply(
                &pool,
                &config_tx,
                Arc::new(config(1, vec![endpoint(&a, &ep_a)?])),
            );
            pool.spawn_slots(
                2,
                &crate::shard::Shards::start(std::num::NonZeroUsize::MIN)?,
            );
            let a1 = tunnels_a.recv().await.context("a1")?;
            let a2 = tunnels_a.recv().await.context("a2")?;

            crate::watch::apply(
                &pool,
                &config_tx,
                Arc::new(config(2, vec![endpoint(&a, &ep_a)?, endpoint(&b, &ep_b)?])),
            );
            let _b1 = tunnels_b.recv().await.context("a tunnel moved to b")?;
            // Exactly one of a's tunnels was drained and closed.
            let closed = tokio::select! {
                c = a1.conn.closed() => c,
                c = a2.conn.closed() => c,
            };
            assert!(
                matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
                "{closed}"
            );
            assert!(a1.conn.close_reason().is_none() || a2.conn.close_reason().is_none());
            pool.up.subscribe().wait_for(|n| *n == 2).await?;
            stop.cancel();
            tracker.close();
            tracker.wait().await;
            Ok(())
        })
        .await
    }
}
