//! SPEC §12 with daemons as real processes on one Redis, against the real servers, talking to
//! each node directly (the balancer's part is in tests/cluster.rs): one upstream session per
//! user whichever node a page or a hand-off lands on; the owner's `kill -9` costs no login and
//! no message; a frozen owner that wakes after another node adopted its session sends nothing
//! more upstream and hands nothing to pages; a graceful stop hands sessions over.
//!
//! Redis databases 5–12 and 16–17 of the test Redis (scripts/redis.sh), one per test and server, emptied
//! first, and a private `redis-server` for the test that stops Redis. Accounts: groups g46,
//! g47, g48, g49, g79, g39.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use boshmux::xmpp::{Element, ns};
use support::daemon::Page;
use support::process::{DaemonProcess, sees_available, store_dir};
use support::{Server, body_text, both, chat, eventually};

const LIMIT: Duration = Duration::from_secs(20);

/// A fresh database `db` of the test Redis (emptied), as a store URL.
async fn redis_db(p: &Server, db: u32) -> String {
    let url = std::env::var("BOSHMUX_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("BOSHMUX_TEST_REDIS_URL is not set: tests that need Redis run through scripts/test")
    });
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let db = if p.is_prosody() { db } else { db + 1 };
    let url = format!("{base}/{db}");
    let mut c = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
    url
}

/// Starts node `name` on the store `url` with a 2 s lease.
async fn node(p: &Server, url: &str, name: &str) -> DaemonProcess {
    DaemonProcess::start(
        p,
        &store_dir("cluster"),
        &[
            ("BOSHMUX_STORE", url),
            ("BOSHMUX_NODE_ID", name),
            ("BOSHMUX_LEASE", "2s"),
        ],
    )
    .await
}

/// A page of `user` on `d`, retried while the session moves between nodes (close 1012, or a
/// refused login while no node drives it yet), as a client reconnecting with backoff would.
async fn page_when_ready(d: &DaemonProcess, user: &str, token: &str) -> Page {
    eventually("a page binds", LIMIT, || async {
        let mut page = Page::open(&d.daemon, &[]).await.ok()?;
        page.login_plain(user, token).await.ok()?;
        Some(page)
    })
    .await
}

/// Message bodies `page` gets until it has waited `quiet` without one.
async fn bodies_until_quiet(page: &mut Page, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(Ok(text)) = page.next_text(quiet).await {
        if let Some(b) = support::process::message_body(&text) {
            out.push(b);
        }
    }
    out
}

/// Asserts that the contact got no unavailable presence from `a` so far.
fn no_offline_flap(b: &mut boshmux::bosh::BoshSession, a: &boshmux::xmpp::Jid) {
    while let Ok(event) = b.events.try_recv() {
        if let boshmux::bosh::BoshEvent::Response { stanzas, .. } = event {
            for s in stanzas {
                let from_a = s
                    .attr("from")
                    .and_then(|f| boshmux::xmpp::Jid::parse(f).ok())
                    .is_some_and(|f| f.to_bare() == *a);
                assert!(
                    !(from_a
                        && s.is("presence", ns::CLIENT)
                        && s.attr("type") == Some("unavailable")),
                    "the contact saw {s}"
                );
            }
        }
    }
}

both!(pages_on_every_node_share_one_upstream_session);
async fn pages_on_every_node_share_one_upstream_session(p: Server) {
    let url = redis_db(&p, 5).await;
    let (a, _) = p.user("g46a");
    let a_full = format!("{a}/boshmux");
    let (b_jid, _) = p.user("g46b");
    let n1 = node(&p, &url, "n1").await;
    let n2 = node(&p, &url, "n2").await;
    let n3 = node(&p, &url, "n3").await;

    let h = n1.daemon.handoff("g46a", "pw-g46a").await;
    assert_eq!(h.status, 201);
    // The same user handed off on other nodes: the owner's session, no second login.
    let again = n2.daemon.handoff("g46a", "pw-g46a").await;
    assert_eq!((again.status, again.jid.as_str()), (200, a_full.as_str()));
    let info = n3.daemon.info(&a.to_string()).await;
    assert_eq!(info["node"], "n1", "the API names the owner: {info}");

    // One page per node, the token of one node's hand-off working on every node.
    let mut pages = Vec::new();
    for d in [&n1, &n2, &n3] {
        let mut page = d.daemon.page("g46a", &again.token).await;
        pages.push((d.daemon.url(""), {
            page.sync().await;
            page
        }));
    }
    pages[2].1.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g46b", "b").await;
    sees_available(&mut b, &a_full).await;
    assert_eq!(
        p.sessions_of(&a),
        std::slice::from_ref(&a_full),
        "one session upstream"
    );

    // A contact's message reaches every page once.
    b.handle.send(chat(&a.to_string(), "to all")).await.unwrap();
    for (node, page) in &mut pages {
        let m = page.next_message().await;
        assert_eq!(body_text(&m).as_deref(), Some("to all"), "page on {node}");
    }
    // A page on a relayed node sends: the contact gets it, the other pages get a carbon.
    pages[2]
        .1
        .send(&chat(&b_jid.to_string(), "from the third node"))
        .await;
    let got = support::next_message(&mut b.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("from the third node"));
    for (node, page) in &mut pages[..2] {
        let carbon = page
            .next_where(|e| e.child("sent", ns::CARBONS).is_some())
            .await;
        assert!(
            carbon.to_xml().contains("from the third node"),
            "carbon on {node}"
        );
    }
    // An iq from a relayed page is answered to that page only.
    let answer = pages[1]
        .1
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", "roster-n2")
            .with_child(Element::new("query", "jabber:iq:roster")))
        .await;
    assert_eq!(answer.attr("type"), Some("result"), "{}", answer.to_xml());
    assert_eq!(
        p.sessions_of(&a),
        std::slice::from_ref(&a_full),
        "still one session"
    );
    // Per-node and cluster figures.
    assert_eq!(n1.counter("boshmux_cluster_relayed_pages").await, 0);
    assert_eq!(n2.counter("boshmux_cluster_relayed_pages").await, 1);
    assert_eq!(n3.counter("boshmux_cluster_nodes").await, 3);
    assert_eq!(n3.counter("boshmux_cluster_sessions{node=\"n1\"}").await, 1);
    assert_eq!(n3.counter("boshmux_cluster_sessions{node=\"n3\"}").await, 0);
    assert_eq!(n1.counter("boshmux_cluster_forwarded_total").await, 0);
    assert!(
        n2.counter("boshmux_cluster_forwarded_total").await >= 1,
        "n2 forwarded the hand-off"
    );
    assert_eq!(
        n2.counter("boshmux_logins_total").await,
        0,
        "n2 never logged in"
    );
    assert_eq!(
        n3.counter("boshmux_logins_total").await,
        0,
        "n3 never logged in"
    );
}

both!(the_owners_kill_9_costs_no_login_no_flap_and_no_message);
async fn the_owners_kill_9_costs_no_login_no_flap_and_no_message(p: Server) {
    let url = redis_db(&p, 7).await;
    let (a, _) = p.user("g47a");
    let a_full = format!("{a}/boshmux");
    let n1 = node(&p, &url, "n1").await;
    let n2 = node(&p, &url, "n2").await;
    let n3 = node(&p, &url, "n3").await;
    let h = n1.daemon.handoff("g47a", "pw-g47a").await;
    let mut on2 = n2.daemon.page("g47a", &h.token).await;
    let mut on3 = n3.daemon.page("g47a", &h.token).await;
    on2.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g47b", "b").await;
    sees_available(&mut b, &a_full).await;

    // The contact sends a numbered message every 250 ms throughout.
    let total = 40;
    let to = a.to_string();
    let sender = tokio::spawn(async move {
        for i in 0..total {
            b.handle.send(chat(&to, &format!("m{i}"))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        b
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut n1 = n1;
    n1.kill9().await;
    let killed_at = tokio::time::Instant::now();

    // Each page reads until its link breaks, then reconnects through a surviving node.
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut back_within = Vec::new();
    for (name, page, d) in [("n2", &mut on2, &n2), ("n3", &mut on3, &n3)] {
        let mut bodies = Vec::new();
        loop {
            match page.next_text(LIMIT).await {
                Some(Ok(text)) => bodies.extend(support::process::message_body(&text)),
                Some(Err(closed)) => {
                    assert_eq!(closed.code, 1012, "page on {name} told to reconnect");
                    break;
                }
                None => panic!("page on {name} never heard of the owner's death"),
            }
        }
        *page = page_when_ready(d, "g47a", &h.token).await;
        back_within.push(killed_at.elapsed());
        seen.insert(name, bodies);
    }
    let mut b = sender.await.unwrap();
    for (name, page) in [("n2", &mut on2), ("n3", &mut on3)] {
        seen.get_mut(name)
            .unwrap()
            .extend(bodies_until_quiet(page, Duration::from_secs(3)).await);
    }
    for (name, bodies) in &seen {
        let unique: HashSet<&String> = bodies.iter().collect();
        assert_eq!(
            unique.len(),
            bodies.len(),
            "page on {name} got a message twice: {bodies:?}"
        );
    }
    let all: HashSet<&String> = seen.values().flatten().collect();
    let missing: Vec<String> = (0..total)
        .map(|i| format!("m{i}"))
        .filter(|m| !all.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "never reached a page: {missing:?}; seen {seen:?}"
    );
    eprintln!(
        "pages working again {back_within:?} after the kill; bodies per page: {:?}",
        seen.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>()
    );
    for t in &back_within {
        assert!(
            *t < Duration::from_secs(5),
            "a page worked again only after {t:?}"
        );
    }
    // The contact saw no offline flap, and the server the same single session.
    no_offline_flap(&mut b, &a);
    assert_eq!(p.sessions_of(&a), std::slice::from_ref(&a_full));
    assert_eq!(n2.counter("boshmux_logins_total").await, 0);
    assert_eq!(n3.counter("boshmux_logins_total").await, 0);
    assert_eq!(
        n2.counter("boshmux_cluster_adoptions_total").await
            + n3.counter("boshmux_cluster_adoptions_total").await,
        1,
        "one survivor adopted the session"
    );
    // Messages flow after the failover, both ways.
    on3.send(&chat(&p.user("g47b").0.to_string(), "after"))
        .await;
    let got = support::next_message(&mut b.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("after"));
}

/// The session's owner as the API of `d` names it, asked with a short time limit (a request
/// forwarded to a frozen owner would wait for it).
async fn owner_via(d: &DaemonProcess, bare: &str) -> Option<String> {
    let path = format!("/api/v1/sessions/{bare}");
    let call = d.daemon.api(reqwest::Method::GET, &path, None);
    let (status, json) = tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .ok()?;
    (status == 200).then(|| json["node"].as_str().unwrap_or_default().to_owned())
}

both!(a_frozen_owner_wakes_fenced_and_sends_nothing);
async fn a_frozen_owner_wakes_fenced_and_sends_nothing(p: Server) {
    let url = redis_db(&p, 9).await;
    let (a, _) = p.user("g48a");
    let a_full = format!("{a}/boshmux");
    let n1 = node(&p, &url, "n1").await;
    let n2 = node(&p, &url, "n2").await;
    let h = n1.daemon.handoff("g48a", "pw-g48a").await;
    let mut on1 = n1.daemon.page("g48a", &h.token).await;
    let mut on2 = n2.daemon.page("g48a", &h.token).await;
    on2.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g48b", "b").await;
    sees_available(&mut b, &a_full).await;
    on1.sync().await;

    let posts_before = n1.counter("boshmux_upstream_posts_total").await;
    n1.signal("STOP");
    // Frozen for longer than its lease: n2 adopts, and the relayed page follows the session.
    for i in 0..4 {
        b.handle
            .send(chat(&a.to_string(), &format!("frozen {i}")))
            .await
            .unwrap();
    }
    eventually("n2 adopts the session", LIMIT, || async {
        (owner_via(&n2, &a.to_string()).await.as_deref() == Some("n2")).then_some(())
    })
    .await;
    match on2.next_text(LIMIT).await {
        Some(Err(closed)) => assert_eq!(closed.code, 1012, "the relayed page reconnects"),
        other => {
            // It may have got the first frames before the freeze was noticed; then the close.
            assert!(matches!(other, Some(Ok(_))), "{other:?}");
            loop {
                match on2.next_text(LIMIT).await {
                    Some(Ok(_)) => {}
                    Some(Err(closed)) => {
                        assert_eq!(closed.code, 1012);
                        break;
                    }
                    None => panic!("the relayed page was left waiting on a frozen owner"),
                }
            }
        }
    }
    let mut back = page_when_ready(&n2, "g48a", &h.token).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = back.next_message().await;
        got.push(body_text(&m).unwrap_or_default());
    }
    got.sort();
    assert_eq!(got, ["frozen 0", "frozen 1", "frozen 2", "frozen 3"]);

    // Woken: it lets the session go without a word upstream or to its page.
    n1.signal("CONT");
    let mut after_wake = Vec::new();
    loop {
        match on1.next_text(LIMIT).await {
            Some(Ok(text)) => after_wake.extend(support::process::message_body(&text)),
            Some(Err(closed)) => {
                assert_eq!(closed.code, 1012, "the woken node's page reconnects");
                break;
            }
            None => panic!("the woken node kept its page"),
        }
    }
    assert!(
        after_wake.iter().all(|b| !b.starts_with("frozen")),
        "the woken node handed its page what the new owner delivers: {after_wake:?}"
    );
    b.handle
        .send(chat(&a.to_string(), "after the wake"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&back.next_message().await).as_deref(),
        Some("after the wake")
    );
    assert_eq!(
        n1.counter("boshmux_upstream_posts_total").await,
        posts_before,
        "the woken node posted upstream"
    );
    assert_eq!(
        p.sessions_of(&a),
        std::slice::from_ref(&a_full),
        "one session, the same"
    );
    assert_eq!(n2.counter("boshmux_logins_total").await, 0);
    no_offline_flap(&mut b, &a);
}

both!(a_graceful_stop_hands_sessions_over_and_redis_emptied_costs_nothing);
async fn a_graceful_stop_hands_sessions_over_and_redis_emptied_costs_nothing(p: Server) {
    let url = redis_db(&p, 11).await;
    let (a, _) = p.user("g49a");
    let a_full = format!("{a}/boshmux");
    let mut n1 = node(&p, &url, "n1").await;
    let n2 = node(&p, &url, "n2").await;
    let h = n1.daemon.handoff("g49a", "pw-g49a").await;
    let mut on1 = n1.daemon.page("g49a", &h.token).await;
    on1.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g49b", "b").await;
    sees_available(&mut b, &a_full).await;

    // Graceful stop of the owner: its page is told to reconnect, n2 takes the session at once.
    let stopped_at = tokio::time::Instant::now();
    n1.term();
    assert_eq!(on1.closed().await.code, 1012);
    assert!(n1.wait_exit().await.success());
    let mut on2 = page_when_ready(&n2, "g49a", &h.token).await;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(2),
        "handed over in {:?}: faster than a lease",
        stopped_at.elapsed()
    );
    assert_eq!(owner_via(&n2, &a.to_string()).await.as_deref(), Some("n2"));
    b.handle
        .send(chat(&a.to_string(), "handed over"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&on2.next_message().await).as_deref(),
        Some("handed over")
    );

    // Redis restarted empty: the session carries on, and is written back by its owner.
    let mut c = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
    b.handle
        .send(chat(&a.to_string(), "store emptied"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&on2.next_message().await).as_deref(),
        Some("store emptied")
    );
    eventually("the owner writes the session back", LIMIT, || async {
        let mut c = c.clone();
        let owner: Option<String> = redis::cmd("HGET")
            .arg(format!("boshmux:session:{a}"))
            .arg("owner")
            .query_async(&mut c)
            .await
            .ok()?;
        owner.filter(|o| o.starts_with("n2#"))
    })
    .await;
    // The token works on a node started after the loss (it was written back too).
    let n3 = node(&p, &url, "n3").await;
    let mut on3 = n3.daemon.page("g49a", &h.token).await;
    on3.sync().await;
    b.handle
        .send(chat(&a.to_string(), "to both"))
        .await
        .unwrap();
    for page in [&mut on2, &mut on3] {
        assert_eq!(
            body_text(&page.next_message().await).as_deref(),
            Some("to both")
        );
    }
    assert_eq!(p.sessions_of(&a), std::slice::from_ref(&a_full));
    assert_eq!(n2.counter("boshmux_logins_total").await, 0);
    no_offline_flap(&mut b, &a);
}

/// A private `redis-server` on `port` with nothing persisted, stopped when dropped.
fn own_redis(port: u16) -> tokio::process::Child {
    let dir = std::env::temp_dir().join(format!("boshmux-redis-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server runs (scripts/redis.sh installs it)")
}

async fn redis_up(url: &str) {
    eventually("the private Redis answers", LIMIT, || async {
        let c = redis::Client::open(url).ok()?;
        let mut c = c.get_multiplexed_async_connection().await.ok()?;
        let pong: String = redis::cmd("PING").query_async(&mut c).await.ok()?;
        (pong == "PONG").then_some(())
    })
    .await;
}

both!(redis_out_of_reach_then_back_empty_costs_no_session);
async fn redis_out_of_reach_then_back_empty_costs_no_session(p: Server) {
    let port = support::process::free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut redis_server = own_redis(port);
    redis_up(&url).await;
    let (a, _) = p.user("g79a");
    let a_full = format!("{a}/boshmux");
    let n1 = node(&p, &url, "n1").await;
    let n2 = node(&p, &url, "n2").await;
    let h = n1.daemon.handoff("g79a", "pw-g79a").await;
    let mut on1 = n1.daemon.page("g79a", &h.token).await;
    let mut on2 = n2.daemon.page("g79a", &h.token).await;
    on1.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g79b", "b").await;
    sees_available(&mut b, &a_full).await;
    on2.sync().await;

    // Redis gone: the session carries on, pages on both nodes get what the contact sends.
    redis_server.kill().await.unwrap();
    b.handle
        .send(chat(&a.to_string(), "no redis"))
        .await
        .unwrap();
    for page in [&mut on1, &mut on2] {
        assert_eq!(
            body_text(&page.next_message().await).as_deref(),
            Some("no redis")
        );
    }
    // A hand-off of a new user is refused with 503; the running user's on its owner still works.
    let (status, json) = n2
        .daemon
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": p.user("g79c").0.to_string(), "password": "pw-g79c"})),
        )
        .await;
    assert_eq!(status, 503, "{json}");
    assert_eq!(n1.daemon.handoff("g79a", "pw-g79a").await.status, 200);
    assert!(
        n1.counter("boshmux_store_errors_total").await > 0,
        "the metrics say so"
    );

    // Redis back, empty: the owner writes the session back; a new node serves its pages.
    let _redis_server = own_redis(port);
    redis_up(&url).await;
    let n3 = node(&p, &url, "n3").await;
    let mut on3 = page_when_ready(&n3, "g79a", &h.token).await;
    on3.sync().await;
    b.handle
        .send(chat(&a.to_string(), "redis back"))
        .await
        .unwrap();
    for page in [&mut on1, &mut on3] {
        assert_eq!(
            body_text(&page.next_message().await).as_deref(),
            Some("redis back")
        );
    }
    assert_eq!(owner_via(&n3, &a.to_string()).await.as_deref(), Some("n1"));
    assert_eq!(p.sessions_of(&a), std::slice::from_ref(&a_full));
    assert_eq!(
        n1.counter("boshmux_logins_total").await,
        1,
        "the first login only"
    );
    no_offline_flap(&mut b, &a);
}

both!(a_prebound_bosh_page_works_through_any_node);
async fn a_prebound_bosh_page_works_through_any_node(p: Server) {
    use support::bosh_page::BoshPage;
    let url = redis_db(&p, 16).await;
    let (a, _) = p.user("g39a");
    let n1 = node(&p, &url, "n1").await;
    let n2 = node(&p, &url, "n2").await;
    let n3 = node(&p, &url, "n3").await;
    n1.daemon.handoff("g39a", "pw-g39a").await;
    // The web app asks n2 for a prebind: it is made on the owner, n1.
    let (status, json) = n2
        .daemon
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/sessions/{a}/prebind"),
            None,
        )
        .await;
    assert_eq!(status, 201, "{json}");
    let sid = json["sid"].as_str().unwrap();
    // The browser's requests land on n3: sent on to n1 by the sid.
    let mut page = BoshPage::attach(
        &n3.daemon,
        json["jid"].as_str().unwrap(),
        sid,
        json["rid"].as_u64().unwrap(),
    );
    page.sync().await;
    page.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g39b", "b").await;
    sees_available(&mut b, &format!("{a}/boshmux")).await;
    b.handle.send(chat(&a.to_string(), "via n3")).await.unwrap();
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("via n3")
    );
    assert_eq!(
        n1.daemon.info(&a.to_string()).await["pages"],
        1,
        "the page is on the owner"
    );
    assert_eq!(
        n2.counter("boshmux_logins_total").await + n3.counter("boshmux_logins_total").await,
        0
    );
}
