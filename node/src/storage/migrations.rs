//! The links of the migration chain ([`super::migrate::MIGRATIONS`]), one per state format
//! since [`super::OLDEST_MIGRATED_FORMAT`]: what each format changed, as a rewrite of the
//! stored bytes. Each reads only the bytes it is given (see `migrate`'s contract).

use super::migrate::Migration;
use oneid_protocol::num::Millis;
use oneid_state::command::{Command, SegmentDefine};
use oneid_state::keys;

/// Format 8: the shard record holds, after the clock, the target of the last clock entry
/// applied (the shard's majority time, see `oneid_replica::clocks`). A format-7 shard never
/// had one: its target is its clock. A segment definition no longer carries its proposer's
/// wall clock (the registry shard dates it). Other commands keep their encoding (a clock
/// entry's wall clock is read as its target).
pub const TO_8: Migration = Migration {
    from: 7,
    state_pair: |key, value| match key == keys::SHARD {
        true => vec![(key.to_vec(), record_with_target(value))],
        false => vec![(key.to_vec(), value.to_vec())],
    },
    command: define_without_date,
};

/// The variant number of `Command::DefineSegment` in format 7 (postcard: a one-byte varint).
const DEFINE_SEGMENT_7: u8 = 6;

/// A format-7 command, with a segment definition's trailing proposer date dropped.
fn define_without_date(command: &[u8]) -> Vec<u8> {
    let Some((&DEFINE_SEGMENT_7, define)) = command.split_first() else {
        return command.to_vec();
    };
    let (name, predicate, description, _proposed_at): (String, Option<String>, String, Millis) =
        postcard::from_bytes(define)
            .unwrap_or_else(|e| panic!("a format-7 segment definition does not decode: {e}"));
    Command::DefineSegment(SegmentDefine {
        name,
        predicate,
        description,
    })
    .encode()
}

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

    #[test]
    fn a_format_7_segment_definition_loses_its_proposer_date_and_other_commands_stay() {
        let at = Millis(1_767_225_600_000);
        let fields = (
            "vip".to_string(),
            Some("points > 1".to_string()),
            String::new(),
            at,
        );
        let old = [
            &[DEFINE_SEGMENT_7][..],
            &postcard::to_stdvec(&fields).unwrap(),
        ]
        .concat();
        let new = Command::DefineSegment(SegmentDefine {
            name: "vip".into(),
            predicate: Some("points > 1".into()),
            description: String::new(),
        });
        assert_eq!(
            new.encode()[0],
            DEFINE_SEGMENT_7,
            "the variant keeps its number"
        );
        assert_eq!(Command::decode(&(TO_8.command)(&old)).unwrap(), new);
        let deleted = ("vip".to_string(), None::<String>, String::new(), at);
        let old = [
            &[DEFINE_SEGMENT_7][..],
            &postcard::to_stdvec(&deleted).unwrap(),
        ]
        .concat();
        let Command::DefineSegment(define) = Command::decode(&(TO_8.command)(&old)).unwrap() else {
            panic!("a definition")
        };
        assert_eq!(define.predicate, None);
        for kept in [Command::Backfill, Command::FinishFollowUps(vec![])] {
            assert_eq!((TO_8.command)(&kept.encode()), kept.encode());
        }
    }
}
