//! The frame every page shares (navigation, account links, the static script and stylesheet),
//! the security headers every response of the web application carries, the static files
//! themselves (compiled into the binary), and small formatting helpers.

use std::sync::LazyLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, HttpResponseBuilder};
use maud::{html, Markup, DOCTYPE};
use sha2::{Digest, Sha256};

use super::session::CurrentUser;
use super::WebError;

/// No inline script or style, nothing from elsewhere, no framing, forms post only here.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

const APP_JS: &str = include_str!("static/app.js");
const APP_CSS: &str = include_str!("static/app.css");

/// A short content hash per static file: its URL changes with its content, so it is cached
/// for a year.
static JS_VERSION: LazyLock<String> = LazyLock::new(|| short_hash(APP_JS));
static CSS_VERSION: LazyLock<String> = LazyLock::new(|| short_hash(APP_CSS));

fn short_hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..6])
}

/// Mounts `/` (to the agents page) and the static files.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/").route(web::get().to(|| async { redirect("/agents") })))
        .service(resource("/static/app.js").route(
            web::get().to(|| async { static_file(APP_JS, "text/javascript; charset=utf-8") }),
        ))
        .service(
            resource("/static/app.css")
                .route(web::get().to(|| async { static_file(APP_CSS, "text/css; charset=utf-8") })),
        );
}

/// A resource of the web application: other methods get an HTML 405 with the headers.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|| async {
        let mut r = HttpResponse::MethodNotAllowed();
        secure_headers(&mut r);
        r.content_type("text/html; charset=utf-8")
            .body(error_page(StatusCode::METHOD_NOT_ALLOWED, "method not allowed").into_string())
    }))
}

fn static_file(body: &'static str, content_type: &'static str) -> HttpResponse {
    let mut r = HttpResponse::Ok();
    secure_headers(&mut r);
    r.insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"))
        .body(body)
}

/// The headers every response of the web application carries.
pub fn secure_headers(r: &mut HttpResponseBuilder) {
    r.insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "same-origin"))
        // The application is only ever served over HTTPS: browsers that saw it once refuse a
        // downgrade for a year.
        .insert_header((header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"));
}

/// An HTML response; never cached (pages carry CSRF tokens and live data).
pub fn html(markup: Markup) -> HttpResponse {
    let mut r = HttpResponse::Ok();
    secure_headers(&mut r);
    r.insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("text/html; charset=utf-8")
        .body(markup.into_string())
}

/// A JSON response for the page script.
pub fn json<T: serde::Serialize>(value: &T) -> HttpResponse {
    let mut r = HttpResponse::Ok();
    secure_headers(&mut r);
    r.insert_header((header::CACHE_CONTROL, "no-store"))
        .json(value)
}

/// Plain text (logs) for the page script.
pub fn text(body: String) -> HttpResponse {
    let mut r = HttpResponse::Ok();
    secure_headers(&mut r);
    r.insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("text/plain; charset=utf-8")
        .body(body)
}

/// 303 See Other to a path of this application (after a form, or to the login).
pub fn redirect(to: &str) -> HttpResponse {
    let mut r = HttpResponse::SeeOther();
    secure_headers(&mut r);
    let location = HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/"));
    r.insert_header((header::LOCATION, location))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

/// The navigation entries: path and label.
const NAV: [(&str, &str); 10] = [
    ("/agents", "Agents"),
    ("/relays", "Relays"),
    ("/tokens", "Tokens"),
    ("/deployments", "Deployments"),
    ("/processes", "Processes"),
    ("/plugins", "Plugins"),
    ("/artifacts", "Artifacts"),
    ("/health", "Health"),
    ("/users", "Users"),
    ("/audit", "Audit"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Tether" }
            link rel="stylesheet" href={ "/static/app.css?v=" (*CSS_VERSION) };
            script src={ "/static/app.js?v=" (*JS_VERSION) } defer {}
        }
    }
}

/// A page for a logged-in user: `active` is the navigation path to highlight.
pub fn page(title: &str, user: &CurrentUser, active: &str, body: Markup) -> HttpResponse {
    html(html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    nav {
                        a.brand href="/agents" { "Tether" }
                        @for (path, label) in NAV {
                            @if user.role.may(&actix_web::http::Method::GET, path) {
                                a class=[(path == active).then_some("active")] href=(path) { (label) }
                            }
                        }
                        span.spacer {}
                        a href="/account" { (user.name) }
                        span.muted data-field="role" { (user.role) }
                        form.inline method="post" action="/logout" {
                            (csrf_field(user))
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    })
}

/// A page without a session (the login form).
pub fn bare_page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                main.narrow {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// An error page (no navigation: it may be shown without a session).
pub fn error_page(status: StatusCode, message: &str) -> Markup {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    bare_page(
        &title,
        html! {
            p.error { (message) }
            p { a href="/agents" { "Back to the agents" } }
        },
    )
}

/// The hidden field carrying the session's CSRF token; in every form.
pub fn csrf_field(user: &CurrentUser) -> Markup {
    html! { input type="hidden" name=(super::csrf::FIELD) value=(user.csrf); }
}

/// A fixed notice chosen by a redirect's `?done=` code (never text from the query itself).
pub fn notice(done: Option<&str>) -> Markup {
    let text = match done {
        Some("saved") => "Saved.",
        Some("deleted") => "Deleted.",
        Some("user-created") => "User created.",
        Some("user-deleted") => "User deleted; their sessions were logged out.",
        Some("role-changed") => "Role changed.",
        Some("api-token-revoked") => "API token revoked.",
        Some("token-revoked") => "Token revoked: it enrolls nobody from now on.",
        Some("relay-deleted") => {
            "Relay deleted: its key no longer authenticates and its connections were closed."
        }
        Some("upgrade") => "Upgrade queued.",
        Some("started") => "Deployment started.",
        Some("cancelled") => "Cancel sent.",
        Some("retried") => "Retry started: the agents whose jobs did not succeed run it again.",
        Some("password") => "Password changed; your other sessions were logged out.",
        _ => return html! {},
    };
    html! { p.notice role="status" { (text) } }
}

/// A status word as a badge (its CSS class is the word, if it is one we know).
pub fn badge(status: &str) -> Markup {
    const KNOWN: [&str; 16] = [
        "online",
        "offline",
        "upgrading",
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "expired",
        "pending",
        "skipped",
        "timed_out",
        "interrupted",
        "timeout",
        "stopped",
        "poisoned",
    ];
    let class = if KNOWN.contains(&status) {
        status
    } else {
        "other"
    };
    html! { span class={ "badge " (class) } data-status=(status) { (status) } }
}

/// `2026-01-02 03:04:05 UTC` for a Unix time in milliseconds.
pub fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// "12 s ago", "3 min ago", ... for a Unix time in milliseconds, with the exact time on hover.
pub fn ago(unix_ms: Option<u64>) -> Markup {
    let Some(ms) = unix_ms else {
        return html! { span.muted { "never" } };
    };
    let secs = crate::registry::now_unix_ms().saturating_sub(ms) / 1000;
    let text = match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    };
    html! { time title=(utc(ms)) { (text) } }
}

/// "45 s", "12 min", "3 h", "2 d": a span of milliseconds, roughly.
pub fn duration_ms(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// The query of a page a change redirects to: `?done=...` says what was done ([`notice`]).
#[derive(serde::Deserialize)]
pub struct Done {
    pub done: Option<String>,
}

/// A form with no field but its CSRF token (a button that does one thing).
#[derive(serde::Deserialize)]
pub struct Empty {}

/// Percent-encodes `s` for a path segment or query value (everything but unreserved bytes).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// 404 unless `found`.
pub fn found<T>(found: Option<T>) -> Result<T, WebError> {
    found.ok_or(WebError::NotFound)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_767_323_045_000), "2026-01-02 03:04:05 UTC");
    }

    #[test]
    fn encodes_segments() {
        assert_eq!(enc("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(enc("web-1.x_y~"), "web-1.x_y~");
    }

    #[test]
    fn pages_escape_names() {
        let user = CurrentUser {
            name: "<b>x</b>".into(),
            csrf: "\"><script>".into(),
            role: crate::authz::Role::Admin,
        };
        let body = page("<i>t</i>", &user, "/agents", html! {}).into_body();
        let bytes = actix_web::body::to_bytes(body);
        let text = futures_util::FutureExt::now_or_never(bytes)
            .unwrap()
            .unwrap();
        let text = String::from_utf8(text.to_vec()).unwrap();
        assert!(
            !text.contains("<b>x</b>") && !text.contains("<i>t</i>"),
            "{text}"
        );
        assert!(text.contains("&lt;b&gt;x&lt;/b&gt;"), "{text}");
        assert!(!text.contains("\"><script>"), "{text}");
    }
}
