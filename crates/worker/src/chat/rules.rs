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
    /// server uses the alias it holds for the socket. The base64 may encode
    /// any bytes (the seed page sends `btoa` of Latin-1 text) and is passed on
    /// exactly as the client sent it; clients decode it.
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
    #[error("alias must not contain control or bidirectional override characters")]
    AliasHasControls,
    #[error("\"Message\" must be a string")]
    MessageNotString,
    #[error("\"Message\" must be base64 (RFC 4648, with padding)")]
    BadBase64,
    #[error("\"Message\" is empty")]
    EmptyMessage,
    #[error("frame needs a \"User\" or a \"Message\" field")]
    UnknownShape,
    #[error("frame has both \"User\" and \"Message\"; send a rename and a post as two frames")]
    Ambiguous,
}

impl FrameError {
    /// A stable, machine-readable name for the error.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::NotJson => "bad_json",
            FrameError::NotObject | FrameError::UnknownShape => "bad_shape",
            FrameError::UserNotString | FrameError::AliasTooLong | FrameError::AliasHasControls => {
                "bad_alias"
            }
            FrameError::MessageNotString | FrameError::BadBase64 | FrameError::EmptyMessage => {
                "bad_message"
            }
            FrameError::Ambiguous => "ambiguous_frame",
        }
    }
}

/// Whether `c` may not appear in an alias: C0 and C1 controls (and DEL),
/// which break a list line or hide in it, and the bidirectional embedding,
/// override and isolate characters (U+202A–U+202E, U+2066–U+2069), which
/// make a name display as another one (`"ann\u{202E}nib"` shows as
/// "annbin") and spill their direction into the text shown after it.
pub fn forbidden_in_alias(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|_| FrameError::NotJson)?;
    let Value::Object(mut object) = value else {
        return Err(FrameError::NotObject);
    };
    // The seed tests `data["User"]` first, so a frame with both fields would
    // rename and silently lose the post. Neither half is taken: the client is
    // told, and sends them as two frames.
    if object.contains_key("User") && object.contains_key("Message") {
        return Err(FrameError::Ambiguous);
    }
    if let Some(user) = object.remove("User") {
        let Value::String(alias) = user else {
            return Err(FrameError::UserNotString);
        };
        // Surrounding whitespace (tabs and newlines included) is trimmed as
        // before; a control or bidi character left inside refuses the rename
        // rather than being stripped, so the name the user typed is never
        // silently turned into another (possibly someone else's) name.
        let alias = alias.trim();
        if alias.chars().count() > MAX_ALIAS_CHARS {
            return Err(FrameError::AliasTooLong);
        }
        if alias.chars().any(forbidden_in_alias) {
            return Err(FrameError::AliasHasControls);
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
        // Any bytes: the seed page sends `btoa` of Latin-1 text, our page
        // UTF-8. Which one it is, is for the reader to tell.
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
struct UserList<'a, S: Serialize> {
    #[serde(rename = "Type")]
    kind: &'static str,
    #[serde(rename = "Users")]
    users: Users<'a, S>,
}

/// The online list as the seed's server writes it, one object per user
/// (the seed page reads `Users[i].User`); serialized straight from the
/// slice, without building the objects.
struct Users<'a, S>(&'a [S]);

#[derive(Serialize)]
struct UserEntry<'a, S> {
    #[serde(rename = "User")]
    user: &'a S,
}

impl<S: Serialize> Serialize for Users<'_, S> {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        serializer.collect_seq(self.0.iter().map(|user| UserEntry { user }))
    }
}

/// `{"Type":"userlist","Users":[{"User":"ann"},{"User":"bob"}]}`.
pub fn userlist_frame<S: Serialize>(users: &[S]) -> String {
    to_json(&UserList {
        kind: "userlist",
        users: Users(users),
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
    fn aliases_with_controls_or_bidi_overrides_are_refused() {
        for bad in [
            "a\u{0}b",
            "a\tb",
            "a\nb",
            "a\u{1b}[31mb",
            "a\u{7f}b",
            "a\u{85}b",
            "a\u{9f}b",
            "ann\u{202A}",
            "ann\u{202B}",
            "ann\u{202C}",
            "ann\u{202D}",
            "ann\u{202E}nib",
            "\u{2066}ann",
            "\u{2067}ann",
            "\u{2068}ann",
            "\u{2069}ann",
        ] {
            let frame = serde_json::json!({ "User": bad }).to_string();
            assert_eq!(parse(&frame), Err(FrameError::AliasHasControls), "{bad:?}");
            assert_eq!(FrameError::AliasHasControls.code(), "bad_alias");
        }
        // Whitespace around the name is trimmed, as before; what is left is fine.
        assert_eq!(
            parse(r#"{"User":"\tann\n"}"#),
            Ok(ClientFrame::User("ann".into()))
        );
        // Ordinary non-ASCII text, right-to-left scripts and joiners stay allowed.
        for good in ["さくら 🌸", "עברית", "ملاك", "👨‍👩‍👧", "café crème"]
        {
            let frame = serde_json::json!({ "User": good }).to_string();
            assert_eq!(
                parse(&frame),
                Ok(ClientFrame::User(good.into())),
                "{good:?}"
            );
        }
    }

    #[test]
    fn message_is_base64_of_any_bytes_passed_on_unchanged() {
        let ok = format!(r#"{{"Message":"{}","Author":"x"}}"#, b64("こんにちは 🌸"));
        assert_eq!(parse(&ok), Ok(ClientFrame::Message(b64("こんにちは 🌸"))));
        // btoa("café crème") in the seed page: Latin-1 bytes, not UTF-8.
        let latin1 = STANDARD.encode(b"caf\xe9 cr\xe8me");
        let frame = format!(r#"{{"Message":"{latin1}","Author":"x"}}"#);
        assert_eq!(parse(&frame), Ok(ClientFrame::Message(latin1)));
        assert_eq!(
            parse(r#"{"Message":"/w=="}"#),
            Ok(ClientFrame::Message("/w==".into()))
        );
        assert_eq!(parse(r#"{"Message":"%%%"}"#), Err(FrameError::BadBase64));
        assert_eq!(parse(r#"{"Message":"/w"}"#), Err(FrameError::BadBase64));
        assert_eq!(parse(r#"{"Message":""}"#), Err(FrameError::EmptyMessage));
        assert_eq!(parse(r#"{"Message":1}"#), Err(FrameError::MessageNotString));
    }

    #[test]
    fn shapes_that_are_not_frames() {
        assert_eq!(parse("not json"), Err(FrameError::NotJson));
        assert_eq!(parse("[1,2]"), Err(FrameError::NotObject));
        assert_eq!(parse(r#"{"Hello":1}"#), Err(FrameError::UnknownShape));
        let both = format!(r#"{{"User":"ann","Message":"{}"}}"#, b64("hi"));
        assert_eq!(parse(&both), Err(FrameError::Ambiguous));
        assert_eq!(FrameError::Ambiguous.code(), "ambiguous_frame");
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
            key: String::new(),
        };
        let v: Value = serde_json::from_str(&chat_frame(&m)).unwrap();
        assert_eq!(v["Type"], "Chat");
        assert_eq!(v["ID"], 7);
        assert_eq!(v["Author"], "ann");
        let v: Value = serde_json::from_str(&status_frame("0000abcd-1", "77")).unwrap();
        assert_eq!(v["WSID"], "0000abcd-1");
        assert_eq!(v["Log"], "77");
        assert_eq!(
            userlist_frame(&["a", "<b>"]),
            r#"{"Type":"userlist","Users":[{"User":"a"},{"User":"<b>"}]}"#
        );
        assert_eq!(
            userlist_frame::<&str>(&[]),
            r#"{"Type":"userlist","Users":[]}"#
        );
    }
}
