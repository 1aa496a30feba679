//! Snapshot transfers in the simulation: what `snapshots` does on a node (hold the durable
//! state for a follower, serve it in chunks, fetch and stage it in a new generation, verify
//! it), over the simulated network and disks, so that crashes, partitions and lost or late
//! messages fall between every step of a transfer and its install.

use super::{Happening, World};
use crate::snapshots::{
    Chunk, Verifier, SNAPSHOTS_FETCHED_MAX, SNAPSHOTS_HELD_MAX, SNAPSHOT_IDLE_MAX,
};
use oneid_protocol::ids::ShardId;
use oneid_replica::snapshot::SnapshotRef;
use oneid_replica::Effects;
use oneid_state::store::MemState;
use oneid_state::{decode, keys, ShardMeta};
use std::ops::Bound;

/// How long a fetch waits for a chunk before it asks again, and how often it asks.
const CHUNK_TIMEOUT_MS: u64 = 1_000;
const CHUNK_ATTEMPTS: u32 = 3;

/// A snapshot a node holds: a copy of the shard's durable state when it was prepared.
pub(in crate::sim) struct Held {
    snapshot: SnapshotRef,
    state: MemState,
    /// When a chunk was last asked of it.
    asked: u64,
}

/// A fetch in progress on a follower's node.
pub(in crate::sim) struct Fetch {
    snapshot: SnapshotRef,
    generation: u64,
    after: Option<Vec<u8>>,
    verifier: Verifier,
    /// The number of the chunk request in flight: answers to others are stale.
    ask: u64,
    attempts: u32,
}

/// The messages and timers of a transfer.
#[derive(Clone)]
pub(in crate::sim) enum Transfer {
    /// A follower's node (`from`, in its life `life`) asks the holder for a chunk.
    Ask {
        node: usize,
        from: usize,
        life: u64,
        snapshot: SnapshotRef,
        after: Option<Vec<u8>>,
        ask: u64,
    },
    /// The holder's answer (`None`: it does not hold the snapshot).
    Answer {
        node: usize,
        life: u64,
        snapshot: SnapshotRef,
        ask: u64,
        chunk: Option<Chunk>,
    },
    /// The follower is done with the snapshot (`failed`: it gave it up).
    Release {
        node: usize,
        snapshot: SnapshotRef,
        failed: bool,
    },
    /// No answer to chunk request `ask` came in time.
    Timeout {
        node: usize,
        life: u64,
        shard: ShardId,
        ask: u64,
    },
}

impl Transfer {
    pub(super) fn node(&self) -> usize {
        match self {
            Transfer::Ask { node, .. }
            | Transfer::Answer { node, .. }
            | Transfer::Release { node, .. }
            | Transfer::Timeout { node, .. } => *node,
        }
    }
}

impl World {
    /// Holds the shard's durable state for a follower (the disk holds exactly it: no write of
    /// the shard is in flight), or tells the replica it cannot.
    pub(super) fn hold(&mut self, node: usize, snapshot: SnapshotRef) {
        if self.nodes[node].held.len() >= SNAPSHOTS_HELD_MAX {
            self.replica(node, snapshot.shard)
                .snapshot_failed(&snapshot);
            return;
        }
        let state = self.nodes[node]
            .disk
            .borrow()
            .states
            .get(&snapshot.shard)
            .cloned()
            .unwrap_or_default();
        let meta: ShardMeta = decode(keys::META, &state.0[keys::META]);
        assert_eq!(
            (meta.applied_index, meta.digest),
            (snapshot.index, snapshot.digest),
            "shard {}: a snapshot held at another index than the durable one",
            snapshot.shard
        );
        let key = (snapshot.shard, snapshot.id);
        let asked = self.now;
        self.nodes[node].held.insert(
            key,
            Held {
                snapshot,
                state,
                asked,
            },
        );
    }

    /// Drops held snapshots no chunk was asked of for [`SNAPSHOT_IDLE_MAX`].
    pub(super) fn expire_held(&mut self, node: usize) {
        let idle_ms = SNAPSHOT_IDLE_MAX.as_millis() as u64;
        let now = self.now;
        let expired: Vec<(ShardId, u64)> = self.nodes[node]
            .held
            .iter()
            .filter(|(_, h)| now - h.asked >= idle_ms)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            let held = self.nodes[node].held.remove(&key).expect("listed");
            self.replica(node, key.0).snapshot_failed(&held.snapshot);
        }
    }

    /// Starts fetching a snapshot into a new generation (at most [`SNAPSHOTS_FETCHED_MAX`] at
    /// once on a node).
    pub(super) fn start_fetch(&mut self, node: usize, snapshot: SnapshotRef) {
        let shard = snapshot.shard;
        let n = &mut self.nodes[node];
        if n.fetches.len() >= SNAPSHOTS_FETCHED_MAX || n.fetches.contains_key(&shard) {
            return self.fetch_failed(node, snapshot);
        }
        let generation = n.next_generation;
        n.next_generation += 1;
        n.disk
            .borrow_mut()
            .staged
            .insert((shard, generation), MemState::default());
        n.fetches.insert(
            shard,
            Fetch {
                snapshot,
                generation,
                after: None,
                verifier: Verifier::default(),
                ask: 0,
                attempts: 0,
            },
        );
        self.ask(node, shard);
    }

    /// Asks the holder for the next chunk, with a timeout.
    fn ask(&mut self, node: usize, shard: ShardId) {
        let life = self.nodes[node].life;
        let fetch = self.nodes[node].fetches.get_mut(&shard).expect("a fetch");
        fetch.ask += 1;
        fetch.attempts += 1;
        let (snapshot, after, ask) = (fetch.snapshot.clone(), fetch.after.clone(), fetch.ask);
        let holder = snapshot.node as usize - 1;
        let request = Transfer::Ask {
            node: holder,
            from: node,
            life,
            snapshot,
            after,
            ask,
        };
        // Not sent (cut off, or the holder is down): the timeout asks again.
        self.carry_transfer(node, holder, request);
        let timeout = Transfer::Timeout {
            node,
            life,
            shard,
            ask,
        };
        self.schedule(CHUNK_TIMEOUT_MS, Happening::Transfer(timeout));
    }

    /// Sends a transfer message through the network, as lossy as for Raft's.
    fn carry_transfer(&mut self, from: usize, to: usize, transfer: Transfer) {
        self.carry(from, to, transfer, Happening::Transfer);
    }

    pub(super) fn transfer(&mut self, transfer: Transfer) {
        match transfer {
            Transfer::Ask {
                node,
                from,
                life,
                snapshot,
                after,
                ask,
            } => {
                if self.nodes[node].up {
                    self.serve(node, from, life, snapshot, after, ask);
                }
            }
            Transfer::Answer {
                node,
                life,
                snapshot,
                ask,
                chunk,
            } => {
                let current = self.nodes[node]
                    .fetches
                    .get(&snapshot.shard)
                    .is_some_and(|f| f.ask == ask && f.snapshot == snapshot);
                if self.live(node, life) && current {
                    match chunk {
                        Some(chunk) => self.receive(node, snapshot.shard, chunk),
                        None => self.give_up(node, snapshot.shard),
                    }
                }
            }
            Transfer::Release {
                node,
                snapshot,
                failed,
            } => {
                let key = (snapshot.shard, snapshot.id);
                let held = self.nodes[node].held.get(&key);
                if self.nodes[node].up && held.is_some_and(|h| h.snapshot == snapshot) {
                    self.nodes[node].held.remove(&key);
                    if failed {
                        self.replica(node, snapshot.shard)
                            .snapshot_failed(&snapshot);
                    }
                }
            }
            Transfer::Timeout {
                node,
                life,
                shard,
                ask,
            } => {
                let fetch = self.nodes[node].fetches.get(&shard);
                if self.live(node, life) && fetch.is_some_and(|f| f.ask == ask) {
                    if fetch.is_some_and(|f| f.attempts >= CHUNK_ATTEMPTS) {
                        self.give_up(node, shard);
                    } else {
                        self.ask(node, shard);
                    }
                }
            }
        }
    }

    /// The holder answers a chunk request; the last chunk ends the hold.
    fn serve(
        &mut self,
        node: usize,
        from: usize,
        life: u64,
        snapshot: SnapshotRef,
        after: Option<Vec<u8>>,
        ask: u64,
    ) {
        let key = (snapshot.shard, snapshot.id);
        let now = self.now;
        let chunk_pairs = self.shape.chunk_pairs;
        let chunk = self.nodes[node]
            .held
            .get_mut(&key)
            .filter(|h| h.snapshot == snapshot)
            .map(|held| {
                held.asked = now;
                let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
                let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = held
                    .state
                    .0
                    .range((lower, Bound::Unbounded))
                    .take(chunk_pairs + 1)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let last = pairs.len() <= chunk_pairs;
                pairs.truncate(chunk_pairs);
                Chunk { pairs, last }
            });
        if chunk.is_some() {
            // The node's actor reports progress at its next tick; here at once.
            self.replica(node, snapshot.shard)
                .snapshot_progressed(&snapshot);
        }
        let answer = Transfer::Answer {
            node: from,
            life,
            snapshot,
            ask,
            chunk,
        };
        self.carry_transfer(node, from, answer);
    }

    /// A chunk arrived: stage it, and ask for the next, or finish.
    fn receive(&mut self, node: usize, shard: ShardId, chunk: Chunk) {
        let n = &mut self.nodes[node];
        let fetch = n.fetches.get_mut(&shard).expect("a fetch");
        let mut disk = n.disk.borrow_mut();
        let staged = disk
            .staged
            .get_mut(&(shard, fetch.generation))
            .expect("staged while fetching");
        for (key, value) in &chunk.pairs {
            fetch
                .verifier
                .add(key, value)
                .expect("a holder sends pairs in key order");
            staged.0.insert(key.clone(), value.clone());
        }
        drop(disk);
        fetch.after = chunk
            .pairs
            .last()
            .map(|(k, _)| k.clone())
            .or(fetch.after.take());
        fetch.attempts = 0;
        if !chunk.last {
            return self.ask(node, shard);
        }
        let fetch = n.fetches.remove(&shard).expect("a fetch");
        if let Err(error) = fetch.verifier.check(&fetch.snapshot) {
            panic!("shard {shard}: a snapshot that does not verify: {error}");
        }
        self.release(node, &fetch.snapshot, false);
        let mut fx = Effects::default();
        let now = self.clocks(node);
        self.replica(node, shard)
            .staged(&fetch.snapshot, Some(fetch.generation), now, &mut fx);
        self.advance(node, shard, fx);
    }

    /// The fetch failed: drop what it staged, tell the holder and the replica.
    fn give_up(&mut self, node: usize, shard: ShardId) {
        self.cover("a fetch given up");
        let fetch = self.nodes[node].fetches.remove(&shard).expect("a fetch");
        let mut disk = self.nodes[node].disk.borrow_mut();
        disk.staged.remove(&(shard, fetch.generation));
        drop(disk);
        self.fetch_failed(node, fetch.snapshot);
    }

    /// Tells the holder the fetch is over.
    fn release(&mut self, node: usize, snapshot: &SnapshotRef, failed: bool) {
        let holder = snapshot.node as usize - 1;
        let release = Transfer::Release {
            node: holder,
            snapshot: snapshot.clone(),
            failed,
        };
        self.carry_transfer(node, holder, release);
    }

    fn fetch_failed(&mut self, node: usize, snapshot: SnapshotRef) {
        let shard = snapshot.shard;
        self.release(node, &snapshot, true);
        let mut fx = Effects::default();
        let now = self.clocks(node);
        self.replica(node, shard)
            .staged(&snapshot, None, now, &mut fx);
        self.advance(node, shard, fx);
    }
}
