//! Majority time: the time no minority of nodes can move.
//!
//! Every node's wall clock may be wrong (a bad NTP step, a VM restored from an old image). A
//! shard's clock decides what expires and what is evicted, so no single node's clock may
//! move it: a leader learns the wall clock of each voter from the messages it receives (each
//! carries its sender's clock, see `message`), and the **majority time** is the largest time
//! a majority of the voters have reached: the k-th largest of the clocks reported within
//! [`CLOCK_FRESH`], k the majority size. A voter not heard from within that bound has reached
//! no time. A clock entry carries the majority time as its target, and apply advances the
//! shard's clock towards it (see `oneid_state::retention`), never past it.
//!
//! A node uses the same table, fed by its peers' pings, for the cluster's time: what it dates
//! events by, and how far its own clock is off.

use oneid_protocol::num::Millis;
use std::collections::BTreeMap;
use std::time::Duration;

/// How recent a voter's reported clock must be to count towards the majority time.
/// Leaders hear from followers every heartbeat (a tick), nodes from peers every ping (half a
/// second): the bound allows for a few lost.
pub const CLOCK_FRESH: Duration = Duration::from_secs(2);

/// The wall clocks peers reported, each with when it arrived on the receiver's monotonic
/// clock. Bounded by the number of peers (the shell reports only its shard's or cluster's
/// members).
#[derive(Debug, Clone, Default)]
pub struct PeerClocks {
    reports: BTreeMap<u64, Report>,
}

#[derive(Debug, Clone, Copy)]
struct Report {
    wall: Millis,
    arrived: Duration,
}

impl PeerClocks {
    /// `peer` reported wall clock `wall`, which arrived at `arrived` (the receiver's monotonic
    /// clock). The latest report replaces the earlier one, even if its clock is behind: a
    /// clock that was stepped back is believed from then on.
    pub fn report(&mut self, peer: u64, wall: Millis, arrived: Duration) {
        self.reports.insert(peer, Report { wall, arrived });
    }

    /// The clock `peer` reported within [`CLOCK_FRESH`] before `now` (the receiver's monotonic
    /// clock), if any.
    pub fn fresh(&self, peer: u64, now: Duration) -> Option<Millis> {
        self.reports
            .get(&peer)
            .filter(|report| now.saturating_sub(report.arrived) <= CLOCK_FRESH)
            .map(|report| report.wall)
    }

    /// `peer`'s clock now, as estimated from its fresh report: the report plus the time
    /// since it arrived (on this node's monotonic clock).
    pub fn estimate(&self, peer: u64, now: Duration) -> Option<Millis> {
        let report = self.reports.get(&peer)?;
        let age = now.saturating_sub(report.arrived);
        (age <= CLOCK_FRESH).then(|| Millis(report.wall.0.saturating_add(age.as_millis() as i64)))
    }

    /// The majority time of `voters`, one of which may be this node (`own`: its id and its
    /// wall clock, always fresh), at `now` on this node's monotonic clock: `None` if fewer
    /// than a majority of them were heard from within [`CLOCK_FRESH`].
    pub fn majority_time(
        &self,
        voters: impl IntoIterator<Item = u64>,
        own: (u64, Millis),
        now: Duration,
    ) -> Option<Millis> {
        majority_of(voters.into_iter().map(|id| match id == own.0 {
            true => Some(own.1),
            false => self.fresh(id, now),
        }))
    }
}

/// The majority time of voters whose times are `times` (`None`: not heard from): the k-th
/// largest, k the majority of them all, if at least k have a time.
pub fn majority_of(times: impl IntoIterator<Item = Option<Millis>>) -> Option<Millis> {
    let mut n_voters = 0;
    let mut heard: Vec<Millis> = times
        .into_iter()
        .inspect(|_| n_voters += 1)
        .flatten()
        .collect();
    let majority = n_voters / 2 + 1;
    heard.sort_unstable_by(|a, b| b.cmp(a));
    heard.get(majority - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Millis = Millis(1_767_225_600_000);
    const SECOND: Duration = Duration::from_secs(1);
    const DAY_MS: i64 = 86_400_000;

    fn at(offset_ms: i64) -> Millis {
        Millis(T.0 + offset_ms)
    }

    #[test]
    fn no_minority_moves_the_majority_time() {
        let mut clocks = PeerClocks::default();
        // Node 1 (this one) is 30 days ahead; 2 and 3 are right.
        clocks.report(2, at(0), SECOND);
        clocks.report(3, at(-5), SECOND);
        let own = (1, at(30 * DAY_MS));
        assert_eq!(clocks.majority_time([1, 2, 3], own, SECOND), Some(at(0)));
        // 30 days behind instead: the two others' smaller clock.
        let own = (1, at(-30 * DAY_MS));
        assert_eq!(clocks.majority_time([1, 2, 3], own, SECOND), Some(at(-5)));
        // A follower 30 days ahead does not move it either: the second largest is this
        // node's clock.
        clocks.report(3, at(30 * DAY_MS), SECOND);
        assert_eq!(
            clocks.majority_time([1, 2, 3], (1, at(7)), SECOND),
            Some(at(7))
        );
        // Five voters: the third largest.
        clocks.report(4, at(40 * DAY_MS), SECOND);
        clocks.report(5, at(-1), SECOND);
        assert_eq!(
            clocks.majority_time([1, 2, 3, 4, 5], (1, at(7)), SECOND),
            Some(at(7))
        );
    }

    #[test]
    fn a_voter_not_heard_from_lately_has_reached_no_time() {
        let mut clocks = PeerClocks::default();
        clocks.report(2, at(0), SECOND);
        clocks.report(3, at(30 * DAY_MS), SECOND);
        let own = (1, at(10));
        // Within the bound: the second largest of three.
        assert_eq!(
            clocks.majority_time([1, 2, 3], own, SECOND + CLOCK_FRESH),
            Some(at(10))
        );
        // Node 2 went silent: this node and the fast one are a majority, and the smaller
        // of the two is this node's.
        clocks.report(3, at(30 * DAY_MS), 3 * SECOND);
        assert_eq!(
            clocks.majority_time([1, 2, 3], own, 3 * SECOND + CLOCK_FRESH),
            Some(at(10))
        );
        assert_eq!(clocks.fresh(2, 3 * SECOND + CLOCK_FRESH), None);
        // Both silent: no majority.
        assert_eq!(
            clocks.majority_time([1, 2, 3], own, 4 * SECOND + CLOCK_FRESH),
            None
        );
        // A single voter is its own majority; a stranger's report counts for nothing.
        assert_eq!(clocks.majority_time([1], own, 9 * SECOND), Some(at(10)));
        assert_eq!(clocks.majority_time([2, 4], own, 9 * SECOND), None);
    }

    #[test]
    fn a_clock_stepped_back_is_believed() {
        let mut clocks = PeerClocks::default();
        clocks.report(2, at(30 * DAY_MS), SECOND);
        clocks.report(2, at(0), 2 * SECOND);
        assert_eq!(clocks.fresh(2, 2 * SECOND), Some(at(0)));
    }

    #[test]
    fn an_estimate_is_the_fresh_report_aged() {
        let mut clocks = PeerClocks::default();
        clocks.report(2, at(0), SECOND);
        assert_eq!(clocks.estimate(2, SECOND + CLOCK_FRESH), Some(at(2_000)));
        assert_eq!(clocks.estimate(2, 2 * SECOND + CLOCK_FRESH), None);
        assert_eq!(clocks.estimate(3, SECOND), None);
        assert_eq!(majority_of([None, None, Some(at(1))]), None);
        assert_eq!(majority_of([None, Some(at(2)), Some(at(1))]), Some(at(1)));
        assert_eq!(majority_of([]), None);
    }
}
