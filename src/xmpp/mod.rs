//! XMPP building blocks shared by the upstream (BOSH) side and the page side: the element tree,
//! the strict parser, JIDs, namespaces and client SASL.

pub mod element;
pub mod jid;
pub mod ns;
pub mod parse;
pub mod sasl;

pub use element::{Attr, Element, Node};
pub use jid::Jid;
pub use parse::{Limits, ParseError, parse};
