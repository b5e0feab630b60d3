//! Seeded random interleavings: short random scripts played one after another on one pair of
//! long-lived worlds (logging in costs more than a run), each compared on its own. The seed is
//! printed; `BOSHMUX_ORACLE_SEED=N` replays it, `BOSHMUX_ORACLE_RUNS=N` sets the number of runs.

use std::collections::{BTreeMap, BTreeSet};

use crate::script::{Answer, Script, Step, Who};
use crate::support::Prosody;
use crate::view::Allow;
use crate::world::{Mode, World};
use crate::{compare, observers, play_on};

/// Tabs per random world.
const TABS: usize = 3;
/// Steps per random run.
const STEPS: usize = 6;
/// Rooms the random runs use, created (by contact B) before the first run.
const ROOMS: [&str; 2] = ["x0", "x1"];

/// SplitMix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Which tabs the generator has put in which room, under which nick, so that it writes what a
/// client would: a tab leaves, renames and speaks only in rooms it joined, every tab of the user
/// uses the user's nick in a room, and a tab goes offline only outside rooms (a real resource
/// going offline leaves its rooms; SPEC §6.6 does not say what a page's offline does to rooms).
#[derive(Default)]
pub struct Model {
    rooms: BTreeMap<&'static str, (&'static str, BTreeSet<usize>)>,
    /// Each tab's last undirected presence (its `<show/>`, empty for plain available; `None`
    /// when unavailable); a tab not listed has the opening's plain available presence.
    presence: BTreeMap<usize, Option<String>>,
    /// The latest available presence any tab sent (the shared one, SPEC §6.6).
    latest: String,
    /// The step just generated is a join answered from the replay.
    replay_step: bool,
}

impl Model {
    fn in_room(&self, room: &str, tab: usize) -> bool {
        self.rooms.get(room).is_some_and(|(_, t)| t.contains(&tab))
    }

    fn in_any(&self, tab: usize) -> bool {
        self.rooms.values().any(|(_, t)| t.contains(&tab))
    }

    /// Whether reloading `tab` re-sends a presence other than the shared one. Under SPEC §6.6
    /// (the latest presence wins) the reloaded page's presence then becomes everyone's, which
    /// real resources — they do not reload — never show; the hand-written
    /// `presence_reload_*` scripts cover reloads, so the generator leaves these out.
    fn reload_changes_presence(&self, tab: usize) -> bool {
        match self.presence.get(&tab) {
            None => !self.latest.is_empty(),
            Some(None) => false,
            Some(Some(p)) => *p != self.latest,
        }
    }
}

/// One random step.
fn step(rng: &mut Rng, model: &mut Model) -> Step {
    let t = rng.below(TABS);
    let tab = Who::Tab(t);
    let contact = *rng.pick(&[Who::B, Who::C]);
    let contact_jid = *rng.pick(&["{B}", "{C}", "{Bf}"]);
    let room = *rng.pick(&ROOMS);
    let send = |who: Who, s: String| Step::Send(who, s);
    let mut choice = rng.below(20);
    if matches!(choice, 10..=12) && !model.in_room(room, t) {
        choice = 8; // not in the room: join it first
    }
    if choice == 2 && model.in_any(t) {
        choice = 0;
    }
    match choice {
        0 | 1 => {
            let show = *rng.pick(&["", "away", "dnd", "xa", "chat"]);
            let inner = if show.is_empty() {
                String::new()
            } else {
                format!("<show>{show}</show>")
            };
            model.presence.insert(t, Some(inner.clone()));
            model.latest = inner.clone();
            send(tab, format!("<presence>{inner}</presence>"))
        }
        2 => {
            model.presence.insert(t, None);
            send(tab, "<presence type='unavailable'/>".to_owned())
        }
        3 | 4 => {
            let kind = *rng.pick(&[
                "type='chat'><body>c</body>",
                "type='chat'><body>p</body><private xmlns='urn:xmpp:carbons:2'/>",
                "type='chat'><body>n</body><no-copy xmlns='urn:xmpp:hints'/>",
                "type='headline'><body>h</body>",
                "><body>normal</body>",
                "><x xmlns='jabber:x:oob'><url>https://a.example/</url></x>",
                "type='chat'><gone xmlns='http://jabber.org/protocol/chatstates'/>",
            ]);
            send(tab, format!("<message to='{contact_jid}' {kind}</message>"))
        }
        5 | 6 => {
            let to = *rng.pick(&["{U}", "{Uf}"]);
            let kind = *rng.pick(&[
                "type='chat'><body>c</body>",
                "type='chat'><body>p</body><private xmlns='urn:xmpp:carbons:2'/>",
                "type='headline'><body>h</body>",
                "><body>normal</body>",
                "><x xmlns='jabber:x:oob'><url>https://b.example/</url></x>",
            ]);
            send(contact, format!("<message to='{to}' {kind}</message>"))
        }
        7 => {
            let q = *rng.pick(&[
                "to='{S}'><query xmlns='http://jabber.org/protocol/disco#info'/>",
                "to='{S}'><query xmlns='jabber:iq:version'/>",
                "><query xmlns='jabber:iq:roster'/>",
                "to='{M}'><query xmlns='http://jabber.org/protocol/disco#items'/>",
            ]);
            send(tab, format!("<iq type='get' id='o-q' {q}</iq>"))
        }
        8 | 9 => {
            let fresh_nick = *rng.pick(&["u", "u2"]);
            let entry = model
                .rooms
                .entry(room)
                .or_insert_with(|| (fresh_nick, BTreeSet::new()));
            // A tab joining a room the session is in (through another tab, or itself joining
            // again) gets the replay, not the history (SPEC §6.6): allowed for this step.
            if !entry.1.is_empty() {
                model.replay_step = true;
            }
            entry.1.insert(t);
            let nick = entry.0;
            send(
                tab,
                format!(
                    "<presence to='{{r:{room}}}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
                ),
            )
        }
        10 => {
            let (nick, tabs) = model.rooms.get_mut(room).expect("in the room");
            let nick = *nick;
            tabs.remove(&t);
            if tabs.is_empty() {
                model.rooms.remove(room);
            }
            send(
                tab,
                format!("<presence type='unavailable' to='{{r:{room}}}/{nick}'/>"),
            )
        }
        11 => {
            let entry = model.rooms.get_mut(room).expect("in the room");
            entry.0 = if entry.0 == "u" { "u2" } else { "u" };
            // With real resources the other tabs in the room follow by rejoining (SPEC §6.6
            // makes the rename every page's), which brings them the history a page does not get.
            if entry.1.iter().any(|j| *j != t) {
                model.replay_step = true;
            }
            send(tab, format!("<presence to='{{r:{room}}}/{}'/>", entry.0))
        }
        12 => send(
            tab,
            format!("<message to='{{r:{room}}}' type='groupchat'><body>t</body></message>"),
        ),
        13 => send(
            Who::B,
            format!("<message to='{{r:{room}}}' type='groupchat'><body>b</body></message>"),
        ),
        14 => send(
            Who::B,
            format!(
                "<message to='{{r:{room}}}' type='groupchat'><subject>s{}</subject></message>",
                rng.below(3)
            ),
        ),
        15 => {
            let nick = model.rooms.remove(room).map_or("u", |(nick, _)| nick);
            send(
                Who::B,
                format!(
                    "<iq type='set' id='o-kick' to='{{r:{room}}}'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='{nick}' role='none'/></query></iq>"
                ),
            )
        }
        16 => {
            let show = *rng.pick(&["<show>away</show>", "", "<show>dnd</show>"]);
            send(contact, format!("<presence>{show}</presence>"))
        }
        17 | 18 => {
            let r = rng.below(TABS);
            if model.reload_changes_presence(r) {
                // Instead: tab t takes on the shared presence (no change for anyone).
                let latest = model.latest.clone();
                model.presence.insert(t, Some(latest.clone()));
                return send(tab, format!("<presence>{latest}</presence>"));
            }
            Step::Reload(r)
        }
        _ => {
            let mut answers: Vec<Answer> = (0..TABS)
                .map(|_| match rng.below(3) {
                    0 => Answer::Error,
                    1 => Answer::Silent,
                    _ => Answer::Result("<query xmlns='jabber:iq:version'><name>t</name></query>"),
                })
                .collect();
            // A request no page answers is held until the daemon's timeout (SPEC §6.2);
            // keep runs quick by letting every page that has no result answer an error.
            if !answers.iter().any(|a| matches!(a, Answer::Result(_))) {
                answers = (0..TABS).map(|_| Answer::Error).collect();
            }
            Step::Ask {
                from: contact,
                payload: "<query xmlns='jabber:iq:version'/>".to_owned(),
                answers,
            }
        }
    }
}

/// Random run `i` of `seed`, following on from the runs before it (`model`).
pub fn script(seed: u64, i: u64, model: &mut Model) -> Script {
    let mut rng = Rng(seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut steps = Vec::new();
    let mut allowed = Vec::new();
    for k in 0..STEPS {
        model.replay_step = false;
        steps.push(step(&mut rng, model));
        if model.replay_step {
            allowed.push((k, Allow::RoomReplayWithoutHistory));
        }
    }
    Script {
        name: format!("random seed={seed} run={i}"),
        tabs: TABS,
        steps,
        allowed,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

/// The seed the suite plays by default: fixed, so that a run is the same everywhere and a
/// failure replays; `BOSHMUX_ORACLE_SEED` explores others.
pub const DEFAULT_SEED: u64 = 0x5EED_2026_1130;

/// Runs per suite run by default (`BOSHMUX_ORACLE_RUNS` overrides).
pub const DEFAULT_RUNS: u64 = 200;

/// Plays the random runs on A (`groups.0`) and B (`groups.1`); stops at the first run whose
/// sides differ and fails with its seed, index, script and differences.
pub async fn check(p: &Prosody, groups: (&str, &str)) {
    let seed = env_u64("BOSHMUX_ORACLE_SEED").unwrap_or(DEFAULT_SEED);
    let runs = env_u64("BOSHMUX_ORACLE_RUNS").unwrap_or(DEFAULT_RUNS);
    eprintln!("oracle: random interleavings, BOSHMUX_ORACLE_SEED={seed}, {runs} runs");
    let started = std::time::Instant::now();
    // Room names only need to be new on this server (the tag is normalised away); the script
    // depends on the seed alone.
    let fresh = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tag = format!("x{}", fresh % 100_000);
    let (tag_a, tag_b) = (format!("{tag}a"), format!("{tag}b"));
    let (mut a, mut b) = tokio::join!(
        World::start(p, Mode::Direct, groups.0, &tag_a, TABS),
        World::start(p, crate::side_b(), groups.1, &tag_b, TABS),
    );
    let mut obs_a = observers(TABS, false);
    let mut obs_b = observers(TABS, crate::side_b() == Mode::Daemon);
    let mut hits = BTreeMap::new();
    let mut setup = Script::new("random setup", TABS);
    for room in ROOMS {
        setup = setup.create_room(Who::B, room, "bee", &[]);
    }
    let mut failure = None;
    let mut model = Model::default();
    for i in 0..=runs {
        let (script, open) = if i == 0 {
            (setup.clone(), true)
        } else {
            (script(seed, i, &mut model), false)
        };
        if std::env::var("BOSHMUX_ORACLE_TRACE").is_ok() {
            let steps: Vec<String> = script.steps.iter().map(crate::describe).collect();
            eprintln!("{}:\n  {}", script.name, steps.join("\n  "));
        }
        let (pa, pb) = tokio::join!(
            play_on(&mut a, &script, open),
            play_on(&mut b, &script, open)
        );
        let report = compare(&script, &pa, &pb, &mut obs_a, &mut obs_b, !open, &mut hits);
        if !report.is_empty() {
            let steps: Vec<String> = script.steps.iter().map(crate::describe).collect();
            failure = Some(format!(
                "oracle: {} differs (replay with BOSHMUX_ORACLE_SEED={seed} BOSHMUX_ORACLE_RUNS={i}); its steps:\n  {}\n\n{}",
                script.name,
                steps.join("\n  "),
                report.join("\n")
            ));
            break;
        }
    }
    tokio::join!(a.close(), b.close());
    eprintln!(
        "oracle: random runs took {:.1}s; allow-list hits: {}",
        started.elapsed().as_secs_f64(),
        crate::view::hits_text(&hits)
    );
    if let Some(f) = failure {
        panic!("{f}");
    }
}
