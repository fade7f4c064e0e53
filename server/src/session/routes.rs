//! HTTP routes of the session layer.
//!
//! On the agent-facing listener: `GET /agent/v1/ws`, the agent WebSocket (one `AgentSession`),
//! and `GET /relay/v1/ws`, a relay's link (one `RelaySession` carrying many agents).
//! On the HTTPS listener, behind the admin token (`{id}`: an agent's id or name):
//! `POST /api/v1/agents/{id}/probes`
//! (`{"commands":N,"events":M}`: queue N numbered probe commands and ask the agent for M probe
//! events) and `GET /api/v1/agents/{id}/probes` (what arrived: counts, duplicates, gaps) — an
//! end-to-end check of both journaled streams that operators can run too.

use std::sync::atomic::Ordering;

use actix::Addr;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Deserialize;
use tether_shared::e2e::MAX_SEALED_BYTES;
use tether_shared::frame_guard::FrameGuard;
use tether_shared::mux::{MAX_MUX_BYTES, RELAY_WS_PATH};
use tether_shared::stream::ConnId;

use crate::api_error::parse_json;
use crate::api_error::{method_not_allowed, ApiError};
use crate::session::agent_link::{ObserveLink, QueueProbes};
use crate::session::agent_session::AgentSession;
use crate::session::relay_session::RelaySession;
use crate::session::session_registry::GetLink;
use crate::state::AppState;

/// Mounts `GET /agent/v1/ws` and `GET /relay/v1/ws` (agent-facing listener).
pub fn configure_agent_surface(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/agent/v1/ws")
            .route(web::get().to(agent_ws))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(RELAY_WS_PATH)
            .route(web::get().to(relay_ws))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn relay_ws(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    if let Some(refused) = member_refusal(&state) {
        return Ok(refused);
    }
    let conn = ConnId(state.shared.next_conn.fetch_add(1, Ordering::Relaxed) + 1);
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let session = RelaySession::new(
        state.shared.clone(),
        state.session_registry.clone(),
        conn,
        peer,
    );
    let guarded = FrameGuard::new(stream, MAX_MUX_BYTES as u64);
    ws::WsResponseBuilder::new(session, &req, guarded)
        .frame_size(MAX_MUX_BYTES)
        .start()
}

/// Why this node takes no agent or relay now, as the answer to its upgrade: a member whose
/// active node would not read what it carries (see `crate::mail`), or a drained node. Either
/// way the peer goes to its next upstream.
fn member_refusal(state: &AppState) -> Option<HttpResponse> {
    if state.shared.member && !state.shared.active_takes_members.load(Ordering::Relaxed) {
        return Some(HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(serde_json::json!({"error": "this node is a member of the cluster, but the active node does not have every_node_serves_agents on: connect to the active node"})));
    }
    if state.shared.drained.load(Ordering::Relaxed) {
        return Some(
            HttpResponse::ServiceUnavailable()
                .insert_header(("Retry-After", "5"))
                .json(
                    serde_json::json!({"error": "this node was drained: connect to another node"}),
                ),
        );
    }
    None
}

/// Mounts the probe routes (HTTPS listener).
pub fn configure_api(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/agents/{id}/probes")
            .route(web::post().to(queue_probes))
            .route(web::get().to(get_probes))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn agent_ws(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    if let Some(refused) = member_refusal(&state) {
        return Ok(refused);
    }
    let conn = ConnId(state.shared.next_conn.fetch_add(1, Ordering::Relaxed) + 1);
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let session = AgentSession::new(
        state.shared.clone(),
        state.session_registry.clone(),
        conn,
        peer,
    );
    let guarded = FrameGuard::new(stream, MAX_SEALED_BYTES as u64);
    ws::WsResponseBuilder::new(session, &req, guarded)
        .frame_size(MAX_SEALED_BYTES)
        .start()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeRequest {
    #[serde(default)]
    commands: u64,
    #[serde(default)]
    events: u64,
}

/// Most probes one request may queue.
const MAX_PROBES: u64 = 100_000;

/// The link of the agent `id_or_name` (an id or a name, as every agent route takes).
async fn link_of(
    state: &AppState,
    id_or_name: &str,
) -> Result<Addr<crate::session::agent_link::AgentLink>, ApiError> {
    let agent = state
        .registry
        .resolve_agent(id_or_name)
        .ok_or(ApiError::NotFound)?;
    let id = agent.id.as_str();
    state
        .session_registry
        .send(GetLink {
            agent_id: id.into(),
        })
        .await
        .map_err(|_| ApiError::Unavailable)?
        .map_err(|e| {
            tracing::error!(agent_id = %id, error = %e, "link-unavailable");
            ApiError::Unavailable
        })
}

async fn queue_probes(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let probe: ProbeRequest = parse_json(&body)?;
    if probe.commands > MAX_PROBES || probe.events > MAX_PROBES {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_PROBES} probes each way per request"
        )));
    }
    let id = path.into_inner();
    let link = link_of(&state, &id).await?;
    match link
        .send(QueueProbes {
            commands: probe.commands,
            events: probe.events,
        })
        .await
    {
        Ok(Ok(seq)) => {
            Ok(HttpResponse::Accepted().json(serde_json::json!({"queued_through_seq": seq.0})))
        }
        Ok(Err(e)) => Err(ApiError::Conflict(e.to_string())),
        Err(_) => Err(ApiError::Unavailable),
    }
}

async fn get_probes(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let id = path.into_inner();
    let link = link_of(&state, &id).await?;
    let health = link
        .send(ObserveLink)
        .await
        .map_err(|_| ApiError::Unavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "agent_id": health.agent_id,
        "connected": health.connected,
        "probes": health.probes,
        "unacked_commands": health.unacked_commands,
        "events_received": health.events_received,
    })))
}
