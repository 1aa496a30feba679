//! The rules in force (from `SetRules` and `SeedRules`) and the rule tags they set: which
//! tags a profile's state earns now, and when time alone could change that.

use super::*;
use crate::command::REGISTRY_SHARD;
use oneid_protocol::num::DAY_MS;

impl ShardState {
    /// Whether the shard's rules have no retention (rules migrated from format 7; a shard
    /// without rules has the defaults until its seed): its leader seeds one
    /// (`Command::SeedRetention`).
    pub fn needs_retention(&self) -> bool {
        self.rules.retention.is_none()
    }

    /// Applies a command that sets the rules: unversioned (`SetRules`), seeded (`SeedRules`,
    /// `SeedRetention`: only where none are), ordered by the registry (`DefineRules`) or
    /// installed as it ordered them (`InstallRules`: only above the shard's version).
    pub(super) fn apply_rules_command(&mut self, tx: &mut Tx<'_>, command: Command) -> Output {
        match command {
            Command::SetRules(rules) => self.install_rules(tx, None, *rules),
            Command::SeedRules(rules) => {
                if tx.get(keys::RULES).is_none() {
                    tx.put(keys::RULES.to_vec(), &*rules);
                    self.set_rules(*rules);
                }
            }
            Command::DefineRules(rules) => {
                assert_eq!(
                    self.shard.0, REGISTRY_SHARD,
                    "rules are ordered by the registry shard"
                );
                let version = self.rules_version + 1;
                self.install_rules(tx, Some(version), *rules);
                return Output::RulesVersion(version);
            }
            Command::InstallRules { version, rules } => {
                if version > self.rules_version {
                    self.install_rules(tx, Some(version), *rules);
                }
            }
            Command::SeedRetention(retention) => {
                if self.needs_retention() {
                    self.rules.retention = Some(retention);
                    tx.put(keys::RULES.to_vec(), &self.rules);
                }
            }
            other => unreachable!("not a rules command: {other:?}"),
        }
        Output::None
    }

    /// Installs `rules`: stored (with their version, above the shard's, when they have one:
    /// `None` is an unversioned `SetRules`), in force from this entry on, and every profile's
    /// rule tags re-evaluated in the background.
    pub(super) fn install_rules(&mut self, tx: &mut Tx<'_>, version: Option<u64>, rules: Rules) {
        tx.put(keys::RULES.to_vec(), &rules);
        if let Some(version) = version {
            tx.put(keys::RULES_VERSION.to_vec(), &version);
            self.rules_version = version;
        }
        self.set_rules(rules);
        self.start_rules_backfill();
    }

    pub(super) fn set_rules(&mut self, rules: Rules) {
        self.tag_rules = rules.compiled_tag_rules();
        self.blocks = rules.identity.block_list();
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
