//! A shard's Raft log as this node's fjall holds it: the replica core's [`LogSource`].

use super::Storage;
use oneid_protocol::ids::ShardId;
use oneid_replica::log::{entry_key, LogSource};
use std::sync::Arc;

/// The log of one hosted shard, of its current generation, and the node's meta records.
pub struct FjallLog {
    storage: Arc<Storage>,
    shard: ShardId,
}

impl FjallLog {
    pub fn new(storage: Arc<Storage>, shard: ShardId) -> FjallLog {
        FjallLog { storage, shard }
    }
}

impl LogSource for FjallLog {
    fn entry(&self, index: u64) -> Option<Vec<u8>> {
        self.storage
            .log(self.shard)
            .get(entry_key(index))
            .unwrap_or_else(|e| panic!("reading the log failed: {e}"))
            .map(|v| v.to_vec())
    }

    fn last_stored(&self) -> Option<u64> {
        let (key, _) = self
            .storage
            .log(self.shard)
            .last_key_value()
            .map(|guard| guard.into_inner())
            .transpose()
            .unwrap_or_else(|e| panic!("reading the log failed: {e}"))?;
        Some(u64::from_be_bytes(
            key.as_ref().try_into().expect("log keys are indexes"),
        ))
    }

    fn meta(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.storage
            .meta
            .get(key)
            .unwrap_or_else(|e| panic!("reading meta failed: {e}"))
            .map(|v| v.to_vec())
    }
}
