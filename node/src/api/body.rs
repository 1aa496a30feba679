//! Request bodies: read within their limits, and within the node's memory budget for bodies.
//!
//! Limits, each with its answer:
//! - a body over `REQUEST_BODY_BYTES_MAX` is answered 413;
//! - an NDJSON body is counted line by line as it arrives: past `EVENTS_PER_REQUEST_MAX` events
//!   it is answered 413 without waiting for the rest;
//! - a body that stops arriving for `body_timeout` is answered 408;
//! - bodies in flight on the whole node (being read, parsed, or held by an ingest that goes on
//!   after its client hung up) share [`BodyBudget`], counted in bytes as they arrive: a body
//!   that finds the budget spent waits up to [`BUDGET_WAIT`] for other requests to finish,
//!   then is answered 503 `unavailable`.
//!
//! A body refused before its end is drained first, without keeping it (up to
//! [`DISCARD_BYTES_MAX`], for at most [`DRAIN_TIME_MAX`]), so that a client still sending reads
//! the answer instead of a connection reset; then the connection closes.

use super::ApiError;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::StatusCode;
use oneid_protocol::api::{EVENTS_PER_REQUEST_MAX, REQUEST_BODY_BYTES_MAX};
use oneid_protocol::ErrorCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most bytes of a refused body read (and dropped) before answering and closing.
pub const DISCARD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Longest a refused body is drained before answering and closing.
pub const DRAIN_TIME_MAX: Duration = Duration::from_secs(1);
/// How long a body waits for budget before it is answered 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(5);

/// The bytes of request bodies the node holds at once.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// Budget held by a body, given back when dropped (after its request's work is done).
pub struct Held(Option<OwnedSemaphorePermit>);

impl BodyBudget {
    pub fn new(bytes: usize) -> BodyBudget {
        assert!(
            bytes >= REQUEST_BODY_BYTES_MAX,
            "the body budget ({bytes} bytes) must fit one body of the largest size"
        );
        BodyBudget {
            bytes: Arc::new(Semaphore::new(bytes)),
            total: bytes,
        }
    }

    /// Bytes held by bodies now.
    pub fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// Takes `n` more bytes for `held`, waiting up to [`BUDGET_WAIT`].
    async fn take(&self, held: &mut Held, n: usize) -> Result<(), ApiError> {
        if n == 0 {
            return Ok(());
        }
        let n = u32::try_from(n).expect("frames are smaller than the body limit");
        let acquire = Arc::clone(&self.bytes).acquire_many_owned(n);
        let permit = tokio::time::timeout(BUDGET_WAIT, acquire)
            .await
            .map_err(|_| {
                ApiError::unavailable(format!(
                    "the node holds its whole budget of request bodies and none was given back within {BUDGET_WAIT:?}; retry"
                ))
            })?
            .expect("the budget is never closed");
        match &mut held.0 {
            Some(existing) => existing.merge(permit),
            None => held.0 = Some(permit),
        }
        Ok(())
    }
}

/// What a body is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Any bytes (a JSON document).
    Whole,
    /// NDJSON: non-blank lines are counted as they arrive.
    Lines,
}

/// Reads a request body within its limits; answers it with the budget it holds.
pub async fn read(
    body: Incoming,
    shape: Shape,
    budget: &BodyBudget,
    stall: Duration,
) -> Result<(Vec<u8>, Held), ApiError> {
    let mut body = body;
    let mut bytes = Vec::new();
    let mut held = Held(None);
    let mut lines = LineCount::default();
    loop {
        let data = match next_data(&mut body, stall).await {
            Ok(Some(data)) => data,
            Ok(None) => return Ok((bytes, held)),
            Err(error) => return Err(error),
        };
        let refusal = if bytes.len() + data.len() > REQUEST_BODY_BYTES_MAX {
            Some(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("the body is over {REQUEST_BODY_BYTES_MAX} bytes"),
            ))
        } else if let Err(error) = budget.take(&mut held, data.len()).await {
            Some(error)
        } else if shape == Shape::Lines && lines.add(&data) > EVENTS_PER_REQUEST_MAX {
            Some(too_many_events())
        } else {
            None
        };
        if let Some(mut error) = refusal {
            drop((bytes, held));
            drain(&mut body, data.len()).await;
            error.close = true;
            return Err(error);
        }
        bytes.extend_from_slice(&data);
    }
}

/// The next piece of data of a body; `None` at its end. A body that sends nothing for
/// `stall` is answered 408 (and its connection closed).
async fn next_data(body: &mut Incoming, stall: Duration) -> Result<Option<Bytes>, ApiError> {
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => {
                let mut error = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorCode::RequestTimeout,
                    format!("the body stopped arriving for {stall:?}"),
                );
                error.close = true;
                return Err(error);
            }
            Ok(None) => return Ok(None),
            Ok(Some(frame)) => frame.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    format!("reading the body failed: {e}"),
                )
            })?,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

/// Reads and drops what is left of a refused body (`seen` bytes of it already read), within
/// [`DISCARD_BYTES_MAX`] and [`DRAIN_TIME_MAX`].
async fn drain(body: &mut Incoming, mut seen: usize) {
    let until = tokio::time::Instant::now() + DRAIN_TIME_MAX;
    while seen < DISCARD_BYTES_MAX {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => seen += frame.data_ref().map_or(0, Bytes::len),
            _ => return,
        }
    }
}

pub fn too_many_events() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        format!("at most {EVENTS_PER_REQUEST_MAX} events per request"),
    )
}

/// Counts the non-blank lines of a text arriving in pieces.
#[derive(Default)]
struct LineCount {
    complete: usize,
    /// The line being read has a character that is not white space.
    open: bool,
}

impl LineCount {
    /// Adds a piece; answers the lines so far (the open one included).
    fn add(&mut self, piece: &[u8]) -> usize {
        for &byte in piece {
            if byte == b'\n' {
                self.complete += usize::from(self.open);
                self.open = false;
            } else if !byte.is_ascii_whitespace() {
                self.open = true;
            }
        }
        self.complete + usize::from(self.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_across_pieces_and_blank_ones_are_not() {
        let mut count = LineCount::default();
        assert_eq!(count.add(b"{\"a\":1}\n  \n{\"b\""), 2);
        assert_eq!(count.add(b":2}\r\n"), 2);
        assert_eq!(count.add(b"\r\n\n"), 2);
        assert_eq!(count.add(b"x"), 3);
    }
}
