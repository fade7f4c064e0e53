//! Jobs on the agent: the durable record of each job ([`book`]), how one step runs
//! ([`step`]), how a step of an uploaded plugin gets its bundle ([`bundle`]), and the built-in
//! steps that talk to the network: [`fetch`] (`artifact/fetch`) and [`http`] (`http/request`). The uplink
//! drives them (see `worker/uplink/jobs.rs`), because every transition is journaled together
//! with the event that reports it.

pub mod book;
pub mod bundle;
pub mod fetch;
pub mod http;
pub mod step;
