//! The request path every protocol shares (HTTP/1.1 and HTTP/2 from
//! `listener`, HTTP/3 from `http3`), in phases, each with one job:
//!
//! 1. **route** ([`route`]): the host → the app, or `AppNotFound`.
//! 2. **admit** ([`admit`], then `auth::gate`): may this request reach
//!    the app? Required features, then sign-in for apps with `preauth =
//!    oidc` (the auth host `auth.<apps domain>` is served by `auth`
//!    itself); maintenance comes here too.
//! 3. **select upstream** ([`upstream::select`]): a tunnel of the app's
//!    group, by power of two choices, skipping upstreams already tried.
//!    A mesh peer will be another kind of upstream.
//! 4. **open** ([`upstream::open`]): a stream, the `StreamHead`, the body.
//! 5. **relay** ([`relay`]): the response head, then the body, streamed,
//!    with the stall watch.
//!
//! A failed attempt says whether another is safe ([`error::Retry`]);
//! `proxy` retries on another upstream accordingly. One [`Record`] per
//! request travels with it and writes the access-log line and metrics once.

mod error;
mod record;
pub(crate) mod relay;
mod upstream;

use std::sync::Arc;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use portico_proto::api::App;
use portico_proto::RequestId;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(crate) use error::{Fault, ProxyError, Retry};
pub(crate) use record::{AccessLog, Record};

use crate::client_conn::ClientConn;
use crate::pages::{self, REQUEST_ID_HEADER};
use crate::routing::{normalize_host, RoutingTable};
use crate::Shared;

/// The error type of response bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the edge sends.
pub(crate) type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A request body the edge can stream into a tunnel: hyper's `Incoming`
/// (HTTP/1.1, HTTP/2) or an HTTP/3 request stream.
pub(crate) trait RequestBody:
    http_body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
    + Send
    + Unpin
    + 'static
{
}

impl<T> RequestBody for T where
    T: http_body::Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static>
        + Send
        + Unpin
        + 'static
{
}

/// Serves one request of any protocol: never fails, always carries a
/// request id, and is recorded once (see [`Record`]). `abort`, for an
/// HTTP/3 request, is cancelled if its response stalls.
pub(crate) async fn handle<B: RequestBody>(
    req: Request<B>,
    shared: Arc<Shared>,
    conn: Arc<ClientConn>,
    abort: Option<CancellationToken>,
) -> Response<Body> {
    let request_id = RequestId(fastrand::u128(..));
    let mut req = req;
    // For the pages the edge answers itself (the sign-in gate's 401).
    req.extensions_mut().insert(request_id);
    let span = tracing::info_span!("request", request.id = %request_id, app = tracing::field::Empty, method = %req.method(), version = ?req.version());
    async move {
        let mut record = Record::new(
            &req,
            request_id,
            &conn,
            Arc::clone(&shared.metrics),
            shared.access_log,
        );
        // Kept for the error page: the request itself moves on.
        let accept = accept_headers(req.headers());
        let mut resp = match proxy(req, &shared, &conn, &mut record).await {
            // A streamed body carries the record, and records the request
            // when it ends or is dropped.
            Ok(Outcome::Relayed(relayed)) => relayed.into_response(record, &shared, &conn, abort),
            Ok(Outcome::Local(resp)) => {
                record.responded(resp.status(), None, None);
                record.complete();
                drop(record);
                resp
            }
            Err(e) => {
                let code = e.code();
                match e.fault() {
                    Fault::Client => {
                        tracing::debug!(error = %portico_agent::error_chain(&e), "request refused")
                    }
                    _ => tracing::info!(error = %portico_agent::error_chain(&e), "request failed"),
                }
                let resp = pages::error_response::<Full<Bytes>>(code, request_id, &accept)
                    .map(|b| b.map_err(|never| match never {}).boxed_unsync());
                record.responded(resp.status(), Some(code), Some(e.fault()));
                record.complete();
                drop(record);
                resp
            }
        };
        resp.headers_mut()
            .insert(REQUEST_ID_HEADER, request_id.header_value());
        resp
    }
    .instrument(span)
    .await
}

/// The phases, from the request to a response head.
async fn proxy<B: RequestBody>(
    req: Request<B>,
    shared: &Shared,
    conn: &ClientConn,
    record: &mut Record,
) -> Result<Outcome, ProxyError> {
    let mut req = req;
    let table = shared.table.load_full();
    let apps_domain = table.config.apps_domain.as_str();
    // Read once: the auth host's check and the routing both need it.
    let host = request_host(&req);
    if host
        .as_ref()
        .is_ok_and(|h| crate::auth::is_auth_host(h, apps_domain))
    {
        return crate::auth::serve_auth_host(&req, &shared.auth, &table)
            .await
            .map(Outcome::Local);
    }
    let app = route(&req, host, &table)?;
    tracing::Span::current().record("app", app.id.as_str());
    record.app = Some(Arc::clone(&app));
    admit(&req, &app)?;
    let user = match crate::auth::gate(&mut req, &app, &shared.auth, apps_domain).await? {
        crate::auth::Gate::Pass(user) => user,
        crate::auth::Gate::Respond(resp) => return Ok(Outcome::Local(resp)),
    };
    // Phase 2 ends with the assignment: a signed-in user the app does not
    // assign gets 403, and no stream is opened.
    let identity = match &user {
        Some(p) if !crate::auth::assigned(&app, &p.user) => {
            return Err(ProxyError::NotAssigned {
                user: p.user.sub.clone(),
                app: app.id.clone(),
            })
        }
        Some(p) => Some(shared.auth.identity(&app, p)?),
        None => None,
    };
    // A session cookie the gate wrote again goes on the app's response.
    let renewed = req.extensions_mut().remove::<crate::auth::SessionCookie>();
    upstream::forward(req, &app, shared, conn.addr, record, identity.as_ref())
        .await
        .map(|mut relayed| {
            if let Some(crate::auth::SessionCookie(cookie)) = renewed {
                relayed.headers.append(http::header::SET_COOKIE, cookie);
            }
            Outcome::Relayed(relayed)
        })
}

/// What the phases end in: a response relayed from the app, or one the
/// edge gives itself (sign-in redirects, cookies, 401).
enum Outcome {
    Relayed(upstream::Relayed),
    Local(Response<Body>),
}

/// Phase 1: the app published at the request's host (`host`, as
/// [`request_host`] read it).
pub(crate) fn route<B>(
    req: &Request<B>,
    host: Result<std::borrow::Cow<'_, str>, ProxyError>,
    table: &RoutingTable,
) -> Result<Arc<App>, ProxyError> {
    if req.method() == Method::CONNECT && req.version() == Version::HTTP_3 {
        // Extended CONNECT (WebSocket over HTTP/3) is not carried.
        return Err(ProxyError::ExtendedConnect);
    }
    let host = host?;
    match table.app_for_host(&host) {
        Some(app) => Ok(Arc::clone(app)),
        None => Err(ProxyError::AppNotFound {
            host: host.into_owned(),
        }),
    }
}

/// Phase 2: whether this request may reach the app. An app in
/// maintenance mode answers 503 `Maintenance` to everyone, before sign-in
/// (nobody is sent to sign in to an app that is down) and before any
/// connector stream. An app that requires a feature this edge does not
/// know is refused rather than served without it. Sign-in (`auth::gate`)
/// comes next.
pub(crate) fn admit<B>(_req: &Request<B>, app: &App) -> Result<(), ProxyError> {
    if app.maintenance {
        return Err(ProxyError::Maintenance);
    }
    if let Some(feature) = portico_proto::features::first_unknown(&app.required_features) {
        return Err(ProxyError::FeatureUnsupported {
            feature: feature.to_owned(),
        });
    }
    Ok(())
}

/// The host a request is for: the URI authority (HTTP/2 and HTTP/3
/// `:authority`, an absolute-form HTTP/1.1 target), else the one `Host`
/// header. Two `Host` headers, or a `Host` that disagrees with an HTTP/2
/// or HTTP/3 authority, are refused: proxies and backends that pick
/// different ones are how requests get smuggled past routing.
fn request_host<B>(req: &Request<B>) -> Result<std::borrow::Cow<'_, str>, ProxyError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::ConflictingHost);
    }
    if let Some(authority) = req.uri().authority() {
        if let (Some(h), true) = (host, req.version() >= Version::HTTP_2) {
            let same = h
                .to_str()
                .ok()
                .and_then(normalize_host)
                .zip(normalize_host(authority.as_str()))
                .is_some_and(|(a, b)| a == b);
            if !same {
                return Err(ProxyError::ConflictingHost);
            }
        }
        return normalize_host(authority.as_str()).ok_or(ProxyError::BadHost);
    }
    let host = host.ok_or(ProxyError::NoHost)?;
    host.to_str()
        .ok()
        .and_then(normalize_host)
        .ok_or(ProxyError::BadHost)
}

/// The `Accept` headers (at most 8), kept for an error page.
fn accept_headers(headers: &HeaderMap) -> HeaderMap {
    let mut accept = HeaderMap::new();
    for v in headers.get_all(http::header::ACCEPT).iter().take(8) {
        accept.append(http::header::ACCEPT, v.clone());
    }
    accept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    /// An app that requires a feature this edge lacks is refused, not
    /// served without it; known features pass.
    #[test]
    fn admit_refuses_apps_that_require_unknown_features() {
        let mut app = crate::routing::tests::app("hr", "hr.apps.test");
        let r = req(Version::HTTP_11, "/", &["hr.apps.test"]);
        admit(&r, &app).unwrap();
        app.required_features = vec!["websocket".into()];
        admit(&r, &app).unwrap();
        app.required_features = vec!["websocket".into(), "oidc".into()];
        admit(&r, &app).unwrap();
        app.required_features = vec!["websocket".into(), "mtls".into()];
        let e = admit(&r, &app).unwrap_err();
        assert!(matches!(&e, ProxyError::FeatureUnsupported { feature } if feature == "mtls"));
        assert_eq!(e.code(), portico_proto::ErrorCode::FeatureUnsupported);
        assert_eq!(e.code().http_status(), 503);
    }

    /// An app in maintenance is refused before anything else is looked
    /// at (an unknown feature included), with 503 `Maintenance`.
    #[test]
    fn admit_refuses_apps_in_maintenance() {
        let mut app = crate::routing::tests::app("hr", "hr.apps.test");
        let r = req(Version::HTTP_11, "/", &["hr.apps.test"]);
        app.maintenance = true;
        app.required_features = vec!["mtls".into()];
        let e = admit(&r, &app).unwrap_err();
        assert!(matches!(e, ProxyError::Maintenance), "{e:?}");
        assert_eq!(e.code(), portico_proto::ErrorCode::Maintenance);
        assert_eq!(e.code().http_status(), 503);
        app.required_features.clear();
        assert!(admit(&r, &app).is_err());
        app.maintenance = false;
        admit(&r, &app).unwrap();
    }

    #[test]
    fn the_host_comes_from_the_authority_or_the_one_host_header() {
        let host = |r: Request<()>| request_host(&r).map(|h| h.into_owned());
        assert_eq!(
            host(req(Version::HTTP_11, "/x", &["HR.apps.test:443"])).unwrap(),
            "hr.apps.test"
        );
        assert_eq!(
            host(req(Version::HTTP_2, "https://Wiki.Apps.Test:8443/x", &[])).unwrap(),
            "wiki.apps.test"
        );
        // HTTP/1.1 absolute form: the target's authority wins (RFC 9112 §3.2.2).
        assert_eq!(
            host(req(Version::HTTP_11, "https://a.test/x", &["b.test"])).unwrap(),
            "a.test"
        );
        // HTTP/2 with a Host that agrees (port and case aside).
        assert_eq!(
            host(req(Version::HTTP_2, "https://a.test/x", &["A.test:443"])).unwrap(),
            "a.test"
        );
        assert!(matches!(
            host(req(Version::HTTP_2, "https://a.test/x", &["b.test"])),
            Err(ProxyError::ConflictingHost)
        ));
        assert!(matches!(
            host(req(Version::HTTP_11, "/x", &["a.test", "b.test"])),
            Err(ProxyError::ConflictingHost)
        ));
        assert!(matches!(
            host(req(Version::HTTP_11, "/x", &["a.test", "a.test"])),
            Err(ProxyError::ConflictingHost)
        ));
        assert!(matches!(
            host(req(Version::HTTP_11, "/x", &[])),
            Err(ProxyError::NoHost)
        ));
        assert!(matches!(
            host(req(Version::HTTP_11, "/x", &["user@a.test"])),
            Err(ProxyError::BadHost)
        ));
    }
}
