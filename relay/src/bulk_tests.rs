//! Unit tests of [`super`]: header forwarding, sha validation, failover order, and the routes'
//! refusals (bad sha 400, wrong method 405, no upstream 503 even on a hit).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use super::*;
use actix_web::test::{self as web_test, TestRequest};
use actix_web::App;
use sha2::{Digest, Sha256};

fn tls() -> tether_shared::trust::TlsSource {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = tether_shared::tls::Ca::generate("test CA").unwrap();
    tether_shared::trust::TlsSource::fixed(Arc::new(
        tether_shared::tls::client_config(ca.cert_pem()).unwrap(),
    ))
}

/// An address nothing listens on (bound, then released).
fn closed_upstream() -> Upstream {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Upstream {
        host: "127.0.0.1".into(),
        port,
    }
}

#[test]
fn forwards_only_the_agent_auth_headers_in_order() {
    let req = TestRequest::get()
        .insert_header((SIGNATURE_HEADER, "sig"))
        .insert_header((AGENT_HEADER, "agent-1"))
        .insert_header((TIME_HEADER, "1700000000000"))
        .insert_header((header::AUTHORIZATION, "Bearer secret"))
        .insert_header((header::RANGE, "bytes=5-"))
        .insert_header((header::COOKIE, "a=b"))
        .to_http_request();
    let fwd = Forward::of(&req);
    assert_eq!(
        fwd.headers,
        vec![
            (AGENT_HEADER, "agent-1".to_owned()),
            (TIME_HEADER, "1700000000000".to_owned()),
            (SIGNATURE_HEADER, "sig".to_owned()),
        ]
    );
    assert_eq!(fwd.agent_id(), "agent-1");

    let mut headers = HeaderMap::new();
    headers.insert(
        HeaderName::from_static(AGENT_HEADER),
        HeaderValue::from_bytes(b"caf\xe9").unwrap(),
    );
    assert!(forwarded_headers(&headers).is_empty());
    assert_eq!(
        Forward::of(&TestRequest::get().to_http_request()).agent_id(),
        "-"
    );
}

#[test]
fn forwards_the_path_and_query_as_signed() {
    let sha = "ab".repeat(32);
    let req = TestRequest::get()
        .uri(&format!("/agent/v1/artifacts/{sha}?x=1"))
        .to_http_request();
    assert_eq!(
        Forward::of(&req).path_and_query,
        format!("/agent/v1/artifacts/{sha}?x=1")
    );
}

#[test]
fn only_200_and_206_allow_a_hit() {
    assert!(allows_hit(200, 10) && allows_hit(206, 10));
    assert!(allows_hit(416, 0) && !allows_hit(416, 10));
    for refused in [301, 400, 401, 403, 404, 500, 502, 503] {
        assert!(!allows_hit(refused, 10), "{refused}");
    }
}

#[test]
fn prefix_kept_is_bounded() {
    let mut kept = Vec::new();
    keep_prefix(&mut kept, &[1; 40 * 1024]);
    keep_prefix(&mut kept, &[2; 40 * 1024]);
    assert_eq!(kept.len(), PASSBACK_BODY_LIMIT_BYTES);
    keep_prefix(&mut kept, &[3; 10]);
    assert_eq!(kept.len(), PASSBACK_BODY_LIMIT_BYTES);
}

#[test]
fn failover_tries_the_next_and_starts_from_the_last_that_answered() {
    let ups: Vec<Upstream> = (1..=3)
        .map(|port| Upstream {
            host: "h".into(),
            port,
        })
        .collect();
    let upstreams = Upstreams::new(ups, tls());
    let unreachable = |u: &Upstream| HttpsError::Connect {
        target: u.authority(),
        source: io::Error::from(io::ErrorKind::ConnectionRefused),
    };
    let mut tried = Vec::new();
    let got = upstreams.attempt(|u| {
        tried.push(u.port);
        if u.port == 1 {
            Err(unreachable(u))
        } else {
            Ok(u.port)
        }
    });
    assert_eq!(got.unwrap(), 2);
    assert_eq!(tried, vec![1, 2]);
    assert_eq!(upstreams.preferred().unwrap().port, 2);

    // Starts at 2 and wraps around; a failure after reaching one is not retried elsewhere.
    let mut tried = Vec::new();
    let got: Result<(), _> = upstreams.attempt(|u| {
        tried.push(u.port);
        if u.port == 2 {
            Err(unreachable(u))
        } else {
            Err(HttpsError::Malformed {
                target: u.authority(),
                reason: "test",
            })
        }
    });
    assert!(matches!(got, Err(HttpsError::Malformed { .. })));
    assert_eq!(tried, vec![2, 3]);

    let mut tried = Vec::new();
    let got: Result<(), _> = upstreams.attempt(|u| {
        tried.push(u.port);
        Err(unreachable(u))
    });
    assert!(got.unwrap_err().is_unreachable());
    assert_eq!(tried, vec![2, 3, 1]);
}

#[test]
fn needs_an_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let err = Bulk::new(vec![], tls(), dir.path().to_owned(), 1 << 20).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[actix_rt::test]
async fn routes_refuse_bad_sha_and_methods_and_never_serve_unchecked() {
    let dir = tempfile::tempdir().unwrap();
    let content = b"cached bundle";
    let sha = hex::encode(Sha256::digest(content));
    {
        let cache = Cache::open(dir.path().to_owned(), 1 << 20).unwrap();
        let mut incoming = cache.begin(Kind::Plugins).unwrap();
        incoming.write(content).unwrap();
        let key = CacheKey {
            kind: Kind::Plugins,
            sha256: sha.clone(),
        };
        cache.commit(incoming, &key).unwrap();
    }
    let bulk = web::Data::new(
        Bulk::new(
            vec![closed_upstream()],
            tls(),
            dir.path().to_owned(),
            1 << 20,
        )
        .unwrap(),
    );
    let app = web_test::init_service(App::new().app_data(bulk.clone()).configure(configure)).await;

    for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
        let resp = web_test::call_service(
            &app,
            TestRequest::get()
                .uri(&format!("/agent/v1/artifacts/{bad}"))
                .to_request(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: serde_json::Value = web_test::read_body_json(resp).await;
        assert!(body["error"].as_str().unwrap().contains("sha256"), "{body}");
    }
    for (method, path) in [
        ("PUT", format!("/agent/v1/plugins/{sha}")),
        ("DELETE", format!("/agent/v1/artifacts/{sha}")),
        ("GET", ENROLL_PATH.to_owned()),
    ] {
        let req = TestRequest::default()
            .method(method.parse().unwrap())
            .uri(&path)
            .to_request();
        let resp = web_test::call_service(&app, req).await;
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
    }

    // Cached, but upstream cannot say whether this agent may have it: 503, no content.
    let resp = web_test::call_service(
        &app,
        TestRequest::get()
            .uri(&format!("/agent/v1/plugins/{sha}"))
            .insert_header((AGENT_HEADER, "agent-1"))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = web_test::read_body(resp).await;
    assert!(!body.windows(content.len()).any(|w| w == content));

    // A miss with no upstream: 503 too, and nothing cached.
    let other = "cd".repeat(32);
    let resp = web_test::call_service(
        &app,
        TestRequest::get()
            .uri(&format!("/agent/v1/artifacts/{other}"))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let stats = bulk.stats_json();
    assert_eq!(stats["hits"], 0);
    assert_eq!(stats["misses"], 1);
    assert_eq!(stats["upstream_errors"], 2);
    assert_eq!(stats["cached_files"], 1);
    assert_eq!(stats["cached_bytes"], content.len() as u64);
    assert!(stats["upstream"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let artifacts = dir.path().join("artifacts");
    assert_eq!(std::fs::read_dir(artifacts).unwrap().count(), 0);
}
