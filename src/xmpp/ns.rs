//! XML namespace names used on the wire, in one place so a typo is a compile error.

/// Client stanzas (RFC 6120).
pub const CLIENT: &str = "jabber:client";
/// `stream:` elements such as `<stream:features/>` and `<stream:error/>`.
pub const STREAM: &str = "http://etherx.jabber.org/streams";
/// Stream error conditions.
pub const STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// SASL negotiation.
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// Resource binding.
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// Legacy session establishment (RFC 3921).
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// Stanza error conditions.
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// XEP-0198 stream management (both versions).
pub const SM2: &str = "urn:xmpp:sm:2";
/// XEP-0198 stream management version 3.
pub const SM3: &str = "urn:xmpp:sm:3";
/// The BOSH `<body/>` wrapper (XEP-0124).
pub const HTTPBIND: &str = "http://jabber.org/protocol/httpbind";
/// XMPP-over-BOSH attributes such as `xmpp:version` (XEP-0206).
pub const XBOSH: &str = "urn:xmpp:xbosh";
/// RFC 7395 framing (`<open/>`, `<close/>`).
pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
/// The `xml:` prefix, bound by definition.
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
/// XEP-0199 ping.
pub const PING: &str = "urn:xmpp:ping";
/// Roster (RFC 6121).
pub const ROSTER: &str = "jabber:iq:roster";
/// XEP-0045 MUC join element.
pub const MUC: &str = "http://jabber.org/protocol/muc";
/// XEP-0045 MUC user element (occupant presence, status codes).
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// XEP-0280 carbons.
pub const CARBONS: &str = "urn:xmpp:carbons:2";
/// XEP-0297 forwarding.
pub const FORWARD: &str = "urn:xmpp:forward:0";
/// boshmux's own opt-in status notices (SPEC §6.8).
pub const BOSHMUX_STATUS: &str = "urn:boshmux:status:0";
