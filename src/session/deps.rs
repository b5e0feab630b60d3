//! What a session actor needs from the daemon, handed to it as one explicit value (the actor
//! never reaches into the registry): settings, the upstream client, counters, the login limit,
//! the store, the browser credentials, and the table it leaves when it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::SessionHandle;
use super::tokens::Tokens;
use crate::bosh::BoshClient;
use crate::metrics::Metrics;
use crate::store::Store;
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

/// Live sessions by canonical bare JID.
#[derive(Default)]
pub struct SessionTable {
    map: Mutex<HashMap<Jid, SessionHandle>>,
}

impl SessionTable {
    /// The live session of `bare`, if any.
    pub fn get(&self, bare: &Jid) -> Option<SessionHandle> {
        self.map
            .lock()
            .get(bare)
            .filter(|h| !h.is_closed())
            .cloned()
    }

    /// Every live session.
    pub fn all(&self) -> Vec<SessionHandle> {
        self.map
            .lock()
            .values()
            .filter(|h| !h.is_closed())
            .cloned()
            .collect()
    }

    /// The live session of `bare`, or the one `start` makes, inserted under the same lock (so
    /// two callers never make two). `Ok((handle, created))`; `Err(())` when `max` sessions are
    /// live and a new one would be needed.
    pub(crate) fn get_or_insert(
        &self,
        bare: &Jid,
        max: usize,
        start: impl FnOnce() -> SessionHandle,
    ) -> Result<(SessionHandle, bool), ()> {
        let mut map = self.map.lock();
        if let Some(h) = map.get(bare).filter(|h| !h.is_closed()) {
            return Ok((h.clone(), false));
        }
        // Ended sessions normally remove themselves; the sweep for any left behind runs only at
        // the limit, so a login costs O(1) rather than a pass over every session.
        if map.len() >= max {
            map.retain(|_, h| !h.is_closed());
            if map.len() >= max {
                return Err(());
            }
        }
        let handle = start();
        map.insert(bare.clone(), handle.clone());
        Ok((handle, true))
    }

    /// Forgets session `id` of `bare` (a later session of the same user stays).
    pub(crate) fn remove(&self, bare: &Jid, id: u64) {
        let mut map = self.map.lock();
        if map.get(bare).is_some_and(|h| h.id == id) {
            map.remove(bare);
        }
    }
}

/// See the module documentation.
pub struct Deps {
    /// What session actors need to know.
    pub settings: Settings,
    /// Opens upstream sessions.
    pub client: BoshClient,
    /// The daemon's counters (shared with the BOSH client).
    pub metrics: Arc<Metrics>,
    /// Bounds concurrent logins, so a mass re-login after an outage does not hammer the server.
    pub logins: Semaphore,
    /// Where sessions are kept as they change (SPEC §8).
    pub store: Store,
    /// Browser tokens and tickets.
    pub tokens: Tokens,
    /// Live sessions.
    pub sessions: SessionTable,
}
