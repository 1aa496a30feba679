//! `oneid bench --scenario chain`: a batch in which each event shares a new identity with the
//! next, so each must wait for the one before it (a wave each).
//!
//! It measures one request of `--chain` such events (the node runs a bounded number of waves
//! and answers the rest `too_many_waves`), then the whole chain through the client (which sends
//! what waited again, as later requests), and as the baseline, in the same run, one request of
//! as many events of unrelated new customers (one wave).

use crate::bench::BenchArgs;
use oneid_client::Client;
use oneid_protocol::api::EventsResponse;
use oneid_protocol::ErrorCode;
use serde_json::{json, Value};
use std::time::Instant;

/// Event `i` of chain `tag`: it names identity `i` and identity `i + 1` (kinds alternate, as an
/// event names one value per kind).
fn link(tag: &str, i: usize) -> Value {
    let kind = |n: usize| {
        if n.is_multiple_of(2) {
            "member_card"
        } else {
            "app_id"
        }
    };
    json!({"event_id": format!("{tag}-{i}"), "type": "points_earn", "points": 1,
        "identities": {kind(i): format!("{tag}-{i}"), kind(i + 1): format!("{tag}-{}", i + 1)}})
}

/// Sends one request as it is; its time in seconds and its answer.
async fn one_request(client: &Client, events: &[Value]) -> anyhow::Result<(f64, EventsResponse)> {
    let body = serde_json::to_vec(events)?;
    let started = Instant::now();
    let answer = client.send_events_raw(body.into(), false).await?;
    Ok((started.elapsed().as_secs_f64(), answer))
}

pub async fn chain(client: &Client, args: &BenchArgs, json_only: bool) -> anyhow::Result<()> {
    let n = args.chain;
    let tag = format!("chain{}", args.seed);
    let chain: Vec<Value> = (0..n).map(|i| link(&tag, i)).collect();
    let (chain_secs, answer) = one_request(client, &chain).await?;
    let waited = answer
        .results
        .iter()
        .filter(|r| {
            r.error
                .as_ref()
                .is_some_and(|e| e.code == ErrorCode::TooManyWaves)
        })
        .count();

    let second = format!("whole{}", args.seed);
    let whole: Vec<Value> = (0..n).map(|i| link(&second, i)).collect();
    let started = Instant::now();
    let all = client.send_events_json(&whole).await?;
    let whole_secs = started.elapsed().as_secs_f64();
    // Every 50th event meets a full profile: it applies without its new identity.
    let not_linked = all
        .results
        .iter()
        .filter(|r| !r.not_linked.is_empty())
        .count();

    let unrelated: Vec<Value> = (0..n)
        .map(|i| {
            json!({"event_id": format!("u{}-{i}", args.seed), "type": "points_earn", "points": 1,
                "identities": {"member_card": format!("u{}-{i}", args.seed)}})
        })
        .collect();
    let (baseline_secs, _) = one_request(client, &unrelated).await?;

    let report = json!({
        "scenario": "chain", "events": n,
        "one_request_seconds": chain_secs, "one_request_applied": answer.applied,
        "one_request_too_many_waves": waited,
        "whole_chain_seconds": whole_secs, "whole_chain_applied": all.applied,
        "whole_chain_rejected": all.rejected, "whole_chain_not_linked": not_linked,
        "unrelated_one_request_seconds": baseline_secs,
        "one_request_ratio_of_unrelated": chain_secs / baseline_secs,
    });
    if !json_only {
        print_table(&report);
    }
    crate::bench_time::finish(args, &report, json_only)
}

/// The report as a table.
fn print_table(report: &Value) {
    let number = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    let n = count("events");
    println!("{:<46} {:>12}", "measure", "value");
    println!(
        "{:<46} {:>12.3}",
        format!("one request of a chain of {n}, s"),
        number("one_request_seconds")
    );
    println!(
        "{:<46} {:>12}",
        "  applied / too_many_waves",
        format!(
            "{}/{}",
            count("one_request_applied"),
            count("one_request_too_many_waves")
        )
    );
    println!(
        "{:<46} {:>12.3}",
        "the whole chain through the client, s",
        number("whole_chain_seconds")
    );
    println!(
        "{:<46} {:>12}",
        "  applied / rejected / not linked (full)",
        format!(
            "{}/{}/{}",
            count("whole_chain_applied"),
            count("whole_chain_rejected"),
            count("whole_chain_not_linked")
        )
    );
    println!(
        "{:<46} {:>12.3}",
        format!("baseline: one request of {n} unrelated, s"),
        number("unrelated_one_request_seconds")
    );
    println!(
        "{:<46} {:>12.2}",
        "one chain request / baseline",
        number("one_request_ratio_of_unrelated")
    );
}
