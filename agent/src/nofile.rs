//! The process's open-file limit (`RLIMIT_NOFILE`).
//!
//! Every socket is a file descriptor, and the usual soft limit (1,024 on
//! many systems) is far below what an edge or a connector needs, while the
//! hard limit is usually much higher. [`raise`] lifts the soft limit to the
//! hard limit once at start; [`soft_limit`] tells the components what they
//! may size their connection caps from.

use std::io;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The open-file limits before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (`u64::MAX`: unlimited).
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard limit and returns both.
///
/// Linux refuses an unlimited soft limit for open files: with an unlimited
/// hard limit, the soft limit goes to `fs.nr_open` (the kernel's ceiling,
/// 1,048,576 by default). Never lowers the limit.
pub fn raise() -> io::Result<Raised> {
    let current = getrlimit(Resource::Nofile);
    let before = current.current.unwrap_or(u64::MAX);
    let hard = current.maximum.unwrap_or(u64::MAX);
    let soft = target(before, hard, nr_open());
    if soft != before {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(soft),
                maximum: current.maximum,
            },
        )?;
    }
    Ok(Raised {
        before,
        soft: soft_limit(),
        hard,
    })
}

/// The soft open-file limit in force (`u64::MAX`: unlimited): the most
/// descriptors this process may hold. Size connection and backend caps
/// from it, leaving a reserve for listeners, the state directory and
/// metrics.
pub fn soft_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The soft limit to ask for: the hard limit, capped by the kernel's
/// ceiling where the hard limit is unlimited; never below `soft`.
fn target(soft: u64, hard: u64, nr_open: Option<u64>) -> u64 {
    let want = if hard == u64::MAX {
        nr_open.unwrap_or(1 << 20)
    } else {
        hard
    };
    want.max(soft)
}

/// `fs.nr_open`, the most descriptors Linux lets one process open.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_hard_limit_or_the_kernel_ceiling() {
        assert_eq!(target(1024, 524_288, Some(1_048_576)), 524_288);
        assert_eq!(target(1024, u64::MAX, Some(1_048_576)), 1_048_576);
        assert_eq!(target(1024, u64::MAX, None), 1 << 20);
        // Never lowered: an unlimited soft limit stays so.
        assert_eq!(target(u64::MAX, u64::MAX, Some(1_048_576)), u64::MAX);
        assert_eq!(target(4096, 4096, None), 4096);
    }

    #[test]
    fn raise_lifts_the_soft_limit_to_the_hard_limit() {
        let raised = raise().expect("raising up to the hard limit is allowed");
        assert_eq!(raised.soft, soft_limit());
        assert!(raised.soft >= raised.before);
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        assert_eq!(raised.hard, hard);
        if hard != u64::MAX {
            assert_eq!(raised.soft, hard);
        }
        // Idempotent.
        assert_eq!(raise().unwrap().soft, raised.soft);
    }
}
