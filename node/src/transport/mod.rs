//! The peer transport: what nodes send each other, and how.
//!
//! # Layout
//! - `handshake`: the first bytes of every connection, proving both sides know the cluster
//!   secret before anything else is decoded.
//! - `tcp`: persistent connections per peer (one each way), bounded queues, reconnects with
//!   backoff, and requests with their answers.
//! - this file: the frames, their codec and its limits, and the [`Transport`] trait the
//!   replicas send Raft messages through (TCP on a node, memory in the simulation).
//!
//! Architecture invariant: `transport` knows nothing of state or Raft. It carries Raft
//! messages as bytes, tagged with their shard, and requests and answers as bytes the routing
//! layer (`shards`) encodes.

pub mod handshake;
pub mod tcp;

use serde::{Deserialize, Serialize};

/// Most bytes of one frame (a Raft append of a large batch of events is a few MiB; the limit
/// leaves room). A peer that sends a larger one is cut off.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What travels on a peer connection after the handshake, postcard-encoded behind a 4-byte
/// big-endian length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Raft messages of one shard, each protobuf-encoded.
    Raft { shard: u32, messages: Vec<Vec<u8>> },
    /// Sent every `PING_INTERVAL` on every connection: the sender is up, leads these shards,
    /// and its wall clock read `wall` (the cluster's majority time, see
    /// `clock::ClusterClock`).
    Ping {
        leads: Vec<Lead>,
        wall: oneid_protocol::num::Millis,
    },
    /// A request for the receiver to carry out (a forwarded proposal or read); its sender
    /// waits `within_ms` for the answer, and the receiver drops the work past that.
    Request {
        id: u64,
        body: Vec<u8>,
        within_ms: u32,
    },
    /// The answer to request `id` of the receiver.
    Response { id: u64, body: Vec<u8> },
    /// Request `id` of the receiver was refused unheard: the sender has as many requests (or
    /// bytes of them) in flight here as the limits allow.
    Busy { id: u64 },
}

/// A shard the pinging node leads: its term, and the binding epoch of the leader's replica
/// (which every node's cache of bindings follows, see `storage::StateReader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lead {
    pub shard: u32,
    pub term: u64,
    pub binding_epoch: u64,
}

/// Why a frame was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is over the limit")]
    Oversized(usize),
    #[error("a frame that does not decode")]
    Malformed,
}

impl FrameError {
    pub fn label(self) -> &'static str {
        match self {
            FrameError::Oversized(_) => "oversized",
            FrameError::Malformed => "malformed",
        }
    }
}

impl Frame {
    /// Appends the frame, length first, to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let body = postcard::to_extend(self, std::mem::take(out)).expect("frames encode");
        *out = body;
        let length = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&length.to_be_bytes());
    }

    /// A frame's length prefix, checked against the limit.
    pub fn length(prefix: [u8; 4]) -> Result<usize, FrameError> {
        let length = u32::from_be_bytes(prefix) as usize;
        if length > FRAME_BYTES_MAX {
            return Err(FrameError::Oversized(length));
        }
        Ok(length)
    }

    pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
        postcard::from_bytes(body).map_err(|_| FrameError::Malformed)
    }
}

/// How a replica's Raft messages reach the replicas of its shard on other nodes.
pub trait Transport: Send + Sync {
    /// Queues `messages` (protobuf-encoded) of `shard` for node `to`. False if they cannot go
    /// (the peer's queue is full, or it is unknown): raft-rs is then told the peer is
    /// unreachable, and the messages are dropped; memory never grows for a slow peer.
    fn send_raft(&self, to: u64, shard: u32, messages: Vec<Vec<u8>>) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_behind_their_length() {
        let frames = [
            Frame::Raft {
                shard: 3,
                messages: vec![vec![1, 2, 3], vec![]],
            },
            Frame::Ping {
                leads: vec![
                    Lead {
                        shard: 0,
                        term: 7,
                        binding_epoch: 0,
                    },
                    Lead {
                        shard: 5,
                        term: 9,
                        binding_epoch: 2,
                    },
                ],
                wall: oneid_protocol::num::Millis(1_767_225_600_000),
            },
            Frame::Request {
                id: 11,
                body: b"body".to_vec(),
                within_ms: 1_000,
            },
            Frame::Response {
                id: 11,
                body: b"answer".to_vec(),
            },
            Frame::Busy { id: 12 },
        ];
        let mut out = Vec::new();
        for frame in &frames {
            frame.encode_into(&mut out);
        }
        let mut rest = out.as_slice();
        for frame in &frames {
            let length = Frame::length(rest[..4].try_into().unwrap()).unwrap();
            assert_eq!(&Frame::decode(&rest[4..4 + length]).unwrap(), frame);
            rest = &rest[4 + length..];
        }
        assert!(rest.is_empty());
        assert_eq!(
            Frame::length((FRAME_BYTES_MAX as u32 + 1).to_be_bytes()),
            Err(FrameError::Oversized(FRAME_BYTES_MAX + 1))
        );
        assert_eq!(Frame::decode(&[200, 1]), Err(FrameError::Malformed));
    }
}
