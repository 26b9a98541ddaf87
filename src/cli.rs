//! The command line: one binary, a subcommand per job.
//!
//! # Adding a flag to `router`, `edge` or `connector`
//!
//! One field in [`RouterArgs`], [`EdgeArgs`] or [`ConnectorArgs`] with
//! `#[arg(long)]` (a `default_value` if it has one; durations with
//! `value_parser = humantime::parse_duration`) and a doc comment, which is
//! its `--help`. That one field is also its environment variable
//! (`--stall-time` is `PORTICO_STALL_TIME`, set by [`crate::config::command`]
//! for every flag that names none) and its config-file key (`stall_time`,
//! parsed by the flag's own parser). Then:
//!
//! - pass it to the library's `Config` in `run_router` / `run_edge` /
//!   `run_connector` (src/lib.rs);
//! - add the key, with a comment, to `examples/<component>.toml`
//!   (commented out if optional): `tests` in src/config.rs fail while a
//!   flag is missing there, or names a variable that breaks the rule.
//!
//! Parse with [`crate::config::parse`], never `Cli::parse()`: only it reads
//! the config file and sets the variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogArgs;

/// Portico publishes internal web apps to remote users through outbound
/// QUIC tunnels: connectors inside private networks dial edges, edges serve
/// users over HTTPS, and the router holds the configuration.
///
/// Try it on one machine: `portico dev`.
#[derive(Debug, Parser)]
#[command(
    name = "portico",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    /// Threads that serve; by default one per core. `portico edge` and
    /// `portico connector` run a single-thread runtime on each (a shard:
    /// users and tunnels of its own, nothing stolen between them); the
    /// other commands run a multi-thread runtime with this many workers.
    /// `1` runs the whole process on one thread (BENCHMARKS.md measures
    /// both).
    #[arg(long, global = true, env = "PORTICO_THREADS", value_name = "N")]
    pub threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a router: the store, the certificate authority and the admin API.
    Router(RouterArgs),
    /// Run an edge, or list and delete edges.
    Edge(Box<EdgeCmd>),
    /// Run a connector, or list and delete connectors.
    Connector(ConnectorCmd),
    /// Publish, update, list, show and delete apps.
    App(AppCmd),
    /// Create, list and delete regions: sets of edges, all served by one
    /// router; an edge joins the region its join token names.
    Region(RegionCmd),
    /// Create, list and delete connector groups.
    Group(GroupCmd),
    /// Create, list and revoke the join tokens that enroll connectors and edges.
    Token(TokenCmd),
    /// Upload, list and delete certificates for app hosts in custom
    /// domains; edges present them by SNI.
    Cert(CertCmd),
    /// End users' sessions at every edge (apps with `--preauth oidc`).
    Session(SessionCmd),
    /// Measure a deployment: open- or closed-loop load over HTTP/1.1, HTTP/2
    /// or HTTP/3 with reports (`portico loadtest URL`), emulate a WAN path
    /// (`portico loadtest wan`), or start a whole deployment with a WAN
    /// between connectors and edges and load it (`portico loadtest deploy`).
    Loadtest(Box<LoadtestCmd>),
    /// Run a router, an edge, a connector and a demo app on this machine,
    /// publish the demo app, and print a URL and a curl line that reach it
    /// through the tunnel, and a dig line that shows its DNS chain (the
    /// router's DNS authority, on a free loopback port). Ctrl-C stops
    /// everything.
    Dev(DevArgs),
}

/// `portico loadtest`: the loadtest crate's command line plus `deploy`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadtestCmd {
    #[command(subcommand)]
    pub cmd: Option<LoadtestSub>,
    #[command(flatten)]
    pub run: portico_loadtest::cli::RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum LoadtestSub {
    /// Start a whole deployment on this machine (router, edges, connectors,
    /// demo backends, a WAN emulator between connectors and edges and
    /// between the regions' edges, `[wan.mesh.<from>.<to>]`) from a
    /// deployment file, run its load with its chaos actions, write the
    /// report. (Once called `mesh`, which still works; "mesh" now means
    /// only edge-to-edge forwarding.)
    #[command(alias = "mesh")]
    Deploy(crate::deploy::DeployArgs),
    #[command(flatten)]
    Loadtest(Box<portico_loadtest::cli::Cmd>),
}

/// Where the router is and how to trust and authenticate to it. Used by
/// every admin command.
#[derive(Debug, Clone, Args)]
pub struct RouterConn {
    /// The router's API URL.
    #[arg(
        long,
        env = "PORTICO_ROUTER",
        global = true,
        default_value = "https://127.0.0.1:7443"
    )]
    pub router: String,
    /// The router's CA certificate (DATA/ca.pem on the router).
    #[arg(long = "router-ca", env = "PORTICO_ROUTER_CA", global = true)]
    pub router_ca: Option<PathBuf>,
    /// The admin token (prefer --admin-token-file: command lines are visible to other users).
    #[arg(
        long,
        env = "PORTICO_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// A file holding the admin token (DATA/admin-token on the router).
    #[arg(long, env = "PORTICO_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = crate::config::SOURCES_HELP)]
pub struct RouterArgs {
    /// A TOML file with any of these flags as keys (see examples/router.toml).
    #[arg(long, env = "PORTICO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the database, the CA and the admin token (created 0700).
    #[arg(long, env = "PORTICO_DATA")]
    pub data: PathBuf,
    /// Address of the HTTPS API (admin, enrollment, config).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP /metrics, /healthz and /ready endpoints.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The DNS domain apps are published under: an app `hr` gets
    /// `hr.<apps-domain>`.
    #[arg(long, default_value = "apps.localhost")]
    pub apps_domain: String,
    /// Lifetime of connector and edge certificates (renewed at 2/3).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// The public HTTPS port shown in app URLs (default: the port the edges report).
    #[arg(long)]
    pub public_port: Option<u16>,
    /// Enrollment attempts one source address (an IPv6 /64) may make in a
    /// row; more get 429 with Retry-After.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub enroll_burst: u32,
    /// Enrollment attempts per minute an address regains after its burst.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub enroll_per_minute: u32,
    /// Serve DNS for the apps domain on this address, UDP and TCP (for
    /// example 0.0.0.0:53; port 0 picks a free one). An app host answers
    /// with a CNAME to `<region>.edge.<apps-domain>` (TTL 60 s), the region
    /// that serves the app's group, and that name with the A/AAAA records
    /// of the region's healthy edges' public addresses (TTL 30 s; all of
    /// them when none is healthy); `<region>.tunnel.<apps-domain>` with
    /// their tunnel addresses. DNS carries no port. Off when not given.
    #[arg(long, value_name = "ADDR")]
    pub dns_listen: Option<SocketAddr>,
    /// The OpenID provider that apps with `--preauth oidc` sign their users
    /// in with (its issuer URL; discovery is at
    /// `<issuer>/.well-known/openid-configuration`). Register one redirect
    /// URI with it for every app: `https://auth.<apps-domain>[:port]/.portico/callback`.
    /// Needs --oidc-client-id and --oidc-client-secret-file.
    #[arg(long, value_name = "URL", requires_all = ["oidc_client_id", "oidc_client_secret_file"])]
    pub oidc_issuer: Option<String>,
    /// The client id registered with the OpenID provider.
    #[arg(long, value_name = "ID", requires = "oidc_issuer")]
    pub oidc_client_id: Option<String>,
    /// A file holding the client secret (its first line), so that it is in
    /// no process listing.
    #[arg(long, value_name = "FILE", requires = "oidc_issuer")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// How long a session lasts from its sign-in (at most 30 days).
    #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
    pub session_lifetime: std::time::Duration,
    /// The ID token claim that lists a user's groups, for `--assign
    /// group:NAME` (Entra ID: `groups`; Keycloak: `groups`; Okta: as
    /// configured on the authorization server).
    #[arg(long, value_name = "CLAIM", default_value = "groups")]
    pub oidc_groups_claim: String,
    /// The nameserver (IP[:port], repeatable, at most 8) that checks an app
    /// host in a custom domain: `app create --external-host
    /// hr.corp.example.com` is accepted only when that host's CNAME chain,
    /// as this nameserver answers it, reaches the app's default host
    /// `<id>.<apps-domain>`. Default: the nameservers of /etc/resolv.conf.
    #[arg(long = "check-nameserver", value_name = "ADDR", value_parser = parse_nameserver_addr, value_delimiter = ',')]
    pub check_nameservers: Vec<SocketAddr>,
    /// How long a session lasts without a request (at most the lifetime);
    /// every request within it extends it.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub session_idle_timeout: std::time::Duration,
}

/// `IP` or `IP:port` (port 53 by default), `[v6]:port` for IPv6.
pub fn parse_nameserver_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP address or IP:port"))
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = crate::config::SOURCES_HELP
)]
pub struct EdgeCmd {
    #[command(subcommand)]
    pub action: Option<EdgeAction>,
    #[command(flatten)]
    pub run: EdgeArgs,
}

#[derive(Debug, Subcommand)]
pub enum EdgeAction {
    /// List the edges enrolled with the router.
    List(ListArgs),
    /// Delete an edge: revokes its certificate (the router refuses its
    /// renewals, reports and config polls) and takes it off the list of
    /// edges connectors dial, so they move their tunnels elsewhere.
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct EdgeArgs {
    /// A TOML file with any of these flags as keys (see examples/edge.toml).
    #[arg(long, env = "PORTICO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The router's API URL.
    #[arg(long, env = "PORTICO_ROUTER", required = true)]
    pub router: Option<String>,
    /// A join token from `portico token create --edge`; needed on first start only.
    #[arg(long, env = "PORTICO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Directory for this edge's key, certificates and last config (created 0700).
    #[arg(long, env = "PORTICO_STATE", required = true)]
    pub state: Option<PathBuf>,
    /// The region this edge runs in. Its region is the one its join token
    /// names (`portico token create --edge --region R`); with this flag a
    /// token of another region is refused before it is used, and a saved
    /// identity of another region stops the edge. Default: the token's.
    #[arg(long, value_name = "REGION")]
    pub region: Option<portico_proto::RegionId>,
    /// Address of the public HTTPS listener: HTTP/1.1 and HTTP/2 on TCP,
    /// HTTP/3 on UDP at the same port.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub public_listen: SocketAddr,
    /// Address of the QUIC tunnel listener (UDP).
    #[arg(long, default_value = "0.0.0.0:7844")]
    pub tunnel_listen: SocketAddr,
    /// Address of the mesh listener (UDP), where other edges forward
    /// requests for groups whose tunnels sit here (edge certificates only).
    /// Without it this edge still forwards to other edges, but takes no
    /// forwarded requests.
    #[arg(long, value_name = "ADDR")]
    pub mesh_listen: Option<SocketAddr>,
    /// Address of the plain-HTTP /metrics, /healthz and /ready endpoints.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate chain for the public listener (default: a wildcard
    /// certificate for the apps domain from the router's CA).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// host:port that connectors dial (default: the tunnel listener's address).
    #[arg(long)]
    pub advertise_tunnel: Option<String>,
    /// host:port that users reach (default: the public listener's address).
    #[arg(long)]
    pub advertise_public: Option<String>,
    /// host:port that other edges dial for mesh links (default: the mesh
    /// listener's address).
    #[arg(long, requires = "mesh_listen")]
    pub advertise_mesh: Option<String>,
    /// Do not serve HTTP/3 (by default it runs on UDP at the public port
    /// and is advertised with Alt-Svc).
    #[arg(long)]
    pub no_http3: bool,
    /// Write no access log (by default one line per request, target
    /// `portico::access`); request metrics are kept either way.
    #[arg(long)]
    pub no_access_log: bool,
    /// The TLS handshake and each request head (from its first byte; on
    /// HTTP/1.1 the first head from the connection's start) must arrive
    /// within this, or the connection is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// How long an HTTP/1.1 keep-alive connection may wait for its next request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub keepalive_idle_timeout: Duration,
    /// How long an HTTP/2 connection with no open stream is kept before a GOAWAY.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub h2_idle_timeout: Duration,
    /// How often an HTTP/2 PING checks that the client is still there.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub h2_keepalive_interval: Duration,
    /// How long the client has to answer that PING before the connection closes.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub h2_keepalive_timeout: Duration,
    /// Requests one HTTP/2 or HTTP/3 connection may have open at once.
    #[arg(long, default_value_t = 128)]
    pub h2_max_concurrent_streams: u32,
    /// User connections (TCP and QUIC) the edge holds at once (default: the
    /// open-file limit less 1,024, at least 64).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// User connections one client address (an IPv6 /64) holds at once
    /// (default: a tenth of --max-connections, at least 16).
    #[arg(long)]
    pub max_connections_per_client: Option<usize>,
    /// Requests one client may cancel before their response (HTTP/2 resets,
    /// closed connections) in a burst; past it its connections are closed.
    #[arg(long, default_value_t = 200)]
    pub client_reset_burst: u32,
    /// Cancels per second a client's budget refills at.
    #[arg(long, default_value_t = 20)]
    pub client_reset_rate: u32,
    /// A response whose client reads nothing for this long is reset.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Stalled responses (no byte read for a second) the edge holds at once;
    /// one more is reset at once. Sizes every tunnel's receive window.
    #[arg(long, default_value_t = 64)]
    pub max_stalled_streams: u32,
    /// Stalled responses one client holds at once; one more is reset at once.
    #[arg(long, default_value_t = 8)]
    pub max_stalled_per_client: u32,
    /// Tunnels one connector may hold to this edge at once; one more is
    /// refused (TooManyTunnels) and the connector backs off.
    #[arg(long, default_value_t = 16)]
    pub max_tunnels_per_connector: usize,
    /// How often the edge pings each tunnel's connector on its control
    /// stream. A tunnel that leaves a ping unanswered past an RTT-based
    /// deadline (at most 1 s) gets no new requests while others can take
    /// them.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub tunnel_ping_interval: Duration,
    /// A tunnel whose connector leaves a ping unanswered this long is
    /// closed: requests in flight on it fail at once, and are retried on
    /// another connector where that is safe.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub tunnel_dead_after: Duration,
    /// After SIGTERM (or Ctrl-C) the edge drains: it tells the router at
    /// once, which takes it out of the DNS answers, the presence and the
    /// connectors' edge lists; it refuses new tunnels, asks its connectors
    /// to open replacements elsewhere, and keeps serving users for this
    /// long, since resolvers may hold the old answer for its TTL (30 s).
    #[arg(long, default_value = "35s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,
    /// After the drain delay: no new users; requests in flight may finish
    /// for this long (at most 1h) before what is left is cut. A second
    /// SIGTERM or Ctrl-C stops at once.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = crate::config::SOURCES_HELP
)]
pub struct ConnectorCmd {
    #[command(subcommand)]
    pub action: Option<ConnectorAction>,
    #[command(flatten)]
    pub run: ConnectorArgs,
}

#[derive(Debug, Subcommand)]
pub enum ConnectorAction {
    /// List connectors with their status, version, address and edges, and
    /// their region choice: home region, RTT to each region, last move.
    List(ListArgs),
    /// Delete a connector: revokes its certificate and closes its tunnels.
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The id to delete.
    pub id: String,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct ConnectorArgs {
    /// A TOML file with any of these flags as keys (see examples/connector.toml).
    #[arg(long, env = "PORTICO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The router's API URL.
    #[arg(long, env = "PORTICO_ROUTER", required = true)]
    pub router: Option<String>,
    /// A join token from `portico token create --group G`; needed on first start only.
    #[arg(long, env = "PORTICO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Directory for this connector's key, certificate and last config (created 0700).
    #[arg(long, env = "PORTICO_STATE", required = true)]
    pub state: Option<PathBuf>,
    /// How many tunnels to keep open, spread over the edges.
    #[arg(long, default_value_t = 4)]
    pub tunnels: usize,
    /// Address of the plain-HTTP /metrics, /healthz and /ready endpoints.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Extra PEM CA certificates to trust for https backends.
    #[arg(long)]
    pub backend_ca: Vec<PathBuf>,
    /// How many requests an edge may have in flight at once on one tunnel;
    /// more wait at the edge. Memory stays bounded by the QUIC flow-control
    /// windows whatever the number.
    #[arg(long, default_value_t = 1024)]
    pub max_streams_per_tunnel: u32,
    /// The most connections to one app's backend, idle keepalive ones
    /// included (default: a quarter of the open-file limit less a reserve
    /// for tunnels, DNS, files and metrics).
    #[arg(long)]
    pub max_backend_connections_per_app: Option<usize>,
    /// How long a request waits for a backend connection when its app is
    /// at its cap before it gets 503 BackendBusy (at most the app's timeout).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub backend_connection_wait: Duration,
    /// Region choice (groups with `--region auto`): each connector probes
    /// every edge of every region (a QUIC handshake's round trip) and keeps
    /// the minimum per edge over this window; a region's RTT is that of
    /// its second-best edge. The tunnels go to the nearest region, spread
    /// over two of its edges at least. A longer window moves later and
    /// more surely.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub region_window: Duration,
    /// Another region must be at least this much nearer than the home over
    /// the window (and --region-min-ratio nearer) before the tunnels move.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub region_min_improvement: Duration,
    /// ...and at least this fraction of the home's RTT nearer: `33%` or
    /// `0.33`. Both thresholds keep jitter from moving the tunnels.
    #[arg(long, default_value = "33%", value_parser = parse_fraction)]
    pub region_min_ratio: f64,
    /// How often every edge of every region is probed (±20% jitter); the
    /// window needs several probes. Only `auto` groups with edges in more
    /// than one region probe at all.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub region_probe_interval: Duration,
    /// After a move to another region, how long each old tunnel keeps
    /// serving once its replacement is up, before it drains: users whose
    /// DNS still points at the old region reach the app meanwhile.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub region_move_linger: Duration,
    /// A DNS server (ADDR[:PORT], port 53 by default; repeat for more, at
    /// most 8, asked in order) for edges whose tunnel address is a name:
    /// the connector follows its CNAME chain (8 hops at most, loops
    /// refused), dials every address of the answer, keeps it for the
    /// chain's minimum TTL and moves tunnels when it changes. The last good
    /// answer is saved in --state and used, with a warning, while DNS
    /// fails. Default: the nameservers of /etc/resolv.conf. Several may be
    /// given comma-separated (PORTICO_NAMESERVER=10.0.0.53,10.0.1.53).
    #[arg(long, value_name = "ADDR[:PORT]", value_delimiter = ',', value_parser = portico_connector::parse_nameserver)]
    pub nameserver: Vec<SocketAddr>,
    /// How the tunnels find the edges of a region. `dns`: by the region's
    /// name, `<region>.tunnel.<apps domain>`, when the router gives one
    /// (it serves DNS for a domain not under `localhost`, and the region's
    /// edges advertise IP addresses on one port): its CNAME chain is
    /// followed and every address dialled, each verified as an edge of
    /// that region; the router's list while the name has no answer and
    /// none is saved. `list`: the router's list only.
    #[arg(long, default_value = "dns", value_name = "dns|list")]
    pub find_edges: portico_connector::FindEdges,
}

/// `33%` or `0.33`: a fraction within 0..1.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a fraction such as 33% or 0.33"))?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!("{s:?} is not within 0..1 (0% to 99%)"));
    }
    Ok(v)
}

#[derive(Debug, Args)]
pub struct AppCmd {
    #[command(subcommand)]
    pub action: AppAction,
}

#[derive(Debug, Subcommand)]
pub enum AppAction {
    /// Publish an internal URL at an external host.
    Create(AppCreateArgs),
    /// Change any of an app's settings; the others keep their values. The
    /// result is checked as `app create` checks a new app.
    Update(AppUpdateArgs),
    /// List apps.
    List(ListArgs),
    /// Show one app.
    Show(ShowArgs),
    /// Unpublish an app.
    Delete(DeleteArgs),
    /// Diagnose an app: its DNS chain, the certificate the edge serves for
    /// it, the active connectors of its group, and through each of them a
    /// probe of the internal URL (DNS, TCP, TLS, HTTP), each failure with a
    /// hint. Exits 0 when every check passes, 1 otherwise. `--json` prints
    /// the report as README.md ("portico app test") describes it.
    Test(AppTestArgs),
}

#[derive(Debug, Args)]
pub struct AppTestArgs {
    pub id: String,
    /// Also resolve the app's host at this nameserver (`IP` or `IP:PORT`,
    /// port 53 by default) and show the CNAME chain a resolver sees there.
    #[arg(long)]
    pub nameserver: Option<String>,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub id: String,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct AppCreateArgs {
    /// The app's id; also the default external host `<id>.<apps-domain>`.
    pub id: String,
    /// Where the connector sends requests: http(s)://host[:port][/path].
    #[arg(long)]
    pub internal_url: String,
    /// External host name (default `<id>.<apps-domain>`): under the apps
    /// domain, or in a custom domain, when its CNAME chain reaches
    /// `<id>.<apps-domain>` (the router checks it now; upload a
    /// certificate for it with `portico cert upload`).
    #[arg(long)]
    pub external_host: Option<String>,
    /// The connector group that serves it.
    #[arg(long, default_value = "Default")]
    pub group: String,
    /// How long the backend may take: `default` (85 s), `long` (180 s) or seconds.
    #[arg(long, default_value = "default")]
    pub backend_timeout: String,
    /// Accept any certificate from an https backend (validation is on by default).
    #[arg(long)]
    pub no_validate_backend_tls: bool,
    /// Leave the backend's response headers as they are. By default the
    /// connector translates internal URLs (this app's or any published
    /// app's) to external ones in `Location`, `Content-Location`,
    /// `Refresh` and `Set-Cookie`'s `Domain` and `Path`.
    #[arg(long)]
    pub no_translate_headers: bool,
    /// Also translate internal URLs to external ones in HTML and CSS
    /// response bodies (links, `src`, forms, `srcset`, CSS `url()`),
    /// streamed, never buffered whole. Off by default; the backend is then
    /// asked for uncompressed responses.
    #[arg(long)]
    pub translate_body: bool,
    /// A feature every edge must implement to serve this app (repeatable;
    /// lower-case letters, digits and '-'). An edge that does not know it
    /// answers 503 `FeatureUnsupported` instead of serving the app without it.
    #[arg(long = "require-feature", value_name = "NAME")]
    pub required_features: Vec<String>,
    /// `oidc`: the edge signs users in with the router's OpenID provider
    /// before they reach the app (browsers are sent to sign in, API
    /// clients get 401); `passthrough`: anyone who reaches the edge
    /// reaches the app.
    #[arg(long, default_value = "passthrough", value_name = "oidc|passthrough")]
    pub preauth: portico_proto::api::Preauth,
    /// Who may use an app with `--preauth oidc` (repeatable, required
    /// then): `user:NAME` (the user's `sub`, or their verified email),
    /// `group:NAME` (a value of the groups claim), or `everyone` who
    /// signs in. Anyone else gets 403 `NotAssigned`.
    #[arg(long = "assign", value_name = "user:NAME|group:NAME|everyone")]
    pub assign: Vec<String>,
    /// Send a claim of the signed-in user to the backend in a header
    /// (repeatable): `HEADER=CLAIM`, the claim one of sub, email, name,
    /// preferred_username, groups (comma-separated). The connector drops
    /// any such header the client sent. Every request of a signed-in user
    /// also carries `X-Portico-Jwt-Assertion`, verifiable with the
    /// router's `/.well-known/jwks.json`.
    #[arg(long = "identity-header", value_name = "HEADER=CLAIM")]
    pub identity_headers: Vec<String>,
    /// Leave the app out of the My Apps portal (`https://auth.<apps-domain>/`).
    #[arg(long)]
    pub hidden: bool,
    /// Publish it in maintenance mode: every request gets 503
    /// `Maintenance` (the branded page, with `Retry-After`) before sign-in,
    /// and nothing reaches the backend. `app update --no-maintenance` ends it.
    #[arg(long)]
    pub maintenance: bool,
    /// The app's home page, where My Apps and `app show` send users
    /// (default: the external URL). A URL on the external host
    /// (`https://hr.apps.example.com/portal/`), a path (`/portal/`), or a
    /// URL under the internal URL, translated; anything else is refused.
    #[arg(long, value_name = "URL")]
    pub home_page: Option<String>,
    /// A PEM file of CA certificates the connector trusts for this app's
    /// https backend, besides the system roots (at most 32 KiB, only
    /// CERTIFICATE blocks): for a backend whose certificate comes from a
    /// private CA. Ignored with --no-validate-backend-tls.
    #[arg(long, value_name = "PEM")]
    pub backend_ca_file: Option<std::path::PathBuf>,
    /// Let the page's scripts read the session cookie (`--preauth oidc`):
    /// it is `HttpOnly` by default.
    #[arg(long)]
    pub no_http_only: bool,
    /// Keep the session cookie when the browser closes (`Max-Age`, the
    /// rest of the session's lifetime); by default it ends with the browser.
    #[arg(long)]
    pub persistent: bool,
    /// Sign the app's users in through a client of its own at the router's
    /// OpenID provider (`--preauth oidc`), instead of the deployment's
    /// (`portico router --oidc-client-id`): for a provider that sets
    /// access policies, consent or branding per client. Register the same
    /// redirect URI with it, `https://auth.<apps-domain>[:port]/.portico/callback`.
    /// Needs --oidc-client-secret-file. Edges of a build without per-app
    /// clients refuse the app (503 `FeatureUnsupported`).
    #[arg(long, value_name = "ID", requires = "oidc_client_secret_file")]
    pub oidc_client_id: Option<String>,
    /// A file holding the secret of --oidc-client-id (its first line), so
    /// that it is in no process listing. It goes to the edges only: `app
    /// show` and `GET /v1/apps` name the client id alone.
    #[arg(long, value_name = "FILE", requires = "oidc_client_id")]
    pub oidc_client_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true)))]
pub struct AppUpdateArgs {
    /// The app's id.
    pub id: String,
    /// Where the connector sends requests: http(s)://host[:port][/path].
    #[arg(long, group = "change")]
    pub internal_url: Option<String>,
    /// External host name: under the apps domain, or in a custom domain
    /// whose CNAME chain reaches `<id>.<apps-domain>` (checked now).
    #[arg(long, group = "change")]
    pub external_host: Option<String>,
    /// The connector group that serves it.
    #[arg(long, group = "change")]
    pub group: Option<String>,
    /// How long the backend may take: `default` (85 s), `long` (180 s) or seconds.
    #[arg(long, group = "change")]
    pub backend_timeout: Option<String>,
    /// Validate the certificate of an https backend.
    #[arg(long, group = "change", conflicts_with = "no_validate_backend_tls")]
    pub validate_backend_tls: bool,
    /// Accept any certificate from an https backend.
    #[arg(long, group = "change")]
    pub no_validate_backend_tls: bool,
    /// Translate internal URLs in response headers (`Location`,
    /// `Content-Location`, `Refresh`, `Set-Cookie` `Domain` and `Path`).
    #[arg(long, group = "change", conflicts_with = "no_translate_headers")]
    pub translate_headers: bool,
    /// Leave response headers as the backend sent them.
    #[arg(long, group = "change")]
    pub no_translate_headers: bool,
    /// Translate internal URLs in HTML and CSS response bodies, streamed.
    #[arg(long, group = "change", conflicts_with = "no_translate_body")]
    pub translate_body: bool,
    /// Leave response bodies as the backend sent them.
    #[arg(long, group = "change")]
    pub no_translate_body: bool,
    /// A feature every edge must implement to serve the app (repeatable).
    /// Replaces the app's whole list.
    #[arg(
        long = "require-feature",
        value_name = "NAME",
        group = "change",
        conflicts_with = "no_required_features"
    )]
    pub required_features: Vec<String>,
    /// Require no features.
    #[arg(long, group = "change")]
    pub no_required_features: bool,
    /// `oidc` or `passthrough` (see `app create --help`).
    #[arg(long, group = "change", value_name = "oidc|passthrough")]
    pub preauth: Option<portico_proto::api::Preauth>,
    /// Who may use the app (repeatable; see `app create --help`). Replaces
    /// the whole assignment.
    #[arg(
        long = "assign",
        value_name = "user:NAME|group:NAME|everyone",
        group = "change",
        conflicts_with = "no_assign"
    )]
    pub assign: Vec<String>,
    /// Assign no one (needed before `--preauth passthrough`, as is
    /// --no-oidc-client for an app with its own client).
    #[arg(long, group = "change")]
    pub no_assign: bool,
    /// `HEADER=CLAIM` for the backend (repeatable; see `app create
    /// --help`). Replaces the whole mapping.
    #[arg(
        long = "identity-header",
        value_name = "HEADER=CLAIM",
        group = "change",
        conflicts_with = "no_identity_headers"
    )]
    pub identity_headers: Vec<String>,
    /// Send the backend no identity headers (the assertion still goes).
    #[arg(long, group = "change")]
    pub no_identity_headers: bool,
    /// Leave the app out of My Apps.
    #[arg(long, group = "change", conflicts_with = "visible")]
    pub hidden: bool,
    /// List the app in My Apps again.
    #[arg(long, group = "change")]
    pub visible: bool,
    /// Put the app in maintenance mode: 503 `Maintenance` to every request.
    #[arg(long, group = "change", conflicts_with = "no_maintenance")]
    pub maintenance: bool,
    /// End maintenance mode.
    #[arg(long, group = "change")]
    pub no_maintenance: bool,
    /// A new home page (see `app create --help`).
    #[arg(
        long,
        group = "change",
        value_name = "URL",
        conflicts_with = "no_home_page"
    )]
    pub home_page: Option<String>,
    /// Make the external URL the home page again.
    #[arg(long, group = "change")]
    pub no_home_page: bool,
    /// A new backend CA bundle (see `app create --help`).
    #[arg(
        long,
        group = "change",
        value_name = "PEM",
        conflicts_with = "no_backend_ca"
    )]
    pub backend_ca_file: Option<std::path::PathBuf>,
    /// Trust the system roots (and the connector's --backend-ca) only.
    #[arg(long, group = "change")]
    pub no_backend_ca: bool,
    /// Make the session cookie `HttpOnly` again.
    #[arg(long, group = "change", conflicts_with = "no_http_only")]
    pub http_only: bool,
    /// Let the page's scripts read the session cookie.
    #[arg(long, group = "change")]
    pub no_http_only: bool,
    /// Keep the session cookie when the browser closes.
    #[arg(long, group = "change", conflicts_with = "no_persistent")]
    pub persistent: bool,
    /// End the session cookie with the browser.
    #[arg(long, group = "change")]
    pub no_persistent: bool,
    /// Sign the app's users in through this client of its own (see `app
    /// create --help`), with --oidc-client-secret-file.
    #[arg(
        long,
        group = "change",
        value_name = "ID",
        requires = "oidc_client_secret_file",
        conflicts_with = "no_oidc_client"
    )]
    pub oidc_client_id: Option<String>,
    /// The secret of the app's own client (its first line): with
    /// --oidc-client-id, or alone to replace the secret of the client the
    /// app has.
    #[arg(
        long,
        group = "change",
        value_name = "FILE",
        conflicts_with = "no_oidc_client"
    )]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// Sign the app's users in through the deployment's client again (its
    /// own client's secret is forgotten); needed before `--preauth
    /// passthrough`.
    #[arg(long, group = "change")]
    pub no_oidc_client: bool,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct RegionCmd {
    #[command(subcommand)]
    pub action: RegionAction,
}

#[derive(Debug, Subcommand)]
pub enum RegionAction {
    /// Create a region. Edges enroll into it with a token from `portico
    /// token create --edge --region ID` and run with `--region ID`;
    /// connector groups pin to it with `portico group create --region ID`.
    Create(RegionCreateArgs),
    /// List regions, a row per edge: its status and tunnels (its load),
    /// and the connectors attached to the region's edges (each counted
    /// once). A region without edges shows one row with `-`.
    List(ListArgs),
    /// Delete a region. Refused for `default`, and while an edge is
    /// enrolled in it, a group is pinned to it, or an unused edge token
    /// names it (the error says which and how many).
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct RegionCreateArgs {
    /// The region's id (letters, digits, '.', '_', '-'), for example `eu-west`.
    pub id: String,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct GroupCmd {
    #[command(subcommand)]
    pub action: GroupAction,
}

#[derive(Debug, Subcommand)]
pub enum GroupAction {
    /// Create a connector group.
    Create(GroupCreateArgs),
    /// List connector groups.
    List(ListArgs),
    /// Delete an empty connector group.
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
pub struct GroupCreateArgs {
    /// The group's name (letters, digits, '.', '_', '-').
    pub id: String,
    /// `auto` (the default) or the id of a region that exists: a pinned
    /// group's connectors dial only that region's edges.
    #[arg(long)]
    pub region: Option<String>,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct CertCmd {
    #[command(subcommand)]
    pub action: CertAction,
}

#[derive(Debug, Subcommand)]
pub enum CertAction {
    /// Upload a certificate and its key for hosts of a custom domain. It is
    /// refused, with the reason, when it is expired or not yet valid,
    /// self-signed, not the key's, or does not cover a host named with
    /// `--host` or `--app`. Once stored it serves every host it covers (a
    /// `*.corp.example.com` one serves all of them); uploading the same
    /// certificate again replaces it.
    Upload(CertUploadArgs),
    /// List uploaded certificates: names, issuer, expiry.
    List(ListArgs),
    /// Delete an uploaded certificate (its hosts then get the edge's own).
    Delete(DeleteArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("for").required(true).multiple(true)))]
pub struct CertUploadArgs {
    /// The PEM chain: the certificate first, then its intermediates.
    #[arg(long, value_name = "FILE")]
    pub chain: PathBuf,
    /// The PEM private key of the certificate.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// A host the certificate must cover (repeatable).
    #[arg(long, value_name = "HOST", group = "for")]
    pub host: Vec<String>,
    /// An app whose external host the certificate must cover (repeatable).
    #[arg(long, value_name = "ID", group = "for")]
    pub app: Vec<String>,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct SessionCmd {
    #[command(subcommand)]
    pub action: SessionAction,
}

#[derive(Debug, Subcommand)]
pub enum SessionAction {
    /// Sign a user out of every session begun until now, at every edge of
    /// every region, within seconds (each edge learns it from the
    /// router). The user can sign in again, unless the provider or the
    /// app's assignment stops them. Bearer tokens are the provider's: they
    /// keep working until they expire.
    Revoke(SessionRevokeArgs),
}

#[derive(Debug, Args)]
pub struct SessionRevokeArgs {
    /// The user: their `sub`, or their email (matched when the provider
    /// says it is verified, in any case), as in `app create --assign user:`.
    pub user: String,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct TokenCmd {
    #[command(subcommand)]
    pub action: TokenAction,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a single-use join token. It is printed once; the router keeps only its hash.
    Create(TokenCreateArgs),
    /// List join tokens: id, scope, status (unused, used, expired, revoked),
    /// creation and expiry. Secrets are never shown again.
    List(ListArgs),
    /// Revoke an unused join token, so that it enrolls nothing.
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's id: the 16 hex digits after `pt1.`, as `token list` shows.
    pub id: String,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["group", "edge"])))]
pub struct TokenCreateArgs {
    /// Enroll a connector into this group.
    #[arg(long)]
    pub group: Option<String>,
    /// Enroll an edge.
    #[arg(long)]
    pub edge: bool,
    /// The edge's region (with --edge); it must exist (`portico region
    /// create`).
    #[arg(long, default_value = "default", requires = "edge")]
    pub region: String,
    /// How long the token stays valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    #[command(flatten)]
    pub conn: RouterConn,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Keep all state here instead of a temporary directory (reused across runs).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Public HTTPS port of the edge (0 picks a free one).
    #[arg(long, default_value_t = 8443)]
    pub port: u16,
}
