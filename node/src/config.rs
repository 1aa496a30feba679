//! `cluster.toml`: the cluster's shape, its nodes, tuning, and the seed rules.

use anyhow::{bail, Context};
use oneid_protocol::api::REQUEST_BODY_BYTES_MAX;
use oneid_protocol::ids::{ShardId, SHARDS_MAX};
use oneid_protocol::rules::{RetentionDoc, Rules, RulesDoc};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const MIB: usize = 1024 * 1024;
/// The shortest cluster secret accepted.
pub const SECRET_BYTES_MIN: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub segments: SegmentsConfig,
    pub nodes: Vec<NodeConfig>,
    /// Seed rules, written to the log on first start; later changes go through the API.
    #[serde(default)]
    pub rules: Option<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Number of shards (Raft groups); fixed for the life of the cluster.
    pub shards: u32,
    /// Replicas per shard.
    pub replication: u32,
    /// Most profiles held in memory on a node (the activation budget), split evenly between
    /// the shards the node hosts. Past it the least recently used are passivated.
    pub activation_budget: usize,
    /// Activations idle this long are passivated.
    pub passivate_idle_secs: u64,
    /// How often the leader proposes a clock entry.
    pub clock_interval_ms: u64,
    /// Deprecated spelling of `[rules.retention] dedup_days` (retention is replicated with the
    /// rules now): read into the seed rules when `[rules.retention]` is absent.
    pub dedup_retention_days: Option<u32>,
    /// Deprecated spelling of `[rules.retention] ledger_days`.
    pub ledger_retention_days: Option<u32>,
    /// Raft tick length; elections take 10 ticks, heartbeats 1.
    pub tick_ms: u64,
    /// Applied log entries kept for followers that fall behind; one further behind needs a
    /// snapshot.
    pub log_retain_entries: u64,
    /// The secret peers prove they know when they connect (at least 16 bytes; required with
    /// more than one node). `ONEID_CLUSTER_SECRET` in the environment wins over this.
    pub secret: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            shards: 16,
            replication: 1,
            activation_budget: 1_000_000,
            passivate_idle_secs: 600,
            clock_interval_ms: 1_000,
            dedup_retention_days: None,
            ledger_retention_days: None,
            tick_ms: 100,
            log_retain_entries: 100_000,
            secret: None,
        }
    }
}

/// Memory fjall may use on a node. Without these bounds fjall keeps up to 64 MiB of memtable
/// per keyspace. fjall 3.1 has no working cap on all memtables together, so the bound is per
/// keyspace: at most `memtable_mib` × (2 × hosted shards + 1) of active memtables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Block cache shared by all keyspaces.
    pub cache_mib: u64,
    /// One keyspace's memtable before it is flushed.
    pub memtable_mib: u64,
    /// The directory online backups go under (`POST /v1/admin/backup` names a directory
    /// relative to it); relative to the `cluster.toml` that names it. None: backups are off.
    pub backup_root: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            cache_mib: 128,
            memtable_mib: 8,
            backup_root: None,
        }
    }
}

/// Deprecated: the retention of each shard's change log of segment memberships is
/// `[rules.retention] change_log_hours` and `change_log_entries_max` now (replicated with the
/// rules); these spellings are read into the seed rules when `[rules.retention]` is absent.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentsConfig {
    pub change_log_retention_hours: Option<u32>,
    pub change_log_entries_max: Option<u64>,
}

/// How long the HTTP API waits for its clients, and the memory their bodies may take.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// A request head must be complete this long after its connection opened, or after the
    /// first byte of the head on a kept-alive connection; else the connection is closed.
    pub head_timeout_ms: u64,
    /// A kept-alive connection may sit idle between requests this long.
    pub idle_timeout_ms: u64,
    /// A request body that stops arriving this long is abandoned (408), and its connection
    /// closed.
    pub body_timeout_ms: u64,
    /// Request bodies in flight on the node (read, parsed, or held by an ingest whose client
    /// hung up), together. Past it, a body waits up to 5 s for room, then gets 503.
    pub body_budget_mib: u64,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            head_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_timeout_ms: 10_000,
            body_budget_mib: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    /// Address of the HTTP API.
    pub api: SocketAddr,
    /// Address for node-to-node Raft traffic.
    pub peer: SocketAddr,
    /// Data directory.
    pub data: PathBuf,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.validate()?;
        // A relative backup root is the file's: the same wherever the node is started from.
        if let Some(root) = &mut config.storage.backup_root {
            if root.is_relative() {
                let base = path.parent().unwrap_or(Path::new(""));
                *root = std::path::absolute(base.join(&*root))
                    .with_context(|| format!("resolving storage.backup_root {}", root.display()))?;
            }
        }
        Ok(config)
    }

    /// Refuses a file whose values contradict each other or the limits, naming them.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_nodes()?;
        self.validate_limits()?;
        self.seed_rules()?;
        Ok(())
    }

    /// The shard count, the replication, and the nodes: ids and addresses each once, and a
    /// secret for a cluster of several.
    fn validate_nodes(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        if !(1..=SHARDS_MAX).contains(&c.shards) {
            bail!(
                "cluster.shards must be 1 to {SHARDS_MAX}, found {}",
                c.shards
            );
        }
        if self.nodes.is_empty() {
            bail!("cluster.toml needs at least one [[nodes]] entry");
        }
        if c.replication < 1 || c.replication as usize > self.nodes.len() {
            bail!(
                "cluster.replication must be 1 to the number of nodes ({}), found {}",
                self.nodes.len(),
                c.replication
            );
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if node.id == 0 || node.id > u64::from(u32::MAX) {
                bail!("nodes[{i}].id must be 1 to {}, found {}", u32::MAX, node.id);
            }
            for other in &self.nodes[..i] {
                if other.id == node.id {
                    bail!("nodes[{i}].id {} appears twice", node.id);
                }
                if other.peer == node.peer {
                    bail!(
                        "nodes {} and {} have the same peer address {}",
                        other.id,
                        node.id,
                        node.peer
                    );
                }
                if other.api == node.api {
                    bail!(
                        "nodes {} and {} have the same api address {}",
                        other.id,
                        node.id,
                        node.api
                    );
                }
            }
        }
        if self.nodes.len() > 1 {
            let secret = self.secret().context("cluster.secret (or ONEID_CLUSTER_SECRET) is required with more than one node: peers prove they know it when they connect")?;
            if secret.len() < SECRET_BYTES_MIN {
                bail!(
                    "the cluster secret must be at least {SECRET_BYTES_MIN} bytes, found {}",
                    secret.len()
                );
            }
        }
        Ok(())
    }

    /// Every period, retention and budget is above 0, and the body budget fits a body.
    fn validate_limits(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        if c.log_retain_entries == 0 {
            bail!("cluster.log_retain_entries must be above 0");
        }
        if c.activation_budget == 0 || c.clock_interval_ms == 0 || c.tick_ms == 0 {
            bail!("cluster.activation_budget, clock_interval_ms and tick_ms must be above 0");
        }
        let s = &self.storage;
        if s.cache_mib == 0 || s.memtable_mib == 0 {
            bail!(
                "storage.cache_mib and storage.memtable_mib must be above 0, found {} and {}",
                s.cache_mib,
                s.memtable_mib
            );
        }
        if s.backup_root
            .as_ref()
            .is_some_and(|r| r.as_os_str().is_empty())
        {
            bail!("storage.backup_root must name a directory: leave it out to turn backups off");
        }
        let a = &self.api;
        if a.head_timeout_ms == 0 || a.idle_timeout_ms == 0 || a.body_timeout_ms == 0 {
            bail!("api.head_timeout_ms, idle_timeout_ms and body_timeout_ms must be above 0, found {a:?}");
        }
        let body_max_mib = (REQUEST_BODY_BYTES_MAX / MIB) as u64;
        if !(body_max_mib..=1024 * 1024).contains(&a.body_budget_mib) {
            bail!(
                "api.body_budget_mib must fit one request body of the largest size ({body_max_mib} MiB), found {}",
                a.body_budget_mib
            );
        }
        Ok(())
    }

    /// The cluster secret: `ONEID_CLUSTER_SECRET` if set, else `[cluster] secret`.
    pub fn secret(&self) -> Option<String> {
        std::env::var("ONEID_CLUSTER_SECRET")
            .ok()
            .or_else(|| self.cluster.secret.clone())
    }

    /// What a data directory records of this cluster at first start.
    pub fn record(&self) -> ClusterRecord {
        ClusterRecord::new(
            self.cluster.shards,
            self.cluster.replication,
            self.nodes
                .iter()
                .map(|n| (n.id, n.peer.to_string()))
                .collect(),
        )
    }

    /// The node this process runs: `--node`, or the only one.
    pub fn node(&self, id: Option<u64>) -> anyhow::Result<&NodeConfig> {
        match id {
            Some(id) => self
                .nodes
                .iter()
                .find(|n| n.id == id)
                .with_context(|| format!("no [[nodes]] entry with id {id}")),
            None if self.nodes.len() == 1 => Ok(&self.nodes[0]),
            None => bail!("the config has {} nodes: pass --node ID", self.nodes.len()),
        }
    }

    /// The shards with a replica on `node`: shard s lives on nodes `(s + r) % n`, r < replication.
    pub fn shards_of(&self, node: u64) -> Vec<ShardId> {
        let n = self.nodes.len() as u32;
        let position = self
            .nodes
            .iter()
            .position(|x| x.id == node)
            .expect("node is in the config") as u32;
        (0..self.cluster.shards)
            .filter(|s| (0..self.cluster.replication).any(|r| (s + r) % n == position))
            .map(ShardId)
            .collect()
    }

    /// The raft ids of a shard's voters. A replica's raft id is unique in the cluster:
    /// `shard << 32 | node id`.
    pub fn voters(&self, shard: ShardId) -> Vec<u64> {
        let n = self.nodes.len() as u32;
        (0..self.cluster.replication)
            .map(|r| raft_id(shard, self.nodes[((shard.0 + r) % n) as usize].id))
            .collect()
    }

    /// The node ids of each shard's replicas, the placed leader first.
    pub fn placement(&self) -> Vec<Vec<u64>> {
        (0..self.cluster.shards)
            .map(|s| {
                let voters = self.voters(ShardId(s)).into_iter();
                voters.map(node_of_raft_id).collect()
            })
            .collect()
    }

    /// The retention the deprecated keys (`[cluster] dedup_retention_days`,
    /// `ledger_retention_days`, `[segments] change_log_retention_hours`,
    /// `change_log_entries_max`) give, if any is set.
    pub fn deprecated_retention(&self) -> Option<RetentionDoc> {
        let (c, g) = (&self.cluster, &self.segments);
        let doc = RetentionDoc {
            dedup_days: c.dedup_retention_days,
            ledger_days: c.ledger_retention_days,
            change_log_hours: g.change_log_retention_hours,
            change_log_entries_max: g.change_log_entries_max,
        };
        (doc != RetentionDoc::default()).then_some(doc)
    }

    /// The `[rules]` table validated, or the defaults; its retention from the deprecated keys
    /// when `[rules.retention]` is absent (both is an error).
    pub fn seed_rules(&self) -> anyhow::Result<Rules> {
        let mut doc = self.seed_rules_doc()?;
        match (&doc.retention, self.deprecated_retention()) {
            (Some(_), Some(_)) => bail!("[rules.retention] and the deprecated [cluster] dedup_retention_days, ledger_retention_days, [segments] change_log_retention_hours, change_log_entries_max: keep only [rules.retention]"),
            (None, Some(deprecated)) => doc.retention = Some(deprecated),
            _ => {}
        }
        doc.validate().map_err(|e| anyhow::anyhow!("[rules] {e}"))
    }

    fn seed_rules_doc(&self) -> anyhow::Result<RulesDoc> {
        let Some(table) = &self.rules else {
            return Ok(RulesDoc::default());
        };
        let json = serde_json::to_string(table).context("[rules] must be a table")?;
        oneid_protocol::strict::from_json(json.as_bytes())
            .map_err(|e| anyhow::anyhow!("[rules] {e}"))
    }
}

/// A raft id is `shard << RAFT_ID_NODE_BITS | node`: node ids are below `u32::MAX` (checked
/// by `validate`). The replica core never derives anything from an id; membership changes
/// will allocate them instead.
const RAFT_ID_NODE_BITS: u32 = 32;

pub fn raft_id(shard: ShardId, node: u64) -> u64 {
    (u64::from(shard.0) << RAFT_ID_NODE_BITS) | node
}

/// The node id in a raft id.
pub fn node_of_raft_id(raft_id: u64) -> u64 {
    raft_id & ((1 << RAFT_ID_NODE_BITS) - 1)
}

/// The shard in a raft id.
pub fn shard_of_raft_id(raft_id: u64) -> ShardId {
    ShardId((raft_id >> RAFT_ID_NODE_BITS) as u32)
}

/// What a data directory records of its cluster at first start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterRecord {
    /// Derived from the rest at first start; the peer handshake names it.
    pub id: String,
    pub shards: u32,
    pub replication: u32,
    /// Each node's id and peer address, by id.
    pub nodes: Vec<(u64, String)>,
}

impl ClusterRecord {
    /// The record of a cluster of this shape; its id hashes the shape.
    pub fn new(shards: u32, replication: u32, mut nodes: Vec<(u64, String)>) -> ClusterRecord {
        nodes.sort();
        let text = format!("oneid cluster|{shards}|{replication}|{nodes:?}");
        let id = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()));
        ClusterRecord {
            id,
            shards,
            replication,
            nodes,
        }
    }

    /// Refuses a config (`shape`) that contradicts this record, naming both values.
    pub fn contradicted_by(&self, shape: &ClusterRecord) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.shards == shape.shards,
            "this data directory belongs to a cluster of {} shards, but the config says {}: the shard count cannot change",
            self.shards,
            shape.shards
        );
        anyhow::ensure!(
            self.replication == shape.replication,
            "this data directory belongs to a cluster of replication {}, but the config says {}",
            self.replication,
            shape.replication
        );
        let ids = |nodes: &[(u64, String)]| nodes.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        anyhow::ensure!(
            ids(&self.nodes) == ids(&shape.nodes),
            "this data directory belongs to a cluster of nodes {:?}, but the config lists {:?}",
            ids(&self.nodes),
            ids(&shape.nodes)
        );
        if self.nodes.len() > 1 {
            for ((id, recorded), (_, configured)) in self.nodes.iter().zip(&shape.nodes) {
                anyhow::ensure!(
                    recorded == configured,
                    "node {id}'s peer address is {recorded} in this data directory, but {configured} in the config"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneid_protocol::rules::Retention;

    const NODE: &str =
        "[[nodes]]\nid = 1\napi = \"127.0.0.1:8080\"\npeer = \"127.0.0.1:9080\"\ndata = \"d\"\n";

    fn parse(text: &str) -> Config {
        toml::from_str(&format!("{NODE}{text}")).expect("the file parses")
    }

    #[test]
    fn the_seed_retention_comes_from_rules_retention_or_the_deprecated_keys_never_both() {
        let embedded: Config = toml::from_str(include_str!("../../cluster.toml")).unwrap();
        let seed = embedded.seed_rules().unwrap();
        assert_eq!(seed.retention, Some(Retention::default()));
        // It seeds an identity policy too.
        assert_eq!(seed.identity.max_per_profile("member_card"), Some(1));
        assert!(!seed.identity.merges("device_id"));
        let config = parse("[rules.retention]\ndedup_days = 30\n");
        let expected = Retention {
            dedup_days: 30,
            ..Retention::default()
        };
        assert_eq!(config.seed_rules().unwrap().retention, Some(expected));
        assert_eq!(config.deprecated_retention(), None);
        // A file of an earlier release: its keys seed the same retention.
        let old = parse("[cluster]\ndedup_retention_days = 30\n");
        assert_eq!(old.seed_rules().unwrap().retention, Some(expected));
        let old = parse("[segments]\nchange_log_entries_max = 5\n");
        let retention = old.seed_rules().unwrap().retention.unwrap();
        assert_eq!(retention.change_log_entries_max, 5);
        // Both, or a value out of range, is refused naming the keys.
        let both =
            parse("[cluster]\nledger_retention_days = 9\n[rules.retention]\nledger_days = 9\n");
        let error = both.seed_rules().unwrap_err().to_string();
        assert!(error.contains("keep only [rules.retention]"), "{error}");
        let zero = parse("[rules.retention]\ndedup_days = 0\n");
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "[rules] retention.dedup_days: must be 1 to 36500 days, found 0"
        );
    }

    #[test]
    fn a_relative_backup_root_is_the_files_and_none_turns_backups_off() {
        let dir = crate::storage::TempDir::new("config");
        let file = dir.0.join("conf/cluster.toml");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let write_and_load = |storage: &str| {
            std::fs::write(&file, format!("{storage}{NODE}")).unwrap();
            Config::load(&file)
        };
        let config = write_and_load("[storage]\nbackup_root = \"./backups\"\n").unwrap();
        assert_eq!(
            config.storage.backup_root,
            Some(std::path::absolute(dir.0.join("conf/./backups")).unwrap())
        );
        let config = write_and_load("[storage]\nbackup_root = \"/srv/backups\"\n").unwrap();
        assert_eq!(config.storage.backup_root, Some("/srv/backups".into()));
        assert_eq!(write_and_load("").unwrap().storage.backup_root, None);
        let error = write_and_load("[storage]\nbackup_root = \"\"\n").unwrap_err();
        assert!(error
            .to_string()
            .contains("storage.backup_root must name a directory"));
        let embedded: Config = toml::from_str(include_str!("../../cluster.toml")).unwrap();
        assert_eq!(embedded.storage.backup_root, Some("./backups".into()));
    }
}
