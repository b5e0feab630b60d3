//! Re-login through the web app (SPEC §7): when a session that holds no password (attached,
//! restored, adopted from another node) is lost upstream, the daemon asks the web app at
//! `relogin_url` for fresh credentials instead of giving the user up.
//!
//! The call is `POST <relogin_url>` with `Authorization: Bearer <api_key>` and the JSON body
//! `{"jid": "<bare jid>"}`. The web app answers `200` with `{"password": "…"}` (the daemon logs
//! in itself) or `{"jid": "<full jid>", "sid": "…", "rid": <next rid>}` (the daemon attaches to
//! a session the web app established), or `404` when the user is logged out (pages get 4001).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bosh::Credentials;
use crate::bosh::transport::{error_chain, http_client_builder};
use crate::xmpp::Jid;

/// Largest answer read from the web app, bytes: a JID and a password or a sid fit many times.
pub const ANSWER_LIMIT: usize = 16 * 1024;

/// Longest a whole call to the web app may take (connect, request, answer) by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the web app gave no credentials. None of these carries a password, a sid or the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloginError {
    /// `404`: the user is logged out of the web app; the session ends like a logout (4001).
    #[error("the web app says the user is logged out")]
    LoggedOut,
    /// Any other status than `200` or `404` (e.g. `401` for a wrong api key, `5xx`).
    #[error("the web app answered HTTP {0}")]
    Refused(u16),
    /// No answer: connection refused or reset, name not resolved, or over the time limit.
    #[error("the web app is unreachable: {0}")]
    Unreachable(String),
    /// A `200` whose body is not one of the two answers, is over [`ANSWER_LIMIT`], or names
    /// another user.
    #[error("the web app's answer is unusable: {0}")]
    BadAnswer(String),
}

/// The client of the web app's re-login endpoint. Cheap to clone (clones share the connection
/// pool). `Debug` shows the URL only.
#[derive(Clone)]
pub struct ReloginClient {
    http: reqwest::Client,
    url: reqwest::Url,
    api_key: std::sync::Arc<str>,
}

impl std::fmt::Debug for ReloginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloginClient")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Request<'a> {
    jid: &'a str,
}

/// The web app's `200` body: exactly one of the two shapes, unknown fields ignored.
#[derive(Deserialize)]
struct Answer {
    password: Option<String>,
    jid: Option<String>,
    sid: Option<String>,
    rid: Option<u64>,
}

impl ReloginClient {
    /// A client for the endpoint `url` (http or https), authenticating with `api_key`; each
    /// call is given up after [`DEFAULT_TIMEOUT`].
    pub fn new(url: &str, api_key: &str) -> Result<ReloginClient, String> {
        ReloginClient::with_timeout(url, api_key, DEFAULT_TIMEOUT)
    }

    /// Like [`ReloginClient::new`], each call given up after `timeout`.
    pub fn with_timeout(
        url: &str,
        api_key: &str,
        timeout: Duration,
    ) -> Result<ReloginClient, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("relogin_url {url:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("relogin_url {url:?}: scheme must be http or https"));
        }
        let http = http_client_builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(ReloginClient {
            http,
            url,
            api_key: api_key.into(),
        })
    }

    /// The endpoint.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Asks the web app for credentials of the user `bare` (SPEC §7): a password to log in with
    /// (`Credentials::Password` for `bare`), or a session to attach to (`Credentials::Attach`,
    /// whose full JID is `bare`'s, compared canonically).
    pub async fn credentials(&self, bare: &Jid) -> Result<Credentials, ReloginError> {
        let bare = bare.to_bare();
        let resp = self
            .http
            .post(self.url.clone())
            .bearer_auth(&*self.api_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(
                serde_json::to_vec(&Request {
                    jid: &bare.to_string(),
                })
                .expect("a string serializes"),
            )
            .send()
            .await
            .map_err(|e| ReloginError::Unreachable(error_chain(&e)))?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(ReloginError::LoggedOut),
            status => return Err(ReloginError::Refused(status)),
        }
        if resp
            .content_length()
            .is_some_and(|n| n > ANSWER_LIMIT as u64)
        {
            return Err(too_large());
        }
        let mut resp = resp;
        let mut raw = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ReloginError::Unreachable(error_chain(&e)))?
        {
            if raw.len() + chunk.len() > ANSWER_LIMIT {
                return Err(too_large());
            }
            raw.extend_from_slice(&chunk);
        }
        // serde's message may quote the body (a password); say where, not what.
        let answer: Answer = serde_json::from_slice(&raw).map_err(|e| {
            ReloginError::BadAnswer(format!(
                "not the expected JSON object (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        read_answer(&bare, answer)
    }
}

fn too_large() -> ReloginError {
    ReloginError::BadAnswer(format!("larger than {ANSWER_LIMIT} bytes"))
}

fn read_answer(bare: &Jid, answer: Answer) -> Result<Credentials, ReloginError> {
    let bad = |m: &str| Err(ReloginError::BadAnswer(m.to_owned()));
    match answer {
        Answer {
            password: Some(password),
            jid: None,
            sid: None,
            rid: None,
        } => {
            if crate::xmpp::sasl::prepare_password(&password).is_err() {
                return bad("the password is not one a server can accept (SASLprep)");
            }
            Ok(Credentials::Password {
                jid: bare.clone(),
                password,
            })
        }
        Answer {
            password: None,
            jid: Some(jid),
            sid: Some(sid),
            rid: Some(rid),
        } => {
            let Ok(full) = Jid::parse(&jid) else {
                return bad("jid is malformed");
            };
            if full.to_bare() != *bare {
                return bad("the attach answer is for another user");
            }
            if full.resource().is_none() {
                return bad("an attach answer needs the session's full jid");
            }
            if sid.is_empty() {
                return bad("sid is empty");
            }
            if rid >= 1 << 53 {
                return bad("rid out of range");
            }
            Ok(Credentials::Attach {
                jid: full,
                sid,
                rid,
            })
        }
        _ => bad("expected {\"password\"} or {\"jid\", \"sid\", \"rid\"}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use parking_lot::Mutex;

    use super::*;

    const KEY: &str = "relogin-test-key-0123456789";

    /// A web app on loopback answering every call with `status` and `body`, recording the
    /// authorization header and body of each call.
    async fn web_app(
        status: u16,
        body: &'static str,
    ) -> (String, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let app = axum::Router::new().route(
            "/relogin",
            post(move |headers: HeaderMap, request: String| async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                seen.lock()
                    .push((auth, serde_json::from_str(&request).unwrap()));
                (StatusCode::from_u16(status).unwrap(), body)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/relogin", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, calls)
    }

    fn alice() -> Jid {
        Jid::parse("alice@example.com").unwrap()
    }

    async fn ask(status: u16, body: &'static str) -> Result<Credentials, ReloginError> {
        let (url, _) = web_app(status, body).await;
        ReloginClient::new(&url, KEY)
            .unwrap()
            .credentials(&alice())
            .await
    }

    #[tokio::test]
    async fn a_password_answer_and_the_call_the_web_app_sees() {
        let (url, calls) = web_app(200, r#"{"password": "pw-CANARY"}"#).await;
        let client = ReloginClient::new(&url, KEY).unwrap();
        let full = Jid::parse("Alice@Example.COM/tab").unwrap();
        let creds = client.credentials(&full).await.unwrap();
        match &creds {
            Credentials::Password { jid, password } => {
                assert_eq!(jid.to_string(), "alice@example.com");
                assert_eq!(password, "pw-CANARY");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            *calls.lock(),
            [(
                format!("Bearer {KEY}"),
                serde_json::json!({"jid": "alice@example.com"})
            )]
        );
        for shown in [format!("{creds:?}"), format!("{client:?}")] {
            assert!(!shown.contains("CANARY") && !shown.contains(KEY), "{shown}");
        }
    }

    #[tokio::test]
    async fn an_attach_answer_must_be_for_the_same_user() {
        let creds = ask(
            200,
            r#"{"jid": "ALICE@example.com/web", "sid": "s1", "rid": 42, "extra": 1}"#,
        )
        .await
        .unwrap();
        match creds {
            Credentials::Attach { jid, sid, rid } => {
                assert_eq!(
                    (jid.to_string().as_str(), sid.as_str(), rid),
                    ("alice@example.com/web", "s1", 42)
                );
            }
            other => panic!("{other:?}"),
        }
        for body in [
            r#"{"jid": "bob@example.com/web", "sid": "s1", "rid": 42}"#,
            r#"{"jid": "alice@example.com", "sid": "s1", "rid": 42}"#,
            r#"{"jid": "alice@@example.com/x", "sid": "s1", "rid": 42}"#,
            r#"{"jid": "alice@example.com/web", "sid": "s1", "rid": 9007199254740992}"#,
            r#"{"jid": "alice@example.com/web", "sid": "s1"}"#,
            r#"{"password": "pw", "sid": "s1"}"#,
            r#"{}"#,
            r#"["pw"]"#,
            "password=pw",
        ] {
            let err = ask(200, body).await.unwrap_err();
            assert!(matches!(err, ReloginError::BadAnswer(_)), "{body}: {err}");
        }
    }

    #[tokio::test]
    async fn statuses_say_logged_out_or_refused() {
        assert_eq!(ask(404, "").await.unwrap_err(), ReloginError::LoggedOut);
        assert_eq!(ask(401, "").await.unwrap_err(), ReloginError::Refused(401));
        assert_eq!(ask(503, "").await.unwrap_err(), ReloginError::Refused(503));
        // A redirect is not followed: the bearer key stays with the configured endpoint.
        assert_eq!(ask(307, "").await.unwrap_err(), ReloginError::Refused(307));
    }

    #[tokio::test]
    async fn a_large_or_quoted_answer_is_refused_without_echoing_it() {
        let big: &'static str = Box::leak(
            format!(r#"{{"password": "{}"}}"#, "x".repeat(ANSWER_LIMIT)).into_boxed_str(),
        );
        assert_eq!(ask(200, big).await.unwrap_err(), too_large());
        let err = ask(200, r#"{"password": "pw-CANARY", "password": "again"}"#)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ReloginError::BadAnswer(m) if !m.contains("CANARY")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_absent_or_silent_web_app_is_unreachable() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/relogin", closed.local_addr().unwrap());
        drop(closed);
        let err = ReloginClient::new(&url, KEY)
            .unwrap()
            .credentials(&alice())
            .await
            .unwrap_err();
        assert!(matches!(err, ReloginError::Unreachable(_)), "{err}");

        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/relogin", silent.local_addr().unwrap());
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                held.push(tcp);
            }
        });
        let err = ReloginClient::with_timeout(&url, KEY, Duration::from_millis(300))
            .unwrap()
            .credentials(&alice())
            .await
            .unwrap_err();
        assert!(matches!(err, ReloginError::Unreachable(_)), "{err}");
        holder.abort();
    }

    #[test]
    fn only_http_urls() {
        assert!(ReloginClient::new("ftp://x/relogin", KEY).is_err());
        assert!(ReloginClient::new("relogin", KEY).is_err());
        assert!(ReloginClient::new("https://app.example/relogin", KEY).is_ok());
    }
}
