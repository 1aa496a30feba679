//! A raw Server-Sent Events reader over a plain TCP connection, for asserting a stream's
//! exact framing (id-only events, `snapshot_end`) and for subscribers that stop reading.

use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One event as it came: its fields, `data` parsed as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: Option<serde_json::Value>,
}

pub struct SseStream {
    reader: BufReader<TcpStream>,
    /// Body bytes decoded from the chunked encoding, not yet split into lines.
    body: Vec<u8>,
    chunked: bool,
    pub ended: bool,
}

/// Sends `GET path` to `addr` (`127.0.0.1:port`) without reading anything back.
pub async fn request(addr: &str, path: &str, last_event_id: Option<&str>) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("connect");
    send_get(stream, addr, path, last_event_id).await
}

/// Like [`request`], from a socket with a 4 KiB receive buffer: a client that stops reading
/// soon stops the server's writes too (the kernel does not buffer megabytes for it).
pub async fn request_small_window(addr: &str, path: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket
        .connect(addr.parse().expect("an address"))
        .await
        .expect("connect");
    send_get(stream, addr, path, None).await
}

async fn send_get(
    mut stream: TcpStream,
    addr: &str,
    path: &str,
    last_event_id: Option<&str>,
) -> TcpStream {
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n");
    if let Some(id) = last_event_id {
        head.push_str(&format!("last-event-id: {id}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("send");
    stream
}

impl SseStream {
    /// Opens a stream: `Ok` on 200, else the status and body of the answer.
    pub async fn open(
        addr: &str,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseStream, (u16, String)> {
        let stream = request(addr, path, last_event_id).await;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader
            .read_line(&mut status_line)
            .await
            .expect("status line");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let mut chunked = false;
        let mut length = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("header");
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            chunked |= line == "transfer-encoding: chunked";
            if let Some(n) = line.strip_prefix("content-length: ") {
                length = n.parse::<usize>().ok();
            }
        }
        if status != 200 {
            let mut body = vec![0; length.unwrap_or(0)];
            reader.read_exact(&mut body).await.expect("error body");
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        Ok(SseStream {
            reader,
            body: Vec::new(),
            chunked,
            ended: false,
        })
    }

    /// More body bytes: `false` at the end of the body.
    async fn fill(&mut self) -> bool {
        if self.chunked {
            let mut size = String::new();
            if self.reader.read_line(&mut size).await.unwrap_or(0) == 0 {
                return false;
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            if size == 0 {
                return false;
            }
            let mut chunk = vec![0; size + 2];
            if self.reader.read_exact(&mut chunk).await.is_err() {
                return false;
            }
            self.body.extend_from_slice(&chunk[..size]);
            true
        } else {
            let mut buf = [0u8; 4096];
            match self.reader.read(&mut buf).await {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    self.body.extend_from_slice(&buf[..n]);
                    true
                }
            }
        }
    }

    /// The next event (comments skipped) within `within`; `None` at the end or on time out.
    pub async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + within;
        let mut event = SseEvent {
            event: None,
            id: None,
            data: None,
        };
        let mut any = false;
        loop {
            while let Some(end) = self.body.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                if line.is_empty() {
                    if any {
                        return Some(event);
                    }
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(": ").expect("field: value");
                any = true;
                match field {
                    "event" => event.event = Some(value.to_string()),
                    "id" => event.id = Some(value.to_string()),
                    "data" => event.data = Some(serde_json::from_str(value).expect("JSON data")),
                    other => panic!("unknown field {other}"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.fill()).await {
                Ok(true) => {}
                Ok(false) => {
                    self.ended = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// The next event with data (id-only events skipped).
    pub async fn next_data(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.next(left).await?;
            if event.data.is_some() {
                return Some(event);
            }
        }
    }
}

/// One whole request on its own connection (`connection: close`): the status, the head
/// (lowercase) and the body of the answer.
pub async fn exchange(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    stream.write_all(body.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("answer");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_ascii_lowercase(), body.to_string())
}
