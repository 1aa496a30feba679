//! Reading request documents strictly: a field the document's type does not have is refused,
//! naming it, rather than ignored.
//!
//! The types themselves accept unknown fields (so that a client built today reads the answers
//! of a newer server); the node reads what it is sent through [`from_json`], so that a
//! misspelt rule, segment or backup field cannot go unnoticed.

use serde::de::DeserializeOwned;

/// Why a document was refused: the field at fault when there is one, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StrictError {
    /// The path of the field (`points.per_currency_unit`), when one is at fault.
    pub field: Option<String>,
    pub message: String,
}

/// Parses `json` as a `T`, refusing any field `T` does not have (the first, in document order).
pub fn from_json<T: DeserializeOwned>(json: &[u8]) -> Result<T, StrictError> {
    let mut unknown = None;
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let value: T = serde_ignored::deserialize(&mut deserializer, |path| {
        unknown.get_or_insert_with(|| path.to_string());
    })
    .and_then(|value| deserializer.end().map(|()| value))
    .map_err(|e| StrictError {
        field: None,
        message: e.to_string(),
    })?;
    match unknown {
        None => Ok(value),
        Some(field) => Err(StrictError {
            message: format!("{field} is not a field of this document"),
            field: Some(field),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RulesDoc;
    use crate::segments::SegmentPut;

    #[test]
    fn an_unknown_field_is_refused_by_its_path_and_known_ones_parse() {
        let error = from_json::<RulesDoc>(br#"{"points": {"per_currency_unt": "1"}}"#).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("points.per_currency_unt"));
        let error =
            from_json::<SegmentPut>(br#"{"predicate": "points > 1", "descr": ""}"#).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("descr"));
        let put = from_json::<SegmentPut>(br#"{"predicate": "points > 1"}"#).unwrap();
        assert_eq!(put.predicate, "points > 1");
        let error = from_json::<SegmentPut>(br#"{"predicate": 1}"#).unwrap_err();
        assert_eq!(error.field, None);
        assert!(from_json::<SegmentPut>(br#"{"predicate": "a"} x"#).is_err());
    }
}
