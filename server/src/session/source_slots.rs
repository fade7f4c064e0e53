//! [`SourceSlots`]: handshakes in flight per source address. Before a peer is authenticated
//! nothing distinguishes it but its address, so no address may hold more than half of the
//! server's handshake slots (`max_handshakes_in_flight`): one address opening connections and
//! never answering the challenge cannot take the slots other agents need. A [`SourceSlot`]
//! gives its place back when dropped (the session authenticated, or ended).
//!
//! Agents behind a relay arrive on the relay's link, whose channels are bounded per link
//! instead (see `relay_session`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Handshakes in flight per source address, at most `max_per_source` each.
#[derive(Debug)]
pub struct SourceSlots {
    max_per_source: usize,
    in_flight: Mutex<HashMap<IpAddr, usize>>,
}

/// The peer's address holds its share of the handshake slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFull;

/// One handshake's place; given back on drop.
#[derive(Debug)]
pub struct SourceSlot {
    slots: Arc<SourceSlots>,
    source: IpAddr,
}

impl SourceSlots {
    /// Slots for a server allowing `max_handshakes` in flight: half of them per address (at
    /// least one).
    pub fn new(max_handshakes: usize) -> Arc<SourceSlots> {
        Arc::new(SourceSlots {
            max_per_source: (max_handshakes / 2).max(1),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more handshake from `source`, or `None` if it holds its share.
    pub fn take(self: &Arc<Self>, source: IpAddr) -> Option<SourceSlot> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let held = in_flight.entry(source).or_insert(0);
        if *held >= self.max_per_source {
            return None;
        }
        *held += 1;
        Some(SourceSlot {
            slots: self.clone(),
            source,
        })
    }

    /// A place for one more handshake from `peer` (an `ip:port`): `Ok(None)` when the address
    /// is unknown (nothing to count it against), `Err(SourceFull)` when it holds its share.
    pub fn take_for_peer(self: &Arc<Self>, peer: &str) -> Result<Option<SourceSlot>, SourceFull> {
        match peer.parse::<std::net::SocketAddr>() {
            Ok(addr) => self.take(addr.ip()).map(Some).ok_or(SourceFull),
            Err(_) => Ok(None),
        }
    }

    /// Handshakes in flight from `source` now.
    #[cfg(test)]
    pub fn held(&self, source: IpAddr) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&source)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut in_flight = self
            .slots
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = in_flight.get_mut(&self.source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                in_flight.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_half_and_gives_back_on_drop() {
        let slots = SourceSlots::new(8);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<SourceSlot> = (0..4).map(|_| slots.take(a).unwrap()).collect();
        assert!(slots.take(a).is_none(), "a fifth from one address");
        let other = slots.take(b).unwrap();
        assert_eq!((slots.held(a), slots.held(b)), (4, 1));
        drop(held);
        drop(other);
        assert_eq!((slots.held(a), slots.held(b)), (0, 0));
        assert!(slots.take(a).is_some());
        assert!(
            SourceSlots::new(1).take(a).is_some(),
            "at least one per address"
        );
    }
}
