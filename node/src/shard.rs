//! The shard actor: one replica of one shard's Raft group, and the host of its profiles.
//!
//! It drives raft-rs's `RawNode` through its `Ready` loop in async-persist mode: new log
//! entries, hard state and the changes of applying committed entries go to the [`Writer`] as
//! one job; only when the writer reports the job durable does the actor call
//! `on_persist_ready`, acknowledge the proposals that job applied, and send the messages that
//! had to wait for the fsync. Each shard keeps at most one job in flight, so the writer's
//! queue is bounded by the number of shards, and one fsync covers the work of many shards.
//!
//! The actor answers no profile, identity or ledger read: those go to fjall directly
//! (`storage::StateReader`), which holds every acknowledged write. It answers what only it
//! knows (its Raft status, its rules), proposes clock entries as leader, and sweeps the
//! follow-up records the router did not finish.

use crate::command::{Command, FollowUp, Output, Retention};
use crate::config::node_of_raft_id;
use crate::follow_up;
use crate::metrics::Metrics;
use crate::state::keys;
use crate::state::store::{Layered, WriteSet};
use crate::state::{decode, FollowUpRecord, ShardState};
use crate::storage::{FjallState, Space, Storage, WriteJob, WriteOp, Writer};
use actix::prelude::*;
use oneid_protocol::api::ShardView;
use oneid_protocol::ids::ShardId;
use oneid_protocol::num::Millis;
use oneid_protocol::rules::Rules;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most proposals a shard holds waiting for commit; past it proposals fail `Overloaded`.
pub const PROPOSALS_PENDING_MAX: usize = 4096;
/// Most messages waiting in a shard actor's mailbox; senders wait (backpressure).
pub const SHARD_MAILBOX_MAX: usize = 1024;
/// Most uncommitted bytes a leader accepts before dropping proposals.
pub const UNCOMMITTED_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Most follow-up records one sweep drives.
pub const FOLLOW_UP_SWEEP_RECORDS_MAX: usize = 1024;
/// Follow-up records younger than this (by the shard clock) are left to the router, which
/// drives them right after the apply that wrote them.
const FOLLOW_UP_GRACE_MS: i64 = 2_000;
/// How often the leader sweeps follow-up records (sooner while a sweep finds a full batch).
const FOLLOW_UP_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The log is compacted once this many applied entries sit on disk.
const LOG_COMPACT_ENTRIES: u64 = 64;

const _: () = assert!(
    PROPOSALS_PENDING_MAX >= SHARD_MAILBOX_MAX,
    "a full mailbox of proposals must fit the pending table"
);

/// Addresses of every shard's actor, set once all are started.
pub type ShardMap = Arc<OnceLock<Vec<Addr<ShardActor>>>>;

/// Proposes `command` at `shard`; answers once it is committed, applied and durable.
pub async fn propose(
    shards: &ShardMap,
    shard: ShardId,
    command: Command,
) -> Result<Output, ShardError> {
    let addr = &shards
        .get()
        .expect("shards are started before anything proposes")[shard.0 as usize];
    addr.send(Propose(command))
        .await
        .unwrap_or(Err(ShardError::Stopped(shard)))
}

/// Runs one future per shard, all at once, and collects their answers by shard.
pub async fn per_shard<T, F: std::future::Future<Output = T>>(
    calls: impl IntoIterator<Item = (ShardId, F)>,
) -> BTreeMap<ShardId, T> {
    let (shards, futures): (Vec<ShardId>, Vec<F>) = calls.into_iter().unzip();
    shards
        .into_iter()
        .zip(futures::future::join_all(futures).await)
        .collect()
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    /// This replica is not the leader; `leader` is the node that is, if known.
    #[error("shard {shard} has no leader here (leader: {leader:?})")]
    NotLeader { shard: ShardId, leader: Option<u64> },
    /// Leadership changed before the proposal committed; it may or may not have applied.
    #[error("shard {0}: leadership changed before the proposal was applied; retry")]
    Dropped(ShardId),
    /// Too many proposals are waiting.
    #[error("shard {0} is overloaded; retry later")]
    Overloaded(ShardId),
    /// The shard's actor is not running (the node is stopping).
    #[error("shard {0} is not running")]
    Stopped(ShardId),
}

/// What a shard needs from the node's configuration.
#[derive(Clone)]
pub struct ShardSettings {
    pub n_shards: u32,
    pub raft_id: u64,
    pub voters: Vec<u64>,
    pub tick: Duration,
    pub clock_interval: Duration,
    pub retention: Retention,
    pub passivate_idle: Duration,
    pub activation_budget: usize,
    pub seed_rules: Rules,
}

struct Proposal {
    term: u64,
    reply: oneshot::Sender<Result<Output, ShardError>>,
}

/// The write job in flight: what to do when it is durable.
struct InFlight {
    ready_number: u64,
    acks: Vec<(oneshot::Sender<Result<Output, ShardError>>, Output)>,
}

pub struct ShardActor {
    shard: ShardId,
    settings: ShardSettings,
    raft: RawNode<MemStorage>,
    storage: Arc<Storage>,
    writer: Writer,
    metrics: Arc<Metrics>,
    shards: ShardMap,
    state: ShardState,
    /// Changes of the job in flight (empty when none): reads see them before fjall.
    pending: WriteSet,
    in_flight: Option<InFlight>,
    /// Proposals by log index.
    proposals: BTreeMap<u64, Proposal>,
    /// Lowest log index still on disk.
    log_first_on_disk: u64,
    /// Log deletions to send with the next write job.
    compaction: Vec<WriteOp>,
    leader: bool,
    /// When this leader last proposed a clock entry (`None`: not since it became leader).
    last_clock: Option<Instant>,
    /// The last clock entry applied left due work: propose the next one at the next tick.
    due_backlog: bool,
    /// A follow-up sweep is in flight (at most one at a time).
    sweeping: bool,
    next_sweep: Instant,
    /// Every follow-up record up to this sequence is finished: the next sweep's scan starts
    /// after it, so it does not walk the tombstones of finished records. In memory only (0
    /// after a restart: one scan from the start).
    follow_up_floor: u64,
    reported_activations: (u64, u64, usize),
}

fn hard_state_key(shard: ShardId) -> Vec<u8> {
    format!("hs/{:04}", shard.0).into_bytes()
}

impl ShardActor {
    /// Recovers a shard replica from disk: the applied state is the snapshot, the log entries
    /// after it are replayed by Raft.
    pub fn recover(
        shard: ShardId,
        settings: ShardSettings,
        storage: Arc<Storage>,
        writer: Writer,
        metrics: Arc<Metrics>,
        shards: ShardMap,
    ) -> anyhow::Result<ShardActor> {
        let state_view = FjallState(storage.state(shard));
        let state = ShardState::load(
            shard,
            settings.n_shards,
            &state_view,
            settings.activation_budget,
        );
        let applied = state.meta.applied_index;

        let conf_state = ConfState::from((settings.voters.clone(), vec![]));
        let mem = MemStorage::new_with_conf_state(conf_state.clone());
        if applied > 0 {
            let mut snapshot = Snapshot::default();
            snapshot.mut_metadata().index = applied;
            snapshot.mut_metadata().term = state.meta.applied_term;
            snapshot.mut_metadata().set_conf_state(conf_state);
            mem.wl().apply_snapshot(snapshot)?;
        }
        let mut entries = Vec::new();
        let mut log_first_on_disk = applied + 1;
        for guard in storage.log(shard).iter() {
            let (key, value) = guard.into_inner()?;
            let index = u64::from_be_bytes(key.as_ref().try_into()?);
            log_first_on_disk = log_first_on_disk.min(index);
            if index > applied {
                entries.push(Entry::parse_from_bytes(&value)?);
            }
        }
        mem.wl().append(&entries)?;
        if let Some(bytes) = storage.meta.get(hard_state_key(shard))? {
            let mut hard_state = HardState::parse_from_bytes(&bytes)?;
            hard_state.commit = hard_state.commit.max(applied);
            mem.wl().set_hardstate(hard_state);
        }
        let config = raft::Config {
            id: settings.raft_id,
            election_tick: 10,
            heartbeat_tick: 1,
            applied,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            max_uncommitted_size: UNCOMMITTED_BYTES_MAX,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let logger = crate::logging::raft_logger(shard);
        let mut raft = RawNode::new(&config, mem, &logger)?;
        if settings.voters == [settings.raft_id] {
            // The only voter need not wait an election timeout.
            raft.campaign()?;
        }
        tracing::info!(%shard, applied, replay = entries.len(), "shard recovered");
        Ok(ShardActor {
            shard,
            settings,
            raft,
            storage,
            writer,
            metrics,
            shards,
            state,
            pending: WriteSet::default(),
            in_flight: None,
            proposals: BTreeMap::new(),
            log_first_on_disk,
            compaction: Vec::new(),
            leader: false,
            last_clock: None,
            due_backlog: false,
            sweeping: false,
            next_sweep: Instant::now(),
            follow_up_floor: 0,
            reported_activations: (0, 0, 0),
        })
    }

    fn leader_node(&self) -> Option<u64> {
        let leader = self.raft.raft.leader_id;
        (leader != raft::INVALID_ID).then(|| node_of_raft_id(leader))
    }

    fn propose(
        &mut self,
        command: &Command,
        reply: Option<oneshot::Sender<Result<Output, ShardError>>>,
    ) {
        let fail = |reply: Option<oneshot::Sender<_>>, error| {
            if let Some(reply) = reply {
                let _ = reply.send(Err(error));
            }
        };
        if !self.leader {
            return fail(
                reply,
                ShardError::NotLeader {
                    shard: self.shard,
                    leader: self.leader_node(),
                },
            );
        }
        if self.proposals.len() >= PROPOSALS_PENDING_MAX {
            self.metrics.proposals_failed.fetch_add(1, Relaxed);
            return fail(reply, ShardError::Overloaded(self.shard));
        }
        self.metrics.proposals.fetch_add(1, Relaxed);
        if let Err(error) = self.raft.propose(vec![], command.encode()) {
            tracing::warn!(shard = %self.shard, %error, "proposal dropped");
            self.metrics.proposals_failed.fetch_add(1, Relaxed);
            return fail(reply, ShardError::Overloaded(self.shard));
        }
        if let Some(reply) = reply {
            let index = self.raft.raft.raft_log.last_index();
            let previous = self.proposals.insert(
                index,
                Proposal {
                    term: self.raft.raft.term,
                    reply,
                },
            );
            assert!(
                previous.is_none(),
                "two proposals at index {index} of shard {}",
                self.shard
            );
        }
    }

    /// Fails every waiting proposal: after a leader change they may or may not commit, and the
    /// client's retry is made safe by exactly-once event ids.
    fn fail_proposals(&mut self) {
        for (_, proposal) in std::mem::take(&mut self.proposals) {
            let _ = proposal.reply.send(Err(ShardError::Dropped(self.shard)));
        }
    }

    /// Runs the Ready loop once, unless a write job is in flight.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight.is_some() || !self.raft.has_ready() {
            return;
        }
        let mut ready = self.raft.ready();
        let mut became_leader = false;
        if let Some(soft) = ready.ss() {
            let leader = soft.raft_state == StateRole::Leader;
            if self.leader && !leader {
                self.fail_proposals();
            }
            became_leader = leader && !self.leader;
            self.leader = leader;
        }
        // One-node groups have no peers; messages to peers come with multi-node clusters.
        let messages = ready.take_messages();
        assert!(
            messages.is_empty(),
            "shard {} has no peers to send {} messages to",
            self.shard,
            messages.len()
        );
        assert!(
            ready.snapshot().is_empty(),
            "shard {}: snapshots are only sent between replicas",
            self.shard
        );

        let mut ops = std::mem::take(&mut self.compaction);
        let mut acks = Vec::new();
        let mut writes = WriteSet::default();
        let storage = Arc::clone(&self.storage);
        let base = FjallState(storage.state(self.shard));
        let mut last_applied = None;
        for entry in ready.take_committed_entries() {
            let (index, term) = (entry.index, entry.term);
            let started = Instant::now();
            let output =
                if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
                    let command = Command::decode(&entry.data).unwrap_or_else(|e| {
                        panic!(
                            "shard {}: committed entry {index} does not decode: {e}",
                            self.shard
                        )
                    });
                    self.state.apply(&base, &mut writes, index, term, command)
                } else {
                    // Empty entries (a new leader's) and conf changes only advance the index.
                    self.state.apply_empty(&mut writes, index, term)
                };
            last_applied = Some(index);
            if let Output::Clock {
                due_processed,
                backlog,
            } = output
            {
                self.due_backlog = backlog;
                self.metrics.clock_applied(started.elapsed(), due_processed);
            }
            if let Some(proposal) = self.proposals.remove(&index) {
                if proposal.term == term {
                    acks.push((proposal.reply, output));
                } else {
                    let _ = proposal.reply.send(Err(ShardError::Dropped(self.shard)));
                }
            }
        }
        // Proposals below the applied index were overwritten by another leader's entries.
        if let Some(applied) = last_applied {
            let stale: Vec<u64> = self.proposals.range(..=applied).map(|(i, _)| *i).collect();
            for index in stale {
                let proposal = self.proposals.remove(&index).expect("listed above");
                let _ = proposal.reply.send(Err(ShardError::Dropped(self.shard)));
            }
        }
        if !ready.entries().is_empty() {
            for entry in ready.entries() {
                ops.push(WriteOp {
                    space: Space::Log(self.shard),
                    key: entry.index.to_be_bytes().to_vec(),
                    value: Some(entry.write_to_bytes().expect("entries encode")),
                });
            }
            self.raft
                .mut_store()
                .wl()
                .append(ready.entries())
                .expect("appending to the in-memory log");
        }
        if let Some(hard_state) = ready.hs() {
            ops.push(WriteOp {
                space: Space::Meta,
                key: hard_state_key(self.shard),
                value: Some(hard_state.write_to_bytes().expect("hard state encodes")),
            });
            self.raft.mut_store().wl().set_hardstate(hard_state.clone());
        }
        let persisted_messages = ready.take_persisted_messages();
        assert!(
            persisted_messages.is_empty(),
            "shard {} has no peers",
            self.shard
        );
        for (key, value) in &writes.changes {
            ops.push(WriteOp {
                space: Space::State(self.shard),
                key: key.clone(),
                value: value.clone(),
            });
        }
        let ready_number = ready.number();
        self.raft.advance_append_async(ready);
        if let Some(applied) = last_applied {
            self.raft.advance_apply_to(applied);
        }
        self.pending = writes;
        self.in_flight = Some(InFlight { ready_number, acks });
        let addr = ctx.address();
        self.writer.submit(WriteJob {
            ops,
            done: Box::new(move || addr.do_send(Flushed)),
        });
        // Proposing between `ready()` and `advance_append_async` would change the log under
        // the Ready; the leader's first proposals wait until here.
        if became_leader {
            self.on_became_leader();
        }
    }

    fn on_became_leader(&mut self) {
        tracing::info!(shard = %self.shard, term = self.raft.raft.term, "became leader");
        let view = Layered {
            base: &FjallState(self.storage.state(self.shard)),
            writes: &self.pending,
        };
        if view.get(keys::RULES).is_none() {
            self.propose(
                &Command::SeedRules(Box::new(self.settings.seed_rules.clone())),
                None,
            );
        }
        self.last_clock = None;
        if self.clock_due() {
            self.propose_clock();
        }
    }

    /// Whether the leader should propose a clock entry now: the last one applied left due work,
    /// or the shard's clock is `clock_interval` behind this node's and no clock entry was
    /// proposed within that interval. Reckoned from the replicated clock, so a new leader (or a
    /// restarted node) proposes one only when the shard's clock is really behind, and a shard
    /// with nothing due and no writes keeps its state, digest included, unchanged.
    fn clock_due(&self) -> bool {
        let interval = self.settings.clock_interval;
        let behind = Millis::now().0 - self.state.record.clock.0 >= interval.as_millis() as i64;
        self.due_backlog || (behind && self.last_clock.is_none_or(|t| t.elapsed() >= interval))
    }

    fn propose_clock(&mut self) {
        self.due_backlog = false;
        self.last_clock = Some(Instant::now());
        let command = Command::Clock {
            now: Millis::now(),
            retention: self.settings.retention,
        };
        self.propose(&command, None);
    }

    /// After a write job is durable: acknowledge, then compact the log if enough was applied.
    fn on_flushed(&mut self, ctx: &mut Context<Self>) {
        let in_flight = self
            .in_flight
            .take()
            .expect("a flush answers a job in flight");
        self.raft.on_persist_ready(in_flight.ready_number);
        self.pending = WriteSet::default();
        for (reply, output) in in_flight.acks {
            let _ = reply.send(Ok(output));
        }
        let applied = self.state.meta.applied_index;
        if applied >= self.log_first_on_disk + LOG_COMPACT_ENTRIES {
            // Keep the last applied entry: MemStorage needs one entry to know its first index.
            self.raft
                .mut_store()
                .wl()
                .compact(applied)
                .expect("compacting applied entries");
            for index in self.log_first_on_disk..applied {
                self.compaction.push(WriteOp {
                    space: Space::Log(self.shard),
                    key: index.to_be_bytes().to_vec(),
                    value: None,
                });
            }
            self.log_first_on_disk = applied;
        }
        self.drive(ctx);
    }

    fn on_tick(&mut self, ctx: &mut Context<Self>) {
        self.raft.tick();
        if self.leader && self.clock_due() {
            self.propose_clock();
        }
        if self.leader && !self.sweeping && Instant::now() >= self.next_sweep {
            self.sweep_follow_ups(ctx);
        }
        let idle_ticks = (self.settings.passivate_idle.as_millis()
            / self.settings.tick.as_millis().max(1)) as u64;
        self.state.activations.tick();
        self.state.activations.passivate_idle(idle_ticks.max(1));
        self.report_activations();
        self.drive(ctx);
    }

    fn report_activations(&mut self) {
        let a = &self.state.activations;
        let (activated, passivated, len) = self.reported_activations;
        self.metrics
            .activated
            .fetch_add(a.activated - activated, Relaxed);
        self.metrics
            .passivated
            .fetch_add(a.passivated - passivated, Relaxed);
        let now = a.len();
        if now >= len {
            self.metrics
                .activations
                .fetch_add((now - len) as u64, Relaxed);
        } else {
            self.metrics
                .activations
                .fetch_sub((len - now) as u64, Relaxed);
        }
        self.reported_activations = (a.activated, a.passivated, now);
    }

    /// Drives the follow-up records the router did not finish (it crashed, its client hung
    /// up, the binding shard had no leader): the oldest first, at most
    /// [`FOLLOW_UP_SWEEP_RECORDS_MAX`] at a time, each tried once per sweep.
    fn sweep_follow_ups(&mut self, ctx: &mut Context<Self>) {
        self.next_sweep = Instant::now() + FOLLOW_UP_SWEEP_INTERVAL;
        if self.state.record.follow_ups_pending == 0 {
            return;
        }
        let view = Layered {
            base: &FjallState(self.storage.state(self.shard)),
            writes: &self.pending,
        };
        let horizon = self.state.record.clock.0 - FOLLOW_UP_GRACE_MS;
        let from = keys::follow_up(self.follow_up_floor);
        let found = view.scan(
            keys::FOLLOW_UP_PREFIX,
            Some(&from),
            false,
            FOLLOW_UP_SWEEP_RECORDS_MAX,
        );
        self.follow_up_floor = found
            .first()
            .map_or(self.state.record.follow_up_seq, |(key, _)| {
                keys::follow_up_seq(key) - 1
            });
        let full = found.len() == FOLLOW_UP_SWEEP_RECORDS_MAX;
        let mut follow_ups = Vec::with_capacity(found.len());
        for (key, value) in found {
            let record: FollowUpRecord = decode(&key, &value);
            if record.at.0 > horizon {
                break;
            }
            follow_ups.push(FollowUp {
                seq: keys::follow_up_seq(&key),
                oneid: record.oneid,
                identity: record.identity,
            });
        }
        if follow_ups.is_empty() {
            return;
        }
        tracing::info!(shard = %self.shard, records = follow_ups.len(), "finishing follow-ups the router left");
        self.sweeping = true;
        let shards = Arc::clone(&self.shards);
        let n_shards = self.settings.n_shards;
        let sweep = async move { follow_up::drive(&shards, n_shards, follow_ups, 1).await };
        ctx.spawn(sweep.into_actor(self).map(move |report, actor, _| {
            let finished = report.finished;
            actor.sweeping = false;
            actor
                .metrics
                .follow_ups_swept
                .fetch_add(finished as u64, Relaxed);
            if full && finished > 0 {
                // More are waiting: sweep again at the next tick.
                actor.next_sweep = Instant::now();
            }
        }));
    }
}

impl Actor for ShardActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(SHARD_MAILBOX_MAX);
        ctx.run_interval(self.settings.tick, |actor, ctx| actor.on_tick(ctx));
        self.drive(ctx);
    }
}

/// Proposes a command; answers once it is committed, applied and durable.
#[derive(Message)]
#[rtype(result = "Result<Output, ShardError>")]
pub struct Propose(pub Command);

impl Handler<Propose> for ShardActor {
    type Result = ResponseFuture<Result<Output, ShardError>>;

    fn handle(&mut self, Propose(command): Propose, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.propose(&command, Some(reply));
        self.drive(ctx);
        let shard = self.shard;
        // A reply dropped unanswered means the actor stopped: the proposal's fate is unknown.
        Box::pin(async move { answer.await.unwrap_or(Err(ShardError::Dropped(shard))) })
    }
}

/// The writer made the job in flight durable.
#[derive(Message)]
#[rtype(result = "()")]
struct Flushed;

impl Handler<Flushed> for ShardActor {
    type Result = ();

    fn handle(&mut self, _: Flushed, ctx: &mut Context<Self>) {
        self.on_flushed(ctx);
    }
}

/// Questions about the shard replica itself. Profile, identity and ledger reads do not come
/// here: they read acknowledged state from fjall directly (`storage::StateReader`).
#[derive(Message)]
#[rtype(result = "QueryReply")]
pub enum Query {
    Status,
    Rules,
}

pub enum QueryReply {
    Status(ShardView),
    Rules(Box<Rules>),
}

impl<A: Actor, M: Message<Result = QueryReply>> actix::dev::MessageResponse<A, M> for QueryReply {
    fn handle(self, _: &mut A::Context, tx: Option<actix::dev::OneshotSender<QueryReply>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

impl Handler<Query> for ShardActor {
    type Result = QueryReply;

    fn handle(&mut self, query: Query, _: &mut Context<Self>) -> QueryReply {
        match query {
            Query::Status => {
                let hard_state = self.raft.raft.hard_state();
                QueryReply::Status(ShardView {
                    id: self.shard.0,
                    leader: self.leader_node(),
                    term: hard_state.term,
                    commit_index: hard_state.commit,
                    applied_index: self.state.meta.applied_index,
                    digest: format!("{:016x}", self.state.meta.digest),
                    follow_ups_pending: self.state.record.follow_ups_pending,
                    clock: self.state.record.clock.to_string(),
                })
            }
            Query::Rules => QueryReply::Rules(Box::new(self.state.rules().clone())),
        }
    }
}
