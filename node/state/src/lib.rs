//! The shard state machine: a pure function of (state, committed entry).
//!
//! Contract (after toydb's `raft/state.rs`): [`ShardState::apply`] reads only its state (through
//! [`StateRead`]), the entry, and the index and term it was committed at. It never reads the
//! clock, local config, randomness or hash-map iteration order; time, rules and retention come
//! in through [`Command`]s. A business failure (bad event) is an `EventOutcome::Rejected` and
//! changes nothing; a failure that is not deterministic (unreadable state) panics, which stops
//! the node instead of letting replicas drift.
//!
//! The virtual actors live here: each profile is loaded on its first message (activated),
//! changed only by the apply of its own events, and dropped from memory (passivated) by the
//! [`activations::Activations`] budget. Its state is always written through to the write set,
//! so passivation never loses anything.

pub mod activations;
pub mod audit;
pub mod command;
pub mod due;
mod event;
mod identities;
pub mod keys;
pub mod merge;
pub mod merge_driver;
pub mod profile;
pub mod retention;
mod rules;
mod saga;
pub mod segments;
pub mod store;
mod tier;
mod tx;
pub mod unlink;

use crate::command::{
    BindOutcome, Command, EventOutcome, FollowUp, FollowUpAnswer, Output, Target,
};
use activations::Activations;
use event::EventsOf;

use oneid_protocol::event::{Event, EventBody, EventError};
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::num::{Millis, Money};
use oneid_protocol::policy::{BlockList, IdentityPolicy};
use oneid_protocol::predicate::Predicate;
use oneid_protocol::predicate::TimeField;
use oneid_protocol::rules::Rules;
use oneid_protocol::ErrorCode;
use profile::{Profile, CHANNELS_PER_PROFILE_MAX, IDENTITIES_PER_PROFILE_MAX};
use retention::Retained;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use store::{pair_hash, StateRead, WriteSet};
pub use tx::decode;
use tx::{encode, reject, reject_field, EventWrites, Tx};

/// Most follow-up records a shard holds unfinished. An event that would add more is answered
/// `unavailable` (retry): binds on another shard are not keeping up (it has no leader, or is
/// overloaded), and waiting work must not grow without bound.
pub const FOLLOW_UPS_PENDING_MAX: u64 = 100_000;

/// Where the shard's applied log stands, stored under [`keys::META`] and left out of the
/// digest: it moves with every entry (including entries that change nothing else) and holds
/// the digest itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub applied_index: u64,
    pub applied_term: u64,
    /// Multiset hash of every other (key, value) of the state, [`ShardRecord`] included.
    pub digest: u64,
}

/// The shard's own replicated bookkeeping, stored under [`keys::SHARD`] and covered by the
/// digest like any other pair: replicas that disagree on any of it have different digests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// The shard's "now": where clock entries brought it. Never goes back.
    pub clock: Millis,
    /// The largest target of a clock entry applied: the shard's majority time as its leaders
    /// last saw it, ahead of `clock` while the clock catches up after a stop.
    pub target: Millis,
    /// Profiles minted so far; the next OneID uses `profile_seq + 1`.
    pub profile_seq: u64,
    /// Follow-up records written so far; the next one is `follow_up_seq + 1`.
    pub follow_up_seq: u64,
    /// Follow-up records not finished yet (at most [`FOLLOW_UPS_PENDING_MAX`]).
    pub follow_ups_pending: u64,
    /// Records of the retention queues written so far (one per log entry and queue).
    pub queue_seq: u64,
    /// No unprocessed due key is earlier than this: where the next clock entry's scan starts.
    pub due_floor: Millis,
    /// Dedup and ledger records written before these clocks were all evicted.
    pub dedup_evicted_to: Millis,
    pub ledger_evicted_to: Millis,
    /// Segment definitions ordered so far, and segment numbers given (the registry shard only).
    pub segment_version: u64,
    pub segment_ids: u64,
    /// The last offset of the change log (offsets start at 1).
    pub change_seq: u64,
    /// Change-log entries up to this offset were evicted.
    pub changes_evicted: u64,
    /// The re-evaluation of every profile a rules change started, until it is done.
    pub rules_backfill: Option<segments::RulesBackfill>,
    /// Moves each time a binding of the shard's slice of the identity index is removed or
    /// repointed (nothing does yet: merges and unlinks will). A binding read at an epoch holds
    /// while the epoch stays: apply takes a router's word for it (`Found::Bound`) only then,
    /// and a node's binding cache serves an entry only at its shard's latest epoch. Last, so
    /// that a record of an older format gains it by appending its byte.
    pub binding_epoch: u64,
    /// Profiles of this shard locked by a merge (at most [`merge::MERGES_PENDING_MAX`]).
    pub merges_pending: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub event_id: String,
    pub ts: Millis,
    pub amount: Money,
    pub refunded: Money,
    /// Points the order earned, and how many refunds reversed so far.
    pub points: i64,
    pub reversed: i64,
    /// Whether the order's amount counts in `spend_365d`.
    pub in_window: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerKind {
    Earn,
    Redeem,
    Adjust,
    Expire,
    Reverse,
    /// A lot moved in by a merge (the survivor's side: one entry per lot, with its expiry).
    MergeIn,
    /// Everything moved out by a merge (the loser's side: its last entry).
    MergeOut,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Earn => "earn",
            LedgerKind::Redeem => "redeem",
            LedgerKind::Adjust => "adjust",
            LedgerKind::Expire => "expire",
            LedgerKind::Reverse => "reverse",
            LedgerKind::MergeIn => "merge_in",
            LedgerKind::MergeOut => "merge_out",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRecord {
    pub event_id: String,
    pub kind: LedgerKind,
    /// Signed change of the balance.
    pub points: i64,
    pub balance_after: i64,
    pub at: Millis,
    pub reason: Option<String>,
    /// Points a reverse could not take back because they were already spent.
    pub shortfall: i64,
    /// The other profile of a merge: where a `merge_in` came from, where a `merge_out` went.
    /// Format 11's, like `expires_at`: appended, so older records gain them by appending
    /// their `None`s.
    pub peer: Option<OneId>,
    /// When the lot a `merge_in` moved expires.
    pub expires_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// The log index that applied the event.
    pub index: u64,
}

/// An identity of an applied event that another shard's index holds: this shard binds it
/// there (the identity's shard is the arbiter) and then lists it on the profile; or, for an
/// `unlink`, removes its binding to the profile there. The record is written in the same
/// apply as the event and deleted by the apply that finishes it
/// (`Command::FinishFollowUps`), so the work survives crashes and leader changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUpRecord {
    pub oneid: OneId,
    pub identity: Identity,
    /// The shard clock when the event applied.
    pub at: Millis,
    /// An unbind (`Command::Unbind`), not a bind.
    pub unbind: bool,
}

/// One shard's replicated state machine, with its activation cache.
pub struct ShardState {
    pub shard: ShardId,
    pub n_shards: u32,
    pub meta: ShardMeta,
    pub record: ShardRecord,
    /// `record` as last written (postcard), so an entry that leaves it unchanged writes
    /// nothing, and one that changes it knows the pair hash it replaces.
    record_stored: Option<Vec<u8>>,
    rules: Rules,
    /// The version of `rules` (see [`ShardState::rules_version`]).
    rules_version: u64,
    tag_rules: Vec<(String, Predicate)>,
    /// The identity policy's blocked values, compiled.
    blocks: BlockList,
    /// Where the `days_since` comparisons of tag rules and segments can flip (see `due.rs`).
    time_thresholds: Vec<(TimeField, i64)>,
    segments: segments::Segments,
    pub activations: Activations,
    /// Keys the command being applied wrote that retention will evict: filed at the end of
    /// the command as one record per queue (see `file_retained`), not one per key.
    retained: Retained,
}

impl ShardState {
    /// Loads the state machine of `shard` from its persisted state.
    pub fn load(
        shard: ShardId,
        n_shards: u32,
        base: &dyn StateRead,
        activation_budget: usize,
    ) -> ShardState {
        let meta: ShardMeta = base
            .get(keys::META)
            .map(|b| decode(keys::META, &b))
            .unwrap_or_default();
        let record_stored = base.get(keys::SHARD);
        let record: ShardRecord = record_stored
            .as_ref()
            .map(|b| decode(keys::SHARD, b))
            .unwrap_or_default();
        let rules: Rules = base
            .get(keys::RULES)
            .map(|b| decode(keys::RULES, &b))
            .unwrap_or_default();
        let rules_version: u64 = base
            .get(keys::RULES_VERSION)
            .map(|b| decode(keys::RULES_VERSION, &b))
            .unwrap_or_default();
        let mut state = ShardState {
            shard,
            n_shards,
            meta,
            record,
            record_stored,
            rules: Rules::default(),
            rules_version,
            tag_rules: Vec::new(),
            blocks: IdentityPolicy::default().block_list(),
            time_thresholds: Vec::new(),
            segments: segments::Segments::load(base),
            activations: Activations::new(activation_budget),
            retained: Retained::default(),
        };
        state.set_rules(rules);
        state
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The version of the rules in force: the registry shard's order of the PUT that sent
    /// them (0: seeded, or set by a release before rules had versions).
    pub fn rules_version(&self) -> u64 {
        self.rules_version
    }

    /// Applies one committed entry. `writes` holds the changes of earlier entries not yet
    /// persisted; this entry's changes are added to it, with the new meta.
    pub fn apply(
        &mut self,
        base: &dyn StateRead,
        writes: &mut WriteSet,
        index: u64,
        term: u64,
        command: Command,
    ) -> Output {
        assert!(
            index == self.meta.applied_index + 1,
            "shard {} applies index {index} after {}",
            self.shard,
            self.meta.applied_index
        );
        assert!(
            term >= self.meta.applied_term,
            "shard {}: term went back from {} to {term}",
            self.shard,
            self.meta.applied_term
        );
        let mut digest = self.meta.digest;
        let mut tx = Tx {
            base,
            writes,
            digest: &mut digest,
        };
        let output = self.apply_command(&mut tx, index, command);
        self.finish_segments(&mut tx);
        self.file_retained(&mut tx);
        assert!(
            self.activations.none_taken(),
            "shard {}: a profile taken for apply was neither stored nor put back",
            self.shard
        );
        self.store_record(&mut tx);
        self.finish_entry(writes, digest, index, term);
        output
    }

    /// What `command` does to the state, through `tx`; the bookkeeping every entry shares
    /// (segments' stamps, retention queues, the meta record) is [`ShardState::apply`]'s.
    fn apply_command(&mut self, tx: &mut Tx<'_>, index: u64, command: Command) -> Output {
        match command {
            Command::Clock { target } => {
                let (due_processed, backlog) = self.apply_clock(tx, target);
                Output::Clock {
                    due_processed,
                    backlog,
                }
            }
            Command::Events(events) => self.apply_events(tx, index, events, EventsOf::Current),
            Command::Bind(pairs) => Output::Bind(
                pairs
                    .into_iter()
                    .map(|(identity, oneid)| self.apply_bind(tx, identity, oneid))
                    .collect(),
            ),
            Command::FinishFollowUps(answers) => {
                self.finish_follow_ups(tx, answers);
                Output::None
            }
            Command::DefineSegment(define) => {
                let at = self.record.target;
                Output::Segment(self.define_segment(tx, define, at))
            }
            Command::InstallSegment(def) => {
                self.install_segment(tx, def);
                Output::None
            }
            Command::Backfill => Output::Backfill {
                more: self.backfill(tx),
            },
            Command::Merge(step) => {
                Output::Merge(self.apply_merge_step(tx, index, step, EventsOf::Current))
            }
            Command::Unbind(pairs) => Output::Bind(
                pairs
                    .into_iter()
                    .map(|(identity, oneid)| self.apply_unbind(tx, identity, oneid))
                    .collect(),
            ),
            Command::SetRules(_)
            | Command::SeedRules(_)
            | Command::DefineRules(_)
            | Command::InstallRules { .. }
            | Command::SeedRetention(_) => self.apply_rules_command(tx, command),
            Command::LegacyClock { .. }
            | Command::LegacyEvents(_)
            | Command::LegacyEvents9(_)
            | Command::LegacyEvents10(_)
            | Command::LegacyDefineSegment(..)
            | Command::LegacyEvents12(_)
            | Command::LegacyMerge12(_) => self.apply_legacy_command(tx, index, command),
        }
    }

    /// An entry of an older format in a migrated log: it applies as that format did.
    fn apply_legacy_command(&mut self, tx: &mut Tx<'_>, index: u64, command: Command) -> Output {
        match command {
            Command::LegacyClock { now, retention } => {
                let (due_processed, backlog) = self.apply_legacy_clock(tx, now, retention);
                Output::Clock {
                    due_processed,
                    backlog,
                }
            }
            Command::LegacyEvents(events) => {
                let events = events.into_iter().map(|e| self.routed_anew(e)).collect();
                self.apply_events(tx, index, events, EventsOf::Format7)
            }
            Command::LegacyEvents9(events) => {
                let events = events.into_iter().map(|e| self.routed_anew(e)).collect();
                self.apply_events(tx, index, events, EventsOf::Format9)
            }
            Command::LegacyEvents10(events) => {
                self.apply_events(tx, index, events, EventsOf::Format10)
            }
            Command::LegacyDefineSegment(define, at) => {
                Output::Segment(self.define_segment(tx, define, at))
            }
            Command::LegacyEvents12(events) => {
                self.apply_events(tx, index, events, EventsOf::Format12)
            }
            Command::LegacyMerge12(step) => {
                Output::Merge(self.apply_merge_step(tx, index, step, EventsOf::Format12))
            }
            other => unreachable!("{other:?} is no legacy command"),
        }
    }

    /// Writes the shard record if the entry changed it, through the digest like any pair.
    fn store_record(&mut self, tx: &mut Tx<'_>) {
        let bytes = encode(&self.record);
        if self.record_stored.as_ref() == Some(&bytes) {
            return;
        }
        let old = self
            .record_stored
            .as_ref()
            .map(|stored| pair_hash(keys::SHARD, stored));
        tx.put_known(keys::SHARD.to_vec(), old, bytes.clone());
        self.record_stored = Some(bytes);
    }

    /// Moves the applied index and writes the meta record (outside the digest).
    fn finish_entry(&mut self, writes: &mut WriteSet, digest: u64, index: u64, term: u64) {
        self.meta.digest = digest;
        self.meta.applied_index = index;
        self.meta.applied_term = term;
        writes
            .changes
            .insert(keys::META.to_vec(), Some(encode(&self.meta)));
    }

    /// Applies an entry without a command (a new leader's empty entry): only the index moves.
    pub fn apply_empty(&mut self, writes: &mut WriteSet, index: u64, term: u64) -> Output {
        assert!(
            index == self.meta.applied_index + 1,
            "shard {} applies index {index} after {}",
            self.shard,
            self.meta.applied_index
        );
        self.finish_entry(writes, self.meta.digest, index, term);
        Output::None
    }

    /// Reads a profile through the activation cache (the API reads storage directly; tests use
    /// this to check that activations equal what is stored).
    #[cfg(test)]
    pub fn read_profile(&mut self, view: &store::Layered<'_>, oneid: OneId) -> Option<Profile> {
        if let Some((profile, _)) = self.activations.get(oneid) {
            return Some(profile.clone());
        }
        let key = keys::profile(oneid);
        let bytes = view.get(&key)?;
        let profile: Profile = decode(&key, &bytes);
        self.activations
            .insert(profile.clone(), pair_hash(&key, &bytes));
        Some(profile)
    }
}

/// The event's channel was seen at its time (and, for an order, ordered on).
fn note_channel(profile: &mut Profile, event: &Event) {
    let Some(channel) = &event.channel else {
        return;
    };
    note_latest(&mut profile.channels, channel, event.ts);
    if matches!(event.body, EventBody::Order { .. }) {
        note_latest(&mut profile.last_order_on, channel, event.ts);
    }
}

/// Keeps the latest time per channel, for at most [`CHANNELS_PER_PROFILE_MAX`] channels (the
/// one seen longest ago goes).
fn note_latest(times: &mut BTreeMap<String, Millis>, channel: &str, at: Millis) {
    let seen = times.entry(channel.to_string()).or_insert(at);
    *seen = (*seen).max(at);
    if times.len() > CHANNELS_PER_PROFILE_MAX {
        let oldest = times
            .iter()
            .min_by_key(|(name, at)| (**at, (*name).clone()))
            .map(|(name, _)| name.clone());
        times.remove(&oldest.expect("channels is not empty"));
    }
}

#[cfg(test)]
mod due_tests;
#[cfg(test)]
mod identity_tests;
#[cfg(test)]
mod merge_tests;
#[cfg(test)]
mod saga_tests;
#[cfg(test)]
mod segment_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod unlink_tests;
