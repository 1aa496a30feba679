//! A reader of Server-Sent Events (`text/event-stream`), as the WHATWG HTML standard's
//! "event stream interpretation" defines them: lines end in CR, LF or CRLF (a CRLF may be cut
//! between two reads); `field: value` lines (one leading space dropped, a line without a colon
//! is a field with an empty value, one starting with a colon is a comment); several `data`
//! lines join with newlines; a blank line dispatches the event, unless it has no data; `retry`
//! of digits only sets the reconnection time; an `id` holding NUL is ignored; a leading byte
//! order mark is dropped. Unlike a browser it bounds what a server can make it hold: a line
//! over [`LINE_BYTES_MAX`] or an event's data over [`DATA_BYTES_MAX`] is an error.

use std::time::Duration;

/// The longest line accepted (a membership change is under 1 KiB).
pub const LINE_BYTES_MAX: usize = 64 * 1024;
/// The most data one event may gather over its `data` lines.
pub const DATA_BYTES_MAX: usize = 1024 * 1024;

/// What a stream said, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An event with data.
    Event(Event),
    /// An event without data (not dispatched by the standard) whose `id` moves the last
    /// event id.
    Id(String),
    /// The server's reconnection time.
    Retry(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event` field; `None` for the default type, `message`.
    pub name: Option<String>,
    /// The `id` field of this event, if it had one.
    pub id: Option<String>,
    pub data: String,
}

/// The stream broke the bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong(pub &'static str);

/// Reads a stream's bytes as they arrive.
#[derive(Debug, Default)]
pub struct Reader {
    /// Bytes of the unfinished line.
    line: Vec<u8>,
    /// The last byte read was a CR: an LF that follows ends nothing.
    after_cr: bool,
    /// Some line was read (the byte order mark is dropped only at the very start).
    started: bool,
    name: Option<String>,
    id: Option<String>,
    /// The data lines so far, each followed by a newline (the last one is dropped at dispatch).
    data: Option<String>,
}

impl Reader {
    /// Reads a chunk of the stream; what completed is appended to `out`.
    pub fn read(&mut self, mut chunk: &[u8], out: &mut Vec<Item>) -> Result<(), TooLong> {
        while !chunk.is_empty() {
            if std::mem::take(&mut self.after_cr) && chunk[0] == b'\n' {
                chunk = &chunk[1..];
                continue;
            }
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.push(&chunk[..end])?;
                    self.after_cr = chunk[end] == b'\r';
                    chunk = &chunk[end + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.line_ended(&line, out)?;
                }
                None => {
                    self.push(chunk)?;
                    chunk = &[];
                }
            }
        }
        Ok(())
    }

    /// Starts the next connection's stream: what an unfinished event gathered is dropped.
    pub fn reset(&mut self) {
        *self = Reader::default();
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), TooLong> {
        if self.line.len() + bytes.len() > LINE_BYTES_MAX {
            return Err(TooLong("a line"));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn line_ended(&mut self, line: &[u8], out: &mut Vec<Item>) -> Result<(), TooLong> {
        let mut line = String::from_utf8_lossy(line);
        if !std::mem::replace(&mut self.started, true) {
            if let Some(rest) = line.strip_prefix('\u{feff}') {
                line = rest.to_string().into();
            }
        }
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some(("", _)) => return Ok(()), // a comment
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.name = Some(value.to_string()),
            "data" => {
                let data = self.data.get_or_insert_with(String::new);
                if data.len() + value.len() + 1 > DATA_BYTES_MAX {
                    return Err(TooLong("an event's data"));
                }
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse() {
                    out.push(Item::Retry(Duration::from_millis(ms)));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Item>) {
        let (name, id, data) = (self.name.take(), self.id.take(), self.data.take());
        match data {
            Some(mut data) => {
                data.pop();
                out.push(Item::Event(Event {
                    name: name.filter(|n| !n.is_empty()),
                    id,
                    data,
                }));
            }
            None => out.extend(id.map(Item::Id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: Option<&str>, id: Option<&str>, data: &str) -> Item {
        Item::Event(Event {
            name: name.map(str::to_string),
            id: id.map(str::to_string),
            data: data.to_string(),
        })
    }

    /// What `stream` reads as, whole and cut into every pair of chunks.
    fn read(stream: &[u8]) -> Vec<Item> {
        let mut whole = Vec::new();
        Reader::default().read(stream, &mut whole).unwrap();
        for cut in 0..=stream.len() {
            let (mut reader, mut items) = (Reader::default(), Vec::new());
            reader.read(&stream[..cut], &mut items).unwrap();
            reader.read(&stream[cut..], &mut items).unwrap();
            assert_eq!(items, whole, "cut at {cut}");
        }
        whole
    }

    #[test]
    fn lines_end_in_cr_lf_or_crlf_and_data_lines_join_with_newlines() {
        let stream = b"\xef\xbb\xbfdata: one\r\ndata:two\rdata:  three\n\r\nid: c1\nevent: snapshot_end\ndata\n\n";
        assert_eq!(
            read(stream),
            vec![
                event(None, None, "one\ntwo\n three"),
                event(Some("snapshot_end"), Some("c1"), ""),
            ]
        );
    }

    #[test]
    fn comments_unknown_fields_retry_and_events_without_data() {
        let stream = b": heartbeat\nfoo: bar\nretry: 2500\nretry: 1s\nid: c2\n\nid: a\0b\nevent: x\n\ndata: {}\n";
        // The last event has no blank line yet: nothing of it is dispatched.
        assert_eq!(
            read(stream),
            vec![
                Item::Retry(Duration::from_millis(2500)),
                Item::Id("c2".to_string()),
            ]
        );
    }

    #[test]
    fn a_reset_drops_the_unfinished_event() {
        let (mut reader, mut items) = (Reader::default(), Vec::new());
        reader.read(b"id: c3\ndata: cut off", &mut items).unwrap();
        reader.reset();
        reader.read(b"data: whole\n\n", &mut items).unwrap();
        assert_eq!(items, vec![event(None, None, "whole")]);
    }

    #[test]
    fn lines_and_data_are_bounded() {
        let mut items = Vec::new();
        let long = vec![b'a'; LINE_BYTES_MAX + 1];
        assert_eq!(
            Reader::default().read(&long, &mut items),
            Err(TooLong("a line"))
        );
        let line = format!("data: {}\n", "b".repeat(LINE_BYTES_MAX - 8));
        let mut reader = Reader::default();
        let outcome = (0..DATA_BYTES_MAX / LINE_BYTES_MAX + 1)
            .try_for_each(|_| reader.read(line.as_bytes(), &mut items));
        assert_eq!(outcome, Err(TooLong("an event's data")));
        assert!(items.is_empty());
    }
}
