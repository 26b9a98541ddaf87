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
//! - No session, and nothing at the backend, when the ID token the edge
//!   gets from the provider's token endpoint is crafted (the provider's
//!   test-only tamper hook, `OP_TEST_TAMPER`, rewrites it from the real
//!   one's claims): `alg: none`, wrong or slashed issuer, wrong or extra
//!   audience, expired, an unknown `kid`, another key under the real
//!   `kid`, a wrong or missing nonce, HS256 keyed with the public key or
//!   the client secret, a claim changed under the real signature. The
//!   same hook re-signing the real claims is taken, as the control. A
//!   replayed authorization code (the provider refuses it) and a callback
//!   without `state` give no session either.
//! - An API client's bearer token: a real JWT access token of the provider
//!   reaches the backend; crafted ones (`alg: none`, an unknown `kid`,
//!   another key, wrong issuer or audience, expired, not yet valid, HS256
//!   keyed with the public key, an ID token, garbage) get 401
//!   `invalid_token` and never reach it. The provider signs with a key the
//!   test made, so the test signs with it too and varies one claim at a
//!   time; the provider counts the edge's JWKS fetches.

mod common;
#[path = "idp/harness.rs"]
mod harness;

use common::curl;
use harness::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use portico_proto::api::{AppSpec, Assignment};
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
    // The error as JSON, for a client that asks, with the request's id.
    let body: serde_json::Value = serde_json::from_str(&api.text()).unwrap();
    assert_eq!(body["error"], "SignInRequired", "{body}");
    assert_eq!(
        body["request_id"].as_str(),
        api.header("x-portico-request-id").as_deref(),
        "{body}"
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

    let (other_key, _) = rsa_key(s.dir.path(), "other").await;
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

/// A sign-in to app `api` (the [`Echo`] backend) in a new cookie jar, as
/// `user`, up to the provider's redirect to the callback: (jar, callback
/// URL).
async fn to_the_callback(s: &Setup, user: &str) -> (tempfile::NamedTempFile, String) {
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar = jar_file.path();
    let r = hop(
        &s.ca,
        jar,
        &format!("https://api.{DOMAIN}:{}/", s.port),
        &[],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&s.ca, jar, &r.location, &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let callback = sign_in_at_provider(&s.ca, jar, &s.idp, &r.location, user).await;
    (jar_file, callback)
}

/// What a refused callback leaves: 400 `SignInFailed`, no session cookie
/// set or in the jar, and app `api` still sends this browser to sign in.
async fn no_session(s: &Setup, jar: &std::path::Path, r: &Hop, what: &str) {
    assert_eq!(r.status, 400, "{what}: {}", r.body);
    assert!(r.body.contains("SignInFailed"), "{what}: {}", r.body);
    assert_eq!(session_set_cookie(&r.set_cookie), None, "{what}");
    assert!(r.location.is_empty(), "{what}: {}", r.location);
    let kept = std::fs::read_to_string(jar).unwrap();
    assert!(!kept.contains("portico-session"), "{what}: {kept}");
    let again = hop(
        &s.ca,
        jar,
        &format!("https://api.{DOMAIN}:{}/", s.port),
        &[],
    )
    .await;
    assert_eq!(again.status, 302, "{what}: {}", again.body);
    assert!(
        again
            .location
            .starts_with(&format!("https://auth.{DOMAIN}:{}/.portico/start?", s.port)),
        "{what}: {}",
        again.location
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_id_tokens_a_replayed_code_and_a_callback_without_state_give_no_session() {
    let s = setup_with(Options {
        tamper: true,
        ..Options::default()
    })
    .await;
    let (ca, port) = (&s.ca, s.port);
    let api = format!("https://api.{DOMAIN}:{port}");

    // The control: the provider's tamper hook re-signs the real claims
    // with its key, and the edge takes that token. So each mode below is
    // refused for the one thing it changes, not for how it is made.
    let (jar_file, callback) = to_the_callback(&s, "alice").await;
    let jar = jar_file.path();
    s.idp.tamper("resign").await;
    let r = hop(ca, jar, &callback, &[]).await;
    assert_eq!(r.status, 302, "resign: {}", r.body);
    let r = hop(ca, jar, &r.location, &[]).await;
    assert_eq!(r.status, 302, "resign: {}", r.body);
    assert!(session_set_cookie(&r.set_cookie).is_some(), "resign");
    let r = hop(ca, jar, &format!("{api}/"), &[]).await;
    assert_eq!(r.status, 200, "resign: {}", r.body);
    assert_eq!(s.idp.tampered().await, (vec!["resign".to_owned()], None));
    let reached = s.echo.count();
    assert_eq!(reached, 1);

    // Each crafted ID token, as the edge gets it from the token endpoint
    // after a real sign-in at the provider: no session.
    let modes = [
        "alg_none",
        "wrong_iss",
        "iss_trailing_slash",
        "wrong_aud",
        "extra_aud",
        "expired",
        "unknown_kid",
        "other_key",
        "bad_nonce",
        "no_nonce",
        "hs256_pubkey",
        "hs256_client_secret",
        "swapped_sub",
    ];
    for (i, mode) in modes.iter().enumerate() {
        let (jar_file, callback) = to_the_callback(&s, "alice").await;
        let jar = jar_file.path();
        let exchanges = s.idp.requests("/token").await;
        s.idp.tamper(mode).await;
        let r = hop(ca, jar, &callback, &[]).await;
        // The edge exchanged the code, and got the crafted token.
        assert_eq!(s.idp.requests("/token").await, exchanges + 1, "{mode}");
        let (applied, pending) = s.idp.tampered().await;
        assert_eq!(applied.len(), i + 2, "{mode}: {applied:?}");
        assert_eq!(applied.last().map(String::as_str), Some(*mode));
        assert_eq!(pending, None, "{mode}");
        no_session(&s, jar, &r, mode).await;
    }
    assert_eq!(s.echo.count(), reached, "nothing reached the backend");

    // A callback without `state`: refused before any code exchange.
    let (jar_file, callback) = to_the_callback(&s, "alice").await;
    let jar = jar_file.path();
    let mut stateless = url::Url::parse(&callback).unwrap();
    let pairs: Vec<(String, String)> = stateless
        .query_pairs()
        .filter(|(k, _)| k != "state")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert!(pairs.iter().any(|(k, _)| k == "code"), "{callback}");
    stateless.query_pairs_mut().clear().extend_pairs(pairs);
    let exchanges = s.idp.requests("/token").await;
    let r = hop(ca, jar, stateless.as_str(), &[]).await;
    no_session(&s, jar, &r, "no state").await;
    assert_eq!(s.idp.requests("/token").await, exchanges, "no exchange");

    // A replayed callback: the first signs in; the same callback again,
    // with the flow cookie as it was (a copy of the jar), is refused by
    // the edge before the provider hears of it (which would refuse the
    // used code too).
    let (jar_file, callback) = to_the_callback(&s, "alice").await;
    let jar = jar_file.path();
    let replay_jar = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(jar, replay_jar.path()).unwrap();
    let r = hop(ca, jar, &callback, &[]).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(ca, jar, &r.location, &[]).await;
    assert!(session_set_cookie(&r.set_cookie).is_some(), "{}", r.body);
    let exchanges = s.idp.requests("/token").await;
    let r = hop(ca, replay_jar.path(), &callback, &[]).await;
    assert_eq!(s.idp.requests("/token").await, exchanges, "no exchange");
    no_session(&s, replay_jar.path(), &r, "replayed code").await;
    assert_eq!(s.idp.tampered().await.0.len(), modes.len() + 1);
    // The first sign-in's session still works.
    let r = hop(ca, jar, &format!("{api}/"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.echo.count(), reached + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_idle_and_each_request_extends_it() {
    // The router's --session-idle-timeout is 10 s here. The waits below
    // leave seconds of margin on each side (the edge counts whole
    // seconds); nothing measures how fast anything is.
    let idle = Duration::from_secs(10);
    let s = setup_with(Options {
        idle,
        ..Options::default()
    })
    .await;
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar = jar_file.path();
    let first = curl_sign_in(&s, jar, "alice").await;
    // Taken once the session exists, so a slow sign-in cannot leave its
    // cookie less idle than the waits below assume.
    let signed_in = tokio::time::Instant::now();
    let app = format!("https://hr.{DOMAIN}:{}", s.port);
    let before = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(jar, before.path()).unwrap();

    // A request 4 s on: the app, and the cookie written again.
    tokio::time::sleep_until(signed_in + Duration::from_secs(4)).await;
    let r = hop(&s.ca, jar, &format!("{app}/headers"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let renewed = session_set_cookie(&r.set_cookie)
        .expect("the session cookie is written again")
        .clone();
    assert_ne!(renewed, first);
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(renewed.contains(attr), "{renewed}");
    }
    assert!(!r.body.contains("portico-session"), "{}", r.body);

    // 11.5 s after the sign-in: the cookie of the sign-in has been idle
    // for more than 10 s, the renewed one for less.
    tokio::time::sleep_until(signed_in + idle + Duration::from_millis(1500)).await;
    let r = hop(&s.ca, before.path(), &format!("{app}/headers"), &[]).await;
    assert_eq!(r.status, 302, "idle for too long: sign in again");
    assert!(
        r.location
            .starts_with(&format!("https://auth.{DOMAIN}:{}/.portico/start?", s.port)),
        "{}",
        r.location
    );
    let api = curl(
        &s.ca,
        &[
            "-b",
            before.path().to_str().unwrap(),
            "-H",
            "Accept: application/json",
            &format!("{app}/headers"),
        ],
    )
    .await;
    assert_eq!(api.status, 401);
    let r = hop(&s.ca, jar, &format!("{app}/headers"), &[]).await;
    assert_eq!(r.status, 200, "the renewed session: {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_session_cookie_can_be_persistent_and_readable_by_scripts() {
    let s = setup().await;
    let router_dir = s.dir.path().join("router");
    let update = |args: &'static [&'static str]| {
        let (url, dir) = (s.router_url.clone(), router_dir.clone());
        async move {
            let mut all = vec!["app", "update", "hr"];
            all.extend_from_slice(args);
            common::admin_cli(&url, &dir, &all).await
        }
    };
    let out = update(&["--no-http-only", "--persistent"]).await;
    assert!(
        out.contains("session cookie http only") && out.contains("false"),
        "{out}"
    );
    let c = cookie_when(&s, |c| !c.contains("HttpOnly")).await;
    for attr in ["Secure", "SameSite=Lax", "Path=/"] {
        assert!(c.contains(attr), "{c}");
    }
    // Persistent: Max-Age is what is left of the 1 h lifetime.
    let max_age: u64 = c
        .split("; ")
        .find_map(|a| a.strip_prefix("Max-Age="))
        .unwrap_or_else(|| panic!("persistent: {c}"))
        .parse()
        .unwrap();
    assert!((3500..=3600).contains(&max_age), "{c}");

    // And back to the defaults.
    update(&["--http-only", "--no-persistent"]).await;
    let c = cookie_when(&s, |c| c.contains("HttpOnly")).await;
    assert!(!c.contains("Max-Age"), "a browser session's cookie: {c}");
}

/// Signs in (each time as a new browser) until the edge's session cookie
/// matches `ready`: the edge follows an app's update shortly after.
async fn cookie_when(s: &Setup, ready: fn(&str) -> bool) -> String {
    common::eventually("the edge to follow the app's settings", LIMIT, || async {
        let jar = tempfile::NamedTempFile::new().unwrap();
        let c = curl_sign_in(s, jar.path(), "bob").await;
        ready(&c).then_some(c)
    })
    .await
}

/// A browser (a cookie jar) signed in as `user` at `app` (`https://host:port`).
async fn signed_in(s: &Setup, app: &str, user: &str) -> tempfile::NamedTempFile {
    signed_in_at(&s.ca, &s.idp, app, &[], user).await
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
    for (user, want) in [
        ("alice", vec!["api", "hr", "payroll"]),
        ("bob", vec!["api", "hr"]),
    ] {
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
        let hr = list.iter().find(|e| e["id"] == "hr").unwrap();
        assert_eq!(
            hr["url"],
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
    let (idp, _, router) = idp_and_router(&d, port, &root, &Options::default()).await;
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
        assignment: Assignment {
            groups: vec!["devs".into()],
            ..Default::default()
        },
        identity_headers: [("X-Remote-User", "email"), ("X-Remote-Groups", "groups")]
            .into_iter()
            .map(|(h, c)| (h.to_owned(), c.to_owned()))
            .collect(),
        ..oidc_app("hr", &format!("http://{}/", demo.addr), &group)
    };
    let _: portico_proto::api::App = admin.post_json("/v1/apps", &spec).await.unwrap();
    let connector = common::start_connector(
        &router,
        &admin,
        &d.join("connector"),
        group,
        1,
        root.child_token(),
    )
    .await;

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
    // ...and at edge B of region default, through the mesh to A (once B
    // has learnt from the router that A holds the group's tunnels), with
    // the same identity headers and a verifiable assertion.
    let via_b_args = args(&via_b);
    let r = common::eventually("edge B to forward to A", LIMIT, || async {
        let r = curl(
            &ca,
            &[
                &["-b", jar.to_str().unwrap(), "-H", "X-Remote-User: root"][..],
                &via_b_args[..],
                &[url.as_str()][..],
            ]
            .concat(),
        )
        .await;
        match r.status {
            200 => Some(r),
            502 if r.text().contains("ConnectorNotFound") => None,
            other => panic!("edge B answered {other}: {}", r.text()),
        }
    })
    .await;
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

/// Two edges of one region (127.0.0.1 and 127.0.0.2, one port), both
/// holding tunnels of the app's connector: a handoff code gives one
/// session at one edge only, and signing out at one edge ends the session
/// at the other (through the router) while another session of the same
/// user stays; the same for My Apps on the auth host. An admin's
/// `session revoke` ends every session of the user at both edges, and a
/// new sign-in works. A restarted edge that cannot reach the router
/// refuses all of them from its saved snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_at_one_edge_ends_the_session_at_every_edge_and_a_handoff_code_works_once_anywhere(
) {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_owned();
    let root = tokio_util::sync::CancellationToken::new();
    let port = free_tcp_port();
    let (idp, _, router) = idp_and_router(&d, port, &root, &Options::default()).await;
    let ca = d.join("router/ca.pem");
    let admin = common::router_admin(&router);
    let mut edges = Vec::new();
    let a_stop = root.child_token();
    for (name, ip, stop) in [
        ("edge-a", [127, 0, 0, 1], a_stop.clone()),
        ("edge-b", [127, 0, 0, 2], root.child_token()),
    ] {
        let ip = std::net::IpAddr::from(ip);
        edges.push(
            common::start_edge(&router, &admin, &d.join(name), stop, |ec| {
                ec.public_listen = SocketAddr::new(ip, port);
                ec.tunnel_listen = SocketAddr::new(ip, 0);
                ec.mesh_listen = Some(SocketAddr::new(ip, 0));
                ec.http3 = false;
            })
            .await,
        );
    }
    let demo = portico::demo::start("127.0.0.1:0".parse().unwrap(), root.child_token())
        .await
        .unwrap();
    let group = portico_proto::GroupId::default_group();
    let spec = oidc_app("hr", &format!("http://{}/", demo.addr), &group);
    let _: portico_proto::api::App = admin.post_json("/v1/apps", &spec).await.unwrap();
    let connector = common::start_connector(
        &router,
        &admin,
        &d.join("connector"),
        group,
        2,
        root.child_token(),
    )
    .await;

    let hr = format!("https://hr.{DOMAIN}:{port}");
    let auth = format!("https://auth.{DOMAIN}:{port}");
    let resolve = |last: u8| -> Vec<String> {
        ["hr", "auth"]
            .iter()
            .flat_map(|h| {
                [
                    "--resolve".to_owned(),
                    format!("{h}.{DOMAIN}:{port}:127.0.0.{last}"),
                ]
            })
            .collect()
    };
    let (a, b) = (resolve(1), resolve(2));
    fn at(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let (at_a, at_b) = (at(&a), at(&b));
    let get = |jar: &std::path::Path, url: &str, via: &[&str]| {
        let jar = jar.to_str().unwrap().to_owned();
        let mut args: Vec<String> = vec!["-b".into(), jar, "-H".into(), "Accept: text/html".into()];
        args.extend(via.iter().map(|s| s.to_string()));
        args.push(url.to_owned());
        let ca = ca.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&ca, &args).await
        }
    };

    // Alice signs in at edge A, up to the handoff code.
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar = jar_file.path();
    let r = hop(&ca, jar, &format!("{hr}/"), &at_a).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&ca, jar, &r.location, &at_a).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let callback = sign_in_at_provider(&ca, jar, &idp, &r.location, "alice").await;
    let r = hop(&ca, jar, &callback, &at_a).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let handoff = r.location.clone();
    // The code becomes a session at A...
    let r = hop(&ca, jar, &handoff, &at_a).await;
    assert_eq!(r.status, 302, "{}", r.body);
    assert!(r
        .set_cookie
        .iter()
        .any(|c| c.starts_with("__Host-portico-session=")));
    // ...and, copied to another browser at edge B (which never saw it),
    // into none: the router knows A used it.
    let thief = tempfile::NamedTempFile::new().unwrap();
    let r = hop(&ca, thief.path(), &handoff, &at_b).await;
    assert_eq!(r.status, 400, "a used code at another edge: {}", r.body);
    assert!(r.body.contains("SignInFailed"), "{}", r.body);
    assert!(r.set_cookie.iter().all(|c| !c.contains("portico-session")));

    // The session works at both edges (an edge without a tunnel forwards
    // once it knows where they are).
    for via in [&at_a, &at_b] {
        common::eventually("the session to work at both edges", LIMIT, || async {
            let r = get(jar, &format!("{hr}/"), via).await;
            match r.status {
                200 => Some(()),
                502 if r.text().contains("ConnectorNotFound") => None,
                other => panic!("answered {other}: {}", r.text()),
            }
        })
        .await;
    }
    // A second session of alice's (another browser), to stay signed in.
    let other = signed_in_at(&ca, &idp, &hr, &at_a, "alice").await;

    // The first browser's cookie, kept as someone who signed_out it would.
    let signed_out = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(jar, signed_out.path()).unwrap();
    // Signed out at B: the cookie goes...
    let r = hop(&ca, jar, &format!("{hr}/.portico/sign_out"), &at_b).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // ...and the copy is refused at B at once, and at A once the router's
    // change reaches it: to sign-in, no stream.
    let r = get(signed_out.path(), &format!("{hr}/"), &at_b).await;
    assert_eq!(r.status, 302, "signed out at B, at B: {}", r.text());
    common::eventually("edge A to learn of the sign-out", LIMIT, || async {
        let r = get(signed_out.path(), &format!("{hr}/"), &at_a).await;
        match r.status {
            302 => Some(()),
            200 => None,
            other => panic!("edge A answered {other}: {}", r.text()),
        }
    })
    .await;
    // The other session is not touched, at either edge.
    for via in [&at_a, &at_b] {
        let r = get(other.path(), &format!("{hr}/"), via).await;
        assert_eq!(r.status, 200, "alice's other session: {}", r.text());
    }

    // My Apps: signed in at A's auth host, signed out at B's, refused at A.
    let portal_file = tempfile::NamedTempFile::new().unwrap();
    let portal = portal_file.path();
    let r = hop(&ca, portal, &format!("{auth}/"), &at_a).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = hop(&ca, portal, &format!("{auth}{}", r.location), &at_a).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let callback = sign_in_at_provider(&ca, portal, &idp, &r.location, "alice").await;
    let r = hop(&ca, portal, &callback, &at_a).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let r = get(portal, &format!("{auth}/"), &at_a).await;
    assert_eq!(r.status, 200, "My Apps: {}", r.text());
    let copied = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(portal, copied.path()).unwrap();
    let r = hop(&ca, portal, &format!("{auth}/.portico/sign_out"), &at_b).await;
    assert_eq!(r.status, 200, "{}", r.body);
    common::eventually("edge A to learn of the My Apps sign-out", LIMIT, || async {
        let r = get(copied.path(), &format!("{auth}/"), &at_a).await;
        match r.status {
            302 => Some(()),
            200 => None,
            other => panic!("edge A answered {other}: {}", r.text()),
        }
    })
    .await;
    // An admin signs alice out of every session (by her verified email,
    // in another case): her other browser is refused at both edges...
    let router_dir = d.join("router");
    let out = common::admin_cli(
        &router.url(),
        &router_dir,
        &["session", "revoke", "Alice@Example.test"],
    )
    .await;
    assert!(
        out.contains("Alice@Example.test") && out.contains("at every edge"),
        "{out}"
    );
    let out = common::admin_cli(
        &router.url(),
        &router_dir,
        &["session", "revoke", "Alice@Example.test", "--json"],
    )
    .await;
    let done: portico_proto::api::SessionsRevoked = serde_json::from_str(&out).unwrap();
    for via in [&at_a, &at_b] {
        common::eventually("the edges to learn alice is signed out", LIMIT, || async {
            let r = get(other.path(), &format!("{hr}/"), via).await;
            match r.status {
                302 => Some(()),
                200 => None,
                other => panic!("answered {other}: {}", r.text()),
            }
        })
        .await;
    }
    // ...and she can sign in again afterwards (sessions are cut by their
    // sign-in second).
    common::eventually("the clock to pass the cut", LIMIT, || async {
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            > done.before)
            .then_some(())
    })
    .await;
    let again = signed_in_at(&ca, &idp, &hr, &at_a, "alice").await;
    let r = get(again.path(), &format!("{hr}/"), &at_b).await;
    assert_eq!(r.status, 200, "alice signed in again: {}", r.text());
    let (revoked, other) = (other, again);

    // Edge A restarted while it cannot reach the router: its saved
    // snapshot holds the sign-out (the configs brought only a delta).
    a_stop.cancel();
    let old_a = edges.remove(0);
    tokio::time::timeout(LIMIT, old_a.wait())
        .await
        .expect("edge A stops")
        .unwrap();
    let mut ec = portico_edge::Config::new("https://127.0.0.1:9", d.join("edge-a"));
    ec.public_listen = SocketAddr::from(([127, 0, 0, 1], port));
    ec.tunnel_listen = "127.0.0.1:0".parse().unwrap();
    ec.metrics_listen = None;
    ec.http3 = false;
    let restarted = portico_edge::start(ec, root.child_token()).await.unwrap();
    restarted.ready().await;
    let r = get(signed_out.path(), &format!("{hr}/"), &at_a).await;
    assert_eq!(r.status, 302, "signed out, after a restart: {}", r.text());
    let r = get(revoked.path(), &format!("{hr}/"), &at_a).await;
    assert_eq!(
        r.status,
        302,
        "revoked by the admin, after a restart: {}",
        r.text()
    );
    let r = get(other.path(), &format!("{hr}/"), &at_a).await;
    assert_ne!(
        r.status,
        302,
        "the other session, after a restart: {}",
        r.text()
    );
    drop(restarted);
    drop((connector, edges));
    root.cancel();
}

/// A browser (a cookie jar) signed in as `user` at `app` through the edge
/// that `via` resolves to.
async fn signed_in_at(
    ca: &std::path::Path,
    idp: &Idp,
    app: &str,
    via: &[&str],
    user: &str,
) -> tempfile::NamedTempFile {
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar = jar_file.path();
    let r = hop(ca, jar, &format!("{app}/"), via).await;
    assert_eq!(r.status, 302, "{app}: {}", r.body);
    let r = hop(ca, jar, &r.location, via).await;
    assert_eq!(r.status, 302, "start: {}", r.body);
    let callback = sign_in_at_provider(ca, jar, idp, &r.location, user).await;
    let r = hop(ca, jar, &callback, via).await;
    assert_eq!(r.status, 302, "callback: {}", r.body);
    let r = hop(ca, jar, &r.location, via).await;
    assert_eq!(r.status, 302, "handoff: {}", r.body);
    jar_file
}

/// Starts a sign-in at `app` (`https://host:port`, or the auth host for
/// My Apps) in a new browser: the browser (its cookie jar), the provider's
/// authorization URL, and the client id it names.
async fn start_sign_in(s: &Setup, app: &str) -> (tempfile::NamedTempFile, String, String) {
    let jar = tempfile::NamedTempFile::new().unwrap();
    let mut url = format!("{app}/");
    // The app's host sends the browser to the auth host, which sends it
    // to the provider (My Apps' start is on the auth host itself).
    for _ in 0..2 {
        let r = hop(&s.ca, jar.path(), &url, &[]).await;
        assert_eq!(r.status, 302, "{url}: {}", r.body);
        url = absolute(&url, &r.location);
        if url.starts_with(&s.idp.issuer) {
            break;
        }
    }
    assert!(url.starts_with(&s.idp.issuer), "{url}");
    let client_id = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "client_id")
        .map(|(_, v)| v.into_owned())
        .expect("the authorization request names its client");
    (jar, url, client_id)
}

/// The rest of a sign-in [`start_sign_in`] began, as `user`: the
/// provider's login, the callback, the handoff; then `app`'s root answers.
async fn finish_sign_in(s: &Setup, jar: &Path, auth_url: &str, app: &str, user: &str) {
    let callback = sign_in_at_provider(&s.ca, jar, &s.idp, auth_url, user).await;
    let r = hop(&s.ca, jar, &callback, &[]).await;
    assert_eq!(r.status, 302, "callback: {}", r.body);
    let r = hop(&s.ca, jar, &r.location, &[]).await;
    assert_eq!(r.status, 302, "handoff: {}", r.body);
    assert!(
        session_set_cookie(&r.set_cookie).is_some(),
        "{:?}",
        r.set_cookie
    );
    let r = hop(&s.ca, jar, &format!("{app}/"), &[]).await;
    assert_eq!(r.status, 200, "{app} signed in: {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_with_its_own_oidc_client_signs_in_through_it_and_the_others_keep_the_deployments() {
    let s = setup().await;
    let router_dir = s.dir.path().join("router");
    let secret_file = s.dir.path().join("own-client-secret");
    std::fs::write(&secret_file, format!("{OWN_SECRET}\n")).unwrap();
    let secret_path = secret_file.to_str().unwrap();
    let hr = format!("https://hr.{DOMAIN}:{}", s.port);
    let api = format!("https://api.{DOMAIN}:{}", s.port);

    // Refused on an app that does not sign users in, with the way out.
    let (ok, out, err) = common::admin_cli_result(
        &s.router_url,
        &router_dir,
        &[
            "app",
            "create",
            "open",
            "--internal-url",
            "http://127.0.0.1:9/",
            "--oidc-client-id",
            OWN_CLIENT,
            "--oidc-client-secret-file",
            secret_path,
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("does not sign users in") && err.contains("--preauth oidc"),
        "{err}"
    );

    // hr gets its own client; the secret is never shown again.
    let out = common::admin_cli(
        &s.router_url,
        &router_dir,
        &[
            "app",
            "update",
            "hr",
            "--oidc-client-id",
            OWN_CLIENT,
            "--oidc-client-secret-file",
            secret_path,
        ],
    )
    .await;
    let own = format!("{OWN_CLIENT} (the app's own; secret set)");
    assert!(out.contains(&own) && !out.contains(OWN_SECRET), "{out}");
    for args in [
        &["app", "show", "hr"][..],
        &["app", "list"],
        &["app", "list", "--json"],
    ] {
        let out = common::admin_cli(&s.router_url, &router_dir, args).await;
        assert!(!out.contains(OWN_SECRET), "{args:?}: {out}");
    }
    // `app list`: hr's client in the CLIENT column (the table is
    // aligned), none for api.
    let table = common::admin_cli(&s.router_url, &router_dir, &["app", "list"]).await;
    let column = table
        .lines()
        .next()
        .and_then(|h| h.find(" CLIENT ").map(|at| at + 1))
        .unwrap_or_else(|| panic!("a CLIENT column: {table}"));
    let client_of = |app: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{app} ")))
            .and_then(|l| l.get(column..))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{app}: {table}"))
            .to_owned()
    };
    assert_eq!(
        (client_of("hr"), client_of("api")),
        (OWN_CLIENT.into(), "-".into())
    );
    let listed: serde_json::Value = s.admin.get_json("/v1/apps").await.unwrap();
    let listed = listed.to_string();
    assert!(
        listed.contains(OWN_CLIENT) && !listed.contains(OWN_SECRET),
        "{listed}"
    );

    // Once the edge follows, hr's authorization request names its client,
    // and the provider accepts it.
    let (jar, auth_url) =
        common::eventually("hr's sign-in to use its own client", LIMIT, || async {
            let (jar, url, client_id) = start_sign_in(&s, &hr).await;
            (client_id == OWN_CLIENT).then_some((jar, url))
        })
        .await;
    let exchanged = s.idp.client_use("token", OWN_CLIENT).await;
    finish_sign_in(&s, jar.path(), &auth_url, &hr, "alice").await;
    assert!(s.idp.client_use("authorization", OWN_CLIENT).await >= 1);
    assert_eq!(
        s.idp.client_use("token", OWN_CLIENT).await,
        exchanged + 1,
        "the code was exchanged as the app's client"
    );

    // api, without a client of its own, and My Apps keep the deployment's.
    let exchanged = s.idp.client_use("token", "portico").await;
    let (jar, auth_url, client_id) = start_sign_in(&s, &api).await;
    assert_eq!(client_id, "portico");
    finish_sign_in(&s, jar.path(), &auth_url, &api, "alice").await;
    assert_eq!(s.idp.client_use("token", "portico").await, exchanged + 1);
    let (_, _, client_id) = start_sign_in(&s, &format!("https://auth.{DOMAIN}:{}", s.port)).await;
    assert_eq!(client_id, "portico", "My Apps");

    // A sign-in begun with hr's own client does not end with another:
    // back to the deployment's client meanwhile, its callback is refused.
    let (pending, pending_url, client_id) = start_sign_in(&s, &hr).await;
    assert_eq!(client_id, OWN_CLIENT);
    let out = common::admin_cli(
        &s.router_url,
        &router_dir,
        &["app", "update", "hr", "--no-oidc-client"],
    )
    .await;
    assert!(
        out.contains("the deployment's") && !out.contains(OWN_CLIENT),
        "{out}"
    );
    let (jar, auth_url) = common::eventually(
        "hr's sign-in to use the deployment's client",
        LIMIT,
        || async {
            let (jar, url, client_id) = start_sign_in(&s, &hr).await;
            (client_id == "portico").then_some((jar, url))
        },
    )
    .await;
    let callback = sign_in_at_provider(&s.ca, pending.path(), &s.idp, &pending_url, "alice").await;
    let r = hop(&s.ca, pending.path(), &callback, &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("SignInFailed"), "{}", r.body);
    assert!(session_set_cookie(&r.set_cookie).is_none());
    // A new one signs in through the deployment's client.
    finish_sign_in(&s, jar.path(), &auth_url, &hr, "bob").await;
}
