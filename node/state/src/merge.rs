//! Merges: when the identities of two to four customers meet, their profiles become one. The
//! **survivor** is the one of highest [`Rank`]; each **loser** gives it everything it holds
//! ([`Profile::absorb`]), exactly: every unspent lot with its expiry, lifetime totals, spend
//! and orders' metrics, channels, manual tags and attributes (the newer write of each),
//! identities. What the survivor gains is what the loser held ([`Totals`], asserted), so a
//! merge moves points and spend between profiles and never creates or loses any.
//!
//! This file holds what a merge is (its plan, the locks and the record its steps keep) and the
//! pure half of it: what one profile does with another's state. `saga.rs` is each step's
//! apply on its shard.

use crate::command::{EventOutcome, Routed};
use crate::keys::{self, DueKind};
use crate::profile::{
    forget_oldest_removals, removals, Profile, ATTRIBUTES_PER_PROFILE_MAX,
    CHANNELS_PER_PROFILE_MAX, MANUAL_TAGS_PER_PROFILE_MAX,
};
use crate::unlink::UnlinkRecord;
use crate::{LedgerKind, LedgerRecord, OrderRecord};
use oneid_protocol::api::NotLinkedReason;
use oneid_protocol::ids::{Identity, OneId};
use oneid_protocol::num::{Millis, Money};
use oneid_protocol::policy::IdentityPolicy;
use oneid_protocol::rules::Rules;
use serde::{Deserialize, Serialize};
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Most profiles merged into one in its lifetime (a merge of three counts two). A merge past it
/// leaves the identities that called for it unlinked (`merge_limit`): a customer merged a
/// hundred times is a shared device or a test account more likely than one person.
pub const MERGES_PER_PROFILE_MAX: usize = 100;
/// Most profiles one event merges (the survivor and three losers). An event whose identities
/// name more is refused `too_many_profiles`.
pub const PROFILES_PER_MERGE_MAX: usize = 4;

/// Most profiles of one shard locked by merges at once. A lock past it is answered `Busy`
/// (the driver waits): merges waiting on one another must not grow without bound.
pub const MERGES_PENDING_MAX: u64 = 10_000;
/// Most bytes of orders or event ids one export carries (one Raft entry each way).
pub const EXPORT_BYTES_MAX: usize = 1 << 20;
/// Most order keys of a loser one tombstone entry deletes; it is proposed again until none is
/// left.
pub const TOMBSTONE_DELETES_MAX: usize = 1_000;

/// A merge's name: a hash of its profiles (sorted) and of what called for it, so every driver
/// of the same merge (the router, each profile shard's sweep) names it alike, and a retry of
/// the event that called for it drives the same merge again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MergeId(pub u128);

impl MergeId {
    pub fn of(profiles: &[OneId], cause: &Cause) -> MergeId {
        let name = match cause {
            Cause::Event(routed) => format!("event\0{}", routed.event.event_id),
            Cause::Taken(identity) => format!("taken\0{}\0{}", identity.kind, identity.value),
        };
        let bytes = postcard::to_stdvec(&(profiles, name)).expect("a merge's name encodes");
        MergeId(xxhash_rust::xxh3::xxh3_128(&bytes))
    }
}

impl fmt::Display for MergeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What called for a merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cause {
    /// An event whose identities (and `oneid`) named the profiles: it applies to the survivor
    /// once they are one (`MergeStep::Finish`).
    Event(Box<Routed>),
    /// A follow-up's bind found this identity bound to another profile first.
    Taken(Identity),
}

/// What a merge is asked to do: carried by each lock, so any driver can carry it on, and by
/// its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergePlan {
    pub merge: MergeId,
    /// The profiles to make one, sorted (2 to [`PROFILES_PER_MERGE_MAX`]): the order their
    /// locks are taken in, so that merges waiting on each other's locks never wait in a circle.
    pub profiles: Vec<OneId>,
    pub cause: Cause,
    /// The rules version the merge was judged by (kinds that merge, priorities, limits).
    pub rules_version: u64,
}

impl MergePlan {
    pub fn new(profiles: BTreeSet<OneId>, cause: Cause, rules_version: u64) -> MergePlan {
        let profiles: Vec<OneId> = profiles.into_iter().collect();
        assert!(
            (2..=PROFILES_PER_MERGE_MAX).contains(&profiles.len()),
            "a merge makes one of 2 to {PROFILES_PER_MERGE_MAX} profiles"
        );
        MergePlan {
            merge: MergeId::of(&profiles, &cause),
            profiles,
            cause,
            rules_version,
        }
    }

    /// The event id of the cause, for the merge's history.
    pub fn event_id(&self) -> Option<&str> {
        match &self.cause {
            Cause::Event(routed) => Some(&routed.event.event_id),
            Cause::Taken(_) => None,
        }
    }
}

/// A profile's part in a merge, as its lock recorded it when taken (a locked profile changes
/// no more): what the survivor's shard decides the merge by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub rank: Rank,
    pub identities: BTreeMap<String, BTreeSet<String>>,
    /// Profiles merged into it so far.
    pub merged: usize,
    pub totals: Totals,
}

/// The survivor of a merge: the participant of highest rank.
pub fn survivor(participants: &[Participant]) -> OneId {
    participants
        .iter()
        .map(|p| p.rank)
        .max()
        .expect("a merge has participants")
        .oneid
}

impl Participant {
    pub fn of(profile: &Profile, policy: &IdentityPolicy) -> Participant {
        Participant {
            rank: Rank::of(profile, policy),
            identities: profile.identities.clone(),
            merged: profile.merged_from.len(),
            totals: Totals::of(profile),
        }
    }
}

/// A profile taking part in a merge: from its lock until it is a tombstone (a loser) or the
/// merge finished (the survivor). Its events are answered `unavailable` meanwhile, its due
/// keys wait, and no other merge takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeLock {
    pub plan: MergePlan,
    pub participant: Participant,
    /// The shard clock when it was locked.
    pub at: Millis,
}

/// Where a merged OneID went: `p oneid` is gone, `x oneid` holds this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub into: OneId,
    pub merge: MergeId,
    pub at: Millis,
}

/// What the survivor imports of a loser next: its profile, orders, exactly-once records, then
/// its unlinks if it has any. (Variants keep their encoded order: `Unlinks`, of format 13,
/// comes after `Done`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImportStep {
    /// Its profile record (lots, totals, tags, attributes, channels, identities).
    Profile,
    /// Its orders after this order id (`None`: from the first).
    Orders(Option<String>),
    /// Its exactly-once records after this event id.
    Dedup(Option<String>),
    Done,
    /// Its unlink records (at most [`crate::unlink::UNLINKED_PER_PROFILE_MAX`], one part).
    Unlinks,
}

/// One part of a loser's state, exported by its shard and imported by the survivor's: at most
/// [`EXPORT_BYTES_MAX`] of orders or event ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ImportPart {
    Profile(Box<Profile>),
    /// All of a loser at once (its profile, orders and exactly-once records), when they fit in
    /// one part: most losers are small, and this saves four steps.
    Whole {
        profile: Box<Profile>,
        orders: Vec<(String, OrderRecord)>,
        event_ids: Vec<String>,
    },
    Orders {
        after: Option<String>,
        orders: Vec<(String, OrderRecord)>,
        next: ImportStep,
    },
    Dedup {
        after: Option<String>,
        event_ids: Vec<String>,
        next: ImportStep,
    },
    /// The identities unlinked from the loser, with their records: an event dated before an
    /// unlink binds the value to the survivor no more than it would have to the loser. A loser
    /// with unlinks is never exported `Whole`.
    Unlinks(Vec<(Identity, UnlinkRecord)>),
}

impl ImportPart {
    /// The step this part fills.
    pub fn step(&self) -> ImportStep {
        match self {
            ImportPart::Profile(_) | ImportPart::Whole { .. } => ImportStep::Profile,
            ImportPart::Orders { after, .. } => ImportStep::Orders(after.clone()),
            ImportPart::Dedup { after, .. } => ImportStep::Dedup(after.clone()),
            ImportPart::Unlinks(_) => ImportStep::Unlinks,
        }
    }
}

/// A loser as its survivor's record follows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoserImport {
    pub oneid: OneId,
    pub next: ImportStep,
    /// Its identities (from its profile, once imported): what the bindings repoint.
    pub identities: Vec<Identity>,
}

/// How a merge stands, in its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MergeState {
    /// Committed: the losers' state is being imported.
    Importing,
    /// Everything imported, the losers tombstoned, their bindings repointed, the cause applied:
    /// its outcome (none for a merge a bind called for).
    Finished(Option<EventOutcome>),
    /// The policy refused the merge (the reason every identity of another profile got); the
    /// cause applied to the survivor alone: its outcome.
    Refused(NotLinkedReason, Option<EventOutcome>),
}

/// A merge as its survivor's shard keeps it (`j merge`), from its commit on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub plan: MergePlan,
    pub survivor: OneId,
    /// In OneID order.
    pub losers: Vec<LoserImport>,
    /// The shard clock at the commit.
    pub at: Millis,
    pub state: MergeState,
    pub dropped: Dropped,
    /// Order ids both a loser and the survivor held: the survivor's stays, the loser's is kept
    /// under the merge (see `keys::twin_order`).
    pub twins: Vec<String>,
}

impl MergeRecord {
    pub fn is_finished(&self) -> bool {
        !matches!(self.state, MergeState::Importing)
    }
}

/// Where a profile ranks among the profiles of a merge; the highest survives. By the highest
/// `priority` among the identity kinds it holds (the identity policy's), then the earliest
/// minting, then the smallest OneID: a total order, since OneIDs differ.
///
/// A survivor's rank after a merge is its own rank before: its kinds' highest priority is the
/// highest of all (it ranked first by it) and `minted_at` never moves. So the survivor of
/// profiles merged in any order, in any grouping, is the one of highest rank among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rank {
    /// `None`: the profile holds no identity.
    pub priority: Option<i32>,
    pub minted_at: Millis,
    pub oneid: OneId,
}

impl Rank {
    pub fn of(profile: &Profile, policy: &IdentityPolicy) -> Rank {
        Rank {
            priority: profile
                .identities
                .keys()
                .map(|kind| policy.priority(kind))
                .max(),
            minted_at: profile.minted_at,
            oneid: profile.oneid,
        }
    }
}

impl Ord for Rank {
    fn cmp(&self, other: &Rank) -> Ordering {
        (self.priority, Reverse(self.minted_at), Reverse(self.oneid)).cmp(&(
            other.priority,
            Reverse(other.minted_at),
            Reverse(other.oneid),
        ))
    }
}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Rank) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What a merge moves that the whole cluster's sums must keep: the loser's export records its
/// totals, and the survivor's import asserts it gained exactly those.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub balance: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    pub order_count: u64,
    pub total_spend: Money,
    pub spend_365d: Money,
}

impl Totals {
    pub fn of(profile: &Profile) -> Totals {
        Totals {
            balance: profile.balance,
            lifetime_earned: profile.lifetime_earned,
            lifetime_redeemed: profile.lifetime_redeemed,
            order_count: profile.order_count,
            total_spend: profile.total_spend,
            spend_365d: profile.spend_365d,
        }
    }

    /// The sum of two profiles' totals. Each is a profile's, whose apply kept it within i64
    /// (`check_totals`); two such add up within i128, so an overflow is answered `None`,
    /// never a panic.
    pub fn plus(self, other: Totals) -> Option<Totals> {
        Some(Totals {
            balance: self.balance.checked_add(other.balance)?,
            lifetime_earned: self.lifetime_earned.checked_add(other.lifetime_earned)?,
            lifetime_redeemed: self
                .lifetime_redeemed
                .checked_add(other.lifetime_redeemed)?,
            order_count: self.order_count.checked_add(other.order_count)?,
            total_spend: Money(self.total_spend.0.checked_add(other.total_spend.0)?),
            spend_365d: Money(self.spend_365d.0.checked_add(other.spend_365d.0)?),
        })
    }
}

/// What a merge left out of its survivor, past a per-profile limit (the oldest go), listed in
/// the merge's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub tags: Vec<String>,
    pub attributes: Vec<String>,
    pub channels: Vec<String>,
}

/// What absorbing a loser asks the survivor's shard to write besides the profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Absorbed {
    /// The survivor's new ledger entries, with their sequence numbers, in order: one
    /// `merge_in` per lot moved (its sequence is the moved lot's new identity), and an
    /// `adjust` for a loser's debt netted against the survivor's lots.
    pub ledger: Vec<(u64, LedgerRecord)>,
    /// Due keys the survivor needs for what it took: lots, tag expiries, a tier review.
    pub due: Vec<Vec<u8>>,
    pub dropped: Dropped,
}

impl Profile {
    /// Takes in everything `loser` holds (see the module's comment), at the shard clock
    /// `at` (or the later of the two profiles' last changes), for the merge named `merge` (the
    /// ledger entries' event id). The caller
    /// re-evaluates the tier on the combined spend (`set_tier`), rule tags and segments.
    ///
    /// Panics if the totals would overflow: the saga checks [`Totals::plus`] before it
    /// commits to a merge.
    pub fn absorb(&mut self, loser: &Profile, rules: &Rules, merge: &str, at: Millis) -> Absorbed {
        assert_ne!(self.oneid, loser.oneid, "a profile cannot absorb itself");
        // The shard clock lags the times events carry: dated no earlier than either profile's
        // last change, a merge's entries follow their ledgers' earlier entries in time too.
        let at = at.max(self.updated_at).max(loser.updated_at);
        let expected = Totals::of(self)
            .plus(Totals::of(loser))
            .expect("the saga checked that the merged totals fit");
        let mut absorbed = Absorbed::default();
        self.absorb_points(loser, merge, at, &mut absorbed);
        self.lifetime_earned += loser.lifetime_earned;
        self.lifetime_redeemed += loser.lifetime_redeemed;
        self.order_count += loser.order_count;
        self.total_spend.0 += loser.total_spend.0;
        self.spend_365d.0 += loser.spend_365d.0;
        self.first_order_at = earliest(self.first_order_at, loser.first_order_at);
        self.last_order_at = self.last_order_at.max(loser.last_order_at);
        absorbed.dropped.channels = union_latest(&mut self.channels, &loser.channels);
        // The latest order per channel, bounded like the channels; not listed as dropped.
        union_latest(&mut self.last_order_on, &loser.last_order_on);
        absorbed.dropped.tags = self.absorb_tags(loser, &mut absorbed.due);
        absorbed.dropped.attributes = self.absorb_attributes(loser);
        for (kind, values) in &loser.identities {
            let held = self.identities.entry(kind.clone()).or_default();
            held.extend(values.iter().cloned());
        }
        self.keep_better_tier(loser, rules, &mut absorbed.due);
        self.created_at = self.created_at.min(loser.created_at);
        self.updated_at = self.updated_at.max(loser.updated_at).max(at);
        self.merged_from.push(loser.oneid);
        self.version += 1;
        assert_eq!(
            Totals::of(self),
            expected,
            "{} gained other totals than {} held",
            self.oneid,
            loser.oneid
        );
        absorbed
    }

    /// The loser's lots, each joining the survivor's with its expiry (one `merge_in` entry
    /// each), and its debt netted against them (an `adjust`).
    fn absorb_points(&mut self, loser: &Profile, merge: &str, at: Millis, out: &mut Absorbed) {
        for lot in &loser.lots {
            let seq = self.ledger_seq;
            if let Some((lot_seq, expires_at)) =
                self.add_points(lot.points, lot.expires_at, &lot.event_id, seq)
            {
                let detail = lot_seq.to_be_bytes();
                out.due.push(keys::due(
                    expires_at,
                    self.oneid,
                    DueKind::LotExpiry,
                    &detail,
                ));
            }
            let reason = format!(
                "points earned by {} merged from {}",
                lot.earned_by(),
                loser.oneid
            );
            let record = LedgerRecord {
                expires_at: Some(lot.expires_at),
                ..self.merge_entry(merge, LedgerKind::MergeIn, lot.points, at, reason, loser)
            };
            out.ledger.push((seq, record));
            self.ledger_seq += 1;
        }
        if loser.debt > 0 {
            self.take_points_into_debt(loser.debt);
            let reason = format!("points owed by {} merged", loser.oneid);
            let record =
                self.merge_entry(merge, LedgerKind::Adjust, -loser.debt, at, reason, loser);
            out.ledger.push((self.ledger_seq, record));
            self.ledger_seq += 1;
        }
    }

    /// A ledger entry of this profile for a merge with `peer`, after the balance moved.
    fn merge_entry(
        &self,
        merge: &str,
        kind: LedgerKind,
        points: i64,
        at: Millis,
        reason: String,
        peer: &Profile,
    ) -> LedgerRecord {
        LedgerRecord {
            event_id: merge.to_string(),
            kind,
            points,
            balance_after: self.balance,
            at,
            reason: Some(reason),
            shortfall: 0,
            peer: Some(peer.oneid),
            expires_at: None,
        }
    }

    /// The loser's last ledger entry: everything it held went to `survivor` (dated no earlier
    /// than its last change, like the survivor's entries).
    pub fn merge_out_entry(&self, survivor: OneId, merge: &str, at: Millis) -> LedgerRecord {
        let at = at.max(self.updated_at);
        LedgerRecord {
            event_id: merge.to_string(),
            kind: LedgerKind::MergeOut,
            points: -self.balance,
            balance_after: 0,
            at,
            reason: Some(format!("merged into {survivor}")),
            shortfall: 0,
            peer: Some(survivor),
            expires_at: None,
        }
    }

    /// Manual tags of both: a tag both hold keeps the later expiry (none is latest) and the
    /// later write; a removal by an event newer than the other's add stays removed; past
    /// [`MANUAL_TAGS_PER_PROFILE_MAX`], the most recently written stay. Answers the tags
    /// dropped; a tag whose expiry came from the loser gets its due key.
    fn absorb_tags(&mut self, loser: &Profile, due: &mut Vec<Vec<u8>>) -> Vec<String> {
        for (tag, expires) in &loser.manual_tags {
            let written = written_at(&loser.manual_tag_at, tag, loser);
            // Removed here since (the survivor's on a tie).
            let removed = !self.manual_tags.contains_key(tag)
                && self.manual_tag_at.get(tag).is_some_and(|at| *at >= written);
            if removed {
                continue;
            }
            let expires = match self.manual_tags.get(tag) {
                Some(None) => None,
                Some(Some(mine)) => expires.map(|theirs| theirs.max(*mine)),
                None => *expires,
            };
            if let Some(at) = expires {
                if self.manual_tags.get(tag) != Some(&Some(at)) {
                    due.push(keys::due(
                        at,
                        self.oneid,
                        DueKind::TagExpiry,
                        tag.as_bytes(),
                    ));
                }
            }
            self.manual_tags.insert(tag.clone(), expires);
            let at = self.manual_tag_at.entry(tag.clone()).or_insert(written);
            *at = (*at).max(written);
        }
        for (tag, removed) in removals(&loser.manual_tag_at, &loser.manual_tags) {
            let held = self.manual_tag_at.get(tag);
            if held.is_none_or(|at| removed > *at) {
                self.manual_tags.remove(tag);
                self.manual_tag_at.insert(tag.clone(), removed);
            }
        }
        let dropped = oldest_past(
            &live_times(&self.manual_tag_at, &self.manual_tags),
            MANUAL_TAGS_PER_PROFILE_MAX,
        );
        for tag in &dropped {
            self.remove_manual_tag(tag);
        }
        forget_oldest_removals(
            &mut self.manual_tag_at,
            &self.manual_tags,
            MANUAL_TAGS_PER_PROFILE_MAX,
        );
        dropped
    }

    /// Attributes of both: of one both wrote, the newer write, a removal included (the
    /// survivor's on a tie); past [`ATTRIBUTES_PER_PROFILE_MAX`], the most recently written
    /// stay. Answers those dropped.
    fn absorb_attributes(&mut self, loser: &Profile) -> Vec<String> {
        for (name, value) in &loser.attributes {
            let written = written_at(&loser.attribute_at, name, loser);
            let newer = self
                .attribute_at
                .get(name)
                .is_none_or(|mine| written > *mine);
            if newer {
                self.attributes.insert(name.clone(), value.clone());
                self.attribute_at.insert(name.clone(), written);
            }
        }
        for (name, removed) in removals(&loser.attribute_at, &loser.attributes) {
            if self.attribute_at.get(name).is_none_or(|at| removed > *at) {
                self.attributes.remove(name);
                self.attribute_at.insert(name.clone(), removed);
            }
        }
        let dropped = oldest_past(
            &live_times(&self.attribute_at, &self.attributes),
            ATTRIBUTES_PER_PROFILE_MAX,
        );
        for name in &dropped {
            self.attributes.remove(name);
            self.attribute_at.remove(name);
        }
        forget_oldest_removals(
            &mut self.attribute_at,
            &self.attributes,
            ATTRIBUTES_PER_PROFILE_MAX,
        );
        dropped
    }

    /// Keeps the better tier of the two (the higher level, or at the same level the later end
    /// of its retention), with its period and its review; the caller then raises it to what
    /// the combined spend reaches.
    fn keep_better_tier(&mut self, loser: &Profile, rules: &Rules, due: &mut Vec<Vec<u8>>) {
        let standing = |p: &Profile| (rules.level_of(&p.tier), p.tier_retained_until);
        if standing(loser) <= standing(self) {
            return;
        }
        self.tier.clone_from(&loser.tier);
        self.tier_since = loser.tier_since;
        self.tier_retained_until = loser.tier_retained_until;
        if let Some(until) = self.tier_retained_until {
            due.push(keys::due(until, self.oneid, DueKind::TierReview, &[]));
        }
    }
}

/// When `name` was written, from a map that holds every name of its collection.
fn written_at(times: &BTreeMap<String, Millis>, name: &str, of: &Profile) -> Millis {
    *times
        .get(name)
        .unwrap_or_else(|| panic!("{} holds {name:?} without its write time", of.oneid))
}

fn earliest(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Adds `theirs` into `mine` keeping the latest time per name; past
/// [`CHANNELS_PER_PROFILE_MAX`], the most recent stay. Answers the names dropped.
fn union_latest(
    mine: &mut BTreeMap<String, Millis>,
    theirs: &BTreeMap<String, Millis>,
) -> Vec<String> {
    for (name, at) in theirs {
        let seen = mine.entry(name.clone()).or_insert(*at);
        *seen = (*seen).max(*at);
    }
    let dropped = oldest_past(mine, CHANNELS_PER_PROFILE_MAX);
    for name in &dropped {
        mine.remove(name);
    }
    dropped
}

/// The write times of the names `live` holds (not the removals `times` remembers).
fn live_times<V>(
    times: &BTreeMap<String, Millis>,
    live: &BTreeMap<String, V>,
) -> BTreeMap<String, Millis> {
    times
        .iter()
        .filter(|(name, _)| live.contains_key(*name))
        .map(|(name, at)| (name.clone(), *at))
        .collect()
}

/// The names beyond the `max` most recent (by time, then name), sorted by name.
fn oldest_past(times: &BTreeMap<String, Millis>, max: usize) -> Vec<String> {
    if times.len() <= max {
        return Vec::new();
    }
    let mut by_age: Vec<(&Millis, &String)> = times.iter().map(|(n, at)| (at, n)).collect();
    by_age.sort();
    let mut dropped: Vec<String> = by_age[..times.len() - max]
        .iter()
        .map(|(_, name)| (*name).clone())
        .collect();
    dropped.sort();
    dropped
}
