//! Gavel inside an application: one hyper server serves the application's own routes and
//! Gavel's (`/ws`, `/api/...`, `/metrics`), and the application's own handler publishes to a
//! user's channel directly, without going through HTTP.
//!
//! ```sh
//! cargo run -p gavel-broker --example embed            # listens on 127.0.0.1:8080
//! cargo run -p gavel-broker --example client -- --addr 127.0.0.1:8080 --token TOKEN user:u42
//!                                                      # TOKEN: printed by the embed example
//! curl -X POST 127.0.0.1:8080/bookings/991/accept?user=u42   # the client prints the event
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use gavel_broker::protocol::UserId;
use gavel_broker::{Broker, Config, ResponseBody};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// The application's router: its own routes first, everything else to Gavel.
async fn app(broker: Broker, req: Request<Incoming>) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.split('/').collect::<Vec<_>>().as_slice()) {
        (&Method::GET, ["", ""]) => text(StatusCode::OK, "my marketplace, with Gavel inside\n"),
        // POST /bookings/{id}/accept?user=ID: the application's own business logic...
        (&Method::POST, ["", "bookings", booking, "accept"]) => {
            let user = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("user="))
                .and_then(|u| UserId::parse(u).ok());
            let Some(user) = user else {
                return text(StatusCode::BAD_REQUEST, "?user=ID required\n");
            };
            // ...then a direct call into the broker: no HTTP round trip, no API key.
            let published =
                broker.publish_to_user(&user, "booking_accepted", json!({ "booking_id": booking }));
            text(
                StatusCode::OK,
                &format!(
                    "notified {user} on {} connection(s), seq {}\n",
                    published.delivered, published.seq
                ),
            )
        }
        _ => broker.handle(req).await,
    }
}

fn text(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *response.status_mut() = status;
    response
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut config = Config::defaults();
    // Demo settings: a fixed development secret, and anonymous viewers allowed.
    config.jwt_secret = Some("embed-example-secret-change-me".into());
    config.allow_anonymous = true;
    let claims = gavel_broker::protocol::Claims {
        sub: "u42".into(),
        exp: gavel_broker::clock::now_ms() / 1000 + 3600,
        roles: None,
        channels: None,
    };
    let token = gavel_client::token::sign_hs256(b"embed-example-secret-change-me", &claims)?;
    println!("a token for user u42, valid one hour:\n{token}");
    let broker = Broker::new(config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    tracing::info!("application listening on http://127.0.0.1:8080");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => break,
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let broker = broker.clone();
                async move { Ok::<_, Infallible>(app(broker, req).await) }
            });
            // `with_upgrades` is what lets `/ws` switch protocols on this connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
    // Close every WebSocket with 1001 after its queued frames.
    broker.shutdown().await;
    Ok(())
}
