//! Online backup and restore: a backup taken while events arrive holds every event
//! acknowledged before it started; a backup at rest restores to the same state, digest for
//! digest; backups go only under the node's backup root (none: 403), bad directories are
//! refused and the node goes on serving; a restore refuses a data directory that is not empty
//! and a backup that does not match its manifest.

use oneid_client::Error;
use oneid_protocol::api::{BackupManifest, EventStatus};
use oneid_protocol::ErrorCode;
use oneid_tests::sse::SseStream;
use oneid_tests::{cli_binary, eventually, NodeOptions, TestNode};
use serde_json::{json, Value};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CUSTOMERS: usize = 60;

/// Event `n`: for one customer (by phone only, so no binding crosses shards), an order, a points
/// earn, a tag or an attribute change.
fn event(n: usize) -> Value {
    let phone = phone(n % CUSTOMERS);
    match n % 5 {
        0 => {
            json!({"event_id": format!("b-{n}"), "type": "points_earn", "identities": {"phone": phone}, "points": 7})
        }
        1 | 2 => {
            json!({"event_id": format!("b-{n}"), "type": "order", "identities": {"phone": phone}, "order_id": format!("T{n}"), "amount": "10.00", "channel": "tmall"})
        }
        3 => {
            json!({"event_id": format!("b-{n}"), "type": "tag_add", "identities": {"phone": phone}, "tag": format!("t{}", n % 3)})
        }
        _ => {
            json!({"event_id": format!("b-{n}"), "type": "profile_update", "identities": {"phone": phone}, "attributes": {"seen": n}})
        }
    }
}

fn phone(customer: usize) -> String {
    format!("1390000{customer:04}")
}

/// The manifest as written beside the backup.
fn manifest_file(dir: &Path) -> BackupManifest {
    let text = std::fs::read(dir.join("backup.json")).expect("reading backup.json");
    serde_json::from_slice(&text).expect("backup.json is a manifest")
}

/// (shard, digest) of every shard of a settled node (see `TestNode::settled_digests`).
async fn digests(node: &TestNode) -> Vec<(u32, String)> {
    (0..).zip(node.settled_digests().await).collect()
}

fn manifest_digests(manifest: &BackupManifest) -> Vec<(u32, String)> {
    manifest
        .shards
        .iter()
        .map(|s| (s.id, s.digest.clone()))
        .collect()
}

/// Every shard of the restored node is at or past the manifest's applied index (it applies
/// its leader's first entry and clock entries once it runs).
async fn assert_at_or_past(node: &TestNode, manifest: &BackupManifest) {
    let view = node.client().cluster().await.expect("cluster");
    assert_eq!(
        view.shards.iter().map(|s| s.id).collect::<Vec<_>>(),
        manifest.shards.iter().map(|s| s.id).collect::<Vec<_>>()
    );
    for (shard, backed_up) in view.shards.iter().zip(&manifest.shards) {
        assert!(
            shard.applied_index >= backed_up.applied_index,
            "shard {}: applied {} < {} in the backup",
            shard.id,
            shard.applied_index,
            backed_up.applied_index
        );
    }
}

fn assert_invalid_dir(outcome: Result<BackupManifest, Error>, what: &str) {
    match outcome {
        Err(Error::Api {
            status,
            code,
            field,
            ..
        }) => assert_eq!(
            (status, code, field.as_deref()),
            (400, ErrorCode::InvalidField, Some("dir")),
            "{what}"
        ),
        other => panic!("{what}: expected 400 invalid_field dir, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn backup_during_ingest_holds_every_event_acknowledged_before_it() {
    const BATCHES: usize = 150;
    const BATCH: usize = 40;
    let source = TestNode::start(NodeOptions::default()).await;
    let all: Vec<Value> = (0..BATCHES * BATCH).map(event).collect();

    // Send batches from a task, recording each acknowledged event as soon as its batch answers.
    let acknowledged: Arc<Mutex<Vec<usize>>> = Arc::default();
    let sender = {
        let client = source.client();
        let acknowledged = Arc::clone(&acknowledged);
        let batches: Vec<Vec<Value>> = all.chunks(BATCH).map(<[Value]>::to_vec).collect();
        tokio::spawn(async move {
            for (i, batch) in batches.iter().enumerate() {
                let answer = client.send_events_json(batch).await.expect("ingest");
                let mut acked = acknowledged.lock().expect("lock");
                for (j, result) in answer.results.iter().enumerate() {
                    assert_eq!(result.status, EventStatus::Applied, "{result:?}");
                    acked.push(i * BATCH + j);
                }
            }
        })
    };
    eventually(
        "the acknowledgement of 10 batches",
        Duration::from_secs(60),
        async || (acknowledged.lock().expect("lock").len() >= BATCH * 10).then_some(()),
    )
    .await;
    // Acknowledged before the backup request is sent: the backup must hold all of these.
    let before: Vec<usize> = acknowledged.lock().expect("lock").clone();
    assert!(
        !sender.is_finished(),
        "ingest must still be running when the backup starts"
    );
    let dir = source.backup_root().join("during-ingest");
    let manifest = source
        .client_once()
        .backup("during-ingest")
        .await
        .expect("backup");
    let after = acknowledged.lock().expect("lock").len();
    assert_eq!(manifest, manifest_file(&dir));
    assert_eq!(
        (manifest.format, manifest.node, manifest.shards.len()),
        (1, 1, 4)
    );
    assert_eq!(
        manifest.pairs,
        manifest.keyspaces.iter().map(|k| k.pairs).sum::<u64>()
    );
    for shard in &manifest.shards {
        assert_eq!(shard.digest.len(), 16, "{shard:?}");
    }
    sender.await.expect("sender");
    eprintln!(
        "acknowledged {} events before the backup, {after} when it answered, {} in all",
        before.len(),
        all.len()
    );

    // The restored node checked every recovered shard against the manifest before serving
    // (it exits otherwise: see restore_refuses_a_backup_that_does_not_match_its_manifest).
    let restored = TestNode::start_restored(NodeOptions::default(), &dir).await;
    assert_at_or_past(&restored, &manifest).await;
    let client = restored.client();
    // Every event acknowledged before the backup started is there: re-sending answers duplicate.
    let resend: Vec<Value> = before.iter().map(|&n| all[n].clone()).collect();
    for chunk in resend.chunks(500) {
        let answer = client.send_events_json(chunk).await.expect("re-send");
        assert_eq!(
            answer.duplicates as usize,
            chunk.len(),
            "acknowledged before the backup, missing from it: {:?}",
            answer
                .results
                .iter()
                .find(|r| r.status != EventStatus::Duplicate)
        );
    }
    // Sending everything completes the restored node (each event once): its customers' points
    // and orders then equal the source's.
    for chunk in all.chunks(500) {
        let answer = client.send_events_json(chunk).await.expect("send");
        assert_eq!(answer.rejected, 0, "{:?}", answer.results);
    }
    let source_client = source.client();
    for customer in 0..CUSTOMERS {
        let a = source_client
            .lookup("phone", &phone(customer))
            .await
            .expect("lookup")
            .expect("on the source");
        let b = client
            .lookup("phone", &phone(customer))
            .await
            .expect("lookup")
            .expect("on the restored node");
        assert_eq!(
            (a.oneid, a.points, a.metrics.order_count, a.tags),
            (b.oneid, b.points, b.metrics.order_count, b.tags),
            "customer {customer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_at_rest_restores_the_same_state() {
    let source = TestNode::start(NodeOptions::quiet()).await;
    let client = source.client();
    let all: Vec<Value> = (0..1500).map(event).collect();
    for chunk in all.chunks(250) {
        let answer = client.send_events_json(chunk).await.expect("ingest");
        assert_eq!(answer.applied as usize, chunk.len(), "{:?}", answer.results);
    }
    let before = digests(&source).await;

    // Through the CLI, which sends the directory as given: the node places it under its root,
    // whatever the CLI's own directory.
    let cwd = tempfile::tempdir().expect("temporary directory");
    let output = {
        let (cwd, base) = (cwd.path().to_path_buf(), source.base());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(cli_binary())
                .args([
                    "--server",
                    &base,
                    "--json",
                    "admin",
                    "backup",
                    "nightly/at-rest",
                ])
                .current_dir(cwd)
                .output()
                .expect("running oneid")
        })
        .await
        .expect("joined")
    };
    assert!(
        output.status.success(),
        "oneid admin backup: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir = source.backup_root().join("nightly/at-rest");
    assert_eq!(std::fs::read_dir(cwd.path()).expect("read").count(), 0);
    let manifest: BackupManifest = serde_json::from_slice(&output.stdout).expect("a manifest");
    assert_eq!(manifest, manifest_file(&dir));
    // At rest, the backup's digests are the source's, before and after it.
    assert_eq!(manifest_digests(&manifest), before);
    assert_eq!(digests(&source).await, before);

    let mut restored = TestNode::start_restored(NodeOptions::quiet(), &dir).await;
    assert_eq!(digests(&restored).await, before);
    assert_at_or_past(&restored, &manifest).await;
    let copy = restored.client();
    for customer in (0..CUSTOMERS).step_by(7) {
        let a = client
            .lookup("phone", &phone(customer))
            .await
            .expect("lookup")
            .expect("on the source");
        let b = copy
            .lookup("phone", &phone(customer))
            .await
            .expect("lookup")
            .expect("on the restored node");
        assert_eq!(a, b, "customer {customer}");
        let (la, lb) = (
            client
                .ledger(&a.oneid, Some(100), None)
                .await
                .expect("ledger"),
            copy.ledger(&b.oneid, Some(100), None)
                .await
                .expect("ledger"),
        );
        assert_eq!(la, lb, "ledger of customer {customer}");
    }

    // A restore is a one-off: the restored node starts again plainly, on the same state.
    assert!(restored.terminate().success());
    restored.restart().await;
    assert_eq!(digests(&restored).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn backup_refuses_bad_directories_and_the_node_keeps_serving() {
    let node = TestNode::start(NodeOptions::quiet()).await;
    let client = node.client_once();
    let events: Vec<Value> = (0..100).map(event).collect();
    assert_eq!(
        client
            .send_events_json(&events)
            .await
            .expect("ingest")
            .applied,
        100
    );
    let root = node.backup_root();
    std::fs::create_dir_all(&root).expect("mkdir");
    let scratch = tempfile::tempdir().expect("temporary directory");

    let not_empty = root.join("not-empty");
    std::fs::create_dir(&not_empty).expect("mkdir");
    std::fs::write(not_empty.join("keep.txt"), "mine").expect("write");
    assert_invalid_dir(
        client.backup("not-empty").await,
        "a directory that is not empty",
    );
    let left: Vec<_> = std::fs::read_dir(&not_empty)
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![OsStr::new("keep.txt").to_owned()]);
    assert_eq!(
        std::fs::read_to_string(not_empty.join("keep.txt")).expect("read"),
        "mine"
    );

    // Absolute paths are refused, even one under the root.
    let absolute = root.join("absolute");
    assert_invalid_dir(
        client.backup(absolute.to_str().expect("UTF-8")).await,
        "an absolute path",
    );
    let outside = scratch.path().join("outside");
    assert_invalid_dir(
        client.backup(outside.to_str().expect("UTF-8")).await,
        "an absolute path outside the root",
    );
    assert_invalid_dir(client.backup("").await, "an empty path");
    assert_invalid_dir(client.backup("../escaped").await, "a path with ..");
    std::fs::write(root.join("a-file"), "x").expect("write");
    assert_invalid_dir(client.backup("a-file").await, "a file");
    // Symlinks under the root that lead out of it: to another directory, to the data.
    std::os::unix::fs::symlink(scratch.path(), root.join("away")).expect("symlink");
    std::os::unix::fs::symlink(node.data_path(), root.join("data")).expect("symlink");
    assert_invalid_dir(
        client.backup("away/b").await,
        "through a symlink out of the root",
    );
    assert_invalid_dir(
        client.backup("data/b").await,
        "through a symlink into the data",
    );
    assert!(!absolute.exists());
    assert!(!outside.exists() && !root.join("../escaped").exists());
    assert!(!scratch.path().join("b").exists());
    assert!(!node.data_path().join("b").exists());

    // The node goes on serving, and backs up once given a good directory.
    assert!(node.client().healthy().await);
    let more: Vec<Value> = (100..200).map(event).collect();
    assert_eq!(
        client
            .send_events_json(&more)
            .await
            .expect("ingest")
            .applied,
        100
    );
    let manifest = client.backup("good").await.expect("backup");
    assert_eq!(manifest, manifest_file(&root.join("good")));
    assert_eq!(manifest_digests(&manifest), digests(&node).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_backup_root_refuses_backups() {
    let node = TestNode::start(NodeOptions {
        backups: false,
        ..NodeOptions::quiet()
    })
    .await;
    match node.client_once().backup("b").await {
        Err(Error::Api {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!((status, code), (403, ErrorCode::Forbidden));
            assert!(message.contains("[storage] backup_root"), "{message}");
        }
        other => panic!("expected 403 forbidden, got {other:?}"),
    }
    assert!(!node.dir.path().join("b").exists());
    assert!(node.client().healthy().await);
}

/// The start cursor of a stream of `segment` on `node` (its first, id-only, event).
async fn start_cursor(node: &TestNode, segment: &str) -> String {
    let path = format!("/v1/segments/{segment}/stream");
    let mut stream = SseStream::open(&node.base().replace("http://", ""), &path, None)
        .await
        .expect("the stream opens");
    let event = stream.next(Duration::from_secs(10)).await;
    event.and_then(|e| e.id).expect("the start cursor")
}

/// What `node` answers a stream of `segment` resumed at `cursor`: 200, or the refusal.
async fn resume(node: &TestNode, segment: &str, cursor: &str) -> (u16, String) {
    let path = format!("/v1/segments/{segment}/stream");
    match SseStream::open(&node.base().replace("http://", ""), &path, Some(cursor)).await {
        Ok(_) => (200, String::new()),
        Err(refused) => refused,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_before_a_restore_has_expired_and_another_clusters_is_invalid() {
    let source = TestNode::start(NodeOptions::quiet()).await;
    let client = source.client();
    client
        .put_segment("all", "points >= 0", None)
        .await
        .expect("defined");
    let before = start_cursor(&source, "all").await;
    client.backup("b").await.expect("backup");
    let restored =
        TestNode::start_restored(NodeOptions::quiet(), &source.backup_root().join("b")).await;
    // The same cluster, but its logs went back to the backup's offsets: other changes may
    // take them now, so the cursor has expired instead of skipping or repeating any.
    let (status, body) = resume(&restored, "all", &before).await;
    assert_eq!(status, 410, "{body}");
    assert!(
        body.contains("cursor_expired") && body.contains("restored from a backup"),
        "{body}"
    );
    // The source still takes it; a cursor of the restored node resumes there.
    assert_eq!(resume(&source, "all", &before).await.0, 200);
    let after = start_cursor(&restored, "all").await;
    assert_eq!(resume(&restored, "all", &after).await.0, 200);
    // Another cluster's cursor is no cursor of this one.
    let stranger = TestNode::start(NodeOptions::quiet()).await;
    stranger
        .client()
        .put_segment("all", "points >= 0", None)
        .await
        .expect("defined");
    let (status, body) = resume(&stranger, "all", &before).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("invalid_cursor") && body.contains("another cluster"),
        "{body}"
    );
    // A cursor of the first version named no cluster: expired, not skipped.
    let (status, body) = resume(&source, "all", "c10400000000").await;
    assert_eq!(status, 410, "{body}");
    assert!(
        body.contains("before cursors named their cluster"),
        "{body}"
    );
}

/// A node holding 200 events, with a backup of it in `b` under its backup root.
async fn node_with_backup() -> TestNode {
    let node = TestNode::start(NodeOptions::quiet()).await;
    let events: Vec<Value> = (0..200).map(event).collect();
    let client = node.client();
    assert_eq!(
        client
            .send_events_json(&events)
            .await
            .expect("ingest")
            .applied,
        200
    );
    client.backup("b").await.expect("backup");
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_data_directory_that_is_not_empty() {
    let mut node = node_with_backup().await;
    let dir = node.backup_root().join("b");
    let before = digests(&node).await;
    assert!(node.terminate().success());

    let status = node
        .run_expecting_exit(&[OsStr::new("--restore"), dir.as_os_str()])
        .await;
    assert!(
        !status.success(),
        "a restore over data must fail, got {status}"
    );
    let logs = node.logs();
    assert!(
        logs.contains("is not empty: a restore needs an absent or empty one"),
        "{logs}"
    );
    // The data directory was not touched.
    node.restart().await;
    assert_eq!(digests(&node).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_backup_that_does_not_match_its_manifest() {
    // The source node stays up (bound) until the end of the test.
    let source = node_with_backup().await;
    let dir = source.backup_root().join("b");

    // One digit of one shard's digest changed.
    let mut manifest = manifest_file(&dir);
    let digest = &mut manifest.shards[2].digest;
    let last = if digest.ends_with('0') { "1" } else { "0" };
    digest.replace_range(15.., last);
    std::fs::write(
        dir.join("backup.json"),
        serde_json::to_vec_pretty(&manifest).expect("encode"),
    )
    .expect("write");
    let target = TestNode::create(NodeOptions::default());
    let status = target
        .run_expecting_exit(&[OsStr::new("--restore"), dir.as_os_str()])
        .await;
    assert!(
        !status.success(),
        "a mismatched restore must fail, got {status}"
    );
    let logs = target.logs();
    assert!(logs.contains("shard 2 does not match the backup"), "{logs}");
    // What it copied is never served: a plain start refuses too.
    let status = target.run_expecting_exit(&[]).await;
    assert!(!status.success());
    assert!(
        target
            .logs()
            .contains("holds a restore that was interrupted or did not verify"),
        "{}",
        target.logs()
    );

    // A directory without a manifest is not a backup.
    std::fs::remove_file(dir.join("backup.json")).expect("remove");
    let target = TestNode::create(NodeOptions::default());
    let status = target
        .run_expecting_exit(&[OsStr::new("--restore"), dir.as_os_str()])
        .await;
    assert!(!status.success());
    assert!(
        target.logs().contains("it is not a finished backup"),
        "{}",
        target.logs()
    );
    assert!(!target.data_path().exists());
}
