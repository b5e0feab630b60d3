//! XEP-0045 rooms the session is in (SPEC §6.6), one small state machine per room, keyed by the
//! parsed (canonical) bare room JID so that differently written JIDs are one room.
//!
//! States and events:
//! - (none) —join from a page→ *joining* (the join goes upstream; the page is recorded as asking).
//! - *joining* —self-presence (status 110)→ *joined*; —error presence for our nick→ (none): the
//!   error goes to the pages that asked only, and a retry is a fresh join that goes upstream.
//! - *joined* —join from a page, same nick→ *joined*: nothing upstream; the page gets the
//!   occupants' presence, our self-presence and the subject replayed.
//! - *joined* —presence to another nick (a join or not)→ *joined*, rename asked (upstream);
//!   —unavailable self-presence with status 303→ *joined* under the new nick (the server then
//!   sends the new self-presence); an error for the new nick (e.g. `conflict`) ends the rename:
//!   the room stays joined under the old nick, the error goes to the pages that asked only, and
//!   a page that asked by joining (it was not in the room) is not in it.
//! - *joined* —unavailable self-presence without 303 (kick 307, ban 301, destroy, affiliation
//!   change, shutdown, or our own leave)→ (none), for every page.
//! - explicit leave from a page: the page alone sees itself leave while other pages are in the
//!   room or a page that went away is still kept; from the last page it goes upstream at once.
//! - a page that goes away (closed, reloaded) keeps the room for `grace`: rejoining within it is
//!   answered from the replay, so occupants see nothing; after it the room is left upstream
//!   unless a page joined it again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::effect::{Effect, PageId, to_all};
use crate::xmpp::element::Node;
use crate::xmpp::{Element, Jid, ns};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The join went upstream; no self-presence yet.
    Joining,
    /// Restored from the store while joining: the request carrying the join may never have
    /// been written ahead before the earlier process died (the caches and the write-ahead
    /// records are separate writes), so the next page's join goes upstream again rather than
    /// waiting for an answer that may never come.
    Unsure,
    /// The room confirmed us (status 110).
    Joined,
}

#[derive(Debug)]
struct Room {
    nick: String,
    phase: Phase,
    /// Pages in the room.
    pages: BTreeSet<PageId>,
    /// Pages that asked to join while joining: they get a refusal.
    asking: BTreeSet<PageId>,
    /// A page went away while in the room: the room is kept until then.
    kept_until: Option<Instant>,
    /// The join presence, sent again after a re-login.
    join: Element,
    /// Occupants' presence by nick.
    occupants: BTreeMap<String, Element>,
    /// Our self-presence as a page joining later gets it (without "room created").
    self_presence: Option<Element>,
    subject: Option<Element>,
    /// A nick change asked and not yet answered.
    renaming: Option<Rename>,
}

/// A nick change in flight (XEP-0045 §7.6).
#[derive(Debug)]
struct Rename {
    nick: String,
    /// Pages that asked for it: they alone get a refusal.
    asking: BTreeSet<PageId>,
    /// Asking pages that were not in the room (they asked by joining): out again if refused.
    newcomers: BTreeSet<PageId>,
    /// `kept_until` before the ask, restored if the refusal leaves no page in the room.
    kept_until: Option<Instant>,
}

/// The rooms of one session.
#[derive(Debug)]
pub struct Rooms {
    grace: Duration,
    rooms: BTreeMap<Jid, Room>,
}

/// One room as the state file keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RoomSnapshot {
    /// The room's bare JID.
    pub jid: String,
    /// Our nick.
    pub nick: String,
    /// Whether the room confirmed the join.
    #[serde(default = "yes")]
    pub joined: bool,
    /// The join presence.
    pub join: String,
    /// Occupants' presence.
    pub occupants: Vec<String>,
    /// Our own presence in the room.
    pub self_presence: Option<String>,
    /// The subject message.
    pub subject: Option<String>,
}

fn yes() -> bool {
    true
}

/// MUC status codes of a presence from a room (XEP-0045 §15.6).
fn status_codes(presence: &Element) -> Vec<String> {
    presence
        .child("x", ns::MUC_USER)
        .map(|x| {
            x.elements()
                .filter(|s| s.is("status", ns::MUC_USER))
                .filter_map(|s| s.attr("code").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Rooms {
    /// No rooms; a page that goes away keeps its rooms for `grace`.
    pub fn new(grace: Duration) -> Rooms {
        Rooms {
            grace,
            rooms: BTreeMap::new(),
        }
    }

    /// Whether `room` (a bare JID) is a room of this session.
    pub fn contains(&self, room: &Jid) -> bool {
        self.rooms.contains_key(room)
    }

    /// When a kept room must be left if no page came back.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.rooms.values().filter_map(|r| r.kept_until).min()
    }

    /// A presence from `page` to `to`. `None` when it has nothing to do with a room (the caller
    /// handles it as directed presence); otherwise what to do.
    pub fn from_page(
        &mut self,
        page: PageId,
        to: &Jid,
        mut presence: Element,
        me: &Jid,
    ) -> Option<Vec<Effect>> {
        let room_jid = to.to_bare();
        let nick = to.resource().unwrap_or_default().to_owned();
        let ty = presence.attr("type").map(str::to_owned);
        let is_join = ty.is_none() && presence.child("x", ns::MUC).is_some() && !nick.is_empty();
        let Some(room) = self.rooms.get_mut(&room_jid) else {
            if !is_join {
                return None;
            }
            self.rooms.insert(
                room_jid,
                Room {
                    nick,
                    phase: Phase::Joining,
                    pages: BTreeSet::from([page]),
                    asking: BTreeSet::from([page]),
                    kept_until: None,
                    join: presence.clone(),
                    occupants: BTreeMap::new(),
                    self_presence: None,
                    subject: None,
                    renaming: None,
                },
            );
            return Some(vec![Effect::Upstream(presence)]);
        };
        match ty.as_deref() {
            None if nick.is_empty() => Some(vec![Effect::Upstream(presence)]),
            None => {
                let newcomer = room.pages.insert(page);
                let kept_until = room.kept_until.take();
                if nick != room.nick {
                    // A nick change (XEP-0045 §7.6): sent as a plain presence, never as a join.
                    presence
                        .children
                        .retain(|c| !matches!(c, Node::Element(e) if e.is("x", ns::MUC)));
                    let rename = match &mut room.renaming {
                        Some(r) if r.nick == nick => r,
                        slot => slot.insert(Rename {
                            nick,
                            asking: BTreeSet::new(),
                            newcomers: BTreeSet::new(),
                            kept_until,
                        }),
                    };
                    rename.asking.insert(page);
                    if newcomer {
                        rename.newcomers.insert(page);
                    }
                    return Some(vec![Effect::Upstream(presence)]);
                }
                if !is_join {
                    return Some(vec![Effect::Upstream(presence)]); // show/status in the room
                }
                match room.phase {
                    Phase::Joining => {
                        room.asking.insert(page); // the join in flight answers every page
                        return Some(Vec::new());
                    }
                    Phase::Unsure => {
                        // A second join by the same occupant is answered with the room's
                        // state and self-presence again (XEP-0045 §7.2), so sending it is safe
                        // even if the first one did arrive.
                        room.phase = Phase::Joining;
                        room.asking.insert(page);
                        room.join = presence.clone();
                        return Some(vec![Effect::Upstream(presence)]);
                    }
                    Phase::Joined => {}
                }
                let mut out: Vec<Effect> = room
                    .occupants
                    .values()
                    .map(|p| Effect::ToPage(page, p.clone()))
                    .collect();
                out.extend(
                    room.self_presence
                        .iter()
                        .map(|p| Effect::ToPage(page, p.clone())),
                );
                out.extend(room.subject.iter().map(|s| Effect::ToPage(page, s.clone())));
                Some(out)
            }
            Some("unavailable") => {
                room.pages.remove(&page);
                room.asking.remove(&page);
                if let Some(r) = &mut room.renaming {
                    r.asking.remove(&page);
                    r.newcomers.remove(&page);
                }
                if room.pages.is_empty() && room.kept_until.is_none() {
                    let nick = room.nick.clone();
                    self.rooms.remove(&room_jid);
                    presence.set_attr("to", occupant(&room_jid, &nick));
                    return Some(vec![Effect::Upstream(presence)]);
                }
                // Others stay in the room: this page alone sees itself leave.
                Some(vec![Effect::ToPage(
                    page,
                    self_leave(&room_jid, &room.nick, room.self_presence.as_ref(), me),
                )])
            }
            Some(_) => Some(vec![Effect::Upstream(presence)]),
        }
    }

    /// A presence from upstream sent by `from`. `None` when `from` is not one of our rooms;
    /// otherwise what to do with it (the room's state updated).
    pub fn from_upstream(&mut self, from: &Jid, presence: &Element) -> Option<Vec<Effect>> {
        let room_jid = from.to_bare();
        let room = self.rooms.get_mut(&room_jid)?;
        let nick = from.resource().unwrap_or_default();
        let ty = presence.attr("type");
        let codes = status_codes(presence);
        if ty == Some("error") {
            if room.phase != Phase::Joined && (nick.is_empty() || nick == room.nick) {
                // Refused: the join ends; only the pages that asked are told.
                let room = self.rooms.remove(&room_jid).expect("looked up above");
                if room.asking.is_empty() {
                    return Some(vec![to_all(presence.clone())]);
                }
                let out = room
                    .asking
                    .iter()
                    .map(|p| Effect::ToPage(*p, presence.clone()))
                    .collect();
                return Some(out);
            }
            if let Some(r) = room.renaming.take_if(|r| r.nick == nick) {
                // A refused nick change: joined as before; only the asking pages hear of it.
                for p in &r.newcomers {
                    room.pages.remove(p);
                }
                if room.pages.is_empty() {
                    room.kept_until = r.kept_until;
                }
                if !r.asking.is_empty() {
                    return Some(
                        r.asking
                            .iter()
                            .map(|p| Effect::ToPage(*p, presence.clone()))
                            .collect(),
                    );
                }
            }
            return Some(vec![to_all(presence.clone())]);
        }
        let unavailable = ty == Some("unavailable");
        let destroyed = presence
            .child("x", ns::MUC_USER)
            .is_some_and(|x| x.child("destroy", ns::MUC_USER).is_some());
        if codes.iter().any(|c| c == "110") || (destroyed && nick == room.nick) {
            if !unavailable {
                room.phase = Phase::Joined;
                room.nick = nick.to_owned(); // the room may have changed it (status 210)
                room.self_presence = Some(without_created(presence));
                room.asking.clear();
                room.renaming = None;
            } else if codes.iter().any(|c| c == "303") {
                // Our nick changed; the new self-presence follows.
                if let Some(new) = presence
                    .child("x", ns::MUC_USER)
                    .and_then(|x| x.child("item", ns::MUC_USER))
                    .and_then(|i| i.attr("nick"))
                {
                    room.nick = new.to_owned();
                }
                room.self_presence = None;
                room.renaming = None;
            } else {
                // Kicked, banned, destroyed, removed, or our own leave: ended for every page.
                self.rooms.remove(&room_jid);
            }
        } else if destroyed {
            self.rooms.remove(&room_jid);
        } else if unavailable {
            room.occupants.remove(nick);
        } else if ty.is_none() {
            room.occupants.insert(nick.to_owned(), presence.clone());
        }
        Some(vec![to_all(presence.clone())])
    }

    /// A message from upstream: a room's subject is kept for the replay.
    pub fn message_from_upstream(&mut self, message: &Element) {
        let is_subject = message.attr("type") == Some("groupchat")
            && message.child("subject", ns::CLIENT).is_some()
            && message.child("body", ns::CLIENT).is_none();
        if !is_subject {
            return;
        }
        let room = message
            .attr("from")
            .and_then(|f| Jid::parse(f).ok())
            .and_then(|f| self.rooms.get_mut(&f.to_bare()));
        if let Some(room) = room {
            room.subject = Some(message.clone());
        }
    }

    /// A page went away: its rooms are kept for `grace`.
    pub fn page_gone(&mut self, page: PageId, now: Instant) {
        for room in self.rooms.values_mut() {
            room.asking.remove(&page);
            if room.pages.remove(&page) {
                room.kept_until = Some(now + self.grace);
            }
        }
    }

    /// Rooms kept for pages that did not come back in time are left upstream.
    pub fn expire(&mut self, now: Instant, me: &Jid) -> Vec<Effect> {
        let mut out = Vec::new();
        let mut left = Vec::new();
        for (jid, room) in &mut self.rooms {
            if room.kept_until.is_some_and(|t| t <= now) {
                room.kept_until = None;
                if room.pages.is_empty() {
                    left.push(jid.clone());
                }
            }
        }
        for jid in left {
            let room = self.rooms.remove(&jid).expect("listed above");
            out.push(Effect::Upstream(
                Element::new("presence", ns::CLIENT)
                    .with_attr("from", me.to_string())
                    .with_attr("to", occupant(&jid, &room.nick))
                    .with_attr("type", "unavailable"),
            ));
        }
        out
    }

    /// The upstream session was replaced: every room is joined again (under its current nick)
    /// with the returned presences.
    pub fn reset(&mut self, me: &Jid) -> Vec<Element> {
        let mut out = Vec::new();
        for (jid, room) in &mut self.rooms {
            room.phase = Phase::Joining;
            room.occupants.clear();
            room.self_presence = None;
            room.asking.clear();
            room.renaming = None;
            room.join.set_attr("from", me.to_string());
            room.join.set_attr("to", occupant(jid, &room.nick));
            out.push(room.join.clone());
        }
        out
    }

    /// What the state file keeps.
    pub fn snapshot(&self) -> Vec<RoomSnapshot> {
        let xml = |e: &Element| e.to_xml();
        self.rooms
            .iter()
            .map(|(jid, r)| RoomSnapshot {
                jid: jid.to_string(),
                nick: r.nick.clone(),
                joined: r.phase == Phase::Joined,
                join: r.join.to_xml(),
                occupants: r.occupants.values().map(xml).collect(),
                self_presence: r.self_presence.as_ref().map(xml),
                subject: r.subject.as_ref().map(xml),
            })
            .collect()
    }

    /// Rooms saved by an earlier process, kept for `grace` from `now` for the pages to come
    /// back. `parse` reads a saved stanza; rooms whose JID or join does not read are left out.
    /// `unsure`: the earlier process crashed, so a join not yet answered may never have reached
    /// the server; the next page's join of such a room goes upstream again.
    pub fn restore(
        grace: Duration,
        saved: &[RoomSnapshot],
        parse: impl Fn(&str) -> Option<Element>,
        now: Instant,
        unsure: bool,
    ) -> Rooms {
        let mut rooms = Rooms::new(grace);
        for r in saved {
            let (Ok(jid), Some(join)) = (Jid::parse(&r.jid), parse(&r.join)) else {
                continue;
            };
            let occupants = r
                .occupants
                .iter()
                .filter_map(|s| parse(s))
                .filter_map(|p| {
                    let nick = Jid::parse(p.attr("from")?).ok()?.resource()?.to_owned();
                    Some((nick, p))
                })
                .collect();
            rooms.rooms.insert(
                jid.to_bare(),
                Room {
                    nick: r.nick.clone(),
                    phase: match (r.joined, unsure) {
                        (true, _) => Phase::Joined,
                        (false, true) => Phase::Unsure,
                        (false, false) => Phase::Joining,
                    },
                    pages: BTreeSet::new(),
                    asking: BTreeSet::new(),
                    kept_until: Some(now + grace),
                    join,
                    occupants,
                    self_presence: r.self_presence.as_deref().and_then(&parse),
                    subject: r.subject.as_deref().and_then(&parse),
                    renaming: None,
                },
            );
        }
        rooms
    }
}

/// The occupant JID `room/nick` as text. `nick` is always the resource of a parsed (and so
/// prepared) JID, so it needs no preparation again.
fn occupant(room: &Jid, nick: &str) -> String {
    format!("{room}/{nick}")
}

/// `presence` without MUC status 201 ("room created", XEP-0045 §10.1): true of the first
/// self-presence only, not of its replay to a page joining later.
fn without_created(presence: &Element) -> Element {
    let mut p = presence.clone();
    for c in &mut p.children {
        if let Node::Element(x) = c
            && x.is("x", ns::MUC_USER)
        {
            x.children.retain(|s| {
                !matches!(s, Node::Element(s) if s.is("status", ns::MUC_USER) && s.attr("code") == Some("201"))
            });
        }
    }
    p
}

/// The unavailable self-presence a page sees when it leaves a room other pages stay in, as the
/// room would send it (XEP-0045 §7.14): our item from `self_presence` (affiliation, and jid
/// where the room shows it) with role `none`.
fn self_leave(room: &Jid, nick: &str, self_presence: Option<&Element>, me: &Jid) -> Element {
    let mut item = self_presence
        .and_then(|p| p.child("x", ns::MUC_USER))
        .and_then(|x| x.child("item", ns::MUC_USER))
        .map(|i| {
            let mut item = Element::new("item", ns::MUC_USER);
            item.attrs = i.attrs.clone();
            item
        })
        .unwrap_or_else(|| Element::new("item", ns::MUC_USER).with_attr("affiliation", "none"));
    item.set_attr("role", "none");
    Element::new("presence", ns::CLIENT)
        .with_attr("from", occupant(room, nick))
        .with_attr("to", me.to_string())
        .with_attr("type", "unavailable")
        .with_child(
            Element::new("x", ns::MUC_USER)
                .with_child(item)
                .with_child(Element::new("status", ns::MUC_USER).with_attr("code", "110")),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    fn me() -> Jid {
        Jid::parse("alice@example.com/bm").unwrap()
    }

    fn occupant(nick: &str) -> Jid {
        Jid::parse(&format!("room@conference.example.com/{nick}")).unwrap()
    }

    fn join(nick: &str) -> (Jid, Element) {
        let to = occupant(nick);
        let p = Element::new("presence", ns::CLIENT)
            .with_attr("to", to.to_string())
            .with_child(Element::new("x", ns::MUC));
        (to, p)
    }

    fn leave(nick: &str) -> (Jid, Element) {
        let to = occupant(nick);
        let p = Element::new("presence", ns::CLIENT)
            .with_attr("to", to.to_string())
            .with_attr("type", "unavailable");
        (to, p)
    }

    /// A presence from the room about `nick`, with MUC status codes and an optional new nick.
    fn from_room(nick: &str, ty: Option<&str>, codes: &[&str], new_nick: Option<&str>) -> Element {
        let mut item = Element::new("item", ns::MUC_USER)
            .with_attr("affiliation", "none")
            .with_attr("role", "participant");
        if let Some(n) = new_nick {
            item.set_attr("nick", n);
        }
        let mut x = Element::new("x", ns::MUC_USER).with_child(item);
        for c in codes {
            x.push_child(Element::new("status", ns::MUC_USER).with_attr("code", *c));
        }
        let mut p = Element::new("presence", ns::CLIENT)
            .with_attr("from", occupant(nick).to_string())
            .with_child(x);
        if let Some(ty) = ty {
            p.set_attr("type", ty);
        }
        p
    }

    fn upstream(out: &[Effect]) -> Vec<&Element> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Upstream(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn joined(rooms: &mut Rooms, pages: &[PageId], nick: &str) {
        for (i, page) in pages.iter().enumerate() {
            let (to, p) = join(nick);
            let out = rooms.from_page(*page, &to, p, &me()).unwrap();
            if i == 0 {
                assert_eq!(upstream(&out).len(), 1);
                let me_in = from_room(nick, None, &["110"], None);
                rooms.from_upstream(&occupant(nick), &me_in).unwrap();
            } else {
                assert!(upstream(&out).is_empty());
            }
        }
    }

    #[test]
    fn a_second_join_is_answered_from_the_replay() {
        let mut r = Rooms::new(GRACE);
        let (to, p) = join("ay");
        r.from_page(1, &to, p, &me()).unwrap();
        let bee = from_room("bee", None, &[], None);
        r.from_upstream(&occupant("bee"), &bee);
        let me_in = from_room("ay", None, &["110"], None);
        r.from_upstream(&occupant("ay"), &me_in);
        let subject = Element::new("message", ns::CLIENT)
            .with_attr("from", "room@conference.example.com")
            .with_attr("type", "groupchat")
            .with_child(Element::new("subject", ns::CLIENT).with_text("hi"));
        r.message_from_upstream(&subject);
        // Written differently (the domain part, which parsing canonicalizes): the same room.
        let (_, p) = join("ay");
        let to = Jid::parse("room@Conference.Example.COM/ay").unwrap();
        let out = r.from_page(2, &to, p, &me()).unwrap();
        assert_eq!(
            out,
            vec![
                Effect::ToPage(2, bee),
                Effect::ToPage(2, me_in),
                Effect::ToPage(2, subject)
            ]
        );
    }

    #[test]
    fn a_nick_change_keeps_the_room_for_every_page() {
        let mut r = Rooms::new(GRACE);
        joined(&mut r, &[1, 2], "ay");
        // Page 1 asks for a new nick: a plain presence goes up, without the MUC join payload.
        let (to, p) = join("ay2");
        let out = r.from_page(1, &to, p, &me()).unwrap();
        let up = upstream(&out);
        assert_eq!(up.len(), 1);
        assert!(up[0].child("x", ns::MUC).is_none());
        r.from_upstream(
            &occupant("ay"),
            &from_room("ay", Some("unavailable"), &["303", "110"], Some("ay2")),
        )
        .unwrap();
        r.from_upstream(&occupant("ay2"), &from_room("ay2", None, &["110"], None))
            .unwrap();
        // Page 2 leaves: page 1 is still in, so nothing goes upstream.
        let (to, p) = leave("ay");
        let out = r.from_page(2, &to, p, &me()).unwrap();
        assert!(upstream(&out).is_empty());
        let Effect::ToPage(2, gone) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(gone.attr("from"), Some("room@conference.example.com/ay2"));
        // Page 1 leaves last: the leave goes up under the new nick.
        let (to, p) = leave("ay2");
        let out = r.from_page(1, &to, p, &me()).unwrap();
        assert_eq!(
            upstream(&out)[0].attr("to"),
            Some("room@conference.example.com/ay2")
        );
        assert!(!r.contains(&occupant("x").to_bare()));
    }

    #[test]
    fn a_refused_join_ends_for_the_asking_page_and_a_retry_goes_upstream() {
        let mut r = Rooms::new(GRACE);
        let (to, p) = join("ay");
        r.from_page(1, &to, p, &me()).unwrap();
        let refused = from_room("ay", Some("error"), &[], None)
            .with_child(Element::new("error", ns::CLIENT).with_attr("type", "auth"));
        let out = r.from_upstream(&occupant("ay"), &refused).unwrap();
        assert_eq!(out, vec![Effect::ToPage(1, refused)]);
        let (to, p) = join("ay");
        let out = r.from_page(1, &to, p, &me()).unwrap();
        assert_eq!(upstream(&out).len(), 1, "the retry goes upstream");
    }

    fn conflict(nick: &str) -> Element {
        from_room(nick, Some("error"), &[], None).with_child(
            Element::new("error", ns::CLIENT)
                .with_attr("type", "cancel")
                .with_child(Element::new("conflict", ns::STANZAS)),
        )
    }

    #[test]
    fn a_join_under_a_taken_nick_is_refused_to_that_page_alone() {
        let mut r = Rooms::new(GRACE);
        joined(&mut r, &[1], "ay");
        // Page 2 joins under another nick: asked upstream as a nick change, refused.
        let (to, p) = join("bee");
        assert_eq!(upstream(&r.from_page(2, &to, p, &me()).unwrap()).len(), 1);
        let refused = conflict("bee");
        let out = r.from_upstream(&occupant("bee"), &refused).unwrap();
        assert_eq!(out, vec![Effect::ToPage(2, refused)]);
        // Still joined as `ay` for page 1; page 2 is not in the room, so page 1's leave is the
        // last and goes up under the old nick.
        let (to, p) = leave("ay");
        let out = r.from_page(1, &to, p, &me()).unwrap();
        assert_eq!(
            upstream(&out)[0].attr("to"),
            Some("room@conference.example.com/ay")
        );
        assert!(!r.contains(&occupant("ay").to_bare()));
    }

    #[test]
    fn a_refused_nick_change_keeps_every_page_in_the_room_under_the_old_nick() {
        let mut r = Rooms::new(GRACE);
        joined(&mut r, &[1, 2], "ay");
        let to = occupant("bee");
        let p = Element::new("presence", ns::CLIENT).with_attr("to", to.to_string());
        r.from_page(1, &to, p, &me()).unwrap();
        let refused = conflict("bee");
        let out = r.from_upstream(&occupant("bee"), &refused).unwrap();
        assert_eq!(out, vec![Effect::ToPage(1, refused)]);
        // Both pages still in: page 2 leaving changes nothing upstream, page 1 is still there.
        let (to, p) = leave("ay");
        assert!(upstream(&r.from_page(2, &to, p, &me()).unwrap()).is_empty());
        let (to, p) = join("ay");
        assert!(upstream(&r.from_page(3, &to, p, &me()).unwrap()).is_empty());
    }

    #[test]
    fn a_page_joining_later_is_not_told_it_created_the_room() {
        let mut r = Rooms::new(GRACE);
        let (to, p) = join("ay");
        r.from_page(1, &to, p, &me()).unwrap();
        let created = from_room("ay", None, &["110", "201"], None);
        let out = r.from_upstream(&occupant("ay"), &created).unwrap();
        assert_eq!(out, vec![to_all(created)], "the creator sees 201");
        let (to, p) = join("ay");
        let out = r.from_page(2, &to, p, &me()).unwrap();
        let Effect::ToPage(2, replayed) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(status_codes(replayed), vec!["110"]);
    }

    #[test]
    fn a_page_leaving_alone_sees_its_own_affiliation_with_role_none() {
        let mut r = Rooms::new(GRACE);
        let (to, p) = join("ay");
        r.from_page(1, &to, p, &me()).unwrap();
        let owner = Element::new("presence", ns::CLIENT)
            .with_attr("from", occupant("ay").to_string())
            .with_child(
                Element::new("x", ns::MUC_USER)
                    .with_child(
                        Element::new("item", ns::MUC_USER)
                            .with_attr("affiliation", "owner")
                            .with_attr("role", "moderator"),
                    )
                    .with_child(Element::new("status", ns::MUC_USER).with_attr("code", "110")),
            );
        r.from_upstream(&occupant("ay"), &owner).unwrap();
        let (to, p) = join("ay");
        r.from_page(2, &to, p, &me()).unwrap();
        let (to, p) = leave("ay");
        let out = r.from_page(2, &to, p, &me()).unwrap();
        let Effect::ToPage(2, gone) = &out[0] else {
            panic!("{out:?}")
        };
        let item = gone
            .child("x", ns::MUC_USER)
            .and_then(|x| x.child("item", ns::MUC_USER))
            .unwrap();
        assert_eq!(
            (item.attr("affiliation"), item.attr("role")),
            (Some("owner"), Some("none"))
        );
        assert_eq!(status_codes(gone), vec!["110"]);
    }

    #[test]
    fn kick_ban_and_destroy_end_the_room_for_every_page() {
        for codes in [&["307", "110"][..], &["301", "110"][..], &["110"][..]] {
            let mut r = Rooms::new(GRACE);
            joined(&mut r, &[1, 2], "ay");
            let mut end = from_room("ay", Some("unavailable"), codes, None);
            if codes == ["110"] {
                end = Element::new("presence", ns::CLIENT)
                    .with_attr("from", occupant("ay").to_string())
                    .with_attr("type", "unavailable")
                    .with_child(
                        Element::new("x", ns::MUC_USER)
                            .with_child(Element::new("destroy", ns::MUC_USER)),
                    );
            }
            let out = r.from_upstream(&occupant("ay"), &end).unwrap();
            assert_eq!(out, vec![to_all(end)]);
            assert!(!r.contains(&occupant("ay").to_bare()), "{codes:?}");
            let (to, p) = join("ay");
            assert_eq!(upstream(&r.from_page(1, &to, p, &me()).unwrap()).len(), 1);
        }
    }

    #[test]
    fn a_page_that_goes_away_keeps_its_rooms_for_the_grace_period() {
        let now = Instant::now();
        let mut r = Rooms::new(GRACE);
        joined(&mut r, &[1], "ay");
        r.page_gone(1, now);
        assert_eq!(r.next_deadline(), Some(now + GRACE));
        // The reload rejoins within grace: answered from memory.
        let (to, p) = join("ay");
        assert!(upstream(&r.from_page(2, &to, p, &me()).unwrap()).is_empty());
        assert!(r.expire(now + GRACE, &me()).is_empty());
        // Gone for good this time: the room is left when the grace period ends.
        r.page_gone(2, now);
        assert!(r.expire(now + GRACE / 2, &me()).is_empty());
        let out = r.expire(now + GRACE, &me());
        assert_eq!(upstream(&out)[0].attr("type"), Some("unavailable"));
        assert!(r.next_deadline().is_none());
    }

    #[test]
    fn an_explicit_leave_while_a_gone_page_is_kept_waits_for_the_grace_period() {
        let now = Instant::now();
        let mut r = Rooms::new(GRACE);
        joined(&mut r, &[1, 2], "ay");
        r.page_gone(1, now);
        let (to, p) = leave("ay");
        assert!(upstream(&r.from_page(2, &to, p, &me()).unwrap()).is_empty());
        assert_eq!(upstream(&r.expire(now + GRACE, &me())).len(), 1);
    }

    #[test]
    fn a_relogin_joins_every_room_again_under_its_current_nick() {
        let mut r = Rooms::new(GRACE);
        joined(&mut r, &[1], "ay");
        r.from_upstream(
            &occupant("ay"),
            &from_room("ay", Some("unavailable"), &["303", "110"], Some("zed")),
        );
        let joins = r.reset(&me());
        assert_eq!(joins[0].attr("to"), Some("room@conference.example.com/zed"));
        assert!(joins[0].child("x", ns::MUC).is_some());
    }

    #[test]
    fn presence_unrelated_to_rooms_is_not_taken() {
        let mut r = Rooms::new(GRACE);
        let to = Jid::parse("bob@example.com").unwrap();
        let p = Element::new("presence", ns::CLIENT).with_attr("type", "subscribed");
        assert!(r.from_page(1, &to, p.clone(), &me()).is_none());
        assert!(r.from_upstream(&to, &p).is_none());
    }

    #[test]
    fn rooms_survive_a_snapshot_round_trip_kept_for_the_grace_period() {
        let now = Instant::now();
        let mut r = Rooms::new(GRACE);
        joined(&mut r, &[1], "ay");
        r.from_upstream(&occupant("bee"), &from_room("bee", None, &[], None));
        let snap = r.snapshot();
        let parse = |s: &str| crate::xmpp::parse(s.as_bytes(), &crate::xmpp::Limits::PAGE).ok();
        let mut back = Rooms::restore(GRACE, &snap, parse, now, true);
        assert_eq!(back.next_deadline(), Some(now + GRACE));
        let (to, p) = join("ay");
        let out = back.from_page(5, &to, p, &me()).unwrap();
        assert_eq!(out.len(), 2, "bee and the self-presence replayed: {out:?}");
    }

    #[test]
    fn a_room_restored_while_joining_sends_the_next_join_upstream_again() {
        // The earlier process died with the join in its outbox, after the caches saying
        // "joining" were written: waiting for that join's answer would wait for ever.
        let now = Instant::now();
        let mut r = Rooms::new(GRACE);
        let (to, p) = join("ay");
        assert_eq!(upstream(&r.from_page(1, &to, p, &me()).unwrap()).len(), 1);
        let parse = |s: &str| crate::xmpp::parse(s.as_bytes(), &crate::xmpp::Limits::PAGE).ok();
        let mut back = Rooms::restore(GRACE, &r.snapshot(), parse, now, true);
        let (to, p) = join("ay");
        let out = back.from_page(5, &to, p.clone(), &me()).unwrap();
        assert_eq!(
            upstream(&out).len(),
            1,
            "the join goes upstream again: {out:?}"
        );
        // Now it is in flight: a second page waits for its answer, as before a restart.
        assert!(back.from_page(6, &to, p, &me()).unwrap().is_empty());
        back.from_upstream(&occupant("ay"), &from_room("ay", None, &["110"], None))
            .unwrap();
        let out = back.from_page(7, &to, join("ay").1, &me()).unwrap();
        assert_eq!(
            out.len(),
            1,
            "joined: a later page gets the replay: {out:?}"
        );
        // After a graceful stop the join in flight was written ahead or kept: it is awaited.
        let mut settled = Rooms::restore(GRACE, &r.snapshot(), parse, now, false);
        assert!(
            settled
                .from_page(5, &to, join("ay").1, &me())
                .unwrap()
                .is_empty()
        );
    }
}
