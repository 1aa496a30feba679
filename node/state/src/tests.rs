//! Unit tests of the shard state machine: lists of commands folded over a `MemState`, with
//! exact expected values. No network, no threads, no sleeps.

use super::event::EVENT_TS_AHEAD_MAX_MS;
use super::retention::{CLOCK_STEP_MAX_MS, DEDUP_EVICTIONS_PER_CLOCK_MAX};
use super::*;
use crate::command::{Found, LegacyRouted, Routed};
use crate::profile::Lot;
use oneid_protocol::api::{NotLinked, NotLinkedReason};
use oneid_protocol::event::{Event, POINTS_PER_EVENT_MAX};
use oneid_protocol::num::DAY_MS;
use oneid_protocol::predicate::Value;
use oneid_protocol::rules::RulesDoc;
use rust_decimal::Decimal;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use store::{Layered, MemState};

/// 2026-01-01T00:00:00Z: the shard clock at the start of every scenario.
pub(super) const T0: i64 = 1_767_225_600_000;

/// Points: 1.5 per unit, gold ×2, douyin ×1.2. Four tiers. One rule tag.
pub(super) const RULES: &str = r#"{
    "points": {"per_currency_unit": "1.5", "tier_multipliers": {"gold": "2"},
               "channel_multipliers": {"douyin": "1.2"}},
    "tiers": {"levels": [{"name": "member", "min_spend": 0}, {"name": "silver", "min_spend": "500"},
                         {"name": "gold", "min_spend": "1000"}, {"name": "platinum", "min_spend": "5000"}]},
    "tag_rules": [{"tag": "big_spender", "when": "spend_365d >= 1000"},
                  {"tag": "big_vip", "when": "has_tag(\"big_spender\") and has_tag(\"vip\")"}]
}"#;

/// Default rules: one point per unit, one tier, no tag rules.
pub(super) const PLAIN: &str = "{}";

/// `days` after T0.
pub(super) fn at(days: i64) -> Millis {
    Millis(T0 + days * DAY_MS)
}

/// `days` after T0, as an RFC 3339 string for an event.
pub(super) fn ts(days: i64) -> String {
    at(days).to_string()
}

/// The rules of `json` with `"retention": retention` in them.
pub(super) fn rules_retaining(json: &str, retention: Json) -> Rules {
    let mut doc: Json = serde_json::from_str(json).expect("rules document parses");
    doc["retention"] = retention;
    rules(&doc.to_string())
}

pub(super) fn rules(json: &str) -> Rules {
    serde_json::from_str::<RulesDoc>(json)
        .expect("rules document parses")
        .validate()
        .expect("rules validate")
}

pub(super) fn id(seq: u64) -> OneId {
    OneId::mint(ShardId(0), seq)
}

pub(super) fn identity(kind: &str, value: &str) -> Identity {
    Identity {
        kind: kind.into(),
        value: value.into(),
    }
}

/// Parses an event as the API would; the receive time only matters when it has no `ts`.
pub(super) fn event(json: &Json) -> Event {
    let raw = serde_json::value::to_raw_value(json).expect("json encodes");
    Event::parse(&raw, Some(Millis(T0))).unwrap_or_else(|e| panic!("bad test event {json}: {e:?}"))
}

pub(super) fn routed(json: Json, target: Target) -> Routed {
    Routed {
        event: event(&json),
        target,
        rules_version: 0,
        link_elsewhere: vec![],
        found: vec![],
    }
}

pub(super) fn not_linked(kind: &str, value: &str, reason: NotLinkedReason) -> NotLinked {
    NotLinked {
        kind: kind.into(),
        value: value.into(),
        reason,
    }
}

/// An event as releases before the identity policy routed it (nothing known bound).
pub(super) fn legacy(routed: Routed) -> LegacyRouted {
    LegacyRouted {
        event: routed.event,
        target: routed.target,
        link_elsewhere: routed.link_elsewhere,
        bound: vec![],
    }
}

/// An event naming its profile by identities.
pub(super) fn claim(json: Json) -> Routed {
    routed(json, Target::Claim)
}

/// An event naming its profile by OneID.
pub(super) fn on(oneid: OneId, mut json: Json) -> Routed {
    json["oneid"] = json!(oneid.to_string());
    routed(json, Target::Existing(oneid))
}

pub(super) fn clock(days: i64) -> Command {
    clock_at(at(days))
}

/// A clock entry whose target is `target`.
pub(super) fn clock_at(target: Millis) -> Command {
    Command::Clock { target }
}

/// The digest recomputed from scratch: what the incremental one must always equal.
pub(super) fn digest_of(mem: &MemState) -> u64 {
    mem.0
        .iter()
        .filter(|(k, _)| k.as_slice() != keys::META)
        .fold(0u64, |d, (k, v)| d.wrapping_add(pair_hash(k, v)))
}

/// Every key of the state except the meta record (which moves with each applied index).
pub(super) fn without_meta(mem: &MemState) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut map = mem.0.clone();
    map.remove(keys::META);
    map
}

/// Every key of the state except the meta and the shard record (which clock entries move).
pub(super) fn without_bookkeeping(mem: &MemState) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut map = without_meta(mem);
    map.remove(keys::SHARD);
    map
}

/// Before a clock entry whose target is more than [`CLOCK_STEP_MAX_MS`] ahead of the shard's
/// clock: moves the clock to one step short of the target, as the entries that would have
/// caught it up step by step would (see [`Harness::apply`]).
pub(super) fn catch_up(state: &mut ShardState, command: &Command) {
    if let Command::Clock { target, .. } = command {
        let clock = &mut state.record.clock;
        if clock.0 != 0 && target.0 - clock.0 > CLOCK_STEP_MAX_MS {
            clock.0 = target.0 - CLOCK_STEP_MAX_MS;
        }
    }
}

pub(super) struct Harness {
    pub(super) mem: MemState,
    pub(super) state: ShardState,
    pub(super) index: u64,
}

impl Harness {
    /// A fresh single-shard state with `rules` and the clock at T0.
    pub(super) fn new(rules_json: &str) -> Harness {
        let mut h = Harness::empty(1000);
        h.apply(Command::SetRules(Box::new(rules(rules_json))));
        h.apply(clock(0));
        h
    }

    pub(super) fn empty(activation_budget: usize) -> Harness {
        let mem = MemState::default();
        let state = ShardState::load(ShardId(0), 1, &mem, activation_budget);
        Harness {
            mem,
            state,
            index: 0,
        }
    }

    /// Applies one command at the next index, in its own write set, and commits it. A clock
    /// entry whose target is more than [`CLOCK_STEP_MAX_MS`] ahead of the shard's clock first
    /// moves the clock to one step short of the target: it stands for the entries that would
    /// have caught the clock up (scenarios span days and years; [`Harness::apply_exact`]
    /// applies the command as it is).
    pub(super) fn apply(&mut self, command: Command) -> Output {
        catch_up(&mut self.state, &command);
        self.apply_exact(command)
    }

    /// Applies one command at the next index, in its own write set, and commits it.
    pub(super) fn apply_exact(&mut self, command: Command) -> Output {
        self.index += 1;
        let mut writes = WriteSet::default();
        let output = self
            .state
            .apply(&self.mem, &mut writes, self.index, 1, command);
        self.mem.commit(writes);
        assert_eq!(self.meta(), self.state.meta, "meta is written through");
        assert_eq!(
            self.record(),
            self.state.record,
            "the shard record is written through"
        );
        assert_eq!(self.state.meta.applied_index, self.index);
        assert_eq!(
            self.state.meta.digest,
            digest_of(&self.mem),
            "incremental digest == digest recomputed from the state"
        );
        output
    }

    /// Applies a batch of events, routed by the rules in force; returns their outcomes.
    pub(super) fn events(&mut self, mut events: Vec<Routed>) -> Vec<EventOutcome> {
        for routed in &mut events {
            routed.rules_version = self.state.rules_version();
        }
        match self.apply(Command::Events(events)) {
            Output::Events { outcomes, .. } => outcomes,
            other => panic!("events answered {other:?}"),
        }
    }

    /// Applies one event.
    pub(super) fn send(&mut self, routed: Routed) -> EventOutcome {
        let mut outcomes = self.events(vec![routed]);
        assert_eq!(outcomes.len(), 1);
        outcomes.remove(0)
    }

    /// Sends an event that must apply; returns its profile.
    pub(super) fn ok(&mut self, routed: Routed) -> OneId {
        match self.send(routed) {
            EventOutcome::Applied(oneid, not_linked) if not_linked.is_empty() => oneid,
            other => panic!("expected Applied, got {other:?}"),
        }
    }

    /// Sends an event that must be rejected; checks that nothing but the meta's applied
    /// index moved (state, digest, cached profiles), and returns the error code.
    pub(super) fn rejected(&mut self, routed: Routed) -> ErrorCode {
        let before = without_meta(&self.mem);
        let meta = self.state.meta.clone();
        let record = self.state.record.clone();
        let cached = match routed.target {
            Target::Existing(oneid) => self.try_profile(oneid),
            Target::Claim => None,
        };
        let target = routed.target;
        let code = match self.send(routed) {
            EventOutcome::Rejected(error) => error.code,
            other => panic!("expected Rejected, got {other:?}"),
        };
        assert_eq!(
            without_meta(&self.mem),
            before,
            "a rejection changes no key"
        );
        assert_eq!(
            self.state.meta,
            ShardMeta {
                applied_index: self.index,
                ..meta
            },
            "a rejection moves only the applied index"
        );
        assert_eq!(self.state.record, record, "a rejection changes no sequence");
        if let Target::Existing(oneid) = target {
            assert_eq!(self.try_profile(oneid), cached, "cached profile unchanged");
        }
        code
    }

    pub(super) fn meta(&self) -> ShardMeta {
        decode(keys::META, &self.mem.get(keys::META).expect("meta stored"))
    }

    /// The stored shard record (the default until an entry first changes it).
    pub(super) fn record(&self) -> ShardRecord {
        self.mem
            .get(keys::SHARD)
            .map_or_else(ShardRecord::default, |b| decode(keys::SHARD, &b))
    }

    pub(super) fn try_profile(&mut self, oneid: OneId) -> Option<Profile> {
        let read = self.state.read_profile(
            &Layered {
                base: &self.mem,
                writes: &WriteSet::default(),
            },
            oneid,
        );
        let stored: Option<Profile> = self
            .mem
            .get(&keys::profile(oneid))
            .map(|b| decode(b"p", &b));
        assert_eq!(read, stored, "the activation equals the stored profile");
        read
    }

    pub(super) fn profile(&mut self, oneid: OneId) -> Profile {
        self.try_profile(oneid)
            .unwrap_or_else(|| panic!("no profile {oneid}"))
    }

    pub(super) fn order(&self, oneid: OneId, order_id: &str) -> OrderRecord {
        let key = keys::order(oneid, order_id);
        decode(&key, &self.mem.get(&key).expect("order stored"))
    }

    pub(super) fn ledger(&self, oneid: OneId) -> Vec<LedgerRecord> {
        self.mem
            .scan(&keys::ledger_prefix(oneid), None, false, usize::MAX)
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect()
    }

    pub(super) fn bound(&self, identity: &Identity) -> Option<OneId> {
        let key = keys::identity(identity);
        self.mem.get(&key).map(|b| decode(&key, &b))
    }

    pub(super) fn keys_with_prefix(&self, prefix: &[u8]) -> usize {
        self.mem.scan(prefix, None, false, usize::MAX).len()
    }
}

pub(super) fn ledger(
    event_id: &str,
    kind: LedgerKind,
    points: i64,
    balance_after: i64,
    days: i64,
    reason: Option<&str>,
    shortfall: i64,
) -> LedgerRecord {
    LedgerRecord {
        event_id: event_id.into(),
        kind,
        points,
        balance_after,
        at: at(days),
        reason: reason.map(str::to_string),
        shortfall,
        peer: None,
        expires_at: None,
    }
}

/// A lot of one earn, as [`lots`] shows it (without its sequence).
pub(super) fn lot(points: i64, expires_days: i64, event_id: &str) -> Lot {
    Lot {
        expires_at: at(expires_days),
        points,
        event_id: event_id.into(),
        seq: 0,
        earns: 1,
    }
}

/// A profile's lots without their sequences (which `lot` cannot know).
pub(super) fn lots(profile: &Profile) -> Vec<Lot> {
    profile
        .lots
        .iter()
        .map(|lot| Lot {
            seq: 0,
            ..lot.clone()
        })
        .collect()
}

/// A profile with one phone and one order of `amount` (order id "T1", event "o1") at day 0.
pub(super) fn with_order(h: &mut Harness, amount: &str) -> OneId {
    h.ok(claim(
        json!({"event_id": "o1", "type": "order", "identities": {"phone": "138"},
        "order_id": "T1", "amount": amount, "ts": ts(0)}),
    ))
}

// ---- 1. Orders: points, metrics, tiers ----

#[test]
fn order_points_are_exact_with_the_tier_before_the_order() {
    let mut h = Harness::new(RULES);
    // member has no multiplier (×1): 199.99 × 1.5 × 1.2 = 359.982 → 359.
    let p = h.ok(claim(
        json!({"event_id": "o1", "type": "order", "identities": {"phone": "138"},
        "order_id": "T1", "amount": "199.99", "channel": "douyin", "ts": ts(1)}),
    ));
    assert_eq!(p, id(1));
    assert_eq!(h.profile(p).balance, 359);
    // Still member before this order, tmall has no multiplier: 1000 × 1.5 = 1500.
    // Spend 1199.99 jumps member → gold (past silver) at once.
    h.apply(clock(4));
    h.ok(on(
        p,
        json!({"event_id": "o2", "type": "order", "order_id": "T2",
        "amount": "1000.00", "channel": "tmall", "ts": ts(5)}),
    ));
    // Gold now: 10.01 × 1.5 × 2 × 1.2 = 36.036 → 36. Its ts is before the previous order.
    h.ok(on(
        p,
        json!({"event_id": "o3", "type": "order", "order_id": "T3",
        "amount": "10.01", "channel": "douyin", "ts": ts(3)}),
    ));

    let profile = h.profile(p);
    assert_eq!(profile.balance, 359 + 1500 + 36);
    assert_eq!(profile.lifetime_earned, 1895);
    assert_eq!(profile.order_count, 3);
    assert_eq!(profile.total_spend, Money(121_000));
    assert_eq!(profile.spend_365d, Money(121_000));
    assert_eq!(profile.first_order_at, Some(at(1)));
    assert_eq!(profile.last_order_at, Some(at(5)));
    assert_eq!(profile.tier, "gold");
    assert_eq!(profile.tier_since, at(5));
    assert_eq!(
        profile.channels,
        BTreeMap::from([("douyin".into(), at(3)), ("tmall".into(), at(5))])
    );
    assert_eq!(
        lots(&profile),
        vec![
            lot(359, 366, "o1"),
            lot(36, 368, "o3"),
            lot(1500, 370, "o2")
        ]
    );
    assert_eq!((profile.version, profile.ledger_seq), (3, 3));
    assert_eq!((profile.created_at, profile.updated_at), (at(1), at(5)));
    assert_eq!(
        h.ledger(p),
        vec![
            ledger("o1", LedgerKind::Earn, 359, 359, 1, Some("order T1"), 0),
            ledger("o2", LedgerKind::Earn, 1500, 1859, 5, Some("order T2"), 0),
            ledger("o3", LedgerKind::Earn, 36, 1895, 3, Some("order T3"), 0),
        ]
    );
    assert_eq!(
        h.order(p, "T3"),
        OrderRecord {
            event_id: "o3".into(),
            ts: at(3),
            amount: Money(1001),
            refunded: Money::ZERO,
            points: 36,
            reversed: 0,
            in_window: true,
        }
    );
}

#[test]
fn one_order_can_jump_every_tier_and_sets_tier_since_to_its_ts() {
    let mut h = Harness::new(RULES);
    let p = h.ok(claim(
        json!({"event_id": "o1", "type": "order", "identities": {"phone": "1"},
        "order_id": "A", "amount": "499.99", "ts": ts(0)}),
    ));
    assert_eq!(
        (h.profile(p).tier.as_str(), h.profile(p).tier_since),
        ("member", at(0))
    );
    h.apply(clock(1));
    h.ok(on(
        p,
        json!({"event_id": "o2", "type": "order", "order_id": "B",
        "amount": "4500.01", "ts": ts(2)}),
    ));
    let profile = h.profile(p);
    assert_eq!(profile.tier, "platinum");
    assert_eq!(profile.tier_since, at(2));
    // 499.99 × 1.5 = 749.985 → 749; 4500.01 × 1.5 (member before) = 6750.015 → 6750.
    assert_eq!(profile.balance, 749 + 6750);
}

#[test]
fn order_older_than_the_window_counts_in_total_spend_only() {
    let mut h = Harness::new(RULES);
    let p = h.ok(claim(
        json!({"event_id": "o1", "type": "order", "identities": {"phone": "1"},
        "order_id": "OLD", "amount": "2000", "ts": ts(-400)}),
    ));
    let profile = h.profile(p);
    assert_eq!(profile.total_spend, Money(200_000));
    assert_eq!(profile.spend_365d, Money::ZERO);
    assert_eq!(profile.tier, "member");
    assert!(!h.order(p, "OLD").in_window);
    // Its refund leaves spend_365d alone.
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "OLD", "amount": "500"}),
    ));
    let profile = h.profile(p);
    assert_eq!(
        (profile.total_spend, profile.spend_365d),
        (Money(150_000), Money::ZERO)
    );
}

#[test]
fn order_points_are_capped_and_zero_rate_earns_nothing() {
    // 1000000000000 × 1000 × 1000 × 1000: the mantissa product overflows u128; capped.
    let mut h = Harness::new(
        r#"{"points": {"per_currency_unit": "1000.000000", "tier_multipliers": {"member": "1000.000000"},
            "channel_multipliers": {"web": "1000.000000"}}}"#,
    );
    let p = h.ok(claim(
        json!({"event_id": "o1", "type": "order", "identities": {"phone": "1"},
        "order_id": "MAX", "amount": "1000000000000", "channel": "web"}),
    ));
    assert_eq!(h.profile(p).balance, POINTS_PER_EVENT_MAX);
    // A zero rate earns no points and writes no ledger record, but the order counts.
    let mut h = Harness::new(r#"{"points": {"per_currency_unit": 0}}"#);
    let p = with_order(&mut h, "50");
    assert_eq!((h.order(p, "T1").points, h.ledger(p).len()), (0, 0));
    assert_eq!(h.profile(p).order_count, 1);
}

// ---- 2. Exactly once ----

#[test]
fn duplicate_event_id_changes_nothing() {
    let mut h = Harness::new(RULES);
    let p = with_order(&mut h, "100");
    let before = without_meta(&h.mem);
    let digest = h.state.meta.digest;
    let profile = h.profile(p);
    // Same event_id, even with another body: the first one counted.
    for body in [
        json!({"event_id": "o1", "type": "order", "identities": {"phone": "138"},
            "order_id": "T1", "amount": "100", "ts": ts(0)}),
        json!({"event_id": "o1", "type": "points_earn", "identities": {"phone": "138"}, "points": 5}),
    ] {
        assert_eq!(h.send(claim(body)), EventOutcome::Duplicate(p));
    }
    assert_eq!(
        h.send(on(
            p,
            json!({"event_id": "o1", "type": "tag_add", "tag": "x"})
        )),
        EventOutcome::Duplicate(p)
    );
    assert_eq!(without_meta(&h.mem), before);
    assert_eq!(h.state.meta.digest, digest);
    assert_eq!(h.profile(p), profile);
}

#[test]
fn duplicate_within_one_batch_counts_once() {
    let mut h = Harness::new(PLAIN);
    let earn = || {
        claim(
            json!({"event_id": "e1", "type": "points_earn", "identities": {"phone": "9"},
        "points": 10}),
        )
    };
    assert_eq!(
        h.events(vec![earn(), earn()]),
        vec![
            EventOutcome::Applied(id(1), vec![]),
            EventOutcome::Duplicate(id(1))
        ]
    );
    assert_eq!(h.profile(id(1)).balance, 10);
}

// ---- 3. Rejections change nothing ----

#[test]
fn duplicate_order_is_rejected() {
    let mut h = Harness::new(RULES);
    let p = with_order(&mut h, "100");
    let code = h.rejected(on(
        p,
        json!({"event_id": "o2", "type": "order", "order_id": "T1",
        "amount": "5"}),
    ));
    assert_eq!(code, ErrorCode::DuplicateOrder);
}

#[test]
fn refund_of_unknown_order_is_rejected() {
    let mut h = Harness::new(RULES);
    let p = with_order(&mut h, "100");
    let code = h.rejected(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T2"}),
    ));
    assert_eq!(code, ErrorCode::UnknownOrder);
}

#[test]
fn refund_beyond_the_order_is_rejected() {
    let mut h = Harness::new(RULES);
    let p = with_order(&mut h, "100");
    let code = h.rejected(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1",
        "amount": "100.01"}),
    ));
    assert_eq!(code, ErrorCode::RefundExceedsOrder);
    h.ok(on(
        p,
        json!({"event_id": "r2", "type": "refund", "order_id": "T1", "amount": "60"}),
    ));
    let code = h.rejected(on(
        p,
        json!({"event_id": "r3", "type": "refund", "order_id": "T1",
        "amount": "40.01"}),
    ));
    assert_eq!(code, ErrorCode::RefundExceedsOrder);
    h.ok(on(
        p,
        json!({"event_id": "r4", "type": "refund", "order_id": "T1"}),
    ));
    // Nothing left: even a refund of "the rest" is refused.
    let code = h.rejected(on(
        p,
        json!({"event_id": "r5", "type": "refund", "order_id": "T1"}),
    ));
    assert_eq!(code, ErrorCode::RefundExceedsOrder);
}

#[test]
fn redeem_beyond_the_balance_is_rejected() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(json!({"event_id": "e1", "type": "points_earn",
        "identities": {"phone": "1"}, "points": 10})));
    let code = h.rejected(on(
        p,
        json!({"event_id": "e2", "type": "points_redeem", "points": 11}),
    ));
    assert_eq!(code, ErrorCode::InsufficientPoints);
    h.ok(on(
        p,
        json!({"event_id": "e3", "type": "points_redeem", "points": 10}),
    ));
    assert_eq!(h.profile(p).balance, 0);
}

/// The router merges profiles an event names; an event that reaches apply naming two (bound
/// since its router resolved it) is refused `unavailable`, and changes nothing: sent again, it
/// is resolved anew and merges them.
#[test]
fn identities_of_two_profiles_at_apply_are_sent_back() {
    let mut h = Harness::new(PLAIN);
    let a = h.ok(claim(
        json!({"event_id": "a", "type": "identify", "identities": {"phone": "1"}}),
    ));
    let b = h.ok(claim(
        json!({"event_id": "b", "type": "identify", "identities": {"email": "x"}}),
    ));
    assert_eq!((a, b), (id(1), id(2)));
    let code = h.rejected(claim(json!({"event_id": "c", "type": "points_earn",
        "identities": {"phone": "1", "email": "x"}, "points": 5})));
    assert_eq!(code, ErrorCode::Unavailable);
    // The same through a OneID and an identity of the other profile.
    let code = h.rejected(on(
        a,
        json!({"event_id": "d", "type": "identify",
        "identities": {"email": "x"}}),
    ));
    assert_eq!(code, ErrorCode::Unavailable);
}

#[test]
fn a_retry_naming_two_profiles_is_a_duplicate_of_the_one_it_applied_to() {
    let mut h = Harness::new(PLAIN);
    let a = h.ok(claim(
        json!({"event_id": "a", "type": "points_earn", "identities": {"phone": "1"}, "points": 5}),
    ));
    h.ok(claim(
        json!({"event_id": "b", "type": "identify", "identities": {"email": "x"}}),
    ));
    let before = without_meta(&h.mem);
    // "a" again, now also naming the email another profile took meanwhile.
    let retry = claim(json!({"event_id": "a", "type": "points_earn",
        "identities": {"phone": "1", "email": "x"}, "points": 5}));
    assert_eq!(h.send(retry), EventOutcome::Duplicate(a));
    assert_eq!(without_meta(&h.mem), before, "a duplicate changes nothing");
}

#[test]
fn identities_the_router_found_bound_are_not_read_again() {
    let mut h = Harness::new(PLAIN);
    let a = h.ok(claim(
        json!({"event_id": "a", "type": "identify", "identities": {"phone": "1"}}),
    ));
    // The router found the phone bound to `a` and the email unbound: apply binds the email
    // (and checks the phone against the index in debug builds).
    let mut routed = on(
        a,
        json!({"event_id": "b", "type": "identify",
        "identities": {"phone": "1", "email": "x"}}),
    );
    routed.found = routed
        .event
        .identities
        .iter()
        .map(|identity| match identity.kind.as_str() {
            "phone" => Found::Bound { oneid: a, epoch: 0 },
            _ => Found::Unbound,
        })
        .collect();
    assert_eq!(h.send(routed), EventOutcome::Applied(a, vec![]));
    assert_eq!(
        h.profile(a).identities,
        BTreeMap::from([
            ("email".to_string(), BTreeSet::from(["x".to_string()])),
            ("phone".to_string(), BTreeSet::from(["1".to_string()])),
        ])
    );
    let b = h.ok(claim(
        json!({"event_id": "c", "type": "identify", "identities": {"email": "x"}}),
    ));
    assert_eq!(b, a);
}

#[test]
fn event_for_a_missing_oneid_is_not_found() {
    let mut h = Harness::new(PLAIN);
    let code = h.rejected(on(
        id(99),
        json!({"event_id": "e", "type": "tag_add", "tag": "vip"}),
    ));
    assert_eq!(code, ErrorCode::NotFound);
    // With a new identity too: nothing is bound, no profile is minted.
    let code = h.rejected(on(
        id(99),
        json!({"event_id": "e", "type": "identify",
        "identities": {"phone": "1"}}),
    ));
    assert_eq!(code, ErrorCode::NotFound);
    assert_eq!(h.state.record.profile_seq, 0);
}

#[test]
fn a_fifty_first_identity_value_is_not_linked() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e0", "type": "identify", "identities": {"phone": "1"}}),
    ));
    let kinds = |range: std::ops::Range<usize>| -> Json {
        range.map(|i| (format!("k{i:02}"), json!("v"))).collect()
    };
    // 1 + 49 = 50: the most a profile holds.
    h.ok(on(
        p,
        json!({"event_id": "e1", "type": "identify", "identities": kinds(0..49)}),
    ));
    assert_eq!(h.profile(p).identity_count(), 50);
    // The event applies (its points too), without the value past the limit.
    let outcome = h.send(on(
        p,
        json!({"event_id": "e2", "type": "points_earn", "points": 5,
        "identities": kinds(49..50)}),
    ));
    assert_eq!(
        outcome,
        EventOutcome::Applied(
            p,
            vec![not_linked("k49", "v", NotLinkedReason::IdentityLimit)]
        )
    );
    assert_eq!(h.bound(&identity("k49", "v")), None);
    assert_eq!(
        (h.profile(p).identity_count(), h.profile(p).balance),
        (50, 5)
    );
}

#[test]
fn one_hundred_and_one_attributes_are_rejected() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e0", "type": "identify", "identities": {"phone": "1"}}),
    ));
    let hundred: Json = (0..100).map(|i| (format!("a{i:03}"), json!(i))).collect();
    h.ok(on(
        p,
        json!({"event_id": "e1", "type": "profile_update", "attributes": hundred}),
    ));
    assert_eq!(h.profile(p).attributes.len(), 100);
    let code = h.rejected(on(
        p,
        json!({"event_id": "e2", "type": "profile_update",
        "attributes": {"a100": 1}}),
    ));
    assert_eq!(code, ErrorCode::AttributeLimit);
    // Replacing one at the limit, or removing one and adding another, is fine.
    h.ok(on(
        p,
        json!({"event_id": "e3", "type": "profile_update",
        "attributes": {"a000": "x", "a001": null, "a100": 1}}),
    ));
    assert_eq!(h.profile(p).attributes.len(), 100);
}

#[test]
fn two_hundred_and_one_manual_tags_are_rejected() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e0", "type": "identify", "identities": {"phone": "1"}}),
    ));
    let adds = (0..200)
        .map(|i| on(p, json!({"event_id": format!("t{i}"), "type": "tag_add", "tag": format!("tag{i:03}")})))
        .collect();
    assert!(h
        .events(adds)
        .iter()
        .all(|o| *o == EventOutcome::Applied(p, vec![])));
    assert_eq!(h.profile(p).manual_tags.len(), 200);
    let code = h.rejected(on(
        p,
        json!({"event_id": "t200", "type": "tag_add", "tag": "one_more"}),
    ));
    assert_eq!(code, ErrorCode::TagLimit);
    // Adding a tag it already has is fine at the limit.
    h.ok(on(
        p,
        json!({"event_id": "t201", "type": "tag_add", "tag": "tag000"}),
    ));
}

#[test]
fn earn_expiring_at_or_before_the_clock_is_rejected() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e0", "type": "identify", "identities": {"phone": "1"}}),
    ));
    for (event_id, expires) in [("e1", ts(0)), ("e2", ts(-1))] {
        let code = h.rejected(on(
            p,
            json!({"event_id": event_id, "type": "points_earn",
            "points": 5, "expires_at": expires}),
        ));
        assert_eq!(code, ErrorCode::AlreadyExpired);
    }
    // Default expiry is ts + 365 days: an event 365 days old has already expired.
    let code = h.rejected(on(
        p,
        json!({"event_id": "e3", "type": "points_earn", "points": 5,
        "ts": ts(-365)}),
    ));
    assert_eq!(code, ErrorCode::AlreadyExpired);
    let code = h.rejected(on(
        p,
        json!({"event_id": "e4", "type": "tag_add", "tag": "x",
        "expires_at": ts(0)}),
    ));
    assert_eq!(code, ErrorCode::AlreadyExpired);
    let ok_at = Millis(T0 + 1).to_string();
    h.ok(on(
        p,
        json!({"event_id": "e5", "type": "points_earn", "points": 5,
        "expires_at": ok_at}),
    ));
    assert_eq!(
        lots(&h.profile(p)),
        vec![Lot {
            expires_at: Millis(T0 + 1),
            ..lot(5, 0, "e5")
        }]
    );
}

#[test]
fn rejected_claim_mints_nothing() {
    let mut h = Harness::new(PLAIN);
    let code = h.rejected(claim(json!({"event_id": "e1", "type": "points_redeem",
        "identities": {"phone": "1"}, "points": 1})));
    assert_eq!(code, ErrorCode::InsufficientPoints);
    assert_eq!(h.bound(&identity("phone", "1")), None);
    // The next new profile still gets sequence 1.
    let p = h.ok(claim(
        json!({"event_id": "e2", "type": "identify", "identities": {"phone": "1"}}),
    ));
    assert_eq!(p, id(1));
}

// ---- 4. Refunds ----

#[test]
fn full_refund_reverses_all_order_points() {
    let mut h = Harness::new(PLAIN);
    let p = with_order(&mut h, "100.00");
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1", "ts": ts(1)}),
    ));
    let profile = h.profile(p);
    assert_eq!((profile.balance, profile.lots.clone()), (0, vec![]));
    assert_eq!((profile.order_count, profile.lifetime_earned), (1, 100));
    assert_eq!(
        (profile.total_spend, profile.spend_365d),
        (Money::ZERO, Money::ZERO)
    );
    assert_eq!(
        h.ledger(p)[1],
        ledger(
            "r1",
            LedgerKind::Reverse,
            -100,
            0,
            1,
            Some("refund of order T1"),
            0
        )
    );
    let order = h.order(p, "T1");
    assert_eq!((order.refunded, order.reversed), (Money(10_000), 100));
}

#[test]
fn partial_refunds_reverse_pro_rata_on_the_cumulative_amount() {
    let mut h = Harness::new(PLAIN);
    let p = with_order(&mut h, "100.00");
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1", "amount": "33.33",
        "ts": ts(1)}),
    ));
    let order = h.order(p, "T1");
    assert_eq!((order.refunded, order.reversed), (Money(3333), 33));
    assert_eq!(h.profile(p).balance, 67);
    h.apply(clock(1));
    h.ok(on(
        p,
        json!({"event_id": "r2", "type": "refund", "order_id": "T1", "amount": "66.67",
        "ts": ts(2)}),
    ));
    let order = h.order(p, "T1");
    assert_eq!((order.refunded, order.reversed), (Money(10_000), 100));
    let ledger_points: Vec<i64> = h.ledger(p).iter().map(|r| r.points).collect();
    assert_eq!(ledger_points, [100, -33, -67]);
    let profile = h.profile(p);
    assert_eq!(
        (
            profile.balance,
            profile.order_count,
            profile.lifetime_earned
        ),
        (0, 1, 100)
    );
    assert_eq!(
        (profile.total_spend, profile.spend_365d),
        (Money::ZERO, Money::ZERO)
    );
}

#[test]
fn refund_without_amount_refunds_the_rest() {
    let mut h = Harness::new(PLAIN);
    let p = with_order(&mut h, "99.99");
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1", "amount": "0.01"}),
    ));
    // floor(99 × 1 / 9999) = 0: nothing reversed yet, no ledger record.
    assert_eq!(h.ledger(p).len(), 1);
    h.ok(on(
        p,
        json!({"event_id": "r2", "type": "refund", "order_id": "T1"}),
    ));
    let order = h.order(p, "T1");
    assert_eq!((order.refunded, order.reversed), (Money(9999), 99));
    let profile = h.profile(p);
    assert_eq!((profile.balance, profile.total_spend), (0, Money::ZERO));
}

#[test]
fn refund_after_redeem_records_the_shortfall() {
    let mut h = Harness::new(PLAIN);
    let p = with_order(&mut h, "100");
    h.ok(on(
        p,
        json!({"event_id": "x1", "type": "points_redeem", "points": 80, "ts": ts(1)}),
    ));
    h.apply(clock(1));
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1", "ts": ts(2)}),
    ));
    let profile = h.profile(p);
    assert_eq!(
        (profile.balance, profile.debt, profile.lots.len()),
        (0, 0, 0)
    );
    assert_eq!(
        (profile.lifetime_earned, profile.lifetime_redeemed),
        (100, 80)
    );
    assert_eq!(
        h.ledger(p),
        vec![
            ledger("o1", LedgerKind::Earn, 100, 100, 0, Some("order T1"), 0),
            ledger("x1", LedgerKind::Redeem, -80, 20, 1, None, 0),
            ledger(
                "r1",
                LedgerKind::Reverse,
                -20,
                0,
                2,
                Some("refund of order T1; 80 points already spent"),
                80
            ),
        ]
    );
    assert_eq!(h.order(p, "T1").reversed, 100);
}

#[test]
fn refund_takes_back_from_the_orders_own_lot_first() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(json!({"event_id": "e1", "type": "points_earn",
        "identities": {"phone": "138"}, "points": 50, "expires_at": ts(10)})));
    h.ok(on(
        p,
        json!({"event_id": "o1", "type": "order", "order_id": "T1", "amount": "100",
        "ts": ts(0)}),
    ));
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1", "amount": "50"}),
    ));
    // The earn expiring sooner is kept; the order's own lot gave back 50.
    assert_eq!(
        lots(&h.profile(p)),
        vec![lot(50, 10, "e1"), lot(50, 365, "o1")]
    );
}

// ---- 5. Lots, redeem, debt ----

#[test]
fn redeem_takes_from_the_lot_expiring_first() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(json!({"event_id": "a", "type": "points_earn",
        "identities": {"phone": "1"}, "points": 100, "expires_at": ts(100)})));
    h.ok(on(
        p,
        json!({"event_id": "b", "type": "points_earn", "points": 50,
        "expires_at": ts(10)}),
    ));
    assert_eq!(
        lots(&h.profile(p)),
        vec![lot(50, 10, "b"), lot(100, 100, "a")]
    );
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "points_redeem", "points": 30}),
    ));
    assert_eq!(
        lots(&h.profile(p)),
        vec![lot(20, 10, "b"), lot(100, 100, "a")]
    );
    h.ok(on(
        p,
        json!({"event_id": "r2", "type": "points_redeem", "points": 40}),
    ));
    let profile = h.profile(p);
    assert_eq!(lots(&profile), vec![lot(80, 100, "a")]);
    assert_eq!(
        (
            profile.balance,
            profile.lifetime_earned,
            profile.lifetime_redeemed
        ),
        (80, 150, 70)
    );
}

#[test]
fn negative_adjust_beyond_the_balance_is_debt_paid_by_the_next_earn() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(json!({"event_id": "e1", "type": "points_earn",
        "identities": {"phone": "1"}, "points": 30, "ts": ts(0)})));
    h.ok(on(
        p,
        json!({"event_id": "a1", "type": "points_adjust", "points": -50,
        "reason": "fraud", "ts": ts(1)}),
    ));
    let profile = h.profile(p);
    assert_eq!(
        (profile.balance, profile.debt, profile.lots.len()),
        (-20, 20, 0)
    );
    assert_eq!(
        h.ledger(p)[1],
        ledger("a1", LedgerKind::Adjust, -50, -20, 1, Some("fraud"), 0)
    );
    let code = h.rejected(on(
        p,
        json!({"event_id": "x", "type": "points_redeem", "points": 1}),
    ));
    assert_eq!(code, ErrorCode::InsufficientPoints);
    h.apply(clock(1));
    h.ok(on(
        p,
        json!({"event_id": "e2", "type": "points_earn", "points": 50, "ts": ts(2)}),
    ));
    let profile = h.profile(p);
    assert_eq!((profile.balance, profile.debt), (30, 0));
    assert_eq!(lots(&profile), vec![lot(30, 367, "e2")]);
    assert_eq!(profile.lifetime_earned, 80);
}

#[test]
fn refund_while_in_debt_takes_nothing_and_records_the_shortfall() {
    let mut h = Harness::new(PLAIN);
    let p = with_order(&mut h, "100");
    h.ok(on(
        p,
        json!({"event_id": "a1", "type": "points_adjust", "points": -150,
        "reason": "x"}),
    ));
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1"}),
    ));
    let profile = h.profile(p);
    assert_eq!((profile.balance, profile.debt), (-50, 50));
    let reverse = h.ledger(p).pop().unwrap();
    assert_eq!(
        (reverse.points, reverse.shortfall, reverse.balance_after),
        (0, 100, -50)
    );
}

// ---- 6. Tags ----

#[test]
fn manual_tags_add_and_remove() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e1", "type": "tag_add", "identities": {"phone": "1"},
        "tag": "vip", "expires_at": ts(30)}),
    ));
    h.ok(on(
        p,
        json!({"event_id": "e2", "type": "tag_add", "tag": "new"}),
    ));
    h.ok(on(
        p,
        json!({"event_id": "e3", "type": "tag_remove", "tag": "new"}),
    ));
    // Removing a tag it does not have is not an error.
    h.ok(on(
        p,
        json!({"event_id": "e4", "type": "tag_remove", "tag": "never"}),
    ));
    let profile = h.profile(p);
    assert_eq!(
        profile.manual_tags,
        BTreeMap::from([("vip".into(), Some(at(30)))])
    );
    assert_eq!(profile.tags(), BTreeSet::from(["vip"]));
}

#[test]
fn rule_tags_follow_every_change() {
    let mut h = Harness::new(RULES);
    let p = h.ok(claim(
        json!({"event_id": "e1", "type": "tag_add", "identities": {"phone": "1"},
        "tag": "zzz"}),
    ));
    assert_eq!(h.profile(p).tags(), BTreeSet::from(["zzz"]));
    h.ok(on(
        p,
        json!({"event_id": "o1", "type": "order", "order_id": "T1", "amount": "1000"}),
    ));
    assert_eq!(
        h.profile(p).rule_tags,
        BTreeSet::from(["big_spender".to_string()])
    );
    h.ok(on(
        p,
        json!({"event_id": "e2", "type": "tag_add", "tag": "vip"}),
    ));
    // A later rule sees the earlier rule's tag and the manual tag.
    let profile = h.profile(p);
    assert_eq!(
        profile.tags().into_iter().collect::<Vec<_>>(),
        ["big_spender", "big_vip", "vip", "zzz"]
    );
    h.ok(on(
        p,
        json!({"event_id": "r1", "type": "refund", "order_id": "T1", "amount": "0.01"}),
    ));
    let profile = h.profile(p);
    assert!(profile.rule_tags.is_empty());
    assert_eq!(profile.tags(), BTreeSet::from(["vip", "zzz"]));
    // The tier reached stays: a downgrade waits for the retention period.
    assert_eq!(profile.tier, "gold");
}

// ---- 7. Attributes ----

#[test]
fn profile_update_sets_and_removes_attributes() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(json!({"event_id": "e1", "type": "profile_update",
        "identities": {"phone": "1"}, "attributes": {"city": "Hangzhou", "age": 31, "vip": true}})));
    h.ok(on(
        p,
        json!({"event_id": "e2", "type": "profile_update",
        "attributes": {"city": null, "age": "32.50", "zip": "02139", "gone": null}}),
    ));
    assert_eq!(
        h.profile(p).attributes,
        BTreeMap::from([
            ("age".into(), Value::String("32.50".into())),
            ("vip".into(), Value::Bool(true)),
            ("zip".into(), Value::String("02139".into())),
        ])
    );
    h.ok(on(
        p,
        json!({"event_id": "e3", "type": "profile_update", "attributes": {"age": 32.50}}),
    ));
    assert_eq!(
        h.profile(p).attributes["age"],
        Value::Number(Decimal::new(325, 1))
    );
}

// ---- 8. Identities ----

#[test]
fn claims_mint_sequential_oneids_and_find_them_again() {
    let mut h = Harness::new(PLAIN);
    let phone = identity("phone", "138");
    let a = h.ok(claim(
        json!({"event_id": "e1", "type": "identify", "identities": {"phone": "138"}}),
    ));
    assert_eq!(a, id(1));
    assert_eq!(a.to_string(), "o0000000000000001");
    assert_eq!(h.bound(&phone), Some(a));
    let b = h.ok(claim(
        json!({"event_id": "e2", "type": "identify", "identities": {"email": "x"}}),
    ));
    assert_eq!(b, id(2));
    assert_eq!(
        h.ok(claim(json!({"event_id": "e3", "type": "points_earn",
            "identities": {"phone": "138"}, "points": 1}))),
        a
    );
    assert_eq!(h.state.record.profile_seq, 2);
    assert_eq!(h.profile(a).balance, 1);
}

#[test]
fn identify_with_a_oneid_links_a_new_identity() {
    let mut h = Harness::new(PLAIN);
    let a = h.ok(claim(
        json!({"event_id": "e1", "type": "identify", "identities": {"phone": "138"}}),
    ));
    h.ok(on(
        a,
        json!({"event_id": "e2", "type": "identify",
        "identities": {"phone": "138", "wechat": "w1"}}),
    ));
    assert_eq!(h.bound(&identity("wechat", "w1")), Some(a));
    let profile = h.profile(a);
    assert_eq!(
        profile.identities,
        BTreeMap::from([
            ("phone".into(), BTreeSet::from(["138".into()])),
            ("wechat".into(), BTreeSet::from(["w1".into()])),
        ])
    );
    // And the new identity now finds the profile.
    assert_eq!(
        h.ok(claim(
            json!({"event_id": "e3", "type": "identify", "identities": {"wechat": "w1"}})
        )),
        a
    );
}

#[test]
fn one_new_identity_twice_in_a_batch_makes_one_profile() {
    let mut h = Harness::new(PLAIN);
    let earn = |event_id: &str| {
        claim(json!({"event_id": event_id, "type": "points_earn",
            "identities": {"phone": "5"}, "points": 3}))
    };
    assert_eq!(
        h.events(vec![earn("e1"), earn("e2")]),
        vec![
            EventOutcome::Applied(id(1), vec![]),
            EventOutcome::Applied(id(1), vec![])
        ]
    );
    assert_eq!(
        (h.state.record.profile_seq, h.profile(id(1)).balance),
        (1, 6)
    );
}

#[test]
fn a_profile_remembers_the_64_most_recent_channels() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e", "type": "identify", "identities": {"phone": "1"}}),
    ));
    let seen = |i: i64, channel: String| {
        on(
            p,
            json!({"event_id": format!("v{i}"), "type": "interaction", "name": "view",
            "channel": channel, "ts": ts(i)}),
        )
    };
    // The shard's time is day 64: no `ts` is more than a day ahead of it.
    h.apply(clock(64));
    h.events((0..64).map(|i| seen(i, format!("c{i:02}"))).collect());
    // c00 is seen again, so c01 is the least recently seen when a 65th channel arrives.
    h.events(vec![seen(64, "c00".into()), seen(65, "new".into())]);
    let channels = h.profile(p).channels;
    assert_eq!(channels.len(), 64);
    assert_eq!((channels["c00"], channels["new"]), (at(64), at(65)));
    assert!(!channels.contains_key("c01"));
}

/// An event whose `identities` include ones the router found unbound on other shards.
pub(super) fn with_elsewhere(mut routed: Routed, elsewhere: &[Identity]) -> Routed {
    routed.link_elsewhere = elsewhere.to_vec();
    routed
}

pub(super) fn follow_up_records(h: &Harness) -> Vec<(u64, FollowUpRecord)> {
    h.mem
        .scan(keys::FOLLOW_UP_PREFIX, None, false, usize::MAX)
        .into_iter()
        .map(|(k, v)| (keys::follow_up_seq(&k), decode(&k, &v)))
        .collect()
}

#[test]
fn an_applied_event_records_its_follow_ups_in_the_same_apply() {
    let mut h = Harness::new(PLAIN);
    h.apply(clock(1));
    let (app, web) = (identity("app", "u1"), identity("web", "w1"));
    // (One shard here: the event names only the identity this shard holds, and the router's
    // list says which others it named.)
    let routed = with_elsewhere(
        claim(json!({"event_id": "e1", "type": "identify", "identities": {"phone": "1"}})),
        &[app.clone(), web.clone()],
    );
    let output = h.apply(Command::Events(vec![routed]));
    let p = id(1);
    assert_eq!(
        output,
        Output::Events {
            outcomes: vec![EventOutcome::Applied(p, vec![])],
            follow_ups: vec![
                FollowUp {
                    seq: 1,
                    oneid: p,
                    identity: app.clone(),
                    unbind: false,
                },
                FollowUp {
                    seq: 2,
                    oneid: p,
                    identity: web.clone(),
                    unbind: false,
                },
            ],
        }
    );
    let record = |identity: &Identity| FollowUpRecord {
        oneid: p,
        identity: identity.clone(),
        at: at(1),
        unbind: false,
    };
    assert_eq!(
        follow_up_records(&h),
        vec![(1, record(&app)), (2, record(&web))]
    );
    assert_eq!(
        (
            h.state.record.follow_up_seq,
            h.state.record.follow_ups_pending
        ),
        (2, 2)
    );
    // Only the identity held here is listed until the follow-ups finish.
    assert_eq!(
        h.profile(p).identities,
        BTreeMap::from([("phone".into(), BTreeSet::from(["1".into()]))])
    );
    // A duplicate of the event leaves no second follow-up.
    let again = with_elsewhere(
        claim(json!({"event_id": "e1", "type": "identify", "identities": {"phone": "1"}})),
        &[app, web],
    );
    assert_eq!(h.send(again), EventOutcome::Duplicate(p));
    assert_eq!(h.state.record.follow_ups_pending, 2);
}

#[test]
fn finishing_follow_ups_lists_the_bound_ends_the_conflicts_and_is_idempotent() {
    let mut h = Harness::new(PLAIN);
    let (app, web) = (identity("app", "u1"), identity("web", "w1"));
    let p = h.ok(with_elsewhere(
        claim(json!({"event_id": "e1", "type": "identify", "identities": {"phone": "1"}})),
        &[app, web],
    ));
    let other = OneId::mint(ShardId(0), 9);
    let answers = vec![
        FollowUpAnswer {
            seq: 1,
            outcome: BindOutcome::Bound,
        },
        FollowUpAnswer {
            seq: 2,
            outcome: BindOutcome::Conflict(other),
        },
    ];
    assert_eq!(
        h.apply(Command::FinishFollowUps(answers.clone())),
        Output::None
    );
    let profile = h.profile(p);
    assert_eq!(profile.identities["app"], BTreeSet::from(["u1".into()]));
    assert!(!profile.identities.contains_key("web"), "taken by {other}");
    assert_eq!(profile.version, 2);
    assert_eq!(follow_up_records(&h), vec![]);
    assert_eq!(h.state.record.follow_ups_pending, 0);

    // The other driver's answers for the same records change nothing.
    let before = without_meta(&h.mem);
    let digest = h.state.meta.digest;
    h.apply(Command::FinishFollowUps(answers));
    assert_eq!(without_meta(&h.mem), before);
    assert_eq!(h.state.meta.digest, digest);
    assert_eq!(h.profile(p), profile);
}

#[test]
fn events_past_the_pending_follow_ups_cap_are_unavailable() {
    let mut h = Harness::new(PLAIN);
    // As if that many binds were waiting on other shards (stored by the next entry).
    h.state.record.follow_ups_pending = FOLLOW_UPS_PENDING_MAX - 1;
    h.apply(clock(0));
    let app = |n: u32| identity("app", &format!("u{n}"));
    let event = |n: u32, elsewhere: Vec<Identity>| {
        with_elsewhere(
            claim(json!({"event_id": format!("e{n}"), "type": "identify",
                "identities": {"phone": n.to_string()}})),
            &elsewhere,
        )
    };
    // Two more would pass the cap: refused, nothing changes.
    let mut two = event(1, vec![app(1)]);
    two.link_elsewhere.push(identity("web", "w1"));
    assert_eq!(h.rejected(two), ErrorCode::Unavailable);
    // One more fits; then nothing more does, while an event without follow-ups applies.
    h.ok(event(2, vec![app(2)]));
    assert_eq!(h.state.record.follow_ups_pending, FOLLOW_UPS_PENDING_MAX);
    assert_eq!(h.rejected(event(3, vec![app(3)])), ErrorCode::Unavailable);
    h.ok(event(4, vec![]));
}

#[test]
fn bind_writes_only_the_binding_and_is_idempotent() {
    let mut h = Harness::new(PLAIN);
    let remote = OneId::mint(ShardId(3), 7);
    let app = identity("app", "u9");
    assert_eq!(
        h.apply(Command::Bind(vec![(app.clone(), remote)])),
        Output::Bind(vec![BindOutcome::Bound])
    );
    assert_eq!(h.bound(&app), Some(remote));
    let before = without_meta(&h.mem);
    assert_eq!(
        h.apply(Command::Bind(vec![(app, remote)])),
        Output::Bind(vec![BindOutcome::Bound])
    );
    assert_eq!(without_meta(&h.mem), before);
}

#[test]
fn bind_of_an_identity_bound_elsewhere_is_a_conflict() {
    let mut h = Harness::new(PLAIN);
    h.ok(claim(
        json!({"event_id": "e1", "type": "identify", "identities": {"phone": "1"}}),
    ));
    h.ok(claim(
        json!({"event_id": "e2", "type": "identify", "identities": {"phone": "2"}}),
    ));
    let before = without_meta(&h.mem);
    assert_eq!(
        h.apply(Command::Bind(vec![(identity("phone", "1"), id(2))])),
        Output::Bind(vec![BindOutcome::Conflict(id(1))])
    );
    assert_eq!(without_meta(&h.mem), before);
}

// ---- 9. Exactly-once window ----

#[test]
fn dedup_records_expire_after_the_retention_window() {
    let mut h = Harness::new(PLAIN);
    let earn = || {
        claim(
            json!({"event_id": "e1", "type": "points_earn", "identities": {"phone": "1"},
        "points": 10, "ts": ts(0)}),
        )
    };
    let p = h.ok(earn());
    assert_eq!(h.keys_with_prefix(b"d"), 1);
    assert_eq!(h.keys_with_prefix(keys::DEDUP_EVICTION_PREFIX), 1);
    h.apply(clock(6));
    assert_eq!(h.send(earn()), EventOutcome::Duplicate(p));
    // Exactly 7 days: not yet past the window.
    h.apply(clock(7));
    assert_eq!(h.send(earn()), EventOutcome::Duplicate(p));
    h.apply(clock_at(Millis(at(7).0 + 1)));
    assert_eq!(h.keys_with_prefix(b"d"), 0);
    assert_eq!(h.keys_with_prefix(keys::DEDUP_EVICTION_PREFIX), 0);
    // Forgotten: the event applies again.
    assert_eq!(h.send(earn()), EventOutcome::Applied(p, vec![]));
    assert_eq!(h.profile(p).balance, 20);
    assert_eq!(h.send(earn()), EventOutcome::Duplicate(p));
}

#[test]
fn dedup_window_counts_from_the_clock_when_applied() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e0", "type": "identify", "identities": {"phone": "1"}}),
    ));
    h.apply(clock(5));
    h.ok(on(
        p,
        json!({"event_id": "late", "type": "tag_add", "tag": "x", "ts": ts(0)}),
    ));
    // 8 days after e0 (evicted), only 3 after "late" (kept), whatever its ts says.
    h.apply(clock(8));
    let again = |event_id: &str| {
        on(
            p,
            json!({"event_id": event_id, "type": "tag_add", "tag": "x"}),
        )
    };
    assert_eq!(h.send(again("late")), EventOutcome::Duplicate(p));
    assert_eq!(h.send(again("e0")), EventOutcome::Applied(p, vec![]));
}

#[test]
fn one_clock_entry_evicts_at_most_ten_thousand_dedup_records() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e", "type": "identify", "identities": {"phone": "1"}}),
    ));
    let views = (0..DEDUP_EVICTIONS_PER_CLOCK_MAX)
        .map(|i| {
            on(
                p,
                json!({"event_id": format!("v{i}"), "type": "interaction", "name": "view"}),
            )
        })
        .collect();
    h.events(views);
    assert_eq!(h.keys_with_prefix(b"d"), DEDUP_EVICTIONS_PER_CLOCK_MAX + 1);
    h.apply(clock(8));
    // The oldest 10,000 in log order ("e" first); the last view waits for the next entry.
    let left = h.mem.scan(b"d", None, false, usize::MAX);
    assert_eq!(left, vec![(keys::dedup(p, "v9999"), left[0].1.clone())]);
    h.apply(clock(8));
    assert_eq!(h.keys_with_prefix(b"d"), 0);
    assert_eq!(h.keys_with_prefix(keys::DEDUP_EVICTION_PREFIX), 0);
}

#[test]
fn dedup_eviction_counts_keys_across_many_entries() {
    // 100 entries of 150 events: 15,000 dedup keys in 100 queue records (more than one scan
    // chunk). The first clock evicts exactly the oldest 10,000, splitting the 67th entry's
    // record; the second evicts the rest.
    let mut h = Harness::new(PLAIN);
    let p = h.ok(claim(
        json!({"event_id": "e", "type": "identify", "identities": {"phone": "1"}}),
    ));
    for entry in 0..100 {
        h.events(
            (0..150)
                .map(|i| {
                    on(
                        p,
                        json!({"event_id": format!("v{entry}-{i}"), "type": "interaction", "name": "view"}),
                    )
                })
                .collect(),
        );
    }
    assert_eq!(h.keys_with_prefix(b"d"), 15_001);
    assert_eq!(h.keys_with_prefix(keys::DEDUP_EVICTION_PREFIX), 101);
    assert_eq!(
        h.apply(clock(8)),
        Output::Clock {
            due_processed: 0,
            backlog: true
        }
    );
    // "e", then 66 whole entries (9,900), then 99 of the 67th.
    assert_eq!(h.keys_with_prefix(b"d"), 5_001);
    assert_eq!(h.keys_with_prefix(keys::DEDUP_EVICTION_PREFIX), 34);
    assert_eq!(
        h.send(on(
            p,
            json!({"event_id": "v66-98", "type": "interaction", "name": "view"})
        )),
        EventOutcome::Applied(p, vec![])
    );
    assert_eq!(
        h.send(on(
            p,
            json!({"event_id": "v66-99", "type": "interaction", "name": "view"})
        )),
        EventOutcome::Duplicate(p)
    );
    h.apply(clock(8));
    // What is left: the record of the event applied again, written at day 8.
    assert_eq!(h.keys_with_prefix(b"d"), 1);
}

// ---- 10. Determinism ----

/// ~30 mixed commands: rules, clocks, orders, refunds, points, tags, attributes, identities,
/// binds, follow-ups (finished twice), duplicates, rejections, and a dedup eviction.
// The script is data, one command after another: it reads best as one list.
#[allow(clippy::too_many_lines)]
fn script() -> Vec<Command> {
    let (p1, p2, p3) = (id(1), id(2), id(3));
    let ev = |routed: Routed| Command::Events(vec![routed]);
    vec![
        Command::SetRules(Box::new(rules(RULES))),
        clock(0),
        ev(claim(
            json!({"event_id": "s1", "type": "order", "identities": {"phone": "1"},
            "order_id": "A", "amount": "120.50", "channel": "douyin", "ts": ts(0)}),
        )),
        ev(claim(
            json!({"event_id": "s2", "type": "order", "identities": {"email": "x"},
            "order_id": "B", "amount": "700", "ts": ts(0)}),
        )),
        ev(on(
            p1,
            json!({"event_id": "s3", "type": "order", "order_id": "C", "amount": "900",
            "channel": "tmall", "ts": ts(1)}),
        )),
        ev(on(
            p1,
            json!({"event_id": "s4", "type": "refund", "order_id": "A", "amount": "20.25"}),
        )),
        ev(on(
            p1,
            json!({"event_id": "s5", "type": "points_redeem", "points": 100}),
        )),
        ev(on(
            p2,
            json!({"event_id": "s6", "type": "tag_add", "tag": "vip"}),
        )),
        ev(claim(json!({"event_id": "s7", "type": "identify",
            "identities": {"phone": "1", "wechat": "w"}}))),
        ev(on(
            p1,
            json!({"event_id": "s8", "type": "profile_update",
            "attributes": {"city": "Hangzhou", "age": 30}}),
        )),
        Command::Events(vec![
            with_elsewhere(
                on(
                    p1,
                    json!({"event_id": "s8b", "type": "interaction", "name": "view"}),
                ),
                &[identity("app", "u1")],
            ),
            with_elsewhere(
                on(
                    p2,
                    json!({"event_id": "s8c", "type": "interaction", "name": "view"}),
                ),
                &[identity("app", "u2")],
            ),
        ]),
        Command::Bind(vec![
            (identity("app", "u1"), p1),
            (identity("app", "u2"), p2),
        ]),
        Command::FinishFollowUps(vec![
            FollowUpAnswer {
                seq: 1,
                outcome: BindOutcome::Bound,
            },
            FollowUpAnswer {
                seq: 2,
                outcome: BindOutcome::Conflict(p1),
            },
        ]),
        ev(on(
            p1,
            json!({"event_id": "s9", "type": "points_adjust", "points": -5000,
            "reason": "fraud"}),
        )),
        ev(on(
            p1,
            json!({"event_id": "s10", "type": "points_earn", "points": 100}),
        )),
        ev(claim(
            json!({"event_id": "s1", "type": "order", "identities": {"phone": "1"},
            "order_id": "A", "amount": "120.50", "ts": ts(0)}),
        )),
        ev(on(
            p2,
            json!({"event_id": "s11", "type": "refund", "order_id": "Z"}),
        )),
        clock(1),
        Command::Events(vec![
            claim(
                json!({"event_id": "s12", "type": "order", "identities": {"phone": "3"},
                "order_id": "D", "amount": "5000", "ts": ts(2)}),
            ),
            claim(
                json!({"event_id": "s13", "type": "tag_add", "identities": {"phone": "3"},
                "tag": "new"}),
            ),
            on(
                p2,
                json!({"event_id": "s14", "type": "order", "order_id": "E", "amount": "400",
                "channel": "douyin", "ts": ts(2)}),
            ),
            claim(json!({"event_id": "s15", "type": "identify",
                "identities": {"phone": "3", "email": "x"}})),
        ]),
        clock(3),
        ev(on(
            p3,
            json!({"event_id": "s16", "type": "refund", "order_id": "D"}),
        )),
        ev(on(
            p2,
            json!({"event_id": "s17", "type": "interaction", "name": "view",
            "channel": "wechat", "properties": {"page": "home"}}),
        )),
        clock(1),
        Command::Bind(vec![(identity("app", "u9"), OneId::mint(ShardId(2), 1))]),
        Command::Bind(vec![(identity("phone", "3"), p1)]),
        clock(9),
        ev(claim(
            json!({"event_id": "s1", "type": "order", "identities": {"phone": "1"},
            "order_id": "A", "amount": "120.50", "ts": ts(0)}),
        )),
        ev(on(
            p2,
            json!({"event_id": "s6", "type": "tag_add", "tag": "vip2"}),
        )),
        Command::FinishFollowUps(vec![FollowUpAnswer {
            seq: 1,
            outcome: BindOutcome::Bound,
        }]),
        ev(on(
            p3,
            json!({"event_id": "s18", "type": "tag_remove", "tag": "new"}),
        )),
        ev(on(
            p1,
            json!({"event_id": "s19", "type": "points_earn", "points": 7,
            "expires_at": ts(20)}),
        )),
        clock(20),
    ]
}

/// Runs the script one command per committed write set.
fn run_committing_each(activation_budget: usize) -> (Harness, Vec<Output>) {
    let mut h = Harness::empty(activation_budget);
    let outputs = script().into_iter().map(|c| h.apply(c)).collect();
    (h, outputs)
}

#[test]
fn same_commands_give_the_same_state_and_digest() {
    let (a, out_a) = run_committing_each(1000);
    // A budget of one passivates on nearly every event: the cache must not matter.
    let (b, out_b) = run_committing_each(1);
    assert_eq!(out_a, out_b);
    assert_eq!(a.mem, b.mem);
    assert_eq!(a.state.meta, b.state.meta);
    assert_eq!(a.state.record.profile_seq, 3);
    // The script really exercised applies, duplicates, rejections and an eviction.
    let outcomes: Vec<&EventOutcome> = out_a
        .iter()
        .filter_map(|o| match o {
            Output::Events { outcomes, .. } => Some(outcomes),
            _ => None,
        })
        .flatten()
        .collect();
    let count = |f: fn(&EventOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    assert_eq!(count(|o| matches!(o, EventOutcome::Duplicate(_))), 1);
    assert_eq!(count(|o| matches!(o, EventOutcome::Rejected(_))), 3);
    assert_eq!(count(|o| matches!(o, EventOutcome::Applied(..))), 20);
}

#[test]
fn digest_does_not_depend_on_how_writes_were_grouped() {
    let (each, out_each) = run_committing_each(1000);
    // Every command into one write set over an empty base, committed once at the end.
    let mut mem = MemState::default();
    let mut state = ShardState::load(ShardId(0), 1, &mem, 1000);
    let mut writes = WriteSet::default();
    let out_one: Vec<Output> = script()
        .into_iter()
        .zip(1..)
        .map(|(command, index)| {
            catch_up(&mut state, &command);
            state.apply(&mem, &mut writes, index, 1, command)
        })
        .collect();
    mem.commit(writes);
    assert_eq!(out_one, out_each);
    assert_eq!(mem, each.mem);
    assert_eq!(state.meta, each.state.meta);
    assert_eq!(state.meta.digest, digest_of(&mem));
}

#[test]
fn reloading_from_the_stored_state_after_every_entry_changes_nothing() {
    let (each, out_each) = run_committing_each(1000);
    // A restart after every entry: meta, rules and tag rules come back from the state.
    let mut h = Harness::empty(1000);
    let mut outputs = Vec::new();
    for command in script() {
        outputs.push(h.apply(command));
        h.state = ShardState::load(ShardId(0), 1, &h.mem, 1000);
    }
    assert_eq!(outputs, out_each);
    assert_eq!(h.mem, each.mem);
    assert_eq!(h.state.meta, each.state.meta);
    assert_eq!(h.state.rules(), each.state.rules());
}

// ---- 11. Clock ----

#[test]
fn the_digest_covers_the_shard_record() {
    let mut h = Harness::new(PLAIN);
    let before = (h.state.meta.digest, h.state.record.clone());
    // A clock entry with nothing due changes only the shard's clock and due floor.
    h.apply(clock(1));
    assert_eq!(
        without_bookkeeping(&h.mem).len(),
        1,
        "only the rules besides"
    );
    assert_ne!(h.state.record, before.1);
    assert_ne!(
        h.state.meta.digest, before.0,
        "replicas whose clocks differ differ"
    );
    // The same clock again changes nothing, digest included.
    let digest = h.state.meta.digest;
    h.apply(clock(1));
    assert_eq!(h.state.meta.digest, digest);
}

#[test]
fn clock_never_goes_back() {
    let mut h = Harness::new(PLAIN);
    h.apply(clock(3));
    h.apply(clock_at(Millis(at(3).0 - 1000)));
    assert_eq!(h.state.record.clock, at(3));
    assert_eq!(h.record().clock, at(3));
}

#[test]
fn an_event_dated_more_than_a_day_ahead_of_the_shards_time_is_refused() {
    let mut h = Harness::new(PLAIN);
    let earn = |id: &str, ts: Millis| {
        claim(
            json!({"event_id": id, "type": "points_earn", "identities": {"phone": "1"},
            "points": 10, "ts": ts.to_string()}),
        )
    };
    let day_ahead = Millis(at(0).0 + EVENT_TS_AHEAD_MAX_MS);
    assert_eq!(EVENT_TS_AHEAD_MAX_MS, DAY_MS);
    let p = h.ok(earn("on-the-bound", day_ahead));
    let past_it = earn("past-the-bound", Millis(day_ahead.0 + 1));
    assert_eq!(h.rejected(past_it.clone()), ErrorCode::InvalidField);
    match h.send(past_it) {
        EventOutcome::Rejected(error) => assert_eq!(
            (error.field.as_deref(), error.message.as_str()),
            (
                Some("ts"),
                "ts 2026-01-02T00:00:00.001Z is more than 24 hours ahead of the cluster's time (2026-01-01T00:00:00Z)"
            )
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The bound is the shard's time (the last clock entry's target), not its clock: a shard
    // catching up after a stop, its clock a step past T0, takes events dated 30 days on.
    h.apply_exact(clock(30));
    assert_eq!(h.state.record.clock, Millis(at(0).0 + CLOCK_STEP_MAX_MS));
    h.ok(earn("a-month-on", at(30)));
    assert_eq!(
        h.send(earn("a-month-on", at(30))),
        EventOutcome::Duplicate(p)
    );
}

#[test]
fn retention_comes_from_the_rules_and_a_seed_fills_only_rules_without_one() {
    use oneid_protocol::rules::Retention;
    // Rules migrated from format 7 have no retention: clock entries evict nothing.
    let mut h = Harness::empty(1000);
    let mut migrated = rules(PLAIN);
    migrated.retention = None;
    h.apply(Command::SetRules(Box::new(migrated)));
    assert!(h.state.needs_retention());
    h.apply(clock(0));
    let p = h.ok(claim(json!({"event_id": "e1", "type": "points_earn",
        "identities": {"phone": "1"}, "points": 5, "ts": ts(0)})));
    h.apply(clock(30));
    assert_eq!(h.keys_with_prefix(b"d"), 1, "no retention: nothing evicted");
    // A seed fills it; a second seed changes nothing.
    let seeded = Retention {
        dedup_days: 10,
        ..Retention::default()
    };
    h.apply(Command::SeedRetention(seeded));
    assert_eq!(h.state.rules.retention, Some(seeded));
    assert!(!h.state.needs_retention());
    let stored = without_meta(&h.mem);
    h.apply(Command::SeedRetention(Retention::default()));
    assert_eq!(without_meta(&h.mem), stored, "a seed never overrides");
    // The next clock entry evicts by it: the event was filed at day 0, 30 days ago.
    h.apply(clock(31));
    assert_eq!(h.keys_with_prefix(b"d"), 0);
    assert_eq!(h.profile(p).balance, 5);
    // A rules document without `retention` takes the defaults.
    h.apply(Command::SetRules(Box::new(rules(PLAIN))));
    assert_eq!(h.state.rules.retention, Some(Retention::default()));
    // A shard with no rules at all takes no seed (its SeedRules carries one).
    let mut fresh = Harness::empty(1000);
    assert!(!fresh.state.needs_retention());
    fresh.apply(Command::SeedRetention(seeded));
    assert_eq!(fresh.mem.get(keys::RULES), None);
}

#[test]
fn legacy_commands_of_a_migrated_log_apply_as_format_7_did() {
    use oneid_protocol::rules::Retention;
    let mut h = Harness::new(PLAIN);
    let keep_one_day = Retention {
        dedup_days: 1,
        ..Retention::default()
    };
    // A format-7 clock entry: no step bound, eviction by the retention it carries, the
    // target following the clock.
    h.ok(claim(json!({"event_id": "e1", "type": "points_earn",
        "identities": {"phone": "1"}, "points": 5, "ts": ts(0)})));
    h.apply_exact(Command::LegacyClock {
        now: at(3),
        retention: keep_one_day,
    });
    assert_eq!(
        (h.state.record.clock, h.state.record.target),
        (at(3), at(3))
    );
    assert_eq!(
        h.keys_with_prefix(b"d"),
        0,
        "evicted by the entry's own retention"
    );
    // Format-7 events had no bound on `ts`.
    let far = json!({"event_id": "e2", "type": "points_earn", "identities": {"phone": "2"},
        "points": 5, "ts": ts(400)});
    assert_eq!(h.rejected(claim(far.clone())), ErrorCode::InvalidField);
    match h.apply(Command::LegacyEvents(vec![legacy(claim(far))])) {
        Output::Events { outcomes, .. } => {
            assert!(
                matches!(outcomes[..], [EventOutcome::Applied(..)]),
                "{outcomes:?}"
            );
        }
        other => panic!("events answered {other:?}"),
    }
}

#[test]
fn a_clock_entry_steps_the_clock_at_most_clock_step_max_towards_its_target() {
    // The shard's first clock entry goes all the way to its target.
    let mut h = Harness::empty(1000);
    h.apply_exact(clock(0));
    assert_eq!(
        (h.state.record.clock, h.state.record.target),
        (at(0), at(0))
    );
    // A target 30 days ahead: one step per entry; the target is remembered.
    let step = |n: i64| Millis(at(0).0 + n * CLOCK_STEP_MAX_MS);
    h.apply_exact(clock(30));
    assert_eq!(
        (h.state.record.clock, h.state.record.target),
        (step(1), at(30))
    );
    h.apply_exact(clock(30));
    assert_eq!((h.record().clock, h.record().target), (step(2), at(30)));
    // An entry whose target is the clock itself (due work continued) does not move it, nor
    // does a smaller target lower what was remembered.
    h.apply_exact(clock_at(step(2)));
    assert_eq!(
        (h.state.record.clock, h.state.record.target),
        (step(2), at(30))
    );
    // Less than a step left: the target exactly, never past it.
    h.apply_exact(clock_at(Millis(step(2).0 + 5)));
    assert_eq!(h.state.record.clock, Millis(step(2).0 + 5));
}

#[test]
fn order_points_stay_exact_when_the_product_needs_more_than_96_bits() {
    // 650973450359.22 × 0.923247 × 0.953853 × 0.405623 = 232533326424.99999999999999999546
    // exactly: 20 decimals, more digits than a 96-bit decimal mantissa holds.
    let mut h = Harness::new(
        r#"{"points": {"per_currency_unit": "0.923247", "tier_multipliers": {"member": "0.953853"},
            "channel_multipliers": {"web": "0.405623"}}}"#,
    );
    let p = h.ok(claim(
        json!({"event_id": "o1", "type": "order", "identities": {"phone": "1"},
        "order_id": "BIG", "amount": "650973450359.22", "channel": "web", "ts": ts(0)}),
    ));
    assert_eq!(h.order(p, "BIG").points, 232_533_326_424);
}

#[test]
fn rules_are_ordered_by_the_registry_and_every_shard_keeps_the_highest_version() {
    let two = rules(r#"{"points": {"per_currency_unit": "2"}}"#);
    let three = rules(r#"{"points": {"per_currency_unit": "3"}}"#);
    let mut registry = Harness::new(PLAIN);
    assert_eq!(registry.state.rules_version(), 0, "seeded or unversioned");
    let define = |rules: &Rules| Command::DefineRules(Box::new(rules.clone()));
    assert!(matches!(
        registry.apply(define(&two)),
        Output::RulesVersion(1)
    ));
    assert!(matches!(
        registry.apply(define(&three)),
        Output::RulesVersion(2)
    ));
    assert_eq!(
        (registry.state.rules_version(), registry.state.rules()),
        (2, &three)
    );
    // An unversioned `SetRules` (a release before versions) applies as it did.
    registry.apply(Command::SetRules(Box::new(two.clone())));
    assert_eq!(
        (registry.state.rules_version(), registry.state.rules()),
        (2, &two)
    );

    // Other shards get the installs in any order, and some twice: the highest stays.
    let install = |version, rules: &Rules| Command::InstallRules {
        version,
        rules: Box::new(rules.clone()),
    };
    let mut in_order = Harness::new(PLAIN);
    let mut reordered = Harness::new(PLAIN);
    in_order.apply(install(1, &two));
    in_order.apply(install(2, &three));
    reordered.apply(install(2, &three));
    reordered.apply(install(1, &two));
    reordered.apply(install(2, &three));
    for h in [&in_order, &reordered] {
        assert_eq!((h.state.rules_version(), h.state.rules()), (2, &three));
        assert_eq!(
            h.mem
                .get(keys::RULES_VERSION)
                .map(|b| decode::<u64>(keys::RULES_VERSION, &b)),
            Some(2)
        );
        let reloaded = ShardState::load(ShardId(0), 1, &h.mem, 1000);
        assert_eq!((reloaded.rules_version(), reloaded.rules()), (2, &three));
    }
}
