//! Segments in the simulation: clients now and then install a segment definition at a shard
//! (through whichever replica they reach, as the API does after the registry ordered it);
//! leaders backfill; and once the cluster settled, every replica's membership of each segment
//! whose backfill is done must equal a brute-force evaluation of its predicate over every
//! profile of the shard.

use super::World;
use oneid_protocol::ids::{OneId, ShardId};
use oneid_protocol::num::Millis;
use oneid_protocol::predicate::Predicate;
use oneid_protocol::rules::Rules;
use oneid_replica::Effects;
use oneid_state::command::{Command, SegmentDef};
use oneid_state::profile::{Profile, RuleView};
use oneid_state::segments::SegmentRecord;
use oneid_state::{decode, keys, store::MemState};
use std::collections::BTreeSet;

/// What the simulated profiles can differ by: their balances (sums of distinct powers of two).
const PREDICATES: [&str; 5] = [
    "points >= 64",
    "points < 1000 and points > 3",
    "points >= 4096 or order_count > 0",
    "not points >= 16",
    "has_identity(\"phone\") and days_since(created_at) >= 0",
];

impl World {
    /// Installs a random definition of one of three names at a random shard, at a version
    /// above every earlier one; fire and forget (a replica that does not lead drops it).
    pub(super) fn define_segment(&mut self) {
        let shard = ShardId(self.rng.u32(0..self.shape.shards));
        let hosts = self.up_hosts(shard);
        if hosts.is_empty() {
            return;
        }
        let node = hosts[self.rng.usize(0..hosts.len())];
        self.segment_version += 1;
        let deleted = self.rng.u64(0..10) == 0;
        let predicate = PREDICATES[self.rng.usize(0..PREDICATES.len())];
        let n = self.rng.u32(0..3);
        let def = SegmentDef {
            name: format!("s{n}"),
            id: u64::from(n) + 1,
            predicate: if deleted {
                String::new()
            } else {
                predicate.into()
            },
            description: String::new(),
            generation: self.segment_version,
            version: self.segment_version,
            created_at: Millis(0),
            updated_at: Millis(0),
            deleted,
        };
        let mut fx = Effects::default();
        self.replica(node, shard)
            .propose(&Command::InstallSegment(def), None, &mut fx);
        self.advance(node, shard, fx);
    }

    /// Every replica's members of each backfilled segment equal brute force.
    pub(super) fn check_segments(&mut self) -> Result<(), String> {
        let mut checked = 0;
        for shard in (0..self.shape.shards).map(ShardId) {
            for node in self.hosts(shard) {
                let disk = self.nodes[node].disk.borrow();
                let Some(state) = disk.states.get(&shard) else {
                    continue;
                };
                checked += check_replica(state, shard, node)?;
            }
        }
        if checked > 0 {
            self.cover("segment members checked against brute force");
        }
        Ok(())
    }
}

/// The pairs of a replica's state under `prefix`, in key order.
fn scan<'s>(
    state: &'s MemState,
    prefix: &[u8],
) -> impl Iterator<Item = (&'s Vec<u8>, &'s Vec<u8>)> {
    let prefix = prefix.to_vec();
    state
        .0
        .range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
}

/// Checks one replica's state; answers how many members it checked.
fn check_replica(state: &MemState, shard: ShardId, node: usize) -> Result<usize, String> {
    let rules: Rules = state
        .0
        .get(keys::RULES)
        .map(|b| decode(keys::RULES, b))
        .unwrap_or_default();
    let record: oneid_state::ShardRecord = state
        .0
        .get(keys::SHARD)
        .map(|b| decode(keys::SHARD, b))
        .unwrap_or_default();
    let profiles: Vec<Profile> = scan(state, b"p").map(|(k, v)| decode(k, v)).collect();
    let mut checked = 0;
    for (key, value) in scan(state, keys::SEGMENT_PREFIX) {
        let segment: SegmentRecord = decode(key, value);
        if segment.def.deleted || !segment.backfill_done() || record.rules_backfill.is_some() {
            continue;
        }
        let predicate =
            Predicate::parse(&segment.def.predicate).expect("installed predicates parse");
        let expected: BTreeSet<OneId> = profiles
            .iter()
            .filter(|profile| {
                predicate.eval(&RuleView {
                    profile,
                    rules: &rules,
                    now: record.clock,
                    rule_tags: &profile.rule_tags,
                })
            })
            .map(|profile| profile.oneid)
            .collect();
        let members: BTreeSet<OneId> = scan(state, &keys::members_prefix(&segment.def.name))
            .map(|(k, _)| keys::member_oneid(k))
            .collect();
        if members != expected || segment.size != members.len() as u64 {
            return Err(format!(
                "shard {shard} node {}: segment {} ({}) holds {} members (size {}), brute force {}",
                node + 1,
                segment.def.name,
                segment.def.predicate,
                members.len(),
                segment.size,
                expected.len()
            ));
        }
        checked += members.len();
    }
    Ok(checked)
}
