//! Fake upstreams for tests of what an agent accepts: a TLS WebSocket server on the
//! agent-facing path (`/agent/v1/ws`) with a certificate from the real server's CA, so a real
//! agent connects to it as to its server or relay. [`serve`] runs any session actor there;
//! [`FakeUpstream`] is the scripted one: the end-to-end handshake (with the real server's
//! command-signing key, so the agent's only defence left is each command's own signature),
//! challenge, welcome, then one given command frame.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use actix::prelude::*;
use actix_web::{web, App, HttpRequest, HttpServer};
use actix_web_actors::ws;
use tether_shared::e2e::{ServerGate, ServerStep};
use tether_shared::enroll::WS_PATH;
use tether_shared::identity::{Identity, PublicKey};
use tether_shared::protocol::{self, Challenge, EventBody, Frame, Sender, Seq, Welcome};

use crate::fleet::Server;

/// Serves `/agent/v1/ws` on `addr`, a session made by `session` per connection, with a
/// certificate for `localhost` issued by `server`'s CA. Runs on its own thread until the test
/// process ends.
pub fn serve<A, F>(server: &Server, addr: SocketAddr, session: F)
where
    A: Actor<Context = ws::WebsocketContext<A>>
        + StreamHandler<Result<ws::Message, ws::ProtocolError>>,
    F: Fn() -> A + Clone + Send + 'static,
{
    let read = |f: &str| {
        std::fs::read_to_string(server.dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let ca = tether_shared::tls::Ca::from_pem(&read("ca.pem"), &read("ca.key"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (cert, key) = ca
        .issue_server_cert(&["localhost".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    serve_with(addr, &cert, &key, session);
}

/// Like [`serve`], with a given certificate chain and key (e.g. a relay's own).
pub fn serve_with<A, F>(addr: SocketAddr, cert: &str, key: &str, session: F)
where
    A: Actor<Context = ws::WebsocketContext<A>>
        + StreamHandler<Result<ws::Message, ws::ProtocolError>>,
    F: Fn() -> A + Clone + Send + 'static,
{
    let tls = tether_shared::tls::server_config(cert, key).unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let srv = HttpServer::new(move || {
                let session = session.clone();
                App::new().route(
                    WS_PATH,
                    web::get().to(move |req: HttpRequest, stream: web::Payload| {
                        let actor = session();
                        async move { ws::start(actor, &req, stream) }
                    }),
                )
            })
            .workers(1)
            .bind_rustls_0_23(addr, tls)
            .unwrap_or_else(|e| panic!("fake upstream on {addr}: {e}"))
            .run();
            let _ = srv.await;
        });
    });
}

/// What the scripted fake saw from the agent.
#[derive(Default)]
pub struct Seen {
    pub hellos: usize,
    pub events: Vec<EventBody>,
}

/// A scripted upstream session: the end-to-end handshake with `agent` (its public key),
/// challenge, welcome (accepting any hello), then `command`.
pub struct FakeUpstream {
    command: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
    signing: Arc<Identity>,
    agent: PublicKey,
    gate: ServerGate,
}

impl FakeUpstream {
    /// Serves the script on `addr` (see [`serve`]) to the agent whose key is `agent`;
    /// answers what it sees.
    pub fn start(
        server: &Server,
        addr: SocketAddr,
        agent: PublicKey,
        command: Vec<u8>,
    ) -> Arc<Mutex<Seen>> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        let signing = Arc::new(
            Identity::load(&server.dir.join("signing.key")).unwrap_or_else(|e| panic!("{e}")),
        );
        serve(server, addr, move || FakeUpstream {
            command: command.clone(),
            seen: shared.clone(),
            signing: signing.clone(),
            agent,
            gate: ServerGate::default(),
        });
        seen
    }

    fn send(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8]) {
        if let Ok(sealed) = self.gate.seal(bytes) {
            ctx.binary(sealed);
        }
    }
}

impl Actor for FakeUpstream {
    type Context = ws::WebsocketContext<Self>;
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for FakeUpstream {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let bytes = match msg {
            Ok(ws::Message::Binary(b)) => b.to_vec(),
            Ok(ws::Message::Text(t)) => t.as_bytes().to_vec(),
            _ => return,
        };
        let agent = self.agent;
        let bytes = match self.gate.on_message(&bytes, &self.signing, |_| Some(agent)) {
            Ok(ServerStep::Reply(answer)) => return ctx.binary(answer),
            Ok(ServerStep::Established(_)) => {
                let challenge = Challenge {
                    nonce: "bm9uY2U=".into(),
                };
                if let Ok(bytes) = Frame::Challenge(challenge).encode() {
                    self.send(ctx, &bytes);
                }
                return;
            }
            Ok(ServerStep::Frame(frame)) => frame,
            Err(_) => return ctx.stop(),
        };
        let Ok(frame) = protocol::decode(&bytes, Sender::Agent) else {
            return;
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match frame {
            Frame::Hello(_) => {
                seen.hellos += 1;
                let welcome = Welcome {
                    last_event_seq: Seq::ZERO,
                    server_incarnation: "fake-upstream".into(),
                    heartbeat_interval_ms: 5000,
                };
                drop(seen);
                if let Ok(bytes) = Frame::Welcome(welcome).encode() {
                    self.send(ctx, &bytes);
                }
                let command = self.command.clone();
                self.send(ctx, &command);
            }
            Frame::Event(e) => seen.events.push(e.body),
            _ => {}
        }
    }
}
