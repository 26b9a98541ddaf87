//! The load generator against a real deployment: edge → tunnel →
//! connector → a counting test backend. Checks that the report's counts
//! agree with what the backend saw, and that a backend stall shows up in
//! the coordinated-omission-corrected p99 (as wrk2 would show it).

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Stack;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portico::dev::publish;
use portico_loadtest::{
    run_scenario, Chaos, ChaosAction, ChaosError, ChaosFuture, ChaosVerb, Component, Mode,
    Protocol, Report, RequestSpec, Scenario,
};
use portico_proto::GroupId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A backend that counts requests and, once, stalls every request that
/// arrives within `stall` of the `stall_at`-th request until that window
/// ends.
struct Backend {
    addr: std::net::SocketAddr,
    count: Arc<AtomicU64>,
    stall_at: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Backend {
    async fn start(stall: Duration) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let stall_at = Arc::new(AtomicU64::new(u64::MAX));
        let until: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (c, s, t, st) = (count.clone(), stall_at.clone(), tasks.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                let tcp = tokio::select! {
                    r = listener.accept() => match r { Ok((tcp, _)) => tcp, Err(_) => continue },
                    () = st.cancelled() => break,
                };
                let (c, s, until, st2) = (c.clone(), s.clone(), until.clone(), st.clone());
                t.spawn(async move {
                    let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                        let (c, s, until) = (c.clone(), s.clone(), until.clone());
                        async move {
                            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                            let wait = {
                                let mut u = until.lock().unwrap();
                                if n == s.load(Ordering::SeqCst) {
                                    *u = Some(Instant::now() + stall);
                                }
                                u.filter(|u| *u > Instant::now())
                            };
                            if let Some(u) = wait {
                                tokio::time::sleep_until(u).await;
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = conn => {}
                        () = st2.cancelled() => {}
                    }
                });
            }
        });
        Backend {
            addr,
            count,
            stall_at,
            stop,
            tasks,
        }
    }

    fn seen(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Publishes `lt` → the backend and waits until the edge routes it.
async fn publish_backend(stack: &Stack, backend: &Backend) -> String {
    publish(
        &stack.d.admin,
        "lt",
        &format!("http://{}/", backend.addr),
        GroupId::default_group(),
    )
    .await
    .unwrap();
    let url = stack.app_url("lt", "/");
    common::eventually("the app is routed", Duration::from_secs(20), || {
        let url = url.clone();
        async move { (stack.curl(&[&url]).await.status == 200).then_some(()) }
    })
    .await;
    url
}

fn scenario(stack: &Stack, url: &str, protocol: Protocol) -> Scenario {
    Scenario {
        mode: Mode::Open,
        protocol,
        connections: 4,
        rate: Some(100.0),
        count: Some(200),
        timeout: Duration::from_secs(20),
        connect_to: vec![stack.d.edge.public_addr],
        cacert: Some(stack.d.ca_path()),
        requests: vec![RequestSpec::get(url)],
        ..Scenario::default()
    }
}

fn assert_ordered(r: &Report) {
    let p = &r.latency_us;
    assert!(p.min > 0, "{p:?}");
    assert!(
        p.min <= p.p50 && p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max,
        "{p:?}"
    );
    let s = &r.service_time_us;
    assert!(s.p50 > 0 && s.p50 <= s.p99 && s.p99 <= s.max, "{s:?}");
}

async fn counts_agree(protocol: Protocol) {
    let stack = Stack::start().await;
    let backend = Backend::start(Duration::ZERO).await;
    let url = publish_backend(&stack, &backend).await;
    let before = backend.seen();
    let report = run_scenario(
        scenario(&stack, &url, protocol),
        None,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let seen = backend.seen() - before;
    eprintln!("{}", report.summary());
    assert_eq!(report.requests.scheduled, 200);
    assert_eq!(
        report.requests.completed, 200,
        "{:?}",
        report.transport_errors
    );
    assert_eq!(report.requests.completed, seen, "backend saw {seen}");
    assert_eq!(report.requests.ok, seen);
    assert_eq!(report.requests.errors, 0);
    assert_eq!(report.status.get(&200), Some(&200));
    assert!(report.transport_errors.is_empty());
    assert_eq!(report.bytes_received, 400);
    assert_ordered(&report);
    assert!(!report.timeline.is_empty());
    assert_eq!(
        report.timeline.iter().map(|s| s.completed).sum::<u64>(),
        200
    );
    backend.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_counts_match_backend_h1() {
    counts_agree(Protocol::H1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_counts_match_backend_h2() {
    counts_agree(Protocol::H2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_counts_match_backend_h3() {
    counts_agree(Protocol::H3).await;
}

/// Errors are counted by status and by Portico error code: an app that
/// does not exist answers 404-ish pages with `x-portico-error: AppNotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_counts_portico_error_codes() {
    let stack = Stack::start().await;
    let url = stack.app_url("missing", "/");
    let mut s = scenario(&stack, &url, Protocol::H1);
    s.count = Some(20);
    let report = run_scenario(s, None, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.requests.completed, 20);
    assert_eq!(report.requests.errors, 20);
    assert_eq!(
        report.portico_errors.get("AppNotFound"),
        Some(&20),
        "{report:?}"
    );
    assert_eq!(report.status.values().sum::<u64>(), 20);
    stack.stop().await;
}

/// wrk2's point: at 200 req/s for 4 s, the backend stalls for 1 s once.
/// Requests due during the stall wait up to 1 s from their intended send
/// time, so the corrected p99 is at least ~900 ms (the requests due in the
/// first 100 ms of the stall, 20 of 800 = 2.5 %, wait ≥ 900 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_coordinated_omission_shows_the_stall() {
    let stack = Stack::start().await;
    let backend = Backend::start(Duration::from_secs(1)).await;
    let url = publish_backend(&stack, &backend).await;
    // Stall from the 200th request of the run (about 1 s in).
    backend
        .stall_at
        .store(backend.seen() + 200, Ordering::SeqCst);
    let mut s = scenario(&stack, &url, Protocol::H1);
    s.connections = 8;
    s.rate = Some(200.0);
    s.count = None;
    s.duration = Some(Duration::from_secs(4));
    let report = run_scenario(s, None, CancellationToken::new())
        .await
        .unwrap();
    eprintln!("{}", report.summary());
    assert_eq!(report.requests.errors, 0, "{report:?}");
    assert_eq!(report.requests.completed, 800);
    assert_ordered(&report);
    assert!(
        report.latency_us.p99 >= 900_000,
        "corrected p99 {} µs does not show the 1 s stall",
        report.latency_us.p99
    );
    backend.stop().await;
    stack.stop().await;
}

/// Kills the deployment's connector on cue.
struct KillConnector(CancellationToken);

impl Chaos for KillConnector {
    fn act<'a>(&'a self, action: &'a ChaosAction) -> ChaosFuture<'a> {
        Box::pin(async move {
            match (action.action, action.target) {
                (ChaosVerb::Kill, Some(Component::Connector)) => {
                    self.0.cancel();
                    Ok(())
                }
                _ => Err(ChaosError::Unsupported {
                    action: action.to_string(),
                }),
            }
        })
    }
}

/// A chaos action fires at its time, is recorded (JSON and HTML markers),
/// and its effect shows in the error counts by Portico code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_chaos_kill_connector_is_recorded() {
    let stack = Stack::start().await;
    let backend = Backend::start(Duration::ZERO).await;
    let url = publish_backend(&stack, &backend).await;
    let mut s = scenario(&stack, &url, Protocol::H2);
    s.count = None;
    s.duration = Some(Duration::from_secs(3));
    s.timeout = Duration::from_secs(5);
    s.chaos = vec![
        ChaosAction {
            at: Duration::from_secs(1),
            action: ChaosVerb::Kill,
            target: Some(Component::Connector),
            instance: None,
            path: None,
            ..ChaosAction::new(Duration::ZERO, ChaosVerb::Kill)
        },
        ChaosAction {
            at: Duration::from_millis(1500),
            action: ChaosVerb::Blackhole,
            target: None,
            instance: None,
            path: Some("nowhere".into()),
            ..ChaosAction::new(Duration::ZERO, ChaosVerb::Kill)
        },
    ];
    let chaos: Arc<dyn Chaos> = Arc::new(KillConnector(stack.d.connector_stop.clone()));
    let report = run_scenario(s, Some(chaos), CancellationToken::new())
        .await
        .unwrap();
    eprintln!("{}", report.summary());
    let kill = &report.chaos[0];
    assert!(kill.ok, "{kill:?}");
    assert!(kill.fired_ms.unwrap() >= 1000, "{kill:?}");
    let bh = &report.chaos[1];
    assert!(
        !bh.ok && bh.error.is_some() && bh.fired_ms.unwrap() >= 1500,
        "{bh:?}"
    );
    // Before the kill everything succeeded; after it the edge answers with
    // Portico error codes (no connector).
    assert!(report.requests.ok >= 90, "{:?}", report.requests);
    assert!(report.requests.errors > 0, "{:?}", report.requests);
    assert!(
        report.portico_errors.values().sum::<u64>() > 0,
        "{:?} {:?}",
        report.portico_errors,
        report.transport_errors
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["chaos"][0]["action"], "kill connector");
    let page = portico_loadtest::html::html(&report);
    assert_eq!(page.matches("class=\"chaos-marker\"").count(), 4);
    backend.stop().await;
    stack.stop().await;
}

/// The CLI glue: flags → scenario → run → JSON and HTML files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_cli_writes_json_and_html() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Top {
        #[command(flatten)]
        args: portico_loadtest::cli::LoadtestArgs,
    }
    let stack = Stack::start().await;
    let backend = Backend::start(Duration::ZERO).await;
    let url = publish_backend(&stack, &backend).await;
    let before = backend.seen();
    let json = stack.dir.path().join("report.json");
    let html = stack.dir.path().join("report.html");
    let edge = stack.d.edge.public_addr.to_string();
    let ca = stack.d.ca_path();
    let top = Top::try_parse_from([
        "loadtest",
        "run",
        url.as_str(),
        "--rate",
        "50",
        "-n",
        "30",
        "-c",
        "2",
        "--quiet",
        "--connect-to",
        edge.as_str(),
        "--cacert",
        ca.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ])
    .unwrap();
    portico_loadtest::cli::run(top.args, CancellationToken::new())
        .await
        .unwrap();
    let report = Report::from_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report.requests.ok, 30);
    assert_eq!(backend.seen() - before, 30);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("id=\"latency-plot\"") && page.contains("id=\"throughput-plot\""));
    backend.stop().await;
    stack.stop().await;
}

/// Thresholds through the real binary. A run within them exits 0; a run
/// that breaks one still writes its JSON report, names the broken
/// threshold on stderr and exits 99 (as k6 does), so a CI job can tell a
/// slow or failing deployment from a load test that could not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_thresholds_set_the_exit_status() {
    let s = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |url: String, threshold: &'static str, json: std::path::PathBuf| {
        let ca = s.d.ca_path();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_portico"))
                .args(["--log", "warn", "loadtest"])
                .arg(&url)
                .arg("--cacert")
                .arg(&ca)
                .args(["-n", "20", "--concurrency", "2", "--quiet"])
                .args(["--threshold", threshold, "--threshold", "min_ok_rps=0"])
                .arg("--json")
                .arg(&json)
                .output()
                .await
                .expect("the portico binary runs");
            let report =
                Report::from_json(&std::fs::read_to_string(&json).expect("report written"))
                    .expect("a valid report");
            (out, report)
        }
    };

    let (out, report) = run(s.d.app_url(), "error_rate=0", dir.path().join("good.json")).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report.requests.ok, 20);
    assert_eq!(report.thresholds.len(), 2);
    assert!(
        report.thresholds.iter().all(|t| t.passed),
        "{:?}",
        report.thresholds
    );

    // No app at this host: every answer is a 404 AppNotFound.
    let unknown = s.app_url("no-such-app", "/");
    let (out, report) = run(unknown, "error_rate=0.5", dir.path().join("bad.json")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(99), "{stderr}");
    assert!(
        stderr.contains("1 of 2 thresholds failed: error_rate <= 0.5 (measured 1.0000)"),
        "{stderr}"
    );
    assert_eq!(report.requests.errors, 20);
    let failed: Vec<_> = report.thresholds.iter().filter(|t| !t.passed).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].name, "error_rate");
    s.stop().await;
}

/// A mix of two entries against a real deployment: the report breaks the
/// run down per entry, the entries add up to the totals, and the entry for
/// an app that does not exist holds every error (all 404 AppNotFound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_reports_each_entry_of_the_mix() {
    let s = Stack::start().await;
    let mut sc = scenario(&s, &s.d.app_url(), Protocol::H2);
    sc.requests.push(RequestSpec {
        weight: 3,
        ..RequestSpec::get(s.app_url("no-such-app", "/"))
    });
    let report = run_scenario(sc, None, CancellationToken::new())
        .await
        .expect("the run completes");
    assert_eq!(report.requests.completed, 200);
    let [good, missing] = &report.by_request[..] else {
        panic!("two entries expected: {:?}", report.by_request);
    };
    assert_eq!((good.weight, missing.weight), (1, 3));
    assert!(
        good.completed > 0 && missing.completed > 0,
        "{good:?} {missing:?}"
    );
    assert_eq!(
        good.completed + missing.completed,
        report.requests.completed
    );
    assert_eq!((good.errors, missing.ok), (0, 0));
    assert_eq!(missing.errors, report.requests.errors);
    assert_eq!(report.status.get(&404).copied(), Some(missing.completed));
    assert_eq!(
        report.portico_errors.get("AppNotFound").copied(),
        Some(missing.completed)
    );
    assert_eq!(good.latency_us.count, good.ok);
    assert!(report
        .summary()
        .contains("request: GET https://no-such-app.apps.localhost"));
    s.stop().await;
}
