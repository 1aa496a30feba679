//! The HTTP API (hyper 1 on its own tokio runtime; the shard actors run on actix arbiters).
//!
//! Limits: at most [`CONNECTIONS_MAX`] connections (past it, accepting waits: the kernel's
//! backlog holds the rest), bodies of at most `REQUEST_BODY_BYTES_MAX`, at most
//! `EVENTS_PER_REQUEST_MAX` events per request. A body over the limit is read and discarded up
//! to [`DISCARD_BYTES_MAX`] so that the client, still sending, reads the 413, then the
//! connection is closed.
//!
//! `POST /v1/admin/backup` copies a snapshot on a blocking thread of this runtime, one backup
//! at a time (see `backup`).

use crate::backup::{BackupError, Backups};
use crate::command::Command;
use crate::metrics::{Metrics, Route};
use crate::router::Router;
use crate::shard::{Query, QueryReply, ShardError};
use crate::storage::StateReader;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use oneid_protocol::api::{
    ClusterView, ErrorBody, LedgerEntryDoc, LedgerPage, NodeView, ShardView,
    EVENTS_PER_REQUEST_MAX, LEDGER_PAGE_DEFAULT, LEDGER_PAGE_MAX, REQUEST_BODY_BYTES_MAX,
};
use oneid_protocol::event::{event_id_of, Event, EventError};
use oneid_protocol::ids::{Identity, OneId, ShardId};
use oneid_protocol::num::Millis;
use oneid_protocol::rules::RulesDoc;
use oneid_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most connections served at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// Most bytes of an oversized body read (and dropped) before answering 413 and closing.
pub const DISCARD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long a graceful shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

pub struct Api {
    pub router: Router,
    /// Profile, identity and ledger reads, straight from storage.
    pub reader: StateReader,
    pub metrics: Arc<Metrics>,
    pub node_id: u64,
    pub nodes: Vec<NodeView>,
    pub shutting_down: AtomicBool,
    /// Online backups, one at a time.
    pub backups: Arc<Backups>,
}

/// A request refused as a whole.
pub struct ApiError {
    status: StatusCode,
    error: EventError,
    /// Close the connection after answering (the body was not fully read).
    close: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: EventError::new(code, message),
            close: false,
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
    response
}

/// Serves the API on `listener` until `shutdown` resolves, then lets requests in flight
/// finish (up to [`SHUTDOWN_GRACE`]).
pub async fn serve(
    api: Arc<Api>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let api = Arc::clone(&api);
        let service = service_fn(move |request| {
            let api = Arc::clone(&api);
            async move { Ok::<_, std::convert::Infallible>(api.handle(request).await) }
        });
        let connection = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    api.shutting_down.store(true, Ordering::SeqCst);
    // A backup in flight stops at its next batch rather than holding up the shutdown.
    api.backups.cancel();
    tracing::info!("stopped accepting; finishing requests in flight");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the grace period");
    }
}

impl Api {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (route, reply) = match (&method, segments.as_slice()) {
            (&Method::POST, ["v1", "events"]) => (Route::Events, self.post_events(request).await),
            (&Method::GET, ["v1", "profiles", "lookup"]) => {
                (Route::Lookup, self.lookup(request.uri().query()).await)
            }
            (&Method::GET, ["v1", "profiles", oneid]) => {
                (Route::Profile, self.get_profile(oneid).await)
            }
            (&Method::GET, ["v1", "profiles", oneid, "ledger"]) => (
                Route::Ledger,
                self.ledger(oneid, request.uri().query()).await,
            ),
            (&Method::GET, ["v1", "rules"]) => (Route::Rules, self.get_rules().await),
            (&Method::PUT, ["v1", "rules"]) => (Route::Rules, self.put_rules(request).await),
            (&Method::GET, ["v1", "cluster"]) => (
                Route::Cluster,
                self.cluster().await.map(|view| json(StatusCode::OK, &view)),
            ),
            (&Method::POST, ["v1", "admin", "backup"]) => {
                (Route::Admin, self.backup(request).await)
            }
            (&Method::GET, ["healthz"]) => (Route::Health, self.healthz().await),
            (&Method::GET, ["metrics"]) => (Route::Metrics, Ok(self.metrics_text())),
            _ => (
                Route::Other,
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NoRoute,
                    format!("no route {method} {path}"),
                )),
            ),
        };
        let response = reply.unwrap_or_else(error_response);
        self.metrics
            .request(route, response.status().as_u16(), started.elapsed());
        response
    }

    async fn post_events(&self, request: Request<Incoming>) -> Reply {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let received = Millis::now();
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let ndjson = match mime.as_str() {
            "application/x-ndjson" | "application/ndjson" => true,
            "application/json" | "" => false,
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    ErrorCode::UnsupportedMediaType,
                    format!("send application/json or application/x-ndjson, not {other}"),
                ));
            }
        };
        let body = read_body(request).await?;
        let too_many = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("at most {EVENTS_PER_REQUEST_MAX} events per request"),
            )
        };
        // Counted before (NDJSON) or while (JSON) the events are parsed, so a body of millions
        // of tiny elements is refused without allocating them.
        let raws: Vec<Result<Box<RawValue>, String>> = if ndjson {
            let lines: Vec<(usize, &[u8])> = body
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
                .collect();
            if lines.len() > EVENTS_PER_REQUEST_MAX {
                return Err(too_many());
            }
            lines
                .into_iter()
                .map(|(n, line)| {
                    serde_json::from_slice::<Box<RawValue>>(line)
                        .map_err(|e| format!("line {} is not JSON: {e}", n + 1))
                })
                .collect()
        } else {
            let mut deserializer = serde_json::Deserializer::from_slice(&body);
            let events = serde::Deserializer::deserialize_seq(&mut deserializer, BoundedEvents)
                .and_then(|events| deserializer.end().map(|()| events))
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadRequest,
                        format!("the body must be a JSON array of events: {e}"),
                    )
                })?;
            events.ok_or_else(too_many)?.into_iter().map(Ok).collect()
        };
        let events = raws
            .into_iter()
            .map(|raw| match raw {
                Ok(raw) => Event::parse(&raw, received).map_err(|error| (event_id_of(&raw), error)),
                Err(message) => Err((
                    String::new(),
                    EventError::new(ErrorCode::InvalidEvent, message),
                )),
            })
            .collect();
        // Detached from the connection: a client that hangs up must not cancel the binds and
        // links that follow the apply of events that are already durable.
        let router = self.router.clone();
        let response = tokio::spawn(async move { router.ingest(events).await })
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    format!("ingest failed: {e}"),
                )
            })?;
        Ok(json(StatusCode::OK, &response))
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

    async fn get_profile(&self, oneid: &str) -> Reply {
        let oneid = self.parse_oneid(oneid)?;
        let profile = self
            .reader
            .profile(oneid)
            .ok_or_else(|| not_found(format!("profile {oneid} does not exist")))?;
        Ok(json(StatusCode::OK, &profile.to_doc()))
    }

    async fn lookup(&self, query: Option<&str>) -> Reply {
        let params: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
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
        let bound = self.reader.identity(&identity);
        let oneid = bound.ok_or_else(|| {
            not_found(format!(
                "no profile has identity {}={:?}",
                identity.kind, identity.value
            ))
        })?;
        let profile = self
            .reader
            .profile(oneid)
            .ok_or_else(|| not_found(format!("profile {oneid} does not exist")))?;
        Ok(json(StatusCode::OK, &profile.to_doc()))
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
        let mut entries = self
            .reader
            .ledger(oneid, limit + 1, before)
            .ok_or_else(|| not_found(format!("profile {oneid} does not exist")))?;
        let next = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|(seq, _)| format!("{seq:x}"))
        } else {
            None
        };
        let entries = entries
            .into_iter()
            .map(|(_, r)| LedgerEntryDoc {
                event_id: r.event_id,
                kind: r.kind.as_str().to_string(),
                points: r.points,
                balance_after: r.balance_after,
                at: r.at.to_string(),
                reason: r.reason,
                shortfall: r.shortfall,
            })
            .collect();
        Ok(json(StatusCode::OK, &LedgerPage { entries, next }))
    }

    async fn get_rules(&self) -> Reply {
        match self.router.shards.get().expect("started")[0]
            .send(Query::Rules)
            .await
        {
            Ok(QueryReply::Rules(rules)) => Ok(json(StatusCode::OK, &rules.to_doc())),
            _ => Err(ApiError::unavailable("shard 0 did not answer")),
        }
    }

    async fn put_rules(&self, request: Request<Incoming>) -> Reply {
        let body = read_body(request).await?;
        let doc: RulesDoc = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("the body must be a rules document: {e}"),
            )
        })?;
        let rules = doc.validate().map_err(|e| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRules,
                &e.field,
                e.to_string(),
            )
        })?;
        self.router
            .broadcast(Command::SetRules(Box::new(rules.clone())))
            .await?;
        Ok(json(StatusCode::OK, &rules.to_doc()))
    }

    /// `POST /v1/admin/backup` `{"dir": "/absolute/path"}`: answers the manifest.
    async fn backup(&self, request: Request<Incoming>) -> Reply {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct BackupRequest {
            dir: Option<String>,
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let body = read_body(request).await?;
        let request: BackupRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("the body must be {{\"dir\": \"/absolute/path\"}}: {e}"),
            )
        })?;
        let dir = PathBuf::from(request.dir.ok_or_else(|| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                ErrorCode::MissingField,
                "dir",
                "dir (the backup's directory on the node's machine) is required",
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

    async fn shard_views(&self) -> Result<Vec<ShardView>, ApiError> {
        let shards = self.router.shards.get().expect("started");
        let answers =
            futures::future::join_all(shards.iter().map(|addr| addr.send(Query::Status))).await;
        answers
            .into_iter()
            .enumerate()
            .map(|(i, answer)| match answer {
                Ok(QueryReply::Status(view)) => Ok(view),
                _ => Err(ApiError::unavailable(format!(
                    "shard {} did not answer",
                    ShardId(i as u32)
                ))),
            })
            .collect()
    }

    async fn cluster(&self) -> Result<ClusterView, ApiError> {
        Ok(ClusterView {
            node: self.node_id,
            nodes: self.nodes.clone(),
            shards: self.shard_views().await?,
        })
    }

    async fn healthz(&self) -> Reply {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let views = self.shard_views().await?;
        let leaderless: Vec<u32> = views
            .iter()
            .filter(|v| v.leader.is_none())
            .map(|v| v.id)
            .collect();
        if !leaderless.is_empty() {
            return Err(ApiError::unavailable(format!(
                "shards without a leader: {leaderless:?}"
            )));
        }
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "shards": views.len()}),
        ))
    }

    fn metrics_text(&self) -> Response<Full<Bytes>> {
        let mut text = self.metrics.render();
        self.reader.storage().render_gauges(&mut text);
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
        BackupError::Busy => ApiError::new(StatusCode::CONFLICT, ErrorCode::Busy, message),
        BackupError::ShuttingDown => ApiError::unavailable(message),
        BackupError::Failed(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        ),
    }
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
}

/// Reads a body of at most `REQUEST_BODY_BYTES_MAX`. Past it, reads and drops up to
/// `DISCARD_BYTES_MAX` so the client gets to read the 413, which closes the connection.
async fn read_body(request: Request<Incoming>) -> Result<Vec<u8>, ApiError> {
    let mut body = request.into_body();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("reading the body failed: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= REQUEST_BODY_BYTES_MAX {
            bytes.extend_from_slice(&data);
        } else if seen > DISCARD_BYTES_MAX {
            break;
        }
    }
    if seen > REQUEST_BODY_BYTES_MAX {
        let mut error = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("the body is over {REQUEST_BODY_BYTES_MAX} bytes"),
        );
        error.close = true;
        return Err(error);
    }
    Ok(bytes)
}

/// Reads a JSON array of raw events, stopping (with `None`) past `EVENTS_PER_REQUEST_MAX`.
struct BoundedEvents;

impl<'de> serde::de::Visitor<'de> for BoundedEvents {
    type Value = Option<Vec<Box<RawValue>>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events = Vec::new();
        while let Some(event) = seq.next_element::<Box<RawValue>>()? {
            if events.len() == EVENTS_PER_REQUEST_MAX {
                // Skip the rest without keeping it: the answer is 413 either way.
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                return Ok(None);
            }
            events.push(event);
        }
        Ok(Some(events))
    }
}
