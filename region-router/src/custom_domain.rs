//! Custom domains: an app's external host outside the apps domain
//! (`hr.corp.example.com`) is accepted only when its CNAME chain, as a
//! resolver sees it, reaches the app's default host (`<id>.<apps
//! domain>`), which the router's DNS zone answers. The check runs when the
//! host is configured (`app create`, or `app update` with a new
//! `--external-host`), as Entra checks a custom domain when it is set, not
//! on every request: DNS changed later is `portico app test`'s to see.
//!
//! The walk asks one `CNAME` question per name, to the nameservers of
//! `--check-nameserver` (else `/etc/resolv.conf`'s), with hickory-resolver
//! (no cache, no hosts file, no search domains; 2 s per query, 2
//! attempts), at most [`MAX_HOPS`] hops and [`CHECK_TIME`] in all, loops
//! detected. Every refusal shows the chain it saw and what it expected.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// The most CNAME hops followed.
pub(crate) const MAX_HOPS: usize = 8;
/// How long one whole check may take.
pub(crate) const CHECK_TIME: Duration = Duration::from_secs(10);
/// The most nameservers asked (the connector's bound too).
pub(crate) use portico_agent::dns::MAX_NAMESERVERS;
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;

/// A chain of names, printed `a -> b -> c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain(pub Vec<String>);

impl std::fmt::Display for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(" -> "))
    }
}

/// Why a custom host is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DomainError {
    #[error("cannot check the CNAME chain of {host:?}: {reason}")]
    NoNameserver { host: String, reason: String },
    #[error("the CNAME chain {chain} ends at {end:?}, not at the app's default host {expected:?}: make {host:?} a CNAME to {expected:?} (directly or through names of your own)")]
    WrongTarget {
        chain: Chain,
        host: String,
        end: String,
        expected: String,
    },
    #[error("the CNAME chain {chain} reaches {name:?}, which does not exist (NXDOMAIN), not the app's default host {expected:?}: make {host:?} a CNAME to {expected:?}")]
    NxDomain {
        chain: Chain,
        host: String,
        name: String,
        expected: String,
    },
    #[error("the CNAME chain {chain} loops; it must end at the app's default host {expected:?}")]
    Loop { chain: Chain, expected: String },
    #[error("the CNAME chain {chain} is longer than {max} hops without reaching the app's default host {expected:?}")]
    TooLong {
        chain: Chain,
        max: usize,
        expected: String,
    },
    #[error("the CNAME chain {chain} could not be followed: asking for {name:?} CNAME failed (expected to reach {expected:?})")]
    Query {
        chain: Chain,
        name: String,
        expected: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("following the CNAME chain of {host:?} took longer than {}; got as far as {chain} (expected to reach {expected:?})", humantime::format_duration(*limit))]
    TimedOut {
        host: String,
        chain: Chain,
        limit: Duration,
        expected: String,
    },
}

/// The answer to one `CNAME` question.
#[derive(Debug)]
pub(crate) enum Hop {
    /// The name is an alias of this one (lower case, no final dot).
    Cname(String),
    /// The name exists and is no alias: the chain ends here.
    End,
    NxDomain,
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// One `CNAME` question at a time: what the walk needs of DNS.
pub(crate) trait CnameLookup: Send + Sync {
    fn cname(&self, name: &str) -> impl Future<Output = Hop> + Send;
}

/// Checks custom hosts' chains against the configured nameservers.
pub(crate) struct Checker {
    resolver: Result<hickory_resolver::TokioResolver, String>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("ready", &self.resolver.is_ok())
            .finish()
    }
}

impl Checker {
    /// Asks `nameservers`, or those of `/etc/resolv.conf` when empty.
    /// Never fails: without a nameserver, each check is refused with the
    /// reason.
    pub(crate) fn new(nameservers: &[SocketAddr]) -> Checker {
        let servers = if nameservers.is_empty() {
            portico_agent::dns::system_nameservers("--check-nameserver")
        } else {
            Ok(nameservers.to_vec())
        };
        Checker {
            resolver: servers.and_then(|s| resolver(&s)),
        }
    }

    /// `Ok(chain)` when `host`'s chain reaches `expected`.
    pub(crate) async fn check(&self, host: &str, expected: &str) -> Result<Chain, DomainError> {
        let resolver = self
            .resolver
            .as_ref()
            .map_err(|reason| DomainError::NoNameserver {
                host: host.to_owned(),
                reason: reason.clone(),
            })?;
        let seen = std::sync::Mutex::new(vec![host.to_owned()]);
        let lookup = Hickory(resolver);
        let walking = walk(&lookup, host, expected, &seen);
        match tokio::time::timeout(CHECK_TIME, walking).await {
            Ok(r) => r,
            Err(_) => Err(DomainError::TimedOut {
                host: host.to_owned(),
                chain: Chain(seen.lock().unwrap_or_else(|p| p.into_inner()).clone()),
                limit: CHECK_TIME,
                expected: expected.to_owned(),
            }),
        }
    }
}

/// Follows `host`'s chain until it reaches `expected`; `seen` holds the
/// chain so far (for a timeout's message).
pub(crate) async fn walk<L: CnameLookup>(
    lookup: &L,
    host: &str,
    expected: &str,
    seen: &std::sync::Mutex<Vec<String>>,
) -> Result<Chain, DomainError> {
    let chain = || Chain(seen.lock().unwrap_or_else(|p| p.into_inner()).clone());
    let mut cur = host.to_owned();
    for _ in 0..=MAX_HOPS {
        if cur == expected {
            return Ok(chain());
        }
        match lookup.cname(&cur).await {
            Hop::Cname(target) => {
                let looped = {
                    let mut names = seen.lock().unwrap_or_else(|p| p.into_inner());
                    let looped = names.contains(&target);
                    names.push(target.clone());
                    looped
                };
                if looped {
                    return Err(DomainError::Loop {
                        chain: chain(),
                        expected: expected.to_owned(),
                    });
                }
                cur = target;
            }
            Hop::End => {
                return Err(DomainError::WrongTarget {
                    chain: chain(),
                    host: host.to_owned(),
                    end: cur,
                    expected: expected.to_owned(),
                })
            }
            Hop::NxDomain => {
                return Err(DomainError::NxDomain {
                    chain: chain(),
                    host: host.to_owned(),
                    name: cur,
                    expected: expected.to_owned(),
                })
            }
            Hop::Failed(source) => {
                return Err(DomainError::Query {
                    chain: chain(),
                    name: cur,
                    expected: expected.to_owned(),
                    source,
                })
            }
        }
    }
    if cur == expected {
        return Ok(chain());
    }
    Err(DomainError::TooLong {
        chain: chain(),
        max: MAX_HOPS,
        expected: expected.to_owned(),
    })
}

struct Hickory<'a>(&'a hickory_resolver::TokioResolver);

impl CnameLookup for Hickory<'_> {
    fn cname(&self, name: &str) -> impl Future<Output = Hop> + Send {
        use hickory_proto::rr::{Name, RData, RecordType};
        let fqdn = format!("{name}.");
        let name = name.to_owned();
        async move {
            let qname = match Name::from_ascii(&fqdn) {
                Ok(n) => n,
                Err(e) => return Hop::Failed(Box::new(e)),
            };
            match self.0.lookup(qname, RecordType::CNAME).await {
                Ok(lookup) => lookup
                    .answers()
                    .iter()
                    .find_map(|r| match &r.data {
                        RData::CNAME(c) if normalize(&r.name.to_ascii()) == name => {
                            Some(Hop::Cname(normalize(&c.0.to_ascii())))
                        }
                        _ => None,
                    })
                    .unwrap_or(Hop::End),
                Err(e) if e.is_nx_domain() => Hop::NxDomain,
                Err(e) if e.is_no_records_found() => Hop::End,
                Err(e) => Hop::Failed(Box::new(e)),
            }
        }
    }
}

/// `Name` text → lower case, no final dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn resolver(servers: &[SocketAddr]) -> Result<hickory_resolver::TokioResolver, String> {
    portico_agent::dns::uncached_resolver(servers, QUERY_TIMEOUT, QUERY_ATTEMPTS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Zone(HashMap<&'static str, &'static str>);

    impl CnameLookup for Zone {
        fn cname(&self, name: &str) -> impl Future<Output = Hop> + Send {
            let hop = match self.0.get(name) {
                Some(&"NX") => Hop::NxDomain,
                Some(&"END") => Hop::End,
                Some(t) => Hop::Cname((*t).to_owned()),
                None => Hop::Failed("refused".into()),
            };
            std::future::ready(hop)
        }
    }

    async fn check(
        zone: &[(&'static str, &'static str)],
        host: &str,
    ) -> Result<Chain, DomainError> {
        let zone = Zone(zone.iter().copied().collect());
        let seen = std::sync::Mutex::new(vec![host.to_owned()]);
        walk(&zone, host, "hr.apps.test", &seen).await
    }

    #[tokio::test]
    async fn chains_are_followed_to_the_default_host_or_refused_with_what_was_seen() {
        let ok = check(
            &[
                ("hr.corp.test", "lb.corp.test"),
                ("lb.corp.test", "hr.apps.test"),
            ],
            "hr.corp.test",
        )
        .await
        .unwrap();
        assert_eq!(
            ok.to_string(),
            "hr.corp.test -> lb.corp.test -> hr.apps.test"
        );

        let e = check(
            &[("hr.corp.test", "other.test"), ("other.test", "END")],
            "hr.corp.test",
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().starts_with("the CNAME chain hr.corp.test -> other.test ends at \"other.test\", not at the app's default host \"hr.apps.test\""),
            "{e}"
        );
        let e = check(
            &[("hr.corp.test", "gone.test"), ("gone.test", "NX")],
            "hr.corp.test",
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, DomainError::NxDomain { ref name, .. } if name == "gone.test"),
            "{e}"
        );
        let e = check(&[("a.test", "b.test"), ("b.test", "a.test")], "a.test")
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the CNAME chain a.test -> b.test -> a.test loops; it must end at the app's default host \"hr.apps.test\""
        );
        let long: Vec<(&'static str, &'static str)> = vec![
            ("h0", "h1"),
            ("h1", "h2"),
            ("h2", "h3"),
            ("h3", "h4"),
            ("h4", "h5"),
            ("h5", "h6"),
            ("h6", "h7"),
            ("h7", "h8"),
            ("h8", "h9"),
            ("h9", "hr.apps.test"),
        ];
        let e = check(&long, "h0").await.unwrap_err();
        assert!(
            matches!(e, DomainError::TooLong { max: MAX_HOPS, .. }),
            "{e}"
        );
        // Eight hops is within the bound.
        let e = check(&long[2..], "h2").await.unwrap();
        assert_eq!(e.0.len(), MAX_HOPS + 1);
        let e = check(&[], "hr.corp.test").await.unwrap_err();
        assert!(matches!(e, DomainError::Query { .. }), "{e}");
    }
}
