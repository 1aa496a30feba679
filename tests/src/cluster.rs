//! A cluster of real `oneid-node` processes on loopback: one `cluster.toml` for all of them
//! (with a fresh secret), each node with its own data directory, API and peer ports.

use crate::{eventually, free_port, NodeOptions, TestNode, START_TIMEOUT};
use oneid_protocol::api::{ClusterView, ShardView};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The shape of a test cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub shards: u32,
    pub replication: u32,
    /// Clock entries only at first start (see `NodeOptions::quiet`), so replicas settle.
    pub clock_interval_ms: u64,
    /// `[cluster] log_retain_entries`, if not the default.
    pub log_retain_entries: Option<u64>,
    /// Extra TOML for `[cluster]`-level tables appended to the file.
    pub extra: String,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            nodes: 3,
            shards: 8,
            replication: 3,
            clock_interval_ms: 3_600_000,
            log_retain_entries: None,
            extra: String::new(),
        }
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub options: ClusterOptions,
    pub secret: String,
    /// By node id - 1.
    pub nodes: Vec<TestNode>,
    /// Each node's peer address, by node id - 1.
    pub peers: Vec<String>,
}

impl TestCluster {
    /// Writes the cluster's file and starts every node; waits until each is healthy.
    pub async fn start(options: ClusterOptions) -> TestCluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let secret = format!("test-secret-{:016x}", rand_u64());
        let config = dir.path().join("cluster.toml");
        let mut nodes = Vec::new();
        let mut peers = Vec::new();
        for id in 1..=options.nodes as u64 {
            let node_dir = tempfile::tempdir().expect("temporary directory");
            let node = TestNode {
                dir: node_dir,
                options: NodeOptions::default(),
                port: free_port(),
                member: Some((id, config.clone())),
                open_files: None,
                child: None,
            };
            peers.push(format!("127.0.0.1:{}", free_port()));
            nodes.push(node);
        }
        let mut cluster = TestCluster {
            dir,
            options,
            secret,
            nodes,
            peers,
        };
        cluster.write_config(&cluster.config_text());
        // All at once: no node is healthy before a quorum of each shard runs.
        for node in &mut cluster.nodes {
            node.spawn_only(&[]);
        }
        for node in &mut cluster.nodes {
            node.wait_healthy().await;
        }
        // A new shard takes events once its first clock entry applied (its leader may wait to
        // hear every voter's clock first): on every replica. And the cluster is at rest once
        // each shard is led by its placed leader: a replica elected first elsewhere hands
        // leadership over a few seconds later, and a write during that transfer may be answered
        // `unavailable`.
        eventually(
            "every shard's first clock entry, and its placed leader leading",
            START_TIMEOUT,
            async || {
                let views = cluster.views().await;
                let shards = views
                    .values()
                    .flat_map(|v| v.shards.iter().map(move |s| (v.node, s)));
                let unclocked: Vec<(u64, u32)> = shards
                    .clone()
                    .filter(|(_, s)| s.clock.starts_with("1970-"))
                    .map(|(node, s)| (node, s.id))
                    .collect();
                let led_from_home = shards
                    .filter(|(node, s)| s.role == "leader" && *node == s.placed_leader)
                    .count();
                match views.len() == cluster.nodes.len()
                    && unclocked.is_empty()
                    && led_from_home == cluster.options.shards as usize
                {
                    true => Ok(()),
                    false => Err((unclocked, led_from_home)),
                }
            },
        )
        .await;
        cluster
    }

    /// The cluster's `cluster.toml` as written at start.
    pub fn config_text(&self) -> String {
        let o = &self.options;
        let mut text = format!(
            "[cluster]\nshards = {}\nreplication = {}\nclock_interval_ms = {}\nsecret = \"{}\"\n\n",
            o.shards, o.replication, o.clock_interval_ms, self.secret
        );
        if let Some(retain) = o.log_retain_entries {
            text.insert_str(text.len() - 1, &format!("log_retain_entries = {retain}\n"));
        }
        text.push_str(&format!(
            "[storage]\nbackup_root = \"{}\"\n\n",
            self.backup_root().display()
        ));
        for (i, node) in self.nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[nodes]]\nid = {}\napi = \"127.0.0.1:{}\"\npeer = \"{}\"\ndata = \"{}\"\n\n",
                i + 1,
                node.port,
                self.peers[i],
                node.data_path().display()
            ));
        }
        text.push_str(&o.extra);
        text
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    /// Where every node's backups go (`[storage] backup_root`, shared by the nodes).
    pub fn backup_root(&self) -> PathBuf {
        self.dir.path().join("backups")
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("writing cluster.toml");
    }

    /// Node `id` (1-based).
    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[id as usize - 1]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut TestNode {
        &mut self.nodes[id as usize - 1]
    }

    /// The ids of the nodes whose process runs.
    pub fn running(&self) -> Vec<u64> {
        (1..=self.nodes.len() as u64)
            .filter(|id| self.node(*id).running())
            .collect()
    }

    /// `/v1/cluster` of every running node.
    pub async fn views(&self) -> BTreeMap<u64, ClusterView> {
        let mut views = BTreeMap::new();
        for id in self.running() {
            if let Ok(view) = self.node(id).client_once().cluster().await {
                views.insert(id, view);
            }
        }
        views
    }

    /// The leader of each shard, as the running nodes' replicas say.
    pub async fn leaders(&self) -> BTreeMap<u32, u64> {
        let mut leaders = BTreeMap::new();
        for view in self.views().await.values() {
            for shard in &view.shards {
                if shard.role == "leader" {
                    leaders.insert(shard.id, view.node);
                }
            }
        }
        leaders
    }

    /// Waits until every shard's replicas on the running nodes agree on their applied index
    /// (each equal to its commit index, one leader); answers each shard's (applied index,
    /// digest), and panics if two replicas at that index differ.
    pub async fn settled(&self) -> BTreeMap<u32, (u64, String)> {
        eventually(
            "every shard's replicas agreeing on their applied index",
            START_TIMEOUT,
            async || {
                let views = self.views().await;
                let mut by_shard: BTreeMap<u32, Vec<(u64, ShardView)>> = BTreeMap::new();
                for (node, view) in &views {
                    for shard in &view.shards {
                        by_shard
                            .entry(shard.id)
                            .or_default()
                            .push((*node, shard.clone()));
                    }
                }
                let running = self.running().len();
                let expected = (self.options.replication as usize).min(running);
                let agree = views.len() == running
                    && by_shard.len() == self.options.shards as usize
                    && by_shard.values().all(|replicas| {
                        replicas.len() >= expected
                            && replicas.iter().filter(|(_, s)| s.role == "leader").count() == 1
                            && replicas.iter().all(|(_, s)| {
                                s.applied_index == replicas[0].1.applied_index
                                    && s.commit_index == s.applied_index
                            })
                    });
                if !agree {
                    return Err(by_shard);
                }
                let mut settled = BTreeMap::new();
                for (shard, replicas) in by_shard {
                    let (node, first) = &replicas[0];
                    for (other, replica) in &replicas[1..] {
                        assert_eq!(
                            replica.digest, first.digest,
                            "shard {shard}: nodes {node} and {other} differ at applied index {}",
                            first.applied_index
                        );
                    }
                    settled.insert(shard, (first.applied_index, first.digest.clone()));
                }
                Ok(settled)
            },
        )
        .await
    }
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64
        ^ u64::from(std::process::id()) << 32
}
