//! Sign-in at the edge against a real OpenID provider (npm
//! `oidc-provider`, `tests/idp`, installed by scripts/test.sh) and real
//! curl: a router with the provider, an edge, a connector and the demo
//! backend in this process, an app with `preauth = oidc`.
//!
//! - A browser navigation without a session is sent to the auth host, then
//!   the provider; after the provider's login form, the callback, the
//!   one-time handoff and the session cookie, the app answers, and the
//!   backend never sees the edge's cookie.
//! - An API client gets 401 `SignInRequired` with `WWW-Authenticate`.
//! - No session from a replayed handoff code, a mismatched or missing
//!   `state`, or a callback without the flow cookie; an open-redirect
//!   target lands on `/`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{curl, Child};
use portico_proto::api::{AppSpec, Assignment, Preauth, TokenScope};

const LIMIT: Duration = Duration::from_secs(60);
const DOMAIN: &str = "apps.localhost";

/// The test IdP (`tests/idp/provider.mjs`) on a free loopback port,
/// accepting `redirect_uri` for client `portico`.
struct Idp {
    issuer: String,
    _child: Child,
}

impl Idp {
    async fn start(redirect_uri: &str) -> Idp {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp");
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "the test IdP is not installed: run `npm ci --prefix tests/idp` (scripts/test.sh does)"
        );
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg("provider.mjs")
            .current_dir(&dir)
            .env("OP_PORT", "0")
            .env("OP_REDIRECT_URIS", redirect_uri);
        let mut child = Child::spawn_cmd(cmd);
        let line = child.line_starting("listening issuer=", LIMIT).await;
        let issuer = line
            .trim_start_matches("listening issuer=")
            .trim()
            .to_owned();
        Idp {
            issuer,
            _child: child,
        }
    }
}

/// A TCP port free on 127.0.0.1 now: the edge's public port, which the
/// provider's redirect URI must name before the edge starts.
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request of a browser with a cookie jar (no redirects followed):
/// status, `Location`, headers and body.
struct Hop {
    status: u16,
    location: String,
    set_cookie: Vec<String>,
    body: String,
}

async fn hop(ca: &Path, jar: &Path, url: &str, extra: &[&str]) -> Hop {
    let jar = jar.to_str().unwrap();
    let mut args = vec!["-b", jar, "-c", jar, "-H", "Accept: text/html"];
    args.extend_from_slice(extra);
    args.push(url);
    let r = curl(ca, &args).await;
    let set_cookie = r
        .headers
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.trim().to_owned())
        .collect();
    Hop {
        status: r.status,
        location: r.header("location").unwrap_or_default(),
        set_cookie,
        body: r.text(),
    }
}

/// Runs the provider's part: its authorization URL, the login form as
/// `user`, until it redirects to the callback; returns the callback URL.
async fn sign_in_at_provider(
    ca: &Path,
    jar: &Path,
    idp: &Idp,
    auth_url: &str,
    user: &str,
) -> String {
    let mut url = auth_url.to_owned();
    for _ in 0..10 {
        if url.starts_with(&format!("https://auth.{DOMAIN}")) {
            return url;
        }
        let r = hop(ca, jar, &url, &[]).await;
        assert!(
            matches!(r.status, 302 | 303),
            "{url}: {} {}",
            r.status,
            r.body
        );
        let next = absolute(&idp.issuer, &r.location);
        if next.contains("/interaction/") {
            // The login form: any password; the login is the subject.
            let login = format!("login={user}");
            let r = hop(
                ca,
                jar,
                &next,
                &["-d", "prompt=login", "-d", &login, "-d", "password=x"],
            )
            .await;
            assert!(
                matches!(r.status, 302 | 303),
                "login: {} {}",
                r.status,
                r.body
            );
            url = absolute(&idp.issuer, &r.location);
        } else {
            url = next;
        }
    }
    panic!("the provider never redirected to the callback");
}

fn absolute(base: &str, location: &str) -> String {
    url::Url::parse(base)
        .unwrap()
        .join(location)
        .unwrap()
        .to_string()
}

struct Setup {
    _root: tokio_util::sync::CancellationToken,
    ca: PathBuf,
    port: u16,
    idp: Idp,
    admin: portico_agent::RouterClient,
    _dir: tempfile::TempDir,
    _connector: portico_connector::Handle,
}

async fn setup() -> Setup {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_owned();
    let root = tokio_util::sync::CancellationToken::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let port = free_tcp_port();
    let idp = Idp::start(&format!("https://auth.{DOMAIN}:{port}/.portico/callback")).await;

    let mut rc = portico_router::Config::new(d.join("router"));
    rc.listen = loopback;
    rc.apps_domain = DOMAIN.into();
    rc.public_port = Some(port);
    rc.sign_in = Some(portico_router::SignInConfig {
        issuer: idp.issuer.clone(),
        client_id: "portico".into(),
        client_secret: "portico-secret".into(),
        session_lifetime: Duration::from_secs(3600),
        groups_claim: "groups".into(),
    });
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    let ca = d.join("router/ca.pem");
    let admin = common::router_admin(&router);

    let _edge = common::start_edge(&router, &admin, &d.join("edge"), root.child_token(), |ec| {
        ec.public_listen = SocketAddr::from(([127, 0, 0, 1], port));
        ec.http3 = false;
    })
    .await;

    let demo = portico::demo::start(loopback, root.child_token())
        .await
        .unwrap();
    let group = portico_proto::GroupId::default_group();
    let spec = AppSpec {
        id: "hr".parse().unwrap(),
        external_host: None,
        internal_url: format!("http://{}/", demo.addr),
        connector_group: group.clone(),
        backend_timeout: Default::default(),
        validate_backend_tls: true,
        translate_headers: true,
        translate_body: false,
        required_features: vec![],
        preauth: Preauth::Oidc,
        assignment: Assignment {
            everyone: true,
            ..Default::default()
        },
        identity_headers: Default::default(),
        hidden: false,
        maintenance: false,
        home_page: None,
        backend_ca_pem: None,
    };
    let app: portico_proto::api::App = admin.post_json("/v1/apps", &spec).await.unwrap();
    assert_eq!(app.preauth, Preauth::Oidc);
    assert!(app.required_features.iter().any(|f| f == "oidc"));
    // payroll: for the admins group and carol only, with identity headers.
    let payroll = AppSpec {
        id: "payroll".parse().unwrap(),
        assignment: Assignment {
            everyone: false,
            users: vec!["carol@example.test".into()],
            groups: vec!["admins".into()],
        },
        identity_headers: [
            ("X-Remote-User", "email"),
            ("X-Remote-Groups", "groups"),
            ("X-Remote-Sub", "sub"),
        ]
        .into_iter()
        .map(|(h, c)| (h.to_owned(), c.to_owned()))
        .collect(),
        ..spec.clone()
    };
    let _: portico_proto::api::App = admin.post_json("/v1/apps", &payroll).await.unwrap();
    // wiki: for everyone, but left out of My Apps.
    let wiki = AppSpec {
        id: "wiki".parse().unwrap(),
        hidden: true,
        ..spec.clone()
    };
    let _: portico_proto::api::App = admin.post_json("/v1/apps", &wiki).await.unwrap();
    let mut cc = portico_connector::Config::new(router.url(), d.join("connector"));
    cc.token = Some(
        portico::dev::create_token(&admin, TokenScope::Connector { group })
            .await
            .unwrap(),
    );
    cc.tunnels = 1;
    let connector = portico_connector::start(cc, root.child_token())
        .await
        .unwrap();
    connector.wait_tunnels(1).await;
    // The edge has the app (and the sign-in settings) once it redirects.
    let probe = tempfile::NamedTempFile::new().unwrap();
    common::eventually("the edge to know the app", LIMIT, || async {
        let r = hop(
            &ca,
            probe.path(),
            &format!("https://hr.{DOMAIN}:{port}/"),
            &[],
        )
        .await;
        (r.status == 302).then_some(())
    })
    .await;
    Setup {
        _root: root,
        ca,
        port,
        idp,
        admin,
        _dir: tmp,
        _connector: connector,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_through_the_provider_and_reaches_the_app_api_clients_get_401() {
    let s = setup().await;
    let (ca, port) = (&s.ca, s.port);
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar = jar_file.path();
    let app = format!("https://hr.{DOMAIN}:{port}");

    // 1. No session: to the auth host, with the path to come back to.
    let r = hop(ca, jar, &format!("{app}/headers?x=1"), &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let start = url::Url::parse(&r.location).unwrap();
    assert_eq!(start.host_str(), Some("auth.apps.localhost"));
    assert_eq!(start.path(), "/.portico/start");
    // 2. The auth host: the flow cookie, then the provider, with PKCE
    // S256, state and nonce.
    let r = hop(ca, jar, start.as_str(), &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    assert!(r.location.starts_with(&s.idp.issuer), "{}", r.location);
    let auth = url::Url::parse(&r.location).unwrap();
    let q: std::collections::HashMap<String, String> = auth.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["state"].len() >= 43 && q["nonce"].len() >= 43, "{q:?}");
    assert_eq!(
        q["redirect_uri"],
        format!("https://auth.{DOMAIN}:{port}/.portico/callback")
    );
    let flow = r
        .set_cookie
        .iter()
        .find(|c| c.starts_with("__Host-portico-flow="))
        .unwrap();
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(flow.contains(attr), "{flow}");
    }
    // 3. The provider's login, back to the callback.
    let callback = sign_in_at_provider(ca, jar, &s.idp, auth.as_str(), "alice").await;

    // A callback whose state is not this browser's gives no session.
    let mut forged = url::Url::parse(&callback).unwrap();
    let pairs: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                "forged".to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    let other_jar = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(jar, other_jar.path()).unwrap();
    let r = hop(ca, other_jar.path(), forged.as_str(), &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("SignInFailed"), "{}", r.body);
    assert!(r.set_cookie.iter().all(|c| !c.contains("portico-session")));
    // Without the flow cookie (another browser): no session either.
    let empty = tempfile::NamedTempFile::new().unwrap();
    let r = hop(ca, empty.path(), &callback, &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);

    // 4. The real callback: the code exchanged, the handoff to the app.
    let r = hop(ca, jar, &callback, &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let handoff = r.location.clone();
    assert!(
        handoff.starts_with(&format!("{app}/.portico/session?code=")),
        "{handoff}"
    );
    // 5. The session cookie, and back to where the user was going.
    let r = hop(ca, jar, &handoff, &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    assert_eq!(r.location, "/headers?x=1");
    let session = r
        .set_cookie
        .iter()
        .find(|c| c.starts_with("__Host-portico-session="))
        .unwrap()
        .clone();
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(session.contains(attr), "{session}");
    }
    assert!(!session.contains("Max-Age"), "not persistent: {session}");
    // The code works once.
    let replay_jar = tempfile::NamedTempFile::new().unwrap();
    let r = hop(ca, replay_jar.path(), &handoff, &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.set_cookie.iter().all(|c| !c.contains("portico-session")));

    // 6. Signed in: the app answers, and its backend never sees the edge's
    // cookie (other cookies pass).
    let r = hop(ca, jar, &format!("{app}/headers?x=1"), &["-b", "mine=1"]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("portico-session"), "{}", r.body);
    assert!(r.body.contains("mine=1"), "{}", r.body);

    // An API client without a session: 401, never a redirect.
    let api = curl(
        ca,
        &["-H", "Accept: application/json", &format!("{app}/headers")],
    )
    .await;
    assert_eq!(api.status, 401, "{}", api.text());
    assert_eq!(
        api.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"hr.apps.localhost\"")
    );
    assert_eq!(
        api.header("x-portico-error").as_deref(),
        Some("SignInRequired")
    );

    // Signed out: the cookie goes, and the next navigation signs in again.
    let r = hop(ca, jar, &format!("{app}/.portico/sign_out"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .set_cookie
        .iter()
        .any(|c| c.starts_with("__Host-portico-session=;") && c.contains("Max-Age=0")));
    let r = hop(ca, jar, &format!("{app}/"), &[]).await;
    assert_eq!(r.status, 302);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_redirect_targets_land_on_the_root() {
    let s = setup().await;
    let (ca, port) = (&s.ca, s.port);
    for evil in [
        "//evil.example/",
        "/\\evil.example",
        "https:evil.example",
        "%2f%2fevil",
        "javascript:alert(1)",
    ] {
        let jar_file = tempfile::NamedTempFile::new().unwrap();
        let jar = jar_file.path();
        let mut start =
            url::Url::parse(&format!("https://auth.{DOMAIN}:{port}/.portico/start")).unwrap();
        start
            .query_pairs_mut()
            .append_pair("app", "hr")
            .append_pair("to", evil);
        let r = hop(ca, jar, start.as_str(), &[]).await;
        assert_eq!(r.status, 302, "{evil}: {}", r.body);
        let callback = sign_in_at_provider(ca, jar, &s.idp, &r.location, "bob").await;
        let r = hop(ca, jar, &callback, &[]).await;
        assert_eq!(r.status, 302, "{evil}: {}", r.body);
        let r = hop(ca, jar, &r.location, &[]).await;
        assert_eq!(r.status, 302, "{evil}: {}", r.body);
        assert_eq!(r.location, "/", "{evil}");
    }
}

/// A browser (a cookie jar) signed in as `user` at `app` (`https://host:port`).
async fn signed_in(s: &Setup, app: &str, user: &str) -> tempfile::NamedTempFile {
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar = jar_file.path();
    let r = hop(&s.ca, jar, &format!("{app}/"), &[]).await;
    assert_eq!(r.status, 302, "{app}: {}", r.body);
    let r = hop(&s.ca, jar, &r.location, &[]).await;
    assert_eq!(r.status, 302, "start: {}", r.body);
    let callback = sign_in_at_provider(&s.ca, jar, &s.idp, &r.location, user).await;
    let r = hop(&s.ca, jar, &callback, &[]).await;
    assert_eq!(r.status, 302, "callback: {}", r.body);
    let r = hop(&s.ca, jar, &r.location, &[]).await;
    assert_eq!(r.status, 302, "handoff: {}", r.body);
    jar_file
}

/// Verifies an assertion with a JWKS document: its claims.
fn verify_assertion(token: &str, jwks: &str, app: &str) -> serde_json::Value {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let jwk = set
        .find(header.kid.as_deref().expect("a kid"))
        .expect("the kid is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_issuer(&[format!("https://auth.{DOMAIN}")]);
    v.set_audience(&[app]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .unwrap()
        .claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_assigned_users_get_in_and_the_backend_sees_their_identity_never_a_spoofed_one() {
    let s = setup().await;
    let (ca, port) = (&s.ca, s.port);
    let payroll = format!("https://payroll.{DOMAIN}:{port}");
    let hr = format!("https://hr.{DOMAIN}:{port}");

    // alice is in admins: payroll's backend gets her identity, from the
    // edge, whatever the client sent under those names.
    let alice = signed_in(&s, &payroll, "alice").await;
    let spoofs = [
        "X-Remote-User: root@example.test",
        "X_Remote_User: root@example.test",
        "X-Remote-Groups: everyone",
        "X-Forwarded-User: root",
        "X_Forwarded_Email: root@example.test",
        "X-Auth-Request-User: root",
        "X-Portico-Jwt-Assertion: forged.forged.forged",
        "Remote-User: root",
    ];
    let mut args = vec![];
    for h in &spoofs {
        args.extend(["-H", h]);
    }
    let r = hop(ca, alice.path(), &format!("{payroll}/headers"), &args).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let headers = doc["headers"].as_object().unwrap();
    let one = |name: &str| -> Option<String> {
        let v = headers.get(name)?.as_array().unwrap();
        assert_eq!(v.len(), 1, "{name}: {v:?}");
        Some(v[0].as_str().unwrap().to_owned())
    };
    assert_eq!(one("x-remote-user").as_deref(), Some("alice@example.test"));
    assert_eq!(one("x-remote-groups").as_deref(), Some("admins,devs"));
    assert_eq!(one("x-remote-sub").as_deref(), Some("alice"));
    for gone in [
        "x_remote_user",
        "x-forwarded-user",
        "x_forwarded_email",
        "x-auth-request-user",
        "remote-user",
    ] {
        assert!(!headers.contains_key(gone), "{gone}: {headers:?}");
    }
    assert!(!r.body.contains("root"), "{}", r.body);
    // The assertion verifies with the router's JWKS and the auth host's,
    // for this app only.
    let token = one("x-portico-jwt-assertion").expect("an assertion");
    let router_jwks: serde_json::Value = s.admin.get_json("/.well-known/jwks.json").await.unwrap();
    let claims = verify_assertion(&token, &router_jwks.to_string(), "payroll");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.test");
    assert_eq!(claims["groups"], serde_json::json!(["admins", "devs"]));
    let edge_jwks = curl(
        ca,
        &[&format!(
            "https://auth.{DOMAIN}:{port}/.well-known/jwks.json"
        )],
    )
    .await;
    assert_eq!(edge_jwks.status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&edge_jwks.text()).unwrap(),
        router_jwks
    );
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(router_jwks).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["hr"]);
    assert!(
        jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).is_err(),
        "payroll's assertion must not pass as hr's"
    );

    // bob is in no group and not carol: 403 NotAssigned, the branded page.
    let bob = signed_in(&s, &hr, "bob").await;
    let r = hop(ca, bob.path(), &format!("{hr}/headers"), &[]).await;
    assert_eq!(r.status, 200, "hr assigns everyone: {}", r.body);
    let bob = signed_in(&s, &payroll, "bob").await;
    let bob_payroll = hop(ca, bob.path(), &format!("{payroll}/headers"), &[]).await;
    assert_eq!(bob_payroll.status, 403, "{}", bob_payroll.body);
    assert!(
        bob_payroll.body.contains("NotAssigned"),
        "{}",
        bob_payroll.body
    );
    assert!(
        bob_payroll.body.contains("not assigned"),
        "{}",
        bob_payroll.body
    );
    // carol by her verified email.
    let carol = signed_in(&s, &payroll, "carol").await;
    let r = hop(ca, carol.path(), &format!("{payroll}/headers"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("carol@example.test"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn my_apps_lists_exactly_the_apps_a_user_is_assigned_to() {
    let s = setup().await;
    let (ca, port) = (&s.ca, s.port);
    let portal = format!("https://auth.{DOMAIN}:{port}");
    // An API client without a session: 401.
    let r = curl(
        ca,
        &["-H", "Accept: application/json", &format!("{portal}/")],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    for (user, want) in [("alice", vec!["hr", "payroll"]), ("bob", vec!["hr"])] {
        let jar_file = tempfile::NamedTempFile::new().unwrap();
        let jar = jar_file.path();
        let r = hop(ca, jar, &format!("{portal}/"), &[]).await;
        assert_eq!(r.status, 302, "{}", r.body);
        assert_eq!(r.location, "/.portico/start");
        let r = hop(ca, jar, &format!("{portal}/.portico/start"), &[]).await;
        assert_eq!(r.status, 302, "{}", r.body);
        let callback = sign_in_at_provider(ca, jar, &s.idp, &r.location, user).await;
        let r = hop(ca, jar, &callback, &[]).await;
        assert_eq!(r.status, 302, "{}", r.body);
        assert_eq!(r.location, "/");
        assert!(
            r.set_cookie
                .iter()
                .any(|c| c.starts_with("__Host-portico-session=") && c.contains("Secure")),
            "{:?}",
            r.set_cookie
        );
        let r = curl(
            ca,
            &[
                "-b",
                jar.to_str().unwrap(),
                "-H",
                "Accept: application/json",
                &format!("{portal}/"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.text()).unwrap();
        let ids: Vec<&str> = list.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, want, "{user}");
        assert_eq!(
            list[0]["url"],
            format!("https://hr.{DOMAIN}:{port}/"),
            "{list:?}"
        );
        // The HTML page names the same apps.
        let page = hop(ca, jar, &format!("{portal}/"), &[]).await;
        assert_eq!(page.status, 200);
        assert_eq!(
            page.body.matches("class=\"app\"").count(),
            want.len(),
            "{}",
            page.body
        );
        // A session of the auth host is no session of an app's host.
        let r = hop(ca, jar, &format!("https://hr.{DOMAIN}:{port}/headers"), &[]).await;
        assert_eq!(r.status, 302, "{}", r.body);
    }
}

/// Two regions: edge A (region `eu`, 127.0.0.1) holds the tunnels of the
/// app's group, pinned to `eu`; edge B (region `default`, 127.0.0.2) holds
/// none. Both serve the same port, as edges behind one name do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_one_regions_edge_works_at_anothers_and_the_identity_crosses_the_mesh() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_owned();
    let root = tokio_util::sync::CancellationToken::new();
    let port = free_tcp_port();
    let idp = Idp::start(&format!("https://auth.{DOMAIN}:{port}/.portico/callback")).await;
    let mut rc = portico_router::Config::new(d.join("router"));
    rc.listen = "127.0.0.1:0".parse().unwrap();
    rc.apps_domain = DOMAIN.into();
    rc.public_port = Some(port);
    rc.sign_in = Some(portico_router::SignInConfig {
        issuer: idp.issuer.clone(),
        client_id: "portico".into(),
        client_secret: "portico-secret".into(),
        session_lifetime: Duration::from_secs(3600),
        groups_claim: "groups".into(),
    });
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    let ca = d.join("router/ca.pem");
    let admin = common::router_admin(&router);
    let eu: portico_proto::RegionId = "eu".parse().unwrap();
    let _: serde_json::Value = admin
        .post_json(
            "/v1/regions",
            &portico_proto::api::CreateRegion { id: eu.clone() },
        )
        .await
        .unwrap();
    let group: portico_proto::GroupId = "eu-apps".parse().unwrap();
    let _: serde_json::Value = admin
        .post_json(
            "/v1/groups",
            &portico_proto::api::CreateGroup {
                id: group.clone(),
                region: Some("eu".into()),
            },
        )
        .await
        .unwrap();
    let a_addr: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let b_addr: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let edge_a = common::start_edge_in(
        &router,
        &admin,
        &d.join("edge-a"),
        &eu,
        root.child_token(),
        |ec| {
            ec.public_listen = SocketAddr::new(a_addr, port);
            ec.mesh_listen = Some(SocketAddr::new(a_addr, 0));
            ec.http3 = false;
        },
    )
    .await;
    let edge_b = common::start_edge(
        &router,
        &admin,
        &d.join("edge-b"),
        root.child_token(),
        |ec| {
            ec.public_listen = SocketAddr::new(b_addr, port);
            ec.tunnel_listen = SocketAddr::new(b_addr, 0);
            ec.mesh_listen = Some(SocketAddr::new(b_addr, 0));
            ec.http3 = false;
        },
    )
    .await;
    let demo = portico::demo::start("127.0.0.1:0".parse().unwrap(), root.child_token())
        .await
        .unwrap();
    let spec = AppSpec {
        id: "hr".parse().unwrap(),
        external_host: None,
        internal_url: format!("http://{}/", demo.addr),
        connector_group: group.clone(),
        backend_timeout: Default::default(),
        validate_backend_tls: true,
        translate_headers: true,
        translate_body: false,
        required_features: vec![],
        preauth: Preauth::Oidc,
        assignment: Assignment {
            groups: vec!["devs".into()],
            ..Default::default()
        },
        identity_headers: [("X-Remote-User", "email"), ("X-Remote-Groups", "groups")]
            .into_iter()
            .map(|(h, c)| (h.to_owned(), c.to_owned()))
            .collect(),
        hidden: false,
        maintenance: false,
        home_page: None,
        backend_ca_pem: None,
    };
    let _: portico_proto::api::App = admin.post_json("/v1/apps", &spec).await.unwrap();
    let mut cc = portico_connector::Config::new(router.url(), d.join("connector"));
    cc.token = Some(
        portico::dev::create_token(&admin, TokenScope::Connector { group })
            .await
            .unwrap(),
    );
    cc.tunnels = 1;
    let connector = portico_connector::start(cc, root.child_token())
        .await
        .unwrap();
    connector.wait_tunnels(1).await;

    let hr = format!("https://hr.{DOMAIN}:{port}");
    let at = |ip: std::net::IpAddr| {
        [
            format!("hr.{DOMAIN}:{port}:{ip}"),
            format!("auth.{DOMAIN}:{port}:{ip}"),
        ]
    };
    let (to_a, to_b) = (at(a_addr), at(b_addr));
    let via = |to: &[String; 2]| -> Vec<String> {
        vec![
            "--resolve".into(),
            to[0].clone(),
            "--resolve".into(),
            to[1].clone(),
        ]
    };
    let (via_a, via_b) = (via(&to_a), via(&to_b));
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    // B forwards once the presence says A holds the group's tunnels.
    let probe = tempfile::NamedTempFile::new().unwrap();
    common::eventually("edge B to know the app", LIMIT, || async {
        let r = hop(&ca, probe.path(), &format!("{hr}/"), &args(&via_b)).await;
        (r.status == 302).then_some(())
    })
    .await;

    // Signed in at edge A (region eu)...
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar = jar_file.path();
    let r = hop(&ca, jar, &format!("{hr}/headers"), &args(&via_a)).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&ca, jar, &r.location, &args(&via_a)).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let callback = sign_in_at_provider(&ca, jar, &idp, &r.location, "alice").await;
    let r = hop(&ca, jar, &callback, &args(&via_a)).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&ca, jar, &r.location, &args(&via_a)).await;
    assert_eq!(r.status, 302, "{}", r.body);
    // ...the session works at edge A, which holds the tunnel...
    let url = format!("{hr}/headers");
    let r = curl(
        &ca,
        &[
            &["-b", jar.to_str().unwrap()][..],
            &args(&via_a)[..],
            &[url.as_str()][..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("portico-route").as_deref(),
        Some(edge_a.id.as_str())
    );
    let direct: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    // ...and at edge B of region default, through the mesh to A, with the
    // same identity headers and a verifiable assertion.
    let r = curl(
        &ca,
        &[
            &["-b", jar.to_str().unwrap(), "-H", "X-Remote-User: root"][..],
            &args(&via_b)[..],
            &[url.as_str()][..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("portico-route"),
        Some(format!("{}, {}", edge_b.id, edge_a.id)),
        "B forwarded to A"
    );
    let meshed: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    for h in ["x-remote-user", "x-remote-groups"] {
        assert_eq!(meshed["headers"][h], direct["headers"][h], "{h}");
    }
    assert_eq!(meshed["headers"]["x-remote-user"][0], "alice@example.test");
    assert_eq!(meshed["headers"]["x-remote-groups"][0], "admins,devs");
    let token = meshed["headers"]["x-portico-jwt-assertion"][0]
        .as_str()
        .expect("an assertion through the mesh");
    let jwks: serde_json::Value = admin.get_json("/.well-known/jwks.json").await.unwrap();
    let claims = verify_assertion(token, &jwks.to_string(), "hr");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["groups"], serde_json::json!(["admins", "devs"]));
    // bob signs in at edge B and is not assigned: 403 there, no stream.
    let bob_file = tempfile::NamedTempFile::new().unwrap();
    let bob = bob_file.path();
    let r = hop(&ca, bob, &format!("{hr}/headers"), &args(&via_b)).await;
    let r = hop(&ca, bob, &r.location, &args(&via_b)).await;
    let callback = sign_in_at_provider(&ca, bob, &idp, &r.location, "bob").await;
    let r = hop(&ca, bob, &callback, &args(&via_b)).await;
    let r = hop(&ca, bob, &r.location, &args(&via_b)).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&ca, bob, &format!("{hr}/headers"), &args(&via_a)).await;
    assert_eq!(r.status, 403, "bob's session from B, at A: {}", r.body);
    drop(connector);
    root.cancel();
}
