//! Scripts: what the acting user's tabs and its contacts do, written once and played on both
//! sides. Stanzas are templates (see `World::expand` for the placeholders).

use crate::view::Allow;

/// Who acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The acting user's tab `i` (a resource in A, a page in B).
    Tab(usize),
    /// Contact B or C (real accounts, logged in directly on both sides).
    B,
    C,
}

/// How a tab answers a request from a contact.
#[derive(Clone, Debug)]
pub enum Answer {
    /// A result with this payload template (empty: no payload).
    Result(&'static str),
    /// `service-unavailable`, as a client answers what it does not support.
    Error,
    /// No answer at all.
    Silent,
}

/// One action.
#[derive(Clone, Debug)]
pub enum Step {
    /// `who` sends this stanza template.
    Send(Who, String),
    /// Tab `i`'s page closes and a new page binds within grace and sends what a web client
    /// sends on start (carbons, roster, its presence, its rooms). In A the resource stays: a
    /// real resource does not reload, and the daemon promises the same.
    Reload(usize),
    /// A contact sends an iq get with this payload to the user's full JID; tab i answers
    /// `answers[i]`, in tab order.
    Ask {
        from: Who,
        payload: String,
        answers: Vec<Answer>,
    },
}

/// A named script for K tabs.
#[derive(Clone, Debug)]
pub struct Script {
    pub name: String,
    pub tabs: usize,
    pub steps: Vec<Step>,
    /// Steps (indexes into `steps`) whose differences a SPEC rule explains.
    pub allowed: Vec<(usize, Allow)>,
}

impl Script {
    pub fn new(name: &str, tabs: usize) -> Script {
        Script {
            name: name.to_owned(),
            tabs,
            steps: Vec::new(),
            allowed: Vec::new(),
        }
    }

    /// The last step may differ between the sides: `rule` explains it. Its differences are
    /// counted as allow-list hits; the steps after it are compared as usual.
    pub fn allow(mut self, rule: Allow) -> Script {
        let last = self.steps.len().checked_sub(1).expect("a step to allow");
        self.allowed.push((last, rule));
        self
    }

    /// Tab `i` sends a stanza.
    pub fn tab(mut self, i: usize, stanza: &str) -> Script {
        self.steps.push(Step::Send(Who::Tab(i), stanza.to_owned()));
        self
    }

    pub fn reload(mut self, i: usize) -> Script {
        self.steps.push(Step::Reload(i));
        self
    }

    pub fn ask(mut self, from: Who, payload: &str, answers: Vec<Answer>) -> Script {
        self.steps.push(Step::Ask {
            from,
            payload: payload.to_owned(),
            answers,
        });
        self
    }

    /// `who` creates room `room` as `nick` and makes it an instant room (unlocked, default
    /// configuration), optionally with extra configuration fields (`var=value`).
    pub fn create_room(
        mut self,
        who: Who,
        room: &str,
        nick: &str,
        config: &[(&str, &str)],
    ) -> Script {
        self.steps.push(Step::Send(
            who,
            format!("<presence to='{{r:{room}}}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        ));
        let fields: String = config
            .iter()
            .map(|(var, value)| format!("<field var='{var}'><value>{value}</value></field>"))
            .collect();
        self.steps.push(Step::Send(
            who,
            format!(
                "<iq type='set' id='o-config-{room}' to='{{r:{room}}}'>\
                 <query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>{fields}\
                 </x></query></iq>"
            ),
        ));
        self
    }

    /// `who` joins `room` as `nick`.
    pub fn join(mut self, who: Who, room: &str, nick: &str) -> Script {
        self.steps.push(Step::Send(
            who,
            format!("<presence to='{{r:{room}}}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        ));
        self
    }

    /// `who` leaves `room` (nick `nick`).
    pub fn leave(mut self, who: Who, room: &str, nick: &str) -> Script {
        self.steps.push(Step::Send(
            who,
            format!("<presence type='unavailable' to='{{r:{room}}}/{nick}'/>"),
        ));
        self
    }

    pub fn step(mut self, who: Who, stanza: &str) -> Script {
        self.steps.push(Step::Send(who, stanza.to_owned()));
        self
    }
}
