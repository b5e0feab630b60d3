//! boshmux keeps one XMPP session per user alive over BOSH and lets every page that user has
//! open share it over WebSocket (RFC 7395).
//!
//! Module map:
//! - [`config`]: settings from file, environment and flags.
//! - [`xmpp`]: element tree, strict parser, JIDs, namespaces, client SASL.
//! - [`bosh`]: the upstream BOSH client that owns one user's session.
//! - [`session`]: one actor per user: the upstream session, its pages, the multiplexing rules.
//! - [`page`]: one WebSocket per page: RFC 7395 handshake, checks on what pages send.
//! - [`http`]: the router, the handoff API and the WebSocket endpoint.
//! - [`load`]: `boshmux load`, the load tester, with a direct-BOSH baseline.
//! - [`metrics`]: counters and histograms for `GET /metrics`.
//! - [`state`]: the state file that lets a restart keep every session (SPEC §8).
//! - [`server`]: `boshmux serve`: build, run, stop.
//! - [`fake_cm`]: a scriptable BOSH connection manager for tests and the demo.
//! - [`demo`]: `boshmux demo`: the daemon, the fake as a development server, and a demo page.

pub mod bosh;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod fake_cm;
pub mod http;
pub mod load;
pub mod metrics;
pub mod page;
pub mod server;
pub mod session;
pub mod store;
pub mod xmpp;
