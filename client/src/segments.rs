//! Segments: definitions, members in pages, and [`Client::watch_segment`], a stream of
//! membership changes that reconnects and resumes by itself, on any node of the cluster.

use super::sse::{self, Item};
use super::{api_error, decode, encode, page_path, Client, Error, Route};
use bytes::Bytes;
use futures::Stream;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use oneid_protocol::segments::{
    MembersPage, SegmentChange, SegmentDoc, SegmentList, SegmentPut, SnapshotEnd,
};
use std::collections::VecDeque;
use std::time::Duration;

/// A stream that received nothing for this long (the node sends a heartbeat every 5 s) is
/// taken for dead and reconnected.
pub const WATCH_SILENCE_MAX: Duration = Duration::from_secs(20);
/// The longest wait between reconnection attempts.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where [`Client::watch_segment`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchFrom {
    /// The changes from now on.
    Tail,
    /// The changes after a cursor (a change's `cursor`, or a `SnapshotEnd`'s).
    Cursor(String),
    /// Every current member, then the changes after that point.
    Snapshot,
}

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEvent {
    /// A snapshot begins (again, if one was cut off before its end: drop what the last one
    /// gave).
    SnapshotStart,
    /// A current member, in a snapshot.
    Member(SegmentChange),
    /// The snapshot is complete: `members` were sent; changes after it follow.
    SnapshotEnd { members: u64, cursor: String },
    /// A profile entered or left the segment.
    Change(SegmentChange),
}

impl Client {
    /// Creates or replaces a segment; its document, and whether it was created.
    ///
    /// ```no_run
    /// # async fn demo(client: oneid_client::Client) -> Result<(), oneid_client::Error> {
    /// let (doc, created) = client
    ///     .put_segment("gold-coffee", r#"tier >= "gold" and has_tag("coffee")"#, None)
    ///     .await?;
    /// println!("{} (generation {}), created: {created}", doc.name, doc.generation);
    /// # Ok(()) }
    /// ```
    pub async fn put_segment(
        &self,
        name: &str,
        predicate: &str,
        description: Option<&str>,
    ) -> Result<(SegmentDoc, bool), Error> {
        let body = SegmentPut {
            predicate: predicate.to_string(),
            description: description.map(str::to_string),
        };
        let body = serde_json::to_vec(&body).map_err(|e| Error::Decode(e.to_string()))?;
        let answer = self
            .call(
                Route::Any,
                Method::PUT,
                &format!("/v1/segments/{}", encode(name)),
                "application/json",
                Bytes::from(body),
            )
            .await?;
        Ok((decode(&answer.body)?, answer.status == StatusCode::CREATED))
    }

    /// A segment's document, or `None`.
    pub async fn segment(&self, name: &str) -> Result<Option<SegmentDoc>, Error> {
        self.get_optional(Route::Any, &format!("/v1/segments/{}", encode(name)))
            .await
    }

    /// Every segment, by name.
    pub async fn segments(&self) -> Result<Vec<SegmentDoc>, Error> {
        let list: SegmentList = self.get(Route::Any, "/v1/segments").await?;
        Ok(list.segments)
    }

    /// Deletes a segment (its members' exits follow). Deleting it again is fine (every shard
    /// is told again); a name never defined is an `Error::Api` with code `not_found`.
    pub async fn delete_segment(&self, name: &str) -> Result<(), Error> {
        let path = format!("/v1/segments/{}", encode(name));
        let body = Bytes::new();
        self.call(Route::Any, Method::DELETE, &path, "application/json", body)
            .await
            .map(drop)
    }

    /// One page of a segment's members; pass the answer's `next` as `cursor`.
    pub async fn segment_members_page(
        &self,
        name: &str,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<MembersPage, Error> {
        let path = page_path(
            format!("/v1/segments/{}/members", encode(name)),
            limit,
            cursor,
        );
        self.get(Route::Any, &path).await
    }

    /// Every member of a segment, page after page (1,000 each), in OneID order.
    pub fn segment_members(&self, name: &str) -> impl Stream<Item = Result<String, Error>> + '_ {
        let name = name.to_string();
        let start = (VecDeque::new(), Some(None::<String>));
        futures::stream::unfold(start, move |(mut page, mut next)| {
            let name = name.clone();
            async move {
                loop {
                    if let Some(member) = page.pop_front() {
                        return Some((Ok(member), (page, next)));
                    }
                    let cursor = next.take()?;
                    match self
                        .segment_members_page(&name, Some(1_000), cursor.as_deref())
                        .await
                    {
                        Ok(answer) => {
                            page = answer.members.into();
                            next = answer.next.map(Some);
                        }
                        Err(error) => return Some((Err(error), (page, None))),
                    }
                }
            }
        })
    }

    /// The membership changes of a segment, from `from`. Reconnects by itself (to the next
    /// node on a failure, with backoff) and resumes after the last cursor it received, so
    /// nothing is missed or repeated; a snapshot cut off before its end starts again
    /// ([`SegmentEvent::SnapshotStart`]). Ends with an error the node answers that a retry
    /// cannot cure: the segment does not exist (or was deleted), or the cursor expired.
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// use oneid_client::{SegmentEvent, WatchFrom};
    /// # async fn demo(client: oneid_client::Client) -> Result<(), oneid_client::Error> {
    /// let mut changes = std::pin::pin!(client.watch_segment("gold-coffee", WatchFrom::Snapshot));
    /// while let Some(event) = changes.next().await {
    ///     match event? {
    ///         SegmentEvent::Member(m) => println!("member {}", m.oneid),
    ///         SegmentEvent::SnapshotEnd { members, .. } => println!("{members} members"),
    ///         SegmentEvent::Change(c) => println!("{} {}", c.change, c.oneid),
    ///         SegmentEvent::SnapshotStart => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn watch_segment(
        &self,
        name: &str,
        from: WatchFrom,
    ) -> impl Stream<Item = Result<SegmentEvent, Error>> + '_ {
        let watch = Watch {
            client: self,
            name: name.to_string(),
            snapshot: from == WatchFrom::Snapshot,
            cursor: match from {
                WatchFrom::Cursor(cursor) => Some(cursor),
                WatchFrom::Tail | WatchFrom::Snapshot => None,
            },
            body: None,
            reader: sse::Reader::default(),
            retry: None,
            wait: None,
            pending: VecDeque::new(),
            failures: 0,
            done: false,
        };
        futures::stream::unfold(watch, |mut watch| async move {
            let item = watch.next().await?;
            Some((item, watch))
        })
    }
}

struct Watch<'c> {
    client: &'c Client,
    name: String,
    /// Start with a snapshot when no cursor is known yet.
    snapshot: bool,
    cursor: Option<String>,
    body: Option<Incoming>,
    reader: sse::Reader,
    /// The reconnection time the server last set (`retry:`), if it did.
    retry: Option<Duration>,
    /// Before the next connection: the stream dropped, and the server set a reconnection time.
    wait: Option<Duration>,
    pending: VecDeque<SegmentEvent>,
    /// Failed connections in a row (for the backoff).
    failures: u32,
    done: bool,
}

impl Watch<'_> {
    async fn next(&mut self) -> Option<Result<SegmentEvent, Error>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let Some(body) = self.body.as_mut() else {
                if let Some(wait) = self.wait.take() {
                    // At least the server's time, up to half more: not all at once.
                    tokio::time::sleep(wait / 2 + crate::jittered(wait)).await;
                }
                if let Err(error) = self.connect().await {
                    if !error.is_transient() {
                        self.done = true;
                        return Some(Err(error));
                    }
                    self.back_off().await;
                }
                continue;
            };
            match tokio::time::timeout(WATCH_SILENCE_MAX, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if let Err(error) = self.read(&data) {
                            self.done = true;
                            return Some(Err(error));
                        }
                    }
                }
                // The stream ended, broke, or went silent: resume elsewhere.
                _ => self.disconnected(),
            }
        }
    }

    fn disconnected(&mut self) {
        self.body = None;
        self.reader.reset();
        self.wait = self.retry;
        let server = self
            .client
            .current
            .load(std::sync::atomic::Ordering::Relaxed);
        self.client.fail_over(server);
    }

    async fn back_off(&mut self) {
        self.failures += 1;
        let wait = (self.client.policy.backoff * 2u32.saturating_pow(self.failures.min(16)))
            .min(WATCH_BACKOFF_MAX);
        tokio::time::sleep(crate::jittered(wait)).await;
    }

    async fn connect(&mut self) -> Result<(), Error> {
        let server = self
            .client
            .current
            .load(std::sync::atomic::Ordering::Relaxed);
        let snapshot = self.snapshot && self.cursor.is_none();
        let path = format!(
            "{}/v1/segments/{}/stream{}",
            self.client.servers[server],
            encode(&self.name),
            if snapshot { "?snapshot=true" } else { "" }
        );
        let mut request = Request::builder().method(Method::GET).uri(path);
        if let Some(cursor) = &self.cursor {
            request = request.header("last-event-id", cursor.as_str());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Address(e.to_string()))?;
        let timeout = self.client.policy.timeout;
        let response = tokio::time::timeout(timeout, self.client.http.request(request))
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(|e| Error::Transport(super::error_chain(&e)));
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                self.client.fail_over(server);
                return Err(error);
            }
        };
        if !response.status().is_success() {
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Transport(e.to_string()))?
                .to_bytes();
            let error = api_error(super::Answer { status, body })
                .err()
                .unwrap_or_else(|| Error::Decode(format!("{status}")));
            if error.is_transient() {
                self.client.fail_over(server);
            }
            return Err(error);
        }
        self.failures = 0;
        if snapshot {
            self.pending.push_back(SegmentEvent::SnapshotStart);
        }
        self.body = Some(response.into_body());
        Ok(())
    }

    /// Reads bytes of the stream (see [`sse`]): what they complete becomes events and cursors.
    fn read(&mut self, data: &Bytes) -> Result<(), Error> {
        let mut items = Vec::new();
        let read = self.reader.read(data, &mut items);
        for item in items {
            match item {
                Item::Event(event) => self.dispatch(event)?,
                // An empty id clears the last event id, as the standard says.
                Item::Id(id) => self.cursor = Some(id).filter(|id| !id.is_empty()),
                Item::Retry(retry) => self.retry = Some(retry),
            }
        }
        read.map_err(|sse::TooLong(what)| {
            Error::Decode(format!("the stream sent {what} over the reader's bounds"))
        })
    }

    fn dispatch(&mut self, event: sse::Event) -> Result<(), Error> {
        let sse::Event { name, id, data } = event;
        let bad = |e: serde_json::Error| Error::Decode(format!("a stream event: {e}"));
        if name.as_deref() == Some("snapshot_end") {
            let end: SnapshotEnd = serde_json::from_str(&data).map_err(bad)?;
            let cursor = id.ok_or_else(|| Error::Decode("snapshot_end without an id".into()))?;
            self.cursor = Some(cursor.clone());
            self.pending.push_back(SegmentEvent::SnapshotEnd {
                members: end.members,
                cursor,
            });
            return Ok(());
        }
        let change: SegmentChange = serde_json::from_str(&data).map_err(bad)?;
        match id {
            Some(cursor) => {
                self.cursor = Some(cursor).filter(|id| !id.is_empty());
                self.pending.push_back(SegmentEvent::Change(change));
            }
            None => self.pending.push_back(SegmentEvent::Member(change)),
        }
        Ok(())
    }
}
