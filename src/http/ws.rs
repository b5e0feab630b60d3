//! `GET /ws`: the checks made before a page's upgrade (SPEC §4) — origin allowlist, the `xmpp`
//! subprotocol, the upgrade rate per client — and the cookie that lets a browser page use SASL
//! EXTERNAL.

use std::net::SocketAddr;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::client::{ClientKey, client_addr};
use crate::page::conn;
use crate::xmpp::Jid;

/// Read buffer of a page's socket: it grows to hold a larger frame, which is then read this many
/// bytes per system call. Small, because idle pages are the common case and the buffer is
/// resident from the first read (BENCHMARKS.md, "Idle pages": 8.6 KiB per idle page with 1 KiB,
/// 11.5 with 4); pages send few stanzas, most under 512 bytes.
const PAGE_READ_BUFFER: usize = 256;
/// Frames are written to the socket once this many bytes are buffered, or at the batch's flush.
const PAGE_WRITE_BATCH: usize = 8192;

/// The cookie the handoff sets.
pub const COOKIE: &str = "boshmux_token";

/// Upgrades a page's connection after the checks.
pub async fn upgrade(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(o) = origin
        && !st.config.allowed_origins.iter().any(|a| a == o)
    {
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let offers_xmpp = ws
        .requested_protocols()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "xmpp");
    if !offers_xmpp {
        return (
            StatusCode::BAD_REQUEST,
            "the xmpp subprotocol is required (RFC 7395)\n",
        )
            .into_response();
    }
    if st.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "restarting\n").into_response();
    }
    // A cookie is a browser credential: it counts only from an allowed origin.
    let cookie_user = match origin.and_then(|_| cookie_token(&headers)) {
        Some(t) => st.registry.check_token_anywhere(t).await,
        None => None,
    }
    .map(|j: Jid| j.to_bare());
    // A user's pages share one bucket wherever they come from (behind a proxy that is not
    // trusted, every page has the proxy's address); anyone else is known by address only.
    let client = match &cookie_user {
        Some(user) => ClientKey::User(user.to_string()),
        None => ClientKey::of_addr(client_addr(peer.ip(), &headers, &st.config.trusted_proxies)),
    };
    if !st.allow_upgrade(&client) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections, retry shortly\n",
        )
            .into_response();
    }
    let limits = &st.config.limits;
    let ctx = st.page_context(cookie_user);
    let tracker = st.pages.clone();
    // Frames somewhat over the stanza limit still arrive, so the page gets a proper stream error;
    // far larger ones are cut off by the WebSocket layer before they are buffered whole.
    let transport_limit = limits.stanza_bytes * 2;
    // An idle page should cost a few KiB: tungstenite preallocates its read buffer (128 KiB by
    // default), and stanzas are small. The write buffer only grows when frames are batched (the
    // page task flushes each batch), so an idle page has none.
    ws.protocols(["xmpp"])
        .read_buffer_size(PAGE_READ_BUFFER)
        .write_buffer_size(PAGE_WRITE_BATCH)
        .max_message_size(transport_limit)
        .max_frame_size(transport_limit)
        .on_upgrade(move |socket| tracker.track_future(conn::run(socket, ctx)))
}

/// `Set-Cookie` for a browser's token (HttpOnly, SameSite=Lax, Path=/; Secure over https). An
/// empty token clears the cookie.
pub(crate) fn token_cookie(token: &str, secure: bool) -> axum::http::HeaderValue {
    let expiry = if token.is_empty() { "; Max-Age=0" } else { "" };
    let secure = if secure { "; Secure" } else { "" };
    axum::http::HeaderValue::from_str(&format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Lax; Path=/{expiry}{secure}"
    ))
    .expect("tokens are URL-safe")
}

/// The `boshmux_token` cookie's value, if sent.
pub(crate) fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}
