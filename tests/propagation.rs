//! How long a configuration change takes to reach every edge: a router,
//! three regions of two edges each, and a series of changes (apps created
//! one after another). Each edge logs, per version it receives, how long
//! after the router's store committed it the change arrived
//! (`EdgeConfig.changed_at_ms`; one machine, one clock). Prints p50, p99
//! and the maximum over every edge and change, and checks that every edge
//! got every change. Ignored by default: a benchmark, run with
//!
//! ```sh
//! cargo test --release --test propagation -- --ignored --nocapture
//! ```
//!
//! The figures go to BENCHMARKS.md; nothing here asserts a time.

mod common;

use std::time::Duration;

use common::{eventually, Child, RouterProc};

const LIMIT: Duration = Duration::from_secs(60);
/// Changes made, one after another.
const CHANGES: usize = 40;
/// The pause between two changes.
const SPACING: Duration = Duration::from_millis(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn a_change_reaches_every_edge_of_three_regions() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut router = RouterProc::start(d, &[]).await;
    let regions = ["eu-west", "us-east", "ap-south"];
    for r in regions {
        router.admin(&["region", "create", r]).await;
    }
    let mut edges = Vec::new();
    for (i, region) in regions.iter().flat_map(|r| [r, r]).enumerate() {
        let (edge, _) = router.edge(&d.join(format!("edge-{i}")), region, &[]).await;
        edges.push(edge);
    }
    // Every edge loaded a config and holds its watch.
    for e in &mut edges {
        e.line_containing("config loaded", LIMIT).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    for i in 0..CHANGES {
        let name = format!("bench-{i}");
        router
            .admin(&[
                "app",
                "create",
                &name,
                "--internal-url",
                "http://127.0.0.1:9/",
            ])
            .await;
        tokio::time::sleep(SPACING).await;
    }
    // The last change reached every edge.
    let last = |out: &str| {
        out.lines()
            .filter(|l| l.contains("config change arrived"))
            .filter_map(|l| Child::field(l, "version")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    let want = last(&edges[0].output()).max(1);
    eventually("every edge at the last version", LIMIT, || async {
        let lowest = edges.iter().map(|e| last(&e.output())).min().unwrap_or(0);
        (lowest >= want).then_some(())
    })
    .await;
    let mut samples: Vec<u64> = Vec::new();
    let mut per_edge = Vec::new();
    for e in &edges {
        let out = e.output();
        let mine: Vec<u64> = out
            .lines()
            .filter(|l| l.contains("config change arrived"))
            .filter_map(|l| Child::field(l, "propagation_ms")?.parse().ok())
            .collect();
        // The last CHANGES arrivals are the measured ones (the first ones
        // may be the region and token changes of the setup).
        let measured: Vec<u64> = mine.iter().rev().take(CHANGES).copied().collect();
        per_edge.push(measured.len());
        samples.extend(measured);
    }
    samples.sort_unstable();
    let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    eprintln!(
        "propagation over {} edges x {CHANGES} changes ({} samples; per edge {per_edge:?}): \
         p50 {} ms, p99 {} ms, max {} ms",
        edges.len(),
        samples.len(),
        q(0.5),
        q(0.99),
        samples.last().copied().unwrap_or(0)
    );
    for mut e in edges {
        e.kill().await;
    }
    router.child.kill().await;
}
