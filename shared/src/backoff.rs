//! Retry policy, free of processes and clocks so it can be unit-tested: [`Backoff`]
//! (exponential delay with full jitter) and [`RestartBudget`] (at most N restarts in a sliding
//! window). The agent's monitor (worker process restarts), its supervisor (actor restarts) and
//! its uplink (reconnects), and the load generator that mimics agents, each own what they need
//! and feed them `Instant`s.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

/// Exponential backoff with full jitter: the n-th delay is uniform in `[0, min(max, min·2ⁿ)]`, so
/// that a fleet of agents restarting after a common cause does not restart in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Ceiling of the first delay.
    min: Duration,
    /// Ceiling of every delay.
    max: Duration,
    /// Delays handed out since the last reset; selects the current ceiling.
    attempt: u32,
}

impl Backoff {
    /// A backoff whose ceiling starts at `min` and doubles up to `max` (`max` is raised to `min`
    /// if smaller).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The ceiling the next delay is drawn under: `min·2^attempt`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        // 2^31 · anything ≥ 1 ns already exceeds any sane max; checked_mul guards the rest.
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// Draws the next delay (uniform in `[0, ceiling]`) and doubles the ceiling.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=ceiling_ms))
    }

    /// Ceiling of the first delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// Delays handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `min`: the worker has been healthy long enough.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// At most `budget` restarts within any `window`: past it the monitor gives up.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    /// Restarts allowed per window.
    budget: u32,
    /// The sliding window.
    window: Duration,
    /// When the restarts still inside the window happened, oldest first.
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    /// A budget of `budget` restarts per `window`.
    pub fn new(budget: u32, window: Duration) -> Self {
        Self {
            budget,
            window,
            recent: VecDeque::new(),
        }
    }

    /// Records a restart at `now` if the budget allows it and says whether it did. A refused
    /// restart is not recorded.
    pub fn try_restart(&mut self, now: Instant) -> bool {
        while let Some(&oldest) = self.recent.front() {
            if now.saturating_duration_since(oldest) >= self.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= usize::try_from(self.budget).unwrap_or(usize::MAX) {
            return false;
        }
        self.recent.push_back(now);
        true
    }

    /// Restarts counted inside the window (as of the last [`Self::try_restart`]).
    pub fn in_window(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_from_min_up_to_max() {
        let mut b = Backoff::new(100 * MS, 1_000 * MS);
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..7 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000, 1_000]);
    }

    #[test]
    fn delays_are_jittered_below_the_ceiling() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut b = Backoff::new(100 * MS, 10_000 * MS);
            for _ in 0..3 {
                b.next_delay(&mut rng);
            }
            let ceiling = b.ceiling();
            let d = b.next_delay(&mut rng);
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            seen.insert(d.as_millis());
        }
        // Full jitter spreads the 4th delay over [0, 800] ms rather than pinning it.
        assert!(seen.len() > 50, "only {} distinct delays", seen.len());
        assert!(seen.iter().any(|&d| d < 400) && seen.iter().any(|&d| d >= 400));
    }

    #[test]
    fn reset_starts_over_and_huge_attempts_do_not_overflow() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert!(b.next_delay(&mut rng) <= 10_000 * MS);
        }
        assert_eq!(b.ceiling(), 10_000 * MS);
        assert_eq!(b.attempt(), 100);
        b.reset();
        assert_eq!(b.ceiling(), 100 * MS);
        assert!(b.next_delay(&mut rng) <= 100 * MS);
    }

    #[test]
    fn max_below_min_is_raised_to_min() {
        let b = Backoff::new(500 * MS, 100 * MS);
        assert_eq!(b.ceiling(), 500 * MS);
    }

    #[test]
    fn budget_refuses_the_restart_past_it_within_the_window() {
        let t0 = Instant::now();
        let mut budget = RestartBudget::new(3, 1_000 * MS);
        assert!(budget.try_restart(t0));
        assert!(budget.try_restart(t0 + 100 * MS));
        assert!(budget.try_restart(t0 + 200 * MS));
        assert!(!budget.try_restart(t0 + 300 * MS));
        // A refusal is not recorded: the window still holds three.
        assert_eq!(budget.in_window(), 3);
    }

    #[test]
    fn budget_window_slides() {
        let t0 = Instant::now();
        let mut budget = RestartBudget::new(2, 1_000 * MS);
        assert!(budget.try_restart(t0));
        assert!(budget.try_restart(t0 + 500 * MS));
        assert!(!budget.try_restart(t0 + 999 * MS));
        // The first restart leaves the window at t0 + 1 s: room for exactly one more.
        assert!(budget.try_restart(t0 + 1_000 * MS));
        assert!(!budget.try_restart(t0 + 1_400 * MS));
        assert_eq!(budget.in_window(), 2);
        // Long after, the window is empty again.
        assert!(budget.try_restart(t0 + 10_000 * MS));
        assert_eq!(budget.in_window(), 1);
    }
}
