//! [`Filter`]: the `--where` conditions that select agents by what they are, shared by
//! `GET /api/v1/agents?where=...`, `tether agents --where ...` and the agents page.
//!
//! A condition is `FIELD OP VALUE`. `FIELD` is one of the agent's facts (`os`, `arch`, `cpus`,
//! ..., see `tether_shared::facts`), or `name`, `status`, `version`, `tag`, `maintenance`
//! (`yes`/`no`), or `property.KEY` for an operator-set property. `OP` is `=` or `!=` (the value
//! may hold `*` wildcards) or `<`, `<=`, `>`, `>=` (numbers compare as numbers, dotted versions
//! part by part, anything else as text). Every condition must hold. An agent without the field
//! never matches `=` or an ordering, and always matches `!=`.

use std::cmp::Ordering;

use crate::registry::{AgentView, Status};

/// Most conditions in one filter.
pub const MAX_CONDITIONS: usize = 16;
/// Longest condition text.
const MAX_CONDITION_LEN: usize = 300;

/// Conditions every selected agent meets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    field: Field,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Status,
    Version,
    Tag,
    Maintenance,
    Property(String),
    Fact(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Filter {
    /// Parses each text as one condition; `Err` names the first that is not one.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Filter, String> {
        if texts.len() > MAX_CONDITIONS {
            return Err(format!(
                "at most {MAX_CONDITIONS} conditions, got {}",
                texts.len()
            ));
        }
        let conditions = texts
            .iter()
            .map(|t| Condition::parse(t.as_ref().trim()))
            .collect::<Result<_, _>>()?;
        Ok(Filter { conditions })
    }

    /// Whether agent `a` meets every condition.
    pub fn matches(&self, a: &AgentView) -> bool {
        self.conditions.iter().all(|c| c.holds(a))
    }
}

impl Condition {
    fn parse(text: &str) -> Result<Condition, String> {
        let shown = || text.chars().take(64).collect::<String>();
        if text.len() > MAX_CONDITION_LEN {
            return Err(format!(
                "condition {:?}... is longer than {MAX_CONDITION_LEN} bytes",
                shown()
            ));
        }
        let at = text.find(['=', '!', '<', '>']).ok_or_else(|| {
            format!(
                "condition {:?} has no operator: write FIELD=VALUE (or !=, <, <=, >, >=)",
                shown()
            )
        })?;
        let (field, rest) = text.split_at(at);
        let (op, value) = [
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("=", Op::Eq),
            ("<", Op::Lt),
            (">", Op::Gt),
        ]
        .into_iter()
        .find_map(|(sym, op)| Some((op, rest.strip_prefix(sym)?)))
        .ok_or_else(|| format!("condition {:?}: \"!\" must be followed by \"=\"", shown()))?;
        let field = field.trim();
        let field_ok = !field.is_empty()
            && field.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.' || b == b'-'
            });
        if !field_ok {
            return Err(format!(
                "condition {:?}: the field must be a fact name, name, status, version, tag, \
                 maintenance or property.KEY",
                shown()
            ));
        }
        let field = match field {
            "name" => Field::Name,
            "status" => Field::Status,
            "version" => Field::Version,
            "tag" => Field::Tag,
            "maintenance" => Field::Maintenance,
            other => match other.strip_prefix("property.") {
                Some(key) => Field::Property(key.to_owned()),
                None => Field::Fact(other.to_owned()),
            },
        };
        Ok(Condition {
            field,
            op,
            value: value.trim().to_owned(),
        })
    }

    fn holds(&self, a: &AgentView) -> bool {
        let one = |v: Option<&str>| match v {
            Some(v) => self.compare(v),
            None => self.op == Op::Ne,
        };
        match &self.field {
            Field::Name => one(Some(&a.name)),
            Field::Status => one(Some(match a.status {
                Status::Online => "online",
                Status::Offline => "offline",
            })),
            Field::Version => one(a.version.as_deref()),
            Field::Maintenance => one(Some(if a.maintenance.is_some() { "yes" } else { "no" })),
            // Some tag matches; for `!=`: no tag equals it.
            Field::Tag if self.op == Op::Ne => !a.tags.iter().any(|t| glob(&self.value, t)),
            Field::Tag => a.tags.iter().any(|t| self.compare(t)),
            Field::Property(k) => one(a.properties.get(k).map(String::as_str)),
            Field::Fact(k) => one(a.facts.get(k).map(String::as_str)),
        }
    }

    fn compare(&self, have: &str) -> bool {
        match self.op {
            Op::Eq => glob(&self.value, have),
            Op::Ne => !glob(&self.value, have),
            Op::Lt => order(have, &self.value) == Ordering::Less,
            Op::Le => order(have, &self.value) != Ordering::Greater,
            Op::Gt => order(have, &self.value) == Ordering::Greater,
            Op::Ge => order(have, &self.value) != Ordering::Less,
        }
    }
}

/// Numbers as numbers, dotted versions part by part, anything else as text.
fn order(a: &str, b: &str) -> Ordering {
    if let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) {
        return x.partial_cmp(&y).unwrap_or(Ordering::Equal);
    }
    let parts = |s: &str| -> Option<Vec<u64>> { s.split('.').map(|p| p.parse().ok()).collect() };
    match (parts(a), parts(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters. The classic
/// backtrack-to-the-last-star walk: no recursion, at worst the product of both lengths (a
/// condition is at most 300 bytes, a fact 256).
fn glob(pattern: &str, text: &str) -> bool {
    // Bytes: `*` is ASCII, and UTF-8 text matches a UTF-8 literal byte for byte.
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Maintenance;

    fn agent() -> AgentView {
        AgentView {
            id: "a-1".into(),
            name: "web-01".into(),
            status: Status::Online,
            version: Some("1.4.10".into()),
            tags: vec!["web".into(), "eu".into()],
            properties: [("rack".to_owned(), "r7".to_owned())].into(),
            path: vec![],
            last_seen_unix_ms: None,
            maintenance: None,
            max_running_jobs: None,
            facts: [
                ("os", "linux"),
                ("arch", "x86_64"),
                ("cpus", "8"),
                ("distribution_name", "Debian GNU/Linux 12 (bookworm)"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            facts_unix_ms: Some(1),
            node: None,
            upgrade_recommended: false,
            stale: false,
        }
    }

    fn selects(conditions: &[&str]) -> bool {
        Filter::parse(conditions).unwrap().matches(&agent())
    }

    #[test]
    fn conditions_select_by_facts_and_fields() {
        assert!(selects(&[]));
        assert!(selects(&["os=linux", "arch = x86_64"]));
        assert!(!selects(&["os=linux", "arch=aarch64"]));
        assert!(selects(&["cpus>=8", "cpus>4", "cpus<16", "cpus<=8"]));
        assert!(!selects(&["cpus>8"]));
        assert!(selects(&["distribution_name=Debian*bookworm*"]));
        assert!(
            selects(&["version>=1.4.9", "version<1.10"]),
            "versions part by part"
        );
        assert!(selects(&[
            "tag=eu",
            "tag!=db",
            "property.rack=r7",
            "name=web-*"
        ]));
        assert!(!selects(&["tag!=eu"]));
        assert!(selects(&["status=online", "maintenance=no"]));
        assert!(
            !selects(&["memory_mb>1"]),
            "a missing fact matches no ordering"
        );
        assert!(selects(&["memory_mb!=1"]), "and every !=");
        let mut a = agent();
        a.maintenance = Some(Maintenance {
            since_unix_ms: 1,
            reason: String::new(),
        });
        assert!(Filter::parse(&["maintenance=yes"]).unwrap().matches(&a));
    }

    #[test]
    fn bad_conditions_say_what_is_wrong() {
        for (bad, says) in [
            ("oslinux", "no operator"),
            ("os!linux", "followed by"),
            ("=linux", "the field"),
            ("OS=linux", "the field"),
            (&"x=".repeat(200), "longer"),
        ] {
            let e = Filter::parse(&[bad]).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let many = vec!["os=linux"; MAX_CONDITIONS + 1];
        assert!(Filter::parse(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn wildcards_match_without_recursion() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(!glob("a*c", "abbb"));
        assert!(glob("*b*", "abc"));
        assert!(!glob("abc", "abcd"));
        let long = "a".repeat(10_000);
        assert!(!glob(&format!("{}b", "*a".repeat(100)), &long));
    }
}
