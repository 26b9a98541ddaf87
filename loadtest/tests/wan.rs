//! The WAN emulator over real loopback sockets: a real quinn connection
//! through a relay path experiences the configured delay (RTT read from
//! quinn), loss (quinn counts lost packets, the relay counts drops),
//! blackholes (idle timeout, then recovery), duplication and reordering
//! (byte-exact transfers), a bandwidth cap (a lower bound on transfer time)
//! and an MTU clamp (handshake still completes at QUIC's minimum 1200).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use portico_loadtest::wan::{self, EchoServer, Impairment, Path, PathConfig};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

const ALPN: &[u8] = b"wan-test";
const LIMIT: usize = 16 << 20;
const IDLE: Duration = Duration::from_secs(10);

fn transport(idle: Duration) -> anyhow::Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle)?));
    Ok(Arc::new(t))
}

/// A quinn server on loopback that echoes every bidirectional stream.
struct Server {
    endpoint: quinn::Endpoint,
    cert: CertificateDer<'static>,
    token: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl Server {
    fn start(idle: Duration) -> anyhow::Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
        sc.transport_config(transport(idle)?);
        let endpoint = quinn::Endpoint::server(sc, "127.0.0.1:0".parse()?)?;
        let token = CancellationToken::new();
        let (ep, t) = (endpoint.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let incoming = tokio::select! {
                    () = t.cancelled() => break,
                    i = ep.accept() => match i { Some(i) => i, None => break },
                };
                let t = t.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    loop {
                        let (mut send, mut recv) = tokio::select! {
                            () = t.cancelled() => break,
                            s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => break },
                        };
                        tokio::spawn(async move {
                            if let Ok(body) = recv.read_to_end(LIMIT).await {
                                let _ = send.write_all(&body).await;
                                let _ = send.finish();
                            }
                        });
                    }
                });
            }
        });
        Ok(Self {
            endpoint,
            cert,
            token,
        })
    }

    fn addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    async fn connect(&self, via: SocketAddr, idle: Duration) -> anyhow::Result<quinn::Connection> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut cc = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        cc.transport_config(transport(idle)?);
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client.set_default_client_config(cc);
        let conn = tokio::time::timeout(Duration::from_secs(20), client.connect(via, "localhost")?)
            .await
            .context("handshake timed out")??;
        Ok(conn)
    }
}

async fn echo(conn: &quinn::Connection, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(data).await?;
    send.finish()?;
    Ok(recv.read_to_end(LIMIT).await?)
}

/// Echoes `data` and checks it comes back byte-exact, bounded in time.
async fn echo_exact(conn: &quinn::Connection, data: &[u8]) -> anyhow::Result<()> {
    let back = tokio::time::timeout(Duration::from_secs(60), echo(conn, data))
        .await
        .context("echo timed out")??;
    anyhow::ensure!(
        back.len() == data.len(),
        "got {} of {} bytes",
        back.len(),
        data.len()
    );
    anyhow::ensure!(back == data, "echo differs");
    Ok(())
}

fn payload(len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(len as u64);
    (0..len).map(|_| rng.u8(..)).collect()
}

async fn path(
    target: SocketAddr,
    up: Impairment,
    down: Impairment,
    shutdown: &CancellationToken,
) -> anyhow::Result<Path> {
    let mut cfg = PathConfig::new("127.0.0.1:0".parse()?, target);
    cfg.up = up;
    cfg.down = down;
    cfg.seed = Some(7);
    Ok(wan::start(cfg, shutdown.clone()).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_raises_quinn_rtt_to_at_least_the_configured_rtt() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let server = Server::start(IDLE)?;
    let one_way = Duration::from_millis(25);
    let slow = path(
        server.addr()?,
        Impairment::delay(one_way),
        Impairment::delay(one_way),
        &shutdown,
    )
    .await?;
    let fast = path(
        server.addr()?,
        Impairment::none(),
        Impairment::none(),
        &shutdown,
    )
    .await?;

    let mut rtts = Vec::new();
    for p in [&slow, &fast] {
        let conn = server.connect(p.local_addr(), IDLE).await?;
        for i in 0..5 {
            echo_exact(&conn, &payload(100 + i)).await?;
        }
        rtts.push((conn.rtt(), conn.stats().path.min_rtt));
        conn.close(0u32.into(), b"done");
    }
    let ((slow_rtt, slow_min), (fast_rtt, fast_min)) = (rtts[0], rtts[1]);
    eprintln!("quinn rtt: 2x25 ms path {slow_rtt:?} (min {slow_min:?}); undelayed {fast_rtt:?} (min {fast_min:?})");
    let configured = one_way * 2;
    // quinn stamps a batch of received datagrams with the time its driver
    // began polling the socket, so a thread stalled on a loaded machine
    // reads an RTT a little short (seen once: min below 50 ms during a full
    // parallel test run). The relay never delivers early; allow 10% for that.
    let floor = configured * 9 / 10;
    assert!(
        slow_rtt >= floor,
        "rtt {slow_rtt:?} < {floor:?} (configured {configured:?})"
    );
    assert!(
        slow_min >= floor,
        "min rtt {slow_min:?} < {floor:?} (configured {configured:?})"
    );
    assert!(
        fast_rtt < configured,
        "undelayed rtt {fast_rtt:?} not below {configured:?}"
    );
    let s = slow.stats();
    assert!(s.up.forwarded > 0 && s.down.forwarded > 0, "{s:?}");
    assert_eq!(s.up.dropped.total() + s.down.dropped.total(), 0, "{s:?}");
    shutdown.cancel();
    slow.wait().await;
    fast.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_is_recovered_byte_exact_and_counted_by_both() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let server = Server::start(IDLE)?;
    let lossy = Impairment {
        loss: 0.10,
        ..Impairment::default()
    };
    let p = path(server.addr()?, lossy.clone(), lossy, &shutdown).await?;
    let conn = server.connect(p.local_addr(), IDLE).await?;
    echo_exact(&conn, &payload(3 << 20)).await?;
    let quinn_lost = conn.stats().path.lost_packets;
    let s = p.stats();
    eprintln!(
        "loss: quinn lost_packets {quinn_lost}; relay dropped up {} / down {}",
        s.up.dropped.loss, s.down.dropped.loss
    );
    assert!(quinn_lost > 0, "quinn saw no loss");
    assert!(s.up.dropped.loss > 0 && s.down.dropped.loss > 0, "{s:?}");
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_ends_in_idle_timeout() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let idle = Duration::from_secs(1);
    let server = Server::start(idle)?;
    let p = path(
        server.addr()?,
        Impairment::none(),
        Impairment::none(),
        &shutdown,
    )
    .await?;
    let conn = server.connect(p.local_addr(), idle).await?;
    echo_exact(&conn, b"before").await?;

    p.blackhole(true);
    let res = tokio::time::timeout(Duration::from_secs(20), echo(&conn, b"into the void")).await;
    assert!(
        matches!(res, Ok(Err(_))),
        "expected a failed echo, got {res:?}"
    );
    assert_eq!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut));
    let s = p.stats();
    assert!(s.up.dropped.blackhole > 0, "{s:?}");
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_lifted_before_idle_timeout_resumes_traffic() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let idle = Duration::from_secs(5);
    let server = Server::start(idle)?;
    let p = path(
        server.addr()?,
        Impairment::none(),
        Impairment::none(),
        &shutdown,
    )
    .await?;
    let conn = server.connect(p.local_addr(), idle).await?;
    echo_exact(&conn, b"before").await?;

    p.blackhole(true);
    let data = payload(4096);
    let pending = {
        let (conn, data) = (conn.clone(), data.clone());
        tokio::spawn(async move { echo(&conn, &data).await })
    };
    // Nothing gets through while the hole is open: quinn's (re)transmissions
    // pile up as drops.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.stats().up.dropped.blackhole < 3 {
        assert!(
            Instant::now() < deadline,
            "no drops counted: {:?}",
            p.stats()
        );
        assert!(
            !pending.is_finished(),
            "an answer got through the blackhole"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !pending.is_finished(),
        "an answer got through the blackhole"
    );
    p.blackhole(false);
    let back = tokio::time::timeout(Duration::from_secs(20), pending).await???;
    assert_eq!(back, data);
    assert!(conn.close_reason().is_none());
    echo_exact(&conn, b"after").await?;
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplication_and_reordering_keep_transfers_exact() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let server = Server::start(IDLE)?;
    let messy = Impairment {
        duplicate: 0.2,
        reorder: 0.2,
        ..Impairment::default()
    };
    let p = path(server.addr()?, messy.clone(), messy, &shutdown).await?;
    let conn = server.connect(p.local_addr(), IDLE).await?;
    echo_exact(&conn, &payload(1 << 20)).await?;
    let s = p.stats();
    eprintln!("dup/reorder: {s:?}");
    assert!(s.up.duplicated > 0 && s.down.duplicated > 0, "{s:?}");
    assert!(s.up.reordered > 0 && s.down.reordered > 0, "{s:?}");
    assert!(
        s.down.forwarded > s.down.received - s.down.dropped.total(),
        "duplicates were not sent: {s:?}"
    );
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_cap_bounds_transfer_time_from_below() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let server = Server::start(IDLE)?;
    let rate = 8_000_000u64; // 1 MB/s
    let capped = Impairment {
        rate_bps: Some(rate),
        queue_bytes: 64 * 1024,
        ..Impairment::default()
    };
    let p = path(server.addr()?, Impairment::none(), capped, &shutdown).await?;
    let conn = server.connect(p.local_addr(), IDLE).await?;
    let size = 512 * 1024;
    let data = payload(size);
    let started = Instant::now();
    echo_exact(&conn, &data).await?;
    let elapsed = started.elapsed();
    let floor = Duration::from_secs_f64(size as f64 * 8.0 / rate as f64);
    eprintln!("rate cap: {size} B at {rate} bit/s took {elapsed:?} (floor {floor:?})");
    assert!(
        elapsed >= floor,
        "{size} B at {rate} bit/s took {elapsed:?} < {floor:?}"
    );
    assert!(p.stats().down.forwarded_bytes >= size as u64);
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtu_clamp_drops_big_datagrams_and_quic_still_works() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let server = Server::start(IDLE)?;
    let clamp = Impairment {
        mtu: Some(1280),
        ..Impairment::default()
    };
    let p = path(server.addr()?, clamp.clone(), clamp, &shutdown).await?;
    let conn = server.connect(p.local_addr(), IDLE).await?;
    echo_exact(&conn, &payload(256 * 1024)).await?;
    // quinn's path MTU discovery probes above 1280 and the relay drops them.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = p.stats();
        if s.up.dropped.mtu > 0 && s.down.dropped.mtu > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no MTU drops: {s:?}");
        echo_exact(&conn, b"poke").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mtu = conn.stats().path.current_mtu;
    let s = p.stats();
    eprintln!(
        "mtu: quinn current_mtu {mtu}; relay MTU drops up {} / down {}",
        s.up.dropped.mtu, s.down.dropped.mtu
    );
    assert!((1200..=1280).contains(&mtu), "quinn's MTU is {mtu}");
    echo_exact(&conn, &payload(64 * 1024)).await?;
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtu_clamp_counts_each_oversized_datagram() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let echo_srv = EchoServer::start("127.0.0.1:0".parse()?, shutdown.clone()).await?;
    let clamp = Impairment {
        mtu: Some(1280),
        ..Impairment::default()
    };
    let p = path(echo_srv.local_addr(), clamp, Impairment::none(), &shutdown).await?;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(p.local_addr()).await?;
    for _ in 0..3 {
        sock.send(&[1u8; 1281]).await?;
    }
    sock.send(&[2u8; 1280]).await?;
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf)).await??;
    assert_eq!(
        &buf[..n],
        &[2u8; 1280][..],
        "only the 1280-byte datagram comes back"
    );
    // The relay counts a datagram right after its send returns: poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.stats().down.forwarded < 1 {
        assert!(Instant::now() < deadline, "{:?}", p.stats());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = p.stats();
    assert_eq!(s.up.dropped.mtu, 3, "{s:?}");
    assert_eq!((s.up.forwarded, s.down.forwarded), (1, 1), "{s:?}");
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_keeps_clients_apart_and_expires_idle_ones() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let echo_srv = EchoServer::start("127.0.0.1:0".parse()?, shutdown.clone()).await?;
    let mut cfg = PathConfig::new("127.0.0.1:0".parse()?, echo_srv.local_addr());
    cfg.idle_timeout = Duration::from_millis(200);
    cfg.max_clients = 2;
    let p = wan::start(cfg, shutdown.clone()).await?;
    let mut socks = Vec::new();
    for _ in 0..3 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        s.connect(p.local_addr()).await?;
        socks.push(s);
    }
    for round in 0..3u8 {
        for (i, s) in socks[..2].iter().enumerate() {
            s.send(&[round, u8::try_from(i)?]).await?;
        }
        for (i, s) in socks[..2].iter().enumerate() {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), s.recv(&mut buf)).await??;
            assert_eq!(
                &buf[..n],
                &[round, u8::try_from(i)?],
                "client {i} got another's reply"
            );
        }
    }
    assert_eq!(p.stats().clients, 2);
    // A third client does not fit the table while both mappings are fresh.
    socks[2].send(b"late").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.stats().up.dropped.nat_full == 0 {
        assert!(
            Instant::now() < deadline,
            "third client not refused: {:?}",
            p.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Idle mappings expire, after which the third client gets in.
    while p.stats().clients > 0 {
        assert!(
            Instant::now() < deadline,
            "mappings never expired: {:?}",
            p.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    socks[2].send(b"now").await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), socks[2].recv(&mut buf)).await??;
    assert_eq!(&buf[..n], b"now");
    assert_eq!(p.stats().clients_created, 3);
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_rtt_is_never_below_the_configured_rtt() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let echo_srv = EchoServer::start("127.0.0.1:0".parse()?, shutdown.clone()).await?;
    let one_way = Duration::from_millis(10);
    let p = path(
        echo_srv.local_addr(),
        Impairment::delay(one_way),
        Impairment::delay(one_way),
        &shutdown,
    )
    .await?;
    let r = wan::measure_rtt(p.local_addr(), 20).await?;
    eprintln!("measured through 2x10 ms: {r}");
    assert_eq!(r.received, 20);
    assert!(r.min >= one_way * 2, "{r}");
    assert!(r.min <= r.p50 && r.p50 <= r.p99 && r.p99 <= r.max);
    // Live reconfiguration takes effect for the next datagrams.
    p.set(
        Impairment::delay(one_way * 3),
        Impairment::delay(one_way * 3),
    )?;
    let r = wan::measure_rtt(p.local_addr(), 5).await?;
    assert!(r.min >= one_way * 6, "after set(): {r}");
    shutdown.cancel();
    p.wait().await;
    Ok(())
}

/// The accuracy figure for the report: configured vs measured RTT at low
/// load. Run: `cargo test --release -p portico-loadtest --test wan -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints the accuracy table; takes ~30 s"]
async fn accuracy_report() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let echo_srv = EchoServer::start("127.0.0.1:0".parse()?, shutdown.clone()).await?;
    let direct = wan::measure_rtt(echo_srv.local_addr(), 200).await?;
    eprintln!("direct (no relay)       {direct}");
    for ms in [0u64, 1, 5, 20, 25, 50] {
        let one_way = Duration::from_millis(ms);
        let p = path(
            echo_srv.local_addr(),
            Impairment::delay(one_way),
            Impairment::delay(one_way),
            &shutdown,
        )
        .await?;
        let r = wan::measure_rtt(p.local_addr(), 200).await?;
        let err = |d: Duration| (d.as_secs_f64() - (one_way * 2).as_secs_f64()) * 1e3;
        eprintln!(
            "configured 2x{ms:>2} ms -> {r}; error min {:+.3} p50 {:+.3} p99 {:+.3} ms",
            err(r.min),
            err(r.p50),
            err(r.p99)
        );
        assert!(r.min >= one_way * 2);
        p.shutdown().await;
    }
    Ok(())
}

#[derive(Debug, clap::Parser)]
struct WanCli {
    #[command(flatten)]
    wan: wan::WanArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_measure_mode_runs_and_exits() -> anyhow::Result<()> {
    use clap::Parser as _;
    let cli =
        WanCli::try_parse_from(["wan", "--measure", "5", "--delay", "2ms", "--jitter", "1ms"])?;
    let shutdown = CancellationToken::new();
    tokio::time::timeout(Duration::from_secs(30), wan::run_cli(cli.wan, shutdown)).await??;
    // Without a target and without --measure the command refuses to run.
    assert!(WanCli::try_parse_from(["wan", "--delay", "2ms"]).is_err());
    Ok(())
}
