//! A small BOSH connection manager for tests and the demo: enough of XEP-0124/0206 and RFC 6120
//! for PLAIN login, binding and routing stanzas between its own sessions, plus hooks a real server
//! does not offer: every request is recorded (rid and raw body), and in intercept mode each request
//! is handed to the test, which decides the answer — a body, an HTTP status, or a dropped
//! connection — and when to give it.
//!
//! With [`FakeCmConfig::contacts`] and an echo bot it is also the embedded server of
//! `boshmux demo`: fixed rosters, presence broadcast between online accounts, routing of messages
//! and iqs, and a bot that answers. It is a demo and test aid, not an XMPP server: no persistence,
//! no subscriptions, no MUC, no TLS, nothing of RFC 6120 beyond what a demo needs.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::bosh::Body;
use crate::xmpp::{Element, Jid, ns};

/// Service discovery (XEP-0030), answered for the server itself.
const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";

/// How the fake behaves in automatic mode.
#[derive(Clone, Debug)]
pub struct FakeCmConfig {
    /// The domain it serves.
    pub domain: String,
    /// Accounts: localpart → password.
    pub users: HashMap<String, String>,
    /// `requests` announced at creation.
    pub requests: u32,
    /// Longest `wait` granted.
    pub max_wait: u32,
    /// Accounts that have each other (and the echo bot) in their rosters, subscription `both`,
    /// with presence broadcast between them: the demo's small social network. Others have none.
    pub contacts: Vec<String>,
    /// Localpart of a bot that is always online and answers each message with `echo: <body>`.
    pub echo_bot: Option<String>,
    /// Check rids the way ejabberd 23.01 does (see [`ejabberd_rules`]) instead of ignoring them.
    pub ejabberd_rids: bool,
}

impl Default for FakeCmConfig {
    fn default() -> Self {
        FakeCmConfig {
            domain: "example.test".into(),
            users: HashMap::new(),
            requests: 2,
            max_wait: 60,
            contacts: Vec::new(),
            echo_bot: None,
            ejabberd_rids: false,
        }
    }
}

/// One request as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// Its rid, if it had a readable one.
    pub rid: Option<u64>,
    /// Its sid (none for a creation request).
    pub sid: Option<String>,
    /// The raw body bytes.
    pub raw: Bytes,
}

/// What the test answers to an intercepted request.
#[derive(Debug)]
pub enum Action {
    /// HTTP 200 with this body.
    Respond(Body),
    /// This HTTP status with an empty body.
    Status(u16),
    /// This HTTP status with an empty body and this reason phrase in the status line, as
    /// ejabberd gives its error reasons (`404 Session ID mismatch`).
    StatusWithReason(u16, &'static str),
    /// Close the connection without answering.
    Drop,
}

/// A request handed to the test in intercept mode. Dropping it unanswered drops the connection.
#[derive(Debug)]
pub struct Intercepted {
    /// The request's rid.
    pub rid: u64,
    /// The raw bytes received.
    pub raw: Bytes,
    /// The parsed body.
    pub body: Body,
    reply: oneshot::Sender<Action>,
}

impl Intercepted {
    /// Answers the request.
    pub fn answer(self, action: Action) {
        let _ = self.reply.send(action);
    }

    /// Answers with an ordinary body carrying `stanzas`.
    pub fn respond(self, stanzas: Vec<Element>) {
        let mut body = Element::new("body", ns::HTTPBIND);
        for s in stanzas {
            body.push_child(s);
        }
        self.answer(Action::Respond(Body { element: body }));
    }

    /// Answers `type='terminate'` with `condition` (none when `None`) and extra children.
    pub fn terminate(self, condition: Option<&str>, children: Vec<Element>) {
        let mut body = Element::new("body", ns::HTTPBIND).with_attr("type", "terminate");
        if let Some(c) = condition {
            body.set_attr("condition", c);
        }
        for c in children {
            body.push_child(c);
        }
        self.answer(Action::Respond(Body { element: body }));
    }

    /// The stanzas the request carried.
    pub fn stanzas(&self) -> Vec<Element> {
        self.body.clone().into_children()
    }
}

/// A running fake connection manager on a loopback port. Stops when dropped.
pub struct FakeCm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

struct Shared {
    config: FakeCmConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    records: Vec<Recorded>,
    sessions: HashMap<String, Session>,
    intercept: Option<mpsc::UnboundedSender<Intercepted>>,
    /// Requests being handled right now, per sid.
    outstanding: HashMap<String, usize>,
    max_outstanding: usize,
}

struct Session {
    wait: Duration,
    authed: Option<String>,
    jid: Option<Jid>,
    pending: VecDeque<Element>,
    held: Option<oneshot::Sender<Vec<Element>>>,
    /// Every stanza the client sent after login.
    received: Vec<Element>,
    /// The session's current undirected presence, once available.
    available: Option<Element>,
    /// ejabberd mode: the latest rid processed.
    prev_rid: u64,
    /// ejabberd mode: rids "2 ahead" waiting for the one before them.
    deferred: std::collections::HashSet<u64>,
    /// ejabberd mode: the rid of the held request and the stanzas it carried.
    held_request: Option<(u64, Vec<Element>)>,
    /// ejabberd mode: the held request is a resend (its empty release echoes its stanzas).
    held_resent: bool,
    /// ejabberd mode: woken whenever `prev_rid` advances.
    advanced: Arc<tokio::sync::Notify>,
    /// ejabberd mode: the latest released held request and what it was answered with.
    released: Option<(u64, Vec<Element>)>,
}

impl FakeCm {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(config: FakeCmConfig) -> std::io::Result<FakeCm> {
        FakeCm::start_on(TcpListener::bind(("127.0.0.1", 0)).await?, config).await
    }

    /// Starts on `listener` (`boshmux demo --upstream-only` gives it the address asked for).
    pub async fn start_on(listener: TcpListener, config: FakeCmConfig) -> std::io::Result<FakeCm> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let accept_shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(conn) => conn,
                        Err(_) => continue,
                    },
                    _ = &mut stopped => return,
                };
                let shared = accept_shared.clone();
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    // An error here is a dropped connection, which some tests ask for.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FakeCm {
            addr,
            shared,
            _stop: stop,
        })
    }

    /// The BOSH URL.
    pub fn url(&self) -> String {
        format!("http://{}/http-bind", self.addr)
    }

    /// Hands every later request to the returned receiver instead of answering it. Requests
    /// being held are released (empty), so the client's next request arrives there.
    pub fn intercept(&self) -> mpsc::UnboundedReceiver<Intercepted> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.shared.state.lock();
        st.intercept = Some(tx);
        for s in st.sessions.values_mut() {
            if let Some(h) = s.held.take() {
                let _ = h.send(Vec::new());
            }
        }
        rx
    }

    /// Every request received so far, in arrival order.
    pub fn records(&self) -> Vec<Recorded> {
        self.shared.state.lock().records.clone()
    }

    /// The most requests of one session that were being handled at the same time.
    pub fn max_outstanding(&self) -> usize {
        self.shared.state.lock().max_outstanding
    }

    /// Stanzas the session bound to `jid` (full JID) has sent since login.
    pub fn received(&self, jid: &str) -> Vec<Element> {
        let st = self.shared.state.lock();
        st.sessions
            .values()
            .find(|s| s.jid.is_some() && s.jid.as_ref() == Jid::parse(jid).ok().as_ref())
            .map(|s| s.received.clone())
            .unwrap_or_default()
    }

    /// Delivers `stanza` to every session of `to` (a bare JID) or to one session (a full JID),
    /// as if routed by a server. Returns how many sessions got it.
    pub fn push(&self, to: &str, stanza: Element) -> usize {
        let mut st = self.shared.state.lock();
        deliver(&mut st, to, &stanza)
    }
}

/// Delivers `stanza` to the sessions of `to`: every session of a bare JID, or the one full JID.
fn deliver(st: &mut State, to: &str, stanza: &Element) -> usize {
    // Addresses compared prepared, as a server does (SPEC §3a); prepared once, not per session
    // (the many-users benchmark has thousands).
    let Ok(to) = Jid::parse(to) else { return 0 };
    let mut n = 0;
    for s in st.sessions.values_mut() {
        let Some(jid) = &s.jid else { continue };
        let hit = if to.is_bare() {
            jid.local() == to.local() && jid.domain() == to.domain()
        } else {
            *jid == to
        };
        if hit {
            s.pending.push_back(stanza.clone());
            release(s);
            n += 1;
        }
    }
    n
}

type HttpResult = Result<Response<Full<Bytes>>, FakeDrop>;

/// Returned from the service to make hyper close the connection without a response.
#[derive(Debug)]
struct FakeDrop;

impl std::fmt::Display for FakeDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for FakeDrop {}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> HttpResult {
    let raw = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(FakeDrop),
    };
    let body = Body::parse(&raw);
    let rid = body
        .as_ref()
        .ok()
        .and_then(|b| b.element.attr("rid")?.parse().ok());
    let sid = body
        .as_ref()
        .ok()
        .and_then(|b| b.element.attr("sid").map(str::to_owned));
    let intercept = {
        let mut st = shared.state.lock();
        st.records.push(Recorded {
            rid,
            sid: sid.clone(),
            raw: raw.clone(),
        });
        if let Some(sid) = &sid {
            let n = st.outstanding.entry(sid.clone()).or_default();
            *n += 1;
            let n = *n;
            st.max_outstanding = st.max_outstanding.max(n);
        }
        st.intercept.clone()
    };
    let result = match (body, intercept) {
        (Err(_), _) => Ok(xml_response(&terminate_body(Some("bad-request")))),
        (Ok(body), Some(tx)) => intercepted(tx, rid.unwrap_or(0), raw, body).await,
        (Ok(body), None) => Ok(xml_response(&automatic(&shared, body).await)),
    };
    if let Some(sid) = &sid
        && let Some(n) = shared.state.lock().outstanding.get_mut(sid)
    {
        *n -= 1;
    }
    result
}

async fn intercepted(
    tx: mpsc::UnboundedSender<Intercepted>,
    rid: u64,
    raw: Bytes,
    body: Body,
) -> HttpResult {
    let (reply, answer) = oneshot::channel();
    if tx
        .send(Intercepted {
            rid,
            raw,
            body,
            reply,
        })
        .is_err()
    {
        return Err(FakeDrop);
    }
    match answer.await {
        Ok(Action::Respond(b)) => Ok(xml_response(&b)),
        Ok(Action::Status(code)) => Ok(empty_response(code)),
        Ok(Action::StatusWithReason(code, reason)) => {
            let mut resp = empty_response(code);
            resp.extensions_mut()
                .insert(hyper::ext::ReasonPhrase::from_static(reason.as_bytes()));
            Ok(resp)
        }
        Ok(Action::Drop) | Err(_) => Err(FakeDrop),
    }
}

/// HTTP `code` with an empty body.
fn empty_response(code: u16) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

fn xml_response(body: &Body) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.to_bytes()));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    resp
}

fn terminate_body(condition: Option<&str>) -> Body {
    let mut el = Element::new("body", ns::HTTPBIND).with_attr("type", "terminate");
    if let Some(c) = condition {
        el.set_attr("condition", c);
    }
    Body { element: el }
}

fn body_with(stanzas: Vec<Element>) -> Body {
    let mut el = Element::new("body", ns::HTTPBIND);
    for s in stanzas {
        el.push_child(s);
    }
    Body { element: el }
}

/// Automatic mode: a minimal server with hold=1 semantics.
async fn automatic(shared: &Shared, body: Body) -> Body {
    let cfg = &shared.config;
    let el = &body.element;
    let Some(sid) = el.attr("sid").map(str::to_owned) else {
        return create(shared, el);
    };
    let mut echo = None;
    if cfg.ejabberd_rids {
        match ejabberd_rules(shared, &sid, &body).await {
            Rid::Answer(b) => return b,
            Rid::Process => {}
            Rid::ResentHeld(payload) => echo = Some(payload),
        }
    }
    let waiter = {
        let mut st = shared.state.lock();
        let Some(session) = st.sessions.get_mut(&sid) else {
            return terminate_body(Some("item-not-found"));
        };
        if el.attr("type") == Some("terminate") {
            if let Some(h) = session.held.take() {
                drop(h);
            }
            let gone = st.sessions.remove(&sid);
            if let Some(jid) = gone.and_then(|s| s.available.and(s.jid)) {
                let unavailable =
                    Element::new("presence", ns::CLIENT).with_attr("type", "unavailable");
                broadcast_presence(cfg, &mut st, &jid, &unavailable);
            }
            return terminate_body(None);
        }
        if el.attr_ns(Some(ns::XBOSH), "restart") == Some("true") {
            session.pending.push_back(
                Element::new("features", ns::STREAM)
                    .with_child(Element::new("bind", ns::BIND))
                    .with_child(
                        Element::new("session", ns::SESSION)
                            .with_child(Element::new("optional", ns::SESSION)),
                    ),
            );
        }
        let mut routed = Vec::new();
        for stanza in body.clone().into_children() {
            if let Some(out) = process(cfg, session, stanza) {
                routed.push(out);
            }
        }
        for stanza in routed {
            route(cfg, &mut st, &sid, stanza);
        }
        let session = st.sessions.get_mut(&sid).expect("present above");
        // hold=1: a new request releases the one held before it.
        release(session);
        if !session.pending.is_empty() {
            return body_with(session.pending.drain(..).collect());
        }
        let (tx, rx) = oneshot::channel();
        session.held = Some(tx);
        (rx, session.wait)
    };
    let (rx, wait) = waiter;
    let stanzas = match tokio::time::timeout(wait, rx).await {
        Ok(Ok(stanzas)) => stanzas,
        Ok(Err(_)) => return terminate_body(None), // session ended while held
        Err(_) => Vec::new(),
    };
    match echo {
        // ejabberd answers a resent held request released with nothing new with the request's
        // own stanzas, marked with its rid.
        Some(payload) if stanzas.is_empty() => {
            let mut b = body_with(payload);
            b.element.set_attr("sid", sid);
            if let Some(rid) = el.attr("rid") {
                b.element.set_attr("rid", rid);
            }
            b
        }
        _ => body_with(stanzas),
    }
}

/// Answers the held request, if any, with the pending stanzas; ejabberd mode keeps them to
/// replay if that request is resent (its first connection may be gone).
fn release(s: &mut Session) {
    if let Some(h) = s.held.take() {
        let stanzas: Vec<Element> = s.pending.drain(..).collect();
        if let Some((rid, _)) = &s.held_request {
            s.released = Some((*rid, stanzas.clone()));
        }
        let _ = h.send(stanzas);
    }
}

/// What the ejabberd rid rules decided for one request.
enum Rid {
    /// Answer this without processing the request.
    Answer(Body),
    /// Process it normally.
    Process,
    /// A resend of the held request: hold it again; released empty, it echoes these stanzas.
    ResentHeld(Vec<Element>),
}

/// ejabberd 23.01's handling of rids (`ejabberd_bosh:active1/3`), with the faults it has:
/// a rid more than 2 ahead of the latest processed one destroys the session; one 2 ahead is
/// deferred until the rid before it arrives, and the same one arriving twice crashes the session
/// (`internal-server-error`); a resend of the held request is held again and, released with
/// nothing new, echoes its own stanzas; an older rid is never answered. Unlike ejabberd, answered
/// rids are replayed empty (their bodies are not cached).
async fn ejabberd_rules(shared: &Shared, sid: &str, body: &Body) -> Rid {
    let Some(rid) = body.element.attr("rid").and_then(|r| r.parse::<u64>().ok()) else {
        return Rid::Answer(terminate_body(Some("bad-request")));
    };
    loop {
        let advanced = {
            let mut st = shared.state.lock();
            let Some(s) = st.sessions.get_mut(sid) else {
                return Rid::Answer(terminate_body(Some("item-not-found")));
            };
            let prev = s.prev_rid;
            if rid > prev + 2 {
                st.sessions.remove(sid); // "Request ID is out of range": the session is gone
                return Rid::Answer(terminate_body(Some("item-not-found")));
            }
            if rid == prev + 1 {
                s.prev_rid = rid;
                s.advanced.notify_waiters();
                s.held_resent = false;
                s.held_request = Some((rid, body.clone().into_children()));
                return Rid::Process;
            }
            if rid == prev {
                if let Some((held, payload)) = &s.held_request
                    && *held == rid
                    && s.held.is_some()
                {
                    let payload = payload.clone();
                    s.held = None; // the first copy's connection is gone
                    s.held_resent = true;
                    return Rid::ResentHeld(payload);
                }
                let mut replay = match &s.released {
                    Some((r, stanzas)) if *r == rid => body_with(stanzas.clone()),
                    _ => body_with(Vec::new()),
                };
                replay.element.set_attr("sid", sid);
                replay.element.set_attr("rid", rid.to_string());
                return Rid::Answer(replay);
            }
            if rid + 1 == prev {
                return Rid::Answer(body_with(Vec::new()));
            }
            if rid < prev {
                None // outside the two-reply cache: ejabberd never answers
            } else if !s.deferred.insert(rid) {
                // rid == prev + 2 a second time: gb_trees:insert on an existing key kills the
                // session's process.
                st.sessions.remove(sid);
                return Rid::Answer(terminate_body(Some("internal-server-error")));
            } else {
                Some(s.advanced.clone())
            }
        };
        let Some(advanced) = advanced else {
            std::future::pending::<()>().await;
            unreachable!("pending never completes");
        };
        let wait = shared.config.max_wait;
        let _ =
            tokio::time::timeout(Duration::from_secs(u64::from(wait)), advanced.notified()).await;
        if let Some(s) = shared.state.lock().sessions.get_mut(sid) {
            s.deferred.remove(&rid);
        }
    }
}

fn create(shared: &Shared, el: &Element) -> Body {
    let cfg = &shared.config;
    let wait = el
        .attr("wait")
        .and_then(|w| w.parse::<u32>().ok())
        .unwrap_or(60)
        .min(cfg.max_wait);
    let sid = uuid::Uuid::new_v4().simple().to_string();
    shared.state.lock().sessions.insert(
        sid.clone(),
        Session {
            wait: Duration::from_secs(u64::from(wait)),
            authed: None,
            jid: None,
            pending: VecDeque::new(),
            held: None,
            received: Vec::new(),
            available: None,
            prev_rid: el.attr("rid").and_then(|r| r.parse().ok()).unwrap_or(0),
            deferred: std::collections::HashSet::new(),
            held_request: None,
            held_resent: false,
            advanced: Arc::new(tokio::sync::Notify::new()),
            released: None,
        },
    );
    let mut body = Element::new("body", ns::HTTPBIND)
        .with_attr("sid", sid)
        .with_attr("wait", wait.to_string())
        .with_attr("requests", cfg.requests.to_string())
        .with_attr("hold", "1")
        .with_attr("polling", "5")
        .with_attr("inactivity", "60")
        .with_attr("ver", "1.6")
        .with_attr("from", cfg.domain.clone());
    body.set_attr_ns(Some(ns::XBOSH), "version", "1.0");
    body.push_child(
        Element::new("features", ns::STREAM).with_child(
            Element::new("mechanisms", ns::SASL)
                .with_child(Element::new("mechanism", ns::SASL).with_text("PLAIN")),
        ),
    );
    Body { element: body }
}

/// Handles login and requests to the server itself; returns any other stanza (its `from` set)
/// for [`route`].
fn process(cfg: &FakeCmConfig, s: &mut Session, stanza: Element) -> Option<Element> {
    if stanza.is("auth", ns::SASL) {
        let ok = stanza.attr("mechanism") == Some("PLAIN")
            && BASE64
                .decode(stanza.text().trim())
                .ok()
                .and_then(|raw| {
                    let mut parts = raw.split(|&b| b == 0).skip(1);
                    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    (cfg.users.get(&user) == Some(&pass)).then_some(user)
                })
                .map(|user| s.authed = Some(user))
                .is_some();
        s.pending.push_back(if ok {
            Element::new("success", ns::SASL)
        } else {
            Element::new("failure", ns::SASL).with_child(Element::new("not-authorized", ns::SASL))
        });
        return None;
    }
    let bind = stanza.child("bind", ns::BIND);
    if stanza.is("iq", ns::CLIENT) && bind.is_some() {
        let user = s.authed.clone()?;
        let resource = bind
            .and_then(|b| b.child("resource", ns::BIND))
            .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), Element::text);
        let jid = Jid::parse(&format!("{user}@{}/{resource}", cfg.domain)).ok()?;
        s.pending.push_back(
            Element::new("iq", ns::CLIENT)
                .with_attr("type", "result")
                .with_attr("id", stanza.attr("id").unwrap_or_default())
                .with_child(
                    Element::new("bind", ns::BIND)
                        .with_child(Element::new("jid", ns::BIND).with_text(jid.to_string())),
                ),
        );
        s.jid = Some(jid);
        return None;
    }
    let jid = s.jid.clone()?;
    s.received.push(stanza.clone());
    let to_server = stanza.attr("to").is_none_or(|t| {
        Jid::parse(t).is_ok_and(|t| {
            t == jid.to_bare() || (t.local().is_none() && t.is_bare() && t.domain() == cfg.domain)
        })
    });
    if stanza.is("iq", ns::CLIENT)
        && to_server
        && matches!(stanza.attr("type"), Some("get" | "set"))
    {
        // Requests to the server itself: the roster, or an empty result (session, ping, …).
        let mut result = Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", stanza.attr("id").unwrap_or_default())
            .with_attr("to", jid.to_string());
        if let Some(to) = stanza.attr("to") {
            result.set_attr("from", to); // the server answers from the address asked
        }
        if stanza.child("query", DISCO_INFO).is_some() && stanza.attr("type") == Some("get") {
            result.push_child(
                Element::new("query", DISCO_INFO)
                    .with_child(
                        Element::new("identity", DISCO_INFO)
                            .with_attr("category", "server")
                            .with_attr("type", "im")
                            .with_attr("name", "boshmux development server"),
                    )
                    .with_child(Element::new("feature", DISCO_INFO).with_attr("var", DISCO_INFO))
                    .with_child(Element::new("feature", DISCO_INFO).with_attr("var", ns::PING)),
            );
        }
        if stanza.child("query", ns::ROSTER).is_some() && stanza.attr("type") == Some("get") {
            let mut query = Element::new("query", ns::ROSTER);
            for contact in contacts(cfg, jid.local().unwrap_or_default()) {
                query.push_child(
                    Element::new("item", ns::ROSTER)
                        .with_attr("jid", format!("{contact}@{}", cfg.domain))
                        .with_attr("subscription", "both")
                        .with_attr("name", contact),
                );
            }
            result.push_child(query);
        }
        s.pending.push_back(result);
        return None;
    }
    let mut routed = stanza;
    routed.set_attr("from", jid.to_string());
    Some(routed)
}

/// The localparts in `user`'s roster.
fn contacts(cfg: &FakeCmConfig, user: &str) -> Vec<String> {
    if !cfg.contacts.iter().any(|c| c == user) {
        return Vec::new();
    }
    let mut all: Vec<String> = cfg
        .contacts
        .iter()
        .filter(|u| *u != user)
        .cloned()
        .collect();
    all.extend(cfg.echo_bot.clone());
    all.sort();
    all
}

/// Routes a stanza from session `sid` (its `from` already set): presence to contacts, the echo
/// bot's answers, everything else to its addressee.
fn route(cfg: &FakeCmConfig, st: &mut State, sid: &str, stanza: Element) {
    let Some(from) = stanza.attr("from").and_then(|f| Jid::parse(f).ok()) else {
        return;
    };
    let Some(to) = stanza.attr("to").map(str::to_owned) else {
        if stanza.is("presence", ns::CLIENT) {
            undirected_presence(cfg, st, sid, &from, stanza);
        }
        return;
    };
    let to_bare = Jid::parse(&to)
        .map(|j| j.to_bare().to_string())
        .unwrap_or_default();
    if let Some(bot) = &cfg.echo_bot
        && to_bare == format!("{bot}@{}", cfg.domain)
    {
        if stanza.is("message", ns::CLIENT)
            && let Some(body) = stanza.child("body", ns::CLIENT)
        {
            let mut reply = Element::new("message", ns::CLIENT)
                .with_attr("from", format!("{to_bare}/bot"))
                .with_attr("to", from.to_string())
                .with_attr("type", stanza.attr("type").unwrap_or("chat"))
                .with_child(
                    Element::new("body", ns::CLIENT).with_text(format!("echo: {}", body.text())),
                );
            if let Some(id) = stanza.attr("id") {
                reply.set_attr("id", format!("echo-{id}"));
            }
            deliver(st, &from.to_string(), &reply);
        }
        return;
    }
    let delivered = deliver(st, &to, &stanza);
    if delivered == 0
        && stanza.is("iq", ns::CLIENT)
        && matches!(stanza.attr("type"), Some("get" | "set"))
    {
        // Nobody there to answer: the server does (RFC 6121 §8.5).
        let error = crate::page::frame::error_reply(&stanza, "cancel", "service-unavailable", "");
        deliver(st, &from.to_string(), &error);
    }
}

fn undirected_presence(
    cfg: &FakeCmConfig,
    st: &mut State,
    sid: &str,
    from: &Jid,
    presence: Element,
) {
    let available = presence.attr("type").is_none();
    let initial = match st.sessions.get_mut(sid) {
        Some(s) => {
            let initial = available && s.available.is_none();
            s.available = available.then(|| presence.clone());
            initial
        }
        None => return,
    };
    broadcast_presence(cfg, st, from, &presence);
    if !initial {
        return;
    }
    // The new session learns who is online: contacts' sessions, its own others, and the bot.
    let user = from.local().unwrap_or_default();
    let mut known: Vec<Element> = st
        .sessions
        .iter()
        .filter(|(other, _)| other.as_str() != sid)
        .filter_map(|(_, s)| Some((s.jid.clone()?, s.available.clone()?)))
        .filter(|(jid, _)| {
            let local = jid.local().unwrap_or_default();
            local == user || contacts(cfg, user).iter().any(|c| c == local)
        })
        .map(|(jid, p)| {
            p.with_attr("from", jid.to_string())
                .with_attr("to", from.to_string())
        })
        .collect();
    if let Some(bot) = &cfg.echo_bot
        && cfg
            .contacts
            .iter()
            .any(|c| Some(c.as_str()) == from.local())
    {
        known.push(
            Element::new("presence", ns::CLIENT)
                .with_attr("from", format!("{bot}@{}/bot", cfg.domain))
                .with_attr("to", from.to_string())
                .with_child(Element::new("status", ns::CLIENT).with_text("I repeat what you say")),
        );
    }
    if let Some(s) = st.sessions.get_mut(sid) {
        s.pending.extend(known);
    }
}

/// Sends `presence` of `from` to its contacts' sessions and its own sessions (itself included).
fn broadcast_presence(cfg: &FakeCmConfig, st: &mut State, from: &Jid, presence: &Element) {
    let user = from.local().unwrap_or_default().to_owned();
    let mut targets = contacts(cfg, &user);
    targets.push(user);
    for t in targets {
        let to = format!("{t}@{}", cfg.domain);
        let p = presence
            .clone()
            .with_attr("from", from.to_string())
            .with_attr("to", to.clone());
        deliver(st, &to, &p);
    }
}
