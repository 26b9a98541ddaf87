//! The edge's side of the control plane: enrollment and renewal, the public
//! certificate, the config long-poll (with the saved snapshot for static
//! stability) and the presence reports.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portico_agent::enroll::{self, EnrollOptions};
use portico_agent::{pki, Credentials, RouterClient, RouterTrust, Secret, StateDir};
use portico_proto::api::{
    CertResponse, CsrRequest, EdgeConfig, EdgeReport, SignOuts, SignedOut, MAX_SIGN_OUTS_PER_REPORT,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::revoke::{HandoffAnswer, HandoffCheck};
use crate::certs::CertStore;
use crate::config::{advertised, Config};
use crate::error::Error;
use crate::{edge_identity, Handle, Parts, Shared};

/// The saved config snapshot.
const CONFIG_FILE: &str = "edge-config.json";
/// The saved router-issued public certificate.
const PUBLIC_CERT_FILE: &str = "public-cert.json";
/// How long one config long-poll waits on the router.
const WATCH_WAIT: Duration = Duration::from_secs(25);
/// How often presence is reported without a tunnel change; the router
/// counts a report for three of these.
const REPORT_EVERY: Duration = portico_proto::api::EDGE_REPORT_INTERVAL;
/// How long tunnel changes are gathered before a report.
const REPORT_DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Serialize, Deserialize)]
struct SavedPublicCert {
    cert_pem: String,
    key_pem: Secret,
}

pub(crate) async fn start(config: Config, shutdown: CancellationToken) -> Result<Handle, Error> {
    let state = StateDir::open(&config.state_dir)?;
    let opts = EnrollOptions {
        router_url: config.router_url.clone(),
        token: config.token.clone(),
        host: host_name(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kind: portico_proto::api::EnrollKind::Edge,
        region: config.region.clone(),
    };
    let creds = enroll::obtain(&state, &opts).await?;
    let (edge_id, region) = edge_identity(&creds.identity)?;
    // A first enrollment was already checked by the router; saved
    // credentials are checked here.
    if let Some(configured) = &config.region {
        if *configured != region {
            return Err(Error::RegionMismatch {
                configured: configured.clone(),
                enrolled: region,
                state_dir: config.state_dir.clone(),
            });
        }
    }

    let tunnel_cert = CertStore::new();
    tunnel_cert.set(creds.cert_chain()?, creds.private_key()?)?;

    let public_cert = CertStore::new();
    let router_public_cert = match &config.public_cert {
        Some((cert_path, key_path)) => {
            let read = |p: &std::path::PathBuf| {
                std::fs::read_to_string(p).map_err(|source| Error::ReadFile {
                    path: p.clone(),
                    source,
                })
            };
            public_cert.set_pem(&read(cert_path)?, &read(key_path)?)?;
            false
        }
        None => {
            match state.load_json::<SavedPublicCert>(PUBLIC_CERT_FILE) {
                Ok(Some(saved)) => {
                    if let Err(e) = public_cert.set_pem(&saved.cert_pem, saved.key_pem.expose()) {
                        tracing::warn!(error = %portico_agent::error_chain(&e), "saved public certificate is unusable");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %portico_agent::error_chain(&e), "cannot read the saved public certificate")
                }
            }
            true
        }
    };

    let initial_config = match state.load_json::<EdgeConfig>(CONFIG_FILE) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %portico_agent::error_chain(&e), "ignoring the saved config snapshot");
            None
        }
    };
    if let Some(c) = &initial_config {
        tracing::info!(
            version = c.version,
            "serving from the saved config snapshot until the router answers"
        );
    }

    let handle = crate::serve(
        Parts {
            edge_id,
            region,
            tunnel_cert: Arc::clone(&tunnel_cert),
            ca_pem: creds.ca_pem.clone(),
            public_cert: Arc::clone(&public_cert),
            initial_config,
            public_listen: config.public_listen,
            http3: config.http3,
            tunnel_listen: config.tunnel_listen,
            mesh_listen: config.mesh_listen,
            mesh_dial_overrides: config.mesh_dial_overrides.clone(),
            metrics_listen: config.metrics_listen,
            drain_delay: config.drain_delay,
            grace: config.grace,
            connector_timeout_grace: config.connector_timeout_grace,
            access_log: config.access_log,
            limits: config.user_limits(),
            tunnels: config.tunnel_policy(),
            shards: config.shards,
        },
        shutdown.clone(),
    )
    .await?;
    let shared = Arc::clone(&handle.shared);
    let span = tracing::info_span!("edge", edge.id = %handle.id);

    let creds_rx = enroll::spawn_renewal(
        state.clone(),
        config.router_url.clone(),
        creds,
        shutdown.clone(),
        &shared.tracker,
    );
    // Renewed edge certificate → the QUIC listener presents it from now on.
    {
        let mut rx = creds_rx.clone();
        let shutdown = shutdown.clone();
        shared.tracker.spawn(
            async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        r = rx.changed() => if r.is_err() { return },
                    }
                    let creds = rx.borrow_and_update().clone();
                    match creds
                        .cert_chain()
                        .and_then(|c| Ok((c, creds.private_key()?)))
                    {
                        Ok((chain, key)) => match tunnel_cert.set(chain, key) {
                            Ok(()) => tracing::info!(
                                "tunnel listener now presents the renewed certificate"
                            ),
                            Err(e) => tracing::warn!(error = %portico_agent::error_chain(&e), "renewed certificate unusable"),
                        },
                        Err(e) => tracing::warn!(error = %portico_agent::error_chain(&e), "renewed certificate unusable"),
                    }
                }
            }
            .instrument(span.clone()),
        );
    }

    let routers = Routers {
        url: config.router_url.clone(),
        creds: creds_rx,
    };
    // The names wildcard apps need the public certificate to carry, from
    // each config to the public certificate's loop.
    let (wildcards_tx, wildcards_rx) = watch::channel(wildcard_names(&shared.table.load().config));
    if router_public_cert {
        if !public_cert.is_set() {
            // First start: try once now so that HTTPS works as soon as
            // `start` returns; the loop below keeps trying otherwise.
            match fetch_public_cert(&routers, &state).await {
                Ok((cert_pem, key_pem, _)) => {
                    if let Err(e) = public_cert.set_pem(&cert_pem, &key_pem) {
                        tracing::warn!(error = %portico_agent::error_chain(&e), "router-issued public certificate unusable");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %portico_agent::error_chain(&e), "cannot get a public certificate yet; retrying")
                }
            }
        }
        shared.tracker.spawn(
            public_cert_loop(
                routers.clone(),
                state.clone(),
                public_cert,
                wildcards_rx,
                Arc::clone(&shared),
            )
            .instrument(span.clone()),
        );
    }
    shared.tracker.spawn(
        config_loop(routers.clone(), state, wildcards_tx, Arc::clone(&shared))
            .instrument(span.clone()),
    );
    let report = EdgeReport {
        tunnel_addr: advertised(&config.advertise_tunnel_addr, handle.tunnel_addr),
        public_addr: advertised(&config.advertise_public_addr, handle.public_addr),
        mesh_addr: handle
            .mesh_addr
            .map(|bound| advertised(&config.advertise_mesh_addr, bound)),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        tunnels: Vec::new(),
        draining: false,
    };
    let (sign_outs, sign_outs_rx) = tokio::sync::mpsc::channel(SIGN_OUT_QUEUE);
    let (handoffs, handoffs_rx) = tokio::sync::mpsc::channel(SIGN_OUT_QUEUE);
    shared.auth.connect_router(crate::auth::revoke::RouterLink {
        sign_outs,
        handoffs,
    });
    shared.tracker.spawn(
        sign_out_loop(routers.clone(), sign_outs_rx, Arc::clone(&shared)).instrument(span.clone()),
    );
    shared.tracker.spawn(
        handoff_loop(routers.clone(), handoffs_rx, Arc::clone(&shared)).instrument(span.clone()),
    );
    shared
        .tracker
        .spawn(report_loop(routers, report, Arc::clone(&shared)).instrument(span));
    Ok(handle)
}

/// Router clients built from the current credentials.
#[derive(Clone)]
struct Routers {
    url: String,
    creds: watch::Receiver<Arc<Credentials>>,
}

impl Routers {
    fn client(&self) -> Result<RouterClient, Error> {
        let creds = self.creds.borrow().clone();
        Ok(RouterClient::new(
            &self.url,
            RouterTrust::CaPem(creds.ca_pem.clone()),
            Some(&creds),
        )?)
    }
}

/// Follows the router's config by long-poll, saving and applying each new
/// version. Errors back off (1 s doubling to 30 s, jittered).
async fn config_loop(
    routers: Routers,
    state: StateDir,
    wildcards: watch::Sender<Vec<String>>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new();
    let mut client: Option<(Arc<Credentials>, RouterClient)> = None;
    let mut first = true;
    loop {
        let creds = routers.creds.borrow().clone();
        let c = match &client {
            Some((used, c)) if Arc::ptr_eq(used, &creds) => c.clone(),
            _ => match routers.client() {
                Ok(c) => {
                    client = Some((creds, c.clone()));
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %portico_agent::error_chain(&e), "cannot build a router client");
                    if backoff.sleep(&shared.hard_stop).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
        };
        // The first poll asks for everything (after=0): a saved snapshot may
        // be newer than a router whose store was rebuilt, and the router is
        // the authority.
        let after = if first {
            0
        } else {
            shared.table.load().version()
        };
        let answer = tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            r = c.watch::<EdgeConfig>("/v1/edge/config", after, WATCH_WAIT) => r,
        };
        shared
            .router_reachable
            .store(answer.is_ok(), std::sync::atomic::Ordering::Relaxed);
        match answer {
            Ok(Some(config)) => {
                first = false;
                backoff.reset();
                // How long the change took from the router's store to
                // here (clocks of different machines may differ).
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                if config.changed_at_ms > 0 {
                    let took = now_ms.saturating_sub(config.changed_at_ms);
                    shared
                        .metrics
                        .config_propagation
                        .observe(took as f64 / 1000.0);
                    tracing::info!(
                        version = config.version,
                        propagation_ms = took,
                        "config change arrived"
                    );
                }
                let names = wildcard_names(&config);
                wildcards.send_if_modified(|seen| {
                    let changed = *seen != names;
                    *seen = names;
                    changed
                });
                // Serve it first; the snapshot on disk is for a restart.
                let mut config = config;
                shared.apply_config(config.clone());
                // The config's sign-outs are a delta: the snapshot keeps
                // every one still live.
                (config.signed_out, config.signed_out_users) = shared.auth.signed_out_live();
                if let Err(e) = state.save_json(CONFIG_FILE, &config) {
                    tracing::warn!(error = %portico_agent::error_chain(&e), "cannot save the config snapshot");
                }
            }
            Ok(None) => backoff.reset(),
            Err(e) => {
                if e.is_revoked() {
                    tracing::error!(
                        "the router says this edge was deleted; serving the last config"
                    );
                } else {
                    tracing::warn!(error = %portico_agent::error_chain(&e), "config watch failed; serving the last config");
                }
                if backoff.sleep(&shared.hard_stop).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Posts an `EdgeReport` every few seconds and soon after tunnel changes,
/// until the hard stop. Shutdown sends one at once that says `draining`,
/// and the reports go on saying it while the drain runs.
async fn report_loop(routers: Routers, mut report: EdgeReport, shared: Arc<Shared>) {
    let mut told_draining = false;
    loop {
        report.tunnels = shared.tunnels.report();
        report.draining = shared.shutdown.is_cancelled();
        match routers.client() {
            Ok(c) => {
                let r = tokio::select! {
                    () = shared.hard_stop.cancelled() => return,
                    r = c.post_empty("/v1/edge/report", &report) => r,
                };
                match r {
                    Ok(()) if report.draining && !told_draining => {
                        told_draining = true;
                        tracing::info!("the router knows this edge is draining");
                    }
                    Ok(()) => {}
                    Err(e) if report.draining => {
                        tracing::warn!(error = %portico_agent::error_chain(&e), "cannot tell the router this edge is draining; DNS answers keep it until its reports go stale")
                    }
                    Err(e) => {
                        tracing::debug!(error = %portico_agent::error_chain(&e), "presence report failed")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %portico_agent::error_chain(&e), "cannot build a router client")
            }
        }
        let draining = report.draining;
        tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            () = shared.shutdown.cancelled(), if !draining => {}
            () = tokio::time::sleep(REPORT_EVERY) => {}
            () = shared.tunnels.changed.notified() => {
                tokio::select! {
                    () = shared.hard_stop.cancelled() => return,
                    () = tokio::time::sleep(REPORT_DEBOUNCE) => {}
                }
            }
        }
    }
}

/// How many sign-outs and handoff checks may wait for the loop.
const SIGN_OUT_QUEUE: usize = 4096;
/// The most sign-outs kept for the router while it does not take them.
const MAX_PENDING_SIGN_OUTS: usize = 100_000;

/// Carries the request path's sign-outs to the router (`auth::revoke`):
/// in batches, retried with backoff until the router has them (or they
/// are over).
async fn sign_out_loop(
    routers: Routers,
    mut from_auth: tokio::sync::mpsc::Receiver<SignedOut>,
    shared: Arc<Shared>,
) {
    let mut pending: Vec<SignedOut> = Vec::new();
    let mut backoff = Backoff::new();
    let take = |out: SignedOut, pending: &mut Vec<SignedOut>| {
        if pending.len() >= MAX_PENDING_SIGN_OUTS {
            let now = crate::auth::seal::unix_now();
            pending.retain(|p| p.until > now);
        }
        if pending.len() >= MAX_PENDING_SIGN_OUTS {
            tracing::error!("the router has not taken sign-outs for long; this one ends the session at this edge only");
        } else {
            pending.push(out);
        }
    };
    loop {
        if pending.is_empty() {
            let out = tokio::select! {
                () = shared.hard_stop.cancelled() => return,
                out = from_auth.recv() => out,
            };
            match out {
                Some(out) => take(out, &mut pending),
                None => return,
            }
        }
        while let Ok(out) = from_auth.try_recv() {
            take(out, &mut pending);
        }
        let now = crate::auth::seal::unix_now();
        pending.retain(|p| p.until > now);
        while !pending.is_empty() {
            let n = pending.len().min(MAX_SIGN_OUTS_PER_REPORT);
            let batch = SignOuts {
                sessions: pending[..n].to_vec(),
            };
            let sent = match routers.client() {
                Ok(c) => tokio::select! {
                    () = shared.hard_stop.cancelled() => return,
                    r = c.post_empty("/v1/edge/sign-outs", &batch) => r.map_err(|e| {
                        // Refused as it is: sending it again will not help.
                        let keep = !matches!(e.status(), Some(400 | 409));
                        (keep, portico_agent::error_chain(&e).to_string())
                    }),
                },
                Err(e) => Err((true, portico_agent::error_chain(&e).to_string())),
            };
            match sent {
                Ok(()) => {
                    backoff.reset();
                    pending.drain(..n);
                    tracing::debug!(sessions = n, "the router has the sign-outs");
                }
                Err((false, error)) => {
                    tracing::error!(
                        error,
                        sessions = n,
                        "the router refused sign-outs; they end the sessions at this edge only"
                    );
                    pending.drain(..n);
                }
                Err((true, error)) => {
                    tracing::warn!(
                        error,
                        sessions = pending.len(),
                        "cannot tell the router of sign-outs yet; retrying"
                    );
                    break;
                }
            }
        }
        if !pending.is_empty() {
            // Retry after the backoff, taking what comes meanwhile.
            let wait = backoff.sleep(&shared.hard_stop);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    r = &mut wait => if r.is_err() { return } else { break },
                    out = from_auth.recv() => match out {
                        Some(out) => take(out, &mut pending),
                        None => return,
                    },
                }
            }
        }
    }
}

/// Asks the router about each handoff code (`auth::revoke`), each in its
/// own task so that a slow answer holds up no other sign-in.
async fn handoff_loop(
    routers: Routers,
    mut from_auth: tokio::sync::mpsc::Receiver<HandoffCheck>,
    shared: Arc<Shared>,
) {
    loop {
        let check = tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            check = from_auth.recv() => check,
        };
        let Some(HandoffCheck { used, answer }) = check else {
            return;
        };
        let client = routers.client();
        shared.tracker.spawn(async move {
            let word = match client {
                Err(e) => HandoffAnswer::Unknown(portico_agent::error_chain(&e).to_string()),
                // No longer than the sign-in waits for it (the task must
                // not hold a shutdown up for the client's own timeout).
                Ok(c) => match tokio::time::timeout(
                    crate::auth::HANDOFF_CHECK,
                    c.post_empty("/v1/edge/handoffs", &used),
                )
                .await
                {
                    Err(_) => HandoffAnswer::Unknown("no answer in time".into()),
                    Ok(Ok(())) => HandoffAnswer::First,
                    Ok(Err(e))
                        if e.status() == Some(409)
                            && e.api_error()
                                .is_some_and(|a| a.field.as_deref() == Some("jti")) =>
                    {
                        HandoffAnswer::Used
                    }
                    Ok(Err(e)) => {
                        HandoffAnswer::Unknown(portico_agent::error_chain(&e).to_string())
                    }
                },
            };
            let _ = answer.send(word);
        });
    }
}

/// The `*.<suffix>` names the public certificate must carry for the
/// config's wildcard apps deeper than the apps domain (`*.<apps domain>`
/// is always there), sorted.
fn wildcard_names(config: &EdgeConfig) -> Vec<String> {
    let mut names: Vec<String> = config
        .apps
        .iter()
        .filter_map(|a| portico_proto::api::wildcard_suffix(&a.external_host))
        .filter(|suffix| *suffix != config.apps_domain)
        .map(|suffix| format!("*.{}", suffix.to_ascii_lowercase()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Which of `wanted` the certificate `cert_pem` does not name (all of
/// them when it cannot be read).
fn missing_wildcards<'w>(cert_pem: Option<&str>, wanted: &'w [String]) -> Vec<&'w str> {
    let names = cert_pem
        .and_then(|pem| pki::parse_certs_pem(pem).ok())
        .and_then(|chain| pki::dns_names(chain.first()?).ok())
        .unwrap_or_default();
    wanted
        .iter()
        .filter(|w| !names.contains(w))
        .map(String::as_str)
        .collect()
}

/// Keeps the router-issued public certificate fresh: renewed at two thirds
/// of its life, and at once when a wildcard app appears whose `*.<suffix>`
/// it does not name (the router names every wildcard app's in a new one).
async fn public_cert_loop(
    routers: Routers,
    state: StateDir,
    store: Arc<CertStore>,
    mut wildcards: watch::Receiver<Vec<String>>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new();
    let mut current = state
        .load_json::<SavedPublicCert>(PUBLIC_CERT_FILE)
        .ok()
        .flatten()
        .map(|s| s.cert_pem);
    let mut renew_at = current
        .as_deref()
        .and_then(renew_time)
        .unwrap_or(SystemTime::now());
    let mut watching = true;
    loop {
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let wanted = wildcards.borrow_and_update().clone();
        let missing = missing_wildcards(current.as_deref(), &wanted);
        if missing.is_empty() {
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                r = wildcards.changed(), if watching => {
                    // The config loop ended: renew on time only.
                    watching = r.is_ok();
                    continue;
                }
            }
        } else {
            tracing::info!(missing = ?missing, "the public certificate lacks wildcard apps' names; asking for a new one");
        }
        match fetch_public_cert(&routers, &state).await {
            Ok((cert_pem, key_pem, at)) => match store.set_pem(&cert_pem, &key_pem) {
                Ok(()) => {
                    tracing::info!("public certificate installed");
                    backoff.reset();
                    renew_at = at;
                    let still = missing_wildcards(Some(&cert_pem), &wanted)
                        .into_iter()
                        .map(str::to_owned)
                        .collect::<Vec<_>>();
                    current = Some(cert_pem);
                    if !still.is_empty() {
                        // The router has not seen those apps yet, or names
                        // no more: wait for the next config or renewal.
                        tracing::warn!(missing = ?still, "the new public certificate still lacks wildcard apps' names");
                        tokio::select! {
                            () = shared.shutdown.cancelled() => return,
                            () = tokio::time::sleep(renew_at.duration_since(SystemTime::now()).unwrap_or_default()) => {}
                            r = wildcards.changed(), if watching => watching = r.is_ok(),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %portico_agent::error_chain(&e), "router-issued public certificate unusable");
                    if backoff.sleep(&shared.shutdown).await.is_err() {
                        return;
                    }
                }
            },
            Err(e) => {
                tracing::warn!(error = %portico_agent::error_chain(&e), "public certificate request failed");
                if backoff.sleep(&shared.shutdown).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A fresh key, a CSR to the router, the signed wildcard certificate; saved
/// for the next start. Returns the PEMs and when to renew.
async fn fetch_public_cert(
    routers: &Routers,
    state: &StateDir,
) -> Result<(String, String, SystemTime), Error> {
    let client = routers.client()?;
    let key = pki::generate_key()?;
    let answer: CertResponse = client
        .post_json(
            "/v1/edge/public-cert",
            &CsrRequest {
                csr_pem: pki::csr_pem(&key)?,
            },
        )
        .await?;
    let key_pem = key.serialize_pem();
    let saved = SavedPublicCert {
        cert_pem: answer.cert_pem.clone(),
        key_pem: Secret::new(key_pem.clone()),
    };
    if let Err(e) = state.save_json(PUBLIC_CERT_FILE, &saved) {
        tracing::warn!(error = %portico_agent::error_chain(&e), "cannot save the public certificate");
    }
    let at = renew_time(&answer.cert_pem).unwrap_or_else(|| {
        let not_after = UNIX_EPOCH + Duration::from_secs(answer.not_after);
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        SystemTime::now() + left * 2 / 3
    });
    Ok((answer.cert_pem, key_pem, at))
}

/// Two thirds into a certificate's validity.
fn renew_time(cert_pem: &str) -> Option<SystemTime> {
    let chain = pki::parse_certs_pem(cert_pem).ok()?;
    let (nb, na) = pki::validity(chain.first()?).ok()?;
    let life = na.duration_since(nb).ok()?;
    Some(nb + life * 2 / 3)
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "edge".to_owned())
}

/// Exponential backoff with jitter: 1 s doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_secs(1),
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_secs(1);
    }

    /// Sleeps; `Err` if shutdown came first.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> Result<(), ()> {
        let d = self.next / 2 + self.next.mul_f64(fastrand::f64() / 2.0);
        self.next = (self.next * 2).min(Duration::from_secs(30));
        tokio::select! {
            () = shutdown.cancelled() => Err(()),
            () = tokio::time::sleep(d) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names a config's wildcard apps need, and which of them a
    /// certificate lacks.
    #[test]
    fn wildcard_apps_name_what_the_public_certificate_must_cover() {
        let mut config =
            crate::routing::RoutingTable::empty(portico_proto::RegionId::default_region())
                .config
                .clone();
        config.apps_domain = "apps.test".into();
        config.apps = vec![
            crate::routing::tests::app("any", "*.apps.test"),
            crate::routing::tests::app("corp", "*.corp.apps.test"),
            crate::routing::tests::app("eu", "*.eu.corp.apps.test"),
            crate::routing::tests::app("hr", "hr.apps.test"),
        ];
        let wanted = wildcard_names(&config);
        assert_eq!(wanted, ["*.corp.apps.test", "*.eu.corp.apps.test"]);
        let cert = |names: &[&str]| {
            rcgen::generate_simple_self_signed(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap()
            .cert
            .pem()
        };
        let partial = cert(&["*.apps.test", "apps.test", "*.corp.apps.test"]);
        assert_eq!(
            missing_wildcards(Some(&partial), &wanted),
            ["*.eu.corp.apps.test"]
        );
        let full = cert(&["*.apps.test", "*.eu.corp.apps.test", "*.corp.apps.test"]);
        assert!(missing_wildcards(Some(&full), &wanted).is_empty());
        assert_eq!(missing_wildcards(None, &wanted).len(), 2);
        assert_eq!(missing_wildcards(Some("junk"), &wanted).len(), 2);
        assert!(missing_wildcards(None, &[]).is_empty());
    }
}
