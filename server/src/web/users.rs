//! The users page: who may log in.
//!
//! - `GET /users`: every user (name, created, password changed, last login), a form to create
//!   one, and per other user a delete form with an "I am sure" checkbox.
//! - `POST /users` (name, password, confirm): creates a user. The name follows the agent name
//!   rules, the password needs [`MIN_PASSWORD_LEN`] characters and is typed twice.
//! - `POST /users/{name}/delete` (confirm=yes): deletes a user and ends its sessions. Nobody
//!   deletes themselves, and the last user (and the last admin) stays.
//! - `POST /users/{name}/role` (role): gives another user a role; the last admin keeps theirs.
//!
//! Only admins see this page (see [`crate::authz`]).

use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::layout::{self, csrf_field, enc, resource};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::authz::Role;
use crate::state::AppState;
use crate::users::{hash_password, password_problem, MAX_PASSWORD_LEN, MIN_PASSWORD_LEN};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/users")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(resource("/users/{name}/delete").route(web::post().to(delete)))
    .service(resource("/users/{name}/role").route(web::post().to(change_role)));
}

async fn list(
    user: CurrentUser,
    query: web::Query<layout::Done>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let users = state.users.list();
    let last = users.len() <= 1;
    layout::page(
        "Users",
        &user,
        "/users",
        html! {
            (layout::notice(query.done.as_deref()))
            p.muted { "Viewers read; deployers also change processes, deployments, artifacts and plugins; admins do everything, including managing users." }
            table #users {
                thead { tr { th { "Name" } th { "Role" } th { "Created" } th { "Password changed" } th { "Last login" } th {} } }
                tbody {
                    @for u in &users {
                        tr data-user=(u.name) {
                            td data-field="name" { (u.name) @if u.name == user.name { " (you)" } }
                            td data-field="role" {
                                @if u.name == user.name {
                                    (u.role)
                                } @else {
                                    form.inline.change-role method="post" action={ "/users/" (enc(&u.name)) "/role" } {
                                        (csrf_field(&user))
                                        (role_select(u.role))
                                        button type="submit" { "Set" }
                                    }
                                }
                            }
                            td { (layout::ago(Some(u.created_unix_ms))) }
                            td { (layout::ago(Some(u.password_changed_unix_ms))) }
                            td data-field="last-login" { (layout::ago(u.last_login_unix_ms)) }
                            td {
                                @if u.name != user.name && !last {
                                    form.inline.delete-user method="post" action={ "/users/" (enc(&u.name)) "/delete" } {
                                        (csrf_field(&user))
                                        label { input type="checkbox" name="confirm" value="yes" required; " I am sure" }
                                        button.danger type="submit" { "Delete" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            form.card #new-user method="post" action="/users" {
                (csrf_field(&user))
                h2 { "New user" }
                label for="new-name" { "Name (A-Z a-z 0-9 . _ -)" }
                input #new-name type="text" name="name" autocomplete="off" required maxlength="64";
                label for="new-password" { "Password (" (MIN_PASSWORD_LEN) " to " (MAX_PASSWORD_LEN) " characters)" }
                input #new-password type="password" name="password" autocomplete="new-password" required minlength=(MIN_PASSWORD_LEN);
                label for="new-confirm" { "Password again" }
                input #new-confirm type="password" name="confirm" autocomplete="new-password" required;
                label { "Role " (role_select(Role::Viewer)) }
                button #create-user type="submit" { "Create user" }
            }
        },
    )
}

/// A `<select name="role">` with `selected` chosen.
fn role_select(selected: Role) -> maud::Markup {
    html! {
        select name="role" {
            @for r in Role::ALL {
                option value=(r.name()) selected[r == selected] { (r.name()) }
            }
        }
    }
}

/// The role a form names (a form without one asks for a viewer).
fn form_role(role: Option<&str>) -> Result<Role, WebError> {
    role.map_or(Ok(Role::Viewer), |r| {
        Role::parse(r).map_err(WebError::BadRequest)
    })
}

#[derive(Deserialize)]
struct NewUserForm {
    name: String,
    password: String,
    confirm: String,
    role: Option<String>,
}

#[derive(Deserialize)]
struct RoleForm {
    role: Option<String>,
}

async fn change_role(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: RoleForm = csrf::protected_form(&req, &user, &body)?;
    let role = form_role(form.role.as_deref())?;
    let name = path.into_inner();
    state.users.set_role(&name, role, Some(&user.name)).await?;
    tracing::info!(user = %user.name, changed = %name, role = %role, "web-user-role-changed");
    Ok(layout::redirect("/users?done=role-changed"))
}

async fn create(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: NewUserForm = csrf::protected_form(&req, &user, &body)?;
    if let Some(problem) = tether_shared::enroll::name_problem("user name", &form.name) {
        return Err(WebError::BadRequest(problem));
    }
    if form.password != form.confirm {
        return Err(WebError::BadRequest("the passwords differ".into()));
    }
    if let Some(problem) = password_problem(&form.password) {
        return Err(WebError::BadRequest(problem));
    }
    if state.users.contains(&form.name) {
        return Err(WebError::Conflict(format!(
            "user {:?} exists already",
            form.name
        )));
    }
    let role = form_role(form.role.as_deref())?;
    let password = form.password;
    let hash = web::block(move || hash_password(&password)).await??;
    state.users.create(&form.name, hash, role).await?;
    tracing::info!(user = %user.name, created = %form.name, role = %role, "web-user-created");
    Ok(layout::redirect("/users?done=user-created"))
}

#[derive(Deserialize)]
struct DeleteForm {
    confirm: Option<String>,
}

async fn delete(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: DeleteForm = csrf::protected_form(&req, &user, &body)?;
    csrf::confirmed(form.confirm.as_deref(), "a user")?;
    let name = path.into_inner();
    state.users.delete(&name, Some(&user.name)).await?;
    // A deleted user's sessions are refused anyway (`CurrentUser` checks the user exists).
    if let Err(e) = state.web_sessions.remove_user(&name).await {
        tracing::warn!(user = %name, error = %e, "web-sessions-not-removed");
    }
    if let Err(e) = state.api_tokens.remove_user(&name).await {
        tracing::warn!(user = %name, error = %e, "api-tokens-not-removed");
    }
    tracing::info!(user = %user.name, deleted = %name, "web-user-deleted");
    Ok(layout::redirect("/users?done=user-deleted"))
}
