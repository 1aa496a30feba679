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
use serde_json::{json, Value};
use std::collections::BTreeMap;
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
                let answer = client.send_events(&events).await?;
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
    let rss = |label: &str| {
        let kib = args.node_pid.and_then(|pid| proc_status_kib(pid, "VmRSS:"));
        if !json_only {
            println!("  RSS {label}: {} MiB", kib.unwrap_or(0) / 1024);
        }
        kib.unwrap_or(0)
    };

    // Backfill.
    let loading = Instant::now();
    load_profiles(&client, args.profiles, "13").await?;
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
    let backfill_seconds = defined.elapsed().as_secs_f64();
    if !json_only {
        println!(
            "backfill of {} profiles: {backfill_seconds:.2} s ({} members)",
            doc.backfill.profiles_total, doc.size
        );
    }

    // Acknowledgement to stream.
    client
        .put_segment("latency", "has_tag(\"ping\")", None)
        .await?;
    let arrived: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let watcher = {
        let client = client.clone();
        let arrived = Arc::clone(&arrived);
        tokio::spawn(async move {
            let mut watch = std::pin::pin!(client.watch_segment("latency", WatchFrom::Tail));
            while let Some(Ok(event)) = watch.next().await {
                if let SegmentEvent::Change(change) = event {
                    arrived
                        .lock()
                        .expect("lock")
                        .insert(change.oneid, Instant::now());
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut acked = BTreeMap::new();
    for i in 0..args.latency_writes {
        let event = json!({"event_id": format!("p-{i}"), "type": "tag_add",
            "identities": {"phone": format!("13{i:09}")}, "tag": "ping"});
        let sent = Instant::now();
        let answer = client.send_events(&[event]).await?;
        let oneid = answer.results[0].oneid.clone().expect("applied");
        acked.insert(oneid, (sent, Instant::now()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrived.lock().expect("lock").len() < acked.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watcher.abort();
    let arrived = arrived.lock().expect("lock").clone();
    // From the acknowledgement (a change that reached the stream first counts as 0), and
    // from the request's start.
    let since = |pick: fn(&(Instant, Instant)) -> Instant| {
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
    };
    let from_ack = since(|(_, acked)| *acked);
    let from_send = since(|(sent, _)| *sent);
    let missing = from_ack.iter().filter(|l| **l == u64::MAX).count();
    let before_ack = from_ack.iter().filter(|l| **l == 0).count();
    let p = crate::bench::percentile;
    let (p50, p99) = (p(&from_ack, 0.5), p(&from_ack, 0.99));
    let (send_p50, send_p99) = (p(&from_send, 0.5), p(&from_send, 0.99));
    if !json_only {
        println!(
            "over {} writes: ack to stream p50 {p50:.2} ms, p99 {p99:.2} ms ({before_ack} reached the stream before their ack); request start to stream p50 {send_p50:.2} ms, p99 {send_p99:.2} ms; {missing} missing",
            from_ack.len()
        );
    }

    // Many subscribers.
    let before = rss("before the subscribers");
    let open = Instant::now();
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut streams = Vec::new();
    for _ in 0..args.subscribers {
        let client = client.clone();
        let received = Arc::clone(&received);
        streams.push(tokio::spawn(async move {
            let mut watch = std::pin::pin!(client.watch_segment("latency", WatchFrom::Tail));
            while let Some(Ok(event)) = watch.next().await {
                if matches!(event, SegmentEvent::Change(_)) {
                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    // Wait until the node counts them all.
    let counted = Instant::now() + Duration::from_secs(30);
    while open_streams(&client).await < args.subscribers as u64 && Instant::now() < counted {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened_in = open.elapsed().as_secs_f64();
    for i in 0..20 {
        let event = json!({"event_id": format!("q-{i}"), "type": "tag_add",
            "identities": {"phone": format!("12{i:09}")}, "tag": "ping"});
        client.send_events(&[event]).await?;
    }
    let expected = 20 * args.subscribers as u64;
    let delivered_by = Instant::now() + Duration::from_secs(30);
    while received.load(std::sync::atomic::Ordering::Relaxed) < expected
        && Instant::now() < delivered_by
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let with = rss("with the subscribers open");
    let delivered = received.load(std::sync::atomic::Ordering::Relaxed);
    for stream in &streams {
        stream.abort();
    }
    let closed_by = Instant::now() + Duration::from_secs(30);
    while open_streams(&client).await > 0 && Instant::now() < closed_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss("after they closed");
    if !json_only {
        println!(
            "{} subscribers open in {opened_in:.1} s; {delivered} of {expected} changes delivered",
            args.subscribers
        );
    }
    let result = json!({
        "profiles": args.profiles, "backfill_seconds": backfill_seconds,
        "backfill_members": doc.size,
        "ack_to_stream_p50_ms": p50, "ack_to_stream_p99_ms": p99, "ack_to_stream_missing": missing,
        "stream_before_ack": before_ack, "send_to_stream_p50_ms": send_p50,
        "send_to_stream_p99_ms": send_p99,
        "subscribers": args.subscribers, "subscriber_changes_delivered": delivered,
        "subscriber_changes_expected": expected,
        "rss_kib_before": before, "rss_kib_with_subscribers": with, "rss_kib_after": after,
    });
    report(args, &result, json_only)
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
