//! The `portico loadtest wan` command line: flags in tc-netem style
//! (`--delay 40ms --jitter 2ms --loss 0.5% --rate 100mbit --mtu 1280`), a
//! symmetric default with `--down-*` overrides for the target → client
//! direction, a relay mode that logs stats periodically, and a `--measure`
//! mode that puts an echo server behind the relay and prints configured
//! versus measured RTT.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{measure_rtt, start, EchoServer, Impairment, PathConfig, PathStats, WanError};

/// Flags of `portico loadtest wan`. Impairments apply to both directions
/// unless a `--down-*` flag overrides the target → client side; `--delay` is
/// one-way, so `--delay 20ms` gives a 40 ms RTT.
#[derive(Debug, Clone, clap::Args)]
pub struct WanArgs {
    /// Address clients (connectors) send to.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where to relay to (an edge's QUIC address). Not needed with --measure.
    #[arg(long, required_unless_present = "measure")]
    pub target: Option<SocketAddr>,
    /// One-way delay, e.g. 40ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    pub delay: Duration,
    /// Uniform jitter around the delay, e.g. 2ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    pub jitter: Duration,
    /// Random loss per datagram, e.g. 0.5% or 0.005.
    #[arg(long, value_parser = parse_ratio, default_value = "0")]
    pub loss: f64,
    /// Burstiness of loss in 0..1 (0: independent); the average stays --loss.
    #[arg(long, value_parser = parse_ratio, default_value = "0")]
    pub loss_correlation: f64,
    /// Share of datagrams held back so that later ones overtake them.
    #[arg(long, value_parser = parse_ratio, default_value = "0")]
    pub reorder: f64,
    /// Share of datagrams delivered twice.
    #[arg(long, value_parser = parse_ratio, default_value = "0")]
    pub duplicate: f64,
    /// Bandwidth cap, e.g. 100mbit, 1gbit, 500kbit (bits/s); 10mbps is bytes/s as in tc.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// Bottleneck queue before tail drop (with --rate), e.g. 256KiB.
    #[arg(long, value_parser = parse_bytes, default_value = "256KiB")]
    pub queue: usize,
    /// Drop datagrams whose UDP payload exceeds this many bytes.
    #[arg(long)]
    pub mtu: Option<usize>,
    /// Target → client delay (default: --delay).
    #[arg(long, value_parser = parse_duration)]
    pub down_delay: Option<Duration>,
    /// Target → client jitter (default: --jitter).
    #[arg(long, value_parser = parse_duration)]
    pub down_jitter: Option<Duration>,
    /// Target → client loss (default: --loss).
    #[arg(long, value_parser = parse_ratio)]
    pub down_loss: Option<f64>,
    /// Target → client reordering (default: --reorder).
    #[arg(long, value_parser = parse_ratio)]
    pub down_reorder: Option<f64>,
    /// Target → client duplication (default: --duplicate).
    #[arg(long, value_parser = parse_ratio)]
    pub down_duplicate: Option<f64>,
    /// Target → client bandwidth cap (default: --rate).
    #[arg(long, value_parser = parse_rate)]
    pub down_rate: Option<u64>,
    /// Target → client MTU (default: --mtu).
    #[arg(long)]
    pub down_mtu: Option<usize>,
    /// Measure instead of relaying: start a UDP echo server as the target,
    /// send this many probes through the relay, print configured vs measured
    /// RTT and exit.
    #[arg(long, value_name = "SAMPLES", num_args = 0..=1, default_missing_value = "200")]
    pub measure: Option<usize>,
    /// How often to log the counters.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub stats_interval: Duration,
    /// Client mappings idle this long are removed.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,
    /// Most client mappings at once.
    #[arg(long, default_value_t = 1024)]
    pub max_clients: usize,
    /// RNG seed, for reproducible loss/jitter patterns.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl WanArgs {
    /// The (up, down) impairments these flags describe.
    pub fn impairments(&self) -> (Impairment, Impairment) {
        let up = Impairment {
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss,
            loss_correlation: self.loss_correlation,
            reorder: self.reorder,
            duplicate: self.duplicate,
            rate_bps: self.rate,
            queue_bytes: self.queue,
            mtu: self.mtu,
        };
        let down = Impairment {
            delay: self.down_delay.unwrap_or(up.delay),
            jitter: self.down_jitter.unwrap_or(up.jitter),
            loss: self.down_loss.unwrap_or(up.loss),
            loss_correlation: up.loss_correlation,
            reorder: self.down_reorder.unwrap_or(up.reorder),
            duplicate: self.down_duplicate.unwrap_or(up.duplicate),
            rate_bps: self.down_rate.or(up.rate_bps),
            queue_bytes: up.queue_bytes,
            mtu: self.down_mtu.or(up.mtu),
        };
        (up, down)
    }

    fn path_config(&self, target: SocketAddr) -> PathConfig {
        let (up, down) = self.impairments();
        PathConfig {
            listen: self.listen,
            target,
            up,
            down,
            idle_timeout: self.idle_timeout,
            max_clients: self.max_clients,
            seed: self.seed,
        }
    }
}

/// Runs the command: relays until `shutdown` (logging stats every
/// `--stats-interval` and on exit), or with `--measure` prints one
/// measurement to stdout and returns.
pub async fn run_cli(args: WanArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(samples) = args.measure {
        return run_measure(&args, samples, shutdown).await;
    }
    let target = args
        .target
        .ok_or_else(|| anyhow::anyhow!("--target is required unless --measure is given"))?;
    let path = start(args.path_config(target), shutdown.clone()).await?;
    let (up, down) = path.impairments();
    tracing::info!(addr = %path.local_addr(), %target, ?up, ?down, "listening");
    let mut tick = tokio::time::interval(args.stats_interval.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => log_stats(&path.stats(), false),
        }
    }
    log_stats(&path.stats(), true);
    path.wait().await;
    Ok(())
}

async fn run_measure(
    args: &WanArgs,
    samples: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token = shutdown.child_token();
    let echo_bind = SocketAddr::new(args.listen.ip(), 0);
    let echo = EchoServer::start(echo_bind, token.clone()).await?;
    let path = start(args.path_config(echo.local_addr()), token.clone()).await?;
    let (up, down) = path.impairments();
    let configured = up.delay + down.delay;
    let report = measure_rtt(path.local_addr(), samples).await?;
    let stats = path.stats();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "configured RTT {:.3} ms (up {:?} ± {:?}, down {:?} ± {:?})",
        ms(configured),
        up.delay,
        up.jitter,
        down.delay,
        down.jitter
    )?;
    writeln!(out, "measured   {report}")?;
    writeln!(
        out,
        "error      min {:+.3} ms, p50 {:+.3} ms, p99 {:+.3} ms",
        ms(report.min) - ms(configured),
        ms(report.p50) - ms(configured),
        ms(report.p99) - ms(configured)
    )?;
    writeln!(out, "{}", serde_json::to_string(&stats)?)?;
    drop(out);
    token.cancel();
    path.wait().await;
    echo.shutdown().await;
    Ok(())
}

fn log_stats(s: &PathStats, last: bool) {
    tracing::info!(
        last,
        clients = s.clients,
        up_received = s.up.received,
        up_forwarded = s.up.forwarded,
        up_dropped = s.up.dropped.total(),
        up_loss = s.up.dropped.loss,
        up_queue = s.up.dropped.queue,
        up_mtu = s.up.dropped.mtu,
        up_blackhole = s.up.dropped.blackhole,
        up_duplicated = s.up.duplicated,
        up_reordered = s.up.reordered,
        down_received = s.down.received,
        down_forwarded = s.down.forwarded,
        down_dropped = s.down.dropped.total(),
        down_loss = s.down.dropped.loss,
        down_queue = s.down.dropped.queue,
        down_mtu = s.down.dropped.mtu,
        down_blackhole = s.down.dropped.blackhole,
        down_duplicated = s.down.duplicated,
        down_reordered = s.down.reordered,
        "wan stats"
    );
}

fn parse_err(what: &'static str, input: &str, expected: &'static str) -> WanError {
    WanError::Parse {
        what,
        input: input.to_owned(),
        expected,
    }
}

/// Parses a duration (humantime): `40ms`, `2s`, `1s 500ms`; a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, WanError> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|_| parse_err("duration", s, "e.g. 40ms, 2s"))
}

/// Parses a probability: `0.5%` or `0.005`.
pub fn parse_ratio(s: &str) -> Result<f64, WanError> {
    let t = s.trim();
    let expected = "a probability such as 0.5% or 0.005";
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| parse_err("ratio", s, expected))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(parse_err("ratio", s, expected))
    }
}

fn split_unit(s: &str) -> (&str, String) {
    let t = s.trim();
    let at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    (&t[..at], t[at..].trim().to_ascii_lowercase())
}

/// Parses a rate into bits per second, with tc's units: `bit` (or none),
/// `kbit`, `mbit`, `gbit` are bits/s; `bps`, `kbps`, `mbps`, `gbps` are
/// bytes/s. Multipliers are decimal.
pub fn parse_rate(s: &str) -> Result<u64, WanError> {
    let expected = "a rate such as 100mbit, 1gbit or 10mbps (bytes/s)";
    let (num, unit) = split_unit(s);
    let n: f64 = num.parse().map_err(|_| parse_err("rate", s, expected))?;
    let mult = match unit.as_str() {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => return Err(parse_err("rate", s, expected)),
    };
    let bps = (n * mult).round();
    if bps >= 1.0 && bps < u64::MAX as f64 {
        Ok(bps as u64)
    } else {
        Err(parse_err("rate", s, expected))
    }
}

/// Parses a size: `1500`, `64KiB`, `1MiB`, `64kb` (decimal), `2MB`.
pub fn parse_bytes(s: &str) -> Result<usize, WanError> {
    let expected = "a size such as 1500, 64KiB or 1MB";
    let (num, unit) = split_unit(s);
    let n: f64 = num.parse().map_err(|_| parse_err("size", s, expected))?;
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(parse_err("size", s, expected)),
    };
    let v = (n * mult).round();
    if v >= 1.0 && v < usize::MAX as f64 {
        Ok(v as usize)
    } else {
        Err(parse_err("size", s, expected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        wan: WanArgs,
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1.5gbit").unwrap(), 1_500_000_000);
        assert_eq!(parse_rate("10mbps").unwrap(), 80_000_000);
        assert_eq!(parse_rate("64000").unwrap(), 64_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0mbit").is_err());
        assert_eq!(parse_ratio("0.5%").unwrap(), 0.005);
        assert_eq!(parse_ratio("0.25").unwrap(), 0.25);
        assert!(parse_ratio("150%").is_err());
        assert!(parse_ratio("x").is_err());
        assert_eq!(parse_bytes("64KiB").unwrap(), 65_536);
        assert_eq!(parse_bytes("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_duration("40ms").unwrap(), Duration::from_millis(40));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn symmetric_with_down_overrides() {
        let cli = Cli::try_parse_from([
            "wan",
            "--target",
            "127.0.0.1:4433",
            "--delay",
            "40ms",
            "--jitter",
            "2ms",
            "--loss",
            "0.5%",
            "--rate",
            "100mbit",
            "--mtu",
            "1280",
            "--down-delay",
            "10ms",
            "--down-loss",
            "0",
        ])
        .unwrap();
        let (up, down) = cli.wan.impairments();
        assert_eq!(up.delay, Duration::from_millis(40));
        assert_eq!(up.loss, 0.005);
        assert_eq!(up.rate_bps, Some(100_000_000));
        assert_eq!(down.delay, Duration::from_millis(10));
        assert_eq!(down.jitter, Duration::from_millis(2));
        assert_eq!(down.loss, 0.0);
        assert_eq!(down.mtu, Some(1280));
        assert!(
            Cli::try_parse_from(["wan"]).is_err(),
            "--target is required"
        );
        let m = Cli::try_parse_from(["wan", "--measure"]).unwrap();
        assert_eq!(m.wan.measure, Some(200));
    }
}
