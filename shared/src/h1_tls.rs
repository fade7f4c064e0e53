//! HTTPS listeners that speak HTTP/1.1 only.
//!
//! actix-web's `bind_rustls_0_23` offers `h2` by ALPN whenever actix-http is built with HTTP/2,
//! which `awc` turns on for the whole workspace, and its HTTP/2 sets no bound on concurrent
//! streams: one connection could open thousands. [`bind`] serves the same actix-web `App` over
//! rustls with ALPN pinned to `http/1.1` (a client that offers only `h2` fails the handshake),
//! keeping the limits `HttpServer` had: handshake and request-head deadlines, keep-alive,
//! handshakes and connections per worker, backlog, graceful shutdown.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use actix_http::body::MessageBody;
use actix_http::{HttpService, Request, Response};
use actix_service::{map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt};
use actix_tls::accept::rustls_0_23::{Acceptor, TlsStream};
use actix_tls::accept::TlsError;
use actix_web::dev::AppConfig;
use tokio::net::TcpStream;

/// The one protocol offered by ALPN.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Deadlines and bounds of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The TLS handshake must end within this.
    pub tls_handshake_timeout: Duration,
    /// A request's head must arrive within this of the connection (or the previous request).
    pub client_request_timeout: Duration,
    /// A closing connection may linger this long.
    pub client_disconnect_timeout: Duration,
    /// An idle kept-alive connection is closed after this.
    pub keep_alive: Duration,
    /// TLS handshakes in progress at once, per worker.
    pub max_tls_handshakes_per_worker: usize,
    /// Open connections at once, per worker (more wait in the backlog).
    pub max_connections_per_worker: usize,
    pub backlog: u32,
    /// How long requests in flight may finish at a graceful stop.
    pub shutdown_timeout_s: u64,
    /// Worker threads (`None`: one per core).
    pub workers: Option<usize>,
}

/// Binds `addr` and serves the `App` that `factory` builds (once per worker) over TLS with
/// HTTP/1.1 only. Answers the running server (stop it with its handle) and the bound address.
pub fn bind<F, I, S, B>(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    limits: &Limits,
    factory: F,
) -> io::Result<(actix_server::Server, SocketAddr)>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    B: MessageBody + 'static,
{
    let mut tls = tls;
    tls.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    actix_tls::accept::max_concurrent_tls_connect(limits.max_tls_handshakes_per_worker);
    let listener = tcp_listener(addr, limits.backlog)?;
    let local = listener.local_addr()?;
    let mut builder = actix_server::Server::build()
        .backlog(limits.backlog)
        .max_concurrent_connections(limits.max_connections_per_worker)
        .shutdown_timeout(limits.shutdown_timeout_s)
        .disable_signals();
    if let Some(n) = limits.workers {
        builder = builder.workers(n);
    }
    let limits = limits.clone();
    let builder = builder.listen(format!("https-{local}"), listener, move || {
        let app = factory()
            .into_factory()
            .map_err(|err| err.into().error_response());
        let h1 = HttpService::build()
            .keep_alive(limits.keep_alive)
            .client_request_timeout(limits.client_request_timeout)
            .client_disconnect_timeout(limits.client_disconnect_timeout)
            .local_addr(local)
            .h1(map_config(app, |_| AppConfig::default()));
        let mut acceptor = Acceptor::new(tls.clone());
        acceptor.set_handshake_timeout(limits.tls_handshake_timeout);
        acceptor
            .map_init_err(|_| ())
            .map_err(TlsError::into_service_error)
            .map(|io: TlsStream<TcpStream>| {
                let peer = io.get_ref().0.peer_addr().ok();
                // Small frames (acks, events) go out at once: Nagle plus delayed ACKs would
                // add up to 40 ms to every round trip of the message streams.
                let _ = io.get_ref().0.set_nodelay(true);
                (io, peer)
            })
            .and_then(h1.map_err(TlsError::Service))
    })?;
    Ok((builder.run(), local))
}

/// A listening socket with `SO_REUSEADDR` (a restart rebinds at once) and `backlog`.
fn tcp_listener(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}
