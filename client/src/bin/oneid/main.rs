//! `oneid`: the command-line tool for OneID.

mod bench;
mod bench_chain;
mod bench_merges;
mod bench_replication;
mod bench_segments;
mod bench_time;
mod segment_cli;
mod status;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use oneid_client::{Client, Consistency};
use oneid_protocol::api::{
    BackupManifest, EventStatus, EventsResponse, LedgerPage, MergesDoc, ProfileDoc,
};
use oneid_protocol::rules::RulesDoc;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(version, about = "Query and feed a OneID node.")]
struct Cli {
    /// The API address of a node, or of several (comma-separated): requests fail over between
    /// them, and reads of a profile by OneID go to its shard's leader.
    #[arg(
        long,
        global = true,
        env = "ONEID_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// Print JSON (for scripts) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Send events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Read or replace the loyalty rules.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Define segments, read their members, watch their membership change.
    #[command(subcommand)]
    Segment(segment_cli::SegmentCommand),
    /// The cluster as this node sees it.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Administer the node.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Measure ingest and lookup throughput against a running node (see scripts/bench).
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// A profile by OneID.
    Get {
        oneid: String,
        /// Read this node's replica as it is, without a quorum round (may miss the newest
        /// writes).
        #[arg(long)]
        stale: bool,
    },
    /// A profile by one of its identities.
    Lookup {
        kind: String,
        value: String,
        /// Read this node's replica as it is, without a quorum round (may miss the newest
        /// writes).
        #[arg(long)]
        stale: bool,
    },
    /// A profile's points ledger, newest first.
    Ledger {
        oneid: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// The merges a profile survived, oldest first.
    Merges { oneid: String },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Send an NDJSON file of events (`-` for standard input), in batches.
    Send {
        file: PathBuf,
        /// Events per request (at most 10000).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    Get,
    /// Replace the rules with a JSON document.
    Set {
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every node's view: nodes up, and per shard its leader, term, each replica's applied
    /// index and lag, and whether replicas at equal indexes have equal digests.
    Status,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Take a consistent online backup of the node (writes go on meanwhile) and print its
    /// manifest. DIR is relative to the node's backup root (`[storage] backup_root` in its
    /// cluster.toml), on the NODE's machine, written by the node: new or empty. Restore with
    /// `oneid-node --config FILE --restore ROOT/DIR` into an empty data directory.
    Backup {
        /// The backup's directory, relative to the node's backup root.
        dir: String,
    },
    /// What the identity policy in force refuses among what is stored: per kind, the profiles
    /// over its `max_per_profile` and the blocked values bound (a policy change never rewrites
    /// them).
    IdentityAudit,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`oneid cluster status | head -1`)
    // would panic; like any Unix filter, the CLI should just stop.
    // SAFETY: sets a signal's disposition to the default before any other thread could
    // depend on it; no handler runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let client = Client::new(&cli.server)?;
    match cli.command {
        Command::Profile(command) => run_profile(&client, command, cli.json).await?,
        Command::Events(EventsCommand::Send { file, batch }) => {
            send_file(&client, &file, batch, cli.json).await?
        }
        Command::Rules(command) => run_rules(&client, command).await?,
        Command::Segment(command) => segment_cli::run(&client, command, cli.json).await?,
        Command::Cluster(ClusterCommand::Status) => status::run(&client, cli.json).await?,
        Command::Admin(AdminCommand::Backup { dir }) => run_backup(&client, &dir, cli.json).await?,
        Command::Admin(AdminCommand::IdentityAudit) => run_audit(&client, cli.json).await?,
        Command::Bench(args) => bench::run(&cli.server, args, cli.json).await?,
    }
    Ok(())
}

/// `profile get|lookup|ledger`. A profile that does not exist is an error rather than empty
/// output, so that a script sees it in the exit code.
async fn run_profile(client: &Client, command: ProfileCommand, json: bool) -> anyhow::Result<()> {
    match command {
        ProfileCommand::Get { oneid, stale } => {
            let profile = client
                .profile_at(&oneid, consistency(stale))
                .await?
                .with_context(|| format!("no profile {oneid}"))?;
            print_profile(&profile, json)
        }
        ProfileCommand::Lookup { kind, value, stale } => {
            let profile = client
                .lookup_at(&kind, &value, consistency(stale))
                .await?
                .with_context(|| format!("no profile has {kind}={value}"))?;
            print_profile(&profile, json)
        }
        ProfileCommand::Ledger {
            oneid,
            limit,
            cursor,
        } => {
            let page = client
                .ledger(&oneid, Some(limit), cursor.as_deref())
                .await?;
            print_ledger(&page, json)
        }
        ProfileCommand::Merges { oneid } => {
            let merges = client
                .merges(&oneid)
                .await?
                .with_context(|| format!("no profile {oneid}"))?;
            print_merges(&merges, json)
        }
    }
}

/// A profile's merges, one line each: when, what was merged into what, by which event.
fn print_merges(doc: &MergesDoc, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(doc)?);
        return Ok(());
    }
    println!("{:<25} {:<32} {:<19} FROM", "AT", "MERGE", "INTO");
    for m in &doc.merges {
        println!(
            "{:<25} {:<32} {:<19} {}",
            m.at,
            m.merge_id,
            m.into,
            m.from.join(", ")
        );
        let dropped = &m.dropped;
        for (what, names) in [
            ("tags", &dropped.tags),
            ("attributes", &dropped.attributes),
            ("channels", &dropped.channels),
        ] {
            if !names.is_empty() {
                println!("  dropped {what}: {}", names.join(", "));
            }
        }
    }
    Ok(())
}

/// One page of a ledger as a table, with the `--cursor` to pass for the next page if there is
/// one, so a person can page through without reading JSON.
fn print_ledger(page: &LedgerPage, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(page)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:>10} {:>12}  {:<25} REASON",
        "EVENT", "KIND", "POINTS", "BALANCE", "AT"
    );
    for e in &page.entries {
        println!(
            "{:<24} {:<8} {:>10} {:>12}  {:<25} {}",
            e.event_id,
            e.kind,
            e.points,
            e.balance_after,
            e.at,
            e.reason.as_deref().unwrap_or("")
        );
    }
    if let Some(next) = &page.next {
        println!("more: --cursor {next}");
    }
    if let Some(into) = &page.merged_into {
        println!("merged into {into}: its ledger goes on there");
    }
    Ok(())
}

/// `rules get|set`. Both print the rules in force as the node answers them (always JSON: the
/// rules are a JSON document), so `set` shows what the node made of the file.
async fn run_rules(client: &Client, command: RulesCommand) -> anyhow::Result<()> {
    match command {
        RulesCommand::Get => {
            println!("{}", serde_json::to_string_pretty(&client.rules().await?)?)
        }
        RulesCommand::Set { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Read strictly, so a misspelt rule is named here before anything is sent.
            let rules: RulesDoc = oneid_protocol::strict::from_json(text.as_bytes())
                .with_context(|| format!("{} is not a rules document", file.display()))?;
            let now = client.set_rules(&rules).await?;
            println!("{}", serde_json::to_string_pretty(&now)?);
        }
    }
    Ok(())
}

/// `admin backup DIR`: DIR goes to the node as given; the node places it under its backup root.
async fn run_backup(client: &Client, dir: &str, json: bool) -> anyhow::Result<()> {
    let manifest = client.backup(dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        print_manifest(dir, &manifest)?;
    }
    Ok(())
}

async fn run_audit(client: &Client, json: bool) -> anyhow::Result<()> {
    let audit = client.identity_audit().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&audit)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>12} {:>14}",
        "kind", "over_limit", "blocked_bound"
    );
    for (kind, found) in &audit.kinds {
        println!(
            "{kind:<24} {:>12} {:>14}",
            found.over_limit, found.blocked_bound
        );
    }
    println!(
        "{} of {} shards audited",
        audit.shards_done, audit.shards_total
    );
    Ok(())
}

fn print_manifest(dir: &str, m: &BackupManifest) -> anyhow::Result<()> {
    println!(
        "backup of node {} at {} in {dir} under its backup root",
        m.node, m.created_at
    );
    println!(
        "{} keyspaces, {} pairs, {} bytes (format {})",
        m.keyspaces.len(),
        m.pairs,
        m.bytes,
        m.format
    );
    println!("{:>5} {:>10}  DIGEST", "SHARD", "APPLIED");
    for s in &m.shards {
        println!("{:>5} {:>10}  {}", s.id, s.applied_index, s.digest);
    }
    Ok(())
}

fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    }
}

fn print_profile(p: &ProfileDoc, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(p)?);
        return Ok(());
    }
    let identities: Vec<String> = p
        .identities
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.join(", ")))
        .collect();
    let channels: Vec<String> = p
        .channels
        .iter()
        .map(|(k, v)| format!("{k} ({v})"))
        .collect();
    let attributes: Vec<String> = p
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("OneID       {}", p.oneid);
    if let Some(asked) = &p.resolved_from {
        println!("            (asked for {asked}, which was merged into it)");
    }
    if !p.merged_from.is_empty() {
        println!("merged from {}", p.merged_from.join(", "));
    }
    println!("tier        {} (since {})", p.tier, p.tier_since);
    println!(
        "points      {} (earned {}, redeemed {})",
        p.points.balance, p.points.lifetime_earned, p.points.lifetime_redeemed
    );
    println!("tags        {}", p.tags.join(", "));
    println!("segments    {}", p.segments.join(", "));
    println!("identities  {}", identities.join("; "));
    let m = &p.metrics;
    println!(
        "orders      {} (total {}, last {} days {}, last order {})",
        m.order_count,
        m.total_spend,
        365,
        m.spend_365d,
        m.last_order_at.as_deref().unwrap_or("-")
    );
    println!("channels    {}", channels.join(", "));
    println!("attributes  {}", attributes.join(", "));
    println!(
        "version     {} (created {}, updated {})",
        p.version, p.created_at, p.updated_at
    );
    Ok(())
}

/// Most rejection messages `events send` keeps to print; the rest are only counted.
const PROBLEMS_KEPT_MAX: usize = 1000;

/// Streams an NDJSON file in batches; events answered `unavailable` are retried by the client.
async fn send_file(client: &Client, file: &Path, batch: usize, json: bool) -> anyhow::Result<()> {
    if !(1..=oneid_protocol::api::EVENTS_PER_REQUEST_MAX).contains(&batch) {
        bail!(
            "--batch must be 1 to {}",
            oneid_protocol::api::EVENTS_PER_REQUEST_MAX
        );
    }
    let (reader, progress) = open_events(file, json)?;
    let reader = progress.wrap_read(reader);
    let mut lines = EventLines {
        lines: BufReader::new(reader).lines(),
        line_no: 0,
    };
    let mut tally = SendTally::default();
    loop {
        let events = lines.next_batch(batch, &mut tally)?;
        if events.is_empty() {
            break;
        }
        let answer = client.send_events_json(&events).await?;
        tally.add_answer(&answer);
        progress.set_message(tally.summary());
    }
    progress.finish_and_clear();
    print_send_report(&tally, json);
    Ok(())
}

/// Opens the events file (`-` for standard input) and the progress display that goes with it.
/// Progress counts the bytes the reader took, whatever the line endings; standard input has no
/// known size, so it gets a spinner. With `--json` the display is hidden, so that standard
/// output and standard error carry nothing but the final JSON.
fn open_events(file: &Path, json: bool) -> anyhow::Result<(Box<dyn Read>, ProgressBar)> {
    let (reader, progress): (Box<dyn Read>, ProgressBar) = if file.as_os_str() == "-" {
        let spinner = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {msg}").expect("a valid template"),
        );
        spinner.enable_steady_tick(std::time::Duration::from_millis(100));
        (Box::new(std::io::stdin()), spinner)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let bar = ProgressBar::new(f.metadata()?.len()).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg}")
                .expect("a valid template"),
        );
        (Box::new(f), bar)
    };
    if json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    Ok((reader, progress))
}

/// The lines of an NDJSON input, numbered from 1 across batches so that a line that is not
/// JSON can be reported by its line number in the file.
struct EventLines<R> {
    lines: std::io::Lines<R>,
    line_no: usize,
}

impl<R: BufRead> EventLines<R> {
    /// The next `batch` events, or fewer at the end of the input (none once it is exhausted).
    /// Blank lines are skipped; a line that is not JSON never reaches the node, so it is
    /// counted as rejected in `tally` here.
    fn next_batch(
        &mut self,
        batch: usize,
        tally: &mut SendTally,
    ) -> anyhow::Result<Vec<Box<serde_json::value::RawValue>>> {
        let mut events = Vec::with_capacity(batch);
        for line in self.lines.by_ref() {
            let line = line.context("reading events")?;
            self.line_no += 1;
            if line.trim().is_empty() {
                continue;
            }
            // Passed through as written: the node checks each event and answers for it.
            match serde_json::value::RawValue::from_string(line) {
                Ok(event) => events.push(event),
                Err(e) => tally.reject_line(self.line_no, &e),
            }
            if events.len() == batch {
                break;
            }
        }
        Ok(events)
    }
}

/// What `events send` has counted so far, and the first rejection messages (at most
/// [`PROBLEMS_KEPT_MAX`], so that a file of bad events cannot fill memory).
#[derive(Default)]
struct SendTally {
    applied: u64,
    duplicates: u64,
    rejected: u64,
    problems: Vec<String>,
}

impl SendTally {
    /// Counts a line that is not JSON as a rejected event.
    fn reject_line(&mut self, line_no: usize, error: &serde_json::Error) {
        self.rejected += 1;
        if self.problems.len() < PROBLEMS_KEPT_MAX {
            self.problems
                .push(format!("line {line_no}: not JSON: {error}"));
        }
    }

    /// Adds the node's answer to one batch: its counts, and its rejection messages while
    /// there is room for them.
    fn add_answer(&mut self, answer: &EventsResponse) {
        self.applied += answer.applied;
        self.duplicates += answer.duplicates;
        self.rejected += answer.rejected;
        let room = PROBLEMS_KEPT_MAX.saturating_sub(self.problems.len());
        for r in answer
            .results
            .iter()
            .filter(|r| r.status == EventStatus::Rejected)
            .take(room)
        {
            if let Some(e) = &r.error {
                self.problems
                    .push(format!("{}: {:?} {}", r.event_id, e.code, e.message));
            }
        }
    }

    /// The counts in one line: the progress message while sending, and the first line of the
    /// final report, so the two always read the same.
    fn summary(&self) -> String {
        format!(
            "applied {}, duplicates {}, rejected {}",
            self.applied, self.duplicates, self.rejected
        )
    }
}

/// The outcome of `events send`: the counts and every kept problem as JSON for scripts, or
/// the counts and the first 20 problems for a person.
fn print_send_report(tally: &SendTally, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"applied": tally.applied, "duplicates": tally.duplicates, "rejected": tally.rejected, "problems": tally.problems})
        );
    } else {
        println!("{}", tally.summary());
        for problem in tally.problems.iter().take(20) {
            println!("  {problem}");
        }
        if tally.rejected > 20 {
            println!("  ... and {} more", tally.rejected - 20);
        }
    }
}
