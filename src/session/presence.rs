//! The user's own presence and what the session knows about contacts' presence (SPEC §6.5, §6.6).
//!
//! The shared presence is a small state machine over the pages' undirected presence:
//! - *offline* (nothing sent upstream) → a page's available presence goes upstream → *online*;
//! - *online*: a page's presence that changes show, status or priority goes upstream (the latest
//!   wins); one equal to the shared presence is not re-sent, and a page's first presence gets the
//!   cached contacts' presence and the pending subscription requests replayed instead — unless a
//!   page sent a directed presence (RFC 6121 §4.6, typically a directed unavailable) to
//!   a contact since the last broadcast: that contact no longer has the shared presence, so the
//!   next available presence from any page re-sends it, as a real resource's would reach it;
//! - *online* → *offline* when the last *available* page sends unavailable (pages that are
//!   unavailable but still connected do not keep the user online); a page that merely goes away
//!   changes nothing (the grace period, SPEC §7, decides).
//!
//! Inbound `subscribe` requests are kept until answered (`subscribed`/`unsubscribed` from a page,
//! a roster push approving them, or the contact withdrawing), because the server re-sends them
//! only on a new initial presence, which a reloaded page does not cause. Contacts are keyed by
//! parsed (canonical) JID.

use std::collections::{BTreeMap, BTreeSet};

use super::effect::{Effect, PageId};
use crate::xmpp::{Element, Jid, ns};

/// Presence state of one session.
#[derive(Debug, Default)]
pub struct Presence {
    /// The undirected available presence last sent upstream; `None` while offline.
    shared: Option<Element>,
    /// Pages whose last undirected presence was available.
    available: BTreeSet<PageId>,
    /// Pages that sent their initial presence (and got the replay).
    greeted: BTreeSet<PageId>,
    /// Latest available presence per full JID (contacts, and the user's own).
    contacts: BTreeMap<Jid, Element>,
    /// Unanswered inbound subscription requests, per bare JID.
    requests: BTreeMap<Jid, Element>,
    /// Contacts sent a directed presence (available or unavailable) since the shared presence
    /// last went upstream: they no longer have the shared presence.
    hidden_from: BTreeSet<Jid>,
    /// The shared presence was restored from the store, and whether it ever reached the server
    /// is not known (the earlier process may have died with it in its outbox after writing the
    /// caches): the next available presence from a page goes upstream even if equal.
    unsure: bool,
}

impl Presence {
    /// Whether the user is online upstream.
    pub fn online(&self) -> bool {
        self.shared.is_some()
    }

    /// An undirected presence from `page` (its `from` already set to the session's full JID).
    pub fn from_page(&mut self, page: PageId, presence: Element) -> Vec<Effect> {
        match presence.attr("type") {
            None => {
                let initial = self.greeted.insert(page);
                self.available.insert(page);
                let was_online = self.online();
                let mut out = Vec::new();
                if self.shared.as_ref().map(key) != Some(key(&presence))
                    || !self.hidden_from.is_empty()
                    || self.unsure
                {
                    self.hidden_from.clear();
                    self.unsure = false;
                    self.shared = Some(presence.clone());
                    out.push(Effect::Upstream(presence));
                }
                if initial && was_online {
                    // The server sends these on an initial presence only, which this is not.
                    out.extend(
                        self.contacts
                            .values()
                            .map(|p| Effect::ToPage(page, p.clone())),
                    );
                    out.extend(
                        self.requests
                            .values()
                            .map(|p| Effect::ToPage(page, p.clone())),
                    );
                }
                out
            }
            Some("unavailable") => {
                self.available.remove(&page);
                self.greeted.remove(&page); // its next available presence is initial again
                if !self.available.is_empty() || !self.online() {
                    return Vec::new(); // the user stays online for the other pages
                }
                self.go_offline();
                vec![Effect::Upstream(presence)]
            }
            Some(_) => vec![Effect::Upstream(presence)],
        }
    }

    /// A directed presence from a page to `to` (not a room): an answer to a subscription
    /// request ends it. The caller forwards the stanza.
    pub fn directed_from_page(&mut self, to: &Jid, presence: &Element) {
        match presence.attr("type") {
            Some("subscribed" | "unsubscribed") => {
                self.requests.remove(&to.to_bare());
            }
            None | Some("unavailable") if self.online() => {
                self.hidden_from.insert(to.clone());
            }
            _ => {}
        }
    }

    /// The user approved `jid`'s subscription (a roster push with subscription from/both).
    pub fn approved(&mut self, jid: &Jid) {
        self.requests.remove(&jid.to_bare());
    }

    /// A page went away.
    pub fn page_gone(&mut self, page: PageId) {
        self.available.remove(&page);
        self.greeted.remove(&page);
    }

    /// A presence from upstream that is not about a room: cached. The caller delivers it.
    pub fn from_upstream(&mut self, from: Jid, presence: &Element) {
        match presence.attr("type") {
            None => {
                self.contacts.insert(from, presence.clone());
            }
            Some("unavailable") => {
                self.contacts.remove(&from);
            }
            Some("subscribe") => {
                self.requests.insert(from.to_bare(), presence.clone());
            }
            Some("unsubscribe") => {
                self.requests.remove(&from.to_bare());
            }
            _ => {}
        }
    }

    /// The upstream session was replaced: the presence to send again (the server will send
    /// contacts' presence afresh).
    pub fn reset(&mut self, me: &Jid) -> Option<Element> {
        self.contacts.clear();
        let p = self.shared.as_mut()?;
        p.set_attr("from", me.to_string());
        Some(p.clone())
    }

    fn go_offline(&mut self) {
        self.shared = None;
        self.hidden_from.clear();
        // Nothing arrives while offline; the next initial presence brings it all again.
        self.contacts.clear();
    }

    /// What the state file keeps: shared presence, contacts' presence, pending requests.
    pub fn snapshot(&self) -> (Option<&Element>, Vec<&Element>, Vec<&Element>) {
        (
            self.shared.as_ref(),
            self.contacts.values().collect(),
            self.requests.values().collect(),
        )
    }

    /// The state saved by an earlier process (no pages yet). Entries without a parsable `from`
    /// are left out. `unsure`: the shared presence may never have reached the server (the
    /// earlier process crashed), so the next page's available presence goes upstream even if
    /// equal to it.
    pub fn restore(
        shared: Option<Element>,
        contacts: impl IntoIterator<Item = Element>,
        requests: impl IntoIterator<Item = Element>,
        unsure: bool,
    ) -> Presence {
        let by_from = |e: Element| Some((Jid::parse(e.attr("from")?).ok()?, e));
        Presence {
            unsure: unsure && shared.is_some(),
            shared,
            contacts: contacts.into_iter().filter_map(by_from).collect(),
            requests: requests
                .into_iter()
                .filter_map(by_from)
                .map(|(j, e)| (j.to_bare(), e))
                .collect(),
            ..Presence::default()
        }
    }
}

/// What makes two undirected presences the same for the shared presence: show, status, priority.
fn key(p: &Element) -> [Option<String>; 3] {
    ["show", "status", "priority"]
        .map(|n| p.child(n, ns::CLIENT).map(|c| c.text().trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available() -> Element {
        Element::new("presence", ns::CLIENT).with_attr("from", "alice@example.com/bm")
    }

    fn away() -> Element {
        available().with_child(Element::new("show", ns::CLIENT).with_text("away"))
    }

    fn unavailable() -> Element {
        available().with_attr("type", "unavailable")
    }

    fn from(jid: &str, ty: Option<&str>) -> (Jid, Element) {
        let mut p = Element::new("presence", ns::CLIENT).with_attr("from", jid);
        if let Some(ty) = ty {
            p.set_attr("type", ty);
        }
        (Jid::parse(jid).unwrap(), p)
    }

    fn upstream(out: &[Effect]) -> usize {
        out.iter()
            .filter(|e| matches!(e, Effect::Upstream(_)))
            .count()
    }

    #[test]
    fn the_first_available_goes_up_an_equal_one_does_not_and_a_change_does() {
        let mut p = Presence::default();
        assert_eq!(upstream(&p.from_page(1, available())), 1);
        assert_eq!(upstream(&p.from_page(2, available())), 0);
        assert_eq!(upstream(&p.from_page(2, away())), 1);
        assert_eq!(
            upstream(&p.from_page(1, away())),
            0,
            "already the shared presence"
        );
    }

    #[test]
    fn a_restored_shared_presence_goes_up_once_more_with_the_next_page() {
        // The earlier process may have died with it queued but never written ahead.
        let mut p = Presence::restore(Some(available()), [], [], true);
        assert_eq!(upstream(&p.from_page(1, available())), 1);
        assert_eq!(upstream(&p.from_page(2, available())), 0, "once is enough");
        // After a graceful stop the state is settled: nothing goes up again.
        let mut p = Presence::restore(Some(available()), [], [], false);
        assert_eq!(upstream(&p.from_page(1, available())), 0);
    }

    #[test]
    fn after_a_directed_unavailable_the_next_available_presence_goes_up_again() {
        let mut p = Presence::default();
        p.from_page(1, available());
        p.from_page(2, available());
        p.from_page(2, unavailable());
        let c = Jid::parse("carol@example.com").unwrap();
        let hide = Element::new("presence", ns::CLIENT)
            .with_attr("to", c.to_string())
            .with_attr("type", "unavailable");
        p.directed_from_page(&c, &hide);
        assert_eq!(
            upstream(&p.from_page(2, available())),
            1,
            "carol must see the user online again"
        );
        assert_eq!(upstream(&p.from_page(1, available())), 0, "once is enough");
    }

    #[test]
    fn unavailable_goes_up_when_the_last_available_page_goes_unavailable() {
        let mut p = Presence::default();
        p.from_page(1, available());
        p.from_page(2, available());
        assert!(p.from_page(1, unavailable()).is_empty());
        // Page 1 stays connected but unavailable: page 2 is the last available one.
        assert_eq!(upstream(&p.from_page(2, unavailable())), 1);
        assert!(!p.online());
        assert!(
            p.from_page(1, unavailable()).is_empty(),
            "nothing more to say"
        );
        // A page that never sent presence does not keep the user online either.
        p.from_page(1, available());
        p.page_gone(3);
        assert_eq!(upstream(&p.from_page(1, unavailable())), 1);
    }

    #[test]
    fn a_page_going_away_does_not_take_the_user_offline() {
        let mut p = Presence::default();
        p.from_page(1, available());
        p.page_gone(1);
        assert!(p.online());
        // The reloaded page's equal presence is not re-sent.
        assert_eq!(upstream(&p.from_page(2, available())), 0);
    }

    #[test]
    fn a_later_pages_first_presence_gets_contacts_and_pending_requests() {
        let mut p = Presence::default();
        p.from_page(1, available());
        let (bob, bob_on) = from("bob@example.com/x", None);
        p.from_upstream(bob, &bob_on);
        let (carol, carol_asks) = from("carol@example.com", Some("subscribe"));
        p.from_upstream(carol, &carol_asks);
        let out = p.from_page(2, available());
        assert_eq!(
            out,
            vec![
                Effect::ToPage(2, bob_on.clone()),
                Effect::ToPage(2, carol_asks.clone())
            ]
        );
        assert!(
            p.from_page(2, away())
                .iter()
                .all(|e| matches!(e, Effect::Upstream(_))),
            "once"
        );
        // Answered from a page: no longer replayed.
        p.directed_from_page(
            &Jid::parse("carol@EXAMPLE.com").unwrap(),
            &from("x@y", Some("subscribed")).1,
        );
        let out = p.from_page(3, away());
        assert_eq!(out, vec![Effect::ToPage(3, bob_on)]);
    }

    #[test]
    fn requests_end_when_approved_or_withdrawn() {
        let mut p = Presence::default();
        p.from_page(1, available());
        for who in ["carol@example.com", "dave@example.com"] {
            let (j, s) = from(who, Some("subscribe"));
            p.from_upstream(j, &s);
        }
        p.approved(&Jid::parse("carol@example.com").unwrap());
        let (dave, withdrawn) = from("dave@example.com/phone", Some("unsubscribe"));
        p.from_upstream(dave, &withdrawn);
        assert!(p.from_page(2, available()).is_empty());
    }

    #[test]
    fn the_first_presence_while_offline_gets_no_replay_the_server_sends_it() {
        let mut p = Presence::default();
        let (carol, asks) = from("carol@example.com", Some("subscribe"));
        p.from_upstream(carol, &asks);
        let out = p.from_page(1, available());
        assert_eq!(upstream(&out), out.len());
    }
}
