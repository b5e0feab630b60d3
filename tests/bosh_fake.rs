//! The BOSH client against the fake connection manager: the faults a real server cannot be made
//! to produce on demand (dropped and delayed responses, out-of-order answers, HTTP errors, every
//! terminate condition), with each request's rid and bytes checked.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use boshmux::bosh::{
    Body, BoshClient, BoshConfig, BoshError, BoshEvent, BoshSession, Timeouts, TransportError,
};
use boshmux::fake_cm::{Action, FakeCm, FakeCmConfig, Intercepted};
use boshmux::store::Store;
use boshmux::xmpp::{Element, Jid, ns};
use support::{body_text, chat, login, next_event, next_stanza, one_by_one};
use tokio::sync::mpsc::UnboundedReceiver;

const LIMIT: Duration = Duration::from_secs(10);
const FIRST_RID: u64 = 1000;

fn client(fake: &FakeCm) -> BoshClient {
    let mut cfg = BoshConfig::new(fake.url());
    cfg.timeouts = Timeouts {
        attach_wait: Duration::from_secs(1),
        ..Timeouts::tight()
    };
    BoshClient::new(cfg).unwrap()
}

/// A fake in intercept mode and a session attached to it at rid [`FIRST_RID`].
async fn attached() -> (FakeCm, UnboundedReceiver<Intercepted>, BoshSession) {
    let fake = FakeCm::start(FakeCmConfig::default()).await.unwrap();
    let requests = fake.intercept();
    let jid = Jid::parse("alice@example.test/tab").unwrap();
    let session = one_by_one(
        client(&fake)
            .attach(jid, "sid-1".into(), FIRST_RID, &Store::none())
            .await,
    );
    (fake, requests, session)
}

async fn next_request(rx: &mut UnboundedReceiver<Intercepted>) -> Intercepted {
    tokio::time::timeout(LIMIT, rx.recv())
        .await
        .expect("timed out waiting for a request at the fake")
        .expect("fake stopped")
}

fn texts(stanzas: &[Element]) -> Vec<String> {
    stanzas.iter().filter_map(body_text).collect()
}

async fn ended(session: &mut BoshSession) -> Result<(), BoshError> {
    loop {
        if let BoshEvent::Ended(r) = next_event(&mut session.events, LIMIT).await {
            return r;
        }
    }
}

#[tokio::test]
async fn a_dropped_response_is_resent_byte_identical_with_the_same_rid() {
    let (fake, mut rx, mut session) = attached().await;
    let held = next_request(&mut rx).await;
    assert_eq!(held.rid, FIRST_RID);

    session
        .handle
        .send(chat("bob@example.test", "hello"))
        .await
        .unwrap();
    let first = next_request(&mut rx).await;
    assert_eq!(first.rid, FIRST_RID + 1);
    assert_eq!(texts(&first.stanzas()), ["hello"]);
    held.respond(vec![]); // as a server does: the new request releases the held one
    let first_raw = first.raw.clone();
    first.answer(Action::Drop);

    let again = next_request(&mut rx).await;
    assert_eq!(again.rid, FIRST_RID + 1);
    assert_eq!(again.raw, first_raw, "a resend must be byte-identical");
    match next_event(&mut session.events, LIMIT).await {
        BoshEvent::Retrying {
            rid,
            attempt,
            error,
        } => {
            assert_eq!((rid, attempt), (FIRST_RID + 1, 1));
            assert!(matches!(error, TransportError::Connection(_)), "{error:?}");
        }
        other => panic!("expected Retrying, got {other:?}"),
    }
    again.respond(vec![chat("alice@example.test", "reply")]);
    assert!(matches!(
        next_event(&mut session.events, LIMIT).await,
        BoshEvent::Recovered
    ));
    assert_eq!(
        body_text(&next_stanza(&mut session.events, LIMIT).await).as_deref(),
        Some("reply")
    );

    // The fake saw rid 1001 exactly twice, with the same bytes both times.
    let seen: Vec<_> = fake
        .records()
        .into_iter()
        .filter(|r| r.rid == Some(FIRST_RID + 1))
        .collect();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].raw, seen[1].raw);
}

#[tokio::test]
async fn a_request_without_answer_is_resent_after_wait_plus_margin() {
    let (_fake, mut rx, mut session) = attached().await;
    let silent = next_request(&mut rx).await; // kept open and never answered
    let again = next_request(&mut rx).await;
    assert_eq!(again.rid, silent.rid);
    assert_eq!(again.raw, silent.raw);
    match next_event(&mut session.events, LIMIT).await {
        BoshEvent::Retrying { error, .. } => {
            assert_eq!(error, TransportError::Timeout(Duration::from_millis(1500)));
        }
        other => panic!("expected Retrying, got {other:?}"),
    }
    again.respond(vec![]);
    drop(silent);
}

#[tokio::test]
async fn never_more_than_requests_in_flight_and_queued_stanzas_share_the_next_request() {
    let (fake, mut rx, session) = attached().await;
    let r0 = next_request(&mut rx).await;
    session
        .handle
        .send(chat("bob@example.test", "m1"))
        .await
        .unwrap();
    let r1 = next_request(&mut rx).await;
    assert_eq!((r0.rid, r1.rid), (FIRST_RID, FIRST_RID + 1));

    // Both slots are taken: the next five wait in the queue.
    for i in 2..=6 {
        session
            .handle
            .send(chat("bob@example.test", &format!("m{i}")))
            .await
            .unwrap();
    }
    let stats = session.handle.stats().await.unwrap();
    assert_eq!((stats.in_flight, stats.queued), (2, 5));
    assert!(
        rx.try_recv().is_err(),
        "a third request was sent while two were in flight"
    );

    r0.respond(vec![]);
    let r2 = next_request(&mut rx).await;
    assert_eq!(r2.rid, FIRST_RID + 2, "rid must grow by exactly one");
    assert_eq!(texts(&r2.stanzas()), ["m2", "m3", "m4", "m5", "m6"]);
    assert_eq!(fake.max_outstanding(), 2);
    let stats = session.handle.stats().await.unwrap();
    assert_eq!(
        (stats.max_in_flight, stats.requests, stats.stanzas_out),
        (2, 3, 6)
    );
    drop((r1, r2));
}

#[tokio::test]
async fn responses_are_handed_on_in_rid_order() {
    let (_fake, mut rx, mut session) = attached().await;
    let r0 = next_request(&mut rx).await;
    session
        .handle
        .send(chat("bob@example.test", "m1"))
        .await
        .unwrap();
    let r1 = next_request(&mut rx).await;

    // The later request is answered first...
    r1.respond(vec![chat("alice@example.test", "second")]);
    support::eventually("the answer to rid 1001 to be read", LIMIT, || async {
        let s = session.handle.stats().await.unwrap();
        (s.in_flight == 1).then_some(())
    })
    .await;
    assert_eq!(
        session.handle.stats().await.unwrap().stanzas_in,
        0,
        "handed on before rid 1000"
    );
    // ...but its stanza waits for the earlier one.
    r0.respond(vec![chat("alice@example.test", "first")]);
    let a = next_stanza(&mut session.events, LIMIT).await;
    let b = next_stanza(&mut session.events, LIMIT).await;
    assert_eq!(texts(&[a, b]), ["first", "second"]);
}

#[tokio::test]
async fn every_terminate_condition_ends_the_session_with_that_condition() {
    let conditions = [
        None,
        Some("bad-request"),
        Some("host-gone"),
        Some("host-unknown"),
        Some("improper-addressing"),
        Some("internal-server-error"),
        Some("item-not-found"),
        Some("other-request"),
        Some("policy-violation"),
        Some("remote-connection-failed"),
        Some("remote-stream-error"),
        Some("see-other-uri"),
        Some("system-shutdown"),
        Some("undefined-condition"),
    ];
    for condition in conditions {
        let (_fake, mut rx, mut session) = attached().await;
        next_request(&mut rx).await.terminate(condition, vec![]);
        match ended(&mut session).await {
            Err(BoshError::Terminated {
                condition: got,
                stream_error: None,
            }) => assert_eq!(got.as_deref(), condition),
            other => panic!("{condition:?}: expected Terminated, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn stanzas_before_a_remote_stream_error_are_delivered_first() {
    let (_fake, mut rx, mut session) = attached().await;
    let stream_error = Element::new("error", ns::STREAM)
        .with_child(Element::new("conflict", ns::STREAMS))
        .with_child(Element::new("text", ns::STREAMS).with_text("Replaced by new connection"));
    next_request(&mut rx).await.terminate(
        Some("remote-stream-error"),
        vec![chat("alice@example.test", "last words"), stream_error],
    );
    assert_eq!(
        body_text(&next_stanza(&mut session.events, LIMIT).await).as_deref(),
        Some("last words")
    );
    let err = ended(&mut session).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "session terminated by the server (condition: remote-stream-error, stream error: conflict)"
    );
}

/// ejabberd says why in the HTTP reason phrase (`404 Session ID mismatch`, RECOVERY.md): the
/// error the session ends with, and so the daemon's log and API, carry it.
#[tokio::test]
async fn the_servers_reason_phrase_reaches_the_error() {
    let (_fake, mut rx, mut session) = attached().await;
    next_request(&mut rx)
        .await
        .answer(Action::StatusWithReason(404, "Session ID mismatch"));
    let err = ended(&mut session).await.unwrap_err();
    assert!(
        matches!(&err, BoshError::HttpStatus(404, Some(r)) if r == "Session ID mismatch"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "connection manager answered HTTP 404 (Session ID mismatch)"
    );
}

#[tokio::test]
async fn http_4xx_is_terminal() {
    for status in [400, 403, 404] {
        let (_fake, mut rx, mut session) = attached().await;
        next_request(&mut rx).await.answer(Action::Status(status));
        match ended(&mut session).await {
            Err(BoshError::HttpStatus(s, _)) => assert_eq!(s, status),
            other => panic!("HTTP {status}: expected HttpStatus, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn http_5xx_is_retried_then_given_up_after_the_budget() {
    let (_fake, mut rx, mut session) = attached().await;
    let budget = Timeouts::tight().max_retries;
    let first = next_request(&mut rx).await;
    let raw = first.raw.clone();
    first.answer(Action::Status(500));
    for _ in 0..budget {
        let again = next_request(&mut rx).await;
        assert_eq!((again.rid, &again.raw), (FIRST_RID, &raw));
        again.answer(Action::Status(500));
    }
    match ended(&mut session).await {
        Err(BoshError::RetriesExhausted { attempts, last }) => {
            assert_eq!(attempts, budget + 1);
            assert_eq!(last, TransportError::ServerError(500));
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
}

#[tokio::test]
async fn http_5xx_once_then_the_session_goes_on() {
    let (_fake, mut rx, mut session) = attached().await;
    next_request(&mut rx).await.answer(Action::Status(503));
    next_request(&mut rx)
        .await
        .respond(vec![chat("alice@example.test", "still here")]);
    assert!(matches!(
        next_event(&mut session.events, LIMIT).await,
        BoshEvent::Retrying {
            attempt: 1,
            error: TransportError::ServerError(503),
            ..
        }
    ));
    assert!(matches!(
        next_event(&mut session.events, LIMIT).await,
        BoshEvent::Recovered
    ));
    assert_eq!(
        body_text(&next_stanza(&mut session.events, LIMIT).await).as_deref(),
        Some("still here")
    );
    // And it keeps a request at the server.
    assert_eq!(next_request(&mut rx).await.rid, FIRST_RID + 1);
}

#[tokio::test]
async fn a_recoverable_error_resends_every_unanswered_request() {
    let (_fake, mut rx, session) = attached().await;
    let r0 = next_request(&mut rx).await;
    session
        .handle
        .send(chat("bob@example.test", "m1"))
        .await
        .unwrap();
    let r1 = next_request(&mut rx).await;
    let originals: HashMap<u64, bytes::Bytes> =
        [(r0.rid, r0.raw.clone()), (r1.rid, r1.raw.clone())].into();

    let mut error = Element::new("body", ns::HTTPBIND).with_attr("type", "error");
    error.set_attr("condition", "item-not-found");
    r1.answer(Action::Respond(Body { element: error }));
    // Oldest first; the younger one only once the older is answered (a server that deferred it
    // must not get it twice: ejabberd crashes the session).
    let a = next_request(&mut rx).await;
    assert_eq!((a.rid, &a.raw), (FIRST_RID, &originals[&FIRST_RID]));
    a.respond(Vec::new());
    let b = next_request(&mut rx).await;
    assert_eq!(
        (b.rid, &b.raw),
        (FIRST_RID + 1, &originals[&(FIRST_RID + 1)])
    );
    drop((r0, b));
}

#[tokio::test]
async fn terminate_carries_queued_stanzas_and_the_farewell() {
    let (_fake, mut rx, mut session) = attached().await;
    let held = next_request(&mut rx).await;
    let unavailable = Element::new("presence", ns::CLIENT).with_attr("type", "unavailable");
    let handle = session.handle.clone();
    let done = tokio::spawn(async move { handle.terminate(vec![unavailable]).await });
    let last = next_request(&mut rx).await;
    assert_eq!(last.body.element.attr("type"), Some("terminate"));
    assert_eq!(last.rid, FIRST_RID + 1);
    assert_eq!(last.stanzas().len(), 1);
    assert!(last.stanzas()[0].is("presence", ns::CLIENT));
    last.terminate(None, vec![]);
    done.await.unwrap().unwrap();
    assert!(ended(&mut session).await.is_ok());
    assert!(matches!(
        session.handle.send(chat("x@y", "late")).await,
        Err(BoshError::Closed)
    ));
    drop(held);
}

#[tokio::test]
async fn login_and_routing_against_the_fake_in_automatic_mode() {
    let users: HashMap<String, String> =
        [("alice".into(), "pa".into()), ("bob".into(), "pb".into())].into();
    let fake = FakeCm::start(FakeCmConfig {
        users,
        ..FakeCmConfig::default()
    })
    .await
    .unwrap();
    let c = client(&fake);
    let alice = Jid::parse("alice@example.test").unwrap();
    let bob = Jid::parse("bob@example.test").unwrap();
    let mut a = login(&c, &alice, "pa", Some("one")).await.unwrap();
    let b = login(&c, &bob, "pb", None).await.unwrap();
    assert_eq!(a.jid.to_string(), "alice@example.test/one");
    b.handle
        .send(chat("alice@example.test", "hi alice"))
        .await
        .unwrap();
    let got = next_stanza(&mut a.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("hi alice"));
    assert_eq!(got.attr("from"), Some(b.jid.to_string().as_str()));
    assert!(fake.max_outstanding() <= 2);

    match login(&c, &alice, "wrong", None).await {
        Err(BoshError::AuthFailed { condition }) => assert_eq!(condition, "not-authorized"),
        other => panic!("expected AuthFailed, got {other:?}"),
    }
}

/// The whole login exchange, request by request: creation without features (the client must poll
/// for them), PLAIN, restart, bind with the requested resource, and the legacy session request
/// when the server does not mark it optional.
#[tokio::test]
async fn login_polls_for_features_and_walks_the_whole_exchange() {
    let fake = FakeCm::start(FakeCmConfig::default()).await.unwrap();
    let mut rx = fake.intercept();
    let c = client(&fake);
    let login = tokio::spawn(async move {
        let jid = Jid::parse("alice@example.test").unwrap();
        login(&c, &jid, "secret", Some("desk")).await
    });
    let body = |children: Vec<Element>| {
        let mut el = Element::new("body", ns::HTTPBIND);
        for c in children {
            el.push_child(c);
        }
        el
    };

    let create = next_request(&mut rx).await;
    let rid0 = create.rid;
    let el = &create.body.element;
    assert_eq!(
        (
            el.attr("to"),
            el.attr("hold"),
            el.attr("ver"),
            el.attr("sid")
        ),
        (Some("example.test"), Some("1"), Some("1.6"), None)
    );
    assert_eq!(el.attr_ns(Some(ns::XBOSH), "version"), Some("1.0"));
    assert!(rid0 > 0 && rid0 < (1 << 53));
    let mut created = body(vec![]);
    for (k, v) in [
        ("sid", "s9"),
        ("wait", "30"),
        ("requests", "2"),
        ("hold", "1"),
    ] {
        created.set_attr(k, v);
    }
    create.answer(Action::Respond(Body { element: created }));

    // No features yet: the client polls.
    let poll = next_request(&mut rx).await;
    assert_eq!((poll.rid, poll.stanzas().len()), (rid0 + 1, 0));
    assert_eq!(poll.body.element.attr("sid"), Some("s9"));
    let mechanisms = Element::new("mechanisms", ns::SASL)
        .with_child(Element::new("mechanism", ns::SASL).with_text("PLAIN"))
        .with_child(Element::new("mechanism", ns::SASL).with_text("X-UNKNOWN"));
    poll.answer(Action::Respond(Body {
        element: body(vec![
            Element::new("features", ns::STREAM).with_child(mechanisms),
        ]),
    }));

    let auth = next_request(&mut rx).await;
    assert_eq!(auth.rid, rid0 + 2);
    let sasl = &auth.stanzas()[0];
    assert!(sasl.is("auth", ns::SASL));
    assert_eq!(sasl.attr("mechanism"), Some("PLAIN"));
    assert_eq!(sasl.text(), "AGFsaWNlAHNlY3JldA=="); // base64 of "\0alice\0secret"
    auth.respond(vec![Element::new("success", ns::SASL)]);

    let restart = next_request(&mut rx).await;
    assert_eq!(restart.rid, rid0 + 3);
    assert_eq!(
        restart.body.element.attr_ns(Some(ns::XBOSH), "restart"),
        Some("true")
    );
    restart.respond(vec![
        Element::new("features", ns::STREAM)
            .with_child(Element::new("bind", ns::BIND))
            .with_child(Element::new("session", ns::SESSION)),
    ]);

    let bind = next_request(&mut rx).await;
    assert_eq!(bind.rid, rid0 + 4);
    let iq = &bind.stanzas()[0];
    let resource = iq
        .child("bind", ns::BIND)
        .and_then(|b| b.child("resource", ns::BIND));
    assert_eq!(resource.map(Element::text).as_deref(), Some("desk"));
    let id = iq.attr("id").unwrap().to_owned();
    bind.respond(vec![
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", id)
            .with_child(
                Element::new("bind", ns::BIND)
                    .with_child(Element::new("jid", ns::BIND).with_text("alice@example.test/desk")),
            ),
    ]);

    let session = next_request(&mut rx).await;
    assert_eq!(session.rid, rid0 + 5);
    let iq = &session.stanzas()[0];
    assert!(
        iq.child("session", ns::SESSION).is_some(),
        "required session iq not sent"
    );
    let id = iq.attr("id").unwrap().to_owned();
    session.respond(vec![
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", id),
    ]);

    let s = login.await.unwrap().unwrap();
    assert_eq!(s.jid.to_string(), "alice@example.test/desk");
    assert_eq!((s.params.sid.as_str(), s.params.wait), ("s9", 30));
    // The scheduler takes over with the next rid.
    assert_eq!(next_request(&mut rx).await.rid, rid0 + 6);
}
