//! A real browser signs in: Debian's headless Chromium, driven over
//! WebDriver (chromedriver, with fantoccini), against the real OpenID
//! provider (`tests/idp`), through an edge, a connector and the demo
//! backend, all on loopback (Chromium resolves `*.localhost` to loopback
//! itself). scripts/test.sh installs `chromium` and `chromium-driver`; a
//! missing browser fails this test, it never skips.
//!
//! - The browser opens a page of app `hr` (`preauth = oidc`), is sent to
//!   the provider, fills in its login and consent forms, and lands on the
//!   page it asked for, served by the backend.
//! - curl with the browser's session cookie (read over WebDriver) gets the
//!   page too; curl without it is sent to sign in.
//! - A bearer token of the provider gets app `api`.
//! - My Apps (the auth host) shows exactly the apps alice is assigned to,
//!   and its link opens one.

mod common;
#[path = "idp/harness.rs"]
mod harness;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::curl;
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt as _;
use harness::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long one page may take to show what is waited for.
const PAGE: Duration = Duration::from_secs(15);

/// chromedriver on a free loopback port, and a session of headless
/// Chromium with its own profile in `profile`.
async fn browser(profile: &Path) -> (tokio::process::Child, Client) {
    for bin in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: install Debian's chromium and chromium-driver \
             (apt-get install chromium chromium-driver; scripts/test.sh does)"
        );
    }
    let port = free_tcp_port();
    let driver = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver runs");
    let caps = serde_json::json!({
        "browserName": "chrome",
        // The edge's certificate is from the deployment's own CA.
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--ignore-certificate-errors",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!("a JSON object")
    };
    let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    builder.capabilities(caps);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let client = loop {
        match builder.connect(&url).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no WebDriver session from chromedriver: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    (driver, client)
}

/// Fills in the rest of the provider's login form (the login is typed
/// already) and submits it.
async fn finish_login(client: &Client) {
    client
        .find(Locator::Css("input[name=password]"))
        .await
        .unwrap()
        .send_keys("any password")
        .await
        .unwrap();
    submit(client).await;
}

/// Submits the page's form.
async fn submit(client: &Client) {
    client
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Polls the browser's URL until it starts with `prefix`.
async fn wait_for_url(client: &Client, prefix: &str) -> url::Url {
    let deadline = tokio::time::Instant::now() + PAGE;
    loop {
        let url = client.current_url().await.unwrap();
        if url.as_str().starts_with(prefix) {
            return url;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser is at {url}, never at {prefix}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_signs_in_through_the_provider_and_curl_shares_its_session() {
    let s = setup_with(Options {
        consent: true,
        ..Options::default()
    })
    .await;
    let profile = tempfile::tempdir().unwrap();
    let (mut driver, client) = browser(profile.path()).await;
    // Whatever happens, the browser session ends (Chromium with it).
    let outcome = std::panic::AssertUnwindSafe(signs_in(&s, &client))
        .catch_unwind()
        .await;
    let _ = client.close().await;
    let _ = driver.kill().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn signs_in(s: &Setup, client: &Client) {
    let app = format!("https://hr.{DOMAIN}:{}", s.port);
    client.goto(&format!("{app}/?from=browser")).await.unwrap();

    // The provider's login form, then its consent form.
    let wait = || client.wait().at_most(PAGE);
    wait()
        .for_element(Locator::Css("input[name=login]"))
        .await
        .expect("the provider's login form")
        .send_keys("alice")
        .await
        .unwrap();
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .starts_with(&s.idp.issuer),
        "the login form is the provider's"
    );
    finish_login(client).await;
    wait()
        .for_element(Locator::Css("input[name=prompt][value=consent]"))
        .await
        .expect("the provider's consent form");
    submit(client).await;

    // Back on the page asked for, from the backend through the tunnel.
    let landed = wait_for_url(client, &format!("{app}/")).await;
    assert_eq!(landed.query(), Some("from=browser"), "{landed}");
    wait()
        .for_element(Locator::Css("h1"))
        .await
        .expect("the demo page");
    let page = client.source().await.unwrap();
    assert!(
        page.contains("Hello from behind the tunnel"),
        "not the backend's page: {page}"
    );
    assert!(
        !page.contains("portico-session"),
        "the backend saw the edge's cookie: {page}"
    );

    // The session cookie, as the browser keeps it.
    let cookie = client
        .get_named_cookie("__Host-portico-session")
        .await
        .expect("the browser has the session cookie");
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.path(), Some("/"));
    let session = format!("__Host-portico-session={}", cookie.value());

    // curl with the browser's cookie gets the app; without it, sign-in.
    let r = curl(
        &s.ca,
        &[
            "-H",
            "Accept: text/html",
            "-b",
            &session,
            &format!("{app}/headers"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(&format!("hr.{DOMAIN}")), "{}", r.text());
    let r = curl(
        &s.ca,
        &["-H", "Accept: text/html", &format!("{app}/headers")],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let to = r.header("location").unwrap_or_default();
    assert!(
        to.starts_with(&format!("https://auth.{DOMAIN}:{}/.portico/start?", s.port)),
        "{to}"
    );

    // A bearer token of the provider gets the API.
    let (access, _) = provider_tokens(s, "alice").await;
    let r = curl(
        &s.ca,
        &[
            "-H",
            &format!("Authorization: Bearer {access}"),
            &format!("https://api.{DOMAIN}:{}/v1/me", s.port),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.echo.count(), 1);

    // My Apps on the auth host: its own sign-in (the provider remembers
    // the browser), then exactly the apps alice is assigned to: hr and api
    // (everyone), payroll (group admins); not wiki (hidden).
    let portal = format!("https://auth.{DOMAIN}:{}/", s.port);
    client.goto(&portal).await.unwrap();
    let deadline = tokio::time::Instant::now() + PAGE;
    loop {
        let url = client.current_url().await.unwrap();
        if url.as_str() == portal && client.find(Locator::Css("h1")).await.is_ok() {
            break;
        }
        if let Ok(login) = client.find(Locator::Css("input[name=login]")).await {
            login.send_keys("alice").await.unwrap();
            finish_login(client).await;
        } else if client
            .find(Locator::Css("input[name=prompt][value=consent]"))
            .await
            .is_ok()
        {
            submit(client).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser is at {url}, never on My Apps"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut shown = Vec::new();
    for link in client.find_all(Locator::Css("a.app")).await.unwrap() {
        let id = link.attr("data-app").await.unwrap().unwrap_or_default();
        let href = link.attr("href").await.unwrap().unwrap_or_default();
        assert_eq!(href, format!("https://{id}.{DOMAIN}:{}/", s.port), "{id}");
        shown.push(id);
    }
    assert_eq!(
        shown,
        ["api", "hr", "payroll"],
        "My Apps shows exactly the assigned apps"
    );
    // Following a link opens the app with its own session.
    client
        .find(Locator::Css("a.app[data-app=hr]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_url(client, &format!("{app}/")).await;
    wait()
        .for_element(Locator::Css("h1"))
        .await
        .expect("the demo page from My Apps");
}
