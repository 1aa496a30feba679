//! Replicas: one shard's Raft group member on this node. The only module that knows raft-rs.
//!
//! # Layout
//! - `core`: the replica without I/O: raft-rs's `RawNode`, proposals, ReadIndex rounds, the
//!   apply of committed entries into the shard's state machine, and what the shell must do.
//! - `log`: the Raft log over a key-value store (raft-rs's `Storage`).
//! - `actor`: the shell on a node: an actix actor that feeds the core, hands its writes to the
//!   writer, its messages to the transport, and its answers to those who asked.

pub mod actor;
pub mod core;
pub mod log;
