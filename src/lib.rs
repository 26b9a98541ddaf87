//! The `portico` command: starts each part (router, edge, connector), drives
//! the router's admin API, and runs a whole deployment on one machine
//! (`portico dev`).
//!
//! The parts themselves live in their crates; this crate only parses
//! command lines, wires configs, and prints results.

pub mod admin;
pub mod app_test;
pub mod cli;
pub mod config;
pub mod demo;
pub mod deploy;
pub mod dev;
pub mod logging;

use std::io::Write;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::{Command, ConnectorAction, EdgeAction};

/// Runs one command line to completion.
pub async fn run(cli: cli::Cli) -> anyhow::Result<()> {
    // Every TLS config names ring explicitly; this covers any dependency that
    // asks rustls for the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Router(args) => run_router(args).await,
        Command::Edge(cmd) => {
            let cli::EdgeCmd { action, run } = *cmd;
            match action {
                Some(EdgeAction::List(a)) => admin::edge_list(&a.conn).await,
                Some(EdgeAction::Delete(a)) => admin::edge_delete(&a).await,
                None => run_edge(run, cli.threads).await,
            }
        }
        Command::Connector(cmd) => match cmd.action {
            Some(ConnectorAction::List(a)) => admin::connector_list(&a.conn).await,
            Some(ConnectorAction::Delete(a)) => admin::connector_delete(&a).await,
            None => run_connector(cmd.run, cli.threads).await,
        },
        Command::App(cmd) => admin::app(cmd).await,
        Command::Cert(cmd) => admin::cert(cmd).await,
        Command::Session(cmd) => admin::session(cmd).await,
        Command::Region(cmd) => admin::region(cmd).await,
        Command::Group(cmd) => admin::group(cmd).await,
        Command::Token(cmd) => admin::token(cmd).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Loadtest(args) => {
            let cli::LoadtestCmd { cmd, run } = *args;
            let args = match cmd {
                Some(cli::LoadtestSub::Deploy(m)) => {
                    return deploy::run(m, shutdown_on_signal()).await
                }
                Some(cli::LoadtestSub::Loadtest(c)) => {
                    portico_loadtest::cli::LoadtestArgs { cmd: Some(*c), run }
                }
                None => portico_loadtest::cli::LoadtestArgs { cmd: None, run },
            };
            portico_loadtest::cli::run(args, shutdown_on_signal()).await
        }
    }
}

/// Raises the soft open-file limit to the hard limit (every socket is a
/// descriptor, and the usual soft limit of 1,024 is far below what an edge
/// or a connector holds) and logs both figures: one info line for the
/// commands that serve or load (router, edge, connector, dev, loadtest),
/// a debug line for one-shot admin commands, whose output stays clean.
pub fn raise_open_file_limit(command: &Command) {
    let serving = match command {
        Command::Router(_) | Command::Dev(_) | Command::Loadtest(_) => true,
        Command::Edge(c) => c.action.is_none(),
        Command::Connector(c) => c.action.is_none(),
        Command::App(_)
        | Command::Region(_)
        | Command::Group(_)
        | Command::Token(_)
        | Command::Cert(_)
        | Command::Session(_) => false,
    };
    let show = |n: u64| {
        if n == u64::MAX {
            "unlimited".to_owned()
        } else {
            n.to_string()
        }
    };
    match portico_agent::nofile::raise() {
        Ok(r) if serving => info!(
            soft = %show(r.soft),
            hard = %show(r.hard),
            was = %show(r.before),
            "open-file limit"
        ),
        Ok(r) => {
            tracing::debug!(soft = %show(r.soft), hard = %show(r.hard), was = %show(r.before), "open-file limit")
        }
        Err(e) => tracing::warn!(
            soft = %show(portico_agent::nofile::soft_limit()),
            error = %portico_agent::error_chain(&e),
            "cannot raise the open-file limit to the hard limit"
        ),
    }
}

/// A token cancelled by Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("shutting down");
        t.cancel();
    });
    token
}

/// Resolves at the next Ctrl-C or SIGTERM.
async fn second_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Writes one line to stdout: the program's output, as opposed to its logs.
pub fn out(line: impl AsRef<str>) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", line.as_ref());
    let _ = stdout.flush();
}

async fn run_router(args: cli::RouterArgs) -> anyhow::Result<()> {
    let mut config = portico_router::Config::new(&args.data);
    config.listen = args.listen;
    config.metrics_listen = args.metrics_listen;
    config.apps_domain = args.apps_domain;
    config.cert_ttl = args.cert_ttl;
    config.public_port = args.public_port;
    config.enroll_limit.burst = args.enroll_burst;
    config.enroll_limit.per_minute = args.enroll_per_minute;
    config.dns_listen = args.dns_listen;
    config.check_nameservers = args.check_nameservers;
    if let (Some(issuer), Some(client_id), Some(secret_file)) = (
        args.oidc_issuer,
        args.oidc_client_id,
        args.oidc_client_secret_file.as_ref(),
    ) {
        let client_secret = read_client_secret(secret_file)?;
        config.sign_in = Some(portico_router::SignInConfig {
            issuer,
            client_id,
            client_secret,
            session_lifetime: args.session_lifetime,
            groups_claim: args.oidc_groups_claim,
            session_idle_timeout: args.session_idle_timeout,
        });
    }
    let shutdown = shutdown_on_signal();
    let router = portico_router::start(config, shutdown)
        .await
        .context("router failed to start")?;
    let metrics = router
        .metrics_addr
        .map(|a| format!(" metrics=http://{a}"))
        .unwrap_or_default();
    let dns = router
        .dns_addr
        .map(|a| format!(" dns={a}"))
        .unwrap_or_default();
    out(format!(
        "listening api={} ca={} admin-token-file={}{metrics}{dns}",
        router.url(),
        args.data.join("ca.pem").display(),
        router.admin_token_path.display()
    ));
    router.wait().await.context("router stopped with an error")
}

/// The shards of a serving edge or connector: `--threads`, else one per
/// core. The runtime `main` built (current-thread) is shard 0.
fn shards(threads: Option<std::num::NonZeroUsize>) -> std::num::NonZeroUsize {
    threads.unwrap_or_else(|| {
        std::thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN)
    })
}

async fn run_edge(
    args: cli::EdgeArgs,
    threads: Option<std::num::NonZeroUsize>,
) -> anyhow::Result<()> {
    let (Some(router), Some(state)) = (args.router, args.state) else {
        anyhow::bail!("--router and --state are required");
    };
    let mut config = portico_edge::Config::new(router, state);
    config.token = args.token;
    config.region = args.region;
    config.public_listen = args.public_listen;
    config.tunnel_listen = args.tunnel_listen;
    config.shards = shards(threads);
    config.metrics_listen = args.metrics_listen;
    config.public_cert = args.cert.zip(args.key);
    config.advertise_tunnel_addr = args.advertise_tunnel;
    config.advertise_public_addr = args.advertise_public;
    config.mesh_listen = args.mesh_listen;
    config.advertise_mesh_addr = args.advertise_mesh;
    config.http3 = !args.no_http3;
    config.access_log = !args.no_access_log;
    config.header_read_timeout = args.header_read_timeout;
    config.keepalive_idle_timeout = args.keepalive_idle_timeout;
    config.h2_idle_timeout = args.h2_idle_timeout;
    config.h2_keepalive_interval = args.h2_keepalive_interval;
    config.h2_keepalive_timeout = args.h2_keepalive_timeout;
    config.h2_max_concurrent_streams = args.h2_max_concurrent_streams;
    config.max_connections = args.max_connections;
    config.max_connections_per_client = args.max_connections_per_client;
    config.client_reset_burst = args.client_reset_burst;
    config.client_reset_rate = args.client_reset_rate;
    config.stall_timeout = args.stall_timeout;
    config.max_stalled_streams = args.max_stalled_streams;
    config.max_stalled_per_client = args.max_stalled_per_client;
    config.max_tunnels_per_connector = args.max_tunnels_per_connector;
    config.tunnel_ping_interval = args.tunnel_ping_interval;
    config.tunnel_dead_after = args.tunnel_dead_after;
    config.drain_delay = args.drain_delay;
    config.grace = args.grace;
    let shutdown = shutdown_on_signal();
    let edge = portico_edge::start(config, shutdown.clone())
        .await
        .context("edge failed to start")?;
    // A second signal while the edge drains stops it at once.
    {
        let hard_stop = edge.hard_stop();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            second_signal().await;
            info!("second signal: stopping without finishing the drain");
            hard_stop.cancel();
        });
    }
    let metrics = edge
        .metrics_addr
        .map(|a| format!(" metrics=http://{a}"))
        .unwrap_or_default();
    let h3 = edge
        .h3_addr
        .map(|a| format!(" h3=udp://{a}"))
        .unwrap_or_default();
    let mesh = edge
        .mesh_addr
        .map(|a| format!(" mesh=udp://{a}"))
        .unwrap_or_default();
    out(format!(
        "listening edge={} region={} public={}{h3} tunnel={}{mesh}{metrics}",
        edge.id, edge.region, edge.public_addr, edge.tunnel_addr
    ));
    edge.wait().await.context("edge stopped with an error")
}

async fn run_connector(
    args: cli::ConnectorArgs,
    threads: Option<std::num::NonZeroUsize>,
) -> anyhow::Result<()> {
    let (Some(router), Some(state)) = (args.router, args.state) else {
        anyhow::bail!("--router and --state are required");
    };
    let mut config = portico_connector::Config::new(router, state);
    config.token = args.token;
    config.tunnels = args.tunnels;
    config.shards = shards(threads);
    config.metrics_listen = args.metrics_listen;
    config.backend_ca = args.backend_ca;
    config.max_streams_per_tunnel = args.max_streams_per_tunnel;
    config.max_backend_connections_per_app = args.max_backend_connections_per_app;
    config.backend_connection_wait = args.backend_connection_wait;
    config.nameservers = args.nameserver;
    config.find_edges = args.find_edges;
    config.region = portico_connector::RegionSettings {
        policy: portico_connector::RegionPolicy {
            window: args.region_window,
            min_improvement: args.region_min_improvement,
            min_ratio: args.region_min_ratio,
            ..portico_connector::RegionPolicy::default()
        },
        probe_interval: args.region_probe_interval,
        move_linger: args.region_move_linger,
    };
    let shutdown = shutdown_on_signal();
    let connector = portico_connector::start(config, shutdown)
        .await
        .context("connector failed to start")?;
    let metrics = connector
        .metrics_addr
        .map(|a| format!(" metrics=http://{a}"))
        .unwrap_or_default();
    out(format!(
        "listening connector={} group={}{metrics}",
        connector.id, connector.group
    ));
    connector.wait().await.context("connector stopped")
}

/// The largest `--oidc-client-secret-file` read.
const MAX_SECRET_FILE: u64 = 4096;

/// The OpenID client secret in `path` (`--oidc-client-secret-file`, of the
/// router or of an app): its first line, trimmed, which must not be empty.
/// The message never shows it.
pub(crate) fn read_client_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let flag = || format!("--oidc-client-secret-file {}", path.display());
    let len = std::fs::metadata(path).with_context(flag)?.len();
    anyhow::ensure!(
        len <= MAX_SECRET_FILE,
        "{} is {len} bytes; a client secret file may be at most {MAX_SECRET_FILE}",
        flag()
    );
    let text = std::fs::read_to_string(path).with_context(flag)?;
    let secret = text.lines().next().unwrap_or("").trim().to_owned();
    anyhow::ensure!(!secret.is_empty(), "{} is empty", flag());
    Ok(secret)
}
