//! Unit tests of the deployments state machine, targets and secret masking.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::sync::Arc;
use tether_shared::ids::{AgentId, JobId};
use tether_shared::sealing::{self, SealingKey};

use tether_shared::journal::Op;
use tether_shared::protocol::{
    CommandBody, EventBody, JobStatus, OnInterrupt, StepSpec, StepStatus,
};

use super::model::{
    deployment_status, mask, Deployment, DeploymentStatus, Job, JobState, Process, ProcessStep,
    StepState,
};
use super::state::{deployment_op, process_op, Sealing, State, RESET_MESSAGE};
use super::{resolve_targets, Targets};
use crate::registry::AgentIndex;
use crate::registry::{AgentRecord, Role};

fn spec(name: &str, secrets: &[&str], props: &[(&str, &str)]) -> StepSpec {
    StepSpec {
        name: name.into(),
        plugin: "shell".into(),
        step: "run".into(),
        properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        secrets: secrets.iter().map(|s| s.to_string()).collect(),
        on_interrupt: OnInterrupt::Fail,
        timeout_ms: 1000,
        bundle: None,
        sealed: None,
    }
}

/// An agent's sealing key and a sealer for it (one for the whole test binary).
fn agent_key() -> (&'static SealingKey, &'static sealing::Sealer) {
    static KEY: std::sync::OnceLock<(SealingKey, sealing::Sealer)> = std::sync::OnceLock::new();
    let (key, sealer) = KEY.get_or_init(|| {
        let key = SealingKey::generate();
        let sealer = sealing::Sealer::new(&key.public_b64()).unwrap();
        (key, sealer)
    });
    (key, sealer)
}

/// A state with deployment `d-1` of two steps on `agents`, all jobs dispatched.
fn state(agents: &[&str]) -> State {
    let d = Deployment {
        id: "d-1".into(),
        process: "p".into(),
        process_version: 1,
        properties: BTreeMap::from([("pw_secret".to_owned(), "hunter2".to_owned())]),
        steps: vec![
            spec("a", &[], &[("script", "true")]),
            spec("b", &["script"], &[("script", "s3cr3t-script")]),
        ],
        agents: agents.iter().map(|a| AgentId::from(*a)).collect(),
        created_unix_ms: 1,
        skip_maintenance: false,
        batch_size: None,
        stop_on_failure: false,
        deadline_unix_ms: None,
        retry_of: None,
        cancelled: false,
    };
    let mut s = State::default();
    for (i, a) in agents.iter().enumerate() {
        let mut j = Job::new(&d, &AgentId::from(*a), i);
        j.dispatched = true;
        s.insert_job(j);
    }
    s.insert_deployment(d);
    s
}

fn job(s: &State, agent: &str) -> Job {
    s.jobs[format!("d-1-{agent}").as_str()].clone()
}

fn accepted() -> EventBody {
    EventBody::JobAccepted {
        job_id: "d-1-a1".into(),
    }
}
fn started(step: u32, attempt: u32) -> EventBody {
    EventBody::StepStarted {
        job_id: "d-1-a1".into(),
        step,
        attempt,
    }
}
fn finished(step: u32, status: StepStatus, code: i32) -> EventBody {
    EventBody::StepFinished {
        job_id: "d-1-a1".into(),
        step,
        status,
        exit_code: Some(code),
        outputs: BTreeMap::from([("version".to_owned(), "1.2".to_owned())]),
        message: String::new(),
    }
}
fn job_finished(status: JobStatus) -> EventBody {
    EventBody::JobFinished {
        job_id: "d-1-a1".into(),
        status,
    }
}

#[test]
fn a_job_runs_to_success_and_duplicates_change_nothing() {
    let mut s = state(&["a1"]);
    let d = s.deployments["d-1"].clone();
    assert_eq!(deployment_status(s.jobs_of(&d)), DeploymentStatus::Queued);
    let events = [
        accepted(),
        started(0, 1),
        finished(0, StepStatus::Succeeded, 0),
        started(1, 1),
        finished(1, StepStatus::Succeeded, 0),
        job_finished(JobStatus::Succeeded),
    ];
    for (i, e) in events.iter().enumerate() {
        let effect = s.apply_event(&AgentId::from("a1"), e);
        assert_eq!(effect.ops.len(), 1, "event {i} must change the job");
        assert_eq!(effect.job_finished, i == 5);
        if i == 1 {
            assert_eq!(deployment_status(s.jobs_of(&d)), DeploymentStatus::Running);
        }
        // The same event again (a redelivery) changes nothing.
        let again = s.apply_event(&AgentId::from("a1"), e);
        assert!(
            again.ops.is_empty() && !again.job_finished,
            "event {i} twice"
        );
    }
    let j = job(&s, "a1");
    assert_eq!(j.status, JobState::Succeeded);
    assert!(j
        .steps
        .iter()
        .all(|st| st.status == StepState::Succeeded && st.attempt == 1));
    assert_eq!(j.steps[0].outputs["version"], "1.2");
    assert_eq!(
        deployment_status(s.jobs_of(&d)),
        DeploymentStatus::Succeeded
    );
}

fn output(step: u32, chunk: u32, data: &str) -> EventBody {
    EventBody::StepOutput {
        job_id: "d-1-a1".into(),
        step,
        chunk,
        data: data.into(),
    }
}

#[test]
fn output_is_kept_for_a_running_step_only() {
    let mut s = state(&["a1"]);
    // Not started yet: refused.
    let e = s.apply_event(&AgentId::from("a1"), &output(1, 0, "early\n"));
    assert!(e.ops.is_empty() && e.output_refused);
    s.apply_event(&AgentId::from("a1"), &accepted());
    s.apply_event(&AgentId::from("a1"), &started(1, 1));
    let e = s.apply_event(&AgentId::from("a1"), &output(1, 0, "line 0\n"));
    assert!(!e.output_refused);
    match &e.ops[..] {
        [Op::AppendBlob { name, bytes }, Op::PutMeta { key, value }] => {
            assert_eq!(name.as_str(), "joblog/d-1-a1/1");
            assert_eq!(bytes, b"line 0\n");
            assert_eq!(key, "outlen/d-1-a1/1");
            assert_eq!(value, &7u64.to_be_bytes());
        }
        other => panic!("{other:?}"),
    }
    // A step index out of range is refused.
    let e = s.apply_event(&AgentId::from("a1"), &output(9, 0, "x"));
    assert!(e.ops.is_empty() && e.output_refused);
    // Once the step ended, its counter goes and later output is refused.
    let e = s.apply_event(&AgentId::from("a1"), &finished(1, StepStatus::Succeeded, 0));
    assert!(e
        .ops
        .iter()
        .any(|op| matches!(op, Op::DeleteMeta { key } if key == "outlen/d-1-a1/1")));
    let e = s.apply_event(&AgentId::from("a1"), &output(1, 1, "late\n"));
    assert!(e.ops.is_empty() && e.output_refused);
}

#[test]
fn output_past_the_cap_is_cut_once_with_the_marker() {
    use tether_shared::protocol::{MAX_STEP_OUTPUT, OUTPUT_TRUNCATED};
    let mut s = state(&["a1"]);
    s.apply_event(&AgentId::from("a1"), &accepted());
    s.apply_event(&AgentId::from("a1"), &started(0, 1));
    let block = "x".repeat(200 * 1024);
    let mut kept = 0usize;
    let mut markers = 0;
    for chunk in 0..70 {
        let e = s.apply_event(&AgentId::from("a1"), &output(0, chunk, &block));
        assert!(!e.output_refused);
        for op in e.ops {
            if let Op::AppendBlob { bytes, .. } = op {
                kept += bytes.len();
                markers += usize::from(bytes == OUTPUT_TRUNCATED.as_bytes());
            }
        }
    }
    assert_eq!(markers, 1);
    assert!(kept <= MAX_STEP_OUTPUT + OUTPUT_TRUNCATED.len(), "{kept}");
}

#[test]
fn a_job_reported_succeeded_with_a_step_that_is_not_fails() {
    let mut s = state(&["a1"]);
    s.apply_event(&AgentId::from("a1"), &accepted());
    s.apply_event(&AgentId::from("a1"), &started(0, 1));
    s.apply_event(&AgentId::from("a1"), &finished(0, StepStatus::Succeeded, 0));
    s.apply_event(&AgentId::from("a1"), &started(1, 1));
    // Step 1's end never came: the agent still says the job succeeded.
    let e = s.apply_event(&AgentId::from("a1"), &job_finished(JobStatus::Succeeded));
    assert!(e.job_finished);
    let j = job(&s, "a1");
    assert_eq!(j.status, JobState::Failed);
    assert_eq!(j.steps[1].status, StepState::Interrupted);
    assert!(j.message.contains("step \"b\" is running"), "{}", j.message);
}

#[test]
fn failure_skips_the_rest_and_fails_the_deployment() {
    let mut s = state(&["a1", "a2"]);
    let d = s.deployments["d-1"].clone();
    for e in [
        accepted(),
        started(0, 1),
        finished(0, StepStatus::Failed, 3),
        job_finished(JobStatus::Failed),
    ] {
        s.apply_event(&AgentId::from("a1"), &e);
    }
    let j = job(&s, "a1");
    assert_eq!(j.steps[0].exit_code, Some(3));
    assert_eq!(j.steps[1].status, StepState::Skipped);
    // a2 has not finished: still running.
    assert_eq!(deployment_status(s.jobs_of(&d)), DeploymentStatus::Running);
    let a2 = EventBody::JobFinished {
        job_id: "d-1-a2".into(),
        status: JobStatus::Succeeded,
    };
    s.apply_event(&AgentId::from("a2"), &a2);
    assert_eq!(deployment_status(s.jobs_of(&d)), DeploymentStatus::Failed);
}

#[test]
fn events_of_unknown_jobs_or_from_another_agent_are_ignored() {
    let mut s = state(&["a1", "a2"]);
    // a2 reports on a1's job.
    for e in [
        accepted(),
        started(0, 1),
        job_finished(JobStatus::Succeeded),
    ] {
        let effect = s.apply_event(&AgentId::from("a2"), &e);
        assert!(effect.ops.is_empty() && !effect.job_finished);
    }
    assert_eq!(job(&s, "a1").status, JobState::Queued);
    let unknown = EventBody::JobAccepted {
        job_id: "d-9-a1".into(),
    };
    assert!(s.apply_event(&AgentId::from("a1"), &unknown).ops.is_empty());
}

#[test]
fn a_rerun_counts_its_attempt() {
    let mut s = state(&["a1"]);
    s.apply_event(&AgentId::from("a1"), &started(0, 1));
    s.apply_event(
        &AgentId::from("a1"),
        &finished(0, StepStatus::Interrupted, -1),
    );
    assert_eq!(
        s.apply_event(&AgentId::from("a1"), &started(0, 2))
            .ops
            .len(),
        1
    );
    let j = job(&s, "a1");
    assert_eq!(
        (j.steps[0].status, j.steps[0].attempt),
        (StepState::Running, 2)
    );
    assert_eq!(j.steps[0].exit_code, None);
    // A late duplicate of the first start does not go back.
    assert!(s
        .apply_event(&AgentId::from("a1"), &started(0, 1))
        .ops
        .is_empty());
}

#[test]
fn an_agent_reset_fails_its_jobs_in_flight_only() {
    let mut s = state(&["a1", "a2"]);
    s.apply_event(&AgentId::from("a1"), &accepted());
    s.apply_event(&AgentId::from("a1"), &started(0, 1));
    let ops = s.reset_agent(&AgentId::from("a1"));
    assert_eq!(ops.len(), 1);
    let j = job(&s, "a1");
    assert_eq!(j.status, JobState::Failed);
    assert_eq!(j.message, RESET_MESSAGE);
    assert_eq!(j.steps[0].status, StepState::Interrupted);
    assert_eq!(j.steps[1].status, StepState::Skipped);
    assert_eq!(job(&s, "a2").status, JobState::Queued);
    // Final jobs are not touched again; late events of the old incarnation change nothing.
    assert!(s.reset_agent(&AgentId::from("a1")).is_empty());
    assert!(s
        .apply_event(&AgentId::from("a1"), &finished(0, StepStatus::Succeeded, 0))
        .ops
        .is_empty());
}

#[test]
fn dispatch_respects_the_limit_and_cancel_splits_local_and_remote() {
    let mut s = state(&["a1"]);
    // Three more deployments for a1, not yet dispatched.
    for n in 2..=4 {
        let mut d = s.deployments["d-1"].clone();
        d.id = format!("d-{n}").into();
        d.created_unix_ms = n;
        s.insert_job(Job::new(&d, &"a1".into(), 0));
        s.deployments.insert(d.id.clone(), d);
    }
    let (ids, bodies, ops) = s.take_ready(
        &AgentId::from("a1"),
        2,
        Sealing::For(agent_key().1),
        &no_values,
        true,
    );
    assert_eq!(ids, vec![JobId::from("d-2-a1")], "one slot left of 2");
    assert!(matches!(&bodies[..], [CommandBody::RunJob { job_id, .. }] if job_id == "d-2-a1"));
    assert_eq!(ops.len(), 1);
    assert!(s
        .take_ready(
            &AgentId::from("a1"),
            2,
            Sealing::For(agent_key().1),
            &no_values,
            true
        )
        .0
        .is_empty());
    s.undo_dispatch(&ids);
    assert_eq!(
        s.take_ready(
            &AgentId::from("a1"),
            2,
            Sealing::For(agent_key().1),
            &no_values,
            true
        )
        .0,
        ids
    );

    let (ops, remote) = s.cancel("d-3");
    assert_eq!(ops.len(), 1);
    assert!(remote.is_empty());
    assert_eq!(s.jobs["d-3-a1"].status, JobState::Cancelled);
    let (ops, remote) = s.cancel("d-2");
    assert!(ops.is_empty());
    assert_eq!(remote, vec![("a1".into(), "d-2-a1".into())]);
    // Its RunJob was refused after all (a claim moved on) and the job is queued again, as the
    // journal has it: it ends cancelled rather than going out.
    s.undo_dispatch(&[JobId::from("d-2-a1")]);
    let (ids, bodies, ops) = s.take_ready(
        &AgentId::from("a1"),
        2,
        Sealing::For(agent_key().1),
        &no_values,
        true,
    );
    assert!(!ids.contains(&JobId::from("d-2-a1")), "{ids:?}");
    assert!(bodies
        .iter()
        .all(|b| !matches!(b, CommandBody::RunJob { job_id, .. } if job_id == "d-2-a1")));
    assert_eq!(s.jobs["d-2-a1"].status, JobState::Cancelled);
    assert!(!ops.is_empty());
    s.undo_dispatch(&ids);
    // When d-1 finishes, d-4 is next (d-3 was cancelled).
    s.apply_event(&AgentId::from("a1"), &job_finished(JobStatus::Succeeded));
    assert_eq!(
        s.take_ready(
            &AgentId::from("a1"),
            2,
            Sealing::For(agent_key().1),
            &no_values,
            true
        )
        .0,
        vec![JobId::from("d-4-a1")]
    );
}

#[test]
fn deployment_status_rules() {
    let s = state(&["a1", "a2"]);
    let d = s.deployments["d-1"].clone();
    let mut jobs: Vec<Job> = s.jobs_of(&d).cloned().collect();
    let mut set = |a: JobState, b: JobState| {
        jobs[0].status = a;
        jobs[1].status = b;
        deployment_status(jobs.iter())
    };
    assert_eq!(
        set(JobState::Queued, JobState::Queued),
        DeploymentStatus::Queued
    );
    assert_eq!(
        set(JobState::Cancelled, JobState::Queued),
        DeploymentStatus::Running
    );
    assert_eq!(
        set(JobState::Cancelled, JobState::Succeeded),
        DeploymentStatus::Cancelled
    );
    assert_eq!(
        set(JobState::Cancelled, JobState::Expired),
        DeploymentStatus::Failed
    );
    assert_eq!(
        set(JobState::Succeeded, JobState::Succeeded),
        DeploymentStatus::Succeeded
    );
}

#[test]
fn secrets_are_masked_everywhere() {
    let s = state(&["a1"]);
    let d = &s.deployments["d-1"];
    let secrets = d.secret_values();
    assert_eq!(
        secrets,
        vec!["s3cr3t-script".to_owned(), "hunter2".to_owned()]
    );
    assert_eq!(
        mask("pw=hunter2 run s3cr3t-script", &secrets),
        "pw=*** run ***"
    );
    let registry_dir = tempfile::tempdir().unwrap();
    let (journal, _) = tether_shared::journal::Journal::open(
        registry_dir.path(),
        &tether_shared::journal::JournalOptions::default(),
    )
    .unwrap();
    let registry = crate::registry::Registry::load(journal.handle()).unwrap();
    let mut s = s;
    let j = s.jobs.get_mut("d-1-a1").unwrap();
    j.steps[0]
        .outputs
        .insert("token_secret".into(), "abc".into());
    j.steps[0]
        .outputs
        .insert("echo".into(), "said hunter2".into());
    j.steps[1]
        .outputs
        .insert("script".into(), "visible?".into());
    j.steps[0].message = "failed with hunter2".into();
    let v = super::view::deployment(
        &s.snapshot("d-1").unwrap(),
        &registry,
        super::view::Detail::Jobs,
    );
    let text = v.to_string();
    for leak in ["hunter2", "s3cr3t", "abc", "visible?"] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
    assert_eq!(v["properties"]["pw_secret"], "***");
    assert_eq!(v["jobs"][0]["steps"][0]["outputs"]["echo"], "said ***");
    assert_eq!(v["jobs"][0]["agent"], "a1");
}

fn agent(id: &str, name: &str, tags: &[&str]) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        name: name.into(),
        public_key: String::new(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        properties: Default::default(),
        role: Role::Agent,
        enrolled_unix_ms: 0,
        maintenance: None,
        max_running_jobs: None,
        facts: Default::default(),
        facts_unix_ms: 0,
    }
}

#[test]
fn targets_resolve_by_name_or_all_tags() {
    let agents = [
        agent(&AgentId::from("a-1"), "web-1", &["web", "eu"]),
        agent(&AgentId::from("a-2"), "web-2", &["web"]),
    ];
    let t = |agents: Option<&[&str]>, tags: Option<&[&str]>| Targets {
        agents: agents.map(|v| v.iter().map(|s| s.to_string()).collect()),
        tags: tags.map(|v| v.iter().map(|s| s.to_string()).collect()),
        count: None,
    };
    assert_eq!(
        resolve_targets(
            &t(Some(&["web-2", "a-1", "web-1"]), None),
            &AgentIndex::of(&agents)
        )
        .unwrap(),
        vec!["a-2", "a-1"]
    );
    let err =
        resolve_targets(&t(Some(&["web-1", "db-9"]), None), &AgentIndex::of(&agents)).unwrap_err();
    assert!(err.contains("\"db-9\""), "{err}");
    assert_eq!(
        resolve_targets(&t(None, Some(&["web", "eu"])), &AgentIndex::of(&agents)).unwrap(),
        vec!["a-1"]
    );
    assert!(
        resolve_targets(&t(None, Some(&["db"])), &AgentIndex::of(&agents))
            .unwrap_err()
            .contains("no agent")
    );
    assert!(resolve_targets(&t(None, Some(&[])), &AgentIndex::of(&agents)).is_err());
    assert!(resolve_targets(
        &t(Some(&["web-1"]), Some(&["web"])),
        &AgentIndex::of(&agents)
    )
    .is_err());
    assert!(resolve_targets(&t(Some(&[]), None), &AgentIndex::of(&agents)).is_err());
    // Many unknown names: a short answer that counts the rest.
    let many: Vec<String> = (0..10_000).map(|i| format!("nobody-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = resolve_targets(&t(Some(&many), None), &AgentIndex::of(&agents)).unwrap_err();
    assert!(err.len() < 1_000 && err.ends_with("and 9990 more"), "{err}");
}

#[test]
fn dispatch_looks_at_the_agents_unfinished_jobs_only() {
    let mut s = state(&["a1", "a2"]);
    // Everything starts undispatched here.
    for j in s.jobs.values_mut() {
        j.dispatched = false;
    }
    assert_eq!(s.agents_with_waiting_jobs(), vec!["a1", "a2"]);
    let (ids, bodies, _) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::For(agent_key().1),
        &no_values,
        true,
    );
    assert_eq!((ids.len(), bodies.len()), (1, 1));
    assert_eq!(s.running(&AgentId::from("a1")), 1);
    assert_eq!(s.unfinished(&AgentId::from("a1")).count(), 1);
    // Its end takes it out of the agent's unfinished jobs; a2's stays.
    s.apply_event(&AgentId::from("a1"), &accepted());
    s.apply_event(&AgentId::from("a1"), &job_finished(JobStatus::Failed));
    assert_eq!(s.running(&AgentId::from("a1")), 0);
    assert_eq!(s.unfinished(&AgentId::from("a1")).count(), 0);
    assert_eq!(s.agents_with_waiting_jobs(), vec!["a2"]);
    assert!(s
        .take_ready(
            &AgentId::from("a1"),
            4,
            Sealing::For(agent_key().1),
            &no_values,
            true
        )
        .0
        .is_empty());
    // Deleting an agent fails its unfinished jobs and only those.
    assert_eq!(s.fail_agent(&AgentId::from("a2"), "deleted").len(), 1);
    assert_eq!(s.unfinished(&AgentId::from("a2")).count(), 0);
    assert!(s.fail_agent(&AgentId::from("a2"), "deleted").is_empty());
}

/// A state whose one job (d-1 on a1, with secrets) is queued, not dispatched.
fn queued() -> State {
    let mut s = state(&["a1"]);
    s.jobs.get_mut("d-1-a1").unwrap().dispatched = false;
    s
}

#[test]
fn job_secrets_are_sealed_for_the_agent_or_wait_for_its_key_or_fail_without_one() {
    let (key, sealer) = agent_key();
    let mut s = queued();
    let (ids, bodies, ops) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::For(sealer),
        &no_values,
        true,
    );
    assert_eq!((ids.len(), ops.len()), (1, 1));
    let wire = serde_json::to_string(&bodies).unwrap();
    assert!(!wire.contains("s3cr3t-script"), "{wire}");
    let [CommandBody::RunJob { steps, job_id, .. }] = &bodies[..] else {
        panic!("{bodies:?}");
    };
    assert!(steps[0].sealed.is_none(), "no secret, nothing sealed");
    assert!(!steps[1].properties.contains_key("script"));
    let opened = sealing::open_step(&steps[1], key, job_id, 1).unwrap();
    assert_eq!(opened.properties["script"], "s3cr3t-script");
    assert!(opened.sealed.is_none());
    assert!(
        sealing::open_step(&steps[1], key, job_id, 0).is_err(),
        "bound to its step"
    );
    assert!(sealing::open_step(&steps[1], &SealingKey::generate(), job_id, 1).is_err());

    // Not attached since start: the job waits, unchanged.
    let mut s = queued();
    let (ids, bodies, ops) =
        s.take_ready(&AgentId::from("a1"), 4, Sealing::Unknown, &no_values, true);
    assert!(ids.is_empty() && bodies.is_empty() && ops.is_empty());
    assert_eq!(s.jobs["d-1-a1"].status, JobState::Queued);
    assert_eq!(
        s.take_ready(
            &AgentId::from("a1"),
            4,
            Sealing::For(sealer),
            &no_values,
            true
        )
        .0
        .len(),
        1
    );

    // A hostile or broken agent's key that is no X25519 key: no sealer, and a reason.
    assert!(sealing::Sealer::new("not a key!").is_err());

    // A release that sends no key: the job fails, saying why; nothing is sent.
    let mut s = queued();
    let (ids, bodies, ops) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::Unable(super::NO_SEALING_KEY),
        &no_values,
        true,
    );
    assert!(ids.is_empty() && bodies.is_empty());
    assert_eq!(ops.len(), 1);
    assert_eq!(s.jobs["d-1-a1"].status, JobState::Failed);
    assert!(s.jobs["d-1-a1"].message.contains("upgrade the agent"));
}

/// An agent with no values for `${agent.NAME}`.
fn no_values() -> BTreeMap<String, String> {
    BTreeMap::new()
}

#[test]
fn agent_placeholders_are_filled_per_agent_and_a_missing_fact_fails_the_job_alone() {
    let mut s = queued();
    let d = s.deployments.get_mut("d-1").unwrap();
    d.steps[0].properties.insert(
        "script".into(),
        "echo ${agent.os}/${agent.name} ${x}".into(),
    );
    let values = || {
        BTreeMap::from([
            ("os".into(), "linux".into()),
            ("name".into(), "web-1".into()),
        ])
    };
    let (ids, bodies, _) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::For(agent_key().1),
        &values,
        true,
    );
    assert_eq!(ids.len(), 1);
    let [CommandBody::RunJob { steps, .. }] = &bodies[..] else {
        panic!("{bodies:?}");
    };
    assert_eq!(steps[0].properties["script"], "echo linux/web-1 ${x}");
    // The deployment keeps the placeholders: each agent gets its own values.
    assert!(s.deployments["d-1"].steps[0].properties["script"].contains("${agent.os}"));

    // An agent without the fact: its job fails saying which; nothing is sent.
    let mut s = queued();
    s.deployments.get_mut("d-1").unwrap().steps[0]
        .properties
        .insert("script".into(), "echo ${agent.gpu}".into());
    let (ids, bodies, ops) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::For(agent_key().1),
        &values,
        true,
    );
    assert!(ids.is_empty() && bodies.is_empty());
    assert_eq!(ops.len(), 1);
    assert_eq!(s.jobs["d-1-a1"].status, JobState::Failed);
    assert!(
        s.jobs["d-1-a1"].message.contains("no fact \"gpu\""),
        "{}",
        s.jobs["d-1-a1"].message
    );

    // Values that would blow the job past its frame: refused, not sent.
    let mut s = queued();
    s.deployments.get_mut("d-1").unwrap().steps[0]
        .properties
        .insert("script".into(), "${agent.big}".repeat(4000));
    let big = || BTreeMap::from([("big".into(), "x".repeat(256))]);
    let (ids, _, _) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::For(agent_key().1),
        &big,
        true,
    );
    assert!(ids.is_empty());
    assert!(s.jobs["d-1-a1"].message.contains("more than"));
}

#[test]
fn a_job_naming_a_user_fails_on_an_agent_that_cannot_switch_and_runs_on_one_that_can() {
    let mut s = queued();
    s.deployments.get_mut("d-1").unwrap().steps[0]
        .properties
        .insert("run_as".into(), "deploy".into());
    let (ids, bodies, ops) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::For(agent_key().1),
        &no_values,
        false,
    );
    assert!(ids.is_empty() && bodies.is_empty());
    assert_eq!(ops.len(), 1);
    assert_eq!(s.jobs["d-1-a1"].message, super::state::RUNS_AS_MESSAGE);
    let mut s = queued();
    s.deployments.get_mut("d-1").unwrap().steps[0]
        .properties
        .insert("run_as".into(), "deploy".into());
    let (ids, _, _) = s.take_ready(
        &AgentId::from("a1"),
        4,
        Sealing::For(agent_key().1),
        &no_values,
        true,
    );
    assert_eq!(ids.len(), 1);
}

/// A rolling deployment of `agents` in batches of `size`, every job queued, not dispatched.
fn rolling(agents: &[&str], size: u32, stop_on_failure: bool) -> State {
    let mut s = state(agents);
    let d = s.deployments.get_mut("d-1").unwrap();
    d.batch_size = Some(size);
    d.stop_on_failure = stop_on_failure;
    let d = d.clone();
    for (i, a) in agents.iter().enumerate() {
        s.insert_job(Job::new(&d, &AgentId::from(*a), i));
    }
    s
}

fn end_job(s: &mut State, agent: &str, status: JobStatus) {
    let id = format!("d-1-{agent}");
    let agent = &AgentId::from(agent);
    s.apply_event(agent, &EventBody::JobAccepted { job_id: id.clone() });
    let step_status = match status {
        JobStatus::Succeeded => StepStatus::Succeeded,
        _ => StepStatus::Failed,
    };
    for step in 0..2 {
        let mut e = finished(step, step_status, 0);
        if let EventBody::StepFinished { job_id, .. } = &mut e {
            *job_id = id.clone();
        }
        s.apply_event(agent, &e);
    }
    let effect = s.apply_event(
        agent,
        &EventBody::JobFinished {
            job_id: id.clone(),
            status,
        },
    );
    assert!(effect.job_finished);
    let ended = serde_json::to_value(job(s, agent).status).unwrap();
    assert_eq!(ended, serde_json::to_value(status).unwrap(), "{id}");
}

fn take(s: &mut State, agent: &str) -> usize {
    s.take_ready(
        &AgentId::from(agent),
        4,
        Sealing::For(agent_key().1),
        &no_values,
        true,
    )
    .0
    .len()
}

#[test]
fn a_rolling_deployment_starts_a_batch_when_the_one_before_ended_and_stops_on_failure() {
    let agents = ["a1", "a2", "a3", "a4", "a5"];
    let mut s = rolling(&agents, 2, true);
    assert_eq!(
        agents.map(|a| job(&s, a).batch),
        [0, 0, 1, 1, 2],
        "batches of 2, the last one short"
    );
    assert_eq!(
        s.batch_wakeups("d-1"),
        vec![AgentId::from("a1"), AgentId::from("a2")]
    );
    assert_eq!(take(&mut s, "a3"), 0, "batch 2 waits");
    assert_eq!(take(&mut s, "a1"), 1);
    assert_eq!(take(&mut s, "a2"), 1);
    end_job(&mut s, "a1", JobStatus::Succeeded);
    assert_eq!(take(&mut s, "a3"), 0, "a2 still runs");
    end_job(&mut s, "a2", JobStatus::Succeeded);
    assert_eq!(
        s.batch_wakeups("d-1"),
        vec![AgentId::from("a3"), AgentId::from("a4")]
    );
    assert_eq!(take(&mut s, "a3"), 1);
    assert_eq!(take(&mut s, "a5"), 0);
    // A failure in batch 2: batch 3 is cancelled, saying why, even while a4 still runs.
    end_job(&mut s, "a3", JobStatus::Failed);
    assert_eq!(
        s.batch_wakeups("d-1"),
        vec![AgentId::from("a4"), AgentId::from("a5")]
    );
    assert_eq!(take(&mut s, "a5"), 0);
    assert_eq!(job(&s, "a5").status, JobState::Cancelled);
    assert_eq!(job(&s, "a5").message, super::state::STOPPED_MESSAGE);
    assert_eq!(take(&mut s, "a4"), 1, "its own batch goes on");
    end_job(&mut s, "a4", JobStatus::Succeeded);
    assert!(s.rolling().is_empty(), "every job ended");

    // Without stop_on_failure, later batches go on after a failure.
    let mut s = rolling(&agents[..3], 1, false);
    assert_eq!(take(&mut s, "a1"), 1);
    end_job(&mut s, "a1", JobStatus::Failed);
    assert_eq!(take(&mut s, "a2"), 1);
    assert_eq!(
        s.rolling(),
        vec![tether_shared::ids::DeploymentId::from("d-1")]
    );
}

#[test]
fn a_pool_takes_any_n_of_the_tagged_agents_available_ones_first() {
    let agents = [
        agent(&AgentId::from("a-1"), "web-1", &["web"]),
        agent(&AgentId::from("a-2"), "web-2", &["web"]),
        agent(&AgentId::from("a-3"), "web-3", &["web"]),
        agent(&AgentId::from("a-4"), "db-1", &["db"]),
    ];
    let ids = resolve_targets(
        &Targets {
            tags: Some(vec!["web".into()]),
            count: Some(2),
            ..Targets::default()
        },
        &AgentIndex::of(&agents),
    )
    .unwrap();
    let available = |id: &AgentId| id.as_str() == "a-3";
    let index = AgentIndex::of(&agents);
    let name_of = |id: &AgentId| index.name_of(id).map(str::to_owned);
    assert_eq!(
        super::pick_pool(ids.clone(), Some(2), &name_of, &available).unwrap(),
        vec!["a-3", "a-1"]
    );
    assert_eq!(
        super::pick_pool(ids.clone(), None, &name_of, &available)
            .unwrap()
            .len(),
        3
    );
    let e = super::pick_pool(ids.clone(), Some(4), &name_of, &available).unwrap_err();
    assert!(e.contains("only 3 agents"), "{e}");
    assert!(super::pick_pool(ids, Some(0), &name_of, &available).is_err());
    let e = resolve_targets(
        &Targets {
            agents: Some(vec!["web-1".into()]),
            count: Some(1),
            ..Targets::default()
        },
        &AgentIndex::of(&agents),
    )
    .unwrap_err();
    assert!(e.contains("goes with targets.tags"), "{e}");
}

#[test]
fn jobs_still_queued_past_the_deadline_expire_and_sent_ones_do_not() {
    let mut s = state(&["a1", "a2", "a3"]);
    // Created at 1, deadline 1,001: the grace is the span, 1,000 ms.
    s.deployments.get_mut("d-1").unwrap().deadline_unix_ms = Some(1_001);
    s.jobs.get_mut("d-1-a2").unwrap().dispatched = false;
    s.apply_event(
        &AgentId::from("a3"),
        &EventBody::JobAccepted {
            job_id: "d-1-a3".into(),
        },
    );
    assert!(s.expire_overdue(1_000).is_empty(), "not yet");
    let ops = s.expire_overdue(1_002);
    assert_eq!(ops.len(), 1, "the one never sent, at the deadline");
    assert_eq!(job(&s, "a2").status, JobState::Expired);
    assert_eq!(job(&s, "a2").message, super::EXPIRED_MESSAGE);
    assert_eq!(
        job(&s, "a1").status,
        JobState::Queued,
        "sent: its acceptance may be on its way"
    );
    assert_eq!(
        s.expire_overdue(2_002).len(),
        1,
        "sent, never accepted: after the grace"
    );
    assert_eq!(job(&s, "a1").status, JobState::Expired);
    assert_eq!(
        job(&s, "a3").status,
        JobState::Running,
        "accepted: the agent decides"
    );
    let again = s.expire_overdue(9_000);
    assert!(again.is_empty(), "once: {again:?}");
}

#[test]
fn deployment_properties_may_not_take_the_agents_names() {
    let problems = super::validate::validate_properties(&BTreeMap::from([(
        "agent.os".to_owned(),
        "x".to_owned(),
    )]));
    assert!(problems[0].contains("target agent"), "{problems:?}");
}

fn meta_text(op: &Op) -> String {
    match op {
        Op::PutMeta { value, .. } => String::from_utf8(value.clone()).unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn stored_secrets_are_sealed_and_open_at_load_and_a_rotation_seals_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let keys_path = dir.path().join("secrets.key");
    let source = crate::secrets::KeySource::File(keys_path.clone());
    let first = Arc::new(crate::secrets::KeyRing::load(&source).unwrap());
    let s = state(&["a1"]);
    let d = s.deployments["d-1"].clone();
    let p = Process {
        name: "p".into(),
        version: 1,
        steps: vec![ProcessStep {
            name: "b".into(),
            plugin: "shell".into(),
            step: "run".into(),
            properties: BTreeMap::from([("script".to_owned(), "proc-s3cr3t".to_owned())]),
            secrets: vec!["script".into()],
            on_interrupt: OnInterrupt::Fail,
            timeout_s: 10,
        }],
        updated_unix_ms: 1,
    };
    let ops = vec![deployment_op(&d, &first), process_op(&p, &first)];
    for op in &ops {
        let text = meta_text(op);
        for secret in ["hunter2", "s3cr3t-script", "proc-s3cr3t"] {
            assert!(!text.contains(secret), "{secret} stored in clear: {text}");
        }
        assert!(text.contains("tether-sealed:v1:"), "{text}");
    }
    let (journal, _) = tether_shared::journal::Journal::open(
        &dir.path().join("journal"),
        &tether_shared::journal::JournalOptions::default(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(journal.handle().commit(ops)).unwrap();

    let loaded = super::Deployments::load(journal.handle(), first.clone()).unwrap();
    assert_eq!(loaded.process("p").unwrap(), p);
    assert_eq!(loaded.snapshot("d-1").unwrap().deployment, d);
    assert_eq!(loaded.stale_secrets(), 0);

    // Rotated: both still open, both are stale and sealed again with the new key.
    let new_id = crate::secrets::rotate(&keys_path).unwrap();
    let second = Arc::new(crate::secrets::KeyRing::load(&source).unwrap());
    let loaded = super::Deployments::load(journal.handle(), second.clone()).unwrap();
    assert_eq!(loaded.stale_secrets(), 2);
    assert_eq!(rt.block_on(loaded.reseal()).unwrap(), 2);
    assert_eq!(loaded.stale_secrets(), 0);
    // The old key retired: everything still opens.
    crate::secrets::retire(&keys_path, first.ids()[0]).unwrap();
    let third = Arc::new(crate::secrets::KeyRing::load(&source).unwrap());
    assert_eq!(third.ids(), vec![new_id.as_str()]);
    let loaded = super::Deployments::load(journal.handle(), third).unwrap();
    assert_eq!(loaded.process("p").unwrap(), p);
    assert_eq!(loaded.snapshot("d-1").unwrap().deployment, d);
    assert_eq!(loaded.stale_secrets(), 0);
    // A ring without the key they were sealed with: refused, saying which key is missing.
    let stranger = Arc::new(crate::secrets::KeyRing::generate());
    let e = super::Deployments::load(journal.handle(), stranger)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&new_id) && e.contains("restore the key ring"),
        "{e}"
    );
}

#[test]
fn an_agent_in_maintenance_gets_nothing_and_only_skippable_jobs_end() {
    let mut s = queued();
    assert!(
        s.skip_for_maintenance(&AgentId::from("a1")).is_empty(),
        "made to wait"
    );
    assert_eq!(s.jobs["d-1-a1"].status, JobState::Queued);
    s.deployments.get_mut("d-1").unwrap().skip_maintenance = true;
    let ops = s.skip_for_maintenance(&AgentId::from("a1"));
    assert_eq!(ops.len(), 1);
    let job = &s.jobs["d-1-a1"];
    assert_eq!(job.status, JobState::Cancelled);
    assert_eq!(job.message, super::state::MAINTENANCE_MESSAGE);
    assert!(job.steps.iter().all(|st| st.status == StepState::Skipped));
    // A job already sent runs on.
    let mut s = state(&["a1"]);
    s.deployments.get_mut("d-1").unwrap().skip_maintenance = true;
    assert!(s.skip_for_maintenance(&AgentId::from("a1")).is_empty());
    assert_eq!(s.jobs["d-1-a1"].status, JobState::Queued);
}

#[test]
fn ends_are_counted_once_by_result_and_the_gate_moves_only_at_a_batch_boundary() {
    let agents = ["a1", "a2", "a3"];
    let mut s = rolling(&agents, 2, false);
    assert_eq!(take(&mut s, "a1"), 1);
    assert_eq!(take(&mut s, "a2"), 1);
    // a1 ends: batch 0 still runs a2, so nothing new may start.
    let id = "d-1-a1".to_owned();
    s.apply_event(
        &AgentId::from("a1"),
        &EventBody::JobAccepted { job_id: id.clone() },
    );
    let e = s.apply_event(
        &AgentId::from("a1"),
        &EventBody::JobFinished {
            job_id: id.clone(),
            status: JobStatus::Failed,
        },
    );
    assert!(
        e.job_finished && e.batch_moved,
        "a first failure moves the gate"
    );
    // The same end again changes nothing and is not counted twice.
    let again = s.apply_event(
        &AgentId::from("a1"),
        &EventBody::JobFinished {
            job_id: id,
            status: JobStatus::Failed,
        },
    );
    assert!(!again.job_finished && !again.batch_moved);
    assert_eq!(s.metrics.jobs_ended("failed"), 1);
    assert_eq!(s.metrics.first_events(), 1, "dispatched, then accepted");
    end_job(&mut s, "a2", JobStatus::Succeeded);
    assert_eq!(s.batch_wakeups("d-1"), vec![AgentId::from("a3")]);
    assert_eq!(s.metrics.deployments_ended("failed"), 0, "a3 is left");
    // The last job is cancelled before it was sent: the deployment ends, counted once.
    let (ops, remote) = s.cancel("d-1");
    assert_eq!((ops.len(), remote.len()), (1, 0));
    assert_eq!(s.metrics.jobs_ended("succeeded"), 1);
    assert_eq!(s.metrics.jobs_ended("cancelled"), 1);
    assert_eq!(s.metrics.deployments_ended("failed"), 1);
    assert!(s.rolling().is_empty());
    let mut text = String::new();
    s.metrics.render(&mut text);
    for line in [
        "tether_jobs_ended_total{result=\"failed\"} 1",
        "tether_jobs_ended_total{result=\"expired\"} 0",
        "tether_deployments_ended_total{result=\"failed\"} 1",
        "tether_dispatch_first_event_seconds_count 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\n{text}");
    }
}

#[test]
fn a_blob_is_sent_to_the_agents_of_the_deployments_that_fetch_it_and_to_no_one_once_pruned() {
    let mut s = State::default();
    let mut fetch = spec("get", &[], &[("sha256", "ab12"), ("name", "site")]);
    fetch.plugin = "artifact".into();
    fetch.step = "fetch".into();
    let d = Deployment {
        id: "d-9".into(),
        process: "p".into(),
        process_version: 1,
        properties: BTreeMap::new(),
        steps: vec![fetch, spec("run", &[], &[("sha256", "cd34")])],
        agents: vec![AgentId::from("a1")],
        created_unix_ms: 1,
        skip_maintenance: false,
        batch_size: None,
        stop_on_failure: false,
        deadline_unix_ms: None,
        retry_of: None,
        cancelled: false,
    };
    s.insert_job(Job::new(&d, &AgentId::from("a1"), 0));
    s.insert_deployment(d);
    assert!(s.sends_blob("a1", "ab12"));
    // Another agent, a property of a step that fetches nothing, an unknown blob.
    assert!(!s.sends_blob("a2", "ab12"));
    assert!(!s.sends_blob("a1", "cd34"));
    assert!(!s.sends_blob("a1", "ef56"));
    s.forget("d-9");
    assert!(!s.sends_blob("a1", "ab12"));
}
