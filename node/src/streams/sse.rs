//! Server-Sent Events framing (`text/event-stream`): each event is `field: value` lines and a
//! blank line; a line starting with `:` is a comment (a heartbeat).

use bytes::Bytes;

/// One event. `data` must be one line (compact JSON is).
pub fn event(id: Option<&str>, name: Option<&str>, data: Option<&str>) -> Bytes {
    let mut frame = String::with_capacity(64 + data.map_or(0, str::len));
    if let Some(name) = name {
        frame.push_str("event: ");
        frame.push_str(name);
        frame.push('\n');
    }
    if let Some(id) = id {
        frame.push_str("id: ");
        frame.push_str(id);
        frame.push('\n');
    }
    if let Some(data) = data {
        debug_assert!(!data.contains('\n'), "SSE data is one line");
        frame.push_str("data: ");
        frame.push_str(data);
        frame.push('\n');
    }
    frame.push('\n');
    Bytes::from(frame)
}

/// A comment line: ignored by clients, it keeps the connection visibly alive.
pub fn comment(text: &str) -> Bytes {
    Bytes::from(format!(": {text}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_comments_are_framed() {
        assert_eq!(event(Some("c1"), None, Some("{}")), "id: c1\ndata: {}\n\n");
        assert_eq!(event(Some("c1"), None, None), "id: c1\n\n");
        assert_eq!(
            event(Some("c2"), Some("snapshot_end"), Some("{\"members\":2}")),
            "event: snapshot_end\nid: c2\ndata: {\"members\":2}\n\n"
        );
        assert_eq!(comment("heartbeat"), ": heartbeat\n\n");
    }
}
