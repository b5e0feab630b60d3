//! The handoff API (SPEC §3): server-to-server calls that create, list and end sessions, and
//! `GET /handoff`, where a browser redeems a one-time ticket for its cookie.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
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

/// The API routes, behind the api key.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/sessions", get(list).post(create))
        .route("/api/v1/sessions/{jid}", get(show).delete(logout))
        .route(
            "/api/v1/sessions/{jid}/prebind",
            axum::routing::post(super::bosh::prebind),
        )
        .route_layer(middleware::from_fn_with_state(state, require_api_key))
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
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let expected = st.config.api_key.as_deref().unwrap_or_default();
    match given {
        Some(key)
            if !expected.is_empty() && constant_time_eq(key.as_bytes(), expected.as_bytes()) =>
        {
            Ok(next.run(req).await)
        }
        _ => Err(ApiError::Unauthorized),
    }
}

/// Compares secrets without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /api/v1/sessions` body: a password login, or an attach.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    jid: String,
    password: Option<String>,
    sid: Option<String>,
    rid: Option<u64>,
}

/// `POST /api/v1/sessions` answer.
#[derive(Debug, Serialize)]
pub struct CreateResponse {
    jid: String,
    token: String,
    ticket: String,
    expires_at: String,
}

async fn create(
    State(st): State<AppState>,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CreateResponse>), ApiError> {
    let Json(req) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let jid = Jid::parse(&req.jid).map_err(|e| ApiError::BadRequest(format!("jid: {e}")))?;
    let domain = st.config.xmpp_domain.as_deref().unwrap_or_default();
    if jid.domain() != domain || jid.local().is_none() {
        return Err(ApiError::BadRequest(format!(
            "jid must be a user of {domain}"
        )));
    }
    let bare = jid.to_bare();
    let creds = match (req.password, req.sid, req.rid) {
        (Some(password), None, None) => Credentials::Password {
            jid: bare.clone(),
            password,
        },
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
    let (token, expires) = st.registry.issue_token(&bare);
    let ticket = st.registry.issue_ticket(&bare);
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
        Ok(Readiness::Failed {
            message,
            auth: true,
        }) => Err(ApiError::LoginRefused(message)),
        Ok(Readiness::Failed { message, .. }) => Err(ApiError::Upstream(message)),
        Ok(Readiness::Connecting) | Err(_) => Err(ApiError::Timeout),
    }
}

async fn list(State(st): State<AppState>) -> Json<Vec<SessionInfo>> {
    Json(st.registry.all().iter().map(|s| s.info()).collect())
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
    Ok(Json(user(&st, &jid)?.info()))
}

async fn logout(
    State(st): State<AppState>,
    Path(jid): Path<String>,
) -> Result<StatusCode, ApiError> {
    user(&st, &jid)?.logout().await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /handoff` query.
#[derive(Debug, Deserialize)]
pub struct HandoffQuery {
    ticket: String,
    next: Option<String>,
}

/// Redeems a ticket: sets a fresh `boshmux_token` cookie and redirects to `next`.
pub async fn handoff(
    State(st): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HandoffQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let next = q.next.unwrap_or_else(|| "/".into());
    if !safe_next(&next, &st.config.allowed_origins) {
        return Err(ApiError::BadRequest(
            "next must be a relative path or on an allowed origin".into(),
        ));
    }
    let bare = st
        .registry
        .redeem_ticket(&q.ticket)
        .ok_or(ApiError::BadTicket)?;
    if st.registry.get(&bare).is_none() {
        return Err(ApiError::BadTicket);
    }
    let (token, _) = st.registry.issue_token(&bare);
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(header::SET_COOKIE, token_cookie(&token, https));
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&next).map_err(|_| ApiError::BadRequest("bad next".into()))?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// A redirect target that cannot send the browser elsewhere: a path on this site (not `//host`),
/// or a URL on an allowed origin.
fn safe_next(next: &str, allowed: &[String]) -> bool {
    if next.starts_with('/') {
        return !next.starts_with("//") && !next.starts_with("/\\") && !next.contains(['\r', '\n']);
    }
    reqwest::Url::parse(next).is_ok_and(|u| {
        let origin = u.origin().ascii_serialization();
        allowed.contains(&origin)
    })
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_must_stay_on_site_or_an_allowed_origin() {
        let allowed = vec!["https://app.example".to_owned()];
        assert!(safe_next("/chat?x=1", &allowed));
        assert!(safe_next("https://app.example/chat", &allowed));
        assert!(!safe_next("//evil.example/", &allowed));
        assert!(!safe_next("/\\evil.example", &allowed));
        assert!(!safe_next("https://evil.example/", &allowed));
        assert!(!safe_next("javascript:alert(1)", &allowed));
        assert!(!safe_next("chat", &allowed));
    }
}
