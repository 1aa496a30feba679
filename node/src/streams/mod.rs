//! Segment membership streams: the change logs of this node's replicas, fanned out to the
//! subscribers of `GET /v1/segments/{name}/stream` as Server-Sent Events.
//!
//! The state machine knows nothing of this: it only appends to each shard's change log
//! (`state::segments`). Here, one **tailer** per shard reads that log once for the whole node
//! (woken when the shard's replica made a write durable, `Shards::watch_flushed`) and
//! broadcasts what it read; every subscriber receives it from the broadcast ring, which is
//! bounded in batches ([`LIVE_BATCHES_MAX`]) of bounded bytes ([`LIVE_BATCH_BYTES_MAX`]), and
//! never waits for anyone. A subscriber is a task that
//! turns changes into SSE frames into its own bounded buffer ([`SUBSCRIBER_FRAMES_MAX`]), which
//! the connection drains. A subscriber whose buffer is full, or that falls behind the ring, is
//! closed; its client resumes by cursor. So a subscriber that stops reading never slows
//! apply, the tailers or the other subscribers.
//!
//! A stream starts at a cursor (resume), at a snapshot of the members, or at the tail. A
//! subscriber first subscribes to the broadcast, then reads what it lacks from the change logs
//! themselves (catch-up), then follows the broadcast, skipping what it already delivered:
//! nothing is missed between the two, nothing is delivered twice.
//!
//! # Layout
//! - `cursor.rs`: the opaque cursor (per-shard offsets);
//! - `sse.rs`: event framing;
//! - `reads.rs`: segment, member and change-log reads of the local replicas;
//! - `subscriber.rs`: one stream, from its start to its end.

mod cursor;
pub mod reads;
mod sse;
mod subscriber;

pub use cursor::{Cursor, Scope};

use crate::shards::Shards;
use crate::storage::StateReader;
use bytes::Bytes;
use oneid_protocol::event::EventError;
use oneid_protocol::ids::OneId;
use oneid_protocol::ids::ShardId;
use oneid_protocol::ErrorCode;
use oneid_replica::ShardError;
use oneid_state::segments::ChangeRecord;
use reads::{LogAnswer, LogBounds, LogRead};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};

/// Most streams a node serves at once (apart from the HTTP connection limit); past it a new
/// one is answered 503.
pub const STREAMS_MAX: usize = 2_000;
/// Batches of changes the broadcast ring holds: a subscriber further behind is closed.
pub const LIVE_BATCHES_MAX: usize = 4_096;
/// Most bytes of changes (in memory, as [`change_bytes`] counts them) one batch carries: the
/// ring holds at most `LIVE_BATCHES_MAX × LIVE_BATCH_BYTES_MAX` (64 MiB), however many changes
/// one entry makes (a rules backfill can make a million).
pub const LIVE_BATCH_BYTES_MAX: usize = 16 * 1024;
/// SSE frames a subscriber's buffer holds before its connection takes them.
pub const SUBSCRIBER_FRAMES_MAX: usize = 1_024;
/// A stream sends its cursor (an id-only event) at least this often, so quiet segments
/// still advance their clients' cursors.
pub const ID_EVERY: Duration = Duration::from_secs(15);
/// A stream with nothing else to send sends a comment this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A stream closes when this node has heard from no leader of some shard for this long: the
/// client reconnects to another node.
pub const LEADERLESS_CLOSE: Duration = Duration::from_secs(5);
/// A tailer reads its shard's change log at least this often, woken or not: the longest a
/// change missed by a wake-up waits.
const TAIL_POLL: Duration = Duration::from_secs(1);
/// Members one read of a snapshot returns.
pub const SNAPSHOT_PAGE: usize = 1_000;
/// How long a read of a peer's change log waits for changes when there are none (a long
/// poll: the tail of a shard this node does not host).
const REMOTE_WAIT: Duration = Duration::from_secs(2);

/// Changes of one shard's log, in offset order, as a tailer read them.
pub struct Batch {
    shard: ShardId,
    changes: Vec<(u64, ChangeRecord)>,
}

/// Where a new stream starts.
pub enum Start {
    /// After this cursor.
    Cursor(Cursor),
    /// With every current member, then what follows.
    Snapshot,
    /// At the tail of the logs now: the API reads where they end ([`Streams::tail_cursor`])
    /// before it answers, so every change after the answer is after this cursor.
    Tail(Cursor),
}

/// This node's streams.
pub struct Streams {
    reader: StateReader,
    /// What this node's cursors are of (cluster, restore epoch, state format).
    pub scope: Scope,
    shards: Arc<Shards>,
    permits: Arc<Semaphore>,
    live: broadcast::Sender<Arc<Batch>>,
    stopping: watch::Sender<bool>,
    /// Streams closed because their subscriber fell behind the broadcast ring.
    pub closed_behind: AtomicU64,
    /// For each shard this node does not host, the last offset its remote tailer broadcast
    /// (0 for the others): a subscriber's catch-up must reach it, however far behind the
    /// replica it happens to read is (else, on a quiet shard, nothing would bring the rest).
    tailed: Vec<AtomicU64>,
}

impl Streams {
    pub fn new(reader: StateReader, shards: Arc<Shards>, scope: Scope) -> Arc<Streams> {
        let tailed = (0..shards.n_shards).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Streams {
            reader,
            scope,
            shards,
            permits: Arc::new(Semaphore::new(STREAMS_MAX)),
            live: broadcast::channel(LIVE_BATCHES_MAX).0,
            stopping: watch::channel(false).0,
            closed_behind: AtomicU64::new(0),
            tailed,
        })
    }

    fn n_shards(&self) -> u32 {
        self.shards.n_shards
    }

    /// Starts a tailer for every shard, on the calling runtime: of this node's replica, or
    /// (while anyone listens) of a peer's.
    pub fn start(self: &Arc<Self>) {
        for shard in (0..self.n_shards()).map(ShardId) {
            if self.shards.local(shard).is_some() {
                tokio::spawn(Arc::clone(self).tail(shard));
            } else {
                tokio::spawn(Arc::clone(self).tail_remote(shard));
            }
        }
    }

    /// Reads `shard`'s change log: at this node's replica, or at a peer's for a shard this
    /// node does not host (where a read of changes may wait up to `wait` for some).
    async fn log(
        &self,
        shard: ShardId,
        read: LogRead,
        wait: Duration,
    ) -> Result<LogAnswer, ShardError> {
        if self.shards.local(shard).is_some() {
            return Ok(self.reader.run(move |r| r.log_read(shard, &read)).await);
        }
        self.shards.read_log_remote(shard, read, wait).await
    }

    /// The offset a subscriber's catch-up of `shard` must reach (see `tailed`).
    fn tailed(&self, shard: ShardId) -> u64 {
        self.tailed[shard.0 as usize].load(Ordering::SeqCst)
    }

    async fn bounds(&self, shard: ShardId) -> Result<LogBounds, ShardError> {
        match self.log(shard, LogRead::Bounds, Duration::ZERO).await? {
            LogAnswer::Bounds(bounds) => Ok(bounds),
            other => unreachable!("bounds answered {other:?}"),
        }
    }

    /// The changes after `after` (whole groups, or up to [`reads::PEER_CHANGES_MAX`] from a
    /// peer), waiting up to `wait` at a peer's replica while there are none.
    async fn changes(
        &self,
        shard: ShardId,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<(u64, ChangeRecord)>, ShardError> {
        let read = LogRead::Changes {
            after,
            max: usize::MAX,
        };
        match self.log(shard, read, wait).await? {
            LogAnswer::Changes(changes) => Ok(changes),
            other => unreachable!("changes answered {other:?}"),
        }
    }

    async fn members_at(
        &self,
        shard: ShardId,
        segment: String,
        after: Option<OneId>,
    ) -> Result<(Vec<OneId>, LogBounds), ShardError> {
        let read = LogRead::MembersAt {
            segment,
            after,
            limit: SNAPSHOT_PAGE,
        };
        match self.log(shard, read, Duration::ZERO).await? {
            LogAnswer::MembersAt(members, bounds) => Ok((members, bounds)),
            other => unreachable!("members answered {other:?}"),
        }
    }

    /// Ends every stream (the node is shutting down).
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Streams open now.
    pub fn open_count(&self) -> usize {
        STREAMS_MAX - self.permits.available_permits()
    }

    /// Reads one shard's change log as it grows and broadcasts it.
    async fn tail(self: Arc<Self>, shard: ShardId) {
        let mut flushed = self.shards.watch_flushed(shard);
        let mut stopping = self.stopping.subscribe();
        let mut after = self.reader.run(move |r| r.log_bounds(shard).last).await;
        loop {
            tokio::select! {
                _ = flushed.changed() => {}
                () = tokio::time::sleep(TAIL_POLL) => {}
                _ = stopping.changed() => return,
            }
            // Nobody listens: a subscriber reads what came before it from the log itself. The
            // log's end is read before the count: a subscriber that came after the count
            // subscribed before its catch-up read, which sees at least that end, and what
            // lands after it the next round broadcasts. (Read after the count, a change
            // landing between a subscriber's catch-up and that read was never broadcast.)
            let end = self.reader.run(move |r| r.log_bounds(shard).last).await;
            // Tests hold the tailer here (`streams::tail_after_end=return(MILLISECONDS)`).
            #[cfg(feature = "failpoints")]
            if let Some(ms) = fail::eval("streams::tail_after_end", |ms| ms?.parse().ok()) {
                tokio::time::sleep(Duration::from_millis(ms.unwrap_or(0))).await;
            }
            if self.live.receiver_count() == 0 {
                after = end;
                continue;
            }
            loop {
                let changes = self.reader.run(move |r| r.changes(shard, after)).await;
                let Some(&(last, _)) = changes.last() else {
                    break;
                };
                after = last;
                let more = changes.len() >= reads::CHANGES_PER_READ_MAX;
                for batch in batches(shard, changes) {
                    // No receiver left is fine: nobody needs this batch.
                    let _ = self.live.send(Arc::new(batch));
                }
                if !more {
                    break;
                }
            }
        }
    }

    /// Reads the change log of a shard this node does not host from a peer's replica, while
    /// anyone listens, and broadcasts what it read. It starts at the log's end when the first
    /// subscriber comes; a subscriber that caught up to another point fills the difference
    /// from the log itself (see `Subscriber::deliver`).
    async fn tail_remote(self: Arc<Self>, shard: ShardId) {
        let mut stopping = self.stopping.subscribe();
        let mut after: Option<u64> = None;
        loop {
            if *stopping.borrow() {
                return;
            }
            if self.live.receiver_count() == 0 {
                after = None;
                tokio::select! {
                    () = tokio::time::sleep(TAIL_POLL) => {}
                    _ = stopping.changed() => return,
                }
                continue;
            }
            let read = async {
                let from = match after {
                    Some(after) => after,
                    None => self.bounds(shard).await?.last,
                };
                Ok::<_, ShardError>((from, self.changes(shard, from, REMOTE_WAIT).await?))
            };
            let outcome = tokio::select! {
                outcome = read => outcome,
                _ = stopping.changed() => return,
            };
            match outcome {
                Ok((from, changes)) => {
                    let last = changes.last().map_or(from, |(last, _)| *last);
                    after = Some(last);
                    self.tailed[shard.0 as usize].fetch_max(last, Ordering::SeqCst);
                    for batch in batches(shard, changes) {
                        let _ = self.live.send(Arc::new(batch));
                    }
                }
                // No replica answered: its subscribers close once no leader is heard either.
                Err(_) => tokio::time::sleep(TAIL_POLL).await,
            }
        }
    }

    /// Where every shard's change log ends now: this node's replicas read at once, the others
    /// at a peer's.
    pub async fn tail_cursor(&self) -> Result<Cursor, EventError> {
        let n = self.n_shards();
        let shards = Arc::clone(&self.shards);
        let mut ends: Vec<Option<u64>> = self
            .reader
            .run(move |r| {
                (0..n)
                    .map(|s| {
                        shards
                            .local(ShardId(s))
                            .map(|_| r.log_bounds(ShardId(s)).last)
                    })
                    .collect()
            })
            .await;
        for (shard, end) in ends.iter_mut().enumerate() {
            if end.is_none() {
                let bounds = self.bounds(ShardId(shard as u32)).await;
                *end = Some(bounds.map_err(|error| no_replica(shard, &error))?.last);
            }
        }
        Ok(Cursor(
            ends.into_iter().map(|end| end.unwrap_or(0)).collect(),
        ))
    }

    /// Opens a stream of `segment` (at `generation`) from `start`: the frames to send, or why
    /// not (`cursor_expired` for a cursor past retention, `unavailable` at the limit or when
    /// no replica of some shard answers).
    pub async fn open(
        self: &Arc<Self>,
        segment: String,
        generation: u64,
        start: Start,
    ) -> Result<mpsc::Receiver<Bytes>, EventError> {
        if let Start::Cursor(cursor) = &start {
            let n = self.n_shards();
            let bounds = futures::future::join_all((0..n).map(|s| self.bounds(ShardId(s)))).await;
            let mut evicted = Vec::with_capacity(n as usize);
            for (shard, bounds) in bounds.into_iter().enumerate() {
                evicted.push(bounds.map_err(|error| no_replica(shard, &error))?.evicted);
            }
            if let Some(shard) = (0..n as usize).find(|&s| cursor.0[s] < evicted[s]) {
                return Err(EventError::field(
                    ErrorCode::CursorExpired,
                    "cursor",
                    format!(
                        "the cursor is older than shard {shard}'s change log keeps (retention): start again with snapshot=true"
                    ),
                ));
            }
        }
        let permit = Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            EventError::new(
                ErrorCode::Unavailable,
                format!("this node serves {STREAMS_MAX} streams, the most it can; retry on another node"),
            )
        })?;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_FRAMES_MAX);
        let subscriber =
            subscriber::Subscriber::new(Arc::clone(self), segment, generation, tx, permit);
        tokio::spawn(subscriber.run(start));
        Ok(rx)
    }

    pub fn render_metrics(&self, out: &mut String) {
        crate::metrics::gauge(
            out,
            "oneid_streams_open",
            "Segment streams this node serves.",
            self.open_count() as u64,
        );
        crate::metrics::counter(
            out,
            "oneid_streams_closed_behind_total",
            "Streams closed because their subscriber fell behind the broadcast ring.",
            self.closed_behind.load(Ordering::Relaxed),
        );
    }
}

/// No replica of `shard` answered a read of its change log.
fn no_replica(shard: usize, error: &ShardError) -> EventError {
    EventError::new(
        ErrorCode::Unavailable,
        format!("no replica of shard {shard} answered ({error}): retry"),
    )
}

/// The memory one change of a batch takes.
fn change_bytes((_, record): &(u64, ChangeRecord)) -> usize {
    std::mem::size_of::<(u64, ChangeRecord)>() + record.segment.len()
}

/// `changes` (in offset order) cut into batches of at most [`LIVE_BATCH_BYTES_MAX`] each.
fn batches(shard: ShardId, changes: Vec<(u64, ChangeRecord)>) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    let mut bytes = 0;
    for change in changes {
        let size = change_bytes(&change);
        match out.last_mut() {
            Some(batch) if bytes + size <= LIVE_BATCH_BYTES_MAX => batch.changes.push(change),
            _ => {
                out.push(Batch {
                    shard,
                    changes: vec![change],
                });
                bytes = 0;
            }
        }
        bytes += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneid_protocol::num::Millis;
    use oneid_state::segments::Change;

    #[test]
    fn a_large_read_is_broadcast_in_batches_bounded_in_bytes() {
        let change = |offset: u64| {
            let record = ChangeRecord {
                segment: "s".repeat(64),
                generation: 1,
                oneid: OneId(offset),
                change: Change::Enter,
                at: Millis(0),
            };
            (offset, record)
        };
        let per_batch = LIVE_BATCH_BYTES_MAX / change_bytes(&change(0));
        let n = per_batch as u64 * 5 / 2;
        let out = batches(ShardId(3), (1..=n).map(change).collect());
        let sizes: Vec<usize> = out.iter().map(|b| b.changes.len()).collect();
        assert_eq!(sizes, [per_batch, per_batch, per_batch / 2]);
        let offsets: Vec<u64> = out
            .iter()
            .flat_map(|b| b.changes.iter().map(|c| c.0))
            .collect();
        assert_eq!(offsets, (1..=n).collect::<Vec<_>>());
        assert!(out.iter().all(|b| b.shard == ShardId(3)));
        for batch in &out {
            let bytes: usize = batch.changes.iter().map(change_bytes).sum();
            assert!(bytes <= LIVE_BATCH_BYTES_MAX);
        }
        assert!(batches(ShardId(0), Vec::new()).is_empty());
    }
}
