//! How the agents a member node serves reach the active node's work, and back, through the
//! database (see `docs/cluster.md`, "Every node serves agents").
//!
//! On a cluster whose nodes all serve agents, one node holds the lease (the *active* node: it
//! owns deployments, jobs, upgrades, the registry, everything operators change) and the others
//! are *members*: they verify agents' handshakes, claim them, and carry their two streams,
//! committing only under those claims. Between the two:
//!
//! - the **inbox** (`inbox/<agent>/<seq>.e`, the event's frame; `inbox/<agent>/<seq>.h`, what
//!   a handshake said): a member commits each event it accepts here, with the event itself,
//!   under its claim, before it acks it. The active node's link of that agent turns each entry
//!   into its effect and deletes it in the same commit, so every event takes effect exactly
//!   once, in order, whichever node carried it.
//! - the **mailbox** (`mailbox/<agent>/<n>`, a signed command not yet numbered): the active
//!   node's link of an agent it does not serve puts commands here (with the state they put
//!   something in, in one commit); the node that serves the agent numbers them into its
//!   command stream and deletes them in one commit under its claim, so every command is sent
//!   exactly once, whichever node serves the agent then, or later.
//!
//! Both sides look for entries as soon as a hint says some were written (a notification sent
//! once the writing transaction committed: see `PgStore::hints`), and at least
//! every [`POLL`] (a hint may be missed). Keys are read in order, and the links drop entries
//! they already took (see `AgentLink::take_inbox`, `AgentLink::take_mail`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tether_shared::ids::AgentId;
use tether_shared::journal::pg::Hint;
use tether_shared::journal::{JournalHandle, LogName, Record};
use tether_shared::link::StreamKeys;
use tether_shared::protocol::Hello;
use tether_shared::protocol::Seq;

use crate::session::session_registry::{Deliver, SessionRegistry};

/// Where events a member accepted wait for the active node.
pub const INBOX_PREFIX: &str = "inbox/";
/// Where commands wait for the node that serves their agent.
pub const MAILBOX_PREFIX: &str = "mailbox/";
/// How often each side looks for entries without a hint.
pub const POLL: Duration = Duration::from_millis(250);
/// Entries read per look at most.
pub const PAGE: usize = 1024;
/// Bytes of entries read per look at most (past the first entry): an event is up to a frame
/// (256 KiB), and an agent may leave thousands in the inbox.
pub const PAGE_BYTES: usize = 4 << 20;
/// Entries of one agent read at most by a look at the agents a hint names.
pub const PAGE_OF_ONE: usize = 64;

/// What an inbox row is, by the last letter of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event,
    Greeting,
    Departure,
    Facts,
}

/// The key of the `n`th inbox row a member wrote for `agent` under its claim at `epoch`: one
/// agent's rows sort in the order they were written, whichever member wrote them (a later
/// claim has a higher epoch, and an older claim can write nothing once it exists).
pub fn inbox_key(agent: &AgentId, epoch: u64, n: u64, kind: Kind) -> String {
    let letter = match kind {
        Kind::Event => 'e',
        Kind::Greeting => 'h',
        Kind::Departure => 'd',
        Kind::Facts => 'f',
    };
    format!("{INBOX_PREFIX}{agent}/{epoch:020}/{n:020}.{letter}")
}

/// Every key of `agent` in the inbox or the mailbox starts with this.
pub fn agent_prefix(prefix: &str, agent: &AgentId) -> String {
    format!("{prefix}{agent}/")
}

/// The row that rings for `agent` (its value: the seq of the last command the active node
/// wrote into the agent's stream itself, 8 bytes big-endian): written with every such command,
/// so that the node that serves the agent hears of it (a hint) or finds it (a look at every
/// bell, [`BELL_LOOK`]), and reads the stream's new records. Only ever overwritten; deleted at
/// the agent's handshakes.
pub fn bell_key(agent: &AgentId) -> String {
    format!("{BELL_PREFIX}{agent}/last")
}

/// Where bells ring (see [`bell_key`]): apart from the mailbox, so that a look at every mail
/// does not read a bell per agent.
pub const BELL_PREFIX: &str = "bell/";
/// How often a member looks at every bell (a page at a time, [`BELL_PAGE`]) for one whose
/// hint it missed.
pub const BELL_LOOK: Duration = Duration::from_secs(1);
/// Bells read per look at most (a bell is a few dozen bytes).
pub const BELL_PAGE: usize = 4096;

/// Whether `key` is a bell (see [`bell_key`]).
pub fn is_bell(key: &str) -> bool {
    key.starts_with(BELL_PREFIX)
}

/// What a bell says (see [`bell_key`]): the epoch of the claim on the session's stream (so
/// that a new session's bell never says what an older one's did), then the command's seq.
pub fn bell_value(epoch: u64, seq: Seq) -> Vec<u8> {
    let mut v = epoch.to_be_bytes().to_vec();
    v.extend_from_slice(&seq.0.to_be_bytes());
    v
}

/// The seq a bell says (see [`bell_value`]).
pub fn bell_seq(value: &[u8]) -> Option<Seq> {
    let bytes: [u8; 8] = value.get(8..)?.try_into().ok()?;
    Some(Seq(u64::from_be_bytes(bytes)))
}

/// The claim a member raises at each handshake of `agent` when the active node writes the
/// agent's commands into its stream (see [`Greeting::appends`]): the active node's writes
/// made for an earlier session then write nothing.
pub fn out_claim(agent: &AgentId) -> String {
    format!("out@{agent}")
}

/// A fresh mailbox key for `agent`, made by the active node at lease `epoch`: after every key
/// this process gave before, and every key an earlier active node gave (a takeover raises the
/// epoch).
pub fn mail_key(agent: &AgentId, epoch: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{MAILBOX_PREFIX}{agent}/{epoch:020}/{n:020}")
}

/// A mailbox row: a signed command not yet numbered, for the agent's incarnation it was made
/// for (empty: any). The node that serves the agent drops it if the agent has lost its state
/// since (the active node fails the work such a command carried).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mail {
    pub incarnation: String,
    pub command: tether_shared::protocol::Command,
}

/// The agent an inbox or mailbox key belongs to.
pub fn agent_of(key: &str) -> Option<AgentId> {
    let rest = key
        .strip_prefix(INBOX_PREFIX)
        .or_else(|| key.strip_prefix(MAILBOX_PREFIX))
        .or_else(|| key.strip_prefix(BELL_PREFIX))?;
    let (agent, _) = rest.split_once('/')?;
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    (!agent.is_empty() && agent.chars().all(plain)).then(|| AgentId::new(agent))
}

/// The claim epoch an inbox key was written under.
pub fn epoch_of(key: &str) -> Option<u64> {
    let rest = key.strip_prefix(INBOX_PREFIX)?;
    rest.split('/').nth(1)?.parse().ok()
}

/// What an inbox entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inboxed {
    /// An event frame, as the agent sent it.
    Event(Vec<u8>),
    /// A handshake (of an agent or a relay).
    Greeting(Greeting),
    /// The end of a session on member node (named).
    Departure(String),
    /// What the agent said of its machine in a heartbeat.
    Facts(tether_shared::facts::Facts),
}

impl Inboxed {
    /// The entry `key` holds `value`; `None` for a key of no known kind, or a greeting that
    /// does not decode.
    pub fn read(key: &str, value: Vec<u8>) -> Option<Inboxed> {
        if key.ends_with(".e") {
            Some(Inboxed::Event(value))
        } else if key.ends_with(".h") {
            serde_json::from_slice::<Greeting>(&value)
                .ok()
                .filter(|g| tether_shared::facts::problem(&g.facts).is_none())
                .map(Inboxed::Greeting)
        } else if key.ends_with(".d") {
            String::from_utf8(value).ok().map(Inboxed::Departure)
        } else if key.ends_with(".f") {
            // Checked as an agent's own report is.
            serde_json::from_slice(&value)
                .ok()
                .filter(|f| tether_shared::facts::problem(f).is_none())
                .map(Inboxed::Facts)
        } else {
            None
        }
    }
}

/// What the active node needs of an agent's handshake on a member: what the agent is able to
/// take, and whether it came back without its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    pub version: String,
    pub sealing_key: String,
    pub runs_as: bool,
    pub operations: bool,
    pub trust_serial: u64,
    /// The agent's incarnation (its journal's).
    #[serde(default)]
    pub incarnation: String,
    /// The agent lost its state (a new journal): what it was running has failed.
    pub reset: bool,
    /// The member node that serves it.
    #[serde(default)]
    pub node: String,
    /// What the agent said of its machine in its handshake.
    #[serde(default, skip_serializing_if = "tether_shared::facts::Facts::is_empty")]
    pub facts: tether_shared::facts::Facts,
    /// The relays it came through, nearest it first (none: it dialled the member itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
    /// The member takes no more mail for this session once this greeting is committed: the
    /// active node writes the agent's commands into its stream itself, under the member's
    /// claim on the agent (at [`Greeting::claim_epoch`]) and on the session's stream (the
    /// claim [`out_claim`], at this epoch). `None`: the member numbers the mailbox's
    /// commands (an active node of an earlier release does not say it writes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appends: Option<u64>,
    /// The member's claim epoch on the agent, with [`Greeting::appends`].
    #[serde(default)]
    pub claim_epoch: u64,
}

impl Greeting {
    pub fn of(hello: &Hello, reset: bool, node: &str, path: &[String]) -> Greeting {
        Greeting {
            path: path.to_vec(),
            node: node.to_owned(),
            version: hello.version.clone(),
            sealing_key: hello.sealing_key.clone(),
            runs_as: hello.runs_as,
            operations: hello.operations,
            trust_serial: hello.trust_serial,
            incarnation: hello.incarnation.clone(),
            reset,
            facts: hello.facts.clone(),
            appends: None,
            claim_epoch: 0,
        }
    }

    /// A relay's handshake on member `node`: what it runs, the trust set it holds, its path.
    pub fn of_relay(hello: &Hello, version: &str, node: &str, path: &[String]) -> Greeting {
        Greeting {
            version: version.to_owned(),
            sealing_key: String::new(),
            runs_as: false,
            operations: false,
            trust_serial: hello.trust_serial,
            incarnation: String::new(),
            reset: false,
            node: node.to_owned(),
            facts: Default::default(),
            path: path.to_vec(),
            appends: None,
            claim_epoch: 0,
        }
    }
}

/// Inbox or mailbox entries: keys and values.
pub type Entries = Vec<(String, Vec<u8>)>;

/// Entries of `rows` by agent, in key order (rows of an unknown agent are dropped).
fn by_agent(rows: Entries) -> Vec<(AgentId, Entries)> {
    let mut out: Vec<(AgentId, Entries)> = Vec::new();
    for (key, value) in rows {
        let Some(agent) = agent_of(&key) else {
            continue;
        };
        match out.last_mut() {
            Some((last, entries)) if *last == agent => entries.push((key, value)),
            _ => out.push((agent, vec![(key, value)])),
        }
    }
    out
}

/// Where the look after one that read `rows` under `prefix` starts (`full`: the page reached
/// its bound). Past the last agent of a full page (the rest of its entries wait for the next round), so that an agent with many
/// entries takes one page per round and never holds the others up; from the start after a
/// page that was not full.
fn next_look(prefix: &str, rows: &Entries, full: bool) -> String {
    match rows.last().and_then(|(k, _)| agent_of(k)) {
        // Every key of the agent starts with `<prefix><agent>/`, and '0' follows '/'.
        Some(agent) if full => format!("{prefix}{agent}0"),
        _ => prefix.to_owned(),
    }
}

/// The records read with mailbox rows, by the agent whose command stream they are of.
fn records_by_agent(records: Vec<(LogName, Record)>) -> HashMap<AgentId, Vec<Record>> {
    let mut out: HashMap<AgentId, Vec<Record>> = HashMap::new();
    for (log, record) in records {
        if let Some(agent) = log.as_str().strip_prefix("out/commands/") {
            out.entry(AgentId::new(agent)).or_default().push(record);
        }
    }
    out
}

/// Bells most remembered (see [`Bells`]): past that, all are forgotten (each then rings once
/// more).
const BELLS_REMEMBERED: usize = 100_000;

/// What each bell said at the last look (see [`bell_key`]): the bounded look at every row
/// hands on only a bell that changed since (a hint missed), not the same bell every time.
#[derive(Default)]
struct Bells(HashMap<String, Vec<u8>>);

impl Bells {
    /// Whether `key` is a bell that says `value` still; remembers what it says now.
    fn unchanged(&mut self, key: &str, value: &[u8]) -> bool {
        if !is_bell(key) {
            return false;
        }
        if self.0.get(key).is_some_and(|v| v == value) {
            return true;
        }
        if self.0.len() >= BELLS_REMEMBERED {
            self.0.clear();
        }
        self.0.insert(key.to_owned(), value.to_vec());
        false
    }
}

/// What the next look reads: every entry, every bell, or the entries (and bells) of some
/// agents only.
enum Look {
    All,
    Bells,
    Of(BTreeSet<AgentId>),
}

impl Look {
    /// Also what `hint` (under the prefix looked at) names.
    fn and(self, hint: Hint) -> Look {
        match (self, hint.names) {
            (Look::Of(mut agents), Some(names)) => {
                agents.extend(names.into_iter().map(AgentId::new));
                Look::Of(agents)
            }
            _ => Look::All,
        }
    }
}

/// Hands every entry under `prefix` to its agent's link, for as long as the system runs: on
/// the active node the inbox (every link is made if need be), on a member the mailbox (only to
/// the links of agents it serves). At least every [`POLL`] it looks at every entry (a page at a
/// time); at each of `hints` that names the prefix, only at the entries of the agents the hint
/// names and `serves` (a member reads nothing of the agents other nodes serve). (A hint that
/// names too many names none: then at every entry.)
pub async fn deliver_forever(
    journal: JournalHandle,
    sessions: Addr<SessionRegistry>,
    prefix: &'static str,
    mut hints: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
    serves: impl Fn(&AgentId) -> bool,
) {
    let mut tick = actix_rt::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bell_tick = actix_rt::time::interval(BELL_LOOK);
    bell_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // On a member, bells ring with the mailbox (see `bell_key`).
    let rings = prefix == MAILBOX_PREFIX;
    let ours = |hint: &Hint| hint.prefix == prefix || (rings && hint.prefix == BELL_PREFIX);
    // Where the next look at every entry (and every bell) starts: past the last page's agents,
    // while pages come full.
    let mut from = prefix.to_owned();
    let mut bells_from = BELL_PREFIX.to_owned();
    let mut bells = Bells::default();
    loop {
        let hinted = async {
            match hints.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let bell_look = async {
            match rings {
                true => bell_tick.tick().await,
                false => std::future::pending().await,
            }
        };
        let mut look = tokio::select! {
            _ = tick.tick() => Look::All,
            _ = bell_look => Look::Bells,
            hint = hinted => match hint.map(|h| Hint::parse(&h)) {
                Some(hint) if ours(&hint) => Look::Of(BTreeSet::new()).and(hint),
                Some(_) => continue,
                None => {
                    hints = None;
                    continue;
                }
            },
        };
        // Hints that came meanwhile are answered by this one look (a look at every bell leaves
        // them for the next, so that hints never keep it from its turn).
        if let Some(h) = hints.as_mut().filter(|_| !matches!(look, Look::Bells)) {
            while let Ok(more) = h.try_recv() {
                let more = Hint::parse(&more);
                if ours(&more) {
                    look = look.and(more);
                }
            }
        }
        // Only the agents served here (the cluster bench measured reads of the named agents'
        // rows cheaper than a read of every row, at 400 agents as at 5,000).
        let look = match look {
            Look::Of(agents) => {
                let agents: BTreeSet<AgentId> = agents.into_iter().filter(|a| serves(a)).collect();
                if agents.is_empty() {
                    continue;
                }
                Look::Of(agents)
            }
            all => all,
        };
        let j = journal.clone();
        let (all, bell_look) = (matches!(look, Look::All), matches!(look, Look::Bells));
        let read_at = std::time::Instant::now();
        let page = match look {
            Look::All => {
                let start = from.clone();
                actix_web::web::block(move || j.scan_meta_from(&start, prefix, PAGE, PAGE_BYTES))
                    .await
                    .map(|page| page.map(|p| (p, Vec::new())))
            }
            Look::Bells => {
                let start = bells_from.clone();
                actix_web::web::block(move || {
                    j.scan_meta_from(&start, BELL_PREFIX, BELL_PAGE, PAGE_BYTES)
                })
                .await
                .map(|page| page.map(|p| (p, Vec::new())))
            }
            Look::Of(agents) => {
                let mut prefixes: Vec<String> =
                    agents.iter().map(|a| agent_prefix(prefix, a)).collect();
                if rings {
                    prefixes.extend(agents.iter().map(|a| agent_prefix(BELL_PREFIX, a)));
                }
                // With the mailbox's rows, the first records of the agents' command streams
                // (what the active node writes there itself rings their bell).
                let logs: Vec<(LogName, Seq)> = match prefix == MAILBOX_PREFIX {
                    true => agents
                        .iter()
                        .filter(|a| !a.as_str().starts_with("r-"))
                        .filter_map(|a| StreamKeys::server_side(a).ok())
                        .map(|k| (k.out_log, Seq::ZERO))
                        .collect(),
                    false => Vec::new(),
                };
                // Their first entries each (what is left waits for a later look), and their
                // streams' first records, read at once (each within its own bound) without a
                // hand-over to another thread: this is the way of a command to its agent.
                let rows = j.scan_meta_prefixes_async(&prefixes, PAGE_OF_ONE, PAGE_BYTES);
                let records = async {
                    match logs.is_empty() {
                        true => Ok(Default::default()),
                        false => {
                            j.read_meta_and_logs_async(&[], &logs, PAGE_OF_ONE, PAGE_BYTES)
                                .await
                        }
                    }
                };
                let (rows, records) = futures_util::future::join(rows, records).await;
                Ok(rows.and_then(|page| Ok((page, records?.records))))
            }
        };
        let (rows, full, records) = match page {
            Ok(Ok((page, records))) => (page.entries, page.full, records),
            Ok(Err(e)) => {
                tracing::warn!(prefix, error = %e, "mail-not-read");
                continue;
            }
            Err(_) => continue,
        };
        if all {
            from = next_look(prefix, &rows, full);
        }
        if bell_look {
            bells_from = next_look(BELL_PREFIX, &rows, full);
        }
        let mut records = records_by_agent(records);
        for (agent_id, mut entries) in by_agent(rows) {
            if all || bell_look {
                // A bell that says what it said at the last look: nothing new.
                entries.retain(|(key, value)| !bells.unchanged(key, value));
                if entries.is_empty() {
                    continue;
                }
            } else {
                for (key, value) in &entries {
                    bells.unchanged(key, value);
                }
            }
            sessions.do_send(Deliver {
                records: records.remove(&agent_id).unwrap_or_default(),
                read_at,
                agent_id,
                entries,
                inbox: prefix == INBOX_PREFIX,
            });
        }
    }
}

/// Deletes every inbox and mailbox row of `agent` (deleted, or unknown to the active node).
pub async fn purge(journal: &JournalHandle, agent: &AgentId) {
    let (j, a) = (journal.clone(), agent.clone());
    let rows = actix_web::web::block(move || {
        let mut keys = Vec::new();
        for prefix in [INBOX_PREFIX, MAILBOX_PREFIX, BELL_PREFIX] {
            keys.extend(
                j.scan_meta(&agent_prefix(prefix, &a))?
                    .into_iter()
                    .map(|(k, _)| k),
            );
        }
        Ok::<_, tether_shared::journal::JournalError>(keys)
    })
    .await;
    let keys = match rows {
        Ok(Ok(keys)) => keys,
        Ok(Err(e)) => {
            tracing::warn!(agent_id = %agent, error = %e, "mail-not-purged");
            return;
        }
        Err(_) => return,
    };
    if keys.is_empty() {
        return;
    }
    let ops = keys
        .into_iter()
        .map(|key| tether_shared::journal::Op::DeleteMeta { key })
        .collect();
    if let Err(e) = journal.commit(ops).await {
        tracing::warn!(agent_id = %agent, error = %e, "mail-not-purged");
    }
}

/// On a member: each time another node becomes active, every agent served here greets it
/// (what the last active node knew of them from their handshakes is not in its successor's
/// memory).
pub async fn greet_each_active_node(
    mut epochs: tokio::sync::watch::Receiver<i64>,
    sessions: Addr<SessionRegistry>,
) {
    epochs.mark_unchanged();
    while epochs.changed().await.is_ok() {
        let epoch = *epochs.borrow_and_update();
        tracing::info!(epoch, "member-greets-a-new-active-node");
        sessions.do_send(crate::session::session_registry::GreetAgain);
    }
}

/// The meta key where the active node says whether it takes what members carry (`1`) or not.
pub const ACTIVE_TAKES_MEMBERS: &str = "cluster/active_takes_members";

/// The meta key where the active node says whether it answers the enrollments members
/// forward (`crate::member_enroll`): its lease epoch if it does (`0` if not), so that what an
/// earlier active node said is not taken for what the one now active does (one of a release
/// that does not know the key writes nothing there).
pub const ACTIVE_TAKES_ENROLLMENTS: &str = "cluster/active_takes_enrollments";

/// The meta key where the active node says whether it writes the commands of the agents
/// members serve into their streams itself (see [`Greeting::appends`]): its lease epoch if it
/// does, as [`ACTIVE_TAKES_ENROLLMENTS`].
pub const ACTIVE_APPENDS: &str = "cluster/active_appends";

/// Whether the active node at lease `epoch` said it writes the commands of the agents members
/// serve into their streams (see [`ACTIVE_APPENDS`]); blocking.
/// (`None`: it could not be read.)
pub fn active_appends(journal: &JournalHandle, epoch: i64) -> Option<bool> {
    match journal.get_meta(ACTIVE_APPENDS) {
        Ok(v) => Some(v.is_some_and(|v| epoch > 0 && v == epoch.to_string().as_bytes())),
        Err(_) => None,
    }
}

/// Whether the active node said it takes what members carry; blocking.
pub fn active_takes_members(journal: &JournalHandle) -> bool {
    active_takes(journal, ACTIVE_TAKES_MEMBERS)
}

/// Whether the active node said `1` at `key`; blocking.
pub fn active_takes(journal: &JournalHandle, key: &str) -> bool {
    matches!(journal.get_meta(key), Ok(Some(v)) if v == b"1")
}

/// Whether the active node at lease `epoch` said it answers the enrollments members forward
/// (see [`ACTIVE_TAKES_ENROLLMENTS`]); blocking.
pub fn active_takes_enrollments(journal: &JournalHandle, epoch: i64) -> bool {
    said_at_epoch(journal, ACTIVE_TAKES_ENROLLMENTS, epoch)
}

/// Whether the active node at lease `epoch` said yes at `key` (its epoch); blocking.
fn said_at_epoch(journal: &JournalHandle, key: &str, epoch: i64) -> bool {
    matches!(journal.get_meta(key), Ok(Some(v)) if epoch > 0 && v == epoch.to_string().as_bytes())
}

/// The active node, at lease `epoch`, says whether it takes what members carry, the
/// enrollments they forward, and whether it writes the commands of their agents itself.
pub fn say_whether_members_are_taken(
    journal: &JournalHandle,
    taken: bool,
    epoch: u64,
) -> impl std::future::Future<
    Output = Result<tether_shared::journal::Committed, tether_shared::journal::JournalError>,
> {
    let put = |key: &str, value: &[u8]| tether_shared::journal::Op::PutMeta {
        key: key.to_owned(),
        value: value.to_vec(),
    };
    let enrollments = if taken {
        epoch.to_string()
    } else {
        "0".to_owned()
    };
    journal.commit(vec![
        put(ACTIVE_TAKES_MEMBERS, if taken { b"1" } else { b"0" }),
        put(ACTIVE_TAKES_ENROLLMENTS, enrollments.as_bytes()),
        put(ACTIVE_APPENDS, enrollments.as_bytes()),
    ])
}

/// How often a member reads the registry again.
pub const REGISTRY_REFRESH: Duration = Duration::from_secs(2);

/// On a member: reads the agents the active node enrolls, changes and deletes every
/// [`REGISTRY_REFRESH`], and ends the sessions of those deleted (and the links of relays
/// deleted); reads the upgrade packages again too (agents and relays download them here), and
/// takes a key rollover's step the active node took (`crate::trust::cluster`). Reads what the
/// active node says it takes too, then and as soon as another node becomes active
/// (`active_epochs`).
pub async fn follow_registry(
    registry: std::sync::Arc<crate::registry::Registry>,
    sessions: Addr<SessionRegistry>,
    shared: std::sync::Arc<crate::session::SessionShared>,
    mut active_epochs: Option<tokio::sync::watch::Receiver<i64>>,
) {
    let mut tick = actix_rt::time::interval(REGISTRY_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // And at once when another node becomes active (what it says is read again).
        let taken_over = async {
            match active_epochs.as_mut() {
                Some(e) => {
                    if e.changed().await.is_err() {
                        std::future::pending::<()>().await
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = taken_over => {}
        }
        let j = shared.journal.clone();
        let epoch = active_epochs.as_ref().map_or(0, |e| *e.borrow());
        let says = actix_web::web::block(move || {
            (
                active_takes_members(&j),
                active_takes_enrollments(&j, epoch),
                active_appends(&j, epoch),
            )
        });
        if let Ok((taken, enrollments, appends)) = says.await {
            if let Some(appends) = appends {
                shared.active_appends.store(appends, Ordering::Relaxed);
            }
            let was = shared.active_takes_members.swap(taken, Ordering::Relaxed);
            if was != taken {
                tracing::warn!(taken, "active-node-takes-members-changed");
            }
            shared
                .active_takes_enrollments
                .store(enrollments, Ordering::Relaxed);
        }
        let r = registry.clone();
        match actix_web::web::block(move || r.reload_agents()).await {
            Ok(Ok(gone)) => {
                for agent_id in gone {
                    tracing::info!(agent_id = %agent_id, "member-agent-deleted-disconnecting");
                    if agent_id.as_str().starts_with("r-") {
                        // A relay: its link, or the channels that carry it or run through it.
                        let relay = agent_id.as_str().into();
                        let closed =
                            crate::session::relay_session::revoke_relay(&shared, &relay).await;
                        if closed > 0 {
                            tracing::warn!(relay_id = %relay, closed, "member-relay-deleted-disconnected");
                        }
                    }
                    sessions.do_send(crate::session::session_registry::DisconnectAgent {
                        agent_id,
                        reason: "the agent was deleted".into(),
                    });
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "member-registry-not-refreshed"),
            Err(_) => {}
        }
        let upgrades = shared.upgrades.clone();
        if let Ok(Err(e)) = actix_web::web::block(move || upgrades.reload_packages()).await {
            tracing::warn!(error = %e, "member-packages-not-refreshed");
        }
        // A key rollover's step the active node took: signed and served here too.
        let trust = shared.trust.clone();
        if let Ok(Err(e)) = actix_web::web::block(move || trust.adopt()).await {
            tracing::error!(error = %e, "member-trust-not-refreshed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn agent(hex: &str) -> AgentId {
        AgentId::new(format!("a-{hex}"))
    }

    #[test]
    fn keys_sort_by_agent_then_in_the_order_written_and_name_their_agent() {
        let (a, b) = (agent("0a"), agent("0a1"));
        let keys = [
            inbox_key(&a, 2, 9, Kind::Event),
            inbox_key(&a, 2, 10, Kind::Departure),
            // A later claim (another member, or the same after a rebuild) starts its count
            // again: its rows still come after.
            inbox_key(&a, 3, 0, Kind::Greeting),
            inbox_key(&a, 3, 1, Kind::Event),
            inbox_key(&b, 1, 0, Kind::Event),
        ];
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys, "one agent's rows in the order written");
        assert!(!keys[4].starts_with(&agent_prefix(INBOX_PREFIX, &a)));
        assert_eq!(agent_of(&keys[3]), Some(a.clone()));
        assert_eq!(epoch_of(&keys[3]), Some(3));
        assert_eq!(epoch_of(&mail_key(&b, 1)), None);
        assert_eq!(
            Inboxed::read(&keys[1], b"node-b".to_vec()),
            Some(Inboxed::Departure("node-b".into()))
        );
        assert_eq!(agent_of(&mail_key(&b, 1)), Some(b.clone()));
        assert!(
            mail_key(&b, 1) < mail_key(&b, 2),
            "a later active node's come after"
        );
        assert_eq!(agent_of("inbox/not an id/1.e"), None);
        assert_eq!(agent_of("other/a-0a/1.e"), None);
    }

    #[test]
    fn a_full_page_sends_the_next_look_past_its_last_agent() {
        let (a, b, c) = (agent("0e"), agent("0e1"), agent("0f"));
        let row =
            |who: &AgentId, n: u64, size: usize| (inbox_key(who, 1, n, Kind::Event), vec![0; size]);
        // Not full: the next look starts over.
        let few = vec![row(&a, 1, 10), row(&b, 1, 10)];
        assert_eq!(next_look(INBOX_PREFIX, &few, false), INBOX_PREFIX);
        // Full: past b's keys (its rest waits for the next round), and before c's.
        let next = next_look(INBOX_PREFIX, &few, true);
        assert!(next.as_str() > inbox_key(&b, u64::MAX, u64::MAX, Kind::Event).as_str());
        assert!(next.as_str() < inbox_key(&c, 0, 0, Kind::Event).as_str());
        assert!(next.as_str() > inbox_key(&a, u64::MAX, u64::MAX, Kind::Event).as_str());
        // One agent's full page: the next look goes on to the others.
        let many: Entries = (0..PAGE as u64).map(|n| row(&a, n, 1)).collect();
        let next = next_look(INBOX_PREFIX, &many, true);
        assert!(next.as_str() < inbox_key(&b, 0, 0, Kind::Event).as_str());
        assert!(next.as_str() > inbox_key(&a, u64::MAX, u64::MAX, Kind::Event).as_str());
    }

    #[test]
    fn a_bell_is_no_mail_and_rings_once_per_value_at_the_looks_at_every_row() {
        let a = agent("0d");
        let bell = bell_key(&a);
        assert!(is_bell(&bell));
        assert!(!is_bell(&mail_key(&a, 1)));
        assert!(!is_bell(&inbox_key(&a, 1, 1, Kind::Event)));
        assert_eq!(agent_of(&bell), Some(a.clone()));
        assert!(
            !bell.starts_with(MAILBOX_PREFIX),
            "a look at every mail reads no bell (nor takes one for mail)"
        );
        assert_eq!(bell_seq(&bell_value(3, Seq(7))), Some(Seq(7)));
        assert_eq!(bell_seq(b"seven"), None);
        let mut bells = Bells::default();
        let seven = bell_value(3, Seq(7));
        assert!(
            !bells.unchanged(&bell, &seven),
            "a bell rings the first time"
        );
        assert!(
            bells.unchanged(&bell, &seven),
            "not again for the same command"
        );
        assert!(
            !bells.unchanged(&bell, &bell_value(3, Seq(8))),
            "again for a newer one"
        );
        assert!(
            !bells.unchanged(&bell, &bell_value(4, Seq(7))),
            "and for the same seq of a newer session"
        );
        assert!(
            !bells.unchanged(&mail_key(&a, 1), &seven),
            "mail is always handed on"
        );
        assert_eq!(out_claim(&a), "out@a-0d");
    }

    #[test]
    fn mail_keys_only_grow() {
        let a = agent("0b");
        let keys: Vec<String> = (0..1000).map(|_| mail_key(&a, 7)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn entries_are_read_by_kind_and_grouped_by_agent() {
        let a = agent("0c");
        let greeting = Greeting {
            version: "0.2.0".into(),
            sealing_key: "k".into(),
            runs_as: true,
            operations: false,
            trust_serial: 3,
            incarnation: "i".into(),
            reset: true,
            node: "node-b".into(),
            facts: [("arch".to_owned(), "x86_64".to_owned())].into(),
            path: vec!["r-1".into()],
            appends: Some(4),
            claim_epoch: 2,
        };
        let value = serde_json::to_vec(&greeting).unwrap();
        // A member of an earlier release says nothing of the stream: the mailbox, then.
        let older = br#"{"version":"0.1.0","sealing_key":"","runs_as":false,"operations":false,"trust_serial":0,"reset":false}"#;
        match Inboxed::read(&inbox_key(&a, 1, 1, Kind::Greeting), older.to_vec()) {
            Some(Inboxed::Greeting(g)) => assert_eq!((g.appends, g.claim_epoch), (None, 0)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Inboxed::read(&inbox_key(&a, 1, 1, Kind::Greeting), value),
            Some(Inboxed::Greeting(greeting))
        );
        assert_eq!(
            Inboxed::read(&inbox_key(&a, 1, 2, Kind::Event), b"x".to_vec()),
            Some(Inboxed::Event(b"x".to_vec()))
        );
        assert_eq!(
            Inboxed::read(&inbox_key(&a, 1, 1, Kind::Greeting), b"{".to_vec()),
            None
        );
        assert_eq!(Inboxed::read("inbox/a-0c/1.q", Vec::new()), None);
        assert_eq!(
            Inboxed::read(
                &inbox_key(&a, 1, 3, Kind::Facts),
                br#"{"os":"linux"}"#.to_vec()
            ),
            Some(Inboxed::Facts(
                [("os".to_owned(), "linux".to_owned())].into()
            ))
        );
        let b = agent("0d");
        let rows = vec![
            (inbox_key(&a, 1, 1, Kind::Event), vec![1]),
            (inbox_key(&a, 1, 2, Kind::Event), vec![2]),
            ("inbox/not an id/1.e".to_owned(), vec![]),
            (inbox_key(&b, 1, 1, Kind::Event), vec![3]),
        ];
        let grouped = by_agent(rows);
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped[0].1.len(), 2);
        assert_eq!(grouped[1].0, b);
    }

    #[actix::test]
    async fn members_forward_enrollments_only_to_the_active_node_that_said_it_takes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, _) = tether_shared::journal::Journal::open(
            &tmp.path().join("j"),
            &tether_shared::journal::JournalOptions::default(),
        )
        .unwrap();
        let j = journal.handle();
        assert!(!active_takes_enrollments(&j, 7), "nothing said yet");
        say_whether_members_are_taken(&j, true, 7).await.unwrap();
        assert!(active_takes_members(&j));
        assert!(active_takes_enrollments(&j, 7));
        // Another node took over since, and said nothing (a release that does not know the
        // key): what the one before said is not taken for its word.
        assert!(!active_takes_enrollments(&j, 8));
        assert!(!active_takes_enrollments(&j, 0), "no active node known");
        say_whether_members_are_taken(&j, false, 8).await.unwrap();
        assert!(!active_takes_members(&j));
        assert!(!active_takes_enrollments(&j, 8));
        // What a release before this one wrote ("1") holds only at that epoch.
        j.commit(vec![tether_shared::journal::Op::PutMeta {
            key: ACTIVE_TAKES_ENROLLMENTS.into(),
            value: b"1".to_vec(),
        }])
        .await
        .unwrap();
        assert!(!active_takes_enrollments(&j, 9));
    }
}
