//! The client protocol, as the load clients speak it and as the baseline
//! server answers it.
//!
//! Client → server: `{"User":"<alias>"}` and `{"Message":"<base64>","Author":"<alias>"}`.
//! Server → client: `Status`, `userlist`, `Chat` (with a numeric `ID`) and
//! `Error` frames, told apart by their `"Type"`.
//!
//! A load message's text is a [`Marker`]: `lt:<run>:<sender>:<seq>:<unix-nanos>`,
//! optionally followed by `:` and padding. The receive path is the hot path of
//! the whole tool (one call per delivery), so it finds the type with a byte
//! scan, parses a Chat frame with borrowed strings, and base64-decodes only the
//! prefix that holds the marker.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// What a server frame is, from its `"Type"` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Status,
    Chat,
    UserList,
    Error,
    /// The server announces messages it cannot replay.
    Gap,
    Other,
}

/// Finds the `"Type"` of a server frame without parsing the rest: userlist
/// frames in a join storm are large, and the type is all most frames need.
pub fn frame_kind(text: &str) -> FrameKind {
    let Some(kind) = type_value(text.as_bytes()) else {
        return FrameKind::Other;
    };
    match kind {
        b"Chat" => FrameKind::Chat,
        b"Status" => FrameKind::Status,
        b"Error" => FrameKind::Error,
        b"Gap" => FrameKind::Gap,
        k if k.eq_ignore_ascii_case(b"userlist") => FrameKind::UserList,
        _ => FrameKind::Other,
    }
}

fn type_value(bytes: &[u8]) -> Option<&[u8]> {
    let key = memchr::memmem::find(bytes, b"\"Type\"")?;
    let mut i = key + 6;
    while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r' | b':') {
        i += 1;
    }
    if bytes.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let len = memchr::memchr(b'"', &bytes[start..])?;
    Some(&bytes[start..start + len])
}

/// The fields of a Chat frame the load clients need; the rest is skipped.
#[derive(Debug, Deserialize)]
pub struct ChatFrame<'a> {
    #[serde(rename = "Message", borrow)]
    pub message: Cow<'a, str>,
    #[serde(rename = "ID", default)]
    pub id: Option<u64>,
}

/// The `Error` text of an Error frame, for the report.
pub fn error_text(text: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorFrame {
        #[serde(rename = "Error", default)]
        error: String,
    }
    serde_json::from_str::<ErrorFrame>(text)
        .map(|f| f.error)
        .unwrap_or_else(|_| text.chars().take(200).collect())
}

/// The `WSID` of a Status frame.
pub fn status_wsid(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct StatusFrame {
        #[serde(rename = "WSID")]
        wsid: serde_json::Value,
    }
    let frame: StatusFrame = serde_json::from_str(text).ok()?;
    Some(match frame.wsid {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    })
}

/// `{"User":"<alias>"}`.
pub fn alias_frame(alias: &str) -> String {
    #[derive(Serialize)]
    struct SetAlias<'a> {
        #[serde(rename = "User")]
        user: &'a str,
    }
    serde_json::to_string(&SetAlias { user: alias }).expect("serializing a str cannot fail")
}

/// `{"Message":"<base64 of text>","Author":"<alias>"}`. `Author` is sent as
/// the seed page sends it; servers ignore it and use the alias they hold.
pub fn post_frame(text: &str, alias: &str) -> String {
    #[derive(Serialize)]
    struct Post<'a> {
        #[serde(rename = "Message")]
        message: &'a str,
        #[serde(rename = "Author")]
        author: &'a str,
    }
    let message = B64.encode(text);
    serde_json::to_string(&Post {
        message: &message,
        author: alias,
    })
    .expect("serializing strs cannot fail")
}

/// A load message as it travels in the Chat text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Tells this run's messages from history and from other runs.
    pub run: u32,
    /// Sender index within the run.
    pub sender: u32,
    /// The sender's sequence number, from 0.
    pub seq: u32,
    /// When the sender wrote it, nanoseconds since the Unix epoch.
    pub sent_nanos: u64,
}

const MARKER_PREFIX: &str = "lt:";

/// Longest marker text before padding: `lt:` + three u32s + a u64 + 4 colons.
const MARKER_MAX_LEN: usize = 3 + 3 * 10 + 20 + 4;

/// Base64 characters to decode to be sure to hold a whole marker: the
/// smallest multiple of 4 whose decoded length covers `MARKER_MAX_LEN` and the
/// `:` that ends the nanos field when padding follows.
const MARKER_B64_PREFIX: usize = (MARKER_MAX_LEN + 1).div_ceil(3) * 4;

impl Marker {
    /// Writes the message text, with `pad` filler bytes after the marker.
    pub fn text(&self, pad: usize) -> String {
        let mut text = format!(
            "{MARKER_PREFIX}{}:{}:{}:{}",
            self.run, self.sender, self.seq, self.sent_nanos
        );
        if pad > 0 {
            text.push(':');
            text.extend(std::iter::repeat_n('x', pad));
        }
        text
    }

    /// Reads the marker from a Chat frame's base64 `Message`, decoding only
    /// the prefix that can hold it. `None` for text that is not a marker.
    pub fn from_base64(message: &str) -> Option<Marker> {
        let bytes = message.as_bytes();
        let mut buf = [0u8; MARKER_B64_PREFIX / 4 * 3];
        let n = if bytes.len() > MARKER_B64_PREFIX {
            B64.decode_slice(&bytes[..MARKER_B64_PREFIX], &mut buf)
                .ok()?
        } else {
            B64.decode_slice(bytes, &mut buf).ok()?
        };
        Marker::parse(&buf[..n])
    }

    /// Parses `lt:<run>:<sender>:<seq>:<nanos>[:...]`.
    pub fn parse(text: &[u8]) -> Option<Marker> {
        let rest = text.strip_prefix(MARKER_PREFIX.as_bytes())?;
        let mut fields = rest.splitn(5, |&b| b == b':');
        let run = parse_u64(fields.next()?)?;
        let sender = parse_u64(fields.next()?)?;
        let seq = parse_u64(fields.next()?)?;
        let sent_nanos = parse_u64(fields.next()?)?;
        Some(Marker {
            run: u32::try_from(run).ok()?,
            sender: u32::try_from(sender).ok()?,
            seq: u32::try_from(seq).ok()?,
            sent_nanos,
        })
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        if d.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

/// Bytes an entry of a userlist frame takes besides its alias:
/// `{"User":"` + `"}` + the `,` between entries.
pub const USER_ENTRY_OVERHEAD: usize = r#"{"User":""},"#.len();

/// Counts how many entries of a userlist frame
/// (`"Users":[{"User":"<alias>"},...]`) are aliases of this run (`"<prefix>`
/// occurrences), skipping the scan when the frame is too short to hold `want`
/// of them. Aliases of one run are fixed-width, so `min_entry_len` bytes per
/// entry (see [`USER_ENTRY_OVERHEAD`]) is exact.
pub fn count_run_aliases(
    text: &str,
    finder: &memchr::memmem::Finder<'_>,
    want: usize,
    min_entry_len: usize,
) -> usize {
    if text.len() < want.saturating_mul(min_entry_len) {
        return 0;
    }
    finder.find_iter(text.as_bytes()).count()
}

/// How many messages a Gap frame says were left out.
pub fn gap_missed(text: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("missed")?.as_u64())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(
            frame_kind(r#"{"Type":"Status","WSID":"1"}"#),
            FrameKind::Status
        );
        assert_eq!(frame_kind(r#"{"Type": "Chat","ID":3}"#), FrameKind::Chat);
        assert_eq!(
            frame_kind(r#"{"Users":[],"Type":"userlist"}"#),
            FrameKind::UserList
        );
        assert_eq!(
            frame_kind(r#"{"Type":"Error","Error":"x"}"#),
            FrameKind::Error
        );
        assert_eq!(frame_kind(r#"{"Type":"Other"}"#), FrameKind::Other);
        assert_eq!(frame_kind("not json"), FrameKind::Other);
        assert_eq!(frame_kind(r#"{"Type":1}"#), FrameKind::Other);
    }

    #[test]
    fn marker_round_trip_through_a_chat_frame() {
        for pad in [0, 1, 2, 3, 100, 5000] {
            let m = Marker {
                run: u32::MAX,
                sender: 123_456,
                seq: u32::MAX - 1,
                sent_nanos: u64::MAX,
            };
            let post = post_frame(&m.text(pad), "me");
            let post: serde_json::Value = serde_json::from_str(&post).unwrap();
            let b64 = post["Message"].as_str().unwrap();
            let chat = format!(
                r#"{{"Type":"Chat","Message":"{b64}","Author":"a","Sent":"2024-01-01 00:00:00","ID":7}}"#
            );
            assert_eq!(frame_kind(&chat), FrameKind::Chat);
            let frame: ChatFrame<'_> = serde_json::from_str(&chat).unwrap();
            assert_eq!(frame.id, Some(7));
            assert_eq!(Marker::from_base64(&frame.message), Some(m), "pad {pad}");
        }
        let small = Marker {
            run: 1,
            sender: 0,
            seq: 0,
            sent_nanos: 5,
        };
        assert_eq!(Marker::from_base64(&B64.encode(small.text(0))), Some(small));
    }

    #[test]
    fn foreign_text_is_not_a_marker() {
        assert_eq!(Marker::from_base64(&B64.encode("hello")), None);
        assert_eq!(Marker::from_base64("!!!"), None);
        assert_eq!(Marker::parse(b"lt:1:2:3"), None);
        assert_eq!(Marker::parse(b"lt:1:2:3:x"), None);
        assert_eq!(Marker::parse(b"lt:99999999999:2:3:4"), None);
    }

    #[test]
    fn alias_counting() {
        let finder = memchr::memmem::Finder::new("\"j7-");
        let list = r#"{"Type":"userlist","Users":[{"User":"j7-000001"},{"User":"j7-000002"},{"User":"default"},{"User":"j8-000001"}]}"#;
        assert_eq!(count_run_aliases(list, &finder, 2, 21), 2);
        assert_eq!(count_run_aliases(list, &finder, 100, 21), 0);
        assert_eq!(alias_frame("a\"b"), r#"{"User":"a\"b"}"#);
        assert_eq!(
            status_wsid(r#"{"Type":"Status","WSID":"42"}"#).as_deref(),
            Some("42")
        );
        assert_eq!(
            status_wsid(r#"{"Type":"Status","WSID":42}"#).as_deref(),
            Some("42")
        );
        assert_eq!(error_text(r#"{"Type":"Error","Error":"bad"}"#), "bad");
    }
}
