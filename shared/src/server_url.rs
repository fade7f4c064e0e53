//! [`ServerUrl`]: a server's HTTPS base URL, `https://host[:port][/]` (port 8443 by default;
//! IPv6 addresses in brackets), as the CLI dials it and as a cluster's nodes advertise their
//! operators' port (`storage.node_url`). Paths, queries and credentials in it are refused: the
//! paths are added by whoever uses it.

use std::fmt;

/// The HTTPS listener's default port.
pub const DEFAULT_PORT: u16 = 8443;

/// Where the server's REST API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Host name or IP address (IPv6 without brackets): dialled, and what the server's
    /// certificate must be valid for.
    pub host: String,
    /// The port.
    pub port: u16,
}

impl ServerUrl {
    /// Parses `https://host[:port][/]`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<ServerUrl, String> {
        let rest = text
            .strip_prefix("https://")
            .ok_or_else(|| format!("{text:?} must start with https://"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
            return Err(format!(
                "{text:?} must be just https://host[:port], without a path, query or credentials"
            ));
        }
        let (host, port) =
            crate::authority::parse(rest, DEFAULT_PORT).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(ServerUrl { host, port })
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_ipv6() {
        let url = ServerUrl::parse("https://tether.example.com:9443/").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("tether.example.com", 9443));
        assert_eq!(url.to_string(), "https://tether.example.com:9443");
        let url = ServerUrl::parse("https://localhost").unwrap();
        assert_eq!(url.port, DEFAULT_PORT);
        let url = ServerUrl::parse("https://[::1]:8443").unwrap();
        assert_eq!(url.host, "::1");
        assert_eq!(url.to_string(), "https://[::1]:8443");
        assert_eq!(
            ServerUrl::parse("https://[::1]").unwrap().port,
            DEFAULT_PORT
        );
    }

    #[test]
    fn refuses_what_it_cannot_dial() {
        for bad in [
            "http://localhost:8443",
            "localhost:8443",
            "https://",
            "https://:8443",
            "https://host:0",
            "https://host:99999",
            "https://host:port",
            "https://host/api",
            "https://user@host",
            "https://host?x=1",
            "https://[::1",
            "https://[::1]x",
            "https://a b",
            "https://a:1:2",
        ] {
            assert!(ServerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
