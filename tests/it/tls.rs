//! `https://` to Segment: a fake Segment behind TLS with a test CA (made with the
//! `openssl` CLI). The worker trusts the CA through `SSL_CERT_FILE` (the system store's
//! override), delivers; without it, or with a certificate for another name, it retries
//! with the cause `tls` and logs the certificate's problem.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use segment_bridge_testkit::tls;

use crate::helpers::*;

const WITHIN: Duration = Duration::from_secs(20);

/// A test CA, and two server certificates it signed: `good.pem` for localhost and
/// 127.0.0.1, `other.pem` for another name only.
fn make_certificates(dir: &Path) -> PathBuf {
    let ca = tls::test_ca(dir);
    tls::server_certificate(dir, "good", "DNS:localhost,IP:127.0.0.1");
    tls::server_certificate(dir, "other", "DNS:other.example");
    ca
}

/// A Segment stand-in over TLS with the certificate `<name>.pem`: answers 200 and keeps
/// the events of every batch.
struct TlsSegment {
    addr: std::net::SocketAddr,
    events: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl TlsSegment {
    async fn start(dir: &Path, name: &str) -> TlsSegment {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs: Vec<CertificateDer> =
            CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let kept = events.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, kept) = (acceptor.clone(), kept.clone());
                tokio::spawn(async move {
                    // A handshake the client refuses ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            async move {
                                use http_body_util::BodyExt;
                                let body = request.into_body().collect().await?.to_bytes();
                                let batch: Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                if let Some(events) = batch["batch"].as_array() {
                                    kept.lock().unwrap().extend(events.iter().cloned());
                                }
                                Ok::<_, hyper::Error>(hyper::Response::new(
                                    http_body_util::Full::new(axum::body::Bytes::from_static(
                                        b"{}",
                                    )),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsSegment {
            addr,
            events,
            server,
        }
    }

    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}/v1/batch", self.addr.port())
    }
}

impl Drop for TlsSegment {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `segment-bridge run` on the test's queues, region us posting to `endpoint`, with
/// `SSL_CERT_FILE` set to `ca` if given.
fn worker(queues: &Queues, endpoint: &str, ca: Option<&Path>) -> Running {
    let mut bridge = worker_bridge(queues, endpoint);
    if let Some(ca) = ca {
        bridge.env("SSL_CERT_FILE", ca.to_str().unwrap());
    }
    bridge.spawn()
}

async fn wait_metric(daemon: &Running, series: &str) -> f64 {
    let start = Instant::now();
    loop {
        let value = daemon.metric(series).await;
        if value > 0.0 {
            return value;
        }
        assert!(
            start.elapsed() < WITHIN,
            "{series} stayed 0:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_segment_works_with_the_test_ca_and_a_bad_certificate_is_named_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_certificates(dir.path());
    let good = TlsSegment::start(dir.path(), "good").await;
    let other = TlsSegment::start(dir.path(), "other").await;
    let tls_retries = r#"segment_bridge_retries_total{region="us",cause="tls"}"#;

    // Trusted through SSL_CERT_FILE: delivered.
    let queues = Queues::new("tls-trusted").await;
    let good_url = good.url("localhost");
    let daemon = worker(&queues, &good_url, Some(&ca));
    daemon.wait_ready(WITHIN).await;
    let ids = session_ids("tls", 3);
    queues.publish(bodies(&ids)).await;
    let start = Instant::now();
    while tracked(&good.events.lock().unwrap()) != all(&ids) {
        assert!(
            start.elapsed() < WITHIN,
            "not delivered:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(daemon.metric(tls_retries).await, 0.0);
    drop(daemon);

    // The CA trusted, the certificate for another name.
    let queues = Queues::new("tls-name").await;
    let other_url = other.url("localhost");
    let daemon = worker(&queues, &other_url, Some(&ca));
    daemon.wait_ready(WITHIN).await;
    queues.publish(bodies(&session_ids("tls-name", 1))).await;
    wait_metric(&daemon, tls_retries).await;
    let log = daemon.stderr();
    assert!(log.contains("name mismatch"), "{log}");
    assert_eq!(
        daemon
            .metric(r#"segment_bridge_retries_total{region="us",cause="transport"}"#)
            .await,
        0.0
    );
    drop(daemon);

    // The CA not trusted: unknown issuer, named once however often it is retried.
    let queues = Queues::new("tls-untrusted").await;
    let daemon = worker(&queues, &good_url, None);
    daemon.wait_ready(WITHIN).await;
    queues
        .publish(bodies(&session_ids("tls-untrusted", 1)))
        .await;
    let start = Instant::now();
    while daemon.metric(tls_retries).await < 3.0 {
        assert!(
            start.elapsed() < WITHIN,
            "not retried:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = daemon.stderr();
    assert_eq!(log.matches("unknown issuer").count(), 1, "{log}");
    assert!(
        good.events.lock().unwrap().len() <= 6,
        "nothing more delivered"
    );
}
