//! Durable storage: one fjall database per node, and the writer thread that group-commits it.
//! The only module of the node that knows fjall: the rest reach the data through the API
//! below (`scripts/check-walls` fails if `fjall` is named outside `storage/`).
//!
//! Keyspaces: `meta` (each shard's Raft records, and the cluster's shard count and state
//! format), `log_NNNN` (a shard's Raft log, index → entry) and `state_NNNN` (a shard's applied
//! state, see `oneid_state::keys`). A shard's two keyspaces belong to a **generation**
//! (`gen/NNNN` in `meta`, 0 when absent): generation `G > 0` names them `log_NNNN_gG` and
//! `state_NNNN_gG`. A snapshot install writes the next generation's state beside the current
//! one (fjall cannot rename a keyspace), then switches `gen/NNNN` in the same atomic batch as
//! the shard's Raft records; the old generation is dropped after, and at open any generation
//! that is not the recorded one (a switch that never happened, or a drop a crash cut short) is
//! deleted.
//!
//! Every write goes through the [`Writer`]: a dedicated thread that takes all pending write
//! jobs of all shards, commits them as one fjall batch and makes them durable with one
//! `persist(SyncData)` (an fdatasync of fjall's preallocated journal), then calls each job's
//! completion. A failed write or fsync stops the process: nothing after it may be
//! acknowledged.
//!
//! # Layout
//! - this file: opening the database (its limits, the keyspaces of each hosted shard), the
//!   state format, fjall's gauges;
//! - `identity`: the records of who the directory is: format, cluster, node and peer
//!   identities;
//! - `generations`: a shard's keyspaces by generation, staging and switching them;
//! - `writer`: the writer thread and its group commit;
//! - `reader`: reads of the applied state (the state machine's view, consistent views, the
//!   `StateReader` of the API and router with its identity cache);
//! - `log`: a shard's Raft log as the replica core's `LogSource`;
//! - `copy`: whole-node copies at one snapshot and recomputed digests, for backups;
//! - `migrate`: upgrades of an older state format, in place at start.

mod copy;
mod generations;
mod identity;
mod log;
mod migrate;
mod migrations;
mod reader;
mod writer;

pub use copy::ShardDigest;
pub use generations::StagedState;
pub use log::FjallLog;
pub use migrate::OLDEST_MIGRATED_FORMAT;
pub use reader::{Answer, Pair, ProfileRead, Query, StateReader, StateView};
pub use writer::{WriteJob, Writer};

use crate::config::StorageConfig;
use anyhow::Context;
use fjall::{AbstractTree as _, Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use generations::{generation_names, parse_generation_name, Generation, NamedKeyspace};
use oneid_protocol::ids::ShardId;
use oneid_replica::log::generation_key;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::RwLock;

/// The layout of the stored state: keys, value encodings, the Raft commands. A node refuses a
/// data directory of another format. Format 2: retention queues filed per log entry, and
/// routed events carry the bindings the router found. Format 3: keyspaces created with fjall's
/// own memtable limit at `FJALL_ROTATION_FACTOR` × `memtable_mib` (fjall keeps it per keyspace).
/// Format 4: the shard's bookkeeping (clock, sequences, cursors) in its own record under the
/// digest; follow-up records on the profile's shard instead of outbox records on the
/// identity's; points lots with a sequence (their due keys name it), merged within a minute of
/// expiry and capped per profile. Format 5: the Raft log's own records (its conf state, where
/// it was compacted and its terms) beside the hard state, and logs that keep entries for
/// followers. Format 6: a shard's keyspaces by generation (`gen/NNNN`), which snapshot
/// installs switch. Format 7: segments (definitions, member keys, the change log, the
/// registry's sequences and the rules re-evaluation in the shard record, memberships in
/// profiles), the last order per channel in profiles, and the segment and backfill commands.
/// Format 8: clock entries carry the shard's majority time as their target, and the shard
/// record remembers the last (`migrations::TO_8`); the peer protocol changed with it (Raft
/// messages carry their sender's wall clock), which the handshake's format check fences.
/// Format 9: versioned rules (the commands `DefineRules` and `InstallRules`, the key `v`;
/// `migrations::TO_9` rewrites nothing). Format 10: the identity policy (rules end with it,
/// the shard record with the binding epoch, follow-ups are listed under their profiles, and
/// format-9 events become `LegacyEvents9`: `migrations::TO_10`). Format 11: what merges need
/// (profiles keep a write time per attribute and manual tag, when their OneID was minted and
/// what was merged into them; ledger records name a merge's peer and a moved lot's expiry;
/// format-10 events become `LegacyEvents10`: `migrations::TO_11`). Format 12: unlink
/// (follow-up records say whether they unbind, the key `u`, the command `Unbind` and the
/// event type `unlink`: `migrations::TO_12`). Format 13: a merge carries the loser's
/// unlinks (the import step and part `Unlinks`: `migrations::TO_13`).
pub const STATE_FORMAT: u32 = 13;
/// fjall's own memtable limit is this many times `memtable_mib` (see `Storage::open`).
const FJALL_ROTATION_FACTOR: u64 = 8;

/// Keyspaces with fjall's own rotation only as a safety net, far above `memtable_bytes`: each
/// batch commit to a keyspace over fjall's limit try-sends a rotate request to its workers,
/// and a worker rotating then makes a blocking send into that same bounded queue; under a long
/// compaction the requests filled the queue and both workers blocked for good (no more
/// flushes or compactions, memtables growing without bound). Whoever writes seals memtables
/// instead (`Storage::seal_if_full`), so the workers never wait on their own queue.
fn keyspace_options(memtable_bytes: u64) -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes * FJALL_ROTATION_FACTOR)
}

/// Most table files fjall keeps open (its descriptor cache; fjall's own default).
pub const CACHED_FILES_MAX: usize = 900;

/// Most write jobs one group commit takes; the rest wait for the next fsync.
pub const GROUP_COMMIT_JOBS_MAX: usize = 256;

pub struct Storage {
    db: Database,
    meta: Keyspace,
    /// The writer seals a keyspace's memtable once it holds this many bytes (`memtable_mib`).
    memtable_bytes: u64,
    /// Indexed by shard id; `None` for shards not hosted here. Replaced when a snapshot
    /// install switches the shard's generation.
    shards: Vec<Option<RwLock<Generation>>>,
    /// The generation the next staging takes (above every one on disk at open).
    next_generation: AtomicU64,
}

impl Storage {
    pub fn open(
        path: &Path,
        n_shards: u32,
        hosted: &[ShardId],
        limits: StorageConfig,
    ) -> anyhow::Result<Storage> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating data directory {}", path.display()))?;
        const MIB: u64 = 1024 * 1024;
        let db = Database::builder(path)
            .cache_size(limits.cache_mib * MIB)
            .max_cached_files(Some(CACHED_FILES_MAX))
            .open()
            .with_context(|| format!("opening fjall database in {}", path.display()))?;
        let memtable_bytes = limits.memtable_mib * MIB;
        let keyspace_options = || keyspace_options(memtable_bytes);
        let meta = db.keyspace("meta", keyspace_options)?;
        let mut shards: Vec<Option<RwLock<Generation>>> = (0..n_shards).map(|_| None).collect();
        let mut current = BTreeMap::new();
        for &shard in hosted {
            let number = match meta.get(generation_key(shard))? {
                Some(bytes) => {
                    u64::from_be_bytes(bytes.as_ref().try_into().context("corrupt gen record")?)
                }
                None => 0,
            };
            let (log, state) = generation_names(shard, number);
            let generation = Generation {
                number,
                log: db.keyspace(&log, keyspace_options)?,
                state: db.keyspace(&state, keyspace_options)?,
            };
            current.insert(shard, number);
            shards[shard.0 as usize] = Some(RwLock::new(generation));
        }
        // Generations that are not the recorded one: staged and never switched to, or
        // switched from and not yet dropped.
        let mut highest = 0;
        for name in db.list_keyspace_names() {
            let name = name.to_string();
            let Some((shard, number)) = parse_generation_name(&name) else {
                continue;
            };
            highest = highest.max(number);
            if current.get(&shard).is_some_and(|&c| c != number) {
                tracing::info!(keyspace = %name, "dropping a generation that is not the shard's");
                let keyspace = db.keyspace(&name, KeyspaceCreateOptions::default)?;
                db.delete_keyspace(keyspace)?;
            }
        }
        Ok(Storage {
            db,
            meta,
            memtable_bytes,
            shards,
            next_generation: AtomicU64::new(highest + 1),
        })
    }

    /// Makes everything written so far durable, journals and their directory included (the
    /// node's last act when it stops).
    pub fn sync_all(&self) -> anyhow::Result<()> {
        self.db
            .persist(PersistMode::SyncAll)
            .context("making storage durable")
    }

    /// fjall's gauges for `/metrics`: the memory its memtables hold and the background work
    /// (flushes, compactions) that frees it. `outstanding_flushes` and `active_compactions`
    /// are fjall's experimental API: if they change, these two gauges go, not the node.
    pub fn render_gauges(&self, out: &mut String) {
        let generations: Vec<Generation> = self.generations().collect();
        let keyspaces = || {
            generations
                .iter()
                .flat_map(|g| [&g.log, &g.state])
                .chain([&self.meta])
        };
        let gauges = [
            (
                "oneid_storage_write_buffer_bytes",
                "Bytes in fjall's memtables, active and sealed.",
                self.db.write_buffer_size(),
            ),
            (
                "oneid_storage_sealed_memtables",
                "Sealed memtables waiting to be flushed.",
                keyspaces()
                    .map(Keyspace::sealed_memtable_count)
                    .sum::<usize>() as u64,
            ),
            (
                "oneid_storage_outstanding_flushes",
                "Flushes queued for fjall's workers.",
                self.db.outstanding_flushes() as u64,
            ),
            (
                "oneid_storage_active_compactions",
                "Compactions running.",
                self.db.active_compactions() as u64,
            ),
            (
                "oneid_storage_journals",
                "fjall journal files.",
                self.db.journal_count() as u64,
            ),
            (
                "oneid_storage_tables",
                "Table files in all keyspaces.",
                keyspaces().map(Keyspace::table_count).sum::<usize>() as u64,
            ),
        ];
        for (name, help, value) in gauges {
            crate::metrics::gauge(out, name, help, value);
        }
    }

    /// Options for a keyspace of this node's database or of a backup of it.
    pub(super) fn keyspace_options(&self) -> KeyspaceCreateOptions {
        keyspace_options(self.memtable_bytes)
    }

    /// Seals `keyspace`'s memtable if it reached `memtable_mib`, handing it to fjall's flush
    /// workers; when their queue is full this waits for them (backpressure on the caller).
    pub(super) fn seal_if_full(&self, keyspace: &Keyspace) -> fjall::Result<()> {
        if keyspace.tree.active_memtable().size() >= self.memtable_bytes {
            keyspace.rotate_memtable()?;
        }
        Ok(())
    }
}

/// A fresh directory under the system's temporary directory, removed when dropped.
#[cfg(test)]
pub(crate) struct TempDir(pub std::path::PathBuf);

#[cfg(test)]
impl TempDir {
    pub(crate) fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "oneid-test-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_nanos()
        ));
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        TempDir(path)
    }
}

#[cfg(test)]
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
impl Storage {
    /// A storage of `n_shards` shards (none hosted) in `dir`, with the default limits.
    pub(crate) fn open_for_test(dir: &TempDir, n_shards: u32) -> Storage {
        Storage::open(&dir.0, n_shards, &[], StorageConfig::default()).expect("opening storage")
    }
}
