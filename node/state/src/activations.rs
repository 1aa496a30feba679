//! The activation cache: profiles (virtual actors) held in memory, bounded by a budget.
//!
//! An activation is only a copy of persisted state (every apply writes the profile through),
//! so dropping one, by budget or idleness, loses nothing: the next message reads it back.
//! Idleness is counted in the shard's ticks ([`Activations::tick`]), not read from a clock:
//! nothing in `state` reads time.

use super::profile::Profile;
use lru::LruCache;
use oneid_protocol::ids::OneId;
use std::collections::HashSet;
use std::num::NonZeroUsize;

pub struct Activations {
    /// Most recently used last; each with the pair hash of its stored bytes (for the digest)
    /// and the tick it was last touched at.
    cache: LruCache<OneId, (Profile, u64, u64)>,
    /// Ticks so far (the shard's timer).
    now: u64,
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
            now: 0,
            passivated: 0,
            activated: 0,
        }
    }

    #[cfg(test)]
    pub fn get(&mut self, oneid: OneId) -> Option<(&Profile, u64)> {
        let now = self.now;
        let (profile, stored_hash, touched) = self.cache.get_mut(&oneid)?;
        *touched = now;
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
            .push(oneid, (profile, stored_hash, self.now))
            .is_some_and(|(evicted, _)| evicted != oneid)
        {
            self.passivated += 1;
        }
    }

    /// One tick of the shard's timer passed.
    pub fn tick(&mut self) {
        self.now += 1;
    }

    /// Passivates activations not touched for `idle_ticks` ticks or more.
    pub fn passivate_idle(&mut self, idle_ticks: u64) {
        while let Some((_, (_, _, touched))) = self.cache.peek_lru() {
            if self.now - *touched < idle_ticks {
                break;
            }
            self.cache.pop_lru();
            self.passivated += 1;
        }
    }

    /// How many profiles are in memory now.
    pub fn active(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{id, rules, PLAIN};
    use oneid_protocol::num::Millis;

    #[test]
    fn activations_idle_for_the_given_ticks_are_passivated_and_touched_ones_kept() {
        let mut activations = Activations::new(10);
        let profile = |seq| Profile::new(id(seq), &rules(PLAIN), Millis(0));
        activations.insert(profile(1), 11);
        activations.insert(profile(2), 22);
        activations.tick();
        activations.tick();
        // Profile 2 is used again; profile 1 has been idle two ticks.
        let (taken, hash) = activations.take(id(2)).expect("activated");
        activations.insert(taken, hash);
        activations.passivate_idle(3);
        assert_eq!(activations.active(), 2, "nothing idle for 3 ticks yet");
        activations.tick();
        activations.passivate_idle(3);
        assert_eq!(activations.active(), 1);
        assert!(activations.take(id(1)).is_none(), "profile 1 passivated");
        assert_eq!(activations.passivated, 1);
    }
}
