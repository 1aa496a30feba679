//! Unit tests of the time-driven part of the shard state machine (`due.rs`): what clock
//! entries do about lots, tags, the spend window, tier retention, time-based rule tags and
//! ledger retention. Clock entries are driven by hand to the millisecond; no sleeps.

use super::due::DUE_PER_CLOCK_MAX;
use super::keys::{self, DueKind};
use super::profile::{Lot, LOTS_PER_PROFILE_MAX, LOT_MERGE_MS};
use super::retention::LEDGER_EVICTIONS_PER_CLOCK_MAX;
use super::store::MemState;
use super::tests::{
    at, catch_up, claim, clock_at, digest_of, id, ledger, lot, lots, on, rules_retaining, ts,
    without_bookkeeping, Harness, PLAIN,
};
use super::*;
use crate::command::Routed;
use serde_json::json;

/// `days` after T0, plus `ms` milliseconds (negative: before).
fn after(days: i64, ms: i64) -> Millis {
    Millis(at(days).0 + ms)
}

/// Applies a clock entry at `now`; its `(due_processed, backlog)`.
fn tick(h: &mut Harness, now: Millis) -> (usize, bool) {
    match h.apply(clock_at(now)) {
        Output::Clock {
            due_processed,
            backlog,
        } => (due_processed, backlog),
        other => panic!("a clock entry answered {other:?}"),
    }
}

/// The due-time index, parsed, in key order.
fn due_keys(h: &Harness) -> Vec<(Millis, OneId, DueKind, String)> {
    h.mem
        .scan(keys::DUE_PREFIX, None, false, usize::MAX)
        .into_iter()
        .map(|(key, value)| {
            assert!(value.is_empty(), "due keys have no value");
            let (at, oneid, kind, detail) = keys::parse_due(&key);
            // A lot's detail is its 8-byte sequence: show it as a number.
            let detail = if kind == DueKind::LotExpiry {
                u64::from_be_bytes(detail.try_into().unwrap()).to_string()
            } else {
                String::from_utf8(detail.to_vec()).unwrap()
            };
            (at, oneid, kind, detail)
        })
        .collect()
}

/// The ledger record of a lot of `event_id` expiring at `days`.
fn expired(event_id: &str, points: i64, balance_after: i64, days: i64) -> LedgerRecord {
    LedgerRecord {
        reason: Some(format!("points earned by {event_id} expired")),
        ..ledger(
            event_id,
            LedgerKind::Expire,
            -points,
            balance_after,
            days,
            None,
            0,
        )
    }
}

fn earn(p: OneId, event_id: &str, points: i64, expires_at: Millis) -> Routed {
    on(
        p,
        json!({"event_id": event_id, "type": "points_earn", "points": points,
        "expires_at": expires_at.to_string(), "ts": ts(0)}),
    )
}

fn redeem(p: OneId, event_id: &str, points: i64, days: i64) -> Routed {
    on(
        p,
        json!({"event_id": event_id, "type": "points_redeem", "points": points,
        "ts": ts(days)}),
    )
}

/// A profile with one phone and nothing else.
fn someone(h: &mut Harness, phone: &str) -> OneId {
    h.ok(claim(
        json!({"event_id": format!("hello-{phone}"), "type": "identify",
        "identities": {"phone": phone}}),
    ))
}

/// Order `order_id` (event `o-{order_id}`) of `amount` at `days`.
fn order(p: OneId, order_id: &str, amount: &str, days: i64) -> Routed {
    on(
        p,
        json!({"event_id": format!("o-{order_id}"), "type": "order", "order_id": order_id,
        "amount": amount, "ts": ts(days)}),
    )
}

fn refund(p: OneId, event_id: &str, order_id: &str, amount: &str, days: i64) -> Routed {
    on(
        p,
        json!({"event_id": event_id, "type": "refund", "order_id": order_id,
        "amount": amount, "ts": ts(days)}),
    )
}

/// No points; member / silver (500) / gold (1000); a rule tag on spend; the spend window
/// and retention given.
fn tier_rules(window_days: u32, retention_days: u32) -> String {
    format!(
        r#"{{"points": {{"per_currency_unit": 0}},
        "tiers": {{"window_days": {window_days}, "retention_days": {retention_days},
                  "levels": [{{"name": "member", "min_spend": 0}},
                             {{"name": "silver", "min_spend": "500"}},
                             {{"name": "gold", "min_spend": "1000"}}]}},
        "tag_rules": [{{"tag": "big_spender", "when": "spend_365d >= 1000"}}]}}"#
    )
}

/// `(tier, tier_since, tier_retained_until)`.
fn tier(h: &mut Harness, p: OneId) -> (String, Millis, Option<Millis>) {
    let profile = h.profile(p);
    (
        profile.tier,
        profile.tier_since,
        profile.tier_retained_until,
    )
}

fn gold(since: i64, until: i64) -> (String, Millis, Option<Millis>) {
    ("gold".into(), at(since), Some(at(until)))
}

fn silver(since: i64, until: i64) -> (String, Millis, Option<Millis>) {
    ("silver".into(), at(since), Some(at(until)))
}

fn member(since: i64) -> (String, Millis, Option<Millis>) {
    ("member".into(), at(since), None)
}

fn tags(h: &mut Harness, p: OneId) -> Vec<String> {
    h.profile(p)
        .tags()
        .into_iter()
        .map(str::to_string)
        .collect()
}

// ---- 1. Lot expiry ----

#[test]
fn a_lot_expires_on_its_exact_millisecond() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    h.ok(earn(p, "e1", 100, at(10)));
    assert_eq!(
        due_keys(&h),
        vec![(at(10), p, DueKind::LotExpiry, "0".into())]
    );
    let before = h.profile(p);

    assert_eq!(tick(&mut h, after(10, -1)), (0, false));
    assert_eq!(h.profile(p), before, "one millisecond early: nothing");
    assert_eq!(h.keys_with_prefix(keys::DUE_PREFIX), 1);

    assert_eq!(tick(&mut h, at(10)), (1, false));
    let profile = h.profile(p);
    assert_eq!((profile.balance, profile.lots.clone()), (0, vec![]));
    assert_eq!(
        (profile.lifetime_earned, profile.lifetime_redeemed),
        (100, 0)
    );
    assert_eq!(profile.version, before.version + 1);
    assert_eq!(profile.updated_at, at(10));
    assert_eq!(profile.ledger_seq, 2);
    assert_eq!(
        h.ledger(p),
        vec![
            ledger("e1", LedgerKind::Earn, 100, 100, 0, None, 0),
            expired("e1", 100, 0, 10),
        ]
    );
    assert_eq!(h.keys_with_prefix(keys::DUE_PREFIX), 0);
    // Later clock entries find nothing more to do.
    let settled = without_bookkeeping(&h.mem);
    assert_eq!(tick(&mut h, at(11)), (0, false));
    assert_eq!(without_bookkeeping(&h.mem), settled);
}

#[test]
fn only_the_unspent_rest_of_a_lot_expires_and_a_spent_lot_leaves_nothing() {
    let mut h = Harness::new(PLAIN);
    let partly = someone(&mut h, "1");
    let spent = someone(&mut h, "2");
    h.ok(earn(partly, "e1", 100, at(20)));
    h.ok(redeem(partly, "r1", 30, 1));
    h.ok(earn(spent, "e2", 50, at(20)));
    h.ok(redeem(spent, "r2", 50, 1));
    assert_eq!(h.profile(spent).lots, vec![]);
    // The spent lot's key stays until it falls due: keys are not deleted when a lot is spent.
    assert_eq!(
        due_keys(&h),
        vec![
            (at(20), partly, DueKind::LotExpiry, "0".into()),
            (at(20), spent, DueKind::LotExpiry, "0".into()),
        ]
    );
    let spent_before = h.profile(spent);

    assert_eq!(tick(&mut h, at(20)), (2, false));
    let profile = h.profile(partly);
    assert_eq!((profile.balance, profile.lots.len()), (0, 0));
    assert_eq!(
        (profile.lifetime_earned, profile.lifetime_redeemed),
        (100, 30)
    );
    assert_eq!(
        h.ledger(partly),
        vec![
            ledger("e1", LedgerKind::Earn, 100, 100, 0, None, 0),
            ledger("r1", LedgerKind::Redeem, -30, 70, 1, None, 0),
            expired("e1", 70, 0, 20),
        ]
    );
    // Nothing left to expire: no ledger entry, the profile is not even rewritten.
    assert_eq!(h.profile(spent), spent_before);
    assert_eq!(h.ledger(spent).len(), 2);
    assert_eq!(h.keys_with_prefix(keys::DUE_PREFIX), 0);
}

// ---- 2. FIFO by expiry ----

#[test]
fn redeems_take_the_soonest_lot_and_each_expiry_takes_only_its_rest() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    // The later-expiring lot is earned first.
    h.ok(earn(p, "late", 100, at(100)));
    h.ok(earn(p, "soon", 50, at(10)));
    h.ok(redeem(p, "r1", 30, 1));
    assert_eq!(
        lots(&h.profile(p)),
        vec![lot(20, 10, "soon"), lot(100, 100, "late")]
    );

    assert_eq!(tick(&mut h, after(10, -1)), (0, false));
    assert_eq!(h.profile(p).balance, 120);
    assert_eq!(tick(&mut h, at(10)), (1, false));
    assert_eq!(lots(&h.profile(p)), vec![lot(100, 100, "late")]);
    h.ok(redeem(p, "r2", 40, 10));
    assert_eq!(tick(&mut h, after(100, -1)), (0, false));
    assert_eq!(h.profile(p).balance, 60);
    assert_eq!(tick(&mut h, at(100)), (1, false));

    let profile = h.profile(p);
    assert_eq!((profile.balance, profile.lots.len()), (0, 0));
    assert_eq!(
        (profile.lifetime_earned, profile.lifetime_redeemed),
        (150, 70)
    );
    assert_eq!(
        h.ledger(p),
        vec![
            ledger("late", LedgerKind::Earn, 100, 100, 0, None, 0),
            ledger("soon", LedgerKind::Earn, 50, 150, 0, None, 0),
            ledger("r1", LedgerKind::Redeem, -30, 120, 1, None, 0),
            expired("soon", 20, 100, 10),
            ledger("r2", LedgerKind::Redeem, -40, 60, 10, None, 0),
            expired("late", 60, 0, 100),
        ]
    );
}

#[test]
fn earns_expiring_in_one_minute_are_one_lot_expiring_at_the_latest() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    let minute = Millis(at(10).0 - at(10).0.rem_euclid(LOT_MERGE_MS));
    h.ok(earn(p, "e1", 10, Millis(minute.0 + 20_000)));
    h.ok(earn(p, "e2", 5, Millis(minute.0 + 50_000)));
    h.ok(earn(p, "e3", 7, Millis(minute.0 + 30_000)));
    h.ok(earn(p, "next-minute", 1, Millis(minute.0 + LOT_MERGE_MS)));
    let profile = h.profile(p);
    assert_eq!(
        profile.lots,
        vec![
            Lot {
                expires_at: Millis(minute.0 + 50_000),
                points: 22,
                event_id: "e1".into(),
                seq: 0,
                earns: 3,
            },
            Lot {
                expires_at: Millis(minute.0 + LOT_MERGE_MS),
                points: 1,
                event_id: "next-minute".into(),
                seq: 3,
                earns: 1,
            },
        ]
    );
    // The first earn's key is stale once the lot moved later; e3 moved nothing.
    let keys: Vec<(Millis, String)> = due_keys(&h).into_iter().map(|k| (k.0, k.3)).collect();
    assert_eq!(
        keys,
        vec![
            (Millis(minute.0 + 20_000), "0".into()),
            (Millis(minute.0 + 50_000), "0".into()),
            (Millis(minute.0 + LOT_MERGE_MS), "3".into()),
        ]
    );
    // Nothing expires before the latest of the three.
    assert_eq!(tick(&mut h, Millis(minute.0 + 49_999)), (1, false));
    assert_eq!(h.profile(p).balance, 23);
    assert_eq!(tick(&mut h, Millis(minute.0 + 50_000)), (1, false));
    assert_eq!(h.profile(p).balance, 1);
    let expiry = h.ledger(p).pop().expect("an expiry");
    assert_eq!(
        (expiry.kind, expiry.points, expiry.reason.as_deref()),
        (
            LedgerKind::Expire,
            -22,
            Some("points earned by e1 and 2 other earns expired")
        )
    );
}

#[test]
fn past_the_lot_cap_the_two_closest_lots_merge_into_the_later() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    // One lot a day from day 10, then one more a day between day 100 and day 101.
    for day in 0..LOTS_PER_PROFILE_MAX as i64 {
        h.ok(earn(p, &format!("d{day}"), 1, at(10 + day)));
    }
    assert_eq!(h.profile(p).lots.len(), LOTS_PER_PROFILE_MAX);
    h.ok(earn(p, "extra", 1, after(100, 3_600_000)));
    let profile = h.profile(p);
    assert_eq!(profile.lots.len(), LOTS_PER_PROFILE_MAX);
    assert_eq!(profile.balance, LOTS_PER_PROFILE_MAX as i64 + 1);
    // The new lot (an hour after day 100's) and day 100's lot were the closest pair: day 100's
    // point now expires an hour later with the new one, in the new lot.
    let merged = profile
        .lots
        .iter()
        .find(|lot| lot.earns == 2)
        .expect("one merged lot");
    assert_eq!(
        (merged.expires_at, merged.points, merged.event_id.as_str()),
        (after(100, 3_600_000), 2, "extra")
    );
    assert!(!profile.lots.iter().any(|lot| lot.event_id == "d90"));
    // Everything still expires, each point at its promise or (for day 100's) an hour later.
    assert_eq!(tick(&mut h, at(100)), (91, false));
    assert_eq!(h.profile(p).balance, LOTS_PER_PROFILE_MAX as i64 + 1 - 90);
    assert_eq!(tick(&mut h, after(100, 3_600_000)), (1, false));
    assert_eq!(h.profile(p).balance, LOTS_PER_PROFILE_MAX as i64 + 1 - 92);
    assert_eq!(
        tick(&mut h, at(10 + LOTS_PER_PROFILE_MAX as i64)),
        (165, false)
    );
    assert_eq!(h.profile(p).balance, 0);
}

#[test]
fn a_thousand_earns_a_minute_apart_keep_a_profile_at_the_lot_cap() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    let events: Vec<Routed> = (0..1000)
        .map(|i| earn(p, &format!("e{i}"), 1, after(10, i * LOT_MERGE_MS)))
        .collect();
    h.events(events);
    let profile = h.profile(p);
    assert_eq!(
        (profile.lots.len(), profile.balance),
        (LOTS_PER_PROFILE_MAX, 1000)
    );
    // Merged into later lots only: the last earn's lot is whole, and nothing is due early.
    assert_eq!(
        profile.lots.last().map(|l| l.expires_at),
        Some(after(10, 999 * LOT_MERGE_MS))
    );
    assert_eq!(tick(&mut h, after(10, -1)).0, 0);
    assert_eq!(h.profile(p).balance, 1000);
    // At every minute, the points promised past it are all still there.
    for minute in [0, 1, 100, 500, 998] {
        tick(&mut h, after(10, minute * LOT_MERGE_MS));
        let promised_later = 1000 - (minute + 1);
        assert!(h.profile(p).balance >= promised_later, "minute {minute}");
    }
    tick(&mut h, after(10, 999 * LOT_MERGE_MS));
    assert_eq!(h.profile(p).balance, 0);
}

// ---- 3. Points born expired ----

#[test]
fn an_order_born_expired_counts_and_its_points_expire_at_the_next_clock_entry() {
    // Points expire after 30 days; the spend window is 365 days.
    let mut h = Harness::new(r#"{"points": {"expire_after_days": 30}}"#);
    let p = someone(&mut h, "1");
    // In the window (exits at day 265), points expired at day -70.
    h.ok(order(p, "A", "100", -100));
    // Out of the window (-400 + 365 <= 0), points expired at day -370.
    h.ok(order(p, "B", "50", -400));
    let profile = h.profile(p);
    assert_eq!(
        (profile.order_count, profile.total_spend, profile.spend_365d),
        (2, Money(15_000), Money(10_000))
    );
    assert_eq!(
        (profile.first_order_at, profile.last_order_at),
        (Some(at(-400)), Some(at(-100)))
    );
    assert_eq!(profile.balance, 150);
    assert!(h.order(p, "A").in_window);
    assert!(!h.order(p, "B").in_window);
    assert_eq!(
        due_keys(&h),
        vec![
            (at(-370), p, DueKind::LotExpiry, "1".into()),
            (at(-70), p, DueKind::LotExpiry, "0".into()),
            (at(265), p, DueKind::WindowExit, "A".into()),
        ]
    );

    // The next clock entry, even at the same time, expires both, oldest first.
    assert_eq!(tick(&mut h, at(0)), (2, false));
    assert_eq!(h.state.record.clock, at(0));
    let profile = h.profile(p);
    assert_eq!((profile.balance, profile.lots.len()), (0, 0));
    assert_eq!(profile.spend_365d, Money(10_000), "spend is not points");
    assert_eq!(
        h.ledger(p),
        vec![
            ledger("o-A", LedgerKind::Earn, 100, 100, -100, Some("order A"), 0),
            ledger("o-B", LedgerKind::Earn, 50, 150, -400, Some("order B"), 0),
            expired("o-B", 50, 100, -370),
            expired("o-A", 100, 0, -70),
        ]
    );
    assert_eq!(
        due_keys(&h),
        vec![(at(265), p, DueKind::WindowExit, "A".into())]
    );
}

#[test]
fn an_earn_expiring_at_or_before_the_clock_to_the_millisecond_is_already_expired() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    let now = after(5, 7);
    tick(&mut h, now);
    for (event_id, expires) in [("e1", now), ("e2", Millis(now.0 - 1))] {
        let code = h.rejected(earn(p, event_id, 5, expires));
        assert_eq!(code, ErrorCode::AlreadyExpired);
    }
    h.ok(earn(p, "e3", 5, Millis(now.0 + 1)));
    assert_eq!(tick(&mut h, Millis(now.0 + 1)), (1, false));
    assert_eq!(h.profile(p).balance, 0);
}

// ---- 4. Window exit ----

#[test]
fn an_order_leaves_the_window_on_its_exact_tick_with_only_its_unrefunded_part() {
    let mut h = Harness::new(&tier_rules(200, 365));
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "800", 0));
    assert_eq!(tick(&mut h, at(10)), (0, false));
    h.ok(order(p, "B", "500", 10));
    assert_eq!(tick(&mut h, at(20)), (0, false));
    h.ok(refund(p, "r1", "A", "100", 20));
    let profile = h.profile(p);
    assert_eq!(
        (profile.spend_365d, profile.total_spend),
        (Money(120_000), Money(120_000))
    );
    assert_eq!(tags(&mut h, p), ["big_spender"]);
    assert_eq!(tier(&mut h, p), gold(10, 375));

    assert_eq!(tick(&mut h, after(200, -1)), (0, false));
    assert_eq!(h.profile(p).spend_365d, Money(120_000));
    assert!(h.order(p, "A").in_window);

    assert_eq!(tick(&mut h, at(200)), (1, false));
    let profile = h.profile(p);
    // 1200 - (800 - 100): only the unrefunded 700 leaves.
    assert_eq!(
        (profile.spend_365d, profile.total_spend),
        (Money(50_000), Money(120_000))
    );
    assert_eq!(profile.updated_at, at(200));
    assert_eq!(tags(&mut h, p), Vec::<String>::new(), "the rule tag drops");
    assert_eq!(
        tier(&mut h, p),
        gold(10, 375),
        "the tier waits for its review"
    );
    let a = h.order(p, "A");
    assert_eq!((a.in_window, a.refunded), (false, Money(10_000)));

    // A refund after the exit changes total spend only.
    assert_eq!(tick(&mut h, at(205)), (0, false));
    h.ok(refund(p, "r2", "A", "700", 205));
    let profile = h.profile(p);
    assert_eq!(
        (profile.spend_365d, profile.total_spend),
        (Money(50_000), Money(50_000))
    );
    assert_eq!(tick(&mut h, after(210, -1)), (0, false));
    assert_eq!(tick(&mut h, at(210)), (1, false));
    assert_eq!(h.profile(p).spend_365d, Money::ZERO);
    assert_eq!(tier(&mut h, p), gold(10, 375));
}

// ---- 5. Tier retention ----

#[test]
fn a_review_after_the_window_drops_several_levels_at_once() {
    let mut h = Harness::new(&tier_rules(200, 365));
    let p = someone(&mut h, "1");
    assert_eq!(tier(&mut h, p), member(0));
    // One order jumps member → gold.
    h.ok(order(p, "A", "1200", 0));
    assert_eq!(tier(&mut h, p), gold(0, 365));
    assert_eq!(
        due_keys(&h),
        vec![
            (at(200), p, DueKind::WindowExit, "A".into()),
            (at(365), p, DueKind::TierReview, String::new()),
        ]
    );
    assert_eq!(tick(&mut h, at(200)), (1, false));
    assert_eq!(h.profile(p).spend_365d, Money::ZERO);
    assert_eq!(tier(&mut h, p), gold(0, 365));

    assert_eq!(tick(&mut h, after(365, -1)), (0, false));
    assert_eq!(tier(&mut h, p), gold(0, 365));
    let version = h.profile(p).version;
    assert_eq!(tick(&mut h, at(365)), (1, false));
    // gold → member in one review; the lowest level has no retention period.
    assert_eq!(tier(&mut h, p), member(365));
    let profile = h.profile(p);
    assert_eq!(
        (profile.version, profile.updated_at),
        (version + 1, at(365))
    );
    assert_eq!(due_keys(&h), vec![]);
}

#[test]
fn a_review_that_still_qualifies_starts_a_new_period() {
    let mut h = Harness::new(&tier_rules(200, 365));
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "1200", 0));
    tick(&mut h, at(200));
    tick(&mut h, at(300));
    // Back to 1000 in the window: still gold, no new period.
    h.ok(order(p, "B", "1000", 300));
    assert_eq!(tier(&mut h, p), gold(0, 365));

    assert_eq!(tick(&mut h, at(365)), (1, false));
    assert_eq!(tier(&mut h, p), gold(365, 730), "kept, new period");
    assert_eq!(tick(&mut h, at(500)), (1, false));
    assert_eq!(h.profile(p).spend_365d, Money::ZERO);
    assert_eq!(tier(&mut h, p), gold(365, 730));
    tick(&mut h, at(600));
    h.ok(order(p, "C", "600", 600));
    assert_eq!(tier(&mut h, p), gold(365, 730));

    // One level down, with a new period of its own.
    assert_eq!(tick(&mut h, at(730)), (1, false));
    assert_eq!(tier(&mut h, p), silver(730, 1095));
    assert_eq!(tick(&mut h, at(800)), (1, false));
    assert_eq!(tier(&mut h, p), silver(730, 1095));
    assert_eq!(tick(&mut h, after(1095, -1)), (0, false));
    assert_eq!(tick(&mut h, at(1095)), (1, false));
    assert_eq!(tier(&mut h, p), member(1095));
    assert_eq!(due_keys(&h), vec![]);
}

#[test]
fn upgrades_are_immediate_and_leave_the_old_review_stale() {
    let mut h = Harness::new(&tier_rules(200, 365));
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "600", 0));
    assert_eq!(tier(&mut h, p), silver(0, 365));
    assert_eq!(tick(&mut h, at(100)), (0, false));
    h.ok(order(p, "B", "500", 100));
    assert_eq!(tier(&mut h, p), gold(100, 465), "an upgrade is at once");
    assert_eq!(tick(&mut h, at(200)), (1, false));
    assert_eq!(h.profile(p).spend_365d, Money(50_000));
    assert_eq!(tier(&mut h, p), gold(100, 465));
    assert_eq!(tick(&mut h, at(300)), (1, false));
    assert_eq!(h.profile(p).spend_365d, Money::ZERO);

    // The review the silver period scheduled is stale: dropped, the profile untouched.
    let before = h.profile(p);
    assert_eq!(tick(&mut h, at(365)), (1, false));
    assert_eq!(h.profile(p), before);
    assert_eq!(
        due_keys(&h),
        vec![(at(465), p, DueKind::TierReview, String::new())]
    );
    assert_eq!(tick(&mut h, at(465)), (1, false));
    assert_eq!(tier(&mut h, p), member(465));
}

/// With the default rules the spend window and the retention period are both 365 days, so a
/// tier won by one order is reviewed at the very instant that order leaves the window. At that
/// instant the order no longer counts: the review must see it gone.
#[test]
fn a_review_at_the_instant_an_order_leaves_the_window_sees_it_gone() {
    let mut h = Harness::new(&tier_rules(365, 365));
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "1200", 0));
    assert_eq!(tier(&mut h, p), gold(0, 365));
    assert_eq!(tick(&mut h, after(365, -1)), (0, false));
    assert_eq!(tier(&mut h, p), gold(0, 365));
    assert_eq!(tick(&mut h, at(365)), (2, false));
    assert_eq!(h.profile(p).spend_365d, Money::ZERO);
    assert_eq!(tier(&mut h, p), member(365));
    // The exit is processed before the review at the same instant, so the review saw the spend
    // gone and started no new gold period: nothing is left to review.
    assert_eq!(due_keys(&h), vec![]);
    let settled = h.profile(p);
    assert_eq!(tick(&mut h, at(730)), (0, false));
    assert_eq!(h.profile(p), settled);

    // With spend that still qualifies at that instant, the tier is kept for a new period.
    let mut h = Harness::new(&tier_rules(365, 365));
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "1200", 0));
    assert_eq!(tick(&mut h, at(100)), (0, false));
    h.ok(order(p, "B", "1000", 100));
    assert_eq!(tick(&mut h, at(365)), (2, false));
    assert_eq!(h.profile(p).spend_365d, Money(100_000));
    assert_eq!(tier(&mut h, p), gold(365, 730));
    assert_eq!(tick(&mut h, at(465)), (1, false));
    assert_eq!(tier(&mut h, p), gold(365, 730));
    assert_eq!(tick(&mut h, at(730)), (1, false));
    assert_eq!(tier(&mut h, p), member(730));

    // The same when the clock entry's limit falls between the exit and the review: lots of
    // other customers expire just before and fill the entry up to the exit.
    let mut h = Harness::new(&tier_rules(365, 365));
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "1200", 0));
    h.events(
        (0..DUE_PER_CLOCK_MAX - 1)
            .map(|i| {
                claim(
                    json!({"event_id": format!("e{i:04}"), "type": "points_earn",
                    "identities": {"phone": format!("x{i}")}, "points": 1,
                    "expires_at": after(365, -1).to_string(), "ts": ts(0)}),
                )
            })
            .collect(),
    );
    assert_eq!(tick(&mut h, at(365)), (DUE_PER_CLOCK_MAX, true));
    // The exit was the last key of the entry; the review is left for the next one.
    assert_eq!(h.profile(p).spend_365d, Money::ZERO);
    assert_eq!(tier(&mut h, p), gold(0, 365));
    assert_eq!(
        due_keys(&h),
        vec![(at(365), p, DueKind::TierReview, String::new())]
    );
    assert_eq!(tick(&mut h, at(365)), (1, false));
    assert_eq!(tier(&mut h, p), member(365));
}

#[test]
fn without_retention_a_refund_or_a_window_exit_downgrades_at_once() {
    let mut h = Harness::new(&tier_rules(365, 0));
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "1200", 0));
    assert_eq!(tier(&mut h, p), ("gold".into(), at(0), None));
    h.ok(refund(p, "r1", "A", "300", 1));
    assert_eq!(tier(&mut h, p), ("silver".into(), at(1), None));
    assert_eq!(tick(&mut h, at(2)), (0, false));
    h.ok(order(p, "B", "200", 2));
    assert_eq!(tier(&mut h, p), ("gold".into(), at(2), None));
    // No review is ever scheduled.
    assert_eq!(
        due_keys(&h),
        vec![
            (at(365), p, DueKind::WindowExit, "A".into()),
            (at(367), p, DueKind::WindowExit, "B".into()),
        ]
    );
    assert_eq!(tick(&mut h, after(365, -1)), (0, false));
    assert_eq!(tier(&mut h, p), ("gold".into(), at(2), None));
    assert_eq!(tick(&mut h, at(365)), (1, false));
    assert_eq!(h.profile(p).spend_365d, Money(20_000));
    assert_eq!(tier(&mut h, p), member(365));
    assert_eq!(tick(&mut h, at(367)), (1, false));
    assert_eq!(h.profile(p).spend_365d, Money::ZERO);
    assert_eq!(tier(&mut h, p), member(365));
    assert_eq!(due_keys(&h), vec![]);
}

/// A clock entry that processes a review whose next review is also due in the same entry
/// (backdated orders, a short retention): the due key it re-schedules is one the entry
/// deletes later. The digest must stay the hash of the state.
#[test]
fn a_review_rescheduling_a_key_of_the_same_entry_keeps_the_digest() {
    let mut h = Harness::new(&tier_rules(365, 10));
    let p = someone(&mut h, "1");
    tick(&mut h, at(30));
    // Backdated orders: silver since day 20 (review at 30), then gold since day 10 (review
    // at 20). Both reviews are already due.
    h.ok(order(p, "A", "600", 20));
    assert_eq!(tier(&mut h, p), silver(20, 30));
    h.ok(order(p, "B", "500", 10));
    assert_eq!(tier(&mut h, p), gold(10, 20));
    // The review at 20 keeps gold until 30, whose (old) key is in this entry too.
    assert_eq!(tick(&mut h, at(30)), (2, false));
    assert_eq!(tier(&mut h, p), gold(30, 40));
    assert_eq!(
        due_keys(&h),
        vec![
            (at(40), p, DueKind::TierReview, String::new()),
            (at(375), p, DueKind::WindowExit, "B".into()),
            (at(385), p, DueKind::WindowExit, "A".into()),
        ]
    );
    assert_eq!(h.state.meta.digest, digest_of(&h.mem));
}

/// A review already due when it is scheduled (a backdated order) is processed by the next
/// clock entry, and a review it schedules that is also already due by the one after: the
/// periods chain from the order's ts.
#[test]
fn reviews_already_due_are_caught_up_one_period_per_clock_entry() {
    let mut h = Harness::new(&tier_rules(365, 10));
    let p = someone(&mut h, "1");
    tick(&mut h, at(30));
    h.ok(order(p, "A", "1200", 5));
    assert_eq!(tier(&mut h, p), gold(5, 15));
    assert_eq!(tick(&mut h, at(30)), (1, false));
    assert_eq!(tier(&mut h, p), gold(15, 25));
    assert_eq!(tick(&mut h, at(30)), (1, false));
    assert_eq!(tier(&mut h, p), gold(25, 35));
    assert_eq!(tick(&mut h, at(30)), (0, false));
    assert_eq!(
        due_keys(&h),
        vec![
            (at(35), p, DueKind::TierReview, String::new()),
            (at(370), p, DueKind::WindowExit, "A".into()),
        ]
    );
}

// ---- 6. Tag expiry ----

#[test]
fn a_manual_tag_expires_on_its_tick() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    h.ok(on(
        p,
        json!({"event_id": "t1", "type": "tag_add", "tag": "vip", "expires_at": ts(10)}),
    ));
    h.ok(on(
        p,
        json!({"event_id": "t2", "type": "tag_add", "tag": "forever"}),
    ));
    assert_eq!(
        due_keys(&h),
        vec![(at(10), p, DueKind::TagExpiry, "vip".into())]
    );
    assert_eq!(tick(&mut h, after(10, -1)), (0, false));
    assert_eq!(tags(&mut h, p), ["forever", "vip"]);
    let version = h.profile(p).version;
    assert_eq!(tick(&mut h, at(10)), (1, false));
    let profile = h.profile(p);
    assert_eq!(
        profile.manual_tags,
        BTreeMap::from([("forever".to_string(), None)])
    );
    assert_eq!((profile.version, profile.updated_at), (version + 1, at(10)));
    assert_eq!(due_keys(&h), vec![]);
}

#[test]
fn a_tag_re_added_with_a_later_expiry_or_none_is_kept() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    let add = |event_id: &str, tag: &str, expires: Option<i64>| {
        let mut body = json!({"event_id": event_id, "type": "tag_add", "tag": tag});
        if let Some(days) = expires {
            body["expires_at"] = json!(ts(days));
        }
        on(p, body)
    };
    h.ok(add("a1", "later", Some(10)));
    h.ok(add("b1", "kept", Some(10)));
    tick(&mut h, at(5));
    h.ok(add("a2", "later", Some(20)));
    h.ok(add("b2", "kept", None));
    assert_eq!(
        due_keys(&h),
        vec![
            (at(10), p, DueKind::TagExpiry, "kept".into()),
            (at(10), p, DueKind::TagExpiry, "later".into()),
            (at(20), p, DueKind::TagExpiry, "later".into()),
        ]
    );
    let before = h.profile(p);
    // Both keys at day 10 are stale: dropped, the profile untouched.
    assert_eq!(tick(&mut h, at(10)), (2, false));
    assert_eq!(h.profile(p), before);
    assert_eq!(
        before.manual_tags,
        BTreeMap::from([
            ("kept".to_string(), None),
            ("later".to_string(), Some(at(20)))
        ])
    );
    assert_eq!(tick(&mut h, after(20, -1)), (0, false));
    assert_eq!(tags(&mut h, p), ["kept", "later"]);
    assert_eq!(tick(&mut h, at(20)), (1, false));
    assert_eq!(tags(&mut h, p), ["kept"]);
    assert_eq!(tick(&mut h, at(1000)), (0, false));
    assert_eq!(tags(&mut h, p), ["kept"]);
    assert_eq!(due_keys(&h), vec![]);
}

// ---- 7. Time-based rule tags ----

#[test]
fn a_days_since_rule_flips_on_its_exact_day_with_only_clock_entries() {
    let mut h = Harness::new(
        r#"{"points": {"per_currency_unit": 0},
            "tag_rules": [{"tag": "lapsed", "when": "days_since(last_order_at) > 30"}]}"#,
    );
    let p = someone(&mut h, "1");
    h.ok(order(p, "A", "10", 0));
    let profile = h.profile(p);
    assert_eq!(profile.rule_tags, BTreeSet::new());
    // `> 30` over whole days can flip at 30 days (the floor) or 31.
    assert_eq!(profile.rule_review_at, Some(at(30)));
    assert_eq!(
        due_keys(&h),
        vec![
            (at(30), p, DueKind::RuleReview, String::new()),
            (at(365), p, DueKind::WindowExit, "A".into()),
        ]
    );

    assert_eq!(tick(&mut h, at(30)), (1, false));
    let profile = h.profile(p);
    assert_eq!(
        (profile.rule_tags.len(), profile.rule_review_at),
        (0, Some(at(31)))
    );
    assert_eq!(tick(&mut h, after(31, -1)), (0, false));
    assert_eq!(tags(&mut h, p), Vec::<String>::new());
    let version = h.profile(p).version;
    assert_eq!(tick(&mut h, at(31)), (1, false));
    let profile = h.profile(p);
    assert_eq!(tags(&mut h, p), ["lapsed"]);
    assert_eq!(profile.rule_review_at, None);
    assert_eq!((profile.version, profile.updated_at), (version + 1, at(31)));
    assert_eq!(
        due_keys(&h),
        vec![(at(365), p, DueKind::WindowExit, "A".into())]
    );

    // A new order turns it off at once and schedules the next flip from its ts.
    assert_eq!(tick(&mut h, at(40)), (0, false));
    h.ok(order(p, "B", "10", 40));
    let profile = h.profile(p);
    assert_eq!(profile.rule_tags, BTreeSet::new());
    assert_eq!(profile.rule_review_at, Some(at(70)));
    assert_eq!(tick(&mut h, at(70)), (1, false));
    assert_eq!(h.profile(p).rule_review_at, Some(at(71)));
    assert_eq!(tick(&mut h, after(71, -1)), (0, false));
    assert_eq!(tags(&mut h, p), Vec::<String>::new());
    assert_eq!(tick(&mut h, at(71)), (1, false));
    assert_eq!(tags(&mut h, p), ["lapsed"]);
    assert_eq!(h.profile(p).rule_review_at, None);
}

// ---- 8. Bounded work ----

#[test]
fn a_clock_entry_processes_at_most_due_per_clock_max_keys_and_reports_the_backlog() {
    let mut h = Harness::new(PLAIN);
    let n = DUE_PER_CLOCK_MAX + 100;
    let earns = (1..=n)
        .map(|i| {
            claim(json!({"event_id": format!("e{i}"), "type": "points_earn",
                "identities": {"phone": format!("{i}")}, "points": 10,
                "expires_at": ts(5), "ts": ts(0)}))
        })
        .collect();
    let outcomes = h.events(earns);
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, EventOutcome::Applied(..))));
    assert_eq!(h.keys_with_prefix(keys::DUE_PREFIX), n);

    assert_eq!(tick(&mut h, after(5, -1)), (0, false));
    assert_eq!(tick(&mut h, at(5)), (DUE_PER_CLOCK_MAX, true));
    // Keys at one time go in OneID order: the first DUE_PER_CLOCK_MAX profiles expired.
    for seq in 1..=n as u64 {
        let expected = if seq <= DUE_PER_CLOCK_MAX as u64 {
            0
        } else {
            10
        };
        assert_eq!(h.profile(id(seq)).balance, expected, "profile {seq}");
    }
    let left: Vec<OneId> = due_keys(&h).into_iter().map(|k| k.1).collect();
    assert_eq!(
        left,
        (DUE_PER_CLOCK_MAX as u64 + 1..=n as u64)
            .map(id)
            .collect::<Vec<_>>()
    );

    assert_eq!(tick(&mut h, at(5)), (100, false));
    for seq in 1..=n as u64 {
        let profile = h.profile(id(seq));
        assert_eq!((profile.balance, profile.lots.len()), (0, 0));
        assert_eq!(h.ledger(id(seq))[1], expired(&format!("e{seq}"), 10, 0, 5));
    }
    assert_eq!(h.keys_with_prefix(keys::DUE_PREFIX), 0);
    assert_eq!(tick(&mut h, at(6)), (0, false));
}

#[test]
fn a_backlog_of_one_profile_is_processed_oldest_first_in_one_write() {
    let mut h = Harness::new(PLAIN);
    let p = someone(&mut h, "1");
    // Orders leaving the spend window at day 4 (100 of 2.00) and day 5 (enough of 1.00 to
    // leave 52 for a second clock entry). Each group's points are one lot (its earns expire
    // in one minute), expiring with the group's window exits and processed before them.
    let early = 100;
    let late = DUE_PER_CLOCK_MAX - early - 2 + 52;
    let mut orders: Vec<Routed> = (0..early)
        .map(|i| order(p, &format!("a{i:03}"), "2.00", 4 - 365))
        .collect();
    orders.extend((0..late).map(|i| order(p, &format!("b{i:04}"), "1.00", 5 - 365)));
    h.events(orders);
    let before = h.profile(p);
    let (early, late) = (early as i64, late as i64);
    assert_eq!(
        (before.balance, before.spend_365d.0, before.lots.len()),
        (2 * early + late, (2 * early + late) * 100, 2)
    );
    assert_eq!(
        lots(&before),
        vec![
            Lot {
                earns: early as u32,
                ..lot(2 * early, 4, "o-a000")
            },
            Lot {
                earns: late as u32,
                ..lot(late, 5, "o-b0000")
            },
        ]
    );

    assert_eq!(tick(&mut h, at(5)), (DUE_PER_CLOCK_MAX, true));
    let profile = h.profile(p);
    // Day 4 (its lot, then its exits in order id order), then day 5's lot and first exits.
    assert_eq!(
        (profile.balance, profile.spend_365d.0, profile.lots.len()),
        (0, 52 * 100, 0)
    );
    assert_eq!(
        profile.version,
        before.version + 1,
        "loaded and written once"
    );
    let entries = h.ledger(p);
    let earned = (early + late) as usize;
    assert_eq!(entries.len(), earned + 2);
    assert_eq!(
        entries[earned].reason.as_deref(),
        Some("points earned by o-a000 and 99 other earns expired")
    );
    assert_eq!(
        (entries[earned].points, entries[earned].balance_after),
        (-2 * early, late)
    );
    assert_eq!(
        (
            entries[earned + 1].points,
            entries[earned + 1].balance_after
        ),
        (-late, 0)
    );
    let left: Vec<String> = due_keys(&h).into_iter().map(|k| k.3).collect();
    assert_eq!(
        left,
        (late - 52..late)
            .map(|i| format!("b{i:04}"))
            .collect::<Vec<_>>()
    );

    assert_eq!(tick(&mut h, at(5)), (52, false));
    let profile = h.profile(p);
    assert_eq!(profile.spend_365d.0, 0);
    assert_eq!(profile.version, before.version + 2);
    assert_eq!(tick(&mut h, at(5)), (0, false));
}

// ---- 9. Ledger retention ----

#[test]
fn ledger_entries_are_evicted_after_ledger_days_from_the_clock_that_wrote_them() {
    let mut h = Harness::new(r#"{"retention": {"ledger_days": 10}}"#);
    let p = someone(&mut h, "1");
    // Written at clock 0.
    h.ok(earn(p, "e1", 100, at(20)));
    assert_eq!(tick(&mut h, at(5)), (0, false));
    // Written at clock 5, whatever its ts.
    h.ok(redeem(p, "r1", 10, 0));
    assert_eq!(h.keys_with_prefix(keys::LEDGER_EVICTION_PREFIX), 2);

    tick(&mut h, at(10));
    assert_eq!(h.ledger(p).len(), 2, "exactly ledger_days: kept");
    tick(&mut h, after(10, 1));
    assert_eq!(
        h.ledger(p),
        vec![ledger("r1", LedgerKind::Redeem, -10, 90, 0, None, 0)]
    );
    assert_eq!(h.keys_with_prefix(keys::LEDGER_EVICTION_PREFIX), 1);

    // The lot expires at day 20 but the entry is written by the clock entry at day 30.
    assert_eq!(tick(&mut h, at(30)), (1, false));
    assert_eq!(h.ledger(p), vec![expired("e1", 90, 0, 20)]);
    assert_eq!(h.keys_with_prefix(keys::LEDGER_EVICTION_PREFIX), 1);
    tick(&mut h, at(40));
    assert_eq!(
        h.ledger(p).len(),
        1,
        "counted from the clock, not from `at`"
    );
    tick(&mut h, after(40, 1));
    assert_eq!(h.ledger(p), vec![]);
    assert_eq!(h.keys_with_prefix(keys::LEDGER_EVICTION_PREFIX), 0);
    assert_eq!(h.keys_with_prefix(b"l"), 0);
    // The profile keeps counting: eviction does not reuse sequence numbers.
    assert_eq!(h.profile(p).ledger_seq, 3);
}

#[test]
fn one_clock_entry_evicts_at_most_ten_thousand_ledger_entries() {
    // Dedup records kept (they are not what this test is about, and evicting them too would
    // only slow it down).
    let mut h = Harness::new(r#"{"retention": {"dedup_days": 1000}}"#);
    let p = someone(&mut h, "1");
    let mut events = vec![earn(p, "e", 20_000, at(1000))];
    events.extend((0..LEDGER_EVICTIONS_PER_CLOCK_MAX).map(|i| redeem(p, &format!("r{i}"), 1, 0)));
    h.events(events);
    let n = LEDGER_EVICTIONS_PER_CLOCK_MAX + 1;
    assert_eq!(h.keys_with_prefix(b"l"), n);
    // One queue record for the entry, listing its n ledger keys.
    assert_eq!(h.keys_with_prefix(keys::LEDGER_EVICTION_PREFIX), 1);

    let evict_ledger = || clock_at(after(730, 1));
    // A full eviction batch is a backlog too: the leader proposes the next clock entry sooner.
    assert_eq!(
        h.apply(evict_ledger()),
        Output::Clock {
            due_processed: 0,
            backlog: true
        }
    );
    // The oldest 10,000 in write order; the last redeem waits for the next entry.
    assert_eq!(
        h.ledger(p),
        vec![ledger(
            &format!("r{}", LEDGER_EVICTIONS_PER_CLOCK_MAX - 1),
            LedgerKind::Redeem,
            -1,
            20_000 - LEDGER_EVICTIONS_PER_CLOCK_MAX as i64,
            0,
            None,
            0
        )]
    );
    // The entry's queue record keeps the key not evicted yet.
    assert_eq!(h.keys_with_prefix(keys::LEDGER_EVICTION_PREFIX), 1);
    h.apply(evict_ledger());
    assert_eq!(h.keys_with_prefix(b"l"), 0);
    assert_eq!(h.keys_with_prefix(keys::LEDGER_EVICTION_PREFIX), 0);
}

// ---- 10. Determinism with time ----

/// Events and clock entries exercising every kind of due key, backdated and born-expired
/// orders, stale keys, re-scheduled reviews and ledger evictions.
// The script is data, one command after another: it reads best as one list.
#[allow(clippy::too_many_lines)]
fn time_script() -> Vec<Command> {
    let rules_json = r#"{
        "points": {"per_currency_unit": "1.5", "expire_after_days": 30},
        "tiers": {"window_days": 60, "retention_days": 20,
                  "levels": [{"name": "member", "min_spend": 0}, {"name": "silver", "min_spend": "500"},
                             {"name": "gold", "min_spend": "1000"}]},
        "tag_rules": [{"tag": "lapsed", "when": "days_since(last_order_at) > 10"},
                      {"tag": "big", "when": "spend_365d >= 1000"}]
    }"#;
    // The ledger kept 30 days, then 5, then 1: each change is a rules change.
    let keeping = |ledger_days: u32| {
        let retention = json!({"dedup_days": 3, "ledger_days": ledger_days});
        Command::SetRules(Box::new(rules_retaining(rules_json, retention)))
    };
    let (p1, p2, p3) = (id(1), id(2), id(3));
    let ev = |routed: Routed| Command::Events(vec![routed]);
    let keep = |days: i64, ms: i64| clock_at(after(days, ms));
    vec![
        keeping(30),
        keep(0, 0),
        ev(claim(
            json!({"event_id": "s1", "type": "order", "identities": {"phone": "1"},
            "order_id": "A", "amount": "1200", "ts": ts(0)}),
        )),
        ev(claim(
            json!({"event_id": "s2", "type": "points_earn", "identities": {"phone": "2"},
            "points": 50, "expires_at": after(5, 7).to_string()}),
        )),
        ev(on(
            p2,
            json!({"event_id": "s3", "type": "tag_add", "tag": "vip", "expires_at": ts(8)}),
        )),
        // Backdated: in the window until day 10, its points born expired.
        ev(order(p1, "B", "300", -50)),
        keep(5, 7),
        ev(on(
            p2,
            json!({"event_id": "s4", "type": "tag_add", "tag": "vip", "expires_at": ts(12)}),
        )),
        ev(redeem(p1, "s5", 100, 6)),
        keep(10, 0),
        ev(refund(p1, "s6", "A", "200", 10)),
        keep(11, 0),
        keep(12, 0),
        ev(order(p2, "C", "600", 12)),
        Command::Events(vec![
            claim(
                json!({"event_id": "s7", "type": "order", "identities": {"phone": "3"},
                "order_id": "D", "amount": "5000", "ts": ts(-30)}),
            ),
            on(
                p3,
                json!({"event_id": "s8", "type": "tag_add", "tag": "t", "expires_at": ts(15)}),
            ),
            on(p3, json!({"event_id": "s9", "type": "tag_add", "tag": "t"})),
            on(
                p1,
                json!({"event_id": "s10", "type": "points_adjust", "points": 40,
                "reason": "goodwill", "ts": ts(12)}),
            ),
        ]),
        keep(20, 0),
        keep(20, 0),
        ev(order(p1, "E", "100", 21)),
        keeping(5),
        keep(45, 0),
        keep(45, 1),
        ev(refund(p3, "s11", "D", "4000", 45)),
        keep(100, 0),
        keep(100, 0),
        keeping(1),
        keep(200, 0),
    ]
}

fn run_time_script(activation_budget: usize) -> (Harness, Vec<Output>) {
    let mut h = Harness::empty(activation_budget);
    let outputs = time_script().into_iter().map(|c| h.apply(c)).collect();
    (h, outputs)
}

#[test]
fn the_same_events_and_clock_entries_give_the_same_state_and_digest() {
    let (a, out_a) = run_time_script(1000);
    let (b, out_b) = run_time_script(1);
    assert_eq!(out_a, out_b);
    assert_eq!(a.mem, b.mem);
    assert_eq!(a.state.meta, b.state.meta);
    assert_eq!(a.state.meta.digest, digest_of(&a.mem));

    // The script did what it is for: every event applied, and clock entries had work.
    for output in &out_a {
        if let Output::Events { outcomes, .. } = output {
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, EventOutcome::Applied(..))),
                "{outcomes:?}"
            );
        }
    }
    let processed: usize = out_a
        .iter()
        .map(|o| match o {
            Output::Clock { due_processed, .. } => *due_processed,
            _ => 0,
        })
        .sum();
    assert!(processed >= 20, "only {processed} due keys processed");
    assert_eq!(
        a.keys_with_prefix(keys::DUE_PREFIX),
        0,
        "all done by day 200"
    );

    // Every command into one write set, committed once at the end.
    let mut mem = MemState::default();
    let mut state = ShardState::load(ShardId(0), 1, &mem, 1000);
    let mut writes = WriteSet::default();
    let out_one: Vec<Output> = time_script()
        .into_iter()
        .zip(1..)
        .map(|(command, index)| {
            catch_up(&mut state, &command);
            state.apply(&mem, &mut writes, index, 1, command)
        })
        .collect();
    mem.commit(writes);
    assert_eq!(out_one, out_a);
    assert_eq!(mem, a.mem);
    assert_eq!(state.meta, a.state.meta);

    // A restart after every entry.
    let mut h = Harness::empty(1000);
    let mut outputs = Vec::new();
    for command in time_script() {
        outputs.push(h.apply(command));
        h.state = ShardState::load(ShardId(0), 1, &h.mem, 1000);
    }
    assert_eq!(outputs, out_a);
    assert_eq!(h.mem, a.mem);
    assert_eq!(h.state.meta, a.state.meta);
}

#[test]
fn events_that_would_overflow_a_profiles_totals_are_refused() {
    use oneid_protocol::event::EventBody;
    let mut profile = Profile::new(OneId(1), &Rules::default(), Millis(0));
    profile.total_spend = Money(i64::MAX - 5);
    let order = EventBody::Order {
        order_id: "T".into(),
        amount: Money(10),
        store: None,
    };
    let refused = super::event::check_totals(&profile, &order).unwrap_err();
    assert_eq!(
        (refused.code, refused.field.as_deref()),
        (ErrorCode::InvalidField, Some("amount"))
    );
    profile.total_spend = Money(0);
    assert_eq!(super::event::check_totals(&profile, &order), Ok(()));
    profile.balance = i64::MAX - 1;
    let earn = EventBody::PointsEarn {
        points: 2,
        reason: None,
        expires_at: None,
    };
    assert_eq!(
        super::event::check_totals(&profile, &earn)
            .unwrap_err()
            .field
            .as_deref(),
        Some("points")
    );
    let adjust = EventBody::PointsAdjust {
        points: -5,
        reason: "r".into(),
    };
    assert_eq!(super::event::check_totals(&profile, &adjust), Ok(()));
}

#[test]
fn seed_rules_apply_only_to_a_shard_without_rules() {
    let mut h = Harness::empty(10);
    let seed = Rules::default();
    h.apply(Command::SeedRules(Box::new(seed.clone())));
    assert_eq!(h.state.rules(), &seed);
    // Rules set through the API, then a seed proposed again (a new leader before the apply of
    // the PUT was durable): the seed must not override them.
    let custom = Rules {
        expire_after_days: 30,
        ..Rules::default()
    };
    h.apply(Command::SetRules(Box::new(custom.clone())));
    h.apply(Command::SeedRules(Box::new(seed)));
    assert_eq!(h.state.rules(), &custom);
}
