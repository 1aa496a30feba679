//! Reads of segment state from this node's replicas, straight from fjall: definitions with
//! their sizes and backfill progress, members, and the change log; and [`LogRead`], what a
//! stream reads of a shard's change log, here or (for a shard this node does not host) at a
//! peer's replica.

use crate::storage::{ProfileRead, StateReader};
use oneid_protocol::ids::{OneId, ShardId};
use oneid_replica::ShardError;
use oneid_state::profile::Profile;
use oneid_state::segments::{ChangeRecord, SegmentRecord};
use oneid_state::{decode, keys, store::StateRead, ShardRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Segment definitions read per scan of the registry.
const SEGMENTS_PAGE: usize = 256;
/// Most changes a peer answers one read with (a read gathers whole groups, and a group holds
/// one command's changes, up to a million: the answer is cut, and the next read starts in
/// the same group).
pub const PEER_CHANGES_MAX: usize = 8_192;

/// What a stream reads of one shard's change log and members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogRead {
    /// Where the log stands.
    Bounds,
    /// The changes after offset `after` (see [`StateReader::changes`]), at most `max`.
    Changes { after: u64, max: usize },
    /// A page of members at one point of the log (see [`StateReader::members_at`]).
    MembersAt {
        segment: String,
        after: Option<OneId>,
        limit: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LogAnswer {
    Bounds(LogBounds),
    Changes(Vec<(u64, ChangeRecord)>),
    MembersAt(Vec<OneId>, LogBounds),
}

/// The change log's bounds in a shard record as stored (none yet: the default).
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBounds {
    /// Entries up to this offset were evicted.
    pub evicted: u64,
    /// The last offset written.
    pub last: u64,
    /// The shard clock.
    pub clock: oneid_protocol::num::Millis,
}

impl StateReader {
    /// A profile with the names of its segments (sorted). A segment number not cached yet is
    /// learnt from the shard's segment records, read with the profile from one storage
    /// snapshot: a deleted segment forgotten, or a snapshot installed, between two plain reads
    /// could leave the profile a number without its record. A number the snapshot does not
    /// hold either breaks an invariant: answered as an error, logged, never a crash.
    pub fn profile_read(&self, oneid: OneId) -> Result<Option<ProfileRead>, ShardError> {
        let Some(profile) = self.profile(oneid) else {
            return Ok(None);
        };
        let shard = oneid.shard();
        let cached = {
            let mut names = self.segment_names.lock().expect("names lock");
            profile
                .segments
                .iter()
                .map(|id| names.get(&(shard, *id)).cloned())
                .collect::<Option<Vec<String>>>()
        };
        let (profile, mut segments) = match cached {
            Some(names) => (profile, names),
            None => {
                let view = self.storage().state_view(shard);
                let key = keys::profile(oneid);
                let Some(profile) = view.get(&key).map(|bytes| decode::<Profile>(&key, &bytes))
                else {
                    return Ok(None);
                };
                let records: BTreeMap<u64, String> = segments_of(&view, None)
                    .into_iter()
                    .map(|record| (record.def.id, record.def.name))
                    .collect();
                let mut names = self.segment_names.lock().expect("names lock");
                for (id, name) in &records {
                    names.put((shard, *id), name.clone());
                }
                let found = profile.segments.iter().map(|id| records.get(id).cloned());
                let Some(segments) = found.collect::<Option<Vec<String>>>() else {
                    tracing::error!(%oneid, segments = ?profile.segments, "a profile names a segment its shard holds no record of");
                    return Err(ShardError::Unreadable(shard));
                };
                (profile, segments)
            }
        };
        segments.sort();
        Ok(Some(ProfileRead { profile, segments }))
    }

    /// The segments the shard holds: the one named, or all, in name order.
    pub fn segments(&self, shard: ShardId, name: Option<&str>) -> Vec<SegmentRecord> {
        segments_of(&self.shard(shard), name)
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

    /// Carries out a read of the shard's change log on this node's replica.
    pub fn log_read(&self, shard: ShardId, read: &LogRead) -> LogAnswer {
        match read {
            LogRead::Bounds => LogAnswer::Bounds(self.log_bounds(shard)),
            LogRead::Changes { after, max } => {
                let mut changes = self.changes(shard, *after);
                changes.truncate(*max);
                LogAnswer::Changes(changes)
            }
            LogRead::MembersAt {
                segment,
                after,
                limit,
            } => {
                let (members, bounds) = self.members_at(shard, segment, *after, *limit);
                LogAnswer::MembersAt(members, bounds)
            }
        }
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

/// The segments `state` holds: the one named, or all, in name order.
fn segments_of(state: &dyn StateRead, name: Option<&str>) -> Vec<SegmentRecord> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::storage::{Query, Storage, TempDir};
    use oneid_protocol::num::Millis;
    use oneid_protocol::rules::Rules;
    use oneid_replica::write::{Space, WriteOp};
    use oneid_state::command::SegmentDef;
    use std::sync::Arc;

    fn put(key: Vec<u8>, value: &impl serde::Serialize) -> WriteOp {
        let bytes = postcard::to_stdvec(value).expect("encodes");
        WriteOp::put(Space::State(ShardId(0)), key, bytes)
    }

    fn segment(name: &str, id: u64) -> SegmentRecord {
        SegmentRecord {
            def: SegmentDef {
                name: name.to_string(),
                id,
                predicate: "points > 0".to_string(),
                description: String::new(),
                generation: 1,
                version: id,
                created_at: Millis(0),
                updated_at: Millis(0),
                deleted: false,
            },
            backfill_next: 1,
            profiles_total: 0,
            size: 1,
        }
    }

    #[test]
    fn a_profile_naming_a_segment_its_shard_has_no_record_of_is_an_error_not_a_crash() {
        let dir = TempDir::new("reads");
        let storage = Arc::new(
            Storage::open(&dir.0, 2, &[ShardId(0)], StorageConfig::default()).expect("opens"),
        );
        let oneid = OneId::mint(ShardId(0), 1);
        let mut profile = Profile::new(oneid, &Rules::default(), Millis(0));
        profile.segments = [3, 9].into();
        storage.write_for_test(vec![
            put(keys::profile(oneid), &profile),
            put(keys::segment("vip"), &segment("vip", 9)),
        ]);
        let reader = StateReader::new(Arc::clone(&storage), 2);
        // Segment 3 was forgotten (or is not in this generation): the old read panicked.
        assert_eq!(
            reader.profile_read(oneid),
            Err(ShardError::Unreadable(ShardId(0)))
        );
        storage.write_for_test(vec![put(keys::segment("adults"), &segment("adults", 3))]);
        let read = reader
            .profile_read(oneid)
            .expect("readable")
            .expect("exists");
        assert_eq!(read.segments, ["adults", "vip"]);
        assert_eq!(reader.profile_read(OneId::mint(ShardId(0), 2)), Ok(None));
    }

    #[test]
    fn a_query_names_the_shards_it_reads() {
        let (here, there) = (OneId::mint(ShardId(0), 1), OneId::mint(ShardId(1), 1));
        let other = |query: Query| query.other_shard(ShardId(0), 2);
        assert_eq!(other(Query::Profile(here)), None);
        assert_eq!(other(Query::Profile(there)), Some(ShardId(1)));
        let ledger = Query::Ledger {
            oneid: there,
            limit: 1,
            before: None,
        };
        assert_eq!(other(ledger), Some(ShardId(1)));
        let events = vec![(here, "e1".to_string()), (there, "e2".to_string())];
        assert_eq!(other(Query::Events(events)), Some(ShardId(1)));
        assert_eq!(other(Query::Rules(ShardId(1))), Some(ShardId(1)));
        let members = Query::Members {
            shard: ShardId(0),
            segment: "vip".to_string(),
            after: None,
            limit: 10,
        };
        assert_eq!(other(members), None);
        let phone = |value: &str| oneid_protocol::ids::Identity {
            kind: "phone".into(),
            value: value.into(),
        };
        let elsewhere = (0..)
            .map(|n| phone(&format!("13{n}")))
            .find(|identity| identity.shard(2) == ShardId(1))
            .expect("some phone lands on shard 1");
        assert_eq!(other(Query::Identities(vec![elsewhere])), Some(ShardId(1)));
    }
}
