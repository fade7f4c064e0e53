//! Who may do what: the roles of the people who use the server, and the one table that says
//! which role each request needs ([`required`]). The web application checks it in the
//! extractor every page and form takes ([`crate::web::session::CurrentUser`]), the REST API in
//! its bearer check ([`crate::admin_token::AdminToken::check`], for the users' API tokens),
//! both before the handler runs; the pages ask [`Role::may`] to hide what the user may not do.
//!
//! - `viewer`: reads everything but users, tokens and the audit log; changes only its own
//!   password and API tokens.
//! - `deployer`: also processes, deployments (start, cancel, retry), artifacts and plugins.
//! - `admin`: everything (users, tokens, agents, relays, upgrades, trust, maintenance).

use actix_web::http::Method;
use serde::{Deserialize, Serialize};

/// A user's role; each may do what the one before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Deployer,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Deployer, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    /// The role named `name` (`viewer`, `deployer`, `admin`).
    pub fn parse(name: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown role {:?}: expected viewer, deployer or admin",
                    name.chars().take(32).collect::<String>()
                )
            })
    }

    /// Whether this role may make `method` requests to `path`.
    pub fn may(self, method: &Method, path: &str) -> bool {
        self >= required(method, path)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `path` is `prefix` or below it (whole segments: `/processes` covers `/processes/x`, not
/// `/processesx`).
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Read only by admins: who may log in, and the tokens that let machines in.
const ADMIN_READS: [&str; 7] = [
    "/users",
    "/tokens",
    "/audit",
    "/api/v1/users",
    "/api/v1/enrollment-tokens",
    "/api/v1/api-tokens",
    "/api/v1/audit",
];

/// Changed by deployers: the work, and what it needs.
const DEPLOYER_CHANGES: [&str; 8] = [
    "/processes",
    "/deployments",
    "/artifacts",
    "/plugins",
    "/api/v1/processes",
    "/api/v1/deployments",
    "/api/v1/artifacts",
    "/api/v1/plugins",
];

/// Maintenance under a deployer's prefix that stays an admin's.
const ADMIN_CHANGES: [&str; 1] = ["/api/v1/deployments/prune"];

/// Changed by anyone logged in: their own session and password.
const OWN_CHANGES: [&str; 3] = ["/logout", "/account/password", "/account/api-tokens"];

/// The least role that may make `method` requests to `path`.
pub fn required(method: &Method, path: &str) -> Role {
    let reads = matches!(*method, Method::GET | Method::HEAD);
    let any = |list: &[&str]| list.iter().any(|p| under(path, p));
    if reads {
        if any(&ADMIN_READS) {
            Role::Admin
        } else {
            Role::Viewer
        }
    } else if any(&OWN_CHANGES) {
        Role::Viewer
    } else if any(&DEPLOYER_CHANGES) && !any(&ADMIN_CHANGES) {
        Role::Deployer
    } else {
        Role::Admin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_may_what_the_table_says() {
        let (get, post, delete, put) = (Method::GET, Method::POST, Method::DELETE, Method::PUT);
        // (method, path, least role)
        let table = [
            (&get, "/agents", Role::Viewer),
            (&get, "/deployments/d1", Role::Viewer),
            (&get, "/users", Role::Admin),
            (&get, "/tokens", Role::Admin),
            (&get, "/api/v1/enrollment-tokens", Role::Admin),
            (&post, "/logout", Role::Viewer),
            (&post, "/admin/drain", Role::Admin),
            (&post, "/account/password", Role::Viewer),
            (&post, "/deployments", Role::Deployer),
            (&post, "/deployments/d1/cancel", Role::Deployer),
            (&post, "/processes", Role::Deployer),
            (&put, "/api/v1/artifacts/app/1.0", Role::Deployer),
            (&post, "/api/v1/deployments/prune", Role::Admin),
            (&post, "/agents/a1/tags", Role::Admin),
            (&post, "/users", Role::Admin),
            (&post, "/tokens/t1/revoke", Role::Admin),
            (&delete, "/api/v1/relays/r1", Role::Admin),
            (&post, "/processesx", Role::Admin),
            (&post, "/health/reconciliation/a1/dismiss", Role::Admin),
        ];
        for (method, path, least) in table {
            assert_eq!(required(method, path), least, "{method} {path}");
            for role in Role::ALL {
                assert_eq!(
                    role.may(method, path),
                    role >= least,
                    "{role} {method} {path}"
                );
            }
        }
    }

    #[test]
    fn roles_parse_by_name_only() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Ok(role));
        }
        assert!(Role::parse("Admin").is_err());
        assert!(Role::parse("root")
            .unwrap_err()
            .contains("viewer, deployer or admin"));
    }
}
