//! Request bodies: read within their limits, and within the node's memory budget for bodies.
//!
//! Limits, each with its answer:
//! - a body over `REQUEST_BODY_BYTES_MAX` is answered 413 after reading and dropping up to
//!   [`DISCARD_BYTES_MAX`] (so a client still sending reads the answer), then the connection
//!   closes;
//! - an NDJSON body is counted line by line as it arrives: past `EVENTS_PER_REQUEST_MAX` events
//!   it is answered 413 at once, and the connection closes;
//! - a body that stops arriving for `body_timeout` is answered 408 and its connection closes;
//! - bodies in flight on the whole node (being read, parsed, or held by an ingest that goes on
//!   after its client hung up) share [`BodyBudget`], counted in bytes as they arrive: a body
//!   that finds the budget spent waits up to [`BUDGET_WAIT`] for other requests to finish,
//!   then is answered 503 `unavailable`.

use super::ApiError;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::StatusCode;
use oneid_protocol::api::{EVENTS_PER_REQUEST_MAX, REQUEST_BODY_BYTES_MAX};
use oneid_protocol::ErrorCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most bytes of an oversized body read (and dropped) before answering 413 and closing.
pub const DISCARD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long a body waits for budget before it is answered 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(5);

/// The bytes of request bodies the node holds at once.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
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
        }
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
                let mut error = ApiError::unavailable(format!(
                    "the node holds its whole budget of request bodies and none was given back within {BUDGET_WAIT:?}; retry"
                ));
                error.close = true;
                error
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
    let mut seen = 0usize;
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
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    format!("reading the body failed: {e}"),
                )
            })?,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= REQUEST_BODY_BYTES_MAX {
            budget.take(&mut held, data.len()).await?;
            if shape == Shape::Lines && lines.add(&data) > EVENTS_PER_REQUEST_MAX {
                let mut error = too_many_events();
                error.close = true;
                return Err(error);
            }
            bytes.extend_from_slice(&data);
        } else if seen > DISCARD_BYTES_MAX {
            break;
        }
    }
    if seen > REQUEST_BODY_BYTES_MAX {
        let mut error = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("the body is over {REQUEST_BODY_BYTES_MAX} bytes"),
        );
        error.close = true;
        return Err(error);
    }
    Ok((bytes, held))
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
