//! envd's `GET /metrics`: the sandbox's CPU, memory and disk right now, read from its
//! cgroups and disk by the daemon's sampler ([`crate::metrics::Metrics::now`]) rather than
//! inside the sandbox. Auth as envd's: the access token when the sandbox is secure
//! (checked in [`super::handle`]).

use super::agent;
use super::types::Metrics;
use crate::AppState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_runtime::State;
use std::sync::Arc;

/// `GET /metrics` of sandbox `id`: 200 with envd's `Metrics`; E2B's proxy's 502 when the
/// sandbox is not running.
pub async fn get(state: Arc<AppState>, id: String) -> Response {
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || {
        // Reconciled: a sandbox whose runtime died is not running.
        let rec = st
            .sandboxes
            .get(&id)
            .map_err(|e| agent::from_runtime(&id, e))?;
        if rec.state != State::Running {
            return Err(agent::not_running(&id, rec.state.name()));
        }
        st.metrics
            .now(&st.sandboxes, &rec)
            .ok_or_else(|| agent::EnvdError::Sandbox {
                status: StatusCode::BAD_GATEWAY,
                message: format!("The sandbox {id} is running but its usage cannot be read"),
            })
    })
    .await;
    match r {
        Ok(Ok(s)) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            serde_json::to_string(&from_sample(&s)).unwrap_or_default(),
        )
            .into_response(),
        Ok(Err(e)) => e.unary(),
        Err(e) => agent::json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn from_sample(s: &crate::metrics::Sample) -> Metrics {
    const MIB: u64 = 1 << 20;
    Metrics {
        ts: i64::try_from(s.at_secs).unwrap_or(i64::MAX),
        cpu_count: s.cpu_count,
        cpu_used_pct: s.cpu_used_pct,
        mem_total: s.mem_total,
        mem_used: s.mem_used,
        mem_cache: s.mem_cache,
        mem_total_mib: s.mem_total / MIB,
        mem_used_mib: s.mem_used / MIB,
        disk_used: s.disk_used,
        disk_total: s.disk_total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_envds_names_and_units() {
        let s = crate::metrics::Sample {
            at_secs: 1_700_000_000,
            cpu_count: 2,
            cpu_used_pct: 12.5,
            mem_used: 3 * (1 << 20) + 5,
            mem_total: 512 << 20,
            mem_cache: 7,
            disk_used: 9,
            disk_total: 10,
        };
        let v = serde_json::to_value(from_sample(&s)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ts": 1_700_000_000i64, "cpu_count": 2, "cpu_used_pct": 12.5,
                "mem_total": 512u64 << 20, "mem_used": 3 * (1u64 << 20) + 5, "mem_cache": 7,
                "mem_total_mib": 512, "mem_used_mib": 3, "disk_used": 9, "disk_total": 10,
            })
        );
    }
}
