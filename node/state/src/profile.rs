//! A profile's state: what the virtual actor of one OneID holds, persisted with its shard.
//!
//! The ledger and orders are separate records on disk (they grow with history); the profile
//! keeps what every event and read needs: balances, the lots, tier, tags, metrics.

use super::keys;
use super::store::pair_hash;
use super::tx::{decode, encode, Tx};
use super::ShardState;
use oneid_protocol::api::{MetricsView, PointsView, ProfileDoc};
use oneid_protocol::ids::{Identity, OneId};
use oneid_protocol::num::{Millis, Money, DAY_MS};
use oneid_protocol::predicate::{NumberField, PredicateContext, TimeField, Value};
use oneid_protocol::rules::Rules;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most identity values one profile holds (all kinds together).
pub const IDENTITIES_PER_PROFILE_MAX: usize = 50;
/// Most attributes one profile holds.
pub const ATTRIBUTES_PER_PROFILE_MAX: usize = 100;
/// Most manual tags one profile holds.
pub const MANUAL_TAGS_PER_PROFILE_MAX: usize = 200;
/// Most channels remembered per profile; past it the least recently seen is forgotten.
pub const CHANNELS_PER_PROFILE_MAX: usize = 64;
/// Most points lots one profile holds. Past it, the two lots whose expiries are closest merge
/// into the later one: no point ever expires earlier than it was promised, a few expire later.
pub const LOTS_PER_PROFILE_MAX: usize = 256;
/// Lots whose expiries fall in the same span of this length (a UTC minute) are one lot,
/// expiring at the latest of them, so earns in a burst (one per event) do not each add a lot.
pub const LOT_MERGE_MS: i64 = 60_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub oneid: OneId,
    /// kind → values, both sorted.
    pub identities: BTreeMap<String, BTreeSet<String>>,
    pub attributes: BTreeMap<String, Value>,
    /// `sum(lots) - debt`; negative only through `points_adjust`.
    pub balance: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    /// Earned points not yet spent or expired, ordered by expiry; at most one per minute of
    /// expiry and [`LOTS_PER_PROFILE_MAX`] in all.
    pub lots: Vec<Lot>,
    /// Points owed after a negative adjust beyond the lots; paid by the next earns.
    pub debt: i64,
    pub tier: String,
    pub tier_since: Millis,
    /// When the tier's retention period ends and it is reviewed; `None` at the lowest level or
    /// with no retention.
    pub tier_retained_until: Option<Millis>,
    /// When a time-based tag rule can next flip (the scheduled `RuleReview`), if ever.
    pub rule_review_at: Option<Millis>,
    /// Manual tags and when each expires.
    pub manual_tags: BTreeMap<String, Option<Millis>>,
    /// Tags set by rules at the last evaluation.
    pub rule_tags: BTreeSet<String>,
    pub order_count: u64,
    pub total_spend: Money,
    pub spend_365d: Money,
    pub first_order_at: Option<Millis>,
    pub last_order_at: Option<Millis>,
    /// Channel → the latest event seen on it; at most [`CHANNELS_PER_PROFILE_MAX`].
    pub channels: BTreeMap<String, Millis>,
    /// Channel → the latest order on it; at most [`CHANNELS_PER_PROFILE_MAX`].
    pub last_order_on: BTreeMap<String, Millis>,
    /// The segments this profile is a member of, by number (`SegmentDef::id`; their member
    /// keys are written with it).
    pub segments: BTreeSet<u64>,
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Next ledger sequence number of this profile.
    pub ledger_seq: u64,
    /// When each attribute was last written (its event's `ts`), or removed: a name without an
    /// attribute was removed then (the [`ATTRIBUTES_PER_PROFILE_MAX`] latest removals are
    /// remembered). Of an attribute a merge's profiles wrote, the newer write stays, a
    /// removal included. Its keys hold `attributes`' keys.
    /// The fields from here on are format 11's, appended so that a migration can decode an
    /// older profile with their defaults after it.
    pub attribute_at: BTreeMap<String, Millis>,
    /// When each manual tag was last added or removed by an event (its `ts`), for merges like
    /// `attribute_at` (the [`MANUAL_TAGS_PER_PROFILE_MAX`] latest removals are remembered; an
    /// expiry is no removal). Its keys hold `manual_tags`' keys.
    pub manual_tag_at: BTreeMap<String, Millis>,
    /// When this OneID was minted (its first event's `ts`). Unlike `created_at`, which a
    /// merge moves to the earliest of the profiles merged, it never changes: it ranks the
    /// profile among merge candidates (see [`crate::merge::Rank`]), so the same profiles merge
    /// into the same survivor in any order.
    pub minted_at: Millis,
    /// The OneIDs merged into this one, oldest merge first (at most
    /// [`crate::merge::MERGES_PER_PROFILE_MAX`]).
    pub merged_from: Vec<OneId>,
    /// The merge this profile takes part in, if any (see [`crate::merge::MergeLock`]).
    pub merging: Option<Box<crate::merge::MergeLock>>,
}

/// Points expiring together: one earn, or several merged (see [`LOTS_PER_PROFILE_MAX`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    pub expires_at: Millis,
    pub points: i64,
    /// The event of its first earn.
    pub event_id: String,
    /// The ledger sequence of its first earn: the lot's identity, in its due key.
    pub seq: u64,
    /// Earns merged into it (1 for a lot of one earn).
    pub earns: u32,
}

impl Lot {
    /// Who earned it, for the ledger entry of its expiry.
    pub fn earned_by(&self) -> String {
        match self.earns {
            1 => self.event_id.clone(),
            n => format!("{} and {} other earns", self.event_id, n - 1),
        }
    }
}

/// The due key a lot needs: its identity and the time it expires.
pub type LotDue = (u64, Millis);

impl Profile {
    pub fn new(oneid: OneId, rules: &Rules, at: Millis) -> Profile {
        Profile {
            oneid,
            identities: BTreeMap::new(),
            attributes: BTreeMap::new(),
            balance: 0,
            lifetime_earned: 0,
            lifetime_redeemed: 0,
            lots: Vec::new(),
            debt: 0,
            tier: rules.levels[0].name.clone(),
            tier_since: at,
            tier_retained_until: None,
            rule_review_at: None,
            manual_tags: BTreeMap::new(),
            rule_tags: BTreeSet::new(),
            order_count: 0,
            total_spend: Money::ZERO,
            spend_365d: Money::ZERO,
            first_order_at: None,
            last_order_at: None,
            channels: BTreeMap::new(),
            last_order_on: BTreeMap::new(),
            segments: BTreeSet::new(),
            version: 0,
            created_at: at,
            updated_at: at,
            ledger_seq: 0,
            attribute_at: BTreeMap::new(),
            manual_tag_at: BTreeMap::new(),
            minted_at: at,
            merged_from: Vec::new(),
            merging: None,
        }
    }

    /// The time `days_since(field)` measures from, `None` if unset.
    pub fn time_of(&self, field: &TimeField) -> Option<Millis> {
        match field {
            TimeField::LastOrderAt => self.last_order_at,
            TimeField::FirstOrderAt => self.first_order_at,
            TimeField::CreatedAt => Some(self.created_at),
            TimeField::LastSeen(channel) => self.channels.get(channel).copied(),
            TimeField::LastOrderOn(channel) => self.last_order_on.get(channel).copied(),
        }
    }

    pub fn identity_count(&self) -> usize {
        self.identities.values().map(BTreeSet::len).sum()
    }

    /// Whether the profile lists `identity`.
    pub fn holds(&self, identity: &Identity) -> bool {
        self.identities
            .get(&identity.kind)
            .is_some_and(|values| values.contains(&identity.value))
    }

    /// Adds earned points (paying any debt first) to the lot that expires in the same minute,
    /// or as a new lot with identity `seq`. Answers the due key a lot now needs: a new lot's,
    /// or a merged lot's whose expiry moved later; `None` if the existing key still holds.
    pub fn add_points(
        &mut self,
        points: i64,
        expires_at: Millis,
        event_id: &str,
        seq: u64,
    ) -> Option<LotDue> {
        assert!(points > 0, "a lot holds positive points");
        let paid = points.min(self.debt);
        self.debt -= paid;
        let rest = points - paid;
        self.balance += points;
        let due = (rest > 0)
            .then(|| self.add_lot(rest, expires_at, event_id, seq))
            .flatten();
        self.check_points();
        due
    }

    fn add_lot(
        &mut self,
        points: i64,
        expires_at: Millis,
        event_id: &str,
        seq: u64,
    ) -> Option<LotDue> {
        let minute = |at: Millis| at.0.div_euclid(LOT_MERGE_MS);
        if let Some(lot) = self
            .lots
            .iter_mut()
            .find(|lot| minute(lot.expires_at) == minute(expires_at))
        {
            lot.points += points;
            lot.earns += 1;
            let later = expires_at > lot.expires_at;
            lot.expires_at = lot.expires_at.max(expires_at);
            return later.then_some((lot.seq, lot.expires_at));
        }
        let at = self
            .lots
            .partition_point(|lot| lot.expires_at <= expires_at);
        self.lots.insert(
            at,
            Lot {
                expires_at,
                points,
                event_id: event_id.to_string(),
                seq,
                earns: 1,
            },
        );
        if self.lots.len() <= LOTS_PER_PROFILE_MAX {
            return Some((seq, expires_at));
        }
        // Over the cap: the adjacent pair closest in expiry (the earliest such pair) becomes
        // the later lot, which keeps its identity and due key; the new lot needs its own key
        // unless it was the earlier of the pair.
        let i = (0..self.lots.len() - 1)
            .min_by_key(|&i| (self.lots[i + 1].expires_at.0 - self.lots[i].expires_at.0, i))
            .expect("over the cap, there are two lots");
        let earlier = self.lots.remove(i);
        let later = &mut self.lots[i];
        later.points += earlier.points;
        later.earns += earlier.earns;
        (earlier.seq != seq).then_some((seq, expires_at))
    }

    /// Takes points from the lots, the lot of `prefer` first, then the soonest to expire.
    /// Returns how many were taken (at most what the lots hold).
    pub fn take_points(&mut self, points: i64, prefer: Option<&str>) -> i64 {
        assert!(points >= 0, "cannot take negative points");
        let mut left = points;
        if let Some(event_id) = prefer {
            if let Some(lot) = self.lots.iter_mut().find(|lot| lot.event_id == event_id) {
                let take = lot.points.min(left);
                lot.points -= take;
                left -= take;
            }
        }
        for lot in &mut self.lots {
            if left == 0 {
                break;
            }
            let take = lot.points.min(left);
            lot.points -= take;
            left -= take;
        }
        self.lots.retain(|lot| lot.points > 0);
        let taken = points - left;
        self.balance -= taken;
        self.check_points();
        taken
    }

    /// Removes lot `seq` if it expires at `at` (a due key of an earlier expiry, from before
    /// the lot merged, is stale): the lot, or `None` if it was spent, merged or moved.
    pub fn expire_lot(&mut self, seq: u64, at: Millis) -> Option<Lot> {
        let position = self
            .lots
            .iter()
            .position(|lot| lot.seq == seq && lot.expires_at == at)?;
        let lot = self.lots.remove(position);
        self.balance -= lot.points;
        self.check_points();
        Some(lot)
    }

    /// Takes points beyond the lots as debt (negative balance): `points_adjust` only.
    pub fn take_points_into_debt(&mut self, points: i64) {
        let taken = self.take_points(points, None);
        self.debt += points - taken;
        self.balance -= points - taken;
        self.check_points();
    }

    fn check_points(&self) {
        let in_lots: i64 = self.lots.iter().map(|lot| lot.points).sum();
        assert_eq!(
            self.balance,
            in_lots - self.debt,
            "balance must equal lots minus debt for {}",
            self.oneid
        );
        assert!(
            self.debt == 0 || self.lots.is_empty(),
            "debt is paid before lots are kept for {}",
            self.oneid
        );
        assert!(
            self.lots.len() <= LOTS_PER_PROFILE_MAX,
            "{} holds {} lots",
            self.oneid,
            self.lots.len()
        );
    }

    /// Gives every attribute and manual tag the profile's `updated_at` as its write time: what
    /// a profile of a format before 11, which kept none, is taken to mean (its migration, and
    /// each older event still in a migrated log, do this).
    pub fn date_writes_at_update(&mut self) {
        let at = self.updated_at;
        self.attribute_at = self.attributes.keys().map(|k| (k.clone(), at)).collect();
        self.manual_tag_at = self.manual_tags.keys().map(|k| (k.clone(), at)).collect();
    }

    /// Whether `merge` holds this profile's lock.
    pub fn locked_by(&self, merge: crate::merge::MergeId) -> bool {
        self.merging.as_ref().is_some_and(|l| l.plan.merge == merge)
    }

    /// Takes an identity off the profile (a kind left without values goes too).
    pub fn remove_identity(&mut self, identity: &Identity) {
        if let Some(values) = self.identities.get_mut(&identity.kind) {
            values.remove(&identity.value);
            if values.is_empty() {
                self.identities.remove(&identity.kind);
            }
        }
    }

    /// Removes a manual tag and the time it was added (it expired, or a merge dropped it).
    pub fn remove_manual_tag(&mut self, tag: &str) {
        self.manual_tags.remove(tag);
        self.manual_tag_at.remove(tag);
    }

    /// Removes a manual tag by an event dated `at`, remembering when (see `manual_tag_at`).
    pub fn untag(&mut self, tag: &str, at: Millis) {
        let max = MANUAL_TAGS_PER_PROFILE_MAX;
        remove_remembering(&mut self.manual_tags, &mut self.manual_tag_at, tag, at, max);
    }

    /// Removes an attribute by an event dated `at`, remembering when (see `attribute_at`).
    pub fn remove_attribute(&mut self, name: &str, at: Millis) {
        let max = ATTRIBUTES_PER_PROFILE_MAX;
        remove_remembering(&mut self.attributes, &mut self.attribute_at, name, at, max);
    }

    /// Forgets every removal remembered, as events of format 12 and before did (see
    /// `EventsOf::remembers_removals`).
    pub fn forget_removals(&mut self) {
        let (attributes, tags) = (&self.attributes, &self.manual_tags);
        self.attribute_at
            .retain(|name, _| attributes.contains_key(name));
        self.manual_tag_at.retain(|tag, _| tags.contains_key(tag));
    }

    pub fn tags(&self) -> BTreeSet<&str> {
        self.manual_tags
            .keys()
            .chain(self.rule_tags.iter())
            .map(String::as_str)
            .collect()
    }

    /// The API document of this profile; `segments` are the names of its segments.
    pub fn to_doc(&self, segments: Vec<String>) -> ProfileDoc {
        ProfileDoc {
            oneid: self.oneid.to_string(),
            identities: self
                .identities
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                .collect(),
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
            points: PointsView {
                balance: self.balance,
                lifetime_earned: self.lifetime_earned,
                lifetime_redeemed: self.lifetime_redeemed,
            },
            tier: self.tier.clone(),
            tier_since: self.tier_since.to_string(),
            tier_retained_until: self.tier_retained_until.map(|t| t.to_string()),
            tags: self.tags().into_iter().map(str::to_string).collect(),
            metrics: MetricsView {
                order_count: self.order_count,
                total_spend: self.total_spend.to_string(),
                spend_365d: self.spend_365d.to_string(),
                first_order_at: self.first_order_at.map(|t| t.to_string()),
                last_order_at: self.last_order_at.map(|t| t.to_string()),
                last_order_on: self
                    .last_order_on
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
            },
            channels: self
                .channels
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            segments,
            version: self.version,
            created_at: self.created_at.to_string(),
            updated_at: self.updated_at.to_string(),
            merged_from: self.merged_from.iter().map(OneId::to_string).collect(),
            resolved_from: None,
        }
    }
}

fn value_to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::String(s) => serde_json::Value::String(s.clone()),
        // Exact: the decimal's text as a JSON number literal.
        Value::Number(d) => {
            serde_json::from_str(&d.normalize().to_string()).unwrap_or(serde_json::Value::Null)
        }
    }
}

/// The tags `tag_rules` (the rules' compiled tag rules, in order) give `profile` at `now`:
/// each rule sees the tags of the rules before it.
pub fn rule_tags(
    profile: &Profile,
    rules: &Rules,
    tag_rules: &[(String, oneid_protocol::predicate::Predicate)],
    now: Millis,
) -> BTreeSet<String> {
    let mut tags = BTreeSet::new();
    for (tag, predicate) in tag_rules {
        let view = RuleView {
            profile,
            rules,
            now,
            rule_tags: &tags,
        };
        if predicate.eval(&view) {
            tags.insert(tag.clone());
        }
    }
    tags
}

/// A profile seen by the rule language, at the shard's clock, under the current rules.
pub struct RuleView<'a> {
    pub profile: &'a Profile,
    pub rules: &'a Rules,
    pub now: Millis,
    /// Rule tags set so far in this evaluation (earlier rules).
    pub rule_tags: &'a BTreeSet<String>,
}

impl PredicateContext for RuleView<'_> {
    fn number(&self, field: NumberField) -> Option<Decimal> {
        Some(match field {
            NumberField::Points => Decimal::from(self.profile.balance),
            NumberField::Spend365d => self.profile.spend_365d.to_decimal(),
            NumberField::TotalSpend => self.profile.total_spend.to_decimal(),
            NumberField::OrderCount => Decimal::from(self.profile.order_count),
        })
    }

    fn tier_level(&self) -> Option<usize> {
        self.rules.level_of(&self.profile.tier)
    }

    fn tier_level_of(&self, name: &str) -> Option<usize> {
        self.rules.level_of(name)
    }

    fn attribute(&self, name: &str) -> Option<Value> {
        self.profile.attributes.get(name).cloned()
    }

    fn has_tag(&self, tag: &str) -> bool {
        self.profile.manual_tags.contains_key(tag) || self.rule_tags.contains(tag)
    }

    fn has_channel(&self, channel: &str) -> bool {
        self.profile.channels.contains_key(channel)
    }

    fn has_identity(&self, kind: &str) -> bool {
        self.profile.identities.contains_key(kind)
    }

    fn days_since(&self, field: &TimeField) -> Option<i64> {
        let at = self.profile.time_of(field)?;
        Some((self.now.0 - at.0).div_euclid(DAY_MS))
    }
}

impl ShardState {
    /// Activates a profile for apply: the profile, and the pair hash of its stored bytes. An
    /// activated one is taken out of the cache: the caller stores it (`finish_profile`), puts
    /// it back unchanged (`activations.insert`) or, having changed it, discards it.
    pub(super) fn load_profile(&mut self, tx: &Tx<'_>, oneid: OneId) -> Option<(Profile, u64)> {
        if let Some(taken) = self.activations.take(oneid) {
            return Some(taken);
        }
        let key = keys::profile(oneid);
        let bytes = tx.get(&key)?;
        Some((decode(&key, &bytes), pair_hash(&key, &bytes)))
    }

    /// Writes a profile through and keeps it activated; `old` is the hash `load_profile` gave.
    pub(super) fn store_profile(&mut self, tx: &mut Tx<'_>, profile: Profile, old: Option<u64>) {
        let stored_hash = self.write_profile(tx, &profile, old);
        self.activations.insert(profile, stored_hash);
    }

    /// Writes a profile through; answers the pair hash of what it wrote.
    pub(super) fn write_profile(
        &self,
        tx: &mut Tx<'_>,
        profile: &Profile,
        old: Option<u64>,
    ) -> u64 {
        let key = keys::profile(profile.oneid);
        let bytes = encode(profile);
        let stored_hash = pair_hash(&key, &bytes);
        tx.put_known(key, old, bytes);
        stored_hash
    }
}

/// Removes `name` from `live`, remembering in `times` that it was removed `at` (at most `max`
/// removals remembered).
fn remove_remembering<V>(
    live: &mut BTreeMap<String, V>,
    times: &mut BTreeMap<String, Millis>,
    name: &str,
    at: Millis,
    max: usize,
) {
    live.remove(name);
    times.insert(name.to_string(), at);
    forget_oldest_removals(times, live, max);
}

/// The removals `times` remembers: the names `live` does not hold, with when.
pub(crate) fn removals<'a, V>(
    times: &'a BTreeMap<String, Millis>,
    live: &'a BTreeMap<String, V>,
) -> impl Iterator<Item = (&'a String, Millis)> {
    times
        .iter()
        .filter(|(name, _)| !live.contains_key(*name))
        .map(|(name, at)| (name, *at))
}

/// Forgets the oldest removals `times` remembers (names `live` does not hold) past `max`.
pub(crate) fn forget_oldest_removals<V>(
    times: &mut BTreeMap<String, Millis>,
    live: &BTreeMap<String, V>,
    max: usize,
) {
    // `times` holds a time for every live name: nothing to read or allocate while the count
    // of removals is within the bound (as after nearly every removal).
    if times.len().saturating_sub(live.len()) <= max {
        return;
    }
    let mut oldest: Vec<(Millis, String)> = removals(times, live)
        .map(|(name, at)| (at, name.clone()))
        .collect();
    oldest.sort();
    let excess = oldest.len().saturating_sub(max);
    for (_, name) in oldest.into_iter().take(excess) {
        times.remove(&name);
    }
}
