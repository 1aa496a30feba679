//! Key layout of a shard's state keyspace. One byte of prefix per record kind, then
//! big-endian integers so that byte order is numeric order.
//!
//! | prefix | key                                   | value          |
//! |--------|---------------------------------------|----------------|
//! | `m`    | `m`                                   | `ShardMeta` (not in the digest) |
//! | `s`    | `s`                                   | `ShardRecord`  |
//! | `r`    | `r`                                   | `Rules`        |
//! | `v`    | `v`                                   | the rules' version (`u64`; absent: 0, rules never versioned) |
//! | `p`    | `p oneid`                             | `Profile`      |
//! | `i`    | `i kind 0x00 value`                   | `OneId`        |
//! | `o`    | `o oneid order_id`                    | `OrderRecord`  |
//! | `l`    | `l oneid seq`                         | `LedgerRecord` |
//! | `d`    | `d oneid event_id`                    | `DedupRecord`  |
//! | `e`    | `e clock_ms seq`                      | dedup keys one entry wrote (eviction order) |
//! | `f`    | `f seq`                               | `FollowUpRecord` (a bind, or an unbind of an unlinked identity) |
//! | `q`    | `q oneid kind 0x00 value seq`         | nothing (follow-up `seq` binds this identity to the profile: what the profile's limits count as pending) |
//! | `t`    | `t due_ms oneid kind detail`          | nothing (the due-time index) |
//! | `g`    | `g clock_ms seq`                      | ledger keys one entry wrote (eviction order) |
//! | `c`    | `c name`                              | `SegmentRecord` (a segment as this shard holds it) |
//! | `n`    | `n name 0x00 oneid`                   | nothing (a member of the segment) |
//! | `k`    | `k offset`                            | `Vec<ChangeRecord>` (the membership change log: one command's changes from this offset on) |
//! | `x`    | `x oneid`                             | `Tombstone` (a OneID merged into another) |
//! | `j`    | `j merge`                             | `MergeRecord` (a merge whose survivor is on this shard) |
//! | `h`    | `h oneid merge`                       | nothing (a merge `oneid` survived: its history) |
//! | `y`    | `y oneid`                             | `(MergeId, Millis)` (the profile is locked by that merge since that shard clock: what the leader's sweep finds) |
//! | `u`    | `u oneid kind 0x00 value`             | `UnlinkRecord` (an `unlink` removed the identity from the profile: when, and whether its binding is still being removed) |

use crate::merge::MergeId;
use oneid_protocol::ids::{Identity, OneId};
use oneid_protocol::num::Millis;

pub const META: &[u8] = b"m";
pub const SHARD: &[u8] = b"s";
pub const RULES: &[u8] = b"r";
pub const RULES_VERSION: &[u8] = b"v";

pub fn profile(oneid: OneId) -> Vec<u8> {
    with_oneid(b'p', oneid, &[])
}

pub fn identity(identity: &Identity) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + identity.kind.len() + identity.value.len());
    key.push(b'i');
    key.extend_from_slice(identity.kind.as_bytes());
    key.push(0);
    key.extend_from_slice(identity.value.as_bytes());
    key
}

pub fn order(oneid: OneId, order_id: &str) -> Vec<u8> {
    with_oneid(b'o', oneid, order_id.as_bytes())
}

pub fn orders_prefix(oneid: OneId) -> Vec<u8> {
    with_oneid(b'o', oneid, &[])
}

/// The order id under which a survivor keeps a loser's order of an id it holds itself: the id,
/// 0x00 and the loser (an order id holds no control character, so no order of a client's has
/// it). Refunds name the survivor's; its window exit finds this one by it.
pub fn twin_order_id(order_id: &str, loser: OneId) -> String {
    format!("{order_id}\u{0}{loser}")
}

/// The order id at the end of an order key of `oneid`.
pub fn order_id(key: &[u8]) -> String {
    String::from_utf8(key[9..].to_vec()).expect("order keys end in UTF-8 ids")
}

pub fn dedup_prefix(oneid: OneId) -> Vec<u8> {
    with_oneid(b'd', oneid, &[])
}

/// The event id at the end of a dedup key.
pub fn dedup_event_id(key: &[u8]) -> String {
    String::from_utf8(key[9..].to_vec()).expect("dedup keys end in UTF-8 ids")
}

pub const LOCK_PREFIX: &[u8] = b"y";

pub fn lock(oneid: OneId) -> Vec<u8> {
    with_oneid(b'y', oneid, &[])
}

/// The profile of a lock key.
pub fn locked_oneid(key: &[u8]) -> OneId {
    OneId(u64::from_be_bytes(
        key[1..9].try_into().expect("lock keys hold a OneID"),
    ))
}

pub fn tombstone(oneid: OneId) -> Vec<u8> {
    with_oneid(b'x', oneid, &[])
}

pub fn merge(merge: MergeId) -> Vec<u8> {
    let mut key = vec![b'j'];
    key.extend_from_slice(&merge.0.to_be_bytes());
    key
}

/// The history key of a merge `oneid` survived.
pub fn merged(oneid: OneId, merge: MergeId) -> Vec<u8> {
    with_oneid(b'h', oneid, &merge.0.to_be_bytes())
}

pub fn merged_prefix(oneid: OneId) -> Vec<u8> {
    with_oneid(b'h', oneid, &[])
}

/// The merge of a history key.
pub fn merged_id(key: &[u8]) -> MergeId {
    MergeId(u128::from_be_bytes(
        key[9..25]
            .try_into()
            .expect("history keys end in a merge id"),
    ))
}

pub fn ledger(oneid: OneId, seq: u64) -> Vec<u8> {
    with_oneid(b'l', oneid, &seq.to_be_bytes())
}

pub fn ledger_prefix(oneid: OneId) -> Vec<u8> {
    with_oneid(b'l', oneid, &[])
}

/// The sequence number at the end of a ledger key.
pub fn ledger_seq(key: &[u8]) -> u64 {
    let tail: [u8; 8] = key[key.len() - 8..]
        .try_into()
        .expect("ledger keys end in 8 bytes");
    u64::from_be_bytes(tail)
}

pub fn dedup(oneid: OneId, event_id: &str) -> Vec<u8> {
    with_oneid(b'd', oneid, event_id.as_bytes())
}

pub const DEDUP_EVICTION_PREFIX: &[u8] = b"e";
pub const LEDGER_EVICTION_PREFIX: &[u8] = b"g";

/// `prefix | clock_ms | seq`: one record of a retention queue (dedup or ledger), holding the
/// keys one log entry wrote at that clock; `seq` orders the entries of one clock.
pub fn retention_group(prefix: &[u8], clock: Millis, seq: u64) -> Vec<u8> {
    let mut key = time_bound(prefix, clock);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub const FOLLOW_UP_PREFIX: &[u8] = b"f";

pub fn follow_up(seq: u64) -> Vec<u8> {
    let mut key = FOLLOW_UP_PREFIX.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The key that lists follow-up `seq`, which binds `identity` to `oneid`, under its profile.
pub fn pending_link(oneid: OneId, linked: &Identity, seq: u64) -> Vec<u8> {
    let mut key = pending_links_prefix(oneid);
    key.extend_from_slice(&identity(linked)[1..]);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The keys of a profile's pending links.
pub fn pending_links_prefix(oneid: OneId) -> Vec<u8> {
    with_oneid(b'q', oneid, &[])
}

/// The identity of an identity key.
pub fn identity_in(key: &[u8]) -> Identity {
    identity_of(&key[1..])
}

/// The identity of a pending-link key.
pub fn pending_link_identity(key: &[u8]) -> Identity {
    identity_of(&key[9..key.len() - 8])
}

/// The key of `unlinked`'s unlink from `oneid`.
pub fn unlinked(oneid: OneId, unlinked: &Identity) -> Vec<u8> {
    with_oneid(b'u', oneid, &identity(unlinked)[1..])
}

/// The keys of a profile's unlinks.
pub fn unlinked_prefix(oneid: OneId) -> Vec<u8> {
    with_oneid(b'u', oneid, &[])
}

/// The identity of an unlink key.
pub fn unlinked_identity(key: &[u8]) -> Identity {
    identity_of(&key[9..])
}

/// `kind 0x00 value`, as identity keys hold it.
fn identity_of(bytes: &[u8]) -> Identity {
    let split = bytes
        .iter()
        .position(|b| *b == 0)
        .expect("an identity in a key is kind 0x00 value");
    let text =
        |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("keys hold UTF-8 identities");
    Identity {
        kind: text(&bytes[..split]),
        value: text(&bytes[split + 1..]),
    }
}

/// The sequence number of a follow-up key.
pub fn follow_up_seq(key: &[u8]) -> u64 {
    u64::from_be_bytes(
        key[1..9]
            .try_into()
            .expect("follow-up keys hold a sequence"),
    )
}

pub const SEGMENT_PREFIX: &[u8] = b"c";

pub fn segment(name: &str) -> Vec<u8> {
    let mut key = SEGMENT_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// `n name 0x00`: where the member keys of a segment start (names never hold a 0 byte).
pub fn members_prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + name.len() + 8);
    key.push(b'n');
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

/// Above every member key of a segment (the prefix with its 0 byte raised to 1).
pub fn members_end(name: &str) -> Vec<u8> {
    let mut key = members_prefix(name);
    *key.last_mut().expect("the prefix ends in 0") = 1;
    key
}

pub fn member(name: &str, oneid: OneId) -> Vec<u8> {
    let mut key = members_prefix(name);
    key.extend_from_slice(&oneid.0.to_be_bytes());
    key
}

/// The profile at the end of a member key.
pub fn member_oneid(key: &[u8]) -> OneId {
    OneId(u64::from_be_bytes(
        key[key.len() - 8..]
            .try_into()
            .expect("member keys end in a oneid"),
    ))
}

pub const CHANGE_PREFIX: &[u8] = b"k";

pub fn change(offset: u64) -> Vec<u8> {
    let mut key = CHANGE_PREFIX.to_vec();
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

/// The offset of a change-log key.
pub fn change_offset(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[1..9].try_into().expect("change keys hold an offset"))
}

fn with_oneid(prefix: u8, oneid: OneId, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + rest.len());
    key.push(prefix);
    key.extend_from_slice(&oneid.0.to_be_bytes());
    key.extend_from_slice(rest);
    key
}

/// What falls due at a time, in the due-time index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueKind {
    /// A points lot expires; detail: the lot's sequence (8 bytes, big-endian).
    LotExpiry,
    /// A manual tag expires; detail: the tag.
    TagExpiry,
    /// An order leaves the spend window; detail: the order id.
    WindowExit,
    /// A tier's retention period ends; no detail.
    TierReview,
    /// A time-based rule tag can flip; no detail.
    RuleReview,
}

impl DueKind {
    /// Kinds due at the same instant for the same profile are processed in this order: what
    /// changes balances, tags and spend first, then the tier review that reads the spend, then
    /// the rule review that reads everything.
    fn byte(self) -> u8 {
        match self {
            DueKind::LotExpiry => 1,
            DueKind::TagExpiry => 2,
            DueKind::WindowExit => 3,
            DueKind::TierReview => 4,
            DueKind::RuleReview => 5,
        }
    }

    fn from_byte(byte: u8) -> DueKind {
        match byte {
            1 => DueKind::LotExpiry,
            2 => DueKind::TagExpiry,
            3 => DueKind::WindowExit,
            4 => DueKind::TierReview,
            5 => DueKind::RuleReview,
            other => panic!("corrupt due key kind {other}"),
        }
    }
}

pub const DUE_PREFIX: &[u8] = b"t";

/// `t | due_ms | oneid | kind | detail`: ordered by time, then profile.
pub fn due(at: Millis, oneid: OneId, kind: DueKind, detail: &[u8]) -> Vec<u8> {
    let mut key = due_bound(at);
    key.extend_from_slice(&oneid.0.to_be_bytes());
    key.push(kind.byte());
    key.extend_from_slice(detail);
    key
}

/// The smallest due key at `at`: every key below it falls due before `at`.
pub fn due_bound(at: Millis) -> Vec<u8> {
    time_bound(DUE_PREFIX, at)
}

/// `prefix | time`: the smallest key at `at` of a time-ordered prefix (due keys, retention
/// queues). Times before 1970 sort as 0: big-endian order is numeric only for non-negatives.
pub fn time_bound(prefix: &[u8], at: Millis) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&at.0.max(0).to_be_bytes());
    key
}

/// The parts of a due key: when, whose, what, and the detail.
pub fn parse_due(key: &[u8]) -> (Millis, OneId, DueKind, &[u8]) {
    assert!(key.len() >= 18 && key[0] == b't', "corrupt due key {key:?}");
    let at = i64::from_be_bytes(key[1..9].try_into().expect("8 bytes"));
    let oneid = OneId(u64::from_be_bytes(key[9..17].try_into().expect("8 bytes")));
    (Millis(at), oneid, DueKind::from_byte(key[17]), &key[18..])
}

/// The time in a due or eviction key (the 8 bytes after the prefix byte).
pub fn key_time(key: &[u8]) -> Millis {
    Millis(i64::from_be_bytes(
        key[1..9].try_into().expect("time-ordered keys hold a time"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_keys_sort_by_time_and_parse_back() {
        let a = due(Millis(1_000), OneId(7), DueKind::LotExpiry, b"e-1");
        let b = due(Millis(2_000), OneId(1), DueKind::TagExpiry, b"vip");
        assert!(a < b && a < due_bound(Millis(1_001)) && a >= due_bound(Millis(1_000)));
        assert_eq!(
            parse_due(&a),
            (Millis(1_000), OneId(7), DueKind::LotExpiry, &b"e-1"[..])
        );
        assert_eq!(
            parse_due(&b),
            (Millis(2_000), OneId(1), DueKind::TagExpiry, &b"vip"[..])
        );
    }
}
