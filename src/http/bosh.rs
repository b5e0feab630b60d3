//! `POST /http-bind`: the page-facing BOSH connection manager (SPEC §4b) — origin and CORS
//! checks (preflight included, for `allowed_origins` only), the body read under the page
//! limits, then [`crate::page::bosh`] by sid — and the prebind call of the handoff API.

use std::net::SocketAddr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::client::{ClientKey, client_addr};
use super::error::ApiError;
use super::ws::cookie_token;
use crate::bosh::Credentials;
use crate::page::bosh::{self as pages, Granted, PrebindError};
use crate::xmpp::{self, Jid, ns};

/// Lifetime of an unused prebind, like a ticket's (SPEC §4b).
pub const PREBIND_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The `Origin` of a browser request when it is allowed; `Err` when present and not allowed.
fn allowed_origin<'h>(st: &AppState, headers: &'h HeaderMap) -> Result<Option<&'h str>, ()> {
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => Ok(None),
        Some(Ok(o)) if st.config.allowed_origins.iter().any(|a| a == o) => Ok(Some(o)),
        Some(_) => Err(()),
    }
}

/// CORS headers for an allowed origin: credentials included, so the cookie may authenticate.
fn cors(resp: &mut Response, origin: Option<&str>) {
    let Some(origin) = origin.and_then(|o| HeaderValue::from_str(o).ok()) else {
        return;
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

fn refused() -> Response {
    (StatusCode::FORBIDDEN, "origin not allowed\n").into_response()
}

/// `OPTIONS /http-bind`: the CORS preflight, answered for `allowed_origins` only.
pub async fn preflight(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let Ok(Some(origin)) = allowed_origin(&st, &headers) else {
        return refused();
    };
    let mut resp = StatusCode::NO_CONTENT.into_response();
    cors(&mut resp, Some(origin));
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    resp
}

/// `POST /http-bind`: one request of a page's virtual BOSH session (or its creation).
pub async fn request(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Response {
    let Ok(origin) = allowed_origin(&st, &headers) else {
        return refused();
    };
    let (status, reply) = answer(&st, peer, &headers, origin, &bytes).await;
    let mut resp = (status, reply).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    cors(&mut resp, origin);
    resp
}

/// In a cluster, a request for a virtual session another node made (its sid names the node) is
/// sent on to that node and its answer returned (SPEC §12: any node serves any request).
async fn elsewhere(
    st: &AppState,
    headers: &HeaderMap,
    sid: &str,
    bytes: &[u8],
) -> Option<(StatusCode, Bytes)> {
    let cluster = st.cluster()?;
    if st.bosh_pages.knows(sid) || headers.contains_key(crate::cluster::link::FORWARDED_HEADER) {
        return None;
    }
    let node = crate::cluster::node_of_bosh_sid(sid).filter(|n| *n != st.node_id)?;
    let url = cluster.url_of_node(&node).await?;
    let mut req = crate::http::cluster::node_client()
        .post(format!("{url}/http-bind"))
        .header(crate::cluster::link::FORWARDED_HEADER, st.node_id.as_str())
        .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
        .timeout(std::time::Duration::from_secs(125))
        .body(bytes.to_vec());
    if let Some(origin) = headers.get(header::ORIGIN) {
        req = req.header(header::ORIGIN, origin);
    }
    let resp = req.send().await.ok()?;
    let status = resp.status();
    let body = resp.bytes().await.ok()?;
    Some((status, body))
}

async fn answer(
    st: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    origin: Option<&str>,
    bytes: &[u8],
) -> (StatusCode, Bytes) {
    let bad = |_| {
        (
            StatusCode::BAD_REQUEST,
            pages::terminate_reply(Some("bad-request"), None),
        )
    };
    let limits = st.page_limits();
    let Ok(body) = xmpp::parse(bytes, &pages::body_limits(&limits)) else {
        return bad(());
    };
    if !body.is("body", ns::HTTPBIND) {
        return bad(());
    }
    let Some(rid) = body
        .attr("rid")
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|r| *r < 1 << 53)
    else {
        return bad(());
    };
    if let Some(sid) = body.attr("sid") {
        let sid = sid.to_owned();
        if let Some(answer) = elsewhere(st, headers, &sid, bytes).await {
            return answer;
        }
        return (StatusCode::OK, st.bosh_pages.request(&sid, rid, body).await);
    }
    // A new page: the checks of a WebSocket upgrade (SPEC §4, §9).
    let domain = st.config.xmpp_domain.clone().unwrap_or_default();
    // Any spelling of the domain, prepared as the WebSocket `<open to>` is (SPEC §3a).
    if !body
        .attr("to")
        .is_some_and(|to| Jid::names_domain(to, &domain))
    {
        return (
            StatusCode::OK,
            pages::terminate_reply(Some("host-unknown"), None),
        );
    }
    if st.stopping.is_cancelled() {
        return (
            StatusCode::OK,
            pages::terminate_reply(Some("system-shutdown"), None),
        );
    }
    // A cookie is a browser credential: it counts only from an allowed origin.
    let cookie_user = match origin.and_then(|_| cookie_token(headers)) {
        Some(t) => st.registry.check_token_anywhere(t).await,
        None => None,
    }
    .map(|j| j.to_bare());
    // The same per-client bucket as a WebSocket upgrade (a user's pages share one).
    let client = match &cookie_user {
        Some(user) => ClientKey::User(user.to_string()),
        None => ClientKey::of_addr(client_addr(peer.ip(), headers, &st.config.trusted_proxies)),
    };
    if !st.allow_upgrade(&client) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            pages::terminate_reply(Some("policy-violation"), None),
        );
    }
    let ctx = st.page_context(cookie_user);
    let granted = Granted::from_request(&body, st.config.limits.ws_dead_peer_timeout);
    let tracker = st.pages.clone();
    let reply = st.bosh_pages.create(&body, rid, ctx, granted, |task| {
        tracker.spawn(task);
    });
    (StatusCode::OK, reply)
}

/// Whether `Content-Type` is `application/json` or `application/*+json` (parameters aside), as
/// the other API bodies must be.
fn declared_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `POST /api/v1/sessions/{bare_jid}/prebind` body: the password when the user may have no
/// live session (as `POST /api/v1/sessions`); nothing otherwise.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrebindRequest {
    password: Option<String>,
}

/// `POST /api/v1/sessions/{bare_jid}/prebind` answer: what Strophe's `attach()` and
/// Converse's `prebind_url` take.
#[derive(Debug, Serialize)]
pub struct PrebindResponse {
    jid: String,
    sid: String,
    /// The rid of the page's first request.
    rid: u64,
}

/// A fresh virtual BOSH session for one page load of `bare_jid`, attached to the user's
/// session (created with the password when there is none, reused otherwise).
pub async fn prebind(
    State(st): State<AppState>,
    Path(jid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<PrebindResponse>), ApiError> {
    // The body is optional; one that is there is JSON, declared so (415 otherwise, as every API
    // body).
    let req: PrebindRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PrebindRequest::default()
    } else if !declared_json(&headers) {
        return Err(ApiError::NotJson);
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?
    };
    let jid = Jid::parse(&jid).map_err(|e| ApiError::BadRequest(format!("jid: {e}")))?;
    let domain = st.config.xmpp_domain.as_deref().unwrap_or_default();
    if jid.domain() != domain || jid.local().is_none() {
        return Err(ApiError::BadRequest(format!(
            "jid must be a user of {domain}"
        )));
    }
    let bare = jid.to_bare();
    let session = match (st.registry.get(&bare), req.password) {
        (Some(s), _) => s,
        (None, Some(password)) => {
            let creds = Credentials::Password {
                jid: bare.clone(),
                password,
            };
            super::api::hand_off(&st, &bare, creds).await?;
            st.registry
                .get(&bare)
                .ok_or_else(|| ApiError::Upstream("session ended".into()))?
        }
        (None, None) => {
            return Err(ApiError::NotFound(format!(
                "{bare} (give the password to log in)"
            )));
        }
    };
    let full = match session.ready().await {
        crate::session::Readiness::Ready(full) => full,
        crate::session::Readiness::Failed(failure) => return Err(failure.into()),
        crate::session::Readiness::Connecting => return Err(ApiError::Timeout),
    };
    if st.stopping.is_cancelled() {
        return Err(ApiError::Stopping);
    }
    let ctx = st.page_context(None);
    let granted = Granted::from_request(
        &xmpp::Element::new("body", ns::HTTPBIND),
        st.config.limits.ws_dead_peer_timeout,
    );
    let tracker = st.pages.clone();
    let (sid, rid) = st
        .bosh_pages
        .prebind(
            session,
            ctx,
            granted,
            PREBIND_TTL,
            st.config.limits.pages_per_user,
            |task| {
                tracker.spawn(task);
            },
        )
        .map_err(|e| match e {
            PrebindError::TooManyPages => ApiError::TooManyPages,
        })?;
    Ok((
        StatusCode::CREATED,
        Json(PrebindResponse {
            jid: full.to_string(),
            sid,
            rid,
        }),
    ))
}
