//! The enrollment tokens page: what can still enroll an agent or a relay.
//!
//! - `GET /tokens`: every live token by id (role, uses left, expiry, created), never the token
//!   itself; a form to create one; per token a revoke form.
//! - `POST /tokens` (uses, ttl_s, role): creates a token and answers a page that shows it once
//!   (it is not kept anywhere the server could show it again).
//! - `POST /tokens/{id}/revoke`: revokes it at once; peers it already enrolled keep theirs.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::layout::{self, csrf_field, enc, resource};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::api_error::ApiError;
use crate::registry::{Role, TokenInfo};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/tokens")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(resource("/tokens/{id}/revoke").route(web::post().to(revoke)));
}

async fn list(
    user: CurrentUser,
    query: web::Query<layout::Done>,
    state: web::Data<AppState>,
) -> HttpResponse {
    page(&user, &state.registry.tokens(), query.done.as_deref(), None)
}

/// The page; `created` is a token just made (its text and terms), shown this once.
fn page(
    user: &CurrentUser,
    tokens: &[TokenInfo],
    done: Option<&str>,
    created: Option<(&str, &TokenInfo)>,
) -> HttpResponse {
    let now = crate::registry::now_unix_ms();
    layout::page(
        "Enrollment tokens",
        user,
        "/tokens",
        html! {
            (layout::notice(done))
            @if let Some((token, info)) = created {
                div.card #new-token-shown role="status" {
                    p { "New " (info.role) " enrollment token " code { (info.id) } " for " (info.uses_left)
                        " use(s). Copy it now: it is not shown again." }
                    pre #token-text { (token) }
                    p.muted { "Give it to " code { "tether-" (info.role) " install --token-file FILE" }
                        " (a file, or - for standard input, keeps it out of the process list)." }
                }
            }
            @if tokens.is_empty() {
                p.muted { "No enrollment token can enroll anything now." }
            } @else {
                table #tokens {
                    thead { tr { th { "Id" } th { "Role" } th { "Uses left" } th { "Expires in" } th { "Created" } th {} } }
                    tbody { @for t in tokens {
                        tr data-token=(t.id) {
                            td { code { (t.id) } }
                            td { (t.role) }
                            td { (t.uses_left) }
                            td { (layout::duration_ms(t.expires_unix_ms.saturating_sub(now))) }
                            td { (layout::ago(t.created_unix_ms)) }
                            td {
                                form.inline.revoke-token method="post" action={ "/tokens/" (enc(&t.id)) "/revoke" } {
                                    (csrf_field(user))
                                    button.danger type="submit" { "Revoke" }
                                }
                            }
                        }
                    } }
                }
            }
            form.card #new-token method="post" action="/tokens" {
                (csrf_field(user))
                h2 { "New enrollment token" }
                label for="token-role" { "Enrolls" }
                select #token-role name="role" {
                    option value="agent" selected { "an agent" }
                    option value="relay" { "a relay" }
                }
                label for="token-uses" { "Uses" }
                input #token-uses type="number" name="uses" min="1" value="1" required;
                label for="token-ttl" { "Valid for (seconds)" }
                input #token-ttl type="number" name="ttl_s" min="1" value="3600" required;
                button #create-token type="submit" { "Create token" }
            }
        },
    )
}

#[derive(Deserialize)]
struct NewTokenForm {
    uses: u32,
    ttl_s: u64,
    role: Role,
}

async fn create(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: NewTokenForm = csrf::protected_form(&req, &user, &body)?;
    let issued = state
        .registry
        .create_token(form.uses, Duration::from_secs(form.ttl_s), form.role)
        .await
        .map_err(ApiError::from)?;
    tracing::info!(user = %user.name, token_id = %issued.id, role = %issued.role, "web-token-created");
    let info = TokenInfo {
        id: issued.id.clone(),
        role: issued.role,
        uses_left: issued.uses,
        expires_unix_ms: issued.expires_unix_ms,
        created_unix_ms: None,
    };
    Ok(page(
        &user,
        &state.registry.tokens(),
        None,
        Some((issued.token.expose(), &info)),
    ))
}

async fn revoke(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let _: layout::Empty = csrf::protected_form(&req, &user, &body)?;
    let id = path.into_inner();
    state
        .registry
        .revoke_token(&id)
        .await
        .map_err(ApiError::from)?
        .ok_or(WebError::NotFound)?;
    tracing::info!(user = %user.name, token_id = %id, "web-token-revoked");
    Ok(layout::redirect("/tokens?done=token-revoked"))
}
