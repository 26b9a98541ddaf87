//! Logging setup: human-readable or JSON lines on stderr, filtered by
//! `--log` or `RUST_LOG`. The human format is coloured only on a terminal,
//! and never when `NO_COLOR` is set (<https://no-color.org>): a log file or
//! a journal gets plain text.

use std::ffi::OsStr;
use std::io::IsTerminal as _;

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event, for log shippers.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "PORTICO_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, for example `info` or `portico_edge=debug,info`
    /// (RUST_LOG syntax). RUST_LOG wins when set.
    #[arg(
        long = "log",
        global = true,
        default_value = "info",
        env = "PORTICO_LOG"
    )]
    pub level: String,
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(args: &LogArgs) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| args.level.clone());
    let filter = EnvFilter::try_new(quiet_dependencies(&spec))
        .unwrap_or_else(|_| EnvFilter::new(quiet_dependencies("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `spec` with hickory-server (the router's DNS listeners) held to
/// warnings unless `spec` names it: it logs two lines at `info` for every
/// query, which the router counts in a metric instead.
fn quiet_dependencies(spec: &str) -> String {
    if spec.contains("hickory") {
        spec.to_owned()
    } else if spec.trim().is_empty() {
        "hickory_server=warn".to_owned()
    } else {
        format!("{spec},hickory_server=warn")
    }
}

/// Whether the human format may use ANSI colours: only on a terminal, and
/// not when `NO_COLOR` is set to anything but the empty string.
fn colour(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hickory_server_logs_warnings_unless_asked_for() {
        assert_eq!(quiet_dependencies("info"), "info,hickory_server=warn");
        assert_eq!(
            quiet_dependencies("portico_edge=debug,info"),
            "portico_edge=debug,info,hickory_server=warn"
        );
        assert_eq!(
            quiet_dependencies("hickory_server=debug"),
            "hickory_server=debug"
        );
        assert_eq!(quiet_dependencies(""), "hickory_server=warn");
        EnvFilter::try_new(quiet_dependencies("debug")).expect("a valid filter");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }
}
