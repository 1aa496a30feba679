//! The replica core: one shard's Raft replica and its state machine, without I/O.
//!
//! This crate is the only one that knows raft-rs, and it does no I/O: it never sees a disk,
//! a socket, an async runtime or a clock. Its shells (the node's shard actor, the simulation)
//! feed it inputs, with the time as a value, and carry out what it answers.
//!
//! # Layout
//! - this file: [`Replica`], raft-rs's `RawNode` with proposals, ReadIndex rounds, leases,
//!   the apply of committed entries into the shard's state machine (`oneid_state`), and the
//!   [`Effects`] the shell must carry out;
//! - [`snapshot`]: the core's half of snapshots;
//! - [`log`]: the Raft log over a key-value [`log::LogSource`] (raft-rs's `Storage`), and the
//!   meta keys of a shard's replica;
//! - [`message`]: the messages replicas send each other, opaque to the shells;
//! - [`clocks`]: the majority time, from the wall clocks the voters' messages carry;
//! - [`write`]: the writes a replica hands its shell to make durable.
//!
//! [`Replica`] wraps raft-rs's `RawNode` over the shard's [`ShardLog`] and the shard's
//! [`ShardState`]. Its shell (the actix actor on a node, the simulator in tests) feeds it
//! inputs and carries out what it answers in [`Effects`]:
//! - inputs: [`Replica::propose`], [`Replica::read`] (a linearizable read), [`Replica::step`]
//!   (a Raft message from a peer), [`Replica::tick`], [`Replica::persisted`] (the write handed
//!   out is durable), [`Replica::unreachable`], [`Replica::leave`] (the node shuts down:
//!   hand leadership off), and the snapshot steps of `replica::snapshot`
//!   ([`Replica::staged`], [`Replica::snapshot_progressed`], [`Replica::snapshot_failed`]); those
//!   that need the time get the shell's
//!   clocks ([`Now`]: the wall clock, which the replica's messages carry to the leader for the
//!   shard's majority time, and a monotonic one, for leases and the freshness of the clocks
//!   reported), the only time that enters;
//! - then [`Replica::advance`], which runs raft-rs's Ready once if no write is in flight;
//! - effects: messages to send now, one write to make durable (then call `persisted`), replies
//!   to proposals and reads that may be served now, each answered only once the write holding
//!   what it depends on is durable.
//!
//! The order follows raft-rs's async-persist `Ready` contract: a leader's messages go out while
//! it persists the same entries; committed entries (durable here already) are applied into the
//! same write as the new entries and hard state; a follower's messages (its acks) go out only
//! after that write is durable. One write is in flight at a time, so a node's writer queue is
//! bounded by the number of replicas it hosts.
//!
//! Linearizable reads use ReadIndex, batched: reads arriving while one ReadIndex round is in
//! flight wait for the next, one round at a time. raft-rs drops a ReadIndex until the leader
//! has committed an entry of its term, so a round not answered within [`READ_RETRY_TICKS`] is
//! asked again, and a read not answered within [`READ_TIMEOUT_TICKS`] fails `unavailable`. A
//! read is served once this replica's durable applied index reaches the round's index: the
//! state readers see is then at least as new as every write acknowledged before the read began.
//!
//! # Leader leases
//!
//! A leader whose own ReadIndex round, asked at monotonic time `t`, was confirmed by a quorum
//! holds a lease until `t + lease` ([`Replica::lease`]): while it holds, it answers reads (its
//! own, and ReadIndex requests from its followers) at its commit index without a round, and
//! renews the lease with a round once [`LEASE_RENEW_LEFT_PERCENT`] of it is left. Why no other leader can exist
//! before the lease ends:
//! - every replica of the confirming quorum heard the round's heartbeat after `t`, and with
//!   `check_quorum` raft-rs refuses (pre-)votes while it heard from a leader within the
//!   minimum election timeout, counted in its ticks; the shell's ticks never come early or in a
//!   burst (each is scheduled one tick length after the last ran), so that is at least
//!   `(election_min - 1)` tick lengths of its monotonic clock after `t`. A new leader needs a
//!   vote from one of them. The lease is `(election_min - LEASE_MARGIN_TICKS)` tick lengths
//!   ([`LEASE_MARGIN_TICKS`] is 2), of which it keeps
//!   [`LEASE_PERCENT`]: room for clocks running at different rates;
//! - a replica that restarts forgets what it heard, so it refuses (pre-)votes for one lease
//!   after it starts;
//! - a leadership transfer makes its target campaign at once, votes granted despite leases: a
//!   leader that starts one holds no lease for the rest of its term;
//! - a lease belongs to a term: stepping down (or a new term) ends it. Its clock is monotonic
//!   and runs while the process is stopped (SIGSTOP), so a paused leader resumes with its
//!   lease gone.

pub mod clocks;
pub mod log;
mod logging;
pub mod message;
pub mod snapshot;
pub mod write;

use crate::clocks::PeerClocks;
use crate::log::{LogSource, ShardLog};
use crate::write::WriteOp;
use message::Message;
use oneid_protocol::ids::ShardId;
use oneid_protocol::num::Millis;
use oneid_protocol::rules::Rules;
use oneid_state::command::{Command, Output};
use oneid_state::keys;
use oneid_state::store::{Layered, StateRead, WriteSet};
use oneid_state::ShardState;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, EntryType, MessageType};
use raft::{RawNode, ReadOnlyOption, StateRole};
use snapshot::{Incoming, Outgoing, SnapshotRef};
use std::collections::BTreeMap;
use std::time::Duration;

/// Most proposals a replica holds waiting for commit; past it proposals fail `Overloaded`.
pub const PROPOSALS_PENDING_MAX: usize = 4096;
/// Most reads a replica holds waiting for their ReadIndex round; past it reads fail
/// `Overloaded`.
pub const READS_PENDING_MAX: usize = 4096;
/// Most uncommitted bytes a leader accepts before proposals fail `Overloaded`: the memory a
/// shard's log holds for entries a quorum has not yet stored (a few commit rounds of full
/// 16 MiB batches).
pub const UNCOMMITTED_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// Most bytes of entries in one append message (one entry may cross it; entries are under
/// the 16 MiB request body, so an append stays under the transport's 64 MiB frame).
pub const APPEND_BYTES_MAX: u64 = 1024 * 1024;
/// Most append messages in flight to one follower.
pub const APPENDS_IN_FLIGHT_MAX: usize = 256;
/// Ticks a ReadIndex round may take before it is asked again.
pub const READ_RETRY_TICKS: u64 = 3;
/// Ticks a read may wait in all before it fails `unavailable`.
pub const READ_TIMEOUT_TICKS: u64 = 10;
/// How long proposals a leader took wait, after it stopped leading, for their entries to be
/// applied (committed by the next leader); then they fail `Dropped` (fate unknown).
const DEPOSED_PROPOSALS_TICKS: u64 = 10;
/// Ticks a new leader waits before it hands leadership to the shard's placed leader.
const LEAD_HOME_AFTER_TICKS: u64 = 30;
/// Ticks between two such hand-overs of one replica.
const LEAD_HOME_RETRY_TICKS: u64 = 100;
/// Ticks the placed leader must have kept up (acknowledged all but [`LEAD_HOME_LAG_MAX`]
/// entries, every tick) before leadership is handed to it: a replica that just restarted is
/// still catching up, and a transfer to it would refuse proposals until it answers.
const LEAD_HOME_KEPT_UP_TICKS: u64 = 10;
/// Most entries the placed leader may lack and still count as keeping up.
const LEAD_HOME_LAG_MAX: u64 = 256;
/// Ticks a new shard's leader waits for every voter's clock before its first clock entry (see
/// `Replica::first_clock_ready`; 2 s at the default 100 ms tick); events wait for that entry.
const FIRST_CLOCK_WAIT_TICKS: u64 = 20;
/// The first clock entry goes at once if the clocks a new shard's leader heard are at most this
/// far apart (see `Replica::first_clock_ready`).
const FIRST_CLOCK_SPREAD_MAX_MS: i64 = 2_000;
/// Readies with nothing to persist that one `advance` runs before it yields.
const READIES_PER_ADVANCE_MAX: usize = 16;
/// A node compacts a log once this many entries can go (`ReplicaConfig::log_compact_entries`).
pub const LOG_COMPACT_BATCH: u64 = 64;
/// Of the time no other leader can be elected after a quorum confirmed a round (see the module
/// documentation), the share a lease lasts; the rest allows for clocks running at different
/// rates on different nodes.
pub const LEASE_PERCENT: u32 = 80;
/// Ticks short of the minimum election timeout a lease stops: the quorum that confirmed a
/// round refuses votes for at least `election_min - 1` tick lengths after it (a tick already
/// begun counts), and the lease stays one more tick clear of that (see the module
/// documentation).
pub const LEASE_MARGIN_TICKS: usize = 2;
/// A lease is renewed (a round asked with no read waiting) once less than this share of it is
/// left: early enough that a leader under steady reads never loses it between rounds.
pub const LEASE_RENEW_LEFT_PERCENT: u32 = 50;

/// The shell's clocks at an input.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// The wall clock: what this replica's messages carry, and what the leader's majority
    /// time counts as its own.
    pub wall: Millis,
    /// Time since this replica started, on a clock that never goes back and runs on while the
    /// process is stopped (`CLOCK_MONOTONIC`): what leases are measured with.
    pub since_start: Duration,
}

/// A caller's handle on a proposal or a read, chosen by the shell.
pub type Token = u64;

/// Why a proposal or read was not answered.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ShardError {
    /// This replica is not the leader; `leader` is the node that is, if known.
    #[error("shard {shard} has no leader here (leader: {leader:?})")]
    NotLeader { shard: ShardId, leader: Option<u64> },
    /// Leadership changed and the proposal was not applied here soon after; it may or may not
    /// apply (every command is idempotent: sending it again is safe).
    #[error("shard {0}: leadership changed before the proposal was applied")]
    Dropped(ShardId),
    /// Too many proposals or reads are waiting.
    #[error("shard {0} is overloaded; retry later")]
    Overloaded(ShardId),
    /// The shard's replica is not running here (the node is stopping, or does not host it).
    #[error("shard {0} is not running")]
    Stopped(ShardId),
    /// No leader answered in time.
    #[error("shard {0}: no leader answered in time")]
    Timeout(ShardId),
    /// The replica's state could not be read whole (a broken invariant, logged where met).
    #[error("shard {0}: its state could not be read here")]
    Unreadable(ShardId),
}

/// What a replica needs to know of its place and its limits.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub shard: ShardId,
    pub n_shards: u32,
    /// This replica's id: unique in the cluster, chosen by the shell (this crate never derives
    /// anything from it).
    pub id: u64,
    /// The shard's replicas, by replica id, with the node that hosts each: the voters when the
    /// shard is first created (later the conf state stored with the log holds the voters),
    /// and how a replica's node is named (a leader in `NotLeader`, a snapshot's holder).
    pub replicas: BTreeMap<u64, u64>,
    /// The replica that leads when all are well (the cluster file's placement spreads them
    /// over the nodes): a leader elected elsewhere hands leadership back to it.
    pub placed_leader: u64,
    /// Election timeout in ticks, drawn from `min..max` by raft-rs (a simulation sets
    /// `max = min + 1`, which makes it deterministic).
    pub election_ticks: (usize, usize),
    pub heartbeat_ticks: usize,
    /// Campaign at once: at every start if it is the only voter, else only when the replica
    /// is new (the placed leader of a new shard, so leaders start spread evenly).
    pub campaign: bool,
    pub clock_interval_ms: i64,
    pub passivate_idle_ticks: u64,
    pub activation_budget: usize,
    pub seed_rules: Rules,
    /// Applied entries kept for followers that fall behind (`[cluster] log_retain_entries`).
    pub log_retain_entries: u64,
    /// The log is compacted once this many entries can go ([`LOG_COMPACT_BATCH`] on a node;
    /// a simulation compacts sooner, so that followers need snapshots more often).
    pub log_compact_entries: u64,
    /// A number unique to this start of the replica (a node uses its wall clock at start, in
    /// microseconds): it tells this life's ReadIndex rounds from earlier lives' ones.
    pub life: u64,
    /// The length of a tick: the shell ticks at most once per tick length (never early, never
    /// in a burst), which leases rely on.
    pub tick: Duration,
}

/// What the shell must carry out. Fill one per call, then drain it.
#[derive(Default)]
pub struct Effects {
    /// Raft messages to send now.
    pub messages: Vec<Message>,
    /// A write to make durable, then call [`Replica::persisted`].
    pub write: Option<Vec<WriteOp>>,
    /// Answers to proposals.
    pub replies: Vec<(Token, Result<Output, ShardError>)>,
    /// Reads that may be served now (the durable state covers them), or why not.
    pub reads: Vec<(Token, Result<(), ShardError>)>,
    /// Clock entries applied: the due keys each processed (metrics; the shell times the call).
    pub clocks: Vec<usize>,
    /// The replica became leader, or stopped being leader, with the term.
    pub role: Option<(Role, u64)>,
    /// Snapshots of the durable state to hold for followers (a leader's): emitted only while
    /// no write is in flight, so the shell registers a read view of the state now, before
    /// the next write goes out, or calls [`Replica::snapshot_failed`].
    pub snapshots: Vec<SnapshotRef>,
    /// A snapshot to fetch and stage in a new generation (a follower's); then call
    /// [`Replica::staged`], whatever the outcome.
    pub fetch: Option<SnapshotRef>,
    /// The write switches the shard to this generation: its log and state writes go to the
    /// generation's keyspaces, which the shard reads and writes once the write is durable;
    /// then call [`Replica::persisted`] with the new state.
    pub switch: Option<u64>,
    /// A staged generation that will not be installed: drop it.
    pub discard: Option<u64>,
}

/// The write in flight: what to do once it is durable.
struct InFlight {
    number: u64,
    replies: Vec<(Token, Output)>,
    /// A follower's messages, sent only after what they acknowledge is durable.
    after: Vec<Message>,
    /// The applied index the write brings to disk.
    applied: u64,
    /// The snapshot the write installs.
    installs: Option<SnapshotRef>,
}

/// A read waiting, with the tick it arrived at.
type Waiting = (Token, u64);

/// A ReadIndex round asked and not yet answered.
struct Round {
    ctx: u64,
    reads: Vec<Waiting>,
    /// The tick it was asked at.
    asked: u64,
    /// The term this replica led when it asked, if it led: only such a round grants a lease.
    led: Option<u64>,
    /// The monotonic time it was asked at (no later than its heartbeats left): a leader's
    /// lease runs from it.
    asked_at: Duration,
}

/// A leader's lease: until `until` (monotonic) no other leader can be elected.
#[derive(Debug, Clone, Copy)]
struct Lease {
    term: u64,
    until: Duration,
}

/// Linearizable reads waiting for ReadIndex rounds.
#[derive(Default)]
struct Reads {
    next_ctx: u64,
    /// Reads not yet in a round.
    waiting: Vec<Waiting>,
    round: Option<Round>,
    /// Rounds answered (and reads served by the lease), with their index, waiting for the
    /// durable applied index to reach it.
    answered: Vec<(u64, Vec<Waiting>)>,
    /// A leader's lease, if it holds one.
    lease: Option<Lease>,
    /// Ask a round to renew the lease, even with no read waiting.
    renew: bool,
    /// The term in which this leader started a leadership transfer: no lease in it.
    transferred_in: Option<u64>,
}

impl Reads {
    fn len(&self) -> usize {
        self.waiting.len()
            + self.round.as_ref().map_or(0, |r| r.reads.len())
            + self.answered.iter().map(|a| a.1.len()).sum::<usize>()
    }
}

/// A replica's part in its Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// Asking for pre-votes: whether it could win an election, before it starts one.
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    fn of(role: StateRole) -> Role {
        match role {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        }
    }

    /// Its name in documents: `leader`, `follower`, `candidate`, `pre_candidate`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre_candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

/// A snapshot of a replica, for `/v1/cluster`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    pub role: Role,
    /// The leader's replica id, if known.
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub digest: u64,
    /// Replica ids of the voters and learners.
    pub replicas: Vec<u64>,
    /// The replica id that leads when all are well (see [`ReplicaConfig::placed_leader`]).
    pub placed_leader: u64,
    /// Replica ids of followers that need entries this log no longer holds (a leader's view).
    pub needs_snapshot: Vec<u64>,
    /// Replica ids of followers that acknowledged every entry (a leader's view).
    pub caught_up: Vec<u64>,
    pub first_index: u64,
}

pub struct Replica<S: LogSource> {
    config: ReplicaConfig,
    raw: RawNode<ShardLog<S>>,
    pub state: ShardState,
    /// Changes of the write in flight: reads through [`Replica::view`] see them first.
    pending: WriteSet,
    in_flight: Option<InFlight>,
    /// Proposals by log index, with the term they were proposed in.
    proposals: BTreeMap<u64, (u64, Token)>,
    reads: Reads,
    role: StateRole,
    /// The term this replica leads in, if it leads.
    leader_term: Option<u64>,
    ticks: u64,
    /// The shell's wall clock at the last input that brought it (it may go back: a clock
    /// stepped back is believed).
    now: Millis,
    /// The shell's monotonic clock at the last input that brought it.
    since_start: Duration,
    /// The wall clocks the other replicas' messages carried (a leader's majority time).
    peer_clocks: PeerClocks,
    /// When (monotonic) this leader last proposed a clock entry that advances the shard's
    /// clock (`None`: not since it became leader).
    last_clock: Option<Duration>,
    /// The index of the last `Backfill` this leader proposed: the next is proposed once it
    /// applied, so background work goes one bounded entry at a time, between client writes.
    backfill_at: Option<u64>,
    /// The index of the last `SeedRetention` this leader proposed.
    retention_seed_at: Option<u64>,
    /// The last clock entry applied left due work: propose the next one at the next tick.
    due_backlog: bool,
    /// The first tick at which this leader may hand leadership to the placed leader.
    lead_home_at: u64,
    /// The tick at which this replica last became leader.
    led_since: u64,
    /// Since when (in ticks) the placed leader has kept up with this leader's log.
    home_kept_up_since: Option<u64>,
    /// The applied index of the last write made durable.
    durable_applied: u64,
    /// Refuse (pre-)votes for one lease after the start: this replica may have confirmed a
    /// leader's lease before it restarted. `false` for a replica that never had a term.
    hold_votes: bool,
    /// Writes to add to the next job (the bootstrap conf state, log compaction).
    queued_ops: Vec<WriteOp>,
    /// The tick at which this replica last stopped leading, while proposals it took as
    /// leader still wait for their entries to apply.
    deposed_at: Option<u64>,
    /// Its node is shutting down ([`Replica::leave`]): it hands leadership off and never
    /// takes it (it neither campaigns nor answers a transfer), but still votes and follows.
    leaving: bool,
    /// A leader's snapshots for followers, by raft id (at most one each).
    outgoing: BTreeMap<u64, Outgoing>,
    /// When a snapshot was last prepared for each follower (ticks).
    prepared_at: BTreeMap<u64, u64>,
    /// Snapshots prepared in this life: with the life, the next one's id.
    snapshots_prepared: u64,
    /// A follower's snapshot on its way in (at most one).
    incoming: Option<Incoming>,
}

impl ReplicaConfig {
    /// raft-rs's configuration of this replica, which last applied `applied`.
    fn raft(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_ticks.0,
            min_election_tick: self.election_ticks.0,
            max_election_tick: self.election_ticks.1,
            heartbeat_tick: self.heartbeat_ticks,
            applied,
            max_size_per_msg: APPEND_BYTES_MAX,
            max_inflight_msgs: APPENDS_IN_FLIGHT_MAX,
            max_uncommitted_size: UNCOMMITTED_BYTES_MAX,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            // `batch_append` stays off: raft-rs 0.7 merges new entries into a queued append
            // whose entries are not contiguous with them (seed 71 of the simulation: an append
            // after index 41 carrying entry 41, and a follower told to commit past its log).
            ..Default::default()
        }
    }

    /// The node that hosts replica `id`, if it is one of the shard's.
    pub fn node_of(&self, id: u64) -> Option<u64> {
        self.replicas.get(&id).copied()
    }
}

impl<S: LogSource> Replica<S> {
    /// Recovers a replica from what `source` (its log) and `base` (its state) hold: the
    /// applied state is where it starts; later log entries are applied again as Raft commits
    /// them.
    pub fn recover(
        config: ReplicaConfig,
        source: S,
        base: &dyn StateRead,
    ) -> Result<Replica<S>, raft::Error> {
        let state = ShardState::load(
            config.shard,
            config.n_shards,
            base,
            config.activation_budget,
        );
        let applied = state.meta.applied_index;
        assert!(
            config.replicas.contains_key(&config.id),
            "shard {}: replica {} is not one of the shard's replicas {:?}",
            config.shard,
            config.id,
            config.replicas
        );
        let voters = config.replicas.keys().copied().collect::<Vec<_>>();
        let alone = voters.len() == 1;
        let bootstrap = ConfState::from((voters, vec![]));
        let (mut log, queued_ops) = ShardLog::recover(config.shard, source, bootstrap);
        log.raise_commit(applied);
        let raft_config = config.raft(applied);
        raft_config.validate()?;
        let logger = logging::raft_logger(config.shard);
        let mut raw = RawNode::new(&raft_config, log, &logger)?;
        let hold_votes = raw.raft.term > 0;
        if config.campaign && (alone || raw.raft.term == 0) {
            raw.campaign()?;
        }
        Ok(Replica {
            config,
            raw,
            state,
            pending: WriteSet::default(),
            in_flight: None,
            proposals: BTreeMap::new(),
            reads: Reads::default(),
            role: StateRole::Follower,
            leader_term: None,
            ticks: 0,
            now: Millis(0),
            since_start: Duration::ZERO,
            peer_clocks: PeerClocks::default(),
            last_clock: None,
            backfill_at: None,
            retention_seed_at: None,
            due_backlog: false,
            lead_home_at: 0,
            led_since: 0,
            home_kept_up_since: None,
            durable_applied: applied,
            hold_votes,
            queued_ops,
            deposed_at: None,
            leaving: false,
            outgoing: BTreeMap::new(),
            prepared_at: BTreeMap::new(),
            snapshots_prepared: 0,
            incoming: None,
        })
    }

    /// Whether this replica leads now (raft-rs's own state: it may have changed since the
    /// last Ready).
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader's raft id, if this replica knows one.
    pub fn leader(&self) -> Option<u64> {
        let leader = self.raw.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    /// The applied index of the state the storage holds durably (what readers see).
    pub fn durable_applied(&self) -> u64 {
        self.durable_applied
    }

    /// The shard's state as apply sees it: `base` with the write in flight over it.
    pub fn view<'a>(&'a self, base: &'a dyn StateRead) -> Layered<'a> {
        Layered {
            base,
            writes: &self.pending,
        }
    }

    fn not_leader(&self) -> ShardError {
        ShardError::NotLeader {
            shard: self.config.shard,
            leader: self.leader().and_then(|id| self.config.node_of(id)),
        }
    }

    /// Proposes a command; `token` (if any) gets its output once it is committed, applied and
    /// durable here, or an error. Answers whether the command was appended to the log.
    pub fn propose(&mut self, command: &Command, token: Option<Token>, fx: &mut Effects) -> bool {
        let fail = |error, fx: &mut Effects| {
            if let Some(token) = token {
                fx.replies.push((token, Err(error)));
            }
            false
        };
        if !self.is_leader() {
            return fail(self.not_leader(), fx);
        }
        if self.proposals.len() >= PROPOSALS_PENDING_MAX {
            return fail(ShardError::Overloaded(self.config.shard), fx);
        }
        if matches!(command, Command::Events(_) | Command::DefineSegment(_))
            && self.state.record.clock == Millis(0)
            && self.last_clock.is_none()
        {
            // The shard's first clock entry goes before any event or definition (see
            // `on_became_leader`): an event filed for retention at the epoch would be evicted
            // by that entry, and both would be dated by a shard time of 0.
            return fail(ShardError::Overloaded(self.config.shard), fx);
        }
        if let Some(to) = self.raw.raft.lead_transferee {
            // raft-rs drops proposals while leadership moves: the caller retries at the target.
            let leader = self.config.node_of(to);
            let shard = self.config.shard;
            return fail(ShardError::NotLeader { shard, leader }, fx);
        }
        if self.raw.propose(vec![], command.encode()).is_err() {
            // Dropped by raft-rs: over the uncommitted limit.
            return fail(ShardError::Overloaded(self.config.shard), fx);
        }
        if let Some(token) = token {
            let (index, term) = (self.raw.raft.raft_log.last_index(), self.raw.raft.term);
            if let Some((older, stale)) = self.proposals.insert(index, (term, token)) {
                // Leadership was lost and won again since the last Ready: the entry proposed
                // at this index in the older term was overwritten.
                assert!(
                    older < term,
                    "shard {}: two proposals at index {index} in term {term}",
                    self.config.shard
                );
                fx.replies
                    .push((stale, Err(ShardError::Dropped(self.config.shard))));
            }
        }
        true
    }

    /// Asks for a linearizable read: `token` is answered in `Effects::reads` once the durable
    /// state is at least as new as every write acknowledged before this call.
    pub fn read(&mut self, token: Token, now: Now, fx: &mut Effects) {
        self.observe(now);
        if self.leader().is_none() {
            return fx.reads.push((token, Err(self.not_leader())));
        }
        if self.reads.len() >= READS_PENDING_MAX {
            return fx
                .reads
                .push((token, Err(ShardError::Overloaded(self.config.shard))));
        }
        if self.lease_holds(now) {
            let index = self.raw.raft.raft_log.committed;
            match self.reads.answered.last_mut() {
                Some((last, reads)) if *last == index => reads.push((token, self.ticks)),
                _ => self.reads.answered.push((index, vec![(token, self.ticks)])),
            }
            self.serve_reads(fx);
        } else {
            self.reads.waiting.push((token, self.ticks));
        }
        self.ask_read_index();
    }

    /// How long a leader's lease lasts after the round that grants it was asked: see the
    /// module documentation.
    pub fn lease(&self) -> Duration {
        let ticks = self
            .config
            .election_ticks
            .0
            .saturating_sub(LEASE_MARGIN_TICKS) as u32;
        self.config.tick * ticks * LEASE_PERCENT / 100
    }

    /// While this replica leads with a lease: until when (its monotonic clock) and its commit
    /// index, at least every index any client was told of. A reader that finds the time not
    /// passed and the durable state at the index may serve a linearizable read without asking.
    pub fn lease_read(&self) -> Option<(Duration, u64)> {
        let lease = self.reads.lease?;
        let raft = &self.raw.raft;
        let holds = raft.state == StateRole::Leader
            && raft.term == lease.term
            && raft.lead_transferee.is_none();
        holds.then_some((lease.until, raft.raft_log.committed))
    }

    /// Whether this replica holds a lease at `now`; once half of it is gone, the next round
    /// (asked at once if none is in flight) renews it.
    fn lease_holds(&mut self, now: Now) -> bool {
        match self.lease_read() {
            Some((until, _)) if now.since_start < until => {
                if until - now.since_start < self.lease() * LEASE_RENEW_LEFT_PERCENT / 100 {
                    self.reads.renew = true;
                }
                true
            }
            _ => {
                self.reads.lease = None;
                false
            }
        }
    }

    /// A round of this replica's was confirmed: if it was asked by this leader in its term, it
    /// grants a lease from the time it was asked.
    fn grant_lease(&mut self, round: &Round) {
        let raft = &self.raw.raft;
        let term = raft.term;
        let grants = raft.state == StateRole::Leader
            && round.led == Some(term)
            && raft.lead_transferee.is_none()
            && self.reads.transferred_in != Some(term);
        if grants {
            let until = round.asked_at + self.lease();
            let until = match self.reads.lease {
                Some(lease) if lease.term == term => lease.until.max(until),
                _ => until,
            };
            self.reads.lease = Some(Lease { term, until });
        }
    }

    /// Starts a ReadIndex round for the waiting reads (or to renew the lease), if none is in
    /// flight. Never called between `ready()` and `advance_append_async` (which `advance` does
    /// back to back).
    fn ask_read_index(&mut self) {
        if self.reads.round.is_some() || (self.reads.waiting.is_empty() && !self.reads.renew) {
            return;
        }
        self.reads.renew = false;
        self.reads.next_ctx += 1;
        let ctx = self.reads.next_ctx;
        self.raw.read_index(self.read_ctx(ctx));
        let reads = std::mem::take(&mut self.reads.waiting);
        self.reads.round = Some(Round {
            ctx,
            reads,
            asked: self.ticks,
            led: self.is_leader().then_some(self.raw.raft.term),
            asked_at: self.since_start,
        });
    }

    /// Takes the shell's clocks of an input.
    fn observe(&mut self, now: Now) {
        self.now = now.wall;
        self.since_start = self.since_start.max(now.since_start);
    }

    /// A Raft message of this replica, stamped with its wall clock.
    fn stamped(&self, raft: raft::eraftpb::Message) -> Message {
        Message {
            raft,
            stamped_by: self.config.id,
            wall: self.now,
        }
    }

    /// The shard's majority time now (see [`clocks`]), as this replica knows its voters'
    /// clocks: a leader hears from each every heartbeat.
    fn majority_time(&self) -> Option<Millis> {
        let voters = self.raw.raft.prs().conf().voters().ids();
        self.peer_clocks
            .majority_time(voters.iter(), (self.config.id, self.now), self.since_start)
    }

    /// The context of ReadIndex round `n`: unique to this start of the replica (`life`), so
    /// the answer to a round asked before a restart (still pending at the leader, or late in
    /// the network) is never taken for a round asked after it.
    fn read_ctx(&self, n: u64) -> Vec<u8> {
        let mut ctx = self.config.life.to_be_bytes().to_vec();
        ctx.extend_from_slice(&n.to_be_bytes());
        ctx
    }

    /// A Raft message from a peer. A leader holding a lease answers a follower's ReadIndex
    /// request itself (as raft-rs would after a heartbeat round); a replica that started less
    /// than a lease ago refuses (pre-)votes.
    pub fn step(&mut self, message: Message, now: Now, fx: &mut Effects) {
        let Message {
            raft: message,
            stamped_by,
            wall,
        } = message;
        self.observe(now);
        if stamped_by != self.config.id && self.config.replicas.contains_key(&stamped_by) {
            self.peer_clocks.report(stamped_by, wall, self.since_start);
        }
        match message.get_msg_type() {
            MessageType::MsgTimeoutNow if self.leaving => {
                // Refused, and the leader told at once: a transfer request naming the leader
                // itself makes it give up the transfer (and the proposals it refuses while
                // one is pending) instead of waiting an election timeout.
                tracing::info!(shard = %self.config.shard, from = ?self.config.node_of(message.from),
                    "leadership transfer refused: this node is shutting down");
                // Only to the leader this replica follows, in its term: raft-rs forwards the
                // request to that leader, and one from an older leader is stale anyway.
                let raft = &self.raw.raft;
                if message.from == raft.leader_id && message.term == raft.term {
                    self.raw.transfer_leader(message.from);
                }
                return;
            }
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                if self.hold_votes && now.since_start < self.lease() =>
            {
                tracing::debug!(shard = %self.config.shard, from = message.from,
                    "vote request refused: this replica started less than a lease ago");
                return;
            }
            MessageType::MsgReadIndex
                if message.from != self.config.id && self.lease_holds(now) =>
            {
                let mut answer = raft::eraftpb::Message::default();
                answer.set_msg_type(MessageType::MsgReadIndexResp);
                answer.to = message.from;
                answer.from = self.config.id;
                answer.term = self.raw.raft.term;
                answer.index = self.raw.raft.raft_log.committed;
                answer.entries = message.entries;
                fx.messages.push(self.stamped(answer));
                self.ask_read_index();
                return;
            }
            MessageType::MsgSnapshot if self.needs_fetch(&message) => {
                return self.fetch_snapshot(message, fx);
            }
            _ => {}
        }
        if let Err(error) = self.raw.step(message) {
            tracing::debug!(shard = %self.config.shard, %error, "message not taken");
        }
    }

    /// A peer could not be reached: raft-rs probes it again instead of streaming to it.
    pub fn unreachable(&mut self, raft_id: u64) {
        self.raw.report_unreachable(raft_id);
    }

    /// One tick of the shard's timer: at most one per tick length, never early, never in a
    /// burst after a stall (leases rely on it).
    pub fn tick(&mut self, now: Now, fx: &mut Effects) {
        self.ticks += 1;
        self.observe(now);
        if self.leaving && !self.is_leader() {
            // A tick of a follower without its campaign: the election timer still runs, so
            // once the leader is silent for an election timeout it grants votes.
            self.raw.raft.election_elapsed += 1;
        } else {
            self.raw.tick();
        }
        self.state.activations.tick();
        self.state
            .activations
            .passivate_idle(self.config.passivate_idle_ticks.max(1));
        if self.is_leader() {
            if let Some(clock) = self.clock_due() {
                self.propose_clock(&clock, fx);
            }
        }
        self.propose_backfill(fx);
        self.propose_retention_seed(fx);
        let waited_out = self
            .deposed_at
            .is_some_and(|at| self.ticks - at >= DEPOSED_PROPOSALS_TICKS);
        if waited_out && !self.is_leader() {
            // Not applied since this replica stopped leading: their fate is unknown here.
            self.deposed_at = None;
            for (_, (_, token)) in std::mem::take(&mut self.proposals) {
                fx.replies
                    .push((token, Err(ShardError::Dropped(self.config.shard))));
            }
        }
        if self.is_leader() {
            if self.leaving {
                self.hand_off();
            } else {
                self.lead_home();
            }
            self.expire_snapshots();
            if self.in_flight.is_none() {
                self.prepare_snapshots(fx);
            }
        }
        self.expire_reads(fx);
    }

    /// Its node is shutting down: a leader hands leadership to its most up-to-date follower
    /// (raft-rs sends that one what it lacks first), again at each tick until one takes it;
    /// from now on the replica never campaigns nor takes a transfer. Answers whether it still
    /// leads.
    pub fn leave(&mut self) -> bool {
        if !self.leaving {
            tracing::info!(shard = %self.config.shard, leads = self.is_leader(), "leaving");
            self.leaving = true;
            if self.is_leader() {
                self.hand_off();
            }
        }
        self.is_leader()
    }

    fn hand_off(&mut self) {
        let raft = &self.raw.raft;
        if raft.lead_transferee.is_some() {
            return;
        }
        let me = self.config.id;
        let voters = raft.prs().conf().voters();
        let target = raft
            .prs()
            .iter()
            .filter(|(id, p)| **id != me && p.recent_active && voters.contains(**id))
            .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id);
        if let Some(to) = target {
            tracing::info!(shard = %self.config.shard, to = ?self.config.node_of(to), "handing leadership off");
            self.give_up_lease();
            self.raw.transfer_leader(to);
        }
    }

    /// Before a leadership transfer: its target campaigns at once, granted votes despite
    /// leases, so this leader holds none for the rest of its term.
    fn give_up_lease(&mut self) {
        self.reads.lease = None;
        self.reads.transferred_in = Some(self.raw.raft.term);
    }

    /// Hands leadership back to the shard's placed leader (its first replica) once that
    /// replica has kept up with the log for [`LEAD_HOME_KEPT_UP_TICKS`] (raft-rs sends it what
    /// it still lacks before its `MsgTimeoutNow`), so leaders stay spread evenly over the nodes
    /// after a failover. At most once per [`LEAD_HOME_RETRY_TICKS`]; called at every tick of a
    /// leader.
    fn lead_home(&mut self) {
        let home = self.config.placed_leader;
        if home == self.config.id {
            return;
        }
        let last = self.raw.raft.raft_log.last_index();
        let progress = self.raw.raft.prs().get(home);
        let keeps_up = progress.is_some_and(|p| last - p.matched <= LEAD_HOME_LAG_MAX);
        // raft-rs clears `recent_active` at each election timeout until the next answer: asked
        // only when handing over, not for the streak.
        let active = progress.is_some_and(|p| p.recent_active);
        self.home_kept_up_since = match self.home_kept_up_since {
            Some(since) if keeps_up => Some(since),
            _ if keeps_up => Some(self.ticks),
            _ => None,
        };
        let kept_up = self
            .home_kept_up_since
            .is_some_and(|since| self.ticks - since >= LEAD_HOME_KEPT_UP_TICKS);
        if kept_up && active && self.ticks >= self.lead_home_at {
            self.lead_home_at = self.ticks + LEAD_HOME_RETRY_TICKS;
            self.give_up_lease();
            self.raw.transfer_leader(home);
        }
    }

    /// The clock entry the leader should propose now, if any: one that advances the shard's
    /// clock towards the majority time, if the clock is `clock_interval` behind it and no
    /// such entry was proposed within that interval (on the monotonic clock: a wall clock
    /// stepped does not hurry it); else, if the last one applied left due work, one that
    /// continues it at the shard's clock. Reckoned from the replicated clock, so a new leader
    /// (or a restarted node) proposes one only when the shard's clock is really behind, and a
    /// shard with nothing due and no writes keeps its state, digest included, unchanged.
    fn clock_due(&self) -> Option<Command> {
        let interval = self.config.clock_interval_ms;
        let clock = self.state.record.clock;
        let interval_passed = self.last_clock.is_none_or(|at| {
            self.since_start.saturating_sub(at) >= Duration::from_millis(interval.unsigned_abs())
        });
        match self.majority_time() {
            Some(target)
                if target.0 - clock.0 >= interval
                    && interval_passed
                    && self.first_clock_ready() =>
            {
                Some(Command::Clock { target })
            }
            _ if self.due_backlog => Some(Command::Clock { target: clock }),
            _ => None,
        }
    }

    /// A shard's first clock entry goes all the way to its target (no step bounds it). The
    /// majority of a leader days behind and one follower is the leader's clock, and a shard
    /// clock set days back would take hours to catch up; so unless the clocks heard agree
    /// (within [`FIRST_CLOCK_SPREAD_MAX_MS`]: a voter not heard yet could not move the
    /// majority time further), it waits, for up to [`FIRST_CLOCK_WAIT_TICKS`] ticks after its
    /// leader took office, until every voter's clock is heard.
    fn first_clock_ready(&self) -> bool {
        if self.state.record.clock != Millis(0)
            || self.ticks - self.led_since >= FIRST_CLOCK_WAIT_TICKS
        {
            return true;
        }
        let voters = self.raw.raft.prs().conf().voters().ids();
        let (me, now) = (self.config.id, self.since_start);
        let heard: Vec<Option<Millis>> = voters
            .iter()
            .map(|id| match id == me {
                true => Some(self.now),
                false => self.peer_clocks.fresh(id, now),
            })
            .collect();
        let times = heard.iter().flatten();
        let spread = times.clone().max().zip(times.min()).map(|(a, b)| a.0 - b.0);
        heard.iter().all(Option::is_some) || spread.is_some_and(|s| s <= FIRST_CLOCK_SPREAD_MAX_MS)
    }

    /// Proposes the retention of the seed rules if the shard's rules have none (migrated from
    /// format 7), again once the last one proposed applied without giving them one.
    fn propose_retention_seed(&mut self, fx: &mut Effects) {
        let applied = self.state.meta.applied_index;
        if !self.is_leader()
            || !self.state.needs_retention()
            || self.retention_seed_at.is_some_and(|at| at > applied)
        {
            return;
        }
        let seed = self.config.seed_rules.retention;
        let seed = seed.expect("seed rules come from a validated rules document");
        if self.propose(&Command::SeedRetention(seed), None, fx) {
            self.retention_seed_at = Some(self.raw.raft.raft_log.last_index());
        }
    }

    /// Proposes the next `Backfill` entry if this leader's shard has background work and the
    /// last one it proposed has applied.
    fn propose_backfill(&mut self, fx: &mut Effects) {
        let applied = self.state.meta.applied_index;
        if !self.is_leader()
            || self.leaving
            || !self.state.has_backfill()
            || self.backfill_at.is_some_and(|at| at > applied)
        {
            return;
        }
        if self.propose(&Command::Backfill, None, fx) {
            self.backfill_at = Some(self.raw.raft.raft_log.last_index());
        }
    }

    /// Proposes a clock entry; only one that was appended counts as the interval's advancing
    /// entry (and lets events in, for a new shard) or continues the due backlog.
    fn propose_clock(&mut self, command: &Command, fx: &mut Effects) {
        if !self.propose(command, None, fx) {
            return;
        }
        self.due_backlog = false;
        if matches!(command, Command::Clock { target } if *target > self.state.record.clock) {
            self.last_clock = Some(self.since_start);
        }
    }

    /// Asks a round again if it was not answered in time; fails reads that waited too long.
    fn expire_reads(&mut self, fx: &mut Effects) {
        let (ticks, shard) = (self.ticks, self.config.shard);
        let fail = |reads: &mut Vec<Waiting>, fx: &mut Effects| {
            reads.retain(|&(token, arrived)| {
                let keep = ticks - arrived < READ_TIMEOUT_TICKS;
                if !keep {
                    fx.reads.push((token, Err(ShardError::Timeout(shard))));
                }
                keep
            });
        };
        fail(&mut self.reads.waiting, fx);
        for (_, reads) in &mut self.reads.answered {
            fail(reads, fx);
        }
        self.reads.answered.retain(|(_, reads)| !reads.is_empty());
        let late = self
            .reads
            .round
            .as_ref()
            .is_some_and(|round| ticks - round.asked >= READ_RETRY_TICKS);
        if late {
            let mut reads = self.reads.round.take().expect("a round").reads;
            fail(&mut reads, fx);
            reads.append(&mut self.reads.waiting);
            self.reads.waiting = reads;
        }
        self.ask_read_index();
    }

    /// Runs raft-rs's Ready until it hands out a write or has nothing more to do (at most
    /// [`READIES_PER_ADVANCE_MAX`] rounds of Readies with nothing to persist). `base` is the
    /// shard's stored state (apply reads it under the write it builds); `now` the shell's clocks
    /// (the wall clock for the clock entry a new leader proposes before anything else).
    pub fn advance(&mut self, base: &dyn StateRead, now: Now, fx: &mut Effects) {
        self.observe(now);
        for _ in 0..READIES_PER_ADVANCE_MAX {
            if self.in_flight.is_some() || !self.raw.has_ready() {
                return;
            }
            self.advance_once(base, fx);
        }
    }

    /// One Ready of raft-rs, in the order its async-persist contract asks (see the module
    /// documentation): leadership and read states, messages that may leave now, the apply of
    /// committed entries, then one write holding the new entries, hard state and the apply.
    fn advance_once(&mut self, base: &dyn StateRead, fx: &mut Effects) {
        let mut ready = self.raw.ready();
        let became_leader = self.observe_role(&ready, fx);
        self.take_read_states(&mut ready);
        let now = ready.take_messages().into_iter().map(|m| self.stamped(m));
        fx.messages.extend(now);
        let mut ops = std::mem::take(&mut self.queued_ops);
        let installs =
            (!ready.snapshot().is_empty()).then(|| self.install(ready.snapshot(), &mut ops, fx));
        let mut writes = WriteSet::default();
        let entries = ready.take_committed_entries();
        let (replies, applied) = self.apply_committed(entries, base, &mut writes, &mut ops, fx);
        // Proposals at or below the applied index (or the installed snapshot's) were
        // overwritten by another leader's entries.
        if let Some(applied) = installs.as_ref().map(|s| s.index).or(applied) {
            let stale: Vec<u64> = self.proposals.range(..=applied).map(|(i, _)| *i).collect();
            for index in stale {
                let (_, token) = self.proposals.remove(&index).expect("listed above");
                fx.replies
                    .push((token, Err(ShardError::Dropped(self.config.shard))));
            }
        }
        let store = self.raw.mut_store();
        store.append(ready.entries(), &mut ops);
        if let Some(hard_state) = ready.hs() {
            store.set_hard_state(hard_state.clone(), &mut ops);
        }
        let after: Vec<Message> = ready
            .take_persisted_messages()
            .into_iter()
            .map(|m| self.stamped(m))
            .collect();
        for (key, value) in &writes.changes {
            ops.push(WriteOp {
                space: crate::write::Space::State(self.config.shard),
                key: key.clone(),
                value: value.clone(),
            });
        }
        let number = ready.number();
        self.raw.advance_append_async(ready);
        if let Some(applied) = applied {
            self.raw.advance_apply_to(applied);
        }
        if ops.is_empty() {
            // Nothing to make durable (heartbeats and their answers): done at once.
            self.raw.on_persist_ready(number);
            fx.messages.extend(after);
        } else {
            self.pending = writes;
            self.in_flight = Some(InFlight {
                number,
                replies,
                after,
                applied: installs
                    .as_ref()
                    .map_or(self.state.meta.applied_index, |s| s.index),
                installs,
            });
            fx.write = Some(ops);
        }
        // Proposing (or reading) between `ready()` and `advance_append_async` would change the
        // log under the Ready; what became possible waits until here.
        if became_leader {
            self.on_became_leader(base, fx);
        }
        self.propose_backfill(fx);
        self.ask_read_index();
        self.serve_reads(fx);
    }

    /// Leadership is a (role, term): a replica may lose it and win it again between two
    /// Readies (the soft state then looks unchanged). Reads waiting on the old term fail
    /// (they are retried). Its proposals wait a while: their entries may still commit under
    /// the next leader (a transfer's target holds every one), and the apply answers each by
    /// its (term, index), whoever leads. Answers whether this replica just became leader.
    fn observe_role(&mut self, ready: &raft::Ready, fx: &mut Effects) -> bool {
        let role = ready.ss().map_or(self.role, |soft| soft.raft_state);
        let term = self.raw.raft.term;
        let leads = (role == StateRole::Leader).then_some(term);
        let mut became_leader = false;
        if leads != self.leader_term {
            if self.leader_term.is_some() {
                self.fail_reads(ShardError::Dropped(self.config.shard), fx);
                self.forget_snapshots();
                self.deposed_at = Some(self.ticks);
            }
            became_leader = leads.is_some();
            fx.role = Some((Role::of(role), term));
            self.leader_term = leads;
        }
        self.role = role;
        became_leader
    }

    /// The ReadIndex round of this replica's that the Ready answers, if any: it grants a
    /// lease, and its reads wait for the apply to reach its index.
    fn take_read_states(&mut self, ready: &mut raft::Ready) {
        for read_state in ready.take_read_states() {
            let ours = self
                .reads
                .round
                .as_ref()
                .is_some_and(|round| read_state.request_ctx == self.read_ctx(round.ctx));
            if ours {
                let round = self.reads.round.take().expect("a round");
                self.grant_lease(&round);
                if !round.reads.is_empty() {
                    self.reads.answered.push((read_state.index, round.reads));
                }
            }
        }
    }

    /// Applies committed entries into `writes` (their Raft records into `ops`): the answers
    /// to this replica's proposals among them, to give once the write is durable, and the
    /// last index applied.
    fn apply_committed(
        &mut self,
        entries: Vec<raft::eraftpb::Entry>,
        base: &dyn StateRead,
        writes: &mut WriteSet,
        ops: &mut Vec<WriteOp>,
        fx: &mut Effects,
    ) -> (Vec<(Token, Output)>, Option<u64>) {
        let mut replies = Vec::new();
        let mut applied = None;
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            let output = match entry.get_entry_type() {
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    let command = Command::decode(&entry.data).unwrap_or_else(|e| {
                        panic!(
                            "shard {}: committed entry {index} does not decode: {e}",
                            self.config.shard
                        )
                    });
                    self.state.apply(base, writes, index, term, command)
                }
                EntryType::EntryNormal => self.state.apply_empty(writes, index, term),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry, ops);
                    self.state.apply_empty(writes, index, term)
                }
            };
            applied = Some(index);
            if let Output::Clock {
                due_processed,
                backlog,
            } = output
            {
                self.due_backlog = backlog;
                fx.clocks.push(due_processed);
            }
            if let Some((proposed_in, token)) = self.proposals.remove(&index) {
                if proposed_in == term {
                    replies.push((token, output));
                } else {
                    fx.replies
                        .push((token, Err(ShardError::Dropped(self.config.shard))));
                }
            }
        }
        (replies, applied)
    }

    /// Applies a committed membership change to raft-rs and stores the new conf state with it.
    fn apply_conf_change(&mut self, entry: &raft::eraftpb::Entry, ops: &mut Vec<WriteOp>) {
        let conf_state = if entry.get_entry_type() == EntryType::EntryConfChange {
            let change = ConfChange::parse_from_bytes(&entry.data).expect("a conf change decodes");
            self.raw.apply_conf_change(&change)
        } else {
            let change =
                ConfChangeV2::parse_from_bytes(&entry.data).expect("a conf change decodes");
            self.raw.apply_conf_change(&change)
        }
        .unwrap_or_else(|e| panic!("shard {}: conf change refused: {e}", self.config.shard));
        self.raw.mut_store().set_conf_state(conf_state, ops);
    }

    /// A new leader's first proposals: the seed rules if the shard has none, and a clock entry
    /// if the shard's clock is behind. A shard that never had a clock gets one before any
    /// event, so no event is filed for retention at the epoch (the first clock entry would
    /// evict its exactly-once record at once).
    fn on_became_leader(&mut self, base: &dyn StateRead, fx: &mut Effects) {
        self.last_clock = None;
        self.backfill_at = None;
        self.retention_seed_at = None;
        self.lead_home_at = self.ticks + LEAD_HOME_AFTER_TICKS;
        self.led_since = self.ticks;
        self.home_kept_up_since = None;
        if self.view(base).get(keys::RULES).is_none() {
            let seed = Command::SeedRules(Box::new(self.config.seed_rules.clone()));
            self.propose(&seed, None, fx);
        }
        if let Some(clock) = self.clock_due() {
            self.propose_clock(&clock, fx);
        }
    }

    /// Fails every waiting read (after a leader change; reads are retried at the new leader).
    fn fail_reads(&mut self, error: ShardError, fx: &mut Effects) {
        let reads = std::mem::take(&mut self.reads);
        let all = reads
            .waiting
            .into_iter()
            .chain(reads.round.into_iter().flat_map(|r| r.reads))
            .chain(reads.answered.into_iter().flat_map(|a| a.1));
        for (token, _) in all {
            fx.reads.push((token, Err(error.clone())));
        }
        self.reads.next_ctx = reads.next_ctx;
    }

    /// The write handed out is durable: answer what waited for it, then compact the log.
    /// `base` is the shard's stored state (after a snapshot install, the new generation's).
    pub fn persisted(&mut self, base: &dyn StateRead, fx: &mut Effects) {
        let in_flight = self
            .in_flight
            .take()
            .expect("persisted answers a write in flight");
        self.raw.on_persist_ready(in_flight.number);
        self.raw.mut_store().persisted();
        self.pending = WriteSet::default();
        if let Some(snapshot) = in_flight.installs {
            // raft-rs counts a snapshot applied only once it is persisted.
            self.raw.advance_apply_to(snapshot.index);
            self.installed(base, &snapshot);
        }
        self.durable_applied = in_flight.applied;
        fx.replies
            .extend(in_flight.replies.into_iter().map(|(t, o)| (t, Ok(o))));
        fx.messages.extend(in_flight.after);
        self.compact();
        self.ask_read_index();
        self.serve_reads(fx);
        if self.is_leader() {
            self.prepare_snapshots(fx);
        }
    }

    /// Answers the reads whose round's index the durable state reached.
    fn serve_reads(&mut self, fx: &mut Effects) {
        let durable = self.durable_applied;
        self.reads.answered.retain(|(index, reads)| {
            if *index > durable {
                return true;
            }
            fx.reads
                .extend(reads.iter().map(|(token, _)| (*token, Ok(()))));
            false
        });
    }

    /// Drops applied entries no live follower needs, keeping at most `log_retain_entries` of
    /// them for followers that fall behind (those then need a snapshot).
    fn compact(&mut self) {
        let applied = self.durable_applied;
        let retain_from = applied.saturating_sub(self.config.log_retain_entries);
        let needed = if self.is_leader() {
            let me = self.config.id;
            self.raw
                .raft
                .prs()
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(_, progress)| progress.matched + 1)
                .min()
                .unwrap_or(applied)
        } else {
            retain_from
        };
        // A follower being sent a snapshot goes on from the entry after it.
        let held = self.outgoing.values().map(|o| o.snapshot.index + 1).min();
        let to = needed
            .min(applied)
            .max(retain_from)
            .min(held.unwrap_or(u64::MAX));
        if to >= self.raw.store().first() + self.config.log_compact_entries.max(1) {
            let mut ops = Vec::new();
            self.raw.mut_store().compact(to, &mut ops);
            self.queued_ops.extend(ops);
        }
    }

    pub fn status(&self) -> ReplicaStatus {
        let hard_state = self.raw.raft.hard_state();
        let conf = self.raw.store().conf_state();
        let first = self.raw.store().first();
        let (mut needs_snapshot, mut caught_up) = (Vec::new(), Vec::new());
        if self.is_leader() {
            let last = self.raw.raft.raft_log.last_index();
            for (id, progress) in self.raw.raft.prs().iter() {
                if *id == self.config.id {
                    continue;
                }
                if progress.matched + 1 < first {
                    needs_snapshot.push(*id);
                }
                if progress.matched == last {
                    caught_up.push(*id);
                }
            }
            needs_snapshot.sort_unstable();
            caught_up.sort_unstable();
        }
        ReplicaStatus {
            role: Role::of(self.role),
            leader: self.leader(),
            term: hard_state.term,
            commit_index: hard_state.commit,
            applied_index: self.state.meta.applied_index,
            digest: self.state.meta.digest,
            replicas: conf.voters.iter().chain(&conf.learners).copied().collect(),
            placed_leader: self.config.placed_leader,
            needs_snapshot,
            caught_up,
            first_index: first,
        }
    }
}

#[cfg(test)]
mod tests;
