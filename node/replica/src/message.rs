//! The messages replicas of a shard send each other, as the shells see them: opaque values to
//! carry, with their sender and receiver, that encode to and decode from bytes. raft-rs's
//! protobuf types stay inside this crate.

use protobuf::Message as _;
use raft::eraftpb::{self, MessageType};

/// One Raft message between two replicas of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Message(pub(crate) eraftpb::Message);

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
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        eraftpb::Message::parse_from_bytes(bytes)
            .map(Message)
            .map_err(DecodeError::of)
    }

    pub fn encode(&self) -> Vec<u8> {
        self.0.write_to_bytes().expect("raft messages encode")
    }

    /// The replica that sent it (its replica id, as in `ReplicaConfig::replicas`).
    pub fn sender(&self) -> u64 {
        self.0.from
    }

    /// The replica it is for.
    pub fn receiver(&self) -> u64 {
        self.0.to
    }

    pub fn kind(&self) -> MessageKind {
        match self.0.get_msg_type() {
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
        self.0.reject
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
        let message = Message(raw);
        let back = Message::decode(&message.encode()).expect("decodes");
        assert_eq!(back, message);
        assert_eq!(
            (back.sender(), back.receiver(), back.kind()),
            (7, 9, MessageKind::Heartbeat)
        );
        assert!(Message::decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
