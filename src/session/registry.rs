//! Every live session by bare JID, and the browser credentials that lead to them: tokens (stored
//! as SHA-256 hashes, sliding idle expiry, revoked with the session) and one-time tickets.
//!
//! Locks here are `parking_lot` mutexes held for short, synchronous, I/O-free sections; no guard
//! ever crosses an `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::SessionHandle;
use crate::bosh::{BoshClient, Credentials};
use crate::metrics::Metrics;
use crate::xmpp::Jid;

/// Settings every session actor reads.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a session outlives its last page.
    pub grace: Duration,
    /// Idle lifetime of a browser token.
    pub token_ttl: Duration,
    /// Lifetime of a one-time ticket (a new session waits at least this long for its first page).
    pub ticket_ttl: Duration,
    /// Resource asked for at login.
    pub resource: String,
    /// Most sessions at once.
    pub max_users: usize,
    /// Most pages per session.
    pub pages_per_user: usize,
    /// Bytes queued for one page before it is closed with 4002.
    pub page_queue_bytes: usize,
    /// Messages buffered while no page is attached.
    pub offline_buffer: usize,
    /// How long an iq waits for its reply.
    pub iq_timeout: Duration,
    /// Re-login attempts after the upstream session is lost.
    pub relogin_attempts: u32,
    /// First delay between re-login attempts (doubles, jittered).
    pub relogin_backoff: Duration,
    /// The web app's re-login endpoint (SPEC §7), asked for credentials when a session holding
    /// no password is lost upstream; `None` ends such a session (4004).
    pub relogin: Option<super::relogin::ReloginClient>,
}

/// Why a session could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The daemon holds its maximum number of sessions.
    #[error("the daemon holds its maximum number of user sessions")]
    TooManyUsers,
}

struct Credential {
    bare: Jid,
    expires: Instant,
}

/// The daemon's sessions and credentials.
pub struct Registry {
    /// What session actors need to know.
    pub settings: Settings,
    /// Opens upstream sessions.
    pub client: BoshClient,
    /// The daemon's counters (shared with the BOSH client).
    pub metrics: Arc<Metrics>,
    /// Bounds concurrent logins, so a mass re-login after an outage does not hammer the server.
    pub logins: Semaphore,
    sessions: Mutex<HashMap<Jid, SessionHandle>>,
    tokens: Mutex<HashMap<[u8; 32], Credential>>,
    tickets: Mutex<HashMap<[u8; 32], Credential>>,
    next_id: AtomicU64,
}

impl Registry {
    /// An empty registry.
    pub fn new(settings: Settings, client: BoshClient) -> Arc<Registry> {
        Arc::new(Registry {
            settings,
            metrics: client.config().metrics.clone(),
            client,
            logins: Semaphore::new(16),
            sessions: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// The live session of `bare`, if any.
    pub fn get(&self, bare: &Jid) -> Option<SessionHandle> {
        self.sessions
            .lock()
            .get(bare)
            .filter(|h| !h.is_closed())
            .cloned()
    }

    /// Every live session.
    pub fn all(&self) -> Vec<SessionHandle> {
        self.sessions
            .lock()
            .values()
            .filter(|h| !h.is_closed())
            .cloned()
            .collect()
    }

    /// The session of `bare`: the live one (never a second upstream session), or a new one
    /// logging in with `creds`. `true` when it was created now.
    pub fn get_or_create(
        self: &Arc<Self>,
        bare: &Jid,
        creds: Credentials,
    ) -> Result<(SessionHandle, bool), RegistryError> {
        let mut sessions = self.sessions.lock();
        if let Some(h) = sessions.get(bare).filter(|h| !h.is_closed()) {
            return Ok((h.clone(), false));
        }
        sessions.retain(|_, h| !h.is_closed());
        if sessions.len() >= self.settings.max_users {
            return Err(RegistryError::TooManyUsers);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = super::actor::spawn(self.clone(), id, bare.clone(), creds);
        sessions.insert(bare.clone(), handle.clone());
        Ok((handle, true))
    }

    /// Forgets the session `id` of `bare` (called by the actor as it ends) and revokes the
    /// user's tokens and tickets.
    pub(crate) fn remove(&self, bare: &Jid, id: u64) {
        {
            let mut sessions = self.sessions.lock();
            if sessions.get(bare).is_some_and(|h| h.id == id) {
                sessions.remove(bare);
            }
        }
        self.revoke(bare);
    }

    /// Revokes every token and ticket of `bare`.
    pub fn revoke(&self, bare: &Jid) {
        self.tokens.lock().retain(|_, c| &c.bare != bare);
        self.tickets.lock().retain(|_, c| &c.bare != bare);
    }

    /// A new browser token for `bare` and when it expires if unused.
    pub fn issue_token(&self, bare: &Jid) -> (String, SystemTime) {
        let ttl = self.settings.token_ttl;
        let token = issue(&self.tokens, bare, ttl);
        (token, SystemTime::now() + ttl)
    }

    /// The user a token belongs to; using it extends its life.
    pub fn check_token(&self, token: &str) -> Option<Jid> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        let c = tokens.get_mut(&hash(token))?;
        if c.expires <= now {
            return None;
        }
        c.expires = now + self.settings.token_ttl;
        Some(c.bare.clone())
    }

    /// The hashes (hex) of `bare`'s tokens and the seconds of idle life each has left.
    pub fn export_tokens(&self, bare: &Jid) -> Vec<(String, u64)> {
        let now = Instant::now();
        self.tokens
            .lock()
            .iter()
            .filter(|(_, c)| &c.bare == bare && c.expires > now)
            .map(|(h, c)| (hex(h), c.expires.duration_since(now).as_secs()))
            .collect()
    }

    /// Takes over tokens saved by [`Registry::export_tokens`].
    pub fn import_tokens(&self, bare: &Jid, saved: &[(String, u64)]) {
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        for (h, secs) in saved {
            if let Some(hash) = unhex(h) {
                tokens.insert(
                    hash,
                    Credential {
                        bare: bare.clone(),
                        expires: now + Duration::from_secs(*secs),
                    },
                );
            }
        }
    }

    /// Takes over a session saved by an earlier process (SPEC §8).
    pub fn restore(self: &Arc<Self>, saved: crate::state::SavedSession) -> Option<SessionHandle> {
        let full = Jid::parse(&saved.jid).ok()?;
        let bare = full.to_bare();
        self.import_tokens(&bare, &saved.tokens);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = super::actor::spawn_restored(self.clone(), id, full, saved);
        self.sessions.lock().insert(bare, handle.clone());
        Some(handle)
    }

    /// A one-time ticket for `bare`.
    pub fn issue_ticket(&self, bare: &Jid) -> String {
        issue(&self.tickets, bare, self.settings.ticket_ttl)
    }

    /// Redeems a ticket (at most once).
    pub fn redeem_ticket(&self, ticket: &str) -> Option<Jid> {
        let c = self.tickets.lock().remove(&hash(ticket))?;
        (c.expires > Instant::now()).then_some(c.bare)
    }
}

/// 256 random bits, URL-safe; the map keeps only the hash.
fn issue(map: &Mutex<HashMap<[u8; 32], Credential>>, bare: &Jid, ttl: Duration) -> String {
    let mut raw = [0u8; 32];
    rand::fill(&mut raw);
    let secret = URL_SAFE_NO_PAD.encode(raw);
    let now = Instant::now();
    let mut map = map.lock();
    if map.len() % 256 == 255 {
        map.retain(|_, c| c.expires > now);
    }
    map.insert(
        hash(&secret),
        Credential {
            bare: bare.clone(),
            expires: now + ttl,
        },
    );
    secret
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}
