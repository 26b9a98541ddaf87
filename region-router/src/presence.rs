//! Which connectors are attached where, from the edges' latest reports.
//!
//! Every edge posts an `EdgeReport` every [`EDGE_REPORT_INTERVAL`] and at
//! once when one of its tunnels comes or goes. The router keeps only each
//! edge's latest report, in memory: a connector is active while the latest
//! *fresh* report (received within [`REPORT_FRESH_INTERVALS`] intervals) of
//! at least one edge lists it. When an edge's next report leaves it out, it
//! is inactive at once; when an edge stops reporting, what it said stops
//! counting once its report is no longer fresh. An edge is active while its
//! own latest report is fresh.
//!
//! The clock is an argument, so that the rules are tested without waiting.
//! After a router restart everything is inactive until the edges report
//! again, within one interval.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use portico_proto::api::{EDGE_REPORT_INTERVAL, REPORT_FRESH_INTERVALS};
use portico_proto::ids::{ConnectorId, EdgeId};

/// How long an edge's latest report counts.
pub(crate) const REPORT_FRESH: Duration =
    Duration::from_secs(EDGE_REPORT_INTERVAL.as_secs() * REPORT_FRESH_INTERVALS as u64);

/// The latest report of every edge that reported since the router started.
/// Bounded by the number of enrolled edges (only they can report, and a
/// deleted edge's entry is removed) times the tunnels one report may list.
/// Cloned into each [`crate::snapshot::Snapshot`].
#[derive(Debug, Default, Clone)]
pub(crate) struct Presence {
    edges: HashMap<EdgeId, Report>,
}

#[derive(Debug, Clone)]
struct Report {
    at: Instant,
    /// Each attached connector and its tunnel count on that edge.
    connectors: Vec<(ConnectorId, u32)>,
}

/// What the fresh reports say about one connector.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Attached {
    /// The edges whose latest fresh report lists it, sorted.
    pub edges: Vec<EdgeId>,
    /// Its tunnels across those edges.
    pub tunnels: u32,
}

impl Attached {
    pub(crate) fn is_active(&self) -> bool {
        !self.edges.is_empty()
    }
}

impl Presence {
    /// Replaces what `edge` said before.
    pub(crate) fn report(
        &mut self,
        edge: EdgeId,
        connectors: Vec<(ConnectorId, u32)>,
        now: Instant,
    ) {
        self.edges.insert(
            edge,
            Report {
                at: now,
                connectors,
            },
        );
    }

    /// Forgets a deleted edge.
    pub(crate) fn remove(&mut self, edge: &EdgeId) {
        self.edges.remove(edge);
    }

    /// How many distinct connectors the fresh reports of `edges` list
    /// (a connector attached to two of them counts once): a region's
    /// attached connectors.
    pub(crate) fn connectors_on<'a>(
        &self,
        edges: impl IntoIterator<Item = &'a EdgeId>,
        now: Instant,
    ) -> usize {
        let mut seen = std::collections::HashSet::new();
        for edge in edges {
            if let Some(report) = self.edges.get(edge).filter(|r| fresh(r, now)) {
                seen.extend(report.connectors.iter().map(|(id, _)| id));
            }
        }
        seen.len()
    }

    /// Where `connector` is attached, by the fresh reports.
    pub(crate) fn connector(&self, connector: &ConnectorId, now: Instant) -> Attached {
        let mut attached = Attached::default();
        for (edge, report) in self.edges.iter().filter(|(_, r)| fresh(r, now)) {
            if let Some((_, n)) = report.connectors.iter().find(|(id, _)| id == connector) {
                attached.edges.push(edge.clone());
                attached.tunnels = attached.tunnels.saturating_add(*n);
            }
        }
        attached.edges.sort();
        attached
    }
}

fn fresh(report: &Report, now: Instant) -> bool {
    now.saturating_duration_since(report.at) <= REPORT_FRESH
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str) -> EdgeId {
        EdgeId::new(id).unwrap()
    }

    fn conn(id: &str) -> ConnectorId {
        ConnectorId::new(id).unwrap()
    }

    #[test]
    fn the_window_is_three_report_intervals() {
        assert_eq!(REPORT_FRESH, Duration::from_secs(15));
    }

    #[test]
    fn connectors_on_edges_count_each_connector_once_from_fresh_reports() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.report(edge("e-a"), vec![(conn("c-1"), 2), (conn("c-2"), 1)], t0);
        p.report(edge("e-b"), vec![(conn("c-1"), 1), (conn("c-3"), 4)], t0);
        p.report(edge("e-c"), vec![(conn("c-9"), 1)], t0);
        let (a, b) = (edge("e-a"), edge("e-b"));
        assert_eq!(p.connectors_on([&a, &b], t0), 3, "c-1 counts once");
        assert_eq!(p.connectors_on([&a], t0), 2);
        assert_eq!(p.connectors_on([&edge("e-never")], t0), 0);
        assert_eq!(p.connectors_on(std::iter::empty(), t0), 0);
        // e-a's report goes stale while e-b reports again.
        let later = t0 + REPORT_FRESH + Duration::from_millis(1);
        p.report(edge("e-b"), vec![(conn("c-3"), 4)], later);
        assert_eq!(p.connectors_on([&a, &b], later), 1);
    }

    #[test]
    fn a_connector_is_active_while_a_fresh_latest_report_lists_it() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Presence::default();
        assert!(!p.connector(&conn("c-1"), t0).is_active(), "never reported");

        p.report(edge("e-a"), vec![(conn("c-1"), 2)], t0);
        p.report(
            edge("e-b"),
            vec![(conn("c-1"), 1), (conn("c-2"), 4)],
            t0 + s(1),
        );
        assert_eq!(
            p.connector(&conn("c-1"), t0 + s(2)),
            Attached {
                edges: vec![edge("e-a"), edge("e-b")],
                tunnels: 3
            }
        );
        assert_eq!(p.connector(&conn("c-2"), t0 + s(2)).edges, [edge("e-b")]);

        // The edge's next report leaves c-2 out: inactive at once, however
        // recently it was listed.
        p.report(edge("e-b"), vec![(conn("c-1"), 1)], t0 + s(3));
        assert!(!p.connector(&conn("c-2"), t0 + s(3)).is_active());

        // e-a stops reporting: its report counts for 15 s, and not a
        // moment longer; e-b's later report still does.
        assert_eq!(p.connector(&conn("c-1"), t0 + s(15)).tunnels, 2 + 1);
        let later = t0 + s(15) + Duration::from_millis(1);
        assert_eq!(
            p.connector(&conn("c-1"), later),
            Attached {
                edges: vec![edge("e-b")],
                tunnels: 1
            }
        );
        // Both silent: nothing is active.
        let silent = t0 + s(3) + REPORT_FRESH + Duration::from_millis(1);
        assert!(!p.connector(&conn("c-1"), silent).is_active());

        // A fresh report brings it back; a deleted edge is forgotten.
        p.report(edge("e-a"), vec![(conn("c-1"), 2)], silent);
        assert!(p.connector(&conn("c-1"), silent).is_active());
        p.remove(&edge("e-a"));
        assert!(!p.connector(&conn("c-1"), silent).is_active());
    }
}
