//! The identity policy: which identity values are junk that must never bind (blocked values),
//! how many values of a kind one profile may hold, which kinds may join two profiles, and
//! each kind's priority among a profile's identities.
//!
//! [`IdentityDoc`] is the wire form (the rules document's `"identity"`), [`IdentityPolicy`]
//! the validated one, replicated with the rules; [`BlockList`] is its blocked values compiled
//! for matching, built again from the policy wherever it is needed (matching is a pure
//! function of the policy and the identity: the `regex` crate matches in time linear in the
//! value, whatever the pattern, so a pattern such as `(a+)+$` costs no more than any other).

use crate::ids::{is_name, Identity, IDENTITY_KIND_BYTES_MAX};
use crate::rules::RulesError;
use regex::{RegexSet, RegexSetBuilder};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most patterns, over the global list and every kind's.
pub const PATTERNS_MAX: usize = 64;
/// Most bytes of one pattern.
pub const PATTERN_BYTES_MAX: usize = 256;
/// Most exact blocked values, over the global list and every kind's.
pub const EXACT_MAX: usize = 1024;
/// Most kinds the policy names.
pub const KINDS_MAX: usize = 64;
/// Largest `max_per_profile`: a profile's identity limit.
pub const PER_PROFILE_MAX: u32 = crate::event::IDENTITIES_PER_EVENT_MAX as u32;
/// Largest `priority` in size.
pub const PRIORITY_MAX: i32 = 1_000_000;
/// Memory one compiled list of patterns may take (`regex`'s size limit), so that a policy
/// cannot make a node build an automaton of unbounded size.
const COMPILED_BYTES_MAX: usize = 1 << 20;

/// The blocked values when the policy gives no global list: matched case-insensitively.
pub const DEFAULT_EXACT: [&str; 9] = [
    "null",
    "none",
    "nil",
    "unknown",
    "undefined",
    "anonymous",
    "test",
    "-1",
    "0",
];
/// The blocked patterns when the policy gives no global list.
pub const DEFAULT_PATTERNS: [&str; 1] = ["^0+$"];

/// The wire form: `"identity": {"kinds": {...}, "blocked_values": {...}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct IdentityDoc {
    /// Per kind: priority, limit, whether it may join profiles, and its own blocked values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kinds: BTreeMap<String, KindDoc>,
    /// Values blocked for every kind. Absent: the defaults (`null`, `none`, `nil`, `unknown`,
    /// `undefined`, `anonymous`, `test`, `-1`, `0`, any case, and `^0+$`); given, they replace
    /// the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_values: Option<BlockedDoc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct KindDoc {
    /// Which profile survives a merge: the one holding the highest-priority kind (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Most values of this kind one profile holds (1 to 50; absent: up to the profile's 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_profile: Option<u32>,
    /// Whether a value of this kind may join two profiles (default true; false for device ids
    /// or openids, which are bound only when unbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<bool>,
    /// Blocked for this kind, besides the global list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_values: Option<BlockedDoc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct BlockedDoc {
    /// Values blocked as they are (byte for byte, as identities are compared).
    #[serde(default)]
    pub exact: Vec<String>,
    /// Regular expressions (the `regex` crate's syntax, matched in linear time) a blocked
    /// value matches; anchor them (`^...$`) to match whole values.
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// The validated policy. Lists are sorted and without repeats, so that equal policies are
/// equal values (and encode alike).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityPolicy {
    pub kinds: BTreeMap<String, KindPolicy>,
    /// `None`: the defaults ([`DEFAULT_EXACT`] in any case, [`DEFAULT_PATTERNS`]).
    pub blocked: Option<Blocked>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindPolicy {
    pub priority: i32,
    /// `None`: no limit of its own (the profile's identity limit holds).
    pub max_per_profile: Option<u32>,
    pub merge: bool,
    /// Blocked for this kind, besides the global list.
    pub blocked: Blocked,
}

impl Default for KindPolicy {
    fn default() -> KindPolicy {
        KindPolicy {
            priority: 0,
            max_per_profile: None,
            merge: true,
            blocked: Blocked::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    pub exact: Vec<String>,
    pub patterns: Vec<String>,
}

impl IdentityDoc {
    /// Validates the document; errors name the field (`identity.kinds.phone.max_per_profile`,
    /// `identity.blocked_values.patterns[2]`).
    pub fn validate(&self) -> Result<IdentityPolicy, RulesError> {
        if self.kinds.len() > KINDS_MAX {
            return Err(error(
                "identity.kinds",
                format!("at most {KINDS_MAX} kinds, found {}", self.kinds.len()),
            ));
        }
        let mut kinds = BTreeMap::new();
        for (kind, doc) in &self.kinds {
            let at = format!("identity.kinds.{kind}");
            if !is_name(kind, IDENTITY_KIND_BYTES_MAX) {
                return Err(error(
                    &at,
                    format!("a kind matches [a-z0-9_]{{1,{IDENTITY_KIND_BYTES_MAX}}}"),
                ));
            }
            kinds.insert(kind.clone(), doc.validate(&at)?);
        }
        let blocked = self
            .blocked_values
            .as_ref()
            .map(|doc| doc.validate("identity.blocked_values"))
            .transpose()?;
        let policy = IdentityPolicy { kinds, blocked };
        let (exact, patterns) = policy.counts();
        if exact > EXACT_MAX {
            return Err(error(
                "identity.blocked_values.exact",
                format!("at most {EXACT_MAX} exact values over all kinds, found {exact}"),
            ));
        }
        if patterns > PATTERNS_MAX {
            return Err(error(
                "identity.blocked_values.patterns",
                format!("at most {PATTERNS_MAX} patterns over all kinds, found {patterns}"),
            ));
        }
        // Each list compiled together, as matching will: patterns that pass one by one may
        // not fit the size limit as one set.
        policy
            .compile_lists()
            .map_err(|(field, e)| error(&field, format!("the patterns are refused: {e}")))?;
        Ok(policy)
    }
}

impl KindDoc {
    fn validate(&self, at: &str) -> Result<KindPolicy, RulesError> {
        let priority = self.priority.unwrap_or(0);
        if priority.unsigned_abs() > PRIORITY_MAX.unsigned_abs() {
            return Err(error(
                &format!("{at}.priority"),
                format!("priority is -{PRIORITY_MAX} to {PRIORITY_MAX}, found {priority}"),
            ));
        }
        if let Some(max) = self.max_per_profile {
            if !(1..=PER_PROFILE_MAX).contains(&max) {
                return Err(error(
                    &format!("{at}.max_per_profile"),
                    format!("max_per_profile is 1 to {PER_PROFILE_MAX}, found {max}"),
                ));
            }
        }
        let blocked = match &self.blocked_values {
            Some(doc) => doc.validate(&format!("{at}.blocked_values"))?,
            None => Blocked::default(),
        };
        Ok(KindPolicy {
            priority,
            max_per_profile: self.max_per_profile,
            merge: self.merge.unwrap_or(true),
            blocked,
        })
    }
}

impl BlockedDoc {
    fn validate(&self, at: &str) -> Result<Blocked, RulesError> {
        for (i, value) in self.exact.iter().enumerate() {
            if value.is_empty() || value.len() > crate::ids::IDENTITY_VALUE_BYTES_MAX {
                return Err(error(
                    &format!("{at}.exact[{i}]"),
                    format!(
                        "a blocked value is 1 to {} bytes, as identity values are",
                        crate::ids::IDENTITY_VALUE_BYTES_MAX
                    ),
                ));
            }
        }
        for (i, pattern) in self.patterns.iter().enumerate() {
            let at = format!("{at}.patterns[{i}]");
            if pattern.len() > PATTERN_BYTES_MAX {
                return Err(error(
                    &at,
                    format!("a pattern is at most {PATTERN_BYTES_MAX} bytes"),
                ));
            }
            compile(std::slice::from_ref(pattern), false)
                .map_err(|e| error(&at, format!("pattern {pattern:?} is refused: {e}")))?;
        }
        Ok(Blocked {
            exact: sorted(&self.exact),
            patterns: sorted(&self.patterns),
        })
    }
}

fn sorted(values: &[String]) -> Vec<String> {
    let mut values = values.to_vec();
    values.sort();
    values.dedup();
    values
}

fn error(field: &str, message: String) -> RulesError {
    RulesError {
        field: field.to_string(),
        message,
    }
}

fn compile(patterns: &[String], case_insensitive: bool) -> Result<RegexSet, regex::Error> {
    RegexSetBuilder::new(patterns)
        .case_insensitive(case_insensitive)
        .size_limit(COMPILED_BYTES_MAX)
        .dfa_size_limit(COMPILED_BYTES_MAX)
        .build()
}

impl IdentityPolicy {
    /// Exact values and patterns over the global list and every kind's.
    fn counts(&self) -> (usize, usize) {
        let global = self
            .blocked
            .as_ref()
            .map_or((0, 0), |b| (b.exact.len(), b.patterns.len()));
        self.kinds.values().fold(global, |(e, p), kind| {
            (
                e + kind.blocked.exact.len(),
                p + kind.blocked.patterns.len(),
            )
        })
    }

    /// The policy of `kind` (the defaults for a kind it does not name).
    pub fn kind(&self, kind: &str) -> KindPolicy {
        self.kinds.get(kind).cloned().unwrap_or_default()
    }

    /// The priority of `kind`: a profile ranks by the highest of the kinds it holds.
    pub fn priority(&self, kind: &str) -> i32 {
        self.kinds.get(kind).map_or(0, |k| k.priority)
    }

    /// Whether a value of `kind` may join two profiles.
    pub fn merges(&self, kind: &str) -> bool {
        self.kinds.get(kind).is_none_or(|k| k.merge)
    }

    /// The most values of `kind` one profile holds, if the kind has a limit of its own.
    pub fn max_per_profile(&self, kind: &str) -> Option<u32> {
        self.kinds.get(kind).and_then(|k| k.max_per_profile)
    }

    /// The wire form.
    pub fn to_doc(&self) -> IdentityDoc {
        let blocked = |b: &Blocked| BlockedDoc {
            exact: b.exact.clone(),
            patterns: b.patterns.clone(),
        };
        IdentityDoc {
            kinds: self
                .kinds
                .iter()
                .map(|(kind, policy)| {
                    let doc = KindDoc {
                        priority: Some(policy.priority),
                        max_per_profile: policy.max_per_profile,
                        merge: Some(policy.merge),
                        blocked_values: (policy.blocked != Blocked::default())
                            .then(|| blocked(&policy.blocked)),
                    };
                    (kind.clone(), doc)
                })
                .collect(),
            blocked_values: self.blocked.as_ref().map(blocked),
        }
    }

    /// The blocked values compiled for matching.
    pub fn block_list(&self) -> BlockList {
        self.compile_lists()
            .expect("a replicated policy's patterns were validated before it was proposed")
    }

    /// Compiles each list's patterns as one set; a list that does not compile is named.
    fn compile_lists(&self) -> Result<BlockList, (String, regex::Error)> {
        let global = match &self.blocked {
            Some(blocked) => List {
                exact: blocked.exact.clone(),
                any_case: false,
                patterns: compile(&blocked.patterns, false)
                    .map_err(|e| ("identity.blocked_values.patterns".to_string(), e))?,
            },
            None => List {
                exact: sorted(&DEFAULT_EXACT.map(String::from)),
                any_case: true,
                patterns: compile(&DEFAULT_PATTERNS.map(String::from), true)
                    .expect("the default patterns compile"),
            },
        };
        let mut kinds = BTreeMap::new();
        for (kind, policy) in &self.kinds {
            if policy.blocked == Blocked::default() {
                continue;
            }
            let field = format!("identity.kinds.{kind}.blocked_values.patterns");
            let list = List {
                exact: policy.blocked.exact.clone(),
                any_case: false,
                patterns: compile(&policy.blocked.patterns, false).map_err(|e| (field, e))?,
            };
            kinds.insert(kind.clone(), list);
        }
        Ok(BlockList { global, kinds })
    }
}

/// Blocked values compiled for matching: the global list and each kind's.
#[derive(Debug, Clone)]
pub struct BlockList {
    global: List,
    kinds: BTreeMap<String, List>,
}

#[derive(Debug, Clone)]
struct List {
    /// Sorted (and lowercase when `any_case`).
    exact: Vec<String>,
    any_case: bool,
    patterns: RegexSet,
}

impl List {
    fn matches(&self, value: &str) -> bool {
        let exact = if self.any_case {
            // Most values are ASCII: compared without building their lowercase form.
            if value.is_ascii() {
                self.exact
                    .binary_search_by(|v| ascii_lowercase_cmp(v, value))
                    .is_ok()
            } else {
                self.exact.binary_search(&value.to_lowercase()).is_ok()
            }
        } else {
            self.exact
                .binary_search_by(|v| v.as_str().cmp(value))
                .is_ok()
        };
        exact || self.patterns.is_match(value)
    }
}

/// `listed` (lowercase) against `value` (ASCII) lowercased, byte by byte: the order of
/// `listed.cmp(&value.to_lowercase())`.
fn ascii_lowercase_cmp(listed: &str, value: &str) -> std::cmp::Ordering {
    listed
        .bytes()
        .cmp(value.bytes().map(|b| b.to_ascii_lowercase()))
}

impl BlockList {
    /// Whether `identity`'s value is blocked for its kind.
    pub fn blocks(&self, identity: &Identity) -> bool {
        self.global.matches(&identity.value)
            || self
                .kinds
                .get(&identity.kind)
                .is_some_and(|list| list.matches(&identity.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(doc: serde_json::Value) -> Result<IdentityPolicy, RulesError> {
        crate::strict::from_json::<IdentityDoc>(doc.to_string().as_bytes())
            .expect("the document's shape")
            .validate()
    }

    fn id(kind: &str, value: &str) -> Identity {
        Identity {
            kind: kind.into(),
            value: value.into(),
        }
    }

    #[test]
    fn the_defaults_block_placeholders_in_any_case_and_zeros() {
        let blocks = IdentityPolicy::default().block_list();
        for value in [
            "unknown", "UNKNOWN", "Null", "none", "test", "-1", "0", "000", "0000000",
        ] {
            assert!(blocks.blocks(&id("phone", value)), "{value}");
        }
        for value in ["13800000000", "unknown1", "tester", "-10", "0x0", "010"] {
            assert!(!blocks.blocks(&id("phone", value)), "{value}");
        }
    }

    #[test]
    fn a_global_list_replaces_the_defaults_and_kind_lists_add_to_it() {
        let blocks = policy(json!({
            "blocked_values": {"exact": ["N/A"], "patterns": ["^9+$"]},
            "kinds": {"member_card": {"max_per_profile": 1,
                "blocked_values": {"exact": ["M0"], "patterns": ["^TEST-"]}}}
        }))
        .unwrap()
        .block_list();
        assert!(blocks.blocks(&id("phone", "N/A")));
        assert!(
            !blocks.blocks(&id("phone", "n/a")),
            "exact values are byte-exact"
        );
        assert!(blocks.blocks(&id("phone", "999")));
        assert!(
            !blocks.blocks(&id("phone", "unknown")),
            "the defaults are replaced"
        );
        assert!(blocks.blocks(&id("member_card", "M0")));
        assert!(blocks.blocks(&id("member_card", "TEST-7")));
        assert!(
            blocks.blocks(&id("member_card", "N/A")),
            "the global list holds too"
        );
        assert!(
            !blocks.blocks(&id("phone", "M0")),
            "a kind's list is its own"
        );
    }

    #[test]
    fn bad_policies_name_the_field() {
        let field = |doc| policy(doc).unwrap_err().field;
        assert_eq!(
            field(json!({"blocked_values": {"patterns": ["^ok$", "(unclosed"]}})),
            "identity.blocked_values.patterns[1]"
        );
        assert_eq!(
            field(json!({"kinds": {"phone": {"blocked_values": {"patterns": ["a{1000}{1000}"]}}}})),
            "identity.kinds.phone.blocked_values.patterns[0]",
            "a pattern whose automaton would be too large"
        );
        assert_eq!(
            field(json!({"kinds": {"member_card": {"max_per_profile": 0}}})),
            "identity.kinds.member_card.max_per_profile"
        );
        assert_eq!(
            field(json!({"kinds": {"Phone": {}}})),
            "identity.kinds.Phone"
        );
        assert_eq!(
            field(json!({"kinds": {"phone": {"priority": 1_000_001}}})),
            "identity.kinds.phone.priority"
        );
        let many: Vec<String> = (0..=PATTERNS_MAX).map(|i| format!("^x{i}$")).collect();
        assert_eq!(
            field(json!({"blocked_values": {"patterns": many}})),
            "identity.blocked_values.patterns"
        );
        assert_eq!(
            field(json!({"blocked_values": {"exact": [""]}})),
            "identity.blocked_values.exact[0]"
        );
    }

    #[test]
    fn a_pattern_that_backtracks_exponentially_elsewhere_is_matched_in_linear_time_here() {
        let blocks = policy(json!({"blocked_values": {"patterns": ["(a+)+$"]}}))
            .unwrap()
            .block_list();
        // A backtracking engine takes about 2^n steps on n `a`s and a `!`: at n = 100,000 it
        // would never answer. `regex` matches in time linear in the value, so this returns
        // (no clock is read: a hang, not a timing, is what would fail it).
        let value = format!("{}!", "a".repeat(100_000));
        assert!(!blocks.blocks(&id("name", &value)));
        assert!(blocks.blocks(&id("name", &"a".repeat(100_000))));
    }

    #[test]
    fn the_wire_form_round_trips_through_the_policy() {
        let doc = json!({
            "kinds": {"device_id": {"merge": false, "priority": -1},
                      "phone": {"priority": 10, "max_per_profile": 2,
                                "blocked_values": {"exact": ["b", "a", "a"], "patterns": []}}},
            "blocked_values": {"exact": [], "patterns": ["^0+$"]}
        });
        let policy = policy(doc).unwrap();
        assert_eq!(
            policy.kind("phone").blocked.exact,
            ["a", "b"],
            "sorted, once each"
        );
        assert_eq!(policy.kind("wechat_openid"), KindPolicy::default());
        assert_eq!(policy.to_doc().validate().unwrap(), policy);
    }
}
