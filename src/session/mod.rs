//! One user's session: the actor that owns the upstream BOSH session and the user's pages
//! ([`actor`]), the multiplexing rules it applies ([`mux`], built from [`iq`], [`presence`],
//! [`rooms`], [`roster`] and [`carbons`], each pure), and the registry of all sessions, tokens
//! and tickets ([`registry`]). A [`SessionHandle`] is the cheap, cloneable way in.

pub mod actor;
pub mod carbons;
pub mod deps;
pub mod effect;
pub mod iq;
pub mod mux;
pub mod page_queue;
pub mod persist;
pub mod presence;
pub mod registry;
pub mod relogin;
pub mod rooms;
pub mod roster;
pub mod tokens;

use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

pub use effect::PageId;
pub use page_queue::{PageOut, PageReceiver, PageSender, Refused, page_queue};
pub use registry::{Registry, RegistryError};

use crate::xmpp::{Element, Jid};

/// The actor's end of a page.
#[derive(Debug)]
pub struct PageLink {
    /// The page.
    pub id: PageId,
    /// The page's queue. Unbounded in items on purpose: the bound is in bytes, checked when a
    /// frame is queued, and a page that falls behind is closed instead of waited for.
    pub tx: PageSender,
}

/// Why a page could not attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The user has the maximum number of pages open (close 4003).
    #[error("too many pages for this user")]
    TooManyPages,
    /// The session is gone or cannot be restored (close 4004).
    #[error("session is not available")]
    Gone,
    /// The session is moving between cluster nodes (its owner is unreachable, or another node
    /// is adopting it): the page should reconnect (close 1012; SPEC §12).
    #[error("session is moving to another node")]
    Moving,
}

/// Where the session's login stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Logging in.
    Connecting,
    /// Live, bound to this full JID.
    Ready(Jid),
    /// The login failed, and how (the API answers 422, 504 or 502 by it, SPEC §3).
    Failed(LoginFailure),
}

/// Why a session never became ready, as the handoff API must tell it apart (SPEC §3). Typed, so
/// that the actor's failure crosses into the API without being flattened to a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginFailure {
    /// The server refused the credentials (SASL `<failure/>` with this condition).
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// The login did not complete within its time limit.
    #[error("login did not complete within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection manager could not be reached, or kept failing in transport.
    #[error("{0}")]
    Unreachable(String),
    /// The connection manager or server answered, but refused or broke off the login (HTTP 4xx,
    /// `terminate`, bind refused, no usable mechanism, a protocol error).
    #[error("{0}")]
    Refused(String),
    /// A session found in the store could not be read back.
    #[error("stored session is damaged")]
    Damaged,
    /// The session ended before its login finished (e.g. the daemon is stopping).
    #[error("session ended")]
    Ended,
}

impl From<&crate::bosh::BoshError> for LoginFailure {
    fn from(e: &crate::bosh::BoshError) -> LoginFailure {
        use crate::bosh::BoshError as B;
        match e {
            B::AuthFailed { condition } => LoginFailure::AuthFailed(condition.clone()),
            B::LoginTimeout(limit) => LoginFailure::Timeout(*limit),
            B::RetriesExhausted { .. } | B::Setup(_) | B::Closed | B::Fenced => {
                LoginFailure::Unreachable(e.to_string())
            }
            B::BadRecord(_) => LoginFailure::Damaged,
            B::Terminated { .. }
            | B::HttpStatus(..)
            | B::Sasl(_)
            | B::NoMechanism(_)
            | B::Refused { .. }
            | B::Protocol(_) => LoginFailure::Refused(e.to_string()),
        }
    }
}

/// What the API and the status page show about a session (SPEC §3).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    /// Full JID once bound.
    pub jid: Option<String>,
    /// `connecting`, `live`, `retrying`, `reconnecting`, `ended`.
    pub upstream: &'static str,
    /// Pages attached now.
    pub pages: usize,
    /// When the session was created.
    #[serde(serialize_with = "rfc3339")]
    pub created: SystemTime,
    /// Last stanza either way.
    #[serde(serialize_with = "rfc3339")]
    pub last_activity: SystemTime,
    /// Stanzas received from upstream.
    pub stanzas_in: u64,
    /// Stanzas sent upstream.
    pub stanzas_out: u64,
    /// Messages buffered while no page was attached.
    pub buffered: u64,
    /// Messages dropped because the buffer was full.
    pub buffer_dropped: u64,
    /// Pages closed for reading too slowly.
    pub slow_pages: u64,
    /// Times the upstream session was re-established.
    pub relogins: u64,
    /// Whether the session was attached (no password held).
    pub attached: bool,
    /// The live upstream session, for its current rid (shown on the status page only).
    #[serde(skip)]
    pub(crate) upstream_handle: Option<crate::bosh::BoshHandle>,
    /// The node that drives the session (SPEC §12), filled in by the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl SessionInfo {
    /// The rid of the upstream session's next request.
    pub fn next_rid(&self) -> Option<u64> {
        self.upstream_handle
            .as_ref()
            .map(crate::bosh::BoshHandle::next_rid)
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
}

impl SessionInfo {
    fn new(attached: bool) -> Self {
        let now = SystemTime::now();
        SessionInfo {
            jid: None,
            upstream: "connecting",
            pages: 0,
            created: now,
            last_activity: now,
            stanzas_in: 0,
            stanzas_out: 0,
            buffered: 0,
            buffer_dropped: 0,
            slow_pages: 0,
            relogins: 0,
            attached,
            upstream_handle: None,
            node: None,
        }
    }
}

pub(crate) enum Command {
    Attach {
        link: PageLink,
        reply: oneshot::Sender<Result<Jid, AttachError>>,
    },
    FromPage {
        page: PageId,
        stanza: Element,
    },
    Detach {
        page: PageId,
    },
    /// Logout (SPEC §3 DELETE): pages closed with 4001, upstream terminated.
    Logout {
        done: oneshot::Sender<()>,
    },
    /// Daemon stop without a durable store: nothing survives, so pages are closed with 4004
    /// (not 1012: reconnecting would only fail) and upstream is terminated.
    Stop {
        done: oneshot::Sender<()>,
    },
    /// Daemon stop with a durable store: pages closed with 1012, upstream kept, the record
    /// brought up to date for whoever takes the session over; `true` when it was.
    Suspend {
        done: oneshot::Sender<bool>,
    },
    /// The store lost its data (SPEC §12: Redis restarted empty): write the record back.
    Resync,
}

/// What a page asks of a session that another node drives (SPEC §12), as the relay to that
/// node receives it from a [`SessionHandle::relayed`] handle.
#[derive(Debug)]
pub enum Relayed {
    /// The page attaches: answer with the session's full JID once the owner did.
    Attach {
        /// The page's end.
        link: PageLink,
        /// The answer.
        reply: oneshot::Sender<Result<Jid, AttachError>>,
    },
    /// A checked stanza from the page.
    FromPage(Element),
    /// The page is gone.
    Detach,
}

/// The receiving end of a [`SessionHandle::relayed`] handle.
pub struct RelayedCommands(mpsc::Receiver<Command>);

impl RelayedCommands {
    /// The next page request; `None` once every handle is dropped. Session-wide commands
    /// (logout, stop, suspend) are not a relay's to carry out: they are answered at once.
    pub async fn next(&mut self) -> Option<Relayed> {
        loop {
            return Some(match self.0.recv().await? {
                Command::Attach { link, reply } => Relayed::Attach { link, reply },
                Command::FromPage { stanza, .. } => Relayed::FromPage(stanza),
                Command::Detach { .. } => Relayed::Detach,
                Command::Logout { done } | Command::Stop { done } => {
                    let _ = done.send(());
                    continue;
                }
                Command::Suspend { done } => {
                    let _ = done.send(false);
                    continue;
                }
                Command::Resync => continue,
            });
        }
    }
}

/// A cheap handle to one user's session actor.
#[derive(Clone)]
pub struct SessionHandle {
    /// Unique per actor, so a stale handle never removes its successor from the registry.
    pub id: u64,
    /// The user.
    pub bare: Jid,
    tx: mpsc::Sender<Command>,
    info: Arc<Mutex<SessionInfo>>,
    ready: watch::Receiver<Readiness>,
}

impl SessionHandle {
    /// A snapshot of what the session shows.
    pub fn info(&self) -> SessionInfo {
        self.info.lock().clone()
    }

    /// Waits until the login finished: the full JID, or why it failed.
    pub async fn ready(&self) -> Readiness {
        let mut rx = self.ready.clone();
        let result = rx.wait_for(|r| !matches!(r, Readiness::Connecting)).await;
        match result {
            Ok(r) => r.clone(),
            Err(_) => Readiness::Failed(LoginFailure::Ended),
        }
    }

    /// Attaches a page; the answer is the session's full JID.
    pub async fn attach(&self, link: PageLink) -> Result<Jid, AttachError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Attach { link, reply })
            .await
            .map_err(|_| AttachError::Gone)?;
        rx.await.map_err(|_| AttachError::Gone)?
    }

    /// Hands a checked stanza from `page` to the session. Waits when the session is busy.
    pub async fn from_page(&self, page: PageId, stanza: Element) -> bool {
        self.tx
            .send(Command::FromPage { page, stanza })
            .await
            .is_ok()
    }

    /// The page is gone.
    pub async fn detach(&self, page: PageId) {
        let _ = self.tx.send(Command::Detach { page }).await;
    }

    /// Logs the user out: returns when the upstream session was terminated.
    pub async fn logout(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Logout { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the session for a daemon shutdown.
    pub async fn stop(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Stop { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the session for a restart, leaving it alive upstream with its store record up to
    /// date for the next process (SPEC §8); `false` if it could not be kept.
    pub async fn suspend(&self) -> bool {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Suspend { done }).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// A handle for one page on a session another node drives (SPEC §12): what the page does
    /// arrives at the returned receiver, for a relay to carry to the owner.
    pub fn relayed(bare: Jid, id: u64) -> (SessionHandle, RelayedCommands) {
        let (tx, rx) = mpsc::channel(256);
        let (_, ready) = watch::channel(Readiness::Connecting);
        let handle = SessionHandle {
            id,
            bare,
            tx,
            info: Arc::new(Mutex::new(SessionInfo::new(false))),
            ready,
        };
        (handle, RelayedCommands(rx))
    }

    /// Writes the session's record back to a store that lost it (SPEC §12); fire and forget.
    pub fn resync(&self) {
        let _ = self.tx.try_send(Command::Resync);
    }

    /// True once the actor has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}
