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
    // A short backend timeout, so that a frozen connector shows up as
    // ConnectorTimeout (timeout + the edge's grace) before QUIC gives up.
    let _: portico_proto::api::App =
        s.d.admin
            .post_json(
                "/v1/apps",
                &portico_proto::api::AppSpec {
                    id: portico_proto::AppId::new("proc").unwrap(),
                    external_host: None,
                    internal_url: format!("http://{}/", s.d.demo.addr),
                    connector_group: GroupId::new("proc").unwrap(),
                    backend_timeout: portico_proto::api::BackendTimeout::Seconds(1),
                    validate_backend_tls: true,
                    required_features: vec![],
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
    // The request id the edge gave the user is in the connector's log line.
    eventually(
        "the connector logs the request id",
        Duration::from_secs(10),
        || async { child.output().contains(&request_id).then_some(()) },
    )
    .await;

    // Frozen (SIGSTOP): the edge gives up waiting and says the connector
    // did not answer.
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
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(
        r.header("x-portico-error").as_deref(),
        Some("ConnectorTimeout")
    );

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
    let line = |out: &str, key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    assert_eq!(
        line(&out, "required features").as_deref(),
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
    assert!(header.ends_with("FEATURES"), "{out}");
    let row = out.lines().find(|l| l.starts_with("feat ")).unwrap();
    assert!(row.ends_with("sign-in,mesh"), "{out}");

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
