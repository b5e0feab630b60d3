//! A proxy between the BOSH client and the real server that cuts every request held longer than a
//! few seconds (SPEC §7, last bullet): the session lives on without a single failure, the cuts are
//! counted, a `warn` line says what was learned, and the next session asks for a `wait` the proxy
//! lets through. Accounts: group g33. Alone in its binary: it installs a global log subscriber.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use boshmux::bosh::{BoshClient, BoshEvent, BoshSession};
use boshmux::metrics::Metrics;
use boshmux::xmpp::{Element, ns};
use parking_lot::Mutex;
use support::{Server, body_text, both, chat, eventually, go_online};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(15);

/// A TCP proxy in front of a BOSH port that ends any request left without a response for
/// `cut_after`: alternately by closing both connections (a load balancer's idle timeout) and by
/// answering `504 Gateway Timeout` and closing (nginx's `proxy_read_timeout`).
struct CuttingProxy {
    /// The BOSH URL through the proxy.
    url: String,
    /// Cuts made so far.
    cuts: watch::Receiver<u32>,
}

impl CuttingProxy {
    async fn start(bosh_url: &str, cut_after: Duration) -> CuttingProxy {
        let mut url = reqwest::Url::parse(bosh_url).unwrap();
        let upstream = url.socket_addrs(|| None).unwrap()[0];
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        url.set_port(Some(addr.port())).unwrap();
        let (cut_tx, cuts) = watch::channel(0u32);
        let cut_tx = Arc::new(cut_tx);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, cut_after, cut_tx.clone()));
            }
        });
        CuttingProxy {
            url: url.to_string(),
            cuts,
        }
    }

    fn cuts(&self) -> u32 {
        *self.cuts.borrow()
    }

    /// Waits for the proxy to have cut `n` requests in all.
    async fn cut_count_reaches(&self, n: u32, limit: Duration) {
        let mut rx = self.cuts.clone();
        tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("the proxy cut {} requests, not {n}", self.cuts()))
            .unwrap();
    }
}

/// Copies one client connection to `upstream` and back. A request is "open" from the first
/// client bytes after the last server bytes until the server's next bytes.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    cut_after: Duration,
    cuts: Arc<watch::Sender<u32>>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut from_client, mut from_server) = (vec![0u8; 65536], vec![0u8; 65536]);
    let mut open_since: Option<Instant> = None;
    loop {
        let deadline = open_since.map(|t| t + cut_after);
        tokio::select! {
            n = client.read(&mut from_client) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                open_since.get_or_insert_with(Instant::now);
                if server.write_all(&from_client[..n]).await.is_err() {
                    return;
                }
            }
            n = server.read(&mut from_server) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                open_since = None;
                if client.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                let mut nth = 0;
                cuts.send_modify(|c| {
                    *c += 1;
                    nth = *c;
                });
                if nth % 2 == 0 {
                    let _ = client
                        .write_all(b"HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                }
                return; // both connections close
            }
        }
    }
}

/// The log lines at `warn` and above of the whole test binary.
fn warn_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(move || Captured(writer.clone()))
            .with_ansi(false)
            .init();
        log
    })
}

struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Events that arrived so far, failing on anything but stanzas: no failure, no end.
fn only_stanzas_so_far(s: &mut BoshSession) {
    while let Ok(event) = s.events.try_recv() {
        assert!(
            matches!(event, BoshEvent::Response { .. }),
            "unexpected event while cut: {event:?}"
        );
    }
}

/// The next `<message/>`, failing on any event but a stanza.
async fn next_message_no_failure(s: &mut BoshSession) -> Element {
    loop {
        let event = tokio::time::timeout(LIMIT, s.events.recv())
            .await
            .expect("timed out waiting for a message")
            .expect("event stream ended");
        match event {
            BoshEvent::Response { stanzas, .. } => {
                // support::login hands stanzas on one per event.
                if let Some(st) = stanzas.into_iter().find(|st| st.is("message", ns::CLIENT)) {
                    return st;
                }
            }
            other => panic!("unexpected event while waiting for a message: {other:?}"),
        }
    }
}

both!(a_proxy_cutting_held_requests_costs_no_relogin_and_teaches_a_shorter_wait);
async fn a_proxy_cutting_held_requests_costs_no_relogin_and_teaches_a_shorter_wait(p: Server) {
    let log = warn_log();
    // Different cut times on the two servers, so that each test finds its own warn line.
    let (cut_after, next_wait) = if p.is_prosody() {
        (Duration::from_millis(2500), 1)
    } else {
        (Duration::from_millis(3500), 2)
    };
    let proxy = CuttingProxy::start(&p.bosh, cut_after).await;
    let metrics = Arc::new(Metrics::default());
    let mut cfg = p.bosh_config();
    cfg.url = proxy.url.clone();
    cfg.wait = 10;
    cfg.metrics = metrics.clone();
    let client = BoshClient::new(cfg).unwrap();
    let (jid, pw) = p.user("g33a");
    let mut s = support::login(&client, &jid, &pw, Some("cut"))
        .await
        .unwrap();
    assert_eq!(s.params.wait, 10);
    go_online(&mut s, LIMIT).await;
    let contact = p.contact("g33b", "contact").await;

    // The user idles; every held request is cut (four times: ~10-14 s).
    proxy.cut_count_reaches(4, Duration::from_secs(30)).await;
    only_stanzas_so_far(&mut s);
    assert_eq!(p.sessions_of(&jid), [format!("{jid}/cut")]);

    // Right after a cut the resent request is fresh at the server: a message now is not raced by
    // the next cut. It arrives once, on the same session. (On ejabberd the fourth cut is the
    // second of one rid, whose resend is answered from its cache while the cut receiver stays
    // registered: a message now was lost before the next rid went out at once.)
    let me = jid.to_string();
    contact
        .handle
        .send(chat(&me, "after the cuts"))
        .await
        .unwrap();
    let got = next_message_no_failure(&mut s).await;
    assert_eq!(body_text(&got).as_deref(), Some("after the cuts"));
    assert_eq!(got.attr("from"), Some(contact.jid.to_string().as_str()));
    // Every cut so far was seen by the scheduler before the response that carried the message.
    let cuts = proxy.cuts();
    assert_eq!(
        metrics.upstream_cuts.load(Ordering::Relaxed),
        u64::from(cuts)
    );
    contact.handle.send(chat(&me, "marker")).await.unwrap();
    let got = next_message_no_failure(&mut s).await;
    assert_eq!(
        body_text(&got).as_deref(),
        Some("marker"),
        "the first message came twice"
    );
    assert_eq!(metrics.upstream_retries.load(Ordering::Relaxed), 0);
    assert_eq!(p.sessions_of(&jid), [format!("{jid}/cut")]);

    // What was learned: a shorter wait for the next session, said once at warn.
    assert_eq!(client.config().wait_hint.get(), Some(next_wait));
    let needle = format!("next_wait={next_wait}");
    let warned = String::from_utf8_lossy(&log.lock())
        .lines()
        .filter(|l| l.contains(" WARN ") && l.split_whitespace().any(|w| w == needle))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].split_whitespace().any(|w| w == "wait=10"),
        "{}",
        warned[0]
    );
    s.handle.terminate(vec![]).await.unwrap();

    // A new session of the same client asks for it, the server grants it, and the proxy no
    // longer cuts: three held requests come back on their own.
    let s2 = support::login(&client, &jid, &pw, Some("cut-2"))
        .await
        .unwrap();
    assert_eq!(s2.params.wait, next_wait);
    let cuts = proxy.cuts();
    let start = s2.handle.stats().await.unwrap().requests;
    eventually(
        "three answered polls of the new session",
        Duration::from_secs(20),
        || async {
            let st = s2.handle.stats().await.unwrap();
            (st.requests >= start + 3).then_some(())
        },
    )
    .await;
    assert_eq!(proxy.cuts(), cuts, "the shorter wait was still cut");
    s2.handle.terminate(vec![]).await.unwrap();
    contact.handle.terminate(vec![]).await.unwrap();
}
