//! The due-time index: what falls due, and what a clock entry does about it.
//!
//! Each shard keeps an ordered index (`keys::due`) of the times at which something about a
//! profile changes by itself: a points lot expires, a manual tag expires, an order leaves the
//! spend window, a tier's retention period ends, a time-based rule tag can flip. A clock entry
//! processes the keys due at or before its time, oldest first, at most [`DUE_PER_CLOCK_MAX`]
//! of them: a clock entry never does unbounded work, and never scans profiles. What is left
//! continues at the next clock entry, which the leader proposes sooner while there is a backlog.
//!
//! Keys are not deleted when what they point at changes (a lot spent, a tag re-added with
//! another expiry, a tier re-set): processing checks the profile and drops a stale key.

use super::keys::{self, DueKind};
use super::profile::Profile;
use super::segments::{Eval, Stamp};
use super::{EventWrites, LedgerKind, ShardState, Tx};
use oneid_protocol::ids::OneId;
use oneid_protocol::num::Millis;
use std::collections::BTreeMap;

/// Most due keys one clock entry processes.
pub const DUE_PER_CLOCK_MAX: usize = 1_024;

impl ShardState {
    /// Processes what fell due by the shard's clock. Returns how many due keys it processed
    /// (at most `DUE_PER_CLOCK_MAX`).
    pub(super) fn process_due(&mut self, tx: &mut Tx<'_>) -> usize {
        let now = self.record.clock;
        let after = keys::due_bound(self.record.due_floor);
        let due = tx.scan_below(
            keys::DUE_PREFIX,
            Some(&after),
            &keys::due_bound(Millis(now.0 + 1)),
            DUE_PER_CLOCK_MAX,
        );
        let processed = due.len();
        // Everything due by now is processed, unless the batch was full: then the rest starts at
        // the last key's time. Keys scheduled earlier than the floor from here on lower it again.
        self.record.due_floor = match due.last() {
            Some((last, _)) if processed == DUE_PER_CLOCK_MAX => keys::key_time(last),
            _ => self.record.due_floor.max(Millis(now.0 + 1)),
        };
        // Profiles touched by this entry: loaded once, written once.
        let mut touched: BTreeMap<OneId, (Profile, u64, bool, Option<Stamp>)> = BTreeMap::new();
        for (key, value) in due {
            // Each key's writes are committed before the next key is deleted: a review can
            // re-schedule a due key that is later in this same batch (`put_due` records the old
            // value it sees now). Buffered to the end of the batch, that key was deleted in
            // between and written back over its stale old hash: wrong digest (a debug assert
            // in `put_known`), and a processed key left in the index.
            let mut writes = EventWrites::default();
            let (at, oneid, kind, detail) = keys::parse_due(&key);
            let entry = match touched.entry(oneid) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let Some((profile, stored_hash)) = self.load_profile(tx, oneid) else {
                        // A merged loser's: what it pointed at moved to the survivor, which
                        // has keys of its own for it.
                        assert!(
                            tx.get(&keys::tombstone(oneid)).is_some(),
                            "due keys point at existing profiles or tombstones"
                        );
                        tx.delete_known(key, &value);
                        continue;
                    };
                    let before = self.stamp(&profile);
                    slot.insert((profile, stored_hash, false, before))
                }
            };
            if entry.0.merging.is_some() {
                // A profile in a merge changes no more until it ends: its due keys wait (the
                // floor stays below them, so the next clock entry meets them again).
                self.record.due_floor = self.record.due_floor.min(at);
                continue;
            }
            tx.delete_known(key.clone(), &value);
            let profile = &mut entry.0;
            let changed = self.process_key(tx, profile, kind, at, detail, &mut writes);
            if changed {
                profile.updated_at = profile.updated_at.max(at);
            }
            entry.2 |= changed;
            writes.commit(tx, &mut self.record.due_floor, &mut self.retained.ledger);
        }
        for (_, (mut profile, stored_hash, changed, before)) in touched {
            if changed {
                profile.version += 1;
                self.finish_profile(tx, profile, Some(stored_hash), before.as_ref());
            } else {
                self.activations.insert(profile, stored_hash);
            }
        }
        processed
    }

    /// What one due key does to its profile (loaded, changed in place); answers whether it
    /// changed anything (a stale key, whose lot, tag, order or period changed since, does not).
    fn process_key(
        &self,
        tx: &Tx<'_>,
        profile: &mut Profile,
        kind: DueKind,
        at: Millis,
        detail: &[u8],
        writes: &mut EventWrites,
    ) -> bool {
        match kind {
            DueKind::LotExpiry => {
                let seq = u64::from_be_bytes(
                    detail
                        .try_into()
                        .expect("a lot's due key holds its sequence"),
                );
                match profile.expire_lot(seq, at) {
                    Some(lot) => {
                        let reason = format!("points earned by {} expired", lot.earned_by());
                        self.write_ledger(
                            writes,
                            profile,
                            &lot.event_id,
                            LedgerKind::Expire,
                            -lot.points,
                            at,
                            Some(reason),
                            0,
                        );
                        true
                    }
                    None => false,
                }
            }
            DueKind::TagExpiry => {
                let tag = String::from_utf8_lossy(detail).into_owned();
                let current = profile.manual_tags.get(&tag) == Some(&Some(at));
                if current {
                    profile.remove_manual_tag(&tag);
                }
                current
            }
            DueKind::WindowExit => {
                self.exit_window(tx, profile, &String::from_utf8_lossy(detail), at, writes)
            }
            DueKind::TierReview => {
                let current = profile.tier_retained_until == Some(at);
                if current {
                    self.set_tier(tx, profile, at, true, writes);
                }
                current
            }
            DueKind::RuleReview => {
                let current = profile.rule_review_at == Some(at);
                if current {
                    profile.rule_review_at = None;
                }
                current
            }
        }
    }

    /// Settles a changed profile and writes it: `before` is its stamp before the change
    /// (`None` for a new profile).
    pub(super) fn finish_profile(
        &mut self,
        tx: &mut Tx<'_>,
        mut profile: Profile,
        stored_hash: Option<u64>,
        before: Option<&Stamp>,
    ) {
        self.settle(tx, &mut profile, Eval::Changed(before));
        self.store_profile(tx, profile, stored_hash);
    }

    /// Rule tags and segment memberships at the shard's clock, and the next time a time-based
    /// rule or segment can flip.
    pub(super) fn settle(&mut self, tx: &mut Tx<'_>, profile: &mut Profile, eval: Eval<'_>) {
        self.evaluate_rule_tags(profile);
        self.evaluate_segments(tx, profile, eval);
        let next = self.next_rule_review(profile);
        if next != profile.rule_review_at {
            profile.rule_review_at = next;
            if let Some(at) = next {
                let mut writes = EventWrites::default();
                writes.put_due(tx, keys::due(at, profile.oneid, DueKind::RuleReview, &[]));
                writes.commit(tx, &mut self.record.due_floor, &mut self.retained.ledger);
            }
        }
    }
}
