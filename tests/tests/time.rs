//! Time on the real binary: clock entries (every 200 ms in tests) expire points and tags at
//! their time, with the ledger entry to show for it.

use oneid_protocol::api::EventStatus;
use oneid_protocol::num::Millis;
use oneid_tests::{eventually, NodeOptions, TestNode};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn points_and_tags_expire_on_the_clock() {
    let node = TestNode::start(NodeOptions::default()).await;
    let client = node.client();
    let expires = Millis(Millis::from_system_time(std::time::SystemTime::now()).0 + 3_000);
    let answer = client
        .send_events_json(&[
            json!({"event_id": "keep", "type": "points_earn", "identities": {"phone": "13700000001"}, "points": 100}),
            json!({"event_id": "soon", "type": "points_earn", "identities": {"phone": "13700000001"}, "points": 40, "expires_at": expires.to_string()}),
            json!({"event_id": "flash", "type": "tag_add", "identities": {"phone": "13700000001"}, "tag": "flash_sale", "expires_at": expires.to_string()}),
        ])
        .await
        .unwrap();
    assert_eq!(answer.applied, 3, "{answer:?}");
    assert!(answer
        .results
        .iter()
        .all(|r| r.status == EventStatus::Applied));
    let oneid = answer.results[0].oneid.clone().unwrap();
    let profile = client.profile(&oneid).await.unwrap().unwrap();
    assert_eq!(
        (profile.points.balance, profile.tags.clone()),
        (140, vec!["flash_sale".to_string()])
    );

    // The first clock entry past the expiry applies it; until then the profile is unchanged.
    let profile = eventually(
        "an expiry on the clock",
        Duration::from_secs(30),
        async || {
            let profile = client.profile(&oneid).await.unwrap().unwrap();
            if profile.points.balance != 140 || profile.tags.is_empty() {
                Ok(profile)
            } else {
                Err(profile)
            }
        },
    )
    .await;
    assert!(
        Millis::from_system_time(std::time::SystemTime::now()) >= expires,
        "expired before its time"
    );
    // Both fall due at the same instant, so one clock entry applies both.
    assert_eq!(
        (profile.points.balance, profile.tags.clone()),
        (100, Vec::<String>::new())
    );
    assert_eq!(
        profile.points.lifetime_earned, 140,
        "expiry does not change what was earned"
    );
    assert_eq!(
        profile.version, 4,
        "three events and one clock-driven change"
    );

    let ledger = client.ledger(&oneid, None, None).await.unwrap();
    let newest = &ledger.entries[0];
    assert_eq!(
        (
            newest.event_id.as_str(),
            newest.kind.as_str(),
            newest.points,
            newest.balance_after
        ),
        ("soon", "expire", -40, 100)
    );
    assert_eq!(
        Millis::parse_rfc3339(&newest.at),
        Ok(expires),
        "the entry is dated at the expiry"
    );
    assert_eq!(
        newest.reason.as_deref(),
        Some("points earned by soon expired")
    );
    assert_eq!(ledger.entries.len(), 3);
}
