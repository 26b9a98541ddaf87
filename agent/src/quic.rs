//! The QUIC endpoint of an edge or a connector: one UDP socket with large
//! buffers, whose release a `TaskTracker` can wait for.
//!
//! quinn drives each endpoint from a task of its own that keeps the socket
//! until some time after the last handle is dropped. Without help, a
//! component's `wait()` could return while its port is still bound, and an
//! immediate restart on the same port would fail with `AddrInUse`. Here the
//! socket and its pollers each hold a tracker token, dropped after the
//! socket itself, so `tracker.wait()` returns only once the port is free.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// The UDP buffer size asked of the kernel (capped by net.core.*mem_max).
/// The default 208 KiB lost packets at a few hundred concurrent streams.
pub const UDP_BUFFER: usize = 4 << 20;

/// The per-stream receive window of a tunnel: what one stream may hold
/// unread. 2 MiB in flight carries about 560 Mbit/s at the 30 ms round
/// trip of a connector to the edges of its nearest region (110 Mbit/s at
/// 150 ms). It is also what a response whose client stopped reading pins
/// at the edge until the stall check resets it, so it is kept moderate.
pub const TUNNEL_STREAM_WINDOW: u32 = 2 << 20;
/// The receive (and send) window of a whole tunnel at the connector, and
/// the least an edge uses: what one tunnel may buffer for all its streams
/// together. The edge sizes its own from its stall budget (twice what
/// stalled responses may pin), so they never take the window that the
/// tunnel's other streams share.
pub const TUNNEL_WINDOW: u32 = 64 << 20;
/// How many ack-eliciting packets a tunnel peer may receive before it must
/// acknowledge (the QUIC ACK frequency extension; the default acknowledges
/// every second packet). A small response is one packet, so without this
/// the side that receives responses sent an ACK-only datagram for about
/// every second request. The peer still acknowledges within its
/// `max_ack_delay`, and at once on reordering.
pub const TUNNEL_ACK_ELICITING_THRESHOLD: u32 = 8;

/// Body chunks shorter than this are copied before they go on a tunnel
/// stream; see [`detach_small`].
pub const DETACH_BELOW: usize = 16 << 10;

/// Returns a chunk that can wait in a QUIC send buffer without holding
/// memory beyond its own length.
///
/// hyper and h2 hand out body chunks cut from their connection's read
/// buffer (8 KiB or more). quinn keeps a chunk until the peer acknowledges
/// it, so a 100-byte chunk would hold that whole buffer for a round trip,
/// and hyper would allocate a new one for its next read (pinned and
/// regrown read buffers were 89 MiB of the connector's 147 MiB peak with
/// 2,000 slow streams; BENCHMARKS.md, "Tunnel scale"). Copying a short
/// chunk costs little and leaves the read buffer free for hyper to reuse; a
/// long chunk fills most of its buffer anyway and is passed on without a
/// copy.
pub fn detach_small(chunk: bytes::Bytes) -> bytes::Bytes {
    if chunk.len() < DETACH_BELOW {
        bytes::Bytes::copy_from_slice(&chunk)
    } else {
        chunk
    }
}

/// The transport settings of a tunnel, the same at both ends: windows,
/// liveness (`portico_proto::TUNNEL_KEEP_ALIVE` and `TUNNEL_IDLE_TIMEOUT`),
/// ACK frequency, and how many bidirectional streams the peer may open.
pub fn tunnel_transport(peer_bidi_streams: u32) -> quinn::TransportConfig {
    use quinn::VarInt;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(peer_bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(TUNNEL_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(TUNNEL_WINDOW));
    t.send_window(u64::from(TUNNEL_WINDOW));
    t.keep_alive_interval(Some(portico_proto::TUNNEL_KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(portico_proto::TUNNEL_IDLE_TIMEOUT)
            .expect("the tunnel idle timeout fits a QUIC varint"),
    ));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(TUNNEL_ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(ack));
    t
}

/// Binds a UDP socket on `addr` (dual-stack when `addr` is `[::]`) with
/// [`UDP_BUFFER`]-sized buffers and starts a quinn endpoint on it. The
/// endpoint's socket counts as a task of `tracker` until it is closed.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    tracker: &TaskTracker,
) -> io::Result<quinn::Endpoint> {
    endpoint_on(
        bind_udp(addr, false)?,
        quinn::EndpointConfig::default(),
        server,
        tracker,
    )
}

/// Binds a UDP socket on `addr` (dual-stack when `addr` is `[::]`) with
/// [`UDP_BUFFER`]-sized buffers, non-blocking, for [`endpoint_on`].
///
/// With `reuse_port`, the socket sets `SO_REUSEPORT` before it binds, so
/// that more sockets can bind the same address; [`bind_udp_group`] is the
/// way to bind such a group.
pub fn bind_udp(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Best effort: some hosts have IPv6 without dual-stack sockets.
        let _ = socket.set_only_v6(false);
    }
    for (what, r) in [
        ("receive", socket.set_recv_buffer_size(UDP_BUFFER)),
        ("send", socket.set_send_buffer_size(UDP_BUFFER)),
    ] {
        if let Err(e) = r {
            tracing::debug!(error = %crate::error::chain(&e), "cannot set the UDP {what} buffer");
        }
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds `n` UDP sockets on one address for the `n` shards of a QUIC
/// server, each to start an endpoint on with [`shard_endpoint_config`]:
/// socket `i` is shard `i`'s.
///
/// With more than one, they form a `SO_REUSEPORT` group, and a classic BPF
/// program on the group hands every datagram to the socket of the shard
/// whose connection it belongs to: by the first byte of its destination
/// connection ID, which [`ShardConnectionIds`] makes that shard's index
/// modulo `n`. So a connection stays on its shard when the peer's address
/// changes (NAT rebinding, migration), which the kernel's default hash of
/// the address would break, and a peer can choose the shard of a new
/// connection by the first byte of its Initial's connection ID
/// ([`initial_connection_id`]). A datagram too short to carry one goes to
/// shard 0.
///
/// Any socket of the same user could join a `SO_REUSEPORT` group, so a
/// second server on the port would start without error. The port is
/// therefore bound once without the option first, which fails with
/// `AddrInUse` when anything else holds it; for port 0 that picks a port
/// nothing holds (the kernel may give a `SO_REUSEPORT` socket a port of
/// another group of the same user).
pub fn bind_udp_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    if n <= 1 {
        return Ok(vec![bind_udp(addr, false)?]);
    }
    let shards = u32::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_STEERED_SHARDS)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_STEERED_SHARDS} shards can share a UDP port, not {n}"),
            )
        })?;
    // For port 0, another process may take the picked port before the
    // group binds it: pick again a few times.
    let mut attempts = if addr.port() == 0 { 3 } else { 1 };
    let first = loop {
        let port = bind_udp(addr, false)?.local_addr()?.port();
        match bind_udp(SocketAddr::new(addr.ip(), port), true) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts > 1 => attempts -= 1,
            other => break other?,
        }
    };
    steer_by_connection_id(&first, shards)?;
    let bound = first.local_addr()?;
    let mut sockets = Vec::with_capacity(n);
    sockets.push(first);
    for _ in 1..n {
        sockets.push(bind_udp(bound, true)?);
    }
    Ok(sockets)
}

/// The most shards [`bind_udp_group`] steers: one byte of a connection ID
/// must hold the shard's index at least once.
pub const MAX_STEERED_SHARDS: u32 = 256;

/// Attaches the group's steering program (see [`bind_udp_group`]). The
/// program sees the UDP payload: a QUIC long header (first bit set) has its
/// destination connection ID from byte 6 (flags, 4 bytes of version, the
/// ID's length), a short header from byte 1. The socket index it returns
/// is that byte modulo `shards`; a load past the end returns 0.
#[cfg(target_os = "linux")]
fn steer_by_connection_id(socket: &std::net::UdpSocket, shards: u32) -> io::Result<()> {
    use nix::libc::{
        sock_filter, sock_fprog, BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JMP, BPF_JSET, BPF_K,
        BPF_LD, BPF_MOD, BPF_RET,
    };
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut program = [
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),
        // Long header: the next instruction; short header: skip to 4.
        op(BPF_JMP | BPF_JSET | BPF_K, 0, 2, 0x80),
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 6),
        op(BPF_JMP | BPF_JA, 0, 0, 1),
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 1),
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, shards),
        op(BPF_RET | BPF_A, 0, 0, 0),
    ];
    let prog = sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &prog,
    )
    .map_err(io::Error::from)
}

/// Elsewhere the kernel's hash of the peer's address picks the socket.
#[cfg(not(target_os = "linux"))]
fn steer_by_connection_id(_socket: &std::net::UdpSocket, _shards: u32) -> io::Result<()> {
    Ok(())
}

/// The length of the connection IDs that [`ShardConnectionIds`] issues.
const SHARD_CID_LEN: usize = 8;

/// Connection IDs for shard `shard` of `shards` ([`bind_udp_group`]):
/// random, except that the first byte modulo `shards` is `shard`, so the
/// group's program hands the connection's datagrams to this shard's
/// socket. The first byte keeps `log2(256 / shards)` random bits and the
/// other seven bytes are random, from the system's CSPRNG.
#[derive(Debug, Clone, Copy)]
pub struct ShardConnectionIds {
    shard: u8,
    shards: u32,
}

impl ShardConnectionIds {
    /// IDs of shard `shard` (`< shards <=` [`MAX_STEERED_SHARDS`]).
    pub fn new(shard: usize, shards: usize) -> Self {
        assert!(shard < shards && shards as u32 <= MAX_STEERED_SHARDS);
        ShardConnectionIds {
            shard: shard as u8,
            shards: shards as u32,
        }
    }
}

impl quinn::ConnectionIdGenerator for ShardConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; SHARD_CID_LEN];
        random(&mut id);
        // 256 / shards values of the first byte have this remainder.
        let spread = 256 / self.shards;
        id[0] = ((u32::from(id[0]) % spread) * self.shards + u32::from(self.shard)) as u8;
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        SHARD_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The endpoint settings of shard `shard` of `shards` on a
/// [`bind_udp_group`]: its connection IDs steer to its socket. One shard
/// keeps quinn's defaults.
pub fn shard_endpoint_config(shard: usize, shards: usize) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    if shards > 1 {
        let ids = ShardConnectionIds::new(shard, shards);
        config.cid_generator(move || Box::new(ids));
    }
    config
}

/// The destination connection ID of a client's first Initial, for a
/// server whose shards share a port ([`bind_udp_group`]): `first_byte`,
/// then 19 random bytes from the system's CSPRNG (RFC 9000 §7.2 asks for
/// at least 8 unpredictable bytes). The server's shard `first_byte %
/// shards` takes the connection; a server without shards ignores it.
pub fn initial_connection_id(first_byte: u8) -> quinn::ConnectionId {
    let mut id = [0u8; 20];
    random(&mut id[1..]);
    id[0] = first_byte;
    quinn::ConnectionId::new(&id)
}

fn random(bytes: &mut [u8]) {
    use ring::rand::SecureRandom;
    // The system's generator fails only where nothing else would work.
    ring::rand::SystemRandom::new()
        .fill(bytes)
        .expect("the system random generator works");
}

/// Starts a quinn endpoint with `config` on a socket from [`bind_udp`] or
/// [`bind_udp_group`]. The endpoint and its connections are driven by tasks
/// of the runtime this is called on; the socket counts as a task of
/// `tracker` until it is closed.
pub fn endpoint_on(
    socket: std::net::UdpSocket,
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    tracker: &TaskTracker,
) -> io::Result<quinn::Endpoint> {
    let runtime: Arc<dyn Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let tracked = Arc::new(Tracked {
        inner,
        _token: tracker.token(),
    });
    quinn::Endpoint::new_with_abstract_socket(config, server, tracked, runtime)
}

/// A socket that holds a tracker token. Fields drop in order: the socket
/// first, then the token.
struct Tracked {
    inner: Arc<dyn AsyncUdpSocket>,
    _token: TaskTrackerToken,
}

impl fmt::Debug for Tracked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl AsyncUdpSocket for Tracked {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(TrackedPoller {
            inner: self.inner.clone().create_io_poller(),
            _token: self._token.clone(),
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A write-readiness poller that holds a tracker token too: it keeps the
/// socket alive as long as the socket handle does.
struct TrackedPoller {
    inner: Pin<Box<dyn UdpPoller>>,
    _token: TaskTrackerToken,
}

impl fmt::Debug for TrackedPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl UdpPoller for TrackedPoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner.as_mut().poll_writable(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which socket of `group` gets `datagram` from `client`.
    fn receiver(
        group: &[std::net::UdpSocket],
        client: &std::net::UdpSocket,
        datagram: &[u8],
    ) -> usize {
        client
            .send_to(datagram, group[0].local_addr().unwrap())
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut buf = [0u8; 64];
        loop {
            for (i, socket) in group.iter().enumerate() {
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    assert_eq!(&buf[..n], datagram);
                    return i;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no socket got it");
            std::thread::yield_now();
        }
    }

    /// The group's program steers by the first byte of the destination
    /// connection ID of either header form, not by the sender: one client
    /// socket reaches every shard; a datagram too short goes to shard 0.
    #[test]
    fn a_socket_group_steers_datagrams_by_connection_id() {
        let group = bind_udp_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert!(group.iter().all(|s| s.local_addr().unwrap().port() == port));
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for first in [0u8, 1, 2, 3, 4, 5, 127, 128, 254, 255] {
            // Short header: flags, then the ID.
            let short = [0x40, first, 9, 9, 9, 9, 9, 9, 9, 0xaa];
            assert_eq!(receiver(&group, &client, &short), usize::from(first) % 3);
            // Long header: flags, version, the ID's length, the ID.
            let long = [0xc0, 0, 0, 0, 1, 8, first, 7, 7, 7, 7, 7, 7, 7];
            assert_eq!(receiver(&group, &client, &long), usize::from(first) % 3);
        }
        assert_eq!(receiver(&group, &client, &[0xc0, 0, 0]), 0);
    }

    /// A port something else holds is refused as before, though the group
    /// itself shares its port; so is a second group on the same port.
    #[test]
    fn a_socket_group_refuses_a_port_in_use() {
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken = other.local_addr().unwrap();
        let e = bind_udp_group(taken, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);

        let group = bind_udp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let e = bind_udp_group(group[0].local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            bind_udp_group(taken, 1).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
    }

    /// A shard's connection IDs steer to it: the first byte modulo the
    /// shards is the shard's index, and the IDs are random otherwise.
    #[test]
    fn shard_connection_ids_carry_their_shard() {
        use quinn::ConnectionIdGenerator;
        for shards in [2usize, 3, 7, 256] {
            for shard in [0, 1, shards - 1] {
                let mut ids = ShardConnectionIds::new(shard, shards);
                let made: std::collections::HashSet<Vec<u8>> = (0..200)
                    .map(|_| {
                        let id = ids.generate_cid();
                        assert_eq!(id.len(), ids.cid_len());
                        assert_eq!(usize::from(id[0]) % shards, shard);
                        id.to_vec()
                    })
                    .collect();
                assert_eq!(made.len(), 200, "IDs repeat");
            }
        }
        let first = initial_connection_id(5);
        assert_eq!((first.len(), first[0]), (20, 5));
        assert_ne!(initial_connection_id(5), first);
        assert!(bind_udp_group("127.0.0.1:0".parse().unwrap(), 257).is_err());
    }

    /// Once the tracker is done, the port can be bound again at once.
    #[tokio::test]
    async fn the_tracker_waits_for_the_socket_to_close() {
        let tracker = TaskTracker::new();
        let endpoint = bind_endpoint("127.0.0.1:0".parse().unwrap(), None, &tracker).unwrap();
        let addr = endpoint.local_addr().unwrap();
        tracker.close();
        assert!(!tracker.is_empty(), "the live socket counts as a task");
        endpoint.close(0u32.into(), b"");
        endpoint.wait_idle().await;
        drop(endpoint);
        tracker.wait().await;
        std::net::UdpSocket::bind(addr).expect("the port is free once the tracker is done");
    }

    /// A short chunk is copied, so the read buffer it was cut from is
    /// reused in place by the next read (as `BytesMut::reserve` documents
    /// for a buffer it alone holds); a chunk that is still shared forces a
    /// new allocation, which is what held memory before. A long chunk is
    /// passed on as it is.
    #[test]
    fn detach_small_frees_the_read_buffer_a_short_chunk_came_from() {
        use bytes::BytesMut;
        let read_buffer = |held: &mut Vec<bytes::Bytes>, detach: bool| {
            let mut buf = BytesMut::with_capacity(8192);
            let base = buf.as_ptr();
            buf.extend_from_slice(&[7; 200]);
            let chunk = buf.split_to(100).freeze();
            held.push(if detach { detach_small(chunk) } else { chunk });
            buf.reserve(8000);
            buf.as_ptr() == base
        };
        let mut held = Vec::new();
        assert!(
            read_buffer(&mut held, true),
            "a detached chunk leaves the buffer free"
        );
        assert!(
            !read_buffer(&mut held, false),
            "a held chunk pins the buffer"
        );
        assert!(held.iter().all(|c| c[..] == [7; 100]));

        let long = bytes::Bytes::from(vec![1; DETACH_BELOW]);
        let ptr = long.as_ptr();
        assert_eq!(
            detach_small(long).as_ptr(),
            ptr,
            "long chunks are not copied"
        );
    }

    /// Both ends of a tunnel ask each other for the ACK frequency of
    /// [`tunnel_transport`]: the extension is negotiated (each side sent an
    /// ACK_FREQUENCY frame, which quinn only does once the peer advertised
    /// support), and requests and answers still flow.
    #[tokio::test]
    async fn tunnel_transport_negotiates_ack_frequency() {
        use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
        let tracker = TaskTracker::new();
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = key.cert.der().clone();
        let private =
            rustls::pki_types::PrivateKeyDer::try_from(key.signing_key.serialize_der()).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::pki::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], private)
            .unwrap();
        tls.alpn_protocols = vec![b"t".to_vec()];
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
        server.transport_config(Arc::new(tunnel_transport(64)));
        let server = bind_endpoint("127.0.0.1:0".parse().unwrap(), Some(server), &tracker).unwrap();
        let addr = server.local_addr().unwrap();

        let mut tls = rustls::ClientConfig::builder_with_provider(crate::pki::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(crate::pki::insecure_verifier())
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"t".to_vec()];
        let mut client_cfg =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        client_cfg.transport_config(Arc::new(tunnel_transport(64)));
        let client = bind_endpoint("127.0.0.1:0".parse().unwrap(), None, &tracker).unwrap();

        let echo = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let got = recv.read_to_end(1024).await.unwrap();
                send.write_all(&got).await.unwrap();
                send.finish().unwrap();
            }
            (conn.stats(), server)
        });
        let conn = client
            .connect_with(client_cfg, addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        for i in 0..50u32 {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&i.to_be_bytes()).await.unwrap();
            send.finish().unwrap();
            assert_eq!(recv.read_to_end(1024).await.unwrap(), i.to_be_bytes());
        }
        let client_stats = conn.stats();
        conn.close(0u32.into(), b"done");
        let (server_stats, server) = echo.await.unwrap();
        assert!(
            client_stats.frame_tx.ack_frequency >= 1,
            "the client asked for fewer ACKs: {:?}",
            client_stats.frame_tx
        );
        assert!(
            server_stats.frame_tx.ack_frequency >= 1,
            "the server asked for fewer ACKs: {:?}",
            server_stats.frame_tx
        );
        client.close(0u32.into(), b"");
        server.close(0u32.into(), b"");
    }
}
