//! Types shared by the OneID node and its clients: identifiers, exact numbers, events, rules,
//! the rule language and the HTTP API's bodies.
//!
//! # Layout
//! - [`ids`]: shards, OneIDs, identities and their stable routing hashes.
//! - [`num`]: money in cents, exact decimals, timestamps.
//! - [`event`]: the event wire format, its validation, and the validated `Event` of the log.
//! - [`policy`]: the identity policy: blocked values, per-kind limits, merge and priority.
//! - [`rules`]: loyalty rules (points, tiers, tag rules), wire and validated forms.
//! - [`predicate`]: the predicate language of tag rules and segments.
//! - [`segments`]: segment definitions, documents, members pages and stream changes.
//! - [`wire`]: events as a client writes them, one type per event type.
//! - [`strict`]: reading request documents, refusing fields their type does not have.
//! - [`api`]: request and response bodies, error codes, limits of the API.
//! - [`openapi`]: the OpenAPI document of the HTTP API, generated from these types.
//!
//! Architecture invariant: this crate knows nothing about transport, storage, Raft or async
//! runtimes. It parses, validates and describes; it never does I/O.

pub mod api;
pub mod event;
pub mod ids;
pub mod num;
#[doc(hidden)]
pub mod open_enum;
pub mod openapi;
pub mod policy;
pub mod predicate;
pub mod rules;
pub mod segments;
pub mod strict;
pub mod wire;

#[cfg(test)]
mod parser_props;

pub use api::ErrorCode;
/// The exact decimals of amounts and attributes, and the timestamps of events.
pub use rust_decimal::Decimal;
pub use time::OffsetDateTime;
