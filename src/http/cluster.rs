//! Serving as one node of a cluster (SPEC §12: any node serves any request):
//! - [`page_link`]: `GET /cluster/v1/pages/{bare}`, the owner's end of a peer's relay for one
//!   page (see [`crate::cluster::link`]);
//! - [`to_owner`]: API requests about a user whose session another node drives are sent to
//!   that node and its answer returned as it is; a session whose owner died is adopted here
//!   first; a hand-off for a user with no session anywhere claims the login for this node.
//!
//! Both are authenticated by the API key every node shares, and a request that was sent on
//! once carries [`FORWARDED_HEADER`] and is served where it lands, never sent on again.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::api::{BODY_LIMIT, has_api_key};
use super::error::ApiError;
use crate::cluster::Cluster;
use crate::cluster::link::FORWARDED_HEADER;
use crate::page::conn;
use crate::store::StoreError;
use crate::store::redis::{Located, Member};
use crate::xmpp::Jid;

/// Longest a forwarded API request may take (a hand-off waits for a login).
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `GET /cluster/v1/pages/{bare}`: a peer relays one page of `bare`, whose session this node
/// drives. 401 without the API key, 404 when the session is not here (the peer's page then
/// reconnects and finds where it is), 503 while stopping.
pub async fn page_link(
    State(st): State<AppState>,
    Path(jid): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !has_api_key(&st, &headers) {
        return ApiError::Unauthorized.into_response();
    }
    if st.stopping.is_cancelled() {
        return ApiError::Stopping.into_response();
    }
    let Ok(bare) = Jid::parse(&jid).map(|j| j.to_bare()) else {
        return ApiError::BadRequest("jid".into()).into_response();
    };
    let Some(session) = st.registry.get(&bare) else {
        return ApiError::NotFound(bare.to_string()).into_response();
    };
    let ctx = st.page_context(None);
    let tracker = st.pages.clone();
    let limit = st.config.limits.stanza_bytes * 2;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| tracker.track_future(conn::run_relayed(socket, ctx, session)))
}

/// The user an API request is about: the `{jid}` of its path, or the `jid` of a hand-off body.
fn user_of(method: &Method, path: &str, body: &[u8]) -> Option<Jid> {
    let rest = path.strip_prefix("/api/v1/sessions")?;
    let raw = if rest.is_empty() || rest == "/" {
        if method != Method::POST {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        v.get("jid")?.as_str()?.to_owned()
    } else {
        let segment = rest.strip_prefix('/')?.split('/').next()?;
        percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .ok()?
            .into_owned()
    };
    Jid::parse(&raw).ok().map(|j| j.to_bare())
}

/// Middleware on the API routes (inside the API-key check): sends a request about a user whose
/// session another node drives to that node.
pub async fn to_owner(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cluster) = st.cluster().cloned() else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED_HEADER) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return ApiError::TooLarge { limit: BODY_LIMIT }.into_response();
    };
    let Some(bare) = user_of(&parts.method, parts.uri.path(), &bytes) else {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    };
    let local = || Request::from_parts(parts.clone(), Body::from(bytes.clone()));
    if st.registry.get(&bare).is_some() {
        return next.run(local()).await;
    }
    // A hand-off (or prebind with a password) may log the user in: it claims the login.
    let creates = parts.method == Method::POST;
    for _ in 0..2 {
        match cluster.locate(&bare, creates).await {
            Ok(Located::Remote(owner)) => {
                return forward(&cluster, &owner, &parts, bytes.clone()).await;
            }
            Ok(Located::Orphan | Located::Mine) => {
                if cluster.adopt_now(&bare).await.is_some() {
                    return next.run(local()).await;
                }
                // Another node adopted it first: look again.
            }
            Ok(Located::Claimed) => {
                let resp = next.run(local()).await;
                if !resp.status().is_success() {
                    cluster.unclaim(&bare).await;
                }
                return resp;
            }
            Ok(Located::None) => return next.run(local()).await,
            Err(StoreError::Unavailable(e)) if creates => {
                tracing::warn!(error = %e, "hand-off refused: the cluster store is out of reach");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({
                        "error": "the cluster store is out of reach; try again shortly"
                    })),
                )
                    .into_response();
            }
            Err(_) => return next.run(local()).await,
        }
    }
    ApiError::Stopping.into_response()
}

/// Sends the request to `owner` and answers with its response.
async fn forward(
    cluster: &Arc<Cluster>,
    owner: &Member,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> Response {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", axum::http::uri::PathAndQuery::as_str);
    let client = node_client();
    let mut req = client
        .request(parts.method.clone(), format!("{}{path}", owner.url))
        .header(FORWARDED_HEADER, cluster.node_id())
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", cluster.api_key()),
        )
        .timeout(FORWARD_TIMEOUT)
        .body(body);
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    match req.send().await {
        Ok(resp) => {
            cluster_metrics(cluster);
            let status = resp.status();
            let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
            let body = resp.bytes().await.unwrap_or_default();
            let mut out = (status, body).into_response();
            if let Some(ct) = ct {
                out.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            out
        }
        Err(e) => {
            tracing::info!(owner = %owner.id, error = %e, "API request not forwarded: the owner is unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                axum::Json(serde_json::json!({
                    "error": "the node driving this session is unreachable; try again shortly"
                })),
            )
                .into_response()
        }
    }
}

fn cluster_metrics(cluster: &Cluster) {
    cluster
        .metrics()
        .cluster_forwarded
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The HTTP client nodes talk to each other with (no redirects, no proxy from the environment).
pub(crate) fn node_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        crate::bosh::transport::install_crypto_provider();
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap_or_default()
    })
}

/// `GET /api/v1/sessions` across the cluster: this node's sessions and every live peer's,
/// each naming its `node`.
pub async fn list_everywhere(
    st: &AppState,
    mut local: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    let Some(cluster) = st.cluster() else {
        return local;
    };
    let members = cluster.members().await.unwrap_or_default();
    let me = cluster.member();
    for m in members.iter().filter(|m| *m.id != *me) {
        let resp = node_client()
            .get(format!("{}/api/v1/sessions", m.url))
            .header(FORWARDED_HEADER, cluster.node_id())
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", cluster.api_key()),
            )
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await;
        match resp {
            Ok(r) => {
                let body = r.bytes().await.unwrap_or_default();
                if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(&body) {
                    local.extend(items);
                }
            }
            Err(e) => {
                tracing::info!(node = %m.node_id(), error = %e, "sessions of a node not listed")
            }
        }
    }
    local
}
