//! The chat's rules for frames: what a client may send and what the server
//! sends back. Pure functions, no I/O, so every rule is tested directly.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::Value;

use super::super::backplane::StoredMessage;

/// Longest alias, in characters.
pub const MAX_ALIAS_CHARS: usize = 64;
/// The alias of a socket that never set one, and what an empty alias means.
pub const DEFAULT_ALIAS: &str = "default";

/// A valid frame from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"User": alias}`: rename; not broadcast, re-sends the online list.
    User(String),
    /// `{"Message": base64, "Author": ...}`: post. `Author` is ignored: the
    /// server uses the alias it holds for the socket.
    Message(String),
}

/// Why a frame was refused. The text is sent to the client as is, so it
/// names the mistake and nothing of the server's insides.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid JSON")]
    NotJson,
    #[error("frame must be a JSON object")]
    NotObject,
    #[error("\"User\" must be a string")]
    UserNotString,
    #[error("alias is longer than {MAX_ALIAS_CHARS} characters")]
    AliasTooLong,
    #[error("\"Message\" must be a string")]
    MessageNotString,
    #[error("\"Message\" must be base64 (RFC 4648, with padding)")]
    BadBase64,
    #[error("\"Message\" must encode UTF-8 text")]
    NotUtf8,
    #[error("\"Message\" is empty")]
    EmptyMessage,
    #[error("frame needs a \"User\" or a \"Message\" field")]
    UnknownShape,
}

impl FrameError {
    /// A stable, machine-readable name for the error.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::NotJson => "bad_json",
            FrameError::NotObject | FrameError::UnknownShape => "bad_shape",
            FrameError::UserNotString | FrameError::AliasTooLong => "bad_alias",
            FrameError::MessageNotString
            | FrameError::BadBase64
            | FrameError::NotUtf8
            | FrameError::EmptyMessage => "bad_message",
        }
    }
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|_| FrameError::NotJson)?;
    let Value::Object(mut object) = value else {
        return Err(FrameError::NotObject);
    };
    // The seed tests `data["User"`: a frame with a User field is a rename.
    if let Some(user) = object.remove("User") {
        let Value::String(alias) = user else {
            return Err(FrameError::UserNotString);
        };
        let alias = alias.trim();
        if alias.chars().count() > MAX_ALIAS_CHARS {
            return Err(FrameError::AliasTooLong);
        }
        let alias = if alias.is_empty() {
            DEFAULT_ALIAS
        } else {
            alias
        };
        return Ok(ClientFrame::User(alias.to_owned()));
    }
    if let Some(message) = object.remove("Message") {
        let Value::String(message) = message else {
            return Err(FrameError::MessageNotString);
        };
        let bytes = STANDARD
            .decode(message.as_bytes())
            .map_err(|_| FrameError::BadBase64)?;
        if bytes.is_empty() {
            return Err(FrameError::EmptyMessage);
        }
        if std::str::from_utf8(&bytes).is_err() {
            return Err(FrameError::NotUtf8);
        }
        return Ok(ClientFrame::Message(message));
    }
    Err(FrameError::UnknownShape)
}

#[derive(Serialize)]
struct Status<'a> {
    #[serde(rename = "Type")]
    kind: &'static str,
    #[serde(rename = "WSID")]
    wsid: &'a str,
    #[serde(rename = "Log")]
    log: &'a str,
}

/// `{"Type":"Status","WSID":...,"Log":...}`, the first frame on every socket.
/// `Log` (our addition) names the message log the `ID`s belong to.
pub fn status_frame(wsid: &str, log: &str) -> String {
    to_json(&Status {
        kind: "Status",
        wsid,
        log,
    })
}

#[derive(Serialize)]
struct UserList<'a, S> {
    #[serde(rename = "Type")]
    kind: &'static str,
    #[serde(rename = "Users")]
    users: &'a [S],
}

/// `{"Type":"userlist","Users":[...]}`.
pub fn userlist_frame<S: Serialize>(users: &[S]) -> String {
    to_json(&UserList {
        kind: "userlist",
        users,
    })
}

#[derive(Serialize)]
struct Chat<'a> {
    #[serde(rename = "Type")]
    kind: &'static str,
    #[serde(rename = "Message")]
    message: &'a str,
    #[serde(rename = "Author")]
    author: &'a str,
    #[serde(rename = "Sent")]
    sent: &'a str,
    #[serde(rename = "ID")]
    id: u64,
}

/// `{"Type":"Chat","Message":...,"Author":...,"Sent":...,"ID":n}`; `ID` is
/// our addition (the log id), which clients use to drop replayed duplicates.
pub fn chat_frame(m: &StoredMessage) -> String {
    chat_frame_of(m.id, &m.author, &m.message, &m.sent)
}

/// [`chat_frame`] from its fields.
pub fn chat_frame_of(id: u64, author: &str, message: &str, sent: &str) -> String {
    to_json(&Chat {
        kind: "Chat",
        message,
        author,
        sent,
        id,
    })
}

/// `Sent` as the seed writes it (`$ZDATETIME($HOROLOG,3)`):
/// `YYYY-MM-DD HH:MM:SS`; we give it in UTC.
pub fn sent_stamp(at: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

#[derive(Serialize)]
struct Gap {
    #[serde(rename = "Type")]
    kind: &'static str,
    #[serde(rename = "After")]
    after: u64,
    #[serde(rename = "Missed")]
    missed: u64,
}

/// `{"Type":"Gap","After":n,"Missed":k}` (our addition): the `k` messages
/// after id `n` are not replayed to this reconnecting client; the replay
/// that follows starts after them.
pub fn gap_frame(after: u64, missed: u64) -> String {
    to_json(&Gap {
        kind: "Gap",
        after,
        missed,
    })
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "Type")]
    kind: &'static str,
    #[serde(rename = "Code")]
    code: &'a str,
    #[serde(rename = "Error")]
    error: &'a str,
}

/// `{"Type":"Error","Code":...,"Error":...}`, a type the seed page ignores.
pub fn error_frame(code: &str, error: &str) -> String {
    to_json(&ErrorFrame {
        kind: "Error",
        code,
        error,
    })
}

fn to_json(value: &impl Serialize) -> String {
    // Serializing these plain structs cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn user_sets_alias_and_empty_means_default() {
        assert_eq!(
            parse(r#"{"User":"ann"}"#),
            Ok(ClientFrame::User("ann".into()))
        );
        assert_eq!(
            parse(r#"{"User":""}"#),
            Ok(ClientFrame::User("default".into()))
        );
        assert_eq!(
            parse(r#"{"User":"  "}"#),
            Ok(ClientFrame::User("default".into()))
        );
        assert_eq!(parse(r#"{"User":5}"#), Err(FrameError::UserNotString));
        let long = format!(r#"{{"User":"{}"}}"#, "x".repeat(65));
        assert_eq!(parse(&long), Err(FrameError::AliasTooLong));
    }

    #[test]
    fn message_must_be_base64_of_utf8() {
        let ok = format!(r#"{{"Message":"{}","Author":"x"}}"#, b64("こんにちは 🌸"));
        assert_eq!(parse(&ok), Ok(ClientFrame::Message(b64("こんにちは 🌸"))));
        assert_eq!(parse(r#"{"Message":"%%%"}"#), Err(FrameError::BadBase64));
        assert_eq!(parse(r#"{"Message":""}"#), Err(FrameError::EmptyMessage));
        assert_eq!(parse(r#"{"Message":"/w=="}"#), Err(FrameError::NotUtf8));
        assert_eq!(parse(r#"{"Message":1}"#), Err(FrameError::MessageNotString));
    }

    #[test]
    fn shapes_that_are_not_frames() {
        assert_eq!(parse("not json"), Err(FrameError::NotJson));
        assert_eq!(parse("[1,2]"), Err(FrameError::NotObject));
        assert_eq!(parse(r#"{"Hello":1}"#), Err(FrameError::UnknownShape));
    }

    #[test]
    fn sent_has_the_seed_format() {
        let at = time::macros::datetime!(2026-11-27 05:01:02 +09:00);
        assert_eq!(sent_stamp(at), "2026-11-26 20:01:02");
    }

    #[test]
    fn frames_render_the_seed_protocol() {
        let m = StoredMessage {
            id: 7,
            author: "ann".into(),
            message: b64("hi"),
            sent: "2026-11-27 05:00:00".into(),
        };
        let v: Value = serde_json::from_str(&chat_frame(&m)).unwrap();
        assert_eq!(v["Type"], "Chat");
        assert_eq!(v["ID"], 7);
        assert_eq!(v["Author"], "ann");
        let v: Value = serde_json::from_str(&status_frame("0000abcd-1", "77")).unwrap();
        assert_eq!(v["WSID"], "0000abcd-1");
        assert_eq!(v["Log"], "77");
        let v: Value = serde_json::from_str(&userlist_frame(&["a", "<b>"])).unwrap();
        assert_eq!(v["Users"][1], "<b>");
    }
}
