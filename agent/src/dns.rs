//! A DNS resolver for checks that must see what the name servers say now:
//! the connector's backend resolution and the router's CNAME checks, and
//! the nameservers of `/etc/resolv.conf` when none are configured.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The most nameservers asked (configured, or read from resolv.conf).
pub const MAX_NAMESERVERS: usize = 8;
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// The most read of `/etc/resolv.conf`.
const MAX_RESOLV_CONF: u64 = 64 * 1024;

/// The `nameserver` lines of `/etc/resolv.conf`, port 53. `flag` is the
/// option that names nameservers instead, for the message when there are
/// none.
pub fn system_nameservers(flag: &str) -> Result<Vec<SocketAddr>, String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(RESOLV_CONF)
        .and_then(|f| f.take(MAX_RESOLV_CONF).read_to_string(&mut text))
        .map_err(|e| format!("{flag} is not set and {RESOLV_CONF} cannot be read ({e})"))?;
    let servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        return Err(format!(
            "{flag} is not set and {RESOLV_CONF} lists no nameserver"
        ));
    }
    Ok(servers)
}

/// The `nameserver IP` lines of a resolv.conf (a zone index such as
/// `%eth0` is dropped), at most [`MAX_NAMESERVERS`].
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip = words.next()?.split('%').next()?;
            ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .take(MAX_NAMESERVERS)
        .collect()
}

/// hickory-resolver asking only `servers` (UDP, then TCP for a truncated
/// answer), with no cache, no hosts file and no search domains, keeping
/// a CNAME chain's intermediate records; both address families for IP
/// lookups. Each query waits `timeout`, `attempts` times.
pub fn uncached_resolver(
    servers: &[SocketAddr],
    timeout: Duration,
    attempts: usize,
) -> Result<hickory_resolver::TokioResolver, String> {
    use hickory_resolver::config::{
        LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
    };
    let name_servers = servers
        .iter()
        .map(|s| {
            let mut ns = NameServerConfig::udp_and_tcp(s.ip());
            for c in &mut ns.connections {
                c.port = s.port();
            }
            ns
        })
        .collect();
    let config = ResolverConfig::from_parts(None, vec![], name_servers);
    let mut opts = ResolverOpts::default();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.preserve_intermediates = true;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.cache_size = 0;
    opts.ndots = 0;
    opts.timeout = timeout;
    opts.attempts = attempts;
    hickory_resolver::Resolver::builder_with_config(
        config,
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}
