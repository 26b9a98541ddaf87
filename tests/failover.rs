//! Failover through real processes (issue 9, finding 7): a router, an edge
//! and two connectors, each a `portico` process; `portico loadtest` sends
//! 200 GETs a second for 30 s while one connector is killed with SIGKILL.
//! No GET fails. Then the POSTs: one in flight on a connector that
//! is killed is not replayed (the backend saw it once, the client gets an
//! error), and one sent to it after the kill, which it never acknowledged,
//! is retried on the other connector and succeeds.
//!
//! The order of events comes from signals the test observes (the backend
//! seeing a request, the edge's metrics, the processes' log lines), never
//! from sleeps.

mod common;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{admin_cli, curl, curl_plain, eventually, metric_value, Child};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portico_proto::api::{Connector, Status};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A hang guard for each wait (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(60);

/// What the backend received: method, path and the `x-request-id` the
/// connector set.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    request_id: String,
}

/// The app's backend, in this process, so that the test sees every request
/// that reaches it. `/hold/...` never answers (its request stays in flight
/// until its connector dies); anything else answers `ok`.
struct Backend {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Backend {
    async fn start() -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (s, t, st) = (seen.clone(), tasks.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                let tcp = tokio::select! {
                    r = listener.accept() => match r { Ok((tcp, _)) => tcp, Err(_) => continue },
                    () = st.cancelled() => break,
                };
                let (s, st2) = (s.clone(), st.clone());
                let st3 = st2.clone();
                t.spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (s, st) = (s.clone(), st3.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let seen = Seen {
                                method: req.method().to_string(),
                                path: path.clone(),
                                request_id: req
                                    .headers()
                                    .get("x-request-id")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned(),
                            };
                            // The whole body first: the request has arrived.
                            let _ = req.into_body().collect().await;
                            s.lock().unwrap().push(seen);
                            if path.starts_with("/hold/") {
                                st.cancelled().await;
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
            seen,
            stop,
            tasks,
        }
    }

    fn requests_for(&self, path: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The processes of the deployment and where they listen.
struct Deployment {
    dir: PathBuf,
    api: String,
    _router: Child,
    edge: Child,
    public_port: u16,
    metrics: String,
}

impl Deployment {
    /// A router and an edge (HTTP/1.1 and HTTP/2 only, JSON logs, so the
    /// access log can be read), and app `fo` published at `backend`.
    async fn start(dir: &Path, backend: &Backend) -> Deployment {
        let mut router = Child::spawn(&[
            "router",
            "--data",
            dir.join("router").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]);
        let line = router.line_starting("listening ", LIMIT).await;
        let api = Child::field(&line, "api").unwrap().to_owned();
        let token = admin_cli(&api, &dir.join("router"), &["token", "create", "--edge"]).await;
        // Two shards in the edge and in each connector (the default on two
        // cores, said here so that a machine of any size tests them):
        // tunnels and requests on different threads must fail over alike.
        let mut edge = Child::spawn(&[
            "--log-format",
            "json",
            "--threads",
            "2",
            "edge",
            "--router",
            &api,
            "--token",
            token.trim(),
            "--state",
            dir.join("edge").to_str().unwrap(),
            "--public-listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-http3",
            // Longer than the default 3 s: the window in which connector A,
            // restarted, must attach before B is found dead (it takes a
            // fraction of a second; this keeps a loaded machine from
            // losing that race).
            "--tunnel-dead-after",
            "6s",
        ]);
        let line = edge.line_starting("listening ", LIMIT).await;
        let public = Child::field(&line, "public").unwrap();
        let public_port = public.rsplit_once(':').unwrap().1.parse().unwrap();
        let metrics = format!("{}/metrics", Child::field(&line, "metrics").unwrap());
        let internal_url = format!("http://{}/", backend.addr);
        admin_cli(
            &api,
            &dir.join("router"),
            &["app", "create", "fo", "--internal-url", &internal_url],
        )
        .await;
        Deployment {
            dir: dir.to_owned(),
            api,
            _router: router,
            edge,
            public_port,
            metrics,
        }
    }

    async fn admin(&self, args: &[&str]) -> String {
        admin_cli(&self.api, &self.dir.join("router"), args).await
    }

    /// A connector process in group Default with two tunnels: enrolled
    /// with a fresh token on its first start, from its state directory
    /// after that. Returns it with its id.
    async fn connector(&self, name: &str) -> (Child, String) {
        let state = self.dir.join(name);
        let mut args = vec![
            "--threads".to_owned(),
            "2".to_owned(),
            "connector".to_owned(),
            "--router".to_owned(),
            self.api.clone(),
            "--state".to_owned(),
            state.to_str().unwrap().to_owned(),
            "--tunnels".to_owned(),
            "2".to_owned(),
        ];
        if !state.join("credentials.json").exists() {
            let token = self.admin(&["token", "create", "--group", "Default"]).await;
            args.extend(["--token".to_owned(), token.trim().to_owned()]);
        }
        let mut child = Child::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let line = child.line_starting("listening ", LIMIT).await;
        let id = Child::field(&line, "connector").unwrap().to_owned();
        (child, id)
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("router/ca.pem")
    }

    fn url(&self, path: &str) -> String {
        format!("https://fo.apps.localhost:{}{path}", self.public_port)
    }

    async fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&curl_plain(&self.metrics).await.text(), name_and_labels)
    }

    /// Waits until the edge's metric reaches `want`.
    async fn metric_reaches(&self, what: &str, name_and_labels: &str, want: f64) {
        eventually(what, LIMIT, || async {
            (self.metric(name_and_labels).await >= want).then_some(())
        })
        .await;
    }

    /// The edge's access-log lines (JSON) for `path`.
    fn access_lines(&self, path: &str) -> Vec<serde_json::Value> {
        self.edge
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "portico::access" && v["path"] == path)
            .collect()
    }

    /// A POST through the edge with curl, in a task of its own.
    fn post(&self, path: &str) -> tokio::task::JoinHandle<common::Curl> {
        let (ca, url) = (self.ca(), self.url(path));
        tokio::spawn(async move {
            curl(
                &ca,
                &[
                    "--http2",
                    "--max-time",
                    "60",
                    "-X",
                    "POST",
                    "-d",
                    "payload",
                    &url,
                ],
            )
            .await
        })
    }

    async fn connector_status(&self, id: &str) -> Status {
        let out = self.admin(&["connector", "list", "--json"]).await;
        let list: Vec<Connector> = serde_json::from_str(&out).unwrap();
        list.into_iter()
            .find(|c| c.id.as_str() == id)
            .unwrap_or_else(|| panic!("connector {id} is not listed: {out}"))
            .status
    }
}

fn kill(child: &Child) {
    let pid = child.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_of_two_connectors_fails_no_get_and_replays_only_what_never_arrived() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start().await;
    let d = Deployment::start(dir.path(), &backend).await;
    let (a, a_id) = d.connector("connector-a").await;
    let (b, b_id) = d.connector("connector-b").await;
    d.metric_reaches("four tunnels", "portico_edge_tunnels", 4.0)
        .await;
    eventually("the app to be served", LIMIT, || async {
        (curl(&d.ca(), &[&d.url("/ready")]).await.status == 200).then_some(())
    })
    .await;

    // 200 GETs a second for 30 s over HTTP/2.
    let report = dir.path().join("report.json");
    let load = Child::spawn(&[
        "loadtest",
        &d.url("/get"),
        "--rate",
        "200",
        "--duration",
        "30s",
        "--protocol",
        "h2",
        "--connections",
        "4",
        "--cacert",
        d.ca().to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
        "--quiet",
    ]);
    // Part-way (a thousand GETs served, about 5 s in), connector A dies.
    eventually("a thousand GETs", LIMIT, || async {
        (backend.requests_for("/get").len() >= 1000).then_some(())
    })
    .await;
    kill(&a);
    drop(a);
    assert_eq!(d.connector_status(&b_id).await, Status::Active);

    let (status, out) = load.exit(LIMIT).await;
    assert!(status.success(), "portico loadtest failed:\n{out}");
    let r: portico_loadtest::Report =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    common::assert_nothing_failed("every GET", &r, 3000);
    // Those that A had taken when it died were replayed on B.
    assert!(
        d.metric("portico_edge_retries_total{reason=\"idempotent\"}")
            .await
            >= 1.0,
        "no GET was in flight on A when it died"
    );
    assert_eq!(
        d.metric("portico_edge_tunnel_closes_total{reason=\"unresponsive\"}")
            .await,
        2.0,
        "the edge closed A's two tunnels itself"
    );
    eventually("only B's tunnels left", LIMIT, || async {
        (d.metric("portico_edge_tunnels").await == 2.0).then_some(())
    })
    .await;
    // `portico connector list` shows A inactive from the edge's next report
    // (it reports at once when a tunnel goes); B stays active.
    eventually("connector list to show A inactive", LIMIT, || async {
        (d.connector_status(&a_id).await == Status::Inactive).then_some(())
    })
    .await;
    assert_eq!(d.connector_status(&b_id).await, Status::Active);

    // The POSTs. B is now the group's only connector.
    let not_delivered = "portico_edge_retries_total{reason=\"not_delivered\"}";
    let retried_before = d.metric(not_delivered).await;
    // One in flight on B: its backend has it and holds it.
    let held = d.post("/hold/in-flight");
    eventually("the backend to hold the POST", LIMIT, || async {
        (!backend.requests_for("/hold/in-flight").is_empty()).then_some(())
    })
    .await;
    kill(&b);
    drop(b);
    // One sent after the kill: the edge has nothing better than B's
    // tunnels (suspect or not), writes the head there, and hears nothing.
    let late = d.post("/late");
    d.metric_reaches("both POSTs on B's tunnels", "portico_edge_streams", 2.0)
        .await;
    // A comes back from its state directory before B is found dead.
    let (_a, _) = d.connector("connector-a").await;

    let late = late.await.unwrap();
    assert_eq!(
        late.status,
        200,
        "the late POST is retried: {}",
        late.text()
    );
    assert_eq!(late.text(), "ok");
    let seen = backend.requests_for("/late");
    assert_eq!(seen.len(), 1, "it reached a backend once: {seen:?}");
    assert_eq!(d.metric(not_delivered).await - retried_before, 1.0);
    let lines = d.access_lines("/late");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["attempts"], 2, "{}", lines[0]);
    assert_eq!(lines[0]["replayed"], true, "{}", lines[0]);
    assert_eq!(lines[0]["status"], 200, "{}", lines[0]);
    assert_eq!(lines[0]["connector"], a_id.as_str(), "{}", lines[0]);
    // It kept its request id: the one the backend saw, the one logged.
    assert_eq!(
        lines[0]["request.id"].as_str(),
        Some(seen[0].request_id.as_str())
    );

    let held = held.await.unwrap();
    assert_eq!(held.status, 502, "{}", held.text());
    assert_eq!(
        held.header("x-portico-error").as_deref(),
        Some("ConnectorNotFound")
    );
    let seen = backend.requests_for("/hold/in-flight");
    assert_eq!(seen.len(), 1, "not replayed: {seen:?}");
    assert!(seen.iter().all(|s| s.method == "POST"));
    let lines = d.access_lines("/hold/in-flight");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["attempts"], 1, "{}", lines[0]);
    assert_eq!(lines[0]["replayed"], false, "{}", lines[0]);

    backend.stop().await;
}
