//! The HTTP API (hyper 1 on its own tokio runtime; the shard actors run on actix arbiters).
//!
//! # Layout
//! - `conn`: accepting connections (at most `CONNECTIONS_MAX`) and the deadlines that keep a
//!   connection from holding the server.
//! - `body`: reading request bodies within their limits and the node's budget for bodies.
//! - `events`: `POST /v1/events` (a JSON array or NDJSON), handed to the router.
//! - `segments`: `/v1/segments`: definitions, documents, members, and the membership stream
//!   (Server-Sent Events, served by `streams`).
//! - this file: the routes (a known route with another method is answered 405 with `Allow`),
//!   profile, identity and ledger reads (fjall reads, on the read pool), rules, the cluster
//!   view, health, metrics and backups, and how errors are answered.
//!
//! `POST /v1/admin/backup` copies a snapshot on a blocking thread of this runtime, one backup
//! at a time (see `backup`).

mod audit;
mod body;
pub mod conn;
mod events;
mod segments;

use crate::backup::{BackupError, Backups};
use crate::merges::MERGE_CHAIN_MAX;
use crate::metrics::{Metrics, Route};
use crate::router::Router;
use crate::shards::{per_shard, Consistency, Shards};
use crate::storage::{Answer, Query};
use body::{BodyBudget, Shape};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use oneid_protocol::api::{
    BackupRequest, ClusterView, DroppedDoc, ErrorBody, Health, LedgerEntryDoc, LedgerPage,
    MergeDoc, MergesDoc, NodeView, ShardView, LEDGER_PAGE_DEFAULT, LEDGER_PAGE_MAX,
};
use oneid_protocol::event::EventError;
use oneid_protocol::ids::{check_identity, Identity, IdentityPart, OneId, ShardId};
use oneid_protocol::rules::{Rules, RulesDoc};
use oneid_protocol::ErrorCode;
use oneid_replica::ShardError;
use oneid_state::command::{Command, Output, REGISTRY_SHARD};
use oneid_state::merge::MergeRecord;
use oneid_state::{LedgerKind, LedgerRecord};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub struct Api {
    pub router: Router,
    /// The shards, here and on peers: profile, identity and ledger reads go through them.
    pub shards: Arc<Shards>,
    pub cluster_id: String,
    pub metrics: Arc<Metrics>,
    pub node_id: u64,
    pub nodes: Vec<NodeView>,
    pub shutting_down: AtomicBool,
    /// This node's identity.
    pub identity: crate::transport::handshake::Identity,
    /// Online backups, one at a time.
    pub backups: Arc<Backups>,
    /// Request bodies in flight on the node, in bytes (`[api] body_budget_mib`).
    pub budget: BodyBudget,
    /// A body that stops arriving this long is abandoned (`[api] body_timeout_ms`).
    pub body_timeout: Duration,
    /// Segment membership streams.
    pub streams: Arc<crate::streams::Streams>,
}

/// The body of every response: whole, or a stream.
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

impl Api {
    pub fn body_budget(bytes: usize) -> BodyBudget {
        BodyBudget::new(bytes)
    }
}

/// A request refused as a whole.
pub struct ApiError {
    status: StatusCode,
    error: EventError,
    /// Close the connection after answering (the body was not fully read).
    close: bool,
    /// The methods the route answers, for a 405's `Allow`.
    allow: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: EventError::new(code, message),
            close: false,
            allow: None,
        }
    }

    fn field(
        status: StatusCode,
        code: ErrorCode,
        field: &str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            error: EventError::field(code, field, message),
            close: false,
            allow: None,
        }
    }

    fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            message,
        )
    }
}

impl From<ShardError> for ApiError {
    fn from(error: ShardError) -> ApiError {
        ApiError::unavailable(error.to_string())
    }
}

type Reply = Result<Response<Full<Bytes>>, ApiError>;

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).expect("API bodies serialize");
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(error: ApiError) -> Response<Full<Bytes>> {
    let mut response = json(error.status, &ErrorBody { error: error.error });
    if error.close {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(allow) = error.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}

/// Serves the API on `listener` until `shutdown` resolves, then lets requests in flight
/// finish (up to `conn::SHUTDOWN_GRACE`); from that moment writes and new backups are refused.
pub async fn serve(
    api: Arc<Api>,
    listener: TcpListener,
    deadlines: conn::Deadlines,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = Arc::clone(&api);
    let handle = move |request| {
        let api = Arc::clone(&handler);
        async move { api.handle(request).await }
    };
    let stopping = async {
        shutdown.await;
        api.shutting_down.store(true, Ordering::SeqCst);
        api.streams.stop();
        // A backup in flight stops at its next batch rather than holding up the shutdown.
        api.backups.cancel();
    };
    conn::serve(listener, deadlines, handle, stopping).await;
}

/// The routes, each with the methods it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Events,
    Lookup,
    Profile,
    Ledger,
    Merges,
    Rules,
    Segments,
    Segment,
    Members,
    Stream,
    Cluster,
    Backup,
    IdentityAudit,
    Health,
    Metrics,
    OpenApi,
}

impl Endpoint {
    /// The endpoint of a path (its segments), and the OneID or segment name when it has one.
    fn of<'a>(segments: &[&'a str]) -> Option<(Endpoint, Option<&'a str>)> {
        Some(match segments {
            ["v1", "events"] => (Endpoint::Events, None),
            ["v1", "profiles", "lookup"] => (Endpoint::Lookup, None),
            ["v1", "profiles", oneid] => (Endpoint::Profile, Some(*oneid)),
            ["v1", "profiles", oneid, "ledger"] => (Endpoint::Ledger, Some(*oneid)),
            ["v1", "profiles", oneid, "merges"] => (Endpoint::Merges, Some(*oneid)),
            ["v1", "rules"] => (Endpoint::Rules, None),
            ["v1", "segments"] => (Endpoint::Segments, None),
            ["v1", "segments", name] => (Endpoint::Segment, Some(*name)),
            ["v1", "segments", name, "members"] => (Endpoint::Members, Some(*name)),
            ["v1", "segments", name, "stream"] => (Endpoint::Stream, Some(*name)),
            ["v1", "cluster"] => (Endpoint::Cluster, None),
            ["v1", "admin", "backup"] => (Endpoint::Backup, None),
            ["v1", "admin", "identity-audit"] => (Endpoint::IdentityAudit, None),
            ["healthz"] => (Endpoint::Health, None),
            ["metrics"] => (Endpoint::Metrics, None),
            ["v1", "openapi.json"] => (Endpoint::OpenApi, None),
            _ => return None,
        })
    }

    fn methods(self) -> &'static [Method] {
        match self {
            Endpoint::Events | Endpoint::Backup => &[Method::POST],
            Endpoint::Rules => &[Method::GET, Method::PUT],
            Endpoint::Segment => &[Method::GET, Method::PUT, Method::DELETE],
            _ => &[Method::GET],
        }
    }

    fn route(self) -> Route {
        match self {
            Endpoint::Events => Route::Events,
            Endpoint::Lookup => Route::Lookup,
            Endpoint::Profile | Endpoint::Merges => Route::Profile,
            Endpoint::Ledger => Route::Ledger,
            Endpoint::Rules => Route::Rules,
            Endpoint::Segments | Endpoint::Segment | Endpoint::Members => Route::Segments,
            Endpoint::Stream => Route::Stream,
            Endpoint::Cluster => Route::Cluster,
            Endpoint::Backup | Endpoint::IdentityAudit => Route::Admin,
            Endpoint::Health => Route::Health,
            Endpoint::Metrics => Route::Metrics,
            Endpoint::OpenApi => Route::OpenApi,
        }
    }
}

impl Api {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (route, reply) = match Endpoint::of(&segments) {
            None => (
                Route::Other,
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NoRoute,
                    format!("no route {path}"),
                )),
            ),
            Some((endpoint, _)) if !endpoint.methods().contains(&method) => (
                endpoint.route(),
                Err(method_not_allowed(&method, &path, endpoint)),
            ),
            Some((Endpoint::Stream, name)) => {
                let name = name.unwrap_or_default().to_string();
                let reply = self.stream(&name, &request).await;
                let response =
                    reply.unwrap_or_else(|error| error_response(error).map(BodyExt::boxed));
                self.metrics
                    .request(Route::Stream, response.status().as_u16(), started.elapsed());
                return response;
            }
            Some((endpoint, oneid)) => {
                let oneid = oneid.unwrap_or_default();
                let query = request.uri().query().map(str::to_string);
                let reply = match (endpoint, method) {
                    (Endpoint::Events, _) => self.post_events(request).await,
                    (Endpoint::Lookup, _) => self.lookup(query.as_deref()).await,
                    (Endpoint::Profile, _) => self.get_profile(oneid, query.as_deref()).await,
                    (Endpoint::Ledger, _) => self.ledger(oneid, query.as_deref()).await,
                    (Endpoint::Merges, _) => self.merges(oneid, query.as_deref()).await,
                    (Endpoint::Rules, Method::PUT) => self.put_rules(request).await,
                    (Endpoint::Rules, _) => self.get_rules().await,
                    (Endpoint::Segments, _) => self.list_segments().await,
                    (Endpoint::Segment, Method::PUT) => self.put_segment(oneid, request).await,
                    (Endpoint::Segment, Method::DELETE) => self.delete_segment(oneid).await,
                    (Endpoint::Segment, _) => self.get_segment(oneid).await,
                    (Endpoint::Members, _) => self.members(oneid, query.as_deref()).await,
                    (Endpoint::Stream, _) => unreachable!("streams are answered above"),
                    (Endpoint::Cluster, _) => {
                        self.cluster().await.map(|view| json(StatusCode::OK, &view))
                    }
                    (Endpoint::Backup, _) => self.backup(request).await,
                    (Endpoint::IdentityAudit, _) => self.identity_audit().await,
                    (Endpoint::Health, _) => self.healthz().await,
                    (Endpoint::Metrics, _) => Ok(self.metrics_text()),
                    (Endpoint::OpenApi, _) => Ok(openapi()),
                };
                (endpoint.route(), reply)
            }
        };
        let response = reply.unwrap_or_else(error_response);
        self.metrics
            .request(route, response.status().as_u16(), started.elapsed());
        response.map(BodyExt::boxed)
    }

    fn parse_oneid(&self, text: &str) -> Result<OneId, ApiError> {
        let oneid: OneId = text.parse().map_err(|()| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidField,
                "oneid",
                format!("{text:?} is not a OneID"),
            )
        })?;
        if oneid.shard().0 >= self.router.n_shards {
            return Err(not_found(format!("profile {oneid} does not exist")));
        }
        Ok(oneid)
    }

    /// Reads `query` of `shard` through the routing table; a shard that cannot answer now
    /// is 503 `unavailable`.
    async fn read_state(
        &self,
        shard: ShardId,
        query: Query,
        consistency: Consistency,
    ) -> Result<(Answer, u64), ApiError> {
        self.shards
            .read(shard, query, consistency)
            .await
            .map_err(ApiError::from)
    }

    async fn get_profile(&self, oneid: &str, query: Option<&str>) -> Reply {
        let oneid = self.parse_oneid(oneid)?;
        let consistency = consistency(&params(query))?;
        let (doc, applied) = self
            .resolved_profile(oneid, consistency)
            .await?
            .ok_or_else(|| not_found(format!("profile {oneid} does not exist")))?;
        Ok(stamped(json(StatusCode::OK, &doc), consistency, applied))
    }

    /// The merges the profile `oneid` resolves to survived, oldest first.
    async fn merges(&self, oneid: &str, query: Option<&str>) -> Reply {
        let oneid = self.parse_oneid(oneid)?;
        let consistency = consistency(&params(query))?;
        let (_, answer, applied) = self
            .following_merges(oneid, consistency, Query::Merges)
            .await?;
        let Answer::Merges(records) = answer else {
            panic!("a merges read answered {answer:?}")
        };
        let records =
            records.ok_or_else(|| not_found(format!("profile {oneid} does not exist")))?;
        let doc = MergesDoc {
            merges: records.into_iter().map(merge_doc).collect(),
        };
        Ok(stamped(json(StatusCode::OK, &doc), consistency, applied))
    }

    /// The document of the profile `oneid` resolves to (itself, or through the merges that
    /// merged it), with `resolved_from` if it was merged; and the applied index of its read.
    /// `None`: no such profile.
    async fn resolved_profile(
        &self,
        oneid: OneId,
        consistency: Consistency,
    ) -> Result<Option<(oneid_protocol::api::ProfileDoc, u64)>, ApiError> {
        let (at, answer, applied) = self
            .following_merges(oneid, consistency, Query::Profile)
            .await?;
        let Answer::Profile(read) = answer else {
            panic!("a profile read answered {answer:?}")
        };
        Ok(read.map(|read| {
            let mut doc = read.into_doc();
            if at != oneid {
                doc.resolved_from = Some(oneid.to_string());
            }
            (doc, applied)
        }))
    }

    /// Reads `query(oneid)` at `consistency`, and again at the survivor's shard as long as the
    /// profile was merged (a survivor merged later, and so on): the OneID it was answered
    /// for, the answer, and the applied index of that read.
    async fn following_merges(
        &self,
        oneid: OneId,
        consistency: Consistency,
        query: impl Fn(OneId) -> Query,
    ) -> Result<(OneId, Answer, u64), ApiError> {
        let mut at = oneid;
        for _ in 0..MERGE_CHAIN_MAX {
            match self.read_state(at.shard(), query(at), consistency).await? {
                (Answer::Merged(into), _) => at = into,
                (answer, applied) => return Ok((at, answer, applied)),
            }
        }
        Err(merge_chain_too_long(oneid))
    }

    async fn lookup(&self, query: Option<&str>) -> Reply {
        let params = params(query);
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| {
                    ApiError::field(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::MissingField,
                        name,
                        format!("query parameter {name} is required"),
                    )
                })
        };
        let identity = Identity {
            kind: param("kind")?,
            value: param("value")?,
        };
        if let Err((part, message)) = check_identity(&identity.kind, &identity.value) {
            let field = match part {
                IdentityPart::Kind => "kind",
                IdentityPart::Value => "value",
            };
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidField,
                field,
                message,
            ));
        }
        let consistency = consistency(&params)?;
        let missing = || {
            not_found(format!(
                "no profile has identity {}={:?}",
                identity.kind, identity.value
            ))
        };
        // A binding this node saw at its shard's latest epoch holds: only "not found" (or an
        // epoch that moved) needs a read.
        let cached = self.router.reader.cached_identity(&identity);
        let oneid = match cached {
            Some((oneid, _)) => oneid,
            None => self
                .read_binding(&identity, consistency)
                .await?
                .ok_or_else(missing)?,
        };
        // A binding cached (or read) before a merge names the merged profile: its read
        // resolves to the survivor. Asked by identity, the document names no `resolved_from`.
        let (mut doc, mut applied) = self
            .resolved_profile(oneid, consistency)
            .await?
            .ok_or_else(missing)?;
        let held = |doc: &oneid_protocol::api::ProfileDoc| {
            doc.identities
                .get(&identity.kind)
                .is_some_and(|values| values.contains(&identity.value))
        };
        if cached.is_some() && !held(&doc) {
            // Cached before an unlink took it off the profile (this node not told yet).
            self.router.reader.forget_identity(&identity);
            let oneid = self
                .read_binding(&identity, consistency)
                .await?
                .ok_or_else(missing)?;
            (doc, applied) = self
                .resolved_profile(oneid, consistency)
                .await?
                .ok_or_else(missing)?;
        }
        doc.resolved_from = None;
        Ok(stamped(json(StatusCode::OK, &doc), consistency, applied))
    }

    /// The profile `identity` is bound to, read at its shard (and cached at the epoch read).
    async fn read_binding(
        &self,
        identity: &Identity,
        consistency: Consistency,
    ) -> Result<Option<OneId>, ApiError> {
        let shard = identity.shard(self.shards.n_shards);
        let query = Query::Identities(vec![identity.clone()]);
        match self.read_state(shard, query, consistency).await? {
            (Answer::Identities(found, epoch), _) => {
                let oneid = found.into_iter().next().flatten();
                if let Some(oneid) = oneid {
                    self.router.reader.cache_identity(identity, oneid, epoch);
                }
                Ok(oneid)
            }
            (other, _) => panic!("an identity read answered {other:?}"),
        }
    }

    async fn ledger(&self, oneid: &str, query: Option<&str>) -> Reply {
        let oneid = self.parse_oneid(oneid)?;
        let mut limit = LEDGER_PAGE_DEFAULT;
        let mut before = None;
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "limit" => {
                    limit = value.parse::<usize>().ok().filter(|l| *l >= 1).ok_or_else(|| {
                        ApiError::field(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, "limit", format!("limit must be a whole number from 1 to {LEDGER_PAGE_MAX}, found {value:?}"))
                    })?;
                    limit = limit.min(LEDGER_PAGE_MAX);
                }
                "consistency" => {}
                "cursor" => {
                    before = Some(u64::from_str_radix(&value, 16).map_err(|_| {
                        ApiError::field(
                            StatusCode::BAD_REQUEST,
                            ErrorCode::InvalidField,
                            "cursor",
                            "cursor is not one this API gave",
                        )
                    })?);
                }
                _ => {}
            }
        }
        let consistency = consistency(&params(query))?;
        let ledger = Query::Ledger {
            oneid,
            limit: limit + 1,
            before,
        };
        let (answer, applied) = self.read_state(oneid.shard(), ledger, consistency).await?;
        let Answer::Ledger(entries) = answer else {
            panic!("a ledger read answered {answer:?}")
        };
        let read = entries.ok_or_else(|| not_found(format!("profile {oneid} does not exist")))?;
        let mut entries = read.entries;
        let next = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|(seq, _)| format!("{seq:x}"))
        } else {
            None
        };
        let entries = entries
            .into_iter()
            .map(|(_, r)| ledger_entry_doc(r))
            .collect();
        let page = LedgerPage {
            entries,
            next,
            merged_into: read.merged_into.map(|into| into.to_string()),
        };
        Ok(stamped(json(StatusCode::OK, &page), consistency, applied))
    }

    /// `GET /v1/rules`: the rules the registry shard ordered last, with their version.
    async fn get_rules(&self) -> Reply {
        let shard = ShardId(REGISTRY_SHARD);
        let (answer, _) = self
            .read_state(shard, Query::Rules(shard), Consistency::Linearizable)
            .await?;
        let Answer::Rules(rules, version) = answer else {
            panic!("a rules read answered {answer:?}")
        };
        Ok(rules_answer(&rules, version))
    }

    async fn put_rules(&self, request: Request<Incoming>) -> Reply {
        let (body, _held) = self.read_body(request).await?;
        let doc: RulesDoc = strict_body(&body, "a rules document")?;
        let rules = doc.validate().map_err(|e| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRules,
                &e.field,
                e.to_string(),
            )
        })?;
        let version = self.define_rules(&rules).await?;
        // Events this node routes from now on are judged by these (or newer) rules.
        self.router.learn_rules(&rules, version);
        Ok(rules_answer(&rules, version))
    }

    /// Has the registry shard order `rules` (their version), then installs them on every
    /// other shard. A shard that cannot install them now makes this a 503: the same request
    /// again orders them anew, and the higher version replaces these wherever they landed.
    async fn define_rules(&self, rules: &Rules) -> Result<u64, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let registry = ShardId(REGISTRY_SHARD);
        let define = Command::DefineRules(Box::new(rules.clone()));
        let Output::RulesVersion(version) = self.shards.propose(registry, define).await? else {
            panic!("a rules definition answered something else")
        };
        let install = Command::InstallRules {
            version,
            rules: Box::new(rules.clone()),
        };
        self.install_elsewhere(install, &format!("rules version {version} is ordered"))
            .await?;
        Ok(version)
    }

    /// Proposes what the registry shard ordered (`install`) to every other shard at once. A
    /// shard that cannot take it now makes this a 503 saying `what` is done but not everywhere:
    /// the same request again finishes it (installs keep the highest version).
    async fn install_elsewhere(&self, install: Command, what: &str) -> Result<(), ApiError> {
        // A test makes a PUT's installs not land, as a shard without a leader would.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("api::before_installs", |_| Err(ApiError::unavailable(
            format!("{what}, but the failpoint api::before_installs kept it from the other shards")
        )));
        let installs = (0..self.shards.n_shards)
            .filter(|s| *s != REGISTRY_SHARD)
            .map(|s| (ShardId(s), self.shards.propose(ShardId(s), install.clone())));
        for (shard, result) in per_shard(installs).await {
            result.map_err(|e| {
                ApiError::unavailable(format!(
                    "{what}, but shard {shard} did not install it yet ({e}); send the request again"
                ))
            })?;
        }
        Ok(())
    }

    /// `POST /v1/admin/backup` `{"dir": "relative/path"}` (under `[storage] backup_root`):
    /// answers the manifest.
    async fn backup(&self, request: Request<Incoming>) -> Reply {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let (body, _held) = self.read_body(request).await?;
        let request: BackupRequest = strict_body(&body, r#"{"dir": "relative/path"}"#)?;
        let dir = PathBuf::from(request.dir.ok_or_else(|| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                ErrorCode::MissingField,
                "dir",
                "dir (the backup's directory under the node's backup root) is required",
            )
        })?);
        let running = self.backups.begin().map_err(backup_error)?;
        // The copy goes on (and keeps its slot) even if the client goes away.
        let manifest = tokio::task::spawn_blocking(move || running.run(&dir))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    format!("the backup task failed: {e}"),
                )
            })?
            .map_err(backup_error)?;
        Ok(json(StatusCode::OK, &manifest))
    }

    /// Reads a JSON request body (rules, backups) within the body limits.
    async fn read_body(
        &self,
        request: Request<Incoming>,
    ) -> Result<(Vec<u8>, body::Held), ApiError> {
        body::read(
            request.into_body(),
            Shape::Whole,
            &self.budget,
            self.body_timeout,
        )
        .await
    }

    /// This node's replicas, as each says of itself.
    async fn shard_views(&self) -> Result<Vec<ShardView>, ApiError> {
        let node = crate::config::node_of_raft_id;
        self.shards
            .statuses()
            .await
            .into_iter()
            .map(|(shard, answer)| match answer {
                Some(view) => {
                    let s = &view.status;
                    Ok(ShardView {
                        id: shard.0,
                        leader: s.leader.map(node),
                        term: s.term,
                        role: s.role.name().to_string(),
                        commit_index: s.commit_index,
                        applied_index: s.applied_index,
                        digest: format!("{:016x}", s.digest),
                        replicas: s.replicas.iter().map(|r| node(*r)).collect(),
                        placed_leader: node(s.placed_leader),
                        needs_snapshot: s.needs_snapshot.iter().map(|r| node(*r)).collect(),
                        follow_ups_pending: view.follow_ups_pending,
                        clock: view.clock.to_string(),
                    })
                }
                None => Err(ApiError::unavailable(format!(
                    "shard {shard} did not answer"
                ))),
            })
            .collect()
    }

    async fn cluster(&self) -> Result<ClusterView, ApiError> {
        let peers = self.shards.peers();
        let offsets = self.shards.clock.offsets();
        let nodes = self
            .nodes
            .iter()
            .map(|n| NodeView {
                up: n.id == self.node_id || peers.is_some_and(|p| p.up(n.id)),
                clock_offset_ms: offsets.get(&n.id).copied().flatten(),
                ..n.clone()
            })
            .collect();
        Ok(ClusterView {
            node: self.node_id,
            cluster_id: self.cluster_id.clone(),
            identity: crate::transport::handshake::hex(&self.identity),
            snapshots: self.shards.snapshots.in_flight(),
            nodes,
            shards: self.shard_views().await?,
        })
    }

    /// 200 when every shard of the cluster has a leader this node heard from within 2 s (its
    /// own replica, or a peer that is up), else 503 naming the shards.
    async fn healthz(&self) -> Reply {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let leaderless: Vec<u32> = (0..self.shards.n_shards)
            .filter(|s| self.shards.leader(ShardId(*s)).is_none())
            .collect();
        if !leaderless.is_empty() {
            return Err(ApiError::unavailable(format!(
                "shards without a leader heard from: {leaderless:?}"
            )));
        }
        Ok(json(
            StatusCode::OK,
            &Health {
                status: "ok".to_string(),
                shards: self.shards.n_shards,
            },
        ))
    }

    fn metrics_text(&self) -> Response<Full<Bytes>> {
        let mut text = self.metrics.render();
        self.router.reader.storage().render_gauges(&mut text);
        self.shards.clock.render_metrics(&mut text);
        self.shards.render_metrics(&mut text);
        self.streams.render_metrics(&mut text);
        if let Some(peers) = self.shards.peers() {
            peers.render_metrics(&mut text);
        }
        crate::metrics::gauge(
            &mut text,
            "oneid_api_body_bytes",
            "Bytes of request bodies the node holds (read, parsed, or being applied).",
            self.budget.in_use() as u64,
        );
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        response
    }
}

fn backup_error(error: BackupError) -> ApiError {
    let message = error.to_string();
    match error {
        BackupError::InvalidDir(_) => ApiError::field(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidField,
            "dir",
            message,
        ),
        BackupError::Forbidden => {
            ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
        }
        BackupError::Busy => ApiError::new(StatusCode::CONFLICT, ErrorCode::Busy, message),
        BackupError::ShuttingDown => ApiError::unavailable(message),
        BackupError::Failed(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        ),
    }
}

/// The rules document `GET` and `PUT /v1/rules` answer: the rules with their version.
fn rules_answer(rules: &Rules, version: u64) -> Response<Full<Bytes>> {
    let doc = RulesDoc {
        version: Some(version),
        ..rules.to_doc()
    };
    json(StatusCode::OK, &doc)
}

/// `GET /v1/openapi.json`: the API's description, generated once from the protocol's types
/// (the same document the repository commits as `api/openapi.json`).
fn openapi() -> Response<Full<Bytes>> {
    static DOCUMENT: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(|| Bytes::from(oneid_protocol::openapi::document_text()));
    let mut response = Response::new(Full::new(text.clone()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Reads a JSON request document as the API's document describes it (see
/// `oneid_protocol::strict`): a field its type does not have, one missing or of the wrong JSON
/// type is 400 `bad_request` naming it, and anything else that is not `what` is too.
fn strict_body<T: serde::de::DeserializeOwned + oneid_protocol::strict::JsonSchema>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    oneid_protocol::strict::from_json(body).map_err(|e| {
        let message = format!("the body must be {what}: {}", e.message);
        match &e.field {
            Some(field) => ApiError::field(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                field,
                message,
            ),
            None => ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message),
        }
    })
}

fn merge_chain_too_long(oneid: OneId) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        format!("profile {oneid} resolves through more than {MERGE_CHAIN_MAX} merges"),
    )
}

/// A ledger entry as the API shows it: a merge's entries name the other profile.
fn ledger_entry_doc(r: LedgerRecord) -> LedgerEntryDoc {
    let peer = r.peer.map(|peer| peer.to_string());
    let (from, into) = match r.kind {
        LedgerKind::MergeOut => (None, peer),
        _ => (peer, None),
    };
    LedgerEntryDoc {
        event_id: r.event_id,
        kind: r.kind.as_str().to_string(),
        points: r.points,
        balance_after: r.balance_after,
        at: r.at.to_string(),
        reason: r.reason,
        shortfall: r.shortfall,
        from,
        into,
        expires_at: r.expires_at.map(|at| at.to_string()),
    }
}

/// A merge as `GET /v1/profiles/{oneid}/merges` shows it.
fn merge_doc(record: MergeRecord) -> MergeDoc {
    MergeDoc {
        merge_id: record.plan.merge.to_string(),
        event_id: record.plan.event_id().map(str::to_string),
        from: record.losers.iter().map(|l| l.oneid.to_string()).collect(),
        into: record.survivor.to_string(),
        at: record.at.to_string(),
        policy_version: record.plan.rules_version,
        dropped: DroppedDoc {
            tags: record.dropped.tags,
            attributes: record.dropped.attributes,
            channels: record.dropped.channels,
        },
        twin_orders: record.twins,
    }
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
}

/// A query string's parameters.
fn params(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// The `consistency` parameter of a read: linearizable unless `stale`.
fn consistency(params: &[(String, String)]) -> Result<Consistency, ApiError> {
    match params.iter().find(|(k, _)| k == "consistency") {
        None => Ok(Consistency::Linearizable),
        Some((_, v)) if v == "linearizable" => Ok(Consistency::Linearizable),
        Some((_, v)) if v == "stale" => Ok(Consistency::Stale),
        Some((_, v)) => Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidField,
            "consistency",
            format!("consistency must be linearizable or stale, found {v:?}"),
        )),
    }
}

/// A stale read says which applied index of its shard's replica served it.
fn stamped(
    mut response: Response<Full<Bytes>>,
    consistency: Consistency,
    applied: u64,
) -> Response<Full<Bytes>> {
    if consistency == Consistency::Stale {
        response.headers_mut().insert(
            "x-oneid-applied-index",
            HeaderValue::from_str(&applied.to_string()).expect("digits"),
        );
    }
    response
}

fn method_not_allowed(method: &Method, path: &str, endpoint: Endpoint) -> ApiError {
    let allowed: Vec<&str> = endpoint.methods().iter().map(Method::as_str).collect();
    let mut error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        format!("{path} answers {}, not {method}", allowed.join(", ")),
    );
    error.allow = Some(allowed.join(", "));
    error
}

#[cfg(test)]
mod tests {
    use super::Endpoint;
    use hyper::Method;

    /// Every operation of the OpenAPI document is a route of the server with that method, and
    /// every route and method of the server is in the document.
    #[test]
    fn the_openapi_document_lists_exactly_the_routes_the_server_answers() {
        let document = oneid_protocol::openapi::document();
        let mut documented = Vec::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
            let (endpoint, _) = Endpoint::of(&segments).unwrap_or_else(|| panic!("{path}"));
            for method in item.as_object().unwrap().keys() {
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                assert!(endpoint.methods().contains(&method), "{method} {path}");
                documented.push((endpoint, method));
            }
        }
        use Endpoint::*;
        let every = [
            Events,
            Lookup,
            Profile,
            Ledger,
            Merges,
            Rules,
            Segments,
            Segment,
            Members,
            Stream,
            Cluster,
            Backup,
            IdentityAudit,
            Health,
            Metrics,
            OpenApi,
        ];
        // No wildcard: a new endpoint fails to compile here until it is listed above.
        for endpoint in every {
            match endpoint {
                Events | Lookup | Profile | Ledger | Merges | Rules | Segments | Segment
                | Members | Stream | Cluster | Backup | IdentityAudit | Health | Metrics
                | OpenApi => {}
            }
        }
        let served: usize = every.iter().map(|endpoint| endpoint.methods().len()).sum();
        assert_eq!(documented.len(), served, "{documented:?}");
    }
}
