//! The in-memory store: the semantics of every backend, in a map behind a lock. For tests: it
//! outlives a daemon inside one process (a "restart" in-process), never the process.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use parking_lot::Mutex;

use super::{
    Backend, Credential, CredentialKind, SessionRecord, Snapshot, StoreError, StoreFuture, Write,
    unix_now,
};

/// See the module documentation.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Record>,
    /// The last epoch each bare JID had, so a new record's epoch is always higher.
    epochs: HashMap<String, u64>,
    credentials: HashMap<(CredentialKind, [u8; 32]), Credential>,
}

struct Record {
    epoch: u64,
    meta: Bytes,
    caches: Bytes,
    handed_on: u64,
    requests: BTreeMap<u64, Bytes>,
}

fn ready<T: Send + 'static>(r: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(r))
}

impl State {
    fn current(&mut self, bare: &str, epoch: u64) -> Result<&mut Record, StoreError> {
        match self.sessions.get_mut(bare) {
            Some(r) if r.epoch == epoch => Ok(r),
            Some(r) => Err(StoreError::Fenced {
                current: Some(r.epoch),
            }),
            None => Err(StoreError::Fenced { current: None }),
        }
    }
}

/// What one [`Write`] does to a record, decided from the record's `handed_on` alone: the rules
/// every backend follows. A backend carries the steps out in this order: `clear_requests`,
/// `drop_through`, `handed_on`, `insert`, `meta`, `caches`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Change {
    /// Every write-ahead record goes (a new upstream session).
    pub(super) clear_requests: bool,
    /// Records with a rid at or below this one go.
    pub(super) drop_through: Option<u64>,
    /// The new `handed_on`.
    pub(super) handed_on: Option<u64>,
    /// A write-ahead record to store (replacing one with the same rid).
    pub(super) insert: Option<(u64, Bytes)>,
    /// The new meta.
    pub(super) meta: Option<Bytes>,
    /// The new caches.
    pub(super) caches: Option<Bytes>,
}

/// The [`Change`] `write` makes to a record whose mark is `handed_on`.
pub(super) fn change(handed_on: u64, write: Write) -> Change {
    match write {
        // A record at or below the mark was answered already: nothing to keep.
        Write::Request { rid, bytes } => Change {
            insert: (rid > handed_on).then_some((rid, bytes)),
            ..Change::default()
        },
        // The mark never goes back (responses are handed on in rid order).
        Write::HandedOn { rid, caches } => {
            let mark = handed_on.max(rid);
            Change {
                drop_through: Some(mark),
                handed_on: Some(mark),
                caches,
                ..Change::default()
            }
        }
        Write::Caches(c) => Change {
            caches: Some(c),
            ..Change::default()
        },
        Write::Meta { meta, restart_at } => Change {
            clear_requests: restart_at.is_some(),
            handed_on: restart_at,
            meta: Some(meta),
            ..Change::default()
        },
    }
}

/// Applies `write` to a record held in memory, by the rules of [`change`].
pub(super) fn apply(
    handed_on: &mut u64,
    requests: &mut BTreeMap<u64, Bytes>,
    meta: &mut Bytes,
    caches: &mut Bytes,
    write: Write,
) {
    let c = change(*handed_on, write);
    if c.clear_requests {
        requests.clear();
    }
    if let Some(through) = c.drop_through {
        *requests = match through.checked_add(1) {
            Some(above) => requests.split_off(&above),
            None => BTreeMap::new(),
        };
    }
    if let Some(h) = c.handed_on {
        *handed_on = h;
    }
    if let Some((rid, bytes)) = c.insert {
        requests.insert(rid, bytes);
    }
    if let Some(m) = c.meta {
        *meta = m;
    }
    if let Some(c) = c.caches {
        *caches = c;
    }
}

impl Backend for MemoryStore {
    fn load(&self) -> StoreFuture<Snapshot> {
        let state = self.state.lock();
        let now = unix_now();
        let sessions = state
            .sessions
            .iter()
            .map(|(bare, r)| SessionRecord {
                bare: bare.clone(),
                epoch: r.epoch,
                meta: r.meta.clone(),
                caches: r.caches.clone(),
                handed_on: r.handed_on,
                requests: r.requests.iter().map(|(k, v)| (*k, v.clone())).collect(),
            })
            .collect();
        let credentials = state
            .credentials
            .values()
            .filter(|c| c.expires_at > now)
            .cloned()
            .collect();
        ready(Ok(Snapshot {
            sessions,
            credentials,
        }))
    }

    fn create(&self, bare: &str, meta: Bytes, handed_on: u64) -> StoreFuture<u64> {
        let mut state = self.state.lock();
        let epoch = state.epochs.get(bare).copied().unwrap_or(0) + 1;
        state.epochs.insert(bare.to_owned(), epoch);
        state.sessions.insert(
            bare.to_owned(),
            Record {
                epoch,
                meta,
                caches: Bytes::new(),
                handed_on,
                requests: BTreeMap::new(),
            },
        );
        ready(Ok(epoch))
    }

    fn take_over(&self, bare: &str, epoch: u64) -> StoreFuture<u64> {
        let mut state = self.state.lock();
        let r = match state.current(bare, epoch) {
            Ok(r) => r,
            Err(e) => return ready(Err(e)),
        };
        r.epoch += 1;
        let new = r.epoch;
        state.epochs.insert(bare.to_owned(), new);
        ready(Ok(new))
    }

    fn write(&self, bare: &str, epoch: u64, write: Write) -> StoreFuture<()> {
        let mut state = self.state.lock();
        ready(state.current(bare, epoch).map(|r| {
            apply(
                &mut r.handed_on,
                &mut r.requests,
                &mut r.meta,
                &mut r.caches,
                write,
            );
        }))
    }

    fn remove(&self, bare: &str, epoch: u64) -> StoreFuture<()> {
        let mut state = self.state.lock();
        if let Err(e) = state.current(bare, epoch) {
            return ready(Err(e));
        }
        state.sessions.remove(bare);
        state.credentials.retain(|_, c| c.bare != bare);
        ready(Ok(()))
    }

    fn put_credential(&self, credential: Credential) -> StoreFuture<()> {
        self.state
            .lock()
            .credentials
            .insert((credential.kind, credential.hash), credential);
        ready(Ok(()))
    }

    fn remove_credential(&self, kind: CredentialKind, hash: [u8; 32]) -> StoreFuture<()> {
        self.state.lock().credentials.remove(&(kind, hash));
        ready(Ok(()))
    }

    fn durable(&self) -> bool {
        // A daemon that stops leaves its sessions here for the next one in this process.
        true
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_store_follows_the_store_rules() {
        super::super::conformance::run(&super::super::Store::memory()).await;
    }
}
