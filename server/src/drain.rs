//! Leaving without an outage, on a cluster on PostgreSQL (see `docs/cluster.md`).
//!
//! `POST /admin/drain` (what `tether-server drain` sends) asks the active node to move its
//! work to a standby before maintenance; a stop signal does the same on its way out. Either
//! way the node stops taking agents, closes every session and relay link (their peers resume
//! from their journals), then hands the lease to the standby heard from most recently
//! ([`PgStore::hand_over_lease`]): that node takes over at its next look, within a second,
//! instead of waiting for the lease to run out, and this one can commit nothing more. A
//! drained node then starts over in place and waits as a standby; a stopped one exits.
//!
//! The departure itself runs in the listeners' stop task (`run::serve`); this module holds the
//! request, its answer and the flag that keeps the lease loop from stepping down meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use tether_shared::journal::{LeaseHolder, PgStore};
use tokio::sync::{mpsc, oneshot};

use crate::api_error::ApiError;
use crate::state::AppState;

/// The answer to a drain: the node that took over, or why nobody did.
pub type Outcome = Result<LeaseHolder, String>;

/// A drain asked for, with where its answer goes.
pub type Request = oneshot::Sender<Outcome>;

/// A drain asked of a member (on its operators' port, `lease::Standby`): it stops taking
/// agents and closes its sessions (they go to their next upstream); the answer is how many
/// it closed. It holds no lease to hand over, and stays up, drained, until it is stopped.
pub type MemberRequest = oneshot::Sender<usize>;

/// This node's way out, shared by the drain endpoint, the stop task and the lease loop.
#[derive(Clone)]
pub struct Drain {
    store: Arc<PgStore>,
    requests: mpsc::Sender<Request>,
    /// Set while this node hands its lease over (and for good once it did): losing the lease
    /// is then expected, not a reason to step down.
    leaving: Arc<AtomicBool>,
    /// The lease was handed over on a drain: the node starts over as a standby.
    drained: Arc<AtomicBool>,
}

impl Drain {
    /// The handle, and the receiver of drain requests that the stop task listens on.
    pub fn new(store: Arc<PgStore>) -> (Drain, mpsc::Receiver<Request>) {
        let (requests, received) = mpsc::channel(1);
        let drain = Drain {
            store,
            requests,
            leaving: Arc::default(),
            drained: Arc::default(),
        };
        (drain, received)
    }

    /// Whether this node is handing its lease over (or did).
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Whether a drain handed the lease over.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Hands the lease to a standby, once this node's sessions are closed. `Ok(None)`: no
    /// standby was heard from; the node stays active (and `is_leaving` is cleared).
    pub async fn hand_over(&self, on_drain: bool) -> Result<Option<LeaseHolder>, String> {
        self.leaving.store(true, Ordering::Release);
        let store = self.store.clone();
        let handed = web::block(move || store.hand_over_lease())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match &handed {
            Ok(Some(heir)) => {
                tracing::info!(heir = %heir.holder, epoch = heir.epoch, drain = on_drain, "lease-handed-over");
                if on_drain {
                    self.drained.store(true, Ordering::Release);
                }
            }
            Ok(None) => {
                tracing::warn!("lease-not-handed-over-no-standby");
                self.leaving.store(false, Ordering::Release);
            }
            Err(e) => {
                // Handed over or not, the lease loop finds out at its next turn.
                tracing::error!(error = %e, "lease-hand-over-failed");
                self.leaving.store(false, Ordering::Release);
            }
        }
        handed
    }
}

/// Longest a drain request waits for the stop task's answer (closing sessions and one
/// database statement).
pub const DRAIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST /admin/drain`: moves this node's agents and its lease to a standby. `200` with the
/// node that took over; `409` when this node is not one of a cluster, or no standby was heard
/// from within a lease (nothing is closed then).
pub async fn drain(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let (Some(drain), Some(cluster)) = (&state.drain, &state.cluster) else {
        return Err(ApiError::Conflict(
            "this server runs on its embedded journal: only a node of a cluster on PostgreSQL hands its work to another (docs/cluster.md)".into(),
        ));
    };
    let ttl_ms = i64::try_from(cluster.lease_ttl_ms).unwrap_or(i64::MAX);
    let standby = cluster
        .nodes
        .list()
        .into_iter()
        .any(|n| n.role == "standby" && n.node != cluster.node && n.seen_ms_ago < ttl_ms);
    if !standby {
        return Err(ApiError::Conflict(format!(
            "no standby was heard from within the lease ({ttl_ms} ms): nothing would take over from {}; start another node first",
            cluster.node
        )));
    }
    if drain.is_leaving() {
        return Err(ApiError::Conflict(format!(
            "{} is already handing its work over",
            cluster.node
        )));
    }
    let (reply, answer) = oneshot::channel();
    drain
        .requests
        .try_send(reply)
        .map_err(|_| ApiError::Conflict("a drain is already under way".into()))?;
    let outcome = tokio::time::timeout(DRAIN_ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| {
            ApiError::Conflict("the drain did not finish in time: see the server's log".into())
        })?
        .map_err(|_| ApiError::Conflict("the server is stopping".into()))?;
    match outcome {
        Ok(heir) => Ok(HttpResponse::Ok().json(json!({
            "node": cluster.node,
            "handed_to": heir.holder,
            "epoch": heir.epoch,
        }))),
        Err(why) => Err(ApiError::Conflict(why)),
    }
}

/// Mounts `POST /admin/drain`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/admin/drain")
            .route(web::post().to(drain))
            .default_service(web::to(crate::api_error::method_not_allowed)),
    );
}

/// Why `tether-server drain` failed.
#[derive(Debug, thiserror::Error)]
pub enum DrainCliError {
    #[error("{path}: {source} (is the server running with this data directory?)")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Unusable {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("the server at {addr} did not answer: {source}")]
    Unreachable {
        addr: std::net::SocketAddr,
        source: tether_shared::https::HttpsError,
    },
    #[error("the server refused: {message} (HTTP {status})")]
    Refused { status: u16, message: String },
}

/// What `tether-server drain` asks of the node running on `dir`: `POST /admin/drain` on its
/// operators' port (from `ports.json`), with its admin token, trusting its CA. Returns what it
/// did: the node that took over (an active node), or the sessions it closed (a member).
pub fn request_drain(dir: &std::path::Path) -> Result<Drained, DrainCliError> {
    use tether_shared::https::{self, Limits, Request};
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| DrainCliError::Read { path, source })
    };
    let unusable = |name: &str, reason: String| DrainCliError::Unusable {
        path: dir.join(name),
        reason,
    };
    let ports: serde_json::Value = serde_json::from_str(&read(crate::ports::PORTS_FILE)?)
        .map_err(|e| unusable(crate::ports::PORTS_FILE, e.to_string()))?;
    let mut addr: std::net::SocketAddr = ports["https"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| unusable(crate::ports::PORTS_FILE, "no https address".into()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let token = read(crate::init::ADMIN_TOKEN)?;
    let ca = read(crate::init::CA_CERT)?;
    let cert = read(crate::init::SERVER_CERT)?;
    let host = tether_shared::tls::certificate_names(&cert)
        .ok()
        .and_then(|names| names.into_iter().next())
        .ok_or_else(|| unusable(crate::init::SERVER_CERT, "names no host".into()))?;
    let tls = tether_shared::tls::client_config(&ca)
        .map_err(|e| unusable(crate::init::CA_CERT, e.to_string()))?;
    let authorization = format!("Bearer {}", token.trim());
    let response = https::request(
        Arc::new(tls),
        &Request {
            method: "POST",
            host: &host,
            addr: Some(addr),
            port: addr.port(),
            path: "/admin/drain",
            headers: &[("Authorization", &authorization)],
            body: Some(b""),
        },
        &Limits {
            connect_timeout: Duration::from_secs(10),
            total_timeout: DRAIN_ANSWER_TIMEOUT + Duration::from_secs(10),
            max_response_bytes: 64 * 1024,
        },
    )
    .map_err(|source| DrainCliError::Unreachable { addr, source })?;
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    if response.status != 200 {
        return Err(DrainCliError::Refused {
            status: response.status,
            message: body["error"].as_str().map_or_else(
                || String::from_utf8_lossy(&response.body).into_owned(),
                str::to_owned,
            ),
        });
    }
    Ok(match body["sessions_closed"].as_u64() {
        Some(sessions) => Drained::Member { sessions },
        None => Drained::Active {
            heir: body["handed_to"].as_str().unwrap_or_default().to_owned(),
            epoch: body["epoch"].as_i64().unwrap_or_default(),
        },
    })
}

/// What a drain did, as `tether-server drain` tells it.
#[derive(Debug)]
pub enum Drained {
    /// The active node handed its lease to `heir`, at `epoch`.
    Active { heir: String, epoch: i64 },
    /// A member closed its `sessions` and takes no more agents.
    Member { sessions: u64 },
}
