//! The edge mesh through real processes: a `portico router`, an edge in
//! `eu-west` and one in `us-east`, both with `--mesh-listen`, and a
//! connector of a group pinned to `eu-west` in front of a real backend
//! (python's http.server).
//!
//! The router keeps presence in its store and pushes it over the edges'
//! watch, so the `us-east` edge learns that the group's tunnels sit on the
//! `eu-west` edge and forwards there: the answer comes back through the
//! mesh with `Portico-Route: <us edge>, <eu edge>`, and both edges log the
//! request under one request id. When the connector dies, the presence
//! change reaches the `us-east` edge too, which then answers
//! `ConnectorNotFound` itself, at once. A killed edge shows as unhealthy
//! in `edge list` once it is unheard for 3 report intervals.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{curl, eventually, Child, PyHttpServer, RouterProc};
use portico_proto::api::Edge;

/// A hang guard for each wait (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(60);

/// An edge of `region` with a mesh listener: the child, its id and its
/// public address.
async fn edge(router: &RouterProc, dir: &Path, region: &str) -> (Child, String, String) {
    let state = dir.join(format!("edge-{region}"));
    let (child, line) = router
        .edge(&state, region, &["--mesh-listen", "127.0.0.1:0"])
        .await;
    assert!(Child::field(&line, "mesh").is_some(), "{line}");
    let id = Child::field(&line, "edge").unwrap().to_owned();
    let public = Child::field(&line, "public").unwrap().to_owned();
    (child, id, public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_an_edge_without_the_groups_tunnels_crosses_the_mesh() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("hello.txt"), "hello through two edges\n").unwrap();
    let backend = PyHttpServer::start(d).await;

    let mut router = RouterProc::start(d, &[]).await;
    router.admin(&["region", "create", "eu-west"]).await;
    router.admin(&["region", "create", "us-east"]).await;
    router
        .admin(&["group", "create", "eu", "--region", "eu-west"])
        .await;
    let internal = format!("http://{}/", backend.addr);
    router
        .admin(&[
            "app",
            "create",
            "hello",
            "--internal-url",
            &internal,
            "--group",
            "eu",
        ])
        .await;

    let (mut eu, eu_id, _eu_public) = edge(&router, d, "eu-west").await;
    let (mut us, us_id, us_public) = edge(&router, d, "us-east").await;

    let token = router.admin(&["token", "create", "--group", "eu"]).await;
    let connector_state = d.join("connector");
    let mut connector = Child::spawn(&[
        "connector",
        "--router",
        &router.api,
        "--state",
        connector_state.to_str().unwrap(),
        "--token",
        token.trim(),
        "--tunnels",
        "2",
    ]);
    connector.line_starting("listening ", LIMIT).await;

    // The us-east edge holds no tunnel of the group: the request crosses
    // the mesh to the eu-west edge, once the presence has reached it.
    let port = us_public.rsplit_once(':').unwrap().1.to_owned();
    let resolve = format!("hello.apps.localhost:{port}:127.0.0.1");
    let url = format!("https://hello.apps.localhost:{port}/hello.txt");
    let ca_path = router.ca.as_path();
    let route = format!("{us_id}, {eu_id}");
    for h in ["--http1.1", "--http2"] {
        let r = eventually("a 200 through the mesh", LIMIT, || async {
            let r = curl(ca_path, &["--resolve", &resolve, h, &url]).await;
            (r.status == 200).then_some(r)
        })
        .await;
        assert_eq!(r.text(), "hello through two edges\n");
        assert_eq!(r.header("portico-route").as_deref(), Some(route.as_str()));
    }
    // Both edges logged the request under one id.
    let us_log = us.output();
    let id = us_log
        .lines()
        .filter(|l| l.contains("peer=") && l.contains("status=200"))
        .find_map(|l| Child::field(l, "request.id"))
        .unwrap_or_else(|| panic!("no access line with a peer at the us edge:\n{us_log}"))
        .to_owned();
    eventually("the eu edge's line for the same request", LIMIT, || async {
        let eu_log = eu.output();
        eu_log
            .lines()
            .any(|l| l.contains("forwarded request") && l.contains(&id))
            .then_some(())
    })
    .await;

    // The router shows both edges, and where the tunnels are.
    let edges: Vec<Edge> =
        serde_json::from_str(&router.admin(&["edge", "list", "--json"]).await).unwrap();
    assert!(edges
        .iter()
        .any(|e| e.id.as_str() == eu_id && e.tunnels == 2));

    // The connector dies: the eu edge closes its tunnels, reports, and the
    // us edge hears it over its watch and answers ConnectorNotFound itself.
    connector.kill().await;
    let r = eventually("ConnectorNotFound at the us edge", LIMIT, || async {
        let r = curl(ca_path, &["--resolve", &resolve, &url]).await;
        (r.status == 502 && r.text().contains("ConnectorNotFound")).then_some(r)
    })
    .await;
    assert!(!r.text().contains("MeshUnreachable"), "{}", r.text());

    // An edge unheard for 3 report intervals shows as unhealthy.
    eu.kill().await;
    eventually("the killed edge to show as unhealthy", LIMIT, || async {
        let out = router.admin(&["edge", "list"]).await;
        out.lines()
            .any(|l| l.starts_with(&eu_id) && l.split_whitespace().nth(2) == Some("unhealthy"))
            .then_some(())
    })
    .await;
    let out = router.admin(&["edge", "list"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with(&us_id) && l.split_whitespace().nth(2) == Some("healthy")),
        "{out}"
    );
    us.kill().await;
    router.child.kill().await;
    backend.stop().await;
}
