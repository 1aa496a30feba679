//! `oneid cluster status`: the cluster at a glance, from every node's own view.
//!
//! It asks the given node for the cluster's nodes, then asks each node for its own replicas,
//! and shows which nodes are up, and per shard its leader and term, each replica's applied
//! index and how far it lags the leader's, and whether replicas at equal indexes have equal
//! digests (replicas that differ there have diverged: a bug to report); then the snapshots on
//! their way from a leader's node to a follower behind its log.

use oneid_client::Client;
use oneid_protocol::api::{ClusterView, ShardView};
use serde_json::json;
use std::collections::BTreeMap;

/// One node and what it said, if it answered.
struct Answer {
    id: u64,
    api: String,
    view: Option<ClusterView>,
}

pub async fn run(client: &Client, json_output: bool) -> anyhow::Result<()> {
    let first = client.cluster().await?;
    let answers = ask_every_node(&first).await?;
    let shards = by_shard(&answers);
    if json_output {
        return print_json(&first, &answers, &shards);
    }
    println!("cluster {}", first.cluster_id);
    print_nodes(&answers);
    print_shards(&shards);
    print_snapshots(snapshots(&answers));
    Ok(())
}

/// Asks every node that `first` lists for its own view, one after the other. The node that
/// gave `first` is not asked again. A node that does not answer within one short attempt is
/// recorded as down rather than failing the command, since finding such nodes is what the
/// command is for.
async fn ask_every_node(first: &ClusterView) -> anyhow::Result<Vec<Answer>> {
    let mut answers = Vec::new();
    for node in &first.nodes {
        let view = if node.id == first.node {
            Some(first.clone())
        } else {
            let other = Client::with_policy(
                &format!("http://{}", node.api),
                oneid_client::RetryPolicy {
                    attempts: 1,
                    timeout: std::time::Duration::from_secs(2),
                    ..Default::default()
                },
            )?;
            other.cluster().await.ok()
        };
        answers.push(Answer {
            id: node.id,
            api: node.api.clone(),
            view,
        });
    }
    Ok(answers)
}

/// The whole report as one JSON document for scripts: every node's full view as it answered,
/// and each shard's digest verdict.
fn print_json(
    first: &ClusterView,
    answers: &[Answer],
    shards: &BTreeMap<u32, Vec<(u64, ShardView)>>,
) -> anyhow::Result<()> {
    let nodes: Vec<_> = answers
        .iter()
        .map(|a| json!({"id": a.id, "api": a.api, "answered": a.view.is_some(), "view": a.view}))
        .collect();
    let report = json!({"cluster_id": first.cluster_id, "nodes": nodes,
        "shards": shards.iter().map(|(id, r)| json!({"id": id, "digests": digests(r)})).collect::<Vec<_>>()});
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The table of nodes: which ones answered, and how far each one's wall clock is off the
/// cluster's majority time (as that node sees itself; `-` if it did not answer or hears no
/// majority).
fn print_nodes(answers: &[Answer]) {
    println!("{:>4}  {:<22} {:<10} UP", "NODE", "API", "CLOCK");
    for answer in answers {
        let up = match &answer.view {
            Some(_) => "yes".to_string(),
            None => "no (did not answer)".to_string(),
        };
        let offset = answer
            .view
            .as_ref()
            .and_then(|view| view.nodes.iter().find(|n| n.id == answer.id))
            .and_then(|node| node.clock_offset_ms)
            .map_or("-".to_string(), clock_offset);
        println!("{:>4}  {:<22} {offset:<10} {up}", answer.id, answer.api);
    }
}

/// A clock offset in milliseconds, in the unit that reads best: `+0.012 s`, `-3.5 min`,
/// `+30.0 d`.
fn clock_offset(ms: i64) -> String {
    let units = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "min")];
    match units.iter().find(|(size, _)| ms.abs() >= *size) {
        Some((size, unit)) => format!("{:+.1} {unit}", ms as f64 / *size as f64),
        None => format!("{:+.3} s", ms as f64 / 1000.0),
    }
}

/// The table of shards, one row each (see [`shard_row`]).
fn print_shards(shards: &BTreeMap<u32, Vec<(u64, ShardView)>>) {
    println!(
        "{:>5} {:>6} {:>4} {:>5}  {:<28} DIGESTS",
        "SHARD", "LEADER", "HOME", "TERM", "APPLIED BY NODE (LAG)"
    );
    for (id, replicas) in shards {
        println!("{}", shard_row(*id, replicas));
    }
}

/// One shard's row: its leader, the node it leads from when all are well (its placed leader),
/// its term, each replica's applied index with its lag behind the leader's, and the digest
/// verdict. With no leader in sight there is no lag to show, and the
/// term is the highest any replica reported, as the closest to the shard's current one.
fn shard_row(id: u32, replicas: &[(u64, ShardView)]) -> String {
    let leader = replicas.iter().find(|(_, s)| s.role == "leader");
    let (leader_text, term, lead_applied) = match leader {
        Some((node, s)) => (node.to_string(), s.term, Some(s.applied_index)),
        None => (
            "-".to_string(),
            replicas.iter().map(|(_, s)| s.term).max().unwrap_or(0),
            None,
        ),
    };
    let applied: Vec<String> = replicas
        .iter()
        .map(|(node, s)| match lead_applied {
            Some(lead) if lead > s.applied_index => {
                format!("{node}:{}(-{})", s.applied_index, lead - s.applied_index)
            }
            _ => format!("{node}:{}", s.applied_index),
        })
        .collect();
    let home = replicas.first().map_or(0, |(_, s)| s.placed_leader);
    format!(
        "{id:>5} {leader_text:>6} {home:>4} {term:>5}  {:<28} {}",
        applied.join(" "),
        digests(replicas)
    )
}

/// The table of snapshots in flight, left out entirely when there are none, since that is the
/// usual case.
fn print_snapshots(snapshots: BTreeMap<(u32, u64, u64, u64), (u64, f64)>) {
    if snapshots.is_empty() {
        return;
    }
    println!("SNAPSHOTS IN FLIGHT");
    println!(
        "{:>5} {:>10} {:>4} {:>4} {:>9} {:>8}",
        "SHARD", "INDEX", "FROM", "TO", "MIB", "SECONDS"
    );
    for ((shard, index, from, to), (bytes, seconds)) in snapshots {
        let mib = bytes as f64 / 1_048_576.0;
        println!("{shard:>5} {index:>10} {from:>4} {to:>4} {mib:>9.1} {seconds:>8.1}");
    }
}

/// The snapshots the nodes said are on their way, by (shard, index, holder, follower): the
/// bytes received (or sent, if the follower did not say) and the seconds since it began.
fn snapshots(answers: &[Answer]) -> BTreeMap<(u32, u64, u64, u64), (u64, f64)> {
    let mut all = BTreeMap::new();
    for answer in answers {
        for s in answer.view.iter().flat_map(|v| &v.snapshots) {
            let (from, to) = match s.direction.as_str() {
                "in" => (s.node, answer.id),
                _ => (answer.id, s.node),
            };
            let entry = all
                .entry((s.shard, s.index, from, to))
                .or_insert((s.bytes, s.seconds));
            if s.direction == "in" {
                *entry = (s.bytes, s.seconds);
            }
        }
    }
    all
}

/// Each shard's replicas, as the nodes that hold them said.
fn by_shard(answers: &[Answer]) -> BTreeMap<u32, Vec<(u64, ShardView)>> {
    let mut shards: BTreeMap<u32, Vec<(u64, ShardView)>> = BTreeMap::new();
    for answer in answers {
        for shard in answer.view.iter().flat_map(|v| &v.shards) {
            shards
                .entry(shard.id)
                .or_default()
                .push((answer.id, shard.clone()));
        }
    }
    shards
}

/// `agree` if every two replicas at the same applied index have the same digest, `DIFFER
/// at INDEX` if two do not, `-` if no two are at the same index.
fn digests(replicas: &[(u64, ShardView)]) -> String {
    let mut at: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for (_, s) in replicas {
        at.entry(s.applied_index).or_default().push(&s.digest);
    }
    if let Some((index, _)) = at.iter().find(|(_, d)| d.iter().any(|x| *x != d[0])) {
        return format!("DIFFER at {index}");
    }
    if at.values().any(|d| d.len() > 1) {
        "agree".to_string()
    } else {
        "-".to_string()
    }
}
