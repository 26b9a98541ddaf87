//! Chaos: faults injected at given times during a run. A deployment (the
//! mesh command, or a test's `Deployment`) implements [`Chaos`]; the
//! generator calls it when each [`ChaosAction`] is due and records what
//! happened and when, for the JSON and the plots.

use std::future::Future;
use std::pin::Pin;

use crate::error::ChaosError;
pub use crate::scenario::{ChaosAction, ChaosVerb, Component};

/// The future [`Chaos::act`] returns.
pub type ChaosFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ChaosError>> + Send + 'a>>;

/// Something that can break (and mend) a deployment on cue.
///
/// Object-safe, so a run takes `Arc<dyn Chaos>`. Implement it with
/// `Box::pin(async move { ... })`:
///
/// ```
/// use portico_loadtest::chaos::{Chaos, ChaosAction, ChaosFuture};
/// struct Noop;
/// impl Chaos for Noop {
///     fn act<'a>(&'a self, _action: &'a ChaosAction) -> ChaosFuture<'a> {
///         Box::pin(async { Ok(()) })
///     }
/// }
/// ```
pub trait Chaos: Send + Sync {
    /// Performs `action`. Should return once it has taken effect (a kill
    /// has killed, a restart is up again or at least under way).
    fn act<'a>(&'a self, action: &'a ChaosAction) -> ChaosFuture<'a>;
}
