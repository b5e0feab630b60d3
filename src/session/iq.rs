//! iq routing (SPEC §6.1, §6.2). Outbound requests from pages go upstream under a rewritten id
//! that is unique across processes (a random per-instance prefix, so a restored session never
//! takes an answer still in flight for the previous process as its own); the answer whose id and
//! sender match goes back to the asking page with its original id. Inbound requests from upstream
//! go to every page; the first `result` goes upstream at once, an `error` waits until every page
//! answered or the timeout passed. JIDs are compared as parsed [`Jid`] values only.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::effect::PageId;
use crate::page::frame::error_reply;
use crate::xmpp::{Element, Jid, ns};

/// An iq request from a page, sent upstream under a rewritten id.
#[derive(Debug)]
struct OutIq {
    page: PageId,
    orig_id: String,
    to: Option<Jid>,
    deadline: Instant,
    roster_get: bool,
}

/// A request from upstream waiting for pages' answers.
#[derive(Debug)]
struct InIq {
    deadline: Instant,
    /// Pages that got the request and have not answered yet.
    waiting: BTreeSet<PageId>,
    /// The first `error` a page answered, held until every page answered or the deadline.
    first_error: Option<Element>,
}

/// Who sent a request from upstream: `None` for the user's own account (no `from`, or the bare
/// JID), which is how pages' answers (addressed to nobody or to the bare JID) find it again.
type InKey = (Option<Jid>, String);

/// What became of an answer from upstream.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// No request of ours has that id (late, duplicate or unsolicited).
    Unknown,
    /// The id is ours but the sender is not the one asked; the request stays pending.
    Spoofed,
    /// For `page`, with the original id restored.
    ToPage {
        /// The asking page.
        page: PageId,
        /// The answer, original id restored.
        iq: Element,
        /// The request was the user's roster get (the answer fills the roster cache).
        roster_get: bool,
    },
}

/// iq state of one session.
#[derive(Debug)]
pub struct Iqs {
    me: Jid,
    timeout: Duration,
    prefix: String,
    next: u64,
    out: HashMap<String, OutIq>,
    inbound: HashMap<InKey, InIq>,
    /// Roster pushes the daemon acknowledged itself; pages' acks are swallowed.
    acked_pushes: HashSet<String>,
}

impl Iqs {
    /// iq state for the session bound to `me`; requests time out after `timeout`.
    pub fn new(me: Jid, timeout: Duration) -> Iqs {
        Iqs {
            me,
            timeout,
            prefix: format!("bmx{:08x}-", rand::random::<u32>()),
            next: 0,
            out: HashMap::new(),
            inbound: HashMap::new(),
            acked_pushes: HashSet::new(),
        }
    }

    /// The session bound another full JID (after a re-login).
    pub fn set_jid(&mut self, me: Jid) {
        self.me = me;
    }

    /// The earliest deadline of a request either way.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.out
            .values()
            .map(|q| q.deadline)
            .chain(self.inbound.values().map(|q| q.deadline))
            .min()
    }

    /// A request from `page` (type get/set, `to` already parsed): the iq to send upstream, with
    /// its id replaced by one unique to this process.
    pub fn outbound(
        &mut self,
        page: PageId,
        mut iq: Element,
        to: Option<Jid>,
        roster_get: bool,
        now: Instant,
    ) -> Element {
        self.next += 1;
        let id = format!("{}{}", self.prefix, self.next);
        let orig_id = iq.attr("id").unwrap_or_default().to_owned();
        self.out.insert(
            id.clone(),
            OutIq {
                page,
                orig_id,
                to,
                deadline: now + self.timeout,
                roster_get,
            },
        );
        iq.set_attr("id", id);
        iq
    }

    /// A `result` or `error` from upstream.
    pub fn answer_from_upstream(&mut self, mut iq: Element) -> Answer {
        let id = iq.attr("id").unwrap_or_default();
        let Some(pending) = self.out.get(id) else {
            return Answer::Unknown;
        };
        let from = match iq.attr("from").map(Jid::parse) {
            None => None,
            Some(Ok(j)) => Some(j),
            Some(Err(_)) => return Answer::Spoofed,
        };
        if !self.sender_matches(pending.to.as_ref(), from.as_ref()) {
            return Answer::Spoofed;
        }
        let id = id.to_owned();
        let pending = self.out.remove(&id).expect("looked up above");
        iq.set_attr("id", pending.orig_id);
        Answer::ToPage {
            page: pending.page,
            iq,
            roster_get: pending.roster_get,
        }
    }

    /// A request from upstream handed to `pages` (none: answer it with [`Iqs::unavailable`]).
    pub fn inbound(&mut self, iq: &Element, pages: BTreeSet<PageId>, now: Instant) {
        let key = self.key(iq.attr("from"), iq.attr("id").unwrap_or_default());
        self.inbound.insert(
            key,
            InIq {
                deadline: now + self.timeout,
                waiting: pages,
                first_error: None,
            },
        );
    }

    /// A roster push the daemon acknowledged itself: pages' acks for `id` are swallowed.
    pub fn acked_push(&mut self, id: &str) {
        self.acked_pushes.insert(id.to_owned());
    }

    /// A page's `result` or `error`: what goes upstream now, if anything.
    pub fn answer_from_page(&mut self, page: PageId, iq: Element) -> Option<Element> {
        let id = iq.attr("id").unwrap_or_default();
        if self.acked_pushes.contains(id) {
            return None;
        }
        let key = self.key(iq.attr("to"), id);
        let pending = self.inbound.get_mut(&key)?;
        if iq.attr("type") == Some("result") {
            self.inbound.remove(&key);
            return Some(iq);
        }
        if !pending.waiting.remove(&page) {
            return None; // answered twice, or a page that never got the request
        }
        pending.first_error.get_or_insert(iq);
        if pending.waiting.is_empty() {
            return self.inbound.remove(&key).and_then(|q| q.first_error);
        }
        None
    }

    /// A page went away: requests it alone still owed an answer to are settled now.
    pub fn page_gone(&mut self, page: PageId) -> Vec<Element> {
        let mut done: Vec<InKey> = Vec::new();
        for (k, q) in &mut self.inbound {
            if q.waiting.remove(&page) && q.waiting.is_empty() {
                done.push(k.clone());
            }
        }
        done.into_iter()
            .filter_map(|k| {
                let q = self.inbound.remove(&k)?;
                Some(q.first_error.unwrap_or_else(|| self.unavailable(&k)))
            })
            .collect()
    }

    /// Requests past their deadline: errors for the pages that asked (original id), and the
    /// answers upstream gets for its requests (the first page error, or `service-unavailable`).
    pub fn expire(&mut self, now: Instant) -> (Vec<(PageId, Element)>, Vec<Element>) {
        let late: Vec<String> = self
            .out
            .iter()
            .filter(|(_, q)| q.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let expired: Vec<OutIq> = late
            .into_iter()
            .filter_map(|id| self.out.remove(&id))
            .collect();
        let to_pages = expired
            .into_iter()
            .map(|q| {
                let e = self.page_error(&q, "wait", "remote-server-timeout", "no reply in time");
                (q.page, e)
            })
            .collect();
        let late: Vec<InKey> = self
            .inbound
            .iter()
            .filter(|(_, q)| q.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let upstream = late
            .into_iter()
            .filter_map(|k| {
                let q = self.inbound.remove(&k)?;
                Some(q.first_error.unwrap_or_else(|| self.unavailable(&k)))
            })
            .collect();
        (to_pages, upstream)
    }

    /// The upstream session was replaced: pending requests fail (the pages get
    /// `service-unavailable`), requests from the old session are forgotten.
    pub fn reset(&mut self) -> Vec<(PageId, Element)> {
        self.inbound.clear();
        self.acked_pushes.clear();
        std::mem::take(&mut self.out)
            .into_values()
            .map(|q| {
                let e = self.page_error(
                    &q,
                    "wait",
                    "service-unavailable",
                    "upstream session was reset",
                );
                (q.page, e)
            })
            .collect()
    }

    /// `service-unavailable` for a request from upstream nobody answers.
    pub fn unavailable_for(&self, request: &Element) -> Element {
        let key = self.key(request.attr("from"), request.attr("id").unwrap_or_default());
        let mut reply = self.unavailable(&key);
        if let Some(from) = request.attr("from") {
            reply.set_attr("to", from); // exactly as the requester wrote itself
        }
        reply
    }

    fn unavailable(&self, (from, id): &InKey) -> Element {
        let mut request = Element::new("iq", ns::CLIENT)
            .with_attr("id", id.clone())
            .with_attr("to", self.me.to_string())
            .with_attr("type", "get");
        if let Some(from) = from {
            request.set_attr("from", from.to_string());
        }
        error_reply(&request, "cancel", "service-unavailable", "")
    }

    fn key(&self, peer: Option<&str>, id: &str) -> InKey {
        let peer = peer
            .and_then(|p| Jid::parse(p).ok())
            .filter(|p| *p != self.me.to_bare());
        (peer, id.to_owned())
    }

    fn page_error(&self, q: &OutIq, kind: &str, condition: &str, text: &str) -> Element {
        let mut request = Element::new("iq", ns::CLIENT)
            .with_attr("id", q.orig_id.clone())
            .with_attr("from", self.me.to_string());
        if let Some(to) = &q.to {
            request.set_attr("to", to.to_string());
        }
        error_reply(&request, kind, condition, text)
    }

    /// Whether an answer from `from` may answer a request sent to `to` (RFC 6120 §8.1.2.1: the
    /// server answers for the account, so no `from` equals the bare JID).
    fn sender_matches(&self, to: Option<&Jid>, from: Option<&Jid>) -> bool {
        let bare = self.me.to_bare();
        match to {
            None => from.is_none_or(|f| {
                *f == bare
                    || *f == self.me
                    || (f.local().is_none()
                        && f.domain() == self.me.domain()
                        && f.resource().is_none())
            }),
            Some(t) if *t == bare => from.is_none_or(|f| *f == bare),
            Some(t) => from == Some(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Jid {
        Jid::parse("alice@example.com/bm").unwrap()
    }

    fn request(id: &str, from: Option<&str>) -> Element {
        let mut iq = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", id)
            .with_attr("to", "alice@example.com/bm")
            .with_child(Element::new("query", "jabber:iq:version"));
        if let Some(from) = from {
            iq.set_attr("from", from);
        }
        iq
    }

    fn answer(ty: &str, id: &str, to: Option<&str>) -> Element {
        let mut iq = Element::new("iq", ns::CLIENT)
            .with_attr("type", ty)
            .with_attr("id", id);
        if let Some(to) = to {
            iq.set_attr("to", to);
        }
        iq
    }

    #[test]
    fn rewritten_ids_differ_between_instances_so_a_restore_never_takes_an_old_answer() {
        let now = Instant::now();
        let mut a = Iqs::new(me(), Duration::from_secs(30));
        let mut b = Iqs::new(me(), Duration::from_secs(30));
        let ia = a.outbound(1, answer("get", "x", None), None, false, now);
        let ib = b.outbound(1, answer("get", "x", None), None, false, now);
        assert_ne!(ia.attr("id"), ib.attr("id"));
        let late = answer("result", ia.attr("id").unwrap(), None);
        assert_eq!(b.answer_from_upstream(late.clone()), Answer::Unknown);
        assert!(matches!(
            a.answer_from_upstream(late),
            Answer::ToPage { page: 1, .. }
        ));
    }

    #[test]
    fn answers_match_the_asked_jid_as_a_parsed_jid() {
        let now = Instant::now();
        let mut q = Iqs::new(me(), Duration::from_secs(30));
        let to = Jid::parse("bob@example.com/x").unwrap();
        let sent = q.outbound(3, answer("get", "o", None), Some(to), false, now);
        let id = sent.attr("id").unwrap().to_owned();
        let from = |f: &str| answer("result", &id, None).with_attr("from", f);
        assert_eq!(
            q.answer_from_upstream(from("mallory@example.com/x")),
            Answer::Spoofed
        );
        assert_eq!(q.answer_from_upstream(from("not a jid@@")), Answer::Spoofed);
        let Answer::ToPage { page, iq, .. } = q.answer_from_upstream(from("bob@EXAMPLE.com/x"))
        else {
            panic!("the same JID, written differently, answers")
        };
        assert_eq!((page, iq.attr("id")), (3, Some("o")));
    }

    #[test]
    fn the_server_answers_for_the_account() {
        let now = Instant::now();
        let mut q = Iqs::new(me(), Duration::from_secs(30));
        for from in [None, Some("alice@example.com"), Some("example.com")] {
            let sent = q.outbound(1, answer("get", "r", None), None, true, now);
            let mut a = answer("result", sent.attr("id").unwrap(), None);
            if let Some(f) = from {
                a.set_attr("from", f);
            }
            assert!(
                matches!(
                    q.answer_from_upstream(a),
                    Answer::ToPage {
                        roster_get: true,
                        ..
                    }
                ),
                "{from:?}"
            );
        }
    }

    #[test]
    fn the_first_result_from_a_page_goes_up_at_once() {
        let now = Instant::now();
        let mut q = Iqs::new(me(), Duration::from_secs(30));
        q.inbound(
            &request("v1", Some("bob@example.com/x")),
            BTreeSet::from([1, 2]),
            now,
        );
        let r = q.answer_from_page(2, answer("result", "v1", Some("bob@example.com/x")));
        assert!(r.is_some());
        assert!(
            q.answer_from_page(1, answer("result", "v1", Some("bob@example.com/x")))
                .is_none()
        );
        assert!(q.next_deadline().is_none());
    }

    #[test]
    fn an_error_waits_for_the_other_pages_and_a_later_result_wins() {
        let now = Instant::now();
        let mut q = Iqs::new(me(), Duration::from_secs(30));
        q.inbound(
            &request("v1", Some("bob@example.com/x")),
            BTreeSet::from([1, 2, 3]),
            now,
        );
        let err = |n: &str| answer("error", "v1", Some("bob@example.com/x")).with_attr("n", n);
        assert!(q.answer_from_page(1, err("1")).is_none());
        let r = q.answer_from_page(3, answer("result", "v1", Some("bob@example.com/x")));
        assert_eq!(r.unwrap().attr("type"), Some("result"));
        // Every page refuses: the first error goes once the last one answered.
        q.inbound(
            &request("v2", Some("bob@example.com/x")),
            BTreeSet::from([1, 2]),
            now,
        );
        let err2 = |n: &str| answer("error", "v2", Some("bob@example.com/x")).with_attr("n", n);
        assert!(q.answer_from_page(2, err2("2")).is_none());
        assert!(
            q.answer_from_page(2, err2("again")).is_none(),
            "one answer per page"
        );
        let up = q.answer_from_page(1, err2("1")).unwrap();
        assert_eq!(up.attr("n"), Some("2"));
    }

    #[test]
    fn a_held_error_goes_when_the_last_waiting_page_leaves_or_at_the_deadline() {
        let now = Instant::now();
        let mut q = Iqs::new(me(), Duration::from_secs(30));
        q.inbound(&request("v1", None), BTreeSet::from([1, 2]), now);
        // An answer to the account's own request finds it addressed to the bare JID too.
        assert!(
            q.answer_from_page(1, answer("error", "v1", Some("alice@example.com")))
                .is_none()
        );
        let up = q.page_gone(2);
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].attr("type"), Some("error"));

        q.inbound(
            &request("v2", Some("bob@example.com/x")),
            BTreeSet::from([1, 2]),
            now,
        );
        assert!(
            q.answer_from_page(1, answer("error", "v2", Some("bob@example.com/x")))
                .is_none()
        );
        let (_, up) = q.expire(now + Duration::from_secs(29));
        assert!(up.is_empty());
        let (_, up) = q.expire(now + Duration::from_secs(31));
        assert_eq!(
            up[0].attr("to"),
            Some("bob@example.com/x"),
            "the page's own error"
        );
        assert_eq!(up[0].attr("type"), Some("error"));

        // Nobody answered at all: service-unavailable.
        q.inbound(
            &request("v3", Some("bob@example.com/x")),
            BTreeSet::from([1]),
            now,
        );
        let (_, up) = q.expire(now + Duration::from_secs(31));
        let e = up[0].child("error", ns::CLIENT).unwrap();
        assert!(e.child("service-unavailable", ns::STANZAS).is_some());
        assert_eq!(up[0].attr("to"), Some("bob@example.com/x"));
    }

    #[test]
    fn acks_of_pushes_the_daemon_acked_are_swallowed() {
        let mut q = Iqs::new(me(), Duration::from_secs(30));
        q.acked_push("push1");
        assert!(
            q.answer_from_page(1, answer("result", "push1", None))
                .is_none()
        );
    }
}
