//! Commands: what a shard's Raft log holds, and what applying one answers.
//!
//! Every input of apply is in a command: the clock, the rules, the events (with their `ts`),
//! so replaying a log gives the same state on every replica.

use crate::merge::{ImportPart, ImportStep, MergeId, MergePlan, MergeRecord, Participant};
use oneid_protocol::api::NotLinked;
use oneid_protocol::event::{Event, EventError};
use oneid_protocol::ids::{Identity, OneId};
use oneid_protocol::num::Millis;
use oneid_protocol::rules::{Retention, Rules};
use serde::{Deserialize, Serialize};

/// One Raft log entry's payload, encoded with postcard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Advances the shard's clock towards `target`, the shard's majority time when the leader
    /// proposed it (see `oneid_replica::clocks`), by at most [`CLOCK_STEP_MAX_MS`] past the
    /// clock (a shard's first clock entry, from 0, goes all the way): "now" of the shard. It
    /// never goes back. Applying it processes what fell due and evicts what outlived the
    /// rules' retention, a bounded amount each.
    ///
    /// [`CLOCK_STEP_MAX_MS`]: crate::retention::CLOCK_STEP_MAX_MS
    Clock { target: Millis },
    /// Replaces the loyalty rules, unversioned: what releases before rules had versions
    /// proposed (and a node of one may still forward during a rolling upgrade). It applies as
    /// it did and leaves the shard's rules version as it is.
    SetRules(Box<Rules>),
    /// The rules of `cluster.toml`, proposed by a leader that found none applied: applied only
    /// if the shard still has no rules when it is applied, so it never overrides a `SetRules`
    /// that was already in the log.
    SeedRules(Box<Rules>),
    /// Events for profiles of this shard, in request order. Each applied event's identities
    /// held by other shards leave follow-up records here, in the same apply.
    Events(Vec<Routed>),
    /// Binds identities held by this shard's index to profiles (of any shard): the first
    /// binding wins, and binding again to the same profile is answered `Bound`.
    Bind(Vec<(Identity, OneId)>),
    /// Follow-ups of this shard whose binds were answered: bound identities are listed on
    /// their profiles, and the records are deleted. Idempotent.
    FinishFollowUps(Vec<FollowUpAnswer>),
    /// Defines, replaces or deletes a segment. Proposed to the registry shard
    /// ([`REGISTRY_SHARD`]) only: it orders every definition (its `version`), enforces the
    /// segment limit, and answers the definition that every shard then installs.
    DefineSegment(SegmentDefine),
    /// Installs a definition the registry shard ordered. A shard keeps, per name, the one of
    /// the highest version, so installs arriving in any order (or twice) leave every shard
    /// with the same definitions.
    InstallSegment(SegmentDef),
    /// Advances the shard's background work by one bounded batch: re-evaluating profiles
    /// after a rules change, backfilling new or replaced segments, and taking the members out
    /// of deleted ones. Proposed by the leader while there is some.
    Backfill,
    /// The retention of a leader's `cluster.toml`, proposed when the applied rules have none
    /// (rules migrated from format 7, which kept retention in each node's config): applied
    /// only if they still have none, so it never overrides a `SetRules`.
    SeedRetention(Retention),
    /// A format-7 clock entry, in a log migrated to format 8 (never proposed): it applies as
    /// it did when written (the clock raised to `now`, no step bound; eviction by the retention
    /// it carries), so a replica that applies it after the upgrade reaches the state of one
    /// that applied it before and was migrated. The shard's target follows its clock.
    LegacyClock { now: Millis, retention: Retention },
    /// Format-7 events, in a log migrated to format 8 (never proposed): they apply as they
    /// did, without the bound on `ts` (see `LegacyClock`) or the identity policy (see
    /// `LegacyEvents9`).
    LegacyEvents(Vec<LegacyRouted>),
    /// A format-7 segment definition, in a log migrated to format 8 (never proposed): dated
    /// by its proposer's clock `at`, as it was (see `LegacyClock`).
    LegacyDefineSegment(SegmentDefine, Millis),
    /// Orders a new rules document. Proposed to the registry shard ([`REGISTRY_SHARD`]) only:
    /// it gives the rules the next version (its own plus one), installs them, and answers the
    /// version, which every other shard then installs with `InstallRules`.
    DefineRules(Box<Rules>),
    /// Installs rules the registry shard ordered. A shard keeps the rules of the highest
    /// version it was sent, so installs arriving in any order (or twice) leave every shard
    /// with the same rules: those of the last PUT the registry ordered.
    InstallRules { version: u64, rules: Box<Rules> },
    /// Events of formats 8 and 9, in a log migrated to format 10 (never proposed): they apply
    /// as they did, before the identity policy (no blocked values, kind limits or unmergeable
    /// kinds; an event past the identity limit is refused whole).
    LegacyEvents9(Vec<LegacyRouted>),
    /// Events of format 10, in a log migrated to format 11 (never proposed): they apply as
    /// they did, and then every attribute and manual tag of their profile takes the
    /// profile's `updated_at` as its write time, as the migration gives a profile it finds,
    /// so a replica that applies one after the upgrade ends where one that applied it before
    /// and was migrated ends.
    LegacyEvents10(Vec<Routed>),
    /// A step of a merge (see `saga.rs`): proposed by the merge's drivers, at the shard the
    /// step names.
    Merge(MergeStep),
    /// Removes bindings of identities held by this shard's index, each only if still bound to
    /// the profile named (an `unlink` took the identity off it; see `unlink.rs`): answered
    /// `Unbound` either way. Idempotent.
    Unbind(Vec<(Identity, OneId)>),
    /// Events of formats 11 and 12, in a log migrated to format 13 (never proposed): they
    /// apply as they did, a removal of an attribute or manual tag forgetting its write time,
    /// so a replica that applies one after the upgrade ends where one that applied it before
    /// ends.
    LegacyEvents12(Vec<Routed>),
    /// A merge step of formats 11 and 12, in a log migrated to format 13 (never proposed): it
    /// applies as `Merge` does, its cause (if it applies one) as `LegacyEvents12` events.
    LegacyMerge12(MergeStep),
}

/// The steps of a merge, each one idempotent Raft entry of bounded size on its own shard (see
/// `saga.rs` for their order and `merge_driver` for who proposes which).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MergeStep {
    /// A merge's first steps, one per profile in the plan's order: locks `oneid` (of this
    /// shard) for the merge, unless another merge holds it, its follow-ups are pending, or it
    /// is a tombstone; the lock answers the profile's part (see `merge::MergeLock`).
    Lock { plan: Box<MergePlan>, oneid: OneId },
    /// The commit point, at the survivor's shard (the participant of highest rank): records
    /// the merge, or its refusal by the policy (then the cause applies to the survivor alone).
    /// Idempotent: answers the record.
    Commit {
        plan: Box<MergePlan>,
        participants: Vec<Participant>,
    },
    /// Answers one part of a locked loser's state (at the loser's shard).
    Export {
        merge: MergeId,
        loser: OneId,
        step: ImportStep,
    },
    /// Takes one exported part into the survivor (at its shard), if it is the part the record
    /// waits for; answers the record.
    Import {
        merge: MergeId,
        loser: OneId,
        part: Box<ImportPart>,
    },
    /// Makes an imported loser a tombstone pointing at `survivor` (at the loser's shard):
    /// its last ledger entry, its segments left, its orders deleted (a bounded batch per
    /// entry: proposed again while it answers more). What format-11 drivers proposed; this
    /// release's propose `Retire`, which also repoints.
    Tombstone {
        merge: MergeId,
        loser: OneId,
        survivor: OneId,
    },
    /// Binds to `to` the identities of this shard's slice bound to `from` (a merged loser),
    /// moving the binding epoch.
    Repoint {
        from: OneId,
        to: OneId,
        identities: Vec<Identity>,
    },
    /// The merge's last step, at the survivor's shard: the cause applies to the survivor, which
    /// is unlocked and settled (rule tags, segments) on its combined state. Idempotent.
    Finish { merge: MergeId },
    /// Unlocks `oneid` if `merge` holds it: a merge given up before its commit (a profile of
    /// its plan was merged elsewhere meanwhile, or is missing), or refused.
    Unlock { merge: MergeId, oneid: OneId },
    /// `Tombstone`, and in the same entry the `Repoint` of the loser's identities its own
    /// shard holds (as a rule, the one that claimed it): one step fewer for most merges.
    Retire {
        merge: MergeId,
        loser: OneId,
        survivor: OneId,
    },
    /// `Commit`, and in the same entry the `Import` of each loser whose lock answered all of
    /// it (`parts`, together at most `EXPORT_BYTES_MAX`): one step fewer for most merges.
    CommitWith {
        plan: Box<MergePlan>,
        participants: Vec<Participant>,
        parts: Vec<(OneId, ImportPart)>,
    },
}

/// The shard that orders segment definitions.
pub const REGISTRY_SHARD: u32 = 0;

/// A segment definition as a client asked for it, before the registry shard ordered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDefine {
    pub name: String,
    /// The predicate's source (validated by the API; apply parses it again, deterministically).
    /// `None` deletes the segment.
    pub predicate: Option<String>,
    pub description: String,
}

/// A segment definition as the registry shard ordered it: what every shard installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDef {
    pub name: String,
    /// The segment's number, given by the registry shard when the name is first defined (and
    /// kept while any shard remembers the name): what profiles list their memberships by.
    pub id: u64,
    /// The predicate's source; empty once deleted.
    pub predicate: String,
    pub description: String,
    /// Increases each time the predicate changes (a re-created segment continues it).
    pub generation: u64,
    /// The definition's place in the registry shard's order of definitions.
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub deleted: bool,
}

/// The answer of the bind a follow-up record asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUpAnswer {
    /// The follow-up record's sequence number.
    pub seq: u64,
    pub outcome: BindOutcome,
}

/// A follow-up an applied event left: bind `identity` to `oneid` at the identity's shard (or
/// unbind it from `oneid`, for an `unlink`), then finish record `seq` with the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUp {
    pub seq: u64,
    pub oneid: OneId,
    pub identity: Identity,
    pub unbind: bool,
}

/// An event and how the router resolved its profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routed {
    pub event: Event,
    pub target: Target,
    /// The version of the rules the router judged the event by (which values are blocked,
    /// which kinds merge): apply answers [`EventOutcome::StaleRules`] when its shard's rules
    /// have another, so no event applies as a router with a stale copy decided.
    pub rules_version: u64,
    /// Identities of the event, not blocked and unbound when routed, held by other shards'
    /// indexes: bound and linked after the event applies, within the profile's limits.
    pub link_elsewhere: Vec<Identity>,
    /// For each of the event's identities, in order: what the router found (`Unbound` for a
    /// blocked value, whatever its binding: it picks no profile). Empty: nothing is known.
    pub found: Vec<Found>,
}

/// A binding epoch no shard reaches: a [`Found::Bound`] at it is never taken on the router's
/// word where the shard holds the identity (apply reads the binding), only compared elsewhere.
/// For a binding known to have moved (a profile merged) but not read since.
pub const EPOCH_UNKNOWN: u64 = u64::MAX;

/// What the router found of one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Found {
    Unbound,
    /// Bound to `oneid` when its shard's binding epoch was `epoch`. Apply takes this word for
    /// an identity of its own shard only while its epoch is still that one (see
    /// `ShardRecord::binding_epoch`), and reads the binding otherwise.
    Bound {
        oneid: OneId,
        epoch: u64,
    },
}

/// An event as releases before the identity policy routed it (state formats 7 to 9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyRouted {
    pub event: Event,
    pub target: Target,
    pub link_elsewhere: Vec<Identity>,
    /// For each of the event's identities, in order: whether the router found it bound (to the
    /// target profile); empty means none is known.
    pub bound: Vec<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// A profile of this shard.
    Existing(OneId),
    /// The profile bound to the event's identities held by this shard, created if none is.
    Claim,
}

/// What applying a command answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Output {
    None,
    /// A clock entry: how many due keys it processed, and whether it left some for the next.
    Clock {
        due_processed: usize,
        backlog: bool,
    },
    /// One outcome per event, and the follow-ups the applied ones left.
    Events {
        outcomes: Vec<EventOutcome>,
        follow_ups: Vec<FollowUp>,
    },
    Bind(Vec<BindOutcome>),
    /// The definition the registry shard ordered, and whether it created the segment (no
    /// live segment of that name before); or why it refused.
    Segment(Result<(SegmentDef, bool), EventError>),
    /// A backfill batch: whether background work is left for another.
    Backfill {
        more: bool,
    },
    /// The version the registry shard gave the rules it was sent.
    RulesVersion(u64),
    Merge(MergeAnswer),
}

/// What a merge step answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MergeAnswer {
    /// Locked for the merge: the profile's part in it, and all of it as an import would take
    /// it when it fits in one part (what the `Export` of a loser would answer, since a locked
    /// profile changes no more: the driver imports it without that step).
    Locked(Participant, Option<Box<ImportPart>>),
    /// Another merge holds the profile: retry once it is done. (Also answered, with this very
    /// merge, while the shard holds `MERGES_PENDING_MAX` locks.)
    Busy(MergeId),
    /// The profile has follow-ups pending (identities being bound to it elsewhere): retry once
    /// they are finished.
    Pending,
    /// The profile is a tombstone: `merge` merged it into `into`.
    Moved {
        into: OneId,
        merge: MergeId,
    },
    /// No such profile (and no tombstone).
    Missing,
    /// The merge's record (commit, import, finish).
    Record(Box<MergeRecord>),
    /// Not committed: the survivor is not locked by this merge (given up, or its lock was
    /// never taken).
    NotLocked,
    /// A part of a loser's state.
    Export(Box<ImportPart>),
    /// A loser made a tombstone; `more`: orders left to delete.
    Tombstoned {
        more: bool,
    },
    /// Identities repointed (those still bound to the loser).
    Repointed(usize),
    /// The merge finished (or was refused): the record, and, if this very step ended it, the
    /// follow-ups its cause left (`None`: it had ended before).
    Finished(Box<MergeRecord>, Option<Vec<FollowUp>>),
    Unlocked(bool),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventOutcome {
    /// Applied to the profile; the identities it did not link, and why, sorted by (kind,
    /// value).
    Applied(OneId, Vec<NotLinked>),
    Duplicate(OneId),
    Rejected(EventError),
    /// Not applied: the router judged it by rules of another version than the shard's (this
    /// one). The router reads the rules again and routes it anew.
    StaleRules(u64),
    /// Not applied: the profile it names was merged into this one. The router routes it there.
    Moved(OneId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindOutcome {
    Bound,
    /// Already bound to another profile.
    Conflict(OneId),
    /// The answer to an unbind: bound to the profile no more.
    Unbound,
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("commands always encode")
    }

    /// Decodes a committed entry. A committed entry that does not decode is corrupt state:
    /// the caller stops the node.
    pub fn decode(data: &[u8]) -> Result<Command, postcard::Error> {
        postcard::from_bytes(data)
    }
}
