//! What can go wrong talking BOSH, split by what the caller must do about it: a
//! [`TransportError`] is transient (the same request is resent, byte-identical, same rid); a
//! [`BoshError`] is terminal (the upstream session is gone or was never established).

use crate::xmpp::sasl::SaslError;

use super::body::BodyError;

/// A failed HTTP round trip that may succeed when repeated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No response head (status and headers) within `wait` plus the margin.
    #[error("no response within {0:?}")]
    Timeout(std::time::Duration),
    /// A response body that stopped arriving: no chunk for this long after the head or the
    /// previous chunk ([`Transport::body_idle`](super::Transport::body_idle)).
    #[error("response body stalled for {0:?}")]
    Stalled(std::time::Duration),
    /// The connection failed or was reset before a full response arrived.
    #[error("connection failed: {0}")]
    Connection(String),
    /// HTTP 5xx.
    #[error("HTTP {0}")]
    ServerError(u16),
    /// A response that is not a usable BOSH body (e.g. cut short by a proxy).
    #[error("{0}")]
    BadBody(#[from] BodyError),
    /// A held request cut by something between us and the connection manager (SPEC §7): the
    /// connection closed or reset before any response, or a gateway answered 502, 503 or 504,
    /// after the request had been on the wire for `held` — at least
    /// [`CUT_MIN_HELD`](super::cuts::CUT_MIN_HELD), which a refused or reset connection never
    /// takes. The server had the request, so it is resent at once and costs no retry.
    #[error("held request cut after {held:?}: {cause}")]
    Cut {
        /// How long the request was on the wire before it was cut.
        held: std::time::Duration,
        /// The failure as it would be classified had it come at once
        /// ([`Connection`](Self::Connection) or [`ServerError`](Self::ServerError)).
        cause: Box<TransportError>,
    },
}

/// The upstream session cannot continue (or could not be established).
#[derive(Debug, thiserror::Error)]
pub enum BoshError {
    /// The connection manager answered `type='terminate'`. `condition` is absent when the server
    /// ended the session without one (Prosody's admin `c2s:close`). `stream_error` is the
    /// condition of a `<stream:error/>` inside a `remote-stream-error` body (e.g. `conflict`).
    #[error("session terminated by the server (condition: {}{})",
        condition.as_deref().unwrap_or("none"),
        stream_error.as_deref().map(|s| format!(", stream error: {s}")).unwrap_or_default())]
    Terminated {
        /// The `condition` attribute.
        condition: Option<String>,
        /// The stream error condition carried inside, if any.
        stream_error: Option<String>,
    },
    /// HTTP 4xx, or another status that is not success and not worth repeating, with the
    /// reason phrase when the server put its own there (ejabberd: `Session ID mismatch`,
    /// `Request ID is out of range`, …).
    #[error("connection manager answered HTTP {0}{reason}", reason = .1.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    HttpStatus(u16, Option<String>),
    /// A request kept failing in transport.
    #[error("request failed {attempts} times, giving up: {last}")]
    RetriesExhausted {
        /// Attempts made, the first included.
        attempts: u32,
        /// The last failure.
        #[source]
        last: TransportError,
    },
    /// The server refused the credentials (`<failure/>` with this condition).
    #[error("authentication failed: {condition}")]
    AuthFailed {
        /// The SASL failure condition, e.g. `not-authorized`.
        condition: String,
    },
    /// The server's SASL messages did not check out (e.g. a wrong SCRAM server signature).
    #[error("SASL exchange failed: {0}")]
    Sasl(#[from] SaslError),
    /// None of the mechanisms we allow was offered.
    #[error("no usable SASL mechanism offered (offered: {0})")]
    NoMechanism(String),
    /// Resource binding or the legacy session request was refused.
    #[error("{step} refused: {condition}")]
    Refused {
        /// `bind` or `session`.
        step: &'static str,
        /// The stanza error condition.
        condition: String,
    },
    /// The server said something that makes no sense at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Logging in took longer than allowed.
    #[error("login did not complete within {0:?}")]
    LoginTimeout(std::time::Duration),
    /// The configured URL or HTTP client could not be set up.
    #[error("invalid upstream setup: {0}")]
    Setup(String),
    /// The session's task has ended; nothing more can be sent.
    #[error("session already closed")]
    Closed,
    /// The session store refused a write-ahead record: another owner has taken the session over
    /// (SPEC §8, §12). Nothing more was posted or handed on, and no terminate was sent: the
    /// upstream session is the new owner's.
    #[error("session taken over by another owner")]
    Fenced,
    /// A stored session record could not be read back (SPEC §8).
    #[error("stored session unreadable: {0}")]
    BadRecord(String),
}
