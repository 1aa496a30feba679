//! Merges through real nodes: an event whose identities name two to four customers makes them
//! one, on one node and across three; a merge cut by a crash after its commit is finished by
//! the restarted node; concurrent merges of overlapping customers end as one; five customers
//! in one event are too many; merges during ingest survive a kill -9 of the losers' leader;
//! an unlink frees an identity for any node to bind afresh.

use oneid_client::Client;
use oneid_protocol::api::{DroppedDoc, EventResult, EventStatus};
use oneid_protocol::ErrorCode;
use oneid_tests::cluster::{ClusterOptions, TestCluster};
use oneid_tests::{eventually, shard_of, value_where, NodeOptions, TestNode};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const SHARDS: u32 = 4;

async fn send_one(client: &Client, event: Value) -> EventResult {
    let mut answer = client.send_events_json(&[event]).await.expect("events");
    answer.results.remove(0)
}

/// A phone and an email held by different shards' indexes.
fn apart(prefix: &str) -> (String, String) {
    let phone = format!("139{prefix}0001");
    let home = shard_of("phone", &phone, SHARDS);
    let email = value_where("email", &format!("{prefix}-"), SHARDS, |s| s != home);
    (phone, email)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn an_event_naming_two_customers_merges_them_into_one() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client_once();
    let (phone, email) = apart("10");
    let first = send_one(
        &client,
        json!({"event_id": "m-1", "type": "order",
        "identities": {"phone": phone}, "order_id": "T1", "amount": "100",
        "ts": "2026-01-01T00:00:00Z"}),
    )
    .await;
    let second = send_one(
        &client,
        json!({"event_id": "m-2", "type": "points_earn",
        "identities": {"email": email}, "points": 30, "ts": "2026-01-02T00:00:00Z"}),
    )
    .await;
    let (a, b) = (first.oneid.unwrap(), second.oneid.unwrap());
    assert_ne!(a, b);
    // Both hold no kind of any priority: the first minted survives.
    let body = serde_json::to_vec(&[json!({"event_id": "m-3", "type": "points_earn",
        "identities": {"phone": phone, "email": email}, "points": 5})])
    .unwrap();
    let raw = client
        .send_events_raw(body.into(), false)
        .await
        .expect("events");
    assert_eq!(
        serde_json::to_value(&raw.results[0]).unwrap(),
        json!({"event_id": "m-3", "status": "applied", "oneid": a, "merged": [b]})
    );
    for (kind, value) in [("phone", &phone), ("email", &email)] {
        let profile = client.lookup(kind, value).await.unwrap().unwrap();
        assert_eq!(profile.oneid, a, "{kind}");
        assert_eq!(profile.points.balance, 100 + 30 + 5);
        assert_eq!(profile.merged_from, vec![b.clone()]);
        assert_eq!(profile.resolved_from, None);
    }
    // The merged OneID resolves to the survivor, and says so.
    let by_old = client.profile(&b).await.unwrap().expect("resolves");
    assert_eq!(
        (by_old.oneid.as_str(), by_old.resolved_from.as_deref()),
        (a.as_str(), Some(b.as_str()))
    );
    assert_eq!(by_old.metrics.order_count, 1);
    // The survivor's history; the loser's OneID answers the same.
    let merges = client.merges(&a).await.unwrap().expect("a profile");
    assert_eq!(merges.merges.len(), 1);
    let merge = &merges.merges[0];
    assert_eq!(
        (
            merge.from.clone(),
            merge.into.as_str(),
            merge.event_id.as_deref()
        ),
        (vec![b.clone()], a.as_str(), Some("m-3"))
    );
    assert_eq!((merge.policy_version, merge.merge_id.len()), (0, 32));
    assert_eq!(merge.dropped, DroppedDoc::default());
    assert_eq!(client.merges(&b).await.unwrap(), Some(merges.clone()));
    // The loser's own ledger ends with everything moving out; the survivor's shows it come in.
    let ledger = client.ledger(&b, None, None).await.unwrap();
    assert_eq!(ledger.merged_into.as_deref(), Some(a.as_str()));
    let out = &ledger.entries[0];
    assert_eq!(
        (
            out.kind.as_str(),
            out.points,
            out.balance_after,
            out.into.as_deref()
        ),
        ("merge_out", -30, 0, Some(a.as_str()))
    );
    let ledger = client.ledger(&a, None, None).await.unwrap();
    assert_eq!(ledger.merged_into, None);
    let moved: Vec<(i64, Option<&str>, bool)> = ledger
        .entries
        .iter()
        .filter(|e| e.kind == "merge_in")
        .map(|e| (e.points, e.from.as_deref(), e.expires_at.is_some()))
        .collect();
    assert_eq!(moved, vec![(30, Some(b.as_str()), true)]);
    // An event naming the merged OneID applies to the survivor; a retry of one that applied
    // to the loser is a duplicate of the survivor.
    let named = send_one(
        &client,
        json!({"event_id": "m-4", "type": "points_earn",
        "oneid": b, "points": 1}),
    )
    .await;
    assert_eq!(
        (named.status, named.oneid.as_deref()),
        (EventStatus::Applied, Some(a.as_str()))
    );
    let retry = send_one(
        &client,
        json!({"event_id": "m-2", "type": "points_earn",
        "identities": {"email": email}, "points": 30, "ts": "2026-01-02T00:00:00Z"}),
    )
    .await;
    assert_eq!(
        (retry.status, retry.oneid.as_deref()),
        (EventStatus::Duplicate, Some(a.as_str()))
    );
    let retry = send_one(
        &client,
        json!({"event_id": "m-3", "type": "points_earn",
        "identities": {"phone": phone, "email": email}, "points": 5}),
    )
    .await;
    assert_eq!(
        (retry.status, retry.oneid.as_deref()),
        (EventStatus::Duplicate, Some(a.as_str()))
    );
    let profile = client.lookup("phone", &phone).await.unwrap().unwrap();
    assert_eq!(profile.points.balance, 136);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_customers_in_one_event_are_too_many_and_change_nothing() {
    let node = TestNode::start(NodeOptions::quiet()).await;
    let client = node.client_once();
    // Five customers, each known by a phone and by an identity of its own kind.
    let kinds = ["phone", "email", "member_card", "taobao_nick", "jd_pin"];
    let mut all = serde_json::Map::new();
    for (i, kind) in kinds.iter().enumerate() {
        let phone = format!("1380000{i:04}");
        let own = format!("{kind}-{i}");
        let identities = if i == 0 {
            json!({"phone": phone})
        } else {
            json!({"phone": phone, *kind: own})
        };
        let result = send_one(
            &client,
            json!({"event_id": format!("c-{i}"),
            "type": "points_earn", "identities": identities, "points": 1}),
        )
        .await;
        assert_eq!(result.status, EventStatus::Applied, "{result:?}");
        all.insert((*kind).into(), json!(if i == 0 { phone } else { own }));
    }
    let before = node.settled_digests().await;
    let result = send_one(
        &client,
        json!({"event_id": "five", "type": "identify",
        "identities": all}),
    )
    .await;
    let error = result
        .error
        .clone()
        .unwrap_or_else(|| panic!("rejected: {result:?}"));
    assert_eq!(
        (error.code, error.field.as_deref()),
        (ErrorCode::TooManyProfiles, Some("identities"))
    );
    assert_eq!(node.settled_digests().await, before, "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_cut_by_a_crash_after_its_commit_is_finished_by_the_restarted_node() {
    let mut node = TestNode::create(NodeOptions::default());
    node.restart().await;
    let client = node.client_once();
    let (phone, email) = apart("20");
    let a = send_one(
        &client,
        json!({"event_id": "k-1", "type": "points_earn",
        "identities": {"phone": phone}, "points": 11}),
    )
    .await
    .oneid
    .unwrap();
    let b = send_one(
        &client,
        json!({"event_id": "k-2", "type": "points_earn",
        "identities": {"email": email}, "points": 22}),
    )
    .await
    .oneid
    .unwrap();
    node.terminate();
    node.restart_with_env(&[], &[("FAILPOINTS", "merges::after_commit=panic")])
        .await;
    let answer = node
        .client_once()
        .send_events_json(&[json!({"event_id": "k-3", "type": "points_earn",
            "identities": {"phone": phone, "email": email}, "points": 33})])
        .await;
    assert!(
        answer.is_err(),
        "the node stops after the commit: {answer:?}"
    );
    assert!(!node.wait_for_exit().success());
    assert!(
        node.logs().contains("merges::after_commit"),
        "stopped by the failpoint"
    );

    // Restarted, and nobody sends the event again: the leaders' sweeps finish the merge.
    node.restart().await;
    let client = node.client_once();
    let merged = eventually(
        "the merge finished by the sweep",
        Duration::from_secs(60),
        async || {
            let by_phone = client.lookup("phone", &phone).await.ok()??;
            let by_email = client.lookup("email", &email).await.ok()??;
            (by_phone.oneid == by_email.oneid && by_phone.points.balance == 66).then_some(by_phone)
        },
    )
    .await;
    assert_eq!(merged.oneid, a, "the first minted survives");
    assert_eq!(merged.merged_from, vec![b.clone()]);
    let retry = send_one(
        &client,
        json!({"event_id": "k-3", "type": "points_earn",
        "identities": {"phone": phone, "email": email}, "points": 33}),
    )
    .await;
    assert_eq!(
        (retry.status, retry.oneid),
        (EventStatus::Duplicate, Some(a))
    );
}

/// A+B through node 1, B+C through node 2 and C+A through node 3, at once: whatever order they
/// meet in, they end as one customer holding every identity and every point, found by any
/// identity through any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_merges_through_three_nodes_end_as_one_customer() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let client = cluster.node(1).client();
    let ids = [
        ("phone", "13700000001"),
        ("email", "b@x.example"),
        ("jd_pin", "c-pin"),
    ];
    for (i, (kind, value)) in ids.iter().enumerate() {
        let result = send_one(
            &client,
            json!({"event_id": format!("s-{i}"), "type": "points_earn",
            "identities": {*kind: value}, "points": 10 * (i + 1)}),
        )
        .await;
        assert_eq!(result.status, EventStatus::Applied, "{result:?}");
    }
    let pairs = [(0, 1), (1, 2), (2, 0)];
    let sends = pairs.iter().enumerate().map(|(n, (x, y))| {
        let client = cluster.node(n as u64 + 1).client();
        let (kx, vx) = ids[*x];
        let (ky, vy) = ids[*y];
        let event = json!({"event_id": format!("p-{n}"), "type": "points_earn",
            "identities": {kx: vx, ky: vy}, "points": 1});
        async move { send_one(&client, event).await }
    });
    let results = futures::future::join_all(sends).await;
    for result in results {
        assert_eq!(result.status, EventStatus::Applied, "{result:?}");
    }
    let survivor = eventually(
        "one customer, found alike through every node",
        Duration::from_secs(60),
        async || {
            let mut found = BTreeSet::new();
            for node in 1..=3 {
                let client = cluster.node(node).client_once();
                for (kind, value) in ids {
                    let profile = client.lookup(kind, value).await.ok()??;
                    found.insert((
                        profile.oneid,
                        profile.points.balance,
                        profile.identities.len(),
                    ));
                }
            }
            (found.len() == 1).then(|| found.into_iter().next().unwrap())
        },
    )
    .await;
    assert_eq!((survivor.1, survivor.2), (60 + 3, 3));
}

/// Each refusal by the policy, through a real node: the event applies to the profile of
/// highest rank alone, and lists the identities of the others with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn merges_the_policy_refuses_apply_to_the_highest_ranked_profile_alone() {
    let node = TestNode::start(NodeOptions {
        extra: "[rules.identity.kinds.member_card]\nmax_per_profile = 1\npriority = 10\n".into(),
        ..NodeOptions::default()
    })
    .await;
    let client = node.client_once();
    let reason = |r: &EventResult| -> Vec<(String, String)> {
        r.not_linked
            .iter()
            .map(|n| (n.value.clone(), n.reason.as_str().to_string()))
            .collect()
    };
    // Two cards: past the kind's limit of one.
    let a = send_one(
        &client,
        json!({"event_id": "k-a", "type": "identify",
        "identities": {"member_card": "M1", "phone": "13900000001"}}),
    )
    .await
    .oneid
    .unwrap();
    let b = send_one(
        &client,
        json!({"event_id": "k-b", "type": "identify",
        "identities": {"member_card": "M2", "email": "k@x"}}),
    )
    .await
    .oneid
    .unwrap();
    let refused = send_one(
        &client,
        json!({"event_id": "k-c", "type": "points_earn",
        "points": 5, "identities": {"phone": "13900000001", "email": "k@x"}}),
    )
    .await;
    assert_eq!(refused.oneid.as_deref(), Some(a.as_str()), "{refused:?}");
    assert_eq!(reason(&refused), vec![("k@x".into(), "kind_limit".into())]);
    assert!(refused.merged.is_empty());
    assert_eq!(
        client.lookup("email", "k@x").await.unwrap().unwrap().oneid,
        b
    );

    // 26 identities and 25: past the 50 a profile holds.
    let many = |tag: &str, kinds: std::ops::Range<usize>| -> Value {
        kinds
            .map(|k| (format!("k{k:02}"), json!(format!("{tag}{k}"))))
            .collect::<serde_json::Map<String, Value>>()
            .into()
    };
    let c = send_one(
        &client,
        json!({"event_id": "i-c", "type": "identify",
        "identities": many("c", 0..26)}),
    )
    .await
    .oneid
    .unwrap();
    send_one(
        &client,
        json!({"event_id": "i-d", "type": "identify",
        "identities": many("d", 26..51)}),
    )
    .await;
    let refused = send_one(
        &client,
        json!({"event_id": "i-e", "type": "identify",
        "identities": {"k00": "c0", "k26": "d26"}}),
    )
    .await;
    assert_eq!(refused.oneid.as_deref(), Some(c.as_str()), "{refused:?}");
    assert_eq!(
        reason(&refused),
        vec![("d26".into(), "identity_limit".into())]
    );

    // Customers merged into one, one by one: each brings a phone, so the 49th merged fills
    // the 50 identities a profile holds (before its 100 merges could), and the next is refused.
    let survivor = send_one(
        &client,
        json!({"event_id": "m-s", "type": "identify",
        "identities": {"member_card": "HUB"}}),
    )
    .await
    .oneid
    .unwrap();
    for i in 0..50 {
        let phone = format!("1370000{i:04}");
        send_one(
            &client,
            json!({"event_id": format!("m-p{i}"), "type": "identify",
            "identities": {"phone": phone}}),
        )
        .await;
        let merged = send_one(
            &client,
            json!({"event_id": format!("m-m{i}"),
            "type": "identify", "identities": {"member_card": "HUB", "phone": phone}}),
        )
        .await;
        assert_eq!(
            merged.oneid.as_deref(),
            Some(survivor.as_str()),
            "{merged:?}"
        );
        if i < 49 {
            assert_eq!(merged.merged.len(), 1, "merge {i}: {merged:?}");
        } else {
            assert!(merged.merged.is_empty());
            assert_eq!(reason(&merged), vec![(phone, "identity_limit".into())]);
        }
    }
    let hub = client.profile(&survivor).await.unwrap().unwrap();
    assert_eq!(hub.merged_from.len(), 49);
    // (`merge_limit`, 100 profiles merged into one, is held by a unit test of the state
    // machine: with every loser bringing an identity, the 50-identity limit comes first.)
}

/// An identity bound by mistake, unlinked through node 1, is free at once for a bind through
/// node 3 (which had it cached): a new customer, found so through every node; the first keeps
/// its points and its other identity; an event dated before the unlink never binds it back; an
/// unlink of what the profile does not hold changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn an_unlink_through_one_node_frees_the_identity_for_a_bind_through_another() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let (one, three) = (cluster.node(1).client(), cluster.node(3).client());
    let (phone, email) = apart("20");
    let first = send_one(
        &three,
        json!({"event_id": "u-1", "type": "points_earn", "points": 40,
        "identities": {"phone": phone, "email": email}, "ts": "2026-01-01T00:00:00Z"}),
    )
    .await;
    let x = first.oneid.expect("applied");
    // Node 3 now has the email's binding cached.
    let cached = three.lookup("email", &email).await.unwrap().expect("bound");
    assert_eq!(cached.oneid, x);

    let unlink = json!({"event_id": "u-2", "type": "unlink", "oneid": x,
        "identities": {"email": email}, "ts": "2026-01-02T00:00:00Z"});
    let answer = send_one(&one, unlink.clone()).await;
    assert_eq!(
        serde_json::to_value(&answer).unwrap(),
        json!({"event_id": "u-2", "status": "applied", "oneid": x})
    );
    let retry = send_one(&one, unlink).await;
    assert_eq!(
        (retry.status, retry.oneid.as_deref()),
        (EventStatus::Duplicate, Some(x.as_str()))
    );
    let stranger = send_one(
        &one,
        json!({"event_id": "u-3", "type": "unlink", "oneid": x,
        "identities": {"email": "nobody@x.example"}}),
    )
    .await;
    let error = stranger.error.expect("rejected");
    assert_eq!(
        (error.code, error.field.as_deref()),
        (ErrorCode::NotFound, Some("identities.email"))
    );

    // Through node 3 at once: the email binds afresh, to a new customer.
    let second = send_one(
        &three,
        json!({"event_id": "u-4", "type": "points_earn", "points": 7,
        "identities": {"email": email}, "ts": "2026-01-03T00:00:00Z"}),
    )
    .await;
    assert_eq!(second.status, EventStatus::Applied, "{second:?}");
    let y = second.oneid.expect("applied");
    assert_ne!(y, x);
    for node in 1..=3 {
        let client = cluster.node(node).client();
        let by_email = client
            .lookup("email", &email)
            .await
            .unwrap()
            .expect("bound");
        assert_eq!(
            (by_email.oneid.as_str(), by_email.points.balance),
            (y.as_str(), 7),
            "node {node}"
        );
        let by_phone = client
            .lookup("phone", &phone)
            .await
            .unwrap()
            .expect("bound");
        assert_eq!(
            (by_phone.oneid.as_str(), by_phone.points.balance),
            (x.as_str(), 40),
            "node {node}"
        );
        assert_eq!(
            by_phone.identities.keys().collect::<Vec<_>>(),
            vec!["phone"],
            "node {node}"
        );
    }

    // An event dated before the unlink, naming the first customer and the email (bound to
    // the second since): applied to the first alone, which never takes the email back, and
    // the two stay apart.
    let stale = send_one(
        &three,
        json!({"event_id": "u-4b", "type": "points_earn", "points": 2, "oneid": x,
        "identities": {"email": email}, "ts": "2026-01-01T06:00:00Z"}),
    )
    .await;
    assert_eq!(
        serde_json::to_value(&stale).unwrap(),
        json!({"event_id": "u-4b", "status": "applied", "oneid": x, "not_linked": [
            {"kind": "email", "value": email, "reason": "unlinked"}]})
    );
    let by_email = one.lookup("email", &email).await.unwrap().expect("bound");
    assert_eq!(
        (by_email.oneid.as_str(), by_email.points.balance),
        (y.as_str(), 7)
    );
    assert_eq!(one.profile(&x).await.unwrap().unwrap().points.balance, 42);

    // An event dated before the unlink, naming the first customer and a value unlinked from
    // it: applied there, without the value.
    let older = send_one(
        &one,
        json!({"event_id": "u-5", "type": "points_earn", "points": 1, "oneid": x,
        "identities": {"phone": phone}, "ts": "2026-01-01T12:00:00Z"}),
    )
    .await;
    assert_eq!(older.status, EventStatus::Applied, "{older:?}");
    let second_unlink = send_one(
        &three,
        json!({"event_id": "u-6", "type": "unlink", "oneid": x,
        "identities": {"phone": phone}, "ts": "2026-01-04T00:00:00Z"}),
    )
    .await;
    assert_eq!(second_unlink.status, EventStatus::Applied);
    let late = send_one(
        &one,
        json!({"event_id": "u-7", "type": "points_earn", "points": 1, "oneid": x,
        "identities": {"phone": phone}, "ts": "2026-01-03T12:00:00Z"}),
    )
    .await;
    assert_eq!(
        serde_json::to_value(&late).unwrap(),
        json!({"event_id": "u-7", "status": "applied", "oneid": x, "not_linked": [
            {"kind": "phone", "value": phone, "reason": "unlinked"}]})
    );
    assert_eq!(one.lookup("phone", &phone).await.unwrap(), None);
}

/// Sends `event` until it is answered applied or duplicate (the client crate retries
/// `unavailable` a few times; a node killed under it takes longer), up to a minute.
async fn send_until_answered(client: &Client, event: Value) -> EventResult {
    eventually("the event answered", Duration::from_secs(60), async || {
        let result = client
            .send_events_json(std::slice::from_ref(&event))
            .await
            .ok()?;
        let result = result.results.into_iter().next()?;
        matches!(result.status, EventStatus::Applied | EventStatus::Duplicate).then_some(result)
    })
    .await
}

/// Merges while other customers' events stream in, through two nodes of three, and the third
/// (the leader of the shard every loser lives on) killed with SIGKILL in the middle of them:
/// every pair ends as one customer with both balances, every acknowledged earn counted once,
/// as every node answers, and the replicas agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn merges_during_ingest_survive_a_kill_of_the_losers_leader() {
    const PAIRS: usize = 10;
    const INGEST_CUSTOMERS: usize = 10;
    const INGEST_BATCHES: usize = 20;
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let shards = cluster.options.shards;
    let losers_shard = 5;
    let victim = cluster.leaders().await[&losers_shard];
    let others: Vec<u64> = (1..=3).filter(|n| *n != victim).collect();
    let client = Client::new(&format!(
        "{},{}",
        cluster.node(others[0]).base(),
        cluster.node(others[1]).base()
    ))
    .unwrap();
    // Each pair: a phone customer first, then an email one held by the losers' shard, so
    // the email customer (minted later) is the loser.
    let pairs: Vec<(String, String)> = (0..PAIRS)
        .map(|i| {
            let phone = value_where("phone", &format!("1390{i}-"), shards, |s| s != losers_shard);
            let email = value_where("email", &format!("kill{i}-"), shards, |s| s == losers_shard);
            (phone, email)
        })
        .collect();
    let mut survivors = Vec::new();
    for (i, (phone, email)) in pairs.iter().enumerate() {
        let a = send_until_answered(
            &client,
            json!({"event_id": format!("kp-{i}"), "type": "points_earn", "points": 10,
                "identities": {"phone": phone}, "ts": "2026-01-01T00:00:00Z"}),
        )
        .await;
        let b = send_until_answered(
            &client,
            json!({"event_id": format!("ke-{i}"), "type": "points_earn", "points": 100,
                "identities": {"email": email}, "ts": "2026-01-02T00:00:00Z"}),
        )
        .await;
        assert_eq!(
            b.oneid.as_ref().map(|o| shard_of_oneid(o)),
            Some(losers_shard)
        );
        survivors.push(a.oneid.expect("applied"));
    }

    // Ingest: earns for other customers, batch after batch, through the same two nodes.
    let ingest = async {
        let mut acknowledged = vec![0i64; INGEST_CUSTOMERS];
        for batch in 0..INGEST_BATCHES {
            for (c, points) in acknowledged.iter_mut().enumerate() {
                let event = json!({"event_id": format!("in-{batch}-{c}"), "type": "points_earn",
                    "points": 1 + batch, "identities": {"member_card": format!("IN-{c}")}});
                // Applied, or a duplicate of itself (applied by an attempt whose answer a
                // failover lost): either way, once.
                send_until_answered(&client, event).await;
                *points += 1 + batch as i64;
            }
        }
        acknowledged
    };
    // The merges, one after another; the victim dies after the third is answered.
    let merges = async {
        for (i, (phone, email)) in pairs.iter().enumerate() {
            if i == 3 {
                cluster.node_mut(victim).kill9();
            }
            let merge = json!({"event_id": format!("km-{i}"), "type": "identify",
                "identities": {"phone": phone, "email": email}});
            let result = send_until_answered(&client, merge).await;
            assert_eq!(result.oneid.as_ref(), Some(&survivors[i]), "{result:?}");
        }
    };
    let (acknowledged, ()) = tokio::join!(ingest, merges);
    cluster.node_mut(victim).restart().await;

    // Every pair one customer with both balances, and every ingest earn once, on every node.
    for node in 1..=3 {
        let reader = cluster.node(node).client();
        eventually(
            "every merge and every earn, as this node answers",
            Duration::from_secs(60),
            async || {
                let lookup = async |kind: &str, value: &str| match reader.lookup(kind, value).await
                {
                    Ok(Some(profile)) => Ok((profile.oneid, profile.points.balance)),
                    other => Err(format!("node {node}: {kind} {value}: {other:?}")),
                };
                for (i, (phone, email)) in pairs.iter().enumerate() {
                    let want = (survivors[i].clone(), 110);
                    for (kind, value) in [("phone", phone), ("email", email)] {
                        let got = lookup(kind, value).await?;
                        if got != want {
                            return Err(format!(
                                "node {node}: {kind} {value}: {got:?}, not {want:?}"
                            ));
                        }
                    }
                }
                for (c, points) in acknowledged.iter().enumerate() {
                    let card = format!("IN-{c}");
                    let (_, balance) = lookup("member_card", &card).await?;
                    if balance != *points {
                        return Err(format!("node {node}: {card} holds {balance}, not {points}"));
                    }
                }
                Ok(())
            },
        )
        .await;
    }
    cluster.settled().await;
}

/// The shard of a OneID (`oSSSS…`: its first four hex digits).
fn shard_of_oneid(oneid: &str) -> u32 {
    u32::from_str_radix(&oneid[1..5], 16).expect("a OneID")
}
