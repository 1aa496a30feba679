//! The driver of one merge, without I/O: it says which steps to propose at which shards next
//! ([`Driver::next`]) and learns from each answer ([`Driver::answer`]); its callers (the
//! router, a shard leader's sweep, the simulation, the unit tests) propose, wait and feed it.
//! Every step is idempotent, so any number of drivers of one merge may run at once, and a
//! driver started afresh (after a crash) finds from the answers where the merge stands: a
//! loser merged by this merge answers `Moved` to its lock, the survivor's record says what is
//! imported, and a finished merge answers its record.

use crate::command::{FollowUp, MergeAnswer, MergeStep};
use crate::merge::{
    self, ImportPart, ImportStep, MergeId, MergePlan, MergeRecord, MergeState, Participant,
    EXPORT_BYTES_MAX,
};
use oneid_protocol::ids::{Identity, OneId, ShardId};
use std::collections::BTreeMap;

/// What the caller does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Propose these steps (`Command::Merge`), each at its shard, all at once (they do not
    /// depend on one another: any order of their applies is right), and give each answer to
    /// [`Driver::answer`] with its step. A step not answered (no leader, a timeout) comes back
    /// from the next `next`.
    Propose(Vec<(ShardId, MergeStep)>),
    /// The merge is over.
    Done(Ended),
}

/// Why [`Driver::answer`] asks its caller to wait (a backoff) before the next step, which
/// proposes the same lock again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The profile is locked by that merge.
    Busy(OneId, MergeId),
    /// The profile has follow-ups pending.
    Pending(OneId),
}

/// How a merge ended for its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// Finished or refused (the record says which), with the follow-ups its cause left if this
    /// driver's step ended it (`None`: another driver's did; its cause, if an event, was
    /// answered there, and a retry of it is a duplicate).
    Finished(Box<MergeRecord>, Option<Vec<FollowUp>>),
    /// Given up before its commit: this profile of the plan was merged into another (`Some`)
    /// or does not exist (`None`). The cause must be routed again.
    GaveUp(OneId, Option<OneId>),
    /// Given up by another driver of the merge (the survivor was unlocked before a commit).
    /// The cause must be routed again.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Locking the plan's profiles in order; the parts of those locked so far.
    Locking(Vec<Participant>),
    /// Reading the record at the survivor's shard (a driver that found the merge committed).
    Reading(OneId),
    Committing(Vec<Participant>),
    /// Importing (the record, kept up to date by the imports' answers).
    Importing,
    /// Making the losers tombstones (`Retire`) and repointing their identities held by other
    /// shards (`Repoint`), all at once: the steps left, each with its shard. (The finish comes
    /// after them: until it, the survivor stays locked, so no other merge takes it while the
    /// identities it gained are still bound to its losers.)
    Retiring(Vec<(ShardId, MergeStep)>),
    Finishing,
    /// Unlocking what was locked, before giving up.
    Unlocking(Vec<OneId>, Ended),
    Done(Ended),
}

/// The driver of one merge (see the module's comment).
#[derive(Debug, Clone)]
pub struct Driver {
    plan: MergePlan,
    n_shards: u32,
    phase: Phase,
    record: Option<MergeRecord>,
    /// The export answered for the loser being imported, to import next.
    export: Option<MergeStep>,
    /// All of each locked profile, as its lock answered it (when it fits in one part): a
    /// loser's is imported without its `Export` step.
    exports: BTreeMap<OneId, ImportPart>,
}

impl Driver {
    pub fn new(plan: MergePlan, n_shards: u32) -> Driver {
        Driver {
            plan,
            n_shards,
            phase: Phase::Locking(Vec::new()),
            record: None,
            export: None,
            exports: BTreeMap::new(),
        }
    }

    pub fn merge(&self) -> MergeId {
        self.plan.merge
    }

    pub fn plan(&self) -> &MergePlan {
        &self.plan
    }

    /// The merge's record, once this driver saw it committed.
    pub fn committed(&self) -> Option<&MergeRecord> {
        self.record.as_ref()
    }

    /// What to do next.
    pub fn next(&self) -> Next {
        let merge = self.plan.merge;
        match &self.phase {
            Phase::Locking(locked) => {
                let oneid = self.plan.profiles[locked.len()];
                let plan = Box::new(self.plan.clone());
                one(oneid.shard(), MergeStep::Lock { plan, oneid })
            }
            Phase::Reading(survivor) => one(survivor.shard(), MergeStep::Finish { merge }),
            Phase::Committing(participants) => {
                let survivor = merge::survivor(participants);
                one(
                    survivor.shard(),
                    MergeStep::CommitWith {
                        plan: Box::new(self.plan.clone()),
                        participants: participants.clone(),
                        parts: self.parts_with_commit(survivor),
                    },
                )
            }
            Phase::Importing => self.next_import(),
            Phase::Retiring(steps) => Next::Propose(steps.clone()),
            Phase::Finishing => one(self.record().survivor.shard(), MergeStep::Finish { merge }),
            Phase::Unlocking(locked, _) => {
                let oneid = *locked.last().expect("a profile left to unlock");
                one(oneid.shard(), MergeStep::Unlock { merge, oneid })
            }
            Phase::Done(ended) => Next::Done(ended.clone()),
        }
    }

    /// The losers' parts their locks answered, in the plan's order, as many as fit together
    /// in [`EXPORT_BYTES_MAX`]: imported by the commit itself.
    fn parts_with_commit(&self, survivor: OneId) -> Vec<(OneId, ImportPart)> {
        let mut parts = Vec::new();
        let mut bytes = 0;
        for oneid in self.plan.profiles.iter().filter(|o| **o != survivor) {
            let Some(part) = self.exports.get(oneid) else {
                continue;
            };
            bytes += postcard::experimental::serialized_size(part).expect("parts encode");
            if bytes > EXPORT_BYTES_MAX {
                break;
            }
            parts.push((*oneid, part.clone()));
        }
        parts
    }

    /// The next import step: the export answered, or the next part to export.
    fn next_import(&self) -> Next {
        let record = self.record();
        let Some(loser) = record.losers.iter().find(|l| l.next != ImportStep::Done) else {
            unreachable!("importing with every loser imported")
        };
        if let Some(import) = &self.export {
            return one(record.survivor.shard(), import.clone());
        }
        if let (ImportStep::Profile, Some(part)) = (&loser.next, self.exports.get(&loser.oneid)) {
            return one(
                record.survivor.shard(),
                MergeStep::Import {
                    merge: self.plan.merge,
                    loser: loser.oneid,
                    part: Box::new(part.clone()),
                },
            );
        }
        one(
            loser.oneid.shard(),
            MergeStep::Export {
                merge: self.plan.merge,
                loser: loser.oneid,
                step: loser.next.clone(),
            },
        )
    }

    fn record(&self) -> &MergeRecord {
        self.record.as_ref().expect("a committed merge's record")
    }

    /// Learns from the answer to `step`, one of those [`Driver::next`] said to propose; answers
    /// why to wait before the next step, if the caller should.
    pub fn answer(&mut self, step: &MergeStep, answer: MergeAnswer) -> Option<Waiting> {
        debug_assert!(
            matches!(self.next(), Next::Propose(steps) if steps.iter().any(|(_, s)| s == step)),
            "merge {}: {step:?} is not a step to propose now",
            self.plan.merge
        );
        let waiting = self.waiting(&answer);
        let phase = std::mem::replace(&mut self.phase, Phase::Finishing);
        self.phase = match (phase, answer) {
            (Phase::Locking(locked), answer) => self.locked(locked, answer),
            (Phase::Reading(_) | Phase::Committing(_) | Phase::Finishing, answer) => {
                self.on_record(answer)
            }
            (Phase::Importing, MergeAnswer::Export(part)) => {
                let loser = self
                    .record()
                    .losers
                    .iter()
                    .find(|l| l.next != ImportStep::Done);
                let loser = loser.expect("a loser to import").oneid;
                self.export = Some(MergeStep::Import {
                    merge: self.plan.merge,
                    loser,
                    part,
                });
                Phase::Importing
            }
            (Phase::Importing, answer @ MergeAnswer::Record(_)) => {
                self.export = None;
                self.on_record(answer)
            }
            // Another driver of this merge imported the loser and made it a tombstone since
            // this one read the record: read it again.
            (Phase::Importing, MergeAnswer::Moved { into, merge }) if merge == self.plan.merge => {
                self.export = None;
                Phase::Reading(into)
            }
            (phase @ Phase::Retiring(_), MergeAnswer::Tombstoned { more: true }) => phase,
            (
                Phase::Retiring(mut steps),
                MergeAnswer::Tombstoned { more: false } | MergeAnswer::Repointed(_),
            ) => {
                steps.retain(|(_, s)| s != step);
                if steps.is_empty() {
                    Phase::Finishing
                } else {
                    Phase::Retiring(steps)
                }
            }
            (Phase::Unlocking(mut locked, ended), MergeAnswer::Unlocked(_)) => {
                locked.pop();
                if locked.is_empty() {
                    Phase::Done(ended)
                } else {
                    Phase::Unlocking(locked, ended)
                }
            }
            (phase, answer) => panic!(
                "merge {}: {answer:?} does not answer {phase:?}",
                self.plan.merge
            ),
        };
        waiting
    }

    /// After a lock's answer.
    fn locked(&mut self, mut locked: Vec<Participant>, answer: MergeAnswer) -> Phase {
        let oneid = self.plan.profiles[locked.len()];
        match answer {
            MergeAnswer::Locked(participant, export) => {
                if let Some(export) = export {
                    self.exports.insert(participant.rank.oneid, *export);
                }
                locked.push(participant);
                if locked.len() == self.plan.profiles.len() {
                    Phase::Committing(locked)
                } else {
                    Phase::Locking(locked)
                }
            }
            // Waits: `next` proposes the same lock again.
            MergeAnswer::Busy(_) | MergeAnswer::Pending => Phase::Locking(locked),
            MergeAnswer::Moved { into, merge } if merge == self.plan.merge => Phase::Reading(into),
            MergeAnswer::Moved { into, .. } => self.give_up(&locked, oneid, Some(into)),
            MergeAnswer::Missing => self.give_up(&locked, oneid, None),
            answer @ (MergeAnswer::Record(_) | MergeAnswer::Finished(..)) => self.on_record(answer),
            other => panic!("merge {}: a lock answered {other:?}", self.plan.merge),
        }
    }

    /// Whether `answer` asks to wait (the phase stays, and so does `next`).
    fn waiting(&self, answer: &MergeAnswer) -> Option<Waiting> {
        let Phase::Locking(locked) = &self.phase else {
            return None;
        };
        let oneid = self.plan.profiles[locked.len()];
        match answer {
            MergeAnswer::Busy(other) => Some(Waiting::Busy(oneid, *other)),
            MergeAnswer::Pending => Some(Waiting::Pending(oneid)),
            _ => None,
        }
    }

    fn give_up(&self, locked: &[Participant], oneid: OneId, into: Option<OneId>) -> Phase {
        let ended = Ended::GaveUp(oneid, into);
        if locked.is_empty() {
            return Phase::Done(ended);
        }
        Phase::Unlocking(locked.iter().map(|p| p.rank.oneid).collect(), ended)
    }

    /// Goes on from what the survivor's shard answered about the merge.
    fn on_record(&mut self, answer: MergeAnswer) -> Phase {
        match answer {
            MergeAnswer::Record(record) => {
                let phase = self.phase_of(&record);
                self.record = Some(*record);
                phase
            }
            MergeAnswer::Finished(record, follow_ups) => {
                let ended = Ended::Finished(record.clone(), follow_ups);
                let refused = matches!(record.state, MergeState::Refused(..));
                self.record = Some(*record);
                if refused {
                    let losers = self.record().losers.iter().map(|l| l.oneid).collect();
                    Phase::Unlocking(losers, ended)
                } else {
                    Phase::Done(ended)
                }
            }
            // The survivor's lock is gone without a record: another driver gave the merge up.
            MergeAnswer::NotLocked => Phase::Done(Ended::Abandoned),
            other => panic!(
                "merge {}: expected its record, got {other:?}",
                self.plan.merge
            ),
        }
    }

    /// Where a committed merge goes on from, by its record.
    fn phase_of(&self, record: &MergeRecord) -> Phase {
        match &record.state {
            MergeState::Importing if record.losers.iter().any(|l| l.next != ImportStep::Done) => {
                Phase::Importing
            }
            MergeState::Importing => self.retiring(record),
            // Finished by another driver: nothing left for this one (a refused merge's losers
            // are unlocked by whoever drives it; unlocking again does no harm).
            MergeState::Finished(_) => Phase::Done(Ended::Finished(Box::new(record.clone()), None)),
            MergeState::Refused(..) => Phase::Unlocking(
                record.losers.iter().map(|l| l.oneid).collect(),
                Ended::Finished(Box::new(record.clone()), None),
            ),
        }
    }

    /// The steps that end a committed merge's imported losers: each made a tombstone
    /// (`Retire`, which repoints its identities its own shard holds), and its identities other
    /// shards hold repointed there (`Repoint`, one per loser and shard).
    fn retiring(&self, record: &MergeRecord) -> Phase {
        let mut steps = Vec::new();
        for loser in &record.losers {
            let retire = MergeStep::Retire {
                merge: self.plan.merge,
                loser: loser.oneid,
                survivor: record.survivor,
            };
            steps.push((loser.oneid.shard(), retire));
            let mut by_shard: BTreeMap<ShardId, Vec<Identity>> = BTreeMap::new();
            for identity in &loser.identities {
                let shard = identity.shard(self.n_shards);
                if shard != loser.oneid.shard() {
                    by_shard.entry(shard).or_default().push(identity.clone());
                }
            }
            steps.extend(by_shard.into_iter().map(|(shard, identities)| {
                let repoint = MergeStep::Repoint {
                    from: loser.oneid,
                    to: record.survivor,
                    identities,
                };
                (shard, repoint)
            }));
        }
        Phase::Retiring(steps)
    }
}

fn one(shard: ShardId, step: MergeStep) -> Next {
    Next::Propose(vec![(shard, step)])
}
