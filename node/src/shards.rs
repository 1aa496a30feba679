//! The shards as this node reaches them: its own replicas, the leaders it knows of, and the
//! peers it forwards to. Any node answers any request: a proposal goes to the shard's leader
//! (here, or forwarded over the peer transport), a read to a replica that can serve it.
//!
//! - **Proposals** go to the replica this node believes leads (a hint from its own replica,
//!   a peer's ping, or a `NotLeader` answer), here or on a peer, and follow `NotLeader` hints.
//!   A proposal to a peer waits at most [`FORWARD_TIMEOUT`] in all: a shard with no reachable
//!   leader is answered `Timeout` (the router answers its events `unavailable`), never held
//!   behind a dead or paused leader. Every command is idempotent (events by their ids), so a
//!   proposal whose answer was lost may be sent again.
//! - **Linearizable reads** go to the shard's leader, here or forwarded, which serves them under
//!   its lease (no other leader can exist until it ends) without a quorum round; a leader
//!   without a lease, or a replica that is not the leader, first waits for a ReadIndex round
//!   (which confirms with a quorum that the state it waits for is the newest). A one-voter
//!   shard here is its own quorum and reads at once. **Stale reads** are served by any
//!   replica, this node's first, at its applied index.
//! - Peers' requests are carried out on this node's replicas only, never forwarded again.

use crate::clock::ClusterClock;
use crate::config::node_of_raft_id;
use crate::follow_up;
use crate::merges;
use crate::metrics::Metrics;
use crate::replica::actor::{
    Gate, Host, Leave, Propose, Read, ShardActor, Status, StatusReply, Step,
};
use crate::snapshots::Staged;
use crate::snapshots::{Chunk, ChunkError, Snapshots, Source, CHUNK_TIMEOUT};
use crate::storage::{Answer, Query, StateReader};
use crate::streams::reads::{LogAnswer, LogRead, PEER_CHANGES_MAX};
use crate::streams::SNAPSHOT_PAGE;
use crate::transport::tcp::{CallError, Inbound, Tcp};
use crate::transport::{Lead, Transport};
use actix::Addr;
use futures::future::BoxFuture;
use oneid_protocol::api::NotLinkedReason;
use oneid_protocol::ids::ShardId;
use oneid_protocol::num::Millis;
use oneid_replica::message::{Message, MessageKind};
use oneid_replica::snapshot::SnapshotRef;
use oneid_replica::ShardError;
use oneid_state::command::FollowUp;
use oneid_state::command::{Command, Output, REGISTRY_SHARD};
use oneid_state::merge::{MergePlan, MergeState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Longest a proposal or read forwarded to peers waits for an answer, retries included.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a node that shuts down waits for the shards it leads to take another leader
/// before it stops anyway (those then fail over, as after a crash).
pub const HAND_OFF_MAX: Duration = Duration::from_secs(3);
/// How often a node that shuts down asks its replicas whether they still lead.
const HAND_OFF_POLL: Duration = Duration::from_millis(20);
/// The wait before trying another replica when none answered as leader.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// A leader this node heard from within this long counts as known.
pub const LEADER_FRESH: Duration = Duration::from_secs(2);

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Sees every write acknowledged before it began.
    Linearizable,
    /// What one replica holds now, at its applied index.
    Stale,
}

/// What a peer asks of this node.
#[derive(Debug, Serialize, Deserialize)]
enum PeerRequest {
    Propose {
        shard: ShardId,
        command: Command,
    },
    Read {
        shard: ShardId,
        query: Query,
        consistency: Consistency,
    },
    /// The pairs of a snapshot this node holds, after a key.
    SnapshotChunk {
        snapshot: SnapshotRef,
        after: Option<Vec<u8>>,
    },
    /// The follower is done with the snapshot (`failed`: it gave it up).
    SnapshotRelease {
        snapshot: SnapshotRef,
        failed: bool,
    },
    /// A read of the shard's change log for a stream on a node that does not host it; a read
    /// of changes that finds none waits up to `wait_ms` for some (a long poll).
    Log {
        shard: ShardId,
        read: LogRead,
        wait_ms: u32,
    },
}

impl PeerRequest {
    fn shard(&self) -> ShardId {
        match self {
            PeerRequest::Propose { shard, .. }
            | PeerRequest::Read { shard, .. }
            | PeerRequest::Log { shard, .. } => *shard,
            PeerRequest::SnapshotChunk { snapshot, .. }
            | PeerRequest::SnapshotRelease { snapshot, .. } => snapshot.shard,
        }
    }
}

/// A read's answer and the applied index of the replica that served it.
pub type ReadAnswer = (Answer, u64);

#[derive(Debug, Serialize, Deserialize)]
enum PeerResponse {
    Proposed(Result<Output, ShardError>),
    Read(Result<ReadAnswer, ShardError>),
    Chunk(Result<Chunk, ChunkError>),
    Released,
    Log(Result<LogAnswer, ShardError>),
}

/// How linearizable reads were served, for `/metrics`.
#[derive(Clone, Copy)]
enum Served {
    /// By this node's leader under its lease, without asking the replica.
    Lease,
    /// After asking this node's replica (a ReadIndex round, or its lease and the apply).
    Replica,
    /// By a peer.
    Forwarded,
}

const SERVED: [(Served, &str); 3] = [
    (Served::Lease, "lease"),
    (Served::Replica, "replica"),
    (Served::Forwarded, "forwarded"),
];

/// What this node last heard of a shard's leader.
#[derive(Debug, Clone, Copy, Default)]
struct Hint {
    leader: Option<u64>,
    term: u64,
    heard: Option<Instant>,
}

pub struct Shards {
    pub me: u64,
    pub n_shards: u32,
    /// The node ids of each shard's replicas, the placed leader first.
    placement: Vec<Vec<u64>>,
    local: OnceLock<Vec<Option<Addr<ShardActor>>>>,
    hints: Vec<Mutex<Hint>>,
    gates: Vec<Mutex<Option<Gate>>>,
    reads_served: [AtomicU64; SERVED.len()],
    peers: OnceLock<Arc<Tcp>>,
    reader: StateReader,
    /// The snapshots this node holds for followers and fetches for its replicas.
    pub snapshots: Snapshots,
    /// Bumped each time a local replica made a write durable (and readable): what the
    /// segment streams' tailers wait on.
    flushed: Vec<tokio::sync::watch::Sender<u64>>,
    /// The cluster's time as this node knows it, from its peers' pings.
    pub clock: Arc<ClusterClock>,
    pub metrics: Arc<Metrics>,
}

impl Shards {
    pub fn new(
        me: u64,
        placement: Vec<Vec<u64>>,
        reader: StateReader,
        clock: ClusterClock,
        metrics: Arc<Metrics>,
    ) -> Shards {
        let n_shards = placement.len() as u32;
        Shards {
            me,
            metrics,
            clock: Arc::new(clock),
            n_shards,
            hints: (0..n_shards).map(|_| Mutex::new(Hint::default())).collect(),
            gates: (0..n_shards).map(|_| Mutex::new(None)).collect(),
            reads_served: Default::default(),
            placement,
            local: OnceLock::new(),
            peers: OnceLock::new(),
            snapshots: Snapshots::new(Arc::clone(reader.storage())),
            reader,
            flushed: (0..n_shards)
                .map(|_| tokio::sync::watch::channel(0).0)
                .collect(),
        }
    }

    /// A local replica of `shard` made a write durable.
    pub fn flushed(&self, shard: ShardId) {
        self.flushed[shard.0 as usize].send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes each time a local replica of `shard` makes a write durable.
    pub fn watch_flushed(&self, shard: ShardId) -> tokio::sync::watch::Receiver<u64> {
        self.flushed[shard.0 as usize].subscribe()
    }

    /// The actors of this node's replicas, by shard (`None` where it holds none).
    pub fn set_local(&self, actors: Vec<Option<Addr<ShardActor>>>) {
        assert_eq!(actors.len(), self.n_shards as usize);
        if self.local.set(actors).is_err() {
            unreachable!("local replicas are set once");
        }
    }

    pub fn set_peers(&self, peers: Arc<Tcp>) {
        if self.peers.set(peers).is_err() {
            unreachable!("peers are set once");
        }
    }

    pub fn peers(&self) -> Option<&Arc<Tcp>> {
        self.peers.get()
    }

    pub fn placement(&self, shard: ShardId) -> &[u64] {
        &self.placement[shard.0 as usize]
    }

    /// The node shuts down: each of its replicas of a replicated shard hands leadership to an
    /// up-to-date follower and takes none from now on. Waits until none leads, at most
    /// [`HAND_OFF_MAX`]; requests meanwhile are served or forwarded as always.
    pub async fn hand_off(&self) {
        let Some(local) = self.local.get() else {
            return;
        };
        let replicated: Vec<(ShardId, &Addr<ShardActor>)> = local
            .iter()
            .enumerate()
            .filter_map(|(shard, addr)| Some((ShardId(shard as u32), addr.as_ref()?)))
            .filter(|(shard, _)| self.placement(*shard).len() > 1)
            .collect();
        let deadline = Instant::now() + HAND_OFF_MAX;
        loop {
            let mut leading = Vec::new();
            for (shard, addr) in &replicated {
                // A replica that does not answer by the deadline counts as still leading.
                let leads = tokio::time::timeout_at(deadline.into(), addr.send(Leave)).await;
                if !matches!(leads, Ok(Ok(false))) {
                    leading.push(shard.0);
                }
            }
            if leading.is_empty() {
                tracing::info!(shards = replicated.len(), "no shard led here any more");
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    ?leading,
                    "shards still led here after the hand-off wait: they fail over"
                );
                return;
            }
            tokio::time::sleep(HAND_OFF_POLL).await;
        }
    }

    /// The node stops: waits until what peers asked of it is answered and sent (at most
    /// [`FORWARD_TIMEOUT`], past which their callers gave up anyway).
    pub async fn finish_peer_requests(&self) {
        if let Some(peers) = self.peers.get() {
            peers.drain(FORWARD_TIMEOUT).await;
        }
    }

    /// This node's replica of `shard`.
    pub fn local(&self, shard: ShardId) -> Option<&Addr<ShardActor>> {
        self.local.get()?.get(shard.0 as usize)?.as_ref()
    }

    /// What each of this node's replicas says of itself (`None`: it did not answer, as while
    /// the node stops).
    pub async fn statuses(&self) -> Vec<(ShardId, Option<StatusReply>)> {
        let locals: Vec<_> = self.locals().collect();
        let answers = futures::future::join_all(locals.iter().map(|(_, addr)| addr.send(Status)));
        let shards = locals.iter().map(|(shard, _)| *shard);
        shards
            .zip(answers.await.into_iter().map(Result::ok))
            .collect()
    }

    /// The actors of this node's replicas.
    pub fn locals(&self) -> impl Iterator<Item = (ShardId, &Addr<ShardActor>)> {
        self.local
            .get()
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().map(|a| (ShardId(i as u32), a)))
    }

    /// Raft messages of a local replica for the replicas of other nodes; answers the raft
    /// ids it could not reach.
    pub fn send_raft(&self, shard: ShardId, messages: Vec<Message>) -> Vec<u64> {
        let mut by_node: BTreeMap<u64, (Vec<Vec<u8>>, Vec<u64>)> = BTreeMap::new();
        for message in messages {
            let entry = by_node
                .entry(node_of_raft_id(message.receiver()))
                .or_default();
            entry.1.push(message.receiver());
            entry.0.push(message.encode());
        }
        let mut unreachable = Vec::new();
        for (node, (bytes, to)) in by_node {
            let sent = self
                .peers
                .get()
                .is_some_and(|peers| peers.send_raft(node, shard.0, bytes));
            if !sent {
                unreachable.extend(to);
            }
        }
        unreachable
    }

    /// What a local replica says of its leader: (leader node, term), each tick.
    pub fn observe(&self, shard: ShardId, leader: Option<u64>, term: u64) {
        let mut hint = self.hints[shard.0 as usize].lock().expect("hint lock");
        if term >= hint.term {
            *hint = Hint {
                leader,
                term,
                heard: leader.map(|_| Instant::now()),
            };
        }
    }

    /// The leader this node heard from within [`LEADER_FRESH`] (itself, or a peer that is
    /// up), if any.
    pub fn leader(&self, shard: ShardId) -> Option<u64> {
        let hint = *self.hints[shard.0 as usize].lock().expect("hint lock");
        let leader = hint.leader?;
        let fresh = hint.heard.is_some_and(|at| at.elapsed() <= LEADER_FRESH);
        let reachable = leader == self.me || self.peers.get().is_some_and(|p| p.up(leader));
        (fresh && reachable).then_some(leader)
    }

    /// Whether this node heard from a leader of `shard` (itself, or a peer that is up)
    /// within `within`.
    pub fn leader_heard_within(&self, shard: ShardId, within: Duration) -> bool {
        let hint = *self.hints[shard.0 as usize].lock().expect("hint lock");
        let reachable =
            |leader| leader == self.me || self.peers.get().is_some_and(|p| p.up(leader));
        hint.leader.is_some_and(reachable) && hint.heard.is_some_and(|at| at.elapsed() <= within)
    }

    /// Where to try next: the leader hint, else this node's replica, else the placed nodes in
    /// turn.
    fn candidate(&self, shard: ShardId, attempt: usize) -> u64 {
        if attempt == 0 {
            if let Some(leader) = self.hints[shard.0 as usize]
                .lock()
                .expect("hint lock")
                .leader
            {
                return leader;
            }
            if self.local(shard).is_some() {
                return self.me;
            }
        }
        let placed = self.placement(shard);
        placed[attempt % placed.len()]
    }

    fn heard(&self, shard: ShardId, error: &ShardError) {
        if let ShardError::NotLeader {
            leader: Some(leader),
            ..
        } = error
        {
            let mut hint = self.hints[shard.0 as usize].lock().expect("hint lock");
            hint.leader = Some(*leader);
            hint.heard = Some(Instant::now());
        }
    }

    /// Prometheus text: each local replica's term, and whether this node leads it.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        crate::metrics::family(
            out,
            "oneid_raft_term",
            "gauge",
            "The Raft term of each shard, as this node last heard it.",
        );
        for (i, hint) in self.hints.iter().enumerate() {
            let term = hint.lock().expect("hint lock").term;
            let _ = writeln!(out, "oneid_raft_term{{shard=\"{i}\"}} {term}");
        }
        crate::metrics::family(
            out,
            "oneid_raft_leader",
            "gauge",
            "1 for each shard this node leads.",
        );
        for (i, hint) in self.hints.iter().enumerate() {
            let leads = hint.lock().expect("hint lock").leader == Some(self.me);
            let _ = writeln!(
                out,
                "oneid_raft_leader{{shard=\"{i}\"}} {}",
                u8::from(leads)
            );
        }
        crate::metrics::family(
            out,
            "oneid_linearizable_reads_total",
            "counter",
            "Linearizable reads this node took, by how: under its leader's lease, after asking its replica, or forwarded.",
        );
        for (served, label) in SERVED {
            let n = self.reads_served[served as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "oneid_linearizable_reads_total{{served=\"{label}\"}} {n}"
            );
        }
    }

    /// Proposes `command` at `shard`'s leader, wherever it is; answers once it is committed,
    /// applied and durable there.
    pub async fn propose(&self, shard: ShardId, command: Command) -> Result<Output, ShardError> {
        self.at_leader(shard, retryable, |target, deadline| {
            self.propose_at(target, shard, command.clone(), deadline)
        })
        .await
    }

    async fn propose_at(
        &self,
        target: u64,
        shard: ShardId,
        command: Command,
        deadline: Instant,
    ) -> Result<Output, ShardError> {
        if target == self.me {
            return self.propose_here(shard, command, deadline).await;
        }
        match self
            .call(target, &PeerRequest::Propose { shard, command }, deadline)
            .await?
        {
            PeerResponse::Proposed(result) => result,
            other => panic!("a proposal answered {other:?}"),
        }
    }

    /// Proposes at this node's replica (no forwarding); one still in its mailbox at
    /// `deadline` (its caller gave up) is not proposed.
    async fn propose_here(
        &self,
        shard: ShardId,
        command: Command,
        deadline: Instant,
    ) -> Result<Output, ShardError> {
        let Some(addr) = self.local(shard) else {
            return Err(ShardError::Stopped(shard));
        };
        addr.send(Propose { command, deadline })
            .await
            .unwrap_or(Err(ShardError::Stopped(shard)))
    }

    /// Reads `query` of `shard`'s state, as fresh as `consistency` asks. A stale read is served
    /// by this node's replica if it has one. A linearizable read goes to the leader, here or
    /// on a peer, which serves it under its lease without a ReadIndex round (a round trip to
    /// the leader it would cost here anyway); failing that, to this node's replica (a ReadIndex
    /// round through whichever leader it knows), then to the others.
    pub async fn read(
        &self,
        shard: ShardId,
        query: Query,
        consistency: Consistency,
    ) -> Result<ReadAnswer, ShardError> {
        if consistency == Consistency::Stale && self.local(shard).is_some() {
            return self.read_here(shard, query, consistency).await;
        }
        // A read changes nothing: any failure a new attempt may cure is retried.
        let retry = |error: &ShardError| {
            retryable(error) || matches!(error, ShardError::Timeout(_) | ShardError::Dropped(_))
        };
        self.at_leader(shard, retry, |target, deadline| {
            self.read_at(target, shard, query.clone(), consistency, deadline)
        })
        .await
    }

    async fn read_at(
        &self,
        target: u64,
        shard: ShardId,
        query: Query,
        consistency: Consistency,
        deadline: Instant,
    ) -> Result<ReadAnswer, ShardError> {
        if target == self.me {
            return self.read_here(shard, query, consistency).await;
        }
        self.reads_served[Served::Forwarded as usize].fetch_add(1, Ordering::Relaxed);
        let request = PeerRequest::Read {
            shard,
            query,
            consistency,
        };
        match self.call(target, &request, deadline).await? {
            PeerResponse::Read(result) => result,
            other => panic!("a read answered {other:?}"),
        }
    }

    /// Tries `attempt` at the node that leads `shard` as this node knows it, else at this
    /// node's replica, else at the placed replicas in turn, following `NotLeader` hints, while
    /// `retry` says another attempt may cure the error: at most [`FORWARD_TIMEOUT`] in all,
    /// so a shard with no reachable leader is answered, never held behind a dead or paused one.
    async fn at_leader<T, Fut: Future<Output = Result<T, ShardError>>>(
        &self,
        shard: ShardId,
        retry: impl Fn(&ShardError) -> bool,
        mut attempt: impl FnMut(u64, Instant) -> Fut,
    ) -> Result<T, ShardError> {
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        let (mut n, mut hinted) = (0, None);
        loop {
            let target = hinted.take().unwrap_or_else(|| self.candidate(shard, n));
            match attempt(target, deadline).await {
                Err(error) if retry(&error) && Instant::now() + RETRY_PAUSE < deadline => {
                    self.heard(shard, &error);
                    // A hint is followed at once, but not from one hint to the next (two
                    // replicas naming each other during an election or a transfer).
                    let hint = match error {
                        ShardError::NotLeader { leader, .. } => leader,
                        _ => None,
                    };
                    if n > 0 || hint.is_none() {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    hinted = hint;
                    n += 1;
                }
                other => return other,
            }
        }
    }

    /// Reads at this node's replica (no forwarding). A linearizable read is served at once by
    /// a leader whose lease holds and whose durable state is at its commit index (see
    /// [`Gate`]) or by the shard's only voter (its own quorum: every acknowledged write is
    /// already in its storage); else it first waits for the replica (a ReadIndex round, or its
    /// lease, then the apply catching up).
    async fn read_here(
        &self,
        shard: ShardId,
        query: Query,
        consistency: Consistency,
    ) -> Result<ReadAnswer, ShardError> {
        let Some(addr) = self.local(shard) else {
            return Err(ShardError::Stopped(shard));
        };
        // A query reads only its request's shard (a peer's could name another, which this
        // node may not host).
        if let Some(other) = query.other_shard(shard, self.n_shards) {
            return Err(ShardError::Stopped(other));
        }
        let alone = self.placement(shard) == [self.me];
        if consistency == Consistency::Linearizable && !alone {
            if self.gate_open(shard) {
                self.reads_served[Served::Lease as usize].fetch_add(1, Ordering::Relaxed);
            } else {
                self.reads_served[Served::Replica as usize].fetch_add(1, Ordering::Relaxed);
                addr.send(Read)
                    .await
                    .unwrap_or(Err(ShardError::Stopped(shard)))?;
            }
        }
        self.reader
            .run(move |reader| {
                let applied = reader.applied_index(shard);
                Ok((reader.answer(&query)?, applied))
            })
            .await
    }

    /// What a local replica says of its lease, after each of its steps and before anything
    /// it answers leaves.
    pub fn publish_gate(&self, shard: ShardId, gate: Option<Gate>) {
        *self.gates[shard.0 as usize].lock().expect("gate lock") = gate;
    }

    fn gate_open(&self, shard: ShardId) -> bool {
        let gate = *self.gates[shard.0 as usize].lock().expect("gate lock");
        gate.is_some_and(|g| Instant::now() < g.until && g.durable >= g.commit)
    }

    /// Reads `shard`'s change log at a replica on another node (this node hosts none): the
    /// leader first (its log is the freshest: a replica that restarted may be far behind it
    /// for a while), then the placed replicas that are up, in placement order, then the
    /// others; a read of changes may wait up to `wait` for some. The first answer, or the
    /// last error.
    pub async fn read_log_remote(
        &self,
        shard: ShardId,
        read: LogRead,
        wait: Duration,
    ) -> Result<LogAnswer, ShardError> {
        let up = |node: u64| self.peers.get().is_some_and(|p| p.up(node));
        let leader = self.hints[shard.0 as usize]
            .lock()
            .expect("hint lock")
            .leader
            .filter(|l| *l != self.me && up(*l));
        let placed = self
            .placement(shard)
            .iter()
            .copied()
            .filter(|n| *n != self.me && Some(*n) != leader);
        let (up_ones, down): (Vec<u64>, Vec<u64>) = placed.partition(|n| up(*n));
        let order: Vec<u64> = leader.into_iter().chain(up_ones).chain(down).collect();
        let request = PeerRequest::Log {
            shard,
            read,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        let mut last = ShardError::Stopped(shard);
        for node in order {
            let deadline = Instant::now() + wait + FORWARD_TIMEOUT;
            match self.call(node, &request, deadline).await {
                Ok(PeerResponse::Log(Ok(answer))) => return Ok(answer),
                Ok(PeerResponse::Log(Err(error))) | Err(error) => last = error,
                Ok(other) => panic!("a log read answered {other:?}"),
            }
        }
        Err(last)
    }

    /// Serves a peer's read of this node's replica's change log; a read of changes that finds
    /// none waits up to `wait` for the replica's next durable write, then reads again.
    async fn serve_log(
        &self,
        shard: ShardId,
        read: LogRead,
        wait: Duration,
    ) -> Result<LogAnswer, ShardError> {
        if self.local(shard).is_none() {
            return Err(ShardError::Stopped(shard));
        }
        // What a peer may ask is bounded here, whatever it asks.
        let read = match read {
            LogRead::Changes { after, max } => LogRead::Changes {
                after,
                max: max.min(PEER_CHANGES_MAX),
            },
            LogRead::MembersAt {
                segment,
                after,
                limit,
            } => LogRead::MembersAt {
                segment,
                after,
                limit: limit.min(SNAPSHOT_PAGE),
            },
            LogRead::Bounds => LogRead::Bounds,
        };
        // Subscribed before the first read: a write that lands after it wakes the wait.
        let mut flushed = self.watch_flushed(shard);
        let reading = read.clone();
        let answer = self.reader.run(move |r| r.log_read(shard, &reading)).await;
        if answer != LogAnswer::Changes(Vec::new()) || wait.is_zero() {
            return Ok(answer);
        }
        let _ = tokio::time::timeout(wait, flushed.changed()).await;
        Ok(self.reader.run(move |r| r.log_read(shard, &read)).await)
    }

    async fn call(
        &self,
        to: u64,
        request: &PeerRequest,
        deadline: Instant,
    ) -> Result<PeerResponse, ShardError> {
        let shard = request.shard();
        let Some(peers) = self.peers.get() else {
            return Err(ShardError::Stopped(shard));
        };
        let body = postcard::to_stdvec(request).expect("requests encode");
        let timeout = deadline.saturating_duration_since(Instant::now());
        match peers.call(to, body, timeout).await {
            Ok(body) => postcard::from_bytes(&body).map_err(|_| ShardError::Timeout(shard)),
            Err(CallError::Unreachable(_)) => Err(ShardError::NotLeader {
                shard,
                leader: None,
            }),
            Err(CallError::Timeout(_)) => Err(ShardError::Timeout(shard)),
            Err(CallError::Busy(_)) => Err(ShardError::Overloaded(shard)),
        }
    }
}

/// Whether another replica, or the same later, may answer what this one did not.
fn retryable(error: &ShardError) -> bool {
    matches!(error, ShardError::NotLeader { .. } | ShardError::Stopped(_))
}

/// Runs one future per shard, all at once, and collects their answers by shard.
pub async fn per_shard<K: Ord, T, F: Future<Output = T>>(
    calls: impl IntoIterator<Item = (K, F)>,
) -> BTreeMap<K, T> {
    let (shards, futures): (Vec<K>, Vec<F>) = calls.into_iter().unzip();
    shards
        .into_iter()
        .zip(futures::future::join_all(futures).await)
        .collect()
}

/// Whether node `from` may send `message` to this node's (`me`) replica of `shard`: a peer
/// speaks only for its own replicas, to this node's, except for what raft-rs forwards on
/// another replica's behalf: a ReadIndex request a follower passes on to the leader it knows,
/// and a transfer request naming the receiving replica itself (a replica that refuses a
/// transfer because it is leaving sends one, which makes the leader give its transfer up; see
/// `Replica::step`). Whatever it forwards, the wall clock it stamps is its own replica's.
pub fn peer_may_send(from: u64, me: u64, shard: u32, message: &Message) -> bool {
    let (sender, receiver) = (message.sender(), message.receiver());
    let of_shard = |id: u64| crate::config::shard_of_raft_id(id) == ShardId(shard);
    let stamped_by = message.stamped_by();
    let ours = node_of_raft_id(receiver) == me
        && of_shard(receiver)
        && node_of_raft_id(stamped_by) == from
        && of_shard(stamped_by);
    let forwarded = match message.kind() {
        MessageKind::ReadIndex => of_shard(sender),
        MessageKind::TransferLeader => sender == receiver,
        _ => false,
    };
    ours && (node_of_raft_id(sender) == from || forwarded)
}

/// Whether a peer may forward `command` to this node's leader: what clients, the follow-up and
/// merge sweeps and the rules and segment routes propose; never what a leader proposes on its own
/// (clock entries, seeds, backfills; legacy commands are never proposed at all).
/// Definitions go to the registry shard only (applying one elsewhere would stop the shard).
fn forwardable(shard: ShardId, command: &Command) -> bool {
    let registry = shard.0 == REGISTRY_SHARD;
    match command {
        Command::DefineRules(_) | Command::DefineSegment(_) => registry,
        Command::Events(_)
        | Command::Bind(_)
        | Command::Unbind(_)
        | Command::FinishFollowUps(_)
        | Command::SetRules(_)
        | Command::InstallRules { .. }
        | Command::InstallSegment(_)
        | Command::Merge(_) => true,
        // Named one by one: a new command is forwardable only once someone says so.
        Command::Clock { .. }
        | Command::SeedRules(_)
        | Command::Backfill
        | Command::SeedRetention(_)
        | Command::LegacyClock { .. }
        | Command::LegacyEvents(_)
        | Command::LegacyDefineSegment(..)
        | Command::LegacyEvents9(_)
        | Command::LegacyEvents10(_)
        | Command::LegacyEvents12(_)
        | Command::LegacyMerge12(_) => false,
    }
}

/// A snapshot's holder, reached over the peer transport.
pub struct PeerSource(pub Arc<Shards>);

impl Source for PeerSource {
    async fn chunk(&self, snapshot: &SnapshotRef, after: Option<Vec<u8>>) -> anyhow::Result<Chunk> {
        let request = PeerRequest::SnapshotChunk {
            snapshot: snapshot.clone(),
            after,
        };
        let deadline = Instant::now() + CHUNK_TIMEOUT;
        match self.0.call(snapshot.node, &request, deadline).await {
            Ok(PeerResponse::Chunk(chunk)) => Ok(chunk?),
            Ok(other) => anyhow::bail!("a chunk answered {other:?}"),
            Err(error) => Err(error.into()),
        }
    }

    fn release(&self, snapshot: &SnapshotRef, failed: bool) {
        let (shards, holder) = (Arc::clone(&self.0), snapshot.node);
        let request = PeerRequest::SnapshotRelease {
            snapshot: snapshot.clone(),
            failed,
        };
        tokio::spawn(async move {
            let deadline = Instant::now() + FORWARD_TIMEOUT;
            let _ = shards.call(holder, &request, deadline).await;
        });
    }
}

/// What peers send this node, carried out on its own replicas.
pub struct FromPeers(pub Arc<Shards>);

impl Inbound for FromPeers {
    fn raft(&self, from: u64, shard: u32, messages: Vec<Vec<u8>>) {
        let shards = &self.0;
        let Some(addr) = shards.local(ShardId(shard)) else {
            return;
        };
        let mut decoded = Vec::with_capacity(messages.len());
        for bytes in messages {
            match Message::decode(&bytes) {
                Ok(m) if peer_may_send(from, shards.me, shard, &m) => decoded.push(m),
                _ => tracing::warn!(
                    peer = from,
                    shard,
                    "a raft message that is not the peer's to send; dropped"
                ),
            }
        }
        // A full mailbox drops them: raft-rs sends again.
        let _ = addr.try_send(Step(decoded));
    }

    fn request(
        &self,
        from: u64,
        body: Vec<u8>,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        let shards = Arc::clone(&self.0);
        Box::pin(async move {
            let response = match postcard::from_bytes::<PeerRequest>(&body) {
                Ok(PeerRequest::Propose { shard, command }) if !forwardable(shard, &command) => {
                    // Clock entries, seeds, backfills and legacy commands come from a shard's
                    // own leader only: no peer moves a shard's time or retention.
                    tracing::warn!(peer = from, %shard, "a peer proposed a command only a leader makes; refused");
                    PeerResponse::Proposed(Err(ShardError::Stopped(shard)))
                }
                Ok(PeerRequest::Propose { shard, command }) => {
                    PeerResponse::Proposed(shards.propose_here(shard, command, deadline).await)
                }
                Ok(PeerRequest::Read {
                    shard,
                    query,
                    consistency,
                }) => PeerResponse::Read(shards.read_here(shard, query, consistency).await),
                Ok(PeerRequest::SnapshotChunk { snapshot, after }) => {
                    let holder = Arc::clone(&shards);
                    let chunk = shards
                        .reader
                        .run(move |_| holder.snapshots.chunk(&snapshot, after))
                        .await;
                    PeerResponse::Chunk(chunk)
                }
                Ok(PeerRequest::SnapshotRelease { snapshot, failed }) => {
                    shards.snapshots.release(&snapshot, failed);
                    PeerResponse::Released
                }
                Ok(PeerRequest::Log {
                    shard,
                    read,
                    wait_ms,
                }) => {
                    let wait = Duration::from_millis(u64::from(wait_ms));
                    PeerResponse::Log(shards.serve_log(shard, read, wait).await)
                }
                Err(_) => PeerResponse::Read(Err(ShardError::Stopped(ShardId(0)))),
            };
            postcard::to_stdvec(&response).expect("responses encode")
        })
    }

    /// With each shard led here, the binding epoch its replica applied (which this node's
    /// own cache of bindings follows too).
    fn leads(&self) -> Vec<Lead> {
        let shards = &self.0;
        let led: Vec<(u32, u64)> = shards
            .hints
            .iter()
            .enumerate()
            .filter_map(|(i, hint)| {
                let hint = hint.lock().expect("hint lock");
                (hint.leader == Some(shards.me)).then_some((i as u32, hint.term))
            })
            .collect();
        led.into_iter()
            .map(|(shard, term)| {
                let binding_epoch = shards.reader.replica_binding_epoch(ShardId(shard));
                shards
                    .reader
                    .note_binding_epoch(ShardId(shard), binding_epoch);
                Lead {
                    shard,
                    term,
                    binding_epoch,
                }
            })
            .collect()
    }

    fn ping(&self, from: u64, leads: Vec<Lead>, wall: Millis) {
        self.0.clock.report(from, wall);
        for lead in leads {
            if lead.shard < self.0.n_shards {
                let shard = ShardId(lead.shard);
                self.0.observe(shard, Some(from), lead.term);
                self.0.reader.note_binding_epoch(shard, lead.binding_epoch);
            }
        }
    }
}

/// The shard actors' view of their node: the routing table carries out what they need of it.
impl Host for Shards {
    fn send_raft(&self, shard: ShardId, messages: Vec<Message>) -> Vec<u64> {
        Shards::send_raft(self, shard, messages)
    }

    fn publish_gate(&self, shard: ShardId, gate: Option<Gate>) {
        Shards::publish_gate(self, shard, gate);
    }

    fn observe(&self, shard: ShardId, leader: Option<u64>, term: u64) {
        Shards::observe(self, shard, leader, term);
    }

    fn flushed(&self, shard: ShardId) {
        Shards::flushed(self, shard);
    }

    fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    fn fetch_snapshot(
        self: Arc<Self>,
        snapshot: SnapshotRef,
    ) -> BoxFuture<'static, Option<Staged>> {
        Box::pin(async move {
            let source = PeerSource(Arc::clone(&self));
            self.snapshots.fetch(&source, &snapshot).await.ok()
        })
    }

    fn drive_follow_ups(self: Arc<Self>, follow_ups: Vec<FollowUp>) -> BoxFuture<'static, usize> {
        Box::pin(async move {
            let report = follow_up::drive(&self, follow_ups, 1).await;
            // Binds another profile won call for merges (refused where the kind does not
            // merge: then the identity is `taken`).
            for plan in merges::taken_plans(&report) {
                let merged = merges::drive_to_end(&self, plan).await;
                if merged.is_none_or(|r| matches!(r.state, MergeState::Refused(..))) {
                    self.metrics.count_not_linked(&NotLinkedReason::Taken, 1);
                }
            }
            report.finished
        })
    }

    fn drive_merges(self: Arc<Self>, plans: Vec<MergePlan>) -> BoxFuture<'static, usize> {
        Box::pin(async move {
            let mut ended = 0;
            for plan in plans {
                let merge = plan.merge;
                if let Some(record) = merges::drive_to_end(&self, plan).await {
                    tracing::info!(%merge, survivor = %record.survivor, "merge carried on to its end");
                    ended += 1;
                }
            }
            ended
        })
    }
}
