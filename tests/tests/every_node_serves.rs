//! A cluster whose nodes all serve agents (`storage.every_node_serves_agents`): the node that
//! holds the lease is active (deployments, operators), the others are members that serve
//! agents too, carrying their events to the active node and its commands back through the
//! database (see `docs/cluster.md`). Real servers and agents on a PostgreSQL the test starts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::borrowed;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::loadgen::{enroll_at, Fleet, SimConfig};
use tether_tests::marks::{marking_process, marks_in};
use tether_tests::postgres::Postgres;

const WAIT: Duration = Duration::from_secs(60);
const STEPS: usize = 6;
/// Refused enrollments a caller may make per minute (the server's `EnrollLimiter`).
const ENROLL_FAILURES_PER_WINDOW: u32 = 20;

/// The environment of node `name` of a cluster on `pg` where every node serves agents.
fn node(pg: &Postgres, name: &str) -> Vec<(String, String)> {
    let mut env = pg.node_env(name, 3000);
    env.push((
        "TETHER_STORAGE__EVERY_NODE_SERVES_AGENTS".into(),
        "true".into(),
    ));
    env
}

/// Which node holds the claim on `agent`, and at which epoch (`""`: nobody).
fn claim(pg: &Postgres, agent: &str) -> String {
    pg.psql(&format!(
        "SELECT node || ' ' || epoch FROM tether_claims WHERE claim = '{agent}'"
    ))
}

/// Deploys the marking process to `agents` from `server`: the deployment's id.
fn deploy(server: &Server, agents: &[&Agent]) -> String {
    let targets: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "marks", "targets": {"agents": targets}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_owned()
}

/// Waits for deployment `id` to succeed on `server`; then every step ran exactly once on each
/// of its `jobs` agents.
fn every_step_once(server: &Server, id: &str, marks: &Path, jobs: usize) {
    let d = eventually("the deployment succeeded", Duration::from_secs(120), || {
        let r = server.request("GET", &format!("/api/v1/deployments/{id}"), None);
        (r.status == 200 && r.json()["status"] == "succeeded").then(|| r.json())
    });
    let expected: Vec<String> = (1..=STEPS).map(|i| format!("s{i}")).collect();
    assert_eq!(marks_in(marks), vec![expected; jobs], "{d}");
}

/// Lists `first` then `then` as `agent`'s upstreams (it enrolled with the active node).
fn prefer(agent: &Agent, first: &str, then: &str) {
    set_upstreams(agent, &[first.to_owned(), then.to_owned()]);
}

/// Lists `upstreams` as `agent`'s (it enrolled with the active node, which members leave
/// enrollment to).
fn set_upstreams(agent: &Agent, upstreams: &[String]) {
    let path = agent.dir.join("agent.json");
    let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    state["upstreams"] = json!(upstreams);
    std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
}

fn clear(marks: &Path) {
    for f in std::fs::read_dir(marks).unwrap().flatten() {
        std::fs::remove_file(f.path()).unwrap();
    }
}

/// `tether-server drain` of member `node` (run in `cwd`), which served one session (an agent or
/// a relay's link).
fn drain_one(node: &Server, cwd: &Path) {
    let out = tether_tests::run(
        "tether-server",
        cwd,
        ["drain", "--data", node.dir.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", tether_tests::stderr(&out));
    let said = tether_tests::stdout(&out);
    assert!(said.contains("1 sessions closed"), "{said}");
}

/// Another node of `a`'s cluster named `name`, in `dir`, started and listening (a member).
fn member_of(a: &Server, dir: &Path, name: &str) -> Server {
    let mut node = a.another_node(dir, &[("TETHER_STORAGE__NODE_NAME", name)]);
    node.wait_active(WAIT);
    node
}

/// Agents "on-b", served by member `b` (it lists node `a` next), and "on-a", served by `a` (it
/// lists `on_a_upstreams`), both enrolled at `a` (enrolling is the active node's) and running
/// in `root`.
fn one_agent_on_each(
    pg: &Postgres,
    a: &Server,
    b: &Server,
    root: &Path,
    on_a_upstreams: &[String],
) -> (Agent, Agent) {
    // Enrolling is the active node's: on-b's install goes on to node a.
    let mut on_b = Agent::install_via(a, &[b.upstream(), a.upstream()], root, "on-b", &[], &[]);
    prefer(&on_b, &b.upstream(), &a.upstream());
    let mut on_a = Agent::install_via(a, &[a.upstream()], root, "on-a", &[], &[]);
    set_upstreams(&on_a, on_a_upstreams);
    on_b.run();
    on_a.run();
    eventually("on-b claimed by node b", WAIT, || {
        (claim(pg, &on_b.id) == "node-b 1").then_some(())
    });
    eventually("on-a online on node a", WAIT, || {
        (a.agent_status(&on_a.id) == "online").then_some(())
    });
    (on_b, on_a)
}

/// Node a (active, with `env_a`) and member b on one PostgreSQL, the marking process on node
/// a, and one agent enrolled at node a and served by node b (it lists node a next).
struct OneAgentOnB {
    a: Server,
    b: Server,
    b_dir: std::path::PathBuf,
    marks: std::path::PathBuf,
    agent: Agent,
    /// Last: removed once the processes are gone.
    tmp: TestDir,
}

impl OneAgentOnB {
    fn start(pg: &Postgres, env_a: &[(String, String)], name: &str) -> OneAgentOnB {
        let tmp = TestDir::new();
        let a = Server::start_with(&tmp.path().join("a"), &borrowed(env_a));
        let b_dir = tmp.path().join("b");
        let b = member_of(&a, &b_dir, "node-b");
        let marks = tmp.path().join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        marking_process(&a, "marks", STEPS, &marks);
        let mut agent = Agent::install_via(&a, &[a.upstream()], tmp.path(), name, &[], &[]);
        prefer(&agent, &b.upstream(), &a.upstream());
        agent.run();
        eventually("the agent claimed by node b", WAIT, || {
            (claim(pg, &agent.id) == "node-b 1").then_some(())
        });
        OneAgentOnB {
            a,
            b,
            b_dir,
            marks,
            agent,
            tmp,
        }
    }
}

#[test]
fn a_member_node_serves_agents_whose_work_the_active_node_started_and_hands_them_over_when_killed()
{
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let env_a = node(&pg, "node-a");
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&env_a));
    let b_dir = tmp.path().join("b");
    let mut b = a.another_node(&b_dir, &[("TETHER_STORAGE__NODE_NAME", "node-b")]);
    // The member listens for agents at once; operators are sent to the active node.
    b.wait_active(WAIT);
    let h = eventually("the member's health", WAIT, || b.try_health());
    assert_eq!(h["cluster"]["role"], "member", "{h}");
    assert_eq!(h["cluster"]["active"]["node"], "node-a", "{h}");
    let r = b.request("GET", "/api/v1/deployments", None);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("member") && r.body.contains("node-a"),
        "{}",
        r.body
    );
    // `tether health` says what it is, and a member that serves is healthy.
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    let ca = a.operator_ca_path();
    let out = cli.run_with(
        &[
            (
                "TETHER_SERVER",
                tether_tests::tether_cli::server_url(&b).as_str(),
            ),
            ("TETHER_CA", ca.to_str().unwrap()),
            ("TETHER_TOKEN", a.admin_token.as_str()),
        ],
        None,
        &["health"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", tether_tests::stderr(&out));
    let text = tether_tests::stdout(&out);
    assert!(
        text.contains("member") && text.contains("node-b") && text.contains("node-a"),
        "{text}"
    );

    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", STEPS, &marks);
    // on-b reaches node b first (node a only if b is gone); on-a only node a.
    let (on_b, on_a) = one_agent_on_each(&pg, &a, &b, tmp.path(), &[a.upstream()]);
    // The active node shows on-b online, served by node b.
    let seen = eventually("on-b online on node a, by node b", WAIT, || {
        let v = a
            .request("GET", &format!("/api/v1/agents/{}", on_b.id), None)
            .json();
        (v["status"] == "online" && v["node"] == "node-b").then_some(v)
    });
    assert_eq!(seen["version"], env!("CARGO_PKG_VERSION"), "{seen}");
    // What it said of its machine reached node a too (it never connected there).
    let facts = eventually("on-b's facts, through node b", WAIT, || {
        let v = a
            .request("GET", &format!("/api/v1/agents/{}", on_b.id), None)
            .json();
        v["facts"].get("arch").map(|_| v["facts"].clone())
    });
    assert_eq!(facts["arch"], std::env::consts::ARCH, "{facts}");
    // So does the web application, on the agent's page and in the list.
    let password = std::fs::read_to_string(a.dir.join("admin.password")).unwrap();
    let cookie = a.web_login("admin", password.trim());
    for page in [format!("/agents/{}", on_b.id), "/agents".to_owned()] {
        let html = a.web_get(&cookie, &page);
        assert_eq!(html.status, 200, "{page}: {}", html.body);
        assert!(
            html.body
                .contains("served by node <strong class=\"node\">node-b</strong>"),
            "{page}: {}",
            html.body
        );
    }

    // Started on node a, for an agent node b serves: its jobs travel through the database.
    let id = deploy(&a, &[&on_b, &on_a]);
    every_step_once(&a, &id, &marks, 2);
    for i in [1, STEPS] {
        let log = a.request(
            "GET",
            &format!("/api/v1/deployments/{id}/jobs/on-b/steps/s{i}/log"),
            None,
        );
        assert!(
            log.body.contains(&format!("output of s{i}")),
            "s{i}: {}",
            log.body
        );
    }
    // Probes queued on node a reach on-b through node b, and come back, each exactly once.
    let probes = format!("/api/v1/agents/{}/probes", on_b.id);
    let r = a.request(
        "POST",
        &probes,
        Some(&json!({"commands": 300, "events": 300})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let p = eventually("every probe arrived", WAIT, || {
        let p = a.probes(&on_b.id);
        (p["echoes"]["received"].as_u64() >= Some(300)
            && p["events"]["received"].as_u64() >= Some(300))
        .then_some(p)
    });
    for series in ["echoes", "events"] {
        assert_eq!(p[series]["received"], 300, "{series}: {p}");
        assert_eq!(p[series]["duplicates"], 0, "{series} delivered twice: {p}");
        assert_eq!(p[series]["gaps"], 0, "{series} skipped: {p}");
    }
    // Nothing waits in the inbox or the mailbox once it is all done: node a wrote on-b's
    // commands into its stream itself (its bell says up to which one).
    eventually("inbox and mailbox empty", WAIT, || {
        let left: u64 = pg
            .psql("SELECT count(*) FROM tether_journal WHERE substring(key from 1 for 7) = 'Minbox/'::bytea OR substring(key from 1 for 9) = 'Mmailbox/'::bytea")
            .parse()
            .unwrap_or(1);
        (left == 0).then_some(())
    });
    let bell = pg.psql(&format!(
        "SELECT count(*) FROM tether_journal WHERE key = 'Mbell/{}/last'::bytea",
        on_b.id
    ));
    assert_eq!(bell, "1", "node a wrote on-b's stream");
    let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
    assert!(log.contains("serving-agents-as-a-member"), "{log}");

    // Node b killed in the middle of a deployment: on-b goes on with node a, and every step
    // still runs once.
    clear(&marks);
    let id = deploy(&a, &[&on_b, &on_a]);
    eventually("the deployment under way on on-b", WAIT, || {
        marks_in(&marks).iter().any(|l| l.len() >= 2).then_some(())
    });
    b.kill();
    eventually("on-b claimed by node a", WAIT, || {
        claim(&pg, &on_b.id).starts_with("node-a ").then_some(())
    });
    every_step_once(&a, &id, &marks, 2);
    let v = a
        .request("GET", &format!("/api/v1/agents/{}", on_b.id), None)
        .json();
    assert_eq!(v["status"], "online", "{v}");
    assert!(v.get("node").is_none(), "served by node a now: {v}");
}

/// Queues `commands` probe commands and `events` probe events for `agent` on `server`
/// (answered 202 once they are journaled; another status queued nothing).
fn queue_probes(server: &Server, agent: &str, commands: u64, events: u64) -> bool {
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{agent}/probes"),
        Some(&json!({"commands": commands, "events": events})),
    );
    r.status == 202
}

/// Every probe of `agent` arrived on `server`, exactly once, in order.
fn every_probe_once(server: &Server, agent: &str, commands: u64, events: u64) {
    let p = eventually("every probe arrived", Duration::from_secs(120), || {
        let p = server.probes(agent);
        (p["echoes"]["received"].as_u64() >= Some(commands)
            && p["events"]["received"].as_u64() >= Some(events))
        .then_some(p)
    });
    for (series, n) in [("echoes", commands), ("events", events)] {
        assert_eq!(p[series]["received"], n, "{series}: {p}");
        assert_eq!(p[series]["duplicates"], 0, "{series} delivered twice: {p}");
        assert_eq!(p[series]["gaps"], 0, "{series} skipped: {p}");
    }
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        signal,
    )
    .unwrap();
}

/// How many inbox rows wait for `agent`.
fn inbox_rows(pg: &Postgres, agent: &str) -> u64 {
    pg.psql(&format!(
        "SELECT count(*) FROM tether_journal WHERE substring(key from 1 for {}) = 'Minbox/{agent}/'::bytea",
        "Minbox//".len() + agent.len()
    ))
    .parse()
    .unwrap_or(0)
}

#[test]
fn thousands_of_events_left_in_the_inbox_take_effect_in_pages_and_before_the_agents_next_ones() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    // A lease long enough for node a to be frozen without node b taking it.
    let mut env_a = node(&pg, "node-a");
    for (k, v) in &mut env_a {
        if k == "TETHER_STORAGE__LEASE_TTL_MS" {
            *v = "60000".into();
        }
    }
    // (The directory first: it goes last, once the processes are gone.)
    let OneAgentOnB {
        tmp,
        a,
        mut b,
        agent,
        ..
    } = OneAgentOnB::start(&pg, &env_a, "backlog");
    let a_dir = tmp.path().join("a");
    // Probe events asked for, then node a frozen: node b accepts them into the inbox, where
    // they wait (many pages of them, under the 10,000 a member leaves waiting).
    const EVENTS: u64 = 9000;
    assert!(queue_probes(&a, &agent.id, 0, EVENTS));
    let a_pid = a.pid().unwrap();
    signal(a_pid, nix::sys::signal::Signal::SIGSTOP);
    eventually("eight pages of events in the inbox", WAIT, || {
        (inbox_rows(&pg, &agent.id) >= 8 * 1024).then_some(())
    });
    // Node b goes; the agent connects to node a (its kernel takes the connection while the
    // process is frozen), and node a wakes up: its handshake finds most of the inbox still
    // there, whose events take effect first (the agent's next events are put off meanwhile),
    // each once.
    b.kill();
    let to_a = format!(":{:04X} st=01", a.wss.port());
    eventually("the agent connected to node a", WAIT, || {
        let worker = agent.worker_pid()?;
        tether_tests::wire::tcp_connections(worker)
            .iter()
            .any(|c| c.ends_with(&to_a))
            .then_some(())
    });
    signal(a_pid, nix::sys::signal::Signal::SIGCONT);
    eventually("backlog claimed by node a", WAIT, || {
        claim(&pg, &agent.id).starts_with("node-a ").then_some(())
    });
    every_probe_once(&a, &agent.id, 0, EVENTS);
    assert_eq!(inbox_rows(&pg, &agent.id), 0);
    let log = std::fs::read_to_string(a_dir.join("server.log")).unwrap();
    assert!(log.contains("inbox-behind-events-put-off"), "{log}");
    assert!(log.contains("inbox-caught-up"), "{log}");
}

#[test]
fn an_agent_whose_claim_flaps_between_a_member_and_the_active_node_loses_and_doubles_nothing() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let OneAgentOnB {
        tmp: _tmp,
        a,
        mut b,
        b_dir,
        marks,
        agent,
    } = OneAgentOnB::start(&pg, &node(&pg, "node-a"), "flap");
    let (mut commands, mut events) = (0u64, 0u64);
    let mut queue = |c: u64, e: u64| {
        if queue_probes(&a, &agent.id, c, e) {
            commands += c;
            events += e;
        }
    };
    queue(300, 300);
    let id = deploy(&a, &[&agent]);
    // The claim is taken away over and over, now by node a, now by node b, as sessions
    // flapping between the two would: node b's commits under the older claim are refused,
    // its session closed, and the agent comes back to claim it again.
    let started = std::time::Instant::now();
    let mut bumps = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let to = ["node-a", "node-b"][bumps % 2];
        pg.psql(&format!(
            "UPDATE tether_claims SET node = '{to}', epoch = epoch + 1 WHERE claim = '{}'",
            agent.id
        ));
        bumps += 1;
        if bumps % 10 == 0 {
            queue(50, 50);
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
    let given_up = log.matches("agent-claimed-elsewhere").count();
    eprintln!("{bumps} claims taken away; node b gave the agent up {given_up} times");
    assert!(given_up >= 3, "the flapping reached node b's commits");
    every_step_once(&a, &id, &marks, 1);
    every_probe_once(&a, &agent.id, commands, events);
    drop(b.child.take());
}

#[test]
fn a_member_cut_off_from_the_database_acknowledges_nothing_and_its_agents_finish_elsewhere() {
    if !tether_tests::blackhole::Blackhole::available() {
        return;
    }
    let Some(pg) = Postgres::start_tcp() else {
        return;
    };
    let tmp = TestDir::new();
    let mut env_a = node(&pg, "node-a");
    for (k, v) in &mut env_a {
        if k == "TETHER_STORAGE__URL" {
            *v = pg.tcp_url("127.0.0.1");
        }
    }
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&env_a));
    // Node b reaches the database at 127.0.0.2: the way that is cut.
    let b_dir = tmp.path().join("b");
    let url_b = pg.tcp_url("127.0.0.2");
    let mut b = a.another_node(
        &b_dir,
        &[
            ("TETHER_STORAGE__NODE_NAME", "node-b"),
            ("TETHER_STORAGE__URL", &url_b),
        ],
    );
    b.wait_active(WAIT);
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", STEPS, &marks);
    let both = [b.upstream(), a.upstream()];
    let mut agent = Agent::install_via(&a, &both, tmp.path(), "cut", &[], &[]);
    prefer(&agent, &b.upstream(), &a.upstream());
    agent.run();
    eventually("cut claimed by node b", WAIT, || {
        (claim(&pg, &agent.id) == "node-b 1").then_some(())
    });
    let id = deploy(&a, &[&agent]);
    eventually("the deployment under way", WAIT, || {
        marks_in(&marks).iter().any(|l| l.len() >= 2).then_some(())
    });
    assert!(queue_probes(&a, &agent.id, 200, 200));
    // The network between node b and the database fails silently mid-deployment: node b can
    // commit, so acknowledge, nothing; once the database has been silent for a lease it lets
    // the agent go, which finishes with node a, every step run once, every probe once.
    let cut = tether_tests::blackhole::Blackhole::cut(pg.tcp_addr("127.0.0.2"));
    eventually("cut claimed by node a", Duration::from_secs(90), || {
        claim(&pg, &agent.id).starts_with("node-a ").then_some(())
    });
    every_step_once(&a, &id, &marks, 1);
    every_probe_once(&a, &agent.id, 200, 200);
    let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
    assert!(log.contains("member-lost-the-database"), "{log}");
    drop(cut);
}

/// The node of `nodes` that is active now (its health says so).
fn active_of<'a>(nodes: &[&'a Server]) -> Option<&'a Server> {
    nodes.iter().copied().find(|n| {
        n.try_health()
            .is_some_and(|h| h["cluster"]["role"] == "active")
    })
}

/// Waits for deployment `id` to succeed on whichever of `nodes` is active (it may change
/// meanwhile); then every step ran exactly once on each of its `jobs` agents.
fn every_step_once_on_any(nodes: &[&Server], id: &str, marks: &Path, jobs: usize) {
    let d = eventually("the deployment succeeded", Duration::from_secs(180), || {
        let server = active_of(nodes)?;
        let r = server.request("GET", &format!("/api/v1/deployments/{id}"), None);
        (r.status == 200 && r.json()["status"] == "succeeded").then(|| r.json())
    });
    let expected: Vec<String> = (1..=STEPS).map(|i| format!("s{i}")).collect();
    let got = marks_in(marks);
    assert_eq!(got.len(), jobs, "{d}");
    assert!(
        got.iter().all(|m| *m == expected),
        "a step ran twice or not at all: {got:?}"
    );
}

#[test]
fn three_nodes_serve_a_fleet_and_lose_nothing_when_one_is_killed_or_each_restarted_in_turn() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let mut a = Server::start_with(&tmp.path().join("a"), &borrowed(&node(&pg, "node-a")));
    let mut b = a.another_node(
        &tmp.path().join("b"),
        &[("TETHER_STORAGE__NODE_NAME", "node-b")],
    );
    let mut c = a.another_node(
        &tmp.path().join("c"),
        &[("TETHER_STORAGE__NODE_NAME", "node-c")],
    );
    b.wait_active(WAIT);
    c.wait_active(WAIT);
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", STEPS, &marks);
    // Direct agents list the two members only, spread over them by their ids; a relay that
    // lists node c first (then node a) carries a few more.
    let members = [b.upstream(), c.upstream()];
    let spread = [("TETHER_AGENT__SPREAD_OVER_UPSTREAMS", "true")];
    let relay =
        tether_tests::relays::Relay::start(&a, &[c.upstream(), a.upstream()], tmp.path(), "relay");
    let mut agents: Vec<Agent> = (1..=16)
        .map(|i| {
            let name = format!("d{i:02}");
            let mut agent =
                Agent::install_via(&a, &[a.upstream()], tmp.path(), &name, &[], &spread);
            set_upstreams(&agent, &members);
            agent.run();
            agent
        })
        .collect();
    for i in 1..=4 {
        let mut agent = Agent::install_via(
            &a,
            &[relay.upstream()],
            tmp.path(),
            &format!("r{i}"),
            &[],
            &[],
        );
        agent.run();
        agents.push(agent);
    }
    let served_by = |agent: &Agent| {
        claim(&pg, &agent.id)
            .split(' ')
            .next()
            .unwrap_or("")
            .to_owned()
    };
    eventually("every agent claimed", WAIT, || {
        agents
            .iter()
            .all(|ag| !served_by(ag).is_empty())
            .then_some(())
    });
    let by: Vec<String> = agents.iter().map(served_by).collect();
    for (agent, node) in agents.iter().zip(&by) {
        let expected: &[&str] = match agent.name.starts_with('r') {
            true => &["node-c"],
            false => &["node-b", "node-c"],
        };
        assert!(
            expected.contains(&node.as_str()),
            "{} served by {node}",
            agent.name
        );
    }
    let on = |n: &str| by.iter().filter(|b| *b == n).count();
    eprintln!(
        "served by node b: {}, node c: {}, node a: {}",
        on("node-b"),
        on("node-c"),
        on("node-a")
    );
    assert!(
        on("node-b") >= 2 && on("node-c") >= 6,
        "the agents spread over the members: {by:?}"
    );
    let all: Vec<&Agent> = agents.iter().collect();

    // A deployment to all of them, started on the active node; node c killed in its middle.
    let id = deploy(&a, &all);
    eventually("the deployment under way", WAIT, || {
        marks_in(&marks)
            .iter()
            .filter(|l| l.len() >= 2)
            .count()
            .ge(&4)
            .then_some(())
    });
    c.kill();
    every_step_once_on_any(&[&a, &b], &id, &marks, all.len());
    // Direct agents went to node b, the relay (and the agents behind it) to node a.
    eventually("node c's agents on node b or node a", WAIT, || {
        agents
            .iter()
            .all(|ag| match ag.name.starts_with('d') {
                true => served_by(ag) == "node-b",
                false => served_by(ag) == "node-a",
            })
            .then_some(())
    });

    // A rolling restart of the three, one at a time, while a deployment runs.
    c.spawn();
    c.wait_active(WAIT);
    clear(&marks);
    let id = deploy(&a, &all);
    for (i, node) in [&mut b, &mut c, &mut a].into_iter().enumerate() {
        eventually("the deployment under way", WAIT, || {
            marks_in(&marks)
                .iter()
                .map(Vec::len)
                .sum::<usize>()
                .ge(&(4 * (i + 1)))
                .then_some(())
        });
        node.stop();
        node.spawn();
        node.wait_active(WAIT);
    }
    every_step_once_on_any(&[&a, &b, &c], &id, &marks, all.len());
    drop(relay);
}

#[test]
fn a_member_refuses_relays_and_refuses_agents_while_the_active_node_does_not_take_members() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    // Node a does not take what members carry (its flag is off); node b has it on.
    let mut env_a = node(&pg, "node-a");
    for (k, v) in &mut env_a {
        if k == "TETHER_STORAGE__EVERY_NODE_SERVES_AGENTS" {
            *v = "false".into();
        }
    }
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&env_a));
    let b_dir = tmp.path().join("b");
    let mut b = a.another_node(
        &b_dir,
        &[
            ("TETHER_STORAGE__NODE_NAME", "node-b"),
            ("TETHER_STORAGE__EVERY_NODE_SERVES_AGENTS", "true"),
        ],
    );
    b.wait_active(WAIT);
    let tls = tether_tests::wire::tls_config(&a);
    let refused = |path: &str| -> String {
        match tether_tests::wire::WsClient::connect_to(b.wss, tls.clone(), path) {
            Ok(_) => panic!("node b upgraded {path}"),
            Err(e) => e.to_string(),
        }
    };
    // On the real socket: the relay link and the agents' endpoint both answer 503, and say
    // where to go instead.
    let relay = refused(tether_shared::mux::RELAY_WS_PATH);
    assert!(relay.contains("503"), "{relay}");
    let agent_ws = refused(tether_shared::enroll::WS_PATH);
    assert!(agent_ws.contains("503"), "{agent_ws}");
    // A real agent listing node b first ends up on node a, and node b claimed nothing.
    let mut agent = Agent::install_via(&a, &[a.upstream()], tmp.path(), "first-b", &[], &[]);
    prefer(&agent, &b.upstream(), &a.upstream());
    agent.run();
    eventually("first-b online on node a", WAIT, || {
        (a.agent_status(&agent.id) == "online").then_some(())
    });
    let claimed_by_b = pg
        .psql("SELECT count(*) FROM tether_claims WHERE node = 'node-b' AND claim NOT LIKE '%@%'");
    assert_eq!(claimed_by_b, "0");
    let inboxed = pg.psql(
        "SELECT count(*) FROM tether_journal WHERE substring(key from 1 for 7) = 'Minbox/'::bytea",
    );
    assert_eq!(inboxed, "0");
    let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
    assert!(!log.contains(&agent.id), "node b served first-b: {log}");
}

/// Runs of every job simulated agents ran, `<agent> <job>` to how many times.
fn job_runs(fleets: &[&tether_tests::loadgen::Fleet]) -> std::collections::BTreeMap<String, u32> {
    let mut all = std::collections::BTreeMap::new();
    for f in fleets {
        all.extend(f.stats().job_runs.lock().unwrap().clone());
    }
    all
}

/// Waits for deployment `id` on `server` to succeed.
fn succeeded(server: &Server, id: &str) {
    eventually("the deployment succeeded", Duration::from_secs(180), || {
        let r = server.request("GET", &format!("/api/v1/deployments/{id}?jobs=false"), None);
        assert_ne!(r.json()["status"], "failed", "{}", r.body);
        (r.json()["status"] == "succeeded").then_some(())
    });
}

#[test]
fn deployments_to_a_hundred_agents_on_two_members_started_on_the_node_that_serves_none_run_each_job_once_through_a_kill(
) {
    let Some(pg) = Postgres::start() else {
        return;
    };
    const AGENTS: usize = 100;
    let tmp = TestDir::new();
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&node(&pg, "node-a")));
    let mut b = member_of(&a, &tmp.path().join("b"), "node-b");
    let mut c = member_of(&a, &tmp.path().join("c"), "node-c");
    // A hundred simulated agents (the real protocol, TLS and end-to-end sealing), half on
    // node b and half on node c, each listing the other member as its next upstream.
    let (tls, mut on_b) = enroll_at(&a, "sim", AGENTS).unwrap();
    let on_c = on_b.split_off(AGENTS / 2);
    let ids: Vec<String> = on_b
        .iter()
        .chain(on_c.iter())
        .map(|e| e.agent_id.clone())
        .collect();
    let probed: Vec<String> = ids.iter().step_by(10).cloned().collect();
    let sim = |to, then| {
        let mut cfg = SimConfig::new(to, "localhost", tls.clone());
        cfg.fallback = Some(then);
        cfg
    };
    let fleet_b = Fleet::start(sim(b.wss, c.wss), on_b).unwrap();
    let fleet_c = Fleet::start(sim(c.wss, b.wss), on_c).unwrap();
    let claimed = |by: &str| -> usize {
        pg.psql(&format!(
            "SELECT count(*) FROM tether_claims WHERE node = '{by}' AND claim NOT LIKE '%@%'"
        ))
        .parse()
        .unwrap_or(0)
    };
    eventually("each member serving its fifty", WAIT, || {
        (claimed("node-b") == AGENTS / 2
            && claimed("node-c") == AGENTS / 2
            && fleet_b.stats().ready.load(Ordering::Relaxed) == AGENTS / 2
            && fleet_c.stats().ready.load(Ordering::Relaxed) == AGENTS / 2)
            .then_some(())
    });
    a.shell_process("trivial", "echo hello");
    // Started on node a, which serves none of them.
    let (_, each) = tether_tests::measure::dispatch(&a, "trivial", &ids).expect("deployment");
    assert_eq!(each.len(), AGENTS);
    assert_eq!(claimed("node-a"), 0, "node a served none of them");
    // More deployments and probes, and node b killed while they run: its agents go to node
    // c, and every job still runs once, every probe arrives once.
    for agent in &probed {
        assert!(queue_probes(&a, agent, 50, 50));
    }
    let started: Vec<String> = (0..3)
        .map(|_| {
            let r = a.request(
                "POST",
                "/api/v1/deployments",
                Some(&json!({"process": "trivial", "targets": {"agents": ids}})),
            );
            assert_eq!(r.status, 201, "{}", r.body);
            r.json()["id"].as_str().unwrap().to_owned()
        })
        .collect();
    b.kill();
    eprintln!(
        "node b killed with {} of {} jobs run",
        job_runs(&[&fleet_b, &fleet_c]).len(),
        4 * AGENTS
    );
    for id in &started {
        succeeded(&a, id);
    }
    eventually("node c serving all of them", WAIT, || {
        (claimed("node-c") == AGENTS).then_some(())
    });
    let runs = job_runs(&[&fleet_b, &fleet_c]);
    assert_eq!(runs.len(), 4 * AGENTS, "every job ran");
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    for agent in &probed {
        every_probe_once(&a, agent, 50, 50);
    }
    drop(fleet_b);
    drop(fleet_c);
    drop(c.child.take());
}

#[test]
fn a_drained_member_sends_its_agents_on_and_takes_no_more_while_their_work_finishes_once() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let OneAgentOnB {
        tmp,
        a,
        b,
        b_dir,
        marks,
        agent,
    } = OneAgentOnB::start(&pg, &node(&pg, "node-a"), "drained");
    // Not without the admin token.
    let refused = b.request_as("not-a-token", "POST", "/admin/drain", None);
    assert_eq!(refused.status, 401, "{}", refused.body);
    let id = deploy(&a, &[&agent]);
    eventually("the deployment under way", WAIT, || {
        marks_in(&marks).iter().any(|l| !l.is_empty()).then_some(())
    });
    drain_one(&b, tmp.path());
    // The agent goes on with node a, which it lists next, and finishes there, every step once;
    // node b stays up, says it is drained, and serves nobody.
    eventually("drained claimed by node a", WAIT, || {
        claim(&pg, &agent.id).starts_with("node-a ").then_some(())
    });
    every_step_once(&a, &id, &marks, 1);
    let h = b.try_health().unwrap();
    assert_eq!(h["cluster"]["role"], "member", "{h}");
    assert_eq!(h["cluster"]["drained"], true, "{h}");
    // Agents that list it are refused at once (and go on to their next upstream).
    let refused = tether_tests::wire::WsClient::connect_to(
        b.wss,
        tether_tests::wire::tls_config(&a),
        tether_shared::enroll::WS_PATH,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    // (Retry-After 5: the drained node's refusal, not a member's other ones.)
    assert!(
        refused.contains("503") && refused.to_ascii_lowercase().contains("retry-after: 5"),
        "{refused}"
    );
    clear(&marks);
    let again = deploy(&a, &[&agent]);
    every_step_once(&a, &again, &marks, 1);
    assert!(claim(&pg, &agent.id).starts_with("node-a "));
    let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
    assert!(log.contains("member-drained"), "{log}");
}

#[test]
fn agents_whose_connections_flap_between_a_member_and_the_active_node_many_times_a_second_lose_and_double_nothing(
) {
    let Some(pg) = Postgres::start() else {
        return;
    };
    const AGENTS: usize = 8;
    let tmp = TestDir::new();
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&node(&pg, "node-a")));
    let b = member_of(&a, &tmp.path().join("b"), "node-b");
    // Each connection lands on the other node than the last one, and every connection is cut
    // every 100 ms: the agents' sessions flap between node a and node b several times a
    // second, each new session taking the claim from the node of the last one.
    let flapper = tether_tests::fleet::Forwarder::alternating(vec![b.wss, a.wss]);
    let (tls, enrolled) = enroll_at(&a, "flap", AGENTS).unwrap();
    let ids: Vec<String> = enrolled.iter().map(|e| e.agent_id.clone()).collect();
    let mut cfg = SimConfig::new(flapper.addr, "localhost", tls);
    cfg.reconnect_min = Duration::from_millis(10);
    cfg.reconnect_max = Duration::from_millis(100);
    let fleet = Fleet::start(cfg, enrolled).unwrap();
    eventually("every agent served", WAIT, || {
        (fleet.stats().ready.load(Ordering::Relaxed) == AGENTS).then_some(())
    });
    a.shell_process("trivial", "echo hello");
    let mut deployments = Vec::new();
    let mut probes: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let started = std::time::Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(6) {
        if round.is_multiple_of(5) {
            // Work keeps coming while the sessions flap (it may be refused while the
            // active node's own session of an agent is being replaced: then it is not counted).
            let r = a.request(
                "POST",
                "/api/v1/deployments",
                Some(&json!({"process": "trivial", "targets": {"agents": ids}})),
            );
            if r.status == 201 {
                deployments.push(r.json()["id"].as_str().unwrap().to_owned());
            }
            for id in &ids {
                if queue_probes(&a, id, 20, 20) {
                    *probes.entry(id.clone()).or_default() += 20;
                }
            }
        }
        flapper.cut();
        round += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // A deployment stored but whose jobs were not all queued at once (`503`: a job's commit
    // was refused as its agent's session moved) runs too: every stored one is checked.
    let stored: Vec<String> = a
        .request("GET", "/api/v1/deployments", None)
        .json()
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|d| d["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(deployments.iter().all(|d| stored.contains(d)), "{stored:?}");
    let deployments = stored;
    let welcomes = fleet.stats().welcomes.load(Ordering::Relaxed);
    let epochs: u64 = pg
        .psql("SELECT coalesce(sum(epoch), 0) FROM tether_claims WHERE claim NOT LIKE '%@%'")
        .parse()
        .unwrap();
    eprintln!(
        "{welcomes} sessions in {round} cuts; {epochs} claims taken; {} deployments",
        deployments.len()
    );
    assert!(
        epochs >= 10 * AGENTS as u64,
        "the claims moved between the nodes: {epochs}"
    );
    assert!(!deployments.is_empty());
    for id in &deployments {
        succeeded(&a, id);
    }
    let runs = job_runs(&[&fleet]);
    assert_eq!(runs.len(), deployments.len() * AGENTS, "every job ran");
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(probes.len(), AGENTS, "probes queued for every agent");
    for (id, n) in &probes {
        every_probe_once(&a, id, *n, *n);
    }
}

#[test]
fn an_agent_installed_through_a_load_balancer_that_sends_it_to_a_member_enrolls_there_at_once() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&node(&pg, "node-a")));
    let b = member_of(&a, &tmp.path().join("b"), "node-b");
    let b_log = || file(&tmp.path().join("b"), "server.log");
    let agents = || -> Vec<Value> {
        a.request("GET", "/api/v1/agents", None)
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    // On the member's real socket: a token that does not exist, and a body that is not an
    // enrollment, are refused with the active node's answer; nothing is enrolled, nothing
    // is left in the database.
    let tls = tether_tests::wire::tls_config(&a);
    let forged =
        tether_tests::loadgen::enroll(b.wss, tls.clone(), "localhost", "tte_nope", "forged")
            .err()
            .expect("a forged token enrolled");
    assert!(forged.contains("401"), "{forged}");
    let garbage = tether_tests::https_request_with_body(
        b.wss,
        tls.clone(),
        "localhost",
        "POST",
        tether_shared::enroll::ENROLL_PATH,
        &[("Content-Type", "application/json")],
        Some(b"{\"token\": 7}"),
    )
    .unwrap();
    assert_eq!(garbage.status, 400, "{}", garbage.body);
    assert!(agents().is_empty());
    assert!(b_log().contains("enrollment-forwarded-to-the-active-node"));
    // (Of node b: the planted request's answer below stays a minute.)
    let rows = || {
        pg.psql(
            "SELECT count(*) FROM tether_journal WHERE substring(key from 1 for 7) = 'Menroll'::bytea \
             AND position('node-x'::bytea in key) = 0",
        )
    };
    eventually("no request or answer left", WAIT, || {
        (rows() == "0").then_some(())
    });
    // A request not sealed with the cluster's ring (written by whoever can write to the
    // database) is answered 400 and removed; it enrolls nobody.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let id = format!("node-x/{now_ms:013}-0-1");
    let body = json!({"token": "tte_nope", "name": "planted"}).to_string();
    forge_meta(
        &pg,
        &format!("enroll/{id}"),
        json!({"source": null, "body": body}).to_string().as_bytes(),
    );
    let count = |key: String| {
        pg.psql(&format!(
            "SELECT count(*) FROM tether_journal WHERE key = convert_to('M{key}', 'UTF8')"
        ))
    };
    eventually("the planted request answered 400 and removed", WAIT, || {
        (count(format!("enroll/{id}")) == "0" && count(format!("enrolled/{id}")) == "1")
            .then_some(())
    });
    let answer = pg.psql(&format!(
        "SELECT convert_from(substring(value from 6), 'UTF8') FROM tether_journal \
         WHERE key = convert_to('Menrolled/{id}', 'UTF8')"
    ));
    assert!(answer.contains("\"status\":400"), "{answer}");
    assert!(agents().is_empty());

    // Requests are aged by their member's life (in `tether_nodes`, by the database's clock),
    // not by the stamp of a clock that may differ from the active node's: one stamped five
    // minutes ago by node b, which is alive, is answered; one of a member not heard from for
    // two minutes is dropped unanswered (nobody waits for it).
    pg.psql(
        "INSERT INTO tether_nodes (name, role, version, seen_at) \
         VALUES ('node-z', 'member', '0.2.0', now() - interval '2 minutes')",
    );
    eventually("node-z listed as silent by node a", WAIT, || {
        let health = a.request("GET", "/admin/health", None).json();
        let nodes = health["cluster"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        nodes
            .iter()
            .any(|n| n["node"] == "node-z" && n["seen_ms_ago"].as_i64() >= Some(60_000))
            .then_some(())
    });
    let skewed = format!("node-b/{:013}-0-2", now_ms - 5 * 60_000);
    let silent = format!("node-z/{now_ms:013}-0-3");
    for id in [&skewed, &silent] {
        forge_meta(
            &pg,
            &format!("enroll/{id}"),
            json!({"source": null, "body": body}).to_string().as_bytes(),
        );
    }
    eventually("both requests taken", WAIT, || {
        (count(format!("enroll/{skewed}")) == "0" && count(format!("enroll/{silent}")) == "0")
            .then_some(())
    });
    assert_eq!(count(format!("enrolled/{skewed}")), "1", "answered");
    assert_eq!(count(format!("enrolled/{silent}")), "0", "dropped");
    assert!(
        file(&tmp.path().join("a"), "server.log").contains("forwarded-enrollment-orphaned-dropped")
    );
    pg.psql("DELETE FROM tether_nodes WHERE name = 'node-z'");
    // (Its answer would stay a minute.)
    pg.psql(&format!(
        "DELETE FROM tether_journal WHERE key = convert_to('Menrolled/{skewed}', 'UTF8')"
    ));

    // One address for the cluster, as a TCP load balancer gives: the first connection goes to
    // the member, which has the active node enroll the agent, at once.
    let lb = tether_tests::fleet::Forwarder::alternating(vec![b.wss, a.wss]);
    let upstream = format!("wss://localhost:{}", lb.addr.port());
    let mut agent = Agent::install_via(&a, &[upstream], tmp.path(), "via-lb", &[], &[]);
    let log = file(tmp.path(), "via-lb-install.log");
    assert!(
        !log.contains("enroll-upstreams-unavailable-trying-again"),
        "{log}"
    );
    assert_eq!(lb.accepted(), 1, "enrolled on its first connection");
    // Enrolled once; it comes online through the same address (either node serves it).
    agent.run();
    eventually("via-lb online", WAIT, || {
        (a.agent_status(&agent.id) == "online").then_some(())
    });
    let named = agents().iter().filter(|v| v["name"] == "via-lb").count();
    assert_eq!(named, 1);
    assert_eq!(rows(), "0");

    // The caller's address reaches the active node: refusals through the member count against
    // it there, as if it had called the active node itself.
    for i in 1..ENROLL_FAILURES_PER_WINDOW {
        let e =
            tether_tests::loadgen::enroll(b.wss, tls.clone(), "localhost", "tte_nope", "forged")
                .err()
                .expect("a forged token enrolled");
        assert!(e.contains("401"), "try {i}: {e}");
    }
    let direct = tether_tests::loadgen::enroll(a.wss, tls, "localhost", "tte_nope", "forged")
        .err()
        .expect("a forged token enrolled");
    assert!(direct.contains("429"), "{direct}");
}

/// Rows in `id`'s mailbox (commands for it not yet taken by the node that serves it).
fn mailbox_rows(pg: &Postgres, id: &str) -> String {
    pg.psql(&format!(
        "SELECT count(*) FROM tether_journal WHERE position('Mmailbox/{id}/'::bytea in key) = 1"
    ))
}

#[test]
fn relays_linked_to_a_member_carry_their_agents_there_are_tended_by_the_active_node_and_move_when_it_dies(
) {
    use tether_tests::relays::{relay_entry, Relay};
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&node(&pg, "node-a")));
    let b_dir = tmp.path().join("b");
    let mut b = member_of(&a, &b_dir, "node-b");
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", STEPS, &marks);
    // Both relays list the member first. They enroll through it (the active node takes their
    // requests from the database), link to it, and forward their agents' enrollments to it.
    let both = [b.upstream(), a.upstream()];
    let r1 = Relay::start(&a, &both, tmp.path(), "relay-1");
    let r2 = Relay::start(&a, &both, tmp.path(), "relay-2");
    eventually("both relays claimed by node b", WAIT, || {
        [&r1, &r2]
            .iter()
            .all(|r| claim(&pg, &r.id).starts_with("node-b "))
            .then_some(())
    });
    let mut agents: Vec<Agent> = [("x1", &r1), ("x2", &r1), ("y1", &r2)]
        .into_iter()
        .map(|(name, relay)| {
            let mut agent = Agent::install_via(&a, &[relay.upstream()], tmp.path(), name, &[], &[]);
            agent.run();
            agent
        })
        .collect();
    eventually("the relays' agents claimed by node b", WAIT, || {
        agents
            .iter()
            .all(|ag| claim(&pg, &ag.id).starts_with("node-b "))
            .then_some(())
    });
    // The active node knows where they are: online, served by node b, through their relay.
    eventually(
        "the relays online on node a, served by node b",
        WAIT,
        || {
            ["relay-1", "relay-2"]
                .iter()
                .all(|r| {
                    relay_entry(&a, r)
                        .is_some_and(|e| e["status"] == "online" && e["node"] == "node-b")
                })
                .then_some(())
        },
    );
    // With the health their heartbeats report on node b.
    eventually("relay 1's health on node a", WAIT, || {
        relay_entry(&a, "relay-1").filter(|e| e["health"].is_object())
    });
    let view = eventually("x1's path on node a", WAIT, || {
        let v = a
            .request("GET", &format!("/api/v1/agents/{}", agents[0].id), None)
            .json();
        (v["status"] == "online" && v["path"].as_array().is_some_and(|p| !p.is_empty()))
            .then_some(v)
    });
    assert_eq!(view["node"], "node-b", "{view}");
    let path = view["path"].to_string();
    assert!(
        path.contains(&r1.id) || path.contains("relay-1"),
        "x1 came through relay 1: {view}"
    );
    // What the active node sends a relay at each connect (its certificate) went through its
    // mailbox, and node b took it and sent it on.
    eventually("the relays' mail taken and sent", WAIT, || {
        let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
        let sent = |id: &str| {
            log.lines()
                .any(|l| l.contains("relay-command-from-mailbox-sent") && l.contains(id))
        };
        (sent(&r1.id)
            && sent(&r2.id)
            && mailbox_rows(&pg, &r1.id) == "0"
            && mailbox_rows(&pg, &r2.id) == "0")
            .then_some(())
    });

    // A deployment started on the active node runs once on each agent behind the relays.
    let all: Vec<&Agent> = agents.iter().collect();
    let id = deploy(&a, &all);
    every_step_once(&a, &id, &marks, all.len());

    // Relay 2 deleted on the active node: node b closes its link at its next read of the
    // registry, and its agent is offline everywhere (relay 2 is refused by both nodes now).
    let r = a.request("DELETE", "/api/v1/relays/relay-2", None);
    assert_eq!(r.status, 200, "{}", r.body);
    eventually("relay 2's link closed by node b", WAIT, || {
        let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
        log.lines()
            .any(|l| l.contains("member-relay-deleted-disconnected") && l.contains(&r2.id))
            .then_some(())
    });
    eventually("relay 2's agent offline on node a", WAIT, || {
        (a.agent_status(&agents[2].id) != "online").then_some(())
    });
    let y1 = agents.pop().unwrap();

    // Node b killed in the middle of a deployment: relay 1 links to node a, and its agents
    // finish there, each step once.
    clear(&marks);
    let rest: Vec<&Agent> = agents.iter().collect();
    let id = deploy(&a, &rest);
    eventually("the deployment under way", WAIT, || {
        (!marks_in(&marks).is_empty()).then_some(())
    });
    b.kill();
    every_step_once(&a, &id, &marks, rest.len());
    for ag in &agents {
        assert!(
            claim(&pg, &ag.id).starts_with("node-a "),
            "{} now served by node a",
            ag.name
        );
    }
    assert_eq!(relay_entry(&a, "relay-1").unwrap()["status"], "online");
    drop((y1, r1, r2));
}

#[test]
fn a_relay_on_a_member_gets_its_renewed_certificate_and_its_upgrade_from_the_active_node() {
    use tether_tests::relays::{relay_entry, Relay};
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    // Upgrade packages on a directory both nodes share, as a cluster's `files_dir`.
    let files = tmp.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut env_a = node(&pg, "node-a");
    env_a.push((
        "TETHER_SERVER__FILES_DIR".into(),
        files.display().to_string(),
    ));
    // Relay certificates of 30 s: renewed once 10 s are left.
    env_a.push((
        "TETHER_SERVER__RELAY_CERTIFICATE_LIFETIME_S".into(),
        "30".into(),
    ));
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&env_a));
    let b = member_of(&a, &tmp.path().join("b"), "node-b");
    let mut relay = Relay::install(
        &a,
        &[b.upstream(), a.upstream()],
        tmp.path(),
        "edge",
        &[("TETHER_RELAY__UPGRADE_HEALTHY_AFTER_MS", "2000")],
    );
    // Fixed ports, which the re-executed binary listens on again.
    relay.run();
    relay.kill();
    relay.run();
    eventually("the relay claimed by node b", WAIT, || {
        claim(&pg, &relay.id).starts_with("node-b ").then_some(())
    });
    // The active node renews the certificate of a relay a member serves, and it reaches the
    // relay through its mailbox before the first one expires.
    let not_after = || {
        let pem = std::fs::read_to_string(relay.dir.join("tls.pem")).unwrap_or_default();
        tether_shared::tls::certificate_not_after(&pem).unwrap()
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let first = not_after();
    eventually("the relay's certificate renewed", WAIT, || {
        (not_after() > first).then_some(())
    });
    assert!(now() < first, "renewed before the first one expired");
    assert!(claim(&pg, &relay.id).starts_with("node-b "));

    let binary = std::fs::read(tether_tests::bin("tether-relay")).unwrap();
    a.upload_package("99.0.0", "relay", &binary);
    let r = a.request(
        "POST",
        "/api/v1/upgrades/99.0.0/rollout",
        Some(&json!({"targets": {"relays": ["edge"]}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["relays"][0]["queued"], true, "{}", r.body);
    // The command went through node b; the relay's reports came back through it, and the
    // active node recorded each.
    let entry = eventually("the relay upgraded", Duration::from_secs(120), || {
        let e = relay_entry(&a, "edge")?;
        let state = e["upgrade"]["state"].as_str().unwrap_or("").to_owned();
        assert!(
            matches!(state.as_str(), "requested" | "upgrading" | "done"),
            "{e}"
        );
        (state == "done" && e["version"] == "99.0.0").then_some(e)
    });
    assert_eq!(entry["status"], "online", "{entry}");
    assert_eq!(relay.health()["version"], "99.0.0");
    assert!(claim(&pg, &relay.id).starts_with("node-b "));

    // Node b drained: it closes the relay's link (counted), the relay links to node a, which
    // claims it in turn, and node a's list shows it connected there.
    drain_one(&b, tmp.path());
    eventually("the relay claimed by node a", WAIT, || {
        claim(&pg, &relay.id).starts_with("node-a ").then_some(())
    });
    eventually("the relay online on node a itself", WAIT, || {
        let agents = a.request("GET", "/api/v1/relays", None).json();
        let e = agents
            .as_array()?
            .iter()
            .find(|r| r["name"] == "edge")?
            .clone();
        (e["status"] == "online" && e["node"].is_null()).then_some(())
    });
    drop(b);
}

/// `POST /api/v1/trust/<step>` on `server`: its answer.
fn trust_step(server: &Server, step: &str) -> Value {
    let r = server.request("POST", &format!("/api/v1/trust/{step}"), None);
    assert_eq!(r.status, 200, "{step}: {}", r.body);
    r.json()
}

/// Waits until every agent holds trust set `serial` and nothing holds the next step back.
fn trust_confirmed(server: &Server, serial: u64) {
    let last = std::cell::RefCell::new(Value::Null);
    let confirmed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually(&format!("every agent on trust set {serial}"), WAIT, || {
            let p = server.request("GET", "/api/v1/trust", None).json();
            *last.borrow_mut() = p.clone();
            (p["serial"] == serial && p["confirmed"] == p["peers"] && p["waiting_for"].is_null())
                .then_some(())
        })
    }));
    assert!(confirmed.is_ok(), "{}", last.borrow());
}

fn file(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Writes `payload` at meta key `key` in the cluster's database, framed as the journal stores
/// it: as anyone who can write to the database, but holds no key ring, could.
fn forge_meta(pg: &Postgres, key: &str, payload: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(key.as_bytes());
    crc.update(payload);
    let mut value = vec![1u8];
    value.extend(crc.finalize().to_be_bytes());
    value.extend(payload);
    let stored_key = [b"M".as_slice(), key.as_bytes()].concat();
    pg.psql(&format!(
        "INSERT INTO tether_journal (key, value) VALUES ('\\x{}', '\\x{}') \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        hex::encode(stored_key),
        hex::encode(value)
    ));
}

/// How often `agent` refused a server's handshake for its key.
fn key_refusals(tmp: &Path, agent: &Agent) -> usize {
    file(tmp, &format!("{}.log", agent.name))
        .matches("not signed by a key this agent trusts")
        .count()
}

#[test]
fn a_key_rollover_on_the_active_node_reaches_every_node_and_its_fleet_follows_a_takeover_after_it()
{
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let mut a = Server::start_with(&tmp.path().join("a"), &borrowed(&node(&pg, "node-a")));
    let mut b = member_of(&a, &tmp.path().join("b"), "node-b");
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", STEPS, &marks);
    let (on_b, on_a) = one_agent_on_each(&pg, &a, &b, tmp.path(), &[a.upstream(), b.upstream()]);
    // A relay linked to the member: its certificate comes from the active node's relay CA.
    let relay = tether_tests::relays::Relay::start(
        &a,
        &[b.upstream(), a.upstream()],
        tmp.path(),
        "relay-b",
    );
    eventually("the relay claimed by node b", WAIT, || {
        claim(&pg, &relay.id).starts_with("node-b ").then_some(())
    });
    let old_ca = file(&a.dir, "ca.pem");
    // Node c is down for the whole rollover.
    let mut c = member_of(&a, &tmp.path().join("c"), "node-c");
    c.kill();

    // Begin on the active node: the member holds the new keys too, and its agent the set.
    assert_eq!(trust_step(&a, "begin")["phase"], "overlap");
    let next_key = file(&a.dir, "next/signing.pub");
    // The test's clients trust both CAs from now on, as agents do.
    a.api.trust_ca_file(&a.dir.join("agent-ca.pem"));
    b.api.trust_ca_file(&a.dir.join("agent-ca.pem"));
    eventually("node b holds the new keys", WAIT, || {
        (file(&b.dir, "next/signing.pub") == next_key
            && file(&b.dir, "rotation.json").contains("overlap")
            && file(&b.dir, "agent-ca.pem") == file(&a.dir, "agent-ca.pem"))
        .then_some(())
    });
    trust_confirmed(&a, 1);

    // Switch: node b signs with the new key and serves a certificate from the new CA.
    assert_eq!(trust_step(&a, "switch")["phase"], "switched");
    let new_ca = file(&a.dir, "ca.pem");
    assert_ne!(new_ca, old_ca);
    // (The rotation is written last.)
    eventually("node b switched", WAIT, || {
        file(&b.dir, "rotation.json")
            .contains("switched")
            .then_some(())
    });
    assert_eq!(file(&b.dir, "signing.pub"), next_key);
    assert_eq!(file(&b.dir, "ca.pem"), new_ca);
    assert!(
        tether_shared::tls::issued_by(&file(&b.dir, "server.pem"), &new_ca),
        "node b's own certificate, from the new CA"
    );
    assert!(!b.dir.join("next").exists());
    trust_confirmed(&a, 1);

    // Finish (refused until the relay serves a certificate from the new relay CA): the old
    // keys are trusted nowhere.
    let new_relay_ca = file(&a.dir, "relay-ca.pem");
    eventually("the relay certified by the new relay CA", WAIT, || {
        tether_shared::tls::issued_by(&file(&relay.dir, "tls.pem"), &new_relay_ca).then_some(())
    });
    assert_eq!(trust_step(&a, "finish")["phase"], "steady");
    trust_confirmed(&a, 2);
    eventually("node b finished", WAIT, || {
        (file(&b.dir, "rotation.json").contains("steady") && !b.dir.join("previous").exists())
            .then_some(())
    });
    // The secrets ring seals the private keys the database holds.
    let dump = pg.dump();
    // As text, or as bytea (COPY writes it in hex).
    let holds = |needle: &str| {
        [needle.to_owned(), hex::encode(needle)]
            .iter()
            .any(|n| dump.windows(n.len()).any(|w| w == n.as_bytes()))
    };
    assert!(
        holds("tether-sealed:v1:"),
        "the dump holds the published material, sealed"
    );
    assert!(!holds(next_key.trim()), "sealed whole, public keys too");
    for secret in ["signing.key", "ca.key", "relay-ca.key"] {
        let pem = file(&a.dir, secret);
        let body = pem.lines().nth(1).unwrap();
        assert!(!holds(body), "{secret} in the clear in the database");
    }

    // Node c, back, takes the step before it serves: its operators' port too is certified by
    // the new CA alone.
    c.run();
    let c_log = file(&tmp.path().join("c"), "server.log");
    assert!(c_log.contains("trust-caught-up-at-start"), "{c_log}");
    assert!(file(&c.dir, "rotation.json").contains("steady"));
    assert_eq!(file(&c.dir, "signing.pub"), next_key);
    assert!(tether_shared::tls::issued_by(
        &file(&c.dir, "server.pem"),
        &new_ca
    ));
    c.api.trust_ca_file(&c.dir.join("ca.pem"));
    let h = eventually("node c's health, over the new CA", WAIT, || c.try_health());
    assert_eq!(h["cluster"]["role"], "member", "{h}");
    c.kill();

    // A record of a later step written in the clear (whoever can write to the database, but
    // holds no ring) is taken by no node.
    let forged = json!({"rotation": {"serial": 9, "phase": "steady"}, "files": {}, "other": {}});
    forge_meta(&pg, "trust/published", forged.to_string().as_bytes());
    let b_log = || file(&tmp.path().join("b"), "server.log");
    eventually("node b refuses the forged record", WAIT, || {
        b_log().contains("not sealed").then_some(())
    });
    assert!(file(&b.dir, "rotation.json").contains("steady"));
    assert_eq!(file(&b.dir, "signing.pub"), next_key);

    // on-b's next session with node b is on the new key alone; work flows both ways.
    let refused = key_refusals(tmp.path(), &on_b);
    on_b.kill_worker().expect("on-b's worker");
    let id = deploy(&a, &[&on_b, &on_a]);
    every_step_once(&a, &id, &marks, 2);
    assert_eq!(claim(&pg, &on_b.id), "node-b 1", "on-b stayed with node b");
    assert_eq!(key_refusals(tmp.path(), &on_b), refused);

    // Node a dies: node b takes over, signing with the new key, and the fleet follows it.
    a.kill();
    let b_health = eventually("node b active", WAIT, || {
        b.try_health().filter(|h| h["cluster"]["role"] == "active")
    });
    assert_eq!(b_health["trust"]["serial"], 2, "{b_health}");
    // It replaced the forged record with its own.
    eventually("the forged record replaced", WAIT, || {
        b_log()
            .contains("trust-record-unreadable-replaced")
            .then_some(())
    });
    eventually("both agents online on node b", WAIT, || {
        (b.agent_status(&on_a.id) == "online" && b.agent_status(&on_b.id) == "online").then_some(())
    });
    clear(&marks);
    let id = deploy(&b, &[&on_b, &on_a]);
    every_step_once(&b, &id, &marks, 2);
    assert_eq!(key_refusals(tmp.path(), &on_b), refused);
    assert_eq!(key_refusals(tmp.path(), &on_a), 0);
}

/// What an agent says of its machine in a heartbeat (its facts, which change: disk free,
/// memory), not only in its handshake, reaches the active node from a member, through the
/// inbox: the active node's agent list shows it.
#[test]
fn facts_an_agent_reports_in_a_heartbeat_to_a_member_reach_the_active_node() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&node(&pg, "node-a")));
    let b = member_of(&a, &tmp.path().join("b"), "node-b");
    let (tls, agents) = enroll_at(&a, "sim", 2).unwrap();
    let ids: Vec<String> = agents.iter().map(|e| e.agent_id.clone()).collect();
    let mut cfg = SimConfig::new(b.wss, "localhost", tls);
    cfg.heartbeat = Duration::from_millis(300);
    // Other than what their handshakes said (`sim-<id>` as the hostname).
    cfg.heartbeat_facts = Some(
        [
            ("os", "linux"),
            ("arch", "x86_64"),
            ("hostname", "renamed-in-a-heartbeat"),
            ("disk_free_mb", "1234"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    let fleet = Fleet::start(cfg, agents).unwrap();
    eventually("both served by node b", WAIT, || {
        let on_b: usize = pg
            .psql(
                "SELECT count(*) FROM tether_claims WHERE node = 'node-b' AND claim NOT LIKE '%@%'",
            )
            .parse()
            .unwrap_or(0);
        (on_b == 2 && fleet.stats().ready.load(Ordering::Relaxed) == 2).then_some(())
    });
    for id in &ids {
        let facts = eventually("the heartbeat's facts on the active node", WAIT, || {
            let agent = a.agent(id)?;
            (agent["facts"]["hostname"] == "renamed-in-a-heartbeat").then(|| agent["facts"].clone())
        });
        assert_eq!(facts["disk_free_mb"], "1234", "{facts}");
        assert_eq!(
            a.agent(id).unwrap()["node"],
            "node-b",
            "served by the member"
        );
    }
}
