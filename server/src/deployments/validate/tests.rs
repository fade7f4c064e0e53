//! Process validation and step resolution against built-in and uploaded manifests.

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
    let err = validate_process(parse(serde_json::json!({"name": "p", "steps": []}))).unwrap_err();
    assert!(err.contains("1 to 100 steps"), "{err}");
}

#[test]
fn every_built_in_manifest_is_valid() {
    for (name, text) in BUILT_IN_MANIFESTS {
        let m = Manifest::parse_valid(text, Origin::BuiltIn).unwrap();
        assert_eq!(&m.name, name);
    }
    assert_eq!(built_ins().len(), BUILT_IN_MANIFESTS.len());
    let shell = lookup(&BuiltInsOnly, "shell").unwrap();
    assert!(shell.manifest.step("run").unwrap().open);
}

struct OnePlugin(Arc<Manifest>);

impl Catalog for OnePlugin {
    fn uploaded(&self, name: &str) -> Option<CatalogEntry> {
        (name == self.0.name).then(|| CatalogEntry {
            manifest: self.0.clone(),
            bundle_sha256: Some("ab".repeat(32)),
        })
    }
    fn uploaded_all(&self) -> Vec<Arc<Manifest>> {
        vec![self.0.clone()]
    }
}

#[test]
fn uploaded_plugin_steps_follow_their_manifest() {
    let m = Manifest::parse_valid(
        r#"
name = "nginx"
version = "1.0.0"
[[steps]]
name = "reload"
command = ["/bin/sh", "reload.sh"]
on_interrupt = "rerun"
timeout_s = 30
  [[steps.properties]]
  name = "config"
  required = true
  [[steps.properties]]
  name = "level"
  default = "info"
  [[steps.properties]]
  name = "token"
  secret = true
"#,
        Origin::Uploaded,
    )
    .unwrap();
    let catalog = OnePlugin(Arc::new(m));
    let err = validate_process_in(
        parse(serde_json::json!({"name": "p", "steps": [
            {"name": "r", "plugin": "nginx", "step": "reload", "properties": {"colour": "x"}},
            {"name": "s", "plugin": "nginx", "step": "restart"}]})),
        &catalog,
    )
    .unwrap_err();
    for needle in [
        "missing required property \"config\"",
        "unknown property \"colour\"",
        "unknown plugin step nginx/restart",
        "nginx/reload",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    let (_, steps) = validate_process_in(
        parse(serde_json::json!({"name": "p", "steps": [
            {"name": "r", "plugin": "nginx", "step": "reload",
             "properties": {"config": "${conf}", "token": "t0k"}}]})),
        &catalog,
    )
    .unwrap();
    assert_eq!(steps[0].on_interrupt, OnInterrupt::Rerun);
    assert_eq!(steps[0].timeout_s, 30);
    let process = Process {
        name: "p".into(),
        version: 1,
        steps,
        updated_unix_ms: 0,
    };
    let props = BTreeMap::from([("conf".to_owned(), "/etc/nginx.conf".to_owned())]);
    let resolved = resolve_steps_in(&process, &props, &catalog, None).unwrap();
    let s = &resolved[0];
    assert_eq!(s.properties["config"], "/etc/nginx.conf");
    assert_eq!(s.properties["level"], "info");
    assert_eq!(s.secrets, vec!["token".to_owned()]);
    assert_eq!(s.timeout_ms, 30_000);
    let bundle = s.bundle.as_ref().unwrap();
    assert_eq!(bundle.sha256, "ab".repeat(32));
    assert_eq!(bundle.command, ["/bin/sh", "reload.sh"]);
    // The plugin went away (or lost the step): the deployment is refused, not half-made.
    let err = resolve_steps_in(&process, &props, &BuiltInsOnly, None).unwrap_err();
    assert!(err.contains("no longer known"), "{err}");
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
