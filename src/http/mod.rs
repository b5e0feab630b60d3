//! HTTP serving: the router ([`app`]), the handoff API for the web app's server ([`api`]), the
//! WebSocket endpoint for pages ([`ws`]), the BOSH endpoint for pages ([`bosh`]), metrics and the
//! status page ([`status`]), the JSON error type ([`error`]), accepting connections ([`listen`])
//! and per-client limits ([`client`]).

pub mod api;
pub mod bosh;
pub mod client;
pub mod cluster;
pub mod error;
pub mod listen;
pub mod status;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::session::Registry;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
pub struct Shared {
    /// The daemon's configuration.
    pub config: Config,
    /// Sessions and credentials.
    pub registry: Arc<Registry>,
    /// Cancelled when the daemon starts stopping: no new pages are accepted.
    pub stopping: CancellationToken,
    /// Cancelled once the sessions are stopped: pages still open close with 1012.
    pub shutdown: CancellationToken,
    /// Every page task, so a stop can wait for them (axum does not track upgraded sockets).
    pub pages: TaskTracker,
    /// The virtual BOSH sessions of pages that speak BOSH (SPEC §4b).
    pub bosh_pages: Arc<crate::page::bosh::BoshPages>,
    /// This node's name (`node` of a session in the API; SPEC §12).
    pub node_id: String,
    /// This node's part in a cluster, when the store is shared (SPEC §12).
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    next_page: AtomicU64,
    upgrades: client::UpgradeLimiter,
    page_shared: Arc<crate::page::conn::PageShared>,
}

impl AppState {
    /// State for a daemon with `config` and `registry`.
    pub fn new(config: Config, registry: Arc<Registry>) -> AppState {
        let upgrades = client::UpgradeLimiter::new(
            config.limits.upgrade_rate_per_client,
            config.limits.upgrade_rate,
        );
        let node_id = config.node_id();
        let shutdown = CancellationToken::new();
        let page_shared = Arc::new(page_shared(&config, &registry, &shutdown));
        AppState(Arc::new(Shared {
            config,
            registry,
            stopping: CancellationToken::new(),
            shutdown,
            pages: TaskTracker::new(),
            bosh_pages: Arc::default(),
            node_id,
            cluster: std::sync::OnceLock::new(),
            next_page: AtomicU64::new(1),
            upgrades,
            page_shared,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Shared {
    /// This node's part in a cluster, if the store is shared.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// Makes this daemon a cluster node (once; at build time).
    pub fn set_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Takes one upgrade for `client` (its own bucket, then the daemon's).
    fn allow_upgrade(&self, client: &client::ClientKey) -> bool {
        self.upgrades.allow(client)
    }

    /// The limits a page's frames are read under (SPEC §5).
    fn page_limits(&self) -> crate::xmpp::Limits {
        self.page_shared.limits
    }

    /// What a new page's task needs, whatever its transport (WebSocket or BOSH, SPEC §4/§4b).
    fn page_context(
        &self,
        cookie_user: Option<crate::xmpp::Jid>,
    ) -> crate::page::conn::PageContext {
        crate::page::conn::PageContext {
            shared: self.page_shared.clone(),
            cookie_user,
            page: self.next_page_id(),
        }
    }

    fn next_page_id(&self) -> u64 {
        self.next_page
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// What every page's task shares, whatever its transport (WebSocket or BOSH, SPEC §4/§4b): the
/// page limits are the defaults with the configured stanza size (SPEC §5). A BOSH page is gone
/// after `ws_dead_peer_timeout` without a request (its `inactivity`), as a WebSocket page silent
/// that long is.
fn page_shared(
    config: &Config,
    registry: &Arc<Registry>,
    shutdown: &CancellationToken,
) -> crate::page::conn::PageShared {
    let limits = &config.limits;
    crate::page::conn::PageShared {
        registry: registry.clone(),
        domain: config.xmpp_domain.clone().unwrap_or_default(),
        limits: crate::xmpp::Limits {
            max_bytes: limits.stanza_bytes,
            ..crate::xmpp::Limits::PAGE
        },
        ping_interval: limits.ws_ping_interval,
        dead_peer_timeout: limits.ws_dead_peer_timeout,
        handshake_timeout: limits.handshake_timeout,
        send_rate: limits.page_send_rate,
        shutdown: shutdown.clone(),
        metrics: registry.metrics.clone(),
    }
}

/// The daemon's routes.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route(
            "/http-bind",
            axum::routing::post(bosh::request).options(bosh::preflight),
        )
        .route("/handoff", get(api::handoff))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/cluster/v1/pages/{jid}", get(cluster::page_link))
        .route("/metrics", get(status::metrics))
        .route("/status", get(status::status))
        .merge(api::routes(state.clone()))
        .with_state(state)
}
