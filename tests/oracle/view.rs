//! What an observer saw, normalised so that the two sides compare, and the comparison with its
//! allow-list. Normalised away: ids the server or daemon chose, resources, `<delay/>` and other
//! timestamps, stanza ids, roster versions, the order between different senders (the protocol
//! only orders stanzas from one sender). Each allow-list rule names the SPEC rule that makes B
//! differ from real resources on purpose; everything else that differs is a fault.

use std::collections::{BTreeMap, BTreeSet};

use boshmux::xmpp::{Element, Node, ns};

use crate::world::{ORACLE_NS, StepRecord};

/// The accounts and rooms of one world, for mapping JIDs to side-independent names.
#[derive(Clone, Debug)]
pub struct Names {
    /// The acting user's bare JID.
    pub user: String,
    /// Contacts B, C and the marker D (bare JIDs).
    pub contacts: [String; 3],
    pub domain: String,
    pub muc: String,
    /// Suffix of this world's room names.
    pub tag: String,
}

impl Names {
    /// A JID in side-independent form: `U`, `B`, `C`, `D` for the accounts (`/~` for any
    /// resource), `#name@M/nick` for rooms, `S` and `M` for the server and MUC service.
    pub fn jid(&self, s: &str) -> String {
        let (bare, resource) = match s.split_once('/') {
            Some((b, r)) => (b, Some(r)),
            None => (s, None),
        };
        let bare_l = bare.to_lowercase();
        let account = if bare_l == self.user {
            Some("U")
        } else {
            ["B", "C", "D"]
                .into_iter()
                .zip(&self.contacts)
                .find(|(_, c)| **c == bare_l)
                .map(|(n, _)| n)
        };
        if let Some(a) = account {
            return if resource.is_some() {
                format!("{a}/~")
            } else {
                a.to_owned()
            };
        }
        let base = if bare_l == self.domain {
            "S".to_owned()
        } else if bare_l == self.muc {
            "M".to_owned()
        } else if let Some(local) = bare_l.strip_suffix(&format!("@{}", self.muc)) {
            let name = local
                .strip_suffix(&format!("-{}", self.tag))
                .unwrap_or(local);
            format!("#{name}@M")
        } else {
            bare_l.clone()
        };
        match resource {
            Some(r) => format!("{base}/{r}"),
            None => base,
        }
    }

    fn is_room(&self, jid: &str) -> bool {
        jid.split('/')
            .next()
            .is_some_and(|b| b.to_lowercase().ends_with(&format!("@{}", self.muc)))
    }

    /// An element as canonical text.
    /// The top element's `to` is left out when it names an account: the observer is the
    /// receiver, and whether the server addressed its bare or full JID varies with routing.
    /// In our own leave from a room (status 110) only the affiliation of the item counts: the
    /// role and real JID differ between the server's answer to one of several sessions and the
    /// daemon's synthesized one for a page leaving while others stay (SPEC §6.6).
    pub fn norm(&self, e: &Element) -> String {
        let mut out = String::new();
        let mut top = e.clone();
        if top.attr("type") == Some("unavailable")
            && let Some(Node::Element(x)) = top
                .children
                .iter_mut()
                .find(|c| matches!(c, Node::Element(x) if x.is("x", ns::MUC_USER)))
            && x.elements()
                .any(|c| c.name == "status" && c.attr("code") == Some("110"))
        {
            for c in &mut x.children {
                if let Node::Element(item) = c
                    && item.name == "item"
                {
                    item.remove_attr("role");
                    item.remove_attr("jid");
                }
            }
        }
        if let Some(to) = top.attr("to") {
            let to = self.jid(to);
            if matches!(
                to.as_str(),
                "U" | "B" | "C" | "D" | "U/~" | "B/~" | "C/~" | "D/~"
            ) {
                top.remove_attr("to");
            }
        }
        self.write(&top, "jabber:client", &mut out);
        out
    }

    fn write(&self, e: &Element, parent_ns: &str, out: &mut String) {
        out.push('<');
        out.push_str(&e.name);
        if e.ns != parent_ns {
            out.push_str(&format!(" xmlns='{}'", e.ns));
        }
        let mut attrs: Vec<(String, String)> = e
            .attrs
            .iter()
            .filter(|a| a.ns.is_none())
            .filter(|a| a.name != "id" || is_oracle_id(&a.value))
            .filter(|a| !(a.name == "ver" && e.ns == ns::ROSTER))
            .map(|a| {
                let v = if matches!(a.name.as_str(), "from" | "to" | "jid" | "by") {
                    self.jid(&a.value)
                } else {
                    a.value.clone()
                };
                (a.name.clone(), v)
            })
            .collect();
        attrs.sort();
        for (k, v) in attrs {
            out.push_str(&format!(" {k}='{v}'"));
        }
        out.push('>');
        let mut kids: Vec<String> = Vec::new();
        for c in &e.children {
            match c {
                Node::Text(t) if !t.trim().is_empty() => kids.push(t.trim().to_owned()),
                Node::Text(_) => {}
                Node::Element(c) if ignored(c) => {}
                Node::Element(c) => {
                    let mut s = String::new();
                    self.write(c, &e.ns, &mut s);
                    kids.push(s);
                }
            }
        }
        // Roster items and MUC status codes carry no order. Prosody lists one item per
        // session of a multi-session occupant; they normalise to the same item.
        if e.is("query", ns::ROSTER) || e.is("x", ns::MUC_USER) {
            kids.sort();
        }
        if e.is("x", ns::MUC_USER) {
            kids.dedup();
        }
        out.push_str(&kids.concat());
        out.push_str(&format!("</{}>", e.name));
    }
}

/// Children that differ between any two deliveries: timestamps and ids stamped on the way.
fn ignored(e: &Element) -> bool {
    e.is("delay", "urn:xmpp:delay")
        || e.is("x", "jabber:x:delay")
        || e.is("stanza-id", "urn:xmpp:sid:0")
        || e.is("occupant-id", "urn:xmpp:occupant-id:0")
}

/// The SPEC rules under which B may differ from real resources, as the allow-list of the
/// oracle. Each counts how often it explained a difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[allow(clippy::enum_variant_names)] // each rule is about something reaching every page
pub enum Allow {
    /// SPEC §6.3/§6.5: every inbound stanza reaches every page, so a tab that has not joined a
    /// room still sees the room's presence and messages; a real resource that did not join
    /// sees nothing of it.
    RoomToEveryPage,
    /// SPEC §6.3: a message to the session's full JID reaches every page; between real
    /// resources only the addressed one gets it when the server does not carbon it
    /// (private, no-copy, headline, normal without body, a room's error to the one that sent).
    FullJidMessageToEveryPage,
    /// SPEC §6.2: a request to the session's full JID goes to every page; a real resource
    /// other than the addressed one never sees it.
    RequestToEveryPage,
    /// SPEC §6.6: one upstream resource carries the latest page presence, priority included;
    /// with a negative priority the server routes no bare-JID message to it (RFC 6121 §8.5.2),
    /// where other real resources would still get them. Allowed per script step.
    LatestPresenceWins,
    /// SPEC §6.6: a page joining a room the session is in gets occupants, self-presence and
    /// subject replayed, not the discussion history a real resource's join brings. Allowed
    /// per script step.
    RoomReplayWithoutHistory,
    /// SPEC §6.3/§6.5: inbound messages and presence reach every page, so a page that sent
    /// unavailable but stays open still gets messages to the bare JID and the contacts' and the
    /// user's availability presence; a real resource that went unavailable gets none of these
    /// (RFC 6121 §4.4.3, §8.5.2.1: only available resources).
    InboundToUnavailablePage,
}

impl Allow {
    pub fn rule(self) -> &'static str {
        match self {
            Allow::RoomToEveryPage => "SPEC §6.3/§6.5 room stanzas reach pages not in the room",
            Allow::FullJidMessageToEveryPage => {
                "SPEC §6.3 a message to the full JID reaches every page"
            }
            Allow::RequestToEveryPage => "SPEC §6.2 an inbound request reaches every page",
            Allow::LatestPresenceWins => {
                "SPEC §6.6 the latest page presence (priority included) is the one upstream"
            }
            Allow::RoomReplayWithoutHistory => {
                "SPEC §6.6 a later page's join replays occupants, self-presence and subject only"
            }
            Allow::InboundToUnavailablePage => {
                "SPEC §6.3/§6.5 bare-JID messages and presence reach a page that is itself unavailable"
            }
        }
    }
}

/// The allow-list hits as `rule: count` lines.
pub fn hits_text(hits: &BTreeMap<Allow, usize>) -> String {
    hits.iter()
        .map(|(a, n)| format!("{} × {n}", a.rule()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One normalised thing an observer received.
#[derive(Clone, Debug)]
pub struct Ev {
    /// Who it came from (normalised), or `carbon`/`iq` buckets.
    pub key: String,
    pub text: String,
    pub presence: bool,
    /// The rule that explains it if only B has it.
    pub allow: Option<Allow>,
}

/// What one observer knows, folded from what it received since it bound.
#[derive(Clone, Default)]
pub struct Observer {
    /// `Some(i)` for tab i, `None` for a contact.
    pub tab: Option<usize>,
    pub daemon_side: bool,
    /// Our own resources' latest available presence (raw full JID → text).
    own: BTreeMap<String, String>,
    own_seen: Option<String>,
    /// Latest presence text per sender, for de-duplication and the state.
    last: BTreeMap<String, String>,
    pending: BTreeSet<String>,
    subjects: BTreeMap<String, String>,
    /// The presence this tab sent in the current step, as its reflection reads: in that step
    /// it is the user's presence, whatever order the other resources' presence (the server's
    /// answers to our probes) arrives in.
    mine: Option<String>,
    /// Rooms this tab joined (normalised bare), for [`Allow::RoomToEveryPage`].
    rooms: BTreeSet<String>,
    /// This tab's last undirected presence was unavailable, or it sent none since the page
    /// opened, for [`Allow::InboundToUnavailablePage`].
    unavailable: bool,
}

impl Observer {
    pub fn new(tab: Option<usize>, daemon_side: bool) -> Observer {
        Observer {
            tab,
            daemon_side,
            ..Observer::default()
        }
    }

    /// A new page: it knows nothing yet, and is unavailable until it sends presence (a reload
    /// re-sends the tab's presence in the same step, if it had one).
    pub fn reset(&mut self) {
        *self = Observer {
            unavailable: true,
            ..Observer::new(self.tab, self.daemon_side)
        };
    }

    /// The state compared at the end of every step: who is online (as this client would show
    /// it), pending subscription requests, room subjects.
    pub fn state(&self) -> BTreeMap<String, String> {
        let mut s: BTreeMap<String, String> = self
            .last
            .iter()
            .filter(|(_, t)| !t.contains("type='unavailable'") && !t.contains("type='error'"))
            .map(|(k, v)| (format!("presence {k}"), v.clone()))
            .collect();
        for p in &self.pending {
            s.insert(format!("pending {p}"), String::new());
        }
        for (room, subject) in &self.subjects {
            s.insert(format!("subject {room}"), subject.clone());
        }
        s
    }

    /// Notes a stanza this tab sent (rooms it addressed, answers to subscriptions).
    pub fn sent(&mut self, n: &Names, e: &Element) {
        let Some(to) = e.attr("to") else {
            if e.is("presence", ns::CLIENT) && matches!(e.attr("type"), None | Some("unavailable"))
            {
                self.unavailable = e.attr("type").is_some();
            }
            if e.is("presence", ns::CLIENT) && e.attr("type").is_none() {
                let mut reflected = e.clone();
                reflected.set_attr("from", format!("{}/~", n.user));
                self.mine = Some(n.norm(&reflected));
            }
            if e.is("presence", ns::CLIENT) && e.attr("type") == Some("unavailable") {
                // A client going offline forgets who is online (rooms aside); it learns
                // again when it comes back.
                self.last.retain(|k, _| k.starts_with('#'));
                // The server reflects it to a real resource; a page going offline while
                // another stays online changes nothing upstream (SPEC §6.6).
                self.own_seen = Some(
                    n.norm(
                        &Element::new("presence", ns::CLIENT)
                            .with_attr("from", format!("{}/~", n.user))
                            .with_attr("type", "unavailable"),
                    ),
                );
            }
            return;
        };
        let bare = n.jid(to.split('/').next().unwrap_or(to));
        if n.is_room(to) {
            self.rooms.insert(bare.clone());
        }
        if e.is("presence", ns::CLIENT)
            && matches!(e.attr("type"), Some("subscribed" | "unsubscribed"))
        {
            self.pending.remove(&bare);
        }
    }

    /// Folds one received stanza; returns the event to compare, if any.
    pub fn feed(&mut self, n: &Names, e: &Element) -> (Option<Ev>, Option<Allow>) {
        if e.is("iq", ns::CLIENT) && e.attr("id").is_some_and(|i| i.starts_with("o-sync")) {
            return (None, None);
        }
        if e.is("message", ns::CLIENT) && e.child("barrier", ORACLE_NS).is_some() {
            return (None, None);
        }
        let from = e.attr("from").unwrap_or("");
        let from_n = n.jid(from);
        let room_bare = n
            .is_room(from)
            .then(|| n.jid(from.split('/').next().unwrap_or("")));
        if let (Some(room), true, Some(_)) = (&room_bare, self.daemon_side, self.tab)
            && !self.rooms.contains(room)
        {
            return (None, Some(Allow::RoomToEveryPage));
        }
        if e.is("message", ns::CLIENT) {
            return (self.message(n, e, &from_n, room_bare.as_deref()), None);
        }
        if let (true, true, Some(_), None) =
            (self.unavailable, self.daemon_side, self.tab, &room_bare)
            && e.is("presence", ns::CLIENT)
            && matches!(e.attr("type"), None | Some("unavailable"))
        {
            // Neither shown nor kept: the client learns who is online when it comes back.
            return (None, Some(Allow::InboundToUnavailablePage));
        }
        if e.is("presence", ns::CLIENT) {
            return (
                self.presence(n, e, from, &from_n, room_bare.as_deref()),
                None,
            );
        }
        let kind = e.attr("type").unwrap_or("");
        let request = matches!(kind, "get" | "set");
        let push = request && (from.is_empty() || from_n == "U");
        if push {
            // An approved or removed contact's request is answered (as a client reads it).
            for item in e
                .child("query", ns::ROSTER)
                .into_iter()
                .flat_map(Element::elements)
            {
                if matches!(item.attr("subscription"), Some("from" | "both" | "remove")) {
                    self.pending.remove(&n.jid(item.attr("jid").unwrap_or("")));
                }
            }
        }
        if request && !push && self.daemon_side && self.tab.is_some_and(|t| t != 0) {
            return (None, Some(Allow::RequestToEveryPage));
        }
        // Answers to different requests carry no order; each id is its own sender.
        let key = if push {
            "iq push".to_owned()
        } else {
            format!(
                "iq {}",
                e.attr("id").filter(|i| is_oracle_id(i)).unwrap_or("")
            )
        };
        (
            Some(Ev {
                key,
                text: n.norm(e),
                presence: false,
                allow: None,
            }),
            None,
        )
    }

    fn message(&mut self, n: &Names, e: &Element, from_n: &str, room: Option<&str>) -> Option<Ev> {
        for (dir, key) in [("sent", "carbon"), ("received", "")] {
            let inner = e
                .child(dir, ns::CARBONS)
                .and_then(|c| c.child("forwarded", ns::FORWARD))
                .and_then(|f| f.child("message", ns::CLIENT));
            if let Some(inner) = inner {
                if from_n != "U" {
                    break; // a forged carbon is an ordinary message
                }
                if key.is_empty() {
                    // A received carbon is the message itself, delivered to this resource.
                    let inner_from = n.jid(inner.attr("from").unwrap_or(""));
                    return Some(Ev {
                        key: inner_from,
                        text: n.norm(inner),
                        presence: false,
                        allow: None,
                    });
                }
                let mut text = String::new();
                n.write(inner, "jabber:client", &mut text);
                return Some(Ev {
                    key: key.to_owned(),
                    text: format!("sent {text}"),
                    presence: false,
                    allow: None,
                });
            }
        }
        // A subject is room state, replayed to a page that joins (SPEC §6.6): compared like
        // presence.
        let mut state = false;
        if let (Some(room), Some(subject)) = (room, e.child("subject", ns::CLIENT))
            && e.attr("type") == Some("groupchat")
            && e.child("body", ns::CLIENT).is_none()
        {
            if self.subjects.get(room) == Some(&subject.text()) {
                return None;
            }
            self.subjects.insert(room.to_owned(), subject.text());
            state = true;
        }
        let to_full = e.attr("to").is_some_and(|t| n.jid(t) == "U/~");
        let to_bare = e.attr("to").is_some_and(|t| n.jid(t) == "U");
        let allow = if self.daemon_side && to_full && self.tab.is_some_and(|t| t != 0) {
            Some(Allow::FullJidMessageToEveryPage)
        } else if self.daemon_side && to_bare && self.tab.is_some() && self.unavailable {
            Some(Allow::InboundToUnavailablePage)
        } else {
            None
        };
        Some(Ev {
            key: from_n.to_owned(),
            text: n.norm(e),
            presence: state,
            allow,
        })
    }

    fn presence(
        &mut self,
        n: &Names,
        e: &Element,
        from: &str,
        from_n: &str,
        room: Option<&str>,
    ) -> Option<Ev> {
        let kind = e.attr("type");
        let text = n.norm(e);
        // Our own resources: one user as contacts see it, whatever the number of resources
        // (SPEC §6.6): the latest available presence, unavailable only when none is left.
        if from_n == "U/~" && matches!(kind, None | Some("unavailable")) {
            match kind {
                None => {
                    self.own.insert(from.to_owned(), text.clone());
                    if self.mine.as_ref().is_some_and(|m| *m != text) {
                        return None;
                    }
                }
                _ => {
                    self.own.remove(from);
                    if !self.own.is_empty() {
                        return None;
                    }
                }
            }
            if self.own_seen.as_deref() == Some(text.as_str()) {
                return None;
            }
            self.own_seen = Some(text.clone());
            self.last.insert("U/~".to_owned(), text.clone());
            return Some(Ev {
                key: "U/~".to_owned(),
                text,
                presence: true,
                allow: None,
            });
        }
        let bare = from_n.split('/').next().unwrap_or(from_n).to_owned();
        match kind {
            Some("subscribe") => {
                self.pending.insert(bare);
            }
            Some("unsubscribe" | "unsubscribed" | "subscribed") => {
                self.pending.remove(&bare);
            }
            _ => {
                // The same presence again (another resource's join, a replay); "room created"
                // belongs to the first self-presence only.
                let created = "<status code='201'></status>";
                if self.last.get(from_n).map(|t| t.replace(created, ""))
                    == Some(text.replace(created, ""))
                {
                    return None;
                }
                if kind == Some("unavailable") && room.is_none() && !self.last.contains_key(from_n)
                {
                    return None; // offline, as far as we knew (the server's answer to a probe)
                }
                self.last.insert(from_n.to_owned(), text.clone());
                if let (Some(room), Some("unavailable" | "error")) = (room, kind) {
                    let x = e.child("x", ns::MUC_USER);
                    let ours = x.is_some_and(|x| {
                        x.elements()
                            .any(|c| c.name == "status" && c.attr("code") == Some("110"))
                    }) || kind == Some("error");
                    let renamed = x.is_some_and(|x| {
                        x.elements()
                            .any(|c| c.name == "status" && c.attr("code") == Some("303"))
                    });
                    let destroyed = x.is_some_and(|x| x.child("destroy", ns::MUC_USER).is_some());
                    if (ours && !renamed) || destroyed {
                        self.rooms.remove(room);
                        let prefix = format!("{room}/");
                        self.last.retain(|k, _| !k.starts_with(&prefix));
                        self.subjects.remove(room);
                    }
                }
            }
        }
        Some(Ev {
            key: from_n.to_owned(),
            text,
            presence: true,
            allow: None,
        })
    }
}

/// Folds one step's record into each observer and returns the events per observer (tabs, then
/// contacts), with the allow-list hits counted.
pub fn fold(
    n: &Names,
    observers: &mut [Observer],
    record: &StepRecord,
    hits: &mut BTreeMap<Allow, usize>,
) -> Vec<Vec<Ev>> {
    let mut out = Vec::new();
    for (o, received) in record.received.iter().enumerate() {
        let obs = &mut observers[o];
        obs.mine = None;
        if let Some(t) = obs.tab {
            if record.fresh.get(t).copied().unwrap_or(false) {
                obs.reset();
            }
            for s in &record.sent[t] {
                obs.sent(n, s);
            }
        }
        let mut evs = Vec::new();
        for e in received {
            let (ev, allow) = obs.feed(n, e);
            if let Some(a) = allow {
                *hits.entry(a).or_default() += 1;
            }
            evs.extend(ev);
        }
        out.push(evs);
    }
    out
}

/// Differences between what A and B's observer `o` saw in one step, as lines; empty when they
/// agree. A page replaced in this step is compared on everything but presence: its presence
/// is a replay (SPEC §6.6), checked through the state.
pub fn diff(a: &[Ev], b: &[Ev], fresh: bool, hits: &mut BTreeMap<Allow, usize>) -> Vec<String> {
    let group = |evs: &[Ev]| {
        let mut m: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
        for e in evs.iter().filter(|e| !(fresh && e.presence)) {
            m.entry(e.key.clone()).or_default().push(e.clone());
        }
        m
    };
    let ga = group(a);
    let mut gb = group(b);
    for (key, evs) in gb.iter_mut() {
        let mut in_a: Vec<&String> = ga
            .get(key)
            .map(|v| v.iter().map(|e| &e.text).collect())
            .unwrap_or_default();
        evs.retain(|e| {
            if let Some(pos) = in_a.iter().position(|t| **t == e.text) {
                in_a.remove(pos);
                return true;
            }
            match e.allow {
                Some(rule) => {
                    *hits.entry(rule).or_default() += 1;
                    false
                }
                None => true,
            }
        });
    }
    gb.retain(|_, v| !v.is_empty());
    let texts = |m: &BTreeMap<String, Vec<Ev>>| -> BTreeMap<String, Vec<String>> {
        m.iter()
            .map(|(k, v)| (k.clone(), v.iter().map(|e| e.text.clone()).collect()))
            .collect()
    };
    let (ta, tb) = (texts(&ga), texts(&gb));
    let mut lines = Vec::new();
    let keys: BTreeSet<&String> = ta.keys().chain(tb.keys()).collect();
    for k in keys {
        let (x, y) = (ta.get(k), tb.get(k));
        if x != y {
            lines.push(format!(
                "  from {k}:\n    A saw {}\n    B saw {}",
                show(x),
                show(y)
            ));
        }
    }
    lines
}

/// Differences between two observers' states.
pub fn diff_state(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "  state {k}:\n    A has {}\n    B has {}",
                a.get(k).map_or("nothing", String::as_str),
                b.get(k).map_or("nothing", String::as_str)
            )
        })
        .collect()
}

fn show(v: Option<&Vec<String>>) -> String {
    match v {
        None => "nothing".to_owned(),
        Some(v) => v.join("\n          "),
    }
}

/// Whether `id` is one the oracle gave (`o-` and then lowercase letters, digits and dashes).
/// Servers stamp their own random ids (base64url, 22 characters at Prosody's MUC) on stanzas
/// that came without one; one in 4 096 of those starts with `o-` too, and must not be taken
/// for the oracle's, or the two sides differ by a random id.
pub fn is_oracle_id(id: &str) -> bool {
    id.strip_prefix("o-").is_some_and(|rest| {
        rest.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    })
}

#[test]
fn a_server_id_that_happens_to_start_like_the_oracles_is_not_taken_for_one() {
    assert!(is_oracle_id("o-sync-3") && is_oracle_id("o-config-x0"));
    assert!(
        !is_oracle_id("o-zLljVpDKaKV1AxPfqsVq1g"),
        "seen from Prosody's MUC"
    );
    assert!(!is_oracle_id("zLljVpDKaKV1AxPfqsVq1g"));
}
