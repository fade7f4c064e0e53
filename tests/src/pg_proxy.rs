//! A proxy between a client and a test PostgreSQL (`tether_tests::postgres`), on a Unix socket
//! of its own, that can cut a connection at a transaction's `COMMIT`: before the database sees
//! it (the batch was not committed), or after the database answered it, the answer never
//! reaching the client (the batch was committed, and the client cannot know). Both leave the
//! client with a `COMMIT` that got no answer: an ambiguous commit.
//!
//! It reads the client's side as the protocol's messages (a startup message, then a type byte,
//! a length and a body each); the server's side is copied as it comes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a failure to set up is a test failure

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Where the next `COMMIT` is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nowhere: everything passes.
    Nothing = 0,
    /// The `COMMIT` never reaches the database.
    BeforeCommit = 1,
    /// The database commits; its answer never reaches the client.
    AfterCommit = 2,
}

#[derive(Default)]
struct State {
    /// The armed [`Cut`], for the next `COMMIT` only.
    armed: AtomicU8,
    /// Connections cut so far.
    cuts: AtomicU64,
    /// Answers of the database to a `COMMIT` that were swallowed.
    swallowed: AtomicU64,
    /// New connections are closed at once while set (the database looks unreachable).
    held: AtomicBool,
}

/// The running proxy; it stops accepting when dropped (connections it carries end with their
/// peers).
pub struct PgProxy {
    dir: tempfile::TempDir,
    port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl PgProxy {
    /// A proxy to the database whose Unix socket is in `socket_dir` (port 5432's socket).
    pub fn start(socket_dir: &Path) -> PgProxy {
        let port = 5432u16;
        let dir = tempfile::tempdir().unwrap();
        let target = socket_dir.join(format!(".s.PGSQL.{port}"));
        let listener = UnixListener::bind(dir.path().join(format!(".s.PGSQL.{port}"))).unwrap();
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, halt) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                if s.held.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = UnixStream::connect(&target) else {
                    continue;
                };
                carry(client, server, s.clone());
            }
        });
        PgProxy {
            dir,
            port,
            state,
            stop,
        }
    }

    /// A connection string for `url`'s database (a test `Postgres::url()`), through the proxy.
    pub fn url(&self, url: &str) -> String {
        let host = format!("host={}", self.dir.path().display());
        url.split(' ')
            .map(|part| {
                if part.starts_with("host=") {
                    host.clone()
                } else if part.starts_with("port=") {
                    format!("port={}", self.port)
                } else {
                    part.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Cuts the connection that carries the next `COMMIT`, as `cut` says.
    pub fn arm(&self, cut: Cut) {
        self.state.armed.store(cut as u8, Ordering::SeqCst);
    }

    /// While `held`, new connections are closed at once (those open go on).
    pub fn hold(&self, held: bool) {
        self.state.held.store(held, Ordering::SeqCst);
    }

    /// Connections cut at a `COMMIT` so far.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Answers to a `COMMIT` the database gave and the client never got.
    pub fn swallowed(&self) -> u64 {
        self.state.swallowed.load(Ordering::SeqCst)
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the stop.
        let _ = UnixStream::connect(self.socket());
    }
}

impl PgProxy {
    fn socket(&self) -> PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{}", self.port))
    }
}

/// Carries one connection on two threads.
fn carry(client: UnixStream, server: UnixStream, state: Arc<State>) {
    // Set when the client's side cut at a COMMIT the database answers: its answer is swallowed.
    let swallowing = Arc::new(AtomicBool::new(false));
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (mut s_read, mut c_write) = (server, client);
    {
        let (state, swallowing) = (state.clone(), swallowing.clone());
        std::thread::spawn(move || {
            let _ = client_to_server(&mut c_read, &mut s_write, &state, &swallowing);
            let _ = c_read.shutdown(Shutdown::Both);
            let _ = s_write.shutdown(Shutdown::Both);
        });
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match s_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if swallowing.load(Ordering::SeqCst) {
                // The database answered the COMMIT: the client never hears it.
                state.swallowed.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if c_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_read.shutdown(Shutdown::Both);
        let _ = c_write.shutdown(Shutdown::Both);
    });
}

fn read_exact(r: &mut UnixStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn client_to_server(
    from: &mut UnixStream,
    to: &mut UnixStream,
    state: &State,
    swallowing: &AtomicBool,
) -> std::io::Result<()> {
    // The startup message: a length (itself included), then the rest.
    let len = read_exact(from, 4)?;
    let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let rest = read_exact(from, n.saturating_sub(4))?;
    to.write_all(&len)?;
    to.write_all(&rest)?;
    loop {
        let head = read_exact(from, 5)?;
        let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let body = read_exact(from, n.saturating_sub(4))?;
        let is_commit = head[0] == b'Q' && body.starts_with(b"COMMIT");
        if is_commit {
            let armed = state.armed.swap(Cut::Nothing as u8, Ordering::SeqCst);
            if armed == Cut::BeforeCommit as u8 {
                state.cuts.fetch_add(1, Ordering::SeqCst);
                return Ok(());
            }
            if armed == Cut::AfterCommit as u8 {
                state.cuts.fetch_add(1, Ordering::SeqCst);
                swallowing.store(true, Ordering::SeqCst);
                to.write_all(&head)?;
                to.write_all(&body)?;
                // The server's side ends the connection once the answer came (and was
                // swallowed); nothing more goes to the database meanwhile.
                let mut rest = [0u8; 1];
                let _ = from.read(&mut rest);
                return Ok(());
            }
        }
        to.write_all(&head)?;
        to.write_all(&body)?;
    }
}
