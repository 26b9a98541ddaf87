//! Sign-in at the edge for apps with `preauth = oidc` (they require the
//! feature [`SIGN_IN_FEATURE`]): an OpenID Connect relying party, one
//! redirect URI for every app on the auth host `auth.<apps domain>`, and
//! sessions every edge of every region accepts (ARCHITECTURE.md,
//! "Sign-in").
//!
//! ```text
//! app host  GET /path, no session ─▶ 302 auth host /.portico/start?app=ID&to=/path
//! auth host /.portico/start        ─▶ flow cookie (state, nonce, PKCE verifier, app, to), 302 provider
//! provider  sign-in                ─▶ 302 auth host /.portico/callback?code&state
//! auth host /.portico/callback     ─▶ state checked, code exchanged, ID token verified,
//!                                     302 app host /.portico/session?code=<one-time handoff>
//! app host  /.portico/session      ─▶ session cookie (a new id), 302 /path
//! app host  GET /path + session    ─▶ the edge's cookie stripped, the user in the stream head
//! ```
//!
//! Everything handed to the browser is sealed ([`seal`]) with the router's
//! session keys, bound to its purpose and host. An API client (not a
//! browser navigation) may sign in with a bearer JWT of the same provider
//! ([`bearer`]); without one it gets 401 `SignInRequired` with
//! `WWW-Authenticate`, and with a refused one 401 with
//! `error="invalid_token"`, never a redirect. A request without a valid
//! session or token never opens a connector stream.
//!
//! `/.portico/sign_out` ends the session at every edge, and a handoff code
//! gives one session at any edge ([`revoke`]).

mod assert;
mod bearer;
pub(crate) mod oidc;
mod portal;
pub(crate) mod revoke;
pub(crate) mod seal;
mod target;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use portico_proto::api::{
    App, AppClient, HandoffUse, SignInSettings, SignedOut, SignedOutUser, SIGN_IN_FEATURE,
};
use portico_proto::IdentityClaims;
use serde::{Deserialize, Serialize};

use crate::request::{Body, ProxyError};
use oidc::{Provider, User};
use revoke::{HandoffAnswer, HandoffCheck, RouterLink, SignedOutSet};
use seal::{Keys, Purpose};

/// The session cookie of an app's host.
pub(crate) const SESSION_COOKIE: &str = "__Host-portico-session";
/// The sign-in flow's cookie on the auth host.
const FLOW_COOKIE: &str = "__Host-portico-flow";
/// The paths the edge answers itself.
const START: &str = "/.portico/start";
const CALLBACK: &str = "/.portico/callback";
const SESSION: &str = "/.portico/session";
const SIGN_OUT: &str = "/.portico/sign_out";
/// The keys of identity assertions, on the auth host.
const JWKS: &str = "/.well-known/jwks.json";
/// How long a user may take at the provider.
const FLOW_TTL: Duration = Duration::from_secs(600);
/// How long the handoff code is good for.
const HANDOFF_TTL: Duration = Duration::from_secs(60);
/// The most handoff codes remembered as used.
const MAX_USED: usize = 100_000;
/// How long a sign-in waits for the router's word on its handoff code.
pub(crate) const HANDOFF_CHECK: Duration = Duration::from_secs(3);

/// The deployment's sign-in as this edge holds it; replaced when the
/// router's settings change.
#[derive(Default)]
pub(crate) struct Auth {
    current: ArcSwapOption<SignIn>,
    /// Sessions signed out at any edge (kept across changes of the
    /// settings: a session id is never reused).
    signed_out: SignedOutSet,
    /// To the router, when this edge has one (not in unit tests).
    router: OnceLock<RouterLink>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("configured", &self.current.load().is_some())
            .finish()
    }
}

impl Auth {
    /// Follows the router's settings: a new provider only when they
    /// changed (it caches the provider's metadata); when only the apps'
    /// own clients did, the same one with the new clients (its discovery,
    /// used codes and opened sessions kept).
    pub(crate) fn update(&self, settings: Option<&SignInSettings>, apps_domain: &str) {
        let current = self.current.load();
        let base = settings.map(without_clients);
        if current
            .as_ref()
            .map(|s| (&s.settings, s.apps_domain.as_str()))
            == base.as_ref().map(|s| (s, apps_domain))
        {
            if let (Some(current), Some(s)) = (current.as_ref(), settings) {
                current.set_clients(&s.clients);
            }
            return;
        }
        let next = match settings {
            None => None,
            Some(s) => match SignIn::new(s.clone(), apps_domain) {
                Ok(sign_in) => Some(Arc::new(sign_in)),
                Err(e) => {
                    tracing::error!(error = %e, "the router's sign-in settings cannot be used; apps that sign users in are refused");
                    None
                }
            },
        };
        self.current.store(next);
    }

    fn get(&self) -> Option<Arc<SignIn>> {
        self.current.load_full()
    }

    /// Where sign-outs and handoff checks go (the control plane's loop).
    pub(crate) fn connect_router(&self, link: RouterLink) {
        let _ = self.router.set(link);
    }

    /// Sessions signed out at other edges and users signed out by an
    /// admin (a config's deltas), or saved.
    pub(crate) fn add_signed_out(&self, sessions: &[SignedOut], users: &[SignedOutUser]) {
        let now = seal::unix_now();
        let new = self.signed_out.add(sessions, now);
        if new > 0 {
            tracing::debug!(sessions = new, "sessions signed out elsewhere");
        }
        if !users.is_empty() {
            self.signed_out.add_users(users, now);
            tracing::info!(users = users.len(), "users signed out of every session");
        }
    }

    /// Every signed-out session and user still live: for the saved
    /// snapshot, so that a restarted edge refuses them before the router
    /// answers.
    pub(crate) fn signed_out_live(&self) -> (Vec<SignedOut>, Vec<SignedOutUser>) {
        let now = seal::unix_now();
        (self.signed_out.live(now), self.signed_out.live_users(now))
    }

    /// Signs `sid` out here at once, and at every edge through the router.
    fn sign_out(&self, sid: &str, until: u64) {
        let out = SignedOut {
            sid: sid.to_owned(),
            until,
        };
        self.signed_out.add([&out], seal::unix_now());
        let Some(router) = self.router.get() else {
            return;
        };
        if let Err(e) = router.sign_outs.try_send(out) {
            tracing::error!(error = %e, "cannot tell the router of a sign-out; the session ends at this edge only");
        }
    }

    /// The router's word on handoff code `jti`, within [`HANDOFF_CHECK`].
    async fn handoff_first_use(&self, jti: &str, until: u64) -> HandoffAnswer {
        let Some(router) = self.router.get() else {
            return HandoffAnswer::Unknown("this edge has no router".into());
        };
        let (answer, rx) = tokio::sync::oneshot::channel();
        let ask = HandoffCheck {
            used: HandoffUse {
                jti: jti.to_owned(),
                until,
            },
            answer,
        };
        if let Err(e) = router.handoffs.try_send(ask) {
            return HandoffAnswer::Unknown(e.to_string());
        }
        match tokio::time::timeout(HANDOFF_CHECK, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => HandoffAnswer::Unknown("the control plane stopped".into()),
            Err(_) => {
                HandoffAnswer::Unknown(format!("no answer within {} s", HANDOFF_CHECK.as_secs()))
            }
        }
    }

    /// What the connector learns of `user` for `app`: the claims its
    /// identity headers map, and the signed assertion (none from an older
    /// router, which sends no key).
    pub(crate) fn identity(
        &self,
        app: &App,
        principal: &Arc<Principal>,
    ) -> Result<Identity, ProxyError> {
        let assertion = match self
            .current
            .load()
            .as_ref()
            .and_then(|s| s.asserter.as_ref())
        {
            Some(a) => Some(
                a.assertion(&app.id, &principal.user)
                    .map_err(|reason| ProxyError::SignInFailed { reason })?,
            ),
            None => None,
        };
        Ok(Identity {
            principal: Arc::clone(principal),
            assertion,
        })
    }
}

/// A signed-in user as the request path carries them: the user, and the
/// claims the stream head carries, made once per session (sessions are
/// kept opened, [`SignIn::session`]).
pub(crate) struct Principal {
    pub user: User,
    claims: IdentityClaims,
}

impl Principal {
    /// The user and their claims (`sub`, `email`, `name`,
    /// `preferred_username`, one `groups` entry per group).
    pub(crate) fn new(user: User) -> Result<Principal, ProxyError> {
        let mut claims = IdentityClaims::new();
        let bad = |e: portico_proto::ClaimError| ProxyError::SignInFailed {
            reason: format!("the user's claims cannot be carried: {e}"),
        };
        for name in ["sub", "email", "name", "preferred_username"] {
            if let Some(v) = user.claim(name) {
                claims.push(name, v).map_err(bad)?;
            }
        }
        for g in &user.groups {
            claims.push("groups", g.as_str()).map_err(bad)?;
        }
        Ok(Principal { user, claims })
    }
}

/// A signed-in user as the stream head carries them to the connector.
pub(crate) struct Identity {
    pub principal: Arc<Principal>,
    pub assertion: Option<Arc<str>>,
}

impl Identity {
    pub(crate) fn sub(&self) -> &str {
        &self.principal.user.sub
    }

    pub(crate) fn claims(&self) -> &IdentityClaims {
        &self.principal.claims
    }
}

/// Whether `user` may use `app` (its assignment).
pub(crate) fn assigned(app: &App, user: &User) -> bool {
    app.assignment.admits(
        &user.sub,
        user.verified_email(),
        user.groups.iter().map(String::as_str),
    )
}

/// `s` without the apps' own clients: what, changed, needs a new
/// [`SignIn`].
fn without_clients(s: &SignInSettings) -> SignInSettings {
    SignInSettings {
        clients: Vec::new(),
        ..s.clone()
    }
}

/// One deployment's sign-in: the provider, the keys, the used codes.
struct SignIn {
    /// As the router sent them, without `clients` (those are in
    /// [`SignIn::app_clients`]).
    settings: SignInSettings,
    apps_domain: String,
    provider: Provider,
    /// The deployment's client: My Apps', and every app's without its own.
    client: Arc<oidc::Client>,
    /// The apps' own clients, by app id.
    app_clients: ArcSwap<HashMap<String, Arc<oidc::Client>>>,
    /// Signs identity assertions; none when the router sent no key.
    asserter: Option<assert::Asserter>,
    keys: Keys,
    /// API clients' bearer tokens.
    bearer: bearer::Verifier,
    /// Handoff codes and sign-in flows (by `state`) already used, with
    /// their expiry (unix seconds).
    used: Mutex<HashMap<String, u64>>,
    /// Session cookies opened before, by value: their host, expiry and
    /// user, so that a request of a known session costs a lookup, not a
    /// decryption, a JSON parse and its claims.
    sessions: Mutex<HashMap<String, Arc<OpenedSession>>>,
}

struct OpenedSession {
    host: String,
    exp: u64,
    /// As sealed: its sign-in and last-seen times decide whether it is
    /// still alive at each request.
    session: Session,
    principal: Arc<Principal>,
}

/// The most opened sessions kept.
const MAX_OPENED: usize = 50_000;

impl SignIn {
    fn new(settings: SignInSettings, apps_domain: &str) -> Result<SignIn, String> {
        let provider =
            Provider::new(&settings.issuer, &settings.groups_claim).map_err(|e| e.to_string())?;
        let client = Arc::new(oidc::Client::new(
            &settings.client_id,
            &settings.client_secret,
        ));
        let app_clients = ArcSwap::from_pointee(clients_by_app(&settings.clients));
        let settings = without_clients(&settings);
        let asserter = match assert::Asserter::new(&settings.assertion_keys, apps_domain) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "backends get no identity assertion");
                None
            }
        };
        let keys = Keys::new(settings.keys.iter().map(|k| (k.id, k.secret.as_str())))
            .map_err(|e| e.to_string())?;
        Ok(SignIn {
            settings,
            apps_domain: apps_domain.to_owned(),
            provider,
            client,
            app_clients,
            asserter,
            keys,
            bearer: bearer::Verifier::default(),
            used: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The client the sign-in of `app` goes through: the app's own, else
    /// the deployment's (also My Apps', `None`).
    fn client_for(&self, app: Option<&str>) -> Arc<oidc::Client> {
        app.and_then(|id| self.app_clients.load().get(id).cloned())
            .unwrap_or_else(|| Arc::clone(&self.client))
    }

    /// Follows the router's list of the apps' own clients.
    fn set_clients(&self, clients: &[AppClient]) {
        let next = clients_by_app(clients);
        if **self.app_clients.load() != next {
            tracing::info!(apps = next.len(), "apps' own OpenID clients changed");
            self.app_clients.store(Arc::new(next));
        }
    }

    /// The session a cookie of `host` holds: kept from before, or opened
    /// now. `Ok(None)` for a cookie that is not a live session of `host`
    /// (sealed for another host, expired, or over its idle timeout).
    fn session(
        &self,
        host: &str,
        cookie: &str,
        now: u64,
        signed_out: &SignedOutSet,
    ) -> Result<Option<Arc<OpenedSession>>, ProxyError> {
        {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = sessions.get(cookie) {
                if s.host == host && s.exp > now {
                    let live = self.alive(&s.session, now)
                        && !signed_out.refuses(&s.session.sid, &s.session.user, s.session.iat, now);
                    return Ok(live.then(|| Arc::clone(s)));
                }
            }
        }
        let Some((session, exp)) = self
            .keys
            .open_until::<Session>(Purpose::Session, host, cookie)
        else {
            return Ok(None);
        };
        if !self.alive(&session, now)
            || signed_out.refuses(&session.sid, &session.user, session.iat, now)
        {
            return Ok(None);
        }
        let principal = Arc::new(Principal::new(session.user.clone())?);
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.len() >= MAX_OPENED {
            sessions.retain(|_, s| s.exp > now);
            if sessions.len() >= MAX_OPENED {
                sessions.clear();
            }
        }
        let opened = Arc::new(OpenedSession {
            host: host.to_owned(),
            exp,
            session,
            principal,
        });
        sessions.insert(cookie.to_owned(), Arc::clone(&opened));
        Ok(Some(opened))
    }

    /// Whether session `s` is still good at `now`: within the lifetime
    /// from its sign-in (the router's current one, however it was sealed)
    /// and the idle timeout from its last request.
    fn alive(&self, s: &Session, now: u64) -> bool {
        let lifetime = self.settings.session_lifetime_secs;
        let idle = self.settings.session_idle_secs;
        let seen = s.seen.max(s.iat);
        now < s.iat.saturating_add(lifetime) && (idle == 0 || now <= seen.saturating_add(idle))
    }

    /// The session cookie sealed again with `seen = now`, when the one it
    /// came in is older than a tenth of the idle timeout (at least 1 s).
    fn seen_again(&self, s: &Session, app: &App, now: u64) -> Option<HeaderValue> {
        let idle = self.settings.session_idle_secs;
        let seen = s.seen.max(s.iat);
        if idle == 0 || now.saturating_sub(seen) < (idle / 10).max(1) {
            return None;
        }
        let renewed = Session {
            sid: s.sid.clone(),
            user: s.user.clone(),
            iat: s.iat,
            seen: now,
        };
        Some(self.session_cookie(app, &renewed, now))
    }

    /// The `Set-Cookie` of `session` at `app`'s host, sealed until the end
    /// of its lifetime; `HttpOnly` and persistent (`Max-Age`, what is left
    /// of the lifetime) as the app says.
    fn session_cookie(&self, app: &App, session: &Session, now: u64) -> HeaderValue {
        let end = session
            .iat
            .saturating_add(self.settings.session_lifetime_secs);
        let left = Duration::from_secs(end.saturating_sub(now));
        let sealed = self
            .keys
            .seal(Purpose::Session, &app.external_host, session, left);
        let max_age = app.persistent.then_some(left);
        cookie_with(SESSION_COOKIE, &sealed, max_age, app.http_only)
    }

    /// Marks a handoff code (or a flow's state) used; false if it was
    /// already.
    fn first_use(&self, jti: &str, exp: u64) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let now = seal::unix_now();
        if used.len() >= MAX_USED {
            used.retain(|_, e| *e > now);
        }
        if used.len() >= MAX_USED {
            // Full of live codes: refuse rather than forget one.
            return false;
        }
        used.insert(jti.to_owned(), exp).is_none()
    }
}

/// The apps' own clients, by app id.
fn clients_by_app(clients: &[AppClient]) -> HashMap<String, Arc<oidc::Client>> {
    clients
        .iter()
        .map(|c| {
            (
                c.app.as_str().to_owned(),
                Arc::new(oidc::Client::new(&c.client_id, c.client_secret.expose())),
            )
        })
        .collect()
}

/// The sign-in flow's state, in the auth host's cookie.
#[derive(Serialize, Deserialize)]
struct Flow {
    state: String,
    nonce: String,
    verifier: String,
    redirect: String,
    app: String,
    to: String,
    /// The client id the sign-in started with (empty in a flow from an
    /// edge of before per-app clients): the callback exchanges the code
    /// as the same client.
    #[serde(default)]
    client: String,
}

/// The one-time code from the auth host to the app's host.
#[derive(Serialize, Deserialize)]
struct Handoff {
    jti: String,
    exp: u64,
    to: String,
    user: User,
}

/// A session, in the app host's cookie.
#[derive(Serialize, Deserialize)]
pub(crate) struct Session {
    /// A new id at every sign-in.
    pub sid: String,
    pub user: User,
    /// Unix seconds.
    pub iat: u64,
    /// The last request seen, unix seconds, for the idle timeout; written
    /// again at most every tenth of it (0: a session from before, `iat`).
    #[serde(default)]
    pub seen: u64,
}

/// A session cookie written again (the idle timeout starts over), for the
/// response of the request that carried it: `gate` leaves it in the
/// request's extensions, the request path adds it to the response.
#[derive(Clone)]
pub(crate) struct SessionCookie(pub HeaderValue);

/// What the sign-in gate decided.
pub(crate) enum Gate {
    /// On to the app, with the signed-in user when there is one.
    Pass(Option<Arc<Principal>>),
    /// The edge answers itself (a redirect, a cookie, a 401).
    Respond(Response<Body>),
}

/// Whether `app` signs its users in.
pub(crate) fn signs_in(app: &App) -> bool {
    app.required_features.iter().any(|f| f == SIGN_IN_FEATURE)
}

/// The auth host of `apps_domain`.
pub(crate) fn auth_host(apps_domain: &str) -> String {
    format!("auth.{apps_domain}")
}

/// Whether `host` (normalized) is the auth host of `apps_domain`, without
/// building its name: it is asked of every request.
pub(crate) fn is_auth_host(host: &str, apps_domain: &str) -> bool {
    host.strip_prefix("auth.") == Some(apps_domain)
}

/// Phase 2, sign-in: for an app that signs users in, the session cookie,
/// or the way to get one. The edge's own cookie is taken out of the
/// request that goes on.
pub(crate) async fn gate<B>(
    req: &mut Request<B>,
    app: &App,
    auth: &Auth,
    apps_domain: &str,
) -> Result<Gate, ProxyError> {
    if !signs_in(app) {
        return Ok(Gate::Pass(None));
    }
    let Some(sign_in) = auth.get() else {
        return Err(ProxyError::SignInUnavailable);
    };
    let host = app.external_host.as_str();
    let path = req.uri().path();
    if path == SESSION {
        return session_from_handoff(req, auth, &sign_in, app)
            .await
            .map(Gate::Respond);
    }
    if path == SIGN_OUT {
        sign_out(req.headers(), auth, &sign_in, host);
        return Ok(Gate::Respond(signed_out()));
    }
    let now = seal::unix_now();
    if let Some(cookie) = take_cookie(req.headers_mut(), SESSION_COOKIE) {
        if let Some(opened) = sign_in.session(host, &cookie, now, &auth.signed_out)? {
            if let Some(cookie) = sign_in.seen_again(&opened.session, app, now) {
                req.extensions_mut().insert(SessionCookie(cookie));
            }
            return Ok(Gate::Pass(Some(Arc::clone(&opened.principal))));
        }
    }
    // An API client's bearer token: valid, or 401, never a redirect. The
    // `Authorization` header goes on to the backend, the token's audience.
    if let Some(token) = bearer_token(req.headers()) {
        let audiences = audiences(app);
        return match sign_in
            .bearer
            .verify(
                &sign_in.provider,
                &sign_in.settings.issuer,
                &audiences,
                token,
            )
            .await
        {
            Ok(user) => Ok(Gate::Pass(Some(Arc::new(Principal::new(user)?)))),
            Err(bearer::BearerError::Keys(reason)) => Err(ProxyError::SignInFailed { reason }),
            Err(e) => {
                tracing::debug!(error = %e, app = %app.id, "bearer token refused");
                Ok(Gate::Respond(invalid_token(req, host, &e.to_string())))
            }
        };
    }
    if !is_navigation(req) {
        return Ok(Gate::Respond(unauthenticated(req, host)));
    }
    let to = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut start = url::Url::parse(&format!(
        "https://{}{}{START}",
        auth_host(apps_domain),
        port_of(&app.external_url)
    ))
    .map_err(|e| ProxyError::SignInFailed {
        reason: format!("the auth host's URL: {e}"),
    })?;
    start
        .query_pairs_mut()
        .append_pair("app", app.id.as_str())
        .append_pair("to", &target::safe(&to));
    Ok(Gate::Respond(redirect(start.as_str(), None)))
}

/// Serves the auth host: the start of a sign-in and the provider's
/// callback.
pub(crate) async fn serve_auth_host<B>(
    req: &Request<B>,
    auth: &Auth,
    table: &crate::routing::RoutingTable,
) -> Result<Response<Body>, ProxyError> {
    let Some(sign_in) = auth.get() else {
        return Err(ProxyError::SignInUnavailable);
    };
    let apps = |id: &str| table.app_by_id(id).cloned();
    let query = query_map(req.uri().query());
    match (req.method(), req.uri().path()) {
        (&Method::GET, START) => {
            // Without an app, the sign-in is for My Apps on this host.
            let app = match query.get("app") {
                None => None,
                Some(id) => Some(apps(id).filter(|a| signs_in(a)).ok_or_else(|| {
                    ProxyError::SignInFailed {
                        reason: "no app that signs users in has that id".into(),
                    }
                })?),
            };
            let to = target::safe(query.get("to").map_or("/", String::as_str));
            let redirect_uri = format!(
                "https://{}{}{CALLBACK}",
                host_of(req).unwrap_or_default(),
                match &app {
                    Some(app) => port_of(&app.external_url),
                    None => request_port(req),
                }
            );
            let client = sign_in.client_for(app.as_ref().map(|a| a.id.as_str()));
            let started = sign_in
                .provider
                .start(&client, &redirect_uri)
                .await
                .map_err(|e| ProxyError::SignInFailed {
                    reason: e.to_string(),
                })?;
            let flow = Flow {
                state: started.state,
                nonce: started.nonce,
                verifier: started.verifier,
                redirect: redirect_uri,
                app: app.map_or_else(String::new, |a| a.id.as_str().to_owned()),
                to,
                client: client.id().to_owned(),
            };
            let host = host_of(req).unwrap_or_default();
            let sealed = sign_in.keys.seal(Purpose::Flow, &host, &flow, FLOW_TTL);
            let cookie = cookie(FLOW_COOKIE, &sealed, Some(FLOW_TTL));
            Ok(redirect(&started.url, Some(cookie)))
        }
        (&Method::GET, CALLBACK) => {
            let host = host_of(req).unwrap_or_default();
            let (flow, flow_exp) = cookie_value(req.headers(), FLOW_COOKIE)
                .and_then(|v| sign_in.keys.open_until::<Flow>(Purpose::Flow, &host, &v))
                .ok_or_else(|| ProxyError::SignInFailed {
                    reason: "no sign-in in progress in this browser (the flow cookie is missing, expired or not ours)".into(),
                })?;
            if let Some(err) = query.get("error") {
                return Err(ProxyError::SignInFailed {
                    reason: format!("the provider answered {err:?}"),
                });
            }
            let state = query.get("state").ok_or_else(|| ProxyError::SignInFailed {
                reason: "the callback has no state".into(),
            })?;
            if !constant_time_eq(state.as_bytes(), flow.state.as_bytes()) {
                return Err(ProxyError::SignInFailed {
                    reason: "the callback's state is not this browser's sign-in".into(),
                });
            }
            let code = query.get("code").ok_or_else(|| ProxyError::SignInFailed {
                reason: "the callback has no code".into(),
            })?;
            // One callback per sign-in (at this edge): a copy of the flow
            // cookie and the callback URL gets no second exchange.
            if !sign_in.first_use(&flow.state, flow_exp) {
                return Err(ProxyError::SignInFailed {
                    reason: "this sign-in was finished already: sign in again".into(),
                });
            }
            let app = match flow.app.as_str() {
                "" => None,
                id => Some(apps(id).filter(|a| signs_in(a)).ok_or_else(|| {
                    ProxyError::SignInFailed {
                        reason: format!("app {} no longer signs users in", flow.app),
                    }
                })?),
            };
            let client = sign_in.client_for(app.as_ref().map(|a| a.id.as_str()));
            if !flow.client.is_empty() && flow.client != client.id() {
                return Err(ProxyError::SignInFailed {
                    reason: format!(
                        "the OpenID client of app {} changed during the sign-in: sign in again",
                        flow.app
                    ),
                });
            }
            let user = sign_in
                .provider
                .finish(&client, &flow.redirect, code, &flow.verifier, &flow.nonce)
                .await
                .map_err(|e| ProxyError::SignInFailed {
                    reason: e.to_string(),
                })?;
            let Some(app) = app else {
                // My Apps: the session is this host's own.
                tracing::info!(user = %user.sub, "signed in to My Apps");
                let cookie = new_session(&sign_in, &host, user);
                let mut resp = redirect("/", Some(cookie));
                resp.headers_mut()
                    .append(SET_COOKIE, expired_cookie(FLOW_COOKIE));
                return Ok(resp);
            };
            tracing::info!(user = %user.sub, app = %app.id, "signed in");
            let handoff = Handoff {
                jti: seal::random_token(16),
                exp: seal::unix_now() + HANDOFF_TTL.as_secs(),
                to: flow.to,
                user,
            };
            let code =
                sign_in
                    .keys
                    .seal(Purpose::Handoff, &app.external_host, &handoff, HANDOFF_TTL);
            let mut to = url::Url::parse(&format!(
                "https://{}{}{SESSION}",
                app.external_host,
                port_of(&app.external_url)
            ))
            .map_err(|e| ProxyError::SignInFailed {
                reason: format!("the app's URL: {e}"),
            })?;
            to.query_pairs_mut().append_pair("code", &code);
            // The flow is over: its cookie goes.
            Ok(redirect(to.as_str(), Some(expired_cookie(FLOW_COOKIE))))
        }
        (&Method::GET | &Method::HEAD, "/") => {
            let host = host_of(req).unwrap_or_default();
            let now = seal::unix_now();
            let session = cookie_value(req.headers(), SESSION_COOKIE)
                .and_then(|v| sign_in.keys.open::<Session>(Purpose::Session, &host, &v))
                .filter(|s| {
                    sign_in.alive(s, now) && !auth.signed_out.refuses(&s.sid, &s.user, s.iat, now)
                });
            match session {
                Some(s) => Ok(portal::page(req, &s.user, &table.config.apps)),
                None if is_navigation(req) => Ok(redirect(START, None)),
                None => Ok(unauthenticated(req, &host)),
            }
        }
        (&Method::GET, SIGN_OUT) => {
            sign_out(
                req.headers(),
                auth,
                &sign_in,
                &host_of(req).unwrap_or_default(),
            );
            Ok(signed_out())
        }
        (&Method::GET, JWKS) => {
            let asserter = sign_in
                .asserter
                .as_ref()
                .ok_or_else(|| ProxyError::AppNotFound {
                    host: format!("{}{JWKS}", host_of(req).unwrap_or_default()),
                })?;
            let mut resp = Response::new(
                Full::new(Bytes::copy_from_slice(asserter.jwks()))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            Ok(resp)
        }
        _ => Err(ProxyError::AppNotFound {
            host: format!("{}{}", host_of(req).unwrap_or_default(), req.uri().path()),
        }),
    }
}

/// `/.portico/sign_out`: the session of the cookie `headers` carry for
/// `host`, if any, ends at every edge ([`revoke`]). Any session sealed
/// for `host` counts, live or not: one over its idle timeout now would
/// not come back.
fn sign_out(headers: &HeaderMap, auth: &Auth, sign_in: &SignIn, host: &str) {
    let Some((session, exp)) = cookie_value(headers, SESSION_COOKIE).and_then(|v| {
        sign_in
            .keys
            .open_until::<Session>(Purpose::Session, host, &v)
    }) else {
        return;
    };
    // The cookie cannot open after its seal's end; the lifetime from its
    // sign-in covers a cookie of the same session sealed later.
    let until = exp.max(
        session
            .iat
            .saturating_add(sign_in.settings.session_lifetime_secs),
    );
    tracing::info!(user = %session.user.sub, host, "signed out");
    auth.sign_out(&session.sid, until);
}

/// `/.portico/session?code=`: the handoff, once at any edge, into a
/// session cookie.
async fn session_from_handoff<B>(
    req: &Request<B>,
    auth: &Auth,
    sign_in: &SignIn,
    app: &App,
) -> Result<Response<Body>, ProxyError> {
    let query = query_map(req.uri().query());
    let handoff = query
        .get("code")
        .and_then(|c| {
            sign_in
                .keys
                .open::<Handoff>(Purpose::Handoff, &app.external_host, c)
        })
        .ok_or_else(|| ProxyError::SignInFailed {
            reason: "the handoff code is missing, expired or not for this app".into(),
        })?;
    if !sign_in.first_use(&handoff.jti, handoff.exp) {
        return Err(ProxyError::SignInFailed {
            reason: "the handoff code was used already".into(),
        });
    }
    match auth.handoff_first_use(&handoff.jti, handoff.exp).await {
        HandoffAnswer::First => {}
        HandoffAnswer::Used => {
            return Err(ProxyError::SignInFailed {
                reason: "the handoff code was used already, at another edge".into(),
            })
        }
        HandoffAnswer::Unknown(why) => {
            tracing::warn!(app = %app.id, why, "the router could not say whether this handoff code was used at another edge; this edge's own record let it in");
        }
    }
    let now = seal::unix_now();
    let session = Session {
        sid: seal::random_token(16),
        user: handoff.user,
        iat: now,
        seen: now,
    };
    Ok(redirect(
        &target::safe(&handoff.to),
        Some(sign_in.session_cookie(app, &session, now)),
    ))
}

/// A new session of `user` on the auth host (a new id), as its cookie:
/// My Apps' own, `HttpOnly` and not persistent.
fn new_session(sign_in: &SignIn, host: &str, user: User) -> HeaderValue {
    let lifetime = Duration::from_secs(sign_in.settings.session_lifetime_secs);
    let now = seal::unix_now();
    let session = Session {
        sid: seal::random_token(16),
        user,
        iat: now,
        seen: now,
    };
    let sealed = sign_in
        .keys
        .seal(Purpose::Session, host, &session, lifetime);
    cookie(SESSION_COOKIE, &sealed, None)
}

/// The request's port as `:port`, or nothing (443 or none given).
fn request_port<B>(req: &Request<B>) -> String {
    let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    authority
        .and_then(|a| a.parse::<http::uri::Authority>().ok())
        .and_then(|a| a.port_u16())
        .filter(|p| *p != 443)
        .map_or(String::new(), |p| format!(":{p}"))
}

/// A browser navigation (sent to sign in) rather than an API call (401):
/// a GET or HEAD that accepts HTML.
fn is_navigation<B>(req: &Request<B>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD)
        && req
            .headers()
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"))
}

/// The token of an `Authorization: Bearer` header (the scheme in any
/// case), if the request has one.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The audiences a bearer token for `app` may name: the app's external
/// URL, with and without its trailing slash.
fn audiences(app: &App) -> Vec<String> {
    let url = app.external_url.as_str();
    let bare = url.trim_end_matches('/');
    vec![bare.to_owned(), format!("{bare}/")]
}

/// 401 `SignInRequired` without credentials: `WWW-Authenticate: Bearer`
/// with the realm only (RFC 6750, section 3).
fn unauthenticated<B>(req: &Request<B>, host: &str) -> Response<Body> {
    sign_in_required(req, &format!("Bearer realm=\"{}\"", quotable(host)))
}

/// 401 `SignInRequired` for a refused bearer token: `error="invalid_token"`
/// and why (RFC 6750, section 3.1).
fn invalid_token<B>(req: &Request<B>, host: &str, why: &str) -> Response<Body> {
    sign_in_required(
        req,
        &format!(
            "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
            quotable(host),
            quotable(why)
        ),
    )
}

/// 401 `SignInRequired`: the branded page (JSON for a client that
/// prefers it) with the request's id, and `WWW-Authenticate`.
fn sign_in_required<B>(req: &Request<B>, www_authenticate: &str) -> Response<Body> {
    let id = req
        .extensions()
        .get::<portico_proto::RequestId>()
        .copied()
        .unwrap_or(portico_proto::RequestId(0));
    let mut resp = crate::pages::error_response::<Full<Bytes>>(
        portico_proto::ErrorCode::SignInRequired,
        id,
        req.headers(),
    )
    .map(|b| b.map_err(|never| match never {}).boxed_unsync());
    if let Ok(v) = HeaderValue::from_str(www_authenticate) {
        resp.headers_mut().insert(WWW_AUTHENTICATE, v);
    }
    resp
}

/// `s` with only what RFC 6750 allows in a quoted `error_description`
/// (printable ASCII without `"` and `\`); anything else becomes `?`.
fn quotable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' => c,
            _ => '?',
        })
        .collect()
}

fn signed_out() -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(
            b"<!doctype html><title>Signed out</title><p>You are signed out.</p>\n",
        ))
        .map_err(|never| match never {})
        .boxed_unsync(),
    );
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(SET_COOKIE, expired_cookie(SESSION_COOKIE));
    resp
}

fn redirect(to: &str, cookie: Option<HeaderValue>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::FOUND;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(to) {
        h.insert(LOCATION, v);
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = cookie {
        h.insert(SET_COOKIE, c);
    }
    resp
}

/// A host-only, `Secure`, `HttpOnly`, `SameSite=Lax` cookie for the whole
/// host (`__Host-` requires all but the last two); a session cookie
/// without `max_age`.
fn cookie(name: &str, value: &str, max_age: Option<Duration>) -> HeaderValue {
    cookie_with(name, value, max_age, true)
}

/// [`cookie`], `HttpOnly` only when `http_only`.
fn cookie_with(name: &str, value: &str, max_age: Option<Duration>, http_only: bool) -> HeaderValue {
    let age = max_age.map_or(String::new(), |a| format!("; Max-Age={}", a.as_secs()));
    let http_only = if http_only { "; HttpOnly" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure{http_only}; SameSite=Lax{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn expired_cookie(name: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// The value of cookie `name`, and the `Cookie` headers without it (the
/// backend never sees the edge's cookie).
fn take_cookie(headers: &mut HeaderMap, name: &str) -> Option<String> {
    let found = cookie_value(headers, name)?;
    let kept: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .map(str::trim)
                .filter(|c| c.split_once('=').is_none_or(|(n, _)| n != name))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|v| !v.is_empty())
        .collect();
    headers.remove(COOKIE);
    for v in kept {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.append(COOKIE, v);
        }
    }
    Some(found)
}

/// The query's pairs (the first of each name), at most 32.
fn query_map(query: Option<&str>) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()).take(32) {
        map.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    map
}

/// `:PORT` of a URL that has one, else nothing.
fn port_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.port())
        .map_or(String::new(), |p| format!(":{p}"))
}

/// The request's host without port, lower-case.
fn host_of<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })?;
    crate::routing::normalize_host(&raw).map(|h| h.into_owned())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(deployment_secret: &str, clients: &[(&str, &str, &str)]) -> SignInSettings {
        SignInSettings {
            issuer: "https://idp.example.test".into(),
            client_id: "portico".into(),
            client_secret: deployment_secret.into(),
            keys: vec![portico_proto::api::SessionKey {
                id: 1,
                secret: "A".repeat(43),
            }],
            session_lifetime_secs: 3600,
            groups_claim: "groups".into(),
            assertion_keys: vec![],
            session_idle_secs: 0,
            clients: clients
                .iter()
                .map(|(app, id, secret)| AppClient {
                    app: app.parse().unwrap(),
                    client_id: (*id).into(),
                    client_secret: portico_proto::api::ClientSecret::new(*secret),
                })
                .collect(),
        }
    }

    #[test]
    fn an_app_signs_in_through_its_own_client_and_a_change_of_clients_keeps_the_provider() {
        let auth = Auth::default();
        auth.update(
            Some(&settings("s", &[("hr", "hr-client", "hr-secret")])),
            "apps.test",
        );
        let first = auth.get().expect("configured");
        let id = |s: &SignIn, app: Option<&str>| s.client_for(app).id().to_owned();
        assert_eq!(id(&first, Some("hr")), "hr-client");
        assert_eq!(id(&first, Some("api")), "portico", "no client of its own");
        assert_eq!(id(&first, None), "portico", "My Apps: the deployment's");
        assert_eq!(
            *first.client_for(Some("hr")),
            oidc::Client::new("hr-client", "hr-secret")
        );
        // Other clients: the same provider (its discovery, used codes and
        // sessions), the new clients.
        auth.update(
            Some(&settings(
                "s",
                &[("hr", "hr-client", "rotated"), ("wiki", "wiki-client", "w")],
            )),
            "apps.test",
        );
        let second = auth.get().expect("configured");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(
            *second.client_for(Some("hr")),
            oidc::Client::new("hr-client", "rotated")
        );
        assert_eq!(id(&second, Some("wiki")), "wiki-client");
        auth.update(Some(&settings("s", &[])), "apps.test");
        let third = auth.get().expect("configured");
        assert!(Arc::ptr_eq(&first, &third));
        assert_eq!(id(&third, Some("hr")), "portico");
        // The deployment's client changed: a new sign-in.
        auth.update(Some(&settings("other", &[])), "apps.test");
        assert!(!Arc::ptr_eq(&first, &auth.get().expect("configured")));
        auth.update(None, "apps.test");
        assert!(auth.get().is_none());
    }

    #[test]
    fn the_edges_cookie_is_taken_out_and_the_others_kept() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; __Host-portico-session=S; b=2"),
        );
        h.append(COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(take_cookie(&mut h, SESSION_COOKIE).as_deref(), Some("S"));
        let left: Vec<&str> = h
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(left, ["a=1; b=2", "c=3"]);
        // Only the edge's cookie: no Cookie header left.
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("__Host-portico-session=S"));
        take_cookie(&mut h, SESSION_COOKIE);
        assert!(h.get(COOKIE).is_none());
        // None of it: untouched.
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("x=1"));
        assert!(take_cookie(&mut h, SESSION_COOKIE).is_none());
        assert_eq!(h[COOKIE], "x=1");
    }

    #[test]
    fn the_bearer_token_is_read_in_any_case_of_the_scheme_and_the_challenge_is_quotable() {
        let h = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_static(v));
            h
        };
        assert_eq!(bearer_token(&h("Bearer abc.def.ghi")), Some("abc.def.ghi"));
        assert_eq!(bearer_token(&h("bearer  xyz ")), Some("xyz"));
        assert_eq!(bearer_token(&h("Basic dXNlcjpwdw==")), None);
        assert_eq!(bearer_token(&h("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
        assert_eq!(quotable("a \"b\" \\ é\n"), "a ?b? ? ??");
    }

    #[test]
    fn only_navigations_are_sent_to_sign_in() {
        let req = |m: Method, accept: Option<&str>| {
            let mut b = Request::builder().method(m).uri("/");
            if let Some(a) = accept {
                b = b.header("accept", a);
            }
            b.body(()).unwrap()
        };
        assert!(is_navigation(&req(
            Method::GET,
            Some("text/html,application/xhtml+xml")
        )));
        assert!(!is_navigation(&req(Method::GET, Some("application/json"))));
        assert!(!is_navigation(&req(Method::GET, None)));
        assert!(!is_navigation(&req(Method::POST, Some("text/html"))));
    }
}
