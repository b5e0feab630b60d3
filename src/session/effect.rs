//! What the multiplexing rules ask the session actor to do, and how pages are named.

use crate::xmpp::Element;

/// Identifies one page (one WebSocket or virtual BOSH session) for the life of the daemon.
pub type PageId = u64;

/// Something the session actor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send upstream.
    Upstream(Element),
    /// Send to one page.
    ToPage(PageId, Element),
    /// Send to every page, except one if given.
    ToPages {
        /// A page left out (the sender of what is being reflected).
        except: Option<PageId>,
        /// The stanza.
        stanza: Element,
    },
}

/// A stanza for every page.
pub(crate) fn to_all(stanza: Element) -> Effect {
    Effect::ToPages {
        except: None,
        stanza,
    }
}
