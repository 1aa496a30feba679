//! Leader leases (see the crate's documentation): each rule of the safety argument.

use super::*;

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
    assert_eq!(cluster.sent_of(MessageKind::ReadIndex), 1);
    assert_eq!(cluster.sent_of(MessageKind::ReadIndexResponse), 1);
    assert_eq!(cluster.sent_of(MessageKind::Heartbeat), 0);
}

#[test]
fn a_lease_past_half_is_renewed_and_one_that_ended_needs_a_round() {
    let mut cluster = Cluster::new(0);
    // Past half: served by the lease, and a round renews it from now.
    cluster.since_start = Duration::from_millis(400);
    cluster.sent.clear();
    cluster.read(0, 2);
    assert_eq!(cluster.served.last(), Some(&(0, 2)));
    assert_eq!(cluster.sent_of(MessageKind::Heartbeat), 2);
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
    assert_eq!(cluster.sent_of(MessageKind::Heartbeat), 2);
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
        let timeout_now = fx
            .messages
            .iter()
            .any(|m| m.kind() == MessageKind::TimeoutNow);
        let transferring = cluster.replicas[1].raw.raft.lead_transferee.is_some();
        if timeout_now || transferring {
            // The transfer began (its target is told to campaign now, or once it holds the
            // entries a clock entry of the same tick added): still leader, its lease already
            // gone.
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
        assert!(cluster.replicas[1].lease_read().is_some(), "tick {n}");
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
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgRequestPreVote);
        m.from = replica_id(1);
        m.to = replica_id(2);
        m.term = term;
        m.log_term = 100;
        m.index = 100;
        Message {
            raft: m,
            stamped_by: replica_id(1),
            wall: Millis(0),
        }
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
    assert_eq!(answer.kind(), MessageKind::RequestPreVoteResponse);
    assert!(!answer.rejects());
}
