//! The daemon's memory around a contact's stanza that expands upstream (issue 15 point 1): a
//! 180 KiB message that Prosody relays as a ~30 MB BOSH response (30 510 296 bytes from Prosody
//! 0.12.3, measured while writing this test) once made the daemon grow from 10 to 133 MB and
//! keep it. The response is now read one stanza at a time under a cap, so the daemon's peak
//! stays near where it was. Measured on a real `boshmux serve` process
//! (`/proc/<pid>/status`) against the real Prosody; accounts g45a (user) and g45b (contact).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use boshmux::bosh::Body;
use boshmux::xmpp::{Element, ns};
use support::process::{DaemonProcess, store_dir};
use support::{body_text, prosody, raw_login};
use tokio::sync::mpsc;

/// Most the daemon's peak resident size may grow over its size before the message. The old
/// daemon, which held the whole response, grew by ~120 MB.
const PEAK_GROWTH: u64 = 64 * 1024 * 1024;

/// `VmRSS` and `VmHWM` (peak) of process `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A contact on Prosody speaking raw BOSH, so it can send bytes our serializer would not write.
/// One request is kept at the server while waiting; the stanzas of every response arrive on
/// `inbox`.
struct Contact {
    url: String,
    sid: String,
    rid: u64,
    http: reqwest::Client,
    inbox: mpsc::UnboundedReceiver<Element>,
    inbox_tx: mpsc::UnboundedSender<Element>,
    waiting: Arc<AtomicUsize>,
}

impl Contact {
    async fn login(p: &support::Prosody, user: &str) -> Contact {
        let (jid, pw) = p.user(user);
        let (_, sid, rid) = raw_login(&p.bosh, &jid, &pw, "raw").await;
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        Contact {
            url: p.bosh.clone(),
            sid,
            rid,
            http: reqwest::Client::new(),
            inbox,
            inbox_tx,
            waiting: Arc::default(),
        }
    }

    /// Posts `payload` (raw XML) in the next request, without waiting for its response.
    fn send(&mut self, payload: &str) {
        let body = format!(
            "<body xmlns='http://jabber.org/protocol/httpbind' rid='{}' sid='{}'>{payload}</body>",
            self.rid, self.sid
        );
        self.rid += 1;
        let (http, url, tx) = (self.http.clone(), self.url.clone(), self.inbox_tx.clone());
        let waiting = self.waiting.clone();
        waiting.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let raw = http.post(url).body(body).send().await.unwrap();
            let raw = raw.bytes().await.unwrap();
            for el in Body::parse(&raw)
                .map(Body::into_children)
                .unwrap_or_default()
            {
                let _ = tx.send(el);
            }
            waiting.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// The first stanza with id `id`, waiting up to `limit`.
    async fn answer_to(&mut self, id: &str, limit: Duration) -> Element {
        tokio::time::timeout(limit, async {
            loop {
                if self.waiting.load(Ordering::SeqCst) == 0 {
                    self.send("");
                }
                // Wake at least every second to keep a request at the server.
                let next = tokio::time::timeout(Duration::from_secs(1), self.inbox.recv()).await;
                if let Ok(Some(el)) = next
                    && el.attr("id") == Some(id)
                {
                    return el;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no stanza {id:?} within {limit:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contacts_expanding_stanza_leaves_the_daemons_memory_where_it_was() {
    let p = prosody();
    let d = DaemonProcess::start(&p, &store_dir("inbound-memory"), &[]).await;
    let pid = d.pid();
    let h = d.daemon.handoff("g45a", "pw-g45a").await;
    let mut page = d.daemon.page("g45a", &h.token).await;
    page.send(&Element::new("presence", ns::CLIENT)).await;
    page.sync().await;
    let mut bob = Contact::login(&p, "g45b").await;
    // A first message through the whole path, so the baseline includes what any message costs.
    let to = &h.jid;
    bob.send(&format!(
        "<message xmlns='jabber:client' to='{to}' type='chat' id='warm'><body>before</body></message>"
    ));
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("before")
    );
    let (rss_before, hwm_before) = memory(pid);

    // 1 000-character namespace declared once, used by 30 000 children: Prosody writes the
    // declaration on every child, ~30 MB in one BOSH response.
    let hostile = format!(
        "<message xmlns='jabber:client' to='{to}' type='chat' id='huge' xmlns:p='urn:{}'>\
         <body>hostile</body>{}</message>",
        "n".repeat(1000),
        "<p:c/>".repeat(30_000)
    );
    assert!(hostile.len() < 190 * 1024);
    bob.send(&hostile);
    let bounce = bob.answer_to("huge", Duration::from_secs(120)).await;
    assert_eq!(bounce.attr("type"), Some("error"), "{bounce}");
    bob.send(&format!(
        "<message xmlns='jabber:client' to='{to}' type='chat' id='next'><body>after</body></message>"
    ));
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("after")
    );
    let (rss_after, hwm_after) = memory(pid);

    let peak_growth = hwm_after.saturating_sub(rss_before);
    println!(
        "daemon RSS before {:.1} MiB (peak so far {:.1} MiB); peak after the ~30 MB response \
         {:.1} MiB (+{:.1} MiB); RSS after {:.1} MiB ({:+.1} MiB)",
        mib(rss_before),
        mib(hwm_before),
        mib(hwm_after),
        mib(peak_growth),
        mib(rss_after),
        mib(rss_after) - mib(rss_before),
    );
    assert!(
        peak_growth < PEAK_GROWTH,
        "the daemon's peak grew by {:.1} MiB (limit {:.0} MiB)",
        mib(peak_growth),
        mib(PEAK_GROWTH)
    );
    // The session survived: one login, no re-login, no resend of the response.
    assert_eq!(d.counter("boshmux_logins_total").await, 1);
    assert_eq!(d.counter("boshmux_relogins_total").await, 0);
    assert_eq!(d.counter("boshmux_upstream_retries_total").await, 0);
    assert_eq!(
        d.counter("boshmux_inbound_stanzas_dropped_total{reason=\"too_large\"}")
            .await,
        1
    );
}
