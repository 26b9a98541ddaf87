//! The generator's failover and retries against real servers on loopback
//! (hyper, and the h2 crate's server): a dead `connect_to` address is
//! skipped for the next one, so is one that accepts TCP but never answers
//! the TLS handshake (after the attempt timeout), a kept-alive HTTP/1.1
//! connection the server closed under a request is retried on a new one,
//! so is an HTTP/2 stream the server refused, and when every address is
//! dead the requests are transport errors (counted, bounded).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico_loadtest::client::ATTEMPT_TIMEOUT;
use portico_loadtest::{run_scenario, Mode, Protocol, Report, RequestSpec, Scenario};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Every test run is bounded by this.
const BOUND: Duration = Duration::from_secs(60);

/// A hyper server (HTTP/1.1 and HTTP/2, plain) on 127.0.0.1:0 that answers
/// 200 "ok". With `one_per_connection`, the service fails the second
/// request of each connection, and hyper then closes the connection
/// without a response: a server whose keep-alive timeout fired just as a
/// request arrived, with no `Connection: close` beforehand.
struct Server {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

#[derive(Debug)]
struct Closed;
impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed without a response")
    }
}
impl std::error::Error for Closed {}

impl Server {
    async fn start(one_per_connection: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (s, t, tk) = (served.clone(), stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    () = t.cancelled() => break,
                };
                let (s, t) = (s.clone(), t.clone());
                tk.spawn(async move {
                    let on_conn = Arc::new(AtomicU64::new(0));
                    let svc = service_fn(move |_req: hyper::Request<Incoming>| {
                        let n = on_conn.fetch_add(1, Ordering::Relaxed);
                        let s = s.clone();
                        async move {
                            if one_per_connection && n >= 1 {
                                return Err(Closed);
                            }
                            s.fetch_add(1, Ordering::Relaxed);
                            Ok::<_, Closed>(hyper::Response::new(Full::new(Bytes::from_static(
                                b"ok",
                            ))))
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = conn => {}
                        () = t.cancelled() => {}
                    }
                });
            }
        });
        Server {
            addr,
            served,
            stop,
            tasks,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// A loopback port with nothing listening (bound, then closed).
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn scenario(connect_to: Vec<SocketAddr>, protocol: Protocol, count: u64) -> Scenario {
    Scenario {
        mode: Mode::Closed,
        concurrency: Some(2),
        count: Some(count),
        connections: 2,
        protocol,
        timeout: Duration::from_secs(10),
        connect_to,
        requests: vec![RequestSpec::get("http://app.test/")],
        ..Scenario::default()
    }
}

async fn run(s: Scenario) -> Report {
    tokio::time::timeout(BOUND, run_scenario(s, None, CancellationToken::new()))
        .await
        .expect("the run is bounded")
        .unwrap()
}

#[tokio::test]
async fn a_dead_address_is_skipped_for_the_next() {
    let server = Server::start(false).await;
    let dead = closed_port().await;
    for (protocol, per_request) in [
        (Protocol::H1, false),
        (Protocol::H1, true),
        (Protocol::H2, false),
        (Protocol::H2, true),
    ] {
        let mut s = scenario(vec![dead, server.addr], protocol, 40);
        s.new_connection_per_request = per_request;
        let r = run(s).await;
        let what = format!("{protocol:?}, new connection per request: {per_request}");
        assert_eq!(r.requests.completed, 40, "{what}: {r:?}");
        assert_eq!(r.requests.errors, 0, "{what}: {:?}", r.transport_errors);
        assert_eq!(r.requests.ok, 40, "{what}");
        // The first connection is tried at the dead address first.
        assert!(r.requests.failovers >= 1, "{what}: {:?}", r.requests);
    }
    assert_eq!(server.served.load(Ordering::Relaxed), 160);
    server.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_closed_by_the_server_is_retried() {
    let server = Server::start(true).await;
    let mut s = scenario(vec![server.addr], Protocol::H1, 30);
    s.concurrency = Some(1);
    s.connections = 1;
    let r = run(s).await;
    assert_eq!(r.requests.completed, 30, "{r:?}");
    assert_eq!(r.requests.errors, 0, "{:?}", r.transport_errors);
    // Every request after the first finds the kept-alive connection, which
    // the server closes under it: each is sent again on a new one.
    assert!(r.requests.retried >= 1, "{:?}", r.requests);
    assert_eq!(r.requests.retried, 29, "{:?}", r.requests);
    assert_eq!(server.served.load(Ordering::Relaxed), 30);
    server.stop().await;
}

#[tokio::test]
async fn every_address_dead_is_a_transport_error() {
    let (a, b) = (closed_port().await, closed_port().await);
    for protocol in [Protocol::H1, Protocol::H2] {
        let r = run(scenario(vec![a, b], protocol, 10)).await;
        assert_eq!(r.requests.completed, 10, "{r:?}");
        assert_eq!(r.requests.ok, 0);
        assert_eq!(r.requests.errors, 10);
        assert_eq!(r.transport_errors.get("connect"), Some(&10), "{r:?}");
        // Each request tried both addresses.
        assert_eq!(r.requests.failovers, 10, "{:?}", r.requests);
        assert_eq!(r.requests.retried, 0);
    }
}

/// An HTTP/2 server (the h2 crate's, plain) that answers 200 to the first
/// stream of each connection and refuses every later one with
/// RST_STREAM(REFUSED_STREAM): the stream was never processed.
async fn refusing_h2_server(stop: CancellationToken, tasks: &TaskTracker) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tk = tasks.clone();
    tasks.spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => r.unwrap(),
                () = stop.cancelled() => break,
            };
            let stop = stop.clone();
            tk.spawn(async move {
                let serve = async {
                    let mut conn = h2::server::handshake(tcp).await?;
                    let mut n = 0u32;
                    while let Some(stream) = conn.accept().await {
                        let (_req, mut respond) = stream?;
                        n += 1;
                        if n == 1 {
                            let resp = http::Response::new(());
                            respond.send_response(resp, true)?;
                        } else {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        }
                    }
                    Ok::<_, h2::Error>(())
                };
                tokio::select! {
                    _ = serve => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http2_stream_refused_by_the_server_is_retried() {
    let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
    let addr = refusing_h2_server(stop.clone(), &tasks).await;
    let mut s = scenario(vec![addr], Protocol::H2, 20);
    s.concurrency = Some(1);
    s.connections = 1;
    let r = run(s).await;
    assert_eq!(r.requests.completed, 20, "{r:?}");
    assert_eq!(r.requests.errors, 0, "{:?}", r.transport_errors);
    assert_eq!(r.status.get(&200), Some(&20));
    // Every request after the first is refused on the pooled connection
    // and answered on a new one.
    assert_eq!(r.requests.retried, 19, "{:?}", r.requests);
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}

/// An HTTPS hyper server (self-signed) answering 200, and a TCP listener
/// that accepts and then says nothing (a TLS handshake that never ends).
#[tokio::test]
async fn an_address_that_never_answers_the_handshake_is_given_up_for_the_next() {
    let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
    let ck = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(ck.cert.der().to_vec());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        ck.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (st, tk) = (stop.clone(), tasks.clone());
    tasks.spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                r = silent.accept() => held.push(r.unwrap().0),
                r = live.accept() => {
                    let (tcp, _) = r.unwrap();
                    let (acceptor, st) = (acceptor.clone(), st.clone());
                    tk.spawn(async move {
                        let Ok(io) = acceptor.accept(tcp).await else { return };
                        let svc = service_fn(|_req: hyper::Request<Incoming>| async {
                            Ok::<_, Closed>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(io), svc);
                        tokio::select! {
                            _ = conn => {}
                            () = st.cancelled() => {}
                        }
                    });
                }
                () = st.cancelled() => break,
            }
        }
    });
    let mut s = scenario(vec![silent_addr, live_addr], Protocol::H1, 5);
    s.requests = vec![RequestSpec::get("https://app.test/")];
    s.insecure = true;
    s.concurrency = Some(1);
    s.connections = 1;
    // Longer than one attempt may take: the request waits out the silent
    // address, then opens at the live one.
    s.timeout = ATTEMPT_TIMEOUT * 4;
    let r = run(s).await;
    assert_eq!(r.requests.ok, 5, "{r:?}");
    assert_eq!(r.requests.errors, 0, "{:?}", r.transport_errors);
    assert!(r.requests.failovers >= 1, "{:?}", r.requests);
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}
