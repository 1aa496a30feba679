//! Retention: the dedup and ledger keys each command writes are filed in queues by the shard
//! clock (one record per queue per command), and clock entries evict them in log order once
//! they are past `dedup_retention_days` / `ledger_retention_days`, a bounded batch at a time.

use super::keys;
use super::store::pair_hash;
use super::tx::{encode, Tx};
use super::{decode, due, ShardState};

/// Most one clock entry advances the shard's clock: a cluster restarted after days down, or a
/// majority's clocks stepped forward, catches up at this much per clock entry (one per
/// `clock_interval_ms`) instead of firing days of expiries and evictions in one entry.
pub const CLOCK_STEP_MAX_MS: i64 = 60_000;
/// Most dedup records one clock entry evicts; the rest wait for the next clock entry.
pub const DEDUP_EVICTIONS_PER_CLOCK_MAX: usize = 10_000;
/// Most ledger entries one clock entry evicts.
pub const LEDGER_EVICTIONS_PER_CLOCK_MAX: usize = 10_000;
use oneid_protocol::num::{Millis, DAY_MS};
use oneid_protocol::rules::Retention;

/// Dedup and ledger keys written by the command being applied, in write order.
#[derive(Default)]
pub(super) struct Retained {
    pub(super) dedup: Vec<Vec<u8>>,
    pub(super) ledger: Vec<Vec<u8>>,
}

impl ShardState {
    /// Files the dedup and ledger keys the command wrote into their retention queues: one
    /// record per queue holding them all (a command holds a bounded number of events), so
    /// retention costs one key per entry rather than one per event.
    pub(super) fn file_retained(&mut self, tx: &mut Tx<'_>) {
        let Retained { dedup, ledger } = std::mem::take(&mut self.retained);
        for (prefix, written) in [
            (keys::DEDUP_EVICTION_PREFIX, dedup),
            (keys::LEDGER_EVICTION_PREFIX, ledger),
        ] {
            if !written.is_empty() {
                self.record.queue_seq += 1;
                let key = keys::retention_group(prefix, self.record.clock, self.record.queue_seq);
                tx.put_new(key, &written);
            }
        }
    }

    /// Advances the clock towards `target` (by at most [`CLOCK_STEP_MAX_MS`], unless it is
    /// the shard's first), evicts what outlived the rules' retention (nothing while the rules
    /// have none), processes what fell due. Returns how many due keys it processed.
    /// Also answers whether any of its bounded batches was full (work left for the next entry).
    pub(super) fn apply_clock(&mut self, tx: &mut Tx<'_>, target: Millis) -> (usize, bool) {
        let clock = self.record.clock;
        let step_to = if clock == Millis(0) {
            target
        } else {
            Millis(target.0.min(clock.0.saturating_add(CLOCK_STEP_MAX_MS)))
        };
        self.record.clock = clock.max(step_to);
        self.record.target = self.record.target.max(target);
        self.clock_moved(tx, self.rules.retention)
    }

    /// A format-7 clock entry (`Command::LegacyClock`), as it applied then: the clock raised
    /// to `now`, eviction by the retention it carries; the target follows the clock.
    pub(super) fn apply_legacy_clock(
        &mut self,
        tx: &mut Tx<'_>,
        now: Millis,
        retention: Retention,
    ) -> (usize, bool) {
        self.record.clock = self.record.clock.max(now);
        self.record.target = self.record.target.max(self.record.clock);
        self.clock_moved(tx, Some(retention))
    }

    /// What a clock entry does once the clock moved: evicts by `retention` (if any) and
    /// processes what fell due; answers how many due keys, and whether a batch was full.
    fn clock_moved(&mut self, tx: &mut Tx<'_>, retention: Option<Retention>) -> (usize, bool) {
        let evictions_full = retention.is_some_and(|retention| self.evict(tx, retention));
        let due_processed = self.process_due(tx);
        (
            due_processed,
            evictions_full || due_processed == due::DUE_PER_CLOCK_MAX,
        )
    }

    /// Evicts, by the shard clock, the dedup records, change-log entries and ledger entries
    /// past `retention`, a bounded batch of each; answers whether a batch was full.
    fn evict(&mut self, tx: &mut Tx<'_>, retention: Retention) -> bool {
        let horizon = Millis(self.record.clock.0 - i64::from(retention.dedup_days) * DAY_MS);
        let (cursor, dedup_full) = evict_queue(
            tx,
            keys::DEDUP_EVICTION_PREFIX,
            self.record.dedup_evicted_to,
            horizon,
            DEDUP_EVICTIONS_PER_CLOCK_MAX,
        );
        self.record.dedup_evicted_to = cursor;
        let changes_full = self.evict_changes(tx, retention);
        let horizon = Millis(self.record.clock.0 - i64::from(retention.ledger_days) * DAY_MS);
        let (cursor, ledger_full) = evict_queue(
            tx,
            keys::LEDGER_EVICTION_PREFIX,
            self.record.ledger_evicted_to,
            horizon,
            LEDGER_EVICTIONS_PER_CLOCK_MAX,
        );
        self.record.ledger_evicted_to = cursor;
        dedup_full || changes_full || ledger_full
    }
}

/// Evicts from a retention queue (records `prefix | clock | seq`, written in clock order, each
/// holding the keys one entry wrote) the keys written before `horizon`, scanning after
/// `cursor` (everything before it is gone), at most `limit` keys: a queue record larger than
/// what is left of the batch loses its first keys and keeps the rest for the next entry.
/// Returns the new cursor and whether the batch was full.
pub(super) fn evict_queue(
    tx: &mut Tx<'_>,
    prefix: &[u8],
    cursor: Millis,
    horizon: Millis,
    limit: usize,
) -> (Millis, bool) {
    const CHUNK: usize = 64;
    let below = keys::time_bound(prefix, horizon);
    let mut from = keys::time_bound(prefix, cursor);
    let mut budget = limit;
    while budget > 0 {
        let records = tx.scan_below(prefix, Some(&from), &below, CHUNK.min(budget));
        if records.is_empty() {
            break;
        }
        for (key, value) in records {
            let mut written: Vec<Vec<u8>> = decode(&key, &value);
            let rest = written.split_off(budget.min(written.len()));
            budget -= written.len();
            for record_key in written {
                tx.delete(record_key);
            }
            if rest.is_empty() {
                tx.delete_known(key.clone(), &value);
            } else {
                tx.put_known(key.clone(), Some(pair_hash(&key, &value)), encode(&rest));
            }
            if budget == 0 {
                return (keys::key_time(&key), true);
            }
            from = key;
        }
    }
    (cursor.max(horizon), false)
}
