//! Enrollment (join token + CSR → certificate) and renewal at two thirds of
//! a certificate's life.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portico_proto::api::{
    CertResponse, CsrRequest, EnrollKind, EnrollRequest, EnrollResponse, Identity, JoinToken,
};
use portico_proto::RegionId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::client::{RouterClient, RouterTrust};
use crate::error::EnrollError;
use crate::pki;
use crate::state::{Credentials, Secret, StateDir};

/// What enrollment needs besides the state directory.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// `https://host:port` of the router.
    pub router_url: String,
    /// A join token, needed only when the state directory has no
    /// credentials yet.
    pub token: Option<String>,
    /// This machine's host name, shown in listings.
    pub host: String,
    /// This software's version, shown in listings.
    pub version: String,
    /// What this process enrolls as: a token of the other kind is refused
    /// by the router before it is used.
    pub kind: EnrollKind,
    /// The region an edge is started in, if it is told one: an edge token
    /// of another region is refused by the router before it is used.
    /// `None` for connectors, and for an edge that takes its token's
    /// region.
    pub region: Option<RegionId>,
}

/// Returns the credentials saved in `state`, or enrolls with the join token
/// and saves what the router signs.
///
/// Saved credentials win over a token, so restarting with the same command
/// line does not burn a second token. Expired credentials are replaced by a
/// new enrollment when a token is given.
///
/// The state directory is created (and checked writable) just before the
/// token is sent, and removed again if enrollment fails, so a refused token
/// leaves nothing behind; a directory that existed before is never removed.
pub async fn obtain(state: &StateDir, opts: &EnrollOptions) -> Result<Credentials, EnrollError> {
    if let Some(creds) = state.load_credentials()? {
        if !creds.is_expired(SystemTime::now()) {
            info!(identity = %creds.identity, "using saved credentials");
            return Ok(creds);
        }
        if opts.token.is_none() {
            return Err(EnrollError::Expired {
                state_dir: state.path().to_owned(),
                expired: humantime_utc(creds.not_after),
            });
        }
        warn!(identity = %creds.identity, "saved certificate expired; enrolling again with the token");
    }
    let Some(token) = &opts.token else {
        return Err(EnrollError::NoCredentials {
            state_dir: state.path().to_owned(),
        });
    };
    let token: JoinToken = token.parse()?;
    let created = state.create()?;
    let client = RouterClient::new(
        &opts.router_url,
        RouterTrust::CaSha256(token.ca_sha256.clone()),
        None,
    )?;
    let key = pki::generate_key()?;
    let request = EnrollRequest {
        token: token.to_string(),
        csr_pem: pki::csr_pem(&key)?,
        host: opts.host.clone(),
        version: opts.version.clone(),
        kind: Some(opts.kind),
        region: opts.region.clone(),
    };
    let answer: EnrollResponse =
        client
            .post_json("/v1/enroll", &request)
            .await
            .map_err(|e| match e.api_error() {
                Some(api) if api.error == "wrong_kind" => EnrollError::WrongTokenKind {
                    wanted: opts.kind,
                    message: api.message.clone(),
                },
                Some(api) if api.error == "wrong_region" => EnrollError::WrongTokenRegion {
                    message: api.message.clone(),
                },
                Some(api) if e.is_unauthorized() => EnrollError::TokenRefused {
                    message: api.message.clone(),
                },
                _ => EnrollError::Router(e),
            })?;
    let ca_der = pki::parse_certs_pem(&answer.cert.ca_pem)?;
    let got = pki::sha256_hex(ca_der[0].as_ref());
    if got != token.ca_sha256 {
        return Err(EnrollError::CaMismatch {
            expected: token.ca_sha256,
            got,
        });
    }
    let creds = Credentials::new(
        answer.identity,
        Secret::new(key.serialize_pem()),
        answer.cert.cert_pem,
        answer.cert.ca_pem,
    )?;
    state.save_credentials(&creds)?;
    created.keep();
    info!(identity = %creds.identity, not_after = %humantime_utc(creds.not_after), "enrolled");
    Ok(creds)
}

/// Renews `creds` once: a new key, a CSR, authenticated by the current
/// certificate. Saves and returns the new credentials.
pub async fn renew(
    state: &StateDir,
    router_url: &str,
    creds: &Credentials,
) -> Result<Credentials, EnrollError> {
    let client = RouterClient::new(
        router_url,
        RouterTrust::CaPem(creds.ca_pem.clone()),
        Some(creds),
    )?;
    let key = pki::generate_key()?;
    let answer: CertResponse = client
        .post_json(
            "/v1/renew",
            &CsrRequest {
                csr_pem: pki::csr_pem(&key)?,
            },
        )
        .await
        .map_err(|e| {
            if e.is_revoked() {
                EnrollError::Revoked {
                    what: what(&creds.identity),
                }
            } else {
                EnrollError::Router(e)
            }
        })?;
    let new = Credentials::new(
        creds.identity.clone(),
        Secret::new(key.serialize_pem()),
        answer.cert_pem,
        answer.ca_pem,
    )?;
    state.save_credentials(&new)?;
    Ok(new)
}

/// Keeps `creds` fresh: renews at two thirds of each certificate's life,
/// retrying with backoff, and publishes every new set on the returned
/// channel. Stops on `shutdown`, or when the router says the identity was
/// revoked (the channel then keeps the last credentials).
pub fn spawn_renewal(
    state: StateDir,
    router_url: String,
    creds: Credentials,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> watch::Receiver<Arc<Credentials>> {
    let span = tracing::info_span!("renewal", identity = %creds.identity);
    let (tx, rx) = watch::channel(Arc::new(creds));
    tracker.spawn(
        async move {
            let mut backoff = Duration::from_secs(2);
            loop {
                let current = tx.borrow().clone();
                let wait = current
                    .renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                match renew(&state, &router_url, &current).await {
                    Ok(new) => {
                        info!(not_after = %humantime_utc(new.not_after), "certificate renewed");
                        backoff = Duration::from_secs(2);
                        tx.send_replace(Arc::new(new));
                    }
                    Err(EnrollError::Revoked { what }) => {
                        warn!("renewal refused: this {what} was deleted on the router");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %crate::error::chain(&e), retry_in = ?backoff, "certificate renewal failed");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(jitter(backoff)) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(300));
                    }
                }
            }
        }
        .instrument(span),
    );
    rx
}

fn what(identity: &Identity) -> &'static str {
    match identity {
        Identity::Connector { .. } => "connector",
        Identity::Edge { .. } => "edge",
    }
}

/// A duration drawn uniformly from [d/2, d].
fn jitter(d: Duration) -> Duration {
    d / 2 + d.mul_f64(fastrand::f64() / 2.0)
}

fn humantime_utc(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
