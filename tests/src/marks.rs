//! Processes whose steps leave marks, and the marks they left: how a test tells that every
//! step ran exactly once on every agent, whatever failed in between.

use std::path::Path;

use serde_json::json;

use crate::fleet::Server;

/// A process `name` of `steps` steps, each appending its name to `<dir>/<job id>.marks` (one
/// file per agent's job), printing it, and taking 0.4 s.
pub fn marking_process(server: &Server, name: &str, steps: usize, dir: &Path) {
    let steps: Vec<serde_json::Value> = (1..=steps)
        .map(|i| {
            json!({"name": format!("s{i}"), "plugin": "shell", "step": "run", "properties": {
                "script": format!("echo s{i} >> {}/$TETHER_JOB_ID.marks; echo output of s{i}; sleep 0.4", dir.display())}})
        })
        .collect();
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": name, "steps": steps})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// The lines of each job's marks file in `dir`, files in name order.
pub fn marks_in(dir: &Path) -> Vec<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .collect()
}
