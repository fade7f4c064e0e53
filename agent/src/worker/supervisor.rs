//! `Supervisor`: keeps the worker's long-lived actors alive and reports their health.
//!
//! Each child runs on its own arbiter, built by a factory. Every tick the supervisor pings each
//! child (`Ping`, answered with a short state): an answer is a beat; no answer within the tick
//! shows the child as `timeout`; a closed mailbox means the child died — a panic in one of its
//! handlers drops it — and it is counted and rebuilt after a backoff. Past the restart budget
//! the supervisor stops the whole worker with a non-zero exit code, and the monitor process
//! (which restarts the worker) takes over.

use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use tether_shared::protocol::ActorHealth;

use tether_shared::backoff::{Backoff, RestartBudget};

/// Every supervised actor answers this with a one-word state (e.g. `connected`).
#[derive(Message)]
#[rtype(result = "String")]
pub struct Ping;

/// Builds (or rebuilds) a child and returns where to ping it; `None` if it could not be built
/// (counted like a crash, retried after the backoff).
pub type Factory = Box<dyn Fn() -> Option<Recipient<Ping>>>;

/// Exit code of a worker whose supervisor gave up.
pub const EXIT_SUPERVISOR_GAVE_UP: i32 = 3;

struct Child {
    name: String,
    kind: String,
    factory: Factory,
    addr: Option<Recipient<Ping>>,
    state: String,
    restarts: u32,
    /// Deaths (a panic in a handler, or an unexpected stop).
    crashes: u32,
    last_beat: Instant,
    /// When the current instance was built.
    built: Instant,
    backoff: Backoff,
    budget: RestartBudget,
    /// Not before this instant (backoff).
    restart_at: Option<Instant>,
}

/// First restart delay ceiling, and the largest.
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A child answering for this long after it was built resets its backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

impl Child {
    /// Rebuild after a jittered delay that doubles with each restart.
    fn schedule_restart(&mut self, now: Instant) {
        self.restart_at = Some(now + self.backoff.next_delay(&mut rand::thread_rng()));
    }
}

pub struct Supervisor {
    children: Vec<Child>,
    tick: Duration,
    budget: u32,
    window: Duration,
}

impl Supervisor {
    pub fn new(tick: Duration, budget: u32, window: Duration) -> Self {
        Supervisor {
            children: Vec::new(),
            tick,
            budget,
            window,
        }
    }

    /// Add a child, built now and rebuilt whenever it dies.
    pub fn child(mut self, name: &str, kind: &str, factory: Factory) -> Self {
        let addr = factory();
        let (budget, window) = (self.budget, self.window);
        self.children.push(Child {
            name: name.into(),
            kind: kind.into(),
            factory,
            addr,
            state: "starting".into(),
            restarts: 0,
            crashes: 0,
            last_beat: Instant::now(),
            built: Instant::now(),
            backoff: Backoff::new(RESTART_MIN, RESTART_MAX),
            budget: RestartBudget::new(budget, window),
            restart_at: None,
        });
        self
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut pings = Vec::new();
        for (i, child) in self.children.iter_mut().enumerate() {
            match &child.addr {
                Some(addr) if addr.connected() => pings.push((i, addr.send(Ping))),
                Some(_) => {
                    // The mailbox closed: the actor died (panicked or stopped).
                    child.crashes += 1;
                    child.addr = None;
                    child.state = "restarting".into();
                    child.schedule_restart(now);
                    tracing::error!(actor = %child.name, crashes = child.crashes, "actor-died");
                }
                None if child.restart_at.is_none() => {
                    // Could not be built at all: back off as after a crash.
                    child.crashes += 1;
                    child.schedule_restart(now);
                }
                None => {
                    if child.restart_at.is_some_and(|t| now >= t) {
                        if !child.budget.try_restart(now) {
                            tracing::error!(actor = %child.name, restarts = child.restarts, "restart-budget-exceeded");
                            System::current().stop_with_code(EXIT_SUPERVISOR_GAVE_UP);
                            return;
                        }
                        child.restarts += 1;
                        child.restart_at = None;
                        child.addr = (child.factory)();
                        child.built = now;
                        child.state = "starting".into();
                        tracing::warn!(actor = %child.name, restarts = child.restarts, "actor-restarted");
                    }
                }
            }
        }
        let timeout = self.tick;
        for (i, ping) in pings {
            ctx.spawn(
                async move { tokio::time::timeout(timeout, ping).await }
                    .into_actor(self)
                    .map(move |res, act, _| {
                        let Some(child) = act.children.get_mut(i) else {
                            return;
                        };
                        match res {
                            Ok(Ok(state)) => {
                                child.state = state;
                                child.last_beat = Instant::now();
                                if child.built.elapsed() >= STABLE_AFTER {
                                    child.backoff.reset();
                                }
                            }
                            Ok(Err(_)) => child.state = "dead".into(),
                            Err(_) => child.state = "timeout".into(),
                        }
                    }),
            );
        }
    }

    pub fn health(&self) -> Vec<ActorHealth> {
        self.children
            .iter()
            .map(|c| ActorHealth {
                name: c.name.clone(),
                kind: c.kind.clone(),
                state: c.state.clone(),
                restarts: c.restarts,
                last_beat_ms: c.last_beat.elapsed().as_millis() as u64,
            })
            .collect()
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.tick, |act, ctx| act.check(ctx));
    }
}

/// The health of every supervised actor.
#[derive(Message)]
#[rtype(result = "Vec<ActorHealth>")]
pub struct ObserveChildren;

impl Handler<ObserveChildren> for Supervisor {
    type Result = MessageResult<ObserveChildren>;

    fn handle(&mut self, _: ObserveChildren, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.health())
    }
}

/// Serializable snapshot for the beat line to the monitor.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerHealth {
    pub actors: Vec<ActorHealth>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A toy child that panics, stops or hangs on command.
    struct Toy;
    impl Actor for Toy {
        type Context = Context<Self>;
    }
    impl Handler<Ping> for Toy {
        type Result = String;
        fn handle(&mut self, _: Ping, _: &mut Self::Context) -> String {
            "ok".into()
        }
    }
    #[derive(Message)]
    #[rtype(result = "()")]
    enum Misbehave {
        Panic,
        Hang,
    }
    impl Handler<Misbehave> for Toy {
        type Result = ();
        fn handle(&mut self, msg: Misbehave, _: &mut Self::Context) {
            match msg {
                Misbehave::Panic => panic!("toy panics on command"),
                Misbehave::Hang => std::thread::sleep(Duration::from_millis(600)),
            }
        }
    }

    async fn wait_for(sup: &Addr<Supervisor>, what: impl Fn(&ActorHealth) -> bool) -> ActorHealth {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = sup.send(ObserveChildren).await.unwrap().remove(0);
            if what(&h) {
                return h;
            }
            assert!(Instant::now() < deadline, "condition not reached: {h:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[actix::test]
    async fn restarts_a_panicking_child_and_shows_a_hung_one() {
        let built = Arc::new(AtomicU32::new(0));
        let toys: Arc<std::sync::Mutex<Vec<Addr<Toy>>>> = Arc::default();
        let (b, t) = (built.clone(), toys.clone());
        let factory: Factory = Box::new(move || {
            b.fetch_add(1, Ordering::SeqCst);
            let addr = Toy::start_in_arbiter(&Arbiter::new().handle(), |_| Toy);
            t.lock().unwrap().push(addr.clone());
            Some(addr.recipient())
        });
        let sup = Supervisor::new(Duration::from_millis(50), 5, Duration::from_secs(60))
            .child("toy", "Toy", factory)
            .start();
        wait_for(&sup, |h| h.state == "ok").await;

        let first = toys.lock().unwrap()[0].clone();
        first.do_send(Misbehave::Panic);
        let h = wait_for(&sup, |h| h.restarts == 1 && h.state == "ok").await;
        assert_eq!(h.restarts, 1);
        assert_eq!(built.load(Ordering::SeqCst), 2, "rebuilt by its factory");

        let second = toys.lock().unwrap()[1].clone();
        second.do_send(Misbehave::Hang);
        wait_for(&sup, |h| h.state == "timeout").await;
        wait_for(&sup, |h| h.state == "ok").await;
    }
}
