//! The node's wall clock: the one place the shells read it (the replicas' inputs, backup
//! manifests, the replicas' life numbers), and the cluster's time as this node knows it
//! ([`ClusterClock`]). The state machine and the replica core never read a clock; time
//! reaches them as values.
//!
//! In `failpoints` builds (tests only) the failpoint `clock::wall_offset_ms` moves this node's
//! wall clock: `FAILPOINTS=clock::wall_offset_ms=return(2592000000)` runs it 30 days ahead.

use oneid_protocol::num::Millis;
use oneid_replica::clocks::{majority_of, PeerClocks};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// A node whose wall clock is this far off the cluster's majority time says so (a warning)...
pub const CLOCK_OFFSET_WARN_MS: i64 = 2_000;
/// ...and this far, an error: its replicas' messages and pings carry a clock the others'
/// majority outvotes, but its logs, backups and requests it dates alone are off.
pub const CLOCK_OFFSET_ERROR_MS: i64 = 60_000;
/// How often a node whose clock is off says so.
pub const CLOCK_OFFSET_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How often the node looks at its offset.
const CLOCK_OFFSET_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The wall clock now.
pub fn wall_now() -> Millis {
    let wall = Millis::from_system_time(SystemTime::now());
    #[cfg(feature = "failpoints")]
    fail::fail_point!("clock::wall_offset_ms", |offset| {
        let offset: i64 = offset
            .and_then(|o| o.parse().ok())
            .expect("clock::wall_offset_ms=return(MILLISECONDS)");
        Millis(wall.0 + offset)
    });
    wall
}

/// The wall clock now in microseconds: a number unique to this start of the node's replicas
/// (`ReplicaConfig::life`), which tells this life's ReadIndex rounds from earlier lives' ones.
pub fn life_now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64
}

/// The cluster's time as this node knows it: its own wall clock, and those its peers' pings
/// carry (every `transport::tcp::PING_INTERVAL`). The **majority time** is the k-th largest of
/// the nodes' clocks (a peer's estimated as its last ping's clock plus the ping's age; a peer
/// not heard from within `CLOCK_FRESH` has none), k the majority of the cluster's nodes: no
/// minority of nodes, this one included, moves it. It dates what the API receives without a
/// time of its own (events without `ts`), and says how far each node's clock is off.
/// Bounded: one report per node of the cluster file.
pub struct ClusterClock {
    me: u64,
    /// Every node of the cluster file, this one included.
    nodes: Vec<u64>,
    /// The monotonic origin of the reports' arrival times.
    started: Instant,
    reports: Mutex<PeerClocks>,
}

impl ClusterClock {
    pub fn new(me: u64, nodes: Vec<u64>) -> ClusterClock {
        ClusterClock {
            me,
            nodes,
            started: Instant::now(),
            reports: Mutex::new(PeerClocks::default()),
        }
    }

    /// A peer's ping carried its wall clock.
    pub fn report(&self, node: u64, wall: Millis) {
        if node != self.me && self.nodes.contains(&node) {
            let arrived = self.started.elapsed();
            let mut reports = self.reports.lock().expect("clock reports lock");
            reports.report(node, wall, arrived);
        }
    }

    /// Each node's clock now, as this node knows it (its own read now; a peer's estimated
    /// from its fresh ping), in the order of the cluster file.
    fn clocks(&self) -> Vec<(u64, Option<Millis>)> {
        let now = self.started.elapsed();
        let own = wall_now();
        let reports = self.reports.lock().expect("clock reports lock");
        self.nodes
            .iter()
            .map(|&node| match node == self.me {
                true => (node, Some(own)),
                false => (node, reports.estimate(node, now)),
            })
            .collect()
    }

    /// The cluster's majority time now; `None` while this node hears from no majority.
    pub fn majority_time(&self) -> Option<Millis> {
        majority_of(self.clocks().into_iter().map(|(_, clock)| clock))
    }

    /// Each node's clock minus the majority time, in milliseconds: `None` for a node not
    /// heard from within `CLOCK_FRESH` (every node's, while no majority is heard).
    pub fn offsets(&self) -> BTreeMap<u64, Option<i64>> {
        let clocks = self.clocks();
        let majority = majority_of(clocks.iter().map(|(_, clock)| *clock));
        clocks
            .into_iter()
            .map(|(node, clock)| {
                let offset = clock.zip(majority).map(|(c, m)| c.0.saturating_sub(m.0));
                (node, offset)
            })
            .collect()
    }

    /// This node's clock minus the majority time, in milliseconds.
    pub fn own_offset(&self) -> Option<i64> {
        self.offsets().get(&self.me).copied().flatten()
    }

    /// `oneid_clock_offset_seconds`: this node's offset (NaN while no majority is heard).
    pub fn render_metrics(&self, out: &mut String) {
        let seconds = self.own_offset().map_or(f64::NAN, |ms| ms as f64 / 1000.0);
        out.push_str(
            "# HELP oneid_clock_offset_seconds This node's wall clock minus the cluster's majority time.\n\
             # TYPE oneid_clock_offset_seconds gauge\n",
        );
        out.push_str(&format!("oneid_clock_offset_seconds {seconds}\n"));
    }

    /// Logs this node's offset once per [`CLOCK_OFFSET_LOG_INTERVAL`] while it is past
    /// [`CLOCK_OFFSET_WARN_MS`] (a warning) or [`CLOCK_OFFSET_ERROR_MS`] (an error). Runs until
    /// the runtime stops.
    pub async fn watch(self: std::sync::Arc<Self>) {
        let mut checks = tokio::time::interval(CLOCK_OFFSET_CHECK_INTERVAL);
        let mut logged: Option<Instant> = None;
        loop {
            checks.tick().await;
            let Some(offset_ms) = self.own_offset() else {
                continue;
            };
            let due = logged.is_none_or(|at| at.elapsed() >= CLOCK_OFFSET_LOG_INTERVAL);
            if offset_ms.abs() <= CLOCK_OFFSET_WARN_MS || !due {
                continue;
            }
            logged = Some(Instant::now());
            if offset_ms.abs() > CLOCK_OFFSET_ERROR_MS {
                tracing::error!(offset_ms, "this node's wall clock is far off the cluster's majority time: its shards' clocks follow the majority, but fix its time source (NTP)");
            } else {
                tracing::warn!(
                    offset_ms,
                    "this node's wall clock is off the cluster's majority time"
                );
            }
        }
    }
}
