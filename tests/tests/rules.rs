//! Versioned rules on a 3-node cluster (8 shards): the registry shard orders every PUT, and
//! every shard keeps the rules of the highest version it was sent, so two PUTs at once through
//! two nodes leave every shard, and every node's answer, with the same rules.

use oneid_protocol::api::EventStatus;
use oneid_protocol::ids::OneId;
use oneid_tests::cluster::{ClusterOptions, TestCluster};
use oneid_tests::{rules_doc, rules_json, value_where};
use serde_json::json;
use std::collections::BTreeSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_puts_at_once_through_two_nodes_leave_every_shard_with_the_later_version() {
    let options = ClusterOptions::default();
    let shards = options.shards;
    let cluster = TestCluster::start(options).await;
    let (one, two) = (cluster.node(1).client(), cluster.node(2).client());
    let unit = |unit: &str| rules_doc(&json!({"points": {"per_currency_unit": unit}}));
    let (two_per_unit, three_per_unit) = (unit("2"), unit("3"));
    let (a, b) = tokio::join!(one.set_rules(&two_per_unit), two.set_rules(&three_per_unit));
    let (a, b) = (
        a.expect("PUT through node 1"),
        b.expect("PUT through node 2"),
    );
    let mut versions = [a.version, b.version];
    versions.sort();
    assert_eq!(versions, [Some(1), Some(2)]);
    let (last, per_unit) = if a.version > b.version {
        (a, 2)
    } else {
        (b, 3)
    };
    let last = serde_json::to_value(last).expect("serializes");
    for node in 1..=3 {
        let client = cluster.node(node).client();
        assert_eq!(rules_json(&client).await.expect("GET"), last, "node {node}");
    }

    // An order on every shard, through the third node: each earns by the later rules.
    let client = cluster.node(3).client();
    let mut profile_shards = BTreeSet::new();
    for shard in 0..shards {
        let phone = value_where("phone", "13911", shards, |s| s == shard);
        let order = json!({"event_id": format!("o-{shard}"), "type": "order",
            "identities": {"phone": phone}, "order_id": "A1", "amount": "100.00"});
        let answer = client.send_events_json(&[order]).await.expect("send");
        let result = &answer.results[0];
        assert_eq!(result.status, EventStatus::Applied, "{answer:?}");
        let oneid = result.oneid.clone().expect("applied");
        profile_shards.insert(oneid.parse::<OneId>().expect("a OneID").shard().0);
        let profile = client.profile(&oneid).await.expect("read").expect("exists");
        assert_eq!(profile.points.balance, 100 * per_unit, "shard {shard}");
    }
    assert_eq!(profile_shards, (0..shards).collect::<BTreeSet<_>>());
}
