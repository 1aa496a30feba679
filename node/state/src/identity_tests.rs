//! The identity policy as apply enforces it: blocked values, kind limits, unmergeable kinds,
//! the rules version an event was judged by, and the binding epoch.

use super::tests::*;
use super::*;
use crate::command::{Found, LegacyRouted, Routed};
use oneid_protocol::api::NotLinkedReason::{self, *};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value as Json};

/// Member cards: one per profile. Device ids never join two profiles.
const POLICY: &str = r#"{"identity": {"kinds": {
    "member_card": {"max_per_profile": 1},
    "device_id": {"merge": false}
}}}"#;

fn identify(event_id: &str, identities: Json) -> Routed {
    claim(json!({"event_id": event_id, "type": "identify", "identities": identities}))
}

fn applied(oneid: OneId, not: &[(&str, &str, NotLinkedReason)]) -> EventOutcome {
    let not = not
        .iter()
        .map(|(kind, value, reason)| not_linked(kind, value, reason.clone()))
        .collect();
    EventOutcome::Applied(oneid, not)
}

#[test]
fn two_strangers_sharing_a_placeholder_phone_get_two_profiles() {
    let mut h = Harness::new(PLAIN);
    let first = h.send(identify(
        "e1",
        json!({"phone": "unknown", "member_card": "M1"}),
    ));
    let second = h.send(identify(
        "e2",
        json!({"phone": "unknown", "member_card": "M2"}),
    ));
    assert_eq!(first, applied(id(1), &[("phone", "unknown", BlockedValue)]));
    assert_eq!(
        second,
        applied(id(2), &[("phone", "unknown", BlockedValue)])
    );
    assert_eq!(h.bound(&identity("phone", "unknown")), None);
    assert!(!h.profile(id(1)).identities.contains_key("phone"));
    // Matching is case-insensitive for the defaults, and zeros are blocked.
    let third = h.send(identify(
        "e3",
        json!({"phone": "000000", "email": "NULL", "member_card": "M3"}),
    ));
    assert_eq!(
        third,
        applied(
            id(3),
            &[
                ("email", "NULL", BlockedValue),
                ("phone", "000000", BlockedValue)
            ]
        )
    );
}

#[test]
fn an_event_whose_identities_are_all_blocked_names_no_profile() {
    let mut h = Harness::new(PLAIN);
    let code = h.rejected(identify("e1", json!({"phone": "unknown", "email": "none"})));
    assert_eq!(code, ErrorCode::BlockedIdentity);
    // With a oneid it applies to that profile, without them.
    let p = h.ok(identify("e2", json!({"phone": "138"})));
    let outcome = h.send(on(
        p,
        json!({"event_id": "e3", "type": "points_earn", "points": 7,
            "identities": {"phone": "unknown"}}),
    ));
    assert_eq!(outcome, applied(p, &[("phone", "unknown", BlockedValue)]));
    assert_eq!(h.profile(p).balance, 7);
}

#[test]
fn a_global_list_replaces_the_defaults_and_a_kinds_list_adds_to_it() {
    let mut h = Harness::new(
        r#"{"identity": {"blocked_values": {"exact": ["N/A"]},
            "kinds": {"phone": {"blocked_values": {"patterns": ["^1{11}$"]}}}}}"#,
    );
    let outcome = h.send(identify(
        "e1",
        json!({"phone": "11111111111", "email": "N/A", "member_card": "unknown"}),
    ));
    assert_eq!(
        outcome,
        applied(
            id(1),
            &[
                ("email", "N/A", BlockedValue),
                ("phone", "11111111111", BlockedValue)
            ]
        )
    );
    assert_eq!(h.bound(&identity("member_card", "unknown")), Some(id(1)));
}

#[test]
fn a_blocked_value_bound_before_the_policy_keeps_its_binding_but_joins_nothing() {
    let mut h = Harness::new(PLAIN);
    // An event of a release before the policy bound `unknown`.
    let legacy = LegacyRouted {
        event: event(&json!({"event_id": "e1", "type": "identify",
            "identities": {"phone": "unknown", "email": "a@x"}})),
        target: Target::Claim,
        link_elsewhere: vec![],
        bound: vec![],
    };
    h.apply(Command::LegacyEvents9(vec![legacy]));
    let p = id(1);
    assert_eq!(h.bound(&identity("phone", "unknown")), Some(p));
    // Now an event naming it does not find that profile: it gets its own.
    let outcome = h.send(identify("e2", json!({"phone": "unknown", "email": "b@x"})));
    assert_eq!(
        outcome,
        applied(id(2), &[("phone", "unknown", BlockedValue)])
    );
    assert_eq!(
        h.bound(&identity("phone", "unknown")),
        Some(p),
        "not rewritten"
    );
}

#[test]
fn a_kind_limit_counts_the_values_held_and_those_still_being_bound() {
    let mut h = Harness::new(POLICY);
    let p = h.ok(identify("e1", json!({"phone": "1", "member_card": "M1"})));
    let outcome = h.send(on(
        p,
        json!({"event_id": "e2", "type": "identify", "identities": {"member_card": "M2"}}),
    ));
    assert_eq!(outcome, applied(p, &[("member_card", "M2", KindLimit)]));
    assert_eq!(h.bound(&identity("member_card", "M2")), None);

    // A card being bound on another shard counts too.
    let q = h.ok(identify("e3", json!({"phone": "2"})));
    let card = |value: &str| identity("member_card", value);
    let outcome = h.send(with_elsewhere(
        on(
            q,
            json!({"event_id": "e4", "type": "points_earn", "points": 1}),
        ),
        &[card("M3")],
    ));
    assert_eq!(outcome, applied(q, &[]));
    let outcome = h.send(with_elsewhere(
        on(
            q,
            json!({"event_id": "e5", "type": "points_earn", "points": 1}),
        ),
        &[card("M4")],
    ));
    assert_eq!(outcome, applied(q, &[("member_card", "M4", KindLimit)]));
    // The same card again is pending already: nothing to refuse, nothing filed twice.
    let output = h.apply(Command::Events(vec![with_elsewhere(
        on(
            q,
            json!({"event_id": "e6", "type": "points_earn", "points": 1}),
        ),
        &[card("M3")],
    )]));
    assert!(
        matches!(&output, Output::Events { outcomes, follow_ups }
            if follow_ups.is_empty() && outcomes == &[applied(q, &[])]),
        "{output:?}"
    );
    // Once another profile took M3 (`taken`), the profile has room for a card again.
    let (seq, _) = follow_up_records(&h)[0].clone();
    h.apply(Command::FinishFollowUps(vec![FollowUpAnswer {
        seq,
        outcome: BindOutcome::Conflict(p),
    }]));
    assert_eq!(
        h.keys_with_prefix(b"q"),
        0,
        "the pending link went with its record"
    );
    let outcome = h.send(with_elsewhere(
        on(
            q,
            json!({"event_id": "e7", "type": "points_earn", "points": 1}),
        ),
        &[card("M4")],
    ));
    assert_eq!(outcome, applied(q, &[]));
}

#[test]
fn an_unmergeable_kind_binds_only_unbound_and_picks_a_profile_only_alone() {
    let mut h = Harness::new(POLICY);
    let p = h.ok(identify("e1", json!({"phone": "1", "device_id": "D"})));
    // Another customer on the same device: a profile of their own, the device not linked.
    let outcome = h.send(identify("e2", json!({"phone": "2", "device_id": "D"})));
    let q = id(2);
    assert_eq!(outcome, applied(q, &[("device_id", "D", MergeDisabled)]));
    assert_eq!(h.bound(&identity("phone", "2")), Some(q));
    assert_eq!(h.bound(&identity("device_id", "D")), Some(p));
    // By oneid: the same.
    let outcome = h.send(on(
        q,
        json!({"event_id": "e3", "type": "identify", "identities": {"device_id": "D"}}),
    ));
    assert_eq!(outcome, applied(q, &[("device_id", "D", MergeDisabled)]));
    // Alone, the device names its profile.
    let outcome = h.send(claim(json!({"event_id": "e4", "type": "points_earn",
        "points": 3, "identities": {"device_id": "D"}})));
    assert_eq!(outcome, applied(p, &[]));
    // Mergeable kinds of two profiles at apply: sent back, for the router to merge them.
    h.ok(on(
        q,
        json!({"event_id": "e6", "type": "identify", "identities": {"email": "x"}}),
    ));
    let code = h.rejected(identify("e7", json!({"phone": "1", "email": "x"})));
    assert_eq!(code, ErrorCode::Unavailable);
}

#[test]
fn an_event_judged_by_other_rules_than_the_shards_changes_nothing() {
    let mut h = Harness::new(PLAIN);
    h.apply(Command::InstallRules {
        version: 3,
        rules: Box::new(rules(POLICY)),
    });
    let before = without_meta(&h.mem);
    let mut stale = identify("e1", json!({"phone": "1"}));
    stale.rules_version = 2;
    let output = h.apply(Command::Events(vec![stale.clone()]));
    assert_eq!(
        output,
        Output::Events {
            outcomes: vec![EventOutcome::StaleRules(3)],
            follow_ups: vec![]
        }
    );
    assert_eq!(without_meta(&h.mem), before);
    stale.rules_version = 3;
    assert_eq!(h.send(stale), applied(id(1), &[]));
}

#[test]
fn events_of_older_formats_apply_without_the_policy() {
    let mut h = Harness::new(POLICY);
    let legacy = |event_id: &str, identities: Json| LegacyRouted {
        event: event(&json!({"event_id": event_id, "type": "identify", "identities": identities})),
        target: Target::Claim,
        link_elsewhere: vec![],
        bound: vec![],
    };
    h.apply(Command::LegacyEvents9(vec![legacy(
        "e1",
        json!({"phone": "0", "member_card": "M1"}),
    )]));
    let p = id(1);
    assert_eq!(h.bound(&identity("phone", "0")), Some(p));
    let many: Json = (0..50).map(|i| (format!("k{i:02}"), json!("v"))).collect();
    let mut past = legacy("e2", many);
    past.target = Target::Existing(p);
    match h.apply(Command::LegacyEvents9(vec![past])) {
        Output::Events { outcomes, .. } => assert!(
            matches!(&outcomes[..], [EventOutcome::Rejected(e)] if e.code == ErrorCode::IdentityLimit),
            "{outcomes:?}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_routers_binding_is_taken_only_at_the_epoch_it_was_read() {
    let mut h = Harness::new(PLAIN);
    let p = h.ok(identify("e1", json!({"phone": "1"})));
    let q = h.ok(identify("e2", json!({"phone": "2"})));
    // A router read `phone 1` as bound to q at epoch 0; the binding moved since (what a merge
    // or unlink will do), and so did the epoch: apply reads the binding again.
    h.state.record.binding_epoch = 1;
    h.apply(clock(0));
    let mut routed = on(
        q,
        json!({"event_id": "e3", "type": "identify", "identities": {"phone": "1"}}),
    );
    routed.found = vec![Found::Bound { oneid: q, epoch: 0 }];
    let code = h.rejected(routed.clone());
    assert_eq!(code, ErrorCode::Unavailable, "{p} holds phone 1");
    // At the current epoch, the router's word is taken (and checked in debug builds).
    routed.found = vec![Found::Bound { oneid: p, epoch: 1 }];
    routed.target = Target::Existing(p);
    assert_eq!(h.send(routed), applied(p, &[]));
}

/// No sequence of events binds a blocked value, or files one to be bound elsewhere: random
/// events over a small pool of values (some blocked, by the defaults, by a global list, by a
/// kind's list) against random targets, with identities of "other shards" and their binds
/// finished or taken at random.
#[test]
#[allow(clippy::too_many_lines)]
fn no_sequence_of_events_binds_a_blocked_value() {
    let policies = [
        PLAIN,
        r#"{"identity": {"blocked_values": {"exact": ["x0"], "patterns": ["^z"]},
            "kinds": {"email": {"blocked_values": {"exact": ["e1"]}, "max_per_profile": 2},
                      "device_id": {"merge": false}}}}"#,
    ];
    let pool = [
        "0", "unknown", "x0", "x1", "z9", "e1", "e2", "NULL", "7", "8",
    ];
    let kinds = ["phone", "email", "device_id", "member_card"];
    for seed in 0..40 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut h = Harness::new(policies[seed as usize % 2]);
        let blocks = h.state.rules().identity.block_list();
        for step in 0..60 {
            let mut identities = serde_json::Map::new();
            for _ in 0..rng.gen_range(1..4) {
                let kind = kinds[rng.gen_range(0..kinds.len())];
                identities.insert(kind.into(), json!(pool[rng.gen_range(0..pool.len())]));
            }
            let elsewhere: Vec<Identity> = (0..rng.gen_range(0..3))
                .map(|_| identity(kinds[rng.gen_range(0..4)], pool[rng.gen_range(0..10)]))
                .collect();
            let json = json!({"event_id": format!("e{step}"), "type": "identify",
                "identities": identities});
            let profiles = h.state.record.profile_seq;
            let routed = if profiles > 0 && rng.gen_bool(0.3) {
                on(id(rng.gen_range(1..=profiles)), json)
            } else {
                claim(json)
            };
            h.events(vec![with_elsewhere(routed, &elsewhere)]);
            if rng.gen_bool(0.5) {
                let answers = follow_up_records(&h)
                    .into_iter()
                    .map(|(seq, _)| FollowUpAnswer {
                        seq,
                        outcome: if rng.gen_bool(0.8) {
                            BindOutcome::Bound
                        } else {
                            BindOutcome::Conflict(id(99))
                        },
                    })
                    .collect();
                h.apply(Command::FinishFollowUps(answers));
            }
            let bound_blocked =
                h.mem
                    .0
                    .keys()
                    .filter(|key| key.first() == Some(&b'i'))
                    .any(|key| {
                        let text = String::from_utf8_lossy(&key[1..]).into_owned();
                        let (kind, value) = text.split_once('\0').expect("kind 0x00 value");
                        blocks.blocks(&identity(kind, value))
                    });
            let pending_blocked = follow_up_records(&h)
                .iter()
                .any(|(_, record)| blocks.blocks(&record.identity));
            assert!(
                !bound_blocked && !pending_blocked,
                "seed {seed} step {step}: a blocked value was bound"
            );
            for p in 1..=h.state.record.profile_seq {
                let profile = h.profile(id(p));
                for (kind, values) in &profile.identities {
                    for value in values {
                        assert!(
                            !blocks.blocks(&identity(kind, value)),
                            "seed {seed} step {step}: {kind} {value} listed on {}",
                            id(p)
                        );
                    }
                }
                if seed % 2 == 1 {
                    let emails = profile.identities.get("email").map_or(0, BTreeSet::len);
                    assert!(emails <= 2, "seed {seed} step {step}: {emails} emails");
                }
            }
        }
    }
}

/// The audit, page by page at any page size, counts what the policy in force refuses among
/// what was stored before it: over-limit profiles and bound blocked values, per kind.
#[test]
fn the_audit_reports_what_a_new_policy_refuses_among_what_is_stored() {
    use crate::audit::{audit_page, AuditPage, KindAudit};
    let mut h = Harness::new(PLAIN);
    let legacy = |event_id: &str, identities: Json| LegacyRouted {
        event: event(&json!({"event_id": event_id, "type": "identify", "identities": identities})),
        target: Target::Claim,
        link_elsewhere: vec![],
        bound: vec![],
    };
    // Before the policy: placeholders bound, and a profile with two cards.
    h.apply(Command::LegacyEvents9(vec![
        legacy("e1", json!({"phone": "unknown", "member_card": "M1"})),
        legacy("e2", json!({"email": "NULL"})),
    ]));
    h.ok(on(
        id(1),
        json!({"event_id": "e3", "type": "identify", "identities": {"member_card": "M2"}}),
    ));
    h.ok(identify(
        "e4",
        json!({"member_card": "M3", "device_id": "D"}),
    ));
    h.apply(Command::InstallRules {
        version: 1,
        rules: Box::new(rules(POLICY)),
    });
    let kinds = |entries: &[(&str, u64, u64)]| -> BTreeMap<String, KindAudit> {
        entries
            .iter()
            .map(|(kind, over_limit, blocked_bound)| {
                let audit = KindAudit {
                    over_limit: *over_limit,
                    blocked_bound: *blocked_bound,
                };
                (kind.to_string(), audit)
            })
            .collect()
    };
    let want = kinds(&[
        ("device_id", 0, 0),
        ("email", 0, 1),
        ("member_card", 1, 0),
        ("phone", 0, 1),
    ]);
    for limit in [1, 2, 3, 7, 10_000] {
        let mut total = AuditPage::default();
        let mut after: Option<Vec<u8>> = None;
        for _ in 0..100 {
            let page = audit_page(&h.mem, after.as_deref(), limit);
            total.add(&page);
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        assert_eq!(after, None, "page size {limit}: the audit ends");
        assert_eq!(total.kinds, want, "page size {limit}");
    }
}
