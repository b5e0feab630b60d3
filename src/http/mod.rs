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
}

impl AppState {
    /// State for a daemon with `config` and `registry`.
    pub fn new(config: Config, registry: Arc<Registry>) -> AppState {
        let upgrades = client::UpgradeLimiter::new(
            config.limits.upgrade_rate_per_client,
            config.limits.upgrade_rate,
        );
        let node_id = config.node_id();
        AppState(Arc::new(Shared {
            config,
            registry,
            stopping: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            pages: TaskTracker::new(),
            bosh_pages: Arc::default(),
            node_id,
            cluster: std::sync::OnceLock::new(),
            next_page: AtomicU64::new(1),
            upgrades,
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

    /// The limits a page's frames are read under (SPEC §5): the page defaults with the
    /// configured stanza size.
    fn page_limits(&self) -> crate::xmpp::Limits {
        crate::xmpp::Limits {
            max_bytes: self.config.limits.stanza_bytes,
            ..crate::xmpp::Limits::PAGE
        }
    }

    /// What a new page's task needs, whatever its transport (WebSocket or BOSH, SPEC §4/§4b).
    /// A BOSH page is gone after `ws_dead_peer_timeout` without a request (its `inactivity`), as
    /// a WebSocket page silent that long is.
    fn page_context(
        &self,
        cookie_user: Option<crate::xmpp::Jid>,
    ) -> crate::page::conn::PageContext {
        let limits = &self.config.limits;
        crate::page::conn::PageContext {
            registry: self.registry.clone(),
            domain: self.config.xmpp_domain.clone().unwrap_or_default(),
            limits: self.page_limits(),
            ping_interval: limits.ws_ping_interval,
            dead_peer_timeout: limits.ws_dead_peer_timeout,
            handshake_timeout: limits.handshake_timeout,
            send_rate: limits.page_send_rate,
            cookie_user,
            shutdown: self.shutdown.clone(),
            page: self.next_page_id(),
            metrics: self.registry.metrics.clone(),
        }
    }

    fn next_page_id(&self) -> u64 {
        self.next_page
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
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
