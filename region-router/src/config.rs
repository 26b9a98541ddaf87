//! The router's configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;
use crate::ratelimit::EnrollLimit;

/// Where the router keeps its state and where it listens. A router has no
/// region of its own: it serves every region in its store.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `portico.db`, `ca.pem`, `ca.key` and `admin-token`.
    pub data_dir: PathBuf,
    /// The HTTPS API (default `127.0.0.1:7443`).
    pub listen: SocketAddr,
    /// Plain HTTP `/metrics`, `/healthz` and `/ready`; none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// App hosts lie under it (default `apps.localhost`).
    pub apps_domain: String,
    /// Lifetime of connector and edge certificates (default 24 h).
    pub cert_ttl: Duration,
    /// The port shown in `App.external_url`. `None`: the port of the first
    /// edge's reported public address, else 443.
    pub public_port: Option<u16>,
    /// How often one source address may call `POST /v1/enroll`.
    pub enroll_limit: EnrollLimit,
    /// The DNS authority for the apps domain, UDP and TCP on this address
    /// (port 0 picks one free for both); none by default.
    pub dns_listen: Option<SocketAddr>,
    /// The OpenID provider that apps with `preauth = oidc` sign their
    /// users in with; none by default (such apps are then refused).
    pub sign_in: Option<SignInConfig>,
    /// The nameservers that check a custom domain's CNAME chain (at most
    /// 8); empty: those of `/etc/resolv.conf`.
    pub check_nameservers: Vec<SocketAddr>,
}

/// The deployment's OpenID provider. Edges get it, with the session keys
/// (`<data>/session-keys.json`, made at the first start), in their config.
#[derive(Clone)]
pub struct SignInConfig {
    /// The issuer URL; discovery is at `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// How long a session lasts from its sign-in (default 8 h).
    pub session_lifetime: Duration,
    /// The claim that lists a user's groups, for assignment (default
    /// `groups`).
    pub groups_claim: String,
    /// How long a session lasts without a request (default 1 h); at most
    /// the lifetime.
    pub session_idle_timeout: Duration,
}

impl std::fmt::Debug for SignInConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignInConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .field("session_lifetime", &self.session_lifetime)
            .field("groups_claim", &self.groups_claim)
            .field("session_idle_timeout", &self.session_idle_timeout)
            .finish()
    }
}

/// The shortest idle timeout of a session.
pub const MIN_SESSION_IDLE: Duration = Duration::from_secs(1);

/// The longest session lifetime.
pub const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

impl Config {
    /// The defaults, with state in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            metrics_listen: None,
            apps_domain: "apps.localhost".to_owned(),
            cert_ttl: Duration::from_secs(24 * 3600),
            public_port: None,
            enroll_limit: EnrollLimit::default(),
            dns_listen: None,
            sign_in: None,
            check_nameservers: Vec::new(),
        }
    }

    /// Checks the values that types alone do not.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(s) = &self.sign_in {
            match url::Url::parse(&s.issuer) {
                Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {}
                _ => {
                    return Err(Error::InvalidConfig {
                        field: "oidc_issuer",
                        reason: format!("{:?} is not an http(s) URL", s.issuer),
                    })
                }
            }
            if s.client_id.is_empty() || s.client_secret.is_empty() {
                return Err(Error::InvalidConfig {
                    field: "oidc_client_id",
                    reason: "the client id and secret must both be set".into(),
                });
            }
            if s.groups_claim.is_empty()
                || s.groups_claim.len() > 128
                || !s.groups_claim.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(Error::InvalidConfig {
                    field: "oidc_groups_claim",
                    reason: format!(
                        "{:?} is not a claim name (1 to 128 visible characters)",
                        s.groups_claim
                    ),
                });
            }
            if s.session_lifetime.is_zero() || s.session_lifetime > MAX_SESSION_LIFETIME {
                return Err(Error::InvalidConfig {
                    field: "session_lifetime",
                    reason: format!(
                        "must be more than 0 and at most {}",
                        humantime::format_duration(MAX_SESSION_LIFETIME)
                    ),
                });
            }
            if s.session_idle_timeout < MIN_SESSION_IDLE
                || s.session_idle_timeout > s.session_lifetime
            {
                return Err(Error::InvalidConfig {
                    field: "session_idle_timeout",
                    reason: format!(
                        "must be at least {} and at most the session lifetime ({})",
                        humantime::format_duration(MIN_SESSION_IDLE),
                        humantime::format_duration(s.session_lifetime)
                    ),
                });
            }
        }
        if self.check_nameservers.len() > crate::custom_domain::MAX_NAMESERVERS {
            return Err(Error::InvalidConfig {
                field: "check_nameserver",
                reason: format!(
                    "at most {} nameservers",
                    crate::custom_domain::MAX_NAMESERVERS
                ),
            });
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::InvalidConfig {
                field: "data_dir",
                reason: "must not be empty".into(),
            });
        }
        if let Err(reason) = check_dns_name(&self.apps_domain) {
            return Err(Error::InvalidConfig {
                field: "apps_domain",
                reason,
            });
        }
        if self.apps_domain != self.apps_domain.to_ascii_lowercase() {
            return Err(Error::InvalidConfig {
                field: "apps_domain",
                reason: "must be lower case".into(),
            });
        }
        // Lifetimes of seconds are for tests that exercise renewal.
        if self.cert_ttl < Duration::from_secs(5)
            || self.cert_ttl > Duration::from_secs(366 * 24 * 3600)
        {
            return Err(Error::InvalidConfig {
                field: "cert_ttl",
                reason: format!(
                    "must be between 5 seconds and 366 days, not {:?}",
                    self.cert_ttl
                ),
            });
        }
        let limit = &self.enroll_limit;
        for (field, value) in [
            ("enroll_limit.burst", limit.burst as usize),
            ("enroll_limit.per_minute", limit.per_minute as usize),
            ("enroll_limit.max_addresses", limit.max_addresses),
        ] {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.public_port == Some(0) {
            return Err(Error::InvalidConfig {
                field: "public_port",
                reason: "must not be 0".into(),
            });
        }
        Ok(())
    }
}

/// Checks that `name` is a DNS name: dot-separated labels of 1 to 63
/// letters, digits and hyphens (not at either end), 253 bytes at most.
pub(crate) fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 253 {
        return Err(format!("is {} bytes long, the limit is 253", name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("{name:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "label {label:?} may only contain letters, digits and '-'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} must not start or end with '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = Config::new("/tmp/x");
        c.validate().expect("defaults are valid");
        assert_eq!(c.listen.port(), 7443);
        assert_eq!(c.apps_domain, "apps.localhost");
        assert_eq!(c.cert_ttl, Duration::from_secs(86400));
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = Config::new("/tmp/x");
        c.apps_domain = "bad_domain".into();
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "apps_domain",
                ..
            })
        ));
        let mut c = Config::new("/tmp/x");
        c.cert_ttl = Duration::from_secs(1);
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "cert_ttl",
                ..
            })
        ));
        let mut c = Config::new("/tmp/x");
        c.enroll_limit.per_minute = 0;
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "enroll_limit.per_minute",
                ..
            })
        ));
        let mut c = Config::new("");
        c.public_port = Some(0);
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidConfig {
                field: "data_dir",
                ..
            })
        ));
    }

    #[test]
    fn dns_names() {
        assert!(check_dns_name("hr.apps.example.com").is_ok());
        assert!(check_dns_name("a-b.c").is_ok());
        assert!(check_dns_name("-a.c").is_err());
        assert!(check_dns_name("a..c").is_err());
        assert!(check_dns_name("a_b.c").is_err());
        assert!(check_dns_name(&"a".repeat(64)).is_err());
        assert!(check_dns_name("").is_err());
    }
}
