//! The API walk-through against a real node, with exact values: orders from two channels,
//! lookups by every identity, points under channel multipliers, tiers, rule tags, duplicates,
//! redeems, the ledger and its paging, refunds, manual tags, attributes, rules, the cluster
//! view, health, metrics, NDJSON bodies and the `oneid` CLI.

use oneid_client::Client;
use oneid_protocol::api::{EventResult, EventStatus, EventsResponse, LedgerEntryDoc, ProfileDoc};
use oneid_protocol::ErrorCode;
use oneid_tests::{rules_doc, rules_json, NodeOptions, TestNode};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Seed rules: Douyin earns ×1.5, gold ×2; silver from 1000, gold from 5000; `big_spender`
/// from a 365-day spend of 3000.
const RULES: &str = r#"
[rules.points]
per_currency_unit = "1"
tier_multipliers = { gold = "2" }
channel_multipliers = { douyin = "1.5" }

[rules.tiers]
levels = [
  { name = "member", min_spend = "0" },
  { name = "silver", min_spend = "1000" },
  { name = "gold", min_spend = "5000" },
]

[[rules.tag_rules]]
tag = "big_spender"
when = "spend_365d >= 3000"
"#;

const SHARDS: u32 = 4;

fn options() -> NodeOptions {
    NodeOptions {
        extra: RULES.into(),
        ..NodeOptions::default()
    }
}

/// RFC 3339 text (UTC, whole seconds) of a Unix time, as the node writes timestamps: the
/// protocol's own formatting.
fn rfc3339(secs: i64) -> String {
    oneid_protocol::num::Millis(secs * 1000).to_string()
}

/// Timestamps of a test: event `n` happened `n` minutes after a base two days ago (inside
/// every window and expiry, never in the future).
struct Clock(i64);

impl Clock {
    fn new() -> Clock {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs() as i64;
        Clock(now - 2 * 86_400)
    }

    fn ts(&self, n: i64) -> String {
        rfc3339(self.0 + 60 * n)
    }
}

fn shard_of(kind: &str, value: &str) -> u32 {
    oneid_tests::shard_of(kind, value, SHARDS)
}

/// The first `{prefix}{n}` whose identity is held by a shard other than `avoid`.
fn value_off_shard(kind: &str, prefix: &str, avoid: u32) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|v| shard_of(kind, v) != avoid)
        .expect("some value lands elsewhere")
}

async fn send(client: &Client, events: &[Value]) -> EventsResponse {
    let answer = client
        .send_events_json(events)
        .await
        .expect("POST /v1/events");
    assert_eq!(answer.results.len(), events.len(), "{answer:?}");
    answer
}

/// Sends one event and returns its result.
async fn send_one(client: &Client, event: Value) -> EventResult {
    send(client, &[event]).await.results.remove(0)
}

fn assert_applied(result: &EventResult, oneid: &str) {
    assert_eq!(
        (
            result.status.clone(),
            result.oneid.as_deref(),
            &result.error
        ),
        (EventStatus::Applied, Some(oneid), &None),
        "{result:?}"
    );
}

fn doc_json(doc: &ProfileDoc) -> Value {
    serde_json::to_value(doc).expect("a profile serializes")
}

fn entry(
    event_id: &str,
    kind: &str,
    points: i64,
    balance_after: i64,
    at: String,
    reason: Option<&str>,
) -> LedgerEntryDoc {
    LedgerEntryDoc {
        event_id: event_id.into(),
        kind: kind.into(),
        points,
        balance_after,
        at,
        reason: reason.map(str::to_string),
        shortfall: 0,
        from: None,
        into: None,
        expires_at: None,
    }
}

/// Follows `next` cursors with pages of `limit`; checks each page's size.
async fn all_pages(client: &Client, oneid: &str, limit: usize) -> Vec<LedgerEntryDoc> {
    let mut entries = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = client
            .ledger(oneid, Some(limit), cursor.as_deref())
            .await
            .expect("ledger page");
        assert!(page.entries.len() <= limit, "{page:?}");
        entries.extend(page.entries.iter().cloned());
        match page.next {
            Some(next) => {
                assert_eq!(page.entries.len(), limit, "a page with a next is full");
                cursor = Some(next);
            }
            None => return entries,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn walk_through_with_exact_values() {
    let node = TestNode::start(options()).await;
    let client = node.client_once();
    let clock = Clock::new();
    let ts = |n| clock.ts(n);
    let phone = "13800138000";
    // The unionid lives on another shard than the phone: the profile is claimed at the phone's
    // shard and the unionid is bound and linked across shards.
    let wechat = value_off_shard("wechat_unionid", "oU_walk_", shard_of("phone", phone));
    let mut posts = 0u64;

    // Order 1 on Douyin: floor(1999.90 × 1 × 1.5) = 2999 points, spend 1999.90 → silver.
    let order1 = json!({"event_id": "wt-1", "type": "order",
        "identities": {"phone": phone, "wechat_unionid": wechat},
        "channel": "douyin", "order_id": "DY1", "amount": "1999.90", "ts": ts(1)});
    let result = send_one(&client, order1.clone()).await;
    posts += 1;
    assert_eq!(result.event_id, "wt-1");
    assert_eq!(result.status, EventStatus::Applied, "{result:?}");
    let oneid = result
        .oneid
        .clone()
        .expect("an applied event names its profile");
    assert!(
        oneid.len() == 17
            && oneid.starts_with('o')
            && oneid[1..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{oneid}"
    );
    let by_phone = client
        .lookup("phone", phone)
        .await
        .unwrap()
        .expect("by phone");
    let by_wechat = client
        .lookup("wechat_unionid", &wechat)
        .await
        .unwrap()
        .expect("by unionid");
    let by_id = client.profile(&oneid).await.unwrap().expect("by oneid");
    assert_eq!(by_phone, by_wechat);
    assert_eq!(by_phone, by_id);
    assert_eq!(
        doc_json(&by_phone),
        json!({
            "oneid": oneid,
            "identities": {"phone": [phone], "wechat_unionid": [wechat]},
            "attributes": {},
            "points": {"balance": 2999, "lifetime_earned": 2999, "lifetime_redeemed": 0},
            "tier": "silver", "tier_since": ts(1),
            // Retention is 365 days (the default): ts counts minutes.
            "tier_retained_until": ts(1 + 365 * 24 * 60),
            "tags": [],
            "metrics": {"order_count": 1, "total_spend": "1999.90", "spend_365d": "1999.90",
                        "first_order_at": ts(1), "last_order_at": ts(1),
                        "last_order_on": {"douyin": ts(1)}},
            "channels": {"douyin": ts(1)},
            "segments": [],
            // 1: the order; 2: the unionid linked from its shard.
            "version": 2,
            "created_at": ts(1), "updated_at": ts(1)
        })
    );

    // Order 2 on Tmall: silver has no multiplier, 1500 points; spend 3499.90 keeps silver
    // (gold is 5000) and sets big_spender.
    let result = send_one(
        &client,
        json!({"event_id": "wt-2", "type": "order",
        "identities": {"phone": phone}, "channel": "tmall", "order_id": "TM2",
        "amount": "1500.00", "ts": ts(2)}),
    )
    .await;
    posts += 1;
    assert_applied(&result, &oneid);
    let after_order2 = client.lookup("phone", phone).await.unwrap().unwrap();
    assert_eq!(
        doc_json(&after_order2),
        json!({
            "oneid": oneid,
            "identities": {"phone": [phone], "wechat_unionid": [wechat]},
            "attributes": {},
            "points": {"balance": 4499, "lifetime_earned": 4499, "lifetime_redeemed": 0},
            "tier": "silver", "tier_since": ts(1),
            // Retention is 365 days (the default): ts counts minutes.
            "tier_retained_until": ts(1 + 365 * 24 * 60),
            "tags": ["big_spender"],
            "metrics": {"order_count": 2, "total_spend": "3499.90", "spend_365d": "3499.90",
                        "first_order_at": ts(1), "last_order_at": ts(2),
                        "last_order_on": {"douyin": ts(1), "tmall": ts(2)}},
            "channels": {"douyin": ts(1), "tmall": ts(2)},
            "segments": [],
            "version": 3,
            "created_at": ts(1), "updated_at": ts(2)
        })
    );

    // The same event again: a duplicate of the same profile, nothing changes.
    let answer = send(&client, std::slice::from_ref(&order1)).await;
    posts += 1;
    assert_eq!(
        (answer.applied, answer.duplicates, answer.rejected),
        (0, 1, 0)
    );
    assert_eq!(
        answer.results[0],
        EventResult {
            event_id: "wt-1".into(),
            status: EventStatus::Duplicate,
            oneid: Some(oneid.clone()),
            error: None,
            not_linked: vec![],
            merged: vec![],
            merge_pending: false,
        }
    );
    assert_eq!(
        client.lookup("phone", phone).await.unwrap().unwrap(),
        after_order2,
        "a duplicate changes nothing, the version included"
    );

    // Redeem 500 of 4499.
    let result = send_one(
        &client,
        json!({"event_id": "wt-3", "type": "points_redeem",
        "oneid": oneid, "points": 500, "reason": "gift card", "ts": ts(3)}),
    )
    .await;
    posts += 1;
    assert_applied(&result, &oneid);
    let doc = client.profile(&oneid).await.unwrap().unwrap();
    assert_eq!(
        (
            doc.points.balance,
            doc.points.lifetime_earned,
            doc.points.lifetime_redeemed
        ),
        (3999, 4499, 500)
    );
    let page = client.ledger(&oneid, None, None).await.unwrap();
    assert_eq!(
        page.entries,
        vec![
            entry("wt-3", "redeem", -500, 3999, ts(3), Some("gift card")),
            entry("wt-2", "earn", 1500, 4499, ts(2), Some("order TM2")),
            entry("wt-1", "earn", 2999, 2999, ts(1), Some("order DY1")),
        ]
    );
    assert_eq!(page.next, None);
    assert_eq!(all_pages(&client, &oneid, 2).await, page.entries);

    // Refund order 1 in full: its 2999 points are reversed, its spend leaves both totals;
    // the tier is kept (downgrades wait for retention), big_spender goes (1500 < 3000).
    let result = send_one(
        &client,
        json!({"event_id": "wt-4", "type": "refund",
        "identities": {"wechat_unionid": wechat}, "order_id": "DY1", "amount": "1999.90",
        "ts": ts(4)}),
    )
    .await;
    posts += 1;
    assert_applied(&result, &oneid);
    // Nothing is left of order 1 to refund, with or without an amount.
    let answer = send(
        &client,
        &[
            json!({"event_id": "wt-5", "type": "refund", "oneid": oneid, "order_id": "DY1",
                "amount": "1999.90", "ts": ts(5)}),
            json!({"event_id": "wt-5b", "type": "refund", "oneid": oneid, "order_id": "DY1",
                "ts": ts(5)}),
        ],
    )
    .await;
    posts += 1;
    assert_eq!(
        (answer.applied, answer.duplicates, answer.rejected),
        (0, 0, 2)
    );
    for (result, event_id) in answer.results.iter().zip(["wt-5", "wt-5b"]) {
        assert_eq!(result.event_id, event_id);
        assert_eq!(result.status, EventStatus::Rejected);
        assert_eq!(result.oneid, None);
        let error = result.error.as_ref().expect("a rejection has an error");
        assert_eq!(
            (error.code.clone(), error.field.as_deref()),
            (ErrorCode::RefundExceedsOrder, Some("amount")),
            "{error:?}"
        );
    }
    let doc = client.profile(&oneid).await.unwrap().unwrap();
    assert_eq!(
        (
            doc.points.balance,
            doc.metrics.order_count,
            doc.metrics.total_spend.as_str(),
            doc.metrics.spend_365d.as_str(),
            doc.tier.as_str(),
            doc.tags.clone(),
            doc.version
        ),
        (
            1000,
            2,
            "1500.00",
            "1500.00",
            "silver",
            Vec::<String>::new(),
            5
        )
    );

    // Manual tags.
    for (n, event) in [
        json!({"type": "tag_add", "tag": "vip"}),
        json!({"type": "tag_add", "tag": "newsletter"}),
        json!({"type": "tag_remove", "tag": "vip"}),
    ]
    .into_iter()
    .enumerate()
    {
        let n = 6 + n as i64;
        let mut event = event;
        event["event_id"] = json!(format!("wt-{n}"));
        event["oneid"] = json!(oneid);
        event["ts"] = json!(ts(n));
        assert_applied(&send_one(&client, event).await, &oneid);
        posts += 1;
    }
    assert_eq!(
        client.profile(&oneid).await.unwrap().unwrap().tags,
        vec!["newsletter".to_string()]
    );

    // Attributes: strings, numbers, bools; null removes.
    let result = send_one(
        &client,
        json!({"event_id": "wt-9", "type": "profile_update",
        "identities": {"phone": phone},
        "attributes": {"city": "Hangzhou", "age": 31, "vip": true, "nickname": "xiaoli"},
        "ts": ts(9)}),
    )
    .await;
    posts += 1;
    assert_applied(&result, &oneid);
    assert_eq!(
        json!(client.profile(&oneid).await.unwrap().unwrap().attributes),
        json!({"age": 31, "city": "Hangzhou", "nickname": "xiaoli", "vip": true})
    );
    let result = send_one(
        &client,
        json!({"event_id": "wt-10", "type": "profile_update",
        "oneid": oneid, "attributes": {"city": "Shanghai", "age": 32.5, "nickname": null},
        "ts": ts(10)}),
    )
    .await;
    posts += 1;
    assert_applied(&result, &oneid);

    // A bonus, then the whole ledger, unpaged and in pages of 2.
    let result = send_one(
        &client,
        json!({"event_id": "wt-11", "type": "points_earn",
        "oneid": oneid, "points": 100, "reason": "bonus", "ts": ts(11)}),
    )
    .await;
    posts += 1;
    assert_applied(&result, &oneid);
    let page = client.ledger(&oneid, None, None).await.unwrap();
    let expected = vec![
        entry("wt-11", "earn", 100, 1100, ts(11), Some("bonus")),
        entry(
            "wt-4",
            "reverse",
            -2999,
            1000,
            ts(4),
            Some("refund of order DY1"),
        ),
        entry("wt-3", "redeem", -500, 3999, ts(3), Some("gift card")),
        entry("wt-2", "earn", 1500, 4499, ts(2), Some("order TM2")),
        entry("wt-1", "earn", 2999, 2999, ts(1), Some("order DY1")),
    ];
    assert_eq!(page.entries, expected);
    assert_eq!(page.next, None);
    let first = client.ledger(&oneid, Some(2), None).await.unwrap();
    assert_eq!(first.entries, expected[..2]);
    let second = client
        .ledger(&oneid, Some(2), first.next.as_deref())
        .await
        .unwrap();
    assert_eq!(second.entries, expected[2..4]);
    let last = client
        .ledger(&oneid, Some(2), second.next.as_deref())
        .await
        .unwrap();
    assert_eq!(last.entries, expected[4..]);
    assert_eq!(last.next, None, "the last page has no next");
    assert_eq!(all_pages(&client, &oneid, 2).await, expected);
    assert_eq!(all_pages(&client, &oneid, 1).await, expected);

    // The whole document, by every route.
    let expected_doc = json!({
        "oneid": oneid,
        "identities": {"phone": [phone], "wechat_unionid": [wechat]},
        "attributes": {"age": 32.5, "city": "Shanghai", "vip": true},
        "points": {"balance": 1100, "lifetime_earned": 4599, "lifetime_redeemed": 500},
        "tier": "silver", "tier_since": ts(1),
            // Retention is 365 days (the default): ts counts minutes.
            "tier_retained_until": ts(1 + 365 * 24 * 60),
        "tags": ["newsletter"],
        "metrics": {"order_count": 2, "total_spend": "1500.00", "spend_365d": "1500.00",
                    "first_order_at": ts(1), "last_order_at": ts(2),
                    "last_order_on": {"douyin": ts(1), "tmall": ts(2)}},
        "channels": {"douyin": ts(1), "tmall": ts(2)},
        "segments": [],
        "version": 11,
        "created_at": ts(1), "updated_at": ts(11)
    });
    for doc in [
        client.profile(&oneid).await.unwrap().unwrap(),
        client.lookup("phone", phone).await.unwrap().unwrap(),
        client
            .lookup("wechat_unionid", &wechat)
            .await
            .unwrap()
            .unwrap(),
    ] {
        assert_eq!(doc_json(&doc), expected_doc);
    }

    // Metrics count exactly what this test sent: wt-1..4 and wt-6..11 applied, one duplicate,
    // two rejected.
    let metrics = client.metrics().await.unwrap();
    assert_eq!(node.metric("oneid_events_applied_total").await, 10);
    assert_eq!(node.metric("oneid_events_duplicate_total").await, 1);
    assert_eq!(node.metric("oneid_events_rejected_total").await, 2);
    assert!(node.metric("oneid_fsyncs_total").await >= 10);
    assert!(
        metrics.contains(&format!(
            "oneid_http_responses_total{{route=\"events\",status=\"2xx\"}} {posts}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "oneid_http_request_seconds_count{{route=\"events\"}} {posts}\n"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("oneid_http_request_seconds_bucket{route=\"lookup\",le=\"+Inf\"}"));
}

/// The rules document as `GET /v1/rules` gives the seed rules: defaults filled in, money with
/// two decimals, factors normalized, all as strings.
fn seeded_rules_doc() -> Value {
    json!({
        "points": {"per_currency_unit": "1", "tier_multipliers": {"gold": "2"},
                   "channel_multipliers": {"douyin": "1.5"}, "expire_after_days": 365},
        "tiers": {"window_days": 365, "retention_days": 365, "levels": [
            {"name": "member", "min_spend": "0.00"},
            {"name": "silver", "min_spend": "1000.00"},
            {"name": "gold", "min_spend": "5000.00"}]},
        "tag_rules": [{"tag": "big_spender", "when": "spend_365d >= 3000"}],
        "retention": {"dedup_days": 7, "ledger_days": 730, "change_log_hours": 72,
                      "change_log_entries_max": 1_000_000},
        "identity": {},
        "version": 0
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn rules_are_read_replaced_and_applied_to_later_orders() {
    let node = TestNode::start(options()).await;
    let client = node.client_once();
    let clock = Clock::new();
    assert_eq!(rules_json(&client).await.unwrap(), seeded_rules_doc());

    // Under the seed rules: floor(100.00 × 1.5) = 150 on Douyin.
    let before = send_one(
        &client,
        json!({"event_id": "r-1", "type": "order",
        "identities": {"phone": "13900000001"}, "channel": "douyin", "order_id": "A1",
        "amount": "100.00", "ts": clock.ts(1)}),
    )
    .await;
    let old_customer = before.oneid.clone().unwrap();
    assert_applied(&before, &old_customer);
    assert_eq!(
        client
            .profile(&old_customer)
            .await
            .unwrap()
            .unwrap()
            .points
            .balance,
        150
    );

    let new_rules = json!({
        "points": {"per_currency_unit": "2", "tier_multipliers": {"gold": 3},
                   "channel_multipliers": {"tmall": "1.250"}, "expire_after_days": 30},
        "tiers": {"window_days": 180, "retention_days": 90, "levels": [
            {"name": "member", "min_spend": 0},
            {"name": "silver", "min_spend": "500"},
            {"name": "gold", "min_spend": "5000.5"}]},
        "tag_rules": [{"tag": "repeat", "when": "order_count >= 2"}],
        "version": 7
    });
    // The document is replaced whole: without `retention`, the defaults. The version is the
    // cluster's (the first PUT's is 1), whatever the body says.
    let in_force = json!({
        "points": {"per_currency_unit": "2", "tier_multipliers": {"gold": "3"},
                   "channel_multipliers": {"tmall": "1.25"}, "expire_after_days": 30},
        "tiers": {"window_days": 180, "retention_days": 90, "levels": [
            {"name": "member", "min_spend": "0.00"},
            {"name": "silver", "min_spend": "500.00"},
            {"name": "gold", "min_spend": "5000.50"}]},
        "tag_rules": [{"tag": "repeat", "when": "order_count >= 2"}],
        "retention": {"dedup_days": 7, "ledger_days": 730, "change_log_hours": 72,
                      "change_log_entries_max": 1_000_000},
        "identity": {},
        "version": 1
    });
    let answered = client.set_rules(&rules_doc(&new_rules)).await.unwrap();
    assert_eq!(serde_json::to_value(answered).unwrap(), in_force);
    assert_eq!(rules_json(&client).await.unwrap(), in_force);

    // A new customer under the new rules: Tmall 100.00 × 2 × 1.25 = 250 (member); Douyin
    // 450.00 × 2 = 900 (no Douyin multiplier any more); spend 550 → silver; two orders → repeat.
    let phone = "13900000002";
    let first = send_one(
        &client,
        json!({"event_id": "r-2", "type": "order",
        "identities": {"phone": phone}, "channel": "tmall", "order_id": "B1",
        "amount": "100.00", "ts": clock.ts(2)}),
    )
    .await;
    let oneid = first.oneid.clone().unwrap();
    assert_applied(&first, &oneid);
    assert_applied(
        &send_one(
            &client,
            json!({"event_id": "r-3", "type": "order",
            "identities": {"phone": phone}, "channel": "douyin", "order_id": "B2",
            "amount": "450.00", "ts": clock.ts(3)}),
        )
        .await,
        &oneid,
    );
    let doc = client.profile(&oneid).await.unwrap().unwrap();
    assert_eq!(
        (
            doc.points.balance,
            doc.tier.as_str(),
            doc.tier_since.clone(),
            doc.tags.clone(),
            doc.metrics.spend_365d.as_str()
        ),
        (
            1150,
            "silver",
            clock.ts(3),
            vec!["repeat".to_string()],
            "550.00"
        )
    );
    // The old customer keeps what it earned; its next Douyin order earns by the new rules.
    assert_applied(
        &send_one(
            &client,
            json!({"event_id": "r-4", "type": "order",
            "oneid": old_customer, "channel": "douyin", "order_id": "A2",
            "amount": "100.00", "ts": clock.ts(4)}),
        )
        .await,
        &old_customer,
    );
    let page = client.ledger(&old_customer, None, None).await.unwrap();
    assert_eq!(
        page.entries,
        vec![
            entry("r-4", "earn", 200, 350, clock.ts(4), Some("order A2")),
            entry("r-1", "earn", 150, 150, clock.ts(1), Some("order A1")),
        ]
    );
    let doc = client.profile(&old_customer).await.unwrap().unwrap();
    assert_eq!(doc.tags, vec!["repeat".to_string()]);
}

/// A raw HTTP/1.1 exchange: status and body.
async fn raw_get(port: u16, path: &str) -> (u16, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&bytes[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, bytes[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn cluster_view_and_health() {
    let node = TestNode::start(options()).await;
    let client = node.client_once();
    let clock = Clock::new();
    let result = send_one(
        &client,
        json!({"event_id": "c-1", "type": "points_earn",
        "identities": {"phone": "13700000001"}, "points": 5, "ts": clock.ts(1)}),
    )
    .await;
    assert_eq!(result.status, EventStatus::Applied);

    let view = client.cluster().await.unwrap();
    assert_eq!(view.node, 1);
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(view.nodes[0].id, 1);
    assert_eq!(view.nodes[0].api, format!("127.0.0.1:{}", node.port));
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    assert!(
        config.contains(&format!("peer = \"{}\"", view.nodes[0].peer)),
        "{config}"
    );
    assert_eq!(
        view.shards.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    for shard in &view.shards {
        assert_eq!(shard.leader, Some(1), "{shard:?}");
        assert!(shard.term >= 1, "{shard:?}");
        assert!(shard.applied_index >= 1, "{shard:?}");
        assert!(shard.commit_index >= shard.applied_index, "{shard:?}");
        assert_eq!(shard.digest.len(), 16, "{shard:?}");
        assert!(
            shard
                .digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{shard:?}"
        );
    }

    let (status, body) = raw_get(node.port, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"status": "ok", "shards": 4})
    );
    let (status, body) = raw_get(node.port, "/metrics").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    for name in [
        "oneid_fsyncs_total ",
        "oneid_events_applied_total 1\n",
        "oneid_http_request_seconds_bucket{route=\"healthz\",le=\"+Inf\"} ",
        "oneid_http_request_seconds_count{route=\"cluster\"} 1\n",
    ] {
        assert!(text.contains(name), "no {name:?} in {text}");
    }
    // Every family has its HELP and TYPE, once, before its samples; and promtool agrees.
    let mut described: Vec<&str> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!described.contains(&name), "{name} described twice");
            described.push(name);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert_eq!(
                described.last(),
                Some(&name),
                "TYPE of {name} right after its HELP"
            );
        } else {
            let sample = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| sample.strip_suffix(suffix))
                .filter(|f| described.contains(f))
                .unwrap_or(sample);
            assert_eq!(described.last(), Some(&family), "{line} under its family");
        }
    }
    let output = promtool_check(&text);
    assert!(
        output.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `promtool check metrics` on `text`: promtool from `PROMTOOL`, the one scripts/test unpacks
/// into target/tools, or the path.
fn promtool_check(text: &str) -> std::process::Output {
    use std::io::Write;
    let unpacked = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .expect("target/")
        .join("tools/usr/bin/promtool");
    let promtool = std::env::var_os("PROMTOOL")
        .map(PathBuf::from)
        .or_else(|| unpacked.exists().then_some(unpacked))
        .unwrap_or_else(|| PathBuf::from("promtool"));
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {} ({e}): scripts/test unpacks it into target/tools",
                promtool.display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_body_answers_every_line_in_order() {
    let node = TestNode::start(options()).await;
    let client = node.client_once();
    let clock = Clock::new();
    let body = format!(
        "{}\n\n{}\n{}\n",
        json!({"event_id": "n-1", "type": "order", "identities": {"phone": "13600000001"},
            "order_id": "N1", "amount": "10.00", "ts": clock.ts(1)}),
        json!({"event_id": "n-2", "type": "points_earn", "identities": {"phone": "13600000002"},
            "points": 3, "ts": clock.ts(2)}),
        json!({"event_id": "n-3", "type": "tag_add", "identities": {"phone": "13600000001"},
            "tag": "ndjson", "ts": clock.ts(3)}),
    );
    let answer = client
        .send_events_raw(body.into(), true)
        .await
        .expect("NDJSON batch");
    assert_eq!(
        (answer.applied, answer.duplicates, answer.rejected),
        (3, 0, 0)
    );
    let ids: Vec<&str> = answer.results.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids, ["n-1", "n-2", "n-3"]);
    let first = answer.results[0].oneid.clone().unwrap();
    let second = answer.results[1].oneid.clone().unwrap();
    assert_ne!(first, second);
    assert_eq!(answer.results[2].oneid.as_deref(), Some(first.as_str()));
    let doc = client
        .lookup("phone", "13600000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (doc.oneid, doc.points.balance, doc.tags),
        (first, 10, vec!["ndjson".to_string()])
    );
}

/// `target/<profile>/oneid`, beside `oneid-node`.
fn cli_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let binary = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps")
        .join("oneid");
    assert!(
        binary.exists(),
        "{} does not exist: build it first (cargo build --workspace --bins)",
        binary.display()
    );
    binary
}

/// Runs the CLI against `server` off the async threads: exit status and stdout.
async fn cli(server: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut command = std::process::Command::new(cli_binary());
    command.arg("--server").arg(server).args(args);
    command.env_remove("ONEID_SERVER");
    let output = tokio::task::spawn_blocking(move || command.output().expect("running oneid"))
        .await
        .unwrap();
    (
        output.status,
        String::from_utf8(output.stdout).expect("UTF-8 output"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn cli_lookup_cluster_status_and_events_send() {
    let node = TestNode::start(options()).await;
    let client = node.client_once();
    let clock = Clock::new();
    let result = send_one(
        &client,
        json!({"event_id": "cli-1", "type": "order",
        "identities": {"phone": "13500000001"}, "channel": "douyin", "order_id": "C1",
        "amount": "20.00", "ts": clock.ts(1)}),
    )
    .await;
    let oneid = result.oneid.clone().unwrap();

    let (status, out) = cli(
        &node.base(),
        &["--json", "profile", "lookup", "phone", "13500000001"],
    )
    .await;
    assert!(status.success(), "{status}: {out}");
    let printed: ProfileDoc = serde_json::from_str(&out).expect("profile JSON");
    assert_eq!(printed.oneid, oneid);
    assert_eq!(printed.points.balance, 30);
    assert_eq!(
        printed,
        client
            .lookup("phone", "13500000001")
            .await
            .unwrap()
            .unwrap()
    );

    let (status, out) = cli(
        &node.base(),
        &["--json", "profile", "get", &oneid, "--stale"],
    )
    .await;
    assert!(status.success(), "{status}: {out}");
    assert_eq!(serde_json::from_str::<ProfileDoc>(&out).unwrap(), printed);

    // The node's clock entries move its applied indexes meanwhile: the ones printed lie
    // between a view taken before and one taken after.
    let before = client.cluster().await.unwrap();
    let (status, out) = cli(&node.base(), &["cluster", "status"]).await;
    assert!(status.success(), "{status}: {out}");
    let view = client.cluster().await.unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("cluster {}", view.cluster_id));
    // A node alone is the cluster's majority: its clock is off by nothing.
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["NODE", "API", "CLOCK", "UP"]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["1", &view.nodes[0].api, "+0.000", "s", "yes"]
    );
    assert!(lines[3].starts_with("SHARD"), "{out}");
    assert_eq!(lines.len(), 4 + view.shards.len(), "{out}");
    for ((shard, earlier), line) in view.shards.iter().zip(&before.shards).zip(&lines[4..]) {
        // One replica: nothing to compare its digest with.
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 6, "{out}");
        assert_eq!(
            [fields[0], fields[1], fields[2], fields[3], fields[5]],
            [
                shard.id.to_string().as_str(),
                "1",
                "1",
                shard.term.to_string().as_str(),
                "-"
            ],
            "{out}"
        );
        let applied: u64 = fields[4].strip_prefix("1:").unwrap().parse().unwrap();
        assert!(
            (earlier.applied_index..=shard.applied_index).contains(&applied),
            "{out}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    let lines: Vec<String> = (0..5)
        .map(|n| {
            json!({"event_id": format!("file-{n}"), "type": "points_earn",
                "identities": {"phone": format!("1350000010{n}")}, "points": n + 1,
                "ts": clock.ts(2)})
            .to_string()
        })
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let path = file.to_str().unwrap();
    let (status, out) = cli(&node.base(), &["events", "send", path]).await;
    assert!(status.success(), "{status}: {out}");
    assert_eq!(out.trim_end(), "applied 5, duplicates 0, rejected 0");
    let (status, out) = cli(&node.base(), &["events", "send", path]).await;
    assert!(status.success(), "{status}: {out}");
    assert_eq!(out.trim_end(), "applied 0, duplicates 5, rejected 0");
    for n in 0..5 {
        let doc = client
            .lookup("phone", &format!("1350000010{n}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(doc.points.balance, n + 1);
    }
    // A file with CRLF line ends reads the same.
    std::fs::write(&file, lines.join("\r\n") + "\r\n").unwrap();
    let (status, out) = cli(&node.base(), &["events", "send", path]).await;
    assert!(status.success(), "{status}: {out}");
    assert_eq!(out.trim_end(), "applied 0, duplicates 5, rejected 0");

    // Its reader gone before it prints (`oneid cluster status | head -0`): the CLI stops, as
    // Unix filters do, with no panic.
    let base = node.base();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(cli_binary())
            .args(["--server", &base, "cluster", "status"])
            .env_remove("ONEID_SERVER")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running oneid");
        drop(child.stdout.take());
        child.wait_with_output().expect("waiting")
    })
    .await
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        output.status.signal(),
        Some(SIGPIPE),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// SIGPIPE's number on Linux.
const SIGPIPE: i32 = 13;
