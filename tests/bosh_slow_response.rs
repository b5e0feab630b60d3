//! A BOSH response that takes longer to stream than the request deadline (issue 15 point 1): the
//! deadline (`wait` + margin) covers the response head, and the body is read for as long as it
//! keeps arriving, so a huge response is read once and its rid is not resent to bring the same
//! response again. A body that stops arriving is still a failure, and the rid is resent.
//!
//! On paused time over the in-memory transport, and on real time over HTTP through reqwest: the
//! test plays the connection manager.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use boshmux::bosh::{
    Answer, Body, BoshClient, BoshConfig, BoshEvent, BoshSession, Transport, TransportError,
};
use boshmux::metrics::Metrics;
use boshmux::store::Store;
use boshmux::xmpp::{Element, Jid, ns};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

const FIRST: u64 = 100;
/// `wait` of the attached session; the request deadline is this plus the 10 s margin.
const WAIT: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_secs(70);

type Requests = mpsc::UnboundedReceiver<(Bytes, oneshot::Sender<Answer>)>;

async fn attached(metrics: Arc<Metrics>) -> (BoshSession, Requests) {
    let (transport, requests) = Transport::channel();
    let mut cfg = BoshConfig::new("http://unused.invalid/");
    cfg.timeouts.attach_wait = WAIT;
    cfg.metrics = metrics;
    assert_eq!(cfg.timeouts.margin + WAIT, DEADLINE);
    let session = BoshClient::with_transport(cfg, transport)
        .attach(
            Jid::parse("alice@example.test/tab").unwrap(),
            "sid-slow".into(),
            FIRST,
            &Store::memory(),
        )
        .await;
    (session, requests)
}

fn rid_of(request: &Bytes) -> u64 {
    Body::parse(request)
        .unwrap()
        .element
        .attr("rid")
        .unwrap()
        .parse()
        .unwrap()
}

/// A response carrying one chat message whose text is `text`.
fn response(text: &str) -> Bytes {
    let message = Element::new("message", ns::CLIENT)
        .with_attr("from", "bob@example.test/x")
        .with_attr("to", "alice@example.test/tab")
        .with_attr("type", "chat")
        .with_child(Element::new("body", ns::CLIENT).with_text(text));
    Body {
        element: Element::new("body", ns::HTTPBIND).with_child(message),
    }
    .to_bytes()
}

/// `bytes` cut into `n` chunks, each arriving `gap` after the one before.
fn trickled(bytes: &Bytes, n: usize, gap: Duration) -> Vec<(Duration, Bytes)> {
    let size = bytes.len().div_ceil(n);
    (0..bytes.len())
        .step_by(size)
        .map(|at| (gap, bytes.slice(at..(at + size).min(bytes.len()))))
        .collect()
}

/// Plays the connection manager: the first request for [`FIRST`] gets `first`, a resend of it
/// gets `resent` at once (the server's cache); every other request is held 20 s and answered
/// empty. Returns every request as it arrived.
fn serve(
    mut requests: Requests,
    first: Vec<(Duration, Bytes)>,
    resent: Bytes,
) -> Arc<Mutex<Vec<(u64, Bytes)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut first = Some(first);
        while let Some((bytes, tx)) = requests.recv().await {
            let rid = rid_of(&bytes);
            log.lock().unwrap().push((rid, bytes));
            if rid != FIRST {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    let empty = Body {
                        element: Element::new("body", ns::HTTPBIND),
                    };
                    let _ = tx.send(Answer::Body(empty.to_bytes()));
                });
            } else if let Some(chunks) = first.take() {
                let _ = tx.send(Answer::Chunks(chunks));
            } else {
                let _ = tx.send(Answer::Body(resent.clone()));
            }
        }
    });
    seen
}

/// Reads events until the response to [`FIRST`]: its stanzas, and the retries seen before it.
async fn first_response(session: &mut BoshSession) -> (Vec<Element>, Vec<(u64, TransportError)>) {
    let mut retries = Vec::new();
    let run = async {
        loop {
            match session.events.recv().await.expect("the session goes on") {
                BoshEvent::Response { rid, stanzas } => {
                    session.handle.handed_on(rid);
                    if rid == FIRST {
                        return stanzas;
                    }
                }
                BoshEvent::Retrying { rid, error, .. } => retries.push((rid, error)),
                BoshEvent::Recovered => {}
                BoshEvent::Ended(e) => panic!("the session ended: {e:?}"),
            }
        }
    };
    let stanzas = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the response within 10 minutes");
    (stanzas, retries)
}

fn text_of(stanzas: &[Element]) -> Vec<usize> {
    stanzas
        .iter()
        .filter_map(|s| s.child("body", ns::CLIENT))
        .map(|b| b.text().len())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_response_streaming_past_the_deadline_is_read_once_and_not_resent() {
    let metrics = Arc::new(Metrics::default());
    let (mut session, requests) = attached(metrics.clone()).await;
    let text = "x".repeat(200 * 1024);
    let whole = response(&text);
    // 200 chunks one second apart: 200 s, well past the 70 s deadline, never silent for long.
    let seen = serve(
        requests,
        trickled(&whole, 200, Duration::from_secs(1)),
        whole.clone(),
    );
    let started = Instant::now();
    let (stanzas, retries) = first_response(&mut session).await;
    assert!(
        started.elapsed() >= Duration::from_secs(199),
        "{:?}",
        started.elapsed()
    );
    assert!(started.elapsed() > DEADLINE);
    assert_eq!(text_of(&stanzas), [text.len()]);
    assert!(retries.is_empty(), "resent: {retries:?}");
    let first_sent = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| *r == FIRST)
        .count();
    assert_eq!(first_sent, 1, "rid {FIRST} sent {first_sent} times");
    assert_eq!(
        metrics
            .upstream_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let rendered = metrics.render(1, 0);
    assert!(
        rendered
            .lines()
            .any(|l| l == "boshmux_upstream_retries_total 0"),
        "{rendered}"
    );
    assert_eq!(session.handle.stats().await.unwrap().retries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_response_that_stops_arriving_times_out_and_its_rid_is_resent() {
    let metrics = Arc::new(Metrics::default());
    let (mut session, requests) = attached(metrics.clone()).await;
    let text = "y".repeat(64 * 1024);
    let whole = response(&text);
    // Half the body at once, then 15 s of silence: over the 10 s allowed between chunks, well
    // under the 70 s request deadline.
    let mut chunks = trickled(&whole, 2, Duration::ZERO);
    chunks[1].0 = Duration::from_secs(15);
    let seen = serve(requests, chunks, whole.clone());
    let (stanzas, retries) = first_response(&mut session).await;
    assert_eq!(
        text_of(&stanzas),
        [text.len()],
        "the resend's answer delivered once"
    );
    assert_eq!(
        retries,
        [(FIRST, TransportError::Stalled(Duration::from_secs(10)))]
    );
    let sent: Vec<Bytes> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| *r == FIRST)
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(sent.len(), 2, "rid {FIRST} sent once and resent once");
    assert_eq!(sent[0], sent[1], "the resend is byte-identical");
    assert_eq!(
        metrics
            .upstream_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// Serves BOSH over real HTTP/1.1 on `listener`: the first request for [`FIRST`] is answered
/// with `whole` written in `n` pieces `gap` apart (the head at once), any other request after
/// 300 ms with an empty body. Every rid received goes to `rids`.
async fn serve_http(
    listener: tokio::net::TcpListener,
    whole: Bytes,
    n: usize,
    gap: Duration,
    rids: mpsc::UnboundedSender<u64>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let first = Arc::new(Mutex::new(Some(trickled(&whole, n, gap))));
    let size = whole.len();
    loop {
        let (mut conn, _) = listener.accept().await.unwrap();
        let (first, rids) = (first.clone(), rids.clone());
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                // One request: the head up to the blank line, then Content-Length bytes.
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    let mut chunk = [0u8; 4096];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let request = Bytes::copy_from_slice(&buf[head_end..head_end + len]);
                buf.drain(..head_end + len);
                let rid = rid_of(&request);
                let _ = rids.send(rid);
                let pieces = if rid == FIRST {
                    first.lock().unwrap().take()
                } else {
                    None
                };
                let (pieces, size) = match pieces {
                    Some(p) => (p, size),
                    None => {
                        let empty = Body {
                            element: Element::new("body", ns::HTTPBIND),
                        }
                        .to_bytes();
                        (
                            vec![(Duration::from_millis(300), empty.clone())],
                            empty.len(),
                        )
                    }
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/xml; charset=utf-8\r\ncontent-length: {size}\r\n\r\n"
                );
                if rid != FIRST {
                    tokio::time::sleep(pieces[0].0).await;
                }
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for (delay, piece) in pieces {
                    if rid == FIRST {
                        tokio::time::sleep(delay).await;
                    }
                    if conn.write_all(&piece).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// The same over a real socket and real time, through reqwest: 1 s `wait` + 1 s margin, a body
/// written over 3 s in pieces 100 ms apart.
#[tokio::test]
async fn over_http_a_body_streaming_past_the_deadline_is_read_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/http-bind", listener.local_addr().unwrap());
    let text = "z".repeat(300 * 1024);
    let whole = response(&text);
    let (rids_tx, mut rids) = mpsc::unbounded_channel();
    let server = tokio::spawn(serve_http(
        listener,
        whole,
        30,
        Duration::from_millis(100),
        rids_tx,
    ));
    let metrics = Arc::new(Metrics::default());
    let mut cfg = BoshConfig::new(url);
    cfg.timeouts.attach_wait = Duration::from_secs(1);
    cfg.timeouts.margin = Duration::from_secs(1);
    cfg.metrics = metrics.clone();
    let mut session = BoshClient::new(cfg)
        .unwrap()
        .attach(
            Jid::parse("alice@example.test/tab").unwrap(),
            "sid-slow".into(),
            FIRST,
            &Store::memory(),
        )
        .await;
    let started = std::time::Instant::now();
    let (stanzas, retries) = first_response(&mut session).await;
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(text_of(&stanzas), [text.len()]);
    assert!(retries.is_empty(), "resent: {retries:?}");
    let mut first_sent = 0;
    while let Ok(rid) = rids.try_recv() {
        first_sent += usize::from(rid == FIRST);
    }
    assert_eq!(first_sent, 1);
    assert_eq!(
        metrics
            .upstream_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    server.abort();
}
