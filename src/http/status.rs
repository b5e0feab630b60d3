//! `GET /metrics` (Prometheus text format) and `GET /status`, a page a person can read: every
//! session with its pages, upstream state, rid, age and last activity. The status page is behind
//! the api key, given as a bearer token or as the password of HTTP Basic authentication (so a
//! browser can open it).

use std::fmt::Write as _;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;

use super::AppState;
use super::api::constant_time_eq;

/// The Prometheus exposition.
pub async fn metrics(State(st): State<AppState>) -> Response {
    let sessions = st.registry.all();
    let pages = sessions.iter().map(|s| s.info().pages).sum();
    let mut body = st.registry.metrics.render(sessions.len(), pages);
    crate::metrics::render_bosh_pages(
        &mut body,
        st.bosh_pages.len(),
        st.bosh_pages.unused_prebinds_total(),
    );
    if let Some(cluster) = st.cluster() {
        cluster_metrics(&mut body, cluster).await;
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Headers of every answer of the status page: it shows who is online, so no cache keeps it
/// and no other site may frame it (clickjacking); its only style is inline and it loads nothing.
const PAGE_HEADERS: [(header::HeaderName, &str); 4] = [
    (header::CACHE_CONTROL, "no-store"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
];

/// The status page.
pub async fn status(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let census = match st.cluster() {
        Some(c) => Some(c.census().await.unwrap_or_default()),
        None => None,
    };
    (PAGE_HEADERS, status_page(&st, &headers, census)).into_response()
}

/// The cluster's figures (SPEC §12): live nodes, and the sessions each owns.
async fn cluster_metrics(out: &mut String, cluster: &crate::cluster::Cluster) {
    use std::fmt::Write as _;
    let Ok(census) = cluster.census().await else {
        return;
    };
    let _ = writeln!(
        out,
        "# HELP boshmux_cluster_nodes Live nodes of the cluster.\n# TYPE boshmux_cluster_nodes gauge\nboshmux_cluster_nodes {}",
        census.len()
    );
    let _ = writeln!(
        out,
        "# HELP boshmux_cluster_sessions Sessions each live node of the cluster drives.\n# TYPE boshmux_cluster_sessions gauge"
    );
    for (node, n) in census {
        let node = node.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(out, "boshmux_cluster_sessions{{node=\"{node}\"}} {n}");
    }
}

fn status_page(
    st: &AppState,
    headers: &HeaderMap,
    census: Option<Vec<(String, usize)>>,
) -> Response {
    let expected = st.config.api_key.as_deref().unwrap_or_default();
    if !authorized(headers, expected) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"boshmux status\", charset=\"UTF-8\"",
            )],
            "the api key is required (as bearer token or Basic password)\n",
        )
            .into_response();
    }
    let mut sessions: Vec<_> = st.registry.all().iter().map(|s| s.info()).collect();
    sessions.sort_by(|a, b| a.jid.cmp(&b.jid));
    let now = SystemTime::now();
    let pages: usize = sessions.iter().map(|s| s.pages).sum();
    let mut rows = String::new();
    for s in &sessions {
        let state_class = match s.upstream {
            "live" => "ok",
            "connecting" | "retrying" | "reconnecting" => "warn",
            _ => "bad",
        };
        let _ = writeln!(
            rows,
            "<tr><td class=jid>{}</td><td><span class=\"pill {state_class}\">{}</span>{}</td><td class=num>{}</td>\
             <td class=num>{}</td><td>{}</td><td>{}</td><td class=num>{} / {}</td><td class=num>{}</td><td class=num>{}</td><td>{}</td></tr>",
            escape(s.jid.as_deref().unwrap_or("—")),
            s.upstream,
            if s.attached {
                " <small>attached</small>"
            } else {
                ""
            },
            s.pages,
            s.next_rid()
                .map_or_else(|| "—".to_owned(), |r| r.to_string()),
            ago(now, s.created),
            ago(now, s.last_activity),
            s.stanzas_in,
            s.stanzas_out,
            s.buffered,
            s.relogins,
            escape(&st.node_id),
        );
    }
    if sessions.is_empty() {
        rows.push_str("<tr><td colspan=10 class=empty>No sessions.</td></tr>");
    }
    let bosh_pages = st.bosh_pages.len();
    let prebinds_unused = st.bosh_pages.unused_prebinds_total();
    let cluster = census.map_or_else(String::new, |census| {
        let nodes: Vec<String> = census
            .iter()
            .map(|(node, n)| format!("{} ({n})", escape(node)))
            .collect();
        format!(
            " · node <b>{}</b> of a cluster of {}: {}",
            escape(&st.node_id),
            census.len(),
            nodes.join(", ")
        )
    });
    let listen = escape(&st.config.listen.to_string());
    let upstream = escape(st.config.bosh_url.as_deref().unwrap_or_default());
    Html(format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>boshmux status</title>\
         <meta http-equiv=refresh content=5><style>{STYLE}</style></head><body>\
         <h1>boshmux <span>status</span></h1>\
         <p class=summary><b>{}</b> sessions · <b>{pages}</b> pages · <b>{bosh_pages}</b> virtual BOSH sessions (<b>{prebinds_unused}</b> unused prebinds) · listening on {listen} · upstream {upstream}{cluster}</p>\
         <table><thead><tr><th>Session</th><th>Upstream</th><th>Pages</th><th>Next rid</th><th>Age</th>\
         <th>Last activity</th><th>Stanzas in / out</th><th>Buffered</th><th>Re-logins</th><th>Node</th></tr></thead>\
         <tbody>{rows}</tbody></table><p class=foot>Refreshes every 5 s. Metrics: <a href=/metrics>/metrics</a></p>\
         </body></html>",
        sessions.len()
    ))
    .into_response()
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#1d2330;background:#f4f5f7}\
h1{font-size:1.4rem;margin:0 0 .3rem}h1 span{color:#6b7385;font-weight:400}.summary{color:#444}\
table{border-collapse:collapse;background:#fff;border:1px solid #e3e6ec;border-radius:8px;min-width:60%}\
th,td{padding:.45rem .8rem;border-bottom:1px solid #eef0f4;text-align:left}th{font-size:.8rem;color:#6b7385;font-weight:600}\
td.num{text-align:right;font-variant-numeric:tabular-nums}td.jid{font-family:ui-monospace,monospace}\
.pill{padding:.05rem .5rem;border-radius:999px;font-size:.8rem}.ok{background:#dff5ea;color:#1a7f4b}\
.warn{background:#fdf1d8;color:#9a6b00}.bad{background:#fde2e1;color:#b42318}.empty{color:#6b7385;text-align:center}\
.foot{color:#6b7385;font-size:.8rem}small{color:#6b7385}";

fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    if expected.is_empty() {
        return false;
    }
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(key) = value.strip_prefix("Bearer ") {
        return constant_time_eq(key.as_bytes(), expected.as_bytes());
    }
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let password = decoded.splitn(2, |b| *b == b':').nth(1).unwrap_or_default();
    constant_time_eq(password, expected.as_bytes())
}

fn ago(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        _ => format!("{} h {} min ago", secs / 3600, secs % 3600 / 60),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
