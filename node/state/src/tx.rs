//! How apply writes: [`Tx`], the transaction of one command over the pending write set, which
//! keeps the shard's digest as pairs change (every pair but the meta record); [`EventWrites`],
//! the writes of one event held back until the whole event is known to succeed; the record
//! encoding; and the constructors of event rejections.

use super::keys;
use super::store::{pair_hash, Layered, StateRead, WriteSet};
use oneid_protocol::event::EventError;
use oneid_protocol::num::Millis;
use oneid_protocol::ErrorCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Reads through the pending write set, and writes into it keeping the digest.
pub(super) struct Tx<'a> {
    pub(super) base: &'a dyn StateRead,
    pub(super) writes: &'a mut WriteSet,
    pub(super) digest: &'a mut u64,
}

impl Tx<'_> {
    pub(super) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.writes.changes.get(key) {
            Some(value) => value.clone(),
            None => self.base.get(key),
        }
    }

    pub(super) fn get_as<T: DeserializeOwned>(&self, key: &[u8]) -> Option<T> {
        self.get(key).map(|bytes| decode(key, &bytes))
    }

    /// Up to `limit` pairs under `prefix` whose keys sort before `below`, in key order. Reads
    /// in small chunks, so the work is bounded by what is returned, not by what is stored.
    /// Starts after `after` when given: a cursor past records already processed, so the scan
    /// does not wade through their tombstones again.
    pub(super) fn scan_below(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        below: &[u8],
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        const CHUNK: usize = 64;
        let view = Layered {
            base: self.base,
            writes: self.writes,
        };
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        while out.len() < limit {
            let from = out.last().map(|(key, _)| key.as_slice()).or(after);
            let chunk = view.scan(prefix, from, false, CHUNK.min(limit - out.len()));
            let exhausted = chunk.len() < CHUNK.min(limit - out.len());
            for pair in chunk {
                if pair.0.as_slice() >= below {
                    return out;
                }
                out.push(pair);
            }
            if exhausted {
                break;
            }
        }
        out
    }

    pub(super) fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        if key != keys::META {
            if let Some(old) = self.get(&key) {
                *self.digest = self.digest.wrapping_sub(pair_hash(&key, &old));
            }
            if let Some(new) = &value {
                *self.digest = self.digest.wrapping_add(pair_hash(&key, new));
            }
        }
        self.writes.changes.insert(key, value);
    }

    pub(super) fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) {
        self.set(key, Some(encode(value)));
    }

    /// Writes `bytes` over a value whose pair hash is `old` (`None`: the key is new), without
    /// reading the old value back: the caller already knows it.
    pub(super) fn put_known(&mut self, key: Vec<u8>, old: Option<u64>, bytes: Vec<u8>) {
        debug_assert_eq!(
            old,
            self.get(&key).map(|b| pair_hash(&key, &b)),
            "wrong old value for {key:?}"
        );
        if let Some(old) = old {
            *self.digest = self.digest.wrapping_sub(old);
        }
        *self.digest = self.digest.wrapping_add(pair_hash(&key, &bytes));
        self.writes.changes.insert(key, Some(bytes));
    }

    /// Writes a key known to be absent (a fresh sequence number, a key just read as absent).
    pub(super) fn put_new<T: Serialize>(&mut self, key: Vec<u8>, value: &T) {
        self.put_known(key, None, encode(value));
    }

    pub(super) fn delete(&mut self, key: Vec<u8>) {
        self.set(key, None);
    }

    /// Deletes a key whose current value the caller just read (from a scan).
    pub(super) fn delete_known(&mut self, key: Vec<u8>, old: &[u8]) {
        debug_assert_eq!(
            self.get(&key).as_deref(),
            Some(old),
            "wrong old value for {key:?}"
        );
        *self.digest = self.digest.wrapping_sub(pair_hash(&key, old));
        self.writes.changes.insert(key, None);
    }
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("state records always encode")
}

/// Decodes a stored record. State that does not decode is corrupt: stop the node.
pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> T {
    postcard::from_bytes(bytes).unwrap_or_else(|e| panic!("corrupt state record {key:?}: {e}"))
}

pub(super) fn reject(code: ErrorCode, message: impl Into<String>) -> EventError {
    EventError::new(code, message)
}

pub(super) fn reject_field(code: ErrorCode, field: &str, message: impl Into<String>) -> EventError {
    EventError::field(code, field, message)
}

/// Writes one event makes, held back until the whole event is known to succeed; each with
/// the pair hash of the value it replaces (`None` for a new key).
#[derive(Default)]
pub(super) struct EventWrites {
    pub(super) changes: Vec<(Vec<u8>, Option<u64>, Vec<u8>)>,
    /// Ledger keys among the changes, for the ledger retention queue.
    pub(super) ledger: Vec<Vec<u8>>,
}

impl EventWrites {
    pub(super) fn put<T: Serialize>(&mut self, key: Vec<u8>, old: Option<u64>, value: &T) {
        self.changes.push((key, old, encode(value)));
    }

    /// Adds a due key (empty value) that may already exist, in the state or in this buffer.
    pub(super) fn put_due(&mut self, tx: &Tx<'_>, key: Vec<u8>) {
        if self.changes.iter().any(|(k, _, _)| *k == key) {
            return;
        }
        let old = tx.get(&key).map(|bytes| pair_hash(&key, &bytes));
        self.changes.push((key, old, Vec::new()));
    }

    /// Adds a due key known to be new (it names an order, whose ids never repeat, or a unique
    /// ledger sequence).
    pub(super) fn put_new_due(&mut self, key: Vec<u8>) {
        self.changes.push((key, None, Vec::new()));
    }

    /// Writes the changes; a due key earlier than `due_floor` lowers it. The ledger keys go
    /// to `retained` for the ledger retention queue.
    pub(super) fn commit(
        self,
        tx: &mut Tx<'_>,
        due_floor: &mut Millis,
        retained: &mut Vec<Vec<u8>>,
    ) {
        retained.extend(self.ledger);
        for (key, old, bytes) in self.changes {
            if key.starts_with(keys::DUE_PREFIX) {
                *due_floor = (*due_floor).min(keys::key_time(&key));
            }
            tx.put_known(key, old, bytes);
        }
    }
}
