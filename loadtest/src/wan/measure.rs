//! RTT measurement through a path: a UDP echo server to put behind the relay
//! and a prober that times one echo at a time (low load), so a bench can say
//! "configured 2×20 ms → measured X ms".
//!
//! The prober runs on its own blocking thread with a blocking socket, so its
//! timestamps carry no tokio scheduling delay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::WanError;

const MAGIC: [u8; 4] = *b"WANp";
/// Bound on the samples one measurement keeps.
const MAX_SAMPLES: usize = 1_000_000;

/// Round-trip times measured through a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RttReport {
    /// Probes sent (the warm-up probe excluded).
    pub sent: usize,
    /// Probes answered in time.
    pub received: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl std::fmt::Display for RttReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "{}/{} echoed: min {:.3} ms, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, mean {:.3} ms",
            self.received,
            self.sent,
            ms(self.min),
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            ms(self.mean)
        )
    }
}

/// A UDP echo server (every datagram is sent back to its source).
#[derive(Debug)]
pub struct EchoServer {
    local_addr: SocketAddr,
    token: CancellationToken,
    tracker: TaskTracker,
}

impl EchoServer {
    /// Binds `bind` and echoes until `shutdown` is cancelled or this is dropped.
    pub async fn start(bind: SocketAddr, shutdown: CancellationToken) -> Result<Self, WanError> {
        let sock = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|source| WanError::Bind { addr: bind, source })?;
        let local_addr = sock.local_addr().map_err(|source| WanError::Socket {
            op: "local_addr",
            source,
        })?;
        let token = shutdown.child_token();
        let tracker = TaskTracker::new();
        let t = token.clone();
        tracker.spawn(
            async move {
                let mut buf = vec![0u8; 65_535];
                loop {
                    tokio::select! {
                        () = t.cancelled() => break,
                        r = sock.recv_from(&mut buf) => match r {
                            Ok((n, from)) => {
                                let _ = sock.send_to(&buf[..n], from).await;
                            }
                            Err(e) => tracing::trace!(error = %portico_agent::error_chain(&e), "echo: recv failed"),
                        },
                    }
                }
            }
            .instrument(tracing::debug_span!("wan_echo", addr = %local_addr)),
        );
        tracker.close();
        Ok(Self {
            local_addr,
            token,
            tracker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the server and waits for its task.
    pub async fn shutdown(self) {
        self.token.cancel();
        self.tracker.wait().await;
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// [`measure_rtt_with`] with a 2 s timeout per probe.
pub async fn measure_rtt(path_addr: SocketAddr, samples: usize) -> Result<RttReport, WanError> {
    measure_rtt_with(path_addr, samples, Duration::from_secs(2)).await
}

/// Sends `samples` probes to `path_addr` (a path whose target is an
/// [`EchoServer`]), one at a time, after one uncounted warm-up probe (which
/// creates the NAT mapping), and reports the round-trip times of those
/// answered within `timeout`.
pub async fn measure_rtt_with(
    path_addr: SocketAddr,
    samples: usize,
    timeout: Duration,
) -> Result<RttReport, WanError> {
    let samples = samples.clamp(1, MAX_SAMPLES);
    tokio::task::spawn_blocking(move || probe(path_addr, samples, timeout))
        .await
        .map_err(|e| WanError::Socket {
            op: "measure",
            source: std::io::Error::other(e),
        })?
}

fn probe(path: SocketAddr, samples: usize, timeout: Duration) -> Result<RttReport, WanError> {
    let io = |op| move |source| WanError::Socket { op, source };
    let bind = match path.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(ip) if ip.is_loopback() => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let sock =
        std::net::UdpSocket::bind(bind).map_err(|source| WanError::Bind { addr: bind, source })?;
    sock.connect(path).map_err(io("connect"))?;
    let mut rtts = Vec::with_capacity(samples);
    let mut buf = [0u8; 64];
    // Probe 0 is the warm-up.
    for seq in 0..=samples as u64 {
        let mut msg = [0u8; 12];
        msg[..4].copy_from_slice(&MAGIC);
        msg[4..].copy_from_slice(&seq.to_be_bytes());
        let sent = Instant::now();
        if sock.send(&msg).is_err() {
            continue;
        }
        let deadline = sent + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            sock.set_read_timeout(Some(deadline - now))
                .map_err(io("set_read_timeout"))?;
            match sock.recv(&mut buf) {
                Ok(12) if buf[..4] == MAGIC && buf[4..12] == seq.to_be_bytes() => {
                    if seq > 0 {
                        rtts.push(sent.elapsed());
                    }
                    break;
                }
                // A late echo of an earlier probe, or a duplicate: skip it.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                // ICMP port unreachable and the like: the probe is lost.
                Err(_) => break,
            }
        }
    }
    report(path, samples, rtts)
}

fn report(path: SocketAddr, sent: usize, mut rtts: Vec<Duration>) -> Result<RttReport, WanError> {
    if rtts.is_empty() {
        return Err(WanError::NoEcho { path, sent });
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        let i = ((rtts.len() as f64 * p).ceil() as usize).clamp(1, rtts.len()) - 1;
        rtts[i]
    };
    let total: Duration = rtts.iter().sum();
    Ok(RttReport {
        sent,
        received: rtts.len(),
        min: rtts[0],
        p50: pct(0.50),
        p99: pct(0.99),
        max: rtts[rtts.len() - 1],
        mean: total / u32::try_from(rtts.len()).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let rtts = (1..=100).map(Duration::from_millis).collect();
        let r = report("127.0.0.1:1".parse().unwrap(), 100, rtts).unwrap();
        assert_eq!(r.min, Duration::from_millis(1));
        assert_eq!(r.p50, Duration::from_millis(50));
        assert_eq!(r.p99, Duration::from_millis(99));
        assert_eq!(r.max, Duration::from_millis(100));
        assert!(report("127.0.0.1:1".parse().unwrap(), 3, Vec::new()).is_err());
    }
}
