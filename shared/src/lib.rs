//! `tether-shared`: everything the server, the agent and the relay have in common.
//!
//! # Layout
//! - [`protocol`]: the v1 wire frames, their limits and the decoder that never panics.
//! - [`stream`]: the sans-IO stream core (sequence numbers, retention, acks, resync).
//! - [`link`]: the edge's receiving half of a stream: bytes in, journal ops or a typed error out.
//! - [`journal`]: the durable, group-committed `Journal` actor over sled.
//! - [`agent_auth`]: agent-signed HTTPS requests (bulk downloads through any relay).
//! - [`backoff`]: retry delays with full jitter and sliding-window restart budgets.
//! - [`clock`]: the one wall clock (milliseconds and seconds since the Unix epoch).
//! - [`close`]: WebSocket close codes by meaning, and close reasons cut to fit.
//! - [`config`]: layered configuration loading and validation for the three binaries.
//! - [`tls`]: rustls server and client configurations, CA and certificate generation.
//! - [`identity`]: Ed25519 key pairs for agents, relays and the server's signing key.
//! - [`enroll`]: the enrollment request and answer, roles, name rules, upstream URLs.
//! - [`facts`]: what an agent reports of its machine (OS, architecture, memory, ...).
//! - [`plugin`]: plugin manifests (`plugin.toml`) and bundle inspection (tar.gz), every problem at once.
//! - [`frame_guard`]: refuses an oversized WebSocket frame by its header, before buffering it
//!   (the server's and the relay's WebSocket listeners).
//! - [`metrics`]: Prometheus text: histograms, bounded counters, the `process_*` families.
//! - [`mux`]: the relay link's framing (many agents' channels over one WebSocket).
//! - [`https`]: a minimal blocking HTTPS client for one-shot requests (install, tests).
//! - [`proxy`]: egress through an HTTP proxy (CONNECT) for the upstream WebSocket and downloads.
//! - [`state_file`]: the JSON state file an install writes last (`agent.json`, `relay.json`).
//! - [`unpack`]: safe extraction of `.tar.gz` and `.zip` archives (artifacts, bundles).
//! - [`upgrade`]: agent upgrade packages: versions and the server's signature over them.
//! - [`trust`]: the keys and CAs an agent or relay trusts, replaced by the server (rollover).

pub mod agent_auth;
pub mod authority;
pub mod backoff;
pub mod clock;
pub mod close;
pub mod config;
pub mod dialer;
pub mod e2e;
pub mod enroll;
pub mod facts;
pub mod frame_guard;
pub mod h1_tls;
pub mod https;
pub mod identity;
pub mod ids;
pub mod journal;
pub mod link;
pub mod mask;
pub mod metrics;
pub mod mux;
pub mod plugin;
pub mod protocol;
pub mod proxy;
pub mod sealing;
pub mod server_url;
pub mod state_file;
pub mod storage;
pub mod stream;
pub mod tls;
pub mod trust;
pub mod unpack;
pub mod upgrade;
pub mod utf8_stream;
pub mod ws_dial;
pub mod ws_inbound;
