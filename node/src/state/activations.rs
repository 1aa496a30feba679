//! The activation cache: profiles (virtual actors) held in memory, bounded by a budget.
//!
//! An activation is only a copy of persisted state (every apply writes the profile through),
//! so dropping one, by budget or idleness, loses nothing: the next message reads it back.

use super::profile::Profile;
use lru::LruCache;
use oneid_protocol::ids::OneId;
use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

pub struct Activations {
    /// Most recently used last; each with the pair hash of its stored bytes (for the digest)
    /// and the time it was last touched.
    cache: LruCache<OneId, (Profile, u64, Instant)>,
    /// Profiles taken out for the command being applied: each goes back (`insert`) or is
    /// dropped (`discard`) before the command ends.
    taken: HashSet<OneId>,
    /// Activations passivated so far (budget or idleness).
    pub passivated: u64,
    pub activated: u64,
}

impl Activations {
    pub fn new(budget: usize) -> Activations {
        Activations {
            cache: LruCache::new(NonZeroUsize::new(budget.max(1)).expect("budget is at least 1")),
            taken: HashSet::new(),
            passivated: 0,
            activated: 0,
        }
    }

    #[cfg(test)]
    pub fn get(&mut self, oneid: OneId) -> Option<(&Profile, u64)> {
        let (profile, stored_hash, touched) = self.cache.get_mut(&oneid)?;
        *touched = Instant::now();
        Some((profile, *stored_hash))
    }

    /// Takes an activated profile out for apply to change it without a copy; it must come
    /// back through `insert` (changed or not) or `discard` before the command ends.
    pub fn take(&mut self, oneid: OneId) -> Option<(Profile, u64)> {
        let (profile, stored_hash, _) = self.cache.pop(&oneid)?;
        self.taken.insert(oneid);
        Some((profile, stored_hash))
    }

    /// Drops a taken profile that apply changed and then did not store (a rejected event):
    /// the next message reads it back from storage.
    pub fn discard(&mut self, oneid: OneId) {
        if self.taken.remove(&oneid) {
            self.passivated += 1;
        }
    }

    /// Whether every taken profile came back or was dropped (true between commands).
    pub fn none_taken(&self) -> bool {
        self.taken.is_empty()
    }

    /// Activates, refreshes or puts back a profile; passivates the least recently used past
    /// the budget.
    pub fn insert(&mut self, profile: Profile, stored_hash: u64) {
        let oneid = profile.oneid;
        if !self.taken.remove(&oneid) && !self.cache.contains(&oneid) {
            self.activated += 1;
        }
        if self
            .cache
            .push(oneid, (profile, stored_hash, Instant::now()))
            .is_some_and(|(evicted, _)| evicted != oneid)
        {
            self.passivated += 1;
        }
    }

    /// Passivates activations idle for longer than `idle`.
    pub fn passivate_idle(&mut self, idle: Duration) {
        let now = Instant::now();
        while let Some((_, (_, _, touched))) = self.cache.peek_lru() {
            if now.duration_since(*touched) < idle {
                break;
            }
            self.cache.pop_lru();
            self.passivated += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }
}
