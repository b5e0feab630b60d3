//! The multiplexing rules of SPEC §6, as a state machine without I/O: stanzas from pages and from
//! upstream go in, [`Effect`]s come out. The session actor carries the effects out; tests can
//! drive the rules directly.
//!
//! Owned here: iq id rewriting and reply routing, the roster cache, the presence cache, the MUC
//! rooms the session is in (and which pages joined them), the buffer for messages that arrive
//! while no page is attached, and which pages asked for status notices.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::page::frame::error_reply;
use crate::xmpp::{self, Element, Jid, Limits, ns};

/// Identifies one page (one WebSocket) for the life of the daemon.
pub type PageId = u64;

/// Something the session actor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send upstream.
    Upstream(Element),
    /// Send to one page.
    ToPage(PageId, Element),
    /// Send to every page, except one if given.
    ToPages {
        /// A page left out (the sender of what is being reflected).
        except: Option<PageId>,
        /// The stanza.
        stanza: Element,
    },
}

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

struct PageState {
    /// Sent an undirected available presence.
    available: bool,
    /// Asked for status notices (§6.8).
    notices: bool,
}

/// An iq request from a page, sent upstream under a rewritten id.
struct OutIq {
    page: PageId,
    orig_id: String,
    to: Option<String>,
    deadline: Instant,
    roster_get: bool,
}

#[derive(Default)]
struct Roster {
    items: BTreeMap<String, Element>,
    ver: Option<String>,
    complete: bool,
}

struct Room {
    nick: String,
    /// Pages that joined it; the room is left upstream when the last one leaves.
    joined_by: BTreeSet<PageId>,
    /// The room confirmed our join (status 110).
    joined: bool,
    /// The join presence, replayed to rejoin after a re-login.
    join: Element,
    occupants: BTreeMap<String, Element>,
    self_presence: Option<Element>,
    subject: Option<Element>,
}

/// The rules' state for one user session.
pub struct Mux {
    me: Jid,
    bare: String,
    domain: String,
    iq_timeout: Duration,
    pages: BTreeMap<PageId, PageState>,
    next_iq: u64,
    out_iqs: HashMap<String, OutIq>,
    /// Requests from upstream waiting for a page's answer: (from, id) → deadline.
    in_iqs: HashMap<(String, String), Instant>,
    /// Roster pushes the daemon acknowledged itself; pages' acks are dropped.
    acked_pushes: HashSet<String>,
    /// The undirected available presence last sent upstream.
    shared_presence: Option<Element>,
    presence: BTreeMap<String, Element>,
    rooms: BTreeMap<String, Room>,
    roster: Roster,
    buffer: VecDeque<Element>,
    buffer_cap: usize,
    stats: MuxStats,
}

impl Mux {
    /// Rules for the session bound to `me`.
    pub fn new(me: Jid, buffer_cap: usize, iq_timeout: Duration) -> Mux {
        Mux {
            bare: me.to_bare().to_string(),
            domain: me.domain().to_owned(),
            me,
            iq_timeout,
            pages: BTreeMap::new(),
            next_iq: 0,
            out_iqs: HashMap::new(),
            in_iqs: HashMap::new(),
            acked_pushes: HashSet::new(),
            shared_presence: None,
            presence: BTreeMap::new(),
            rooms: BTreeMap::new(),
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

    /// The earliest deadline of an iq waiting for a reply, to wake up for.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.out_iqs
            .values()
            .map(|q| q.deadline)
            .chain(self.in_iqs.values().copied())
            .min()
    }

    /// A page bound: it gets the messages buffered while no page was attached (once, in order).
    pub fn page_bound(&mut self, page: PageId) -> Vec<Effect> {
        self.pages.insert(
            page,
            PageState {
                available: false,
                notices: false,
            },
        );
        self.buffer
            .drain(..)
            .map(|m| Effect::ToPage(page, m))
            .collect()
    }

    /// A page went away: rooms only it was in are left; requests only pages could answer are
    /// refused when no page remains.
    pub fn page_gone(&mut self, page: PageId) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.pages.remove(&page).is_none() {
            return out;
        }
        let mut emptied = Vec::new();
        for (jid, room) in &mut self.rooms {
            if room.joined_by.remove(&page) && room.joined_by.is_empty() {
                emptied.push(jid.clone());
            }
        }
        for jid in emptied {
            if let Some(room) = self.rooms.remove(&jid) {
                out.push(Effect::Upstream(self.leave(&jid, &room.nick)));
            }
        }
        if self.pages.is_empty() {
            for ((from, id), _) in self.in_iqs.drain() {
                out.push(Effect::Upstream(unavailable_reply(&from, &id, &self.me)));
            }
        }
        out
    }

    /// Applies the rules to a checked stanza from `page` (its `from` is already the full JID).
    pub fn from_page(&mut self, page: PageId, stanza: Element, now: Instant) -> Vec<Effect> {
        match stanza.name.as_str() {
            "iq" => self.iq_from_page(page, stanza, now),
            "message" => {
                let mut out = Vec::new();
                let ty = stanza.attr("type");
                if !matches!(ty, Some("groupchat" | "error")) {
                    out.push(Effect::ToPages {
                        except: Some(page),
                        stanza: self.carbon(&stanza),
                    });
                }
                out.insert(0, Effect::Upstream(stanza));
                out
            }
            _ => self.presence_from_page(page, stanza),
        }
    }

    fn iq_from_page(&mut self, page: PageId, mut iq: Element, now: Instant) -> Vec<Effect> {
        let ty = iq.attr("type").unwrap_or_default().to_owned();
        let id = iq.attr("id").unwrap_or_default().to_owned();
        if ty == "result" || ty == "error" {
            // An answer to a request from upstream: the first one goes, others are dropped.
            if self.acked_pushes.contains(&id) {
                return Vec::new();
            }
            let key = (iq.attr("to").unwrap_or_default().to_owned(), id);
            if self.in_iqs.remove(&key).is_some() {
                return vec![Effect::Upstream(iq)];
            }
            return Vec::new();
        }
        let payload = iq.elements().next().cloned();
        let to_self = iq.attr("to").is_none_or(|t| t == self.bare);
        if let Some(p) = &payload {
            if p.is("enable", ns::BOSHMUX_STATUS) && to_self {
                if let Some(state) = self.pages.get_mut(&page) {
                    state.notices = true;
                }
                return vec![Effect::ToPage(page, self.result_for(&iq))];
            }
            if p.is("query", ns::ROSTER) && ty == "get" && to_self && self.roster.complete {
                let mut reply = self.result_for(&iq);
                let mut query = Element::new("query", ns::ROSTER);
                if let Some(ver) = &self.roster.ver {
                    query.set_attr("ver", ver.clone());
                }
                for item in self.roster.items.values() {
                    query.push_child(item.clone());
                }
                reply.push_child(query);
                return vec![Effect::ToPage(page, reply)];
            }
        }
        let roster_get =
            ty == "get" && to_self && payload.is_some_and(|p| p.is("query", ns::ROSTER));
        self.next_iq += 1;
        let new_id = format!("bmx{}", self.next_iq);
        self.out_iqs.insert(
            new_id.clone(),
            OutIq {
                page,
                orig_id: id,
                to: iq.attr("to").map(str::to_owned),
                deadline: now + self.iq_timeout,
                roster_get,
            },
        );
        iq.set_attr("id", new_id);
        vec![Effect::Upstream(iq)]
    }

    fn presence_from_page(&mut self, page: PageId, presence: Element) -> Vec<Effect> {
        let ty = presence.attr("type").map(str::to_owned);
        let Some(to) = presence.attr("to").map(str::to_owned) else {
            return self.undirected_presence(page, presence, ty.as_deref());
        };
        let Ok(to_jid) = Jid::parse(&to) else {
            return vec![Effect::Upstream(presence)];
        };
        let room_jid = to_jid.to_bare().to_string();
        let nick = to_jid.resource().unwrap_or_default().to_owned();
        let is_join = ty.is_none() && presence.child("x", ns::MUC).is_some() && !nick.is_empty();
        if is_join {
            if let Some(room) = self.rooms.get_mut(&room_jid)
                && room.nick == nick
            {
                room.joined_by.insert(page);
                if !room.joined {
                    return Vec::new(); // join in flight: its answer reaches every page
                }
                let mut out: Vec<Effect> = room
                    .occupants
                    .values()
                    .map(|p| Effect::ToPage(page, p.clone()))
                    .collect();
                if let Some(me) = &room.self_presence {
                    out.push(Effect::ToPage(page, me.clone()));
                }
                if let Some(subject) = &room.subject {
                    out.push(Effect::ToPage(page, subject.clone()));
                }
                return out;
            }
            self.rooms.insert(
                room_jid,
                Room {
                    nick,
                    joined_by: BTreeSet::from([page]),
                    joined: false,
                    join: presence.clone(),
                    occupants: BTreeMap::new(),
                    self_presence: None,
                    subject: None,
                },
            );
            return vec![Effect::Upstream(presence)];
        }
        if ty.as_deref() == Some("unavailable")
            && let Some(room) = self.rooms.get_mut(&room_jid)
        {
            room.joined_by.remove(&page);
            if room.joined_by.is_empty() {
                self.rooms.remove(&room_jid);
                return vec![Effect::Upstream(presence)];
            }
            // Others stay in the room: this page alone sees itself leave.
            let mut gone = Element::new("presence", ns::CLIENT)
                .with_attr("from", format!("{room_jid}/{}", room.nick))
                .with_attr("to", self.me.to_string())
                .with_attr("type", "unavailable");
            gone.push_child(
                Element::new("x", ns::MUC_USER)
                    .with_child(
                        Element::new("item", ns::MUC_USER)
                            .with_attr("affiliation", "none")
                            .with_attr("role", "none"),
                    )
                    .with_child(Element::new("status", ns::MUC_USER).with_attr("code", "110")),
            );
            return vec![Effect::ToPage(page, gone)];
        }
        vec![Effect::Upstream(presence)]
    }

    fn undirected_presence(
        &mut self,
        page: PageId,
        presence: Element,
        ty: Option<&str>,
    ) -> Vec<Effect> {
        match ty {
            None => {
                let initial = self.pages.get(&page).is_some_and(|p| !p.available);
                if let Some(state) = self.pages.get_mut(&page) {
                    state.available = true;
                }
                let mut out = Vec::new();
                let known = self.shared_presence.is_some();
                if self.shared_presence.as_ref().map(presence_key) != Some(presence_key(&presence))
                {
                    self.shared_presence = Some(presence.clone());
                    out.push(Effect::Upstream(presence));
                }
                if initial && known {
                    // The server sends contacts' presence only on the first initial presence.
                    out.extend(
                        self.presence
                            .values()
                            .map(|p| Effect::ToPage(page, p.clone())),
                    );
                }
                out
            }
            Some("unavailable") => {
                if let Some(state) = self.pages.get_mut(&page) {
                    state.available = false;
                }
                if self.pages.len() > 1 {
                    return Vec::new(); // the user stays online for the other pages
                }
                self.shared_presence = None;
                vec![Effect::Upstream(presence)]
            }
            Some(_) => vec![Effect::Upstream(presence)],
        }
    }

    /// Applies the rules to a stanza from upstream.
    pub fn from_upstream(&mut self, stanza: Element) -> Vec<Effect> {
        match stanza.name.as_str() {
            "iq" => self.iq_from_upstream(stanza),
            "message" => {
                if stanza.attr("type") == Some("groupchat")
                    && stanza.child("subject", ns::CLIENT).is_some()
                    && stanza.child("body", ns::CLIENT).is_none()
                    && let Some(room) = self.room_of_mut(stanza.attr("from"))
                {
                    room.subject = Some(stanza.clone());
                }
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
                self.cache_presence(&stanza);
                if self.pages.is_empty() {
                    return Vec::new();
                }
                vec![to_all(stanza)]
            }
            _ => Vec::new(),
        }
    }

    fn iq_from_upstream(&mut self, mut iq: Element) -> Vec<Effect> {
        let ty = iq.attr("type").unwrap_or_default().to_owned();
        let id = iq.attr("id").unwrap_or_default().to_owned();
        let from = iq.attr("from").map(str::to_owned);
        if ty == "result" || ty == "error" {
            let Some(pending) = self.out_iqs.get(&id) else {
                return Vec::new();
            };
            if !self.sender_matches(pending.to.as_deref(), from.as_deref()) {
                self.stats.spoofed_replies += 1;
                return Vec::new();
            }
            let pending = self.out_iqs.remove(&id).expect("looked up above");
            if pending.roster_get && ty == "result" {
                self.fill_roster(&iq);
            }
            if !self.pages.contains_key(&pending.page) {
                return Vec::new();
            }
            iq.set_attr("id", pending.orig_id);
            return vec![Effect::ToPage(pending.page, iq)];
        }
        let payload = iq.elements().next().cloned();
        if ty == "get" && payload.as_ref().is_some_and(|p| p.is("ping", ns::PING)) {
            return vec![Effect::Upstream(self.result_for(&iq))];
        }
        let from_self = from.as_deref().is_none_or(|f| f == self.bare);
        if ty == "set" && from_self && payload.as_ref().is_some_and(|p| p.is("query", ns::ROSTER)) {
            self.apply_roster_push(payload.as_ref().expect("checked"));
            self.acked_pushes.insert(id);
            let ack = self.result_for(&iq);
            let mut out = vec![Effect::Upstream(ack)];
            if !self.pages.is_empty() {
                out.push(to_all(iq));
            }
            return out;
        }
        if self.pages.is_empty() {
            return vec![Effect::Upstream(unavailable_reply(
                from.as_deref().unwrap_or_default(),
                &id,
                &self.me,
            ))];
        }
        self.in_iqs.insert(
            (from.unwrap_or_default(), id),
            Instant::now() + self.iq_timeout,
        );
        vec![to_all(iq)]
    }

    /// Iq timeouts: pages get an error for requests upstream never answered, and upstream gets
    /// `service-unavailable` for requests no page answered.
    pub fn expire(&mut self, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let late: Vec<String> = self
            .out_iqs
            .iter()
            .filter(|(_, q)| q.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            let q = self.out_iqs.remove(&id).expect("listed above");
            self.stats.iq_timeouts += 1;
            if self.pages.contains_key(&q.page) {
                out.push(Effect::ToPage(
                    q.page,
                    self.page_error(&q, "wait", "remote-server-timeout", "no reply in time"),
                ));
            }
        }
        let late: Vec<(String, String)> = self
            .in_iqs
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for (from, id) in late {
            self.in_iqs.remove(&(from.clone(), id.clone()));
            out.push(Effect::Upstream(unavailable_reply(&from, &id, &self.me)));
        }
        out
    }

    /// The upstream session was replaced: pending requests fail, caches that the server will
    /// fill again are cleared, and the stanzas that restore presence and rooms are returned.
    pub fn upstream_reset(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        for (_, q) in std::mem::take(&mut self.out_iqs) {
            if self.pages.contains_key(&q.page) {
                out.push(Effect::ToPage(
                    q.page,
                    self.page_error(
                        &q,
                        "wait",
                        "service-unavailable",
                        "upstream session was reset",
                    ),
                ));
            }
        }
        self.in_iqs.clear();
        self.acked_pushes.clear();
        self.presence.clear();
        self.roster.complete = false;
        let me = self.me.to_string();
        if let Some(p) = &mut self.shared_presence {
            p.set_attr("from", me.clone());
            out.push(Effect::Upstream(p.clone()));
        }
        for room in self.rooms.values_mut() {
            room.joined = false;
            room.occupants.clear();
            room.self_presence = None;
            room.join.set_attr("from", me.clone());
            out.push(Effect::Upstream(room.join.clone()));
        }
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
                        .with_attr("from", self.domain.clone())
                        .with_attr("to", self.me.to_string())
                        .with_attr("type", "headline")
                        .with_child(
                            Element::new("status", ns::BOSHMUX_STATUS).with_attr("state", state),
                        ),
                )
            })
            .collect()
    }

    fn result_for(&self, iq: &Element) -> Element {
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

    fn page_error(&self, q: &OutIq, kind: &str, condition: &str, text: &str) -> Element {
        let mut request = Element::new("iq", ns::CLIENT)
            .with_attr("id", q.orig_id.clone())
            .with_attr("from", self.me.to_string());
        if let Some(to) = &q.to {
            request.set_attr("to", to.clone());
        }
        error_reply(&request, kind, condition, text)
    }

    /// Whether a reply from `from` may answer a request sent to `to`.
    fn sender_matches(&self, to: Option<&str>, from: Option<&str>) -> bool {
        let norm = |s: &str| {
            Jid::parse(s)
                .map(|j| j.to_string())
                .unwrap_or_else(|_| s.to_owned())
        };
        let from = from.map(norm);
        match to.map(norm) {
            // A request to our own account is answered by the server: no from, or our own JIDs.
            None => {
                from.is_none_or(|f| f == self.bare || f == self.me.to_string() || f == self.domain)
            }
            Some(t) if t == self.bare => from.is_none_or(|f| f == t),
            Some(t) => from.is_some_and(|f| f == t),
        }
    }

    fn carbon(&self, message: &Element) -> Element {
        Element::new("message", ns::CLIENT)
            .with_attr("from", self.bare.clone())
            .with_attr("to", self.me.to_string())
            .with_child(
                Element::new("sent", ns::CARBONS)
                    .with_child(Element::new("forwarded", ns::FORWARD).with_child(message.clone())),
            )
    }

    fn room_of_mut(&mut self, from: Option<&str>) -> Option<&mut Room> {
        let room = Jid::parse(from?).ok()?.to_bare().to_string();
        self.rooms.get_mut(&room)
    }

    fn cache_presence(&mut self, presence: &Element) {
        let Some(from) = presence.attr("from").map(str::to_owned) else {
            return;
        };
        let ty = presence.attr("type");
        if !matches!(ty, None | Some("unavailable")) {
            return; // subscription traffic is not state
        }
        let unavailable = ty == Some("unavailable");
        let is_self_in_room = presence.child("x", ns::MUC_USER).is_some_and(|x| {
            x.elements()
                .any(|s| s.name == "status" && s.attr("code") == Some("110"))
        });
        if let Some(room) = self.room_of_mut(Some(&from)) {
            if is_self_in_room {
                if unavailable {
                    let room_jid = Jid::parse(&from)
                        .map(|j| j.to_bare().to_string())
                        .unwrap_or_default();
                    self.rooms.remove(&room_jid);
                } else {
                    room.joined = true;
                    room.self_presence = Some(presence.clone());
                }
            } else if unavailable {
                room.occupants.remove(&from);
            } else {
                room.occupants.insert(from, presence.clone());
            }
            return;
        }
        if unavailable {
            self.presence.remove(&from);
        } else {
            self.presence.insert(from, presence.clone());
        }
    }

    fn fill_roster(&mut self, result: &Element) {
        let Some(query) = result.child("query", ns::ROSTER) else {
            return; // versioned "no change" answer: keep what we have, still incomplete
        };
        self.roster.items.clear();
        self.apply_roster_push(query);
        self.roster.complete = true;
    }

    fn apply_roster_push(&mut self, query: &Element) {
        if let Some(ver) = query.attr("ver") {
            self.roster.ver = Some(ver.to_owned());
        }
        for item in query.elements().filter(|e| e.is("item", ns::ROSTER)) {
            let Some(jid) = item.attr("jid") else {
                continue;
            };
            if item.attr("subscription") == Some("remove") {
                self.roster.items.remove(jid);
            } else {
                self.roster.items.insert(jid.to_owned(), item.clone());
            }
        }
    }

    fn leave(&self, room: &str, nick: &str) -> Element {
        Element::new("presence", ns::CLIENT)
            .with_attr("from", self.me.to_string())
            .with_attr("to", format!("{room}/{nick}"))
            .with_attr("type", "unavailable")
    }
}

/// The rules' state that survives a restart (SPEC §8); stanzas kept as XML text.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MuxSnapshot {
    /// The undirected presence last sent upstream.
    pub shared_presence: Option<String>,
    /// Contacts' presence.
    pub presence: Vec<String>,
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
}

/// One room in a [`MuxSnapshot`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RoomSnapshot {
    /// The room's bare JID.
    pub jid: String,
    /// Our nick.
    pub nick: String,
    /// The join presence.
    pub join: String,
    /// Occupants' presence.
    pub occupants: Vec<String>,
    /// Our own presence in the room.
    pub self_presence: Option<String>,
    /// The subject message.
    pub subject: Option<String>,
}

impl Mux {
    /// What survives a restart.
    pub fn snapshot(&self) -> MuxSnapshot {
        let xml = |e: &Element| e.to_xml();
        MuxSnapshot {
            shared_presence: self.shared_presence.as_ref().map(xml),
            presence: self.presence.values().map(xml).collect(),
            rooms: self
                .rooms
                .iter()
                .map(|(jid, r)| RoomSnapshot {
                    jid: jid.clone(),
                    nick: r.nick.clone(),
                    join: r.join.to_xml(),
                    occupants: r.occupants.values().map(xml).collect(),
                    self_presence: r.self_presence.as_ref().map(xml),
                    subject: r.subject.as_ref().map(xml),
                })
                .collect(),
            roster_items: self.roster.items.values().map(xml).collect(),
            roster_ver: self.roster.ver.clone(),
            roster_complete: self.roster.complete,
            buffer: self.buffer.iter().map(xml).collect(),
        }
    }

    /// Rules for `me` with the state of an earlier process. Entries that do not parse are left out.
    pub fn restore(me: Jid, buffer_cap: usize, iq_timeout: Duration, snap: &MuxSnapshot) -> Mux {
        let mut m = Mux::new(me, buffer_cap, iq_timeout);
        let keyed = |list: &[String]| -> BTreeMap<String, Element> {
            list.iter()
                .filter_map(|s| stored(s))
                .filter_map(|e| Some((e.attr("from")?.to_owned(), e)))
                .collect()
        };
        m.shared_presence = snap.shared_presence.as_deref().and_then(stored);
        m.presence = keyed(&snap.presence);
        for r in &snap.rooms {
            let Some(join) = stored(&r.join) else {
                continue;
            };
            m.rooms.insert(
                r.jid.clone(),
                Room {
                    nick: r.nick.clone(),
                    joined_by: BTreeSet::new(),
                    joined: true,
                    join,
                    occupants: keyed(&r.occupants),
                    self_presence: r.self_presence.as_deref().and_then(stored),
                    subject: r.subject.as_deref().and_then(stored),
                },
            );
        }
        for item in snap.roster_items.iter().filter_map(|s| stored(s)) {
            if let Some(jid) = item.attr("jid") {
                m.roster.items.insert(jid.to_owned(), item.clone());
            }
        }
        m.roster.ver = snap.roster_ver.clone();
        m.roster.complete = snap.roster_complete;
        m.buffer = snap.buffer.iter().filter_map(|s| stored(s)).collect();
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

fn to_all(stanza: Element) -> Effect {
    Effect::ToPages {
        except: None,
        stanza,
    }
}

/// `service-unavailable` for a request nobody can answer.
fn unavailable_reply(from: &str, id: &str, me: &Jid) -> Element {
    let mut request = Element::new("iq", ns::CLIENT)
        .with_attr("id", id)
        .with_attr("to", me.to_string())
        .with_attr("type", "get");
    if !from.is_empty() {
        request.set_attr("from", from);
    }
    error_reply(&request, "cancel", "service-unavailable", "")
}

/// What makes two undirected presences the same for the shared presence: show, status, priority.
fn presence_key(p: &Element) -> [Option<String>; 3] {
    ["show", "status", "priority"]
        .map(|n| p.child(n, ns::CLIENT).map(|c| c.text().trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mux() -> Mux {
        Mux::new(
            Jid::parse("alice@example.com/bm").unwrap(),
            3,
            Duration::from_secs(30),
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
            m.from_upstream(reply(&id_b, "mallory@example.com/x"))
                .is_empty()
        );
        assert_eq!(m.stats().spoofed_replies, 1);
        let to_b = m.from_upstream(reply(&id_b, "bob@example.com/x"));
        assert_eq!(to_b.len(), 1);
        let Effect::ToPage(2, r) = &to_b[0] else {
            panic!("{to_b:?}")
        };
        assert_eq!(r.attr("id"), Some("same"));
        // Answered once only.
        assert!(
            m.from_upstream(reply(&id_b, "bob@example.com/x"))
                .is_empty()
        );
        // A request whose page is gone: the reply is dropped.
        m.page_gone(1);
        assert!(
            m.from_upstream(reply(&id_a, "bob@example.com/x"))
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
            assert!(m.from_upstream(msg).is_empty());
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
        m.from_upstream(bob.clone());
        let out = m.from_page(2, avail, now);
        assert_eq!(out, vec![Effect::ToPage(2, bob)]);
        // Unavailable from one page while another remains: not sent.
        let gone = Element::new("presence", ns::CLIENT).with_attr("type", "unavailable");
        assert!(m.from_page(1, gone.clone(), now).is_empty());
        m.page_gone(1);
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
        );
        m.page_gone(1);
        m.from_upstream(Element::new("message", ns::CLIENT).with_attr("id", "m1"));
        let snap = m.snapshot();
        let back = Mux::restore(m.jid().clone(), 3, Duration::from_secs(30), &snap);
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
        let out = m.from_upstream(ping);
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
        let out = m.from_upstream(push);
        assert_eq!(upstream_of(&out).len(), 1);
        let ack = Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", "push1");
        assert!(m.from_page(1, ack, Instant::now()).is_empty());
    }
}
