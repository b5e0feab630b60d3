//! A page on this node whose session another node drives (SPEC §12: "a page that lands on
//! another node is served through the owner and cannot tell"). The page's task talks to a
//! [`SessionHandle::relayed`] handle as to any session; behind it, one WebSocket per page to
//! the owner's `/cluster/v1/pages/{bare}` carries the page's checked stanzas there and the
//! owner's frames back. The owner treats the link as one of the session's pages (replay,
//! carbons, iq routing, queue limit); this end adds the page's own queue limit.
//!
//! Close codes pass through: the owner's 4001/4003/4004 reach the page as they are. A link
//! that cannot be made, or breaks without a close (the owner died), closes the page with 1012,
//! so that it reconnects — by then through the node that adopted the session.

use std::sync::atomic::Ordering;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::metrics::Metrics;
use crate::page::Frame;
use crate::page::close::{LOST, NORMAL, RESTARTING, REVOKED, SLOW, TOO_MANY_PAGES};
use crate::session::{AttachError, Refused, Registry, Relayed, SessionHandle};
use crate::store::redis::Member;
use crate::xmpp::Jid;

/// The header that names the node a request was relayed or forwarded from; a request carrying
/// it is served where it lands, never sent on again.
pub const FORWARDED_HEADER: &str = "x-boshmux-forwarded-by";

/// A handle for one page on `bare`'s session, which `owner` drives. `queue_limit`: bytes the
/// page may have waiting here before it is closed with 4002.
pub fn relayed(
    registry: &Registry,
    bare: Jid,
    owner: Member,
    api_key: String,
    queue_limit: usize,
    live: Live,
) -> SessionHandle {
    let (handle, commands) = SessionHandle::relayed(bare.clone(), registry.next_id());
    let metrics = registry.metrics.clone();
    tokio::spawn(async move {
        run(commands, bare, owner, api_key, queue_limit, live, &metrics).await;
    });
    handle
}

/// The cluster's live members, as its heartbeat last saw them.
pub type Live = tokio::sync::watch::Receiver<std::sync::Arc<Vec<String>>>;

/// The reason shown with close code `code` (a page sees the code; the text is for logs).
fn reason(code: u16) -> &'static str {
    match code {
        NORMAL => "closed",
        REVOKED => "logged out",
        SLOW => "page too slow",
        TOO_MANY_PAGES => "too many pages for this user",
        LOST => "session not available",
        _ => "session moving to another node; reconnect",
    }
}

async fn run(
    mut commands: crate::session::RelayedCommands,
    bare: Jid,
    owner: Member,
    api_key: String,
    queue_limit: usize,
    mut live: Live,
    metrics: &Metrics,
) {
    let Some(Relayed::Attach { link, reply }) = commands.next().await else {
        return;
    };
    let url = format!(
        "{}/cluster/v1/pages/{}",
        owner.url.replacen("http", "ws", 1),
        bare
    );
    let request = match tungstenite::client::IntoClientRequest::into_client_request(url.as_str()) {
        Ok(mut r) => {
            let h = r.headers_mut();
            if let Ok(v) = format!("Bearer {api_key}").parse() {
                h.insert("authorization", v);
            }
            if let Ok(v) = owner.node_id().parse() {
                h.insert(FORWARDED_HEADER, v);
            }
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "cluster: bad relay URL");
            let _ = reply.send(Err(AttachError::Moving));
            return;
        }
    };
    let connected = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_tungstenite::connect_async(request),
    )
    .await;
    let mut ws = match connected {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            tracing::debug!(user = %bare, owner = %owner.id, error = %e, "cluster: owner not reachable");
            let _ = reply.send(Err(AttachError::Moving));
            return;
        }
        Err(_) => {
            let _ = reply.send(Err(AttachError::Moving));
            return;
        }
    };
    // The owner's first frame is the session's full JID, or a close that says why not.
    let jid = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match Jid::parse(t.as_str()) {
                Ok(j) => break j,
                Err(_) => {
                    let _ = reply.send(Err(AttachError::Moving));
                    return;
                }
            },
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(RESTARTING, |f| u16::from(f.code));
                let e = match code {
                    TOO_MANY_PAGES => AttachError::TooManyPages,
                    LOST | REVOKED => AttachError::Gone,
                    _ => AttachError::Moving,
                };
                let _ = reply.send(Err(e));
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                let _ = reply.send(Err(AttachError::Moving));
                return;
            }
        }
    };
    if reply.send(Ok(jid)).is_err() {
        let _ = ws.close(None).await;
        return;
    }
    metrics
        .cluster_relayed_pages
        .fetch_add(1, Ordering::Relaxed);
    relay(
        &mut commands,
        &mut ws,
        &link,
        queue_limit,
        &mut live,
        &owner,
        &bare,
    )
    .await;
    metrics
        .cluster_relayed_pages
        .fetch_sub(1, Ordering::Relaxed);
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Carries the page's stanzas to the owner and the owner's frames to the page, until either
/// ends or the owner leaves the cluster.
async fn relay(
    commands: &mut crate::session::RelayedCommands,
    ws: &mut Socket,
    link: &crate::session::PageLink,
    queue_limit: usize,
    live: &mut Live,
    owner: &Member,
    bare: &Jid,
) {
    let close = |code: u16| link.tx.close(code, reason(code));
    loop {
        tokio::select! {
            // An owner that lost its lease (frozen, cut off) keeps its sockets open: the page
            // goes to whoever adopts the session rather than wait on it.
            changed = live.changed() => {
                let gone = changed.is_err() || !live.borrow_and_update().contains(&owner.id);
                if gone {
                    tracing::debug!(user = %bare, owner = %owner.id, "cluster: the owner left; the page reconnects");
                    close(RESTARTING);
                    return;
                }
            }
            command = commands.next() => match command {
                Some(Relayed::FromPage(stanza)) => {
                    if ws.send(Message::text(stanza.to_xml())).await.is_err() {
                        close(RESTARTING);
                        return;
                    }
                }
                Some(Relayed::Detach) | None => {
                    let _ = ws.close(None).await;
                    return;
                }
                Some(Relayed::Attach { reply, .. }) => {
                    // One page per link: a second attach is a bug of the caller.
                    let _ = reply.send(Err(AttachError::Gone));
                }
            },
            message = ws.next() => match message {
                Some(Ok(Message::Text(t))) => {
                    let frame = Frame::from(t.as_str().to_owned());
                    match link.tx.frame(frame, queue_limit) {
                        Ok(()) => {}
                        Err(Refused::Full) => {
                            close(SLOW);
                            let _ = ws.close(None).await;
                            return;
                        }
                        Err(Refused::Closed) => {
                            let _ = ws.close(None).await;
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(RESTARTING, |f| u16::from(f.code));
                    close(code);
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    // The owner is gone without a word: the page reconnects, and finds the
                    // session where it is adopted.
                    close(RESTARTING);
                    return;
                }
            },
        }
    }
}
