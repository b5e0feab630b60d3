//! What the session store keeps about an upstream session besides its requests (SPEC §8): the
//! opaque `meta` of a session record, written when the session is established and read back to
//! resume it in another process.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::body::SessionParams;
use super::error::BoshError;

/// An upstream session's description, stored as JSON in the record's `meta`. `Debug` leaves out
/// the sid (a credential for the session).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// The bound full JID.
    pub jid: String,
    /// The BOSH session parameters, sid included (assumed ones for an attached session).
    pub params: SessionParams,
    /// Whether the session was attached (established elsewhere; no password was ever held).
    pub attached: bool,
    /// When the session was established, seconds since the Unix epoch.
    pub created: u64,
}

impl std::fmt::Debug for SessionMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionMeta")
            .field("jid", &self.jid)
            .field("params", &self.params)
            .field("attached", &self.attached)
            .field("created", &self.created)
            .finish()
    }
}

impl SessionMeta {
    /// The JSON bytes kept as a record's `meta`.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("plain data serializes"))
    }

    /// Reads `meta` bytes written by [`SessionMeta::encode`]; [`BoshError::BadRecord`] when they
    /// are not (damaged, or written by an incompatible version).
    pub fn decode(bytes: &[u8]) -> Result<SessionMeta, BoshError> {
        serde_json::from_slice(bytes).map_err(|e| BoshError::BadRecord(format!("meta: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bosh::Body;

    #[test]
    fn meta_reads_back_what_it_wrote_and_refuses_garbage() {
        let created =
            "<body xmlns='http://jabber.org/protocol/httpbind' sid='s1' wait='60' requests='2'/>";
        let meta = SessionMeta {
            jid: "a@b/c".into(),
            params: SessionParams::from_body(&Body::parse(created.as_bytes()).unwrap()).unwrap(),
            attached: true,
            created: 1_700_000_000,
        };
        assert_eq!(SessionMeta::decode(&meta.encode()).unwrap(), meta);
        assert!(matches!(
            SessionMeta::decode(b"{\"jid\":1}"),
            Err(BoshError::BadRecord(_))
        ));
    }
}
