//! The typed client against a real node: one event of every type, written as the protocol's
//! wire types (`NewEvent`), applies exactly as the same events written as JSON by hand (the
//! README's form) do, and reads back as an exact profile and ledger.

use oneid_client::protocol::wire::{
    Attribute, EventKind, Interaction, NewEvent, Order, PointsAdjust, PointsEarn, PointsRedeem,
    ProfileUpdate, Refund, TagAdd, TagRemove,
};
use oneid_client::protocol::{Decimal, OffsetDateTime};
use oneid_protocol::api::{EventStatus, ProfileDoc};
use oneid_tests::{NodeOptions, TestNode};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const RULES: &str = r#"
[rules.points]
per_currency_unit = "1"
channel_multipliers = { douyin = "1.5" }

[rules.tiers]
levels = [
  { name = "member", min_spend = "0" },
  { name = "silver", min_spend = "1000" },
]
"#;

/// Event `n` of the test happened `n` minutes after a base a day ago (whole seconds).
fn at(base: i64, n: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(base + 60 * n).expect("in range")
}

fn text(ts: OffsetDateTime) -> String {
    oneid_protocol::num::Millis(ts.unix_timestamp() * 1000).to_string()
}

/// One event of each type for the customer with phone `phone`, typed.
#[allow(clippy::too_many_lines)]
fn typed_events(prefix: &str, phone: &str, base: i64) -> Vec<NewEvent> {
    let event = |n: i64, kind| {
        NewEvent::new(format!("{prefix}-{n}"), kind)
            .identity("phone", phone)
            .at(at(base, n))
    };
    let attributes: BTreeMap<String, Option<Attribute>> = [
        ("age", Some(Attribute::from(Decimal::new(305, 1)))),
        ("city", Some(Attribute::from("Hangzhou"))),
        ("opted_in", Some(Attribute::from(true))),
        ("nickname", None),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect();
    vec![
        event(
            1,
            EventKind::Order(Order {
                order_id: "T1".into(),
                amount: Decimal::new(120_000, 2),
                store: Some("hz-01".into()),
            }),
        )
        .identity("wechat_unionid", format!("u-{phone}"))
        .channel("tmall"),
        event(
            2,
            EventKind::Refund(Refund {
                order_id: "T1".into(),
                amount: Some(Decimal::new(10_000, 2)),
            }),
        ),
        event(
            3,
            EventKind::PointsEarn(PointsEarn {
                points: 50,
                reason: Some("welcome".into()),
                expires_at: Some(at(base, 60 * 24 * 30)),
            }),
        ),
        event(
            4,
            EventKind::PointsRedeem(PointsRedeem {
                points: 30,
                reason: Some("coupon".into()),
            }),
        ),
        event(
            5,
            EventKind::PointsAdjust(PointsAdjust {
                points: -5,
                reason: "fix".into(),
            }),
        ),
        event(
            6,
            EventKind::TagAdd(TagAdd {
                tag: "vip".into(),
                expires_at: None,
            }),
        ),
        event(
            7,
            EventKind::TagAdd(TagAdd {
                tag: "trial".into(),
                expires_at: Some(at(base, 60 * 24 * 30)),
            }),
        ),
        event(8, EventKind::TagRemove(TagRemove { tag: "vip".into() })),
        event(9, EventKind::ProfileUpdate(ProfileUpdate { attributes })),
        event(10, EventKind::Identify).identity("member_card", format!("M-{phone}")),
        event(
            11,
            EventKind::Interaction(Interaction {
                name: "view".into(),
                properties: Some(json!({"sku": "A1"}).as_object().expect("an object").clone()),
            }),
        )
        .channel("douyin"),
    ]
}

/// The same events, written as JSON by hand.
fn json_events(prefix: &str, phone: &str, base: i64) -> Vec<Value> {
    let event = |n: i64, fields: Value| {
        let mut event = json!({"event_id": format!("{prefix}-{n}"),
            "identities": {"phone": phone}, "ts": text(at(base, n))});
        let object = event.as_object_mut().expect("an object");
        for (key, value) in fields.as_object().expect("an object") {
            if key == "identities" {
                let identities = object["identities"].as_object_mut().expect("an object");
                identities.extend(value.as_object().expect("an object").clone());
            } else {
                object.insert(key.clone(), value.clone());
            }
        }
        event
    };
    let expires = text(at(base, 60 * 24 * 30));
    vec![
        event(
            1,
            json!({"type": "order", "order_id": "T1", "amount": "1200.00", "store": "hz-01",
            "identities": {"wechat_unionid": format!("u-{phone}")}, "channel": "tmall"}),
        ),
        event(
            2,
            json!({"type": "refund", "order_id": "T1", "amount": 100}),
        ),
        event(
            3,
            json!({"type": "points_earn", "points": 50, "reason": "welcome", "expires_at": expires}),
        ),
        event(
            4,
            json!({"type": "points_redeem", "points": 30, "reason": "coupon"}),
        ),
        event(
            5,
            json!({"type": "points_adjust", "points": -5, "reason": "fix"}),
        ),
        event(6, json!({"type": "tag_add", "tag": "vip"})),
        event(
            7,
            json!({"type": "tag_add", "tag": "trial", "expires_at": expires}),
        ),
        event(8, json!({"type": "tag_remove", "tag": "vip"})),
        event(
            9,
            json!({"type": "profile_update", "attributes":
            {"age": 30.5, "city": "Hangzhou", "opted_in": true, "nickname": null}}),
        ),
        event(
            10,
            json!({"type": "identify", "identities": {"member_card": format!("M-{phone}")}}),
        ),
        event(
            11,
            json!({"type": "interaction", "name": "view", "properties": {"sku": "A1"},
            "channel": "douyin"}),
        ),
    ]
}

/// A profile document without what differs between two customers: their ids, identities,
/// and version (an identity held by another shard than the profile's is bound by a follow-up,
/// which counts as a change of the profile: the values decide the shards).
fn anonymous(doc: &ProfileDoc) -> Value {
    let mut value = serde_json::to_value(doc).expect("serializes");
    for key in ["oneid", "identities", "version"] {
        value.as_object_mut().expect("an object").remove(key);
    }
    value
}

#[tokio::test]
#[allow(clippy::too_many_lines)]
async fn every_typed_event_applies_as_its_json_does_and_reads_back_exactly() {
    let node = TestNode::start(NodeOptions {
        extra: RULES.into(),
        ..NodeOptions::default()
    })
    .await;
    let client = node.client_once();
    let base = OffsetDateTime::now_utc().unix_timestamp() - 86_400;

    // Typed and hand-written events go one at a time: each depends on the ones before.
    for event in typed_events("typed", "13800000001", base) {
        let answer = client.send_events(&[event]).await.expect("typed events");
        assert_eq!(answer.results[0].status, EventStatus::Applied, "{answer:?}");
    }
    for event in json_events("json", "13800000002", base) {
        let answer = client
            .send_events_json(&[event])
            .await
            .expect("JSON events");
        assert_eq!(answer.results[0].status, EventStatus::Applied, "{answer:?}");
    }
    let typed = client
        .lookup("phone", "13800000001")
        .await
        .unwrap()
        .unwrap();
    let by_hand = client
        .lookup("phone", "13800000002")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(anonymous(&typed), anonymous(&by_hand));

    // An unlink names its profile by OneID, known only now: typed, and by hand.
    let unlink = NewEvent::new("typed-12", EventKind::Unlink)
        .oneid(typed.oneid.clone())
        .identity("member_card", "M-13800000001")
        .at(at(base, 12));
    let by_hand_unlink = json!({"event_id": "json-12", "type": "unlink", "oneid": by_hand.oneid,
        "identities": {"member_card": "M-13800000002"}, "ts": text(at(base, 12))});
    for answer in [
        client.send_events(&[unlink]).await,
        client.send_events_json(&[by_hand_unlink]).await,
    ] {
        let answer = answer.expect("unlink");
        assert_eq!(answer.results[0].status, EventStatus::Applied, "{answer:?}");
    }
    let typed = client.profile(&typed.oneid).await.unwrap().unwrap();
    let by_hand = client.profile(&by_hand.oneid).await.unwrap().unwrap();
    assert_eq!(anonymous(&typed), anonymous(&by_hand));
    assert_eq!(
        client.lookup("member_card", "M-13800000001").await.unwrap(),
        None
    );

    // And exactly: 1200 points for the order, 100 back for the refund, +50 −30 −5.
    let identities = |phone: &str, union: &str| {
        BTreeMap::from([
            ("phone".to_string(), vec![phone.to_string()]),
            ("wechat_unionid".to_string(), vec![union.to_string()]),
        ])
    };
    assert_eq!(typed.identities, identities("13800000001", "u-13800000001"));
    let exact = json!({
        "attributes": {"age": 30.5, "city": "Hangzhou", "opted_in": true},
        "points": {"balance": 1115, "lifetime_earned": 1250, "lifetime_redeemed": 30},
        "tier": "silver",
        "tags": ["trial"],
        "metrics": {"order_count": 1, "total_spend": "1100.00", "spend_365d": "1100.00",
            "first_order_at": text(at(base, 1)), "last_order_at": text(at(base, 1)),
            "last_order_on": {"tmall": text(at(base, 1))}},
        "channels": {"douyin": text(at(base, 11)), "tmall": text(at(base, 1))},
        "created_at": text(at(base, 1)),
        "updated_at": text(at(base, 12)),
    });
    let got = anonymous(&typed);
    for (key, expected) in exact.as_object().expect("an object") {
        assert_eq!(&got[key], expected, "{key}");
    }

    let ledger = client.ledger(&typed.oneid, None, None).await.unwrap();
    let entries: Vec<(String, String, i64, i64)> = ledger
        .entries
        .iter()
        .map(|e| {
            (
                e.event_id.clone(),
                e.kind.clone(),
                e.points,
                e.balance_after,
            )
        })
        .collect();
    let entry = |n: u32, kind: &str, points: i64, after: i64| {
        (format!("typed-{n}"), kind.to_string(), points, after)
    };
    assert_eq!(
        entries,
        vec![
            entry(5, "adjust", -5, 1115),
            entry(4, "redeem", -30, 1120),
            entry(3, "earn", 50, 1150),
            entry(2, "reverse", -100, 1100),
            entry(1, "earn", 1200, 1200),
        ]
    );
}
