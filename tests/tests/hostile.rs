//! No client can take the node hostage: connections that send nothing, half a head or half a
//! body are closed on their deadlines; request bodies share a bounded budget; NDJSON is
//! counted while it arrives; the node raises its own open-file limit.

use oneid_protocol::api::ErrorBody;
use oneid_protocol::ErrorCode;
use oneid_tests::{eventually, read_until_closed, NodeOptions, TestNode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The node's default deadline for a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

/// One request on an open connection, kept alive; answers the status and the body.
async fn request(stream: &mut TcpStream, path: &str) -> (u16, Vec<u8>) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("an answer within 30 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&buf[..n]);
        if let Some(split) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..split]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content length");
            if bytes.len() >= split + 4 + length {
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
                return (status, bytes[split + 4..split + 4 + length].to_vec());
            }
        }
    }
}

/// The status and error code of a raw answer.
fn status_and_code(bytes: &[u8]) -> (u16, ErrorCode, String) {
    let text = String::from_utf8_lossy(bytes);
    let split = text
        .find("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {text:?}"));
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let body: ErrorBody = serde_json::from_str(&text[split + 4..]).expect("an error document");
    (status, body.error.code, text[..split].to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_and_a_new_client_is_served() {
    // This test holds 1,100 sockets of its own.
    rlimit::increase_nofile_limit(4096).expect("raising the test's open-file limit");
    let node = TestNode::start(NodeOptions::default()).await;
    let opened = Instant::now();
    // 1,100 connections: more than the node serves at once (1,024). Most send nothing; every
    // tenth sends half a request head.
    let mut hostile = Vec::new();
    for n in 0..1100 {
        let mut stream = connect(node.port).await;
        if n % 10 == 0 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write");
        }
        hostile.push(stream);
    }
    // A new client now waits behind them until their deadlines pass, and is then served. It
    // asks while the hostile connections are read below: both go on at once.
    let client = node.client_once();
    let served = eventually(
        "a new client served behind the hostile connections",
        Duration::from_secs(60),
        async || client.healthy().await.then(Instant::now),
    );
    // Each hostile connection is closed by the node, none before its 10 s: a clean close (the
    // node read all that was sent), and no answer to a head never completed.
    let closed = async {
        let mut closed_at = Vec::new();
        for stream in &mut hostile {
            assert_eq!(
                read_until_closed(stream, Duration::from_secs(60)).await,
                Ok(Vec::new()),
                "a hostile connection"
            );
            closed_at.push(opened.elapsed());
        }
        closed_at
    };
    let (served, closed_at) = tokio::join!(served, closed);
    let earliest = closed_at.iter().min().unwrap();
    assert!(
        *earliest >= HEAD_TIMEOUT,
        "a connection was closed after {earliest:?}, before its {HEAD_TIMEOUT:?}"
    );
    let served = served.duration_since(opened);
    assert!(
        served >= HEAD_TIMEOUT - Duration::from_secs(1),
        "served after {served:?}: the node was not full"
    );
    assert!(node.client_once().healthy().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_idles_past_the_head_deadline_and_closes_on_its_own() {
    let node = TestNode::start(NodeOptions {
        extra: "[api]\nhead_timeout_ms = 1000\nidle_timeout_ms = 4000\n".into(),
        ..NodeOptions::default()
    })
    .await;
    let mut stream = connect(node.port).await;
    assert_eq!(request(&mut stream, "/healthz").await.0, 200);
    // Idle for twice the head deadline: still open, and the next request is served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(request(&mut stream, "/healthz").await.0, 200);
    // Then idle past the idle deadline: closed by the node, no earlier than 4 s.
    let idle_from = Instant::now();
    assert_eq!(
        read_until_closed(&mut stream, Duration::from_secs(30)).await,
        Ok(Vec::new()),
        "an idle connection"
    );
    let idled = idle_from.elapsed();
    assert!(
        idled >= Duration::from_millis(3900),
        "closed after {idled:?} idle"
    );

    // A kept-alive connection that starts a head and stops has the head deadline from its
    // first byte, not the idle one.
    let mut stream = connect(node.port).await;
    assert_eq!(request(&mut stream, "/healthz").await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream.write_all(b"GET /healthz HT").await.expect("write");
    let started = Instant::now();
    assert_eq!(
        read_until_closed(&mut stream, Duration::from_secs(30)).await,
        Ok(Vec::new()),
        "a connection with half a head"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed {took:?} after the head started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_abandoned_and_changes_nothing() {
    let node = TestNode::start(NodeOptions::quiet()).await;
    let before = node.settled_digests().await;
    let mut stream = connect(node.port).await;
    let body = br#"[{"event_id": "s-1", "type": "points_earn", "identities": {"phone": "1"}, "points": 5}"#;
    stream
        .write_all(
            format!(
                "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len() + 1
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    stream.write_all(body).await.expect("write");
    // The last byte never comes.
    let started = Instant::now();
    let bytes = read_until_closed(&mut stream, Duration::from_secs(60))
        .await
        .expect("the node answers and closes the connection");
    let took = started.elapsed();
    let (status, code, head) = status_and_code(&bytes);
    assert_eq!((status, code), (408, ErrorCode::RequestTimeout));
    assert!(head.lines().any(|l| l == "connection: close"), "{head}");
    assert!(
        took >= Duration::from_millis(9900),
        "abandoned after {took:?}"
    );
    assert_eq!(node.settled_digests().await, before, "nothing applied");
    assert!(node.client_once().healthy().await);
}

/// Opens a request of `declared` bytes and writes `sent` of them from its own task; answers
/// what the node sent back and when, once it closes the connection.
fn stalled_body(
    port: u16,
    declared: usize,
    sent: usize,
) -> tokio::task::JoinHandle<(Vec<u8>, Instant)> {
    tokio::spawn(async move {
        let stream = connect(port).await;
        let (mut read, mut write) = stream.into_split();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {declared}\r\n\r\n"
        );
        let writer = tokio::spawn(async move {
            write.write_all(head.as_bytes()).await?;
            // Blank lines: bytes that count against the budget, and no events.
            let chunk = vec![b'\n'; 64 * 1024];
            let mut left = sent;
            while left > 0 {
                let n = left.min(chunk.len());
                write.write_all(&chunk[..n]).await?;
                left -= n;
            }
            // Keep the connection open, the body unfinished.
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, std::io::Error>(write)
        });
        let mut bytes = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut bytes)).await;
        let at = Instant::now();
        writer.abort();
        (bytes, at)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_share_a_bounded_budget() {
    // A 32 MiB budget; bodies stall for up to 8 s; a body waits up to 5 s for budget.
    let node = TestNode::start(NodeOptions {
        extra: "[api]\nbody_budget_mib = 32\nbody_timeout_ms = 8000\n".into(),
        ..NodeOptions::default()
    })
    .await;
    const MIB: usize = 1024 * 1024;
    // Two bodies hold 15 MiB each and stop; the budget has 2 MiB left.
    let first = stalled_body(node.port, 16 * MIB, 15 * MIB);
    let second = stalled_body(node.port, 16 * MIB, 15 * MIB);
    eventually(
        "the arrival of the two bodies' 30 MiB",
        Duration::from_secs(30),
        async || {
            let held = node.metric("oneid_api_body_bytes").await;
            if held >= (30 * MIB) as u64 {
                Ok(())
            } else {
                Err(held)
            }
        },
    )
    .await;
    // A third waits for room, then is refused, while the other two still hold theirs.
    let started = Instant::now();
    let third = stalled_body(node.port, 16 * MIB, 4 * MIB);
    let (bytes, at) = third.await.unwrap();
    let (status, code, head) = status_and_code(&bytes);
    assert_eq!((status, code), (503, ErrorCode::Unavailable), "{head}");
    let waited = at.duration_since(started);
    assert!(
        waited >= Duration::from_millis(4900) && waited < Duration::from_secs(8),
        "refused after {waited:?}"
    );
    // The two stalled ones are abandoned at their deadline, and give their budget back.
    for stalled in [first, second] {
        let (bytes, _) = stalled.await.unwrap();
        assert_eq!(status_and_code(&bytes).0, 408);
    }
    assert_eq!(node.metric("oneid_api_body_bytes").await, 0);
    let answer = node
        .client_once()
        .send_events_json(&[
            serde_json::json!({"event_id": "after", "type": "points_earn",
            "identities": {"phone": "1"}, "points": 1}),
        ])
        .await
        .expect("served again");
    assert_eq!(answer.applied, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_past_the_event_limit_is_refused_before_the_body_ends() {
    let node = TestNode::start(NodeOptions::default()).await;
    let line = b"{\"event_id\":\"x\",\"type\":\"identify\",\"identities\":{\"phone\":\"1\"}}\n";
    let lines = line.repeat(10_001);
    let mut stream = connect(node.port).await;
    stream
        .write_all(
            format!(
                "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
                lines.len() + 1_000_000
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    stream.write_all(&lines).await.expect("write");
    // A million bytes are never sent: the answer comes anyway.
    let bytes = read_until_closed(&mut stream, Duration::from_secs(30))
        .await
        .expect("answered and closed before the body ended");
    let (status, code, head) = status_and_code(&bytes);
    assert_eq!((status, code), (413, ErrorCode::PayloadTooLarge));
    assert!(head.lines().any(|l| l == "connection: close"), "{head}");
    assert_eq!(node.metric("oneid_events_applied_total").await, 0);
}

/// The soft and hard open-file limits of a running process.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_raises_its_open_file_limit_and_says_when_it_is_too_low() {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
    let mut node = TestNode::create(NodeOptions::default());
    node.open_files = Some((256, hard));
    node.restart().await;
    assert_eq!(open_file_limits(node.pid()), (hard, hard));
    assert!(!node.logs().contains("open-file limit is below"));
    assert!(node.terminate().success());

    // A hard limit below what 1,024 connections and the storage need: raised, and logged.
    node.open_files = Some((256, 1500.min(hard)));
    node.restart().await;
    assert_eq!(
        open_file_limits(node.pid()),
        (1500.min(hard), 1500.min(hard))
    );
    assert!(
        node.logs().contains("open-file limit is below"),
        "{}",
        node.logs()
    );
}
