//! The router: takes a batch of validated events to the shards that own their profiles.
//!
//! An event names its profile by OneID (whose shard is in the id) and/or by identities (each
//! held by the shard its hash picks). The router:
//! 1. resolves every identity of the batch once, at the start: a binding this node cached at
//!    its shard's latest binding epoch needs no read; the others are read at their shards,
//!    linearizably (a stale "unbound" would split a customer for good), with the epoch;
//! 2. judges each event by the identity policy of the rules (see [`Judge`]): blocked values
//!    are set aside (they pick no profile, wait in no wave, are never bound), an event whose
//!    mergeable identities (and oneid) are bound to 2 to 4 profiles merges them (see
//!    `merges`; more is `too_many_profiles`; a retry of an event that already applied to one
//!    of them is a `duplicate`), and identities of unmergeable kinds pick a profile only for
//!    an event with nothing else. Apply judges again, by its shard's rules, and refuses an
//!    event judged by another version ([`EventOutcome::StaleRules`]): the router reads the
//!    rules again and routes it anew, so no event applies as a stale copy decided. Decisions
//!    the router answers alone (`too_many_profiles`, `blocked_identity`) and merges are first
//!    checked against the registry's current version;
//! 3. for each wave, proposes one `Events` entry per target shard, events in request order,
//!    and drives the wave's merges beside them (a merge's profiles are named by no other event
//!    of its wave).
//!    An event with no known profile is a `Claim` at the shard of its *anchor* (its strongest
//!    identity, see [`anchor`]), which binds the anchor and mints the OneID; so concurrent
//!    first sightings that share their strongest identity meet at one shard and get one OneID;
//! 4. drives the follow-ups the applied events left (their identities held by other shards:
//!    bind there, then list on the profile, see `follow_up`) before answering, so a lookup by
//!    any identity of an applied event finds its profile once the request is answered (a bind
//!    another profile won first is listed as `taken`). The records are durable: if this stops
//!    half-way, the profile shard's leader finishes them.
//!
//! Events that share an identity unbound at resolve time go to separate waves, so a customer
//! first seen twice in one batch ends up with one OneID, as if the events came one by one;
//! events related to one waiting for a later wave (by an identity or a profile) wait too, so
//! each customer's events keep their request order. Unrelated events go in the first wave.
//! What a wave's answers and binds tell about the identities updates the resolution for the
//! next wave, so resolution reads each identity once per request. At most
//! [`WAVES_PER_REQUEST_MAX`] waves run; events past them are answered `too_many_waves`.

use crate::follow_up;
use crate::merges::{self, MERGE_ANSWER_WAIT};
use crate::metrics::Metrics;
use crate::shards::{per_shard, Consistency, Shards};
use crate::storage::StateReader;
use crate::storage::{Answer as StateAnswer, Query};
use oneid_protocol::api::{EventResult, EventStatus, EventsResponse, NotLinked, NotLinkedReason};
use oneid_protocol::event::{Event, EventBody, EventError};
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::policy::{BlockList, IdentityPolicy};
use oneid_protocol::rules::Rules;
use oneid_protocol::ErrorCode;
use oneid_replica::ShardError;
use oneid_state::command::{
    Command, EventOutcome, FollowUp, Found, Output, Routed, Target, EPOCH_UNKNOWN, REGISTRY_SHARD,
};
use oneid_state::merge::{Cause, MergePlan, MergeRecord, MergeState, PROFILES_PER_MERGE_MAX};
use oneid_state::merge_driver::Ended;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

/// Most waves one request runs. Each wave costs a few fsyncs one after another, so a batch in
/// which every event shares a new identity with the next (a chain) would otherwise hold its
/// request for as many waves as it has events; the events past this are answered
/// `too_many_waves`, to be sent again in a later request.
pub const WAVES_PER_REQUEST_MAX: usize = 64;
/// Attempts at binding the identities of an applied event before the answer; what is left
/// is finished by the profile shard's leader.
const BIND_ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct Router {
    pub shards: Arc<Shards>,
    /// Its cache of bindings (valid at their shard's binding epoch, so they need no read); the
    /// rest of resolution reads each identity's shard linearizably: a stale "unbound" would
    /// split a customer in two for good.
    pub reader: StateReader,
    pub n_shards: u32,
    pub metrics: Arc<Metrics>,
    /// The identity policy events are judged by, as last read from the registry shard.
    judge: Arc<Mutex<Option<Judge>>>,
}

/// The identity policy of one rules version, compiled: what the router judges events by.
#[derive(Clone)]
pub struct Judge {
    version: u64,
    /// The rules of that version (what the router installs on a shard it finds behind).
    rules: Arc<Rules>,
    policy: Arc<IdentityPolicy>,
    blocks: Arc<BlockList>,
    /// Read from the registry shard during this request: no newer version was ordered before
    /// the request began.
    fresh: bool,
    /// The blocked identities among those of the events [`Judge::scan`] was given (most
    /// batches have none), so that judging an identity again and again within a wave costs a
    /// lookup in a usually empty set; `None`: not scanned (each identity is matched).
    scanned: Option<HashSet<Identity>>,
}

impl Judge {
    fn new(rules: &Rules, version: u64) -> Judge {
        Judge {
            version,
            rules: Arc::new(rules.clone()),
            policy: Arc::new(rules.identity.clone()),
            blocks: Arc::new(rules.identity.block_list()),
            fresh: true,
            scanned: None,
        }
    }

    /// Matches every identity of `events` against the blocked values once: from then on,
    /// [`Judge::live`] answers for them (and only them) from that.
    fn scan(&mut self, events: &[Pending]) {
        let blocked = events
            .iter()
            .flat_map(|(_, event)| &event.identities)
            .filter(|identity| self.blocks.blocks(identity))
            .cloned()
            .collect();
        self.scanned = Some(blocked);
    }

    /// Whether `identity` takes part (its value is not blocked).
    fn live(&self, identity: &Identity) -> bool {
        match &self.scanned {
            Some(blocked) => blocked.is_empty() || !blocked.contains(identity),
            None => !self.blocks.blocks(identity),
        }
    }

    /// The event's identities that take part.
    fn live_of<'a>(&'a self, event: &'a Event) -> impl Iterator<Item = &'a Identity> + 'a {
        event.identities.iter().filter(|id| self.live(id))
    }
}

/// An error reaching or using a shard: the events involved are answered `unavailable`.
fn unavailable(error: &ShardError) -> EventError {
    EventError::new(ErrorCode::Unavailable, format!("{error}; retry the event"))
}

/// Identity kinds by strength: the first present in an event anchors a new profile. Kinds not
/// listed come after these, by name.
const ANCHOR_KINDS: [&str; 9] = [
    "phone",
    "wechat_unionid",
    "member_card",
    "email",
    "taobao_nick",
    "jd_pin",
    "douyin_openid",
    "wechat_openid",
    "alipay_uid",
];

/// The identity a new profile is claimed by: a mergeable one if the event has one, then the
/// strongest kind, then the smallest value.
fn anchor<'e>(identities: &[&'e Identity], judge: &Judge) -> &'e Identity {
    let rank = |id: &Identity| {
        let strength = ANCHOR_KINDS
            .iter()
            .position(|k| *k == id.kind)
            .unwrap_or(ANCHOR_KINDS.len());
        (!judge.policy.merges(&id.kind), strength)
    };
    identities
        .iter()
        .min_by(|a, b| (rank(a), &a.kind, &a.value).cmp(&(rank(b), &b.kind, &b.value)))
        .expect("a claiming event has identities")
}

fn too_many_profiles(profiles: &BTreeSet<OneId>) -> EventError {
    EventError::field(
        ErrorCode::TooManyProfiles,
        "identities",
        format!(
            "the event's identities belong to {} profiles; one event merges at most {PROFILES_PER_MERGE_MAX}",
            profiles.len()
        ),
    )
}

fn all_blocked() -> EventError {
    EventError::field(
        ErrorCode::BlockedIdentity,
        "identities",
        "every identity of the event is a blocked value, and it names no oneid",
    )
}

/// The events whose identities were all read; the others are answered `unavailable` (sent
/// again, they are read again).
fn resolved_only(
    todo: Vec<Pending>,
    unresolved: &BTreeMap<Identity, ShardError>,
    answers: &mut [Option<Answer>],
) -> Vec<Pending> {
    let (resolved, waiting): (Vec<Pending>, Vec<Pending>) =
        todo.into_iter().partition(|(_, event)| {
            event
                .identities
                .iter()
                .all(|id| !unresolved.contains_key(id))
        });
    for (position, event) in waiting {
        let error = event
            .identities
            .iter()
            .find_map(|id| unresolved.get(id))
            .expect("waits for one");
        answers[position] = Some(Err(unavailable(error)));
    }
    resolved
}

/// Lists in the answers of applied events the identities left out of them because an unlink
/// took them off one of their profiles after the event (see `Router::unlinked_since`).
fn note_unlinked(answers: &mut [Option<Answer>], unlinked: BTreeMap<usize, Vec<NotLinked>>) {
    for (position, mut nots) in unlinked {
        if let Some(Ok(accepted)) = &mut answers[position] {
            if accepted.status == EventStatus::Applied {
                accepted.not_linked.append(&mut nots);
                NotLinked::sort(&mut accepted.not_linked);
            }
        }
    }
}

/// What resolution knows of each identity of the batch: the profile it is bound to and the
/// binding epoch of its shard that was read at, or `None` (unbound when read, and nothing
/// since told otherwise).
type Bindings = BTreeMap<Identity, Option<(OneId, u64)>>;

/// An event's answer, before it becomes a result row.
type Answer = Result<Accepted, EventError>;

/// An event that applied (or had applied): its status, profile, and the identities it did not
/// link.
#[derive(Debug, Clone)]
struct Accepted {
    status: EventStatus,
    oneid: OneId,
    not_linked: Vec<NotLinked>,
    /// The profiles merged into `oneid` by the event.
    merged: Vec<OneId>,
    /// The merge is committed and not finished yet.
    merge_pending: bool,
}

impl Accepted {
    fn applied(oneid: OneId, not_linked: Vec<NotLinked>) -> Accepted {
        Accepted {
            status: EventStatus::Applied,
            oneid,
            not_linked,
            merged: Vec::new(),
            merge_pending: false,
        }
    }

    fn duplicate(oneid: OneId) -> Accepted {
        Accepted {
            status: EventStatus::Duplicate,
            ..Accepted::applied(oneid, Vec::new())
        }
    }
}

/// An event of the batch and its position in the request.
type Pending = (usize, Event);

/// What a wave did: its answers, and the events to route again (judged by rules of another
/// version than the shard's, or decided alone by a router whose rules were not fresh, or
/// without identities an unlink took off one of their profiles after them: those go in
/// `unlinked`, for their answers).
#[derive(Default)]
struct WaveDone {
    answers: Vec<(usize, Answer)>,
    again: Vec<Pending>,
    unlinked: Vec<(usize, NotLinked)>,
}

impl Router {
    pub fn new(
        shards: Arc<Shards>,
        reader: StateReader,
        n_shards: u32,
        metrics: Arc<Metrics>,
    ) -> Router {
        Router {
            shards,
            reader,
            n_shards,
            metrics,
            judge: Arc::new(Mutex::new(None)),
        }
    }

    /// Applies a batch; one result per input, in order. A parse failure carries the event id
    /// the caller could read, for its result row.
    pub async fn ingest(&self, events: Vec<Result<Event, (String, EventError)>>) -> EventsResponse {
        let mut answers: Vec<Option<Answer>> = vec![None; events.len()];
        let mut ids = Vec::with_capacity(events.len());
        let mut todo = Vec::new();
        for (position, event) in events.into_iter().enumerate() {
            match event {
                Ok(event) => {
                    ids.push(event.event_id.clone());
                    todo.push((position, event));
                }
                Err((event_id, error)) => {
                    ids.push(event_id);
                    answers[position] = Some(Err(error));
                }
            }
        }
        let mut judge = match self.judge().await {
            Ok(judge) => judge,
            Err(error) => {
                for (position, _) in todo {
                    answers[position] = Some(Err(unavailable(&error)));
                }
                return self.respond(answers, ids);
            }
        };
        let (mut bindings, unresolved) = self.resolve(&todo).await;
        let mut todo = resolved_only(todo, &unresolved, &mut answers);
        let mut unlinked: BTreeMap<usize, Vec<NotLinked>> = BTreeMap::new();
        for _ in 0..WAVES_PER_REQUEST_MAX {
            if todo.is_empty() {
                break;
            }
            // Once per judge: the events left are among those scanned (a judge read anew
            // during a wave is not scanned yet, and matches each identity until it is).
            if judge.scanned.is_none() {
                judge.scan(&todo);
            }
            let (wave, rest) = split_wave(todo, &bindings, &judge);
            let done = self.run_wave(wave, &mut bindings, &mut judge).await;
            for (position, answer) in done.answers {
                answers[position] = Some(answer);
            }
            for (position, not) in done.unlinked {
                unlinked.entry(position).or_default().push(not);
            }
            todo = rest;
            if !done.again.is_empty() {
                // Routed again in request order, ahead of the events that waited behind them.
                todo.extend(done.again);
                todo.sort_by_key(|(position, _)| *position);
            }
        }
        for (position, _) in todo {
            answers[position] = Some(Err(EventError::new(
                ErrorCode::TooManyWaves,
                format!("the event waited behind {WAVES_PER_REQUEST_MAX} waves of events sharing new identities; send it again in a later request"),
            )));
        }
        note_unlinked(&mut answers, unlinked);
        self.respond(answers, ids)
    }

    /// The policy to judge by: the one this node last read, or else the registry shard's.
    async fn judge(&self) -> Result<Judge, ShardError> {
        let cached = self.judge.lock().expect("judge lock").clone();
        match cached {
            Some(judge) => Ok(Judge {
                fresh: false,
                ..judge
            }),
            None => self.refresh_judge().await,
        }
    }

    /// Reads the rules the registry shard ordered last (linearizably): the policy every
    /// shard has once the PUT that ordered them was answered.
    async fn refresh_judge(&self) -> Result<Judge, ShardError> {
        let shard = ShardId(REGISTRY_SHARD);
        let (answer, _) = self
            .shards
            .read(shard, Query::Rules(shard), Consistency::Linearizable)
            .await?;
        let StateAnswer::Rules(rules, version) = answer else {
            panic!("a rules read answered {answer:?}")
        };
        Ok(self.learn_rules(&rules, version))
    }

    /// Judges by `rules` of `version` from now on, unless a newer version is known already;
    /// answers the policy to judge by.
    pub fn learn_rules(&self, rules: &Rules, version: u64) -> Judge {
        let mut cached = self.judge.lock().expect("judge lock");
        match &*cached {
            Some(known) if known.version > version => Judge {
                fresh: false,
                ..known.clone()
            },
            _ => {
                let judge = Judge::new(rules, version);
                *cached = Some(judge.clone());
                judge
            }
        }
    }

    /// Reads every identity of the batch once: bindings cached at their shard's latest epoch
    /// need no read; the others are read at their shards, linearizably, one read per shard.
    /// Answers the bindings, and the identities whose shard could not be read. Blocked values
    /// are read too: the policy may change during the request.
    async fn resolve(&self, todo: &[Pending]) -> (Bindings, BTreeMap<Identity, ShardError>) {
        let mut bindings = Bindings::new();
        let mut to_read: BTreeMap<ShardId, Vec<Identity>> = BTreeMap::new();
        let identities: BTreeSet<&Identity> =
            todo.iter().flat_map(|(_, e)| &e.identities).collect();
        for identity in identities {
            match self.reader.cached_identity(identity) {
                Some(bound) => {
                    bindings.insert(identity.clone(), Some(bound));
                }
                None => to_read
                    .entry(identity.shard(self.n_shards))
                    .or_default()
                    .push(identity.clone()),
            }
        }
        let reads = per_shard(to_read.into_iter().map(|(shard, identities)| {
            let query = Query::Identities(identities.clone());
            let read = self.shards.read(shard, query, Consistency::Linearizable);
            (shard, async move { (identities, read.await) })
        }))
        .await;
        let mut unresolved = BTreeMap::new();
        for (shard, (identities, read)) in reads {
            match read {
                Ok((StateAnswer::Identities(found, epoch), _)) => {
                    self.reader.note_binding_epoch(shard, epoch);
                    for (identity, oneid) in identities.into_iter().zip(found) {
                        if let Some(oneid) = oneid {
                            self.reader.cache_identity(&identity, oneid, epoch);
                        }
                        bindings.insert(identity, oneid.map(|oneid| (oneid, epoch)));
                    }
                }
                Ok(other) => panic!("an identity read answered {other:?}"),
                Err(error) => {
                    for identity in identities {
                        unresolved.insert(identity, error.clone());
                    }
                }
            }
        }
        (bindings, unresolved)
    }

    fn respond(&self, answers: Vec<Option<Answer>>, ids: Vec<String>) -> EventsResponse {
        let mut response = EventsResponse {
            applied: 0,
            duplicates: 0,
            rejected: 0,
            results: Vec::with_capacity(answers.len()),
        };
        for (answer, event_id) in answers.into_iter().zip(ids) {
            let result = match answer.expect("every event has an answer") {
                Ok(accepted) => EventResult {
                    event_id,
                    status: accepted.status,
                    oneid: Some(accepted.oneid.to_string()),
                    error: None,
                    not_linked: accepted.not_linked,
                    merged: accepted.merged.iter().map(OneId::to_string).collect(),
                    merge_pending: accepted.merge_pending,
                },
                Err(error) => EventResult {
                    event_id,
                    status: EventStatus::Rejected,
                    oneid: None,
                    error: Some(error),
                    not_linked: Vec::new(),
                    merged: Vec::new(),
                    merge_pending: false,
                },
            };
            match result.status {
                EventStatus::Applied => response.applied += 1,
                EventStatus::Duplicate => response.duplicates += 1,
                EventStatus::Rejected => response.rejected += 1,
                EventStatus::Other(_) => unreachable!("the router answers only known statuses"),
            }
            for not in &result.not_linked {
                self.metrics.count_not_linked(&not.reason, 1);
            }
            response.results.push(result);
        }
        let m = &self.metrics;
        m.events_applied.fetch_add(response.applied, Relaxed);
        m.events_duplicate.fetch_add(response.duplicates, Relaxed);
        m.events_rejected.fetch_add(response.rejected, Relaxed);
        response
    }

    /// Runs one wave: decides each event's target, proposes the events, drives the follow-ups
    /// of the applied ones, and learns from the answers what the next wave resolves to.
    async fn run_wave(
        &self,
        wave: Vec<Pending>,
        bindings: &mut Bindings,
        judge: &mut Judge,
    ) -> WaveDone {
        let mut done = WaveDone::default();
        let (entries, alone, merges) = self.plan_wave(wave, bindings, judge, &mut done);
        self.decide_alone(alone, judge, &mut done).await;

        // One Events entry per target shard, all shards at once; and beside them the merges,
        // whose profiles no other event of the wave names (see `split_wave`).
        let proposals = per_shard(entries.into_iter().map(|(shard, (events, routed))| {
            let call = self.shards.propose(shard, Command::Events(routed));
            (shard, async move { (events, call.await) })
        }));
        let (replies, ()) = tokio::join!(
            proposals,
            self.run_merges(merges, bindings, judge, &mut done)
        );
        let mut follow_ups: Vec<FollowUp> = Vec::new();
        let mut applied: Vec<(usize, Vec<Identity>)> = Vec::new();
        let mut stale = Vec::new();
        for (shard, (events, reply)) in replies {
            match reply {
                Ok(Output::Events {
                    outcomes,
                    follow_ups: left,
                }) => {
                    follow_ups.extend(left);
                    for ((position, event), outcome) in events.into_iter().zip(outcomes) {
                        match self.learn(shard, &event, outcome, bindings) {
                            Learned::Answer(answer) => {
                                if answer
                                    .as_ref()
                                    .is_ok_and(|a| a.status == EventStatus::Applied)
                                {
                                    applied.push((done.answers.len(), event.identities));
                                }
                                done.answers.push((position, answer));
                            }
                            Learned::Stale(version) => {
                                stale.push((position, event, shard, version))
                            }
                            Learned::Moved(into) => {
                                let event = self.moved(shard, event, into, bindings, judge);
                                done.again.push((position, event));
                            }
                        }
                    }
                }
                Ok(other) => panic!("Events answered {other:?}"),
                Err(error) => done.answers.extend(
                    events
                        .into_iter()
                        .map(|(p, _)| (p, Err(unavailable(&error)))),
                ),
            }
        }
        if !stale.is_empty() {
            self.reroute_stale(stale, judge, &mut done).await;
        }
        if !follow_ups.is_empty() {
            // A crash here leaves applied events whose identities are not bound yet: the
            // follow-up records finish them (a test stops the node at this point).
            #[cfg(feature = "failpoints")]
            fail::fail_point!("router::before_follow_ups");
            let report = follow_up::drive(&self.shards, follow_ups, BIND_ATTEMPTS).await;
            self.note_binds(&report, bindings, &applied, &mut done);
            self.merge_taken(&report, bindings, &applied, &mut done)
                .await;
        }
        done
    }

    /// Drives the merges the binds another profile won call for (a race between events naming
    /// the same new identity: as if the later had found it bound), up to
    /// [`MERGE_ANSWER_WAIT`]; each event that lost such a bind is answered with what its
    /// merge made of its profile. A merge the policy refuses leaves the identity `taken`.
    async fn merge_taken(
        &self,
        report: &follow_up::Report,
        bindings: &mut Bindings,
        applied: &[(usize, Vec<Identity>)],
        done: &mut WaveDone,
    ) {
        let plans = merges::taken_plans(report);
        if plans.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + MERGE_ANSWER_WAIT;
        let runs = plans.into_iter().map(|plan| {
            let Cause::Taken(identity) = plan.cause.clone() else {
                unreachable!("a taken bind's merge")
            };
            let shards = &self.shards;
            async move {
                (
                    identity,
                    merges::drive_replanning(shards, plan, deadline).await,
                )
            }
        });
        for (identity, driven) in futures::future::join_all(runs).await {
            let record = match &driven.ended {
                Some(Ended::Finished(record, _)) => Some(&**record),
                Some(_) => None,
                None => driven.committed.as_ref(),
            };
            let Some(record) = record.filter(|r| !matches!(r.state, MergeState::Refused(..)))
            else {
                continue;
            };
            self.learn_merge(record, bindings);
            let (survivor, losers) = merges::merged(record);
            for (at, identities) in applied {
                let Ok(accepted) = &mut done.answers[*at].1 else {
                    continue;
                };
                let lost = accepted.not_linked.iter().position(|n| {
                    n.reason == NotLinkedReason::Taken
                        && n.kind == identity.kind
                        && n.value == identity.value
                });
                if lost.is_none() || !identities.contains(&identity) {
                    continue;
                }
                accepted.not_linked.remove(lost.expect("checked"));
                if accepted.oneid != survivor {
                    accepted.merged.push(accepted.oneid);
                    accepted.oneid = survivor;
                }
                accepted
                    .merged
                    .extend(losers.iter().filter(|l| **l != survivor));
                accepted.merged.sort();
                accepted.merged.dedup();
                accepted.merged.retain(|m| *m != survivor);
                accepted.merge_pending |= driven.ended.is_none();
            }
        }
    }

    /// Routes each event of the wave: the events and their `Events` entry per target shard,
    /// and the events the router decides alone; the refused ones are answered in `done`.
    #[allow(clippy::type_complexity)]
    fn plan_wave(
        &self,
        wave: Vec<Pending>,
        bindings: &Bindings,
        judge: &Judge,
        done: &mut WaveDone,
    ) -> (
        BTreeMap<ShardId, (Vec<Pending>, Vec<Routed>)>,
        Vec<(usize, Event, Alone)>,
        Vec<(usize, Event, BTreeSet<OneId>)>,
    ) {
        let mut alone = Vec::new();
        let mut merges = Vec::new();
        let mut entries: BTreeMap<ShardId, (Vec<Pending>, Vec<Routed>)> = BTreeMap::new();
        for (position, event) in wave {
            match self.route(&event, bindings, judge) {
                Ok(Route::To(shard, target)) => {
                    let (events, routed) = entries.entry(shard).or_default();
                    routed.push(self.routed(&event, Some(shard), target, bindings, judge));
                    events.push((position, event));
                }
                Ok(Route::Merge(profiles)) => merges.push((position, event, profiles)),
                Ok(Route::Rejected(error)) => done.answers.push((position, Err(error))),
                Err(decided) => alone.push((position, event, decided)),
            }
        }
        (entries, alone, merges)
    }

    /// Events a shard refused as judged by another rules version than its own: they go again,
    /// after the router read the rules anew if that shard's are newer than its own, or
    /// installed its own on that shard if they are older (a PUT whose install there did not
    /// land yet: the registry ordered them, and a shard keeps the highest version it is sent,
    /// so any node may install them again).
    async fn reroute_stale(
        &self,
        stale: Vec<(usize, Event, ShardId, u64)>,
        judge: &mut Judge,
        done: &mut WaveDone,
    ) {
        let newest = stale.iter().map(|(_, _, _, version)| *version).max();
        if newest > Some(judge.version) {
            match self.refresh_judge().await {
                Ok(fresh) => *judge = fresh,
                Err(error) => {
                    let answers = stale
                        .into_iter()
                        .map(|(p, ..)| (p, Err(unavailable(&error))));
                    done.answers.extend(answers);
                    return;
                }
            }
        }
        let behind: BTreeSet<ShardId> = stale
            .iter()
            .filter(|(_, _, _, version)| *version < judge.version)
            .map(|(_, _, shard, _)| *shard)
            .collect();
        let install = Command::InstallRules {
            version: judge.version,
            rules: Box::new(Rules::clone(&judge.rules)),
        };
        let installs = per_shard(behind.into_iter().map(|shard| {
            tracing::info!(%shard, version = judge.version, "installing rules on a shard behind the registry");
            (shard, self.shards.propose(shard, install.clone()))
        }))
        .await;
        for (position, event, shard, _) in stale {
            match installs.get(&shard) {
                Some(Err(error)) => done.answers.push((position, Err(unavailable(error)))),
                _ => done.again.push((position, event)),
            }
        }
    }

    /// What the follow-ups' binds told: resolution learns the bindings, and each applied
    /// event lists the identities another profile took first (`taken`).
    fn note_binds(
        &self,
        report: &follow_up::Report,
        bindings: &mut Bindings,
        applied: &[(usize, Vec<Identity>)],
        done: &mut WaveDone,
    ) {
        for (identity, oneid) in &report.bound {
            let epoch = self.reader.binding_epoch(identity.shard(self.n_shards));
            bindings.insert(identity.clone(), Some((*oneid, epoch)));
        }
        // Rare: a race between two events naming the same new identity.
        if report.taken.is_empty() {
            return;
        }
        for (at, identities) in applied {
            let Ok(accepted) = &mut done.answers[*at].1 else {
                continue;
            };
            let before = accepted.not_linked.len();
            for identity in identities {
                let oneid = accepted.oneid;
                if report
                    .taken
                    .iter()
                    .any(|(i, o)| *o == oneid && i == identity)
                {
                    accepted.not_linked.push(NotLinked {
                        kind: identity.kind.clone(),
                        value: identity.value.clone(),
                        reason: NotLinkedReason::Taken,
                    });
                }
            }
            if accepted.not_linked.len() > before {
                NotLinked::sort(&mut accepted.not_linked);
            }
        }
    }

    /// Where an event goes, from what resolution knows and the policy; or the decision the
    /// router makes alone (a conflict or a retry, every identity blocked).
    fn route(&self, event: &Event, bindings: &Bindings, judge: &Judge) -> Result<Route, Alone> {
        if let Some(oneid) = event.oneid.filter(|oneid| oneid.shard().0 >= self.n_shards) {
            return Ok(Route::Rejected(EventError::field(
                ErrorCode::NotFound,
                "oneid",
                format!("profile {oneid} does not exist"),
            )));
        }
        if let (EventBody::Unlink, Some(oneid)) = (&event.body, event.oneid) {
            // Its identities are what it takes off the profile, never what finds it.
            return Ok(Route::To(oneid.shard(), Target::Existing(oneid)));
        }
        let live: Vec<&Identity> = judge.live_of(event).collect();
        if live.is_empty() && event.oneid.is_none() {
            return Err(Alone::Blocked);
        }
        let profiles = profiles_of(event, bindings, judge);
        if profiles.len() > PROFILES_PER_MERGE_MAX {
            return Err(Alone::TooMany(profiles));
        }
        if profiles.len() > 1 {
            return Ok(Route::Merge(profiles));
        }
        Ok(match profiles.first() {
            Some(&oneid) => Route::To(oneid.shard(), Target::Existing(oneid)),
            None => Route::To(anchor(&live, judge).shard(self.n_shards), Target::Claim),
        })
    }

    /// The event as routed to `shard`, for `target` (where and how [`Router::route`] sent it);
    /// `None`: to the survivor of a merge, not known yet (every unbound identity is listed to
    /// link elsewhere; the survivor's shard binds its own).
    fn routed(
        &self,
        event: &Event,
        shard: Option<ShardId>,
        target: Target,
        bindings: &Bindings,
        judge: &Judge,
    ) -> Routed {
        let link_elsewhere: Vec<Identity> = judge
            .live_of(event)
            .filter(|id| bindings[*id].is_none() && Some(id.shard(self.n_shards)) != shard)
            .cloned()
            .collect();
        let found = event
            .identities
            .iter()
            .map(|id| match bindings[id] {
                Some((oneid, epoch)) if judge.live(id) => Found::Bound { oneid, epoch },
                _ => Found::Unbound,
            })
            .collect();
        Routed {
            event: event.clone(),
            target,
            rules_version: judge.version,
            link_elsewhere,
            found,
        }
    }

    /// Answers the events the router decides alone, once the policy they were judged by is
    /// known to be the registry's current one (if it was not, they go again, judged anew):
    /// `blocked_identity`; for more profiles than a merge takes, `duplicate` if the event
    /// already applied to one of them (a retry), else `too_many_profiles`.
    async fn decide_alone(
        &self,
        alone: Vec<(usize, Event, Alone)>,
        judge: &mut Judge,
        done: &mut WaveDone,
    ) {
        if alone.is_empty() {
            return;
        }
        if !judge.fresh {
            match self.refresh_judge().await {
                Ok(fresh) if fresh.version != judge.version => {
                    *judge = fresh;
                    done.again
                        .extend(alone.into_iter().map(|(p, event, _)| (p, event)));
                    return;
                }
                Ok(fresh) => *judge = fresh,
                Err(error) => {
                    done.answers.extend(
                        alone
                            .into_iter()
                            .map(|(p, _, _)| (p, Err(unavailable(&error)))),
                    );
                    return;
                }
            }
        }
        let mut too_many = Vec::new();
        for (position, event, decided) in alone {
            match decided {
                Alone::Blocked => done.answers.push((position, Err(all_blocked()))),
                Alone::TooMany(profiles) => too_many.push((position, event.event_id, profiles)),
            }
        }
        for (position, verdict) in self.retries_among(&too_many).await {
            let answer = verdict.unwrap_or_else(|| {
                let (_, _, profiles) = &too_many[position];
                Err(too_many_profiles(profiles))
            });
            done.answers.push((too_many[position].0, answer));
        }
    }

    /// For each of `events` (position, event id, the profiles it names), in order: `Some`
    /// answer if it already applied to one of its profiles (a retry: `duplicate`, whatever
    /// its identities name now) or that could not be read (`unavailable`), `None` if it did
    /// not apply to any.
    async fn retries_among(
        &self,
        events: &[(usize, String, BTreeSet<OneId>)],
    ) -> Vec<(usize, Option<Answer>)> {
        if events.is_empty() {
            return Vec::new();
        }
        // Each candidate profile's exactly-once record, read at its shard.
        let mut asked: BTreeMap<ShardId, Vec<(OneId, String)>> = BTreeMap::new();
        for (_, event_id, profiles) in events {
            for oneid in profiles {
                asked
                    .entry(oneid.shard())
                    .or_default()
                    .push((*oneid, event_id.clone()));
            }
        }
        let reads = per_shard(asked.into_iter().map(|(shard, events)| {
            let read = self.shards.read(
                shard,
                Query::Events(events.clone()),
                Consistency::Linearizable,
            );
            (shard, async move { (events, read.await) })
        }))
        .await;
        let mut applied: BTreeMap<(OneId, String), Result<bool, ShardError>> = BTreeMap::new();
        for (_, (events, read)) in reads {
            match read {
                Ok((StateAnswer::Events(found), _)) => {
                    applied.extend(events.into_iter().zip(found.into_iter().map(Ok)))
                }
                Ok(other) => panic!("an exactly-once read answered {other:?}"),
                Err(error) => applied.extend(events.into_iter().map(|e| (e, Err(error.clone())))),
            }
        }
        let mut verdicts = Vec::with_capacity(events.len());
        for (at, (_, event_id, profiles)) in events.iter().enumerate() {
            let checks: Vec<(OneId, &Result<bool, ShardError>)> = profiles
                .iter()
                .map(|p| (*p, &applied[&(*p, event_id.clone())]))
                .collect();
            let answer =
                if let Some((oneid, _)) = checks.iter().find(|(_, r)| matches!(r, Ok(true))) {
                    // Its profile may have been merged since (routed by a binding read
                    // before): answered with the profile it is now.
                    Some(self.now_of(*oneid).await.map(Accepted::duplicate))
                } else if let Some((_, Err(error))) = checks.iter().find(|(_, r)| r.is_err()) {
                    Some(Err(unavailable(error)))
                } else {
                    None
                };
            verdicts.push((at, answer));
        }
        verdicts
    }

    /// The live profile `oneid` is now: itself, or the survivor its merges lead to.
    async fn now_of(&self, mut oneid: OneId) -> Result<OneId, EventError> {
        for _ in 0..merges::MERGE_CHAIN_MAX {
            let read = self.shards.read(
                oneid.shard(),
                Query::Profile(oneid),
                Consistency::Linearizable,
            );
            match read.await {
                Ok((StateAnswer::Merged(into), _)) => oneid = into,
                Ok(_) => return Ok(oneid),
                Err(error) => return Err(unavailable(&error)),
            }
        }
        Ok(oneid)
    }

    /// Runs the merges the wave's events call for (their mergeable identities and `oneid`
    /// name 2 to 4 profiles), all at once, each answered when it ends or at
    /// [`MERGE_ANSWER_WAIT`]. A retry of an event that already applied to one of its profiles
    /// is a `duplicate` and merges nothing. Whether kinds merge is the router's policy's, so it
    /// is checked to be the registry's current one (beside those reads).
    async fn run_merges(
        &self,
        merges: Vec<(usize, Event, BTreeSet<OneId>)>,
        bindings: &mut Bindings,
        judge: &mut Judge,
        done: &mut WaveDone,
    ) {
        if merges.is_empty() {
            return;
        }
        let asked: Vec<(usize, String, BTreeSet<OneId>)> = merges
            .iter()
            .map(|(p, e, profiles)| (*p, e.event_id.clone(), profiles.clone()))
            .collect();
        // The reads at once: whether the policy is still the registry's, whether each event
        // already applied, and what unlinks say of it.
        let unlinks = merges
            .iter()
            .map(|(_, event, profiles)| self.unlinked_since(event, profiles, bindings));
        let (fresh, verdicts, unlinks) = tokio::join!(
            self.fresh_or_again(&merges, judge, done),
            self.retries_among(&asked),
            futures::future::join_all(unlinks)
        );
        if !fresh {
            return;
        }
        let deadline = tokio::time::Instant::now() + MERGE_ANSWER_WAIT;
        let mut runs = Vec::new();
        let checked = merges.into_iter().zip(verdicts).zip(unlinks);
        for (((position, mut event, profiles), (_, verdict)), unlinked) in checked {
            if let Some(answer) = verdict {
                done.answers.push((position, answer));
                continue;
            }
            match unlinked {
                Ok(unlinked) if unlinked.is_empty() => {}
                // Dated before an unlink of one of its identities from one of its profiles:
                // routed again without them (they join nothing), and answered as not linked.
                Ok(unlinked) => {
                    event.identities.retain(|id| !unlinked.contains(id));
                    done.unlinked.extend(unlinked.into_iter().map(|id| {
                        (
                            position,
                            NotLinked {
                                kind: id.kind,
                                value: id.value,
                                reason: NotLinkedReason::Unlinked,
                            },
                        )
                    }));
                    done.again.push((position, event));
                    continue;
                }
                Err(error) => {
                    done.answers.push((position, Err(unavailable(&error))));
                    continue;
                }
            }
            let routed = self.routed(&event, None, Target::Claim, bindings, judge);
            let plan = MergePlan::new(profiles, Cause::Event(Box::new(routed)), judge.version);
            let shards = &self.shards;
            runs.push(
                async move { (position, event, merges::drive(shards, plan, deadline).await) },
            );
        }
        for (position, event, driven) in futures::future::join_all(runs).await {
            self.merge_answered(position, event, driven, bindings, done)
                .await;
        }
    }

    /// The identities of a merging event that an `unlink` took off one of its profiles after
    /// the event's `ts`, each asked of that profile's shard (linearizably): an event that old
    /// never binds them back to it, so they must not join it to the profiles they are bound to
    /// now. Merges are rare; unlinks rarer.
    async fn unlinked_since(
        &self,
        event: &Event,
        profiles: &BTreeSet<OneId>,
        bindings: &Bindings,
    ) -> Result<BTreeSet<Identity>, ShardError> {
        let asks = profiles.iter().filter_map(|&oneid| {
            let elsewhere: Vec<Identity> = event
                .identities
                .iter()
                .filter(|id| {
                    bindings
                        .get(*id)
                        .copied()
                        .flatten()
                        .is_some_and(|(o, _)| o != oneid)
                })
                .cloned()
                .collect();
            // A profile with no identity of the event bound elsewhere is not read.
            (!elsewhere.is_empty()).then_some((oneid, elsewhere))
        });
        let reads = asks.map(|(oneid, elsewhere)| {
            let query = Query::Unlinked {
                oneid,
                identities: elsewhere,
                since: event.ts,
            };
            self.shards
                .read(oneid.shard(), query, Consistency::Linearizable)
        });
        let mut unlinked = BTreeSet::new();
        for read in futures::future::join_all(reads).await {
            match read? {
                (StateAnswer::Unlinked(identities), _) => unlinked.extend(identities),
                (other, _) => panic!("an unlink read answered {other:?}"),
            }
        }
        Ok(unlinked)
    }

    /// Whether `judge` is the registry's current policy (read now if it was not known to
    /// be); if another version was ordered, the events go again, judged by it.
    async fn fresh_or_again(
        &self,
        events: &[(usize, Event, BTreeSet<OneId>)],
        judge: &mut Judge,
        done: &mut WaveDone,
    ) -> bool {
        if judge.fresh {
            return true;
        }
        match self.refresh_judge().await {
            Ok(fresh) if fresh.version == judge.version => {
                *judge = fresh;
                true
            }
            Ok(fresh) => {
                *judge = fresh;
                let again = events.iter().map(|(p, e, _)| (*p, e.clone()));
                done.again.extend(again);
                false
            }
            Err(error) => {
                let answers = events.iter().map(|(p, ..)| (*p, Err(unavailable(&error))));
                done.answers.extend(answers);
                false
            }
        }
    }

    /// An event's answer from the merge it called for (see [`Router::run_merges`]); one given
    /// up before its commit (a profile merged elsewhere meanwhile) goes again, to where that
    /// profile went.
    async fn merge_answered(
        &self,
        position: usize,
        mut event: Event,
        driven: merges::Driven,
        bindings: &mut Bindings,
        done: &mut WaveDone,
    ) {
        let answer = match driven.ended {
            Some(Ended::Finished(record, Some(follow_ups))) => {
                self.learn_merge(&record, bindings);
                self.finish_merged(&record, follow_ups, bindings).await
            }
            // Another driver ended it (a sweep, after this event's earlier request).
            Some(Ended::Finished(record, None)) => Ok(Accepted::duplicate(record.survivor)),
            Some(Ended::GaveUp(moved, into)) => {
                match into {
                    Some(into) => {
                        self.rebind(moved, into, bindings);
                        if event.oneid == Some(moved) {
                            event.oneid = Some(into);
                        }
                        done.again.push((position, event));
                    }
                    None => done.answers.push((
                        position,
                        Err(EventError::field(
                            ErrorCode::NotFound,
                            "oneid",
                            format!("profile {moved} does not exist"),
                        )),
                    )),
                }
                return;
            }
            Some(Ended::Abandoned) => {
                done.again.push((position, event));
                return;
            }
            None => match driven.committed {
                Some(record) => {
                    let (survivor, losers) = merges::merged(&record);
                    Ok(Accepted {
                        merged: losers,
                        merge_pending: true,
                        ..Accepted::applied(survivor, Vec::new())
                    })
                }
                None => Err(EventError::new(
                    ErrorCode::Unavailable,
                    "the merge this event calls for waits for another to end; retry the event",
                )),
            },
        };
        done.answers.push((position, answer));
    }

    /// What resolution knew bound to a profile merged into `into` is bound to `into` now.
    fn rebind(&self, merged: OneId, into: OneId, bindings: &mut Bindings) {
        for bound in bindings.values_mut().flatten() {
            if bound.0 == merged {
                *bound = (into, EPOCH_UNKNOWN);
            }
        }
    }

    /// What a finished merge tells resolution: its profiles are its survivor now.
    fn learn_merge(&self, record: &MergeRecord, bindings: &mut Bindings) {
        let (survivor, losers) = merges::merged(record);
        for loser in losers {
            self.rebind(loser, survivor, bindings);
        }
    }

    /// The answer of an event whose merge this router ended: the follow-ups its apply left are
    /// driven first, and the merges the identities it found taken meanwhile call for.
    async fn finish_merged(
        &self,
        record: &MergeRecord,
        follow_ups: Vec<FollowUp>,
        bindings: &mut Bindings,
    ) -> Answer {
        if !follow_ups.is_empty() {
            let report = follow_up::drive(&self.shards, follow_ups, BIND_ATTEMPTS).await;
            for (identity, oneid) in &report.bound {
                let epoch = self.reader.binding_epoch(identity.shard(self.n_shards));
                bindings.insert(identity.clone(), Some((*oneid, epoch)));
            }
        }
        let (_, losers) = merges::merged(record);
        match merges::outcome(record) {
            Some(EventOutcome::Applied(oneid, not_linked)) => Ok(Accepted {
                merged: losers,
                ..Accepted::applied(*oneid, not_linked.clone())
            }),
            Some(EventOutcome::Duplicate(oneid)) => Ok(Accepted::duplicate(*oneid)),
            Some(EventOutcome::Rejected(error)) => Err(error.clone()),
            other => panic!("a merge's event answered {other:?}"),
        }
    }

    /// An event's answer; an applied one also tells resolution that its identities held by
    /// its profile's shard are now bound to the profile (apply bound them, or found them so),
    /// save those it did not link.
    fn learn(
        &self,
        shard: ShardId,
        event: &Event,
        outcome: EventOutcome,
        bindings: &mut Bindings,
    ) -> Learned {
        Learned::Answer(match outcome {
            EventOutcome::Applied(oneid, _) if event.body == EventBody::Unlink => {
                for identity in &event.identities {
                    self.reader.forget_identity(identity);
                    bindings.insert(identity.clone(), None);
                }
                Ok(Accepted::applied(oneid, Vec::new()))
            }
            EventOutcome::Applied(oneid, not_linked) => {
                let epoch = self.reader.binding_epoch(shard);
                for identity in &event.identities {
                    let linked = !not_linked
                        .iter()
                        .any(|n| n.kind == identity.kind && n.value == identity.value);
                    if linked && identity.shard(self.n_shards) == shard {
                        bindings.insert(identity.clone(), Some((oneid, epoch)));
                    }
                }
                Ok(Accepted::applied(oneid, not_linked))
            }
            EventOutcome::Duplicate(oneid) => Ok(Accepted::duplicate(oneid)),
            EventOutcome::Rejected(error) => {
                if error.code == ErrorCode::Unavailable {
                    // Perhaps routed by a binding that moved (an unlink): read anew next time.
                    for identity in &event.identities {
                        self.reader.forget_identity(identity);
                    }
                }
                Err(error)
            }
            EventOutcome::StaleRules(version) => return Learned::Stale(version),
            EventOutcome::Moved(into) => return Learned::Moved(into),
        })
    }

    /// An event whose profile (at `shard`) was merged into `into`, to route again: what
    /// resolution knew bound to that profile is bound to `into` now, and so is its `oneid`.
    fn moved(
        &self,
        shard: ShardId,
        mut event: Event,
        into: OneId,
        bindings: &mut Bindings,
        judge: &Judge,
    ) -> Event {
        let merged: BTreeSet<OneId> = profiles_of(&event, bindings, judge)
            .into_iter()
            .filter(|oneid| oneid.shard() == shard)
            .collect();
        for oneid in &merged {
            self.rebind(*oneid, into, bindings);
        }
        if event.oneid.is_some_and(|oneid| merged.contains(&oneid)) {
            event.oneid = Some(into);
        }
        event
    }
}

/// The profiles an event names (by its oneid and its mergeable identities found bound): a
/// conflict if more than one; if none, and it names no mergeable identity, the profile of its
/// first unmergeable one found bound.
fn profiles_of(event: &Event, bindings: &Bindings, judge: &Judge) -> BTreeSet<OneId> {
    let bound = |mergeable: bool| {
        judge
            .live_of(event)
            .filter(move |id| judge.policy.merges(&id.kind) == mergeable)
            .filter_map(|id| bindings[id].map(|(oneid, _)| oneid))
    };
    let mut profiles: BTreeSet<OneId> = bound(true).chain(event.oneid).collect();
    let any_mergeable = judge.live_of(event).any(|id| judge.policy.merges(&id.kind));
    if profiles.is_empty() && !any_mergeable {
        profiles.extend(bound(false).next());
    }
    profiles
}

/// Where [`Router::route`] sends an event.
enum Route {
    To(ShardId, Target),
    /// Its identities (and oneid) name these profiles (2 to 4): they merge, or it is a retry.
    Merge(BTreeSet<OneId>),
    Rejected(EventError),
}

/// What the router decides alone, once its policy is known to be current.
enum Alone {
    /// Every identity is blocked, and the event names no oneid.
    Blocked,
    /// Its identities (and oneid) name more profiles than a merge makes one: refused, or a
    /// retry.
    TooMany(BTreeSet<OneId>),
}

/// What a shard's answer to an event told.
enum Learned {
    Answer(Answer),
    /// The shard's rules have this version, not the one the event was judged by.
    Stale(u64),
    /// The profile the event was routed to was merged into this one.
    Moved(OneId),
}

/// Splits `todo` into this wave and the rest. An event joins the wave unless it shares an
/// unbound identity with an event of the wave, or an identity or a profile with an event
/// already left for a later wave: so a customer first seen several times gets one OneID, and
/// the events of one customer keep their request order, while unrelated events do not wait
/// behind them. Blocked values relate nothing. A merge runs beside the wave's other events, so
/// it touches no profile they touch: one naming a profile an earlier event of the wave names
/// waits, and later events naming its profiles or identities wait behind it (as behind an
/// unlink, for what it frees).
fn split_wave(
    todo: Vec<Pending>,
    bindings: &Bindings,
    judge: &Judge,
) -> (Vec<Pending>, Vec<Pending>) {
    // The profiles an event names (by OneID or by an identity found bound).
    let profiles_of = |event: &Event| -> Vec<OneId> {
        judge
            .live_of(event)
            .filter_map(|id| bindings[id].map(|(oneid, _)| oneid))
            .chain(event.oneid)
            .collect()
    };
    // Unbound identities of the wave, each with the wave event that holds it.
    let mut unbound_in_wave: BTreeMap<&Identity, usize> = BTreeMap::new();
    // What the events left for later waves touch: a later event touching it waits too.
    let mut later_identities: BTreeSet<&Identity> = BTreeSet::new();
    let mut later_profiles: BTreeSet<OneId> = BTreeSet::new();
    // The profiles the wave's events name so far.
    let mut wave_profiles: BTreeSet<OneId> = BTreeSet::new();
    let mut in_wave = Vec::with_capacity(todo.len());
    for (i, (_, event)) in todo.iter().enumerate() {
        let profiles = profiles_of(event);
        let merges = profiles.iter().collect::<BTreeSet<_>>().len() > 1;
        let shares_unbound: Vec<usize> = judge
            .live_of(event)
            .filter_map(|id| unbound_in_wave.get(id).copied())
            .collect();
        let waits = !shares_unbound.is_empty()
            || judge.live_of(event).any(|id| later_identities.contains(id))
            || profiles.iter().any(|p| later_profiles.contains(p))
            || (merges && profiles.iter().any(|p| wave_profiles.contains(p)));
        if !waits {
            wave_profiles.extend(&profiles);
        }
        if waits {
            // It belongs to the customer of each wave event it shares a new identity with:
            // later events of that customer wait behind it.
            for related in shares_unbound
                .into_iter()
                .map(|j| &todo[j].1)
                .chain([event])
            {
                later_identities.extend(judge.live_of(related));
                later_profiles.extend(profiles_of(related));
            }
        } else if event.body == EventBody::Unlink {
            // Later events naming what it frees find it free: in a later wave.
            later_identities.extend(&event.identities);
        } else if merges {
            later_identities.extend(judge.live_of(event));
            later_profiles.extend(profiles);
        } else {
            for id in judge.live_of(event).filter(|id| bindings[*id].is_none()) {
                unbound_in_wave.insert(id, i);
            }
        }
        in_wave.push(!waits);
    }
    let (wave, rest): (Vec<_>, Vec<_>) = todo
        .into_iter()
        .zip(in_wave)
        .partition(|(_, in_wave)| *in_wave);
    let strip = |events: Vec<(Pending, bool)>| events.into_iter().map(|(e, _)| e).collect();
    (strip(wave), strip(rest))
}
