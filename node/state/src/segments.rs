//! Segments in the state machine: their definitions, each profile's membership, and the log
//! of membership changes that streams read.
//!
//! Every shard holds every definition (`keys::segment`), installed from the log at a
//! well-defined point: the registry shard ([`REGISTRY_SHARD`]) orders definitions
//! (`DefineSegment`), every shard installs them (`InstallSegment`), keeping per name the one
//! of the highest version. A profile's memberships are in the profile itself (its
//! `segments`, for its documents) and in member keys (`keys::member`, for paging through a
//! segment); each change of membership also appends a [`ChangeRecord`] to the shard's change
//! log at the next offset (the changes of one command go in one key). All three are written in the same apply as the change that caused
//! them, through the digest.
//!
//! Membership is kept incrementally: after each apply that changes a profile, only the
//! segments that read a part of the profile that changed ([`Stamp`], `Predicate::reads`) are
//! evaluated again, plus those that read times (`days_since` moves with the clock). Time
//! alone changes membership through the due-time index: the segments' `days_since`
//! thresholds join the tag rules' (`RuleReview` keys).
//!
//! Work over all profiles (a new or replaced segment, a rules change) or all members (a
//! deleted segment) is never done in one apply: it is a **backfill**, advanced by `Backfill`
//! entries the leader proposes, [`BACKFILL_PER_ENTRY`] profiles or members each.

use super::keys;
use super::profile::{Profile, RuleView};
use super::store::{pair_hash, StateRead};
use super::tx::{decode, encode, EventWrites, Tx};
use super::ShardState;
use crate::command::{SegmentDef, SegmentDefine, REGISTRY_SHARD};
use oneid_protocol::event::EventError;
use oneid_protocol::ids::OneId;
use oneid_protocol::num::{Millis, HOUR_MS};
use oneid_protocol::predicate::{Predicate, Reads, TimeField};
use oneid_protocol::rules::Retention;
use oneid_protocol::segments::{ChangeKind, SEGMENTS_MAX};
use oneid_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Profiles (or members of a deleted segment) one `Backfill` entry processes.
pub const BACKFILL_PER_ENTRY: u64 = 1_000;
/// Deleted segments whose name and version a shard remembers (so that a late install of an
/// older definition cannot bring one back); past it the oldest finished deletion is forgotten.
pub const SEGMENT_TOMBSTONES_MAX: usize = 1_000;
/// Most change-log entries one clock entry evicts (in whole groups: it may pass this by the
/// last group's size).
pub const CHANGE_EVICTIONS_PER_CLOCK_MAX: u64 = 10_000;
/// Most changes in one group of the change log: the changes of one command, written under
/// one key (split past this).
pub const CHANGES_PER_GROUP_MAX: usize = 4_096;

/// A segment as a shard holds it, under `keys::segment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub def: SegmentDef,
    /// The next profile sequence the backfill evaluates (of a deleted segment: members are
    /// taken out while `size > 0`).
    pub backfill_next: u64,
    /// The profiles that existed when the definition applied here.
    pub profiles_total: u64,
    /// Members on this shard.
    pub size: u64,
}

impl SegmentRecord {
    /// Whether this shard's backfill (or, deleted, its taking out of members) is finished.
    pub fn backfill_done(&self) -> bool {
        if self.def.deleted {
            self.size == 0
        } else {
            self.backfill_next > self.profiles_total
        }
    }

    /// Profiles the backfill evaluated so far.
    pub fn profiles_done(&self) -> u64 {
        (self.backfill_next - 1).min(self.profiles_total)
    }
}

/// What happened to a segment at one offset of the change log. The changes of a command are
/// one group, a `Vec<ChangeRecord>` under `keys::change` of the first one's offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub segment: String,
    pub generation: u64,
    pub oneid: OneId,
    pub change: Change,
    /// The shard clock when it applied.
    pub at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Enter,
    Exit,
    /// A deleted segment has no member left on this shard: its streams end once they have
    /// read this from every shard. `oneid` is 0.
    Ended,
    /// An exit of a profile merged into this one (which the survivor's own evaluation then
    /// enters, if it was not a member).
    MergedInto(OneId),
}

impl Change {
    /// The change as a stream shows it; `None` for the end marker.
    pub fn kind(self) -> Option<ChangeKind> {
        match self {
            Change::Enter => Some(ChangeKind::Enter),
            Change::Exit | Change::MergedInto(_) => Some(ChangeKind::Exit),
            Change::Ended => None,
        }
    }

    /// The profile an exit's profile was merged into, if that was why it left.
    pub fn merged_into(self) -> Option<OneId> {
        match self {
            Change::MergedInto(into) => Some(into),
            _ => None,
        }
    }
}

/// Background re-evaluation of every profile after a rules change, kept in the shard record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RulesBackfill {
    pub next: u64,
    pub total: u64,
}

/// One installed segment in memory: its record and compiled predicate.
struct Segment {
    record: SegmentRecord,
    /// `None` once deleted.
    predicate: Option<Predicate>,
    reads: Reads,
    /// The pair hash of the record as stored.
    stored: u64,
}

/// The segments a shard holds, by name (so every walk over them is in name order).
#[derive(Default)]
pub(super) struct Segments {
    /// By number: the order memberships are evaluated in.
    by_id: BTreeMap<u64, Segment>,
    /// Each held segment's number by name.
    by_name: BTreeMap<String, u64>,
    /// Records changed by the command being applied, written at its end.
    dirty: BTreeSet<String>,
    /// The change-log group the command being applied fills.
    changes: Vec<ChangeRecord>,
}

impl Segments {
    pub(super) fn load(base: &dyn StateRead) -> Segments {
        let mut segments = Segments::default();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = base.scan(keys::SEGMENT_PREFIX, after.as_deref(), false, 256);
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (key, bytes) in &page {
                let record: SegmentRecord = decode(key, bytes);
                let stored = pair_hash(key, bytes);
                segments.insert(record, stored);
            }
        }
        segments
    }

    fn insert(&mut self, record: SegmentRecord, stored: u64) {
        let predicate = (!record.def.deleted).then(|| {
            Predicate::parse(&record.def.predicate)
                .unwrap_or_else(|e| panic!("segment {} does not parse: {e}", record.def.name))
        });
        let reads = predicate.as_ref().map(Predicate::reads).unwrap_or_default();
        let id = record.def.id;
        if let Some(old) = self.by_name.insert(record.def.name.clone(), id) {
            self.by_id.remove(&old);
        }
        self.by_id.insert(
            id,
            Segment {
                record,
                predicate,
                reads,
                stored,
            },
        );
    }

    fn get(&self, name: &str) -> Option<&Segment> {
        self.by_id.get(self.by_name.get(name)?)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Segment> {
        self.by_id.get_mut(self.by_name.get(name)?)
    }

    /// Whether any segment is live: only then is membership evaluated at all.
    pub(super) fn any_live(&self) -> bool {
        self.by_id.values().any(|s| s.predicate.is_some())
    }

    fn live(&self) -> usize {
        self.by_id
            .values()
            .filter(|s| s.predicate.is_some())
            .count()
    }

    /// The `days_since` thresholds of the live segments.
    pub(super) fn day_thresholds(&self) -> impl Iterator<Item = (TimeField, i64)> + '_ {
        self.by_id
            .values()
            .filter_map(|s| s.predicate.as_ref())
            .flat_map(Predicate::day_thresholds)
    }

    /// The first segment (by number) whose backfill is not done.
    fn next_job(&self) -> Option<String> {
        self.by_id
            .values()
            .find(|s| !s.record.backfill_done())
            .map(|s| s.record.def.name.clone())
    }

    /// Every record, in number order (tests; the API reads them through storage).
    #[cfg(test)]
    pub(super) fn records(&self) -> impl Iterator<Item = &SegmentRecord> {
        self.by_id.values().map(|s| &s.record)
    }
}

/// Which segments to evaluate when a profile is settled.
#[derive(Clone, Copy)]
pub(super) enum Eval<'a> {
    /// After a change: those reading a part that differs from `before` (`None`: a new
    /// profile, all of them), and those reading times.
    Changed(Option<&'a Stamp>),
    /// A backfill of one segment, and those reading a part that settling the profile at the
    /// clock changed since the stamp (its rule tags move with time), and those reading times.
    Segment(&'a str, &'a Stamp),
    /// After a rules change: all of them.
    All,
}

/// The parts of a profile a predicate can read, hashed, so that settling a profile can tell
/// which of them an apply changed without keeping a copy of the profile as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamp([u64; 9]);

/// The part each slot of a [`Stamp`] holds.
const STAMP_PARTS: [Reads; 9] = [
    Reads::POINTS,
    Reads::TIER,
    Reads::SPEND_365D,
    Reads::TOTAL_SPEND,
    Reads::ORDER_COUNT,
    Reads::ATTRIBUTES,
    Reads::TAGS,
    Reads::CHANNELS,
    Reads::IDENTITIES,
];

impl Stamp {
    pub(super) fn of(profile: &Profile) -> Stamp {
        let names = |names: &mut dyn Iterator<Item = &String>| {
            let mut hasher = Xxh3::new();
            for name in names {
                hasher.update(name.as_bytes());
                hasher.update(&[0]);
            }
            hasher.digest()
        };
        Stamp([
            profile.balance as u64,
            xxh3_64(profile.tier.as_bytes()),
            profile.spend_365d.0 as u64,
            profile.total_spend.0 as u64,
            profile.order_count,
            xxh3_64(&encode(&profile.attributes)),
            names(&mut profile.manual_tags.keys().chain(&profile.rule_tags)),
            names(&mut profile.channels.keys()),
            names(&mut profile.identities.keys()),
        ])
    }

    /// The parts that differ between two stamps.
    fn changed(&self, other: &Stamp) -> Reads {
        (0..STAMP_PARTS.len())
            .filter(|&i| self.0[i] != other.0[i])
            .fold(Reads::default(), |reads, i| reads.with(STAMP_PARTS[i]))
    }
}

impl ShardState {
    /// Refuses a predicate that does not parse, and a new segment (`new`) past the limit.
    fn check_definition(&self, predicate: &str, new: bool) -> Result<(), EventError> {
        if new && self.segments.live() >= SEGMENTS_MAX {
            return Err(EventError::new(
                ErrorCode::SegmentLimit,
                format!("the cluster holds {SEGMENTS_MAX} segments, the most it can"),
            ));
        }
        Predicate::parse(predicate).map(drop).map_err(|error| {
            EventError::field(ErrorCode::InvalidPredicate, "predicate", error.to_string())
        })
    }

    /// A stamp of the profile before an apply changes it, if any segment will need one.
    pub(super) fn stamp(&self, profile: &Profile) -> Option<Stamp> {
        self.segments.any_live().then(|| Stamp::of(profile))
    }

    /// Orders a definition (the registry shard only) and installs it here. Answers the
    /// definition, and whether it created the segment; an unchanged one (a deletion of a
    /// deleted segment included) is answered as it is, without a new version, for the caller
    /// to install it again where it is missing. Dated `at` (the registry shard's time: the majority time of
    /// its last clock entry).
    pub(super) fn define_segment(
        &mut self,
        tx: &mut Tx<'_>,
        define: SegmentDefine,
        at: Millis,
    ) -> Result<(SegmentDef, bool), EventError> {
        assert_eq!(
            self.shard.0, REGISTRY_SHARD,
            "segments are defined on the registry shard"
        );
        let current = self.segments.get(&define.name).map(|s| &s.record.def);
        let live = current.filter(|def| !def.deleted);
        let def = match (&define.predicate, live) {
            // Deleting a deleted segment answers its tombstone as it is, so a DELETE retried
            // after some shard missed the install installs it again; only a name never
            // defined (or forgotten) is not found.
            (None, None) => {
                return current
                    .map(|tombstone| (tombstone.clone(), false))
                    .ok_or_else(|| {
                        EventError::field(
                            ErrorCode::NotFound,
                            "name",
                            format!("segment {} does not exist", define.name),
                        )
                    })
            }
            (None, Some(live)) => SegmentDef {
                predicate: String::new(),
                deleted: true,
                updated_at: at,
                ..live.clone()
            },
            (Some(predicate), Some(live))
                if *predicate == live.predicate && define.description == live.description =>
            {
                return Ok((live.clone(), false));
            }
            (Some(predicate), live) => {
                self.check_definition(predicate, live.is_none())?;
                let generation = current.map_or(1, |def| {
                    def.generation + u64::from(def.deleted || def.predicate != *predicate)
                });
                let id = match current {
                    Some(def) => def.id,
                    None => {
                        self.record.segment_ids += 1;
                        self.record.segment_ids
                    }
                };
                SegmentDef {
                    name: define.name.clone(),
                    id,
                    predicate: predicate.clone(),
                    description: define.description.clone(),
                    generation,
                    version: 0,
                    created_at: live.map_or(at, |def| def.created_at),
                    updated_at: at,
                    deleted: false,
                }
            }
        };
        let created = live.is_none();
        self.record.segment_version += 1;
        let def = SegmentDef {
            version: self.record.segment_version,
            ..def
        };
        self.install_segment(tx, def.clone());
        Ok((def, created))
    }

    /// Installs a definition unless this shard holds one of the same name and a version as
    /// high. A new predicate starts a backfill over the profiles there are; the members keep
    /// their membership until it reaches them. A deletion starts taking the members out.
    pub(super) fn install_segment(&mut self, tx: &mut Tx<'_>, def: SegmentDef) {
        let previous = self.segments.get(&def.name);
        if previous.is_some_and(|s| s.record.def.version >= def.version) {
            return;
        }
        let stored = previous.map(|s| s.stored);
        let size = previous.map_or(0, |s| s.record.size);
        // A name this shard holds keeps its number here (the registry gives a new one to a
        // name it forgot, which this shard may still hold members of): numbers only need to
        // be unique within a shard, and the registry never gives one twice.
        let def = SegmentDef {
            id: previous.map_or(def.id, |s| s.record.def.id),
            ..def
        };
        let record = match previous.map(|s| &s.record) {
            Some(old) if old.def.deleted == def.deleted && old.def.predicate == def.predicate => {
                SegmentRecord { def, ..old.clone() }
            }
            _ => SegmentRecord {
                backfill_next: 1,
                profiles_total: if def.deleted {
                    0
                } else {
                    self.record.profile_seq
                },
                size,
                def,
            },
        };
        let name = record.def.name.clone();
        let ended = record.def.deleted && record.size == 0;
        let generation = record.def.generation;
        self.segments.insert(record, stored.unwrap_or(0));
        self.write_segment(tx, &name, stored);
        if ended {
            self.append_change(tx, &name, generation, OneId(0), Change::Ended);
        }
        self.forget_tombstones(tx);
        self.refresh_thresholds();
    }

    /// Writes a segment's record now (`stored`: the pair hash it replaces, `None` if new).
    fn write_segment(&mut self, tx: &mut Tx<'_>, name: &str, stored: Option<u64>) {
        let segment = self.segments.get_mut(name).expect("writes a held segment");
        let key = keys::segment(name);
        let bytes = encode(&segment.record);
        segment.stored = pair_hash(&key, &bytes);
        tx.put_known(key, stored, bytes);
        self.segments.dirty.remove(name);
    }

    /// At the end of a command: writes the records it changed (their sizes and backfill
    /// progress) and its change-log group.
    pub(super) fn finish_segments(&mut self, tx: &mut Tx<'_>) {
        self.write_changes(tx);
        for name in std::mem::take(&mut self.segments.dirty) {
            let stored = self.segments.get(&name).expect("held").stored;
            self.write_segment(tx, &name, Some(stored));
        }
    }

    /// Past [`SEGMENT_TOMBSTONES_MAX`] finished deletions, forgets the oldest.
    fn forget_tombstones(&mut self, tx: &mut Tx<'_>) {
        let mut finished: Vec<(u64, String)> = self
            .segments
            .by_id
            .values()
            .filter(|s| s.record.def.deleted && s.record.size == 0)
            .map(|s| (s.record.def.version, s.record.def.name.clone()))
            .collect();
        if finished.len() <= SEGMENT_TOMBSTONES_MAX {
            return;
        }
        finished.sort();
        for (_, name) in &finished[..finished.len() - SEGMENT_TOMBSTONES_MAX] {
            let id = self.segments.by_name.remove(name).expect("listed above");
            self.segments.by_id.remove(&id).expect("held by number");
            self.segments.dirty.remove(name);
            let key = keys::segment(name);
            // Read back, not assumed: the record may have changed in memory this command.
            tx.delete(key);
        }
    }

    /// Appends one change to the change log: to the group the command is writing, which goes
    /// out at the end of the command or once it holds [`CHANGES_PER_GROUP_MAX`].
    fn append_change(
        &mut self,
        tx: &mut Tx<'_>,
        segment: &str,
        generation: u64,
        oneid: OneId,
        change: Change,
    ) {
        self.segments.changes.push(ChangeRecord {
            segment: segment.to_string(),
            generation,
            oneid,
            change,
            at: self.record.clock,
        });
        if self.segments.changes.len() == CHANGES_PER_GROUP_MAX {
            self.write_changes(tx);
        }
    }

    /// Writes the changes of the group being filled under the offset of its first.
    fn write_changes(&mut self, tx: &mut Tx<'_>) {
        let group = std::mem::take(&mut self.segments.changes);
        if group.is_empty() {
            return;
        }
        tx.put_new(keys::change(self.record.change_seq + 1), &group);
        self.record.change_seq += group.len() as u64;
    }

    /// Evaluates the segments `eval` names for a settled profile (rule tags already set),
    /// recording each change of membership. Answers whether any changed.
    pub(super) fn evaluate_segments(
        &mut self,
        tx: &mut Tx<'_>,
        profile: &mut Profile,
        eval: Eval<'_>,
    ) -> bool {
        if !self.segments.any_live() {
            return false;
        }
        let changed = match eval {
            Eval::Changed(Some(before)) | Eval::Segment(_, before) => {
                before.changed(&Stamp::of(profile)).with(Reads::TIMES)
            }
            Eval::Changed(None) | Eval::All => Reads::ALL,
        };
        let view = RuleView {
            profile,
            rules: &self.rules,
            now: self.record.clock,
            rule_tags: &profile.rule_tags,
        };
        // Both the segments and the profile's memberships are in number order: one walk over
        // both tells each segment's membership, without a lookup per segment.
        let mut memberships = profile.segments.iter().copied().peekable();
        let mut flips: Vec<(String, u64, bool)> = Vec::new();
        for (&id, segment) in &self.segments.by_id {
            let name = &segment.record.def.name;
            while memberships.next_if(|m| *m < id).is_some() {}
            let was = memberships.peek() == Some(&id);
            let relevant = match eval {
                Eval::Segment(only, _) if only == name.as_str() => true,
                _ => segment.reads.intersects(changed),
            };
            let Some(predicate) = segment.predicate.as_ref().filter(|_| relevant) else {
                continue;
            };
            let member = predicate.eval(&view);
            if member != was {
                flips.push((name.clone(), segment.record.def.generation, member));
            }
        }
        let any = !flips.is_empty();
        for (name, generation, member) in flips {
            self.set_member(tx, profile, &name, generation, member);
        }
        any
    }

    /// Takes a profile merged into `into` out of every segment it is a member of.
    pub(super) fn leave_segments(&mut self, tx: &mut Tx<'_>, profile: &mut Profile, into: OneId) {
        let left: Vec<(String, u64)> = profile
            .segments
            .iter()
            .filter_map(|id| self.segments.by_id.get(id))
            .map(|s| (s.record.def.name.clone(), s.record.def.generation))
            .collect();
        for (name, generation) in left {
            let exit = Change::MergedInto(into);
            self.record_membership(tx, profile, &name, generation, exit);
        }
    }

    /// Enters or leaves a segment: the profile's list, the member key, the size, the log.
    fn set_member(
        &mut self,
        tx: &mut Tx<'_>,
        profile: &mut Profile,
        name: &str,
        generation: u64,
        member: bool,
    ) {
        let change = if member { Change::Enter } else { Change::Exit };
        self.record_membership(tx, profile, name, generation, change);
    }

    /// A change of membership (an enter, or an exit of either kind): the profile's list, the
    /// member key, the size, the log.
    fn record_membership(
        &mut self,
        tx: &mut Tx<'_>,
        profile: &mut Profile,
        name: &str,
        generation: u64,
        change: Change,
    ) {
        let member = change == Change::Enter;
        let key = keys::member(name, profile.oneid);
        let segment = self
            .segments
            .get_mut(name)
            .expect("members of held segments");
        let id = segment.record.def.id;
        if member {
            profile.segments.insert(id);
            tx.put_new(key, &());
            segment.record.size += 1;
        } else {
            profile.segments.remove(&id);
            tx.delete_known(key, &[]);
            segment.record.size -= 1;
        }
        let ended = segment.record.def.deleted && segment.record.size == 0;
        self.segments.dirty.insert(name.to_string());
        self.append_change(tx, name, generation, profile.oneid, change);
        if ended {
            self.append_change(tx, name, generation, OneId(0), Change::Ended);
        }
    }

    /// Whether background work is left (the leader proposes `Backfill` while there is).
    pub fn has_backfill(&self) -> bool {
        self.record.rules_backfill.is_some() || self.segments.next_job().is_some()
    }

    /// One bounded batch of background work: the rules re-evaluation first, then segments in
    /// name order. Answers whether work is left.
    pub(super) fn backfill(&mut self, tx: &mut Tx<'_>) -> bool {
        if let Some(job) = self.record.rules_backfill {
            let end = job.total.min(job.next + BACKFILL_PER_ENTRY - 1);
            for seq in job.next..=end {
                self.refresh_profile(tx, OneId::mint(self.shard, seq), None);
            }
            self.record.rules_backfill = (end < job.total).then_some(RulesBackfill {
                next: end + 1,
                total: job.total,
            });
        } else if let Some(name) = self.segments.next_job() {
            let record = &self.segments.get(&name).expect("held").record;
            if record.def.deleted {
                self.take_out_members(tx, &name);
            } else {
                let (next, total) = (record.backfill_next, record.profiles_total);
                let end = total.min(next + BACKFILL_PER_ENTRY - 1);
                for seq in next..=end {
                    self.refresh_profile(tx, OneId::mint(self.shard, seq), Some(&name));
                }
                let segment = self.segments.get_mut(&name).expect("held");
                segment.record.backfill_next = end + 1;
                self.segments.dirty.insert(name);
            }
        }
        self.has_backfill()
    }

    /// Takes a batch of members out of a deleted segment, each an exit.
    fn take_out_members(&mut self, tx: &mut Tx<'_>, name: &str) {
        let members = tx.scan_below(
            &keys::members_prefix(name),
            None,
            &keys::members_end(name),
            BACKFILL_PER_ENTRY as usize,
        );
        let generation = self.segments.get(name).expect("held").record.def.generation;
        for (key, _) in members {
            let oneid = keys::member_oneid(&key);
            let (mut profile, stored_hash) = self
                .load_profile(tx, oneid)
                .expect("members are existing profiles");
            self.set_member(tx, &mut profile, name, generation, false);
            profile.version += 1;
            self.store_profile(tx, profile, Some(stored_hash));
        }
    }

    /// Settles one profile again in the background (a backfill of `segment`, or with `None`
    /// of the rules): writes it only if that changed it, and activates it only if it was
    /// active. Settling moves what the clock moves (rule tags), so every segment reading what
    /// it changed is evaluated too, not only the one backfilled.
    fn refresh_profile(&mut self, tx: &mut Tx<'_>, oneid: OneId, segment: Option<&str>) {
        let (mut profile, stored_hash, active) = match self.activations.take(oneid) {
            Some((profile, stored_hash)) => (profile, stored_hash, true),
            None => {
                let key = keys::profile(oneid);
                let Some(bytes) = tx.get(&key) else {
                    // Every OneID up to `profile_seq` is a profile, or a tombstone (merged
                    // into another), which no segment or rule reads.
                    assert!(
                        self.tombstone(tx, oneid).is_some(),
                        "{oneid}: neither a profile nor a tombstone"
                    );
                    return;
                };
                (decode(&key, &bytes), pair_hash(&key, &bytes), false)
            }
        };
        let before = profile.clone();
        let stamp = Stamp::of(&profile);
        let eval = match segment {
            Some(name) => Eval::Segment(name, &stamp),
            None => {
                let mut writes = EventWrites::default();
                self.set_tier(tx, &mut profile, self.record.clock, false, &mut writes);
                writes.commit(tx, &mut self.record.due_floor, &mut self.retained.ledger);
                Eval::All
            }
        };
        self.settle(tx, &mut profile, eval);
        let stored_hash = if profile == before {
            stored_hash
        } else {
            profile.version += 1;
            self.write_profile(tx, &profile, Some(stored_hash))
        };
        if active {
            self.activations.insert(profile, stored_hash);
        }
    }

    /// After a rules change: every profile there is is re-evaluated in the background.
    pub(super) fn start_rules_backfill(&mut self) {
        self.record.rules_backfill = (self.record.profile_seq > 0).then_some(RulesBackfill {
            next: 1,
            total: self.record.profile_seq,
        });
    }

    /// Evicts change-log entries past their retention (age or count), a bounded batch per
    /// clock entry. Answers whether the batch was full.
    pub(super) fn evict_changes(&mut self, tx: &mut Tx<'_>, retention: Retention) -> bool {
        let horizon = Millis(self.record.clock.0 - i64::from(retention.change_log_hours) * HOUR_MS);
        let keep_from = self
            .record
            .change_seq
            .saturating_sub(retention.change_log_entries_max)
            + 1;
        let mut evicted = 0;
        while self.record.changes_evicted < self.record.change_seq
            && evicted < CHANGE_EVICTIONS_PER_CLOCK_MAX
        {
            // Groups are evicted whole: the next one starts right after the last evicted.
            let first = self.record.changes_evicted + 1;
            let key = keys::change(first);
            let bytes = tx.get(&key).expect("change groups follow each other");
            let group: Vec<ChangeRecord> = decode(&key, &bytes);
            let last = first + group.len() as u64 - 1;
            if last >= keep_from && group[0].at >= horizon {
                break;
            }
            tx.delete_known(key, &bytes);
            self.record.changes_evicted = last;
            evicted += group.len() as u64;
        }
        evicted >= CHANGE_EVICTIONS_PER_CLOCK_MAX
    }
}
