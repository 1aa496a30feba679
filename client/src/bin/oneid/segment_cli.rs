//! `oneid segment ...`: define, list, show, page through and watch segments.

use anyhow::Context;
use clap::Subcommand;
use futures::StreamExt;
use oneid_client::{Client, SegmentEvent, WatchFrom};
use oneid_protocol::segments::{SegmentChange, SegmentDoc};

#[derive(Subcommand)]
pub enum SegmentCommand {
    /// Create a segment, or replace its predicate or description (its backfill starts at
    /// once; `show` follows it).
    Create {
        name: String,
        /// The predicate, in the rules language, e.g. 'tier >= "gold" and has_tag("coffee")'.
        predicate: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// Every segment, with its size and backfill.
    List,
    /// One segment's document.
    Show { name: String },
    /// Every current member (OneIDs, one per line).
    Members { name: String },
    /// Print membership changes as they happen, until interrupted.
    Watch {
        name: String,
        /// Print every current member first (as `enter`), then the changes.
        #[arg(long)]
        snapshot: bool,
        /// Resume after this cursor (a change's `cursor`).
        #[arg(long, conflicts_with = "snapshot")]
        cursor: Option<String>,
    },
    /// Delete a segment: every member gets an exit, then its streams end.
    Delete { name: String },
}

pub async fn run(client: &Client, command: SegmentCommand, json: bool) -> anyhow::Result<()> {
    match command {
        SegmentCommand::Create {
            name,
            predicate,
            description,
        } => {
            let (doc, created) = client
                .put_segment(&name, &predicate, description.as_deref())
                .await?;
            if !json {
                println!("{} {name}", if created { "created" } else { "replaced" });
            }
            print_docs(&[doc], json)?;
        }
        SegmentCommand::List => print_docs(&client.segments().await?, json)?,
        SegmentCommand::Show { name } => {
            let doc = client
                .segment(&name)
                .await?
                .with_context(|| format!("no segment {name}"))?;
            print_docs(&[doc], json)?;
        }
        SegmentCommand::Members { name } => {
            let mut members = std::pin::pin!(client.segment_members(&name));
            while let Some(member) = members.next().await {
                println!("{}", member?);
            }
        }
        SegmentCommand::Watch {
            name,
            snapshot,
            cursor,
        } => {
            let from = match (snapshot, cursor) {
                (true, _) => WatchFrom::Snapshot,
                (false, Some(cursor)) => WatchFrom::Cursor(cursor),
                (false, None) => WatchFrom::Tail,
            };
            let mut events = std::pin::pin!(client.watch_segment(&name, from));
            while let Some(event) = events.next().await {
                print_event(&event?, json)?;
            }
        }
        SegmentCommand::Delete { name } => {
            client.delete_segment(&name).await?;
            if !json {
                println!("deleted {name}");
            }
        }
    }
    Ok(())
}

fn print_docs(docs: &[SegmentDoc], json: bool) -> anyhow::Result<()> {
    if json {
        for doc in docs {
            println!("{}", serde_json::to_string(doc)?);
        }
        return Ok(());
    }
    println!(
        "{:<24} {:>5} {:>10}  {:<24} PREDICATE",
        "NAME", "GEN", "SIZE", "BACKFILL"
    );
    for d in docs {
        let backfill = format!(
            "{} {}/{}",
            d.backfill.state, d.backfill.profiles_done, d.backfill.profiles_total
        );
        println!(
            "{:<24} {:>5} {:>10}  {:<24} {}",
            d.name, d.generation, d.size, backfill, d.predicate
        );
    }
    Ok(())
}

fn print_event(event: &SegmentEvent, json: bool) -> anyhow::Result<()> {
    let line = |c: &SegmentChange| {
        format!(
            "{:<5} {} {} (generation {})",
            c.change.as_str(),
            c.oneid,
            c.at,
            c.generation
        )
    };
    match (event, json) {
        (SegmentEvent::Member(c) | SegmentEvent::Change(c), true) => {
            println!("{}", serde_json::to_string(c)?)
        }
        (SegmentEvent::SnapshotEnd { members, cursor }, true) => println!(
            "{}",
            serde_json::json!({"snapshot_end": {"members": members, "cursor": cursor}})
        ),
        (SegmentEvent::SnapshotStart, true) => {
            println!("{}", serde_json::json!({"snapshot_start": {}}))
        }
        (SegmentEvent::Member(c) | SegmentEvent::Change(c), false) => println!("{}", line(c)),
        (SegmentEvent::SnapshotEnd { members, cursor }, false) => {
            println!("-- snapshot: {members} members (cursor {cursor})")
        }
        (SegmentEvent::SnapshotStart, false) => println!("-- snapshot"),
    }
    Ok(())
}
