//! Integration tests: a real broker on an ephemeral loopback port, real WebSocket clients and
//! real HTTP requests. One test binary (faster to build and link than one per file).

mod common;

mod auctions;
mod auth;
mod check_config;
mod cluster;
mod conversation;
mod docs;
mod errors;
mod fan_out;
mod hostile;
mod http_api;
mod limits;
mod pages;
mod presence;
mod proxy;
mod recovery;
mod shutdown;
mod slow_consumer;
mod sse;
mod tls;
mod webhooks;
