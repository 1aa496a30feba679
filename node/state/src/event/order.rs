//! Orders and refunds: the points an order earns, its spend and window, and a refund's
//! pro-rata reversal.

use super::{earn, Applying};
use crate::keys::{self, DueKind};
use crate::profile::Profile;
use crate::store::pair_hash;
use crate::tx::{reject_field, EventWrites};
use crate::{decode, LedgerKind, OrderRecord, ShardState};
use oneid_protocol::event::{EventError, POINTS_PER_EVENT_MAX};
use oneid_protocol::num::Money;
use oneid_protocol::ErrorCode;
use rust_decimal::Decimal;

impl Applying<'_, '_> {
    /// An order: its points (by the rules, the tier and the channel), spend, the window's exit
    /// and the tier review, and its record (an order id is recorded once per profile).
    pub(super) fn order(
        &self,
        profile: &mut Profile,
        writes: &mut EventWrites,
        order_id: &str,
        amount: &Money,
    ) -> Result<(), EventError> {
        let (state, tx, event, now) = (self.state, self.tx, self.event, self.now);
        let key = keys::order(profile.oneid, order_id);
        if tx.get(&key).is_some() {
            return Err(reject_field(
                ErrorCode::DuplicateOrder,
                "order_id",
                format!(
                    "order {order_id:?} was already recorded on {}",
                    profile.oneid
                ),
            ));
        }
        let points = state.order_points(profile, *amount, event.channel.as_deref());
        let expires_at = event.ts.plus_days(state.rules.expire_after_days);
        if points > 0 {
            earn(writes, profile, points, expires_at, &event.event_id);
            profile.lifetime_earned += points;
            self.ledger(
                writes,
                profile,
                LedgerKind::Earn,
                points,
                Some(format!("order {order_id}")),
                0,
            );
        }
        let in_window = event.ts.plus_days(state.rules.window_days) > now;
        profile.order_count += 1;
        profile.total_spend.0 += amount.0;
        if in_window {
            profile.spend_365d.0 += amount.0;
        }
        profile.first_order_at = Some(profile.first_order_at.map_or(event.ts, |t| t.min(event.ts)));
        profile.last_order_at = Some(profile.last_order_at.map_or(event.ts, |t| t.max(event.ts)));
        if in_window {
            let exit = event.ts.plus_days(state.rules.window_days);
            writes.put_new_due(keys::due(
                exit,
                profile.oneid,
                DueKind::WindowExit,
                order_id.as_bytes(),
            ));
        }
        state.set_tier(tx, profile, event.ts, false, writes);
        let record = OrderRecord {
            event_id: event.event_id.clone(),
            ts: event.ts,
            amount: *amount,
            refunded: Money::ZERO,
            points,
            reversed: 0,
            in_window,
        };
        writes.put(key, None, &record);

        Ok(())
    }

    /// A refund of (part of) an order: its points reversed pro rata (what was already spent is
    /// a shortfall), its spend taken back, and the tier reviewed.
    pub(super) fn refund(
        &self,
        profile: &mut Profile,
        writes: &mut EventWrites,
        order_id: &str,
        amount: &Option<Money>,
    ) -> Result<(), EventError> {
        let (state, tx, event) = (self.state, self.tx, self.event);
        let key = keys::order(profile.oneid, order_id);
        let Some(stored) = tx.get(&key) else {
            return Err(reject_field(
                ErrorCode::UnknownOrder,
                "order_id",
                format!("{} has no order {order_id:?}", profile.oneid),
            ));
        };
        let stored_hash = pair_hash(&key, &stored);
        let mut order: OrderRecord = decode(&key, &stored);
        let rest = Money(order.amount.0 - order.refunded.0);
        let amount = amount.unwrap_or(rest);
        if amount > rest || amount.0 <= 0 {
            return Err(reject_field(
                ErrorCode::RefundExceedsOrder,
                "amount",
                format!("refund of {amount} exceeds the {rest} left of order {order_id:?}"),
            ));
        }
        order.refunded.0 += amount.0;
        // Pro rata on the cumulative refund, so partial refunds never drift by rounding.
        let reversed_total = (i128::from(order.points) * i128::from(order.refunded.0)
            / i128::from(order.amount.0)) as i64;
        let reverse = reversed_total - order.reversed;
        order.reversed = reversed_total;
        if reverse > 0 {
            let taken =
                profile.take_points(reverse.min(profile.balance.max(0)), Some(&order.event_id));
            let shortfall = reverse - taken;
            let reason = if shortfall > 0 {
                format!("refund of order {order_id}; {shortfall} points already spent")
            } else {
                format!("refund of order {order_id}")
            };
            self.ledger(
                writes,
                profile,
                LedgerKind::Reverse,
                -taken,
                Some(reason),
                shortfall,
            );
        }
        profile.total_spend.0 -= amount.0;
        if order.in_window {
            profile.spend_365d.0 -= amount.0;
        }
        assert!(
            profile.total_spend >= Money::ZERO && profile.spend_365d >= Money::ZERO,
            "spend went negative on {}",
            profile.oneid
        );
        writes.put(key, Some(stored_hash), &order);
        state.set_tier(tx, profile, event.ts, false, writes);

        Ok(())
    }
}

impl ShardState {
    /// `floor(amount × per_currency_unit × tier multiplier × channel multiplier)`, exactly.
    pub(super) fn order_points(
        &self,
        profile: &Profile,
        amount: Money,
        channel: Option<&str>,
    ) -> i64 {
        let one = Decimal::ONE;
        let tier = self
            .rules
            .tier_multipliers
            .get(&profile.tier)
            .copied()
            .unwrap_or(one);
        let channel = channel
            .and_then(|c| self.rules.channel_multipliers.get(c))
            .copied()
            .unwrap_or(one);
        // Multiply the integer mantissas, not `Decimal`s: a `Decimal` product that
        // outgrows its 96-bit mantissa is silently rounded, so a big order with 6-decimal
        // factors could be rounded up to the next integer before the floor (e.g.
        // 650973450359.22 × 0.923247 × 0.953853 × 0.405623 = 232533326424.99999999999999999546
        // earned 232533326425). Validated factors are >= 0 with at most 6 decimals, so the
        // divisor is at most 10^20, and a numerator past u128::MAX (3.4e38) means a result far
        // above POINTS_PER_EVENT_MAX.
        let Ok(cents) = u128::try_from(amount.0) else {
            return 0;
        };
        let mut numerator = Some(cents);
        let mut scale = 2;
        for factor in [self.rules.per_currency_unit, tier, channel] {
            let Ok(mantissa) = u128::try_from(factor.mantissa()) else {
                return 0;
            };
            numerator = numerator.and_then(|n| n.checked_mul(mantissa));
            scale += factor.scale();
        }
        let points = match (numerator, 10u128.checked_pow(scale)) {
            (None, _) => POINTS_PER_EVENT_MAX,
            // 10^scale > u128::MAX >= numerator: the floor is 0.
            (Some(_), None) => 0,
            (Some(n), Some(divisor)) => i64::try_from(n / divisor).unwrap_or(POINTS_PER_EVENT_MAX),
        };
        points.clamp(0, POINTS_PER_EVENT_MAX)
    }
}
