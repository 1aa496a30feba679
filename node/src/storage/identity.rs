//! The records a data directory keeps of who it is: the state format and the cluster it
//! belongs to (checked at every start), this node's identity, and the identities of its peers.

use super::migrate::{FORMAT_KEY, MIGRATIONS, OLDEST_MIGRATED_FORMAT};
use super::{Storage, STATE_FORMAT};
use crate::config::ClusterRecord;
use anyhow::Context;
use fjall::PersistMode;
use std::collections::BTreeMap;

/// Meta keys `peer/identity/<node id, 8 bytes BE>`: the identity known for each peer.
const PEER_IDENTITY: &[u8] = b"peer/identity/";

/// Meta key of the restore epoch (8 bytes BE).
const RESTORE_EPOCH: &[u8] = b"restore/epoch";

/// The cluster record as `meta` stores it (postcard).
fn encode(record: &ClusterRecord) -> Vec<u8> {
    postcard::to_stdvec(record).expect("the cluster record encodes")
}

impl Storage {
    /// Records the cluster (its id, shard count, replication, nodes and their peer
    /// addresses) and the state format on first start, and refuses a data directory of
    /// another state format, or whose cluster the config contradicts: the shard count (routing
    /// hashes and OneIDs depend on it), the replication, the node ids, a node's peer address.
    /// A one-node cluster's peer address may change (a backup restored onto other ports), and
    /// is recorded anew. Answers what is recorded.
    pub fn check_cluster(&self, shape: &ClusterRecord) -> anyhow::Result<ClusterRecord> {
        const RECORD: &[u8] = b"cluster/record";
        let format = self
            .meta
            .get(FORMAT_KEY)?
            .map(|bytes| {
                let bytes: [u8; 4] = bytes
                    .as_ref()
                    .try_into()
                    .context("corrupt cluster/format record")?;
                anyhow::Ok(u32::from_be_bytes(bytes))
            })
            .transpose()?;
        // A shard writes its hard state (`hs/NNNN`) as soon as it starts: a directory with
        // none never served.
        if format.is_none() && !self.initialized() {
            // Both records in one batch: a crash leaves both or neither.
            let mut batch = self.db.batch();
            batch.insert(&self.meta, FORMAT_KEY, STATE_FORMAT.to_be_bytes());
            batch.insert(&self.meta, RECORD, encode(shape));
            batch.commit()?;
            self.db.persist(PersistMode::SyncAll)?;
            return Ok(shape.clone());
        }
        // Directories from before the format record hold format 1.
        let format = format.unwrap_or(1);
        anyhow::ensure!(
            format <= STATE_FORMAT,
            "this data directory holds state format {format}, written by a newer release than this one (format {STATE_FORMAT}): start that release; a data directory is never migrated back"
        );
        anyhow::ensure!(
            format >= OLDEST_MIGRATED_FORMAT,
            "this data directory holds state format {format}, but this oneid-node reads format {STATE_FORMAT} and migrates formats {OLDEST_MIGRATED_FORMAT} and later: start the version that wrote it, or upgrade through a release that migrates it"
        );
        self.migrate(format, STATE_FORMAT, MIGRATIONS)?;
        let bytes = self
            .meta
            .get(RECORD)?
            .context("no cluster/record beside the format")?;
        let mut recorded: ClusterRecord =
            postcard::from_bytes(&bytes).context("corrupt cluster/record")?;
        recorded.contradicted_by(shape)?;
        if recorded.nodes != shape.nodes {
            // Only a one-node cluster's peer address may differ: record the new one.
            recorded.nodes = shape.nodes.clone();
            self.meta.insert(RECORD, encode(&recorded))?;
            self.db.persist(PersistMode::SyncAll)?;
        }
        Ok(recorded)
    }

    /// This node's identity: random, recorded (durably) the first time it is asked, before
    /// any peer hears of it. A wiped data directory gets a new one, which peers that knew the
    /// old one refuse.
    pub fn node_identity(&self) -> anyhow::Result<[u8; 16]> {
        const IDENTITY: &[u8] = b"node/identity";
        if let Some(bytes) = self.meta.get(IDENTITY)? {
            return bytes
                .as_ref()
                .try_into()
                .context("corrupt node/identity record");
        }
        let identity: [u8; 16] = rand::random();
        self.meta.insert(IDENTITY, identity)?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(identity)
    }

    /// The restore epoch: drawn at random by each restore from a backup ([`Storage::
    /// draw_restore_epoch`]), 0 for data never restored. Stream cursors carry it: offsets of
    /// the change logs before a restore mean other changes after it.
    pub fn restore_epoch(&self) -> anyhow::Result<u64> {
        self.meta.get(RESTORE_EPOCH)?.map_or(Ok(0), |bytes| {
            let bytes: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .context("corrupt restore/epoch record")?;
            Ok(u64::from_be_bytes(bytes))
        })
    }

    /// Draws a new restore epoch (never 0) and records it durably: the data was just restored.
    pub fn draw_restore_epoch(&self) -> anyhow::Result<u64> {
        let epoch = rand::random::<u64>().max(1);
        self.meta.insert(RESTORE_EPOCH, epoch.to_be_bytes())?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(epoch)
    }

    /// Whether this directory holds an initialized cluster: its replicas were created (each
    /// writes its hard state as it starts).
    pub fn initialized(&self) -> bool {
        self.meta.prefix("hs/").next().is_some()
    }

    /// The identities recorded for peers, by node id.
    pub fn known_peers(&self) -> anyhow::Result<BTreeMap<u64, [u8; 16]>> {
        let mut known = BTreeMap::new();
        for entry in self.meta.prefix(PEER_IDENTITY) {
            let (key, value) = entry.into_inner()?;
            let id: [u8; 8] = key[PEER_IDENTITY.len()..]
                .try_into()
                .context("corrupt peer identity key")?;
            let identity: [u8; 16] = value
                .as_ref()
                .try_into()
                .context("corrupt peer identity record")?;
            known.insert(u64::from_be_bytes(id), identity);
        }
        Ok(known)
    }

    /// Records (durably) the identity of peer `id`.
    pub fn learn_peer(&self, id: u64, identity: [u8; 16]) -> anyhow::Result<()> {
        let key = [PEER_IDENTITY, &id.to_be_bytes()[..]].concat();
        self.meta.insert(key, identity)?;
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::TempDir;

    #[test]
    #[allow(clippy::too_many_lines)]
    fn a_data_directory_keeps_its_cluster_and_format() {
        let dir = TempDir::new("cluster");
        let nodes = |peers: &[&str]| {
            peers
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64 + 1, p.to_string()))
                .collect::<Vec<_>>()
        };
        let three = ClusterRecord::new(16, 3, nodes(&["a:1", "b:1", "c:1"]));
        let recorded = Storage::open_for_test(&dir, 16)
            .check_cluster(&three)
            .expect("a new directory");
        assert_eq!(recorded, three);
        assert_eq!(recorded.id.len(), 32);
        Storage::open_for_test(&dir, 16)
            .check_cluster(&three)
            .expect("the same cluster");
        let refused = |shape: ClusterRecord| {
            Storage::open_for_test(&dir, 16)
                .check_cluster(&shape)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(ClusterRecord::new(8, 3, nodes(&["a:1", "b:1", "c:1"]))),
            "this data directory belongs to a cluster of 16 shards, but the config says 8: the shard count cannot change"
        );
        assert_eq!(
            refused(ClusterRecord::new(16, 2, nodes(&["a:1", "b:1", "c:1"]))),
            "this data directory belongs to a cluster of replication 3, but the config says 2"
        );
        assert_eq!(
            refused(ClusterRecord::new(16, 3, nodes(&["a:1", "b:1"]))),
            "this data directory belongs to a cluster of nodes [1, 2, 3], but the config lists [1, 2]"
        );
        assert_eq!(
            refused(ClusterRecord::new(16, 3, nodes(&["a:1", "b:2", "c:1"]))),
            "node 2's peer address is b:1 in this data directory, but b:2 in the config"
        );

        // A one-node cluster may move its peer address; the id stays.
        let single = TempDir::new("cluster-single");
        let first = Storage::open_for_test(&single, 4)
            .check_cluster(&ClusterRecord::new(4, 1, nodes(&["a:1"])))
            .expect("new");
        let moved = Storage::open_for_test(&single, 4)
            .check_cluster(&ClusterRecord::new(4, 1, nodes(&["a:2"])))
            .expect("moved");
        assert_eq!((moved.id, moved.nodes), (first.id, nodes(&["a:2"])));

        // A fresh directory whose first start stopped before the records: still fresh.
        let fresh = TempDir::new("cluster-fresh");
        let one = ClusterRecord::new(4, 1, nodes(&["a:1"]));
        Storage::open_for_test(&fresh, 4)
            .check_cluster(&one)
            .expect("fresh");
        // One that served (a shard wrote its hard state) without the records: format 1.
        let old = TempDir::new("cluster-old");
        let storage = Storage::open_for_test(&old, 4);
        storage.meta.insert(b"hs/0000", b"x").expect("inserting");
        let error = storage.check_cluster(&one).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("this data directory holds state format 1, but this oneid-node reads format {STATE_FORMAT} and migrates formats {OLDEST_MIGRATED_FORMAT} and later: start the version that wrote it, or upgrade through a release that migrates it")
        );
        // One written by a newer release: never migrated back.
        let newer = TempDir::new("cluster-newer");
        let storage = Storage::open_for_test(&newer, 4);
        storage.check_cluster(&one).expect("fresh");
        storage
            .meta
            .insert(FORMAT_KEY, (STATE_FORMAT + 1).to_be_bytes())
            .expect("inserting");
        let error = storage.check_cluster(&one).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("this data directory holds state format {}, written by a newer release than this one (format {STATE_FORMAT}): start that release; a data directory is never migrated back", STATE_FORMAT + 1)
        );
    }
}
