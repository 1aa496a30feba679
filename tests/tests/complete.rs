//! An acknowledged event is complete: the binds of its identities on other shards are recorded
//! with it, and finished even when the node dies before it gets to them.

use oneid_client::Error;
use oneid_protocol::api::EventStatus;
use oneid_tests::{eventually, shard_of, value_where, NodeOptions, TestNode};
use serde_json::json;
use std::time::Duration;

const SHARDS: u32 = 4;

/// The node's failpoint between the apply of a batch and the binds of its identities.
const BEFORE_FOLLOW_UPS: &str = "router::before_follow_ups=panic";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn binds_cut_off_by_a_crash_finish_after_restart_without_a_retry() {
    let mut node = TestNode::create(NodeOptions::default());
    // The phone anchors the new profile; the nick and the openid are held by other shards.
    let phone = "13900000001";
    let home = shard_of("phone", phone, SHARDS);
    let nick = value_where("taobao_nick", "nick-", SHARDS, |s| s != home);
    let openid = value_where("douyin_openid", "dy-", SHARDS, |s| s != home);
    node.restart_with_env(&[], &[("FAILPOINTS", BEFORE_FOLLOW_UPS)])
        .await;
    let event = json!({"event_id": "crash-1", "type": "order", "channel": "douyin",
        "identities": {"phone": phone, "taobao_nick": nick, "douyin_openid": openid},
        "order_id": "T1", "amount": "88.00"});
    let answer = node.client_once().send_events_json(&[event]).await;
    // The node read the whole request before it stopped, so its connection ends with a clean
    // close before any answer, not a reset or a time-out.
    assert!(
        matches!(&answer, Err(Error::Transport(message))
            if message.contains("connection closed before message completed")),
        "the node stops after the apply, before answering: {answer:?}"
    );
    let status = node.wait_for_exit();
    assert!(!status.success(), "stopped by the failpoint: {status}");
    assert!(
        node.logs().contains("router::before_follow_ups"),
        "the failpoint stopped it (a build without the node's `failpoints` feature cannot run this test: use scripts/test)"
    );

    // Restarted without the failpoint, and nobody sends the event again.
    node.restart().await;
    let client = node.client_once();
    let by_phone = client
        .lookup("phone", phone)
        .await
        .expect("lookup")
        .expect("the event applied before the crash");
    assert_eq!(by_phone.metrics.order_count, 1);
    let by_nick = eventually(
        "the binds of the nick and the openid after the restart",
        Duration::from_secs(30),
        async || {
            let profile = client.lookup("taobao_nick", &nick).await.expect("lookup")?;
            client
                .lookup("douyin_openid", &openid)
                .await
                .expect("lookup")?;
            Some(profile)
        },
    )
    .await;
    let profile = client
        .profile(&by_phone.oneid)
        .await
        .expect("profile")
        .expect("exists");
    assert_eq!(by_nick.oneid, by_phone.oneid);
    assert_eq!(
        profile.identities,
        [
            ("douyin_openid".to_string(), vec![openid.clone()]),
            ("phone".to_string(), vec![phone.to_string()]),
            ("taobao_nick".to_string(), vec![nick.clone()]),
        ]
        .into_iter()
        .collect()
    );
    // Finished by the shard leader's sweep (two follow-ups: the binds, then the records, which
    // the sweep counts once they are gone), and nothing is left waiting.
    let swept = eventually(
        "the sweep of both follow-ups",
        Duration::from_secs(30),
        async || {
            let swept = node.metric("oneid_follow_ups_swept_total").await;
            (swept >= 2).then_some(swept)
        },
    )
    .await;
    assert_eq!(swept, 2);
    let view = client.cluster().await.expect("cluster");
    assert!(
        view.shards.iter().all(|s| s.follow_ups_pending == 0),
        "{view:?}"
    );

    // A later event naming the nick alone reaches the same customer, not a second one.
    let later = client
        .send_events_json(&[json!({"event_id": "crash-2", "type": "points_earn",
            "identities": {"taobao_nick": nick}, "points": 5})])
        .await
        .expect("send");
    assert_eq!(later.results[0].status, EventStatus::Applied);
    assert_eq!(
        later.results[0].oneid.as_deref(),
        Some(by_phone.oneid.as_str())
    );
}
