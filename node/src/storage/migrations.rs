//! The links of the migration chain ([`super::migrate::MIGRATIONS`]), one per state format
//! since [`super::OLDEST_MIGRATED_FORMAT`]: what each format changed, as a rewrite of the
//! stored bytes. Each reads only the bytes it is given (see `migrate`'s contract).

use super::migrate::Migration;
use oneid_protocol::num::Millis;
use oneid_state::keys;

/// Format 8: the shard record holds, after the clock, the target of the last clock entry
/// applied (the shard's majority time, see `oneid_replica::clocks`). A format-7 shard never
/// had one: its target is its clock. Commands keep their encoding (a clock entry's wall clock
/// is read as its target).
pub const TO_8: Migration = Migration {
    from: 7,
    state_pair: |key, value| match key == keys::SHARD {
        true => vec![(key.to_vec(), record_with_target(value))],
        false => vec![(key.to_vec(), value.to_vec())],
    },
    command: <[u8]>::to_vec,
};

/// A format-7 shard record with its clock repeated as the target that follows it.
fn record_with_target(record: &[u8]) -> Vec<u8> {
    let (clock, rest): (Millis, &[u8]) = postcard::take_from_bytes(record)
        .unwrap_or_else(|e| panic!("a format-7 shard record does not decode: {e}"));
    let clock = postcard::to_stdvec(&clock).expect("clocks encode");
    [&clock, &clock, rest].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneid_state::ShardRecord;

    #[test]
    fn a_format_7_shard_record_gets_its_clock_as_its_target() {
        let record = ShardRecord {
            clock: Millis(1_767_225_600_000),
            target: Millis(1_767_225_600_000),
            profile_seq: 12,
            queue_seq: 300,
            change_seq: 7,
            ..ShardRecord::default()
        };
        let new = postcard::to_stdvec(&record).expect("encodes");
        // Format 7 had no target: the same bytes without its varint.
        let clock_bytes = postcard::to_stdvec(&record.clock).expect("encodes").len();
        let old = [&new[..clock_bytes], &new[2 * clock_bytes..]].concat();
        let pairs = (TO_8.state_pair)(keys::SHARD, &old);
        assert_eq!(pairs, vec![(keys::SHARD.to_vec(), new)]);
        let other = (TO_8.state_pair)(b"p/1", b"kept");
        assert_eq!(other, vec![(b"p/1".to_vec(), b"kept".to_vec())]);
    }
}
