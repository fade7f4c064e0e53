//! A floor on how fast a request body arrives, on both listeners.
//!
//! actix bounds the time to a request's head, not to its body: a client that sends headers and
//! then a byte now and then holds a connection (and a worker's buffer) for as long as it likes.
//! [`body_deadline`] wraps every request's payload in a [`Deadline`]: the body must have
//! arrived by [`GRACE`] plus one second per [`MIN_RATE`] bytes received so far, so a slow but
//! honest upload (a large artifact over a thin link) keeps going while a trickle is cut. The
//! handler then sees a payload error (400) and the connection is closed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::HttpMessage;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

/// Time any body gets, whatever its size.
pub const GRACE: Duration = Duration::from_secs(10);
/// Bytes per second a body must average past the grace.
pub const MIN_RATE: u64 = 16 * 1024;

/// A payload that fails once it falls behind the floor.
pub struct Deadline {
    inner: Payload,
    start: Instant,
    received: u64,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    pub fn new(inner: Payload) -> Self {
        let start = Instant::now();
        Deadline {
            inner,
            start,
            received: 0,
            timer: Box::pin(tokio::time::sleep_until(start + GRACE)),
        }
    }

    /// When the body must have arrived, given what came so far.
    fn due(&self) -> Instant {
        self.start + GRACE + Duration::from_secs(self.received / MIN_RATE)
    }
}

impl Stream for Deadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                this.received += bytes.len() as u64;
                let due = this.due();
                this.timer.as_mut().reset(due);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::warn!(
                        received = this.received,
                        elapsed_ms = this.start.elapsed().as_millis() as u64,
                        "request-body-too-slow"
                    );
                    Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the request body arrived too slowly",
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

/// Middleware: every request's body under a [`Deadline`] (not a WebSocket's: its frames come
/// as the payload of the upgraded request, for as long as the session lasts).
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    if req.head().upgrade() {
        return next.call(req).await;
    }
    let payload = req.take_payload();
    req.set_payload(Payload::Stream {
        payload: Box::pin(Deadline::new(payload)),
    });
    next.call(req).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn payload(
        chunks: futures_util::stream::BoxStream<'static, Result<Bytes, PayloadError>>,
    ) -> Payload {
        Payload::Stream { payload: chunks }
    }

    #[actix_rt::test]
    async fn a_silent_body_fails_after_the_grace_and_a_steady_one_does_not() {
        tokio::time::pause();
        let silent = payload(futures_util::stream::pending().boxed());
        let mut d = Deadline::new(silent);
        let started = Instant::now();
        assert!(matches!(d.next().await, Some(Err(PayloadError::Io(_)))));
        let waited = started.elapsed();
        assert!(
            waited >= GRACE && waited < GRACE + Duration::from_millis(10),
            "{waited:?}"
        );
        // 64 KiB a second for a minute: well above the floor.
        let steady = futures_util::stream::unfold(0, |n| async move {
            if n == 60 {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((Ok(Bytes::from(vec![0u8; 64 * 1024])), n + 1))
        })
        .boxed();
        let mut d = Deadline::new(payload(steady));
        let mut total = 0;
        while let Some(chunk) = d.next().await {
            total += chunk.unwrap().len();
        }
        assert_eq!(total, 60 * 64 * 1024);
    }
}
