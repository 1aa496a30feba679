//! Points earned, redeemed and adjusted outside orders.

use super::{earn, Applying};
use crate::profile::Profile;
use crate::tx::{reject_field, EventWrites};
use crate::LedgerKind;
use oneid_protocol::event::EventError;
use oneid_protocol::num::Millis;
use oneid_protocol::ErrorCode;

impl Applying<'_, '_> {
    /// Points earned outside an order, into a lot that expires when given or by the rules.
    pub(super) fn earn_points(
        &self,
        profile: &mut Profile,
        writes: &mut EventWrites,
        points: &i64,
        reason: &Option<String>,
        expires_at: &Option<Millis>,
    ) -> Result<(), EventError> {
        let (state, event, now) = (self.state, self.event, self.now);
        let expires_at =
            expires_at.unwrap_or_else(|| event.ts.plus_days(state.rules.expire_after_days));
        if expires_at <= now {
            return Err(reject_field(
                ErrorCode::AlreadyExpired,
                "expires_at",
                format!("expires_at {expires_at} is not after the shard's clock {now}"),
            ));
        }
        earn(writes, profile, *points, expires_at, &event.event_id);
        profile.lifetime_earned += points;
        self.ledger(
            writes,
            profile,
            LedgerKind::Earn,
            *points,
            reason.clone(),
            0,
        );

        Ok(())
    }

    /// Points redeemed, within the balance, from the lots that expire first.
    pub(super) fn redeem(
        &self,
        profile: &mut Profile,
        writes: &mut EventWrites,
        points: &i64,
        reason: &Option<String>,
    ) -> Result<(), EventError> {
        if *points > profile.balance {
            return Err(reject_field(
                ErrorCode::InsufficientPoints,
                "points",
                format!(
                    "redeem of {points} exceeds the balance of {}",
                    profile.balance
                ),
            ));
        }
        let taken = profile.take_points(*points, None);
        assert_eq!(
            taken, *points,
            "a redeem within the balance takes all its points"
        );
        profile.lifetime_redeemed += points;
        self.ledger(
            writes,
            profile,
            LedgerKind::Redeem,
            -points,
            reason.clone(),
            0,
        );

        Ok(())
    }

    /// An adjustment: points added as a lot, or taken (into debt past the balance).
    pub(super) fn adjust(
        &self,
        profile: &mut Profile,
        writes: &mut EventWrites,
        points: &i64,
        reason: &str,
    ) -> Result<(), EventError> {
        let (state, event) = (self.state, self.event);
        if *points > 0 {
            earn(
                writes,
                profile,
                *points,
                event.ts.plus_days(state.rules.expire_after_days),
                &event.event_id,
            );
        } else {
            profile.take_points_into_debt(-points);
        }
        self.ledger(
            writes,
            profile,
            LedgerKind::Adjust,
            *points,
            Some(reason.to_string()),
            0,
        );

        Ok(())
    }
}
