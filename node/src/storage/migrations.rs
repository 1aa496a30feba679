//! The links of the migration chain ([`super::migrate::MIGRATIONS`]), one per state format
//! since [`super::OLDEST_MIGRATED_FORMAT`]: what each format changed, as a rewrite of the
//! stored bytes. Each reads only the bytes it is given (see `migrate`'s contract).

use super::migrate::Migration;
use oneid_protocol::num::Millis;
use oneid_protocol::rules::Retention;
use oneid_state::command::{Command, SegmentDefine};
use oneid_state::keys;

/// Format 8: time from a majority, retention in the rules.
/// - The shard record holds, after the clock, the target of the last clock entry applied
///   (the shard's majority time, see `oneid_replica::clocks`). A format-7 shard never had
///   one: its target is its clock.
/// - The rules end with their retention: format-7 rules (stored, and in `SetRules` and
///   `SeedRules` commands) have none, which their leaders seed from `cluster.toml` after
///   the upgrade (`Command::SeedRetention`), never this migration.
/// - Format 8 applies clock entries, events and segment definitions otherwise than format 7
///   did (a bounded step, a bound on `ts`, the registry's date), so the format-7 ones in the
///   log become `LegacyClock`, `LegacyEvents` and `LegacyDefineSegment`, which apply as they
///   did: a replica that applies one after the upgrade ends where one that applied it before
///   and was migrated ends (the contract in `migrate`).
pub const TO_8: Migration = Migration {
    from: 7,
    state_pair: |key, value| {
        let value = match key {
            keys::SHARD => record_with_target(value),
            keys::RULES => rules_without_retention(value),
            _ => value.to_vec(),
        };
        vec![(key.to_vec(), value)]
    },
    command: command_to_8,
};

/// Format 9: versioned rules. Format 9 adds commands (`DefineRules`, `InstallRules`, after
/// every format-8 variant) and a state key (`v`, the rules' version; absent reads as 0), and
/// encodes and applies every format-8 command and pair as format 8 did: nothing is rewritten.
/// The format moves so that an older release refuses a directory whose log may hold commands
/// it cannot decode, rather than stopping on one.
pub const TO_9: Migration = Migration {
    from: 8,
    state_pair: |key, value| vec![(key.to_vec(), value.to_vec())],
    command: <[u8]>::to_vec,
};

/// Format 7's variant numbers of the commands format 8 changed (postcard: one-byte varints).
const CLOCK_7: u8 = 0;
const SET_RULES_7: u8 = 1;
const SEED_RULES_7: u8 = 2;
const EVENTS_7: u8 = 3;
const DEFINE_SEGMENT_7: u8 = 6;

/// A format-7 command as format 8 encodes it.
fn command_to_8(command: &[u8]) -> Vec<u8> {
    let Some((&variant, payload)) = command.split_first() else {
        return command.to_vec();
    };
    let decode_failed = |e: postcard::Error| -> ! {
        panic!("a format-7 command (variant {variant}) does not decode: {e}")
    };
    match variant {
        CLOCK_7 => {
            let (now, retention): (Millis, Retention) =
                postcard::from_bytes(payload).unwrap_or_else(|e| decode_failed(e));
            Command::LegacyClock { now, retention }.encode()
        }
        SET_RULES_7 | SEED_RULES_7 => [&[variant], &rules_without_retention(payload)[..]].concat(),
        EVENTS_7 => {
            let events = postcard::from_bytes(payload).unwrap_or_else(|e| decode_failed(e));
            Command::LegacyEvents(events).encode()
        }
        DEFINE_SEGMENT_7 => {
            let (name, predicate, description, at): (String, Option<String>, String, Millis) =
                postcard::from_bytes(payload).unwrap_or_else(|e| decode_failed(e));
            let define = SegmentDefine {
                name,
                predicate,
                description,
            };
            Command::LegacyDefineSegment(define, at).encode()
        }
        _ => command.to_vec(),
    }
}

/// Format-7 rules (postcard) with the retention format 8 appends, none.
fn rules_without_retention(rules: &[u8]) -> Vec<u8> {
    let none = postcard::to_stdvec(&None::<Retention>).expect("an option encodes");
    [rules, &none].concat()
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
    use oneid_protocol::rules::Rules;
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

    /// A format-7 command: its variant number, then `payload` (postcard).
    fn command_7(variant: u8, payload: &impl serde::Serialize) -> Vec<u8> {
        [&[variant][..], &postcard::to_stdvec(payload).unwrap()].concat()
    }

    #[test]
    fn format_7_clock_entries_events_and_definitions_become_their_legacy_commands() {
        let at = Millis(1_767_225_600_000);
        let fields = (
            "vip".to_string(),
            Some("points > 1".to_string()),
            String::new(),
            at,
        );
        let define = SegmentDefine {
            name: "vip".into(),
            predicate: Some("points > 1".into()),
            description: String::new(),
        };
        let migrated = (TO_8.command)(&command_7(DEFINE_SEGMENT_7, &fields));
        let legacy = Command::LegacyDefineSegment(define.clone(), at);
        assert_eq!(Command::decode(&migrated).unwrap(), legacy);
        // The variants format 8 kept have the numbers format 7 gave them.
        assert_eq!(Command::DefineSegment(define).encode()[0], DEFINE_SEGMENT_7);
        assert_eq!(Command::Clock { target: at }.encode()[0], CLOCK_7);
        assert_eq!(Command::Events(vec![]).encode()[0], EVENTS_7);

        let retention = Retention {
            dedup_days: 7,
            ledger_days: 730,
            change_log_hours: 72,
            change_log_entries_max: 9,
        };
        let clock = command_7(CLOCK_7, &(at, (7u32, 730u32, 72u32, 9u64)));
        let migrated = Command::decode(&(TO_8.command)(&clock)).unwrap();
        assert_eq!(migrated, Command::LegacyClock { now: at, retention });

        let event = oneid_protocol::event::Event::parse(
            &serde_json::value::to_raw_value(&serde_json::json!({"event_id": "e1",
                "type": "points_earn", "identities": {"phone": "1"}, "points": 5}))
            .unwrap(),
            Some(at),
        )
        .unwrap();
        let routed = vec![oneid_state::command::Routed {
            event,
            target: oneid_state::command::Target::Claim,
            link_elsewhere: vec![],
            bound: vec![true],
        }];
        let migrated = (TO_8.command)(&command_7(EVENTS_7, &routed));
        assert_eq!(
            Command::decode(&migrated).unwrap(),
            Command::LegacyEvents(routed)
        );
        for kept in [Command::Backfill, Command::FinishFollowUps(vec![])] {
            assert_eq!((TO_8.command)(&kept.encode()), kept.encode());
        }
    }

    #[test]
    fn format_7_rules_have_no_retention() {
        // Format-7 rules: format 8's without their last field.
        let mut rules = Rules::default();
        rules.tag_rules.clear();
        rules.retention = None;
        let new = postcard::to_stdvec(&rules).unwrap();
        let old = &new[..new.len() - 1];
        for (variant, command) in [
            (SET_RULES_7, Command::SetRules(Box::new(rules.clone()))),
            (SEED_RULES_7, Command::SeedRules(Box::new(rules.clone()))),
        ] {
            let bytes = [&[variant][..], old].concat();
            assert_eq!(Command::decode(&(TO_8.command)(&bytes)).unwrap(), command);
            assert_eq!(command.encode()[0], variant);
        }
        let pairs = (TO_8.state_pair)(keys::RULES, old);
        assert_eq!(pairs, vec![(keys::RULES.to_vec(), new)]);
    }
}
