//! A page's outbound queue: what the session (or a cluster link) hands one page's task to write,
//! bounded in bytes by the sender (SPEC §9: a page that falls behind is closed, never waited for).
//!
//! Why not a tokio channel: an idle page is the common case, and an unbounded channel allocates
//! its first block of 32 slots (~1.7 KiB here) when it is made and keeps it. This queue holds
//! nothing until a frame comes and at most a few slots once drained, and it keeps the byte count
//! under the same lock as the frames, so "queued bytes" can never disagree with the queue. One
//! consumer, so one waker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::page::Frame;

/// What a page's task is handed.
#[derive(Debug)]
pub enum PageOut {
    /// A text frame to write.
    Frame(Frame),
    /// Close the socket with this code and reason.
    Close(u16, &'static str),
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The page's task is gone.
    Closed,
    /// The frame would take the page's queue past its byte limit: the page is too slow.
    Full,
}

/// Slots a drained queue keeps (16 bytes each).
const KEEP: usize = 4;

#[derive(Debug, Default)]
struct State {
    items: VecDeque<PageOut>,
    /// Bytes of frames queued or taken and not yet written ([`PageReceiver::written`]).
    bytes: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// The page task waiting for the queue (one consumer: a waker, not a waiter list).
    ready: AtomicWaker,
}

/// Makes a page's queue: the session's end and the page task's end.
pub fn page_queue() -> (PageSender, PageReceiver) {
    let shared = Arc::new(Shared::default());
    (PageSender(shared.clone()), PageReceiver(shared))
}

/// The session's end of a page's queue. Dropping it tells the page its session ended.
#[derive(Debug)]
pub struct PageSender(Arc<Shared>);

impl PageSender {
    /// Queues `frame` unless the bytes queued and not yet written would then exceed `limit`.
    ///
    /// # Errors
    /// [`Refused::Full`] when over the limit (nothing is queued), [`Refused::Closed`] when the
    /// page's task is gone.
    pub fn frame(&self, frame: Frame, limit: usize) -> Result<(), Refused> {
        {
            let mut st = self.0.state.lock();
            if st.receiver_gone {
                return Err(Refused::Closed);
            }
            let bytes = st.bytes + frame.len();
            if bytes > limit {
                return Err(Refused::Full);
            }
            st.bytes = bytes;
            st.items.push_back(PageOut::Frame(frame));
        }
        self.0.ready.wake();
        Ok(())
    }

    /// Tells the page to close with `code` and `reason` once what is queued before is written.
    /// Ignored when the page's task is gone.
    pub fn close(&self, code: u16, reason: &'static str) {
        {
            let mut st = self.0.state.lock();
            if st.receiver_gone {
                return;
            }
            st.items.push_back(PageOut::Close(code, reason));
        }
        self.0.ready.wake();
    }
}

impl Drop for PageSender {
    fn drop(&mut self) {
        self.0.state.lock().sender_gone = true;
        self.0.ready.wake();
    }
}

enum Taken {
    Item(PageOut),
    Empty,
    Ended,
}

/// The page task's end of its queue.
#[derive(Debug)]
pub struct PageReceiver(Arc<Shared>);

impl PageReceiver {
    /// The next item; `None` once the queue is empty and the session's end is gone.
    /// Cancel-safe: an item is taken only when the future completes.
    pub fn recv(&mut self) -> impl Future<Output = Option<PageOut>> + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<PageOut>> {
        match self.take() {
            Taken::Item(out) => return Poll::Ready(Some(out)),
            Taken::Ended => return Poll::Ready(None),
            Taken::Empty => {}
        }
        // Registered before looking again, so a frame queued in between is not missed.
        self.0.ready.register(cx.waker());
        match self.take() {
            Taken::Item(out) => Poll::Ready(Some(out)),
            Taken::Ended => Poll::Ready(None),
            Taken::Empty => Poll::Pending,
        }
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Option<PageOut> {
        match self.take() {
            Taken::Item(out) => Some(out),
            Taken::Empty | Taken::Ended => None,
        }
    }

    fn take(&mut self) -> Taken {
        let mut st = self.0.state.lock();
        match st.items.pop_front() {
            Some(out) => {
                // Drained after a burst: give its memory back. A few slots stay, so a page
                // getting one frame at a time does not allocate per frame (one stanza to a
                // thousand pages would be a thousand allocations in a row).
                if st.items.is_empty() && st.items.capacity() > KEEP {
                    st.items = VecDeque::new();
                }
                Taken::Item(out)
            }
            None if st.sender_gone => Taken::Ended,
            None => Taken::Empty,
        }
    }

    /// Counts `bytes` of taken frames as written to the socket (or given up), freeing that much
    /// of the queue's limit.
    pub fn written(&self, bytes: usize) {
        let mut st = self.0.state.lock();
        st.bytes = st.bytes.saturating_sub(bytes);
    }
}

impl Drop for PageReceiver {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.receiver_gone = true;
        st.items = VecDeque::new();
        st.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Frame {
        Frame::from(text.to_owned())
    }

    fn text(out: PageOut) -> String {
        match out {
            PageOut::Frame(f) => f.as_str().to_owned(),
            PageOut::Close(code, reason) => format!("close {code} {reason}"),
        }
    }

    #[tokio::test]
    async fn frames_and_a_close_arrive_in_order_then_the_end() {
        let (tx, mut rx) = page_queue();
        tx.frame(frame("<a/>"), 100).unwrap();
        tx.close(4002, "slow");
        tx.frame(frame("<b/>"), 100).unwrap();
        drop(tx);
        let mut seen = Vec::new();
        while let Some(out) = rx.recv().await {
            seen.push(text(out));
        }
        assert_eq!(seen, ["<a/>", "close 4002 slow", "<b/>"]);
    }

    #[tokio::test]
    async fn a_waiting_page_wakes_for_a_frame_sent_later() {
        let (tx, mut rx) = page_queue();
        let page = tokio::spawn(async move { rx.recv().await.map(text) });
        tokio::task::yield_now().await;
        tx.frame(frame("<late/>"), 100).unwrap();
        assert_eq!(page.await.unwrap().as_deref(), Some("<late/>"));
    }

    #[test]
    fn bytes_count_until_written_and_the_limit_refuses_without_queueing() {
        let (tx, mut rx) = page_queue();
        tx.frame(frame("12345"), 8).unwrap();
        assert_eq!(tx.frame(frame("6789"), 8), Err(Refused::Full));
        // Taken but not yet written still counts against the limit.
        let taken = rx.try_recv().unwrap();
        assert_eq!(tx.frame(frame("6789"), 8), Err(Refused::Full));
        rx.written(5);
        drop(taken);
        tx.frame(frame("6789"), 8).unwrap();
        assert_eq!(text(rx.try_recv().unwrap()), "6789");
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn a_gone_page_refuses_frames_and_ignores_closes() {
        let (tx, rx) = page_queue();
        drop(rx);
        assert_eq!(tx.frame(frame("<a/>"), 100), Err(Refused::Closed));
        tx.close(1000, "bye");
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = page_queue();
        for _ in 0..100 {
            tx.frame(frame("<x/>"), usize::MAX).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.state.lock().items.capacity(), 0);
        tx.frame(frame("<one/>"), usize::MAX).unwrap();
        rx.try_recv().unwrap();
        assert!(rx.0.state.lock().items.capacity() <= KEEP);
    }
}
