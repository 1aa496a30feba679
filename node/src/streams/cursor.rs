//! Stream cursors: for each shard, the last offset of its change log a stream delivered, and
//! what those offsets are offsets of. Opaque to clients: `c2` and, as hex, the postcard of the
//! cluster id, the restore epoch, the state format and the offsets.
//!
//! Offsets mean something only in the change logs they were read from: those of one cluster
//! (its id), since its data was last restored from a backup (the restore epoch: a restored
//! cluster's logs go back to the backup's offsets and then take other changes), in a state
//! format whose change log this release reads. A cursor of another cluster is refused as
//! invalid; one of another restore epoch, of a format this release no longer reads, or of the
//! first version (`c1`, which named none of this), has expired: its client starts again from
//! a snapshot. Nothing is ever skipped silently.

use oneid_protocol::event::EventError;
use oneid_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

/// A position in every shard's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub Vec<u64>);

/// What the offsets of this node's cursors are offsets of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// The cluster id (`ClusterRecord::id`).
    pub cluster: u128,
    /// The restore epoch: random, drawn by each restore; 0 for data never restored.
    pub epoch: u64,
    /// The state format of the node that issued the cursor.
    pub format: u32,
}

/// The oldest state format whose change-log offsets this release keeps: its cursors still
/// resume (a migration that renumbers the log raises it).
pub const CURSOR_FORMAT_OLDEST: u32 = 7;

const VERSION: &str = "c2";
/// The first version: offsets only.
const VERSION_1: &str = "c1";

#[derive(Serialize, Deserialize)]
struct Encoded {
    scope: Scope,
    offsets: Vec<u64>,
}

impl Cursor {
    pub fn encode(&self, scope: Scope) -> String {
        let bytes = postcard::to_stdvec(&Encoded {
            scope,
            offsets: self.0.clone(),
        })
        .expect("cursors encode");
        let mut text = String::with_capacity(VERSION.len() + 2 * bytes.len());
        text.push_str(VERSION);
        for byte in bytes {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// Reads a cursor this cluster (of `n_shards` shards) wrote, in `scope`.
    pub fn decode(text: &str, n_shards: u32, scope: Scope) -> Result<Cursor, EventError> {
        let invalid = |why: &str| {
            EventError::field(
                ErrorCode::InvalidCursor,
                "cursor",
                format!(
                    "{:?} is not a cursor of this cluster's streams{why}",
                    text.chars().take(80).collect::<String>()
                ),
            )
        };
        let expired = |why: String| {
            EventError::field(
                ErrorCode::CursorExpired,
                "cursor",
                format!("{why}: start again with snapshot=true"),
            )
        };
        // Offsets take at most 10 bytes each; the scope at most 40.
        let limit = 2 * (40 + 10 * n_shards as usize + 5);
        let (version, hex) = text.split_at_checked(2).ok_or_else(|| invalid(""))?;
        if hex.len() % 2 != 0 || hex.len() > limit {
            return Err(invalid(""));
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(hex.get(i..i + 2).ok_or_else(|| invalid(""))?, 16)
                    .map_err(|_| invalid(""))
            })
            .collect::<Result<Vec<u8>, EventError>>()?;
        let whole =
            |offsets: &[u64], rest: &[u8]| rest.is_empty() && offsets.len() == n_shards as usize;
        match version {
            VERSION_1 => match postcard::take_from_bytes::<Vec<u64>>(&bytes) {
                Ok((offsets, rest)) if whole(&offsets, rest) => Err(expired(
                    "the cursor was issued before cursors named their cluster and its restores"
                        .into(),
                )),
                _ => Err(invalid("")),
            },
            VERSION => {
                let (encoded, rest): (Encoded, &[u8]) =
                    postcard::take_from_bytes(&bytes).map_err(|_| invalid(""))?;
                if !whole(&encoded.offsets, rest) {
                    return Err(invalid(""));
                }
                let theirs = encoded.scope;
                if theirs.cluster != scope.cluster {
                    return Err(invalid(" (it is another cluster's)"));
                }
                if !(CURSOR_FORMAT_OLDEST..=scope.format).contains(&theirs.format) {
                    return Err(expired(format!(
                        "the cursor is of state format {}, whose change log this node (format {}) no longer reads",
                        theirs.format, scope.format
                    )));
                }
                if theirs.epoch != scope.epoch {
                    return Err(expired(
                        "the cursor was issued before this cluster's data was restored from a backup"
                            .into(),
                    ));
                }
                Ok(Cursor(encoded.offsets))
            }
            _ => Err(invalid("")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any text, or a valid cursor with a character changed, is a cursor or a refusal
        /// naming `cursor` (`invalid_cursor`, or `cursor_expired`).
        #[test]
        fn cursors_decode_or_are_refused_as_documented(
            text in "c[12][0-9a-f]{0,80}|.{0,60}",
            offsets in prop::collection::vec(any::<u64>(), 4),
            at in any::<prop::sample::Index>(),
            with in "[0-9a-fz]",
        ) {
            let mut valid = Cursor(offsets).encode(SCOPE);
            let at = at.index(valid.len());
            valid.replace_range(at..=at, &with);
            for text in [text, valid] {
                if let Err(error) = Cursor::decode(&text, 4, SCOPE) {
                    prop_assert!(
                        [ErrorCode::InvalidCursor, ErrorCode::CursorExpired].contains(&error.code),
                        "{error:?}"
                    );
                    prop_assert_eq!(error.field.as_deref(), Some("cursor"));
                }
            }
        }
    }

    const SCOPE: Scope = Scope {
        cluster: 0x1234_5678_9abc_def0_1234_5678_9abc_def0,
        epoch: 0,
        format: 8,
    };

    fn refusal(text: &str, scope: Scope) -> (ErrorCode, String) {
        let error = Cursor::decode(text, 4, scope).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("cursor"));
        (error.code, error.message)
    }

    #[test]
    fn cursors_round_trip_and_foreign_text_is_refused() {
        let cursor = Cursor(vec![0, 1, 300, u64::MAX]);
        let text = cursor.encode(SCOPE);
        assert!(text.starts_with("c2"));
        assert_eq!(Cursor::decode(&text, 4, SCOPE), Ok(cursor));
        for bad in [
            "",
            "c",
            "c2",
            "c2zz",
            "x104000000",
            "c1zz",
            "ü2",
            &text[..text.len() - 1],
            &text[..text.len() - 2],
            &format!("{text}00"),
        ] {
            assert_eq!(refusal(bad, SCOPE).0, ErrorCode::InvalidCursor, "{bad}");
        }
        assert!(
            Cursor::decode(&text, 3, SCOPE).is_err(),
            "another shard count"
        );
    }

    #[test]
    fn a_cursor_of_another_cluster_is_invalid_one_of_another_epoch_or_format_expired() {
        let text = Cursor(vec![5; 4]).encode(SCOPE);
        let other = Scope {
            cluster: 7,
            ..SCOPE
        };
        let (code, message) = refusal(&text, other);
        assert_eq!(code, ErrorCode::InvalidCursor);
        assert!(message.contains("another cluster's"), "{message}");
        // Restored from a backup since: the offsets may name other changes now.
        let restored = Scope { epoch: 99, ..SCOPE };
        let (code, message) = refusal(&text, restored);
        assert_eq!(code, ErrorCode::CursorExpired);
        assert!(message.contains("restored from a backup"), "{message}");
        // Issued at a format this node no longer reads (or a newer one).
        for format in [CURSOR_FORMAT_OLDEST - 1, SCOPE.format + 1] {
            let theirs = Cursor(vec![5; 4]).encode(Scope { format, ..SCOPE });
            let (code, message) = refusal(&theirs, SCOPE);
            assert_eq!(code, ErrorCode::CursorExpired);
            assert!(message.contains("no longer reads"), "{message}");
        }
        // A first-version cursor (offsets only) names nothing to check: expired.
        let v1 = "c104000102fd01";
        let (code, message) = refusal(v1, SCOPE);
        assert_eq!(code, ErrorCode::CursorExpired);
        assert!(
            message.contains("before cursors named their cluster"),
            "{message}"
        );
    }
}
