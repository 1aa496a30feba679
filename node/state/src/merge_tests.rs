//! Unit tests of what a merge moves ([`Profile::absorb`]) and of the survivor's rank: profiles
//! made by applying events, then one absorbed into another, with exact expected values.

use super::merge::{Rank, Totals};
use super::profile::{
    Profile, ATTRIBUTES_PER_PROFILE_MAX, CHANNELS_PER_PROFILE_MAX, MANUAL_TAGS_PER_PROFILE_MAX,
};
use super::tests::{at, claim, id, on, ts, Harness, RULES};
use super::*;
use oneid_protocol::policy::IdentityDoc;
use oneid_protocol::predicate::Value;
use serde_json::json;

/// Two profiles of one customer: A (phone, day 1 to 3) and B (unionid, day 2 to 4).
fn two_profiles(h: &mut Harness) -> (Profile, Profile) {
    h.apply(tests::clock(4));
    let a = h.ok(claim(json!({"event_id": "a1", "type": "points_earn",
        "identities": {"phone": "138"}, "points": 100, "expires_at": ts(30),
        "channel": "tmall", "ts": ts(1)})));
    h.ok(on(
        a,
        json!({"event_id": "a2", "type": "tag_add", "tag": "vip",
        "expires_at": ts(20), "ts": ts(1)}),
    ));
    h.ok(on(
        a,
        json!({"event_id": "a3", "type": "profile_update",
        "attributes": {"city": "SH", "vip_no": "7"}, "ts": ts(3)}),
    ));
    h.ok(on(
        a,
        json!({"event_id": "a4", "type": "order", "order_id": "T1",
        "amount": "600", "ts": ts(2)}),
    ));
    let b = h.ok(claim(json!({"event_id": "b1", "type": "points_earn",
        "identities": {"wechat_unionid": "u1"}, "points": 50, "expires_at": ts(40),
        "channel": "douyin", "ts": ts(2)})));
    // Same minute of expiry as A's lot: they become one lot.
    h.ok(on(
        b,
        json!({"event_id": "b2", "type": "points_earn", "points": 30,
        "expires_at": ts(30), "ts": ts(2)}),
    ));
    h.ok(on(
        b,
        json!({"event_id": "b3", "type": "tag_add", "tag": "vip",
        "expires_at": ts(25), "ts": ts(4)}),
    ));
    h.ok(on(
        b,
        json!({"event_id": "b4", "type": "tag_add", "tag": "new", "ts": ts(4)}),
    ));
    h.ok(on(
        b,
        json!({"event_id": "b5", "type": "profile_update",
        "attributes": {"city": "BJ", "age": 30}, "ts": ts(2)}),
    ));
    h.ok(on(
        b,
        json!({"event_id": "b6", "type": "points_redeem", "points": 10,
        "ts": ts(4)}),
    ));
    h.ok(on(
        b,
        json!({"event_id": "b7", "type": "order", "order_id": "T2",
        "amount": "500", "channel": "douyin", "ts": ts(4)}),
    ));
    (h.profile(a), h.profile(b))
}

#[test]
#[allow(clippy::too_many_lines)]
fn a_loser_gives_its_survivor_every_lot_total_tag_attribute_and_channel() {
    let mut h = Harness::new(RULES);
    let (a, b) = two_profiles(&mut h);
    let rules = h.state.rules().clone();
    let mut s = a.clone();
    let absorbed = s.absorb(&b, &rules, "m1", at(5));

    assert_eq!(Totals::of(&s), Totals::of(&a).plus(Totals::of(&b)).unwrap());
    // A: 100 + 900 (order of 600 at 1.5); B: 50 + 30 - 10 + 900 (500 at 1.5, douyin × 1.2).
    assert_eq!((a.balance, b.balance, s.balance), (1000, 970, 1970));
    assert_eq!(s.lifetime_earned, 1000 + 980);
    assert_eq!(s.lifetime_redeemed, 10);
    assert_eq!(
        (s.order_count, s.total_spend.to_string()),
        (2, "1100.00".into())
    );
    assert_eq!(s.spend_365d.to_string(), "1100.00");
    assert_eq!(
        (s.first_order_at, s.last_order_at),
        (Some(at(2)), Some(at(4)))
    );
    // One merge_in per lot of B, oldest expiry first; each lot's new identity is its entry's
    // sequence. B's lot of day 30 (20 points left after the redeem) joins A's of that minute.
    let lot_ids: Vec<(i64, Millis)> = s.lots.iter().map(|l| (l.points, l.expires_at)).collect();
    let default_expiry = at(2).plus_days(365);
    let b_order_expiry = at(4).plus_days(365);
    assert_eq!(
        lot_ids,
        vec![
            (120, at(30)),
            (50, at(40)),
            (900, default_expiry),
            (900, b_order_expiry)
        ]
    );
    let entries: Vec<(u64, LedgerKind, i64, i64, Option<Millis>)> = absorbed
        .ledger
        .iter()
        .map(|(seq, r)| (*seq, r.kind, r.points, r.balance_after, r.expires_at))
        .collect();
    let first = a.ledger_seq;
    assert_eq!(
        entries,
        vec![
            (first, LedgerKind::MergeIn, 20, 1020, Some(at(30))),
            (first + 1, LedgerKind::MergeIn, 50, 1070, Some(at(40))),
            (
                first + 2,
                LedgerKind::MergeIn,
                900,
                1970,
                Some(b_order_expiry)
            ),
        ]
    );
    assert!(absorbed
        .ledger
        .iter()
        .all(|(_, r)| r.peer == Some(b.oneid) && r.event_id == "m1" && r.at == at(5)));
    assert_eq!(s.ledger_seq, first + 3);
    // Due keys: the two lots that are new at A (the one that joined A's lot keeps its key),
    // the tag whose later expiry came from B, and the review of B's tier: silver like A's,
    // retained longer (B reached it on day 4, A on day 2).
    let lot_due = |seq: u64, when: Millis| {
        keys::due(when, s.oneid, keys::DueKind::LotExpiry, &seq.to_be_bytes())
    };
    assert_eq!(
        absorbed.due,
        vec![
            lot_due(first + 1, at(40)),
            lot_due(first + 2, b_order_expiry),
            keys::due(at(25), s.oneid, keys::DueKind::TagExpiry, b"vip"),
            keys::due(b_order_expiry, s.oneid, keys::DueKind::TierReview, &[]),
        ]
    );
    assert_eq!(
        (s.tier.as_str(), s.tier_since, s.tier_retained_until),
        ("silver", at(4), Some(b_order_expiry))
    );
    // Tags: the later expiry and the later write; attributes: the newer write of each.
    assert_eq!(
        s.manual_tags,
        BTreeMap::from([("new".into(), None), ("vip".into(), Some(at(25)))])
    );
    assert_eq!(
        s.manual_tag_at,
        BTreeMap::from([("new".into(), at(4)), ("vip".into(), at(4))])
    );
    assert_eq!(
        s.attributes,
        BTreeMap::from([
            ("age".into(), Value::Number(30.into())),
            ("city".into(), Value::String("SH".into())),
            ("vip_no".into(), Value::String("7".into())),
        ])
    );
    assert_eq!(s.attribute_at["city"], at(3));
    assert_eq!(s.attribute_at["age"], at(2));
    assert_eq!(
        s.channels,
        BTreeMap::from([("douyin".into(), at(4)), ("tmall".into(), at(1))])
    );
    assert_eq!(s.last_order_on, BTreeMap::from([("douyin".into(), at(4))]));
    assert_eq!(
        s.identities,
        BTreeMap::from([
            ("phone".into(), ["138".to_string()].into()),
            ("wechat_unionid".into(), ["u1".to_string()].into()),
        ])
    );
    assert_eq!((s.created_at, s.minted_at), (at(1), at(1)));
    assert_eq!(s.updated_at, at(5));
    assert_eq!(s.merged_from, vec![b.oneid]);
    assert_eq!(s.version, a.version + 1);
    assert_eq!(absorbed.dropped, merge::Dropped::default());

    // The loser's last entry takes everything out.
    let out = b.merge_out_entry(s.oneid, "m1", at(5));
    assert_eq!(
        (out.kind, out.points, out.balance_after, out.peer),
        (LedgerKind::MergeOut, -970, 0, Some(s.oneid))
    );
}

#[test]
fn the_better_tier_is_kept_with_its_retention_and_a_debt_nets_against_the_lots() {
    let mut h = Harness::new(RULES);
    h.apply(tests::clock(2));
    let rich = h.ok(claim(json!({"event_id": "r1", "type": "order",
        "identities": {"phone": "1"}, "order_id": "T1", "amount": "1200", "ts": ts(1)})));
    let poor = h.ok(claim(json!({"event_id": "p1", "type": "points_adjust",
        "identities": {"phone": "2"}, "points": -40, "reason": "fraud", "ts": ts(2)})));
    let (rich, poor) = (h.profile(rich), h.profile(poor));
    assert_eq!((rich.tier.as_str(), poor.tier.as_str()), ("gold", "member"));
    assert_eq!((poor.balance, poor.debt), (-40, 40));
    let rules = h.state.rules().clone();

    // The poor one survives (say, a higher priority): it takes the gold tier, its period and
    // its review, and its debt takes 40 of the rich one's points.
    let mut s = poor.clone();
    let absorbed = s.absorb(&rich, &rules, "m", at(3));
    assert_eq!(
        (s.tier.as_str(), s.tier_since, s.tier_retained_until),
        ("gold", rich.tier_since, rich.tier_retained_until)
    );
    let until = rich.tier_retained_until.expect("gold is retained");
    assert!(absorbed
        .due
        .contains(&keys::due(until, s.oneid, keys::DueKind::TierReview, &[])));
    // The poor one's debt was paid by the lot moved in: 1800 - 40.
    assert_eq!((s.balance, s.debt), (1760, 0));
    assert_eq!(s.lots.iter().map(|l| l.points).sum::<i64>(), 1760);

    // The other way round: the rich one keeps its tier; the debt moves in as an adjust.
    let mut s = rich.clone();
    let absorbed = s.absorb(&poor, &rules, "m", at(3));
    assert_eq!(s.tier_since, rich.tier_since);
    let kinds: Vec<(LedgerKind, i64, i64)> = absorbed
        .ledger
        .iter()
        .map(|(_, r)| (r.kind, r.points, r.balance_after))
        .collect();
    assert_eq!(kinds, vec![(LedgerKind::Adjust, -40, 1760)]);
    assert_eq!(
        Totals::of(&s),
        Totals::of(&rich).plus(Totals::of(&poor)).unwrap()
    );
}

#[test]
fn past_a_per_profile_limit_the_most_recently_written_stay_and_the_rest_are_listed() {
    let mut h = Harness::new(RULES);
    let (a, b) = two_profiles(&mut h);
    let rules = h.state.rules().clone();
    let fill = |p: &Profile, prefix: &str, n: usize, day: i64| {
        let mut p = p.clone();
        for i in 0..n {
            let name = format!("{prefix}{i:03}");
            let when = Millis(at(day).0 + i as i64);
            p.manual_tags.insert(name.clone(), None);
            p.manual_tag_at.insert(name.clone(), when);
            p.attributes.insert(name.clone(), Value::Bool(true));
            p.attribute_at.insert(name.clone(), when);
            p.channels.insert(name, when);
        }
        p
    };
    // A holds 60 of each beside its own, written on day 6; B 60, written on day 7 (newer).
    let a = fill(&a, "a", 60, 6);
    let b = fill(&b, "b", 60, 7);
    let mut s = a.clone();
    let absorbed = s.absorb(&b, &rules, "m", at(8));
    assert_eq!(
        s.manual_tags.len(),
        (2 + 60 + 60).min(MANUAL_TAGS_PER_PROFILE_MAX)
    );
    assert!(absorbed.dropped.tags.is_empty());
    // Attributes: 3 + 120 held, 100 kept: the 23 oldest go (A's own three, then a000..a019).
    assert_eq!(s.attributes.len(), ATTRIBUTES_PER_PROFILE_MAX);
    let mut expected: Vec<String> = ["age", "city", "vip_no"].map(String::from).to_vec();
    expected.extend((0..20).map(|i| format!("a{i:03}")));
    expected.sort();
    assert_eq!(absorbed.dropped.attributes, expected);
    assert_eq!(s.attribute_at.len(), ATTRIBUTES_PER_PROFILE_MAX);
    // Channels: 2 + 120, 64 kept: the 58 oldest go.
    assert_eq!(s.channels.len(), CHANNELS_PER_PROFILE_MAX);
    let mut expected: Vec<String> = ["douyin", "tmall"].map(String::from).to_vec();
    expected.extend((0..56).map(|i| format!("a{i:03}")));
    expected.sort();
    assert_eq!(absorbed.dropped.channels, expected);
}

#[test]
fn the_survivor_ranks_by_priority_then_minting_then_oneid() {
    let policy: IdentityDoc = serde_json::from_value(json!({"kinds": {
        "member_card": {"priority": 10}, "device_id": {"priority": -5}}}))
    .unwrap();
    let policy = policy.validate().unwrap();
    let profile = |seq: u64, kinds: &[&str], minted: i64| {
        let mut p = Profile::new(id(seq), &Rules::default(), at(minted));
        for kind in kinds {
            p.identities
                .entry((*kind).into())
                .or_default()
                .insert("v".into());
        }
        p
    };
    let rank = |p: &Profile| Rank::of(p, &policy);
    let card = profile(9, &["phone", "member_card"], 5);
    let phone = profile(1, &["phone"], 1);
    let device = profile(2, &["device_id"], 0);
    let empty = profile(3, &[], 0);
    let later_phone = profile(4, &["email"], 2);
    assert!(rank(&card) > rank(&phone));
    assert!(rank(&phone) > rank(&later_phone));
    assert!(rank(&later_phone) > rank(&device));
    assert!(rank(&device) > rank(&empty));
    let twin = profile(5, &["phone"], 1);
    assert!(rank(&phone) > rank(&twin), "the smaller OneID wins a tie");
}

/// The survivor of profiles merged in any order and grouping is the one of highest rank: the
/// survivor's rank after a merge is its rank before. Random ranks, random merge trees.
#[test]
fn merges_in_any_order_end_with_the_same_survivor() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let kinds = ["phone", "member_card", "email", "device_id"];
    let policy: IdentityDoc = serde_json::from_value(json!({"kinds": {
        "member_card": {"priority": 10}, "email": {"priority": 3}, "device_id": {"priority": -5}}}))
    .unwrap();
    let policy = policy.validate().unwrap();
    let rules = Rules::default();
    for _ in 0..200 {
        let n = 2 + next(6) as usize;
        let mut profiles: Vec<Profile> = (0..n)
            .map(|i| {
                let mut p = Profile::new(
                    id(1 + next(1000) * 10 + i as u64),
                    &rules,
                    at(next(4) as i64),
                );
                for _ in 0..1 + next(2) {
                    let kind = kinds[next(4) as usize];
                    p.identities
                        .entry(kind.into())
                        .or_default()
                        .insert(format!("{i}"));
                }
                p
            })
            .collect();
        let best = profiles
            .iter()
            .map(|p| Rank::of(p, &policy))
            .max()
            .unwrap()
            .oneid;
        // Merge random pairs until one is left; each merge's survivor is the higher rank.
        while profiles.len() > 1 {
            let i = next(profiles.len() as u64) as usize;
            let x = profiles.swap_remove(i);
            let j = next(profiles.len() as u64) as usize;
            let y = profiles.swap_remove(j);
            let (mut survivor, loser) = if Rank::of(&x, &policy) > Rank::of(&y, &policy) {
                (x, y)
            } else {
                (y, x)
            };
            let before = Rank::of(&survivor, &policy);
            survivor.absorb(&loser, &rules, "m", at(9));
            assert_eq!(
                Rank::of(&survivor, &policy),
                before,
                "a survivor keeps its rank"
            );
            profiles.push(survivor);
        }
        assert_eq!(profiles[0].oneid, best);
    }
}

/// Each attribute and manual tag keeps its own write time; an event of format 10 still in a
/// migrated log dates them all at the profile's `updated_at`, as the migration dates what it
/// finds, so replicas that applied it before and after the upgrade agree.
#[test]
fn writes_are_dated_by_their_events_and_format_10_events_date_them_as_the_migration_does() {
    let mut h = Harness::new(RULES);
    h.apply(tests::clock(3));
    let p = h.ok(claim(json!({"event_id": "e1", "type": "profile_update",
        "identities": {"phone": "1"}, "attributes": {"city": "SH"}, "ts": ts(1)})));
    h.ok(on(
        p,
        json!({"event_id": "e2", "type": "tag_add", "tag": "vip", "ts": ts(2)}),
    ));
    h.ok(on(
        p,
        json!({"event_id": "e3", "type": "profile_update",
        "attributes": {"age": 3}, "ts": ts(3)}),
    ));
    let profile = h.profile(p);
    assert_eq!(
        profile.attribute_at,
        BTreeMap::from([("age".into(), at(3)), ("city".into(), at(1))])
    );
    assert_eq!(
        profile.manual_tag_at,
        BTreeMap::from([("vip".into(), at(2))])
    );
    assert_eq!(profile.minted_at, at(1));
    h.ok(on(
        p,
        json!({"event_id": "e4", "type": "tag_remove", "tag": "vip", "ts": ts(3)}),
    ));
    h.ok(on(
        p,
        json!({"event_id": "e5", "type": "profile_update",
        "attributes": {"age": null}, "ts": ts(3)}),
    ));
    // A removal is remembered, dated by its event.
    let profile = h.profile(p);
    assert_eq!(
        profile.attribute_at,
        BTreeMap::from([("age".into(), at(3)), ("city".into(), at(1))])
    );
    assert!(!profile.attributes.contains_key("age"));
    assert_eq!(
        profile.manual_tag_at,
        BTreeMap::from([("vip".into(), at(3))])
    );
    assert!(profile.manual_tags.is_empty());

    let mut event = on(
        p,
        json!({"event_id": "e6", "type": "tag_add", "tag": "old",
        "ts": ts(2)}),
    );
    event.rules_version = h.state.rules_version();
    match h.apply(Command::LegacyEvents10(vec![event])) {
        Output::Events { outcomes, .. } => {
            assert!(matches!(outcomes[..], [EventOutcome::Applied(..)]));
        }
        other => panic!("events answered {other:?}"),
    }
    let profile = h.profile(p);
    assert_eq!(profile.updated_at, at(3));
    assert_eq!(
        profile.attribute_at,
        BTreeMap::from([("city".into(), at(3))])
    );
    assert_eq!(
        profile.manual_tag_at,
        BTreeMap::from([("old".into(), at(3))])
    );
}

/// A profile remembers its latest removals up to the limits, the oldest forgotten first.
#[test]
fn a_profile_remembers_its_latest_removals_up_to_the_limits() {
    let rules = tests::rules("{}");
    let mut profile = Profile::new(OneId::mint(ShardId(0), 1), &rules, Millis(0));
    let n = ATTRIBUTES_PER_PROFILE_MAX + 3;
    for i in 0..n {
        let name = format!("a{i:03}");
        let at = Millis(i64::try_from(i).unwrap());
        profile
            .attributes
            .insert(name.clone(), Value::String("x".into()));
        profile.attribute_at.insert(name.clone(), at);
        profile.remove_attribute(&name, at);
        profile.untag(&name, at);
    }
    assert!(profile.attributes.is_empty() && profile.manual_tags.is_empty());
    let kept: Vec<&String> = profile.attribute_at.keys().collect();
    assert_eq!(kept.len(), ATTRIBUTES_PER_PROFILE_MAX);
    assert_eq!((kept[0].as_str(), kept[99].as_str()), ("a003", "a102"));
    // Tags keep up to their own, larger limit: all 103.
    assert_eq!(profile.manual_tag_at.len(), n);
}
