//! The page side: one WebSocket per page, speaking RFC 7395. [`frame`] checks what a page sends
//! and builds stream-level frames; [`conn`] runs a page's socket: the handshake (SASL with a
//! token, bind answered from memory) and then the relay between socket and session; [`bosh`]
//! serves pages that speak BOSH instead, each a virtual BOSH session on the same path; [`close`]
//! names the close codes.

pub mod bosh;
pub mod close;
pub mod conn;
pub mod frame;

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::time::Instant;

/// A text frame ready to write to any number of pages: serialized once, shared by reference.
/// It remembers when it was made, so the page task can measure fan-out latency. One pointer
/// wide, so a page's queue of them stays small.
#[derive(Debug, Clone)]
pub struct Frame(Arc<Made>);

#[derive(Debug)]
struct Made {
    text: Utf8Bytes,
    at: Instant,
}

impl Frame {
    /// Its length in bytes (what it costs in a page's queue).
    pub fn len(&self) -> usize {
        self.0.text.len()
    }

    /// True for an empty frame.
    pub fn is_empty(&self) -> bool {
        self.0.text.is_empty()
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.text.as_str()
    }

    /// When the frame was made.
    pub fn made_at(&self) -> Instant {
        self.0.at
    }

    /// The text, for a WebSocket message (shares the bytes).
    pub(crate) fn text(&self) -> Utf8Bytes {
        self.0.text.clone()
    }
}

impl From<String> for Frame {
    fn from(s: String) -> Self {
        Frame(Arc::new(Made {
            text: Utf8Bytes::from(s),
            at: Instant::now(),
        }))
    }
}
