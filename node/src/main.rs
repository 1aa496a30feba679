//! `oneid-node`: one node of a OneID cluster: the shells around the two I/O-free cores, the
//! state machine (`oneid_state`, `node/state`) and the replica core (`oneid_replica`,
//! `node/replica`).
//!
//! # Layout
//! - `config`: `cluster.toml`, shard placement, raft ids.
//! - `storage`: the fjall database and the group-commit writer thread; `read_pool` the
//!   threads that run fjall reads for async code.
//! - `replica`: the shard actor (actix), the replica core's shell on this node.
//! - `shards`: the routing table: this node's replicas, the leaders it heard of, forwarding.
//! - `transport`: the peer transport (TCP, handshake, frames).
//! - `snapshots`: the shell's half of snapshots (holding, serving, fetching).
//! - `router`: takes events to the shards of their profiles and identities.
//! - `follow_up`: finishing the binds an applied event implies on other shards.
//! - `api`: the HTTP API (hyper): connections, bodies, routes; `streams` the segment streams.
//! - `backup`: online backups, and restoring one into an empty data directory.
//! - `metrics`, `logging`, `clock`: observability, and the wall clock the shells read.
//! - `sim` (tests): the seeded simulation of whole clusters over the replica core.

mod api;
mod backup;
mod clock;
mod config;
mod follow_up;
mod logging;
mod merges;
mod metrics;
mod read_pool;
mod replica;
mod router;
mod shards;
#[cfg(test)]
mod sim;
mod snapshots;
mod storage;
mod streams;
mod transport;

use anyhow::Context;
use clap::Parser;
use oneid_protocol::api::NodeView;
use oneid_replica::ReplicaConfig;
use oneid_state::store::StateRead as _;
use replica::actor::ShardActor;
use shards::Shards;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::handshake::{Identity, Join};

/// mimalloc: the node allocates and frees many small, short-lived buffers on several threads
/// (event bodies, keys, fjall's memtable entries); glibc's allocator spent about a fifth of the
/// ingest CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Descriptors the node needs beside its connections and fjall's cached files: journals, the
/// listener, logs, backups (and, with replication, peer connections).
const FILES_RESERVED: usize = 256;

/// A Raft election timeout, in ticks (raft-rs draws each from this to twice this).
const ELECTION_TICKS: usize = 10;
/// A leader's heartbeat interval, in ticks.
const HEARTBEAT_TICKS: usize = 1;

/// Actix arbiters (threads) the shard actors are spread over.
const SHARD_ARBITERS: usize = 2;
/// Worker threads of the HTTP runtime.
const HTTP_WORKER_THREADS: usize = 2;
/// How often a node on an empty data directory says which peers it still waits for.
const JOIN_WAIT_LOG: Duration = Duration::from_secs(5);
/// How often it looks at its peers' answers meanwhile.
const JOIN_POLL: Duration = Duration::from_millis(50);

#[derive(Parser)]
#[command(
    version,
    about = "A OneID node: Raft-replicated shards of customer profiles, with an HTTP API."
)]
struct Args {
    /// The cluster file.
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    /// This node's id in the cluster file (optional when it lists one node).
    #[arg(long)]
    node: Option<u64>,
    /// Before starting, copy the backup in this directory (made by `POST /v1/admin/backup`)
    /// into the node's data directory, which must be absent or empty; the node serves only
    /// once every shard matches the backup's manifest. Later starts leave this out.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    logging::init();
    // A panic is a broken invariant or a failed read of state: no replica may go on applying
    // (or acknowledging) after one, so any panic on any thread stops the process.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let args = Args::parse();
    raise_open_file_limit();
    // Failpoints for crash tests (FAILPOINTS=name=action); compiled in only with the
    // `failpoints` feature, which scripts/test enables and release builds never do.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let config = config::Config::load(&args.config)?;
    let node = config.node(args.node)?.clone();
    let hosted = config.shards_of(node.id);
    let (storage, cluster) = open_storage(&args, &config, &node, &hosted)?;
    check_retention(&config, &storage, &hosted)?;
    let c = &config.cluster;
    let metrics = Arc::new(metrics::Metrics::default());
    let writer = storage::Writer::start(
        Arc::clone(&storage),
        Arc::clone(&metrics),
        hosted.len() + 16,
    );
    let reader = storage::StateReader::new(Arc::clone(&storage), c.shards);
    let placement = config.placement();
    let clock = clock::ClusterClock::new(node.id, config.nodes.iter().map(|n| n.id).collect());
    let shards = Arc::new(Shards::new(
        node.id,
        placement,
        reader.clone(),
        clock,
        Arc::clone(&metrics),
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(HTTP_WORKER_THREADS)
        .thread_name("oneid-http")
        .enable_all()
        .build()?;
    let identity = storage.node_identity()?;
    runtime.spawn(Arc::clone(&shards.clock).watch());
    if config.nodes.len() > 1 {
        let cluster_bytes = transport::handshake::cluster_bytes(&cluster.id);
        connect_peers(
            &runtime,
            &config,
            &node,
            &storage,
            cluster_bytes,
            identity,
            &shards,
        )?;
    }
    let system = actix::System::new();
    let parts = Parts {
        config: &config,
        node: &node,
        storage: &storage,
        writer: &writer,
        metrics: &metrics,
        shards: &shards,
    };
    let _arbiters = start_shards(&parts, &hosted)?;
    let api = build_api(&parts, &cluster, reader, identity)?;
    serve(runtime, system, api, &config, &node, hosted.len())?;
    // Every acknowledged write was fsynced before its answer; this last persist only covers
    // unacknowledged work (clock entries, writes whose answer was not sent).
    storage.sync_all().context("final flush")?;
    tracing::info!("stopped");
    Ok(())
}

/// Says at start what a node's `cluster.toml` cannot change: its retention seeds a new cluster
/// (or rules migrated without one); the cluster's replicated rules, as this node's first
/// replica holds them, are what apply.
fn check_retention(
    config: &config::Config,
    storage: &storage::Storage,
    hosted: &[oneid_protocol::ids::ShardId],
) -> anyhow::Result<()> {
    if config.deprecated_retention().is_some() {
        tracing::warn!("[cluster] dedup_retention_days, ledger_retention_days and [segments] change_log_retention_hours, change_log_entries_max are deprecated: write [rules.retention] dedup_days, ledger_days, change_log_hours, change_log_entries_max instead");
    }
    let file = config.seed_rules()?.retention;
    let Some(&shard) = hosted.first() else {
        return Ok(());
    };
    let stored = storage.state_read(shard).get(oneid_state::keys::RULES);
    let Some(bytes) = stored else {
        return Ok(());
    };
    let replicated: oneid_protocol::rules::Rules =
        oneid_state::decode(oneid_state::keys::RULES, &bytes);
    match replicated.retention {
        None => tracing::info!(?file, "the cluster's rules have no retention yet (migrated from state format 7): leaders seed it from their cluster.toml"),
        Some(replicated) if Some(replicated) != file => tracing::warn!(?file, ?replicated, "this node's cluster.toml retention differs from the cluster's replicated one, which applies: change it with PUT /v1/rules (the file only seeds a new cluster)"),
        Some(_) => {}
    }
    Ok(())
}

/// What starting the shards needs of the node.
struct Parts<'a> {
    config: &'a config::Config,
    node: &'a config::NodeConfig,
    storage: &'a Arc<storage::Storage>,
    writer: &'a storage::Writer,
    metrics: &'a Arc<metrics::Metrics>,
    shards: &'a Arc<Shards>,
}

/// The HTTP API over this node's shards.
fn build_api(
    parts: &Parts<'_>,
    cluster: &config::ClusterRecord,
    reader: storage::StateReader,
    identity: Identity,
) -> anyhow::Result<Arc<api::Api>> {
    let scope = streams::Scope {
        cluster: u128::from_str_radix(&cluster.id, 16).context("corrupt cluster id")?,
        epoch: parts.storage.restore_epoch()?,
        format: storage::STATE_FORMAT,
    };
    Ok(Arc::new(api::Api {
        backups: backup::Backups::new(
            Arc::clone(parts.storage),
            parts.node.id,
            parts.node.data.clone(),
            parts.config.storage.backup_root.clone(),
        ),
        shards: Arc::clone(parts.shards),
        cluster_id: cluster.id.clone(),
        router: router::Router::new(
            Arc::clone(parts.shards),
            reader.clone(),
            parts.config.cluster.shards,
            Arc::clone(parts.metrics),
        ),
        metrics: Arc::clone(parts.metrics),
        node_id: parts.node.id,
        nodes: parts.config.nodes.iter().map(node_view).collect(),
        shutting_down: AtomicBool::new(false),
        identity,
        budget: api::Api::body_budget(parts.config.api.body_budget_mib as usize * 1024 * 1024),
        body_timeout: Duration::from_millis(parts.config.api.body_timeout_ms),
        streams: streams::Streams::new(reader, Arc::clone(parts.shards), scope),
    }))
}

/// Restores a backup first if asked (verified against its manifest before anything reads or
/// migrates it), opens the data directory, and checks it against the cluster file (migrating
/// a directory of an older format): the storage, and the cluster it records.
fn open_storage(
    args: &Args,
    config: &config::Config,
    node: &config::NodeConfig,
    hosted: &[oneid_protocol::ids::ShardId],
) -> anyhow::Result<(Arc<storage::Storage>, config::ClusterRecord)> {
    if args.restore.is_some() && config.nodes.len() > 1 {
        anyhow::bail!(
            "--restore restores a one-node cluster, and this file lists {} nodes: one node of a replicated cluster restored alone would bring back old replicas that its peers take for current. Restoring a whole cluster comes with membership changes; until then a node that lost its data catches up from its peers only with its own data directory",
            config.nodes.len()
        );
    }
    let restored = match &args.restore {
        Some(dir) => Some(
            backup::restore(dir, &node.data, node.id)
                .with_context(|| format!("restoring the backup in {}", dir.display()))?,
        ),
        None => {
            backup::check_no_unfinished_restore(&node.data)?;
            None
        }
    };
    let storage = Arc::new(storage::Storage::open(
        &node.data,
        config.cluster.shards,
        hosted,
        config.storage.clone(),
    )?);
    if let Some(manifest) = &restored {
        // Before anything reads it, and before a migration rewrites it: the restored state
        // must be the backup's, exactly.
        for &shard in hosted {
            backup::verify_shard(&storage, shard, manifest)?;
        }
    }
    // Refuses a directory of another cluster or an unknown format; migrates an older one.
    let cluster = storage.check_cluster(&config.record())?;
    if let Some(manifest) = &restored {
        // Before the marker goes: a restore that stops here is refused and done again.
        storage.draw_restore_epoch()?;
        backup::finish_restore(&node.data, manifest, hosted)?;
    }
    Ok((storage, cluster))
}

/// Starts the peer transport (a cluster of several nodes), and on a data directory that holds
/// no cluster yet waits until it may create its replicas ([`join_a_new_cluster`]).
fn connect_peers(
    runtime: &tokio::runtime::Runtime,
    config: &config::Config,
    node: &config::NodeConfig,
    storage: &Arc<storage::Storage>,
    cluster: [u8; 16],
    identity: Identity,
    shards: &Arc<Shards>,
) -> anyhow::Result<()> {
    let initialized = storage.initialized();
    let peers = config
        .nodes
        .iter()
        .filter(|n| n.id != node.id)
        .map(|n| (n.id, n.peer))
        .collect();
    let learning = Arc::clone(storage);
    let tcp = transport::tcp::TcpConfig {
        me: node.id,
        listen: node.peer,
        peers,
        secret: config.secret().expect("validated").into_bytes(),
        cluster,
        state_format: storage::STATE_FORMAT,
        identity,
        initialized,
        known: storage.known_peers()?,
        learn: Box::new(move |peer, identity| {
            if let Err(error) = learning.learn_peer(peer, identity) {
                tracing::error!(peer, %error, "recording a peer's identity failed");
            }
        }),
    };
    let inbound = Arc::new(shards::FromPeers(Arc::clone(shards)));
    let peers = runtime
        .block_on(transport::tcp::Tcp::start(tcp, inbound))
        .with_context(|| format!("binding the peer address {}", node.peer))?;
    if !initialized {
        runtime.block_on(join_a_new_cluster(&peers, identity))?;
    }
    peers.set_initialized();
    shards.set_peers(peers);
    Ok(())
}

/// Recovers each hosted shard's replica from storage and starts its actor, spread over the
/// shard arbiters (answered: they run the actors until dropped).
fn start_shards(
    parts: &Parts<'_>,
    hosted: &[oneid_protocol::ids::ShardId],
) -> anyhow::Result<Vec<actix::Arbiter>> {
    let arbiters: Vec<actix::Arbiter> =
        (0..SHARD_ARBITERS).map(|_| actix::Arbiter::new()).collect();
    let life = clock::life_now();
    let mut recovered = Vec::with_capacity(hosted.len());
    for &shard in hosted {
        let actor = ShardActor::recover(
            replica_config(parts, shard, hosted.len(), life)?,
            Arc::clone(parts.storage),
            parts.writer.clone(),
            Arc::clone(parts.metrics),
            Arc::clone(parts.shards) as Arc<dyn replica::actor::Host>,
        )
        .with_context(|| format!("recovering shard {shard}"))?;
        recovered.push((shard, actor));
    }
    let mut addrs = vec![None; parts.config.cluster.shards as usize];
    for (shard, actor) in recovered {
        let arbiter = &arbiters[shard.0 as usize % SHARD_ARBITERS];
        addrs[shard.0 as usize] = Some(actix::Actor::start_in_arbiter(
            &arbiter.handle(),
            move |_| actor,
        ));
    }
    parts.shards.set_local(addrs);
    Ok(arbiters)
}

/// What the replica of `shard` on this node needs to know of its place and its limits.
fn replica_config(
    parts: &Parts<'_>,
    shard: oneid_protocol::ids::ShardId,
    n_hosted: usize,
    life: u64,
) -> anyhow::Result<ReplicaConfig> {
    let (config, c) = (parts.config, &parts.config.cluster);
    let raft_id = config::raft_id(shard, parts.node.id);
    let voters = config.voters(shard);
    // A shard's placed leader (its first replica) campaigns when the shard is new, so
    // leaders start spread evenly; the only voter of a shard campaigns at every start.
    Ok(ReplicaConfig {
        shard,
        n_shards: c.shards,
        id: raft_id,
        campaign: voters[0] == raft_id,
        placed_leader: voters[0],
        replicas: voters
            .iter()
            .map(|&id| (id, config::node_of_raft_id(id)))
            .collect(),
        election_ticks: (ELECTION_TICKS, 2 * ELECTION_TICKS),
        heartbeat_ticks: HEARTBEAT_TICKS,
        clock_interval_ms: c.clock_interval_ms as i64,
        passivate_idle_ticks: c.passivate_idle_secs * 1000 / c.tick_ms,
        activation_budget: c.activation_budget.div_ceil(n_hosted.max(1)),
        seed_rules: config.seed_rules()?,
        log_retain_entries: c.log_retain_entries,
        log_compact_entries: oneid_replica::LOG_COMPACT_BATCH,
        life,
        tick: Duration::from_millis(c.tick_ms),
    })
}

fn node_view(node: &config::NodeConfig) -> NodeView {
    NodeView {
        id: node.id,
        api: node.api.to_string(),
        peer: node.peer.to_string(),
        up: false,
        clock_offset_ms: None,
    }
}

/// Serves the API until SIGTERM (handing leadership off first, then draining), while the
/// actix system runs the shard actors.
fn serve(
    runtime: tokio::runtime::Runtime,
    system: actix::SystemRunner,
    api: Arc<api::Api>,
    config: &config::Config,
    node: &config::NodeConfig,
    n_hosted: usize,
) -> anyhow::Result<()> {
    let deadlines = api::conn::Deadlines::from_config(&config.api);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(node.api))
        .with_context(|| format!("binding the API to {}", node.api))?;
    tracing::info!(node = node.id, api = %listener.local_addr()?, shards = n_hosted, data = %node.data.display(), "oneid-node serving");
    let http = std::thread::Builder::new()
        .name("oneid-http-main".into())
        .spawn(move || {
            // Leadership leaves this node before it stops accepting: a rolling restart costs
            // its clients no failover.
            let shards = Arc::clone(&api.shards);
            let leaving = Arc::clone(&shards);
            let shutdown = async move {
                shutdown_signal().await;
                leaving.hand_off().await;
            };
            runtime.block_on(async move {
                api.streams.start();
                api::serve(api, listener, deadlines, shutdown).await;
                // Peers that still took this node for a leader get their answers.
                shards.finish_peer_requests().await;
            });
        })?;
    // The actix system runs until the HTTP server has drained.
    system.block_on(async move {
        let _ = tokio::task::spawn_blocking(move || http.join()).await;
    });
    Ok(())
}

/// Raises the open-file soft limit to the hard limit, so the node never runs out of
/// descriptors before it reaches its connection limit; says so if even that is too few.
fn raise_open_file_limit() {
    let needed = (api::conn::CONNECTIONS_MAX
        + streams::STREAMS_MAX
        + storage::CACHED_FILES_MAX
        + FILES_RESERVED) as u64;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what the node's connection and storage limits need; raise its hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)"
        ),
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
}

/// A node whose data directory holds no cluster creates its replicas only once every other
/// node has answered the handshake either as empty too (a new cluster) or as initialized and
/// knowing this node's identity (recorded when it bootstrapped with this node). Any other
/// initialized peer means this directory is not the one the cluster knows (a wiped or
/// replaced disk): creating replicas would let it vote as a replica whose log it lost.
async fn join_a_new_cluster(peers: &transport::tcp::Tcp, identity: Identity) -> anyhow::Result<()> {
    let mut said: Option<Instant> = None;
    loop {
        match transport::handshake::may_join(identity, &peers.answers(), peers.peer_ids()) {
            Join::Create => {
                tracing::info!("every peer answered: creating this node's replicas");
                return Ok(());
            }
            Join::Refused(why) => anyhow::bail!(why),
            Join::Wait(missing) => {
                if said.is_none_or(|at| at.elapsed() >= JOIN_WAIT_LOG) {
                    tracing::info!(
                        ?missing,
                        "new data directory: waiting for every peer to answer before creating replicas"
                    );
                    said = Some(Instant::now());
                }
            }
        }
        tokio::time::sleep(JOIN_POLL).await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
    }
}
