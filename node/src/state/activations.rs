//! The activation cache: profiles (virtual actors) held in memory, bounded by a budget.
//!
//! An activation is only a copy of persisted state (every apply writes the profile through),
//! so dropping one, by budget or idleness, loses nothing: the next message reads it back.

use super::profile::Profile;
use lru::LruCache;
use oneid_protocol::ids::OneId;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

pub struct Activations {
    /// Most recently used last; each with the pair hash of its stored bytes (for the digest)
    /// and the time it was last touched.
    cache: LruCache<OneId, (Profile, u64, Instant)>,
    /// Activations passivated so far (budget or idleness).
    pub passivated: u64,
    pub activated: u64,
}

impl Activations {
    pub fn new(budget: usize) -> Activations {
        Activations {
            cache: LruCache::new(NonZeroUsize::new(budget.max(1)).expect("budget is at least 1")),
            passivated: 0,
            activated: 0,
        }
    }

    pub fn get(&mut self, oneid: OneId) -> Option<(&Profile, u64)> {
        let (profile, stored_hash, touched) = self.cache.get_mut(&oneid)?;
        *touched = Instant::now();
        Some((profile, *stored_hash))
    }

    /// Activates or refreshes a profile; passivates the least recently used past the budget.
    pub fn insert(&mut self, profile: Profile, stored_hash: u64) {
        let oneid = profile.oneid;
        if !self.cache.contains(&oneid) {
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
