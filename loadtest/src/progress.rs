//! The live progress bar (indicatif, on stderr): elapsed time against the
//! planned duration (or completed requests against the count), with the
//! current rate, errors, p50 and p99. Drawn only when stderr is a terminal.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::stats::Recorder;

const TICK: Duration = Duration::from_millis(500);

pub(crate) fn spawn(
    tracker: &TaskTracker,
    rec: Arc<Recorder>,
    total: Option<Duration>,
    count: Option<u64>,
    done: CancellationToken,
) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let (len, by_time) = match (total, count) {
        (Some(d), _) => (u64::try_from(d.as_millis()).unwrap_or(u64::MAX), true),
        (None, Some(c)) => (c, false),
        (None, None) => (0, false),
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template = if by_time {
        "{spinner} [{elapsed_precise}] [{bar:30}] {percent:>3}% {msg}"
    } else {
        "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    tracker.spawn(async move {
        let start = rec.start();
        let mut last = (Instant::now(), 0u64);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = done.cancelled() => break,
            }
            let live = rec.take_recent();
            let now = Instant::now();
            let dt = now.duration_since(last.0).as_secs_f64();
            let rate = if dt > 0.0 {
                live.completed.saturating_sub(last.1) as f64 / dt
            } else {
                0.0
            };
            last = (now, live.completed);
            bar.set_position(if by_time {
                u64::try_from(now.duration_since(start).as_millis()).unwrap_or(u64::MAX)
            } else {
                live.completed
            });
            bar.set_message(format!(
                "{rate:>8.0} req/s  errors {}  p50 {:.2}ms  p99 {:.2}ms",
                live.errors,
                live.p50_us as f64 / 1000.0,
                live.p99_us as f64 / 1000.0,
            ));
        }
        bar.finish_and_clear();
    });
}
