//! The task that owns one user's session: its upstream BOSH session, its pages, its grace period
//! and its re-login. It applies the rules of [`Mux`] and carries out their effects; it never
//! waits for a page (a page that falls behind is closed) and never blocks on upstream (a full
//! upstream queue drops the stanza with a log line rather than stalling every page).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::mux::{Effect, Mux, PageId};
use super::registry::Registry;
use super::{AttachError, Command, PageLink, PageOut, Readiness, SessionHandle, SessionInfo};
use crate::bosh::{BoshError, BoshEvent, BoshSession, Credentials, SessionMeta};
use crate::page::Frame;
use crate::state::SavedSession;
use crate::store::{SessionRecord, Store, Write};
use crate::xmpp::{Element, Jid};

use crate::page::close::{
    LOST as CLOSE_LOST, RESTARTING as CLOSE_RESTARTING, REVOKED as CLOSE_REVOKED,
    SLOW as CLOSE_SLOW,
};

/// Stanzas from pages held while the upstream session is being re-established.
const HELD_WHILE_RECONNECTING: usize = 1000;

/// Starts the actor for `bare`; it logs in at once.
pub(crate) fn spawn(
    registry: Arc<Registry>,
    id: u64,
    bare: Jid,
    creds: Credentials,
) -> SessionHandle {
    start(registry, id, bare, creds, None)
}

/// Starts the actor for a session saved by an earlier process; it resumes the upstream session
/// instead of logging in. No password was saved, so it cannot log in again if that fails.
pub(crate) fn spawn_restored(
    registry: Arc<Registry>,
    id: u64,
    full: Jid,
    saved: SavedSession,
) -> SessionHandle {
    let creds = Credentials::Attach {
        jid: full.clone(),
        sid: saved.params.sid.clone(),
        rid: saved.next_rid,
    };
    start(registry, id, full.to_bare(), creds, Some(saved))
}

fn start(
    registry: Arc<Registry>,
    id: u64,
    bare: Jid,
    creds: Credentials,
    restore: Option<SavedSession>,
) -> SessionHandle {
    let (tx, commands) = mpsc::channel(256);
    let attached = matches!(creds, Credentials::Attach { .. });
    let info = Arc::new(Mutex::new(SessionInfo::new(attached)));
    let (ready_tx, ready) = watch::channel(Readiness::Connecting);
    let handle = SessionHandle {
        id,
        bare: bare.clone(),
        tx,
        info: info.clone(),
        ready,
    };
    let actor = Actor {
        registry,
        id,
        bare,
        creds,
        commands,
        info,
        ready: ready_tx,
        pages: HashMap::new(),
        grace_until: None,
        held: VecDeque::new(),
        restore,
        store: Store::memory(),
    };
    tokio::spawn(actor.run());
    handle
}

struct Actor {
    registry: Arc<Registry>,
    id: u64,
    bare: Jid,
    creds: Credentials,
    commands: mpsc::Receiver<Command>,
    info: Arc<Mutex<SessionInfo>>,
    ready: watch::Sender<Readiness>,
    pages: HashMap<PageId, PageLink>,
    /// When the session ends if no page attaches.
    grace_until: Option<Instant>,
    /// Upstream-bound stanzas waiting for a re-login to finish.
    held: VecDeque<Element>,
    /// A session saved by an earlier process, to resume instead of logging in.
    restore: Option<SavedSession>,
    /// This session's record (requests not yet handed on), read back when it is suspended into
    /// the state file.
    store: Store,
}

/// How the running session ended: pages are closed with this code and reason; upstream is
/// already gone or terminated.
struct End(u16, &'static str);

impl Actor {
    async fn run(mut self) {
        if let Some(saved) = self.restore.take() {
            return self.run_restored(saved).await;
        }
        let resource = self.registry.settings.resource.clone();
        let first = self.login(&resource).await;
        let session = match first {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(user = %self.bare, error = %e, "login failed");
                let auth = matches!(e, BoshError::AuthFailed { .. });
                let timed_out = matches!(e, BoshError::LoginTimeout(_));
                let _ = self.ready.send(Readiness::Failed {
                    message: e.to_string(),
                    auth,
                    timed_out,
                });
                self.finish();
                return;
            }
        };
        tracing::info!(user = %self.bare, "session established");
        self.registry.metrics.logins.fetch_add(1, Ordering::Relaxed);
        let settings = &self.registry.settings;
        let mux = Mux::new(
            session.jid.clone(),
            settings.offline_buffer,
            settings.iq_timeout,
            settings.grace,
        );
        // A new session waits for its first page at least as long as its ticket lives.
        self.grace_until = Some(Instant::now() + settings.grace.max(settings.ticket_ttl));
        {
            let mut info = self.info.lock();
            info.jid = Some(session.jid.to_string());
            info.upstream = "live";
            info.upstream_handle = Some(session.handle.clone());
        }
        let _ = self.ready.send(Readiness::Ready(session.jid.clone()));
        self.serve_to_end(session, mux).await;
    }

    /// Resumes a session saved by an earlier process: the BOSH session continues where it was
    /// (unanswered requests resent first), caches and tokens as they were.
    async fn run_restored(mut self, saved: SavedSession) {
        let (Ok(full), Some(resumable)) = (Jid::parse(&saved.jid), saved.resumable()) else {
            tracing::warn!(user = %self.bare, "saved session is damaged; dropped");
            let _ = self.ready.send(Readiness::Failed {
                message: "saved session is damaged".into(),
                auth: false,
                timed_out: false,
            });
            self.finish();
            return;
        };
        let meta = SessionMeta {
            jid: full.to_string(),
            params: saved.params.clone(),
            attached: saved.attached,
            created: saved.created,
        };
        let handed_on = resumable
            .unanswered
            .first()
            .map_or(saved.next_rid - 1, |(rid, _)| rid - 1);
        let bare = full.to_bare().to_string();
        let record_store = (self.store.create(&bare, meta.encode(), handed_on).await)
            .expect("the in-memory store does not fail");
        for (rid, bytes) in &resumable.unanswered {
            let _ = record_store.request(*rid, bytes.clone()).await;
        }
        let record = SessionRecord {
            bare,
            epoch: record_store.epoch(),
            meta: meta.encode(),
            caches: bytes::Bytes::new(),
            handed_on,
            requests: resumable.unanswered,
        };
        let session = (self.registry.client.resume(&record, record_store))
            .expect("the meta was just encoded");
        for stanza in resumable.outbound {
            let _ = session.handle.try_send(stanza);
        }
        let settings = &self.registry.settings;
        let mut mux = Mux::restore(
            full.clone(),
            settings.offline_buffer,
            settings.iq_timeout,
            settings.grace,
            &saved.mux,
            Instant::now(),
        );
        // Pages closed with 1012 reconnect; until then this is an ordinary grace period.
        self.grace_until = Some(Instant::now() + settings.grace);
        {
            let mut info = self.info.lock();
            info.jid = Some(full.to_string());
            info.upstream = "live";
            info.upstream_handle = Some(session.handle.clone());
            if saved.created > 0 {
                info.created = std::time::UNIX_EPOCH + Duration::from_secs(saved.created);
            }
        }
        for stanza in resumable.inbound {
            let effects = mux.from_upstream(stanza, Instant::now());
            self.apply(effects, &mut mux, &session, true);
        }
        tracing::info!(user = %self.bare, "session resumed from the state file");
        let _ = self.ready.send(Readiness::Ready(full));
        self.serve_to_end(session, mux).await;
    }

    async fn serve_to_end(&mut self, session: BoshSession, mut mux: Mux) {
        let End(code, reason) = self.serve(session, &mut mux).await;
        self.close_pages(code, reason);
        self.finish();
    }

    /// Marks the session ended and leaves the registry (revoking its tokens).
    fn finish(&mut self) {
        {
            let mut info = self.info.lock();
            info.upstream = "ended";
            info.upstream_handle = None;
        }
        self.registry.remove(&self.bare, self.id);
        self.commands.close();
    }

    async fn login(&self, resource: &str) -> Result<BoshSession, BoshError> {
        let _permit = self.registry.logins.acquire().await;
        self.registry
            .client
            .connect(&self.creds, Some(resource), &self.store)
            .await
    }

    async fn serve(&mut self, mut session: BoshSession, mux: &mut Mux) -> End {
        // Aborted when dropped: whichever way `serve` returns (stop, logout, suspend, grace), a
        // re-login still under way must not bind the resource afterwards.
        let mut relogin: Option<AbortOnDropHandle<Result<BoshSession, BoshError>>> = None;
        let mut live = true;
        loop {
            let grace = self.grace_until;
            let iq_deadline = mux.next_deadline();
            tokio::select! {
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else {
                        return End(CLOSE_RESTARTING, "daemon stopping");
                    };
                    match cmd {
                        Command::Attach { link, reply } => {
                            if self.pages.len() >= self.registry.settings.pages_per_user {
                                let _ = reply.send(Err(AttachError::TooManyPages));
                                continue;
                            }
                            let page = link.id;
                            self.pages.insert(page, link);
                            self.grace_until = None;
                            let effects = mux.page_bound(page);
                            let _ = reply.send(Ok(mux.jid().clone()));
                            self.apply(effects, mux, &session, live);
                        }
                        Command::FromPage { page, stanza } => {
                            if self.pages.contains_key(&page) {
                                self.touch(false);
                                let effects = mux.from_page(page, stanza, Instant::now());
                                self.apply(effects, mux, &session, live);
                            }
                        }
                        Command::Detach { page } => self.detach(page, mux, &session, live),
                        Command::Logout { done } => {
                            tracing::info!(user = %self.bare, "logout");
                            self.registry.revoke(&self.bare);
                            self.close_pages(CLOSE_REVOKED, "session revoked");
                            let _ = session.handle.terminate(vec![mux.farewell()]).await;
                            let _ = done.send(());
                            return End(CLOSE_REVOKED, "session revoked");
                        }
                        Command::Suspend { done } => {
                            self.close_pages(CLOSE_RESTARTING, "daemon restarting");
                            let mut saved = None;
                            if live
                                && let Ok(outbound) = session.handle.suspend().await
                                && let Ok(snapshot) = self.store.load().await
                                && let Some(record) = snapshot.sessions.first()
                            {
                                let attached = !matches!(self.creds, Credentials::Password { .. });
                                let tokens = self.registry.export_tokens(&self.bare);
                                let created = self.info.lock().created;
                                saved = Some(SavedSession::new(
                                    mux.jid().to_string(),
                                    attached,
                                    session.params.clone(),
                                    record,
                                    &outbound,
                                    mux.snapshot(),
                                    tokens,
                                    created,
                                ));
                            }
                            let _ = done.send(saved);
                            return End(CLOSE_RESTARTING, "daemon restarting");
                        }
                        Command::Stop { done } => {
                            // Nothing survives this stop (no state file): a page that reconnected
                            // would only fail to authenticate, so it is told not to.
                            self.close_pages(CLOSE_LOST, "daemon stopped; session ended");
                            let _ = session.handle.terminate(vec![mux.farewell()]).await;
                            let _ = done.send(());
                            return End(CLOSE_LOST, "daemon stopped; session ended");
                        }
                    }
                }
                event = session.events.recv(), if live => {
                    match event {
                        Some(BoshEvent::Response { rid, stanzas }) => {
                            for stanza in stanzas {
                                self.touch(true);
                                self.registry.metrics.stanzas_in.fetch_add(1, Ordering::Relaxed);
                                let effects = mux.from_upstream(stanza, Instant::now());
                                self.apply(effects, mux, &session, live);
                            }
                            let mark = Write::HandedOn { rid, caches: None };
                            let _ = session.store.write(mark).await;
                            session.handle.handed_on(rid);
                        }
                        Some(BoshEvent::Retrying { .. }) => self.info.lock().upstream = "retrying",
                        Some(BoshEvent::Recovered) => self.info.lock().upstream = "live",
                        Some(BoshEvent::Ended(Ok(()))) | None => {
                            return End(CLOSE_LOST, "upstream session ended");
                        }
                        Some(BoshEvent::Ended(Err(e))) => {
                            live = false;
                            self.registry.metrics.terminal_error(&terminal_condition(&e));
                            if !self.may_relogin(&e) {
                                tracing::info!(user = %self.bare, error = %e, "upstream session lost");
                                let effects = mux.notice("lost");
                                self.apply(effects, mux, &session, live);
                                return End(CLOSE_LOST, "upstream session lost");
                            }
                            tracing::info!(user = %self.bare, error = %e, "upstream session lost, logging in again");
                            self.info.lock().upstream = "reconnecting";
                            let effects = mux.notice("reconnecting");
                            self.apply(effects, mux, &session, live);
                            relogin = Some(AbortOnDropHandle::new(
                                self.spawn_relogin(mux.jid().resource().unwrap_or_default()),
                            ));
                        }
                    }
                }
                result = async { relogin.as_mut().expect("guarded").await }, if relogin.is_some() => {
                    relogin = None;
                    match result {
                        Ok(Ok(new)) => {
                            tracing::info!(user = %self.bare, "upstream session restored");
                            session = new;
                            live = true;
                            mux.set_jid(session.jid.clone());
                            {
                                let mut info = self.info.lock();
                                info.upstream = "live";
                                info.relogins += 1;
                                self.registry.metrics.relogins.fetch_add(1, Ordering::Relaxed);
                                self.registry.metrics.logins.fetch_add(1, Ordering::Relaxed);
                                info.jid = Some(session.jid.to_string());
                                info.upstream_handle = Some(session.handle.clone());
                            }
                            let mut effects = mux.upstream_reset();
                            effects.extend(mux.notice("restored"));
                            self.apply(effects, mux, &session, live);
                            for stanza in std::mem::take(&mut self.held) {
                                self.upstream(stanza, &session);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::info!(user = %self.bare, error = %e, "re-login failed");
                            let effects = mux.notice("lost");
                            self.apply(effects, mux, &session, live);
                            return End(CLOSE_LOST, "upstream session lost");
                        }
                        Err(_) => return End(CLOSE_LOST, "upstream session lost"),
                    }
                }
                () = sleep_until(grace), if grace.is_some() => {
                    tracing::info!(user = %self.bare, "grace period over, ending session");
                    if live {
                        let _ = session.handle.terminate(vec![mux.farewell()]).await;
                    }
                    return End(CLOSE_LOST, "session ended");
                }
                () = sleep_until(iq_deadline), if iq_deadline.is_some() => {
                    let effects = mux.expire(Instant::now());
                    self.apply(effects, mux, &session, live);
                }
            }
        }
    }

    /// Whether a lost upstream session is worth logging in again: only with a password, and not
    /// after a resource conflict (someone else took the resource; fighting would loop).
    fn may_relogin(&self, e: &BoshError) -> bool {
        let conflict =
            matches!(e, BoshError::Terminated { stream_error: Some(s), .. } if s == "conflict");
        matches!(self.creds, Credentials::Password { .. }) && !conflict
    }

    /// Logs in again in the background: same resource, jittered exponential backoff.
    fn spawn_relogin(&self, resource: &str) -> JoinHandle<Result<BoshSession, BoshError>> {
        let registry = self.registry.clone();
        let creds = self.creds.clone();
        let store = self.store.clone();
        let resource = resource.to_owned();
        tokio::spawn(async move {
            let attempts = registry.settings.relogin_attempts.max(1);
            let mut delay = registry.settings.relogin_backoff;
            let mut last = BoshError::Closed;
            for attempt in 1..=attempts {
                let jittered = delay / 2 + delay.mul_f64(rand::random::<f64>() / 2.0);
                tokio::time::sleep(jittered).await;
                let result = {
                    let _permit = registry.logins.acquire().await;
                    registry
                        .client
                        .connect(&creds, Some(&resource), &store)
                        .await
                };
                match result {
                    Ok(s) => return Ok(s),
                    Err(e @ BoshError::AuthFailed { .. }) => return Err(e),
                    Err(e) => {
                        tracing::debug!(attempt, error = %e, "re-login attempt failed");
                        last = e;
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(last)
        })
    }

    fn detach(&mut self, page: PageId, mux: &mut Mux, session: &BoshSession, live: bool) {
        if self.pages.remove(&page).is_none() {
            return;
        }
        let effects = mux.page_gone(page, Instant::now());
        self.apply(effects, mux, session, live);
        if self.pages.is_empty() {
            self.grace_until = Some(Instant::now() + self.registry.settings.grace);
        }
    }

    fn close_pages(&mut self, code: u16, reason: &'static str) {
        for (_, link) in self.pages.drain() {
            let _ = link.tx.send(PageOut::Close(code, reason));
        }
    }

    fn touch(&self, inbound: bool) {
        let mut info = self.info.lock();
        info.last_activity = SystemTime::now();
        if inbound {
            info.stanzas_in += 1;
        }
    }

    /// Carries out the rules' effects. Each stanza for pages is serialized once.
    fn apply(&mut self, effects: Vec<Effect>, mux: &mut Mux, session: &BoshSession, live: bool) {
        let mut slow = Vec::new();
        for effect in effects {
            match effect {
                Effect::Upstream(stanza) => {
                    if live {
                        self.upstream(stanza, session);
                    } else if self.held.len() < HELD_WHILE_RECONNECTING {
                        self.held.push_back(stanza);
                    }
                }
                Effect::ToPage(page, stanza) => {
                    let frame = Frame::from(stanza.to_xml());
                    self.send(page, frame, &mut slow);
                }
                Effect::ToPages { except, stanza } => {
                    let frame = Frame::from(stanza.to_xml());
                    let targets: Vec<PageId> = self
                        .pages
                        .keys()
                        .copied()
                        .filter(|p| Some(*p) != except)
                        .collect();
                    for page in targets {
                        self.send(page, frame.clone(), &mut slow);
                    }
                }
            }
        }
        {
            let mut info = self.info.lock();
            let stats = mux.stats();
            let metrics = &self.registry.metrics;
            metrics
                .buffered
                .fetch_add(stats.buffered - info.buffered, Ordering::Relaxed);
            metrics.buffer_dropped.fetch_add(
                stats.buffer_dropped - info.buffer_dropped,
                Ordering::Relaxed,
            );
            info.pages = self.pages.len();
            info.buffered = stats.buffered;
            info.buffer_dropped = stats.buffer_dropped;
        }
        for page in slow {
            if let Some(link) = self.pages.get(&page) {
                let _ = link
                    .tx
                    .send(PageOut::Close(CLOSE_SLOW, "page too slow to read"));
            }
            self.info.lock().slow_pages += 1;
            self.registry
                .metrics
                .slow_page_closes
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(user = %self.bare, page, "closing a page that fell behind");
            self.detach(page, mux, session, live);
        }
    }

    fn send(&self, page: PageId, frame: Frame, slow: &mut Vec<PageId>) {
        let Some(link) = self.pages.get(&page) else {
            return;
        };
        let len = frame.len();
        let queued = link.queued.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.registry.settings.page_queue_bytes {
            link.queued.fetch_sub(len, Ordering::Relaxed);
            if !slow.contains(&page) {
                slow.push(page);
            }
            return;
        }
        if link.tx.send(PageOut::Frame(frame)).is_err() {
            link.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }

    fn upstream(&self, stanza: Element, session: &BoshSession) {
        match session.handle.try_send(stanza) {
            Ok(()) => {
                self.info.lock().stanzas_out += 1;
                self.registry
                    .metrics
                    .stanzas_out
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => tracing::warn!(user = %self.bare, "upstream queue full, stanza dropped"),
        }
    }
}

/// The label a lost upstream session is counted under.
fn terminal_condition(e: &BoshError) -> String {
    match e {
        BoshError::Terminated { condition, .. } => {
            condition.clone().unwrap_or_else(|| "none".into())
        }
        BoshError::HttpStatus(s, _) => format!("http-{s}"),
        BoshError::RetriesExhausted { .. } => "retries-exhausted".into(),
        _ => "other".into(),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
