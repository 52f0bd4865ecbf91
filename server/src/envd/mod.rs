//! envd's protocol (data plane), carried to the kiln agent.

use crate::AppState;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Serves one data-plane request for `port` of sandbox `sandbox_id`: envd's own port is
/// envd's API, any other port a proxy into the sandbox.
pub async fn handle(state: Arc<AppState>, sandbox_id: String, port: u16, req: Request) -> Response {
    let _ = (state, sandbox_id, port, req);
    axum::http::StatusCode::NOT_IMPLEMENTED.into_response()
}
