//! `oneid bench --scenario profiles|expiry`: the long-running side of a node.
//!
//! - `profiles`: loads `--profiles` new customers (one order each, batches of `--batch` from
//!   `--senders` senders) and samples the node's RSS and its data directory's size every
//!   `--sample-every` profiles: the curve shows memory staying flat once the activation budget
//!   is full, and the disk bytes each profile costs.
//! - `expiry`: gives `--lot-profiles` customers `--lots` points lots that all expire at one
//!   instant, waits for it, and measures how the node drains them: the time until every lot
//!   expired, and the apply time of each clock entry (from `/metrics`), which must stay bounded
//!   whatever the backlog.

use crate::bench::{proc_status_kib, BenchArgs};
use oneid_client::Client;
use oneid_protocol::num::Millis;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes under a directory.
fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Sends `events` from `senders` tasks in batches; every event must apply.
async fn load(
    client: &Client,
    events: Vec<Value>,
    batch: usize,
    senders: usize,
) -> anyhow::Result<()> {
    let per_sender = events.len().div_ceil(senders);
    let mut tasks = Vec::new();
    let mut events = events;
    while !events.is_empty() {
        let rest = events.split_off(per_sender.min(events.len()));
        let mine = std::mem::replace(&mut events, rest);
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in mine.chunks(batch) {
                let answer = client.send_events_json(chunk).await?;
                anyhow::ensure!(
                    answer.rejected == 0,
                    "rejected: {:?}",
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

pub async fn profiles(client: &Client, args: &BenchArgs, json_only: bool) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut loaded = 0;
    if !json_only {
        println!(
            "{:>12} {:>10} {:>10} {:>12} {:>14}",
            "profiles", "rss MiB", "disk MiB", "bytes/profile", "events/s"
        );
    }
    while loaded < args.profiles {
        let step = args.sample_every.min(args.profiles - loaded);
        let step_started = Instant::now();
        let events: Vec<Value> = (loaded..loaded + step)
            .map(|n| {
                json!({"event_id": format!("p-{n}"), "type": "order", "identities": {"phone": format!("15{n:09}")},
                       "channel": "store", "order_id": format!("P{n}"), "amount": format!("{}.{:02}", 10 + n % 990, n % 100)})
            })
            .collect();
        load(client, events, args.batch, args.senders).await?;
        loaded += step;
        let rate = step as f64 / step_started.elapsed().as_secs_f64();
        let rss = args
            .node_pid
            .and_then(|pid| proc_status_kib(pid, "VmRSS:"))
            .map(|k| k as f64 / 1024.0);
        let disk = args.data_dir.as_deref().map(dir_bytes);
        let per_profile = disk.map(|d| d as f64 / loaded as f64);
        if !json_only {
            let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            println!(
                "{:>12} {:>10} {:>10} {:>12} {:>14.0}",
                loaded,
                show(rss),
                show(disk.map(|d| d as f64 / 1048576.0)),
                show(per_profile),
                rate
            );
        }
        samples.push(json!({"profiles": loaded, "rss_mib": rss, "disk_bytes": disk, "disk_bytes_per_profile": per_profile, "events_per_second": rate}));
    }
    let report = json!({"scenario": "profiles", "profiles": loaded, "seconds": started.elapsed().as_secs_f64(), "samples": samples});
    finish(args, &report, json_only)
}

/// The counts of a Prometheus histogram's cumulative buckets, by upper bound.
fn histogram(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect()
}

pub(crate) fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The smallest bucket bound holding fraction `q` of the observations between two scrapes.
fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let deltas: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((bound, a), (_, b))| (*bound, a - b))
        .collect();
    let total = deltas.last().map_or(0, |(_, n)| *n);
    deltas
        .iter()
        .find(|(_, n)| *n as f64 >= q * total as f64)
        .map_or(0.0, |(bound, _)| *bound)
}

pub async fn expiry(client: &Client, args: &BenchArgs, json_only: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.lot_profiles >= 1 && args.lots >= args.lot_profiles,
        "need lots >= lot_profiles >= 1"
    );
    let expires = Millis(wall_now().0 + args.expire_after as i64 * 1000);
    let load_seconds = load_expiring_lots(client, args, expires).await?;
    let drain = wait_for_drain(client, args, expires).await?;
    let (hb, ha) = (
        histogram(&drain.metrics_before, "oneid_clock_apply_seconds"),
        histogram(&drain.metrics_after, "oneid_clock_apply_seconds"),
    );
    let sample_balance = client
        .lookup("phone", &format!("16{:09}", 0))
        .await?
        .map(|p| p.points.balance);
    let result = ExpiryResult {
        load_seconds,
        drain_seconds: drain.seconds,
        clock_entries: ha.last().map_or(0, |b| b.1) - hb.last().map_or(0, |b| b.1),
        clock_apply_p50: quantile(&hb, &ha, 0.5),
        clock_apply_p99: quantile(&hb, &ha, 0.99),
        clock_apply_max: quantile(&hb, &ha, 1.0),
        sample_balance,
    };
    let report = expiry_report(&result, args);
    if !json_only {
        print_expiry(&result, args);
    }
    finish(args, &report, json_only)
}

/// Gives `--lot-profiles` customers `--lots` points lots that all expire at `expires`; answers
/// the seconds the loading took. Loading must end before the lots expire, or the drain would
/// overlap the loading and be timed wrong: then the run fails and asks for more time.
async fn load_expiring_lots(
    client: &Client,
    args: &BenchArgs,
    expires: Millis,
) -> anyhow::Result<f64> {
    let events: Vec<Value> = (0..args.lots)
        .map(|n| {
            json!({"event_id": format!("lot-{n}"), "type": "points_earn", "identities": {"phone": format!("16{:09}", n % args.lot_profiles)},
                   "points": 1, "expires_at": expires.to_string()})
        })
        .collect();
    let load_started = Instant::now();
    load(client, events, args.batch, args.senders).await?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    anyhow::ensure!(
        wall_now() < expires,
        "loading took longer than --expire-after {}s: raise it",
        args.expire_after
    );
    Ok(load_seconds)
}

/// The node's metrics on both sides of the drain, and the drain's length in seconds.
struct Drain {
    metrics_before: String,
    metrics_after: String,
    seconds: f64,
}

/// Scrapes the metrics, sleeps until the lots expire, then times how long the node takes to
/// process every one of them (from its count of due items processed), for at most 10 minutes.
async fn wait_for_drain(
    client: &Client,
    args: &BenchArgs,
    expires: Millis,
) -> anyhow::Result<Drain> {
    let metrics_before = client.metrics().await?;
    let due_before = counter(&metrics_before, "oneid_due_processed_total");
    let wait = Duration::from_millis((expires.0 - wall_now().0).max(0) as u64);
    tokio::time::sleep(wait).await;
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(600);
    let metrics_after = loop {
        let text = client.metrics().await?;
        if counter(&text, "oneid_due_processed_total") - due_before >= args.lots as u64 {
            break text;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the lots did not drain within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(Drain {
        metrics_before,
        metrics_after,
        seconds: drain_started.elapsed().as_secs_f64(),
    })
}

/// What the `expiry` scenario measured, handed from the measuring to the reporting.
struct ExpiryResult {
    load_seconds: f64,
    drain_seconds: f64,
    /// Clock entries applied during the drain, and bucket bounds (seconds) holding the 50th,
    /// 99th and 100th percentile of their apply times: bounds, because the node exports a
    /// histogram, not the times themselves.
    clock_entries: u64,
    clock_apply_p50: f64,
    clock_apply_p99: f64,
    clock_apply_max: f64,
    /// The first customer's balance once drained, a spot check that the lots really expired.
    sample_balance: Option<i64>,
}

impl ExpiryResult {
    fn lots_expired_per_second(&self, args: &BenchArgs) -> f64 {
        args.lots as f64 / self.drain_seconds
    }
}

/// The `expiry` scenario's JSON report (printed with `--json`, written to `--out`).
fn expiry_report(result: &ExpiryResult, args: &BenchArgs) -> Value {
    json!({
        "scenario": "expiry", "lots": args.lots, "profiles": args.lot_profiles, "load_seconds": result.load_seconds,
        "drain_seconds": result.drain_seconds, "lots_expired_per_second": result.lots_expired_per_second(args),
        "clock_entries": result.clock_entries, "clock_apply_p50_seconds_at_most": result.clock_apply_p50,
        "clock_apply_p99_seconds_at_most": result.clock_apply_p99, "clock_apply_max_seconds_at_most": result.clock_apply_max,
        "sample_balance_after": result.sample_balance,
    })
}

/// The `expiry` scenario's table, for a person.
fn print_expiry(result: &ExpiryResult, args: &BenchArgs) {
    println!(
        "{:<40} {:>12}",
        "lots (all expiring at one instant)", args.lots
    );
    println!("{:<40} {:>12.1}", "load seconds", result.load_seconds);
    println!(
        "{:<40} {:>12.2}",
        "drain seconds (all expired)", result.drain_seconds
    );
    println!(
        "{:<40} {:>12.0}",
        "lots expired/s",
        result.lots_expired_per_second(args)
    );
    println!(
        "{:<40} {:>12}",
        "clock entries applied meanwhile", result.clock_entries
    );
    println!(
        "{:<40} {:>12}",
        "clock entry apply p50/p99/max (≤ bucket s)",
        format!(
            "{}/{}/{}",
            result.clock_apply_p50, result.clock_apply_p99, result.clock_apply_max
        )
    );
    println!(
        "{:<40} {:>12}",
        "a profile's balance after",
        result.sample_balance.map_or("-".into(), |b| b.to_string())
    );
}

pub(crate) fn finish(args: &BenchArgs, report: &Value, json_only: bool) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    if json_only {
        println!("{text}");
    }
    if let Some(out) = &args.out {
        std::fs::write(out, &text)?;
    }
    Ok(())
}

fn wall_now() -> Millis {
    Millis::from_system_time(std::time::SystemTime::now())
}
