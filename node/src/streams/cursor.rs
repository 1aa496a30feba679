//! Stream cursors: for each shard, the last offset of its change log a stream delivered.
//! Opaque to clients: `c1` and the offsets as hex of their postcard varints.

use oneid_protocol::event::EventError;
use oneid_protocol::ErrorCode;

/// A position in every shard's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub Vec<u64>);

const VERSION: &str = "c1";

impl Cursor {
    pub fn encode(&self) -> String {
        let bytes = postcard::to_stdvec(&self.0).expect("offsets encode");
        let mut text = String::with_capacity(VERSION.len() + 2 * bytes.len());
        text.push_str(VERSION);
        for byte in bytes {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// Reads a cursor this cluster (of `n_shards` shards) wrote.
    pub fn decode(text: &str, n_shards: u32) -> Result<Cursor, EventError> {
        let invalid = || {
            EventError::field(
                ErrorCode::InvalidCursor,
                "cursor",
                format!(
                    "{:?} is not a cursor of this cluster's streams",
                    text.chars().take(80).collect::<String>()
                ),
            )
        };
        let hex = text.strip_prefix(VERSION).ok_or_else(invalid)?;
        if hex.len() % 2 != 0 || hex.len() > 40 * n_shards as usize {
            return Err(invalid());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(hex.get(i..i + 2).ok_or_else(invalid)?, 16)
                    .map_err(|_| invalid())
            })
            .collect::<Result<Vec<u8>, EventError>>()?;
        let (offsets, rest): (Vec<u64>, &[u8]) =
            postcard::take_from_bytes(&bytes).map_err(|_| invalid())?;
        if !rest.is_empty() || offsets.len() != n_shards as usize {
            return Err(invalid());
        }
        Ok(Cursor(offsets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_text_is_refused() {
        let cursor = Cursor(vec![0, 1, 300, u64::MAX]);
        let text = cursor.encode();
        assert!(text.starts_with("c1"));
        assert_eq!(Cursor::decode(&text, 4), Ok(cursor));
        for bad in [
            "",
            "c1",
            "c1zz",
            "x104000000",
            &text[..text.len() - 1],
            &format!("{text}00"),
        ] {
            let error = Cursor::decode(bad, 4).unwrap_err();
            assert_eq!(
                (error.code, error.field.as_deref()),
                (ErrorCode::InvalidCursor, Some("cursor"))
            );
        }
        assert!(Cursor::decode(&text, 3).is_err(), "another shard count");
    }
}
