//! Regions through real processes: a `portico router`, `portico edge`
//! processes started with `--region`, a `portico connector`, and the admin
//! CLI. An edge enrolled into `eu-west` shows there in `region list` (with
//! its connector) and `edge list`, and its metrics name its region; an
//! edge that says `--region us-east` with an `eu-west` token is refused
//! before the token is used and leaves no state directory; a saved
//! identity of another region stops the edge; `eu-west` cannot be deleted
//! while its edge lives.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{admin_cli, admin_cli_result, curl_plain, eventually, metric_value, Child};
use portico_proto::api::{Edge, Region, Status, TokenInfo, TokenStatus};

/// A hang guard for each wait (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(60);

/// `portico edge` on loopback ports with `extra` flags.
fn edge_args<'a>(api: &'a str, state: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "edge",
        "--router",
        api,
        "--state",
        state.to_str().unwrap(),
        "--public-listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "127.0.0.1:0",
        "--no-http3",
    ];
    args.extend_from_slice(extra);
    args
}

/// The token list's status of the token `token` (`pt1.<id>.…`).
async fn token_status(api: &str, router: &Path, token: &str) -> TokenStatus {
    let id = token
        .trim()
        .parse::<portico_proto::api::JoinToken>()
        .unwrap()
        .id;
    let out = admin_cli(api, router, &["token", "list", "--json"]).await;
    let tokens: Vec<TokenInfo> = serde_json::from_str(&out).unwrap();
    tokens.iter().find(|t| t.id == id).unwrap().status
}

/// The `region list` rows (header left out), each split into its cells.
async fn region_rows(api: &str, router: &Path) -> Vec<Vec<String>> {
    let out = admin_cli(api, router, &["region", "list"]).await;
    let mut lines = out.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        [
            "REGION",
            "EDGE",
            "STATUS",
            "TUNNELS",
            "CONNECTORS",
            "LAST",
            "SEEN"
        ],
        "{out}"
    );
    lines
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_runs_in_the_region_of_its_token_and_a_region_in_use_stays() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let router_dir = d.join("router");
    let mut router = Child::spawn(&[
        "router",
        "--data",
        router_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let line = router.line_starting("listening ", LIMIT).await;
    let api = Child::field(&line, "api").unwrap().to_owned();
    let admin = |args: &'static [&'static str]| admin_cli(&api, &router_dir, args);

    // A new region, listed with no edges beside `default`.
    let out = admin(&["region", "create", "eu-west"]).await;
    assert!(out.contains("created region eu-west"), "{out}");
    let rows = region_rows(&api, &router_dir).await;
    assert_eq!(
        rows,
        [
            ["default", "-", "-", "-", "0", "-"],
            ["eu-west", "-", "-", "-", "0", "-"]
        ],
        "a region without edges is one row of `-`"
    );
    let (ok, _, err) = admin_cli_result(&api, &router_dir, &["region", "create", "eu-west"]).await;
    assert!(!ok && err.contains("already exists"), "{err}");
    // A token for a region that does not exist says how to make it.
    let (ok, _, err) = admin_cli_result(
        &api,
        &router_dir,
        &["token", "create", "--edge", "--region", "us-east"],
    )
    .await;
    assert!(!ok, "{err}");
    assert_eq!(
        err.matches("create it with `portico region create us-east`")
            .count(),
        1,
        "said once: {err}"
    );

    // An edge enrolled with an eu-west token, run with --region eu-west.
    let token = admin(&["token", "create", "--edge", "--region", "eu-west"]).await;
    let eu_state = d.join("edge-eu");
    let mut edge = Child::spawn(&edge_args(
        &api,
        &eu_state,
        &[
            "--token",
            token.trim(),
            "--region",
            "eu-west",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    ));
    let line = edge.line_starting("listening ", LIMIT).await;
    let edge_id = Child::field(&line, "edge").unwrap().to_owned();
    assert_eq!(Child::field(&line, "region"), Some("eu-west"), "{line}");
    let metrics = format!("{}/metrics", Child::field(&line, "metrics").unwrap());
    let info = format!(
        "portico_edge_info{{edge=\"{edge_id}\",region=\"eu-west\",version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        metric_value(&curl_plain(&metrics).await.text(), &info),
        1.0,
        "the edge's metrics name its region"
    );
    assert_eq!(
        token_status(&api, &router_dir, &token).await,
        TokenStatus::Used
    );

    // A connector (group Default, any region) attaches to it.
    let connector_token = admin(&["token", "create", "--group", "Default"]).await;
    let connector_state = d.join("connector");
    let mut connector = Child::spawn(&[
        "connector",
        "--router",
        &api,
        "--state",
        connector_state.to_str().unwrap(),
        "--token",
        connector_token.trim(),
        "--tunnels",
        "1",
    ]);
    connector.line_starting("listening ", LIMIT).await;

    // `region list` shows the edge, active, with its tunnel and the
    // region's connector; `--json` is the API's answer.
    let row = eventually("the edge and its connector in region list", LIMIT, || {
        let (api, router_dir, edge_id) = (&api, &router_dir, &edge_id);
        async move {
            let rows = region_rows(api, router_dir).await;
            rows.into_iter()
                .find(|r| r[0] == "eu-west" && r[1] == *edge_id && r[3] == "1" && r[4] == "1")
        }
    })
    .await;
    assert_eq!(row[2], "healthy", "{row:?}");
    assert_eq!(row.get(6).map(String::as_str), Some("ago"), "{row:?}");
    let out = admin(&["region", "list", "--json"]).await;
    let regions: Vec<Region> = serde_json::from_str(&out).unwrap();
    let eu = regions.iter().find(|r| r.id.as_str() == "eu-west").unwrap();
    assert_eq!(eu.connectors, 1);
    assert_eq!(
        eu.edges
            .iter()
            .map(|e| (e.id.as_str(), e.status, e.tunnels))
            .collect::<Vec<_>>(),
        [(edge_id.as_str(), Status::Active, 1)]
    );
    let default = regions.iter().find(|r| r.id.as_str() == "default").unwrap();
    assert!(default.edges.is_empty() && default.connectors == 0);
    let out = admin(&["edge", "list", "--json"]).await;
    let edges: Vec<Edge> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        edges
            .iter()
            .map(|e| (e.id.as_str(), e.region.as_str()))
            .collect::<Vec<_>>(),
        [(edge_id.as_str(), "eu-west")]
    );
    let out = admin(&["edge", "list"]).await;
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with(&edge_id))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&row[1..3], ["eu-west", "healthy"], "{out}");

    // An edge that says --region us-east with an eu-west token: refused
    // before the token is used, and its new state directory is not left.
    let token2 = admin(&["token", "create", "--edge", "--region", "eu-west"]).await;
    let us_state = d.join("new").join("edge-us");
    let refused = Child::spawn(&edge_args(
        &api,
        &us_state,
        &["--token", token2.trim(), "--region", "us-east"],
    ));
    let (status, out) = refused.exit(LIMIT).await;
    assert!(!status.success(), "{out}");
    assert_eq!(
        out.matches(
            "this join token enrolls an edge in region eu-west, but this edge runs with --region us-east"
        )
        .count(),
        1,
        "said once: {out}"
    );
    assert!(
        out.contains("`portico token create --edge --region us-east`"),
        "{out}"
    );
    assert!(!d.join("new").exists(), "no state directory is left");
    assert_eq!(
        token_status(&api, &router_dir, &token2).await,
        TokenStatus::Unused,
        "the token is still good for an eu-west edge"
    );

    // The running edge's own state with another --region: it was enrolled
    // in eu-west, and says so.
    let (status, out) = Child::spawn(&edge_args(&api, &eu_state, &["--region", "us-east"]))
        .exit(LIMIT)
        .await;
    assert!(!status.success(), "{out}");
    assert_eq!(
        out.matches("this edge was enrolled in region eu-west")
            .count(),
        1,
        "{out}"
    );
    assert!(out.contains("--region us-east"), "{out}");

    // eu-west cannot go while its edge lives (nor while a token names
    // it), nor can `default`.
    let (ok, _, err) = admin_cli_result(&api, &router_dir, &["region", "delete", "eu-west"]).await;
    assert!(!ok, "{err}");
    assert_eq!(
        err.matches("region \"eu-west\" is in use: 1 edge(s) enrolled in it")
            .count(),
        1,
        "{err}"
    );
    assert!(err.contains("1 unused edge token(s)"), "{err}");
    let (ok, _, err) = admin_cli_result(&api, &router_dir, &["region", "delete", "default"]).await;
    assert!(!ok && err.contains("always exists"), "{err}");
    let regions: Vec<Region> =
        serde_json::from_str(&admin(&["region", "list", "--json"]).await).unwrap();
    assert!(regions.iter().any(|r| r.id.as_str() == "eu-west"));

    // Once the edge is deleted and the token revoked, it goes.
    drop(connector);
    edge.kill().await;
    admin_cli(&api, &router_dir, &["edge", "delete", &edge_id]).await;
    let token2_id = token2
        .trim()
        .parse::<portico_proto::api::JoinToken>()
        .unwrap()
        .id;
    admin_cli(&api, &router_dir, &["token", "revoke", &token2_id]).await;
    let out = admin(&["region", "delete", "eu-west"]).await;
    assert!(out.contains("deleted region eu-west"), "{out}");
    let rows = region_rows(&api, &router_dir).await;
    assert_eq!(rows, [["default", "-", "-", "-", "0", "-"]]);

    for cmd in [
        ["region", "create", "--help"],
        ["region", "list", "--help"],
        ["region", "delete", "--help"],
    ] {
        let (ok, out, _) = admin_cli_result(&api, &router_dir, &cmd).await;
        assert!(ok && out.contains("Usage"), "{cmd:?}: {out}");
    }
    drop(router);
}
