//! A deterministic simulation of whole clusters over the I/O-free replica core.
//!
//! Each run builds a cluster of 3 to 5 nodes from a seed, each node hosting replica cores of a
//! few shards (replication 3), and drives it in one thread from one event queue: ticks with
//! jitter, in-memory disks whose writes land only when their fsync does (a crash loses the
//! rest, and may fall between an fsync and its acknowledgement), a network that delays,
//! reorders, duplicates and drops messages and is partitioned (into two groups, or one link
//! cut while a third node talks to both) and healed, nodes that crash and
//! restart, nodes that stop gracefully (their replicas hand leadership off first) and
//! restart, nodes paused (as by SIGSTOP) that resume with a backlog, wall clocks seconds
//! apart that drift and are stepped forward and back, one of them days off
//! (`world/clocks.rs`), and clients that earn points and read balances through any replica, retrying
//! elsewhere when a replica cannot answer, and now and then install segment definitions
//! (`world/segments.rs`), which the leaders then backfill, and rules changes: the registry
//! orders them and clients install its version on every other shard, through any replica,
//! again until all have it (`world/rules.rs`); and in runs of several shards, a merger that
//! merges pairs of customers held by different shards, step by step through any replica,
//! while a nemesis crashes the node a step reached (`world/merges.rs`). Logs are kept short (a few entries, compacted
//! soon), so followers that were down or cut off catch up by snapshot, transferred over the
//! same network in small chunks (`world/transfer.rs`), with crashes made common around the
//! install's write; in a quarter of the runs one node's disk is wiped, and its restart is
//! refused as a node's is (`transport::handshake::may_join`), leaving its shards two
//! replicas. After the faults the cluster heals and must settle.
//!
//! The directed tests of leases and hand-offs, on replicas driven by hand, are the replica
//! crate's own (`node/replica/src/tests`).
//!
//! Invariants, on every run: no replica's shard clock past the time a majority of its voters'
//! clocks reached, and after settling every shard's clock close behind its voters' majority
//! time; at most one leader per term of a shard; replicas that made the
//! same applied index durable have the same digest, and after settling the same state; every
//! acknowledged earn is in the ledger exactly once and none is there twice; each profile's
//! history of earns and reads is linearizable ([`check`]); after settling, every replica's
//! members of each backfilled segment equal a brute-force evaluation of its predicate over
//! the shard's profiles; every merged pair is one live customer with both earns, its loser a
//! tombstone and its merging event applied once, every binding names a live profile that
//! holds it, and points are conserved across merges. Over 200 seeds or more (the default), every
//! rare fault of [`world::FAULTS_MET`] must have happened (so a change that made snapshots
//! never needed, say, cannot pass unnoticed).
//!
//! `ONEID_SIM_SEEDS=N` runs seeds 0..N (default 200); `ONEID_SIM_SEED=S` runs seed S alone. A
//! failing run names its seed, and that seed replays exactly: the only randomness is the
//! seeded generator, raft-rs's election timeouts are made fixed (`max = min + 1`), and nodes
//! differ by the seeded jitter of their ticks.

mod check;
mod world;

/// What a node would refuse from a peer (see `shards::peer_may_send`), no simulated replica
/// may send: `from` and `to` are node indexes (from 0).
fn assert_deliverable(
    from: usize,
    to: usize,
    shard: u32,
    message: &oneid_replica::message::Message,
) {
    assert!(
        crate::shards::peer_may_send(from as u64 + 1, to as u64 + 1, shard, message),
        "node {}: a message from node {} it would refuse: {message:?}",
        to + 1,
        from + 1
    );
}

fn seeds() -> Vec<u64> {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} must be a number, found {v:?}"))
        })
    };
    match var("ONEID_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..var("ONEID_SIM_SEEDS").unwrap_or(200)).collect(),
    }
}

#[test]
fn simulated_clusters_keep_their_invariants() {
    let (seeds, mut installs) = (seeds(), 0);
    let mut coverage = std::collections::BTreeMap::new();
    for &seed in &seeds {
        let run = std::panic::catch_unwind(|| world::run(seed))
            .unwrap_or_else(|panic| Err(format!("panicked: {panic:?}")));
        match run {
            Ok(summary) => {
                installs += summary.installs;
                for (step, n) in summary.coverage {
                    *coverage.entry(step).or_insert(0) += n;
                }
                if std::env::var_os("ONEID_SIM_SEED").is_some() {
                    eprintln!("seed {seed}: {}", summary.text);
                }
            }
            Err(failure) => panic!(
                "seed {seed} failed: {failure}\nreplay it: ONEID_SIM_SEED={seed} cargo test -p oneid-node simulated"
            ),
        }
    }
    // The runs must exercise snapshots: a change that made followers never need one (or
    // never get one) would pass every invariant above.
    if seeds.len() >= 200 {
        assert!(
            installs >= seeds.len() / 10,
            "only {installs} snapshots installed in {} runs",
            seeds.len()
        );
        for step in world::FAULTS_MET {
            assert!(
                coverage.get(step).is_some_and(|n| *n > 0),
                "no run met the fault {step:?}: {coverage:?}"
            );
        }
    }
    if std::env::var_os("ONEID_SIM_SEED").is_none() {
        eprintln!(
            "{} runs, {installs} snapshots installed; rare faults met: {coverage:?}",
            seeds.len()
        );
    }
}
