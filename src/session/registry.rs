//! The daemon's sessions and the browser credentials that lead to them: one upstream session
//! per canonical bare JID (SPEC §3, §3a), started, looked up, and taken over from the store at
//! start (SPEC §8). The registry starts actors; actors see only their [`Deps`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::sync::Semaphore;

use super::SessionHandle;
use super::deps::{Deps, SessionTable, Settings};
use super::tokens::Tokens;
use crate::bosh::{BoshClient, Credentials};
use crate::store::{SessionRecord, Snapshot, Store};
use crate::xmpp::Jid;

/// Why a session could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The daemon holds its maximum number of sessions.
    #[error("the daemon holds its maximum number of user sessions")]
    TooManyUsers,
}

/// The daemon's sessions and credentials. Derefs to the [`Deps`] its actors share.
pub struct Registry {
    deps: Arc<Deps>,
    next_id: AtomicU64,
}

impl std::ops::Deref for Registry {
    type Target = Deps;
    fn deref(&self) -> &Deps {
        &self.deps
    }
}

impl Registry {
    /// An empty registry whose sessions are kept in `store`.
    pub fn new(settings: Settings, client: BoshClient, store: Store) -> Arc<Registry> {
        let tokens = Tokens::new(store.clone(), settings.token_ttl, settings.ticket_ttl);
        Arc::new(Registry {
            deps: Arc::new(Deps {
                metrics: client.config().metrics.clone(),
                settings,
                client,
                logins: Semaphore::new(16),
                store,
                tokens,
                sessions: SessionTable::default(),
            }),
            next_id: AtomicU64::new(1),
        })
    }

    /// The live session of `bare`, if any.
    pub fn get(&self, bare: &Jid) -> Option<SessionHandle> {
        self.sessions.get(bare)
    }

    /// Every live session.
    pub fn all(&self) -> Vec<SessionHandle> {
        self.sessions.all()
    }

    /// The session of `bare`: the live one (never a second upstream session), or a new one
    /// logging in with `creds`. `true` when it was created now.
    pub fn get_or_create(
        &self,
        bare: &Jid,
        creds: Credentials,
    ) -> Result<(SessionHandle, bool), RegistryError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .get_or_insert(bare, self.settings.max_users, || {
                super::actor::spawn(self.deps.clone(), id, bare.clone(), creds)
            })
            .map_err(|()| RegistryError::TooManyUsers)
    }

    /// Takes over everything a store holds (SPEC §8): its credentials, and each stored session
    /// by an actor that resumes it upstream. Returns how many sessions were taken over.
    pub fn recover(&self, snapshot: Snapshot) -> usize {
        self.tokens.restore(&snapshot.credentials);
        let mut count = 0;
        for record in snapshot.sessions {
            if self.recover_one(record).is_some() {
                count += 1;
            }
        }
        count
    }

    fn recover_one(&self, record: SessionRecord) -> Option<SessionHandle> {
        let bare = Jid::parse(&record.bare).ok()?.to_bare();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (handle, _) = self
            .sessions
            .get_or_insert(&bare, usize::MAX, || {
                super::actor::spawn_recovered(self.deps.clone(), id, bare.clone(), record)
            })
            .ok()?;
        Some(handle)
    }

    /// Revokes every token and ticket of `bare`.
    pub fn revoke(&self, bare: &Jid) {
        self.tokens.revoke(bare);
    }

    /// A new browser token for `bare` and when it expires if unused.
    pub async fn issue_token(&self, bare: &Jid) -> (String, SystemTime) {
        self.tokens.issue_token(bare).await
    }

    /// The user a token belongs to; using it extends its life.
    pub fn check_token(&self, token: &str) -> Option<Jid> {
        self.tokens.check_token(token)
    }

    /// A one-time ticket for `bare`.
    pub async fn issue_ticket(&self, bare: &Jid) -> String {
        self.tokens.issue_ticket(bare).await
    }

    /// Redeems a ticket (at most once).
    pub fn redeem_ticket(&self, ticket: &str) -> Option<Jid> {
        self.tokens.redeem_ticket(ticket)
    }
}
