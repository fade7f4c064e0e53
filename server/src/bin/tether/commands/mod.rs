//! One module per command group. Each function talks to the server through a
//! [`crate::client::Client`], prints the server's JSON with `--json` or a readable table or
//! summary without it, and returns the exit code.

pub mod agents;
pub mod api_tokens;
pub mod artifacts;
pub mod audit;
pub mod deploy;
pub mod deployments;
pub mod health;
pub mod login;
pub mod plugins;
pub mod processes;
pub mod reconciliation;
pub mod relays;
pub mod tokens;
pub mod trust;
pub mod upgrades;
pub mod users;

use serde_json::Value;

/// The string at `key` of `value`, or "".
pub fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The array at `key` of `value`, or none.
pub fn items<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The unsigned number at `key` of `value`.
pub fn u64_at(value: &Value, key: &str) -> Option<u64> {
    value.get(key).and_then(Value::as_u64)
}
