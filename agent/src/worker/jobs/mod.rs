//! Jobs on the agent: the durable record of each job ([`book`]), how one step runs
//! ([`step`]) and how its output is captured ([`capture`]), how a step of an uploaded plugin gets its bundle ([`bundle`]), and the built-in
//! steps that talk to the network: [`fetch`] (`artifact/fetch`) and [`http`] (`http/request`), and the limits
//! that keep a step's result inside one frame ([`outputs`]). The uplink
//! drives them (see `worker/uplink/jobs.rs`), because every transition is journaled together
//! with the event that reports it.

pub mod book;
pub mod bundle;
pub mod capture;
pub mod fetch;
pub mod http;
pub mod ledger;
pub mod outputs;
pub mod run_as;
pub mod runner;
pub mod step;
