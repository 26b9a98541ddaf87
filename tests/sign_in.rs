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
use portico_proto::api::{AppSpec, Preauth, TokenScope};

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
        maintenance: false,
        home_page: None,
        backend_ca_pem: None,
    };
    let app: portico_proto::api::App = admin.post_json("/v1/apps", &spec).await.unwrap();
    assert_eq!(app.preauth, Preauth::Oidc);
    assert!(app.required_features.iter().any(|f| f == "oidc"));
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
