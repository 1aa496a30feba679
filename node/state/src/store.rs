//! How apply reads and writes state without doing I/O itself.
//!
//! Apply reads through [`StateRead`] (the node implements it over fjall; tests over a
//! `BTreeMap`) and writes into a [`WriteSet`], which the caller persists. The write set also
//! keeps the shard's digest: a multiset hash of every (key, value) of the state, updated
//! incrementally by subtracting the old pair and adding the new one, so replicas with the
//! same state have the same digest whatever order they wrote it in.

use std::collections::BTreeMap;
use std::ops::Bound;

/// Read access to a shard's persisted state.
pub trait StateRead {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// Up to `limit` pairs whose keys start with `prefix`, in key order (or reverse), strictly
    /// after (or before, in reverse) `from` when given.
    fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)>;
}

/// A state held in memory: the state of unit tests, and the model of the fjall one.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemState(pub BTreeMap<Vec<u8>, Vec<u8>>);

impl StateRead for MemState {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key).cloned()
    }

    fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let changes: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        merged_scan(
            &changes,
            self.0.iter().map(|(k, v)| (k.clone(), v.clone())),
            prefix,
            from,
            reverse,
            limit,
        )
    }
}

impl MemState {
    /// Applies a write set's changes.
    pub fn commit(&mut self, writes: WriteSet) {
        for (key, value) in writes.changes {
            match value {
                Some(value) => self.0.insert(key, value),
                None => self.0.remove(&key),
            };
        }
    }
}

/// Changes made by applying entries, not yet persisted; reads see them first.
#[derive(Debug, Default, Clone)]
pub struct WriteSet {
    /// key → new value, `None` for a delete.
    pub changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// A read view: the pending write set over the persisted state.
pub struct Layered<'a> {
    pub base: &'a dyn StateRead,
    pub writes: &'a WriteSet,
}

impl Layered<'_> {
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.writes.changes.get(key) {
            Some(value) => value.clone(),
            None => self.base.get(key),
        }
    }

    pub fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        if self.writes.changes.is_empty() {
            return self.base.scan(prefix, from, reverse, limit);
        }
        // Ask the base for enough to survive the deletes the write set holds in the scanned
        // range (only those can hide base pairs; deletes behind a cursor cost nothing).
        let lower = match (from, reverse) {
            (Some(from), false) => Bound::Excluded(from.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        let upper = match (from, reverse) {
            (Some(from), true) => Bound::Excluded(from.to_vec()),
            _ => Bound::Unbounded,
        };
        let deletes = self
            .writes
            .changes
            .range((lower, upper))
            .take_while(|(key, _)| key.starts_with(prefix))
            .filter(|(_, value)| value.is_none())
            .count();
        let base = self
            .base
            .scan(prefix, from, reverse, limit.saturating_add(deletes));
        merged_scan(
            &self.writes.changes,
            base.into_iter(),
            prefix,
            from,
            reverse,
            limit,
        )
    }
}

/// Merges `changes` over `base` pairs (any order, all under `prefix`) for a bounded scan.
fn merged_scan(
    changes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    base: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
    prefix: &[u8],
    from: Option<&[u8]>,
    reverse: bool,
    limit: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let in_range = |key: &[u8]| {
        key.starts_with(prefix)
            && match from {
                None => true,
                Some(from) if reverse => key < from,
                Some(from) => key > from,
            }
    };
    let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.filter(|(k, _)| in_range(k)).collect();
    let lower = Bound::Included(prefix.to_vec());
    for (key, value) in changes
        .range((lower, Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with(prefix))
    {
        if !in_range(key) {
            continue;
        }
        match value {
            Some(value) => merged.insert(key.clone(), value.clone()),
            None => merged.remove(key),
        };
    }
    if reverse {
        merged.into_iter().rev().take(limit).collect()
    } else {
        merged.into_iter().take(limit).collect()
    }
}

/// The digest contribution of one (key, value) pair.
pub fn pair_hash(key: &[u8], value: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(value);
    hasher.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layered_scan_merges_pending_writes() {
        let mut base = MemState::default();
        for k in [b"a1", b"a2", b"a3", b"b1"] {
            base.0.insert(k.to_vec(), b"old".to_vec());
        }
        let mut writes = WriteSet::default();
        writes.changes.insert(b"a2".to_vec(), None);
        writes.changes.insert(b"a4".to_vec(), Some(b"new".to_vec()));
        let view = Layered {
            base: &base,
            writes: &writes,
        };
        let keys = |pairs: Vec<(Vec<u8>, Vec<u8>)>| {
            pairs
                .into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(view.scan(b"a", None, false, 10)), ["a1", "a3", "a4"]);
        assert_eq!(keys(view.scan(b"a", None, true, 2)), ["a4", "a3"]);
        assert_eq!(keys(view.scan(b"a", Some(b"a3"), true, 10)), ["a1"]);
        assert_eq!(keys(view.scan(b"a", Some(b"a1"), false, 1)), ["a3"]);
        assert_eq!(view.get(b"a2"), None);
        assert_eq!(view.get(b"a4"), Some(b"new".to_vec()));
    }
}
