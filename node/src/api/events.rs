//! `POST /v1/events`: a JSON array of events, or NDJSON, to the router.
//!
//! The body is read within its limits (`body.rs`), parsed on a blocking thread (a 16 MiB body
//! is tens of milliseconds of work the async workers must not wait behind), each event
//! validated on its own (a bad one is rejected alone), and handed to the router in a task
//! detached from the connection: a client that hangs up must not cancel the follow-ups of
//! events that are already durable. The body's budget is held until that task ends.

use super::body::{self, Shape};
use super::{json, Api, ApiError, Reply};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, StatusCode};
use oneid_protocol::api::EVENTS_PER_REQUEST_MAX;
use oneid_protocol::event::{event_id_of, Event, EventError};
use oneid_protocol::num::Millis;
use oneid_protocol::ErrorCode;
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;

/// An event as parsed: valid, or its rejection with the event id that could be read.
type Parsed = Result<Event, (String, EventError)>;

impl Api {
    pub(super) async fn post_events(&self, request: Request<Incoming>) -> Reply {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        // Events without `ts` are dated by the cluster's majority time, never by this node's
        // wall clock alone (without one, they are refused `unavailable`).
        let received = self.shards.clock.majority_time();
        let shape = body_shape(&request)?;
        let (body, held) =
            body::read(request.into_body(), shape, &self.budget, self.body_timeout).await?;
        let router = self.router.clone();
        let response = tokio::spawn(async move {
            let parsed = tokio::task::spawn_blocking(move || parse(&body, shape, received))
                .await
                .expect("parsing events does not panic")?;
            let response = router.ingest(parsed).await;
            drop(held);
            Ok::<_, ApiError>(response)
        })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("ingest failed: {e}"),
            )
        })??;
        Ok(json(StatusCode::OK, &response))
    }
}

/// JSON or NDJSON, by the content type (JSON when none is given).
fn body_shape(request: &Request<Incoming>) -> Result<Shape, ApiError> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/x-ndjson" | "application/ndjson" => Ok(Shape::Lines),
        "application/json" | "" => Ok(Shape::Whole),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            format!("send application/json or application/x-ndjson, not {other}"),
        )),
    }
}

/// Parses every event of a body. NDJSON lines were counted while the body was read; a JSON
/// array is counted while it is parsed, so a body of millions of tiny elements is refused
/// without allocating them.
fn parse(body: &[u8], shape: Shape, received: Option<Millis>) -> Result<Vec<Parsed>, ApiError> {
    let raws: Vec<Result<Box<RawValue>, String>> = match shape {
        Shape::Lines => body
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
            .map(|(n, line)| {
                serde_json::from_slice::<Box<RawValue>>(line)
                    .map_err(|e| format!("line {} is not JSON: {e}", n + 1))
            })
            .collect(),
        Shape::Whole => {
            let mut deserializer = serde_json::Deserializer::from_slice(body);
            let events = serde::Deserializer::deserialize_seq(&mut deserializer, BoundedEvents)
                .and_then(|events| deserializer.end().map(|()| events))
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadRequest,
                        format!("the body must be a JSON array of events: {e}"),
                    )
                })?;
            events
                .ok_or_else(body::too_many_events)?
                .into_iter()
                .map(Ok)
                .collect()
        }
    };
    Ok(raws
        .into_iter()
        .map(|raw| match raw {
            Ok(raw) => Event::parse(&raw, received).map_err(|error| (event_id_of(&raw), error)),
            Err(message) => Err((
                String::new(),
                EventError::new(ErrorCode::InvalidEvent, message),
            )),
        })
        .collect())
}

/// Reads a JSON array of raw events, stopping (with `None`) past `EVENTS_PER_REQUEST_MAX`.
struct BoundedEvents;

impl<'de> serde::de::Visitor<'de> for BoundedEvents {
    type Value = Option<Vec<Box<RawValue>>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events = Vec::new();
        while let Some(event) = seq.next_element::<Box<RawValue>>()? {
            if events.len() == EVENTS_PER_REQUEST_MAX {
                // Skip the rest without keeping it: the answer is 413 either way.
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                return Ok(None);
            }
            events.push(event);
        }
        Ok(Some(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A body's parse: a refusal of the whole body is `bad_request` or `payload_too_large`;
    /// an event's, one `Event::parse` documents (or `invalid_event` for a line that is not
    /// JSON).
    fn check(body: &[u8], shape: Shape) -> Result<(), TestCaseError> {
        match parse(body, shape, Some(Millis(1_767_225_600_000))) {
            Ok(events) => {
                for (_, error) in events.iter().filter_map(|e| e.as_ref().err()) {
                    prop_assert!(Event::PARSE_ERRORS.contains(&error.code), "{error:?}");
                }
            }
            Err(refused) => prop_assert!(
                [ErrorCode::BadRequest, ErrorCode::PayloadTooLarge].contains(&refused.error.code),
                "{:?}",
                refused.error
            ),
        }
        Ok(())
    }

    const EVENT: &str =
        r#"{"event_id":"e1","type":"points_earn","identities":{"phone":"1"},"points":5}"#;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn bodies_of_arbitrary_bytes_parse_or_are_refused_as_documented(
            body in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            check(&body, Shape::Whole)?;
            check(&body, Shape::Lines)?;
        }

        #[test]
        fn bodies_of_events_cut_and_spliced_parse_or_are_refused_as_documented(
            n in 0..5usize,
            cut in any::<prop::sample::Index>(),
            insert in prop::collection::vec(prop_oneof![Just(b'\n'), Just(b','), Just(b'['), Just(b']'), Just(b'"'), any::<u8>()], 0..4),
        ) {
            let events: Vec<&str> = std::iter::repeat_n(EVENT, n).collect();
            for (mut body, shape) in [
                (format!("[{}]", events.join(",")).into_bytes(), Shape::Whole),
                (events.join("\n").into_bytes(), Shape::Lines),
            ] {
                let at = cut.index(body.len() + 1);
                body.splice(at..at, insert.iter().copied());
                check(&body, shape)?;
            }
        }
    }
}
