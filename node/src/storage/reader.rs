//! Reads of the applied state straight from fjall: the state machine's read view of a
//! keyspace ([`FjallState`]), and the [`StateReader`] the API and router read through, with its
//! cache of identity bindings.

use super::Storage;
use crate::read_pool::ReadPool;
use fjall::{Keyspace, Readable as _};
use lru::LruCache;
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::num::Millis;
use oneid_replica::ShardError;
use oneid_state::keys;
use oneid_state::merge::{MergeRecord, Tombstone};
use oneid_state::profile::Profile;
use oneid_state::store::StateRead;
use oneid_state::unlink::UnlinkRecord;
use oneid_state::{decode, LedgerRecord};
use std::num::NonZeroUsize;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A fjall keyspace as the state machine's read view. A read error is not deterministic:
/// it stops the node rather than being answered.
pub struct FjallState(Keyspace);

impl Storage {
    /// The shard's state as apply and the shard's readers see it: each read the newest.
    pub fn state_read(&self, shard: ShardId) -> FjallState {
        FjallState(self.state(shard))
    }

    /// The shard's state as of now, for good: every read of the view sees one sequence
    /// number, so a write batch is wholly in it or not at all (plain reads may see one half
    /// applied). Holding it keeps what it sees from being compacted away: drop it soon.
    pub fn state_view(&self, shard: ShardId) -> StateView {
        StateView {
            state: self.state(shard),
            view: self.db.snapshot(),
        }
    }
}

impl StateRead for FjallState {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0
            .get(key)
            .unwrap_or_else(|e| panic!("reading state failed: {e}"))
            .map(|v| v.to_vec())
    }

    fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let range = self
            .0
            .range::<Vec<u8>, _>(scan_bounds(prefix, from, reverse));
        collect_scan(range, prefix, reverse, limit)
    }
}

/// A shard's state at one instant (see [`Storage::state_view`]).
#[derive(Clone)]
pub struct StateView {
    state: Keyspace,
    view: fjall::Snapshot,
}

impl StateView {
    /// The pairs after `after` (from the first without it), in key order, until they hold
    /// `bytes_max` bytes of keys and values or more; and whether they reach the last pair.
    pub fn pairs_after(&self, after: Option<Vec<u8>>, bytes_max: usize) -> (Vec<Pair>, bool) {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut pairs = Vec::new();
        let mut bytes = 0;
        for guard in self
            .view
            .range::<Vec<u8>, _>(&self.state, (lower, Bound::Unbounded))
        {
            if bytes >= bytes_max {
                return (pairs, false);
            }
            let (k, v) = read(guard);
            bytes += k.len() + v.len();
            pairs.push((k, v));
        }
        (pairs, true)
    }
}

impl StateRead for StateView {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.view
            .get(&self.state, key)
            .unwrap_or_else(|e| panic!("reading state failed: {e}"))
            .map(|v| v.to_vec())
    }

    fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let range = self
            .view
            .range::<Vec<u8>, _>(&self.state, scan_bounds(prefix, from, reverse));
        collect_scan(range, prefix, reverse, limit)
    }
}

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// The range a [`StateRead::scan`] reads: the keys with `prefix`, after `from` (before it,
/// `reverse`).
fn scan_bounds(
    prefix: &[u8],
    from: Option<&[u8]>,
    reverse: bool,
) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let lower = match (from, reverse) {
        (Some(from), false) => Bound::Excluded(from.to_vec()),
        _ => Bound::Included(prefix.to_vec()),
    };
    let upper = match (from, reverse) {
        (Some(from), true) => Bound::Excluded(from.to_vec()),
        _ => prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded),
    };
    (lower, upper)
}

/// The first `limit` pairs of a scan's range (the last, `reverse`) that start with `prefix`.
fn collect_scan(
    range: impl DoubleEndedIterator<Item = fjall::Guard>,
    prefix: &[u8],
    reverse: bool,
    limit: usize,
) -> Vec<Pair> {
    let ordered: Box<dyn Iterator<Item = fjall::Guard>> = if reverse {
        Box::new(range.rev())
    } else {
        Box::new(range)
    };
    ordered
        .take(limit)
        .map(read)
        .filter(|(k, _)| k.starts_with(prefix))
        .collect()
}

/// A pair fjall read; a read error stops the node (it is not deterministic).
fn read(guard: fjall::Guard) -> Pair {
    let (k, v) = guard
        .into_inner()
        .unwrap_or_else(|e| panic!("reading state failed: {e}"));
    (k.to_vec(), v.to_vec())
}

/// The first key after every key that starts with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Reads of acknowledged state straight from fjall, on the caller's thread (the API's), without
/// a round trip through the shard actors. A proposal is acknowledged only after the writer has
/// committed its changes to fjall, so these reads see every acknowledged write. They may also
/// see applied changes a moment before their fsync; those are re-derived from the fsynced log
/// after a crash, so nothing seen here can be lost.
///
/// Identity bindings are cached, each with the binding epoch of its shard it was read at: a
/// binding is changed or removed only by an entry that moves its shard's epoch (nothing does
/// yet; merges and unlinks will), so an entry is served only while its epoch is the latest
/// this node has heard of for the shard (from identity reads, which answer the epoch, and
/// from the leaders' pings). Only found bindings are cached (an unbound identity may be bound
/// next).
///
/// Async callers run their reads through [`StateReader::run`], on the read pool's threads: a
/// fjall read may wait on the disk.
#[derive(Clone)]
pub struct StateReader {
    storage: Arc<Storage>,
    n_shards: u32,
    bindings: Arc<[BindingStripe]>,
    /// Per shard, the latest binding epoch this node has heard of.
    epochs: Arc<[AtomicU64]>,
    /// Segment names by (shard, number), for profile documents: a number names one segment
    /// on its shard for good, so a cached name is never stale.
    pub(crate) segment_names: Arc<Mutex<LruCache<(ShardId, u64), String>>>,
    pool: ReadPool,
}

/// A read of one shard's state, by whichever node holds a replica of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Query {
    /// The profiles these identities are bound to (all held by the shard).
    Identities(Vec<Identity>),
    /// Whether each event id applied to each profile (exactly-once records).
    Events(Vec<(OneId, String)>),
    Profile(OneId),
    /// Up to `limit` ledger entries, newest first, older than sequence `before`.
    Ledger {
        oneid: OneId,
        limit: usize,
        before: Option<u64>,
    },
    /// The rules the shard applies.
    Rules(ShardId),
    /// The segments the shard holds (the one named, or all), as the shard holds them.
    Segments {
        shard: ShardId,
        name: Option<String>,
    },
    /// One page of the shard's identity audit, after key `after` (see `oneid_state::audit`).
    IdentityAudit {
        shard: ShardId,
        after: Option<Vec<u8>>,
    },
    /// Up to `limit` members of a segment held by the shard, in OneID order, after `after`.
    Members {
        shard: ShardId,
        segment: String,
        after: Option<OneId>,
        limit: usize,
    },
    /// The merges a profile survived.
    Merges(OneId),
    /// Which of these identities an `unlink` took off the profile after `since` (an event's
    /// `ts`): those the event must not bind back to it.
    Unlinked {
        oneid: OneId,
        identities: Vec<Identity>,
        since: Millis,
    },
}

impl Query {
    /// A shard other than `shard` (of `n_shards`) that the query would read, if it names one.
    pub fn other_shard(&self, shard: ShardId, n_shards: u32) -> Option<ShardId> {
        let other = |s: ShardId| (s != shard).then_some(s);
        match self {
            Query::Identities(identities) => identities
                .iter()
                .find_map(|identity| other(identity.shard(n_shards))),
            Query::Events(events) => events.iter().find_map(|(oneid, _)| other(oneid.shard())),
            Query::Profile(oneid)
            | Query::Ledger { oneid, .. }
            | Query::Merges(oneid)
            | Query::Unlinked { oneid, .. } => other(oneid.shard()),
            Query::Rules(s)
            | Query::IdentityAudit { shard: s, .. }
            | Query::Segments { shard: s, .. }
            | Query::Members { shard: s, .. } => other(*s),
        }
    }
}

/// A profile as read, with the names of its segments (sorted).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileRead {
    pub profile: Profile,
    pub segments: Vec<String>,
}

impl ProfileRead {
    pub fn into_doc(self) -> oneid_protocol::api::ProfileDoc {
        self.profile.to_doc(self.segments)
    }
}

/// A page of a ledger, newest first, and where its profile went if it was merged.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LedgerRead {
    pub entries: Vec<(u64, LedgerRecord)>,
    pub merged_into: Option<OneId>,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Answer {
    /// The profile each identity is bound to, and the shard's binding epoch before they were
    /// read.
    Identities(Vec<Option<OneId>>, u64),
    Events(Vec<bool>),
    Profile(Option<Box<ProfileRead>>),
    /// The profile asked for was merged into this one (a tombstone).
    Merged(OneId),
    Ledger(Option<LedgerRead>),
    /// The merges a profile survived, oldest first (`None`: no such profile).
    Merges(Option<Vec<MergeRecord>>),
    /// The shard's rules and their version.
    Rules(Box<oneid_protocol::rules::Rules>, u64),
    Segments(Vec<oneid_state::segments::SegmentRecord>),
    Members(Vec<OneId>),
    IdentityAudit(oneid_state::audit::AuditPage),
    Unlinked(Vec<Identity>),
}

/// One stripe of the cache of bindings: each with the binding epoch it was read at.
type BindingStripe = Mutex<LruCache<Identity, (OneId, u64)>>;

/// Identity bindings the reader keeps in memory, over all stripes.
pub const IDENTITY_CACHE_ENTRIES_MAX: usize = 256 * 1024;
/// Stripes of the identity cache, each behind its own lock, so API threads rarely wait.
const IDENTITY_CACHE_STRIPES: usize = 16;
/// Segment names the reader keeps in memory (for profile documents).
pub const SEGMENT_NAMES_CACHED_MAX: usize = 16 * 1024;

impl StateReader {
    pub fn new(storage: Arc<Storage>, n_shards: u32) -> StateReader {
        let per_stripe = NonZeroUsize::new(IDENTITY_CACHE_ENTRIES_MAX / IDENTITY_CACHE_STRIPES)
            .expect("stripes hold entries");
        let bindings = (0..IDENTITY_CACHE_STRIPES)
            .map(|_| Mutex::new(LruCache::new(per_stripe)))
            .collect();
        StateReader {
            storage,
            n_shards,
            bindings,
            epochs: (0..n_shards).map(|_| AtomicU64::new(0)).collect(),
            segment_names: Arc::new(Mutex::new(LruCache::new(
                NonZeroUsize::new(SEGMENT_NAMES_CACHED_MAX).expect("above 0"),
            ))),
            pool: ReadPool::start(),
        }
    }

    /// Runs `read` on a thread of the read pool, off the async workers.
    pub async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&StateReader) -> T + Send + 'static,
    ) -> T {
        let reader = self.clone();
        self.pool.run(move || read(&reader)).await
    }

    pub(crate) fn shard(&self, shard: ShardId) -> FjallState {
        FjallState(self.storage.state(shard))
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    fn stripe(&self, key: &[u8]) -> &BindingStripe {
        &self.bindings[(xxhash_rust::xxh3::xxh3_64(key) % IDENTITY_CACHE_STRIPES as u64) as usize]
    }

    /// The latest binding epoch of `shard` this node has heard of.
    pub fn binding_epoch(&self, shard: ShardId) -> u64 {
        self.epochs[shard.0 as usize].load(Ordering::Acquire)
    }

    /// Hears of `shard`'s binding epoch: cached bindings of earlier epochs are no longer served.
    pub fn note_binding_epoch(&self, shard: ShardId, epoch: u64) {
        if let Some(known) = self.epochs.get(shard.0 as usize) {
            known.fetch_max(epoch, Ordering::AcqRel);
        }
    }

    /// The profile an identity is bound to, and the epoch that binding was read at, if this
    /// node has seen the binding at its shard's latest epoch: then it needs no read (of this
    /// replica or of the shard's leader). An entry of an earlier epoch is dropped.
    pub fn cached_identity(&self, identity: &Identity) -> Option<(OneId, u64)> {
        let key = keys::identity(identity);
        let known = self.binding_epoch(identity.shard(self.n_shards));
        let mut stripe = self.stripe(&key).lock().expect("identity cache lock");
        match stripe.get(identity).copied() {
            Some((oneid, epoch)) if epoch >= known => Some((oneid, epoch)),
            Some(_) => {
                stripe.pop(identity);
                None
            }
            None => None,
        }
    }

    /// Forgets what this node cached of `identity`'s binding: it is read anew next time.
    pub fn forget_identity(&self, identity: &Identity) {
        let key = keys::identity(identity);
        self.stripe(&key)
            .lock()
            .expect("identity cache lock")
            .pop(identity);
    }

    /// Remembers a binding read at `epoch` of its shard.
    pub fn cache_identity(&self, identity: &Identity, oneid: OneId, epoch: u64) {
        let shard = identity.shard(self.n_shards);
        self.note_binding_epoch(shard, epoch);
        if epoch >= self.binding_epoch(shard) {
            let key = keys::identity(identity);
            self.stripe(&key)
                .lock()
                .expect("identity cache lock")
                .put(identity.clone(), (oneid, epoch));
        }
    }

    /// The binding epoch of this node's replica of `shard`.
    pub fn replica_binding_epoch(&self, shard: ShardId) -> u64 {
        self.shard(shard).get(keys::SHARD).map_or(0, |bytes| {
            decode::<oneid_state::ShardRecord>(keys::SHARD, &bytes).binding_epoch
        })
    }

    /// The applied index of the state this node's replica of `shard` holds.
    pub fn applied_index(&self, shard: ShardId) -> u64 {
        self.shard(shard).get(keys::META).map_or(0, |bytes| {
            decode::<oneid_state::ShardMeta>(keys::META, &bytes).applied_index
        })
    }

    /// Answers a query of the shard's state as this node's replica holds it.
    pub fn answer(&self, query: &Query) -> Result<Answer, ShardError> {
        Ok(match query {
            Query::Identities(identities) => {
                let Some(shard) = identities.first().map(|i| i.shard(self.n_shards)) else {
                    return Ok(Answer::Identities(Vec::new(), 0));
                };
                debug_assert!(
                    identities.iter().all(|i| i.shard(self.n_shards) == shard),
                    "an identity read names one shard's identities (its epoch is that shard's)"
                );
                // The epoch first: bindings read after it are at least as new, so none is
                // cached as valid at an epoch it did not hold at.
                let epoch = self.replica_binding_epoch(shard);
                self.note_binding_epoch(shard, epoch);
                let found = identities.iter().map(|i| self.identity(i, epoch)).collect();
                Answer::Identities(found, epoch)
            }
            Query::Events(events) => Answer::Events(
                events
                    .iter()
                    .map(|(oneid, event_id)| self.has_event(*oneid, event_id))
                    .collect(),
            ),
            Query::Profile(oneid) => match self.profile_read(*oneid)? {
                Some(read) => Answer::Profile(Some(Box::new(read))),
                None => self.absent(*oneid, Answer::Profile(None)),
            },
            Query::Ledger {
                oneid,
                limit,
                before,
            } => Answer::Ledger(self.ledger(*oneid, *limit, *before)),
            Query::Unlinked {
                oneid,
                identities,
                since,
            } => Answer::Unlinked(self.unlinked(*oneid, identities, *since)),
            Query::Merges(oneid) => match self.merges(*oneid) {
                Some(records) => Answer::Merges(Some(records)),
                None => self.absent(*oneid, Answer::Merges(None)),
            },
            Query::Rules(shard) => {
                // One view for both keys: a rules install writes them in one batch.
                let state = self.storage.state_view(*shard);
                let read = |key: &[u8]| state.get(key);
                Answer::Rules(
                    Box::new(
                        read(keys::RULES)
                            .map(|bytes| decode(keys::RULES, &bytes))
                            .unwrap_or_default(),
                    ),
                    read(keys::RULES_VERSION)
                        .map(|bytes| decode(keys::RULES_VERSION, &bytes))
                        .unwrap_or_default(),
                )
            }
            Query::IdentityAudit { shard, after } => {
                let view = self.storage.state_view(*shard);
                Answer::IdentityAudit(oneid_state::audit::audit_page(
                    &view,
                    after.as_deref(),
                    oneid_state::audit::AUDIT_PAGE_KEYS_MAX,
                ))
            }
            Query::Segments { shard, name } => {
                Answer::Segments(self.segments(*shard, name.as_deref()))
            }
            Query::Members {
                shard,
                segment,
                after,
                limit,
            } => Answer::Members(self.members(*shard, segment, *after, *limit)),
        })
    }

    /// The profile an identity is bound to, as this replica holds it at binding epoch `epoch`
    /// (or later).
    fn identity(&self, identity: &Identity, epoch: u64) -> Option<OneId> {
        if let Some((oneid, _)) = self.cached_identity(identity) {
            return Some(oneid);
        }
        let key = keys::identity(identity);
        let oneid: OneId = self
            .shard(identity.shard(self.n_shards))
            .get(&key)
            .map(|bytes| decode(&key, &bytes))?;
        self.cache_identity(identity, oneid, epoch);
        Some(oneid)
    }

    /// Which of `identities` an unlink took off `oneid` after `since`.
    fn unlinked(&self, oneid: OneId, identities: &[Identity], since: Millis) -> Vec<Identity> {
        let state = self.shard(oneid.shard());
        identities
            .iter()
            .filter(|identity| {
                let key = keys::unlinked(oneid, identity);
                state
                    .get(&key)
                    .is_some_and(|bytes| decode::<UnlinkRecord>(&key, &bytes).at > since)
            })
            .cloned()
            .collect()
    }

    /// Whether `event_id` applied to the profile (and its dedup record is not yet evicted).
    pub fn has_event(&self, oneid: OneId, event_id: &str) -> bool {
        oneid.shard().0 < self.n_shards
            && self
                .shard(oneid.shard())
                .get(&keys::dedup(oneid, event_id))
                .is_some()
    }

    pub fn profile(&self, oneid: OneId) -> Option<Profile> {
        self.record_of(oneid, keys::profile(oneid))
    }

    /// What a read of a profile that is not here answers: where it went, if it was merged,
    /// else `missing`.
    fn absent(&self, oneid: OneId, missing: Answer) -> Answer {
        match self.tombstone(oneid) {
            Some(tombstone) => Answer::Merged(tombstone.into),
            None => missing,
        }
    }

    /// Where a merged OneID went, if it was merged.
    pub fn tombstone(&self, oneid: OneId) -> Option<Tombstone> {
        self.record_of(oneid, keys::tombstone(oneid))
    }

    /// A record kept under `key` on `oneid`'s shard (none for a shard the cluster lacks).
    fn record_of<T: serde::de::DeserializeOwned>(&self, oneid: OneId, key: Vec<u8>) -> Option<T> {
        if oneid.shard().0 >= self.n_shards {
            return None;
        }
        self.shard(oneid.shard())
            .get(&key)
            .map(|bytes| decode(&key, &bytes))
    }

    /// Up to `limit` ledger entries of a profile, newest first, older than sequence `before`;
    /// `None` if the profile does not exist.
    pub fn ledger(&self, oneid: OneId, limit: usize, before: Option<u64>) -> Option<LedgerRead> {
        let merged_into = match self.profile(oneid) {
            Some(_) => None,
            None => Some(self.tombstone(oneid)?.into),
        };
        let from = before.map(|seq| keys::ledger(oneid, seq));
        let entries = self.shard(oneid.shard()).scan(
            &keys::ledger_prefix(oneid),
            from.as_deref(),
            true,
            limit,
        );
        Some(LedgerRead {
            entries: entries
                .into_iter()
                .map(|(key, value)| (keys::ledger_seq(&key), decode(&key, &value)))
                .collect(),
            merged_into,
        })
    }

    /// The merges `oneid` survived, oldest first; `None` if it does not exist (a tombstone
    /// answers where it went instead, see [`Answer::Merged`]).
    fn merges(&self, oneid: OneId) -> Option<Vec<MergeRecord>> {
        self.profile(oneid)?;
        let shard = self.shard(oneid.shard());
        let mut records: Vec<MergeRecord> = shard
            .scan(
                &keys::merged_prefix(oneid),
                None,
                false,
                oneid_state::merge::MERGES_PER_PROFILE_MAX,
            )
            .into_iter()
            .filter_map(|(key, _)| {
                let key = keys::merge(keys::merged_id(&key));
                shard.get(&key).map(|bytes| decode(&key, &bytes))
            })
            .collect();
        records.sort_by_key(|r: &MergeRecord| (r.at, r.plan.merge));
        Some(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::storage::TempDir;
    use oneid_replica::write::{Space, WriteOp};
    use oneid_state::ShardRecord;

    const SHARD: ShardId = ShardId(0);

    /// A cached binding is served only at its shard's latest epoch, which identity reads
    /// (and, in the node, the leaders' pings) raise; a binding read at an older epoch than
    /// the latest is not cached.
    #[test]
    fn a_cached_binding_is_served_only_at_its_shards_latest_epoch() {
        let dir = TempDir::new("reader-epochs");
        let storage = Storage::open(&dir.0, 1, &[SHARD], StorageConfig::default());
        let reader = StateReader::new(Arc::new(storage.expect("opening")), 1);
        let phone = Identity {
            kind: "phone".into(),
            value: "138".into(),
        };
        let (p, q) = (OneId::mint(SHARD, 1), OneId::mint(SHARD, 2));
        reader.cache_identity(&phone, p, 0);
        assert_eq!(reader.cached_identity(&phone), Some((p, 0)));
        reader.note_binding_epoch(SHARD, 1);
        assert_eq!(
            reader.cached_identity(&phone),
            None,
            "dropped: its epoch moved"
        );
        reader.cache_identity(&phone, q, 0);
        assert_eq!(reader.cached_identity(&phone), None, "read before the move");
        reader.cache_identity(&phone, q, 1);
        assert_eq!(reader.cached_identity(&phone), Some((q, 1)));

        // An identity read answers the replica's epoch (here 3) and raises the node's.
        let record = ShardRecord {
            binding_epoch: 3,
            ..ShardRecord::default()
        };
        let email = Identity {
            kind: "email".into(),
            value: "a@x".into(),
        };
        reader.storage().write_for_test(vec![
            WriteOp::put(
                Space::State(SHARD),
                keys::SHARD,
                postcard::to_stdvec(&record).expect("encodes"),
            ),
            WriteOp::put(
                Space::State(SHARD),
                keys::identity(&email),
                postcard::to_stdvec(&p).expect("encodes"),
            ),
        ]);
        let answer = reader.answer(&Query::Identities(vec![email.clone()]));
        assert_eq!(answer, Ok(Answer::Identities(vec![Some(p)], 3)));
        assert_eq!(reader.binding_epoch(SHARD), 3);
        assert_eq!(
            reader.cached_identity(&phone),
            None,
            "epoch 1 is no longer the latest"
        );
        assert_eq!(reader.cached_identity(&email), Some((p, 3)));
    }
}
