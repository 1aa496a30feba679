//! Merges in the simulation: in runs of several shards, a merger makes one or two pairs of
//! customers, each known by a phone held by another shard (the second one also by a member
//! card held by a third, bound by a follow-up the merger drives), earn points; then drives the merge
//! of each pair (`merge_driver::Driver`, as a node's router does), proposing every step through
//! whichever replica of its shard it reaches and proposing it again after an error or a
//! timeout (every step is idempotent). The nemesis: one step in six (up to three per pair),
//! the node it reached crashes a moment later (before or after the step commits, leader or
//! not), on top of the run's faults, so crashes and leader changes fall on every step of the
//! saga over many runs; snapshots installed while a merge is in flight carry its locks and
//! records.
//!
//! Once the cluster settled: each pair is one live customer holding both phones and both
//! earns (the loser a tombstone pointing at it), its merging event applied once; across every
//! shard, every binding names a live profile that holds it, and the points are conserved (the
//! live profiles' lifetime earnings are the earns in all ledgers, tombstones' included).

use super::{Happening, World, ATTEMPT_MS, EPOCH_MS, FAULTY_MS};
use oneid_protocol::event::Event;
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::num::Millis;
use oneid_replica::{Effects, ShardError, Token};
use oneid_state::command::{
    BindOutcome, Command, EventOutcome, FollowUp, FollowUpAnswer, Found, MergeStep, Output, Routed,
    Target,
};
use oneid_state::merge::{Cause, MergePlan, MergeRecord, MergeState, Tombstone};
use oneid_state::merge_driver::{Driver, Ended, Next};
use oneid_state::profile::Profile;
use oneid_state::{decode, keys, FollowUpRecord, LedgerKind, LedgerRecord};
use std::collections::BTreeMap;

/// The wait before a step the driver said to wait for (another merge's lock, follow-ups).
const MERGE_WAIT_MS: u64 = 30;
/// Most crashes the nemesis causes per pair (on top of the run's faults), one step in
/// [`CRASH_ONE_IN`] until then: enough to fall on every step over a hundred runs, few enough
/// that the run's own faults still happen as they did.
const CRASHES_PER_PAIR_MAX: u32 = 3;
const CRASH_ONE_IN: u64 = 6;

/// A pair of customers the merger makes and merges.
pub(super) struct Pair {
    /// One phone each, held by different shards.
    phones: [Identity; 2],
    /// The second customer's member card, held by another shard than its phone: bound by a
    /// follow-up before the merge, repointed by its own step after.
    card: Identity,
    points: [u64; 2],
    /// Their profiles, once their earns were answered.
    oneids: [Option<OneId>; 2],
    stage: Stage,
    /// The token of the proposal in flight (an answer to another is ignored).
    attempt: Token,
    /// The merge step in flight, one of those the driver said to propose at once (picked at
    /// random: the others follow one by one, so over many runs they apply in every order).
    step: Option<MergeStep>,
    /// Crashes the nemesis caused at this pair's steps.
    crashes: u32,
}

enum Stage {
    /// Earning on the side that has no OneID yet.
    Earning,
    /// Binding the card at its shard (`false`), then finishing its follow-up (`true`): its
    /// record, if the earn's answer was lost, found as the leader's sweep finds it.
    Binding(Option<FollowUp>, bool),
    Merging(Box<Driver>),
    Merged(Box<MergeRecord>),
}

impl World {
    /// One or two pairs in runs of several shards, starting at random times in the first half
    /// of the faulty time.
    pub(super) fn plan_merges(&mut self) {
        if self.shape.shards < 2 {
            return;
        }
        let n = self.merge_rng.usize(1..=2);
        for i in 0..n {
            let a = phone_on(&format!("m{i}a"), self.shape.shards, |s| s == 0);
            let b = phone_on(&format!("m{i}b"), self.shape.shards, |s| s != 0);
            let home = b.shard(self.shape.shards).0;
            let card = Identity {
                kind: "member_card".into(),
                ..phone_on(&format!("m{i}c"), self.shape.shards, |s| s != home)
            };
            self.pairs.push(Pair {
                phones: [a, b],
                card,
                points: [1 << 37, 1 << 38],
                oneids: [None, None],
                stage: Stage::Earning,
                attempt: 0,
                step: None,
                crashes: 0,
            });
            let at = self.merge_rng.u64(200..FAULTY_MS / 2);
            self.schedule(at, Happening::MergeStep { pair: i });
        }
    }

    pub(super) fn merges_done(&self) -> bool {
        self.pairs
            .iter()
            .all(|p| matches!(p.stage, Stage::Merged(_)))
    }

    /// Takes pair `i` one proposal further: an earn, or the merge's next step.
    pub(super) fn merge_step(&mut self, i: usize) {
        let pair = &self.pairs[i];
        let (shard, command, step) = match &pair.stage {
            Stage::Merged(_) => return,
            Stage::Earning => {
                let (shard, command) = self.earn(i);
                (shard, command, None)
            }
            Stage::Binding(None, _) => return self.find_follow_up(i),
            Stage::Binding(Some(follow_up), false) => {
                let pair = vec![(follow_up.identity.clone(), follow_up.oneid)];
                let shard = follow_up.identity.shard(self.shape.shards);
                (shard, Command::Bind(pair), None)
            }
            Stage::Binding(Some(follow_up), true) => {
                let answer = FollowUpAnswer {
                    seq: follow_up.seq,
                    outcome: BindOutcome::Bound,
                };
                let shard = follow_up.oneid.shard();
                (shard, Command::FinishFollowUps(vec![answer]), None)
            }
            Stage::Merging(driver) => match driver.next() {
                Next::Propose(mut steps) => {
                    let (shard, step) = steps.swap_remove(self.merge_rng.usize(0..steps.len()));
                    let kind = step_kind(&step);
                    self.pairs[i].step = Some(step.clone());
                    (shard, Command::Merge(step), Some(kind))
                }
                Next::Done(ended) => return self.merge_ended(i, ended),
            },
        };
        let hosts = self.up_hosts(shard);
        self.next_token += 1;
        let token = self.next_token;
        self.pairs[i].attempt = token;
        self.schedule(
            ATTEMPT_MS,
            Happening::MergeTimeout {
                pair: i,
                attempt: token,
            },
        );
        if hosts.is_empty() {
            return;
        }
        let node = hosts[self.merge_rng.usize(0..hosts.len())];
        self.merge_tokens.insert((node, token), i);
        let nemesis = self.faulty && self.pairs[i].crashes < CRASHES_PER_PAIR_MAX;
        if let Some(kind) = step.filter(|_| nemesis && self.merge_rng.u64(0..CRASH_ONE_IN) == 0) {
            self.pairs[i].crashes += 1;
            let at = self.merge_rng.u64(0..10);
            self.schedule(at, Happening::Crash { node });
            self.cover("a node crashed as a merge step reached it");
            self.cover(kind);
        }
        let mut fx = Effects::default();
        self.replica(node, shard)
            .propose(&command, Some(token), &mut fx);
        self.advance(node, shard, fx);
    }

    /// A proposal of pair `i` was answered.
    pub(super) fn merge_answered(
        &mut self,
        i: usize,
        token: Token,
        reply: Result<Output, ShardError>,
    ) {
        if self.pairs[i].attempt != token {
            return;
        }
        self.pairs[i].attempt = 0;
        let pair = &mut self.pairs[i];
        let wait = match (&mut pair.stage, reply) {
            (_, Err(_)) => 20,
            (
                Stage::Earning,
                Ok(Output::Events {
                    outcomes,
                    mut follow_ups,
                }),
            ) => match &outcomes[0] {
                EventOutcome::Applied(oneid, _) | EventOutcome::Duplicate(oneid) => {
                    let side = usize::from(pair.oneids[0].is_some());
                    pair.oneids[side] = Some(*oneid);
                    if side == 1 {
                        pair.stage = Stage::Binding(follow_ups.pop(), false);
                    }
                    0
                }
                EventOutcome::StaleRules(version) => {
                    let shard =
                        pair.phones[usize::from(pair.oneids[0].is_some())].shard(self.shape.shards);
                    self.rules_seen.insert(shard, *version);
                    0
                }
                other => panic!("a merger's earn answered {other:?}"),
            },
            (Stage::Binding(Some(_), bound @ false), Ok(Output::Bind(outcomes))) => {
                assert_eq!(
                    outcomes,
                    vec![BindOutcome::Bound],
                    "the card is the customer's"
                );
                *bound = true;
                0
            }
            (Stage::Binding(Some(_), true), Ok(Output::None)) => {
                self.start_merge(i);
                0
            }
            (Stage::Merging(driver), Ok(Output::Merge(answer))) => {
                let step = pair.step.take().expect("a merge step in flight");
                if driver.answer(&step, answer).is_some() {
                    MERGE_WAIT_MS
                } else {
                    0
                }
            }
            (_, Ok(other)) => panic!("a merger's proposal answered {other:?}"),
        };
        self.schedule(wait, Happening::MergeStep { pair: i });
    }

    /// The earn of pair `i`'s side that has no OneID yet (the second names its card too).
    fn earn(&self, i: usize) -> (ShardId, Command) {
        let pair = &self.pairs[i];
        let side = usize::from(pair.oneids[0].is_some());
        let phone = &pair.phones[side];
        let mut json = serde_json::json!({"event_id": format!("m{i}-{side}"),
            "type": "points_earn", "identities": {"phone": phone.value},
            "points": pair.points[side], "ts": Millis(EPOCH_MS).to_string(),
            "expires_at": Millis(EPOCH_MS + 400 * 86_400_000).to_string()});
        let link_elsewhere = if side == 1 {
            json["identities"]["member_card"] = pair.card.value.clone().into();
            vec![pair.card.clone()]
        } else {
            vec![]
        };
        let shard = phone.shard(self.shape.shards);
        let command = Command::Events(vec![Routed {
            event: event(&json),
            target: Target::Claim,
            rules_version: self.rules_seen.get(&shard).copied().unwrap_or(0),
            link_elsewhere,
            found: vec![],
        }]);
        (shard, command)
    }

    fn start_merge(&mut self, i: usize) {
        let [Some(a), Some(b)] = self.pairs[i].oneids else {
            unreachable!("both customers earned")
        };
        let plan = self.merge_plan(i, a, b);
        let driver = Driver::new(plan, self.shape.shards);
        self.pairs[i].stage = Stage::Merging(Box::new(driver));
    }

    /// The card's follow-up record, when the earn's answer that named it was lost: as the
    /// leader's sweep finds it, in the shard's state (any replica's); or, if none holds it and
    /// the profile lists the card, finished already.
    fn find_follow_up(&mut self, i: usize) {
        let pair = &self.pairs[i];
        let oneid = pair.oneids[1].expect("the second customer earned");
        let shard = oneid.shard();
        let mut found = None;
        let mut listed = false;
        for node in self.hosts(shard) {
            let disk = self.nodes[node].disk.borrow();
            let Some(state) = disk.states.get(&shard) else {
                continue;
            };
            for (key, value) in &state.0 {
                if key.first() == keys::FOLLOW_UP_PREFIX.first() {
                    let record: FollowUpRecord = decode(key, value);
                    if record.oneid == oneid {
                        found = Some(FollowUp {
                            seq: keys::follow_up_seq(key),
                            oneid,
                            identity: record.identity,
                            unbind: false,
                        });
                    }
                }
            }
            let profile: Option<Profile> = state
                .0
                .get(&keys::profile(oneid))
                .map(|b| decode(&keys::profile(oneid), b));
            listed |= profile.is_some_and(|p| p.holds(&pair.card));
        }
        match found {
            Some(follow_up) => {
                self.pairs[i].stage = Stage::Binding(Some(follow_up), false);
                self.schedule(0, Happening::MergeStep { pair: i });
            }
            None if listed => {
                self.start_merge(i);
                self.schedule(0, Happening::MergeStep { pair: i });
            }
            None => self.schedule(MERGE_WAIT_MS, Happening::MergeStep { pair: i }),
        }
    }

    /// Pair `i`'s attempt `token` went unanswered: propose again.
    pub(super) fn merge_timed_out(&mut self, i: usize, token: Token) {
        if self.pairs[i].attempt == token {
            self.pairs[i].attempt = 0;
            self.merge_step(i);
        }
    }

    /// The merge of pair `i` as its router would plan it, its cause an event naming both phones.
    fn merge_plan(&self, i: usize, a: OneId, b: OneId) -> MergePlan {
        let pair = &self.pairs[i];
        let json = serde_json::json!({"event_id": format!("m{i}-merge"), "type": "identify",
            "identities": {"phone": pair.phones[0].value, "phone_b": pair.phones[1].value},
            "ts": Millis(EPOCH_MS).to_string()});
        let mut event = event(&json);
        // Two phones: the second one's kind as a customer's second phone would be.
        event.identities = pair.phones.to_vec();
        event.identities.sort();
        let found = event
            .identities
            .iter()
            .map(|id| Found::Bound {
                oneid: if *id == pair.phones[0] { a } else { b },
                epoch: oneid_state::command::EPOCH_UNKNOWN,
            })
            .collect();
        let routed = Routed {
            event,
            target: Target::Existing(a.min(b)),
            rules_version: 0,
            link_elsewhere: vec![],
            found,
        };
        MergePlan::new([a, b].into(), Cause::Event(Box::new(routed)), 0)
    }

    fn merge_ended(&mut self, i: usize, ended: Ended) {
        match ended {
            Ended::Finished(record, _) => {
                self.cover("a merge finished across shards");
                self.pairs[i].stage = Stage::Merged(record);
            }
            // Given up before its commit (a lock found the profile gone, or another driver
            // gave it up): planned again.
            Ended::GaveUp(..) | Ended::Abandoned => {
                let [Some(a), Some(b)] = self.pairs[i].oneids else {
                    unreachable!("merging pairs know their profiles")
                };
                let plan = self.merge_plan(i, a, b);
                let driver = Driver::new(plan, self.shape.shards);
                self.pairs[i].stage = Stage::Merging(Box::new(driver));
                self.schedule(MERGE_WAIT_MS, Happening::MergeStep { pair: i });
            }
        }
    }

    /// Whether a merge is between its commit and its end.
    pub(super) fn merge_in_flight(&self) -> bool {
        self.pairs.iter().any(|p| match &p.stage {
            Stage::Merging(driver) => driver.committed().is_some(),
            _ => false,
        })
    }

    /// The invariants of merges in a settled run (see the module's comment).
    pub(super) fn check_merges(&self) -> Result<(), String> {
        let settled = Settled(
            (0..self.shape.shards)
                .map(ShardId)
                .map(|shard| {
                    let node = self.hosts(shard)[0];
                    let state = self.nodes[node].disk.borrow().states.get(&shard).cloned();
                    (shard, state.unwrap_or_default())
                })
                .collect(),
        );
        for (i, pair) in self.pairs.iter().enumerate() {
            self.check_pair(&settled, i, pair)?;
        }
        settled.check_bindings_and_points()
    }

    /// Pair `i` is one live customer with both earns and both phones; the other a tombstone.
    fn check_pair(&self, settled: &Settled, i: usize, pair: &Pair) -> Result<(), String> {
        let Stage::Merged(record) = &pair.stage else {
            return Err(format!("pair {i}: its merge did not end"));
        };
        let survivor = record.survivor;
        if !matches!(&record.state,
            MergeState::Finished(Some(EventOutcome::Applied(oneid, not))) if *oneid == survivor && not.is_empty())
        {
            return Err(format!("pair {i}: the merge ended {:?}", record.state));
        }
        let loser = pair.oneids.iter().flatten().find(|o| **o != survivor);
        let loser = *loser.ok_or(format!("pair {i}: no loser"))?;
        let held = settled
            .profile(survivor)
            .ok_or(format!("pair {i}: {survivor} is not live"))?;
        let sum = pair.points[0] + pair.points[1];
        if (held.balance, held.lifetime_earned) != (sum as i64, sum as i64) {
            return Err(format!(
                "pair {i}: {survivor} holds {} points, {} earned, not {sum}",
                held.balance, held.lifetime_earned
            ));
        }
        let tombstone: Option<Tombstone> = settled.get(loser.shard(), &keys::tombstone(loser));
        if settled.profile(loser).is_some() || tombstone.map(|t| t.into) != Some(survivor) {
            return Err(format!(
                "pair {i}: {loser} is not a tombstone of {survivor}"
            ));
        }
        for phone in pair.phones.iter().chain([&pair.card]) {
            let bound: Option<OneId> =
                settled.get(phone.shard(self.shape.shards), &keys::identity(phone));
            if bound != Some(survivor) || !held.holds(phone) {
                return Err(format!("pair {i}: {phone:?} bound to {bound:?}"));
            }
        }
        let cause = keys::dedup(survivor, &format!("m{i}-merge"));
        if settled
            .get::<oneid_state::DedupRecord>(survivor.shard(), &cause)
            .is_none()
        {
            return Err(format!("pair {i}: the merging event left no dedup record"));
        }
        Ok(())
    }
}

/// Every shard's state as a settled replica holds it.
struct Settled(BTreeMap<ShardId, oneid_state::store::MemState>);

impl Settled {
    fn get<T: serde::de::DeserializeOwned>(&self, shard: ShardId, key: &[u8]) -> Option<T> {
        self.0[&shard].0.get(key).map(|bytes| decode(key, bytes))
    }

    fn profile(&self, oneid: OneId) -> Option<Profile> {
        self.get(oneid.shard(), &keys::profile(oneid))
    }

    /// Every binding names a live profile that holds it; every live profile's balance is what
    /// it earned, and the live profiles earned what all ledgers' earns add up to.
    fn check_bindings_and_points(&self) -> Result<(), String> {
        let (mut earned_live, mut earned_ledgers) = (0i64, 0i64);
        for state in self.0.values() {
            for (key, value) in &state.0 {
                match key.first() {
                    Some(b'i') => {
                        let oneid: OneId = decode(key, value);
                        let identity = keys::identity_in(key);
                        if !self.profile(oneid).is_some_and(|p| p.holds(&identity)) {
                            return Err(format!(
                                "{identity:?} bound to {oneid}, which does not hold it"
                            ));
                        }
                    }
                    Some(b'p') => {
                        let held: Profile = decode(key, value);
                        if held.balance != held.lifetime_earned {
                            return Err(format!(
                                "{}: balance {} of {} earned",
                                held.oneid, held.balance, held.lifetime_earned
                            ));
                        }
                        earned_live += held.lifetime_earned;
                    }
                    Some(b'l') => {
                        let record: LedgerRecord = decode(key, value);
                        if record.kind == LedgerKind::Earn {
                            earned_ledgers += record.points;
                        }
                    }
                    _ => {}
                }
            }
        }
        if earned_live != earned_ledgers {
            return Err(format!(
                "live profiles earned {earned_live} points; the ledgers' earns are {earned_ledgers}"
            ));
        }
        Ok(())
    }
}

/// A phone `prefix-N` whose shard (of `shards`) passes `wanted`.
fn phone_on(prefix: &str, shards: u32, wanted: impl Fn(u32) -> bool) -> Identity {
    (0..)
        .map(|n| Identity {
            kind: "phone".into(),
            value: format!("{prefix}-{n}"),
        })
        .find(|id| wanted(id.shard(shards).0))
        .expect("some value hashes to every shard")
}

fn event(json: &serde_json::Value) -> Event {
    let raw = serde_json::value::to_raw_value(json).expect("json");
    Event::parse(&raw, None).expect("a valid event")
}

/// What a crash at a step is counted as.
fn step_kind(step: &MergeStep) -> &'static str {
    match step {
        MergeStep::Lock { .. } => "a crash at a merge's lock",
        MergeStep::Commit { .. } | MergeStep::CommitWith { .. } => "a crash at a merge's commit",
        MergeStep::Export { .. } => "a crash at a merge's export",
        MergeStep::Import { .. } => "a crash at a merge's import",
        MergeStep::Tombstone { .. } | MergeStep::Retire { .. } => "a crash at a merge's tombstone",
        MergeStep::Repoint { .. } => "a crash at a merge's repoint",
        MergeStep::Finish { .. } => "a crash at a merge's finish",
        MergeStep::Unlock { .. } => "a crash at a merge's unlock",
    }
}
