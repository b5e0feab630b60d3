//! The hand-written scripts, by theme. Each leaves the accounts' rosters as it found them, so
//! the scripts of one theme can share a pair of account groups.

use crate::script::{Answer, Script, Who};
use crate::view::Allow;

const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";

fn groupchat(room: &str, body: &str) -> String {
    format!("<message to='{{r:{room}}}' type='groupchat'><body>{body}</body></message>")
}

fn admin(room: &str, id: &str, item: &str) -> String {
    format!(
        "<iq type='set' id='o-{id}' to='{{r:{room}}}'><query xmlns='{MUC_ADMIN}'>{item}</query></iq>"
    )
}

fn chat(to: &str, body: &str, extra: &str) -> String {
    format!("<message to='{to}' type='chat'><body>{body}</body>{extra}</message>")
}

const PRIVATE: &str = "<private xmlns='urn:xmpp:carbons:2'/>";
const NO_COPY: &str = "<no-copy xmlns='urn:xmpp:hints'/>";

/// Contact `who` (B or C, `jid` its placeholder) drops the user and asks again: the user has a
/// pending inbound request from it.
fn re_request(s: Script, who: Who) -> Script {
    s.step(
        who,
        "<iq type='set' id='o-drop'><query xmlns='jabber:iq:roster'><item jid='{U}' subscription='remove'/></query></iq>",
    )
    .step(who, "<presence to='{U}' type='subscribe'/>")
    .tab(0, "<iq type='get' id='o-roster-re'><query xmlns='jabber:iq:roster'/></iq>")
}

/// The user (tab `tab`) approves `jid` and subscribes back; the contact approves: mutual again.
fn restore(s: Script, tab: usize, who: Who, jid: &str) -> Script {
    s.tab(tab, &format!("<presence to='{jid}' type='subscribed'/>"))
        .tab(tab, &format!("<presence to='{jid}' type='subscribe'/>"))
        .step(who, "<presence to='{U}' type='subscribed'/>")
}

pub fn rooms() -> Vec<Script> {
    vec![
        Script::new("room_join_leave_two_tabs", 2)
            .create_room(Who::B, "jl", "bee", &[])
            .join(Who::Tab(0), "jl", "u")
            .join(Who::Tab(1), "jl", "u")
            .step(Who::B, &groupchat("jl", "hello"))
            .leave(Who::Tab(0), "jl", "u")
            .step(Who::B, &groupchat("jl", "still there?"))
            .leave(Who::Tab(1), "jl", "u"),
        Script::new("room_nick_change_then_other_tab_leaves", 2)
            .create_room(Who::B, "nc", "bee", &[])
            .join(Who::Tab(0), "nc", "u")
            .join(Who::Tab(1), "nc", "u")
            .tab(0, "<presence to='{r:nc}/u2'/>")
            .leave(Who::Tab(1), "nc", "u2")
            .step(Who::B, &groupchat("nc", "after the rename"))
            .leave(Who::Tab(0), "nc", "u2"),
        Script::new("room_nick_change_single_tab", 2)
            .create_room(Who::B, "ns", "bee", &[])
            .join(Who::Tab(0), "ns", "u")
            .tab(0, "<presence to='{r:ns}/u2'/>")
            .step(Who::B, &groupchat("ns", "hi u2"))
            .tab(0, &groupchat("ns", "I am u2"))
            .leave(Who::Tab(0), "ns", "u2"),
        Script::new("room_password_retry", 2)
            .create_room(
                Who::B,
                "pw",
                "bee",
                &[
                    ("muc#roomconfig_passwordprotectedroom", "1"),
                    ("muc#roomconfig_roomsecret", "s3cret"),
                ],
            )
            .join(Who::Tab(0), "pw", "u")
            .tab(
                0,
                "<presence to='{r:pw}/u'><x xmlns='http://jabber.org/protocol/muc'><password>s3cret</password></x></presence>",
            )
            .step(Who::B, &groupchat("pw", "welcome"))
            .leave(Who::Tab(0), "pw", "u"),
        Script::new("room_wrong_password_twice", 2)
            .create_room(
                Who::B,
                "pw2",
                "bee",
                &[
                    ("muc#roomconfig_passwordprotectedroom", "1"),
                    ("muc#roomconfig_roomsecret", "s3cret"),
                ],
            )
            .tab(
                0,
                "<presence to='{r:pw2}/u'><x xmlns='http://jabber.org/protocol/muc'><password>wrong</password></x></presence>",
            )
            .tab(
                1,
                "<presence to='{r:pw2}/u'><x xmlns='http://jabber.org/protocol/muc'><password>wrong</password></x></presence>",
            )
            .tab(
                1,
                "<presence to='{r:pw2}/u'><x xmlns='http://jabber.org/protocol/muc'><password>s3cret</password></x></presence>",
            )
            .leave(Who::Tab(1), "pw2", "u"),
        Script::new("room_reload_only_page", 2)
            .create_room(Who::B, "rl", "bee", &[])
            .join(Who::Tab(0), "rl", "u")
            .reload(0)
            .step(Who::B, &groupchat("rl", "are you there?"))
            .leave(Who::Tab(0), "rl", "u"),
        Script::new("room_reload_one_of_two_pages", 3)
            .create_room(Who::B, "rl2", "bee", &[])
            .join(Who::Tab(0), "rl2", "u")
            .join(Who::Tab(2), "rl2", "u")
            .reload(2)
            .step(Who::B, &groupchat("rl2", "ping"))
            .leave(Who::Tab(0), "rl2", "u")
            .leave(Who::Tab(2), "rl2", "u"),
        Script::new("room_kicked", 2)
            .create_room(Who::B, "kk", "bee", &[])
            .join(Who::Tab(0), "kk", "u")
            .join(Who::Tab(1), "kk", "u")
            .step(Who::B, &admin("kk", "kick", "<item nick='u' role='none'><reason>out</reason></item>"))
            .step(Who::B, &groupchat("kk", "gone?"))
            .join(Who::Tab(0), "kk", "u")
            .leave(Who::Tab(0), "kk", "u"),
        Script::new("room_banned", 2)
            .create_room(Who::B, "bn", "bee", &[])
            .join(Who::Tab(0), "bn", "u")
            .step(Who::B, &admin("bn", "ban", "<item jid='{U}' affiliation='outcast'/>"))
            .join(Who::Tab(1), "bn", "u")
            .step(Who::B, &admin("bn", "unban", "<item jid='{U}' affiliation='none'/>"))
            .join(Who::Tab(1), "bn", "u")
            .leave(Who::Tab(1), "bn", "u"),
        Script::new("room_destroyed", 2)
            .create_room(Who::B, "ds", "bee", &[])
            .join(Who::Tab(0), "ds", "u")
            .join(Who::Tab(1), "ds", "u")
            .step(
                Who::B,
                &format!(
                    "<iq type='set' id='o-destroy' to='{{r:ds}}'><query xmlns='{MUC_OWNER}'><destroy><reason>done</reason></destroy></query></iq>"
                ),
            )
            .join(Who::Tab(1), "ds", "u")
            .leave(Who::Tab(1), "ds", "u"),
        Script::new("room_members_only", 2)
            .create_room(Who::B, "mo", "bee", &[("muc#roomconfig_membersonly", "1")])
            .join(Who::Tab(0), "mo", "u")
            .step(Who::B, &admin("mo", "member", "<item jid='{U}' affiliation='member'/>"))
            .join(Who::Tab(0), "mo", "u")
            .join(Who::Tab(1), "mo", "u")
            .step(Who::B, &admin("mo", "unmember", "<item jid='{U}' affiliation='none'/>"))
            .join(Who::Tab(1), "mo", "u"),
        Script::new("room_subject", 2)
            .create_room(Who::B, "sj", "bee", &[])
            .join(Who::Tab(0), "sj", "u")
            .step(Who::B, "<message to='{r:sj}' type='groupchat'><subject>Plans</subject></message>")
            .join(Who::Tab(1), "sj", "u")
            .tab(0, "<message to='{r:sj}' type='groupchat'><subject>Mine</subject></message>")
            .reload(1)
            .leave(Who::Tab(0), "sj", "u")
            .leave(Who::Tab(1), "sj", "u"),
        Script::new("room_created_by_user", 2)
            .create_room(Who::Tab(0), "mine", "u", &[])
            .join(Who::B, "mine", "bee")
            .tab(0, &groupchat("mine", "my room"))
            .join(Who::Tab(1), "mine", "u")
            .allow(Allow::RoomReplayWithoutHistory)
            .leave(Who::Tab(0), "mine", "u")
            .step(Who::B, &groupchat("mine", "still here"))
            .leave(Who::Tab(1), "mine", "u"),
        Script::new("room_private_messages", 2)
            .create_room(Who::B, "pm", "bee", &[])
            .join(Who::Tab(0), "pm", "u")
            .step(
                Who::B,
                "<message to='{r:pm}/u' type='chat'><body>psst</body><x xmlns='http://jabber.org/protocol/muc#user'/></message>",
            )
            .tab(
                0,
                "<message to='{r:pm}/bee' type='chat'><body>psst back</body><x xmlns='http://jabber.org/protocol/muc#user'/></message>",
            )
            .leave(Who::Tab(0), "pm", "u"),
        Script::new("room_nick_conflict", 2)
            .create_room(Who::B, "cf", "bee", &[])
            .join(Who::Tab(0), "cf", "bee")
            .join(Who::Tab(0), "cf", "u")
            .join(Who::Tab(1), "cf", "bee")
            .leave(Who::Tab(0), "cf", "u"),
        Script::new("room_leave_then_other_tab_joins", 2)
            .create_room(Who::B, "lj", "bee", &[])
            .join(Who::Tab(0), "lj", "u")
            .leave(Who::Tab(0), "lj", "u")
            .join(Who::Tab(1), "lj", "u")
            .tab(1, &groupchat("lj", "back"))
            .leave(Who::Tab(1), "lj", "u"),
        Script::new("room_history_for_a_second_page", 2)
            .create_room(Who::B, "hs", "bee", &[])
            .step(Who::B, &groupchat("hs", "said before you came"))
            .join(Who::Tab(0), "hs", "u")
            .tab(0, &groupchat("hs", "said by the first tab"))
            .join(Who::Tab(1), "hs", "u")
            .allow(Allow::RoomReplayWithoutHistory)
            .leave(Who::Tab(0), "hs", "u")
            .leave(Who::Tab(1), "hs", "u"),
        Script::new("room_contact_presence_and_groupchat", 2)
            .create_room(Who::B, "gp", "bee", &[])
            .join(Who::Tab(0), "gp", "u")
            .join(Who::C, "gp", "sea")
            .step(Who::C, "<presence to='{r:gp}/sea'><show>away</show></presence>")
            .tab(0, &groupchat("gp", "hi all"))
            .leave(Who::C, "gp", "sea")
            .leave(Who::Tab(0), "gp", "u"),
    ]
}

pub fn presence() -> Vec<Script> {
    vec![
        Script::new("presence_show_changes", 2)
            .tab(0, "<presence><show>away</show><status>lunch</status></presence>")
            .tab(1, "<presence><show>dnd</show></presence>")
            .tab(0, "<presence/>"),
        Script::new("presence_two_tabs_unavailable", 2)
            .tab(0, "<presence type='unavailable'/>")
            .tab(1, "<presence type='unavailable'/>")
            .step(Who::B, &chat("{U}", "anyone?", ""))
            .tab(1, "<presence/>"),
        Script::new("presence_three_tabs_unavailable", 3)
            .tab(2, "<presence type='unavailable'/>")
            .tab(0, "<presence type='unavailable'/>")
            .tab(1, "<presence type='unavailable'/>")
            .tab(0, "<presence><show>chat</show></presence>"),
        Script::new("presence_one_tab_unavailable", 2)
            .tab(0, "<presence type='unavailable'/>")
            .step(Who::C, &chat("{U}", "hello", ""))
            .tab(0, "<presence/>"),
        Script::new("presence_directed", 2)
            .tab(1, "<presence type='unavailable'/>")
            .tab(0, "<presence to='{C}'><status>just for you</status></presence>")
            .tab(0, "<presence to='{C}' type='unavailable'/>")
            .tab(1, "<presence/>")
            .step(Who::C, &chat("{U}", "can you see me?", "")),
        Script::new("presence_contacts_change", 2)
            .step(Who::B, "<presence><show>away</show></presence>")
            .step(Who::C, "<presence type='unavailable'/>")
            .step(Who::C, "<presence/>")
            .step(Who::B, "<presence/>"),
        Script::new("presence_replayed_to_reloaded_page", 2)
            .step(Who::B, "<presence><show>xa</show><status>away</status></presence>")
            .reload(1)
            .step(Who::B, "<presence/>")
            .reload(0),
        Script::new("presence_priority", 2)
            .tab(0, "<presence><priority>-1</priority></presence>")
            .step(Who::B, &chat("{U}", "who gets this?", ""))
            .allow(Allow::LatestPresenceWins)
            .tab(0, "<presence><priority>5</priority></presence>")
            .step(Who::B, &chat("{U}", "and this?", ""))
            .tab(0, "<presence/>"),
        Script::new("presence_reload_of_unavailable_tab", 2)
            .tab(0, "<presence type='unavailable'/>")
            .reload(0)
            .step(Who::B, &chat("{U}", "after reload", ""))
            .tab(0, "<presence/>"),
        Script::new("presence_reload_after_change", 2)
            .tab(0, "<presence><show>away</show></presence>")
            .reload(0)
            .tab(1, "<presence/>")
            .reload(1),
        restore(
            re_request(Script::new("subscribe_pending_replayed_after_reload", 2), Who::C)
                .reload(0)
                .reload(1),
            0,
            Who::C,
            "{C}",
        ),
        restore(
            re_request(Script::new("subscribe_answered_by_other_tab", 2), Who::C),
            1,
            Who::C,
            "{C}",
        ),
        restore(
            re_request(Script::new("subscribe_denied_then_asked_again", 2), Who::B)
                .tab(0, "<presence to='{B}' type='unsubscribed'/>")
                .step(Who::B, "<presence to='{U}' type='subscribe'/>")
                .reload(1),
            1,
            Who::B,
            "{B}",
        ),
        Script::new("unsubscribe_from_user_side", 2)
            .tab(
                0,
                "<iq type='set' id='o-rm'><query xmlns='jabber:iq:roster'><item jid='{B}' subscription='remove'/></query></iq>",
            )
            .tab(1, "<presence to='{B}' type='subscribe'/>")
            .step(Who::B, "<presence to='{U}' type='subscribed'/>")
            .step(Who::B, "<presence to='{U}' type='subscribe'/>")
            .reload(0)
            .tab(0, "<presence to='{B}' type='subscribed'/>"),
    ]
}

pub fn messages() -> Vec<Script> {
    vec![
        Script::new("carbon_chat", 2)
            .tab(0, &chat("{B}", "hi B", ""))
            .step(Who::B, &chat("{U}", "hi U", ""))
            .step(Who::B, &chat("{Uf}", "hi full U", ""))
            .tab(1, &chat("{Bf}", "to your resource", "")),
        Script::new("carbon_private", 2)
            .tab(0, &chat("{B}", "secret", PRIVATE))
            .step(Who::B, &chat("{Uf}", "secret back", PRIVATE)),
        Script::new("carbon_no_copy", 2)
            .tab(0, &chat("{B}", "once", NO_COPY))
            .step(Who::B, &chat("{U}", "once back", NO_COPY)),
        Script::new("carbon_headline", 2)
            .tab(0, "<message to='{B}' type='headline'><body>news</body></message>")
            .step(Who::B, "<message to='{U}' type='headline'><body>news back</body></message>")
            .step(Who::B, "<message to='{Uf}' type='headline'><body>news to one</body></message>"),
        Script::new("carbon_normal_with_and_without_body", 2)
            .tab(0, "<message to='{C}'><body>a normal message</body></message>")
            .tab(0, "<message to='{C}'><x xmlns='jabber:x:oob'><url>https://a.example/</url></x></message>")
            .step(Who::C, "<message to='{U}'><body>normal back</body></message>")
            .step(Who::C, "<message to='{Uf}'><x xmlns='jabber:x:oob'><url>https://c.example/</url></x></message>"),
        Script::new("carbon_chat_state_without_body", 2)
            .tab(0, "<message to='{B}' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
            .step(Who::B, "<message to='{Uf}' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>"),
        Script::new("carbon_three_tabs", 3)
            .tab(1, &chat("{C}", "from the middle tab", ""))
            .tab(2, "<message to='{C}'><body>normal from the last tab</body></message>")
            .step(Who::C, &chat("{U}", "to all of you", "")),
        Script::new("message_error_bounce", 2)
            .tab(0, &chat("nobody@{S}", "anyone?", ""))
            .tab(1, "<message to='{B}' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"),
        Script::new("message_during_reload", 2)
            .step(Who::B, &chat("{U}", "before", ""))
            .reload(0)
            .step(Who::B, &chat("{Uf}", "after", ""))
            .tab(0, &chat("{B}", "answer from the new page", "")),
        Script::new("message_groupchat_to_room_not_joined", 2)
            .create_room(Who::B, "nj", "bee", &[])
            .tab(0, &groupchat("nj", "am I in?")),
    ]
}

const VERSION: &str =
    "<query xmlns='jabber:iq:version'><name>tab</name><version>1</version></query>";

pub fn iqs() -> Vec<Script> {
    vec![
        Script::new("iq_disco_server", 2)
            .tab(0, "<iq type='get' id='o-d1' to='{S}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
            .tab(1, "<iq type='get' id='o-d2' to='{S}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
            .tab(1, "<iq type='get' id='o-d3' to='{M}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
        Script::new("iq_version_and_errors", 2)
            .tab(0, "<iq type='get' id='o-v1' to='{S}'><query xmlns='jabber:iq:version'/></iq>")
            .tab(1, "<iq type='get' id='o-v1' to='{S}'><query xmlns='jabber:iq:version'/></iq>")
            .tab(0, "<iq type='get' id='o-v2' to='nobody@{S}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
            .tab(1, "<iq type='get' id='o-v3' to='{S}'><query xmlns='urn:example:unknown'/></iq>"),
        Script::new("iq_disco_of_contact_bare", 2)
            .tab(0, "<iq type='get' id='o-c1' to='{B}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
            .tab(1, "<iq type='get' id='o-c2' to='{U}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
        Script::new("ask_error_then_result", 2).ask(
            Who::B,
            "<query xmlns='jabber:iq:version'/>",
            vec![Answer::Error, Answer::Result(VERSION)],
        ),
        Script::new("ask_result_first", 2).ask(
            Who::B,
            "<query xmlns='jabber:iq:version'/>",
            vec![Answer::Result(VERSION), Answer::Error],
        ),
        Script::new("ask_all_error", 2).ask(
            Who::C,
            "<query xmlns='urn:example:unknown'/>",
            vec![Answer::Error, Answer::Error],
        ),
        Script::new("ask_three_tabs", 3).ask(
            Who::C,
            "<query xmlns='jabber:iq:version'/>",
            vec![Answer::Error, Answer::Silent, Answer::Result(VERSION)],
        ),
        Script::new("roster_get_from_two_tabs", 2)
            .tab(0, "<iq type='get' id='o-r1'><query xmlns='jabber:iq:roster'/></iq>")
            .tab(1, "<iq type='get' id='o-r2'><query xmlns='jabber:iq:roster'/></iq>"),
        Script::new("roster_set_name_and_group", 2)
            .tab(0, "<iq type='set' id='o-s1'><query xmlns='jabber:iq:roster'><item jid='{B}' name='Bee'><group>Friends</group></item></query></iq>")
            .tab(1, "<iq type='get' id='o-r3'><query xmlns='jabber:iq:roster'/></iq>")
            .reload(1)
            .tab(1, "<iq type='get' id='o-r4'><query xmlns='jabber:iq:roster'/></iq>")
            .tab(0, "<iq type='set' id='o-s2'><query xmlns='jabber:iq:roster'><item jid='{B}'/></query></iq>"),
        Script::new("roster_add_stranger_and_remove", 2)
            .tab(0, "<iq type='set' id='o-s3'><query xmlns='jabber:iq:roster'><item jid='stranger@{S}' name='S'/></query></iq>")
            .tab(1, "<iq type='get' id='o-r5'><query xmlns='jabber:iq:roster'/></iq>")
            .tab(1, "<iq type='set' id='o-s4'><query xmlns='jabber:iq:roster'><item jid='stranger@{S}' subscription='remove'/></query></iq>"),
    ]
}
