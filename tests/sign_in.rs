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
//! - An API client's bearer token: a real JWT access token of the provider
//!   reaches the backend; crafted ones (`alg: none`, an unknown `kid`,
//!   another key, wrong issuer or audience, expired, not yet valid, HS256
//!   keyed with the public key, an ID token, garbage) get 401
//!   `invalid_token` and never reach it. The provider signs with a key the
//!   test made, so the test signs with it too and varies one claim at a
//!   time; the provider counts the edge's JWKS fetches.

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
    /// `api`: the audience of its JWT access tokens; `key`: the PEM RSA
    /// key it signs with, as `test-key-1`.
    async fn start(redirect_uri: &str, api: &str, key: &Path) -> Idp {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp");
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "the test IdP is not installed: run `npm ci --prefix tests/idp` (scripts/test.sh does)"
        );
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg("provider.mjs")
            .current_dir(&dir)
            .env("OP_PORT", "0")
            .env("OP_REDIRECT_URIS", redirect_uri)
            .env("OP_API", api)
            .env("OP_SIGNING_KEY", key);
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

    /// How many requests the provider had for `path`.
    async fn requests(&self, path: &str) -> u64 {
        let r = common::curl_plain(&format!("{}/_test/requests", self.issuer)).await;
        let counts: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        counts[path].as_u64().unwrap_or(0)
    }
}

/// A new RSA key from openssl: (private PEM, public PEM).
async fn rsa_key(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let key = dir.join(format!("{name}.pem"));
    let out = tokio::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .await
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (std::fs::read(&key).unwrap(), out.stdout)
}

/// A backend that answers every request with the headers it received
/// (JSON) and remembers them, to show what reached it.
struct Echo {
    addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>>,
}

impl Echo {
    async fn start(shutdown: tokio_util::sync::CancellationToken) -> Echo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let log = std::sync::Arc::clone(&log);
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let headers = req.headers().clone();
                        let json: serde_json::Map<String, serde_json::Value> = headers
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").into()))
                            .collect();
                        log.lock().unwrap().push(headers);
                        let body = serde_json::to_vec(&json).unwrap();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
                );
            }
        });
        Echo { addr, seen }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
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
    /// The provider's signing key (private PEM, public PEM).
    idp_key: (Vec<u8>, Vec<u8>),
    /// The backend of app `api` (`preauth = oidc`).
    echo: Echo,
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
    let idp_key = rsa_key(&d, "idp").await;
    std::fs::write(d.join("idp-key.pem"), &idp_key.0).unwrap();
    let idp = Idp::start(
        &format!("https://auth.{DOMAIN}:{port}/.portico/callback"),
        &format!("https://api.{DOMAIN}:{port}"),
        &d.join("idp-key.pem"),
    )
    .await;

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
    };
    let app: portico_proto::api::App = admin.post_json("/v1/apps", &spec).await.unwrap();
    assert_eq!(app.preauth, Preauth::Oidc);
    assert!(app.required_features.iter().any(|f| f == "oidc"));
    let echo = Echo::start(root.child_token()).await;
    let api_spec = AppSpec {
        id: "api".parse().unwrap(),
        internal_url: format!("http://{}/", echo.addr),
        ..spec
    };
    let _: portico_proto::api::App = admin.post_json("/v1/apps", &api_spec).await.unwrap();
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
    common::eventually("the edge to know app api", LIMIT, || async {
        let r = curl(&ca, &[&format!("https://api.{DOMAIN}:{port}/")]).await;
        (r.status == 401).then_some(())
    })
    .await;
    Setup {
        _root: root,
        ca,
        port,
        idp,
        idp_key,
        echo,
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

/// Base64url without padding.
fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The provider's tokens for `user` through the code flow with scope
/// `api` (a JWT access token for app `api`): (access token, ID token).
async fn provider_tokens(s: &Setup, user: &str) -> (String, String) {
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let redirect = format!("https://auth.{DOMAIN}:{}/.portico/callback", s.port);
    let verifier: String = (0..64).map(|_| fastrand::alphanumeric()).collect();
    let challenge = b64(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
    let mut auth = url::Url::parse(&format!("{}/auth", s.idp.issuer)).unwrap();
    auth.query_pairs_mut()
        .append_pair("client_id", "portico")
        .append_pair("response_type", "code")
        .append_pair("scope", "openid email profile groups api")
        .append_pair("redirect_uri", &redirect)
        .append_pair("state", "test-state-0123456789")
        .append_pair("nonce", "test-nonce-0123456789")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let callback = sign_in_at_provider(&s.ca, jar_file.path(), &s.idp, auth.as_str(), user).await;
    let code = url::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("the callback has a code");
    let r = curl(
        &s.ca,
        &[
            "-u",
            "portico:portico-secret",
            "-d",
            "grant_type=authorization_code",
            "--data-urlencode",
            &format!("code={code}"),
            "--data-urlencode",
            &format!("redirect_uri={redirect}"),
            "--data-urlencode",
            &format!("code_verifier={verifier}"),
            &format!("{}/token", s.idp.issuer),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let tokens: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    (
        tokens["access_token"].as_str().unwrap().to_owned(),
        tokens["id_token"].as_str().unwrap().to_owned(),
    )
}

/// `claims` signed with `alg` by `key` (a PEM private RSA key, or the
/// secret of an HMAC), the header naming `kid`.
fn sign(
    alg: jsonwebtoken::Algorithm,
    key: &[u8],
    kid: Option<&str>,
    claims: &serde_json::Value,
) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let mut header = Header::new(alg);
    header.typ = Some("at+jwt".into());
    header.kid = kid.map(str::to_owned);
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(key),
        _ => EncodingKey::from_rsa_pem(key).unwrap(),
    };
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_of_the_provider_reach_the_api_and_crafted_ones_get_401_invalid_token() {
    use jsonwebtoken::Algorithm::{HS256, RS256};
    let s = setup().await;
    let (ca, port) = (&s.ca, s.port);
    let api = format!("https://api.{DOMAIN}:{port}/v1/things");
    let call = |token: String, accept: &'static str| {
        let api = api.clone();
        async move {
            curl(
                ca,
                &[
                    "-H",
                    &format!("Authorization: Bearer {token}"),
                    "-H",
                    &format!("Accept: {accept}"),
                    &api,
                ],
            )
            .await
        }
    };

    // A real access token of the provider, for this app: the backend
    // answers, and gets the Authorization header (the token is for it).
    let (access, id_token) = provider_tokens(&s, "alice").await;
    let r = call(access.clone(), "application/json").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.echo.count(), 1);
    let echoed: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(echoed["authorization"], format!("Bearer {access}"));

    // Crafted with the provider's own key: valid unless one claim is off.
    let (idp_key, idp_public) = (&s.idp_key.0, &s.idp_key.1);
    let now = unix_now();
    let aud = format!("https://api.{DOMAIN}:{port}");
    let good = serde_json::json!({
        "iss": s.idp.issuer, "aud": aud, "sub": "carol", "exp": now + 300, "iat": now,
        "email": "carol@example.test", "groups": ["devs"],
    });
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let real = |claims: &serde_json::Value| sign(RS256, idp_key, Some("test-key-1"), claims);
    let r = call(real(&good), "application/json").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Within the 60 s of skew: still good.
    for claims in [
        with("exp", (now - 20).into()),
        with("nbf", (now + 20).into()),
    ] {
        let r = call(real(&claims), "application/json").await;
        assert_eq!(r.status, 200, "{claims}: {}", r.text());
    }
    // The audience with the external URL's trailing slash, and in a list.
    for aud in [
        serde_json::json!(format!("{aud}/")),
        serde_json::json!(["other", aud]),
    ] {
        let r = call(real(&with("aud", aud.clone())), "application/json").await;
        assert_eq!(r.status, 200, "{aud}: {}", r.text());
    }
    let reached = s.echo.count();
    assert_eq!(reached, 6);

    let (other_key, _) = rsa_key(s._dir.path(), "other").await;
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"test-key-1"}"#),
        b64(good.to_string().as_bytes())
    );
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let refused: Vec<(&str, String, &str)> = vec![
        ("alg none", none, "not a JWT"),
        (
            "alg none, signed",
            format!(
                "{}.{}.c2ln",
                b64(br#"{"alg":"none"}"#),
                b64(good.to_string().as_bytes())
            ),
            "not a JWT",
        ),
        (
            "HS256 keyed with the public key",
            sign(HS256, idp_public, Some("test-key-1"), &good),
            "symmetric",
        ),
        (
            "another key under the provider's kid",
            sign(RS256, &other_key, Some("test-key-1"), &good),
            "signature",
        ),
        (
            "wrong issuer",
            real(&with("iss", "https://evil.example".into())),
            "issuer",
        ),
        (
            "issuer with a trailing slash",
            real(&with("iss", format!("{}/", s.idp.issuer).into())),
            "issuer",
        ),
        (
            "wrong audience",
            real(&with("aud", format!("https://hr.{DOMAIN}:{port}").into())),
            "audience",
        ),
        (
            "the client id as audience",
            real(&with("aud", "portico".into())),
            "audience",
        ),
        ("expired", real(&with("exp", (now - 120).into())), "expired"),
        (
            "not yet valid",
            real(&with("nbf", (now + 120).into())),
            "not valid yet",
        ),
        ("no exp", real(&no_exp), "exp"),
        ("the provider's ID token", id_token.clone(), "audience"),
        ("garbage", "garbage".into(), "not a JWT"),
        ("three garbage parts", "a.b.c".into(), "not a JWT"),
    ];
    for (what, token, why) in &refused {
        for accept in ["application/json", "text/html"] {
            let r = call(token.clone(), accept).await;
            assert_eq!(r.status, 401, "{what}: {}", r.text());
            assert!(r.header("location").is_none(), "{what}: never a redirect");
            assert_eq!(
                r.header("x-portico-error").as_deref(),
                Some("SignInRequired"),
                "{what}"
            );
            let challenge = r.header("www-authenticate").unwrap_or_default();
            assert!(
                challenge.starts_with(&format!(
                    "Bearer realm=\"api.{DOMAIN}\", error=\"invalid_token\", error_description=\""
                )),
                "{what}: {challenge}"
            );
            assert!(challenge.contains(why), "{what}: {challenge}");
        }
    }
    assert_eq!(
        s.echo.count(),
        reached,
        "no refused token reached the backend"
    );

    // An unknown kid fetches the provider's keys again, once: more
    // unknown kids within the 30 s that follow do not.
    let fetched = s.idp.requests("/jwks").await;
    let first = std::time::Instant::now();
    for kid in ["rotated-1", "rotated-2", "rotated-3", "rotated-1"] {
        let r = call(
            sign(RS256, &other_key, Some(kid), &good),
            "application/json",
        )
        .await;
        assert_eq!(r.status, 401, "{kid}: {}", r.text());
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.contains("is not one of the provider's"),
            "{challenge}"
        );
    }
    let refreshes = s.idp.requests("/jwks").await - fetched;
    // The bound follows from the elapsed time (no timing assertion): one
    // refresh, plus one per 30 s window if this machine was that slow.
    let windows = first.elapsed().as_secs() / 30;
    assert!(
        refreshes >= 1 && refreshes <= 1 + windows,
        "{refreshes} JWKS fetches for 4 unknown kids in {:?}",
        first.elapsed()
    );
    assert_eq!(s.echo.count(), reached);
    // The provider's own token still passes after the refresh.
    let r = call(access, "application/json").await;
    assert_eq!(r.status, 200, "{}", r.text());
}
