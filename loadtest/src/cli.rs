//! `portico loadtest`: the clap types the `portico` binary mounts, and
//! [`run`], which turns flags (and an optional scenario file) into a
//! [`Scenario`], runs it with a live progress bar and writes the summary,
//! the JSON and the HTML report.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::runner::{run_scenario_with, RunOptions};
use crate::scenario::{Mode, Protocol, RequestSpec, Scenario};

/// Measure a Portico deployment (or any HTTP server) like wrk2, oha or k6.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadtestArgs {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands of `portico loadtest`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Cmd {
    /// Run a load test against a URL or a scenario file (the default).
    Run(RunArgs),
    /// Run the WAN emulator: a UDP relay adding delay, jitter, loss,
    /// reordering, duplication, a bandwidth cap, MTU clamping and blackholes.
    Wan(crate::wan::WanArgs),
}

/// A load run. Flags override the scenario file's values.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Target URL, e.g. https://hello.apps.localhost:8443/ (with
    /// --scenario, replaces the scenario's request mix).
    #[arg(value_name = "URL")]
    pub url: Option<String>,
    /// Scenario file (TOML): request mix, stages, chaos actions; see
    /// loadtest/examples/.
    #[arg(long, short = 's', value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// HTTP method of every request.
    #[arg(long, short = 'X', value_name = "METHOD")]
    pub method: Option<String>,
    /// Extra request header (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Request body size in bytes (zeros).
    #[arg(long, value_name = "BYTES")]
    pub body_size: Option<u64>,
    /// HTTP version: h1 (HTTP/1.1), h2 (HTTP/2), h3 (HTTP/3 over QUIC).
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Connections per origin, kept alive and reused [default: 1, or the
    /// concurrency].
    #[arg(long, short = 'c', value_name = "N")]
    pub connections: Option<usize>,
    /// Dial a new connection (TCP+TLS or QUIC) for every request.
    #[arg(long)]
    pub new_connection: bool,
    /// Open loop: constant arrival rate in requests per second; latency is
    /// measured from each request's intended send time (wrk2's coordinated
    /// omission correction).
    #[arg(
        long,
        short = 'r',
        value_name = "REQ/S",
        conflicts_with = "concurrency"
    )]
    pub rate: Option<f64>,
    /// Closed loop: N workers, each sending its next request when the last
    /// one completes (maximum throughput). The default mode without --rate.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u32>,
    /// Stop sending after this long, e.g. 30s or 2m [default: 10s when no
    /// other bound is given].
    #[arg(long, short = 'd', value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after sending this many requests.
    #[arg(long, short = 'n', value_name = "N")]
    pub requests: Option<u64>,
    /// Per-request timeout, counted from the intended send time [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Open loop: most requests in flight before the scheduler waits
    /// [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Dial ADDR (ip:port) whatever the URL's host, keeping the host for
    /// SNI and Host (as curl's --connect-to). Repeat it to give several:
    /// connections are spread round robin over them and fail over to the
    /// next when one cannot be opened. *.localhost always resolves to
    /// 127.0.0.1.
    #[arg(long, value_name = "ADDR")]
    pub connect_to: Vec<SocketAddr>,
    /// Trust the CA certificates in this PEM file (e.g. the router's ca.pem)
    /// instead of the system roots.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub cacert: Option<PathBuf>,
    /// Accept any server certificate.
    #[arg(long, short = 'k')]
    pub insecure: bool,
    /// Write the JSON report to FILE ("-" for stdout, which replaces the
    /// text summary).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with latency and throughput plots.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Pass/fail criterion, NAME=VALUE (repeatable): p50, p90, p99, p999 or
    /// max of the corrected latency at most a duration (`p99=50ms`),
    /// `error_rate` at most a fraction (`error_rate=0.01`), `min_ok_rps` at
    /// least a rate. Overrides the scenario's [thresholds]. When one fails
    /// the reports are still written and the exit status is 99.
    #[arg(long = "threshold", value_name = "NAME=VALUE")]
    pub thresholds: Vec<String>,
}

/// Runs `portico loadtest`.
pub async fn run(args: LoadtestArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let run_args = match args.cmd {
        Some(Cmd::Run(a)) => a,
        Some(Cmd::Wan(w)) => return crate::wan::run_cli(w, shutdown).await,
        None => args.run,
    };
    run_load(run_args, shutdown).await
}

async fn run_load(a: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let scenario = scenario_from_args(&a)?;
    if !scenario.chaos.is_empty() {
        tracing::warn!(
            "this scenario has chaos actions; a plain run has no deployment to act on, so they are recorded as unsupported (use `portico loadtest deploy`)"
        );
    }
    let report = run_scenario_with(scenario, None, RunOptions { progress: !a.quiet }, shutdown)
        .await
        .context("load test failed")?;
    let json_to_stdout = a.json.as_deref() == Some(Path::new("-"));
    let mut out = std::io::stdout().lock();
    if json_to_stdout {
        writeln!(out, "{}", report.to_json())?;
    } else {
        write!(out, "{}", report.summary())?;
    }
    if let Some(path) = a.json.as_deref().filter(|p| *p != Path::new("-")) {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &a.html {
        std::fs::write(path, crate::html::html(&report))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    crate::ThresholdsFailed::check(&report.thresholds)?;
    Ok(())
}

/// The scenario the flags describe: the file's (if any) with the flags
/// applied on top, validated.
pub fn scenario_from_args(a: &RunArgs) -> anyhow::Result<Scenario> {
    let mut s = match &a.scenario {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read scenario {}", p.display()))?;
            toml::from_str::<Scenario>(&text)
                .with_context(|| format!("invalid scenario {}", p.display()))?
        }
        None => {
            let Some(_) = &a.url else {
                anyhow::bail!("give a URL or --scenario FILE (see --help)");
            };
            Scenario::default()
        }
    };
    if let Some(url) = &a.url {
        s.requests = vec![RequestSpec::get(url.clone())];
    }
    for r in &mut s.requests {
        if let Some(m) = &a.method {
            r.method = m.clone();
        }
        if let Some(b) = a.body_size {
            r.body_size = b;
        }
        for h in &a.headers {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("--header `{h}` is not `NAME: VALUE`"))?;
            r.headers.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    if let Some(p) = a.protocol {
        s.protocol = p;
    }
    if a.new_connection {
        s.new_connection_per_request = true;
    }
    if let Some(r) = a.rate {
        s.mode = Mode::Open;
        s.rate = Some(r);
        s.concurrency = None;
    }
    if let Some(c) = a.concurrency {
        s.mode = Mode::Closed;
        s.concurrency = Some(c);
        s.rate = None;
    }
    if a.scenario.is_none() && a.rate.is_none() && a.concurrency.is_none() {
        // Plain `portico loadtest URL`: maximum throughput over the connections.
        s.mode = Mode::Closed;
        s.concurrency = Some(u32::try_from(a.connections.unwrap_or(1)).unwrap_or(u32::MAX));
    }
    match a.connections {
        Some(c) => s.connections = c,
        None if a.scenario.is_none() => {
            s.connections = s
                .concurrency
                .map_or(1, |c| usize::try_from(c).unwrap_or(1))
                .max(1);
        }
        None => {}
    }
    if a.duration.is_some() {
        s.duration = a.duration;
    }
    if a.requests.is_some() {
        s.count = a.requests;
    }
    if s.duration.is_none() && s.count.is_none() && s.stages.is_empty() {
        s.duration = Some(Duration::from_secs(10));
    }
    if let Some(t) = a.timeout {
        s.timeout = t;
    }
    if let Some(m) = a.max_in_flight {
        s.max_in_flight = m;
    }
    let mut thresholds = crate::Thresholds::default();
    for spec in &a.thresholds {
        thresholds.set(spec)?;
    }
    s.thresholds.override_with(&thresholds);
    if !a.connect_to.is_empty() {
        s.connect_to = a.connect_to.clone();
    }
    if a.cacert.is_some() {
        s.cacert = a.cacert.clone();
        s.insecure = false;
    }
    if a.insecure {
        s.insecure = true;
        s.cacert = None;
    }
    s.validate()?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Top {
        #[command(flatten)]
        args: LoadtestArgs,
    }

    fn parse(v: &[&str]) -> LoadtestArgs {
        Top::try_parse_from(std::iter::once("loadtest").chain(v.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn help_explains_every_flag() {
        Top::command().debug_assert();
        let mut cmd = Top::command();
        for arg in cmd.get_arguments() {
            assert!(
                arg.get_help().is_some(),
                "flag {} has no help",
                arg.get_id()
            );
        }
        let help = cmd.render_long_help().to_string();
        for flag in [
            "--rate",
            "--concurrency",
            "--connect-to",
            "--cacert",
            "--insecure",
            "--json",
            "--html",
            "--new-connection",
            "--scenario",
            "--protocol",
        ] {
            assert!(help.contains(flag), "{flag} missing from help");
        }
    }

    #[test]
    fn url_and_flags_make_an_open_loop_scenario() {
        let a = parse(&[
            "https://hello.apps.localhost:8443/x",
            "--rate",
            "200",
            "-d",
            "4s",
            "-c",
            "8",
            "--protocol",
            "h2",
            "--connect-to",
            "127.0.0.1:9",
            "--connect-to",
            "127.0.0.1:10",
            "-k",
            "-H",
            "x-a: b",
            "-X",
            "POST",
            "--body-size",
            "100",
        ]);
        assert!(a.cmd.is_none());
        let s = scenario_from_args(&a.run).unwrap();
        assert_eq!(s.mode, Mode::Open);
        assert_eq!(s.rate, Some(200.0));
        assert_eq!(s.connections, 8);
        assert_eq!(s.protocol, Protocol::H2);
        assert_eq!(s.duration, Some(Duration::from_secs(4)));
        assert_eq!(s.requests[0].method, "POST");
        assert_eq!(s.requests[0].headers["x-a"], "b");
        assert_eq!(
            s.connect_to,
            [
                "127.0.0.1:9".parse::<std::net::SocketAddr>().unwrap(),
                "127.0.0.1:10".parse().unwrap()
            ]
        );
        assert!(s.insecure);
    }

    #[test]
    fn run_subcommand_and_defaults() {
        let a = parse(&["run", "https://a.localhost/", "-n", "5"]);
        let Some(Cmd::Run(r)) = a.cmd else {
            panic!("no run subcommand")
        };
        assert!(matches!(
            parse(&["wan", "--measure"]).cmd,
            Some(Cmd::Wan(_))
        ));
        let s = scenario_from_args(&r).unwrap();
        assert_eq!(s.mode, Mode::Closed);
        assert_eq!(s.concurrency, Some(1));
        assert_eq!(s.count, Some(5));
        assert_eq!(s.duration, None);
        // No bound at all: 10 s.
        let s = scenario_from_args(&parse(&["https://a.localhost/"]).run).unwrap();
        assert_eq!(s.duration, Some(Duration::from_secs(10)));
        // Neither URL nor scenario.
        assert!(scenario_from_args(&parse(&["--rate", "1"]).run).is_err());
        // Bad flag value names the field.
        let e =
            scenario_from_args(&parse(&["https://a.localhost/", "--rate", "0"]).run).unwrap_err();
        assert!(e.to_string().contains("rate"), "{e}");
    }
}
