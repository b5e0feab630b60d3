//! boshmux keeps one XMPP session per user alive over BOSH and lets every page that user has
//! open share it over WebSocket (RFC 7395).
//!
//! Module map:
//! - [`config`]: settings from file, environment and flags.
//! - [`xmpp`]: element tree, strict parser, JIDs, namespaces, client SASL.
//! - [`bosh`]: the upstream BOSH client that owns one user's session.
//! - [`fake_cm`]: a scriptable BOSH connection manager for tests and the demo.

pub mod bosh;
pub mod config;
pub mod fake_cm;
pub mod xmpp;
