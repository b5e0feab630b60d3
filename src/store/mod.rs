//! The session store of SPEC §8: what a session needs to outlive the process that drives it,
//! written as it changes. One interface ([`Store`], and [`SessionStore`] scoped to one session)
//! over interchangeable backends: [`memory`] (tests; one process), [`embedded`] (a directory; the
//! default), and [`redis`] (one Redis node for now; the cluster of SPEC §12 follows).
//!
//! What a record holds, per session (keyed by canonical bare JID):
//! - `meta`: opaque bytes the session layer writes (full JID, BOSH parameters with the sid,
//!   whether it was attached, creation time) — the store never looks inside;
//! - the write-ahead log: `(rid, exact request bytes)` for every upstream request, written
//!   *before* it leaves, and `handed_on`, the highest rid whose response the session has taken
//!   in (records at or below it are dropped);
//! - `caches`: opaque bytes (the multiplexing rules' caches of SPEC §6, the grace buffer).
//!
//! And, outside sessions, browser credentials: token and ticket hashes (never a token).
//!
//! Every write names the session's `epoch` (a fencing token, SPEC §12): a backend refuses a
//! write whose epoch is not the session's current one with [`StoreError::Fenced`], and the
//! writer must stop driving that session at once. Single-process backends change the epoch only
//! when a session is created or taken over at start.
//!
//! The store never holds a password, a token or a ticket in clear.

pub mod embedded;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

/// A boxed future of a store call.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The write named an epoch that is no longer the session's (another owner took it over, or
    /// the session was removed): the caller must stop driving the session, sending and handing
    /// on nothing more.
    #[error("session taken over by another owner (epoch {current:?})")]
    Fenced {
        /// The session's epoch now; `None` when the session is gone from the store.
        current: Option<u64>,
    },
    /// The store could not be reached or written (I/O, disk full, network). The session goes on
    /// without the durability of this write.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store could not be opened (bad path, locked by another process, wrong format).
    #[error("store {location}: {message}")]
    Open {
        /// The directory or URL.
        location: String,
        /// What went wrong.
        message: String,
    },
}

/// What kind of browser credential a [`Credential`] is (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// A `boshmux_token`: sliding idle expiry, dies with its session.
    Token,
    /// A one-time ticket for `/handoff`.
    Ticket,
}

/// A stored credential: the SHA-256 of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Token or ticket.
    pub kind: CredentialKind,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// The canonical bare JID it leads to.
    pub bare: String,
    /// When it expires, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// One stored session, as read at start to take it over.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Canonical bare JID (the key).
    pub bare: String,
    /// The epoch of the owner that wrote it last.
    pub epoch: u64,
    /// The session layer's description of the session (opaque here).
    pub meta: Bytes,
    /// The session layer's caches (opaque here); empty when never written.
    pub caches: Bytes,
    /// The highest rid whose response was handed on; 0 when none yet.
    pub handed_on: u64,
    /// Write-ahead records above `handed_on`, ascending by rid: sent (or about to be) and whose
    /// responses were not handed on.
    pub requests: Vec<(u64, Bytes)>,
}

impl std::fmt::Debug for SessionRecord {
    // The meta and the requests carry the sid: sizes and rids only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rids: Vec<u64> = self.requests.iter().map(|(r, _)| *r).collect();
        f.debug_struct("SessionRecord")
            .field("bare", &self.bare)
            .field("epoch", &self.epoch)
            .field("meta_bytes", &self.meta.len())
            .field("caches_bytes", &self.caches.len())
            .field("handed_on", &self.handed_on)
            .field("request_rids", &rids)
            .finish()
    }
}

/// Everything in the store, read at start.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every stored session.
    pub sessions: Vec<SessionRecord>,
    /// Every stored credential not yet expired.
    pub credentials: Vec<Credential>,
}

/// One change to a session's record, applied atomically and only if the epoch is current.
#[derive(Clone)]
pub enum Write {
    /// The write-ahead record of request `rid` (exact bytes, which carry the sid).
    Request {
        /// The request's rid.
        rid: u64,
        /// The body as it is (or will be) posted.
        bytes: Bytes,
    },
    /// The response to `rid` (and every lower rid) has been handed on; records up to `rid` are
    /// dropped. With `caches`, the caches are replaced in the same write, so that what the
    /// response changed and the mark never disagree.
    HandedOn {
        /// The highest rid handed on.
        rid: u64,
        /// New caches, when they changed.
        caches: Option<Bytes>,
    },
    /// Replaces the caches.
    Caches(Bytes),
    /// Replaces the meta. With `restart_at`, the upstream session is a new one (a re-login): the
    /// write-ahead log is emptied and `handed_on` set to `restart_at` (the new session's first
    /// rid minus one).
    Meta {
        /// The new meta.
        meta: Bytes,
        /// Set when the sid changed.
        restart_at: Option<u64>,
    },
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::Request { rid, bytes } => write!(f, "Request(rid {rid}, {} bytes)", bytes.len()),
            Write::HandedOn { rid, caches } => write!(
                f,
                "HandedOn(rid {rid}, caches {:?})",
                caches.as_ref().map(Bytes::len)
            ),
            Write::Caches(c) => write!(f, "Caches({} bytes)", c.len()),
            Write::Meta { meta, restart_at } => {
                write!(f, "Meta({} bytes, restart_at {restart_at:?})", meta.len())
            }
        }
    }
}

/// A store backend. Every call is asynchronous and may fail; none blocks the caller's thread.
pub trait Backend: Send + Sync + 'static {
    /// Everything stored (for taking sessions over at start).
    fn load(&self) -> StoreFuture<Snapshot>;
    /// Creates the record of `bare` (replacing any) with `meta`, empty caches, `handed_on` =
    /// `handed_on` and no requests; returns its epoch, one above any epoch `bare` had.
    fn create(&self, bare: &str, meta: Bytes, handed_on: u64) -> StoreFuture<u64>;
    /// Takes over the stored session `bare` last written at `epoch`: returns the new epoch, after
    /// which writes at `epoch` are refused. [`StoreError::Fenced`] if `epoch` is not current.
    fn take_over(&self, bare: &str, epoch: u64) -> StoreFuture<u64>;
    /// Applies `write` to `bare`'s record if `epoch` is current.
    fn write(&self, bare: &str, epoch: u64, write: Write) -> StoreFuture<()>;
    /// Removes `bare`'s record and its credentials, if `epoch` is current.
    fn remove(&self, bare: &str, epoch: u64) -> StoreFuture<()>;
    /// Stores a credential (replacing one with the same hash).
    fn put_credential(&self, credential: Credential) -> StoreFuture<()>;
    /// Removes a credential.
    fn remove_credential(&self, kind: CredentialKind, hash: [u8; 32]) -> StoreFuture<()>;
    /// The stored credential with `hash`, if it exists and has not expired: how a node finds a
    /// token or ticket another node issued (SPEC §12). With `take`, it is removed in the same
    /// step (a ticket is redeemed once, whichever node redeems it). Stores of one process
    /// answer `None`: their credentials are all in memory already.
    fn find_credential(
        &self,
        kind: CredentialKind,
        hash: [u8; 32],
        take: bool,
    ) -> StoreFuture<Option<Credential>> {
        let _ = (kind, hash, take);
        Box::pin(async { Ok(None) })
    }
    /// Writes `bare`'s record back at `epoch` (meta, caches, `handed_on`, no requests) if the
    /// store has none: what an owner does when the store lost its data (Redis restarted
    /// empty; SPEC §12) so that its sessions can fail over again. A record that exists is left
    /// alone. Stores of one process do nothing.
    fn restore(
        &self,
        bare: &str,
        epoch: u64,
        meta: Bytes,
        caches: Bytes,
        handed_on: u64,
    ) -> StoreFuture<()> {
        let _ = (bare, epoch, meta, caches, handed_on);
        Box::pin(async { Ok(()) })
    }
    /// Checks, without writing, that `epoch` is still `bare`'s ([`StoreError::Fenced`] if not):
    /// what a request re-sent without a new write-ahead record asks first (SPEC §12). Stores
    /// of one process, where nothing else changes epochs, answer `Ok` without looking.
    fn confirm(&self, bare: &str, epoch: u64) -> StoreFuture<()> {
        let _ = (bare, epoch);
        Box::pin(async { Ok(()) })
    }
    /// Whether what is written outlives the daemon that wrote it, so that a stop leaves sessions
    /// alive for whoever reads the store next (false only for the null store).
    fn durable(&self) -> bool;
}

/// A store: a cheap handle on a shared backend.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// The same backend when it is Redis: what a cluster's nodes share (SPEC §12).
    shared: Option<Arc<redis::RedisStore>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("durable", &self.backend.durable())
            .finish()
    }
}

impl Store {
    /// A store over `backend`.
    pub fn new(backend: impl Backend) -> Store {
        Store {
            backend: Arc::new(backend),
            shared: None,
        }
    }

    /// A store on Redis, which a cluster's nodes can share ([`Store::shared`]).
    pub fn redis(backend: redis::RedisStore) -> Store {
        let shared = Arc::new(backend);
        Store {
            backend: shared.clone(),
            shared: Some(shared),
        }
    }

    /// The Redis backend, when the store is one several nodes can share (SPEC §12).
    pub fn shared(&self) -> Option<&Arc<redis::RedisStore>> {
        self.shared.as_ref()
    }

    /// Opens the store at `location` (the `store` setting, SPEC §8): a `redis://` or `rediss://`
    /// URL is the Redis store ([`redis::RedisStore::open`]: the URL is parsed here, the
    /// connection made by the first call); anything else
    /// is a directory, the embedded store ([`embedded::EmbeddedStore::open`]: created if missing,
    /// locked against a second process). Blocking file I/O: call it at start, before serving.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming `location` (a URL without its password): a Redis URL that
    /// cannot be read, or a directory that cannot be created, opened or locked, or that holds a
    /// store of an unknown schema version.
    pub fn open(location: &str) -> Result<Store, StoreError> {
        let scheme = location
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase());
        if matches!(scheme.as_deref(), Some("redis" | "rediss")) {
            return Ok(Store::redis(redis::RedisStore::open(location)?));
        }
        Ok(Store::new(embedded::EmbeddedStore::open(
            std::path::Path::new(location),
        )?))
    }

    /// The store of a daemon without `store`: keeps nothing, refuses nothing.
    pub fn none() -> Store {
        Store::new(Null)
    }

    /// An in-memory store (tests): outlives a daemon within one process, not the process.
    pub fn memory() -> Store {
        Store::new(memory::MemoryStore::default())
    }

    /// Whether sessions outlive the daemon with this store (see [`Backend::durable`]).
    pub fn durable(&self) -> bool {
        self.backend.durable()
    }

    /// Everything stored.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        self.backend.load().await
    }

    /// Creates `bare`'s record for a new upstream session whose first rid is `handed_on + 1`.
    pub async fn create(
        &self,
        bare: &str,
        meta: Bytes,
        handed_on: u64,
    ) -> Result<SessionStore, StoreError> {
        let epoch = self.backend.create(bare, meta, handed_on).await?;
        Ok(self.session(bare, epoch))
    }

    /// Takes over the stored session `record` (see [`Backend::take_over`]).
    pub async fn take_over(&self, record: &SessionRecord) -> Result<SessionStore, StoreError> {
        let epoch = self.backend.take_over(&record.bare, record.epoch).await?;
        Ok(self.session(&record.bare, epoch))
    }

    /// A handle on `bare`'s record at `epoch`.
    pub fn session(&self, bare: &str, epoch: u64) -> SessionStore {
        SessionStore {
            store: self.clone(),
            bare: Arc::from(bare),
            epoch,
        }
    }

    /// Stores a credential.
    pub async fn put_credential(&self, credential: Credential) -> Result<(), StoreError> {
        self.backend.put_credential(credential).await
    }

    /// The credential with `hash` as another node stored it ([`Backend::find_credential`]).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn find_credential(
        &self,
        kind: CredentialKind,
        hash: [u8; 32],
        take: bool,
    ) -> Result<Option<Credential>, StoreError> {
        self.backend.find_credential(kind, hash, take).await
    }

    /// Removes a credential.
    pub async fn remove_credential(
        &self,
        kind: CredentialKind,
        hash: [u8; 32],
    ) -> Result<(), StoreError> {
        self.backend.remove_credential(kind, hash).await
    }
}

/// One session's record at the epoch its owner holds: what the scheduler and the session actor
/// write through. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    store: Store,
    bare: Arc<str>,
    epoch: u64,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("bare", &self.bare)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl SessionStore {
    /// A handle that keeps nothing (a daemon without `store`, or a unit test).
    pub fn none() -> SessionStore {
        Store::none().session("", 0)
    }

    /// The epoch this handle writes at.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether writes outlive the daemon (see [`Backend::durable`]).
    pub fn durable(&self) -> bool {
        self.store.durable()
    }

    /// Applies `write` (see [`Write`]).
    pub async fn write(&self, write: Write) -> Result<(), StoreError> {
        self.store
            .backend
            .write(&self.bare, self.epoch, write)
            .await
    }

    /// The write-ahead record of request `rid`: call before posting it.
    pub async fn request(&self, rid: u64, bytes: Bytes) -> Result<(), StoreError> {
        self.write(Write::Request { rid, bytes }).await
    }

    /// Removes the record and the session's credentials (logout, session over).
    pub async fn remove(&self) -> Result<(), StoreError> {
        self.store.backend.remove(&self.bare, self.epoch).await
    }

    /// Writes the record back if the store lost it ([`Backend::restore`]).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn restore(
        &self,
        meta: Bytes,
        caches: Bytes,
        handed_on: u64,
    ) -> Result<(), StoreError> {
        self.store
            .backend
            .restore(&self.bare, self.epoch, meta, caches, handed_on)
            .await
    }

    /// Checks that this handle's epoch is still the session's ([`Backend::confirm`]).
    ///
    /// # Errors
    /// [`StoreError::Fenced`]: another owner took the session over; [`StoreError::Unavailable`].
    pub async fn confirm(&self) -> Result<(), StoreError> {
        self.store.backend.confirm(&self.bare, self.epoch).await
    }
}

/// The store of a daemon without `store`.
struct Null;

impl Backend for Null {
    fn load(&self) -> StoreFuture<Snapshot> {
        Box::pin(async { Ok(Snapshot::default()) })
    }
    fn create(&self, _: &str, _: Bytes, _: u64) -> StoreFuture<u64> {
        Box::pin(async { Ok(1) })
    }
    fn take_over(&self, _: &str, epoch: u64) -> StoreFuture<u64> {
        Box::pin(async move { Ok(epoch + 1) })
    }
    fn write(&self, _: &str, _: u64, _: Write) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn remove(&self, _: &str, _: u64) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn put_credential(&self, _: Credential) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn remove_credential(&self, _: CredentialKind, _: [u8; 32]) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn durable(&self) -> bool {
        false
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The rules every backend follows, as one test each backend runs on an empty store.
#[cfg(test)]
pub(crate) mod conformance {
    use bytes::Bytes;

    use super::{Credential, CredentialKind, Store, StoreError, Write};

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    /// Runs every rule against `store`, which must be empty.
    pub(crate) async fn run(store: &Store) {
        assert!(store.load().await.unwrap().sessions.is_empty());

        // Create, then the write-ahead log: requests above handed_on, marks drop older ones.
        let s = store.create("a@x", b("meta1"), 100).await.unwrap();
        s.request(101, b("r101")).await.unwrap();
        s.request(102, b("r102")).await.unwrap();
        s.write(Write::HandedOn {
            rid: 101,
            caches: Some(b("c1")),
        })
        .await
        .unwrap();
        s.request(103, b("r103")).await.unwrap();
        s.request(100, b("stale")).await.unwrap(); // at or below the mark: not kept
        let snap = store.load().await.unwrap();
        let r = &snap.sessions[0];
        assert_eq!(r.bare, "a@x");
        assert_eq!(r.epoch, s.epoch());
        assert_eq!(r.meta, b("meta1"));
        assert_eq!(r.caches, b("c1"));
        assert_eq!(r.handed_on, 101);
        assert_eq!(r.requests, vec![(102, b("r102")), (103, b("r103"))]);

        // A mark without caches keeps them; Caches replaces them.
        s.write(Write::HandedOn {
            rid: 102,
            caches: None,
        })
        .await
        .unwrap();
        s.write(Write::Caches(b("c2"))).await.unwrap();
        let r = &store.load().await.unwrap().sessions[0];
        assert_eq!((r.handed_on, r.caches.clone()), (102, b("c2")));
        assert_eq!(r.requests, vec![(103, b("r103"))]);

        // A re-login: new meta, the log emptied, a new base.
        s.write(Write::Meta {
            meta: b("meta2"),
            restart_at: Some(500),
        })
        .await
        .unwrap();
        let r = store.load().await.unwrap().sessions[0].clone();
        assert_eq!((r.meta.clone(), r.handed_on), (b("meta2"), 500));
        assert!(r.requests.is_empty());

        // Taking over fences the old epoch: every write at it is refused, nothing changes.
        let t = store.take_over(&r).await.unwrap();
        assert!(t.epoch() > s.epoch());
        let fenced = s.request(501, b("late")).await.unwrap_err();
        assert_eq!(
            fenced,
            StoreError::Fenced {
                current: Some(t.epoch())
            }
        );
        assert!(matches!(s.remove().await, Err(StoreError::Fenced { .. })));
        assert!(matches!(
            store.take_over(&r).await,
            Err(StoreError::Fenced { .. })
        ));
        t.request(501, b("r501")).await.unwrap();
        let r = &store.load().await.unwrap().sessions[0];
        assert_eq!(r.requests, vec![(501, b("r501"))]);

        // Credentials: stored hashed, expired ones not loaded, removed with the session.
        let now = super::unix_now();
        let cred = |kind, n: u8, bare: &str, expires_at| Credential {
            kind,
            hash: [n; 32],
            bare: bare.into(),
            expires_at,
        };
        store
            .put_credential(cred(CredentialKind::Token, 1, "a@x", now + 600))
            .await
            .unwrap();
        store
            .put_credential(cred(CredentialKind::Ticket, 2, "a@x", now + 60))
            .await
            .unwrap();
        store
            .put_credential(cred(CredentialKind::Token, 3, "a@x", now.saturating_sub(1)))
            .await
            .unwrap();
        store
            .put_credential(cred(CredentialKind::Token, 4, "b@x", now + 600))
            .await
            .unwrap();
        let mut creds = store.load().await.unwrap().credentials;
        creds.sort_by_key(|c| c.hash);
        assert_eq!(
            creds.iter().map(|c| c.hash[0]).collect::<Vec<_>>(),
            [1, 2, 4]
        );
        store
            .remove_credential(CredentialKind::Ticket, [2; 32])
            .await
            .unwrap();
        t.remove().await.unwrap();
        let snap = store.load().await.unwrap();
        assert!(snap.sessions.is_empty());
        assert_eq!(
            snap.credentials
                .iter()
                .map(|c| c.hash[0])
                .collect::<Vec<_>>(),
            [4],
            "a removed session's credentials go with it"
        );
        assert!(matches!(
            t.request(502, b("x")).await,
            Err(StoreError::Fenced { current: None })
        ));

        // A new record for a JID seen before gets a higher epoch than any it had.
        let again = store.create("a@x", b("meta3"), 0).await.unwrap();
        assert!(again.epoch() > t.epoch());
    }
}
