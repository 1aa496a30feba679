//! An event's apply, in the order it happens: [`ShardState::apply_event`] (dedup, the
//! target profile its identities resolve to (`identities.rs`), the profile settled to the
//! shard clock (`due.rs`), the body, the tier and rule tags, the segments' stamp, the stored
//! profile), and what each kind of event does to its profile, one room per kind.
//! `apply_body` checks the totals it may move, then hands the event to [`Applying`], whose
//! methods change the profile and collect the writes (held back in [`EventWrites`] until the
//! whole event is known to succeed); ledger entries are written here for earns, redeems,
//! refunds and expiries alike ([`ShardState::write_ledger`]).
//!
//! # Layout
//! - `order.rs`: orders and refunds, and the points an order earns;
//! - `points.rs`: points earned, redeemed and adjusted;
//! - `tags.rs`: manual tags and attributes.

mod order;
mod points;
mod tags;

use super::keys::{self, DueKind};
use super::profile::Profile;
use super::tx::{reject_field, EventWrites, Tx};
use super::{note_channel, DedupRecord, LedgerRecord};
use super::{LedgerKind, ShardState};
use crate::command::{EventOutcome, FollowUp, Found, LegacyRouted, Output, Routed, Target};
use oneid_protocol::event::{Event, EventBody, EventError, POINTS_PER_EVENT_MAX};
use oneid_protocol::num::Millis;
use oneid_protocol::ErrorCode;

/// How far an event's `ts` may be ahead of its shard's time (the target of the last clock entry
/// applied: the majority time its leader saw, which a shard catching up after a stop has
/// already reached): later, it is refused `invalid_field` (`ts`). One node's wrong clock, or
/// one client's, cannot date orders days ahead.
pub const EVENT_TS_AHEAD_MAX_MS: i64 = oneid_protocol::num::DAY_MS;

/// One event being applied to its profile: what its effects read besides the profile.
pub(super) struct Applying<'a, 't> {
    pub(super) state: &'a ShardState,
    pub(super) tx: &'a Tx<'t>,
    pub(super) event: &'a Event,
    /// The shard clock.
    pub(super) now: Millis,
}

impl ShardState {
    /// Applies what the event's type does to `profile`; writes go to `writes`.
    pub(super) fn apply_body(
        &self,
        tx: &Tx<'_>,
        profile: &mut Profile,
        event: &Event,
        writes: &mut EventWrites,
    ) -> Result<(), EventError> {
        check_totals(profile, &event.body)?;
        let applying = Applying {
            state: self,
            tx,
            event,
            now: self.record.clock,
        };
        match &event.body {
            EventBody::Order {
                order_id,
                amount,
                store: _,
            } => applying.order(profile, writes, order_id, amount),
            EventBody::Refund { order_id, amount } => {
                applying.refund(profile, writes, order_id, amount)
            }
            EventBody::PointsEarn {
                points,
                reason,
                expires_at,
            } => applying.earn_points(profile, writes, points, reason, expires_at),
            EventBody::PointsRedeem { points, reason } => {
                applying.redeem(profile, writes, points, reason)
            }
            EventBody::PointsAdjust { points, reason } => {
                applying.adjust(profile, writes, points, reason)
            }
            EventBody::TagAdd { tag, expires_at } => {
                applying.tag_add(profile, writes, tag, expires_at)
            }
            EventBody::TagRemove { tag } => {
                profile.untag(tag, event.ts);
                Ok(())
            }
            EventBody::ProfileUpdate { attributes } => {
                applying.update_attributes(profile, attributes)
            }
            EventBody::Identify | EventBody::Interaction { .. } => Ok(()),
            EventBody::Unlink => unreachable!("an unlink applies in apply_unlink"),
        }
    }
}

impl Applying<'_, '_> {
    /// Writes the event's ledger entry.
    fn ledger(
        &self,
        writes: &mut EventWrites,
        profile: &mut Profile,
        kind: LedgerKind,
        points: i64,
        reason: Option<String>,
        shortfall: i64,
    ) {
        let event = self.event;
        self.state.write_ledger(
            writes,
            profile,
            &event.event_id,
            kind,
            points,
            event.ts,
            reason,
            shortfall,
        );
    }
}

/// Earned points join a lot, whose expiry goes into the due-time index. A new lot's identity is
/// the ledger sequence of its earn (unique per profile), so its due key is always new, even
/// when an event id earns again after its dedup record was evicted.
fn earn(
    writes: &mut EventWrites,
    profile: &mut Profile,
    points: i64,
    expires_at: Millis,
    event_id: &str,
) {
    let seq = profile.ledger_seq;
    if let Some((lot, at)) = profile.add_points(points, expires_at, event_id, seq) {
        writes.put_new_due(keys::due(
            at,
            profile.oneid,
            DueKind::LotExpiry,
            &lot.to_be_bytes(),
        ));
    }
}

/// Refuses an event dated more than [`EVENT_TS_AHEAD_MAX_MS`] after `target`, the shard's
/// time, if `bound` (all but format-7 events, see `Command::LegacyEvents`).
pub(super) fn check_ts(ts: Millis, target: Millis, bound: bool) -> Result<(), EventError> {
    if bound && ts.0.saturating_sub(target.0) > EVENT_TS_AHEAD_MAX_MS {
        return Err(reject_field(
            ErrorCode::InvalidField,
            "ts",
            format!("ts {ts} is more than 24 hours ahead of the cluster's time ({target})"),
        ));
    }
    Ok(())
}

/// Refuses an event that would overflow one of the profile's totals (i64), before anything
/// changes: values a client controls must never reach an arithmetic overflow or an assertion
/// in apply, where a panic would stop the node and replay into the same panic after restart.
pub(super) fn check_totals(profile: &Profile, body: &EventBody) -> Result<(), EventError> {
    let fits = |value: i64, add: i64| value.checked_add(add).is_some();
    let (field, ok) = match body {
        // An order earns at most POINTS_PER_EVENT_MAX points.
        EventBody::Order { amount, .. } => (
            "amount",
            fits(profile.total_spend.0, amount.0)
                && fits(profile.spend_365d.0, amount.0)
                && fits(profile.balance, POINTS_PER_EVENT_MAX)
                && fits(profile.lifetime_earned, POINTS_PER_EVENT_MAX),
        ),
        EventBody::PointsEarn { points, .. } => (
            "points",
            fits(profile.balance, *points) && fits(profile.lifetime_earned, *points),
        ),
        EventBody::PointsRedeem { points, .. } => {
            ("points", fits(profile.lifetime_redeemed, *points))
        }
        EventBody::PointsAdjust { points, .. } => (
            "points",
            fits(profile.balance, *points) && fits(profile.debt, points.saturating_neg().max(0)),
        ),
        _ => return Ok(()),
    };
    if ok {
        Ok(())
    } else {
        Err(reject_field(
            ErrorCode::InvalidField,
            field,
            format!("this event would overflow the totals of {}", profile.oneid),
        ))
    }
}

/// Which release's events an `Events` entry holds: they apply as that release applied them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventsOf {
    /// Format 7 (`Command::LegacyEvents`): no bound on `ts`, no identity policy.
    Format7,
    /// Formats 8 and 9 (`Command::LegacyEvents9`): no identity policy.
    Format9,
    /// Format 10 (`Command::LegacyEvents10`): no write time per attribute and manual tag.
    Format10,
    /// Formats 11 and 12 (`Command::LegacyEvents12`, and the causes of `LegacyMerge12`
    /// steps): a removal forgets the attribute's (or manual tag's) write time.
    Format12,
    /// This format (`Command::Events`).
    Current,
}

impl EventsOf {
    /// Whether the identity policy judges them (from format 10 on).
    fn judged(self) -> bool {
        matches!(
            self,
            EventsOf::Format10 | EventsOf::Format12 | EventsOf::Current
        )
    }

    /// Whether they keep a write time per attribute and manual tag (format 11 on); before,
    /// every one takes the profile's `updated_at` once the event applied, as migrating a
    /// profile to format 11 gives them.
    fn timed(self) -> bool {
        matches!(self, EventsOf::Format12 | EventsOf::Current)
    }

    /// Whether a removal of an attribute or manual tag is remembered, with its time, so that
    /// a merge keeps it over an older write (format 13 on).
    fn remembers_removals(self) -> bool {
        self == EventsOf::Current
    }
}

impl ShardState {
    /// Applies a batch of events in order: their outcomes, and the follow-ups they left.
    pub(super) fn apply_events(
        &mut self,
        tx: &mut Tx<'_>,
        index: u64,
        events: Vec<Routed>,
        of: EventsOf,
    ) -> Output {
        let mut follow_ups = Vec::new();
        let outcomes = events
            .into_iter()
            .map(|routed| self.apply_event(tx, index, routed, of, &mut follow_ups))
            .collect();
        Output::Events {
            outcomes,
            follow_ups,
        }
    }

    /// An event of an older format as this one routes it (its router's word on bindings
    /// taken at the shard's epoch: there was no other).
    pub(super) fn routed_anew(&self, legacy: LegacyRouted) -> Routed {
        let found = legacy
            .bound
            .iter()
            .map(|bound| match legacy.target {
                Target::Existing(oneid) if *bound => Found::Bound {
                    oneid,
                    epoch: self.record.binding_epoch,
                },
                _ => Found::Unbound,
            })
            .collect();
        Routed {
            event: legacy.event,
            target: legacy.target,
            rules_version: self.rules_version,
            link_elsewhere: legacy.link_elsewhere,
            found,
        }
    }

    /// Applies one event; the follow-ups it leaves (identities to bind on other shards) are
    /// added to `follow_ups`.
    pub(super) fn apply_event(
        &mut self,
        tx: &mut Tx<'_>,
        index: u64,
        routed: Routed,
        of: EventsOf,
        follow_ups: &mut Vec<FollowUp>,
    ) -> EventOutcome {
        let Routed {
            event,
            target,
            rules_version,
            link_elsewhere,
            found,
        } = routed;
        let policy = of.judged();
        if policy && rules_version != self.rules_version {
            return EventOutcome::StaleRules(self.rules_version);
        }
        if event.body == EventBody::Unlink {
            return self.apply_unlink(tx, index, event, target, follow_ups);
        }
        let sighting = match self.sight(tx, &event, target, &found, policy) {
            Ok(sighting) => sighting,
            Err(error) => return EventOutcome::Rejected(error),
        };
        let (mut profile, stored_hash) = match self.target_profile(tx, &event, target, &sighting) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let oneid = profile.oneid;
        let dedup_key = keys::dedup(oneid, &event.event_id);
        if let Some(stored_hash) = stored_hash {
            if tx.get(&dedup_key).is_some() {
                self.activations.insert(profile, stored_hash);
                return EventOutcome::Duplicate(oneid);
            }
        }
        let before = stored_hash.and_then(|_| self.stamp(&profile));
        let mut writes = EventWrites::default();
        let existed = stored_hash.is_some();
        let accepted = check_ts(event.ts, self.record.target, of != EventsOf::Format7)
            .and_then(|()| self.apply_body(tx, &mut profile, &event, &mut writes))
            .and_then(|()| {
                let ts = event.ts;
                self.take_identities(tx, &mut profile, existed, ts, sighting, link_elsewhere)
            });
        let taken = match accepted {
            Ok(taken) => taken,
            Err(error) => {
                self.activations.discard(oneid);
                return EventOutcome::Rejected(error);
            }
        };
        note_channel(&mut profile, &event);
        profile.version += 1;
        profile.updated_at = profile.updated_at.max(event.ts);
        if !of.timed() {
            profile.date_writes_at_update();
        }
        if !of.remembers_removals() {
            profile.forget_removals();
        }

        // Everything is accepted: write it.
        if stored_hash.is_none() {
            self.record.profile_seq += 1;
        }
        // Identities listed here were read as unbound, the dedup key as absent, and ledger and
        // eviction keys carry fresh sequence numbers: no old values to read back.
        for identity in &taken.new_bindings {
            tx.put_new(keys::identity(identity), &oneid);
        }
        self.file_follow_ups(tx, oneid, taken.to_link, follow_ups);
        writes.commit(tx, &mut self.record.due_floor, &mut self.retained.ledger);
        tx.put_new(dedup_key.clone(), &DedupRecord { index });
        self.retained.dedup.push(dedup_key);
        self.finish_profile(tx, profile, stored_hash, before.as_ref());
        EventOutcome::Applied(oneid, taken.not_linked)
    }
}

impl ShardState {
    /// Writes a ledger entry, listed for the ledger retention queue.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_ledger(
        &self,
        writes: &mut EventWrites,
        profile: &mut Profile,
        event_id: &str,
        kind: LedgerKind,
        points: i64,
        at: Millis,
        reason: Option<String>,
        shortfall: i64,
    ) {
        let record = LedgerRecord {
            event_id: event_id.to_string(),
            kind,
            points,
            balance_after: profile.balance,
            at,
            reason,
            shortfall,
            peer: None,
            expires_at: None,
        };
        let key = keys::ledger(profile.oneid, profile.ledger_seq);
        writes.ledger.push(key.clone());
        writes.put(key, None, &record);
        profile.ledger_seq += 1;
    }
}
