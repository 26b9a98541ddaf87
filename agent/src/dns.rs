//! A DNS resolver for checks that must see what the name servers say now:
//! the connector's backend resolution and the router's CNAME checks.

use std::net::SocketAddr;
use std::time::Duration;

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
