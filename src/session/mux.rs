//! The multiplexing rules of SPEC §6, as a state machine without I/O: stanzas from pages and from
//! upstream go in, [`Effect`]s come out. The session actor carries the effects out; tests can
//! drive the rules directly.
//!
//! This module dispatches and owns what is about pages as such (which are attached, which asked
//! for status notices, the buffer for messages that arrive while none is attached); the rules
//! themselves live in [`super::iq`], [`super::presence`], [`super::rooms`], [`super::roster`]
//! and [`super::carbons`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::carbons;
use super::effect::to_all;
pub use super::effect::{Effect, PageId};
use super::iq::{Answer, Iqs};
use super::presence::Presence;
pub use super::rooms::RoomSnapshot;
use super::rooms::Rooms;
use super::roster::Roster;
use crate::page::frame::error_reply;
use crate::xmpp::{self, Element, Jid, Limits, ns};

/// Counters kept by the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MuxStats {
    /// Messages buffered while no page was attached, delivered or not yet.
    pub buffered: u64,
    /// Messages dropped because the buffer was full.
    pub buffer_dropped: u64,
    /// Replies dropped because their sender was not the one asked.
    pub spoofed_replies: u64,
    /// iq requests from pages that got no reply in time.
    pub iq_timeouts: u64,
}

#[derive(Debug, Default)]
struct PageState {
    /// Asked for status notices (§6.8).
    notices: bool,
}

/// The rules' state for one user session.
pub struct Mux {
    me: Jid,
    pages: BTreeMap<PageId, PageState>,
    iqs: Iqs,
    presence: Presence,
    rooms: Rooms,
    roster: Roster,
    buffer: VecDeque<Element>,
    buffer_cap: usize,
    stats: MuxStats,
}

impl Mux {
    /// Rules for the session bound to `me`: at most `buffer_cap` messages buffered while no page
    /// is attached, iq requests answered within `iq_timeout`, rooms of a page that went away
    /// kept for `grace`.
    pub fn new(me: Jid, buffer_cap: usize, iq_timeout: Duration, grace: Duration) -> Mux {
        Mux {
            iqs: Iqs::new(me.clone(), iq_timeout),
            me,
            pages: BTreeMap::new(),
            presence: Presence::default(),
            rooms: Rooms::new(grace),
            roster: Roster::default(),
            buffer: VecDeque::new(),
            buffer_cap,
            stats: MuxStats::default(),
        }
    }

    /// The session's full JID.
    pub fn jid(&self) -> &Jid {
        &self.me
    }

    /// Replaces the full JID (after a re-login bound a different resource).
    pub fn set_jid(&mut self, me: Jid) {
        self.iqs.set_jid(me.clone());
        self.me = me;
    }

    /// Pages attached.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Counters.
    pub fn stats(&self) -> &MuxStats {
        &self.stats
    }

    /// Messages waiting for a page.
    pub fn buffered_now(&self) -> usize {
        self.buffer.len()
    }

    /// The earliest time [`Mux::expire`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.iqs.next_deadline(), self.rooms.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// A page bound: it gets the messages buffered while no page was attached (once, in order).
    pub fn page_bound(&mut self, page: PageId) -> Vec<Effect> {
        self.pages.insert(page, PageState::default());
        self.buffer
            .drain(..)
            .map(|m| Effect::ToPage(page, m))
            .collect()
    }

    /// A page went away (closed, reloaded, too slow): its rooms are kept for the grace period,
    /// requests from upstream it alone still owed an answer to are settled.
    pub fn page_gone(&mut self, page: PageId, now: Instant) -> Vec<Effect> {
        if self.pages.remove(&page).is_none() {
            return Vec::new();
        }
        self.presence.page_gone(page);
        self.rooms.page_gone(page, now);
        self.iqs
            .page_gone(page)
            .into_iter()
            .map(Effect::Upstream)
            .collect()
    }

    /// Applies the rules to a checked stanza from `page` (its `from` is already the full JID).
    pub fn from_page(&mut self, page: PageId, stanza: Element, now: Instant) -> Vec<Effect> {
        match stanza.name.as_str() {
            "iq" => self.iq_from_page(page, stanza, now),
            "message" => {
                let carbon = carbons::eligible(&stanza).then(|| Effect::ToPages {
                    except: Some(page),
                    stanza: carbons::sent(&self.me, &stanza),
                });
                std::iter::once(Effect::Upstream(stanza))
                    .chain(carbon)
                    .collect()
            }
            _ => self.presence_from_page(page, stanza),
        }
    }

    fn iq_from_page(&mut self, page: PageId, iq: Element, now: Instant) -> Vec<Effect> {
        let ty = iq.attr("type").unwrap_or_default();
        if ty == "result" || ty == "error" {
            // An answer to a request from upstream.
            return self
                .iqs
                .answer_from_page(page, iq)
                .map(Effect::Upstream)
                .into_iter()
                .collect();
        }
        let to = match iq.attr("to").map(Jid::parse) {
            None => None,
            Some(Ok(to)) => Some(to),
            Some(Err(e)) => {
                let reply = error_reply(&iq, "modify", "jid-malformed", &e.to_string());
                return vec![Effect::ToPage(page, reply)];
            }
        };
        let to_self = to.as_ref().is_none_or(|t| *t == self.me.to_bare());
        let payload = iq.elements().next();
        let roster_get =
            ty == "get" && to_self && payload.is_some_and(|p| p.is("query", ns::ROSTER));
        if to_self && payload.is_some_and(|p| p.is("enable", ns::BOSHMUX_STATUS)) {
            if let Some(state) = self.pages.get_mut(&page) {
                state.notices = true;
            }
            return vec![Effect::ToPage(page, result_for(&iq))];
        }
        if roster_get && let Some(query) = self.roster.answer() {
            return vec![Effect::ToPage(page, result_for(&iq).with_child(query))];
        }
        vec![Effect::Upstream(
            self.iqs.outbound(page, iq, to, roster_get, now),
        )]
    }

    fn presence_from_page(&mut self, page: PageId, presence: Element) -> Vec<Effect> {
        let Some(to) = presence.attr("to") else {
            return self.presence.from_page(page, presence);
        };
        let Ok(to) = Jid::parse(to) else {
            return vec![Effect::Upstream(presence)]; // the server answers it with an error
        };
        if let Some(out) = self.rooms.from_page(page, &to, presence.clone(), &self.me) {
            return out;
        }
        self.presence.directed_from_page(&to, &presence);
        vec![Effect::Upstream(presence)]
    }

    /// Applies the rules to a stanza from upstream.
    pub fn from_upstream(&mut self, stanza: Element, now: Instant) -> Vec<Effect> {
        match stanza.name.as_str() {
            "iq" => self.iq_from_upstream(stanza, now),
            "message" => {
                self.rooms.message_from_upstream(&stanza);
                if self.pages.is_empty() {
                    if self.buffer.len() < self.buffer_cap {
                        self.buffer.push_back(stanza);
                        self.stats.buffered += 1;
                    } else {
                        self.stats.buffer_dropped += 1;
                    }
                    return Vec::new();
                }
                vec![to_all(stanza)]
            }
            "presence" => {
                let from = stanza.attr("from").and_then(|f| Jid::parse(f).ok());
                if let Some(from) = from {
                    if let Some(out) = self.rooms.from_upstream(&from, &stanza) {
                        return out;
                    }
                    self.presence.from_upstream(from, &stanza);
                }
                if self.pages.is_empty() {
                    return Vec::new();
                }
                vec![to_all(stanza)]
            }
            _ => Vec::new(),
        }
    }

    fn iq_from_upstream(&mut self, iq: Element, now: Instant) -> Vec<Effect> {
        let ty = iq.attr("type").unwrap_or_default();
        if ty == "result" || ty == "error" {
            return match self.iqs.answer_from_upstream(iq) {
                Answer::Unknown => Vec::new(),
                Answer::Spoofed => {
                    self.stats.spoofed_replies += 1;
                    Vec::new()
                }
                Answer::ToPage {
                    page,
                    iq,
                    roster_get,
                } => {
                    if roster_get && iq.attr("type") == Some("result") {
                        self.roster.fill(&iq);
                    }
                    if !self.pages.contains_key(&page) {
                        return Vec::new();
                    }
                    vec![Effect::ToPage(page, iq)]
                }
            };
        }
        let payload = iq.elements().next();
        if ty == "get" && payload.is_some_and(|p| p.is("ping", ns::PING)) {
            return vec![Effect::Upstream(result_for(&iq))];
        }
        let from_self = match iq.attr("from") {
            None => true,
            Some(f) => Jid::parse(f).is_ok_and(|f| f == self.me.to_bare()),
        };
        if ty == "set"
            && from_self
            && let Some(query) = payload.filter(|p| p.is("query", ns::ROSTER))
        {
            for jid in self.roster.push(query) {
                self.presence.approved(&jid);
            }
            self.iqs.acked_push(iq.attr("id").unwrap_or_default());
            let mut out = vec![Effect::Upstream(result_for(&iq))];
            if !self.pages.is_empty() {
                out.push(to_all(iq));
            }
            return out;
        }
        if self.pages.is_empty() {
            return vec![Effect::Upstream(self.iqs.unavailable_for(&iq))];
        }
        self.iqs.inbound(
            &iq,
            self.pages.keys().copied().collect::<BTreeSet<_>>(),
            now,
        );
        vec![to_all(iq)]
    }

    /// Deadlines: pages get an error for requests upstream never answered, upstream gets the
    /// held error or `service-unavailable` for requests no page answered in time, and rooms kept
    /// for pages that did not come back are left.
    pub fn expire(&mut self, now: Instant) -> Vec<Effect> {
        let (to_pages, upstream) = self.iqs.expire(now);
        self.stats.iq_timeouts += to_pages.len() as u64;
        let mut out: Vec<Effect> = to_pages
            .into_iter()
            .filter(|(page, _)| self.pages.contains_key(page))
            .map(|(page, e)| Effect::ToPage(page, e))
            .collect();
        out.extend(upstream.into_iter().map(Effect::Upstream));
        out.extend(self.rooms.expire(now, &self.me));
        out
    }

    /// The upstream session was replaced: pending requests fail, caches that the server will
    /// fill again are cleared, and the stanzas that restore presence and rooms are returned.
    pub fn upstream_reset(&mut self) -> Vec<Effect> {
        let mut out: Vec<Effect> = self
            .iqs
            .reset()
            .into_iter()
            .filter(|(page, _)| self.pages.contains_key(page))
            .map(|(page, e)| Effect::ToPage(page, e))
            .collect();
        self.roster.reset();
        out.extend(self.presence.reset(&self.me).map(Effect::Upstream));
        out.extend(self.rooms.reset(&self.me).into_iter().map(Effect::Upstream));
        out
    }

    /// The unavailable presence that ends the session upstream (after the grace period).
    pub fn farewell(&self) -> Element {
        Element::new("presence", ns::CLIENT)
            .with_attr("type", "unavailable")
            .with_attr("from", self.me.to_string())
    }

    /// A status notice (§6.8) for the pages that asked for them.
    pub fn notice(&self, state: &str) -> Vec<Effect> {
        self.pages
            .iter()
            .filter(|(_, p)| p.notices)
            .map(|(id, _)| {
                Effect::ToPage(
                    *id,
                    Element::new("message", ns::CLIENT)
                        .with_attr("from", self.me.domain().to_owned())
                        .with_attr("to", self.me.to_string())
                        .with_attr("type", "headline")
                        .with_child(
                            Element::new("status", ns::BOSHMUX_STATUS).with_attr("state", state),
                        ),
                )
            })
            .collect()
    }
}

/// The rules' state that survives a restart (SPEC §8); stanzas kept as XML text.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MuxSnapshot {
    /// The undirected presence last sent upstream.
    pub shared_presence: Option<String>,
    /// Contacts' presence.
    pub presence: Vec<String>,
    /// Inbound subscription requests not yet answered.
    #[serde(default)]
    pub subscribe_requests: Vec<String>,
    /// Rooms the session is in.
    pub rooms: Vec<RoomSnapshot>,
    /// Roster items.
    pub roster_items: Vec<String>,
    /// Roster version.
    pub roster_ver: Option<String>,
    /// Whether the roster cache was complete.
    pub roster_complete: bool,
    /// Messages waiting for a page.
    pub buffer: Vec<String>,
    /// Written by a graceful stop, with the outbox: every stanza this state says went upstream
    /// did (or waits in the record's `outbound`). Otherwise a crash may have lost stanzas the
    /// state already counts as sent, and the restored rules send the shared presence and
    /// unanswered room joins again when pages ask for them.
    #[serde(default)]
    pub settled: bool,
}

impl Mux {
    /// What survives a restart.
    pub fn snapshot(&self) -> MuxSnapshot {
        let xml = |e: &Element| e.to_xml();
        let (shared, contacts, requests) = self.presence.snapshot();
        MuxSnapshot {
            shared_presence: shared.map(xml),
            presence: contacts.into_iter().map(xml).collect(),
            subscribe_requests: requests.into_iter().map(xml).collect(),
            rooms: self.rooms.snapshot(),
            roster_items: self.roster.items().map(xml).collect(),
            roster_ver: self.roster.ver().map(str::to_owned),
            roster_complete: self.roster.complete(),
            buffer: self.buffer.iter().map(xml).collect(),
            settled: false,
        }
    }

    /// Rules for `me` with the state of an earlier process; rooms are kept for `grace` from
    /// `now` for the pages to come back. Entries that do not parse are left out. Outbound iq
    /// ids start afresh under a new random prefix, so answers to the earlier process's
    /// requests are not taken for answers to this one's.
    pub fn restore(
        me: Jid,
        buffer_cap: usize,
        iq_timeout: Duration,
        grace: Duration,
        snap: &MuxSnapshot,
        now: Instant,
    ) -> Mux {
        let mut m = Mux::new(me, buffer_cap, iq_timeout, grace);
        let all = |list: &[String]| list.iter().filter_map(|s| stored(s)).collect::<Vec<_>>();
        m.presence = Presence::restore(
            snap.shared_presence.as_deref().and_then(stored),
            all(&snap.presence),
            all(&snap.subscribe_requests),
            !snap.settled,
        );
        m.rooms = Rooms::restore(grace, &snap.rooms, stored, now, !snap.settled);
        m.roster = Roster::restore(
            all(&snap.roster_items),
            snap.roster_ver.clone(),
            snap.roster_complete,
        );
        m.buffer = all(&snap.buffer).into();
        m
    }
}

/// Parses a stanza saved by this daemon.
fn stored(xml_text: &str) -> Option<Element> {
    let limits = Limits {
        max_bytes: 16 * 1024 * 1024,
        max_depth: 64,
        max_attrs: 256,
        allow_declaration: false,
    };
    xmpp::parse(xml_text.as_bytes(), &limits).ok()
}

/// An empty `result` answering `iq`.
fn result_for(iq: &Element) -> Element {
    let mut reply = Element::new("iq", ns::CLIENT)
        .with_attr("type", "result")
        .with_attr("id", iq.attr("id").unwrap_or_default());
    if let Some(from) = iq.attr("from") {
        reply.set_attr("to", from);
    }
    if let Some(to) = iq.attr("to") {
        reply.set_attr("from", to);
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mux() -> Mux {
        Mux::new(
            Jid::parse("alice@example.com/bm").unwrap(),
            3,
            Duration::from_secs(30),
            Duration::from_secs(60),
        )
    }

    fn iq(ty: &str, id: &str, to: Option<&str>, payload: Element) -> Element {
        let mut iq = Element::new("iq", ns::CLIENT)
            .with_attr("type", ty)
            .with_attr("id", id)
            .with_attr("from", "alice@example.com/bm")
            .with_child(payload);
        if let Some(to) = to {
            iq.set_attr("to", to);
        }
        iq
    }

    fn upstream_of(effects: &[Effect]) -> Vec<&Element> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Upstream(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn iq_ids_are_rewritten_and_replies_routed_back_only_from_the_right_sender() {
        let mut m = mux();
        m.page_bound(1);
        m.page_bound(2);
        let now = Instant::now();
        let q = Element::new("query", "jabber:iq:version");
        let a = m.from_page(
            1,
            iq("get", "same", Some("bob@example.com/x"), q.clone()),
            now,
        );
        let b = m.from_page(2, iq("get", "same", Some("bob@example.com/x"), q), now);
        let id_a = upstream_of(&a)[0].attr("id").unwrap().to_owned();
        let id_b = upstream_of(&b)[0].attr("id").unwrap().to_owned();
        assert_ne!(id_a, id_b);

        let reply = |id: &str, from: &str| {
            Element::new("iq", ns::CLIENT)
                .with_attr("type", "result")
                .with_attr("id", id)
                .with_attr("from", from)
        };
        // A spoofed sender is dropped and does not consume the pending request.
        assert!(
            m.from_upstream(reply(&id_b, "mallory@example.com/x"), Instant::now())
                .is_empty()
        );
        assert_eq!(m.stats().spoofed_replies, 1);
        let to_b = m.from_upstream(reply(&id_b, "bob@example.com/x"), Instant::now());
        assert_eq!(to_b.len(), 1);
        let Effect::ToPage(2, r) = &to_b[0] else {
            panic!("{to_b:?}")
        };
        assert_eq!(r.attr("id"), Some("same"));
        // Answered once only.
        assert!(
            m.from_upstream(reply(&id_b, "bob@example.com/x"), Instant::now())
                .is_empty()
        );
        // A request whose page is gone: the reply is dropped.
        m.page_gone(1, Instant::now());
        assert!(
            m.from_upstream(reply(&id_a, "bob@example.com/x"), Instant::now())
                .is_empty()
        );
    }

    #[test]
    fn unanswered_requests_time_out_with_the_original_id() {
        let mut m = mux();
        m.page_bound(7);
        let now = Instant::now();
        m.from_page(
            7,
            iq(
                "get",
                "p1",
                Some("example.com"),
                Element::new("ping", ns::PING),
            ),
            now,
        );
        assert!(m.expire(now + Duration::from_secs(29)).is_empty());
        let out = m.expire(now + Duration::from_secs(31));
        let Effect::ToPage(7, e) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!((e.attr("id"), e.attr("type")), (Some("p1"), Some("error")));
        assert!(
            e.child("error", ns::CLIENT)
                .unwrap()
                .child("remote-server-timeout", ns::STANZAS)
                .is_some()
        );
    }

    #[test]
    fn messages_buffer_while_no_page_is_attached_bounded_and_in_order() {
        let mut m = mux();
        for i in 0..5 {
            let msg = Element::new("message", ns::CLIENT).with_attr("id", i.to_string());
            assert!(m.from_upstream(msg, Instant::now()).is_empty());
        }
        assert_eq!((m.stats().buffered, m.stats().buffer_dropped), (3, 2));
        let out = m.page_bound(1);
        let ids: Vec<_> = out
            .iter()
            .map(|e| match e {
                Effect::ToPage(1, s) => s.attr("id").unwrap().to_owned(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, ["0", "1", "2"]);
        assert!(m.page_bound(2).is_empty(), "delivered once only");
    }

    #[test]
    fn second_pages_initial_presence_is_not_resent_and_gets_the_cache() {
        let mut m = mux();
        m.page_bound(1);
        m.page_bound(2);
        let now = Instant::now();
        let avail = Element::new("presence", ns::CLIENT).with_attr("from", "alice@example.com/bm");
        assert_eq!(upstream_of(&m.from_page(1, avail.clone(), now)).len(), 1);
        let bob = Element::new("presence", ns::CLIENT).with_attr("from", "bob@example.com/x");
        m.from_upstream(bob.clone(), Instant::now());
        let out = m.from_page(2, avail, now);
        assert_eq!(out, vec![Effect::ToPage(2, bob)]);
        // Unavailable from one page while another remains: not sent.
        let gone = Element::new("presence", ns::CLIENT).with_attr("type", "unavailable");
        assert!(m.from_page(1, gone.clone(), now).is_empty());
        m.page_gone(1, Instant::now());
        assert_eq!(upstream_of(&m.from_page(2, gone, now)).len(), 1);
    }

    #[test]
    fn the_state_survives_a_snapshot_round_trip() {
        let mut m = mux();
        m.page_bound(1);
        let now = Instant::now();
        m.from_page(
            1,
            Element::new("presence", ns::CLIENT)
                .with_child(Element::new("show", ns::CLIENT).with_text("away")),
            now,
        );
        m.from_upstream(
            Element::new("presence", ns::CLIENT).with_attr("from", "bob@example.com/x"),
            now,
        );
        m.page_gone(1, Instant::now());
        m.from_upstream(
            Element::new("message", ns::CLIENT).with_attr("id", "m1"),
            Instant::now(),
        );
        // As a graceful stop writes it (a crash's snapshot: below).
        let mut snap = m.snapshot();
        snap.settled = true;
        let back = Mux::restore(
            m.jid().clone(),
            3,
            Duration::from_secs(30),
            Duration::from_secs(60),
            &snap,
            now,
        );
        assert_eq!(back.snapshot().presence, snap.presence);
        assert_eq!(back.snapshot().shared_presence, snap.shared_presence);
        assert_eq!(back.buffered_now(), 1);
        // The second page's identical initial presence is not re-sent, and gets bob replayed.
        let mut back = back;
        back.page_bound(2);
        let out = back.from_page(
            2,
            Element::new("presence", ns::CLIENT)
                .with_child(Element::new("show", ns::CLIENT).with_text("away")),
            now,
        );
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            matches!(&out[0], Effect::ToPage(2, p) if p.attr("from") == Some("bob@example.com/x"))
        );
        // After a crash the same presence goes upstream once more: it may never have left.
        snap.settled = false;
        let mut crashed = Mux::restore(
            m.jid().clone(),
            3,
            Duration::from_secs(30),
            Duration::from_secs(60),
            &snap,
            now,
        );
        crashed.page_bound(2);
        let away = Element::new("presence", ns::CLIENT)
            .with_child(Element::new("show", ns::CLIENT).with_text("away"));
        let out = crashed.from_page(2, away, now);
        assert_eq!(upstream_of(&out).len(), 1, "{out:?}");
    }

    #[test]
    fn server_pings_are_answered_by_the_daemon() {
        let mut m = mux();
        m.page_bound(1);
        let ping = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", "p9")
            .with_attr("from", "example.com")
            .with_attr("to", "alice@example.com/bm")
            .with_child(Element::new("ping", ns::PING));
        let out = m.from_upstream(ping, Instant::now());
        assert_eq!(out.len(), 1, "pages never see it");
        let Effect::Upstream(pong) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            pong.to_xml(),
            "<iq xmlns=\"jabber:client\" type=\"result\" id=\"p9\" to=\"example.com\" from=\"alice@example.com/bm\"/>"
        );
    }

    #[test]
    fn roster_pushes_are_acked_once_and_pages_acks_swallowed() {
        let mut m = mux();
        m.page_bound(1);
        let push =
            Element::new("iq", ns::CLIENT)
                .with_attr("type", "set")
                .with_attr("id", "push1")
                .with_child(Element::new("query", ns::ROSTER).with_child(
                    Element::new("item", ns::ROSTER).with_attr("jid", "bob@example.com"),
                ));
        let out = m.from_upstream(push, Instant::now());
        assert_eq!(upstream_of(&out).len(), 1);
        let ack = Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", "push1");
        assert!(m.from_page(1, ack, Instant::now()).is_empty());
    }

    fn presence_of(ty: Option<&str>, from: &str) -> Element {
        let mut p = Element::new("presence", ns::CLIENT).with_attr("from", from);
        if let Some(ty) = ty {
            p.set_attr("type", ty);
        }
        p
    }

    #[test]
    fn only_messages_a_server_would_copy_are_reflected_as_carbons() {
        let mut m = mux();
        m.page_bound(1);
        m.page_bound(2);
        let now = Instant::now();
        let msg = |ty: &str| {
            Element::new("message", ns::CLIENT)
                .with_attr("to", "bob@example.com")
                .with_attr("type", ty)
                .with_child(Element::new("body", ns::CLIENT).with_text("hi"))
        };
        let carbons = |out: &[Effect]| {
            out.iter()
                .filter(|e| {
                    matches!(
                        e,
                        Effect::ToPages {
                            except: Some(1),
                            ..
                        }
                    )
                })
                .count()
        };
        assert_eq!(carbons(&m.from_page(1, msg("chat"), now)), 1);
        assert_eq!(carbons(&m.from_page(1, msg("normal"), now)), 1);
        assert_eq!(carbons(&m.from_page(1, msg("headline"), now)), 0);
        let private = msg("chat").with_child(Element::new("private", ns::CARBONS));
        let out = m.from_page(1, private, now);
        assert_eq!((carbons(&out), upstream_of(&out).len()), (0, 1));
        let no_copy = msg("chat").with_child(Element::new("no-copy", "urn:xmpp:hints"));
        assert_eq!(carbons(&m.from_page(1, no_copy, now)), 0);
    }

    #[test]
    fn two_pages_unavailable_and_still_open_take_the_user_offline() {
        let mut m = mux();
        m.page_bound(1);
        m.page_bound(2);
        let now = Instant::now();
        let me = "alice@example.com/bm";
        m.from_page(1, presence_of(None, me), now);
        m.from_page(2, presence_of(None, me), now);
        assert!(
            m.from_page(1, presence_of(Some("unavailable"), me), now)
                .is_empty()
        );
        let out = m.from_page(2, presence_of(Some("unavailable"), me), now);
        assert_eq!(upstream_of(&out).len(), 1);
        assert_eq!(m.page_count(), 2);
    }

    #[test]
    fn a_pending_subscription_request_is_replayed_to_a_reloaded_page_until_answered() {
        let mut m = mux();
        let now = Instant::now();
        m.page_bound(1);
        m.from_page(1, presence_of(None, "alice@example.com/bm"), now);
        let ask = presence_of(Some("subscribe"), "bob@example.com");
        assert_eq!(m.from_upstream(ask.clone(), now), vec![to_all(ask.clone())]);
        m.page_gone(1, now);
        m.page_bound(2);
        let out = m.from_page(2, presence_of(None, "alice@example.com/bm"), now);
        assert_eq!(out, vec![Effect::ToPage(2, ask)]);
        let answer = Element::new("presence", ns::CLIENT)
            .with_attr("to", "bob@example.com")
            .with_attr("type", "subscribed");
        assert_eq!(upstream_of(&m.from_page(2, answer, now)).len(), 1);
        m.page_gone(2, now);
        m.page_bound(3);
        assert!(
            m.from_page(3, presence_of(None, "alice@example.com/bm"), now)
                .is_empty()
        );
        // And it survives a restart while pending.
        let ask2 = presence_of(Some("subscribe"), "carol@example.com");
        m.from_upstream(ask2.clone(), now);
        let mut snap = m.snapshot();
        snap.settled = true;
        let mut back = Mux::restore(
            m.jid().clone(),
            3,
            Duration::from_secs(30),
            Duration::from_secs(60),
            &snap,
            now,
        );
        back.page_bound(4);
        let out = back.from_page(4, presence_of(None, "alice@example.com/bm"), now);
        assert_eq!(out, vec![Effect::ToPage(4, ask2)]);
    }

    #[test]
    fn a_server_request_takes_the_first_result_and_holds_an_error_for_the_other_pages() {
        let mut m = mux();
        m.page_bound(1);
        m.page_bound(2);
        let now = Instant::now();
        let request = iq(
            "get",
            "v1",
            Some("alice@example.com/bm"),
            Element::new("query", "jabber:iq:version"),
        )
        .with_attr("from", "bob@example.com/x");
        assert_eq!(m.from_upstream(request, now).len(), 1);
        let answer = |ty: &str| {
            Element::new("iq", ns::CLIENT)
                .with_attr("type", ty)
                .with_attr("id", "v1")
                .with_attr("to", "bob@example.com/x")
        };
        assert!(m.from_page(1, answer("error"), now).is_empty(), "held");
        let out = m.from_page(2, answer("result"), now);
        assert_eq!(upstream_of(&out)[0].attr("type"), Some("result"));
        // With no page at all the daemon refuses at once.
        m.page_gone(1, now);
        m.page_gone(2, now);
        let request = iq(
            "get",
            "v2",
            None,
            Element::new("query", "jabber:iq:version"),
        )
        .with_attr("from", "bob@example.com/x");
        let out = m.from_upstream(request, now);
        assert_eq!(upstream_of(&out)[0].attr("type"), Some("error"));
    }

    #[test]
    fn a_request_to_a_malformed_jid_is_refused_to_the_page_alone() {
        let mut m = mux();
        m.page_bound(1);
        let out = m.from_page(
            1,
            iq("get", "q", Some("a@b@c"), Element::new("ping", ns::PING)),
            Instant::now(),
        );
        let Effect::ToPage(1, e) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!((e.attr("type"), e.attr("id")), (Some("error"), Some("q")));
    }
}
