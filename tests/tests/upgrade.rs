//! Data outlives releases: a data directory written by an earlier release (a fixture made by
//! `scripts/fixture` with that release, under `tests/fixtures/`) opens in this one and answers
//! exactly the documents the earlier release answered.

use oneid_client::Client;
use oneid_tests::{eventually, rules_json, NodeOptions, TestNode};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Unpacks `tests/fixtures/format-{format}.tar.gz` (its `data/` and `expected/`) into `dir`.
fn unpack(format: u32, dir: &Path) {
    let archive = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("format-{format}.tar.gz"));
    let file = std::fs::File::open(&archive)
        .unwrap_or_else(|e| panic!("opening {}: {e}", archive.display()));
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(dir)
        .unwrap_or_else(|e| panic!("unpacking {}: {e}", archive.display()));
}

fn expected(dir: &Path, name: &str) -> Value {
    let path = dir.join("expected").join(format!("{name}.json"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&text).expect("expected documents are JSON")
}

fn json(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("documents serialize")
}

/// The retention of the test node's `cluster.toml`: everything kept for 100 years, so the
/// fixtures' documents stay as they are while the years pass.
const RETENTION: &str = "[rules.retention]\ndedup_days = 36500\nledger_days = 36500\n";

/// Every document `scripts/fixture` recorded, read again through `client`. `seeded`: the
/// retention the rules get after the upgrade, if the fixture's had none.
async fn assert_documents(client: &Client, dir: &Path, seeded: Option<&Value>) {
    for kind in ["phone", "wechat_unionid"] {
        let want = expected(dir, &format!("profile-{kind}"));
        let value = want["identities"][kind][0]
            .as_str()
            .expect("the fixture's identity");
        let got = client.lookup(kind, value).await.expect("lookup");
        assert_eq!(json(got), want, "the profile of {kind} {value}");
    }
    let phone = expected(dir, "profile-phone");
    let oneid = phone["oneid"].as_str().expect("oneid");
    let ledger = client.ledger(oneid, None, None).await.expect("ledger");
    assert_eq!(json(ledger), expected(dir, "ledger-phone"));
    // Format 12 on: a merge's survivor (after an unlink), by its OneID and by the loser's.
    if dir.join("expected/profile-merged.json").exists() {
        let want = expected(dir, "profile-merged");
        let survivor = want["oneid"].as_str().expect("oneid");
        let got = client.profile(survivor).await.expect("profile");
        assert_eq!(json(got), want, "the survivor of the fixture's merge");
        let loser = want["merged_from"][0].as_str().expect("a loser");
        let got = client
            .profile(loser)
            .await
            .expect("profile")
            .expect("resolves");
        assert_eq!(got.oneid, survivor);
        assert_eq!(client.lookup("jd_pin", "jd_b").await.expect("lookup"), None);
    }
    let mut rules = expected(dir, "rules");
    // Written before rules had versions (formats 7 and 8): they answer version 0.
    if rules.get("version").is_none() {
        rules["version"] = serde_json::Value::from(0);
    }
    // Written before the identity policy (formats 7 to 9): the default one.
    if rules.get("identity").is_none() {
        rules["identity"] = serde_json::json!({});
    }
    if let Some(seeded) = seeded {
        rules["retention"] = seeded.clone();
    }
    eventually(
        "the retention seeded",
        Duration::from_secs(30),
        async || {
            let got = rules_json(client).await.map_err(|e| e.to_string())?;
            (got == rules).then_some(()).ok_or(got.to_string())
        },
    )
    .await;
    let segments = client.segments().await.expect("segments");
    assert_eq!(json(segments), expected(dir, "segments")["segments"]);
    for name in ["big-spenders", "newsletter"] {
        let page = client.segment_members_page(name, None, None).await;
        assert_eq!(
            json(page.expect("members")),
            expected(dir, &format!("members-{name}")),
            "the members of {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_7_data_directory_opens_and_answers_its_documents() {
    // Format 7 kept retention in each node's config: its rules have none, and the leaders seed
    // it from this node's cluster.toml after the upgrade.
    let seeded = serde_json::json!({"dedup_days": 36_500, "ledger_days": 36_500,
        "change_log_hours": 72, "change_log_entries_max": 1_000_000});
    opens_and_answers(7, Some(&seeded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_8_data_directory_opens_and_answers_its_documents() {
    opens_and_answers(8, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_9_data_directory_opens_and_answers_its_documents() {
    opens_and_answers(9, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_10_data_directory_opens_and_answers_its_documents() {
    opens_and_answers(10, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_11_data_directory_opens_and_answers_its_documents() {
    opens_and_answers(11, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_12_data_directory_opens_and_answers_its_documents() {
    opens_and_answers(12, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_13_data_directory_opens_and_answers_its_documents() {
    opens_and_answers(13, None).await;
}

/// The fixture of `format` opens in this build, answers its documents, takes a new event on
/// top, and answers the same after a restart.
async fn opens_and_answers(format: u32, seeded: Option<&Value>) {
    let fixture = tempfile::tempdir().expect("temporary directory");
    unpack(format, fixture.path());
    let mut node = TestNode::create(NodeOptions {
        extra: RETENTION.into(),
        ..NodeOptions::default()
    });
    std::fs::rename(fixture.path().join("data"), node.data_path()).expect("moving data/");
    node.restart().await;
    let client = node.client();
    assert_documents(&client, fixture.path(), seeded).await;

    // It goes on from there: a new event applies on top of the old state, and a restart
    // answers the same documents again.
    let phone = expected(fixture.path(), "profile-phone");
    let answer = client
        .send_events_json(&[serde_json::json!({
            "event_id": "after-upgrade-1", "type": "points_earn",
            "identities": {"phone": "13800138000"}, "points": 99,
            "ts": "2026-12-01T00:00:00Z"})])
        .await
        .expect("events");
    assert_eq!(
        (answer.applied, answer.results[0].oneid.as_deref()),
        (1, phone["oneid"].as_str())
    );
    let profile = client
        .lookup("phone", "13800138000")
        .await
        .expect("lookup")
        .expect("the profile");
    assert_eq!(profile.points.balance, 3201 + 99);
    node.terminate();
    node.restart().await;
    let profile = node
        .client()
        .lookup("phone", "13800138000")
        .await
        .expect("lookup")
        .expect("the profile");
    assert_eq!(profile.points.balance, 3201 + 99);
}
