//! The shard actor: one replica of one shard's Raft group, and the host of its profiles.
//!
//! It drives raft-rs's `RawNode` through its `Ready` loop in async-persist mode: new log
//! entries, hard state and the changes of applying committed entries go to the [`Writer`] as
//! one job; only when the writer reports the job durable does the actor call
//! `on_persist_ready`, acknowledge the proposals that job applied, and send the messages that
//! had to wait for the fsync. Each shard keeps at most one job in flight, so the writer's
//! queue is bounded by the number of shards, and one fsync covers the work of many shards.
//!
//! Reads (profiles, identities, ledger) are answered by the actor from its activation cache,
//! the changes of the job in flight, and fjall, in that order: a read sees every write that was
//! acknowledged before it.

use crate::command::{Command, Output, Retention};
use crate::config::node_of_raft_id;
use crate::metrics::Metrics;
use crate::state::keys;
use crate::state::store::{Layered, WriteSet};
use crate::state::{decode, OutboxRecord, ShardState};
use crate::storage::{FjallState, Space, Storage, WriteJob, WriteOp, Writer};
use actix::prelude::*;
use oneid_protocol::api::ShardView;
use oneid_protocol::ids::{Identity, OneId, ShardId};
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
/// Most outbox records one sweep delivers.
pub const OUTBOX_SWEEP_RECORDS_MAX: usize = 1024;
/// Outbox records younger than this (by the shard clock) are left to the router's own link.
const OUTBOX_GRACE_MS: i64 = 5_000;
/// The log is compacted once this many applied entries sit on disk.
const LOG_COMPACT_ENTRIES: u64 = 64;

const _: () = assert!(
    PROPOSALS_PENDING_MAX >= SHARD_MAILBOX_MAX,
    "a full mailbox of proposals must fit the pending table"
);

/// Addresses of every shard's actor, set once all are started.
pub type ShardMap = Arc<OnceLock<Vec<Addr<ShardActor>>>>;

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
    last_clock: Instant,
    /// The last clock entry applied left due work: propose the next one at the next tick.
    due_backlog: bool,
    outbox_sweeping: bool,
    last_sweep: Instant,
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
            last_clock: Instant::now(),
            due_backlog: false,
            outbox_sweeping: false,
            last_sweep: Instant::now(),
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
        self.propose_clock();
    }

    fn propose_clock(&mut self) {
        self.last_clock = Instant::now();
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
        if self.leader
            && (self.due_backlog || self.last_clock.elapsed() >= self.settings.clock_interval)
        {
            self.due_backlog = false;
            self.propose_clock();
        }
        if self.leader
            && !self.outbox_sweeping
            && self.last_sweep.elapsed() >= Duration::from_secs(2)
        {
            self.sweep_outbox(ctx);
        }
        self.state
            .activations
            .passivate_idle(self.settings.passivate_idle);
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

    /// Delivers links recorded in the outbox that the router may not have delivered (it
    /// crashed, or lost leadership): `Link` to the profile's shard, then `OutboxDone` here.
    /// Both are idempotent, so a record delivered twice does no harm.
    fn sweep_outbox(&mut self, ctx: &mut Context<Self>) {
        self.last_sweep = Instant::now();
        let view = Layered {
            base: &FjallState(self.storage.state(self.shard)),
            writes: &self.pending,
        };
        let horizon = self.state.meta.clock.0 - OUTBOX_GRACE_MS;
        let mut links: BTreeMap<ShardId, Vec<(OneId, Identity)>> = BTreeMap::new();
        let mut seqs = Vec::new();
        for (key, value) in view.scan(keys::OUTBOX_PREFIX, None, false, OUTBOX_SWEEP_RECORDS_MAX) {
            let record: OutboxRecord = decode(&key, &value);
            if record.at.0 > horizon {
                break;
            }
            seqs.push(u64::from_be_bytes(
                key[1..9].try_into().expect("outbox keys hold a sequence"),
            ));
            links
                .entry(record.oneid.shard())
                .or_default()
                .push((record.oneid, record.identity));
        }
        if seqs.is_empty() {
            return;
        }
        let Some(shards) = self.shards.get().cloned() else {
            return;
        };
        self.outbox_sweeping = true;
        let own = ctx.address();
        let delivery = async move {
            for (shard, pairs) in links {
                match shards[shard.0 as usize]
                    .send(Propose(Command::Link(pairs)))
                    .await
                {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
            }
            let _ = own.send(Propose(Command::OutboxDone(seqs))).await;
        };
        ctx.spawn(
            delivery
                .into_actor(self)
                .map(|(), actor, _| actor.outbox_sweeping = false),
        );
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
                })
            }
            Query::Rules => QueryReply::Rules(Box::new(self.state.rules().clone())),
        }
    }
}
