//! The worker's recent log, kept in memory for an operator to read from afar
//! (`Operation::Log`): every line goes to stderr as before and into a ring of at most
//! [`RING_BYTES`], the oldest lines dropped first. Nothing is written to disk.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// Bytes of log lines kept.
pub const RING_BYTES: usize = 256 * 1024;

static RING: Mutex<VecDeque<u8>> = Mutex::new(VecDeque::new());

/// A `MakeWriter` for tracing: stderr and the ring.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tee;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Tee;

    fn make_writer(&'a self) -> Self::Writer {
        Tee
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        keep(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn keep(buf: &[u8]) {
    let mut ring = RING.lock().unwrap_or_else(PoisonError::into_inner);
    let buf = &buf[buf.len().saturating_sub(RING_BYTES)..];
    let over = (ring.len() + buf.len()).saturating_sub(RING_BYTES);
    let drop = over.min(ring.len());
    ring.drain(..drop);
    ring.extend(buf);
}

/// The last `max` bytes of the log, starting at a line (the first partial line is left out),
/// as text.
pub fn tail(max: usize) -> String {
    let ring = RING.lock().unwrap_or_else(PoisonError::into_inner);
    let start = ring.len().saturating_sub(max);
    let bytes: Vec<u8> = ring.range(start..).copied().collect();
    drop(ring);
    let from = match (start, bytes.iter().position(|b| *b == b'\n')) {
        (0, _) | (_, None) => 0,
        (_, Some(nl)) => nl + 1,
    };
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_lines_within_its_bound() {
        for i in 0..20_000 {
            keep(format!("line {i}\n").as_bytes());
        }
        assert!(RING.lock().unwrap_or_else(PoisonError::into_inner).len() <= RING_BYTES);
        let t = tail(100);
        assert!(t.ends_with("line 19999\n"), "{t}");
        assert!(t.starts_with("line "), "starts at a line: {t}");
        assert!(t.len() <= 100);
    }
}
