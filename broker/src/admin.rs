//! The admin HTTP API for auctions (`/api/auctions...`, behind the API key like all of
//! `/api/`): create, update before the start, pause, resume, cancel, end now, list, read, and
//! page through the bid log.

use crate::store::BidRecord;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::auction::rules::AuctionSpec;
use crate::auction::{AdminError, AdminOp};
use crate::http::{error_response, json_response, query_param};
use crate::Shared;

/// Largest accepted auction definition.
const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Bids per page of `GET /api/auctions/{id}/bids`: default and maximum.
const BIDS_PAGE: usize = 100;
const BIDS_PAGE_MAX: usize = 1000;

/// Routes a request under `/api/auctions`. `rest` is the path after that prefix.
pub(crate) async fn handle(
    shared: &Shared,
    req: Request<Incoming>,
    rest: &str,
) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let method = req.method().clone();
    match (&method, parts.as_slice()) {
        (&Method::GET, []) => json_response(
            StatusCode::OK,
            json!({ "auctions": shared.auctions.list() }),
        ),
        (&Method::POST, []) => match read_spec(req).await {
            Ok(spec) => answer(shared.auctions.create(spec).await, StatusCode::CREATED),
            Err(response) => response,
        },
        (&Method::GET, [id]) => match shared.auctions.find(id).await {
            Ok(Some(snapshot)) => {
                let mut body = json!(snapshot);
                if let Some(pending) = shared.auctions.pending_webhooks(id).await {
                    // With --webhook-url: what is not delivered yet, with its last error.
                    body["webhooks"] = json!({ "pending": pending });
                }
                json_response(StatusCode::OK, body)
            }
            Ok(None) => error_for(&AdminError::NotFound((*id).to_owned())),
            Err(error) => error_for(&error),
        },
        (&Method::PUT, [id]) => {
            let id = (*id).to_owned();
            match read_spec(req).await {
                Ok(spec) => answer(
                    shared.auctions.admin(&id, AdminOp::Update(spec)).await,
                    StatusCode::OK,
                ),
                Err(response) => response,
            }
        }
        (&Method::POST, [id, action]) => {
            let op = match *action {
                "pause" => AdminOp::Pause,
                "resume" => AdminOp::Resume,
                "cancel" => AdminOp::Cancel,
                "end" => AdminOp::EndNow,
                "bids" => return crate::http::method_not_allowed_response("GET"),
                _ => {
                    return error_response(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "no such auction action",
                    )
                }
            };
            answer(shared.auctions.admin(id, op).await, StatusCode::OK)
        }
        (&Method::GET, [id, "bids"]) => {
            let after = match query_param(req.uri(), "after").map(|v| v.parse::<u64>()) {
                None => 0,
                Some(Ok(after)) => after,
                Some(Err(_)) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        "after must be a seq",
                    )
                }
            };
            let limit = match query_param(req.uri(), "limit").map(|v| v.parse::<usize>()) {
                None => BIDS_PAGE,
                Some(Ok(limit)) if (1..=BIDS_PAGE_MAX).contains(&limit) => limit,
                Some(_) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        &format!("limit must be 1 to {BIDS_PAGE_MAX}"),
                    )
                }
            };
            match shared.auctions.bids(id, after, limit).await {
                Ok(bids) => {
                    let next_after = (bids.len() == limit)
                        .then(|| bids.last().map(|b| b.seq))
                        .flatten();
                    // Maxima (proxy bids) are never shown, not even with the key.
                    let bids: Vec<_> = bids.iter().map(BidRecord::public_view).collect();
                    json_response(
                        StatusCode::OK,
                        json!({ "bids": bids, "next_after": next_after }),
                    )
                }
                Err(error) => error_for(&error),
            }
        }
        // A known route with another method.
        (_, []) => crate::http::method_not_allowed_response("GET, POST"),
        (_, [_]) => crate::http::method_not_allowed_response("GET, PUT"),
        (_, [_, "pause" | "resume" | "cancel" | "end"]) => {
            crate::http::method_not_allowed_response("POST")
        }
        (_, [_, "bids"]) => crate::http::method_not_allowed_response("GET"),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

#[allow(clippy::result_large_err)]
async fn read_spec(req: Request<Incoming>) -> Result<AuctionSpec, Response<Full<Bytes>>> {
    let body = Limited::new(req.into_body(), MAX_SPEC_BYTES)
        .collect()
        .await
        .map_err(|_| {
            error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "auction definition over 64 KiB",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error_response(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()))
}

fn answer<T: serde::Serialize>(
    result: Result<T, AdminError>,
    ok: StatusCode,
) -> Response<Full<Bytes>> {
    match result {
        Ok(value) => json_response(ok, json!(value)),
        Err(error) => error_for(&error),
    }
}

fn error_for(error: &AdminError) -> Response<Full<Bytes>> {
    let (status, code) = match error {
        AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "unknown_auction"),
        AdminError::Exists(_) => (StatusCode::CONFLICT, "auction_exists"),
        AdminError::Spec(crate::auction::rules::SpecError::Invalid(_)) => {
            (StatusCode::BAD_REQUEST, "invalid_auction")
        }
        AdminError::Spec(crate::auction::rules::SpecError::WrongStatus(..)) => {
            (StatusCode::CONFLICT, "wrong_status")
        }
        AdminError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
        AdminError::Cluster(_) => (StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable"),
    };
    error_response(status, code, &error.to_string())
}
