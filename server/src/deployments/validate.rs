//! Validation of process and deployment requests (sans-IO): steps are checked against plugin
//! manifests — the built-ins shipped in `config/plugins/*/plugin.toml` and the uploaded plugins
//! of a [`Catalog`] — with name and limit rules and `${property}` substitution. Every problem
//! of a request is reported at once. At deployment time the manifest's defaults are filled in,
//! its secret properties marked, and an uploaded plugin's step gets its bundle reference.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use tether_shared::enroll::name_problem;
use tether_shared::plugin::{Manifest, Origin};
use tether_shared::protocol::{BundleRef, OnInterrupt, StepSpec};

use super::model::{is_secret_property, Process, ProcessStep};

/// Most steps in a process.
pub const MAX_STEPS: usize = 100;
/// Default and longest step timeout.
pub const DEFAULT_TIMEOUT_S: u64 = 600;
pub const MAX_TIMEOUT_S: u64 = 24 * 3600;
/// Most deployment properties, and longest property value.
const MAX_PROPERTIES: usize = 1000;
/// Largest resolved step list (it travels in one RunJob frame, with room for the envelope).
pub const MAX_STEPS_BYTES: usize = 192 * 1024;

/// The built-in plugins' manifests, shipped in `config/plugins/<name>/plugin.toml`.
const BUILT_IN_MANIFESTS: &[(&str, &str)] = &[
    (
        "shell",
        include_str!("../../../config/plugins/shell/plugin.toml"),
    ),
    (
        "file",
        include_str!("../../../config/plugins/file/plugin.toml"),
    ),
    (
        "artifact",
        include_str!("../../../config/plugins/artifact/plugin.toml"),
    ),
    (
        "http",
        include_str!("../../../config/plugins/http/plugin.toml"),
    ),
];

/// The built-in plugins, parsed once (a unit test proves every one is valid; an invalid one
/// is logged and left out rather than crash the server).
pub fn built_ins() -> &'static [Arc<Manifest>] {
    static PARSED: OnceLock<Vec<Arc<Manifest>>> = OnceLock::new();
    PARSED.get_or_init(|| {
        BUILT_IN_MANIFESTS
            .iter()
            .filter_map(
                |(name, text)| match Manifest::parse_valid(text, Origin::BuiltIn) {
                    Ok(m) => Some(Arc::new(m)),
                    Err(problems) => {
                        tracing::error!(plugin = %name, problems = %problems.join("; "), "built-in-manifest-invalid");
                        None
                    }
                },
            )
            .collect()
    })
}

/// A plugin as validation sees it: its manifest and, for an uploaded one, its bundle.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub manifest: Arc<Manifest>,
    /// sha256 of the uploaded bundle; `None` for a built-in.
    pub bundle_sha256: Option<String>,
}

/// Where uploaded plugins are looked up (the server's plugin store); built-ins come first.
pub trait Catalog: Send + Sync {
    /// The current version of the uploaded plugin `name`.
    fn uploaded(&self, name: &str) -> Option<CatalogEntry>;
    /// Every uploaded plugin's current manifest.
    fn uploaded_all(&self) -> Vec<Arc<Manifest>>;
}

/// No uploaded plugins: the built-ins only.
#[derive(Debug, Default)]
pub struct BuiltInsOnly;

impl Catalog for BuiltInsOnly {
    fn uploaded(&self, _: &str) -> Option<CatalogEntry> {
        None
    }
    fn uploaded_all(&self) -> Vec<Arc<Manifest>> {
        Vec::new()
    }
}

/// The plugin `name`: a built-in, else an uploaded one.
pub fn lookup(catalog: &dyn Catalog, name: &str) -> Option<CatalogEntry> {
    built_ins()
        .iter()
        .find(|m| m.name == name)
        .map(|m| CatalogEntry {
            manifest: m.clone(),
            bundle_sha256: None,
        })
        .or_else(|| catalog.uploaded(name))
}

/// Every `plugin/step` the catalog knows, for error messages.
fn known_steps(catalog: &dyn Catalog) -> String {
    built_ins()
        .iter()
        .cloned()
        .chain(catalog.uploaded_all())
        .flat_map(|m| {
            m.steps
                .iter()
                .map(|s| format!("{}/{}", m.name, s.name))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The body of `POST /api/v1/processes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProcess {
    pub name: String,
    pub steps: Vec<NewStep>,
}

/// One step of [`NewProcess`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewStep {
    pub name: String,
    pub plugin: String,
    pub step: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    pub on_interrupt: Option<OnInterrupt>,
    pub timeout_s: Option<u64>,
}

/// Checks a process request against the built-ins only; see [`validate_process_in`].
#[cfg(test)]
pub fn validate_process(new: NewProcess) -> Result<(String, Vec<ProcessStep>), String> {
    validate_process_in(new, &BuiltInsOnly)
}

/// Checks a process request against `catalog`; `Err` lists every problem, `; `-separated.
pub fn validate_process_in(
    new: NewProcess,
    catalog: &dyn Catalog,
) -> Result<(String, Vec<ProcessStep>), String> {
    let mut problems = Vec::new();
    problems.extend(name_problem("process name", &new.name));
    if new.steps.is_empty() || new.steps.len() > MAX_STEPS {
        problems.push(format!(
            "a process needs 1 to {MAX_STEPS} steps, got {}",
            new.steps.len()
        ));
    }
    let mut names = BTreeSet::new();
    let mut steps = Vec::with_capacity(new.steps.len());
    for (i, s) in new.steps.into_iter().enumerate() {
        let at = format!("step {i} ({:?})", s.name);
        problems.extend(name_problem(&format!("step {i} name"), &s.name));
        if !names.insert(s.name.clone()) {
            problems.push(format!("{at}: step names must be unique"));
        }
        let entry = lookup(catalog, &s.plugin);
        let Some(def) = entry.as_ref().and_then(|e| e.manifest.step(&s.step)) else {
            problems.push(format!(
                "{at}: unknown plugin step {}/{} (known: {})",
                s.plugin,
                s.step,
                known_steps(catalog)
            ));
            continue;
        };
        for r in def.properties.iter().filter(|p| p.required) {
            if !s.properties.contains_key(&r.name) {
                problems.push(format!("{at}: missing required property {:?}", r.name));
            }
        }
        let declared = |p: &str| def.properties.iter().any(|d| d.name == p);
        let runs_as = entry.as_ref().is_some_and(|e| e.bundle_sha256.is_some())
            || matches!(
                (s.plugin.as_str(), s.step.as_str()),
                ("shell", "run") | ("file", _)
            );
        let known = |p: &str| def.open || declared(p) || (p == RUN_AS && runs_as);
        if let Some(user) = s.properties.get(RUN_AS) {
            if !runs_as {
                problems.push(format!(
                    "{at}: {RUN_AS} applies to shell, file and plugin steps, not {}/{}",
                    s.plugin, s.step
                ));
            } else if let Some(p) = run_as_problem(user) {
                problems.push(format!("{at}: {RUN_AS}: {p}"));
            }
        }
        for (p, value) in &s.properties {
            if !known(p) {
                problems.push(format!("{at}: unknown property {p:?}"));
            }
            if let Err(e) = placeholders(value) {
                problems.push(format!("{at}: property {p:?}: {e}"));
            }
        }
        for p in &s.secrets {
            if !s.properties.contains_key(p) && !declared(p) {
                problems.push(format!("{at}: secret {p:?} is not a property of this step"));
            }
        }
        if let Some(mode) = s.properties.get("mode") {
            let literal = !mode.contains("${");
            if literal
                && (mode.is_empty()
                    || mode.len() > 4
                    || !mode.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            {
                problems.push(format!(
                    "{at}: mode {mode:?} must be an octal string such as \"0644\""
                ));
            }
        }
        let timeout_s = s.timeout_s.or(def.timeout_s).unwrap_or(DEFAULT_TIMEOUT_S);
        if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
            problems.push(format!(
                "{at}: timeout_s must be 1 to {MAX_TIMEOUT_S}, got {timeout_s}"
            ));
        }
        steps.push(ProcessStep {
            name: s.name,
            plugin: s.plugin,
            step: s.step,
            properties: s.properties,
            secrets: s.secrets,
            on_interrupt: s.on_interrupt.unwrap_or(def.on_interrupt),
            timeout_s,
        });
    }
    if problems.is_empty() {
        Ok((new.name, steps))
    } else {
        Err(problems.join("; "))
    }
}

/// The step property naming the user a step runs as (`user[:group]`, honoured by agents that
/// announce `runs_as`; the agent's `run_as_users` decides whom it accepts).
pub const RUN_AS: &str = "run_as";

/// What is wrong with a `run_as` value, if anything: `user` or `user:group`, each 1 to 32 of
/// a-z, 0-9, `_`, `-` and `.` (or a `${placeholder}`, checked when it is filled in by the agent).
fn run_as_problem(value: &str) -> Option<String> {
    if value.contains("${") {
        return None;
    }
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 32
            && n.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
            })
    };
    let ok = match value.split_once(':') {
        Some((u, g)) => name_ok(u) && name_ok(g),
        None => name_ok(value),
    };
    (!ok).then(|| format!("{value:?} is not user or user:group (a-z, 0-9, _, - and .)"))
}

/// Whether `steps` name a user to run as (only agents that announce `runs_as` may get them).
pub fn names_a_user(steps: &[StepSpec]) -> bool {
    steps
        .iter()
        .any(|s| s.properties.get(RUN_AS).is_some_and(|v| !v.is_empty()))
}

/// The `${name}` placeholders of `value`, in order; an unterminated or invalid one is an error.
fn placeholders(value: &str) -> Result<Vec<&str>, String> {
    let mut found = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated \"${\"".to_owned())?;
        let name = &after[..end];
        if let Some(p) = name_problem("placeholder", name) {
            return Err(p);
        }
        found.push(name);
        rest = &after[end + 1..];
    }
    Ok(found)
}

/// Placeholders `${agent.NAME}` are the target agent's: its `name`, `id` or one of its facts
/// (`tether_shared::facts`), filled in for each agent when its job is sent
/// ([`substitute_agent`]); deployment properties may not be named so.
pub const AGENT_PLACEHOLDER: &str = "agent.";

/// `value` with every `${name}` replaced by its property, literally (the replacement is not
/// scanned again); `${agent.NAME}` is left for [`substitute_agent`]. `Err` names the first
/// unknown property.
fn substitute(value: &str, props: &BTreeMap<String, String>) -> Result<(String, bool), String> {
    let mut secret = false;
    let out = replace_placeholders(value, |name| {
        if name.starts_with(AGENT_PLACEHOLDER) {
            return Ok(None);
        }
        let v = props
            .get(name)
            .ok_or_else(|| format!("unknown property ${{{name}}}"))?;
        secret |= is_secret_property(name);
        Ok(Some(v.as_str()))
    })?;
    Ok((out, secret))
}

/// `value` with every `${agent.NAME}` replaced by the agent's `NAME` in `agent` (its name, id
/// and facts). `Err` names the first the agent does not have.
pub fn substitute_agent(value: &str, agent: &BTreeMap<String, String>) -> Result<String, String> {
    replace_placeholders(value, |name| match name.strip_prefix(AGENT_PLACEHOLDER) {
        None => Ok(None),
        Some(key) => agent.get(key).map(|v| Some(v.as_str())).ok_or_else(|| {
            format!(
                "the agent has no fact {key:?} for ${{{name}}} (it has {})",
                agent.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        }),
    })
}

/// `value` with each `${name}` replaced by what `lookup` answers for it (`None`: kept as it
/// is), literally: a replacement is not scanned again.
fn replace_placeholders<'v>(
    value: &str,
    mut lookup: impl FnMut(&str) -> Result<Option<&'v str>, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated \"${\"".to_owned());
        };
        let name = &after[..end];
        match lookup(name)? {
            Some(v) => out.push_str(v),
            None => out.push_str(&rest[start..start + 2 + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks deployment properties: names as placeholders allow, bounded count.
pub fn validate_properties(props: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems: Vec<String> = props
        .keys()
        .filter_map(|k| {
            name_problem("property name", k).or_else(|| {
                k.starts_with(AGENT_PLACEHOLDER).then(|| {
                    format!("property name {k:?}: names starting with \"{AGENT_PLACEHOLDER}\" are the target agent's (${{agent.os}}, ...)")
                })
            })
        })
        .collect();
    if props.len() > MAX_PROPERTIES {
        problems.push(format!(
            "at most {MAX_PROPERTIES} properties, got {}",
            props.len()
        ));
    }
    problems
}

/// [`resolve_steps_in`] against the built-ins only.
#[cfg(test)]
pub fn resolve_steps(
    process: &Process,
    props: &BTreeMap<String, String>,
) -> Result<Vec<StepSpec>, String> {
    resolve_steps_in(process, props, &BuiltInsOnly, None)
}

/// The steps of `process` with the deployment's properties substituted and the manifest's
/// defaults filled in. A step property whose value took a `*_secret` property becomes secret
/// too, and so does every property the manifest declares secret. A step of an uploaded plugin
/// gets the bundle of the plugin's current version. `Err` lists every problem (unknown
/// placeholders, plugin steps gone, required properties the current version added).
pub fn resolve_steps_in(
    process: &Process,
    props: &BTreeMap<String, String>,
    catalog: &dyn Catalog,
    artifacts: Option<&dyn ArtifactLookup>,
) -> Result<Vec<StepSpec>, String> {
    let mut problems = Vec::new();
    let mut steps = Vec::with_capacity(process.steps.len());
    for s in &process.steps {
        let mut properties = BTreeMap::new();
        let mut secrets = s.secrets.clone();
        for (k, v) in &s.properties {
            match substitute(v, props) {
                Ok((value, secret)) => {
                    if secret && !secrets.contains(k) {
                        secrets.push(k.clone());
                    }
                    properties.insert(k.clone(), value);
                }
                Err(e) => problems.push(format!("step {:?} property {k:?}: {e}", s.name)),
            }
        }
        let entry = lookup(catalog, &s.plugin);
        let Some((entry, def)) = entry
            .as_ref()
            .and_then(|e| e.manifest.step(&s.step).map(|d| (e, d)))
        else {
            problems.push(format!(
                "step {:?}: plugin step {}/{} is no longer known",
                s.name, s.plugin, s.step
            ));
            continue;
        };
        for p in &def.properties {
            if let (false, Some(default)) = (properties.contains_key(&p.name), &p.default) {
                properties.insert(p.name.clone(), default.clone());
            }
            if p.required && !properties.contains_key(&p.name) {
                problems.push(format!(
                    "step {:?}: plugin {} {} requires property {:?}",
                    s.name, entry.manifest.name, entry.manifest.version, p.name
                ));
            }
            if p.secret && properties.contains_key(&p.name) && !secrets.contains(&p.name) {
                secrets.push(p.name.clone());
            }
        }
        let bundle = match (&entry.bundle_sha256, &def.command) {
            (Some(sha256), Some(command)) => Some(BundleRef {
                sha256: sha256.clone(),
                command: command.clone(),
            }),
            _ => None,
        };
        secrets.sort();
        steps.push(StepSpec {
            name: s.name.clone(),
            plugin: s.plugin.clone(),
            step: s.step.clone(),
            properties,
            secrets,
            on_interrupt: s.on_interrupt,
            timeout_ms: s.timeout_s.saturating_mul(1000),
            bundle,
            sealed: None,
        });
    }
    problems.extend(resolve_built_in_values(&mut steps, artifacts));
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let size = serde_json::to_vec(&steps).map(|v| v.len()).unwrap_or(0);
    if size > MAX_STEPS_BYTES {
        return Err(format!(
            "the resolved steps take {size} bytes, more than the {MAX_STEPS_BYTES} one job may carry"
        ));
    }
    Ok(steps)
}

/// Where `artifact/fetch` steps find their artifact's sha256 and size (the server's artifact
/// store; see `crate::artifacts`).
pub trait ArtifactLookup: Send + Sync {
    /// `(sha256, size)` of artifact `name` at `version`, if published.
    fn lookup(&self, name: &str, version: &str) -> Option<(String, u64)>;
}

/// Deployment-time checks and additions for the built-in steps whose values matter to the
/// server: an `artifact/fetch` step gets properties `sha256` and `size` of its artifact
/// (unknown artifact: a problem naming it) and `unpack` must be "true" or "false"; an
/// `http/request` needs an http(s) URL, a known method and a numeric expected status.
fn resolve_built_in_values(
    steps: &mut [StepSpec],
    lookup: Option<&dyn ArtifactLookup>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for s in steps.iter_mut() {
        let prop = |k: &str| s.properties.get(k).map(String::as_str);
        match (s.plugin.as_str(), s.step.as_str()) {
            ("artifact", "fetch") => {
                if let Some(u) = prop("unpack").filter(|u| !matches!(*u, "true" | "false")) {
                    problems.push(format!(
                        "step {:?}: unpack must be \"true\" or \"false\", got {u:?}",
                        s.name
                    ));
                }
                let (Some(name), Some(version)) = (prop("name"), prop("version")) else {
                    continue;
                };
                match lookup.and_then(|l| l.lookup(name, version)) {
                    Some((sha256, size)) => {
                        s.properties.insert("sha256".into(), sha256);
                        s.properties.insert("size".into(), size.to_string());
                    }
                    None => problems.push(format!(
                        "step {:?}: unknown artifact {name}/{version} (upload it first)",
                        s.name
                    )),
                }
            }
            ("http", "request") => {
                if let Some(url) =
                    prop("url").filter(|u| !(u.starts_with("http://") || u.starts_with("https://")))
                {
                    problems.push(format!(
                        "step {:?}: url {url:?} must start with http:// or https://",
                        s.name
                    ));
                }
                if let Some(m) =
                    prop("method").filter(|m| !matches!(*m, "GET" | "POST" | "PUT" | "DELETE"))
                {
                    problems.push(format!(
                        "step {:?}: method must be GET, POST, PUT or DELETE, got {m:?}",
                        s.name
                    ));
                }
                if let Some(e) = prop("expect_status")
                    .filter(|e| !e.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)))
                {
                    problems.push(format!(
                        "step {:?}: expect_status must be an HTTP status 100-599, got {e:?}",
                        s.name
                    ));
                }
            }
            _ => {}
        }
    }
    problems
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod built_in_value_tests {
    use super::*;

    struct One;
    impl ArtifactLookup for One {
        fn lookup(&self, name: &str, version: &str) -> Option<(String, u64)> {
            (name == "web" && version == "1.0").then(|| ("ab".repeat(32), 42))
        }
    }

    fn step(plugin: &str, step: &str, props: &[(&str, &str)]) -> StepSpec {
        StepSpec {
            name: "s".into(),
            plugin: plugin.into(),
            step: step.into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets: Vec::new(),
            on_interrupt: OnInterrupt::Rerun,
            timeout_ms: 1000,
            bundle: None,
            sealed: None,
        }
    }

    #[test]
    fn artifacts_are_resolved_and_values_checked() {
        let mut steps = vec![step(
            "artifact",
            "fetch",
            &[
                ("name", "web"),
                ("version", "1.0"),
                ("dest", "/d"),
                ("unpack", "true"),
            ],
        )];
        assert!(resolve_built_in_values(&mut steps, Some(&One)).is_empty());
        assert_eq!(steps[0].properties["sha256"], "ab".repeat(32));
        assert_eq!(steps[0].properties["size"], "42");
        let mut steps = vec![
            step(
                "artifact",
                "fetch",
                &[
                    ("name", "web"),
                    ("version", "2.0"),
                    ("dest", "/d"),
                    ("unpack", "yes"),
                ],
            ),
            step(
                "http",
                "request",
                &[
                    ("url", "file:///etc/passwd"),
                    ("method", "TRACE"),
                    ("expect_status", "2xx"),
                ],
            ),
        ];
        let problems = resolve_built_in_values(&mut steps, Some(&One)).join("; ");
        for needle in [
            "unknown artifact web/2.0",
            "unpack",
            "http://",
            "TRACE",
            "2xx",
        ] {
            assert!(problems.contains(needle), "{needle} not in {problems}");
        }
        let mut steps = vec![step(
            "artifact",
            "fetch",
            &[("name", "web"), ("version", "1.0")],
        )];
        let problems = resolve_built_in_values(&mut steps, None);
        assert!(
            problems[0].contains("unknown artifact web/1.0"),
            "{problems:?}"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests;
