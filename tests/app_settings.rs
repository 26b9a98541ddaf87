//! App settings from Entra Application Proxy, end to end through the real
//! `portico app` CLI, the router, the edge, a connector and backends of
//! this test, with curl as the user: maintenance mode (and that it comes
//! before sign-in), the home page, wildcard apps, and backend TLS
//! validation with an app's own CA bundle.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{admin_cli, admin_cli_result, eventually, Stack};
use http_body_util::Full;

/// Bounds every wait: a hang guard, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// A backend that answers `<name> <host> <path>` and counts the requests
/// that reach it.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

async fn backend(name: &'static str) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                counted.fetch_add(1, Ordering::SeqCst);
                let host = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let text = format!("{name} {host} {}", req.uri().path());
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text)))) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Backend { addr, hits }
}

/// `portico ARGS` against the stack's router.
async fn portico(s: &Stack, args: &[&str]) -> String {
    admin_cli(&s.d.router.url(), &s.d.data.join("router"), args).await
}

/// `portico ARGS` that must fail: its stderr.
async fn portico_fails(s: &Stack, args: &[&str]) -> String {
    let (ok, stdout, stderr) =
        admin_cli_result(&s.d.router.url(), &s.d.data.join("router"), args).await;
    assert!(!ok, "portico {args:?} succeeded: {stdout}");
    stderr
}

/// Maintenance mode, set by `app create --maintenance` and ended by `app
/// update --no-maintenance`: 503 `Maintenance` with the branded page and
/// `Retry-After`, and the backend never sees the request; then 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_answers_503_without_reaching_the_backend_until_it_ends() {
    let s = Stack::start().await;
    let b = backend("hr").await;
    let internal = format!("http://{}/", b.addr);
    let shown = portico(
        &s,
        &[
            "app",
            "create",
            "hr",
            "--internal-url",
            &internal,
            "--maintenance",
        ],
    )
    .await;
    assert!(
        shown
            .lines()
            .any(|l| l.split_whitespace().eq(["maintenance", "true"])),
        "{shown}"
    );
    let url = s.app_url("hr", "/page");
    let r = eventually("the edge has the app", HANG_GUARD, || async {
        let r = s.curl(&[&url]).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(r.header("x-portico-error").as_deref(), Some("Maintenance"));
    assert_eq!(r.header("retry-after").as_deref(), Some("120"));
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    let page = r.text();
    assert!(
        page.contains("This application is down for maintenance.") && page.contains("Portico"),
        "{page}"
    );
    // A JSON client gets the same code as JSON.
    let r = s.curl(&["-H", "accept: application/json", &url]).await;
    assert_eq!(r.status, 503);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"], "Maintenance");
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );

    // The update needs one of the two switches, not both.
    let err = portico_fails(
        &s,
        &["app", "update", "hr", "--maintenance", "--no-maintenance"],
    )
    .await;
    assert!(err.contains("cannot be used with"), "{err}");
    portico(&s, &["app", "update", "hr", "--no-maintenance"]).await;
    let r = eventually("the edge serves the app again", HANG_GUARD, || async {
        let r = s.curl(&[&url]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    let text = r.text();
    assert!(
        text.starts_with("hr ") && text.ends_with(" /page"),
        "{text}"
    );
    assert!(b.hits.load(Ordering::SeqCst) >= 1);

    // And back on: the app's other settings are kept.
    portico(&s, &["app", "update", "hr", "--maintenance"]).await;
    eventually("the edge has maintenance again", HANG_GUARD, || async {
        (s.curl(&[&url]).await.status == 503).then_some(())
    })
    .await;
    let json = portico(&s, &["app", "show", "hr", "--json"]).await;
    let app: portico_proto::api::App = serde_json::from_str(&json).unwrap();
    assert!(app.maintenance);
    assert_eq!(app.internal_url, internal);
    s.stop().await;
}

/// A home page under the external root is accepted in each form (a URL on
/// the external host, a path, a URL under the internal URL) and shown as
/// `home_url` with the edges' port; another host, another scheme and a
/// path outside a path-published app's prefix are refused by the router
/// with the field at fault, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_pages_under_the_external_root_are_kept_and_others_refused() {
    let s = Stack::start().await;
    let b = backend("hr").await;
    let internal = format!("http://{}/hr/", b.addr);
    let port = s.port();
    let app = |json: String| serde_json::from_str::<portico_proto::api::App>(&json).unwrap();

    // No home page: the external URL.
    let created = app(portico(
        &s,
        &["app", "create", "hr", "--internal-url", &internal, "--json"],
    )
    .await);
    assert_eq!(created.home_url, created.external_url);
    assert_eq!(
        created.home_url,
        format!("https://hr.apps.localhost:{port}/")
    );

    let cases = [
        (
            "https://hr.apps.localhost/portal/?tab=1".to_owned(),
            "/portal/?tab=1",
        ),
        ("/start".to_owned(), "/start"),
        (
            format!("http://{}/hr/internal/home", b.addr),
            "/internal/home",
        ),
    ];
    for (page, path) in &cases {
        let updated =
            app(portico(&s, &["app", "update", "hr", "--home-page", page, "--json"]).await);
        assert_eq!(
            updated.home_url,
            format!("https://hr.apps.localhost:{port}{path}"),
            "{page}"
        );
    }
    // The home URL reaches the backend under the app's path prefix (path
    // publishing: the internal URL's /hr/ is the external root).
    let home = format!("https://hr.apps.localhost:{port}/internal/home");
    let r = eventually("the edge routes hr", HANG_GUARD, || async {
        let r = s.curl(&[&home]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(r.text().ends_with(" /hr/internal/home"), "{}", r.text());
    let shown = portico(&s, &["app", "show", "hr"]).await;
    assert!(
        shown.lines().any(|l| l.split_whitespace().eq([
            "home",
            "url",
            &format!("https://hr.apps.localhost:{port}/internal/home")
        ])),
        "{shown}"
    );

    for (page, says) in [
        (
            "https://hello.apps.localhost/",
            "must sit under the app's external URL",
        ),
        (
            "https://example.com/hr/",
            "must sit under the app's external URL",
        ),
        ("http://hr.apps.localhost/portal/", "must be https"),
        (
            &format!("http://{}/other/", b.addr) as &str,
            "lies outside the app's published path /hr/",
        ),
    ] {
        let err = portico_fails(&s, &["app", "update", "hr", "--home-page", page]).await;
        assert!(
            err.contains("home_page") && err.contains(says),
            "{page}: {err}"
        );
        let err = portico_fails(
            &s,
            &[
                "app",
                "create",
                "hr2",
                "--external-host",
                "hr.apps.localhost",
                "--internal-url",
                &internal,
                "--home-page",
                page,
            ],
        )
        .await;
        // The page is checked before the host is found taken.
        assert!(
            err.contains("home_page") && err.contains(says),
            "{page}: {err}"
        );
    }
    assert!(
        portico_fails(&s, &["app", "show", "hr2"])
            .await
            .contains("not found"),
        "a refused app is not created"
    );
    let kept = app(portico(&s, &["app", "show", "hr", "--json"]).await);
    assert_eq!(
        kept.home_url,
        format!("https://hr.apps.localhost:{port}/internal/home"),
        "refused updates change nothing"
    );
    let cleared = app(portico(&s, &["app", "update", "hr", "--no-home-page", "--json"]).await);
    assert_eq!(cleared.home_url, cleared.external_url);
    s.stop().await;
}

/// Wildcard apps through router, DNS-less curl (`--resolve`), edge,
/// connector and three backends: the exact app wins over the wildcard,
/// the most specific wildcard wins, the wildcard app's internal `*` is the
/// label the host matched (`localhost.corp…` reaches `http://localhost:…`;
/// `eu.corp…` tries `http://eu:…`, which does not resolve), a host two
/// labels under a wildcard is no app's, and the edge's certificate names
/// both wildcards (curl verifies it against the router's CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_apps_route_exact_first_then_the_most_specific_and_fill_in_the_label() {
    let s = Stack::start().await;
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let port = s.port();
    portico(
        &s,
        &[
            "app",
            "create",
            "corp",
            "--external-host",
            "*.corp.apps.localhost",
            "--internal-url",
            &format!("http://*:{}/", a.addr.port()),
        ],
    )
    .await;
    portico(
        &s,
        &[
            "app",
            "create",
            "eu",
            "--external-host",
            "*.eu.corp.apps.localhost",
            "--internal-url",
            &format!("http://{}/", b.addr),
        ],
    )
    .await;
    portico(
        &s,
        &[
            "app",
            "create",
            "payroll",
            "--external-host",
            "payroll.corp.apps.localhost",
            "--internal-url",
            &format!("http://{}/", c.addr),
        ],
    )
    .await;
    let get = |host: &'static str, extra: &'static [&'static str]| {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/x");
        let s = &s;
        async move {
            let mut args = vec!["--resolve", resolve.as_str()];
            args.extend_from_slice(extra);
            args.push(&url);
            s.curl(&args).await
        }
    };
    // The edge asks for a certificate naming the new wildcards, and
    // routes the apps: wait until a wildcard host verifies and answers.
    let r = eventually("the edge serves the wildcard app", HANG_GUARD, || async {
        let r = get("localhost.corp.apps.localhost", &[]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(r.text(), format!("a localhost:{} /x", a.addr.port()));
    let r = eventually("the nested wildcard verifies", HANG_GUARD, || async {
        let r = get("paris.eu.corp.apps.localhost", &[]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(r.text().starts_with("b "), "{}", r.text());
    // Exact wins over the wildcard it lies under.
    let r = get("payroll.corp.apps.localhost", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("c "), "{}", r.text());
    // `eu.corp…` is one label under *.corp: the corp app, with `eu` as
    // its internal host, which does not resolve.
    let r = get("eu.corp.apps.localhost", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("BackendUnreachable")
    );
    // Two labels under *.corp: no app (and no certificate names it).
    let r = get("a.b.corp.apps.localhost", &["--insecure"]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-portico-error").as_deref(), Some("AppNotFound"));
    assert_eq!(
        (
            a.hits.load(Ordering::SeqCst) >= 1,
            b.hits.load(Ordering::SeqCst) >= 1,
            c.hits.load(Ordering::SeqCst)
        ),
        (true, true, 1)
    );

    // The router refuses a misplaced `*`, in either URL.
    for (args, says) in [
        (
            vec![
                "--external-host",
                "a.*.apps.localhost",
                "--internal-url",
                "http://x/",
            ],
            "external_host",
        ),
        (
            vec![
                "--external-host",
                "*.*.apps.localhost",
                "--internal-url",
                "http://x/",
            ],
            "external_host",
        ),
        (
            vec![
                "--external-host",
                "bad.apps.localhost",
                "--internal-url",
                "http://*.x/",
            ],
            "only a wildcard app",
        ),
        (
            vec![
                "--external-host",
                "*.bad.apps.localhost",
                "--internal-url",
                "http://x.*.y/",
            ],
            "whole first label",
        ),
    ] {
        let mut all = vec!["app", "create", "bad"];
        all.extend(args);
        let err = portico_fails(&s, &all).await;
        assert!(err.contains(says), "{all:?}: {err}");
    }
    s.stop().await;
}

/// A private CA and an https backend with a certificate it signed (for
/// `localhost`): its CA PEM, and the backend's address.
async fn private_ca_backend() -> (String, SocketAddr) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Private Test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![CertificateDer::from(leaf.der().to_vec())], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: http::Request<_>| async move {
                    let text = format!("private {}", req.uri().path());
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (ca_pem, addr)
}

/// Backend TLS validation with an app's own CA bundle: a backend whose
/// certificate a private CA signed fails validation (502
/// `BackendCertInvalid`) until `--backend-ca-file` gives that CA, and
/// again once `--no-backend-ca` removes it; `--no-validate-backend-tls`
/// still accepts it. Bundles with a key, without certificates, or too
/// large are refused with what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_bundle_lets_the_connector_validate_the_backend() {
    let s = Stack::start().await;
    let (ca_pem, addr) = private_ca_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca_path = ca_file.to_str().unwrap();
    let internal = format!("https://localhost:{}/", addr.port());
    let app = |json: String| serde_json::from_str::<portico_proto::api::App>(&json).unwrap();
    let created = app(portico(
        &s,
        &[
            "app",
            "create",
            "secure",
            "--internal-url",
            &internal,
            "--json",
        ],
    )
    .await);
    assert!(created.validate_backend_tls && created.backend_ca_sha256.is_none());
    let url = s.app_url("secure", "/page");
    let status_is = |want: u16| {
        let url = url.clone();
        let s = &s;
        async move {
            eventually(&format!("the app answers {want}"), HANG_GUARD, || async {
                let r = s.curl(&[&url]).await;
                (r.status == want).then_some(r)
            })
            .await
        }
    };
    let r = status_is(502).await;
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("BackendCertInvalid")
    );

    let with_ca = app(portico(
        &s,
        &[
            "app",
            "update",
            "secure",
            "--backend-ca-file",
            ca_path,
            "--json",
        ],
    )
    .await);
    let sha = with_ca.backend_ca_sha256.clone().expect("a bundle");
    assert_eq!(sha.len(), 64);
    let r = status_is(200).await;
    assert_eq!(r.text(), "private /page");

    portico(&s, &["app", "update", "secure", "--no-backend-ca"]).await;
    let r = status_is(502).await;
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("BackendCertInvalid")
    );
    let lax = app(portico(
        &s,
        &[
            "app",
            "update",
            "secure",
            "--no-validate-backend-tls",
            "--json",
        ],
    )
    .await);
    assert!(!lax.validate_backend_tls && lax.backend_ca_sha256.is_none());
    let r = status_is(200).await;
    assert_eq!(r.text(), "private /page");

    // Bad bundles: refused by the router (or the CLI, for size).
    let key_file = dir.path().join("with-key.pem");
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    std::fs::write(&key_file, format!("{ca_pem}{key}")).unwrap();
    let empty_file = dir.path().join("empty.pem");
    std::fs::write(&empty_file, "not a certificate\n").unwrap();
    let big_file = dir.path().join("big.pem");
    std::fs::write(&big_file, ca_pem.repeat(32 * 1024 / ca_pem.len() + 1)).unwrap();
    for (file, says) in [
        (&key_file, "private key"),
        (&empty_file, "no CERTIFICATE block found"),
        (&big_file, "may be at most 32768"),
    ] {
        let err = portico_fails(
            &s,
            &[
                "app",
                "update",
                "secure",
                "--backend-ca-file",
                file.to_str().unwrap(),
            ],
        )
        .await;
        assert!(err.contains(says), "{file:?}: {err}");
    }
    let kept = app(portico(&s, &["app", "show", "secure", "--json"]).await);
    assert_eq!(
        kept.backend_ca_sha256, None,
        "refused bundles change nothing"
    );
    s.stop().await;
}

/// Maintenance comes before sign-in: an app with `--preauth oidc` in
/// maintenance answers 503 `Maintenance` to a browser and to an API
/// client alike, instead of sending either to sign in; out of maintenance,
/// the browser is sent to the auth host and the API client gets 401. (The
/// router's provider is never contacted on either path, so none runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_comes_before_sign_in() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = tokio_util::sync::CancellationToken::new();
    let mut rc = portico_router::Config::new(d.join("router"));
    rc.listen = "127.0.0.1:0".parse().unwrap();
    rc.apps_domain = "apps.localhost".into();
    rc.sign_in = Some(portico_router::SignInConfig {
        issuer: "https://idp.invalid/".into(),
        client_id: "portico".into(),
        client_secret: "secret".into(),
        session_lifetime: Duration::from_secs(3600),
        session_idle_timeout: std::time::Duration::from_secs(3600),
        groups_claim: "groups".into(),
    });
    let router = portico_router::start(rc, root.child_token()).await.unwrap();
    let admin = common::router_admin(&router);
    let edge = common::start_edge(&router, &admin, &d.join("edge"), root.child_token(), |ec| {
        ec.http3 = false;
    })
    .await;
    let api = router.url();
    let cli = |args: &'static [&'static str]| {
        let api = api.clone();
        let dir = d.join("router");
        async move { admin_cli(&api, &dir, args).await }
    };
    cli(&[
        "app",
        "create",
        "hr",
        "--internal-url",
        "http://127.0.0.1:9/",
        "--preauth",
        "oidc",
        "--assign",
        "everyone",
        "--maintenance",
    ])
    .await;
    let ca = d.join("router/ca.pem");
    let url = format!("https://hr.apps.localhost:{}/", edge.public_addr.port());
    let browser = ["-H", "Accept: text/html"];
    let r = eventually("the edge has the app", HANG_GUARD, || async {
        let r = common::curl(&ca, &[browser[0], browser[1], &url]).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(r.header("x-portico-error").as_deref(), Some("Maintenance"));
    assert_eq!(r.header("location"), None);
    let r = common::curl(&ca, &[&url]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("www-authenticate"), None);

    cli(&["app", "update", "hr", "--no-maintenance"]).await;
    let r = eventually("maintenance ends", HANG_GUARD, || async {
        let r = common::curl(&ca, &[browser[0], browser[1], &url]).await;
        (r.status != 503).then_some(r)
    })
    .await;
    assert_eq!(r.status, 302);
    let to = url::Url::parse(&r.header("location").unwrap()).unwrap();
    assert_eq!(to.host_str(), Some("auth.apps.localhost"));
    let r = common::curl(&ca, &[&url]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("SignInRequired")
    );
    // A wildcard app cannot sign users in (sessions are bound to one host).
    let (ok, _, err) = admin_cli_result(
        &api,
        &d.join("router"),
        &[
            "app",
            "create",
            "corp",
            "--external-host",
            "*.corp.apps.localhost",
            "--internal-url",
            "http://127.0.0.1:9/",
            "--preauth",
            "oidc",
            "--assign",
            "everyone",
        ],
    )
    .await;
    assert!(!ok && err.contains("cannot sign users in yet"), "{err}");
    root.cancel();
}
