//! Wall clocks that go wrong. Each node's wall clock is the simulation's, off by an offset,
//! running slow or fast, and stepped forward and back now and then (a bad NTP step); one node
//! at a time may be days off (a VM restored from an old image), a minority of the voters of
//! every shard. Shard clocks must follow the majority of each shard's voters whatever the
//! others' clocks do: no replica's shard clock ever passes the largest time a majority of the
//! shard's voters' clocks have reached, nor evicts exactly-once records or expires anything
//! before its time by it ([`World::check_shard_clocks`]); and once the cluster settles every
//! shard's clock is close behind its voters' majority time.

use super::World;
use oneid_protocol::ids::ShardId;
use oneid_protocol::num::{Millis, DAY_MS};
use oneid_state::retention::CLOCK_STEP_MAX_MS;

/// How far one node's clock goes when it is far off: days, as a VM restored from an old
/// image, forward or back.
const FAR_OFF_MS: i64 = 30 * DAY_MS;
/// The largest small step of a clock, forward or back.
const STEP_MS_MAX: i64 = 5_000;
/// A settled shard's clock is at most this far behind its voters' majority time: one clock
/// interval and the freshness of the clocks reported, with room for a slow tick.
const SETTLED_LAG_MS_MAX: i64 = 5_000;

/// A node's wall clock, as a function of the simulation's time.
#[derive(Debug, Clone)]
pub(super) struct WallClock {
    /// Its reading at simulation time `since`, relative to the simulation's epoch.
    offset_ms: i64,
    since: u64,
    /// How much faster it runs, in thousandths (negative: slower).
    drift_per_mille: i64,
    /// The largest reading it gave before its last step (a clock stepped back has still
    /// reached its earlier time).
    peak: i64,
    /// Whether it is days off now.
    far_off: bool,
    /// Whether it was ever days off: only one node's clock in a run is (its peak stays days
    /// off), so the days-off clocks never make a majority.
    was_far_off: bool,
}

impl WallClock {
    pub(super) fn new(rng: &mut fastrand::Rng) -> WallClock {
        // Most clocks run at the right rate; some drift (a slow and a fast one).
        let drift_per_mille = match rng.u32(0..4) {
            0 => rng.i64(-50..=50),
            _ => 0,
        };
        WallClock {
            offset_ms: rng.i64(-2_000..=2_000),
            since: 0,
            drift_per_mille,
            peak: i64::MIN,
            far_off: false,
            was_far_off: false,
        }
    }

    /// Its reading at simulation time `now`, from the simulation's epoch.
    pub(super) fn read(&self, now: u64) -> i64 {
        let elapsed = (now - self.since) as i64;
        now as i64 + self.offset_ms + elapsed * self.drift_per_mille / 1_000
    }

    /// The largest reading it has given by `now`.
    fn reached(&self, now: u64) -> i64 {
        self.peak.max(self.read(now))
    }

    /// Sets its reading at `now` to `reading` (from the simulation's epoch).
    fn step_to(&mut self, now: u64, reading: i64) {
        self.peak = self.reached(now);
        self.offset_ms = reading - now as i64;
        self.since = now;
    }
}

impl World {
    /// Steps one node's clock: a few seconds forward or back, or (one node at a time) days
    /// off, or back from days off.
    pub(super) fn step_clock(&mut self, node: usize) {
        let now = self.now;
        let others_far_off =
            (0..self.shape.nodes).any(|n| n != node && self.nodes[n].clock.was_far_off);
        let clock = &mut self.nodes[node].clock;
        let right = now as i64 + self.rng.i64(-2_000..=2_000);
        if clock.far_off {
            clock.step_to(now, right);
            clock.far_off = false;
        } else if !others_far_off && self.rng.u32(0..3) == 0 {
            let far = if self.rng.bool() {
                FAR_OFF_MS
            } else {
                -FAR_OFF_MS
            };
            clock.step_to(now, right + far);
            clock.far_off = true;
            clock.was_far_off = true;
            self.cover("a clock days off");
        } else {
            let step = self.rng.i64(-STEP_MS_MAX..=STEP_MS_MAX);
            let reading = clock.read(now) + step;
            clock.step_to(now, reading);
        }
    }

    /// The largest time a majority of shard `shard`'s voters' clocks have reached (any of
    /// them may have reported what it reached), from the simulation's epoch.
    fn majority_reached(&self, shard: ShardId) -> i64 {
        let voters = self.placement(shard);
        let reached = voters
            .iter()
            .map(|n| self.nodes[*n].clock.reached(self.now));
        kth_largest(reached, voters.len() / 2 + 1).expect("every voter reached some time")
    }

    /// The largest time a majority of shard `shard`'s voters that run read now, from the
    /// simulation's epoch: what its leader sees, but for the last reports' age. `None` if
    /// fewer than a majority of them run.
    fn majority_now(&self, shard: ShardId) -> Option<i64> {
        let majority = self.placement(shard).len() / 2 + 1;
        let running = self.up_hosts(shard).into_iter();
        kth_largest(
            running.map(|n| self.nodes[n].clock.read(self.now)),
            majority,
        )
    }

    /// No replica's shard clock passed what a majority of its voters' clocks reached.
    /// Nor did it evict dedup records or process due keys (expiries) before their time by
    /// that majority time.
    pub(super) fn check_shard_clocks(&self, node: usize, shard: ShardId) -> Result<(), String> {
        let state = &self.nodes[node].replicas[&shard].state;
        let record = &state.record;
        let majority = Millis(super::EPOCH_MS + self.majority_reached(shard));
        let on = || format!("shard {shard} on node {}", node + 1);
        if record.clock > majority || record.target > majority {
            return Err(format!(
                "{}: clock {} (target {}) past its voters' majority time {majority}",
                on(),
                record.clock,
                record.target
            ));
        }
        let dedup_days = state.rules().retention.map_or(0, |r| r.dedup_days);
        let dedup_horizon = Millis(majority.0 - i64::from(dedup_days) * DAY_MS);
        if record.dedup_evicted_to > dedup_horizon || record.due_floor.0 > majority.0 + 1 {
            return Err(format!(
                "{}: dedup records evicted to {}, due keys processed to {}, past what the majority time {majority} allows",
                on(),
                record.dedup_evicted_to,
                record.due_floor
            ));
        }
        Ok(())
    }

    /// After settling, every shard's target is close behind its voters' majority time now,
    /// and so is its clock unless it started days back (a first clock entry whose majority
    /// held the clock days behind, when a voter was not heard from) and still catches up: the
    /// majority clocks are not vacuous (a shard whose clock never moved would pass the check
    /// above).
    pub(super) fn check_settled_clocks(&self) -> Result<(), String> {
        for shard in (0..self.shape.shards).map(ShardId) {
            let majority = self.majority_now(shard).map(|t| super::EPOCH_MS + t);
            for node in self.hosts(shard) {
                self.check_shard_clocks(node, shard)?;
                let Some(majority) = majority else { continue };
                let record = &self.nodes[node].replicas[&shard].state.record;
                let catching_up = record.clock.0 < super::EPOCH_MS - FAR_OFF_MS / 2;
                let lags = |time: Millis| majority - time.0 > SETTLED_LAG_MS_MAX;
                if lags(record.target) || (lags(record.clock) && !catching_up) {
                    return Err(format!(
                        "shard {shard} on node {}: clock {} (target {}) behind its voters' majority time {} (steps of {CLOCK_STEP_MAX_MS} ms)",
                        node + 1,
                        record.clock,
                        record.target,
                        Millis(majority),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The `k`-th largest of `times` (from 1), if there are that many.
fn kth_largest(times: impl Iterator<Item = i64>, k: usize) -> Option<i64> {
    let mut times: Vec<i64> = times.collect();
    times.sort_unstable_by(|a, b| b.cmp(a));
    times.get(k - 1).copied()
}
