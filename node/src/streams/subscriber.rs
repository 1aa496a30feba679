//! One stream, from its start (cursor, snapshot or tail) through catch-up to following the
//! broadcast, until its client goes, its segment ends, it falls behind, or the node stops.

use super::{sse, Batch, Cursor, Start, Streams};
use super::{HEARTBEAT_EVERY, ID_EVERY, LEADERLESS_CLOSE, SNAPSHOT_PAGE};
use bytes::Bytes;
use oneid_protocol::ids::{OneId, ShardId};
use oneid_protocol::num::Millis;
use oneid_protocol::segments::{SegmentChange, SnapshotEnd};
use oneid_replica::ShardError;
use oneid_state::segments::{Change, ChangeRecord};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// The longest a subscriber waits for a replica behind the broadcast to hold what it needs.
const FILL_WAIT_MAX: Duration = Duration::from_secs(10);
/// How long one read of a peer's log waits for changes while a subscriber needs them.
const FILL_POLL: Duration = Duration::from_millis(500);

/// Why a stream ends.
#[derive(Debug)]
enum End {
    /// The client went away.
    Gone,
    /// Its segment was deleted and every shard has taken out its members.
    Ended,
    /// It fell behind: its buffer was full, it fell behind the broadcast ring, or retention
    /// evicted what it had not read.
    Behind,
    /// The node is stopping, or has heard from no leader of a shard for a while.
    Closed,
}

pub(super) struct Subscriber {
    streams: Arc<Streams>,
    segment: String,
    generation: u64,
    /// For each shard, the last offset delivered (or skipped as another segment's).
    cursor: Vec<u64>,
    /// Shards whose log said the segment ended there.
    ended: BTreeSet<u32>,
    tx: mpsc::Sender<Bytes>,
    /// Following the broadcast: a full buffer then closes the stream (before, while it reads
    /// the logs at its own pace, it waits for room).
    live: bool,
    /// When the cursor was last sent, and when anything was.
    id_sent: Instant,
    sent: Instant,
    _permit: OwnedSemaphorePermit,
}

impl Subscriber {
    pub(super) fn new(
        streams: Arc<Streams>,
        segment: String,
        generation: u64,
        tx: mpsc::Sender<Bytes>,
        permit: OwnedSemaphorePermit,
    ) -> Subscriber {
        let n = streams.n_shards() as usize;
        Subscriber {
            streams,
            segment,
            generation,
            cursor: vec![0; n],
            ended: BTreeSet::new(),
            live: false,
            tx,
            id_sent: Instant::now(),
            sent: Instant::now(),
            _permit: permit,
        }
    }

    pub(super) async fn run(mut self, start: Start) {
        // Subscribed before anything is read from the logs: whatever is written after the
        // catch-up reads arrives here.
        let mut live = self.streams.live.subscribe();
        let mut stopping = self.streams.stopping.subscribe();
        // Tests hold a subscriber here (`streams::subscriber_start=return(MILLISECONDS)`).
        #[cfg(feature = "failpoints")]
        if let Some(ms) = fail::eval("streams::subscriber_start", |ms| ms?.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms.unwrap_or(0))).await;
        }
        let end = async {
            match start {
                // A tail start was read before the stream was answered (`Streams::tail_cursor`).
                Start::Cursor(cursor) | Start::Tail(cursor) => {
                    self.cursor = cursor.0;
                    self.send_id().await?;
                }
                Start::Snapshot => self.snapshot().await?,
            }
            self.catch_up().await?;
            self.follow(&mut live, &mut stopping).await
        }
        .await;
        if matches!(end, Err(End::Behind)) {
            self.streams.closed_behind.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(segment = %self.segment, ?end, "stream ended");
    }

    async fn send(&mut self, frame: Bytes) -> Result<(), End> {
        if self.live {
            self.tx.try_send(frame).map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => End::Behind,
                mpsc::error::TrySendError::Closed(_) => End::Gone,
            })?;
        } else {
            self.tx.send(frame).await.map_err(|_| End::Gone)?;
        }
        self.sent = Instant::now();
        Ok(())
    }

    /// An id-only event: the cursor, without a change.
    async fn send_id(&mut self) -> Result<(), End> {
        let id = Cursor(self.cursor.clone()).encode(self.streams.scope);
        self.id_sent = Instant::now();
        self.send(sse::event(Some(&id), None, None)).await
    }

    /// Every current member as an `enter` without an id, shard by shard, each at a point of
    /// its log; then `snapshot_end` with the cursor of those points. No storage snapshot is
    /// held: the members are read in pages while the log moves on, then corrected by what the
    /// log says changed meanwhile.
    async fn snapshot(&mut self) -> Result<(), End> {
        let mut count = 0u64;
        for shard in 0..self.streams.n_shards() {
            let (members, clock) = self.members_at_a_point(ShardId(shard)).await?;
            count += members.len() as u64;
            for oneid in members {
                let change = self.change_json(self.generation, oneid, Change::Enter, clock, None);
                self.send(sse::event(None, None, Some(&change))).await?;
            }
        }
        let id = Cursor(self.cursor.clone()).encode(self.streams.scope);
        let end = serde_json::to_string(&SnapshotEnd {
            segment: self.segment.clone(),
            members: count,
        })
        .expect("encodes");
        self.id_sent = Instant::now();
        self.send(sse::event(Some(&id), Some("snapshot_end"), Some(&end)))
            .await?;
        // Every shard's end marker came before the snapshot's points: nothing follows.
        if self.ended.len() == self.cursor.len() {
            return Err(End::Ended);
        }
        Ok(())
    }

    /// One shard's members at a point of its log (which becomes `cursor[shard]`), and its
    /// clock. Each page is read from its own short storage snapshot, at the log offset that
    /// snapshot holds; the pages are then brought to the last one's offset by what the log
    /// says changed after each page's own.
    async fn members_at_a_point(
        &mut self,
        shard: ShardId,
    ) -> Result<(BTreeSet<OneId>, Millis), End> {
        // (the page's last member, or `None` for the last page; its offset), in key order.
        let mut pages: Vec<(Option<OneId>, u64)> = Vec::new();
        let mut members = BTreeSet::new();
        let mut after = None;
        let point = loop {
            let segment = self.segment.clone();
            let (page, bounds) = self
                .streams
                .members_at(shard, segment, after)
                .await
                .map_err(unreachable)?;
            let full = page.len() == SNAPSHOT_PAGE;
            after = page.last().copied();
            members.extend(page);
            pages.push((after.filter(|_| full), bounds.last));
            if !full {
                break bounds;
            }
        };
        // A change applies to a member if it came after the offset of the page that covers
        // the member's key.
        let offset_of = |oneid: OneId| {
            pages
                .iter()
                .find(|(last, _)| last.is_none_or(|last| oneid <= last))
                .map_or(point.last, |(_, offset)| *offset)
        };
        let mut offset = pages[0].1;
        while offset < point.last {
            let changes = self
                .streams
                .changes(shard, offset, Duration::ZERO)
                .await
                .map_err(unreachable)?;
            if changes
                .first()
                .is_none_or(|(first, _)| *first != offset + 1)
            {
                return Err(End::Behind);
            }
            for (at, record) in changes {
                if at > point.last {
                    break;
                }
                offset = at;
                if record.segment != self.segment {
                    continue;
                }
                let covered = at <= offset_of(record.oneid);
                if replay(&mut members, self.generation, &record, covered) {
                    self.ended.insert(shard.0);
                }
            }
        }
        self.cursor[shard.0 as usize] = point.last;
        Ok((members, point.clock))
    }

    /// Delivers what each shard's log holds after the cursor, read from the log itself.
    /// The subscriber subscribed to the ring before this: what a remote tailer broadcast
    /// before then, the catch-up must reach (`Streams::tailed`).
    async fn catch_up(&mut self) -> Result<(), End> {
        for shard in (0..self.streams.n_shards()).map(ShardId) {
            let need = self.streams.tailed(shard);
            self.fill(shard, u64::MAX, need).await?;
        }
        Ok(())
    }

    /// Delivers what the shard's log holds after the cursor, up to offset `until`, read from
    /// the log itself (this node's replica, or a peer's): until the log has no more, or a gap
    /// (entries evicted before they were read) ends the stream. While the cursor is below
    /// `need` (what the broadcast already went past), a replica that has no more yet is behind
    /// the one the tailer read: it is asked again, waiting for its next writes, up to
    /// [`FILL_WAIT_MAX`], before the stream ends as behind.
    async fn fill(&mut self, shard: ShardId, until: u64, need: u64) -> Result<(), End> {
        let s = shard.0 as usize;
        let deadline = Instant::now() + FILL_WAIT_MAX;
        while self.cursor[s] < until {
            let short = self.cursor[s] < need;
            let wait = if short { FILL_POLL } else { Duration::ZERO };
            let changes = self
                .streams
                .changes(shard, self.cursor[s], wait)
                .await
                .map_err(unreachable)?;
            if changes.is_empty() {
                if !short {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(End::Behind);
                }
                // A local read does not wait: pause before asking again.
                tokio::time::sleep(FILL_POLL / 10).await;
                continue;
            }
            for (offset, record) in &changes {
                if *offset > until {
                    return Ok(());
                }
                self.take(shard, *offset, record).await?;
            }
        }
        Ok(())
    }

    /// Follows the broadcast until the stream ends.
    async fn follow(
        &mut self,
        live: &mut tokio::sync::broadcast::Receiver<Arc<Batch>>,
        stopping: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), End> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        self.live = true;
        loop {
            if *stopping.borrow() {
                return Err(End::Closed);
            }
            tokio::select! {
                batch = live.recv() => match batch {
                    Ok(batch) => self.deliver(&batch).await?,
                    Err(RecvError::Lagged(_)) => return Err(End::Behind),
                    Err(RecvError::Closed) => return Err(End::Closed),
                },
                _ = tick.tick() => self.keep_alive().await?,
                _ = stopping.changed() => return Err(End::Closed),
            }
        }
    }

    /// Once a second: closes a stream whose shards lost their leaders, sends the cursor every
    /// [`ID_EVERY`] and a heartbeat after [`HEARTBEAT_EVERY`] of silence.
    async fn keep_alive(&mut self) -> Result<(), End> {
        let shards = &self.streams.shards;
        if (0..shards.n_shards).any(|s| !shards.leader_heard_within(ShardId(s), LEADERLESS_CLOSE)) {
            return Err(End::Closed);
        }
        if self.id_sent.elapsed() >= ID_EVERY {
            self.send_id().await?;
        } else if self.sent.elapsed() >= HEARTBEAT_EVERY {
            self.send(sse::comment("heartbeat")).await?;
        }
        Ok(())
    }

    /// Delivers the changes of a batch after the cursor. What lies between the cursor and a
    /// batch that starts further on (the tail of a peer's log starts where that log stood when
    /// it began) is read from the log first; a gap the log cannot fill either ends the stream.
    async fn deliver(&mut self, batch: &Batch) -> Result<(), End> {
        let shard = batch.shard;
        for (offset, record) in &batch.changes {
            if *offset > self.cursor[shard.0 as usize] + 1 {
                self.fill(shard, offset - 1, offset - 1).await?;
            }
            if *offset > self.cursor[shard.0 as usize] {
                self.take(shard, *offset, record).await?;
            }
        }
        Ok(())
    }

    /// Delivers the change at `offset`, the one after the cursor; one further on is a gap
    /// (entries evicted before they were read, or a peer's replica behind the log read so
    /// far), which ends the stream: its client resumes by cursor (and learns if it expired).
    async fn take(
        &mut self,
        shard: ShardId,
        offset: u64,
        record: &ChangeRecord,
    ) -> Result<(), End> {
        let s = shard.0 as usize;
        if offset != self.cursor[s] + 1 {
            return Err(End::Behind);
        }
        self.cursor[s] = offset;
        if record.segment != self.segment {
            return Ok(());
        }
        self.deliver_one(shard, record).await
    }

    async fn deliver_one(&mut self, shard: ShardId, record: &ChangeRecord) -> Result<(), End> {
        if record.change.kind().is_none() {
            if ends(record, self.generation) {
                self.ended.insert(shard.0);
                if self.ended.len() == self.cursor.len() {
                    self.send_id().await?;
                    return Err(End::Ended);
                }
            }
            return Ok(());
        }
        let id = Cursor(self.cursor.clone()).encode(self.streams.scope);
        let data = self.change_json(
            record.generation,
            record.oneid,
            record.change,
            record.at,
            Some(&id),
        );
        self.id_sent = Instant::now();
        self.send(sse::event(Some(&id), None, Some(&data))).await
    }

    /// The `data:` of a change, an enter or an exit (`id`: the cursor after it; snapshot
    /// entries have none).
    fn change_json(
        &self,
        generation: u64,
        oneid: OneId,
        change: Change,
        at: Millis,
        id: Option<&str>,
    ) -> String {
        serde_json::to_string(&SegmentChange {
            segment: self.segment.clone(),
            generation,
            oneid: oneid.to_string(),
            change: change.kind().expect("an enter or an exit"),
            at: at.to_string(),
            cursor: id.map(str::to_string),
            merged_into: change.merged_into().map(|into| into.to_string()),
        })
        .expect("encodes")
    }
}

/// A read of a shard's log that no replica answered: the stream closes, and its client resumes
/// by cursor (here or on another node).
fn unreachable(error: ShardError) -> End {
    tracing::debug!(%error, "a stream's read of a change log failed");
    End::Closed
}

/// Whether a change-log record ends a stream of the segment's generation `generation` on its
/// shard: an end marker of that generation or a later one (a segment deleted and defined
/// again leaves the old generation's marker in the log, which ends nothing of the new one).
fn ends(record: &ChangeRecord, generation: u64) -> bool {
    record.change == Change::Ended && record.generation >= generation
}

/// One change a snapshot replays onto the members it read: an entry or exit counts unless the
/// member page covering its OneID was read after it (`covered`). Answers whether the record
/// ends the stream on its shard.
fn replay(
    members: &mut BTreeSet<OneId>,
    generation: u64,
    record: &ChangeRecord,
    covered: bool,
) -> bool {
    match record.change {
        Change::Ended => return ends(record, generation),
        _ if covered => {}
        Change::Enter => {
            members.insert(record.oneid);
        }
        Change::Exit | Change::MergedInto(_) => {
            members.remove(&record.oneid);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(generation: u64, oneid: u64, change: Change) -> ChangeRecord {
        ChangeRecord {
            segment: "vip".to_string(),
            generation,
            oneid: OneId(oneid),
            change,
            at: Millis(0),
        }
    }

    #[test]
    fn a_snapshot_replay_ends_only_on_an_end_marker_of_its_generation_or_later() {
        let mut members = BTreeSet::from([OneId(1), OneId(2)]);
        // The segment was deleted (generation 2) and defined again (3) while the stream read
        // its snapshot: the old generation's marker ends nothing.
        assert!(!replay(
            &mut members,
            3,
            &record(2, 0, Change::Ended),
            false
        ));
        assert!(replay(&mut members, 3, &record(3, 0, Change::Ended), false));
        assert!(replay(&mut members, 3, &record(4, 0, Change::Ended), true));
        assert_eq!(members, BTreeSet::from([OneId(1), OneId(2)]));
    }

    #[test]
    fn a_snapshot_replay_applies_only_what_its_page_did_not_cover() {
        let mut members = BTreeSet::from([OneId(1), OneId(2)]);
        assert!(!replay(
            &mut members,
            1,
            &record(1, 3, Change::Enter),
            false
        ));
        assert!(!replay(&mut members, 1, &record(1, 1, Change::Exit), false));
        assert!(!replay(&mut members, 1, &record(1, 2, Change::Exit), true));
        assert!(!replay(&mut members, 1, &record(1, 4, Change::Enter), true));
        assert_eq!(members, BTreeSet::from([OneId(2), OneId(3)]));
    }
}
