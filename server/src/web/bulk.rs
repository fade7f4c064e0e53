//! `GET /plugins` and `GET /artifacts`: what is stored. Uploads stay with the CLI (`tether
//! plugins upload`, `tether artifacts upload`) and the REST API, which stream large bodies
//! with a checksum; a browser form would have to hold them in memory.

use crate::state::AppState;
use actix_web::{web, HttpResponse};
use maud::html;

use super::layout::{self, resource, utc};
use super::session::CurrentUser;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/plugins").route(web::get().to(plugins)))
        .service(resource("/artifacts").route(web::get().to(artifacts)));
}

fn size(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

async fn plugins(user: CurrentUser, state: web::Data<AppState>) -> HttpResponse {
    let list = state.plugins.list();
    layout::page(
        "Plugins",
        &user,
        "/plugins",
        html! {
            p.muted { "Built-in: shell, file, artifact, http. Upload a bundle with "
                code { "tether plugins upload FILE.tar.gz" } "." }
            @if list.is_empty() { p.muted { "No plugin uploaded yet." } } @else {
                table #plugins {
                    thead { tr { th { "Name" } th { "Version" } th { "Steps" } th { "Size" } th { "sha256" } th { "Uploaded" } } }
                    tbody { @for p in &list {
                        tr {
                            td { (p.name) } td { (p.version) }
                            td { @for s in &p.manifest.steps { span.tag { (s.name) } } }
                            td { (size(p.size)) } td { code { (p.sha256.get(..16).unwrap_or(&p.sha256)) "…" } }
                            td { (utc(p.uploaded_unix_ms)) }
                        }
                    } }
                }
            }
        },
    )
}

async fn artifacts(user: CurrentUser, state: web::Data<AppState>) -> HttpResponse {
    let list = state.artifacts.list();
    let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
    layout::page(
        "Artifacts",
        &user,
        "/artifacts",
        html! {
            p.muted { "Upload with " code { "tether artifacts upload NAME VERSION FILE" } "." }
            @if list.is_empty() { p.muted { "No artifact uploaded yet." } } @else {
                table #artifacts {
                    thead { tr { th { "Name" } th { "Version" } th { "Size" } th { "sha256" } th { "Uploaded" } } }
                    tbody { @for a in &list {
                        tr {
                            td { (field(a, "name")) } td { (field(a, "version")) }
                            td { (size(a["size"].as_u64().unwrap_or(0))) }
                            td { code { (field(a, "sha256")) } }
                            td { (utc(a["uploaded_unix_ms"].as_u64().unwrap_or(0))) }
                        }
                    } }
                }
            }
        },
    )
}
