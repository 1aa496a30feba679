//! Segments in the state machine: definitions, incremental membership, the change log,
//! backfills, deletion, time-based exits, and a property test against brute force.

use super::segments::{Change, ChangeRecord, SegmentRecord, BACKFILL_PER_ENTRY};
use super::tests::*;
use super::*;
use crate::command::Routed;
use crate::command::{SegmentDef, SegmentDefine};
use crate::profile::RuleView;
use oneid_protocol::segments::SEGMENTS_MAX;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

fn define_or_delete(h: &mut Harness, name: &str, predicate: Option<&str>) -> Output {
    h.apply(Command::DefineSegment(SegmentDefine {
        name: name.into(),
        predicate: predicate.map(str::to_string),
        description: String::new(),
    }))
}

/// Defines (or replaces) a segment on the registry shard; its definition and `created`.
fn define(h: &mut Harness, name: &str, predicate: &str) -> (SegmentDef, bool) {
    match define_or_delete(h, name, Some(predicate)) {
        Output::Segment(Ok(answer)) => answer,
        other => panic!("define answered {other:?}"),
    }
}

fn delete(h: &mut Harness, name: &str) -> SegmentDef {
    match define_or_delete(h, name, None) {
        Output::Segment(Ok((def, false))) => def,
        other => panic!("delete answered {other:?}"),
    }
}

/// Applies `Backfill` entries until no background work is left; how many it took.
fn backfill_all(h: &mut Harness) -> usize {
    let mut entries = 0;
    while h.state.has_backfill() {
        assert_eq!(
            h.apply(Command::Backfill),
            Output::Backfill {
                more: h.state.has_backfill()
            }
        );
        entries += 1;
        assert!(entries < 10_000, "a backfill that never ends");
    }
    entries
}

fn members(h: &Harness, name: &str) -> Vec<OneId> {
    h.mem
        .scan(&keys::members_prefix(name), None, false, usize::MAX)
        .into_iter()
        .map(|(key, _)| keys::member_oneid(&key))
        .collect()
}

fn record_of(h: &Harness, name: &str) -> SegmentRecord {
    let key = keys::segment(name);
    decode(&key, &h.mem.get(&key).expect("segment stored"))
}

/// The change log as (segment, profile seq, change), in offset order.
fn changes(h: &Harness) -> Vec<(String, u64, Change)> {
    h.mem
        .scan(keys::CHANGE_PREFIX, None, false, usize::MAX)
        .into_iter()
        .flat_map(|(key, value)| decode::<Vec<ChangeRecord>>(&key, &value))
        .map(|record| {
            let seq = record.oneid.0 & 0xFFFF_FFFF_FFFF;
            (record.segment, seq, record.change)
        })
        .collect()
}

fn enter(name: &str, seq: u64) -> (String, u64, Change) {
    (name.into(), seq, Change::Enter)
}

fn exit(name: &str, seq: u64) -> (String, u64, Change) {
    (name.into(), seq, Change::Exit)
}

fn order(phone: &str, event_id: &str, amount: &str, days: i64, channel: &str) -> Routed {
    claim(
        json!({"event_id": event_id, "type": "order", "identities": {"phone": phone},
        "order_id": event_id, "amount": amount, "ts": ts(days), "channel": channel}),
    )
}

/// Brute force: every profile of the shard on which the predicate holds at the clock, with
/// the rule tags as stored.
fn brute_force(h: &Harness, predicate: &str) -> Vec<OneId> {
    brute_force_tagged(h, predicate, false)
}

/// Brute force, with every profile's rule tags as stored or (`fresh`) evaluated afresh at the
/// clock.
fn brute_force_tagged(h: &Harness, predicate: &str, fresh: bool) -> Vec<OneId> {
    let predicate = Predicate::parse(predicate).expect("parses");
    h.mem
        .scan(b"p", None, false, usize::MAX)
        .into_iter()
        .filter_map(|(key, value)| {
            let mut profile: Profile = decode(&key, &value);
            if fresh {
                h.state.evaluate_rule_tags(&mut profile);
            }
            let view = RuleView {
                profile: &profile,
                rules: h.state.rules(),
                now: h.state.record.clock,
                rule_tags: &profile.rule_tags,
            };
            predicate.eval(&view).then_some(profile.oneid)
        })
        .collect()
}

const SPENDERS: &str = "spend_365d >= 1000 and channel(\"douyin\")";

#[test]
fn membership_follows_each_event_in_the_same_apply() {
    let mut h = Harness::new(RULES);
    let (def, created) = define(&mut h, "spenders", SPENDERS);
    assert!(created);
    assert_eq!(
        (def.id, def.generation, def.version, def.deleted),
        (1, 1, 1, false)
    );
    assert_eq!(backfill_all(&mut h), 0, "no profiles: nothing to backfill");

    let a = h.ok(order("1", "a1", "600", 0, "douyin"));
    assert!(members(&h, "spenders").is_empty());
    h.ok(order("1", "a2", "600", 0, "tmall"));
    assert_eq!(members(&h, "spenders"), vec![a]);
    assert_eq!(h.profile(a).segments, BTreeSet::from([def.id]));
    h.ok(claim(
        json!({"event_id": "r1", "type": "refund", "identities": {"phone": "1"},
        "order_id": "a2", "ts": ts(0)}),
    ));
    assert!(members(&h, "spenders").is_empty());
    assert!(h.profile(a).segments.is_empty());
    assert_eq!(changes(&h), vec![enter("spenders", 1), exit("spenders", 1)]);
    assert_eq!(record_of(&h, "spenders").size, 0);
    assert_eq!(h.state.record.change_seq, 2);
}

#[test]
fn a_format_7_definition_of_a_migrated_log_is_dated_by_its_proposer() {
    let mut h = Harness::new(PLAIN);
    let legacy = SegmentDefine {
        name: "s".into(),
        predicate: Some("points > 30".into()),
        description: String::new(),
    };
    match h.apply(Command::LegacyDefineSegment(legacy, at(2))) {
        Output::Segment(Ok((def, true))) => {
            assert_eq!((def.created_at, def.updated_at), (at(2), at(2)));
        }
        other => panic!("a legacy definition answered {other:?}"),
    }
}

#[test]
fn definitions_are_ordered_by_the_registry_and_installed_by_version() {
    let mut h = Harness::new(PLAIN);
    let (first, _) = define(&mut h, "s", "points > 10");
    let (same, created) = define(&mut h, "s", "points > 10");
    assert_eq!(
        (same.clone(), created),
        (first.clone(), false),
        "unchanged: no new version"
    );
    // Dated by the registry shard's time (its last clock entry's target), not the proposer's.
    assert_eq!((first.created_at, first.updated_at), (at(0), at(0)));
    h.apply(clock(3));
    let (second, created) = define(&mut h, "s", "points > 20");
    assert!(!created);
    assert_eq!((second.generation, second.version), (2, 2));
    assert_eq!((second.created_at, second.updated_at), (at(0), at(3)));

    // Another shard gets the installs late and out of order: it keeps the newest.
    let mut other = Harness::new(PLAIN);
    other.apply(Command::InstallSegment(second.clone()));
    let before = other.state.meta.digest;
    other.apply(Command::InstallSegment(first.clone()));
    assert_eq!(
        other.state.meta.digest, before,
        "an older version changes nothing"
    );
    assert_eq!(record_of(&other, "s").def, second);

    let gone = delete(&mut h, "s");
    assert_eq!((gone.deleted, gone.generation, gone.version), (true, 2, 3));
    // Deleted again (a retry after an install failed): the same tombstone, to install again.
    let stored = without_meta(&h.mem);
    assert_eq!(delete(&mut h, "s"), gone);
    assert_eq!(without_meta(&h.mem), stored, "no new version");
    assert!(matches!(
        define_or_delete(&mut h, "never", None),
        Output::Segment(Err(EventError {
            code: ErrorCode::NotFound,
            ..
        }))
    ));
    let (again, created) = define(&mut h, "s", "points > 20");
    assert!(created, "re-created after its deletion");
    assert_eq!((again.generation, again.version), (3, 4));
    assert_eq!(
        again.id, first.id,
        "the name keeps its number while it is remembered"
    );
    let (other, _) = define(&mut h, "t", "points > 1");
    assert_eq!(other.id, first.id + 1);
}

#[test]
fn the_segment_past_the_limit_is_refused_and_changes_nothing() {
    let mut h = Harness::new(PLAIN);
    for i in 0..SEGMENTS_MAX {
        define(&mut h, &format!("s{i}"), "points > 1");
    }
    let before = without_meta(&h.mem);
    match define_or_delete(&mut h, "one-more", Some("points > 1")) {
        Output::Segment(Err(error)) => assert_eq!(error.code, ErrorCode::SegmentLimit),
        other => panic!("answered {other:?}"),
    }
    assert_eq!(without_meta(&h.mem), before);
    // Replacing one at the limit is fine; so is a new one after a deletion.
    define(&mut h, "s0", "points > 2");
    delete(&mut h, "s1");
    assert!(define(&mut h, "one-more", "points > 1").1);
}

#[test]
fn a_backfill_evaluates_existing_profiles_in_bounded_entries() {
    let mut h = Harness::new(RULES);
    let profiles = BACKFILL_PER_ENTRY + 500;
    for i in 0..profiles {
        let amount = if i % 3 == 0 { "1000" } else { "10" };
        h.ok(order(
            &format!("p{i}"),
            &format!("o{i}"),
            amount,
            0,
            "douyin",
        ));
    }
    define(&mut h, "spenders", SPENDERS);
    let record = record_of(&h, "spenders");
    assert_eq!((record.backfill_next, record.profiles_total), (1, profiles));
    assert!(
        members(&h, "spenders").is_empty(),
        "nothing evaluated at definition"
    );
    assert_eq!(backfill_all(&mut h), 2);
    let expected = brute_force(&h, SPENDERS);
    assert_eq!(expected.len() as u64, profiles.div_ceil(3));
    assert_eq!(members(&h, "spenders"), expected);
    assert_eq!(record_of(&h, "spenders").size, expected.len() as u64);
    assert_eq!(record_of(&h, "spenders").profiles_done(), profiles);
}

#[test]
fn a_replaced_segment_keeps_membership_until_reached_and_emits_only_real_changes() {
    let mut h = Harness::new(RULES);
    let a = h.ok(order("a", "a", "2000", 0, "douyin"));
    let b = h.ok(order("b", "b", "1200", 0, "douyin"));
    h.ok(order("c", "c", "10", 0, "douyin"));
    define(&mut h, "big", "spend_365d >= 1000");
    backfill_all(&mut h);
    assert_eq!(members(&h, "big"), vec![a, b]);
    let (def, _) = define(&mut h, "big", "spend_365d >= 1500");
    assert_eq!(def.generation, 2);
    assert_eq!(
        members(&h, "big"),
        vec![a, b],
        "old membership until the backfill"
    );
    backfill_all(&mut h);
    assert_eq!(members(&h, "big"), vec![a]);
    assert_eq!(
        changes(&h),
        vec![enter("big", 1), enter("big", 2), exit("big", 2)]
    );
}

#[test]
fn deleting_a_segment_emits_every_exit_then_its_end() {
    let mut h = Harness::new(RULES);
    for i in 0..3 {
        h.ok(order(
            &format!("p{i}"),
            &format!("o{i}"),
            "2000",
            0,
            "douyin",
        ));
    }
    define(&mut h, "big", "spend_365d >= 1000");
    backfill_all(&mut h);
    delete(&mut h, "big");
    assert!(h.state.has_backfill());
    backfill_all(&mut h);
    assert!(members(&h, "big").is_empty());
    for seq in 1..=3 {
        assert!(h.profile(id(seq)).segments.is_empty());
    }
    let log = changes(&h);
    assert_eq!(
        log[3..],
        [
            exit("big", 1),
            exit("big", 2),
            exit("big", 3),
            ("big".into(), 0, Change::Ended)
        ]
    );
    // An empty segment ends at once.
    define(&mut h, "empty", "points > 1000000");
    delete(&mut h, "empty");
    assert_eq!(
        changes(&h).last(),
        Some(&("empty".into(), 0, Change::Ended))
    );
}

#[test]
fn a_time_based_exit_arrives_at_the_tick_that_crosses_its_threshold() {
    let mut h = Harness::new(RULES);
    let recent = "days_since(last_order_on(\"douyin\")) <= 30";
    let a = h.ok(order("a", "a", "10", 0, "douyin"));
    h.ok(order("b", "b", "10", 0, "tmall"));
    define(&mut h, "recent", recent);
    backfill_all(&mut h);
    assert_eq!(members(&h, "recent"), vec![a]);
    h.apply(clock(30));
    assert_eq!(members(&h, "recent"), vec![a], "30 whole days: still in");
    let mut ms_before_31 = at(31);
    ms_before_31.0 -= 1;
    h.apply(clock_at(ms_before_31));
    assert_eq!(
        members(&h, "recent"),
        vec![a],
        "a millisecond before day 31"
    );
    h.apply(clock(31));
    assert!(
        members(&h, "recent").is_empty(),
        "out at day 31, without any event"
    );
    // The enter of day 0 is past the change log's 72 hours by now.
    assert_eq!(changes(&h), vec![exit("recent", 1)]);
}

#[test]
fn a_rules_change_re_evaluates_rule_tags_tiers_and_segments_in_the_background() {
    let mut h = Harness::new(RULES);
    let a = h.ok(order("a", "a", "800", 0, "douyin"));
    define(&mut h, "tagged", "has_tag(\"big_spender\")");
    backfill_all(&mut h);
    assert!(members(&h, "tagged").is_empty());
    let lower = RULES.replace("spend_365d >= 1000", "spend_365d >= 500");
    h.apply(Command::SetRules(Box::new(rules(&lower))));
    assert!(h.state.has_backfill());
    backfill_all(&mut h);
    assert_eq!(members(&h, "tagged"), vec![a]);
    assert!(h.profile(a).rule_tags.contains("big_spender"));
}

#[test]
fn change_log_entries_are_evicted_by_age_and_count() {
    let mut h = Harness::new(RULES);
    define(&mut h, "any", "order_count > 0");
    for i in 0..5 {
        h.ok(order(&format!("p{i}"), &format!("o{i}"), "10", 0, "douyin"));
    }
    assert_eq!(h.state.record.change_seq, 5);
    // A rules change sets the retention; the next clock entry evicts by it.
    let keep = |h: &mut Harness, hours: u32, entries: u64| {
        let retention = json!({"change_log_hours": hours, "change_log_entries_max": entries});
        h.apply(Command::SetRules(Box::new(rules_retaining(
            RULES, retention,
        ))));
        h.apply(clock(1));
    };
    keep(&mut h, 72, 3);
    assert_eq!(
        h.state.record.changes_evicted, 2,
        "count: the 3 latest kept"
    );
    assert_eq!(h.keys_with_prefix(keys::CHANGE_PREFIX), 3);
    keep(&mut h, 12, 3);
    assert_eq!(h.state.record.changes_evicted, 5, "age: older than 12 h");
    assert_eq!(h.keys_with_prefix(keys::CHANGE_PREFIX), 0);
}

/// A random predicate over the parts events here change.
fn random_predicate(rng: &mut StdRng) -> String {
    let atoms = [
        "points >= 100",
        "spend_365d >= 500",
        "tier >= \"silver\"",
        "order_count >= 2",
        "has_tag(\"vip\")",
        "has_tag(\"big_spender\")",
        "channel(\"douyin\")",
        "attr.city == \"sh\"",
        "days_since(last_order_at) <= 3",
        "days_since(last_seen(\"tmall\")) < 2",
        "days_since(last_order_on(\"douyin\")) <= 5",
        "has_identity(\"email\")",
    ];
    let shape = rng.gen_range(0..4);
    let mut pick = || atoms[rng.gen_range(0..atoms.len())];
    match shape {
        0 => pick().to_string(),
        1 => format!("{} and {}", pick(), pick()),
        2 => format!("{} or not {}", pick(), pick()),
        _ => format!("not ({} and {})", pick(), pick()),
    }
}

fn random_event(rng: &mut StdRng, n: u64, days: i64) -> Routed {
    let phone = format!("p{}", rng.gen_range(0..12));
    let channel = ["douyin", "tmall", "wechat"][rng.gen_range(0..3)];
    let mut event = match rng.gen_range(0..6) {
        0 | 1 => json!({"type": "order", "order_id": format!("o{n}"),
            "amount": format!("{}", rng.gen_range(1..700))}),
        2 => json!({"type": "tag_add", "tag": "vip",
            "expires_at": ts(days + rng.gen_range(1..4))}),
        3 => json!({"type": "tag_remove", "tag": "vip"}),
        4 => {
            let city = ["sh", "bj"][rng.gen_range(0..2)];
            json!({"type": "profile_update", "attributes": {"city": city}})
        }
        _ => json!({"type": "points_earn", "points": rng.gen_range(1..80),
            "expires_at": ts(days + rng.gen_range(1..5))}),
    };
    event["event_id"] = json!(format!("e{n}"));
    event["identities"] = if rng.gen_bool(0.2) {
        json!({"phone": phone, "email": format!("{phone}@x")})
    } else {
        json!({"phone": phone})
    };
    event["channel"] = json!(channel);
    event["ts"] = json!(ts(days));
    claim(event)
}

/// For random events, clock advances, rules changes and definitions, incremental membership
/// equals brute force for every segment whose backfill is done, at every step; and two
/// replicas applying the same log agree on every key.
#[test]
fn incremental_membership_equals_brute_force() {
    for seed in 0..12 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut h = Harness::new(RULES);
        let mut replica = Harness::new(RULES);
        let mut days = 0;
        let mut members_seen = 0;
        for step in 0..300u64 {
            let command = match rng.gen_range(0..20) {
                0 => {
                    let name = format!("s{}", rng.gen_range(0..6));
                    let predicate = (!rng.gen_bool(0.15)).then(|| random_predicate(&mut rng));
                    Command::DefineSegment(SegmentDefine {
                        name,
                        predicate,
                        description: String::new(),
                    })
                }
                1 | 2 => {
                    days += rng.gen_range(0..3);
                    clock(days)
                }
                3 => {
                    let at_least = rng.gen_range(300..1500);
                    let changed =
                        RULES.replace("spend_365d >= 1000", &format!("spend_365d >= {at_least}"));
                    Command::SetRules(Box::new(rules(&changed)))
                }
                4..=6 => Command::Backfill,
                _ => Command::Events(vec![random_event(&mut rng, step, days)]),
            };
            h.apply(command.clone());
            replica.apply(command);
            assert_eq!(
                without_meta(&h.mem),
                without_meta(&replica.mem),
                "seed {seed} step {step}"
            );
            for segment in h.state.segments.records().cloned().collect::<Vec<_>>() {
                if segment.def.deleted
                    || !segment.backfill_done()
                    || h.state.record.rules_backfill.is_some()
                {
                    continue;
                }
                assert_eq!(
                    members(&h, &segment.def.name),
                    brute_force(&h, &segment.def.predicate),
                    "seed {seed} step {step}: segment {} ({})",
                    segment.def.name,
                    segment.def.predicate
                );
                assert_eq!(segment.size, members(&h, &segment.def.name).len() as u64);
                members_seen += segment.size;
            }
        }
        assert!(
            members_seen > 100,
            "seed {seed}: the segments had members ({members_seen})"
        );
    }
}

#[test]
fn finished_deletions_are_forgotten_past_the_tombstone_limit() {
    use super::segments::SEGMENT_TOMBSTONES_MAX;
    let mut h = Harness::new(PLAIN);
    for i in 0..=SEGMENT_TOMBSTONES_MAX {
        define(&mut h, &format!("t{i}"), "points > 1");
        delete(&mut h, &format!("t{i}"));
    }
    // The oldest finished deletion went; the digest (checked by every apply) agreed.
    assert_eq!(
        h.keys_with_prefix(keys::SEGMENT_PREFIX),
        SEGMENT_TOMBSTONES_MAX
    );
    assert!(h.mem.get(&keys::segment("t0")).is_none());
    assert!(h.mem.get(&keys::segment("t1")).is_some());
}

/// A backfill settles each profile at the clock, which can move its rule tags (here a review
/// due at day 11 still waits behind a full clock entry): every segment reading tags follows,
/// not only the one backfilled. The membership stays the predicate's once the backlog drains.
#[test]
fn a_backfill_that_moves_rule_tags_re_evaluates_the_segments_reading_them() {
    let mut h = Harness::new(
        r#"{"tag_rules": [{"tag": "lapsed", "when": "days_since(last_order_at) > 10"}]}"#,
    );
    let p = h.ok(order("p", "o-p", "10", 0, "web"));
    define(&mut h, "lapsed", "has_tag(\"lapsed\")");
    backfill_all(&mut h);
    assert!(members(&h, "lapsed").is_empty());
    // A full clock entry of lots expiring at day 5, before p's review at day 11.
    let earns = (0..crate::due::DUE_PER_CLOCK_MAX)
        .map(|i| {
            claim(json!({"event_id": format!("e{i}"), "type": "points_earn",
                "identities": {"phone": format!("x{i}")}, "points": 1,
                "expires_at": ts(5), "ts": ts(0)}))
        })
        .collect();
    h.events(earns);
    let Output::Clock { backlog, .. } = h.apply(clock(11)) else {
        panic!("a clock entry")
    };
    assert!(backlog, "the review waits for the next clock entry");
    assert!(!h.profile(p).rule_tags.contains("lapsed"));
    // Another segment's backfill settles p at day 11: it is lapsed, so in that segment too.
    define(&mut h, "anyone", "points >= 0");
    backfill_all(&mut h);
    assert!(h.profile(p).rule_tags.contains("lapsed"));
    assert_eq!(members(&h, "lapsed"), vec![p]);
    h.apply(clock(11));
    assert_eq!(
        members(&h, "lapsed"),
        brute_force(&h, "has_tag(\"lapsed\")")
    );
    assert_eq!(members(&h, "lapsed"), vec![p]);
}

/// Predicates over the time-based tag, with tiers and spend.
const LAPSED_PREDICATES: [&str; 3] = [
    "has_tag(\"lapsed\")",
    "has_tag(\"lapsed\") and tier >= \"silver\"",
    "not has_tag(\"lapsed\") or has_tag(\"big_spender\")",
];

fn define_as(name: &str, predicate: String) -> Command {
    Command::DefineSegment(SegmentDefine {
        name: name.into(),
        predicate: Some(predicate),
        description: String::new(),
    })
}

/// More lots than one clock entry processes, on new profiles, expiring at `day`.
fn flood(day: i64) -> Command {
    let lots = (0..crate::due::DUE_PER_CLOCK_MAX + 10).map(|i| {
        claim(json!({"event_id": format!("f{i}"), "type": "points_earn",
            "identities": {"phone": format!("f{i}")}, "points": 1,
            "expires_at": ts(day), "ts": ts(day - 1)}))
    });
    Command::Events(lots.collect())
}

/// A random step: a definition (over the time-based tag, or anything), a clock entry, a
/// backfill entry or an event.
fn random_step(rng: &mut StdRng, step: u64, days: &mut i64) -> Command {
    match rng.gen_range(0..24) {
        0 | 1 => {
            let predicate = match rng.gen_bool(0.5) {
                true => LAPSED_PREDICATES[rng.gen_range(0..LAPSED_PREDICATES.len())].to_string(),
                false => random_predicate(rng),
            };
            define_as(&format!("s{}", rng.gen_range(0..5)), predicate)
        }
        2..=4 => {
            *days += rng.gen_range(0..3);
            clock(*days)
        }
        5..=8 => Command::Backfill,
        _ => Command::Events(vec![random_event(rng, step, *days)]),
    }
}

/// With a time-based tag rule and predicates over tags, time and tier, and once a flood of
/// lots that leaves a due backlog longer than one clock entry's budget (so a backfill settles
/// profiles whose tag reviews still wait): whenever the backlog has drained, every segment's
/// members equal a brute-force evaluation with fresh rule tags.
#[test]
fn membership_equals_brute_force_once_due_backlogs_drain() {
    let mut doc: serde_json::Value = serde_json::from_str(RULES).unwrap();
    doc["tag_rules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"tag": "lapsed", "when": "days_since(last_order_at) > 2"}));
    let rules_json = doc.to_string();
    let mut checked = 0;
    for seed in 0..4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut h = Harness::new(&rules_json);
        let mut days = 0;
        for step in 0..150u64 {
            // Early (every apply of the harness recomputes the digest over the whole state, so
            // the flood's profiles slow every later step): a segment reading the tag, a recent
            // order, the flood, a clock entry it fills up (the order's review waits), then
            // another segment's backfill before the next clock entry.
            let command = match step {
                30 => define_as("tagged", LAPSED_PREDICATES[0].into()),
                39 => Command::Events(vec![order("p0", "recent", "10", days, "web")]),
                40 => flood(days + 1),
                41 => {
                    days += 3;
                    clock(days)
                }
                42 => define_as("anyone", "points >= 0".into()),
                31..=38 | 43..=60 => Command::Backfill,
                _ => random_step(&mut rng, step, &mut days),
            };
            h.apply(command);
            let drained = h.state.record.due_floor.0 > h.state.record.clock.0;
            if !drained || h.state.record.rules_backfill.is_some() {
                continue;
            }
            for segment in h.state.segments.records().cloned().collect::<Vec<_>>() {
                if segment.def.deleted || !segment.backfill_done() {
                    continue;
                }
                assert_eq!(
                    members(&h, &segment.def.name),
                    brute_force_tagged(&h, &segment.def.predicate, true),
                    "seed {seed} step {step}: segment {} ({})",
                    segment.def.name,
                    segment.def.predicate
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 200, "only {checked} checks");
}
