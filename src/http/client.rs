//! Who a client is, for the limits that keep one client from starving the others (SPEC §5, §9):
//! its address — IPv6 by /64, the block one subscriber usually holds — read from
//! `X-Forwarded-For` only when the peer is a trusted proxy; per-client token buckets for
//! WebSocket upgrades; and per-address counts of connections that have not upgraded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::http::HeaderMap;
use parking_lot::Mutex;
use tokio::time::Instant;

/// Above this many tracked clients, entries that carry no state (a full bucket) are dropped
/// before a new one is added, so the maps hold only clients active within one refill period.
const PRUNE_AT: usize = 4096;

/// One client, as far as limits are concerned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 address (IPv4-mapped IPv6 addresses included).
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
    /// A user, known by the valid token its upgrade carried in the cookie.
    User(String),
}

impl ClientKey {
    /// The key of a client address.
    pub fn of_addr(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.octets()),
                None => ClientKey::V6((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// The client's address: the peer's, or — when the peer is one of `trusted` proxies — the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries further left
/// are whatever the client wrote and prove nothing). A proxy that sent no usable entry counts
/// as the client.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for entry in entries.into_iter().rev() {
        match entry.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => {}
            Ok(ip) => return ip,
            Err(_) => break,
        }
    }
    peer
}

/// A token bucket holding up to `per_sec` tokens, refilled at `per_sec` per second.
#[derive(Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn full(per_sec: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: per_sec,
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, per_sec: f64, now: Instant) -> bool {
        self.refill(per_sec, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, per_sec: f64, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * per_sec;
        self.tokens = (self.tokens + earned).min(per_sec);
        self.at = now;
    }

    /// Whether the bucket has refilled completely by `now` (it then equals a new one).
    fn is_full(&self, per_sec: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_sec >= per_sec
    }
}

/// One upgrade bucket per client, plus a shared one that guards the daemon as a whole.
pub(crate) struct UpgradeLimiter {
    per_client: f64,
    total: f64,
    inner: Mutex<Buckets>,
}

struct Buckets {
    global: Bucket,
    clients: HashMap<ClientKey, Bucket>,
    prune_at: usize,
}

impl UpgradeLimiter {
    /// `per_client` and `total` upgrades per second (each also the burst).
    pub(crate) fn new(per_client: u32, total: u32) -> UpgradeLimiter {
        let now = Instant::now();
        UpgradeLimiter {
            per_client: f64::from(per_client),
            total: f64::from(total),
            inner: Mutex::new(Buckets {
                global: Bucket::full(f64::from(total), now),
                clients: HashMap::new(),
                prune_at: PRUNE_AT,
            }),
        }
    }

    /// Takes one upgrade for `client`: from its own bucket first, so a client over its rate
    /// never drains the shared one, then from the shared one.
    pub(crate) fn allow(&self, client: &ClientKey) -> bool {
        self.allow_at(client, Instant::now())
    }

    /// [`Self::allow`] at `now` (not before the previous call's `now`).
    fn allow_at(&self, client: &ClientKey, now: Instant) -> bool {
        let mut b = self.inner.lock();
        let b = &mut *b;
        if !b.clients.contains_key(client) && b.clients.len() >= b.prune_at {
            let per_sec = self.per_client;
            b.clients.retain(|_, bucket| !bucket.is_full(per_sec, now));
            b.prune_at = PRUNE_AT.max(b.clients.len() * 2);
        }
        let own = b
            .clients
            .entry(client.clone())
            .or_insert_with(|| Bucket::full(self.per_client, now));
        own.take(self.per_client, now) && b.global.take(self.total, now)
    }

    /// Clients with a bucket (for tests of the pruning).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.inner.lock().clients.len()
    }
}

/// Connections that have not upgraded, counted per client address.
#[derive(Default)]
pub(crate) struct ConnectionCounts {
    counts: Mutex<HashMap<ClientKey, usize>>,
}

impl ConnectionCounts {
    /// Counts one more connection of `client`, unless it already holds `cap`.
    pub(crate) fn enter(self: &Arc<Self>, client: ClientKey, cap: usize) -> Option<ConnectionSlot> {
        let mut counts = self.counts.lock();
        let n = counts.entry(client.clone()).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            counts: self.clone(),
            client,
        })
    }
}

/// A counted connection; dropping it (connection closed or upgraded) frees the place.
pub(crate) struct ConnectionSlot {
    counts: Arc<ConnectionCounts>,
    client: ClientKey,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock();
        if let Some(n) = counts.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = [proxy, "10.0.0.2".parse().unwrap()];
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        // Not from a proxy: the header is the client's own words.
        assert_eq!(
            client_addr(client, &headers(&["1.2.3.4"]), &trusted),
            client
        );
        // The proxy appends the real address on the right; what the client wrote is further left.
        assert_eq!(
            client_addr(proxy, &headers(&["1.2.3.4, 198.51.100.7"]), &trusted),
            client
        );
        assert_eq!(
            client_addr(
                proxy,
                &headers(&["1.2.3.4", "198.51.100.7, 10.0.0.2"]),
                &trusted
            ),
            client
        );
        assert_eq!(client_addr(proxy, &headers(&[]), &trusted), proxy);
        assert_eq!(client_addr(proxy, &headers(&["junk"]), &trusted), proxy);
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_bit_prefix() {
        let a = ClientKey::of_addr("2001:db8:1:2::1".parse().unwrap());
        let b = ClientKey::of_addr("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = ClientKey::of_addr("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            ClientKey::of_addr("::ffff:192.0.2.1".parse().unwrap()),
            ClientKey::of_addr("192.0.2.1".parse().unwrap())
        );
    }

    #[test]
    fn one_client_over_its_rate_leaves_the_shared_bucket_to_the_others() {
        let limiter = UpgradeLimiter::new(5, 20);
        let t0 = Instant::now();
        let flood = ClientKey::V4([127, 0, 0, 1]);
        let allowed = (0..100).filter(|_| limiter.allow_at(&flood, t0)).count();
        assert_eq!(allowed, 5);
        let others = (0..15u8)
            .filter(|i| limiter.allow_at(&ClientKey::V4([10, 0, 0, *i]), t0))
            .count();
        assert_eq!(others, 15);
        // The shared bucket still bounds everyone together.
        assert!(!limiter.allow_at(&ClientKey::V4([10, 0, 1, 1]), t0));
        // 200 ms later the flooder has earned one upgrade, the shared bucket four.
        let t1 = t0 + Duration::from_millis(200);
        assert!(limiter.allow_at(&flood, t1));
        assert!(!limiter.allow_at(&flood, t1));
    }

    #[test]
    fn idle_clients_are_forgotten() {
        let t0 = Instant::now();
        let filled = || {
            let limiter = UpgradeLimiter::new(10, 1_000_000);
            for i in 0..PRUNE_AT as u64 {
                assert!(limiter.allow_at(&ClientKey::V6(i), t0));
            }
            limiter
        };
        // Within the refill period nobody is forgotten: their spent tokens still count.
        let limiter = filled();
        assert!(limiter.allow_at(&ClientKey::V6(u64::MAX), t0 + Duration::from_millis(50)));
        assert_eq!(limiter.tracked(), PRUNE_AT + 1);
        // Once refilled they are the same as new, and go.
        let limiter = filled();
        assert!(limiter.allow_at(&ClientKey::V6(u64::MAX), t0 + Duration::from_secs(1)));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn connections_are_capped_per_client_and_freed_on_drop() {
        let counts = Arc::new(ConnectionCounts::default());
        let a = ClientKey::V4([192, 0, 2, 1]);
        let first = counts.enter(a.clone(), 2).unwrap();
        let _second = counts.enter(a.clone(), 2).unwrap();
        assert!(counts.enter(a.clone(), 2).is_none());
        assert!(counts.enter(ClientKey::V4([192, 0, 2, 2]), 2).is_some());
        drop(first);
        assert!(counts.enter(a, 2).is_some());
    }
}
