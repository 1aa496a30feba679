//! The Raft log of one shard replica: raft-rs's [`Storage`] over a key-value store (fjall on a
//! node, maps in the simulation), where what the replica handed to the writer is readable
//! before it is durable, as raft-rs requires.
//!
//! Layout. In the node's `meta` keyspace, per shard: `hs/NNNN` the hard state and `cs/NNNN` the
//! conf state (protobuf), `lm/NNNN` the [`LogMeta`] (postcard): where the log was compacted and
//! the terms of its entries as runs, so that `term()` never reads an entry. In the shard's log
//! keyspace: the entry at each index (big-endian) → the entry (protobuf). A write of any of
//! these goes in the same atomic batch as the others of its Ready, and as the apply of that
//! Ready's committed entries. A snapshot install ([`ShardLog::install`]) restarts the log after
//! the snapshot in a new generation of the shard's keyspaces (`gen/NNNN`, see `storage`): the
//! old log goes with the old generation, so the purge is part of the same atomic switch.
//!
//! This module knows raft-rs's types and the key layout; it never writes: it answers the
//! [`WriteOp`]s for the writer.

use crate::message::DecodeError;
use crate::write::{Space, WriteOp};
use oneid_protocol::ids::ShardId;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Reads of what the writer made durable (or at least committed) for one shard.
pub trait LogSource {
    /// The stored bytes of the entry at `index`.
    fn entry(&self, index: u64) -> Option<Vec<u8>>;
    /// The highest index with a stored entry.
    fn last_stored(&self) -> Option<u64>;
    /// A record of the node's `meta` keyspace.
    fn meta(&self, key: &[u8]) -> Option<Vec<u8>>;
}

pub fn hard_state_key(shard: ShardId) -> Vec<u8> {
    format!("hs/{:04}", shard.0).into_bytes()
}

pub fn conf_state_key(shard: ShardId) -> Vec<u8> {
    format!("cs/{:04}", shard.0).into_bytes()
}

/// The meta key `gen/NNNN`: the generation of a shard's keyspaces (u64 big-endian). The shell
/// keeps a shard's log and state in the keyspaces of that generation; an install moves them to
/// the next (see [`ShardLog::install`]).
pub fn generation_key(shard: ShardId) -> Vec<u8> {
    format!("gen/{:04}", shard.0).into_bytes()
}

fn log_meta_key(shard: ShardId) -> Vec<u8> {
    format!("lm/{:04}", shard.0).into_bytes()
}

pub fn entry_key(index: u64) -> Vec<u8> {
    index.to_be_bytes().to_vec()
}

/// A stored entry as an upgrade rewrites it: its command (the payload of a normal entry)
/// passed through `rewrite`; entries without one (empty, configuration changes) stay as they
/// are. Index and term never change.
pub fn rewrite_entry(
    bytes: &[u8],
    rewrite: impl Fn(&[u8]) -> Vec<u8>,
) -> Result<Vec<u8>, DecodeError> {
    let mut entry = Entry::parse_from_bytes(bytes).map_err(DecodeError::of)?;
    if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
        entry.data = rewrite(&entry.data).into();
    }
    Ok(pb(&entry))
}

/// The stored form of a normal entry holding `command` (tools and tests that write a log).
pub fn entry_bytes(index: u64, term: u64, command: &[u8]) -> Vec<u8> {
    pb(&Entry {
        index,
        term,
        data: command.to_vec().into(),
        ..Entry::default()
    })
}

/// The command a stored normal entry holds (`None` for an empty or configuration entry).
pub fn entry_command(bytes: &[u8]) -> Result<Option<Vec<u8>>, DecodeError> {
    let entry = Entry::parse_from_bytes(bytes).map_err(DecodeError::of)?;
    let normal = entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty();
    Ok(normal.then(|| entry.data.to_vec()))
}

/// Where the log starts, and the term of every index it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMeta {
    /// The last compacted index and its term (0, 0 before any compaction): entries start after.
    pub truncated: (u64, u64),
    /// `(first index, term)` of each run of entries of one term, in index order.
    pub runs: Vec<(u64, u64)>,
}

/// One shard replica's Raft log.
pub struct ShardLog<S> {
    shard: ShardId,
    source: S,
    hard_state: HardState,
    conf_state: ConfState,
    meta: LogMeta,
    last_index: u64,
    /// Entries handed to the writer in the job in flight: readable here until it is durable.
    staged: BTreeMap<u64, Entry>,
    /// Snapshots prepared for followers, by raft id, until raft-rs takes them to send.
    prepared: RefCell<BTreeMap<u64, Snapshot>>,
}

impl<S: LogSource> ShardLog<S> {
    /// The log as the source holds it. A replica that never ran gets the conf state of
    /// `bootstrap` (the voters `cluster.toml` places), written by its first job.
    pub fn recover(shard: ShardId, source: S, bootstrap: ConfState) -> (ShardLog<S>, Vec<WriteOp>) {
        let decode_pb = |key: &[u8]| source.meta(key);
        let hard_state = decode_pb(&hard_state_key(shard))
            .map(|b| HardState::parse_from_bytes(&b).expect("a stored hard state decodes"))
            .unwrap_or_default();
        let meta: LogMeta = source
            .meta(&log_meta_key(shard))
            .map(|b| postcard::from_bytes(&b).expect("a stored log meta decodes"))
            .unwrap_or_default();
        let mut ops = Vec::new();
        let conf_state = match decode_pb(&conf_state_key(shard)) {
            Some(b) => ConfState::parse_from_bytes(&b).expect("a stored conf state decodes"),
            None => {
                ops.push(meta_op(conf_state_key(shard), pb(&bootstrap)));
                bootstrap
            }
        };
        let last_index = source.last_stored().unwrap_or(0).max(meta.truncated.0);
        let log = ShardLog {
            shard,
            source,
            hard_state,
            conf_state,
            meta,
            last_index,
            staged: BTreeMap::new(),
            prepared: RefCell::default(),
        };
        (log, ops)
    }

    /// Entries up to `applied` were committed (they were applied): a hard state stored before
    /// its commit index caught up must not say less.
    pub fn raise_commit(&mut self, applied: u64) {
        self.hard_state.commit = self.hard_state.commit.max(applied);
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The first index whose entry is held (compacted ones are gone).
    pub fn first(&self) -> u64 {
        self.meta.truncated.0 + 1
    }

    #[cfg(test)]
    pub fn last(&self) -> u64 {
        self.last_index
    }

    /// Appends entries from a Ready, replacing any stored tail they conflict with.
    pub fn append(&mut self, entries: &[Entry], ops: &mut Vec<WriteOp>) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        let new_last = entries.last().expect("not empty").index;
        assert!(
            first > self.meta.truncated.0,
            "shard {}: appending {first} over the compacted log (to {})",
            self.shard,
            self.meta.truncated.0
        );
        assert!(
            first <= self.last_index + 1,
            "shard {}: appending {first} after {}: a gap",
            self.shard,
            self.last_index
        );
        // The stored tail past the new entries is no longer part of the log.
        for index in new_last + 1..=self.last_index {
            ops.push(WriteOp {
                space: Space::Log(self.shard),
                key: entry_key(index),
                value: None,
            });
        }
        self.staged.split_off(&first);
        for entry in entries {
            ops.push(WriteOp {
                space: Space::Log(self.shard),
                key: entry_key(entry.index),
                value: Some(pb(entry)),
            });
            self.staged.insert(entry.index, entry.clone());
        }
        self.last_index = new_last;
        let runs = &mut self.meta.runs;
        runs.retain(|&(start, _)| start < first);
        for entry in entries {
            if runs.last().map(|&(_, term)| term) != Some(entry.term) {
                runs.push((entry.index, entry.term));
            }
        }
        ops.push(self.log_meta_op());
    }

    pub fn set_hard_state(&mut self, hard_state: HardState, ops: &mut Vec<WriteOp>) {
        ops.push(meta_op(hard_state_key(self.shard), pb(&hard_state)));
        self.hard_state = hard_state;
    }

    pub fn set_conf_state(&mut self, conf_state: ConfState, ops: &mut Vec<WriteOp>) {
        ops.push(meta_op(conf_state_key(self.shard), pb(&conf_state)));
        self.conf_state = conf_state;
    }

    /// Drops the entries before `to` (the entry at `to` stays, the first one held).
    pub fn compact(&mut self, to: u64, ops: &mut Vec<WriteOp>) {
        let first = self.first();
        if to <= first {
            return;
        }
        assert!(
            to <= self.last_index,
            "shard {}: compacting to {to}, past the last entry {}",
            self.shard,
            self.last_index
        );
        let term = self.term_of(to - 1).expect("entries before `to` are held");
        for index in first..to {
            ops.push(WriteOp {
                space: Space::Log(self.shard),
                key: entry_key(index),
                value: None,
            });
            self.staged.remove(&index);
        }
        self.meta.truncated = (to - 1, term);
        // Runs that end before `to` go; the one holding `to` starts there.
        let keep_from = self.meta.runs.partition_point(|&(start, _)| start <= to);
        let mut runs = self.meta.runs.split_off(keep_from.saturating_sub(1));
        if let Some(run) = runs.first_mut() {
            run.0 = run.0.max(to);
        }
        self.meta.runs = runs;
        ops.push(self.log_meta_op());
    }

    /// The log restarts after a snapshot, in the generation its state was staged in: the
    /// compacted point becomes the snapshot's (index, term), with no entries, and the conf
    /// state is the snapshot's. The write switches the shard's generation.
    pub fn install(
        &mut self,
        snapshot: &SnapshotMetadata,
        generation: u64,
        ops: &mut Vec<WriteOp>,
    ) {
        assert!(
            snapshot.index > self.meta.truncated.0,
            "shard {}: a snapshot at {} behind the compacted log ({})",
            self.shard,
            snapshot.index,
            self.meta.truncated.0
        );
        self.staged.clear();
        self.meta = LogMeta {
            truncated: (snapshot.index, snapshot.term),
            runs: Vec::new(),
        };
        self.last_index = snapshot.index;
        self.set_conf_state(snapshot.get_conf_state().clone(), ops);
        ops.push(self.log_meta_op());
        ops.push(meta_op(
            generation_key(self.shard),
            generation.to_be_bytes().to_vec(),
        ));
    }

    /// Holds `snapshot` for raft-rs to send to follower `to` (replacing any other for it).
    pub fn prepare(&mut self, to: u64, snapshot: Snapshot) {
        self.prepared.get_mut().insert(to, snapshot);
    }

    /// Drops the snapshots prepared and not yet sent (for `to`, or all).
    pub fn unprepare(&mut self, to: Option<u64>) {
        match to {
            Some(to) => {
                self.prepared.get_mut().remove(&to);
            }
            None => self.prepared.get_mut().clear(),
        }
    }

    /// Whether a snapshot prepared for `to` waits for raft-rs to send it.
    pub fn is_prepared(&self, to: u64) -> bool {
        self.prepared.borrow().contains_key(&to)
    }

    /// The job that staged entries is durable: the source holds them now.
    pub fn persisted(&mut self) {
        self.staged.clear();
    }

    fn log_meta_op(&self) -> WriteOp {
        meta_op(
            log_meta_key(self.shard),
            postcard::to_stdvec(&self.meta).expect("log meta encodes"),
        )
    }

    fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.meta.truncated.0 {
            return Some(self.meta.truncated.1);
        }
        if index < self.first() || index > self.last_index {
            return None;
        }
        let run = self.meta.runs.partition_point(|&(start, _)| start <= index);
        Some(self.meta.runs[run.checked_sub(1)?].1)
    }

    fn entry(&self, index: u64) -> Entry {
        if let Some(entry) = self.staged.get(&index) {
            return entry.clone();
        }
        let bytes = self.source.entry(index).unwrap_or_else(|| {
            panic!(
                "shard {}: entry {index} of the log ({}..={}) is not stored",
                self.shard,
                self.first(),
                self.last_index
            )
        });
        Entry::parse_from_bytes(&bytes).expect("a stored entry decodes")
    }
}

fn meta_op(key: Vec<u8>, value: Vec<u8>) -> WriteOp {
    WriteOp {
        space: Space::Meta,
        key,
        value: Some(value),
    }
}

fn pb(message: &impl protobuf::Message) -> Vec<u8> {
    message.write_to_bytes().expect("raft messages encode")
}

impl<S: LogSource> Storage for ShardLog<S> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last_index + 1,
            "shard {}: entries up to {high} asked of a log ending at {}",
            self.shard,
            self.last_index
        );
        let max_size = max_size.into();
        let mut entries = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for index in low..high {
            let entry = self.entry(index);
            size += u64::from(entry.compute_size());
            if !entries.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index < self.meta.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(index)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// The snapshot the core prepared for `to` (taken: raft-rs sends it once), or not yet (the
    /// core prepares one when it can: see `replica::snapshot`).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut prepared = self.prepared.borrow_mut();
        match prepared.remove(&to) {
            Some(snapshot) if snapshot.get_metadata().index >= request_index => Ok(snapshot),
            _ => Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// The meta records and the log entries of a source over maps.
    #[derive(Default)]
    struct Stored(BTreeMap<Vec<u8>, Vec<u8>>, BTreeMap<u64, Vec<u8>>);

    /// A source over maps, committed as the writer would.
    #[derive(Clone, Default)]
    struct Maps(Rc<RefCell<Stored>>);

    impl Maps {
        fn commit(&self, ops: Vec<WriteOp>) {
            let mut maps = self.0.borrow_mut();
            for op in ops {
                match op.space {
                    Space::Meta => match op.value {
                        Some(v) => maps.0.insert(op.key, v),
                        None => maps.0.remove(&op.key),
                    },
                    Space::Log(_) => {
                        let index = u64::from_be_bytes(op.key.try_into().unwrap());
                        match op.value {
                            Some(v) => maps.1.insert(index, v),
                            None => maps.1.remove(&index),
                        }
                    }
                    Space::State(_) => unreachable!(),
                };
            }
        }
    }

    impl LogSource for Maps {
        fn entry(&self, index: u64) -> Option<Vec<u8>> {
            self.0.borrow().1.get(&index).cloned()
        }
        fn last_stored(&self) -> Option<u64> {
            self.0.borrow().1.keys().next_back().copied()
        }
        fn meta(&self, key: &[u8]) -> Option<Vec<u8>> {
            self.0.borrow().0.get(key).cloned()
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 10].into(),
            ..Default::default()
        }
    }

    fn terms(log: &ShardLog<Maps>) -> Vec<u64> {
        (log.first()..=log.last())
            .map(|i| log.term(i).unwrap())
            .collect()
    }

    #[test]
    fn appends_replace_a_conflicting_tail_on_disk_and_survive_recovery() {
        let maps = Maps::default();
        let cs = ConfState::from((vec![1, 2, 3], vec![]));
        let (mut log, mut ops) = ShardLog::recover(ShardId(0), maps.clone(), cs.clone());
        log.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>(), &mut ops);
        // Readable before the writer committed anything.
        assert_eq!(
            log.entries(2, 4, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            2
        );
        maps.commit(std::mem::take(&mut ops));
        log.persisted();
        // A new leader's entries from index 4 replace 4 and 5.
        log.append(&[entry(4, 2)], &mut ops);
        assert_eq!(log.last(), 4);
        assert_eq!(terms(&log), [1, 1, 1, 2]);
        maps.commit(std::mem::take(&mut ops));
        log.persisted();
        assert_eq!(maps.last_stored(), Some(4), "entry 5 deleted on disk");

        let (recovered, ops) = ShardLog::recover(ShardId(0), maps.clone(), ConfState::default());
        assert!(ops.is_empty(), "the conf state was stored by the first job");
        assert_eq!(recovered.conf_state(), &cs);
        assert_eq!((recovered.first(), recovered.last()), (1, 4));
        assert_eq!(terms(&recovered), [1, 1, 1, 2]);
        assert_eq!(
            recovered
                .entries(4, 5, None, GetEntriesContext::empty(false))
                .unwrap(),
            vec![entry(4, 2)]
        );
    }

    #[test]
    fn compaction_keeps_the_term_of_the_last_compacted_entry() {
        let maps = Maps::default();
        let (mut log, mut ops) = ShardLog::recover(ShardId(0), maps.clone(), ConfState::default());
        let entries: Vec<Entry> = (1..=6)
            .map(|i| entry(i, if i < 4 { 1 } else { 3 }))
            .collect();
        log.append(&entries, &mut ops);
        log.compact(5, &mut ops);
        maps.commit(ops);
        log.persisted();
        assert_eq!((log.first(), log.last()), (5, 6));
        assert_eq!(log.term(4).unwrap(), 3);
        assert!(matches!(
            log.term(3),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(log
            .entries(4, 6, None, GetEntriesContext::empty(false))
            .is_err());
        let (recovered, _) = ShardLog::recover(ShardId(0), maps, ConfState::default());
        assert_eq!((recovered.first(), recovered.last()), (5, 6));
        assert_eq!(recovered.term(4).unwrap(), 3);
        assert_eq!(terms(&recovered), [3, 3]);
    }

    #[test]
    fn entries_respect_the_size_limit_but_return_at_least_one() {
        let maps = Maps::default();
        let (mut log, mut ops) = ShardLog::recover(ShardId(0), maps, ConfState::default());
        log.append(&(1..=4).map(|i| entry(i, 1)).collect::<Vec<_>>(), &mut ops);
        let one = u64::from(entry(1, 1).compute_size());
        let ctx = || GetEntriesContext::empty(false);
        assert_eq!(log.entries(1, 5, Some(0), ctx()).unwrap().len(), 1);
        assert_eq!(log.entries(1, 5, Some(2 * one), ctx()).unwrap().len(), 2);
        assert_eq!(log.entries(1, 5, None, ctx()).unwrap().len(), 4);
    }
}
