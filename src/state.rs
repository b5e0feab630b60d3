//! The state file of SPEC §8: what a graceful stop leaves for the next start so that no user has
//! to log in again — each session's sid, next rid, unanswered request bodies, full JID, token
//! hashes and caches. Never a password. Written atomically (temporary file, fsync, rename).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bosh::SessionParams;
use crate::session::mux::MuxSnapshot;
use crate::store::SessionRecord;
use crate::xmpp::{self, Element, Limits};

/// Format version; a file of another version is ignored with a warning.
const VERSION: u32 = 1;

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The contents are not a state file of this version.
    #[error("state file {path} is unreadable: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Serialize, Deserialize)]
pub struct StateFile {
    /// [`VERSION`].
    pub version: u32,
    /// When it was written (seconds since the Unix epoch).
    pub saved_at: u64,
    /// The sessions.
    pub sessions: Vec<SavedSession>,
}

/// One user's session. `Debug` shows neither the sid nor the unanswered requests (which carry it).
#[derive(Clone, Serialize, Deserialize)]
pub struct SavedSession {
    /// The full JID.
    pub jid: String,
    /// Whether the session was attached (it never had a password).
    pub attached: bool,
    /// BOSH parameters, sid included.
    pub params: SessionParams,
    /// The next rid.
    pub next_rid: u64,
    /// Unanswered requests: rid and the exact body (base64).
    pub unanswered: Vec<(u64, String)>,
    /// Stanzas received but not handed on yet.
    pub inbound: Vec<String>,
    /// Stanzas queued upstream but not sent yet.
    pub outbound: Vec<String>,
    /// The multiplexing rules' caches.
    pub mux: MuxSnapshot,
    /// Browser tokens: SHA-256 (hex) and seconds of idle life left.
    pub tokens: Vec<(String, u64)>,
    /// When the session was first established (seconds since the Unix epoch).
    #[serde(default)]
    pub created: u64,
}

impl std::fmt::Debug for SavedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedSession")
            .field("jid", &self.jid)
            .field("attached", &self.attached)
            .field("params", &self.params)
            .field("next_rid", &self.next_rid)
            .field("unanswered", &self.unanswered.len())
            .finish_non_exhaustive()
    }
}

/// What resuming a saved session needs on the BOSH side.
pub struct Resumable {
    /// Unanswered requests, ascending: rid and exact bytes.
    pub unanswered: Vec<(u64, Bytes)>,
    /// Stanzas received but not handed on (only in files of earlier versions).
    pub inbound: Vec<Element>,
    /// Stanzas queued upstream but not sent.
    pub outbound: Vec<Element>,
}

impl SavedSession {
    /// Records a suspended session: `record` is its store record after the suspend (what the
    /// store holds of its requests), `outbound` what the suspend returned.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        jid: String,
        attached: bool,
        params: SessionParams,
        record: &SessionRecord,
        outbound: &[Element],
        mux: MuxSnapshot,
        tokens: Vec<(String, u64)>,
        created: std::time::SystemTime,
    ) -> Self {
        let last = record.requests.last().map_or(0, |(rid, _)| *rid);
        SavedSession {
            jid,
            attached,
            params,
            next_rid: last.max(record.handed_on) + 1,
            unanswered: record
                .requests
                .iter()
                .map(|(rid, b)| (*rid, BASE64.encode(b)))
                .collect(),
            inbound: Vec::new(),
            outbound: outbound.iter().map(Element::to_xml).collect(),
            mux,
            tokens,
            created: created
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// The BOSH half, to resume; `None` when the saved data is damaged.
    pub fn resumable(&self) -> Option<Resumable> {
        let limits = Limits {
            max_bytes: 16 * 1024 * 1024,
            max_depth: 64,
            max_attrs: 256,
            allow_declaration: false,
        };
        let parse = |list: &[String]| -> Option<Vec<Element>> {
            list.iter()
                .map(|s| xmpp::parse(s.as_bytes(), &limits).ok())
                .collect()
        };
        let unanswered = self
            .unanswered
            .iter()
            .map(|(rid, b)| BASE64.decode(b).ok().map(|b| (*rid, Bytes::from(b))))
            .collect::<Option<Vec<_>>>()?;
        Some(Resumable {
            unanswered,
            inbound: parse(&self.inbound)?,
            outbound: parse(&self.outbound)?,
        })
    }
}

/// Writes `sessions` to `path` atomically, readable by the owner only.
pub fn save(path: &Path, sessions: Vec<SavedSession>) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let file = StateFile {
        version: VERSION,
        saved_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        sessions,
    };
    let json = serde_json::to_vec(&file).map_err(|e| StateError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads and removes the state file: its sessions are taken over once, never twice. A missing
/// file is no state.
pub fn take(path: &Path) -> Result<Vec<SavedSession>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let _ = std::fs::remove_file(path);
    let file: StateFile = serde_json::from_slice(&bytes).map_err(|e| StateError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if file.version != VERSION {
        return Err(StateError::Format {
            path: path.to_owned(),
            message: format!("version {} (this daemon reads {VERSION})", file.version),
        });
    }
    Ok(file.sessions)
}
