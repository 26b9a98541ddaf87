//! The edge's settings: a plain struct with defaults and `validate()`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::error::Error;
use crate::tunnel_acceptor::TunnelPolicy;
use portico_proto::control::liveness::{LivenessConfig, SUSPECT_CEILING};
use portico_proto::EdgeId;

/// Everything `start` needs. Build it with [`Config::new`] and adjust fields.
#[derive(Clone)]
pub struct Config {
    /// The router's base URL, for example `https://router.example.com:7443`.
    pub router_url: String,
    /// A join token for the first start; later starts reuse the state dir.
    pub token: Option<String>,
    /// Where credentials and the last config snapshot live.
    pub state_dir: PathBuf,
    /// The region this edge runs in, when the operator says so. The edge's
    /// region is the one its join token enrolled it in: on the first start
    /// the router refuses a token of another region before using it, and a
    /// later start whose saved identity names another region stops. `None`:
    /// whatever the token says.
    pub region: Option<portico_proto::RegionId>,
    /// TCP address of the public HTTPS listener (HTTP/1.1 and HTTP/2).
    /// With [`Config::http3`], HTTP/3 is served on UDP at the same port.
    pub public_listen: SocketAddr,
    /// Serve HTTP/3 on UDP at the public port, advertised with `Alt-Svc`.
    pub http3: bool,
    /// UDP address of the QUIC tunnel listener.
    pub tunnel_listen: SocketAddr,
    /// UDP address of the mesh listener, where other edges forward requests
    /// (edge certificates only); `None`: this edge forwards to others but
    /// takes no forwarded requests.
    pub mesh_listen: Option<SocketAddr>,
    /// Single-thread runtimes that serve users and tunnels: the one
    /// `start` runs on, and `shards - 1` threads of their own, each with a
    /// socket in an `SO_REUSEPORT` group on the tunnel port (see
    /// ARCHITECTURE.md, "Shards"). The `portico edge` command runs one
    /// per core; 1 here.
    pub shards: std::num::NonZeroUsize,
    /// Plain HTTP address for `/metrics`, `/healthz` and `/ready`.
    pub metrics_listen: Option<SocketAddr>,
    /// An operator certificate chain and key (PEM files). `None`: a wildcard
    /// certificate for the apps domain, issued by the router's CA.
    pub public_cert: Option<(PathBuf, PathBuf)>,
    /// `host:port` connectors dial; defaults to the bound tunnel address.
    pub advertise_tunnel_addr: Option<String>,
    /// `host:port` users reach; defaults to the bound public address.
    pub advertise_public_addr: Option<String>,
    /// `host:port` other edges dial for mesh links; defaults to the bound
    /// mesh address.
    pub advertise_mesh_addr: Option<String>,
    /// Addresses this edge dials for some peers' mesh links instead of the
    /// one each peer advertises (in-process only: `portico loadtest
    /// deploy` puts a WAN relay per pair of regions this way). Empty by
    /// default.
    pub mesh_dial_overrides: MeshDialOverrides,
    /// After SIGTERM: how long the edge keeps accepting users once it has
    /// told the router it is draining (which takes it out of the DNS
    /// answers at once). Resolvers may keep the old answer for the edge
    /// records' TTL (30 s), so the default is that plus 5 s.
    pub drain_delay: Duration,
    /// After the drain delay: how long requests in flight may run on
    /// before what is left is cut.
    pub grace: Duration,
    /// Extra wait beyond an app's backend timeout before `ConnectorTimeout`.
    pub connector_timeout_grace: Duration,
    /// Write one access-log line per request (target `portico::access`):
    /// method, host, path, status, error code, bytes, duration, client,
    /// request id. Metrics count every request either way.
    pub access_log: bool,
    /// A user connection's TLS handshake, and each request head from its
    /// first byte (on HTTP/1.1, the first head from the connection's
    /// start), must arrive within this.
    pub header_read_timeout: Duration,
    /// How long an HTTP/1.1 keep-alive connection may wait for its next
    /// request.
    pub keepalive_idle_timeout: Duration,
    /// How long an HTTP/2 connection with no open stream is kept (then it
    /// gets a GOAWAY).
    pub h2_idle_timeout: Duration,
    /// How often an HTTP/2 PING checks that the client is still there.
    pub h2_keepalive_interval: Duration,
    /// How long the client has to answer that PING.
    pub h2_keepalive_timeout: Duration,
    /// Streams one HTTP/2 (or HTTP/3) connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// User connections (TCP and QUIC) the edge holds at once; `None`:
    /// the open-file soft limit less a reserve of 1,024 (at least 64).
    pub max_connections: Option<usize>,
    /// User connections one client address (an IPv6 /64) holds at once;
    /// `None`: a tenth of `max_connections` (at least 16).
    pub max_connections_per_client: Option<usize>,
    /// Requests one client may cancel before their response (HTTP/2
    /// resets, closed connections) in a burst; past it, at
    /// `client_reset_rate` per second, its connections are closed.
    pub client_reset_burst: u32,
    /// The rate, per second, a client's cancel budget refills at.
    pub client_reset_rate: u32,
    /// A response whose client reads nothing for this long is reset.
    pub stall_timeout: Duration,
    /// Stalled responses (parked over a second) the edge holds at once;
    /// one more is reset at once. Sizes the tunnels' receive window.
    pub max_stalled_streams: u32,
    /// Stalled responses one client holds at once; one more is reset.
    pub max_stalled_per_client: u32,
    /// Tunnels one connector may hold to this edge at once (those still in
    /// their handshake included); one more is refused at `Hello` with
    /// `TooManyTunnels`.
    pub max_tunnels_per_connector: usize,
    /// How often the edge pings each tunnel on its control stream.
    pub tunnel_ping_interval: Duration,
    /// A tunnel whose connector leaves a ping unanswered this long is
    /// closed, so that requests in flight on it fail (and are retried where
    /// that is safe) instead of waiting for QUIC's idle timeout. Past its
    /// RTT-based deadline (at most 1 s) it is already out of the pick set.
    pub tunnel_dead_after: Duration,
}

/// Bounds of [`Config::tunnel_ping_interval`].
const PING_INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(10);
/// The default drain delay: the TTL of the edge records in the router's
/// DNS answers (30 s), plus 5 s for resolvers and load balancers to move.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(35);
/// The longest [`Config::tunnel_dead_after`].
const DEAD_AFTER_MAX: Duration = Duration::from_secs(60);
/// The most [`Config::max_tunnels_per_connector`] (a connector keeps at
/// most 64 tunnels in all).
const TUNNELS_PER_CONNECTOR_MAX: usize = 1024;

impl Config {
    /// A config with the default listen addresses and periods.
    pub fn new(router_url: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Config {
            router_url: router_url.into(),
            token: None,
            state_dir: state_dir.into(),
            region: None,
            public_listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            http3: true,
            tunnel_listen: SocketAddr::from(([0, 0, 0, 0], 7844)),
            mesh_listen: None,
            shards: std::num::NonZeroUsize::MIN,
            metrics_listen: None,
            public_cert: None,
            advertise_tunnel_addr: None,
            advertise_public_addr: None,
            advertise_mesh_addr: None,
            mesh_dial_overrides: MeshDialOverrides::default(),
            drain_delay: DEFAULT_DRAIN_DELAY,
            grace: Duration::from_secs(30),
            connector_timeout_grace: Duration::from_secs(5),
            access_log: true,
            header_read_timeout: Duration::from_secs(10),
            keepalive_idle_timeout: Duration::from_secs(60),
            h2_idle_timeout: Duration::from_secs(120),
            h2_keepalive_interval: Duration::from_secs(20),
            h2_keepalive_timeout: Duration::from_secs(20),
            h2_max_concurrent_streams: 128,
            max_connections: None,
            max_connections_per_client: None,
            client_reset_burst: 200,
            client_reset_rate: 20,
            stall_timeout: Duration::from_secs(30),
            max_stalled_streams: 64,
            max_stalled_per_client: 8,
            max_tunnels_per_connector: 16,
            tunnel_ping_interval: LivenessConfig::DEFAULT.interval,
            tunnel_dead_after: LivenessConfig::DEFAULT.dead_after,
        }
    }

    /// What the tunnel acceptor enforces.
    pub(crate) fn tunnel_policy(&self) -> TunnelPolicy {
        TunnelPolicy {
            max_per_connector: self.max_tunnels_per_connector,
            liveness: LivenessConfig {
                interval: self.tunnel_ping_interval,
                dead_after: self.tunnel_dead_after,
            },
        }
    }

    /// The limits on users' connections this config sets.
    pub(crate) fn user_limits(&self) -> crate::UserLimits {
        crate::UserLimits {
            clients: crate::clients::ClientLimits {
                max_connections: self.effective_max_connections(),
                max_connections_per_client: self.effective_max_connections_per_client(),
                reset_burst: self.client_reset_burst,
                reset_rate: self.client_reset_rate,
                max_stalled_per_client: self.max_stalled_per_client,
            },
            timeouts: crate::client_conn::ConnTimeouts {
                header_read: self.header_read_timeout,
                keepalive_idle: self.keepalive_idle_timeout,
                h2_idle: self.h2_idle_timeout,
            },
            h2: crate::listener::H2Limits {
                max_concurrent_streams: self.h2_max_concurrent_streams,
                keepalive_interval: self.h2_keepalive_interval,
                keepalive_timeout: self.h2_keepalive_timeout,
                max_pending_accept_resets: 20,
            },
            stall: crate::stall::StallPolicy {
                timeout: self.stall_timeout,
                detect: crate::stall::DETECT,
                max_stalled: self.max_stalled_streams,
            },
        }
    }

    /// The connection cap in force: the configured one, or the default
    /// sized to the open-file limit.
    pub fn effective_max_connections(&self) -> usize {
        self.max_connections.unwrap_or_else(|| {
            let soft = portico_agent::nofile::soft_limit();
            usize::try_from(soft.saturating_sub(1024))
                .unwrap_or(usize::MAX)
                .max(64)
        })
    }

    /// The per-client connection cap in force.
    pub fn effective_max_connections_per_client(&self) -> usize {
        self.max_connections_per_client
            .unwrap_or_else(|| (self.effective_max_connections() / 10).max(16))
    }

    /// Checks the fields that can be checked without touching the network.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid =
            |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        match self.router_url.split_once("://") {
            Some(("https", rest)) if !rest.is_empty() => {}
            _ => {
                return invalid(
                    "router_url",
                    format!("must be an https:// URL, not {:?}", self.router_url),
                )
            }
        }
        if let Some(token) = &self.token {
            if token.parse::<portico_proto::api::JoinToken>().is_err() {
                return invalid(
                    "token",
                    "malformed join token: expected pt1.<id>.<secret>.<ca-sha256>".to_owned(),
                );
            }
        }
        if self.state_dir.as_os_str().is_empty() {
            return invalid("state_dir", "must not be empty".to_owned());
        }
        for (field, addr) in [
            ("advertise_tunnel_addr", &self.advertise_tunnel_addr),
            ("advertise_public_addr", &self.advertise_public_addr),
            ("advertise_mesh_addr", &self.advertise_mesh_addr),
        ] {
            if let Some(addr) = addr {
                if !valid_host_port(addr) {
                    return invalid(field, format!("must be host:port, not {addr:?}"));
                }
            }
        }
        if self.grace > Duration::from_secs(3600) {
            return invalid("grace", "must be at most one hour".to_owned());
        }
        if self.drain_delay > Duration::from_secs(3600) {
            return invalid("drain_delay", "must be at most one hour".to_owned());
        }
        for (field, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("keepalive_idle_timeout", self.keepalive_idle_timeout),
            ("h2_idle_timeout", self.h2_idle_timeout),
            ("h2_keepalive_interval", self.h2_keepalive_interval),
            ("h2_keepalive_timeout", self.h2_keepalive_timeout),
            ("stall_timeout", self.stall_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(3600) {
                return invalid(
                    field,
                    format!("must be more than zero and at most one hour, not {d:?}"),
                );
            }
        }
        if self.stall_timeout < crate::stall::DETECT * 2 {
            return invalid(
                "stall_timeout",
                format!("must be at least {:?}", crate::stall::DETECT * 2),
            );
        }
        for (field, n) in [
            (
                "h2_max_concurrent_streams",
                u64::from(self.h2_max_concurrent_streams),
            ),
            (
                "max_connections",
                self.max_connections.map_or(1, |n| n as u64),
            ),
            (
                "max_connections_per_client",
                self.max_connections_per_client.map_or(1, |n| n as u64),
            ),
            ("client_reset_burst", u64::from(self.client_reset_burst)),
            ("max_stalled_streams", u64::from(self.max_stalled_streams)),
            (
                "max_stalled_per_client",
                u64::from(self.max_stalled_per_client),
            ),
        ] {
            if n == 0 {
                return invalid(field, "must be at least 1".to_owned());
            }
        }
        if self.max_stalled_streams > 4096 {
            return invalid(
                "max_stalled_streams",
                "must be at most 4096 (it sizes every tunnel's window)".to_owned(),
            );
        }
        if !(1..=TUNNELS_PER_CONNECTOR_MAX).contains(&self.max_tunnels_per_connector) {
            return invalid(
                "max_tunnels_per_connector",
                format!(
                    "{} is not within 1..={TUNNELS_PER_CONNECTOR_MAX}",
                    self.max_tunnels_per_connector
                ),
            );
        }
        if !PING_INTERVAL_RANGE.contains(&self.tunnel_ping_interval) {
            return invalid(
                "tunnel_ping_interval",
                format!(
                    "{:?} is not within {:?}..={:?}",
                    self.tunnel_ping_interval,
                    PING_INTERVAL_RANGE.start(),
                    PING_INTERVAL_RANGE.end()
                ),
            );
        }
        let dead_min = (2 * self.tunnel_ping_interval).max(2 * SUSPECT_CEILING);
        if !(dead_min..=DEAD_AFTER_MAX).contains(&self.tunnel_dead_after) {
            return invalid(
                "tunnel_dead_after",
                format!(
                    "{:?} is not within {dead_min:?}..={DEAD_AFTER_MAX:?} (at least two ping \
                     intervals and twice the longest suspect deadline)",
                    self.tunnel_dead_after
                ),
            );
        }
        if self.connector_timeout_grace > Duration::from_secs(600) {
            return invalid(
                "connector_timeout_grace",
                "must be at most ten minutes".to_owned(),
            );
        }
        Ok(())
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("router_url", &self.router_url)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("state_dir", &self.state_dir)
            .field("region", &self.region)
            .field("public_listen", &self.public_listen)
            .field("http3", &self.http3)
            .field("tunnel_listen", &self.tunnel_listen)
            .field("mesh_listen", &self.mesh_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("public_cert", &self.public_cert)
            .field("advertise_tunnel_addr", &self.advertise_tunnel_addr)
            .field("advertise_public_addr", &self.advertise_public_addr)
            .field("advertise_mesh_addr", &self.advertise_mesh_addr)
            .field("mesh_dial_overrides", &self.mesh_dial_overrides)
            .field("drain_delay", &self.drain_delay)
            .field("grace", &self.grace)
            .field("connector_timeout_grace", &self.connector_timeout_grace)
            .field("access_log", &self.access_log)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("keepalive_idle_timeout", &self.keepalive_idle_timeout)
            .field("h2_idle_timeout", &self.h2_idle_timeout)
            .field("h2_keepalive_interval", &self.h2_keepalive_interval)
            .field("h2_keepalive_timeout", &self.h2_keepalive_timeout)
            .field("h2_max_concurrent_streams", &self.h2_max_concurrent_streams)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_client",
                &self.max_connections_per_client,
            )
            .field("client_reset_burst", &self.client_reset_burst)
            .field("client_reset_rate", &self.client_reset_rate)
            .field("stall_timeout", &self.stall_timeout)
            .field("max_stalled_streams", &self.max_stalled_streams)
            .field("max_stalled_per_client", &self.max_stalled_per_client)
            .field("max_tunnels_per_connector", &self.max_tunnels_per_connector)
            .field("tunnel_ping_interval", &self.tunnel_ping_interval)
            .field("tunnel_dead_after", &self.tunnel_dead_after)
            .finish()
    }
}

/// Where this edge dials a peer's mesh link instead of the address the
/// peer advertises: peer [`EdgeId`] → address. Only the address changes;
/// the dial still checks that the certificate at the other end is the
/// peer's (`edge_server_name(id)`) and that its `Welcome` names it, so an
/// override cannot send a peer's requests to another edge.
///
/// Cheap to clone, and clones share one map: peers' ids are the router's
/// (given at enrollment), so a harness that starts edges one after the
/// other fills in the map of those already running as the next ones come
/// up. A change applies to the next dial of that peer's link; a live link
/// keeps its path.
#[derive(Clone, Default)]
pub struct MeshDialOverrides(Arc<RwLock<HashMap<EdgeId, SocketAddr>>>);

impl MeshDialOverrides {
    /// Dial `addr` for `peer`'s mesh link from now on.
    pub fn set(&self, peer: EdgeId, addr: SocketAddr) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer, addr);
    }

    /// The address to dial for `peer`, if it is overridden.
    pub fn get(&self, peer: &EdgeId) -> Option<SocketAddr> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(peer)
            .copied()
    }
}

impl fmt::Debug for MeshDialOverrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.debug_map().entries(map.iter()).finish()
    }
}

/// The address to advertise for a bound socket: unspecified IPs become
/// loopback, so a single-machine setup works without flags.
pub(crate) fn advertised(explicit: &Option<String>, bound: SocketAddr) -> String {
    if let Some(a) = explicit {
        return a.clone();
    }
    let mut addr = bound;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_hide_the_token() {
        let mut c = Config::new("https://127.0.0.1:7443", "/tmp/x");
        c.validate().unwrap();
        c.token = Some(format!(
            "pt1.{}.{}.{}",
            "a".repeat(16),
            "b".repeat(32),
            "c".repeat(64)
        ));
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains(&"b".repeat(32)));
        c.token = Some("nope".into());
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig { field: "token", .. })
        ));
        c.token = None;
        c.router_url = "http://x".into();
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "router_url",
                ..
            })
        ));
        c.router_url = "https://x".into();
        c.advertise_tunnel_addr = Some("nohost".into());
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "advertise_tunnel_addr",
                ..
            })
        ));
    }

    #[test]
    fn tunnel_limits_and_liveness_periods_are_checked() {
        let ok = Config::new("https://127.0.0.1:7443", "/tmp/x");
        ok.validate().unwrap();
        let policy = ok.tunnel_policy();
        assert_eq!(policy.max_per_connector, 16);
        assert_eq!(policy.liveness, LivenessConfig::DEFAULT);
        let field_of = |c: Config| match c.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        };
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = ok.clone();
            f(&mut c);
            c
        };
        assert_eq!(
            field_of(with(&|c| c.max_tunnels_per_connector = 0)),
            "max_tunnels_per_connector"
        );
        assert_eq!(
            field_of(with(&|c| c.tunnel_ping_interval = Duration::from_millis(10))),
            "tunnel_ping_interval"
        );
        // Not even two pings, or shorter than a suspect deadline can be.
        assert_eq!(
            field_of(with(&|c| {
                c.tunnel_ping_interval = Duration::from_secs(5);
                c.tunnel_dead_after = Duration::from_secs(6);
            })),
            "tunnel_dead_after"
        );
        assert_eq!(
            field_of(with(&|c| c.tunnel_dead_after = Duration::from_millis(1500))),
            "tunnel_dead_after"
        );
        with(&|c| c.tunnel_dead_after = Duration::from_secs(2))
            .validate()
            .unwrap();
    }

    #[test]
    fn advertised_replaces_unspecified_ips() {
        assert_eq!(
            advertised(&None, "0.0.0.0:7844".parse().unwrap()),
            "127.0.0.1:7844"
        );
        assert_eq!(
            advertised(&None, "[::]:7844".parse().unwrap()),
            "[::1]:7844"
        );
        assert_eq!(
            advertised(&Some("edge.example:1".into()), "0.0.0.0:7".parse().unwrap()),
            "edge.example:1"
        );
    }
}
