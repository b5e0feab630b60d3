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

/// Applies `write` to `record`: the rules every backend follows.
pub(super) fn apply(
    handed_on: &mut u64,
    requests: &mut BTreeMap<u64, Bytes>,
    meta: &mut Bytes,
    caches: &mut Bytes,
    write: Write,
) {
    match write {
        Write::Request { rid, bytes } => {
            if rid > *handed_on {
                requests.insert(rid, bytes);
            }
        }
        Write::HandedOn { rid, caches: c } => {
            *handed_on = (*handed_on).max(rid);
            let keep = requests.split_off(&(*handed_on + 1));
            *requests = keep;
            if let Some(c) = c {
                *caches = c;
            }
        }
        Write::Caches(c) => *caches = c,
        Write::Meta {
            meta: m,
            restart_at,
        } => {
            *meta = m;
            if let Some(at) = restart_at {
                requests.clear();
                *handed_on = at;
            }
        }
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
