//! Native TLS: a `wss://` client (rustls, trusting a test CA) connects, subscribes and gets its
//! events; a plain-text client gets nothing from the TLS port.

use std::sync::Arc;

use gavel_broker::protocol::Reply;
use gavel_client::{Client, ConnectOptions};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio_rustls::rustls;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_works_end_to_end_with_native_tls() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = temp_dir("tls");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let b = TestBroker::start(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(certified.cert.der().to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the broker");
    let options = ConnectOptions {
        token: Some(token("tess")),
        ..ConnectOptions::default()
    };
    let client = Client::handshake_over(tls, &format!("localhost:{}", b.addr.port()), options)
        .await
        .expect("WebSocket over TLS");
    let mut c = TestClient::after_connect(client).await;
    assert!(matches!(
        c.subscribe("user:tess").await,
        Reply::Subscribed { .. }
    ));
    b.broker.publish_to_user(
        &gavel_broker::protocol::UserId::parse("tess").unwrap(),
        "secure",
        json!(1),
    );
    assert_eq!(c.next_event().await.event, "secure");

    // Plain HTTP on the TLS port gets no answer: the TLS handshake fails and the socket closes.
    let mut plain = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(HANG, plain.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    let _ = std::fs::remove_dir_all(&dir);
}
