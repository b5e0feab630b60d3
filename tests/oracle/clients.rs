//! The clients a script drives: resources logged in straight to the server over BOSH, and pages of
//! the daemon speaking RFC 7395. Each keeps everything it receives, in order, in a [`Log`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use boshmux::bosh::{BoshClient, BoshEvent, BoshHandle};
use boshmux::xmpp::{self, Element, Jid, Limits, ns};
use futures_util::stream::{SplitSink, StreamExt as _};
use futures_util::{SinkExt as _, Stream};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::Prosody;

/// How long any one awaited stanza may take.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Every stanza one client received, in arrival order.
pub struct Log {
    items: Mutex<Vec<Element>>,
    len: watch::Sender<usize>,
}

impl Log {
    fn new() -> Arc<Log> {
        Arc::new(Log {
            items: Mutex::new(Vec::new()),
            len: watch::channel(0).0,
        })
    }

    fn push(&self, e: Element) {
        let n = {
            let mut items = self.items.lock().unwrap();
            items.push(e);
            items.len()
        };
        self.len.send_replace(n);
    }

    pub fn len(&self) -> usize {
        self.items.lock().unwrap().len()
    }

    /// A copy of the stanzas in `from..to`.
    pub fn slice(&self, from: usize, to: usize) -> Vec<Element> {
        self.items.lock().unwrap()[from..to].to_vec()
    }

    /// The index of the first stanza at or after `from` that `want` accepts, waiting up to `limit`.
    pub async fn find(
        &self,
        from: usize,
        limit: Duration,
        want: impl Fn(&Element) -> bool,
    ) -> Option<usize> {
        let mut rx = self.len.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        let mut checked = from;
        loop {
            rx.mark_unchanged();
            {
                let items = self.items.lock().unwrap();
                if let Some(i) = items[checked.min(items.len())..].iter().position(&want) {
                    return Some(checked + i);
                }
                checked = checked.max(items.len());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                return None;
            }
        }
    }
}

type WsSink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

enum Conn {
    Direct(BoshHandle),
    Page(WsSink),
}

/// One client: a direct resource or a daemon page.
pub struct Client {
    conn: Conn,
    pub log: Arc<Log>,
    /// The full JID the client was bound to.
    pub jid: String,
    reader: tokio::task::JoinHandle<()>,
}

impl Client {
    /// A resource of `user` logged in straight to the server (SCRAM over BOSH).
    pub async fn direct(p: &Prosody, user: &str, resource: &str) -> Client {
        let (jid, pw) = p.user(user);
        // PLAIN: the oracle compares stanzas, not SASL, and SCRAM's key derivation would
        // dominate the run time in a debug build.
        let mut cfg = p.bosh_config();
        cfg.mechanisms = vec![boshmux::xmpp::sasl::Mechanism::Plain];
        let session = BoshClient::new(cfg)
            .unwrap()
            .login(&jid, &pw, Some(resource), &boshmux::store::Store::none())
            .await
            .unwrap_or_else(|e| panic!("direct login of {jid}/{resource}: {e}"));
        // Nothing is kept to resume from: every response counts as handed on at once.
        session.handle.handed_on(u64::MAX);
        let log = Log::new();
        let sink = Arc::clone(&log);
        let mut events = session.events;
        let reader = tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    BoshEvent::Response { stanzas, .. } => {
                        stanzas.into_iter().for_each(|s| sink.push(s))
                    }
                    BoshEvent::Ended(_) => break,
                    _ => {}
                }
            }
        });
        Client {
            conn: Conn::Direct(session.handle),
            log,
            jid: session.jid.to_string(),
            reader,
        }
    }

    /// A page of the daemon at `ws_url`, authenticated with PLAIN and the session token.
    pub async fn page(ws_url: &str, domain: &str, user: &str, token: &str) -> Client {
        let mut req = ws_url.into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("xmpp"));
        req.headers_mut()
            .insert("origin", HeaderValue::from_static(super::ORIGIN));
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("page upgrade");
        let (mut sink, mut stream) = ws.split();
        let open = format!(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='{domain}' version='1.0'/>"
        );
        let send = |text: String| Message::Text(text.into());
        sink.send(send(open.clone())).await.unwrap();
        expect(&mut stream, "open").await;
        expect(&mut stream, "features").await;
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{token}"));
        sink.send(send(format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"
        )))
        .await
        .unwrap();
        expect(&mut stream, "success").await;
        sink.send(send(open)).await.unwrap();
        expect(&mut stream, "open").await;
        expect(&mut stream, "features").await;
        sink.send(send(
            "<iq xmlns='jabber:client' type='set' id='o-bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
                .to_owned(),
        ))
        .await
        .unwrap();
        let bound = expect(&mut stream, "iq").await;
        let jid = bound
            .child("bind", ns::BIND)
            .and_then(|b| b.child("jid", ns::BIND))
            .map(Element::text)
            .expect("bind result");
        let log = Log::new();
        let into = Arc::clone(&log);
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(t) = msg
                    && let Ok(el) = parse(t.as_bytes())
                    && !el.is("close", ns::FRAMING)
                {
                    into.push(el);
                }
            }
        });
        Client {
            conn: Conn::Page(sink),
            log,
            jid,
            reader,
        }
    }

    pub async fn send(&mut self, e: Element) {
        match &mut self.conn {
            Conn::Direct(h) => h.send(e).await.expect("direct session alive"),
            Conn::Page(s) => s
                .send(Message::Text(e.to_xml().into()))
                .await
                .expect("page socket open"),
        }
    }

    /// Ends the client: a page closes its stream and waits for the socket to close; a direct
    /// resource terminates its BOSH session.
    pub async fn close(mut self) {
        match &mut self.conn {
            Conn::Direct(h) => {
                let _ = tokio::time::timeout(LIMIT, h.terminate(Vec::new())).await;
            }
            Conn::Page(s) => {
                let _ = s
                    .send(Message::Text(
                        "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>".into(),
                    ))
                    .await;
                let _ = tokio::time::timeout(LIMIT, &mut self.reader).await;
            }
        }
        self.reader.abort();
    }
}

fn parse(bytes: &[u8]) -> Result<Element, xmpp::ParseError> {
    xmpp::parse(
        bytes,
        &Limits {
            max_bytes: 1 << 24,
            ..Limits::PAGE
        },
    )
}

/// The next frame during the handshake, which must be an element named `name`.
async fn expect<S>(stream: &mut S, name: &str) -> Element
where
    S: Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(LIMIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("page handshake: timed out waiting for <{name}/>"))
            .expect("page socket open")
            .expect("page frame");
        if let Message::Text(t) = msg {
            let el = parse(t.as_bytes()).expect("server frame parses");
            assert_eq!(el.name, name, "page handshake: {el}");
            return el;
        }
    }
}

/// A bare JID string of `jid`.
pub fn bare(jid: &str) -> String {
    Jid::parse(jid).map_or_else(|_| jid.to_owned(), |j| j.to_bare().to_string())
}
