//! The identity audit: what the identity policy in force refuses among what a shard already
//! stores. A policy change never rewrites bindings or profiles (an acknowledged binding stays
//! bound); the audit reports, per kind, the profiles holding more values than the kind's
//! `max_per_profile` and the blocked values that are bound. It reads a shard one bounded page
//! at a time ([`audit_page`]), so a caller spreads the work of a large shard over many reads
//! and can stop at a deadline.

use crate::keys;
use crate::profile::Profile;
use crate::store::StateRead;
use crate::tx::decode;
use oneid_protocol::ids::Identity;
use oneid_protocol::rules::Rules;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most keys one page of the audit reads.
pub const AUDIT_PAGE_KEYS_MAX: usize = 10_000;

/// What one page of a shard's audit found, and where the next starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    /// Per kind (every kind the policy names, and any other with a finding).
    pub kinds: BTreeMap<String, KindAudit>,
    /// The last key read, after which the next page starts; `None`: the shard is done.
    pub next: Option<Vec<u8>>,
}

/// The audit of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindAudit {
    /// Profiles holding more values of the kind than its `max_per_profile`.
    pub over_limit: u64,
    /// Blocked values of the kind bound in the identity index.
    pub blocked_bound: u64,
}

impl AuditPage {
    /// Adds `other`'s findings to these.
    pub fn add(&mut self, other: &AuditPage) {
        for (kind, audit) in &other.kinds {
            let sum = self.kinds.entry(kind.clone()).or_default();
            sum.over_limit += audit.over_limit;
            sum.blocked_bound += audit.blocked_bound;
        }
    }
}

/// Audits up to `limit` keys of the shard's state after `after` (from the start: `None`):
/// first its slice of the identity index (`i` keys), then its profiles (`p` keys), judged by
/// the rules the shard holds.
pub fn audit_page(state: &dyn StateRead, after: Option<&[u8]>, limit: usize) -> AuditPage {
    let rules: Rules = state
        .get(keys::RULES)
        .map(|bytes| decode(keys::RULES, &bytes))
        .unwrap_or_default();
    let policy = &rules.identity;
    let blocks = policy.block_list();
    let mut page = AuditPage {
        kinds: policy
            .kinds
            .keys()
            .map(|kind| (kind.clone(), KindAudit::default()))
            .collect(),
        next: None,
    };
    let mut read = 0;
    let in_profiles = after.is_some_and(|key| key.first() == Some(&b'p'));
    if !in_profiles {
        let pairs = state.scan(b"i", after, false, limit);
        read += pairs.len();
        for (key, _) in &pairs {
            let identity = identity_of(key);
            if blocks.blocks(&identity) {
                page.kinds.entry(identity.kind).or_default().blocked_bound += 1;
            }
        }
        if read == limit {
            page.next = pairs.last().map(|(key, _)| key.clone());
            return page;
        }
    }
    let pairs = state.scan(b"p", after.filter(|_| in_profiles), false, limit - read);
    for (key, value) in &pairs {
        let profile: Profile = decode(key, value);
        for (kind, values) in &profile.identities {
            if policy
                .max_per_profile(kind)
                .is_some_and(|max| values.len() > max as usize)
            {
                page.kinds.entry(kind.clone()).or_default().over_limit += 1;
            }
        }
    }
    if read + pairs.len() == limit {
        page.next = pairs.last().map(|(key, _)| key.clone());
    }
    page
}

/// The identity of an index key (`i kind 0x00 value`).
fn identity_of(key: &[u8]) -> Identity {
    let text = std::str::from_utf8(&key[1..]).expect("identity keys are UTF-8");
    let (kind, value) = text
        .split_once('\0')
        .expect("an identity key holds kind 0x00 value");
    Identity {
        kind: kind.to_string(),
        value: value.to_string(),
    }
}
