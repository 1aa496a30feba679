//! Time that no single node can move, on real processes: a 3-node cluster takes 192 events,
//! then node 1 restarts with its wall clock 30 days ahead (by the node's failpoint, and by
//! Debian's libfaketime preloaded) and leads the shards placed on it. No shard's clock moves
//! ahead of real time, nothing expires early, every acknowledged event resent is a
//! `duplicate`, events it dates are dated by the cluster's time, and everyone sees its offset.

use oneid_client::Client;
use oneid_protocol::api::{EventStatus, EventsResponse};
use oneid_protocol::num::{Millis, DAY_MS};
use oneid_tests::cluster::{ClusterOptions, TestCluster};
use oneid_tests::eventually;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

const CUSTOMERS: usize = 64;
/// How far node 1's clock is ahead.
const AHEAD_MS: i64 = 30 * DAY_MS;
/// How far a shard's clock may be from real time: the freshness of the clocks a leader hears
/// (`CLOCK_FRESH`), as the majority time lags what the nodes read.
const BOUND_MS: i64 = 2_000;
/// How far an estimated clock offset may be from the true one on a loaded machine.
const OFFSET_SLACK_MS: i64 = 5_000;

fn now() -> Millis {
    Millis::from_system_time(SystemTime::now())
}

fn phone(customer: usize) -> String {
    format!("1390000{customer:04}")
}

/// Each customer's order (100 points), an earn without `ts` (10 points), and a tag: all of
/// them expire 10 days on (the rules' `expire_after_days`, the tag's `expires_at`).
fn events(at: Millis) -> Vec<Value> {
    let tag_expires = Millis(at.0 + 10 * DAY_MS).to_string();
    (0..CUSTOMERS)
        .flat_map(|c| {
            let identities = json!({"phone": phone(c)});
            [
                json!({"event_id": format!("o{c}"), "type": "order", "identities": identities,
                    "order_id": format!("O{c}"), "amount": "100", "ts": at.to_string()}),
                json!({"event_id": format!("e{c}"), "type": "points_earn",
                    "identities": identities, "points": 10}),
                json!({"event_id": format!("t{c}"), "type": "tag_add", "identities": identities,
                    "tag": "vip", "expires_at": tag_expires}),
            ]
        })
        .collect()
}

/// Sends `events` in batches, retrying what a leader change left unavailable, until each is
/// applied or a duplicate; answers each event's status and OneID by event id.
async fn send(client: &Client, events: &[Value]) -> BTreeMap<String, (EventStatus, String)> {
    let mut answers = BTreeMap::new();
    for batch in events.chunks(48) {
        let answer: EventsResponse =
            eventually("a batch taken", Duration::from_secs(30), async || {
                let answer = client
                    .send_events_json(batch)
                    .await
                    .map_err(|e| e.to_string())?;
                match answer.results.iter().all(|r| r.oneid.is_some()) {
                    true => Ok(answer),
                    false => Err(format!("{answer:?}")),
                }
            })
            .await;
        for result in answer.results {
            answers.insert(result.event_id, (result.status, result.oneid.unwrap()));
        }
    }
    answers
}

/// The scenario, with node 1 restarted under `skew` (environment variables).
#[allow(clippy::too_many_lines)]
async fn a_node_30_days_ahead(skew: &[(&str, &str)]) {
    let mut cluster = TestCluster::start(ClusterOptions {
        clock_interval_ms: 200,
        extra: "[rules.points]\nexpire_after_days = 10\n".into(),
        ..ClusterOptions::default()
    })
    .await;
    let all = events(now());
    let first = send(&cluster.node(2).client(), &all).await;
    assert!(
        first.values().all(|(s, _)| *s == EventStatus::Applied),
        "{first:?}"
    );
    assert_eq!(first.len(), 3 * CUSTOMERS);

    cluster.node_mut(1).terminate();
    cluster.node_mut(1).restart_with_env(&[], skew).await;
    // Leadership of the shards placed on node 1 comes home; then it proposes clock entries.
    let node_1 = async || cluster.node(1).client_once().cluster().await;
    let (shard, applied) = eventually(
        "node 1 leading a shard",
        Duration::from_secs(60),
        async || {
            let view = node_1().await.map_err(|e| e.to_string())?;
            let led = view.shards.iter().find(|s| s.role == "leader");
            led.map(|s| (s.id, s.applied_index))
                .ok_or(format!("{:?}", view.shards))
        },
    )
    .await;
    eventually(
        "ten clock entries under node 1",
        Duration::from_secs(60),
        async || {
            let view = node_1().await.map_err(|e| e.to_string())?;
            let s = view.shards.iter().find(|s| s.id == shard).expect("hosted");
            (s.role == "leader" && s.applied_index >= applied + 10)
                .then_some(())
                .ok_or(format!("{s:?}"))
        },
    )
    .await;

    // No shard's clock is ahead of real time, on any replica.
    for (node, view) in cluster.views().await {
        let real = now();
        for s in &view.shards {
            let clock = Millis::parse_rfc3339(&s.clock).expect("a clock");
            assert!(
                clock.0 <= real.0 + BOUND_MS,
                "node {node} shard {}: clock {clock} ahead of real time {real}",
                s.id
            );
        }
    }
    // Everyone sees node 1's offset, node 1 included.
    let view = cluster.node(2).client().cluster().await.unwrap();
    let offsets: Vec<i64> = view
        .nodes
        .iter()
        .map(|n| n.clock_offset_ms.unwrap())
        .collect();
    assert!(
        (offsets[0] - AHEAD_MS).abs() <= OFFSET_SLACK_MS,
        "{offsets:?}"
    );
    assert!(
        offsets[1..].iter().all(|o| o.abs() <= OFFSET_SLACK_MS),
        "{offsets:?}"
    );
    let metrics = cluster.node(1).client().metrics().await.unwrap();
    let seconds: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("oneid_clock_offset_seconds "))
        .and_then(|v| v.parse().ok())
        .expect("the offset gauge");
    assert!(
        (seconds * 1000.0 - AHEAD_MS as f64).abs() <= OFFSET_SLACK_MS as f64,
        "{seconds}"
    );
    eventually(
        "node 1 saying its clock is off",
        Duration::from_secs(30),
        async || {
            let logs = cluster.node(1).logs();
            logs.contains("wall clock is far off the cluster's majority time")
                .then_some(())
                .ok_or(())
        },
    )
    .await;

    // Nothing expired: every customer keeps 110 points and the tag.
    let client = cluster.node(1).client();
    for c in 0..CUSTOMERS {
        let profile = client.lookup("phone", &phone(c)).await.unwrap().unwrap();
        assert_eq!(
            (profile.points.balance, profile.tags.clone()),
            (110, vec!["vip".to_string()]),
            "customer {c}"
        );
    }
    // Every acknowledged event, resent through the fast node, is a duplicate of itself.
    let again = send(&client, &all).await;
    for (event, (status, oneid)) in &again {
        assert_eq!(
            (status.clone(), oneid),
            (EventStatus::Duplicate, &first[event].1),
            "{event}"
        );
    }
    // What node 1 dates, the cluster's time dates; a `ts` two days ahead is refused.
    let sent_at = now();
    let dated = send(
        &client,
        &[json!({"event_id": "late", "type": "points_earn",
        "identities": {"phone": phone(0)}, "points": 1})],
    )
    .await;
    let ledger = client
        .ledger(&dated["late"].1, Some(1), None)
        .await
        .unwrap();
    let at = Millis::parse_rfc3339(&ledger.entries[0].at).unwrap();
    assert!(
        (at.0 - sent_at.0).abs() <= OFFSET_SLACK_MS,
        "dated {at}, sent at {sent_at}"
    );
    let ahead = Millis(now().0 + 2 * DAY_MS).to_string();
    let answer = client
        .send_events_json(&[json!({"event_id": "ahead", "type": "points_earn",
            "identities": {"phone": phone(0)}, "points": 1, "ts": ahead})])
        .await
        .unwrap();
    let error = answer.results[0].error.as_ref().expect("refused");
    assert_eq!(
        (answer.results[0].status.clone(), error.field.as_deref()),
        (EventStatus::Rejected, Some("ts"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_30_days_ahead_moves_no_shard_clock() {
    let offset = format!("clock::wall_offset_ms=return({AHEAD_MS})");
    a_node_30_days_ahead(&[("FAILPOINTS", &offset)]).await;
}

/// libfaketime from `ONEID_LIBFAKETIME`, or the one scripts/test unpacks from Debian's
/// package into `target/tools`.
fn libfaketime() -> PathBuf {
    if let Some(path) = std::env::var_os("ONEID_LIBFAKETIME") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    assert!(
        path.exists(),
        "no libfaketime at {}: run scripts/test, which unpacks Debian's, or set ONEID_LIBFAKETIME",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_faketime_30_days_ahead_moves_no_shard_clock() {
    let lib = libfaketime();
    a_node_30_days_ahead(&[
        ("LD_PRELOAD", lib.to_str().expect("a UTF-8 path")),
        ("FAKETIME", "+30d"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ])
    .await;
}
