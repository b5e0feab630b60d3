//! SPEC §8 against the real Prosody: a daemon stopped with a state file and started again keeps
//! every session — the same upstream session (no re-login, contacts see no offline/online flap),
//! pages back with their cookie on the same JID, and what arrived meanwhile delivered once.

mod support;

use std::time::Duration;

use boshmux::xmpp::{Element, ns};
use support::daemon::{Daemon, Page};
use support::{body_text, chat, eventually, prosody};

const LIMIT: Duration = Duration::from_secs(15);

fn state_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "boshmux-state-{name}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("state.json")
}

#[tokio::test]
async fn a_restart_keeps_the_upstream_session_and_delivers_what_arrived_meanwhile_once() {
    let p = prosody();
    let path = state_path("keep");
    let tune = |c: &mut boshmux::config::Config| c.state_file = Some(path.clone());
    let first = Daemon::start(&p.bosh, &p.domain, tune).await;
    let h = first.handoff("g25a", "pw-g25a").await;
    let mut p1 = first.page("g25a", &h.token).await;
    let mut p2 = first.page("g25a", &h.token).await;
    p1.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g25b", "b").await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("from") == Some("g25a@localhost/boshmux") {
            break;
        }
    }

    first.stop().await;
    assert_eq!(p1.closed().await.code, 1012);
    assert_eq!(p2.closed().await.code, 1012);
    let saved = std::fs::read_to_string(&path).expect("the state file was written");
    assert!(!saved.contains("pw-g25a"), "no password on disk");
    assert!(!saved.contains(&h.token), "no token on disk, only its hash");
    let (a_jid, _) = p.user("g25a");
    assert_eq!(
        p.sessions_of(&a_jid),
        ["g25a@localhost/boshmux"],
        "still alive upstream while down"
    );

    b.handle
        .send(chat("g25a@localhost", "while you were away"))
        .await
        .unwrap();

    let second = Daemon::start(&p.bosh, &p.domain, tune).await;
    let mut p1 = second.page("g25a", &h.token).await; // the same cookie/token works
    assert_eq!(p1.jid, "g25a@localhost/boshmux");
    assert_eq!(
        body_text(&p1.next_message().await).as_deref(),
        Some("while you were away")
    );
    let mut p2 = second.page("g25a", &h.token).await;
    p1.send(&chat("g25b@localhost", "back")).await;
    // The contact saw nothing of the restart: the next thing from a is this message.
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some("g25a@localhost/boshmux") {
            assert!(s.is("message", ns::CLIENT), "contact saw {s}");
            assert_eq!(body_text(&s).as_deref(), Some("back"));
            break;
        }
    }
    // Delivered once: the second page only gets what comes next.
    b.handle.send(chat("g25a@localhost", "next")).await.unwrap();
    assert_eq!(body_text(&p2.next_message().await).as_deref(), Some("next"));
    assert_eq!(p.sessions_of(&a_jid), ["g25a@localhost/boshmux"]);
    let metrics = reqwest::get(second.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\nboshmux_logins_total 0\n"),
        "no login after the restart:\n{metrics}"
    );
    assert_eq!(second.info("g25a@localhost").await["relogins"], 0);
    drop(p1);
    drop(p2);
    second.stop().await;
}

#[tokio::test]
async fn a_session_lost_upstream_while_down_is_dropped_cleanly() {
    let p = prosody();
    let path = state_path("lost");
    let tune = |c: &mut boshmux::config::Config| c.state_file = Some(path.clone());
    let first = Daemon::start(&p.bosh, &p.domain, tune).await;
    let h = first.handoff("g26a", "pw-g26a").await;
    let mut page = first.page("g26a", &h.token).await;
    first.stop().await;
    assert_eq!(page.closed().await.code, 1012);
    // As if the server's inactivity window had passed: the session is gone upstream.
    p.shell("c2s:close('g26a@localhost/boshmux')");

    let second = Daemon::start(&p.bosh, &p.domain, tune).await;
    eventually("the dead session to be dropped", LIMIT, || async {
        let (status, _) = second
            .api(
                reqwest::Method::GET,
                "/api/v1/sessions/g26a@localhost",
                None,
            )
            .await;
        (status == 404).then_some(())
    })
    .await;
    let mut again = Page::open(&second, &[]).await.unwrap();
    let err = again.login_plain("g26a", &h.token).await.unwrap_err();
    assert!(err.contains("not-authorized"), "{err}");
    // A new hand-off logs in afresh.
    let fresh = second.handoff("g26a", "pw-g26a").await;
    assert_eq!(fresh.status, 201);
    second.page("g26a", &fresh.token).await;
    second.stop().await;
}
