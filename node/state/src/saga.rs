//! A merge's steps, each the apply of one idempotent command of bounded size on one shard
//! (`merge.rs` says what a merge is and what it moves). Drivers propose them in this order: the
//! router that met the profiles, and the sweep of any shard holding a lock or a record left
//! unfinished; drivers of one merge may run at once, since every step answers what it did or
//! finds already done.
//!
//! 1. **Lock** (`MergeStep::Lock`) each profile of the plan, in OneID order, at its shard. A lock
//!    records the profile's part (rank, identities, totals) and keeps it as it is: its events
//!    are answered `unavailable`, its due keys wait, no other merge takes it. A profile another
//!    merge holds is `Busy` (the driver waits: locks are taken in one global order, so merges
//!    never wait on each other in a circle); one with follow-ups pending is `Pending` (its
//!    identities must all be listed before they are counted and repointed). A profile merged
//!    elsewhere or missing gives the merge up before its commit: the driver unlocks what it
//!    locked (`MergeStep::Unlock`), and routes its cause again.
//! 2. **Commit** (`MergeStep::Commit`) at the survivor's shard, the participant of highest rank: the
//!    commit point. It records the merge (`j merge`), or its refusal by the policy (a kind
//!    over its limit, too many identities, too many merges): then the cause applies to the
//!    survivor alone, the identities of the others not linked, and the driver unlocks them.
//! 3. For each loser: **export** (`MergeStep::Export` at its shard) and **import** (`MergeStep::Import`
//!    at the survivor's) its profile record, then its orders and exactly-once records in parts
//!    of at most [`EXPORT_BYTES_MAX`], then its unlink records if it has any (one part); the
//!    record keeps which part is next, so a part imported twice is taken once. Then the loser
//!    becomes a **tombstone** (`MergeStep::Retire`: its last ledger entry, its segments left,
//!    `x loser`, the identities its shard holds repointed), and
//!    its identities held by other shards are **repointed** (`MergeStep::Repoint` at each
//!    identity's shard, moving its binding epoch): every loser's retire and repoints are
//!    proposed at once, since none needs another's.
//! 4. **Finish** (`MergeStep::Finish`) at the survivor's shard: unlocked, settled once on its
//!    combined state (tier, rule tags, segments: only net changes), the cause applied to it.

use super::*;
use crate::command::{Found, MergeAnswer, MergeStep, Routed, EPOCH_UNKNOWN};
use crate::merge::{
    Cause, ImportPart, ImportStep, LoserImport, MergeId, MergeLock, MergePlan, MergeRecord,
    MergeState, Participant, Tombstone, Totals, EXPORT_BYTES_MAX, MERGES_PENDING_MAX,
    MERGES_PER_PROFILE_MAX, TOMBSTONE_DELETES_MAX,
};
use crate::segments::Eval;
use crate::unlink::{UnlinkRecord, UNLINKED_PER_PROFILE_MAX};
use oneid_protocol::api::{NotLinked, NotLinkedReason};
use oneid_protocol::event::IDENTITIES_PER_EVENT_MAX;

/// Most rows one export part reads (each also counts against [`EXPORT_BYTES_MAX`]). Small in
/// unit tests, so that their merges export in several parts.
const EXPORT_ROWS_MAX: usize = if cfg!(test) { 3 } else { 10_000 };

impl ShardState {
    /// Applies a merge step (see the module's comment); a cause it applies (at a commit the policy refuses, or at the
    /// finish) applies as events `of` that format.
    pub(super) fn apply_merge_step(
        &mut self,
        tx: &mut Tx<'_>,
        index: u64,
        step: MergeStep,
        of: EventsOf,
    ) -> MergeAnswer {
        let at = (index, of);
        match step {
            MergeStep::Lock { plan, oneid } => self.merge_lock(tx, at, *plan, oneid),
            MergeStep::Commit { plan, participants } => {
                self.merge_commit(tx, at, *plan, participants)
            }
            MergeStep::CommitWith {
                plan,
                participants,
                parts,
            } => {
                let merge = plan.merge;
                match self.merge_commit(tx, at, *plan, participants) {
                    // Committed now: the parts go in with it.
                    MergeAnswer::Record(record) if record.state == MergeState::Importing => {
                        let mut answer = MergeAnswer::Record(record);
                        for (loser, part) in parts {
                            answer = self.merge_import(tx, index, merge, loser, part);
                        }
                        answer
                    }
                    answer => answer,
                }
            }
            MergeStep::Export { merge, loser, step } => self.merge_export(tx, merge, loser, step),
            MergeStep::Import { merge, loser, part } => {
                self.merge_import(tx, index, merge, loser, *part)
            }
            MergeStep::Tombstone {
                merge,
                loser,
                survivor,
            } => self.merge_tombstone(tx, merge, loser, survivor, false),
            MergeStep::Retire {
                merge,
                loser,
                survivor,
            } => self.merge_tombstone(tx, merge, loser, survivor, true),
            MergeStep::Repoint {
                from,
                to,
                identities,
            } => MergeAnswer::Repointed(self.repoint(tx, from, to, identities)),
            MergeStep::Finish { merge } => self.merge_finish(tx, at, merge),
            MergeStep::Unlock { merge, oneid } => {
                MergeAnswer::Unlocked(self.merge_unlock(tx, merge, oneid))
            }
        }
    }

    /// The merge record kept here, if the merge's survivor is on this shard and it committed.
    pub(super) fn merge_record(&self, tx: &Tx<'_>, merge: MergeId) -> Option<MergeRecord> {
        tx.get_as(&keys::merge(merge))
    }

    /// Where `oneid` went, if it was merged.
    pub(super) fn tombstone(&self, tx: &Tx<'_>, oneid: OneId) -> Option<Tombstone> {
        tx.get_as(&keys::tombstone(oneid))
    }

    /// What a profile that is not here (live) answers a merge step.
    fn absent(&self, tx: &Tx<'_>, oneid: OneId) -> MergeAnswer {
        match self.tombstone(tx, oneid) {
            Some(t) => MergeAnswer::Moved {
                into: t.into,
                merge: t.merge,
            },
            None => MergeAnswer::Missing,
        }
    }

    fn merge_lock(
        &mut self,
        tx: &mut Tx<'_>,
        at: (u64, EventsOf),
        plan: MergePlan,
        oneid: OneId,
    ) -> MergeAnswer {
        assert_eq!(oneid.shard(), self.shard, "lock routed to the wrong shard");
        let Some((mut profile, stored_hash)) = self.load_profile(tx, oneid) else {
            return self.absent(tx, oneid);
        };
        let answer = match &profile.merging {
            Some(lock) if lock.plan.merge == plan.merge => {
                MergeAnswer::Locked(lock.participant.clone(), whole(tx, &profile))
            }
            Some(lock) => MergeAnswer::Busy(lock.plan.merge),
            // The survivor of a merge that ended: a late driver, which must not lock again;
            // or the event sent again after its cause was answered `unavailable` (routed by a
            // binding that moved: the same plan comes back each time it is sent), which the
            // survivor of the refused merge takes anew.
            None if tx.get(&keys::merge(plan.merge)).is_some() => {
                let record = self.merge_record(tx, plan.merge).expect("just read");
                match &record.state {
                    MergeState::Refused(reason, Some(EventOutcome::Rejected(error)))
                        if error.code == ErrorCode::Unavailable =>
                    {
                        let reason = reason.clone();
                        self.activations.insert(profile, stored_hash);
                        // As routed this time.
                        let record = MergeRecord { plan, ..record };
                        return self.apply_refused(tx, at, record, reason);
                    }
                    _ => MergeAnswer::Record(Box::new(record)),
                }
            }
            None if self.has_pending_links(tx, oneid) => MergeAnswer::Pending,
            None if self.record.merges_pending >= MERGES_PENDING_MAX => {
                MergeAnswer::Busy(plan.merge)
            }
            None => {
                let participant = Participant::of(&profile, &self.rules.identity);
                let at = self.record.clock;
                tx.put_new(keys::lock(oneid), &(plan.merge, at));
                self.record.merges_pending += 1;
                profile.merging = Some(Box::new(MergeLock {
                    plan,
                    participant: participant.clone(),
                    at,
                }));
                let export = whole(tx, &profile);
                self.store_profile(tx, profile, Some(stored_hash));
                return MergeAnswer::Locked(participant, export);
            }
        };
        self.activations.insert(profile, stored_hash);
        answer
    }

    /// Drops a profile's lock (taken out of it already) from the shard's lock index.
    fn unlisted_lock(&mut self, tx: &mut Tx<'_>, oneid: OneId) {
        let key = keys::lock(oneid);
        let bytes = tx.get(&key).expect("a locked profile is in the lock index");
        tx.delete_known(key, &bytes);
        assert!(self.record.merges_pending > 0, "a lock beyond the count");
        self.record.merges_pending -= 1;
    }

    fn has_pending_links(&self, tx: &Tx<'_>, oneid: OneId) -> bool {
        !tx.scan_below(&keys::pending_links_prefix(oneid), None, &[u8::MAX], 1)
            .is_empty()
    }

    /// The commit point (see the module's comment). `participants` are the locks' answers, in
    /// the plan's order; the survivor's own lock is what counts for it.
    fn merge_commit(
        &mut self,
        tx: &mut Tx<'_>,
        at: (u64, EventsOf),
        plan: MergePlan,
        participants: Vec<Participant>,
    ) -> MergeAnswer {
        if let Some(record) = self.merge_record(tx, plan.merge) {
            return MergeAnswer::Record(Box::new(record));
        }
        assert_eq!(
            participants
                .iter()
                .map(|p| p.rank.oneid)
                .collect::<Vec<_>>(),
            plan.profiles,
            "a commit names every profile of its plan, in order"
        );
        let survivor = merge::survivor(&participants);
        assert_eq!(
            survivor.shard(),
            self.shard,
            "commit routed to the wrong shard"
        );
        let Some((mut profile, stored_hash)) = self.load_profile(tx, survivor) else {
            return MergeAnswer::NotLocked;
        };
        let Some(lock) = profile
            .merging
            .take()
            .filter(|l| l.plan.merge == plan.merge)
        else {
            self.activations.insert(profile, stored_hash);
            return MergeAnswer::NotLocked;
        };
        let record = MergeRecord {
            losers: plan
                .profiles
                .iter()
                .filter(|oneid| **oneid != survivor)
                .map(|oneid| LoserImport {
                    oneid: *oneid,
                    next: ImportStep::Profile,
                    identities: Vec::new(),
                })
                .collect(),
            plan,
            survivor,
            at: self.record.clock,
            state: MergeState::Importing,
            dropped: merge::Dropped::default(),
            twins: Vec::new(),
        };
        let refusal = self.merge_refusal(&record.plan, &lock.participant, &participants);
        let Some(reason) = refusal else {
            profile.merging = Some(lock);
            self.store_profile(tx, profile, Some(stored_hash));
            tx.put_new(keys::merge(record.plan.merge), &record);
            return MergeAnswer::Record(Box::new(record));
        };
        // Refused: the survivor is unlocked and takes the cause alone.
        self.unlisted_lock(tx, survivor);
        self.store_profile(tx, profile, Some(stored_hash));
        self.apply_refused(tx, at, record, reason)
    }

    /// A refused merge's survivor (unlocked) takes the cause alone; the record says how it
    /// went.
    fn apply_refused(
        &mut self,
        tx: &mut Tx<'_>,
        at: (u64, EventsOf),
        mut record: MergeRecord,
        reason: NotLinkedReason,
    ) -> MergeAnswer {
        let (outcome, follow_ups) =
            self.apply_cause(tx, at, &record.plan, record.survivor, Some(&reason));
        record.state = MergeState::Refused(reason, outcome);
        tx.put(keys::merge(record.plan.merge), &record);
        MergeAnswer::Finished(Box::new(record), Some(follow_ups))
    }

    /// Why the policy refuses to make one of these profiles, if it does: a bind taken by an
    /// identity of a kind that does not merge, or the survivor would hold more values of a
    /// kind than its limit, or more identities than a profile may, or
    /// have more profiles merged into it than [`MERGES_PER_PROFILE_MAX`], or totals past i64.
    pub(super) fn merge_refusal(
        &self,
        plan: &MergePlan,
        survivor: &Participant,
        participants: &[Participant],
    ) -> Option<NotLinkedReason> {
        // A bind taken meanwhile calls for a merge only by an identity of a kind that merges.
        if let Cause::Taken(identity) = &plan.cause {
            if !self.rules.identity.merges(&identity.kind) {
                return Some(NotLinkedReason::MergeDisabled);
            }
        }
        let mut union: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for participant in participants {
            for (kind, values) in &participant.identities {
                let held = union.entry(kind.as_str()).or_default();
                held.extend(values.iter().map(String::as_str));
            }
        }
        let policy = &self.rules.identity;
        if union.iter().any(|(kind, values)| {
            policy
                .max_per_profile(kind)
                .is_some_and(|max| values.len() > max as usize)
        }) {
            return Some(NotLinkedReason::KindLimit);
        }
        if union.values().map(BTreeSet::len).sum::<usize>() > IDENTITIES_PER_PROFILE_MAX {
            return Some(NotLinkedReason::IdentityLimit);
        }
        let losers = participants.len() - 1;
        let totals = participants
            .iter()
            .try_fold(Totals::default(), |sum, p| sum.plus(p.totals));
        if survivor.merged + losers > MERGES_PER_PROFILE_MAX || totals.is_none() {
            return Some(NotLinkedReason::MergeLimit);
        }
        None
    }

    /// Applies a merge's cause (its event, if it has one) to the survivor: its identities bound
    /// to another profile of the merge count as the survivor's (merged), or, if the merge was
    /// `refused`, are left out and listed as not linked for that reason. The event applies by
    /// the rules in force now, whatever the merge was judged by.
    fn apply_cause(
        &mut self,
        tx: &mut Tx<'_>,
        (index, of): (u64, EventsOf),
        plan: &MergePlan,
        survivor: OneId,
        refused: Option<&NotLinkedReason>,
    ) -> (Option<EventOutcome>, Vec<FollowUp>) {
        let Cause::Event(routed) = &plan.cause else {
            return (None, Vec::new());
        };
        let Routed {
            mut event,
            found,
            link_elsewhere,
            ..
        } = Routed::clone(routed);
        let mut kept_found = Vec::with_capacity(found.len());
        let mut left_out = Vec::new();
        let mut identities = Vec::with_capacity(event.identities.len());
        for (i, identity) in std::mem::take(&mut event.identities)
            .into_iter()
            .enumerate()
        {
            let found = found.get(i).copied().unwrap_or(Found::Unbound);
            // Held here: as bound now; elsewhere: as the router found it.
            let bound = if identity.shard(self.n_shards) == self.shard {
                tx.get_as::<OneId>(&keys::identity(&identity))
            } else {
                match found {
                    Found::Bound { oneid, .. } => Some(oneid),
                    Found::Unbound => None,
                }
            };
            let reason = match bound {
                Some(oneid) if oneid == survivor => None,
                Some(oneid) if plan.profiles.contains(&oneid) => refused.cloned(),
                // Bound to a profile outside the merge since the cause was routed: that calls
                // for another merge, which the driver starts when it reads `taken` (an
                // unmergeable kind is apply's `merge_disabled`).
                Some(_) if self.rules.identity.merges(&identity.kind) => {
                    Some(NotLinkedReason::Taken)
                }
                _ => None,
            };
            if let Some(reason) = reason {
                left_out.push(NotLinked {
                    kind: identity.kind,
                    value: identity.value,
                    reason,
                });
                continue;
            }
            kept_found.push(match bound {
                // Another profile of the merge's, repointed to the survivor by now: read again
                // where held here.
                Some(oneid) if plan.profiles.contains(&oneid) => Found::Bound {
                    oneid: survivor,
                    epoch: EPOCH_UNKNOWN,
                },
                _ => found,
            });
            identities.push(identity);
        }
        event.identities = identities;
        // Those held here are bound here by the apply, not by follow-ups.
        let link_elsewhere = link_elsewhere
            .into_iter()
            .filter(|id| id.shard(self.n_shards) != self.shard)
            .collect();
        let routed = Routed {
            event,
            target: Target::Existing(survivor),
            rules_version: self.rules_version,
            link_elsewhere,
            found: kept_found,
        };
        let mut follow_ups = Vec::new();
        let mut outcome = self.apply_event(tx, index, routed, of, &mut follow_ups);
        if let EventOutcome::Applied(_, not_linked) = &mut outcome {
            not_linked.extend(left_out);
            NotLinked::sort(&mut not_linked[..]);
        }
        (Some(outcome), follow_ups)
    }

    /// One part of a locked loser's state, from `step` on.
    fn merge_export(
        &mut self,
        tx: &Tx<'_>,
        merge: MergeId,
        loser: OneId,
        step: ImportStep,
    ) -> MergeAnswer {
        let Some((profile, stored_hash)) = self.load_profile(tx, loser) else {
            return self.absent(tx, loser);
        };
        let locked = profile.locked_by(merge);
        let answer = match step {
            _ if !locked => MergeAnswer::NotLocked,
            ImportStep::Profile => MergeAnswer::Export(Box::new(whole_or_profile(tx, &profile))),
            ImportStep::Orders(after) => {
                let (rows, last) = export_rows(tx, &keys::orders_prefix(loser), after.as_deref());
                let orders = rows
                    .into_iter()
                    .map(|(key, value)| (keys::order_id(&key), decode(&key, &value)))
                    .collect();
                let next = match last {
                    Some(id) => ImportStep::Orders(Some(id)),
                    None => ImportStep::Dedup(None),
                };
                MergeAnswer::Export(Box::new(ImportPart::Orders {
                    after,
                    orders,
                    next,
                }))
            }
            ImportStep::Dedup(after) => {
                let (rows, last) = export_rows(tx, &keys::dedup_prefix(loser), after.as_deref());
                let event_ids = rows
                    .iter()
                    .map(|(key, _)| keys::dedup_event_id(key))
                    .collect();
                let next = match last {
                    Some(id) => ImportStep::Dedup(Some(id)),
                    None if has_unlinks(tx, loser) => ImportStep::Unlinks,
                    None => ImportStep::Done,
                };
                MergeAnswer::Export(Box::new(ImportPart::Dedup {
                    after,
                    event_ids,
                    next,
                }))
            }
            ImportStep::Unlinks => {
                let records = unlinks_of(tx, loser);
                MergeAnswer::Export(Box::new(ImportPart::Unlinks(records)))
            }
            ImportStep::Done => MergeAnswer::Export(Box::new(ImportPart::Dedup {
                after: None,
                event_ids: Vec::new(),
                next: ImportStep::Done,
            })),
        };
        self.activations.insert(profile, stored_hash);
        answer
    }

    /// Takes one part of a loser into the survivor, if it is the part its record waits for.
    fn merge_import(
        &mut self,
        tx: &mut Tx<'_>,
        index: u64,
        merge: MergeId,
        loser: OneId,
        part: ImportPart,
    ) -> MergeAnswer {
        let Some(mut record) = self.merge_record(tx, merge) else {
            return MergeAnswer::NotLocked;
        };
        let at = record
            .losers
            .iter()
            .position(|l| l.oneid == loser)
            .unwrap_or_else(|| panic!("{loser} is not a loser of merge {merge}"));
        if record.is_finished() || record.losers[at].next != part.step() {
            return MergeAnswer::Record(Box::new(record));
        }
        let (mut profile, stored_hash) = self
            .load_profile(tx, record.survivor)
            .expect("a committed merge's survivor exists");
        assert!(
            profile
                .merging
                .as_ref()
                .is_some_and(|l| l.plan.merge == merge),
            "a committed merge's survivor is locked by it"
        );
        let mut writes = EventWrites::default();
        let next = self.import_part(tx, index, &mut profile, at, part, &mut record, &mut writes);
        writes.commit(tx, &mut self.record.due_floor, &mut self.retained.ledger);
        record.losers[at].next = next;
        tx.put(keys::merge(merge), &record);
        self.store_profile(tx, profile, Some(stored_hash));
        MergeAnswer::Record(Box::new(record))
    }

    /// Takes one part of loser `at` (of the record's) into `profile`, the survivor; answers
    /// the part to import next.
    #[allow(clippy::too_many_arguments)]
    fn import_part(
        &mut self,
        tx: &mut Tx<'_>,
        index: u64,
        profile: &mut Profile,
        at: usize,
        part: ImportPart,
        record: &mut MergeRecord,
        writes: &mut EventWrites,
    ) -> ImportStep {
        let merge = record.plan.merge;
        let loser = record.losers[at].oneid;
        match part {
            ImportPart::Profile(from) => {
                self.import_profile(tx, profile, &from, merge, record, writes);
                record.losers[at].identities = identities_of(&from);
                ImportStep::Orders(None)
            }
            ImportPart::Whole {
                profile: from,
                orders,
                event_ids,
            } => {
                self.import_profile(tx, profile, &from, merge, record, writes);
                record.losers[at].identities = identities_of(&from);
                for (order_id, order) in orders {
                    self.import_order(tx, profile, loser, order_id, &order, record, writes);
                }
                self.import_dedup(tx, profile, event_ids, index);
                ImportStep::Done
            }
            ImportPart::Orders { orders, next, .. } => {
                for (order_id, order) in orders {
                    self.import_order(tx, profile, loser, order_id, &order, record, writes);
                }
                next
            }
            ImportPart::Dedup {
                event_ids, next, ..
            } => {
                self.import_dedup(tx, profile, event_ids, index);
                next
            }
            ImportPart::Unlinks(records) => {
                self.import_unlinks(tx, profile, records);
                ImportStep::Done
            }
        }
    }

    /// A loser's unlinks into the survivor, for the identities it does not hold: each keeps the
    /// later of the two dates where both unlinked the same value, and the survivor's own
    /// unbind still pending (the loser's unbinds finish on the loser's records).
    fn import_unlinks(
        &self,
        tx: &mut Tx<'_>,
        profile: &Profile,
        records: Vec<(Identity, UnlinkRecord)>,
    ) {
        let imported = records.len();
        for (identity, record) in records {
            if profile.holds(&identity) {
                continue;
            }
            let key = keys::unlinked(profile.oneid, &identity);
            let own = tx.get_as::<UnlinkRecord>(&key);
            let merged = UnlinkRecord {
                at: own.map_or(record.at, |own| own.at.max(record.at)),
                unbinding: own.is_some_and(|own| own.unbinding),
            };
            tx.put(key, &merged);
        }
        self.forget_oldest_unlinks(tx, profile.oneid, imported);
    }

    /// A loser's exactly-once records into the survivor: a retry of an event that applied to
    /// the loser is a duplicate of the survivor.
    fn import_dedup(
        &mut self,
        tx: &mut Tx<'_>,
        survivor: &Profile,
        event_ids: Vec<String>,
        index: u64,
    ) {
        for event_id in event_ids {
            let key = keys::dedup(survivor.oneid, &event_id);
            if tx.get(&key).is_none() {
                tx.put_new(key.clone(), &DedupRecord { index });
                self.retained.dedup.push(key);
            }
        }
    }

    /// A loser's profile record into the survivor: its ledger entries and due keys written.
    fn import_profile(
        &self,
        tx: &Tx<'_>,
        survivor: &mut Profile,
        loser: &Profile,
        merge: MergeId,
        record: &mut MergeRecord,
        writes: &mut EventWrites,
    ) {
        let absorbed = survivor.absorb(loser, &self.rules, &merge.to_string(), self.record.clock);
        for (seq, entry) in absorbed.ledger {
            let key = keys::ledger(survivor.oneid, seq);
            writes.ledger.push(key.clone());
            writes.put(key, None, &entry);
        }
        for key in absorbed.due {
            writes.put_due(tx, key);
        }
        let dropped = &mut record.dropped;
        dropped.tags.extend(absorbed.dropped.tags);
        dropped.attributes.extend(absorbed.dropped.attributes);
        dropped.channels.extend(absorbed.dropped.channels);
    }

    /// One order of a loser into the survivor, under its own id, or (an id the survivor holds)
    /// under its twin id; one still in the spend window gets its window exit.
    #[allow(clippy::too_many_arguments)]
    fn import_order(
        &self,
        tx: &mut Tx<'_>,
        survivor: &Profile,
        loser: OneId,
        order_id: String,
        order: &OrderRecord,
        record: &mut MergeRecord,
        writes: &mut EventWrites,
    ) {
        let mut stored_id = order_id;
        if tx.get(&keys::order(survivor.oneid, &stored_id)).is_some() {
            record.twins.push(stored_id.clone());
            stored_id = keys::twin_order_id(&stored_id, loser);
        }
        tx.put(keys::order(survivor.oneid, &stored_id), order);
        if order.in_window {
            let exit = order.ts.plus_days(self.rules.window_days);
            writes.put_due(
                tx,
                keys::due(
                    exit,
                    survivor.oneid,
                    keys::DueKind::WindowExit,
                    stored_id.as_bytes(),
                ),
            );
        }
    }

    /// Makes an imported loser a tombstone; answers whether orders are left to delete.
    /// `repoint`: also repoint the loser's identities this shard holds (`MergeStep::Retire`).
    fn merge_tombstone(
        &mut self,
        tx: &mut Tx<'_>,
        merge: MergeId,
        loser: OneId,
        survivor: OneId,
        repoint: bool,
    ) -> MergeAnswer {
        match self.tombstone(tx, loser) {
            Some(t) if t.merge == merge => {
                return MergeAnswer::Tombstoned {
                    more: delete_orders(tx, loser),
                }
            }
            Some(t) => {
                return MergeAnswer::Moved {
                    into: t.into,
                    merge: t.merge,
                }
            }
            None => {}
        }
        let Some((mut profile, stored_hash)) = self.load_profile(tx, loser) else {
            return MergeAnswer::Missing;
        };
        if !profile.locked_by(merge) {
            self.activations.insert(profile, stored_hash);
            return MergeAnswer::NotLocked;
        }
        if repoint {
            let here: Vec<Identity> = identities_of(&profile)
                .into_iter()
                .filter(|id| id.shard(self.n_shards) == self.shard)
                .collect();
            self.repoint(tx, loser, survivor, here);
        }
        let merge_name = merge.to_string();
        let entry = profile.merge_out_entry(survivor, &merge_name, self.record.clock);
        let ledger_key = keys::ledger(loser, profile.ledger_seq);
        tx.put_new(ledger_key.clone(), &entry);
        self.retained.ledger.push(ledger_key);
        self.leave_segments(tx, &mut profile, survivor);
        let key = keys::profile(loser);
        let stored = tx.get(&key).expect("a loaded profile is stored");
        debug_assert_eq!(pair_hash(&key, &stored), stored_hash);
        tx.delete_known(key, &stored);
        self.activations.discard(loser);
        self.unlisted_lock(tx, loser);
        let tombstone = Tombstone {
            into: survivor,
            merge,
            at: self.record.clock,
        };
        tx.put_new(keys::tombstone(loser), &tombstone);
        MergeAnswer::Tombstoned {
            more: delete_orders(tx, loser),
        }
    }

    /// Binds to `to` each of `identities` still bound to `from`; moves the binding epoch if any
    /// moved. Answers how many moved.
    fn repoint(
        &mut self,
        tx: &mut Tx<'_>,
        from: OneId,
        to: OneId,
        identities: Vec<Identity>,
    ) -> usize {
        let mut moved = 0;
        for identity in identities {
            let key = self.index_key(&identity);
            if tx.get_as::<OneId>(&key) == Some(from) {
                tx.put(key, &to);
                moved += 1;
            }
        }
        if moved > 0 {
            self.record.binding_epoch += 1;
        }
        moved
    }

    /// The last step (see the module's comment); a merge not imported yet answers its record.
    fn merge_finish(
        &mut self,
        tx: &mut Tx<'_>,
        at: (u64, EventsOf),
        merge: MergeId,
    ) -> MergeAnswer {
        let Some(mut record) = self.merge_record(tx, merge) else {
            return MergeAnswer::NotLocked;
        };
        if record.is_finished() {
            return MergeAnswer::Finished(Box::new(record), None);
        }
        if record.losers.iter().any(|l| l.next != ImportStep::Done) {
            return MergeAnswer::Record(Box::new(record));
        }
        let survivor = record.survivor;
        let (mut profile, stored_hash) = self
            .load_profile(tx, survivor)
            .expect("a committed merge's survivor exists");
        let lock = profile.merging.take();
        assert!(
            lock.is_some_and(|l| l.plan.merge == merge),
            "a committed merge's survivor is locked by it"
        );
        self.unlisted_lock(tx, survivor);
        let mut writes = EventWrites::default();
        let now = self.record.clock;
        self.set_tier(tx, &mut profile, now, false, &mut writes);
        writes.commit(tx, &mut self.record.due_floor, &mut self.retained.ledger);
        self.settle(tx, &mut profile, Eval::All);
        self.store_profile(tx, profile, Some(stored_hash));
        tx.put_new(keys::merged(survivor, merge), &());
        let (outcome, follow_ups) = self.apply_cause(tx, at, &record.plan, survivor, None);
        record.state = MergeState::Finished(outcome);
        tx.put(keys::merge(merge), &record);
        MergeAnswer::Finished(Box::new(record), Some(follow_ups))
    }

    /// Unlocks `oneid` if `merge` holds it; answers whether it did.
    fn merge_unlock(&mut self, tx: &mut Tx<'_>, merge: MergeId, oneid: OneId) -> bool {
        let Some((mut profile, stored_hash)) = self.load_profile(tx, oneid) else {
            return false;
        };
        let held = profile.locked_by(merge);
        // A committed merge is never given up (a refused one is: its losers go free). Only the
        // survivor's shard can tell; the drivers unlock nothing else of a committed merge.
        let committed = self
            .merge_record(tx, merge)
            .is_some_and(|r| !matches!(r.state, MergeState::Refused(..)));
        if held && !committed {
            profile.merging = None;
            self.unlisted_lock(tx, oneid);
            self.store_profile(tx, profile, Some(stored_hash));
            return true;
        }
        self.activations.insert(profile, stored_hash);
        false
    }
}

/// A loser's first export: all of it if its orders and exactly-once records fit in one part
/// beside its profile, else its profile alone (the rest follows in parts).
/// All of a locked profile as one import part, if it fits in one.
fn whole(tx: &Tx<'_>, profile: &Profile) -> Option<Box<ImportPart>> {
    match whole_or_profile(tx, profile) {
        part @ ImportPart::Whole { .. } => Some(Box::new(part)),
        _ => None,
    }
}

fn whole_or_profile(tx: &Tx<'_>, profile: &Profile) -> ImportPart {
    let loser = profile.oneid;
    let (orders, more_orders) = export_rows(tx, &keys::orders_prefix(loser), None);
    let (dedup, more_dedup) = export_rows(tx, &keys::dedup_prefix(loser), None);
    let bytes: usize = orders
        .iter()
        .chain(&dedup)
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + encode(profile).len();
    let too_big = more_orders.is_some() || more_dedup.is_some() || bytes > EXPORT_BYTES_MAX;
    if too_big || has_unlinks(tx, loser) {
        return ImportPart::Profile(Box::new(profile.clone()));
    }
    ImportPart::Whole {
        profile: Box::new(profile.clone()),
        orders: orders
            .into_iter()
            .map(|(key, value)| (keys::order_id(&key), decode(&key, &value)))
            .collect(),
        event_ids: dedup
            .iter()
            .map(|(key, _)| keys::dedup_event_id(key))
            .collect(),
    }
}

/// Whether any identity was unlinked from `oneid` (and is still remembered).
fn has_unlinks(tx: &Tx<'_>, oneid: OneId) -> bool {
    let prefix = keys::unlinked_prefix(oneid);
    let below = [&prefix[..], &[u8::MAX]].concat();
    !tx.scan_below(&prefix, None, &below, 1).is_empty()
}

/// Every unlink `oneid` remembers (at most [`UNLINKED_PER_PROFILE_MAX`], and what one event
/// names past it while its unbinds are pending), with its identity.
fn unlinks_of(tx: &Tx<'_>, oneid: OneId) -> Vec<(Identity, UnlinkRecord)> {
    let prefix = keys::unlinked_prefix(oneid);
    let below = [&prefix[..], &[u8::MAX]].concat();
    let read_max = UNLINKED_PER_PROFILE_MAX + IDENTITIES_PER_EVENT_MAX;
    let rows = tx.scan_below(&prefix, None, &below, read_max);
    rows.into_iter()
        .map(|(key, value)| (keys::unlinked_identity(&key), decode(&key, &value)))
        .collect()
}

/// A profile's identities, one by one.
fn identities_of(profile: &Profile) -> Vec<Identity> {
    profile
        .identities
        .iter()
        .flat_map(|(kind, values)| {
            values.iter().map(|value| Identity {
                kind: kind.clone(),
                value: value.clone(),
            })
        })
        .collect()
}

/// Stored pairs, in key order.
type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// The rows of `prefix` after the one whose key ends in `after`, up to [`EXPORT_ROWS_MAX`] and
/// [`EXPORT_BYTES_MAX`] in all; and the id (what follows the 9-byte prefix) of the last row
/// if rows may be left.
fn export_rows(tx: &Tx<'_>, prefix: &[u8], after: Option<&str>) -> (Rows, Option<String>) {
    let after = after.map(|id| [prefix, id.as_bytes()].concat());
    let mut below = prefix.to_vec();
    below.push(u8::MAX);
    let mut rows = tx.scan_below(prefix, after.as_deref(), &below, EXPORT_ROWS_MAX);
    let mut bytes = 0;
    let full = rows.len() == EXPORT_ROWS_MAX;
    let fits = rows
        .iter()
        .take_while(|(k, v)| {
            bytes += k.len() + v.len();
            bytes <= EXPORT_BYTES_MAX
        })
        .count();
    let cut = fits < rows.len();
    rows.truncate(fits.max(1).min(rows.len()));
    let last = (full || cut)
        .then(|| rows.last())
        .flatten()
        .map(|(key, _)| String::from_utf8(key[prefix.len()..].to_vec()).expect("UTF-8 ids"));
    (rows, last)
}

/// Deletes up to [`TOMBSTONE_DELETES_MAX`] orders of a tombstone; answers whether any is left.
fn delete_orders(tx: &mut Tx<'_>, loser: OneId) -> bool {
    let prefix = keys::orders_prefix(loser);
    let mut below = prefix.clone();
    below.push(u8::MAX);
    let rows = tx.scan_below(&prefix, None, &below, TOMBSTONE_DELETES_MAX + 1);
    let more = rows.len() > TOMBSTONE_DELETES_MAX;
    for (key, value) in rows.into_iter().take(TOMBSTONE_DELETES_MAX) {
        tx.delete_known(key, &value);
    }
    more
}
