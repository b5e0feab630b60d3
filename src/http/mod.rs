//! HTTP serving: the router ([`app`]), the handoff API for the web app's server ([`api`]), the
//! WebSocket endpoint for pages ([`ws`]), the BOSH endpoint for pages ([`bosh`]), metrics and the status page ([`status`]), and the JSON
//! error type ([`error`]).

pub mod api;
pub mod bosh;
pub mod error;
pub mod status;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::routing::get;
use parking_lot::Mutex;
use tokio::time::Instant;
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
    next_page: AtomicU64,
    upgrades: Mutex<Bucket>,
}

impl AppState {
    /// State for a daemon with `config` and `registry`.
    pub fn new(config: Config, registry: Arc<Registry>) -> AppState {
        let rate = f64::from(config.limits.upgrade_rate);
        AppState(Arc::new(Shared {
            config,
            registry,
            stopping: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            pages: TaskTracker::new(),
            bosh_pages: Arc::default(),
            next_page: AtomicU64::new(1),
            upgrades: Mutex::new(Bucket {
                tokens: rate,
                per_sec: rate,
                at: Instant::now(),
            }),
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// A token bucket for WebSocket upgrades.
struct Bucket {
    tokens: f64,
    per_sec: f64,
    at: Instant,
}

impl Shared {
    /// Takes one upgrade from the bucket.
    fn allow_upgrade(&self) -> bool {
        let mut b = self.upgrades.lock();
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * b.per_sec).min(b.per_sec);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
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
        .route("/metrics", get(status::metrics))
        .route("/status", get(status::status))
        .merge(api::routes(state.clone()))
        .with_state(state)
}
