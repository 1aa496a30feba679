//! Replication on real processes: 3 nodes on loopback, replication 3, 8 shards. A leader
//! killed during ingest, a follower killed and restarted, a rolling restart during ingest, a
//! node paused past the election timeout and read through at once, hostile peer connections,
//! a contradicting config, a node restarted on a wiped data directory, a client of the whole
//! cluster, a backup of one node's replicas (restore refused), a node that fell behind the
//! compacted log and catches up by snapshot. After each: every acknowledged event is present exactly once, and replicas at equal applied
//! indexes have equal digests.

use oneid_client::Client;
use oneid_protocol::api::{EventStatus, EventsResponse};
use oneid_protocol::ErrorCode;
use oneid_tests::cluster::{ClusterOptions, TestCluster};
use oneid_tests::{eventually, read_until_closed};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CUSTOMERS: usize = 30;

/// Event `n`: one point for customer `n % CUSTOMERS`.
fn earn(n: usize) -> Value {
    json!({"event_id": format!("r-{n}"), "type": "points_earn",
        "identities": {"phone": format!("1370000{:04}", n % CUSTOMERS)}, "points": 1})
}

fn phone(customer: usize) -> String {
    format!("1370000{customer:04}")
}

/// Sends `events` in batches of 20 to `nodes` in turn, once each (no retries); answers each
/// batch's first event number, when it was sent, and the answer (`None`: the request failed).
async fn send_through(
    cluster: &TestCluster,
    nodes: &[u64],
    events: std::ops::Range<usize>,
) -> Vec<(usize, Instant, Option<EventsResponse>)> {
    let mut sent = Vec::new();
    let batches: Vec<usize> = events.clone().step_by(20).collect();
    for (i, first) in batches.into_iter().enumerate() {
        let node = nodes[i % nodes.len()];
        let batch: Vec<Value> = (first..(first + 20).min(events.end)).map(earn).collect();
        let at = Instant::now();
        let answer = cluster
            .node(node)
            .client_once()
            .send_events_json(&batch)
            .await
            .ok();
        sent.push((first, at, answer));
    }
    sent
}

/// Sends every event until each is applied or a duplicate (retrying what a leader change
/// left `unavailable`); answers the statuses by event number.
async fn send_all(client: &Client, events: std::ops::Range<usize>) -> BTreeMap<usize, EventStatus> {
    let all: Vec<Value> = events.clone().map(earn).collect();
    let mut statuses = BTreeMap::new();
    for (chunk, first) in all.chunks(100).zip(events.step_by(100)) {
        let answer = client.send_events_json(chunk).await.expect("send");
        for (i, result) in answer.results.iter().enumerate() {
            assert_ne!(result.status, EventStatus::Rejected, "{result:?}");
            statuses.insert(first + i, result.status.clone());
        }
    }
    statuses
}

/// Every customer's balance is the number of its events: each applied exactly once.
async fn assert_exactly_once(client: &Client, events: usize) {
    for customer in 0..CUSTOMERS {
        let expected = (0..events).filter(|n| n % CUSTOMERS == customer).count() as i64;
        let profile = client
            .lookup("phone", &phone(customer))
            .await
            .expect("lookup")
            .expect("the customer exists");
        assert_eq!(
            profile.points.balance, expected,
            "customer {customer}: each earn applied exactly once"
        );
    }
}

/// The node leading the most shards.
async fn busiest_leader(cluster: &TestCluster) -> u64 {
    let leaders = cluster.leaders().await;
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for node in leaders.values() {
        *counts.entry(*node).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(node, n)| (*n, std::cmp::Reverse(*node)))
        .expect("some leader")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_during_ingest_loses_nothing_and_rejoins() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    // Acknowledged before the kill (the client sends again what a leader change on a loaded
    // machine left `unavailable`; such an event is a duplicate if its first try applied).
    let before = send_all(&cluster.node(1).client(), 0..300).await;
    assert!(
        before
            .values()
            .all(|s| matches!(s, EventStatus::Applied | EventStatus::Duplicate)),
        "{before:?}"
    );

    let victim = busiest_leader(&cluster).await;
    let survivors: Vec<u64> = (1..=3).filter(|n| *n != victim).collect();
    cluster.node_mut(victim).kill9();
    let killed = Instant::now();
    // Keep writing through the survivors, once each (no retries), for 8 s and on until four
    // batches in a row (80 events: every customer) applied: the victim's shards have new
    // leaders. (How soon, target 2 s, scripts/bench measures, on a machine not also running
    // other tests.)
    let mut during = Vec::new();
    let mut next = 300;
    let mut applied_in_a_row = 0;
    while killed.elapsed() < Duration::from_secs(8) || applied_in_a_row < 4 {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "writes did not resume within 60 s of the kill"
        );
        for (first, at, answer) in send_through(&cluster, &survivors, next..next + 40).await {
            let answer = answer.expect("a survivor always answers");
            // An event is applied, or answered `unavailable` (sent again below).
            for result in &answer.results {
                let code = result.error.as_ref().map(|e| e.code.clone());
                assert!(
                    result.status == EventStatus::Applied || code == Some(ErrorCode::Unavailable),
                    "{result:?}"
                );
            }
            applied_in_a_row = match answer.applied {
                20 => applied_in_a_row + 1,
                _ => 0,
            };
            during.push((first, at, answer));
        }
        next += 40;
    }
    let resumed = during
        .iter()
        .rfind(|(.., answer)| answer.applied != 20)
        .map(|(_, at, _)| at.duration_since(killed));
    eprintln!("last batch not wholly applied: {resumed:?} after the kill");

    // The killed node rejoins and catches up from the log.
    cluster.node_mut(victim).restart().await;
    cluster.settled().await;
    // What was acknowledged is there once; what was not is sent again now.
    let client = cluster.node(victim).client();
    let statuses = send_all(&client, 0..next).await;
    let acknowledged =
        before
            .keys()
            .copied()
            .chain(during.iter().flat_map(|(first, _, answer)| {
                let applied = answer.results.iter().enumerate();
                applied
                    .filter(|(_, r)| r.status == EventStatus::Applied)
                    .map(move |(i, _)| first + i)
            }));
    for event in acknowledged {
        assert_eq!(statuses[&event], EventStatus::Duplicate, "event {event}");
    }
    assert_exactly_once(&client, next).await;
    cluster.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_and_restarted_catches_up() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    send_all(&cluster.node(1).client(), 0..200).await;
    // A node that leads nothing after its leaderships move away is killed: take node 3.
    cluster.node_mut(3).kill9();
    send_all(&cluster.node(1).client(), 200..600).await;
    cluster.node_mut(3).restart().await;
    let settled = cluster.settled().await;
    assert_eq!(settled.len(), 8);
    // Read through the restarted node: every event, exactly once.
    assert_exactly_once(&cluster.node(3).client(), 600).await;
    // `oneid cluster status` shows every node up and every shard's replicas agreeing.
    let output = std::process::Command::new(oneid_tests::cli_binary())
        .args(["--server", &cluster.node(2).base(), "cluster", "status"])
        .env_remove("ONEID_SERVER")
        .output()
        .expect("oneid");
    let out = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    for (i, line) in lines[2..5].iter().enumerate() {
        assert!(
            line.trim_start().starts_with(&(i + 1).to_string()) && line.ends_with("yes"),
            "{out}"
        );
    }
    for line in &lines[6..] {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.len(),
            8,
            "{line}: shard, leader, home, term, three replicas with no lag, and the digests"
        );
        assert_eq!(words[7], "agree", "{out}");
    }
    assert_eq!(lines.len(), 6 + 8, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn a_rolling_restart_during_ingest_stalls_no_write_and_loses_nothing() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    send_all(&cluster.node(1).client(), 0..200).await;
    let mut next = 200;
    let mut sent = Vec::new();
    for node in 1..=3 {
        let others: Vec<u64> = (1..=3).filter(|n| *n != node).collect();
        // SIGTERM while writes go on through the others, until it has exited.
        cluster.node(node).signal("TERM");
        let signalled = Instant::now();
        let status = loop {
            let started = Instant::now();
            let batch = send_through(&cluster, &others, next..next + 20).await;
            sent.push((
                node,
                "stopping",
                signalled.elapsed(),
                started.elapsed(),
                batch,
            ));
            next += 20;
            if let Some(status) = cluster.node_mut(node).exited() {
                break status;
            }
            assert!(
                signalled.elapsed() < Duration::from_secs(30),
                "node {node} did not stop"
            );
        };
        assert!(status.success(), "node {node} exited {status:?}");
        // Back, and caught up (leadership of its placed shards comes home) while writes go on.
        cluster.node_mut(node).restart().await;
        let back = Instant::now();
        while back.elapsed() < Duration::from_secs(4) {
            let started = Instant::now();
            let batch = send_through(&cluster, &others, next..next + 20).await;
            sent.push((node, "back", back.elapsed(), started.elapsed(), batch));
            next += 20;
        }
        cluster.settled().await;
    }
    // Every event applied: no batch met a shard without a leader, so no restart cost a
    // failover. (The stall itself, target 2 s, is measured by scripts/bench on a machine not
    // also running other tests; here, on a loaded machine, the bound is wide.)
    let longest = sent
        .iter()
        .map(|(.., took, _)| *took)
        .max()
        .expect("batches");
    assert!(
        longest <= Duration::from_secs(5),
        "a write stalled for {longest:?}"
    );
    // While a node stops, every event applies: its shards were handed off, no failover. Once
    // it is back, leadership of its placed shards is handed home; on a machine loaded by other
    // tests a transfer may outlast the 1 s forwarding timeout, so there an event may be answered
    // `unavailable` (and is sent again below).
    let mut applied = BTreeSet::new();
    for (restarted, phase, since, _, batches) in &sent {
        for (first, _, answer) in batches {
            let answer = answer.as_ref().expect("a running node answers");
            for (i, result) in answer.results.iter().enumerate() {
                match result.status {
                    EventStatus::Applied => {
                        applied.insert(first + i);
                    }
                    _ => assert!(
                        *phase == "back"
                            && result.error.as_ref().map(|e| e.code.clone()) == Some(ErrorCode::Unavailable),
                        "event {} during the restart of node {restarted} ({phase}, {since:?}): {result:?}",
                        first + i
                    ),
                }
            }
        }
    }
    let client = cluster.node(1).client();
    let statuses = send_all(&client, 0..next).await;
    for event in applied {
        assert_eq!(statuses[&event], EventStatus::Duplicate, "event {event}");
    }
    assert_exactly_once(&client, next).await;
    cluster.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_never_serves_an_old_value() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    send_all(&cluster.node(1).client(), 0..CUSTOMERS).await;
    // Pause the node that leads customer 0's shard, past the election timeout, while its
    // balance grows through another node.
    let customer = phone(0);
    let profile = cluster
        .node(1)
        .client()
        .lookup("phone", &customer)
        .await
        .unwrap()
        .unwrap();
    let shard = profile
        .oneid
        .parse::<oneid_protocol::ids::OneId>()
        .unwrap()
        .shard()
        .0;
    let paused = cluster.leaders().await[&shard];
    let other = (1..=3).find(|n| *n != paused).unwrap();
    cluster.node(paused).signal("STOP");
    let started = Instant::now();
    let client = cluster.node(other).client();
    let mut balance = 1;
    // Writes for 4 s (past the old leader's lease and the election timeout), and on until two
    // applied, however loaded the machine is (at most 60 s).
    while (started.elapsed() < Duration::from_secs(4) || balance <= 2)
        && started.elapsed() < Duration::from_secs(60)
    {
        let n = CUSTOMERS * balance as usize;
        let answer = client.send_events_json(&[earn(n)]).await.expect("send");
        if answer.applied == 1 {
            balance += 1;
        }
    }
    assert!(
        balance > 2,
        "writes went on while the old leader was paused"
    );
    cluster.node(paused).signal("CONT");
    // At once, through the node that still believes it leads: the newest balance.
    let reader = cluster.node(paused).client();
    for _ in 0..5 {
        let seen = reader
            .lookup("phone", &customer)
            .await
            .expect("read")
            .unwrap();
        assert_eq!(
            seen.points.balance, balance,
            "a read through the resumed node"
        );
    }
    let _ = &mut cluster;
    cluster.settled().await;
}

/// A hello of the peer handshake (its fixed layout), with a fixed nonce, from a node of
/// `identity` that holds an initialized cluster and knows no identity for the listener.
fn hello(cluster: [u8; 16], from: u64, to: u64, format: u32, identity: [u8; 16]) -> [u8; 109] {
    let mut out = [0u8; 109];
    out[..8].copy_from_slice(b"ONEIDP06");
    out[8..24].copy_from_slice(&cluster);
    out[24..32].copy_from_slice(&from.to_be_bytes());
    out[32..40].copy_from_slice(&to.to_be_bytes());
    out[40..44].copy_from_slice(&format.to_be_bytes());
    out[44..60].copy_from_slice(&identity);
    out[60] = 1;
    out[77..].copy_from_slice(&[7u8; 32]);
    out
}

/// The dialer's proof: HMAC over its role, its hello, and the listener's nonce and about
/// (bytes 8..73 of the challenge).
fn hmac(secret: &[u8], role: &str, hello: &[u8], challenge: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(role.as_bytes());
    mac.update(hello);
    mac.update(&challenge[8..73]);
    mac.finalize().into_bytes().to_vec()
}

/// Handshakes with the peer port as node `from` of `identity`, proving `secret`; answers the
/// stream.
async fn handshake(peer: &str, greeting: &[u8; 109], secret: &[u8]) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(peer).await.unwrap();
    stream.write_all(greeting).await.unwrap();
    let mut challenge = [0u8; 105];
    stream.read_exact(&mut challenge).await.unwrap();
    let proof = hmac(secret, "dialer", greeting, &challenge);
    stream.write_all(&proof).await.unwrap();
    stream
}

/// What the node sends on `stream` until it closes it (up to 10 s; see `read_until_closed`).
async fn closes(mut stream: tokio::net::TcpStream) -> Result<Vec<u8>, std::io::ErrorKind> {
    read_until_closed(&mut stream, Duration::from_secs(10)).await
}

fn identity_of(view: &oneid_protocol::api::ClusterView) -> [u8; 16] {
    u128::from_str_radix(&view.identity, 16)
        .unwrap()
        .to_be_bytes()
}

/// Connects to a peer port, writes `bytes`, and answers what the node sent until it closed
/// the connection (up to 10 s; see `read_until_closed`).
async fn closed_after(peer: &str, bytes: &[u8]) -> Result<Vec<u8>, std::io::ErrorKind> {
    let mut stream = tokio::net::TcpStream::connect(peer).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    closes(stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn hostile_peer_connections_are_refused_while_the_cluster_writes() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let view = cluster.node(1).client().cluster().await.unwrap();
    let id = u128::from_str_radix(&view.cluster_id, 16)
        .unwrap()
        .to_be_bytes();
    let peer = cluster.peers[0].clone();
    // The node's state format (`STATE_FORMAT`), which the handshake names.
    let format = 13;
    let writer = {
        let client = cluster.node(2).client();
        tokio::spawn(async move { send_all(&client, 0..400).await })
    };

    let refused =
        |reason: &str| format!("oneid_peer_handshakes_refused_total{{reason=\"{reason}\"}}");
    let stranger = [0x5A; 16];
    // Each refusal is a clean close once the node has read what was sent: a hello refused
    // before the node's challenge gets nothing back, and one refused after it (which the
    // handshake read) gets nothing more.
    let nothing = Ok(Vec::new());
    // A hello of the previous peer protocol (a node of an older release) has another magic.
    let mut older = hello(id, 2, 1, format, stranger);
    older[..8].copy_from_slice(b"ONEIDP02");
    assert_eq!(
        closed_after(&peer, &older).await,
        nothing,
        "a hello of another peer protocol"
    );
    assert_eq!(
        closed_after(&peer, &hello([9; 16], 2, 1, format, stranger)).await,
        nothing,
        "another cluster"
    );
    assert_eq!(
        closed_after(&peer, &hello(id, 9, 1, format, stranger)).await,
        nothing,
        "an unknown node"
    );
    assert_eq!(
        closed_after(&peer, &hello(id, 2, 3, format, stranger)).await,
        nothing,
        "a hello to another node"
    );
    assert_eq!(
        closed_after(&peer, &hello(id, 2, 1, format + 1, stranger)).await,
        nothing,
        "another state format"
    );
    // Right on every count but the proof: a stranger without the secret.
    let greeting = hello(id, 2, 1, format, stranger);
    let stream = handshake(&peer, &greeting, b"not the secret at all").await;
    assert_eq!(
        closes(stream).await,
        nothing,
        "a wrong proof closes the connection"
    );
    // With the secret, but not node 2's identity: a node 2 whose data directory was replaced.
    let stream = handshake(&peer, &greeting, cluster.secret.as_bytes()).await;
    assert_eq!(
        closes(stream).await,
        nothing,
        "another identity closes the connection"
    );

    // As node 3 itself, past the handshake: an oversized frame, then one that does not decode.
    let node_3 = identity_of(&cluster.node(3).client().cluster().await.unwrap());
    for (frame, reason) in [
        ((65u32 << 20).to_be_bytes().to_vec(), "oversized"),
        (
            [&3u32.to_be_bytes()[..], &[0xFF, 0xFF, 0xFF]].concat(),
            "malformed",
        ),
    ] {
        let greeting = hello(id, 3, 1, format, node_3);
        let mut stream = handshake(&peer, &greeting, cluster.secret.as_bytes()).await;
        stream.write_all(&frame).await.unwrap();
        assert_eq!(
            closes(stream).await,
            nothing,
            "a {reason} frame cuts the connection off"
        );
        let metric = format!("oneid_peer_frames_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(cluster.node(1).metric(&metric).await, 1);
    }
    let node = cluster.node(1);
    for reason in [
        "magic",
        "cluster",
        "unknown_node",
        "wrong_node",
        "format",
        "proof",
        "identity",
    ] {
        assert_eq!(node.metric(&refused(reason)).await, 1, "{reason}");
    }
    // The cluster kept writing, and node 1 kept serving.
    let statuses = writer.await.unwrap();
    assert_eq!(statuses.len(), 400);
    assert_exactly_once(&cluster.node(1).client(), 400).await;
    cluster.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_with_a_contradicting_config_exits_1() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    assert!(cluster.node_mut(2).terminate().success());
    let original = cluster.config_text();
    for (wrong, named) in [
        (
            original.replace("replication = 3", "replication = 2"),
            "replication 3",
        ),
        (
            original.replace(&cluster.peers[2], "127.0.0.1:1"),
            "node 3's peer address is",
        ),
        (original.replace("shards = 8", "shards = 16"), "8 shards"),
    ] {
        cluster.write_config(&wrong);
        let status = cluster.node(2).run_expecting_exit(&[] as &[&OsStr]).await;
        assert_eq!(status.code(), Some(1), "{named}");
        assert!(
            cluster.node(2).logs().contains(named),
            "{named}: {}",
            cluster.node(2).logs()
        );
    }
    cluster.write_config(&original);
    cluster.node_mut(2).restart().await;
    cluster.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_wiped_data_directory_exits_1_and_never_votes() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    send_all(&cluster.node(1).client(), 0..100).await;
    let known = cluster.node(3).client().cluster().await.unwrap().identity;
    assert!(cluster.node_mut(3).terminate().success());
    std::fs::remove_dir_all(cluster.node(3).data_path()).unwrap();
    let status = cluster.node(3).run_expecting_exit(&[] as &[&OsStr]).await;
    assert_eq!(status.code(), Some(1));
    let logs = cluster.node(3).logs();
    assert!(
        logs.contains(&format!(
            "holds an initialized cluster and knows this node by another identity ({known})"
        )),
        "{logs}"
    );
    // The other two go on, exactly once.
    send_all(&cluster.node(2).client(), 100..200).await;
    assert_exactly_once(&cluster.node(1).client(), 200).await;
}

/// Linearizable reads this node sent to a peer to serve.
async fn forwarded(cluster: &TestCluster, node: u64) -> u64 {
    cluster
        .node(node)
        .metric("oneid_linearizable_reads_total{served=\"forwarded\"}")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_cluster_reads_at_leaders_and_rides_through_a_nodes_death() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let servers: Vec<String> = (1..=3).map(|n| cluster.node(n).base()).collect();
    send_all(&cluster.node(1).client(), 0..100).await;
    cluster.settled().await;
    // Leadership settles (handed home after the first elections) before the client learns it:
    // every shard has a leader, and the same one a second later.
    eventually("leadership settling", Duration::from_secs(30), async || {
        let before = cluster.leaders().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = cluster.leaders().await;
        if before.len() == 8 && after == before {
            Ok(())
        } else {
            Err((before, after))
        }
    })
    .await;
    let client = Client::new(&servers.join(",")).unwrap();
    let mut oneids = Vec::new();
    for customer in 0..CUSTOMERS {
        let profile = client
            .lookup("phone", &phone(customer))
            .await
            .unwrap()
            .unwrap();
        oneids.push(profile.oneid);
    }
    let mut before = 0;
    for node in 1..=3 {
        before += forwarded(&cluster, node).await;
    }
    // By OneID: straight to each shard's leader, so no node forwards one.
    for (customer, oneid) in oneids.iter().enumerate() {
        let profile = client.profile(oneid).await.unwrap().unwrap();
        let expected = (0..100).filter(|n| n % CUSTOMERS == customer).count() as i64;
        assert_eq!(profile.points.balance, expected);
    }
    let mut after = 0;
    for node in 1..=3 {
        after += forwarded(&cluster, node).await;
    }
    assert_eq!(after, before, "reads by OneID were forwarded");

    // The first server dies: the client goes on through the others, exactly once.
    cluster.node_mut(1).kill9();
    send_all(&client, 100..200).await;
    assert_exactly_once(&client, 200).await;
    for oneid in &oneids {
        assert!(client.profile(oneid).await.unwrap().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_the_nodes_replicas_and_a_cluster_refuses_restore() {
    let mut cluster = TestCluster::start(ClusterOptions {
        replication: 2,
        ..ClusterOptions::default()
    })
    .await;
    send_all(&cluster.node(1).client(), 0..100).await;
    cluster.settled().await;
    let dir = cluster.backup_root().join("node-2");
    let manifest = cluster.node(2).client().backup("node-2").await.unwrap();
    assert_eq!(manifest.node, 2);
    let view = cluster.node(2).client().cluster().await.unwrap();
    let backed_up: Vec<u64> = manifest.shards.iter().map(|s| u64::from(s.id)).collect();
    let hosted: Vec<u64> = view.shards.iter().map(|s| u64::from(s.id)).collect();
    assert_eq!(backed_up, hosted);
    assert!(
        hosted.len() < 8,
        "replication 2 of 3 nodes: node 2 hosts some shards"
    );
    // Nothing changed since the cluster settled: the backup is at the replicas' state.
    for (shard, view) in manifest.shards.iter().zip(&view.shards) {
        assert_eq!(shard.applied_index, view.applied_index);
        assert_eq!(shard.digest, view.digest);
    }
    assert!(cluster.node_mut(2).terminate().success());
    let status = cluster
        .node(2)
        .run_expecting_exit(&[OsStr::new("--restore"), dir.as_os_str()])
        .await;
    assert_eq!(status.code(), Some(1));
    assert!(cluster
        .node(2)
        .logs()
        .contains("--restore restores a one-node cluster, and this file lists 3 nodes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_compacted_log_catches_up_by_snapshot_and_serves_exact_totals() {
    let mut cluster = TestCluster::start(ClusterOptions {
        log_retain_entries: Some(50),
        ..ClusterOptions::default()
    })
    .await;
    send_all(&cluster.node(1).client(), 0..1_000).await;
    cluster.node_mut(3).kill9();
    // Batches of 20 events: each writes an entry on most of the 8 shards, so every shard's
    // log moves well past the 50 entries it keeps (and the 64 it compacts at once).
    let client = cluster.node(1).client();
    for first in (1_000..9_000).step_by(20) {
        send_all(&client, first..first + 20).await;
    }
    let lagging = cluster
        .node(1)
        .client()
        .cluster()
        .await
        .expect("cluster view");
    let needing = lagging
        .shards
        .iter()
        .filter(|s| s.needs_snapshot.contains(&3))
        .count();
    assert!(
        needing > 0,
        "node 3 is behind some shard's compacted log: {lagging:?}"
    );

    cluster.node_mut(3).restart().await;
    let settled = cluster.settled().await;
    assert_eq!(settled.len(), 8, "every shard's digests agree: {settled:?}");
    let installed = cluster
        .node(3)
        .metric("oneid_snapshots_installed_total")
        .await;
    // Every shard's log moved some 400 entries past node 3's (50 kept, 64 compacted at once):
    // each of the 8 caught up by exactly one snapshot.
    assert_eq!(installed, 8, "{needing} needed one when checked");
    let mut sent = 0;
    for node in [1, 2] {
        sent += cluster
            .node(node)
            .metric("oneid_snapshots_sent_total")
            .await;
    }
    assert!(sent >= installed, "{sent} sent, {installed} installed");
    eprintln!("{needing} shards needed a snapshot; {sent} sent, {installed} installed");
    // Nobody waits for a snapshot any more, and none is in flight.
    for (node, view) in cluster.views().await {
        assert!(
            view.snapshots.is_empty(),
            "node {node}: {:?}",
            view.snapshots
        );
        for shard in &view.shards {
            assert!(shard.needs_snapshot.is_empty(), "node {node}: {shard:?}");
        }
    }

    // With node 1 gone, node 3's installed replicas are in every quorum: writes and reads
    // through it see exact totals.
    cluster.node_mut(1).kill9();
    let client = cluster.node(3).client();
    send_all(&client, 9_000..9_300).await;
    assert_exactly_once(&client, 9_300).await;
    cluster.settled().await;
}
