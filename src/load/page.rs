//! One simulated page of `boshmux load`: a WebSocket to the daemon doing the RFC 7395 handshake
//! with PLAIN + token, or (`--direct`) a BOSH session of its own straight to the XMPP server.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use futures_util::SinkExt as _;
use futures_util::stream::{SplitSink, StreamExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{LoadArgs, Shared};
use crate::bosh::{BoshClient, BoshConfig, BoshEvent, BoshHandle, BoshSession};
use crate::xmpp::{self, Element, Jid, Limits, ns};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An account of the run. `Debug` hides the password.
#[derive(Clone)]
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) bare: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("bare", &self.bare)
            .finish_non_exhaustive()
    }
}

/// An open page.
pub(crate) enum Page {
    /// Through the daemon.
    Ws {
        sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
        reader: JoinHandle<()>,
    },
    /// Straight to the XMPP server.
    Direct {
        handle: BoshHandle,
        reader: JoinHandle<()>,
    },
}

/// Hands `user` off; returns the token.
pub(crate) async fn handoff(args: &LoadArgs, user: &User) -> Result<String, String> {
    let body = serde_json::json!({ "jid": user.bare, "password": user.password });
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/sessions",
            args.url.trim_end_matches('/')
        ))
        .bearer_auth(&args.api_key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    match json["token"].as_str() {
        Some(t) if status < 300 => Ok(t.to_owned()),
        _ => Err(format!(
            "HTTP {status}: {}",
            json["error"].as_str().unwrap_or("?")
        )),
    }
}

/// `boshmux_upstream_requests_total` from the daemon's metrics (not in `--direct` mode).
pub(crate) async fn upstream_requests(args: &LoadArgs) -> Option<u64> {
    if args.direct.is_some() {
        return None;
    }
    let text = reqwest::get(format!("{}/metrics", args.url.trim_end_matches('/')))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("boshmux_upstream_requests_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// Requests made by the direct BOSH sessions.
pub(crate) async fn direct_requests(pages: &[Vec<Page>]) -> Option<u64> {
    let mut total = 0;
    let mut any = false;
    for page in pages.iter().flatten() {
        if let Page::Direct { handle, .. } = page {
            any = true;
            total += handle.stats().await.map_or(0, |s| s.requests);
        }
    }
    any.then_some(total)
}

/// Opens a page for `user`; counts and times the join. `None` (with the error counted) on failure.
pub(crate) async fn open(
    args: &LoadArgs,
    user: &User,
    token: Option<&str>,
    shared: &Arc<Shared>,
) -> Option<Page> {
    let started = std::time::Instant::now();
    let page = match (&args.direct, token) {
        (Some(url), _) => direct(url, user, shared).await,
        (None, Some(token)) if args.page_transport == super::PageTransport::Bosh => {
            // A page's virtual BOSH session at the daemon: the token is the PLAIN password.
            let page_user = User {
                password: token.to_owned(),
                ..user.clone()
            };
            let url = format!("{}/http-bind", args.url.trim_end_matches('/'));
            direct(&url, &page_user, shared).await
        }
        (None, Some(token)) => websocket(args, user, token, shared).await,
        (None, None) => Err("no token".into()),
    };
    match page {
        Ok(page) => {
            shared.joined.fetch_add(1, Ordering::Relaxed);
            shared
                .join_us
                .lock()
                .push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            Some(page)
        }
        Err(e) => {
            shared.errors.add(format!("join: {e}"));
            None
        }
    }
}

async fn websocket(
    args: &LoadArgs,
    user: &User,
    token: &str,
    shared: &Arc<Shared>,
) -> Result<Page, String> {
    let ws = handshake(args, user, token).await?;
    let (sink, mut stream) = ws.split();
    let shared = shared.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Text(t) => received(&shared, t.as_str()),
                Message::Close(frame) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    shared.errors.add(format!("closed by the daemon ({code})"));
                    break;
                }
                _ => {}
            }
        }
    });
    Ok(Page::Ws {
        sink: tokio::sync::Mutex::new(sink),
        reader,
    })
}

/// Opens `/ws` at `args.url` and does the RFC 7395 handshake as `user` with PLAIN + `token`:
/// features, auth, restart, bind, initial presence. Returns the bound stream.
pub(crate) async fn handshake(args: &LoadArgs, user: &User, token: &str) -> Result<Ws, String> {
    let ws_url = format!(
        "{}/ws",
        args.url.trim_end_matches('/').replacen("http", "ws", 1)
    );
    let mut ws = connect(&ws_url).await?;
    let open = format!(
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='{}' version='1.0'/>",
        args.domain
    );
    send(&mut ws, &open).await?;
    expect(&mut ws, "features").await?;
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{token}", user.name));
    send(
        &mut ws,
        &format!(
            "<auth xmlns='{}' mechanism='PLAIN'>{plain}</auth>",
            ns::SASL
        ),
    )
    .await?;
    expect(&mut ws, "success").await?;
    send(&mut ws, &open).await?;
    expect(&mut ws, "features").await?;
    send(
        &mut ws,
        &format!(
            "<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='{}'/></iq>",
            ns::BIND
        ),
    )
    .await?;
    expect(&mut ws, "iq").await?;
    send(&mut ws, "<presence xmlns='jabber:client'/>").await?;
    Ok(ws)
}

/// `user` logged in straight to the XMPP server at `url` (BOSH, nothing kept to resume from)
/// and available. Errors are the login's or the send's, as text.
pub(crate) async fn direct_online(url: &str, user: &User) -> Result<BoshSession, String> {
    let client = BoshClient::new(BoshConfig::new(url)).map_err(|e| e.to_string())?;
    let jid = Jid::parse(&user.bare).map_err(|e| e.to_string())?;
    let session = client
        .login(&jid, &user.password, None, &crate::store::Store::none())
        .await
        .map_err(|e| e.to_string())?;
    // Nothing is kept to resume from: every response counts as handed on at once.
    session.handle.handed_on(u64::MAX);
    session
        .handle
        .send(Element::new("presence", ns::CLIENT))
        .await
        .map_err(|e| e.to_string())?;
    Ok(session)
}

async fn direct(url: &str, user: &User, shared: &Arc<Shared>) -> Result<Page, String> {
    let mut session = direct_online(url, user).await?;
    let shared = shared.clone();
    let reader = tokio::spawn(async move {
        while let Some(event) = session.events.recv().await {
            match event {
                BoshEvent::Response { stanzas, .. } => {
                    for s in stanzas {
                        if let Some(body) = s.child("body", ns::CLIENT) {
                            count(&shared, &body.text());
                        }
                    }
                }
                BoshEvent::Ended(Err(e)) => {
                    shared.errors.add(format!("upstream session lost: {e}"));
                    break;
                }
                BoshEvent::Ended(Ok(())) => break,
                _ => {}
            }
        }
    });
    Ok(Page::Direct {
        handle: session.handle,
        reader,
    })
}

impl Page {
    /// Sends message `seq` stamped `sent_us` to `to`.
    pub(crate) async fn send_message(&self, to: &str, seq: u64, sent_us: u64) -> bool {
        let msg = Element::new("message", ns::CLIENT)
            .with_attr("to", to)
            .with_attr("type", "chat")
            .with_attr("id", format!("lt{seq}"))
            .with_child(Element::new("body", ns::CLIENT).with_text(format!("lt {seq} {sent_us}")));
        match self {
            Page::Ws { sink, .. } => sink
                .lock()
                .await
                .send(Message::Text(msg.to_xml().into()))
                .await
                .is_ok(),
            Page::Direct { handle, .. } => handle.send(msg).await.is_ok(),
        }
    }

    /// Ends the page politely.
    pub(crate) async fn close(self) {
        match self {
            Page::Ws { sink, reader } => {
                reader.abort(); // the daemon's answering close is not an error
                let mut sink = sink.into_inner();
                let _ = sink
                    .send(Message::Text(
                        "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>".into(),
                    ))
                    .await;
                let _ = sink.close().await;
            }
            Page::Direct { handle, reader } => {
                reader.abort();
                let _ = handle.terminate(vec![]).await;
            }
        }
    }
}

/// Opens the WebSocket; an upgrade refused for its rate (429) is retried shortly, as a browser
/// page's reconnect would.
async fn connect(url: &str) -> Result<Ws, String> {
    let mut attempt = 0u32;
    loop {
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("xmpp"));
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => return Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp))
                if resp.status() == 429 && attempt < 50 =>
            {
                attempt += 1;
                let jitter = rand::random_range(50..150);
                tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
            }
            Err(e) => return Err(format!("connect: {e}")),
        }
    }
}

async fn send(ws: &mut Ws, text: &str) -> Result<(), String> {
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// Reads frames until one whose element is named `name` (skipping `open`), failing on anything
/// that ends the handshake.
async fn expect(ws: &mut Ws, name: &str) -> Result<(), String> {
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| format!("no <{name}/> within 30 s"))?;
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                return Err(format!(
                    "closed ({}) during the handshake",
                    f.map_or(1005, |f| u16::from(f.code))
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("connection ended during the handshake".into()),
        };
        let el = xmpp::parse(text.as_bytes(), &Limits::PAGE).map_err(|e| e.to_string())?;
        if el.name == name {
            return Ok(());
        }
        if el.name == "failure" || el.name == "error" {
            return Err(format!("<{}/> during the handshake", el.name));
        }
    }
}

/// A frame from the daemon: counts a load message (a carbon has no top-level body).
fn received(shared: &Shared, frame: &str) {
    if !frame.contains(">lt ") {
        return;
    }
    if let Ok(el) = xmpp::parse(frame.as_bytes(), &Limits::PAGE)
        && el.is("message", ns::CLIENT)
        && let Some(body) = el.child("body", ns::CLIENT)
    {
        count(shared, &body.text());
    }
}

fn count(shared: &Shared, body: &str) {
    let mut parts = body.split(' ');
    if parts.next() != Some("lt") {
        return;
    }
    let (Some(_seq), Some(sent)) = (
        parts.next(),
        parts.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return;
    };
    shared.delivered.fetch_add(1, Ordering::Relaxed);
    shared
        .latency_us
        .lock()
        .push(shared.now_us().saturating_sub(sent));
}
