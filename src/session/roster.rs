//! The roster cache (SPEC §6.2, §6.7): filled by the first roster result, kept current by roster
//! pushes, and used to answer later pages' roster gets without a round trip. Items are keyed by
//! their parsed (canonical) JID.

use std::collections::BTreeMap;

use crate::xmpp::{Element, Jid, ns};

/// The user's roster as the server last described it.
#[derive(Debug, Default)]
pub struct Roster {
    items: BTreeMap<Jid, Element>,
    ver: Option<String>,
    complete: bool,
}

impl Roster {
    /// Whether the cache holds the whole roster (a full result was seen since the last reset).
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The `<query xmlns='jabber:iq:roster'/>` answering a roster get, when the cache is complete.
    pub fn answer(&self) -> Option<Element> {
        if !self.complete {
            return None;
        }
        let mut query = Element::new("query", ns::ROSTER);
        if let Some(ver) = &self.ver {
            query.set_attr("ver", ver.clone());
        }
        for item in self.items.values() {
            query.push_child(item.clone());
        }
        Some(query)
    }

    /// A roster get's result: replaces the cache. A versioned "no change" answer (no query)
    /// keeps what is cached and leaves it incomplete.
    pub fn fill(&mut self, result: &Element) {
        let Some(query) = result.child("query", ns::ROSTER) else {
            return;
        };
        self.items.clear();
        self.push(query);
        self.complete = true;
    }

    /// A roster push's `<query/>`: items added, changed or removed. Returns the JIDs of items
    /// whose subscription now includes `from` (the user approved their request).
    pub fn push(&mut self, query: &Element) -> Vec<Jid> {
        if let Some(ver) = query.attr("ver") {
            self.ver = Some(ver.to_owned());
        }
        let mut approved = Vec::new();
        for item in query.elements().filter(|e| e.is("item", ns::ROSTER)) {
            let Some(jid) = item.attr("jid").and_then(|j| Jid::parse(j).ok()) else {
                continue;
            };
            match item.attr("subscription") {
                Some("remove") => {
                    self.items.remove(&jid);
                    continue;
                }
                Some("from" | "both") => approved.push(jid.clone()),
                _ => {}
            }
            self.items.insert(jid, item.clone());
        }
        approved
    }

    /// The upstream session was replaced: the next roster get goes upstream again.
    pub fn reset(&mut self) {
        self.complete = false;
    }

    /// Items as stored (for the state file).
    pub fn items(&self) -> impl Iterator<Item = &Element> {
        self.items.values()
    }

    /// The roster version, if the server gave one.
    pub fn ver(&self) -> Option<&str> {
        self.ver.as_deref()
    }

    /// The cache as saved by an earlier process.
    pub fn restore(
        items: impl IntoIterator<Item = Element>,
        ver: Option<String>,
        complete: bool,
    ) -> Roster {
        let mut r = Roster {
            ver,
            complete,
            ..Roster::default()
        };
        for item in items {
            if let Some(jid) = item.attr("jid").and_then(|j| Jid::parse(j).ok()) {
                r.items.insert(jid, item);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(jid: &str, sub: &str) -> Element {
        Element::new("item", ns::ROSTER)
            .with_attr("jid", jid)
            .with_attr("subscription", sub)
    }

    #[test]
    fn the_cache_answers_only_once_complete_and_follows_pushes() {
        let mut r = Roster::default();
        assert!(r.answer().is_none());
        let result = Element::new("iq", ns::CLIENT).with_child(
            Element::new("query", ns::ROSTER)
                .with_attr("ver", "v1")
                .with_child(item("bob@example.com", "both")),
        );
        r.fill(&result);
        let q = r.answer().unwrap();
        assert_eq!(q.attr("ver"), Some("v1"));
        assert_eq!(q.elements().count(), 1);
        let approved = r.push(
            &Element::new("query", ns::ROSTER)
                .with_attr("ver", "v2")
                .with_child(item("bob@example.com", "remove"))
                .with_child(item("carol@example.com", "from")),
        );
        assert_eq!(approved, [Jid::parse("carol@example.com").unwrap()]);
        let q = r.answer().unwrap();
        let jids: Vec<_> = q.elements().filter_map(|i| i.attr("jid")).collect();
        assert_eq!(
            (q.attr("ver"), jids),
            (Some("v2"), vec!["carol@example.com"])
        );
        r.reset();
        assert!(r.answer().is_none());
    }

    #[test]
    fn a_no_change_answer_keeps_the_cache_incomplete() {
        let mut r = Roster::default();
        r.fill(&Element::new("iq", ns::CLIENT));
        assert!(!r.complete());
    }
}
