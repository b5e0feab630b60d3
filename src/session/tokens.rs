//! Browser credentials (SPEC §3): tokens (sliding idle expiry, revoked with their session) and
//! one-time tickets, each leading to a canonical bare JID. Kept as SHA-256 hashes, in memory and
//! in the store (SPEC §8), so that a token issued before a crash works after it and a revoked
//! one stays revoked.
//!
//! Locks are `parking_lot` mutexes held for short, synchronous sections; store writes happen
//! after the lock is released.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::store::{Credential, CredentialKind, Store, StoreError, unix_now};
use crate::xmpp::Jid;

struct Entry {
    bare: Jid,
    expires: Instant,
    /// The expiry the store has (tokens slide; the store is told when it lags by a quarter TTL).
    stored_expires: Instant,
    /// Issued by another node and seen in the shared store (SPEC §12): trusted only while the
    /// store cannot be asked, and kept so that it can be written back if the store loses it.
    shadow: bool,
}

/// Tokens and tickets of every session of one daemon.
pub struct Tokens {
    store: Store,
    token_ttl: Duration,
    ticket_ttl: Duration,
    tokens: Mutex<HashMap<[u8; 32], Entry>>,
    tickets: Mutex<HashMap<[u8; 32], Entry>>,
}

impl Tokens {
    /// Empty; tokens live `token_ttl` after their last use, tickets `ticket_ttl` after issue.
    pub fn new(store: Store, token_ttl: Duration, ticket_ttl: Duration) -> Tokens {
        Tokens {
            store,
            token_ttl,
            ticket_ttl,
            tokens: Mutex::new(HashMap::new()),
            tickets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes in credentials read from the store at start (expired ones were not loaded).
    pub fn restore(&self, stored: &[Credential]) {
        let now = Instant::now();
        let unix = unix_now();
        for c in stored {
            let Ok(bare) = Jid::parse(&c.bare) else {
                continue;
            };
            let expires = now + Duration::from_secs(c.expires_at.saturating_sub(unix));
            let entry = Entry {
                bare: bare.to_bare(),
                expires,
                stored_expires: expires,
                shadow: false,
            };
            match c.kind {
                CredentialKind::Token => self.tokens.lock().insert(c.hash, entry),
                CredentialKind::Ticket => self.tickets.lock().insert(c.hash, entry),
            };
        }
    }

    /// A new token for `bare` and when it expires if unused; stored before it is returned.
    pub async fn issue_token(&self, bare: &Jid) -> (String, SystemTime) {
        let token = self.issue(CredentialKind::Token, bare).await;
        (token, SystemTime::now() + self.token_ttl)
    }

    /// A one-time ticket for `bare`; stored before it is returned.
    pub async fn issue_ticket(&self, bare: &Jid) -> String {
        self.issue(CredentialKind::Ticket, bare).await
    }

    /// The user a token belongs to; using it extends its life.
    pub fn check_token(&self, token: &str) -> Option<Jid> {
        let now = Instant::now();
        let h = hash(token);
        let (bare, persist) = {
            let mut tokens = self.tokens.lock();
            let e = tokens.get_mut(&h)?;
            if e.expires <= now || e.shadow {
                return None;
            }
            e.expires = now + self.token_ttl;
            let lagging = e.expires.duration_since(e.stored_expires) > self.token_ttl / 4;
            if lagging {
                e.stored_expires = e.expires;
            }
            (e.bare.clone(), lagging)
        };
        if persist {
            let store = self.store.clone();
            let c = credential(CredentialKind::Token, h, &bare, self.token_ttl);
            tokio::spawn(async move { warn_on_error(store.put_credential(c).await) });
        }
        Some(bare)
    }

    /// Redeems a ticket (at most once).
    pub fn redeem_ticket(&self, ticket: &str) -> Option<Jid> {
        let h = hash(ticket);
        let e = self.tickets.lock().remove(&h)?;
        let store = self.store.clone();
        tokio::spawn(async move {
            warn_on_error(store.remove_credential(CredentialKind::Ticket, h).await);
        });
        (e.expires > Instant::now()).then_some(e.bare)
    }

    /// Like [`Tokens::check_token`], and when this process does not know the token, the store
    /// is asked: another node of the cluster may have issued it (SPEC §12). A token found there
    /// is not kept here, so that a logout on its owner node revokes it everywhere at once.
    pub async fn check_token_anywhere(&self, token: &str) -> Option<Jid> {
        if let Some(bare) = self.check_token(token) {
            return Some(bare);
        }
        self.store.shared()?;
        let h = hash(token);
        let found = self
            .store
            .find_credential(CredentialKind::Token, h, false)
            .await;
        let c = match found {
            Ok(Some(c)) => c,
            Ok(None) => {
                self.tokens.lock().remove(&h);
                return None;
            }
            Err(e) => {
                // The store is out of reach: a token seen there before still opens pages, as
                // sessions carry on without Redis.
                tracing::warn!(error = %e, "token not looked up in the store");
                let tokens = self.tokens.lock();
                let e = tokens.get(&h).filter(|e| e.expires > Instant::now())?;
                return Some(e.bare.clone());
            }
        };
        let bare = Jid::parse(&c.bare).ok()?.to_bare();
        let expires = Instant::now() + Duration::from_secs(c.expires_at.saturating_sub(unix_now()));
        self.tokens.lock().entry(h).or_insert(Entry {
            bare: bare.clone(),
            expires,
            stored_expires: expires,
            shadow: true,
        });
        // Sliding expiry, as for a token known here: written once it lags by a quarter.
        let renewed = unix_now() + self.token_ttl.as_secs();
        if renewed.saturating_sub(c.expires_at) > self.token_ttl.as_secs() / 4 {
            let store = self.store.clone();
            let c = credential(CredentialKind::Token, c.hash, &bare, self.token_ttl);
            tokio::spawn(async move { warn_on_error(store.put_credential(c).await) });
        }
        Some(bare)
    }

    /// Like [`Tokens::redeem_ticket`], and when this process does not know the ticket, it is
    /// taken from the store (issued by another node; SPEC §12): still once only.
    /// With a shared store the store decides, so that a ticket is redeemed once across
    /// every node; this process's copy is dropped either way.
    pub async fn redeem_ticket_anywhere(&self, ticket: &str) -> Option<Jid> {
        if self.store.shared().is_none() {
            return self.redeem_ticket(ticket);
        }
        let h = hash(ticket);
        let local = self.tickets.lock().remove(&h);
        let found = self
            .store
            .find_credential(CredentialKind::Ticket, h, true)
            .await;
        match found {
            Ok(Some(c)) => Jid::parse(&c.bare).ok().map(|j| j.to_bare()),
            Ok(None) => None,
            // Redis is out of reach: what this process issued still works here.
            Err(e) => {
                tracing::warn!(error = %e, "ticket not looked up in the store");
                local.filter(|e| e.expires > Instant::now()).map(|e| e.bare)
            }
        }
    }

    /// Writes every live token and ticket this process knows of users `keep` names back to the
    /// store (after the store lost its data; SPEC §12), with the expiry each has here: those
    /// issued here, and those of other nodes seen in the store.
    pub async fn write_back(&self, keep: impl Fn(&Jid) -> bool) {
        let now = Instant::now();
        let unix = unix_now();
        let mut all = Vec::new();
        for (kind, map) in [
            (CredentialKind::Token, &self.tokens),
            (CredentialKind::Ticket, &self.tickets),
        ] {
            for (h, e) in map
                .lock()
                .iter()
                .filter(|(_, e)| e.expires > now && keep(&e.bare))
            {
                all.push(Credential {
                    kind,
                    hash: *h,
                    bare: e.bare.to_string(),
                    expires_at: unix + e.expires.duration_since(now).as_secs(),
                });
            }
        }
        for c in all {
            warn_on_error(self.store.put_credential(c).await);
        }
    }

    /// Forgets every token and ticket of `bare` in memory (the store drops them with the
    /// session's record).
    pub fn revoke(&self, bare: &Jid) {
        self.tokens.lock().retain(|_, e| &e.bare != bare);
        self.tickets.lock().retain(|_, e| &e.bare != bare);
    }

    async fn issue(&self, kind: CredentialKind, bare: &Jid) -> String {
        let ttl = match kind {
            CredentialKind::Token => self.token_ttl,
            CredentialKind::Ticket => self.ticket_ttl,
        };
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        let secret = URL_SAFE_NO_PAD.encode(raw);
        let h = hash(&secret);
        let now = Instant::now();
        {
            let map = match kind {
                CredentialKind::Token => &self.tokens,
                CredentialKind::Ticket => &self.tickets,
            };
            let mut map = map.lock();
            if map.len() % 256 == 255 {
                map.retain(|_, e| e.expires > now);
            }
            map.insert(
                h,
                Entry {
                    bare: bare.clone(),
                    expires: now + ttl,
                    stored_expires: now + ttl,
                    shadow: false,
                },
            );
        }
        warn_on_error(
            self.store
                .put_credential(credential(kind, h, bare, ttl))
                .await,
        );
        secret
    }
}

fn credential(kind: CredentialKind, hash: [u8; 32], bare: &Jid, ttl: Duration) -> Credential {
    Credential {
        kind,
        hash,
        bare: bare.to_string(),
        expires_at: unix_now() + ttl.as_secs(),
    }
}

/// A credential the store could not keep still works in this process; only a crash loses it.
fn warn_on_error(r: Result<(), StoreError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "credential not written to the store");
    }
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_issued_before_a_restart_work_after_it_and_revoked_ones_do_not() {
        let store = Store::memory();
        let ttl = Duration::from_secs(600);
        let first = Tokens::new(store.clone(), ttl, Duration::from_secs(60));
        let alice = Jid::parse("alice@x").unwrap();
        let bob = Jid::parse("bob@x").unwrap();
        let (ta, _) = first.issue_token(&alice).await;
        let (tb, _) = first.issue_token(&bob).await;
        let ticket = first.issue_ticket(&alice).await;
        // Bob logs out: his session record goes, and his credentials with it.
        let bob_session = store.create("bob@x", bytes::Bytes::new(), 0).await.unwrap();
        bob_session.remove().await.unwrap();
        first.revoke(&bob);

        let second = Tokens::new(store.clone(), ttl, Duration::from_secs(60));
        second.restore(&store.load().await.unwrap().credentials);
        assert_eq!(second.check_token(&ta), Some(alice.clone()));
        assert_eq!(second.check_token(&tb), None, "revoked before the restart");
        assert_eq!(second.check_token("not-a-token"), None);
        assert_eq!(second.redeem_ticket(&ticket), Some(alice));
        assert_eq!(second.redeem_ticket(&ticket), None, "one-time");
    }
}
