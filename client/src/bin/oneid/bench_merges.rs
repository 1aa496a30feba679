//! `oneid bench --scenario merges`: what merging customers costs, spread over `--server` and
//! `--also` (one node, or the nodes of a cluster).
//!
//! 1. **Latency**: `--latency-writes` pairs of customers, one known by a phone and one by an
//!    email (held by different shards' indexes), then one event per pair naming both, sent one
//!    at a time: p50 and p99 of those requests; and as the baseline, in the same run, as many
//!    single events of one existing customer each (no merge), sent the same way.
//! 2. **Ingest**: `--events` earns over `--customers` existing customers by `--senders`
//!    senders in batches of `--batch`, with 1% of them naming a second customer (so each of
//!    those merges two), against the same with none; alternating, [`INGEST_ROUNDS`] rounds
//!    each, each round on customers of its own, timed once the nodes settled (no flush or
//!    compaction left from setting the customers up, or from the round before): events per
//!    second and the ratio of the medians.

use crate::bench::{p50_p99_ms, percentile, settle, BenchArgs};
use oneid_client::Client;
use oneid_protocol::api::EventStatus;
use serde_json::{json, Value};
use std::time::Instant;

/// Every this many events of the merging ingest, one names two customers.
const MERGE_EVERY: usize = 100;
/// Ingest rounds of each kind (with merges, without), alternating. A compaction of many tables
/// comes every few rounds at the same written volume, so it falls on the same rounds of a run
/// each time, and slows them by up to half: the median of five is not moved by two such
/// rounds.
const INGEST_ROUNDS: usize = 5;

fn phone(tag: &str, i: usize) -> String {
    format!("{tag}p{i:08}")
}

fn email(tag: &str, i: usize) -> String {
    format!("{tag}e{i:08}@x")
}

/// `n` customers known by a phone and `n` others known by an email, sent in batches.
async fn customers(clients: &[Client], tag: &str, n: usize) -> anyhow::Result<()> {
    let events: Vec<Value> = (0..n)
        .flat_map(|i| {
            [
                json!({"event_id": format!("{tag}-p{i}"), "type": "points_earn", "points": 1,
                    "identities": {"phone": phone(tag, i)}}),
                json!({"event_id": format!("{tag}-e{i}"), "type": "points_earn", "points": 1,
                    "identities": {"email": email(tag, i)}}),
            ]
        })
        .collect();
    for (n, chunk) in events.chunks(1000).enumerate() {
        let answer = clients[n % clients.len()].send_events_json(chunk).await?;
        anyhow::ensure!(answer.rejected == 0, "setting up customers: {answer:?}");
    }
    Ok(())
}

/// Sends each event alone, one after another; each request's time in µs, sorted.
async fn one_by_one(
    clients: &[Client],
    events: Vec<Value>,
    merges: bool,
) -> anyhow::Result<Vec<u64>> {
    let mut times = Vec::with_capacity(events.len());
    for (i, event) in events.into_iter().enumerate() {
        let started = Instant::now();
        let answer = clients[i % clients.len()]
            .send_events_json(&[event])
            .await?;
        times.push(started.elapsed().as_micros() as u64);
        let result = &answer.results[0];
        anyhow::ensure!(
            result.status == EventStatus::Applied && result.merged.is_empty() != merges,
            "an unexpected answer: {result:?}"
        );
    }
    times.sort_unstable();
    Ok(times)
}

/// Merge latency against the single-event baseline (see the module's comment).
async fn latency(clients: &[Client], args: &BenchArgs) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let n = args.latency_writes;
    let tag = format!("ml{}", args.seed);
    customers(clients, &tag, n).await?;
    let merging = (0..n)
        .map(|i| {
            json!({"event_id": format!("{tag}-m{i}"), "type": "points_earn", "points": 1,
                "identities": {"phone": phone(&tag, i), "email": email(&tag, i)}})
        })
        .collect();
    let merged = one_by_one(clients, merging, true).await?;
    let single = (0..n)
        .map(|i| {
            json!({"event_id": format!("{tag}-s{i}"), "type": "points_earn", "points": 1,
                "identities": {"phone": phone(&tag, i)}})
        })
        .collect();
    let baseline = one_by_one(clients, single, false).await?;
    Ok((merged, baseline))
}

/// One round of ingest on customers of its own, timed once `servers` settled; events per
/// second.
async fn ingest_round(
    clients: &[Client],
    servers: &[String],
    args: &BenchArgs,
    round: usize,
    merging: bool,
) -> anyhow::Result<f64> {
    let tag = format!("mi{}r{round}", args.seed);
    let n = args.customers;
    customers(clients, &tag, n).await?;
    settle(servers, 0).await?;
    // Sender s owns customers s, s + senders, ...: each customer's events stay in order.
    let senders = args.senders.min(n);
    let per_sender = args.events / senders;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let client = clients[s % clients.len()].clone();
        let owned: Vec<usize> = (s..n).step_by(senders).collect();
        let events: Vec<Value> = (0..per_sender)
            .map(|k| {
                let c = owned[k % owned.len()];
                let mut identities = json!({"phone": phone(&tag, c)});
                if merging && k % MERGE_EVERY == MERGE_EVERY - 1 {
                    identities["email"] = json!(email(&tag, c));
                }
                json!({"event_id": format!("{tag}-{s}-{k}"), "type": "points_earn",
                    "points": 1, "identities": identities})
            })
            .collect();
        let batch = args.batch;
        tasks.push(tokio::spawn(async move {
            for chunk in events.chunks(batch) {
                let answer = client.send_events_json(chunk).await?;
                anyhow::ensure!(answer.rejected == 0, "ingest: {answer:?}");
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((per_sender * senders) as f64 / started.elapsed().as_secs_f64())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub async fn merges(servers: &[String], args: &BenchArgs, json_only: bool) -> anyhow::Result<()> {
    let clients = servers
        .iter()
        .map(|s| Client::new(s))
        .collect::<Result<Vec<_>, _>>()?;
    let (merged, baseline) = latency(&clients, args).await?;
    let (mut none, mut some) = (Vec::new(), Vec::new());
    for round in 0..2 * INGEST_ROUNDS {
        let merging = round % 2 == 1;
        let rate = ingest_round(&clients, servers, args, round, merging).await?;
        if merging { &mut some } else { &mut none }.push(rate);
    }
    // `percentile` reads µs and answers ms.
    let ms = percentile;
    let report = json!({
        "scenario": "merges", "nodes": servers.len(), "merges": merged.len(),
        "merge_p50_ms": ms(&merged, 0.5), "merge_p99_ms": ms(&merged, 0.99),
        "single_p50_ms": ms(&baseline, 0.5), "single_p99_ms": ms(&baseline, 0.99),
        "merge_p50_ratio_of_single": ms(&merged, 0.5) / ms(&baseline, 0.5),
        "ingest_events": args.events, "ingest_customers": args.customers,
        "ingest_no_merges_per_second": none, "ingest_1pct_merges_per_second": some,
        "ingest_ratio_of_medians": median(some.clone()) / median(none.clone()),
    });
    if !json_only {
        println!("{:<48} {:>14}", "measure", "value");
        println!(
            "{:<48} {:>14}",
            format!("event merging two customers, p50/p99 ms ({})", merged.len()),
            p50_p99_ms(&merged)
        );
        println!(
            "{:<48} {:>14}",
            "baseline: single event, p50/p99 ms",
            p50_p99_ms(&baseline)
        );
        println!(
            "{:<48} {:>14.2}",
            "merge p50 / single p50",
            report["merge_p50_ratio_of_single"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
        let rates = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("{:<48} {:>14}", "ingest, no merges, events/s", rates(&none));
        println!(
            "{:<48} {:>14}",
            "ingest, 1% merging, events/s",
            rates(&some)
        );
        println!(
            "{:<48} {:>14.2}",
            "1% merging / none (medians; target >= 0.8)",
            report["ingest_ratio_of_medians"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    crate::bench_time::finish(args, &report, json_only)
}
