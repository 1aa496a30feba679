//! The rules in force (from `SetRules` and `SeedRules`) and the rule tags they set: which
//! tags a profile's state earns now, and when time alone could change that.

use super::*;
use oneid_protocol::num::DAY_MS;

impl ShardState {
    /// Whether the shard's rules have no retention (rules migrated from format 7; a shard
    /// without rules has the defaults until its seed): its leader seeds one
    /// (`Command::SeedRetention`).
    pub fn needs_retention(&self) -> bool {
        self.rules.retention.is_none()
    }

    pub(super) fn set_rules(&mut self, rules: Rules) {
        self.tag_rules = rules.compiled_tag_rules();
        self.rules = rules;
        self.refresh_thresholds();
    }

    /// Collects where the tag rules' and the segments' `days_since` comparisons can flip.
    pub(super) fn refresh_thresholds(&mut self) {
        let thresholds: BTreeSet<(TimeField, i64)> = self
            .tag_rules
            .iter()
            .flat_map(|(_, predicate)| predicate.day_thresholds())
            .chain(self.segments.day_thresholds())
            .collect();
        self.time_thresholds = thresholds.into_iter().collect();
    }

    pub(crate) fn evaluate_rule_tags(&self, profile: &mut Profile) {
        profile.rule_tags =
            crate::profile::rule_tags(profile, &self.rules, &self.tag_rules, self.record.clock);
    }
}

impl ShardState {
    /// The first time after the clock at which some `days_since` comparison of the tag rules
    /// or segments changes value for this profile.
    pub(super) fn next_rule_review(&self, profile: &Profile) -> Option<Millis> {
        let now = self.record.clock;
        self.time_thresholds
            .iter()
            .filter_map(|(field, days)| {
                let base = profile.time_of(field)?;
                let at = Millis(base.0.checked_add(days.checked_mul(DAY_MS)?)?);
                (at > now).then_some(at)
            })
            .min()
    }
}
