//! Shared harness of the end-to-end tests: a whole deployment on loopback
//! (the same one `portico dev` starts) and the real curl binary as client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use portico::dev::{Deployment, DevOptions};
use tokio_util::sync::CancellationToken;

/// A deployment plus the token that stops it and the directory it lives in.
pub struct Stack {
    pub d: Deployment,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(DevOptions::default()).await
    }

    pub async fn start_with(opts: DevOptions) -> Stack {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let d = Deployment::start(dir.path(), &opts, shutdown.clone())
            .await
            .expect("deployment starts");
        Stack { d, shutdown, dir }
    }

    /// Restarts everything on the same data directory.
    pub async fn restart(self, opts: DevOptions) -> Stack {
        let Stack { d, shutdown, dir } = self;
        shutdown.cancel();
        d.wait().await.expect("clean stop");
        let shutdown = CancellationToken::new();
        let d = Deployment::start(dir.path(), &opts, shutdown.clone())
            .await
            .expect("deployment restarts");
        Stack { d, shutdown, dir }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.d.wait())
            .await
            .expect("stops within the hang guard")
            .expect("clean stop");
    }

    pub fn port(&self) -> u16 {
        self.d.edge.public_addr.port()
    }

    /// `https://<host>:<edge port><path>`.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port())
    }

    pub fn app_url(&self, app: &str, path: &str) -> String {
        self.url(&format!("{app}.apps.localhost"), path)
    }

    /// Creates connector group `group` and publishes the demo backend in it
    /// as app `app` (no connector serves a new group until one enrolls).
    pub async fn publish_demo_in_new_group(&self, app: &str, group: &str) {
        let group = portico_proto::GroupId::new(group).unwrap();
        let _: portico_proto::api::Group = self
            .d
            .admin
            .post_json(
                "/v1/groups",
                &portico_proto::api::CreateGroup {
                    id: group.clone(),
                    region: None,
                },
            )
            .await
            .expect("group created");
        portico::dev::publish(
            &self.d.admin,
            app,
            &format!("http://{}/", self.d.demo.addr),
            group,
        )
        .await
        .expect("app published");
    }

    /// Runs curl against the edge, trusting the router CA.
    pub async fn curl(&self, args: &[&str]) -> Curl {
        curl(&self.d.ca_path(), args).await
    }

    /// The edge's `/metrics` text, fetched with curl.
    pub async fn edge_metrics(&self) -> String {
        let addr = self.d.edge.metrics_addr.expect("dev edge serves metrics");
        let out = tokio::process::Command::new("curl")
            .args(["-sS", &format!("http://{addr}/metrics")])
            .output()
            .await
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The value of the sample `name_and_labels` (as `/metrics` writes it, e.g.
/// `portico_edge_tls_handshakes_total{result="full"}`) in a metrics text; 0
/// if absent.
pub fn metric_value(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// What a curl run produced.
#[derive(Debug)]
pub struct Curl {
    pub status: u16,
    pub http_version: String,
    pub headers: String,
    pub body: Vec<u8>,
}

impl Curl {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of a response header (first occurrence, case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// The real curl binary. Fails the test if curl is missing: CI installs it.
pub async fn curl(ca: &Path, args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let headers = dir.path().join("headers");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "120", "--cacert"])
        .arg(ca)
        .arg("-o")
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code} %{http_version}"])
        .args(args)
        .output()
        .await
        .expect("curl is installed (scripts/test.sh installs it)");
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = w.split_whitespace();
    let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let http_version = parts.next().unwrap_or("").to_owned();
    assert!(
        out.status.success() || status != 0,
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Curl {
        status,
        http_version,
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// Polls `f` until it returns `Some`, failing after `limit` (a hang guard,
/// not a timing assertion).
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This process's resident set size, in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// A scratch file path inside `dir`.
pub fn scratch(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
