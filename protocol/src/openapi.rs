//! The OpenAPI 3.1 document of the HTTP API, generated from the types of this crate.
//!
//! The schemas come from the same serde types the node writes and the client reads (through
//! `schemars`); the routes, their parameters and every status and error code each route can
//! answer are listed here. The document is committed (`api/openapi.json`), served by every
//! node at `GET /v1/openapi.json`, and a test fails when the two differ: regenerate it with
//! `ONEID_BLESS=1 cargo test -p oneid-protocol openapi`.

use crate::api::{
    BackupManifest, BackupRequest, ClusterView, ErrorBody, EventsResponse, Health, IdentityAudit,
    LedgerPage, MergesDoc, ProfileDoc, EVENTS_PER_REQUEST_MAX, LEDGER_PAGE_DEFAULT,
    LEDGER_PAGE_MAX,
};
use crate::rules::RulesDoc;
use crate::segments::{
    MembersPage, SegmentChange, SegmentDoc, SegmentList, SegmentPut, SnapshotEnd,
    MEMBERS_PAGE_DEFAULT, MEMBERS_PAGE_MAX,
};
use crate::wire::NewEvent;
use crate::ErrorCode;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

/// One route and method: what it takes and every answer it can give.
struct Operation {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    parameters: Vec<Value>,
    body: Option<Value>,
    /// Success statuses, each with its description and content (if any).
    answers: Vec<(u16, &'static str, Option<Value>)>,
    /// Error statuses, each with the codes answered with it.
    errors: Vec<(u16, Vec<ErrorCode>)>,
}

/// The document, as JSON (keys sorted, so it is byte-stable).
pub fn document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|settings| settings.definitions_path = "/components/schemas".into())
        .into_generator();
    let mut paths = Map::new();
    for op in operations(&mut generator) {
        let entry = paths
            .entry(op.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("a path item is an object");
        entry.insert(op.method.to_string(), operation(&mut generator, op));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "OneID",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP API of a OneID node: events, profiles, ledgers, rules, segments and their membership streams, the cluster's view, backups, health and metrics. Every node serves every route. A request refused as a whole is answered with an `ErrorBody` whose `code` says what to do (see the README's error-code table); events refused one by one are listed in the 200 answer of `POST /v1/events`. A path not listed here is answered 404 `no_route`, and a method a listed path does not have 405 `method_not_allowed` (with `Allow`)."
        },
        "paths": paths,
        "components": {"schemas": generator.take_definitions(true)},
    })
}

/// The document as the node serves it and the repository commits it.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).expect("the document serializes");
    text.push('\n');
    text
}

/// The reads of one shard's replica: with `consistency=stale`, their answer says at which
/// applied index of that replica it was read.
const STAMPED: [&str; 3] = ["getProfile", "lookupProfile", "getLedger"];

fn operation(generator: &mut SchemaGenerator, op: Operation) -> Value {
    let mut responses = Map::new();
    for (status, description, content) in op.answers {
        let mut answer = json!({ "description": description });
        if let Some(content) = content {
            answer["content"] = content;
        }
        if STAMPED.contains(&op.id) {
            answer["headers"] = json!({"x-oneid-applied-index": {
                "description": "With `consistency=stale`: the applied index of the replica that answered.",
                "required": false,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }});
        }
        responses.insert(status.to_string(), answer);
    }
    let error = generator.subschema_for::<ErrorBody>();
    for (status, codes) in op.errors {
        let names: Vec<&str> = codes.iter().map(ErrorCode::as_str).collect();
        let description = names
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ");
        responses.insert(
            status.to_string(),
            json!({
                "description": description,
                "x-error-codes": names,
                "content": {"application/json": {"schema": error}},
            }),
        );
    }
    let mut value = json!({
        "operationId": op.id,
        "summary": op.summary,
        "responses": responses,
    });
    if !op.parameters.is_empty() {
        value["parameters"] = Value::Array(op.parameters);
    }
    if let Some(body) = op.body {
        value["requestBody"] = body;
    }
    value
}

fn content<T: JsonSchema>(generator: &mut SchemaGenerator) -> Option<Value> {
    Some(json!({"application/json": {"schema": generator.subschema_for::<T>()}}))
}

fn json_body<T: JsonSchema>(generator: &mut SchemaGenerator) -> Option<Value> {
    Some(json!({"required": true, "content": content::<T>(generator)}))
}

fn path_param(name: &str, description: &str, pattern: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description,
        "schema": {"type": "string", "pattern": pattern}})
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn consistency() -> Value {
    query(
        "consistency",
        "`linearizable` (the default): reflects every write answered before the request; `stale`: this node's replica at its applied index (given in `x-oneid-applied-index`).",
        json!({"type": "string", "enum": ["linearizable", "stale"]}),
    )
}

fn limit(default: usize, max: usize) -> Value {
    query(
        "limit",
        &format!("Entries per page: {default} if not given, at most {max} (more is clamped)."),
        json!({"type": "integer", "minimum": 1, "maximum": i64::MAX}),
    )
}

fn cursor(description: &str) -> Value {
    query("cursor", description, json!({"type": "string"}))
}

const ONEID: &str = "^o[0-9a-f]{16}$";
const SEGMENT: &str = "^[a-z0-9_-]{1,64}$";

use ErrorCode::*;

/// The errors of a route that reads a JSON body.
fn body_errors(more: &[ErrorCode]) -> Vec<(u16, Vec<ErrorCode>)> {
    let mut bad = vec![BadRequest];
    bad.extend_from_slice(more);
    vec![
        (400, bad),
        (408, vec![RequestTimeout]),
        (413, vec![PayloadTooLarge]),
        (503, vec![Unavailable]),
    ]
}

fn operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    let mut operations = profile_operations(g);
    operations.extend(history_operations(g));
    operations.extend(rules_operations(g));
    operations.extend(segment_operations(g));
    operations.extend(membership_operations(g));
    operations.extend(admin_operations(g));
    operations.extend(node_operations(g));
    operations
}

/// A profile's history: its ledger and its merges.
fn history_operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    let oneid = || path_param("oneid", "A OneID.", ONEID);
    vec![
        Operation {
            method: "get",
            path: "/v1/profiles/{oneid}/ledger",
            id: "getLedger",
            summary: "A profile's points ledger, newest first, a page at a time.",
            parameters: vec![
                oneid(),
                limit(LEDGER_PAGE_DEFAULT, LEDGER_PAGE_MAX),
                cursor("The previous page's `next`."),
                consistency(),
            ],
            body: None,
            answers: vec![(200, "A page of entries. A OneID merged into another answers its own history, ending with its `merge_out` entry, and `merged_into`.", content::<LedgerPage>(g))],
            errors: vec![(400, vec![InvalidField]), (404, vec![NotFound]), (503, vec![Unavailable])],
        },
        Operation {
            method: "get",
            path: "/v1/profiles/{oneid}/merges",
            id: "getMerges",
            summary: "The merges a profile survived, oldest first (at most 100, unpaged); for a OneID merged into another, those of the profile it resolves to.",
            parameters: vec![oneid(), consistency()],
            body: None,
            answers: vec![(200, "The merges.", content::<MergesDoc>(g))],
            errors: vec![(400, vec![InvalidField]), (404, vec![NotFound]), (503, vec![Unavailable])],
        },
    ]
}

/// Events and profiles.
fn profile_operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    let oneid = || path_param("oneid", "A OneID.", ONEID);
    vec![
        Operation {
            method: "post",
            path: "/v1/events",
            id: "sendEvents",
            summary: "Apply events (a JSON array, or NDJSON): answered when the accepted ones are durable.",
            parameters: vec![],
            body: Some(json!({
                "required": true,
                "description": format!("At most {EVENTS_PER_REQUEST_MAX} events and 16 MiB. An event that is not valid is rejected alone, inside the 200 answer."),
                "content": {
                    "application/json": {"schema": {"type": "array", "maxItems": EVENTS_PER_REQUEST_MAX, "items": g.subschema_for::<NewEvent>()}},
                    "application/x-ndjson": {"schema": {"type": "string", "description": "One event (a JSON object) per line."}},
                },
            })),
            answers: vec![(200, "One result per event, in request order: `applied`, `duplicate` (an event with this id applied before), or `rejected` with its `error` (whose code is one of the event parser's or an event's own: `invalid_event`, `invalid_field`, `missing_field`, `unknown_field`, `not_found`, `duplicate_order`, `unknown_order`, `refund_exceeds_order`, `insufficient_points`, `blocked_identity`, `too_many_profiles`, `attribute_limit`, `tag_limit`, `already_expired`, `unavailable`, `too_many_waves`, `internal`; releases before the identity policy also answered `identity_limit`, now a `not_linked` reason, and releases before merges `identity_conflict`, where an event now merges). An `applied` result lists in `not_linked` the identities the event did not link to its profile, each with its reason: `blocked_value`, `kind_limit`, `identity_limit`, `merge_disabled`, `taken` or `merge_limit`; in `merged` the OneIDs an event naming several customers merged into its `oneid`; and `merge_pending` when that merge was committed but not finished within the answer's wait (it finishes by itself).", content::<EventsResponse>(g))],
            errors: {
                let mut errors = body_errors(&[]);
                errors.insert(3, (415, vec![UnsupportedMediaType]));
                errors.push((500, vec![Internal]));
                errors
            },
        },
        Operation {
            method: "get",
            path: "/v1/profiles/{oneid}",
            id: "getProfile",
            summary: "A profile by its OneID.",
            parameters: vec![oneid(), consistency()],
            body: None,
            answers: vec![(200, "The profile; for a OneID merged into another, the profile it resolves to (following later merges too), with `resolved_from` naming the OneID asked for.", content::<ProfileDoc>(g))],
            errors: vec![(400, vec![InvalidField]), (404, vec![NotFound]), (503, vec![Unavailable])],
        },
        Operation {
            method: "get",
            path: "/v1/profiles/lookup",
            id: "lookupProfile",
            summary: "A profile by one of its identities.",
            parameters: vec![
                json!({"name": "kind", "in": "query", "required": true, "description": "The identity's kind (`[a-z0-9_]{1,32}`).", "schema": {"type": "string"}}),
                json!({"name": "value", "in": "query", "required": true, "description": "The identity's value.", "schema": {"type": "string"}}),
                consistency(),
            ],
            body: None,
            answers: vec![(200, "The profile.", content::<ProfileDoc>(g))],
            errors: vec![(400, vec![MissingField, InvalidField]), (404, vec![NotFound]), (503, vec![Unavailable])],
        },
    ]
}

/// The rules.
fn rules_operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    vec![
        Operation {
            method: "get",
            path: "/v1/rules",
            id: "getRules",
            summary: "The loyalty rules and retention.",
            parameters: vec![],
            body: None,
            answers: vec![(200, "The rules document.", content::<RulesDoc>(g))],
            errors: vec![(503, vec![Unavailable])],
        },
        Operation {
            method: "put",
            path: "/v1/rules",
            id: "putRules",
            summary: "Replace the rules document (each part left out takes its default).",
            parameters: vec![],
            body: json_body::<RulesDoc>(g),
            answers: vec![(200, "The rules as installed.", content::<RulesDoc>(g))],
            errors: body_errors(&[InvalidRules]),
        },
    ]
}

/// Segment definitions.
fn segment_operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    let segment = || path_param("name", "A segment's name.", SEGMENT);
    vec![
        Operation {
            method: "get",
            path: "/v1/segments",
            id: "listSegments",
            summary: "Every segment, by name.",
            parameters: vec![],
            body: None,
            answers: vec![(200, "The segments.", content::<SegmentList>(g))],
            errors: vec![(503, vec![Unavailable])],
        },
        Operation {
            method: "get",
            path: "/v1/segments/{name}",
            id: "getSegment",
            summary: "A segment's document.",
            parameters: vec![segment()],
            body: None,
            answers: vec![(200, "The segment.", content::<SegmentDoc>(g))],
            errors: vec![
                (400, vec![InvalidField]),
                (404, vec![NotFound]),
                (503, vec![Unavailable]),
            ],
        },
        Operation {
            method: "put",
            path: "/v1/segments/{name}",
            id: "putSegment",
            summary: "Create or replace a segment (an unchanged definition is answered as it is).",
            parameters: vec![segment()],
            body: json_body::<SegmentPut>(g),
            answers: vec![
                (200, "Replaced (or unchanged).", content::<SegmentDoc>(g)),
                (201, "Created.", content::<SegmentDoc>(g)),
            ],
            errors: {
                let mut errors = body_errors(&[InvalidField, InvalidPredicate]);
                errors.insert(3, (409, vec![SegmentLimit]));
                errors
            },
        },
        Operation {
            method: "delete",
            path: "/v1/segments/{name}",
            id: "deleteSegment",
            summary:
                "Delete a segment (again: installs the deletion again); its members get exits.",
            parameters: vec![segment()],
            body: None,
            answers: vec![(204, "Deleted.", None)],
            errors: vec![
                (400, vec![InvalidField]),
                (404, vec![NotFound]),
                (503, vec![Unavailable]),
            ],
        },
    ]
}

/// Segment members and streams.
fn membership_operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    let segment = || path_param("name", "A segment's name.", SEGMENT);
    vec![
        Operation {
            method: "get",
            path: "/v1/segments/{name}/members",
            id: "getMembers",
            summary: "A segment's members in OneID order, a page at a time.",
            parameters: vec![segment(), limit(MEMBERS_PAGE_DEFAULT, MEMBERS_PAGE_MAX), cursor("The previous page's `next`."), consistency()],
            body: None,
            answers: vec![(200, "A page of members.", content::<MembersPage>(g))],
            errors: vec![(400, vec![InvalidField, InvalidCursor]), (404, vec![NotFound]), (503, vec![Unavailable])],
        },
        Operation {
            method: "get",
            path: "/v1/segments/{name}/stream",
            id: "streamSegment",
            summary: "A segment's membership changes as Server-Sent Events (the stream does not end by itself).",
            parameters: vec![
                segment(),
                cursor("Resume after this change (a `cursor` or `id` the stream sent)."),
                query("snapshot", "Start with every current member (as `enter` events without `id`), then `event: snapshot_end`.", json!({"type": "boolean"})),
                json!({"name": "Last-Event-ID", "in": "header", "required": false, "description": "Resume after this cursor (wins over `cursor`).", "schema": {"type": "string"}}),
            ],
            body: None,
            answers: vec![(200, "Server-Sent Events: each change is `id: CURSOR` with `data:` a `SegmentChange`; `event: snapshot_end` has `data:` a `SnapshotEnd`; id-only events and `: heartbeat` comments keep a quiet stream moving.", Some(json!({
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "x-event-data": {"message": g.subschema_for::<SegmentChange>(), "snapshot_end": g.subschema_for::<SnapshotEnd>()},
                },
            })))],
            errors: vec![(400, vec![InvalidField, InvalidCursor]), (404, vec![NotFound]), (410, vec![CursorExpired]), (503, vec![Unavailable])],
        },
    ]
}

/// Backups and the identity audit.
fn admin_operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    vec![
        Operation {
            method: "post",
            path: "/v1/admin/backup",
            id: "backup",
            summary:
                "An online backup of this node into a directory under its `[storage] backup_root`.",
            parameters: vec![],
            body: json_body::<BackupRequest>(g),
            answers: vec![(200, "The backup's manifest.", content::<BackupManifest>(g))],
            errors: {
                let mut errors = body_errors(&[MissingField, InvalidField]);
                errors.insert(1, (403, vec![Forbidden]));
                errors.insert(3, (409, vec![Busy]));
                errors.insert(5, (500, vec![Internal]));
                errors
            },
        },
        Operation {
            method: "get",
            path: "/v1/admin/identity-audit",
            id: "identityAudit",
            summary: "What the identity policy in force refuses among what is stored: per kind, the profiles over its `max_per_profile` and the blocked values bound (a policy change never rewrites them). Every shard is read a bounded page at a time for at most 10 s; the counts are those of the `shards_done`.",
            parameters: vec![],
            body: None,
            answers: vec![(200, "The audit.", content::<IdentityAudit>(g))],
            errors: vec![],
        },
    ]
}

/// The cluster's view, health, metrics and this document.
fn node_operations(g: &mut SchemaGenerator) -> Vec<Operation> {
    vec![
        Operation {
            method: "get",
            path: "/v1/cluster",
            id: "getCluster",
            summary:
                "This node's view of the cluster: nodes, its own replicas, snapshots in flight.",
            parameters: vec![],
            body: None,
            answers: vec![(200, "The view.", content::<ClusterView>(g))],
            errors: vec![(503, vec![Unavailable])],
        },
        Operation {
            method: "get",
            path: "/healthz",
            id: "health",
            summary: "200 when every shard has a leader this node heard from within 2 s.",
            parameters: vec![],
            body: None,
            answers: vec![(200, "Healthy.", content::<Health>(g))],
            errors: vec![(503, vec![Unavailable])],
        },
        Operation {
            method: "get",
            path: "/metrics",
            id: "metrics",
            summary: "Prometheus text.",
            parameters: vec![],
            body: None,
            answers: vec![(
                200,
                "Every family with HELP and TYPE.",
                Some(json!({"text/plain": {"schema": {"type": "string"}}})),
            )],
            errors: vec![],
        },
        Operation {
            method: "get",
            path: "/v1/openapi.json",
            id: "openapi",
            summary: "This document.",
            parameters: vec![],
            body: None,
            answers: vec![(
                200,
                "The OpenAPI document.",
                Some(json!({"application/json": {"schema": {"type": "object"}}})),
            )],
            errors: vec![],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed document is what the code generates; `ONEID_BLESS=1` rewrites it.
    #[test]
    fn the_committed_openapi_document_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/openapi.json");
        let generated = document_text();
        if std::env::var_os("ONEID_BLESS").is_some() {
            std::fs::write(path, &generated).expect("writes api/openapi.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "api/openapi.json differs from the generated document: run `ONEID_BLESS=1 cargo test -p oneid-protocol openapi` and commit it"
        );
    }

    #[test]
    fn every_error_code_but_the_routing_ones_is_answered_somewhere() {
        let text = document_text();
        for code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(
                text.contains(&format!("`{name}`")),
                "{name} is in no answer of the document"
            );
        }
    }
}
