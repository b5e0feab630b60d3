//! Re-login through the web app (SPEC §7): a user handed off by attach (no password in the
//! daemon) whose upstream session is killed server-side. A real HTTP server in the test stands in
//! for the web app at `relogin_url`: it checks the bearer key, records each call, and answers a
//! password, an attach of a session it established itself, or 404 (logged out).
//!
//! Against Prosody and ejabberd (groups g33 to g36, and g73), plus the fake connection manager
//! for the case without `relogin_url`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use boshmux::xmpp::{Element, Jid, ns};
use parking_lot::Mutex;
use support::daemon::{API_KEY, Daemon, Page};
use support::{Server, body_text, both, chat, next_stanza, raw_login};

const LIMIT: Duration = Duration::from_secs(15);

/// What the web app answers a re-login call with.
#[derive(Clone)]
enum Answer {
    /// `{"password": …}`.
    Password(String),
    /// Logs the user in itself (as `resource`) and answers `{"jid", "sid", "rid"}`.
    Attach {
        bosh: String,
        password: String,
        resource: &'static str,
    },
    /// 404: the user is logged out.
    LoggedOut,
}

/// The web app stand-in on loopback.
struct WebApp {
    url: String,
    /// The `jid` of every call that carried the right key.
    calls: Arc<Mutex<Vec<String>>>,
    /// Calls without the right key.
    unauthorized: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebApp {
    async fn start(answer: Answer) -> WebApp {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let unauthorized = Arc::new(Mutex::new(0));
        let (seen, refused) = (calls.clone(), unauthorized.clone());
        let handler = move |headers: HeaderMap, body: String| async move {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
            if auth != Some(&format!("Bearer {API_KEY}")) {
                *refused.lock() += 1;
                return (StatusCode::UNAUTHORIZED, String::new());
            }
            let request: serde_json::Value = serde_json::from_str(&body).unwrap();
            let jid = request["jid"].as_str().unwrap().to_owned();
            seen.lock().push(jid.clone());
            match answer {
                Answer::Password(password) => (
                    StatusCode::OK,
                    serde_json::json!({ "password": password }).to_string(),
                ),
                Answer::Attach {
                    bosh,
                    password,
                    resource,
                } => {
                    let bare = Jid::parse(&jid).unwrap();
                    let (full, sid, rid) = raw_login(&bosh, &bare, &password, resource).await;
                    (
                        StatusCode::OK,
                        serde_json::json!({"jid": full.to_string(), "sid": sid, "rid": rid})
                            .to_string(),
                    )
                }
                Answer::LoggedOut => (StatusCode::NOT_FOUND, String::new()),
            }
        };
        let app = axum::Router::new().route("/boshmux/relogin", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/boshmux/relogin", listener.local_addr().unwrap());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        WebApp {
            url,
            calls,
            unauthorized,
            task,
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().clone()
    }
}

impl Drop for WebApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hands `user` off by attach, the way a web app does for Strophe's `attach()`: it logs in
/// itself as `webapp` and gives the daemon jid, sid and rid. Returns the full JID and the token.
async fn attach_handoff(d: &Daemon, bosh: &str, user: &Jid, password: &str) -> (String, String) {
    let (full, sid, rid) = raw_login(bosh, user, password, "webapp").await;
    let (status, json) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": full.to_string(), "sid": sid, "rid": rid})),
        )
        .await;
    assert_eq!(status, 201, "{json}");
    (full.to_string(), json["token"].as_str().unwrap().to_owned())
}

/// A page of `user` that asked for status notices and went online.
async fn page_with_notices(d: &Daemon, local: &str, token: &str) -> Page {
    let mut page = d.page(local, token).await;
    let enable = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "notices")
        .with_child(Element::new("enable", ns::BOSHMUX_STATUS));
    assert_eq!(page.iq(enable).await.attr("type"), Some("result"));
    page.send(&Element::new("presence", ns::CLIENT)).await;
    page.sync().await;
    page
}

fn notice(state: &'static str) -> impl Fn(&Element) -> bool {
    move |e: &Element| {
        e.child("status", ns::BOSHMUX_STATUS)
            .is_some_and(|s| s.attr("state") == Some(state))
    }
}

/// The page learns of the loss and the restore (and is not closed: `next_where` fails on a
/// close); a contact that comes online afterwards reaches it with a message to the bare JID.
async fn page_keeps_working(p: &Server, page: &mut Page, user: &str, contact: &str, now: &str) {
    page.next_where(notice("reconnecting")).await;
    page.next_where(notice("restored")).await;
    let mut b = p.contact(contact, "other").await;
    // The contact sees the restored session online (presence restored by the daemon).
    loop {
        let s = next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("type").is_none() && s.attr("from") == Some(now) {
            break;
        }
    }
    let bare = format!("{user}@{}", p.domain);
    b.handle
        .send(chat(&bare, "after the re-login"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("after the re-login")
    );
}

both!(a_password_from_the_web_app_restores_an_attached_session);
async fn a_password_from_the_web_app_restores_an_attached_session(p: Server) {
    let (jid, pw) = p.user("g33a");
    let web = WebApp::start(Answer::Password(pw.clone())).await;
    let d = Daemon::start(&p.bosh, &p.domain, |c| {
        c.relogin_url = Some(web.url.clone())
    })
    .await;
    let (full, token) = attach_handoff(&d, &p.bosh, &jid, &pw).await;
    let mut page = page_with_notices(&d, "g33a", &token).await;
    assert_eq!(d.info("g33a@localhost").await["attached"], true);

    p.kill_session(&full);
    // Same resource asked for again by the daemon's own login.
    page_keeps_working(&p, &mut page, "g33a", "g33b", &full).await;
    assert_eq!(web.calls(), ["g33a@localhost"]);
    assert_eq!(*web.unauthorized.lock(), 0);
    assert_eq!(p.sessions_of(&jid), std::slice::from_ref(&full));
    let info = d.info("g33a@localhost").await;
    assert_eq!(
        (info["relogins"].as_u64(), &info["attached"]),
        (Some(1), &serde_json::json!(false))
    );

    // The password is now held: a second loss is restored without asking the web app.
    p.kill_session(&full);
    page.next_where(notice("reconnecting")).await;
    page.next_where(notice("restored")).await;
    assert_eq!(d.info("g33a@localhost").await["relogins"], 2);
    assert_eq!(web.calls(), ["g33a@localhost"], "one call in all");
    d.stop().await;
}

both!(an_attach_from_the_web_app_restores_an_attached_session);
async fn an_attach_from_the_web_app_restores_an_attached_session(p: Server) {
    let (jid, pw) = p.user("g34a");
    let web = WebApp::start(Answer::Attach {
        bosh: p.bosh.clone(),
        password: pw.clone(),
        resource: "webapp-again",
    })
    .await;
    let d = Daemon::start(&p.bosh, &p.domain, |c| {
        c.relogin_url = Some(web.url.clone())
    })
    .await;
    let (full, token) = attach_handoff(&d, &p.bosh, &jid, &pw).await;
    let mut page = page_with_notices(&d, "g34a", &token).await;

    p.kill_session(&full);
    let now = "g34a@localhost/webapp-again";
    page_keeps_working(&p, &mut page, "g34a", "g34b", now).await;
    assert_eq!(web.calls(), ["g34a@localhost"]);
    assert_eq!(*web.unauthorized.lock(), 0);
    assert_eq!(p.sessions_of(&jid), [now]);
    let info = d.info("g34a@localhost").await;
    assert_eq!(info["jid"], now);
    assert_eq!(info["attached"], true);
    d.stop().await;
}

both!(a_user_the_web_app_logged_out_gets_4001_and_the_token_dies);
async fn a_user_the_web_app_logged_out_gets_4001_and_the_token_dies(p: Server) {
    let (jid, pw) = p.user("g35a");
    let web = WebApp::start(Answer::LoggedOut).await;
    let d = Daemon::start(&p.bosh, &p.domain, |c| {
        c.relogin_url = Some(web.url.clone())
    })
    .await;
    let (full, token) = attach_handoff(&d, &p.bosh, &jid, &pw).await;
    let mut page = page_with_notices(&d, "g35a", &token).await;

    p.kill_session(&full);
    page.next_where(notice("reconnecting")).await;
    assert_eq!(page.closed().await.code, 4001);
    assert_eq!(web.calls(), ["g35a@localhost"]);
    let mut again = Page::open(&d, &[]).await.expect("upgrade");
    assert!(again.login_plain("g35a", &token).await.is_err());
    let (status, _) = d
        .api(
            reqwest::Method::GET,
            "/api/v1/sessions/g35a@localhost",
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert!(p.sessions_of(&jid).is_empty());
    d.stop().await;
}

/// Without `relogin_url` an attached session has nothing to log in again with: its loss closes
/// pages with 4004 (fake connection manager: the test, as the web app, ends the BOSH session it
/// handed off).
#[tokio::test]
async fn without_relogin_url_an_attached_session_lost_upstream_is_4004() {
    let fake = support::fake_with(&[("u0", "p0")]).await;
    let d = Daemon::start(&fake.url(), "example.test", |_| {}).await;
    let jid = Jid::parse("u0@example.test").unwrap();
    let (full, sid, rid) = raw_login(&fake.url(), &jid, "p0", "webapp").await;
    let (status, json) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": full.to_string(), "sid": sid, "rid": rid})),
        )
        .await;
    assert_eq!(status, 201, "{json}");
    let token = json["token"].as_str().unwrap().to_owned();
    let mut page = page_with_notices(&d, "u0", &token).await;

    // Someone ends the session upstream (here with a terminate on its sid, at a rid beyond any
    // the daemon will use).
    let terminate = Element::new("body", ns::HTTPBIND)
        .with_attr("rid", (rid + 1000).to_string())
        .with_attr("sid", sid)
        .with_attr("type", "terminate");
    reqwest::Client::new()
        .post(fake.url())
        .body(terminate.to_xml())
        .send()
        .await
        .unwrap();
    page.next_where(notice("lost")).await;
    assert_eq!(page.closed().await.code, 4004);
    let mut again = Page::open(&d, &[]).await.expect("upgrade");
    assert!(again.login_plain("u0", &token).await.is_err());
    d.stop().await;
}

both!(a_stored_session_found_dead_at_takeover_logs_in_again_through_the_web_app);
/// SPEC §8: a session that died upstream while no process drove it is logged in again through
/// `relogin_url` when that is set (the password never reached the store), and the token from
/// before the restart still leads to it.
async fn a_stored_session_found_dead_at_takeover_logs_in_again_through_the_web_app(p: Server) {
    let (jid, pw) = p.user("g36a");
    let full = format!("{jid}/boshmux");
    let web = WebApp::start(Answer::Password(pw.clone())).await;
    let store = boshmux::store::Store::memory();
    let url = web.url.clone();
    let tune = move |c: &mut boshmux::config::Config| c.relogin_url = Some(url.clone());
    let first = Daemon::start_with_store(&p.bosh, &p.domain, &store, tune.clone()).await;
    let h = first.handoff("g36a", &pw).await;
    let mut page = first.page("g36a", &h.token).await;
    first.stop().await;
    assert_eq!(page.closed().await.code, 1012);
    p.kill_session(&full);
    p.await_sessions(&jid, "the session to end upstream", LIMIT, |s| s.is_empty())
        .await;

    let second = Daemon::start_with_store(&p.bosh, &p.domain, &store, tune).await;
    support::eventually(
        "the web app to be asked and the login to finish",
        LIMIT,
        || async {
            let info = second.info("g36a@localhost").await;
            (info["relogins"] == 1 && info["upstream"] == "live").then_some(())
        },
    )
    .await;
    assert_eq!(web.calls(), ["g36a@localhost"]);
    assert_eq!(p.sessions_of(&jid), std::slice::from_ref(&full));
    let mut page = second.page("g36a", &h.token).await; // the token from before the restart
    page.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g36b", "b").await;
    loop {
        let s = next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("type").is_none() && s.attr("from") == Some(&full)
        {
            break;
        }
    }
    b.handle
        .send(chat(&jid.to_string(), "after the takeover"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("after the takeover")
    );
    second.stop().await;
}

both!(a_stop_while_a_session_logs_in_again_keeps_it_for_the_next_process);
/// SPEC §8: a graceful stop keeps every session. One that is logging in again at that moment
/// (the XMPP server dropped it an instant before, e.g. a server restart just ahead of the
/// daemon's) must not be thrown away with its tokens: the next process finds it dead and logs
/// it in again through the web app, as it would after a `kill -9`.
async fn a_stop_while_a_session_logs_in_again_keeps_it_for_the_next_process(p: Server) {
    let (jid, pw) = p.user("g73a");
    let full = format!("{jid}/boshmux");
    let web = WebApp::start(Answer::Password(pw.clone())).await;
    let store = boshmux::store::Store::memory();
    let url = web.url.clone();
    let tune = move |c: &mut boshmux::config::Config| c.relogin_url = Some(url.clone());
    let first = Daemon::start_with_store(&p.bosh, &p.domain, &store, tune.clone()).await;
    let h = first.handoff("g73a", &pw).await;
    let mut page = first.page("g73a", &h.token).await;
    p.kill_session(&full);
    let bare = jid.to_string();
    support::eventually("the session to be logging in again", LIMIT, || async {
        (first.info(&bare).await["upstream"] == "reconnecting").then_some(())
    })
    .await;
    first.stop().await;
    assert_eq!(page.closed().await.code, 1012, "told to reconnect");

    let second = Daemon::start_with_store(&p.bosh, &p.domain, &store, tune).await;
    let mut again = Page::open(&second, &[]).await.unwrap();
    let bound = again.login_plain("g73a", &h.token).await;
    assert_eq!(
        bound.as_deref(),
        Ok(full.as_str()),
        "the page told to reconnect comes back to its session"
    );
    second.stop().await;
}
