//! Counters and histograms, rendered as Prometheus text on `GET /metrics`.
//!
//! Plain atomics with fixed label sets: no registry, no allocation on the hot path.

use oneid_protocol::api::NotLinkedReason;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of latency buckets, in seconds.
const BUCKETS_SECONDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_SECONDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS_SECONDS.iter().position(|&bound| seconds <= bound) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_SECONDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The API routes, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Events,
    Profile,
    Lookup,
    Ledger,
    Rules,
    Segments,
    Stream,
    Cluster,
    Health,
    Metrics,
    Admin,
    OpenApi,
    Other,
}

impl Route {
    const ALL: [Route; 13] = [
        Route::Events,
        Route::Profile,
        Route::Lookup,
        Route::Ledger,
        Route::Rules,
        Route::Segments,
        Route::Stream,
        Route::Cluster,
        Route::Health,
        Route::Metrics,
        Route::Admin,
        Route::OpenApi,
        Route::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            Route::Events => "events",
            Route::Profile => "profile",
            Route::Lookup => "lookup",
            Route::Ledger => "ledger",
            Route::Rules => "rules",
            Route::Segments => "segments",
            Route::Stream => "stream",
            Route::Cluster => "cluster",
            Route::Health => "healthz",
            Route::Metrics => "metrics",
            Route::Admin => "admin",
            Route::OpenApi => "openapi",
            Route::Other => "other",
        }
    }
}

#[derive(Default)]
struct RouteMetrics {
    /// By status class: 2xx, 4xx, 5xx.
    responses: [AtomicU64; 3],
    latency: Histogram,
}

/// The reasons `oneid_identities_not_linked_total` counts.
const NOT_LINKED_REASONS: [NotLinkedReason; 7] = [
    NotLinkedReason::BlockedValue,
    NotLinkedReason::KindLimit,
    NotLinkedReason::IdentityLimit,
    NotLinkedReason::MergeDisabled,
    NotLinkedReason::Taken,
    NotLinkedReason::MergeLimit,
    NotLinkedReason::Unlinked,
];

#[derive(Default)]
pub struct Metrics {
    routes: [RouteMetrics; Route::ALL.len()],
    pub events_applied: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_rejected: AtomicU64,
    /// Identities of applied events not linked to their profile, by reason (in the order of
    /// [`NOT_LINKED_REASONS`]).
    not_linked: [AtomicU64; NOT_LINKED_REASONS.len()],
    pub proposals: AtomicU64,
    pub proposals_failed: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Write jobs made durable; `write_jobs / fsyncs` is the group-commit factor.
    pub write_jobs: AtomicU64,
    fsync_latency: Histogram,
    /// Time to apply one clock entry (what fell due, evictions): bounded per entry.
    clock_apply_latency: Histogram,
    /// Time a linearizable read waits for its ReadIndex round and the apply to catch up.
    pub read_index_latency: Histogram,
    pub due_processed: AtomicU64,
    /// Follow-up records finished by a leader's sweep rather than by the router.
    pub follow_ups_swept: AtomicU64,
    /// Times a replica here became leader or stopped being one.
    pub leader_changes: AtomicU64,
    pub activations: AtomicU64,
    pub activated: AtomicU64,
    pub passivated: AtomicU64,
    /// Snapshots whose last chunk this node sent, and that its replicas installed.
    pub snapshots_sent: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: Route, status: u16, elapsed: Duration) {
        let route = &self.routes[Route::ALL
            .iter()
            .position(|&r| r == route)
            .expect("route is listed")];
        let class = match status {
            200..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        route.responses[class].fetch_add(1, Relaxed);
        route.latency.observe(elapsed);
    }

    pub fn fsync(&self, elapsed: Duration, jobs: usize) {
        self.fsyncs.fetch_add(1, Relaxed);
        self.write_jobs.fetch_add(jobs as u64, Relaxed);
        self.fsync_latency.observe(elapsed);
    }

    pub fn clock_applied(&self, elapsed: Duration, due_processed: usize) {
        self.clock_apply_latency.observe(elapsed);
        self.due_processed.fetch_add(due_processed as u64, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        self.render_http(&mut out);
        self.render_counters(&mut out);
        self.render_latencies(&mut out);
        out
    }

    /// Responses and their latency, by route.
    fn render_http(&self, out: &mut String) {
        family(
            out,
            "oneid_http_responses_total",
            "counter",
            "HTTP responses by route and status class.",
        );
        for (route, metrics) in Route::ALL.iter().zip(&self.routes) {
            for (class, count) in ["2xx", "4xx", "5xx"].iter().zip(&metrics.responses) {
                let _ = writeln!(
                    out,
                    "oneid_http_responses_total{{route=\"{}\",status=\"{class}\"}} {}",
                    route.name(),
                    count.load(Relaxed)
                );
            }
        }
        family(
            out,
            "oneid_http_request_seconds",
            "histogram",
            "Time from a request's head to its answer, by route.",
        );
        for (route, metrics) in Route::ALL.iter().zip(&self.routes) {
            metrics.latency.render(
                out,
                "oneid_http_request_seconds",
                &format!("route=\"{}\"", route.name()),
            );
        }
    }

    /// The unlabelled counters.
    fn render_counters(&self, out: &mut String) {
        for (name, help, value) in self
            .request_counters()
            .into_iter()
            .chain(self.work_counters())
        {
            counter(out, name, help, value.load(Relaxed));
        }
        family(
            out,
            "oneid_identities_not_linked_total",
            "counter",
            "Identities of applied events not linked to their profile, by reason (taken: counted by the node whose bind found it taken).",
        );
        for (reason, count) in NOT_LINKED_REASONS.iter().zip(&self.not_linked) {
            let _ = writeln!(
                out,
                "oneid_identities_not_linked_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                count.load(Relaxed)
            );
        }
    }

    /// Counts `n` identities not linked for `reason` (one this release does not name is not
    /// counted: it never answers one).
    pub fn count_not_linked(&self, reason: &NotLinkedReason, n: usize) {
        if let Some(i) = NOT_LINKED_REASONS.iter().position(|r| r == reason) {
            self.not_linked[i].fetch_add(n as u64, Relaxed);
        }
    }

    /// The events answered and the proposals made here.
    fn request_counters(&self) -> [Counter<'_>; 6] {
        [
            (
                "oneid_events_applied_total",
                "Events answered applied.",
                &self.events_applied,
            ),
            (
                "oneid_events_duplicate_total",
                "Events answered duplicate (applied before).",
                &self.events_duplicate,
            ),
            (
                "oneid_events_rejected_total",
                "Events answered rejected.",
                &self.events_rejected,
            ),
            (
                "oneid_proposals_total",
                "Commands proposed to the Raft log by leaders here.",
                &self.proposals,
            ),
            (
                "oneid_leader_changes_total",
                "Times a replica here became leader or stopped leading.",
                &self.leader_changes,
            ),
            (
                "oneid_proposals_failed_total",
                "Proposals refused (overloaded, or dropped by Raft).",
                &self.proposals_failed,
            ),
        ]
    }

    /// The work behind them: storage, activations, clock entries, follow-ups, snapshots.
    fn work_counters(&self) -> [Counter<'_>; 8] {
        [
            (
                "oneid_fsyncs_total",
                "Group commits made durable (one fdatasync each).",
                &self.fsyncs,
            ),
            (
                "oneid_write_jobs_total",
                "Shard write jobs made durable; per fsync, the group-commit factor.",
                &self.write_jobs,
            ),
            (
                "oneid_activated_total",
                "Profiles activated (loaded into memory).",
                &self.activated,
            ),
            (
                "oneid_passivated_total",
                "Profiles passivated (dropped from memory by budget or idleness).",
                &self.passivated,
            ),
            (
                "oneid_due_processed_total",
                "Due-time index keys processed by clock entries.",
                &self.due_processed,
            ),
            (
                "oneid_follow_ups_swept_total",
                "Follow-ups finished by a shard leader's sweep rather than the router.",
                &self.follow_ups_swept,
            ),
            (
                "oneid_snapshots_sent_total",
                "Snapshots of a shard's state sent in full to a follower behind the log.",
                &self.snapshots_sent,
            ),
            (
                "oneid_snapshots_installed_total",
                "Snapshots installed by this node's replicas.",
                &self.snapshots_installed,
            ),
        ]
    }

    /// The activation gauge and the latency histograms of storage, clocks and reads.
    fn render_latencies(&self, out: &mut String) {
        gauge(
            out,
            "oneid_activations",
            "Profiles held in memory (activations).",
            self.activations.load(Relaxed),
        );
        family(
            out,
            "oneid_fsync_seconds",
            "histogram",
            "Time of one group commit: batch write and fdatasync.",
        );
        self.fsync_latency.render(out, "oneid_fsync_seconds", "");
        family(
            out,
            "oneid_clock_apply_seconds",
            "histogram",
            "Time of an apply round that held a clock entry (its due work and evictions, bounded per entry, and the round's other entries).",
        );
        self.clock_apply_latency
            .render(out, "oneid_clock_apply_seconds", "");
        family(
            out,
            "oneid_read_index_seconds",
            "histogram",
            "Time a linearizable read on a replica here waited: its ReadIndex round, then the apply.",
        );
        self.read_index_latency
            .render(out, "oneid_read_index_seconds", "");
    }
}

/// A counter to render: its name, its help, its value.
type Counter<'a> = (&'static str, &'static str, &'a AtomicU64);

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes a gauge family of one unlabelled value.
pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// Writes a counter family of one unlabelled value.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}
