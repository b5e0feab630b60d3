//! One page's WebSocket: the server side of the RFC 7395 handshake, then the relay between the
//! socket and the user's session. A page only ever affects itself: its faults close its own
//! socket, its slowness is bounded by its own queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Frame;
use super::frame::{self, PageInput, Rejection};
use crate::metrics::Metrics;
use crate::session::{
    AttachError, PageId, PageLink, PageOut, PageReceiver, Registry, SessionHandle, page_queue,
};
use crate::xmpp::{self, Element, Jid, Limits, ns, sasl};

use super::close::{GOING_AWAY, LOST, NORMAL, POLICY, RESTARTING, TOO_MANY_PAGES};

/// How often a page whose session is moving between cluster nodes looks for it again.
const MOVING_RETRY: Duration = Duration::from_millis(250);

/// Failed SASL attempts allowed before the stream is closed.
pub(super) const AUTH_ATTEMPTS: u32 = 3;

/// What every page's task of this daemon shares (one copy, behind an `Arc`).
pub struct PageShared {
    /// The sessions and tokens.
    pub registry: Arc<Registry>,
    /// The XMPP domain pages must open their stream to.
    pub domain: String,
    /// Limits for frames from the page.
    pub limits: Limits,
    /// WebSocket ping interval.
    pub ping_interval: Duration,
    /// A page silent this long is closed.
    pub dead_peer_timeout: Duration,
    /// Time allowed from upgrade to bound resource.
    pub handshake_timeout: Duration,
    /// Stanzas per second a page may send (burst: twice that).
    pub send_rate: u32,
    /// Cancelled when the daemon stops.
    pub shutdown: CancellationToken,
    /// Where frames and rejections are counted.
    pub metrics: Arc<Metrics>,
}

/// Everything a page's task needs: the shared settings (reached through `Deref`) and what is
/// this page's own.
pub struct PageContext {
    /// What all pages share.
    pub shared: Arc<PageShared>,
    /// The user of a valid `boshmux_token` cookie sent with the upgrade from an allowed origin.
    pub cookie_user: Option<Jid>,
    /// This page's id.
    pub page: PageId,
}

impl std::ops::Deref for PageContext {
    type Target = PageShared;
    fn deref(&self) -> &PageShared {
        &self.shared
    }
}

/// How a page's connection ends.
enum Ending {
    /// `<close/>`, then close with this code.
    Close(u16, &'static str),
    /// A stream error, `<close/>`, then close 1008.
    StreamError(&'static str, String),
    /// The socket is gone already.
    Gone,
}

/// Runs a page's socket to the end.
///
/// Not an `async fn`: those copy their arguments into the future a second time, and an idle
/// page's future is most of what it costs (BENCHMARKS.md, "Idle pages").
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
pub fn run(mut ws: WebSocket, ctx: PageContext) -> impl Future<Output = ()> + Send {
    async move {
        let mut bound = tokio::select! {
            // Boxed, like every await here but the relay's: the task of a page is as large as its
            // largest await, and a page mostly waits in the relay (BENCHMARKS.md, "Idle pages").
            r = tokio::time::timeout(ctx.handshake_timeout, Box::pin(handshake(&mut ws, &ctx))) => match r {
                Ok(r) => r,
                Err(_) => Err(Ending::StreamError("connection-timeout", "handshake took too long".into())),
            },
            () = ctx.shutdown.cancelled() => Err(Ending::Close(RESTARTING, "daemon restarting")),
        };
        // By reference: moving the bound page out would keep a second copy in the future.
        let ending = match &mut bound {
            Ok(b) => {
                let ending = relay(&mut ws, &ctx, b).await;
                Box::pin(b.session.detach(ctx.page)).await;
                ending
            }
            Err(e) => std::mem::replace(e, Ending::Gone),
        };
        drop(bound);
        Box::pin(finish(&mut ws, ending, ctx.dead_peer_timeout)).await;
    }
}

/// Serves a cluster peer's link for one of its pages (SPEC §12) on `session`, which this node
/// drives: the link was authenticated by the peer, so there is no handshake — the first frame
/// is the session's full JID, then the link is relayed like any page (same checks, queue,
/// replay, carbons). It ends with a bare close frame; the peer's page adds its own `<close/>`.
pub async fn run_relayed(mut ws: WebSocket, ctx: PageContext, session: SessionHandle) {
    let ending = match attach(&session, ctx.page).await {
        Ok((jid, out)) => {
            if send_text(&mut ws, jid.to_string()).await.is_ok() {
                let mut b = Bound {
                    session: session.clone(),
                    jid,
                    out,
                };
                let ending = relay(&mut ws, &ctx, &mut b).await;
                session.detach(ctx.page).await;
                ending
            } else {
                session.detach(ctx.page).await;
                Ending::Gone
            }
        }
        Err(AttachError::TooManyPages) => Ending::Close(TOO_MANY_PAGES, "too many pages"),
        Err(AttachError::Gone) => Ending::Close(LOST, "session not available"),
        Err(AttachError::Moving) => Ending::Close(RESTARTING, "session moving"),
    };
    let (code, reason) = match ending {
        Ending::Gone => return,
        Ending::Close(code, reason) => (code, reason.to_owned()),
        Ending::StreamError(condition, _) => (POLICY, condition.to_owned()),
    };
    let _ = tokio::time::timeout(
        ctx.dead_peer_timeout,
        ws.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))),
    )
    .await;
}

async fn finish(ws: &mut WebSocket, ending: Ending, limit: Duration) {
    let (code, reason, before) = match ending {
        Ending::Gone => return,
        Ending::Close(code, reason) => (code, reason.to_owned(), vec![frame::close()]),
        Ending::StreamError(condition, text) => (
            POLICY,
            condition.to_owned(),
            vec![frame::stream_error(condition, &text), frame::close()],
        ),
    };
    let _ = tokio::time::timeout(limit, async {
        for f in before {
            ws.send(Message::Text(f.into())).await?;
        }
        ws.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await
    })
    .await;
}

struct Bound {
    session: SessionHandle,
    jid: Jid,
    out: PageReceiver,
}

/// The next text frame; pings and pongs are skipped, anything else ends the page.
async fn next_text(ws: &mut WebSocket) -> Result<String, Ending> {
    loop {
        match ws.recv().await {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Binary(_))) => {
                return Err(Ending::StreamError(
                    "unsupported-encoding",
                    "binary frames are not XMPP (RFC 7395 §3.2)".into(),
                ));
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(Ending::Gone),
        }
    }
}

async fn send_text(ws: &mut WebSocket, text: String) -> Result<(), Ending> {
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|_| Ending::Gone)
}

/// Parses a handshake frame; `<close/>` there ends the stream normally (RFC 7395 §3.6).
fn parse_stream_level(text: &str, limits: &Limits) -> Result<Element, Ending> {
    let el = xmpp::parse(text.as_bytes(), limits)
        .map_err(|e| Ending::StreamError("not-well-formed", e.to_string()))?;
    if el.is("close", ns::FRAMING) {
        return Err(Ending::Close(NORMAL, "closed by the page"));
    }
    Ok(el)
}

/// Expects `<open/>` to our domain and answers it with `<open/>` and `features`.
async fn open_stream(
    ws: &mut WebSocket,
    ctx: &PageContext,
    features: String,
) -> Result<(), Ending> {
    let text = next_text(ws).await?;
    let open = parse_stream_level(&text, &ctx.limits)?;
    if !open.is("open", ns::FRAMING) {
        return Err(Ending::StreamError(
            "invalid-namespace",
            "expected <open/>".into(),
        ));
    }
    // The domain as any spelling of it (SPEC §3a): `to` is prepared like every JID.
    let to_us = open
        .attr("to")
        .and_then(|to| Jid::parse(to).ok())
        .is_some_and(|to| to.local().is_none() && to.is_bare() && to.domain() == ctx.domain);
    if !to_us {
        return Err(Ending::StreamError(
            "host-unknown",
            format!("this service is {}", ctx.domain),
        ));
    }
    if open.attr("version").is_some_and(|v| !v.starts_with("1.")) {
        return Err(Ending::StreamError(
            "unsupported-version",
            "version 1.0 is spoken here".into(),
        ));
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    send_text(ws, frame::open(&ctx.domain, &id)).await?;
    send_text(ws, features).await
}

async fn handshake(ws: &mut WebSocket, ctx: &PageContext) -> Result<Bound, Ending> {
    open_stream(ws, ctx, frame::sasl_features(ctx.cookie_user.is_some())).await?;
    let mut failures = 0;
    let (user, session) = loop {
        let text = next_text(ws).await?;
        let auth = parse_stream_level(&text, &ctx.limits)?;
        if auth.is("abort", ns::SASL) {
            send_text(ws, sasl_failure("aborted")).await?;
            continue;
        }
        if !auth.is("auth", ns::SASL) {
            return Err(Ending::StreamError(
                "not-authorized",
                "authenticate first".into(),
            ));
        }
        match authenticate(ctx, &auth).await {
            Ok(found) => break found,
            Err(condition) => {
                failures += 1;
                send_text(ws, sasl_failure(condition)).await?;
                if failures >= AUTH_ATTEMPTS {
                    return Err(Ending::StreamError(
                        "policy-violation",
                        "too many failed authentications".into(),
                    ));
                }
            }
        }
    };
    send_text(ws, Element::new("success", ns::SASL).to_xml()).await?;
    open_stream(ws, ctx, frame::bind_features()).await?;

    let text = next_text(ws).await?;
    let iq = parse_stream_level(&text, &ctx.limits)?;
    let is_bind = iq.is("iq", ns::CLIENT)
        && iq.attr("type") == Some("set")
        && iq.child("bind", ns::BIND).is_some();
    if !is_bind {
        return Err(Ending::StreamError(
            "not-authorized",
            "bind a resource first".into(),
        ));
    }
    // The requested resource is ignored: every page shares the session's one full JID.
    let mut session = session;
    let waiting_since = Instant::now();
    let (jid, out) = loop {
        match attach(&session, ctx.page).await {
            Ok(bound) => break bound,
            Err(AttachError::TooManyPages) => {
                return Err(Ending::Close(
                    TOO_MANY_PAGES,
                    "too many pages for this user",
                ));
            }
            Err(AttachError::Gone) => return Err(Ending::Close(LOST, "session not available")),
            // SPEC §12: the session's owner is gone and its lease not yet expired. The page
            // waits here for the session to be adopted (bounded by the handshake timeout)
            // rather than reconnect into the same gap again and again with a growing backoff.
            Err(AttachError::Moving) => {
                // Past half the handshake's time the page is told to reconnect (1012) rather
                // than be cut off by the handshake timeout (1008, which clients do not retry).
                if waiting_since.elapsed() > ctx.handshake_timeout / 2 {
                    return Err(Ending::Close(RESTARTING, "session moving; reconnect"));
                }
                tokio::time::sleep(MOVING_RETRY).await;
                session = ctx
                    .registry
                    .find(&user)
                    .await
                    .ok_or(Ending::Close(LOST, "session not available"))?;
            }
        }
    };
    tracing::debug!(user = %user, page = ctx.page, "page bound");
    let result = bind_result(&iq, &jid);
    if send_text(ws, result.to_xml()).await.is_err() {
        session.detach(ctx.page).await;
        return Err(Ending::Gone);
    }
    Ok(Bound { session, jid, out })
}

/// Attaches page `page` to `session` (SPEC §4, §6): the session's full JID and the page's queue.
/// Shared by WebSocket and BOSH pages.
pub(super) async fn attach(
    session: &SessionHandle,
    page: PageId,
) -> Result<(Jid, PageReceiver), AttachError> {
    let (tx, out) = page_queue();
    let jid = session.attach(PageLink { id: page, tx }).await?;
    Ok((jid, out))
}

/// The answer to a page's bind request: the session's one full JID, from memory.
pub(super) fn bind_result(iq: &Element, jid: &Jid) -> Element {
    let mut result = Element::new("iq", ns::CLIENT)
        .with_attr("type", "result")
        .with_attr("to", jid.to_string())
        .with_child(
            Element::new("bind", ns::BIND)
                .with_child(Element::new("jid", ns::BIND).with_text(jid.to_string())),
        );
    if let Some(id) = iq.attr("id") {
        result.set_attr("id", id);
    }
    result
}

/// Checks an `<auth/>`: PLAIN with a token as password, or EXTERNAL backed by the cookie.
pub(super) async fn authenticate(
    ctx: &PageContext,
    auth: &Element,
) -> Result<(Jid, SessionHandle), &'static str> {
    let payload = auth.text();
    let payload = payload.trim();
    let raw = if payload.is_empty() || payload == "=" {
        Vec::new()
    } else {
        BASE64.decode(payload).map_err(|_| "incorrect-encoding")?
    };
    let raw = String::from_utf8(raw).map_err(|_| "incorrect-encoding")?;
    let (authzid, user) = match auth.attr("mechanism") {
        Some("PLAIN") => {
            let mut parts = raw.splitn(3, '\0');
            let (Some(authzid), Some(authcid), Some(token)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err("incorrect-encoding");
            };
            // RFC 4616 §2: both strings are prepared with SASLprep, as the server would.
            let token = sasl::prepare_password(token).map_err(|_| "not-authorized")?;
            let authcid = sasl::prepare_username(authcid).map_err(|_| "not-authorized")?;
            let user = ctx
                .registry
                .check_token_anywhere(&token)
                .await
                .ok_or("not-authorized")?;
            // The authcid names the account the token belongs to: its localpart or bare JID,
            // in any spelling that prepares to it.
            if !names_account(&authcid, &user) {
                return Err("not-authorized");
            }
            (authzid.to_owned(), user)
        }
        Some("EXTERNAL") => {
            let user = ctx.cookie_user.clone().ok_or("not-authorized")?;
            (raw, user)
        }
        _ => return Err("invalid-mechanism"),
    };
    if !authzid.is_empty() && Jid::parse(&authzid).ok().as_ref() != Some(&user) {
        return Err("invalid-authzid");
    }
    let session = ctx.registry.find(&user).await.ok_or("not-authorized")?;
    Ok((user, session))
}

/// Whether a PLAIN authcid names `user` (a bare JID): as a localpart of the user's domain, or as
/// the bare JID, compared in canonical form.
fn names_account(authcid: &str, user: &Jid) -> bool {
    let as_jid = if authcid.contains('@') {
        Jid::parse(authcid)
    } else {
        Jid::parse(&format!("{authcid}@{}", user.domain()))
    };
    as_jid.is_ok_and(|j| &j == user)
}

pub(super) fn sasl_failure(condition: &str) -> String {
    Element::new("failure", ns::SASL)
        .with_child(Element::new(condition, ns::SASL))
        .to_xml()
}

/// A token bucket for a page's stanzas.
pub(super) struct Rate {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    at: Instant,
}

impl Rate {
    pub(super) fn new(per_sec: u32) -> Rate {
        let per_sec = f64::from(per_sec.max(1));
        Rate {
            tokens: per_sec * 2.0,
            per_sec,
            burst: per_sec * 2.0,
            at: Instant::now(),
        }
    }

    pub(super) fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_sec)
            .min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Batches written in a row before a page's relay looks at its socket, ping and shutdown first.
const FAIR_EVERY: u32 = 16;

/// What woke a page's relay.
enum Wake {
    Socket(Option<Result<Message, axum::Error>>),
    Session(Option<PageOut>),
    Ping,
    Shutdown,
}

async fn relay(ws: &mut WebSocket, ctx: &PageContext, b: &mut Bound) -> Ending {
    let mut ping = tokio::time::interval(ctx.ping_interval);
    // Ticks missed while the page was busy are not made up in a burst of pings.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut heard = Instant::now();
    let mut rate = Rate::new(ctx.send_rate);
    // Made once: every page waits on the one daemon-wide token, and a wait made anew at each
    // wake-up would lock its waiter list twice per frame.
    let mut shutdown = std::pin::pin!(ctx.shutdown.cancelled());
    let mut batches_in_a_row = 0;
    loop {
        // The select only says what woke the page; the work is done after it, so the state of
        // a waiting page holds the four waits and not also the futures of their handlers
        // (select! keeps its futures alive while a handler runs).
        //
        // Biased, the session's frames first: a page is mostly woken for a frame, and then the
        // other three are not polled at all (the socket's read path, the ping's timer). So that
        // a page under a steady stream of frames is still heard, every FAIR_EVERY-th wait looks
        // at the rest first.
        let frames_first = batches_in_a_row < FAIR_EVERY;
        // A page kept busy by its socket or its queue may never reach the shutdown branch
        // below; the token itself is one atomic load.
        let wake = if ctx.shutdown.is_cancelled() {
            Wake::Shutdown
        } else if frames_first {
            tokio::select! {
                biased;
                out = b.out.recv() => Wake::Session(out),
                incoming = ws.recv() => Wake::Socket(incoming),
                () = &mut shutdown => Wake::Shutdown,
                _ = ping.tick() => Wake::Ping,
            }
        } else {
            tokio::select! {
                biased;
                incoming = ws.recv() => Wake::Socket(incoming),
                () = &mut shutdown => Wake::Shutdown,
                _ = ping.tick() => Wake::Ping,
                out = b.out.recv() => Wake::Session(out),
            }
        };
        batches_in_a_row = match wake {
            Wake::Session(_) if frames_first => batches_in_a_row + 1,
            _ => 0,
        };
        match wake {
            Wake::Socket(incoming) => {
                heard = Instant::now();
                // Boxed like the other work below: a page mostly waits, and its task is as large
                // as its largest await.
                if let Some(ending) = Box::pin(from_socket(ws, ctx, b, &mut rate, incoming)).await {
                    return ending;
                }
            }
            Wake::Session(Some(PageOut::Frame(f))) => {
                // Boxed (one allocation per batch, next to a write system call): the write's
                // state would otherwise be part of every idle page.
                if let Some(ending) = Box::pin(write_batch(ws, ctx, b, f)).await {
                    return ending;
                }
            }
            Wake::Session(Some(PageOut::Close(code, reason))) => {
                return Ending::Close(code, reason);
            }
            Wake::Session(None) => return Ending::Close(LOST, "session ended"),
            Wake::Ping => {
                if heard.elapsed() > ctx.dead_peer_timeout {
                    return Ending::Close(GOING_AWAY, "no answer to pings");
                }
                if Box::pin(ws.send(Message::Ping(Default::default())))
                    .await
                    .is_err()
                {
                    return Ending::Gone;
                }
            }
            Wake::Shutdown => {
                // What the session queued before the stop still goes out, in order, then the
                // close it decided on (1012, or 4004 when nothing survives the stop), else the
                // generic restart: the stop may be seen before the queue.
                while let Some(out) = b.out.try_recv() {
                    match out {
                        PageOut::Frame(f) => {
                            if let Some(ending) = Box::pin(write_batch(ws, ctx, b, f)).await {
                                return ending;
                            }
                        }
                        PageOut::Close(code, reason) => return Ending::Close(code, reason),
                    }
                }
                return Ending::Close(RESTARTING, "daemon restarting");
            }
        }
    }
}

/// Handles what the page's socket gave: a stanza goes to the session (or is answered here), a
/// `<close/>` or a fault ends the page (`Some`).
async fn from_socket(
    ws: &mut WebSocket,
    ctx: &PageContext,
    b: &mut Bound,
    rate: &mut Rate,
    incoming: Option<Result<Message, axum::Error>>,
) -> Option<Ending> {
    let text = match incoming {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return None,
        Some(Ok(Message::Binary(_))) => {
            return Some(Ending::StreamError(
                "unsupported-encoding",
                "binary frames are not XMPP".into(),
            ));
        }
        Some(Ok(Message::Close(_)) | Err(_)) | None => return Some(Ending::Gone),
    };
    let reply = match frame::read(&text, &ctx.limits, &b.jid) {
        Ok(PageInput::Close) => return Some(Ending::Close(NORMAL, "closed by the page")),
        Ok(PageInput::Stanza(stanza)) => match before_session(stanza, &b.jid, rate) {
            BeforeSession::Answer(reply) => Some(reply),
            BeforeSession::Dropped => None,
            BeforeSession::PassOn(stanza) => {
                if !b.session.from_page(ctx.page, stanza).await {
                    return Some(Ending::Close(LOST, "session ended"));
                }
                None
            }
        },
        Err(Rejection::Stanza(reply)) => Some(reply),
        Err(Rejection::Drop) => None,
        Err(Rejection::Stream { condition, text }) => {
            ctx.metrics.rejected_frames.fetch_add(1, Ordering::Relaxed);
            return Some(Ending::StreamError(condition, text));
        }
    };
    if let Some(reply) = reply
        && send_text(ws, reply.to_xml()).await.is_err()
    {
        return Some(Ending::Gone);
    }
    None
}

/// Frames written to a page before one flush, at most.
const BATCH: usize = 64;

/// Writes `first` and whatever else is already queued for the page (up to [`BATCH`] frames) with
/// one flush, so a burst costs one write system call rather than one per frame. `Some` ends the
/// page.
async fn write_batch(
    ws: &mut WebSocket,
    ctx: &PageContext,
    b: &mut Bound,
    first: Frame,
) -> Option<Ending> {
    use futures_util::SinkExt as _;
    let mut made = Vec::with_capacity(1);
    let mut bytes = 0;
    let mut next = Some(first);
    let mut ending = None;
    let written = tokio::time::timeout(ctx.dead_peer_timeout, async {
        while let Some(f) = next.take() {
            bytes += f.len();
            made.push(f.made_at());
            ws.feed(Message::Text(f.text())).await?;
            if made.len() >= BATCH {
                break;
            }
            match b.out.try_recv() {
                Some(PageOut::Frame(f)) => next = Some(f),
                Some(PageOut::Close(code, reason)) => ending = Some(Ending::Close(code, reason)),
                None => {}
            }
        }
        ws.flush().await
    })
    .await;
    b.out.written(bytes);
    if !matches!(written, Ok(Ok(()))) {
        return Some(Ending::Gone);
    }
    ctx.metrics
        .frames_to_pages
        .fetch_add(made.len() as u64, Ordering::Relaxed);
    for at in made {
        ctx.metrics.fanout_latency.observe(at.elapsed());
    }
    ending
}

/// What becomes of a checked stanza from a page before the session sees it.
pub(super) enum BeforeSession {
    /// Answered without the session: the legacy session request, or an error for sending too
    /// fast.
    Answer(Element),
    /// Over the page's send rate and itself an error: dropped without an answer.
    Dropped,
    /// For the session.
    PassOn(Element),
}

/// Answers what a page's own stream answers and applies the page's send rate (SPEC §9), the
/// same for WebSocket and BOSH pages.
pub(super) fn before_session(stanza: Element, jid: &Jid, rate: &mut Rate) -> BeforeSession {
    if let Some(reply) = local_answer(&stanza, jid) {
        return BeforeSession::Answer(reply);
    }
    if rate.allow() {
        return BeforeSession::PassOn(stanza);
    }
    match frame::stanza_error(&stanza, "wait", "resource-constraint", "sending too fast") {
        Rejection::Stanza(reply) => BeforeSession::Answer(reply),
        _ => BeforeSession::Dropped,
    }
}

/// Requests a page's own stream answers, without the session: the legacy session request.
fn local_answer(stanza: &Element, jid: &Jid) -> Option<Element> {
    let is_session = stanza.is("iq", ns::CLIENT)
        && stanza.attr("type") == Some("set")
        && stanza.child("session", ns::SESSION).is_some();
    is_session.then(|| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", stanza.attr("id").unwrap_or_default())
            .with_attr("to", jid.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_authcid_names_the_account_in_any_spelling() {
        let zoe = Jid::parse("zoë@localhost").unwrap();
        for authcid in [
            "zoë",
            "ZOË",
            "zoe\u{308}",
            "zoë@localhost",
            "ZOË@LocalHost.",
        ] {
            assert!(names_account(authcid, &zoe), "{authcid:?}");
        }
        for authcid in ["zoe", "bob", "zoë@elsewhere", "zoë@localhost/r", "", "a b"] {
            assert!(!names_account(authcid, &zoe), "{authcid:?}");
        }
    }
}
