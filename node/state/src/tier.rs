//! Tiers: the level 365-day spend reaches, kept for the rules' retention period, and the
//! spend window orders leave.

use super::keys::{self, DueKind};
use super::profile::Profile;
use super::tx::{EventWrites, Tx};
use super::{OrderRecord, ShardState};
use oneid_protocol::num::{Millis, Money};

impl ShardState {
    /// An order leaves the spend window: `spend_365d` drops by what was not refunded.
    pub(super) fn exit_window(
        &self,
        tx: &Tx<'_>,
        profile: &mut Profile,
        order_id: &str,
        at: Millis,
        writes: &mut EventWrites,
    ) -> bool {
        let key = keys::order(profile.oneid, order_id);
        let stored = tx.get(&key).expect("window keys point at existing orders");
        let mut order: OrderRecord = super::decode(&key, &stored);
        if !order.in_window {
            return false;
        }
        order.in_window = false;
        profile.spend_365d.0 -= order.amount.0 - order.refunded.0;
        assert!(
            profile.spend_365d >= Money::ZERO,
            "spend_365d went negative on {}",
            profile.oneid
        );
        writes.put(
            key.clone(),
            Some(super::store::pair_hash(&key, &stored)),
            &order,
        );
        // Due keys of one profile and instant are processed in kind order, window exits before
        // tier reviews, so a review scheduled for this instant sees this order gone. A tier set
        // at this very instant some other way (by an event dated `at`) counted this order,
        // which no longer counts at `at`: review it again, or it would be kept a whole period.
        let review = profile.tier_since == at;
        self.set_tier(tx, profile, at, review, writes);
        true
    }

    /// Moves the tier to the level 365-day spend reaches. An upgrade happens at once; a
    /// downgrade only at a review (the retention period ended) or when retention is 0. A review
    /// that keeps the level starts a new retention period. Each change of tier or period
    /// schedules the next review.
    pub(super) fn set_tier(
        &self,
        tx: &Tx<'_>,
        profile: &mut Profile,
        at: Millis,
        review: bool,
        writes: &mut EventWrites,
    ) {
        let reached = self.rules.level_for_spend(profile.spend_365d);
        let retention = self.rules.retention_days;
        let change = match self.rules.level_of(&profile.tier) {
            None => true,
            Some(current) => {
                reached > current
                    || (reached < current && (review || retention == 0))
                    || (review && reached == current)
            }
        };
        if !change {
            return;
        }
        profile.tier = self.rules.levels[reached].name.clone();
        profile.tier_since = at;
        profile.tier_retained_until =
            (reached > 0 && retention > 0).then(|| at.plus_days(retention));
        if let Some(until) = profile.tier_retained_until {
            writes.put_due(
                tx,
                keys::due(until, profile.oneid, DueKind::TierReview, &[]),
            );
        }
    }
}
