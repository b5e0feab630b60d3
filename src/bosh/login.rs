//! Establishing the upstream session: create, SASL, restart, bind, legacy session — or attach to a
//! session created elsewhere. Login is strictly sequential (one request outstanding), so every
//! answer is simply the response to the request just sent; the [`scheduler`](super::scheduler)
//! takes over once a resource is bound.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::body::{Body, BodyType, SessionParams};
use super::error::{BoshError, TransportError};
use super::meta::SessionMeta;
use super::reader::Response;
use super::scheduler::{self, BoshSession, Start};
use super::transport::{PostError, Transport};
use super::{BoshConfig, Timeouts};
use crate::metrics::Metrics;
use crate::store::{SessionRecord, SessionStore, Store, StoreError};
use crate::xmpp::sasl::{self, Mechanism, SaslClient};
use crate::xmpp::{Element, Jid, ns};

/// What the daemon holds to (re)establish a user's session.
#[derive(Clone)]
pub enum Credentials {
    /// Log in with a password; kept in memory only.
    Password {
        /// The account (bare JID).
        jid: Jid,
        /// Its password.
        password: String,
    },
    /// Continue a session established elsewhere (Strophe's `attach()`).
    Attach {
        /// The session's full JID.
        jid: Jid,
        /// BOSH session id.
        sid: String,
        /// The next rid to use.
        rid: u64,
    },
}

impl std::fmt::Debug for Credentials {
    // Written by hand so that neither a password nor a sid can reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { jid, .. } => f
                .debug_struct("Password")
                .field("jid", &jid.to_string())
                .finish_non_exhaustive(),
            Credentials::Attach { jid, .. } => f
                .debug_struct("Attach")
                .field("jid", &jid.to_string())
                .finish_non_exhaustive(),
        }
    }
}

/// Opens upstream sessions against one connection manager. Cheap to clone; clones share the HTTP
/// connection pool.
#[derive(Clone, Debug)]
pub struct BoshClient {
    config: Arc<BoshConfig>,
    transport: Transport,
}

impl BoshClient {
    /// A client for `config.url`.
    pub fn new(config: BoshConfig) -> Result<BoshClient, BoshError> {
        let transport = Transport::new(&config.url)
            .map_err(BoshError::Setup)?
            .with_read_limits(config.read_limits)
            .with_body_idle(config.timeouts.margin);
        Ok(BoshClient {
            config: Arc::new(config),
            transport,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &BoshConfig {
        &self.config
    }

    /// A client over `transport` (e.g. [`Transport::channel`] in tests) instead of HTTP to
    /// `config.url`.
    pub fn with_transport(config: BoshConfig, transport: Transport) -> BoshClient {
        let transport = transport
            .with_read_limits(config.read_limits)
            .with_body_idle(config.timeouts.margin);
        BoshClient {
            config: Arc::new(config),
            transport,
        }
    }

    /// Establishes a session with `creds`: a full login, or an attach. Once it is bound (or
    /// attached) its record is created in `store` (SPEC §8) and every request is written there
    /// before it leaves; see [`BoshClient::login`].
    pub async fn connect(
        &self,
        creds: &Credentials,
        resource: Option<&str>,
        store: &Store,
    ) -> Result<BoshSession, BoshError> {
        match creds {
            Credentials::Password { jid, password } => {
                self.login(jid, password, resource, store).await
            }
            Credentials::Attach { jid, sid, rid } => {
                Ok(self.attach(jid.clone(), sid.clone(), *rid, store).await)
            }
        }
    }

    /// Logs `jid` in with `password` and binds `resource` (the server's choice if `None`), then
    /// creates the session's record in `store` (keyed by the bare JID, replacing any, with
    /// `handed_on` = the first scheduler rid − 1) and starts the session writing through it.
    /// A store that cannot be reached does not fail the login: the session goes on without a
    /// record (nothing to resume it from), with a warning and `boshmux_store_errors_total`.
    pub async fn login(
        &self,
        jid: &Jid,
        password: &str,
        resource: Option<&str>,
        store: &Store,
    ) -> Result<BoshSession, BoshError> {
        let limit = self.config.timeouts.login;
        let bound = tokio::time::timeout(limit, self.login_inner(jid, password, resource))
            .await
            .unwrap_or(Err(BoshError::LoginTimeout(limit)))?;
        let Bound {
            full,
            features,
            start,
        } = bound;
        Ok(self
            .establish(full, Some(features), start, false, store)
            .await)
    }

    /// Continues the session `sid` of `jid` (a full JID) at `rid`, as Strophe's `attach()` does,
    /// with its record created in `store` as for [`BoshClient::login`] (`handed_on` = `rid` − 1).
    /// Nothing is sent until the session runs; a dead session ends with a terminal error event.
    /// The creation answer was never seen, so `requests='2'` and a `wait` of
    /// [`Timeouts::attach_wait`] are assumed.
    pub async fn attach(&self, jid: Jid, sid: String, rid: u64, store: &Store) -> BoshSession {
        let params = SessionParams {
            sid,
            wait: u32::try_from(self.config.timeouts.attach_wait.as_secs()).unwrap_or(u32::MAX),
            requests: 2,
            hold: 1,
            polling: None,
            inactivity: None,
            maxpause: None,
            ver: None,
            authid: None,
            from: None,
            secure: None,
            accept: None,
            xmpp_version: None,
        };
        let start = Start::fresh(params, rid, Vec::new());
        self.establish(jid, None, start, true, store).await
    }

    /// Creates the record of a session just bound or attached and starts its scheduler.
    async fn establish(
        &self,
        full: Jid,
        features: Option<Element>,
        start: Start,
        attached: bool,
        store: &Store,
    ) -> BoshSession {
        let meta = SessionMeta {
            jid: full.to_string(),
            params: start.params.clone(),
            attached,
            created: crate::store::unix_now(),
        };
        let bare = full.to_bare().to_string();
        let session_store = match store.create(&bare, meta.encode(), start.next_rid - 1).await {
            Ok(s) => s,
            Err(e) => {
                // No record exists, so none can be written to (a write would be refused as
                // fenced): the session goes on without durability rather than failing the user.
                self.config
                    .metrics
                    .store_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "session record not created; this session will not survive a crash");
                debug_assert!(
                    !matches!(e, StoreError::Fenced { .. }),
                    "create is not fenced"
                );
                SessionStore::none()
            }
        };
        scheduler::spawn(
            self.transport.clone(),
            &self.config,
            full,
            features,
            session_store,
            start,
        )
    }

    /// Takes over a session from its stored `record` (SPEC §8), writing through `store` (the
    /// handle [`Store::take_over`] returned for it). The requests whose responses were not handed
    /// on are resent first, oldest first, each once and byte-identical (the server answers
    /// them from its cache, or holds them); new rids follow from the highest rid the record
    /// knows + 1. [`BoshError::BadRecord`] when the record's meta cannot be read.
    pub fn resume(
        &self,
        record: &SessionRecord,
        store: SessionStore,
    ) -> Result<BoshSession, BoshError> {
        let meta = SessionMeta::decode(&record.meta)?;
        let jid = Jid::parse(&meta.jid)
            .map_err(|e| BoshError::BadRecord(format!("jid {:?}: {e}", meta.jid)))?;
        let last = record.requests.last().map_or(0, |(rid, _)| *rid);
        let start = Start {
            params: meta.params,
            next_rid: last.max(record.handed_on) + 1,
            handed_on: record.handed_on,
            unanswered: record.requests.clone(),
            early: Vec::new(),
        };
        Ok(scheduler::spawn(
            self.transport.clone(),
            &self.config,
            jid,
            None,
            store,
            start,
        ))
    }

    async fn login_inner(
        &self,
        jid: &Jid,
        password: &str,
        resource: Option<&str>,
    ) -> Result<Bound, BoshError> {
        let cfg = &self.config;
        let domain = jid.domain().to_owned();
        let mut x = Exchange::new(self.transport.clone(), cfg.timeouts, cfg.metrics.clone());
        let first_rid: u64 = rand::random_range(1 << 20..1 << 32);
        x.rid = first_rid;

        // Creation: the answer's attributes define the session; features may come later. The
        // `wait` asked for is shorter than configured once cuts showed a proxy gives up sooner.
        let wait = cfg.wait_hint.wait_to_ask(cfg.wait);
        if wait < cfg.wait {
            tracing::debug!(
                wait,
                configured = cfg.wait,
                "asking for the wait learned from cuts"
            );
        }
        x.wait = Duration::from_secs(u64::from(wait));
        let created = x
            .roundtrip(Body::create(x.rid, &domain, wait, &cfg.lang))
            .await?;
        let params =
            SessionParams::from_body(&created).map_err(|e| BoshError::Protocol(e.to_string()))?;
        x.sid = params.sid.clone();
        x.wait = Duration::from_secs(u64::from(params.wait));
        x.inbox.extend(created.into_children());
        tracing::debug!(
            requests = params.requests,
            wait = params.wait,
            "upstream session created"
        );

        let features = x.expect(|e| e.is("features", ns::STREAM)).await?;
        let offered: Vec<String> = features
            .child("mechanisms", ns::SASL)
            .map(|m| {
                m.elements()
                    .filter(|e| e.name == "mechanism")
                    .map(Element::text)
                    .collect()
            })
            .unwrap_or_default();
        let offered_refs: Vec<&str> = offered.iter().map(String::as_str).collect();
        let mechanism = sasl::choose(&offered_refs, &cfg.mechanisms)
            .ok_or_else(|| BoshError::NoMechanism(offered.join(", ")))?;
        tracing::debug!(mechanism = mechanism.name(), "authenticating");
        self.authenticate(&mut x, mechanism, jid, password).await?;

        // XEP-0206 §5: restart the stream, then bind.
        let restarted = x
            .roundtrip(Body::restart(x.rid, &x.sid, &domain, &cfg.lang))
            .await?;
        x.inbox.extend(restarted.into_children());
        let features = x.expect(|e| e.is("features", ns::STREAM)).await?;
        if features.child("bind", ns::BIND).is_none() {
            return Err(BoshError::Protocol(
                "server offers no resource binding".into(),
            ));
        }
        let mut bind = Element::new("bind", ns::BIND);
        if let Some(r) = resource {
            bind.push_child(Element::new("resource", ns::BIND).with_text(r));
        }
        let result = x.iq_set("bind", bind, "bind").await?;
        let bound = result
            .child("bind", ns::BIND)
            .and_then(|b| b.child("jid", ns::BIND))
            .map(Element::text)
            .ok_or_else(|| BoshError::Protocol("bind result carries no jid".into()))?;
        let full = Jid::parse(&bound)
            .map_err(|e| BoshError::Protocol(format!("bound jid {bound:?}: {e}")))?;

        // RFC 3921 session: only when the server does not mark it optional (RFC 6121 Appendix E).
        if let Some(session) = features.child("session", ns::SESSION)
            && session.child("optional", ns::SESSION).is_none()
        {
            x.iq_set("sess", Element::new("session", ns::SESSION), "session")
                .await?;
        }
        tracing::debug!("resource bound");

        let early: Vec<Element> = x.early.into_iter().chain(x.inbox).collect();
        Ok(Bound {
            full,
            features,
            start: Start::fresh(params, x.rid, early),
        })
    }

    async fn authenticate(
        &self,
        x: &mut Exchange,
        mechanism: Mechanism,
        jid: &Jid,
        password: &str,
    ) -> Result<(), BoshError> {
        let authcid = jid.local().unwrap_or(jid.domain());
        let mut sasl = SaslClient::new(mechanism, authcid, password)?;
        let auth = Element::new("auth", ns::SASL)
            .with_attr("mechanism", mechanism.name())
            .with_text(encode_payload(&sasl.initial_response()));
        x.send(vec![auth]).await?;
        loop {
            let el = x.expect(|e| e.ns == ns::SASL).await?;
            match el.name.as_str() {
                "challenge" => {
                    // The first SCRAM challenge costs a PBKDF2 run: keep it off the async workers.
                    let data = decode_payload(&el)?;
                    let (back, reply) = tokio::task::spawn_blocking(move || {
                        let reply = sasl.challenge(&data);
                        (sasl, reply)
                    })
                    .await
                    .map_err(|e| BoshError::Protocol(format!("SASL task failed: {e}")))?;
                    sasl = back;
                    let reply = reply?;
                    let response =
                        Element::new("response", ns::SASL).with_text(encode_payload(&reply));
                    x.send(vec![response]).await?;
                }
                "success" => {
                    sasl.success(&decode_payload(&el)?)?;
                    return Ok(());
                }
                "failure" => {
                    let condition = el
                        .elements()
                        .find(|c| c.name != "text")
                        .map_or_else(|| "unknown".to_owned(), |c| c.name.clone());
                    return Err(BoshError::AuthFailed { condition });
                }
                other => {
                    return Err(BoshError::Protocol(format!(
                        "unexpected SASL element <{other}/>"
                    )));
                }
            }
        }
    }
}

/// A session logged in and bound, before its record and scheduler exist.
struct Bound {
    full: Jid,
    features: Element,
    start: Start,
}

/// RFC 6120 §6.4.2: an empty payload is sent as `=`.
fn encode_payload(data: &[u8]) -> String {
    if data.is_empty() {
        "=".to_owned()
    } else {
        BASE64.encode(data)
    }
}

fn decode_payload(el: &Element) -> Result<Vec<u8>, BoshError> {
    let text = el.text();
    let text = text.trim();
    if text.is_empty() || text == "=" {
        return Ok(Vec::new());
    }
    BASE64
        .decode(text)
        .map_err(|e| BoshError::Protocol(format!("bad base64 in <{}/>: {e}", el.name)))
}

/// Sequential request/response over one session during login.
struct Exchange {
    transport: Transport,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    sid: String,
    /// The rid the next request will carry.
    rid: u64,
    wait: Duration,
    /// Elements received and not yet looked at.
    inbox: VecDeque<Element>,
    /// Elements received during login that were not what login waited for (e.g. an early
    /// message); handed to the scheduler to deliver first.
    early: Vec<Element>,
    next_iq: u32,
}

impl Exchange {
    fn new(transport: Transport, timeouts: Timeouts, metrics: Arc<Metrics>) -> Self {
        Exchange {
            transport,
            timeouts,
            metrics,
            sid: String::new(),
            rid: 0,
            wait: Duration::ZERO,
            inbox: VecDeque::new(),
            early: Vec::new(),
            next_iq: 0,
        }
    }

    /// Sends `body` (which must carry `self.rid`) and returns the answer, resending the same bytes
    /// on transient failures.
    async fn roundtrip(&mut self, body: Body) -> Result<Body, BoshError> {
        let bytes = body.to_bytes();
        self.rid += 1;
        let timeout = self.wait + self.timeouts.margin;
        let mut attempt = 0;
        loop {
            let failure = match self.transport.post(bytes.clone(), timeout).await {
                Ok(Response { body, dropped }) => {
                    for d in &dropped {
                        self.metrics.inbound_dropped(d.reason);
                    }
                    match body.body_type() {
                        BodyType::Normal => return Ok(body),
                        BodyType::Terminate => return Err(scheduler::terminated(body).1),
                        BodyType::Error => {
                            TransportError::Connection("recoverable binding error".into())
                        }
                    }
                }
                Err(PostError::Status(s, reason)) => return Err(BoshError::HttpStatus(s, reason)),
                Err(PostError::Transient(e)) => e,
            };
            if let TransportError::Cut { held, .. } = &failure {
                // Held and cut by a proxy (SPEC §7): no failure, resent at once; the login's own
                // deadline bounds how long this may go on.
                tracing::debug!(held_ms = held.as_millis(), "login request cut, resending");
                self.metrics.upstream_cuts.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            attempt += 1;
            if attempt > self.timeouts.max_retries {
                return Err(BoshError::RetriesExhausted {
                    attempts: attempt,
                    last: failure,
                });
            }
            tracing::debug!(attempt, error = %failure, "login request failed, resending");
            tokio::time::sleep(self.timeouts.backoff(attempt)).await;
        }
    }

    /// Sends `stanzas` in the next request and queues whatever comes back.
    async fn send(&mut self, stanzas: Vec<Element>) -> Result<(), BoshError> {
        let answer = self
            .roundtrip(Body::request(self.rid, &self.sid, stanzas))
            .await?;
        self.inbox.extend(answer.into_children());
        Ok(())
    }

    /// Waits (polling as needed) for the first element matching `wanted`; others are kept for
    /// later delivery.
    async fn expect(&mut self, wanted: impl Fn(&Element) -> bool) -> Result<Element, BoshError> {
        loop {
            while let Some(el) = self.inbox.pop_front() {
                if wanted(&el) {
                    return Ok(el);
                }
                if el.is("error", ns::STREAM) {
                    let condition = el
                        .elements()
                        .next()
                        .map_or("undefined-condition", |c| &c.name);
                    return Err(BoshError::Protocol(format!("stream error: {condition}")));
                }
                self.early.push(el);
            }
            self.send(Vec::new()).await?;
        }
    }

    /// Sends an iq set with `payload` and waits for its result.
    async fn iq_set(
        &mut self,
        id_prefix: &str,
        payload: Element,
        step: &'static str,
    ) -> Result<Element, BoshError> {
        self.next_iq += 1;
        let id = format!("{id_prefix}_{}", self.next_iq);
        let iq = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("id", id.clone())
            .with_child(payload);
        self.send(vec![iq]).await?;
        let answer = self
            .expect(|e| e.is("iq", ns::CLIENT) && e.attr("id") == Some(id.as_str()))
            .await?;
        match answer.attr("type") {
            Some("result") => Ok(answer),
            _ => Err(BoshError::Refused {
                step,
                condition: stanza_error_condition(&answer),
            }),
        }
    }
}

/// The defined condition of a stanza's `<error/>`, or `undefined-condition`.
pub(crate) fn stanza_error_condition(stanza: &Element) -> String {
    stanza
        .child("error", ns::CLIENT)
        .and_then(|e| {
            e.elements()
                .find(|c| c.ns == ns::STANZAS && c.name != "text")
        })
        .map_or_else(|| "undefined-condition".to_owned(), |c| c.name.clone())
}
