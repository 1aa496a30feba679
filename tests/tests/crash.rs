//! Durability: every acknowledged event survives kill -9 exactly once, and re-sending changes
//! nothing.

use oneid_protocol::api::EventStatus;
use oneid_tests::{eventually, NodeOptions, TestNode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CUSTOMERS: usize = 50;
const BATCHES: usize = 40;
const BATCH: usize = 50;

/// Event `n` of the run: an order of a known amount, or a points earn, for one customer.
fn event(n: usize) -> (usize, Value, i64, u64) {
    let customer = n % CUSTOMERS;
    let phone = format!("1380000{customer:04}");
    if n.is_multiple_of(3) {
        let e = json!({"event_id": format!("c-{n}"), "type": "points_earn", "identities": {"phone": phone}, "points": 7});
        (customer, e, 7, 0)
    } else {
        let e = json!({"event_id": format!("c-{n}"), "type": "order", "identities": {"phone": phone}, "order_id": format!("T{n}"), "amount": "10.00"});
        (customer, e, 10, 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn acknowledged_events_survive_kill_9_exactly_once() {
    let mut node = TestNode::start(NodeOptions::quiet()).await;
    let all: Vec<(usize, Value, i64, u64)> = (0..BATCHES * BATCH).map(event).collect();

    // Send batches from a task; kill the node while batches are in flight.
    let client = node.client_once();
    let batches: Vec<Vec<Value>> = all
        .chunks(BATCH)
        .map(|c| c.iter().map(|(_, e, _, _)| e.clone()).collect())
        .collect();
    let answered = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&answered);
    let sender = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            match client.send_events_json(batch).await {
                Ok(answer) => {
                    for (j, result) in answer.results.iter().enumerate() {
                        if result.status == EventStatus::Applied {
                            acknowledged.push(i * BATCH + j);
                        }
                    }
                    counted.store(acknowledged.len(), Ordering::SeqCst);
                }
                Err(_) => break,
            }
        }
        acknowledged
    });
    // Wait until some batches are acknowledged (to the client: the node's applied count runs
    // ahead of the answers), then kill.
    eventually(
        "the acknowledgement of 8 batches",
        Duration::from_secs(60),
        async || (answered.load(Ordering::SeqCst) >= BATCH * 8).then_some(()),
    )
    .await;
    node.kill9();
    let acknowledged = sender.await.unwrap();
    assert!(
        acknowledged.len() >= BATCH * 8,
        "only {} acknowledged before the kill",
        acknowledged.len()
    );
    eprintln!(
        "acknowledged {} of {} events before kill -9",
        acknowledged.len(),
        all.len()
    );

    node.restart().await;
    let client = node.client();
    // Every acknowledged event is there: re-sending it answers `duplicate`.
    let resend: Vec<Value> = acknowledged.iter().map(|&n| all[n].1.clone()).collect();
    for chunk in resend.chunks(500) {
        let answer = client.send_events_json(chunk).await.unwrap();
        assert_eq!(
            answer.duplicates as usize,
            chunk.len(),
            "acknowledged events must be present after kill -9: {:?}",
            answer
                .results
                .iter()
                .find(|r| r.status != EventStatus::Duplicate)
        );
    }
    // Send everything: unacknowledged ones apply now (or were applied before the kill).
    let everything: Vec<Value> = all.iter().map(|(_, e, _, _)| e.clone()).collect();
    for chunk in everything.chunks(500) {
        let answer = client.send_events_json(chunk).await.unwrap();
        assert_eq!(
            answer.rejected,
            0,
            "{:?}",
            answer
                .results
                .iter()
                .find(|r| r.status == EventStatus::Rejected)
        );
    }
    // Points and order counts add up exactly once.
    let mut expected: BTreeMap<usize, (i64, u64)> = BTreeMap::new();
    for (customer, _, points, orders) in &all {
        let e = expected.entry(*customer).or_default();
        e.0 += points;
        e.1 += orders;
    }
    let check = |client: oneid_client::Client, expected: BTreeMap<usize, (i64, u64)>| async move {
        for (customer, (points, orders)) in expected {
            let profile = client
                .lookup("phone", &format!("1380000{customer:04}"))
                .await
                .unwrap()
                .expect("customer exists");
            assert_eq!(
                (profile.points.balance, profile.metrics.order_count),
                (points, orders),
                "customer {customer}"
            );
        }
    };
    check(client.clone(), expected.clone()).await;

    // A second full re-send changes nothing.
    let digests_before = node.settled_digests().await;
    for chunk in everything.chunks(500) {
        let answer = client.send_events_json(chunk).await.unwrap();
        assert_eq!(answer.duplicates as usize, chunk.len());
    }
    let digests_after = node.settled_digests().await;
    assert_eq!(
        digests_before, digests_after,
        "duplicates must not change state"
    );
    check(client, expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledgement_follows_an_fsync() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    for n in 0..20 {
        let before = node.metric("oneid_fsyncs_total").await;
        let answer = client.send_events_json(&[json!({"event_id": format!("f-{n}"), "type": "points_earn", "identities": {"phone": "13900000001"}, "points": 1})]).await.unwrap();
        assert_eq!(answer.applied, 1);
        let after = node.metric("oneid_fsyncs_total").await;
        assert!(
            after > before,
            "event {n} was acknowledged without an fsync ({before} -> {after})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_restart_keeps_state() {
    let mut node = TestNode::start(NodeOptions::quiet()).await;
    let client = node.client();
    let events: Vec<Value> = (0..300).map(|n| event(n).1).collect();
    client.send_events_json(&events).await.unwrap();
    let before = node.settled_digests().await;
    let profile_before = client
        .lookup("phone", "13800000007")
        .await
        .unwrap()
        .unwrap();
    let status = node.terminate();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    node.restart().await;
    let client = node.client();
    assert_eq!(
        node.settled_digests().await,
        before,
        "digests changed across the restart"
    );
    assert_eq!(
        client
            .lookup("phone", "13800000007")
            .await
            .unwrap()
            .unwrap(),
        profile_before
    );
}
