//! Events: the wire form (JSON), validation, and the validated form replicated in the log.
//!
//! Parsing is field by field from a JSON object so that every error names its field, and
//! one bad event in a batch is rejected alone.

use crate::ids::{abbreviate, check_identity, is_name, Identity, OneId};
use crate::num::{literal_text, parse_decimal, Millis, Money};
use crate::predicate::Value;
use crate::ErrorCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Most bytes of an `event_id`.
pub const EVENT_ID_BYTES_MAX: usize = 128;
/// Most bytes of an `order_id`, `store`, `reason`, interaction `name`.
pub const TEXT_BYTES_MAX: usize = 256;
/// Most bytes of a tag name.
pub const TAG_BYTES_MAX: usize = 64;
/// Most bytes of a channel name (`[a-z0-9_]{1,32}`).
pub const CHANNEL_BYTES_MAX: usize = 32;
/// Most bytes of an attribute name (`[a-z0-9_]{1,64}`).
pub const ATTRIBUTE_NAME_BYTES_MAX: usize = 64;
/// Most bytes of a string attribute value.
pub const ATTRIBUTE_VALUE_BYTES_MAX: usize = 1024;
/// Most attributes one `profile_update` may set.
pub const ATTRIBUTES_PER_EVENT_MAX: usize = 100;
/// Most identities one event may name.
pub const IDENTITIES_PER_EVENT_MAX: usize = 50;
/// Most bytes of an interaction's `properties` (JSON text).
pub const PROPERTIES_BYTES_MAX: usize = 16 * 1024;
/// Largest `points` of one event.
pub const POINTS_PER_EVENT_MAX: i64 = 1_000_000_000_000;

/// A validated event, as proposed to a shard and stored in its Raft log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    /// The profile the event names directly, if any.
    pub oneid: Option<OneId>,
    /// The identities the event names, sorted and without repeats.
    pub identities: Vec<Identity>,
    /// When it happened; the node's receive time when the event did not say.
    pub ts: Millis,
    pub channel: Option<String>,
    pub body: EventBody,
}

/// What an event does, by type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventBody {
    Order {
        order_id: String,
        amount: Money,
        store: Option<String>,
    },
    /// `amount` None refunds the rest of the order.
    Refund {
        order_id: String,
        amount: Option<Money>,
    },
    PointsEarn {
        points: i64,
        reason: Option<String>,
        expires_at: Option<Millis>,
    },
    PointsRedeem {
        points: i64,
        reason: Option<String>,
    },
    PointsAdjust {
        points: i64,
        reason: String,
    },
    TagAdd {
        tag: String,
        expires_at: Option<Millis>,
    },
    TagRemove {
        tag: String,
    },
    /// Sorted by name; `None` removes the attribute.
    ProfileUpdate {
        attributes: Vec<(String, Option<Value>)>,
    },
    Identify,
    /// `properties` is kept as compact JSON text; interactions update channels and times.
    Interaction {
        name: String,
        properties: Option<String>,
    },
    /// Removes the event's identities from the profile its `oneid` names and frees them (see
    /// `oneid_state`'s `unlink.rs`): routed by `oneid` alone, never by the identities.
    Unlink,
}

impl EventBody {
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::Order { .. } => "order",
            EventBody::Refund { .. } => "refund",
            EventBody::PointsEarn { .. } => "points_earn",
            EventBody::PointsRedeem { .. } => "points_redeem",
            EventBody::PointsAdjust { .. } => "points_adjust",
            EventBody::TagAdd { .. } => "tag_add",
            EventBody::TagRemove { .. } => "tag_remove",
            EventBody::ProfileUpdate { .. } => "profile_update",
            EventBody::Identify => "identify",
            EventBody::Interaction { .. } => "interaction",
            EventBody::Unlink => "unlink",
        }
    }
}

/// Why an event was rejected: a code, a message, and the field at fault when there is one.
// JSON leaves `field` out when there is none; binary encodings (postcard: merge records,
// peers' answers) always carry it, since they read fields by position.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
pub struct EventError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub field: Option<String>,
}

impl Serialize for EventError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let omit_field = serializer.is_human_readable() && self.field.is_none();
        let mut out = serializer.serialize_struct("EventError", 3)?;
        out.serialize_field("code", &self.code)?;
        out.serialize_field("message", &self.message)?;
        if omit_field {
            out.skip_field("field")?;
        } else {
            out.serialize_field("field", &self.field)?;
        }
        out.end()
    }
}

impl EventError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> EventError {
        EventError {
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn field(code: ErrorCode, field: &str, message: impl Into<String>) -> EventError {
        EventError {
            code,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }

    fn invalid(field: &str, message: impl Into<String>) -> EventError {
        EventError::field(ErrorCode::InvalidField, field, message)
    }

    /// The error of a required field that is absent (or null), the same for every field.
    fn missing(field: &str) -> EventError {
        EventError::field(
            ErrorCode::MissingField,
            field,
            format!("{field} is required"),
        )
    }
}

/// The fields every event may carry, and those each type adds.
const COMMON_FIELDS: &[&str] = &["event_id", "type", "oneid", "identities", "ts", "channel"];

fn type_fields(event_type: &str) -> Option<&'static [&'static str]> {
    Some(match event_type {
        "order" => &["order_id", "amount", "store"],
        "refund" => &["order_id", "amount"],
        "points_earn" => &["points", "reason", "expires_at"],
        "points_redeem" => &["points", "reason"],
        "points_adjust" => &["points", "reason"],
        "tag_add" => &["tag", "expires_at"],
        "tag_remove" => &["tag"],
        "profile_update" => &["attributes"],
        "identify" => &[],
        "interaction" => &["name", "properties"],
        "unlink" => &[],
        _ => return None,
    })
}

/// The fields of one event object, each kept as raw JSON until its parser reads it.
struct Fields(BTreeMap<String, Box<RawValue>>);

impl Fields {
    /// Splits an event into its fields, refusing anything but a JSON object: the rest of the
    /// parse reads field by field so that every later error can name its field.
    fn parse(raw: &RawValue) -> Result<Fields, EventError> {
        serde_json::from_str(raw.get()).map(Fields).map_err(|_| {
            EventError::new(
                ErrorCode::InvalidEvent,
                format!(
                    "an event must be a JSON object, found {}",
                    abbreviate(raw.get())
                ),
            )
        })
    }

    fn raw(&self, name: &str) -> Option<&RawValue> {
        self.0
            .get(name)
            .map(|raw| &**raw)
            .filter(|raw| raw.get() != "null")
    }

    fn get<T: DeserializeOwned>(&self, name: &str, what: &str) -> Result<Option<T>, EventError> {
        match self.raw(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get()).map(Some).map_err(|_| {
                EventError::invalid(
                    name,
                    format!("{name} must be {what}, found {}", abbreviate(raw.get())),
                )
            }),
        }
    }

    fn required<T: DeserializeOwned>(&self, name: &str, what: &str) -> Result<T, EventError> {
        self.get(name, what)?
            .ok_or_else(|| EventError::missing(name))
    }

    fn text(&self, name: &str, max: usize) -> Result<Option<String>, EventError> {
        let Some(text) = self.get::<String>(name, "a string")? else {
            return Ok(None);
        };
        if text.is_empty() || text.len() > max {
            return Err(EventError::invalid(
                name,
                format!("{name} must be 1 to {max} bytes, found {}", text.len()),
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(EventError::invalid(
                name,
                format!("{name} must not contain control characters"),
            ));
        }
        Ok(Some(text))
    }

    fn required_text(&self, name: &str, max: usize) -> Result<String, EventError> {
        self.text(name, max)?
            .ok_or_else(|| EventError::missing(name))
    }

    fn money(&self, name: &str) -> Result<Option<Money>, EventError> {
        let Some(raw) = self.raw(name) else {
            return Ok(None);
        };
        let money = literal_text(raw)
            .and_then(|text| Money::parse(&text))
            .map_err(|e| EventError::invalid(name, format!("{name}: {e}")))?;
        if money.0 <= 0 {
            return Err(EventError::invalid(
                name,
                format!("{name} must be positive, found {money}"),
            ));
        }
        Ok(Some(money))
    }

    fn time(&self, name: &str) -> Result<Option<Millis>, EventError> {
        let Some(text) = self.get::<String>(name, "an RFC 3339 timestamp string")? else {
            return Ok(None);
        };
        Millis::parse_rfc3339(&text)
            .map(Some)
            .map_err(|e| EventError::invalid(name, format!("{name}: {e}")))
    }

    fn points(&self, allow_negative: bool) -> Result<i64, EventError> {
        let points: i64 = self.required("points", "an integer")?;
        let ok = if allow_negative {
            points != 0
        } else {
            points > 0
        };
        // `checked_abs`: i64::MIN has no absolute value (and `abs` would wrap to itself).
        if !ok
            || points
                .checked_abs()
                .is_none_or(|size| size > POINTS_PER_EVENT_MAX)
        {
            let kind = if allow_negative {
                "a non-zero integer"
            } else {
                "a positive integer"
            };
            return Err(EventError::invalid("points", format!("points must be {kind} of at most {POINTS_PER_EVENT_MAX} in size, found {points}")));
        }
        Ok(points)
    }
}

/// Best-effort `event_id` of an event that failed to parse, for its result row.
pub fn event_id_of(raw: &RawValue) -> String {
    #[derive(Deserialize)]
    struct Id {
        event_id: Option<String>,
    }
    serde_json::from_str::<Id>(raw.get())
        .ok()
        .and_then(|id| id.event_id)
        .unwrap_or_default()
}

impl Event {
    /// The codes [`Event::parse`] refuses an event with when it is given the time received
    /// (without one, an event without `ts` is refused `unavailable`, naming `ts`). Each but
    /// `invalid_event` names the field.
    pub const PARSE_ERRORS: [ErrorCode; 4] = [
        ErrorCode::InvalidEvent,
        ErrorCode::InvalidField,
        ErrorCode::MissingField,
        ErrorCode::UnknownField,
    ];

    /// Parses and validates one event. `received` dates an event without `ts`: the cluster's
    /// time when the node received it, `None` if the node could not tell it (such an event is
    /// refused `unavailable`, naming `ts`, for the client to send elsewhere or again).
    ///
    /// The fields every event shares are read first, then the body of the event's type. The
    /// steps run in a fixed order and each stops at its first error, so when several fields
    /// are wrong the same one is always reported.
    pub fn parse(raw: &RawValue, received: Option<Millis>) -> Result<Event, EventError> {
        let fields = Fields::parse(raw)?;
        let event_id = fields.required_text("event_id", EVENT_ID_BYTES_MAX)?;
        let event_type = parse_type(&fields)?;
        let oneid = parse_oneid(&fields)?;
        let identities = parse_identities(&fields)?;
        if oneid.is_none() && identities.is_empty() {
            return Err(EventError::field(
                ErrorCode::MissingField,
                "oneid",
                "an event names its profile by oneid or identities",
            ));
        }
        let ts = match fields.time("ts")? {
            Some(ts) => ts,
            None => received.ok_or_else(|| {
                EventError::field(
                    ErrorCode::Unavailable,
                    "ts",
                    "this node hears from no majority of the cluster's nodes, so it cannot date an event without ts: send ts, or send it again (to another node)",
                )
            })?,
        };
        let channel = parse_channel(&fields)?;
        let body = parse_body(&event_type, &fields, &identities, oneid)?;
        Ok(Event {
            event_id,
            oneid,
            identities,
            ts,
            channel,
            body,
        })
    }
}

/// Reads the event's `type` and refuses fields that are neither common nor of that type.
///
/// The type decides which fields are allowed, so it is read before the other fields are
/// parsed; a misspelt field is refused rather than ignored, so the mistake cannot go unnoticed.
fn parse_type(fields: &Fields) -> Result<String, EventError> {
    let event_type: String = fields.required("type", "a string")?;
    let Some(allowed) = type_fields(&event_type) else {
        return Err(EventError::invalid(
            "type",
            format!("unknown event type {event_type:?}"),
        ));
    };
    if let Some(unknown) = fields
        .0
        .keys()
        .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(EventError::field(
            ErrorCode::UnknownField,
            unknown,
            format!("{unknown} is not a field of a {event_type} event"),
        ));
    }
    Ok(event_type)
}

/// Reads the optional `oneid`, the profile the event names directly.
fn parse_oneid(fields: &Fields) -> Result<Option<OneId>, EventError> {
    let Some(text) = fields.get::<String>("oneid", "a OneID string")? else {
        return Ok(None);
    };
    text.parse::<OneId>().map(Some).map_err(|()| {
        EventError::invalid(
            "oneid",
            format!("oneid {:?} is not a OneID", abbreviate(&text)),
        )
    })
}

/// Reads the optional `channel`. A channel must be a name (`[a-z0-9_]`) because it keys the
/// rules' channel multipliers and a profile's per-channel times.
fn parse_channel(fields: &Fields) -> Result<Option<String>, EventError> {
    match fields.get::<String>("channel", "a string")? {
        Some(channel) if !is_name(&channel, CHANNEL_BYTES_MAX) => Err(EventError::invalid(
            "channel",
            format!(
                "channel must match [a-z0-9_]{{1,{CHANNEL_BYTES_MAX}}}, found {:?}",
                abbreviate(&channel)
            ),
        )),
        channel => Ok(channel),
    }
}

/// Reads the fields of the event's own type into its body. `event_type` was accepted by
/// [`parse_type`]; `identities` and `oneid` are the event's, which an `identify` event (the
/// identities) and an `unlink` event (both) cannot do without.
fn parse_body(
    event_type: &str,
    fields: &Fields,
    identities: &[Identity],
    oneid: Option<OneId>,
) -> Result<EventBody, EventError> {
    Ok(match event_type {
        "order" => EventBody::Order {
            order_id: fields.required_text("order_id", TEXT_BYTES_MAX)?,
            amount: fields
                .money("amount")?
                .ok_or_else(|| EventError::missing("amount"))?,
            store: fields.text("store", TEXT_BYTES_MAX)?,
        },
        "refund" => EventBody::Refund {
            order_id: fields.required_text("order_id", TEXT_BYTES_MAX)?,
            amount: fields.money("amount")?,
        },
        "points_earn" => EventBody::PointsEarn {
            points: fields.points(false)?,
            reason: fields.text("reason", TEXT_BYTES_MAX)?,
            expires_at: fields.time("expires_at")?,
        },
        "points_redeem" => EventBody::PointsRedeem {
            points: fields.points(false)?,
            reason: fields.text("reason", TEXT_BYTES_MAX)?,
        },
        "points_adjust" => EventBody::PointsAdjust {
            points: fields.points(true)?,
            reason: fields.required_text("reason", TEXT_BYTES_MAX)?,
        },
        "tag_add" => EventBody::TagAdd {
            tag: fields.required_text("tag", TAG_BYTES_MAX)?,
            expires_at: fields.time("expires_at")?,
        },
        "tag_remove" => EventBody::TagRemove {
            tag: fields.required_text("tag", TAG_BYTES_MAX)?,
        },
        "profile_update" => EventBody::ProfileUpdate {
            attributes: parse_attributes(fields)?,
        },
        "identify" => {
            if identities.is_empty() {
                return Err(EventError::field(
                    ErrorCode::MissingField,
                    "identities",
                    "an identify event needs identities",
                ));
            }
            EventBody::Identify
        }
        "interaction" => EventBody::Interaction {
            name: fields.required_text("name", TEXT_BYTES_MAX)?,
            properties: parse_properties(fields)?,
        },
        "unlink" => {
            if oneid.is_none() {
                return Err(EventError::field(
                    ErrorCode::MissingField,
                    "oneid",
                    "an unlink event names the profile to unlink from by oneid",
                ));
            }
            if identities.is_empty() {
                return Err(EventError::field(
                    ErrorCode::MissingField,
                    "identities",
                    "an unlink event needs the identities to unlink",
                ));
            }
            EventBody::Unlink
        }
        _ => unreachable!("type_fields accepted {event_type}"),
    })
}

fn parse_identities(fields: &Fields) -> Result<Vec<Identity>, EventError> {
    let Some(map) =
        fields.get::<BTreeMap<String, String>>("identities", "an object of kind: value strings")?
    else {
        return Ok(Vec::new());
    };
    if map.len() > IDENTITIES_PER_EVENT_MAX {
        return Err(EventError::invalid(
            "identities",
            format!(
                "at most {IDENTITIES_PER_EVENT_MAX} identities per event, found {}",
                map.len()
            ),
        ));
    }
    let mut identities = Vec::with_capacity(map.len());
    for (kind, value) in map {
        if let Err((_, message)) = check_identity(&kind, &value) {
            return Err(EventError::invalid(
                &format!("identities.{}", abbreviate(&kind)),
                message,
            ));
        }
        identities.push(Identity { kind, value });
    }
    Ok(identities)
}

fn parse_attributes(fields: &Fields) -> Result<Vec<(String, Option<Value>)>, EventError> {
    let map: BTreeMap<String, Box<RawValue>> = fields.required("attributes", "an object")?;
    if map.is_empty() || map.len() > ATTRIBUTES_PER_EVENT_MAX {
        return Err(EventError::invalid(
            "attributes",
            format!(
                "attributes must set 1 to {ATTRIBUTES_PER_EVENT_MAX} names, found {}",
                map.len()
            ),
        ));
    }
    let mut attributes = Vec::with_capacity(map.len());
    for (name, raw) in map {
        let field = format!("attributes.{}", abbreviate(&name));
        if !is_name(&name, ATTRIBUTE_NAME_BYTES_MAX) {
            return Err(EventError::invalid(
                &field,
                format!("attribute name must match [a-z0-9_]{{1,{ATTRIBUTE_NAME_BYTES_MAX}}}"),
            ));
        }
        let text = raw.get();
        let value = match text.as_bytes().first() {
            _ if text == "null" => None,
            _ if text == "true" => Some(Value::Bool(true)),
            _ if text == "false" => Some(Value::Bool(false)),
            Some(b'"') => {
                let s: String = serde_json::from_str(text)
                    .map_err(|e| EventError::invalid(&field, e.to_string()))?;
                if s.len() > ATTRIBUTE_VALUE_BYTES_MAX {
                    return Err(EventError::invalid(
                        &field,
                        format!(
                            "attribute value must be at most {ATTRIBUTE_VALUE_BYTES_MAX} bytes"
                        ),
                    ));
                }
                Some(Value::String(s))
            }
            Some(b'-' | b'0'..=b'9') => Some(Value::Number(
                parse_decimal(text).map_err(|e| EventError::invalid(&field, e))?,
            )),
            _ => {
                return Err(EventError::invalid(
                    &field,
                    "attribute value must be a string, number, bool or null",
                ))
            }
        };
        attributes.push((name, value));
    }
    Ok(attributes)
}

fn parse_properties(fields: &Fields) -> Result<Option<String>, EventError> {
    let Some(raw) = fields.raw("properties") else {
        return Ok(None);
    };
    if !raw.get().starts_with('{') {
        return Err(EventError::invalid(
            "properties",
            "properties must be an object",
        ));
    }
    let compact = serde_json::to_string(
        &serde_json::from_str::<serde_json::Value>(raw.get())
            .map_err(|e| EventError::invalid("properties", e.to_string()))?,
    )
    .map_err(|e| EventError::invalid("properties", e.to_string()))?;
    if compact.len() > PROPERTIES_BYTES_MAX {
        return Err(EventError::invalid(
            "properties",
            format!("properties must be at most {PROPERTIES_BYTES_MAX} bytes of JSON"),
        ));
    }
    Ok(Some(compact))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Event, EventError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        Event::parse(&raw, Some(Millis(1_000)))
    }

    fn error(json: &str) -> (ErrorCode, Option<String>) {
        let e = parse(json).unwrap_err();
        (e.code, e.field)
    }

    #[test]
    fn an_error_without_a_field_omits_it_in_json_and_round_trips_in_postcard() {
        let error = EventError::new(ErrorCode::Unavailable, "retry");
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"code":"unavailable","message":"retry"}"#
        );
        for error in [
            error,
            EventError::field(ErrorCode::NotFound, "oneid", "none"),
        ] {
            let bytes = postcard::to_stdvec(&error).unwrap();
            assert_eq!(postcard::from_bytes::<EventError>(&bytes).unwrap(), error);
            let json = serde_json::to_string(&error).unwrap();
            assert_eq!(serde_json::from_str::<EventError>(&json).unwrap(), error);
        }
    }

    #[test]
    fn an_unlink_names_its_profile_by_oneid_and_the_identities_it_takes_off() {
        let unlink = parse(
            r#"{"event_id": "u", "type": "unlink", "oneid": "o0000000000000001", "identities": {"phone": "1"}}"#,
        )
        .unwrap();
        assert_eq!(unlink.body, EventBody::Unlink);
        assert_eq!(
            error(r#"{"event_id": "u", "type": "unlink", "identities": {"phone": "1"}}"#),
            (ErrorCode::MissingField, Some("oneid".into()))
        );
        assert_eq!(
            error(r#"{"event_id": "u", "type": "unlink", "oneid": "o0000000000000001"}"#),
            (ErrorCode::MissingField, Some("identities".into()))
        );
        assert_eq!(
            error(
                r#"{"event_id": "u", "type": "unlink", "oneid": "o0000000000000001", "identities": {"phone": "1"}, "points": 3}"#
            ),
            (ErrorCode::UnknownField, Some("points".into()))
        );
    }

    #[test]
    fn an_event_without_ts_is_dated_by_the_time_given_or_refused_unavailable() {
        let earn = r#"{"event_id": "e", "type": "points_earn", "identities": {"phone": "1"}, "points": 1}"#;
        assert_eq!(parse(earn).unwrap().ts, Millis(1_000));
        let raw: Box<RawValue> = serde_json::from_str(earn).unwrap();
        let refused = Event::parse(&raw, None).unwrap_err();
        assert_eq!(
            (refused.code, refused.field.as_deref()),
            (ErrorCode::Unavailable, Some("ts"))
        );
        let dated = r#"{"event_id": "e", "type": "points_earn", "identities": {"phone": "1"}, "points": 1, "ts": "2026-01-01T00:00:00Z"}"#;
        let raw: Box<RawValue> = serde_json::from_str(dated).unwrap();
        assert_eq!(
            Event::parse(&raw, None).unwrap().ts,
            Millis(1_767_225_600_000)
        );
    }

    #[test]
    fn order_parses_amount_exactly_and_defaults_ts() {
        let e = parse(r#"{"event_id":"e1","type":"order","identities":{"phone":"138"},"order_id":"T1","amount":199.9,"channel":"tmall"}"#).unwrap();
        assert_eq!(
            e.body,
            EventBody::Order {
                order_id: "T1".into(),
                amount: Money(19_990),
                store: None
            }
        );
        assert_eq!(e.ts, Millis(1_000));
        assert_eq!(
            e.identities,
            vec![Identity {
                kind: "phone".into(),
                value: "138".into()
            }]
        );
        assert_eq!(e.channel.as_deref(), Some("tmall"));
    }

    #[test]
    fn errors_name_their_field() {
        let base = r#""event_id":"e1","identities":{"phone":"1"}"#;
        assert_eq!(
            error(&format!(
                r#"{{{base},"type":"order","order_id":"T","amount":"1.001"}}"#
            )),
            (ErrorCode::InvalidField, Some("amount".into()))
        );
        assert_eq!(
            error(&format!(r#"{{{base},"type":"order","order_id":"T"}}"#)),
            (ErrorCode::MissingField, Some("amount".into()))
        );
        assert_eq!(
            error(&format!(
                r#"{{{base},"type":"order","order_id":"T","amount":0}}"#
            )),
            (ErrorCode::InvalidField, Some("amount".into()))
        );
        assert_eq!(
            error(&format!(
                r#"{{{base},"type":"order","order_id":"T","amount":1,"amout":2}}"#
            )),
            (ErrorCode::UnknownField, Some("amout".into()))
        );
        assert_eq!(
            error(&format!(r#"{{{base},"type":"teleport"}}"#)),
            (ErrorCode::InvalidField, Some("type".into()))
        );
        assert_eq!(
            error(&format!(r#"{{{base},"type":"points_redeem","points":-5}}"#)),
            (ErrorCode::InvalidField, Some("points".into()))
        );
        assert_eq!(
            error(&format!(
                r#"{{{base},"type":"points_adjust","points":0,"reason":"x"}}"#
            )),
            (ErrorCode::InvalidField, Some("points".into()))
        );
        assert_eq!(
            error(&format!(
                r#"{{{base},"type":"tag_add","tag":"vip","ts":"noon"}}"#
            )),
            (ErrorCode::InvalidField, Some("ts".into()))
        );
        assert_eq!(
            error(&format!(
                r#"{{{base},"type":"interaction","name":"view","channel":"Douyin"}}"#
            )),
            (ErrorCode::InvalidField, Some("channel".into()))
        );
        assert_eq!(
            error(r#"{"event_id":"e1","type":"identify","identities":{"Phone":"1"}}"#),
            (ErrorCode::InvalidField, Some("identities.Phone".into()))
        );
        assert_eq!(
            error(r#"{"event_id":"e1","type":"tag_add","tag":"vip"}"#),
            (ErrorCode::MissingField, Some("oneid".into()))
        );
        assert_eq!(
            error(r#"{"event_id":"","type":"tag_add","tag":"vip","oneid":"o0000000000000001"}"#),
            (ErrorCode::InvalidField, Some("event_id".into()))
        );
        assert_eq!(
            error(r#"{"event_id":"e","type":"tag_add","tag":"vip","oneid":"42"}"#),
            (ErrorCode::InvalidField, Some("oneid".into()))
        );
        assert_eq!(error(r#"[1]"#), (ErrorCode::InvalidEvent, None));
    }

    #[test]
    fn profile_update_keeps_types_and_removals() {
        let e = parse(r#"{"event_id":"e1","type":"profile_update","oneid":"o0000000000000001","attributes":{"city":"Hangzhou","age":31,"vip":true,"old":null}}"#).unwrap();
        let EventBody::ProfileUpdate { attributes } = e.body else {
            panic!("not a profile_update")
        };
        assert_eq!(
            attributes,
            vec![
                ("age".to_string(), Some(Value::Number(31.into()))),
                ("city".to_string(), Some(Value::String("Hangzhou".into()))),
                ("old".to_string(), None),
                ("vip".to_string(), Some(Value::Bool(true))),
            ]
        );
    }

    #[test]
    fn extreme_numbers_are_refused_not_wrapped() {
        let adjust = r#"{"event_id":"e","type":"points_adjust","identities":{"phone":"1"},"points":-9223372036854775808,"reason":"x"}"#;
        assert_eq!(
            error(adjust),
            (ErrorCode::InvalidField, Some("points".into()))
        );
        let order = r#"{"event_id":"e","type":"order","identities":{"phone":"1"},"order_id":"T","amount":"1000000000000000000000000000"}"#;
        assert_eq!(
            error(order),
            (ErrorCode::InvalidField, Some("amount".into()))
        );
        let late = r#"{"event_id":"e","type":"tag_add","identities":{"phone":"1"},"tag":"x","ts":"9999-06-01T00:00:00Z"}"#;
        assert_eq!(error(late), (ErrorCode::InvalidField, Some("ts".into())));
    }
}
