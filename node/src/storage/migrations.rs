//! The links of the migration chain ([`super::migrate::MIGRATIONS`]), one per state format
//! since [`super::OLDEST_MIGRATED_FORMAT`]: what each format changed, as a rewrite of the
//! stored bytes. Each reads only the bytes it is given (see `migrate`'s contract).

use super::migrate::Migration;
use oneid_protocol::ids::OneId;
use oneid_protocol::num::Millis;
use oneid_protocol::policy::IdentityPolicy;
use oneid_protocol::rules::Retention;
use oneid_state::command::{Command, SegmentDefine};
use oneid_state::keys;
use oneid_state::profile::Profile;
use std::collections::BTreeMap;

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

/// Format 10: the identity policy.
/// - Rules end with their identity policy: rules of format 9 (stored, and in the `SetRules`,
///   `SeedRules`, `DefineRules` and `InstallRules` commands, which all end with the rules)
///   get the default policy, as a rules document without `"identity"` does.
/// - The shard record ends with the binding epoch: 0, as no binding ever moved.
/// - Each follow-up record is listed under its profile (`q oneid kind 0x00 value seq`), so
///   that the profile's limits count the links still pending.
/// - Format 10 routes events otherwise (the rules version they were judged by, bindings with
///   their epoch) and applies them under the policy, so format-9 `Events` become
///   `LegacyEvents9`, which apply as they did (format-7 `LegacyEvents` keep their payload,
///   whose layout is the same).
pub const TO_10: Migration = Migration {
    from: 9,
    state_pair: |key, value| match key {
        keys::SHARD => vec![(key.to_vec(), [value, &[0]].concat())],
        keys::RULES => vec![(key.to_vec(), rules_with_policy(value))],
        _ if key.first() == keys::FOLLOW_UP_PREFIX.first() => {
            let record: FollowUpRecord11 = postcard::from_bytes(value)
                .unwrap_or_else(|e| panic!("a format-9 follow-up record does not decode: {e}"));
            let seq = keys::follow_up_seq(key);
            let pending = keys::pending_link(record.oneid, &record.identity, seq);
            vec![(key.to_vec(), value.to_vec()), (pending, Vec::new())]
        }
        _ => vec![(key.to_vec(), value.to_vec())],
    },
    command: command_to_10,
};

/// Format 11: what merges need.
/// - A profile ends with a write time per attribute and per manual tag (the profile's
///   `updated_at`, as nothing older recorded one), the time its OneID was minted (its
///   `created_at`, which no merge had moved), the OneIDs merged into it and the merge it takes
///   part in (none).
/// - New keys: tombstones (`x`), merge records (`j`), merge histories (`h`) and locks (`y`).
/// - A ledger record ends with the peer and the lot expiry of a merge entry (none).
/// - The shard record ends with the count of profiles locked by merges (0).
/// - Format 11 gives the attributes and tags an event writes their own times, so format-10
///   `Events` become `LegacyEvents10`, which date them as this migration does.
///
/// The profile is decoded as this release's [`Profile`], its format-11 fields appended as
/// their defaults: a later format that changes the fields before them must give this link a
/// decoder of its own.
pub const TO_11: Migration = Migration {
    from: 10,
    state_pair: |key, value| {
        let value = match key.first() {
            Some(b'p') => profile_to_11(value),
            Some(b'l') => [value, &[0, 0]].concat(),
            _ if key == keys::SHARD => [value, &[0]].concat(),
            _ => value.to_vec(),
        };
        vec![(key.to_vec(), value)]
    },
    command: |command| match command.split_first() {
        Some((&EVENTS_10, payload)) => [&[LEGACY_EVENTS_10_11], payload].concat(),
        _ => command.to_vec(),
    },
};

/// Format 12: unlink.
/// - A follow-up record ends with whether it unbinds (an `unlink`'s) rather than binds: no
///   record before did.
/// - New keys: unlinks (`u`). New commands (`Unbind`, after every format-11 variant) and a new
///   event type (`unlink`, after every format-11 one), which no format-11 log holds.
pub const TO_12: Migration = Migration {
    from: 11,
    state_pair: |key, value| {
        let value = if key.first() == keys::FOLLOW_UP_PREFIX.first() {
            [value, &[0]].concat()
        } else {
            value.to_vec()
        };
        vec![(key.to_vec(), value)]
    },
    command: <[u8]>::to_vec,
};

/// Format 13: what a merge carries more.
/// - The loser's unlinks: a new import step and part (`Unlinks`, after every format-12
///   variant of each), which no format-12 state or log holds.
/// - Removals of attributes and manual tags by events are remembered with their time (a
///   merge keeps the newer of a write and a removal), so format-12 `Events` and `Merge`
///   steps (which may apply a cause) become `LegacyEvents12` and `LegacyMerge12`, which
///   apply as they did. Stored state keeps its bytes: no format-12 profile remembers one.
pub const TO_13: Migration = Migration {
    from: 12,
    state_pair: |key, value| vec![(key.to_vec(), value.to_vec())],
    command: |command| match command.split_first() {
        Some((&EVENTS_12, payload)) => [&[LEGACY_EVENTS_12], payload].concat(),
        Some((&MERGE_12, payload)) => [&[LEGACY_MERGE_12], payload].concat(),
        _ => command.to_vec(),
    },
};

/// Format 12's `Events` and `Merge`, and format 13's `LegacyEvents12` and `LegacyMerge12`.
const EVENTS_12: u8 = 3;
const MERGE_12: u8 = 17;
const LEGACY_EVENTS_12: u8 = 19;
const LEGACY_MERGE_12: u8 = 20;

/// A follow-up record as formats 9 to 11 stored it (a bind: format 12 appends `unbind`).
#[derive(serde::Deserialize)]
struct FollowUpRecord11 {
    oneid: OneId,
    identity: oneid_protocol::ids::Identity,
    /// Read past, never used (postcard fields are positional).
    _at: Millis,
}

/// Format 10's `Events`, and format 11's `LegacyEvents10`.
const EVENTS_10: u8 = 3;
const LEGACY_EVENTS_10_11: u8 = 16;

/// A format-10 profile (postcard) as format 11 stores it.
fn profile_to_11(value: &[u8]) -> Vec<u8> {
    let defaults = postcard::to_stdvec(&(
        BTreeMap::<String, Millis>::new(),
        BTreeMap::<String, Millis>::new(),
        Millis(0),
        Vec::<OneId>::new(),
        None::<()>,
    ))
    .expect("defaults encode");
    let mut profile: Profile = postcard::from_bytes(&[value, &defaults].concat())
        .unwrap_or_else(|e| panic!("a format-10 profile does not decode: {e}"));
    profile.date_writes_at_update();
    profile.minted_at = profile.created_at;
    postcard::to_stdvec(&profile).expect("profiles encode")
}

/// Format 9's variant numbers of the commands format 10 changed.
const SET_RULES_9: u8 = 1;
const SEED_RULES_9: u8 = 2;
const EVENTS_9: u8 = 3;
const DEFINE_RULES_9: u8 = 13;
const INSTALL_RULES_9: u8 = 14;
/// Format 10's `LegacyEvents9`.
const LEGACY_EVENTS_9_10: u8 = 15;

/// A format-9 command as format 10 encodes it.
fn command_to_10(command: &[u8]) -> Vec<u8> {
    let Some((&variant, payload)) = command.split_first() else {
        return command.to_vec();
    };
    match variant {
        SET_RULES_9 | SEED_RULES_9 | DEFINE_RULES_9 | INSTALL_RULES_9 => {
            [&[variant], &rules_with_policy(payload)[..]].concat()
        }
        EVENTS_9 => [&[LEGACY_EVENTS_9_10], payload].concat(),
        _ => command.to_vec(),
    }
}

/// Format-9 rules (postcard), or anything ending with them, with the default identity policy
/// format 10 appends.
fn rules_with_policy(rules: &[u8]) -> Vec<u8> {
    let policy = postcard::to_stdvec(&IdentityPolicy::default()).expect("a policy encodes");
    [rules, &policy].concat()
}

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
    use oneid_protocol::ids::{Identity, OneId, ShardId};
    use oneid_protocol::rules::Rules;
    use oneid_state::command::{LegacyRouted, Target};
    use oneid_state::{FollowUpRecord, ShardRecord};

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
        let routed = vec![oneid_state::command::LegacyRouted {
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

    #[test]
    #[allow(clippy::too_many_lines)]
    fn format_9_rules_records_follow_ups_and_events_gain_what_format_10_adds() {
        // Rules, alone and at the end of every command that carries them: the default
        // policy appended.
        let rules = Rules {
            expire_after_days: 30,
            ..Rules::default()
        };
        let new = postcard::to_stdvec(&rules).unwrap();
        let policy = postcard::to_stdvec(&IdentityPolicy::default()).unwrap();
        let old = &new[..new.len() - policy.len()];
        assert_eq!(
            (TO_10.state_pair)(keys::RULES, old),
            vec![(keys::RULES.to_vec(), new.clone())]
        );
        let boxed = || Box::new(rules.clone());
        for command in [
            Command::SetRules(boxed()),
            Command::SeedRules(boxed()),
            Command::DefineRules(boxed()),
            Command::InstallRules {
                version: 300,
                rules: boxed(),
            },
        ] {
            let encoded = command.encode();
            let format_9 = &encoded[..encoded.len() - policy.len()];
            assert_eq!(
                Command::decode(&(TO_10.command)(format_9)).unwrap(),
                command
            );
        }
        // The shard record: epoch 0 appended.
        let record = ShardRecord {
            profile_seq: 4,
            follow_up_seq: 9,
            ..ShardRecord::default()
        };
        let new = postcard::to_stdvec(&record).unwrap();
        assert_eq!(
            (TO_10.state_pair)(keys::SHARD, &new[..new.len() - 1]),
            vec![(keys::SHARD.to_vec(), new)]
        );
        // A follow-up record is listed under its profile.
        let oneid = OneId::mint(ShardId(1), 3);
        let identity = Identity {
            kind: "email".into(),
            value: "a@x".into(),
        };
        let record = FollowUpRecord {
            oneid,
            identity: identity.clone(),
            at: Millis(5),
            unbind: false,
        };
        let new = postcard::to_stdvec(&record).unwrap();
        // Formats 9 to 11: format 12's without `unbind`.
        let value = new[..new.len() - 1].to_vec();
        assert_eq!(
            (TO_10.state_pair)(&keys::follow_up(9), &value),
            vec![
                (keys::follow_up(9), value.clone()),
                (keys::pending_link(oneid, &identity, 9), vec![])
            ]
        );
        // Format-9 events apply as they did; other commands keep their bytes.
        let event = oneid_protocol::event::Event::parse(
            &serde_json::value::to_raw_value(&serde_json::json!({"event_id": "e1",
                "type": "identify", "identities": {"phone": "unknown"}}))
            .unwrap(),
            Some(Millis(1)),
        )
        .unwrap();
        let routed = vec![LegacyRouted {
            event,
            target: Target::Claim,
            link_elsewhere: vec![identity],
            bound: vec![false],
        }];
        let format_9 = [&[EVENTS_9][..], &postcard::to_stdvec(&routed).unwrap()].concat();
        assert_eq!(
            Command::decode(&(TO_10.command)(&format_9)).unwrap(),
            Command::LegacyEvents9(routed)
        );
        assert_eq!(
            Command::LegacyEvents9(vec![]).encode()[0],
            LEGACY_EVENTS_9_10
        );
        for kept in [
            Command::Backfill,
            Command::FinishFollowUps(vec![]),
            Command::Clock { target: Millis(9) },
        ] {
            assert_eq!((TO_10.command)(&kept.encode()), kept.encode());
        }
    }

    #[test]
    fn format_10_profiles_ledger_records_and_events_gain_what_format_11_adds() {
        use oneid_protocol::predicate::Value;
        use oneid_state::{LedgerKind, LedgerRecord};
        let mut profile = Profile::new(OneId::mint(ShardId(2), 7), &Rules::default(), Millis(10));
        profile.updated_at = Millis(50);
        profile
            .attributes
            .insert("city".into(), Value::String("SH".into()));
        profile.manual_tags.insert("vip".into(), Some(Millis(90)));
        // Format 10's bytes: format 11's without the five fields it appends.
        let new = postcard::to_stdvec(&profile).unwrap();
        let old = &new[..new.len() - 5];
        let migrated = (TO_11.state_pair)(&keys::profile(profile.oneid), old);
        let expected = Profile {
            attribute_at: [("city".to_string(), Millis(50))].into(),
            manual_tag_at: [("vip".to_string(), Millis(50))].into(),
            minted_at: Millis(10),
            ..profile.clone()
        };
        assert_eq!(
            migrated,
            vec![(
                keys::profile(profile.oneid),
                postcard::to_stdvec(&expected).unwrap()
            )]
        );
        let record = LedgerRecord {
            event_id: "e".into(),
            kind: LedgerKind::Earn,
            points: 5,
            balance_after: 5,
            at: Millis(3),
            reason: None,
            shortfall: 0,
            peer: None,
            expires_at: None,
        };
        let new = postcard::to_stdvec(&record).unwrap();
        let key = keys::ledger(profile.oneid, 4);
        assert_eq!(
            (TO_11.state_pair)(&key, &new[..new.len() - 2]),
            vec![(key, new)]
        );
        // The shard record: no merge pending.
        let record = ShardRecord {
            binding_epoch: 3,
            ..ShardRecord::default()
        };
        let new = postcard::to_stdvec(&record).unwrap();
        assert_eq!(
            (TO_11.state_pair)(keys::SHARD, &new[..new.len() - 1]),
            vec![(keys::SHARD.to_vec(), new)]
        );
        // Format-10 events become LegacyEvents10; other commands keep their bytes.
        let events = Command::Events(vec![]).encode();
        assert_eq!(events[0], EVENTS_10);
        assert_eq!(
            Command::decode(&(TO_11.command)(&events)).unwrap(),
            Command::LegacyEvents10(vec![])
        );
        for kept in [Command::Backfill, Command::Clock { target: Millis(9) }] {
            assert_eq!((TO_11.command)(&kept.encode()), kept.encode());
        }
    }

    #[test]
    fn format_11_follow_up_records_are_binds() {
        let record = FollowUpRecord {
            oneid: OneId::mint(ShardId(1), 3),
            identity: Identity {
                kind: "email".into(),
                value: "a@x".into(),
            },
            at: Millis(5),
            unbind: false,
        };
        let new = postcard::to_stdvec(&record).unwrap();
        let key = keys::follow_up(9);
        assert_eq!(
            (TO_12.state_pair)(&key, &new[..new.len() - 1]),
            vec![(key, new)]
        );
        // Everything else keeps its bytes.
        let shard = postcard::to_stdvec(&ShardRecord::default()).unwrap();
        assert_eq!(
            (TO_12.state_pair)(keys::SHARD, &shard),
            vec![(keys::SHARD.to_vec(), shard)]
        );
        let events = Command::Events(vec![]).encode();
        assert_eq!((TO_12.command)(&events), events);
    }

    #[test]
    fn format_12_events_and_merge_steps_become_their_legacy_commands() {
        let event = oneid_protocol::event::Event::parse(
            &serde_json::value::to_raw_value(&serde_json::json!({"event_id": "e1",
                "type": "tag_remove", "identities": {"phone": "1"}, "tag": "vip"}))
            .unwrap(),
            Some(Millis(1_767_225_600_000)),
        )
        .unwrap();
        let routed = oneid_state::command::Routed {
            event,
            target: Target::Claim,
            rules_version: 1,
            link_elsewhere: vec![],
            found: vec![],
        };
        let step = oneid_state::command::MergeStep::Finish {
            merge: oneid_state::merge::MergeId(7),
        };
        let cases = [
            (
                Command::Events(vec![routed.clone()]),
                Command::LegacyEvents12(vec![routed]),
            ),
            (Command::Merge(step.clone()), Command::LegacyMerge12(step)),
        ];
        for (old, new) in cases {
            assert_eq!((TO_13.command)(&old.encode()), new.encode());
        }
        // Everything else keeps its bytes, state and commands.
        let unbind = Command::Unbind(vec![]).encode();
        assert_eq!((TO_13.command)(&unbind), unbind);
        let shard = postcard::to_stdvec(&ShardRecord::default()).unwrap();
        assert_eq!(
            (TO_13.state_pair)(keys::SHARD, &shard),
            vec![(keys::SHARD.to_vec(), shard)]
        );
    }
}
