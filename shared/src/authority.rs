//! The authority of a URL, `host[:port]` (an IPv6 address in brackets): one parser for every
//! URL Tether reads (the CLI's server, agents' and relays' upstreams, a node's address, an
//! `http` step's target), so they all refuse the same things.

/// Why an authority is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("must not contain credentials")]
    Credentials,
    #[error("unclosed [ in the host")]
    UnclosedBracket,
    #[error("unexpected text after ]: expected :port")]
    AfterBracket,
    #[error("names no host")]
    NoHost,
    #[error("{0:?} is not a port number (1..=65535)")]
    BadPort(String),
}

/// The host (IPv6 without brackets) and port of `authority`; `default_port` when it names none.
pub fn parse(authority: &str, default_port: u16) -> Result<(String, u16), AuthorityError> {
    if authority.contains('@') {
        return Err(AuthorityError::Credentials);
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or(AuthorityError::UnclosedBracket)?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or(AuthorityError::AfterBracket)?,
                    ),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(AuthorityError::NoHost);
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| AuthorityError::BadPort(p.to_owned()))?,
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ports_and_bracketed_ipv6() {
        assert_eq!(parse("h", 443).unwrap(), ("h".into(), 443));
        assert_eq!(parse("h:8443", 443).unwrap(), ("h".into(), 8443));
        assert_eq!(parse("[::1]", 80).unwrap(), ("::1".into(), 80));
        assert_eq!(parse("[::1]:9", 80).unwrap(), ("::1".into(), 9));
        for (bad, why) in [
            ("u@h", AuthorityError::Credentials),
            ("[::1", AuthorityError::UnclosedBracket),
            ("[::1]x", AuthorityError::AfterBracket),
            ("", AuthorityError::NoHost),
            (":1", AuthorityError::NoHost),
            ("h:0", AuthorityError::BadPort("0".into())),
            ("h:port", AuthorityError::BadPort("port".into())),
            ("a:1:2", AuthorityError::BadPort("1:2".into())),
            ("h:99999", AuthorityError::BadPort("99999".into())),
        ] {
            assert_eq!(parse(bad, 1), Err(why), "{bad}");
        }
    }
}
