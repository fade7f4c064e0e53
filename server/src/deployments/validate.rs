//! Validation of process and deployment requests (sans-IO): the built-in step catalog, name and
//! limit rules, and `${property}` substitution. Every problem of a request is reported at once.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use tether_shared::enroll::name_problem;
use tether_shared::protocol::{OnInterrupt, StepSpec};

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

/// A built-in step type: its required and optional properties, and whether it is safe to rerun.
struct BuiltIn {
    plugin: &'static str,
    step: &'static str,
    required: &'static [&'static str],
    optional: &'static [&'static str],
    /// Other properties are allowed and reach the step as data (`TETHER_PROP_<NAME>`).
    open: bool,
    on_interrupt: OnInterrupt,
}

const BUILT_INS: &[BuiltIn] = &[
    BuiltIn {
        plugin: "shell",
        step: "run",
        required: &["script"],
        optional: &["interpreter"],
        open: true,
        on_interrupt: OnInterrupt::Fail,
    },
    BuiltIn {
        plugin: "file",
        step: "write",
        required: &["path", "content"],
        optional: &["mode"],
        open: false,
        on_interrupt: OnInterrupt::Rerun,
    },
    BuiltIn {
        plugin: "file",
        step: "delete",
        required: &["path"],
        optional: &[],
        open: false,
        on_interrupt: OnInterrupt::Rerun,
    },
    BuiltIn {
        plugin: "file",
        step: "copy",
        required: &["from", "to"],
        optional: &[],
        open: false,
        on_interrupt: OnInterrupt::Rerun,
    },
];

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

/// Checks a process request; `Err` lists every problem, `; `-separated.
pub fn validate_process(new: NewProcess) -> Result<(String, Vec<ProcessStep>), String> {
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
        let Some(built_in) = BUILT_INS
            .iter()
            .find(|b| b.plugin == s.plugin && b.step == s.step)
        else {
            problems.push(format!(
                "{at}: unknown plugin step {}/{} (known: {})",
                s.plugin,
                s.step,
                BUILT_INS
                    .iter()
                    .map(|b| format!("{}/{}", b.plugin, b.step))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        };
        for r in built_in.required {
            if !s.properties.contains_key(*r) {
                problems.push(format!("{at}: missing required property {r:?}"));
            }
        }
        let known = |p: &str| {
            built_in.open || built_in.required.contains(&p) || built_in.optional.contains(&p)
        };
        for (p, value) in &s.properties {
            if !known(p) {
                problems.push(format!("{at}: unknown property {p:?}"));
            }
            if let Err(e) = placeholders(value) {
                problems.push(format!("{at}: property {p:?}: {e}"));
            }
        }
        for p in &s.secrets {
            if !s.properties.contains_key(p) {
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
        let timeout_s = s.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
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
            on_interrupt: s.on_interrupt.unwrap_or(built_in.on_interrupt),
            timeout_s,
        });
    }
    if problems.is_empty() {
        Ok((new.name, steps))
    } else {
        Err(problems.join("; "))
    }
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

/// `value` with every `${name}` replaced by its property, literally (the replacement is not
/// scanned again). `Err` names the first unknown property.
fn substitute(value: &str, props: &BTreeMap<String, String>) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(value.len());
    let mut secret = false;
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unterminated \"${\"".to_owned());
        };
        let name = &after[..end];
        let v = props
            .get(name)
            .ok_or_else(|| format!("unknown property ${{{name}}}"))?;
        secret |= is_secret_property(name);
        out.push_str(v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, secret))
}

/// Checks deployment properties: names as placeholders allow, bounded count.
pub fn validate_properties(props: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems: Vec<String> = props
        .keys()
        .filter_map(|k| name_problem("property name", k))
        .collect();
    if props.len() > MAX_PROPERTIES {
        problems.push(format!(
            "at most {MAX_PROPERTIES} properties, got {}",
            props.len()
        ));
    }
    problems
}

/// The steps of `process` with the deployment's properties substituted. A step property whose
/// value took a `*_secret` property becomes secret too. `Err` lists every unknown placeholder.
pub fn resolve_steps(
    process: &Process,
    props: &BTreeMap<String, String>,
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
        if s.plugin == "shell" && !properties.contains_key("interpreter") {
            properties.insert("interpreter".into(), "/bin/sh".into());
        }
        secrets.sort();
        steps.push(StepSpec {
            name: s.name.clone(),
            plugin: s.plugin.clone(),
            step: s.step.clone(),
            properties,
            secrets,
            on_interrupt: s.on_interrupt,
            timeout_ms: s.timeout_s.saturating_mul(1000),
            bundle: None,
        });
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> NewProcess {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_good_process_gets_defaults() {
        let (name, steps) = validate_process(parse(serde_json::json!({
            "name": "web-app",
            "steps": [
                {"name": "conf", "plugin": "file", "step": "write",
                 "properties": {"path": "/tmp/x", "content": "${greeting}", "mode": "0644"}},
                {"name": "run", "plugin": "shell", "step": "run",
                 "properties": {"script": "echo hi"}, "timeout_s": 5},
            ]
        })))
        .unwrap();
        assert_eq!(name, "web-app");
        assert_eq!(steps[0].on_interrupt, OnInterrupt::Rerun);
        assert_eq!(steps[0].timeout_s, DEFAULT_TIMEOUT_S);
        assert_eq!(steps[1].on_interrupt, OnInterrupt::Fail);
        assert_eq!(steps[1].timeout_s, 5);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = validate_process(parse(serde_json::json!({
            "name": "bad name",
            "steps": [
                {"name": "a", "plugin": "shell", "step": "run", "properties": {"scrip": "x"},
                 "secrets": ["nope"], "timeout_s": 0},
                {"name": "a", "plugin": "k8s", "step": "apply"},
                {"name": "w", "plugin": "file", "step": "write",
                 "properties": {"path": "p", "content": "${oops", "mode": "rw", "owner": "x"}},
            ]
        })))
        .unwrap_err();
        for needle in [
            "process name",
            "missing required property \"script\"",
            "unknown property \"owner\"",
            "secret \"nope\"",
            "timeout_s",
            "step names must be unique",
            "unknown plugin step k8s/apply",
            "unterminated",
            "mode \"rw\"",
        ] {
            assert!(err.contains(needle), "{needle} not in {err}");
        }
        let err =
            validate_process(parse(serde_json::json!({"name": "p", "steps": []}))).unwrap_err();
        assert!(err.contains("1 to 100 steps"), "{err}");
    }

    #[test]
    fn substitution_is_literal_and_marks_secrets() {
        let (_, steps) = validate_process(parse(serde_json::json!({
            "name": "p",
            "steps": [{"name": "s", "plugin": "shell", "step": "run",
                       "properties": {"script": "echo ${who} ${pw_secret}"}}]
        })))
        .unwrap();
        let process = Process {
            name: "p".into(),
            version: 1,
            steps,
            updated_unix_ms: 0,
        };
        let mut props = BTreeMap::new();
        props.insert("who".to_owned(), "$(rm -rf /) ${pw_secret}".to_owned());
        props.insert("pw_secret".to_owned(), "hunter2".to_owned());
        let steps = resolve_steps(&process, &props).unwrap();
        assert_eq!(
            steps[0].properties["script"],
            "echo $(rm -rf /) ${pw_secret} hunter2"
        );
        assert_eq!(steps[0].properties["interpreter"], "/bin/sh");
        assert_eq!(steps[0].secrets, vec!["script".to_owned()]);

        props.remove("who");
        let err = resolve_steps(&process, &props).unwrap_err();
        assert!(err.contains("${who}"), "{err}");
    }
}
