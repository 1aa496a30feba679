//! The shards as this node reaches them: proposals to a shard's replica, gathered answers.
//!
//! Every shard has a replica on this node today (one-node clusters); replication replaces
//! this with a routing table of local replicas and leader hints.

use crate::command::{Command, Output};
use crate::replica::actor::{Propose, ShardActor};
use crate::replica::core::ShardError;
use actix::Addr;
use oneid_protocol::ids::ShardId;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// Addresses of every shard's actor, set once all are started.
pub type ShardMap = Arc<OnceLock<Vec<Addr<ShardActor>>>>;

/// Proposes `command` at `shard`; answers once it is committed, applied and durable.
pub async fn propose(
    shards: &ShardMap,
    shard: ShardId,
    command: Command,
) -> Result<Output, ShardError> {
    let addr = &shards
        .get()
        .expect("shards are started before anything proposes")[shard.0 as usize];
    addr.send(Propose(command))
        .await
        .unwrap_or(Err(ShardError::Stopped(shard)))
}

/// Runs one future per shard, all at once, and collects their answers by shard.
pub async fn per_shard<T, F: std::future::Future<Output = T>>(
    calls: impl IntoIterator<Item = (ShardId, F)>,
) -> BTreeMap<ShardId, T> {
    let (shards, futures): (Vec<ShardId>, Vec<F>) = calls.into_iter().unzip();
    shards
        .into_iter()
        .zip(futures::future::join_all(futures).await)
        .collect()
}
