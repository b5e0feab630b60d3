//! One side of the differential run: the acting user's K clients (direct resources or daemon
//! pages), two contacts logged in straight to the server, and a marker account that closes every
//! step with a barrier message. A step is one action, a round trip through the server by the
//! client that acted, and a barrier every client must see; what each client received between two
//! barriers is that step's record.

use std::collections::BTreeMap;
use std::time::Duration;

use boshmux::xmpp::{Element, ns};

use crate::clients::{Client, LIMIT, bare};
use crate::script::{Answer, Step, Who};
use crate::support::Prosody;
use crate::support::daemon::Daemon;
use crate::view::Names;

/// The namespace of the barrier element the marker account sends.
pub const ORACLE_NS: &str = "urn:boshmux:oracle:0";

/// Which side this world plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// (A) each tab is a real resource connected straight to the server.
    Direct,
    /// (B) each tab is a page of one daemon session.
    Daemon,
}

/// What one step left at each observer (tabs first, then contacts B and C).
pub struct StepRecord {
    pub received: Vec<Vec<Element>>,
    /// Stanzas each tab sent in this step (for the observers' room bookkeeping).
    pub sent: Vec<Vec<Element>>,
    /// Tabs whose page was replaced in this step (B only): they start knowing nothing.
    pub fresh: Vec<bool>,
    /// Tabs whose presence this step is compared through the state only: replaced pages (the
    /// replay, SPEC §6.6) and resources that stepped out and into a room for a nick change.
    pub state_only: Vec<bool>,
}

/// What a tab is in, so that a reloaded page can send what a real web client sends on start.
#[derive(Default, Clone)]
struct Track {
    presence: Option<Element>,
    /// Room bare JID → the join presence (its `to` follows nick changes).
    rooms: BTreeMap<String, Element>,
}

pub struct World {
    pub mode: Mode,
    pub names: Names,
    pub tabs: Vec<Client>,
    contacts: Vec<Client>,
    marker: Client,
    /// The full JID contacts address: the first resource (A) or the session's (B).
    pub user_full: String,
    daemon: Option<Daemon>,
    token: String,
    user: String,
    domain: String,
    tracks: Vec<Track>,
    step: u64,
}

impl World {
    /// Logs everyone in: contacts online, the marker without presence, K tabs each enabling
    /// carbons, fetching the roster and sending initial presence. `group` is e.g. `g41`;
    /// `tag` makes room names unique to this world.
    pub async fn start(p: &Prosody, mode: Mode, group: &str, tag: &str, k: usize) -> World {
        let user = format!("{group}a");
        let muc = p.muc.clone();
        let names = Names {
            user: format!("{user}@{}", p.domain),
            contacts: ["b", "c", "d"].map(|l| format!("{group}{l}@{}", p.domain)),
            domain: p.domain.clone(),
            muc,
            tag: tag.to_owned(),
        };
        let resource = format!("o-{tag}");
        let (b, c, marker) = tokio::join!(
            Client::direct(p, &names.contacts[0][..user.len()], &resource),
            Client::direct(p, &names.contacts[1][..user.len()], &resource),
            Client::direct(p, &names.contacts[2][..user.len()], &resource),
        );
        let contacts = vec![b, c];
        let (daemon, token, tabs, user_full) = match mode {
            Mode::Direct => {
                let resources: Vec<String> = (0..k).map(|i| format!("tab{i}-{tag}")).collect();
                let tabs = futures_util::future::join_all(
                    resources.iter().map(|r| Client::direct(p, &user, r)),
                )
                .await;
                let full = tabs[0].jid.clone();
                (None, String::new(), tabs, full)
            }
            Mode::Daemon => {
                let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
                let h = d.handoff(&user, &format!("pw-{user}")).await;
                let mut tabs = Vec::new();
                for _ in 0..k {
                    tabs.push(Client::page(&d.ws_url(), &p.domain, &user, &h.token).await);
                }
                (Some(d), h.token, tabs, h.jid)
            }
        };
        World {
            mode,
            names,
            tabs,
            contacts,
            marker,
            user_full,
            daemon,
            token,
            user,
            domain: p.domain.clone(),
            tracks: vec![Track::default(); k],
            step: 0,
        }
    }

    /// The opening step: contacts online, then each tab's start-up stanzas.
    pub async fn open(&mut self) -> Result<StepRecord, String> {
        let starts = self.starts();
        for c in &mut self.contacts {
            c.send(Element::new("presence", ns::CLIENT)).await;
        }
        let mut sent = vec![Vec::new(); self.tabs.len()];
        for (i, sent) in sent.iter_mut().enumerate() {
            for s in self.startup(i, 0, true) {
                sent.push(s.clone());
                self.tabs[i].send(s).await;
            }
            self.sync_tab(i).await?;
        }
        let fresh = vec![true; self.tabs.len()];
        self.finish(starts, sent, fresh.clone(), fresh).await
    }

    /// What a page sends when it starts: carbons on, roster, its presence, its rooms.
    fn startup(&mut self, tab: usize, n: u64, first: bool) -> Vec<Element> {
        let mut out = vec![
            iq("set", &format!("o-carbons-{n}-{tab}"), None)
                .with_child(Element::new("enable", ns::CARBONS)),
            iq("get", &format!("o-roster-{n}-{tab}"), None)
                .with_child(Element::new("query", ns::ROSTER)),
        ];
        if first {
            let p = Element::new("presence", ns::CLIENT);
            self.tracks[tab].presence = Some(p.clone());
            out.push(p);
        } else if self.mode == Mode::Daemon {
            out.extend(self.tracks[tab].presence.clone());
            out.extend(self.tracks[tab].rooms.values().cloned());
        }
        out
    }

    fn starts(&self) -> Vec<usize> {
        self.observers().map(|c| c.log.len()).collect()
    }

    fn observers(&self) -> impl Iterator<Item = &Client> {
        self.tabs.iter().chain(self.contacts.iter())
    }

    /// Replaces `{U}`, `{Uf}`, `{B}`, `{C}`, `{D}`, `{Bf}`, `{Cf}`, `{S}`, `{M}` and `{r:NAME}`
    /// (a room of this world) in a stanza template.
    pub fn expand(&self, template: &str) -> String {
        let mut out = template
            .replace("{Uf}", &self.user_full)
            .replace("{Bf}", &self.contacts[0].jid)
            .replace("{Cf}", &self.contacts[1].jid)
            .replace("{U}", &self.names.user)
            .replace("{B}", &self.names.contacts[0])
            .replace("{C}", &self.names.contacts[1])
            .replace("{D}", &self.names.contacts[2])
            .replace("{S}", &self.names.domain)
            .replace("{M}", &self.names.muc);
        while let Some(at) = out.find("{r:") {
            let end = at + out[at..].find('}').expect("closed room placeholder");
            let room = format!(
                "{}-{}@{}",
                &out[at + 3..end],
                self.names.tag,
                self.names.muc
            );
            out.replace_range(at..=end, &room);
        }
        out
    }

    /// Parses an expanded template; a top element without its own namespace goes in
    /// `jabber:client`.
    pub fn stanza(&self, template: &str) -> Element {
        let mut text = self.expand(template);
        let tag_end = text.find('>').unwrap_or(text.len());
        if !text[..tag_end].contains("xmlns=") {
            let name_end = text[1..]
                .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
                .map_or(text.len(), |i| i + 1);
            text.insert_str(name_end, " xmlns='jabber:client'");
        }
        boshmux::xmpp::parse(text.as_bytes(), &boshmux::xmpp::Limits::PAGE)
            .unwrap_or_else(|e| panic!("script stanza {text}: {e}"))
    }

    /// Plays one step and returns what every observer received in it.
    pub async fn play(&mut self, step: &Step) -> Result<StepRecord, String> {
        self.step += 1;
        let n = self.step;
        let mut starts = self.starts();
        let k = self.tabs.len();
        let mut sent = vec![Vec::new(); k];
        let mut fresh = vec![false; k];
        let mut state_only = vec![false; k];
        match step {
            Step::Send(who, template) => {
                let el = self.stanza(template);
                match *who {
                    Who::Tab(i) => {
                        // The tab's first presence after being offline brings the replay
                        // (SPEC §6.6) in B and the server's probe answers in A.
                        let back_online = el.is("presence", ns::CLIENT)
                            && el.attr("to").is_none()
                            && el.attr("type").is_none()
                            && self.tracks[i].presence.is_none();
                        state_only[i] |= back_online;
                        let copies = self.track_send(i, &el);
                        let several = copies.len() > 1;
                        for (j, s) in copies {
                            state_only[j] |= j != i;
                            sent[j].push(s.clone());
                            self.tabs[j].send(s).await;
                            if several {
                                // Different resources: keep the server's order ours.
                                self.sync_tab(j).await?;
                            }
                        }
                        self.sync_tab(i).await?;
                    }
                    Who::B | Who::C => {
                        let c = contact_index(*who);
                        self.contacts[c].send(el).await;
                        self.sync_client(Side::Contact(c)).await?;
                    }
                }
            }
            Step::Reload(i) => {
                let i = *i;
                if self.mode == Mode::Daemon {
                    let d = self.daemon.as_ref().expect("daemon world");
                    let url = d.ws_url();
                    let page = Client::page(&url, &self.domain, &self.user, &self.token).await;
                    let old = std::mem::replace(&mut self.tabs[i], page);
                    old.close().await;
                    starts[i] = 0;
                    fresh[i] = true;
                    state_only[i] = true;
                }
                for s in self.startup(i, n, false) {
                    sent[i].push(s.clone());
                    self.tabs[i].send(s).await;
                }
                self.sync_tab(i).await?;
            }
            Step::Ask {
                from,
                payload,
                answers,
            } => {
                let c = contact_index(*from);
                let id = format!("o-ask-{n}");
                let request =
                    iq("get", &id, Some(&self.user_full)).with_child(self.stanza(payload));
                let asker = self.contacts[c].jid.clone();
                self.contacts[c].send(request).await;
                let is_request = |e: &Element| e.is("iq", ns::CLIENT) && e.attr("id") == Some(&id);
                match self.mode {
                    // A request to one real resource, answered by the user as a whole (SPEC
                    // §6.2): a result if any tab has one, else the first error.
                    Mode::Direct => {
                        let mut found = self.tabs[0]
                            .log
                            .find(starts[0], LIMIT, is_request)
                            .await
                            .is_some();
                        found &= !answers.is_empty();
                        let pick = answers
                            .iter()
                            .find(|a| matches!(a, Answer::Result(_)))
                            .or_else(|| answers.iter().find(|a| matches!(a, Answer::Error)));
                        if let (true, Some(a)) = (found, pick) {
                            let reply = self.answer(a, &id, &asker);
                            sent[0].push(reply.clone());
                            self.tabs[0].send(reply).await;
                        }
                    }
                    Mode::Daemon => {
                        for (i, a) in answers.iter().enumerate() {
                            if self.tabs[i]
                                .log
                                .find(starts[i], LIMIT, is_request)
                                .await
                                .is_none()
                            {
                                return Err(format!("tab {i} never got the request {id}"));
                            }
                            if !matches!(a, Answer::Silent) {
                                let reply = self.answer(a, &id, &asker);
                                sent[i].push(reply.clone());
                                self.tabs[i].send(reply).await;
                                // The daemon has handled this answer before the next page's:
                                // the order of the answers is the script's, not a race.
                                self.sync_tab(i).await?;
                            }
                        }
                    }
                }
                // The answer may be held (SPEC §6.2); give it a moment, then go on: the record
                // shows whether it came.
                let _ = self.contacts[c]
                    .log
                    .find(starts[k + c], Duration::from_secs(5), |e| {
                        e.is("iq", ns::CLIENT)
                            && e.attr("id") == Some(&id)
                            && matches!(e.attr("type"), Some("result" | "error"))
                    })
                    .await;
            }
        }
        self.finish(starts, sent, fresh, state_only).await
    }

    fn answer(&self, a: &Answer, id: &str, to: &str) -> Element {
        match a {
            Answer::Result(payload) => {
                let mut r = iq("result", id, Some(to));
                if !payload.is_empty() {
                    r.push_child(self.stanza(payload));
                }
                r
            }
            Answer::Error | Answer::Silent => iq("error", id, Some(to)).with_child(
                Element::new("error", ns::CLIENT)
                    .with_attr("type", "cancel")
                    .with_child(Element::new("service-unavailable", ns::STANZAS)),
            ),
        }
    }

    /// Tab `i` sends `el`: updates what the tab is in and returns the stanzas to send, in order,
    /// by tab. SPEC §6.6 makes a nick change apply to every page in the room; with real
    /// resources (A) the other resources in the room leave and rejoin under the new nick, so
    /// those tabs are compared on state for that step.
    fn track_send(&mut self, i: usize, el: &Element) -> Vec<(usize, Element)> {
        let mut out = vec![(i, el.clone())];
        if !el.is("presence", ns::CLIENT) {
            return out;
        }
        let to = el.attr("to").map(str::to_owned);
        let kind = el.attr("type").map(str::to_owned);
        match (to, kind.as_deref()) {
            (None, None) => self.tracks[i].presence = Some(el.clone()),
            (None, Some("unavailable")) => self.tracks[i].presence = None,
            (Some(to), None) if to.contains('/') && bare(&to).ends_with(&self.names.muc) => {
                let room = bare(&to);
                let old_nick = self.tracks[i]
                    .rooms
                    .get(&room)
                    .and_then(|join| join.attr("to"))
                    .filter(|old| *old != to)
                    .map(str::to_owned);
                let mut moved = vec![i];
                if let Some(old) = old_nick {
                    // Every tab in the room is under the new nick now (a page rejoins under
                    // it after a reload). With real resources the others step out, the acting
                    // one renames (the last session of the occupant, so the room announces a
                    // rename), and they step in under the new nick.
                    let others: Vec<usize> = (0..self.tabs.len())
                        .filter(|j| *j != i && self.tracks[*j].rooms.contains_key(&room))
                        .collect();
                    moved.extend(others.iter().copied());
                    if self.mode != Mode::Direct {
                        for j in moved {
                            if let Some(join) = self.tracks[j].rooms.get_mut(&room) {
                                join.set_attr("to", to.clone());
                            }
                        }
                        return out;
                    }
                    let leave = Element::new("presence", ns::CLIENT)
                        .with_attr("to", old)
                        .with_attr("type", "unavailable");
                    let join = Element::new("presence", ns::CLIENT)
                        .with_attr("to", to.clone())
                        .with_child(Element::new("x", ns::MUC));
                    out = others.iter().map(|j| (*j, leave.clone())).collect();
                    out.push((i, el.clone()));
                    out.extend(others.iter().map(|j| (*j, join.clone())));
                }
                for j in moved {
                    let join = self.tracks[j]
                        .rooms
                        .entry(room.clone())
                        .or_insert_with(|| el.clone());
                    join.set_attr("to", to.clone());
                }
            }
            (Some(to), Some("unavailable")) if bare(&to).ends_with(&self.names.muc) => {
                self.tracks[i].rooms.remove(&bare(&to));
            }
            _ => {}
        }
        out
    }

    /// After a step: rooms a tab was refused, kicked, banned or destroyed out of are forgotten,
    /// as a client does on seeing it.
    fn track_received(&mut self, tab: usize, received: &[Element]) {
        for e in received {
            if !e.is("presence", ns::CLIENT) {
                continue;
            }
            let Some(from) = e.attr("from") else { continue };
            let room = bare(from);
            let Some(join) = self.tracks[tab].rooms.get(&room) else {
                continue;
            };
            let ours = join.attr("to") == Some(from);
            let x = e.child("x", ns::MUC_USER);
            let codes: Vec<String> = x
                .map(|x| {
                    x.elements()
                        .filter(|c| c.name == "status")
                        .filter_map(|c| c.attr("code").map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let gone = match e.attr("type") {
                Some("error") => ours,
                // Only under the nick the tab is in now: the self-presence of leaving an old
                // nick (a real resource following another tab's nick change steps out, then
                // in under the new one) does not end the room for it.
                Some("unavailable") => {
                    (ours && codes.iter().any(|c| c == "110") && !codes.iter().any(|c| c == "303"))
                        || x.and_then(|x| x.child("destroy", ns::MUC_USER)).is_some()
                }
                _ => false,
            };
            if gone {
                self.tracks[tab].rooms.remove(&room);
            }
        }
    }

    async fn sync_tab(&mut self, i: usize) -> Result<(), String> {
        self.sync_client(Side::Tab(i)).await
    }

    /// A ping round trip through the server by one client: everything it sent before has been
    /// handled by the server (and by the daemon, for a page).
    async fn sync_client(&mut self, side: Side) -> Result<(), String> {
        let id = format!("o-sync-{}", self.step);
        let ping = iq("get", &id, Some(&self.domain)).with_child(Element::new("ping", ns::PING));
        let client = match side {
            Side::Tab(i) => &mut self.tabs[i],
            Side::Contact(c) => &mut self.contacts[c],
        };
        let from = client.log.len();
        client.send(ping).await;
        client
            .log
            .find(from, LIMIT, |e| {
                e.is("iq", ns::CLIENT) && e.attr("id") == Some(id.as_str())
            })
            .await
            .map(|_| ())
            .ok_or_else(|| format!("{side:?} got no answer to its sync ping"))
    }

    /// The marker account sends a barrier to every observer (one to the session's JID in B,
    /// which reaches every page) and the record is cut at each one's barrier.
    async fn finish(
        &mut self,
        starts: Vec<usize>,
        sent: Vec<Vec<Element>>,
        fresh: Vec<bool>,
        state_only: Vec<bool>,
    ) -> Result<StepRecord, String> {
        let n = self.step.to_string();
        let mut targets: Vec<String> = match self.mode {
            Mode::Direct => self.tabs.iter().map(|t| t.jid.clone()).collect(),
            Mode::Daemon => vec![self.user_full.clone()],
        };
        targets.extend(self.contacts.iter().map(|c| c.jid.clone()));
        for to in targets {
            let barrier = Element::new("message", ns::CLIENT)
                .with_attr("to", to)
                .with_attr("type", "headline")
                .with_child(Element::new("barrier", ORACLE_NS).with_attr("n", n.clone()));
            self.marker.send(barrier).await;
        }
        let mut received = Vec::new();
        for (o, client) in self.observers().enumerate() {
            let at = client
                .log
                .find(starts[o], LIMIT, |e| is_barrier(e, &n))
                .await
                .ok_or_else(|| format!("observer {o} never got barrier {n}"))?;
            received.push(client.log.slice(starts[o], at));
        }
        for (tab, r) in received.iter().enumerate().take(self.tabs.len()) {
            self.track_received(tab, r);
        }
        Ok(StepRecord {
            received,
            sent,
            fresh,
            state_only,
        })
    }

    /// Logs everyone out and stops the daemon.
    pub async fn close(self) {
        for t in self.tabs {
            t.close().await;
        }
        for c in self.contacts {
            c.close().await;
        }
        self.marker.close().await;
        if let Some(d) = self.daemon {
            d.stop().await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Tab(usize),
    Contact(usize),
}

fn contact_index(who: Who) -> usize {
    match who {
        Who::B => 0,
        Who::C => 1,
        Who::Tab(_) => panic!("not a contact"),
    }
}

fn iq(kind: &str, id: &str, to: Option<&str>) -> Element {
    let mut e = Element::new("iq", ns::CLIENT)
        .with_attr("type", kind)
        .with_attr("id", id);
    if let Some(to) = to {
        e.set_attr("to", to);
    }
    e
}

/// Whether `e` is the marker's barrier `n` (any barrier when `n` is empty).
pub fn is_barrier(e: &Element, n: &str) -> bool {
    e.is("message", ns::CLIENT)
        && e.child("barrier", ORACLE_NS)
            .is_some_and(|b| n.is_empty() || b.attr("n") == Some(n))
}
