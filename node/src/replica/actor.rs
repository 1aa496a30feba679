//! The shard actor: the shell around a replica core on a node.
//!
//! It feeds the [`Replica`] its inputs (proposals and reads from this node, Raft messages from
//! peers, ticks of its timer with the wall clock, and the writer's word that a write is
//! durable) and carries out its [`Effects`]: each write goes to the node's [`Writer`] (one in
//! flight per shard, so the writer's queue is bounded by the number of shards, and one fsync
//! covers the work of many shards), messages go to the peers through its [`Host`], and answers
//! go back to whoever asked. As leader it also sweeps the follow-up records the router did
//! not finish (driven by its host). It is given its [`Host`] (the node's routing table) and
//! never imports the routing table or the follow-up driver, which know it.
//!
//! Snapshots (see `oneid_replica::snapshot`): as leader it holds what its replica prepares
//! (`snapshots::Snapshots::hold`, before the next write goes out) and tells the replica how
//! the transfers ended; as follower it fetches what its replica asks for, on the actor's
//! runtime, and hands an install's write to the writer as one that switches the shard's
//! keyspaces to the new generation (`WriteJob::switch`) before the replica reloads from them.
//!
//! The actor answers no profile, identity or ledger read itself: those go to fjall directly
//! (`storage::StateReader`), once the actor says the durable state is new enough
//! ([`Read`]).

use crate::metrics::Metrics;
use crate::snapshots::{Report, Snapshots, Staged};
use crate::storage::{FjallLog, Storage, WriteJob, Writer};
use actix::prelude::*;
use futures::future::BoxFuture;
use oneid_protocol::ids::ShardId;
use oneid_protocol::num::Millis;
use oneid_replica::message::Message as RaftMessage;
use oneid_replica::snapshot::SnapshotRef;
use oneid_replica::{Effects, Now, Replica, ReplicaConfig, ReplicaStatus, ShardError, Token};
use oneid_state::command::{Command, FollowUp, Output};
use oneid_state::merge::{MergeId, MergePlan};
use oneid_state::profile::Profile;
use oneid_state::{decode, keys, FollowUpRecord};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most messages waiting in a shard actor's mailbox; senders wait (backpressure).
pub const SHARD_MAILBOX_MAX: usize = 1024;
/// Most follow-up records one sweep drives.
pub const FOLLOW_UP_SWEEP_RECORDS_MAX: usize = 1024;
/// Follow-up records younger than this (by the shard clock) are left to the router, which
/// drives them right after the apply that wrote them.
const FOLLOW_UP_GRACE_MS: i64 = 2_000;
/// How often the leader sweeps follow-up records (sooner while a sweep finds a full batch).
const FOLLOW_UP_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most locks one merge sweep reads (each lock's merge is driven once per sweep).
pub const MERGE_SWEEP_LOCKS_MAX: usize = 64;
/// Locks younger than this (by the shard clock, or seen by this leader for less long: a
/// cluster whose clock entries are rare must still carry merges on) are left to the router
/// that took them, which drives its merge for up to `merges::MERGE_ANSWER_WAIT`.
const MERGE_SWEEP_GRACE_MS: i64 = 6_000;
const MERGE_SWEEP_GRACE: Duration = Duration::from_millis(MERGE_SWEEP_GRACE_MS as u64);
/// How often the leader sweeps the locks of merges.
const MERGE_SWEEP_INTERVAL: Duration = Duration::from_secs(2);

const _: () = assert!(
    oneid_replica::PROPOSALS_PENDING_MAX >= SHARD_MAILBOX_MAX,
    "a full mailbox of proposals must fit the pending table"
);

/// A leader's lease as its replica last published it: until `until` no other leader can be
/// elected, and `commit` is at least every index any client was told of, so a linearizable
/// read may be served without asking the replica once the durable state (`durable`) is there.
/// A replica publishes its gate before anything it answers leaves (replies, messages): a
/// write acknowledged, or a leadership transfer started, is never missed by a reader.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub until: Instant,
    pub commit: u64,
    pub durable: u64,
}

/// What a shard actor needs of the node around it. It is given one (the node's routing table,
/// `shards::Shards`) instead of importing it: the routing table and the follow-up driver know
/// the actor; the actor knows only this.
pub trait Host: Send + Sync + 'static {
    /// Sends a local replica's messages to the replicas of other nodes; answers the replica
    /// ids it could not reach.
    fn send_raft(&self, shard: ShardId, messages: Vec<RaftMessage>) -> Vec<u64>;
    /// Publishes the replica's lease gate (`None`: it holds no lease).
    fn publish_gate(&self, shard: ShardId, gate: Option<Gate>);
    /// What the replica says of its leader (node) and term, each tick.
    fn observe(&self, shard: ShardId, leader: Option<u64>, term: u64);
    /// A write of the shard is durable.
    fn flushed(&self, shard: ShardId);
    /// The node's snapshots: those held for followers, and the fetches in flight.
    fn snapshots(&self) -> &Snapshots;
    /// Fetches a snapshot from its holder into a staged generation (`None`: it failed).
    fn fetch_snapshot(self: Arc<Self>, snapshot: SnapshotRef)
        -> BoxFuture<'static, Option<Staged>>;
    /// Drives follow-up records to their end (the binds at other shards, then the finish at
    /// this one); answers how many finished.
    fn drive_follow_ups(self: Arc<Self>, follow_ups: Vec<FollowUp>) -> BoxFuture<'static, usize>;
    /// Drives merges to their end, from where each stands; answers how many ended.
    fn drive_merges(self: Arc<Self>, plans: Vec<MergePlan>) -> BoxFuture<'static, usize>;
}

type Reply<T> = oneshot::Sender<Result<T, ShardError>>;

pub struct ShardActor {
    shard: ShardId,
    /// The tick length.
    tick: Duration,
    /// When the replica started: its monotonic clock counts from here.
    started: Instant,
    replica: Replica<FjallLog>,
    storage: Arc<Storage>,
    writer: Writer,
    metrics: Arc<Metrics>,
    host: Arc<dyn Host>,
    /// Entered by every handler: each line the actor (and its replica core) logs names the
    /// shard.
    span: tracing::Span,
    next_token: Token,
    proposals: BTreeMap<Token, Reply<Output>>,
    reads: BTreeMap<Token, Reply<()>>,
    /// A follow-up sweep is in flight (at most one at a time).
    sweeping: bool,
    next_sweep: Instant,
    /// A merge sweep is in flight (at most one at a time).
    sweeping_merges: bool,
    next_merge_sweep: Instant,
    /// When this replica first saw each merge holding a lock here (those the last sweep read:
    /// at most `MERGE_SWEEP_LOCKS_MAX`).
    merges_seen: BTreeMap<MergeId, Instant>,
    /// Every follow-up record up to this sequence is finished: the next sweep's scan starts
    /// after it, so it does not walk the tombstones of finished records. In memory only (0
    /// after a restart: one scan from the start).
    follow_up_floor: u64,
    reported_activations: (u64, u64, usize),
    /// The write in flight switches the shard to this generation.
    switching: Option<u64>,
    /// Snapshots staged (by generation, with their index) until installed or dropped: one
    /// being installed, and perhaps one fetched meanwhile.
    staged: BTreeMap<u64, (u64, Staged)>,
}

impl ShardActor {
    /// Recovers a shard replica from disk.
    pub fn recover(
        config: ReplicaConfig,
        storage: Arc<Storage>,
        writer: Writer,
        metrics: Arc<Metrics>,
        host: Arc<dyn Host>,
    ) -> anyhow::Result<ShardActor> {
        let shard = config.shard;
        let tick = config.tick;
        let source = FjallLog::new(Arc::clone(&storage), shard);
        let replica = Replica::recover(config, source, &storage.state_read(shard))?;
        let generation = storage.generation_number(shard);
        let status = replica.status();
        tracing::info!(%shard, applied = status.applied_index, generation, log = %format!("{}..={}", status.first_index, status.commit_index.max(status.applied_index)), "shard recovered");
        Ok(ShardActor {
            shard,
            tick,
            started: Instant::now(),
            replica,
            storage,
            writer,
            metrics,
            host,
            span: tracing::info_span!("shard", shard = shard.0),
            next_token: 0,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            sweeping: false,
            sweeping_merges: false,
            next_merge_sweep: Instant::now(),
            merges_seen: BTreeMap::new(),
            next_sweep: Instant::now(),
            follow_up_floor: 0,
            reported_activations: (0, 0, 0),
            switching: None,
            staged: BTreeMap::new(),
        })
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    fn now(&self) -> Now {
        Now {
            wall: crate::clock::wall_now(),
            since_start: self.started.elapsed(),
        }
    }

    /// Runs the replica's Ready, and carries out everything it asks.
    fn run(&mut self, mut fx: Effects, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        let storage = Arc::clone(&self.storage);
        let now = self.now();
        let started = Instant::now();
        self.replica
            .advance(&storage.state_read(self.shard), now, &mut fx);
        let clocks = std::mem::take(&mut fx.clocks);
        if !clocks.is_empty() {
            // The core reads no clock: the shell times the apply round a clock entry was in.
            self.metrics
                .clock_applied(started.elapsed(), clocks.iter().sum());
        }
        self.carry_out(fx, ctx);
    }

    fn carry_out(&mut self, mut fx: Effects, ctx: &mut Context<Self>) {
        // Before the write goes out: the state is still the durable one the snapshots are of.
        for snapshot in std::mem::take(&mut fx.snapshots) {
            if !self.host.snapshots().hold(&snapshot) {
                self.replica.snapshot_failed(&snapshot);
            }
        }
        // Before anything leaves: a reader must never find a lease this replica gave up, nor
        // miss a write it acknowledges.
        let gate = self.replica.lease_read().map(|(until, commit)| Gate {
            until: self.started + until,
            commit,
            durable: self.replica.durable_applied(),
        });
        self.host.publish_gate(self.shard, gate);
        let Effects {
            messages,
            write,
            replies,
            reads,
            // Taken by `run`, which times the apply round that had them.
            clocks: _,
            role,
            snapshots: _,
            fetch,
            switch,
            discard,
        } = fx;
        if !messages.is_empty() {
            for raft_id in self.host.send_raft(self.shard, messages) {
                self.replica.unreachable(raft_id);
            }
        }
        if let Some((role, term)) = role {
            tracing::info!(shard = %self.shard, ?role, term, "role changed");
            self.metrics.leader_changes.fetch_add(1, Relaxed);
        }
        if let Some(snapshot) = fetch {
            self.fetch(snapshot, ctx);
        }
        if let Some(generation) = discard {
            self.staged.remove(&generation);
            let (storage, shard) = (Arc::clone(&self.storage), self.shard);
            tokio::task::spawn_blocking(move || {
                if let Err(error) = storage.discard(shard, generation) {
                    tracing::warn!(%shard, generation, %error, "dropping a staged generation failed");
                }
            });
        }
        if let Some(ops) = write {
            self.switching = switch;
            let addr = ctx.address();
            self.writer.submit(WriteJob {
                ops,
                switch: switch.map(|generation| (self.shard, generation)),
                done: Box::new(move || addr.do_send(Flushed)),
            });
        }
        for (token, reply) in replies {
            if reply.is_err() {
                self.metrics.proposals_failed.fetch_add(1, Relaxed);
            }
            if let Some(sender) = self.proposals.remove(&token) {
                let _ = sender.send(reply);
            }
        }
        for (token, answer) in reads {
            if let Some(sender) = self.reads.remove(&token) {
                let _ = sender.send(answer);
            }
        }
    }

    /// Fetches a snapshot's state into a new generation, then tells the replica.
    fn fetch(&mut self, snapshot: SnapshotRef, ctx: &mut Context<Self>) {
        let task = Arc::clone(&self.host).fetch_snapshot(snapshot.clone());
        ctx.spawn(task.into_actor(self).map(move |staged, actor, ctx| {
            let mut fx = Effects::default();
            if let Some(staged) = staged {
                actor
                    .staged
                    .insert(staged.generation, (snapshot.index, staged));
            }
            let generation = staged.map(|s| s.generation);
            actor
                .replica
                .staged(&snapshot, generation, actor.now(), &mut fx);
            actor.run(fx, ctx);
        }));
    }

    /// Ticks one tick length after the last tick ran: never early, and never a burst of the
    /// ticks a stall missed (an actix interval would catch up on them), which leases rely on.
    fn schedule_tick(&self, ctx: &mut Context<Self>) {
        ctx.run_later(self.tick, |actor, ctx| {
            actor.on_tick(ctx);
            actor.schedule_tick(ctx);
        });
    }

    fn on_tick(&mut self, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        let mut fx = Effects::default();
        for report in self.host.snapshots().reports(self.shard) {
            match report {
                Report::Progressed(snapshot) => self.replica.snapshot_progressed(&snapshot),
                Report::Sent(snapshot) => {
                    self.metrics.snapshots_sent.fetch_add(1, Relaxed);
                    self.replica.snapshot_progressed(&snapshot);
                }
                Report::Failed(snapshot) => self.replica.snapshot_failed(&snapshot),
            }
        }
        self.replica.tick(self.now(), &mut fx);
        let status = self.replica.status();
        self.host.observe(
            self.shard,
            status.leader.map(crate::config::node_of_raft_id),
            status.term,
        );
        if self.replica.is_leader() && !self.sweeping && Instant::now() >= self.next_sweep {
            self.sweep_follow_ups(ctx);
        }
        if self.replica.is_leader()
            && !self.sweeping_merges
            && Instant::now() >= self.next_merge_sweep
        {
            self.sweep_merges(ctx);
        }
        self.report_activations();
        self.run(fx, ctx);
    }

    fn report_activations(&mut self) {
        let a = &self.replica.state.activations;
        let (activated, passivated, len) = self.reported_activations;
        self.metrics
            .activated
            .fetch_add(a.activated - activated, Relaxed);
        self.metrics
            .passivated
            .fetch_add(a.passivated - passivated, Relaxed);
        let now = a.active();
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
        let record = &self.replica.state.record;
        if record.follow_ups_pending == 0 {
            return;
        }
        let (horizon, follow_up_seq) = (record.clock.0 - FOLLOW_UP_GRACE_MS, record.follow_up_seq);
        let storage = Arc::clone(&self.storage);
        let base = storage.state_read(self.shard);
        let view = self.replica.view(&base);
        let from = keys::follow_up(self.follow_up_floor);
        let found = view.scan(
            keys::FOLLOW_UP_PREFIX,
            Some(&from),
            false,
            FOLLOW_UP_SWEEP_RECORDS_MAX,
        );
        self.follow_up_floor = found
            .first()
            .map_or(follow_up_seq, |(key, _)| keys::follow_up_seq(key) - 1);
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
                unbind: record.unbind,
            });
        }
        if follow_ups.is_empty() {
            return;
        }
        tracing::info!(shard = %self.shard, records = follow_ups.len(), "finishing follow-ups the router left");
        self.sweeping = true;
        let sweep = Arc::clone(&self.host).drive_follow_ups(follow_ups);
        ctx.spawn(sweep.into_actor(self).map(move |finished, actor, _| {
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

impl ShardActor {
    /// Drives the merges holding locks on this shard's profiles for longer than
    /// `MERGE_SWEEP_GRACE_MS` by the shard clock (their router stopped, crashed, or answered
    /// `merge_pending`): each to its end, from where it stands. At most
    /// [`MERGE_SWEEP_LOCKS_MAX`] locks are read per sweep.
    fn sweep_merges(&mut self, ctx: &mut Context<Self>) {
        self.next_merge_sweep = Instant::now() + MERGE_SWEEP_INTERVAL;
        let record = &self.replica.state.record;
        if record.merges_pending == 0 {
            return;
        }
        let horizon = record.clock.0 - MERGE_SWEEP_GRACE_MS;
        let storage = Arc::clone(&self.storage);
        let base = storage.state_read(self.shard);
        let view = self.replica.view(&base);
        let now = Instant::now();
        let mut seen = BTreeMap::new();
        let mut plans: BTreeMap<MergeId, MergePlan> = BTreeMap::new();
        for (key, value) in view.scan(keys::LOCK_PREFIX, None, false, MERGE_SWEEP_LOCKS_MAX) {
            let (merge, at): (MergeId, Millis) = decode(&key, &value);
            let first = *seen
                .entry(merge)
                .or_insert_with(|| self.merges_seen.get(&merge).copied().unwrap_or(now));
            let young = at.0 > horizon && now.duration_since(first) < MERGE_SWEEP_GRACE;
            if young || plans.contains_key(&merge) {
                continue;
            }
            let profile_key = keys::profile(keys::locked_oneid(&key));
            let Some(bytes) = view.get(&profile_key) else {
                continue;
            };
            let profile: Profile = decode(&profile_key, &bytes);
            if let Some(lock) = profile.merging {
                plans.insert(merge, lock.plan);
            }
        }
        self.merges_seen = seen;
        if plans.is_empty() {
            return;
        }
        tracing::info!(shard = %self.shard, merges = plans.len(), "carrying on merges their routers left");
        self.sweeping_merges = true;
        let sweep = Arc::clone(&self.host).drive_merges(plans.into_values().collect());
        ctx.spawn(sweep.into_actor(self).map(|_, actor, _| {
            actor.sweeping_merges = false;
        }));
    }
}

impl Actor for ShardActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        ctx.set_mailbox_capacity(SHARD_MAILBOX_MAX);
        self.schedule_tick(ctx);
        self.run(Effects::default(), ctx);
    }
}

/// Proposes a command; answers once it is committed, applied and durable. One still in the
/// mailbox at `deadline` is answered `Timeout` unproposed: its caller gave up.
#[derive(Message)]
#[rtype(result = "Result<Output, ShardError>")]
pub struct Propose {
    pub command: Command,
    pub deadline: Instant,
}

impl Handler<Propose> for ShardActor {
    type Result = ResponseFuture<Result<Output, ShardError>>;

    fn handle(
        &mut self,
        Propose { command, deadline }: Propose,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        let _span = self.span.clone().entered();
        let shard = self.shard;
        if Instant::now() >= deadline {
            return Box::pin(async move { Err(ShardError::Timeout(shard)) });
        }
        let (reply, answer) = oneshot::channel();
        let token = self.token();
        self.proposals.insert(token, reply);
        self.metrics.proposals.fetch_add(1, Relaxed);
        let mut fx = Effects::default();
        self.replica.propose(&command, Some(token), &mut fx);
        self.run(fx, ctx);
        // A reply dropped unanswered means the actor stopped: the proposal's fate is unknown.
        Box::pin(async move { answer.await.unwrap_or(Err(ShardError::Dropped(shard))) })
    }
}

/// Waits until this replica's durable state may serve a linearizable read (a ReadIndex
/// round, then the apply catching up with it).
#[derive(Message)]
#[rtype(result = "Result<(), ShardError>")]
pub struct Read;

impl Handler<Read> for ShardActor {
    type Result = ResponseFuture<Result<(), ShardError>>;

    fn handle(&mut self, _: Read, ctx: &mut Context<Self>) -> Self::Result {
        let _span = self.span.clone().entered();
        let (reply, answer) = oneshot::channel();
        let token = self.token();
        self.reads.insert(token, reply);
        let mut fx = Effects::default();
        self.replica.read(token, self.now(), &mut fx);
        self.run(fx, ctx);
        let (shard, metrics, asked) = (self.shard, Arc::clone(&self.metrics), Instant::now());
        Box::pin(async move {
            let answer = answer.await.unwrap_or(Err(ShardError::Stopped(shard)));
            metrics.read_index_latency.observe(asked.elapsed());
            answer
        })
    }
}

/// Raft messages from this shard's replicas on other nodes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Step(pub Vec<RaftMessage>);

impl Handler<Step> for ShardActor {
    type Result = ();

    fn handle(&mut self, Step(messages): Step, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        let (now, mut fx) = (self.now(), Effects::default());
        for message in messages {
            self.replica.step(message, now, &mut fx);
        }
        self.run(fx, ctx);
    }
}

/// The node shuts down: the replica hands leadership off (see [`Replica::leave`]). Answers
/// whether it still leads.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Leave;

impl Handler<Leave> for ShardActor {
    type Result = bool;

    fn handle(&mut self, _: Leave, ctx: &mut Context<Self>) -> bool {
        let _span = self.span.clone().entered();
        let leads = self.replica.leave();
        self.run(Effects::default(), ctx);
        leads
    }
}

/// The writer made the write in flight durable.
#[derive(Message)]
#[rtype(result = "()")]
struct Flushed;

impl Handler<Flushed> for ShardActor {
    type Result = ();

    fn handle(&mut self, _: Flushed, ctx: &mut Context<Self>) {
        let _span = self.span.clone().entered();
        if let Some(generation) = self.switching {
            self.metrics.snapshots_installed.fetch_add(1, Relaxed);
            if let Some((index, staged)) = self.staged.remove(&generation) {
                tracing::info!(shard = %self.shard, index, generation, bytes = staged.bytes,
                    seconds = staged.started.elapsed().as_secs_f64(),
                    "snapshot installed (seconds from the start of its fetch)");
            }
        }
        let switched = self.switching.take().is_some();
        self.host.flushed(self.shard);
        let mut fx = Effects::default();
        self.replica
            .persisted(&self.storage.state_read(self.shard), &mut fx);
        if switched {
            // What this actor derived from the old state: the follow-up records known
            // finished, and the activation counters of the cache the replica dropped.
            self.follow_up_floor = 0;
            let (_, _, held) = self.reported_activations;
            self.reported_activations = (0, 0, held);
        }
        self.run(fx, ctx);
    }
}

/// What the replica says of itself (for `/v1/cluster`).
#[derive(Message)]
#[rtype(result = "StatusReply")]
pub struct Status;

/// A replica's status and the shard record's figures operators see.
pub struct StatusReply {
    pub status: ReplicaStatus,
    pub follow_ups_pending: u64,
    pub clock: Millis,
}

impl<A: Actor, M: Message<Result = StatusReply>> actix::dev::MessageResponse<A, M> for StatusReply {
    fn handle(self, _: &mut A::Context, tx: Option<actix::dev::OneshotSender<StatusReply>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

impl Handler<Status> for ShardActor {
    type Result = StatusReply;

    fn handle(&mut self, _: Status, _: &mut Context<Self>) -> StatusReply {
        StatusReply {
            status: self.replica.status(),
            follow_ups_pending: self.replica.state.record.follow_ups_pending,
            clock: self.replica.state.record.clock,
        }
    }
}
