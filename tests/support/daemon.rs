//! A boshmux daemon started in-process on `127.0.0.1:0`, the handoff API called over HTTP, and
//! pages as real WebSocket clients doing the RFC 7395 handshake.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use boshmux::config::Config;
use boshmux::xmpp::{self, Element, Limits, ns};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const API_KEY: &str = "test-api-key-0123456789";
pub const ORIGIN: &str = "https://app.example";
const LIMIT: Duration = Duration::from_secs(15);

/// A running daemon.
pub struct Daemon {
    pub addr: SocketAddr,
    pub domain: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    http: reqwest::Client,
}

/// What `POST /api/v1/sessions` returned.
#[derive(Debug, Clone)]
pub struct Handoff {
    pub status: u16,
    pub jid: String,
    pub token: String,
    pub ticket: String,
}

impl Daemon {
    /// Starts a daemon in front of `bosh_url`; `tune` adjusts the configuration.
    pub async fn start(bosh_url: &str, domain: &str, tune: impl FnOnce(&mut Config)) -> Daemon {
        Daemon::start_with(bosh_url, domain, None, tune).await
    }

    /// Like [`Daemon::start`], keeping sessions in `store` (shared with a later daemon: a
    /// restart within the test process).
    pub async fn start_with_store(
        bosh_url: &str,
        domain: &str,
        store: &boshmux::store::Store,
        tune: impl FnOnce(&mut Config),
    ) -> Daemon {
        Daemon::start_with(bosh_url, domain, Some(store.clone()), tune).await
    }

    async fn start_with(
        bosh_url: &str,
        domain: &str,
        store: Option<boshmux::store::Store>,
        tune: impl FnOnce(&mut Config),
    ) -> Daemon {
        let mut cfg = Config {
            bosh_url: Some(bosh_url.to_owned()),
            xmpp_domain: Some(domain.to_owned()),
            api_key: Some(API_KEY.to_owned()),
            allowed_origins: vec![ORIGIN.to_owned()],
            bosh_wait: 10,
            ..Config::default()
        };
        tune(&mut cfg);
        let state = match store {
            Some(store) => boshmux::server::build_with_store(cfg, store),
            None => boshmux::server::build(cfg),
        }
        .expect("daemon config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            boshmux::server::run(listener, state, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Daemon {
            addr,
            domain: domain.to_owned(),
            stop: Some(stop),
            task: Some(task),
            http: reqwest::Client::new(),
        }
    }

    /// A daemon running elsewhere (another process) at `addr`; `stop` does nothing.
    pub fn external(addr: SocketAddr, domain: &str) -> Daemon {
        Daemon {
            addr,
            domain: domain.to_owned(),
            stop: None,
            task: None,
            // Installs the TLS crypto provider, which nothing in this process may have done yet.
            http: boshmux::bosh::transport::http_client_builder()
                .build()
                .unwrap(),
        }
    }

    /// Stops the daemon and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("daemon stops in time")
                .unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Calls the API with the api key; returns status and JSON body.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(API_KEY);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// Hands a user off with a password; panics unless it succeeded.
    pub async fn handoff(&self, user: &str, password: &str) -> Handoff {
        let jid = format!("{user}@{}", self.domain);
        let (status, json) = self
            .api(
                reqwest::Method::POST,
                "/api/v1/sessions",
                Some(serde_json::json!({"jid": jid, "password": password})),
            )
            .await;
        assert!(
            status == 200 || status == 201,
            "handoff of {user}: {status} {json}"
        );
        Handoff {
            status,
            jid: json["jid"].as_str().unwrap().to_owned(),
            token: json["token"].as_str().unwrap().to_owned(),
            ticket: json["ticket"].as_str().unwrap().to_owned(),
        }
    }

    /// A page of `user` authenticating with PLAIN and `token`.
    pub async fn page(&self, user: &str, token: &str) -> Page {
        let mut page = Page::open(self, &[]).await.expect("upgrade");
        page.login_plain(user, token).await.expect("page login");
        page
    }

    /// The session's info from the API.
    pub async fn info(&self, bare: &str) -> serde_json::Value {
        let (status, json) = self
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/sessions/{bare}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{json}");
        json
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How a page's socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    /// Frames received just before the close (e.g. a stream error).
    pub frames: Vec<String>,
}

/// A page: a WebSocket client speaking RFC 7395.
pub struct Page {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    domain: String,
    pub jid: String,
    /// Every text frame received, in order.
    seen: Vec<String>,
}

impl Page {
    /// Opens the socket with `xmpp` offered and extra headers; `Err(status)` when refused.
    pub async fn open(d: &Daemon, headers: &[(&str, &str)]) -> Result<Page, u16> {
        Page::open_url(&d.ws_url(), &d.domain, headers, true).await
    }

    /// Opens the socket from the local address `from` (any 127.0.0.0/8 address is a different
    /// client on loopback), offering `xmpp`, with extra headers; `Err(status)` when refused.
    pub async fn open_from(
        d: &Daemon,
        from: std::net::IpAddr,
        headers: &[(&str, &str)],
    ) -> Result<Page, u16> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let tcp = socket.connect(d.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut req = d.ws_url().into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("xmpp"));
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        match tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)).await {
            Ok((ws, _)) => Ok(Page {
                ws,
                domain: d.domain.clone(),
                jid: String::new(),
                seen: Vec::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("connect: {e}"),
        }
    }

    /// Opens any URL, optionally without offering the subprotocol.
    pub async fn open_url(
        url: &str,
        domain: &str,
        headers: &[(&str, &str)],
        xmpp: bool,
    ) -> Result<Page, u16> {
        let mut req = url.into_client_request().unwrap();
        if xmpp {
            req.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("xmpp"));
        }
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, resp)) => {
                if xmpp {
                    assert_eq!(
                        resp.headers()
                            .get("sec-websocket-protocol")
                            .and_then(|v| v.to_str().ok()),
                        Some("xmpp"),
                        "the handshake must echo the subprotocol"
                    );
                }
                Ok(Page {
                    ws,
                    domain: domain.to_owned(),
                    jid: String::new(),
                    seen: Vec::new(),
                })
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("connect: {e}"),
        }
    }

    /// `<open/>`, and the features that follow.
    pub async fn open_stream(&mut self) -> Element {
        self.send_raw(&format!(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='{}' version='1.0'/>",
            self.domain
        ))
        .await;
        let open = self.next().await;
        assert!(open.is("open", ns::FRAMING), "{open}");
        let features = self.next().await;
        assert!(features.is("features", ns::STREAM), "{features}");
        features
    }

    /// The SASL mechanisms offered.
    pub fn mechanisms(features: &Element) -> Vec<String> {
        features
            .child("mechanisms", ns::SASL)
            .map(|m| m.elements().map(Element::text).collect())
            .unwrap_or_default()
    }

    /// Authenticates with `mechanism` and `payload` (raw, base64-encoded here); returns the
    /// server's answer (`success` or `failure`).
    pub async fn auth(&mut self, mechanism: &str, payload: &str) -> Element {
        let b64 = if payload.is_empty() {
            "=".to_owned()
        } else {
            base64::engine::general_purpose::STANDARD.encode(payload)
        };
        self.send_raw(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>{b64}</auth>"
        ))
        .await;
        self.next().await
    }

    /// After a successful auth: restart, bind; returns the bound JID.
    pub async fn bind(&mut self) -> Result<String, Closed> {
        let features = self.open_stream().await;
        assert!(features.child("bind", ns::BIND).is_some());
        self.send_raw(
            "<iq xmlns='jabber:client' type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>ignored-by-boshmux</resource></bind></iq>",
        )
        .await;
        match self.next_or_close().await {
            Ok(result) => {
                assert_eq!(result.attr("type"), Some("result"), "{result}");
                let jid = result
                    .child("bind", ns::BIND)
                    .unwrap()
                    .child("jid", ns::BIND)
                    .unwrap()
                    .text();
                self.jid = jid.clone();
                Ok(jid)
            }
            Err(closed) => Err(closed),
        }
    }

    /// The whole handshake with PLAIN and a token.
    pub async fn login_plain(&mut self, user: &str, token: &str) -> Result<String, String> {
        let features = self.open_stream().await;
        assert!(Self::mechanisms(&features).contains(&"PLAIN".to_owned()));
        let answer = self.auth("PLAIN", &format!("\0{user}\0{token}")).await;
        if !answer.is("success", ns::SASL) {
            return Err(answer.to_xml());
        }
        self.bind().await.map_err(|c| format!("closed {c:?}"))
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// Like [`Page::send_raw`], for a sender that expects the socket may already be closed
    /// (by its previous frame): `false` when the frame could not be sent.
    pub async fn try_send_raw(&mut self, text: &str) -> bool {
        self.ws.send(Message::Text(text.into())).await.is_ok()
    }

    /// Sends any WebSocket message (binary, raw frames) as it is.
    pub async fn send_message(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    pub async fn send(&mut self, stanza: &Element) {
        self.send_raw(&stanza.to_xml()).await;
    }

    /// The next frame, parsed; panics on close or timeout.
    pub async fn next(&mut self) -> Element {
        match self.next_or_close().await {
            Ok(e) => e,
            Err(c) => panic!("page closed while a frame was expected: {c:?}"),
        }
    }

    /// The next frame, or how the socket closed.
    pub async fn next_or_close(&mut self) -> Result<Element, Closed> {
        let mut frames = Vec::new();
        loop {
            let msg = tokio::time::timeout(LIMIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    self.seen.push(t.to_string());
                    let el = xmpp::parse(
                        t.as_bytes(),
                        &Limits {
                            max_bytes: 1 << 24,
                            ..Limits::PAGE
                        },
                    )
                    .expect("server frames parse");
                    if el.is("error", ns::STREAM) || el.is("close", ns::FRAMING) {
                        frames.push(t.to_string());
                        continue;
                    }
                    if !frames.is_empty() {
                        panic!("frames after a stream error/close: {frames:?} then {t}");
                    }
                    return Ok(el);
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return Err(Closed { code, frames });
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(Closed { code: 1006, frames }),
            }
        }
    }

    /// The next text frame exactly as received (not parsed), how the socket closed, or `None`
    /// when nothing came within `limit`. For tests that judge every frame themselves; frames read
    /// here are not kept in [`Page::seen_frames`] (a long run would hoard them).
    pub async fn next_text(&mut self, limit: Duration) -> Option<Result<String, Closed>> {
        loop {
            let msg = tokio::time::timeout(limit, self.ws.next()).await.ok()?;
            return Some(match msg {
                Some(Ok(Message::Text(t))) => Ok(t.to_string()),
                Some(Ok(Message::Close(frame))) => Err(Closed {
                    code: frame.map_or(1005, |f| u16::from(f.code)),
                    frames: Vec::new(),
                }),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Err(Closed {
                    code: 1006,
                    frames: Vec::new(),
                }),
            });
        }
    }

    /// Waits for the socket to close; frames that arrive before are skipped.
    pub async fn closed(&mut self) -> Closed {
        loop {
            if let Err(c) = self.next_or_close().await {
                return c;
            }
        }
    }

    /// The next stanza matching `want`, skipping others.
    pub async fn next_where(&mut self, want: impl Fn(&Element) -> bool) -> Element {
        loop {
            let e = self.next().await;
            if want(&e) {
                return e;
            }
        }
    }

    /// The next `<message/>` with a body, skipping everything else.
    pub async fn next_message(&mut self) -> Element {
        self.next_where(|e| e.is("message", ns::CLIENT) && e.child("body", ns::CLIENT).is_some())
            .await
    }

    /// Sends `iq` and waits for its reply (same id); other stanzas are skipped.
    pub async fn iq(&mut self, iq: Element) -> Element {
        let id = iq.attr("id").expect("iq id").to_owned();
        self.send(&iq).await;
        self.next_where(|e| e.is("iq", ns::CLIENT) && e.attr("id") == Some(id.as_str()))
            .await
    }

    /// A round trip through the session: everything this page sent before has been handled.
    pub async fn sync(&mut self) {
        let id = format!("sync-{}", uuid::Uuid::new_v4().simple());
        let ping = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", id)
            .with_attr("to", self.domain.clone())
            .with_child(Element::new("ping", ns::PING));
        let reply = self.iq(ping).await;
        assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    }

    /// Every text frame this page has received.
    pub fn seen_frames(&self) -> &[String] {
        &self.seen
    }

    /// Sends `<close/>` and waits for the socket to close.
    pub async fn close(mut self) -> Closed {
        self.send_raw("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")
            .await;
        self.closed().await
    }

    /// Closes the TCP connection without any goodbye.
    /// Stops being a WebSocket client: from now on nothing is written (not even the automatic
    /// pong), and [`read_close_code`] reads what the daemon sends as raw bytes.
    pub fn into_tcp(self) -> TcpStream {
        match self.ws.into_inner() {
            MaybeTlsStream::Plain(tcp) => tcp,
            _ => panic!("test pages use plain TCP"),
        }
    }

    pub async fn drop_connection(self) {
        drop(self.ws);
    }
}

/// The close code as a number.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Reads server frames (unmasked, RFC 6455 §5.2) from a page's raw socket, writing nothing, until
/// a close frame: its status code. `None` when the socket ends without one.
pub async fn read_close_code(tcp: &mut TcpStream) -> Option<u16> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    loop {
        let mut at = 0;
        while buf.len() >= at + 2 {
            let opcode = buf[at] & 0x0f;
            let (len, head) = match buf[at + 1] & 0x7f {
                126 if buf.len() >= at + 4 => (
                    usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]])),
                    4,
                ),
                127 if buf.len() >= at + 10 => {
                    let n = u64::from_be_bytes(buf[at + 2..at + 10].try_into().unwrap());
                    (usize::try_from(n).unwrap(), 10)
                }
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if buf.len() < at + head + len {
                break;
            }
            if opcode == 0x8 {
                let payload = &buf[at + head..at + head + len];
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
            at += head + len;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(LIMIT, tcp.read(&mut chunk))
            .await
            .expect("timed out waiting for the close frame")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
