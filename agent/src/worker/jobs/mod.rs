//! Jobs on the agent: the durable record of each job ([`book`]) and how one step runs
//! ([`step`]). The uplink drives them (see `worker/uplink/jobs.rs`), because every transition
//! is journaled together with the event that reports it.

pub mod book;
pub mod step;
