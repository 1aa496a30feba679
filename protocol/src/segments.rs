//! Segments on the wire: the body of `PUT /v1/segments/{name}`, a segment's document, a page
//! of members and one change of a membership stream, with the limits of each.

use crate::event::EventError;
use crate::predicate::Predicate;
use crate::ErrorCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most segments a cluster holds; defining one more is refused (`segment_limit`).
pub const SEGMENTS_MAX: usize = 1_000;
/// Most bytes of a segment name (`[a-z0-9_-]{1,64}`).
pub const SEGMENT_NAME_BYTES_MAX: usize = 64;
/// Most bytes of a segment's description.
pub const SEGMENT_DESCRIPTION_BYTES_MAX: usize = 1_024;
/// Members per page when `limit` is not given.
pub const MEMBERS_PAGE_DEFAULT: usize = 100;
/// Most members one page holds (`limit` above it is clamped).
pub const MEMBERS_PAGE_MAX: usize = 1_000;

/// The body of `PUT /v1/segments/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SegmentPut {
    pub predicate: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// A segment definition, validated: what the node puts in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentSpec {
    pub name: String,
    pub predicate: Predicate,
    pub description: String,
}

/// `GET /v1/segments/{name}`, and the answer to a `PUT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SegmentDoc {
    pub name: String,
    pub predicate: String,
    pub description: String,
    /// Increases each time the predicate changes.
    pub generation: u64,
    pub created_at: String,
    pub updated_at: String,
    /// Members, over all shards.
    pub size: u64,
    pub backfill: BackfillView,
}

/// How far a segment's evaluation over the profiles that existed when it was defined got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BackfillView {
    /// `running` or `done`.
    pub state: String,
    pub profiles_done: u64,
    pub profiles_total: u64,
}

/// `GET /v1/segments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SegmentList {
    /// Sorted by name.
    pub segments: Vec<SegmentDoc>,
}

/// `GET /v1/segments/{name}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MembersPage {
    pub members: Vec<String>,
    /// The cursor of the next page; `null` on the last.
    pub next: Option<String>,
}

crate::open_enum! {
    /// Whether a profile entered or left a segment.
    pub enum ChangeKind {
        /// The profile now satisfies the segment's predicate.
        Enter = "enter",
        /// It no longer does (or the segment was deleted).
        Exit = "exit",
    }
}

/// One event of a membership stream (`data:` of the SSE event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SegmentChange {
    pub segment: String,
    pub generation: u64,
    pub oneid: String,
    pub change: ChangeKind,
    /// On the clock of the profile's shard.
    pub at: String,
    /// Where a stream resumes to get what follows this change; absent on snapshot entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// On an `exit` of a profile merged into another: that profile (which enters the segment
    /// by a change of its own if it was not a member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
}

/// The `data:` of a stream's `snapshot_end` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotEnd {
    pub segment: String,
    pub members: u64,
}

/// Whether `name` is a valid segment name.
pub fn valid_name(name: &str) -> bool {
    (1..=SEGMENT_NAME_BYTES_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Checks a segment name, with the error the API answers for a bad one.
pub fn check_name(name: &str) -> Result<(), EventError> {
    if valid_name(name) {
        return Ok(());
    }
    Err(EventError::field(
        ErrorCode::InvalidField,
        "name",
        format!(
            "a segment name is 1 to {SEGMENT_NAME_BYTES_MAX} of a-z, 0-9, _ and -, found {:?}",
            name.chars().take(80).collect::<String>()
        ),
    ))
}

impl SegmentPut {
    /// Validates the body for segment `name`: the name, the predicate (parsed and type-checked
    /// by the one parser tag rules use) and the description.
    pub fn validate(self, name: &str) -> Result<SegmentSpec, EventError> {
        check_name(name)?;
        let predicate = Predicate::parse(&self.predicate).map_err(|error| {
            EventError::field(ErrorCode::InvalidPredicate, "predicate", error.to_string())
        })?;
        let description = self.description.unwrap_or_default();
        if description.len() > SEGMENT_DESCRIPTION_BYTES_MAX {
            return Err(EventError::field(
                ErrorCode::InvalidField,
                "description",
                format!(
                    "description is {} bytes, more than {SEGMENT_DESCRIPTION_BYTES_MAX}",
                    description.len()
                ),
            ));
        }
        Ok(SegmentSpec {
            name: name.to_string(),
            predicate,
            description,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(predicate: &str, description: Option<&str>) -> SegmentPut {
        SegmentPut {
            predicate: predicate.into(),
            description: description.map(str::to_string),
        }
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "gold-coffee_30d", &"x".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "Gold", "a b", "a.b", "é", &"x".repeat(65)] {
            let error = check_name(bad).unwrap_err();
            assert_eq!(
                (error.code, error.field.as_deref()),
                (ErrorCode::InvalidField, Some("name"))
            );
        }
    }

    #[test]
    fn a_bad_predicate_names_line_and_column() {
        let error = put("points >\n  \"x\"", None).validate("s").unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidPredicate);
        assert_eq!(error.field.as_deref(), Some("predicate"));
        assert_eq!(
            error.message,
            "line 2, column 3: points compares with a number, found a string"
        );
    }

    #[test]
    fn descriptions_are_bounded() {
        let long = "d".repeat(SEGMENT_DESCRIPTION_BYTES_MAX + 1);
        let error = put("points > 1", Some(&long)).validate("s").unwrap_err();
        assert_eq!(error.field.as_deref(), Some("description"));
        let spec = put("points > 1", Some(&long[1..])).validate("s").unwrap();
        assert_eq!(spec.description.len(), SEGMENT_DESCRIPTION_BYTES_MAX);
        assert_eq!(
            put("points > 1", None).validate("s").unwrap().description,
            ""
        );
    }
}
