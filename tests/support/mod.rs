//! Shared test support: the XMPP servers started by `scripts/test` (Prosody and ejabberd), and
//! small waiting helpers.
#![allow(dead_code, unreachable_pub, unused_macros, unused_imports)] // each test binary uses a different part of this module

pub mod bosh_page;
pub mod cluster;
pub mod daemon;
pub mod fuzz;
pub mod node;
pub mod process;

use std::future::Future;
use std::process::Command;
use std::time::Duration;

use boshmux::bosh::{
    Body, BoshClient, BoshConfig, BoshError, BoshEvent, BoshSession, SessionParams, Timeouts,
};
use boshmux::store::{Store, Write};
use boshmux::xmpp::{Element, Jid, ns};

/// Which XMPP server a [`Server`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Prosody 0.12 (scripts/prosody.sh).
    Prosody,
    /// ejabberd 23.01 (scripts/ejabberd.sh).
    Ejabberd,
}

/// One of the XMPP servers that `scripts/test` runs for this test run (both serve the same
/// accounts: groups of four mutual contacts `g01a` … with password `pw-` + name).
pub struct Server {
    /// Which server this is.
    pub kind: Kind,
    /// Its BOSH URL.
    pub bosh: String,
    /// Its XMPP-over-WebSocket URL.
    pub ws: String,
    /// Its virtual host.
    pub domain: String,
    /// Its MUC service.
    pub muc: String,
    /// Prosody: its config file (for `prosodyctl --config … shell`); ejabberd: the private
    /// `ejabberdctl` of the test node.
    pub admin: String,
}

/// The name the tests written for Prosody alone use; every such test body runs on any [`Server`].
pub type Prosody = Server;

fn server_var(server: &str, name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: tests that need {server} run through scripts/test, which starts one"
        )
    })
}

/// The test Prosody. Panics (failing the test) when the run was not started by `scripts/test`:
/// a server test never passes by skipping.
pub fn prosody() -> Server {
    let var = |name: &str| server_var("Prosody", name);
    Server {
        kind: Kind::Prosody,
        bosh: var("BOSHMUX_TEST_PROSODY_BOSH"),
        ws: var("BOSHMUX_TEST_PROSODY_WS"),
        domain: var("BOSHMUX_TEST_PROSODY_DOMAIN"),
        muc: var("BOSHMUX_TEST_PROSODY_MUC"),
        admin: var("BOSHMUX_TEST_PROSODY_CONFIG"),
    }
}

/// The test ejabberd. Panics (failing the test) when the run was not started by `scripts/test`.
pub fn ejabberd() -> Server {
    let var = |name: &str| server_var("ejabberd", name);
    Server {
        kind: Kind::Ejabberd,
        bosh: var("BOSHMUX_TEST_EJABBERD_BOSH"),
        ws: var("BOSHMUX_TEST_EJABBERD_WS"),
        domain: var("BOSHMUX_TEST_EJABBERD_DOMAIN"),
        muc: var("BOSHMUX_TEST_EJABBERD_MUC"),
        admin: var("BOSHMUX_TEST_EJABBERD_CTL"),
    }
}

/// Runs the test body `async fn $name(p: Server)` once per server, as the tests
/// `$name::prosody` and `$name::ejabberd` (a failure names the server). Write it right above the
/// body: `both!(a_case); async fn a_case(p: Server) { … }`.
///
/// The runtime has two worker threads: the bodies call the servers' admin tools synchronously
/// (`ejabberdctl` takes ~0.3 s), which must not stall the BOSH client's tasks meanwhile.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn prosody() {
                super::$name(crate::support::prosody()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ejabberd() {
                super::$name(crate::support::ejabberd()).await
            }
        }
    };
}
pub(crate) use both;

impl Server {
    /// True for Prosody.
    pub fn is_prosody(&self) -> bool {
        self.kind == Kind::Prosody
    }

    /// User `name` of the test accounts (e.g. `g01a`) and its password.
    pub fn user(&self, name: &str) -> (Jid, String) {
        (
            Jid::parse(&format!("{name}@{}", self.domain)).unwrap(),
            format!("pw-{name}"),
        )
    }

    /// A BOSH client configuration for this server with tight timeouts, except for the margin
    /// after `wait`: ejabberd crashes a session when a rid it still holds arrives again, so a held
    /// request is given up only once the server has surely answered it (a loaded test machine
    /// can be seconds late).
    pub fn bosh_config(&self) -> BoshConfig {
        let mut cfg = BoshConfig::new(self.bosh.clone());
        cfg.timeouts = Timeouts {
            margin: Duration::from_secs(5),
            ..Timeouts::tight()
        };
        cfg.wait = 10;
        cfg
    }

    /// Runs one Prosody admin shell command and returns its output.
    pub fn shell(&self, command: &str) -> String {
        assert!(
            self.is_prosody(),
            "shell({command:?}) is Prosody's admin shell"
        );
        let out = Command::new("prosodyctl")
            .args(["--config", &self.admin, "shell", command])
            .output()
            .expect("run prosodyctl");
        assert!(
            out.status.success(),
            "prosodyctl shell {command:?} failed: {out:?}"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs one command of the test ejabberd's `ejabberdctl` (each call boots an Erlang VM:
    /// ~0.3 s, so never poll with it in a tight loop) and returns its output.
    pub fn ejabberdctl(&self, args: &[&str]) -> String {
        assert!(!self.is_prosody(), "ejabberdctl {args:?} is ejabberd's");
        let out = Command::new(&self.admin)
            .args(args)
            .output()
            .expect("run ejabberdctl");
        assert!(out.status.success(), "ejabberdctl {args:?} failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Another account of the test server, logged in directly over BOSH as `resource` and online.
    pub async fn contact(&self, user: &str, resource: &str) -> boshmux::bosh::BoshSession {
        let (jid, pw) = self.user(user);
        let mut s = login(
            &boshmux::bosh::BoshClient::new(self.bosh_config()).unwrap(),
            &jid,
            &pw,
            Some(resource),
        )
        .await
        .unwrap();
        go_online(&mut s, Duration::from_secs(15)).await;
        s
    }

    /// Full JIDs of the live client sessions of user `bare`, as the server's admin interface lists
    /// them (Prosody: `c2s:show()`; ejabberd: `connected_users`).
    pub fn sessions_of(&self, bare: &Jid) -> Vec<String> {
        let prefix = format!("{bare}/");
        let mut jids: Vec<String> = match self.kind {
            Kind::Prosody => self
                .shell("c2s:show()")
                .lines()
                .filter_map(|l| l.split('|').nth(1).map(str::trim))
                .filter(|jid| jid.starts_with(&prefix))
                .map(str::to_owned)
                .collect(),
            Kind::Ejabberd => self
                .ejabberdctl(&["connected_users"])
                .lines()
                .map(str::trim)
                .filter(|jid| jid.starts_with(&prefix))
                .map(str::to_owned)
                .collect(),
        };
        jids.sort();
        jids
    }

    /// How long to wait between two looks at this server's session list: `ejabberdctl` boots an
    /// Erlang VM for each call (~0.3 s of CPU), so ejabberd is asked once a second; Prosody's
    /// admin shell is cheap enough for the 50 ms of [`eventually`].
    pub fn admin_poll(&self) -> Duration {
        match self.kind {
            Kind::Prosody => POLL,
            Kind::Ejabberd => Duration::from_secs(1),
        }
    }

    /// Waits until the full JIDs of `bare`'s live sessions ([`sessions_of`](Self::sessions_of))
    /// satisfy `want`, looking every [`admin_poll`](Self::admin_poll); fails the test after
    /// `limit`, naming `what` and the last list seen.
    pub async fn await_sessions(
        &self,
        bare: &Jid,
        what: &str,
        limit: Duration,
        want: impl Fn(&[String]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let sessions = self.sessions_of(bare);
            if want(&sessions) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what} on {:?}: sessions of {bare}: {sessions:?}",
                self.kind
            );
            tokio::time::sleep(self.admin_poll()).await;
        }
    }

    /// Ends the client session of `full` from the server side, as an administrator would
    /// (Prosody: `c2s:close`; ejabberd: `kick_user`).
    pub fn kill_session(&self, full: &str) {
        match self.kind {
            Kind::Prosody => {
                self.shell(&format!("c2s:close('{full}')"));
            }
            Kind::Ejabberd => {
                // `kick_user` (every session of the user: the tests have one), not
                // `kick_session`: the latter ends the stream with `conflict`, which a client must
                // take as "another login took this resource" and not log in again.
                let jid = Jid::parse(full).unwrap();
                assert!(jid.resource().is_some(), "{full} is not a full JID");
                let user = jid.local().expect("a user's JID").to_owned();
                self.ejabberdctl(&["kick_user", &user, jid.domain()]);
            }
        }
    }
}

/// The pause between two checks of [`eventually`].
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Some`, for conditions no event announces (another process's
/// state). Fails the test after `limit`. (A server's session list: [`Server::await_sessions`],
/// which polls ejabberd more slowly.)
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The next event, failing the test if none comes within `limit`.
pub async fn next_event(
    events: &mut tokio::sync::mpsc::Receiver<BoshEvent>,
    limit: Duration,
) -> BoshEvent {
    tokio::time::timeout(limit, events.recv())
        .await
        .expect("timed out waiting for a session event")
        .expect("event stream ended without Ended")
}

/// A session logged in directly (no daemon) with nothing kept to resume from, its events as
/// [`one_by_one`] makes them.
pub async fn login(
    client: &BoshClient,
    jid: &Jid,
    password: &str,
    resource: Option<&str>,
) -> Result<BoshSession, BoshError> {
    let s = client
        .login(jid, password, resource, &Store::none())
        .await?;
    Ok(one_by_one(s))
}

/// `s` with its events passed through an owner that takes every response in as it comes: it
/// splits each [`BoshEvent::Response`] into one event per stanza (empty ones dropped), for
/// [`next_stanza`], and then writes the `HandedOn` mark to the session's store and confirms it
/// (SPEC §8). The owner stops when the returned session's events are dropped.
pub fn one_by_one(mut s: BoshSession) -> BoshSession {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let mut source = std::mem::replace(&mut s.events, rx);
    let handle = s.handle.clone();
    let store = s.store.clone();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                e = source.recv() => e,
                () = tx.closed() => return,
            };
            match event {
                None => return,
                Some(BoshEvent::Response { rid, stanzas }) => {
                    for stanza in stanzas {
                        let one = BoshEvent::Response {
                            rid,
                            stanzas: vec![stanza],
                        };
                        if tx.send(one).await.is_err() {
                            return;
                        }
                    }
                    let _ = store.write(Write::HandedOn { rid, caches: None }).await;
                    handle.handed_on(rid);
                }
                Some(other) => {
                    if tx.send(other).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    s
}

/// The next stanza, skipping retry notices; fails on the end of the session. The events must
/// come one stanza per event ([`one_by_one`]).
pub async fn next_stanza(
    events: &mut tokio::sync::mpsc::Receiver<BoshEvent>,
    limit: Duration,
) -> Element {
    loop {
        match next_event(events, limit).await {
            BoshEvent::Response { mut stanzas, .. } => {
                assert!(
                    stanzas.len() <= 1,
                    "events not split: see support::one_by_one"
                );
                if let Some(s) = stanzas.pop() {
                    return s;
                }
            }
            BoshEvent::Ended(e) => panic!("session ended while waiting for a stanza: {e:?}"),
            _ => {}
        }
    }
}

/// A chat message with `body` to `to`.
/// A MUC join of `room` as `nick` asking for no history (XEP-0045 §7.2).
pub fn muc_join(room: &str, nick: &str) -> Element {
    Element::new("presence", ns::CLIENT)
        .with_attr("to", format!("{room}/{nick}"))
        .with_child(
            Element::new("x", ns::MUC)
                .with_child(Element::new("history", ns::MUC).with_attr("maxchars", "0")),
        )
}

/// Whether `e` is a room's presence about ourselves (status 110).
pub fn is_self_presence(e: &Element) -> bool {
    e.is("presence", ns::CLIENT)
        && e.child("x", ns::MUC_USER).is_some_and(|x| {
            x.elements()
                .any(|s| s.name == "status" && s.attr("code") == Some("110"))
        })
}

pub fn chat(to: &str, body: &str) -> Element {
    Element::new("message", ns::CLIENT)
        .with_attr("to", to)
        .with_attr("type", "chat")
        .with_child(Element::new("body", ns::CLIENT).with_text(body))
}

/// The `<body/>` text of a message.
pub fn body_text(message: &Element) -> Option<String> {
    message.child("body", ns::CLIENT).map(Element::text)
}

/// The next `<message/>`, skipping other stanzas (presence from contacts, …).
pub async fn next_message(
    events: &mut tokio::sync::mpsc::Receiver<BoshEvent>,
    limit: Duration,
) -> Element {
    loop {
        let s = next_stanza(events, limit).await;
        if s.is("message", ns::CLIENT) {
            return s;
        }
    }
}

/// Initial presence, which makes a session available for messages to the bare JID.
pub fn available() -> Element {
    Element::new("presence", ns::CLIENT)
}

/// Sends initial presence and waits for the server to reflect it back: from then on messages to
/// the bare JID reach this session.
pub async fn go_online(session: &mut boshmux::bosh::BoshSession, limit: Duration) {
    session.handle.send(available()).await.unwrap();
    let me = session.jid.to_string();
    loop {
        let s = next_stanza(&mut session.events, limit).await;
        if s.is("presence", ns::CLIENT) && s.attr("from") == Some(me.as_str()) {
            return;
        }
    }
}

/// Logs in with plain HTTP requests, the way a web app's own code hands a session to Strophe's
/// `attach()`. Returns the full JID, sid and the next rid.
pub async fn raw_login(url: &str, jid: &Jid, password: &str, resource: &str) -> (Jid, String, u64) {
    let http = reqwest::Client::new();
    let post = |body: Body| {
        let http = http.clone();
        async move {
            let raw = http
                .post(url)
                .body(body.to_bytes())
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            Body::parse(&raw).unwrap()
        }
    };
    let mut rid = 777_000;
    let created = post(Body::create(rid, jid.domain(), 10, "en")).await;
    let sid = SessionParams::from_body(&created).unwrap().sid;
    rid += 1;
    let plain = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("\0{}\0{password}", jid.local().unwrap()),
    );
    let auth = Element::new("auth", ns::SASL)
        .with_attr("mechanism", "PLAIN")
        .with_text(plain);
    let answer = post(Body::request(rid, &sid, [auth])).await;
    assert!(
        answer.children().any(|c| c.is("success", ns::SASL)),
        "{answer:?}"
    );
    rid += 1;
    post(Body::restart(rid, &sid, jid.domain(), "en")).await;
    rid += 1;
    let bind = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "b1")
        .with_child(
            Element::new("bind", ns::BIND)
                .with_child(Element::new("resource", ns::BIND).with_text(resource)),
        );
    let answer = post(Body::request(rid, &sid, [bind])).await;
    let bound = answer
        .children()
        .find_map(|c| {
            c.child("bind", ns::BIND)?
                .child("jid", ns::BIND)
                .map(Element::text)
        })
        .expect("bind result");
    rid += 1;
    (Jid::parse(&bound).unwrap(), sid, rid)
}

/// The fake connection manager with these accounts (localpart, password), in automatic mode.
pub async fn fake_with(users: &[(&str, &str)]) -> boshmux::fake_cm::FakeCm {
    boshmux::fake_cm::FakeCm::start(boshmux::fake_cm::FakeCmConfig {
        users: users
            .iter()
            .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
            .collect(),
        ..boshmux::fake_cm::FakeCmConfig::default()
    })
    .await
    .unwrap()
}
