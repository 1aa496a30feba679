//! The identity policy through real nodes: blocked values never glue strangers together, kind
//! limits and unmergeable kinds answer why an identity was not linked, a bind another profile
//! won first says so, the policy changed on one node judges events sent through every node,
//! and the audit reports what an earlier policy let in.

use oneid_client::Client;
use oneid_protocol::api::{
    EventResult, EventStatus, IdentityAudit, KindAuditDoc, NotLinked, NotLinkedReason,
};
use oneid_protocol::ErrorCode;
use oneid_tests::cluster::{ClusterOptions, TestCluster};
use oneid_tests::{eventually, rules_doc, shard_of, value_where, NodeOptions, TestNode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHARDS: u32 = 4;

/// Member cards: one per profile. Device ids never join two profiles. `N/A` is blocked (the
/// global list replaces the defaults: `unknown` no longer is).
const POLICY: &str = r#"
[rules.identity.kinds.member_card]
max_per_profile = 1
priority = 10

[rules.identity.kinds.device_id]
merge = false

[rules.identity.blocked_values]
exact = ["N/A"]
patterns = ["^0+$"]
"#;

async fn send_one(client: &Client, event: Value) -> EventResult {
    let mut answer = client
        .send_events_json(&[event])
        .await
        .expect("POST /v1/events");
    answer.results.remove(0)
}

fn not_linked(kind: &str, value: &str, reason: NotLinkedReason) -> NotLinked {
    NotLinked {
        kind: kind.into(),
        value: value.into(),
        reason,
    }
}

/// The profile an event applied to, checking what it did not link.
fn applied(result: &EventResult, not: &[NotLinked]) -> String {
    assert_eq!(result.status, EventStatus::Applied, "{result:?}");
    assert_eq!(result.not_linked, not, "{result:?}");
    result
        .oneid
        .clone()
        .expect("applied events name their profile")
}

async fn lookup(client: &Client, kind: &str, value: &str) -> Option<String> {
    let doc = client.lookup(kind, value).await.expect("lookup");
    doc.map(|d| d.oneid)
}

/// `oneid_identities_not_linked_total{reason=...}` of the node.
async fn not_linked_count(client: &Client, reason: &str) -> u64 {
    let text = client.metrics().await.expect("metrics");
    let name = format!("oneid_identities_not_linked_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name}"))
}

/// POSTs `body` to `path` over a plain connection: the status and the JSON answer as sent.
async fn post_raw(base: &str, path: &str, body: &str) -> (u16, Value) {
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connects");
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("writes");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("reads");
    let text = String::from_utf8(answer).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().expect("a status");
    (status, serde_json::from_str(body).expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_strangers_behind_one_placeholder_phone_stay_two_customers() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    // The default blocked values: `unknown` is a placeholder, not a phone.
    let first = send_one(
        &client,
        json!({"event_id": "s-1", "type": "identify",
            "identities": {"phone": "unknown", "member_card": "M1"}}),
    )
    .await;
    let blocked = [not_linked(
        "phone",
        "unknown",
        NotLinkedReason::BlockedValue,
    )];
    let one = applied(&first, &blocked);
    // The same answer as JSON on the wire, field for field.
    let (status, body) = post_raw(
        &node.base(),
        "/v1/events",
        r#"[{"event_id": "s-2", "type": "identify",
            "identities": {"phone": "unknown", "member_card": "M2"}}]"#,
    )
    .await;
    assert_eq!(status, 200);
    let two = body["results"][0]["oneid"]
        .as_str()
        .expect("a OneID")
        .to_string();
    assert_ne!(one, two, "two strangers, two OneIDs");
    assert_eq!(
        body,
        json!({"applied": 1, "duplicates": 0, "rejected": 0, "results": [{
            "event_id": "s-2", "status": "applied", "oneid": two,
            "not_linked": [{"kind": "phone", "value": "unknown", "reason": "blocked_value"}]}]})
    );
    assert_eq!(lookup(&client, "phone", "unknown").await, None);
    assert_eq!(
        lookup(&client, "member_card", "M1").await,
        Some(one.clone())
    );
    assert_eq!(lookup(&client, "member_card", "M2").await, Some(two));

    // Only blocked values and no oneid: refused, and nothing changes. A retry of an applied
    // event is a duplicate, without `not_linked`.
    let (status, body) = post_raw(
        &node.base(),
        "/v1/events",
        r#"[{"event_id": "s-3", "type": "points_earn", "points": 5,
             "identities": {"phone": "0000", "email": "NULL"}},
            {"event_id": "s-1", "type": "identify",
             "identities": {"phone": "unknown", "member_card": "M1"}}]"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["results"],
        json!([{"event_id": "s-3", "status": "rejected", "oneid": null,
                "error": {"code": "blocked_identity", "field": "identities",
                  "message": "every identity of the event is a blocked value, and it names no oneid"}},
               {"event_id": "s-1", "status": "duplicate", "oneid": one}])
    );
    assert_eq!(lookup(&client, "email", "NULL").await, None);
    assert_eq!(not_linked_count(&client, "blocked_value").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn kind_limits_and_unmergeable_kinds_say_why_an_identity_was_not_linked() {
    let node = TestNode::start(NodeOptions {
        extra: POLICY.into(),
        ..NodeOptions::default()
    })
    .await;
    let client = node.client_once();
    // The seeded policy is the rules' identity policy.
    let rules = client.rules().await.expect("GET /v1/rules");
    let identity = serde_json::to_value(rules.identity).expect("serializes");
    assert_eq!(
        identity,
        json!({"kinds": {"device_id": {"priority": 0, "merge": false},
                         "member_card": {"priority": 10, "max_per_profile": 1, "merge": true}},
               "blocked_values": {"exact": ["N/A"], "patterns": ["^0+$"]}})
    );
    let p = applied(
        &send_one(
            &client,
            json!({"event_id": "k-1", "type": "identify",
                "identities": {"phone": "13800000001", "member_card": "M1", "device_id": "D1"}}),
        )
        .await,
        &[],
    );
    // A second card for the profile: the event applies (its points too) without it.
    let result = send_one(
        &client,
        json!({"event_id": "k-2", "type": "points_earn", "points": 7,
            "identities": {"phone": "13800000001", "member_card": "M2"}}),
    )
    .await;
    assert_eq!(
        applied(
            &result,
            &[not_linked("member_card", "M2", NotLinkedReason::KindLimit)]
        ),
        p
    );
    assert_eq!(lookup(&client, "member_card", "M2").await, None);
    // Another customer on the same device: their own profile; the device stays the first's.
    let result = send_one(
        &client,
        json!({"event_id": "k-3", "type": "identify",
            "identities": {"phone": "13800000002", "device_id": "D1", "email": "N/A"}}),
    )
    .await;
    let q = applied(
        &result,
        &[
            not_linked("device_id", "D1", NotLinkedReason::MergeDisabled),
            not_linked("email", "N/A", NotLinkedReason::BlockedValue),
        ],
    );
    assert_ne!(p, q);
    assert_eq!(lookup(&client, "device_id", "D1").await, Some(p.clone()));
    // `unknown` is no longer blocked: the policy's own list replaced the defaults.
    let result = send_one(
        &client,
        json!({"event_id": "k-4", "type": "identify", "identities": {"nickname": "unknown"}}),
    )
    .await;
    let r = applied(&result, &[]);
    assert_eq!(lookup(&client, "nickname", "unknown").await, Some(r));
    // Mergeable identities of two profiles: the profiles merge. The card's priority ranks
    // p first: it survives, and holds both phones.
    let result = send_one(
        &client,
        json!({"event_id": "k-5", "type": "identify",
            "identities": {"phone": "13800000001", "member_card": "M1", "email": "q@x"}}),
    )
    .await;
    assert_eq!(result.status, EventStatus::Applied, "{result:?}");
    let result = send_one(
        &client,
        json!({"event_id": "k-6", "type": "identify",
            "identities": {"phone": "13800000002", "email": "q@x"}}),
    )
    .await;
    assert_eq!(applied(&result, &[]), p);
    assert_eq!(result.merged, vec![q.clone()]);
    assert_eq!(
        lookup(&client, "phone", "13800000002").await,
        Some(p.clone())
    );
    let profile = client.profile(&p).await.expect("read").expect("exists");
    assert_eq!(profile.points.balance, 7);
    assert_eq!(
        profile.identities,
        BTreeMap::from([
            ("device_id".to_string(), vec!["D1".to_string()]),
            ("email".to_string(), vec!["q@x".to_string()]),
            ("member_card".to_string(), vec!["M1".to_string()]),
            (
                "phone".to_string(),
                vec!["13800000001".to_string(), "13800000002".to_string()]
            ),
        ])
    );
    for (reason, count) in [
        ("kind_limit", 1),
        ("merge_disabled", 1),
        ("blocked_value", 1),
        ("identity_limit", 0),
        ("taken", 0),
    ] {
        assert_eq!(not_linked_count(&client, reason).await, count, "{reason}");
    }
}

/// A bind that another profile wins while the event's router waits to bind it: the two
/// profiles merge, as if the event had found the identity bound, and its answer says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_another_profile_won_first_merges_the_two() {
    let mut node = TestNode::create(NodeOptions::default());
    // The router pauses after the apply, before its binds on other shards (a blocking sleep
    // of one of the two HTTP workers; the other serves the second customer meanwhile).
    node.restart_with_env(
        &[],
        &[("FAILPOINTS", "router::before_follow_ups=sleep(1500)")],
    )
    .await;
    let phone = "13900000009";
    let email = value_where("email", "mail-", SHARDS, |s| {
        s != shard_of("phone", phone, SHARDS)
    });
    let client = node.client_once();
    let first = {
        let client = client.clone();
        let event = json!({"event_id": "t-1", "type": "identify",
            "identities": {"phone": phone, "email": email}});
        tokio::spawn(async move { send_one(&client, event).await })
    };
    // Once the first event applied (its phone is bound), a second customer takes the email.
    eventually(
        "the first event applied",
        Duration::from_secs(10),
        async || lookup(&client, "phone", phone).await,
    )
    .await;
    let second = send_one(
        &client,
        json!({"event_id": "t-2", "type": "identify", "identities": {"email": email}}),
    )
    .await;
    let q = applied(&second, &[]);
    let first = first.await.expect("the first request");
    // The first profile was minted first: it survives, and the second's OneID resolves to it.
    let p = applied(&first, &[]);
    assert_ne!(p, q);
    assert_eq!(first.merged, vec![q.clone()]);
    assert_eq!(lookup(&client, "email", &email).await, Some(p.clone()));
    let profile = client.profile(&p).await.expect("read").expect("exists");
    assert_eq!(profile.identities.len(), 2, "{profile:?}");
    assert_eq!(not_linked_count(&client, "taken").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_reports_what_an_earlier_policy_let_in_and_lookups_still_find_it() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    // A policy that blocks only `x` and limits nothing: `unknown` binds, two cards too.
    let open = rules_doc(&json!({"identity": {"blocked_values": {"exact": ["x"]}}}));
    client.set_rules(&open).await.expect("PUT");
    let p = applied(
        &send_one(
            &client,
            json!({"event_id": "a-1", "type": "identify",
                "identities": {"phone": "unknown", "member_card": "M1"}}),
        )
        .await,
        &[],
    );
    send_one(
        &client,
        json!({"event_id": "a-2", "type": "identify", "oneid": p,
            "identities": {"member_card": "M2"}}),
    )
    .await;
    // Back to the default blocked values, and one card per profile.
    let strict =
        rules_doc(&json!({"identity": {"kinds": {"member_card": {"max_per_profile": 1}}}}));
    client.set_rules(&strict).await.expect("PUT");
    let audit = client.identity_audit().await.expect("audit");
    let kind = |over_limit, blocked_bound| KindAuditDoc {
        over_limit,
        blocked_bound,
    };
    assert_eq!(
        audit,
        IdentityAudit {
            kinds: BTreeMap::from([
                ("member_card".to_string(), kind(1, 0)),
                ("phone".to_string(), kind(0, 1)),
            ]),
            shards_done: SHARDS,
            shards_total: SHARDS,
        }
    );
    // Bindings are never rewritten: a lookup by the blocked value still finds its profile,
    // while a new event naming it joins nothing.
    assert_eq!(lookup(&client, "phone", "unknown").await, Some(p.clone()));
    let result = send_one(
        &client,
        json!({"event_id": "a-3", "type": "identify",
            "identities": {"phone": "unknown", "email": "new@x"}}),
    )
    .await;
    let other = applied(
        &result,
        &[not_linked(
            "phone",
            "unknown",
            NotLinkedReason::BlockedValue,
        )],
    );
    assert_ne!(other, p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_are_checked_on_put_and_matched_in_linear_time() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let refused = client
        .set_rules(&rules_doc(&json!({"identity": {"kinds": {"phone": {
            "blocked_values": {"patterns": ["^1", "(unclosed"]}}}}})))
        .await
        .expect_err("an invalid pattern");
    let oneid_client::Error::Api {
        status,
        code,
        field,
        ..
    } = &refused
    else {
        panic!("an API error: {refused:?}")
    };
    assert_eq!(
        (*status, code, field.as_deref()),
        (
            400,
            &ErrorCode::InvalidRules,
            Some("identity.kinds.phone.blocked_values.patterns[1]")
        ),
        "{refused:?}"
    );
    // A pattern that takes exponential time in a backtracking engine, against a value that
    // makes one try every split: the `regex` crate answers in time linear in the value (no
    // clock is read here: a hang is what would fail this).
    let slow = rules_doc(&json!({"identity": {"blocked_values": {"patterns": ["^(a+)+$"]}}}));
    client.set_rules(&slow).await.expect("PUT");
    let value = format!("{}!", "a".repeat(200));
    let result = send_one(
        &client,
        json!({"event_id": "p-1", "type": "identify", "identities": {"nickname": value}}),
    )
    .await;
    applied(&result, &[]);
    let blocked = "a".repeat(200);
    let result = send_one(
        &client,
        json!({"event_id": "p-2", "type": "identify",
            "identities": {"nickname": blocked, "phone": "13700000000"}}),
    )
    .await;
    applied(
        &result,
        &[not_linked(
            "nickname",
            &blocked,
            NotLinkedReason::BlockedValue,
        )],
    );
}

/// A policy PUT through one node judges the events sent through every node from the answer
/// on, though the others' routers judged earlier events by the policy before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn a_policy_put_through_one_node_judges_events_through_every_node() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let clients: Vec<Client> = (1..=3).map(|n| cluster.node(n).client()).collect();
    // Every node's router judges an event by the default policy first.
    for (n, client) in clients.iter().enumerate() {
        let result = send_one(
            client,
            json!({"event_id": format!("before-{n}"), "type": "identify",
                "identities": {"phone": format!("1360000000{n}"), "nickname": "unknown"}}),
        )
        .await;
        applied(
            &result,
            &[not_linked(
                "nickname",
                "unknown",
                NotLinkedReason::BlockedValue,
            )],
        );
    }
    let policy = rules_doc(&json!({"identity": {
        "kinds": {"member_card": {"max_per_profile": 1}},
        "blocked_values": {"exact": ["N/A"]}}}));
    let put = clients[0].set_rules(&policy).await.expect("PUT");
    assert_eq!(put.version, Some(1));
    for (n, client) in clients.iter().enumerate().skip(1) {
        // `unknown` binds now: an event whose every identity the old policy blocked (which a
        // stale router would refuse alone, without asking a shard), and one routed to a shard
        // as the old policy would have. Node 2 gets the first one first, node 3 the second:
        // each is the first its stale router judges.
        let phone = format!("1360000000{n}");
        let alone = ["", "taobao_nick", "jd_pin"][n];
        let kind = ["", "nickname", "email"][n];
        let alone = json!({"event_id": format!("alone-{n}"), "type": "identify",
            "identities": {alone: "unknown"}});
        let routed = json!({"event_id": format!("after-{n}"), "type": "identify",
            "identities": {"phone": phone, kind: "unknown", "member_card": format!("M{n}")}});
        let events = if n == 1 {
            [alone, routed]
        } else {
            [routed, alone]
        };
        for event in events {
            let result = send_one(client, event.clone()).await;
            let oneid = applied(&result, &[]);
            let (kind, _) = event["identities"]
                .as_object()
                .unwrap()
                .iter()
                .find(|(_, value)| *value == "unknown")
                .expect("names unknown");
            assert_eq!(
                lookup(client, kind, "unknown").await,
                Some(oneid),
                "{event}"
            );
        }
        let result = send_one(
            client,
            json!({"event_id": format!("na-{n}"), "type": "identify",
                "identities": {"phone": "N/A"}}),
        )
        .await;
        assert_eq!(
            result.error.map(|e| e.code),
            Some(ErrorCode::BlockedIdentity),
            "node {}",
            n + 1
        );
        let result = send_one(
            client,
            json!({"event_id": format!("card-{n}"), "type": "identify",
                "identities": {"phone": phone, "member_card": "M9"}}),
        )
        .await;
        applied(
            &result,
            &[not_linked("member_card", "M9", NotLinkedReason::KindLimit)],
        );
    }
}

/// A PUT answered 503 because its installs did not land (its version is ordered, but the
/// other shards still have the old rules): the routers install it on a shard they find behind,
/// and events go on, judged by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_a_put_left_uninstalled_are_installed_by_the_routers() {
    let mut node = TestNode::create(NodeOptions::default());
    node.restart_with_env(&[], &[("FAILPOINTS", "api::before_installs=return")])
        .await;
    let client = node.client_once();
    let policy = rules_doc(&json!({"identity": {"blocked_values": {"exact": ["N/A"]}}}));
    let refused = client.set_rules(&policy).await.expect_err("installs kept");
    assert_eq!(refused.code(), Some(&ErrorCode::Unavailable), "{refused:?}");
    assert_eq!(client.rules().await.expect("GET").version, Some(1));
    // Events whose profiles live on every other shard than the registry's.
    for shard in 1..SHARDS {
        let phone = value_where("phone", "1350000", SHARDS, |s| s == shard);
        // `unknown` is no longer blocked (the new list replaced the defaults): one kind each.
        let kind = ["", "email", "jd_pin", "wechat_openid"][shard as usize];
        let result = send_one(
            &client,
            json!({"event_id": format!("i-{shard}"), "type": "identify",
                "identities": {"phone": phone, "nickname": "N/A", kind: "unknown"}}),
        )
        .await;
        let oneid = applied(
            &result,
            &[not_linked("nickname", "N/A", NotLinkedReason::BlockedValue)],
        );
        assert_eq!(lookup(&client, kind, "unknown").await, Some(oneid.clone()));
        assert_eq!(
            oneid
                .parse::<oneid_protocol::ids::OneId>()
                .unwrap()
                .shard()
                .0,
            shard
        );
    }
}
