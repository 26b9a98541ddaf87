//! Shards: the connector's tunnels on N single-thread runtimes, one per
//! core, as on the edge (its `shard.rs` says why).
//!
//! Tunnel slot `i` runs on shard `i % N`, dials from a UDP socket that
//! shard drives, and serves every stream of its tunnel there; each shard
//! has its own pool of backend connections per app (the caps stay the
//! connector's: `origin::Limit`). A request thus stays on one thread from
//! the tunnel to the backend and back. Shard 0 is the runtime `start` runs
//! on, which also runs the config watch, renewals and metrics.

use std::cell::Cell;
use std::num::NonZeroUsize;

use tokio_util::sync::CancellationToken;

use crate::error::Error;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The shard this thread runs (0 for any thread that is not a shard's).
pub(crate) fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The runtimes of the shards: the caller's, then one thread each.
#[derive(Debug)]
pub(crate) struct Shards {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Cancelled by [`Shards::stop`]: the shard threads end.
    stop: CancellationToken,
}

impl Shards {
    /// Starts `n - 1` shard threads; shard 0 is the current runtime.
    pub(crate) fn start(n: NonZeroUsize) -> Result<Shards, Error> {
        let stop = CancellationToken::new();
        let mut handles = vec![tokio::runtime::Handle::current()];
        let mut threads = Vec::new();
        for index in 1..n.get() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::Runtime { source })?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("connector-shard-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(index));
                    // Polls what the connector spawns here until it stops.
                    runtime.block_on(stop.cancelled());
                })
                .map_err(|source| Error::Runtime { source })?;
            threads.push(thread);
        }
        Ok(Shards {
            handles,
            threads,
            stop,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// The runtime of tunnel slot `slot`.
    pub(crate) fn for_slot(&self, slot: usize) -> &tokio::runtime::Handle {
        &self.handles[slot % self.handles.len()]
    }

    /// Ends the shard threads (after the connector's tasks are done) and
    /// joins them.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for Shards {
    /// Never leaves a shard thread waiting for a connector that is gone.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
