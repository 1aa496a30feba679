//! Segments in the simulation: clients now and then install a segment definition at a shard
//! (through whichever replica they reach, as the API does after the registry ordered it);
//! leaders backfill; and once the cluster settled and every due key fell due was processed,
//! every replica's membership of each segment whose backfill is done must equal a brute-force
//! evaluation of its predicate over every profile of the shard, with its rule tags evaluated
//! afresh. Predicates read points, tags (manual ones that expire, and rule tags), tier and
//! time. In one run in ten a client sends 1,100 profiles of shard 0 a tag expiring at one
//! instant (and some of them an order that makes them gold): a due backlog larger than one
//! clock entry's budget, which changes memberships as it drains.

use super::World;
use super::EPOCH_MS;
use oneid_protocol::event::Event;
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::num::{Millis, DAY_MS};
use oneid_protocol::predicate::Predicate;
use oneid_protocol::rules::{Rules, RulesDoc};
use oneid_replica::Effects;
use oneid_state::command::{Command, Routed, SegmentDef, Target};
use oneid_state::due::DUE_PER_CLOCK_MAX;
use oneid_state::profile::{rule_tags, Profile, RuleView};
use oneid_state::segments::SegmentRecord;
use oneid_state::{decode, keys, store::MemState};
use std::collections::BTreeSet;

/// What the simulated profiles can differ by: their balances (sums of distinct powers of two),
/// the bulk's tag and orders, the rule tag `big` (see [`rules`]), the tier, and time.
const PREDICATES: [&str; 9] = [
    "points >= 64",
    "points < 1000 and points > 3",
    "points >= 4096 or order_count > 0",
    "not points >= 16",
    "has_identity(\"phone\") and days_since(created_at) >= 0",
    "has_tag(\"promo\")",
    "has_tag(\"big\") or tier == \"gold\"",
    "not has_tag(\"promo\") and order_count > 0",
    "has_tag(\"lapsed\") and not has_tag(\"promo\")",
];

/// Profiles the bulk tags, and those it gives an order: together more due keys at one instant
/// than one clock entry processes.
const BULK_PROFILES: usize = 1_100;
const BULK_ORDERS: usize = 300;
const _: () = assert!(BULK_PROFILES > DUE_PER_CLOCK_MAX);
/// When (simulated milliseconds) the bulk's tags expire, all at once.
const BULK_EXPIRES_MS: i64 = 9_000;
/// When the bulk is sent, each time again (its events are deduplicated by id).
pub(super) const BULK_SENT_AT: [u64; 4] = [2_000, 3_500, 5_000, 7_000];
/// How often, in bulk runs, shard 0's leader is looked at for a due backlog to define a
/// segment during (its backfill then settles profiles whose due keys wait), and for how long.
pub(super) const BACKLOG_LOOK_MS: u64 = 50;
const BACKLOG_LOOKS_MAX: u32 = 400;
/// What the segment `s2` is in bulk runs: it reads a tag that time alone sets.
const LAPSED: &str = "has_tag(\"lapsed\") and not has_tag(\"promo\")";

/// The simulation's rules: a gold tier from a spend of 100, the rule tag `big` from 64
/// points, and `lapsed` a day after the last order (time alone sets it).
pub(super) fn rules() -> Rules {
    let doc: RulesDoc = serde_json::from_value(serde_json::json!({
        "tiers": {"levels": [{"name": "member", "min_spend": "0"},
                             {"name": "gold", "min_spend": "100"}]},
        "tag_rules": [{"tag": "big", "when": "points >= 64"},
                      {"tag": "lapsed", "when": "order_count > 0 and days_since(last_order_at) >= 1"}],
    }))
    .expect("the simulation's rules parse");
    doc.validate().expect("the simulation's rules are valid")
}

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
        let deleted = self.rng.u64(0..10) == 0;
        let predicate = PREDICATES[self.rng.usize(0..PREDICATES.len())];
        let n = self.rng.u32(0..3);
        self.install(node, shard, n, (!deleted).then_some(predicate));
    }

    /// In bulk runs: once shard 0's leader has a due backlog (what fell due waits for the next
    /// clock entry), redefines `s0` there with another predicate, whose backfill settles
    /// profiles at the clock before their due keys are processed; else looks again later.
    pub(super) fn define_during_backlog(&mut self, looks: u32) {
        let shard = ShardId(0);
        let leader = self.up_hosts(shard).into_iter().find(|n| {
            self.nodes[*n].replicas[&shard].status().role == oneid_replica::Role::Leader
                && self.nodes[*n]
                    .disk
                    .borrow()
                    .states
                    .get(&shard)
                    .is_some_and(|state| due_backlog(state) > 0)
        });
        match leader {
            Some(node) => {
                let predicate = PREDICATES[(self.segment_version % 2) as usize];
                self.install(node, shard, 0, Some(predicate));
                self.cover("a segment defined while a due backlog drained");
            }
            None if looks < BACKLOG_LOOKS_MAX => self.schedule(
                BACKLOG_LOOK_MS,
                super::Happening::DefineDuringBacklog { looks: looks + 1 },
            ),
            None => {}
        }
    }

    /// Proposes segment `s{n}`'s definition (`None`: deleted) at `node`'s replica of `shard`.
    fn install(&mut self, node: usize, shard: ShardId, n: u32, predicate: Option<&str>) {
        self.segment_version += 1;
        let def = SegmentDef {
            name: format!("s{n}"),
            id: u64::from(n) + 1,
            deleted: predicate.is_none(),
            predicate: predicate.unwrap_or_default().into(),
            description: String::new(),
            generation: self.segment_version,
            version: self.segment_version,
            created_at: Millis(0),
            updated_at: Millis(0),
        };
        let mut fx = Effects::default();
        self.replica(node, shard)
            .propose(&Command::InstallSegment(def), None, &mut fx);
        self.advance(node, shard, fx);
    }

    /// Sends the bulk through a replica of shard 0 (fire and forget, like a definition): one
    /// command tags 1,100 new profiles `promo` until [`BULK_EXPIRES_MS`], a second one gives
    /// 300 others an order of 150 (gold) dated a day before that, so that `lapsed` comes to
    /// them at the same instant (a rule review each). Those come last in OneID order, so they
    /// are the due keys the first clock entry past that instant leaves to the next; and nothing
    /// else changes them, so a segment reading `lapsed` that missed them stays wrong.
    pub(super) fn bulk_tags(&mut self) {
        let shard = ShardId(0);
        let hosts = self.up_hosts(shard);
        if hosts.is_empty() {
            return;
        }
        let node = hosts[self.rng.usize(0..hosts.len())];
        self.install(node, shard, 2, Some(LAPSED));
        let shards = self.shape.shards;
        let phones: Vec<String> = (0..)
            .map(|n| format!("b{n}"))
            .filter(|phone| {
                let identity = Identity {
                    kind: "phone".into(),
                    value: phone.clone(),
                };
                identity.shard(shards) == shard
            })
            .take(BULK_PROFILES + BULK_ORDERS)
            .collect();
        let (tagged, ordering) = phones.split_at(BULK_PROFILES);
        let ts = Millis(EPOCH_MS + self.now as i64).to_string();
        // Judged by the rules the replica has (they change before the bulk, if at all).
        let rules_version = self.replica(node, shard).state.rules_version();
        let ordered = Millis(EPOCH_MS + BULK_EXPIRES_MS - DAY_MS).to_string();
        let routed = |json: serde_json::Value| {
            let raw = serde_json::value::to_raw_value(&json).expect("json");
            Routed {
                event: Event::parse(&raw, None).expect("a valid event"),
                target: Target::Claim,
                rules_version,
                link_elsewhere: vec![],
                found: vec![],
            }
        };
        let tags = tagged
            .iter()
            .map(|phone| {
                routed(
                    serde_json::json!({"event_id": format!("bt-{phone}"), "type": "tag_add",
                    "identities": {"phone": phone}, "tag": "promo", "ts": ts,
                    "expires_at": Millis(EPOCH_MS + BULK_EXPIRES_MS).to_string()}),
                )
            })
            .collect();
        let orders = ordering
            .iter()
            .map(|phone| {
                routed(
                    serde_json::json!({"event_id": format!("bo-{phone}"), "type": "order",
                    "identities": {"phone": phone}, "order_id": format!("o-{phone}"),
                    "amount": "150", "ts": ordered}),
                )
            })
            .collect();
        for command in [Command::Events(tags), Command::Events(orders)] {
            let mut fx = Effects::default();
            self.replica(node, shard).propose(&command, None, &mut fx);
            self.advance(node, shard, fx);
        }
    }

    /// Whether every replica processed every due key that fell due by its shard's clock.
    pub(super) fn due_drained(&self) -> bool {
        (0..self.shape.shards).map(ShardId).all(|shard| {
            self.hosts(shard).into_iter().all(|node| {
                let disk = self.nodes[node].disk.borrow();
                disk.states
                    .get(&shard)
                    .is_none_or(|state| due_backlog(state) == 0)
            })
        })
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
        if self.shape.bulk_tags && self.bulk_expired() {
            self.cover("a due backlog over one clock entry's budget drained");
        }
        Ok(())
    }

    /// Whether the bulk applied and every one of its tags expired (on the first host of
    /// shard 0).
    fn bulk_expired(&self) -> bool {
        let node = self.hosts(ShardId(0))[0];
        let disk = self.nodes[node].disk.borrow();
        let Some(state) = disk.states.get(&ShardId(0)) else {
            return false;
        };
        let profiles: Vec<Profile> = scan(state, b"p").map(|(k, v)| decode(k, v)).collect();
        let bulk = profiles
            .iter()
            .filter(|p| {
                p.identities
                    .get("phone")
                    .is_some_and(|v| v.iter().any(|v| v.starts_with('b')))
            })
            .count();
        bulk == BULK_PROFILES + BULK_ORDERS && profiles.iter().all(|p| p.manual_tags.is_empty())
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

/// Due keys of a replica at or before its shard's clock: left to process.
fn due_backlog(state: &MemState) -> usize {
    let record: oneid_state::ShardRecord = state
        .0
        .get(keys::SHARD)
        .map(|b| decode(keys::SHARD, b))
        .unwrap_or_default();
    let end = keys::due_bound(Millis(record.clock.0 + 1));
    state.0.range(keys::DUE_PREFIX.to_vec()..end).count()
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
    let tag_rules = rules.compiled_tag_rules();
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
                    // Evaluated afresh: a stored rule tag left stale would pass unnoticed.
                    rule_tags: &rule_tags(profile, &rules, &tag_rules, record.clock),
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
