//! Whole-node copies and digests, for backups: every keyspace at one fjall snapshot copied
//! into a new database, and a shard's digest recomputed from its pairs.

use super::{NamedKeyspace, Storage};
use anyhow::{anyhow, Context};
use fjall::{Database, PersistMode, Readable as _};
use oneid_protocol::ids::ShardId;
use oneid_state::store::pair_hash;
use oneid_state::{keys, ShardMeta};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Most pairs in one write batch of a copy.
pub const COPY_BATCH_PAIRS_MAX: usize = 10_000;
/// Most bytes (keys and values) in one write batch of a copy.
pub const COPY_BATCH_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Times a copy takes its snapshot again when a shard switched generations meanwhile.
const SNAPSHOT_ATTEMPTS: usize = 3;

/// What a copy wrote of one keyspace.
pub struct CopiedKeyspace {
    pub name: String,
    pub pairs: u64,
    pub bytes: u64,
    /// A shard's state keyspace: the shard, and its pairs' digest against its meta record.
    pub shard: Option<(ShardId, ShardDigest)>,
}

/// A shard's state as its pairs say: the meta record (applied index, recorded digest; the
/// default for a shard that never applied an entry) and the digest recomputed from every
/// other pair.
#[derive(Default)]
pub struct ShardDigest {
    pub meta: ShardMeta,
    pub recomputed: u64,
}

impl ShardDigest {
    fn add(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        if key == keys::META {
            self.meta = postcard::from_bytes(value).context("decoding a shard's meta record")?;
        } else {
            self.recomputed = self.recomputed.wrapping_add(pair_hash(key, value));
        }
        Ok(())
    }
}

impl Storage {
    /// Copies every keyspace this node reads, at one snapshot (one sequence number across
    /// them all, so each shard's state, log and hard state agree as after a crash at that
    /// instant), into a new database in `dir`, in bounded batches, and makes it durable.
    /// Answers what it copied, or `None` if `cancelled` was set meanwhile.
    pub fn copy_to(
        &self,
        dir: &Path,
        cancelled: &AtomicBool,
    ) -> anyhow::Result<Option<Vec<CopiedKeyspace>>> {
        // The keyspaces, then one snapshot of them all: a snapshot install that switched a
        // shard in between would leave the snapshot's meta naming another generation than
        // the one listed, so that case is taken again.
        let (snapshot, keyspaces) = (0..SNAPSHOT_ATTEMPTS)
            .find_map(|_| {
                let keyspaces = self.keyspaces();
                let snapshot = self.db.snapshot();
                let agree = keyspaces.iter().all(|k| {
                    k.shard
                        .is_none_or(|(s, g)| self.recorded_generation(&snapshot, s) == g)
                });
                agree.then_some((snapshot, keyspaces))
            })
            .ok_or_else(|| {
                anyhow!("a shard switched generations during each of {SNAPSHOT_ATTEMPTS} attempts")
            })?;
        let target = Database::builder(dir)
            .open()
            .with_context(|| format!("creating the copy's database in {}", dir.display()))?;
        let mut copied = Vec::new();
        for keyspace in &keyspaces {
            match self.copy_keyspace(&snapshot, keyspace, &target, cancelled)? {
                Some(one) => copied.push(one),
                None => return Ok(None),
            }
        }
        target
            .persist(PersistMode::SyncAll)
            .context("making the copy durable")?;
        // Closing waits for fjall's background work on the copy; the snapshot goes with it.
        drop(target);
        Ok(Some(copied))
    }

    fn copy_keyspace(
        &self,
        snapshot: &fjall::Snapshot,
        source: &NamedKeyspace,
        target: &Database,
        cancelled: &AtomicBool,
    ) -> anyhow::Result<Option<CopiedKeyspace>> {
        let name = &source.name;
        let shard = source.shard.filter(|_| name.starts_with("state_"));
        let destination = target
            .keyspace(name, || self.keyspace_options())
            .with_context(|| format!("creating keyspace {name} in the copy"))?;
        let mut batch = target.batch();
        let (mut batch_pairs, mut batch_bytes) = (0usize, 0usize);
        let (mut pairs, mut bytes) = (0u64, 0u64);
        let mut digest = ShardDigest::default();
        for guard in snapshot.iter(&source.keyspace) {
            let (key, value) = guard
                .into_inner()
                .with_context(|| format!("reading keyspace {name}"))?;
            if shard.is_some() {
                digest
                    .add(&key, &value)
                    .with_context(|| format!("in {name}"))?;
            }
            let size = key.len() + value.len();
            (pairs, bytes) = (pairs + 1, bytes + size as u64);
            (batch_pairs, batch_bytes) = (batch_pairs + 1, batch_bytes + size);
            batch.insert(&destination, key, value);
            if batch_pairs >= COPY_BATCH_PAIRS_MAX || batch_bytes >= COPY_BATCH_BYTES_MAX {
                std::mem::replace(&mut batch, target.batch())
                    .commit()
                    .and_then(|()| self.seal_if_full(&destination))
                    .with_context(|| format!("writing keyspace {name} to the copy"))?;
                (batch_pairs, batch_bytes) = (0, 0);
                if cancelled.load(Ordering::SeqCst) {
                    return Ok(None);
                }
            }
        }
        batch
            .commit()
            .with_context(|| format!("writing keyspace {name} to the copy"))?;
        if cancelled.load(Ordering::SeqCst) {
            return Ok(None);
        }
        Ok(Some(CopiedKeyspace {
            name: name.clone(),
            pairs,
            bytes,
            shard: shard.map(|(shard, _)| (shard, digest)),
        }))
    }

    /// The shard's meta record and its digest recomputed from its pairs, as stored now.
    pub fn state_digest(&self, shard: ShardId) -> anyhow::Result<ShardDigest> {
        let mut digest = ShardDigest::default();
        for guard in self.state(shard).iter() {
            let (key, value) = guard.into_inner()?;
            digest
                .add(&key, &value)
                .with_context(|| format!("in shard {shard}"))?;
        }
        Ok(digest)
    }
}
