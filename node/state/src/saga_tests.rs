//! Merges across shards, folded without I/O: a cluster of in-memory shards, a small router
//! (resolution through tombstones, claims, follow-ups) and merge drivers, all stepped in a
//! seeded random interleaving, so that merges wait on each other's locks, find profiles merged
//! meanwhile, and race binds. After every seed, a union-find over the events' identities is
//! the oracle: one live profile per connected component, holding exactly its identities, each
//! bound to it; every event applied exactly once (its retry is a duplicate of the survivor);
//! points conserved.

use super::merge::{Cause, MergeId, MergePlan, MergeState};
use super::merge_driver::{Driver, Ended, Next};
use super::profile::Profile;
use super::tests::{digest_of, event, T0};
use super::unlink::UnlinkRecord;
use super::*;
use crate::command::{Found, MergeStep, Routed};
use oneid_protocol::api::NotLinkedReason;
use serde_json::json;
use std::collections::BTreeMap;
use store::MemState;

pub(super) struct Shard {
    pub(super) mem: MemState,
    pub(super) state: ShardState,
    index: u64,
}

pub(super) struct Cluster {
    pub(super) shards: Vec<Shard>,
    pub(super) n_shards: u32,
}

impl Cluster {
    pub(super) fn new(n_shards: u32) -> Cluster {
        Cluster::with_rules(n_shards, "{}")
    }

    /// A cluster of `n_shards` shards with the rules of `rules` (a rules document).
    fn with_rules(n_shards: u32, rules: &str) -> Cluster {
        let rules = tests::rules(rules);
        let mut cluster = Cluster {
            shards: (0..n_shards)
                .map(|s| {
                    let mem = MemState::default();
                    let state = ShardState::load(ShardId(s), n_shards, &mem, 64);
                    Shard {
                        mem,
                        state,
                        index: 0,
                    }
                })
                .collect(),
            n_shards,
        };
        for s in 0..n_shards {
            cluster.apply(ShardId(s), Command::SetRules(Box::new(rules.clone())));
            cluster.apply(ShardId(s), Command::Clock { target: Millis(T0) });
        }
        cluster
    }

    /// Applies a command at the shard's next index (a clock entry far ahead moves the clock as
    /// the entries catching it up would, see `tests::catch_up`).
    pub(super) fn apply(&mut self, shard: ShardId, command: Command) -> Output {
        let shard = &mut self.shards[shard.0 as usize];
        tests::catch_up(&mut shard.state, &command);
        shard.index += 1;
        let mut writes = WriteSet::default();
        let output = shard
            .state
            .apply(&shard.mem, &mut writes, shard.index, 1, command);
        shard.mem.commit(writes);
        assert_eq!(shard.state.meta.digest, digest_of(&shard.mem), "digest");
        output
    }

    pub(super) fn get<T: serde::de::DeserializeOwned>(
        &self,
        shard: ShardId,
        key: &[u8],
    ) -> Option<T> {
        self.shards[shard.0 as usize]
            .mem
            .get(key)
            .map(|bytes| decode(key, &bytes))
    }

    pub(super) fn binding(&self, identity: &Identity) -> Option<OneId> {
        self.get(identity.shard(self.n_shards), &keys::identity(identity))
    }

    /// The live profile a OneID resolves to, through tombstones.
    fn live(&self, mut oneid: OneId) -> OneId {
        for _ in 0..100 {
            match self.get::<merge::Tombstone>(oneid.shard(), &keys::tombstone(oneid)) {
                Some(tombstone) => oneid = tombstone.into,
                None => return oneid,
            }
        }
        panic!("a chain of tombstones from {oneid}")
    }

    pub(super) fn profiles(&self) -> Vec<Profile> {
        self.shards
            .iter()
            .flat_map(|shard| shard.mem.0.iter())
            .filter(|(key, _)| key.first() == Some(&b'p'))
            .map(|(key, value)| decode(key, value))
            .collect()
    }

    fn deduped(&self, oneid: OneId, event_id: &str) -> bool {
        self.shards[oneid.shard().0 as usize]
            .mem
            .get(&keys::dedup(oneid, event_id))
            .is_some()
    }
}

/// A unit of work the scheduler steps.
enum Task {
    Route(Event),
    Merge(Box<Driver>),
    Bind(FollowUp),
}

/// What the scheduler saw happen.
#[derive(Default)]
struct Seen {
    /// Event id → how many times it was answered applied.
    applied: BTreeMap<String, usize>,
    /// Events refused for what they asked (a redeem past the balance).
    rejected: BTreeSet<String>,
    merges_finished: usize,
    /// Of those, refused by the policy.
    merges_refused: usize,
    merges_given_up: usize,
    waits: usize,
    unlinks: usize,
}

struct World {
    cluster: Cluster,
    tasks: Vec<Task>,
    seen: Seen,
    rng: u64,
}

impl World {
    fn new(cluster: Cluster, seed: u64) -> World {
        World {
            cluster,
            tasks: Vec::new(),
            seen: Seen::default(),
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        }
    }

    /// Steps the tasks in a random order until none is left.
    fn settle(&mut self) {
        for _ in 0..1_000_000 {
            if self.tasks.is_empty() {
                return;
            }
            let i = self.next(self.tasks.len());
            let task = self.tasks.swap_remove(i);
            let more = self.step(task);
            self.tasks.extend(more);
        }
        panic!("the tasks did not end");
    }

    /// Routes an event (JSON, as a client sends it) and everything it leads to.
    fn send(&mut self, json: serde_json::Value) {
        self.tasks.push(Task::Route(event(&json)));
        self.settle();
    }

    fn next(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }

    /// Steps one task; answers the tasks it leaves.
    fn step(&mut self, task: Task) -> Vec<Task> {
        match task {
            Task::Route(event) => self.route(event),
            Task::Merge(driver) => self.drive(*driver),
            Task::Bind(follow_up) => self.bind(follow_up),
        }
    }

    #[allow(clippy::too_many_lines)]
    fn route(&mut self, mut event: Event) -> Vec<Task> {
        let c = &self.cluster;
        let unlink = event.body == EventBody::Unlink;
        if unlink {
            // A client's unlink of what it looked up just now: from the profile its first
            // identity is bound to.
            let Some(holder) = c.binding(&event.identities[0]) else {
                self.seen.rejected.insert(event.event_id);
                return Vec::new();
            };
            event.oneid = Some(c.live(holder));
        }
        let bound: Vec<Option<OneId>> = event
            .identities
            .iter()
            .map(|id| c.binding(id).map(|oneid| c.live(oneid)))
            .filter(|_| !unlink)
            .collect();
        let mut profiles: BTreeSet<OneId> = bound.iter().flatten().copied().collect();
        profiles.extend(event.oneid.filter(|_| unlink));
        let found = bound
            .iter()
            .chain(std::iter::repeat(&None))
            .take(event.identities.len())
            .map(|b| match b {
                Some(oneid) => Found::Bound {
                    oneid: *oneid,
                    epoch: command::EPOCH_UNKNOWN,
                },
                None => Found::Unbound,
            })
            .collect();
        let (shard, target) = match profiles.iter().next() {
            Some(&oneid) => (oneid.shard(), Target::Existing(oneid)),
            None => {
                let anchor = event
                    .identities
                    .iter()
                    .min()
                    .expect("events have identities");
                (anchor.shard(c.n_shards), Target::Claim)
            }
        };
        let link_elsewhere = event
            .identities
            .iter()
            .zip(&bound)
            .filter(|(id, b)| b.is_none() && (profiles.len() > 1 || id.shard(c.n_shards) != shard))
            .filter(|_| !unlink)
            .map(|(id, _)| id.clone())
            .collect();
        let routed = Routed {
            event: event.clone(),
            target,
            rules_version: 0,
            link_elsewhere,
            found,
        };
        if profiles.len() > 1 {
            let plan = MergePlan::new(profiles, Cause::Event(Box::new(routed)), 0);
            return vec![Task::Merge(Box::new(Driver::new(plan, c.n_shards)))];
        }
        let output = self.cluster.apply(shard, Command::Events(vec![routed]));
        let Output::Events {
            mut outcomes,
            follow_ups,
        } = output
        else {
            panic!("events answered {output:?}")
        };
        match outcomes.remove(0) {
            EventOutcome::Applied(..) => {
                self.seen.unlinks += usize::from(unlink);
                *self.seen.applied.entry(event.event_id).or_default() += 1;
                follow_ups.into_iter().map(Task::Bind).collect()
            }
            // Merged meanwhile: routed again.
            EventOutcome::Moved(_) => vec![Task::Route(event)],
            // Being merged, or an identity bound to another profile since it was resolved.
            EventOutcome::Rejected(e) if e.code == ErrorCode::Unavailable => {
                self.seen.waits += 1;
                vec![Task::Route(event)]
            }
            EventOutcome::Rejected(e) if refused_for_what_it_asks(&e) => {
                self.seen.rejected.insert(event.event_id);
                Vec::new()
            }
            other => panic!("{} answered {other:?}", event.event_id),
        }
    }

    fn drive(&mut self, mut driver: Driver) -> Vec<Task> {
        match driver.next() {
            Next::Propose(mut steps) => {
                // The steps proposed at once apply in any order: one of them at random.
                let (shard, step) = steps.swap_remove(self.next(steps.len()));
                let output = self.cluster.apply(shard, Command::Merge(step.clone()));
                let Output::Merge(answer) = output else {
                    panic!("a merge step answered {output:?}")
                };
                if driver.answer(&step, answer).is_some() {
                    self.seen.waits += 1;
                }
                vec![Task::Merge(Box::new(driver))]
            }
            Next::Done(Ended::Finished(record, follow_ups)) => {
                self.seen.merges_finished += 1;
                if matches!(record.state, MergeState::Refused(..)) {
                    self.seen.merges_refused += 1;
                }
                let (MergeState::Finished(outcome) | MergeState::Refused(_, outcome)) =
                    &record.state
                else {
                    panic!("a merge ended while importing")
                };
                let Some(follow_ups) = follow_ups else {
                    // Another driver ended it, and answered its cause.
                    return Vec::new();
                };
                let mut tasks: Vec<Task> = follow_ups.into_iter().map(Task::Bind).collect();
                match outcome {
                    Some(EventOutcome::Applied(survivor, not_linked)) => {
                        let event_id = record.plan.event_id().expect("an event's merge");
                        *self.seen.applied.entry(event_id.to_string()).or_default() += 1;
                        // Identities another profile took meanwhile call for another merge.
                        for taken in not_linked
                            .iter()
                            .filter(|n| n.reason == NotLinkedReason::Taken)
                        {
                            let identity = Identity {
                                kind: taken.kind.clone(),
                                value: taken.value.clone(),
                            };
                            tasks.extend(self.taken(&identity, &[*survivor]));
                        }
                    }
                    None => {}
                    // Routed by a binding an unlink removed meanwhile: merged, and sent again.
                    Some(EventOutcome::Rejected(e)) if e.code == ErrorCode::Unavailable => {
                        self.seen.waits += 1;
                        let Cause::Event(routed) = &record.plan.cause else {
                            panic!("a taken bind's merge answered {e:?}")
                        };
                        tasks.push(Task::Route(routed.event.clone()));
                    }
                    Some(EventOutcome::Rejected(e)) if refused_for_what_it_asks(e) => {
                        let event_id = record.plan.event_id().expect("an event's merge");
                        self.seen.rejected.insert(event_id.to_string());
                    }
                    Some(other) => panic!("a merge's cause answered {other:?}"),
                }
                tasks
            }
            Next::Done(Ended::GaveUp(..) | Ended::Abandoned) => {
                self.seen.merges_given_up += 1;
                match &driver.plan().cause {
                    Cause::Event(routed) => vec![Task::Route(routed.event.clone())],
                    Cause::Taken(identity) => self.taken(identity, &driver.plan().profiles),
                }
            }
        }
    }

    /// A merge a taken bind called for, given up: called for again between the profiles the
    /// identity and the follow-up's profile resolve to now, if they still differ.
    fn taken(&self, identity: &Identity, profiles: &[OneId]) -> Vec<Task> {
        let c = &self.cluster;
        let mut profiles: BTreeSet<OneId> = profiles.iter().map(|p| c.live(*p)).collect();
        profiles.extend(c.binding(identity).map(|oneid| c.live(oneid)));
        if profiles.len() < 2 {
            return Vec::new();
        }
        let plan = MergePlan::new(profiles, Cause::Taken(identity.clone()), 0);
        vec![Task::Merge(Box::new(Driver::new(plan, c.n_shards)))]
    }

    fn bind(&mut self, follow_up: FollowUp) -> Vec<Task> {
        let shard = follow_up.identity.shard(self.cluster.n_shards);
        let pair = vec![(follow_up.identity.clone(), follow_up.oneid)];
        let command = if follow_up.unbind {
            Command::Unbind(pair)
        } else {
            Command::Bind(pair)
        };
        let Output::Bind(outcomes) = self.cluster.apply(shard, command) else {
            panic!("a bind answered otherwise")
        };
        let outcome = outcomes[0];
        let answer = FollowUpAnswer {
            seq: follow_up.seq,
            outcome,
        };
        self.cluster.apply(
            follow_up.oneid.shard(),
            Command::FinishFollowUps(vec![answer]),
        );
        match outcome {
            BindOutcome::Conflict(_) => self.taken(&follow_up.identity, &[follow_up.oneid]),
            BindOutcome::Bound | BindOutcome::Unbound => Vec::new(),
        }
    }
}

/// Whether an event was refused for what it asked (not for where it went): a redeem past the
/// balance, an order id its profile holds.
fn refused_for_what_it_asks(error: &EventError) -> bool {
    matches!(
        error.code,
        // The last: an unlink of an identity whose bind to the profile is still pending.
        ErrorCode::InsufficientPoints | ErrorCode::DuplicateOrder | ErrorCode::NotFound
    )
}

/// Disjoint sets over identities: the customers the events describe.
struct UnionFind(BTreeMap<Identity, Identity>);

impl UnionFind {
    fn root(&mut self, id: &Identity) -> Identity {
        let parent = self
            .0
            .entry(id.clone())
            .or_insert_with(|| id.clone())
            .clone();
        if parent == *id {
            return parent;
        }
        let root = self.root(&parent);
        self.0.insert(id.clone(), root.clone());
        root
    }

    fn union(&mut self, a: &Identity, b: &Identity) {
        let (a, b) = (self.root(a), self.root(b));
        if a != b {
            let (low, high) = if a < b { (a, b) } else { (b, a) };
            self.0.insert(high, low);
        }
    }

    fn components(mut self) -> BTreeMap<Identity, BTreeSet<Identity>> {
        let ids: Vec<Identity> = self.0.keys().cloned().collect();
        let mut out: BTreeMap<Identity, BTreeSet<Identity>> = BTreeMap::new();
        for id in ids {
            let root = self.root(&id);
            out.entry(root).or_default().insert(id);
        }
        out
    }
}

/// `n_events` earns naming 1 to 3 identities each, from a pool of `pool`, all routed at once
/// and stepped in a seeded random order; then the oracle.
fn run(seed: u64, n_events: usize, pool: usize) -> Seen {
    let mut world = World::new(Cluster::new(4), seed);
    let kinds = ["phone", "email", "wechat_unionid", "taobao_nick"];
    let mut events = Vec::new();
    let mut points = 0;
    for i in 0..n_events {
        let mut identities = serde_json::Map::new();
        for _ in 0..1 + world.next(3) {
            let v = world.next(pool);
            identities.insert(kinds[v % kinds.len()].into(), json!(format!("v{v}")));
        }
        let earn = 1 + (i % 7) as i64;
        points += earn;
        events.push(event(
            &json!({"event_id": format!("e{i}"), "type": "points_earn",
            "identities": identities, "points": earn}),
        ));
    }
    world.tasks = events.iter().cloned().map(Task::Route).collect();
    world.settle();
    check(&mut world, &events, points, seed);
    world.seen
}

/// The oracle (see the module's comment).
#[allow(clippy::too_many_lines)]
fn check(world: &mut World, events: &[Event], points: i64, seed: u64) {
    let mut sets = UnionFind(BTreeMap::new());
    for event in events {
        let first = &event.identities[0];
        sets.root(first);
        for other in &event.identities[1..] {
            sets.union(first, other);
        }
    }
    let components = sets.components();
    let c = &world.cluster;
    let profiles = c.profiles();
    assert_eq!(
        profiles.len(),
        components.len(),
        "seed {seed}: one profile per customer"
    );
    for identities in components.values() {
        let owner = c.binding(identities.first().unwrap()).expect("bound");
        for identity in identities {
            assert_eq!(
                c.binding(identity),
                Some(owner),
                "seed {seed}: {identity:?}"
            );
        }
        let profile = profiles.iter().find(|p| p.oneid == owner);
        let profile = profile.unwrap_or_else(|| panic!("seed {seed}: {owner} is not live"));
        let held: BTreeSet<Identity> = profile
            .identities
            .iter()
            .flat_map(|(k, vs)| {
                vs.iter().map(|v| Identity {
                    kind: k.clone(),
                    value: v.clone(),
                })
            })
            .collect();
        assert_eq!(
            &held, identities,
            "seed {seed}: {owner} holds its customer's identities"
        );
        assert!(
            profile.merging.is_none(),
            "seed {seed}: {owner} is still locked"
        );
    }
    let balance: i64 = profiles.iter().map(|p| p.balance).sum();
    let earned: i64 = profiles.iter().map(|p| p.lifetime_earned).sum();
    assert_eq!(
        (balance, earned),
        (points, points),
        "seed {seed}: points conserved"
    );
    for event in events {
        assert_eq!(
            world.seen.applied.get(&event.event_id),
            Some(&1),
            "seed {seed}: {} applied once",
            event.event_id
        );
    }
    for shard in &c.shards {
        assert_eq!(shard.state.record.follow_ups_pending, 0, "seed {seed}");
        assert_eq!(shard.state.record.merges_pending, 0, "seed {seed}");
        assert!(!shard.mem.0.keys().any(|k| k.starts_with(keys::LOCK_PREFIX)));
    }
    // A retry of any event is a duplicate, answered with its customer's profile, and changes
    // nothing (by identities; and by the OneID it first applied to, merged or not).
    let before: Vec<MemState> = c.shards.iter().map(|s| MemState(s.mem.0.clone())).collect();
    for event in events {
        let c = &world.cluster;
        let owner = c.binding(&event.identities[0]).expect("bound");
        assert!(
            c.deduped(owner, &event.event_id),
            "seed {seed}: {} deduped",
            event.event_id
        );
        let routed = Routed {
            event: event.clone(),
            target: Target::Existing(owner),
            rules_version: 0,
            link_elsewhere: Vec::new(),
            found: Vec::new(),
        };
        let output = world
            .cluster
            .apply(owner.shard(), Command::Events(vec![routed]));
        let Output::Events { outcomes, .. } = output else {
            panic!("events answered {output:?}")
        };
        assert_eq!(
            outcomes,
            vec![EventOutcome::Duplicate(owner)],
            "seed {seed}"
        );
    }
    for (shard, before) in world.cluster.shards.iter().zip(before) {
        assert_eq!(
            tests::without_meta(&shard.mem),
            tests::without_meta(&before)
        );
    }
}

/// Earns, orders, redeems and unlinks over identities of four kinds, one of them limited to
/// one value per profile (so some merges are refused), stepped in a seeded random order; then
/// what must hold whatever merged or was unlinked: every event answered once, totals
/// conserved, every binding pointing at a live profile that lists it and every listed identity
/// bound to its profile, nothing left locked or pending.
#[allow(clippy::too_many_lines)]
fn run_mixed(seed: u64, n_events: usize, pool: usize) -> Seen {
    let rules = r#"{"identity": {"kinds": {"member_card": {"max_per_profile": 1,
        "priority": 5}}}}"#;
    let mut world = World::new(Cluster::with_rules(4, rules), seed);
    let kinds = ["phone", "email", "member_card", "taobao_nick"];
    let mut events = Vec::new();
    for i in 0..n_events {
        let mut identities = serde_json::Map::new();
        for _ in 0..1 + world.next(3) {
            let v = world.next(pool);
            identities.insert(kinds[v % kinds.len()].into(), json!(format!("v{v}")));
        }
        let body = match world.next(8) {
            0..=2 => json!({"type": "points_earn", "points": 1 + world.next(9)}),
            3 | 4 => json!({"type": "order", "order_id": format!("O{}", world.next(8)),
                "amount": format!("{}", 1 + world.next(50))}),
            5 | 6 => json!({"type": "points_redeem", "points": 1 + world.next(9)}),
            // From whichever profile holds its first identity when it is routed.
            _ => json!({"type": "unlink", "oneid": OneId::mint(ShardId(0), 1).to_string()}),
        };
        let mut json = body;
        json["event_id"] = json!(format!("e{i}"));
        json["identities"] = serde_json::Value::Object(identities);
        events.push(event(&json));
    }
    world.tasks = events.iter().cloned().map(Task::Route).collect();
    world.settle();
    let c = &world.cluster;
    let profiles = c.profiles();
    for event in &events {
        let applied = world
            .seen
            .applied
            .get(&event.event_id)
            .copied()
            .unwrap_or(0);
        let rejected = world.seen.rejected.contains(&event.event_id);
        assert!(
            (applied == 1) != rejected,
            "seed {seed}: {} applied {applied} times, rejected {rejected}",
            event.event_id
        );
    }
    let sum = |f: fn(&Profile) -> i64| profiles.iter().map(f).sum::<i64>();
    let redeemed: i64 = events
        .iter()
        .filter(|e| world.seen.applied.contains_key(&e.event_id))
        .filter_map(|e| match &e.body {
            EventBody::PointsRedeem { points, .. } => Some(*points),
            _ => None,
        })
        .sum();
    assert_eq!(sum(|p| p.lifetime_redeemed), redeemed, "seed {seed}");
    assert_eq!(
        sum(|p| p.balance),
        sum(|p| p.lifetime_earned) - redeemed,
        "seed {seed}: points conserved"
    );
    for profile in &profiles {
        assert!(
            profile.merging.is_none(),
            "seed {seed}: {} locked",
            profile.oneid
        );
        for (kind, values) in &profile.identities {
            for value in values {
                let bound = c.binding(&id(kind, value));
                assert_eq!(bound, Some(profile.oneid), "seed {seed}: {kind}:{value}");
            }
        }
    }
    for shard in &c.shards {
        assert_eq!(shard.state.record.follow_ups_pending, 0, "seed {seed}");
        assert_eq!(shard.state.record.merges_pending, 0, "seed {seed}");
        assert!(!shard.mem.0.keys().any(|k| k.starts_with(keys::LOCK_PREFIX)));
        for (key, value) in shard.mem.0.range(vec![b'i']..vec![b'j']) {
            let oneid: OneId = decode(key, value);
            let holder = profiles.iter().find(|p| p.oneid == oneid);
            let identity = keys::identity_in(key);
            assert!(
                holder.is_some_and(|p| p.holds(&identity)),
                "seed {seed}: {identity:?} bound to {oneid}, which does not hold it"
            );
        }
        for (key, value) in shard.mem.0.range(vec![b'u']..vec![b'v']) {
            let record: UnlinkRecord = decode(key, value);
            assert!(!record.unbinding, "seed {seed}: an unbind left pending");
        }
    }
    world.seen
}

#[test]
fn merges_and_unlinks_conserve_points_and_leave_every_binding_live() {
    let seeds: u64 = std::env::var("ONEID_SAGA_SEEDS").map_or(60, |s| s.parse().unwrap());
    let (mut merges, mut refused, mut rejected, mut unlinks) = (0, 0, 0, 0);
    for seed in 0..seeds {
        let seen = run_mixed(seed, 40, 24);
        merges += seen.merges_finished;
        refused += seen.merges_refused;
        rejected += seen.rejected.len();
        unlinks += seen.unlinks;
    }
    eprintln!(
        "{seeds} seeds: {merges} merges ended, {refused} refused, {rejected} events rejected, {unlinks} unlinks applied"
    );
    assert!(merges > seeds as usize && refused > 0 && rejected > 0 && unlinks > seeds as usize);
}

#[test]
fn merges_in_any_interleaving_end_with_one_profile_per_customer_and_every_point() {
    let seeds: u64 = std::env::var("ONEID_SAGA_SEEDS").map_or(60, |s| s.parse().unwrap());
    let (mut merges, mut waits, mut given_up) = (0, 0, 0);
    for seed in 0..seeds {
        let seen = run(seed, 40, 30);
        merges += seen.merges_finished;
        waits += seen.waits;
        given_up += seen.merges_given_up;
    }
    eprintln!("{seeds} seeds: {merges} merges finished, {given_up} given up, {waits} waits");
    // The runs must have met what they are here for.
    assert!(merges > seeds as usize, "{merges} merges in {seeds} seeds");
    assert!(waits > 0, "no merge ever waited");
}

fn id(kind: &str, value: &str) -> Identity {
    Identity {
        kind: kind.into(),
        value: value.into(),
    }
}

/// Two customers on different shards, with an order id both hold, a segment, tags and
/// attributes; an event that names both merges them, and everything moves.
#[test]
#[allow(clippy::too_many_lines)]
fn a_merge_moves_orders_points_and_memberships_and_leaves_a_tombstone() {
    let mut world = World::new(Cluster::new(4), 1);
    let define = Command::DefineSegment(crate::command::SegmentDefine {
        name: "buyers".into(),
        predicate: Some("order_count >= 1".into()),
        description: String::new(),
    });
    let Output::Segment(Ok((def, true))) = world.cluster.apply(ShardId(0), define) else {
        panic!("defined")
    };
    for s in 1..4 {
        world
            .cluster
            .apply(ShardId(s), Command::InstallSegment(def.clone()));
    }
    // A (phone) first, then B (unionid): same priority, so the earlier minted, A, survives.
    // Phone "a1" and unionid "b1" are held by different shards (checked below).
    let (phone, unionid) = (id("phone", "a1"), id("wechat_unionid", "b7"));
    assert_ne!(phone.shard(4), unionid.shard(4));
    world.send(
        json!({"event_id": "a-order", "type": "order", "identities": {"phone": "a1"},
        "order_id": "T1", "amount": "100", "ts": Millis(T0 - 3_000).to_string()}),
    );
    world.send(json!({"event_id": "b-order", "type": "order",
        "identities": {"wechat_unionid": "b7"}, "order_id": "T1", "amount": "50",
        "ts": Millis(T0 - 2_000).to_string()}));
    world.send(json!({"event_id": "b-order-2", "type": "order",
        "identities": {"wechat_unionid": "b7"}, "order_id": "T2", "amount": "80",
        "ts": Millis(T0 - 1_000).to_string()}));
    let c = &world.cluster;
    let (a, b) = (c.binding(&phone).unwrap(), c.binding(&unionid).unwrap());
    assert_ne!(a.shard(), b.shard());
    let b_before = c.profiles().into_iter().find(|p| p.oneid == b).unwrap();
    assert_eq!(b_before.balance, 130);

    world.send(json!({"event_id": "both", "type": "points_earn",
        "identities": {"phone": "a1", "wechat_unionid": "b7"}, "points": 7}));
    let c = &world.cluster;
    assert_eq!(c.binding(&unionid), Some(a), "B's identity is repointed");
    assert_eq!(c.live(b), a);
    let profiles = c.profiles();
    assert_eq!(profiles.len(), 1);
    let s = &profiles[0];
    assert_eq!((s.oneid, s.balance, s.order_count), (a, 100 + 130 + 7, 3));
    assert_eq!(s.total_spend.to_string(), "230.00");
    assert_eq!(s.merged_from, vec![b]);
    assert_eq!(s.identities.len(), 2);
    // The survivor keeps its T1; B's is kept under a twin id; B's T2 is the survivor's now.
    let order = |oneid: OneId, order_id: &str| -> Option<OrderRecord> {
        c.get(oneid.shard(), &keys::order(oneid, order_id))
    };
    assert_eq!(order(a, "T1").unwrap().event_id, "a-order");
    assert_eq!(
        order(a, &keys::twin_order_id("T1", b)).unwrap().event_id,
        "b-order"
    );
    assert_eq!(order(a, "T2").unwrap().event_id, "b-order-2");
    assert_eq!(order(b, "T2"), None, "the loser's orders are gone");
    let merge = MergeId::of(
        &[a, b]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>(),
        &Cause::Event(Box::new(Routed {
            event: event(&json!({"event_id": "both", "type": "identify",
                "identities": {"phone": "a1"}})),
            target: Target::Claim,
            rules_version: 0,
            link_elsewhere: vec![],
            found: vec![],
        })),
    );
    let record: merge::MergeRecord = c.get(a.shard(), &keys::merge(merge)).expect("record");
    assert_eq!(record.twins, vec!["T1".to_string()]);
    assert!(matches!(
        record.state,
        MergeState::Finished(Some(EventOutcome::Applied(oneid, _))) if oneid == a
    ));
    assert!(c.get::<()>(a.shard(), &keys::merged(a, merge)).is_some());
    let tombstone: merge::Tombstone = c.get(b.shard(), &keys::tombstone(b)).unwrap();
    assert_eq!((tombstone.into, tombstone.merge), (a, merge));
    // B's ledger ends with everything going out; the survivor's has one entry per lot in.
    let ledger = |oneid: OneId| -> Vec<LedgerRecord> {
        let shard = &c.shards[oneid.shard().0 as usize];
        shard
            .mem
            .0
            .range(keys::ledger_prefix(oneid)..)
            .take_while(|(k, _)| k.starts_with(&keys::ledger_prefix(oneid)))
            .map(|(k, v)| decode(k, v))
            .collect()
    };
    let mut b_ledger = ledger(b);
    let out = b_ledger.pop().unwrap();
    assert_eq!(
        (out.kind, out.points, out.peer),
        (LedgerKind::MergeOut, -130, Some(a))
    );
    // Dated no earlier than what came before it (the shard clock lags the events' times).
    assert!(b_ledger.iter().all(|r| r.at <= out.at));
    let ins: Vec<i64> = ledger(a)
        .iter()
        .filter(|r| r.kind == LedgerKind::MergeIn)
        .map(|r| r.points)
        .collect();
    assert_eq!(ins.iter().sum::<i64>(), 130);
    // Memberships: B left "buyers" (an exit naming A), A was in it and did not enter again.
    let changes: Vec<(OneId, segments::Change)> = c
        .shards
        .iter()
        .flat_map(|shard| shard.mem.0.iter())
        .filter(|(k, _)| k.first() == Some(&b'k'))
        .flat_map(|(k, v)| decode::<Vec<segments::ChangeRecord>>(k, v))
        .map(|r| (r.oneid, r.change))
        .collect();
    let count = |oneid, change| changes.iter().filter(|c| **c == (oneid, change)).count();
    assert_eq!(count(a, segments::Change::Enter), 1);
    assert_eq!(count(b, segments::Change::Enter), 1);
    assert_eq!(count(b, segments::Change::MergedInto(a)), 1);
    assert_eq!(count(b, segments::Change::Exit), 0);
    assert_eq!(count(a, segments::Change::Exit), 0);

    // A refund of the loser's order, sent for the survivor, reverses the loser's points.
    world.send(
        json!({"event_id": "refund", "type": "refund", "identities": {"phone": "a1"},
        "order_id": "T2", "amount": "80"}),
    );
    let s = world.cluster.profiles().remove(0);
    assert_eq!(s.balance, 100 + 50 + 7);
    // An event naming the loser by OneID applies to the survivor.
    let mut named = event(&json!({"event_id": "by-oneid", "type": "points_earn",
        "oneid": b.to_string(), "points": 1}));
    named.oneid = Some(b);
    let routed = Routed {
        event: named,
        target: Target::Existing(b),
        rules_version: 0,
        link_elsewhere: vec![],
        found: vec![],
    };
    let output = world
        .cluster
        .apply(b.shard(), Command::Events(vec![routed]));
    assert!(matches!(output, Output::Events { ref outcomes, .. }
        if outcomes == &vec![EventOutcome::Moved(a)]));

    // A segment defined after the merge is backfilled over every OneID the loser's shard
    // minted, its tombstone among them: A joins, B is skipped.
    let define = Command::DefineSegment(crate::command::SegmentDefine {
        name: "spenders".into(),
        predicate: Some("total_spend >= 100".into()),
        description: String::new(),
    });
    let Output::Segment(Ok((def, true))) = world.cluster.apply(ShardId(0), define) else {
        panic!("defined")
    };
    for s in 0..4 {
        let shard = ShardId(s);
        if s != 0 {
            world
                .cluster
                .apply(shard, Command::InstallSegment(def.clone()));
        }
        while matches!(
            world.cluster.apply(shard, Command::Backfill),
            Output::Backfill { more: true }
        ) {}
    }
    let c = &world.cluster;
    assert!(c
        .get::<()>(a.shard(), &keys::member("spenders", a))
        .is_some());
    assert!(c
        .get::<()>(b.shard(), &keys::member("spenders", b))
        .is_none());
}

/// A merge past a kind's limit is refused: the event applies to the profile of highest rank
/// alone, and the other's identity is not linked.
#[test]
fn a_merge_the_policy_refuses_applies_its_event_to_the_highest_ranked_profile() {
    let rules = r#"{"identity": {"kinds": {"member_card": {"max_per_profile": 1}}}}"#;
    let mut world = World::new(Cluster::with_rules(4, rules), 2);
    world.send(json!({"event_id": "a", "type": "identify",
        "identities": {"phone": "p1", "member_card": "m1"}, "ts": Millis(T0 - 9).to_string()}));
    world.send(json!({"event_id": "b", "type": "identify",
        "identities": {"email": "e1", "member_card": "m2"}}));
    world.send(json!({"event_id": "both", "type": "points_earn",
        "identities": {"phone": "p1", "email": "e1"}, "points": 5}));
    let c = &world.cluster;
    let (a, b) = (
        c.binding(&id("phone", "p1")).unwrap(),
        c.binding(&id("email", "e1")).unwrap(),
    );
    assert_ne!(a, b, "not merged");
    let profiles = c.profiles();
    assert_eq!(profiles.len(), 2);
    assert!(
        profiles.iter().all(|p| p.merging.is_none()),
        "both unlocked"
    );
    let survivor = profiles.iter().find(|p| p.oneid == a).unwrap();
    assert_eq!(survivor.balance, 5);
    assert_eq!(world.seen.applied.get("both"), Some(&1));
    // B takes events again.
    world.send(json!({"event_id": "b2", "type": "points_earn",
        "identities": {"email": "e1"}, "points": 2}));
    let b_profile = world
        .cluster
        .profiles()
        .into_iter()
        .find(|p| p.oneid == b)
        .unwrap();
    assert_eq!(b_profile.balance, 2);
}

/// A profile in a merge answers its events `unavailable`, and its due keys wait for the end.
#[test]
fn a_locked_profile_takes_no_event_and_its_expiries_wait() {
    let mut world = World::new(Cluster::new(1), 3);
    world.send(
        json!({"event_id": "a", "type": "points_earn", "identities": {"phone": "p1"},
        "points": 5, "expires_at": Millis(T0 + oneid_protocol::num::DAY_MS).to_string()}),
    );
    world.send(json!({"event_id": "b", "type": "identify", "identities": {"email": "e1"}}));
    let c = &world.cluster;
    let (a, b) = (
        c.binding(&id("phone", "p1")).unwrap(),
        c.binding(&id("email", "e1")).unwrap(),
    );
    let plan = MergePlan::new([a, b].into(), Cause::Taken(id("phone", "p1")), 0);
    let merge = plan.merge;
    let lock = Command::Merge(MergeStep::Lock {
        plan: Box::new(plan),
        oneid: a,
    });
    assert!(matches!(
        world.cluster.apply(ShardId(0), lock),
        Output::Merge(crate::command::MergeAnswer::Locked(..))
    ));
    let earn = Routed {
        event: event(&json!({"event_id": "c", "type": "points_earn",
            "identities": {"phone": "p1"}, "points": 1})),
        target: Target::Existing(a),
        rules_version: 0,
        link_elsewhere: vec![],
        found: vec![],
    };
    let Output::Events { outcomes, .. } =
        world.cluster.apply(ShardId(0), Command::Events(vec![earn]))
    else {
        panic!()
    };
    assert!(matches!(&outcomes[0], EventOutcome::Rejected(e) if e.code == ErrorCode::Unavailable));
    let clock = |days: i64| Command::Clock {
        target: Millis(T0 + days * oneid_protocol::num::DAY_MS),
    };
    world.cluster.apply(ShardId(0), clock(2));
    let balance = |c: &Cluster| c.profiles().iter().find(|p| p.oneid == a).unwrap().balance;
    assert_eq!(
        balance(&world.cluster),
        5,
        "the lot waits while the profile is locked"
    );
    world.cluster.apply(
        ShardId(0),
        Command::Merge(MergeStep::Unlock { merge, oneid: a }),
    );
    world.cluster.apply(ShardId(0), clock(2));
    assert_eq!(
        balance(&world.cluster),
        0,
        "and expires at the next clock entry"
    );
}

/// After the commit, the driver proposes the loser's retire and the repoint of each identity
/// another shard holds in one batch; applied in reverse (the repoint first), the binding names
/// the survivor before the loser is a tombstone, and the finish ends the merge.
#[test]
#[allow(clippy::too_many_lines)]
fn a_losers_retire_and_repoints_are_proposed_at_once_and_apply_in_any_order() {
    let mut world = World::new(Cluster::new(4), 1);
    // Each customer holds a card on another shard than its phone (and so its profile).
    let phones = [id("phone", "p1"), id("phone", "p2")];
    let card_of = |phone: &Identity| {
        (0..)
            .map(|i| id("member_card", &format!("{}c{i}", phone.value)))
            .find(|c| c.shard(4) != phone.shard(4))
            .unwrap()
    };
    let cards = [card_of(&phones[0]), card_of(&phones[1])];
    for (phone, card) in phones.iter().zip(&cards) {
        world.send(
            json!({"event_id": phone.value, "type": "points_earn", "points": 3,
            "identities": {"phone": phone.value, "member_card": card.value}}),
        );
    }
    world.settle();
    let c = &world.cluster;
    let (a, b) = (
        c.binding(&phones[0]).unwrap(),
        c.binding(&phones[1]).unwrap(),
    );
    let routed = Routed {
        event: event(&json!({"event_id": "both", "type": "identify",
            "identities": {"phone": "p1", "email": "shared"}, "oneid": b.to_string()})),
        target: Target::Claim,
        rules_version: 0,
        link_elsewhere: vec![],
        found: vec![],
    };
    let plan = MergePlan::new([a, b].into(), Cause::Event(Box::new(routed)), 0);
    let mut driver = Driver::new(plan, 4);
    let mut batches = Vec::new();
    let ended = loop {
        let mut steps = match driver.next() {
            Next::Propose(steps) => steps,
            Next::Done(ended) => break ended,
        };
        batches.push(steps.len());
        while let Some((shard, step)) = steps.pop() {
            if matches!(step, MergeStep::Retire { .. }) {
                let record = driver.committed().unwrap();
                let away = record.losers[0]
                    .identities
                    .iter()
                    .filter(|i| i.shard(4) != record.losers[0].oneid.shard())
                    .count();
                assert!(away > 0, "the loser holds an identity on another shard");
                for identity in &record.losers[0].identities {
                    let holder = world.cluster.binding(identity).unwrap();
                    let expected = if identity.shard(4) == record.losers[0].oneid.shard() {
                        record.losers[0].oneid
                    } else {
                        record.survivor
                    };
                    assert_eq!(holder, expected, "{identity:?} before the retire");
                }
            }
            let Output::Merge(answer) = world.cluster.apply(shard, Command::Merge(step.clone()))
            else {
                panic!("a merge step answers a merge answer")
            };
            assert_eq!(driver.answer(&step, answer), None);
        }
    };
    // Two locks, the commit, the retire beside the repoint, the finish.
    assert_eq!(batches, [1, 1, 1, 2, 1]);
    let Ended::Finished(record, Some(_)) = ended else {
        panic!("the merge ended {ended:?}")
    };
    assert!(matches!(record.state, MergeState::Finished(_)));
    let survivor = record.survivor;
    for identity in phones.iter().chain(&cards) {
        assert_eq!(
            world.cluster.binding(identity),
            Some(survivor),
            "{identity:?}"
        );
    }
    let profiles = world.cluster.profiles();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].balance, 6);
}

/// Two drivers of one merge (the router and a sweep) at once: both end, the event applies
/// once.
#[test]
fn two_drivers_of_one_merge_end_it_once() {
    for seed in 0..20 {
        let mut world = World::new(Cluster::new(4), seed);
        world.send(
            json!({"event_id": "a", "type": "points_earn", "identities": {"phone": "p1"},
            "points": 3}),
        );
        world.send(
            json!({"event_id": "b", "type": "points_earn", "identities": {"email": "e1"},
            "points": 4}),
        );
        let c = &world.cluster;
        let profiles: BTreeSet<OneId> = [
            c.binding(&id("phone", "p1")).unwrap(),
            c.binding(&id("email", "e1")).unwrap(),
        ]
        .into();
        let routed = Routed {
            event: event(&json!({"event_id": "both", "type": "points_earn",
                "identities": {"phone": "p1", "email": "e1"}, "points": 5})),
            target: Target::Claim,
            rules_version: 0,
            link_elsewhere: vec![],
            found: vec![],
        };
        let plan = MergePlan::new(profiles, Cause::Event(Box::new(routed)), 0);
        let driver = Driver::new(plan, 4);
        world.tasks = vec![
            Task::Merge(Box::new(driver.clone())),
            Task::Merge(Box::new(driver)),
        ];
        world.settle();
        let profiles = world.cluster.profiles();
        assert_eq!(profiles.len(), 1, "seed {seed}");
        assert_eq!(profiles[0].balance, 12, "seed {seed}");
        assert_eq!(world.seen.merges_finished, 2, "seed {seed}");
    }
}

/// The policy's refusals, as the commit decides them from the locks' answers.
#[test]
fn the_commit_refuses_merges_past_the_policys_limits() {
    let rules = r#"{"identity": {"kinds": {"member_card": {"max_per_profile": 1},
        "device_id": {"merge": false}}}}"#;
    let cluster = Cluster::with_rules(1, rules);
    let state = &cluster.shards[0].state;
    let policy = &state.rules().identity;
    let profile = |seq: u64, ids: &[(&str, &str)]| {
        let mut p = Profile::new(OneId::mint(ShardId(0), seq), &Rules::default(), Millis(T0));
        for (kind, value) in ids {
            p.identities
                .entry((*kind).into())
                .or_default()
                .insert((*value).into());
        }
        p
    };
    let part = |p: &Profile| merge::Participant::of(p, policy);
    let plan = |cause: Cause| {
        MergePlan::new(
            [OneId::mint(ShardId(0), 1), OneId::mint(ShardId(0), 2)].into(),
            cause,
            0,
        )
    };
    let event_cause = || {
        Cause::Event(Box::new(Routed {
            event: event(
                &json!({"event_id": "e", "type": "identify", "identities": {"phone": "1"}}),
            ),
            target: Target::Claim,
            rules_version: 0,
            link_elsewhere: vec![],
            found: vec![],
        }))
    };
    let refusal = |a: &Profile, b: &Profile, cause: Cause| {
        state.merge_refusal(&plan(cause), &part(a), &[part(a), part(b)])
    };
    let a = profile(1, &[("phone", "1"), ("member_card", "M1")]);
    let b = profile(2, &[("email", "x"), ("member_card", "M2")]);
    assert_eq!(
        refusal(&a, &b, event_cause()),
        Some(NotLinkedReason::KindLimit)
    );
    let b = profile(2, &[("email", "x")]);
    assert_eq!(refusal(&a, &b, event_cause()), None);
    // Past 100 profiles merged into the survivor.
    let mut hub = a.clone();
    hub.merged_from = (0..100)
        .map(|i| OneId::mint(ShardId(0), 1000 + i))
        .collect();
    assert_eq!(
        refusal(&hub, &b, event_cause()),
        Some(NotLinkedReason::MergeLimit)
    );
    hub.merged_from.pop();
    assert_eq!(refusal(&hub, &b, event_cause()), None);
    // Past 50 identities.
    let mut wide = profile(2, &[]);
    wide.identities
        .insert("k".into(), (0..49).map(|i| format!("v{i}")).collect());
    assert_eq!(
        refusal(&a, &wide, event_cause()),
        Some(NotLinkedReason::IdentityLimit)
    );
    // A bind taken by a value of a kind that does not merge.
    let taken = Cause::Taken(Identity {
        kind: "device_id".into(),
        value: "D".into(),
    });
    assert_eq!(refusal(&a, &b, taken), Some(NotLinkedReason::MergeDisabled));
}

/// A loser's unlinks go with it: an event dated before one, naming the value for the survivor,
/// binds it there no more than it would have to the loser; a value the survivor holds keeps
/// no record from the loser.
#[test]
#[allow(clippy::too_many_lines)]
fn a_losers_unlinks_hold_on_its_survivor() {
    let mut world = World::new(Cluster::new(4), 1);
    let at = |ms: i64| Millis(T0 + ms).to_string();
    // Y, minted first (same priority), survives X.
    world.send(json!({"event_id": "y", "type": "identify",
        "identities": {"wechat_unionid": "wy"}, "ts": at(-9)}));
    world.send(json!({"event_id": "x", "type": "points_earn", "points": 4,
        "identities": {"phone": "px", "email": "ex", "member_card": "mx"}, "ts": at(0)}));
    let c = &world.cluster;
    let (x, y) = (
        c.binding(&id("phone", "px")).unwrap(),
        c.binding(&id("wechat_unionid", "wy")).unwrap(),
    );
    world.send(
        json!({"event_id": "u1", "type": "unlink", "oneid": x.to_string(),
        "identities": {"email": "ex"}, "ts": at(10_000)}),
    );
    world.send(
        json!({"event_id": "u2", "type": "unlink", "oneid": x.to_string(),
        "identities": {"member_card": "mx"}, "ts": at(11_000)}),
    );
    // The card, unlinked from X, goes to Y.
    world.send(json!({"event_id": "y-card", "type": "identify",
        "identities": {"wechat_unionid": "wy", "member_card": "mx"}, "ts": at(12_000)}));
    assert_eq!(world.cluster.binding(&id("member_card", "mx")), Some(y));

    world.send(
        json!({"event_id": "both", "type": "points_earn", "points": 1,
        "identities": {"phone": "px", "wechat_unionid": "wy"}, "ts": at(20_000)}),
    );
    let c = &world.cluster;
    assert_eq!(c.live(x), y, "X merged into Y");
    assert_eq!(
        c.get::<UnlinkRecord>(y.shard(), &keys::unlinked(y, &id("email", "ex"))),
        Some(UnlinkRecord {
            at: Millis(T0 + 10_000),
            unbinding: false
        })
    );
    let card = id("member_card", "mx");
    assert_eq!(
        c.get::<UnlinkRecord>(y.shard(), &keys::unlinked(y, &card)),
        None
    );

    // An event dated between the unlinks' dates and the merge, naming all three for Y.
    let old = event(
        &json!({"event_id": "old", "type": "points_earn", "points": 2,
        "identities": {"wechat_unionid": "wy", "email": "ex", "member_card": "mx"},
        "ts": at(5_000)}),
    );
    let found = old
        .identities
        .iter()
        .map(|i| match c.binding(i) {
            Some(oneid) => Found::Bound {
                oneid: c.live(oneid),
                epoch: command::EPOCH_UNKNOWN,
            },
            None => Found::Unbound,
        })
        .collect();
    let email = id("email", "ex");
    let routed = Routed {
        event: old,
        target: Target::Existing(y),
        rules_version: 0,
        link_elsewhere: [email.clone()]
            .into_iter()
            .filter(|i| i.shard(4) != y.shard())
            .collect(),
        found,
    };
    let Output::Events {
        outcomes,
        follow_ups,
    } = world
        .cluster
        .apply(y.shard(), Command::Events(vec![routed]))
    else {
        panic!("events answered otherwise")
    };
    assert_eq!(
        outcomes,
        [EventOutcome::Applied(
            y,
            vec![tests::not_linked("email", "ex", NotLinkedReason::Unlinked)]
        )]
    );
    assert_eq!(follow_ups, []);
    assert_eq!(world.cluster.binding(&email), None);
    let survivor = world.cluster.profiles();
    let survivor = survivor.iter().find(|p| p.oneid == y).unwrap();
    assert!(!survivor.holds(&email) && survivor.holds(&card));
    assert_eq!(survivor.balance, 4 + 1 + 2);
}

/// A removal of an attribute or manual tag is a write like any other: of a name both
/// profiles of a merge wrote, the newer stays, whether it set the name or removed it.
#[test]
#[allow(clippy::too_many_lines)]
fn a_merge_keeps_the_newer_of_a_write_and_a_removal() {
    let mut world = World::new(Cluster::new(4), 1);
    let at = |seconds: i64| Millis(T0 + seconds * 1_000).to_string();
    // X, minted first (same priority), survives Y.
    let mut send = |n: &str, identities: serde_json::Value, body: serde_json::Value, s: i64| {
        let mut event = json!({"event_id": n, "identities": identities, "ts": at(s)});
        event
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        world.send(event);
    };
    let (x, y) = (json!({"wechat_unionid": "wx"}), json!({"phone": "py"}));
    send("x0", x.clone(), json!({"type": "identify"}), -2);
    send("y0", y.clone(), json!({"type": "identify"}), -1);
    let update =
        |attributes: serde_json::Value| json!({"type": "profile_update", "attributes": attributes});
    // city: X set it, then removed it after Y set it: stays removed.
    send("x1", x.clone(), update(json!({"city": "bj"})), 1);
    send("y1", y.clone(), update(json!({"city": "sh"})), 2);
    send("x2", x.clone(), update(json!({"city": null})), 3);
    // size: Y removed it after X set it: removed from X.
    send("x3", x.clone(), update(json!({"size": "M"})), 1);
    send("y2", y.clone(), update(json!({"size": "L"})), 1);
    send("y3", y.clone(), update(json!({"size": null})), 4);
    // color: X removed it before Y set it: Y's value comes.
    send("x4", x.clone(), update(json!({"color": "red"})), 1);
    send("x5", x.clone(), update(json!({"color": null})), 2);
    send("y4", y.clone(), update(json!({"color": "blue"})), 5);
    // Tags: X removed "vip" after Y added it; Y removed "new" after X added it; X removed
    // "promo" before Y added it.
    let tag = |kind: &str, tag: &str| json!({"type": kind, "tag": tag});
    send("x6", x.clone(), tag("tag_add", "vip"), 1);
    send("y5", y.clone(), tag("tag_add", "vip"), 2);
    send("x7", x.clone(), tag("tag_remove", "vip"), 3);
    send("x8", x.clone(), tag("tag_add", "new"), 2);
    send("y6", y.clone(), tag("tag_add", "new"), 1);
    send("y7", y.clone(), tag("tag_remove", "new"), 4);
    send("x9", x.clone(), tag("tag_remove", "promo"), 1);
    send("y8", y.clone(), tag("tag_add", "promo"), 2);

    send(
        "both",
        json!({"wechat_unionid": "wx", "phone": "py"}),
        json!({"type": "identify"}),
        10,
    );
    let c = &world.cluster;
    let (x, y) = (
        c.binding(&id("wechat_unionid", "wx")).unwrap(),
        c.live(c.binding(&id("phone", "py")).unwrap()),
    );
    assert_eq!(x, y, "one customer");
    let profiles = c.profiles();
    assert_eq!(profiles.len(), 1);
    let survivor = &profiles[0];
    let ms = |seconds: i64| Millis(T0 + seconds * 1_000);
    assert_eq!(
        survivor.attributes,
        [(
            "color".to_string(),
            oneid_protocol::predicate::Value::String("blue".into())
        )]
        .into()
    );
    assert_eq!(
        survivor.attribute_at,
        [
            ("city".to_string(), ms(3)),
            ("color".to_string(), ms(5)),
            ("size".to_string(), ms(4)),
        ]
        .into()
    );
    assert_eq!(survivor.manual_tags, [("promo".to_string(), None)].into());
    assert_eq!(
        survivor.manual_tag_at,
        [
            ("new".to_string(), ms(4)),
            ("promo".to_string(), ms(2)),
            ("vip".to_string(), ms(3)),
        ]
        .into()
    );
}

/// Events of format 12 still in a migrated log forget a removal's time, as they did.
#[test]
fn a_legacy_event_forgets_what_it_removed() {
    let mut c = Cluster::new(1);
    let routed = |json: serde_json::Value| Routed {
        event: event(&json),
        target: Target::Claim,
        rules_version: 0,
        link_elsewhere: vec![],
        found: vec![],
    };
    let at = |seconds: i64| Millis(T0 + seconds * 1_000).to_string();
    c.apply(
        ShardId(0),
        Command::Events(vec![routed(
            json!({"event_id": "a", "type": "profile_update",
            "identities": {"phone": "p"}, "attributes": {"city": "bj", "size": "M"},
            "ts": at(1)}),
        )]),
    );
    let oneid = c.binding(&id("phone", "p")).unwrap();
    let removal = |event_id: &str, name: &str| {
        let mut routed = routed(json!({"event_id": event_id, "type": "profile_update",
            "identities": {"phone": "p"}, "attributes": {name: null}, "ts": at(2)}));
        routed.target = Target::Existing(oneid);
        routed.found = vec![Found::Bound {
            oneid,
            epoch: command::EPOCH_UNKNOWN,
        }];
        routed
    };
    c.apply(
        ShardId(0),
        Command::LegacyEvents12(vec![removal("b", "city")]),
    );
    let profile = c.profiles().remove(0);
    assert_eq!(
        profile.attribute_at,
        [("size".to_string(), Millis(T0 + 1_000))].into()
    );
    c.apply(ShardId(0), Command::Events(vec![removal("c", "size")]));
    let profile = c.profiles().remove(0);
    assert_eq!(
        profile.attribute_at,
        [("size".to_string(), Millis(T0 + 2_000))].into()
    );
    assert!(profile.attributes.is_empty());
}
