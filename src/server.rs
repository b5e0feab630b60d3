//! `boshmux serve`: builds the daemon from its configuration, serves until told to stop, then
//! stops in bounded time with every page task accounted for.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::bosh::{BoshClient, BoshConfig, BoshError};
use crate::cluster::Cluster;
use crate::config::{Config, ConfigError};
use crate::http::{self, AppState};
use crate::session::Registry;
use crate::session::deps::Settings;
use crate::session::relogin::ReloginClient;
use crate::store::{Store, StoreError};

/// Longest a stop waits for pages to close and for upstream sessions to end, each.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Why the daemon could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The configuration lacks what `serve` needs.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The upstream client could not be set up.
    #[error(transparent)]
    Upstream(#[from] BoshError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The web app's re-login client could not be set up.
    #[error("{0}")]
    Relogin(String),
}

/// The shared state of a daemon with `config`, its store opened from `config.store` (none: a
/// store that keeps nothing).
pub fn build(config: Config) -> Result<AppState, SetupError> {
    let store = match &config.store {
        Some(location) => Store::open(location)?,
        None => Store::none(),
    };
    build_with_store(config, store)
}

/// Like [`build`], with the store given (tests share a [`Store::memory`] between daemons).
pub fn build_with_store(config: Config, store: Store) -> Result<AppState, SetupError> {
    config.require_for_serve()?;
    let mut bosh = BoshConfig::new(config.bosh_url.clone().unwrap_or_default());
    bosh.wait = config.bosh_wait;
    bosh.timeouts.login = config.login_timeout;
    // Server-built results may exceed what a client may send: twice the page stanza limit.
    bosh.read_limits.stanza_bytes = config.limits.stanza_bytes.saturating_mul(2);
    let client = BoshClient::new(bosh)?;
    let limits = &config.limits;
    let settings = Settings {
        grace: config.grace,
        token_ttl: config.token_ttl,
        ticket_ttl: Duration::from_secs(60),
        resource: config.resource.clone(),
        max_users: limits.users,
        pages_per_user: limits.pages_per_user,
        page_queue_bytes: limits.page_queue_bytes,
        offline_buffer: limits.offline_buffer,
        iq_timeout: limits.iq_timeout,
        relogin_attempts: 5,
        relogin_backoff: Duration::from_secs(1),
        relogin: config
            .relogin_url
            .as_deref()
            .map(|url| ReloginClient::new(url, config.api_key.as_deref().unwrap_or_default()))
            .transpose()
            .map_err(SetupError::Relogin)?,
    };
    let shared = store.shared().cloned();
    let registry = Registry::new(settings, client, store);
    let state = AppState::new(config, registry.clone());
    // A shared store makes this daemon a cluster node (SPEC §12), even a cluster of one.
    if let Some(redis) = shared {
        let config = &state.config;
        let cluster = Cluster::new(
            state.node_id.clone(),
            config.advertise_url(),
            config.lease,
            redis,
            registry.clone(),
            config.api_key.clone().unwrap_or_default(),
            config.limits.page_queue_bytes,
        );
        registry.set_elsewhere(cluster.clone());
        state
            .bosh_pages
            .set_sid_prefix(crate::cluster::bosh_sid_prefix(&state.node_id));
        state.set_cluster(cluster);
    }
    Ok(state)
}

/// Serves on `listener` until `stop` completes, then ends every session (see `stop_sessions`
/// for the close codes pages get).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = http::app(state.clone());
    run_app(listener, state, app, stop).await
}

/// Like [`run`], with the router given (the demo adds its pages to [`http::app`]).
pub async fn run_app(
    listener: TcpListener,
    state: AppState,
    app: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Every stored session is taken over before the first request is served (SPEC §8): a page
    // reconnecting at once finds its session, and a token issued before a crash works. In a
    // cluster, only what this node owned and what dead nodes left (SPEC §12).
    if let Some(cluster) = state.cluster().cloned() {
        let adopted = cluster.join().await.map_err(std::io::Error::other)?;
        tracing::info!(
            node = %cluster.node_id(),
            member = %cluster.member(),
            adopted,
            "joined the cluster"
        );
        tokio::spawn(cluster.run(state.shutdown.clone()));
    } else {
        let snapshot = state
            .registry
            .store
            .load()
            .await
            .map_err(std::io::Error::other)?;
        let stored = snapshot.sessions.len();
        let recovered = state.registry.recover(snapshot);
        if stored > 0 {
            tracing::info!(recovered, stored, "sessions taken over from the store");
        }
    }
    let st = state.clone();
    let limits = state.config.limits.clone();
    http::listen::serve(
        listener,
        app,
        &limits,
        &state.config.trusted_proxies,
        async move {
            stop.await;
            st.stopping.cancel();
            stop_sessions(&st).await;
            st.shutdown.cancel();
        },
    )
    .await;
    state.pages.close();
    if tokio::time::timeout(STOP_LIMIT, state.pages.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.pages.len(),
            "pages still open after the stop limit"
        );
    }
    Ok(())
}

/// Ends every session (SPEC §8): with a durable store each is suspended — alive upstream, its
/// record up to date for the next start — and its pages close with 1012 (reconnect); without one
/// each is terminated upstream and its pages close with 4004 (nothing to reconnect to).
async fn stop_sessions(state: &AppState) {
    let sessions = state.registry.all();
    let count = sessions.len();
    if !state.registry.store.durable() {
        let stops = sessions.iter().map(|s| s.stop());
        if tokio::time::timeout(STOP_LIMIT, futures_util::future::join_all(stops))
            .await
            .is_err()
        {
            tracing::warn!("upstream sessions still ending after the stop limit");
        }
        tracing::info!(sessions = count, "stopped; upstream sessions terminated");
        return;
    }
    // A cluster node hands its sessions to its peers (SPEC §12): it adopts nothing more, keeps
    // each session's record up to date as for a restart, then ends its lease so that the
    // peers adopt them at their next beat instead of after the lease.
    if let Some(cluster) = state.cluster() {
        cluster.stop_adopting();
    }
    // Each session has the stop limit to itself: one that is still logging in (and cannot be
    // suspended) must not hold the others up.
    let suspends = sessions
        .iter()
        .map(|s| tokio::time::timeout(STOP_LIMIT, s.suspend()));
    let kept = futures_util::future::join_all(suspends)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(true)))
        .count();
    if let Some(cluster) = state.cluster() {
        cluster.leave().await;
        tracing::info!(
            sessions = count,
            kept,
            "stopped; sessions handed to the other nodes of the cluster"
        );
        return;
    }
    tracing::info!(
        sessions = count,
        kept,
        "stopped; sessions kept in the store for the next start"
    );
}
