//! Directed tests of a replica whose node shuts down ([`Replica::leave`]): leadership leaves
//! it at once, and never comes back while it is leaving.
//!
//! [`Replica::leave`]: crate::Replica::leave

use super::*;
use crate::Role;
use oneid_state::command::Command;

#[test]
fn a_leaving_leader_hands_off_to_a_follower_without_an_election() {
    let mut cluster = Cluster::new(0);
    let term = cluster.replicas[0].status().term;
    cluster.sent.clear();
    assert!(
        cluster.replicas[0].leave(),
        "it still leads while the transfer runs"
    );
    assert!(
        cluster.replicas[0].lease_read().is_none(),
        "its lease went first"
    );
    cluster.settle();
    assert!(!cluster.replicas[0].leave());
    assert_eq!(cluster.replicas[0].status().role, Role::Follower);
    // One of the two followers leads, one term on: a transfer, no election timeout waited.
    let leaders: Vec<usize> = (1..3)
        .filter(|n| cluster.replicas[*n].is_leader())
        .collect();
    assert_eq!(leaders.len(), 1);
    assert_eq!(cluster.replicas[leaders[0]].status().term, term + 1);
    assert_eq!(cluster.sent_of(MessageKind::TimeoutNow), 1);
    assert_eq!(cluster.sent_of(MessageKind::RequestPreVote), 0);
}

#[test]
fn a_leaving_replica_takes_no_transfer_and_never_campaigns() {
    let mut cluster = Cluster::new(1);
    assert!(!cluster.replicas[0].leave());
    // Node 0 is the placed leader: node 1 would hand leadership home 30 ticks on. Node 0
    // refuses it, and node 1 gives the transfer up at once: it takes proposals the same tick.
    for n in 1..=60 {
        cluster.since_start = TICK * n;
        for node in 0..3 {
            cluster.tick(node);
        }
        assert!(!cluster.replicas[0].is_leader(), "tick {n}");
        let (mut fx, now) = (Effects::default(), cluster.now());
        let clock = Command::Clock { target: now.wall };
        cluster.replicas[1].propose(&clock, Some(u64::from(n)), &mut fx);
        assert!(fx.replies.is_empty(), "tick {n}: refused {:?}", fx.replies);
        cluster.carry_out(1, fx);
    }
    assert!(cluster.replicas[1].is_leader());
    assert!(
        cluster
            .sent
            .iter()
            .any(|m| m.kind() == MessageKind::TimeoutNow && m.receiver() == replica_id(0)),
        "node 1 tried to hand leadership home"
    );
    // With node 1 gone silent, node 2 campaigns and wins with node 0's vote; node 0 never
    // stands.
    cluster.sent.clear();
    for n in 61..=120 {
        cluster.since_start = TICK * n;
        cluster.tick(0);
        cluster.tick(2);
        assert_ne!(cluster.replicas[0].status().role, Role::PreCandidate);
        assert_ne!(cluster.replicas[0].status().role, Role::Candidate);
    }
    assert!(cluster.replicas[2].is_leader());
    assert!(cluster.sent.iter().all(|m| m.sender() != replica_id(0)
        || !matches!(
            m.kind(),
            MessageKind::RequestPreVote | MessageKind::RequestVote
        )));
}
