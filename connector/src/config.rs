//! The connector's configuration, as the CLI and tests build it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;
use crate::region::RegionPolicy;

/// How the connector runs. Build with [`Config::new`], adjust the fields,
/// then [`Config::validate`] (which [`crate::start`] also calls).
#[derive(Clone)]
pub struct Config {
    /// `https://host:port` of the router.
    pub router_url: String,
    /// A join token (`pt1.…`), needed only on the first start; later starts
    /// reuse the credentials saved in `state_dir`.
    pub token: Option<String>,
    /// Where credentials and the last config snapshot are kept (0700).
    pub state_dir: PathBuf,
    /// How many tunnels to keep, spread over the edges the router lists.
    pub tunnels: usize,
    /// Single-thread runtimes that carry the tunnels: the one `start` runs
    /// on and `shards - 1` threads of their own; tunnel `i` and its
    /// streams run on shard `i % shards` (see ARCHITECTURE.md, "Shards").
    /// The `portico connector` command runs one per core; 1 here.
    pub shards: std::num::NonZeroUsize,
    /// A plain HTTP listener for `/metrics`, `/healthz` and `/ready`.
    pub metrics_listen: Option<SocketAddr>,
    /// Extra PEM root certificates for validating https backends, besides
    /// the system roots.
    pub backend_ca: Vec<PathBuf>,
    /// How many streams an edge may open at once on one tunnel.
    pub max_streams_per_tunnel: u32,
    /// The host name reported to the router.
    pub host: String,
    /// The most connections to one app's backend, idle keepalive ones
    /// included. `None`: a quarter of the backend budget, which is the
    /// process's open-file soft limit less a reserve (an eighth, at least
    /// 256) for tunnels, DNS, files and the metrics listener.
    pub max_backend_connections_per_app: Option<usize>,
    /// How long a request waits for a backend connection when its app (or
    /// the budget) is at its cap, before it gets `BackendBusy` (503). Never
    /// longer than the app's own timeout.
    pub backend_connection_wait: Duration,
    /// How a connector of an `auto` group picks its region.
    pub region: RegionSettings,
    /// The nameservers that resolve edges' tunnel addresses given as names
    /// (asked in order); empty: those of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// How the tunnel slots find the edges of a region.
    pub find_edges: FindEdges,
}

/// How the tunnel slots find the edges of a region (ARCHITECTURE.md,
/// "Resolving tunnel endpoints").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FindEdges {
    /// By the region's name, `<region>.tunnel.<domain>`, when the router
    /// gives one (it serves DNS for the apps domain): its CNAME chain is
    /// followed and every address dialled, each verified as an edge of
    /// the region; else, or while the name has no answer and none saved,
    /// by the router's list.
    #[default]
    Dns,
    /// By the router's list of edges only.
    List,
}

impl std::str::FromStr for FindEdges {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dns" => Ok(FindEdges::Dns),
            "list" => Ok(FindEdges::List),
            _ => Err(format!("{s:?} is not a way to find edges: dns or list")),
        }
    }
}

/// How a connector of an `auto` group measures the regions and moves
/// between them (ARCHITECTURE.md, "Regions").
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSettings {
    /// The chooser's rules: window, thresholds.
    pub policy: RegionPolicy,
    /// How often every edge of every region is probed (jittered by ±20%).
    pub probe_interval: Duration,
    /// How long a tunnel that moved to another region keeps serving after
    /// its replacement is up, before it drains: clients that still resolve
    /// the old region's edges (DNS caches) reach the app meanwhile.
    pub move_linger: Duration,
}

impl Default for RegionSettings {
    /// A 5 min window, 10 ms and 33% to move, probes every 30 s, 30 s of
    /// linger.
    fn default() -> Self {
        RegionSettings {
            policy: RegionPolicy::default(),
            probe_interval: Duration::from_secs(30),
            move_linger: Duration::from_secs(30),
        }
    }
}

/// The longest region window.
pub const MAX_REGION_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The shortest probe interval.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// The longest move linger.
pub const MAX_MOVE_LINGER: Duration = Duration::from_secs(600);

/// The most a backend connection cap may be set to.
pub const MAX_BACKEND_CONNECTIONS: usize = 1 << 20;
/// The longest [`Config::backend_connection_wait`].
pub const MAX_BACKEND_CONNECTION_WAIT: Duration = Duration::from_secs(3600);

/// The most tunnels one connector keeps.
pub const MAX_TUNNELS: usize = 64;

impl Config {
    /// A configuration with the defaults: 4 tunnels, 1024 streams per
    /// tunnel, no metrics listener, backend connections per app sized to
    /// the open-file limit with a 5 s wait, the host name from `HOSTNAME`
    /// or `/etc/hostname`.
    pub fn new(router_url: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Config {
            router_url: router_url.into(),
            token: None,
            state_dir: state_dir.into(),
            tunnels: 4,
            shards: std::num::NonZeroUsize::MIN,
            metrics_listen: None,
            backend_ca: Vec::new(),
            max_streams_per_tunnel: 1024,
            host: default_host(),
            max_backend_connections_per_app: None,
            backend_connection_wait: Duration::from_secs(5),
            region: RegionSettings::default(),
            nameservers: Vec::new(),
            find_edges: FindEdges::default(),
        }
    }

    /// Checks every field without touching the network or the disk.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid =
            |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        let url = self.router_url.trim();
        if !url.starts_with("https://") || url.len() <= "https://".len() {
            return invalid(
                "router_url",
                format!("{url:?} must be an https:// URL such as https://router.example.com:8443"),
            );
        }
        if let Some(token) = &self.token {
            if token.parse::<portico_proto::api::JoinToken>().is_err() {
                return invalid(
                    "token",
                    "malformed join token: expected pt1.<id>.<secret>.<ca-sha256> as printed by `portico token create`"
                        .into(),
                );
            }
        }
        if self.state_dir.as_os_str().is_empty() {
            return invalid("state_dir", "must not be empty".into());
        }
        if self.tunnels == 0 || self.tunnels > MAX_TUNNELS {
            return invalid(
                "tunnels",
                format!("{} is not within 1..={MAX_TUNNELS}", self.tunnels),
            );
        }
        if self.max_streams_per_tunnel == 0 || self.max_streams_per_tunnel > 65_536 {
            return invalid(
                "max_streams_per_tunnel",
                format!("{} is not within 1..=65536", self.max_streams_per_tunnel),
            );
        }
        if let Some(n) = self.max_backend_connections_per_app {
            if n == 0 || n > MAX_BACKEND_CONNECTIONS {
                return invalid(
                    "max_backend_connections_per_app",
                    format!("{n} is not within 1..={MAX_BACKEND_CONNECTIONS}"),
                );
            }
        }
        if self.backend_connection_wait > MAX_BACKEND_CONNECTION_WAIT {
            return invalid(
                "backend_connection_wait",
                format!(
                    "{:?} is longer than {MAX_BACKEND_CONNECTION_WAIT:?}",
                    self.backend_connection_wait
                ),
            );
        }
        if self.nameservers.len() > crate::resolve::MAX_NAMESERVERS {
            return invalid(
                "nameserver",
                format!(
                    "{} nameservers; at most {}",
                    self.nameservers.len(),
                    crate::resolve::MAX_NAMESERVERS
                ),
            );
        }
        if let Some(s) = self.nameservers.iter().find(|s| s.port() == 0) {
            return invalid("nameserver", format!("{s}: port 0"));
        }
        if self.host.trim().is_empty() || self.host.len() > 255 {
            return invalid("host", "must be 1 to 255 bytes".into());
        }
        self.region.validate()
    }
}

impl RegionSettings {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid =
            |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        let p = &self.policy;
        if p.window < Duration::from_secs(1) || p.window > MAX_REGION_WINDOW {
            return invalid(
                "region_window",
                format!("{:?} is not within 1s..={MAX_REGION_WINDOW:?}", p.window),
            );
        }
        if p.min_improvement > Duration::from_secs(10) {
            return invalid(
                "region_min_improvement",
                format!("{:?} is longer than 10s", p.min_improvement),
            );
        }
        if !(0.0..1.0).contains(&p.min_ratio) {
            return invalid(
                "region_min_ratio",
                format!("{} is not within 0..1 (0.33 is 33%)", p.min_ratio),
            );
        }
        if self.probe_interval < MIN_PROBE_INTERVAL || self.probe_interval > p.window {
            return invalid(
                "region_probe_interval",
                format!(
                    "{:?} is not within {MIN_PROBE_INTERVAL:?}..= the window ({:?}): the window needs several probes",
                    self.probe_interval, p.window
                ),
            );
        }
        if self.move_linger > MAX_MOVE_LINGER {
            return invalid(
                "region_move_linger",
                format!("{:?} is longer than {MAX_MOVE_LINGER:?}", self.move_linger),
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("router_url", &self.router_url)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("state_dir", &self.state_dir)
            .field("tunnels", &self.tunnels)
            .field("metrics_listen", &self.metrics_listen)
            .field("backend_ca", &self.backend_ca)
            .field("max_streams_per_tunnel", &self.max_streams_per_tunnel)
            .field("host", &self.host)
            .field(
                "max_backend_connections_per_app",
                &self.max_backend_connections_per_app,
            )
            .field("backend_connection_wait", &self.backend_connection_wait)
            .field("region", &self.region)
            .field("nameservers", &self.nameservers)
            .finish()
    }
}

/// `HOSTNAME`, else `/etc/hostname`, else `localhost`.
fn default_host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_hide_the_token() {
        let mut c = Config::new("https://127.0.0.1:8443", "/tmp/x");
        assert_eq!(c.tunnels, 4);
        assert_eq!(c.max_streams_per_tunnel, 1024);
        assert!(!c.host.is_empty());
        c.validate().unwrap();
        let token = format!(
            "pt1.0123456789abcdef.00112233445566778899aabbccddeeff.{}",
            "ab".repeat(32)
        );
        c.token = Some(token.clone());
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("00112233445566778899"));

        c.token = Some("pt1.nope".into());
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig { field: "token", .. })
        ));
        c.token = None;
        c.tunnels = 0;
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "tunnels",
                ..
            })
        ));
        c.tunnels = 2;
        assert_eq!(c.max_backend_connections_per_app, None);
        assert_eq!(c.backend_connection_wait, Duration::from_secs(5));
        c.max_backend_connections_per_app = Some(0);
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "max_backend_connections_per_app",
                ..
            })
        ));
        c.max_backend_connections_per_app = Some(8);
        c.validate().unwrap();
        c.backend_connection_wait = Duration::from_secs(7200);
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "backend_connection_wait",
                ..
            })
        ));
        c.backend_connection_wait = Duration::ZERO;
        c.validate().unwrap();
        c.region.policy.min_ratio = 1.0;
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "region_min_ratio",
                ..
            })
        ));
        c.region.policy.min_ratio = 0.33;
        c.region.probe_interval = c.region.policy.window * 2;
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "region_probe_interval",
                ..
            })
        ));
        c.region.probe_interval = Duration::from_millis(500);
        c.region.policy.window = Duration::from_millis(10);
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "region_window",
                ..
            })
        ));
        c.region.policy.window = Duration::from_secs(6);
        c.validate().unwrap();
        c.router_url = "http://plain".into();
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "router_url",
                ..
            })
        ));
    }
}
