//! [`Bulk`]: the relay's share of the agent-facing HTTPS surface, forwarded upstream (to the
//! server or a parent relay, which serves the same surface).
//!
//! - `POST /agent/v1/enroll`: body and content type forwarded, the upstream's answer returned.
//! - `GET /agent/v1/{artifacts,plugins,upgrades}/{sha256}`: served from the [`Cache`] with `Range`
//!   honoured. The relay holds no agent secret, so the agent's `x-tether-*` headers go
//!   upstream on every request: on a hit as a `Range: bytes=0-0` request whose 200/206 allows
//!   serving the cached copy (anything else is passed back; no answer is 503); on a miss as
//!   the whole download, hashed into a temporary file and cached only if its sha256 matches.
//!   Concurrent misses for one object make one download; the others wait for it, then check
//!   upstream for their own agent like any hit.
//!
//! Upstreams are tried in order from the last one that answered; one that cannot be reached
//! (connect, TLS, timeout) passes the request to the next. The blocking clients of
//! `tether_shared::https` run on the blocking pool (`web::block`).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use actix_files::NamedFile;
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::json;
use tether_shared::agent_auth::{AGENT_HEADER, SIGNATURE_HEADER, TIME_HEADER};
use tether_shared::enroll::{Upstream, ENROLL_PATH};
use tether_shared::https::{self, HttpsError, Limits, Request, StreamLimits};
use tether_shared::trust::TlsSource;
use tokio::sync::OwnedMutexGuard;
use tracing::Instrument;

use crate::cache::{is_sha256, Cache, CacheError, CacheKey, Hit, Kind};

/// Largest enrollment request body (as on the server).
const ENROLL_BODY_LIMIT_BYTES: usize = 16 * 1024;
/// Most of an upstream refusal's body kept to pass back to the agent.
const PASSBACK_BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Header naming the sha256 of served content (as the server's artifact route sends it).
const CHECKSUM_HEADER: &str = "x-checksum-sha256";
/// Agent headers forwarded upstream; nothing else of the agent's request is.
const FORWARDED_HEADERS: [&str; 3] = [AGENT_HEADER, TIME_HEADER, SIGNATURE_HEADER];

/// Counters shown in the relay's `/admin/health`.
#[derive(Debug, Default)]
pub struct BulkStats {
    /// Downloads answered from a cache entry (after upstream allowed them).
    pub hits: AtomicU64,
    /// Downloads that fetched the object upstream.
    pub misses: AtomicU64,
    /// Downloads that waited for another request's download of the same object.
    pub coalesced_waits: AtomicU64,
    /// Body bytes received upstream for misses.
    pub upstream_bytes: AtomicU64,
    /// Body bytes answered to agents from the cache.
    pub served_bytes: AtomicU64,
    /// Downloads refused because the content's sha256 was not the one asked for.
    pub sha_mismatches: AtomicU64,
    /// Requests that no upstream answered properly (unreachable, malformed, cut short).
    pub upstream_errors: AtomicU64,
    /// Bytes in the cache now.
    pub cached_bytes: AtomicU64,
    /// Entries in the cache now.
    pub cached_files: AtomicU64,
}

impl BulkStats {
    /// The counters as JSON.
    pub fn stats_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "hits": get(&self.hits),
            "misses": get(&self.misses),
            "coalesced_waits": get(&self.coalesced_waits),
            "upstream_bytes": get(&self.upstream_bytes),
            "served_bytes": get(&self.served_bytes),
            "sha_mismatches": get(&self.sha_mismatches),
            "upstream_errors": get(&self.upstream_errors),
            "cached_bytes": get(&self.cached_bytes),
            "cached_files": get(&self.cached_files),
        })
    }

    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// An error answered to the agent as `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// The path's sha256 is not 64 lowercase hex digits.
    #[error("bad request: sha256 must be 64 lowercase hex digits")]
    BadSha256,
    /// The path exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No upstream could be reached.
    #[error("no upstream reachable: {0}")]
    Unreachable(String),
    /// An upstream answered, but not properly.
    #[error("upstream failed: {0}")]
    Upstream(String),
    /// The upstream sent other content than the sha256 asked for; nothing was cached.
    #[error("upstream sent content with sha256 {got}, not the {expected} asked for")]
    ShaMismatch {
        /// The sha256 in the path.
        expected: String,
        /// The sha256 of what arrived.
        got: String,
    },
    /// The cache directory failed (details are logged, not answered).
    #[error("relay cache unavailable, retry later")]
    Cache,
    /// The blocking pool is gone (shutting down).
    #[error("relay busy, retry later")]
    Busy,
}

impl ResponseError for BulkError {
    fn status_code(&self) -> StatusCode {
        match self {
            BulkError::BadSha256 => StatusCode::BAD_REQUEST,
            BulkError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BulkError::Upstream(_) | BulkError::ShaMismatch { .. } => StatusCode::BAD_GATEWAY,
            BulkError::Unreachable(_) | BulkError::Cache | BulkError::Busy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(json!({ "error": self.to_string() }))
    }
}

/// Default service of a known path for methods it does not serve.
async fn method_not_allowed() -> Result<HttpResponse, BulkError> {
    Err(BulkError::MethodNotAllowed)
}

/// What the relay sends upstream on an agent's behalf.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The agent's path and query, as it signed them.
    pub path_and_query: String,
    /// The agent's authentication headers (see [`forwarded_headers`]).
    pub headers: Vec<(&'static str, String)>,
}

impl Forward {
    /// The forwardable parts of `req`.
    pub fn of(req: &HttpRequest) -> Forward {
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.path().to_owned(), |p| p.as_str().to_owned());
        Forward {
            path_and_query,
            headers: forwarded_headers(req.headers()),
        }
    }

    /// The claimed agent id, for logs only (upstream checks it).
    pub fn agent_id(&self) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| *k == AGENT_HEADER)
            .map_or("-", |(_, v)| v.as_str())
    }
}

/// The agent's `x-tether-agent`, `x-tether-time` and `x-tether-signature` headers, in that
/// order, those present with a visible-ASCII value; every other header stays at the relay.
pub fn forwarded_headers(headers: &HeaderMap) -> Vec<(&'static str, String)> {
    FORWARDED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some((*name, value.to_owned()))
        })
        .collect()
}

/// An upstream answer handed back to the agent as it came (status, content type, body).
#[derive(Debug, Clone)]
pub struct Passback {
    /// The upstream's status.
    pub status: u16,
    /// The upstream's `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The upstream's body (at most [`PASSBACK_BODY_LIMIT_BYTES`] of it for downloads).
    pub body: Vec<u8>,
}

impl Passback {
    fn into_response(self) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut response = HttpResponse::build(status);
        if let Some(v) = self
            .content_type
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            response.insert_header((header::CONTENT_TYPE, v));
        }
        response.body(self.body)
    }
}

/// The upstreams in order of preference, and the one that answered last.
#[derive(Debug)]
pub struct Upstreams {
    /// As configured (never empty).
    list: Vec<Upstream>,
    /// Trusts the relay's CA only.
    tls: TlsSource,
    /// Index into `list` of the upstream that answered last: tried first.
    preferred: AtomicUsize,
}

impl Upstreams {
    /// `list` tried in order, over `tls`.
    pub fn new(list: Vec<Upstream>, tls: TlsSource) -> Upstreams {
        Upstreams {
            list,
            tls,
            preferred: AtomicUsize::new(0),
        }
    }

    /// The upstream tried first next time.
    pub fn preferred(&self) -> Option<&Upstream> {
        self.list.get(self.preferred.load(Ordering::Relaxed))
    }

    /// Runs `call` against each upstream from the preferred one on, until one is reachable
    /// (an HTTP answer of any status, or a failure after the request reached it).
    pub fn attempt<T>(
        &self,
        call: impl FnMut(&Upstream) -> Result<T, HttpsError>,
    ) -> Result<T, HttpsError> {
        self.attempt_unless(call, |_| false)
    }

    /// [`Self::attempt`], going on past an upstream whose answer is `elsewhere` (a cluster's
    /// node that leaves the request to another) while another is left; the last such answer
    /// if no upstream took it.
    pub fn attempt_unless<T>(
        &self,
        mut call: impl FnMut(&Upstream) -> Result<T, HttpsError>,
        elsewhere: impl Fn(&T) -> bool,
    ) -> Result<T, HttpsError> {
        let n = self.list.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        let mut passed = None;
        for i in 0..n {
            let at = (start + i) % n;
            let Some(upstream) = self.list.get(at) else {
                continue;
            };
            match call(upstream) {
                Err(e) if e.is_unreachable() => {
                    tracing::warn!(upstream = %upstream.authority(), error = %e, "upstream-unreachable");
                    last = Some(e);
                }
                Ok(answer) if elsewhere(&answer) && i + 1 < n => {
                    tracing::info!(upstream = %upstream.authority(), "upstream-sent-elsewhere");
                    passed = Some(answer);
                }
                Ok(answer) => {
                    // An upstream reached by passing others that left the request to another
                    // (enrollment) is not preferred for the rest: they serve it all.
                    if passed.is_none() && !elsewhere(&answer) {
                        if at != start {
                            tracing::info!(upstream = %upstream.authority(), "upstream-switched");
                        }
                        self.preferred.store(at, Ordering::Relaxed);
                    }
                    return Ok(answer);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(answer) = passed {
            return Ok(answer);
        }
        Err(last.unwrap_or_else(|| HttpsError::Connect {
            target: "-".into(),
            source: io::Error::other("no upstream configured"),
        }))
    }

    /// A blocking `GET` of `fwd` with `extra` headers, its body handed to `sink`.
    fn get_streaming(
        &self,
        upstream: &Upstream,
        fwd: &Forward,
        extra: &[(&str, &str)],
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<https::Head, HttpsError> {
        let mut headers: Vec<(&str, &str)> =
            fwd.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        headers.extend_from_slice(extra);
        let req = Request {
            method: "GET",
            host: &upstream.host,
            addr: None,
            port: upstream.port,
            path: &fwd.path_and_query,
            headers: &headers,
            body: None,
        };
        https::request_streaming(Some(self.tls.get()), &req, &StreamLimits::default(), sink)
    }
}

/// The outcome of a miss.
enum Fetched {
    /// Downloaded, verified and cached.
    Cached(Hit),
    /// The upstream refused; nothing cached.
    Refused(Passback),
}

/// The relay's bulk HTTPS: upstreams, cache, downloads in flight, counters.
#[derive(Debug)]
pub struct Bulk {
    upstreams: Upstreams,
    cache: Cache,
    /// One lock per object being downloaded: its holder downloads, the others wait.
    inflight: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Shown in `/admin/health`.
    stats: BulkStats,
}

impl Bulk {
    /// Forwards to `upstreams` (in order, over `tls`) and caches under `cache_dir`, at most
    /// `max_cache_bytes` (the cache is scanned and recovered here).
    pub fn new(
        upstreams: Vec<Upstream>,
        tls: TlsSource,
        cache_dir: PathBuf,
        max_cache_bytes: u64,
    ) -> io::Result<Bulk> {
        if upstreams.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the relay needs at least one upstream",
            ));
        }
        let bulk = Bulk {
            upstreams: Upstreams::new(upstreams, tls),
            cache: Cache::open(cache_dir, max_cache_bytes)?,
            inflight: Mutex::new(HashMap::new()),
            stats: BulkStats::default(),
        };
        bulk.refresh_usage();
        Ok(bulk)
    }

    /// Counters, plus the upstream in use.
    pub fn stats_json(&self) -> serde_json::Value {
        let mut v = self.stats.stats_json();
        if let Some(obj) = v.as_object_mut() {
            let upstream = self.upstreams.preferred().map(Upstream::authority);
            obj.insert("upstream".into(), json!(upstream));
        }
        v
    }

    fn refresh_usage(&self) {
        let (files, bytes) = self.cache.usage();
        self.stats.cached_files.store(files, Ordering::Relaxed);
        self.stats.cached_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The turn to download `key`, and whether another request held it first.
    async fn turn(&self, key: &CacheKey) -> (OwnedMutexGuard<()>, bool) {
        let lock = {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            // Clones are only made under this lock: a lock only the map holds is idle.
            inflight.retain(|_, lock| Arc::strong_count(lock) > 1);
            inflight.entry(key.clone()).or_default().clone()
        };
        match lock.clone().try_lock_owned() {
            Ok(guard) => (guard, false),
            Err(_) => (lock.lock_owned().await, true),
        }
    }

    /// Blocking: the cache entry `key`, ready to serve.
    fn lookup(&self, key: &CacheKey) -> Result<Option<NamedFile>, BulkError> {
        let hit = self.cache.get(key).map_err(|e| cache_failed(&e))?;
        self.refresh_usage();
        hit.map(named).transpose()
    }

    /// Blocking: asks upstream whether the agent may have the object (1 byte of it).
    fn check_upstream(&self, fwd: &Forward) -> Result<Passback, BulkError> {
        let answer = self.upstreams.attempt(|upstream| {
            let mut body = Vec::new();
            let head = self.upstreams.get_streaming(
                upstream,
                fwd,
                &[("Range", "bytes=0-0")],
                &mut |bytes| {
                    keep_prefix(&mut body, bytes);
                    Ok(())
                },
            )?;
            Ok(passback(&head, body))
        });
        answer.map_err(|e| self.upstream_failed(e))
    }

    /// Blocking: downloads `key` whole with the agent's headers, and caches it if verified.
    fn download(&self, key: &CacheKey, fwd: &Forward) -> Result<Fetched, BulkError> {
        let answer = self.upstreams.attempt(|upstream| {
            let mut incoming = self.cache.begin(key.kind).map_err(HttpsError::Sink)?;
            let mut prefix = Vec::new();
            let head = self
                .upstreams
                .get_streaming(upstream, fwd, &[], &mut |bytes| {
                    BulkStats::bump(&self.stats.upstream_bytes, bytes.len() as u64);
                    keep_prefix(&mut prefix, bytes);
                    incoming.write(bytes)
                })?;
            Ok((head, incoming, prefix))
        });
        let (head, incoming, prefix) = answer.map_err(|e| self.upstream_failed(e))?;
        match head.status {
            200 => {}
            201..=299 => {
                BulkStats::bump(&self.stats.upstream_errors, 1);
                return Err(BulkError::Upstream(format!(
                    "HTTP {} to a whole-object request",
                    head.status
                )));
            }
            _ => return Ok(Fetched::Refused(passback(&head, prefix))),
        }
        let committed = self.cache.commit(incoming, key);
        self.refresh_usage();
        match committed {
            Ok(hit) => Ok(Fetched::Cached(hit)),
            Err(CacheError::Mismatch { expected, got, len }) => {
                BulkStats::bump(&self.stats.sha_mismatches, 1);
                tracing::error!(got = %got, bytes = len, "bulk-sha-mismatch");
                Err(BulkError::ShaMismatch { expected, got })
            }
            Err(CacheError::Io(e)) => Err(cache_failed(&e)),
        }
    }

    /// Blocking: the relay's own download of `key` (its upgrade package), signed by the relay
    /// in `fwd`: the cached copy if there is one, else fetched (verified) and cached. Answers
    /// the cache file's path.
    pub fn fetch_own(&self, key: &CacheKey, fwd: &Forward) -> Result<PathBuf, String> {
        if let Some(hit) = self.cache.get(key).map_err(|e| e.to_string())? {
            return Ok(hit.path);
        }
        match self.download(key, fwd).map_err(|e| e.to_string())? {
            Fetched::Cached(hit) => Ok(hit.path),
            Fetched::Refused(answer) => Err(format!(
                "upstream answered HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )),
        }
    }

    /// Blocking: forwards an enrollment.
    fn enroll_upstream(
        &self,
        content_type: Option<String>,
        body: &[u8],
    ) -> Result<Passback, BulkError> {
        let mut headers = Vec::new();
        if let Some(ct) = &content_type {
            headers.push(("Content-Type", ct.as_str()));
        }
        // A cluster's member or standby leaves enrollment to the active node (503): the next
        // upstream is asked.
        let answer = self.upstreams.attempt_unless(
            |upstream| {
                let req = Request {
                    method: "POST",
                    host: &upstream.host,
                    addr: None,
                    port: upstream.port,
                    path: ENROLL_PATH,
                    headers: &headers,
                    body: Some(body),
                };
                https::request(self.upstreams.tls.get(), &req, &Limits::default())
            },
            |response| response.status == 503,
        );
        let response = answer.map_err(|e| self.upstream_failed(e))?;
        Ok(Passback {
            status: response.status,
            content_type: response.header("content-type").map(str::to_owned),
            body: response.body,
        })
    }

    /// Counts and words a failed upstream exchange.
    fn upstream_failed(&self, e: HttpsError) -> BulkError {
        match e {
            HttpsError::Sink(e) => cache_failed(&e),
            e => {
                BulkStats::bump(&self.stats.upstream_errors, 1);
                tracing::warn!(error = %e, "bulk-upstream-failed");
                if e.is_unreachable() {
                    BulkError::Unreachable(e.to_string())
                } else {
                    BulkError::Upstream(e.to_string())
                }
            }
        }
    }

    /// Answers `file` to `req` (`Range` honoured) and counts the bytes.
    fn serve(&self, req: &HttpRequest, file: NamedFile, sha256: &str) -> HttpResponse {
        let mut response = file.into_response(req);
        if let BodySize::Sized(n) = response.body().size() {
            BulkStats::bump(&self.stats.served_bytes, n);
        }
        if let Ok(v) = HeaderValue::from_str(sha256) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(CHECKSUM_HEADER), v);
        }
        response
    }
}

/// Logs a cache failure; the agent only learns the cache is unavailable.
fn cache_failed(e: &io::Error) -> BulkError {
    tracing::error!(error = %e, "bulk-cache-failed");
    BulkError::Cache
}

/// A cache entry as a response body: octet stream, no disposition, no last-modified.
fn named(hit: Hit) -> Result<NamedFile, BulkError> {
    let file = NamedFile::from_file(hit.file, &hit.path).map_err(|e| cache_failed(&e))?;
    Ok(file
        .use_last_modified(false)
        .disable_content_disposition()
        .set_content_type(actix_web::mime::APPLICATION_OCTET_STREAM))
}

fn keep_prefix(kept: &mut Vec<u8>, bytes: &[u8]) {
    let room = PASSBACK_BODY_LIMIT_BYTES.saturating_sub(kept.len());
    kept.extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
}

fn passback(head: &https::Head, body: Vec<u8>) -> Passback {
    Passback {
        status: head.status,
        content_type: head.header("content-type").map(str::to_owned),
        body,
    }
}

/// Whether upstream's answer to the 1-byte check allows serving a cached copy of `len` bytes
/// (an empty object has no byte 0: its range is unsatisfiable, yet it exists).
pub fn allows_hit(status: u16, len: u64) -> bool {
    matches!(status, 200 | 206) || (status == 416 && len == 0)
}

/// Mounts `POST /agent/v1/enroll`, `GET /agent/v1/artifacts/{sha256}`,
/// `GET /agent/v1/plugins/{sha256}` and `GET /agent/v1/upgrades/{sha256}`; needs
/// `web::Data<Bulk>` in app data.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(ENROLL_PATH)
            .app_data(web::PayloadConfig::new(ENROLL_BODY_LIMIT_BYTES))
            .route(web::post().to(enroll))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!(
            "/agent/v1/{}/{{sha256}}",
            Kind::Artifacts.dir_name()
        ))
        .route(web::get().to(artifact))
        .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!("/agent/v1/{}/{{sha256}}", Kind::Plugins.dir_name()))
            .route(web::get().to(plugin))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(format!(
            "/agent/v1/{}/{{sha256}}",
            Kind::Upgrades.dir_name()
        ))
        .route(web::get().to(upgrade_package))
        .default_service(web::to(method_not_allowed)),
    );
}

/// `POST /agent/v1/enroll`.
async fn enroll(
    req: HttpRequest,
    body: web::Bytes,
    bulk: web::Data<Bulk>,
) -> Result<HttpResponse, BulkError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let source = req.peer_addr().map(|a| a.ip());
    let b = bulk.clone();
    let answer = web::block(move || b.enroll_upstream(content_type, &body))
        .await
        .map_err(|_| BulkError::Busy)??;
    tracing::info!(source = ?source, status = answer.status, "enroll-forwarded");
    Ok(answer.into_response())
}

/// `GET /agent/v1/artifacts/{sha256}`.
async fn artifact(
    req: HttpRequest,
    path: web::Path<String>,
    bulk: web::Data<Bulk>,
) -> Result<HttpResponse, BulkError> {
    download(req, Kind::Artifacts, path.into_inner(), bulk).await
}

/// `GET /agent/v1/plugins/{sha256}`.
async fn plugin(
    req: HttpRequest,
    path: web::Path<String>,
    bulk: web::Data<Bulk>,
) -> Result<HttpResponse, BulkError> {
    download(req, Kind::Plugins, path.into_inner(), bulk).await
}

/// `GET /agent/v1/upgrades/{sha256}`.
async fn upgrade_package(
    req: HttpRequest,
    path: web::Path<String>,
    bulk: web::Data<Bulk>,
) -> Result<HttpResponse, BulkError> {
    download(req, Kind::Upgrades, path.into_inner(), bulk).await
}

/// A download: from the cache if upstream allows it, else fetched (once) and cached.
async fn download(
    req: HttpRequest,
    kind: Kind,
    sha256: String,
    bulk: web::Data<Bulk>,
) -> Result<HttpResponse, BulkError> {
    if !is_sha256(&sha256) {
        return Err(BulkError::BadSha256);
    }
    let fwd = Forward::of(&req);
    let span = tracing::info_span!(
        "bulk",
        agent_id = %fwd.agent_id().escape_debug(),
        kind = kind.dir_name(),
        sha256 = %sha256,
    );
    let key = CacheKey { kind, sha256 };
    async move {
        if let Some(file) = lookup(&bulk, &key).await? {
            return answer_hit(&req, &bulk, fwd, file, &key).await;
        }
        let (turn, waited) = bulk.turn(&key).await;
        if waited {
            BulkStats::bump(&bulk.stats.coalesced_waits, 1);
        }
        // Another request may have cached it while this one waited.
        if let Some(file) = lookup(&bulk, &key).await? {
            drop(turn);
            return answer_hit(&req, &bulk, fwd, file, &key).await;
        }
        BulkStats::bump(&bulk.stats.misses, 1);
        let (b, k, span) = (bulk.clone(), key.clone(), tracing::Span::current());
        // The turn goes with the download: it ends with it even if the agent hangs up.
        let fetched = web::block(move || {
            let _turn = turn;
            let _entered = span.enter();
            b.download(&k, &fwd)
        })
        .await
        .map_err(|_| BulkError::Busy)??;
        match fetched {
            Fetched::Cached(hit) => {
                tracing::info!(bytes = hit.len, "bulk-miss-cached");
                let file = web::block(move || named(hit))
                    .await
                    .map_err(|_| BulkError::Busy)??;
                Ok(bulk.serve(&req, file, &key.sha256))
            }
            Fetched::Refused(answer) => {
                tracing::info!(status = answer.status, "bulk-refused-upstream");
                Ok(answer.into_response())
            }
        }
    }
    .instrument(span)
    .await
}

/// The cache entry `key`, opened on the blocking pool.
async fn lookup(bulk: &web::Data<Bulk>, key: &CacheKey) -> Result<Option<NamedFile>, BulkError> {
    let (b, k, span) = (bulk.clone(), key.clone(), tracing::Span::current());
    web::block(move || {
        let _entered = span.enter();
        b.lookup(&k)
    })
    .await
    .map_err(|_| BulkError::Busy)?
}

/// Serves the cached `file` if upstream allows the agent to have it; else upstream's answer.
async fn answer_hit(
    req: &HttpRequest,
    bulk: &web::Data<Bulk>,
    fwd: Forward,
    file: NamedFile,
    key: &CacheKey,
) -> Result<HttpResponse, BulkError> {
    let (b, span) = (bulk.clone(), tracing::Span::current());
    let answer = web::block(move || {
        let _entered = span.enter();
        b.check_upstream(&fwd)
    })
    .await
    .map_err(|_| BulkError::Busy)??;
    let len = file.metadata().len();
    if allows_hit(answer.status, len) {
        BulkStats::bump(&bulk.stats.hits, 1);
        tracing::info!(
            bytes = len,
            range = req.headers().contains_key(header::RANGE),
            "bulk-hit"
        );
        Ok(bulk.serve(req, file, &key.sha256))
    } else {
        tracing::info!(status = answer.status, "bulk-refused-upstream");
        Ok(answer.into_response())
    }
}

#[cfg(test)]
#[path = "bulk_tests.rs"]
mod tests;
