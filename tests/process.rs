//! The real `portico` binary as a separate process: a connector killed with
//! SIGKILL, then restarted from its state directory with no token; and the
//! admin CLI against a running router.

mod common;

use std::time::Duration;

use common::{eventually, Child, Stack, BIN};
use portico::dev::create_token;
use portico_proto::api::{CreateGroup, Group, TokenScope};
use portico_proto::GroupId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connector_gives_connector_not_found_and_comes_back_from_its_state() {
    let s = Stack::start().await;
    let _: Group =
        s.d.admin
            .post_json(
                "/v1/groups",
                &CreateGroup {
                    id: GroupId::new("proc").unwrap(),
                    region: None,
                },
            )
            .await
            .unwrap();
    // A short backend timeout: even so, a frozen connector is found dead
    // (the edge's 3 s dead time) before the app's timeout plus the edge's
    // grace (6 s) would end its request as ConnectorTimeout.
    let _: portico_proto::api::App =
        s.d.admin
            .post_json(
                "/v1/apps",
                &portico_proto::api::AppSpec {
                    connector_group: GroupId::new("proc").unwrap(),
                    backend_timeout: portico_proto::api::BackendTimeout::Seconds(1),
                    ..portico_proto::api::AppSpec::new(
                        portico_proto::AppId::new("proc").unwrap(),
                        format!("http://{}/", s.d.demo.addr),
                    )
                },
            )
            .await
            .unwrap();
    let token = create_token(
        &s.d.admin,
        TokenScope::Connector {
            group: GroupId::new("proc").unwrap(),
        },
    )
    .await
    .unwrap();
    let state = s.dir.path().join("proc-connector");
    let router = s.d.router.url();
    let args = [
        "connector",
        "--router",
        &router,
        "--state",
        state.to_str().unwrap(),
        "--tunnels",
        "1",
    ];
    // The first process runs on one thread (`--threads 1`, a current-thread
    // runtime), the restarted one on the default multi-thread runtime:
    // both must serve, time out and log alike.
    let mut with_token = args.to_vec();
    with_token.extend(["--token", &token, "--threads", "1"]);

    let mut child = Child::spawn(&with_token);
    let url = s.app_url("proc", "/headers");
    let served = |expect: u16| {
        let s = &s;
        let url = url.clone();
        async move {
            let r = s.curl(&["--max-time", "60", &url]).await;
            (r.status == expect).then_some(r)
        }
    };
    let r = eventually(
        "the process connector serves",
        Duration::from_secs(30),
        || served(200),
    )
    .await;
    let request_id = r.header("x-portico-request-id").unwrap();
    let connector_id = listening(&child, "connector").await;
    // The request id the edge gave the user is in the connector's log line.
    eventually(
        "the connector logs the request id",
        Duration::from_secs(10),
        || async { child.output().contains(&request_id).then_some(()) },
    )
    .await;

    // Frozen (SIGSTOP): it answers no pings, so the edge closes its tunnel
    // after the dead time and says ConnectorNotFound, long before QUIC's
    // idle timeout.
    let pid = child.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let r = s.curl(&["--max-time", "60", &url]).await;
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("ConnectorNotFound")
    );
    // Thawed, it finds that tunnel closed and dials a new one.
    eventually(
        "the thawed connector serves",
        Duration::from_secs(30),
        || served(200),
    )
    .await;

    child.kill().await;
    // Not a hang: the edge notices the dead tunnel and says so.
    let r = eventually(
        "ConnectorNotFound after SIGKILL",
        Duration::from_secs(90),
        || served(502),
    )
    .await;
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("ConnectorNotFound"),
        "{}",
        r.text()
    );
    // `connector list` follows the edge's report: once the edge has
    // dropped the dead tunnel, the connector is inactive.
    eventually(
        "the killed connector is listed inactive",
        Duration::from_secs(60),
        || async {
            let (ok, out, _) = cli(&s, &["connector", "list", "--json"]).await;
            assert!(ok, "{out}");
            let list: Vec<portico_proto::api::Connector> = serde_json::from_str(&out).unwrap();
            let c = list.iter().find(|c| c.id.as_str() == connector_id)?;
            (c.status == portico_proto::api::Status::Inactive && c.edges.is_empty()).then_some(())
        },
    )
    .await;

    // Same state directory, no token: it serves again.
    let child = Child::spawn(&args);
    eventually(
        "the restarted connector serves",
        Duration::from_secs(30),
        || served(200),
    )
    .await;
    assert!(
        !child.output().contains("enrolled"),
        "no second enrollment:\n{}",
        child.output()
    );
    drop(child);
    s.stop().await;
}

/// A connector that asks for more tunnels than an edge allows one
/// connector (17 against the default cap of 16) gets 16; the edge refuses
/// the 17th at `Hello` and counts it, and the connector says so in its log
/// and waits long (15 to 30 s, read from the log line) before that slot
/// tries again, rather than redialing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_over_the_edges_tunnel_cap_is_refused_and_waits() {
    let s = Stack::start().await;
    let token = create_token(
        &s.d.admin,
        TokenScope::Connector {
            group: GroupId::default_group(),
        },
    )
    .await
    .unwrap();
    let state = s.dir.path().join("greedy-connector");
    let router = s.d.router.url();
    let mut child = Child::spawn(&[
        "connector",
        "--router",
        &router,
        "--state",
        state.to_str().unwrap(),
        "--token",
        &token,
        "--tunnels",
        "17",
    ]);
    let line = child
        .line_containing("the edge refused this tunnel", Duration::from_secs(60))
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("16 tunnels") && line.contains("max_tunnels_per_connector"),
        "the edge's reason names the cap: {line}"
    );
    let retry_in: f64 = Child::field(&line, "retry_in")
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry_in=...s in {line}"));
    assert!((15.0..=30.0).contains(&retry_in), "{line}");
    // The Stack's own connector holds 2; this one its 16.
    eventually(
        "18 tunnels at the edge",
        Duration::from_secs(60),
        || async {
            let m = s.edge_metrics().await;
            (common::metric_value(&m, "portico_edge_tunnels") == 18.0).then_some(m)
        },
    )
    .await;
    let m = s.edge_metrics().await;
    assert_eq!(
        common::metric_value(
            &m,
            "portico_edge_tunnel_closes_total{reason=\"too_many_tunnels\"}"
        ),
        1.0,
        "one refusal, then the slot waits"
    );
    drop(child);
    s.stop().await;
}

async fn cli(s: &Stack, args: &[&str]) -> (bool, String, String) {
    let router_dir = s.dir.path().join("router");
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env("PORTICO_ROUTER", s.d.router.url())
        .env("PORTICO_ROUTER_CA", router_dir.join("ca.pem"))
        .env("PORTICO_ADMIN_TOKEN_FILE", router_dir.join("admin-token"))
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_drives_the_router() {
    let s = Stack::start().await;
    let (ok, out, err) = cli(
        &s,
        &[
            "app",
            "create",
            "wiki",
            "--internal-url",
            &format!("http://{}/", s.d.demo.addr),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("wiki.apps.localhost"), "{out}");
    let (ok, out, _) = cli(&s, &["app", "list", "--json"]).await;
    assert!(ok);
    let apps: Vec<portico_proto::api::App> = serde_json::from_str(&out).unwrap();
    assert!(apps.iter().any(|a| a.id.as_str() == "wiki"));
    let (ok, out, err) = cli(
        &s,
        &["app", "create", "bad", "--internal-url", "gopher://x"],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("internal_url"),
        "the error names the field: {err}"
    );

    let (ok, out, _) = cli(&s, &["group", "create", "ops"]).await;
    assert!(ok, "{out}");
    let (ok, out, _) = cli(&s, &["group", "list"]).await;
    assert!(
        ok && out.contains("ops") && out.contains("Default"),
        "{out}"
    );
    let (ok, token, err) = cli(&s, &["token", "create", "--group", "ops"]).await;
    assert!(ok, "{err}");
    assert!(
        token
            .trim()
            .parse::<portico_proto::api::JoinToken>()
            .is_ok(),
        "{token}"
    );
    let (ok, _, err) = cli(&s, &["group", "delete", "Default"]).await;
    assert!(!ok && err.contains("409"), "{err}");

    let (ok, out, _) = cli(&s, &["connector", "list", "--json"]).await;
    assert!(ok);
    let list: Vec<portico_proto::api::Connector> = serde_json::from_str(&out).unwrap();
    assert!(list.iter().any(|c| c.id == s.d.connector.id));
    let (ok, out, _) = cli(&s, &["edge", "list"]).await;
    assert!(ok && out.contains(s.d.edge.id.as_str()), "{out}");

    // --help explains every command.
    for cmd in [
        vec!["--help"],
        vec!["dev", "--help"],
        vec!["connector", "--help"],
        vec!["app", "create", "--help"],
    ] {
        let (ok, out, _) = cli(&s, &cmd).await;
        assert!(ok && out.contains("Usage"), "{cmd:?}: {out}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_publishes_an_app_that_requires_features() {
    let s = Stack::start().await;
    let url = format!("http://{}/", s.d.demo.addr);
    let (ok, out, err) = cli(
        &s,
        &[
            "app",
            "create",
            "feat",
            "--internal-url",
            &url,
            "--require-feature",
            "sign-in",
            "--require-feature",
            "mesh",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        shown(&out, "required features").as_deref(),
        Some("sign-in,mesh"),
        "{out}"
    );
    let (ok, out, _) = cli(&s, &["app", "show", "feat", "--json"]).await;
    assert!(ok, "{out}");
    let app: portico_proto::api::App = serde_json::from_str(&out).unwrap();
    assert_eq!(app.required_features, ["sign-in", "mesh"]);
    let (ok, out, _) = cli(&s, &["app", "list"]).await;
    assert!(ok);
    let header = out.lines().next().unwrap();
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(columns[columns.len() - 2..], ["FEATURES", "CERT"], "{out}");
    let row = out.lines().find(|l| l.starts_with("feat ")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // No uploaded certificate covers it: the edges' own, shown as `-`.
    assert_eq!(cells[cells.len() - 1], "-", "{out}");
    assert_eq!(cells[cells.len() - 2], "sign-in,mesh", "{out}");
    assert_eq!(cells[cells.len() - 3], "headers", "the defaults: {out}");

    // A bad name is refused by the router, named, and printed once.
    let (ok, out, err) = cli(
        &s,
        &[
            "app",
            "create",
            "bad",
            "--internal-url",
            &url,
            "--require-feature",
            "Sign_In",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(err.contains("required_features"), "{err}");
    assert_eq!(err.matches("may only contain").count(), 1, "{err}");
    let (ok, _, _) = cli(&s, &["app", "show", "bad"]).await;
    assert!(!ok, "nothing was created");
    s.stop().await;
}

/// The value of `key` in a `key  value` line of `app show`-style output.
fn shown(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_updates_an_app_and_users_see_the_change() {
    let s = Stack::start().await;
    // Published at a port nothing listens on: the backend is unreachable.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/", dead.local_addr().unwrap());
    drop(dead);
    let (ok, _, err) = cli(&s, &["app", "create", "upd", "--internal-url", &dead_url]).await;
    assert!(ok, "{err}");
    let url = s.app_url("upd", "/headers");
    let r = s.curl(&[&url]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("BackendUnreachable")
    );

    // Point it at the demo backend, and change every other field too.
    let demo = format!("HTTP://{}", s.d.demo.addr);
    let (ok, out, err) = cli(
        &s,
        &[
            "app",
            "update",
            "upd",
            "--internal-url",
            &demo,
            "--backend-timeout",
            "long",
            "--no-validate-backend-tls",
            "--no-translate-headers",
            "--translate-body",
            "--require-feature",
            "x-test",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        shown(&out, "internal url"),
        Some(format!("http://{}/", s.d.demo.addr)),
        "stored in canonical form: {out}"
    );
    assert_eq!(shown(&out, "backend timeout").as_deref(), Some("long"));
    assert_eq!(
        shown(&out, "validate backend tls").as_deref(),
        Some("false")
    );
    assert_eq!(shown(&out, "required features").as_deref(), Some("x-test"));
    assert_eq!(shown(&out, "translate headers").as_deref(), Some("false"));
    assert_eq!(shown(&out, "translate body").as_deref(), Some("true"));
    // The required feature is the edge's to judge; clear it so that this
    // edge serves the app whatever it knows.
    let (ok, out, err) = cli(
        &s,
        &["app", "update", "upd", "--no-required-features", "--json"],
    )
    .await;
    assert!(ok, "{err}");
    let app: portico_proto::api::App = serde_json::from_str(&out).unwrap();
    assert!(app.required_features.is_empty());
    assert_eq!(
        app.backend_timeout,
        portico_proto::api::BackendTimeout::Long
    );
    eventually(
        "the edge routes to the new URL",
        Duration::from_secs(30),
        || async {
            let r = s.curl(&[&url]).await;
            (r.status == 200).then_some(())
        },
    )
    .await;

    // Nothing to change, a bad value, a missing app: refused, named once,
    // and the app is unchanged.
    let (ok, _, err) = cli(&s, &["app", "update", "upd"]).await;
    assert!(!ok && err.contains("required"), "{err}");
    let (ok, _, err) = cli(
        &s,
        &["app", "update", "upd", "--internal-url", "http://x/?a=1"],
    )
    .await;
    assert!(!ok, "{err}");
    assert!(err.contains("internal_url"), "{err}");
    assert_eq!(err.matches("query string").count(), 1, "{err}");
    let (ok, _, err) = cli(&s, &["app", "update", "nope", "--backend-timeout", "5"]).await;
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = cli(&s, &["app", "update", "..", "--backend-timeout", "5"]).await;
    assert!(!ok && err.contains("path segment"), "{err}");
    let (_, out, _) = cli(&s, &["app", "show", "upd", "--json"]).await;
    let now: portico_proto::api::App = serde_json::from_str(&out).unwrap();
    assert_eq!(now, app);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_revokes_tokens_and_deletes_an_edge() {
    let s = Stack::start().await;
    let (ok, token, err) = cli(&s, &["token", "create", "--group", "Default"]).await;
    assert!(ok, "{err}");
    let token: portico_proto::api::JoinToken = token.trim().parse().unwrap();
    let (ok, edge_token, err) = cli(&s, &["token", "create", "--edge"]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&s, &["token", "list", "--json"]).await;
    assert!(ok, "{err}");
    assert!(
        !out.contains(&token.secret),
        "secrets are never listed: {out}"
    );
    let list: Vec<portico_proto::api::TokenInfo> = serde_json::from_str(&out).unwrap();
    let listed = list.iter().find(|t| t.id == token.id).unwrap();
    assert_eq!(listed.status, portico_proto::api::TokenStatus::Unused);

    let (ok, out, err) = cli(&s, &["token", "revoke", &token.id]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&token.id), "{out}");
    let (ok, out, _) = cli(&s, &["token", "list"]).await;
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    let row = out.lines().find(|l| l.starts_with(&token.id)).unwrap();
    assert!(
        row.contains("revoked") && row.contains("group=Default"),
        "{out}"
    );
    let (ok, _, err) = cli(&s, &["token", "revoke", &token.id]).await;
    assert!(!ok && err.contains("already revoked"), "{err}");
    let (ok, _, err) = cli(&s, &["token", "revoke", "xyz"]).await;
    assert!(!ok && err.contains("16 hex digits"), "{err}");
    // A revoked token enrolls nothing.
    let state = s.dir.path().join("revoked-connector");
    let (ok, _, err) = cli(
        &s,
        &[
            "connector",
            "--router",
            &s.d.router.url(),
            "--state",
            state.to_str().unwrap(),
            "--token",
            &token.to_string(),
        ],
    )
    .await;
    assert!(!ok, "{err}");
    assert_eq!(err.matches("join token revoked at ").count(), 1, "{err}");

    // A second edge, a real process, deleted through the CLI.
    let edge_state = s.dir.path().join("edge2");
    let child = Child::spawn(&[
        "edge",
        "--router",
        &s.d.router.url(),
        "--state",
        edge_state.to_str().unwrap(),
        "--token",
        edge_token.trim(),
        "--public-listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "127.0.0.1:0",
    ]);
    let edge_id = listening(&child, "edge").await;
    let (ok, out, _) = cli(&s, &["edge", "list"]).await;
    assert!(ok && out.contains(&edge_id), "{out}");
    let (ok, out, err) = cli(&s, &["edge", "delete", &edge_id]).await;
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (ok, out, _) = cli(&s, &["edge", "list", "--json"]).await;
    assert!(ok);
    let edges: Vec<portico_proto::api::Edge> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        edges.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![s.d.edge.id.clone()]
    );
    // The deleted edge hears it from the router.
    eventually(
        "the deleted edge is refused",
        Duration::from_secs(60),
        || async {
            child
                .output()
                .contains("the router says this edge was deleted")
                .then_some(())
        },
    )
    .await;
    let (ok, _, err) = cli(&s, &["edge", "delete", &edge_id]).await;
    assert!(!ok && err.contains("404"), "{err}");

    for cmd in [
        vec!["edge", "delete", "--help"],
        vec!["token", "list", "--help"],
        vec!["token", "revoke", "--help"],
        vec!["app", "update", "--help"],
    ] {
        let (ok, out, _) = cli(&s, &cmd).await;
        assert!(ok && out.contains("Usage"), "{cmd:?}: {out}");
    }
    drop(child);
    s.stop().await;
}

/// The first `listening KEY=VALUE` value a child printed.
async fn listening(child: &Child, key: &str) -> String {
    let prefix = format!("listening {key}=");
    eventually(&prefix, Duration::from_secs(30), || async {
        child.output().lines().find_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            Some(rest.split_whitespace().next()?.to_owned())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_the_wrong_kind_is_refused_by_the_cli_and_stays_usable() {
    let s = Stack::start().await;
    let router = s.d.router.url();
    let (ok, edge_token, err) = cli(&s, &["token", "create", "--edge"]).await;
    assert!(ok, "{err}");
    let edge_token = edge_token.trim().to_owned();
    let (ok, connector_token, err) = cli(&s, &["token", "create", "--group", "Default"]).await;
    assert!(ok, "{err}");
    let connector_token = connector_token.trim().to_owned();
    let (_, out, _) = cli(&s, &["connector", "list", "--json"]).await;
    let connectors_before: Vec<portico_proto::api::Connector> = serde_json::from_str(&out).unwrap();

    // An edge token given to `portico connector`: a new state directory
    // is not left behind...
    let fresh = s.dir.path().join("new").join("connector-state");
    let (ok, _, err) = cli(
        &s,
        &[
            "connector",
            "--router",
            &router,
            "--state",
            fresh.to_str().unwrap(),
            "--token",
            &edge_token,
        ],
    )
    .await;
    assert!(!ok, "{err}");
    assert!(
        err.contains("this join token enrolls an edge (region default), not a connector")
            && err.contains("portico edge --token"),
        "the error says what the token is and which command takes it: {err}"
    );
    assert_eq!(
        err.matches("this join token").count(),
        1,
        "printed once: {err}"
    );
    assert!(
        !s.dir.path().join("new").exists(),
        "no state directory is left"
    );
    // ...and one the user made is kept, empty.
    let given = s.dir.path().join("given");
    std::fs::create_dir(&given).unwrap();
    let (ok, _, _) = cli(
        &s,
        &[
            "connector",
            "--router",
            &router,
            "--state",
            given.to_str().unwrap(),
            "--token",
            &edge_token,
        ],
    )
    .await;
    assert!(!ok);
    assert!(given.is_dir(), "a directory the user gave is never removed");
    assert_eq!(std::fs::read_dir(&given).unwrap().count(), 0);

    // A connector token given to `portico edge`.
    let edge_state = s.dir.path().join("edge-state");
    let edge_args = |token: &str| {
        [
            "edge",
            "--router",
            &router,
            "--state",
            edge_state.to_str().unwrap(),
            "--token",
            token,
            "--public-listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
        ]
        .map(str::to_owned)
    };
    let args = edge_args(&connector_token);
    let (ok, _, err) = cli(&s, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(!ok, "{err}");
    assert!(
        err.contains("this join token enrolls a connector (group Default), not an edge")
            && err.contains("portico connector --token"),
        "{err}"
    );
    assert!(!edge_state.exists());

    // The router kept no record, and both tokens are unused.
    let (_, out, _) = cli(&s, &["connector", "list", "--json"]).await;
    let connectors: Vec<portico_proto::api::Connector> = serde_json::from_str(&out).unwrap();
    let ids = |list: &[portico_proto::api::Connector]| {
        list.iter().map(|c| c.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&connectors), ids(&connectors_before));
    let (_, out, _) = cli(&s, &["edge", "list", "--json"]).await;
    let edges: Vec<portico_proto::api::Edge> = serde_json::from_str(&out).unwrap();
    assert_eq!(edges.len(), 1, "only the stack's own edge: {out}");
    let (_, out, _) = cli(&s, &["token", "list", "--json"]).await;
    let tokens: Vec<portico_proto::api::TokenInfo> = serde_json::from_str(&out).unwrap();
    for t in [&edge_token, &connector_token] {
        let id = t.parse::<portico_proto::api::JoinToken>().unwrap().id;
        let listed = tokens.iter().find(|i| i.id == id).unwrap();
        assert_eq!(listed.status, portico_proto::api::TokenStatus::Unused);
    }

    // Each token still enrolls what it was made for, through the real CLI.
    let args = edge_args(&edge_token);
    let edge = Child::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let edge_id = listening(&edge, "edge").await;
    assert!(edge_id.starts_with("e-"), "{}", edge.output());
    let connector = Child::spawn(&[
        "connector",
        "--router",
        &router,
        "--state",
        fresh.to_str().unwrap(),
        "--token",
        &connector_token,
        "--tunnels",
        "1",
    ]);
    let connector_id = listening(&connector, "connector").await;
    assert!(connector_id.starts_with("c-"), "{}", connector.output());
    assert!(fresh.join("credentials.json").is_file());
    drop((edge, connector));
    s.stop().await;
}

#[tokio::test]
async fn the_router_will_not_start_on_a_data_directory_others_can_open() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["router", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let fix = format!("chmod 700 {}", data.display());
    assert_eq!(
        err.matches(&fix).count(),
        1,
        "said once, with the fix: {err}"
    );
    assert!(err.contains("mode 0750"), "{err}");
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "nothing is created in it"
    );
}
