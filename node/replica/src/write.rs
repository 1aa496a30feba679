//! What a replica asks its shell to make durable: [`WriteOp`]s, each naming the space it goes
//! to. The shell (fjall on a node, maps in the simulation) writes one Ready's ops in one atomic
//! batch; the replica never writes itself.

use oneid_protocol::ids::ShardId;

/// Where a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// The node's records: each shard's hard state, conf state, log meta and generation.
    Meta,
    /// A shard's Raft log (entries by index).
    Log(ShardId),
    /// A shard's state machine (see `oneid_state::keys`).
    State(ShardId),
}

/// One pair to write (or delete) in a space.
pub struct WriteOp {
    pub space: Space,
    pub key: Vec<u8>,
    /// `None` deletes.
    pub value: Option<Vec<u8>>,
}

impl WriteOp {
    /// Writes `value` at `key` in `space`.
    pub fn put(space: Space, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> WriteOp {
        WriteOp {
            space,
            key: key.into(),
            value: Some(value.into()),
        }
    }
}
