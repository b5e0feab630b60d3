//! The handoff API (SPEC §3): server-to-server calls that create, list and end sessions, and
//! `GET /handoff`, where a browser redeems a one-time ticket for its cookie.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::ws::token_cookie;
use crate::bosh::Credentials;
use crate::session::{Readiness, RegistryError, SessionInfo};
use crate::xmpp::Jid;

/// Largest API request body, bytes: a hand-off is a JID and a password or a sid.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The API routes, behind the api key.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/sessions", get(list).post(create))
        .route("/api/v1/sessions/{jid}", get(show).delete(logout))
        .route(
            "/api/v1/sessions/{jid}/prebind",
            axum::routing::post(super::bosh::prebind),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            super::cluster::to_owner,
        ))
        .route_layer(middleware::from_fn_with_state(state, require_api_key))
}

/// Whether `headers` carry `Authorization: Bearer` with the api key (compared in constant time;
/// never true when no key is configured). Also what cluster nodes present to each other.
pub(crate) fn has_api_key(st: &AppState, headers: &HeaderMap) -> bool {
    let expected = st.config.api_key.as_deref().unwrap_or_default();
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| {
            !expected.is_empty() && constant_time_eq(k.as_bytes(), expected.as_bytes())
        })
}

/// Refuses browsers (any `Origin`) and requests without the right bearer key.
async fn require_api_key(
    State(st): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if req.headers().contains_key(header::ORIGIN) {
        return Err(ApiError::OriginRefused);
    }
    if has_api_key(&st, req.headers()) {
        Ok(next.run(req).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Compares secrets without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /api/v1/sessions` body: a password login, or an attach.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    jid: String,
    password: Option<String>,
    sid: Option<String>,
    rid: Option<u64>,
}

impl std::fmt::Debug for CreateRequest {
    // By hand: neither the password nor the sid may reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateRequest")
            .field("jid", &self.jid)
            .field("rid", &self.rid)
            .finish_non_exhaustive()
    }
}

/// `POST /api/v1/sessions` answer.
#[derive(Serialize)]
pub struct CreateResponse {
    jid: String,
    token: String,
    ticket: String,
    expires_at: String,
}

impl std::fmt::Debug for CreateResponse {
    // By hand: the token and ticket are credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateResponse")
            .field("jid", &self.jid)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

async fn create(
    State(st): State<AppState>,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CreateResponse>), ApiError> {
    let Json(req) = body.map_err(ApiError::from)?;
    let jid = Jid::parse(&req.jid).map_err(|e| ApiError::BadRequest(format!("jid: {e}")))?;
    let domain = st.config.xmpp_domain.as_deref().unwrap_or_default();
    if jid.domain() != domain || jid.local().is_none() {
        return Err(ApiError::BadRequest(format!(
            "jid must be a user of {domain}"
        )));
    }
    let bare = jid.to_bare();
    let creds = match (req.password, req.sid, req.rid) {
        (Some(password), None, None) => {
            // A password no server can accept is the caller's error, not the server's.
            crate::xmpp::sasl::prepare_password(&password)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            Credentials::Password {
                jid: bare.clone(),
                password,
            }
        }
        (None, Some(sid), Some(rid)) => {
            if jid.resource().is_none() {
                return Err(ApiError::BadRequest(
                    "attach needs the full jid of the session".into(),
                ));
            }
            if rid >= 1 << 53 {
                return Err(ApiError::BadRequest("rid out of range".into()));
            }
            Credentials::Attach { jid, sid, rid }
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give either password, or sid and rid".into(),
            ));
        }
    };
    let (full, created) = hand_off(&st, &bare, creds).await?;
    let (token, expires) = st.registry.issue_token(&bare).await;
    let ticket = st.registry.issue_ticket(&bare).await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(CreateResponse {
            jid: full.to_string(),
            token,
            ticket,
            expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
        }),
    ))
}

/// The session of `bare` — the live one, or a new one established with `creds` — once it is
/// ready: its full JID, and whether it was created now. Shared by the API and the demo's login.
pub(crate) async fn hand_off(
    st: &AppState,
    bare: &Jid,
    creds: Credentials,
) -> Result<(Jid, bool), ApiError> {
    let (session, created) = st
        .registry
        .get_or_create(bare, creds)
        .map_err(|e| match e {
            RegistryError::TooManyUsers => ApiError::TooManyUsers,
        })?;
    let limit = st.registry.client.config().timeouts.login + std::time::Duration::from_secs(5);
    // A stop does not wait for a login in progress: the caller is told to try again.
    let ready = tokio::select! {
        r = tokio::time::timeout(limit, session.ready()) => r,
        () = st.stopping.cancelled() => return Err(ApiError::Stopping),
    };
    match ready {
        Ok(Readiness::Ready(full)) => Ok((full, created)),
        Ok(Readiness::Failed(failure)) => Err(failure.into()),
        Ok(Readiness::Connecting) | Err(_) => Err(ApiError::Timeout),
    }
}

/// Every session: this node's, and with a cluster every node's (a request forwarded by a peer
/// gets this node's only).
async fn list(State(st): State<AppState>, headers: HeaderMap) -> Json<Vec<serde_json::Value>> {
    let local: Vec<serde_json::Value> = st
        .registry
        .all()
        .iter()
        .filter_map(|s| serde_json::to_value(info_here(&st, s)).ok())
        .collect();
    if headers.contains_key(crate::cluster::link::FORWARDED_HEADER) {
        return Json(local);
    }
    Json(super::cluster::list_everywhere(&st, local).await)
}

/// A session's info, naming this node as its owner.
fn info_here(st: &AppState, s: &crate::session::SessionHandle) -> SessionInfo {
    let mut info = s.info();
    info.node = Some(st.node_id.clone());
    info
}

fn user(st: &AppState, jid: &str) -> Result<crate::session::SessionHandle, ApiError> {
    let bare = Jid::parse(jid)
        .map_err(|e| ApiError::BadRequest(format!("jid: {e}")))?
        .to_bare();
    st.registry
        .get(&bare)
        .ok_or_else(|| ApiError::NotFound(bare.to_string()))
}

async fn show(
    State(st): State<AppState>,
    Path(jid): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(info_here(&st, &user(&st, &jid)?)))
}

async fn logout(
    State(st): State<AppState>,
    Path(jid): Path<String>,
) -> Result<StatusCode, ApiError> {
    user(&st, &jid)?.logout().await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /handoff` query.
#[derive(Deserialize)]
pub struct HandoffQuery {
    ticket: String,
    next: Option<String>,
}

impl std::fmt::Debug for HandoffQuery {
    // By hand: the ticket is a credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoffQuery")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// Redeems a ticket: sets a fresh `boshmux_token` cookie and redirects to `next`.
pub async fn handoff(
    State(st): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HandoffQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    // Checked before the ticket is redeemed: a refused `next` leaves the ticket usable.
    let location = redirect_target(q.next.as_deref().unwrap_or("/"), &st.config.allowed_origins)
        .ok_or_else(|| {
            ApiError::BadRequest(
                "next must be a path on this site or a URL on an allowed origin".into(),
            )
        })?;
    let bare = st
        .registry
        .redeem_ticket_anywhere(&q.ticket)
        .await
        .ok_or(ApiError::BadTicket)?;
    if st.registry.find(&bare).await.is_none() {
        return Err(ApiError::BadTicket);
    }
    let (token, _) = st.registry.issue_token(&bare).await;
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(header::SET_COOKIE, token_cookie(&token, https));
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("a serialized URL is visible ASCII"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Where `/handoff` may send the browser (SPEC §3): the `Location` for `next`, or `None` when
/// `next` could lead off the site. `next` is read by the WHATWG URL parser, as a browser reads
/// it, and accepted as a path on this site (resolved against it, so it cannot name another
/// host) or as an http(s) URL without userinfo whose origin is one of `allowed` (serialized
/// origins). The answer is the parser's serialization (ASCII, percent-encoded), never the bytes
/// given.
///
/// Refused before parsing: control characters, whitespace and backslashes, which a browser
/// silently drops or reads as `/` (`/<TAB>/evil` and `/\evil` are `//evil` to it).
pub(crate) fn redirect_target(next: &str, allowed: &[String]) -> Option<String> {
    if next.is_empty()
        || next
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return None;
    }
    if next.starts_with('/') {
        // A scheme-relative `//host` names another host.
        if next.starts_with("//") {
            return None;
        }
        let site = url::Url::parse("http://site.invalid/").expect("a valid base");
        let url = site.join(next).ok()?;
        let location = &url[url::Position::BeforePath..];
        // Dot segments can collapse into `//` (`/.//evil` is the path `//evil`): the
        // serialization must still read as a path.
        if url.origin() != site.origin() || location.starts_with("//") {
            return None;
        }
        return Some(location.to_owned());
    }
    let url = url::Url::parse(next).ok()?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.username().is_empty()
        && url.password().is_none();
    (plain && allowed.contains(&url.origin().ascii_serialization())).then(|| url.to_string())
}

#[cfg(test)]
mod tests {
    use super::{CreateRequest, CreateResponse, HandoffQuery, redirect_target};

    #[test]
    fn debug_hides_passwords_sids_tokens_and_tickets() {
        let req: CreateRequest = serde_json::from_str(
            r#"{"jid": "a@b", "password": "pw-CANARY", "sid": "sid-CANARY", "rid": 5}"#,
        )
        .unwrap();
        let resp = CreateResponse {
            jid: "a@b/r".into(),
            token: "token-CANARY".into(),
            ticket: "ticket-CANARY".into(),
            expires_at: "2030-01-01T00:00:00Z".into(),
        };
        let query: HandoffQuery =
            serde_json::from_str(r#"{"ticket": "ticket-CANARY", "next": "/x"}"#).unwrap();
        for shown in [
            format!("{req:?}"),
            format!("{resp:?}"),
            format!("{query:?}"),
        ] {
            assert!(!shown.contains("CANARY"), "{shown}");
        }
    }

    #[test]
    fn next_must_stay_on_site_or_an_allowed_origin() {
        let allowed = vec!["https://app.example.com".to_owned()];
        let accepted = [
            ("/", "/"),
            ("/chat?x=1#top", "/chat?x=1#top"),
            ("/a/../chat", "/chat"),
            ("/%2F%2Fevil.com", "/%2F%2Fevil.com"),
            ("/%09/evil.com", "/%09/evil.com"),
            ("/ch\u{e4}t", "/ch%C3%A4t"),
            (
                "https://app.example.com/chat",
                "https://app.example.com/chat",
            ),
            ("https://app.example.com", "https://app.example.com/"),
            (
                "HTTPS://APP.EXAMPLE.COM/chat",
                "https://app.example.com/chat",
            ),
            ("https://app.example.com:443/x", "https://app.example.com/x"),
        ];
        for (next, location) in accepted {
            assert_eq!(
                redirect_target(next, &allowed).as_deref(),
                Some(location),
                "{next:?}"
            );
        }
        let refused = [
            "",
            "/\t/evil.com",
            "/\n/evil.com",
            "/\r/evil.com",
            "/\r\n/evil.com",
            "\t//evil.com",
            " //evil.com",
            "/\u{a0}/evil.com",
            "/\u{3000}/evil.com",
            "/\u{7f}/evil.com",
            "/\u{85}/evil.com",
            "/\\evil.com",
            "\\\\evil.com",
            "\\/evil.com",
            "//evil.com",
            "///evil.com",
            "/.//evil.com",
            "/a/..//evil.com",
            "/./%2e/.//evil.com",
            "https://evil.com",
            "https:evil.com",
            "https:/evil.com",
            "HTTPS://evil.com",
            "http://app.example.com/",
            "https://app.example.com:8443/",
            "https://app.example.com.evil.com/",
            "https://app.example.com@evil.com/",
            "https://user@app.example.com/",
            "https://user:pw@app.example.com/",
            "https://app.example.com%40evil.com/",
            "https://\u{430}pp.example.com/",
            "https://app.ex\u{430}mple.com/",
            "https://xn--pp-6kc.example.com/",
            "https://app.example.com\u{3002}evil.com/",
            "javascript:alert(1)",
            "JAVASCRIPT:alert(1)",
            "JaVaScRiPt:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "vbscript:msgbox(1)",
            "file:///etc/passwd",
            "ws://app.example.com/",
            "chat",
            "?next=x",
            "#x",
            "evil.com",
        ];
        for next in refused {
            assert_eq!(redirect_target(next, &allowed), None, "{next:?}");
        }
    }
}
