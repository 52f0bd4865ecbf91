//! E2B's REST response bodies as kiln answers them: one typed struct per schema of
//! e2b-dev/infra `spec/openapi.yml` at commit 54693ff353d2 (2026-08-22), under the schema's
//! own name and with its field names. `tests/tests/serve_contract.rs` checks every answer
//! against E2B's generated client (declared status, declared fields, required ones present).
//! kiln adds no field of its own to these bodies: what only kiln knows goes to its CLI.

use kiln_runtime::record::{OnTimeout, SandboxRecord, State as SbxState};
use serde::Serialize;
use std::collections::BTreeMap;

/// The `clientID` of every sandbox (E2B's names the node's client; kiln has one).
pub const CLIENT_ID: &str = "kiln";

/// `SandboxState`: what the API calls a sandbox that exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
}

impl SandboxState {
    /// `None` for a sandbox that failed or stopped: to the API it is gone.
    pub fn of(rec: &SandboxRecord) -> Option<SandboxState> {
        match rec.state {
            SbxState::Starting | SbxState::Running => Some(SandboxState::Running),
            SbxState::Paused { .. } => Some(SandboxState::Paused),
            SbxState::Stopped | SbxState::Failed { .. } => None,
        }
    }
}

/// `Error`: every non-2xx answer, `code` being the HTTP status.
#[derive(Serialize)]
pub struct Error<'a> {
    pub code: u16,
    pub message: &'a str,
}

/// `Sandbox`: the answer of create, connect, resume and each fork.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    pub envd_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    pub traffic_access_token: Option<String>,
    pub domain: Option<String>,
}

impl Sandbox {
    pub fn of(rec: &SandboxRecord, domain: &str, envd_version: &'static str) -> Sandbox {
        Sandbox {
            template_id: rec.source.clone(),
            sandbox_id: rec.id.clone(),
            client_id: CLIENT_ID,
            envd_version,
            alias: rec.name.clone(),
            envd_access_token: rec.access.envd_token.clone(),
            traffic_access_token: rec.access.traffic_token.clone(),
            domain: Some(domain.to_string()),
        }
    }
}

/// `ListedSandbox`: one entry of the sandbox lists.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub end_at: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub metadata: BTreeMap<String, String>,
    pub state: SandboxState,
    pub envd_version: &'static str,
}

/// `SandboxDetail`: `GET /sandboxes/{sandboxID}`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(flatten)]
    pub listed: ListedSandbox,
    pub domain: Option<String>,
    pub allow_internet_access: bool,
    pub network: SandboxNetworkConfig,
    pub lifecycle: SandboxLifecycle,
    /// What the latest pause saved; a paused sandbox only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_mode: Option<SandboxPauseMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
}

/// `SandboxPauseMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxPauseMode {
    /// Memory and files: a resume continues where it left off.
    Full,
    /// Files only: a resume boots afresh on them.
    Filesystem,
}

/// `SandboxNetworkConfig`, as a detail reports it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetworkConfig {
    pub allow_public_traffic: bool,
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
}

/// `SandboxOnTimeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxOnTimeout {
    Kill,
    Pause,
}

impl From<OnTimeout> for SandboxOnTimeout {
    fn from(o: OnTimeout) -> Self {
        match o {
            OnTimeout::Kill => SandboxOnTimeout::Kill,
            OnTimeout::Pause | OnTimeout::PauseFilesystem => SandboxOnTimeout::Pause,
        }
    }
}

/// `SandboxLifecycle`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLifecycle {
    pub auto_resume: bool,
    pub on_timeout: SandboxOnTimeout,
}

/// `SandboxForkResult`: one per requested fork (kiln forks all or nothing, so each holds its
/// sandbox).
#[derive(Serialize)]
pub struct SandboxForkResult {
    pub sandbox: Sandbox,
}

/// `SnapshotInfo`: a created or listed snapshot; its id is a valid `templateID`.
#[derive(Serialize)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

impl SnapshotInfo {
    pub fn named(name: &str) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: name.to_string(),
            names: vec![name.to_string()],
        }
    }
}

/// E2B's `TemplateRequestResponseV3`.
#[derive(Serialize)]
pub struct TemplateRequestResponseV3 {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// E2B's `BuildLogEntry`.
#[derive(Serialize)]
pub struct BuildLogEntry {
    pub timestamp: String,
    pub message: String,
    pub level: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// E2B's `BuildStatusReason`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub log_entries: Vec<BuildLogEntry>,
}

/// E2B's `TemplateBuildInfo`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    pub logs: Vec<String>,
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// E2B's `TemplateBuildLogsResponse`.
#[derive(Serialize)]
pub struct TemplateBuildLogsResponse {
    pub logs: Vec<BuildLogEntry>,
}

/// E2B's `TemplateBuildFileUpload`.
#[derive(Serialize)]
pub struct TemplateBuildFileUpload {
    pub present: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// E2B's `AssignedTemplateTags`.
#[derive(Serialize)]
pub struct AssignedTemplateTags {
    pub tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// E2B's `TemplateTag`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub created_at: String,
}

/// E2B's `TemplateAliasResponse`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateAliasResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// kiln has no teams: nothing is public.
    pub public: bool,
}

/// E2B's `SandboxMetric`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    /// Deprecated in the spec, still required.
    pub timestamp: String,
    pub timestamp_unix: u64,
    pub cpu_count: u32,
    pub cpu_used_pct: f32,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// E2B's `SandboxesWithMetrics`.
#[derive(Serialize)]
pub struct SandboxesWithMetrics {
    pub sandboxes: BTreeMap<String, SandboxMetric>,
}

/// E2B's `Template`: a kiln image as the template list shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// kiln has no teams: always null.
    pub created_by: Option<()>,
    pub last_spawned_at: Option<String>,
    pub spawn_count: u64,
    pub build_count: u64,
    pub envd_version: &'static str,
    /// `TemplateBuildStatus`.
    pub build_status: &'static str,
}
