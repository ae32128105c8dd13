//! Results to the backend: a real HTTP receiver on a loopback port that refuses the first
//! attempts, and a broker killed with SIGKILL between the auction's end and the delivery. Every
//! webhook arrives, signed, with one idempotency key and one body on every attempt.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use gavel_broker::webhooks::verify;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::common::*;

pub const SECRET: &str = "whsec-test-0123456789";

/// A receiver's connection, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// One request the receiver got: its idempotency key, signature header and body.
#[derive(Clone, Debug)]
pub struct Received {
    pub key: String,
    pub signature: String,
    pub body: String,
}

/// A webhook receiver that answers 503 to its first `refuse` requests, then 200.
#[derive(Clone, Default)]
pub struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start(listener: TcpListener, refuse: usize) -> Receiver {
        Receiver::serve(listener, refuse, None, None)
    }

    /// A receiver that holds every request until `n` are open at once, then answers them all:
    /// a broker that sends one webhook at a time never gets an answer.
    pub async fn gathering(listener: TcpListener, n: usize) -> Receiver {
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        Receiver::serve(listener, 0, Some(barrier), None)
    }

    /// A receiver that speaks HTTPS with `tls`.
    pub async fn https(listener: TcpListener, tls: tokio_rustls::TlsAcceptor) -> Receiver {
        Receiver::serve(listener, 0, None, Some(tls))
    }

    fn serve(
        listener: TcpListener,
        refuse: usize,
        gather: Option<Arc<tokio::sync::Barrier>>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Receiver {
        let receiver = Receiver::default();
        let got = Arc::clone(&receiver.got);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let got = Arc::clone(&got);
                let gather = gather.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let stream: Box<dyn Io> = match tls {
                        None => Box::new(tcp),
                        Some(tls) => match tls.accept(tcp).await {
                            Ok(stream) => Box::new(stream),
                            // The broker refused our certificate: nothing was received.
                            Err(_) => return,
                        },
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let got = Arc::clone(&got);
                        let gather = gather.clone();
                        async move {
                            if let Some(barrier) = gather {
                                barrier.wait().await;
                            }
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            let (key, signature) =
                                (header("idempotency-key"), header("gavel-signature"));
                            let body = req.into_body().collect().await?.to_bytes();
                            let body = String::from_utf8_lossy(&body).into_owned();
                            let n = {
                                let mut got = got.lock().unwrap();
                                got.push(Received {
                                    key,
                                    signature,
                                    body,
                                });
                                got.len()
                            };
                            let status = if n <= refuse { 503 } else { 200 };
                            Ok::<_, hyper::Error>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        receiver
    }

    pub fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The delivered webhooks (the last attempt of each id), by id.
    pub fn delivered(&self) -> HashMap<String, Value> {
        self.got()
            .into_iter()
            .map(|r| (r.key, serde_json::from_str(&r.body).unwrap()))
            .collect()
    }
}

/// A free loopback port for a receiver that is not listening yet, and the webhook URL on it.
pub fn receiver_not_yet_listening() -> (SocketAddr, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    (port, format!("http://{port}/hooks"))
}

/// The broker flags that send webhooks to `url`, signed with [`SECRET`], retried every second.
pub fn webhook_flags(url: &str) -> [&str; 6] {
    [
        "--webhook-url",
        url,
        "--webhook-secret",
        SECRET,
        "--webhook-max-backoff",
        "1s",
    ]
}

fn webhook_config(url: String) -> impl FnOnce(&mut gavel_broker::Config) {
    move |config| {
        config.webhook_url = Some(url);
        config.webhook_secret = Some(SECRET.into());
        config.webhook_bids = true;
        config.webhook_max_backoff = std::time::Duration::from_secs(1);
    }
}

async fn ended(addr: SocketAddr, auction: &str) {
    let path = format!("/api/auctions/{auction}");
    eventually(&format!("{auction} ends"), || async {
        api(addr, "GET", &path, None).await.1["status"] == "ended"
    })
    .await;
}

/// A receiver that `make` starts on a fresh port, a broker sending its webhooks there, and an
/// open auction `id` on it.
async fn hooked<F, Fut>(make: F, id: &str, ends_in_ms: u64) -> (Receiver, TestBroker)
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = Receiver>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/gavel", listener.local_addr().unwrap());
    let receiver = make(listener).await;
    let broker = TestBroker::start(webhook_config(url)).await;
    create_auction(broker.addr, id, ends_in_ms).await;
    (receiver, broker)
}

#[tokio::test]
async fn webhooks_survive_a_failing_receiver_signed_with_one_key_per_webhook() {
    let (receiver, broker) = hooked(|l| Receiver::start(l, 3), "w1", 1_500).await;
    let mut ann = broker.connect(Some("ann")).await;
    let mut bob = broker.connect(Some("bob")).await;
    assert!(matches!(
        ann.bid("w1", 1000, "a1").await,
        gavel_broker::protocol::Reply::BidAccepted { .. }
    ));
    assert!(matches!(
        bob.bid("w1", 1200, "b1").await,
        gavel_broker::protocol::Reply::BidAccepted { .. }
    ));
    // While the receiver refuses, the auction's view says what is pending and why.
    eventually("a failed attempt shows in /api/auctions/w1", || async {
        let view = api(broker.addr, "GET", "/api/auctions/w1", None).await.1;
        view["webhooks"]["pending"].as_array().is_some_and(|p| {
            p.iter()
                .any(|w| w["attempts"].as_u64() >= Some(1) && w["last_error"] == "status 503")
        })
    })
    .await;
    ended(broker.addr, "w1").await;
    eventually("every webhook delivered", || async {
        let delivered = receiver.delivered();
        delivered.len() == 3
            && api(broker.addr, "GET", "/api/auctions/w1", None).await.1["webhooks"]["pending"]
                == serde_json::json!([])
    })
    .await;
    let delivered = receiver.delivered();
    let end = &delivered["auction.ended/w1"];
    assert_eq!(end["type"], "auction.ended");
    assert_eq!(end["data"]["winner"], "bob");
    assert_eq!(end["data"]["final_price"], 1200);
    assert_eq!(end["data"]["bid_count"], 2);
    assert_eq!(end["data"]["reserve_met"], true);
    assert_eq!(delivered["bid.accepted/w1/1"]["data"]["bidder"], "ann");
    assert_eq!(delivered["bid.accepted/w1/2"]["data"]["amount"], 1200);
    // Every attempt: a valid signature; one body per idempotency key.
    let mut bodies: HashMap<String, String> = HashMap::new();
    let attempts = receiver.got();
    assert!(attempts.len() >= 6, "3 refused + 3 delivered: {attempts:?}");
    for attempt in &attempts {
        assert!(
            verify(SECRET.as_bytes(), &attempt.signature, &attempt.body),
            "{attempt:?}"
        );
        assert!(!verify(
            b"another-secret-0123",
            &attempt.signature,
            &attempt.body
        ));
        let body = bodies
            .entry(attempt.key.clone())
            .or_insert(attempt.body.clone());
        assert_eq!(
            body, &attempt.body,
            "a retry changed the body of {}",
            attempt.key
        );
        let id = serde_json::from_str::<Value>(&attempt.body).unwrap()["id"].clone();
        assert_eq!(id, attempt.key.as_str());
    }
    let (_, metrics) = http(broker.addr, "GET", "/metrics", &[], None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("gavel_webhook_attempts_total{outcome=\"failed\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("gavel_webhook_attempts_total{outcome=\"delivered\"} 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_go_out_several_at_once() {
    // Four bid webhooks, and a receiver that answers none until four requests are open at
    // once: delivered only if the broker has several attempts in flight (the default is 8).
    let (receiver, broker) = hooked(|l| Receiver::gathering(l, 4), "c1", 600_000).await;
    let mut ann = broker.connect(Some("ann")).await;
    for (i, amount) in [1000, 1100, 1200, 1300].into_iter().enumerate() {
        let reply = ann.bid("c1", amount, &format!("c{i}")).await;
        assert!(matches!(
            reply,
            gavel_broker::protocol::Reply::BidAccepted { .. }
        ));
    }
    eventually("the four bid webhooks delivered together", || async {
        receiver.delivered().len() == 4
    })
    .await;
    let delivered = receiver.delivered();
    for seq in 1..=4 {
        assert_eq!(
            delivered[&format!("bid.accepted/c1/{seq}")]["data"]["amount"],
            900 + 100 * seq
        );
    }
}

/// A self-signed certificate for `localhost`, written as PEM files; its acceptor.
fn localhost_tls(tag: &str) -> (std::path::PathBuf, tokio_rustls::TlsAcceptor) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = temp_dir(tag);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let acceptor = gavel_broker::tls::acceptor(&cert, &key).unwrap();
    (cert, acceptor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_reach_an_https_receiver_whose_ca_the_broker_trusts() {
    let (cert, acceptor) = localhost_tls("webhook-tls");
    let (stranger, _) = localhost_tls("webhook-tls-other");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}/hooks",
        listener.local_addr().unwrap().port()
    );
    let receiver = Receiver::https(listener, acceptor).await;

    // Trusting another CA: the handshake fails, the webhook waits, and the reason shows.
    let untrusting = TestBroker::start({
        let url = url.clone();
        move |c| {
            webhook_config(url)(c);
            c.backend_ca = Some(stranger);
        }
    })
    .await;
    create_auction(untrusting.addr, "t0", 600_000).await;
    let mut ann = untrusting.connect(Some("ann")).await;
    ann.bid("t0", 1000, "a").await;
    eventually(
        "the certificate is refused, and the view says so",
        || async {
            let view = api(untrusting.addr, "GET", "/api/auctions/t0", None)
                .await
                .1;
            view["webhooks"]["pending"].as_array().is_some_and(|p| {
                p.iter().any(|w| {
                    w["last_error"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("TLS:"))
                })
            })
        },
    )
    .await;
    assert!(receiver.got().is_empty());

    // Trusting the receiver's certificate: delivered, over TLS.
    let broker = TestBroker::start(move |c| {
        webhook_config(url)(c);
        c.backend_ca = Some(cert);
    })
    .await;
    create_auction(broker.addr, "t1", 600_000).await;
    let mut bob = broker.connect(Some("bob")).await;
    bob.bid("t1", 1000, "b").await;
    eventually("the webhook is delivered over https", || async {
        receiver.delivered().contains_key("bid.accepted/t1/1")
    })
    .await;
    let delivered = receiver.delivered();
    assert_eq!(delivered["bid.accepted/t1/1"]["data"]["bidder"], "bob");

    // A CA file that is not there stops the broker at start-up.
    let mut config = gavel_broker::Config::defaults();
    config.backend_ca = Some(temp_dir("no-ca").join("missing.pem"));
    config.webhook_url = Some("https://localhost:1/hooks".into());
    config.webhook_secret = Some(SECRET.into());
    let error = gavel_broker::Broker::with_store(
        config,
        Arc::new(gavel_broker::store::MemoryLog::default()),
        gavel_broker::clock::Clock::System,
    )
    .err()
    .expect("a missing --backend-ca is refused");
    assert!(error.to_string().contains("missing.pem"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_auctions_webhook_survives_kill_9_before_delivery() {
    // The receiver's port, not listening yet: every attempt before the restart fails.
    let (port, url) = receiver_not_yet_listening();
    let mut args = vec!["--api-key", API_KEY];
    args.extend(webhook_flags(&url));
    let data_dir = temp_dir("webhook-kill");
    let (mut child, addr) = spawn_broker_process(&args, &data_dir);
    create_auction(addr, "k1", 1_000).await;
    let mut ann =
        TestClient::connect(addr, Some("ann"), gavel_broker::protocol::Format::MsgPack).await;
    ann.bid("k1", 1500, "a1").await;
    ended(addr, "k1").await;
    eventually("the first attempt failed", || async {
        let view = api(addr, "GET", "/api/auctions/k1", None).await.1;
        view["webhooks"]["pending"][0]["attempts"].as_u64() >= Some(1)
    })
    .await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();

    let receiver = Receiver::start(TcpListener::bind(port).await.unwrap(), 0).await;
    let (_child, addr) = spawn_broker_process(&args, &data_dir);
    eventually("the webhook arrives after the restart", || async {
        receiver.delivered().contains_key("auction.ended/k1")
    })
    .await;
    let got = receiver.got();
    let end: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(end["data"]["winner"], "ann");
    assert_eq!(end["data"]["final_price"], 1500);
    assert!(verify(SECRET.as_bytes(), &got[0].signature, &got[0].body));
    eventually("nothing pending", || async {
        api(addr, "GET", "/api/auctions/k1", None).await.1["webhooks"]["pending"]
            == serde_json::json!([])
    })
    .await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
