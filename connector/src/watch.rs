//! The config watch: long-polls the router for this connector's config,
//! persists every snapshot, and keeps the last one when the router is away.

use std::sync::Arc;
use std::time::Duration;

use portico_agent::{Credentials, RouterClient, RouterTrust, StateDir};
use portico_proto::api::ConnectorConfig;
use tokio::sync::watch;

use crate::tunnel::Pool;

/// The router path of the connector config.
pub(crate) const CONFIG_PATH: &str = "/v1/connector/config";
/// The snapshot file in the state directory.
pub(crate) const CONFIG_FILE: &str = "connector-config.json";
/// How long one long-poll waits on the router.
const WATCH_WAIT: Duration = Duration::from_secs(25);
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Makes `config` the current one: for the stream handlers and the slots.
pub(crate) fn apply(
    pool: &Pool,
    tx: &watch::Sender<Option<Arc<ConnectorConfig>>>,
    config: Arc<ConnectorConfig>,
) {
    if config.group != pool.group {
        tracing::warn!(config_group = %config.group, group = %pool.group, "the router sent another group's config; serving only this group's apps");
    }
    pool.streams
        .set_apps(&config.apps, &config.links, &config.backend_cas);
    tx.send_replace(Some(config));
}

/// Watches the router until the pool stops. The first poll asks for
/// version 0, so a router that restarted with fewer versions is followed.
pub(crate) async fn run(
    pool: Arc<Pool>,
    state: StateDir,
    router_url: String,
    tx: watch::Sender<Option<Arc<ConnectorConfig>>>,
) {
    let mut router = Router::new(&pool, router_url);
    let mut version = 0u64;
    let mut retry = RETRY_MIN;
    loop {
        let c = match router.client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %portico_agent::error_chain(&e), "cannot build the router client");
                if !pause(&pool, &mut retry, RETRY_MAX).await {
                    return;
                }
                continue;
            }
        };
        let answer = tokio::select! {
            _ = pool.stop.cancelled() => return,
            r = c.watch::<ConnectorConfig>(CONFIG_PATH, version, WATCH_WAIT) => r,
        };
        match answer {
            Ok(Some(config)) => {
                retry = RETRY_MIN;
                let changed = tx.borrow().as_ref().is_none_or(|old| **old != config);
                version = config.version;
                if changed {
                    tracing::info!(
                        version = config.version,
                        apps = config.apps.len(),
                        edges = config.edges.len(),
                        "config received"
                    );
                    if let Err(e) = state.save_json(CONFIG_FILE, &config) {
                        tracing::warn!(error = %portico_agent::error_chain(&e), "cannot persist the config snapshot");
                    }
                    apply(&pool, &tx, Arc::new(config));
                }
            }
            Ok(None) => retry = RETRY_MIN,
            Err(e) if e.is_revoked() => {
                let detail = e.api_error().map_or_else(
                    || e.to_string(),
                    |a| format!("the router says: {}", a.message),
                );
                pool.revoked(detail);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %portico_agent::error_chain(&e), retry_in = ?retry, "config watch failed; serving the last config");
                if !pause(&pool, &mut retry, RETRY_MAX).await {
                    return;
                }
            }
        }
    }
}

/// The router client of a connector's long-polls (its config, its probe
/// jobs), on its current credentials: made again when they change (a
/// renewed certificate), else kept.
pub(crate) struct Router {
    url: String,
    creds: watch::Receiver<Arc<Credentials>>,
    client: Option<RouterClient>,
}

impl Router {
    pub(crate) fn new(pool: &Pool, url: String) -> Router {
        Router {
            url,
            creds: pool.creds.clone(),
            client: None,
        }
    }

    /// The client (cheap to clone; clones share connections).
    pub(crate) fn client(&mut self) -> Result<RouterClient, portico_agent::ClientError> {
        if let Some(c) = &self.client {
            if !self.creds.has_changed().unwrap_or(false) {
                return Ok(c.clone());
            }
        }
        let creds = self.creds.borrow_and_update().clone();
        let c = RouterClient::new(
            &self.url,
            RouterTrust::CaPem(creds.ca_pem.clone()),
            Some(&creds),
        )?;
        self.client = Some(c.clone());
        Ok(c)
    }
}

/// Sleeps a jittered `retry` and doubles it, up to `max`; false when the
/// pool stopped.
pub(crate) async fn pause(pool: &Pool, retry: &mut Duration, max: Duration) -> bool {
    let delay = retry.mul_f64(0.5 + fastrand::f64() / 2.0);
    *retry = (*retry * 2).min(max);
    tokio::select! {
        _ = pool.stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
