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

/// Where sessions this node does not drive are found: the cluster (SPEC §12) sets one.
pub trait Elsewhere: Send + Sync + 'static {
    /// A handle on `bare`'s session when another node drives it (a relay to that node), or
    /// when it had to be adopted here; `None` when the user has no session anywhere.
    fn find(
        &self,
        bare: Jid,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<SessionHandle>> + Send>>;
}

/// The daemon's sessions and credentials. Derefs to the [`Deps`] its actors share.
pub struct Registry {
    deps: Arc<Deps>,
    next_id: AtomicU64,
    elsewhere: std::sync::OnceLock<Arc<dyn Elsewhere>>,
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
            elsewhere: std::sync::OnceLock::new(),
        })
    }

    /// The live session of `bare`, if any.
    pub fn get(&self, bare: &Jid) -> Option<SessionHandle> {
        self.sessions.get(bare)
    }

    /// Sets where sessions of other nodes are found (once; later calls are ignored).
    pub fn set_elsewhere(&self, elsewhere: Arc<dyn Elsewhere>) {
        let _ = self.elsewhere.set(elsewhere);
    }

    /// The session of `bare` wherever it is driven: this node's, else one another node drives
    /// (through [`Elsewhere`]), else `None`.
    pub async fn find(&self, bare: &Jid) -> Option<SessionHandle> {
        if let Some(h) = self.get(bare) {
            return Some(h);
        }
        self.elsewhere.get()?.find(bare.clone()).await
    }

    /// A fresh id for a handle that is not an actor (a relayed page's).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
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

    /// Takes over one stored session (SPEC §8, §12: at start, or adopted from a dead node) by
    /// an actor that resumes it; the live one if this node drives `bare` already.
    pub fn recover_one(&self, record: SessionRecord) -> Option<SessionHandle> {
        self.take_over(record).map(|(handle, _)| handle)
    }

    /// Like [`Registry::recover_one`], for a session a dead or departed cluster node left
    /// (SPEC §12): counted in `boshmux_cluster_adoptions_total` when an actor starts for it.
    pub fn adopt(&self, record: SessionRecord) -> Option<SessionHandle> {
        let (handle, created) = self.take_over(record)?;
        if created {
            self.metrics
                .cluster_adoptions
                .fetch_add(1, Ordering::Relaxed);
        }
        Some(handle)
    }

    fn take_over(&self, record: SessionRecord) -> Option<(SessionHandle, bool)> {
        let bare = Jid::parse(&record.bare).ok()?.to_bare();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .get_or_insert(&bare, usize::MAX, || {
                super::actor::spawn_recovered(self.deps.clone(), id, bare.clone(), record)
            })
            .ok()
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

    /// Like [`Registry::check_token`], also for tokens another node issued (SPEC §12).
    pub async fn check_token_anywhere(&self, token: &str) -> Option<Jid> {
        self.tokens.check_token_anywhere(token).await
    }

    /// Like [`Registry::redeem_ticket`], also for tickets another node issued (SPEC §12).
    pub async fn redeem_ticket_anywhere(&self, ticket: &str) -> Option<Jid> {
        self.tokens.redeem_ticket_anywhere(ticket).await
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
