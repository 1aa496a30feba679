//! `oneid bench`: a whole-system load benchmark against a running node.
//!
//! It generates realistic events (customers across tmall, jd, douyin, wecom and store:
//! orders, refunds, points, tags, identify, interactions) from a fixed seed, measures ingest
//! (events/s in batches), then lookups by phone from concurrent keep-alive clients (rate,
//! p50, p99). In the same run it starts a minimal hyper server in a child process that answers
//! a fixed profile document from memory, drives it with the same load generator, and reports
//! the node's lookup rate as a ratio of that ceiling.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use oneid_client::{Client, Consistency};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure: `standard` (ingest, lookups, ceiling), `profiles` (RSS and disk while
    /// loading `--profiles` profiles), `expiry` (`--lots` points lots falling due at once),
    /// `chain` (a batch of `--chain` events each sharing a new identity with the next),
    /// `replication` (batched ingest, single-event writes, linearizable and stale lookups,
    /// spread over `--server` and `--also`), `segments-ingest` (ingest with `--segments`
    /// segments defined), `segments` (backfill, acknowledgement-to-stream latency, many
    /// subscribers), `merges` (the latency of an event merging two customers, and ingest with
    /// 1% of events merging against none; spread over `--server` and `--also`).
    #[arg(long, default_value = "standard")]
    pub(crate) scenario: String,
    /// The node's data directory, to report disk bytes.
    #[arg(long)]
    pub(crate) data_dir: Option<std::path::PathBuf>,
    /// `profiles`: profiles to load.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) profiles: usize,
    /// `profiles`: sample RSS and disk every this many profiles.
    #[arg(long, default_value_t = 250_000)]
    pub(crate) sample_every: usize,
    /// `expiry`: points lots that expire at the same instant.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) lots: usize,
    /// `expiry`: profiles holding them.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) lot_profiles: usize,
    /// `expiry`: seconds from the start until the lots expire (loading must finish before).
    #[arg(long, default_value_t = 120)]
    pub(crate) expire_after: u64,
    /// `replication`, `merges`: more nodes to spread the load over, beside `--server`
    /// (comma-separated URLs).
    #[arg(long, value_delimiter = ',')]
    pub(crate) also: Vec<String>,
    /// `replication`: concurrent single-event writers.
    #[arg(long, default_value_t = 64)]
    pub(crate) writers: usize,
    /// `chain`: events in the chain.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) chain: usize,
    /// Customers to generate.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) customers: usize,
    /// Events to ingest.
    #[arg(long, default_value_t = 400_000)]
    pub(crate) events: usize,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
    /// Concurrent ingest senders (each owns a slice of the customers, so per-customer order holds).
    #[arg(long, default_value_t = 8)]
    pub(crate) senders: usize,
    /// Concurrent lookup clients.
    #[arg(long, default_value_t = 32)]
    pub(crate) clients: usize,
    /// Seconds to wait after ingest (and then until no node flushes or compacts, for at most a
    /// minute), so background work settles before the next workload is timed.
    #[arg(long, default_value_t = 3)]
    pub(crate) settle: u64,
    /// Seconds of lookups per target.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// The node's pid, to report its peak RSS.
    #[arg(long)]
    pub(crate) node_pid: Option<u32>,
    /// Write the results as JSON here too.
    #[arg(long)]
    pub(crate) out: Option<std::path::PathBuf>,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// `segments-ingest`: segments defined before the ingest.
    #[arg(long, default_value_t = 100)]
    pub(crate) segments: usize,
    /// `segments`: single-event writes timed from acknowledgement to stream; `merges`: merging
    /// events timed one by one.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) latency_writes: usize,
    /// `segments`: concurrent stream subscribers.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) subscribers: usize,
    /// Internal: serve the baseline on this port (used by bench itself).
    #[arg(long, hide = true)]
    pub(crate) serve_baseline: Option<u16>,
}

const CHANNELS: [(&str, &str); 5] = [
    ("tmall", "taobao_nick"),
    ("jd", "jd_pin"),
    ("douyin", "douyin_openid"),
    ("wecom", "wechat_unionid"),
    ("store", "member_card"),
];

pub(crate) fn phone(customer: usize) -> String {
    format!("139{customer:08}")
}

/// The events of one sender: customers `sender, sender + senders, ...`, in a realistic mix;
/// and the customers that got at least one event.
fn generate(args: &BenchArgs, sender: usize) -> (Vec<Value>, Vec<usize>) {
    let mut rng = fastrand::Rng::with_seed(args.seed.wrapping_add(sender as u64));
    let customers: Vec<usize> = (sender..args.customers).step_by(args.senders).collect();
    let count = args.events / args.senders;
    let mut orders: Vec<(usize, String)> = Vec::new();
    let mut events = Vec::with_capacity(count);
    let mut seen = std::collections::BTreeSet::new();
    for n in 0..count {
        let customer = customers[rng.usize(..customers.len())];
        // A customer's first event is an order: a customer known only by a refused redeem
        // would have no profile to look up.
        let first = seen.insert(customer);
        let (channel, kind) = CHANNELS[customer % CHANNELS.len()];
        let id = format!("b{}-{sender}-{n}", args.seed);
        let identities = json!({"phone": phone(customer), kind: format!("{kind}-{customer}")});
        let roll = if first { 0 } else { rng.u32(..100) };
        let event = match roll {
            0..=54 => {
                let order_id = format!("T{sender}-{n}");
                orders.push((customer, order_id.clone()));
                let amount = format!("{}.{:02}", rng.u32(10..3000), rng.u32(..100));
                json!({"event_id": id, "type": "order", "identities": identities, "channel": channel, "order_id": order_id, "amount": amount})
            }
            55..=59 if !orders.is_empty() => {
                let (customer, order_id) = orders.swap_remove(rng.usize(..orders.len()));
                json!({"event_id": id, "type": "refund", "identities": {"phone": phone(customer)}, "order_id": order_id})
            }
            60..=69 => {
                json!({"event_id": id, "type": "points_earn", "identities": identities, "points": rng.u32(1..500), "reason": "campaign"})
            }
            70..=74 => {
                json!({"event_id": id, "type": "points_redeem", "identities": identities, "points": rng.u32(1..200)})
            }
            75..=84 => {
                json!({"event_id": id, "type": "tag_add", "identities": identities, "tag": format!("interest_{}", rng.u32(..20))})
            }
            85..=89 => {
                json!({"event_id": id, "type": "identify", "identities": {"phone": phone(customer), "email": format!("c{customer}@example.com")}})
            }
            _ => {
                json!({"event_id": id, "type": "interaction", "identities": identities, "channel": channel, "name": "view_item", "properties": {"sku": rng.u32(..10_000)}})
            }
        };
        events.push(event);
    }
    (events, seen.into_iter().collect())
}

/// Lookups from `clients` concurrent keep-alive clients for `seconds`, spread over `bases`
/// as fresh as `consistency` asks; latencies in µs.
pub(crate) async fn lookup_load(
    bases: &[String],
    customers: Arc<Vec<usize>>,
    clients: usize,
    seconds: u64,
    consistency: Consistency,
) -> anyhow::Result<(f64, Vec<u64>)> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = Client::new(&bases[c % bases.len()])?;
        let customers = Arc::clone(&customers);
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(c as u64);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let at = Instant::now();
                let phone = phone(customers[rng.usize(..customers.len())]);
                let found = client.lookup_at("phone", &phone, consistency).await?;
                anyhow::ensure!(found.is_some(), "a generated customer was not found");
                latencies.push(at.elapsed().as_micros() as u64);
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

/// Waits `seconds`, then until no node of `servers` has had a flush or a compaction running or
/// waiting (as their `/metrics` say) for [`QUIET_POLLS`] polls in a row, for at most a minute
/// more: what the workload before left to do in the background should not be timed with the
/// next. (A compaction of many tables runs in several parts, with a moment between them that
/// one idle poll took for the end.)
pub(crate) async fn settle(servers: &[String], seconds: u64) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let clients = servers
        .iter()
        .map(|s| Client::new(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut quiet = 0;
    while quiet < QUIET_POLLS && Instant::now() < deadline {
        let mut busy = false;
        for client in &clients {
            let text = client.metrics().await?;
            busy |= [
                "oneid_storage_outstanding_flushes",
                "oneid_storage_active_compactions",
                "oneid_storage_sealed_memtables",
            ]
            .iter()
            .any(|name| crate::bench_time::counter(&text, name) > 0);
        }
        quiet = if busy { 0 } else { quiet + 1 };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Polls 200 ms apart that must all find every node idle for [`settle`] to end.
const QUIET_POLLS: u32 = 10;

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

/// Serves `body` for every request: the ceiling a lookup could reach on this machine.
async fn serve_baseline(port: u16, body: Bytes) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_| {
                let body = body.clone();
                async move {
                    let mut response = Response::new(Full::new(body));
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// A `kB` line of `/proc/PID/status` (`VmRSS:`, `VmHWM:`).
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The counts of an ingest: applied, duplicate, rejected.
type Counts = (u64, u64, u64);

/// Ingests the generated events from `args.senders` senders spread over `servers`, in batches
/// of `args.batch`; answers the seconds it took, the events sent, the counts and the customers.
pub(crate) async fn ingest(
    servers: &[String],
    args: &BenchArgs,
) -> anyhow::Result<(f64, usize, Counts, Arc<Vec<usize>>)> {
    let (batches, seen): (Vec<Vec<Value>>, Vec<Vec<usize>>) =
        (0..args.senders).map(|s| generate(args, s)).unzip();
    let customers = Arc::new(seen.into_iter().flatten().collect::<Vec<usize>>());
    let total: usize = batches.iter().map(Vec::len).sum();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (sender, events) in batches.into_iter().enumerate() {
        let client = Client::new(&servers[sender % servers.len()])?;
        let batch = args.batch;
        tasks.push(tokio::spawn(async move {
            let mut counts = (0u64, 0u64, 0u64);
            for chunk in events.chunks(batch) {
                let answer = client.send_events_json(chunk).await?;
                counts.0 += answer.applied;
                counts.1 += answer.duplicates;
                counts.2 += answer.rejected;
            }
            Ok::<_, anyhow::Error>(counts)
        }));
    }
    let mut counts = (0, 0, 0);
    for task in tasks {
        let (a, d, r) = task.await??;
        counts.0 += a;
        counts.1 += d;
        counts.2 += r;
    }
    Ok((started.elapsed().as_secs_f64(), total, counts, customers))
}

pub async fn run(server: &str, args: BenchArgs, json_only: bool) -> anyhow::Result<()> {
    if let Some(port) = args.serve_baseline {
        let body = std::io::read_to_string(std::io::stdin())?;
        return serve_baseline(port, Bytes::from(body)).await;
    }
    anyhow::ensure!(
        args.senders >= 1 && args.customers >= args.senders && args.batch >= 1,
        "need senders >= 1, customers >= senders, batch >= 1"
    );
    let client = Client::new(server)?;
    anyhow::ensure!(
        client.healthy().await,
        "the node at {server} is not healthy"
    );
    match args.scenario.as_str() {
        "standard" => standard(&client, server, &args, json_only).await,
        "profiles" => crate::bench_time::profiles(&client, &args, json_only).await,
        "expiry" => crate::bench_time::expiry(&client, &args, json_only).await,
        "chain" => crate::bench_chain::chain(&client, &args, json_only).await,
        "replication" => crate::bench_replication::replication(server, &args, json_only).await,
        "segments-ingest" => {
            crate::bench_segments::segments_ingest(server, &args, json_only).await
        }
        "segments" => crate::bench_segments::segments(server, &args, json_only).await,
        "merges" => {
            let mut servers = vec![server.to_string()];
            servers.extend(args.also.iter().cloned());
            crate::bench_merges::merges(&servers, &args, json_only).await
        }
        other => anyhow::bail!(
            "unknown scenario {other:?}: standard, profiles, expiry, chain, replication, segments-ingest, segments or merges"
        ),
    }
}

/// What the `standard` scenario measured, handed from the measuring to the reporting.
struct StandardResult {
    /// Events sent, and the node's counts of them.
    events: usize,
    counts: Counts,
    ingest_seconds: f64,
    /// Lookups per second against the node, and their latencies in µs, sorted.
    node_rate: f64,
    node_latencies: Vec<u64>,
    /// The same against the minimal server (see [`measure_ceiling`]).
    ceiling_rate: f64,
    ceiling_latencies: Vec<u64>,
    node_peak_rss_kib: Option<u64>,
}

impl StandardResult {
    fn ingest_rate(&self) -> f64 {
        self.events as f64 / self.ingest_seconds
    }

    /// The figure the benchmark is judged by: the node's lookup rate as a share of what any
    /// HTTP server could do on this machine with the same client.
    fn lookup_ratio_of_ceiling(&self) -> f64 {
        self.node_rate / self.ceiling_rate
    }
}

/// The `standard` scenario: ingest, let the node settle, lookups against the node, then the
/// same lookups against the ceiling; then the report.
async fn standard(
    client: &Client,
    server: &str,
    args: &BenchArgs,
    json_only: bool,
) -> anyhow::Result<()> {
    let servers = [server.to_string()];
    let (ingest_seconds, events, counts, customers) = ingest(&servers, args).await?;
    settle(&servers, args.settle).await?;
    // Lookups against the node, then against the baseline serving one of its profiles.
    let (node_rate, node_latencies) = lookup_load(
        &servers,
        Arc::clone(&customers),
        args.clients,
        args.seconds,
        Consistency::Linearizable,
    )
    .await?;
    let (ceiling_rate, ceiling_latencies) = measure_ceiling(client, &customers, args).await?;
    let result = StandardResult {
        events,
        counts,
        ingest_seconds,
        node_rate,
        node_latencies,
        ceiling_rate,
        ceiling_latencies,
        node_peak_rss_kib: args.node_pid.and_then(peak_rss_kib),
    };
    let report = standard_report(&result, args);
    if !json_only {
        print_standard(&result);
    }
    write_report(&report, args, json_only)
}

/// The lookup load against a minimal server in a child process that answers one of the node's
/// real profiles from memory: the ceiling the node's lookups are compared with. The child is
/// stopped once measured, whether the load succeeded or not.
async fn measure_ceiling(
    client: &Client,
    customers: &Arc<Vec<usize>>,
    args: &BenchArgs,
) -> anyhow::Result<(f64, Vec<u64>)> {
    let sample = client
        .lookup("phone", &phone(customers[0]))
        .await?
        .context("a generated customer exists")?;
    let sample = serde_json::to_string(&sample)?;
    let (mut baseline, base_url) = start_baseline(&sample)?;
    wait_for_baseline(&base_url).await?;
    let baseline_result = lookup_load(
        &[base_url],
        Arc::clone(customers),
        args.clients,
        args.seconds,
        Consistency::Linearizable,
    )
    .await;
    let _ = baseline.kill();
    let _ = baseline.wait();
    baseline_result
}

/// Starts this executable as the baseline server (`bench --serve-baseline PORT`) on a free
/// port, and gives it `body` to serve; answers the child and its URL. The body goes through
/// standard input, which is closed at once, because the child reads it to the end before it
/// serves.
fn start_baseline(body: &str) -> anyhow::Result<(std::process::Child, String)> {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let mut baseline = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--serve-baseline", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting the baseline server")?;
    {
        use std::io::Write;
        let mut stdin = baseline.stdin.take().context("baseline stdin")?;
        stdin.write_all(body.as_bytes())?;
    }
    Ok((baseline, format!("http://127.0.0.1:{port}")))
}

/// Waits until the baseline server answers, for at most 10 seconds, so that its start-up is
/// not counted in its lookup rate.
async fn wait_for_baseline(base_url: &str) -> anyhow::Result<()> {
    let probe = Client::new(base_url)?;
    let ready_by = Instant::now() + Duration::from_secs(10);
    while probe.lookup("phone", "0").await.is_err() {
        anyhow::ensure!(
            Instant::now() < ready_by,
            "the baseline server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The `standard` scenario's JSON report (printed with `--json`, written to `--out`).
fn standard_report(result: &StandardResult, args: &BenchArgs) -> Value {
    let (applied, duplicates, rejected) = result.counts;
    let (node_lat, ceiling_lat) = (&result.node_latencies, &result.ceiling_latencies);
    json!({
        "events": result.events, "applied": applied, "duplicates": duplicates, "rejected": rejected,
        "ingest_seconds": result.ingest_seconds, "ingest_events_per_second": result.ingest_rate(), "batch": args.batch, "senders": args.senders,
        "lookup_clients": args.clients,
        "lookups_per_second": result.node_rate, "lookup_p50_ms": percentile(node_lat, 0.5), "lookup_p99_ms": percentile(node_lat, 0.99),
        "ceiling_lookups_per_second": result.ceiling_rate, "ceiling_p50_ms": percentile(ceiling_lat, 0.5), "ceiling_p99_ms": percentile(ceiling_lat, 0.99),
        "lookup_ratio_of_ceiling": result.lookup_ratio_of_ceiling(),
        "node_peak_rss_mib": result.node_peak_rss_kib.map(|k| k as f64 / 1024.0),
    })
}

/// The `standard` scenario's table, for a person.
fn print_standard(result: &StandardResult) {
    let (applied, duplicates, rejected) = result.counts;
    println!("{:<34} {:>14}", "measure", "value");
    println!("{:<34} {:>14}", "events sent", result.events);
    println!(
        "{:<34} {:>14}",
        "  applied / duplicate / rejected",
        format!("{applied}/{duplicates}/{rejected}")
    );
    println!("{:<34} {:>14.0}", "ingest events/s", result.ingest_rate());
    println!("{:<34} {:>14.0}", "lookups/s (oneid)", result.node_rate);
    println!(
        "{:<34} {:>14}",
        "lookup p50/p99 ms (oneid)",
        p50_p99_ms(&result.node_latencies)
    );
    println!(
        "{:<34} {:>14.0}",
        "lookups/s (minimal hyper ceiling)", result.ceiling_rate
    );
    println!(
        "{:<34} {:>14}",
        "p50/p99 ms (ceiling)",
        p50_p99_ms(&result.ceiling_latencies)
    );
    println!(
        "{:<34} {:>14.2}",
        "lookup ratio of ceiling (>= 0.5)",
        result.lookup_ratio_of_ceiling()
    );
    if let Some(rss) = result.node_peak_rss_kib {
        println!("{:<34} {:>14.1}", "node peak RSS MiB", rss as f64 / 1024.0);
    }
}

/// Sorted latencies in µs as `P50/P99` in milliseconds with two decimals, the way every
/// benchmark table shows a latency.
pub(crate) fn p50_p99_ms(sorted: &[u64]) -> String {
    format!(
        "{:.2}/{:.2}",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99)
    )
}

/// Prints the report as pretty JSON with `--json`, and writes it to `--out` if given.
fn write_report(report: &Value, args: &BenchArgs, json_only: bool) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    if json_only {
        println!("{text}");
    }
    if let Some(out) = &args.out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
