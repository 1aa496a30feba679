//! One simulated cluster, run from a seed: nodes hosting replica cores, in-memory disks that
//! lose what was not fsynced when a node crashes, a network that delays, reorders, duplicates
//! and drops messages and can be partitioned, and clients that earn points and read balances
//! through any node. Everything happens in one thread, in the order of one event queue; the
//! only randomness is the seeded generator, so a seed replays exactly.

mod clocks;
mod merges;
mod rules;
mod segments;
mod transfer;

use super::check::{self, Op};
use crate::config::node_of_raft_id;
use crate::transport::Transport;
use oneid_protocol::event::Event;
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::num::Millis;
use oneid_protocol::rules::Rules;
use oneid_replica::log::LogSource;
use oneid_replica::message::Message;
use oneid_replica::write::{Space, WriteOp};
use oneid_replica::{Effects, Now, Replica, ReplicaConfig, ShardError, Token};
use oneid_replica::{ReplicaStatus, Role};
use oneid_state::command::{Command, EventOutcome, Output, Routed, Target};
use oneid_state::store::MemState;
use oneid_state::{decode, keys, LedgerKind, LedgerRecord};
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Duration;

/// The wall clock of the simulation at its start: 2026-01-01T00:00:00Z.
const EPOCH_MS: i64 = 1_767_225_600_000;
/// A node's tick, with up to this much jitter either way, drawn per tick.
const TICK_MS: u64 = 100;
const TICK_JITTER_MS: u64 = 20;
/// How long faults are injected; then the cluster heals and must settle.
const FAULTY_MS: u64 = 20_000;
/// How long a healed cluster may take to settle.
const SETTLE_MS: u64 = 60_000;
/// How long a client waits for one attempt, and for one operation in all.
const ATTEMPT_MS: u64 = 500;
const OPERATION_MS: u64 = 4_000;

/// A node's disk: what is durable. Writes land when their fsync completes (the writer's batch
/// is atomic), so a crash loses exactly the writes whose fsync had not completed.
#[derive(Default)]
pub(super) struct Disk {
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
    logs: BTreeMap<ShardId, BTreeMap<u64, Vec<u8>>>,
    pub(super) states: BTreeMap<ShardId, MemState>,
    /// Snapshots' states staged in new generations, by (shard, generation): what a node's
    /// staged keyspaces hold. Dropped when the node opens (never switched to).
    staged: BTreeMap<(ShardId, u64), MemState>,
}

impl Disk {
    pub(super) fn commit(&mut self, ops: Vec<WriteOp>) {
        for op in ops {
            match op.space {
                Space::Meta => put(&mut self.meta, op.key, op.value),
                Space::Log(shard) => {
                    let index = u64::from_be_bytes(op.key.try_into().expect("log keys"));
                    put(self.logs.entry(shard).or_default(), index, op.value);
                }
                Space::State(shard) => put(
                    &mut self.states.entry(shard).or_default().0,
                    op.key,
                    op.value,
                ),
            }
        }
    }

    /// Whether it holds an initialized cluster (a replica wrote its hard state).
    fn initialized(&self) -> bool {
        self.meta.keys().any(|k| k.starts_with(b"hs/"))
    }

    /// The write that recorded `generation` for `shard` landed: its staged state is the
    /// shard's, and its log starts empty (as the node's keyspaces of that generation).
    fn switch(&mut self, shard: ShardId, generation: u64) {
        let staged = self
            .staged
            .remove(&(shard, generation))
            .expect("a switch to a staged generation");
        self.states.insert(shard, staged);
        self.logs.insert(shard, BTreeMap::new());
    }
}

fn put<K: Ord>(map: &mut BTreeMap<K, Vec<u8>>, key: K, value: Option<Vec<u8>>) {
    match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
}

/// One shard's log on a simulated disk.
pub(super) struct SimLog {
    pub(super) disk: Rc<RefCell<Disk>>,
    pub(super) shard: ShardId,
}

impl LogSource for SimLog {
    fn entry(&self, index: u64) -> Option<Vec<u8>> {
        self.disk
            .borrow()
            .logs
            .get(&self.shard)?
            .get(&index)
            .cloned()
    }

    fn last_stored(&self) -> Option<u64> {
        let disk = self.disk.borrow();
        disk.logs.get(&self.shard)?.keys().next_back().copied()
    }

    fn meta(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.disk.borrow().meta.get(key).cloned()
    }
}

struct Node {
    up: bool,
    /// Paused (as by SIGSTOP) until then: nothing it would do happens before.
    paused_until: u64,
    /// Its wall clock, off the simulation's.
    clock: clocks::WallClock,
    /// Changes at every crash: what was scheduled for an earlier life is dropped.
    life: u64,
    /// When this life began.
    started_at: u64,
    /// Its replicas were told to leave: it stops soon, and restarts.
    leaving: bool,
    disk: Rc<RefCell<Disk>>,
    replicas: BTreeMap<ShardId, Replica<SimLog>>,
    /// Snapshots held for followers, by (shard, id), in memory (gone at a crash).
    held: BTreeMap<(ShardId, u64), transfer::Held>,
    /// Snapshots being fetched, by shard.
    fetches: BTreeMap<ShardId, transfer::Fetch>,
    /// The generation the next staging takes.
    next_generation: u64,
    /// Shards whose install write is in flight: false until it lands, then true until the
    /// replica hears it did.
    installing: BTreeMap<ShardId, bool>,
    /// Its node identity (see `transport::handshake`): a wiped disk gets a new one.
    identity: [u8; 16],
    /// Its disk was wiped and its restart refused: it never runs again.
    gone: bool,
}

enum Happening {
    Tick {
        node: usize,
        life: u64,
    },
    /// A Raft message (protobuf) from node `from` reaches a node.
    Deliver {
        node: usize,
        from: usize,
        message: Vec<u8>,
    },
    Fsync {
        node: usize,
        life: u64,
        ops: Vec<WriteOp>,
        shard: ShardId,
        /// The write switches the shard to this generation.
        switch: Option<u64>,
    },
    Persisted {
        node: usize,
        life: u64,
        shard: ShardId,
    },
    Crash {
        node: usize,
    },
    /// A graceful stop: the node's replicas hand leadership off, then it stops (a crash a
    /// moment later) and restarts.
    Leave {
        node: usize,
    },
    /// The end of a graceful stop, in the life the node left in.
    Stop {
        node: usize,
        life: u64,
    },
    Restart {
        node: usize,
    },
    /// The node crashes and its disk is wiped; it is started again on the empty disk.
    Wipe {
        node: usize,
    },
    Pause {
        node: usize,
    },
    /// The node's wall clock is stepped (see `world/clocks.rs`).
    ClockStep {
        node: usize,
    },
    /// A client sends the bulk of tagged profiles (`world/segments.rs`), again each time.
    BulkTags,
    /// In bulk runs, a client defines a segment once shard 0 has a due backlog, or looks again
    /// later (`world/segments.rs`).
    DefineDuringBacklog {
        looks: u32,
    },
    /// The nodes split into two groups that cannot talk.
    Partition,
    /// One link cut.
    CutLink,
    Heal,
    Client {
        client: usize,
    },
    AttemptTimeout {
        client: usize,
        attempt: u64,
    },
    /// A snapshot transfer's message reaches its node.
    Transfer(transfer::Transfer),
    /// The merger takes a pair one proposal further (`world/merges.rs`).
    MergeStep {
        pair: usize,
    },
    MergeTimeout {
        pair: usize,
        attempt: Token,
    },
}

/// What a client does: earn on a profile, or read its balance.
#[derive(Debug, Clone)]
enum Kind {
    Earn { event: String, points: u64 },
    Read,
}

/// A client's operation in progress.
struct Operation {
    profile: usize,
    kind: Kind,
    invoked: u64,
    /// The token of the current attempt (unique in the run): an answer to an earlier attempt,
    /// of this operation or an earlier one, is ignored.
    attempt: Token,
}

struct Client {
    current: Option<Operation>,
    done: usize,
}

/// What the seed chose.
#[derive(Debug)]
struct Shape {
    nodes: usize,
    shards: u32,
    replication: usize,
    profiles: usize,
    clients: usize,
    ops_per_client: usize,
    drop_percent: u64,
    duplicate_percent: u64,
    faults: bool,
    /// One run in ten: 1,100 profiles of shard 0 get a tag expiring at one instant, a due
    /// backlog larger than one clock entry's budget (see `world/segments.rs`).
    bulk_tags: bool,
    /// Low values make followers that were down or cut off need snapshots.
    log_retain_entries: u64,
    log_compact_entries: u64,
    /// Pairs per snapshot chunk: few, so that a transfer takes many round trips for faults to
    /// fall between; one in a quarter of the runs (but the bulk's), so slow that the log or the leadership
    /// often moves on before it ends (and the staged snapshot is no longer needed).
    chunk_pairs: usize,
}

/// The simulation's transport: what a replica sends is queued here, encoded as the TCP
/// transport's would be, and the world's network carries it (with its delays, drops and
/// partitions).
#[derive(Default)]
struct MemTransport(Mutex<Vec<Sent>>);

/// Messages sent: to which node, of which shard, encoded.
type Sent = (u64, u32, Vec<Vec<u8>>);

impl Transport for MemTransport {
    fn send_raft(&self, to: u64, shard: u32, messages: Vec<Vec<u8>>) -> bool {
        self.0
            .lock()
            .expect("transport lock")
            .push((to, shard, messages));
        true
    }
}

pub struct World {
    rng: fastrand::Rng,
    transport: MemTransport,
    shape: Shape,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Happening>,
    nodes: Vec<Node>,
    /// The links cut (by a partition into two groups, or one link alone: its two nodes cannot
    /// talk, while a third may talk to both), each as (lower node, higher node).
    cut: BTreeSet<(usize, usize)>,
    faulty: bool,
    clients: Vec<Client>,
    /// Tokens this world handed out, to the client operation they stand for.
    tokens: BTreeMap<(usize, Token), (usize, u64)>,
    next_token: Token,
    /// Per shard, the rules version clients judge their events by: what the shard last
    /// answered `StaleRules` with (as a router reads the rules again).
    rules_seen: BTreeMap<ShardId, u64>,
    history: Vec<Vec<Op>>,
    /// The leader of each (shard, term) seen.
    leaders: BTreeMap<(ShardId, u64), u64>,
    /// The digest of each (shard, applied index) some replica made durable.
    digests: BTreeMap<(ShardId, u64), u64>,
    /// Earn events acknowledged to their client.
    acknowledged: Vec<(usize, String)>,
    next_event: u64,
    /// The version of the last segment definition a client installed.
    segment_version: u64,
    /// Every rules version the registry was seen to order, with its rules (`world/rules.rs`).
    rules_ordered: BTreeMap<u64, Rules>,
    /// The registry's newest version when the settled cluster was sent a late install of an
    /// older one (`None`: not yet).
    late_install: Option<u64>,
    /// Snapshots installed (their switch landed on a disk).
    installs: usize,
    /// How often each of [`FAULTS_MET`] happened (see [`Summary::coverage`]).
    coverage: BTreeMap<&'static str, usize>,
    /// Each node's identity at the start, which its peers record.
    first_identities: Vec<[u8; 16]>,
    /// The pairs of customers the merger merges (`world/merges.rs`).
    pairs: Vec<merges::Pair>,
    /// Tokens of the merger's proposals, to their pair.
    merge_tokens: BTreeMap<(usize, Token), usize>,
    /// The merger's own draws (seeded from the seed), so that the rest of a run draws what it
    /// drew before merges ran in it.
    merge_rng: fastrand::Rng,
}

/// The rare faults that runs over 200 seeds or more must meet: a segment check that found
/// members (so the check is not vacuous), a rules change checked on every shard, a wiped disk,
/// one at each step of a snapshot's transfer and install, and a crash at each step of a merge
/// (but the unlock, which only a merge given up takes, and the export and import, which only a
/// loser too big for its lock's answer takes: the state's saga tests export in parts of three
/// rows), and a snapshot installed mid-merge.
pub const FAULTS_MET: [&str; 21] = [
    "segment members checked against brute force",
    "rules redefined and installed on every shard",
    "a late install of older rules changed nothing",
    "a due backlog over one clock entry's budget drained",
    "a segment defined while a due backlog drained",
    "a clock days off",
    "a wiped node refused",
    "holder crashed holding",
    "follower crashed fetching",
    "crashed before the install landed",
    "crashed after the install landed",
    "a fetch given up",
    "a staged snapshot no longer needed",
    "a merge finished across shards",
    "a node crashed as a merge step reached it",
    "a crash at a merge's lock",
    "a crash at a merge's commit",
    "a crash at a merge's tombstone",
    "a crash at a merge's repoint",
    "a crash at a merge's finish",
    "a snapshot installed while a merge was in flight",
];

/// What a run did.
pub struct Summary {
    pub text: String,
    pub installs: usize,
    /// How often each of [`FAULTS_MET`] happened: a wiped node refused; a crash of a
    /// snapshot's holder while it held one, of the follower while it fetched, with its install
    /// write in flight, and between that write landing and the replica hearing of it; a fetch
    /// given up; a staged snapshot no longer needed.
    pub coverage: BTreeMap<&'static str, usize>,
}

/// Runs the simulation of `seed`; an error says which invariant broke.
pub fn run(seed: u64) -> Result<Summary, String> {
    let mut world = World::new(seed);
    world.start();
    world.run_until(FAULTY_MS)?;
    world.heal();
    world.settle()?;
    world.check()?;
    let ops: Vec<&Op> = world.history.iter().flatten().collect();
    let earns = ops
        .iter()
        .filter(|o| matches!(o, Op::Earn { done: Some(_), .. }))
        .count();
    let unknown = ops
        .iter()
        .filter(|o| matches!(o, Op::Earn { done: None, .. }))
        .count();
    let reads = ops.len() - earns - unknown;
    let text = format!(
        "{:?}: {} events; {earns} earns acknowledged, {unknown} unknown, {reads} reads; {} leader terms; {} snapshots installed; settled at {} ms",
        world.shape, world.seq, world.leaders.len(), world.installs, world.now
    );
    Ok(Summary {
        text,
        installs: world.installs,
        coverage: world.coverage,
    })
}

impl Happening {
    /// The node that carries this out, if one does.
    fn node(&self) -> Option<usize> {
        match self {
            Happening::Tick { node, .. }
            | Happening::Deliver { node, .. }
            | Happening::Fsync { node, .. }
            | Happening::Persisted { node, .. } => Some(*node),
            Happening::Transfer(transfer) => Some(transfer.node()),
            _ => None,
        }
    }
}

impl Shape {
    /// A run's shape, drawn from its seed.
    fn draw(seed: u64, rng: &mut fastrand::Rng) -> Shape {
        Shape {
            nodes: rng.usize(3..=5),
            shards: rng.u32(1..=3),
            replication: 3,
            profiles: rng.usize(2..=6),
            clients: rng.usize(2..=4),
            ops_per_client: rng.usize(20..=40),
            drop_percent: rng.u64(0..=10),
            duplicate_percent: rng.u64(0..=5),
            faults: !seed.is_multiple_of(8),
            bulk_tags: seed % 10 == 3,
            log_retain_entries: [1, 5, 20, 200][rng.usize(0..4)],
            log_compact_entries: [1, 4, 64][rng.usize(0..3)],
            // (Not with the bulk's thousands of pairs: its transfers would outlast the run.)
            chunk_pairs: if seed % 4 == 1 && seed % 10 != 3 {
                1
            } else {
                8
            },
        }
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let shape = Shape::draw(seed, &mut rng);
        let nodes: Vec<Node> = (0..shape.nodes)
            .map(|_| Node {
                up: true,
                paused_until: 0,
                leaving: false,
                clock: clocks::WallClock::new(&mut rng),
                life: 0,
                started_at: 0,
                disk: Rc::new(RefCell::new(Disk::default())),
                replicas: BTreeMap::new(),
                held: BTreeMap::new(),
                fetches: BTreeMap::new(),
                next_generation: 1,
                installing: BTreeMap::new(),
                identity: rng.u128(..).to_be_bytes(),
                gone: false,
            })
            .collect();
        let first_identities = nodes.iter().map(|n: &Node| n.identity).collect();
        let clients = (0..shape.clients)
            .map(|_| Client {
                current: None,
                done: 0,
            })
            .collect();
        World {
            rng,
            transport: MemTransport::default(),
            history: vec![Vec::new(); shape.profiles],
            shape,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            cut: BTreeSet::new(),
            faulty: true,
            clients,
            tokens: BTreeMap::new(),
            next_token: 0,
            rules_seen: BTreeMap::new(),
            leaders: BTreeMap::new(),
            digests: BTreeMap::new(),
            acknowledged: Vec::new(),
            next_event: 0,
            segment_version: 0,
            rules_ordered: BTreeMap::new(),
            late_install: None,
            installs: 0,
            coverage: BTreeMap::new(),
            first_identities,
            pairs: Vec::new(),
            merge_tokens: BTreeMap::new(),
            merge_rng: fastrand::Rng::with_seed(seed ^ 0x6d65_7267_6573),
        }
    }

    fn cover(&mut self, step: &'static str) {
        *self.coverage.entry(step).or_default() += 1;
    }

    fn schedule(&mut self, after: u64, event: Happening) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// A node's wall clock.
    fn millis(&self, node: usize) -> Millis {
        Millis(EPOCH_MS + self.nodes[node].clock.read(self.now))
    }

    /// A node's clocks: its wall clock (off by its offset) and the time since its life began.
    fn clocks(&self, node: usize) -> Now {
        Now {
            wall: self.millis(node),
            since_start: Duration::from_millis(self.now - self.nodes[node].started_at),
        }
    }

    /// The nodes holding shard `s`: `(s + r) % nodes`, the first of them the placed leader.
    fn placement(&self, shard: ShardId) -> Vec<usize> {
        (0..self.shape.replication)
            .map(|r| (shard.0 as usize + r) % self.shape.nodes)
            .collect()
    }

    fn raft_id(shard: ShardId, node: usize) -> u64 {
        crate::config::raft_id(shard, node as u64 + 1)
    }

    fn replica_config(&self, shard: ShardId, node: usize, campaign: bool) -> ReplicaConfig {
        ReplicaConfig {
            shard,
            n_shards: self.shape.shards,
            id: World::raft_id(shard, node),
            replicas: self
                .placement(shard)
                .into_iter()
                .map(|n| (World::raft_id(shard, n), n as u64 + 1))
                .collect(),
            placed_leader: World::raft_id(shard, self.placement(shard)[0]),
            // Deterministic timeouts; nodes differ by their tick jitter.
            election_ticks: (10, 11),
            heartbeat_ticks: 1,
            campaign,
            clock_interval_ms: 1_000,
            passivate_idle_ticks: 50,
            activation_budget: 16,
            seed_rules: segments::rules(),
            log_retain_entries: self.shape.log_retain_entries,
            log_compact_entries: self.shape.log_compact_entries,
            life: self.nodes[node].life,
            tick: Duration::from_millis(TICK_MS),
        }
    }

    /// Opens (or reopens, after a crash) a node's replicas from its disk.
    fn open(&mut self, node: usize, first: bool) {
        self.nodes[node].started_at = self.now;
        self.nodes[node].leaving = false;
        // Staged generations never switched to are dropped at start, and the next staging
        // takes a generation above every one on the disk (as `Storage::open` numbers them).
        let mut disk = self.nodes[node].disk.borrow_mut();
        let recorded = disk
            .meta
            .iter()
            .filter(|(key, _)| key.starts_with(b"gen/"))
            .map(|(_, value)| u64::from_be_bytes(value[..].try_into().expect("a generation")));
        let staged = disk.staged.keys().map(|(_, generation)| *generation);
        let highest = recorded.chain(staged).max().unwrap_or(0);
        disk.staged.clear();
        drop(disk);
        self.nodes[node].next_generation = highest + 1;
        let shards: Vec<ShardId> = (0..self.shape.shards)
            .map(ShardId)
            .filter(|s| self.placement(*s).contains(&node))
            .collect();
        for shard in shards {
            let campaign = first && self.placement(shard)[0] == node;
            let config = self.replica_config(shard, node, campaign);
            let disk = Rc::clone(&self.nodes[node].disk);
            let source = SimLog {
                disk: Rc::clone(&disk),
                shard,
            };
            let replica = {
                let disk = disk.borrow();
                let empty = MemState::default();
                let base = disk.states.get(&shard).unwrap_or(&empty);
                Replica::recover(config, source, base).expect("a replica recovers")
            };
            self.nodes[node].replicas.insert(shard, replica);
        }
        let life = self.nodes[node].life;
        let jitter = self.rng.u64(0..TICK_MS);
        self.schedule(jitter, Happening::Tick { node, life });
    }

    fn start(&mut self) {
        for node in 0..self.shape.nodes {
            self.open(node, true);
        }
        for node in 0..self.shape.nodes {
            let shards: Vec<ShardId> = self.nodes[node].replicas.keys().copied().collect();
            for shard in shards {
                self.advance(node, shard, Effects::default());
            }
        }
        for client in 0..self.shape.clients {
            let think = self.rng.u64(0..200);
            self.schedule(think, Happening::Client { client });
        }
        if self.shape.bulk_tags {
            for at in segments::BULK_SENT_AT {
                self.schedule(at, Happening::BulkTags);
            }
            self.schedule(8_000, Happening::DefineDuringBacklog { looks: 0 });
        }
        if self.shape.faults {
            let mut at = self.rng.u64(500..2_000);
            while at < FAULTY_MS {
                let node = self.rng.usize(0..self.shape.nodes);
                let fault = match self.rng.u32(0..6) {
                    0 => Happening::Crash { node },
                    1 => Happening::Pause { node },
                    2 => Happening::CutLink,
                    3 => Happening::Leave { node },
                    4 => Happening::ClockStep { node },
                    _ => Happening::Partition,
                };
                self.schedule(at, fault);
                at += self.rng.u64(1_000..4_000);
            }
            // In a quarter of the runs, one node's disk is wiped.
            if self.rng.u64(0..4) == 0 {
                let (at, node) = (
                    self.rng.u64(1_000..FAULTY_MS),
                    self.rng.usize(0..self.shape.nodes),
                );
                self.schedule(at, Happening::Wipe { node });
            }
        }
        self.plan_merges();
    }

    fn run_until(&mut self, until: u64) -> Result<(), String> {
        while let Some(&Reverse((at, seq))) = self.queue.peek() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let event = self.events.remove(&seq).expect("scheduled");
            // What a paused node would do waits until it runs again.
            if let Some(node) = event.node() {
                let until = self.nodes[node].paused_until;
                if until > at {
                    self.now = at;
                    self.schedule(until - at, event);
                    continue;
                }
            }
            self.handle(event)?;
        }
        self.now = until;
        Ok(())
    }

    // The simulation (test code): one arm per kind of happening, read as one table.
    #[allow(clippy::too_many_lines)]
    fn handle(&mut self, event: Happening) -> Result<(), String> {
        match event {
            Happening::Tick { node, life } => {
                if !self.live(node, life) {
                    return Ok(());
                }
                let shards: Vec<ShardId> = self.nodes[node].replicas.keys().copied().collect();
                let now = self.clocks(node);
                self.expire_held(node);
                for shard in shards {
                    let mut fx = Effects::default();
                    self.replica(node, shard).tick(now, &mut fx);
                    self.advance(node, shard, fx);
                }
                let next = TICK_MS - TICK_JITTER_MS + self.rng.u64(0..=2 * TICK_JITTER_MS);
                self.schedule(next, Happening::Tick { node, life });
            }
            Happening::Deliver {
                node,
                from,
                message,
            } => {
                if !self.nodes[node].up {
                    return Ok(());
                }
                let message = Message::decode(&message).expect("messages decode");
                let shard = crate::config::shard_of_raft_id(message.receiver());
                super::assert_deliverable(from, node, shard.0, &message);
                if self.nodes[node].replicas.contains_key(&shard) {
                    let (now, mut fx) = (self.clocks(node), Effects::default());
                    self.replica(node, shard).step(message, now, &mut fx);
                    self.advance(node, shard, fx);
                }
            }
            Happening::Fsync {
                node,
                life,
                ops,
                shard,
                switch,
            } => {
                if !self.live(node, life) {
                    return Ok(());
                }
                let n = &mut self.nodes[node];
                let mut disk = n.disk.borrow_mut();
                // As the writer: a switching job's log and state ops go to the new generation.
                if let Some(generation) = switch {
                    disk.switch(shard, generation);
                    self.installs += 1;
                    n.installing.insert(shard, true);
                }
                disk.commit(ops);
                drop(disk);
                if switch.is_some() && self.merge_in_flight() {
                    self.cover("a snapshot installed while a merge was in flight");
                }
                // The writer's word reaches the replica a moment later: a crash may fall
                // between the fsync and the acknowledgement.
                let delay = self.rng.u64(0..3);
                self.schedule(delay, Happening::Persisted { node, life, shard });
            }
            Happening::Persisted { node, life, shard } => {
                if !self.live(node, life) {
                    return Ok(());
                }
                self.nodes[node].installing.remove(&shard);
                let mut fx = Effects::default();
                let disk = Rc::clone(&self.nodes[node].disk);
                let replica = self.nodes[node].replicas.get_mut(&shard).expect("hosted");
                {
                    let disk = disk.borrow();
                    let empty = MemState::default();
                    replica.persisted(disk.states.get(&shard).unwrap_or(&empty), &mut fx);
                }
                let (index, digest) = (replica.durable_applied(), replica.state.meta.digest);
                if index > 0 {
                    match self.digests.insert((shard, index), digest) {
                        Some(other) if other != digest => {
                            return Err(format!(
                                "shard {shard}: two digests at applied index {index}: {other:016x} and {digest:016x} (node {})",
                                node + 1
                            ))
                        }
                        _ => {}
                    }
                }
                self.check_shard_clocks(node, shard)?;
                self.advance(node, shard, fx);
            }
            Happening::Crash { node } => {
                if self.nodes[node].up {
                    self.stop(node);
                }
            }
            Happening::Leave { node } => {
                if self.nodes[node].up && !self.nodes[node].leaving {
                    self.nodes[node].leaving = true;
                    let shards: Vec<ShardId> = self.nodes[node].replicas.keys().copied().collect();
                    for shard in shards {
                        self.replica(node, shard).leave();
                        self.advance(node, shard, Effects::default());
                    }
                    let (stops, life) = (self.rng.u64(50..1_500), self.nodes[node].life);
                    self.schedule(stops, Happening::Stop { node, life });
                }
            }
            Happening::Stop { node, life } => {
                if self.live(node, life) {
                    self.stop(node);
                }
            }
            Happening::Restart { node } => {
                if !self.nodes[node].up && !self.nodes[node].gone && self.may_start(node) {
                    self.nodes[node].up = true;
                    self.open(node, false);
                }
            }
            Happening::Wipe { node } => {
                if self.nodes[node].up && self.nodes.iter().all(|n| !n.gone) {
                    self.stop(node);
                    let n = &mut self.nodes[node];
                    n.disk = Rc::new(RefCell::new(Disk::default()));
                    n.identity = self.rng.u128(..).to_be_bytes();
                }
            }
            Happening::Pause { node } => {
                let lasts = self.rng.u64(500..4_000);
                self.nodes[node].paused_until = self.now + lasts;
            }
            Happening::ClockStep { node } => self.step_clock(node),
            Happening::BulkTags => self.bulk_tags(),
            Happening::DefineDuringBacklog { looks } => self.define_during_backlog(looks),
            Happening::Partition | Happening::CutLink if self.cut.is_empty() => {
                let n = self.shape.nodes;
                if matches!(event, Happening::Partition) {
                    let groups: Vec<usize> = (0..n).map(|_| self.rng.usize(0..2)).collect();
                    for a in 0..n {
                        for b in a + 1..n {
                            if groups[a] != groups[b] {
                                self.cut.insert((a, b));
                            }
                        }
                    }
                } else {
                    let a = self.rng.usize(0..n);
                    let b = (a + self.rng.usize(1..n)) % n;
                    self.cut.insert((a.min(b), a.max(b)));
                }
                let lasts = self.rng.u64(300..4_000);
                self.schedule(lasts, Happening::Heal);
            }
            Happening::Partition | Happening::CutLink => {}
            Happening::Heal => self.cut.clear(),
            Happening::Client { client } => self.client_step(client),
            Happening::AttemptTimeout { client, attempt } => {
                let current = self.clients[client].current.as_ref();
                if current.is_some_and(|op| op.attempt == attempt) {
                    self.retry(client);
                }
            }
            Happening::Transfer(transfer) => self.transfer(transfer),
            Happening::MergeStep { pair } => self.merge_step(pair),
            Happening::MergeTimeout { pair, attempt } => self.merge_timed_out(pair, attempt),
        }
        Ok(())
    }

    /// The node goes down, losing what was not fsynced.
    fn down(&mut self, node: usize) {
        let n = &self.nodes[node];
        let faults = [
            ("holder crashed holding", !n.held.is_empty()),
            ("follower crashed fetching", !n.fetches.is_empty()),
            (
                "crashed before the install landed",
                n.installing.values().any(|l| !l),
            ),
            (
                "crashed after the install landed",
                n.installing.values().any(|l| *l),
            ),
        ];
        for (step, hit) in faults {
            if hit {
                self.cover(step);
            }
        }
        let n = &mut self.nodes[node];
        n.installing.clear();
        n.up = false;
        n.life += 1;
        n.replicas.clear();
        n.held.clear();
        n.fetches.clear();
    }

    /// The node goes down, and restarts a while later.
    fn stop(&mut self, node: usize) {
        self.down(node);
        let downtime = self.rng.u64(300..4_000);
        self.schedule(downtime, Happening::Restart { node });
    }

    /// Whether a node may start: one on a wiped disk (a new identity, no hard state) asks its
    /// peers first, as a node on an empty data directory does
    /// (`transport::handshake::may_join`), and its peers, which hold an initialized cluster
    /// and know it by its first identity, refuse it: it never runs again. Until one answers it
    /// waits.
    fn may_start(&mut self, node: usize) -> bool {
        let wiped = self.nodes[node].identity != self.first_identities[node];
        if !wiped {
            return true;
        }
        let answers: BTreeMap<u64, crate::transport::handshake::About> = (0..self.shape.nodes)
            .filter(|&n| n != node && self.nodes[n].up)
            .map(|n| {
                let about = crate::transport::handshake::About {
                    identity: self.nodes[n].identity,
                    initialized: self.nodes[n].disk.borrow().initialized(),
                    knows_you: Some(self.first_identities[node]),
                };
                (n as u64 + 1, about)
            })
            .collect();
        let peers = (1..=self.shape.nodes as u64).filter(|&id| id != node as u64 + 1);
        let identity = self.nodes[node].identity;
        match crate::transport::handshake::may_join(identity, &answers, peers) {
            crate::transport::handshake::Join::Refused(_) => {
                self.cover("a wiped node refused");
                self.nodes[node].gone = true;
            }
            crate::transport::handshake::Join::Wait(_) => {
                self.schedule(500, Happening::Restart { node });
            }
            crate::transport::handshake::Join::Create => {
                panic!(
                    "node {}: a wiped disk would vote as the replica it was",
                    node + 1
                )
            }
        }
        false
    }

    fn live(&self, node: usize, life: u64) -> bool {
        self.nodes[node].up && self.nodes[node].life == life
    }

    fn replica(&mut self, node: usize, shard: ShardId) -> &mut Replica<SimLog> {
        self.nodes[node]
            .replicas
            .get_mut(&shard)
            .expect("the node hosts the shard")
    }

    /// Runs a replica's Ready and carries out its effects.
    fn advance(&mut self, node: usize, shard: ShardId, mut fx: Effects) {
        let now = self.clocks(node);
        let disk = Rc::clone(&self.nodes[node].disk);
        {
            let disk = disk.borrow();
            let empty = MemState::default();
            let base = disk.states.get(&shard).unwrap_or(&empty);
            self.replica(node, shard).advance(base, now, &mut fx);
        }
        self.carry_out(node, shard, fx);
    }

    // The simulation (test code): each effect carried out in the order a node does.
    #[allow(clippy::too_many_lines)]
    fn carry_out(&mut self, node: usize, shard: ShardId, fx: Effects) {
        let Effects {
            messages,
            write,
            replies,
            reads,
            clocks: _,
            role,
            snapshots,
            fetch,
            switch,
            discard,
        } = fx;
        // Before the write is scheduled: the disk holds the durable state they are of.
        for snapshot in snapshots {
            self.hold(node, snapshot);
        }
        if let Some(generation) = discard {
            self.cover("a staged snapshot no longer needed");
            let mut disk = self.nodes[node].disk.borrow_mut();
            disk.staged.remove(&(shard, generation));
        }
        if let Some((Role::Leader, term)) = role {
            let me = World::raft_id(shard, node);
            if let Some(&other) = self.leaders.get(&(shard, term)) {
                assert_eq!(
                    other, me,
                    "shard {shard}: two leaders in term {term}: {other:x} and {me:x}"
                );
            }
            self.leaders.insert((shard, term), me);
        }
        // Through the transport trait, encoded as on a node; then the network carries them.
        let mut by_node: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for message in messages {
            by_node
                .entry(node_of_raft_id(message.receiver()))
                .or_default()
                .push(message.encode());
        }
        for (to, bytes) in by_node {
            self.transport.send_raft(to, shard.0, bytes);
        }
        let sent = std::mem::take(&mut *self.transport.0.lock().expect("transport lock"));
        for (to, shard_id, messages) in sent {
            let to = to as usize - 1;
            for bytes in messages {
                if !self.send(node, to, bytes) {
                    // As the transport does when a peer cannot be reached.
                    let raft_id = World::raft_id(ShardId(shard_id), to);
                    self.replica(node, shard).unreachable(raft_id);
                }
            }
        }
        if let Some(ops) = write {
            let latency = self.rng.u64(1..8);
            if switch.is_some() {
                self.nodes[node].installing.insert(shard, false);
                // Made common, as rare paths should be: a crash before the install write
                // lands, or between its landing and the replica hearing of it.
                if self.faulty && self.rng.u64(0..100) < 30 {
                    let at = self.rng.u64(0..latency + 3);
                    self.schedule(at, Happening::Crash { node });
                }
            }
            let life = self.nodes[node].life;
            self.schedule(
                latency,
                Happening::Fsync {
                    node,
                    life,
                    ops,
                    shard,
                    switch,
                },
            );
        }
        if let Some(snapshot) = fetch {
            self.start_fetch(node, snapshot);
        }
        for (token, reply) in replies {
            if let Some((client, attempt)) = self.tokens.remove(&(node, token)) {
                self.earn_answered(client, attempt, reply);
            } else if let Some(pair) = self.merge_tokens.remove(&(node, token)) {
                self.merge_answered(pair, token, reply);
            }
        }
        for (token, answer) in reads {
            if let Some((client, attempt)) = self.tokens.remove(&(node, token)) {
                self.read_answered(client, attempt, node, answer);
            }
        }
    }

    /// Carries a message through the network; answers false if it could not leave (a
    /// partition or a peer that is down), which a transport would tell its replica.
    fn send(&mut self, from: usize, to: usize, message: Vec<u8>) -> bool {
        let deliver = |message| Happening::Deliver {
            node: to,
            from,
            message,
        };
        self.carry(from, to, message, deliver)
    }

    /// Carries `payload` from one node to another through the network (delayed, perhaps
    /// dropped, duplicated or very late), as `happening` once there; false if it could not
    /// leave (a partition, or a peer that is down).
    fn carry<P: Clone>(
        &mut self,
        from: usize,
        to: usize,
        payload: P,
        happening: impl Fn(P) -> Happening,
    ) -> bool {
        let cut = self.cut.contains(&(from.min(to), from.max(to)));
        let dropped = self.faulty && self.rng.u64(0..100) < self.shape.drop_percent;
        if cut || !self.nodes[to].up {
            return false;
        }
        if dropped {
            return true;
        }
        if self.faulty && self.rng.u64(0..100) < self.shape.duplicate_percent {
            let later = self.rng.u64(1..30);
            self.schedule(later, happening(payload.clone()));
        }
        // Now and then a message is very late: it may arrive after an election or a restart.
        let delay = if self.faulty && self.rng.u64(0..100) < 2 {
            self.rng.u64(200..3_000)
        } else {
            self.rng.u64(1..12)
        };
        self.schedule(delay, happening(payload));
        true
    }

    /// Profile `p` is known by one phone, held by the shard that holds the profile (so an
    /// event needs no other shard).
    fn phone(&self, profile: usize) -> (Identity, ShardId) {
        let identity = Identity {
            kind: "phone".into(),
            value: format!("p{profile}"),
        };
        let shard = identity.shard(self.shape.shards);
        (identity, shard)
    }

    fn client_step(&mut self, client: usize) {
        if self.clients[client].current.is_some() {
            return;
        }
        if self.clients[client].done >= self.shape.ops_per_client {
            return;
        }
        if self.rng.u64(0..100) < 3 {
            self.define_segment();
        }
        match self.rng.u64(0..100) {
            0..=2 => self.define_rules(),
            3..=7 => self.install_rules(),
            _ => {}
        }
        let profile = self.rng.usize(0..self.shape.profiles);
        let kind = if self.rng.u64(0..100) < 60 {
            self.next_event += 1;
            // Distinct powers of two: a balance tells which earns it holds.
            let points = 1u64 << (self.history[profile].len() % 36);
            Kind::Earn {
                event: format!("e{}", self.next_event),
                points,
            }
        } else {
            Kind::Read
        };
        self.clients[client].current = Some(Operation {
            profile,
            kind,
            invoked: self.now,
            attempt: 0,
        });
        self.retry(client);
    }

    /// Sends the client's operation (again) to some node, or gives up past its deadline.
    fn retry(&mut self, client: usize) {
        let op = self.clients[client].current.as_ref().expect("an operation");
        if self.now - op.invoked >= OPERATION_MS {
            let op = self.clients[client].current.take().expect("an operation");
            if let Kind::Earn { points, .. } = op.kind {
                self.history[op.profile].push(Op::Earn {
                    points,
                    invoked: op.invoked,
                    done: None,
                });
            }
            return self.finished(client);
        }
        let (profile, kind, op_invoked) = (op.profile, op.kind.clone(), op.invoked);
        let (identity, shard) = self.phone(profile);
        self.next_token += 1;
        let token = self.next_token;
        self.clients[client]
            .current
            .as_mut()
            .expect("an operation")
            .attempt = token;
        let attempt = token;
        let hosts = self.up_hosts(shard);
        if hosts.is_empty() {
            return self.schedule(50, Happening::AttemptTimeout { client, attempt });
        }
        let node = hosts[self.rng.usize(0..hosts.len())];
        self.tokens.insert((node, token), (client, attempt));
        self.schedule(ATTEMPT_MS, Happening::AttemptTimeout { client, attempt });
        let mut fx = Effects::default();
        match kind {
            Kind::Earn { event, points } => {
                // Dated by the client, whose clock is right (the API dates an event without
                // `ts` by the cluster's majority time, which the simulation does not model).
                let json = serde_json::json!({"event_id": event, "type": "points_earn",
                    "identities": {"phone": identity.value}, "points": points,
                    "ts": Millis(EPOCH_MS + op_invoked as i64).to_string(),
                    "expires_at": Millis(EPOCH_MS + 400 * 86_400_000).to_string()});
                let raw = serde_json::value::to_raw_value(&json).expect("json");
                let event = Event::parse(&raw, Some(self.millis(node))).expect("a valid event");
                let command = Command::Events(vec![Routed {
                    event,
                    target: Target::Claim,
                    rules_version: self.rules_seen.get(&shard).copied().unwrap_or(0),
                    link_elsewhere: vec![],
                    found: vec![],
                }]);
                self.replica(node, shard)
                    .propose(&command, Some(token), &mut fx);
            }
            Kind::Read => {
                let now = self.clocks(node);
                self.replica(node, shard).read(token, now, &mut fx)
            }
        }
        self.advance(node, shard, fx);
    }

    fn current(&self, client: usize, attempt: u64) -> bool {
        self.clients[client]
            .current
            .as_ref()
            .is_some_and(|op| op.attempt == attempt)
    }

    fn earn_answered(&mut self, client: usize, attempt: u64, reply: Result<Output, ShardError>) {
        if !self.current(client, attempt) {
            return;
        }
        match reply {
            Ok(Output::Events { outcomes, .. }) => match &outcomes[0] {
                EventOutcome::StaleRules(version) => {
                    let profile = self.clients[client]
                        .current
                        .as_ref()
                        .expect("an op")
                        .profile;
                    let (_, shard) = self.phone(profile);
                    self.rules_seen.insert(shard, *version);
                    // Routed again at once, as a router does once it read the rules.
                    self.retry(client);
                }
                EventOutcome::Applied(..) | EventOutcome::Duplicate(_) => {
                    let op = self.clients[client].current.take().expect("an operation");
                    let Kind::Earn { event, points } = op.kind else {
                        unreachable!("an earn")
                    };
                    self.history[op.profile].push(Op::Earn {
                        points,
                        invoked: op.invoked,
                        done: Some(self.now),
                    });
                    self.acknowledged.push((op.profile, event));
                    self.finished(client);
                }
                EventOutcome::Rejected(error) => {
                    panic!("a simulated earn was rejected: {error:?}")
                }
                EventOutcome::Moved(into) => {
                    panic!("a simulated profile was merged into {into}, but nothing merges")
                }
            },
            Ok(other) => panic!("an earn answered {other:?}"),
            Err(_) => self.schedule(20, Happening::AttemptTimeout { client, attempt }),
        }
    }

    fn read_answered(
        &mut self,
        client: usize,
        attempt: u64,
        node: usize,
        answer: Result<(), ShardError>,
    ) {
        if !self.current(client, attempt) {
            return;
        }
        if answer.is_err() {
            return self.schedule(20, Happening::AttemptTimeout { client, attempt });
        }
        let op = self.clients[client].current.take().expect("an operation");
        let balance = self.balance(node, op.profile);
        self.history[op.profile].push(Op::Read {
            balance,
            invoked: op.invoked,
            done: self.now,
        });
        self.finished(client);
    }

    fn finished(&mut self, client: usize) {
        self.clients[client].done += 1;
        // Spread over the faulty time, so operations meet the faults.
        let think = self
            .rng
            .u64(0..2 * FAULTY_MS / self.shape.ops_per_client as u64);
        self.schedule(think, Happening::Client { client });
    }

    /// A profile's balance in a node's stored state (0 if it has none yet).
    fn balance(&self, node: usize, profile: usize) -> u64 {
        let (identity, shard) = self.phone(profile);
        let disk = self.nodes[node].disk.borrow();
        let Some(state) = disk.states.get(&shard) else {
            return 0;
        };
        let key = keys::identity(&identity);
        let Some(bytes) = state.0.get(&key) else {
            return 0;
        };
        let oneid: OneId = decode(&key, bytes);
        let key = keys::profile(oneid);
        let profile: oneid_state::profile::Profile =
            decode(&key, state.0.get(&key).expect("a bound profile exists"));
        profile.balance as u64
    }

    fn heal(&mut self) {
        self.faulty = false;
        self.cut.clear();
        for node in 0..self.shape.nodes {
            if self.nodes[node].gone {
                continue;
            }
            self.nodes[node].paused_until = self.now;
            if self.nodes[node].leaving {
                // Its stop completes now, and it comes back at once.
                self.down(node);
            }
            if !self.nodes[node].up && self.may_start(node) {
                self.nodes[node].up = true;
                self.open(node, false);
            }
        }
    }

    /// The nodes holding shard `s` that are up now.
    fn up_hosts(&self, shard: ShardId) -> Vec<usize> {
        self.placement(shard)
            .into_iter()
            .filter(|n| self.nodes[*n].up)
            .collect()
    }

    /// The nodes holding shard `s` that still run (all but a node refused after a wipe).
    fn hosts(&self, shard: ShardId) -> Vec<usize> {
        self.placement(shard)
            .into_iter()
            .filter(|n| !self.nodes[*n].gone)
            .collect()
    }

    /// Runs the healed cluster until every client is done and every shard's replicas agree
    /// on their applied index with nothing in flight.
    fn settle(&mut self) -> Result<(), String> {
        let mut deadline = self.now + SETTLE_MS;
        while self.now < deadline {
            let step = self.now + 50;
            // A PUT answered 503 is sent again until every shard installed the rules; after
            // the late install, only for a version the registry ordered since (what the late
            // install does must stand on its own).
            if self.reinstall_wanted() && !self.rules_installed() {
                self.install_rules();
            }
            self.run_until(step)?;
            let clients_done =
                self.clients.iter().all(|c| c.current.is_none()) && self.merges_done();
            // Settled: clients done, replicas equal, what fell due processed, and the shard
            // clocks caught up with a wall clock stepped late in the run.
            if clients_done
                && self.rules_installed()
                && self.replicas_agree()
                && self.due_drained()
                && self.check_settled_clocks().is_ok()
            {
                // A slow PUT's install of an older version lands after all: it must change
                // nothing, and the cluster settles again.
                if self.send_late_install() {
                    deadline = self.now + SETTLE_MS;
                    continue;
                }
                return Ok(());
            }
        }
        let clocks = self.check_settled_clocks().err().unwrap_or_default();
        let rules = self.rules_mismatch().unwrap_or_default();
        Err(format!(
            "the healed cluster did not settle within {SETTLE_MS} ms: {clocks}{rules}{}",
            self.describe()
        ))
    }

    fn replicas_agree(&self) -> bool {
        (0..self.shape.shards).map(ShardId).all(|shard| {
            let statuses: Vec<_> = self
                .hosts(shard)
                .into_iter()
                .map(|n| self.nodes[n].replicas[&shard].status())
                .collect();
            let leaders: Vec<_> = statuses.iter().filter(|s| s.role == Role::Leader).collect();
            // The leader's followers acknowledged every entry: nothing it proposed waits (a
            // shard whose follower still needs a snapshot has not settled, even if no entry
            // commits meanwhile).
            let followers = self
                .hosts(shard)
                .into_iter()
                .map(|n| World::raft_id(shard, n));
            let caught_up = |leader: &ReplicaStatus| {
                followers
                    .filter(|id| leader.leader != Some(*id))
                    .all(|id| leader.caught_up.contains(&id))
            };
            leaders.len() == 1
                && caught_up(leaders[0])
                && statuses.iter().all(|s| {
                    s.applied_index == statuses[0].applied_index
                        && s.commit_index == s.applied_index
                })
                && self.hosts(shard).into_iter().all(|n| {
                    self.nodes[n].replicas[&shard].durable_applied() == statuses[0].applied_index
                })
        })
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for shard in (0..self.shape.shards).map(ShardId) {
            for n in self.hosts(shard) {
                let s = self.nodes[n].replicas[&shard].status();
                out.push_str(&format!(
                    "\n  shard {shard} node {}: {:?} term {} commit {} applied {} durable {}",
                    n + 1,
                    s.role,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    self.nodes[n].replicas[&shard].durable_applied()
                ));
            }
        }
        out
    }

    /// The invariants of a settled run.
    fn check(&mut self) -> Result<(), String> {
        // Replicas of a shard hold the same state, digest included.
        for shard in (0..self.shape.shards).map(ShardId) {
            let hosts = self.hosts(shard);
            let states: Vec<_> = hosts
                .iter()
                .map(|n| self.nodes[*n].disk.borrow().states.get(&shard).cloned())
                .collect();
            let digests: Vec<u64> = hosts
                .iter()
                .map(|n| self.nodes[*n].replicas[&shard].state.meta.digest)
                .collect();
            if states.iter().any(|s| *s != states[0]) || digests.iter().any(|d| *d != digests[0]) {
                return Err(format!("shard {shard}: replicas differ after settling"));
            }
        }
        // A final read of every profile, at the end of its history.
        let at = self.now;
        for profile in 0..self.shape.profiles {
            let (_, shard) = self.phone(profile);
            let node = self.hosts(shard)[0];
            let balance = self.balance(node, profile);
            self.history[profile].push(Op::Read {
                balance,
                invoked: at,
                done: at,
            });
        }
        for (profile, ops) in self.history.iter().enumerate() {
            check::linearizable(ops).map_err(|e| format!("profile {profile}: {e}"))?;
        }
        // Every acknowledged earn is in the ledger exactly once; none is there twice.
        let mut earned: BTreeMap<(usize, String), usize> = BTreeMap::new();
        for profile in 0..self.shape.profiles {
            let (identity, shard) = self.phone(profile);
            let node = self.hosts(shard)[0];
            let disk = self.nodes[node].disk.borrow();
            let Some(state) = disk.states.get(&shard) else {
                continue;
            };
            let key = keys::identity(&identity);
            let Some(bytes) = state.0.get(&key) else {
                continue;
            };
            let oneid: OneId = decode(&key, bytes);
            let prefix = keys::ledger_prefix(oneid);
            for (key, value) in state.0.range(prefix.clone()..) {
                if !key.starts_with(&prefix) {
                    break;
                }
                let record: LedgerRecord = decode(key, value);
                if record.kind == LedgerKind::Earn {
                    *earned.entry((profile, record.event_id)).or_default() += 1;
                }
            }
        }
        self.check_segments()?;
        self.check_merges()?;
        self.check_settled_clocks()?;
        self.check_rules()?;
        if let Some(((profile, event), n)) = earned.iter().find(|(_, n)| **n > 1) {
            return Err(format!("profile {profile}: {event} earned {n} times"));
        }
        for (profile, event) in &self.acknowledged {
            if !earned.contains_key(&(*profile, event.clone())) {
                return Err(format!(
                    "profile {profile}: acknowledged {event} is not in the ledger"
                ));
            }
        }
        Ok(())
    }
}
