//! The messages replicas of a shard send each other, as the shells see them: opaque values to
//! carry, with their sender and receiver, that encode to and decode from bytes. raft-rs's
//! protobuf types stay inside this crate.
//!
//! Each message carries the replica that sent it and its wall clock when it made it: what a
//! leader learns its followers' clocks from (the shard's majority time, see `clocks`). The
//! sender is not always the Raft message's `from`: raft-rs forwards some messages (a
//! follower's ReadIndex or leadership transfer request) keeping their origin's `from`.

use oneid_protocol::num::Millis;
use protobuf::Message as _;
use raft::eraftpb::{self, MessageType};

/// One Raft message between two replicas of a shard, with its sender's wall clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub(crate) raft: eraftpb::Message,
    /// The replica that sent it (its replica id).
    pub(crate) stamped_by: u64,
    /// The sender's wall clock when it made the message: a time its node had reached.
    pub(crate) wall: Millis,
}

/// The bytes of the sender's replica id and wall clock ahead of the protobuf message.
const STAMP_BYTES: usize = 16;

/// Bytes that are not the Raft message or log entry they should be.
#[derive(Debug, thiserror::Error)]
#[error("not a raft record: {0}")]
pub struct DecodeError(String);

impl DecodeError {
    pub(crate) fn of(error: protobuf::ProtobufError) -> DecodeError {
        DecodeError(error.to_string())
    }
}

/// What a message asks or answers, as far as a shell needs to tell (the transport's check of
/// what a peer may send, the simulation's counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Entries to append (or a probe), and its answer.
    Append,
    AppendResponse,
    /// A leader's heartbeat, and its answer.
    Heartbeat,
    HeartbeatResponse,
    /// A (pre-)vote request and its answer.
    RequestVote,
    RequestVoteResponse,
    RequestPreVote,
    RequestPreVoteResponse,
    /// A snapshot's metadata (its state travels outside Raft, see `snapshot`).
    Snapshot,
    /// A ReadIndex request (forwarded by a follower on a reader's behalf) and its answer.
    ReadIndex,
    ReadIndexResponse,
    /// Asks the leader to transfer leadership; tells the target to campaign at once.
    TransferLeader,
    TimeoutNow,
    /// Anything else raft-rs sends between replicas.
    Other,
}

impl Message {
    /// Reads the sender's replica id and wall clock (8 bytes each, big-endian; the clock in
    /// milliseconds since the epoch), then the protobuf message.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let Some((stamp, raft)) = bytes.split_first_chunk::<STAMP_BYTES>() else {
            return Err(DecodeError(format!(
                "{} bytes, shorter than a sender and its clock",
                bytes.len()
            )));
        };
        let raft = eraftpb::Message::parse_from_bytes(raft).map_err(DecodeError::of)?;
        let (sender, wall) = stamp.split_at(8);
        Ok(Message {
            raft,
            stamped_by: u64::from_be_bytes(sender.try_into().expect("8 bytes")),
            wall: Millis(i64::from_be_bytes(wall.try_into().expect("8 bytes"))),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.stamped_by.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.wall.0.to_be_bytes());
        self.raft
            .write_to_writer(&mut bytes)
            .expect("raft messages encode");
        bytes
    }

    /// The replica that sent it (its replica id, as in `ReplicaConfig::replicas`).
    pub fn sender(&self) -> u64 {
        self.raft.from
    }

    /// The replica that sent it over the wire, whose clock it carries: `sender()`, but for
    /// a message raft-rs forwarded on another replica's behalf.
    pub fn stamped_by(&self) -> u64 {
        self.stamped_by
    }

    /// The replica it is for.
    pub fn receiver(&self) -> u64 {
        self.raft.to
    }

    pub fn kind(&self) -> MessageKind {
        match self.raft.get_msg_type() {
            MessageType::MsgAppend => MessageKind::Append,
            MessageType::MsgAppendResponse => MessageKind::AppendResponse,
            MessageType::MsgHeartbeat => MessageKind::Heartbeat,
            MessageType::MsgHeartbeatResponse => MessageKind::HeartbeatResponse,
            MessageType::MsgRequestVote => MessageKind::RequestVote,
            MessageType::MsgRequestVoteResponse => MessageKind::RequestVoteResponse,
            MessageType::MsgRequestPreVote => MessageKind::RequestPreVote,
            MessageType::MsgRequestPreVoteResponse => MessageKind::RequestPreVoteResponse,
            MessageType::MsgSnapshot => MessageKind::Snapshot,
            MessageType::MsgReadIndex => MessageKind::ReadIndex,
            MessageType::MsgReadIndexResp => MessageKind::ReadIndexResponse,
            MessageType::MsgTransferLeader => MessageKind::TransferLeader,
            MessageType::MsgTimeoutNow => MessageKind::TimeoutNow,
            _ => MessageKind::Other,
        }
    }

    /// Whether a rejection: a (pre-)vote refused, an append that did not match.
    pub fn rejects(&self) -> bool {
        self.raft.reject
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_travels_as_bytes_and_garbage_does_not_decode() {
        let mut raw = eraftpb::Message::default();
        raw.set_msg_type(MessageType::MsgHeartbeat);
        raw.from = 7;
        raw.to = 9;
        raw.term = 3;
        let message = Message {
            raft: raw,
            stamped_by: 8,
            wall: Millis(1_767_225_600_000),
        };
        let back = Message::decode(&message.encode()).expect("decodes");
        assert_eq!(back, message);
        assert_eq!(
            (back.sender(), back.receiver(), back.kind()),
            (7, 9, MessageKind::Heartbeat)
        );
        assert_eq!((back.stamped_by, back.wall), (8, Millis(1_767_225_600_000)));
        assert!(Message::decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(Message::decode(&[[0; 15].as_slice(), &[1, 0xff, 0xff, 0xff]].concat()).is_err());
    }
}
