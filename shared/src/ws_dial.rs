//! The WebSocket client that agents and relays dial their upstream with: rustls, a connect
//! deadline, `TCP_NODELAY`, and a tunnel through the process's proxy if it has one
//! (`crate::proxy`).
//!
//! awc leaves Nagle's algorithm on. An agent's frames are small and come in bursts (a step's
//! end, then the job's end), so the second one waited for the server's delayed ACK: a steady
//! 40 ms on every job's round trip.

use std::sync::Arc;
use std::time::Duration;

use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection, ConnectorService};
use actix_web::http::Uri;
use futures_util::future::LocalBoxFuture;
use tokio::net::TcpStream;

/// A TCP connector that turns off Nagle's algorithm on every connection it makes.
#[derive(Clone, Default)]
pub struct NoDelay {
    inner: ConnectorService,
}

impl Service<ConnectInfo<Uri>> for NoDelay {
    type Response = Connection<Uri, TcpStream>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        Service::<ConnectInfo<Uri>>::poll_ready(&self.inner, cx)
    }

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        if let Some(proxy) = crate::proxy::for_host(req.hostname()) {
            // A tunnel through the process's proxy; TLS then runs inside it, end to end.
            let (host, port, uri) = (req.hostname().to_owned(), req.port(), req.request().clone());
            return Box::pin(async move {
                let tcp = proxy
                    .tunnel(&host, port)
                    .await
                    .map_err(|e| ConnectError::Io(e.into()))?;
                Ok(Connection::new(uri, tcp))
            });
        }
        let connecting = self.inner.call(req);
        Box::pin(async move {
            let connection = connecting.await?;
            // Only a latency matter: a socket that refuses the option still works.
            let _ = connection.io_ref().set_nodelay(true);
            Ok(connection)
        })
    }
}

/// A client for one connection attempt to an upstream trusted by `tls`.
pub fn client(tls: Arc<rustls::ClientConfig>, deadline: Duration) -> awc::Client {
    let connector = awc::Connector::new()
        .connector(NoDelay::default())
        .rustls_0_23(tls)
        .timeout(deadline);
    awc::Client::builder()
        .connector(connector)
        .timeout(deadline)
        .finish()
}
