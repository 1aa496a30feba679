//! Segments on real processes: definitions and their errors, members, backfills, and the
//! membership stream: its framing, resuming after a disconnect and a restart with no gap and
//! no duplicate, snapshot-then-stream against the members list, a time-based exit at its
//! tick, retention (410), deletion (every exit, then the end), a subscriber that stops
//! reading, a shard leader killed mid-stream on a 3-node cluster, a deletion sent again
//! while a shard's leader is paused, and a change landing while the tailer reads for nobody.

use futures::StreamExt;
use oneid_client::{Client, Consistency, SegmentEvent, WatchFrom};
use oneid_protocol::num::{Millis, DAY_MS};
use oneid_protocol::segments::ChangeKind;
use oneid_protocol::ErrorCode;
use oneid_tests::cluster::{ClusterOptions, TestCluster};
use oneid_tests::sse::{exchange, request_small_window, SseEvent, SseStream};
use oneid_tests::{eventually, rules_doc, NodeOptions, TestNode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn earn(customer: &str, event_id: &str, points: i64) -> Value {
    json!({"event_id": event_id, "type": "points_earn", "identities": {"phone": customer},
        "points": points})
}

fn redeem(customer: &str, event_id: &str, points: i64) -> Value {
    json!({"event_id": event_id, "type": "points_redeem", "identities": {"phone": customer},
        "points": points})
}

fn addr(node: &TestNode) -> String {
    format!("127.0.0.1:{}", node.port)
}

/// Sends events that must all apply while a node may be killed: an event whose first answer
/// was lost with the node and that the client sent again is answered `duplicate`, with its
/// OneID. Answers their OneIDs.
async fn apply_through_kill(client: &Client, events: &[Value]) -> Vec<String> {
    send_expecting(client, events, true).await
}

/// Sends events that must all apply; answers their OneIDs.
async fn apply(client: &Client, events: &[Value]) -> Vec<String> {
    send_expecting(client, events, false).await
}

async fn send_expecting(client: &Client, events: &[Value], resent: bool) -> Vec<String> {
    let answer = client.send_events_json(events).await.expect("send");
    let took = answer.applied + if resent { answer.duplicates } else { 0 };
    assert_eq!(took as usize, events.len(), "{answer:?}");
    answer
        .results
        .into_iter()
        .map(|r| r.oneid.expect("applied"))
        .collect()
}

/// (oneid, change) of a data event.
fn change_of(event: &SseEvent) -> (String, String) {
    let data = event.data.as_ref().expect("a change");
    (
        data["oneid"].as_str().expect("oneid").to_string(),
        data["change"].as_str().expect("change").to_string(),
    )
}

/// Reads `n` data events; their (oneid, change), and the id of the last.
async fn read_changes(stream: &mut SseStream, n: usize) -> (Vec<(String, String)>, String) {
    let mut changes = Vec::new();
    let mut last = String::new();
    while changes.len() < n {
        let event = stream.next_data(WAIT).await.unwrap_or_else(|| {
            panic!("only {} of {n} changes arrived: {changes:?}", changes.len())
        });
        assert_eq!(
            event.data.as_ref().unwrap()["cursor"].as_str(),
            event.id.as_deref()
        );
        last = event.id.clone().expect("a change has an id");
        changes.push(change_of(&event));
    }
    (changes, last)
}

fn api_error(
    result: Result<impl std::fmt::Debug, oneid_client::Error>,
) -> (u16, ErrorCode, Option<String>, String) {
    match result {
        Err(oneid_client::Error::Api {
            status,
            code,
            field,
            message,
        }) => (status, code, field, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Defines `name` as `predicate` and opens its stream at the tail: the stream past its first
/// event (id-only: the start cursor, answered too).
async fn define_and_watch(node: &TestNode, name: &str, predicate: &str) -> (SseStream, String) {
    node.client()
        .put_segment(name, predicate, None)
        .await
        .unwrap();
    let path = format!("/v1/segments/{name}/stream");
    let mut stream = SseStream::open(&addr(node), &path, None).await.unwrap();
    let first = stream.next(WAIT).await.expect("the start");
    assert_eq!(
        (first.event.as_deref(), first.data.as_ref()),
        (None, None),
        "an id-only event first"
    );
    (stream, first.id.expect("the start cursor"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn definitions_documents_members_and_their_errors() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let (doc, created) = client
        .put_segment("rich", "points >= 10", Some("ten points or more"))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(
        (
            doc.name.as_str(),
            doc.predicate.as_str(),
            doc.description.as_str(),
            doc.generation,
            doc.size
        ),
        ("rich", "points >= 10", "ten points or more", 1, 0)
    );
    assert_eq!(
        (doc.backfill.state.as_str(), doc.backfill.profiles_total),
        ("done", 0)
    );
    let (same, created) = client
        .put_segment("rich", "points >= 10", Some("ten points or more"))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(same, doc, "an unchanged definition is answered as it is");
    client
        .put_segment("a-first", "has_tag(\"vip\")", None)
        .await
        .unwrap();
    let names: Vec<String> = client
        .segments()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["a-first", "rich"]);

    // Members, in pages, and the profile documents.
    let customers: Vec<String> = (0..7).map(|i| format!("1390000000{i}")).collect();
    let earns: Vec<Value> = customers
        .iter()
        .map(|c| earn(c, &format!("e-{c}"), 10))
        .collect();
    let mut oneids = apply(&client, &earns).await;
    apply(&client, &[earn("13911111111", "poor", 9)]).await;
    oneids.sort_by_key(|o| o.parse::<oneid_protocol::ids::OneId>().unwrap().0);
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let page = client
            .segment_members_page("rich", Some(3), cursor.as_deref())
            .await
            .unwrap();
        assert!(page.members.len() <= 3);
        paged.extend(page.members);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, oneids);
    let all: Vec<String> = client
        .segment_members("rich")
        .map(|m| m.unwrap())
        .collect()
        .await;
    assert_eq!(all, oneids);
    assert_eq!(client.segment("rich").await.unwrap().unwrap().size, 7);
    let profile = client.profile(&oneids[0]).await.unwrap().unwrap();
    assert_eq!(profile.segments, ["rich"]);
    let profile = client
        .lookup("phone", &customers[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(profile.segments, ["rich"]);

    // Errors: each with its status, code and field.
    let long = "d".repeat(1025);
    let refused = |result, status, code, field: Option<&str>| {
        let (got_status, got_code, got_field, message) = api_error(result);
        assert_eq!(
            (got_status, got_code, got_field.as_deref()),
            (status, code, field),
            "{message}"
        );
    };
    let put = |name: &'static str, predicate: &'static str, description: Option<&'static str>| {
        let client = client.clone();
        async move {
            client
                .put_segment(name, predicate, description)
                .await
                .map(|_| ())
        }
    };
    let page = |name: &'static str, limit, cursor: Option<&'static str>| {
        let client = client.clone();
        async move {
            client
                .segment_members_page(name, limit, cursor)
                .await
                .map(|_| ())
        }
    };
    refused(
        put("Rich", "points > 1", None).await,
        400,
        ErrorCode::InvalidField,
        Some("name"),
    );
    refused(
        put("bad", "points > \"x\"", None).await,
        400,
        ErrorCode::InvalidPredicate,
        Some("predicate"),
    );
    let long: &'static str = long.leak();
    refused(
        put("bad", "points > 1", Some(long)).await,
        400,
        ErrorCode::InvalidField,
        Some("description"),
    );
    refused(
        page("nope", None, None).await,
        404,
        ErrorCode::NotFound,
        None,
    );
    refused(
        page("rich", Some(0), None).await,
        400,
        ErrorCode::InvalidField,
        Some("limit"),
    );
    refused(
        page("rich", None, Some("x")).await,
        400,
        ErrorCode::InvalidCursor,
        Some("cursor"),
    );
    let (_, _, _, message) = api_error(client.put_segment("bad", "points >\n  and", None).await);
    assert_eq!(
        message,
        "line 2, column 3: expected a value (a number, a string, true or false) but found \"and\""
    );
    assert!(client.segment("nope").await.unwrap().is_none());
    let (status, code, field, _) = api_error(client.delete_segment("nope").await);
    assert_eq!(
        (status, code, field.as_deref()),
        (404, ErrorCode::NotFound, Some("name"))
    );
    let a = addr(&node);
    let (status, _, body) = exchange(&a, "GET", "/v1/segments/rich/members?limit=x", "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"field\":\"limit\""), "{body}");
    let (status, _, _) = exchange(&a, "GET", "/v1/segments/rich/members?limit=5000", "").await;
    assert_eq!(status, 200, "above 1,000 is clamped");
    let (status, head, _) = exchange(&a, "POST", "/v1/segments/rich", "{}").await;
    assert_eq!(status, 405);
    assert!(head.contains("allow: get, put, delete"), "{head}");
    let (status, _, body) = exchange(&a, "PUT", "/v1/segments/x", "{\"predicate\": 1}").await;
    assert_eq!(
        (status, body.contains("bad_request")),
        (400, true),
        "{body}"
    );
    for (path, status, code) in [
        (
            "/v1/segments/rich/stream?cursor=nonsense",
            400,
            "invalid_cursor",
        ),
        ("/v1/segments/nope/stream", 404, "not_found"),
        (
            "/v1/segments/rich/stream?snapshot=maybe",
            400,
            "invalid_field",
        ),
    ] {
        let (got, body) = SseStream::open(&a, path, None)
            .await
            .err()
            .expect("refused");
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(code), "{path}: {body}");
    }
    // The node keeps serving.
    assert!(client.healthy().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_after_a_disconnect_and_a_restart_with_no_gap_and_no_duplicate() {
    let mut node = TestNode::start(NodeOptions::default()).await;
    let client = node.client();
    let a = addr(&node);
    let (mut stream, start) = define_and_watch(&node, "rich", "points >= 10").await;

    let customers: Vec<String> = (0..20).map(|i| format!("1380000{i:04}")).collect();
    let earns: Vec<Value> = customers[..10]
        .iter()
        .map(|c| earn(c, &format!("a-{c}"), 10))
        .collect();
    apply(&client, &earns).await;
    let (before, last) = read_changes(&mut stream, 4).await;
    drop(stream);

    let more: Vec<Value> = customers[10..]
        .iter()
        .map(|c| earn(c, &format!("b-{c}"), 10))
        .collect();
    apply(&client, &more).await;
    let exits: Vec<Value> = customers[..3]
        .iter()
        .map(|c| redeem(c, &format!("r-{c}"), 5))
        .collect();
    apply(&client, &exits).await;
    node.terminate();
    node.restart().await;

    let mut resumed = SseStream::open(&a, "/v1/segments/rich/stream?cursor=ignored", Some(&last))
        .await
        .unwrap();
    let opened = resumed.next(WAIT).await.expect("the start");
    assert_eq!(
        opened.id.as_deref(),
        Some(last.as_str()),
        "Last-Event-ID wins over ?cursor="
    );
    let (after, _) = read_changes(&mut resumed, 6 + 10 + 3).await;
    assert!(
        resumed
            .next_data(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing more"
    );

    // Everything from the start, read in one go, is the same changes.
    let mut whole = SseStream::open(
        &a,
        &format!("/v1/segments/rich/stream?cursor={start}"),
        None,
    )
    .await
    .unwrap();
    let (all, _) = read_changes(&mut whole, 23).await;
    let mut seen: Vec<(String, String)> = before.iter().chain(&after).cloned().collect();
    assert_eq!(
        seen.iter().collect::<BTreeSet<_>>().len(),
        23,
        "no duplicate"
    );
    seen.sort();
    let mut all_sorted = all.clone();
    all_sorted.sort();
    assert_eq!(seen, all_sorted, "no gap");
    assert_eq!(all.iter().filter(|(_, c)| c == "exit").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn a_snapshot_then_the_stream_equals_the_members_while_writes_go_on() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client();
    let customers: Vec<String> = (0..300).map(|i| format!("1370000{i:04}")).collect();
    let earns: Vec<Value> = customers
        .iter()
        .map(|c| earn(c, &format!("a-{c}"), 10))
        .collect();
    apply(&client, &earns).await;
    client
        .put_segment("rich", "points >= 10", None)
        .await
        .unwrap();
    // Writes go on while the snapshot is read: some leave, some enter.
    let writer = {
        let client = client.clone();
        let customers = customers.clone();
        tokio::spawn(async move {
            for round in 0..10 {
                let batch: Vec<Value> = (0..20)
                    .map(|i| {
                        let n = round * 20 + i;
                        if n % 2 == 0 {
                            redeem(&customers[n], &format!("r-{n}"), 5)
                        } else {
                            earn(&format!("1360000{n:04}"), &format!("n-{n}"), 10)
                        }
                    })
                    .collect();
                apply(&client, &batch).await;
            }
        })
    };
    let mut members: BTreeSet<String> = BTreeSet::new();
    let mut seen: Vec<String> = Vec::new();
    let mut watch = std::pin::pin!(client.watch_segment("rich", WatchFrom::Snapshot));
    let mut snapshot_done = false;
    let mut writer = Some(writer);
    // The members kept from the watch equal the listed ones once the snapshot has ended, the
    // writes have stopped and the watch has caught up with them: each check reads what the
    // watch has until it is quiet for 500 ms, then compares.
    eventually(
        "the watched members equalling the listed ones",
        WAIT * 3,
        async || {
            while let Ok(next) =
                tokio::time::timeout(Duration::from_millis(500), watch.next()).await
            {
                match next {
                    Some(Ok(SegmentEvent::SnapshotStart)) => members.clear(),
                    Some(Ok(SegmentEvent::Member(m))) => {
                        assert_eq!(m.change, ChangeKind::Enter);
                        members.insert(m.oneid);
                    }
                    Some(Ok(SegmentEvent::SnapshotEnd { members: count, .. })) => {
                        assert_eq!(count as usize, members.len());
                        snapshot_done = true;
                    }
                    Some(Ok(SegmentEvent::Change(c))) => {
                        assert!(snapshot_done);
                        seen.push(format!("{c:?}"));
                        let oneid = c.oneid.clone();
                        let fresh = match c.change {
                            ChangeKind::Enter => members.insert(c.oneid),
                            ChangeKind::Exit => members.remove(&c.oneid),
                            ChangeKind::Other(other) => panic!("a change {other}"),
                        };
                        let history: Vec<&String> =
                            seen.iter().filter(|l| l.contains(&oneid)).collect();
                        assert!(fresh, "{oneid} entered or left twice: {history:?}");
                    }
                    other => panic!("the watch answered {other:?}"),
                }
            }
            // A writer that failed fails the test here, with its own message.
            if let Some(done) = writer.take_if(|w| w.is_finished()) {
                done.await.unwrap();
            }
            if !snapshot_done || writer.is_some() {
                return Err(format!(
                    "snapshot ended: {snapshot_done}, writes done: {}",
                    writer.is_none()
                ));
            }
            let listed: BTreeSet<String> = client
                .segment_members("rich")
                .map(|m| m.unwrap())
                .collect()
                .await;
            if listed == members {
                Ok(())
            } else {
                Err(format!("{} kept, {} listed", members.len(), listed.len()))
            }
        },
    )
    .await;
    assert_eq!(members.len(), 300 - 100 + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_evaluates_existing_profiles_and_a_rules_change_re_evaluates_them() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client();
    let earns: Vec<Value> = (0..250)
        .map(|i| {
            earn(
                &format!("1350000{i:04}"),
                &format!("e-{i}"),
                if i % 5 == 0 { 50 } else { 5 },
            )
        })
        .collect();
    apply(&client, &earns).await;
    client
        .put_segment("fifty", "points >= 50", None)
        .await
        .unwrap();
    client
        .put_segment("tagged", "has_tag(\"rich\")", None)
        .await
        .unwrap();
    let doc = eventually("the backfill", WAIT, || async {
        let doc = client.segment("fifty").await.unwrap().unwrap();
        (doc.backfill.state == "done").then_some(doc)
    })
    .await;
    assert_eq!(
        (
            doc.size,
            doc.backfill.profiles_done,
            doc.backfill.profiles_total
        ),
        (50, 250, 250)
    );

    let rules = json!({"tag_rules": [{"tag": "rich", "when": "points >= 5"}]});
    client.set_rules(&rules_doc(&rules)).await.unwrap();
    eventually("rule tags re-evaluated in the background", WAIT, || async {
        let doc = client.segment("tagged").await.unwrap().unwrap();
        (doc.size == 250).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_based_exit_arrives_at_the_tick_that_crosses_its_threshold() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client();
    let recent = "days_since(last_order_on(\"douyin\")) < 1";
    let (mut stream, _) = define_and_watch(&node, "today", recent).await;
    // An order on Douyin a day ago, less 4 seconds: in now, out 4 seconds from now.
    let ordered = Millis(Millis::from_system_time(std::time::SystemTime::now()).0 - DAY_MS + 4_000);
    let order = json!({"event_id": "o-1", "type": "order", "identities": {"phone": "13400000001"},
        "order_id": "T1", "amount": "10.00", "channel": "douyin", "ts": ordered.to_string()});
    apply(&client, &[order]).await;
    let enter = stream.next_data(WAIT).await.expect("the enter");
    assert_eq!(change_of(&enter).1, "enter");
    let exit = stream
        .next_data(WAIT)
        .await
        .expect("the exit, without any event");
    assert_eq!(change_of(&exit).1, "exit");
    let at = Millis::parse_rfc3339(exit.data.as_ref().unwrap()["at"].as_str().unwrap()).unwrap();
    let due = Millis(ordered.0 + DAY_MS);
    assert!(at >= due, "left at {at}, before its time {due}");
    // Clock entries come every 200 ms: the exit is the first tick past the threshold.
    assert!(at.0 - due.0 < 2_000, "left at {at}, long after {due}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_change_log_keeps_is_410() {
    let node = TestNode::start(NodeOptions {
        extra: "[segments]\nchange_log_entries_max = 5\n".into(),
        ..NodeOptions::default()
    })
    .await;
    let client = node.client();
    let a = addr(&node);
    let (stream, start) = define_and_watch(&node, "rich", "points >= 10").await;
    drop(stream);
    // Twelve changes on one shard, one request each (the log keeps a command's changes
    // together): past its five, the oldest are evicted at the next tick.
    for i in 0..12 {
        let customer = oneid_tests::value_where("phone", &format!("1330{i}"), 4, |s| s == 1);
        apply(&client, &[earn(&customer, &format!("e-{customer}"), 10)]).await;
    }
    let path = format!("/v1/segments/rich/stream?cursor={start}");
    let (status, body) = eventually("the cursor's expiry", WAIT, || async {
        SseStream::open(&a, &path, None).await.err()
    })
    .await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("cursor_expired"), "{body}");
    // The client's watch ends with the same error.
    let mut watch = std::pin::pin!(client.watch_segment("rich", WatchFrom::Cursor(start)));
    let (status, code, _, _) = api_error(watch.next().await.unwrap());
    assert_eq!((status, code), (410, ErrorCode::CursorExpired));
    assert!(watch.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_segment_emits_every_exit_then_ends_its_streams() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client();
    let (mut stream, _) = define_and_watch(&node, "rich", "points >= 10").await;
    let earns: Vec<Value> = (0..5)
        .map(|i| earn(&format!("1320000000{i}"), &format!("e-{i}"), 10))
        .collect();
    let oneids: BTreeSet<String> = apply(&client, &earns).await.into_iter().collect();
    let (enters, _) = read_changes(&mut stream, 5).await;
    assert!(enters.iter().all(|(_, c)| c == "enter"));
    client.delete_segment("rich").await.unwrap();
    let (exits, _) = read_changes(&mut stream, 5).await;
    let left: BTreeSet<String> = exits
        .iter()
        .map(|(o, c)| {
            assert_eq!(c, "exit");
            o.clone()
        })
        .collect();
    assert_eq!(left, oneids);
    while stream.next(WAIT).await.is_some() {}
    assert!(stream.ended, "the stream ends after the last exit");
    assert!(client.segment("rich").await.unwrap().is_none());
    for oneid in &oneids {
        assert!(client
            .profile(oneid)
            .await
            .unwrap()
            .unwrap()
            .segments
            .is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_slows_neither_apply_nor_the_others() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client();
    let a = addr(&node);
    let (mut reader, _) = define_and_watch(&node, "rich", "points >= 10").await;
    // Asks for the stream, and never reads a byte of it.
    let _stalled = request_small_window(&a, "/v1/segments/rich/stream").await;
    // More changes than a subscriber's buffer holds (SUBSCRIBER_FRAMES_MAX, 1,024), in
    // batches of a hundred: a burst the reading subscriber takes in one go, however loaded the
    // machine, while the stalled one's buffer fills all the same.
    const WRITES: usize = 12_000;
    const BATCH: usize = 100;
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for first in (0..WRITES).step_by(BATCH) {
                let batch: Vec<Value> = (first..first + BATCH)
                    .map(|i| earn(&format!("131{i:08}"), &format!("e-{i}"), 10))
                    .collect();
                apply(&client, &batch).await;
            }
        })
    };
    let mut entered = BTreeSet::new();
    while entered.len() < WRITES {
        let event = reader
            .next_data(WAIT)
            .await
            .unwrap_or_else(|| panic!("the reading subscriber stalled at {}", entered.len()));
        assert!(entered.insert(change_of(&event).0), "a duplicate");
    }
    writer.await.unwrap();
    let closed = eventually("the stalled stream's close", WAIT, || async {
        let n = node.metric("oneid_streams_closed_behind_total").await;
        (n >= 1).then_some(n)
    })
    .await;
    assert_eq!(closed, 1, "only the stalled stream fell behind");
    assert_eq!(
        node.metric("oneid_streams_open").await,
        1,
        "the reader's stream is still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn a_stream_resumes_on_another_node_when_a_shard_leader_is_killed() {
    let mut cluster = TestCluster::start(ClusterOptions {
        clock_interval_ms: 500,
        ..ClusterOptions::default()
    })
    .await;
    // The victim leads shard 0; the watch connects to it first, the writer never does.
    let victim = cluster.leaders().await[&0];
    let base = |id: u64| cluster.node(id).base();
    let others: Vec<String> = (1..=3).filter(|id| *id != victim).map(base).collect();
    let watcher = Client::new(&format!("{},{}", base(victim), others.join(","))).unwrap();
    watcher
        .put_segment("rich", "points >= 10", None)
        .await
        .unwrap();
    let writer_client = Client::new(&others.join(",")).unwrap();
    let mut watch = std::pin::pin!(watcher.watch_segment("rich", WatchFrom::Tail));
    // The stream is open once a canary's enter comes through it: each check sends a canary
    // and reads the watch for a second.
    let mut canaries = BTreeSet::new();
    let mut n = 0;
    eventually(
        "the opening of the watch's stream",
        Duration::from_secs(60),
        async || {
            let canary = apply(
                &writer_client,
                &[earn(&format!("1399{n:07}"), &format!("c-{n}"), 10)],
            )
            .await;
            n += 1;
            canaries.extend(canary);
            let until = Instant::now() + Duration::from_secs(1);
            while let Ok(Some(event)) = tokio::time::timeout_at(until.into(), watch.next()).await {
                if let SegmentEvent::Change(change) = event.unwrap() {
                    assert!(canaries.contains(&change.oneid));
                    return Some(());
                }
            }
            None
        },
    )
    .await;
    // Half the writes before the kill, half after it.
    let (kill_done, mut after_kill) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let mut oneids = BTreeSet::new();
        for round in 0..40 {
            if round == 20 {
                after_kill.wait_for(|killed| *killed).await.unwrap();
            }
            let batch: Vec<Value> = (0..10)
                .map(|i| {
                    earn(
                        &format!("1300{round:03}{i:04}"),
                        &format!("e-{round}-{i}"),
                        10,
                    )
                })
                .collect();
            oneids.extend(apply_through_kill(&writer_client, &batch).await);
        }
        oneids
    });
    let mut received: BTreeMap<String, usize> = BTreeMap::new();
    let mut killed = false;
    let deadline = Instant::now() + WAIT * 6;
    let mut writer = Some(writer);
    let mut expected = None;
    loop {
        if !killed && received.len() >= 60 {
            cluster.node_mut(victim).kill9();
            killed = true;
            kill_done.send_replace(true);
        }
        if let Some(done) = writer.as_ref().filter(|w| w.is_finished()) {
            let _ = done;
            expected = Some(writer.take().unwrap().await.unwrap());
        }
        if let Some(expected) = &expected {
            if received.len() == expected.len() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} changes received",
            received.len()
        );
        match tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
            Ok(Some(Ok(SegmentEvent::Change(change)))) => {
                assert_eq!(change.change, ChangeKind::Enter);
                if !canaries.contains(&change.oneid) {
                    *received.entry(change.oneid).or_default() += 1;
                }
            }
            Ok(other) => panic!("the watch answered {other:?}"),
            Err(_) => {}
        }
    }
    assert!(killed);
    let expected = expected.unwrap();
    assert_eq!(
        received.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "no gap"
    );
    assert!(received.values().all(|n| *n == 1), "no duplicate");
}

/// A DELETE while a shard's leader is paused: the shard cannot install the deletion until a
/// new leader is elected, so the first answer is 503; the DELETE sent again answers 204 and
/// installs it there. Then every profile on every node has left the segment, and its stream
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn a_delete_sent_again_while_a_shard_leader_changes_reaches_every_shard() {
    let cluster = TestCluster::start(ClusterOptions {
        clock_interval_ms: 500,
        ..ClusterOptions::default()
    })
    .await;
    let leaders = eventually("a leader for every shard", WAIT, async || {
        let leaders = cluster.leaders().await;
        match leaders.len() == cluster.options.shards as usize {
            true => Ok(leaders),
            false => Err(leaders),
        }
    })
    .await;
    // The registry shard's leader takes the requests; another node's shards lose theirs.
    let registry = leaders[&0];
    let paused = *leaders
        .values()
        .find(|node| **node != registry)
        .expect("a shard led elsewhere");
    let client = cluster.node(registry).client();
    client
        .put_segment("rich", "points >= 10", None)
        .await
        .unwrap();
    let earns: Vec<Value> = (0..40)
        .map(|i| earn(&format!("1330000{i:04}"), &format!("e-{i}"), 10))
        .collect();
    let oneids = apply(&client, &earns).await;
    let path = "/v1/segments/rich/stream";
    let mut stream = SseStream::open(&addr(cluster.node(registry)), path, None)
        .await
        .unwrap();
    stream.next(WAIT).await.expect("the start");

    cluster.node(paused).signal("STOP");
    // The client sends a 503 again by itself; a 404 here (a retry that found the registry's
    // tombstone and installed nothing) would never turn into a 204.
    eventually(
        "the delete answered 204",
        Duration::from_secs(60),
        async || {
            client
                .delete_segment("rich")
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    cluster.node(paused).signal("CONT");

    for node in 1..=3 {
        let reader = cluster.node(node).client_once();
        eventually("every member's exit", WAIT, async || {
            for oneid in &oneids {
                let profile = reader.profile_at(oneid, Consistency::Stale).await;
                let segments = profile
                    .map_err(|e| e.to_string())?
                    .expect("a profile")
                    .segments;
                if !segments.is_empty() {
                    return Err(format!("node {node}: {oneid} is still in {segments:?}"));
                }
            }
            Ok(())
        })
        .await;
    }
    while stream.next(WAIT).await.is_some() {}
    assert!(stream.ended, "the stream ends after the last exit");
}

/// A node started with the failpoint `failpoint` (`name=action`), with the segment `rich`
/// (`points >= 10`) defined.
async fn rich_node_held_at(failpoint: &str) -> (TestNode, Client) {
    let mut node = TestNode::create(NodeOptions::default());
    node.restart_with_env(&[], &[("FAILPOINTS", failpoint)])
        .await;
    let client = node.client();
    client
        .put_segment("rich", "points >= 10", None)
        .await
        .unwrap();
    (node, client)
}

/// A change that lands while the tailer reads its shard's log end for nobody reaches a stream
/// opened meanwhile, promptly: a failpoint holds the tailer 0.6 s after each such read, and
/// each round opens a stream when none is open, then writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_a_stream_opened_while_the_tailer_reads_for_nobody() {
    let (node, client) = rich_node_held_at("streams::tail_after_end=return(600)").await;
    for round in 0..5 {
        eventually("no stream open", WAIT, async || {
            (node.metric("oneid_streams_open").await == 0).then_some(())
        })
        .await;
        let path = "/v1/segments/rich/stream";
        let mut stream = SseStream::open(&addr(&node), path, None).await.unwrap();
        stream.next(WAIT).await.expect("the start");
        let customer = format!("1340000{round:04}");
        let oneids = apply(&client, &[earn(&customer, &format!("t-{round}"), 10)]).await;
        let event = stream
            .next_data(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("round {round}: the change did not arrive within 2 s"));
        assert_eq!(change_of(&event), (oneids[0].clone(), "enter".to_string()));
    }
}

/// A tail stream has every change applied after its answer, however late its subscriber
/// starts: the tail is read before the node answers (a failpoint holds each subscriber 0.5 s
/// before it starts; read by the subscriber, the tail skipped what landed meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_stream_has_every_change_after_its_answer_however_late_its_subscriber() {
    let (node, client) = rich_node_held_at("streams::subscriber_start=return(500)").await;
    let mut stream = SseStream::open(&addr(&node), "/v1/segments/rich/stream", None)
        .await
        .unwrap();
    // Written as soon as the stream is answered, before its subscriber starts.
    let oneids = apply(&client, &[earn("13500000000", "late-1", 10)]).await;
    let event = stream.next_data(WAIT).await.expect("the change arrives");
    assert_eq!(change_of(&event), (oneids[0].clone(), "enter".to_string()));
}
