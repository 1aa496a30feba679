//! The shell of the replica core (`oneid_replica`) on a node.
//!
//! # Layout
//! - `actor`: an actix actor per hosted shard that feeds the core its inputs (with the node's
//!   clocks), hands its writes to the writer, its messages to the transport, and its answers
//!   to those who asked.
pub mod actor;
