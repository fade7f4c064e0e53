//! Firewalled network topologies for end-to-end tests: Linux network namespaces joined by veth
//! pairs, a forwarding "router" namespace whose nftables ruleset decides who may reach whom,
//! and the real binaries started inside the namespaces with `ip netns exec`.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables), `bash` and `timeout` (coreutils); see
//! [`require_root`]. Everything is removed when the [`Topology`] is dropped, also on panic:
//! the processes left in its namespaces are SIGKILLed, then the namespaces are deleted (their
//! veths go with them). Namespaces left behind by a test process that died (SIGKILL, abort)
//! are swept by the next topology built on the machine.
//!
//! # Naming and addresses
//! A namespace is called `tt<pid>n<counter>-<name>` (pid of the test process, a per-process
//! counter, the logical name such as `agents`), so concurrent tests and test binaries never
//! share one. Interface names stay short (IFNAMSIZ is 16): the veth of link number L is `vL`
//! at both ends, each end inside its own namespace, so names never clash. Link L gets the
//! subnet `10.<N>.<L>.0/24` where N (10..250) is derived from the pid and counter; the first
//! namespace named in [`Builder::link`] gets `.1`, the second `.2`. The subnets only have to be
//! unique inside one topology, as no namespace of a topology has a route out of it.
//!
//! # Reaching a namespace from the test process
//! [`Builder::host_link`] adds a veth from the root namespace (the test process's) into one
//! namespace, on its own subnet `10.254.<idx>.0/24` (root side `.1`, namespace side `.2`,
//! [`Topology::host_ip`]). `idx` is claimed by creating the root-side interface `tth<idx>`, which
//! fails when another topology holds it, so concurrent topologies never share a subnet. The root
//! namespace does not forward (and no namespace has a route to it anyway), so no namespace of the
//! topology can use the host link: it is how a test talks to a server's admin REST API with the
//! ordinary in-process client ([`NsServer::request`]).
//!
//! # Firewall
//! Every namespace has `table inet tether`. In the router its `forward` chain has policy drop
//! and, in this order:
//! 1. `ip saddr . ip daddr @blackhole drop`: a [`Topology::blackhole`]d pair loses every packet,
//!    even of established connections: both ends see silence (a half-open link) and only notice
//!    through their own timeouts (heartbeats, TCP retransmission).
//! 2. `@cut`: a [`Topology::cut`] pair gets TCP resets (other protocols an ICMP
//!    admin-prohibited), also for established connections: each end learns of the cut with its
//!    next packet (ECONNRESET), and a new connection is refused at once. This is the observable
//!    "cut" for tests that want both sides to notice quickly.
//! 3. `ct state established,related accept`.
//! 4. `ip saddr . ip daddr . tcp dport @allowed accept`: new TCP connections from one
//!    namespace's address to another's port ([`Builder::allow`], [`Topology::allow`]).
//!
//! Every other namespace has an `input` chain (policy accept) dropping sources in the interval
//! set `@denied` ([`Builder::deny_input`]), e.g. the server drops anything from the agents'
//! subnet even if the router were to let it through.
//!
//! All rules are fixed; tests change behaviour at run time by adding and removing set elements
//! ([`Topology::cut`], [`Topology::restore`], [`Topology::allow`], ...), which never needs rule
//! handles. [`relay_topology`] builds the topology recommended for relay tests.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::admin_api::AdminApi;
use crate::fleet::alive;
use crate::{bin, ChildGuard};

/// The server's admin REST API port inside a topology.
pub const HTTPS_PORT: u16 = 8443;
/// The server's agent-facing (WSS) port inside a topology.
pub const WSS_PORT: u16 = 7919;
/// The relay's downstream (agent-facing) port inside a topology.
pub const RELAY_PORT: u16 = 20080;

/// Where `ip netns` keeps the namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Whether this test can build topologies: root, `ip`, `nft`, `bash` and `timeout` present,
/// and network namespaces can be created. If not, prints `skipped: <test>: <why>` and answers
/// false, except under `CI=true`, where a skip is a failure: it panics.
pub fn require_root(test: &str) -> bool {
    static PROBLEM: OnceLock<Option<String>> = OnceLock::new();
    let problem = PROBLEM.get_or_init(environment_problem);
    match problem {
        None => true,
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: cannot run under CI=true: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {test}: {why}");
            false
        }
    }
}

/// What prevents building topologies here, if anything.
fn environment_problem() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned));
    if euid.as_deref() != Some("0") {
        return Some(format!(
            "needs root for network namespaces (effective uid {})",
            euid.as_deref().unwrap_or("unknown")
        ));
    }
    for (tool, args, package) in [
        ("ip", &["-V"][..], "iproute2"),
        ("nft", &["--version"][..], "nftables"),
        ("bash", &["--version"][..], "bash"),
        ("timeout", &["--version"][..], "coreutils"),
    ] {
        let ok = Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!(
                "`{tool}` is missing (apt-get install {package}, or `make setup`)"
            ));
        }
    }
    // Root in a restricted container may still lack CAP_SYS_ADMIN / CAP_NET_ADMIN.
    // Named like a topology namespace, so that a sweep removes it if we die right here.
    let probe = format!("tt{}n{}-probe", std::process::id(), u32::MAX);
    let out = Command::new("ip").args(["netns", "add", &probe]).output();
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "cannot create a network namespace: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run ip: {e}")),
    }
}

/// The topology recommended for relay tests: a `router` namespace with one link to each of
/// `agents`, `relay`, `server` (and `relay2` when `chained`), a host link into `server` for
/// the admin API, and a firewall allowing only agents → relay:[`RELAY_PORT`],
/// relay → server:[`WSS_PORT`] (and relay2 → relay:[`RELAY_PORT`] when chained), with the
/// server dropping anything from the agents' subnet.
pub fn relay_topology(chained: bool) -> Topology {
    let mut leaves = vec!["agents", "relay", "server"];
    if chained {
        leaves.push("relay2");
    }
    let mut b = Builder::star("router", &leaves)
        .host_link("server")
        .allow("agents", "relay", RELAY_PORT)
        .allow("relay", "server", WSS_PORT)
        .deny_input("server", "agents");
    if chained {
        b = b.allow("relay2", "relay", RELAY_PORT);
    }
    b.build()
}

/// Describes a topology; [`Builder::build`] creates it.
#[derive(Debug, Default, Clone)]
pub struct Builder {
    namespaces: Vec<String>,
    router: Option<String>,
    links: Vec<(String, String)>,
    host_links: Vec<String>,
    allows: Vec<(String, String, u16)>,
    denies: Vec<(String, String)>,
}

impl Builder {
    /// An empty topology.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// A `router` namespace linked to each of `leaves`, each leaf routing through it.
    pub fn star(router: &str, leaves: &[&str]) -> Builder {
        let mut b = Builder::new().router(router);
        for leaf in leaves {
            b = b.link(router, leaf);
        }
        b
    }

    /// Declares namespace `name` (links declare theirs implicitly).
    pub fn namespace(mut self, name: &str) -> Builder {
        assert!(
            !name.is_empty()
                && name.len() <= 32
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "namespace name {name:?}: 1 to 32 of A-Z a-z 0-9 _"
        );
        if !self.namespaces.iter().any(|n| n == name) {
            self.namespaces.push(name.to_owned());
        }
        self
    }

    /// Makes `name` the forwarding router (`net.ipv4.ip_forward=1`, the firewall's forward
    /// chain); the namespaces linked to it get their default route through it.
    pub fn router(mut self, name: &str) -> Builder {
        assert!(self.router.is_none(), "one router per topology");
        self.router = Some(name.to_owned());
        self.namespace(name)
    }

    /// A veth pair between `a` (address `.1`) and `b` (`.2`) on a /24 of its own.
    pub fn link(mut self, a: &str, b: &str) -> Builder {
        assert_ne!(a, b, "a link joins two namespaces");
        self = self.namespace(a).namespace(b);
        self.links.push((a.to_owned(), b.to_owned()));
        self
    }

    /// A veth from the test process's (root) namespace into `ns`; see [`Topology::host_ip`].
    pub fn host_link(mut self, ns: &str) -> Builder {
        self = self.namespace(ns);
        self.host_links.push(ns.to_owned());
        self
    }

    /// The router lets `from` open TCP connections to `to`'s address on `port`.
    pub fn allow(mut self, from: &str, to: &str, port: u16) -> Builder {
        self.allows.push((from.to_owned(), to.to_owned(), port));
        self
    }

    /// `ns` drops every packet from `from`'s subnets (those of `from`'s links not shared with
    /// `ns`) in its input chain.
    pub fn deny_input(mut self, ns: &str, from: &str) -> Builder {
        self.denies.push((ns.to_owned(), from.to_owned()));
        self
    }

    /// Creates the namespaces, links, routes and rulesets. Panics (after removing whatever it
    /// created) if a command fails.
    pub fn build(self) -> Topology {
        sweep_stale_once();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let octet =
            u8::try_from(10 + (pid.wrapping_mul(7).wrapping_add(counter)) % 240).unwrap_or(10);
        let mut topo = Topology {
            prefix: format!("tt{pid}n{counter}"),
            octet,
            created: Vec::new(),
            addrs: HashMap::new(),
            subnets: HashMap::new(),
            host_ips: HashMap::new(),
            router: self.router.clone(),
        };
        // `Topology` owns what exists so far: a panic below still deletes it (Drop).
        topo.create(&self);
        topo
    }
}

/// A built topology; see the module documentation. Dropping it kills every process left in
/// its namespaces and deletes them.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    octet: u8,
    /// Full names of the namespaces created so far.
    created: Vec<String>,
    /// Addresses of each namespace, in link order.
    addrs: HashMap<String, Vec<Ipv4Addr>>,
    /// Link subnets (`10.N.L.0/24`) each namespace is on, in link order.
    subnets: HashMap<String, Vec<String>>,
    /// Namespace-side address of each host link.
    host_ips: HashMap<String, Ipv4Addr>,
    router: Option<String>,
}

/// What a TCP connection attempt from inside a namespace ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The handshake completed.
    Connected,
    /// Refused: an RST (nothing listening, or a [`Topology::cut`]).
    Refused,
    /// No answer within the timeout: dropped by a firewall, or blackholed.
    TimedOut,
    /// Anything else (no route, ICMP unreachable, ...), with bash's message.
    Failed(String),
}

impl Topology {
    /// A new [`Builder`].
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The full netns name of namespace `ns` (for `ip netns exec`, `ip -n`, logs).
    pub fn name(&self, ns: &str) -> String {
        let full = format!("{}-{ns}", self.prefix);
        assert!(self.created.contains(&full), "no namespace {ns:?} here");
        full
    }

    /// The per-topology prefix of the namespace names, `tt<pid>n<counter>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The address of `ns` on its first link (for a leaf of a star: its only one).
    pub fn ip(&self, ns: &str) -> Ipv4Addr {
        match self.addrs.get(ns).and_then(|a| a.first()) {
            Some(ip) => *ip,
            None => panic!("namespace {ns:?} has no link (or does not exist)"),
        }
    }

    /// The subnets (`10.N.L.0/24`) of the links of `ns`.
    pub fn subnets(&self, ns: &str) -> Vec<String> {
        self.subnets.get(ns).cloned().unwrap_or_default()
    }

    /// The address of `ns` on its host link: the test process reaches `ns` there.
    pub fn host_ip(&self, ns: &str) -> Ipv4Addr {
        match self.host_ips.get(ns) {
            Some(ip) => *ip,
            None => panic!("namespace {ns:?} has no host link (Builder::host_link)"),
        }
    }

    /// A command running `program` inside namespace `ns` (`ip netns exec NAME program`). `ip`
    /// execs the program, so the child's pid is the program's own: a [`ChildGuard`] of it kills
    /// the program. Environment, arguments and stdio set on the command reach the program.
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(self.name(ns)).arg(program);
        cmd
    }

    /// Like [`crate::command`] inside `ns`: workspace binary `name` with no `TETHER_` variables
    /// but `TETHER_CONFIG_DIR=config_dir`, `RUST_LOG=info`, stdin and stdout null, and stderr
    /// appended to `log`.
    pub fn tether_command(&self, ns: &str, name: &str, config_dir: &Path, log: &Path) -> Command {
        let mut cmd = self.command(ns, bin(name));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TETHER_") {
                cmd.env_remove(&key);
            }
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        cmd.env("TETHER_CONFIG_DIR", config_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        cmd
    }

    /// Tries a TCP connection from inside `ns` to `ip:port` (bash's `/dev/tcp` under
    /// `timeout`), giving up after `timeout`.
    pub fn tcp_probe(&self, ns: &str, ip: Ipv4Addr, port: u16, timeout: Duration) -> Probe {
        let out = self
            .command(ns, "timeout")
            .args(["-k", "1", &format!("{:.3}", timeout.as_secs_f64())])
            .args(["bash", "-c", "exec 3<>\"/dev/tcp/$0/$1\""])
            .arg(ip.to_string())
            .arg(port.to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"));
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        match out.status.code() {
            Some(0) => Probe::Connected,
            Some(124) | Some(137) | None => Probe::TimedOut,
            _ if err.contains("Connection refused") => Probe::Refused,
            _ => Probe::Failed(err),
        }
    }

    /// Whether a TCP connection from `ns` to `ip:port` succeeds within `timeout`.
    pub fn tcp_reachable(&self, ns: &str, ip: Ipv4Addr, port: u16, timeout: Duration) -> bool {
        self.tcp_probe(ns, ip, port, timeout) == Probe::Connected
    }

    /// Lets `from` open TCP connections to `to`:`port` through the router from now on.
    pub fn allow(&self, from: &str, to: &str, port: u16) {
        let element = format!("{} . {} . {port}", self.ip(from), self.ip(to));
        self.set_element("add", self.router_ns(), "allowed", &element);
    }

    /// Undoes [`Topology::allow`] for new connections (established ones go on; see
    /// [`Topology::cut`]).
    pub fn disallow(&self, from: &str, to: &str, port: u16) {
        let element = format!("{} . {} . {port}", self.ip(from), self.ip(to));
        self.set_element("delete", self.router_ns(), "allowed", &element);
    }

    /// Cuts the path between `a` and `b` through the router, both ways: packets, also of
    /// established TCP connections, are answered with a TCP reset, so each end notices with
    /// its next packet and new connections are refused. Undone by [`Topology::restore`].
    pub fn cut(&self, a: &str, b: &str) {
        self.pair_elements("add", "cut", a, b);
    }

    /// Silently drops every packet between `a` and `b` through the router, both ways: a
    /// half-open link that only timeouts reveal. Undone by [`Topology::restore`].
    pub fn blackhole(&self, a: &str, b: &str) {
        self.pair_elements("add", "blackhole", a, b);
    }

    /// Undoes [`Topology::cut`] and [`Topology::blackhole`] between `a` and `b` (either or
    /// both may be in force; a missing element is fine).
    pub fn restore(&self, a: &str, b: &str) {
        for set in ["cut", "blackhole"] {
            for (x, y) in [(a, b), (b, a)] {
                let element = format!("{} . {}", self.ip(x), self.ip(y));
                // `destroy` (nft >= 1.0.8) is not available everywhere: ignore "not found".
                let _ = self.try_nft(
                    self.router_ns(),
                    &format!("delete element inet tether {set} {{ {element} }}"),
                );
            }
        }
    }

    /// `ns` drops packets from `from`'s subnets (see [`Builder::deny_input`]) from now on.
    pub fn deny_input(&self, ns: &str, from: &str) {
        for subnet in self.foreign_subnets(ns, from) {
            self.set_element("add", ns, "denied", &subnet);
        }
    }

    /// Undoes [`Topology::deny_input`].
    pub fn undeny_input(&self, ns: &str, from: &str) {
        for subnet in self.foreign_subnets(ns, from) {
            let _ = self.try_nft(
                ns,
                &format!("delete element inet tether denied {{ {subnet} }}"),
            );
        }
    }

    /// The ruleset of `ns` with handles, for debugging output.
    pub fn ruleset(&self, ns: &str) -> String {
        match self.try_nft(ns, "-a list ruleset") {
            Ok(text) => text,
            Err(e) => format!("(nft list ruleset failed: {e})"),
        }
    }

    /// Pids of the processes inside `ns`.
    pub fn pids(&self, ns: &str) -> Vec<u32> {
        netns_pids(&self.name(ns))
    }

    fn router_ns(&self) -> &str {
        match &self.router {
            Some(r) => r,
            None => panic!("this topology has no router"),
        }
    }

    fn pair_elements(&self, verb: &str, set: &str, a: &str, b: &str) {
        for (x, y) in [(a, b), (b, a)] {
            let element = format!("{} . {}", self.ip(x), self.ip(y));
            self.set_element(verb, self.router_ns(), set, &element);
        }
    }

    fn set_element(&self, verb: &str, ns: &str, set: &str, element: &str) {
        let cmd = format!("{verb} element inet tether {set} {{ {element} }}");
        if let Err(e) = self.try_nft(ns, &cmd) {
            panic!("nft {cmd} in {ns}: {e}");
        }
    }

    /// Runs `nft ARGS` (split on whitespace) inside `ns`; stdout, or stderr as the error.
    fn try_nft(&self, ns: &str, args: &str) -> Result<String, String> {
        let out = self
            .command(ns, "nft")
            .args(args.split_whitespace())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run nft: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Subnets of `from`'s links that `ns` is not on.
    fn foreign_subnets(&self, ns: &str, from: &str) -> Vec<String> {
        let own = self.subnets(ns);
        let theirs: Vec<String> = self
            .subnets(from)
            .into_iter()
            .filter(|s| !own.contains(s))
            .collect();
        assert!(
            !theirs.is_empty(),
            "{from} has no subnet apart from {ns}'s own"
        );
        theirs
    }

    fn create(&mut self, spec: &Builder) {
        {
            // Concurrent first uses of `ip netns add` race on mounting /run/netns.
            static NETNS_ADD: Mutex<()> = Mutex::new(());
            let _lock = NETNS_ADD.lock().unwrap_or_else(|p| p.into_inner());
            for ns in &spec.namespaces {
                let full = format!("{}-{ns}", self.prefix);
                run_ok(Command::new("ip").args(["netns", "add", &full]));
                self.created.push(full);
            }
        }
        for ns in &spec.namespaces {
            run_ok(Command::new("ip").args(["-n", &self.name(ns), "link", "set", "lo", "up"]));
        }
        for (i, (a, b)) in spec.links.iter().enumerate() {
            let l = i + 1;
            let third = u8::try_from(l).unwrap_or_else(|_| panic!("at most 253 links"));
            assert!(third < 254, "at most 253 links");
            let dev = format!("v{l}");
            let (na, nb) = (self.name(a), self.name(b));
            run_ok(Command::new("ip").args([
                "link", "add", &dev, "netns", &na, "type", "veth", "peer", "name", &dev, "netns",
                &nb,
            ]));
            let subnet = format!("10.{}.{l}.0/24", self.octet);
            for (ns, full, host) in [(a, &na, 1u8), (b, &nb, 2u8)] {
                let ip = Ipv4Addr::new(10, self.octet, third, host);
                run_ok(Command::new("ip").args([
                    "-n",
                    full,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    &dev,
                ]));
                run_ok(Command::new("ip").args(["-n", full, "link", "set", &dev, "up"]));
                self.addrs.entry(ns.clone()).or_default().push(ip);
                self.subnets
                    .entry(ns.clone())
                    .or_default()
                    .push(subnet.clone());
            }
        }
        for ns in &spec.host_links {
            self.create_host_link(ns);
        }
        if let Some(router) = &spec.router {
            let full = self.name(router);
            run_ok(
                self.command(router, "bash")
                    .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]),
            );
            // Leaves linked to the router route everything through it.
            for (i, (a, b)) in spec.links.iter().enumerate() {
                let (leaf, router_host) = if a == router {
                    (b, 1u8)
                } else if b == router {
                    (a, 2u8)
                } else {
                    continue;
                };
                let first_router_link = spec
                    .links
                    .iter()
                    .position(|(x, y)| (x == leaf || y == leaf) && (x == router || y == router));
                if first_router_link != Some(i) {
                    continue;
                }
                let third = u8::try_from(i + 1).unwrap_or(0);
                let via = Ipv4Addr::new(10, self.octet, third, router_host);
                run_ok(Command::new("ip").args([
                    "-n",
                    &self.name(leaf),
                    "route",
                    "add",
                    "default",
                    "via",
                    &via.to_string(),
                ]));
            }
            nft_script(
                &full,
                "table inet tether {\n\
                 \tset allowed { type ipv4_addr . ipv4_addr . inet_service; }\n\
                 \tset cut { type ipv4_addr . ipv4_addr; }\n\
                 \tset blackhole { type ipv4_addr . ipv4_addr; }\n\
                 \tchain forward {\n\
                 \t\ttype filter hook forward priority filter; policy drop;\n\
                 \t\tip saddr . ip daddr @blackhole drop\n\
                 \t\tmeta l4proto tcp ip saddr . ip daddr @cut reject with tcp reset\n\
                 \t\tip saddr . ip daddr @cut reject with icmpx type admin-prohibited\n\
                 \t\tct state established,related accept\n\
                 \t\tip saddr . ip daddr . tcp dport @allowed accept\n\
                 \t}\n\
                 }\n",
            );
        }
        for ns in &spec.namespaces {
            if Some(ns) == spec.router.as_ref() {
                continue;
            }
            nft_script(
                &self.name(ns),
                "table inet tether {\n\
                 \tset denied { type ipv4_addr; flags interval; }\n\
                 \tchain input {\n\
                 \t\ttype filter hook input priority filter; policy accept;\n\
                 \t\tip saddr @denied drop\n\
                 \t}\n\
                 }\n",
            );
        }
        for (from, to, port) in &spec.allows {
            self.allow(from, to, *port);
        }
        for (ns, from) in &spec.denies {
            self.deny_input(ns, from);
        }
    }

    /// Claims a free `tth<idx>` in the root namespace and links it to `ns`.
    fn create_host_link(&mut self, ns: &str) {
        let full = self.name(ns);
        let start = std::process::id().wrapping_add(u32::from(self.octet)) % 256;
        for k in 0..256u32 {
            let idx = u8::try_from((start + k) % 256).unwrap_or(0);
            let root_dev = format!("tth{idx}");
            let out = Command::new("ip")
                .args([
                    "link", "add", &root_dev, "type", "veth", "peer", "name", "host", "netns",
                    &full,
                ])
                .output()
                .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("File exists") {
                    continue;
                }
                panic!("ip link add {root_dev}: {}", err.trim());
            }
            let root_ip = Ipv4Addr::new(10, 254, idx, 1);
            let ns_ip = Ipv4Addr::new(10, 254, idx, 2);
            run_ok(Command::new("ip").args([
                "addr",
                "add",
                &format!("{root_ip}/24"),
                "dev",
                &root_dev,
            ]));
            run_ok(Command::new("ip").args(["link", "set", &root_dev, "up"]));
            run_ok(Command::new("ip").args([
                "-n",
                &full,
                "addr",
                "add",
                &format!("{ns_ip}/24"),
                "dev",
                "host",
            ]));
            run_ok(Command::new("ip").args(["-n", &full, "link", "set", "host", "up"]));
            self.host_ips.insert(ns.to_owned(), ns_ip);
            return;
        }
        panic!("no free host link subnet 10.254.0-255.0/24 (tth0..tth255 all exist)");
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for full in &self.created {
            remove_namespace(full);
        }
    }
}

/// SIGKILLs every process in namespace `full` and deletes it (its veths go with it).
fn remove_namespace(full: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = netns_pids(full);
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", full])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Live (non-zombie) pids in namespace `full`.
fn netns_pids(full: &str) -> Vec<u32> {
    let out = Command::new("ip").args(["netns", "pids", full]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        .collect()
}

/// Once per process: removes namespaces `tt<pid>n<counter>-*` whose test process is gone.
fn sweep_stale_once() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
            return;
        };
        let me = std::process::id();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = owner_pid(&name) else {
                continue;
            };
            if pid != me && !alive(pid) {
                eprintln!("netns: removing stale namespace {name} (test process {pid} is gone)");
                remove_namespace(&name);
            }
        }
    });
}

/// The test pid in a namespace name `tt<pid>n<counter>-<name>`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("tt")?;
    let (pid, rest) = rest.split_once('n')?;
    let (counter, ns) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(counter) && !ns.is_empty())
        .then(|| pid.parse().ok())
        .flatten()
}

/// Runs `cmd`, panicking with its stderr if it fails.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// Loads nftables `script` inside namespace `full` (`nft -f -`).
fn nft_script(full: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", full, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nft: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("nft stdin: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("nft: {e}"));
    assert!(
        out.status.success(),
        "nft -f in {full} failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A `tether-server` running inside a namespace of a [`Topology`], listening on
/// `0.0.0.0:`[`HTTPS_PORT`] and `0.0.0.0:`[`WSS_PORT`] there, its certificate valid for its
/// topology address [`NsServer::ip`]. The test process calls its admin API over the
/// namespace's host link ([`Builder::host_link`] is required).
pub struct NsServer {
    /// The data directory.
    pub dir: PathBuf,
    /// The process.
    pub child: Option<ChildGuard>,
    /// Its address inside the topology (what relays and agents dial).
    pub ip: Ipv4Addr,
    /// The admin API as reached from the test process (host link), its certificate checked
    /// for [`NsServer::ip`].
    pub api: AdminApi,
    /// The server's `ports.json`.
    pub ports: Value,
}

impl std::ops::Deref for NsServer {
    type Target = AdminApi;

    fn deref(&self) -> &AdminApi {
        &self.api
    }
}

impl NsServer {
    /// `tether-server init --hostname <ns ip>` in `root/server`, then `run` inside `ns`.
    pub fn start(topo: &Topology, ns: &str, root: &Path) -> NsServer {
        Self::start_with(topo, ns, root, &[])
    }

    /// Like [`NsServer::start`], with extra environment for `run`.
    pub fn start_with(topo: &Topology, ns: &str, root: &Path, env: &[(&str, &str)]) -> NsServer {
        let config_dir = root.join("server-etc");
        std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
        let dir = root.join("server");
        let ip = topo.ip(ns);
        let init_log = root.join("server-init.log");
        let out = topo
            .tether_command(ns, "tether-server", &config_dir, &init_log)
            .args(["init", "--hostname", &ip.to_string(), "--data"])
            .arg(&dir)
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("server init: {e}"));
        assert!(out.status.success(), "server init failed: {out:?}");
        let admin_token = std::fs::read_to_string(dir.join("admin.token"))
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_owned();
        let ca =
            std::fs::read_to_string(dir.join("agent-ca.pem")).unwrap_or_else(|e| panic!("{e}"));
        let tls =
            Arc::new(tether_shared::tls::client_config(&ca).unwrap_or_else(|e| panic!("{e}")));

        let log = root.join("server.log");
        let mut cmd = topo.tether_command(ns, "tether-server", &config_dir, &log);
        cmd.args(["run", "--data"]).arg(&dir);
        cmd.env("TETHER_LISTEN__HTTPS", format!("0.0.0.0:{HTTPS_PORT}"))
            .env("TETHER_LISTEN__WSS", format!("0.0.0.0:{WSS_PORT}"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = ChildGuard::spawn("tether-server (netns)", &mut cmd);
        let ports = child.wait_for_ports(&dir).0;
        NsServer {
            dir,
            child: Some(child),
            ip,
            api: AdminApi::new(
                SocketAddr::from((topo.host_ip(ns), HTTPS_PORT)),
                &ip.to_string(),
                admin_token,
                tls,
            ),
            ports,
        }
    }

    /// The CA certificate agents and relays install with.
    /// `agent-ca.pem`: what agents and relays are installed with.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("agent-ca.pem")
    }

    /// The agent-facing base URL inside the topology, `wss://IP:7919`.
    pub fn upstream(&self) -> String {
        format!("wss://{}:{WSS_PORT}", self.ip)
    }
}

/// A `tether-relay` installed and run inside a namespace.
pub struct NsRelay {
    /// The data directory.
    pub dir: PathBuf,
    config_dir: PathBuf,
    ns: String,
    /// The relay's name.
    pub name: String,
    /// The process while it runs.
    pub child: Option<ChildGuard>,
    /// Its address inside the topology.
    pub ip: Ipv4Addr,
}

impl NsRelay {
    /// `tether-relay install --upstream UPSTREAM --ca CA --token TOKEN --name NAME --hostname
    /// <ns ip> --data root/NAME` inside `ns`; its output (success or not).
    pub fn install_output(
        topo: &Topology,
        ns: &str,
        root: &Path,
        name: &str,
        upstream: &str,
        ca: &Path,
        token: &str,
    ) -> Output {
        let config_dir = root.join(format!("{name}-etc"));
        std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
        let log = root.join(format!("{name}-install.log"));
        topo.tether_command(ns, "tether-relay", &config_dir, &log)
            .args(["install", "--upstream", upstream, "--ca"])
            .arg(ca)
            .args(["--token", token, "--name", name])
            .args(["--hostname", &topo.ip(ns).to_string(), "--data"])
            .arg(root.join(name))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("relay install: {e}"))
    }

    /// [`NsRelay::install_output`], expecting success.
    pub fn install(
        topo: &Topology,
        ns: &str,
        root: &Path,
        name: &str,
        upstream: &str,
        ca: &Path,
        token: &str,
    ) -> NsRelay {
        let out = Self::install_output(topo, ns, root, name, upstream, ca, token);
        assert!(
            out.status.success(),
            "tether-relay install {name} failed ({}): {}{}",
            out.status,
            crate::stdout(&out),
            crate::stderr(&out)
        );
        NsRelay {
            dir: root.join(name),
            config_dir: root.join(format!("{name}-etc")),
            ns: ns.to_owned(),
            name: name.to_owned(),
            child: None,
            ip: topo.ip(ns),
        }
    }

    /// `tether-relay run --data DIR` inside its namespace, downstream on
    /// `0.0.0.0:`[`RELAY_PORT`], admin on `127.0.0.1:0`; waits for `ports.json` and answers it.
    pub fn run(&mut self, topo: &Topology, env: &[(&str, &str)]) -> Value {
        let ports_path = self.dir.join("ports.json");
        let _ = std::fs::remove_file(&ports_path);
        let log = self.dir.with_file_name(format!("{}.log", self.name));
        let mut cmd = topo.tether_command(&self.ns, "tether-relay", &self.config_dir, &log);
        cmd.args(["run", "--data"]).arg(&self.dir);
        cmd.env("TETHER_LISTEN__DOWNSTREAM", format!("0.0.0.0:{RELAY_PORT}"))
            .env("TETHER_LISTEN__ADMIN", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = ChildGuard::spawn("tether-relay run (netns)", &mut cmd);
        let ports = child.wait_for_ports(&self.dir).0;
        self.child = Some(child);
        ports
    }

    /// The agent-facing base URL of this relay, `wss://IP:20080`.
    pub fn downstream(&self) -> String {
        format!("wss://{}:{RELAY_PORT}", self.ip)
    }
}

/// A `tether-agent` installed and run inside a namespace.
pub struct NsAgent {
    /// The data directory.
    pub dir: PathBuf,
    config_dir: PathBuf,
    ns: String,
    /// The agent id from `agent.json`.
    pub id: String,
    /// The agent's name.
    pub name: String,
    /// The monitor process while it runs.
    pub monitor: Option<ChildGuard>,
}

impl NsAgent {
    /// Runs `tether-agent install` with `upstreams`, `ca` and `token` inside `ns`, data in
    /// `root/NAME`, killed after `timeout`; its output, or None if it had to be killed.
    #[allow(clippy::too_many_arguments)]
    pub fn install_output(
        topo: &Topology,
        ns: &str,
        root: &Path,
        name: &str,
        upstreams: &[String],
        ca: &Path,
        token: &str,
        timeout: Duration,
    ) -> Option<Output> {
        let config_dir = root.join(format!("{name}-etc"));
        std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
        let log = root.join(format!("{name}-install.log"));
        let mut cmd = topo.tether_command(ns, "tether-agent", &config_dir, &log);
        cmd.arg("install");
        for u in upstreams {
            cmd.args(["--upstream", u]);
        }
        cmd.arg("--ca")
            .arg(ca)
            .args(["--token", token, "--name", name, "--data"])
            .arg(root.join(name))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("agent install: {e}"));
        let pid = child.id();
        // Wait on another thread so that the deadline can kill it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(timeout) {
            Ok(out) => Some(out.unwrap_or_else(|e| panic!("agent install: {e}"))),
            Err(_) => {
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(raw),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = rx.recv_timeout(Duration::from_secs(5));
                None
            }
        }
    }

    /// [`NsAgent::install_output`] (60 s at most), expecting success.
    pub fn install(
        topo: &Topology,
        ns: &str,
        root: &Path,
        name: &str,
        upstreams: &[String],
        ca: &Path,
        token: &str,
    ) -> NsAgent {
        let out = Self::install_output(
            topo,
            ns,
            root,
            name,
            upstreams,
            ca,
            token,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("tether-agent install {name} hung"));
        assert!(
            out.status.success(),
            "tether-agent install {name} failed ({}): {}{}",
            out.status,
            crate::stdout(&out),
            crate::stderr(&out)
        );
        let dir = root.join(name);
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("agent.json")).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let id = state["agent_id"]
            .as_str()
            .unwrap_or_else(|| panic!("agent.json: {state}"))
            .to_owned();
        NsAgent {
            dir,
            config_dir: root.join(format!("{name}-etc")),
            ns: ns.to_owned(),
            id,
            name: name.to_owned(),
            monitor: None,
        }
    }

    /// Starts the monitor (which starts the worker) inside the agent's namespace, with the
    /// same short reconnect and heartbeat timers as [`crate::fleet::Agent::run`].
    pub fn run(&mut self, topo: &Topology, env: &[(&str, &str)]) {
        let log = self.dir.with_file_name(format!("{}.log", self.name));
        let mut cmd = topo.tether_command(&self.ns, "tether-agent", &self.config_dir, &log);
        cmd.args(["run", "--data"]).arg(&self.dir);
        cmd.env("TETHER_AGENT__RECONNECT_MIN_MS", "50")
            .env("TETHER_AGENT__RECONNECT_MAX_MS", "1000")
            .env("TETHER_AGENT__HEARTBEAT_INTERVAL_MS", "1000");
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.monitor = Some(ChildGuard::spawn("tether-agent run (netns)", &mut cmd));
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn stale_names_are_recognised_and_others_left_alone() {
        assert_eq!(owner_pid("tt1234n0-agents"), Some(1234));
        assert_eq!(owner_pid("tt7n12-relay2"), Some(7));
        for other in [
            "tt1234-agents",
            "ttxn0-a",
            "tt12n3",
            "tt12n3-",
            "tether",
            "tt1234probe",
        ] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
    }
}
