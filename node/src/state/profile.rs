//! A profile's state: what the virtual actor of one OneID holds, persisted with its shard.
//!
//! The ledger and orders are separate records on disk (they grow with history); the profile
//! keeps what every event and read needs: balances, the lots, tier, tags, metrics.

use oneid_protocol::api::{MetricsView, PointsView, ProfileDoc};
use oneid_protocol::ids::OneId;
use oneid_protocol::num::{Millis, Money, DAY_MS};
use oneid_protocol::predicate::{NumberField, PredicateContext, TimeField, Value};
use oneid_protocol::rules::Rules;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most identity values one profile holds (all kinds together).
pub const IDENTITIES_PER_PROFILE_MAX: usize = 50;
/// Most attributes one profile holds.
pub const ATTRIBUTES_PER_PROFILE_MAX: usize = 100;
/// Most manual tags one profile holds.
pub const MANUAL_TAGS_PER_PROFILE_MAX: usize = 200;
/// Most channels remembered per profile; past it the least recently seen is forgotten.
pub const CHANNELS_PER_PROFILE_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub oneid: OneId,
    /// kind → values, both sorted.
    pub identities: BTreeMap<String, BTreeSet<String>>,
    pub attributes: BTreeMap<String, Value>,
    /// `sum(lots) - debt`; negative only through `points_adjust`.
    pub balance: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
    /// Earned points not yet spent or expired, ordered by expiry then creation.
    pub lots: Vec<Lot>,
    /// Points owed after a negative adjust beyond the lots; paid by the next earns.
    pub debt: i64,
    pub tier: String,
    pub tier_since: Millis,
    /// When the tier's retention period ends and it is reviewed; `None` at the lowest level or
    /// with no retention.
    pub tier_retained_until: Option<Millis>,
    /// When a time-based tag rule can next flip (the scheduled `RuleReview`), if ever.
    pub rule_review_at: Option<Millis>,
    /// Manual tags and when each expires.
    pub manual_tags: BTreeMap<String, Option<Millis>>,
    /// Tags set by rules at the last evaluation.
    pub rule_tags: BTreeSet<String>,
    pub order_count: u64,
    pub total_spend: Money,
    pub spend_365d: Money,
    pub first_order_at: Option<Millis>,
    pub last_order_at: Option<Millis>,
    pub channels: BTreeMap<String, Millis>,
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Next ledger sequence number of this profile.
    pub ledger_seq: u64,
}

/// Points earned together, expiring together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    pub expires_at: Millis,
    pub points: i64,
    /// The event that earned it.
    pub event_id: String,
}

impl Profile {
    pub fn new(oneid: OneId, rules: &Rules, at: Millis) -> Profile {
        Profile {
            oneid,
            identities: BTreeMap::new(),
            attributes: BTreeMap::new(),
            balance: 0,
            lifetime_earned: 0,
            lifetime_redeemed: 0,
            lots: Vec::new(),
            debt: 0,
            tier: rules.levels[0].name.clone(),
            tier_since: at,
            tier_retained_until: None,
            rule_review_at: None,
            manual_tags: BTreeMap::new(),
            rule_tags: BTreeSet::new(),
            order_count: 0,
            total_spend: Money::ZERO,
            spend_365d: Money::ZERO,
            first_order_at: None,
            last_order_at: None,
            channels: BTreeMap::new(),
            version: 0,
            created_at: at,
            updated_at: at,
            ledger_seq: 0,
        }
    }

    pub fn identity_count(&self) -> usize {
        self.identities.values().map(BTreeSet::len).sum()
    }

    /// Adds earned points as a lot (paying any debt first).
    pub fn add_points(&mut self, points: i64, expires_at: Millis, event_id: &str) {
        assert!(points > 0, "a lot holds positive points");
        let paid = points.min(self.debt);
        self.debt -= paid;
        let rest = points - paid;
        if rest > 0 {
            let at = self
                .lots
                .partition_point(|lot| lot.expires_at <= expires_at);
            self.lots.insert(
                at,
                Lot {
                    expires_at,
                    points: rest,
                    event_id: event_id.to_string(),
                },
            );
        }
        self.balance += points;
        self.check_points();
    }

    /// Takes points from the lots, the lot of `prefer` first, then the soonest to expire.
    /// Returns how many were taken (at most what the lots hold).
    pub fn take_points(&mut self, points: i64, prefer: Option<&str>) -> i64 {
        assert!(points >= 0, "cannot take negative points");
        let mut left = points;
        if let Some(event_id) = prefer {
            if let Some(lot) = self.lots.iter_mut().find(|lot| lot.event_id == event_id) {
                let take = lot.points.min(left);
                lot.points -= take;
                left -= take;
            }
        }
        for lot in &mut self.lots {
            if left == 0 {
                break;
            }
            let take = lot.points.min(left);
            lot.points -= take;
            left -= take;
        }
        self.lots.retain(|lot| lot.points > 0);
        let taken = points - left;
        self.balance -= taken;
        self.check_points();
        taken
    }

    /// Removes the lots `event_id` earned that expire at `at` (more than one only if the event
    /// id earned again after its dedup record was evicted); the points they still held, or
    /// `None` if they were spent.
    pub fn expire_lot(&mut self, event_id: &str, at: Millis) -> Option<i64> {
        let before = self.lots.len();
        let mut points = 0;
        self.lots.retain(|lot| {
            let expired = lot.event_id == event_id && lot.expires_at == at;
            points += if expired { lot.points } else { 0 };
            !expired
        });
        if self.lots.len() == before {
            return None;
        }
        self.balance -= points;
        self.check_points();
        Some(points)
    }

    /// Takes points beyond the lots as debt (negative balance): `points_adjust` only.
    pub fn take_points_into_debt(&mut self, points: i64) {
        let taken = self.take_points(points, None);
        self.debt += points - taken;
        self.balance -= points - taken;
        self.check_points();
    }

    fn check_points(&self) {
        let in_lots: i64 = self.lots.iter().map(|lot| lot.points).sum();
        assert_eq!(
            self.balance,
            in_lots - self.debt,
            "balance must equal lots minus debt for {}",
            self.oneid
        );
        assert!(
            self.debt == 0 || self.lots.is_empty(),
            "debt is paid before lots are kept for {}",
            self.oneid
        );
    }

    pub fn tags(&self) -> BTreeSet<&str> {
        self.manual_tags
            .keys()
            .chain(self.rule_tags.iter())
            .map(String::as_str)
            .collect()
    }

    /// The API document of this profile.
    pub fn to_doc(&self) -> ProfileDoc {
        ProfileDoc {
            oneid: self.oneid.to_string(),
            identities: self
                .identities
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                .collect(),
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
            points: PointsView {
                balance: self.balance,
                lifetime_earned: self.lifetime_earned,
                lifetime_redeemed: self.lifetime_redeemed,
            },
            tier: self.tier.clone(),
            tier_since: self.tier_since.to_string(),
            tier_retained_until: self.tier_retained_until.map(|t| t.to_string()),
            tags: self.tags().into_iter().map(str::to_string).collect(),
            metrics: MetricsView {
                order_count: self.order_count,
                total_spend: self.total_spend.to_string(),
                spend_365d: self.spend_365d.to_string(),
                first_order_at: self.first_order_at.map(|t| t.to_string()),
                last_order_at: self.last_order_at.map(|t| t.to_string()),
            },
            channels: self
                .channels
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            version: self.version,
            created_at: self.created_at.to_string(),
            updated_at: self.updated_at.to_string(),
        }
    }
}

fn value_to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::String(s) => serde_json::Value::String(s.clone()),
        // Exact: the decimal's text as a JSON number literal.
        Value::Number(d) => {
            serde_json::from_str(&d.normalize().to_string()).unwrap_or(serde_json::Value::Null)
        }
    }
}

/// A profile seen by the rule language, at the shard's clock, under the current rules.
pub struct RuleView<'a> {
    pub profile: &'a Profile,
    pub rules: &'a Rules,
    pub now: Millis,
    /// Rule tags set so far in this evaluation (earlier rules).
    pub rule_tags: &'a BTreeSet<String>,
}

impl PredicateContext for RuleView<'_> {
    fn number(&self, field: NumberField) -> Option<Decimal> {
        Some(match field {
            NumberField::Points => Decimal::from(self.profile.balance),
            NumberField::Spend365d => self.profile.spend_365d.to_decimal(),
            NumberField::TotalSpend => self.profile.total_spend.to_decimal(),
            NumberField::OrderCount => Decimal::from(self.profile.order_count),
        })
    }

    fn tier_level(&self) -> Option<usize> {
        self.rules.level_of(&self.profile.tier)
    }

    fn tier_level_of(&self, name: &str) -> Option<usize> {
        self.rules.level_of(name)
    }

    fn attribute(&self, name: &str) -> Option<Value> {
        self.profile.attributes.get(name).cloned()
    }

    fn has_tag(&self, tag: &str) -> bool {
        self.profile.manual_tags.contains_key(tag) || self.rule_tags.contains(tag)
    }

    fn has_channel(&self, channel: &str) -> bool {
        self.profile.channels.contains_key(channel)
    }

    fn has_identity(&self, kind: &str) -> bool {
        self.profile.identities.contains_key(kind)
    }

    fn days_since(&self, field: TimeField) -> Option<i64> {
        let at = match field {
            TimeField::LastOrderAt => self.profile.last_order_at?,
            TimeField::FirstOrderAt => self.profile.first_order_at?,
            TimeField::CreatedAt => self.profile.created_at,
        };
        Some((self.now.0 - at.0).div_euclid(DAY_MS))
    }
}
