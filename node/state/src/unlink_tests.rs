//! Unlink across shards, folded without I/O: an identity bound on the profile's own shard and
//! one bound on another, the unbind follow-up, events dated before the unlink, events routed
//! by the binding it removes, and the bound on what a profile remembers.

use super::saga_tests::Cluster;
use super::tests::{event, not_linked};
use super::unlink::{UnlinkRecord, UNLINKED_PER_PROFILE_MAX};
use super::*;
use crate::command::{Found, Routed};
use oneid_protocol::api::NotLinkedReason::Unlinked;
use serde_json::{json, Value as Json};

/// An identity of `kind` that shard `shard` of 4 holds.
fn on_shard(kind: &str, shard: u32) -> Identity {
    (0..)
        .map(|i| Identity {
            kind: kind.into(),
            value: format!("{kind}-{i}"),
        })
        .find(|identity| identity.shard(4) == ShardId(shard))
        .expect("some value hashes to every shard")
}

/// `seconds` (under an hour) after the clusters' time, 2026-01-01T00:00:00Z, as events write it.
fn ts(seconds: i64) -> String {
    assert_eq!(tests::T0, 1_767_225_600_000, "T0 is 2026-01-01T00:00:00Z");
    format!("2026-01-01T00:{:02}:{:02}Z", seconds / 60, seconds % 60)
}

fn identities(of: &[&Identity]) -> Json {
    of.iter()
        .map(|id| (id.kind.clone(), json!(id.value)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// An event as routed to `target`, with what the router found of each identity and those it
/// asks to link elsewhere.
fn routed(json: Json, target: Target, found: Vec<Found>, elsewhere: &[&Identity]) -> Routed {
    Routed {
        event: event(&json),
        target,
        rules_version: 0,
        link_elsewhere: elsewhere.iter().map(|id| (*id).clone()).collect(),
        found,
    }
}

/// Applies one routed event at `shard`: its outcome and the follow-ups it left.
fn send(c: &mut Cluster, shard: ShardId, routed: Routed) -> (EventOutcome, Vec<FollowUp>) {
    let Output::Events {
        mut outcomes,
        follow_ups,
    } = c.apply(shard, Command::Events(vec![routed]))
    else {
        panic!("events answered otherwise")
    };
    (outcomes.remove(0), follow_ups)
}

/// Binds or unbinds each follow-up at its identity's shard, then finishes it.
fn finish(c: &mut Cluster, follow_ups: Vec<FollowUp>) {
    for follow_up in follow_ups {
        let pair = vec![(follow_up.identity.clone(), follow_up.oneid)];
        let command = if follow_up.unbind {
            Command::Unbind(pair)
        } else {
            Command::Bind(pair)
        };
        let Output::Bind(outcomes) = c.apply(follow_up.identity.shard(4), command) else {
            panic!("a bind answered otherwise")
        };
        let answer = FollowUpAnswer {
            seq: follow_up.seq,
            outcome: outcomes[0],
        };
        c.apply(
            follow_up.oneid.shard(),
            Command::FinishFollowUps(vec![answer]),
        );
    }
}

fn unlink_record(c: &Cluster, oneid: OneId, identity: &Identity) -> Option<UnlinkRecord> {
    c.get(oneid.shard(), &keys::unlinked(oneid, identity))
}

fn profile(c: &Cluster, oneid: OneId) -> profile::Profile {
    c.profiles()
        .into_iter()
        .find(|p| p.oneid == oneid)
        .expect("live")
}

/// A customer with a phone and a WeChat unionid held by shard 0 and an email held by shard 1:
/// its OneID (on shard 0), and the three.
fn customer(c: &mut Cluster) -> (OneId, Identity, Identity, Identity) {
    let (phone, wechat, email) = (
        on_shard("phone", 0),
        on_shard("wechat_unionid", 0),
        on_shard("email", 1),
    );
    let claim = routed(
        json!({"event_id": "e1", "type": "identify", "ts": ts(0),
            "identities": identities(&[&phone, &wechat, &email])}),
        Target::Claim,
        vec![Found::Unbound; 3],
        &[&email],
    );
    let (outcome, follow_ups) = send(c, ShardId(0), claim);
    let EventOutcome::Applied(x, _) = outcome else {
        panic!("{outcome:?}")
    };
    finish(c, follow_ups);
    assert_eq!(c.binding(&email), Some(x));
    (x, phone, wechat, email)
}

#[test]
#[allow(clippy::too_many_lines)]
fn an_unlink_frees_identities_on_every_shard_and_older_events_never_bind_them_back() {
    let mut c = Cluster::new(4);
    let (x, phone, wechat, email) = customer(&mut c);
    let epochs = |c: &Cluster| {
        (
            c.shards[0].state.record.binding_epoch,
            c.shards[1].state.record.binding_epoch,
        )
    };
    let before = epochs(&c);

    // The phone (held by the profile's shard) is unbound in the apply; the email (shard 1)
    // by the unbind follow-up it leaves.
    let unlink = routed(
        json!({"event_id": "u1", "type": "unlink", "oneid": x.to_string(), "ts": ts(10),
            "identities": identities(&[&phone, &email])}),
        Target::Existing(x),
        vec![Found::Unbound; 2],
        &[],
    );
    let (outcome, follow_ups) = send(&mut c, ShardId(0), unlink.clone());
    assert_eq!(outcome, EventOutcome::Applied(x, vec![]));
    assert_eq!(
        follow_ups,
        vec![FollowUp {
            seq: 2,
            oneid: x,
            identity: email.clone(),
            unbind: true,
        }]
    );
    let held = profile(&c, x).identities;
    assert_eq!(
        held,
        [(wechat.kind.clone(), [wechat.value.clone()].into())].into()
    );
    assert_eq!(c.binding(&phone), None);
    assert_eq!(c.binding(&email), Some(x));
    assert_eq!(epochs(&c), (before.0 + 1, before.1));
    let at = Millis(tests::T0 + 10_000);
    assert_eq!(
        unlink_record(&c, x, &email),
        Some(UnlinkRecord {
            at,
            unbinding: true
        })
    );

    // Before the unbind lands, an event the email's binding routed to the profile goes again.
    let stale = routed(
        json!({"event_id": "e2", "type": "points_earn", "points": 5, "ts": ts(20),
            "identities": identities(&[&email])}),
        Target::Existing(x),
        vec![Found::Bound { oneid: x, epoch: 0 }],
        &[],
    );
    let (outcome, _) = send(&mut c, ShardId(0), stale.clone());
    let EventOutcome::Rejected(error) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(error.code, ErrorCode::Unavailable);

    finish(&mut c, follow_ups);
    assert_eq!(c.binding(&email), None);
    assert_eq!(epochs(&c), (before.0 + 1, before.1 + 1));
    assert_eq!(
        unlink_record(&c, x, &email),
        Some(UnlinkRecord {
            at,
            unbinding: false
        })
    );
    assert_eq!(c.shards[0].state.record.follow_ups_pending, 0);
    // A router that read the binding before the unlink still sends it again.
    let (outcome, _) = send(&mut c, ShardId(0), stale);
    assert!(matches!(outcome, EventOutcome::Rejected(e) if e.code == ErrorCode::Unavailable));

    // An event dated before the unlink, naming the profile and both values, applies without
    // binding either back.
    let older = routed(
        json!({"event_id": "e3", "type": "points_earn", "points": 1, "ts": ts(5),
            "oneid": x.to_string(), "identities": identities(&[&phone, &email])}),
        Target::Existing(x),
        vec![Found::Unbound; 2],
        &[&email],
    );
    let (outcome, follow_ups) = send(&mut c, ShardId(0), older);
    assert_eq!(
        outcome,
        EventOutcome::Applied(
            x,
            vec![
                not_linked(&email.kind, &email.value, Unlinked),
                not_linked(&phone.kind, &phone.value, Unlinked),
            ]
        )
    );
    assert_eq!((follow_ups, c.binding(&phone)), (vec![], None));

    // The retry of the unlink is a duplicate.
    let (outcome, _) = send(&mut c, ShardId(0), unlink);
    assert_eq!(outcome, EventOutcome::Duplicate(x));

    // A later event naming the phone alone binds it afresh: a new customer.
    let fresh = routed(
        json!({"event_id": "e4", "type": "identify", "ts": ts(30),
            "identities": identities(&[&phone])}),
        Target::Claim,
        vec![Found::Unbound],
        &[],
    );
    let (outcome, _) = send(&mut c, ShardId(0), fresh);
    let EventOutcome::Applied(y, _) = outcome else {
        panic!("{outcome:?}")
    };
    assert_ne!(y, x);
    assert_eq!(c.binding(&phone), Some(y));

    // And a later event naming the first profile and the email links it back, as asked.
    let relink = routed(
        json!({"event_id": "e5", "type": "identify", "ts": ts(40),
            "oneid": x.to_string(), "identities": identities(&[&email])}),
        Target::Existing(x),
        vec![Found::Unbound],
        &[&email],
    );
    let (outcome, follow_ups) = send(&mut c, ShardId(0), relink);
    assert_eq!(outcome, EventOutcome::Applied(x, vec![]));
    finish(&mut c, follow_ups);
    assert_eq!(c.binding(&email), Some(x));
    assert!(profile(&c, x).holds(&email));
    // Points: the earn of e3 alone; an unlink moves none.
    assert_eq!(profile(&c, x).balance, 1);

    // An unlink sent late, dated before the first, keeps what the first forbids.
    let late = routed(
        json!({"event_id": "u2", "type": "unlink", "oneid": x.to_string(), "ts": ts(5),
            "identities": identities(&[&email])}),
        Target::Existing(x),
        vec![Found::Unbound],
        &[],
    );
    let (outcome, follow_ups) = send(&mut c, ShardId(0), late);
    assert_eq!(outcome, EventOutcome::Applied(x, vec![]));
    finish(&mut c, follow_ups);
    assert_eq!(
        unlink_record(&c, x, &email),
        Some(UnlinkRecord {
            at,
            unbinding: false
        })
    );
}

#[test]
fn an_unlink_of_an_identity_the_profile_does_not_hold_changes_nothing() {
    let mut c = Cluster::new(4);
    let (x, phone, _, _) = customer(&mut c);
    let stranger = on_shard("phone", 2);
    let before: Vec<_> = c.shards.iter().map(|s| s.mem.0.clone()).collect();
    let unlink = routed(
        json!({"event_id": "u1", "type": "unlink", "oneid": x.to_string(), "ts": ts(10),
            "identities": identities(&[&stranger])}),
        Target::Existing(x),
        vec![Found::Unbound],
        &[],
    );
    let (outcome, follow_ups) = send(&mut c, ShardId(0), unlink);
    let EventOutcome::Rejected(error) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        (error.code, error.field.as_deref(), follow_ups),
        (ErrorCode::NotFound, Some("identities.phone"), vec![])
    );
    let after: Vec<_> = c.shards.iter().map(|s| s.mem.0.clone()).collect();
    assert_eq!(
        after.iter().map(|m| m.len()).collect::<Vec<_>>(),
        before.iter().map(|m| m.len()).collect::<Vec<_>>()
    );
    for (before, after) in before.iter().zip(&after) {
        let pairs = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
            m.iter()
                .filter(|(k, _)| k.as_slice() != keys::META)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(pairs(before), pairs(after));
    }
    assert_eq!(c.binding(&phone), Some(x));
}

#[test]
fn a_profile_remembers_its_newest_unlinks_up_to_the_limit() {
    let mut c = Cluster::new(4);
    let (x, ..) = customer(&mut c);
    let n = UNLINKED_PER_PROFILE_MAX + 3;
    for i in 0..n {
        let card = Identity {
            kind: "member_card".into(),
            value: format!("m{i}"),
        };
        let here = card.shard(4) == ShardId(0);
        let elsewhere: &[&Identity] = if here { &[] } else { &[&card] };
        let seconds = i64::try_from(i).unwrap();
        let link = routed(
            json!({"event_id": format!("l{i}"), "type": "identify", "ts": ts(seconds),
                "oneid": x.to_string(), "identities": identities(&[&card])}),
            Target::Existing(x),
            vec![Found::Unbound],
            elsewhere,
        );
        let (outcome, follow_ups) = send(&mut c, ShardId(0), link);
        assert_eq!(outcome, EventOutcome::Applied(x, vec![]));
        finish(&mut c, follow_ups);
        let unlink = routed(
            json!({"event_id": format!("u{i}"), "type": "unlink", "ts": ts(seconds),
                "oneid": x.to_string(), "identities": identities(&[&card])}),
            Target::Existing(x),
            vec![Found::Unbound],
            &[],
        );
        let (outcome, follow_ups) = send(&mut c, ShardId(0), unlink);
        assert_eq!(outcome, EventOutcome::Applied(x, vec![]));
        finish(&mut c, follow_ups);
        assert_eq!(c.binding(&card), None);
    }
    let remembered: Vec<String> = c.shards[0]
        .mem
        .0
        .keys()
        .filter(|k| k.starts_with(&keys::unlinked_prefix(x)))
        .map(|k| keys::unlinked_identity(k).value)
        .collect();
    assert_eq!(remembered.len(), UNLINKED_PER_PROFILE_MAX);
    for forgotten in ["m0", "m1", "m2"] {
        assert!(!remembered.contains(&forgotten.to_string()));
    }
}
