//! Upgrades: a data directory written by an older release is migrated in place at start, one
//! format at a time, by a chain of [`Migration`]s (format `N - 1` → `N`), from
//! [`OLDEST_MIGRATED_FORMAT`] up to `STATE_FORMAT`. Older directories are refused.
//!
//! A migration is a pure function of stored bytes: each state pair, and the command of each
//! Raft log entry (committed or not: an entry applied after the upgrade must decode as the new
//! release reads it). It reads no config and no clock, so replicas of a shard migrated apart,
//! on different nodes and at different times, still reach equal digests. And since replicas
//! stop at different applied indexes, an entry one applied before the upgrade another applies
//! after it: a migrated entry must apply to the migrated state as the original did to the
//! original state, migrated after. A format that applies a command otherwise keeps the old
//! ones in the log as legacy commands that apply as they did (see `migrations`).
//!
//! How one link runs, shard by shard, resumable after a crash at any point:
//! 1. the shard's migrated state and log are written into a new generation of its keyspaces
//!    (as a snapshot is staged), in bounded batches, with the digest recomputed over the new
//!    pairs and written in the shard's meta record;
//! 2. one atomic batch records that generation (`gen/NNNN`) and that the shard is done for
//!    this link (`migrated/<format>/NNNN`), made durable; the old generation is dropped;
//! 3. once every hosted shard is done, one batch sets `cluster/format` to the new format and
//!    removes the shards' marks.
//!
//! A crash before step 2 leaves a generation nobody recorded (dropped at the next open, and
//! the shard migrated again); after it, the shard is skipped. The node's other records (hard
//! states, conf states, log metadata, identities) keep their encodings; a link that changes
//! one of them adds it to its own step 3.

use super::generations::generation_names;
use super::{Pair, Storage, STATE_FORMAT};
use anyhow::Context;
use fjall::PersistMode;
use oneid_protocol::ids::ShardId;
use oneid_replica::log::{generation_key, rewrite_entry};
use oneid_state::store::pair_hash;
use oneid_state::{keys, ShardMeta};
use std::sync::atomic::Ordering;

/// The oldest state format this release migrates; a directory of an older one is refused.
pub const OLDEST_MIGRATED_FORMAT: u32 = 7;

/// Most pairs (or log entries) in one write batch of a migration.
pub const MIGRATE_BATCH_PAIRS_MAX: usize = 10_000;

/// The meta key `cluster/format`: the state format the directory holds (u32 big-endian).
pub(super) const FORMAT_KEY: &[u8] = b"cluster/format";

/// One link of the chain: rewrites a directory of format `from` into format `from + 1`.
pub struct Migration {
    pub from: u32,
    /// One pair of a shard's state (not its meta record, which the runner rewrites): the
    /// pairs it becomes, none to drop it.
    pub state_pair: fn(key: &[u8], value: &[u8]) -> Vec<Pair>,
    /// The command (postcard) of one Raft log entry, as the next format encodes it.
    pub command: fn(&[u8]) -> Vec<u8>,
}

/// The chain, in order: link `i` migrates from format `OLDEST_MIGRATED_FORMAT + i`. Each
/// `STATE_FORMAT` bump adds its link here, and its fixture under `tests/fixtures/`
/// (`scripts/fixture`).
pub const MIGRATIONS: &[Migration] = &[
    super::migrations::TO_8,
    super::migrations::TO_9,
    super::migrations::TO_10,
    super::migrations::TO_11,
    super::migrations::TO_12,
    super::migrations::TO_13,
];

const _: () = assert!(
    OLDEST_MIGRATED_FORMAT as usize + MIGRATIONS.len() == STATE_FORMAT as usize,
    "the chain of migrations must end at STATE_FORMAT"
);

impl Storage {
    /// Migrates the directory from format `from` to `to` through `chain` (a directory of
    /// format `to` is left as it is). Each link is checked to start where the last ended.
    pub(super) fn migrate(&self, from: u32, to: u32, chain: &[Migration]) -> anyhow::Result<()> {
        for format in from..to {
            let link = chain
                .iter()
                .find(|m| m.from == format)
                .with_context(|| format!("no migration from state format {format}"))?;
            tracing::info!(
                from = format,
                to = format + 1,
                "migrating the data directory"
            );
            for shard in self.hosted() {
                if self.meta.get(done_key(format + 1, shard))?.is_some() {
                    continue;
                }
                self.migrate_shard(link, shard)
                    .with_context(|| format!("migrating shard {shard} to format {}", format + 1))?;
            }
            let mut batch = self.db.batch();
            batch.insert(&self.meta, FORMAT_KEY, (format + 1).to_be_bytes());
            for shard in self.hosted() {
                batch.remove(&self.meta, done_key(format + 1, shard));
            }
            batch.commit()?;
            self.db.persist(PersistMode::SyncAll)?;
            tracing::info!(format = format + 1, "data directory migrated");
        }
        Ok(())
    }

    /// Steps 1 and 2 of the module's list for one shard.
    fn migrate_shard(&self, link: &Migration, shard: ShardId) -> anyhow::Result<()> {
        let number = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (log_name, state_name) = generation_names(shard, number);
        let log = self.db.keyspace(&log_name, || self.keyspace_options())?;
        let state = self.db.keyspace(&state_name, || self.keyspace_options())?;
        let mut meta: Option<ShardMeta> = None;
        let mut digest = 0u64;
        let mut pairs = Vec::new();
        for guard in self.state(shard).iter() {
            let (key, value) = guard.into_inner()?;
            if key.as_ref() == keys::META {
                meta = Some(postcard::from_bytes(&value).context("decoding the meta record")?);
                continue;
            }
            for (key, value) in (link.state_pair)(&key, &value) {
                digest = digest.wrapping_add(pair_hash(&key, &value));
                pairs.push((key, value));
            }
            if pairs.len() >= MIGRATE_BATCH_PAIRS_MAX {
                self.write_pairs(&state, std::mem::take(&mut pairs))?;
            }
        }
        // A shard that never applied an entry has no meta record, and keeps none.
        if let Some(meta) = &mut meta {
            meta.digest = digest;
            pairs.push((keys::META.to_vec(), postcard::to_stdvec(meta)?));
        }
        self.write_pairs(&state, pairs)?;
        let mut entries = Vec::new();
        for guard in self.log(shard).iter() {
            let (index, entry) = guard.into_inner()?;
            let entry = rewrite_entry(&entry, link.command)
                .with_context(|| format!("log entry at key {index:?}"))?;
            entries.push((index.to_vec(), entry));
            if entries.len() >= MIGRATE_BATCH_PAIRS_MAX {
                self.write_pairs(&log, std::mem::take(&mut entries))?;
            }
        }
        self.write_pairs(&log, entries)?;
        let mut batch = self.db.batch();
        batch.insert(&self.meta, generation_key(shard), number.to_be_bytes());
        batch.insert(&self.meta, done_key(link.from + 1, shard), []);
        batch.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
        self.switch(shard, number)
            .unwrap_or_else(|error| tracing::warn!(%shard, %error, "dropping the old generation failed; the next start drops it"));
        let applied = meta.map_or(0, |m| m.applied_index);
        tracing::info!(%shard, generation = number, applied, "shard migrated");
        Ok(())
    }
}

/// The meta key `migrated/<format>/NNNN`: the shard is migrated to `format`.
fn done_key(format: u32, shard: ShardId) -> Vec<u8> {
    format!("migrated/{format}/{:04}", shard.0).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::storage::TempDir;
    use oneid_replica::log::{entry_bytes, entry_command, entry_key};
    use oneid_replica::write::{Space, WriteOp};
    use oneid_state::store::StateRead as _;

    const HOSTED: [ShardId; 2] = [ShardId(0), ShardId(1)];

    fn open(dir: &TempDir) -> Storage {
        Storage::open(&dir.0, 2, &HOSTED, StorageConfig::default()).expect("opening")
    }

    /// A directory of format 7 whose two shards each hold two profiles-like pairs, a pair
    /// the migration drops, their meta record (applied index 3) and three log entries.
    fn format_7(dir: &TempDir) -> Storage {
        let storage = open(dir);
        let mut ops = vec![WriteOp::put(Space::Meta, FORMAT_KEY, 7u32.to_be_bytes())];
        for shard in HOSTED {
            let state = Space::State(shard);
            let pairs = [("p/1", "one"), ("p/2", "two"), ("drop/me", "x")];
            let digest = pairs.iter().fold(0u64, |d, (k, v)| {
                d.wrapping_add(pair_hash(k.as_bytes(), v.as_bytes()))
            });
            ops.extend(pairs.iter().map(|(k, v)| WriteOp::put(state, *k, *v)));
            let meta = ShardMeta {
                applied_index: 3,
                applied_term: 1,
                digest,
            };
            ops.push(WriteOp::put(
                state,
                keys::META,
                postcard::to_stdvec(&meta).expect("encodes"),
            ));
            for index in 1..=3u64 {
                let command = format!("command {index}");
                let entry = entry_bytes(index, 1, command.as_bytes());
                ops.push(WriteOp::put(Space::Log(shard), entry_key(index), entry));
            }
        }
        storage.write_for_test(ops);
        storage
    }

    fn suffixed(value: &[u8], suffix: &str) -> Vec<u8> {
        [value, suffix.as_bytes()].concat()
    }

    /// 7 → 8 appends `!` to every `p/` value and command and drops `drop/` pairs; 8 → 9
    /// appends `?`: applied twice, or in the wrong order, a value says so.
    const CHAIN: &[Migration] = &[
        Migration {
            from: 7,
            state_pair: |key, value| match key.starts_with(b"drop/") {
                true => vec![],
                false => vec![(key.to_vec(), suffixed(value, "!"))],
            },
            command: |command| suffixed(command, "!"),
        },
        Migration {
            from: 8,
            state_pair: |key, value| vec![(key.to_vec(), suffixed(value, "?"))],
            command: |command| suffixed(command, "?"),
        },
    ];

    #[test]
    fn a_chain_migrates_each_shard_once_and_resumes_after_a_crash() {
        let dir = TempDir::new("migrate");
        let storage = format_7(&dir);
        // A crash after shard 0 went through the first link: its mark is durable, the format
        // record still says 7.
        storage
            .migrate_shard(&CHAIN[0], ShardId(0))
            .expect("migrating shard 0");
        drop(storage);
        let storage = open(&dir);
        storage.migrate(7, 9, CHAIN).expect("migrating");
        for shard in HOSTED {
            let state = storage.state_read(shard);
            let pairs = state.scan(b"", None, false, usize::MAX);
            let meta: ShardMeta = oneid_state::decode(keys::META, &state.get(keys::META).unwrap());
            let digest = pairs
                .iter()
                .filter(|(k, _)| k.as_slice() != keys::META)
                .fold(0u64, |d, (k, v)| d.wrapping_add(pair_hash(k, v)));
            assert_eq!(
                pairs
                    .iter()
                    .filter(|(k, _)| k.as_slice() != keys::META)
                    .cloned()
                    .collect::<Vec<_>>(),
                vec![
                    (b"p/1".to_vec(), b"one!?".to_vec()),
                    (b"p/2".to_vec(), b"two!?".to_vec())
                ],
                "shard {shard}"
            );
            assert_eq!(
                (meta.applied_index, meta.applied_term, meta.digest),
                (3, 1, digest)
            );
            let log = storage.log(shard);
            let commands: Vec<Option<Vec<u8>>> = (1..=3u64)
                .map(|i| {
                    let bytes = log.get(entry_key(i)).expect("reads").expect("an entry");
                    entry_command(&bytes).expect("an entry")
                })
                .collect();
            assert_eq!(
                commands,
                (1..=3)
                    .map(|i| Some(format!("command {i}!?").into_bytes()))
                    .collect::<Vec<_>>()
            );
        }
        let format = storage
            .meta
            .get(FORMAT_KEY)
            .expect("reads")
            .expect("a format");
        assert_eq!(format.as_ref(), 9u32.to_be_bytes());
        assert_eq!(storage.meta.prefix("migrated/").count(), 0, "no marks left");
        // Only the shards' current generations are left: shard 0 took generation 1 before the
        // crash, then shard 1 took 2 (the first link), then 3 and 4 (the second).
        assert_eq!(
            storage.keyspace_names(),
            [
                "log_0000_g3",
                "log_0001_g4",
                "meta",
                "state_0000_g3",
                "state_0001_g4"
            ]
        );
    }
}
