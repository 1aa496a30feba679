//! Directed tests of leader leases (see `replica::core`): each rule of the safety argument,
//! on three replicas of one shard driven by hand (every message delivered at once, every
//! write durable at once, the time set by the test).

use super::world::{Disk, SimLog};
use crate::replica::core::{Effects, Now, Replica, ReplicaConfig, Token};
use oneid_protocol::ids::ShardId;
use oneid_protocol::num::Millis;
use oneid_protocol::rules::Rules;
use oneid_state::command::Retention;
use oneid_state::store::MemState;
use raft::eraftpb::{Message, MessageType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

pub(super) const SHARD: ShardId = ShardId(0);
pub(super) const TICK: Duration = Duration::from_millis(100);

pub(super) fn raft_id(node: usize) -> u64 {
    crate::config::raft_id(SHARD, node as u64 + 1)
}

pub(super) struct Cluster {
    disks: Vec<Rc<RefCell<Disk>>>,
    pub(super) replicas: Vec<Replica<SimLog>>,
    /// Every replica's monotonic clock (they all started together).
    pub(super) since_start: Duration,
    /// Messages that left, for the test to look at.
    pub(super) sent: Vec<Message>,
    /// Reads answered: (node, token).
    served: Vec<(usize, Token)>,
}

impl Cluster {
    /// Three replicas; the one on `leader` campaigns, and a round (a read on it) confirms its
    /// leadership and grants it a lease.
    pub(super) fn new(leader: usize) -> Cluster {
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

    pub(super) fn open(&self, node: usize, campaign: bool) -> Replica<SimLog> {
        let config = ReplicaConfig {
            shard: SHARD,
            n_shards: 1,
            raft_id: raft_id(node),
            bootstrap_voters: (0..3).map(raft_id).collect(),
            election_ticks: (10, 11),
            heartbeat_ticks: 1,
            campaign,
            clock_interval_ms: 1_000,
            retention: Retention {
                dedup_days: 7,
                ledger_days: 730,
                change_log_hours: 72,
                change_log_entries_max: 1_000_000,
            },
            passivate_idle_ticks: 50,
            activation_budget: 16,
            seed_rules: Rules::default(),
            log_retain_entries: 200,
            log_compact_entries: crate::replica::core::LOG_COMPACT_BATCH,
            life: node as u64,
            tick: TICK,
        };
        let source = SimLog {
            disk: Rc::clone(&self.disks[node]),
            shard: SHARD,
        };
        let disk = self.disks[node].borrow();
        let empty = MemState::default();
        let base = disk.states.get(&SHARD).unwrap_or(&empty);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        Replica::recover(config, source, base, &logger).expect("a replica recovers")
    }

    pub(super) fn now(&self) -> Now {
        Now {
            wall: Millis(1_700_000_000_000 + self.since_start.as_millis() as i64),
            since_start: self.since_start,
        }
    }

    /// Runs a replica's Readies, makes its writes durable and delivers its messages, until
    /// nothing moves.
    pub(super) fn carry_out(&mut self, node: usize, mut fx: Effects) {
        let mut queue = vec![(node, std::mem::take(&mut fx))];
        while let Some((node, mut fx)) = queue.pop() {
            loop {
                let now = self.now();
                {
                    let disk = self.disks[node].borrow();
                    let empty = MemState::default();
                    let base = disk.states.get(&SHARD).unwrap_or(&empty);
                    self.replicas[node].advance(base, now, &mut fx);
                }
                let write = fx.write.take();
                self.served
                    .extend(fx.reads.drain(..).map(|(token, answer)| {
                        answer.expect("a read served");
                        (node, token)
                    }));
                for message in fx.messages.drain(..) {
                    self.sent.push(message.clone());
                    let to = (0..3).find(|n| raft_id(*n) == message.to).expect("a peer");
                    super::assert_deliverable(node, to, SHARD.0, &message);
                    let mut peer_fx = Effects::default();
                    self.replicas[to].step(message, now, &mut peer_fx);
                    queue.push((to, peer_fx));
                }
                match write {
                    Some(ops) => {
                        self.disks[node].borrow_mut().commit(ops);
                        let disk = self.disks[node].borrow();
                        let empty = MemState::default();
                        let base = disk.states.get(&SHARD).unwrap_or(&empty);
                        self.replicas[node].persisted(base, &mut fx);
                    }
                    None => break,
                }
            }
        }
    }

    pub(super) fn settle(&mut self) {
        for _ in 0..3 {
            for node in 0..3 {
                self.carry_out(node, Effects::default());
            }
        }
    }

    pub(super) fn read(&mut self, node: usize, token: Token) {
        let mut fx = Effects::default();
        let now = self.now();
        self.replicas[node].read(token, now, &mut fx);
        self.carry_out(node, fx);
    }

    pub(super) fn tick(&mut self, node: usize) {
        let mut fx = Effects::default();
        let now = self.now();
        self.replicas[node].tick(now, &mut fx);
        self.carry_out(node, fx);
    }

    pub(super) fn sent_of(&self, kind: MessageType) -> usize {
        self.sent
            .iter()
            .filter(|m| m.get_msg_type() == kind)
            .count()
    }
}

#[test]
fn the_lease_is_two_ticks_short_of_the_election_timeout_less_a_fifth() {
    let cluster = Cluster::new(0);
    // (10 - 2) ticks of 100 ms, 80% of it.
    assert_eq!(cluster.replicas[0].lease(), Duration::from_millis(640));
    let (until, _) = cluster.replicas[0].lease_read().expect("a lease");
    assert_eq!(until, Duration::from_millis(640));
}

#[test]
fn a_leader_with_a_lease_serves_reads_and_answers_followers_without_a_round() {
    let mut cluster = Cluster::new(0);
    cluster.sent.clear();
    cluster.since_start = Duration::from_millis(100);
    cluster.read(0, 2);
    assert_eq!(cluster.served.last(), Some(&(0, 2)));
    assert!(cluster.sent.is_empty(), "no message: {:?}", cluster.sent);
    // A follower's read costs one request to the leader and its answer, no heartbeats.
    cluster.read(1, 3);
    assert_eq!(cluster.served.last(), Some(&(1, 3)));
    assert_eq!(cluster.sent_of(MessageType::MsgReadIndex), 1);
    assert_eq!(cluster.sent_of(MessageType::MsgReadIndexResp), 1);
    assert_eq!(cluster.sent_of(MessageType::MsgHeartbeat), 0);
}

#[test]
fn a_lease_past_half_is_renewed_and_one_that_ended_needs_a_round() {
    let mut cluster = Cluster::new(0);
    // Past half: served by the lease, and a round renews it from now.
    cluster.since_start = Duration::from_millis(400);
    cluster.sent.clear();
    cluster.read(0, 2);
    assert_eq!(cluster.served.last(), Some(&(0, 2)));
    assert_eq!(cluster.sent_of(MessageType::MsgHeartbeat), 2);
    let (until, _) = cluster.replicas[0].lease_read().expect("a lease");
    assert_eq!(until, Duration::from_millis(400 + 640));
    // At its end the lease is gone: the next read waits for a round, which grants a new one.
    cluster.since_start = until;
    cluster.sent.clear();
    let mut fx = Effects::default();
    let now = cluster.now();
    cluster.replicas[0].read(3, now, &mut fx);
    assert!(fx.reads.is_empty(), "not served before its round");
    assert!(cluster.replicas[0].lease_read().is_none());
    cluster.carry_out(0, fx);
    assert_eq!(cluster.served.last(), Some(&(0, 3)));
    assert_eq!(cluster.sent_of(MessageType::MsgHeartbeat), 2);
    assert!(cluster.replicas[0].lease_read().is_some());
}

#[test]
fn a_leader_that_hands_over_leadership_gives_up_its_lease_before_its_target_campaigns() {
    // Node 1 leads, but node 0 is the placed leader: 30 ticks later (or the next tick after
    // a clock entry) leadership goes home.
    let mut cluster = Cluster::new(1);
    let term = cluster.replicas[1].status().term;
    let mut handed_over = false;
    for n in 1..=40 {
        cluster.since_start = TICK * n;
        cluster.tick(0);
        cluster.tick(2);
        let (mut fx, now) = (Effects::default(), cluster.now());
        cluster.replicas[1].tick(now, &mut fx);
        cluster.replicas[1].advance(&MemState::default(), now, &mut fx);
        if fx
            .messages
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgTimeoutNow)
        {
            // Still leader, its lease already gone.
            assert!(cluster.replicas[1].is_leader());
            assert!(cluster.replicas[1].lease_read().is_none());
            handed_over = true;
        }
        cluster.carry_out(1, fx);
        if handed_over {
            break;
        }
        // Until then a read keeps the lease alive.
        cluster.read(1, 100 + u64::from(n));
        assert!(cluster.replicas[1].lease_read().is_some());
    }
    assert!(handed_over);
    assert!(cluster.replicas[0].is_leader());
    assert_eq!(cluster.replicas[0].status().term, term + 1);
}

#[test]
fn a_restarted_replica_refuses_votes_for_one_lease() {
    let mut cluster = Cluster::new(0);
    cluster.replicas[2] = cluster.open(2, false);
    cluster.since_start = Duration::ZERO;
    let vote = |term| {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgRequestPreVote);
        m.from = raft_id(1);
        m.to = raft_id(2);
        m.term = term;
        m.log_term = 100;
        m.index = 100;
        m
    };
    let term = cluster.replicas[2].status().term;
    let mut fx = Effects::default();
    let now = cluster.now();
    cluster.replicas[2].step(vote(term + 1), now, &mut fx);
    cluster.replicas[2].advance(&MemState::default(), now, &mut fx);
    assert!(fx.messages.is_empty(), "refused: {:?}", fx.messages);
    // One lease after its start it answers (and grants: it heard from no leader since).
    cluster.since_start = cluster.replicas[2].lease();
    let now = cluster.now();
    cluster.replicas[2].step(vote(term + 1), now, &mut fx);
    cluster.replicas[2].advance(&MemState::default(), now, &mut fx);
    let answer = fx.messages.first().expect("an answer");
    assert_eq!(
        answer.get_msg_type(),
        MessageType::MsgRequestPreVoteResponse
    );
    assert!(!answer.reject);
}
