//! Snapshots as the replica core sees them, without I/O.
//!
//! A follower that needs entries the leader's log no longer holds gets the shard's state
//! instead. raft-rs keeps a `Snapshot`'s data in memory and sends it inside one Raft message,
//! so ours carries only metadata and a [`SnapshotRef`]: the state itself is streamed outside
//! Raft, in bounded chunks, by the shells. The steps:
//!
//! 1. **Leader, prepare.** At a moment with no write in flight (its durable state is its
//!    applied state), the leader's core answers a [`SnapshotRef`] for each follower that needs
//!    one (at most one per follower, again at most every [`SNAPSHOT_RETRY_TICKS`]) and hands
//!    raft-rs the snapshot to send. The shell registers a consistent read view of that durable
//!    state (a fjall snapshot) under the ref before the next write of the shard goes out, or
//!    tells the core it cannot ([`Replica::snapshot_failed`]).
//! 2. **Follower, stage.** A `MsgSnapshot` that raft-rs would restore is held, not stepped: the
//!    shell fetches the state chunk by chunk from the leader's node into a new generation of
//!    the shard's keyspaces, checks every pair against the digest, makes it durable, and says
//!    so ([`Replica::staged`]). Then the core steps the message.
//! 3. **Follower, install.** The Ready that carries the restored snapshot becomes one write:
//!    the generation switch, the hard state, the conf state and the log restarting after the
//!    snapshot, atomically. Once it is durable the shell switches to the new keyspaces and the
//!    core reloads its state from them (activation cache included).
//! 4. **Leader, finish.** The follower's append answer takes raft-rs out of its snapshot state
//!    for that follower. A transfer that fails, or shows no progress for
//!    [`SNAPSHOT_IDLE_TICKS`] (the shell reports each chunk served), is reported to raft-rs as
//!    failed, and another is prepared.
//!
//! While a snapshot is out, the leader keeps the entries after its index, so the follower can
//! go on from there however long a transfer that progresses takes.
//!
//! A crash at any point leaves the old replica or the new one: staged generations that were
//! never switched to are dropped at start, and the switch is one atomic write.

use super::{Effects, Now, Replica};
use crate::log::LogSource;
use crate::write::WriteOp;
use oneid_protocol::ids::ShardId;
use oneid_state::store::StateRead;
use oneid_state::ShardState;
use raft::eraftpb::{Message, Snapshot};
use raft::{ProgressState, SnapshotStatus, Storage as _};
use serde::{Deserialize, Serialize};

/// Ticks a snapshot's transfer may go without progress (from its preparation to the first
/// chunk, between chunks, from the last chunk to the install) before the leader reports it
/// failed (30 s at 100 ms ticks).
pub const SNAPSHOT_IDLE_TICKS: u64 = 300;
/// Ticks between two snapshots prepared for one follower.
pub const SNAPSHOT_RETRY_TICKS: u64 = 10;

/// What a Raft snapshot's data holds: where its state is and what it must add up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub shard: ShardId,
    /// The node holding the state (the leader's, when it prepared the snapshot).
    pub node: u64,
    /// Unique on that node across its restarts (its replica's life, plus a counter).
    pub id: u64,
    /// The raft id of the follower it is for.
    pub to: u64,
    /// The applied index of the state, and the term of its entry.
    pub index: u64,
    pub term: u64,
    /// The state's digest at `index`: the sum of the pair hashes of every pair but the meta
    /// record (see `state::store`), which the meta record also holds.
    pub digest: u64,
}

impl SnapshotRef {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a snapshot ref encodes")
    }

    pub fn decode(data: &[u8]) -> Option<SnapshotRef> {
        postcard::from_bytes(data).ok()
    }
}

/// A snapshot a leader prepared for one follower.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub(super) snapshot: SnapshotRef,
    /// The tick after which it is given up.
    pub(super) deadline: u64,
}

/// A follower's snapshot on its way in.
pub(super) enum Incoming {
    /// Its state is being fetched and staged; the message waits to be stepped.
    Fetching(Box<Message>, SnapshotRef),
    /// Stepped: raft-rs restores it, and the Ready that carries it installs this generation.
    Restoring(u64, SnapshotRef),
}

impl Incoming {
    pub(super) fn snapshot(&self) -> &SnapshotRef {
        match self {
            Incoming::Fetching(_, snapshot) | Incoming::Restoring(_, snapshot) => snapshot,
        }
    }
}

/// The snapshot steps of the replica core (see the module documentation).
impl<S: LogSource> Replica<S> {
    /// Whether raft-rs would restore this snapshot (it is newer than what this replica
    /// committed, of a current term, and not an entry it holds), so its state must be fetched
    /// before the message is stepped. Otherwise raft-rs answers it from the log.
    pub(super) fn needs_fetch(&self, message: &Message) -> bool {
        let metadata = message.get_snapshot().get_metadata();
        let log = &self.raw.raft.raft_log;
        message.term >= self.raw.raft.term
            && metadata.index > log.committed
            && !log.match_term(metadata.index, metadata.term)
    }

    /// Holds a snapshot message while the shell fetches its state (one at a time: another
    /// one meanwhile is dropped, and its leader gives it up and sends again later).
    pub(super) fn fetch_snapshot(&mut self, message: Message, fx: &mut Effects) {
        let shard = self.config.shard;
        let metadata = message.get_snapshot().get_metadata();
        let snapshot = SnapshotRef::decode(&message.get_snapshot().data).filter(|s| {
            (s.shard, s.to, s.index, s.term)
                == (shard, self.config.id, metadata.index, metadata.term)
        });
        let Some(snapshot) = snapshot else {
            tracing::warn!(%shard, from = message.from, "a snapshot message whose data is not its own; dropped");
            return;
        };
        if let Some(incoming) = &self.incoming {
            tracing::debug!(%shard, index = snapshot.index, busy = incoming.snapshot().index,
                "a snapshot while another is on its way in; dropped");
            return;
        }
        tracing::info!(%shard, index = snapshot.index, from = snapshot.node,
            committed = self.raw.raft.raft_log.committed, "fetching a snapshot");
        fx.fetch = Some(snapshot.clone());
        self.incoming = Some(Incoming::Fetching(Box::new(message), snapshot));
    }

    /// The shell fetched the state of `snapshot` and staged it, durably, in `generation`
    /// (`None`: it could not). The held message is stepped now; if raft-rs no longer restores
    /// it (a newer term, or the log caught up meanwhile), the staged generation is dropped.
    pub fn staged(
        &mut self,
        snapshot: &SnapshotRef,
        generation: Option<u64>,
        now: Now,
        fx: &mut Effects,
    ) {
        self.observe(now);
        let ours = matches!(&self.incoming, Some(Incoming::Fetching(_, s)) if s == snapshot);
        if !ours {
            fx.discard = generation;
            return;
        }
        let Some(Incoming::Fetching(message, _)) = self.incoming.take() else {
            unreachable!("checked above")
        };
        let Some(generation) = generation else {
            return;
        };
        if let Err(error) = self.raw.step(*message) {
            tracing::debug!(shard = %self.config.shard, %error, "snapshot message not taken");
        }
        let restores = self
            .raw
            .raft
            .raft_log
            .unstable_snapshot()
            .as_ref()
            .is_some_and(|s| s.get_metadata().index == snapshot.index);
        if restores {
            self.incoming = Some(Incoming::Restoring(generation, snapshot.clone()));
        } else {
            tracing::info!(shard = %self.config.shard, index = snapshot.index,
                "a staged snapshot is no longer needed");
            fx.discard = Some(generation);
        }
    }

    /// The Ready restores a snapshot: its write switches to the staged generation, with the
    /// log restarting after the snapshot. Answers the snapshot being installed.
    pub(super) fn install(
        &mut self,
        snapshot: &Snapshot,
        ops: &mut Vec<WriteOp>,
        fx: &mut Effects,
    ) -> SnapshotRef {
        let shard = self.config.shard;
        let Some(Incoming::Restoring(generation, staged)) = self.incoming.take() else {
            panic!("shard {shard}: raft-rs restores a snapshot this replica did not stage")
        };
        let metadata = snapshot.get_metadata();
        assert_eq!(
            (metadata.index, metadata.term),
            (staged.index, staged.term),
            "shard {shard}: raft-rs restores another snapshot than the one staged"
        );
        self.raw.mut_store().install(metadata, generation, ops);
        fx.switch = Some(generation);
        staged
    }

    /// The install is durable and the shell reads the new generation (`base`): the state
    /// machine starts again from it, with an empty activation cache.
    pub(super) fn installed(&mut self, base: &dyn StateRead, snapshot: &SnapshotRef) {
        self.state = ShardState::load(
            self.config.shard,
            self.config.n_shards,
            base,
            self.config.activation_budget,
        );
        let meta = &self.state.meta;
        assert_eq!(
            (meta.applied_index, meta.digest),
            (snapshot.index, snapshot.digest),
            "shard {}: the installed state is not the snapshot's",
            self.config.shard
        );
        tracing::debug!(shard = %self.config.shard, index = snapshot.index, "state reloaded from the installed snapshot");
    }

    /// Prepares a snapshot of the durable state for each recently active follower that needs
    /// entries the log no longer holds. Call only with no write in flight.
    pub(super) fn prepare_snapshots(&mut self, fx: &mut Effects) {
        assert!(self.in_flight.is_none(), "a snapshot of the durable state");
        let (me, ticks, first) = (self.config.id, self.ticks, self.raw.store().first());
        let wanting: Vec<u64> = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, p)| {
                **id != me
                    && p.next_idx < first
                    && p.state != ProgressState::Snapshot
                    && p.recent_active
                    && !self.outgoing.contains_key(*id)
                    && self
                        .prepared_at
                        .get(*id)
                        .is_none_or(|&at| ticks - at >= SNAPSHOT_RETRY_TICKS)
            })
            .map(|(id, _)| *id)
            .collect();
        for to in wanting {
            let index = self.durable_applied;
            assert_eq!(index, self.state.meta.applied_index, "no write in flight");
            let term = self
                .raw
                .store()
                .term(index)
                .expect("the applied entry's term is held");
            self.snapshots_prepared += 1;
            let snapshot = SnapshotRef {
                shard: self.config.shard,
                node: self
                    .config
                    .node_of(me)
                    .expect("this replica is one of the shard's"),
                id: self.config.life.rotate_left(24) ^ self.snapshots_prepared,
                to,
                index,
                term,
                digest: self.state.meta.digest,
            };
            let mut message = Snapshot {
                data: snapshot.encode().into(),
                ..Default::default()
            };
            let metadata = message.mut_metadata();
            (metadata.index, metadata.term) = (index, term);
            metadata.set_conf_state(self.raw.store().conf_state().clone());
            self.raw.mut_store().prepare(to, message);
            tracing::info!(shard = %self.config.shard, to = ?self.config.node_of(to), index,
                "preparing a snapshot for a follower behind the log");
            self.outgoing.insert(
                to,
                Outgoing {
                    snapshot: snapshot.clone(),
                    deadline: ticks + SNAPSHOT_IDLE_TICKS,
                },
            );
            self.prepared_at.insert(to, ticks);
            fx.snapshots.push(snapshot);
        }
    }

    /// At a leader's tick: snapshots past their deadline are reported failed to raft-rs (which
    /// probes the follower again, and wants another); those the follower installed, or that
    /// raft-rs no longer wants, are done.
    pub(super) fn expire_snapshots(&mut self) {
        let ticks = self.ticks;
        let ended: Vec<(u64, bool, bool)> = self
            .outgoing
            .iter()
            .filter_map(|(to, out)| {
                let sending = self.raw.raft.prs().get(*to).is_some_and(|p| {
                    p.state == ProgressState::Snapshot && p.pending_snapshot == out.snapshot.index
                });
                let waiting = self.raw.store().is_prepared(*to);
                let expired = ticks >= out.deadline;
                (expired || !(sending || waiting)).then_some((*to, sending, expired))
            })
            .collect();
        for (to, sending, expired) in ended {
            let out = self.outgoing.remove(&to).expect("listed above");
            self.raw.mut_store().unprepare(Some(to));
            if expired {
                tracing::warn!(shard = %self.config.shard, to = ?self.config.node_of(to),
                    index = out.snapshot.index, "a snapshot took too long; given up");
            }
            if sending {
                self.raw.report_snapshot(to, SnapshotStatus::Failure);
            }
        }
    }

    /// The shell served chunks of `snapshot` (the last one, perhaps): its deadline moves on
    /// to [`SNAPSHOT_IDLE_TICKS`] from now.
    pub fn snapshot_progressed(&mut self, snapshot: &SnapshotRef) {
        if let Some(out) = self.outgoing.get_mut(&snapshot.to) {
            if out.snapshot == *snapshot {
                out.deadline = self.ticks + SNAPSHOT_IDLE_TICKS;
            }
        }
    }

    /// The shell could not hold `snapshot`, or its transfer failed: raft-rs is told, and a
    /// new one is prepared after [`SNAPSHOT_RETRY_TICKS`].
    pub fn snapshot_failed(&mut self, snapshot: &SnapshotRef) {
        if let Some(out) = self.outgoing.get_mut(&snapshot.to) {
            if out.snapshot == *snapshot {
                out.deadline = self.ticks;
                self.expire_snapshots();
            }
        }
    }

    /// This replica stopped leading: its snapshots for followers are no longer its to send.
    pub(super) fn forget_snapshots(&mut self) {
        self.outgoing.clear();
        self.raw.mut_store().unprepare(None);
    }
}
