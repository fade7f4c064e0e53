//! HTTPS listeners that speak HTTP/1.1 only.
//!
//! actix-web's `bind_rustls_0_23` offers `h2` by ALPN whenever actix-http is built with HTTP/2,
//! which `awc` turns on for the whole workspace, and its HTTP/2 sets no bound on concurrent
//! streams: one connection could open thousands. [`bind`] serves the same actix-web `App` over
//! rustls with ALPN pinned to `http/1.1` (a client that offers only `h2` fails the handshake),
//! keeping the limits `HttpServer` had: handshake and request-head deadlines, keep-alive,
//! handshakes and connections per worker, backlog, graceful shutdown.
//!
//! It adds what actix lacks: per-source bounds. One address may hold at most
//! [`Limits::max_connections_per_source`] connections and
//! [`Limits::max_handshakes_per_source`] TLS handshakes in progress; past them its new
//! connections are closed at once, before any TLS work, so that one address cannot take the
//! slots every other peer needs (many agents behind one NAT share an address: the connection
//! bound is generous, the handshake one is what stops a slow-handshake flood).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use actix_rt::net::{ActixStream, Ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use actix_http::body::MessageBody;
use actix_http::{HttpService, Request, Response};
use actix_service::{
    fn_service, map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt,
};
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
    /// Connections one source address may hold at once (all workers together).
    pub max_connections_per_source: usize,
    /// TLS handshakes one source address may have in progress at once.
    pub max_handshakes_per_source: usize,
}

/// Open connections and handshakes in progress, per source address.
#[derive(Debug, Default)]
struct Sources {
    counts: Mutex<HashMap<IpAddr, (usize, usize)>>,
}

impl Sources {
    /// A connection from `ip` (and its handshake) if both are under their bounds.
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<(Slot, Slot)> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (conns, handshakes) = counts.entry(ip).or_default();
        if *conns >= limits.max_connections_per_source
            || *handshakes >= limits.max_handshakes_per_source
        {
            return None;
        }
        *conns += 1;
        *handshakes += 1;
        let slot = |handshake| Slot {
            sources: self.clone(),
            ip,
            handshake,
        };
        Some((slot(false), slot(true)))
    }

    fn release(&self, ip: IpAddr, handshake: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((conns, handshakes)) = counts.get_mut(&ip) {
            if handshake {
                *handshakes = handshakes.saturating_sub(1);
            } else {
                *conns = conns.saturating_sub(1);
            }
            if *conns == 0 && *handshakes == 0 {
                counts.remove(&ip);
            }
        }
    }
}

/// One connection (or handshake) counted for its source, given back when dropped.
#[derive(Debug)]
struct Slot {
    sources: Arc<Sources>,
    ip: IpAddr,
    handshake: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.sources.release(self.ip, self.handshake);
    }
}

/// A TCP stream that holds its source's slots: the connection's for its life, the
/// handshake's until TLS is established.
pub struct Counted {
    io: TcpStream,
    _connection: Slot,
    handshake: Option<Slot>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl ActixStream for Counted {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_read_ready(&self.io, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_write_ready(&self.io, cx)
    }
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
    let sources = Arc::new(Sources::default());
    let builder = builder.listen(format!("https-{local}"), listener, move || {
        let (sources, admit_limits) = (sources.clone(), limits.clone());
        // Before any TLS work: a source over its bounds is closed at once.
        let admit = fn_service(move |io: TcpStream| {
            let admitted = io
                .peer_addr()
                .ok()
                .and_then(|peer| sources.admit(peer.ip(), &admit_limits));
            let result = match admitted {
                Some((connection, handshake)) => Ok(Counted {
                    io,
                    _connection: connection,
                    handshake: Some(handshake),
                }),
                None => {
                    tracing::debug!(peer = ?io.peer_addr().ok(), "connection-refused-source-over-bounds");
                    Err(TlsError::Tls(io::Error::other(
                        "too many connections or handshakes from this source",
                    )))
                }
            };
            std::future::ready(result)
        });
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
        admit
            .and_then(acceptor.map_init_err(|_| ()))
            .map_err(TlsError::into_service_error)
            .map(|mut io: TlsStream<Counted>| {
                let counted = io.get_mut().0;
                counted.handshake = None;
                let peer = counted.io.peer_addr().ok();
                // Small frames (acks, events) go out at once: Nagle plus delayed ACKs would
                // add up to 40 ms to every round trip of the message streams.
                let _ = counted.io.set_nodelay(true);
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
