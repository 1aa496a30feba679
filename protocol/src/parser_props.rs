//! Property tests of the parsers a client's input reaches: events, predicates, OneIDs and
//! rules documents. Whatever the input (arbitrary text, or a valid input mutated field by
//! field), each parser answers a value or its documented error, and never panics. Each
//! property runs [`CASES`] cases (`PROPTEST_CASES` overrides), so CI spends a bounded time.

use crate::event::{Event, EventError};
use crate::ids::Identity;
use crate::ids::OneId;
use crate::num::Millis;
use crate::policy::IdentityDoc;
use crate::predicate::Predicate;
use crate::rules::RulesDoc;
use crate::strict;
use crate::wire::NewEvent;
use crate::ErrorCode;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Cases per property.
const CASES: u32 = 2_000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CASES),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One valid event of each type.
fn valid_events() -> Vec<Value> {
    let base = |kind: &str, extra: Value| {
        let mut event = json!({"event_id": "e1", "type": kind,
            "identities": {"phone": "13800138000"}, "ts": "2026-11-20T10:00:00+08:00",
            "channel": "tmall"});
        let fields = event.as_object_mut().expect("an object");
        fields.extend(extra.as_object().expect("an object").clone());
        event
    };
    vec![
        base(
            "order",
            json!({"order_id": "T1", "amount": "1299.00", "store": "s1"}),
        ),
        base("refund", json!({"order_id": "T1", "amount": 10})),
        base(
            "points_earn",
            json!({"points": 5, "reason": "r", "expires_at": "2027-01-01T00:00:00Z"}),
        ),
        base("points_redeem", json!({"points": 5})),
        base("points_adjust", json!({"points": -5, "reason": "fix"})),
        base(
            "tag_add",
            json!({"tag": "vip", "expires_at": "2027-01-01T00:00:00Z"}),
        ),
        base("tag_remove", json!({"tag": "vip"})),
        base(
            "profile_update",
            json!({"attributes": {"city": "Hangzhou", "age": 30, "x": null}}),
        ),
        base(
            "identify",
            json!({"identities": {"phone": "1", "wechat_unionid": "u"}}),
        ),
        base(
            "interaction",
            json!({"name": "view", "properties": {"sku": "A1"}}),
        ),
    ]
}

/// Arbitrary JSON, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        "-?[0-9]{1,30}(\\.[0-9]{0,5})?".prop_map(Value::String),
        "20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9:]{8}(Z|[+-][0-9]{2}:[0-9]{2})".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid value with one field removed, replaced by arbitrary JSON, or one added.
fn mutated(valid: Vec<Value>) -> impl Strategy<Value = Value> {
    (
        0..valid.len(),
        0..3u8,
        "[a-z_]{1,16}",
        any_json(),
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(which, how, name, value, index)| {
            let mut event = valid[which].clone();
            let fields = event.as_object_mut().expect("an object");
            let keys: Vec<String> = fields.keys().cloned().collect();
            let key = index.get(&keys).clone();
            match how {
                0 => {
                    fields.remove(&key);
                }
                1 => {
                    fields.insert(key, value);
                }
                _ => {
                    fields.insert(name, value);
                }
            }
            event
        })
}

fn parse_event(json: &str) -> Option<Result<Event, EventError>> {
    let raw: Box<serde_json::value::RawValue> = serde_json::from_str(json).ok()?;
    Some(Event::parse(&raw, Some(Millis(1_767_225_600_000))))
}

/// An event's error is one `Event::parse` documents; a field error names a field.
fn documented(error: &EventError) -> Result<(), TestCaseError> {
    prop_assert!(Event::PARSE_ERRORS.contains(&error.code), "{error:?}");
    if error.code != ErrorCode::InvalidEvent {
        prop_assert!(
            error.field.as_deref().is_some_and(|f| !f.is_empty()),
            "{error:?}"
        );
    }
    prop_assert!(!error.message.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn events_from_arbitrary_json_parse_or_are_refused_as_documented(value in any_json()) {
        if let Some(Err(error)) = parse_event(&value.to_string()) {
            documented(&error)?;
        }
    }

    #[test]
    fn events_mutated_field_by_field_parse_or_are_refused_as_documented(
        event in mutated(valid_events()),
    ) {
        match parse_event(&event.to_string()).expect("JSON") {
            Ok(parsed) => prop_assert_eq!(parsed.event_id.as_str(), event["event_id"].as_str().unwrap_or_default()),
            Err(error) => documented(&error)?,
        }
    }

    /// The typed client's events are what the parser reads: any event that parses, written
    /// as a [`NewEvent`], parses back to exactly the same event.
    #[test]
    fn every_parsed_event_written_as_its_wire_type_parses_to_itself(
        event in mutated(valid_events()),
    ) {
        if let Ok(parsed) = parse_event(&event.to_string()).expect("JSON") {
            let written = serde_json::to_string(&NewEvent::from(&parsed)).expect("serializes");
            let again = parse_event(&written).expect("JSON");
            prop_assert_eq!(again, Ok(parsed), "{}", written);
        }
    }

    #[test]
    fn events_from_arbitrary_text_never_panic(text in ".{0,200}") {
        if let Some(Err(error)) = parse_event(&text) {
            documented(&error)?;
        }
    }

    #[test]
    fn predicates_parse_or_say_where_they_fail(source in ".{0,120}") {
        if let Err(error) = Predicate::parse(&source) {
            prop_assert!(error.line >= 1 && error.column >= 1, "{error:?}");
            prop_assert!(!error.message.is_empty());
        }
    }

    #[test]
    fn predicates_mutated_parse_or_say_where_they_fail(
        which in 0..PREDICATES.len(),
        at in any::<prop::sample::Index>(),
        cut in 0..4usize,
        insert in "[a-z0-9()\"<>=!. ]{0,6}",
    ) {
        let source: Vec<char> = PREDICATES[which].chars().collect();
        let at = at.index(source.len() + 1);
        let end = (at + cut).min(source.len());
        let mutated: String = source[..at]
            .iter()
            .chain(insert.chars().collect::<Vec<_>>().iter())
            .chain(source[end..].iter())
            .collect();
        if let Err(error) = Predicate::parse(&mutated) {
            prop_assert!(error.line >= 1 && error.column >= 1, "{error:?}");
            prop_assert!(!error.message.is_empty());
        }
    }

    #[test]
    fn oneids_parse_only_from_their_own_form(text in "o?[0-9a-fA-F]{0,20}|.{0,24}") {
        if let Ok(oneid) = text.parse::<OneId>() {
            prop_assert_eq!(oneid.to_string(), text.to_ascii_lowercase());
        }
    }

    #[test]
    fn rules_documents_validate_or_name_the_field(value in any_json()) {
        if let Ok(doc) = strict::from_json::<RulesDoc>(value.to_string().as_bytes()) {
            if let Err(error) = doc.validate() {
                prop_assert!(!error.field.is_empty() && !error.message.is_empty(), "{error:?}");
            }
        }
    }

    #[test]
    fn rules_documents_mutated_validate_or_name_the_field(doc in mutated(vec![valid_rules()])) {
        match strict::from_json::<RulesDoc>(doc.to_string().as_bytes()) {
            Ok(doc) => {
                if let Err(error) = doc.validate() {
                    prop_assert!(!error.field.is_empty() && !error.message.is_empty(), "{error:?}");
                }
            }
            // Unknown keys and wrong types are refused by the reader, as documented.
            Err(error) => prop_assert!(
                !error.message.is_empty() && error.field.as_ref().is_none_or(|f| !f.is_empty()),
                "{error:?}"
            ),
        }
    }
}

/// Valid predicates, mutated by the predicate properties.
const PREDICATES: [&str; 5] = [
    "points >= 100 and tier == \"gold\"",
    "has_tag(\"vip\") or not channel(\"douyin\")",
    "days_since(last_order_at) > 90 and order_count > 0",
    "attr.city == \"Hangzhou\" and spend_365d >= 1000.50",
    "has_identity(\"phone\") and (points < 5 or total_spend > 3)",
];

/// A valid rules document, mutated by the rules property.
fn valid_rules() -> Value {
    json!({
        "points": {"per_currency_unit": "1", "expire_after_days": 365,
                   "tier_multipliers": {"gold": "1.5"}, "channel_multipliers": {"douyin": "1.2"}},
        "tiers": {"window_days": 365, "retention_days": 365,
                  "levels": [{"name": "member", "min_spend": "0"}, {"name": "gold", "min_spend": "5000"}]},
        "tag_rules": [{"tag": "high_value", "when": "spend_365d >= 3000"}],
        "retention": {"dedup_days": 7, "ledger_days": 730},
    })
}

/// A valid identity policy, mutated by the policy property.
fn valid_policy() -> Value {
    json!({
        "kinds": {"member_card": {"max_per_profile": 1, "priority": 5},
                  "device_id": {"merge": false, "blocked_values": {"exact": ["0000"], "patterns": ["^dev-test"]}}},
        "blocked_values": {"exact": ["unknown", "N/A"], "patterns": ["^0+$", "(a+)+$"]},
    })
}

proptest! {
    #![proptest_config(config())]

    /// A policy either validates, and then matches any identity without panicking, or is
    /// refused naming its field.
    #[test]
    fn identity_policies_mutated_validate_or_name_the_field(
        doc in mutated(vec![valid_policy()]),
        kind in "[a-z_]{1,12}",
        value in ".{0,40}",
    ) {
        let Ok(doc) = strict::from_json::<IdentityDoc>(doc.to_string().as_bytes()) else {
            return Ok(());
        };
        match doc.validate() {
            Ok(policy) => {
                let _ = policy.block_list().blocks(&Identity { kind, value });
            }
            Err(error) => prop_assert!(error.field.starts_with("identity"), "{error:?}"),
        }
    }
}
