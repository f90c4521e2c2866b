//! The control protocol: what `holdfast status` and `holdfast upgrade` say
//! to the keeper on its control socket, and what it answers.
//!
//! A client sends one request, a JSON object on one line (at most
//! [`MAX_REQUEST`] bytes), and reads JSON lines back:
//!
//! | request                                   | answer                                   |
//! |-------------------------------------------|------------------------------------------|
//! | `{"cmd":"status"}`                        | one [`Snapshot`]                         |
//! | `{"cmd":"upgrade","upgrade":{…}}`         | [`Progress`] lines, the last one final   |
//! | `{"cmd":"upgrade_keeper"}`                | one [`Progress`] line (from the new image) |
//!
//! Any request the keeper cannot take is answered with one [`ErrorReply`]
//! line, `{"error":"…","code":"…"}`, and the connection is closed; the
//! keeper goes on as before.
//!
//! Compatibility: this is the wire of keepers and clients before the types
//! (a running keeper and a newer `holdfast` meet during
//! `holdfast upgrade --keeper`), byte for byte for the requests a client
//! sends. What is new is additive: the `code` of an error reply (older
//! clients read only `error`), requests that differ only in spacing or
//! carry fields a keeper does not know (ignored, so a newer client's extras
//! do not break an older keeper's answer).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::status::UpgradeRequest;
#[cfg(doc)]
use crate::status::{Progress, Snapshot};

/// The longest request line the keeper reads (an upgrade's command line
/// included).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// A snapshot of the keeper (`holdfast status`).
    Status,
    /// Upgrade the service (`holdfast upgrade`).
    Upgrade { upgrade: UpgradeRequest },
    /// Re-execute the keeper's binary, keeping everything
    /// (`holdfast upgrade --keeper`).
    UpgradeKeeper,
}

impl Request {
    /// The names of the commands, as on the wire.
    pub const COMMANDS: [&'static str; 3] = ["status", "upgrade", "upgrade_keeper"];

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a request serialises");
        line.push('\n');
        line
    }

    /// Reads a request line (without its newline, or with it). The line
    /// must be a JSON object whose `cmd` is one of [`Request::COMMANDS`],
    /// with the arguments that command takes.
    pub fn parse(line: &[u8]) -> Result<Request, ProtoError> {
        if line.len() > MAX_REQUEST {
            return Err(ProtoError::TooLong);
        }
        let v: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| ProtoError::Malformed(e.to_string()))?;
        let Some(obj) = v.as_object() else {
            return Err(ProtoError::Malformed(
                "a request is a JSON object, like {\"cmd\":\"status\"}".into(),
            ));
        };
        let cmd = match obj.get("cmd") {
            Some(serde_json::Value::String(c)) => c.clone(),
            Some(_) => return Err(ProtoError::Malformed("\"cmd\" is not a string".into())),
            None => return Err(ProtoError::Malformed("no \"cmd\" in the request".into())),
        };
        if !Self::COMMANDS.contains(&cmd.as_str()) {
            return Err(ProtoError::UnknownCommand(cmd));
        }
        serde_json::from_value(v).map_err(|e| ProtoError::BadArguments(cmd, e.to_string()))
    }
}

/// Why a request was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unknown command {0:?} (the keeper knows: status, upgrade, upgrade_keeper)")]
    UnknownCommand(String),
    #[error("bad arguments to {0:?}: {1}")]
    BadArguments(String, String),
}

impl ProtoError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::TooLong => ErrorCode::TooLong,
            ProtoError::Malformed(_) => ErrorCode::Malformed,
            ProtoError::UnknownCommand(_) => ErrorCode::UnknownCommand,
            ProtoError::BadArguments(..) => ErrorCode::BadArguments,
        }
    }
}

/// What kind of error an [`ErrorReply`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    TooLong,
    Malformed,
    UnknownCommand,
    BadArguments,
    PermissionDenied,
    /// A code this client does not know (from a newer keeper), or none
    /// (from a keeper before the codes).
    #[serde(other)]
    Other,
}

/// The keeper's answer to a request it does not take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong, for a person.
    pub error: String,
    /// What went wrong, for a program.
    #[serde(default = "other")]
    pub code: ErrorCode,
}

fn other() -> ErrorCode {
    ErrorCode::Other
}

impl ErrorReply {
    pub fn new(code: ErrorCode, error: impl Into<String>) -> ErrorReply {
        ErrorReply {
            error: error.into(),
            code,
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("an error reply serialises");
        line.push('\n');
        line
    }
}

impl From<&ProtoError> for ErrorReply {
    fn from(e: &ProtoError) -> ErrorReply {
        ErrorReply::new(e.code(), e.to_string())
    }
}

/// One reply line as a client reads it: an [`ErrorReply`] becomes an
/// error (its text, as the keeper wrote it), anything else must be a `T`.
pub fn parse_reply<T: DeserializeOwned>(line: &str) -> std::io::Result<T> {
    let bad = |e: serde_json::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let v: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
    if v.get("error").is_some() {
        let e: ErrorReply = serde_json::from_value(v).map_err(bad)?;
        let kind = match e.code {
            ErrorCode::PermissionDenied => std::io::ErrorKind::PermissionDenied,
            _ => std::io::ErrorKind::Other,
        };
        return Err(std::io::Error::new(kind, e.error));
    }
    serde_json::from_value(v).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_wire_of_before() {
        // Byte for byte what clients before the types sent: a keeper of
        // that build compares the re-exec request as a string.
        assert_eq!(
            Request::UpgradeKeeper.to_line(),
            "{\"cmd\":\"upgrade_keeper\"}\n"
        );
        assert_eq!(Request::Status.to_line(), "{\"cmd\":\"status\"}\n");
        let up = Request::Upgrade {
            upgrade: UpgradeRequest::with_defaults(),
        };
        let v: serde_json::Value = serde_json::from_str(&up.to_line()).unwrap();
        let before =
            serde_json::json!({"cmd": "upgrade", "upgrade": UpgradeRequest::with_defaults()});
        assert_eq!(v, before);
    }

    #[test]
    fn parses_what_clients_send() {
        assert!(matches!(
            Request::parse(b"{\"cmd\":\"status\"}\n"),
            Ok(Request::Status)
        ));
        assert!(matches!(
            Request::parse(b" { \"cmd\" : \"upgrade_keeper\" } "),
            Ok(Request::UpgradeKeeper)
        ));
        // A field this keeper does not know is ignored.
        assert!(matches!(
            Request::parse(br#"{"cmd":"status","verbose":true}"#),
            Ok(Request::Status)
        ));
        let line = br#"{"cmd":"upgrade","upgrade":{"command":["/srv/v2","-x"],"ready_timeout_ms":1,"drain_timeout_ms":2,"settle_ms":3}}"#;
        match Request::parse(line) {
            Ok(Request::Upgrade { upgrade }) => {
                assert_eq!(upgrade.command, Some(vec!["/srv/v2".into(), "-x".into()]));
                assert_eq!(
                    (
                        upgrade.ready_timeout_ms,
                        upgrade.drain_timeout_ms,
                        upgrade.settle_ms
                    ),
                    (1, 2, 3)
                );
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn refuses_what_it_cannot_take_and_says_why() {
        let e = Request::parse(br#"{"cmd":"frobnicate"}"#).unwrap_err();
        assert_eq!(e, ProtoError::UnknownCommand("frobnicate".into()));
        assert!(
            e.to_string().contains("status, upgrade, upgrade_keeper"),
            "{e}"
        );
        let e = Request::parse(br#"{"cmd":"upgrade"}"#).unwrap_err();
        assert!(
            matches!(&e, ProtoError::BadArguments(c, m) if c == "upgrade" && m.contains("missing field `upgrade`")),
            "{e}"
        );
        for bad in [
            &b"status"[..],
            b"",
            b"[1,2]",
            b"{\"cmd\":7}",
            b"{}",
            b"\xff\xfe",
        ] {
            let e = Request::parse(bad).unwrap_err();
            assert_eq!(e.code(), ErrorCode::Malformed, "{bad:?}: {e}");
        }
        let long = format!(
            "{{\"cmd\":\"status\",\"pad\":\"{}\"}}",
            "x".repeat(MAX_REQUEST)
        );
        assert_eq!(
            Request::parse(long.as_bytes()).unwrap_err(),
            ProtoError::TooLong
        );
    }

    #[test]
    fn error_replies_are_json_whatever_they_quote() {
        // Control characters and non-ASCII in the command name: quoted as
        // JSON, not as Rust.
        let e = Request::parse("{\"cmd\":\"\\u001b[31mé\\\"\"}".as_bytes()).unwrap_err();
        let line = ErrorReply::from(&e).to_line();
        let back: ErrorReply = serde_json::from_str(&line).unwrap();
        assert_eq!(back.code, ErrorCode::UnknownCommand);
        assert_eq!(back.error, e.to_string());
        let got = parse_reply::<serde_json::Value>(&line).unwrap_err();
        assert_eq!(got.to_string(), e.to_string());
    }

    #[test]
    fn clients_read_error_replies_of_keepers_before_the_codes() {
        let e =
            parse_reply::<serde_json::Value>(r#"{"error":"unknown command \"x\""}"#).unwrap_err();
        assert_eq!(e.to_string(), "unknown command \"x\"");
        let e = parse_reply::<serde_json::Value>(r#"{"error":"no","code":"from_the_future"}"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "no");
        let v: u32 = parse_reply("7").unwrap();
        assert_eq!(v, 7);
    }
}
