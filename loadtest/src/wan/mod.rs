//! The WAN emulator: a UDP relay that stands between QUIC peers (connectors
//! and edges) and adds per-path one-way delay, jitter, loss, reordering,
//! duplication, a bandwidth cap, MTU clamping and blackholes. These machines
//! have no `tc netem`; this is how one machine stands in for three
//! continents.
//!
//! A [`Path`] listens on one address and relays to one target. It behaves
//! like a NAT: each client source address gets its own upstream socket, so
//! replies reach the right client, and idle mappings expire (the table is
//! bounded). Received datagrams go through a [`Shaper`](impair) per
//! direction and are queued by due time; one OS thread per path sends them
//! when due, sleeping until just before and then spinning, so the delay a
//! datagram sees is within tens of microseconds of what was configured
//! rather than tokio's 1 ms timer granularity. Memory is bounded: the
//! bottleneck queue by `queue_bytes`, everything in flight by
//! 65,536 datagrams and 64 MiB per path.
//!
//! It does not emulate a path's own packet corruption or the kernel's ICMP
//! (a datagram above the MTU is silently dropped, like a black-holed PMTU).

mod cli;
mod deliver;
mod error;
mod impair;
mod measure;
mod stats;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use cli::{parse_bytes, parse_rate, parse_ratio, run_cli, WanArgs};
pub use error::WanError;
pub use impair::{Impairment, DEFAULT_QUEUE_BYTES};
pub use measure::{measure_rtt, measure_rtt_with, EchoServer, RttReport};
pub use stats::{DirStats, DropCounts, PathStats};

use deliver::{Dest, Scheduler};
use impair::{DropReason, Shaper, Verdict};
use stats::DirCounters;

/// Kernel socket buffers asked for on every relay socket (capped by
/// `net.core.rmem_max`/`wmem_max`), so the relay itself does not lose bursts.
const SOCKET_BUFFER: usize = 4 << 20;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// One path: where the relay listens, where it relays to, and the
/// impairments of each direction.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// Address clients send to (port 0 picks one; see [`Path::local_addr`]).
    pub listen: SocketAddr,
    /// Where datagrams go (an edge's QUIC port, say).
    pub target: SocketAddr,
    /// Client → target.
    pub up: Impairment,
    /// Target → client.
    pub down: Impairment,
    /// A client mapping with no traffic either way for this long is removed.
    pub idle_timeout: Duration,
    /// At most this many client mappings; a new client beyond it is dropped.
    pub max_clients: usize,
    /// Seed for the loss/jitter/reorder/duplicate RNG (random if `None`).
    pub seed: Option<u64>,
}

impl PathConfig {
    /// A transparent path with default NAT limits (60 s idle, 1024 clients).
    pub fn new(listen: SocketAddr, target: SocketAddr) -> Self {
        Self {
            listen,
            target,
            up: Impairment::none(),
            down: Impairment::none(),
            idle_timeout: Duration::from_secs(60),
            max_clients: 1024,
            seed: None,
        }
    }

    /// The same impairment both ways.
    pub fn symmetric(mut self, imp: Impairment) -> Self {
        self.up = imp.clone();
        self.down = imp;
        self
    }
}

/// A running path. Dropping it stops it (as does cancelling the token given
/// to [`start`]).
#[derive(Debug)]
pub struct Path {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    token: CancellationToken,
    tracker: TaskTracker,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Client {
    sock: Arc<std::net::UdpSocket>,
    /// Milliseconds since `Shared::epoch`.
    last_seen: AtomicU64,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    epoch: Instant,
    up: Mutex<Shaper>,
    down: Mutex<Shaper>,
    up_stats: DirCounters,
    down_stats: DirCounters,
    blackhole: AtomicBool,
    sched: Scheduler,
    clients: Mutex<HashMap<SocketAddr, Arc<Client>>>,
    clients_created: AtomicU64,
    idle_timeout: Duration,
    max_clients: usize,
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    Up,
    Down,
}

impl Shared {
    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn counters(&self, dir: Dir) -> &DirCounters {
        match dir {
            Dir::Up => &self.up_stats,
            Dir::Down => &self.down_stats,
        }
    }

    /// Runs one received datagram through the direction's shaper and queues it.
    fn ingress(&self, dir: Dir, now: Instant, data: &[u8], dest: Dest) {
        let counters = self.counters(dir);
        counters.received();
        if self.blackhole.load(Relaxed) {
            counters.dropped(DropReason::Blackhole);
            return;
        }
        let shaper = match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        };
        let verdict = lock(shaper).admit(now, data.len());
        match verdict {
            Verdict::Drop(reason) => counters.dropped(reason),
            Verdict::Deliver {
                due,
                duplicate,
                reordered,
            } => {
                if reordered {
                    counters.reordered();
                }
                if duplicate {
                    if self.sched.push(due, dest.clone(), data.into()) {
                        counters.duplicated();
                    } else {
                        counters.dropped(DropReason::Overflow);
                    }
                }
                if !self.sched.push(due, dest, data.into()) {
                    counters.dropped(DropReason::Overflow);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds a non-blocking UDP socket with large kernel buffers.
fn udp_socket(bind: SocketAddr) -> Result<std::net::UdpSocket, WanError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| WanError::Bind { addr: bind, source };
    let sock = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    // Best effort: the kernel caps these at rmem_max/wmem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.set_nonblocking(true).map_err(bind_err)?;
    sock.bind(&bind.into()).map_err(bind_err)?;
    Ok(sock.into())
}

/// The local address an upstream socket binds to: loopback for a loopback
/// target (nothing listens beyond it), otherwise the unspecified address.
fn upstream_bind(target: SocketAddr) -> SocketAddr {
    let ip = match (target.ip(), target.ip().is_loopback()) {
        (IpAddr::V4(_), true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (IpAddr::V6(_), true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        (IpAddr::V4(_), false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (IpAddr::V6(_), false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Starts a path: binds `cfg.listen`, spawns the relay tasks and the delivery
/// thread. Everything stops when `shutdown` is cancelled or the [`Path`] is
/// dropped.
pub async fn start(cfg: PathConfig, shutdown: CancellationToken) -> Result<Path, WanError> {
    cfg.up.validate()?;
    cfg.down.validate()?;
    let listen_std = udp_socket(cfg.listen)?;
    let local_addr = listen_std.local_addr().map_err(|source| WanError::Socket {
        op: "local_addr",
        source,
    })?;
    let send_std = listen_std.try_clone().map_err(|source| WanError::Socket {
        op: "clone",
        source,
    })?;
    let listen =
        tokio::net::UdpSocket::from_std(listen_std).map_err(|source| WanError::Socket {
            op: "register",
            source,
        })?;
    let seed = cfg.seed.unwrap_or_else(|| fastrand::u64(..));
    let shared = Arc::new(Shared {
        target: cfg.target,
        epoch: Instant::now(),
        up: Mutex::new(Shaper::new(cfg.up, seed)),
        down: Mutex::new(Shaper::new(cfg.down, seed ^ 0x9e37_79b9_7f4a_7c15)),
        up_stats: DirCounters::default(),
        down_stats: DirCounters::default(),
        blackhole: AtomicBool::new(false),
        sched: Scheduler::default(),
        clients: Mutex::new(HashMap::new()),
        clients_created: AtomicU64::new(0),
        idle_timeout: cfg.idle_timeout.max(Duration::from_millis(10)),
        max_clients: cfg.max_clients.max(1),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("wan-deliver".into())
            .spawn(move || {
                shared
                    .sched
                    .run(&send_std, &shared.up_stats, &shared.down_stats)
            })
            .map_err(|source| WanError::Thread { source })?
    };
    let token = shutdown.child_token();
    let tracker = TaskTracker::new();
    let span = tracing::info_span!("wan", listen = %local_addr, target = %cfg.target);
    {
        let (shared, token) = (shared.clone(), token.clone());
        tracker.spawn(
            async move {
                token.cancelled().await;
                shared.sched.stop();
                for (_, c) in lock(&shared.clients).drain() {
                    c.cancel.cancel();
                }
            }
            .instrument(span.clone()),
        );
    }
    tracker.spawn(sweep(shared.clone(), token.clone()).instrument(span.clone()));
    tracker.spawn(
        upstream(shared.clone(), listen, token.clone(), tracker.clone()).instrument(span.clone()),
    );
    tracing::info!(parent: &span, "wan path listening");
    Ok(Path {
        shared,
        local_addr,
        token,
        tracker,
        thread: Some(thread),
    })
}

/// Receives from clients on the listening socket (client → target).
async fn upstream(
    shared: Arc<Shared>,
    listen: tokio::net::UdpSocket,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    let listen = Arc::new(listen);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = tokio::select! {
            () = token.cancelled() => break,
            r = listen.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::trace!(error = %portico_agent::error_chain(&e), "wan: recv from client failed");
                    continue;
                }
            },
        };
        let now = Instant::now();
        let client = match client_for(&shared, from, &token, &tracker) {
            Some(c) => c,
            None => {
                shared.up_stats.received();
                shared.up_stats.dropped(DropReason::NatFull);
                continue;
            }
        };
        client.last_seen.store(shared.millis(now), Relaxed);
        shared.ingress(Dir::Up, now, &buf[..n], Dest::Up(client.sock.clone()));
    }
}

/// Finds or creates the mapping of client `from`: its own connected socket
/// to the target and a task relaying the target's replies back.
fn client_for(
    shared: &Arc<Shared>,
    from: SocketAddr,
    token: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<Arc<Client>> {
    let mut clients = lock(&shared.clients);
    if let Some(c) = clients.get(&from) {
        return Some(c.clone());
    }
    if clients.len() >= shared.max_clients {
        return None;
    }
    let make = || -> Result<(std::net::UdpSocket, tokio::net::UdpSocket), std::io::Error> {
        let sock = udp_socket(upstream_bind(shared.target)).map_err(std::io::Error::other)?;
        sock.connect(shared.target)?;
        let recv = tokio::net::UdpSocket::from_std(sock.try_clone()?)?;
        Ok((sock, recv))
    };
    let (send, recv) = match make() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %from, error = %portico_agent::error_chain(&e), "wan: cannot open upstream socket");
            return None;
        }
    };
    let client = Arc::new(Client {
        sock: Arc::new(send),
        last_seen: AtomicU64::new(shared.millis(Instant::now())),
        cancel: token.child_token(),
    });
    clients.insert(from, client.clone());
    shared.clients_created.fetch_add(1, Relaxed);
    tracing::debug!(client = %from, "wan: new client mapping");
    tracker.spawn(
        downstream(shared.clone(), from, recv, client.clone())
            .instrument(tracing::debug_span!("wan_client", client = %from)),
    );
    Some(client)
}

/// Receives the target's replies for one client (target → client).
async fn downstream(
    shared: Arc<Shared>,
    to: SocketAddr,
    sock: tokio::net::UdpSocket,
    client: Arc<Client>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = tokio::select! {
            () = client.cancel.cancelled() => break,
            r = sock.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors (the target is not listening) surface here.
                    tracing::trace!(error = %portico_agent::error_chain(&e), "wan: recv from target failed");
                    tokio::task::yield_now().await;
                    continue;
                }
            },
        };
        let now = Instant::now();
        client.last_seen.store(shared.millis(now), Relaxed);
        shared.ingress(Dir::Down, now, &buf[..n], Dest::Down(to));
    }
}

/// Removes client mappings idle for longer than the idle timeout.
async fn sweep(shared: Arc<Shared>, token: CancellationToken) {
    let period = (shared.idle_timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = shared.millis(Instant::now());
        let idle = u64::try_from(shared.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        lock(&shared.clients).retain(|addr, c| {
            let keep = now.saturating_sub(c.last_seen.load(Relaxed)) < idle;
            if !keep {
                tracing::debug!(client = %addr, "wan: client mapping expired");
                c.cancel.cancel();
            }
            keep
        });
    }
}

impl Path {
    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the path relays to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Replaces both directions' impairments, live. Datagrams already
    /// scheduled keep their due times.
    pub fn set(&self, up: Impairment, down: Impairment) -> Result<(), WanError> {
        up.validate()?;
        down.validate()?;
        lock(&self.shared.up).set(up);
        lock(&self.shared.down).set(down);
        Ok(())
    }

    /// The impairments in force (up, down).
    pub fn impairments(&self) -> (Impairment, Impairment) {
        (
            lock(&self.shared.up).impairment().clone(),
            lock(&self.shared.down).impairment().clone(),
        )
    }

    /// Drops everything both ways while `on` (chaos: a cut link).
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Relaxed);
        tracing::info!(listen = %self.local_addr, on, "wan: blackhole");
    }

    /// Whether the path is blackholed.
    pub fn is_blackholed(&self) -> bool {
        self.shared.blackhole.load(Relaxed)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PathStats {
        PathStats {
            up: self.shared.up_stats.snapshot(),
            down: self.shared.down_stats.snapshot(),
            clients: lock(&self.shared.clients).len() as u64,
            clients_created: self.shared.clients_created.load(Relaxed),
        }
    }

    /// Waits until the path has been shut down (the token given to [`start`]
    /// cancelled) and all its tasks and its delivery thread have ended.
    pub async fn wait(mut self) {
        self.token.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
        self.shared.sched.stop();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Stops the path and waits for it (same as cancelling its token, then
    /// [`Path::wait`]).
    pub async fn shutdown(self) {
        self.token.cancel();
        self.wait().await;
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        self.token.cancel();
        self.shared.sched.stop();
    }
}
