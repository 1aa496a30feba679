//! Streams from any node: on 4 nodes with replication 3 no node holds every shard, yet each
//! serves a segment's snapshot and changes, reading the shards it lacks from their replicas on
//! other nodes. A watch through one node only, resumed by cursor whenever its stream closes,
//! sees every change exactly once while each node holding the shards it lacks is killed (-9)
//! and restarted in turn, so that the replica its remote tail reads from dies once at least.

use futures::StreamExt;
use oneid_client::{Client, SegmentEvent, WatchFrom};
use oneid_protocol::segments::ChangeKind;
use oneid_tests::cluster::{ClusterOptions, TestCluster};
use oneid_tests::{eventually, shard_of};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const SHARDS: u32 = 8;
/// The node the watch goes through.
const WATCHER: u64 = 4;

/// An earn of `points` for the customer of phone `phone` (event id `id`).
fn earn(phone: &str, id: &str, points: i64) -> Value {
    json!({"event_id": id, "type": "points_earn", "identities": {"phone": phone},
        "points": points})
}

/// Phones of `n` new customers (`round` apart from other rounds), about a third of them on shards
/// the watcher lacks.
fn customers(round: usize, n: usize, lacking: &BTreeSet<u32>) -> Vec<String> {
    let mut phones = Vec::new();
    let mut lacking_ones = 0;
    for i in 0.. {
        if phones.len() == n {
            break;
        }
        let phone = format!("15{round:02}{i:07}");
        let remote = lacking.contains(&shard_of("phone", &phone, SHARDS));
        if remote || lacking_ones * 3 >= phones.len() {
            lacking_ones += usize::from(remote);
            phones.push(phone);
        }
    }
    phones
}

/// Sends `events` until each applied (or was a duplicate of one that did).
async fn apply(client: &Client, events: &[Value]) {
    for chunk in events.chunks(50) {
        let answer = client.send_events_json(chunk).await.expect("send");
        assert_eq!(
            answer.applied + answer.duplicates,
            chunk.len() as u64,
            "{:?}",
            answer.results
        );
    }
}

/// What a watch has shown: the members it holds, and each change it delivered.
#[derive(Default)]
struct Seen {
    members: BTreeSet<String>,
    /// The members its (last) snapshot gave.
    snapshot: BTreeSet<String>,
    changes: Vec<(String, ChangeKind)>,
    snapshot_done: bool,
}

impl Seen {
    fn take(&mut self, event: SegmentEvent) {
        match event {
            SegmentEvent::SnapshotStart => self.members.clear(),
            SegmentEvent::Member(m) => {
                assert_eq!(m.change, ChangeKind::Enter);
                self.members.insert(m.oneid);
            }
            SegmentEvent::SnapshotEnd { members, .. } => {
                assert_eq!(members as usize, self.members.len());
                self.snapshot = self.members.clone();
                self.snapshot_done = true;
            }
            SegmentEvent::Change(c) => {
                assert!(self.snapshot_done, "a change before the snapshot's end");
                let fresh = match c.change {
                    ChangeKind::Enter => self.members.insert(c.oneid.clone()),
                    ChangeKind::Exit => self.members.remove(&c.oneid),
                    ChangeKind::Other(ref other) => panic!("a change {other}"),
                };
                assert!(fresh, "{} entered or left twice", c.oneid);
                self.changes.push((c.oneid, c.change));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn a_node_without_every_shard_streams_through_kills_of_the_replicas_it_reads() {
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 4,
        shards: SHARDS,
        ..ClusterOptions::default()
    })
    .await;
    let view = cluster.node(WATCHER).client().cluster().await.unwrap();
    let hosted: BTreeSet<u32> = view.shards.iter().map(|s| s.id).collect();
    let lacking: BTreeSet<u32> = (0..SHARDS).filter(|s| !hosted.contains(s)).collect();
    assert_eq!(
        lacking.len(),
        2,
        "4 nodes, 8 shards of 3 replicas: each lacks 2"
    );
    let others: Vec<u64> = (1..=4).filter(|n| *n != WATCHER).collect();
    let writers = Client::new(
        &others
            .iter()
            .map(|n| cluster.node(*n).base())
            .collect::<Vec<_>>()
            .join(","),
    )
    .unwrap();
    writers
        .put_segment("rich", "points >= 10", None)
        .await
        .unwrap();
    // Members before the watch, for its snapshot: 40 customers, 10 of them leaving later.
    let first = customers(0, 40, &lacking);
    let earns: Vec<Value> = first
        .iter()
        .map(|p| earn(p, &format!("a-{p}"), 10))
        .collect();
    apply(&writers, &earns).await;

    // The watch goes through the watcher only: a stream that closes resumes there.
    let watcher = cluster.node(WATCHER).client();
    let mut watch = std::pin::pin!(watcher.watch_segment("rich", WatchFrom::Snapshot));
    let mut seen = Seen::default();
    let listed = || async {
        writers
            .segment_members("rich")
            .map(|m| m.unwrap())
            .collect::<BTreeSet<String>>()
            .await
    };
    let mut read_until_quiet = async |seen: &mut Seen| {
        while let Ok(next) = tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
            seen.take(next.expect("the watch goes on").expect("no error"));
        }
    };
    read_until_quiet(&mut seen).await;
    assert!(seen.snapshot_done);
    assert_eq!(seen.members, listed().await, "the snapshot");

    // Each node holding the lacking shards is killed during a round of writes, then restarted.
    let mut entered: BTreeSet<String> = seen.members.clone();
    let lacks = |phone: &String| lacking.contains(&shard_of("phone", phone, SHARDS));
    let mut on_lacking = first.iter().filter(|p| lacks(p)).count();
    for (round, victim) in others.iter().copied().enumerate() {
        let phones = customers(round + 1, 30, &lacking);
        on_lacking += phones.iter().filter(|p| lacks(p)).count();
        let (before, after) = phones.split_at(15);
        apply(
            &writers,
            &before
                .iter()
                .map(|p| earn(p, &format!("b-{p}"), 10))
                .collect::<Vec<_>>(),
        )
        .await;
        cluster.node_mut(victim).kill9();
        apply(
            &writers,
            &after
                .iter()
                .map(|p| earn(p, &format!("b-{p}"), 10))
                .collect::<Vec<_>>(),
        )
        .await;
        // Some leave: a redeem takes a member below the threshold.
        let leaving = &first[round * 3..round * 3 + 3];
        let redeems: Vec<Value> = leaving
            .iter()
            .map(|p| {
                json!({"event_id": format!("r-{p}"), "type": "points_redeem",
                "identities": {"phone": p}, "points": 5})
            })
            .collect();
        apply(&writers, &redeems).await;
        cluster.node_mut(victim).restart().await;
        for p in &phones {
            let profile = writers.lookup("phone", p).await.unwrap().expect("exists");
            entered.insert(profile.oneid);
        }
        eventually(
            &format!("the watch caught up after node {victim} was killed"),
            Duration::from_secs(60),
            async || {
                read_until_quiet(&mut seen).await;
                let listed = listed().await;
                if seen.members == listed {
                    Ok(())
                } else {
                    let shards = |set: BTreeSet<&String>| -> Vec<String> {
                        set.into_iter()
                            .map(|o| format!("{o} (shard {})", &o[1..5]))
                            .collect()
                    };
                    Err(format!(
                        "{} watched, {} listed; missing {:?}; extra {:?}",
                        seen.members.len(),
                        listed.len(),
                        shards(listed.difference(&seen.members).collect()),
                        shards(seen.members.difference(&listed).collect()),
                    ))
                }
            },
        )
        .await;
    }
    // Every change exactly once: each customer entered once, in the snapshot or as a change
    // (a replica read may be behind the writes acknowledged before the watch began), each
    // leaver left once, and the shards the watcher lacks came through too.
    let mut counts: BTreeMap<(String, bool), usize> = BTreeMap::new();
    for (oneid, kind) in &seen.changes {
        *counts
            .entry((oneid.clone(), *kind == ChangeKind::Enter))
            .or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let enters: BTreeSet<String> = counts
        .keys()
        .filter(|(_, enter)| *enter)
        .map(|(oneid, _)| oneid.clone())
        .collect();
    assert!(enters.is_disjoint(&seen.snapshot));
    let all: BTreeSet<String> = enters.union(&seen.snapshot).cloned().collect();
    assert_eq!(all, entered);
    assert_eq!(all.len(), 40 + 90);
    let exits = counts.keys().filter(|(_, enter)| !*enter).count();
    assert_eq!(exits, 9);
    let remote = all
        .iter()
        .filter(|oneid| lacking.contains(&u32::from_str_radix(&oneid[1..5], 16).unwrap()))
        .count();
    assert_eq!(
        remote, on_lacking,
        "members on the shards the watcher lacks"
    );
}
