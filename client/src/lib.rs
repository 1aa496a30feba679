//! An async client for the OneID HTTP API.
//!
//! One [`Client`] keeps a pool of keep-alive connections and is cheap to clone. It knows one
//! or more nodes of a cluster (`"http://a:8080,http://b:8080"`): requests go to the node that
//! last answered, and move to the next on a transient failure (a connection error, a timeout,
//! `503 unavailable`), retried with exponential, jittered backoff once every node was tried. Single
//! events answered `unavailable` inside a batch are sent again the same way (to the next
//! node): re-sending an event is safe because the node applies each `event_id` once per
//! profile. Reads of one profile by OneID go straight to the leader of its shard when the
//! client knows it (learned from `/v1/cluster`, at most every [`LEADERS_TTL`]); batches go to
//! any node (nodes forward).
//!
//! Requests and answers are the types of [`protocol`] (`oneid_protocol`): events are
//! [`protocol::wire::NewEvent`]s, one type per event type, serialized to exactly the JSON the
//! API documents (`api/openapi.json`). Answers are read leniently: a field this release does
//! not know is ignored, and an error code or status it does not know is `Other(name)`, so a
//! client built today keeps working against a newer server.
//!
//! ```no_run
//! use oneid_client::protocol::wire::{EventKind, NewEvent, Order};
//! use oneid_client::protocol::Decimal;
//! # async fn demo() -> Result<(), oneid_client::Error> {
//! let client = oneid_client::Client::new("http://127.0.0.1:8080")?;
//! let order = NewEvent::new(
//!     "o-1",
//!     EventKind::Order(Order { order_id: "T1".into(), amount: Decimal::new(19_900, 2), store: None }),
//! )
//! .identity("phone", "13800000000")
//! .channel("tmall");
//! let answer = client.send_events(&[order]).await?;
//! let profile = client.lookup("phone", "13800000000").await?;
//! # Ok(()) }
//! ```

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use oneid_protocol::api::{
    BackupManifest, BackupRequest, ClusterView, ErrorBody, EventStatus, EventsResponse,
    IdentityAudit, LedgerPage, MergesDoc, ProfileDoc,
};
use oneid_protocol::ids::OneId;
use oneid_protocol::rules::RulesDoc;
use oneid_protocol::wire::NewEvent;
use oneid_protocol::ErrorCode;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use oneid_protocol as protocol;
pub use segments::{SegmentEvent, WatchFrom};

mod segments;
mod sse;

/// A wait of `step`, jittered: a random share from half to all of it, so that clients that
/// failed together (a failover) do not retry in lockstep.
fn jittered(step: Duration) -> Duration {
    step / 2 + step.mul_f64(fastrand::f64()) / 2
}

/// How long the shard leaders learned from `/v1/cluster` are trusted before asking again.
pub const LEADERS_TTL: Duration = Duration::from_secs(5);
/// Time limit of the `/v1/cluster` request that learns the leaders (a slow answer is not
/// waited for: the read goes to any node instead).
const LEADERS_TIMEOUT: Duration = Duration::from_millis(500);

/// Longest a backup request may take: a backup copies the whole database before it answers.
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 60 * 60);

/// How a client retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Wait before the first retry; doubled each time up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Time limit of one attempt.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 8,
            backoff: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node answered with an error document.
    #[error("{status}: {code:?}: {message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        field: Option<String>,
    },
    /// The node could not be reached, or the connection broke.
    #[error("transport: {0}")]
    Transport(String),
    /// An attempt took longer than the policy's timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The answer was not what the API promises.
    #[error("unexpected answer: {0}")]
    Decode(String),
    #[error("invalid server address: {0}")]
    Address(String),
}

impl Error {
    /// Whether trying again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport(_) | Error::Timeout(_) => true,
            Error::Api { status, .. } => *status == 503,
            Error::Decode(_) | Error::Address(_) => false,
        }
    }

    /// The API error code, for an error the node answered. A code this release does not
    /// know (from a newer node) is `ErrorCode::Other(name)`.
    ///
    /// ```no_run
    /// use oneid_client::protocol::ErrorCode;
    /// # async fn demo(client: oneid_client::Client) {
    /// match client.backup("nightly/1").await {
    ///     Ok(manifest) => println!("{} pairs", manifest.pairs),
    ///     Err(e) if e.code() == Some(&ErrorCode::Busy) => println!("a backup is running"),
    ///     Err(e) => eprintln!("{e}"),
    /// }
    /// # }
    /// ```
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Sees every write acknowledged before it began, whichever node serves it (the default).
    #[default]
    Linearizable,
    /// What the serving node's replica holds now, without a quorum round: it may miss the
    /// newest writes.
    Stale,
}

impl Consistency {
    /// The query parameter, after `sep`; nothing for the default.
    fn query(self, sep: char) -> String {
        match self {
            Consistency::Linearizable => String::new(),
            Consistency::Stale => format!("{sep}consistency=stale"),
        }
    }
}

#[derive(Clone)]
pub struct Client {
    /// The nodes' base URLs, as given.
    servers: Arc<[String]>,
    /// The server tried first: the last one that answered.
    current: Arc<AtomicUsize>,
    leaders: Arc<Mutex<Leaders>>,
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    policy: RetryPolicy,
}

/// The shard leaders the client knows of, as indexes into its servers.
#[derive(Default)]
struct Leaders {
    by_shard: BTreeMap<u32, usize>,
    /// When they were last asked for (`None`: never).
    asked: Option<Instant>,
}

/// Where a request should go.
#[derive(Clone, Copy)]
enum Route {
    /// Any node: the one that last answered.
    Any,
    /// The leader of this shard, if known.
    Shard(u32),
}

/// A raw answer: status and body.
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl Client {
    /// A client of the nodes at `servers`: one base URL (`http://host:port`) or several,
    /// comma-separated.
    pub fn new(servers: &str) -> Result<Client, Error> {
        Client::with_policy(servers, RetryPolicy::default())
    }

    pub fn with_policy(servers: &str, policy: RetryPolicy) -> Result<Client, Error> {
        let servers: Vec<String> = servers
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(Error::Address("no server given".into()));
        }
        for base in &servers {
            if !base.starts_with("http://") {
                return Err(Error::Address(format!("{base:?} must start with http://")));
            }
            base.parse::<hyper::Uri>()
                .map_err(|e| Error::Address(format!("{base:?}: {e}")))?;
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Client {
            servers: servers.into(),
            current: Arc::new(AtomicUsize::new(0)),
            leaders: Arc::default(),
            http,
            policy,
        })
    }

    /// The first server given: where node-specific calls ([`Client::backup`],
    /// [`Client::healthy`], [`Client::metrics`]) go.
    pub fn base(&self) -> &str {
        &self.servers[0]
    }

    /// The servers given, in order.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// After a transient failure at `server`: the next one is tried first from now on.
    fn fail_over(&self, server: usize) {
        let next = (server + 1) % self.servers.len();
        let _ = self
            .current
            .compare_exchange(server, next, Ordering::Relaxed, Ordering::Relaxed);
        if let Ok(mut leaders) = self.leaders.lock() {
            let before = leaders.by_shard.len();
            leaders.by_shard.retain(|_, i| *i != server);
            if leaders.by_shard.len() != before {
                // Its shards' leaders moved, or will: ask again at the next by-OneID read.
                leaders.asked = None;
            }
        }
    }

    /// The server that leads `shard`, if the client knows it: asks `/v1/cluster` (once per
    /// [`LEADERS_TTL`]) when what it knows is older.
    async fn leader_of(&self, shard: u32) -> Option<usize> {
        if self.servers.len() < 2 {
            return None;
        }
        let ask = {
            let mut leaders = self.leaders.lock().ok()?;
            let stale = leaders.asked.is_none_or(|at| at.elapsed() >= LEADERS_TTL);
            if stale {
                // Whoever finds them stale asks; the others use what is known meanwhile.
                leaders.asked = Some(Instant::now());
            }
            stale
        };
        if ask {
            let server = self.current.load(Ordering::Relaxed);
            let view = self
                .attempt_within(
                    server,
                    &Method::GET,
                    "/v1/cluster",
                    "application/json",
                    &Bytes::new(),
                    LEADERS_TIMEOUT,
                )
                .await
                .and_then(api_error)
                .and_then(|answer| decode::<ClusterView>(&answer.body));
            if let Ok(view) = view {
                // Only nodes the answering one hears from (a leader it names on a node it
                // lost may be gone).
                let index_of = |node: u64| {
                    let listed = view.nodes.iter().find(|n| n.id == node)?;
                    if !listed.up && node != view.node {
                        return None;
                    }
                    let api = listed.api.clone();
                    self.servers
                        .iter()
                        .position(|s| s.strip_prefix("http://") == Some(api.as_str()))
                };
                let by_shard = view
                    .shards
                    .iter()
                    .filter_map(|s| Some((s.id, index_of(s.leader?)?)))
                    .collect();
                if let Ok(mut leaders) = self.leaders.lock() {
                    leaders.by_shard = by_shard;
                }
            }
        }
        self.leaders.lock().ok()?.by_shard.get(&shard).copied()
    }

    async fn attempt_within(
        &self,
        server: usize,
        method: &Method,
        path: &str,
        content_type: &str,
        body: &Bytes,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.servers[server]))
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(body.clone()))
            .map_err(|e| Error::Address(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| Error::Transport(error_chain(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Transport(e.to_string()))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }

    /// Sends a request along `route`, moving to the next server on a transient failure and
    /// backing off once every server was tried; non-2xx answers become `Error::Api`.
    async fn call(
        &self,
        route: Route,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<Answer, Error> {
        let mut wait = self.policy.backoff;
        let mut attempt = 1;
        loop {
            let leader = match route {
                Route::Shard(shard) if attempt == 1 => self.leader_of(shard).await,
                _ => None,
            };
            let server = leader.unwrap_or_else(|| self.current.load(Ordering::Relaxed));
            let result = self
                .attempt_within(
                    server,
                    &method,
                    path,
                    content_type,
                    &body,
                    self.policy.timeout,
                )
                .await
                .and_then(api_error);
            match result {
                Err(error) if error.is_transient() && attempt < self.policy.attempts => {
                    self.fail_over(server);
                    if attempt % self.servers.len() as u32 == 0 {
                        tokio::time::sleep(jittered(wait)).await;
                        wait = (wait * 2).min(self.policy.backoff_max);
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, route: Route, path: &str) -> Result<T, Error> {
        let answer = self
            .call(route, Method::GET, path, "application/json", Bytes::new())
            .await?;
        decode(&answer.body)
    }

    /// Like `get`, but `404 not_found` is `None`.
    async fn get_optional<T: DeserializeOwned>(
        &self,
        route: Route,
        path: &str,
    ) -> Result<Option<T>, Error> {
        match self.get(route, path).await {
            Ok(value) => Ok(Some(value)),
            Err(Error::Api {
                code: ErrorCode::NotFound,
                ..
            }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Sends events as one batch (at most [`EVENTS_PER_REQUEST_MAX`]). Events answered
    /// `too_many_waves` (they waited behind too many others sharing new identities) are sent
    /// again at once, as later requests, until every one has its own answer; events answered
    /// `unavailable` are sent again with backoff until they get a final answer or the attempts
    /// run out. The answer has one result per event, in order.
    ///
    /// ```no_run
    /// use oneid_client::protocol::wire::{EventKind, NewEvent, PointsEarn};
    /// # async fn demo(client: oneid_client::Client) -> Result<(), oneid_client::Error> {
    /// let earn = NewEvent::new(
    ///     "earn-1",
    ///     EventKind::PointsEarn(PointsEarn { points: 100, reason: Some("welcome".into()), expires_at: None }),
    /// )
    /// .identity("phone", "13800000000");
    /// let answer = client.send_events(&[earn]).await?;
    /// assert_eq!(answer.applied + answer.duplicates, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// [`EVENTS_PER_REQUEST_MAX`]: oneid_protocol::api::EVENTS_PER_REQUEST_MAX
    pub async fn send_events(&self, events: &[NewEvent]) -> Result<EventsResponse, Error> {
        self.send_batch(events).await
    }

    /// [`Client::send_events`] for events the caller writes itself (`serde_json::Value`,
    /// `Box<RawValue>`, its own types): the server checks them, one result per event.
    pub async fn send_events_json<E: serde::Serialize + Sync>(
        &self,
        events: &[E],
    ) -> Result<EventsResponse, Error> {
        self.send_batch(events).await
    }

    async fn send_batch<E: serde::Serialize + Sync>(
        &self,
        events: &[E],
    ) -> Result<EventsResponse, Error> {
        let mut response = self.post_events(events.iter()).await?;
        let mut wait = self.policy.backoff;
        let mut attempt = 1;
        loop {
            let retry: Vec<usize> = (0..response.results.len())
                .filter(|&i| retry_code(&response.results[i]).is_some())
                .collect();
            let unavailable = retry
                .iter()
                .any(|&i| retry_code(&response.results[i]) == Some(ErrorCode::Unavailable));
            if retry.is_empty() || (unavailable && attempt >= self.policy.attempts) {
                break;
            }
            if unavailable {
                // Another node may reach the shard's leader when this one cannot.
                self.fail_over(self.current.load(Ordering::Relaxed));
                tokio::time::sleep(jittered(wait)).await;
                wait = (wait * 2).min(self.policy.backoff_max);
                attempt += 1;
            }
            let answer = self.post_events(retry.iter().map(|&i| &events[i])).await?;
            for (&i, result) in retry.iter().zip(answer.results) {
                response.results[i] = result;
            }
        }
        let count = |status| {
            response
                .results
                .iter()
                .filter(|r| r.status == status)
                .count() as u64
        };
        (response.applied, response.duplicates, response.rejected) = (
            count(EventStatus::Applied),
            count(EventStatus::Duplicate),
            count(EventStatus::Rejected),
        );
        Ok(response)
    }

    async fn post_events<'e, E: serde::Serialize + 'e>(
        &self,
        events: impl Iterator<Item = &'e E>,
    ) -> Result<EventsResponse, Error> {
        let events: Vec<&E> = events.collect();
        self.send_json(Method::POST, "/v1/events", &events).await
    }

    /// Sends `body` as JSON (retrying transient failures) and decodes the answer.
    async fn send_json<B: serde::Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        let body = serde_json::to_vec(body).map_err(|e| Error::Decode(e.to_string()))?;
        let answer = self
            .call(
                Route::Any,
                method,
                path,
                "application/json",
                Bytes::from(body),
            )
            .await?;
        decode(&answer.body)
    }

    /// Sends a body as it is (a JSON array, or NDJSON when `ndjson`), without per-event retries.
    pub async fn send_events_raw(
        &self,
        body: Bytes,
        ndjson: bool,
    ) -> Result<EventsResponse, Error> {
        let content_type = if ndjson {
            "application/x-ndjson"
        } else {
            "application/json"
        };
        let answer = self
            .call(Route::Any, Method::POST, "/v1/events", content_type, body)
            .await?;
        decode(&answer.body)
    }

    /// The profile with this OneID, or `None`.
    pub async fn profile(&self, oneid: &str) -> Result<Option<ProfileDoc>, Error> {
        self.profile_at(oneid, Consistency::Linearizable).await
    }

    /// The profile with this OneID, as fresh as `consistency` asks.
    pub async fn profile_at(
        &self,
        oneid: &str,
        consistency: Consistency,
    ) -> Result<Option<ProfileDoc>, Error> {
        self.get_optional(
            shard_of(oneid),
            &format!("/v1/profiles/{}{}", encode(oneid), consistency.query('?')),
        )
        .await
    }

    /// The profile bound to an identity, or `None`.
    ///
    /// ```no_run
    /// # async fn demo(client: oneid_client::Client) -> Result<(), oneid_client::Error> {
    /// if let Some(profile) = client.lookup("phone", "13800000000").await? {
    ///     println!("{}: {} points, tier {}", profile.oneid, profile.points.balance, profile.tier);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lookup(&self, kind: &str, value: &str) -> Result<Option<ProfileDoc>, Error> {
        self.lookup_at(kind, value, Consistency::Linearizable).await
    }

    /// The profile bound to an identity, as fresh as `consistency` asks.
    pub async fn lookup_at(
        &self,
        kind: &str,
        value: &str,
        consistency: Consistency,
    ) -> Result<Option<ProfileDoc>, Error> {
        self.get_optional(
            Route::Any,
            &format!(
                "/v1/profiles/lookup?kind={}&value={}{}",
                encode(kind),
                encode(value),
                consistency.query('&')
            ),
        )
        .await
    }

    /// The merges the profile with this OneID survived (or, for a OneID merged into another,
    /// the profile it resolves to), oldest first; `None` if there is no such profile.
    pub async fn merges(&self, oneid: &str) -> Result<Option<MergesDoc>, Error> {
        self.get_optional(
            shard_of(oneid),
            &format!("/v1/profiles/{}/merges", encode(oneid)),
        )
        .await
    }

    /// One page of a profile's ledger, newest first; pass the answer's `next` as `cursor`.
    ///
    /// ```no_run
    /// # async fn demo(client: oneid_client::Client, oneid: &str) -> Result<(), oneid_client::Error> {
    /// let mut cursor = None;
    /// loop {
    ///     let page = client.ledger(oneid, Some(100), cursor.as_deref()).await?;
    ///     for entry in &page.entries {
    ///         println!("{} {} {:+} -> {}", entry.at, entry.kind, entry.points, entry.balance_after);
    ///     }
    ///     match page.next {
    ///         Some(next) => cursor = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ledger(
        &self,
        oneid: &str,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<LedgerPage, Error> {
        let path = page_path(
            format!("/v1/profiles/{}/ledger", encode(oneid)),
            limit,
            cursor,
        );
        self.get(shard_of(oneid), &path).await
    }

    /// The rules document in force (money and factors are decimal strings).
    pub async fn rules(&self) -> Result<RulesDoc, Error> {
        self.get(Route::Any, "/v1/rules").await
    }

    /// Replaces the rules (each part left out takes its default); answers the rules now in
    /// force. A rule the node refuses is `400 invalid_rules` naming the field, and changes
    /// nothing.
    ///
    /// ```no_run
    /// use oneid_client::protocol::{rules::RulesDoc, strict};
    /// # async fn demo(client: oneid_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let rules: RulesDoc = strict::from_json(br#"{"points": {"per_currency_unit": "2"}}"#)?;
    /// let now = client.set_rules(&rules).await?;
    /// assert_eq!(now.points.per_currency_unit.map(|d| d.get().to_string()), Some(r#""2""#.into()));
    /// # Ok(()) }
    /// ```
    pub async fn set_rules(&self, rules: &RulesDoc) -> Result<RulesDoc, Error> {
        self.send_json(Method::PUT, "/v1/rules", rules).await
    }

    /// What the identity policy in force refuses among what is stored: per kind, the profiles
    /// over its `max_per_profile` and the blocked values bound before the policy blocked them
    /// (a policy change never rewrites them). The node reads every shard for at most 10 s;
    /// the counts are those of the `shards_done` of `shards_total`.
    pub async fn identity_audit(&self) -> Result<IdentityAudit, Error> {
        self.get(Route::Any, "/v1/admin/identity-audit").await
    }

    /// The cluster as the node that answers sees it.
    pub async fn cluster(&self) -> Result<ClusterView, Error> {
        self.get(Route::Any, "/v1/cluster").await
    }

    /// Takes an online backup of the first node into `dir`, a relative path under the node's
    /// backup root (`[storage] backup_root`, **on the node's machine**), absent or empty;
    /// answers the backup's manifest (also written there as `backup.json`). A node without a
    /// backup root answers `403 forbidden`. Tried once, with up to [`BACKUP_TIMEOUT`]: a retry would find the
    /// directory no longer empty. A backup already running is answered `409 busy`.
    pub async fn backup(&self, dir: &str) -> Result<BackupManifest, Error> {
        let request = BackupRequest {
            dir: Some(dir.to_string()),
        };
        let body = serde_json::to_vec(&request).map_err(|e| Error::Decode(e.to_string()))?;
        let answer = self
            .attempt_within(
                0,
                &Method::POST,
                "/v1/admin/backup",
                "application/json",
                &Bytes::from(body),
                BACKUP_TIMEOUT,
            )
            .await
            .and_then(api_error)?;
        decode(&answer.body)
    }

    /// Whether the first node is ready to serve (one attempt, no retries).
    pub async fn healthy(&self) -> bool {
        matches!(
            self.attempt_within(
                0,
                &Method::GET,
                "/healthz",
                "application/json",
                &Bytes::new(),
                self.policy.timeout
            )
            .await,
            Ok(Answer {
                status: StatusCode::OK,
                ..
            })
        )
    }

    /// The Prometheus text of the first node's `/metrics`.
    pub async fn metrics(&self) -> Result<String, Error> {
        let answer = self
            .attempt_within(
                0,
                &Method::GET,
                "/metrics",
                "text/plain",
                &Bytes::new(),
                self.policy.timeout,
            )
            .await
            .and_then(api_error)?;
        String::from_utf8(answer.body.to_vec()).map_err(|e| Error::Decode(e.to_string()))
    }
}

/// A read of one profile goes to its shard's leader (a OneID carries its shard).
fn shard_of(oneid: &str) -> Route {
    oneid
        .parse::<OneId>()
        .map_or(Route::Any, |oneid| Route::Shard(oneid.shard().0))
}

/// The code of an event's rejection that a later attempt may change: `unavailable` (the node
/// could not apply it now) or `too_many_waves` (it waited behind other events of its batch).
fn retry_code(result: &oneid_protocol::api::EventResult) -> Option<ErrorCode> {
    let code = result.error.as_ref()?.code.clone();
    (result.status == EventStatus::Rejected
        && matches!(code, ErrorCode::Unavailable | ErrorCode::TooManyWaves))
    .then_some(code)
}

fn api_error(answer: Answer) -> Result<Answer, Error> {
    if answer.status.is_success() {
        return Ok(answer);
    }
    match serde_json::from_slice::<ErrorBody>(&answer.body) {
        Ok(body) => Err(Error::Api {
            status: answer.status.as_u16(),
            code: body.error.code,
            message: body.error.message,
            field: body.error.field,
        }),
        Err(_) => Err(Error::Decode(format!(
            "{} with body {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ))),
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| {
        Error::Decode(format!(
            "{e}: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })
}

/// `path?limit=&cursor=` of a paged read (each only when given).
fn page_path(path: String, limit: Option<usize>, cursor: Option<&str>) -> String {
    let mut path = path + "?";
    if let Some(limit) = limit {
        path.push_str(&format!("limit={limit}&"));
    }
    if let Some(cursor) = cursor {
        path.push_str(&format!("cursor={}", encode(cursor)));
    }
    path
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod jitter_tests {
    use super::*;

    #[test]
    fn a_jittered_wait_is_between_half_and_all_of_its_step_and_varies() {
        let step = Duration::from_millis(400);
        let waits: Vec<Duration> = (0..1_000).map(|_| jittered(step)).collect();
        assert!(
            waits.iter().all(|w| (step / 2..=step).contains(w)),
            "{waits:?}"
        );
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*max - *min > step / 4, "no spread: {min:?}..{max:?}");
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
