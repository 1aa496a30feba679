//! Bad input, request by request: each is answered with its exact status, code and field, the
//! node stays healthy, and nothing changes that should not.

use oneid_client::Client;
use oneid_protocol::api::{ErrorBody, EventResult, EventStatus, ProfileDoc};
use oneid_protocol::ids::OneId;
use oneid_protocol::ErrorCode;
use oneid_tests::{rules_json, NodeOptions, TestNode};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SHARDS: u32 = 4;

/// RFC 3339 text (UTC, whole seconds) of a Unix time, as the node writes timestamps: the
/// protocol's own formatting.
fn rfc3339(secs: i64) -> String {
    oneid_protocol::num::Millis(secs * 1000).to_string()
}

/// `minutes` minutes after a base two days ago.
fn ts(minutes: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs() as i64;
    rfc3339(now - now % 60 - 2 * 86_400 + 60 * minutes)
}

fn shard_of(kind: &str, value: &str) -> u32 {
    oneid_tests::shard_of(kind, value, SHARDS)
}

/// A raw answer: status, head (lowercase) and body.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn parse(bytes: &[u8]) -> Raw {
        let split = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(bytes)));
        let head = String::from_utf8_lossy(&bytes[..split]).to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"));
        let mut body = bytes[split + 4..].to_vec();
        if let Some(length) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            assert!(body.len() >= length, "a short body in {head:?}");
            body.truncate(length);
        }
        Raw { status, head, body }
    }

    /// The error document: (status, code, field, message).
    fn error(&self) -> (u16, ErrorCode, Option<String>, String) {
        let body: ErrorBody = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answered a body that is not an error document ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        });
        (
            self.status,
            body.error.code,
            body.error.field,
            body.error.message,
        )
    }
}

/// One request by hand on its own connection (`Connection: close`), read to the end.
async fn raw(port: u16, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut bytes))
        .await
        .expect("an answer within 30 s")
        .expect("reading the answer");
    Raw::parse(&bytes)
}

async fn error_of(
    port: u16,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, ErrorCode, Option<String>, String) {
    raw(port, method, path, content_type, body).await.error()
}

/// Everything this battery checks did not change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    known: ProfileDoc,
    other: ProfileDoc,
    digests: Vec<String>,
    rules: Value,
}

/// A node with two profiles of known state: `known` (by phone, an order and an earn: balance
/// 150) and `other` (by email, an earn of 20).
struct Setup {
    node: TestNode,
    client: Client,
    phone: String,
    known: String,
    other: String,
}

impl Setup {
    async fn start() -> Setup {
        let node = TestNode::start(NodeOptions::quiet()).await;
        let client = node.client_once();
        let phone = "13800000042".to_string();
        let email = "other@example.com".to_string();
        let answer = client
            .send_events_json(&[
                json!({"event_id": "k-1", "type": "order", "identities": {"phone": phone},
                    "channel": "tmall", "order_id": "K1", "amount": "100.00", "ts": ts(1)}),
                json!({"event_id": "k-2", "type": "points_earn", "identities": {"phone": phone},
                    "points": 50, "reason": "welcome", "ts": ts(2)}),
                json!({"event_id": "o-1", "type": "points_earn", "identities": {"email": email},
                    "points": 20, "ts": ts(3)}),
            ])
            .await
            .unwrap();
        assert_eq!(answer.applied, 3, "{answer:?}");
        let known = answer.results[0].oneid.clone().unwrap();
        let other = answer.results[2].oneid.clone().unwrap();
        assert_ne!(known, other);
        let setup = Setup {
            node,
            client,
            phone,
            known,
            other,
        };
        let snapshot = setup.snapshot().await;
        assert_eq!(
            (
                snapshot.known.points.balance,
                snapshot.known.metrics.order_count,
                snapshot.known.version
            ),
            (150, 1, 2)
        );
        assert_eq!(snapshot.other.points.balance, 20);
        setup
    }

    async fn snapshot(&self) -> Snapshot {
        Snapshot {
            known: self.client.profile(&self.known).await.unwrap().unwrap(),
            other: self.client.profile(&self.other).await.unwrap().unwrap(),
            digests: self.node.settled_digests().await,
            rules: rules_json(&self.client).await.unwrap(),
        }
    }

    fn port(&self) -> u16 {
        self.node.port
    }

    async fn assert_healthy(&self) {
        let answer = raw(self.port(), "GET", "/healthz", None, b"").await;
        assert_eq!(answer.status, 200);
    }
}

/// Writes a body of `size` bytes in chunks from one task while this one reads the answer:
/// (the answer, bytes the writer got out, whether the node closed the connection after it).
async fn send_huge_body(port: u16, size: usize) -> (Raw, usize, bool) {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    );
    let sender = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await.unwrap();
        let mut chunk = vec![b' '; 64 * 1024];
        chunk[0] = b'[';
        let mut sent = 0usize;
        while sent < size {
            let n = chunk.len().min(size - sent);
            if writer.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            chunk[0] = b' ';
            sent += n;
        }
        // Dropping the write half would half-close the connection, which hyper takes as the
        // client going away: keep it open until the answer is read.
        (sent, writer)
    });
    let mut bytes = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) => return true,
                Ok(n) => bytes.extend_from_slice(&buffer[..n]),
                Err(_) => return !bytes.is_empty(),
            }
        }
    })
    .await
    .expect("the node answers and closes within a minute");
    let (sent, _writer) = sender.await.unwrap();
    (Raw::parse(&bytes), sent, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn bad_requests_are_refused_whole_and_change_nothing() {
    let setup = Setup::start().await;
    let port = setup.port();
    let before = setup.snapshot().await;
    let known = setup.known.clone();
    let strip =
        |(status, code, field, _): (u16, ErrorCode, Option<String>, String)| (status, code, field);
    let json_type = Some("application/json");
    let event = json!({"event_id": "w-1", "type": "points_earn", "identities": {"phone": setup.phone}, "points": 1});

    // The body is not JSON.
    assert_eq!(
        strip(error_of(port, "POST", "/v1/events", json_type, b"[{\"event_id\": ").await),
        (400, ErrorCode::BadRequest, None)
    );
    // NDJSON is read as JSON only with its content type; a JSON object is not an array.
    assert_eq!(
        strip(
            error_of(
                port,
                "POST",
                "/v1/events",
                json_type,
                event.to_string().as_bytes()
            )
            .await
        ),
        (400, ErrorCode::BadRequest, None)
    );
    assert_eq!(
        strip(error_of(port, "POST", "/v1/events", json_type, b"").await),
        (400, ErrorCode::BadRequest, None)
    );
    // Not JSON nor NDJSON.
    let body = format!("[{event}]");
    assert_eq!(
        strip(
            error_of(
                port,
                "POST",
                "/v1/events",
                Some("text/plain"),
                body.as_bytes()
            )
            .await
        ),
        (415, ErrorCode::UnsupportedMediaType, None)
    );
    assert_eq!(
        strip(
            error_of(
                port,
                "POST",
                "/v1/events",
                Some("application/x-www-form-urlencoded"),
                body.as_bytes()
            )
            .await
        ),
        (415, ErrorCode::UnsupportedMediaType, None)
    );
    // 10,001 events, each valid: none is applied.
    let many: Vec<Value> = (0..10_001)
        .map(|n| json!({"event_id": format!("m-{n}"), "type": "identify", "identities": {"phone": format!("1{n:010}")}}))
        .collect();
    let body = serde_json::to_vec(&many).unwrap();
    assert_eq!(
        strip(error_of(port, "POST", "/v1/events", json_type, &body).await),
        (413, ErrorCode::PayloadTooLarge, None)
    );
    let ndjson: String = many.iter().map(|e| format!("{e}\n")).collect();
    assert_eq!(
        strip(
            error_of(
                port,
                "POST",
                "/v1/events",
                Some("application/x-ndjson"),
                ndjson.as_bytes()
            )
            .await
        ),
        (413, ErrorCode::PayloadTooLarge, None)
    );
    assert_eq!(
        setup.client.lookup("phone", "10000000000").await.unwrap(),
        None,
        "no event of a refused batch is applied"
    );
    // 17 MiB, written by a client that keeps writing while it reads: it reads the 413, then
    // the node closes the connection.
    let (answer, sent, closed) = send_huge_body(port, 17 * 1024 * 1024).await;
    assert_eq!(
        strip(answer.error()),
        (413, ErrorCode::PayloadTooLarge, None),
        "{}",
        answer.head
    );
    assert!(
        answer.head.lines().any(|l| l == "connection: close"),
        "{}",
        answer.head
    );
    assert!(closed, "the node closes the connection after a 413");
    assert_eq!(sent, 17 * 1024 * 1024, "the whole body went out");

    // Routes: unknown ones, and known ones with a method they do not answer.
    for (method, path) in [
        ("GET", "/v1/nothing"),
        ("GET", "/"),
        ("GET", "/v1/profiles/o0000000000000001/ledger/extra"),
    ] {
        assert_eq!(
            strip(error_of(port, method, path, None, b"").await),
            (404, ErrorCode::NoRoute, None),
            "{method} {path}"
        );
    }
    for (method, path, allow) in [
        ("DELETE", "/v1/rules", "GET, PUT"),
        ("GET", "/v1/events", "POST"),
        ("POST", "/v1/profiles/lookup", "GET"),
        ("PUT", "/v1/profiles/o0000000000000001", "GET"),
        ("GET", "/v1/admin/backup", "POST"),
        ("POST", "/metrics", "GET"),
    ] {
        let answer = raw(port, method, path, None, b"").await;
        assert_eq!(
            strip(answer.error()),
            (405, ErrorCode::MethodNotAllowed, None),
            "{method} {path}"
        );
        assert!(
            answer
                .head
                .lines()
                .any(|l| l == format!("allow: {}", allow.to_ascii_lowercase())),
            "{method} {path}: {}",
            answer.head
        );
    }
    // Profiles and lookups.
    let field = |f: &str| Some(f.to_string());
    for path in [
        "/v1/profiles/not-a-oneid",
        "/v1/profiles/o00000000000000001",
        "/v1/profiles/O0000000000000001",
        "/v1/profiles/o000000000000000G",
        "/v1/profiles/not-a-oneid/ledger",
    ] {
        assert_eq!(
            strip(error_of(port, "GET", path, None, b"").await),
            (400, ErrorCode::InvalidField, field("oneid")),
            "{path}"
        );
    }
    for path in [
        "/v1/profiles/o0000000000999999",
        // A shard this cluster does not have.
        "/v1/profiles/o0fff000000000001",
        "/v1/profiles/o0000000000999999/ledger",
        "/v1/profiles/lookup?kind=phone&value=19999999999",
    ] {
        assert_eq!(
            strip(error_of(port, "GET", path, None, b"").await),
            (404, ErrorCode::NotFound, None),
            "{path}"
        );
    }
    assert_eq!(
        strip(error_of(port, "GET", "/v1/profiles/lookup?kind=phone", None, b"").await),
        (400, ErrorCode::MissingField, field("value"))
    );
    // Lookups check the identity as events do.
    let long_value = "9".repeat(257);
    for (query, name) in [
        ("kind=Phone&value=1", "kind"),
        ("kind=&value=1", "kind"),
        ("kind=ph%20one&value=1", "kind"),
        (&*format!("kind={}&value=1", "k".repeat(33)), "kind"),
        ("kind=phone&value=", "value"),
        (&*format!("kind=phone&value={long_value}"), "value"),
    ] {
        assert_eq!(
            strip(
                error_of(
                    port,
                    "GET",
                    &format!("/v1/profiles/lookup?{query}"),
                    None,
                    b""
                )
                .await
            ),
            (400, ErrorCode::InvalidField, field(name)),
            "{query}"
        );
    }
    assert_eq!(
        strip(
            error_of(
                port,
                "GET",
                &format!("/v1/profiles/lookup?value={}", setup.phone),
                None,
                b""
            )
            .await
        ),
        (400, ErrorCode::MissingField, field("kind"))
    );
    for (query, name) in [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("cursor=zz", "cursor"),
    ] {
        assert_eq!(
            strip(
                error_of(
                    port,
                    "GET",
                    &format!("/v1/profiles/{known}/ledger?{query}"),
                    None,
                    b""
                )
                .await
            ),
            (400, ErrorCode::InvalidField, field(name)),
            "{query}"
        );
    }

    // Read consistency: linearizable or stale, on every read route.
    for path in [
        format!("/v1/profiles/{known}?consistency=eventual"),
        format!(
            "/v1/profiles/lookup?kind=phone&value={}&consistency=",
            setup.phone
        ),
        format!("/v1/profiles/{known}/ledger?consistency=STALE"),
    ] {
        assert_eq!(
            strip(error_of(port, "GET", &path, None, b"").await),
            (400, ErrorCode::InvalidField, field("consistency")),
            "{path}"
        );
    }
    // A stale read names the applied index it was served at; a linearizable one does not.
    let stale = raw(
        port,
        "GET",
        &format!("/v1/profiles/{known}?consistency=stale"),
        None,
        b"",
    )
    .await;
    assert_eq!(stale.status, 200);
    let applied = setup.client.cluster().await.unwrap().shards
        [OneId::shard(known.parse().unwrap()).0 as usize]
        .applied_index;
    assert!(
        stale
            .head
            .contains(&format!("x-oneid-applied-index: {applied}\r\n")),
        "{}",
        stale.head
    );
    let linear = raw(port, "GET", &format!("/v1/profiles/{known}"), None, b"").await;
    assert_eq!((linear.status, linear.body.clone()), (200, stale.body));
    assert!(
        !linear.head.contains("x-oneid-applied-index"),
        "{}",
        linear.head
    );

    // Rules.
    let (status, code, rules_field, message) = error_of(
        port,
        "PUT",
        "/v1/rules",
        json_type,
        json!({"tag_rules": [{"tag": "a", "when": "points >\n and"}]})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(
        (status, code, rules_field),
        (400, ErrorCode::InvalidRules, field("tag_rules[0].when"))
    );
    assert!(message.contains("line 2"), "{message}");
    assert_eq!(
        strip(
            error_of(
                port,
                "PUT",
                "/v1/rules",
                json_type,
                json!({"tiers": {"levels": [{"name": "member", "min_spend": "10"},
                    {"name": "gold", "min_spend": "5000"}]}})
                .to_string()
                .as_bytes()
            )
            .await
        ),
        (
            400,
            ErrorCode::InvalidRules,
            field("tiers.levels[0].min_spend")
        )
    );
    for (retention, at_fault) in [
        (json!({"dedup_days": 0}), "retention.dedup_days"),
        (json!({"ledger_days": 36_501}), "retention.ledger_days"),
        (
            json!({"change_log_hours": 8_761}),
            "retention.change_log_hours",
        ),
        (
            json!({"change_log_entries_max": 0}),
            "retention.change_log_entries_max",
        ),
    ] {
        let body = json!({"retention": retention}).to_string();
        assert_eq!(
            strip(error_of(port, "PUT", "/v1/rules", json_type, body.as_bytes()).await),
            (400, ErrorCode::InvalidRules, field(at_fault))
        );
    }
    // Bodies that are not a rules document: cut short, a field the document does not have,
    // and an array where an object goes (serde alone would read a struct from an array of its
    // fields: "the default tiers"; found by Schemathesis in negative mode).
    for (body, at_fault) in [
        (&b"{\"points\": "[..], None),
        (
            br#"{"points": {"per_currency_unit": "1"}, "bonus": true}"#,
            field("bonus"),
        ),
        (br#"{"tiers": [null, null]}"#, field("tiers")),
    ] {
        assert_eq!(
            strip(error_of(port, "PUT", "/v1/rules", json_type, body).await),
            (400, ErrorCode::BadRequest, at_fault),
            "{}",
            String::from_utf8_lossy(body)
        );
    }

    setup.assert_healthy().await;
    let after = setup.snapshot().await;
    assert_eq!(after, before, "refused requests change nothing");
}

fn result_error(result: &EventResult) -> (EventStatus, Option<&str>, ErrorCode, Option<&str>) {
    let error = result
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("no error in {result:?}"));
    (
        result.status.clone(),
        result.oneid.as_deref(),
        error.code.clone(),
        error.field.as_deref(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn bad_events_are_rejected_alone() {
    let setup = Setup::start().await;
    let before = setup.snapshot().await;
    let known = setup.known.clone();
    let other = setup.other.clone();
    let phone = setup.phone.clone();
    let past = "2020-01-01T00:00:00Z";
    let long_id = "x".repeat(129);

    // (event, its result's event_id, code, field)
    let cases: Vec<(Value, &str, ErrorCode, Option<&str>)> = vec![
        (
            json!({"type": "points_earn", "oneid": known, "points": 1}),
            "",
            ErrorCode::MissingField,
            Some("event_id"),
        ),
        (
            json!({"event_id": long_id, "type": "points_earn", "oneid": known, "points": 1}),
            long_id.as_str(),
            ErrorCode::InvalidField,
            Some("event_id"),
        ),
        (
            json!({"event_id": "", "type": "points_earn", "oneid": known, "points": 1}),
            "",
            ErrorCode::InvalidField,
            Some("event_id"),
        ),
        (
            json!({"event_id": "b-type", "type": "teleport", "oneid": known}),
            "b-type",
            ErrorCode::InvalidField,
            Some("type"),
        ),
        (
            json!({"event_id": "b-notype", "oneid": known, "points": 1}),
            "b-notype",
            ErrorCode::MissingField,
            Some("type"),
        ),
        (
            json!({"event_id": "b-unknown", "type": "order", "oneid": known, "order_id": "U1",
                "amount": "1.00", "amout": "2.00"}),
            "b-unknown",
            ErrorCode::UnknownField,
            Some("amout"),
        ),
        (
            json!({"event_id": "b-amount-3", "type": "order", "oneid": known, "order_id": "U2",
                "amount": "1.001"}),
            "b-amount-3",
            ErrorCode::InvalidField,
            Some("amount"),
        ),
        (
            json!({"event_id": "b-amount-0", "type": "order", "oneid": known, "order_id": "U3",
                "amount": 0}),
            "b-amount-0",
            ErrorCode::InvalidField,
            Some("amount"),
        ),
        (
            json!({"event_id": "b-amount-neg", "type": "order", "oneid": known, "order_id": "U4",
                "amount": -5}),
            "b-amount-neg",
            ErrorCode::InvalidField,
            Some("amount"),
        ),
        (
            json!({"event_id": "b-amount-abc", "type": "order", "oneid": known, "order_id": "U5",
                "amount": "abc"}),
            "b-amount-abc",
            ErrorCode::InvalidField,
            Some("amount"),
        ),
        (
            json!({"event_id": "b-amount-none", "type": "order", "oneid": known, "order_id": "U6"}),
            "b-amount-none",
            ErrorCode::MissingField,
            Some("amount"),
        ),
        (
            json!({"event_id": "b-no-order-id", "type": "order", "oneid": known, "amount": "1.00"}),
            "b-no-order-id",
            ErrorCode::MissingField,
            Some("order_id"),
        ),
        (
            json!({"event_id": "b-dup-order", "type": "order", "identities": {"phone": phone},
                "order_id": "K1", "amount": "1.00"}),
            "b-dup-order",
            ErrorCode::DuplicateOrder,
            Some("order_id"),
        ),
        (
            json!({"event_id": "b-refund", "type": "refund", "identities": {"phone": phone},
                "order_id": "NOPE", "amount": "1.00"}),
            "b-refund",
            ErrorCode::UnknownOrder,
            Some("order_id"),
        ),
        (
            json!({"event_id": "b-refund-more", "type": "refund", "oneid": known,
                "order_id": "K1", "amount": "100.01"}),
            "b-refund-more",
            ErrorCode::RefundExceedsOrder,
            Some("amount"),
        ),
        (
            json!({"event_id": "b-redeem", "type": "points_redeem", "oneid": known, "points": 151}),
            "b-redeem",
            ErrorCode::InsufficientPoints,
            Some("points"),
        ),
        (
            json!({"event_id": "b-redeem-neg", "type": "points_redeem", "oneid": known, "points": -1}),
            "b-redeem-neg",
            ErrorCode::InvalidField,
            Some("points"),
        ),
        (
            json!({"event_id": "b-earn-0", "type": "points_earn", "oneid": known, "points": 0}),
            "b-earn-0",
            ErrorCode::InvalidField,
            Some("points"),
        ),
        (
            json!({"event_id": "b-earn-str", "type": "points_earn", "oneid": known, "points": "5"}),
            "b-earn-str",
            ErrorCode::InvalidField,
            Some("points"),
        ),
        (
            json!({"event_id": "b-adjust", "type": "points_adjust", "oneid": known, "points": -5}),
            "b-adjust",
            ErrorCode::MissingField,
            Some("reason"),
        ),
        (
            json!({"event_id": "b-ts", "type": "points_earn", "oneid": known, "points": 1,
                "ts": "yesterday"}),
            "b-ts",
            ErrorCode::InvalidField,
            Some("ts"),
        ),
        (
            json!({"event_id": "b-channel", "type": "points_earn", "oneid": known, "points": 1,
                "channel": "Tmall"}),
            "b-channel",
            ErrorCode::InvalidField,
            Some("channel"),
        ),
        (
            json!({"event_id": "b-kind", "type": "identify", "identities": {"Phone": phone}}),
            "b-kind",
            ErrorCode::InvalidField,
            Some("identities.Phone"),
        ),
        (
            json!({"event_id": "b-value", "type": "identify", "oneid": known,
                "identities": {"phone": "1".repeat(257)}}),
            "b-value",
            ErrorCode::InvalidField,
            Some("identities.phone"),
        ),
        (
            json!({"event_id": "b-empty-value", "type": "identify", "oneid": known,
                "identities": {"phone": ""}}),
            "b-empty-value",
            ErrorCode::InvalidField,
            Some("identities.phone"),
        ),
        (
            json!({"event_id": "b-oneid", "type": "points_earn", "oneid": "42", "points": 1}),
            "b-oneid",
            ErrorCode::InvalidField,
            Some("oneid"),
        ),
        (
            json!({"event_id": "b-nothing", "type": "points_earn", "points": 1}),
            "b-nothing",
            ErrorCode::MissingField,
            Some("oneid"),
        ),
        (
            json!({"event_id": "b-identify-nothing", "type": "identify", "oneid": known}),
            "b-identify-nothing",
            ErrorCode::MissingField,
            Some("identities"),
        ),
        (
            json!({"event_id": "b-missing", "type": "points_earn", "oneid": "o0000000000999999",
                "points": 1}),
            "b-missing",
            ErrorCode::NotFound,
            Some("oneid"),
        ),
        (
            json!({"event_id": "b-expired", "type": "points_earn", "oneid": known, "points": 5,
                "expires_at": past}),
            "b-expired",
            ErrorCode::AlreadyExpired,
            Some("expires_at"),
        ),
        (
            json!({"event_id": "b-tag-expired", "type": "tag_add", "oneid": known, "tag": "t",
                "expires_at": past}),
            "b-tag-expired",
            ErrorCode::AlreadyExpired,
            Some("expires_at"),
        ),
        (
            json!({"event_id": "b-attr", "type": "profile_update", "oneid": known,
                "attributes": {"Bad Name": 1}}),
            "b-attr",
            ErrorCode::InvalidField,
            Some("attributes.Bad Name"),
        ),
        (
            json!({"event_id": "b-attr-obj", "type": "profile_update", "oneid": known,
                "attributes": {"city": {"name": "x"}}}),
            "b-attr-obj",
            ErrorCode::InvalidField,
            Some("attributes.city"),
        ),
        (json!(42), "", ErrorCode::InvalidEvent, None),
        (
            json!(["not", "an", "object"]),
            "",
            ErrorCode::InvalidEvent,
            None,
        ),
    ];
    // A valid event on the other profile, in the middle of the batch.
    let valid = json!({"event_id": "b-valid", "type": "points_earn", "oneid": other,
        "points": 5, "ts": ts(10)});
    let middle = cases.len() / 2;
    let mut batch: Vec<Value> = cases.iter().map(|(e, ..)| e.clone()).collect();
    batch.insert(middle, valid);
    let answer = setup.client.send_events_json(&batch).await.unwrap();
    assert_eq!(answer.results.len(), batch.len());
    assert_eq!(
        (answer.applied, answer.duplicates, answer.rejected),
        (1, 0, cases.len() as u64),
        "{answer:?}"
    );
    let mut results = answer.results.clone();
    let valid_result = results.remove(middle);
    assert_eq!(
        valid_result,
        EventResult {
            event_id: "b-valid".into(),
            status: EventStatus::Applied,
            oneid: Some(other.clone()),
            error: None,
            not_linked: vec![],
            merged: vec![],
            merge_pending: false,
        }
    );
    for ((event, event_id, code, field), result) in cases.iter().zip(&results) {
        assert_eq!(
            (result.event_id.as_str(), result_error(result)),
            (
                *event_id,
                (EventStatus::Rejected, None, code.clone(), *field)
            ),
            "{event}: {result:?}"
        );
        assert!(
            !result.error.as_ref().unwrap().message.is_empty(),
            "{result:?}"
        );
    }
    // The conflict names both profiles.
    for conflict in results
        .iter()
        .filter(|r| r.event_id.starts_with("b-conflict"))
    {
        let message = &conflict.error.as_ref().unwrap().message;
        assert!(
            message.contains(&known) && message.contains(&other),
            "{message}"
        );
    }

    // The same batch again: the valid event is a duplicate, the rest rejected the same way.
    let again = setup.client.send_events_json(&batch).await.unwrap();
    assert_eq!(
        (again.applied, again.duplicates, again.rejected),
        (0, 1, cases.len() as u64)
    );

    setup.assert_healthy().await;
    let after = setup.snapshot().await;
    assert_eq!(after.known, before.known, "rejected events change nothing");
    assert_eq!(after.rules, before.rules);
    assert_eq!(after.other.points.balance, before.other.points.balance + 5);
    assert_eq!(after.other.version, before.other.version + 1);
    // Only the shard of the valid event's profile changed.
    let changed = OneId::shard(other.parse().unwrap()).0 as usize;
    for (shard, (b, a)) in before.digests.iter().zip(&after.digests).enumerate() {
        if shard == changed {
            assert_ne!(b, a, "shard {shard} applied the valid event");
        } else {
            assert_eq!(b, a, "shard {shard} changed");
        }
    }
}

/// An event naming a OneID of a shard the cluster does not have is one bad event, not a
/// reason to stop the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_naming_a_oneid_of_a_missing_shard_is_rejected_alone() {
    let setup = Setup::start().await;
    let before = setup.snapshot().await;
    let answer = setup
        .client
        .send_events_json(&[
            json!({"event_id": "s-1", "type": "points_earn", "oneid": "o0fff000000000001", "points": 1}),
            json!({"event_id": "s-2", "type": "points_earn", "oneid": setup.other, "points": 1}),
        ])
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => {
            let alive = setup.client.healthy().await;
            panic!("the batch failed ({error}); node still healthy: {alive}");
        }
    };
    assert_eq!(
        result_error(&answer.results[0]),
        (
            EventStatus::Rejected,
            None,
            ErrorCode::NotFound,
            Some("oneid")
        )
    );
    assert_eq!(answer.results[1].status, EventStatus::Applied);
    setup.assert_healthy().await;
    assert_eq!(setup.snapshot().await.known, before.known);
}

/// A rejected event leaves no trace: an identity it names is not bound to the profile, not
/// even when that identity is held by another shard than the profile's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_event_binds_none_of_its_identities() {
    let setup = Setup::start().await;
    let before = setup.snapshot().await;
    let home = OneId::shard(setup.known.parse().unwrap()).0;
    let local = (0..)
        .map(|n| format!("local{n}@example.com"))
        .find(|v| shard_of("email", v) == home)
        .unwrap();
    let elsewhere = (0..)
        .map(|n| format!("far{n}@example.com"))
        .find(|v| shard_of("email", v) != home)
        .unwrap();
    for (n, email) in [&local, &elsewhere].into_iter().enumerate() {
        let answer = setup
            .client
            .send_events_json(&[
                json!({"event_id": format!("r-{n}"), "type": "points_redeem",
                "oneid": setup.known, "identities": {"email": email}, "points": 1_000}),
            ])
            .await
            .unwrap();
        assert_eq!(
            result_error(&answer.results[0]),
            (
                EventStatus::Rejected,
                None,
                ErrorCode::InsufficientPoints,
                Some("points")
            )
        );
        assert_eq!(
            setup.client.lookup("email", email).await.unwrap(),
            None,
            "email {email} (shard {}, profile on shard {home}) was bound by a rejected event",
            shard_of("email", email)
        );
    }
    assert_eq!(setup.snapshot().await.known, before.known);
    // The identity is still free: a new customer can claim it.
    let answer = setup
        .client
        .send_events_json(&[json!({"event_id": "r-new", "type": "points_earn",
            "identities": {"email": elsewhere}, "points": 3})])
        .await
        .unwrap();
    assert_eq!(answer.results[0].status, EventStatus::Applied);
    assert_ne!(
        answer.results[0].oneid.as_deref(),
        Some(setup.known.as_str())
    );
}
