//! Follow-ups: the work on other shards that an applied event implies, finished even across
//! crashes, restarts and leader changes.
//!
//! An applied event whose identities are held by other shards' indexes leaves one follow-up
//! record per such identity on its profile's shard, in the same atomic apply as the event
//! (`state`). Finishing one takes two proposals: `Bind` at the identity's shard (the arbiter:
//! the first binding wins, and a second bind to the same profile is answered `Bound`), then
//! `FinishFollowUps` at the profile's shard, which lists a bound identity on the profile and
//! deletes the record; a conflict (another profile took the identity first) ends it unlisted.
//! An `unlink` leaves unbind records the same way: `Unbind` at the identity's shard (which
//! removes the binding only if it is still the profile's), then `FinishFollowUps`.
//!
//! Two drivers run [`drive`]: the router, right after the event applied, so that the answer to
//! the request comes after the binds; and the profile shard's leader, which sweeps records the
//! router left behind (it crashed, the client hung up, the binding shard had no leader). Both
//! steps are idempotent, so both drivers finishing the same record does no harm.
//!
//! This module knows the shards only as addresses to propose to; it never reads storage.

use crate::shards::{per_shard, Shards};
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_state::command::{BindOutcome, Command, FollowUp, FollowUpAnswer, Output};
use std::collections::BTreeMap;
use std::time::Duration;

/// The wait before the second attempt at a bind; doubled for each later attempt.
pub const BIND_RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// What [`drive`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// Records finished; the others stay for the leader's sweep.
    pub finished: usize,
    /// Each answered bind's identity and the profile it is bound to (the follow-up's, or the
    /// one that took it first).
    pub bound: Vec<(Identity, OneId)>,
    /// The binds another profile won first: each identity, and the follow-up's profile that
    /// goes without it (`taken`, unless the two merge: see `merges::taken_plans`).
    pub taken: Vec<(Identity, OneId)>,
}

/// Binds (or unbinds) each follow-up's identity at its shard (up to `attempts` tries per
/// shard, with backoff), then finishes the answered ones at their profiles' shards.
pub async fn drive(shards: &Shards, follow_ups: Vec<FollowUp>, attempts: u32) -> Report {
    let mut report = Report::default();
    let answers = bind(shards, follow_ups, attempts, &mut report).await;
    let replies = per_shard(answers.into_iter().map(|(shard, answers)| {
        let n = answers.len();
        let call = shards.propose(shard, Command::FinishFollowUps(answers));
        (shard, async move { (n, call.await) })
    }))
    .await;
    for (shard, (n, reply)) in replies {
        match reply {
            Ok(_) => report.finished += n,
            Err(error) => {
                tracing::warn!(%shard, %error, "follow-ups not finished now; the shard's leader will finish them");
            }
        }
    }
    report
}

/// Proposes the binds, one `Bind` per identity shard (and one `Unbind` for the unbinds),
/// retrying the shards that failed: each answered follow-up's answer, by the shard of its
/// profile (where it is finished).
async fn bind(
    shards: &Shards,
    follow_ups: Vec<FollowUp>,
    attempts: u32,
    report: &mut Report,
) -> BTreeMap<ShardId, Vec<FollowUpAnswer>> {
    let mut to_bind: BTreeMap<(ShardId, bool), Vec<FollowUp>> = BTreeMap::new();
    for follow_up in follow_ups {
        to_bind
            .entry((follow_up.identity.shard(shards.n_shards), follow_up.unbind))
            .or_default()
            .push(follow_up);
    }
    let mut answers: BTreeMap<ShardId, Vec<FollowUpAnswer>> = BTreeMap::new();
    let mut wait = BIND_RETRY_BACKOFF;
    for attempt in 1..=attempts {
        if to_bind.is_empty() {
            break;
        }
        if attempt > 1 {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        let replies = per_shard(std::mem::take(&mut to_bind).into_iter().map(
            |((shard, unbind), follow_ups)| {
                let call = shards.propose(shard, command(&follow_ups, unbind));
                ((shard, unbind), async move { (follow_ups, call.await) })
            },
        ))
        .await;
        for ((shard, unbind), (follow_ups, reply)) in replies {
            let outcomes = match reply {
                Ok(Output::Bind(outcomes)) => outcomes,
                Ok(other) => panic!("a Bind answered {other:?}"),
                Err(error) => {
                    tracing::warn!(%shard, %error, attempt, unbind, "binding identities failed");
                    to_bind.insert((shard, unbind), follow_ups);
                    continue;
                }
            };
            for (follow_up, outcome) in follow_ups.into_iter().zip(outcomes) {
                let owner = match outcome {
                    BindOutcome::Bound => Some(follow_up.oneid),
                    BindOutcome::Conflict(other) => {
                        tracing::info!(oneid = %follow_up.oneid, %other, kind = %follow_up.identity.kind, "identity went to another profile first: the two merge");
                        report
                            .taken
                            .push((follow_up.identity.clone(), follow_up.oneid));
                        Some(other)
                    }
                    BindOutcome::Unbound => None,
                };
                if let Some(owner) = owner {
                    report.bound.push((follow_up.identity, owner));
                }
                answers
                    .entry(follow_up.oneid.shard())
                    .or_default()
                    .push(FollowUpAnswer {
                        seq: follow_up.seq,
                        outcome,
                    });
            }
        }
    }
    answers
}

/// The `Bind` (or `Unbind`) of follow-ups that all bind (or all unbind).
fn command(follow_ups: &[FollowUp], unbind: bool) -> Command {
    let pairs = follow_ups
        .iter()
        .map(|f| (f.identity.clone(), f.oneid))
        .collect();
    if unbind {
        Command::Unbind(pairs)
    } else {
        Command::Bind(pairs)
    }
}
