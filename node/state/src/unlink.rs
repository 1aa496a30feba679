//! Unlink: an `unlink` event takes wrongly bound identities off the profile its `oneid` names
//! and frees them, so that the next event naming one binds it afresh.
//!
//! The apply, on the profile's shard, takes the identities off the profile, deletes the
//! bindings this shard's index holds (moving the binding epoch, so no node serves them from
//! its cache any more), and leaves an unbind follow-up for each binding another shard holds
//! (`Command::Unbind` there, then `FinishFollowUps` here: the follow-up machinery binds use,
//! swept by the leader the same way). It also remembers each unlink (`u oneid identity`: an
//! [`UnlinkRecord`]) so that:
//! - an event dated before the unlink, naming the value, never binds it back to the profile
//!   (`not_linked`, reason `unlinked`);
//! - an event that reaches the profile through the old binding (its unbind still pending, or
//!   a node's cache not told yet) is answered `unavailable`: sent again, it is resolved anew.
//!
//! An unlink moves no points and changes nothing else of the profile.

use super::*;
use crate::command::FollowUp;
use crate::event::check_ts;
use crate::identities::Sighting;
use oneid_protocol::api::{NotLinked, NotLinkedReason};
use oneid_protocol::event::IDENTITIES_PER_EVENT_MAX;

/// Most unlinks one profile remembers: past it, the oldest (by `ts`) is forgotten, and an
/// event dated before that one may bind its value back.
pub const UNLINKED_PER_PROFILE_MAX: usize = 100;

/// An identity an `unlink` took off a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnlinkRecord {
    /// The unlink event's `ts`: events dated before it never bind the value back.
    pub at: Millis,
    /// Its binding, held by another shard, is still being removed (an unbind follow-up is
    /// pending).
    pub unbinding: bool,
}

/// What an unlink tells about an identity an event names for a profile that does not hold it.
pub(super) enum Unlinked {
    /// Never unlinked from the profile, or by an unlink dated no later than the event: it may
    /// be bound.
    Free,
    /// Unlinked after the event's `ts`: not linked.
    Older(NotLinked),
}

impl ShardState {
    /// Applies an `unlink` (routed by its `oneid`): every identity it names must be on the
    /// profile, or nothing changes (`not_found`, naming `identities.KIND`).
    pub(super) fn apply_unlink(
        &mut self,
        tx: &mut Tx<'_>,
        index: u64,
        event: Event,
        target: Target,
        follow_ups: &mut Vec<FollowUp>,
    ) -> EventOutcome {
        if target == Target::Claim {
            return EventOutcome::Rejected(reject_field(
                ErrorCode::MissingField,
                "oneid",
                "an unlink event names the profile to unlink from by oneid",
            ));
        }
        let (mut profile, stored_hash) =
            match self.target_profile(tx, &event, target, &Sighting::none()) {
                Ok((profile, Some(stored_hash))) => (profile, stored_hash),
                Ok((_, None)) => unreachable!("an existing profile's target has stored bytes"),
                Err(outcome) => return outcome,
            };
        let oneid = profile.oneid;
        let dedup_key = keys::dedup(oneid, &event.event_id);
        if tx.get(&dedup_key).is_some() {
            self.activations.insert(profile, stored_hash);
            return EventOutcome::Duplicate(oneid);
        }
        let checked = check_ts(event.ts, self.record.target, true)
            .and_then(|()| self.check_unlinkable(&profile, &event.identities));
        if let Err(error) = checked {
            self.activations.insert(profile, stored_hash);
            return EventOutcome::Rejected(error);
        }
        let before = self.stamp(&profile);
        let mut unbound_here = false;
        for identity in &event.identities {
            profile.remove_identity(identity);
            let here = identity.shard(self.n_shards) == self.shard;
            if here {
                unbound_here |= self.unbind_here(tx, identity, oneid);
            } else {
                self.file_follow_up(tx, oneid, identity.clone(), true, follow_ups);
            }
            // An unlink dated before an earlier one of the same value (sent late) does not
            // shorten what that one forbids.
            let key = keys::unlinked(oneid, identity);
            let before = tx.get_as::<UnlinkRecord>(&key).map_or(event.ts, |r| r.at);
            let record = UnlinkRecord {
                at: before.max(event.ts),
                unbinding: !here,
            };
            tx.put(key, &record);
        }
        if unbound_here {
            self.record.binding_epoch += 1;
        }
        self.forget_oldest_unlinks(tx, oneid, 0);
        tx.put_new(dedup_key.clone(), &DedupRecord { index });
        self.retained.dedup.push(dedup_key);
        profile.version += 1;
        profile.updated_at = profile.updated_at.max(event.ts);
        self.finish_profile(tx, profile, Some(stored_hash), before.as_ref());
        EventOutcome::Applied(oneid, Vec::new())
    }

    /// Refuses an unlink of an identity the profile does not hold, or one whose unbinds would
    /// pass the shard's limit of follow-ups pending.
    fn check_unlinkable(
        &self,
        profile: &Profile,
        identities: &[Identity],
    ) -> Result<(), EventError> {
        if let Some(missing) = identities.iter().find(|id| !profile.holds(id)) {
            return Err(reject_field(
                ErrorCode::NotFound,
                &format!("identities.{}", missing.kind),
                format!(
                    "profile {} holds no {} {:?}",
                    profile.oneid, missing.kind, missing.value
                ),
            ));
        }
        let elsewhere = identities
            .iter()
            .filter(|id| id.shard(self.n_shards) != self.shard)
            .count();
        self.check_follow_ups_room(elsewhere)
    }

    /// Forgets the oldest unlinks of a profile past [`UNLINKED_PER_PROFILE_MAX`] (never one
    /// whose unbind is pending), once an unlink event added its own, or a merge `imported`
    /// a loser's.
    pub(super) fn forget_oldest_unlinks(&self, tx: &mut Tx<'_>, oneid: OneId, imported: usize) {
        let prefix = keys::unlinked_prefix(oneid);
        let mut below = prefix.clone();
        below.push(u8::MAX);
        // At most the limit before this unlink, and what one event names (and what a merge
        // imported: an unlink imports none, and reads what it always read).
        let read_max = UNLINKED_PER_PROFILE_MAX + IDENTITIES_PER_EVENT_MAX + imported + 1;
        let rows = tx.scan_below(&prefix, None, &below, read_max);
        let excess = rows.len().saturating_sub(UNLINKED_PER_PROFILE_MAX);
        if excess == 0 {
            return;
        }
        let mut settled: Vec<(Millis, Vec<u8>, Vec<u8>)> = rows
            .into_iter()
            .filter_map(|(key, value)| {
                let record: UnlinkRecord = decode(&key, &value);
                (!record.unbinding).then_some((record.at, key, value))
            })
            .collect();
        settled.sort();
        for (_, key, value) in settled.into_iter().take(excess) {
            tx.delete_known(key, &value);
        }
    }

    /// Removes `identity`'s binding to `oneid` from this shard's index, if it still has it.
    pub(super) fn apply_unbind(
        &mut self,
        tx: &mut Tx<'_>,
        identity: Identity,
        oneid: OneId,
    ) -> BindOutcome {
        if self.unbind_here(tx, &identity, oneid) {
            self.record.binding_epoch += 1;
        }
        BindOutcome::Unbound
    }

    /// Deletes `identity`'s binding from this shard's index if it is `oneid`'s; answers
    /// whether it did (the caller moves the binding epoch).
    fn unbind_here(&self, tx: &mut Tx<'_>, identity: &Identity, oneid: OneId) -> bool {
        let key = self.index_key(identity);
        let bound = tx.get_as::<OneId>(&key) == Some(oneid);
        if bound {
            tx.delete(key);
        }
        bound
    }

    /// An unbind of `identity` from `oneid` is done: the unlink's record says so.
    pub(super) fn unbound(&self, tx: &mut Tx<'_>, oneid: OneId, identity: &Identity) {
        let key = keys::unlinked(oneid, identity);
        if let Some(record) = tx.get_as::<UnlinkRecord>(&key) {
            let done = UnlinkRecord {
                unbinding: false,
                ..record
            };
            tx.put(key, &done);
        }
    }

    /// What an unlink says of `identity`, named for `profile` (which does not hold it) by an
    /// event dated `ts` that found it bound to `bound_to` (or unbound): an error if the event
    /// came through the binding the unlink removes (its unbind still pending, or the binding
    /// read before it), to be sent again and resolved anew.
    pub(super) fn unlinked(
        &self,
        tx: &Tx<'_>,
        profile: OneId,
        identity: &Identity,
        ts: Millis,
        bound_to: Option<OneId>,
    ) -> Result<Unlinked, EventError> {
        let Some(record) = tx.get_as::<UnlinkRecord>(&keys::unlinked(profile, identity)) else {
            return Ok(Unlinked::Free);
        };
        if ts < record.at {
            return Ok(Unlinked::Older(NotLinked {
                kind: identity.kind.clone(),
                value: identity.value.clone(),
                reason: NotLinkedReason::Unlinked,
            }));
        }
        if record.unbinding || bound_to == Some(profile) {
            return Err(reject(
                ErrorCode::Unavailable,
                format!(
                    "{} {:?} was just unlinked from {profile}; retry",
                    identity.kind, identity.value
                ),
            ));
        }
        Ok(Unlinked::Free)
    }
}
