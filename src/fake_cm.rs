//! A small BOSH connection manager for tests and the demo: enough of XEP-0124/0206 and RFC 6120
//! for PLAIN login, binding and routing stanzas between its own sessions, plus hooks a real server
//! does not offer: every request is recorded (rid and raw body), and in intercept mode each request
//! is handed to the test, which decides the answer — a body, an HTTP status, or a dropped
//! connection — and when to give it.
//!
//! It is not an XMPP server: no rosters, no presence broadcast, no persistence.

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
}

impl Default for FakeCmConfig {
    fn default() -> Self {
        FakeCmConfig {
            domain: "example.test".into(),
            users: HashMap::new(),
            requests: 2,
            max_wait: 60,
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
}

impl FakeCm {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(config: FakeCmConfig) -> std::io::Result<FakeCm> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
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
            .find(|s| s.jid.as_ref().is_some_and(|j| j.to_string() == jid))
            .map(|s| s.received.clone())
            .unwrap_or_default()
    }

    /// Delivers `stanza` to every session of the user `bare` (as if routed by a server).
    /// Returns how many sessions got it.
    pub fn push(&self, bare: &str, stanza: Element) -> usize {
        let mut st = self.shared.state.lock();
        deliver(&mut st, bare, &stanza)
    }
}

fn deliver(st: &mut State, bare: &str, stanza: &Element) -> usize {
    let mut n = 0;
    for s in st.sessions.values_mut() {
        if s.jid
            .as_ref()
            .is_some_and(|j| j.to_bare().to_string() == bare)
        {
            s.pending.push_back(stanza.clone());
            if let Some(h) = s.held.take() {
                let _ = h.send(s.pending.drain(..).collect());
            }
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
        Ok(Action::Status(code)) => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(resp)
        }
        Ok(Action::Drop) | Err(_) => Err(FakeDrop),
    }
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
    let waiter = {
        let mut st = shared.state.lock();
        let Some(session) = st.sessions.get_mut(&sid) else {
            return terminate_body(Some("item-not-found"));
        };
        if el.attr("type") == Some("terminate") {
            if let Some(h) = session.held.take() {
                drop(h);
            }
            st.sessions.remove(&sid);
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
        for (to, stanza) in routed {
            deliver(&mut st, &to, &stanza);
        }
        let session = st.sessions.get_mut(&sid).expect("present above");
        // hold=1: a new request releases the one held before it.
        if let Some(h) = session.held.take() {
            let _ = h.send(session.pending.drain(..).collect());
        }
        if !session.pending.is_empty() {
            return body_with(session.pending.drain(..).collect());
        }
        let (tx, rx) = oneshot::channel();
        session.held = Some(tx);
        (rx, session.wait)
    };
    let (rx, wait) = waiter;
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(stanzas)) => body_with(stanzas),
        Ok(Err(_)) => terminate_body(None), // session ended while held
        Err(_) => body_with(Vec::new()),
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

/// Handles one element from a client; returns a stanza to route to another user, if any.
fn process(cfg: &FakeCmConfig, s: &mut Session, stanza: Element) -> Option<(String, Element)> {
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
    if stanza.is("iq", ns::CLIENT)
        && stanza.attr("to").is_none()
        && matches!(stanza.attr("type"), Some("get" | "set"))
    {
        // Requests to the server itself (session, ping, …) succeed with an empty result.
        s.pending.push_back(
            Element::new("iq", ns::CLIENT)
                .with_attr("type", "result")
                .with_attr("id", stanza.attr("id").unwrap_or_default())
                .with_attr("to", jid.to_string()),
        );
        return None;
    }
    let to = Jid::parse(stanza.attr("to")?).ok()?;
    let mut routed = stanza;
    routed.set_attr("from", jid.to_string());
    Some((to.to_bare().to_string(), routed))
}
