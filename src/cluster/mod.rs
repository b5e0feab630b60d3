//! The cluster of SPEC §12: several daemons on one Redis, each driving the sessions it owns.
//!
//! A node is a *member* of the cluster while its lease key in Redis lives; it renews it every
//! quarter of `lease`. Each session's record names its owner member and carries an epoch that
//! every write is conditional on (the store's fencing). This module runs the node's side:
//! - [`Cluster::run`]: the heartbeat, and the adoption of sessions whose owner's lease has
//!   expired (or that a former incarnation of this node owned);
//! - [`Cluster::find`] ([`Elsewhere`] for the registry): where a user's session is driven, and a
//!   relayed handle ([`link`]) for a page whose session another node owns;
//! - [`Cluster::locate`], used by the API to send a request to the owner ([`crate::http::cluster`]).
//!
//! A node that finds its lease gone (it was frozen, or cut off from Redis, for longer than the
//! lease) stops driving every session at once — pages are told to reconnect (1012), upstream is
//! left as it is for the adopter — and joins again as a new member. A node that cannot reach
//! Redis at all keeps driving what it drives (SPEC §12: losing Redis stops hand-offs and
//! failover, not sessions).

pub mod link;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::session::registry::Elsewhere;
use crate::session::{Readiness, Registry, SessionHandle};
use crate::store::StoreError;
use crate::store::redis::{Located, Member, RedisStore};
use crate::xmpp::Jid;

/// Orphaned sessions adopted per heartbeat, at most (the rest follow on the next ones, so that
/// one node does not take a dead node's thousands in one go while its peers take none).
const ADOPT_BATCH: usize = 64;

/// One node of the cluster. Shared by the HTTP handlers and the registry.
pub struct Cluster {
    node_id: String,
    url: String,
    lease: Duration,
    redis: Arc<RedisStore>,
    member: Mutex<Arc<str>>,
    registry: Arc<Registry>,
    api_key: String,
    /// Bytes a relayed page may have queued before it is closed (the page limit).
    page_queue_bytes: usize,
    /// Whether the node is being stopped: nothing is adopted any more.
    stopping: CancellationToken,
    /// The live members as of the last beat: a relayed page whose owner left it goes to
    /// whoever adopts the session.
    live: tokio::sync::watch::Sender<Arc<Vec<String>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("url", &self.url)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A node named `node_id`, reached by its peers at `url`, on `redis`, driving the sessions
    /// of `registry`. Nothing happens until [`Cluster::join`].
    pub fn new(
        node_id: String,
        url: String,
        lease: Duration,
        redis: Arc<RedisStore>,
        registry: Arc<Registry>,
        api_key: String,
        page_queue_bytes: usize,
    ) -> Arc<Cluster> {
        let member = new_member(&node_id);
        redis.set_member(&member);
        Arc::new(Cluster {
            node_id,
            url,
            lease,
            redis,
            member: Mutex::new(Arc::from(member)),
            registry,
            api_key,
            page_queue_bytes,
            stopping: CancellationToken::new(),
            live: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
        })
    }

    /// The daemon's counters.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.registry.metrics
    }

    /// This node's configured name.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This node's member id now (`{node_id}#{incarnation}`).
    pub fn member(&self) -> Arc<str> {
        self.member.lock().clone()
    }

    /// The secret nodes present to each other (the API key every node shares).
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// Registers this node, then adopts what it owned before a restart and what dead nodes
    /// left (SPEC §8, §12). Called once at start, before the first request is served.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`]: Redis cannot be reached (the daemon does not start).
    pub async fn join(&self) -> Result<usize, StoreError> {
        let member = self.member();
        self.redis
            .beat(&member, &self.url, self.lease, false)
            .await?;
        let mut adopted = 0;
        loop {
            let n = self.adopt_orphans(usize::MAX >> 1).await?;
            adopted += n;
            if n == 0 {
                return Ok(adopted);
            }
        }
    }

    /// The heartbeat and adoption loop, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let period = self.lease / 4;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_beat = Instant::now();
        let mut warned: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if self.stopping.is_cancelled() {
                return;
            }
            // A pause longer than the lease (SIGSTOP, a frozen VM) means others may have
            // adopted: renewing would find the key gone, and the sessions must go first.
            let member = self.member();
            let paused = last_beat.elapsed() > self.lease;
            let renewed = if paused {
                Ok(false)
            } else {
                self.redis.beat(&member, &self.url, self.lease, true).await
            };
            match renewed {
                Ok(true) => last_beat = Instant::now(),
                Ok(false) if paused => {
                    self.lost_lease().await;
                    last_beat = Instant::now();
                    continue;
                }
                Ok(false) => {
                    // Renewed less than a lease ago, and the key is gone: the store lost its
                    // data (Redis restarted empty). Nobody can have adopted anything: this
                    // node registers again and writes back what it drives (SPEC §12).
                    self.store_lost().await;
                    last_beat = Instant::now();
                }
                Err(e) => {
                    // Sessions carry on without Redis (SPEC §12); the log says so once a minute.
                    if warned.is_none_or(|w| w.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "cluster lease not renewed: Redis out of reach; sessions carry on, hand-offs and failover wait for it");
                        warned = Some(Instant::now());
                    }
                    last_beat = Instant::now();
                    continue;
                }
            }
            if let Ok(members) = self.redis.members().await {
                let mut ids: Vec<String> = members.into_iter().map(|m| m.id).collect();
                ids.sort_unstable();
                self.live.send_if_modified(|live| {
                    let changed = **live != ids;
                    if changed {
                        *live = Arc::new(ids);
                    }
                    changed
                });
            }
            if let Err(e) = self.adopt_orphans(ADOPT_BATCH).await {
                tracing::debug!(error = %e, "orphaned sessions not looked up");
            }
        }
    }

    /// The lease is gone: every session here may have a new owner already. Each is let go
    /// (pages reconnect, upstream untouched, records written only where still ours), then the
    /// node joins again as a new member; what it owned is adopted by whoever comes first.
    async fn lost_lease(&self) {
        let sessions = self.registry.all();
        self.registry
            .metrics
            .cluster_leases_lost
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            sessions = sessions.len(),
            "cluster lease lost (this node was paused or cut off longer than the lease); letting its sessions go"
        );
        let suspends = sessions.iter().map(SessionHandle::suspend);
        futures_util::future::join_all(suspends).await;
        let member = new_member(&self.node_id);
        self.redis.set_member(&member);
        *self.member.lock() = Arc::from(member.as_str());
        if let Err(e) = self.redis.beat(&member, &self.url, self.lease, false).await {
            tracing::warn!(error = %e, "cluster: not registered again yet");
        }
    }

    /// The store lost this node's lease while it was renewing it: register again, and have
    /// every session write its record back.
    async fn store_lost(&self) {
        let sessions = self.registry.all();
        self.registry
            .metrics
            .cluster_store_lost
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            sessions = sessions.len(),
            "the cluster store lost this node's lease (Redis restarted empty?); writing back the sessions it drives"
        );
        let member = self.member();
        if let Err(e) = self.redis.beat(&member, &self.url, self.lease, false).await {
            tracing::warn!(error = %e, "cluster: not registered again yet");
            return;
        }
        for s in sessions {
            s.resync();
        }
        let registry = &self.registry;
        registry
            .tokens
            .write_back(|bare| registry.get(bare).is_some())
            .await;
    }

    /// Adopts up to `limit` orphaned sessions; how many it started to take over.
    async fn adopt_orphans(&self, limit: usize) -> Result<usize, StoreError> {
        let member = self.member();
        let orphans = self.redis.orphans(&self.node_id, &member, limit).await?;
        let mut started = 0;
        for bare in orphans {
            let Ok(jid) = Jid::parse(&bare) else { continue };
            if self.registry.get(&jid).is_some() {
                continue;
            }
            if self.adopt(&bare).await?.is_some() {
                started += 1;
            }
        }
        Ok(started)
    }

    /// Starts taking over `bare`'s stored session here; the actor's handle. The take-over
    /// itself is conditional on the record's epoch: of two nodes adopting at once, one wins
    /// and the other's actor ends without touching anything.
    async fn adopt(&self, bare: &str) -> Result<Option<SessionHandle>, StoreError> {
        let Some(record) = self.redis.read(bare).await? else {
            return Ok(None);
        };
        tracing::info!(user = %bare, "adopting a session whose owner is gone");
        Ok(self.registry.adopt(record))
    }

    /// Where `bare`'s session is driven; with `claim`, and no session anywhere, this node
    /// claims the login of it (SPEC §12: one login per user across the cluster).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn locate(&self, bare: &Jid, claim: bool) -> Result<Located, StoreError> {
        let claim = claim.then_some(self.lease.max(Duration::from_secs(40)));
        self.redis
            .locate(&bare.to_string(), &self.member(), claim)
            .await
    }

    /// Drops this node's claim on `bare` (its login failed).
    pub async fn unclaim(&self, bare: &Jid) {
        let _ = self.redis.unclaim(&bare.to_string(), &self.member()).await;
    }

    /// Adopts `bare`'s orphaned session and waits until it is live here: `None` when another
    /// node won the race, or the record could not be resumed.
    pub async fn adopt_now(&self, bare: &Jid) -> Option<SessionHandle> {
        adopt_live(&self.redis, &self.registry, &bare.to_string()).await
    }

    /// The live members, for the cluster-wide session list and `/status`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.redis.members().await
    }

    /// Sessions owned per live node, by node id (for `/metrics` and `/status`).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn census(&self) -> Result<Vec<(String, usize)>, StoreError> {
        self.redis.census().await
    }

    /// The base URL of the live member of node `node_id`, if any.
    pub async fn url_of_node(&self, node_id: &str) -> Option<String> {
        let members = self.redis.members().await.ok()?;
        members
            .into_iter()
            .find(|m| m.node_id() == node_id)
            .map(|m| m.url)
    }

    /// The node id owning `bare`'s session, if it has a record.
    pub async fn owner_node(&self, bare: &Jid) -> Option<String> {
        let member = self.redis.owner(&bare.to_string()).await.ok()??;
        Some(crate::store::redis::node_of(&member).to_owned())
    }

    /// A graceful stop (SPEC §12): nothing more is adopted here, and once the sessions are
    /// suspended (by the caller) the lease ends, so that peers adopt them at their next beat.
    pub async fn leave(&self) {
        self.stopping.cancel();
        if let Err(e) = self.redis.release(&self.member()).await {
            tracing::warn!(error = %e, "cluster lease not released; peers adopt once it expires");
        }
    }

    /// Stops adopting (the first step of a graceful stop).
    pub fn stop_adopting(&self) {
        self.stopping.cancel();
    }
}

impl Elsewhere for Cluster {
    fn find(
        &self,
        bare: Jid,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<SessionHandle>> + Send>> {
        // The registry holds the cluster through an `Arc<dyn Elsewhere>`; what the future needs
        // is cloned out of `self` so that it borrows nothing.
        let redis = self.redis.clone();
        let member = self.member();
        let registry = self.registry.clone();
        let api_key = self.api_key.clone();
        let queue = self.page_queue_bytes;
        let adopting = !self.stopping.is_cancelled();
        let live = self.live.subscribe();
        Box::pin(async move {
            let bare_s = bare.to_string();
            for _ in 0..2 {
                match redis.locate(&bare_s, &member, None).await.ok()? {
                    Located::Remote(owner) => {
                        return Some(link::relayed(&registry, bare, owner, api_key, queue, live));
                    }
                    Located::Orphan | Located::Mine if adopting => {
                        if let Some(handle) = adopt_live(&redis, &registry, &bare_s).await {
                            return Some(handle);
                        }
                        // Another node adopted it first: look again, and relay to it.
                    }
                    _ => return None,
                }
            }
            None
        })
    }
}

/// Adopts `bare`'s stored session here and waits until it is live: `None` when there is no
/// record, or another node won the take-over, or it could not be resumed.
async fn adopt_live(redis: &RedisStore, registry: &Registry, bare: &str) -> Option<SessionHandle> {
    let record = redis.read(bare).await.ok()??;
    let handle = registry.adopt(record)?;
    matches!(handle.ready().await, Readiness::Ready(_)).then_some(handle)
}

/// What the sids of page-side BOSH sessions made on node `node_id` start with: the node's
/// name in hex between `n` and `-` (a sid stays a plain token).
pub fn bosh_sid_prefix(node_id: &str) -> String {
    let hex: String = node_id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("n{hex}-")
}

/// The node a page-side BOSH sid was made on, if it carries a [`bosh_sid_prefix`].
pub fn node_of_bosh_sid(sid: &str) -> Option<String> {
    let hex = sid.strip_prefix('n')?.split_once('-')?.0;
    if hex.len() % 2 != 0 || hex.is_empty() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A fresh member id for `node_id`.
fn new_member(node_id: &str) -> String {
    let mut raw = [0u8; 6];
    rand::fill(&mut raw);
    let tag: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!("{node_id}#{tag}")
}
