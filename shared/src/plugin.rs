//! Plugin manifests (`plugin.toml`) and plugin bundles, shared by the server (which validates
//! uploads and resolves steps against manifests) and the agent (which runs bundle steps).
//!
//! A manifest names the plugin, its version (semver) and its steps; each step has typed
//! properties (required, default, secret), declared outputs, an `on_interrupt` contract and,
//! for uploaded plugins, the command to run from the unpacked bundle:
//!
//! ```toml
//! name = "nginx"
//! version = "1.2.0"
//! [[steps]]
//! name = "reload"
//! command = ["/bin/sh", "reload.sh"]
//! on_interrupt = "rerun"
//!   [[steps.properties]]
//!   name = "config"
//!   required = true
//!   [[steps.outputs]]
//!   name = "pid"
//! ```
//!
//! **Command paths.** An element of `command` that is relative and does not start with `-` is a
//! file of the bundle: it may not contain `..`, must exist in the bundle (checked at upload),
//! and the agent replaces it by its absolute path in the unpacked bundle. Absolute elements
//! (an interpreter such as `/bin/sh`) and flags (`-x`) pass unchanged. Other values reach the
//! command as properties (`TETHER_PROP_<NAME>` environment variables), never as arguments.
//!
//! [`Manifest::validate`] and [`inspect_bundle`] report every problem at once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::enroll::name_problem;
use crate::protocol::OnInterrupt;

/// The manifest's file name at the root of a bundle.
pub const MANIFEST_FILE: &str = "plugin.toml";
/// Largest bundle (the compressed tar.gz) accepted.
pub const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest total of the bundle's unpacked files.
pub const MAX_UNPACKED_BYTES: u64 = 256 * 1024 * 1024;
/// Most entries (files and directories) in a bundle.
pub const MAX_ENTRIES: usize = 10_000;
/// Largest manifest.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Most steps of a plugin, properties of a step, outputs of a step, command elements.
pub const MAX_STEPS: usize = 100;
pub const MAX_PROPERTIES: usize = 100;
pub const MAX_OUTPUTS: usize = 100;
pub const MAX_COMMAND_ELEMENTS: usize = 64;
/// Longest step timeout a manifest may declare.
pub const MAX_TIMEOUT_S: u64 = 24 * 3600;
/// Longest description and command element.
const MAX_TEXT: usize = 4096;

/// A plugin manifest, as written in `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `[A-Za-z0-9._-]`, 1 to 64 characters; the `plugin` of a process step.
    pub name: String,
    /// Semantic version (`1.2.0`, `2.0.0-rc.1`); a newer upload replaces an older one.
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepDef>,
}

/// One step type of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub name: String,
    /// Program and arguments (see the module doc for paths). Required for uploaded plugins;
    /// the built-ins, which the agent runs itself, have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Whether the step may run again after the worker died while it ran.
    #[serde(default)]
    pub on_interrupt: OnInterrupt,
    /// Default timeout of the step (a process step may set its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Properties not declared are accepted too and reach the step as data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open: bool,
    #[serde(default)]
    pub properties: Vec<PropertyDef>,
    #[serde(default)]
    pub outputs: Vec<OutputDef>,
}

/// A declared property of a step; reaches the command as `TETHER_PROP_<NAME>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyDef {
    pub name: String,
    #[serde(default)]
    pub required: bool,
    /// Filled in at deployment time when the process step does not set the property.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Its value is masked in every log and answer.
    #[serde(default)]
    pub secret: bool,
}

/// A declared output property (`::output name=value` on the step's stdout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputDef {
    pub name: String,
}

/// Where a manifest comes from: the rules differ on `command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Shipped with Tether; the agent runs its steps itself (no command).
    BuiltIn,
    /// Uploaded as a bundle; every step has a command.
    Uploaded,
}

/// The environment variable name of property (or output) `name` under `prefix`.
pub fn env_name(prefix: &str, name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}{cleaned}")
}

/// The elements of `command` that are files of the bundle (relative, not a flag).
pub fn command_paths(command: &[String]) -> impl Iterator<Item = &str> {
    command
        .iter()
        .map(String::as_str)
        .filter(|c| !c.starts_with('-') && !Path::new(c).is_absolute())
}

/// `raw` as a normalized relative path inside a bundle (`./a//b` → `a/b`), or why not.
pub fn bundle_path(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("an empty path".to_owned());
    }
    let mut parts = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(p) => match p.to_str() {
                Some(p) => parts.push(p),
                None => return Err(format!("{raw:?} is not UTF-8")),
            },
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("{raw:?} contains '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{raw:?} is absolute"))
            }
        }
    }
    if parts.is_empty() {
        return Err(format!("{raw:?} names no file"));
    }
    Ok(parts.join("/"))
}

impl Manifest {
    /// Parses `plugin.toml` text (unknown fields refused).
    pub fn parse(text: &str) -> Result<Manifest, String> {
        toml::from_str(text).map_err(|e| format!("{MANIFEST_FILE}: {}", e.message().trim()))
    }

    /// Parses and validates; `Err` holds every problem.
    pub fn parse_valid(text: &str, origin: Origin) -> Result<Manifest, Vec<String>> {
        let m = Manifest::parse(text).map_err(|e| vec![e])?;
        let problems = m.validate(origin);
        if problems.is_empty() {
            Ok(m)
        } else {
            Err(problems)
        }
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&StepDef> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The parsed version, if it is valid.
    pub fn semver(&self) -> Option<semver::Version> {
        semver::Version::parse(&self.version).ok()
    }

    /// Every problem of the manifest (empty: valid).
    pub fn validate(&self, origin: Origin) -> Vec<String> {
        let mut problems = Vec::new();
        problems.extend(name_problem("plugin name", &self.name));
        if let Err(e) = semver::Version::parse(&self.version) {
            problems.push(format!(
                "version {:?} is not a semantic version such as 1.2.0: {e}",
                self.version
            ));
        }
        if self
            .description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_TEXT)
        {
            problems.push(format!("description longer than {MAX_TEXT} bytes"));
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            problems.push(format!(
                "a plugin needs 1 to {MAX_STEPS} steps, got {}",
                self.steps.len()
            ));
        }
        let mut names = BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            let at = format!("step {i} ({:?})", step.name);
            problems.extend(name_problem(&format!("{at}: name"), &step.name));
            if !names.insert(step.name.as_str()) {
                problems.push(format!("{at}: step names must be unique"));
            }
            step.validate(&at, origin, &mut problems);
        }
        problems
    }
}

impl StepDef {
    fn validate(&self, at: &str, origin: Origin, problems: &mut Vec<String>) {
        match (&self.command, origin) {
            (Some(_), Origin::BuiltIn) => {
                problems.push(format!("{at}: a built-in step has no command"))
            }
            (None, Origin::Uploaded) => problems.push(format!("{at}: command is required")),
            (Some(cmd), Origin::Uploaded) => command_problems(at, cmd, problems),
            (None, Origin::BuiltIn) => {}
        }
        if let Some(t) = self.timeout_s {
            if t == 0 || t > MAX_TIMEOUT_S {
                problems.push(format!(
                    "{at}: timeout_s must be 1 to {MAX_TIMEOUT_S}, got {t}"
                ));
            }
        }
        if self.properties.len() > MAX_PROPERTIES {
            problems.push(format!(
                "{at}: at most {MAX_PROPERTIES} properties, got {}",
                self.properties.len()
            ));
        }
        let mut envs: BTreeMap<String, &str> = BTreeMap::new();
        for p in &self.properties {
            let pat = format!("{at}: property {:?}", p.name);
            problems.extend(name_problem(&format!("{at}: property name"), &p.name));
            match envs.insert(env_name("TETHER_PROP_", &p.name), &p.name) {
                Some(other) if other == p.name => {
                    problems.push(format!("{pat}: property names must be unique"))
                }
                Some(other) => problems.push(format!(
                    "{pat}: same environment variable as property {other:?}"
                )),
                None => {}
            }
            if p.required && p.default.is_some() {
                problems.push(format!("{pat}: a required property has no default"));
            }
            if p.default.as_ref().is_some_and(|d| d.contains('\0')) {
                problems.push(format!("{pat}: default contains a NUL byte"));
            }
        }
        if self.outputs.len() > MAX_OUTPUTS {
            problems.push(format!(
                "{at}: at most {MAX_OUTPUTS} outputs, got {}",
                self.outputs.len()
            ));
        }
        let mut outputs = BTreeSet::new();
        for o in &self.outputs {
            problems.extend(name_problem(&format!("{at}: output name"), &o.name));
            if !outputs.insert(o.name.as_str()) {
                problems.push(format!("{at}: output {:?}: names must be unique", o.name));
            }
        }
    }
}

fn command_problems(at: &str, cmd: &[String], problems: &mut Vec<String>) {
    if cmd.is_empty() {
        problems.push(format!("{at}: command must not be empty"));
    }
    if cmd.len() > MAX_COMMAND_ELEMENTS {
        problems.push(format!(
            "{at}: command has more than {MAX_COMMAND_ELEMENTS} elements"
        ));
    }
    for (j, c) in cmd.iter().enumerate() {
        if c.is_empty() || c.len() > MAX_TEXT || c.contains('\0') {
            problems.push(format!(
                "{at}: command element {j} must be 1 to {MAX_TEXT} bytes without NUL"
            ));
            continue;
        }
        if j == 0 && c.starts_with('-') {
            problems.push(format!(
                "{at}: command must start with a program, not {c:?}"
            ));
        }
        let is_path = !c.starts_with('-');
        if is_path && !Path::new(c).is_absolute() {
            if let Err(e) = bundle_path(c) {
                problems.push(format!(
                    "{at}: command element {j}: bundle path {e} (must stay inside the bundle)"
                ));
            }
        }
    }
}

/// What a bundle holds: its manifest's text and its regular files (normalized paths).
#[derive(Debug, Clone, Default)]
pub struct BundleListing {
    pub manifest: Option<String>,
    pub files: BTreeSet<String>,
}

/// Reads a tar.gz bundle without unpacking it: every entry must be a regular file or a
/// directory at a relative path inside the bundle, within the size and count caps. `Err` holds
/// every problem found (reading stops at the first one that makes the rest unreadable).
pub fn list_bundle(reader: impl Read) -> Result<BundleListing, Vec<String>> {
    let gz = flate2::read::GzDecoder::new(reader.take(MAX_BUNDLE_BYTES + 1));
    let mut archive = tar::Archive::new(gz);
    let mut listing = BundleListing::default();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    let mut total: u64 = 0;
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return Err(vec![format!("the bundle is not a tar.gz archive: {e}")]),
    };
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            problems.push(format!("the bundle has more than {MAX_ENTRIES} entries"));
            break;
        }
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) if count == 0 => {
                problems.push(format!("the bundle is not a tar.gz archive: {e}"));
                break;
            }
            Err(e) => {
                problems.push(format!("the bundle is a damaged tar.gz archive: {e}"));
                break;
            }
        };
        let raw = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                problems.push(format!("an entry has an unreadable path: {e}"));
                continue;
            }
        };
        let kind = entry.header().entry_type();
        let path = match bundle_path(&raw) {
            Ok(p) => p,
            Err(_)
                if kind.is_dir()
                    && Path::new(&raw)
                        .components()
                        .all(|c| matches!(c, Component::CurDir)) =>
            {
                continue
            }
            Err(e) => {
                problems.push(format!(
                    "entry {e}: every entry must stay inside the bundle"
                ));
                continue;
            }
        };
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            problems.push(format!(
                "entry {path:?} is a {kind:?}: only regular files and directories are allowed"
            ));
            continue;
        }
        if !seen.insert(path.clone()) {
            problems.push(format!("entry {path:?} appears twice"));
            continue;
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        total = total.saturating_add(size);
        if total > MAX_UNPACKED_BYTES {
            problems.push(format!(
                "the bundle unpacks to more than {MAX_UNPACKED_BYTES} bytes"
            ));
            break;
        }
        if path == MANIFEST_FILE {
            if size > MAX_MANIFEST_BYTES {
                problems.push(format!(
                    "{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes"
                ));
            } else {
                let mut text = String::new();
                match (&mut entry)
                    .take(MAX_MANIFEST_BYTES)
                    .read_to_string(&mut text)
                {
                    Ok(_) => listing.manifest = Some(text),
                    Err(e) => problems.push(format!("{MANIFEST_FILE} is not UTF-8 text: {e}")),
                }
            }
        }
        listing.files.insert(path);
    }
    if problems.is_empty() {
        Ok(listing)
    } else {
        Err(problems)
    }
}

/// Checks a whole bundle: readable, with a valid `plugin.toml` whose command files are in it.
/// `Err` holds every problem.
pub fn inspect_bundle(reader: impl Read) -> Result<Manifest, Vec<String>> {
    let listing = list_bundle(reader)?;
    let Some(text) = listing.manifest else {
        return Err(vec![format!(
            "the bundle has no {MANIFEST_FILE} at its root"
        )]);
    };
    let manifest = Manifest::parse(&text).map_err(|e| vec![e])?;
    let mut problems = manifest.validate(Origin::Uploaded);
    for step in &manifest.steps {
        for path in step.command.iter().flat_map(|c| command_paths(c)) {
            if let Ok(p) = bundle_path(path) {
                if !listing.files.contains(&p) {
                    problems.push(format!(
                        "step {:?}: command file {path:?} is not in the bundle",
                        step.name
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests;
