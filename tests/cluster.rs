//! SPEC §12, the cluster harness itself (tests/support/cluster.rs): three `boshmux serve`
//! processes on one Redis database behind HAProxy configured as `contrib/haproxy.cfg`. What the
//! balancer must do for the cluster tests to mean anything: spread requests over the nodes, take
//! a frozen node out of rotation within seconds of its missed health checks, and keep answering
//! when a node dies between two checks.
//!
//! Redis database 4 of the test Redis. No accounts.

mod support;

use std::time::Duration;

use support::cluster::Cluster;
use support::daemon::Daemon;

/// A frozen or killed node leaves rotation within this (contrib/haproxy.cfg: checks every
/// 500 ms, 750 ms to answer, down after two failures: ~2 s), with a margin for a loaded machine.
const OUT_OF_ROTATION: Duration = Duration::from_secs(5);

/// `GET /healthz` through `lb`: its status, failing the test if no answer comes in 5 s.
async fn healthz(http: &reqwest::Client, lb: &Daemon) -> u16 {
    tokio::time::timeout(Duration::from_secs(5), http.get(lb.url("/healthz")).send())
        .await
        .expect("the balancer answers within 5 s")
        .expect("the balancer answers")
        .status()
        .as_u16()
}

/// Requests HAProxy sent to each node so far.
async fn sessions(c: &Cluster) -> Vec<u64> {
    c.servers().await.iter().map(|s| s.sessions).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_spreads_requests_and_routes_around_a_frozen_or_killed_node() {
    let p = support::prosody();
    let mut c = Cluster::start(&p, 3, 4, &[]).await;
    let lb = c.balancer();
    let http = reqwest::Client::new();

    let before = sessions(&c).await;
    for _ in 0..60 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    let after = sessions(&c).await;
    let got: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(got.iter().sum::<u64>(), 60, "every request reached a node");
    assert!(
        got.iter().all(|&n| n >= 10),
        "requests spread over the three nodes: {got:?}"
    );

    // Frozen: it still accepts connections, only the check timeout finds it.
    c.sigstop(0);
    let took = c.wait_down(0).await;
    assert!(
        took < OUT_OF_ROTATION,
        "frozen node out of rotation after {took:?}"
    );
    let frozen_before = sessions(&c).await[0];
    for _ in 0..30 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    assert_eq!(
        sessions(&c).await[0],
        frozen_before,
        "nothing was sent to the frozen node"
    );
    c.sigcont(0);
    c.wait_up(0).await;

    // Killed between two checks: requests sent to it are redispatched, none fails.
    c.kill9(1).await;
    for _ in 0..30 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    let killed = &c.servers().await[1];
    assert!(
        killed.redispatched > 0,
        "some requests reached the dead node before its checks failed, and were redispatched: {killed:?}"
    );
    let took = c.wait_down(1).await;
    assert!(
        took < OUT_OF_ROTATION,
        "killed node out of rotation after {took:?}"
    );
    let after_kill = sessions(&c).await;
    for _ in 0..30 {
        assert_eq!(healthz(&http, &lb).await, 200, "{}", c.logs());
    }
    let got = sessions(&c).await;
    assert_eq!(got[1], after_kill[1], "nothing was sent to the dead node");
    assert!(
        got[0] > after_kill[0] && got[2] > after_kill[2],
        "the two live nodes share the load: {after_kill:?} → {got:?}"
    );
}

// SPEC §12 end to end through the balancer: a user's pages sit on every node, the owner is
// killed while a contact sends a numbered message every 250 ms; the pages reconnect through
// HAProxy and carry on. Checked from outside: the XMPP server's view (the same single session),
// the contact's (no offline flap), the pages' (every message reaches a page, none twice, each
// page working again within 5 s). Redis database 13 (14 on ejabberd). Accounts: group g80.
support::both!(through_the_balancer_the_owners_kill_9_costs_nothing);
async fn through_the_balancer_the_owners_kill_9_costs_nothing(p: support::Server) {
    use std::collections::{BTreeMap, HashSet};

    use boshmux::xmpp::{Element, ns};
    use support::daemon::Page;
    use support::process::{message_body, sees_available};

    const LIMIT: Duration = Duration::from_secs(20);
    let db = if p.is_prosody() { 13 } else { 14 };
    let mut c = Cluster::start(&p, 3, db, &[]).await;
    let lb = c.balancer();
    let (a, _) = p.user("g80a");
    let a_full = format!("{a}/boshmux");
    let h = lb.handoff("g80a", "pw-g80a").await;
    let owner = c.index_of(&c.owner(&a.to_string()).await);
    // One page on each node.
    let mut pages: Vec<Page> = Vec::new();
    for i in 0..3 {
        let mut page = c.node(i).page("g80a", &h.token).await;
        page.sync().await;
        pages.push(page);
    }
    pages[0].send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g80b", "b").await;
    sees_available(&mut b, &a_full).await;

    let total = 40;
    let to = a.to_string();
    let sender = tokio::spawn(async move {
        for i in 0..total {
            b.handle
                .send(support::chat(&to, &format!("m{i}")))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        b
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill9(owner).await;
    let killed_at = tokio::time::Instant::now();

    let mut seen: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut back = Vec::new();
    for (i, page) in pages.iter_mut().enumerate() {
        let mut bodies = Vec::new();
        // Until the link or the socket breaks (an abrupt end for the killed node's page).
        while let Some(Ok(text)) = page.next_text(LIMIT).await {
            bodies.extend(message_body(&text));
        }
        *page = support::eventually("the page is back through the balancer", LIMIT, || async {
            let mut page = Page::open(&lb, &[]).await.ok()?;
            page.login_plain("g80a", &h.token).await.ok()?;
            Some(page)
        })
        .await;
        back.push(killed_at.elapsed());
        seen.insert(i, bodies);
    }
    let mut b = sender.await.unwrap();
    for (i, page) in pages.iter_mut().enumerate() {
        while let Some(Ok(text)) = page.next_text(Duration::from_secs(3)).await {
            seen.get_mut(&i).unwrap().extend(message_body(&text));
        }
    }
    eprintln!("pages back {back:?} after the kill of node {owner}");
    for (i, bodies) in &seen {
        let unique: HashSet<&String> = bodies.iter().collect();
        assert_eq!(
            unique.len(),
            bodies.len(),
            "page {i} got a message twice: {bodies:?}"
        );
    }
    let all: HashSet<&String> = seen.values().flatten().collect();
    let missing: Vec<String> = (0..total)
        .map(|i| format!("m{i}"))
        .filter(|m| !all.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "never reached a page: {missing:?}\n{}",
        c.logs()
    );
    for t in &back {
        assert!(
            *t < Duration::from_secs(5),
            "a page worked again only after {t:?}"
        );
    }
    assert_eq!(
        p.sessions_of(&a),
        std::slice::from_ref(&a_full),
        "the same single session"
    );
    while let Ok(event) = b.events.try_recv() {
        if let boshmux::bosh::BoshEvent::Response { stanzas, .. } = event {
            for s in stanzas {
                let from_a = s
                    .attr("from")
                    .is_some_and(|f| f.starts_with(&a.to_string()));
                assert!(
                    !(from_a && s.attr("type") == Some("unavailable")),
                    "the contact saw the user go offline: {s}"
                );
            }
        }
    }
    for i in (0..3).filter(|&i| i != owner) {
        assert_eq!(
            c.process(i).counter("boshmux_logins_total").await,
            0,
            "no login"
        );
    }
}
