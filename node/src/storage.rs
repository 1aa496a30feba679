//! Durable storage: one fjall database per node, and the writer thread that group-commits it.
//!
//! Keyspaces: `meta` (each shard's Raft hard state and conf state), `log_NNNN` (a shard's Raft
//! log, index → entry) and `state_NNNN` (a shard's applied state, see `state::keys`).
//!
//! Every write goes through the [`Writer`]: a dedicated thread that takes all pending write
//! jobs of all shards, commits them as one fjall batch and makes them durable with one
//! `persist(SyncAll)`, then calls each job's completion. A failed write or fsync stops the
//! process: nothing after it may be acknowledged.

use crate::metrics::Metrics;
use anyhow::Context;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use oneid_protocol::ids::ShardId;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

/// Most write jobs one group commit takes; the rest wait for the next fsync.
pub const GROUP_COMMIT_JOBS_MAX: usize = 256;

pub struct Storage {
    pub db: Database,
    pub meta: Keyspace,
    /// Indexed by shard id; `None` for shards not hosted here.
    logs: Vec<Option<Keyspace>>,
    states: Vec<Option<Keyspace>>,
}

/// Where a write goes.
#[derive(Debug, Clone, Copy)]
pub enum Space {
    Meta,
    Log(ShardId),
    State(ShardId),
}

pub struct WriteOp {
    pub space: Space,
    pub key: Vec<u8>,
    /// `None` deletes.
    pub value: Option<Vec<u8>>,
}

impl Storage {
    pub fn open(path: &Path, n_shards: u32, hosted: &[ShardId]) -> anyhow::Result<Storage> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating data directory {}", path.display()))?;
        let db = Database::builder(path)
            .open()
            .with_context(|| format!("opening fjall database in {}", path.display()))?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let mut logs = vec![None; n_shards as usize];
        let mut states = vec![None; n_shards as usize];
        for &shard in hosted {
            logs[shard.0 as usize] = Some(db.keyspace(
                &format!("log_{:04}", shard.0),
                KeyspaceCreateOptions::default,
            )?);
            states[shard.0 as usize] = Some(db.keyspace(
                &format!("state_{:04}", shard.0),
                KeyspaceCreateOptions::default,
            )?);
        }
        Ok(Storage {
            db,
            meta,
            logs,
            states,
        })
    }

    pub fn log(&self, shard: ShardId) -> &Keyspace {
        self.logs[shard.0 as usize]
            .as_ref()
            .expect("shard is hosted here")
    }

    pub fn state(&self, shard: ShardId) -> &Keyspace {
        self.states[shard.0 as usize]
            .as_ref()
            .expect("shard is hosted here")
    }

    fn keyspace(&self, space: Space) -> &Keyspace {
        match space {
            Space::Meta => &self.meta,
            Space::Log(shard) => self.log(shard),
            Space::State(shard) => self.state(shard),
        }
    }
}

/// A set of writes and what to do once they are durable.
pub struct WriteJob {
    pub ops: Vec<WriteOp>,
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
        for op in jobs.iter_mut().flat_map(|job| job.ops.drain(..)) {
            let keyspace = storage.keyspace(op.space);
            match op.value {
                Some(value) => batch.insert(keyspace, op.key, value),
                None => batch.remove(keyspace, op.key),
            }
        }
        if let Err(error) = batch
            .commit()
            .and_then(|()| storage.db.persist(PersistMode::SyncAll))
        {
            // Not deterministic and not recoverable here: stop before anything is acknowledged.
            tracing::error!(%error, "write or fsync failed; stopping the node");
            eprintln!("oneid-node: write or fsync failed: {error}; stopping");
            std::process::exit(74);
        }
        metrics.fsync(started.elapsed(), jobs.len());
        for job in jobs {
            (job.done)();
        }
    }
}
