//! `portico loadtest deploy`: a whole deployment (router, 2 edges behind WAN
//! relays, 2 connectors, demo backends) started from a deployment file, loaded,
//! broken by chaos actions, and reported on.

mod common;

use std::path::Path;
use std::time::Duration;

use clap::Parser as _;
use portico::cli::{Cli, Command, LoadtestSub};
use portico::deploy::{run_file, DeployFile, DeployOutcome};
use portico_loadtest::RunOptions;
use tokio_util::sync::CancellationToken;

/// Runs a deployment file in a temporary directory, bounded by a hang guard.
async fn run(text: &str) -> DeployOutcome {
    common::init_tracing();
    let file = DeployFile::from_toml(text).expect("deployment file parses");
    let dir = tempfile::tempdir().unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        run_file(
            &file,
            dir.path(),
            RunOptions::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the deployment run ends within the hang guard")
    .expect("the deployment run succeeds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_deployment_open_loop_goes_through_the_relays() {
    let o = run(r#"
        mode = "open"
        rate = 50
        duration = "2s"
        timeout = "5s"
        [[requests]]
        url = "https://app0/"
        [[requests]]
        url = "https://app1.apps.localhost/bytes/1000"
        [deployment]
        edges = 2
        connectors = 2
        tunnels_per_connector = 2
        backends = 2
        [wan]
        delay = "5ms"
        "#)
    .await;
    let r = &o.report;
    assert_eq!(r.requests.scheduled, 100, "{r:?}");
    assert_eq!(r.requests.completed, r.requests.scheduled);
    assert_eq!(r.requests.ok, r.requests.completed, "{:?}", r.status);
    assert_eq!(r.requests.errors, 0);
    assert_eq!(r.requests.cancelled, 0);
    assert_eq!(r.status.get(&200).copied(), Some(r.requests.ok));
    assert_eq!(r.latency_us.count, r.requests.completed);
    // Edge → connector → edge crosses a relay both ways: one WAN RTT.
    assert!(
        r.service_time_us.min >= 10_000,
        "faster than the WAN allows: {:?}",
        r.service_time_us
    );
    // Every edge's tunnels go through its relay.
    assert_eq!(o.paths.len(), 2);
    assert_eq!(o.edges.len(), 2);
    for (i, p) in o.paths.iter().enumerate() {
        assert!(p.up.forwarded > 0, "path {i}: {p:?}");
        assert!(p.down.forwarded > 0, "path {i}: {p:?}");
        assert!(p.clients_created >= 1, "path {i}: {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_and_restarts_a_connector_and_blackholes_a_path() {
    let o = run(r#"
        mode = "open"
        rate = 40
        duration = "6s"
        timeout = "5s"
        [[requests]]
        url = "https://app0/"
        [[chaos]]
        at = "1s"
        action = "kill"
        target = "connector"
        instance = 0
        [[chaos]]
        at = "2s"
        action = "restart"
        target = "connector"
        instance = 0
        [[chaos]]
        at = "3s"
        action = "blackhole"
        path = "edge1"
        [[chaos]]
        at = "3500ms"
        action = "unblackhole"
        path = "edge1"
        [deployment]
        edges = 2
        connectors = 2
        tunnels_per_connector = 2
        [wan]
        delay = "5ms"
        "#)
    .await;
    let r = &o.report;
    let names: Vec<&str> = r.chaos.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(
        names,
        [
            "kill connector[0]",
            "restart connector[0]",
            "blackhole edge1",
            "unblackhole edge1"
        ]
    );
    for c in &r.chaos {
        assert!(c.ok, "{c:?}");
        let fired = c.fired_ms.expect("fired");
        assert!(fired >= c.at_ms, "{c:?}");
    }
    // The blackhole dropped tunnel traffic of edge 1 only.
    assert!(o.paths[1].up.dropped.blackhole + o.paths[1].down.dropped.blackhole > 0);
    assert_eq!(o.paths[0].up.dropped.blackhole, 0);
    // After recovery (the last action at 3.5 s), every request succeeds.
    let late: Vec<_> = r.timeline.iter().filter(|s| s.second >= 5).collect();
    assert!(!late.is_empty(), "{:?}", r.timeline);
    for s in late {
        assert!(s.ok > 0, "{s:?}");
        assert_eq!(s.errors, 0, "{s:?} in {:?}", r.timeline);
    }
    assert!(r.requests.ok > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_deployment_file_parses_and_runs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("loadtest/examples/deploy/deploy.toml");
    let file = DeployFile::load(&path).expect("the example parses");
    assert!(
        file.load.total_duration().unwrap() <= Duration::from_secs(5),
        "keep the example short"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let o = run(&text).await;
    assert!(o.report.requests.completed > 0);
    assert_eq!(o.report.requests.errors, 0, "{:?}", o.report);
    assert!(o.report.chaos.iter().all(|c| c.ok), "{:?}", o.report.chaos);
    assert!(o.paths.iter().all(|p| p.up.forwarded > 0));
}

#[test]
fn every_loadtest_form_parses() {
    let parse = |args: &[&str]| {
        let cli = Cli::try_parse_from(std::iter::once("portico").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let Command::Loadtest(l) = cli.command else {
            panic!("not loadtest")
        };
        l
    };
    let l = parse(&["loadtest", "https://a.localhost/", "--rate", "5"]);
    assert!(l.cmd.is_none());
    assert_eq!(l.run.url.as_deref(), Some("https://a.localhost/"));
    let sub = |args: &[&str]| match parse(args).cmd {
        Some(LoadtestSub::Loadtest(c)) => *c,
        other => panic!("{args:?}: {other:?}"),
    };
    assert!(matches!(
        sub(&["loadtest", "run", "https://a.localhost/"]),
        portico_loadtest::cli::Cmd::Run(_)
    ));
    assert!(matches!(
        sub(&["loadtest", "wan", "--measure"]),
        portico_loadtest::cli::Cmd::Wan(_)
    ));
    let Some(LoadtestSub::Deploy(m)) = parse(&[
        "loadtest", "deploy", "m.toml", "--json", "-", "--html", "r.html",
    ])
    .cmd
    else {
        panic!("no deployment")
    };
    assert_eq!(m.file, Path::new("m.toml"));
    assert_eq!(m.json.as_deref(), Some(Path::new("-")));
    assert_eq!(m.html.as_deref(), Some(Path::new("r.html")));
    // Its old name still works.
    assert!(matches!(
        parse(&["loadtest", "mesh", "m.toml"]).cmd,
        Some(LoadtestSub::Deploy(_))
    ));
}

#[test]
fn bad_deployment_files_name_the_field() {
    let base = "rate = 1\nduration = \"1s\"\n[[requests]]\nurl = \"https://app0/\"\n";
    for (extra, needle) in [
        ("[deployment]\nconnectors = 0\n", "deployment.connectors"),
        ("[deployment]\ntunnels = 2\n", "tunnels"),
        ("[wan]\njitter = \"soon\"\n", "wan"),
        ("[wan]\nreorder = 1.5\n", "reorder"),
    ] {
        let e = DeployFile::from_toml(&format!("{base}{extra}")).unwrap_err();
        let full = portico_agent::error_chain(&e).to_string();
        assert!(full.contains(needle), "{needle} not in {full}");
    }
    let e = DeployFile::from_toml(&base.replace("duration = \"1s\"\n", "")).unwrap_err();
    let full = portico_agent::error_chain(&e).to_string();
    assert!(full.contains("duration"), "{full}");
}
