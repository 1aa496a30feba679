//! Reads of segment state from this node's replicas, straight from fjall: definitions with
//! their sizes and backfill progress, members, and the change log.

use crate::state::segments::{ChangeRecord, SegmentRecord};
use crate::state::{decode, keys, store::StateRead, ShardRecord};
use crate::storage::StateReader;
use oneid_protocol::ids::{OneId, ShardId};

/// Change-log entries one read returns at most.
pub const CHANGES_PER_READ_MAX: usize = 1_024;

/// Where a replica's change log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Entries up to this offset were evicted.
    pub evicted: u64,
    /// The last offset written.
    pub last: u64,
    /// The shard clock.
    pub clock: oneid_protocol::num::Millis,
}

impl StateReader {
    /// The segments the shard holds: the one named, or all, in name order.
    pub fn segments(&self, shard: ShardId, name: Option<&str>) -> Vec<SegmentRecord> {
        let state = self.shard(shard);
        if let Some(name) = name {
            let key = keys::segment(name);
            return state
                .get(&key)
                .map(|bytes| decode(&key, &bytes))
                .into_iter()
                .collect();
        }
        let mut records = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = state.scan(keys::SEGMENT_PREFIX, after.as_deref(), false, 256);
            let Some((last, _)) = page.last() else {
                return records;
            };
            after = Some(last.clone());
            records.extend(page.iter().map(|(key, bytes)| decode(key, bytes)));
        }
    }

    /// Up to `limit` members of a segment on the shard, in OneID order, after `after`.
    pub fn members(
        &self,
        shard: ShardId,
        segment: &str,
        after: Option<OneId>,
        limit: usize,
    ) -> Vec<OneId> {
        let from = after.map(|oneid| keys::member(segment, oneid));
        self.shard(shard)
            .scan(
                &keys::members_prefix(segment),
                from.as_deref(),
                false,
                limit,
            )
            .into_iter()
            .map(|(key, _)| keys::member_oneid(&key))
            .collect()
    }

    /// Where the shard's change log stands on this node's replica.
    pub fn log_bounds(&self, shard: ShardId) -> LogBounds {
        let record: ShardRecord = self
            .shard(shard)
            .get(keys::SHARD)
            .map_or_else(ShardRecord::default, |bytes| decode(keys::SHARD, &bytes));
        LogBounds {
            evicted: record.changes_evicted,
            last: record.change_seq,
            clock: record.clock,
        }
    }

    /// Up to [`CHANGES_PER_READ_MAX`] change-log entries of the shard after offset `after`,
    /// in offset order (fewer where retention evicted some meanwhile).
    pub fn changes(&self, shard: ShardId, after: u64) -> Vec<(u64, ChangeRecord)> {
        let from = keys::change(after);
        self.shard(shard)
            .scan(
                keys::CHANGE_PREFIX,
                Some(&from),
                false,
                CHANGES_PER_READ_MAX,
            )
            .into_iter()
            .map(|(key, bytes)| (keys::change_offset(&key), decode(&key, &bytes)))
            .collect()
    }
}
