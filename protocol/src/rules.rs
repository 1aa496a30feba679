//! Loyalty rules: points earning, tier levels, rule-based tags, and how long a shard keeps
//! what it evicts by age (retention).
//!
//! Rules are replicated state: seeded from `cluster.toml` on first start and changed through
//! `PUT /v1/rules`, which proposes them through the log, so every replica applies events under
//! the same rules. [`RulesDoc`] is the wire form; [`Rules`] the validated one.

use crate::ids::is_name;
use crate::num::{literal_text, parse_decimal, Money};
use crate::policy::{IdentityDoc, IdentityPolicy};
use crate::predicate::Predicate;
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Most tier levels.
pub const TIER_LEVELS_MAX: usize = 32;
/// Most tag rules.
pub const TAG_RULES_MAX: usize = 256;
/// Largest multiplier and `per_currency_unit`.
pub const FACTOR_MAX: u32 = 1000;
/// Most decimals of a multiplier or `per_currency_unit`.
pub const FACTOR_SCALE_MAX: u32 = 6;
/// Longest expiry, window or retention, in days (100 years).
pub const DAYS_MAX: u32 = 36_500;
/// Longest retention of the segments' change log, in hours (a year).
pub const CHANGE_LOG_HOURS_MAX: u32 = 8_760;
/// Most change-log entries a shard may be told to keep.
pub const CHANGE_LOG_ENTRIES_MAX: u64 = 100_000_000;

/// Validated loyalty rules. Serialized with postcard into the log and the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    /// Points per currency unit of an order, before multipliers.
    pub per_currency_unit: Decimal,
    pub tier_multipliers: BTreeMap<String, Decimal>,
    pub channel_multipliers: BTreeMap<String, Decimal>,
    /// Earned points expire this many days after the event's `ts` unless it says otherwise.
    pub expire_after_days: u32,
    /// The spend window for tiers (`spend_365d`), in days.
    pub window_days: u32,
    /// How long a reached tier is kept before a downgrade, in days.
    pub retention_days: u32,
    /// Ordered lowest first; the first has `min_spend` 0.
    pub levels: Vec<TierLevel>,
    /// Evaluated in order; a rule sees manual tags and the tags of earlier rules.
    pub tag_rules: Vec<TagRule>,
    /// What clock entries evict, and when. Always set by a rules document; `None` only in a
    /// shard whose rules were migrated from a release that kept retention in each node's
    /// config, until its leader seeds it from its `cluster.toml` (nothing is evicted
    /// meanwhile).
    pub retention: Option<Retention>,
    /// Which identity values never bind, how many of a kind a profile holds, which kinds may
    /// join profiles. Last, so that rules of an older format gain it by appending its bytes.
    pub identity: IdentityPolicy,
}

/// How long a shard keeps what it evicts by age: replicated with the rules, so that every
/// replica evicts alike whatever its node's config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Event ids remembered for exactly-once: a resend within this many days of the
    /// original is answered `duplicate`.
    pub dedup_days: u32,
    /// Points ledger entries.
    pub ledger_days: u32,
    /// Segment membership changes, by age...
    pub change_log_hours: u32,
    /// ...and by count, per shard.
    pub change_log_entries_max: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            dedup_days: 7,
            ledger_days: 730,
            change_log_hours: 72,
            change_log_entries_max: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierLevel {
    pub name: String,
    pub min_spend: Money,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagRule {
    pub tag: String,
    /// The predicate's source text; parsed again (deterministically) when the rules are loaded.
    pub when: String,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            per_currency_unit: Decimal::ONE,
            tier_multipliers: BTreeMap::new(),
            channel_multipliers: BTreeMap::new(),
            expire_after_days: 365,
            window_days: 365,
            retention_days: 365,
            levels: vec![TierLevel {
                name: "member".into(),
                min_spend: Money::ZERO,
            }],
            tag_rules: Vec::new(),
            retention: Some(Retention::default()),
            identity: IdentityPolicy::default(),
        }
    }
}

impl Rules {
    /// The level index reached by `spend`.
    pub fn level_for_spend(&self, spend: Money) -> usize {
        self.levels
            .iter()
            .rposition(|level| level.min_spend <= spend)
            .unwrap_or(0)
    }

    pub fn level_of(&self, name: &str) -> Option<usize> {
        self.levels.iter().position(|level| level.name == name)
    }

    /// Parses the tag rules' predicates. Rules were validated before they entered the log,
    /// so a failure here means corrupt state.
    pub fn compiled_tag_rules(&self) -> Vec<(String, Predicate)> {
        self.tag_rules
            .iter()
            .map(|rule| {
                (
                    rule.tag.clone(),
                    Predicate::parse(&rule.when)
                        .expect("replicated tag rule was validated before it was proposed"),
                )
            })
            .collect()
    }

    /// The wire form (without a version: the caller knows it).
    pub fn to_doc(&self) -> RulesDoc {
        let factor = |d: &Decimal| {
            serde_json::value::to_raw_value(&d.normalize().to_string())
                .expect("a string serializes")
        };
        let money = |m: Money| {
            serde_json::value::to_raw_value(&m.to_string()).expect("a string serializes")
        };
        RulesDoc {
            points: PointsDoc {
                per_currency_unit: Some(factor(&self.per_currency_unit)),
                tier_multipliers: self
                    .tier_multipliers
                    .iter()
                    .map(|(k, v)| (k.clone(), factor(v)))
                    .collect(),
                channel_multipliers: self
                    .channel_multipliers
                    .iter()
                    .map(|(k, v)| (k.clone(), factor(v)))
                    .collect(),
                expire_after_days: Some(self.expire_after_days),
            },
            tiers: TiersDoc {
                window_days: Some(self.window_days),
                retention_days: Some(self.retention_days),
                levels: Some(
                    self.levels
                        .iter()
                        .map(|l| LevelDoc {
                            name: l.name.clone(),
                            min_spend: money(l.min_spend),
                        })
                        .collect(),
                ),
            },
            tag_rules: self
                .tag_rules
                .iter()
                .map(|r| TagRuleDoc {
                    tag: r.tag.clone(),
                    when: r.when.clone(),
                })
                .collect(),
            retention: self.retention.map(|r| RetentionDoc {
                dedup_days: Some(r.dedup_days),
                ledger_days: Some(r.ledger_days),
                change_log_hours: Some(r.change_log_hours),
                change_log_entries_max: Some(r.change_log_entries_max),
            }),
            identity: Some(self.identity.to_doc()),
            version: None,
        }
    }
}

/// Wire form of the rules (`GET`/`PUT /v1/rules`, `[rules]` in cluster.toml). Every part is
/// optional on input and takes its default. Decimals are kept as raw JSON so they are parsed
/// exactly from their literal text. A node reads it with `strict::from_json`, which
/// refuses a field it does not have; a client reading a newer node's answer ignores one.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RulesDoc {
    #[serde(default)]
    pub points: PointsDoc,
    #[serde(default)]
    pub tiers: TiersDoc,
    #[serde(default)]
    pub tag_rules: Vec<TagRuleDoc>,
    /// Absent: the defaults of [`Retention`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionDoc>,
    /// The identity policy (see [`IdentityDoc`]). Absent: the defaults (no kind limits, every
    /// kind mergeable, the default blocked values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityDoc>,
    /// Assigned by the cluster, in the answers of `GET` and `PUT /v1/rules`: the registry
    /// shard gives each PUT the next version, and every shard keeps the rules of the highest
    /// version it was sent (0: the seeded rules). A version in a PUT's body is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// The wire form of [`Retention`]: each part optional, taking its default.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RetentionDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_log_hours: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_log_entries_max: Option<u64>,
}

impl RetentionDoc {
    /// Validates each part against its range, in the order of the fields.
    pub fn validate(&self) -> Result<Retention, RulesError> {
        let defaults = Retention::default();
        let dedup_days = days(
            "retention.dedup_days",
            self.dedup_days,
            defaults.dedup_days,
            1,
        )?;
        let ledger_days = days(
            "retention.ledger_days",
            self.ledger_days,
            defaults.ledger_days,
            1,
        )?;
        let change_log_hours = self.change_log_hours.unwrap_or(defaults.change_log_hours);
        if !(1..=CHANGE_LOG_HOURS_MAX).contains(&change_log_hours) {
            return Err(refuse(
                "retention.change_log_hours",
                format!("must be 1 to {CHANGE_LOG_HOURS_MAX} hours, found {change_log_hours}"),
            ));
        }
        let entries = self
            .change_log_entries_max
            .unwrap_or(defaults.change_log_entries_max);
        if !(1..=CHANGE_LOG_ENTRIES_MAX).contains(&entries) {
            return Err(refuse(
                "retention.change_log_entries_max",
                format!("must be 1 to {CHANGE_LOG_ENTRIES_MAX}, found {entries}"),
            ));
        }
        Ok(Retention {
            dedup_days,
            ledger_days,
            change_log_hours,
            change_log_entries_max: entries,
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PointsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::num::decimal_schema_option")]
    pub per_currency_unit: Option<Box<RawValue>>,
    #[serde(default)]
    #[schemars(schema_with = "crate::num::decimal_map_schema")]
    pub tier_multipliers: BTreeMap<String, Box<RawValue>>,
    #[serde(default)]
    #[schemars(schema_with = "crate::num::decimal_map_schema")]
    pub channel_multipliers: BTreeMap<String, Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after_days: Option<u32>,
}

#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TiersDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levels: Option<Vec<LevelDoc>>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct LevelDoc {
    pub name: String,
    #[schemars(schema_with = "crate::num::money_schema")]
    pub min_spend: Box<RawValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TagRuleDoc {
    pub tag: String,
    pub when: String,
}

/// A rules document that was refused: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RulesError {
    pub field: String,
    pub message: String,
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> RulesError {
    RulesError {
        field: field.into(),
        message: message.into(),
    }
}

fn factor(field: &str, raw: &RawValue, allow_zero: bool) -> Result<Decimal, RulesError> {
    let value = literal_text(raw)
        .and_then(|text| parse_decimal(&text))
        .map_err(|e| refuse(field, e))?;
    let positive = if allow_zero {
        !value.is_sign_negative()
    } else {
        value > Decimal::ZERO
    };
    if !positive || value > Decimal::from(FACTOR_MAX) || value.scale() > FACTOR_SCALE_MAX {
        let lower = if allow_zero { "0" } else { "above 0" };
        return Err(refuse(field, format!("must be {lower} and at most {FACTOR_MAX} with at most {FACTOR_SCALE_MAX} decimals, found {value}")));
    }
    Ok(value)
}

fn days(field: &str, value: Option<u32>, default: u32, min: u32) -> Result<u32, RulesError> {
    let value = value.unwrap_or(default);
    if !(min..=DAYS_MAX).contains(&value) {
        return Err(refuse(
            field,
            format!("must be {min} to {DAYS_MAX} days, found {value}"),
        ));
    }
    Ok(value)
}

impl RulesDoc {
    /// Validates the document; on error nothing is changed and the error names the field.
    ///
    /// The checks run in a fixed order (levels, multipliers, tag rules, then the day counts)
    /// so that when several parts are wrong, the same one is always reported.
    pub fn validate(&self) -> Result<Rules, RulesError> {
        let defaults = Rules::default();
        let levels = match &self.tiers.levels {
            None => defaults.levels,
            Some(levels) => validate_levels(levels)?,
        };
        let per_currency_unit = match &self.points.per_currency_unit {
            None => defaults.per_currency_unit,
            Some(raw) => factor("points.per_currency_unit", raw, true)?,
        };
        let tier_multipliers =
            validate_multipliers("tier_multipliers", &self.points.tier_multipliers, |tier| {
                (!levels.iter().any(|l| l.name == tier))
                    .then(|| format!("{tier:?} is not a tier level"))
            })?;
        let channel_multipliers = validate_multipliers(
            "channel_multipliers",
            &self.points.channel_multipliers,
            |channel| {
                (!is_name(channel, crate::event::CHANNEL_BYTES_MAX))
                    .then(|| "a channel must match [a-z0-9_]{1,32}".to_string())
            },
        )?;
        let tag_rules = validate_tag_rules(&self.tag_rules)?;
        Ok(Rules {
            per_currency_unit,
            tier_multipliers,
            channel_multipliers,
            expire_after_days: days(
                "points.expire_after_days",
                self.points.expire_after_days,
                defaults.expire_after_days,
                1,
            )?,
            window_days: days(
                "tiers.window_days",
                self.tiers.window_days,
                defaults.window_days,
                1,
            )?,
            retention_days: days(
                "tiers.retention_days",
                self.tiers.retention_days,
                defaults.retention_days,
                0,
            )?,
            levels,
            tag_rules,
            retention: Some(self.retention.unwrap_or_default().validate()?),
            identity: self
                .identity
                .as_ref()
                .map(IdentityDoc::validate)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// Validates the tier levels as a whole: their count, then each level in order.
///
/// Levels are read lowest first because each one is checked against those before it.
fn validate_levels(levels: &[LevelDoc]) -> Result<Vec<TierLevel>, RulesError> {
    if levels.is_empty() || levels.len() > TIER_LEVELS_MAX {
        return Err(refuse(
            "tiers.levels",
            format!(
                "must have 1 to {TIER_LEVELS_MAX} levels, found {}",
                levels.len()
            ),
        ));
    }
    let mut out: Vec<TierLevel> = Vec::with_capacity(levels.len());
    for (i, level) in levels.iter().enumerate() {
        let checked = validate_level(&format!("tiers.levels[{i}]"), level, &out)?;
        out.push(checked);
    }
    Ok(out)
}

/// Validates one tier level against the levels before it (`earlier`).
///
/// Names must be unique so that multipliers and predicates can name a level, and spends must
/// start at 0 and rise strictly so that every spend reaches exactly one level.
fn validate_level(
    field: &str,
    level: &LevelDoc,
    earlier: &[TierLevel],
) -> Result<TierLevel, RulesError> {
    if !is_name(&level.name, 32) {
        return Err(refuse(
            format!("{field}.name"),
            format!("must match [a-z0-9_]{{1,32}}, found {:?}", level.name),
        ));
    }
    if earlier.iter().any(|l| l.name == level.name) {
        return Err(refuse(
            format!("{field}.name"),
            format!("level {:?} appears twice", level.name),
        ));
    }
    let min_spend = literal_text(&level.min_spend)
        .and_then(|t| Money::parse(&t))
        .map_err(|e| refuse(format!("{field}.min_spend"), e))?;
    match earlier.last() {
        None if min_spend != Money::ZERO => {
            return Err(refuse(
                format!("{field}.min_spend"),
                format!("the lowest level must have min_spend 0, found {min_spend}"),
            ))
        }
        Some(prev) if min_spend <= prev.min_spend => {
            return Err(refuse(
                format!("{field}.min_spend"),
                format!(
                    "must be above the previous level's {}, found {min_spend}",
                    prev.min_spend
                ),
            ));
        }
        _ => {}
    }
    Ok(TierLevel {
        name: level.name.clone(),
        min_spend,
    })
}

/// Validates one map of multipliers under `points.{section}`, tier or channel alike.
///
/// Both maps have the same shape, a key and a factor above 0, and differ only in what makes
/// a key acceptable: `bad_key` returns the message for a refused key. Keys are checked before
/// their factor, so an unknown key is reported even when its factor is also wrong.
fn validate_multipliers(
    section: &str,
    raw_factors: &BTreeMap<String, Box<RawValue>>,
    bad_key: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, Decimal>, RulesError> {
    let mut multipliers = BTreeMap::new();
    for (key, raw) in raw_factors {
        let field = format!("points.{section}.{key}");
        if let Some(message) = bad_key(key) {
            return Err(refuse(field, message));
        }
        multipliers.insert(key.clone(), factor(&field, raw, false)?);
    }
    Ok(multipliers)
}

/// Validates the tag rules as a whole: their count, then each rule in order.
///
/// Rules are read in order because a rule may only depend on the tags of earlier rules.
fn validate_tag_rules(rules: &[TagRuleDoc]) -> Result<Vec<TagRule>, RulesError> {
    if rules.len() > TAG_RULES_MAX {
        return Err(refuse(
            "tag_rules",
            format!("at most {TAG_RULES_MAX} rules, found {}", rules.len()),
        ));
    }
    let mut out: Vec<TagRule> = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        validate_tag_rule(&format!("tag_rules[{i}]"), rule, &out, &rules[i..])?;
        out.push(TagRule {
            tag: rule.tag.clone(),
            when: rule.when.clone(),
        });
    }
    Ok(out)
}

/// Validates one tag rule, given the rules already accepted (`earlier`) and the rule itself
/// with those after it (`rest`).
///
/// Each tag has one rule so that its value is never ambiguous, and a rule's predicate may
/// read only the tags of earlier rules so that evaluation in order has no cycles.
fn validate_tag_rule(
    field: &str,
    rule: &TagRuleDoc,
    earlier: &[TagRule],
    rest: &[TagRuleDoc],
) -> Result<(), RulesError> {
    if rule.tag.is_empty()
        || rule.tag.len() > crate::event::TAG_BYTES_MAX
        || rule.tag.chars().any(char::is_control)
    {
        return Err(refuse(
            format!("{field}.tag"),
            format!(
                "must be 1 to {} bytes without control characters",
                crate::event::TAG_BYTES_MAX
            ),
        ));
    }
    if earlier.iter().any(|r| r.tag == rule.tag) {
        return Err(refuse(
            format!("{field}.tag"),
            format!("tag {:?} has two rules", rule.tag),
        ));
    }
    let predicate =
        Predicate::parse(&rule.when).map_err(|e| refuse(format!("{field}.when"), e.to_string()))?;
    // A rule may read earlier rules' tags, never its own or a later one's: no cycles.
    if let Some(later) = predicate
        .tags_read()
        .into_iter()
        .find(|t| rest.iter().any(|r| &r.tag == t))
    {
        return Err(refuse(
            format!("{field}.when"),
            format!("reads rule tag {later:?}, which is not defined by an earlier rule"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(json: &str) -> RulesDoc {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn empty_document_gives_defaults() {
        assert_eq!(doc("{}").validate(), Ok(Rules::default()));
    }

    #[test]
    fn full_document_validates_and_round_trips() {
        let json = r#"{"points":{"per_currency_unit":"1.5","tier_multipliers":{"gold":2},"channel_multipliers":{"douyin":"1.25"},"expire_after_days":30},
            "tiers":{"window_days":365,"retention_days":90,"levels":[{"name":"member","min_spend":0},{"name":"gold","min_spend":"1000.00"}]},
            "tag_rules":[{"tag":"big","when":"total_spend >= 1000"},{"tag":"big_vip","when":"has_tag(\"big\") and tier >= \"gold\""}]}"#;
        let rules = doc(json).validate().unwrap();
        assert_eq!(rules.per_currency_unit, Decimal::new(15, 1));
        assert_eq!(rules.channel_multipliers["douyin"], Decimal::new(125, 2));
        assert_eq!(
            rules.levels[1],
            TierLevel {
                name: "gold".into(),
                min_spend: Money(100_000)
            }
        );
        assert_eq!(rules.level_for_spend(Money(99_999)), 0);
        assert_eq!(rules.level_for_spend(Money(100_000)), 1);
        let again =
            serde_json::from_str::<RulesDoc>(&serde_json::to_string(&rules.to_doc()).unwrap())
                .unwrap()
                .validate()
                .unwrap();
        assert_eq!(again, rules);
    }

    #[test]
    fn bad_rules_name_the_field() {
        let field = |json: &str| doc(json).validate().unwrap_err().field;
        assert_eq!(
            field(r#"{"tiers":{"levels":[{"name":"a","min_spend":5}]}}"#),
            "tiers.levels[0].min_spend"
        );
        assert_eq!(
            field(
                r#"{"tiers":{"levels":[{"name":"a","min_spend":0},{"name":"b","min_spend":0}]}}"#
            ),
            "tiers.levels[1].min_spend"
        );
        assert_eq!(
            field(r#"{"points":{"tier_multipliers":{"gold":2}}}"#),
            "points.tier_multipliers.gold"
        );
        assert_eq!(
            field(r#"{"points":{"channel_multipliers":{"jd":-1}}}"#),
            "points.channel_multipliers.jd"
        );
        assert_eq!(
            field(r#"{"points":{"expire_after_days":0}}"#),
            "points.expire_after_days"
        );
        assert_eq!(
            field(r#"{"tag_rules":[{"tag":"a","when":"points >"}]}"#),
            "tag_rules[0].when"
        );
        assert_eq!(
            field(r#"{"tag_rules":[{"tag":"a","when":"has_tag(\"a\")"}]}"#),
            "tag_rules[0].when"
        );
        let parse_error = doc(r#"{"tag_rules":[{"tag":"a","when":"points >\n  and"}]}"#)
            .validate()
            .unwrap_err();
        assert!(
            parse_error.message.starts_with("line 2, column 3"),
            "{}",
            parse_error.message
        );
    }
}
