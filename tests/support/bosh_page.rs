//! A page that speaks BOSH to the daemon's `/http-bind` (XEP-0124 + XEP-0206), one request at a
//! time, with the rid under the test's control.

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine as _;
use boshmux::xmpp::{self, Element, Limits, ns};

use super::daemon::Daemon;

/// Longer than the longest `wait` the daemon grants (60 s).
const LIMIT: Duration = Duration::from_secs(90);

/// An HTTP answer: status, headers, body text.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    /// The body, parsed.
    pub fn body(&self) -> Element {
        xmpp::parse(self.text.as_bytes(), &Limits::PAGE)
            .unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
}

/// POSTs `body` to `url`, with `Origin` when given.
pub async fn post(url: &str, origin: Option<&str>, body: &str) -> Answer {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "text/xml; charset=utf-8")
        .body(body.to_owned());
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    let resp = tokio::time::timeout(LIMIT, req.send())
        .await
        .expect("answered in time")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        text,
    }
}

/// A BOSH page of the daemon.
pub struct BoshPage {
    pub url: String,
    pub origin: Option<String>,
    pub sid: String,
    /// The rid of the next request.
    pub rid: u64,
    pub jid: String,
    /// Stanzas received and not yet taken.
    inbox: VecDeque<Element>,
    /// The terminate body, once received.
    pub terminated: Option<Element>,
}

/// The `condition` of a terminate body (`""` for none), or `None` if it is not a terminate.
pub fn terminate_condition(body: &Element) -> Option<String> {
    (body.attr("type") == Some("terminate"))
        .then(|| body.attr("condition").unwrap_or_default().to_owned())
}

impl BoshPage {
    /// Creates a virtual session (`wait` seconds, hold 1): the creation response.
    pub async fn create(d: &Daemon, origin: Option<&str>, wait: u32) -> (BoshPage, Element) {
        let rid = 1000 + u64::from(rand::random::<u16>());
        let url = d.url("/http-bind");
        let a = post(
            &url,
            origin,
            &format!(
                "<body xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh' \
                 content='text/xml; charset=utf-8' hold='1' rid='{rid}' to='{}' ver='1.6' \
                 wait='{wait}' xml:lang='en' xmpp:version='1.0'/>",
                d.domain
            ),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text);
        let body = a.body();
        let sid = body
            .attr("sid")
            .unwrap_or_else(|| panic!("no sid: {}", a.text))
            .to_owned();
        (
            BoshPage {
                url,
                origin: origin.map(str::to_owned),
                sid,
                rid: rid + 1,
                jid: String::new(),
                inbox: VecDeque::new(),
                terminated: None,
            },
            body,
        )
    }

    /// A page attached to a prebind's `jid`, `sid` and `rid`, as Strophe's `attach()` does.
    pub fn attach(d: &Daemon, jid: &str, sid: &str, rid: u64) -> BoshPage {
        BoshPage {
            url: d.url("/http-bind"),
            origin: None,
            sid: sid.to_owned(),
            rid,
            jid: jid.to_owned(),
            inbox: VecDeque::new(),
            terminated: None,
        }
    }

    /// Creates a page and logs in with PLAIN and `token`; returns it bound.
    pub async fn login(d: &Daemon, user: &str, token: &str) -> BoshPage {
        let mut page = BoshPage::authenticated(d, user, token).await;
        let r = page.bind_answer().await;
        page.jid = r
            .elements()
            .find_map(|c| {
                c.child("bind", ns::BIND)?
                    .child("jid", ns::BIND)
                    .map(Element::text)
            })
            .unwrap_or_else(|| panic!("no bind result: {r}"));
        page
    }

    /// Creates a page, authenticates with PLAIN and `token` and restarts the stream: the page
    /// is ready to bind.
    pub async fn authenticated(d: &Daemon, user: &str, token: &str) -> BoshPage {
        let (mut page, created) = BoshPage::create(d, None, 1).await;
        assert!(created.child("features", ns::STREAM).is_some(), "{created}");
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{token}"));
        let r = page
            .request(&format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
            ))
            .await;
        assert!(r.child("success", ns::SASL).is_some(), "{r}");
        let restart = page
            .raw(
                page.rid,
                &format!(
                    "<body xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh' \
                     rid='{}' sid='{}' to='{}' xml:lang='en' xmpp:restart='true'/>",
                    page.rid, page.sid, d.domain
                ),
            )
            .await
            .body();
        page.rid += 1;
        assert!(restart.child("features", ns::STREAM).is_some(), "{restart}");
        page
    }

    /// Sends the bind request; the response body (the bind result, or the page's end).
    pub async fn bind_answer(&mut self) -> Element {
        self.request(
            "<iq xmlns='jabber:client' type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>tab</resource></bind></iq>",
        )
        .await
    }

    /// A round trip through the session: everything this page sent before has been handled
    /// (stanzas received meanwhile are dropped).
    pub async fn sync(&mut self) {
        let id = format!("sync-{}", rand::random::<u32>());
        let domain = xmpp::Jid::parse(&self.jid)
            .expect("bound")
            .domain()
            .to_owned();
        let ping = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", id.clone())
            .with_attr("to", domain)
            .with_child(Element::new("ping", ns::PING));
        self.send(&ping).await;
        let reply = self
            .next_where(|e| e.is("iq", ns::CLIENT) && e.attr("id") == Some(id.as_str()))
            .await;
        assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    }

    /// POSTs raw bytes with `rid` (the caller's business); the answer.
    pub async fn raw(&self, _rid: u64, body: &str) -> Answer {
        post(&self.url, self.origin.as_deref(), body).await
    }

    /// The body text for `rid` carrying `inner`.
    pub fn body_text(&self, rid: u64, inner: &str) -> String {
        format!(
            "<body xmlns='http://jabber.org/protocol/httpbind' rid='{rid}' sid='{}'>{inner}</body>",
            self.sid
        )
    }

    /// Sends the next request carrying `inner` (raw XML); the response body. Stanzas received
    /// are also kept in the inbox.
    pub async fn request(&mut self, inner: &str) -> Element {
        let rid = self.rid;
        self.rid += 1;
        let a = self.raw(rid, &self.body_text(rid, inner)).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let body = a.body();
        if terminate_condition(&body).is_some() {
            self.terminated = Some(body.clone());
        }
        for c in body.elements() {
            if c.ns == ns::CLIENT {
                self.inbox.push_back(c.clone());
            }
        }
        body
    }

    /// Sends `stanza`; the response body.
    pub async fn send(&mut self, stanza: &Element) -> Element {
        self.request(&stanza.to_xml()).await
    }

    /// Polls until a stanza `want` accepts arrives (earlier ones are dropped); panics on a
    /// terminate.
    pub async fn next_where(&mut self, want: impl Fn(&Element) -> bool) -> Element {
        tokio::time::timeout(LIMIT, async {
            loop {
                while let Some(s) = self.inbox.pop_front() {
                    if want(&s) {
                        return s;
                    }
                }
                let body = self.request("").await;
                assert!(
                    terminate_condition(&body).is_none(),
                    "page terminated: {body}"
                );
            }
        })
        .await
        .expect("stanza in time")
    }

    /// The next `<message/>`.
    pub async fn next_message(&mut self) -> Element {
        self.next_where(|s| s.is("message", ns::CLIENT)).await
    }

    /// Polls until the page is terminated; the terminate body.
    pub async fn terminated(&mut self) -> Element {
        tokio::time::timeout(LIMIT, async {
            loop {
                if let Some(t) = self.terminated.take() {
                    return t;
                }
                self.request("").await;
            }
        })
        .await
        .expect("terminated in time")
    }
}
