//! Bodies of the HTTP API, shared by the node (which writes them) and the client (which reads them).

use crate::event::EventError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most events in one `POST /v1/events`.
pub const EVENTS_PER_REQUEST_MAX: usize = 10_000;
/// Most bytes of one request body.
pub const REQUEST_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most ledger entries one page returns (`limit` above it is clamped).
pub const LEDGER_PAGE_MAX: usize = 1_000;
/// Ledger entries per page when `limit` is not given.
pub const LEDGER_PAGE_DEFAULT: usize = 50;

crate::open_enum! {
    /// Machine-readable error codes, on whole requests and on single events. On the wire, a
    /// code is its snake_case name; one this release does not know decodes to `Other`:
    ///
    /// ```
    /// use oneid_protocol::ErrorCode;
    ///
    /// let known: ErrorCode = serde_json::from_str(r#""insufficient_points""#).unwrap();
    /// assert_eq!(known, ErrorCode::InsufficientPoints);
    /// let newer: ErrorCode = serde_json::from_str(r#""from_a_newer_release""#).unwrap();
    /// assert_eq!(newer, ErrorCode::Other("from_a_newer_release".into()));
    /// assert_eq!(newer.as_str(), "from_a_newer_release");
    /// ```
    pub enum ErrorCode {
        /// The request is not well-formed JSON/NDJSON, or not of the expected shape.
        BadRequest = "bad_request",
        /// The body is over `REQUEST_BODY_BYTES_MAX` or has more than `EVENTS_PER_REQUEST_MAX` events.
        PayloadTooLarge = "payload_too_large",
        /// The content type is not JSON or NDJSON.
        UnsupportedMediaType = "unsupported_media_type",
        /// No such route.
        NoRoute = "no_route",
        /// The route exists, but not with this method (the answer's `Allow` lists those it has).
        MethodNotAllowed = "method_not_allowed",
        /// The request's body stopped arriving before it was complete.
        RequestTimeout = "request_timeout",
        /// An event is not a JSON object.
        InvalidEvent = "invalid_event",
        /// A field has a value it may not have.
        InvalidField = "invalid_field",
        /// A required field is absent.
        MissingField = "missing_field",
        /// A field that the event type does not have.
        UnknownField = "unknown_field",
        /// The profile (or identity) does not exist.
        NotFound = "not_found",
        /// The order id was already seen on the profile.
        DuplicateOrder = "duplicate_order",
        /// A refund names an order the profile does not have.
        UnknownOrder = "unknown_order",
        /// A refund is larger than what is left of its order.
        RefundExceedsOrder = "refund_exceeds_order",
        /// A redeem is larger than the balance.
        InsufficientPoints = "insufficient_points",
        /// Answered by releases before the identity policy, which refused an event that would
        /// give its profile more than 50 identity values; the event now applies without the
        /// values past the limit, listed in `not_linked` (reason `identity_limit`).
        IdentityLimit = "identity_limit",
        /// The profile would have more attributes than allowed.
        AttributeLimit = "attribute_limit",
        /// The profile would have more manual tags than allowed.
        TagLimit = "tag_limit",
        /// An earn whose `expires_at` is not after the shard's clock.
        AlreadyExpired = "already_expired",
        /// A rules document was refused.
        InvalidRules = "invalid_rules",
        /// A segment's predicate does not parse or type-check (the message says where).
        InvalidPredicate = "invalid_predicate",
        /// A new segment beyond `SEGMENTS_MAX`.
        SegmentLimit = "segment_limit",
        /// A stream or members cursor that is not one this cluster wrote.
        InvalidCursor = "invalid_cursor",
        /// A stream cursor older than the change log's retention: resume from a snapshot.
        CursorExpired = "cursor_expired",
        /// The node cannot serve now (no leader, shutting down, overloaded); retry later.
        Unavailable = "unavailable",
        /// The event waited behind more waves of its batch than one request runs (events sharing
        /// new identities apply one after another); send it again in a later request.
        TooManyWaves = "too_many_waves",
        /// A one-at-a-time operation is already running (a backup); try again when it is done.
        Busy = "busy",
        /// A bug or a storage failure.
        Internal = "internal",
        /// The node does not allow this (backups without `[storage] backup_root`); the message
        /// says how to configure it.
        Forbidden = "forbidden",
        /// Every identity the event names is a blocked value (see the rules' `identity`) and
        /// it names no `oneid`: it has no profile to apply to.
        BlockedIdentity = "blocked_identity",
        /// The event's mergeable identities (and `oneid`) name more than 4 profiles: more than
        /// one merge makes one. (New codes go last. Releases before merges answered
        /// `identity_conflict` where an event now merges its profiles.)
        TooManyProfiles = "too_many_profiles",
    }
}

/// `{"error": {...}}`: the answer to a request refused as a whole.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: EventError,
}

/// The answer to `POST /v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventsResponse {
    pub applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// One per event, in request order.
    pub results: Vec<EventResult>,
}

crate::open_enum! {
    /// What became of one event.
    pub enum EventStatus {
        /// The event applied (now, durably).
        Applied = "applied",
        /// An event with this `event_id` applied before: nothing changed.
        Duplicate = "duplicate",
        /// Refused; `error` says why, and nothing changed.
        Rejected = "rejected",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventResult {
    pub event_id: String,
    pub status: EventStatus,
    pub oneid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    /// On an `applied` result only, and only when some identity of the event was not linked
    /// to its profile: each such identity and why, sorted by (kind, value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_linked: Vec<NotLinked>,
    /// On an `applied` result only, and only when the event merged profiles: the OneIDs
    /// merged into `oneid` (sorted), which now resolve to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
    /// On an `applied` result only: the merge the event called for was committed and is being
    /// finished (the event applies to `oneid` at its end); until then, lookups may still find
    /// the profiles apart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge_pending: bool,
}

/// An identity of an applied event that was not linked to its profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NotLinked {
    pub kind: String,
    pub value: String,
    pub reason: NotLinkedReason,
}

impl NotLinked {
    /// Puts a result's list in its documented order: by (kind, value).
    pub fn sort(list: &mut [NotLinked]) {
        list.sort_by(|a, b| (&a.kind, &a.value).cmp(&(&b.kind, &b.value)));
    }
}

crate::open_enum! {
    /// Why an identity of an applied event was not linked to its profile.
    pub enum NotLinkedReason {
        /// The value is blocked by the identity policy (a placeholder such as `unknown`): it
        /// is never bound and matches no profile.
        BlockedValue = "blocked_value",
        /// The profile holds its kind's `max_per_profile` values already (counting those
        /// still being bound on other shards).
        KindLimit = "kind_limit",
        /// The profile holds 50 identity values already (counting those still being bound).
        IdentityLimit = "identity_limit",
        /// The value is bound to another profile, and its kind has `merge = false`: it never
        /// joins two profiles.
        MergeDisabled = "merge_disabled",
        /// Another profile took the value first, while it was being bound to this one.
        Taken = "taken",
        /// The value is bound to another profile, and merging the two would take the survivor
        /// past 100 profiles merged into it (or its totals past their range).
        MergeLimit = "merge_limit",
        /// An `unlink` removed the value from this profile after the event's `ts`: an older
        /// event never binds it back.
        Unlinked = "unlinked",
    }
}

/// `GET /v1/admin/identity-audit`: what the identity policy in force refuses among what is
/// already stored (a policy change never rewrites bindings or profiles: it reports them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IdentityAudit {
    /// Per kind (every kind the policy names, and any other with a finding), summed over the
    /// shards done.
    pub kinds: BTreeMap<String, KindAuditDoc>,
    /// Shards audited to the end within the request's time bound: the counts are theirs.
    pub shards_done: u32,
    pub shards_total: u32,
}

/// The audit of one identity kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KindAuditDoc {
    /// Profiles holding more values of the kind than its `max_per_profile`.
    pub over_limit: u64,
    /// Values of the kind bound in the identity index that the policy blocks.
    pub blocked_bound: u64,
}

/// `GET /v1/profiles/{oneid}` and `/v1/profiles/lookup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProfileDoc {
    pub oneid: String,
    pub identities: BTreeMap<String, Vec<String>>,
    pub attributes: BTreeMap<String, serde_json::Value>,
    pub points: PointsView,
    pub tier: String,
    pub tier_since: String,
    /// When the tier's retention period ends (null at the lowest level).
    pub tier_retained_until: Option<String>,
    pub tags: Vec<String>,
    pub metrics: MetricsView,
    pub channels: BTreeMap<String, String>,
    /// The segments the profile is a member of, sorted by name.
    #[serde(default)]
    pub segments: Vec<String>,
    pub version: u64,
    pub created_at: String,
    pub updated_at: String,
    /// The OneIDs merged into this profile, oldest merge first (only when some were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
    /// When the profile was asked for by a OneID merged into it: that OneID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PointsView {
    pub balance: i64,
    pub lifetime_earned: i64,
    pub lifetime_redeemed: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MetricsView {
    pub order_count: u64,
    /// Channel → the latest order on it.
    #[serde(default)]
    pub last_order_on: BTreeMap<String, String>,
    pub total_spend: String,
    pub spend_365d: String,
    pub first_order_at: Option<String>,
    pub last_order_at: Option<String>,
}

/// `GET /v1/profiles/{oneid}/ledger`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LedgerPage {
    /// Newest first.
    pub entries: Vec<LedgerEntryDoc>,
    /// Pass as `cursor` for the next (older) page; null at the end.
    pub next: Option<String>,
    /// The profile was merged into this one: its own history ends with the `merge_out` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LedgerEntryDoc {
    pub event_id: String,
    /// `earn`, `redeem`, `adjust`, `expire`, `reverse`, `merge_in` (a lot moved in by a merge,
    /// with `from` and `expires_at`) or `merge_out` (everything moved out, with `into`).
    pub kind: String,
    /// Signed change of the balance.
    pub points: i64,
    pub balance_after: i64,
    pub at: String,
    pub reason: Option<String>,
    /// For `reverse`: points that could not be taken back because they were already spent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shortfall: i64,
    /// For a merge's entries on the survivor (`merge_in`, and the `adjust` of a loser's debt):
    /// the profile merged in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For `merge_out`: the profile it was merged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
    /// For `merge_in`: when the lot moved in expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `GET /v1/profiles/{oneid}/merges`: the merges a profile survived, oldest first (at most
/// 100: a profile has at most 100 others merged into it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MergesDoc {
    pub merges: Vec<MergeDoc>,
}

/// One merge, as the survivor's history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MergeDoc {
    /// 32 hex digits, derived from the profiles and the event that called for it.
    pub merge_id: String,
    /// The OneIDs merged, sorted.
    pub from: Vec<String>,
    pub into: String,
    /// The shard clock when it was committed.
    pub at: String,
    /// The event that named the profiles; absent for a merge a bind another profile won first
    /// called for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The rules version it was judged by.
    pub policy_version: u64,
    /// What the survivor left out past its limits (the oldest written).
    pub dropped: DroppedDoc,
    /// Order ids both held: the survivor's kept its id, the loser's is kept beside it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twin_orders: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DroppedDoc {
    pub tags: Vec<String>,
    pub attributes: Vec<String>,
    pub channels: Vec<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// `GET /v1/cluster`: this node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterView {
    /// The node that answered.
    pub node: u64,
    pub cluster_id: String,
    /// The answering node's identity (32 hex digits), random and recorded in its data
    /// directory at first start: a node whose directory was replaced shows another one.
    pub identity: String,
    pub nodes: Vec<NodeView>,
    /// The answering node's own replicas (so comparing the nodes' answers compares replicas).
    pub shards: Vec<ShardView>,
    /// Snapshots on their way between the answering node and others.
    #[serde(default)]
    pub snapshots: Vec<SnapshotView>,
}

/// A snapshot in flight: a shard's state streamed to a follower behind the leader's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotView {
    pub shard: u32,
    /// The applied index of the state it carries.
    pub index: u64,
    /// `out` (this node holds it for a follower) or `in` (this node fetches it).
    pub direction: String,
    /// The other node: the follower's (`out`) or the holder's (`in`).
    pub node: u64,
    /// Bytes of pairs sent or received so far.
    pub bytes: u64,
    /// Since it was held, or its fetch began.
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeView {
    pub id: u64,
    pub api: String,
    pub peer: String,
    /// A frame from that node arrived within the last 2 s (always true for the answering node).
    pub up: bool,
    /// That node's wall clock minus the cluster's majority time, in milliseconds, as the
    /// answering node estimates it from pings; `None` if not heard from within 2 s.
    pub clock_offset_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ShardView {
    pub id: u32,
    /// The leader's node id, if this replica knows it.
    pub leader: Option<u64>,
    pub term: u64,
    /// `leader`, `follower`, `candidate`, `pre_candidate`.
    pub role: String,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Hash of this replica's applied state at `applied_index`, hex.
    pub digest: String,
    /// The node ids of the shard's replicas.
    pub replicas: Vec<u64>,
    /// The node that leads the shard when all are well (its first replica in the cluster
    /// file's placement, which spreads leaders over the nodes); a leader elected elsewhere
    /// hands leadership back to it once it has kept up with the log.
    pub placed_leader: u64,
    /// Replicas (node ids) that need entries the leader's log no longer holds: they catch up
    /// by snapshot (see `snapshots`). Known to the leader only.
    pub needs_snapshot: Vec<u64>,
    /// Identities of applied events still to be bound on other shards (follow-ups).
    pub follow_ups_pending: u64,
    /// The shard's clock (RFC 3339): the latest clock entry applied.
    pub clock: String,
}

/// The body of `POST /v1/admin/backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct BackupRequest {
    /// The backup's directory, relative to the node's `[storage] backup_root`: new, or empty.
    pub dir: Option<String>,
}

/// `GET /healthz` when every shard has a leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The cluster's shards (each has a leader this node heard from within 2 s).
    pub shards: u32,
}

/// `POST /v1/admin/backup`: what a backup holds, also written as `backup.json` beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BackupManifest {
    /// The manifest's format; this is [`BackupManifest::FORMAT`].
    pub format: u32,
    /// The node's state format (the layout of keys and values) in the backup; a node restores
    /// only its own format. Manifests from before this field hold format 1.
    #[serde(default = "state_format_1")]
    pub state_format: u32,
    /// The node the backup was taken of.
    pub node: u64,
    /// When the backup's snapshot was taken (RFC 3339, UTC).
    pub created_at: String,
    /// The node's replicas (every shard it hosts), by id, at the snapshot: in a cluster with
    /// replication, the shards placed on this node.
    pub shards: Vec<BackupShard>,
    /// Every keyspace copied, by name.
    pub keyspaces: Vec<BackupKeyspace>,
    /// Pairs copied, over all keyspaces.
    pub pairs: u64,
    /// Bytes of keys and values copied, over all keyspaces.
    pub bytes: u64,
}

impl BackupManifest {
    pub const FORMAT: u32 = 1;
}

fn state_format_1() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BackupShard {
    pub id: u32,
    pub applied_index: u64,
    /// The shard's digest at `applied_index`, 16 hex digits (as `/v1/cluster` shows it).
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BackupKeyspace {
    pub name: String,
    pub pairs: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod error_code_tests {
    use super::ErrorCode;

    #[test]
    fn every_code_is_listed_once_and_the_readme_says_what_to_do_about_each() {
        // `open_enum!` lists every declared code in `ALL`, in order.
        let names: Vec<String> = ErrorCode::ALL
            .iter()
            .map(|code| {
                serde_json::to_value(code)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        // The README's table: after its header, a row per code, `| `code` | status | what |`.
        let readme = include_str!("../../README.md");
        let table: Vec<&str> = readme
            .lines()
            .skip_while(|line| *line != "| code | status | what to do |")
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .collect();
        let listed: Vec<String> = table
            .iter()
            .map(|row| {
                let code = row.strip_prefix("| `").and_then(|r| r.split_once('`'));
                code.map(|(code, _)| code.to_string()).unwrap_or_default()
            })
            .collect();
        assert_eq!(
            listed, names,
            "the README's error-code table, in the order declared"
        );
        for row in &table {
            assert_eq!(
                row.matches(" | ").count(),
                2,
                "{row}: code, status, what to do"
            );
        }
    }
}
