//! Pages that speak BOSH (XEP-0124 + XEP-0206, SPEC §4b): every page is a virtual BOSH session
//! of its own — own sid, rid window, `hold`, `requests`, `wait`, `inactivity` and response cache —
//! attached to the user's one real session through the same [`PageLink`](crate::session::PageLink)
//! as a WebSocket page. The session never learns which transport a page uses.
//!
//! One task per virtual session owns its state; HTTP requests reach it through [`BoshPages`] by
//! sid. Whatever ends a page (terminate, a rid out of window, inactivity, a close decided by the
//! session) ends that page only. Close codes of SPEC §4 map to terminate conditions as
//! [`close_condition`] documents.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Frame;
use super::close;
use super::conn::{self, BeforeSession, PageContext, Rate};
use super::frame::{self, PageInput, Rejection};
use crate::session::{AttachError, PageOut, PageReceiver, SessionHandle};
use crate::xmpp::{Element, Jid, Limits, ns};

/// Longest a page's request is held, seconds (a page may ask for less).
pub const MAX_WAIT: u32 = 60;
/// Most requests held at once for one page.
pub const MAX_HOLD: u32 = 2;
/// Shortest interval between a page's empty polling requests, seconds (advertised).
const POLLING: u32 = 2;
/// Requests sent in the one HTTP request queue of a page: `requests` is `hold + 1`.
const EXTRA_REQUESTS: u32 = 1;
/// Answered responses kept per page for repeated rids.
const CACHED: usize = 4;
/// Requests waiting in a page's queue before the HTTP layer answers `503`.
const QUEUE: usize = 8;

/// The httpbind namespace's `xmpp:` prefix (XEP-0206).
const XMPP_PREFIX_NS: &str = ns::XBOSH;

/// What a page's BOSH request is answered with: always HTTP 200 and a `<body/>` (XEP-0124 §17
/// conditions are in the body, so every client understands them).
pub type Reply = Bytes;

/// A request for an existing virtual session, in the order it arrived.
struct Incoming {
    rid: u64,
    body: Element,
    reply: oneshot::Sender<Reply>,
}

/// A virtual session as [`BoshPages`] knows it.
struct Entry {
    tx: mpsc::Sender<Incoming>,
    /// For a prebind: its user, and whether it is still unused.
    prebind: Option<(Jid, Arc<AtomicBool>)>,
    /// Creation order, for evicting the oldest unused prebind first.
    seq: u64,
    /// Dropped to end the page's task at once (an evicted prebind).
    _evict: Option<oneshot::Sender<()>>,
}

/// Every virtual BOSH session of the daemon by sid.
#[derive(Default)]
pub struct BoshPages {
    sessions: Mutex<HashMap<String, Entry>>,
    seq: AtomicU64,
    /// Put in front of every sid this node makes: in a cluster it names the node, so that a
    /// request landing on another node is sent on here (SPEC §12).
    sid_prefix: std::sync::OnceLock<String>,
}

/// The parameters a page asked for at creation (XEP-0124 §7.1), as granted.
#[derive(Debug, Clone, Copy)]
pub struct Granted {
    /// Longest a request is held.
    pub wait: Duration,
    /// Requests held at once.
    pub hold: u32,
    /// A page without a request for this long is gone.
    pub inactivity: Duration,
}

impl Granted {
    /// What a creation request asks for, within the daemon's bounds: `wait` 1–60 s, `hold` 1–2.
    pub fn from_request(body: &Element, inactivity: Duration) -> Granted {
        let num = |name: &str, default: u32| {
            body.attr(name)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(default)
        };
        Granted {
            wait: Duration::from_secs(u64::from(num("wait", MAX_WAIT).clamp(1, MAX_WAIT))),
            hold: num("hold", 1).clamp(1, MAX_HOLD),
            inactivity,
        }
    }

    fn requests(&self) -> u32 {
        self.hold + EXTRA_REQUESTS
    }
}

/// Why a prebind was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrebindError {
    /// Every page slot of the user holds an attached page (no unused prebind to evict).
    #[error("too many pages for this user")]
    TooManyPages,
}

impl BoshPages {
    /// Live virtual sessions.
    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unused prebinds of every user (for `/metrics` and `/status`).
    pub fn unused_prebinds_total(&self) -> usize {
        self.count_unused(|_| true)
    }

    /// Unused prebinds of `bare`.
    pub fn unused_prebinds(&self, bare: &Jid) -> usize {
        self.count_unused(|u| u == bare)
    }

    /// Unused prebinds whose user `of` accepts.
    fn count_unused(&self, of: impl Fn(&Jid) -> bool) -> usize {
        self.sessions
            .lock()
            .values()
            .filter(|e| {
                e.prebind
                    .as_ref()
                    .is_some_and(|(u, unused)| of(u) && unused.load(Ordering::Relaxed))
            })
            .count()
    }

    /// Starts a virtual session for a page's creation request (`body` has no sid): its
    /// creation response carries the sid and the SASL features. `spawn` runs the page's task
    /// (the daemon tracks it for a bounded stop).
    pub fn create(
        self: &Arc<Self>,
        body: &Element,
        rid: u64,
        ctx: PageContext,
        granted: Granted,
        spawn: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
    ) -> Reply {
        let sid = self.new_sid();
        let features = frame::sasl_features(ctx.cookie_user.is_some());
        let mut head = creation_head(&sid, &ctx.domain, &granted);
        if let Some(lang) = body.attr_ns(Some(ns::XML), "lang") {
            head.set_attr_ns(Some(ns::XML), "lang", lang);
        }
        let reply = wrap_body(&head, &[Frame::from(features)]);
        let (tx, rx) = mpsc::channel(QUEUE);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.sessions.lock().insert(
            sid.clone(),
            Entry {
                tx,
                prebind: None,
                seq,
                _evict: None,
            },
        );
        let mut page = VirtualPage::new(sid, ctx, granted, rid + 1, Phase::Auth { failures: 0 });
        page.cache.push_back((rid, reply.clone()));
        let pages = self.clone();
        spawn(Box::pin(page.run(rx, pages, None)));
        reply
    }

    /// A virtual session created ready-bound for `session` (SPEC §4b prebind): its sid and the
    /// rid the page's first request carries. It attaches to the session at that first request;
    /// unused, it ends after `unused_ttl`. While unused it counts against `pages_per_user`
    /// together with the pages attached: at the limit the oldest unused prebind of the user is
    /// evicted (so a reloading tab always gets in); with no unused prebind to evict, the answer is
    /// [`PrebindError::TooManyPages`].
    pub fn prebind(
        self: &Arc<Self>,
        session: SessionHandle,
        ctx: PageContext,
        granted: Granted,
        unused_ttl: Duration,
        pages_per_user: usize,
        spawn: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
    ) -> Result<(String, u64), PrebindError> {
        let bare = session.bare.clone();
        let sid = self.new_sid();
        // Strophe and Converse add to the rid; keep it well inside 2^53 (XEP-0124 §7.1).
        let rid = rand::random_range(1u64 << 20..1u64 << 40);
        let unused = Arc::new(AtomicBool::new(true));
        let (evict_tx, evict_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(QUEUE);
        {
            let mut sessions = self.sessions.lock();
            let attached = session.info().pages;
            let mut waiting: Vec<(u64, String)> = sessions
                .iter()
                .filter(|(_, e)| {
                    e.prebind
                        .as_ref()
                        .is_some_and(|(u, unused)| *u == bare && unused.load(Ordering::Relaxed))
                })
                .map(|(sid, e)| (e.seq, sid.clone()))
                .collect();
            waiting.sort_unstable();
            let mut over = (attached + waiting.len() + 1).saturating_sub(pages_per_user.max(1));
            if over > waiting.len() {
                return Err(PrebindError::TooManyPages);
            }
            for (_, old) in waiting {
                if over == 0 {
                    break;
                }
                // Dropping the entry drops its evict sender: its task ends at once.
                sessions.remove(&old);
                over -= 1;
            }
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            sessions.insert(
                sid.clone(),
                Entry {
                    tx,
                    prebind: Some((bare, unused.clone())),
                    seq,
                    _evict: Some(evict_tx),
                },
            );
        }
        let mut page = VirtualPage::new(
            sid.clone(),
            ctx,
            granted,
            rid,
            Phase::Prebound { session, unused },
        );
        page.inactive_after = unused_ttl;
        let pages = self.clone();
        spawn(Box::pin(page.run(rx, pages, Some(evict_rx))));
        Ok((sid, rid))
    }

    /// Hands a request to the virtual session `sid`; its answer, or a terminate with
    /// `item-not-found` for an unknown or ended sid.
    pub async fn request(&self, sid: &str, rid: u64, body: Element) -> Reply {
        let tx = self.sessions.lock().get(sid).map(|e| e.tx.clone());
        let Some(tx) = tx else {
            return terminate_reply(Some("item-not-found"), None);
        };
        let (reply, rx) = oneshot::channel();
        if tx.send(Incoming { rid, body, reply }).await.is_err() {
            return terminate_reply(Some("item-not-found"), None);
        }
        rx.await
            .unwrap_or_else(|_| terminate_reply(Some("item-not-found"), None))
    }

    fn remove(&self, sid: &str) {
        self.sessions.lock().remove(sid);
    }
}

impl BoshPages {
    /// Sets what every later sid starts with (once; a cluster node's tag).
    pub fn set_sid_prefix(&self, prefix: String) {
        let _ = self.sid_prefix.set(prefix);
    }

    /// Whether `sid` is a live virtual session of this node.
    pub fn knows(&self, sid: &str) -> bool {
        self.sessions.lock().contains_key(sid)
    }

    fn new_sid(&self) -> String {
        let prefix = self.sid_prefix.get().map_or("", String::as_str);
        format!("{prefix}{}", uuid::Uuid::new_v4().simple())
    }
}

/// The `<body/>` of a creation response (XEP-0124 §7.2, XEP-0206 §4).
fn creation_head(sid: &str, domain: &str, g: &Granted) -> Element {
    let mut head = Element::new("body", ns::HTTPBIND)
        .with_attr("sid", sid)
        .with_attr("wait", g.wait.as_secs().to_string())
        .with_attr("requests", g.requests().to_string())
        .with_attr("hold", g.hold.to_string())
        .with_attr("inactivity", g.inactivity.as_secs().max(1).to_string())
        .with_attr("polling", POLLING.to_string())
        .with_attr("ver", "1.6")
        .with_attr("from", domain)
        .with_attr("authid", sid);
    // Only one attribute in the xbosh namespace: the serializer declares a prefix per
    // namespaced attribute, and a second declaration of one prefix is not well-formed.
    head.set_attr_ns(Some(XMPP_PREFIX_NS), "version", "1.0");
    head
}

/// A response body around `frames` (stanzas and stream-level elements, each already written by
/// the daemon). Frames declare their own namespaces, so they are placed as they are.
fn wrap_body(head: &Element, frames: &[Frame]) -> Bytes {
    let head = head.to_xml();
    if frames.is_empty() {
        return Bytes::from(head);
    }
    let open = &head[..head.len() - 2];
    let mut out = String::with_capacity(head.len() + frames.iter().map(Frame::len).sum::<usize>());
    out.push_str(open);
    out.push('>');
    for f in frames {
        out.push_str(f.as_str());
    }
    out.push_str("</body>");
    Bytes::from(out)
}

/// A `type='terminate'` response, with a condition and a `<stream:error/>` when there is one.
pub fn terminate_reply(condition: Option<&str>, stream_error: Option<String>) -> Reply {
    let mut head = Element::new("body", ns::HTTPBIND).with_attr("type", "terminate");
    if let Some(c) = condition {
        head.set_attr("condition", c);
    }
    let frames: Vec<Frame> = stream_error.into_iter().map(Frame::from).collect();
    wrap_body(&head, &frames)
}

/// How a close of SPEC §4 reaches a BOSH page: the terminate condition (XEP-0124 §17.2) and,
/// where BOSH has no condition of its own, a `<stream:error/>` under `remote-stream-error`
/// (XEP-0206 §7) whose text is the close reason.
///
/// | close | terminate |
/// |---|---|
/// | 1000 normal | no condition |
/// | 1008 policy (bad auth, bad frame) | `remote-stream-error` + the stream error sent, or `policy-violation` |
/// | 1012 daemon restarting | `system-shutdown` |
/// | 4001 revoked | `remote-stream-error` + `<not-authorized/>` |
/// | 4002 too slow to read | `remote-stream-error` + `<resource-constraint/>` |
/// | 4003 too many pages | `policy-violation` |
/// | 4004 session lost | `remote-connection-failed` |
pub fn close_condition(code: u16, reason: &str) -> Reply {
    let stream = |condition: &str| {
        terminate_reply(
            Some("remote-stream-error"),
            Some(frame::stream_error(condition, reason)),
        )
    };
    match code {
        close::NORMAL => terminate_reply(None, None),
        close::RESTARTING => terminate_reply(Some("system-shutdown"), None),
        close::REVOKED => stream("not-authorized"),
        close::SLOW => stream("resource-constraint"),
        close::TOO_MANY_PAGES | close::POLICY => terminate_reply(Some("policy-violation"), None),
        close::LOST => terminate_reply(Some("remote-connection-failed"), None),
        _ => terminate_reply(Some("undefined-condition"), None),
    }
}

/// Where a virtual session's stream stands.
enum Phase {
    /// Before SASL success.
    Auth { failures: u32 },
    /// Authenticated, before bind.
    Authed { session: SessionHandle },
    /// Created by a prebind; attaches at the page's first request.
    Prebound {
        session: SessionHandle,
        unused: Arc<AtomicBool>,
    },
    /// Attached to the session.
    Bound(Bound),
}

struct Bound {
    session: SessionHandle,
    jid: Jid,
    out: PageReceiver,
}

/// A request processed and waiting for something to answer it with.
struct Held {
    rid: u64,
    replies: Vec<oneshot::Sender<Reply>>,
    until: Instant,
}

/// Frames waiting for a request to carry them; `counted` bytes are in the session's queue count.
struct Pending {
    frames: Vec<Frame>,
    counted: usize,
}

/// One page's virtual session: the task's state.
struct VirtualPage {
    sid: String,
    ctx: PageContext,
    granted: Granted,
    phase: Phase,
    /// The next rid to process.
    expected: u64,
    /// Requests that arrived ahead of a missing rid.
    early: BTreeMap<u64, (Element, Vec<oneshot::Sender<Reply>>)>,
    held: VecDeque<Held>,
    cache: VecDeque<(u64, Reply)>,
    pending: Pending,
    /// The page's end, once decided: answers every request from then on.
    ending: Option<Reply>,
    /// Whether a request was answered with `ending`.
    ending_sent: bool,
    /// With no request held, the page is gone once this much time passes.
    inactive_after: Duration,
    idle_since: Instant,
    rate: Rate,
}

impl VirtualPage {
    fn new(sid: String, ctx: PageContext, granted: Granted, expected: u64, phase: Phase) -> Self {
        let rate = Rate::new(ctx.send_rate);
        VirtualPage {
            sid,
            inactive_after: granted.inactivity,
            ctx,
            granted,
            phase,
            expected,
            early: BTreeMap::new(),
            held: VecDeque::new(),
            cache: VecDeque::new(),
            pending: Pending {
                frames: Vec::new(),
                counted: 0,
            },
            ending: None,
            ending_sent: false,
            idle_since: Instant::now(),
            rate,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Incoming>,
        pages: Arc<BoshPages>,
        evicted: Option<oneshot::Receiver<()>>,
    ) {
        let mut evicted = evicted;
        let handshake_deadline = Instant::now() + self.ctx.handshake_timeout;
        loop {
            let wake = self.next_wake(handshake_deadline);
            let bound_out = match &mut self.phase {
                Phase::Bound(b) if self.ending.is_none() => Some(&mut b.out),
                _ => None,
            };
            tokio::select! {
                incoming = rx.recv() => {
                    let Some(incoming) = incoming else { break };
                    self.take(incoming).await;
                }
                out = async { bound_out.expect("guarded").recv().await }, if bound_out.is_some() => {
                    match out {
                        Some(PageOut::Frame(f)) => {
                            self.pending.counted += f.len();
                            self.pending.frames.push(f);
                            self.drain_session_queue();
                        }
                        Some(PageOut::Close(code, reason)) => self.end_with(close_condition(code, reason), false).await,
                        None => self.end_with(close_condition(close::LOST, "session ended"), false).await,
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if self.held.is_empty() && self.early.is_empty()
                        && now.duration_since(self.idle_since) >= self.inactive_after
                    {
                        // Nobody is listening any more: the page is gone (SPEC §4b); the
                        // session carries on (its grace starts when its last page is gone).
                        tracing::debug!(page = self.ctx.page, "BOSH page inactive, ended");
                        break;
                    }
                    if !matches!(self.phase, Phase::Bound(_) | Phase::Prebound { .. })
                        && self.ending.is_none()
                        && now >= handshake_deadline
                    {
                        let text = frame::stream_error("connection-timeout", "handshake took too long");
                        self.end_with(terminate_reply(Some("remote-stream-error"), Some(text)), true).await;
                    }
                    self.expire_held();
                }
                () = self.ctx.shutdown.cancelled(), if self.ending.is_none() => {
                    self.end_with(close_condition(close::RESTARTING, "daemon restarting"), true).await;
                }
                _ = async { evicted.as_mut().expect("guarded").await }, if evicted.is_some() => break,
            }
            self.flush();
            // An ended page stays until its end was told to a request (or it goes inactive).
            if self.ending.is_some() && self.ending_sent && self.held.is_empty() {
                break;
            }
        }
        pages.remove(&self.sid);
        self.detach().await;
        // Requests still waiting get the end too (or item-not-found: the page is gone).
        let last = self
            .ending
            .clone()
            .unwrap_or_else(|| terminate_reply(Some("item-not-found"), None));
        for h in self.held.drain(..) {
            for r in h.replies {
                let _ = r.send(last.clone());
            }
        }
        rx.close();
        while let Ok(incoming) = rx.try_recv() {
            let _ = incoming.reply.send(last.clone());
        }
    }

    /// When the task must look at its timers next.
    fn next_wake(&self, handshake_deadline: Instant) -> Instant {
        let mut wake = self.idle_since + self.inactive_after;
        if let Some(h) = self.held.front() {
            wake = self.held.iter().map(|h| h.until).min().unwrap_or(h.until);
        }
        // Once the page's end is decided, the handshake deadline no longer matters: waking for
        // it (long past) would spin the task until the page goes inactive.
        if !matches!(self.phase, Phase::Bound(_) | Phase::Prebound { .. }) && self.ending.is_none()
        {
            wake = wake.min(handshake_deadline);
        }
        wake
    }

    /// Frames already queued by the session, without waiting.
    fn drain_session_queue(&mut self) {
        let Phase::Bound(b) = &mut self.phase else {
            return;
        };
        while let Some(out) = b.out.try_recv() {
            match out {
                PageOut::Frame(f) => {
                    self.pending.counted += f.len();
                    self.pending.frames.push(f);
                }
                PageOut::Close(code, reason) => {
                    self.ending = Some(close_condition(code, reason));
                    break;
                }
            }
        }
    }

    /// A request arrived: checked against the rid window, then processed in rid order.
    async fn take(&mut self, incoming: Incoming) {
        let Incoming { rid, body, reply } = incoming;
        if let Some(ending) = &self.ending {
            let _ = reply.send(ending.clone());
            self.ending_sent = true;
            return;
        }
        if rid < self.expected {
            // A repeated rid: the response already sent, byte for byte (XEP-0124 §14.3), or
            // the one it will get if it is still held.
            if let Some((_, cached)) = self.cache.iter().find(|(r, _)| *r == rid) {
                let _ = reply.send(cached.clone());
            } else if let Some(h) = self.held.iter_mut().find(|h| h.rid == rid) {
                h.replies.push(reply);
            } else {
                self.out_of_window(reply).await;
            }
            return;
        }
        if rid >= self.expected + u64::from(self.granted.requests()) {
            self.out_of_window(reply).await;
            return;
        }
        self.early
            .entry(rid)
            .or_insert_with(|| (body, Vec::new()))
            .1
            .push(reply);
        while let Some((body, replies)) = self.early.remove(&self.expected) {
            let rid = self.expected;
            self.expected += 1;
            self.process(rid, body, replies).await;
            if self.ending.is_some() {
                break;
            }
        }
    }

    /// XEP-0124 §14.2: a rid outside the window ends this page (`item-not-found`).
    async fn out_of_window(&mut self, reply: oneshot::Sender<Reply>) {
        let end = terminate_reply(Some("item-not-found"), None);
        let _ = reply.send(end.clone());
        self.end_with(end, true).await;
        self.ending_sent = true;
    }

    /// Ends the page with `reply` for every request from now on; detaches it at once.
    /// `tell_session` is false when the session decided the close itself.
    async fn end_with(&mut self, reply: Reply, tell_session: bool) {
        if self.ending.is_some() {
            return;
        }
        self.ending = Some(reply);
        if tell_session {
            self.detach().await;
        } else {
            // The session already dropped the page.
            self.phase = Phase::Auth { failures: 0 };
        }
    }

    async fn detach(&mut self) {
        let phase = std::mem::replace(&mut self.phase, Phase::Auth { failures: 0 });
        if let Phase::Bound(b) = phase {
            b.session.detach(self.ctx.page).await;
        }
    }

    /// Processes one request's contents, then holds it until there is something to answer.
    async fn process(&mut self, rid: u64, body: Element, replies: Vec<oneshot::Sender<Reply>>) {
        self.idle_since = Instant::now();
        if let Phase::Prebound { session, unused } = &self.phase {
            unused.store(false, Ordering::Relaxed);
            let session = session.clone();
            self.inactive_after = self.granted.inactivity;
            self.bind(session).await;
        }
        let restart = body.attr_ns(Some(ns::XBOSH), "restart") == Some("true");
        let terminate = body.attr("type") == Some("terminate");
        if restart && self.ending.is_none() {
            match &self.phase {
                Phase::Authed { .. } => self.push(frame::bind_features()),
                _ => {
                    self.stream_error("not-authorized", "authenticate first")
                        .await
                }
            }
        }
        for child in body.elements() {
            if self.ending.is_some() {
                break;
            }
            self.input(in_client_ns(child.clone())).await;
        }
        self.held.push_back(Held {
            rid,
            replies,
            until: Instant::now() + self.granted.wait,
        });
        if terminate && self.ending.is_none() {
            // The stanzas it carried went on; the page ends normally (XEP-0124 §12).
            self.end_with(terminate_reply(None, None), true).await;
        }
    }

    /// One element from the page's body, by phase: the handshake, or a stanza for the session.
    async fn input(&mut self, el: Element) {
        match &mut self.phase {
            Phase::Auth { failures } => {
                if el.is("abort", ns::SASL) {
                    self.push(conn::sasl_failure("aborted"));
                    return;
                }
                if !el.is("auth", ns::SASL) {
                    return self
                        .stream_error("not-authorized", "authenticate first")
                        .await;
                }
                match conn::authenticate(&self.ctx, &el).await {
                    Ok((user, session)) => {
                        tracing::debug!(user = %user, page = self.ctx.page, "BOSH page authenticated");
                        self.phase = Phase::Authed { session };
                        self.push(Element::new("success", ns::SASL).to_xml());
                    }
                    Err(condition) => {
                        *failures += 1;
                        let give_up = *failures >= conn::AUTH_ATTEMPTS;
                        self.push(conn::sasl_failure(condition));
                        if give_up {
                            self.stream_error(
                                "policy-violation",
                                "too many failed authentications",
                            )
                            .await;
                        }
                    }
                }
            }
            Phase::Authed { session } => {
                let is_bind = el.is("iq", ns::CLIENT)
                    && el.attr("type") == Some("set")
                    && el.child("bind", ns::BIND).is_some();
                if !is_bind {
                    return self
                        .stream_error("not-authorized", "bind a resource first")
                        .await;
                }
                let session = session.clone();
                if let Some(jid) = self.bind(session).await {
                    self.push(conn::bind_result(&el, &jid).to_xml());
                }
            }
            Phase::Prebound { .. } => {}
            Phase::Bound(b) => {
                let jid = b.jid.clone();
                // The same checks as a WebSocket frame (SPEC §5), on the stanza as written anew.
                let reply = match frame::read(&el.to_xml(), &self.ctx.limits, &jid) {
                    Ok(PageInput::Close) => {
                        return self.end_with(terminate_reply(None, None), true).await;
                    }
                    Ok(PageInput::Stanza(stanza)) => {
                        match conn::before_session(stanza, &jid, &mut self.rate) {
                            BeforeSession::Answer(reply) => Some(reply),
                            BeforeSession::Dropped => None,
                            BeforeSession::PassOn(stanza) => {
                                let session = b.session.clone();
                                if !session.from_page(self.ctx.page, stanza).await {
                                    let end = close_condition(close::LOST, "session ended");
                                    return self.end_with(end, false).await;
                                }
                                None
                            }
                        }
                    }
                    Err(Rejection::Stanza(reply)) => Some(reply),
                    Err(Rejection::Drop) => None,
                    Err(Rejection::Stream { condition, text }) => {
                        self.ctx
                            .metrics
                            .rejected_frames
                            .fetch_add(1, Ordering::Relaxed);
                        return self.stream_error(condition, &text).await;
                    }
                };
                if let Some(reply) = reply {
                    self.push(reply.to_xml());
                }
            }
        }
    }

    /// Attaches to the session; on failure the page ends with the close's condition.
    async fn bind(&mut self, session: SessionHandle) -> Option<Jid> {
        match conn::attach(&session, self.ctx.page).await {
            Ok((jid, out)) => {
                tracing::debug!(page = self.ctx.page, "BOSH page bound");
                self.phase = Phase::Bound(Bound {
                    session,
                    jid: jid.clone(),
                    out,
                });
                Some(jid)
            }
            Err(AttachError::TooManyPages) => {
                let end = close_condition(close::TOO_MANY_PAGES, "too many pages for this user");
                self.end_with(end, false).await;
                None
            }
            Err(AttachError::Gone) => {
                let end = close_condition(close::LOST, "session not available");
                self.end_with(end, false).await;
                None
            }
            Err(AttachError::Moving) => {
                let end = close_condition(close::RESTARTING, "session moving; reconnect");
                self.end_with(end, false).await;
                None
            }
        }
    }

    /// A stream error ends the page: `remote-stream-error` carrying it (XEP-0206 §7).
    async fn stream_error(&mut self, condition: &str, text: &str) {
        let error = frame::stream_error(condition, text);
        self.end_with(
            terminate_reply(Some("remote-stream-error"), Some(error)),
            true,
        )
        .await;
    }

    fn push(&mut self, text: String) {
        self.pending.frames.push(Frame::from(text));
    }

    /// Answers held requests: with the end, with what is pending (oldest request first), and
    /// the oldest with an empty body whenever more than `hold` are held.
    fn flush(&mut self) {
        if let Some(ending) = self.ending.clone() {
            // What was queued before the end goes out first, on the oldest request.
            if !self.pending.frames.is_empty()
                && let Some(h) = self.held.pop_front()
            {
                self.answer(h);
            }
            for h in self.held.drain(..) {
                self.ending_sent = true;
                for r in h.replies {
                    let _ = r.send(ending.clone());
                }
            }
            return;
        }
        while !self.pending.frames.is_empty()
            && let Some(h) = self.held.pop_front()
        {
            self.answer(h);
        }
        while self.held.len() > self.granted.hold as usize {
            let h = self.held.pop_front().expect("non-empty");
            self.answer(h);
        }
    }

    /// Held requests whose `wait` is over are answered (empty unless something is pending).
    fn expire_held(&mut self) {
        let now = Instant::now();
        while self.held.front().is_some_and(|h| h.until <= now) {
            let h = self.held.pop_front().expect("non-empty");
            self.answer(h);
        }
    }

    /// Answers `h` with every pending frame; the response is cached for a repeated rid.
    fn answer(&mut self, h: Held) {
        let frames = std::mem::take(&mut self.pending.frames);
        let counted = std::mem::take(&mut self.pending.counted);
        let reply = wrap_body(&Element::new("body", ns::HTTPBIND), &frames);
        if let Phase::Bound(b) = &self.phase {
            b.out.written(counted);
        }
        if !frames.is_empty() {
            let metrics = &self.ctx.metrics;
            metrics
                .frames_to_pages
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
            for f in &frames {
                metrics.fanout_latency.observe(f.made_at().elapsed());
            }
        }
        for r in h.replies {
            let _ = r.send(reply.clone());
        }
        self.cache.push_back((h.rid, reply));
        while self.cache.len() > CACHED {
            self.cache.pop_front();
        }
        if self.held.is_empty() {
            self.idle_since = Instant::now();
        }
    }
}

/// XEP-0206 §8: stanzas may inherit the body's default namespace; they are `jabber:client`.
fn in_client_ns(mut el: Element) -> Element {
    if el.ns == ns::HTTPBIND {
        el.ns = ns::CLIENT.to_owned();
    }
    for child in &mut el.children {
        if let crate::xmpp::Node::Element(c) = child {
            *c = in_client_ns(std::mem::replace(c, Element::new("x", "")));
        }
    }
    el
}

/// Limits for a page's request body: the stanza limit, with room for the wrapper, and one more
/// level of nesting for `<body/>` itself.
pub fn body_limits(stanza: &Limits) -> Limits {
    Limits {
        max_bytes: stanza.max_bytes + 4096,
        max_depth: stanza.max_depth + 1,
        ..*stanza
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bosh::{BoshClient, BoshConfig, Credentials};
    use crate::session::Registry;
    use crate::session::deps::Settings;

    fn registry() -> Arc<Registry> {
        let settings = Settings {
            grace: Duration::from_secs(60),
            token_ttl: Duration::from_secs(3600),
            ticket_ttl: Duration::from_secs(60),
            resource: "boshmux".into(),
            max_users: 10,
            pages_per_user: 3,
            page_queue_bytes: 1 << 20,
            offline_buffer: 10,
            iq_timeout: Duration::from_secs(30),
            relogin_attempts: 1,
            relogin_backoff: Duration::from_secs(1),
            relogin: None,
        };
        // Nothing listens there: the session never logs in, which a prebind does not need.
        let client = BoshClient::new(BoshConfig::new("http://127.0.0.1:9/http-bind")).unwrap();
        Registry::new(settings, client, crate::store::Store::none())
    }

    fn ctx(registry: &Arc<Registry>, page: u64) -> PageContext {
        let shared = conn::PageShared {
            registry: registry.clone(),
            domain: "example.test".into(),
            limits: Limits::PAGE,
            ping_interval: Duration::from_secs(30),
            dead_peer_timeout: Duration::from_secs(75),
            handshake_timeout: Duration::from_secs(10),
            send_rate: 50,
            shutdown: tokio_util::sync::CancellationToken::new(),
            metrics: registry.metrics.clone(),
        };
        PageContext {
            shared: Arc::new(shared),
            cookie_user: None,
            page,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_prebind_expires_like_a_ticket_and_the_oldest_is_evicted_first() {
        let registry = registry();
        let bare = Jid::parse("alice@example.test").unwrap();
        let creds = Credentials::Password {
            jid: bare.clone(),
            password: "pw".into(),
        };
        let (session, _) = registry.get_or_create(&bare, creds).unwrap();
        let pages = Arc::new(BoshPages::default());
        let granted =
            Granted::from_request(&Element::new("body", ns::HTTPBIND), Duration::from_secs(75));
        let ttl = Duration::from_secs(60);
        let mut sids = Vec::new();
        for page in 0..5 {
            let (sid, _) = pages
                .prebind(
                    session.clone(),
                    ctx(&registry, page),
                    granted,
                    ttl,
                    3,
                    |t| {
                        tokio::spawn(t);
                    },
                )
                .unwrap();
            sids.push(sid);
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        // Three slots: the two oldest were evicted, the three newest wait.
        assert_eq!(pages.unused_prebinds(&bare), 3);
        for old in &sids[..2] {
            let reply = pages
                .request(old, 1, Element::new("body", ns::HTTPBIND))
                .await;
            assert!(String::from_utf8_lossy(&reply).contains("item-not-found"));
        }
        // The newest was made 10 s ago: 49 s later it is still there, 2 s after that it is not.
        tokio::time::sleep(Duration::from_secs(49)).await;
        assert_eq!(pages.unused_prebinds(&bare), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pages.unused_prebinds(&bare), 0);
        assert!(pages.is_empty());
    }

    #[test]
    fn closes_map_to_terminate_conditions() {
        let text = |b: Reply| String::from_utf8(b.to_vec()).unwrap();
        assert_eq!(
            text(close_condition(1000, "closed")),
            "<body xmlns=\"http://jabber.org/protocol/httpbind\" type=\"terminate\"/>"
        );
        assert!(text(close_condition(1012, "x")).contains("condition=\"system-shutdown\""));
        assert!(
            text(close_condition(4004, "x")).contains("condition=\"remote-connection-failed\"")
        );
        assert!(text(close_condition(4003, "x")).contains("condition=\"policy-violation\""));
        let revoked = text(close_condition(4001, "session revoked"));
        assert!(revoked.contains("condition=\"remote-stream-error\""));
        assert!(revoked.contains("<not-authorized"));
        assert!(text(close_condition(4002, "slow")).contains("<resource-constraint"));
        // Every reply is itself a well-formed body.
        for code in [1000, 1008, 1012, 4001, 4002, 4003, 4004] {
            crate::xmpp::parse(&close_condition(code, "r"), &Limits::PAGE).unwrap();
        }
    }
}
