//! Reading request documents strictly: as the API's document describes them.
//!
//! The types accept what serde accepts: unknown fields (so that a client built today reads
//! the answers of a newer server), and a JSON array where a struct is expected (serde reads a
//! struct from a sequence of its fields). A node must refuse both in what it is sent — a
//! misspelt rule, or `"tiers": [null, null]` read as "the default tiers", would change the
//! cluster without a word. So [`from_json`] first checks the document's shape against the
//! JSON schema of its type (the same schema the OpenAPI document publishes): the JSON type
//! of every value, the fields an object may have and those it must, recursively, naming the
//! first field at fault. Values within their type (a pattern, a range, a predicate) are the
//! type's own validation's to judge, with its own messages.

use schemars::generate::SchemaSettings;
/// The schema a document type must have to be read strictly (derived with `schemars`).
pub use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a document was refused: the field at fault when there is one, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StrictError {
    /// The path of the field (`tiers.levels[0].min_spend`), when one is at fault.
    pub field: Option<String>,
    pub message: String,
}

impl StrictError {
    fn at(path: &str, message: String) -> StrictError {
        StrictError {
            field: (!path.is_empty()).then(|| path.to_string()),
            message,
        }
    }
}

/// Parses `json` as a `T` whose shape is what `T`'s schema says: no field `T` does not
/// have, none missing that it requires, and each of the JSON type it must be.
///
/// ```
/// use oneid_protocol::segments::SegmentPut;
/// use oneid_protocol::strict;
///
/// let error = strict::from_json::<SegmentPut>(br#"{"predicate": "points > 1", "descr": ""}"#)
///     .unwrap_err();
/// assert_eq!(error.field.as_deref(), Some("descr"));
/// ```
pub fn from_json<T: DeserializeOwned + JsonSchema>(json: &[u8]) -> Result<T, StrictError> {
    let syntax = |e: serde_json::Error| StrictError::at("", e.to_string());
    let value: Value = serde_json::from_slice(json).map_err(syntax)?;
    let schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>();
    let schema = schema.as_value();
    Shape { root: schema }.check(&value, schema, "")?;
    // From the text, not the value: decimals are read from their exact literal.
    serde_json::from_slice(json).map_err(syntax)
}

/// A schema's shape rules, checked against a value; `root` holds the `$defs` refs point to.
struct Shape<'s> {
    root: &'s Value,
}

impl<'s> Shape<'s> {
    fn check(&self, value: &Value, schema: &'s Value, path: &str) -> Result<(), StrictError> {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            self.check(value, self.resolve(reference), path)?;
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(branches) = schema.get(key).and_then(Value::as_array) {
                self.one_of(value, branches, path)?;
            }
        }
        if let Some(allowed) = schema.get("type") {
            check_type(value, allowed, path)?;
        }
        match value {
            Value::Object(fields) => self.fields(fields, schema, path),
            Value::Array(items) => match schema.get("items") {
                Some(item) => items
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, v)| self.check(v, item, &format!("{path}[{i}]"))),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    fn resolve(&self, reference: &str) -> &'s Value {
        reference
            .strip_prefix('#')
            .and_then(|pointer| self.root.pointer(pointer))
            .unwrap_or_else(|| panic!("the schema refers to {reference}, which it defines"))
    }

    /// Passes if any branch does; else the error of the first branch of the value's own
    /// JSON type (the one the sender most likely meant), or of the first branch.
    fn one_of(&self, value: &Value, branches: &'s [Value], path: &str) -> Result<(), StrictError> {
        let mut errors = Vec::with_capacity(branches.len());
        for branch in branches {
            match self.check(value, branch, path) {
                Ok(()) => return Ok(()),
                Err(error) => errors.push((self.declares(branch, value), error)),
            }
        }
        let first_own = errors.iter().position(|(own, _)| *own).unwrap_or(0);
        Err(errors.swap_remove(first_own).1)
    }

    /// Whether `schema` (through its refs) declares the JSON type of `value`.
    fn declares(&self, schema: &'s Value, value: &Value) -> bool {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            return self.declares(self.resolve(reference), value);
        }
        schema
            .get("type")
            .is_some_and(|allowed| check_type(value, allowed, "").is_ok())
    }

    fn fields(
        &self,
        fields: &serde_json::Map<String, Value>,
        schema: &'s Value,
        path: &str,
    ) -> Result<(), StrictError> {
        let field = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        };
        let properties = schema.get("properties").and_then(Value::as_object);
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = required.as_str().unwrap_or_default();
            if !fields.contains_key(name) {
                let at = field(name);
                return Err(StrictError::at(&at, format!("{at} is required")));
            }
        }
        for (name, value) in fields {
            let at = field(name);
            match (
                properties.and_then(|p| p.get(name)),
                schema.get("additionalProperties"),
            ) {
                (Some(property), _) => self.check(value, property, &at)?,
                (None, Some(Value::Bool(false))) => {
                    return Err(StrictError::at(
                        &at,
                        format!("{at} is not a field of this document"),
                    ))
                }
                (None, Some(other)) if other.is_object() => self.check(value, other, &at)?,
                (None, _) => {}
            }
        }
        Ok(())
    }
}

/// The JSON type names of `value` (an integer is a number too).
fn type_of(value: &Value) -> (&'static str, Option<&'static str>) {
    match value {
        Value::Null => ("null", None),
        Value::Bool(_) => ("boolean", None),
        Value::Number(n) if n.is_i64() || n.is_u64() => ("integer", Some("number")),
        Value::Number(_) => ("number", None),
        Value::String(_) => ("string", None),
        Value::Array(_) => ("array", None),
        Value::Object(_) => ("object", None),
    }
}

fn check_type(value: &Value, allowed: &Value, path: &str) -> Result<(), StrictError> {
    let allowed: Vec<&str> = match allowed {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let (own, wider) = type_of(value);
    if allowed.contains(&own) || wider.is_some_and(|w| allowed.contains(&w)) {
        return Ok(());
    }
    let what = if path.is_empty() { "the body" } else { path };
    Err(StrictError::at(
        path,
        format!("{what} must be {}, found {own}", allowed.join(" or ")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackupRequest;
    use crate::rules::RulesDoc;
    use crate::segments::SegmentPut;

    fn field_of<T: DeserializeOwned + JsonSchema>(json: &str) -> Option<String> {
        from_json::<T>(json.as_bytes()).err().and_then(|e| e.field)
    }

    #[test]
    fn unknown_missing_and_mistyped_fields_are_refused_by_their_path() {
        assert_eq!(
            field_of::<RulesDoc>(r#"{"points": {"per_currency_unt": "1"}}"#).as_deref(),
            Some("points.per_currency_unt")
        );
        assert_eq!(
            field_of::<SegmentPut>(r#"{"predicate": "points > 1", "descr": ""}"#).as_deref(),
            Some("descr")
        );
        assert_eq!(field_of::<SegmentPut>("{}").as_deref(), Some("predicate"));
        assert_eq!(
            field_of::<SegmentPut>(r#"{"predicate": 1}"#).as_deref(),
            Some("predicate")
        );
        // Serde alone reads a struct from an array of its fields: refused here.
        let error = from_json::<RulesDoc>(br#"{"tiers": [null, null]}"#).unwrap_err();
        assert_eq!(
            (error.field.as_deref(), error.message.as_str()),
            (Some("tiers"), "tiers must be object, found array")
        );
        assert_eq!(field_of::<SegmentPut>(r#"["points > 1", "d"]"#), None);
        assert!(from_json::<BackupRequest>(br#"["d"]"#).is_err());
        assert_eq!(
            field_of::<RulesDoc>(
                r#"{"tiers": {"levels": [{"name": "m", "min_spend": "0"}, {"name": "g"}]}}"#
            )
            .as_deref(),
            Some("tiers.levels[1].min_spend")
        );
        assert_eq!(
            field_of::<RulesDoc>(r#"{"points": {"tier_multipliers": {"gold": [2]}}}"#).as_deref(),
            Some("points.tier_multipliers.gold")
        );
        assert!(from_json::<SegmentPut>(br#"{"predicate": "a"} x"#).is_err());
    }

    #[test]
    fn documents_of_the_right_shape_parse_exactly() {
        let put = from_json::<SegmentPut>(br#"{"predicate": "points > 1", "description": null}"#)
            .unwrap();
        assert_eq!(
            (put.predicate.as_str(), put.description),
            ("points > 1", None)
        );
        let rules = from_json::<RulesDoc>(
            br#"{"points": {"per_currency_unit": 0.1000000000000000000000000001, "tier_multipliers": {"gold": "2"}},
                 "tiers": {"levels": [{"name": "member", "min_spend": 0}]}, "retention": null}"#,
        )
        .unwrap();
        assert_eq!(
            rules
                .points
                .per_currency_unit
                .map(|raw| raw.get().to_string()),
            Some("0.1000000000000000000000000001".to_string())
        );
        assert_eq!(
            from_json::<BackupRequest>(br#"{"dir": "a/b"}"#)
                .unwrap()
                .dir
                .as_deref(),
            Some("a/b")
        );
    }
}
