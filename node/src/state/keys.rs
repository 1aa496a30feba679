//! Key layout of a shard's state keyspace. One byte of prefix per record kind, then
//! big-endian integers so that byte order is numeric order.
//!
//! | prefix | key                                   | value          |
//! |--------|---------------------------------------|----------------|
//! | `m`    | `m`                                   | `ShardMeta`    |
//! | `r`    | `r`                                   | `Rules`        |
//! | `p`    | `p oneid`                             | `Profile`      |
//! | `i`    | `i kind 0x00 value`                   | `OneId`        |
//! | `o`    | `o oneid order_id`                    | `OrderRecord`  |
//! | `l`    | `l oneid seq`                         | `LedgerRecord` |
//! | `d`    | `d oneid event_id`                    | `DedupRecord`  |
//! | `e`    | `e clock_ms seq`                      | dedup key (eviction order) |
//! | `x`    | `x seq`                               | `OutboxRecord` |

use oneid_protocol::ids::{Identity, OneId};

pub const META: &[u8] = b"m";
pub const RULES: &[u8] = b"r";

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

/// Clocks before 1970 (negative) sort as 0: big-endian order is numeric only for non-negatives.
pub fn dedup_eviction(clock_ms: i64, seq: u64) -> Vec<u8> {
    let clock_ms = clock_ms.max(0);
    let mut key = Vec::with_capacity(17);
    key.push(b'e');
    key.extend_from_slice(&clock_ms.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub const OUTBOX_PREFIX: &[u8] = b"x";

pub fn outbox(seq: u64) -> Vec<u8> {
    let mut key = vec![b'x'];
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn with_oneid(prefix: u8, oneid: OneId, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + rest.len());
    key.push(prefix);
    key.extend_from_slice(&oneid.0.to_be_bytes());
    key.extend_from_slice(rest);
    key
}
