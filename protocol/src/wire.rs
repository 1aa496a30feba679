//! Events as a client writes them: one type per event type, serialized to exactly the JSON
//! that `POST /v1/events` documents.
//!
//! The server does not read these types: [`Event::parse`] reads an event field by field so
//! that each error names its field. What ties the two together is a test: every [`NewEvent`]
//! made from an [`Event`] serializes to JSON that parses back to that same `Event`.
//!
//! ```
//! use oneid_protocol::wire::{EventKind, NewEvent, Order};
//! use oneid_protocol::Decimal;
//!
//! let order = NewEvent::new(
//!     "tmall-7781",
//!     EventKind::Order(Order {
//!         order_id: "T7781".into(),
//!         amount: Decimal::new(19_990, 2),
//!         store: None,
//!     }),
//! )
//! .identity("phone", "13800000001")
//! .channel("tmall");
//! assert_eq!(
//!     serde_json::to_string(&order).unwrap(),
//!     r#"{"event_id":"tmall-7781","identities":{"phone":"13800000001"},"channel":"tmall","type":"order","order_id":"T7781","amount":"199.90"}"#
//! );
//! ```

use crate::event::{Event, EventBody};
use crate::num::Millis;
use crate::predicate::Value;
use rust_decimal::Decimal;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Serialize, Serializer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// One event of `POST /v1/events`: the fields every event may carry, then its type's own.
///
/// An event names its profile by `oneid`, by `identities`, or both; without `ts` it is dated
/// by the cluster's time when a node receives it.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct NewEvent {
    /// Unique per event (1 to 128 bytes): a retry with the same id is answered `duplicate`.
    #[schemars(length(min = 1, max = 128))]
    pub event_id: String,
    /// The profile the event names directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^o[0-9a-f]{16}$"))]
    pub oneid: Option<String>,
    /// Identities of the customer, kind → value (at most 50): each is bound to the profile.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 50))]
    pub identities: BTreeMap<String, String>,
    /// When it happened (RFC 3339); the cluster's time when received if left out.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub ts: Option<OffsetDateTime>,
    /// Where it happened, `[a-z0-9_]{1,32}` (keys the rules' channel multipliers).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{1,32}$"))]
    pub channel: Option<String>,
    /// The event's type and its own fields.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl NewEvent {
    /// An event of `kind` with id `event_id`, naming no profile yet (add `oneid` or
    /// `identity`).
    pub fn new(event_id: impl Into<String>, kind: EventKind) -> NewEvent {
        NewEvent {
            event_id: event_id.into(),
            oneid: None,
            identities: BTreeMap::new(),
            ts: None,
            channel: None,
            kind,
        }
    }

    /// Names the profile by its OneID.
    pub fn oneid(mut self, oneid: impl Into<String>) -> NewEvent {
        self.oneid = Some(oneid.into());
        self
    }

    /// Adds an identity (`kind` → `value`; a second value of a kind replaces the first).
    pub fn identity(mut self, kind: impl Into<String>, value: impl Into<String>) -> NewEvent {
        self.identities.insert(kind.into(), value.into());
        self
    }

    /// Dates the event.
    pub fn at(mut self, ts: OffsetDateTime) -> NewEvent {
        self.ts = Some(ts);
        self
    }

    /// Says where the event happened.
    pub fn channel(mut self, channel: impl Into<String>) -> NewEvent {
        self.channel = Some(channel.into());
        self
    }
}

/// The event types, each with its own fields (`type` on the wire).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    Order(Order),
    Refund(Refund),
    PointsEarn(PointsEarn),
    PointsRedeem(PointsRedeem),
    PointsAdjust(PointsAdjust),
    TagAdd(TagAdd),
    TagRemove(TagRemove),
    ProfileUpdate(ProfileUpdate),
    /// Binds the event's identities to one profile and changes nothing else.
    Identify,
    Interaction(Interaction),
    /// Removes the event's identities from the profile its `oneid` names (required) and frees
    /// them: the next event naming one binds it afresh; an event dated before the unlink never
    /// binds it back to that profile (`not_linked`, reason `unlinked`). Moves no points.
    Unlink,
}

/// A purchase: spend, points by the rules, and the order kept for refunds.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Order {
    /// Unique on the profile (1 to 256 bytes).
    #[schemars(length(min = 1, max = 256))]
    pub order_id: String,
    /// Positive, at most 2 decimals (a decimal string; a JSON number is accepted too).
    #[schemars(schema_with = "crate::num::money_schema")]
    pub amount: Decimal,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub store: Option<String>,
}

/// Refunds part of an order, or (without `amount`) the rest of it.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Refund {
    #[schemars(length(min = 1, max = 256))]
    pub order_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::num::money_schema")]
    pub amount: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PointsEarn {
    /// Positive, at most 10^12.
    #[schemars(range(min = 1, max = 1_000_000_000_000i64))]
    pub points: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub reason: Option<String>,
    /// When these points expire (after the shard's clock); the rules' default if left out.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PointsRedeem {
    /// Positive, at most the balance.
    #[schemars(range(min = 1, max = 1_000_000_000_000i64))]
    pub points: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct PointsAdjust {
    /// Non-zero, either sign, at most 10^12 in size.
    #[schemars(range(min = -1_000_000_000_000i64, max = 1_000_000_000_000i64))]
    pub points: i64,
    #[schemars(length(min = 1, max = 256))]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct TagAdd {
    #[schemars(length(min = 1, max = 64))]
    pub tag: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct TagRemove {
    #[schemars(length(min = 1, max = 64))]
    pub tag: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ProfileUpdate {
    /// 1 to 100 names `[a-z0-9_]{1,64}`; null removes the attribute.
    #[schemars(length(min = 1, max = 100))]
    pub attributes: BTreeMap<String, Option<Attribute>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Interaction {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Any JSON object, at most 16 KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<serde_json::Map<String, serde_json::Value>>,
}

/// An attribute's value: a bool, an exact decimal (written as a JSON number) or a string.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute(pub Value);

impl From<bool> for Attribute {
    fn from(value: bool) -> Attribute {
        Attribute(Value::Bool(value))
    }
}

impl From<Decimal> for Attribute {
    fn from(value: Decimal) -> Attribute {
        Attribute(Value::Number(value))
    }
}

impl From<&str> for Attribute {
    fn from(value: &str) -> Attribute {
        Attribute(Value::String(value.to_string()))
    }
}

impl From<String> for Attribute {
    fn from(value: String) -> Attribute {
        Attribute(Value::String(value))
    }
}

impl Serialize for Attribute {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::String(s) => serializer.serialize_str(s),
            // The exact decimal as a JSON number: through a float it would be rounded.
            Value::Number(n) => serde_json::value::RawValue::from_string(n.to_string())
                .map_err(serde::ser::Error::custom)?
                .serialize(serializer),
        }
    }
}

impl JsonSchema for Attribute {
    fn schema_name() -> Cow<'static, str> {
        "Attribute".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A bool, a number (exact, up to 28 significant digits) or a string of at most 1 KiB.",
            "type": ["boolean", "number", "string"],
            "maxLength": 1024
        })
    }
}

fn date(ms: Millis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms.0) * 1_000_000)
        .expect("a parsed timestamp is in range")
}

impl From<&Event> for NewEvent {
    /// The wire form of a validated event (dated: `ts` is always given).
    fn from(event: &Event) -> NewEvent {
        NewEvent {
            event_id: event.event_id.clone(),
            oneid: event.oneid.map(|oneid| oneid.to_string()),
            identities: event
                .identities
                .iter()
                .map(|identity| (identity.kind.clone(), identity.value.clone()))
                .collect(),
            ts: Some(date(event.ts)),
            channel: event.channel.clone(),
            kind: EventKind::from(&event.body),
        }
    }
}

impl From<&EventBody> for EventKind {
    fn from(body: &EventBody) -> EventKind {
        match body.clone() {
            EventBody::Order {
                order_id,
                amount,
                store,
            } => EventKind::Order(Order {
                order_id,
                amount: amount.to_decimal(),
                store,
            }),
            EventBody::Refund { order_id, amount } => EventKind::Refund(Refund {
                order_id,
                amount: amount.map(|a| a.to_decimal()),
            }),
            EventBody::PointsEarn {
                points,
                reason,
                expires_at,
            } => EventKind::PointsEarn(PointsEarn {
                points,
                reason,
                expires_at: expires_at.map(date),
            }),
            EventBody::PointsRedeem { points, reason } => {
                EventKind::PointsRedeem(PointsRedeem { points, reason })
            }
            EventBody::PointsAdjust { points, reason } => {
                EventKind::PointsAdjust(PointsAdjust { points, reason })
            }
            EventBody::TagAdd { tag, expires_at } => EventKind::TagAdd(TagAdd {
                tag,
                expires_at: expires_at.map(date),
            }),
            EventBody::TagRemove { tag } => EventKind::TagRemove(TagRemove { tag }),
            EventBody::ProfileUpdate { attributes } => EventKind::ProfileUpdate(ProfileUpdate {
                attributes: attributes
                    .into_iter()
                    .map(|(name, value)| (name, value.map(Attribute)))
                    .collect(),
            }),
            EventBody::Identify => EventKind::Identify,
            EventBody::Unlink => EventKind::Unlink,
            EventBody::Interaction { name, properties } => EventKind::Interaction(Interaction {
                name,
                properties: properties
                    .map(|text| serde_json::from_str(&text).expect("kept as a JSON object")),
            }),
        }
    }
}
