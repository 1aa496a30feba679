//! The router: takes a batch of validated events to the shards that own their profiles.
//!
//! An event names its profile by OneID (whose shard is in the id) and/or by identities (each
//! held by the shard its hash picks). The router:
//! 1. resolves every identity of the batch once, at the start: a binding this node cached
//!    needs no read (bindings never change); the others are read at their shards,
//!    linearizably (a stale "unbound" would split a customer for good); an event whose
//!    identities (and oneid) are bound to two profiles is rejected `identity_conflict`, unless
//!    it already applied to one of them: then it is a `duplicate`;
//! 2. for each wave, proposes one `Events` entry per target shard, events in request order.
//!    An event with no known profile is a `Claim` at the shard of its *anchor* (its strongest
//!    identity, see [`anchor`]), which binds the anchor and mints the OneID; so concurrent
//!    first sightings that share their strongest identity meet at one shard and get one OneID;
//! 3. drives the follow-ups the applied events left (their identities held by other shards:
//!    bind there, then list on the profile, see `follow_up`) before answering, so a lookup by
//!    any identity of an applied event finds its profile once the request is answered. The
//!    records are durable: if this stops half-way, the profile shard's leader finishes them.
//!
//! Events that share an identity unbound at resolve time go to separate waves, so a customer
//! first seen twice in one batch ends up with one OneID, as if the events came one by one;
//! events related to one waiting for a later wave (by an identity or a profile) wait too, so
//! each customer's events keep their request order. Unrelated events go in the first wave.
//! What a wave's answers and binds tell about the identities updates the resolution for the
//! next wave, so resolution reads each identity once per request. At most
//! [`WAVES_PER_REQUEST_MAX`] waves run; events past them are answered `too_many_waves`.

use crate::follow_up;
use crate::metrics::Metrics;
use crate::shards::{per_shard, Consistency, Shards};
use crate::storage::StateReader;
use crate::storage::{Answer as StateAnswer, Query};
use oneid_protocol::api::{EventResult, EventStatus, EventsResponse};
use oneid_protocol::event::{Event, EventError};
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::ErrorCode;
use oneid_replica::ShardError;
use oneid_state::command::{Command, EventOutcome, FollowUp, Output, Routed, Target};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

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
    /// Its cache of bindings (found bindings never change, so they need no read); the rest of
    /// resolution reads each identity's shard linearizably: a stale "unbound" would split a
    /// customer in two for good.
    pub reader: StateReader,
    pub n_shards: u32,
    pub metrics: Arc<Metrics>,
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

/// The identity a new profile is claimed by: the strongest kind, then the smallest value.
fn anchor(identities: &[Identity]) -> &Identity {
    let rank = |id: &Identity| {
        ANCHOR_KINDS
            .iter()
            .position(|k| *k == id.kind)
            .unwrap_or(ANCHOR_KINDS.len())
    };
    identities
        .iter()
        .min_by(|a, b| (rank(a), &a.kind, &a.value).cmp(&(rank(b), &b.kind, &b.value)))
        .expect("a claiming event has identities")
}

fn conflict(a: OneId, b: OneId) -> EventError {
    let (a, b) = (a.min(b), a.max(b));
    EventError::field(
        ErrorCode::IdentityConflict,
        "identities",
        format!("the event's identities belong to two profiles, {a} and {b}"),
    )
}

/// What resolution knows of each identity of the batch: the profile it is bound to, or
/// `None` (unbound when read, and nothing since told otherwise).
type Bindings = BTreeMap<Identity, Option<OneId>>;

/// An event's answer, before it becomes a result row.
type Answer = Result<(EventStatus, OneId), EventError>;

/// An event of the batch and its position in the request.
type Pending = (usize, Event);

impl Router {
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
        let (mut bindings, unresolved) = self.resolve(&todo).await;
        // Events with an identity whose shard could not be read wait for a retry.
        let (todo_now, blocked): (Vec<Pending>, Vec<Pending>) =
            todo.into_iter().partition(|(_, event)| {
                event
                    .identities
                    .iter()
                    .all(|id| !unresolved.contains_key(id))
            });
        for (position, event) in blocked {
            let error = event
                .identities
                .iter()
                .find_map(|id| unresolved.get(id))
                .expect("blocked by one");
            answers[position] = Some(Err(unavailable(error)));
        }
        let mut todo = todo_now;
        for _ in 0..WAVES_PER_REQUEST_MAX {
            if todo.is_empty() {
                break;
            }
            let (wave, rest) = split_wave(todo, &bindings);
            todo = rest;
            for (position, answer) in self.run_wave(wave, &mut bindings).await {
                answers[position] = Some(answer);
            }
        }
        for (position, _) in todo {
            answers[position] = Some(Err(EventError::new(
                ErrorCode::TooManyWaves,
                format!("the event waited behind {WAVES_PER_REQUEST_MAX} waves of events sharing new identities; send it again in a later request"),
            )));
        }
        self.respond(answers, ids)
    }

    /// Reads every identity of the batch once: cached bindings need no read; the others are
    /// read at their shards, linearizably, one read per shard. Answers the bindings, and the
    /// identities whose shard could not be read.
    async fn resolve(&self, todo: &[Pending]) -> (Bindings, BTreeMap<Identity, ShardError>) {
        let mut bindings = Bindings::new();
        let mut to_read: BTreeMap<ShardId, Vec<Identity>> = BTreeMap::new();
        let identities: BTreeSet<&Identity> =
            todo.iter().flat_map(|(_, e)| &e.identities).collect();
        for identity in identities {
            match self.reader.cached_identity(identity) {
                Some(oneid) => {
                    bindings.insert(identity.clone(), Some(oneid));
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
        for (_, (identities, read)) in reads {
            match read {
                Ok((StateAnswer::Identities(found), _)) => {
                    for (identity, oneid) in identities.into_iter().zip(found) {
                        if let Some(oneid) = oneid {
                            self.reader.cache_identity(&identity, oneid);
                        }
                        bindings.insert(identity, oneid);
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
            let (status, oneid, error) = match answer.expect("every event has an answer") {
                Ok((status, oneid)) => (status, Some(oneid.to_string()), None),
                Err(error) => (EventStatus::Rejected, None, Some(error)),
            };
            match status {
                EventStatus::Applied => response.applied += 1,
                EventStatus::Duplicate => response.duplicates += 1,
                EventStatus::Rejected => response.rejected += 1,
                EventStatus::Other(_) => unreachable!("the router answers only known statuses"),
            }
            response.results.push(EventResult {
                event_id,
                status,
                oneid,
                error,
            });
        }
        let m = &self.metrics;
        m.events_applied.fetch_add(response.applied, Relaxed);
        m.events_duplicate.fetch_add(response.duplicates, Relaxed);
        m.events_rejected.fetch_add(response.rejected, Relaxed);
        response
    }

    /// Runs one wave: decides each event's target, proposes the events, drives the follow-ups
    /// of the applied ones, and learns from the answers what the next wave resolves to.
    async fn run_wave(&self, wave: Vec<Pending>, bindings: &mut Bindings) -> Vec<(usize, Answer)> {
        let mut done = Vec::new();
        let mut conflicts = Vec::new();
        let mut entries: BTreeMap<ShardId, (Vec<usize>, Vec<Routed>)> = BTreeMap::new();
        for (position, event) in wave {
            match self.route(event, bindings) {
                Ok((shard, routed)) => {
                    let entry = entries.entry(shard).or_default();
                    entry.0.push(position);
                    entry.1.push(routed);
                }
                Err(Routing::Rejected(error)) => done.push((position, Err(error))),
                Err(Routing::Conflict(event_id, profiles)) => {
                    conflicts.push((position, event_id, profiles));
                }
            }
        }
        done.extend(self.settle_conflicts(conflicts).await);

        // One Events entry per target shard, all shards at once.
        let replies = per_shard(entries.into_iter().map(|(shard, (positions, routed))| {
            let identities: Vec<Vec<Identity>> =
                routed.iter().map(|r| r.event.identities.clone()).collect();
            let call = self.shards.propose(shard, Command::Events(routed));
            (shard, async move { (positions, identities, call.await) })
        }))
        .await;
        let mut follow_ups: Vec<FollowUp> = Vec::new();
        for (shard, (positions, identities, reply)) in replies {
            match reply {
                Ok(Output::Events {
                    outcomes,
                    follow_ups: left,
                }) => {
                    follow_ups.extend(left);
                    for ((position, identities), outcome) in
                        positions.into_iter().zip(identities).zip(outcomes)
                    {
                        done.push((position, self.learn(shard, identities, outcome, bindings)));
                    }
                }
                Ok(other) => panic!("Events answered {other:?}"),
                Err(error) => {
                    done.extend(positions.into_iter().map(|p| (p, Err(unavailable(&error)))))
                }
            }
        }
        if !follow_ups.is_empty() {
            // A crash here leaves applied events whose identities are not bound yet: the
            // follow-up records finish them (a test stops the node at this point).
            #[cfg(feature = "failpoints")]
            fail::fail_point!("router::before_follow_ups");
            let report = follow_up::drive(&self.shards, follow_ups, BIND_ATTEMPTS).await;
            for (identity, oneid) in report.bound {
                bindings.insert(identity, Some(oneid));
            }
        }
        done
    }

    /// The shard an event goes to and how it is routed, from what resolution knows.
    fn route(&self, event: Event, bindings: &Bindings) -> Result<(ShardId, Routed), Routing> {
        if let Some(oneid) = event.oneid.filter(|oneid| oneid.shard().0 >= self.n_shards) {
            return Err(Routing::Rejected(EventError::field(
                ErrorCode::NotFound,
                "oneid",
                format!("profile {oneid} does not exist"),
            )));
        }
        let mut profiles: BTreeSet<OneId> = event
            .identities
            .iter()
            .filter_map(|id| bindings[id])
            .collect();
        profiles.extend(event.oneid);
        if profiles.len() > 1 {
            return Err(Routing::Conflict(event.event_id, profiles));
        }
        let (target, shard) = match profiles.first() {
            Some(&oneid) => (Target::Existing(oneid), oneid.shard()),
            None => (
                Target::Claim,
                anchor(&event.identities).shard(self.n_shards),
            ),
        };
        let link_elsewhere: Vec<Identity> = event
            .identities
            .iter()
            .filter(|id| bindings[*id].is_none() && id.shard(self.n_shards) != shard)
            .cloned()
            .collect();
        let bound = event
            .identities
            .iter()
            .map(|id| bindings[id].is_some())
            .collect();
        Ok((
            shard,
            Routed {
                event,
                target,
                link_elsewhere,
                bound,
            },
        ))
    }

    /// Answers the events whose identities name several profiles: `duplicate` if the event
    /// already applied to one of them (a retry, after another profile took one of its
    /// identities), else `identity_conflict`.
    async fn settle_conflicts(
        &self,
        conflicts: Vec<(usize, String, BTreeSet<OneId>)>,
    ) -> Vec<(usize, Answer)> {
        if conflicts.is_empty() {
            return Vec::new();
        }
        // Each candidate profile's exactly-once record, read at its shard.
        let mut asked: BTreeMap<ShardId, Vec<(OneId, String)>> = BTreeMap::new();
        for (_, event_id, profiles) in &conflicts {
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
        conflicts
            .into_iter()
            .map(|(position, event_id, profiles)| {
                let checks: Vec<(OneId, &Result<bool, ShardError>)> = profiles
                    .iter()
                    .map(|p| (*p, &applied[&(*p, event_id.clone())]))
                    .collect();
                let answer =
                    if let Some((oneid, _)) = checks.iter().find(|(_, r)| matches!(r, Ok(true))) {
                        Ok((EventStatus::Duplicate, *oneid))
                    } else if let Some((_, Err(error))) = checks.iter().find(|(_, r)| r.is_err()) {
                        Err(unavailable(error))
                    } else {
                        let mut two = profiles.iter();
                        let (a, b) = (two.next(), two.next());
                        Err(conflict(*a.expect("two"), *b.expect("two")))
                    };
                (position, answer)
            })
            .collect()
    }

    /// An event's answer; an applied one also tells resolution that its identities held by
    /// its profile's shard are now bound to the profile (apply bound them, or found them so).
    fn learn(
        &self,
        shard: ShardId,
        identities: Vec<Identity>,
        outcome: EventOutcome,
        bindings: &mut Bindings,
    ) -> Answer {
        match outcome {
            EventOutcome::Applied(oneid) => {
                for identity in identities {
                    if identity.shard(self.n_shards) == shard {
                        bindings.insert(identity, Some(oneid));
                    }
                }
                Ok((EventStatus::Applied, oneid))
            }
            EventOutcome::Duplicate(oneid) => Ok((EventStatus::Duplicate, oneid)),
            EventOutcome::Rejected(error) => Err(error),
        }
    }
}

/// Why an event was not routed.
enum Routing {
    Rejected(EventError),
    /// Its identities (and oneid) name these profiles: a conflict, or a retry.
    Conflict(String, BTreeSet<OneId>),
}

/// Splits `todo` into this wave and the rest. An event joins the wave unless it shares an
/// unbound identity with an event of the wave, or an identity or a profile with an event
/// already left for a later wave: so a customer first seen several times gets one OneID, and
/// the events of one customer keep their request order, while unrelated events do not wait
/// behind them.
fn split_wave(todo: Vec<Pending>, bindings: &Bindings) -> (Vec<Pending>, Vec<Pending>) {
    // The profiles an event names (by OneID or by an identity found bound).
    let profiles_of = |event: &Event| -> Vec<OneId> {
        event
            .identities
            .iter()
            .filter_map(|id| bindings[id])
            .chain(event.oneid)
            .collect()
    };
    // Unbound identities of the wave, each with the wave event that holds it.
    let mut unbound_in_wave: BTreeMap<&Identity, usize> = BTreeMap::new();
    // What the events left for later waves touch: a later event touching it waits too.
    let mut later_identities: BTreeSet<&Identity> = BTreeSet::new();
    let mut later_profiles: BTreeSet<OneId> = BTreeSet::new();
    let mut in_wave = Vec::with_capacity(todo.len());
    for (i, (_, event)) in todo.iter().enumerate() {
        let profiles = profiles_of(event);
        let shares_unbound: Vec<usize> = event
            .identities
            .iter()
            .filter_map(|id| unbound_in_wave.get(id).copied())
            .collect();
        let waits = !shares_unbound.is_empty()
            || event
                .identities
                .iter()
                .any(|id| later_identities.contains(id))
            || profiles.iter().any(|p| later_profiles.contains(p));
        if waits {
            // It belongs to the customer of each wave event it shares a new identity with:
            // later events of that customer wait behind it.
            for related in shares_unbound
                .into_iter()
                .map(|j| &todo[j].1)
                .chain([event])
            {
                later_identities.extend(&related.identities);
                later_profiles.extend(profiles_of(related));
            }
        } else {
            for id in event.identities.iter().filter(|id| bindings[*id].is_none()) {
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
