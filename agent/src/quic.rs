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

/// Binds a UDP socket on `addr` (dual-stack when `addr` is `[::]`) with
/// [`UDP_BUFFER`]-sized buffers and starts a quinn endpoint on it. The
/// endpoint's socket counts as a task of `tracker` until it is closed.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    tracker: &TaskTracker,
) -> io::Result<quinn::Endpoint> {
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
            tracing::debug!(error = %e, "cannot set the UDP {what} buffer");
        }
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    let runtime: Arc<dyn Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket.into())?;
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
}
