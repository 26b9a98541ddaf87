//! The HTTPS API, as the table in `portico_proto::api` describes it: admin
//! resources (bearer token), enrollment (join token), and the config,
//! presence and renewal endpoints of edges and connectors (client
//! certificate).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, RawQuery, Request, State,
};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use portico_proto::api::{
    self, ApiError, App, CertResponse, Connector, ConnectorConfig, CreateGroup, CreateRegion,
    CreateToken, CsrRequest, Edge, EdgeConfig, EdgeReport, EnrollRequest, EnrollResponse, Group,
    HandoffUse, Identity, JoinToken, Region, RegionEdge, SignOuts, SignedOut, Status, TokenCreated,
    TokenInfo, TokenScope, TokenStatus,
};
use portico_proto::api::{
    valid_session_id, RevokeSessions, SessionsRevoked, MAX_SIGN_OUTS_PER_REPORT, MAX_USER_LEN,
};
use portico_proto::ids::{AppId, ConnectorId, EdgeId, GroupId, RegionId};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::ca::{Ca, CsrError, Issued, Profile};
use crate::config::{check_dns_name, Config};
use crate::distribute;
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::ratelimit::RateLimiter;
use crate::snapshot::StoreState;
use crate::store::{
    AppRecord, CertInfo, CertificateRecord, ConnectorRecord, ConnectorSeen, EdgeRecord, EdgeSeen,
    GroupRecord, PresenceRecord, RegionRecord, Store, TokenRecord,
};
use crate::util;

/// The longest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Join token lifetime when none is asked for.
const DEFAULT_TOKEN_TTL: u64 = 3600;
/// The longest join token lifetime.
const MAX_TOKEN_TTL: u64 = 7 * 24 * 3600;
/// Longest accepted host, version and address strings from agents.
const MAX_LABEL: usize = 255;
/// Most tunnel entries in one edge report.
const MAX_REPORT_TUNNELS: usize = 10_000;
/// Longest internal URL.
const MAX_URL: usize = 2048;

/// Everything the handlers share.
pub(crate) struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub ca: Ca,
    /// SHA-256 of the admin token; the token itself is not kept here.
    pub admin_hash: [u8; 32],
    /// The edges' latest reports: where connectors are attached.
    pub presence: Mutex<Presence>,
    /// The probe jobs of `portico app test`, waiting for connectors.
    pub probes: crate::app_test::Probes,
    /// `POST /v1/enroll` attempts per source address.
    pub enroll_limiter: RateLimiter,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// When this router started (unix seconds): see `distribute::At`.
    pub started: u64,
    /// Checks the CNAME chains of custom domains.
    pub domains: crate::custom_domain::Checker,
    /// What edges get to sign users in, when there is an OpenID provider.
    pub sign_in: Option<portico_proto::api::SignInSettings>,
}

pub(crate) type SharedState = Arc<AppState>;

/// The verified client certificate's identity, put into each request's
/// extensions by the TLS accept loop.
#[derive(Debug, Clone)]
pub(crate) struct Peer(pub Option<Identity>);

/// The TCP peer's address, put into each request's extensions by the TLS
/// accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteAddr(pub std::net::SocketAddr);

impl AppState {
    pub(crate) fn presence(&self) -> std::sync::MutexGuard<'_, Presence> {
        // Every change is one assignment, so a poisoned lock holds whole data.
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a store call on a blocking thread.
    async fn db<T, F>(&self, f: F) -> Result<T, ApiFail>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match self.tracker.spawn_blocking(move || f(store.as_ref())).await {
            Ok(result) => result.map_err(ApiFail::from),
            Err(e) => {
                tracing::error!(error = %portico_agent::error_chain(&e), "store task failed");
                Err(ApiFail::internal("store task failed"))
            }
        }
    }

    /// Now, and since when this router has run.
    pub(crate) fn at(&self) -> distribute::At {
        distribute::At {
            now: util::now_unix(),
            started: self.started,
        }
    }

    /// Waits until the config version passes `after`, for at most `wait`.
    /// `None` when it did not (or the router is shutting down).
    async fn wait_newer(&self, after: u64, wait: Duration) -> Option<u64> {
        // The store says when the version moves (`Store::subscribe`).
        let mut rx = self.store.subscribe();
        if *rx.borrow_and_update() > after {
            return Some(*rx.borrow());
        }
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        self.metrics.long_polls.inc();
        let _waiting = scopeguard(|| self.metrics.long_polls.dec());
        loop {
            let v = *rx.borrow_and_update();
            if v > after {
                return Some(v);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return None },
                () = &mut deadline => return None,
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    fn sign(&self, csr_pem: &str, profile: &Profile, ttl: Duration) -> Result<Issued, ApiFail> {
        if csr_pem.len() > 16 * 1024 {
            return Err(ApiFail::invalid("csr_pem", "CSR is longer than 16 KiB"));
        }
        self.ca
            .sign_csr(csr_pem, profile, ttl)
            .map_err(|e| match e {
                CsrError::Invalid(_) => {
                    ApiFail::invalid("csr_pem", portico_agent::error_chain(&e).to_string())
                }
                other => {
                    tracing::error!(error = %portico_agent::error_chain(&other), "signing failed");
                    ApiFail::internal("signing the certificate failed")
                }
            })
    }

    fn cert_response(&self, issued: &Issued) -> CertResponse {
        CertResponse {
            cert_pem: issued.cert_pem.clone(),
            ca_pem: self.ca.cert_pem().to_owned(),
            not_after: issued.not_after,
        }
    }
}

/// `GET /.well-known/jwks.json`, for anyone: the public keys that identity
/// assertions (`X-Portico-Jwt-Assertion`) are signed with. 404 when the
/// router has no OpenID provider (no assertion is ever made).
async fn jwks(State(state): State<SharedState>) -> Result<axum::response::Response, ApiFail> {
    let Some(sign_in) = &state.sign_in else {
        return Err(ApiFail::not_found(
            None,
            "this router signs no one in (no --oidc-issuer), so it makes no identity assertions",
        ));
    };
    let body = api::Jwks {
        keys: sign_in
            .assertion_keys
            .iter()
            .map(api::AssertionKey::public_jwk)
            .collect(),
    };
    Ok((
        [(axum::http::header::CACHE_CONTROL, "public, max-age=300")],
        axum::Json(body),
    )
        .into_response())
}

/// The API routes, with metrics and a `router` span per request.
pub(crate) fn routes(state: SharedState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/enroll", post(enroll))
        .route("/v1/renew", post(renew))
        .route("/v1/edge/config", get(edge_config))
        .route("/v1/edge/report", post(edge_report))
        .route("/v1/edge/sign-outs", post(edge_sign_outs))
        .route("/v1/edge/handoffs", post(edge_handoff))
        .route("/v1/sessions/revoke", post(revoke_sessions))
        .route("/v1/edge/public-cert", post(edge_public_cert))
        .route("/v1/connector/config", get(connector_config))
        .route("/v1/connector/report", post(connector_report))
        .route("/v1/connector/probes", get(connector_probes))
        .route("/v1/connector/probes/{id}", post(connector_probe_result))
        .route("/v1/regions", get(list_regions).post(create_region))
        .route("/v1/regions/{id}", delete(delete_region))
        .route("/v1/groups", get(list_groups).post(create_group))
        .route("/v1/groups/{id}", delete(delete_group))
        .route("/v1/apps", get(list_apps).post(create_app))
        .route(
            "/v1/apps/{id}",
            get(get_app).patch(update_app).delete(delete_app),
        )
        .route("/v1/apps/{id}/test", post(test_app))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/connectors", get(list_connectors))
        .route("/v1/connectors/{id}", delete(delete_connector))
        .route("/v1/edges", get(list_edges))
        .route("/v1/edges/{id}", delete(delete_edge))
        .route(
            "/v1/certificates",
            get(list_certificates).post(upload_certificate),
        )
        .route("/v1/certificates/{id}", delete(delete_certificate))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn track(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!("router", method = %req.method(), route = %route);
    let response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| tracing::debug!(status = response.status().as_u16(), "answered"));
    state
        .metrics
        .api_requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

async fn not_found(State(state): State<SharedState>) -> ApiFail {
    state
        .metrics
        .api_requests
        .with_label_values(&["unmatched", "404"])
        .inc();
    ApiFail::new(StatusCode::NOT_FOUND, "not_found", None, "no such endpoint")
}

async fn method_not_allowed(State(state): State<SharedState>) -> ApiFail {
    state
        .metrics
        .api_requests
        .with_label_values(&["unmatched", "405"])
        .inc();
    ApiFail::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid",
        None,
        "method not allowed on this endpoint",
    )
}

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

pub(crate) async fn ready() -> &'static str {
    "ready\n"
}

// ---- errors ----

/// Runs `f` when dropped (also when a request future is cancelled).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// An error answer: an [`ApiError`] body with its status.
#[derive(Debug)]
pub(crate) struct ApiFail {
    status: StatusCode,
    body: ApiError,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    retry_after: Option<Duration>,
}

impl ApiFail {
    fn new(
        status: StatusCode,
        kind: &str,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> ApiFail {
        ApiFail {
            status,
            body: ApiError {
                error: kind.to_owned(),
                field: field.map(str::to_owned),
                message: message.into(),
            },
            retry_after: None,
        }
    }
    fn invalid(field: &str, message: impl Into<String>) -> ApiFail {
        ApiFail::new(StatusCode::BAD_REQUEST, "invalid", Some(field), message)
    }
    fn unauthorized(message: impl Into<String>) -> ApiFail {
        ApiFail::new(StatusCode::UNAUTHORIZED, "unauthorized", None, message)
    }
    fn revoked(message: impl Into<String>) -> ApiFail {
        ApiFail::new(StatusCode::FORBIDDEN, "revoked", None, message)
    }
    fn not_found(field: Option<&str>, message: impl Into<String>) -> ApiFail {
        ApiFail::new(StatusCode::NOT_FOUND, "not_found", field, message)
    }
    fn conflict(field: Option<&str>, message: impl Into<String>) -> ApiFail {
        ApiFail::new(StatusCode::CONFLICT, "conflict", field, message)
    }
    fn internal(message: impl Into<String>) -> ApiFail {
        ApiFail::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", None, message)
    }
}

impl IntoResponse for ApiFail {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
        }
        response
    }
}

impl From<StoreError> for ApiFail {
    fn from(e: StoreError) -> ApiFail {
        match &e {
            StoreError::AlreadyExists { .. } => ApiFail::conflict(Some("id"), e.to_string()),
            StoreError::HostTaken { .. } => ApiFail::conflict(Some("external_host"), e.to_string()),
            StoreError::NotFound { .. } => ApiFail::not_found(None, e.to_string()),
            StoreError::GroupNotEmpty { .. }
            | StoreError::DefaultGroup { .. }
            | StoreError::RegionInUse { .. }
            | StoreError::DefaultRegion { .. } => ApiFail::conflict(None, e.to_string()),
            StoreError::TokenUsed => ApiFail::unauthorized("join token already used"),
            StoreError::Limit { .. } => ApiFail::conflict(None, e.to_string()),
            StoreError::TokenRevoked => ApiFail::unauthorized("join token revoked"),
            _ => {
                tracing::error!(error = %portico_agent::error_chain(&e), "store failed");
                ApiFail::internal("the router's store failed; see its log")
            }
        }
    }
}

// ---- extractors ----

/// A JSON body whose errors are [`ApiError`]s naming the field at fault.
pub(crate) struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiFail;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiFail> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiFail::new(e.status(), "invalid", None, e.body_text()))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => Ok(Json(v)),
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let field = if path != "." {
                    Some(path)
                } else {
                    backticked_field(&inner.to_string())
                };
                Err(ApiFail {
                    status: StatusCode::BAD_REQUEST,
                    body: ApiError {
                        error: "invalid".into(),
                        field,
                        message: format!("malformed JSON body: {inner}"),
                    },
                    retry_after: None,
                })
            }
        }
    }
}

/// `missing field `x``-style serde messages name the field in backticks.
fn backticked_field(message: &str) -> Option<String> {
    if !(message.starts_with("missing field") || message.starts_with("unknown field")) {
        return None;
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// Proof that the request carries the admin token.
pub(crate) struct Admin;

impl FromRequestParts<SharedState> for Admin {
    type Rejection = ApiFail;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Admin, ApiFail> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiFail::unauthorized(
                "missing admin token: send `Authorization: Bearer <admin token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiFail::unauthorized("the Authorization header must be `Bearer <admin token>`")
            })?;
        // Compare digests, never the secret itself.
        if util::sha256(token.as_bytes()) == state.admin_hash {
            Ok(Admin)
        } else {
            Err(ApiFail::unauthorized("wrong admin token"))
        }
    }
}

fn peer(parts: &Parts) -> Option<Identity> {
    parts.extensions.get::<Peer>().and_then(|p| p.0.clone())
}

/// A caller holding a connector certificate.
pub(crate) struct ConnectorPeer {
    id: ConnectorId,
}

impl<S: Send + Sync> FromRequestParts<S> for ConnectorPeer {
    type Rejection = ApiFail;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiFail> {
        match peer(parts) {
            Some(Identity::Connector { id, .. }) => Ok(ConnectorPeer { id }),
            _ => Err(ApiFail::unauthorized(
                "this endpoint needs a connector client certificate",
            )),
        }
    }
}

/// A caller holding an edge certificate.
pub(crate) struct EdgePeer {
    id: EdgeId,
}

impl<S: Send + Sync> FromRequestParts<S> for EdgePeer {
    type Rejection = ApiFail;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiFail> {
        match peer(parts) {
            Some(Identity::Edge { id, .. }) => Ok(EdgePeer { id }),
            _ => Err(ApiFail::unauthorized(
                "this endpoint needs an edge client certificate",
            )),
        }
    }
}

/// Any agent certificate.
pub(crate) struct AgentPeer(Identity);

impl<S: Send + Sync> FromRequestParts<S> for AgentPeer {
    type Rejection = ApiFail;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiFail> {
        peer(parts).map(AgentPeer).ok_or_else(|| {
            ApiFail::unauthorized("this endpoint needs a connector or edge client certificate")
        })
    }
}

/// Leave to attempt an enrollment: the caller's address had a token left
/// in its bucket. Taken before the body is read, so every attempt counts.
pub(crate) struct EnrollPermit;

impl FromRequestParts<SharedState> for EnrollPermit {
    type Rejection = ApiFail;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<EnrollPermit, ApiFail> {
        let Some(RemoteAddr(remote)) = parts.extensions.get::<RemoteAddr>().copied() else {
            // Every request through the listener carries it.
            return Err(ApiFail::internal("no peer address"));
        };
        match state.enroll_limiter.check(remote.ip(), Instant::now()) {
            Ok(()) => Ok(EnrollPermit),
            Err(wait) => {
                state
                    .metrics
                    .enrollments
                    .with_label_values(&["unknown", "rate_limited"])
                    .inc();
                // Debug, not warn: a flood must not flood the log too; the
                // metric counts every refusal.
                tracing::debug!(remote = %remote.ip(), retry_after = ?wait, "enrollment rate-limited");
                let mut fail = ApiFail::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    None,
                    format!(
                        "too many enrollment attempts from {}; try again in {} s",
                        remote.ip(),
                        wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
                    ),
                );
                fail.retry_after = Some(wait);
                Err(fail)
            }
        }
    }
}

/// `?after=V&wait=S` of a long-poll.
struct WatchQuery {
    after: u64,
    wait: Duration,
}

fn watch_query(raw: Option<String>) -> Result<WatchQuery, ApiFail> {
    let mut q = WatchQuery {
        after: 0,
        wait: Duration::ZERO,
    };
    for pair in raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "after" => {
                q.after = value.parse().map_err(|_| {
                    ApiFail::invalid("after", "must be a config version (an unsigned integer)")
                })?
            }
            "wait" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| ApiFail::invalid("wait", "must be a number of seconds"))?;
                q.wait = Duration::from_secs(secs.min(api::MAX_WATCH_WAIT_SECS));
            }
            _ => {}
        }
    }
    Ok(q)
}

fn bounded<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiFail> {
    if value.len() > MAX_LABEL {
        return Err(ApiFail::invalid(
            field,
            format!("is longer than {MAX_LABEL} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiFail::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value.trim())
}

fn host_port(field: &str, value: &str) -> Result<(), ApiFail> {
    bounded(field, value)?;
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(())
        }
        _ => Err(ApiFail::invalid(
            field,
            format!("must be host:port, not {value:?}"),
        )),
    }
}

fn status(active: bool) -> Status {
    if active {
        Status::Active
    } else {
        Status::Inactive
    }
}

// ---- enrollment and certificates ----

async fn enroll(
    State(state): State<SharedState>,
    _: EnrollPermit,
    Json(req): Json<EnrollRequest>,
) -> Result<Response, ApiFail> {
    let result = enroll_inner(&state, req).await;
    let (kind, outcome) = match &result {
        Ok((kind, _)) => (*kind, "ok"),
        Err((kind, fail)) if fail.status == StatusCode::UNAUTHORIZED => (*kind, "refused"),
        Err((kind, fail)) if fail.status.is_client_error() => (*kind, "invalid"),
        Err((kind, _)) => (*kind, "error"),
    };
    state
        .metrics
        .enrollments
        .with_label_values(&[kind, outcome])
        .inc();
    match result {
        Ok((_, response)) => Ok(axum::Json(response).into_response()),
        Err((_, fail)) => Err(fail),
    }
}

type EnrollResult = Result<(&'static str, EnrollResponse), (&'static str, ApiFail)>;

async fn enroll_inner(state: &AppState, req: EnrollRequest) -> EnrollResult {
    let token: JoinToken = req
        .token
        .parse()
        .map_err(|e: api::MalformedToken| ("unknown", ApiFail::invalid("token", e.to_string())))?;
    let host = bounded("host", &req.host)
        .map_err(|f| ("unknown", f))?
        .to_owned();
    let version = bounded("version", &req.version)
        .map_err(|f| ("unknown", f))?
        .to_owned();
    if token.ca_sha256 != state.ca.sha256() {
        return Err((
            "unknown",
            ApiFail::unauthorized("join token is for another router (its CA fingerprint differs)"),
        ));
    }
    let token_id = token.id.to_ascii_lowercase();
    let record = state
        .db({
            let id = token_id.clone();
            move |s| s.get_token(&id)
        })
        .await
        .map_err(|f| ("unknown", f))?;
    let Some(record) = record else {
        return Err(("unknown", ApiFail::unauthorized("unknown join token")));
    };
    let kind = match record.scope {
        TokenScope::Connector { .. } => "connector",
        TokenScope::Edge { .. } => "edge",
    };
    if util::sha256_hex(token.secret.to_ascii_lowercase().as_bytes()) != record.secret_sha256 {
        return Err((kind, ApiFail::unauthorized("unknown join token")));
    }
    // Before anything is used or written: the token stays good for the
    // kind of component it was made for.
    if req.kind.is_some_and(|k| k != record.scope.kind()) {
        return Err((
            kind,
            ApiFail::new(
                StatusCode::BAD_REQUEST,
                "wrong_kind",
                Some("token"),
                record.scope.wrong_kind_hint(),
            ),
        ));
    }
    // The same for an edge that says where it runs: a token of another
    // region stays good for an edge of that region.
    if let (Some(wanted), TokenScope::Edge { region }) = (&req.region, &record.scope) {
        if wanted != region {
            return Err((
                kind,
                ApiFail::new(
                    StatusCode::BAD_REQUEST,
                    "wrong_region",
                    Some("region"),
                    format!(
                        "this join token enrolls an edge in region {region}, but this edge runs \
                         with --region {wanted}: start it with --region {region}, or create a \
                         token for {wanted} with `portico token create --edge --region {wanted}`"
                    ),
                ),
            ));
        }
    }
    if record.used_at.is_some() {
        return Err((kind, ApiFail::unauthorized("join token already used")));
    }
    if let Some(revoked) = record.revoked_at {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(revoked);
        return Err((
            kind,
            ApiFail::unauthorized(format!(
                "join token revoked at {}",
                humantime::format_rfc3339_seconds(at)
            )),
        ));
    }
    let now = util::now_unix();
    if record.expires_at <= now {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(record.expires_at);
        return Err((
            kind,
            ApiFail::unauthorized(format!(
                "join token expired at {}",
                humantime::format_rfc3339_seconds(at)
            )),
        ));
    }
    let fail = |f: ApiFail| (kind, f);
    let random = util::random_hex::<8>()
        .map_err(|_| fail(ApiFail::internal("random number generator failed")))?;
    let ttl = state.config.cert_ttl;
    let identity = match &record.scope {
        TokenScope::Connector { group } => Identity::Connector {
            id: ConnectorId::new(format!("c-{random}"))
                .map_err(|_| fail(ApiFail::internal("bad id")))?,
            group: group.clone(),
        },
        TokenScope::Edge { region } => Identity::Edge {
            id: EdgeId::new(format!("e-{random}"))
                .map_err(|_| fail(ApiFail::internal("bad id")))?,
            region: region.clone(),
        },
    };
    let issued = state
        .sign(&req.csr_pem, &Profile::Agent(identity.clone()), ttl)
        .map_err(fail)?;
    let cert = CertInfo {
        serial: issued.serial.clone(),
        not_after: issued.not_after,
    };
    match &identity {
        Identity::Connector { id, group } => {
            let rec = ConnectorRecord {
                id: id.clone(),
                group: group.clone(),
                host: host.clone(),
                version,
                enrolled_at: now,
                cert,
                deleted_at: None,
                last_seen: None,
                address_seen: None,
                tunnels: 0,
            };
            let tid = token_id.clone();
            state
                .db(move |s| s.enroll_connector(&tid, now, &rec))
                .await
                .map_err(|f| {
                    if f.status == StatusCode::NOT_FOUND {
                        ApiFail::conflict(
                            Some("token"),
                            format!("the token's group {group} no longer exists"),
                        )
                    } else {
                        f
                    }
                })
                .map_err(fail)?;
            tracing::info!(connector = %id, group = %group, host = %host, token.id = %token_id, "enrolled connector");
        }
        Identity::Edge { id, region } => {
            let rec = EdgeRecord {
                id: id.clone(),
                region: region.clone(),
                host: host.clone(),
                version,
                enrolled_at: now,
                cert,
                tunnel_addr: None,
                public_addr: None,
                last_seen: None,
                tunnels: 0,
                deleted_at: None,
            };
            let tid = token_id.clone();
            state
                .db(move |s| s.enroll_edge(&tid, now, &rec))
                .await
                .map_err(|f| {
                    if f.status == StatusCode::NOT_FOUND {
                        ApiFail::conflict(
                            Some("token"),
                            format!("the token's region {region} no longer exists"),
                        )
                    } else {
                        f
                    }
                })
                .map_err(fail)?;
            tracing::info!(edge = %id, region = %region, host = %host, token.id = %token_id, "enrolled edge");
        }
    }
    Ok((
        kind,
        EnrollResponse {
            identity,
            cert: state.cert_response(&issued),
        },
    ))
}

async fn renew(
    State(state): State<SharedState>,
    AgentPeer(identity): AgentPeer,
    Json(req): Json<CsrRequest>,
) -> Result<axum::Json<CertResponse>, ApiFail> {
    let ttl = state.config.cert_ttl;
    match identity {
        Identity::Connector { id, .. } => {
            let rec = live_connector(&state, &id).await?;
            let identity = Identity::Connector {
                id: id.clone(),
                group: rec.group,
            };
            let issued = state.sign(&req.csr_pem, &Profile::Agent(identity), ttl)?;
            let cert = CertInfo {
                serial: issued.serial.clone(),
                not_after: issued.not_after,
            };
            let cid = id.clone();
            state.db(move |s| s.set_connector_cert(&cid, &cert)).await?;
            tracing::info!(connector = %id, serial = %issued.serial, "renewed connector certificate");
            Ok(axum::Json(state.cert_response(&issued)))
        }
        Identity::Edge { id, .. } => {
            let rec = live_edge(&state, &id).await?;
            let identity = Identity::Edge {
                id: id.clone(),
                region: rec.region,
            };
            let issued = state.sign(&req.csr_pem, &Profile::Agent(identity), ttl)?;
            let cert = CertInfo {
                serial: issued.serial.clone(),
                not_after: issued.not_after,
            };
            let eid = id.clone();
            state.db(move |s| s.set_edge_cert(&eid, &cert)).await?;
            tracing::info!(edge = %id, serial = %issued.serial, "renewed edge certificate");
            Ok(axum::Json(state.cert_response(&issued)))
        }
    }
}

async fn live_connector(state: &AppState, id: &ConnectorId) -> Result<ConnectorRecord, ApiFail> {
    let cid = id.clone();
    match state.db(move |s| s.get_connector(&cid)).await? {
        Some(rec) if rec.deleted_at.is_none() => Ok(rec),
        _ => Err(ApiFail::revoked(format!("connector {id} has been deleted"))),
    }
}

async fn live_edge(state: &AppState, id: &EdgeId) -> Result<EdgeRecord, ApiFail> {
    let eid = id.clone();
    match state.db(move |s| s.get_edge(&eid)).await? {
        Some(rec) if rec.deleted_at.is_none() => Ok(rec),
        _ => Err(ApiFail::revoked(format!("edge {id} has been deleted"))),
    }
}

async fn edge_public_cert(
    State(state): State<SharedState>,
    edge: EdgePeer,
    Json(req): Json<CsrRequest>,
) -> Result<axum::Json<CertResponse>, ApiFail> {
    live_edge(&state, &edge.id).await?;
    let apps_domain = state.config.apps_domain.clone();
    let domain = apps_domain.clone();
    let wildcards = state
        .db(move |s| Ok(public_wildcards(&s.list_apps()?, &domain)))
        .await?;
    let profile = Profile::PublicWildcard {
        apps_domain,
        wildcards,
    };
    let issued = state.sign(&req.csr_pem, &profile, state.config.cert_ttl)?;
    tracing::info!(edge = %edge.id, serial = %issued.serial, "issued public certificate");
    Ok(axum::Json(state.cert_response(&issued)))
}

/// The most wildcard names an edge's public certificate carries besides
/// `*.<apps domain>`: a bound on its size (a wildcard app past it is
/// logged, and its hosts fail TLS until another is deleted).
pub(crate) const MAX_PUBLIC_WILDCARDS: usize = 100;

/// The suffixes of wildcard apps deeper than the apps domain (`corp.x`
/// for `*.corp.x`), sorted, each once, at most [`MAX_PUBLIC_WILDCARDS`]:
/// the edge's public certificate names `*.<suffix>` for each, since
/// `*.<apps domain>` covers one label only. The edge asks for a new
/// certificate when the apps call for one its certificate lacks
/// (`edge::control::missing_wildcards`).
pub(crate) fn public_wildcards(apps: &[AppRecord], apps_domain: &str) -> Vec<String> {
    let mut out: Vec<String> = apps
        .iter()
        .filter_map(|a| api::wildcard_suffix(&a.external_host))
        .filter(|suffix| *suffix != apps_domain)
        .map(str::to_owned)
        .collect();
    out.sort();
    out.dedup();
    if out.len() > MAX_PUBLIC_WILDCARDS {
        tracing::warn!(
            wildcards = out.len(),
            max = MAX_PUBLIC_WILDCARDS,
            "more wildcard apps than an edge certificate names; the rest get no certificate"
        );
        out.truncate(MAX_PUBLIC_WILDCARDS);
    }
    out
}

// ---- distribution ----

/// A long-poll answer: the body, or 304 when nothing changed.
enum Watched<T> {
    Changed(T),
    Unchanged,
}

impl<T: serde::Serialize> IntoResponse for Watched<T> {
    fn into_response(self) -> Response {
        match self {
            Watched::Changed(body) => axum::Json(body).into_response(),
            Watched::Unchanged => StatusCode::NOT_MODIFIED.into_response(),
        }
    }
}

async fn edge_config(
    State(state): State<SharedState>,
    edge: EdgePeer,
    RawQuery(query): RawQuery,
) -> Result<Watched<EdgeConfig>, ApiFail> {
    let q = watch_query(query)?;
    live_edge(&state, &edge.id).await?;
    if state.wait_newer(q.after, q.wait).await.is_none() {
        return Ok(Watched::Unchanged);
    }
    let rec = live_edge(&state, &edge.id).await?;
    let store = state.db(StoreState::read).await?;
    let mut snapshot = distribute::edge_config(
        &store,
        &rec,
        &state.config,
        state.sign_in.as_ref(),
        state.at(),
    );
    if snapshot.version <= q.after {
        return Ok(Watched::Unchanged);
    }
    // Read after the rest: every sign-out at a version up to the
    // snapshot's is committed, so none the edge lacks is left out (one
    // newer may come twice; the edge adds them).
    let (after, now) = (q.after, util::now_unix());
    (snapshot.signed_out, snapshot.signed_out_users) = state
        .db(move |s| {
            Ok((
                s.signed_out_after(after, now)?,
                s.signed_out_users_after(after, now)?,
            ))
        })
        .await?;
    Ok(Watched::Changed(snapshot))
}

/// The longest an edge may say a signed-out session lasts past now: the
/// session lifetime, and a minute of clock skew.
fn sign_out_horizon(state: &AppState) -> Result<u64, ApiFail> {
    match &state.sign_in {
        Some(s) => Ok(s.session_lifetime_secs.saturating_add(60)),
        None => Err(ApiFail::conflict(
            None,
            "this router signs no one in (no --oidc-issuer): there are no sessions to sign out of",
        )),
    }
}

/// `/.portico/sign_out` at an edge: the sessions are revoked at every edge
/// (they come to each in its config's `signed_out`).
async fn edge_sign_outs(
    State(state): State<SharedState>,
    edge: EdgePeer,
    Json(report): Json<SignOuts>,
) -> Result<StatusCode, ApiFail> {
    let horizon = sign_out_horizon(&state)?;
    if report.sessions.len() > MAX_SIGN_OUTS_PER_REPORT {
        return Err(ApiFail::invalid(
            "sessions",
            format!("at most {MAX_SIGN_OUTS_PER_REPORT} entries"),
        ));
    }
    if let Some(bad) = report.sessions.iter().find(|s| !valid_session_id(&s.sid)) {
        return Err(ApiFail::invalid(
            "sessions.sid",
            format!(
                "`{}` is not a session id (16 to 64 base64url characters)",
                bad.sid.chars().take(80).collect::<String>().escape_debug()
            ),
        ));
    }
    live_edge(&state, &edge.id).await?;
    let now = util::now_unix();
    let sessions: Vec<SignedOut> = report
        .sessions
        .into_iter()
        .map(|s| SignedOut {
            until: s.until.min(now.saturating_add(horizon)),
            sid: s.sid,
        })
        .collect();
    let n = sessions.len();
    if let Some(version) = state.db(move |s| s.sign_out(&sessions, now)).await? {
        tracing::info!(edge = %edge.id, sessions = n, version, "sessions signed out");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `portico session revoke USER`: every session of the user begun until
/// now ends at every edge (they come to each in its config's
/// `signed_out_users`).
async fn revoke_sessions(
    State(state): State<SharedState>,
    _: Admin,
    Json(req): Json<RevokeSessions>,
) -> Result<axum::Json<SessionsRevoked>, ApiFail> {
    let horizon = sign_out_horizon(&state)?;
    let user = req.user.trim().to_owned();
    if user.is_empty() || user.len() > MAX_USER_LEN || user.chars().any(char::is_control) {
        return Err(ApiFail::invalid(
            "user",
            format!("a user is a `sub` or a verified email: 1 to {MAX_USER_LEN} bytes, no control characters"),
        ));
    }
    let before = util::now_unix();
    let until = before.saturating_add(horizon);
    let name = user.clone();
    let version = state
        .db(move |s| s.sign_out_user(&name, before, until, before))
        .await?;
    tracing::info!(user = %user, before, version, "every session of a user signed out");
    Ok(axum::Json(SessionsRevoked { user, before }))
}

/// A handoff code turned into a session at an edge: 204 the first time at
/// any edge, 409 after, so that a code copied to another edge gives no
/// second session.
async fn edge_handoff(
    State(state): State<SharedState>,
    edge: EdgePeer,
    Json(used): Json<HandoffUse>,
) -> Result<StatusCode, ApiFail> {
    sign_out_horizon(&state)?;
    if !valid_session_id(&used.jti) {
        return Err(ApiFail::invalid(
            "jti",
            "not a handoff code id (16 to 64 base64url characters)",
        ));
    }
    live_edge(&state, &edge.id).await?;
    let now = util::now_unix();
    // Codes live a minute; keep one no longer than a few.
    let until = used.until.min(now.saturating_add(300));
    let jti = used.jti;
    if state.db(move |s| s.use_handoff(&jti, until, now)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        tracing::warn!(edge = %edge.id, "a handoff code came a second time: refused");
        Err(ApiFail::conflict(
            Some("jti"),
            "the handoff code was used already (at this or another edge)",
        ))
    }
}

async fn connector_config(
    State(state): State<SharedState>,
    connector: ConnectorPeer,
    RawQuery(query): RawQuery,
) -> Result<Watched<ConnectorConfig>, ApiFail> {
    let q = watch_query(query)?;
    live_connector(&state, &connector.id).await?;
    if state.wait_newer(q.after, q.wait).await.is_none() {
        return Ok(Watched::Unchanged);
    }
    let rec = live_connector(&state, &connector.id).await?;
    let store = state.db(StoreState::read).await?;
    let snapshot = distribute::connector_config(&store, &rec.group, &state.config, state.at());
    if snapshot.version <= q.after {
        return Ok(Watched::Unchanged);
    }
    Ok(Watched::Changed(snapshot))
}

// ---- `portico app test` (crate::app_test) ----

/// A connector's long-poll for probe jobs: `?wait=S`, 304 when none came.
async fn connector_probes(
    State(state): State<SharedState>,
    connector: ConnectorPeer,
    RawQuery(query): RawQuery,
) -> Result<Watched<api::ProbeJobs>, ApiFail> {
    let q = watch_query(query)?;
    live_connector(&state, &connector.id).await?;
    Ok(
        match state
            .probes
            .poll(&connector.id, q.wait, &state.shutdown)
            .await
        {
            Some(jobs) => Watched::Changed(api::ProbeJobs { jobs }),
            None => Watched::Unchanged,
        },
    )
}

/// A connector's answer to one of its probe jobs.
async fn connector_probe_result(
    State(state): State<SharedState>,
    connector: ConnectorPeer,
    Path(id): Path<String>,
    Json(result): Json<api::ProbeResult>,
) -> Result<StatusCode, ApiFail> {
    let missing = || {
        ApiFail::not_found(
            None,
            format!("no probe job {id:?} waits for connector {}", connector.id),
        )
    };
    let job: u64 = id.parse().map_err(|_| missing())?;
    crate::app_test::check_result(&result).map_err(|m| ApiFail::invalid("steps", m))?;
    if state.probes.answer(&connector.id, job, result) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(missing())
    }
}

/// `portico app test`: the app's diagnostic report.
async fn test_app(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<axum::Json<api::AppTestReport>, ApiFail> {
    let missing = || ApiFail::not_found(None, format!("app {id:?} not found"));
    let app_id = AppId::new(id.clone()).map_err(|_| missing())?;
    let (app, store, connectors) = state
        .db(move |s| {
            Ok((
                s.get_app(&app_id)?,
                StoreState::read(s)?,
                s.list_connectors()?,
            ))
        })
        .await?;
    let app = app.ok_or_else(missing)?;
    let snapshot = crate::snapshot::Snapshot {
        store: Arc::new(store),
        at: state.at(),
    };
    let report = crate::app_test::report(&state, app, snapshot, connectors).await;
    tracing::info!(
        app = %report.app,
        passed = report.passed(),
        failed = report.checks.iter().filter(|c| c.status == api::CheckStatus::Fail).count(),
        "app test"
    );
    Ok(axum::Json(report))
}

/// The port users reach the edges on, for `App.external_url`.
fn public_port(s: &dyn Store, config: &Config) -> Result<u16, StoreError> {
    if let Some(port) = config.public_port {
        return Ok(port);
    }
    Ok(s.list_edges()?
        .into_iter()
        .filter(|e| e.deleted_at.is_none())
        .find_map(|e| {
            e.public_addr
                .as_deref()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok())
        })
        .unwrap_or(443))
}

pub(crate) fn to_app(rec: AppRecord, port: u16) -> App {
    let external_url = if port == 443 {
        format!("https://{}/", rec.external_host)
    } else {
        format!("https://{}:{port}/", rec.external_host)
    };
    let home_url = match &rec.home_path {
        Some(path) => format!("{}{path}", external_url.trim_end_matches('/')),
        None => external_url.clone(),
    };
    App {
        home_url,
        backend_ca_sha256: rec
            .backend_ca_pem
            .as_deref()
            .map(|pem| util::sha256_hex(pem.as_bytes())),
        id: rec.id,
        external_host: rec.external_host,
        external_url,
        internal_url: rec.internal_url,
        connector_group: rec.connector_group,
        backend_timeout: rec.backend_timeout,
        validate_backend_tls: rec.validate_backend_tls,
        preauth: api::Preauth::of_features(&rec.required_features),
        translate_headers: rec.translate_headers,
        translate_body: rec.translate_body,
        required_features: rec.required_features,
        assignment: rec.assignment,
        identity_headers: rec.identity_headers,
        hidden: rec.hidden,
        created_at: rec.created_at,
        certificate: None,
        maintenance: rec.maintenance,
        http_only: rec.http_only,
        persistent: rec.persistent,
        oidc_client_id: rec.oidc_client_id,
    }
}

/// Sets `app.certificate`: the uploaded certificate edges present for its
/// host, if one covers it.
pub(crate) fn with_certificate(mut app: App, certs: &[CertificateRecord]) -> App {
    let pick = api::pick_certificate(
        certs.iter().map(|c| (c.names.as_slice(), c.not_after)),
        &app.external_host,
    );
    app.certificate = pick.map(|i| api::AppCertificate {
        id: certs[i].id.clone(),
        not_after: certs[i].not_after,
    });
    app
}

fn apps_with_urls(s: &dyn Store, config: &Config) -> Result<Vec<App>, StoreError> {
    let port = public_port(s, config)?;
    let certs = s.list_certificates()?;
    Ok(s.list_apps()?
        .into_iter()
        .map(|a| with_certificate(to_app(a, port), &certs))
        .collect())
}

// ---- presence ----

async fn edge_report(
    State(state): State<SharedState>,
    edge: EdgePeer,
    remote: Option<axum::Extension<RemoteAddr>>,
    Json(report): Json<EdgeReport>,
) -> Result<StatusCode, ApiFail> {
    host_port("tunnel_addr", &report.tunnel_addr)?;
    host_port("public_addr", &report.public_addr)?;
    bounded("version", &report.version)?;
    if report.tunnels.len() > MAX_REPORT_TUNNELS {
        return Err(ApiFail::invalid(
            "tunnels",
            format!("at most {MAX_REPORT_TUNNELS} entries"),
        ));
    }
    for t in &report.tunnels {
        bounded("tunnels.remote_addr", &t.remote_addr)?;
        bounded("tunnels.agent_version", &t.agent_version)?;
    }
    if let Some(mesh) = &report.mesh_addr {
        host_port("mesh_addr", mesh)?;
    }
    let now = util::now_unix();
    let mut groups: std::collections::BTreeMap<GroupId, u32> = Default::default();
    for t in &report.tunnels {
        let n = groups.entry(t.group.clone()).or_default();
        *n = n.saturating_add(t.tunnels);
    }
    let seen = EdgeSeen {
        id: edge.id.clone(),
        at: now,
        tunnel_addr: report.tunnel_addr.clone(),
        public_addr: report.public_addr.clone(),
        version: report.version.clone(),
        tunnels: report
            .tunnels
            .iter()
            .fold(0u32, |n, t| n.saturating_add(t.tunnels)),
        mesh_addr: report.mesh_addr.clone(),
        groups: groups.into_iter().collect(),
        draining: report.draining,
        reported_from: remote
            .map(|axum::Extension(RemoteAddr(a))| a.ip().to_canonical().to_string()),
    };
    let connectors: Vec<ConnectorSeen> = report
        .tunnels
        .iter()
        .map(|t| ConnectorSeen {
            id: t.connector_id.clone(),
            at: now,
            address: t.remote_addr.clone(),
            version: t.agent_version.clone(),
            tunnels: t.tunnels,
        })
        .collect();
    let ids: Vec<(ConnectorId, u32)> = connectors
        .iter()
        .map(|c| (c.id.clone(), c.tunnels))
        .collect();
    let bumped = state
        .db(move |s| {
            let bumped = s.edge_seen(&seen)?;
            for c in &connectors {
                s.connector_seen(c)?;
            }
            Ok(bumped)
        })
        .await
        .map_err(|f| {
            if f.status == StatusCode::NOT_FOUND {
                ApiFail::revoked(format!("edge {} has been deleted", edge.id))
            } else {
                f
            }
        })?;
    state
        .presence()
        .report(edge.id.clone(), ids, Instant::now());
    if let Some(version) = bumped {
        tracing::info!(edge = %edge.id, tunnel_addr = %report.tunnel_addr, version, "edge addresses or presence changed");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/connector/report`: a connector's region choice, kept with
/// its record for `connector list`. Bounded: at most
/// `MAX_REPORT_REGIONS` regions and a `MAX_MOVE_REASON`-byte reason, in a
/// body of at most `MAX_BODY`.
async fn connector_report(
    State(state): State<SharedState>,
    connector: ConnectorPeer,
    Json(report): Json<portico_proto::api::ConnectorReport>,
) -> Result<StatusCode, ApiFail> {
    let choice = &report.region;
    if choice.regions.len() > portico_proto::api::MAX_REPORT_REGIONS {
        return Err(ApiFail::invalid(
            "region.regions",
            format!("at most {} entries", portico_proto::api::MAX_REPORT_REGIONS),
        ));
    }
    if let Some(m) = &choice.last_move {
        if m.reason.len() > portico_proto::api::MAX_MOVE_REASON
            || m.reason.chars().any(char::is_control)
        {
            return Err(ApiFail::invalid(
                "region.last_move.reason",
                format!(
                    "must be at most {} bytes without control characters",
                    portico_proto::api::MAX_MOVE_REASON
                ),
            ));
        }
    }
    let stored = crate::store::ConnectorRegion {
        id: connector.id.clone(),
        at: util::now_unix(),
        report: serde_json::to_string(choice)
            .map_err(|_| ApiFail::internal("cannot encode the region report"))?,
    };
    state
        .db(move |s| s.connector_region(&stored))
        .await
        .map_err(|f| {
            if f.status == StatusCode::NOT_FOUND {
                ApiFail::revoked(format!("connector {} has been deleted", connector.id))
            } else {
                f
            }
        })?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- admin: regions ----

/// 404 for a region that does not exist, saying how to create it.
fn missing_region(field: &str, region: &RegionId) -> ApiFail {
    ApiFail::not_found(
        Some(field),
        format!("region {region} does not exist; create it with `portico region create {region}`"),
    )
}

async fn list_regions(
    State(state): State<SharedState>,
    _: Admin,
) -> Result<axum::Json<Vec<Region>>, ApiFail> {
    let (regions, edges, stored) = state
        .db(|s| Ok((s.list_regions()?, s.list_edges()?, s.list_presence()?)))
        .await?;
    let at = state.at();
    let presence = state.presence();
    Ok(axum::Json(regions_view(
        regions,
        &edges,
        (&stored, at),
        &presence,
        Instant::now(),
    )))
}

/// Each region with its live edges (their state from the store, as
/// `GET /v1/edges` shows it) and the connectors attached to them, by the
/// edges' fresh reports.
fn regions_view(
    regions: Vec<RegionRecord>,
    edges: &[EdgeRecord],
    (stored, at): (&[PresenceRecord], distribute::At),
    presence: &Presence,
    now: Instant,
) -> Vec<Region> {
    regions
        .into_iter()
        .map(|r| {
            let mine: Vec<&EdgeRecord> = edges
                .iter()
                .filter(|e| e.deleted_at.is_none() && e.region == r.id)
                .collect();
            let connectors = presence.connectors_on(mine.iter().map(|e| &e.id), now);
            Region {
                edges: mine
                    .into_iter()
                    .map(|e| RegionEdge {
                        id: e.id.clone(),
                        status: distribute::edge_status(e, stored, at),
                        tunnels: e.tunnels,
                        connectors: count(presence.connectors_on([&e.id], now)),
                        last_seen: e.last_seen,
                    })
                    .collect(),
                id: r.id,
                created_at: r.created_at,
                connectors: count(connectors),
            }
        })
        .collect()
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

async fn create_region(
    State(state): State<SharedState>,
    _: Admin,
    Json(req): Json<CreateRegion>,
) -> Result<(StatusCode, axum::Json<Region>), ApiFail> {
    // A group's `region` is `auto` or a region id: a region of that name
    // could never be pinned to.
    if req.id.as_str() == "auto" {
        return Err(ApiFail::invalid(
            "id",
            "`auto` cannot be a region id: a group with region `auto` dials any region",
        ));
    }
    let rec = RegionRecord {
        id: req.id.clone(),
        created_at: util::now_unix(),
    };
    let created_at = rec.created_at;
    state.db(move |s| s.create_region(&rec)).await?;
    tracing::info!(region = %req.id, "created region");
    Ok((
        StatusCode::CREATED,
        axum::Json(Region {
            id: req.id,
            created_at,
            edges: Vec::new(),
            connectors: 0,
        }),
    ))
}

async fn delete_region(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFail> {
    let region = RegionId::new(id.clone())
        .map_err(|_| ApiFail::not_found(None, format!("region {id:?} not found")))?;
    let now = util::now_unix();
    let rid = region.clone();
    state.db(move |s| s.delete_region(&rid, now)).await?;
    tracing::info!(region = %region, "deleted region");
    Ok(StatusCode::NO_CONTENT)
}

// ---- admin: groups ----

async fn list_groups(
    State(state): State<SharedState>,
    _: Admin,
) -> Result<axum::Json<Vec<Group>>, ApiFail> {
    let groups = state.db(|s| s.list_groups()).await?;
    Ok(axum::Json(
        groups
            .into_iter()
            .map(|(g, connectors)| Group {
                id: g.id,
                region: g.region,
                connectors,
            })
            .collect(),
    ))
}

async fn create_group(
    State(state): State<SharedState>,
    _: Admin,
    Json(req): Json<CreateGroup>,
) -> Result<(StatusCode, axum::Json<Group>), ApiFail> {
    let region = match req.region.as_deref() {
        None | Some("auto") => "auto".to_owned(),
        Some(r) => RegionId::new(r)
            .map_err(|e| ApiFail::invalid("region", format!("must be `auto` or a region id: {e}")))?
            .to_string(),
    };
    let rec = GroupRecord {
        id: req.id.clone(),
        region: region.clone(),
        created_at: util::now_unix(),
    };
    let created = state.db(move |s| Ok(s.create_group(&rec))).await?;
    let version = created.map_err(|e| match e {
        StoreError::NotFound { kind: "region", id } => match RegionId::new(id) {
            Ok(r) => missing_region("region", &r),
            Err(_) => ApiFail::internal("the store named an invalid region"),
        },
        other => ApiFail::from(other),
    })?;
    tracing::info!(group = %req.id, region = %region, version, "created group");
    Ok((
        StatusCode::CREATED,
        axum::Json(Group {
            id: req.id,
            region,
            connectors: 0,
        }),
    ))
}

async fn delete_group(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFail> {
    let id = GroupId::new(id.clone())
        .map_err(|_| ApiFail::not_found(None, format!("group {id:?} not found")))?;
    let gid = id.clone();
    let version = state.db(move |s| s.delete_group(&gid)).await?;
    tracing::info!(group = %id, version, "deleted group");
    Ok(StatusCode::NO_CONTENT)
}

// ---- admin: apps ----

async fn list_apps(
    State(state): State<SharedState>,
    _: Admin,
) -> Result<axum::Json<Vec<App>>, ApiFail> {
    let config = state.config.clone();
    Ok(axum::Json(
        state.db(move |s| apps_with_urls(s, &config)).await?,
    ))
}

async fn get_app(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<axum::Json<App>, ApiFail> {
    let missing = || ApiFail::not_found(None, format!("app {id:?} not found"));
    let app_id = AppId::new(id.clone()).map_err(|_| missing())?;
    let config = state.config.clone();
    let found = state
        .db(move |s| {
            let Some(rec) = s.get_app(&app_id)? else {
                return Ok(None);
            };
            let app = to_app(rec, public_port(s, &config)?);
            Ok(Some(with_certificate(app, &s.list_certificates()?)))
        })
        .await?;
    found.map(axum::Json).ok_or_else(missing)
}

async fn delete_app(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFail> {
    let app_id = AppId::new(id.clone())
        .map_err(|_| ApiFail::not_found(None, format!("app {id:?} not found")))?;
    let version = state.db(move |s| s.delete_app(&app_id)).await?;
    tracing::info!(app = %id, version, "deleted app");
    Ok(StatusCode::NO_CONTENT)
}

/// Checks an internal URL and returns its canonical form, the one stored.
///
/// - `http` or `https`, with a host; no user name, password or fragment.
/// - No control characters or whitespace anywhere: a URL parser would drop
///   tabs and line breaks silently, so `http://intra\tnet/` is refused
///   rather than stored as something the admin did not type.
/// - No query string, not even an empty `?`: the connector joins each
///   request's own path and query to the internal URL, so a query here
///   would be dropped.
/// - Canonical: scheme and host lower case, the scheme's default port
///   dropped, an empty path made `/`, dot segments resolved, as the WHATWG
///   URL standard serializes it (`HTTP://Intra.Corp:80` becomes
///   `http://intra.corp/`).
pub(crate) fn check_internal_url(raw: &str) -> Result<String, String> {
    if raw.len() > MAX_URL {
        return Err(format!("is longer than {MAX_URL} bytes"));
    }
    if let Some(c) = raw.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "must not contain control characters or whitespace (found {c:?}); percent-encode them"
        ));
    }
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain a user name or password".into());
    }
    if url.fragment().is_some() {
        return Err("must not contain a #fragment".into());
    }
    if url.query().is_some() {
        return Err(
            "must not contain a query string (?...): each request's own query is passed on, and one here would be lost"
                .into(),
        );
    }
    Ok(url.into())
}

/// An internal URL's `*`: allowed only as the whole first label of its
/// host (or the whole host, for single-label internal names), and only for
/// a wildcard app, whose requests each replace it with the label their
/// host matched (`http://*.internal.corp/` serves `hr.corp.<domain>` from
/// `http://hr.internal.corp/`; `http://*:8080/` from `http://hr:8080/`).
fn check_wildcard_internal(internal_url: &str, external_host: &str) -> Result<(), String> {
    let host = url::Url::parse(internal_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    if !host.contains('*') {
        return Ok(());
    }
    if api::wildcard_suffix(external_host).is_none() {
        return Err(format!(
            "host {host:?} has a `*`, which only a wildcard app (external host *.…) can fill in"
        ));
    }
    if host == "*" {
        return Ok(()); // the label is the whole host (a single-label name)
    }
    let rest = host.strip_prefix("*.").unwrap_or("*");
    if rest.contains('*') || check_dns_name(rest).is_err() {
        return Err(format!(
            "host {host:?}: `*` may only be the whole first label (for example http://*.internal.corp/)"
        ));
    }
    Ok(())
}

/// The most certificates one backend CA bundle may hold.
const MAX_BACKEND_CA_CERTS: usize = 64;

/// Checks an app's backend CA bundle and returns it as stored: its
/// `CERTIFICATE` blocks, each a parsable X.509 certificate, written out
/// again (other text dropped). Refused: more than
/// `api::MAX_BACKEND_CA_BYTES`, a private key (it would be sent to every
/// connector of the group), other PEM blocks, no certificate at all, more
/// than [`MAX_BACKEND_CA_CERTS`].
pub(crate) fn check_backend_ca(pem: &str) -> Result<String, String> {
    use base64::Engine as _;
    use rustls::pki_types::pem::{PemObject, SectionKind};
    if pem.len() > api::MAX_BACKEND_CA_BYTES {
        return Err(format!(
            "the bundle is {} bytes; the limit is {} (give only the roots and intermediates the backend needs)",
            pem.len(),
            api::MAX_BACKEND_CA_BYTES
        ));
    }
    let mut out = String::new();
    let mut count = 0;
    for (i, section) in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()).enumerate() {
        let (kind, der) = section.map_err(|e| format!("block {} is not valid PEM ({e})", i + 1))?;
        match kind {
            SectionKind::Certificate => {}
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                return Err(format!(
                    "block {} is a private key: a CA bundle holds certificates only, and it goes to every connector of the group",
                    i + 1
                ))
            }
            other => {
                return Err(format!(
                    "block {} is {other:?}, not a CERTIFICATE",
                    i + 1
                ))
            }
        }
        x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("certificate {} does not parse as X.509 ({e})", i + 1))?;
        count += 1;
        if count > MAX_BACKEND_CA_CERTS {
            return Err(format!(
                "the bundle holds more than {MAX_BACKEND_CA_CERTS} certificates"
            ));
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    if count == 0 {
        return Err(
            "no CERTIFICATE block found: give the CA certificates in PEM (-----BEGIN CERTIFICATE-----)"
                .into(),
        );
    }
    Ok(out)
}

/// The port users reach the edges on, from the store.
async fn users_port(state: &AppState) -> Result<u16, ApiFail> {
    let config = state.config.clone();
    state.db(move |s| public_port(s, &config)).await
}

/// Checks an app's home page and returns what is stored: the part under
/// the external root (path, query and fragment, starting with `/`; dot
/// segments resolved). Accepted:
///
/// - a path starting with `/` (not `//`): under the external root;
/// - an `https` URL on the app's external host (any case), without a
///   user name, on the default port or `port` (the edges');
/// - a URL under the app's internal URL (same scheme, host and port, the
///   path its prefix or under it), translated as link translation would
///   (`http://hr.corp/hr/portal` → `/portal` for `http://hr.corp/hr/`).
///
/// Anything else is refused with what it should have been.
pub(crate) fn check_home_page(
    raw: &str,
    external_host: &str,
    internal_url: &str,
    port: u16,
) -> Result<String, String> {
    if raw.len() > MAX_URL {
        return Err(format!("is longer than {MAX_URL} bytes"));
    }
    if let Some(c) = raw.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "must not contain control characters or whitespace (found {c:?}); percent-encode them"
        ));
    }
    if api::wildcard_suffix(external_host).is_some() {
        return Err(format!(
            "a wildcard app ({external_host}) has no one host to launch; publish the host users should start at as an app of its own, with its home page"
        ));
    }
    let root = format!("https://{external_host}/");
    let outside = || {
        format!(
            "{raw:?} must sit under the app's external URL {root} (a URL there, or a path such as /portal/), or under its internal URL {internal_url}"
        )
    };
    let external = url::Url::parse(&root).map_err(|e| format!("external host: {e}"))?;
    let url = if raw.starts_with('/') && !raw.starts_with("//") {
        external
            .join(raw)
            .map_err(|e| format!("{raw:?} is not a path ({e})"))?
    } else {
        url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e})"))?
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain a user name or password".into());
    }
    let tail = |url: &url::Url, from: usize| {
        let path = &url.path()[from..];
        let mut out = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        if let Some(q) = url.query() {
            out.push('?');
            out.push_str(q);
        }
        if let Some(f) = url.fragment() {
            out.push('#');
            out.push_str(f);
        }
        out
    };
    if url.host_str() == Some(external_host) {
        if url.scheme() != "https" {
            return Err(format!(
                "{raw:?} must be https: users reach the app at {root}"
            ));
        }
        if url.port().is_some_and(|p| p != port) {
            return Err(format!(
                "{raw:?} names port {}, and users reach the app on port {port}: leave the port out",
                url.port().unwrap_or_default()
            ));
        }
        return Ok(tail(&url, 0));
    }
    let internal = url::Url::parse(internal_url).map_err(|_| outside())?;
    let same_origin = url.scheme() == internal.scheme()
        && url.host_str() == internal.host_str()
        && url.port_or_known_default() == internal.port_or_known_default();
    if !same_origin {
        return Err(outside());
    }
    let prefix = internal.path().trim_end_matches('/');
    let path = url.path();
    let under = path
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if !under {
        return Err(format!(
            "{raw:?} lies outside the app's published path {}: {}",
            internal.path(),
            outside()
        ));
    }
    Ok(tail(&url, prefix.len()))
}

/// Lower-cases and checks an external host: one under the apps domain; a
/// wildcard (`*.corp.<apps domain>`, or `*.<apps domain>`), whose `*` is
/// its whole first label and nowhere else and stands for one label; or one
/// of a custom domain (outside the apps domain), whose CNAME chain
/// [`check_custom_host`] checks. A wildcard lies under the apps domain.
pub(crate) fn check_external_host(host: &str, apps_domain: &str) -> Result<String, String> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    let (wildcard, name) = match api::wildcard_suffix(&host) {
        Some(suffix) => (true, suffix),
        None => (false, host.as_str()),
    };
    if name.contains('*') {
        return Err(format!(
            "{host:?} is not a valid DNS name: a wildcard is `*.` before the rest of the host, once (for example *.corp.{apps_domain})"
        ));
    }
    check_dns_name(name).map_err(|e| format!("{host:?} is not a valid DNS name: {e}"))?;
    let under = name
        .strip_suffix(apps_domain)
        .is_some_and(|prefix| (prefix.len() > 1 && prefix.ends_with('.')) || prefix.is_empty());
    if wildcard && !under {
        return Err(format!(
            "{host:?} must lie under the apps domain {apps_domain:?} (for example *.corp.{apps_domain}): a custom domain takes exact hosts"
        ));
    }
    if host == apps_domain {
        return Err(format!(
            "{host:?} is the apps domain itself; an app lies under it (for example app.{apps_domain}) or in a custom domain"
        ));
    }
    if is_custom(&host, apps_domain) && (host == "localhost" || host.ends_with(".localhost")) {
        return Err(format!(
            "{host:?} is outside the apps domain {apps_domain:?}, and names under localhost resolve to this machine, never through a CNAME (RFC 6761): use a host under the apps domain or one of a domain you control"
        ));
    }
    if is_custom(&host, apps_domain) && apps_domain.ends_with(&format!(".{host}")) {
        return Err(format!(
            "{host:?} is a parent of the apps domain {apps_domain:?}; use a host under it or in a custom domain"
        ));
    }
    // Names Portico answers itself: the auth host (sign-in and My Apps),
    // the DNS authority's name server, and the region names of edges and
    // tunnel endpoints.
    let reserved = host
        .strip_suffix(apps_domain)
        .and_then(|p| p.strip_suffix('.'))
        .is_some_and(|prefix| {
            matches!(prefix, "auth" | "ns")
                || prefix
                    .rsplit_once('.')
                    .is_some_and(|(_, l)| l == "edge" || l == "tunnel")
        });
    if reserved {
        return Err(format!(
            "{host:?} is a name Portico uses itself (auth.{apps_domain} signs users in, ns.{apps_domain} and *.edge. and *.tunnel.{apps_domain} are DNS names of the edges); pick another host"
        ));
    }
    Ok(host)
}

/// Whether `host` lies outside the apps domain (a custom domain).
pub(crate) fn is_custom(host: &str, apps_domain: &str) -> bool {
    !host
        .strip_suffix(apps_domain)
        .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
}

/// For an external host of a custom domain that is new (not `current`):
/// its CNAME chain must reach the app's default host `<id>.<apps domain>`
/// (`crate::custom_domain`). Hosts under the apps domain pass as they are.
async fn check_custom_host(
    state: &AppState,
    spec: &api::AppSpec,
    current: Option<&str>,
) -> Result<(), ApiFail> {
    let Some(raw) = &spec.external_host else {
        return Ok(());
    };
    let domain = &state.config.apps_domain;
    let host =
        check_external_host(raw, domain).map_err(|e| ApiFail::invalid("external_host", e))?;
    if !is_custom(&host, domain) || current == Some(host.as_str()) {
        return Ok(());
    }
    let expected = format!("{}.{domain}", spec.id).to_ascii_lowercase();
    match state.domains.check(&host, &expected).await {
        Ok(chain) => {
            tracing::info!(app = %spec.id, host = %host, %chain, "custom domain accepted: its CNAME chain reaches the app's default host");
            Ok(())
        }
        Err(e) => Err(ApiFail::invalid(
            "external_host",
            format!(
                "{host:?} is outside the apps domain {domain:?}, so its CNAME chain must reach {expected:?}: {}",
                portico_agent::error_chain(&e)
            ),
        )),
    }
}

async fn create_app(
    State(state): State<SharedState>,
    _: Admin,
    Json(spec): Json<api::AppSpec>,
) -> Result<(StatusCode, axum::Json<App>), ApiFail> {
    check_custom_host(&state, &spec, None).await?;
    let port = users_port(&state).await?;
    let rec = app_record(&state.config, spec, util::now_unix(), port)?;
    let app = write_app(&state, rec, |s, rec| s.create_app(rec)).await?;
    tracing::info!(app = %app.id, host = %app.external_host, group = %app.connector_group, "created app");
    Ok((StatusCode::CREATED, axum::Json(app)))
}

async fn update_app(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
    Json(patch): Json<api::AppPatch>,
) -> Result<axum::Json<App>, ApiFail> {
    let missing = || ApiFail::not_found(None, format!("app {id:?} not found"));
    let app_id = AppId::new(id.clone()).map_err(|_| missing())?;
    if patch.is_empty() {
        return Err(ApiFail::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            None,
            "the patch changes nothing: give at least one field",
        ));
    }
    let found = state.db(move |s| s.get_app(&app_id)).await?;
    let current = found.ok_or_else(missing)?;
    let created_at = current.created_at;
    let current_host = current.external_host.clone();
    let spec = patch.apply(api::AppSpec {
        id: current.id,
        external_host: Some(current.external_host),
        internal_url: current.internal_url,
        connector_group: current.connector_group,
        backend_timeout: current.backend_timeout,
        validate_backend_tls: current.validate_backend_tls,
        preauth: api::Preauth::of_features(&current.required_features),
        // The sign-in, maintenance and own-client features are preauth's,
        // maintenance's and the client's to set.
        required_features: current
            .required_features
            .into_iter()
            .filter(|f| !ROUTER_FEATURES.iter().any(|(r, _)| r == f))
            .collect(),
        translate_headers: current.translate_headers,
        translate_body: current.translate_body,
        assignment: current.assignment,
        identity_headers: current.identity_headers,
        hidden: current.hidden,
        maintenance: current.maintenance,
        home_page: current.home_path,
        backend_ca_pem: current.backend_ca_pem,
        http_only: current.http_only,
        persistent: current.persistent,
        oidc_client_id: current.oidc_client_id,
        oidc_client_secret: current.oidc_client_secret,
    });
    // The same checks as a new app, on the whole result; a custom host's
    // chain only when the host changes.
    check_custom_host(&state, &spec, Some(&current_host)).await?;
    let port = users_port(&state).await?;
    let rec = app_record(&state.config, spec, created_at, port)?;
    let app = write_app(&state, rec, |s, rec| s.update_app(rec)).await?;
    tracing::info!(app = %app.id, host = %app.external_host, group = %app.connector_group, "updated app");
    Ok(axum::Json(app))
}

/// Checks an app as an admin describes it and makes the record to store:
/// the one set of checks for creating and updating an app.
///
/// `port` is the one users reach the edges on (a home page may name it).
fn app_record(
    config: &Config,
    spec: api::AppSpec,
    created_at: u64,
    port: u16,
) -> Result<AppRecord, ApiFail> {
    let internal_url =
        check_internal_url(&spec.internal_url).map_err(|e| ApiFail::invalid("internal_url", e))?;
    api::check_required_features(&spec.required_features)
        .map_err(|e| ApiFail::invalid("required_features", e.to_string()))?;
    if let Some((feature, setting)) = ROUTER_FEATURES
        .iter()
        .find(|(f, _)| spec.required_features.iter().any(|r| r == f))
    {
        return Err(ApiFail::invalid(
            "required_features",
            format!("{feature:?} is what {setting} instead"),
        ));
    }
    if spec.preauth == api::Preauth::Oidc && config.sign_in.is_none() {
        return Err(ApiFail::invalid(
            "preauth",
            "this router has no OpenID provider to sign users in with: start it with --oidc-issuer, --oidc-client-id and --oidc-client-secret-file",
        ));
    }
    check_access(&spec)?;
    let (oidc_client_id, oidc_client_secret) = check_app_client(&spec)?;
    let mut required_features = spec.required_features;
    if spec.preauth == api::Preauth::Oidc {
        required_features.push(api::SIGN_IN_FEATURE.to_owned());
    }
    // An edge of a build without maintenance mode refuses the app
    // (FeatureUnsupported, 503) rather than serve it.
    if spec.maintenance {
        required_features.push(api::MAINTENANCE_FEATURE.to_owned());
    }
    // An edge of a build that knows only the deployment's client refuses
    // the app rather than sign its users in through that one.
    if oidc_client_id.is_some() {
        required_features.push(api::APP_CLIENT_FEATURE.to_owned());
    }
    api::check_required_features(&required_features)
        .map_err(|e| ApiFail::invalid("required_features", e.to_string()))?;
    let domain = &config.apps_domain;
    let external_host = match &spec.external_host {
        Some(h) => {
            check_external_host(h, domain).map_err(|e| ApiFail::invalid("external_host", e))?
        }
        None => check_external_host(&format!("{}.{domain}", spec.id), domain).map_err(|e| {
            ApiFail::invalid(
                "external_host",
                format!(
                    "the default host for app {}: {e}; set external_host",
                    spec.id
                ),
            )
        })?,
    };
    check_wildcard_internal(&internal_url, &external_host)
        .map_err(|e| ApiFail::invalid("internal_url", e))?;
    if spec.preauth == api::Preauth::Oidc && api::wildcard_suffix(&external_host).is_some() {
        // The edge's sign-in binds sessions and handoffs to the app's one
        // host; a wildcard app has none.
        return Err(ApiFail::invalid(
            "preauth",
            format!(
                "a wildcard app ({external_host}) cannot sign users in yet: publish it with --preauth passthrough, or publish the hosts that need sign-in as apps of their own"
            ),
        ));
    }
    let backend_ca_pem = spec
        .backend_ca_pem
        .as_deref()
        .map(check_backend_ca)
        .transpose()
        .map_err(|e| ApiFail::invalid("backend_ca_pem", e))?;
    let home_path = spec
        .home_page
        .as_deref()
        .map(|page| check_home_page(page, &external_host, &internal_url, port))
        .transpose()
        .map_err(|e| ApiFail::invalid("home_page", e))?;
    Ok(AppRecord {
        id: spec.id,
        external_host,
        internal_url,
        connector_group: spec.connector_group,
        backend_timeout: spec.backend_timeout,
        validate_backend_tls: spec.validate_backend_tls,
        required_features,
        translate_headers: spec.translate_headers,
        translate_body: spec.translate_body,
        assignment: spec.assignment,
        identity_headers: spec.identity_headers,
        hidden: spec.hidden,
        created_at,
        maintenance: spec.maintenance,
        home_path,
        backend_ca_pem,
        http_only: spec.http_only,
        persistent: spec.persistent,
        oidc_client_id,
        oidc_client_secret,
    })
}

/// The features the router sets from an app's settings, never an admin's
/// `required_features`, with the setting to use instead.
const ROUTER_FEATURES: &[(&str, &str)] = &[
    (
        api::SIGN_IN_FEATURE,
        "preauth = oidc requires: set preauth (--preauth oidc)",
    ),
    (
        api::MAINTENANCE_FEATURE,
        "maintenance mode requires: set maintenance (--maintenance)",
    ),
    (
        api::APP_CLIENT_FEATURE,
        "an app's own OpenID client requires: set the client (--oidc-client-id, --oidc-client-secret-file)",
    ),
];

/// An app's own OpenID client: only for an app that signs users in, the
/// id and the secret together, each bounded and printable. The secret is
/// in no message.
fn check_app_client(
    spec: &api::AppSpec,
) -> Result<(Option<String>, Option<api::ClientSecret>), ApiFail> {
    let (id, secret) = (&spec.oidc_client_id, &spec.oidc_client_secret);
    if id.is_none() && secret.is_none() {
        return Ok((None, None));
    }
    if spec.preauth != api::Preauth::Oidc {
        return Err(ApiFail::invalid(
            "oidc_client_id",
            format!(
                "app {} does not sign users in, so it has no OpenID client: add --preauth oidc, or leave out --oidc-client-id and --oidc-client-secret-file",
                spec.id
            ),
        ));
    }
    match (id, secret) {
        (Some(id), Some(secret)) => {
            api::check_oidc_client_id(id).map_err(|e| ApiFail::invalid("oidc_client_id", e))?;
            api::check_oidc_client_secret(secret)
                .map_err(|e| ApiFail::invalid("oidc_client_secret", e))?;
            Ok((Some(id.clone()), Some(secret.clone())))
        }
        (Some(id), None) => Err(ApiFail::invalid(
            "oidc_client_secret",
            format!(
                "client id {id:?} needs its secret: give --oidc-client-secret-file with --oidc-client-id"
            ),
        )),
        (None, _) => Err(ApiFail::invalid(
            "oidc_client_id",
            format!(
                "app {} has no OpenID client of its own to give a secret to: give --oidc-client-id too",
                spec.id
            ),
        )),
    }
}

/// Assignment and identity headers: only for an app that signs users in,
/// and such an app must assign someone.
fn check_access(spec: &api::AppSpec) -> Result<(), ApiFail> {
    spec.assignment
        .check()
        .map_err(|e| ApiFail::invalid("assignment", e))?;
    api::check_identity_headers(&spec.identity_headers)
        .map_err(|e| ApiFail::invalid("identity_headers", e))?;
    match spec.preauth {
        api::Preauth::Oidc if spec.assignment.is_nobody() => Err(ApiFail::invalid(
            "assignment",
            format!(
                "app {} signs users in but assigns no one: assign users or groups (--assign user:NAME, --assign group:NAME) or everyone who signs in (--assign everyone)",
                spec.id
            ),
        )),
        api::Preauth::Passthrough if !spec.assignment.is_nobody() => Err(ApiFail::invalid(
            "assignment",
            format!(
                "app {} does not sign users in, so no one can be assigned to it: add --preauth oidc",
                spec.id
            ),
        )),
        api::Preauth::Passthrough if !spec.identity_headers.is_empty() => Err(ApiFail::invalid(
            "identity_headers",
            format!(
                "app {} does not sign users in, so there is no identity to send: add --preauth oidc",
                spec.id
            ),
        )),
        _ => Ok(()),
    }
}

/// Writes an app record with `write`, publishes the new version and returns
/// the app as served. A missing group is named as the field at fault.
async fn write_app(
    state: &AppState,
    rec: AppRecord,
    write: fn(&dyn Store, &AppRecord) -> Result<u64, StoreError>,
) -> Result<App, ApiFail> {
    let config = state.config.clone();
    let group = rec.connector_group.clone();
    let written = state
        .db(move |s| {
            Ok(write(s, &rec).and_then(|version| {
                let port = public_port(s, &config)?;
                Ok((version, to_app(rec, port)))
            }))
        })
        .await?;
    let (version, app) = written.map_err(|e| match e {
        StoreError::NotFound { kind: "group", .. } => ApiFail::not_found(
            Some("connector_group"),
            format!("connector group {group} does not exist; create it first"),
        ),
        other => ApiFail::from(other),
    })?;
    tracing::debug!(app = %app.id, version, "app written");
    Ok(app)
}

// ---- admin: certificates ----

fn to_certificate(c: CertificateRecord) -> api::Certificate {
    api::Certificate {
        id: c.id,
        names: c.names,
        issuer: c.issuer,
        not_before: c.not_before,
        not_after: c.not_after,
        uploaded_at: c.uploaded_at,
    }
}

async fn list_certificates(
    State(state): State<SharedState>,
    _: Admin,
) -> Result<axum::Json<Vec<api::Certificate>>, ApiFail> {
    let certs = state.db(|s| s.list_certificates()).await?;
    Ok(axum::Json(certs.into_iter().map(to_certificate).collect()))
}

async fn upload_certificate(
    State(state): State<SharedState>,
    _: Admin,
    Json(upload): Json<api::CertificateUpload>,
) -> Result<(StatusCode, axum::Json<api::Certificate>), ApiFail> {
    let rec = crate::certificates::validate(&upload, util::now_unix())
        .map_err(|e| ApiFail::invalid(e.field(), portico_agent::error_chain(&e).to_string()))?;
    let stored = rec.clone();
    let version = state.db(move |s| s.put_certificate(&stored)).await?;
    tracing::info!(certificate = %rec.id, names = ?rec.names, not_after = rec.not_after, version, "certificate uploaded");
    Ok((StatusCode::CREATED, axum::Json(to_certificate(rec))))
}

async fn delete_certificate(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFail> {
    if id.len() > 64 {
        return Err(ApiFail::not_found(
            None,
            format!("certificate {id:?} not found"),
        ));
    }
    let key = id.clone();
    let version = state.db(move |s| s.delete_certificate(&key)).await?;
    tracing::info!(certificate = %id, version, "certificate deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- admin: tokens ----

async fn create_token(
    State(state): State<SharedState>,
    _: Admin,
    Json(req): Json<CreateToken>,
) -> Result<(StatusCode, axum::Json<TokenCreated>), ApiFail> {
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL);
    if ttl == 0 || ttl > MAX_TOKEN_TTL {
        return Err(ApiFail::invalid(
            "ttl_secs",
            format!("must be between 1 and {MAX_TOKEN_TTL} seconds (7 days), not {ttl}"),
        ));
    }
    match &req.scope {
        TokenScope::Connector { group } => {
            let gid = group.clone();
            if state.db(move |s| s.get_group(&gid)).await?.is_none() {
                return Err(ApiFail::not_found(
                    Some("scope.group"),
                    format!("connector group {group} does not exist"),
                ));
            }
        }
        // The store checks that the region exists, in the same
        // transaction that stores the token.
        TokenScope::Edge { .. } => {}
    }
    let rng_fail = |_| ApiFail::internal("random number generator failed");
    let id = util::random_hex::<8>().map_err(rng_fail)?;
    let secret = util::random_hex::<16>().map_err(rng_fail)?;
    let now = util::now_unix();
    let rec = TokenRecord {
        id: id.clone(),
        secret_sha256: util::sha256_hex(secret.as_bytes()),
        scope: req.scope.clone(),
        created_at: now,
        expires_at: now + ttl,
        used_at: None,
        revoked_at: None,
    };
    let expires_at = rec.expires_at;
    let created = state.db(move |s| Ok(s.create_token(&rec))).await?;
    created.map_err(|e| match (e, &req.scope) {
        (StoreError::NotFound { kind: "region", .. }, TokenScope::Edge { region }) => {
            missing_region("scope.region", region)
        }
        (other, _) => ApiFail::from(other),
    })?;
    let token = JoinToken {
        id: id.clone(),
        secret,
        ca_sha256: state.ca.sha256().to_owned(),
    };
    tracing::info!(token.id = %id, scope = ?req.scope, ttl_secs = ttl, "created join token");
    Ok((
        StatusCode::CREATED,
        axum::Json(TokenCreated {
            id,
            token: token.to_string(),
            scope: req.scope,
            expires_at,
        }),
    ))
}

async fn list_tokens(
    State(state): State<SharedState>,
    _: Admin,
) -> Result<axum::Json<Vec<TokenInfo>>, ApiFail> {
    let records = state.db(|s| s.list_tokens()).await?;
    let now = util::now_unix();
    Ok(axum::Json(
        records
            .into_iter()
            .map(|t| TokenInfo {
                status: match (t.used_at, t.revoked_at) {
                    (Some(_), _) => TokenStatus::Used,
                    (None, Some(_)) => TokenStatus::Revoked,
                    (None, None) if t.expires_at <= now => TokenStatus::Expired,
                    (None, None) => TokenStatus::Unused,
                },
                id: t.id,
                scope: t.scope,
                created_at: t.created_at,
                expires_at: t.expires_at,
                used_at: t.used_at,
                revoked_at: t.revoked_at,
            })
            .collect(),
    ))
}

async fn revoke_token(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFail> {
    let token_id = id.to_ascii_lowercase();
    if token_id.len() != 16 || !token_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiFail::not_found(
            None,
            format!("join token {id:?} not found (a token id is 16 hex digits)"),
        ));
    }
    let now = util::now_unix();
    let tid = token_id.clone();
    let outcome = state.db(move |s| Ok(s.revoke_token(&tid, now))).await?;
    outcome.map_err(|e| match e {
        StoreError::TokenUsed => ApiFail::conflict(
            None,
            format!("join token {token_id} was already used; delete the connector or edge it enrolled instead"),
        ),
        StoreError::TokenRevoked => {
            ApiFail::conflict(None, format!("join token {token_id} is already revoked"))
        }
        other => ApiFail::from(other),
    })?;
    tracing::info!(token.id = %token_id, "revoked join token");
    Ok(StatusCode::NO_CONTENT)
}

// ---- admin: connectors and edges ----

async fn list_connectors(
    State(state): State<SharedState>,
    _: Admin,
) -> Result<axum::Json<Vec<Connector>>, ApiFail> {
    let (records, regions) = state
        .db(|s| Ok((s.list_connectors()?, s.connector_regions()?)))
        .await?;
    let mut regions: std::collections::HashMap<ConnectorId, (u64, portico_proto::api::RegionChoice)> = regions
        .into_iter()
        .filter_map(|r| match serde_json::from_str(&r.report) {
            Ok(choice) => Some((r.id, (r.at, choice))),
            Err(e) => {
                tracing::warn!(connector = %r.id, error = %e, "ignoring an unreadable region report");
                None
            }
        })
        .collect();
    let now = Instant::now();
    let presence = state.presence();
    let list = records
        .into_iter()
        .filter(|c| c.deleted_at.is_none())
        .map(|c| {
            let attached = presence.connector(&c.id, now);
            let region = regions.remove(&c.id);
            Connector {
                region_reported_at: region.as_ref().map(|r| r.0),
                region: region.map(|r| r.1),
                status: status(attached.is_active()),
                id: c.id,
                group: c.group,
                version: c.version,
                host: c.host,
                address_seen: c.address_seen,
                edges: attached.edges,
                tunnels: attached.tunnels,
                last_seen: c.last_seen,
                enrolled_at: c.enrolled_at,
                cert_serial: c.cert.serial,
                cert_not_after: c.cert.not_after,
            }
        })
        .collect();
    Ok(axum::Json(list))
}

async fn delete_connector(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFail> {
    let cid = ConnectorId::new(id.clone())
        .map_err(|_| ApiFail::not_found(None, format!("connector {id:?} not found")))?;
    let now = util::now_unix();
    let version = state.db(move |s| s.delete_connector(&cid, now)).await?;
    tracing::info!(connector = %id, version, "deleted (revoked) connector");
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_edge(
    State(state): State<SharedState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFail> {
    let eid = EdgeId::new(id.clone())
        .map_err(|_| ApiFail::not_found(None, format!("edge {id:?} not found")))?;
    let now = util::now_unix();
    let version = state
        .db({
            let eid = eid.clone();
            move |s| s.delete_edge(&eid, now)
        })
        .await?;
    // Its reports no longer count for connector status.
    state.presence().remove(&eid);
    tracing::info!(edge = %id, version, "deleted (revoked) edge");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_edges(
    State(state): State<SharedState>,
    _: Admin,
) -> Result<axum::Json<Vec<Edge>>, ApiFail> {
    let (records, stored) = state
        .db(|s| Ok((s.list_edges()?, s.list_presence()?)))
        .await?;
    let at = state.at();
    Ok(axum::Json(
        records
            .into_iter()
            .filter(|e| e.deleted_at.is_none())
            .map(|e| Edge {
                status: distribute::edge_status(&e, &stored, at),
                id: e.id,
                region: e.region,
                host: e.host,
                version: e.version,
                tunnel_addr: e.tunnel_addr,
                public_addr: e.public_addr,
                last_seen: e.last_seen,
                tunnels: e.tunnels,
                enrolled_at: e.enrolled_at,
            })
            .collect(),
    ))
}

/// Refreshes the connector and edge gauges (at each scrape).
pub(crate) fn refresh_gauges(state: &AppState) {
    let now = Instant::now();
    let (Ok(connectors), Ok(edges), Ok(regions), Ok(stored)) = (
        state.store.list_connectors(),
        state.store.list_edges(),
        state.store.list_regions(),
        state.store.list_presence(),
    ) else {
        return;
    };
    let at = state.at();
    let presence = state.presence();
    let connectors: Vec<bool> = connectors
        .iter()
        .filter(|c| c.deleted_at.is_none())
        .map(|c| presence.connector(&c.id, now).is_active())
        .collect();
    let edges: Vec<(&RegionId, Status)> = edges
        .iter()
        .filter(|e| e.deleted_at.is_none())
        .map(|e| (&e.region, distribute::edge_status(e, &stored, at)))
        .collect();
    drop(presence);
    const EDGE_STATES: [(&str, Status); 3] = [
        ("active", Status::Active),
        ("inactive", Status::Inactive),
        ("draining", Status::Draining),
    ];
    // Every region, edges or not; a deleted region's series go (removed
    // one by one, not reset, so that a concurrent scrape never sees none).
    let gauge = &state.metrics.region_edges;
    let ids: std::collections::BTreeSet<String> =
        regions.iter().map(|r| r.id.to_string()).collect();
    let mut shown = state
        .metrics
        .regions_shown
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for gone in shown.difference(&ids) {
        for (label, _) in EDGE_STATES {
            let _ = gauge.remove_label_values(&[gone.as_str(), label]);
        }
    }
    *shown = ids;
    drop(shown);
    let set = |g: &prometheus::IntGaugeVec, labels: &[&str], n: usize| {
        g.with_label_values(labels)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    };
    for r in &regions {
        for (label, status) in EDGE_STATES {
            let n = edges
                .iter()
                .filter(|(region, st)| **region == r.id && *st == status)
                .count();
            set(gauge, &[r.id.as_str(), label], n);
        }
    }
    for (label, status) in EDGE_STATES {
        let n = edges.iter().filter(|(_, st)| *st == status).count();
        set(&state.metrics.edges, &[label], n);
    }
    let active = connectors.iter().filter(|a| **a).count();
    set(&state.metrics.connectors, &["active"], active);
    set(
        &state.metrics.connectors,
        &["inactive"],
        connectors.len() - active,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_urls_are_checked_and_made_canonical() {
        for (raw, canonical) in [
            ("http://10.0.0.5:8080/x", "http://10.0.0.5:8080/x"),
            ("https://intranet", "https://intranet/"),
            ("HTTP://Intra.Corp:80", "http://intra.corp/"),
            ("HTTPS://Intra.Corp:443/App/", "https://intra.corp/App/"),
            ("http://intra.corp:8443", "http://intra.corp:8443/"),
            ("http://[::1]:80/", "http://[::1]/"),
            ("http://x/a/./b/../c", "http://x/a/c"),
            ("http://x/%7Euser", "http://x/%7Euser"),
        ] {
            assert_eq!(check_internal_url(raw).as_deref(), Ok(canonical), "{raw}");
            assert_eq!(
                check_internal_url(canonical).as_deref(),
                Ok(canonical),
                "the canonical form is a fixed point"
            );
        }
        for (raw, part) in [
            ("ftp://x", "scheme"),
            ("http://u:p@x/", "user"),
            ("http://x/#f", "fragment"),
            ("not a url", "whitespace"),
            ("nonsense", "not a URL"),
            ("http://x/?a=1", "query"),
            ("http://x/?", "query"),
            ("http://intra\tnet/", "control"),
            ("http://x/a\nb", "control"),
            ("http://x/\u{7f}", "control"),
            ("http://x/\u{85}", "control"),
            (" http://x/", "whitespace"),
            ("http://x/ ", "whitespace"),
        ] {
            let err = check_internal_url(raw).unwrap_err();
            assert!(err.contains(part), "{raw:?}: {err}");
        }
        assert!(check_internal_url(&format!("http://x/{}", "a".repeat(MAX_URL))).is_err());
    }

    #[test]
    fn a_star_in_the_internal_host_needs_a_wildcard_app() {
        let ok = |internal: &str, external: &str| {
            check_internal_url(internal)
                .and_then(|canonical| check_wildcard_internal(&canonical, external))
        };
        assert_eq!(ok("http://*.internal.corp/", "*.corp.apps.test"), Ok(()));
        assert_eq!(
            ok("https://*.internal.corp:8443/x/", "*.corp.apps.test"),
            Ok(())
        );
        assert_eq!(ok("http://intra.corp/", "*.corp.apps.test"), Ok(()));
        let err = ok("http://*.internal.corp/", "hr.apps.test").unwrap_err();
        assert!(err.contains("only a wildcard app"), "{err}");
        assert_eq!(ok("http://*:8080/", "*.corp.apps.test"), Ok(()));
        for bad in [
            "http://a.*.corp/",
            "http://*a.corp/",
            "http://*.*.corp/",
            "http://**/",
        ] {
            let err = ok(bad, "*.corp.apps.test").unwrap_err();
            assert!(err.contains("whole first label"), "{bad}: {err}");
        }
    }

    #[test]
    fn backend_ca_bundles_hold_certificates_only_within_bounds() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["Private CA".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = ca.pem();
        // Text around the block is dropped; the block is kept as DER.
        let stored = check_backend_ca(&format!("Subject: Private CA\n{pem}\n")).unwrap();
        assert_eq!(stored.replace("\r\n", "\n"), pem.replace("\r\n", "\n"));
        let two = check_backend_ca(&format!("{pem}{pem}")).unwrap();
        assert_eq!(two.matches("BEGIN CERTIFICATE").count(), 2);
        for (bad, says) in [
            ("".to_owned(), "no CERTIFICATE block"),
            ("hello".to_owned(), "no CERTIFICATE block"),
            (format!("{pem}{}", key.serialize_pem()), "private key"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
                "does not parse as X.509",
            ),
            (
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_owned(),
                "not valid PEM",
            ),
            (
                pem.repeat(api::MAX_BACKEND_CA_BYTES / pem.len() + 1),
                "the limit is",
            ),
        ] {
            let err = check_backend_ca(&bad).unwrap_err();
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn home_pages_sit_under_the_external_root() {
        let ok = |raw: &str, internal: &str| check_home_page(raw, "hr.apps.test", internal, 8443);
        let root = "http://hr.corp/";
        let prefixed = "http://hr.corp:8080/hr/";
        for (raw, internal, want) in [
            ("https://hr.apps.test/portal/", root, "/portal/"),
            (
                "https://HR.Apps.Test/portal/?tab=1#top",
                root,
                "/portal/?tab=1#top",
            ),
            ("https://hr.apps.test:8443/a/../b", root, "/b"),
            ("https://hr.apps.test:443/", root, "/"),
            ("https://hr.apps.test", root, "/"),
            ("/portal/", root, "/portal/"),
            ("/portal/", prefixed, "/portal/"),
            ("http://hr.corp/portal/", root, "/portal/"),
            ("http://hr.corp:8080/hr/portal/", prefixed, "/portal/"),
            ("http://HR.corp:8080/hr", prefixed, "/"),
        ] {
            assert_eq!(
                ok(raw, internal).as_deref(),
                Ok(want),
                "{raw} for {internal}"
            );
        }
        for (raw, internal, says) in [
            // Another host, under the apps domain or not.
            ("https://wiki.apps.test/", root, "must sit under"),
            ("https://evil.example/hr.apps.test/", root, "must sit under"),
            // Another scheme.
            ("http://hr.apps.test/portal/", root, "must be https"),
            ("ftp://hr.apps.test/", root, "must be https"),
            ("https://hr.corp/portal/", root, "must sit under"),
            // Another port than the edges'.
            ("https://hr.apps.test:9999/", root, "port 9999"),
            // Outside a path-published app's prefix.
            (
                "http://hr.corp:8080/other/",
                prefixed,
                "outside the app's published path /hr/",
            ),
            ("http://hr.corp:8080/hrx", prefixed, "outside"),
            ("http://hr.corp/hr/x", prefixed, "must sit under"),
            // Not URLs, or with credentials or whitespace.
            ("//evil.example/", root, "not a URL"),
            ("portal", root, "not a URL"),
            ("https://u:p@hr.apps.test/", root, "user name"),
            ("/a b", root, "whitespace"),
        ] {
            let err = ok(raw, internal).unwrap_err();
            assert!(err.contains(says), "{raw} for {internal}: {err}");
        }
        assert!(ok(&format!("/{}", "a".repeat(MAX_URL)), root).is_err());
        let err = check_home_page("/", "*.corp.apps.test", root, 443).unwrap_err();
        assert!(err.contains("wildcard app"), "{err}");
    }

    #[test]
    fn external_hosts() {
        assert_eq!(
            check_external_host("HR.Apps.Localhost", "apps.localhost").unwrap(),
            "hr.apps.localhost"
        );
        assert!(check_external_host("apps.localhost", "apps.localhost").is_err());
        assert!(check_external_host("a_b.apps.localhost", "apps.localhost").is_err());
        // Outside the apps domain: a custom domain (its CNAME chain is
        // checked by the handler), but never a parent of the apps domain.
        assert!(check_external_host("localhost", "apps.localhost").is_err());
        let e = check_external_host("evilapps.localhost", "apps.localhost").unwrap_err();
        assert!(e.contains("RFC 6761"), "{e}");
        let host = check_external_host("HR.Example.com", "apps.localhost").unwrap();
        assert!(is_custom(&host, "apps.localhost"));
        assert!(check_external_host("example.com", "apps.example.com").is_err());
        assert!(!is_custom("hr.apps.localhost", "apps.localhost"));
        // Wildcards: `*.` once, in front, under the apps domain.
        assert_eq!(
            check_external_host("*.Corp.Apps.Localhost", "apps.localhost").unwrap(),
            "*.corp.apps.localhost"
        );
        assert!(check_external_host("*.apps.localhost", "apps.localhost").is_ok());
        for bad in [
            "*",
            "*.localhost",
            "*.evilapps.localhost",
            "a.*.apps.localhost",
            "*a.apps.localhost",
            "*.*.apps.localhost",
            "**.apps.localhost",
            "*.a*.apps.localhost",
            "x.*",
        ] {
            assert!(check_external_host(bad, "apps.localhost").is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_field_names() {
        assert_eq!(
            backticked_field("missing field `internal_url` at line 1 column 10").as_deref(),
            Some("internal_url")
        );
        assert_eq!(backticked_field("expected value"), None);
    }

    #[test]
    fn watch_queries() {
        let q = watch_query(Some("after=5&wait=600".into())).unwrap();
        assert_eq!(q.after, 5);
        assert_eq!(q.wait, Duration::from_secs(60));
        assert!(watch_query(Some("after=x".into())).is_err());
        let q = watch_query(None).unwrap();
        assert_eq!((q.after, q.wait), (0, Duration::ZERO));
    }
}
