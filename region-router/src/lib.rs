//! The region router: Portico's control plane.
//!
//! It keeps regions, groups, apps, join tokens, connectors, edges and the
//! config version in a [`Store`] (SQLite by default), is the deployment's
//! certificate authority, and serves one HTTPS API (rustls, client
//! certificates optional): admin calls with a bearer token, enrollment with a
//! join token, and certificate renewal, config long-polls and presence
//! reports with the agent's client certificate. It exports its own
//! Prometheus registry on an optional plain-HTTP listener, and, when asked,
//! is the DNS authority of the apps domain (`dns`): app hosts are CNAMEs to
//! the region that serves them, regions A/AAAA of their healthy edges.
//!
//! It does not carry user traffic, hold tunnels, or serve a web console,
//! and has no etcd store yet. One router serves every region: an edge's
//! region comes from its join token.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portico_proto::ids::GroupId;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod api;
mod app_test;
pub mod ca;
mod certificates;
mod config;
mod custom_domain;
mod distribute;
mod dns;
pub mod error;
mod metrics;
mod presence;
mod ratelimit;
mod server;
mod snapshot;
pub mod store;
mod util;

pub use config::{Config, SignInConfig};
pub use error::{Error, StoreError};
pub use ratelimit::EnrollLimit;
pub use store::{SqliteStore, Store};

/// How long `Handle::wait` lets in-flight work finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Lifetime of the API server certificate, issued afresh at each start.
const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A running router.
pub struct Handle {
    /// Where the HTTPS API listens.
    pub api_addr: SocketAddr,
    /// Where `/metrics` listens, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the DNS authority listens (UDP and TCP), when configured.
    pub dns_addr: Option<SocketAddr>,
    /// The CA certificate (PEM) that signs every certificate.
    pub ca_pem: String,
    /// Lower-case hex SHA-256 of the CA certificate (DER).
    pub ca_sha256: String,
    /// The file holding the admin token (0600).
    pub admin_token_path: PathBuf,
    admin_token: String,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("api_addr", &self.api_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("dns_addr", &self.dns_addr)
            .field("ca_sha256", &self.ca_sha256)
            .field("admin_token_path", &self.admin_token_path)
            .field("admin_token", &"***")
            .finish()
    }
}

impl Handle {
    /// The admin token (a secret: never log it).
    pub fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    /// The API's base URL, `https://IP:PORT` (loopback when listening on
    /// every address).
    pub fn url(&self) -> String {
        let ip = match self.api_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, self.api_addr.port()))
    }

    /// Resolves once `shutdown` has been cancelled, in-flight requests have
    /// finished (bounded by a grace period) and the store is closed.
    pub async fn wait(self) -> Result<(), Error> {
        self.shutdown.cancelled().await;
        self.tracker.close();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait()).await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        tracing::info!("router stopped");
        drained.map_err(|_| Error::DrainTimeout {
            grace: SHUTDOWN_GRACE,
        })
    }
}

/// Opens the store, loads or creates the CA and the admin token, binds the
/// listeners and returns once they accept connections.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Handle, Error> {
    config.validate()?;
    let dir = config.data_dir.clone();
    let (ca, admin_token, admin_token_path, store, (session_keys, assertion_keys)) = {
        let dir = dir.clone();
        let err_dir = dir.clone();
        tokio::task::spawn_blocking(move || -> Result<_, Error> {
            prepare_dir(&dir)?;
            let ca = ca::Ca::load_or_create(&dir)?;
            let (token, path) = load_or_create_admin_token(&dir)?;
            let keys = (
                load_or_create_session_keys(&dir)?,
                load_or_create_assertion_keys(&dir)?,
            );
            let store = SqliteStore::open(dir.join("portico.db"))?;
            store.ensure_group(&store::GroupRecord {
                id: GroupId::default_group(),
                region: "auto".into(),
                created_at: util::now_unix(),
            })?;
            Ok((ca, token, path, store, keys))
        })
        .await
        .map_err(|e| Error::Io {
            action: "prepare",
            path: err_dir,
            source: std::io::Error::other(e.to_string()),
        })??
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let version = store.config_version()?;

    // The API's server certificate, issued afresh at each start.
    let server_key = rcgen::KeyPair::generate().map_err(|source| Error::Ca {
        what: "generating the API server key",
        source,
    })?;
    fn tls_err<E: std::error::Error + Send + Sync + 'static>(
        what: &'static str,
    ) -> impl FnOnce(E) -> Error {
        move |e| Error::Tls {
            what,
            source: Box::new(e),
        }
    }
    let issued = ca
        .sign(&server_key, &ca::Profile::RouterServer, SERVER_CERT_TTL)
        .map_err(tls_err("issuing the API server certificate"))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let verifier = portico_agent::pki::client_verifier(ca.cert_pem(), true)
        .map_err(tls_err("building the client certificate verifier"))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(portico_agent::pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("choosing protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![issued.cert_der.clone(), ca.cert_der().clone()],
            key_der,
        )
        .map_err(tls_err("loading the API server certificate"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let listener = server::bind(config.listen)?;
    let api_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(server::bind(addr)?),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(|source| Error::Bind {
            addr: config.metrics_listen.unwrap_or(config.listen),
            source,
        })?),
        None => None,
    };

    let dns_sockets = match config.dns_listen {
        Some(addr) => Some(dns::server::bind(addr).await?),
        None => None,
    };
    let dns_addr = dns_sockets.as_ref().map(|s| s.addr);
    let origin = dns::Origin::new(&config.apps_domain, dns_addr)?;

    let metrics = metrics::Metrics::new()?;
    metrics
        .config_version
        .set(i64::try_from(version).unwrap_or(i64::MAX));
    let tracker = TaskTracker::new();
    let ca_pem = ca.cert_pem().to_owned();
    let ca_sha256 = ca.sha256().to_owned();
    let state = Arc::new(api::AppState {
        config: config.clone(),
        store: store.clone(),
        ca,
        admin_hash: util::sha256(admin_token.as_bytes()),
        presence: Mutex::new(presence::Presence::default()),
        probes: app_test::Probes::default(),
        enroll_limiter: ratelimit::RateLimiter::new(config.enroll_limit, std::time::Instant::now()),
        metrics,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        started: util::now_unix(),
        domains: custom_domain::Checker::new(&config.check_nameservers),
        sign_in: config
            .sign_in
            .as_ref()
            .map(|s| portico_proto::api::SignInSettings {
                issuer: s.issuer.clone(),
                client_id: s.client_id.clone(),
                client_secret: s.client_secret.clone(),
                keys: session_keys,
                session_lifetime_secs: s.session_lifetime.as_secs(),
                groups_claim: s.groups_claim.clone(),
                assertion_keys,
                session_idle_secs: s.session_idle_timeout.as_secs(),
                clients: Vec::new(),
            }),
    });

    tracker.spawn(presence_sweeper(state.clone()));
    tracker.spawn(server::serve_api(
        listener,
        acceptor,
        api::routes(state.clone()),
        shutdown.clone(),
        tracker.clone(),
    ));
    if let Some(l) = metrics_listener {
        tracker.spawn(server::serve_metrics(l, state.clone(), shutdown.clone()));
    }
    if let Some(sockets) = dns_sockets {
        dns::server::start(sockets, state.clone(), origin, shutdown.clone(), &tracker).await?;
    }
    tracing::info!(
        addr = %api_addr,
        metrics = ?metrics_addr,
        dns = ?dns_addr,
        ca_sha256 = %ca_sha256,
        apps_domain = %config.apps_domain,
        version,
        "router listening"
    );
    Ok(Handle {
        api_addr,
        metrics_addr,
        dns_addr,
        ca_pem,
        ca_sha256,
        admin_token_path,
        admin_token,
        store,
        shutdown,
        tracker,
    })
}

/// Creates the data directory (0700) when it does not exist, and refuses
/// a data directory, `ca.key` or `admin-token` that group or others may
/// open.
///
/// Refusing rather than repairing is the choice: a key that others could
/// read may already have been copied, which a `chmod` would hide. The error
/// says which file, its mode, and the command that fixes it.
fn prepare_dir(dir: &Path) -> Result<(), Error> {
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                action: "create",
                path: dir.to_path_buf(),
                source,
            })?;
    }
    check_private(dir, 0o700)?;
    for name in ["ca.key", "admin-token"] {
        let path = dir.join(name);
        if path.exists() {
            check_private(&path, 0o600)?;
        }
    }
    Ok(())
}

/// `InsecurePermissions` when `path` grants group or others any access.
fn check_private(path: &Path, fix: u32) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Io {
        action: "inspect",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
            fix,
        });
    }
    Ok(())
}

/// Reads `DIR/admin-token`, or creates it (32 random bytes, hex, 0600).
fn load_or_create_admin_token(dir: &Path) -> Result<(String, PathBuf), Error> {
    let path = dir.join("admin-token");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::BadAdminToken { path });
            }
            Ok((token, path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = util::random_hex::<32>()?;
            ca::write_file(&path, format!("{token}\n").as_bytes(), 0o600)?;
            tracing::info!(path = %path.display(), "created the admin token");
            Ok((token, path))
        }
        Err(source) => Err(Error::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// The keys edges seal sessions with (`session-keys.json`, 0600): read,
/// or made (one random key) at the first start. Every edge of every region
/// gets them, so a session one edge issued is good at all.
/// The keys edges sign identity assertions with (`<data>/assertion-keys.json`,
/// made at the first start): a list of `{kid, pkcs8}`, the signing key
/// first. The public coordinates are derived from each private key.
fn load_or_create_assertion_keys(
    dir: &Path,
) -> Result<Vec<portico_proto::api::AssertionKey>, Error> {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let path = dir.join("assertion-keys.json");
    let bad = |reason: String| Error::BadSessionKeys {
        path: path.clone(),
        reason,
    };
    let complete = |kid: String, der: &[u8]| -> Result<portico_proto::api::AssertionKey, String> {
        let pair = rcgen::KeyPair::try_from(der).map_err(|e| format!("key {kid}: {e}"))?;
        if !pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(format!("key {kid} is not a P-256 key"));
        }
        let raw = pair.public_key_raw();
        if raw.len() != 65 || raw[0] != 4 {
            return Err(format!("key {kid}: not an uncompressed P-256 point"));
        }
        Ok(portico_proto::api::AssertionKey {
            kid,
            pkcs8: engine.encode(der),
            x: engine.encode(&raw[1..33]),
            y: engine.encode(&raw[33..]),
        })
    };
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Stored {
        kid: String,
        pkcs8: String,
    }
    match fs::read(&path) {
        Ok(bytes) => {
            let stored: Vec<Stored> =
                serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
            if stored.is_empty() {
                return Err(bad(
                    "it lists no key; the signing one must come first".into()
                ));
            }
            stored
                .into_iter()
                .map(|s| {
                    let der = engine
                        .decode(&s.pkcs8)
                        .map_err(|e| format!("key {}: {e}", s.kid))?;
                    complete(s.kid, &der)
                })
                .collect::<Result<_, _>>()
                .map_err(bad)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair =
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
                    Error::Ca {
                        what: "making the identity assertion key",
                        source,
                    }
                })?;
            let kid = util::random_hex::<8>()?;
            let key = complete(kid, &pair.serialize_der()).map_err(bad)?;
            let stored = [Stored {
                kid: key.kid.clone(),
                pkcs8: key.pkcs8.clone(),
            }];
            let text = serde_json::to_vec_pretty(&stored).unwrap_or_default();
            ca::write_file(&path, &text, 0o600)?;
            tracing::info!(path = %path.display(), kid = %key.kid, "created the identity assertion key");
            Ok(vec![key])
        }
        Err(source) => Err(Error::Io {
            action: "read",
            path,
            source,
        }),
    }
}

fn load_or_create_session_keys(dir: &Path) -> Result<Vec<portico_proto::api::SessionKey>, Error> {
    use base64::Engine as _;
    let path = dir.join("session-keys.json");
    match fs::read(&path) {
        Ok(bytes) => {
            let keys: Vec<portico_proto::api::SessionKey> = serde_json::from_slice(&bytes)
                .map_err(|e| Error::BadSessionKeys {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let bad = keys
                .iter()
                .find(|k| engine.decode(&k.secret).map_or(true, |b| b.len() != 32));
            if keys.is_empty() || bad.is_some() {
                return Err(Error::BadSessionKeys {
                    path,
                    reason:
                        "it must list keys of 32 bytes of base64url each, the sealing one first"
                            .into(),
                });
            }
            Ok(keys)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(util::random_bytes::<32>()?);
            let keys = vec![portico_proto::api::SessionKey { id: 1, secret }];
            let text = serde_json::to_vec_pretty(&keys).unwrap_or_default();
            ca::write_file(&path, &text, 0o600)?;
            tracing::info!(path = %path.display(), "created the session key");
            Ok(keys)
        }
        Err(source) => Err(Error::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// Keeps presence in the store true to time: every second, the groups of
/// edges whose latest report is no longer fresh (3 report intervals) are
/// emptied, which bumps the config version, so every edge hears of it
/// over its watch. Also follows the store's version into the
/// `portico_router_config_version` gauge.
async fn presence_sweeper(state: Arc<api::AppState>) {
    let mut versions = state.store.subscribe();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
                let v = *versions.borrow_and_update();
                state.metrics.config_version.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
            _ = tick.tick() => {
                let stale_before = state.at().stale_before();
                if stale_before == 0 {
                    continue; // not up for a whole window yet
                }
                let store = state.store.clone();
                match state.tracker.spawn_blocking(move || store.expire_presence(stale_before)).await {
                    Ok(Ok(Some(version))) => tracing::info!(version, "stale edges left the presence map"),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %portico_agent::error_chain(&e), "expiring presence failed"),
                    Err(e) => tracing::warn!(error = %portico_agent::error_chain(&e), "presence task failed"),
                }
            }
        }
    }
}
