//! Directed tests of the replica core: three replicas of one shard driven by hand (every
//! message delivered at once, every write durable at once, the time set by the test).
//! [`lease`] tests each rule that makes leader leases safe; [`hand_off`] what a replica does
//! while its node shuts down. The seeded simulation of whole clusters, with faults, is the
//! node's (`node/src/sim`): it drives this core through the node's shells.

mod hand_off;
mod lease;

use crate::log::LogSource;
use crate::message::{Message, MessageKind};
use crate::write::{Space, WriteOp};
use crate::{Effects, Now, Replica, ReplicaConfig, Token};
use oneid_protocol::ids::ShardId;
use oneid_protocol::num::Millis;
use oneid_protocol::rules::Rules;
use oneid_state::store::MemState;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

const SHARD: ShardId = ShardId(0);
const TICK: Duration = Duration::from_millis(100);

/// The replica id of node `node`'s replica (node ids from 1, as in a cluster file).
fn replica_id(node: usize) -> u64 {
    100 + node as u64
}

/// What one node holds durably: its meta records, the shard's log and state.
#[derive(Default)]
struct Disk {
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
    log: BTreeMap<u64, Vec<u8>>,
    state: MemState,
}

impl Disk {
    fn commit(&mut self, ops: Vec<WriteOp>) {
        for op in ops {
            match (op.space, op.value) {
                (Space::Meta, Some(value)) => self.meta.insert(op.key, value),
                (Space::Meta, None) => self.meta.remove(&op.key),
                (Space::Log(_), value) => {
                    let index = u64::from_be_bytes(op.key.try_into().expect("log keys"));
                    match value {
                        Some(value) => self.log.insert(index, value),
                        None => self.log.remove(&index),
                    }
                }
                (Space::State(_), Some(value)) => self.state.0.insert(op.key, value),
                (Space::State(_), None) => self.state.0.remove(&op.key),
            };
        }
    }
}

/// A replica's log on its [`Disk`].
struct DiskLog(Rc<RefCell<Disk>>);

impl LogSource for DiskLog {
    fn entry(&self, index: u64) -> Option<Vec<u8>> {
        self.0.borrow().log.get(&index).cloned()
    }

    fn last_stored(&self) -> Option<u64> {
        self.0.borrow().log.keys().next_back().copied()
    }

    fn meta(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.borrow().meta.get(key).cloned()
    }
}

struct Cluster {
    disks: Vec<Rc<RefCell<Disk>>>,
    replicas: Vec<Replica<DiskLog>>,
    /// Every replica's monotonic clock (they all started together).
    since_start: Duration,
    /// Messages that left, for the test to look at.
    sent: Vec<Message>,
    /// Reads answered: (node, token).
    served: Vec<(usize, Token)>,
}

impl Cluster {
    /// Three replicas; the one on `leader` campaigns, and a round (a read on it) confirms its
    /// leadership and grants it a lease.
    fn new(leader: usize) -> Cluster {
        let disks: Vec<_> = (0..3).map(|_| Rc::default()).collect();
        let mut cluster = Cluster {
            replicas: Vec::new(),
            disks,
            since_start: Duration::ZERO,
            sent: Vec::new(),
            served: Vec::new(),
        };
        for node in 0..3 {
            let replica = cluster.open(node, node == leader);
            cluster.replicas.push(replica);
        }
        cluster.settle();
        assert!(cluster.replicas[leader].is_leader());
        cluster.read(leader, 1);
        assert!(cluster.replicas[leader].lease_read().is_some());
        cluster
    }

    fn open(&self, node: usize, campaign: bool) -> Replica<DiskLog> {
        let config = ReplicaConfig {
            shard: SHARD,
            n_shards: 1,
            id: replica_id(node),
            replicas: (0..3).map(|n| (replica_id(n), n as u64 + 1)).collect(),
            placed_leader: replica_id(0),
            election_ticks: (10, 11),
            heartbeat_ticks: 1,
            campaign,
            clock_interval_ms: 1_000,
            passivate_idle_ticks: 50,
            activation_budget: 16,
            seed_rules: Rules::default(),
            log_retain_entries: 200,
            log_compact_entries: crate::LOG_COMPACT_BATCH,
            life: node as u64,
            tick: TICK,
        };
        let source = DiskLog(Rc::clone(&self.disks[node]));
        let base = &self.disks[node].borrow().state;
        Replica::recover(config, source, base).expect("a replica recovers")
    }

    fn now(&self) -> Now {
        Now {
            wall: Millis(1_700_000_000_000 + self.since_start.as_millis() as i64),
            since_start: self.since_start,
        }
    }

    /// Runs a replica's Readies, makes its writes durable and delivers its messages, until
    /// nothing moves.
    fn carry_out(&mut self, node: usize, mut fx: Effects) {
        let mut queue = vec![(node, std::mem::take(&mut fx))];
        while let Some((node, mut fx)) = queue.pop() {
            loop {
                let now = self.now();
                let disk = self.disks[node].borrow();
                self.replicas[node].advance(&disk.state, now, &mut fx);
                drop(disk);
                let write = fx.write.take();
                self.served
                    .extend(fx.reads.drain(..).map(|(token, answer)| {
                        answer.expect("a read served");
                        (node, token)
                    }));
                for message in fx.messages.drain(..) {
                    self.sent.push(message.clone());
                    let to = (0..3)
                        .find(|n| replica_id(*n) == message.receiver())
                        .expect("a peer");
                    let mut peer_fx = Effects::default();
                    self.replicas[to].step(message, now, &mut peer_fx);
                    queue.push((to, peer_fx));
                }
                match write {
                    Some(ops) => {
                        self.disks[node].borrow_mut().commit(ops);
                        let disk = self.disks[node].borrow();
                        self.replicas[node].persisted(&disk.state, &mut fx);
                    }
                    None => break,
                }
            }
        }
    }

    fn settle(&mut self) {
        for _ in 0..3 {
            for node in 0..3 {
                self.carry_out(node, Effects::default());
            }
        }
    }

    fn read(&mut self, node: usize, token: Token) {
        let mut fx = Effects::default();
        let now = self.now();
        self.replicas[node].read(token, now, &mut fx);
        self.carry_out(node, fx);
    }

    fn tick(&mut self, node: usize) {
        let mut fx = Effects::default();
        let now = self.now();
        self.replicas[node].tick(now, &mut fx);
        self.carry_out(node, fx);
    }

    fn sent_of(&self, kind: MessageKind) -> usize {
        self.sent.iter().filter(|m| m.kind() == kind).count()
    }
}
