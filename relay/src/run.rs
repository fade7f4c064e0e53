//! `tether-relay run`: the relay's actor system. Two listeners:
//! - downstream (`listen.downstream`, default 0.0.0.0:20080, TLS with the certificate the
//!   server's relay CA signed at install): the same agent-facing surface as the server's 7919, so a
//!   relay and a server are interchangeable upstreams: `GET /agent/v1/ws` (agents),
//!   `GET /relay/v1/ws` (child relays), `POST /agent/v1/enroll` and the bulk downloads;
//! - admin (`listen.admin`, loopback only, plain HTTP): `GET /admin/health`, `GET /metrics`.
//!
//! Both bound addresses go to `DIR/ports.json` (`{"downstream":..,"admin":..}`) once listening.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_web_actors::ws;
use serde::Serialize;
use tether_shared::config::RelayConfig;
use tether_shared::e2e::MAX_SEALED_BYTES;
use tether_shared::enroll::{Upstream as UpstreamUrl, WS_PATH};
use tether_shared::frame_guard::FrameGuard;
use tether_shared::h1_tls::{self, Limits};
use tether_shared::identity::{write_file_atomic, Identity};
use tether_shared::mux::{MAX_MUX_BYTES, RELAY_WS_PATH};
use tether_shared::tls;
use tether_shared::trust::Pinned;
use tokio::signal::unix::{signal, SignalKind};

use crate::bulk::{self, Bulk};
use crate::certificate::Certificate;
use crate::child_relay::ChildRelay;
use crate::downstream::{AgentDown, DownConfig};
use crate::state::{RelayState, CACHE_DIR, CA_FILE, KEY_FILE, TLS_CERT_FILE, TLS_KEY_FILE};
use crate::upgrade::{Running, Upgrader, UpgraderConfig};
use crate::upstream::{ObserveUpstream, SetUpgrader, Upstream, UpstreamConfig, UpstreamHealth};

/// File name of the bound addresses inside the data directory.
pub const PORTS_FILE: &str = "ports.json";
/// Reconnect delays towards the upstream.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Why the relay could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Tls {
        what: &'static str,
        source: tls::TlsError,
    },
    #[error("relay key: {0}")]
    Key(#[from] tether_shared::identity::IdentityError),
    /// `ca.pem`, the pinned signing key or `trust.json` is unusable.
    #[error("trust: {0}")]
    Trust(#[from] tether_shared::trust::TrustError),
    #[error("{}: {reason}", url)]
    Upstream { url: String, reason: String },
    #[error("cache {}: {source}", path.display())]
    Cache { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Ports { path: PathBuf, source: io::Error },
    #[error("{listener} listener: {source}")]
    Serve {
        listener: &'static str,
        source: io::Error,
    },
}

#[derive(Debug, Serialize)]
struct Ports {
    downstream: SocketAddr,
    admin: SocketAddr,
}

/// What the admin endpoint reads.
struct AdminState {
    certificate: Arc<Certificate>,
    relay_id: String,
    name: String,
    version: String,
    started: Instant,
    upstream: Addr<Upstream>,
    bulk: web::Data<Bulk>,
}

/// Runs the relay from `dir` until SIGTERM or SIGINT.
pub fn run(cfg: &RelayConfig, dir: &Path) -> Result<(), RunError> {
    let state = RelayState::load(dir)?;
    // First of all: a pending upgrade's rollback, or the newer version to become.
    let running = crate::upgrade::startup(dir, &state.relay_id);
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| RunError::Read { path, source })
    };
    let trust = Arc::new(Pinned::load(dir, CA_FILE, &state.server_signing_key)?);
    let client_tls = trust.tls_source();
    let certificate = Arc::new(
        Certificate::new(
            dir.join(TLS_CERT_FILE),
            read(TLS_CERT_FILE)?,
            read(TLS_KEY_FILE)?,
            client_tls.clone(),
        )
        .map_err(|source| RunError::Tls {
            what: "relay certificate",
            source,
        })?,
    );
    let server_tls = certificate
        .served()
        .server_config()
        .map_err(|source| RunError::Tls {
            what: "relay certificate",
            source,
        })?;
    let identity = Identity::load(&dir.join(KEY_FILE))?;
    // Configured upstreams (config or env) override the ones install recorded.
    let upstreams = if cfg.relay.upstreams.is_empty() {
        state.upstreams.clone()
    } else {
        cfg.relay.upstreams.clone()
    };
    let parsed = upstreams
        .iter()
        .map(|u| {
            UpstreamUrl::parse(u).map_err(|reason| RunError::Upstream {
                url: u.clone(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cache_dir = dir.join(CACHE_DIR);
    let bulk = Bulk::new(
        parsed,
        client_tls.clone(),
        cache_dir.clone(),
        cfg.relay.cache_max_bytes,
    )
    .map_err(|source| RunError::Cache {
        path: cache_dir,
        source,
    })?;
    let _ = std::fs::remove_file(dir.join(PORTS_FILE));
    let upstream_cfg = UpstreamConfig {
        upstreams: upstreams
            .iter()
            .map(|u| UpstreamUrl::parse(u).map_or_else(|_| u.clone(), |p| p.base_url()))
            .collect(),
        trust: trust.clone(),
        identity,
        relay_id: state.relay_id.clone(),
        version: running.version.clone(),
        heartbeat_interval: cfg.relay.heartbeat_interval,
        reconnect_min: RECONNECT_MIN,
        reconnect_max: RECONNECT_MAX,
    };
    let upgrader_cfg = UpgraderConfig {
        dir: dir.to_owned(),
        relay_id: state.relay_id.clone(),
        identity: Arc::new(Identity::load(&dir.join(KEY_FILE))?),
        trust,
        running: running.clone(),
        certificate: certificate.clone(),
        healthy_after: cfg.relay.upgrade_healthy_after,
        trial_timeout: cfg.relay.upgrade_trial_timeout,
    };
    tracing::info!(relay_id = %state.relay_id, name = %state.name, version = %running.version, trial = running.trial, upstreams = ?upstreams, "relay-starting");
    actix_rt::System::new().block_on(serve(
        cfg,
        dir,
        state,
        upstream_cfg,
        bulk,
        server_tls,
        upgrader_cfg,
    ))
}

async fn serve(
    cfg: &RelayConfig,
    dir: &Path,
    state: RelayState,
    upstream_cfg: UpstreamConfig,
    bulk: Bulk,
    server_tls: rustls::ServerConfig,
    upgrader_cfg: UpgraderConfig,
) -> Result<(), RunError> {
    let Running { version, .. } = upgrader_cfg.running.clone();
    let upgrader_certificate = upgrader_cfg.certificate.clone();
    let upstream = Upstream::new(upstream_cfg).start();
    let bulk = web::Data::new(bulk);
    let upgrader = Upgrader::new(upgrader_cfg, upstream.clone(), bulk.clone()).start();
    upstream.do_send(SetUpgrader(upgrader.recipient()));
    let down_cfg = Arc::new(DownConfig {
        max_queue: cfg.relay.max_queue_per_agent,
    });
    let upstream_data = web::Data::new(upstream.clone());
    let down_data = web::Data::new(down_cfg);
    let bulk_data = bulk.clone();
    // HTTP/1.1 only (see `tether_shared::h1_tls`).
    let limits = Limits {
        tls_handshake_timeout: Duration::from_secs(10),
        client_request_timeout: Duration::from_secs(10),
        client_disconnect_timeout: Duration::from_secs(2),
        keep_alive: Duration::from_secs(30),
        max_tls_handshakes_per_worker: 256,
        max_connections_per_worker: 50_000,
        backlog: 4096,
        shutdown_timeout_s: 2,
        workers: None,
        max_connections_per_source: 50_000,
        max_handshakes_per_source: 128,
    };
    let (downstream, downstream_addr) =
        h1_tls::bind(cfg.listen.downstream, server_tls, &limits, move || {
            App::new()
                .app_data(upstream_data.clone())
                .app_data(down_data.clone())
                .app_data(bulk_data.clone())
                .route(WS_PATH, web::get().to(agent_ws))
                .route(RELAY_WS_PATH, web::get().to(child_ws))
                .configure(bulk::configure)
        })
        .map_err(|source| RunError::Bind {
            listener: "downstream",
            addr: cfg.listen.downstream,
            source,
        })?;
    let admin_state = web::Data::new(AdminState {
        certificate: upgrader_certificate,
        relay_id: state.relay_id.clone(),
        name: state.name.clone(),
        version,
        started: Instant::now(),
        upstream: upstream.clone(),
        bulk,
    });
    let admin = HttpServer::new(move || {
        App::new()
            .app_data(admin_state.clone())
            .route("/admin/health", web::get().to(health))
            .route("/metrics", web::get().to(metrics))
    })
    .workers(1)
    .shutdown_timeout(1)
    .disable_signals()
    .bind(cfg.listen.admin)
    .map_err(|source| RunError::Bind {
        listener: "admin",
        addr: cfg.listen.admin,
        source,
    })?;
    let first =
        |addrs: Vec<SocketAddr>, fallback: SocketAddr| addrs.first().copied().unwrap_or(fallback);
    let ports = Ports {
        downstream: downstream_addr,
        admin: first(admin.addrs(), cfg.listen.admin),
    };
    let admin = admin.run();
    let (down_handle, admin_handle) = (downstream.handle(), admin.handle());
    let ports_path = dir.join(PORTS_FILE);
    let text = serde_json::to_vec(&ports).unwrap_or_default();
    write_file_atomic(&ports_path, &text, 0o644).map_err(|source| RunError::Ports {
        path: ports_path.clone(),
        source,
    })?;
    tracing::info!(downstream = %ports.downstream, admin = %ports.admin, "relay-listening");
    let mut terminate = signal(SignalKind::terminate()).map_err(|source| RunError::Serve {
        listener: "signals",
        source,
    })?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| RunError::Serve {
        listener: "signals",
        source,
    })?;
    actix_rt::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("relay-stopping");
        tokio::join!(down_handle.stop(true), admin_handle.stop(true));
    });
    let (down_served, admin_served) = tokio::join!(downstream, admin);
    let _ = std::fs::remove_file(&ports_path);
    down_served.map_err(|source| RunError::Serve {
        listener: "downstream",
        source,
    })?;
    admin_served.map_err(|source| RunError::Serve {
        listener: "admin",
        source,
    })?;
    tracing::info!("relay-stopped");
    Ok(())
}

async fn agent_ws(
    req: HttpRequest,
    stream: web::Payload,
    upstream: web::Data<Addr<Upstream>>,
    cfg: web::Data<Arc<DownConfig>>,
) -> Result<HttpResponse, actix_web::Error> {
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let session = AgentDown::new(upstream.get_ref().clone(), cfg.get_ref().clone(), peer);
    let guarded = FrameGuard::new(stream, MAX_SEALED_BYTES as u64);
    ws::WsResponseBuilder::new(session, &req, guarded)
        .frame_size(MAX_SEALED_BYTES)
        .start()
}

async fn child_ws(
    req: HttpRequest,
    stream: web::Payload,
    upstream: web::Data<Addr<Upstream>>,
) -> Result<HttpResponse, actix_web::Error> {
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let session = ChildRelay::new(upstream.get_ref().clone(), peer);
    let guarded = FrameGuard::new(stream, MAX_MUX_BYTES as u64);
    ws::WsResponseBuilder::new(session, &req, guarded)
        .frame_size(MAX_MUX_BYTES)
        .start()
}

/// `GET /admin/health` (loopback only): the relay's actors, its upstream link and its cache.
/// The served certificate's expiry, as the server's health shows its own.
fn certificate_health(certificate: &Certificate) -> serde_json::Value {
    let now = tether_shared::clock::now_unix_s();
    match certificate.not_after_unix_s() {
        Some(not_after) => serde_json::json!({
            "file": TLS_CERT_FILE,
            "not_after_unix_s": not_after,
            "days_left": (not_after - now).div_euclid(86_400),
        }),
        None => serde_json::Value::Null,
    }
}

/// `GET /metrics`: Prometheus text (see [`crate::metrics`]).
async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    let upstream = observe_upstream(&state).await.ok();
    let text = crate::metrics::render(
        upstream.as_ref(),
        &state.bulk.stats_json(),
        state.certificate.not_after_unix_s(),
    );
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}

/// The upstream actor's figures, or why it did not give them (`stopped`, `timeout`).
async fn observe_upstream(state: &AdminState) -> Result<UpstreamHealth, &'static str> {
    match tokio::time::timeout(Duration::from_secs(2), state.upstream.send(ObserveUpstream)).await {
        Ok(Ok(h)) => Ok(h),
        Ok(Err(_)) => Err("stopped"),
        Err(_) => Err("timeout"),
    }
}

async fn health(state: web::Data<AdminState>) -> HttpResponse {
    let started = Instant::now();
    let (actor_state, upstream) = match observe_upstream(&state).await {
        Ok(h) => ("running", Some(h)),
        Err(why) => (why, None),
    };
    let sessions = upstream.as_ref().map_or(0, |u| u.agents);
    HttpResponse::Ok().json(serde_json::json!({
        "relay_id": state.relay_id,
        "name": state.name,
        "version": state.version,
        "uptime_s": state.started.elapsed().as_secs(),
        "actors": [{
            "name": "upstream",
            "kind": "Upstream",
            "state": actor_state,
            "restarts": 0,
            "last_beat_ms": started.elapsed().as_millis() as u64,
        }],
        "sessions": sessions,
        "upstream": upstream,
        "cache": state.bulk.stats_json(),
        "certificate": certificate_health(&state.certificate),
    }))
}
