//! `/v1/segments`: definitions (through the registry shard, then installed on every shard),
//! documents (the definition, with sizes and backfill progress summed over the shards), the
//! members in pages, and the membership stream (handed to `streams`).

use super::{consistency, json, not_found, params, Api, ApiError, Body, Reply};
use crate::shards::{per_shard, Consistency};
use crate::storage::{Answer, Query};
use crate::streams::{Cursor, Start};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use oneid_protocol::event::EventError;
use oneid_protocol::ids::{OneId, ShardId};
use oneid_protocol::segments::{
    check_name, BackfillView, MembersPage, SegmentDoc, SegmentList, SegmentPut,
    MEMBERS_PAGE_DEFAULT, MEMBERS_PAGE_MAX,
};
use oneid_protocol::ErrorCode;
use oneid_state::command::{Command, Output, SegmentDefine, REGISTRY_SHARD};
use oneid_state::segments::SegmentRecord;
use std::collections::BTreeMap;
use std::convert::Infallible;

/// Marks a response whose body is a stream: its connection stops counting against the HTTP
/// connection limit (streams have their own) and is closed when the stream ends.
#[derive(Clone, Copy)]
pub struct Streaming;

/// The status an event error of a segment request is answered with.
fn status_of(error: &EventError) -> StatusCode {
    match error.code {
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::SegmentLimit => StatusCode::CONFLICT,
        ErrorCode::CursorExpired => StatusCode::GONE,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn refused(error: EventError) -> ApiError {
    ApiError {
        status: status_of(&error),
        error,
        close: false,
        allow: None,
    }
}

impl Api {
    /// `PUT /v1/segments/{name}`: 201 with the document when created, 200 when replaced.
    pub(super) async fn put_segment(&self, name: &str, request: Request<Incoming>) -> Reply {
        check_name(name).map_err(refused)?;
        let (body, _held) = self.read_body(request).await?;
        let put: SegmentPut =
            super::strict_body(&body, r#"{"predicate": "...", "description": "..."}"#)?;
        let spec = put.validate(name).map_err(refused)?;
        let define = SegmentDefine {
            name: spec.name,
            predicate: Some(spec.predicate.source().to_string()),
            description: spec.description,
        };
        let created = self.define(define).await?;
        let doc = self.segment_doc(name).await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(json(status, &doc))
    }

    /// `DELETE /v1/segments/{name}`: 204; its members' exits follow in the background.
    pub(super) async fn delete_segment(&self, name: &str) -> Reply {
        check_name(name).map_err(refused)?;
        let define = SegmentDefine {
            name: name.to_string(),
            predicate: None,
            description: String::new(),
        };
        self.define(define).await?;
        let mut response = Response::new(http_body_util::Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        Ok(response)
    }

    /// Has the registry shard order a definition, then installs it on every shard. Answers
    /// whether it created the segment. A shard that cannot install it now makes this a 503:
    /// the same request again installs it (an unchanged definition keeps its version).
    async fn define(&self, define: SegmentDefine) -> Result<bool, ApiError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let registry = ShardId(REGISTRY_SHARD);
        let output = self
            .shards
            .propose(registry, Command::DefineSegment(define))
            .await?;
        let Output::Segment(answer) = output else {
            panic!("a segment definition answered {output:?}")
        };
        let (def, created) = answer.map_err(refused)?;
        let what = format!("segment {} is defined", def.name);
        self.install_elsewhere(Command::InstallSegment(def), &what)
            .await?;
        Ok(created)
    }

    /// Reads every shard's records (of one segment, or all), linearizably.
    async fn segment_records(
        &self,
        name: Option<&str>,
    ) -> Result<BTreeMap<ShardId, Vec<SegmentRecord>>, ApiError> {
        let reads = (0..self.shards.n_shards).map(|s| {
            let query = Query::Segments {
                shard: ShardId(s),
                name: name.map(str::to_string),
            };
            (
                ShardId(s),
                self.read_state(ShardId(s), query, Consistency::Linearizable),
            )
        });
        let mut records = BTreeMap::new();
        for (shard, answer) in per_shard(reads).await {
            let Answer::Segments(list) = answer?.0 else {
                panic!("a segments read answered something else")
            };
            records.insert(shard, list);
        }
        Ok(records)
    }

    /// The documents of the live segments (the one named, or all), in name order.
    async fn segment_docs(&self, name: Option<&str>) -> Result<Vec<SegmentDoc>, ApiError> {
        let mut records = self.segment_records(name).await?;
        let registry = records
            .remove(&ShardId(REGISTRY_SHARD))
            .expect("the registry shard answered");
        let docs = registry
            .iter()
            .filter(|record| !record.def.deleted)
            .map(|record| {
                let others = records
                    .values()
                    .map(|list| list.iter().find(|other| other.def.name == record.def.name));
                doc_of(record, others)
            })
            .collect();
        Ok(docs)
    }

    async fn segment_doc(&self, name: &str) -> Result<SegmentDoc, ApiError> {
        self.segment_docs(Some(name))
            .await?
            .pop()
            .ok_or_else(|| not_found(format!("segment {name} does not exist")))
    }

    /// `GET /v1/segments/{name}`.
    pub(super) async fn get_segment(&self, name: &str) -> Reply {
        check_name(name).map_err(refused)?;
        Ok(json(StatusCode::OK, &self.segment_doc(name).await?))
    }

    /// `GET /v1/segments`.
    pub(super) async fn list_segments(&self) -> Reply {
        let segments = self.segment_docs(None).await?;
        Ok(json(StatusCode::OK, &SegmentList { segments }))
    }

    /// `GET /v1/segments/{name}/members?limit=&cursor=`: members in OneID order (so shard by
    /// shard); `next` resumes after the last one.
    pub(super) async fn members(&self, name: &str, query: Option<&str>) -> Reply {
        check_name(name).map_err(refused)?;
        let params = params(query);
        let limit = page_limit(&params)?;
        let after = match params.iter().find(|(k, _)| k == "cursor") {
            None => None,
            Some((_, text)) => Some(text.parse::<OneId>().map_err(|()| {
                refused(EventError::field(
                    ErrorCode::InvalidCursor,
                    "cursor",
                    format!("{text:?} is not a members cursor"),
                ))
            })?),
        };
        let consistency = consistency(&params)?;
        self.segment_doc(name).await?;
        let mut members = Vec::with_capacity(limit);
        let first = after.map_or(0, |oneid| oneid.shard().0);
        let mut after = after;
        for shard in (first..self.shards.n_shards).map(ShardId) {
            let query = Query::Members {
                shard,
                segment: name.to_string(),
                after: after.filter(|oneid| oneid.shard() == shard),
                limit: limit - members.len() + 1,
            };
            let Answer::Members(page) = self.read_state(shard, query, consistency).await?.0 else {
                panic!("a members read answered something else")
            };
            members.extend(page);
            if members.len() > limit {
                break;
            }
            after = None;
        }
        let next = if members.len() > limit {
            members.truncate(limit);
            members.last().map(OneId::to_string)
        } else {
            None
        };
        let members = members.iter().map(OneId::to_string).collect();
        Ok(json(StatusCode::OK, &MembersPage { members, next }))
    }

    /// `GET /v1/segments/{name}/stream`: Server-Sent Events (see `streams`).
    pub(super) async fn stream(
        &self,
        name: &str,
        request: &Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        check_name(name).map_err(refused)?;
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::unavailable("the node is shutting down"));
        }
        let params = params(request.uri().query());
        let n_shards = self.shards.n_shards;
        let last_event_id = request
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let given = last_event_id.or_else(|| {
            params
                .iter()
                .find(|(k, _)| k == "cursor")
                .map(|(_, v)| v.clone())
        });
        let snapshot = match params.iter().find(|(k, _)| k == "snapshot") {
            None => false,
            Some((_, v)) if v == "true" => true,
            Some((_, v)) if v == "false" => false,
            Some((_, v)) => {
                return Err(ApiError::field(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidField,
                    "snapshot",
                    format!("snapshot must be true or false, found {v:?}"),
                ))
            }
        };
        let start = match given {
            Some(text) => {
                Start::Cursor(Cursor::decode(&text, n_shards, self.streams.scope).map_err(refused)?)
            }
            None if snapshot => Start::Snapshot,
            None => Start::Tail(self.streams.tail_cursor().await.map_err(refused)?),
        };
        let doc = self.segment_doc(name).await?;
        let frames = self
            .streams
            .open(doc.name, doc.generation, start)
            .await
            .map_err(refused)?;
        let body = futures::stream::unfold(frames, |mut frames| async move {
            let frame = frames.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(frame)), frames))
        });
        let mut response = Response::new(StreamBody::new(body).boxed());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        response.extensions_mut().insert(Streaming);
        Ok(response)
    }
}

/// The `limit` of a page: 1 or more (above [`MEMBERS_PAGE_MAX`] is clamped).
fn page_limit(params: &[(String, String)]) -> Result<usize, ApiError> {
    let Some((_, value)) = params.iter().find(|(k, _)| k == "limit") else {
        return Ok(MEMBERS_PAGE_DEFAULT);
    };
    let limit =
        value
            .parse::<usize>()
            .ok()
            .filter(|l| *l >= 1)
            .ok_or_else(|| {
                ApiError::field(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidField,
            "limit",
            format!("limit must be a whole number from 1 to {MEMBERS_PAGE_MAX}, found {value:?}"),
        )
            })?;
    Ok(limit.min(MEMBERS_PAGE_MAX))
}

/// A segment's document: the registry's definition, sizes and progress over every shard (a
/// shard that has not installed this version yet counts as not started).
fn doc_of<'a>(
    registry: &SegmentRecord,
    others: impl Iterator<Item = Option<&'a SegmentRecord>>,
) -> SegmentDoc {
    let def = &registry.def;
    let (mut size, mut done, mut total, mut running) = (
        registry.size,
        registry.profiles_done(),
        registry.profiles_total,
        !registry.backfill_done(),
    );
    for other in others {
        match other {
            Some(record) if record.def.version == def.version => {
                size += record.size;
                done += record.profiles_done();
                total += record.profiles_total;
                running |= !record.backfill_done();
            }
            Some(record) => {
                size += record.size;
                running = true;
            }
            None => running = true,
        }
    }
    SegmentDoc {
        name: def.name.clone(),
        predicate: def.predicate.clone(),
        description: def.description.clone(),
        generation: def.generation,
        created_at: def.created_at.to_string(),
        updated_at: def.updated_at.to_string(),
        size,
        backfill: BackfillView {
            state: if running { "running" } else { "done" }.to_string(),
            profiles_done: done,
            profiles_total: total,
        },
    }
}
