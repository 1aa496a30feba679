//! `oneid bench --scenario replication`: the workloads whose cost replication changes, against
//! one node or several (`--server` and `--also`, load spread over them):
//! - batched ingest (the standard generator, batches of `--batch` from `--senders`);
//! - single-event writes from `--writers` keep-alive connections for `--seconds`;
//! - lookups by phone from `--clients` connections, linearizable, then stale.
//!
//! `scripts/bench --nodes 3` runs it on one node and on a 3-node cluster in the same run and
//! prints the cluster's figures as ratios of the single node's.

use crate::bench::{ingest, lookup_load, p50_p99_ms, percentile, settle, BenchArgs};
use oneid_client::{Client, Consistency};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Single-event writes (points earns, each its own request) for `seconds`; answers the rate
/// of acknowledged writes and their latencies in µs.
async fn single_writes(
    servers: &[String],
    writers: usize,
    seconds: u64,
    customers: Arc<Vec<usize>>,
) -> anyhow::Result<(f64, Vec<u64>)> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = Client::new(&servers[w % servers.len()])?;
        let customers = Arc::clone(&customers);
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(1_000 + w as u64);
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let customer = customers[rng.usize(..customers.len())];
                let event = json!({"event_id": format!("single-{w}-{n}"), "type": "points_earn",
                    "identities": {"phone": crate::bench::phone(customer)}, "points": 1});
                let at = Instant::now();
                let answer = client.send_events_json(&[event]).await?;
                if answer.applied == 1 {
                    latencies.push(at.elapsed().as_micros() as u64);
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok((rate, all))
}

pub async fn replication(server: &str, args: &BenchArgs, json_only: bool) -> anyhow::Result<()> {
    let servers: Vec<String> = std::iter::once(server.to_string())
        .chain(args.also.iter().cloned())
        .collect();
    let (secs, total, counts, customers) = ingest(&servers, args).await?;
    settle(&servers, args.settle).await?;
    let (writes, write_lat) =
        single_writes(&servers, args.writers, args.seconds, Arc::clone(&customers)).await?;
    settle(&servers, 0).await?;
    let (linear, linear_lat) = lookup_load(
        &servers,
        Arc::clone(&customers),
        args.clients,
        args.seconds,
        Consistency::Linearizable,
    )
    .await?;
    let (stale, stale_lat) = lookup_load(
        &servers,
        customers,
        args.clients,
        args.seconds,
        Consistency::Stale,
    )
    .await?;
    let report = json!({
        "scenario": "replication", "nodes": servers.len(),
        "events": total, "applied": counts.0, "duplicates": counts.1, "rejected": counts.2,
        "ingest_events_per_second": total as f64 / secs,
        "single_writes_per_second": writes,
        "single_write_p50_ms": percentile(&write_lat, 0.5), "single_write_p99_ms": percentile(&write_lat, 0.99),
        "linearizable_lookups_per_second": linear,
        "linearizable_p50_ms": percentile(&linear_lat, 0.5), "linearizable_p99_ms": percentile(&linear_lat, 0.99),
        "stale_lookups_per_second": stale,
        "stale_p50_ms": percentile(&stale_lat, 0.5), "stale_p99_ms": percentile(&stale_lat, 0.99),
    });
    if !json_only {
        println!(
            "{:<40} {:>12}",
            format!("measure ({} nodes)", servers.len()),
            "value"
        );
        for (name, value) in [
            ("ingest events/s", total as f64 / secs),
            ("single-event writes/s", writes),
            ("linearizable lookups/s", linear),
            ("stale lookups/s", stale),
        ] {
            println!("{name:<40} {value:>12.0}");
        }
        for (name, lat) in [
            ("single write p50/p99 ms", &write_lat),
            ("linearizable lookup p50/p99 ms", &linear_lat),
            ("stale lookup p50/p99 ms", &stale_lat),
        ] {
            println!("{name:<40} {:>12}", p50_p99_ms(lat));
        }
    }
    crate::bench_time::finish(args, &report, json_only)
}
