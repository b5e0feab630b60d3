//! The BOSH client against the real Prosody that `scripts/test` starts. Each test uses its own
//! group of accounts (g01…g24, see scripts/prosody.sh), so tests running in parallel do not meet.

mod support;

use std::time::Duration;

use boshmux::bosh::{BoshClient, BoshError, BoshEvent};
use boshmux::store::Store;
use boshmux::xmpp::sasl::Mechanism;
use boshmux::xmpp::{Element, ns};
use support::{
    Kind, Server, body_text, both, chat, eventually, go_online, next_event, next_message, raw_login,
};

const LIMIT: Duration = Duration::from_secs(15);

both!(scram_sha1_login_binds_the_requested_resource);
async fn scram_sha1_login_binds_the_requested_resource(p: Server) {
    let mut cfg = p.bosh_config();
    cfg.mechanisms = vec![Mechanism::ScramSha256, Mechanism::ScramSha1];
    let (jid, password) = p.user("g01a");
    let session = support::login(
        &BoshClient::new(cfg).unwrap(),
        &jid,
        &password,
        Some("tab-r1"),
    )
    .await
    .unwrap();
    assert_eq!(session.jid.to_string(), "g01a@localhost/tab-r1");
    assert_eq!(session.params.requests, 2);
    assert_eq!(session.params.wait, 10);
    assert_eq!(p.sessions_of(&jid), ["g01a@localhost/tab-r1"]);
    session.handle.terminate(vec![]).await.unwrap();
}

both!(plain_login_works_and_a_message_from_another_account_arrives);
async fn plain_login_works_and_a_message_from_another_account_arrives(p: Server) {
    let mut cfg = p.bosh_config();
    cfg.mechanisms = vec![Mechanism::Plain];
    let client = BoshClient::new(cfg).unwrap();
    let (a_jid, a_pw) = p.user("g02a");
    let (b_jid, b_pw) = p.user("g02b");
    let mut a = support::login(&client, &a_jid, &a_pw, Some("a"))
        .await
        .unwrap();
    let b = support::login(&client, &b_jid, &b_pw, Some("b"))
        .await
        .unwrap();
    go_online(&mut a, LIMIT).await;

    b.handle
        .send(chat("g02a@localhost", "hello from b"))
        .await
        .unwrap();
    let msg = next_message(&mut a.events, LIMIT).await;
    assert_eq!(body_text(&msg).as_deref(), Some("hello from b"));
    assert_eq!(msg.attr("from"), Some("g02b@localhost/b"));
    a.handle.terminate(vec![]).await.unwrap();
    b.handle.terminate(vec![]).await.unwrap();
}

both!(an_idle_session_survives_several_wait_periods);
async fn an_idle_session_survives_several_wait_periods(p: Server) {
    let mut cfg = p.bosh_config();
    cfg.wait = 2;
    let (jid, pw) = p.user("g03a");
    let mut s = support::login(&BoshClient::new(cfg).unwrap(), &jid, &pw, Some("idle"))
        .await
        .unwrap();
    assert_eq!(s.params.wait, 2);
    let start = s.handle.stats().await.unwrap().requests;
    // Each empty request is held for `wait` and then answered empty; four answered polls means
    // the session sat idle through more than three wait periods.
    eventually(
        "four held requests to come back empty",
        Duration::from_secs(20),
        || async {
            let st = s.handle.stats().await.unwrap();
            (st.requests >= start + 4).then_some(())
        },
    )
    .await;
    assert_eq!(p.sessions_of(&jid), ["g03a@localhost/idle"]);
    // Still the same, working session: a message to ourselves comes back.
    s.handle
        .send(chat("g03a@localhost/idle", "still alive"))
        .await
        .unwrap();
    let echo = next_message(&mut s.events, LIMIT).await;
    assert_eq!(body_text(&echo).as_deref(), Some("still alive"));
    s.handle.terminate(vec![]).await.unwrap();
}

both!(the_server_shows_one_session_while_it_runs_and_none_after_terminate);
async fn the_server_shows_one_session_while_it_runs_and_none_after_terminate(p: Server) {
    let (jid, pw) = p.user("g04a");
    let mut s = support::login(
        &BoshClient::new(p.bosh_config()).unwrap(),
        &jid,
        &pw,
        Some("one"),
    )
    .await
    .unwrap();
    assert_eq!(p.sessions_of(&jid), ["g04a@localhost/one"]);
    let presence = Element::new("presence", ns::CLIENT).with_attr("type", "unavailable");
    s.handle.terminate(vec![presence]).await.unwrap();
    assert!(matches!(
        next_event(&mut s.events, LIMIT).await,
        BoshEvent::Ended(Ok(()))
    ));
    p.await_sessions(&jid, "the session to be gone from the server", LIMIT, |s| {
        s.is_empty()
    })
    .await;
}

both!(a_wrong_password_is_a_terminal_auth_error);
async fn a_wrong_password_is_a_terminal_auth_error(p: Server) {
    let (jid, _) = p.user("g05a");
    match support::login(
        &BoshClient::new(p.bosh_config()).unwrap(),
        &jid,
        "not-the-password",
        None,
    )
    .await
    {
        Err(e @ BoshError::AuthFailed { .. }) => {
            assert_eq!(e.to_string(), "authentication failed: not-authorized");
        }
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    assert!(p.sessions_of(&jid).is_empty());
}

both!(a_session_closed_by_the_server_ends_with_the_servers_terminate);
async fn a_session_closed_by_the_server_ends_with_the_servers_terminate(p: Server) {
    let (jid, pw) = p.user("g06a");
    let mut s = support::login(
        &BoshClient::new(p.bosh_config()).unwrap(),
        &jid,
        &pw,
        Some("kill"),
    )
    .await
    .unwrap();
    // Let the scheduler put its first request at the server before the kill.
    eventually("a request held at the server", LIMIT, || async {
        (s.handle.stats().await.unwrap().in_flight == 1).then_some(())
    })
    .await;
    p.kill_session("g06a@localhost/kill");
    loop {
        match next_event(&mut s.events, LIMIT).await {
            BoshEvent::Ended(Err(BoshError::Terminated {
                condition,
                stream_error,
            })) => {
                // Prosody's `c2s:close` ends the session with a bare terminate; ejabberd's
                // `kick_session` sends a stream error first, which comes as
                // `remote-stream-error` with the stream error inside.
                match p.kind {
                    Kind::Prosody => assert_eq!(condition, None),
                    Kind::Ejabberd => {
                        assert_eq!(condition.as_deref(), Some("remote-stream-error"));
                        assert!(stream_error.is_some(), "no stream error inside");
                    }
                }
                break;
            }
            BoshEvent::Ended(other) => panic!("expected Terminated, got {other:?}"),
            _ => {}
        }
    }
}

both!(attach_takes_over_a_session_created_elsewhere);
/// A session established by someone else (here: raw HTTP, as a web app's server would) is taken
/// over with its sid and next rid, and carries messages both ways.
async fn attach_takes_over_a_session_created_elsewhere(p: Server) {
    let (a_jid, a_pw) = p.user("g07a");
    let (b_jid, b_pw) = p.user("g07b");
    let (full, sid, rid) = raw_login(&p.bosh, &a_jid, &a_pw, "web").await;
    assert_eq!(full.to_string(), "g07a@localhost/web");

    let client = BoshClient::new(p.bosh_config()).unwrap();
    let mut a = support::one_by_one(client.attach(full.clone(), sid, rid, &Store::none()).await);
    let mut b = support::login(&client, &b_jid, &b_pw, Some("b"))
        .await
        .unwrap();
    go_online(&mut b, LIMIT).await;
    go_online(&mut a, LIMIT).await;

    a.handle
        .send(chat("g07b@localhost", "from the attached session"))
        .await
        .unwrap();
    let got = next_message(&mut b.events, LIMIT).await;
    assert_eq!(
        body_text(&got).as_deref(),
        Some("from the attached session")
    );
    assert_eq!(got.attr("from"), Some("g07a@localhost/web"));

    b.handle
        .send(chat("g07a@localhost/web", "back to you"))
        .await
        .unwrap();
    let got = next_message(&mut a.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("back to you"));
    assert_eq!(p.sessions_of(&a_jid), ["g07a@localhost/web"]);

    a.handle.terminate(vec![]).await.unwrap();
    b.handle.terminate(vec![]).await.unwrap();
}
