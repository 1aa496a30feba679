//! Identifiers: shards, OneIDs and identities, and the stable hashes that route them.
//!
//! Routing must give the same answer on every node and in every version, so it uses
//! xxh3 (a fixed, specified hash), never the standard library's randomized hasher.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The index of a shard (a Raft group) in the cluster, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The most shards a cluster may have: the shard index is stored in 16 bits of a OneID.
pub const SHARDS_MAX: u32 = 4096;

/// A unified customer id. Minted deterministically by the shard that creates the profile,
/// from the shard and the shard's replicated profile counter, so every replica mints the same
/// id. The shard is recoverable from the id, which makes a OneID its own address.
///
/// Layout: `shard (16 bits) | sequence (48 bits)`; text form: `o` and 16 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OneId(pub u64);

/// Profiles one shard can mint over its life (48 bits of sequence).
pub const PROFILE_SEQUENCE_MAX: u64 = (1 << 48) - 1;

impl OneId {
    /// Mints the id of profile number `sequence` of `shard` (sequences start at 1).
    pub fn mint(shard: ShardId, sequence: u64) -> OneId {
        assert!(shard.0 < SHARDS_MAX, "shard {shard} above SHARDS_MAX");
        assert!(
            (1..=PROFILE_SEQUENCE_MAX).contains(&sequence),
            "profile sequence {sequence} out of range"
        );
        OneId((u64::from(shard.0) << 48) | sequence)
    }

    /// The shard that owns this profile.
    pub fn shard(self) -> ShardId {
        ShardId((self.0 >> 48) as u32)
    }
}

impl fmt::Display for OneId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "o{:016x}", self.0)
    }
}

impl FromStr for OneId {
    type Err = ();
    fn from_str(s: &str) -> Result<OneId, ()> {
        let hex = s.strip_prefix('o').ok_or(())?;
        if hex.len() != 16
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(());
        }
        u64::from_str_radix(hex, 16).map(OneId).map_err(|_| ())
    }
}

/// Most bytes of an identity value.
pub const IDENTITY_VALUE_BYTES_MAX: usize = 256;
/// Most bytes of an identity kind (`[a-z0-9_]{1,32}`).
pub const IDENTITY_KIND_BYTES_MAX: usize = 32;

/// One identity of a customer: a kind (`phone`, `wechat_unionid`, ...) and a byte-exact value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub kind: String,
    pub value: String,
}

impl Identity {
    /// The shard that holds this identity's entry in the identity → OneID index.
    pub fn shard(&self, n_shards: u32) -> ShardId {
        // xxh3 of `kind 0x00 value`, hashed in one call (the streaming hasher's setup cost
        // more than the hash of these few bytes).
        let mut bytes = Vec::with_capacity(self.kind.len() + 1 + self.value.len());
        bytes.extend_from_slice(self.kind.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(self.value.as_bytes());
        ShardId((xxhash_rust::xxh3::xxh3_64(&bytes) % u64::from(n_shards)) as u32)
    }
}

/// The part of an identity that [`check_identity`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityPart {
    Kind,
    Value,
}

/// Checks an identity as events and lookups take it: a kind `[a-z0-9_]{1,32}` and a value of
/// 1 to 256 bytes. The error names the part at fault and says what is wrong with it.
pub fn check_identity(kind: &str, value: &str) -> Result<(), (IdentityPart, String)> {
    if !is_name(kind, IDENTITY_KIND_BYTES_MAX) {
        return Err((
            IdentityPart::Kind,
            format!(
                "identity kind must match [a-z0-9_]{{1,{IDENTITY_KIND_BYTES_MAX}}}, found {:?}",
                abbreviate(kind)
            ),
        ));
    }
    if value.is_empty() || value.len() > IDENTITY_VALUE_BYTES_MAX {
        return Err((
            IdentityPart::Value,
            format!(
                "identity value must be 1 to {IDENTITY_VALUE_BYTES_MAX} bytes, found {}",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// `text`, cut to about 40 bytes (on a character boundary) for an error message.
pub(crate) fn abbreviate(text: &str) -> String {
    if text.len() <= 40 {
        return text.to_string();
    }
    let cut = (0..=40)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}...", &text[..cut])
}

/// Whether `kind` is a valid identity kind or tag/channel-like name: `[a-z0-9_]{1,max}`.
pub fn is_name(kind: &str, max: usize) -> bool {
    !kind.is_empty()
        && kind.len() <= max
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oneid_round_trips_and_knows_its_shard() {
        let id = OneId::mint(ShardId(7), 0x3039);
        assert_eq!(id.shard(), ShardId(7));
        assert_eq!(id.to_string(), "o0007000000003039");
        assert_eq!("o0007000000003039".parse::<OneId>(), Ok(id));
        assert!("o0007".parse::<OneId>().is_err());
        assert!("x0007000030390003".parse::<OneId>().is_err());
        assert!("o0007000030390G03".parse::<OneId>().is_err());
    }

    #[test]
    fn identity_routing_is_stable() {
        // A fixed expected value: routing must never change between versions.
        let phone = Identity {
            kind: "phone".into(),
            value: "13800000000".into(),
        };
        assert_eq!(phone.shard(1), ShardId(0));
        assert_eq!(phone.shard(16), ShardId(8));
        assert_eq!(phone.shard(1 << 20), ShardId(539_912));
        let spread: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| {
                Identity {
                    kind: "phone".into(),
                    value: format!("138{i:08}"),
                }
                .shard(16)
                .0
            })
            .collect();
        assert_eq!(spread.len(), 16, "identities spread over every shard");
    }
}
