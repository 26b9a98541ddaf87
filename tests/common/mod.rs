//! Shared harness of the end-to-end tests: a whole deployment on loopback
//! (the same one `portico dev` starts) and the real curl binary as client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

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

    /// Closes an HTTP/3 client of the edge, stops the deployment, and waits
    /// until the client's driver and socket have ended.
    pub async fn stop_with_h3(
        self,
        h3: portico_loadtest::h3::H3Client,
        tracker: tokio_util::task::TaskTracker,
    ) {
        h3.close();
        drop(h3);
        self.stop().await;
        tracker.close();
        tokio::time::timeout(Duration::from_secs(60), tracker.wait())
            .await
            .expect("the client's driver and socket end");
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

    /// Creates connector group `group` (no region pinned).
    pub async fn create_group(&self, group: &str) -> portico_proto::GroupId {
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
        group
    }

    /// Creates connector group `group` and publishes the demo backend in it
    /// as app `app` (no connector serves a new group until one enrolls).
    pub async fn publish_demo_in_new_group(&self, app: &str, group: &str) {
        let group = self.create_group(group).await;
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
    curl_trusting(Some(ca), args).await
}

/// curl for a plain `http://` URL (a backend, a metrics listener).
pub async fn curl_plain(url: &str) -> Curl {
    curl_trusting(None, &[url]).await
}

/// curl with `args` for plain `http://` URLs (a test peer's own API).
pub async fn curl_plain_args(args: &[&str]) -> Curl {
    curl_trusting(None, args).await
}

async fn curl_trusting(ca: Option<&Path>, args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let headers = dir.path().join("headers");
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "120"]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd
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
    rss_of("self")
}

/// The resident set size of process `pid` (`"self"` for this one), in
/// bytes, from `/proc`.
pub fn rss_of(pid: impl std::fmt::Display) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
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

/// A real `python3 -m http.server` serving a directory on 127.0.0.1, with
/// its access log (stderr) collected as it is written. Fails the test if
/// python3 is missing: scripts/test.sh installs it.
pub struct PyHttpServer {
    pub addr: std::net::SocketAddr,
    child: tokio::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl PyHttpServer {
    pub async fn start(dir: &Path) -> PyHttpServer {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 is installed (scripts/test.sh installs it)");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        // "Serving HTTP on 127.0.0.1 port 40117 (http://127.0.0.1:40117/) ..."
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = stdout.next_line().await.expect("python's stdout") {
                if let Some(port) = line
                    .split(" port ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|p| p.parse::<u16>().ok())
                {
                    return port;
                }
            }
            panic!(
                "python3 -m http.server exited before listening: {}",
                log.lock().unwrap()
            );
        })
        .await
        .expect("python3 -m http.server listens within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        PyHttpServer {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
        }
    }

    /// Every line the server logged so far (one per request it answered).
    pub fn access_log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The `portico` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_portico");

/// `portico ARGS` as an admin command of the router at `api` whose data
/// directory is `router` (its CA and admin token); fails the test on an
/// error and returns stdout.
pub async fn admin_cli(api: &str, router: &Path, args: &[&str]) -> String {
    let (ok, stdout, stderr) = admin_cli_result(api, router, args).await;
    assert!(ok, "portico {args:?}: {stdout}{stderr}");
    stdout
}

/// [`admin_cli`] for a command that may fail: whether it succeeded, its
/// stdout and its stderr.
pub async fn admin_cli_result(api: &str, router: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env("PORTICO_ROUTER", api)
        .env("PORTICO_ROUTER_CA", router.join("ca.pem"))
        .env("PORTICO_ADMIN_TOKEN_FILE", router.join("admin-token"))
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `portico` child process whose stdout and stderr lines are kept
/// (for the tests to read and for failure dumps). Killed when dropped.
pub struct Child {
    pub child: tokio::process::Child,
    log: Arc<Mutex<Log>>,
}

#[derive(Default)]
struct Log {
    lines: Vec<String>,
    /// Pipes read to their end (2: the process closed both).
    closed: usize,
}

impl Child {
    /// `portico ARGS`.
    pub fn spawn(args: &[&str]) -> Child {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(args);
        Child::spawn_cmd(cmd)
    }

    /// Any command (for example `portico` with a set environment).
    pub fn spawn_cmd(mut cmd: tokio::process::Command) -> Child {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("portico binary runs");
        let log = Arc::new(Mutex::new(Log::default()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.lock().unwrap().lines.push(line);
                }
                log.lock().unwrap().closed += 1;
            });
        }
        Child { child, log }
    }

    /// Everything the process printed so far, stdout and stderr interleaved.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().lines.join("\n")
    }

    /// The first line that starts with `prefix` (`listening `), waiting up
    /// to `limit` (a hang guard). Fails with the output if the process
    /// exits without printing it.
    pub async fn line_starting(&mut self, prefix: &str, limit: Duration) -> String {
        self.line_where(prefix, limit, |l| l.starts_with(prefix))
            .await
    }

    /// The first line that contains `text` (a log message), as
    /// [`Child::line_starting`].
    pub async fn line_containing(&mut self, text: &str, limit: Duration) -> String {
        self.line_where(text, limit, |l| l.contains(text)).await
    }

    async fn line_where(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (found, closed) = {
                let log = self.log.lock().unwrap();
                let found = log.lines.iter().find(|l| pred(l)).cloned();
                (found, log.closed)
            };
            if let Some(l) = found {
                return l;
            }
            // Both pipes at their end: the process is gone and all it
            // printed has been read.
            assert!(
                closed < 2,
                "exited without printing {what:?}:\n{}",
                self.output()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what:?} line:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit (up to `limit`, a hang guard) and
    /// returns its status with everything it printed.
    pub async fn exit(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running:\n{}", self.output()))
            .unwrap();
        let deadline = tokio::time::Instant::now() + limit;
        while self.log.lock().unwrap().closed < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (status, self.output())
    }

    /// The value of `key=` in a `key=value ...` line.
    pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap(); // SIGKILL
    }
}

/// One HTTP/2 connection to the edge with SNI `host`, trusting the router
/// CA (hyper's client: many concurrent streams on one connection).
pub async fn h2_connection(
    s: &Stack,
    host: &str,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let roots = portico_agent::pki::root_store(&s.d.router.ca_pem).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(portico_agent::pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.d.edge.public_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// One resource record as `dig` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub data: String,
}

/// What a `dig` run printed, parsed: the header's status and flags, and
/// each section.
#[derive(Debug, Default)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    pub answer: Vec<Rr>,
    pub authority: Vec<Rr>,
    pub additional: Vec<Rr>,
    pub text: String,
}

impl Dig {
    /// The data of the answer's records of type `rtype`, sorted.
    pub fn answer_data(&self, rtype: &str) -> Vec<String> {
        let mut data: Vec<String> = self
            .answer
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect();
        data.sort();
        data
    }

    pub fn aa(&self) -> bool {
        self.flags.iter().any(|f| f == "aa")
    }
}

/// Debian's `dig` (package dnsutils, which scripts/test.sh installs) with
/// `args`, against `server`. Fails the test when dig is missing, in CI or
/// not: a DNS test that cannot run is not a passing one.
pub async fn dig(server: std::net::SocketAddr, args: &[&str]) -> Dig {
    let at = format!("@{}", server.ip());
    let port = server.port().to_string();
    let mut all = vec![at.as_str(), "-p", port.as_str(), "+time=5", "+tries=3"];
    all.extend_from_slice(args);
    dig_raw(&all).await
}

/// `dig ARGS` as given, parsed.
pub async fn dig_raw(args: &[&str]) -> Dig {
    let out = tokio::process::Command::new("dig")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run dig ({e}): install Debian's dnsutils (scripts/test.sh does; CI={})",
                std::env::var("CI").unwrap_or_default()
            )
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dig(&text)
}

fn parse_dig(text: &str) -> Dig {
    let mut dig = Dig {
        text: text.to_owned(),
        ..Dig::default()
    };
    let mut section: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(";; ->>HEADER<<-") {
            if let Some(s) = rest.split("status: ").nth(1) {
                dig.status = s.split(',').next().unwrap_or("").trim().to_owned();
            }
        } else if let Some(rest) = line.strip_prefix(";; flags:") {
            dig.flags = rest
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        } else if let Some(name) = line
            .strip_prefix(";; ")
            .and_then(|l| l.strip_suffix(" SECTION:"))
        {
            section = Some(match name {
                "ANSWER" => "answer",
                "AUTHORITY" => "authority",
                "ADDITIONAL" => "additional",
                _ => "other",
            });
        } else if line.trim().is_empty() {
            section = None;
        } else if let (Some(s), false) = (section, line.starts_with(';')) {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(ttl), Some(_class), Some(rtype)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rr = Rr {
                name: name.to_owned(),
                ttl: ttl.parse().unwrap_or(u32::MAX),
                rtype: rtype.to_owned(),
                data: parts.collect::<Vec<_>>().join(" "),
            };
            match s {
                "answer" => dig.answer.push(rr),
                "authority" => dig.authority.push(rr),
                "additional" => dig.additional.push(rr),
                _ => {}
            }
        }
    }
    dig
}

/// A `portico router` process on loopback and its admin CLI.
pub struct RouterProc {
    pub child: Child,
    /// Its data directory (CA, admin token).
    pub dir: PathBuf,
    pub api: String,
    /// The CA certificate file, for curl.
    pub ca: PathBuf,
    /// Its `listening ...` line.
    pub line: String,
}

impl RouterProc {
    /// Starts a router with its data under `dir/router` and `extra` flags.
    pub async fn start(dir: &Path, extra: &[&str]) -> RouterProc {
        let data = dir.join("router");
        let mut args = vec![
            "router",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let mut child = Child::spawn(&args);
        let line = child
            .line_starting("listening ", Duration::from_secs(60))
            .await;
        let api = Child::field(&line, "api").unwrap().to_owned();
        let ca = PathBuf::from(Child::field(&line, "ca").unwrap());
        RouterProc {
            child,
            dir: data,
            api,
            ca,
            line,
        }
    }

    /// An admin command; fails the test on an error, returns stdout.
    pub async fn admin(&self, args: &[&str]) -> String {
        admin_cli(&self.api, &self.dir, args).await
    }

    /// `portico edge` enrolled into `region`, its state in `state`, on
    /// 127.0.0.1 ports without HTTP/3, with `extra` flags; the child and
    /// its `listening ...` line.
    pub async fn edge(&self, state: &Path, region: &str, extra: &[&str]) -> (Child, String) {
        let token = self
            .admin(&["token", "create", "--edge", "--region", region])
            .await;
        let mut args = vec![
            "edge",
            "--router",
            &self.api,
            "--state",
            state.to_str().unwrap(),
            "--token",
            token.trim(),
            "--public-listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
            "--no-http3",
        ];
        args.extend_from_slice(extra);
        let mut child = Child::spawn(&args);
        let line = child
            .line_starting("listening ", Duration::from_secs(60))
            .await;
        (child, line)
    }
}

/// One HTTP/1.1 GET of `https://<host>/` at `addr`, trusting the CA in
/// `ca_pem`: the status, or what failed (not a test failure: callers
/// count or retry).
pub async fn https_status(
    ca_pem: &str,
    addr: std::net::SocketAddr,
    host: &str,
) -> Result<u16, String> {
    let roots = portico_agent::pki::root_store(ca_pem).map_err(|e| e.to_string())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(portico_agent::pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tls))
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", host)
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    use http_body_util::BodyExt as _;
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(status)
}

/// Fails unless every request of a `portico loadtest` report (at least
/// `at_least` of them) succeeded.
pub fn assert_nothing_failed(what: &str, r: &portico_loadtest::Report, at_least: u64) {
    let c = &r.requests;
    assert!(c.scheduled >= at_least, "{what}: the load ran: {c:?}");
    assert_eq!(
        (c.completed, c.ok, c.errors, c.cancelled),
        (c.scheduled, c.scheduled, 0, 0),
        "{what}: every request succeeded: {c:?}, status {:?}, errors {:?} {:?}",
        r.status,
        r.portico_errors,
        r.transport_errors
    );
}

/// An admin client of an in-process router (its CA, its admin token).
pub fn router_admin(router: &portico_router::Handle) -> portico_agent::RouterClient {
    portico_agent::RouterClient::new(
        &router.url(),
        portico_agent::RouterTrust::CaPem(router.ca_pem.clone()),
        None,
    )
    .unwrap()
    .with_bearer(router.admin_token())
}

/// An in-process edge of the default region enrolled with `router`, its
/// state in `dir`: public and tunnel listeners on 127.0.0.1 port 0, no
/// metrics listener, no drain delay, unless `adjust` says otherwise.
/// Returns once it is ready.
pub async fn start_edge(
    router: &portico_router::Handle,
    admin: &portico_agent::RouterClient,
    dir: &Path,
    shutdown: CancellationToken,
    adjust: impl FnOnce(&mut portico_edge::Config),
) -> portico_edge::Handle {
    let region = portico_proto::RegionId::default_region();
    start_edge_in(router, admin, dir, &region, shutdown, adjust).await
}

/// A connector of `group`, enrolled with a new token, keeping `tunnels`
/// tunnels: returned once they are up.
pub async fn start_connector(
    router: &portico_router::Handle,
    admin: &portico_agent::RouterClient,
    dir: &Path,
    group: portico_proto::GroupId,
    tunnels: usize,
    shutdown: CancellationToken,
) -> portico_connector::Handle {
    let mut cc = portico_connector::Config::new(router.url(), dir);
    cc.token = Some(
        portico::dev::create_token(admin, portico_proto::api::TokenScope::Connector { group })
            .await
            .unwrap(),
    );
    cc.tunnels = tunnels;
    let connector = portico_connector::start(cc, shutdown).await.unwrap();
    connector.wait_tunnels(tunnels).await;
    connector
}

/// [`start_edge`] in `region` (which must exist).
pub async fn start_edge_in(
    router: &portico_router::Handle,
    admin: &portico_agent::RouterClient,
    dir: &Path,
    region: &portico_proto::RegionId,
    shutdown: CancellationToken,
    adjust: impl FnOnce(&mut portico_edge::Config),
) -> portico_edge::Handle {
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut ec = portico_edge::Config::new(router.url(), dir);
    ec.token = Some(
        portico::dev::create_token(
            admin,
            portico_proto::api::TokenScope::Edge {
                region: region.clone(),
            },
        )
        .await
        .unwrap(),
    );
    ec.public_listen = loopback;
    ec.tunnel_listen = loopback;
    ec.metrics_listen = None;
    ec.drain_delay = Duration::ZERO;
    adjust(&mut ec);
    let edge = portico_edge::start(ec, shutdown).await.unwrap();
    edge.ready().await;
    edge
}
