//! The router: takes a batch of validated events to the shards that own their profiles.
//!
//! An event names its profile by OneID (whose shard is in the id) and/or by identities (each
//! held by the shard its hash picks). For each wave of events the router:
//! 1. resolves every identity at the shard that holds it (one read per shard, in parallel); an
//!    event whose identities (and oneid) are bound to two profiles is rejected `identity_conflict`;
//! 2. proposes one `Events` entry per target shard, events in request order. An event with no
//!    known profile is a `Claim` at the shard of its *anchor* (its strongest identity, see
//!    [`anchor`]), which binds the anchor and mints the OneID; so concurrent first sightings that
//!    share their strongest identity meet at one shard and get one OneID. Apply checks the
//!    profile's identity limit counting the identities still to link;
//! 3. for each applied event, binds its unbound identities held by other shards (the identity's
//!    shard is the arbiter: the first binding wins), then lists the bound ones on the profile
//!    (`Link`). A rejected event binds nothing. Every binding leaves an outbox record at its
//!    shard, whose leader re-delivers the link if this router stopped half-way, so a link that
//!    touches several shards resumes after a crash.
//!
//! Events that share an identity unbound at step 1 go to separate waves, so a customer first
//! seen twice in one batch ends up with one OneID, as if the events came one by one; events
//! related to one waiting for a later wave (by an identity or a profile) wait too, so each
//! customer's events keep their request order. Unrelated events go in the first wave.

use crate::command::{BindOutcome, Command, EventOutcome, Output, Routed, Target};
use crate::metrics::Metrics;
use crate::shard::{Propose, ShardError, ShardMap};
use crate::storage::StateReader;
use futures::future::join_all;
use oneid_protocol::api::{EventResult, EventStatus, EventsResponse};
use oneid_protocol::event::{Event, EventError};
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::ErrorCode;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

#[derive(Clone)]
pub struct Router {
    pub shards: ShardMap,
    /// Identity resolution reads acknowledged state directly; apply re-checks it.
    pub reader: StateReader,
    pub n_shards: u32,
    pub metrics: Arc<Metrics>,
}

/// An error reaching or using a shard: the events involved are answered `unavailable`.
fn unavailable(error: impl std::fmt::Display) -> EventError {
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

/// Attempts to bind the identities of applied events, and the wait before the first retry
/// (doubled each time).
const BIND_ATTEMPTS: u32 = 5;
const BIND_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

fn conflict(a: OneId, b: OneId) -> EventError {
    let (a, b) = (a.min(b), a.max(b));
    EventError::field(
        ErrorCode::IdentityConflict,
        "identities",
        format!("the event's identities belong to two profiles, {a} and {b}"),
    )
}

/// Runs one future per shard, all at once, and collects their answers by shard.
async fn per_shard<T, F: Future<Output = T>>(
    calls: impl IntoIterator<Item = (ShardId, F)>,
) -> BTreeMap<ShardId, T> {
    let (shards, futures): (Vec<ShardId>, Vec<F>) = calls.into_iter().unzip();
    shards.into_iter().zip(join_all(futures).await).collect()
}

impl Router {
    fn addr(&self, shard: ShardId) -> &actix::Addr<crate::shard::ShardActor> {
        &self
            .shards
            .get()
            .expect("shards are started before the API")[shard.0 as usize]
    }

    async fn propose(&self, shard: ShardId, command: Command) -> Result<Output, String> {
        match self.addr(shard).send(Propose(command)).await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(format!("shard {shard} is not running: {error}")),
        }
    }

    /// Applies a batch; one result per input, in order. A parse failure carries the event id
    /// the caller could read, for its result row.
    pub async fn ingest(&self, events: Vec<Result<Event, (String, EventError)>>) -> EventsResponse {
        let mut results: Vec<Option<Result<(EventStatus, OneId), EventError>>> =
            vec![None; events.len()];
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
                    results[position] = Some(Err(error));
                }
            }
        }
        while !todo.is_empty() {
            let (wave, rest) = self.next_wave(todo).await;
            todo = rest;
            for (position, result) in self.run_wave(wave.0, &wave.1).await {
                results[position] = Some(result);
            }
        }
        let mut response = EventsResponse {
            applied: 0,
            duplicates: 0,
            rejected: 0,
            results: Vec::with_capacity(results.len()),
        };
        for (result, event_id) in results.into_iter().zip(ids) {
            let result = result.expect("every event has a result");
            let (status, oneid, error) = match result {
                Ok((status, oneid)) => (status, Some(oneid.to_string()), None),
                Err(error) => (EventStatus::Rejected, None, Some(error)),
            };
            match status {
                EventStatus::Applied => response.applied += 1,
                EventStatus::Duplicate => response.duplicates += 1,
                EventStatus::Rejected => response.rejected += 1,
            }
            response.results.push(EventResult {
                event_id,
                status,
                oneid,
                error,
            });
        }
        self.metrics
            .events_applied
            .fetch_add(response.applied, Relaxed);
        self.metrics
            .events_duplicate
            .fetch_add(response.duplicates, Relaxed);
        self.metrics
            .events_rejected
            .fetch_add(response.rejected, Relaxed);
        response
    }

    /// Resolves the identities of `todo` and splits it into this wave and the rest. An event
    /// joins the wave unless it shares an identity unbound at resolve time with an event of the
    /// wave, or an identity or a profile with an event already left for a later wave: so a
    /// customer first seen several times gets one OneID, and the events of one customer keep
    /// their request order, while unrelated events do not wait behind them.
    #[allow(clippy::type_complexity)]
    async fn next_wave(
        &self,
        todo: Vec<(usize, Event)>,
    ) -> (
        (Vec<(usize, Event)>, BTreeMap<Identity, Option<OneId>>),
        Vec<(usize, Event)>,
    ) {
        let mut by_shard: BTreeMap<ShardId, BTreeSet<Identity>> = BTreeMap::new();
        for (_, event) in &todo {
            for identity in &event.identities {
                by_shard
                    .entry(identity.shard(self.n_shards))
                    .or_default()
                    .insert(identity.clone());
            }
        }
        let bindings: BTreeMap<Identity, Option<OneId>> = by_shard
            .into_values()
            .flatten()
            .map(|identity| {
                let bound = self.reader.identity(&identity);
                (identity, bound)
            })
            .collect();
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
        let strip = |events: Vec<((usize, Event), bool)>| -> Vec<(usize, Event)> {
            events.into_iter().map(|(event, _)| event).collect()
        };
        ((strip(wave), bindings), strip(rest))
    }

    async fn run_wave(
        &self,
        wave: Vec<(usize, Event)>,
        bindings: &BTreeMap<Identity, Option<OneId>>,
    ) -> Vec<(usize, Result<(EventStatus, OneId), EventError>)> {
        let mut done = Vec::new();
        // Decide each event's target shard, and which of its identities other shards must bind
        // once it has applied.
        let mut entries: BTreeMap<ShardId, (Vec<usize>, Vec<Routed>)> = BTreeMap::new();
        for (position, event) in wave {
            if let Some(oneid) = event.oneid.filter(|oneid| oneid.shard().0 >= self.n_shards) {
                let error = EventError::field(
                    ErrorCode::NotFound,
                    "oneid",
                    format!("profile {oneid} does not exist"),
                );
                done.push((position, Err(error)));
                continue;
            }
            let mut bound: BTreeSet<OneId> = event
                .identities
                .iter()
                .filter_map(|id| bindings[id])
                .collect();
            bound.extend(event.oneid);
            let mut bound = bound.into_iter();
            let (target, shard) = match (bound.next(), bound.next()) {
                (Some(a), Some(b)) => {
                    done.push((position, Err(conflict(a, b))));
                    continue;
                }
                (Some(oneid), None) => (Target::Existing(oneid), oneid.shard()),
                (None, _) => (
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
            let entry = entries.entry(shard).or_default();
            entry.0.push(position);
            entry.1.push(Routed {
                event,
                target,
                link_elsewhere,
                bound,
            });
        }

        // One Events entry per target shard, all shards at once.
        let answers = per_shard(entries.into_iter().map(|(shard, (positions, routed))| {
            let links: Vec<Vec<Identity>> =
                routed.iter().map(|r| r.link_elsewhere.clone()).collect();
            let call = self.propose(shard, Command::Events(routed));
            (shard, async move { (positions, links, call.await) })
        }))
        .await;

        // Identities of applied events held by other shards: bind there, then list.
        let mut follow_up: BTreeMap<ShardId, Vec<(Identity, OneId)>> = BTreeMap::new();
        for (_, (positions, links, answer)) in answers {
            match answer {
                Ok(Output::Events(outcomes)) => {
                    for ((position, links), outcome) in
                        positions.into_iter().zip(links).zip(outcomes)
                    {
                        // A duplicate binds too: if the first attempt stopped before its binds
                        // (a crash, a lost connection), the client's retry finishes them.
                        let result = match outcome {
                            EventOutcome::Applied(oneid) => Ok((EventStatus::Applied, oneid)),
                            EventOutcome::Duplicate(oneid) => Ok((EventStatus::Duplicate, oneid)),
                            EventOutcome::Rejected(error) => Err(error),
                        };
                        if let Ok((_, oneid)) = result {
                            for identity in links {
                                follow_up
                                    .entry(identity.shard(self.n_shards))
                                    .or_default()
                                    .push((identity, oneid));
                            }
                        }
                        done.push((position, result));
                    }
                }
                Ok(other) => panic!("Events answered {other:?}"),
                Err(error) => {
                    done.extend(positions.into_iter().map(|p| (p, Err(unavailable(&error)))))
                }
            }
        }
        self.bind_and_link(follow_up).await;
        done
    }

    /// Binds identities of applied events at their shards, then lists the bound ones on the
    /// profiles. An identity another profile bound first stays with it (it is not listed here).
    /// A link not delivered now is delivered by the outbox sweep of the identity's shard.
    async fn bind_and_link(&self, mut binds: BTreeMap<ShardId, Vec<(Identity, OneId)>>) {
        let mut links: BTreeMap<ShardId, Vec<(OneId, Identity)>> = BTreeMap::new();
        let mut wait = BIND_RETRY_BACKOFF;
        for attempt in 1..=BIND_ATTEMPTS {
            if binds.is_empty() {
                break;
            }
            if attempt > 1 {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            let answers = per_shard(std::mem::take(&mut binds).into_iter().map(
                |(shard, pairs)| {
                    let call = self.propose(shard, Command::Bind(pairs.clone()));
                    (shard, async move { (pairs, call.await) })
                },
            ))
            .await;
            for (shard, (pairs, answer)) in answers {
                let outcomes = match answer {
                    Ok(Output::Bind(outcomes)) => outcomes,
                    Ok(other) => panic!("a Bind answered {other:?}"),
                    Err(error) => {
                        // Transient (no leader, overloaded): try again; after the last attempt
                        // the client's retry of the event (answered `duplicate`) binds them.
                        tracing::warn!(%shard, %error, attempt, "binding identities failed");
                        binds.insert(shard, pairs);
                        continue;
                    }
                };
                for ((identity, oneid), outcome) in pairs.into_iter().zip(outcomes) {
                    match outcome {
                        BindOutcome::Bound => links
                            .entry(oneid.shard())
                            .or_default()
                            .push((oneid, identity)),
                        BindOutcome::Conflict(other) => {
                            tracing::info!(%oneid, %other, kind = %identity.kind, "identity went to another profile first; not linked");
                        }
                    }
                }
            }
        }
        let answers = per_shard(
            links
                .into_iter()
                .map(|(shard, pairs)| (shard, self.propose(shard, Command::Link(pairs)))),
        )
        .await;
        for (shard, answer) in answers {
            if let Err(error) = answer {
                tracing::warn!(%shard, %error, "link not delivered now; the outbox sweep will deliver it");
            }
        }
    }

    /// Proposes a command on every shard (rules changes); the first error wins.
    pub async fn broadcast(&self, command: Command) -> Result<(), ShardError> {
        for shard in 0..self.n_shards {
            match self
                .addr(ShardId(shard))
                .send(Propose(command.clone()))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err(ShardError::Dropped(ShardId(shard))),
            }
        }
        Ok(())
    }
}
