//! Snapshot transfer between nodes: the shell's half of `oneid_replica::snapshot`.
//!
//! A leader's shard actor **holds** each snapshot its replica prepares: a fjall snapshot (one
//! sequence number: the state exactly as the durable applied index left it) registered here
//! under the snapshot's ref. The follower's node **fetches** it chunk by chunk
//! (`PeerRequest::SnapshotChunk`, at most [`SNAPSHOT_CHUNK_BYTES_MAX`] of pairs each, in key
//! order, each after the last key it got), writes each chunk into a staged generation of the
//! shard's keyspaces in one batch of its own, off the writer thread and out of its jobs
//! (sealing the staged keyspace's own memtables, as the writer does, so fjall's flush queue
//! never blocks on itself; the batches share fjall's journal, so a group commit may wait
//! while one is appended), asking for the next chunk while it writes one, sums the pair hashes
//! as they come, and at the end checks them against the digest the snapshot and its meta
//! record name, then makes the staging durable and releases the snapshot at its holder.
//! Memory is two chunks per transfer on the fetching side and one being read on the holder's,
//! whatever the shard's size.
//!
//! A holder keeps a snapshot until the follower releases it (staged, or given up), so a lost
//! answer to the last chunk is asked again rather than failing the transfer; its shard actor
//! reports progress to the replica, whose deadline only a stalled transfer meets.
//!
//! Limits: a node holds at most [`SNAPSHOTS_HELD_MAX`] snapshots and fetches at most
//! [`SNAPSHOTS_FETCHED_MAX`] at once (past either, the snapshot is refused and prepared again
//! later); a held snapshot no chunk was asked of for [`SNAPSHOT_IDLE_MAX`], or held for
//! [`SNAPSHOT_HOLD_MAX`], is dropped (fjall keeps the versions a snapshot sees until it goes).

use crate::storage::{StagedState, StateView, Storage};
use anyhow::{anyhow, ensure, Context as _};
use oneid_protocol::api::SnapshotView;
use oneid_protocol::ids::ShardId;
use oneid_replica::snapshot::SnapshotRef;
use oneid_state::keys;
use oneid_state::store::{pair_hash, StateRead as _};
use oneid_state::{decode, ShardMeta};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most bytes of pairs in one chunk (a pair larger than this goes alone).
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1024 * 1024;
/// Most snapshots a node holds for followers at once.
pub const SNAPSHOTS_HELD_MAX: usize = 4;
/// Most snapshots a node fetches at once.
pub const SNAPSHOTS_FETCHED_MAX: usize = 2;
/// A held snapshot no chunk was asked of for this long is dropped.
pub const SNAPSHOT_IDLE_MAX: Duration = Duration::from_secs(20);
/// Longest a snapshot is held, however its transfer goes: at the 23 MiB/s measured on the
/// 2-core machine, a shard of about 80 GiB.
pub const SNAPSHOT_HOLD_MAX: Duration = Duration::from_secs(3_600);
/// Longest one chunk's request may take, and how often it is tried.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK_ATTEMPTS: u32 = 3;
/// The pause before asking a holder again for a chunk that failed.
const CHUNK_RETRY_PAUSE: Duration = Duration::from_millis(100);

const _: () = assert!(
    SNAPSHOT_CHUNK_BYTES_MAX * 4 <= crate::transport::FRAME_BYTES_MAX,
    "a chunk fits a frame"
);

/// Pairs of a shard's state, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// No pair follows.
    pub last: bool,
}

/// Why a chunk was not served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ChunkError {
    #[error("the snapshot is not held here (finished, expired, or this node restarted)")]
    Unknown,
}

/// What became of a held snapshot, for its shard actor to tell the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Chunks of it were served since the last report.
    Progressed(SnapshotRef),
    /// Its last chunk was served (the first time).
    Sent(SnapshotRef),
    /// It expired, or the follower gave it up.
    Failed(SnapshotRef),
}

struct Held {
    snapshot: SnapshotRef,
    view: StateView,
    since: Instant,
    asked: Instant,
    /// Bytes served, counting each chunk once.
    bytes: u64,
    /// A chunk was served since the last report.
    progressed: bool,
    sent: bool,
}

/// A snapshot fetched and staged, durably.
#[derive(Debug, Clone, Copy)]
pub struct Staged {
    pub generation: u64,
    /// Bytes of keys and values received.
    pub bytes: u64,
    /// When the fetch began.
    pub started: Instant,
}

/// A snapshot being fetched: since when, and the bytes received so far.
struct Coming {
    snapshot: SnapshotRef,
    since: Instant,
    bytes: u64,
}

/// A fetch on its way, in the node's count of them.
struct Fetching<'a>(&'a AtomicUsize);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The snapshots a node holds and fetches.
pub struct Snapshots {
    storage: Arc<Storage>,
    held: Mutex<BTreeMap<(ShardId, u64), Held>>,
    /// Reports not yet taken by their shard actors (at most one `Sent` and one `Failed` per
    /// snapshot held).
    reports: Mutex<Vec<Report>>,
    fetching: AtomicUsize,
    /// What is coming in, by (shard, id).
    incoming: Mutex<BTreeMap<(ShardId, u64), Coming>>,
}

/// What a fetch asks of the holder's node.
pub trait Source {
    /// The chunk of `snapshot` after `after` (from the start: `None`).
    fn chunk(
        &self,
        snapshot: &SnapshotRef,
        after: Option<Vec<u8>>,
    ) -> impl std::future::Future<Output = anyhow::Result<Chunk>> + Send;
    /// The fetch is over (`failed`: given up): the holder may drop the snapshot now.
    fn release(&self, snapshot: &SnapshotRef, failed: bool);
}

impl Snapshots {
    pub fn new(storage: Arc<Storage>) -> Snapshots {
        Snapshots {
            storage,
            held: Mutex::default(),
            reports: Mutex::default(),
            fetching: AtomicUsize::new(0),
            incoming: Mutex::default(),
        }
    }

    /// Holds a read view of the shard's state as it is now (the caller has no write of the
    /// shard in flight, so it is the snapshot's index). False past [`SNAPSHOTS_HELD_MAX`].
    pub fn hold(&self, snapshot: &SnapshotRef) -> bool {
        let mut held = self.held.lock().expect("held lock");
        if held.len() >= SNAPSHOTS_HELD_MAX {
            tracing::info!(shard = %snapshot.shard, "a snapshot refused: this node holds its most");
            return false;
        }
        let now = Instant::now();
        let view = self.storage.state_view(snapshot.shard);
        let at = view
            .get(keys::META)
            .map(|bytes| decode::<ShardMeta>(keys::META, &bytes));
        assert_eq!(
            at.map(|m| (m.applied_index, m.digest)),
            Some((snapshot.index, snapshot.digest)),
            "shard {}: a snapshot held at another index than its replica's durable one",
            snapshot.shard
        );
        held.insert(
            (snapshot.shard, snapshot.id),
            Held {
                snapshot: snapshot.clone(),
                view,
                since: now,
                asked: now,
                bytes: 0,
                progressed: false,
                sent: false,
            },
        );
        true
    }

    /// The pairs of a held snapshot after `after`, up to [`SNAPSHOT_CHUNK_BYTES_MAX`]. Reads
    /// fjall: run it on the read pool.
    pub fn chunk(
        &self,
        snapshot: &SnapshotRef,
        after: Option<Vec<u8>>,
    ) -> Result<Chunk, ChunkError> {
        let key = (snapshot.shard, snapshot.id);
        let view = {
            let mut held = self.held.lock().expect("held lock");
            let h = held
                .get_mut(&key)
                .filter(|h| h.snapshot == *snapshot)
                .ok_or(ChunkError::Unknown)?;
            h.asked = Instant::now();
            h.view.clone()
        };
        let (pairs, last) = view.pairs_after(after, SNAPSHOT_CHUNK_BYTES_MAX);
        let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        let mut held = self.held.lock().expect("held lock");
        if let Some(h) = held.get_mut(&key).filter(|h| !h.sent) {
            h.bytes += bytes as u64;
            h.progressed = true;
            if last {
                h.sent = true;
                tracing::info!(shard = %snapshot.shard, index = snapshot.index,
                    to = crate::config::node_of_raft_id(snapshot.to), bytes = h.bytes,
                    seconds = h.since.elapsed().as_secs_f64(), "snapshot sent");
                self.report(Report::Sent(h.snapshot.clone()));
            }
        }
        Ok(Chunk { pairs, last })
    }

    fn report(&self, report: Report) {
        self.reports.lock().expect("reports lock").push(report);
    }

    /// The follower is done with `snapshot`: it staged it, or gave it up (`failed`).
    pub fn release(&self, snapshot: &SnapshotRef, failed: bool) {
        let mut held = self.held.lock().expect("held lock");
        let key = (snapshot.shard, snapshot.id);
        if held.get(&key).is_some_and(|h| h.snapshot == *snapshot) {
            held.remove(&key);
            if failed {
                self.report(Report::Failed(snapshot.clone()));
            }
        }
    }

    /// What became of the snapshots of `shard` held here since the last call (expiring
    /// those idle or held too long first).
    pub fn reports(&self, shard: ShardId) -> Vec<Report> {
        let now = Instant::now();
        let mut fresh = Vec::new();
        self.held.lock().expect("held lock").retain(|_, h| {
            let keep = now - h.asked < SNAPSHOT_IDLE_MAX && now - h.since < SNAPSHOT_HOLD_MAX;
            if !keep {
                tracing::warn!(shard = %h.snapshot.shard, index = h.snapshot.index,
                    "a held snapshot expired");
                fresh.push(Report::Failed(h.snapshot.clone()));
            } else if std::mem::take(&mut h.progressed) {
                fresh.push(Report::Progressed(h.snapshot.clone()));
            }
            keep
        });
        let mut reports = self.reports.lock().expect("reports lock");
        reports.extend(fresh);
        let (ours, others) = std::mem::take(&mut *reports).into_iter().partition(|r| {
            let (Report::Progressed(s) | Report::Sent(s) | Report::Failed(s)) = r;
            s.shard == shard
        });
        *reports = others;
        ours
    }

    /// Fetches `snapshot` from `source` into a new generation of its shard, verified and
    /// durable. Past [`SNAPSHOTS_FETCHED_MAX`] it fails at once. A failed fetch drops what it
    /// staged and tells the holder.
    pub async fn fetch(
        &self,
        source: &impl Source,
        snapshot: &SnapshotRef,
    ) -> anyhow::Result<Staged> {
        if self.fetching.fetch_add(1, Ordering::SeqCst) >= SNAPSHOTS_FETCHED_MAX {
            self.fetching.fetch_sub(1, Ordering::SeqCst);
            source.release(snapshot, true);
            return Err(anyhow!("this node fetches its most snapshots at once"));
        }
        let _fetching = Fetching(&self.fetching);
        let (shard, started) = (snapshot.shard, Instant::now());
        let storage = Arc::clone(&self.storage);
        let (generation, staged) = match blocking(move || storage.stage(shard)).await {
            Ok(staging) => staging,
            Err(error) => {
                source.release(snapshot, true);
                return Err(error.context("creating a staged generation"));
            }
        };
        let key = (shard, snapshot.id);
        self.incoming.lock().expect("incoming lock").insert(
            key,
            Coming {
                snapshot: snapshot.clone(),
                since: started,
                bytes: 0,
            },
        );
        let result = self.stage(source, snapshot, staged).await;
        self.incoming.lock().expect("incoming lock").remove(&key);
        match result {
            Ok(bytes) => {
                source.release(snapshot, false);
                tracing::info!(%shard, index = snapshot.index, generation, bytes,
                    seconds = started.elapsed().as_secs_f64(), "snapshot received and staged");
                Ok(Staged {
                    generation,
                    bytes,
                    started,
                })
            }
            Err(error) => {
                tracing::warn!(%shard, index = snapshot.index, %error, "fetching a snapshot failed");
                source.release(snapshot, true);
                let storage = Arc::clone(&self.storage);
                blocking(move || storage.discard(shard, generation)).await?;
                Err(error)
            }
        }
    }

    /// Writes every chunk into `staged`, checks the digest, and makes it durable. Answers
    /// the bytes received. The next chunk is asked for while the last one is written: two
    /// chunks at most are in memory.
    async fn stage(
        &self,
        source: &impl Source,
        snapshot: &SnapshotRef,
        staged: StagedState,
    ) -> anyhow::Result<u64> {
        let mut verifier = Verifier::default();
        let mut chunk = chunk_with_retries(source, snapshot, None).await?;
        loop {
            for (key, value) in &chunk.pairs {
                verifier.add(key, value)?;
            }
            ensure!(
                chunk.last || !chunk.pairs.is_empty(),
                "an empty chunk that is not the last"
            );
            let after = chunk.pairs.last().map(|(k, _)| k.clone());
            let last = chunk.last;
            let (storage, staged) = (Arc::clone(&self.storage), staged.clone());
            let write = blocking(move || storage.write_staged(&staged, chunk.pairs));
            let next = async {
                if last {
                    return Ok(None);
                }
                chunk_with_retries(source, snapshot, after).await.map(Some)
            };
            let (written, next) = tokio::join!(write, next);
            written?;
            if let Some(entry) = self
                .incoming
                .lock()
                .expect("incoming lock")
                .get_mut(&(snapshot.shard, snapshot.id))
            {
                entry.bytes = verifier.bytes;
            }
            match next? {
                Some(next) => chunk = next,
                None => break,
            }
        }
        verifier.check(snapshot)?;
        let storage = Arc::clone(&self.storage);
        blocking(move || storage.sync_all()).await?;
        Ok(verifier.bytes)
    }

    /// The snapshots in flight on this node, held and fetched.
    pub fn in_flight(&self) -> Vec<SnapshotView> {
        let now = Instant::now();
        let held = self.held.lock().expect("held lock");
        let out = held.values().map(|h| SnapshotView {
            shard: h.snapshot.shard.0,
            index: h.snapshot.index,
            node: crate::config::node_of_raft_id(h.snapshot.to),
            direction: "out".to_string(),
            bytes: h.bytes,
            seconds: (now - h.since).as_secs_f64(),
        });
        let incoming = self.incoming.lock().expect("incoming lock");
        let inward = incoming.values().map(|c| SnapshotView {
            shard: c.snapshot.shard.0,
            index: c.snapshot.index,
            node: c.snapshot.node,
            direction: "in".to_string(),
            bytes: c.bytes,
            seconds: (now - c.since).as_secs_f64(),
        });
        out.chain(inward).collect()
    }
}

/// Checks a snapshot's pairs as they arrive: in strictly increasing key order, and their
/// hashes add up to the digest its meta record and its ref name, at its index. What a peer
/// sends is checked, never trusted: a pair out of order or a meta record that does not decode
/// fails the fetch, not the node.
#[derive(Debug, Default)]
pub struct Verifier {
    digest: u64,
    /// The meta record, `Some(None)` if it did not decode.
    meta: Option<Option<ShardMeta>>,
    last: Option<Vec<u8>>,
    pub bytes: u64,
}

impl Verifier {
    pub fn add(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        ensure!(
            self.last.as_deref().is_none_or(|last| key > last),
            "the snapshot's pairs are out of key order"
        );
        self.last = Some(key.to_vec());
        self.bytes += (key.len() + value.len()) as u64;
        if key == keys::META {
            self.meta = Some(postcard::from_bytes::<ShardMeta>(value).ok());
        } else {
            self.digest = self.digest.wrapping_add(pair_hash(key, value));
        }
        Ok(())
    }

    pub fn check(&self, snapshot: &SnapshotRef) -> anyhow::Result<()> {
        let meta = self
            .meta
            .as_ref()
            .context("the snapshot has no meta record")?
            .as_ref()
            .context("the snapshot's meta record does not decode")?;
        ensure!(
            (meta.applied_index, meta.digest, self.digest)
                == (snapshot.index, snapshot.digest, snapshot.digest),
            "the snapshot's pairs hash to {:016x} at applied index {}, its meta record says \
             {:016x}, and the snapshot {:016x} at {}",
            self.digest,
            meta.applied_index,
            meta.digest,
            snapshot.digest,
            snapshot.index
        );
        Ok(())
    }
}

async fn chunk_with_retries(
    source: &impl Source,
    snapshot: &SnapshotRef,
    after: Option<Vec<u8>>,
) -> anyhow::Result<Chunk> {
    let mut attempt = 1;
    loop {
        match source.chunk(snapshot, after.clone()).await {
            Ok(chunk) => return Ok(chunk),
            // Not held there: asking again cannot help.
            Err(error) if attempt >= CHUNK_ATTEMPTS || error.is::<ChunkError>() => {
                return Err(error)
            }
            Err(error) => {
                tracing::debug!(shard = %snapshot.shard, %error, attempt, "a snapshot chunk failed; again");
                attempt += 1;
                tokio::time::sleep(CHUNK_RETRY_PAUSE).await;
            }
        }
    }
}

/// Runs fjall work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("a blocking task failed")?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::storage::TempDir;
    use oneid_replica::write::{Space, WriteOp};

    const SHARD: ShardId = ShardId(0);

    /// A write of `key` in shard 0's state.
    fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> WriteOp {
        WriteOp::put(Space::State(SHARD), key, value)
    }

    /// A storage whose shard 0 holds `pairs` profiles-like pairs and the meta record that
    /// sums them, at applied index 7.
    fn populated(dir: &TempDir, pairs: u32) -> (Arc<Storage>, SnapshotRef) {
        let storage = Arc::new(
            Storage::open(&dir.0, 1, &[SHARD], StorageConfig::default()).expect("opening"),
        );
        let mut ops = Vec::new();
        let mut digest = 0u64;
        for i in 0..pairs {
            let (key, value) = (format!("p/{i:08}").into_bytes(), vec![i as u8; 300]);
            digest = digest.wrapping_add(pair_hash(&key, &value));
            ops.push(put(key, value));
        }
        let meta = ShardMeta {
            applied_index: 7,
            digest,
            ..ShardMeta::default()
        };
        ops.push(put(
            keys::META,
            postcard::to_stdvec(&meta).expect("encodes"),
        ));
        storage.write_for_test(ops);
        let snapshot = SnapshotRef {
            shard: SHARD,
            node: 1,
            id: 42,
            to: crate::config::raft_id(SHARD, 2),
            index: 7,
            term: 2,
            digest,
        };
        (storage, snapshot)
    }

    /// The holder on the same machine, its chunks passed through `tamper`.
    struct Local<'a> {
        holder: &'a Snapshots,
        tamper: fn(&mut Chunk),
        released: Mutex<usize>,
    }

    impl Source for Local<'_> {
        async fn chunk(
            &self,
            snapshot: &SnapshotRef,
            after: Option<Vec<u8>>,
        ) -> anyhow::Result<Chunk> {
            let mut chunk = self.holder.chunk(snapshot, after)?;
            (self.tamper)(&mut chunk);
            Ok(chunk)
        }

        fn release(&self, snapshot: &SnapshotRef, failed: bool) {
            *self.released.lock().unwrap() += usize::from(failed);
            self.holder.release(snapshot, failed);
        }
    }

    #[tokio::test]
    async fn a_snapshot_streams_in_chunks_into_a_new_generation_that_verifies() {
        let (from, to) = (TempDir::new("snapshot-from"), TempDir::new("snapshot-to"));
        // 12,000 pairs of ~310 bytes: about 3.6 MiB, four chunks.
        let (source_storage, snapshot) = populated(&from, 12_000);
        let holder = Snapshots::new(Arc::clone(&source_storage));
        assert!(holder.hold(&snapshot));
        // Written after the hold: not in the snapshot.
        source_storage.write_for_test(vec![put("p/late", "x")]);
        let target =
            Arc::new(Storage::open(&to.0, 1, &[SHARD], StorageConfig::default()).expect("opening"));
        target.write_for_test(vec![put("old", "state")]);
        let fetcher = Snapshots::new(Arc::clone(&target));
        let source = Local {
            holder: &holder,
            tamper: |_| {},
            released: Mutex::new(0),
        };
        let generation = fetcher
            .fetch(&source, &snapshot)
            .await
            .expect("fetched")
            .generation;
        assert_eq!(generation, 1);
        assert_eq!(
            holder.reports(SHARD),
            vec![Report::Sent(snapshot.clone())],
            "released when staged: no progress left to report"
        );
        assert!(holder.in_flight().is_empty() && fetcher.in_flight().is_empty());
        // Staged beside the current generation, which is untouched until the switch.
        assert_eq!(target.generation_number(SHARD), 0);
        assert_eq!(
            target.state_read(SHARD).get(b"old"),
            Some(b"state".to_vec())
        );
        target.switch(SHARD, generation).expect("switching");
        let state = target.state_read(SHARD);
        assert_eq!(state.scan(b"", None, false, usize::MAX).len(), 12_001);
        assert_eq!(state.get(b"old"), None);
        assert_eq!(state.get(b"p/late"), None);
        assert_eq!(
            state.get(b"p/00011999"),
            Some(vec![(11_999 % 256) as u8; 300])
        );
    }

    #[tokio::test]
    async fn a_snapshot_that_does_not_add_up_is_refused_and_dropped() {
        let (from, to) = (
            TempDir::new("snapshot-bad-from"),
            TempDir::new("snapshot-bad-to"),
        );
        let (source_storage, snapshot) = populated(&from, 5_000);
        let holder = Snapshots::new(source_storage);
        assert!(holder.hold(&snapshot));
        let target =
            Arc::new(Storage::open(&to.0, 1, &[SHARD], StorageConfig::default()).expect("opening"));
        let fetcher = Snapshots::new(Arc::clone(&target));
        let source = Local {
            holder: &holder,
            tamper: |chunk| chunk.pairs[0].1[0] ^= 1,
            released: Mutex::new(0),
        };
        let error = fetcher.fetch(&source, &snapshot).await.unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the snapshot's pairs hash to"),
            "{error}"
        );
        assert_eq!(*source.released.lock().unwrap(), 1, "given up");
        // The staged generation is gone; a restart finds only the current one.
        drop(fetcher);
        drop(target);
        let reopened =
            Storage::open(&to.0, 1, &[SHARD], StorageConfig::default()).expect("opening");
        let names: Vec<String> = reopened.keyspace_names();
        assert_eq!(names, ["log_0000", "meta", "state_0000"]);
    }

    #[tokio::test]
    async fn a_peer_sending_pairs_out_of_order_or_a_bad_meta_record_fails_the_fetch_only() {
        let from = TempDir::new("snapshot-hostile-from");
        let (source_storage, snapshot) = populated(&from, 100);
        type Tamper = fn(&mut Chunk);
        let cases: [(Tamper, &str); 2] = [
            (
                |chunk| chunk.pairs.reverse(),
                "the snapshot's pairs are out of key order",
            ),
            (
                |chunk| {
                    for (key, value) in &mut chunk.pairs {
                        if key.as_slice() == keys::META {
                            *value = vec![0xff; 3];
                        }
                    }
                },
                "the snapshot's meta record does not decode",
            ),
        ];
        for (tamper, expected) in cases {
            let holder = Snapshots::new(Arc::clone(&source_storage));
            assert!(holder.hold(&snapshot));
            let to = TempDir::new("snapshot-hostile-to");
            let target = Arc::new(
                Storage::open(&to.0, 1, &[SHARD], StorageConfig::default()).expect("opening"),
            );
            let source = Local {
                holder: &holder,
                tamper,
                released: Mutex::new(0),
            };
            let fetcher = Snapshots::new(Arc::clone(&target));
            let error = fetcher.fetch(&source, &snapshot).await.unwrap_err();
            assert_eq!(error.to_string(), expected);
            assert_eq!(*source.released.lock().unwrap(), 1, "given up");
            assert_eq!(target.generation_number(SHARD), 0);
        }
    }

    #[test]
    fn a_node_holds_at_most_its_limit_and_drops_what_nobody_asks_for() {
        let from = TempDir::new("snapshot-held");
        let (storage, snapshot) = populated(&from, 10);
        let holder = Snapshots::new(storage);
        for id in 0..SNAPSHOTS_HELD_MAX as u64 {
            assert!(holder.hold(&SnapshotRef {
                id,
                ..snapshot.clone()
            }));
        }
        assert!(!holder.hold(&SnapshotRef {
            id: 99,
            ..snapshot.clone()
        }));
        assert_eq!(holder.in_flight().len(), SNAPSHOTS_HELD_MAX);
        // A request naming another snapshot under a held id is refused.
        let other = SnapshotRef {
            index: 8,
            ..snapshot.clone()
        };
        assert_eq!(holder.chunk(&other, None), Err(ChunkError::Unknown));
        let first = SnapshotRef {
            id: 0,
            ..snapshot.clone()
        };
        holder.release(&first, true);
        assert_eq!(holder.reports(SHARD), vec![Report::Failed(first)]);
        assert_eq!(holder.in_flight().len(), SNAPSHOTS_HELD_MAX - 1);
    }
}
