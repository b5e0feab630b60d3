//! The upstream side: a BOSH client (XEP-0124 + XEP-0206) that logs in to the XMPP server, or
//! attaches to a session someone else established, and then keeps that one session alive.
//!
//! Layers, bottom up: [`body`] (the `<body/>` codec) → [`transport`] (one HTTP POST) →
//! [`login`] (sequential exchanges until a resource is bound) → [`scheduler`] (the task that owns
//! the session afterwards: rid counter, held requests, retries, ordering, write-ahead records in
//! the session store), with [`cuts`] telling the scheduler what to make of held requests a proxy
//! cuts. Callers see a [`BoshHandle`] to queue stanzas and confirm responses, and a
//! stream of [`BoshEvent`]s; [`SessionMeta`] is what the store keeps to resume a session in
//! another process (SPEC §8). Nothing here knows about pages or HTTP serving.

pub mod body;
pub mod cuts;
pub mod error;
pub mod login;
pub mod meta;
pub mod reader;
pub mod scheduler;
pub mod transport;

use std::time::Duration;

pub use body::{Body, BodyError, BodyType, SessionParams};
pub use cuts::WaitHint;
pub use error::{BoshError, TransportError};
pub use login::{BoshClient, Credentials};
pub use meta::SessionMeta;
pub use reader::{BodyReader, DropReason, Dropped, ReadLimits, Response};
pub use scheduler::{BoshEvent, BoshHandle, BoshSession, Stats};
pub use transport::{Answer, Transport};

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::xmpp::sasl::Mechanism;

/// How the client talks to the connection manager.
#[derive(Clone, Debug)]
pub struct BoshConfig {
    /// Connection manager URL, e.g. `http://127.0.0.1:5280/http-bind`.
    pub url: String,
    /// `wait` asked for at session creation, seconds (the server may lower it).
    pub wait: u32,
    /// `xml:lang` of the stream.
    pub lang: String,
    /// SASL mechanisms we are willing to use; the strongest one offered is chosen.
    pub mechanisms: Vec<Mechanism>,
    /// Largest request body built from queued stanzas; more waits for the next request.
    pub max_request_bytes: usize,
    /// What one response may make us hold: larger stanzas are dropped, not retried.
    pub read_limits: ReadLimits,
    /// Deadlines and retry policy.
    pub timeouts: Timeouts,
    /// Where requests, retries and latencies are counted.
    pub metrics: Arc<Metrics>,
    /// A shorter `wait` learned from held requests cut by a proxy (SPEC §7): sessions created
    /// from then on ask for it instead of `wait` when it is lower. Shared by clones.
    pub wait_hint: WaitHint,
}

impl BoshConfig {
    /// Defaults for the connection manager at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        BoshConfig {
            url: url.into(),
            wait: 60,
            lang: "en".into(),
            mechanisms: vec![
                Mechanism::ScramSha256,
                Mechanism::ScramSha1,
                Mechanism::Plain,
            ],
            max_request_bytes: 512 * 1024,
            read_limits: ReadLimits::DEFAULT,
            timeouts: Timeouts::default(),
            metrics: Arc::default(),
            wait_hint: WaitHint::default(),
        }
    }
}

/// Deadlines and retry policy of the BOSH client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How much longer than `wait` a held request may take to get its response head before it
    /// counts as lost; also the longest silence between two chunks of a response body (a body
    /// that keeps arriving is read to its end, however long it takes).
    pub margin: Duration,
    /// First delay before resending a failed request.
    pub backoff_initial: Duration,
    /// Longest delay between two attempts of one request.
    pub backoff_max: Duration,
    /// Resends of one request before the session is given up.
    pub max_retries: u32,
    /// Longest a whole login may take.
    pub login: Duration,
    /// `wait` assumed for an attached session, whose creation answer we never saw: the longest
    /// time a request may legitimately be held.
    pub attach_wait: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            margin: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
            max_retries: 6,
            login: Duration::from_secs(30),
            attach_wait: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    /// Short deadlines for tests against a local server.
    pub fn tight() -> Self {
        Timeouts {
            margin: Duration::from_millis(500),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            max_retries: 3,
            login: Duration::from_secs(10),
            attach_wait: Duration::from_secs(5),
        }
    }

    /// Delay before attempt `attempt` (1 = first resend): exponential, capped, with full jitter
    /// in its upper half so many sessions failing together do not resend in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let cap = exp.min(self.backoff_max);
        let half = cap / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let t = Timeouts::default();
        for attempt in 1..20 {
            let d = t.backoff(attempt);
            let exp = t.backoff_initial * (1 << (attempt - 1).min(16));
            let cap = exp.min(t.backoff_max);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?}");
        }
    }
}
