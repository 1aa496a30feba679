//! Merges, driven over the cluster: runs one merge's driver (`oneid_state::merge_driver`, which
//! says what to propose where) against the shards, waiting with backoff where it asks (a
//! profile held by another merge, follow-ups pending) and where a shard has no leader. The
//! router drives the merges its events call for, up to [`MERGE_ANSWER_WAIT`]; a shard's
//! leader sweeps the locks older than `MERGE_SWEEP_GRACE_MS` and drives their merges to the
//! end, so a merge goes on after a crash, a restart or a leader change, from where it stood.
//!
//! This module knows the shards only as addresses to propose to; it never reads storage.

use crate::follow_up;
use crate::shards::Shards;
use oneid_protocol::ids::OneId;
use oneid_state::command::{Command, EventOutcome, Output};
use oneid_state::merge::{Cause, MergePlan, MergeRecord, MergeState};
use oneid_state::merge_driver::{Driver, Ended, Next};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

/// How long an event's answer waits for the merge it called for; past it, a committed merge's
/// event is answered with `merge_pending` (the sweeps finish it), an uncommitted one's
/// `unavailable`.
pub const MERGE_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// How long a sweep drives one merge before leaving it to the next sweep.
pub const MERGE_SWEEP_WAIT: Duration = Duration::from_secs(30);
/// Most merges a read follows from the OneID asked for to the profile it resolves to (a
/// survivor merged into another later, and so on).
pub const MERGE_CHAIN_MAX: usize = 64;
/// The first wait of a step asked to wait, or that failed; doubled up to
/// [`MERGE_RETRY_BACKOFF_MAX`].
const MERGE_RETRY_BACKOFF: Duration = Duration::from_millis(20);
const MERGE_RETRY_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// How far a driver got.
#[derive(Debug)]
pub struct Driven {
    /// `None`: the deadline came first.
    pub ended: Option<Ended>,
    /// The merge's record, once the driver saw it committed.
    pub committed: Option<MergeRecord>,
}

/// Drives `plan` until it ends or `deadline` passes.
pub async fn drive(shards: &Shards, plan: MergePlan, deadline: Instant) -> Driven {
    let merge = plan.merge;
    let mut driver = Driver::new(plan, shards.n_shards);
    let mut wait = MERGE_RETRY_BACKOFF;
    loop {
        let steps = match driver.next() {
            Next::Propose(steps) => steps,
            Next::Done(ended) => {
                return Driven {
                    ended: Some(ended),
                    committed: driver.committed().cloned(),
                }
            }
        };
        if Instant::now() >= deadline {
            return Driven {
                ended: None,
                committed: driver.committed().cloned(),
            };
        }
        let committed = driver.committed().is_some();
        let proposals = steps.into_iter().map(|(shard, step)| async move {
            let reply = shards.propose(shard, Command::Merge(step.clone())).await;
            (shard, step, reply)
        });
        let mut waiting = None;
        for (shard, step, reply) in futures::future::join_all(proposals).await {
            let why = match reply {
                Ok(Output::Merge(answer)) => driver.answer(&step, answer).map(|w| format!("{w:?}")),
                Ok(other) => panic!("a merge step answered {other:?}"),
                Err(error) => Some(error.to_string()),
            };
            if let Some(why) = why {
                tracing::debug!(%merge, %shard, why, "merge step waits");
                waiting = Some(why);
            }
        }
        if !committed && driver.committed().is_some() {
            // A crash here leaves a committed merge to the sweeps (a test stops the node at
            // this point).
            #[cfg(feature = "failpoints")]
            fail::fail_point!("merges::after_commit");
        }
        if waiting.is_some() {
            tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
            wait = (wait * 2).min(MERGE_RETRY_BACKOFF_MAX);
        } else {
            wait = MERGE_RETRY_BACKOFF;
        }
    }
}

/// The profiles a merge's record made one: its survivor, and the losers (sorted).
pub fn merged(record: &MergeRecord) -> (OneId, Vec<OneId>) {
    let losers = match record.state {
        MergeState::Refused(..) => Vec::new(),
        _ => record.losers.iter().map(|l| l.oneid).collect(),
    };
    (record.survivor, losers)
}

/// The outcome of a merge's cause, once it ended.
pub fn outcome(record: &MergeRecord) -> Option<&EventOutcome> {
    match &record.state {
        MergeState::Finished(outcome) | MergeState::Refused(_, outcome) => outcome.as_ref(),
        MergeState::Importing => None,
    }
}

/// Drives a merge until it ends or `deadline` passes; a merge given up because a profile of
/// its plan was merged elsewhere is planned again with the profile it went to (at most
/// [`REPLANS_MAX`] times; the cause of a plan given up for good is an event's, routed again by
/// the router, or a taken bind's, which needs no merge any more).
pub async fn drive_replanning(shards: &Shards, mut plan: MergePlan, deadline: Instant) -> Driven {
    for _ in 0..REPLANS_MAX {
        let driven = drive(shards, plan.clone(), deadline).await;
        let Some(Ended::GaveUp(moved, Some(into))) = driven.ended else {
            return driven;
        };
        let mut profiles: BTreeSet<OneId> = plan.profiles.iter().copied().collect();
        profiles.remove(&moved);
        profiles.insert(into);
        if profiles.len() < 2 {
            return driven;
        }
        plan = MergePlan::new(profiles, plan.cause, plan.rules_version);
    }
    Driven {
        ended: Some(Ended::Abandoned),
        committed: None,
    }
}

/// Most times [`drive_replanning`] plans a merge again.
const REPLANS_MAX: usize = 4;

/// Drives a merge to its end (a sweep's, a taken bind's), then the follow-ups its cause left.
/// Answers the merge's record if it ended.
pub async fn drive_to_end(shards: &Shards, plan: MergePlan) -> Option<MergeRecord> {
    let deadline = Instant::now() + MERGE_SWEEP_WAIT;
    match drive_replanning(shards, plan, deadline).await.ended? {
        Ended::Finished(record, follow_ups) => {
            if let Some(follow_ups) = follow_ups.filter(|f| !f.is_empty()) {
                follow_up::drive(shards, follow_ups, 1).await;
            }
            Some(*record)
        }
        Ended::GaveUp(..) | Ended::Abandoned => None,
    }
}

/// The merges the binds another profile won call for: the follow-up's profile and the
/// identity's holder, named by the identity (the survivor's shard refuses one whose kind does
/// not merge). The rules version is left 0: the shards judge these by their own rules.
pub fn taken_plans(report: &follow_up::Report) -> Vec<MergePlan> {
    report
        .taken
        .iter()
        .filter_map(|(identity, oneid)| {
            let (_, holder) = report.bound.iter().find(|(i, _)| i == identity)?;
            (holder != oneid).then(|| {
                MergePlan::new([*oneid, *holder].into(), Cause::Taken(identity.clone()), 0)
            })
        })
        .collect()
}
