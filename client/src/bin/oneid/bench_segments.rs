//! `oneid bench --scenario segments-ingest|segments`: what segments cost and how fast their
//! changes travel (`scripts/bench --scenario segments` runs both on fresh nodes).
//!
//! - `segments-ingest --segments N`: defines N segments (a mix of tier, tag, channel, points,
//!   spend and per-channel recency predicates), then ingests the standard event mix; reports
//!   events/s. The script runs it with 0 and with 100 on fresh nodes and reports the ratio.
//! - `segments`: loads `--profiles` profiles, defines one segment over them and times its
//!   backfill; then, with a stream connected, sends single-event writes that each make a
//!   profile enter and measures the time from each write's acknowledgement to its change
//!   arriving on the stream (p50, p99); then opens `--subscribers` streams and samples the
//!   node's RSS before, with them open while changes flow, and after they closed.

use crate::bench::{ingest, proc_status_kib, BenchArgs};
use futures::StreamExt;
use oneid_client::{Client, SegmentEvent, WatchFrom};
use oneid_protocol::segments::SegmentChange;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHANNELS: [&str; 5] = ["tmall", "jd", "douyin", "wecom", "store"];

/// Segment `i` of the mix.
fn predicate(i: usize) -> String {
    let channel = CHANNELS[i % CHANNELS.len()];
    let k = i % 20;
    match i % 5 {
        0 => format!("tier >= \"silver\" and has_tag(\"interest_{k}\")"),
        1 => format!("days_since(last_order_on(\"{channel}\")) <= {}", 7 + i % 30),
        2 => format!("points >= {}", 100 * (1 + i % 10)),
        3 => format!(
            "channel(\"{channel}\") and spend_365d >= {}",
            500 * (1 + i % 4)
        ),
        _ => format!(
            "order_count >= {} and not has_tag(\"interest_{k}\")",
            1 + i % 5
        ),
    }
}

pub async fn segments_ingest(
    server: &str,
    args: &BenchArgs,
    json_only: bool,
) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    for i in 0..args.segments {
        client
            .put_segment(&format!("s{i:03}"), &predicate(i), None)
            .await?;
    }
    let (seconds, total, (applied, _, rejected), _) = ingest(&[server.to_string()], args).await?;
    let rate = total as f64 / seconds;
    let result = json!({"segments": args.segments, "events": total, "applied": applied,
        "rejected": rejected, "seconds": seconds, "events_per_second": rate});
    report(args, &result, json_only)?;
    if !json_only {
        println!(
            "{} segments: {total} events in {seconds:.1} s = {rate:.0} events/s",
            args.segments
        );
    }
    Ok(())
}

fn report(args: &BenchArgs, result: &Value, json_only: bool) -> anyhow::Result<()> {
    if json_only {
        println!("{result}");
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(result)?)?;
    }
    Ok(())
}

/// Loads `count` profiles, each with one order of `amount(i)`, in batches from 8 senders.
async fn load_profiles(client: &Client, count: usize, prefix: &str) -> anyhow::Result<()> {
    let senders = 8;
    let mut tasks = Vec::new();
    for sender in 0..senders {
        let client = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (sender..count).step_by(senders).collect();
            for chunk in mine.chunks(1_000) {
                let events: Vec<Value> = chunk
                    .iter()
                    .map(|i| {
                        json!({"event_id": format!("{prefix}{i}"), "type": "order",
                        "identities": {"phone": format!("{prefix}{i:09}")}, "order_id": "T1",
                        "amount": format!("{}.00", 1 + i % 1000), "channel": CHANNELS[i % 5]})
                    })
                    .collect();
                let answer = client.send_events_json(&events).await?;
                anyhow::ensure!(
                    answer.rejected == 0,
                    "{:?}",
                    answer.results.iter().find(|r| r.error.is_some())
                );
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

pub async fn segments(server: &str, args: &BenchArgs, json_only: bool) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    raise_open_files();
    let backfill = measure_backfill(&client, args, json_only).await?;
    let latency = measure_stream_latency(&client, args, json_only).await?;
    let subscribers = measure_subscribers(&client, args, json_only).await?;
    let result = json!({
        "profiles": args.profiles, "backfill_seconds": backfill.seconds,
        "backfill_members": backfill.members,
        "ack_to_stream_p50_ms": latency.p50, "ack_to_stream_p99_ms": latency.p99,
        "ack_to_stream_missing": latency.missing,
        "stream_before_ack": latency.before_ack, "send_to_stream_p50_ms": latency.send_p50,
        "send_to_stream_p99_ms": latency.send_p99,
        "subscribers": args.subscribers, "subscriber_changes_delivered": subscribers.delivered,
        "subscriber_changes_expected": subscribers.expected,
        "rss_kib_before": subscribers.rss_before, "rss_kib_with_subscribers": subscribers.rss_with,
        "rss_kib_after": subscribers.rss_after,
    });
    report(args, &result, json_only)
}

/// The node's resident memory in KiB now (0 without `--node-pid`), also printed under `label`
/// for a person.
fn sample_rss(args: &BenchArgs, label: &str, json_only: bool) -> u64 {
    let kib = args.node_pid.and_then(|pid| proc_status_kib(pid, "VmRSS:"));
    if !json_only {
        println!("  RSS {label}: {} MiB", kib.unwrap_or(0) / 1024);
    }
    kib.unwrap_or(0)
}

/// Waits until `done` answers true, checking every `every`, for at most `within`. Running out
/// of time is not an error: the phases that wait report what they got by then (changes
/// missing, streams not yet counted), which is itself the measurement.
async fn wait_until(within: Duration, every: Duration, done: impl AsyncFn() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await && Instant::now() < deadline {
        tokio::time::sleep(every).await;
    }
}

/// What the backfill phase measured.
struct BackfillResult {
    /// From the segment's definition until its backfill said `done`.
    seconds: f64,
    /// The segment's members once backfilled.
    members: u64,
}

/// Loads `--profiles` profiles, then defines a segment over about half of them and times its
/// backfill. The loading is not part of the time, only printed for a person.
async fn measure_backfill(
    client: &Client,
    args: &BenchArgs,
    json_only: bool,
) -> anyhow::Result<BackfillResult> {
    let loading = Instant::now();
    load_profiles(client, args.profiles, "13").await?;
    if !json_only {
        println!(
            "loaded {} profiles in {:.1} s",
            args.profiles,
            loading.elapsed().as_secs_f64()
        );
    }
    let defined = Instant::now();
    client
        .put_segment("half", "total_spend >= 501", None)
        .await?;
    let doc = loop {
        let doc = client.segment("half").await?.expect("defined");
        if doc.backfill.state == "done" {
            break doc;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = defined.elapsed().as_secs_f64();
    if !json_only {
        println!(
            "backfill of {} profiles: {seconds:.2} s ({} members)",
            doc.backfill.profiles_total, doc.size
        );
    }
    Ok(BackfillResult {
        seconds,
        members: doc.size,
    })
}

/// Event `i` of a run of writes that each tag a profile `ping`, which makes it enter the
/// `latency` segment: `p`/`13` tags the profiles loaded for the backfill, `q`/`12` new ones.
fn ping_event(event_prefix: &str, phone_prefix: &str, i: usize) -> Value {
    json!({"event_id": format!("{event_prefix}-{i}"), "type": "tag_add",
        "identities": {"phone": format!("{phone_prefix}{i:09}")}, "tag": "ping"})
}

/// Watches the `latency` segment from now on, in its own task, calling `on_change` for each
/// change that arrives; the measuring phases abort the task when they are done.
fn watch_latency_segment(
    client: &Client,
    mut on_change: impl FnMut(SegmentChange) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let client = client.clone();
    tokio::spawn(async move {
        let mut watch = std::pin::pin!(client.watch_segment("latency", WatchFrom::Tail));
        while let Some(Ok(event)) = watch.next().await {
            if let SegmentEvent::Change(change) = event {
                on_change(change);
            }
        }
    })
}

/// When each write of a profile was sent and when it was acknowledged, by the profile's OneID
/// (the key its change arrives under on the stream).
type WriteTimes = BTreeMap<String, (Instant, Instant)>;

/// What the acknowledgement-to-stream phase measured, in milliseconds.
struct LatencyResult {
    p50: f64,
    p99: f64,
    send_p50: f64,
    send_p99: f64,
    /// Writes whose change never arrived, and changes that arrived before their write's
    /// acknowledgement.
    missing: usize,
    before_ack: usize,
}

/// With a stream connected to a new segment, sends `--latency-writes` single-event writes that
/// each make a profile enter it, and measures how long each change takes to arrive: from the
/// write's acknowledgement, and from the request's start.
async fn measure_stream_latency(
    client: &Client,
    args: &BenchArgs,
    json_only: bool,
) -> anyhow::Result<LatencyResult> {
    client
        .put_segment("latency", "has_tag(\"ping\")", None)
        .await?;
    let arrived: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let watcher = {
        let arrived = Arc::clone(&arrived);
        watch_latency_segment(client, move |change| {
            arrived
                .lock()
                .expect("lock")
                .insert(change.oneid, Instant::now());
        })
    };
    // The stream starts at the tail: the first writes must wait until it is connected, or
    // their changes would never arrive and count as missing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = send_timed_writes(client, args.latency_writes).await?;
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        async || arrived.lock().expect("lock").len() >= acked.len(),
    )
    .await;
    watcher.abort();
    let arrived = arrived.lock().expect("lock").clone();
    let from_ack = latencies_since(&acked, &arrived, |(_, acked)| *acked);
    let from_send = latencies_since(&acked, &arrived, |(sent, _)| *sent);
    let p = crate::bench::percentile;
    let result = LatencyResult {
        p50: p(&from_ack, 0.5),
        p99: p(&from_ack, 0.99),
        send_p50: p(&from_send, 0.5),
        send_p99: p(&from_send, 0.99),
        missing: from_ack.iter().filter(|l| **l == u64::MAX).count(),
        before_ack: from_ack.iter().filter(|l| **l == 0).count(),
    };
    if !json_only {
        print_latency(from_ack.len(), &result);
    }
    Ok(result)
}

/// The acknowledgement-to-stream phase in one line, for a person.
fn print_latency(writes: usize, result: &LatencyResult) {
    let LatencyResult {
        p50,
        p99,
        send_p50,
        send_p99,
        missing,
        before_ack,
    } = result;
    println!(
        "over {writes} writes: ack to stream p50 {p50:.2} ms, p99 {p99:.2} ms ({before_ack} reached the stream before their ack); request start to stream p50 {send_p50:.2} ms, p99 {send_p99:.2} ms; {missing} missing"
    );
}

/// Sends `count` ping writes one at a time, a few milliseconds apart so that each change is
/// timed on its own rather than in a burst, and notes when each was sent and acknowledged.
async fn send_timed_writes(client: &Client, count: usize) -> anyhow::Result<WriteTimes> {
    let mut acked = BTreeMap::new();
    for i in 0..count {
        let event = ping_event("p", "13", i);
        let sent = Instant::now();
        let answer = client.send_events_json(&[event]).await?;
        let oneid = answer.results[0].oneid.clone().expect("applied");
        acked.insert(oneid, (sent, Instant::now()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(acked)
}

/// Each write's time in µs from the instant `pick` takes (its acknowledgement or its request's
/// start) to its change's arrival, sorted. A change that reached the stream first counts as 0,
/// and one that never arrived as `u64::MAX`, so both stay countable.
fn latencies_since(
    acked: &WriteTimes,
    arrived: &BTreeMap<String, Instant>,
    pick: fn(&(Instant, Instant)) -> Instant,
) -> Vec<u64> {
    let mut micros: Vec<u64> = acked
        .iter()
        .map(|(oneid, times)| {
            arrived.get(oneid).map_or(u64::MAX, |at| {
                at.saturating_duration_since(pick(times)).as_micros() as u64
            })
        })
        .collect();
    micros.sort_unstable();
    micros
}

/// What the many-subscribers phase measured.
struct SubscribersResult {
    /// Changes the subscribers received in all, of those they should have.
    delivered: u64,
    expected: u64,
    /// The node's RSS in KiB before the streams opened, with them open, and after they closed.
    rss_before: u64,
    rss_with: u64,
    rss_after: u64,
}

/// Opens `--subscribers` streams on the `latency` segment, sends 20 changes through them all,
/// then closes them; samples the node's RSS before, during and after, to show what a stream
/// costs and that the memory comes back.
async fn measure_subscribers(
    client: &Client,
    args: &BenchArgs,
    json_only: bool,
) -> anyhow::Result<SubscribersResult> {
    let rss_before = sample_rss(args, "before the subscribers", json_only);
    let open = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = (0..args.subscribers)
        .map(|_| {
            let received = Arc::clone(&received);
            watch_latency_segment(client, move |_| {
                received.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    // Wait until the node counts them all.
    let subscribers = args.subscribers as u64;
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || open_streams(client).await >= subscribers,
    )
    .await;
    let opened_in = open.elapsed().as_secs_f64();
    for i in 0..20 {
        client.send_events_json(&[ping_event("q", "12", i)]).await?;
    }
    let expected = 20 * subscribers;
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || received.load(Ordering::Relaxed) >= expected,
    )
    .await;
    let rss_with = sample_rss(args, "with the subscribers open", json_only);
    let delivered = received.load(Ordering::Relaxed);
    close_streams(client, &streams).await;
    let rss_after = sample_rss(args, "after they closed", json_only);
    if !json_only {
        println!(
            "{} subscribers open in {opened_in:.1} s; {delivered} of {expected} changes delivered",
            args.subscribers
        );
    }
    Ok(SubscribersResult {
        delivered,
        expected,
        rss_before,
        rss_with,
        rss_after,
    })
}

/// Closes the subscribers' streams and waits until the node counts none open, then a second
/// more, so that the RSS sampled next is the node's after it let them go.
async fn close_streams(client: &Client, streams: &[tokio::task::JoinHandle<()>]) {
    for stream in streams {
        stream.abort();
    }
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || open_streams(client).await == 0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn open_streams(client: &Client) -> u64 {
    let text = client.metrics().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("oneid_streams_open "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A thousand streams need a thousand sockets: the soft open-file limit goes to the hard one.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
