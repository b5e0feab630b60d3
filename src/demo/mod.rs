//! `boshmux demo`: the daemon in front of an embedded development XMPP server (the
//! [`fake_cm`](crate::fake_cm) with rosters, presence and an echo bot), plus a page at `/demo`
//! where a person picks a user and opens more tabs to see them share one session.
//!
//! The demo's own server side — picking a user, which a real web app does after its own login —
//! lives here too: it calls the registry as the handoff API would and sets the cookie.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::bosh::Credentials;
use crate::config::Config;
use crate::fake_cm::{FakeCm, FakeCmConfig};
use crate::http::{self, AppState};
use crate::xmpp::Jid;

/// The demo's XMPP domain.
pub const DOMAIN: &str = "demo.localhost";
/// Demo accounts: (localpart, password).
pub const USERS: [(&str, &str); 3] = [
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("carol", "carol-pw"),
];
/// The bot every demo user can talk to.
pub const BOT: &str = "echo";

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Binding or serving failed.
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon could not be built.
    #[error("demo: {0}")]
    Setup(#[from] crate::server::SetupError),
}

/// The development server's accounts: the demo users, the echo bot, and `accounts` load-test
/// accounts `user1` … `userN` (password `pw-userN`).
fn server_config(accounts: usize) -> FakeCmConfig {
    let mut users: std::collections::HashMap<String, String> = USERS
        .iter()
        .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
        .collect();
    users.extend((1..=accounts).map(|n| (format!("user{n}"), format!("pw-user{n}"))));
    FakeCmConfig {
        domain: DOMAIN.into(),
        users,
        contacts: USERS.iter().map(|(u, _)| (*u).to_owned()).collect(),
        echo_bot: Some(BOT.into()),
        ..FakeCmConfig::default()
    }
}

/// Runs only the development server (no daemon) on `listen` until `stop` completes: an
/// upstream for a `boshmux serve` in a process of its own, so that a load test with many users
/// does not put both ends of every upstream connection in one process's open-file limit
/// (`scripts/bench many`). Prints its BOSH URL and domain.
pub async fn run_upstream(
    listen: SocketAddr,
    accounts: usize,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let server =
        FakeCm::start_on(TcpListener::bind(listen).await?, server_config(accounts)).await?;
    println!(
        "boshmux demo upstream: BOSH at {} for the domain {DOMAIN}",
        server.url()
    );
    stop.await;
    drop(server);
    Ok(())
}

/// Runs the demo on `listen` until `stop` completes.
pub async fn run(
    listen: SocketAddr,
    accounts: usize,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let listener = TcpListener::bind(listen).await?;
    let demo = start_with(listener, accounts).await?;
    println!(
        "boshmux demo: open http://127.0.0.1:{port}/demo (then open it again in more tabs)\n\
         status page: http://127.0.0.1:{port}/status (any user name, password {key})",
        port = demo.addr.port(),
        key = demo.api_key
    );
    stop.await;
    demo.stop().await
}

/// A running demo.
pub struct Demo {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The generated api key (the status page and the handoff API take it).
    pub api_key: String,
    /// The development server's BOSH URL (for `boshmux load --direct`).
    pub bosh_url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _server: FakeCm,
}

impl Demo {
    /// Stops the demo and waits until it has.
    pub async fn stop(self) -> Result<(), DemoError> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(DemoError::Io(std::io::Error::other(e))),
        }
    }
}

/// Starts the demo on `listener`: the development server, the daemon and the demo page.
pub async fn start(listener: TcpListener) -> Result<Demo, DemoError> {
    start_with(listener, 0).await
}

/// Like [`start`], with `accounts` more accounts `user1` … `userN` (password `pw-userN`) that are
/// nobody's contacts: for load tests against the development server (`boshmux load`). With load
/// accounts, the limits on pages per user, page send rate and upgrade rate are lifted.
pub async fn start_with(listener: TcpListener, accounts: usize) -> Result<Demo, DemoError> {
    let server = FakeCm::start(server_config(accounts)).await?;
    let addr = listener.local_addr()?;
    let port = addr.port();
    let mut key = [0u8; 24];
    rand::fill(&mut key);
    let api_key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let config = Config {
        listen: addr,
        bosh_url: Some(server.url()),
        xmpp_domain: Some(DOMAIN.into()),
        api_key: Some(api_key.clone()),
        allowed_origins: vec![
            format!("http://127.0.0.1:{port}"),
            format!("http://localhost:{port}"),
        ],
        grace: Duration::from_secs(30),
        bosh_wait: 30,
        limits: if accounts == 0 {
            crate::config::Limits::default()
        } else {
            // Load-test accounts: lift the per-page and per-user limits a load generator hits.
            crate::config::Limits {
                pages_per_user: 4096,
                page_send_rate: 1_000_000,
                upgrade_rate: 1_000_000,
                // Every simulated page comes from the load generator's one address.
                upgrade_rate_per_client: 1_000_000,
                connections_per_address: 1_000_000,
                ..crate::config::Limits::default()
            }
        },
        ..Config::default()
    };
    let state = crate::server::build(config)?;
    let app = http::app(state.clone()).merge(routes().with_state(state.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(crate::server::run_app(listener, state, app, async {
        let _ = stopped.await;
    }));
    Ok(Demo {
        addr,
        bosh_url: server.url(),
        api_key,
        stop,
        task,
        _server: server,
    })
}

/// The demo's routes: the page, its assets, and its stand-in for a web app's login.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { redirect("/demo") }))
        .route("/demo", get(|| async { Html(include_str!("index.html")) }))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/demo/app.js",
            get(|| async { asset("text/javascript", include_str!("app.js")) }),
        )
        .route(
            "/demo/style.css",
            get(|| async { asset("text/css", include_str!("style.css")) }),
        )
        .route(
            "/client-js/boshmux.js",
            get(|| async {
                asset(
                    "text/javascript",
                    include_str!("../../client-js/boshmux.js"),
                )
            }),
        )
        .route(
            "/client-js/xml.js",
            get(|| async { asset("text/javascript", include_str!("../../client-js/xml.js")) }),
        )
        .route("/demo/whoami", get(whoami))
        .route("/demo/login", post(login))
        .route("/demo/logout", post(logout))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

fn cookie_user(st: &AppState, headers: &HeaderMap) -> Option<Jid> {
    let token = http::ws::cookie_token(headers)?;
    let user = st.registry.check_token(token)?;
    st.registry.get(&user).map(|_| user)
}

/// Who this browser is logged in as, for the page to choose between the picker and the chat.
async fn whoami(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let users: Vec<&str> = USERS.iter().map(|(u, _)| *u).collect();
    let body = match cookie_user(&st, &headers) {
        Some(user) => {
            serde_json::json!({"user": user.to_string(), "domain": DOMAIN, "users": users, "bot": BOT})
        }
        None => serde_json::json!({"user": null, "domain": DOMAIN, "users": users, "bot": BOT}),
    };
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// The form a user is picked with.
#[derive(serde::Deserialize)]
pub struct Pick {
    user: String,
}

/// What a web app's server does after its own login: hand the user off and set the cookie.
async fn login(State(st): State<AppState>, Form(pick): Form<Pick>) -> Response {
    let Some((user, password)) = USERS.iter().find(|(u, _)| *u == pick.user) else {
        return (StatusCode::BAD_REQUEST, "no such demo user").into_response();
    };
    let Ok(bare) = Jid::parse(&format!("{user}@{DOMAIN}")) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let creds = Credentials::Password {
        jid: bare.clone(),
        password: (*password).to_owned(),
    };
    if let Err(e) = http::api::hand_off(&st, &bare, creds).await {
        return e.into_response();
    }
    let (token, _) = st.registry.issue_token(&bare).await;
    with_cookie(redirect("/demo"), &token)
}

/// Logs the user out everywhere: every tab is closed with 4001.
async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(user) = cookie_user(&st, &headers)
        && let Some(session) = st.registry.get(&user)
    {
        session.logout().await;
    }
    with_cookie(redirect("/demo"), "")
}

fn with_cookie(mut resp: Response, token: &str) -> Response {
    resp.headers_mut()
        .insert(header::SET_COOKIE, http::ws::token_cookie(token, false));
    resp
}
