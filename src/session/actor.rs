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

use super::deps::Deps;
use super::mux::{Effect, Mux, PageId};
use super::persist::{self, Caches};
use super::relogin::ReloginError;
use super::{
    AttachError, Command, LoginFailure, PageLink, Readiness, Refused, SessionHandle, SessionInfo,
};
use crate::bosh::{BoshError, BoshEvent, BoshSession, Credentials, SessionMeta};
use crate::page::Frame;
use crate::store::{SessionRecord, StoreError, Write};
use crate::xmpp::{Element, Jid};

use crate::page::close::{
    LOST as CLOSE_LOST, RESTARTING as CLOSE_RESTARTING, REVOKED as CLOSE_REVOKED,
    SLOW as CLOSE_SLOW,
};

/// Stanzas from pages held while the upstream session is being re-established.
const HELD_WHILE_RECONNECTING: usize = 1000;
/// How long a change to the caches made by a page may wait to be written (a response from
/// upstream writes them at once, with its mark).
const CACHES_DELAY: Duration = Duration::from_millis(200);

/// Starts the actor for `bare`; it logs in at once.
pub(crate) fn spawn(deps: Arc<Deps>, id: u64, bare: Jid, creds: Credentials) -> SessionHandle {
    start(deps, id, bare, creds, None)
}

/// Starts the actor for a session found in the store at start (SPEC §8): it takes the record
/// over and resumes the upstream session instead of logging in. No password is stored, so a
/// later loss logs in again only through `relogin_url`.
pub(crate) fn spawn_recovered(
    deps: Arc<Deps>,
    id: u64,
    bare: Jid,
    record: SessionRecord,
) -> SessionHandle {
    let creds = Credentials::Attach {
        jid: bare.clone(),
        sid: String::new(),
        rid: 0,
    };
    start(deps, id, bare, creds, Some(record))
}

fn start(
    deps: Arc<Deps>,
    id: u64,
    bare: Jid,
    creds: Credentials,
    recover: Option<SessionRecord>,
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
        deps,
        id,
        bare,
        creds,
        commands,
        info,
        ready: ready_tx,
        pages: HashMap::new(),
        grace_until: None,
        held: VecDeque::new(),
        recover,
        dirty: false,
        caches_at: None,
        handed_on: 0,
    };
    tokio::spawn(actor.run());
    handle
}

struct Actor {
    deps: Arc<Deps>,
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
    /// A session found in the store at start, to resume instead of logging in.
    recover: Option<SessionRecord>,
    /// The caches changed since they were last written.
    dirty: bool,
    /// When changed caches are written if no upstream response writes them first.
    caches_at: Option<Instant>,
    /// The highest rid whose response was handed on (what a record written back names).
    handed_on: u64,
}

/// How the running session ended: pages are closed with this code and reason; upstream is
/// already gone or terminated. `keep`: the store record stays (a suspend for the next process,
/// or a session another owner took over); otherwise it is removed with the session's tokens.
struct End {
    code: u16,
    reason: &'static str,
    keep: bool,
}

impl End {
    /// The session is over: its record and tokens go.
    fn over(code: u16, reason: &'static str) -> End {
        End {
            code,
            reason,
            keep: false,
        }
    }
}

impl Actor {
    async fn run(mut self) {
        if let Some(record) = self.recover.take() {
            return self.run_recovered(record).await;
        }
        let resource = self.deps.settings.resource.clone();
        let first = self.login(&resource).await;
        let session = match first {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(user = %self.bare, error = %e, "login failed");
                let _ = self.ready.send(Readiness::Failed(LoginFailure::from(&e)));
                self.finish();
                return;
            }
        };
        tracing::info!(user = %self.bare, "session established");
        self.handed_on = session.handle.next_rid().saturating_sub(1);
        self.deps.metrics.logins.fetch_add(1, Ordering::Relaxed);
        let settings = &self.deps.settings;
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

    /// Takes over a session found in the store (SPEC §8, RECOVERY.md): the upstream session
    /// continues where the record says (unanswered requests resent first, once each), caches
    /// and tokens as they were. A damaged record is dropped; a record another owner holds now is
    /// left alone.
    async fn run_recovered(mut self, record: SessionRecord) {
        let store = match self.deps.store.take_over(&record).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(user = %self.bare, error = %e, "stored session not taken over");
                return self.fail(LoginFailure::Ended);
            }
        };
        let decoded = SessionMeta::decode(&record.meta)
            .ok()
            .and_then(|meta| Some((Jid::parse(&meta.jid).ok()?, meta)))
            .zip(persist::decode(&record.caches).ok());
        let Some(((full, meta), caches)) = decoded else {
            tracing::warn!(user = %self.bare, "stored session is damaged; dropped");
            if let Err(e) = store.remove().await {
                tracing::warn!(user = %self.bare, error = %e, "damaged record not removed");
            }
            return self.fail(LoginFailure::Damaged);
        };
        self.handed_on = record.handed_on;
        let session = match self.deps.client.resume(&record, store.clone()) {
            Ok(s) => s,
            Err(e) => {
                // A record that cannot be resumed now never will be: it goes, with its tokens.
                tracing::warn!(user = %self.bare, error = %e, "stored session not resumed; dropped");
                if let Err(e) = store.remove().await {
                    tracing::warn!(user = %self.bare, error = %e, "unresumable record not removed");
                }
                return self.fail(LoginFailure::from(&e));
            }
        };
        self.creds = Credentials::Attach {
            jid: full.clone(),
            sid: meta.params.sid.clone(),
            rid: session.handle.next_rid(),
        };
        let settings = &self.deps.settings;
        let mux = Mux::restore(
            full.clone(),
            settings.offline_buffer,
            settings.iq_timeout,
            settings.grace,
            &caches.mux,
            Instant::now(),
        );
        // What the stop kept goes upstream once: the record forgets it first, so that a crash
        // from here on cannot send it again (one before it is in a request loses it, as it does
        // a page's stanza in flight).
        let outbound = persist::stanzas(&caches.outbound);
        if !outbound.is_empty()
            && self
                .record(&session, Write::Caches(Self::caches(&mux)))
                .await
                .is_ok()
        {
            for stanza in outbound {
                self.upstream(stanza, &session);
            }
        }
        // Pages reconnect; until then this is an ordinary grace period.
        self.grace_until = Some(Instant::now() + settings.grace);
        {
            let mut info = self.info.lock();
            info.jid = Some(full.to_string());
            info.upstream = "live";
            info.upstream_handle = Some(session.handle.clone());
            if meta.created > 0 {
                info.created = std::time::UNIX_EPOCH + Duration::from_secs(meta.created);
            }
        }
        tracing::info!(user = %self.bare, "session taken over from the store");
        let _ = self.ready.send(Readiness::Ready(full));
        self.serve_to_end(session, mux).await;
    }

    /// Ends an actor that never had a session.
    fn fail(mut self, failure: LoginFailure) {
        let _ = self.ready.send(Readiness::Failed(failure));
        self.finish();
    }

    async fn serve_to_end(&mut self, session: BoshSession, mut mux: Mux) {
        let (end, session) = self.serve(session, &mut mux).await;
        self.close_pages(end.code, end.reason);
        if !end.keep
            && let Err(e) = session.store.remove().await
        {
            tracing::warn!(user = %self.bare, error = %e, "ended session not removed from the store");
        }
        self.finish();
    }

    /// Marks the session ended and leaves the table (revoking its tokens in memory).
    fn finish(&mut self) {
        {
            let mut info = self.info.lock();
            info.upstream = "ended";
            info.upstream_handle = None;
        }
        self.deps.sessions.remove(&self.bare, self.id);
        self.deps.tokens.revoke(&self.bare);
        self.commands.close();
    }

    async fn login(&self, resource: &str) -> Result<BoshSession, BoshError> {
        let _permit = self.deps.logins.acquire().await;
        self.deps
            .client
            .connect(&self.creds, Some(resource), &self.deps.store)
            .await
    }

    /// The caches as the store keeps them while the session runs.
    fn caches(mux: &Mux) -> bytes::Bytes {
        persist::encode(&Caches {
            mux: mux.snapshot(),
            outbound: Vec::new(),
        })
    }

    /// The caches a graceful stop leaves: with the stanzas still queued upstream (`outbound`),
    /// and marked settled — everything the state says went upstream did, or is in `outbound`.
    fn caches_at_stop(mux: &Mux, outbound: Vec<Element>) -> bytes::Bytes {
        let mut snapshot = mux.snapshot();
        snapshot.settled = true;
        persist::encode(&Caches {
            mux: snapshot,
            outbound: outbound.iter().map(Element::to_xml).collect(),
        })
    }

    /// Notes a change to the caches that no upstream response will write soon.
    fn caches_changed(&mut self) {
        self.dirty = true;
        if self.caches_at.is_none() {
            self.caches_at = Some(Instant::now() + CACHES_DELAY);
        }
    }

    /// Writes `write` to the session's record. `Err` only when another owner holds the session
    /// now (the caller stops driving it); an unavailable store costs durability, not the session.
    async fn record(&self, session: &BoshSession, write: Write) -> Result<(), StoreError> {
        match session.store.write(write).await {
            Err(e @ StoreError::Fenced { .. }) => Err(e),
            Err(e) => {
                self.deps
                    .metrics
                    .store_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(user = %self.bare, error = %e, "session record not written");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Takes in the response to `rid`: the rules see its stanzas, the record gets the mark (and
    /// the caches, when they changed) before any page sees them — a crash after the mark can
    /// cost a page a frame in flight, never show it one twice — then pages get their frames.
    async fn on_response(
        &mut self,
        rid: u64,
        stanzas: Vec<Element>,
        mux: &mut Mux,
        session: &BoshSession,
        live: bool,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut effects = Vec::new();
        let attached = !self.pages.is_empty();
        for stanza in stanzas {
            self.touch(true);
            self.deps.metrics.stanzas_in.fetch_add(1, Ordering::Relaxed);
            self.dirty |= persist::inbound_changes_caches(&stanza, attached);
            effects.extend(mux.from_upstream(stanza, now));
        }
        let caches = std::mem::take(&mut self.dirty).then(|| Self::caches(mux));
        if caches.is_some() {
            self.caches_at = None;
        }
        self.record(session, Write::HandedOn { rid, caches })
            .await?;
        self.handed_on = rid;
        session.handle.handed_on(rid);
        self.apply(effects, mux, session, live);
        Ok(())
    }

    async fn serve(&mut self, mut session: BoshSession, mux: &mut Mux) -> (End, BoshSession) {
        // Aborted when dropped: whichever way `serve` returns (stop, logout, suspend, grace), a
        // re-login still under way must not bind the resource afterwards.
        let mut relogin: Option<AbortOnDropHandle<Result<Relogged, ReloginFailure>>> = None;
        let mut live = true;
        let moved = End {
            code: CLOSE_RESTARTING,
            reason: "session moved to another owner",
            keep: true,
        };
        loop {
            let grace = self.grace_until;
            let iq_deadline = mux.next_deadline();
            let caches_at = self.caches_at;
            tokio::select! {
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else {
                        return (End::over(CLOSE_RESTARTING, "daemon stopping"), session);
                    };
                    match cmd {
                        Command::Attach { link, reply } => {
                            if self.pages.len() >= self.deps.settings.pages_per_user {
                                let _ = reply.send(Err(AttachError::TooManyPages));
                                continue;
                            }
                            let page = link.id;
                            self.pages.insert(page, link);
                            self.grace_until = None;
                            let effects = mux.page_bound(page);
                            let _ = reply.send(Ok(mux.jid().clone()));
                            if effects.is_empty() {
                                self.caches_changed();
                            } else if live {
                                // The grace buffer goes to this page: the store forgets it first,
                                // so that a crash from here on never shows it twice.
                                self.dirty = false;
                                self.caches_at = None;
                                let caches = Self::caches(mux);
                                if self.record(&session, Write::Caches(caches)).await.is_err() {
                                    return (moved, session);
                                }
                            }
                            self.apply(effects, mux, &session, live);
                        }
                        Command::FromPage { page, stanza } => {
                            if self.pages.contains_key(&page) {
                                self.touch(false);
                                if persist::outbound_changes_caches(&stanza) {
                                    self.caches_changed();
                                }
                                let effects = mux.from_page(page, stanza, Instant::now());
                                self.apply(effects, mux, &session, live);
                            }
                        }
                        Command::Detach { page } => self.detach(page, mux, &session, live),
                        Command::Resync => {
                            let meta = SessionMeta {
                                jid: session.jid.to_string(),
                                params: session.params.clone(),
                                attached: matches!(self.creds, Credentials::Attach { .. }),
                                created: self
                                    .info
                                    .lock()
                                    .created
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| d.as_secs()),
                            };
                            let caches = Self::caches(mux);
                            let handed_on = self.handed_on;
                            if let Err(e) = session.store.restore(meta.encode(), caches, handed_on).await {
                                tracing::warn!(user = %self.bare, error = %e, "session record not written back");
                            }
                        }
                        Command::Logout { done } => {
                            tracing::info!(user = %self.bare, "logout");
                            self.deps.tokens.revoke(&self.bare);
                            // The record (and the stored tokens) go before anything else: a
                            // crash from here on must not bring the session back.
                            if let Err(e) = session.store.remove().await {
                                tracing::warn!(user = %self.bare, error = %e, "logged-out session not removed from the store");
                            }
                            self.close_pages(CLOSE_REVOKED, "session revoked");
                            let _ = session.handle.terminate(vec![mux.farewell()]).await;
                            let _ = done.send(());
                            return (End::over(CLOSE_REVOKED, "session revoked"), session);
                        }
                        Command::Suspend { done } => {
                            self.close_pages(CLOSE_RESTARTING, "daemon restarting");
                            let outbound = if live {
                                session.handle.suspend().await.unwrap_or_default()
                            } else {
                                Vec::new()
                            };
                            // Kept also while the upstream session is being logged in again (or
                            // has just ended): the record still names it, so the next process
                            // finds it dead and logs in again through `relogin_url`, or drops
                            // it, as after a `kill -9` — rather than losing it with its tokens.
                            let caches = Self::caches_at_stop(mux, outbound);
                            let kept = self.record(&session, Write::Caches(caches)).await.is_ok();
                            let _ = done.send(kept);
                            let end = End {
                                code: CLOSE_RESTARTING,
                                reason: "daemon restarting",
                                keep: kept,
                            };
                            return (end, session);
                        }
                        Command::Stop { done } => {
                            // Nothing survives this stop (no durable store): a page that
                            // reconnected would only fail to authenticate, so it is told not to.
                            self.close_pages(CLOSE_LOST, "daemon stopped; session ended");
                            let _ = session.handle.terminate(vec![mux.farewell()]).await;
                            let _ = done.send(());
                            return (End::over(CLOSE_LOST, "daemon stopped; session ended"), session);
                        }
                    }
                }
                event = session.events.recv(), if live => {
                    match event {
                        Some(BoshEvent::Response { rid, stanzas }) => {
                            if self.on_response(rid, stanzas, mux, &session, live).await.is_err() {
                                tracing::warn!(user = %self.bare, "session taken over by another owner; no longer driven here");
                                return (moved, session);
                            }
                        }
                        Some(BoshEvent::Retrying { .. }) => self.info.lock().upstream = "retrying",
                        Some(BoshEvent::Recovered) => self.info.lock().upstream = "live",
                        Some(BoshEvent::Ended(Ok(()))) | None => {
                            return (End::over(CLOSE_LOST, "upstream session ended"), session);
                        }
                        Some(BoshEvent::Ended(Err(BoshError::Fenced))) => {
                            tracing::warn!(user = %self.bare, "session taken over by another owner; no longer driven here");
                            return (moved, session);
                        }
                        Some(BoshEvent::Ended(Err(e))) => {
                            live = false;
                            self.deps.metrics.terminal_error(&terminal_condition(&e));
                            if !self.may_relogin(&e) {
                                tracing::info!(user = %self.bare, error = %e, "upstream session lost");
                                let effects = mux.notice("lost");
                                self.apply(effects, mux, &session, live);
                                return (End::over(CLOSE_LOST, "upstream session lost"), session);
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
                        Ok(Ok(Relogged { session: new, creds })) => {
                            tracing::info!(user = %self.bare, "upstream session restored");
                            session = new;
                            self.handed_on = session.handle.next_rid().saturating_sub(1);
                            // A password from the web app is held like a handed-off one: the
                            // next loss needs no call.
                            let attached = !matches!(creds, Credentials::Password { .. });
                            self.creds = creds;
                            self.info.lock().attached = attached;
                            live = true;
                            mux.set_jid(session.jid.clone());
                            {
                                let mut info = self.info.lock();
                                info.upstream = "live";
                                info.relogins += 1;
                                self.deps.metrics.relogins.fetch_add(1, Ordering::Relaxed);
                                self.deps.metrics.logins.fetch_add(1, Ordering::Relaxed);
                                info.jid = Some(session.jid.to_string());
                                info.upstream_handle = Some(session.handle.clone());
                            }
                            let mut effects = mux.upstream_reset();
                            effects.extend(mux.notice("restored"));
                            // The new session's record starts with empty caches.
                            self.caches_changed();
                            self.apply(effects, mux, &session, live);
                            for stanza in std::mem::take(&mut self.held) {
                                self.upstream(stanza, &session);
                            }
                        }
                        Ok(Err(ReloginFailure::LoggedOut)) => {
                            // Like a logout (SPEC §7): 4001, tokens revoked; upstream is gone.
                            tracing::info!(user = %self.bare, "the web app says the user is logged out; session ended");
                            self.deps.tokens.revoke(&self.bare);
                            return (End::over(CLOSE_REVOKED, "session revoked"), session);
                        }
                        Ok(Err(e)) => {
                            tracing::info!(user = %self.bare, error = %e, "re-login failed");
                            let effects = mux.notice("lost");
                            self.apply(effects, mux, &session, live);
                            return (End::over(CLOSE_LOST, "upstream session lost"), session);
                        }
                        Err(_) => return (End::over(CLOSE_LOST, "upstream session lost"), session),
                    }
                }
                () = sleep_until(grace), if grace.is_some() => {
                    tracing::info!(user = %self.bare, "grace period over, ending session");
                    if live {
                        let _ = session.handle.terminate(vec![mux.farewell()]).await;
                    }
                    return (End::over(CLOSE_LOST, "session ended"), session);
                }
                () = sleep_until(iq_deadline), if iq_deadline.is_some() => {
                    let effects = mux.expire(Instant::now());
                    self.apply(effects, mux, &session, live);
                }
                () = sleep_until(caches_at), if caches_at.is_some() => {
                    self.caches_at = None;
                    if std::mem::take(&mut self.dirty) && live {
                        let caches = Self::caches(mux);
                        if self.record(&session, Write::Caches(caches)).await.is_err() {
                            return (moved, session);
                        }
                    }
                }
            }
        }
    }

    /// Whether a lost upstream session is worth logging in again: only with a password held or
    /// a web app to ask for credentials (`relogin_url`, SPEC §7), and not after a resource
    /// conflict (someone else took the resource; fighting would loop).
    fn may_relogin(&self, e: &BoshError) -> bool {
        let conflict =
            matches!(e, BoshError::Terminated { stream_error: Some(s), .. } if s == "conflict");
        let has_creds = matches!(self.creds, Credentials::Password { .. })
            || self.deps.settings.relogin.is_some();
        has_creds && !conflict
    }

    /// Logs in again in the background: same resource, jittered exponential backoff. Without a
    /// password held, each attempt first asks the web app for credentials; its "logged out"
    /// ends the attempts at once.
    fn spawn_relogin(&self, resource: &str) -> JoinHandle<Result<Relogged, ReloginFailure>> {
        let deps = self.deps.clone();
        let held = self.creds.clone();
        let bare = self.bare.clone();
        let resource = resource.to_owned();
        tokio::spawn(async move {
            let attempts = deps.settings.relogin_attempts.max(1);
            let mut delay = deps.settings.relogin_backoff;
            let mut last = ReloginFailure::Upstream(BoshError::Closed);
            for attempt in 1..=attempts {
                let jittered = delay / 2 + delay.mul_f64(rand::random::<f64>() / 2.0);
                tokio::time::sleep(jittered).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                let creds = match (&held, &deps.settings.relogin) {
                    (Credentials::Password { .. }, _) | (_, None) => held.clone(),
                    (Credentials::Attach { .. }, Some(web_app)) => {
                        match web_app.credentials(&bare).await {
                            Ok(creds) => creds,
                            Err(ReloginError::LoggedOut) => return Err(ReloginFailure::LoggedOut),
                            Err(e) => {
                                tracing::warn!(user = %bare, attempt, error = %e, "asking the web app for credentials failed");
                                last = ReloginFailure::WebApp(e);
                                continue;
                            }
                        }
                    }
                };
                let result = {
                    let _permit = deps.logins.acquire().await;
                    deps.client
                        .connect(&creds, Some(&resource), &deps.store)
                        .await
                };
                match result {
                    Ok(session) => return Ok(Relogged { session, creds }),
                    Err(e @ BoshError::AuthFailed { .. }) => {
                        return Err(ReloginFailure::Upstream(e));
                    }
                    Err(e) => {
                        tracing::debug!(attempt, error = %e, "re-login attempt failed");
                        last = ReloginFailure::Upstream(e);
                    }
                }
            }
            Err(last)
        })
    }

    fn detach(&mut self, page: PageId, mux: &mut Mux, session: &BoshSession, live: bool) {
        if self.pages.remove(&page).is_none() {
            return;
        }
        let effects = mux.page_gone(page, Instant::now());
        self.caches_changed();
        self.apply(effects, mux, session, live);
        if self.pages.is_empty() {
            self.grace_until = Some(Instant::now() + self.deps.settings.grace);
        }
    }

    fn close_pages(&mut self, code: u16, reason: &'static str) {
        for (_, link) in self.pages.drain() {
            link.tx.close(code, reason);
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
            let metrics = &self.deps.metrics;
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
                link.tx.close(CLOSE_SLOW, "page too slow to read");
            }
            self.info.lock().slow_pages += 1;
            self.deps
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
        // A page whose task is gone is detached by its task; nothing to do here.
        if link.tx.frame(frame, self.deps.settings.page_queue_bytes) == Err(Refused::Full)
            && !slow.contains(&page)
        {
            slow.push(page);
        }
    }

    fn upstream(&self, stanza: Element, session: &BoshSession) {
        match session.handle.try_send(stanza) {
            Ok(()) => {
                self.info.lock().stanzas_out += 1;
                self.deps
                    .metrics
                    .stanzas_out
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => tracing::warn!(user = %self.bare, "upstream queue full, stanza dropped"),
        }
    }
}

/// A re-login that succeeded: the new session and the credentials it was established with (held
/// from then on).
struct Relogged {
    session: BoshSession,
    creds: Credentials,
}

/// Why a re-login gave up.
#[derive(Debug, thiserror::Error)]
enum ReloginFailure {
    /// The web app answered 404: the user is logged out (pages get 4001).
    #[error("the web app says the user is logged out")]
    LoggedOut,
    /// The last attempt's login or attach failed.
    #[error(transparent)]
    Upstream(BoshError),
    /// The last attempt got no credentials from the web app.
    #[error(transparent)]
    WebApp(ReloginError),
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
