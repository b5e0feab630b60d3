//! XEP-0280 carbons between the pages of one session (SPEC §6.4): which outbound messages a
//! server would copy to the user's other resources (XEP-0280 §6), and the `<sent/>` wrapper.

use crate::xmpp::{Element, Jid, ns};

/// XEP-0334 message processing hints.
const HINTS: &str = "urn:xmpp:hints";
/// XEP-0085 chat states.
const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
/// XEP-0184 delivery receipts.
const RECEIPTS: &str = "urn:xmpp:receipts";
/// XEP-0333 chat markers.
const MARKERS: &str = "urn:xmpp:chat-markers:0";
/// XEP-0249 direct MUC invitations.
const CONFERENCE: &str = "jabber:x:conference";

/// Whether a message a page sends would be carbon-copied to the user's other resources by a
/// server applying XEP-0280 §6: never when marked `<private/>` (XEP-0280) or `<no-copy/>`
/// (XEP-0334), never for `groupchat`, `headline` or `error`, never for a private message to a
/// room occupant marked with the MUC `<x xmlns='…muc#user'/>` (XEP-0280 §6, as Prosody and real
/// resources behave); always for other `chat`; for `normal` when it has a body, a MUC invitation
/// (direct or mediated) or an IM payload (chat state, receipt, marker).
pub fn eligible(message: &Element) -> bool {
    if message.child("private", ns::CARBONS).is_some() || message.child("no-copy", HINTS).is_some()
    {
        return false;
    }
    let muc_user = message.child("x", ns::MUC_USER);
    if muc_user.is_some_and(|x| x.child("invite", ns::MUC_USER).is_none()) {
        return false; // a MUC private message: the room, not our other resources, gets it
    }
    match message.attr("type").unwrap_or("normal") {
        "chat" => true,
        "normal" => {
            message.child("body", ns::CLIENT).is_some()
                || message.child("x", CONFERENCE).is_some()
                || message
                    .child("x", ns::MUC_USER)
                    .is_some_and(|x| x.child("invite", ns::MUC_USER).is_some())
                || message
                    .elements()
                    .any(|e| [CHATSTATES, RECEIPTS, MARKERS].contains(&e.ns.as_str()))
        }
        _ => false, // groupchat, headline, error, and types RFC 6121 does not define
    }
}

/// The XEP-0280 `<sent/>` carbon of `message` (sent by the resource `me`) for the user's other
/// resources: from the bare JID, to the full JID.
pub fn sent(me: &Jid, message: &Element) -> Element {
    Element::new("message", ns::CLIENT)
        .with_attr("from", me.to_bare().to_string())
        .with_attr("to", me.to_string())
        .with_child(
            Element::new("sent", ns::CARBONS)
                .with_child(Element::new("forwarded", ns::FORWARD).with_child(message.clone())),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ty: Option<&str>) -> Element {
        let mut m = Element::new("message", ns::CLIENT).with_attr("to", "bob@example.com");
        if let Some(ty) = ty {
            m.set_attr("type", ty);
        }
        m
    }

    fn body(m: Element) -> Element {
        m.with_child(Element::new("body", ns::CLIENT).with_text("hi"))
    }

    #[test]
    fn chat_and_normal_with_body_are_copied() {
        assert!(eligible(&body(message(Some("chat")))));
        assert!(eligible(&message(Some("chat"))), "a chat state alone");
        assert!(eligible(&body(message(Some("normal")))));
        assert!(eligible(&body(message(None))), "no type is normal");
    }

    #[test]
    fn normal_without_body_is_copied_only_with_an_im_payload() {
        assert!(!eligible(&message(None)));
        assert!(!eligible(
            &message(None).with_child(Element::new("x", "jabber:x:oob"))
        ));
        assert!(eligible(
            &message(None).with_child(Element::new("received", RECEIPTS))
        ));
        assert!(eligible(
            &message(None).with_child(Element::new("composing", CHATSTATES))
        ));
        assert!(eligible(
            &message(None).with_child(Element::new("displayed", MARKERS))
        ));
        assert!(eligible(
            &message(None).with_child(Element::new("x", CONFERENCE))
        ));
        assert!(eligible(&message(None).with_child(
            Element::new("x", ns::MUC_USER).with_child(Element::new("invite", ns::MUC_USER))
        )));
    }

    #[test]
    fn groupchat_headline_error_and_marked_messages_are_not_copied() {
        for ty in ["groupchat", "headline", "error", "bogus"] {
            assert!(!eligible(&body(message(Some(ty)))), "{ty}");
        }
        let private = body(message(Some("chat"))).with_child(Element::new("private", ns::CARBONS));
        assert!(!eligible(&private));
        let no_copy = body(message(Some("chat"))).with_child(Element::new("no-copy", HINTS));
        assert!(!eligible(&no_copy));
        // Other hints do not stop a copy.
        let no_store = body(message(Some("chat"))).with_child(Element::new("no-store", HINTS));
        assert!(eligible(&no_store));
    }

    #[test]
    fn a_private_message_to_a_room_occupant_is_not_copied() {
        for ty in [Some("chat"), None] {
            let pm = body(message(ty))
                .with_attr("to", "room@conference.example.com/bob")
                .with_child(Element::new("x", ns::MUC_USER));
            assert!(!eligible(&pm), "{ty:?}");
        }
        // Without the MUC marker a server cannot tell it from a chat to a user: copied.
        let unmarked =
            body(message(Some("chat"))).with_attr("to", "room@conference.example.com/bob");
        assert!(eligible(&unmarked));
    }

    #[test]
    fn the_carbon_wraps_the_message_from_the_bare_jid() {
        let me = Jid::parse("alice@example.com/bm").unwrap();
        let c = sent(&me, &body(message(Some("chat"))));
        assert_eq!(
            (c.attr("from"), c.attr("to")),
            (Some("alice@example.com"), Some("alice@example.com/bm"))
        );
        let inner = c
            .child("sent", ns::CARBONS)
            .and_then(|s| s.child("forwarded", ns::FORWARD))
            .and_then(|f| f.child("message", ns::CLIENT));
        assert!(inner.is_some());
    }
}
