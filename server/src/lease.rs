//! One active server among the nodes of a cluster on PostgreSQL (see `docs/cluster.md`).
//!
//! Before it loads any state, a node takes the lease ([`become_active`]): a standby waits
//! until the active node's lease runs out by the database's clock. Meanwhile it does not listen
//! for agents (they reach the active node, their next `--upstream`), and on the operators'
//! port it answers only that it is a standby and which node is active ([`Standby`]):
//! `/admin/health` with its role, anything else `503`. The active node renews it every third
//! of its length ([`keep`]); every batch it commits checks the lease inside its transaction,
//! so once another node took over, this one can commit (and so acknowledge) nothing more. A
//! node that finds its lease gone steps down: it starts over in place, as a standby.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse};
use serde_json::json;
use tether_shared::h1_tls::{self, Limits};
use tether_shared::journal::{JournalError, Lease, LeaseHolder, NodeSeen, PgStore};

use crate::admin_token::AdminToken;

/// This release, as nodes note it.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every node of the cluster as each last noted itself, refreshed at each turn of this node's
/// lease loop (so `/admin/health` answers without waiting for the database).
#[derive(Clone, Default)]
pub struct Nodes {
    list: Arc<Mutex<Vec<NodeSeen>>>,
    /// A refresh is under way (a database that hangs holds at most one thread).
    busy: Arc<std::sync::atomic::AtomicBool>,
    /// Counts the agents and relays connected to this node (none on a standby).
    sessions: Arc<std::sync::OnceLock<SessionCount>>,
    /// Told the list each time it is read (see [`Nodes::when_listed`]).
    listed: Arc<std::sync::OnceLock<ListedHook>>,
    /// This node's operators' address, as it advertises it (empty: none).
    url: Arc<str>,
}

/// Counts this node's sessions when it notes itself.
type SessionCount = Box<dyn Fn() -> u64 + Send + Sync>;
type ListedHook = Box<dyn Fn(&[NodeSeen]) + Send + Sync>;

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nodes").field("list", &self.list()).finish()
    }
}

impl Nodes {
    /// The list of a node that advertises `url` as its operators' address (`storage.node_url`).
    pub fn advertising(url: Option<&str>) -> Nodes {
        Nodes {
            url: url.unwrap_or_default().into(),
            ..Nodes::default()
        }
    }

    /// Notes this node (`role`, its sessions, its address) and reads every node's line; a
    /// database that does not answer leaves the last list (and is the lease loop's and the
    /// batches' concern).
    fn refresh(&self, store: &PgStore, node: &str, role: &str) {
        let sessions = self.sessions.get().map_or(0, |count| count());
        let seen = NodeSeen {
            node: node.to_owned(),
            role: role.to_owned(),
            version: VERSION.to_owned(),
            sessions: i64::try_from(sessions).unwrap_or(i64::MAX),
            url: self.url.to_string(),
            seen_ms_ago: 0,
        };
        let listed = store.note_node(&seen).and_then(|()| store.nodes());
        match listed {
            Ok(list) => {
                if let Some(hook) = self.listed.get() {
                    hook(&list);
                }
                *self.list.lock().unwrap_or_else(PoisonError::into_inner) = list;
            }
            Err(e) => tracing::warn!(node = %node, error = %e, "cluster-nodes-not-refreshed"),
        }
    }

    /// From now on this node notes `count()` as its sessions (set once, when it serves).
    pub fn count_sessions_with(&self, count: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.sessions.set(Box::new(count));
    }

    /// From now on `hook` is told the list each time it is read (set once, when it serves).
    pub fn when_listed(&self, hook: impl Fn(&[NodeSeen]) + Send + Sync + 'static) {
        let _ = self.listed.set(Box::new(hook));
    }

    pub fn list(&self) -> Vec<NodeSeen> {
        self.list
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refreshes on a blocking thread, apart from the caller (the lease's renewal does not
    /// wait for it); skipped while the last one is still under way.
    fn refresh_apart(&self, store: Arc<PgStore>, node: String, role: &'static str) {
        use std::sync::atomic::Ordering;
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let nodes = self.clone();
        actix_rt::spawn(async move {
            let busy = nodes.busy.clone();
            let _ = web::block(move || nodes.refresh(&store, &node, role)).await;
            busy.store(false, Ordering::Release);
        });
    }
}

impl PartialEq for Nodes {
    fn eq(&self, other: &Self) -> bool {
        self.list() == other.list()
    }
}

impl Eq for Nodes {}

impl serde::Serialize for Nodes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list().serialize(s)
    }
}

/// What the operators' port of a standby answers from.
#[derive(Clone)]
struct Seen {
    node: String,
    /// `standby`, or `member` (it serves agents meanwhile).
    role: &'static str,
    active: Arc<Mutex<Option<LeaseHolder>>>,
    nodes: Nodes,
    token: AdminToken,
    /// A member's way to its stop task (`POST /admin/drain`); `None` on a standby.
    drains: Option<tokio::sync::mpsc::Sender<crate::drain::MemberRequest>>,
    /// A member was drained: it takes no more agents.
    drained: Arc<std::sync::atomic::AtomicBool>,
}

impl Seen {
    fn active(&self) -> Option<LeaseHolder> {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

async fn standby_health(req: HttpRequest, seen: web::Data<Seen>) -> HttpResponse {
    if let Err(e) = seen.token.check(&req) {
        return actix_web::ResponseError::error_response(&e);
    }
    let active = seen.active();
    HttpResponse::Ok().json(json!({"cluster": {
        "role": seen.role,
        "node": seen.node,
        "drained": seen.drained.load(std::sync::atomic::Ordering::Relaxed),
        "active": active.map(|h| json!({
            "node": h.holder,
            "epoch": h.epoch,
            "lease_expires_in_ms": h.expires_in_ms,
        })),
        "nodes": seen.nodes,
    }}))
}

/// `POST /admin/drain` on a member (`tether-server drain`): it stops taking agents and closes
/// the sessions it serves (they go to their next upstream), then answers how many it closed;
/// on a standby, a refusal like any other request.
async fn member_drain(req: HttpRequest, seen: web::Data<Seen>) -> HttpResponse {
    let Some(drains) = &seen.drains else {
        return standby_refusal(req, seen).await;
    };
    if let Err(e) = seen.token.check(&req) {
        return actix_web::ResponseError::error_response(&e);
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    if drains.try_send(reply).is_err() {
        return HttpResponse::Conflict().json(json!({"error": "a drain is already under way"}));
    }
    match tokio::time::timeout(crate::drain::DRAIN_ANSWER_TIMEOUT, answer).await {
        Ok(Ok(sessions)) => {
            seen.drained
                .store(true, std::sync::atomic::Ordering::Relaxed);
            HttpResponse::Ok().json(json!({
                "node": seen.node,
                "role": seen.role,
                "sessions_closed": sessions,
            }))
        }
        Ok(Err(_)) => HttpResponse::Conflict().json(json!({"error": "the server is stopping"})),
        Err(_) => HttpResponse::Conflict()
            .json(json!({"error": "the drain did not finish in time: see the server's log"})),
    }
}

/// Every request but `/admin/health`: `307` to the active node's address when it advertises
/// one (`storage.node_url`: same path and query; the client decides whether to follow and to
/// send its credentials there), `503` naming it otherwise.
async fn standby_refusal(req: HttpRequest, seen: web::Data<Seen>) -> HttpResponse {
    let active = seen.active().map(|h| h.holder);
    let url = active.as_ref().and_then(|holder| {
        seen.nodes
            .list()
            .into_iter()
            .find(|n| &n.node == holder && !n.url.is_empty())
            .map(|n| n.url)
    });
    if let (Some(node), Some(url)) = (&active, &url) {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        return HttpResponse::TemporaryRedirect()
            .insert_header((actix_web::http::header::LOCATION, format!("{url}{path}")))
            .json(json!({
                "error": format!("this node ({}) is a {}; the active server is {node}, at {url}", seen.node, seen.role),
                "cluster": {"role": seen.role, "active": node, "url": url},
            }));
    }
    let error = match &active {
        Some(node) => format!(
            "this node ({}) is a {}; the active server is {node}",
            seen.node, seen.role
        ),
        None => format!(
            "this node ({}) is a {}; no server is active yet",
            seen.node, seen.role
        ),
    };
    HttpResponse::ServiceUnavailable()
        .insert_header(("Retry-After", "5"))
        .json(json!({"error": error, "cluster": {"role": seen.role, "active": active}}))
}

/// The operators' port of a node waiting for the lease, on a thread of its own.
pub struct Standby {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    active: Arc<Mutex<Option<LeaseHolder>>>,
    nodes: Nodes,
    role: &'static str,
    /// Where it listens.
    pub addr: SocketAddr,
    /// When the database last answered its look at the lease.
    heard: Arc<Mutex<std::time::Instant>>,
    /// Set when the node stops: a member's wait for the lease ends (see
    /// [`Standby::wait_as_member`]).
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// The active node's lease epoch, as last seen.
    epochs: tokio::sync::watch::Sender<i64>,
}

impl Standby {
    /// Listens on `addr` (the operators' HTTPS port) until [`Standby::stop`]: as a member if
    /// it is given where drains go (`POST /admin/drain`), as a standby otherwise.
    pub fn serve(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        limits: Limits,
        node: &str,
        url: Option<&str>,
        token: AdminToken,
        drains: Option<tokio::sync::mpsc::Sender<crate::drain::MemberRequest>>,
    ) -> std::io::Result<Standby> {
        // A member (it serves agents meanwhile) is the node that can be drained.
        let role = match drains {
            Some(_) => "member",
            None => "standby",
        };
        let active = Arc::new(Mutex::new(None));
        let nodes = Nodes::advertising(url);
        let seen = Seen {
            role,
            node: node.to_owned(),
            active: active.clone(),
            nodes: nodes.clone(),
            token,
            drains,
            drained: Arc::default(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, bound_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let server = h1_tls::bind(addr, tls, &limits, move || {
                        App::new()
                            .app_data(web::Data::new(seen.clone()))
                            .route("/admin/health", web::get().to(standby_health))
                            .route("/admin/drain", web::post().to(member_drain))
                            .default_service(web::to(standby_refusal))
                    });
                    let server = match server {
                        Ok((server, addr)) => {
                            let _ = bound.send(Ok(addr));
                            server
                        }
                        Err(e) => {
                            let _ = bound.send(Err(e));
                            return;
                        }
                    };
                    let handle = server.handle();
                    actix_rt::spawn(async move {
                        let _ = stopped.await;
                        handle.stop(false).await;
                    });
                    let _ = server.await;
                })
            })?;
        let addr = bound_rx
            .recv()
            .map_err(|_| std::io::Error::other("the standby listener thread ended"))??;
        Ok(Standby {
            stop: Some(stop),
            thread: Some(thread),
            active,
            nodes,
            role,
            addr,
            heard: Arc::new(Mutex::new(std::time::Instant::now())),
            stopping: Arc::default(),
            epochs: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The cluster's nodes as this one last read them (and its own session count, once set).
    pub fn nodes(&self) -> Nodes {
        self.nodes.clone()
    }

    /// A member's wait for the lease, on a thread of its own: the answer comes once this node
    /// holds the lease (then it starts over as the active node), or the database refused; and
    /// when the database last answered it (see [`cut_off`]).
    pub fn wait_as_member(self, store: Arc<PgStore>, node: &str, ttl: Duration) -> MemberWait {
        let heard = self.heard.clone();
        let stopping = self.stopping.clone();
        let epochs = self.epochs.subscribe();
        let (taken, answer) = tokio::sync::oneshot::channel();
        let node = node.to_owned();
        let spawned = std::thread::Builder::new()
            .name("member-lease".into())
            .spawn(move || {
                let lease = become_active(&store, &node, ttl, Some(&self));
                self.stop();
                let _ = taken.send(lease);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "member-cannot-wait-for-the-lease");
        }
        MemberWait {
            taken: answer,
            heard,
            stopping,
            epochs,
        }
    }

    fn saw(&self, holder: LeaseHolder) {
        self.epochs.send_if_modified(|seen| {
            let changed = *seen != holder.epoch;
            *seen = holder.epoch;
            changed
        });
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = Some(holder);
    }

    /// Stops listening (the active server binds the port next).
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits (blocking) until this node holds the lease; logs who holds it meanwhile and tells
/// `standby` (if any).
/// A member's wait for the lease, as [`Standby::wait_as_member`] started it.
pub struct MemberWait {
    /// Answered once this node holds the lease, or the database refused.
    pub taken: tokio::sync::oneshot::Receiver<Result<Lease, JournalError>>,
    /// When the database last answered (see [`cut_off`]).
    pub heard: Arc<Mutex<std::time::Instant>>,
    /// Set it to end the wait (the node stops).
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    /// The active node's lease epoch, each time another node takes over.
    pub epochs: tokio::sync::watch::Receiver<i64>,
}

/// Resolves once the database has not answered a member's look at the lease (see
/// [`Standby::wait_as_member`]) for a whole lease: the member is cut off from it, and commits
/// (so acknowledges) nothing for the agents it serves, which should go to another node.
pub async fn cut_off(heard: Arc<Mutex<std::time::Instant>>, ttl: Duration) -> JournalError {
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(ttl / 4));
    loop {
        tick.tick().await;
        let silent = heard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        if silent > ttl {
            return JournalError::Database {
                reason: format!(
                    "no answer from the database for {} ms: this member lets its agents go",
                    silent.as_millis()
                ),
            };
        }
    }
}

pub fn become_active(
    store: &PgStore,
    node: &str,
    ttl: Duration,
    standby: Option<&Standby>,
) -> Result<Lease, JournalError> {
    let mut seen: Option<(String, i64)> = None;
    // When this standby last noted itself in the node list.
    let mut noted: Option<std::time::Instant> = None;
    loop {
        if standby.is_some_and(|s| s.stopping.load(std::sync::atomic::Ordering::Acquire)) {
            return Err(JournalError::Closed);
        }
        let looked = match store.acquire_lease(node, ttl) {
            // A member keeps serving through a passing failure: it lets its agents go only
            // once the database has been silent for a lease (see `cut_off`).
            Err(e) if standby.is_some_and(|s| s.role == "member") => {
                tracing::warn!(node = %node, error = %e, "member-cannot-look-at-the-lease");
                std::thread::sleep((ttl / 3).min(Duration::from_secs(1)));
                continue;
            }
            looked => looked?,
        };
        match looked {
            Ok(lease) => return Ok(lease),
            Err(holder) => {
                let now = (holder.holder.clone(), holder.epoch);
                if seen.as_ref() != Some(&now) {
                    tracing::info!(node = %node, active = %holder.holder, epoch = holder.epoch, expires_in_ms = holder.expires_in_ms, "standby-waiting-for-the-lease");
                    seen = Some(now);
                }
                if let Some(standby) = standby {
                    *standby.heard.lock().unwrap_or_else(PoisonError::into_inner) =
                        std::time::Instant::now();
                    standby.saw(holder.clone());
                    if noted.is_none_or(|at| at.elapsed() >= ttl / 3) {
                        standby.nodes.refresh(store, node, standby.role);
                        noted = Some(std::time::Instant::now());
                    }
                }
                // Look again when it would run out, and at least every third of a lease.
                let until = u64::try_from(holder.expires_in_ms).unwrap_or(0);
                let wait = Duration::from_millis(until.clamp(100, 1_000)).min(ttl / 3);
                std::thread::sleep(wait.max(Duration::from_millis(50)));
            }
        }
    }
}

/// Renews the lease every third of its length, for as long as the server runs; once it is
/// lost, steps down (starts over in place, as a standby). A database that does not answer is
/// tried again at the next turn: meanwhile the batches' own check keeps this node from
/// committing past the lease's end. A node that could not renew its lease before it would
/// have run out (the database unreachable, or silent) steps down as well, by its own clock:
/// another node may take over from then on, and this one must not keep its agents waiting on
/// commits it can no longer make.
/// Each turn also notes this node in the cluster's node list and reads it into `nodes`. Once
/// `drain` is handing the lease over (or did), losing it is expected: the loop ends quietly
/// and the node's way out is the stop task's.
pub async fn keep(store: Arc<PgStore>, lease: Lease, nodes: Nodes, drain: crate::drain::Drain) {
    let mut tick = tokio::time::interval(lease.ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // By this node's clock, the lease runs at least until then.
    let mut held_until = lease.taken + lease.ttl;
    loop {
        tick.tick().await;
        if drain.is_leaving() {
            continue;
        }
        let s = store.clone();
        let sent = std::time::Instant::now();
        // A renewal that hangs (a network that drops everything) is waited for only until the
        // lease would run out, yet always a third of a lease: a renewal that succeeds late (a
        // start that loaded a long history) still proves that nobody took the lease over.
        let wait = held_until
            .saturating_duration_since(sent)
            .max(lease.ttl / 3);
        let renewal = tokio::time::timeout(wait, web::block(move || s.renew_lease())).await;
        match renewal {
            Ok(Ok(Ok(()))) => {
                held_until = sent + lease.ttl;
                nodes.refresh_apart(store.clone(), lease.holder.clone(), "active");
            }
            Ok(Ok(Err(JournalError::Poisoned { .. }))) if drain.is_leaving() => {}
            Ok(Ok(Err(JournalError::Poisoned { reason }))) => {
                tracing::error!(node = %lease.holder, epoch = lease.epoch, reason = %reason, "lease-lost-stepping-down");
                step_down();
                return;
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(node = %lease.holder, epoch = lease.epoch, error = %e, "lease-renewal-failed")
            }
            Ok(Err(_)) | Err(_) => {}
        }
        if std::time::Instant::now() >= held_until && !drain.is_leaving() {
            tracing::error!(node = %lease.holder, epoch = lease.epoch, ttl_ms = lease.ttl.as_millis() as u64, "lease-unrenewed-stepping-down");
            step_down();
            return;
        }
    }
}

/// Starts this process over in place: it closes every session and listener, and waits as a
/// standby (or, with the database out of reach, exits with the cause after its connection
/// timeout, for its service manager to start it again).
fn step_down() {
    let e = tether_shared::storage::restart_in_place();
    tracing::error!(error = %e, "restart-failed");
}
