//! The task that owns an established BOSH session: rid counter, requests in flight, retries,
//! response ordering and the write-ahead records that let another process take the session over
//! (SPEC §8, RECOVERY.md). Callers talk to it through a [`BoshHandle`] and hear from it through
//! [`BoshEvent`]s.
//!
//! Invariants kept here (XEP-0124 §§ 9–14):
//! - at least one request is always in flight while the session lives and the owner keeps up,
//!   so the server can push to us at any time and its inactivity timer never runs out;
//! - never more than `requests` requests in flight (a final terminate excepted, as allowed);
//! - each new request carries the previous rid + 1; a failed one is resent byte-identical with
//!   its own rid; one held and then cut by a proxy (SPEC §7) likewise, at once and without
//!   spending the retry budget ([`super::cuts`]);
//! - a request is resent only once every older one has been answered, so a resent rid is never
//!   "2 ahead" of what the server has seen (ejabberd 23.01 crashes the session when the same
//!   deferred rid arrives twice), and new rids stay within `requests` of the oldest unanswered
//!   one (ejabberd destroys a session on a rid 3 ahead);
//! - ejabberd's answer to a resent request it was holding can echo that request's own stanzas
//!   (the body then carries a `rid` attribute); such an echo is recognised and taken as empty;
//! - responses are handed on in rid order, whatever order they arrive in, one
//!   [`BoshEvent::Response`] per rid, empty ones included;
//! - write-ahead: a new rid is posted only once its exact bytes are in the session store
//!   ([`SessionStore::request`]), and new rids are posted in rid order; resends are not
//!   written again;
//! - the window: a new rid is posted only while `rid - acked <= requests`, `acked` being the
//!   highest rid whose response the owner confirmed with [`BoshHandle::handed_on`]. So at most
//!   `requests` rids are ever unconfirmed, and a process taking over resends only those (never
//!   one 2 below the newest, which ejabberd never answers);
//! - fencing: a write-ahead record refused as [`StoreError::Fenced`] ends the session at once,
//!   with nothing more posted or handed on (not even a response already read) and no
//!   terminate;
//! - stanzas queued while every slot is busy go together in the next request;
//! - a new request is posted at least [`ORDER_GAP`] after the previous one while that one is
//!   unanswered, so that requests reach the server in rid order.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::body::{self, Body, BodyType, SessionParams};
use super::cuts::CutDetector;
use super::error::{BoshError, TransportError};
use super::reader::{DropReason, Dropped, Response};
use super::transport::{PostError, Transport};
use super::{BoshConfig, Timeouts};
use crate::metrics::Metrics;
use crate::store::{SessionStore, StoreError};
use crate::xmpp::{Element, Jid, ns};

/// Stanzas the scheduler holds before it stops taking more from its handles (backpressure).
const OUTBOX_CAP: usize = 4096;
/// Capacity of the command and event channels.
const CHANNEL_CAP: usize = 256;
/// An empty request answered empty faster than this was not held; the next one waits `polling`
/// (unless it was a resend, answered from the server's cache).
const MIN_HOLD: Duration = Duration::from_millis(200);
/// Least time between posting two new requests while the first is unanswered. Each goes on its
/// own connection, and one that must open a new connection can reach the server after a younger
/// one that found an idle pooled connection: ejabberd 23.01 then never answers the pair (the
/// session wedges until its inactivity timeout). The gap lets the older request get on the wire.
const ORDER_GAP: Duration = Duration::from_millis(25);
/// Least time between two warnings about failed store writes (the process over); the count is in
/// `boshmux_store_errors_total`.
const STORE_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A live upstream session as its owner sees it.
#[derive(Debug)]
pub struct BoshSession {
    /// For sending; cheap to clone.
    pub handle: BoshHandle,
    /// Everything that happens to the session, ending with [`BoshEvent::Ended`].
    pub events: mpsc::Receiver<BoshEvent>,
    /// The bound full JID.
    pub jid: Jid,
    /// The session parameters (assumed ones for an attached session).
    pub params: SessionParams,
    /// Stream features after the restart (absent for an attached or resumed session).
    pub features: Option<Element>,
    /// The session's record in the store (SPEC §8), at the epoch this process holds: the
    /// scheduler writes the requests through it, the owner its `HandedOn` marks and caches.
    pub store: SessionStore,
}

/// What happens to a session.
#[derive(Debug)]
pub enum BoshEvent {
    /// The response to request `rid`: its stanzas in the order the server sent them, possibly
    /// none. One per rid, in rid order. The owner takes them in, writes the `HandedOn` mark of
    /// `rid` to the store and then calls [`BoshHandle::handed_on`]; until then the rid counts
    /// against the window (see the module documentation). Stanzas that arrived during login
    /// come first, as the response of the last login rid (the first rid − 1).
    Response {
        /// The request's rid.
        rid: u64,
        /// Its stanzas.
        stanzas: Vec<Element>,
    },
    /// A request failed in transport and will be resent.
    Retrying {
        /// The request's rid.
        rid: u64,
        /// Which resend this will be (1 = first).
        attempt: u32,
        /// What went wrong.
        error: TransportError,
    },
    /// A response arrived again after failures.
    Recovered,
    /// The session is over: `Ok` after a terminate or suspend we asked for, the terminal error
    /// otherwise ([`BoshError::Fenced`] when another owner took it over). Always the last event.
    Ended(Result<(), BoshError>),
}

/// Counters and state of a session, for tests, metrics and the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The rid the next new request will carry.
    pub next_rid: u64,
    /// Requests sent and not yet answered.
    pub in_flight: usize,
    /// The most requests ever in flight at once.
    pub max_in_flight: usize,
    /// New requests sent (resends not counted).
    pub requests: u64,
    /// Resends.
    pub retries: u64,
    /// Stanzas sent upstream.
    pub stanzas_out: u64,
    /// Stanzas received.
    pub stanzas_in: u64,
    /// Stanzas queued, waiting for a free request slot.
    pub queued: usize,
}

enum Command {
    Send(Vec<Element>),
    Stats(oneshot::Sender<Stats>),
    Suspend(oneshot::Sender<Vec<Element>>),
    Terminate {
        farewell: Vec<Element>,
        done: oneshot::Sender<()>,
    },
}

/// Where a scheduler starts: a session just established, or one taken over from the store.
pub(crate) struct Start {
    /// The session parameters, sid included.
    pub params: SessionParams,
    /// The rid the next new request carries.
    pub next_rid: u64,
    /// The highest rid whose response was handed on (the window's base).
    pub handed_on: u64,
    /// Requests sent (or about to be) whose responses were not handed on, ascending, byte for
    /// byte: resent first, each once, to collect their (cached) responses.
    pub unanswered: Vec<(u64, Bytes)>,
    /// Stanzas received during login, handed on first.
    pub early: Vec<Element>,
}

impl Start {
    /// A session at `next_rid` with nothing pending but `early` stanzas to hand on.
    pub(crate) fn fresh(params: SessionParams, next_rid: u64, early: Vec<Element>) -> Self {
        Start {
            params,
            next_rid,
            handed_on: next_rid - 1,
            unanswered: Vec::new(),
            early,
        }
    }
}

/// Sends to a session. The session ends (with a clean terminate) when every handle is dropped.
///
/// Backpressure: `send` waits while the session has [`OUTBOX_CAP`] stanzas queued. An owner that
/// also reads the session's events must not block on `send` while it is not reading them.
#[derive(Clone, Debug)]
pub struct BoshHandle {
    tx: mpsc::Sender<Command>,
    /// The rid the next new request will carry, for status displays.
    rid: Arc<AtomicU64>,
    /// The highest rid the owner confirmed as handed on.
    acked: Arc<watch::Sender<u64>>,
    /// The scheduler's task, for tests that simulate a crash.
    #[cfg(test)]
    task: tokio::task::AbortHandle,
}

impl BoshHandle {
    /// Queues one stanza for the next request.
    pub async fn send(&self, stanza: Element) -> Result<(), BoshError> {
        self.send_all(vec![stanza]).await
    }

    /// Queues stanzas, in order, for the next request.
    pub async fn send_all(&self, stanzas: Vec<Element>) -> Result<(), BoshError> {
        self.tx
            .send(Command::Send(stanzas))
            .await
            .map_err(|_| BoshError::Closed)
    }

    /// Queues one stanza without waiting; fails when the session's queue is full (or it ended).
    /// For owners that must never block on upstream.
    pub fn try_send(&self, stanza: Element) -> Result<(), BoshError> {
        self.tx
            .try_send(Command::Send(vec![stanza]))
            .map_err(|_| BoshError::Closed)
    }

    /// Confirms that the response of `rid` (and of every lower rid) has been taken in and its
    /// `HandedOn` mark written to the store (SPEC §8). Opens the window for new requests (see
    /// the module documentation). Synchronous and never blocks; lower values than one already
    /// given are ignored, and it does nothing once the session has ended. An owner that keeps
    /// nothing to resume from may confirm everything at once with `handed_on(u64::MAX)`.
    pub fn handed_on(&self, rid: u64) {
        self.acked.send_if_modified(|acked| {
            let raise = rid > *acked;
            if raise {
                *acked = rid;
            }
            raise
        });
    }

    /// The session's counters. Commands are handled in order, so this also confirms that every
    /// stanza sent before it has been queued.
    pub async fn stats(&self) -> Result<Stats, BoshError> {
        self.ask(Command::Stats).await
    }

    /// Ends the session: queued stanzas and `farewell` (e.g. unavailable presence) go in a
    /// `type='terminate'` request. Returns when it was sent (or failed to be).
    pub async fn terminate(&self, farewell: Vec<Element>) -> Result<(), BoshError> {
        self.ask(|done| Command::Terminate { farewell, done }).await
    }

    /// Stops the session without ending it upstream (SPEC §8): nothing more is posted, the
    /// requests in flight are dropped here (they stay at the server, and in the store), and the
    /// stanzas queued but not yet sent are returned, in order, for the owner to keep. Everything
    /// else a new owner needs is in the store; [`BoshClient::resume`](super::BoshClient::resume)
    /// takes it from there. The session then ends with `Ended(Ok(()))`.
    pub async fn suspend(&self) -> Result<Vec<Element>, BoshError> {
        self.ask(Command::Suspend).await
    }

    /// Sends the command `make` builds around a reply channel, and waits for the reply.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, BoshError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| BoshError::Closed)?;
        rx.await.map_err(|_| BoshError::Closed)
    }

    /// The rid the next new request will carry.
    pub fn next_rid(&self) -> u64 {
        self.rid.load(Ordering::Relaxed)
    }

    /// True once the session's task has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Stops the scheduler's task where it stands, as a crash of the process would: no more
    /// code of it runs, nothing is sent, nothing is written.
    #[cfg(test)]
    pub(crate) fn crash(&self) {
        self.task.abort();
    }
}

/// Starts the scheduler for an established session in state `s`, writing through `store`: its
/// unanswered requests are resent first (oldest first, each once, byte-identical), its early
/// stanzas handed on first.
pub(crate) fn spawn(
    transport: Transport,
    config: &BoshConfig,
    jid: Jid,
    features: Option<Element>,
    store: SessionStore,
    s: Start,
) -> BoshSession {
    let Start {
        params,
        next_rid: rid,
        handed_on,
        unanswered: mut resend,
        early,
    } = s;
    // Anything older than the server's two-reply cache would never be answered by ejabberd (and
    // poisons the session), so it is not resent; the window keeps it from occurring unless marks
    // could not be written.
    let oldest_useful = rid.saturating_sub(u64::from(params.requests.max(2)));
    resend.retain(|(r, _)| *r >= oldest_useful && *r > handed_on);
    tracing::debug!(
        next_rid = rid,
        handed_on,
        resend = ?resend.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        "upstream session resumed"
    );
    let acked = resend
        .first()
        .map_or(rid - 1, |(r, _)| r - 1)
        .max(handed_on);
    let (tx, commands) = mpsc::channel(CHANNEL_CAP);
    let (event_tx, events) = mpsc::channel(CHANNEL_CAP);
    let (acked_tx, acked_rx) = watch::channel(acked);
    let wait = Duration::from_secs(u64::from(params.wait));
    let inactivity = Duration::from_secs(u64::from(params.inactivity.unwrap_or(60)));
    let rid_shown = Arc::new(AtomicU64::new(rid));
    let mut scheduler = Scheduler {
        transport,
        jid: jid.clone(),
        timeouts: config.timeouts,
        sid: params.sid.clone(),
        next_rid: rid,
        next_deliver: acked + 1,
        requests: params.requests.max(1) as usize,
        request_timeout: wait + config.timeouts.margin,
        polling: Duration::from_secs(u64::from(params.polling.unwrap_or(5))).min(inactivity / 2),
        max_request_bytes: config.max_request_bytes,
        in_flight: BTreeMap::new(),
        answered: BTreeMap::new(),
        outbox: VecDeque::new(),
        tasks: JoinSet::new(),
        events: event_tx,
        metrics: config.metrics.clone(),
        rid_shown: rid_shown.clone(),
        stats: Stats::default(),
        degraded: false,
        empty_not_before: None,
        last_post: None,
        order_wait: None,
        cuts: CutDetector::new(params.wait, config.wait_hint.clone()),
        store: store.clone(),
        acked: acked_rx,
        written: Arc::new(watch::Sender::new(rid - 1)),
        on_wire: Arc::new(watch::Sender::new(acked)),
        wire: Arc::default(),
        fenced: Arc::new(AtomicBool::new(false)),
    };
    // Oldest first, each once; a younger one goes out when the older ones are answered (a rid the
    // server deferred must not arrive twice).
    for (r, bytes) in resend {
        scheduler.in_flight.insert(
            r,
            InFlight {
                bytes,
                attempt: 0,
                empty: false,
                resent: true,
                parked: true,
            },
        );
    }
    if !scheduler.in_flight.is_empty() {
        // A new request keeps its distance from the resend, as from any unanswered request.
        scheduler.last_post = Some(Instant::now());
    }
    scheduler.unpark();
    let task = tokio::spawn(scheduler.run(commands, early));
    #[cfg(not(test))]
    drop(task);
    BoshSession {
        handle: BoshHandle {
            tx,
            rid: rid_shown,
            acked: Arc::new(acked_tx),
            #[cfg(test)]
            task: task.abort_handle(),
        },
        events,
        jid,
        params,
        features,
        store,
    }
}

/// A request sent and not yet answered.
struct InFlight {
    /// Exactly what was sent, for byte-identical resends.
    bytes: Bytes,
    /// 0 for the first send; only the reply of the latest attempt counts.
    attempt: u32,
    /// Whether it carried no stanzas.
    empty: bool,
    /// Whether it has been sent more than once (or by a process before us): its answer may be a
    /// replay or an echo.
    resent: bool,
    /// A resend waiting for every older request to be answered (nothing of it in flight now).
    parked: bool,
}

/// The outcome of one HTTP attempt, from the task that made it.
struct Reply {
    rid: u64,
    attempt: u32,
    sent_at: Instant,
    result: Result<Response, PostError>,
}

/// What a request task ends with.
enum Outcome {
    /// It posted and got an answer or a failure.
    Posted(Reply),
    /// The store refused its write-ahead record (or another task's): the session is another
    /// owner's now. The epoch now, when known.
    Fenced(Option<u64>),
}

struct Scheduler {
    transport: Transport,
    /// The session's full JID, the sender of error replies to dropped stanzas.
    jid: Jid,
    timeouts: Timeouts,
    sid: String,
    next_rid: u64,
    /// The lowest rid whose response has not been handed on yet.
    next_deliver: u64,
    requests: usize,
    request_timeout: Duration,
    polling: Duration,
    max_request_bytes: usize,
    in_flight: BTreeMap<u64, InFlight>,
    /// Responses that arrived before an earlier rid's.
    answered: BTreeMap<u64, Body>,
    outbox: VecDeque<Element>,
    tasks: JoinSet<Outcome>,
    events: mpsc::Sender<BoshEvent>,
    metrics: Arc<Metrics>,
    rid_shown: Arc<AtomicU64>,
    stats: Stats,
    /// A request failed and no response has arrived since.
    degraded: bool,
    /// Set when the server answered an empty request without holding it, so we do not spin.
    empty_not_before: Option<Instant>,
    /// When the latest new request was posted.
    last_post: Option<Instant>,
    /// Set when a new request waits for [`ORDER_GAP`] to pass.
    order_wait: Option<Instant>,
    /// Learns from held requests cut by a proxy (SPEC §7).
    cuts: CutDetector,
    /// Where the write-ahead records go.
    store: SessionStore,
    /// The highest rid the owner confirmed as handed on ([`BoshHandle::handed_on`]).
    acked: watch::Receiver<u64>,
    /// The highest new rid whose write-ahead record is done (or given up on): a new rid is
    /// posted only after every older one, whatever order their writes complete in.
    written: Arc<watch::Sender<u64>>,
    /// The highest rid the HTTP client has taken to write on a connection (new or resent): a new
    /// rid goes out only once the one before it has, however late the runtime ran that one's
    /// task — a time gap alone did not hold under load (ejabberd then never processed the
    /// younger request).
    on_wire: Arc<watch::Sender<u64>>,
    /// When the latest new request went on the wire (after its write-ahead record): the next
    /// one goes [`ORDER_GAP`] later while that one is unanswered, however fast its own record
    /// was written.
    wire: Arc<parking_lot::Mutex<Option<Instant>>>,
    /// Set by the first request task whose write was fenced; checked before anything is posted
    /// or handed on, so that nothing slips through before the scheduler sees that task's end.
    fenced: Arc<AtomicBool>,
}

/// The owner stopped listening; the session should end.
struct Deaf;

impl Scheduler {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, early: Vec<Element>) {
        let mut ended = None;
        if !early.is_empty() {
            let rid = self.next_deliver - 1;
            match self.hand_on(rid, early).await {
                Ok(()) => {}
                Err(Ended::Error(e)) => ended = Some(Err(e)),
                Err(Ended::Deaf) => ended = Some(Ok(())),
            }
        }
        while ended.is_none() {
            self.fill();
            let poll_at = match (self.in_flight.is_empty(), self.empty_not_before) {
                (true, Some(at)) => Some(at),
                _ => None,
            }
            .or(self.order_wait);
            tokio::select! {
                cmd = commands.recv(), if self.outbox.len() < OUTBOX_CAP => match cmd {
                    Some(Command::Send(stanzas)) => self.outbox.extend(stanzas),
                    Some(Command::Stats(reply)) => {
                        let _ = reply.send(self.stats());
                    }
                    Some(Command::Suspend(reply)) => {
                        let _ = reply.send(self.suspend());
                        ended = Some(Ok(()));
                    }
                    Some(Command::Terminate { farewell, done }) => {
                        self.terminate(farewell).await;
                        let _ = done.send(());
                        ended = Some(Ok(()));
                    }
                    None => {
                        self.terminate(Vec::new()).await;
                        ended = Some(Ok(()));
                    }
                },
                Some(joined) = self.tasks.join_next() => {
                    let outcome = joined.expect("request tasks do not panic and are aborted only on exit");
                    let result = match outcome {
                        Outcome::Posted(reply) => self.on_reply(reply).await,
                        Outcome::Fenced(current) => {
                            tracing::warn!(?current, "session taken over by another owner; stopping at once");
                            Err(Ended::Error(BoshError::Fenced))
                        }
                    };
                    match result {
                        Ok(()) => {}
                        Err(Ended::Error(e)) => ended = Some(Err(e)),
                        Err(Ended::Deaf) => {
                            self.terminate(Vec::new()).await;
                            ended = Some(Ok(()));
                        }
                    }
                }
                // The owner confirmed a response: the window may let a new request out.
                Ok(()) = self.acked.changed() => {}
                () = tokio::time::sleep_until(poll_at.unwrap_or_else(Instant::now)), if poll_at.is_some() => {
                    let now = Instant::now();
                    if self.order_wait.is_some_and(|at| at <= now) {
                        self.order_wait = None;
                    } else {
                        self.empty_not_before = None;
                    }
                }
            }
        }
        self.tasks.abort_all();
        let end = if self.fenced.load(Ordering::SeqCst) {
            Err(BoshError::Fenced)
        } else {
            ended.unwrap_or(Ok(()))
        };
        match &end {
            Ok(()) => tracing::debug!("upstream session ended"),
            Err(e) => tracing::info!(error = %e, "upstream session lost"),
        }
        let _ = self.events.send(BoshEvent::Ended(end)).await;
    }

    fn stats(&self) -> Stats {
        Stats {
            next_rid: self.next_rid,
            in_flight: self.in_flight.len(),
            queued: self.outbox.len(),
            ..self.stats.clone()
        }
    }

    /// Whether the window lets the next new rid out: at most `requests` rids above the highest
    /// one the owner confirmed.
    fn window_open(&self) -> bool {
        self.next_rid.saturating_sub(*self.acked.borrow()) <= self.requests as u64
    }

    /// Sends new requests while the rules allow: queued stanzas whenever a slot (and the window)
    /// is free, and an empty request whenever nothing is in flight.
    fn fill(&mut self) {
        while self.in_flight.len() < self.requests && self.window_open() {
            if self.outbox.is_empty() {
                let may_poll = self.empty_not_before.is_none_or(|at| Instant::now() >= at);
                if self.in_flight.is_empty() && may_poll {
                    self.empty_not_before = None;
                    self.send_new(String::new(), true);
                }
                return;
            }
            if !self.in_flight.is_empty()
                && let Some(at) = self.last_post.map(|t| t + ORDER_GAP)
                && Instant::now() < at
            {
                self.order_wait = Some(at);
                return;
            }
            let payload = self.take_batch();
            self.send_new(payload, false);
        }
    }

    /// Serializes queued stanzas up to the request size limit (at least one).
    fn take_batch(&mut self) -> String {
        let mut payload = String::new();
        while let Some(stanza) = self.outbox.front() {
            let before = payload.len();
            stanza.write_xml(&mut payload, ns::HTTPBIND);
            if payload.len() > self.max_request_bytes && before > 0 {
                payload.truncate(before);
                break;
            }
            self.outbox.pop_front();
            self.stats.stanzas_out += 1;
        }
        payload
    }

    fn send_new(&mut self, payload: String, empty: bool) {
        let rid = self.next_rid;
        self.next_rid += 1;
        self.rid_shown.store(self.next_rid, Ordering::Relaxed);
        self.last_post = Some(Instant::now());
        let bytes = body::request_bytes(rid, &self.sid, &payload);
        self.in_flight.insert(
            rid,
            InFlight {
                bytes: bytes.clone(),
                attempt: 0,
                empty,
                resent: false,
                parked: false,
            },
        );
        self.stats.requests += 1;
        self.metrics
            .upstream_requests
            .fetch_add(1, Ordering::Relaxed);
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.in_flight.len());
        self.post_new(rid, bytes);
    }

    /// Posts the new request `rid` once its write-ahead record is in the store and every older
    /// new rid has been posted. The write is awaited in the request's task, never here.
    fn post_new(&mut self, rid: u64, bytes: Bytes) {
        let transport = self.transport.clone();
        let timeout = self.request_timeout;
        let store = self.store.clone();
        let written = self.written.clone();
        let fenced = self.fenced.clone();
        let metrics = self.metrics.clone();
        let wire = self.wire.clone();
        let acked = self.acked.clone();
        let on_wire = self.on_wire.clone();
        self.tasks.spawn(async move {
            match store.request(rid, bytes.clone()).await {
                Ok(()) => {}
                Err(StoreError::Fenced { current }) => {
                    fenced.store(true, Ordering::SeqCst);
                    return Outcome::Fenced(current);
                }
                Err(e) => store_failed(&metrics, &e),
            }
            // Requests reach the server in rid order, whichever write finished first: after the
            // older one, and ORDER_GAP after it got on the wire while it is unanswered (records
            // written in the same instant must not put two requests on the wire together).
            let _ = written.subscribe().wait_for(|w| *w + 1 >= rid).await;
            if acked.borrow().saturating_add(1) < rid {
                let _ = on_wire.subscribe().wait_for(|w| *w + 1 >= rid).await;
            }
            let previous = *wire.lock();
            if let Some(at) = previous
                && acked.borrow().saturating_add(1) < rid
            {
                tokio::time::sleep_until(at + ORDER_GAP).await;
            }
            *wire.lock() = Some(Instant::now());
            written.send_if_modified(|w| {
                let raise = rid > *w;
                if raise {
                    *w = rid;
                }
                raise
            });
            if fenced.load(Ordering::SeqCst) {
                return Outcome::Fenced(None);
            }
            metrics.upstream_posts.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(rid, "posting");
            let sent_at = Instant::now();
            let result = transport
                .post_noting(bytes, timeout, move || note_on_wire(&on_wire, rid))
                .await;
            Outcome::Posted(Reply {
                rid,
                attempt: 0,
                sent_at,
                result,
            })
        });
    }

    /// Posts a resend of `rid` after `delay` (no write-ahead record: the first one stands). The
    /// epoch is confirmed first: a node that was paused past its lease must not resend into a
    /// session another node has adopted meanwhile (SPEC §12); an unreachable store does not
    /// hold the resend up.
    fn post(&mut self, rid: u64, attempt: u32, bytes: Bytes, delay: Duration) {
        let transport = self.transport.clone();
        let timeout = self.request_timeout;
        let fenced = self.fenced.clone();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let wire = self.wire.clone();
        let on_wire = self.on_wire.clone();
        // Counted as on the wire from now (its task sets the moment again when it posts): a
        // new request's task reading the time before that must not take the path as clear.
        let expected = Instant::now() + delay;
        *wire.lock() = Some(expected);
        self.last_post = Some(expected);
        self.tasks.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Err(StoreError::Fenced { current }) = store.confirm().await {
                fenced.store(true, Ordering::SeqCst);
                return Outcome::Fenced(current);
            }
            if fenced.load(Ordering::SeqCst) {
                return Outcome::Fenced(None);
            }
            metrics.upstream_posts.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(rid, attempt, "posting again");
            // A new request keeps its distance from a resend as from any older request: one
            // overtaking the resend of a rid the server had already seen gets that resend
            // refused.
            *wire.lock() = Some(Instant::now());
            let sent_at = Instant::now();
            let result = transport
                .post_noting(bytes, timeout, move || note_on_wire(&on_wire, rid))
                .await;
            Outcome::Posted(Reply {
                rid,
                attempt,
                sent_at,
                result,
            })
        });
    }

    /// Whether `body`, the answer to `rid`, is Prosody's refusal of a resent request it had
    /// received (and held) before a younger one arrived: it answers `item-not-found` without
    /// ending the session (RECOVERY.md), and the request's stanzas were processed the first
    /// time. Taken as an empty answer while a younger request is still to be answered — if the
    /// session is really gone, that one is refused too, and ends it.
    fn seen_before(&self, rid: u64, body: &Body) -> bool {
        body.body_type() == BodyType::Terminate
            && body.condition() == Some("item-not-found")
            && body.children().next().is_none()
            && self.in_flight.get(&rid).is_some_and(|r| r.resent)
            && self.in_flight.range(rid + 1..).next().is_some()
    }

    async fn on_reply(&mut self, reply: Reply) -> Result<(), Ended> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Ended::Error(BoshError::Fenced));
        }
        let Some(req) = self.in_flight.get(&reply.rid) else {
            return Ok(()); // answered already, by an earlier attempt of a resend
        };
        if req.attempt != reply.attempt {
            return Ok(()); // superseded by a resend
        }
        let body = match reply.result {
            Ok(Response { body, dropped }) => {
                self.on_dropped(dropped);
                body
            }
            Err(PostError::Transient(e)) => return self.retry(reply.rid, e).await,
            Err(PostError::Status(status, reason)) => {
                return Err(Ended::Error(BoshError::HttpStatus(status, reason)));
            }
        };
        tracing::trace!(rid = reply.rid, kind = ?body.body_type(), "answered");
        let body = if self.seen_before(reply.rid, &body) {
            tracing::debug!(
                rid = reply.rid,
                "resent request refused as already seen; the younger requests go on"
            );
            Body::empty()
        } else {
            body
        };
        match body.body_type() {
            BodyType::Error => {
                // XEP-0124 §17.3: resend every request not yet answered, in rid order.
                let rids: Vec<u64> = self.in_flight.keys().copied().collect();
                for rid in rids {
                    self.retry(
                        rid,
                        TransportError::Connection("recoverable binding error".into()),
                    )
                    .await?;
                }
                Ok(())
            }
            BodyType::Terminate => {
                self.in_flight.remove(&reply.rid);
                // Hand on what arrived before, in order, then this body's stanzas, then the end.
                let earlier = std::mem::take(&mut self.answered);
                for (rid, b) in earlier.into_iter().filter(|(rid, _)| *rid < reply.rid) {
                    self.hand_on(rid, b.into_children()).await?;
                }
                let (stanzas, error) = terminated(body);
                self.hand_on(reply.rid, stanzas).await?;
                Err(Ended::Error(error))
            }
            BodyType::Normal => {
                let req = self.in_flight.remove(&reply.rid).expect("checked above");
                let body = if req.resent && is_echo(&body, &req.bytes) {
                    tracing::debug!(
                        rid = reply.rid,
                        "resent request answered with its own stanzas; taken as empty"
                    );
                    Body::empty()
                } else {
                    body
                };
                self.unpark();
                if !req.empty {
                    self.metrics
                        .upstream_latency
                        .observe(reply.sent_at.elapsed());
                }
                // Not after a resend: ejabberd answers a rid it has answered before from its
                // cache at once, while a receiver of that rid cut by a proxy stays registered
                // there and takes (and loses) whatever comes next until a new rid arrives.
                if req.empty
                    && !req.resent
                    && self.in_flight.is_empty()
                    && body.children().next().is_none()
                    && reply.sent_at.elapsed() < MIN_HOLD
                {
                    self.empty_not_before = Some(Instant::now() + self.polling);
                }
                if self.degraded {
                    self.degraded = false;
                    self.emit(BoshEvent::Recovered)
                        .await
                        .map_err(|Deaf| Ended::Deaf)?;
                }
                self.answered.insert(reply.rid, body);
                while let Some(b) = self.answered.remove(&self.next_deliver) {
                    let rid = self.next_deliver;
                    self.next_deliver += 1;
                    self.hand_on(rid, b.into_children()).await?;
                }
                Ok(())
            }
        }
    }

    /// Counts stanzas the reader dropped from a response and answers their senders where an
    /// answer is due. Never a reason to resend: the same request would bring the same stanza.
    fn on_dropped(&mut self, dropped: Vec<Dropped>) {
        for d in dropped {
            self.metrics.inbound_dropped(d.reason);
            tracing::info!(reason = d.reason.label(), "inbound stanza dropped");
            if let Some(reply) = d.root.and_then(|root| bounce(&root, &self.jid, d.reason)) {
                self.outbox.push_back(reply);
            }
        }
    }

    /// Schedules a byte-identical resend of `rid`, or gives up once the budget is spent. A held
    /// request cut by a proxy ([`TransportError::Cut`]) is no failure: the server had it, so it is
    /// resent at once, spends no retry and raises no [`BoshEvent::Retrying`] (SPEC §7).
    async fn retry(&mut self, rid: u64, error: TransportError) -> Result<(), Ended> {
        let Some(req) = self.in_flight.get_mut(&rid) else {
            return Ok(());
        };
        if let TransportError::Cut { held, cause } = error {
            // The same attempt number: the cut attempt's task is over, so no stale reply can carry
            // it. A cut is held for `CUT_MIN_HELD` at least, so this cannot spin.
            req.resent = true;
            let (attempt, bytes) = (req.attempt, req.bytes.clone());
            self.metrics.upstream_cuts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                held_ms = held.as_millis(),
                cause = %cause,
                "held upstream request cut, resending"
            );
            if let Some(steady) = self.cuts.record(held) {
                tracing::warn!(
                    cut_after_ms = steady.cut_after.as_millis(),
                    wait = steady.wait,
                    next_wait = steady.next_wait,
                    "held upstream requests are cut at a steady time below wait (a proxy's \
                     timeout?); new upstream sessions will ask for next_wait seconds; better, \
                     raise the proxy's timeout above wait"
                );
            }
            if self.in_flight.range(..rid).next().is_some() {
                // As for a failure: not while an older request is unanswered.
                self.in_flight
                    .get_mut(&rid)
                    .expect("looked up above")
                    .parked = true;
                return Ok(());
            }
            self.post(rid, attempt, bytes, Duration::ZERO);
            return Ok(());
        }
        req.attempt += 1;
        req.resent = true;
        let attempt = req.attempt;
        if attempt > self.timeouts.max_retries {
            return Err(Ended::Error(BoshError::RetriesExhausted {
                attempts: attempt,
                last: error,
            }));
        }
        let bytes = req.bytes.clone();
        self.stats.retries += 1;
        self.metrics
            .upstream_retries
            .fetch_add(1, Ordering::Relaxed);
        self.degraded = true;
        tracing::debug!(attempt, error = %error, "upstream request failed, resending");
        self.emit(BoshEvent::Retrying {
            rid,
            attempt,
            error,
        })
        .await
        .map_err(|Deaf| Ended::Deaf)?;
        if self.in_flight.range(..rid).next().is_some() {
            // An older request is unanswered: the server may hold this one deferred, and a second
            // copy would crash an ejabberd session. It goes out once the older ones are answered.
            self.in_flight
                .get_mut(&rid)
                .expect("looked up above")
                .parked = true;
            return Ok(());
        }
        let delay = self.timeouts.backoff(attempt);
        self.post(rid, attempt, bytes, delay);
        Ok(())
    }

    /// Posts the oldest unanswered request if it is a parked resend (see [`Scheduler::retry`]).
    fn unpark(&mut self) {
        let Some((&rid, req)) = self.in_flight.iter_mut().next() else {
            return;
        };
        if req.parked {
            req.parked = false;
            let (attempt, bytes) = (req.attempt, req.bytes.clone());
            self.post(rid, attempt, bytes, Duration::ZERO);
        }
    }

    /// Stops without ending the session upstream: requests in flight are dropped here (they stay
    /// at the server and in the store) and the stanzas not yet sent are returned.
    fn suspend(&mut self) -> Vec<Element> {
        self.tasks.abort_all();
        self.in_flight.clear();
        self.answered.clear();
        self.outbox.drain(..).collect()
    }

    /// Sends queued stanzas and `farewell` in a terminate request, then drops every other request
    /// (a server may not release a held request after a terminate). Requests in flight are left
    /// running until then: one aborted before it reached the server would leave a gap in the rids,
    /// and the server would hold the terminate waiting for it.
    async fn terminate(&mut self, farewell: Vec<Element>) {
        // The session may be another owner's (this node was paused past its lease): ending it
        // would end theirs.
        if self.fenced.load(Ordering::SeqCst)
            || matches!(self.store.confirm().await, Err(StoreError::Fenced { .. }))
        {
            self.fenced.store(true, Ordering::SeqCst);
            self.tasks.abort_all();
            return;
        }
        let mut payload = String::new();
        for stanza in self.outbox.drain(..).chain(farewell) {
            stanza.write_xml(&mut payload, ns::HTTPBIND);
            self.stats.stanzas_out += 1;
        }
        let rid = self.next_rid;
        self.next_rid += 1;
        let bytes = body::terminate_bytes(rid, &self.sid, &payload);
        self.metrics.upstream_posts.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.transport.post(bytes, self.request_timeout).await {
            tracing::debug!(error = ?e, "terminate request failed; the server will time the session out");
        }
        self.tasks.abort_all();
        self.in_flight.clear();
    }

    /// Emits the response of `rid`, unless a write-ahead record was fenced: then nothing more
    /// reaches the owner, not even a response already read.
    async fn hand_on(&mut self, rid: u64, stanzas: Vec<Element>) -> Result<(), Ended> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Ended::Error(BoshError::Fenced));
        }
        self.stats.stanzas_in += stanzas.len() as u64;
        self.emit(BoshEvent::Response { rid, stanzas })
            .await
            .map_err(|Deaf| Ended::Deaf)
    }

    async fn emit(&self, event: BoshEvent) -> Result<(), Deaf> {
        self.events.send(event).await.map_err(|_| Deaf)
    }
}

/// Raises `on_wire` to `rid` (it only grows).
fn note_on_wire(on_wire: &watch::Sender<u64>, rid: u64) {
    on_wire.send_if_modified(|w| {
        let raise = rid > *w;
        if raise {
            *w = rid;
        }
        raise
    });
}

enum Ended {
    Error(BoshError),
    Deaf,
}

/// Counts a failed write-ahead record (the request is posted anyway) and warns at most once a
/// minute for the whole process, so that a store outage does not flood the log.
fn store_failed(metrics: &Metrics, error: &StoreError) {
    static LAST_WARNING: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    metrics.store_errors.fetch_add(1, Ordering::Relaxed);
    let now = std::time::Instant::now();
    let mut last = LAST_WARNING.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|at| now.duration_since(at) >= STORE_WARN_EVERY) {
        *last = Some(now);
        tracing::warn!(
            %error,
            "session store write failed; request posted without its write-ahead record \
             (failures are counted in boshmux_store_errors_total, logged once a minute)"
        );
    }
}

/// The error reply to a stanza dropped on its way in, for the kinds whose sender waits for an
/// answer or should learn its message was not delivered: an iq get/set, a chat or normal
/// message (not groupchat: a room may remove an occupant who bounces; not headline or error).
/// `policy-violation` for a stanza too large, `not-acceptable` for one the strict parser refused
/// (RFC 6120 §8.3.3); `type='modify'` since the sender could send it differently.
fn bounce(root: &Element, me: &Jid, reason: DropReason) -> Option<Element> {
    let ty = root.attr("type");
    let due = root.ns == ns::CLIENT
        && match root.name.as_str() {
            "iq" => matches!(ty, Some("get" | "set")),
            "message" => matches!(ty, None | Some("chat" | "normal")),
            _ => false,
        };
    let sender = root.attr("from")?;
    if !due {
        return None;
    }
    let (condition, text) = match reason {
        DropReason::TooLarge | DropReason::BodyFull => ("policy-violation", "stanza too large"),
        DropReason::Invalid => ("not-acceptable", "stanza not accepted by the recipient"),
    };
    let mut reply = Element::new(root.name.clone(), ns::CLIENT)
        .with_attr("type", "error")
        .with_attr("to", sender)
        .with_attr("from", me.to_string());
    if let Some(id) = root.attr("id") {
        reply.set_attr("id", id);
    }
    Some(
        reply.with_child(
            Element::new("error", ns::CLIENT)
                .with_attr("type", "modify")
                .with_child(Element::new(condition, ns::STANZAS))
                .with_child(Element::new("text", ns::STANZAS).with_text(text)),
        ),
    )
}

/// Whether `reply` is ejabberd's echo of the resent request `request`: it carries a `rid`
/// attribute (only its replays do) and exactly the stanzas the request carried (at least one).
fn is_echo(reply: &Body, request: &[u8]) -> bool {
    if reply.element.attr("rid").is_none() {
        return false;
    }
    let Ok(request) = Body::parse(request) else {
        return false;
    };
    let sent: Vec<&Element> = request.element.elements().collect();
    let got: Vec<&Element> = reply.element.elements().collect();
    !sent.is_empty() && sent.len() == got.len() && sent.iter().zip(&got).all(|(a, b)| same(a, b))
}

/// Equal as XML: names, namespaces, attributes in any order, children in order.
fn same(a: &Element, b: &Element) -> bool {
    use crate::xmpp::Node;
    fn attrs(e: &Element) -> Vec<(&Option<String>, &String, &String)> {
        let mut v: Vec<_> = e.attrs.iter().map(|a| (&a.ns, &a.name, &a.value)).collect();
        v.sort();
        v
    }
    a.name == b.name
        && a.ns == b.ns
        && attrs(a) == attrs(b)
        && a.children.len() == b.children.len()
        && a.children
            .iter()
            .zip(&b.children)
            .all(|(x, y)| match (x, y) {
                (Node::Element(x), Node::Element(y)) => same(x, y),
                (x, y) => x == y,
            })
}

/// Splits a terminate body into the stanzas it still carries (delivered first) and the error.
pub(crate) fn terminated(body: Body) -> (Vec<Element>, BoshError) {
    let condition = body.condition().map(str::to_owned);
    let mut stream_error = None;
    let mut stanzas = Vec::new();
    for el in body.into_children() {
        if el.is("error", ns::STREAM) {
            stream_error = el
                .elements()
                .find(|c| c.ns == ns::STREAMS && c.name != "text")
                .map(|c| c.name.clone());
        } else {
            stanzas.push(el);
        }
    }
    (
        stanzas,
        BoshError::Terminated {
            condition,
            stream_error,
        },
    )
}

#[cfg(test)]
mod tests;
