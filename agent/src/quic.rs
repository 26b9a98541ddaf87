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
    endpoint_on(bind_udp(addr, false)?, server, tracker)
}

/// Binds a UDP socket on `addr` (dual-stack when `addr` is `[::]`) with
/// [`UDP_BUFFER`]-sized buffers, non-blocking, for [`endpoint_on`].
///
/// With `reuse_port`, the socket sets `SO_REUSEPORT` before it binds, so
/// that more sockets of this process can bind the same address: Linux
/// then hands each peer's datagrams (by a hash of its address and port) to
/// one of them, always the same while the set of sockets stays the same.
/// Only sockets of the same effective user may join the group.
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

/// Starts a quinn endpoint on a socket from [`bind_udp`]. The endpoint and
/// its connections are driven by tasks of the runtime this is called on;
/// the socket counts as a task of `tracker` until it is closed.
pub fn endpoint_on(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    tracker: &TaskTracker,
) -> io::Result<quinn::Endpoint> {
    let runtime: Arc<dyn Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let tracked = Arc::new(Tracked {
        inner,
        _token: tracker.token(),
    });
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        tracked,
        runtime,
    )
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
