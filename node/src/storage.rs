//! Durable storage: one fjall database per node, and the writer thread that group-commits it.
//!
//! Keyspaces: `meta` (each shard's Raft records, and the cluster's shard count and state
//! format), `log_NNNN` (a shard's Raft log, index → entry) and `state_NNNN` (a shard's applied
//! state, see `state::keys`). A shard's two keyspaces belong to a **generation** (`gen/NNNN` in
//! `meta`, 0 when absent): generation `G > 0` names them `log_NNNN_gG` and `state_NNNN_gG`.
//! A snapshot install writes the next generation's state beside the current one (fjall cannot
//! rename a keyspace), then switches `gen/NNNN` in the same atomic batch as the shard's Raft
//! records; the old generation is dropped after, and at open any generation that is not the
//! recorded one (a switch that never happened, or a drop a crash cut short) is deleted.
//!
//! Every write goes through the [`Writer`]: a dedicated thread that takes all pending write
//! jobs of all shards, commits them as one fjall batch and makes them durable with one
//! `persist(SyncData)` (an fdatasync of fjall's preallocated journal), then calls each job's
//! completion. A failed write or fsync stops the process: nothing after it may be
//! acknowledged.

use crate::config::StorageConfig;
use crate::metrics::Metrics;
use crate::read_pool::ReadPool;
use anyhow::Context;
use fjall::{AbstractTree as _, Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use lru::LruCache;
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_replica::log::generation_key;
use oneid_replica::write::{Space, WriteOp};
use oneid_state::keys;
use oneid_state::profile::Profile;
use oneid_state::store::StateRead;
use oneid_state::{decode, LedgerRecord};
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

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
pub const STATE_FORMAT: u32 = 7;
/// Meta keys `peer/identity/<node id, 8 bytes BE>`: the identity known for each peer.
const PEER_IDENTITY: &[u8] = b"peer/identity/";

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

    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("the cluster record encodes")
    }

    /// Refuses a config (`shape`) that contradicts this record, naming both values.
    fn contradicted_by(&self, shape: &ClusterRecord) -> anyhow::Result<()> {
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
    pub db: Database,
    pub meta: Keyspace,
    /// The writer seals a keyspace's memtable once it holds this many bytes (`memtable_mib`).
    memtable_bytes: u64,
    /// Indexed by shard id; `None` for shards not hosted here. Replaced when a snapshot
    /// install switches the shard's generation.
    shards: Vec<Option<RwLock<Generation>>>,
    /// The generation the next staging takes (above every one on disk at open).
    next_generation: AtomicU64,
}

/// The keyspaces of a shard's current generation.
#[derive(Clone)]
struct Generation {
    number: u64,
    log: Keyspace,
    state: Keyspace,
}

/// A keyspace of the node, by name, with the shard and generation it belongs to (if a shard's).
pub struct NamedKeyspace {
    pub name: String,
    pub shard: Option<(ShardId, u64)>,
    pub keyspace: Keyspace,
}

/// The names of a shard's log and state keyspaces in `generation`.
fn generation_names(shard: ShardId, generation: u64) -> (String, String) {
    let suffix = match generation {
        0 => String::new(),
        g => format!("_g{g}"),
    };
    (
        format!("log_{:04}{suffix}", shard.0),
        format!("state_{:04}{suffix}", shard.0),
    )
}

/// The shard and generation a keyspace name belongs to, if it is a shard's.
fn parse_generation_name(name: &str) -> Option<(ShardId, u64)> {
    let rest = name
        .strip_prefix("state_")
        .or_else(|| name.strip_prefix("log_"))?;
    let (shard, generation) = match rest.split_once("_g") {
        Some((shard, generation)) => (shard, generation.parse().ok()?),
        None => (rest, 0),
    };
    (shard.len() == 4).then_some(())?;
    Some((ShardId(shard.parse().ok()?), generation))
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

    /// Records the cluster (its id, shard count, replication, nodes and their peer
    /// addresses) and the state format on first start, and refuses a data directory of
    /// another state format, or whose cluster the config contradicts: the shard count (routing
    /// hashes and OneIDs depend on it), the replication, the node ids, a node's peer address.
    /// A one-node cluster's peer address may change (a backup restored onto other ports), and
    /// is recorded anew. Answers what is recorded.
    pub fn check_cluster(&self, shape: &ClusterRecord) -> anyhow::Result<ClusterRecord> {
        const FORMAT: &[u8] = b"cluster/format";
        const RECORD: &[u8] = b"cluster/record";
        let format = self
            .meta
            .get(FORMAT)?
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
            batch.insert(&self.meta, FORMAT, STATE_FORMAT.to_be_bytes());
            batch.insert(&self.meta, RECORD, shape.encode());
            batch.commit()?;
            self.db.persist(PersistMode::SyncAll)?;
            return Ok(shape.clone());
        }
        // Directories from before the format record hold format 1.
        let format = format.unwrap_or(1);
        anyhow::ensure!(
            format == STATE_FORMAT,
            "this data directory holds state format {format}, but this oneid-node reads format {STATE_FORMAT}: start the version that wrote it"
        );
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
            self.meta.insert(RECORD, recorded.encode())?;
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

    /// Makes everything written so far durable, journals and their directory included (the
    /// node's last act when it stops).
    pub fn sync_all(&self) -> fjall::Result<()> {
        self.db.persist(PersistMode::SyncAll)
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

    fn generation(&self, shard: ShardId) -> Generation {
        self.shards[shard.0 as usize]
            .as_ref()
            .expect("shard is hosted here")
            .read()
            .expect("generation lock")
            .clone()
    }

    fn generations(&self) -> impl Iterator<Item = Generation> + '_ {
        self.shards
            .iter()
            .flatten()
            .map(|g| g.read().expect("generation lock").clone())
    }

    /// The shard's log keyspace, of its current generation.
    pub fn log(&self, shard: ShardId) -> Keyspace {
        self.generation(shard).log
    }

    /// The shard's state keyspace, of its current generation.
    pub fn state(&self, shard: ShardId) -> Keyspace {
        self.generation(shard).state
    }

    /// The shard's current generation.
    pub fn generation_number(&self, shard: ShardId) -> u64 {
        self.generation(shard).number
    }

    /// The generation `gen/NNNN` records for `shard` as `view` sees it.
    pub fn recorded_generation(&self, view: &fjall::Snapshot, shard: ShardId) -> u64 {
        use fjall::Readable as _;
        view.get(&self.meta, generation_key(shard))
            .unwrap_or_else(|e| panic!("reading meta failed: {e}"))
            .map_or(0, |bytes| {
                u64::from_be_bytes(bytes.as_ref().try_into().expect("a generation record"))
            })
    }

    /// The keyspaces this node reads, sorted by name: `meta`, and each hosted shard's log and
    /// state of its current generation (each with the shard and generation it belongs to).
    pub fn keyspaces(&self) -> Vec<NamedKeyspace> {
        let named = |name: String, shard, keyspace| NamedKeyspace {
            name,
            shard,
            keyspace,
        };
        let mut all = vec![named("meta".to_string(), None, self.meta.clone())];
        for (shard, generation) in self.shards.iter().enumerate() {
            let Some(generation) = generation else {
                continue;
            };
            let g = generation.read().expect("generation lock").clone();
            let shard = ShardId(shard as u32);
            let (log, state) = generation_names(shard, g.number);
            all.push(named(log, Some((shard, g.number)), g.log));
            all.push(named(state, Some((shard, g.number)), g.state));
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Creates the keyspaces of a new generation of `shard`, empty, for a snapshot to be
    /// written into: the shard goes on reading and writing its current one until
    /// [`Storage::switch`]. Answers the generation and its state keyspace.
    pub fn stage(&self, shard: ShardId) -> anyhow::Result<(u64, Keyspace)> {
        let number = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (log, state) = generation_names(shard, number);
        let options = || self.keyspace_options();
        self.db.keyspace(&log, options)?;
        Ok((number, self.db.keyspace(&state, options)?))
    }

    /// Drops a staged generation that will not be switched to.
    pub fn discard(&self, shard: ShardId, number: u64) -> anyhow::Result<()> {
        assert_ne!(
            number,
            self.generation_number(shard),
            "shard {shard}: discarding its current generation"
        );
        let (log, state) = generation_names(shard, number);
        for name in [log, state] {
            let keyspace = self.db.keyspace(&name, KeyspaceCreateOptions::default)?;
            self.db.delete_keyspace(keyspace)?;
        }
        Ok(())
    }

    /// The write recording generation `number` of `shard` is durable: reads and writes go to
    /// its keyspaces from now on, and the old generation is dropped (its files go once the
    /// last reader lets go of them; an error here leaves them for the next start to drop).
    /// The caller has no write of the shard in flight. A node that cannot open the new
    /// generation stops: its meta record already names it.
    pub fn switch(&self, shard: ShardId, number: u64) -> anyhow::Result<()> {
        let (log, state) = generation_names(shard, number);
        let open = |name: &str| {
            self.db
                .keyspace(name, || self.keyspace_options())
                .unwrap_or_else(|error| stop("opening a switched-to generation", &error))
        };
        let new = Generation {
            number,
            log: open(&log),
            state: open(&state),
        };
        let old = std::mem::replace(
            &mut *self.shards[shard.0 as usize]
                .as_ref()
                .expect("shard is hosted here")
                .write()
                .expect("generation lock"),
            new,
        );
        assert!(old.number < number, "shard {shard}: generations only go up");
        self.db.delete_keyspace(old.log)?;
        self.db.delete_keyspace(old.state)?;
        Ok(())
    }

    /// Options for a keyspace of this node's database or of a backup of it.
    pub fn keyspace_options(&self) -> KeyspaceCreateOptions {
        keyspace_options(self.memtable_bytes)
    }

    /// Seals `keyspace`'s memtable if it reached `memtable_mib`, handing it to fjall's flush
    /// workers; when their queue is full this waits for them (backpressure on the caller).
    pub fn seal_if_full(&self, keyspace: &Keyspace) -> fjall::Result<()> {
        if keyspace.tree.active_memtable().size() >= self.memtable_bytes {
            keyspace.rotate_memtable()?;
        }
        Ok(())
    }

    /// The keyspace of `space` in generation `number` of its shard, which a job switching to
    /// it writes (the shard still reads its current one until the job is durable).
    fn switching_keyspace(&self, space: Space, number: u64) -> Keyspace {
        let (Space::Log(shard) | Space::State(shard)) = space else {
            unreachable!("only a shard's keyspaces have generations")
        };
        let (log, state) = generation_names(shard, number);
        let name = if matches!(space, Space::Log(_)) {
            log
        } else {
            state
        };
        self.db
            .keyspace(&name, || self.keyspace_options())
            .unwrap_or_else(|error| stop("opening a staged generation", &error))
    }

    fn keyspace(&self, space: Space) -> Keyspace {
        match space {
            Space::Meta => self.meta.clone(),
            Space::Log(shard) => self.log(shard),
            Space::State(shard) => self.state(shard),
        }
    }
}

/// A set of writes and what to do once they are durable.
pub struct WriteJob {
    pub ops: Vec<WriteOp>,
    /// The job switches this shard to this generation (a snapshot install, whose ops record
    /// it): its log and state ops go to the new generation's keyspaces, and once it is
    /// durable, before `done`, so do all reads and writes (see [`Storage::switch`]).
    pub switch: Option<(ShardId, u64)>,
    pub done: Box<dyn FnOnce() + Send>,
}

/// The handle shards use to submit writes to the writer thread.
#[derive(Clone)]
pub struct Writer {
    jobs: SyncSender<WriteJob>,
}

impl Writer {
    /// Starts the writer thread. `queue_max` bounds the jobs waiting; each shard keeps at most
    /// one job in flight, so a queue of at least the number of shards never fills.
    pub fn start(storage: Arc<Storage>, metrics: Arc<Metrics>, queue_max: usize) -> Writer {
        let (jobs, receiver) = sync_channel(queue_max);
        std::thread::Builder::new()
            .name("oneid-writer".into())
            .spawn(move || write_loop(&storage, &metrics, &receiver))
            .expect("spawning the writer thread");
        Writer { jobs }
    }

    pub fn submit(&self, job: WriteJob) {
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                panic!("writer queue full: a shard had more than one write in flight")
            }
            Err(TrySendError::Disconnected(_)) => panic!("writer thread is gone"),
        }
    }
}

fn write_loop(storage: &Storage, metrics: &Metrics, receiver: &Receiver<WriteJob>) {
    while let Ok(first) = receiver.recv() {
        let mut jobs = vec![first];
        while jobs.len() < GROUP_COMMIT_JOBS_MAX {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let mut batch = storage.db.batch();
        let mut touched: Vec<(Space, Keyspace)> = Vec::new();
        for job in &mut jobs {
            let switch = job.switch;
            for op in job.ops.drain(..) {
                let at = match touched.iter().position(|(space, _)| *space == op.space) {
                    Some(at) => at,
                    None => {
                        let keyspace = match (op.space, switch) {
                            (Space::Log(s) | Space::State(s), Some((shard, number)))
                                if s == shard =>
                            {
                                storage.switching_keyspace(op.space, number)
                            }
                            _ => storage.keyspace(op.space),
                        };
                        touched.push((op.space, keyspace));
                        touched.len() - 1
                    }
                };
                let keyspace = &touched[at].1;
                match op.value {
                    Some(value) => batch.insert(keyspace, op.key, value),
                    None => batch.remove(keyspace, op.key),
                }
            }
        }
        // fdatasync, not fsync: fjall preallocates each journal file, fsyncs it when created
        // and fsyncs the directory when it rotates, so an append changes no metadata a read
        // needs; fdatasync still makes the data and its block allocation durable (as RocksDB's
        // and PostgreSQL's WAL defaults do). Measured: ~15% shorter group-commit cycles.
        if let Err(error) = batch
            .commit()
            .and_then(|()| storage.db.persist(PersistMode::SyncData))
        {
            // Not deterministic and not recoverable here: stop before anything is acknowledged.
            stop("write or fsync", &error);
        }
        metrics.fsync(started.elapsed(), jobs.len());
        for job in jobs {
            if let Some((shard, number)) = job.switch {
                if let Err(error) = storage.switch(shard, number) {
                    // Only the drop of the old generation failed: the next start drops it.
                    tracing::warn!(%shard, number, %error, "dropping the old generation failed");
                }
            }
            (job.done)();
        }
        for (_, keyspace) in &touched {
            if let Err(error) = storage.seal_if_full(keyspace) {
                stop("sealing a memtable", &error);
            }
        }
    }
}

/// Stops the node on a storage failure the writer cannot recover from (exit code 74).
fn stop(what: &str, error: &fjall::Error) -> ! {
    tracing::error!(%error, "{what} failed; stopping the node");
    eprintln!("oneid-node: {what} failed: {error}; stopping");
    std::process::exit(74);
}

/// A fjall keyspace as the state machine's read view. A read error is not deterministic:
/// it stops the node rather than being answered.
pub struct FjallState(pub fjall::Keyspace);

impl StateRead for FjallState {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0
            .get(key)
            .unwrap_or_else(|e| panic!("reading state failed: {e}"))
            .map(|v| v.to_vec())
    }

    fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let lower = match (from, reverse) {
            (Some(from), false) => Bound::Excluded(from.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        let upper = match (from, reverse) {
            (Some(from), true) => Bound::Excluded(from.to_vec()),
            _ => prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded),
        };
        let iter = self.0.range::<Vec<u8>, _>((lower, upper));
        let pair = |guard: fjall::Guard| {
            let (k, v) = guard
                .into_inner()
                .unwrap_or_else(|e| panic!("reading state failed: {e}"));
            (k.to_vec(), v.to_vec())
        };
        if reverse {
            iter.rev()
                .take(limit)
                .map(pair)
                .filter(|(k, _)| k.starts_with(prefix))
                .collect()
        } else {
            iter.take(limit)
                .map(pair)
                .filter(|(k, _)| k.starts_with(prefix))
                .collect()
        }
    }
}

/// The first key after every key that starts with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Reads of acknowledged state straight from fjall, on the caller's thread (the API's), without
/// a round trip through the shard actors. A proposal is acknowledged only after the writer has
/// committed its changes to fjall, so these reads see every acknowledged write. They may also
/// see applied changes a moment before their fsync; those are re-derived from the fsynced log
/// after a crash, so nothing seen here can be lost.
///
/// Identity bindings are cached: a binding is never changed or removed once made, so a cached
/// one is never stale. Only found bindings are cached (an unbound identity may be bound next).
///
/// Async callers run their reads through [`StateReader::run`], on the read pool's threads: a
/// fjall read may wait on the disk.
#[derive(Clone)]
pub struct StateReader {
    storage: Arc<Storage>,
    n_shards: u32,
    bindings: Arc<[Mutex<LruCache<Identity, OneId>>]>,
    /// Segment names by (shard, number), for profile documents: a number names one segment
    /// on its shard for good, so a cached name is never stale.
    pub(crate) segment_names: Arc<Mutex<LruCache<(ShardId, u64), String>>>,
    pool: ReadPool,
}

/// A read of one shard's state, by whichever node holds a replica of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Query {
    /// The profiles these identities are bound to (all held by the shard).
    Identities(Vec<Identity>),
    /// Whether each event id applied to each profile (exactly-once records).
    Events(Vec<(OneId, String)>),
    Profile(OneId),
    /// Up to `limit` ledger entries, newest first, older than sequence `before`.
    Ledger {
        oneid: OneId,
        limit: usize,
        before: Option<u64>,
    },
    /// The rules the shard applies.
    Rules(ShardId),
    /// The segments the shard holds (the one named, or all), as the shard holds them.
    Segments {
        shard: ShardId,
        name: Option<String>,
    },
    /// Up to `limit` members of a segment held by the shard, in OneID order, after `after`.
    Members {
        shard: ShardId,
        segment: String,
        after: Option<OneId>,
        limit: usize,
    },
}

/// A profile as read, with the names of its segments (sorted).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileRead {
    pub profile: Profile,
    pub segments: Vec<String>,
}

impl ProfileRead {
    pub fn into_doc(self) -> oneid_protocol::api::ProfileDoc {
        self.profile.to_doc(self.segments)
    }
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Answer {
    Identities(Vec<Option<OneId>>),
    Events(Vec<bool>),
    Profile(Option<Box<ProfileRead>>),
    Ledger(Option<Vec<(u64, LedgerRecord)>>),
    Rules(Box<oneid_protocol::rules::Rules>),
    Segments(Vec<oneid_state::segments::SegmentRecord>),
    Members(Vec<OneId>),
}

/// Identity bindings the reader keeps in memory, over all stripes.
pub const IDENTITY_CACHE_ENTRIES_MAX: usize = 256 * 1024;
/// Stripes of the identity cache, each behind its own lock, so API threads rarely wait.
const IDENTITY_CACHE_STRIPES: usize = 16;
/// Segment names the reader keeps in memory (for profile documents).
pub const SEGMENT_NAMES_CACHED_MAX: usize = 16 * 1024;

impl StateReader {
    pub fn new(storage: Arc<Storage>, n_shards: u32) -> StateReader {
        let per_stripe = NonZeroUsize::new(IDENTITY_CACHE_ENTRIES_MAX / IDENTITY_CACHE_STRIPES)
            .expect("stripes hold entries");
        let bindings = (0..IDENTITY_CACHE_STRIPES)
            .map(|_| Mutex::new(LruCache::new(per_stripe)))
            .collect();
        StateReader {
            storage,
            n_shards,
            bindings,
            segment_names: Arc::new(Mutex::new(LruCache::new(
                NonZeroUsize::new(SEGMENT_NAMES_CACHED_MAX).expect("above 0"),
            ))),
            pool: ReadPool::start(),
        }
    }

    /// Runs `read` on a thread of the read pool, off the async workers.
    pub async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&StateReader) -> T + Send + 'static,
    ) -> T {
        let reader = self.clone();
        self.pool.run(move || read(&reader)).await
    }

    pub(crate) fn shard(&self, shard: ShardId) -> FjallState {
        FjallState(self.storage.state(shard))
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    fn stripe(&self, key: &[u8]) -> &Mutex<LruCache<Identity, OneId>> {
        &self.bindings[(xxhash_rust::xxh3::xxh3_64(key) % IDENTITY_CACHE_STRIPES as u64) as usize]
    }

    /// The profile an identity is bound to, if this node has seen the binding: bindings never
    /// change, so a cached one needs no read (of this replica or of the shard's leader).
    pub fn cached_identity(&self, identity: &Identity) -> Option<OneId> {
        let key = keys::identity(identity);
        self.stripe(&key)
            .lock()
            .expect("identity cache lock")
            .get(identity)
            .copied()
    }

    /// Remembers a binding learned from another node.
    pub fn cache_identity(&self, identity: &Identity, oneid: OneId) {
        let key = keys::identity(identity);
        self.stripe(&key)
            .lock()
            .expect("identity cache lock")
            .put(identity.clone(), oneid);
    }

    /// The applied index of the state this node's replica of `shard` holds.
    pub fn applied_index(&self, shard: ShardId) -> u64 {
        self.shard(shard).get(keys::META).map_or(0, |bytes| {
            decode::<oneid_state::ShardMeta>(keys::META, &bytes).applied_index
        })
    }

    /// Answers a query of the shard's state as this node's replica holds it.
    pub fn answer(&self, query: &Query) -> Answer {
        match query {
            Query::Identities(identities) => {
                Answer::Identities(identities.iter().map(|i| self.identity(i)).collect())
            }
            Query::Events(events) => Answer::Events(
                events
                    .iter()
                    .map(|(oneid, event_id)| self.has_event(*oneid, event_id))
                    .collect(),
            ),
            Query::Profile(oneid) => Answer::Profile(self.profile_read(*oneid).map(Box::new)),
            Query::Ledger {
                oneid,
                limit,
                before,
            } => Answer::Ledger(self.ledger(*oneid, *limit, *before)),
            Query::Rules(shard) => Answer::Rules(Box::new(
                self.shard(*shard)
                    .get(keys::RULES)
                    .map(|bytes| decode(keys::RULES, &bytes))
                    .unwrap_or_default(),
            )),
            Query::Segments { shard, name } => {
                Answer::Segments(self.segments(*shard, name.as_deref()))
            }
            Query::Members {
                shard,
                segment,
                after,
                limit,
            } => Answer::Members(self.members(*shard, segment, *after, *limit)),
        }
    }

    /// The profile an identity is bound to.
    pub fn identity(&self, identity: &Identity) -> Option<OneId> {
        if let Some(oneid) = self.cached_identity(identity) {
            return Some(oneid);
        }
        let key = keys::identity(identity);
        let stripe = self.stripe(&key);
        let oneid: OneId = self
            .shard(identity.shard(self.n_shards))
            .get(&key)
            .map(|bytes| decode(&key, &bytes))?;
        stripe
            .lock()
            .expect("identity cache lock")
            .put(identity.clone(), oneid);
        Some(oneid)
    }

    /// Whether `event_id` applied to the profile (and its dedup record is not yet evicted).
    pub fn has_event(&self, oneid: OneId, event_id: &str) -> bool {
        oneid.shard().0 < self.n_shards
            && self
                .shard(oneid.shard())
                .get(&keys::dedup(oneid, event_id))
                .is_some()
    }

    pub fn profile(&self, oneid: OneId) -> Option<Profile> {
        if oneid.shard().0 >= self.n_shards {
            return None;
        }
        let key = keys::profile(oneid);
        self.shard(oneid.shard())
            .get(&key)
            .map(|bytes| decode(&key, &bytes))
    }

    /// Up to `limit` ledger entries of a profile, newest first, older than sequence `before`;
    /// `None` if the profile does not exist.
    pub fn ledger(
        &self,
        oneid: OneId,
        limit: usize,
        before: Option<u64>,
    ) -> Option<Vec<(u64, LedgerRecord)>> {
        self.profile(oneid)?;
        let from = before.map(|seq| keys::ledger(oneid, seq));
        let entries = self.shard(oneid.shard()).scan(
            &keys::ledger_prefix(oneid),
            from.as_deref(),
            true,
            limit,
        );
        Some(
            entries
                .into_iter()
                .map(|(key, value)| (keys::ledger_seq(&key), decode(&key, &value)))
                .collect(),
        )
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
mod tests {
    use super::*;

    fn open(dir: &TempDir, n_shards: u32) -> Storage {
        Storage::open(&dir.0, n_shards, &[], StorageConfig::default()).expect("opening storage")
    }

    #[test]
    fn the_writer_seals_memtables_at_memtable_mib() {
        let dir = TempDir::new("rotate");
        let limits = StorageConfig {
            memtable_mib: 1,
            ..StorageConfig::default()
        };
        let storage =
            Arc::new(Storage::open(&dir.0, 1, &[ShardId(0)], limits).expect("opening storage"));
        let writer = Writer::start(Arc::clone(&storage), Arc::new(Metrics::default()), 4);
        let write = |ops: Vec<WriteOp>| {
            let (done, finished) = std::sync::mpsc::channel();
            writer.submit(WriteJob {
                ops,
                switch: None,
                done: Box::new(move || done.send(()).expect("the test waits")),
            });
            finished.recv().expect("the writer answers");
        };
        let state = storage.state(ShardId(0));
        // 3 MiB in jobs of 64 KiB: fjall alone would seal nothing below 8 MiB.
        for job in 0..48u32 {
            write(
                (0..16u32)
                    .map(|i| WriteOp {
                        space: Space::State(ShardId(0)),
                        key: [job.to_be_bytes(), i.to_be_bytes()].concat(),
                        value: Some(vec![7; 4096]),
                    })
                    .collect(),
            );
            // The job before this one is sealed once it passed 1 MiB (the writer seals after
            // answering a job, so it is visible by the next answer).
            assert!(
                state.tree.active_memtable().size() < 1024 * 1024 + 80 * 1024,
                "job {job}: active memtable of {} bytes",
                state.tree.active_memtable().size()
            );
        }
        assert!(
            state.tree.sealed_memtable_count() + state.tree.table_count() >= 2,
            "at least two memtables sealed"
        );
    }

    #[test]
    fn a_generation_switch_survives_a_reopen_and_unswitched_ones_are_dropped() {
        let dir = TempDir::new("generations");
        let shard = ShardId(0);
        let open =
            || Storage::open(&dir.0, 1, &[shard], StorageConfig::default()).expect("opening");
        let storage = open();
        storage
            .state(shard)
            .insert("k", "gen 0")
            .expect("inserting");
        let (one, staged) = storage.stage(shard).expect("staging");
        staged.insert("k", "gen 1").expect("inserting");
        let (two, abandoned) = storage.stage(shard).expect("staging");
        abandoned.insert("k", "gen 2").expect("inserting");
        assert_eq!((one, two), (1, 2));
        // The switch: the meta record first (as the install's write), then the handles.
        storage
            .meta
            .insert(generation_key(shard), one.to_be_bytes())
            .expect("inserting");
        storage.switch(shard, one).expect("switching");
        let value = |s: &Storage| s.state(shard).get("k").expect("reads").map(|v| v.to_vec());
        assert_eq!(value(&storage), Some(b"gen 1".to_vec()));
        storage.sync_all().expect("syncing");
        drop((staged, abandoned, storage));
        let reopened = open();
        assert_eq!(reopened.generation_number(shard), 1);
        assert_eq!(value(&reopened), Some(b"gen 1".to_vec()));
        let names: Vec<String> = reopened.keyspaces().into_iter().map(|k| k.name).collect();
        assert_eq!(names, ["log_0000_g1", "meta", "state_0000_g1"]);
        let mut on_disk: Vec<String> = reopened
            .db
            .list_keyspace_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, ["log_0000_g1", "meta", "state_0000_g1"]);
        // The next staging takes a generation above every one seen.
        assert_eq!(reopened.stage(shard).expect("staging").0, 3);
    }

    #[test]
    fn a_switching_job_writes_the_new_generation_and_switches_before_it_answers() {
        let dir = TempDir::new("switch-job");
        let shard = ShardId(0);
        let storage = Arc::new(
            Storage::open(&dir.0, 1, &[shard], StorageConfig::default()).expect("opening"),
        );
        storage
            .log(shard)
            .insert(3u64.to_be_bytes(), "old entry")
            .expect("inserting");
        let (generation, staged) = storage.stage(shard).expect("staging");
        staged.insert("k", "staged").expect("inserting");
        let writer = Writer::start(Arc::clone(&storage), Arc::new(Metrics::default()), 4);
        let (done, finished) = std::sync::mpsc::channel();
        let reader = Arc::clone(&storage);
        writer.submit(WriteJob {
            ops: vec![
                WriteOp {
                    space: Space::Meta,
                    key: generation_key(shard),
                    value: Some(generation.to_be_bytes().to_vec()),
                },
                // An entry after the snapshot, appended in the Ready that installs it.
                WriteOp {
                    space: Space::Log(shard),
                    key: 8u64.to_be_bytes().to_vec(),
                    value: Some(b"new entry".to_vec()),
                },
            ],
            switch: Some((shard, generation)),
            done: Box::new(move || {
                let switched = reader.generation_number(shard);
                done.send(switched).expect("the test waits");
            }),
        });
        assert_eq!(
            finished.recv().expect("answered"),
            generation,
            "switched before done"
        );
        let log = storage.log(shard);
        assert_eq!(
            log.get(8u64.to_be_bytes()).expect("reads").as_deref(),
            Some(&b"new entry"[..])
        );
        assert!(
            log.get(3u64.to_be_bytes()).expect("reads").is_none(),
            "the old log is gone"
        );
        assert_eq!(
            storage.state(shard).get("k").expect("reads").as_deref(),
            Some(&b"staged"[..])
        );
    }

    #[test]
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
        let recorded = open(&dir, 16)
            .check_cluster(&three)
            .expect("a new directory");
        assert_eq!(recorded, three);
        assert_eq!(recorded.id.len(), 32);
        open(&dir, 16)
            .check_cluster(&three)
            .expect("the same cluster");
        let refused = |shape: ClusterRecord| {
            open(&dir, 16)
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
        let first = open(&single, 4)
            .check_cluster(&ClusterRecord::new(4, 1, nodes(&["a:1"])))
            .expect("new");
        let moved = open(&single, 4)
            .check_cluster(&ClusterRecord::new(4, 1, nodes(&["a:2"])))
            .expect("moved");
        assert_eq!((moved.id, moved.nodes), (first.id, nodes(&["a:2"])));

        // A fresh directory whose first start stopped before the records: still fresh.
        let fresh = TempDir::new("cluster-fresh");
        let one = ClusterRecord::new(4, 1, nodes(&["a:1"]));
        open(&fresh, 4).check_cluster(&one).expect("fresh");
        // One that served (a shard wrote its hard state) without the records: format 1.
        let old = TempDir::new("cluster-old");
        let storage = open(&old, 4);
        storage.meta.insert(b"hs/0000", b"x").expect("inserting");
        let error = storage.check_cluster(&one).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("this data directory holds state format 1, but this oneid-node reads format {STATE_FORMAT}: start the version that wrote it")
        );
    }
}
