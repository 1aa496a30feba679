//! Identity resolution: concurrent first sightings, one customer seen several times in a batch,
//! links across shards, the identity limit, and identities after kill -9.

use oneid_client::Client;
use oneid_protocol::api::{EventStatus, EventsResponse, NotLinked, NotLinkedReason, ProfileDoc};
use oneid_protocol::ids::OneId;
use oneid_protocol::ErrorCode;
use oneid_tests::{NodeOptions, TestNode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const SHARDS: u32 = 4;

fn shard_of(kind: &str, value: &str) -> u32 {
    oneid_tests::shard_of(kind, value, SHARDS)
}

fn shard_of_oneid(oneid: &str) -> u32 {
    oneid.parse::<OneId>().expect("a OneID").shard().0
}

/// The first `{prefix}{n}` whose identity of `kind` is held by `shard`.
fn value_on_shard(kind: &str, prefix: &str, shard: u32) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|v| shard_of(kind, v) == shard)
        .expect("some value lands on every shard")
}

async fn send(client: &Client, events: &[Value]) -> EventsResponse {
    let answer = client
        .send_events_json(events)
        .await
        .expect("POST /v1/events");
    assert_eq!(answer.results.len(), events.len(), "{answer:?}");
    answer
}

/// The identities of a profile as (kind, value) pairs.
fn identities(doc: &ProfileDoc) -> BTreeSet<(String, String)> {
    doc.identities
        .iter()
        .flat_map(|(kind, values)| values.iter().map(move |v| (kind.clone(), v.clone())))
        .collect()
}

async fn lookup(client: &Client, kind: &str, value: &str) -> Option<ProfileDoc> {
    client.lookup(kind, value).await.expect("lookup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sightings_of_a_phone_make_one_profile() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let phone = "13811112222";
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let client = client.clone();
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                let event = json!({"event_id": format!("cf-{n}"), "type": "order",
                    "identities": {"phone": phone}, "order_id": format!("CF{n}"),
                    "amount": "10.00", "channel": "store"});
                start.wait().await;
                send(&client, &[event]).await.results.remove(0)
            })
        })
        .collect();
    let mut oneids = BTreeSet::new();
    for (n, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        assert_eq!(result.event_id, format!("cf-{n}"));
        assert_eq!(result.status, EventStatus::Applied, "{result:?}");
        oneids.insert(result.oneid.expect("applied events name their profile"));
    }
    assert_eq!(oneids.len(), 1, "one customer, one OneID: {oneids:?}");
    let oneid = oneids.into_iter().next().unwrap();
    let doc = lookup(&client, "phone", phone)
        .await
        .expect("the phone is bound");
    assert_eq!(doc.oneid, oneid);
    assert_eq!(
        (
            doc.metrics.order_count,
            doc.metrics.total_spend.as_str(),
            doc.points.balance,
            doc.points.lifetime_earned,
            doc.version
        ),
        (8, "80.00", 80, 80, 8)
    );
    assert_eq!(identities(&doc).len(), 1);
    let ledger = client.ledger(&oneid, None, None).await.unwrap();
    assert_eq!(ledger.entries.len(), 8);
    assert_eq!(
        ledger
            .entries
            .iter()
            .map(|e| e.event_id.clone())
            .collect::<BTreeSet<_>>(),
        (0..8).map(|n| format!("cf-{n}")).collect::<BTreeSet<_>>()
    );
}

/// Eight channels report the same new customer at once, each with the shared phone and an id
/// of its own held by some shard: one customer, one OneID, every id on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sightings_with_their_own_ids_make_one_profile() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let phone = "13833334444";
    // Ids on every shard, sorting before "phone" so each event's first identity is its own.
    let emails: Vec<String> = (0..8)
        .map(|n| value_on_shard("email", &format!("c{n}-"), n % SHARDS))
        .collect();
    let start = Arc::new(tokio::sync::Barrier::new(emails.len()));
    let tasks: Vec<_> = emails
        .iter()
        .enumerate()
        .map(|(n, email)| {
            let client = client.clone();
            let start = Arc::clone(&start);
            let event = json!({"event_id": format!("co-{n}"), "type": "order",
                "identities": {"phone": phone, "email": email}, "order_id": format!("CO{n}"),
                "amount": "10.00"});
            tokio::spawn(async move {
                start.wait().await;
                send(&client, &[event]).await.results.remove(0)
            })
        })
        .collect();
    let mut oneids = BTreeMap::new();
    for (n, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        assert_eq!(result.status, EventStatus::Applied, "{result:?}");
        oneids.insert(n, result.oneid.unwrap());
    }
    let by_phone = lookup(&client, "phone", phone).await.unwrap();
    assert!(
        oneids.values().all(|o| *o == by_phone.oneid),
        "events of one customer answered several OneIDs: {oneids:?}; the phone is on {} with {} orders",
        by_phone.oneid,
        by_phone.metrics.order_count
    );
    assert_eq!(by_phone.metrics.order_count, 8);
    for email in &emails {
        assert_eq!(
            lookup(&client, "email", email).await.unwrap().oneid,
            by_phone.oneid
        );
    }
    assert_eq!(identities(&by_phone).len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_new_customer_three_times_in_a_batch_gets_one_oneid() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let phone = "13855556666";
    // The email on another shard than the phone, so the batch crosses shards.
    let email = (0..)
        .map(|n| format!("batch{n}@example.com"))
        .find(|v| shard_of("email", v) != shard_of("phone", phone))
        .unwrap();
    let answer = send(
        &client,
        &[
            json!({"event_id": "b-1", "type": "order", "identities": {"phone": phone},
                "order_id": "B1", "amount": "10.00"}),
            json!({"event_id": "b-2", "type": "points_earn",
                "identities": {"phone": phone, "email": email}, "points": 5}),
            json!({"event_id": "b-3", "type": "tag_add", "identities": {"email": email},
                "tag": "seen_thrice"}),
        ],
    )
    .await;
    assert_eq!(
        (answer.applied, answer.duplicates, answer.rejected),
        (3, 0, 0),
        "{answer:?}"
    );
    let oneid = answer.results[0].oneid.clone().unwrap();
    for result in &answer.results {
        assert_eq!(result.oneid.as_deref(), Some(oneid.as_str()), "{result:?}");
    }
    let by_phone = lookup(&client, "phone", phone).await.unwrap();
    let by_email = lookup(&client, "email", &email).await.unwrap();
    assert_eq!(by_phone, by_email);
    assert_eq!(by_phone.oneid, oneid);
    assert_eq!(
        by_phone.identities,
        BTreeMap::from([
            ("email".to_string(), vec![email.clone()]),
            ("phone".to_string(), vec![phone.to_string()]),
        ])
    );
    assert_eq!(
        (
            by_phone.metrics.order_count,
            by_phone.points.balance,
            by_phone.tags.clone()
        ),
        (1, 15, vec!["seen_thrice".to_string()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_customer_keeps_request_order_across_waves() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    // An existing customer, known by phone 3.
    let first = send(
        &client,
        &[json!({"event_id": "x-0", "type": "identify", "identities": {"phone": "3"}})],
    )
    .await;
    let x = first.results[0].oneid.clone().unwrap();
    // Each redeem needs every earn before it: applied out of order, it would be refused.
    let answer = send(
        &client,
        &[
            // A new customer, then again with a new email, then by that email only.
            json!({"event_id": "a-1", "type": "points_earn", "identities": {"phone": "1"}, "points": 100}),
            json!({"event_id": "a-2", "type": "points_earn",
                "identities": {"phone": "1", "email": "a@example.com"}, "points": 50}),
            json!({"event_id": "a-3", "type": "points_redeem",
                "identities": {"email": "a@example.com"}, "points": 150}),
            // Unrelated: nothing to wait for.
            json!({"event_id": "b-1", "type": "points_earn", "identities": {"phone": "2"}, "points": 7}),
            // The existing customer with a new unionid, then by the unionid only (which the
            // router cannot know is theirs yet), then by phone.
            json!({"event_id": "x-1", "type": "points_earn",
                "identities": {"phone": "3", "wechat_unionid": "w"}, "points": 100}),
            json!({"event_id": "x-2", "type": "points_earn",
                "identities": {"wechat_unionid": "w"}, "points": 20}),
            json!({"event_id": "x-3", "type": "points_redeem",
                "identities": {"phone": "3"}, "points": 120}),
        ],
    )
    .await;
    assert_eq!(
        (answer.applied, answer.duplicates, answer.rejected),
        (7, 0, 0),
        "{answer:?}"
    );
    let oneids: Vec<String> = answer
        .results
        .iter()
        .map(|r| r.oneid.clone().unwrap())
        .collect();
    let a = oneids[0].clone();
    assert_eq!(&oneids[..3], [a.clone(), a.clone(), a.clone()]);
    assert_eq!(&oneids[4..], [x.clone(), x.clone(), x.clone()]);
    for (kind, value, oneid, balance) in [
        ("phone", "1", &a, 0),
        ("email", "a@example.com", &a, 0),
        ("phone", "2", &oneids[3], 7),
        ("wechat_unionid", "w", &x, 0),
    ] {
        let doc = lookup(&client, kind, value).await.unwrap();
        assert_eq!(
            (&doc.oneid, doc.points.balance),
            (oneid, balance),
            "{kind} {value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn identify_links_identities_held_by_every_shard() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let phone = "13877778888";
    let created = send(
        &client,
        &[
            json!({"event_id": "l-1", "type": "order", "identities": {"phone": phone},
            "order_id": "L1", "amount": "66.00"}),
        ],
    )
    .await;
    let oneid = created.results[0].oneid.clone().unwrap();
    let home = shard_of_oneid(&oneid);
    assert_eq!(
        home,
        shard_of("phone", phone),
        "claimed at the phone's shard"
    );
    // Five kinds, one on each shard and one more on the profile's own.
    let kinds = [
        "email",
        "wechat_unionid",
        "taobao_nick",
        "douyin_openid",
        "member_card",
    ];
    let linked: Vec<(String, String)> = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let shard = (home + i as u32) % SHARDS;
            (kind.to_string(), value_on_shard(kind, "link-", shard))
        })
        .collect();
    assert_eq!(
        linked
            .iter()
            .map(|(k, v)| shard_of(k, v))
            .collect::<BTreeSet<_>>()
            .len(),
        SHARDS as usize,
        "the identities cover every shard"
    );
    let map: serde_json::Map<String, Value> = linked
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let answer = send(
        &client,
        &[json!({"event_id": "l-2", "type": "identify", "oneid": oneid, "identities": map})],
    )
    .await;
    assert_eq!(answer.results[0].status, EventStatus::Applied, "{answer:?}");
    assert_eq!(answer.results[0].oneid.as_deref(), Some(oneid.as_str()));

    let doc = client.profile(&oneid).await.unwrap().unwrap();
    let mut expected: BTreeSet<(String, String)> = linked.iter().cloned().collect();
    expected.insert(("phone".into(), phone.into()));
    assert_eq!(identities(&doc), expected);
    // Created (1), the identify event (2), then one Link listing what other shards bound (3).
    assert_eq!(doc.version, 3);
    for (kind, value) in &expected {
        assert_eq!(
            lookup(&client, kind, value).await.as_ref(),
            Some(&doc),
            "{kind}={value}"
        );
    }
    // Naming the profile by any of them, or several at once, reaches it.
    let answer = send(
        &client,
        &[
            json!({"event_id": "l-3", "type": "points_earn",
                "identities": {"member_card": linked[4].1}, "points": 4}),
            json!({"event_id": "l-4", "type": "points_earn",
                "identities": {"email": linked[0].1, "douyin_openid": linked[3].1}, "points": 6}),
        ],
    )
    .await;
    assert_eq!(answer.applied, 2, "{answer:?}");
    assert!(answer
        .results
        .iter()
        .all(|r| r.oneid.as_deref() == Some(oneid.as_str())));
    assert_eq!(
        client
            .profile(&oneid)
            .await
            .unwrap()
            .unwrap()
            .points
            .balance,
        66 + 4 + 6
    );
}

/// Identities `k{n}` = `{prefix}{n}` for `n` in `kinds`.
fn identity_map(prefix: &str, kinds: std::ops::Range<usize>) -> serde_json::Map<String, Value> {
    kinds
        .map(|n| (format!("k{n:02}"), Value::String(format!("{prefix}{n}"))))
        .collect()
}

/// A profile holding 50 identity values: the phone and k01..k49.
async fn full_profile(client: &Client) -> (String, ProfileDoc) {
    let created = send(
        client,
        &[json!({"event_id": "f-1", "type": "points_earn",
            "identities": {"phone": "13899990000"}, "points": 10})],
    )
    .await;
    let oneid = created.results[0].oneid.clone().unwrap();
    let answer = send(
        client,
        &[
            json!({"event_id": "f-2", "type": "identify", "oneid": oneid,
            "identities": identity_map("full-", 1..50)}),
        ],
    )
    .await;
    assert_eq!(answer.results[0].status, EventStatus::Applied, "{answer:?}");
    let doc = client.profile(&oneid).await.unwrap().unwrap();
    assert_eq!(identities(&doc).len(), 50);
    (oneid, doc)
}

/// A 51st value, held by the profile's shard or another, named by oneid or with an identity
/// the profile has: the event applies (its points too) without it, and the value stays free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_51st_identity_value_is_not_linked_and_stays_free() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let (oneid, full) = full_profile(&client).await;
    for (kind, value) in identities(&full) {
        assert_eq!(
            lookup(&client, &kind, &value).await.map(|d| d.oneid),
            Some(oneid.clone()),
            "{kind}={value}"
        );
    }
    let home = shard_of_oneid(&oneid);
    let local = value_on_shard("k50", "one-more-", home);
    let far = value_on_shard("k50", "one-more-", (home + 1) % SHARDS);
    for (n, (value, event)) in [
        (
            &local,
            json!({"event_id": "f-51-0", "type": "points_earn", "points": 1,
            "oneid": oneid, "identities": {"k50": local}}),
        ),
        (
            &far,
            json!({"event_id": "f-51-1", "type": "points_earn", "points": 1,
            "oneid": oneid, "identities": {"k50": far}}),
        ),
        (
            &local,
            json!({"event_id": "f-51-2", "type": "points_earn", "points": 1,
            "identities": {"k50": local, "phone": "13899990000"}}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let answer = send(&client, std::slice::from_ref(&event)).await;
        let result = &answer.results[0];
        assert_eq!(
            (&result.status, result.oneid.as_deref()),
            (&EventStatus::Applied, Some(oneid.as_str())),
            "{event}: {result:?}"
        );
        assert_eq!(
            result.not_linked,
            vec![NotLinked {
                kind: "k50".into(),
                value: value.clone(),
                reason: NotLinkedReason::IdentityLimit,
            }],
            "{event}"
        );
        let profile = client.profile(&oneid).await.unwrap().unwrap();
        assert_eq!(identities(&profile), identities(&full));
        assert_eq!(profile.points.balance, full.points.balance + n as i64 + 1);
    }
    for value in [&local, &far] {
        assert_eq!(lookup(&client, "k50", value).await, None, "k50={value}");
    }
    // A new customer may claim the value the full profile could not take.
    let answer = send(
        &client,
        &[json!({"event_id": "f-4", "type": "points_earn",
            "identities": {"k50": far}, "points": 1})],
    )
    .await;
    assert_eq!(answer.results[0].status, EventStatus::Applied, "{answer:?}");
    assert_ne!(answer.results[0].oneid.as_deref(), Some(oneid.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn identities_resolve_after_kill_9_and_restart() {
    let mut node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    // A claim with identities on other shards, an identify across shards, and a batch that
    // meets one new customer three times.
    let email = value_on_shard(
        "email",
        "k9-",
        (shard_of("phone", "13100000001") + 1) % SHARDS,
    );
    let mut events = vec![
        json!({"event_id": "k-1", "type": "order", "order_id": "K1", "amount": "12.34",
            "identities": {"phone": "13100000001", "email": email, "wechat_unionid": "oU_k9"}}),
        json!({"event_id": "k-2", "type": "points_earn", "points": 3,
            "identities": {"phone": "13100000002"}}),
        json!({"event_id": "k-3", "type": "points_earn", "points": 1,
            "identities": {"phone": "13100000003"}}),
        json!({"event_id": "k-4", "type": "points_earn", "points": 1,
            "identities": {"phone": "13100000003", "taobao_nick": "tb_k9"}}),
        json!({"event_id": "k-5", "type": "points_earn", "points": 1,
            "identities": {"taobao_nick": "tb_k9", "member_card": "M-k9"}}),
    ];
    let first = send(&client, &events).await;
    assert_eq!(first.applied, 5, "{first:?}");
    let second = first.results[1].oneid.clone().unwrap();
    let linked: serde_json::Map<String, Value> = (0..6)
        .map(|n| {
            let kind = format!("kind{n}");
            let value = value_on_shard(&kind, "k9-", n % SHARDS);
            (kind, Value::String(value))
        })
        .collect();
    events.push(
        json!({"event_id": "k-6", "type": "identify", "oneid": second,
        "identities": linked}),
    );
    let identify = send(&client, &events[5..]).await;
    assert_eq!(identify.applied, 1, "{identify:?}");
    assert_eq!(identify.results[0].oneid.as_deref(), Some(second.as_str()));
    let answered: Vec<Option<String>> = first
        .results
        .iter()
        .chain(&identify.results)
        .map(|r| r.oneid.clone())
        .collect();

    // Every identity of every profile, and its document, before the kill.
    let mut before: BTreeMap<(String, String), ProfileDoc> = BTreeMap::new();
    let oneids: BTreeSet<String> = answered.iter().flatten().cloned().collect();
    assert_eq!(oneids.len(), 3, "three customers: {answered:?}");
    assert_eq!(
        answered[2..5],
        [
            answered[2].clone(),
            answered[2].clone(),
            answered[2].clone()
        ]
    );
    for oneid in &oneids {
        let doc = client.profile(oneid).await.unwrap().unwrap();
        for identity in identities(&doc) {
            before.insert(identity, doc.clone());
        }
    }
    // 3 + 1 + 6 + 3 identities.
    assert_eq!(before.len(), 13, "{:?}", before.keys());
    for ((kind, value), doc) in &before {
        assert_eq!(lookup(&client, kind, value).await.as_ref(), Some(doc));
    }

    node.kill9();
    node.restart().await;
    let client = node.client_once();
    for ((kind, value), doc) in &before {
        assert_eq!(
            lookup(&client, kind, value).await.as_ref(),
            Some(doc),
            "{kind}={value} after kill -9"
        );
    }
    // Re-sending everything answers duplicates of the same profiles.
    let again = send(&client, &events).await;
    assert_eq!(again.duplicates, 6, "{again:?}");
    assert_eq!(
        again
            .results
            .iter()
            .map(|r| r.oneid.clone())
            .collect::<Vec<_>>(),
        answered
    );
}

/// Event `i` of a chain: it shares a new identity with event `i + 1` (kinds alternate, so
/// each event names two).
fn chain_event(i: usize) -> Value {
    let kind = |n: usize| {
        if n.is_multiple_of(2) {
            "member_card"
        } else {
            "app_id"
        }
    };
    json!({"event_id": format!("chain-{i}"), "type": "points_earn", "points": 1,
        "identities": {kind(i): format!("c{i}"), kind(i + 1): format!("c{}", i + 1)}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chain_of_new_identities_is_answered_in_bounded_waves() {
    let node = TestNode::start(NodeOptions::default()).await;
    let events: Vec<Value> = (0..2000).map(chain_event).collect();
    // Each event must wait for the one before it (a wave each): one request runs 64 waves.
    let body = serde_json::to_vec(&events).expect("encodes");
    let answer = node
        .client_once()
        .send_events_raw(body.into(), false)
        .await
        .expect("POST /v1/events");
    let code = |r: &oneid_protocol::api::EventResult| r.error.as_ref().map(|e| e.code.clone());
    let full = |value: usize| {
        vec![NotLinked {
            kind: if value.is_multiple_of(2) {
                "member_card"
            } else {
                "app_id"
            }
            .into(),
            value: format!("c{value}"),
            reason: NotLinkedReason::IdentityLimit,
        }]
    };
    let first = answer.results[0].oneid.clone().expect("applied");
    // The profile fills up: 2 identities, then one more per event, up to 50: event 49 applies
    // without its new identity.
    for (i, result) in answer.results[..50].iter().enumerate() {
        assert_eq!(result.status, EventStatus::Applied, "event {i}: {result:?}");
        assert_eq!(result.oneid.as_ref(), Some(&first), "event {i}");
        let not_linked = if i == 49 { full(50) } else { vec![] };
        assert_eq!(result.not_linked, not_linked, "event {i}");
    }
    // The chain goes on as a new customer (event 49 bound nothing new), until the 64th wave.
    let second = answer.results[50].oneid.clone().expect("applied");
    assert_ne!(second, first);
    for (i, result) in answer.results[50..64].iter().enumerate() {
        assert_eq!(result.oneid.as_ref(), Some(&second), "event {}", 50 + i);
    }
    for result in &answer.results[64..] {
        assert_eq!(code(result), Some(ErrorCode::TooManyWaves), "{result:?}");
    }
    assert_eq!(
        (answer.applied, answer.rejected),
        (64, 1936),
        "50 + 14 applied, then 1,936 too_many_waves"
    );

    // The client sends what waited again, as later requests, until each event has its answer:
    // every 50th event (49, 99, ...) meets a full profile, and the next starts a customer.
    let client = node.client();
    let all = client.send_events_json(&events[..300]).await.expect("send");
    assert_eq!(
        (all.applied, all.duplicates, all.rejected),
        (300 - 64, 64, 0),
        "{:?}",
        all.results
            .iter()
            .find(|r| r.status == EventStatus::Rejected)
    );
    for (i, result) in all.results.iter().enumerate().skip(64) {
        let not_linked = if i % 50 == 49 { full(i + 1) } else { vec![] };
        assert_eq!(result.not_linked, not_linked, "event {i}");
    }
    let customers: BTreeSet<&String> = all
        .results
        .iter()
        .filter_map(|r| r.oneid.as_ref())
        .collect();
    assert_eq!(customers.len(), 6);
    let last = lookup(&client, "member_card", "c298")
        .await
        .expect("the last customer");
    assert_eq!(identities(&last).len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_a_duplicate_even_when_its_identities_now_name_two_profiles() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let first = send(
        &client,
        &[
            json!({"event_id": "r-1", "type": "points_earn", "identities": {"phone": "1"}, "points": 10}),
            json!({"event_id": "r-2", "type": "points_earn", "identities": {"email": "e@x"}, "points": 20}),
        ],
    )
    .await;
    let (p1, p2) = (
        first.results[0].oneid.clone().unwrap(),
        first.results[1].oneid.clone().unwrap(),
    );
    assert_ne!(p1, p2);
    // r-1 again, now also naming the email, which another profile took meanwhile: it already
    // applied, so it is a duplicate of p1 and merges nothing; an event that never applied
    // merges the two.
    let again = send(
        &client,
        &[
            json!({"event_id": "r-1", "type": "points_earn",
                "identities": {"phone": "1", "email": "e@x"}, "points": 10}),
            json!({"event_id": "r-3", "type": "points_earn",
                "identities": {"phone": "1", "email": "e@x"}, "points": 10}),
        ],
    )
    .await;
    assert_eq!(again.results[0].status, EventStatus::Duplicate);
    assert_eq!(again.results[0].oneid.as_deref(), Some(p1.as_str()));
    let merged = &again.results[1];
    assert_eq!(merged.status, EventStatus::Applied, "{merged:?}");
    let survivor = merged.oneid.clone().expect("applied");
    let loser = if survivor == p1 {
        p2.clone()
    } else {
        p1.clone()
    };
    assert_eq!(merged.merged, vec![loser.clone()]);
    assert!(!merged.merge_pending);
    let profile = lookup(&client, "phone", "1").await.unwrap();
    assert_eq!(
        (profile.oneid.as_str(), profile.points.balance),
        (survivor.as_str(), 40)
    );
    let profile = lookup(&client, "email", "e@x").await.unwrap();
    assert_eq!(profile.oneid, survivor);
    // And again: a duplicate, of the survivor now.
    let third = send(
        &client,
        &[json!({"event_id": "r-1", "type": "points_earn",
            "identities": {"phone": "1"}, "points": 10})],
    )
    .await;
    assert_eq!(third.results[0].status, EventStatus::Duplicate);
    assert_eq!(third.results[0].oneid.as_deref(), Some(survivor.as_str()));
}
