//! Reads of segment state from this node's replicas, straight from fjall: definitions with
//! their sizes and backfill progress, members, and the change log.

use crate::storage::{ProfileRead, StateReader};
use oneid_protocol::ids::{OneId, ShardId};
use oneid_state::segments::{ChangeRecord, SegmentRecord};
use oneid_state::{decode, keys, store::StateRead, ShardRecord};

/// The change log's bounds in a shard record as stored (none yet: the default).
/// Segment definitions read per scan of the registry.
const SEGMENTS_PAGE: usize = 256;

fn bounds_of(record: Option<Vec<u8>>) -> LogBounds {
    let record: ShardRecord =
        record.map_or_else(ShardRecord::default, |bytes| decode(keys::SHARD, &bytes));
    LogBounds {
        evicted: record.changes_evicted,
        last: record.change_seq,
        clock: record.clock,
    }
}

/// Change-log entries one read gathers before it stops adding groups.
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
    /// A profile with the names of its segments (sorted).
    pub fn profile_read(&self, oneid: OneId) -> Option<ProfileRead> {
        let profile = self.profile(oneid)?;
        let shard = oneid.shard();
        let cached = |names: &mut lru::LruCache<(ShardId, u64), String>| {
            profile
                .segments
                .iter()
                .map(|id| names.get(&(shard, *id)).cloned())
                .collect::<Option<Vec<String>>>()
        };
        let found = cached(&mut self.segment_names.lock().expect("names lock"));
        let mut segments = match found {
            Some(names) => names,
            None => {
                // A number not seen yet: learn the shard's segments.
                let records = self.segments(shard, None);
                let mut names = self.segment_names.lock().expect("names lock");
                for record in records {
                    names.put((shard, record.def.id), record.def.name);
                }
                cached(&mut names).expect("a profile's segments are held by its shard")
            }
        };
        segments.sort();
        Some(ProfileRead { profile, segments })
    }

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
            let page = state.scan(keys::SEGMENT_PREFIX, after.as_deref(), false, SEGMENTS_PAGE);
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
        members_of(&self.shard(shard), segment, after, limit)
    }

    /// Where the shard's change log stands on this node's replica.
    pub fn log_bounds(&self, shard: ShardId) -> LogBounds {
        bounds_of(self.shard(shard).get(keys::SHARD))
    }

    /// Up to `limit` members of a segment after `after`, and where the change log stood, read
    /// from one storage snapshot: the page is the membership at exactly that offset (plain
    /// reads may see a write batch half applied). The snapshot is dropped before this returns.
    pub fn members_at(
        &self,
        shard: ShardId,
        segment: &str,
        after: Option<OneId>,
        limit: usize,
    ) -> (Vec<OneId>, LogBounds) {
        let view = self.storage().state_view(shard);
        let members = members_of(&view, segment, after, limit);
        (members, bounds_of(view.get(keys::SHARD)))
    }

    /// The change-log entries of the shard after offset `after`, in offset order: whole
    /// groups, from the one holding `after + 1`, until they hold [`CHANGES_PER_READ_MAX`] or
    /// more. Where retention evicted what follows `after`, the first offset answered is
    /// later than `after + 1` (the reader sees the gap).
    pub fn changes(&self, shard: ShardId, after: u64) -> Vec<(u64, ChangeRecord)> {
        let state = self.shard(shard);
        // The group holding `after + 1` is the last one starting before `after + 2`.
        let mut groups = state.scan(keys::CHANGE_PREFIX, Some(&keys::change(after + 2)), true, 1);
        if groups.is_empty() {
            groups = state.scan(keys::CHANGE_PREFIX, None, false, 16);
        }
        let mut out = Vec::new();
        loop {
            let Some(last_key) = groups.last().map(|(key, _)| key.clone()) else {
                return out;
            };
            for (key, bytes) in groups {
                let group: Vec<ChangeRecord> = decode(&key, &bytes);
                let first = keys::change_offset(&key);
                out.extend((first..).zip(group).filter(|(offset, _)| *offset > after));
            }
            if out.len() >= CHANGES_PER_READ_MAX {
                return out;
            }
            groups = state.scan(keys::CHANGE_PREFIX, Some(&last_key), false, 16);
        }
    }
}

/// Up to `limit` members of `segment` in `state`, in OneID order, after `after`.
fn members_of(
    state: &dyn StateRead,
    segment: &str,
    after: Option<OneId>,
    limit: usize,
) -> Vec<OneId> {
    let from = after.map(|oneid| keys::member(segment, oneid));
    state
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
