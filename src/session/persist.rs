//! The session's caches as the store keeps them (SPEC §8): the multiplexing rules' caches of
//! SPEC §6 (presence, roster, rooms, pending subscriptions, the grace buffer) and the stanzas
//! queued upstream but not sent when the session was suspended. JSON, versioned by its shape;
//! the store treats it as opaque bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::mux::MuxSnapshot;
use crate::xmpp::{self, Element, Limits, ns};

/// What [`encode`] writes.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Caches {
    /// The multiplexing rules' caches.
    pub mux: MuxSnapshot,
    /// Stanzas queued upstream and not sent yet (only a suspend leaves any).
    #[serde(default)]
    pub outbound: Vec<String>,
}

/// The bytes of `caches`.
pub fn encode(caches: &Caches) -> Bytes {
    Bytes::from(serde_json::to_vec(caches).expect("plain data serializes"))
}

/// The caches in `bytes`; `Ok(default)` for none written yet, `Err` when damaged.
pub fn decode(bytes: &[u8]) -> Result<Caches, serde_json::Error> {
    if bytes.is_empty() {
        return Ok(Caches::default());
    }
    serde_json::from_slice(bytes)
}

/// Parses stanzas written by [`encode`]; a damaged one is skipped.
pub fn stanzas(list: &[String]) -> Vec<Element> {
    let limits = Limits {
        max_bytes: 16 * 1024 * 1024,
        max_depth: 64,
        max_attrs: 256,
        allow_declaration: false,
    };
    list.iter()
        .filter_map(|s| xmpp::parse(s.as_bytes(), &limits).ok())
        .collect()
}

/// Whether handling `stanza` from upstream may change the caches: anything but a one-to-one
/// message while a page is attached (with no page, messages go to the grace buffer).
pub fn inbound_changes_caches(stanza: &Element, pages_attached: bool) -> bool {
    let plain_message = stanza.is("message", ns::CLIENT)
        && matches!(
            stanza.attr("type"),
            None | Some("chat" | "normal" | "headline" | "error")
        );
    !(plain_message && pages_attached)
}

/// Whether a stanza from a page may change the caches: anything but a message (presence
/// changes the shared presence and rooms; iq may be a roster change or a join's answer).
pub fn outbound_changes_caches(stanza: &Element) -> bool {
    !stanza.is("message", ns::CLIENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_round_trip_and_empty_is_none() {
        let c = Caches {
            mux: MuxSnapshot::default(),
            outbound: vec![
                "<message xmlns='jabber:client' to='b@x'><body>hi</body></message>".into(),
            ],
        };
        let back = decode(&encode(&c)).unwrap();
        assert_eq!(stanzas(&back.outbound).len(), 1);
        assert!(decode(b"").unwrap().outbound.is_empty());
        assert!(decode(b"{not json").is_err());
    }
}
