//! The sign-in tests' shared harness (tests/sign_in.rs, tests/browser.rs):
//! the test IdP (`provider.mjs` beside this file, npm `oidc-provider`), a
//! deployment with two apps that sign users in (`hr`, the demo backend;
//! `api`, an echoing backend), and the provider's tokens and crafted ones.
//! Included with `#[path]`; it uses the including crate's `common`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{self, curl, Child};
use portico_proto::api::{AppSpec, Assignment, Preauth};

pub const LIMIT: Duration = Duration::from_secs(60);
pub const DOMAIN: &str = "apps.localhost";

/// A second client the test IdP registers (besides the deployment's
/// `portico`), for an app with its own client.
pub const OWN_CLIENT: &str = "portico-own";
pub const OWN_SECRET: &str = "own-Secret~0123456789";

/// The test IdP (`tests/idp/provider.mjs`) on a free loopback port,
/// accepting `redirect_uri` for clients `portico` and [`OWN_CLIENT`].
pub struct Idp {
    pub issuer: String,
    pub _child: Child,
}

impl Idp {
    /// `api`: the audience of its JWT access tokens; `key`: the PEM RSA
    /// key it signs with, as `test-key-1`; `opts.consent`: whether it asks
    /// for consent (else every grant asked for is given); `opts.tamper`:
    /// whether it serves the tamper hook ([`Idp::tamper`]).
    pub async fn start(redirect_uri: &str, api: &str, key: &Path, opts: &Options) -> Idp {
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
            .env("OP_SIGNING_KEY", key)
            .env("OP_EXTRA_CLIENTS", format!("{OWN_CLIENT}:{OWN_SECRET}"));
        if opts.consent {
            cmd.env("OP_CONSENT", "1");
        }
        if opts.tamper {
            cmd.env("OP_TEST_TAMPER", "1");
        }
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

    /// How many authorization requests (`kind` `authorization`) the
    /// provider accepted, or codes it exchanged (`token`), for `client`.
    pub async fn client_use(&self, kind: &str, client: &str) -> u64 {
        let r = common::curl_plain(&format!("{}/_test/clients", self.issuer)).await;
        let counts: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        counts[kind][client].as_u64().unwrap_or(0)
    }

    /// How many requests the provider had for `path`.
    pub async fn requests(&self, path: &str) -> u64 {
        let r = common::curl_plain(&format!("{}/_test/requests", self.issuer)).await;
        let counts: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        counts[path].as_u64().unwrap_or(0)
    }

    /// Makes the provider's next token response carry an ID token crafted
    /// from the real one's claims by `mode` (`provider.mjs`'s `TAMPER`
    /// names them) instead of the real one. Needs [`Options::tamper`].
    pub async fn tamper(&self, mode: &str) {
        let r = common::curl_plain_args(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &serde_json::json!({ "mode": mode }).to_string(),
            &format!("{}/_test/tamper", self.issuer),
        ])
        .await;
        assert_eq!(r.status, 200, "tamper {mode}: {}", r.text());
    }

    /// The tamper modes the provider served, in order, and the one still
    /// pending, if any.
    pub async fn tampered(&self) -> (Vec<String>, Option<String>) {
        let r = common::curl_plain(&format!("{}/_test/tamper", self.issuer)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let applied = v["applied"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect();
        (applied, v["pending"].as_str().map(str::to_owned))
    }
}

/// A new RSA key from openssl: (private PEM, public PEM).
pub async fn rsa_key(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
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
pub struct Echo {
    pub addr: SocketAddr,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>>,
}

impl Echo {
    pub async fn start(shutdown: tokio_util::sync::CancellationToken) -> Echo {
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

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A TCP port free on 127.0.0.1 now: the edge's public port, which the
/// provider's redirect URI must name before the edge starts.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request of a browser with a cookie jar (no redirects followed):
/// status, `Location`, headers and body.
pub struct Hop {
    pub status: u16,
    pub location: String,
    pub set_cookie: Vec<String>,
    pub body: String,
}

pub async fn hop(ca: &Path, jar: &Path, url: &str, extra: &[&str]) -> Hop {
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
/// `user` (and the consent form if it asks), until it redirects to the
/// callback; returns the callback URL.
pub async fn sign_in_at_provider(
    ca: &Path,
    jar: &Path,
    idp: &Idp,
    auth_url: &str,
    user: &str,
) -> String {
    let mut url = auth_url.to_owned();
    let mut logged_in = false;
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
            // The login form (any password; the login is the subject),
            // then, if the provider asks, the consent form.
            let login = format!("login={user}");
            let form: &[&str] = if logged_in {
                &["-d", "prompt=consent"]
            } else {
                &["-d", "prompt=login", "-d", &login, "-d", "password=x"]
            };
            let r = hop(ca, jar, &next, form).await;
            assert!(
                matches!(r.status, 302 | 303),
                "{}: {} {}",
                form[1],
                r.status,
                r.body
            );
            logged_in = true;
            url = absolute(&idp.issuer, &r.location);
        } else {
            url = next;
        }
    }
    panic!("the provider never redirected to the callback");
}

pub fn absolute(base: &str, location: &str) -> String {
    url::Url::parse(base)
        .unwrap()
        .join(location)
        .unwrap()
        .to_string()
}

pub struct Setup {
    pub root: tokio_util::sync::CancellationToken,
    pub ca: PathBuf,
    /// The router's API URL (its data directory is `dir/router`).
    pub router_url: String,
    pub admin: portico_agent::RouterClient,
    pub port: u16,
    pub idp: Idp,
    /// The provider's signing key (private PEM, public PEM).
    pub idp_key: (Vec<u8>, Vec<u8>),
    /// The backend of app `api` (`preauth = oidc`).
    pub echo: Echo,
    pub dir: tempfile::TempDir,
    pub _connector: portico_connector::Handle,
}

/// What [`setup_with`] varies.
pub struct Options {
    /// The provider shows its consent form.
    pub consent: bool,
    /// The router's `--session-idle-timeout`.
    pub idle: Duration,
    /// The provider serves its test-only tamper hook (`OP_TEST_TAMPER`).
    pub tamper: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            consent: false,
            idle: Duration::from_secs(3600),
            tamper: false,
        }
    }
}

/// [`setup_with`] the defaults: a provider that asks no consent.
/// The test IdP (its signing key in `d`, made now) and a router that
/// signs users in with it, for edges on `port`.
pub async fn idp_and_router(
    d: &Path,
    port: u16,
    root: &tokio_util::sync::CancellationToken,
    opts: &Options,
) -> (Idp, (Vec<u8>, Vec<u8>), portico_router::Handle) {
    let idp_key = rsa_key(d, "idp").await;
    std::fs::write(d.join("idp-key.pem"), &idp_key.0).unwrap();
    let idp = Idp::start(
        &format!("https://auth.{DOMAIN}:{port}/.portico/callback"),
        &format!("https://api.{DOMAIN}:{port}"),
        &d.join("idp-key.pem"),
        opts,
    )
    .await;
    let mut rc = portico_router::Config::new(d.join("router"));
    rc.listen = "127.0.0.1:0".parse().unwrap();
    rc.apps_domain = DOMAIN.into();
    rc.public_port = Some(port);
    rc.sign_in = Some(portico_router::SignInConfig {
        issuer: idp.issuer.clone(),
        client_id: "portico".into(),
        client_secret: "portico-secret".into(),
        session_lifetime: Duration::from_secs(3600),
        session_idle_timeout: opts.idle,
        groups_claim: "groups".into(),
    });
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    (idp, idp_key, router)
}

/// App `id` of `group` at `internal_url`, signing users in, for everyone
/// who does, with every other setting at its default.
pub fn oidc_app(id: &str, internal_url: &str, group: &portico_proto::GroupId) -> AppSpec {
    AppSpec {
        connector_group: group.clone(),
        preauth: Preauth::Oidc,
        assignment: Assignment {
            everyone: true,
            ..Default::default()
        },
        ..AppSpec::new(id.parse().unwrap(), internal_url)
    }
}

pub async fn setup() -> Setup {
    setup_with(Options::default()).await
}

/// A router with the test IdP, an edge, a connector, app `hr` (the demo
/// backend) and app `api` ([`Echo`]), both `preauth = oidc`.
pub async fn setup_with(opts: Options) -> Setup {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_owned();
    let root = tokio_util::sync::CancellationToken::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let port = free_tcp_port();
    let (idp, idp_key, router) = idp_and_router(&d, port, &root, &opts).await;
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
    let spec = oidc_app("hr", &format!("http://{}/", demo.addr), &group);
    let app: portico_proto::api::App = admin.post_json("/v1/apps", &spec).await.unwrap();
    assert_eq!(app.preauth, Preauth::Oidc);
    assert!(app.required_features.iter().any(|f| f == "oidc"));
    let echo = Echo::start(root.child_token()).await;
    let api_spec = AppSpec {
        id: "api".parse().unwrap(),
        internal_url: format!("http://{}/", echo.addr),
        ..spec.clone()
    };
    let _: portico_proto::api::App = admin.post_json("/v1/apps", &api_spec).await.unwrap();
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
    let connector = common::start_connector(
        &router,
        &admin,
        &d.join("connector"),
        group,
        1,
        root.child_token(),
    )
    .await;
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
        root,
        ca,
        router_url: router.url(),
        admin,
        port,
        idp,
        idp_key,
        echo,
        dir: tmp,
        _connector: connector,
    }
}

/// Base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The provider's tokens for `user` through the code flow with scope
/// `api` (a JWT access token for app `api`): (access token, ID token).
pub async fn provider_tokens(s: &Setup, user: &str) -> (String, String) {
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
pub fn sign(
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

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Signs `user` in to app `hr` with curl and the cookie jar `jar`: the
/// app's redirect, the auth host, the provider, the callback, the
/// handoff. Returns the session's `Set-Cookie`.
pub async fn curl_sign_in(s: &Setup, jar: &Path, user: &str) -> String {
    let app = format!("https://hr.{DOMAIN}:{}", s.port);
    let r = hop(&s.ca, jar, &format!("{app}/"), &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&s.ca, jar, &r.location, &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let callback = sign_in_at_provider(&s.ca, jar, &s.idp, &r.location, user).await;
    let r = hop(&s.ca, jar, &callback, &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&s.ca, jar, &r.location, &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    r.set_cookie
        .iter()
        .find(|c| c.starts_with("__Host-portico-session="))
        .expect("a session cookie")
        .clone()
}

/// The `Set-Cookie` of the session among `set_cookie`, if any.
pub fn session_set_cookie(set_cookie: &[String]) -> Option<&String> {
    set_cookie
        .iter()
        .find(|c| c.starts_with("__Host-portico-session="))
}
