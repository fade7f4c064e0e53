//! The account page's API tokens: a user's own tokens, for scripts and the CLI.
//!
//! - [`section`]: the user's tokens (name, role, expiry) with a revoke button each, and a form
//!   to make one (a name, a role up to the user's own, a lifetime in days or none).
//! - `POST /account/api-tokens` (name, role, days): makes a token and shows it on the page it
//!   answers with, once (never in a URL, never again).
//! - `POST /account/api-tokens/{id}/revoke`: revokes one of the user's own tokens.

use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{self, csrf_field, enc, resource};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::api_error::ApiError;
use crate::authz::Role;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/account/api-tokens").route(web::post().to(create)))
        .service(resource("/account/api-tokens/{id}/revoke").route(web::post().to(revoke)));
}

/// The user's tokens and the form to make one; `made`: a token just made, shown this once.
pub fn section(user: &CurrentUser, state: &AppState, made: Option<&str>) -> Markup {
    let tokens = state.api_tokens.list(Some(&user.name));
    html! {
        section.card #api-tokens {
            h2 { "API tokens" }
            p.muted { "For scripts and the CLI (" code { "TETHER_TOKEN" } "): each acts as you, with a role up to yours." }
            @if let Some(token) = made {
                p.notice { "Your new token, shown only now:" }
                pre #new-api-token { (token) }
            }
            @if tokens.is_empty() {
                p.muted { "No API tokens." }
            } @else {
                table {
                    thead { tr { th { "Name" } th { "Role" } th { "Created" } th { "Expires" } th {} } }
                    tbody { @for t in &tokens {
                        tr data-token=(t.id) {
                            td { (t.name) } td { (t.role) }
                            td { (layout::utc(t.created_unix_ms)) }
                            td { @match t.expires_unix_ms { None => "never", Some(at) => (layout::utc(at)) }
                                 @if t.expired { " (expired)" } }
                            td { form.inline method="post" action={ "/account/api-tokens/" (enc(&t.id)) "/revoke" } {
                                (csrf_field(user))
                                button.danger type="submit" { "Revoke" }
                            } }
                        }
                    } }
                }
            }
            form #new-api-token-form method="post" action="/account/api-tokens" {
                (csrf_field(user))
                label { "Name " input type="text" name="name" required maxlength="64"; }
                label { "Role " select name="role" {
                    @for r in Role::ALL { @if r <= user.role {
                        option value=(r.name()) selected[r == user.role] { (r.name()) }
                    } }
                } }
                label { "Expires in days (empty: never) " input type="number" name="days" min="1" max="3650"; }
                button type="submit" { "Make a token" }
            }
        }
    }
}

#[derive(Deserialize)]
struct NewTokenForm {
    name: String,
    role: Option<String>,
    #[serde(default)]
    days: String,
}

async fn create(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: NewTokenForm = csrf::protected_form(&req, &user, &body)?;
    let role = form
        .role
        .as_deref()
        .map(Role::parse)
        .transpose()
        .map_err(WebError::BadRequest)?;
    let days = form.days.trim();
    let ttl_s = if days.is_empty() {
        None
    } else {
        let d: u64 = days
            .parse()
            .map_err(|_| WebError::BadRequest("days: a whole number, or empty".into()))?;
        Some(d.saturating_mul(24 * 3600))
    };
    let (info, token) = state
        .api_tokens
        .create(&state.users, &user.name, &form.name, role, ttl_s)
        .await
        .map_err(ApiError::from)?;
    tracing::info!(user = %user.name, token = %info.id, "web-api-token-created");
    Ok(super::login::account_page(
        &user,
        &state,
        None,
        Some(token.expose()),
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
        .api_tokens
        .revoke(&id, Some(&user.name))
        .await
        .map_err(ApiError::from)?;
    tracing::info!(user = %user.name, token = %id, "web-api-token-revoked");
    Ok(layout::redirect("/account?done=api-token-revoked"))
}
