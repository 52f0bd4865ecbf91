//! envd's messages (`process.proto`, `filesystem.proto` in e2b-dev/infra
//! `packages/envd/spec/`) in the protobuf JSON mapping: lowerCamelCase names (the proto names
//! are accepted too), `bytes` as base64, `int64` as a decimal string, enums by name (numbers
//! accepted on input), timestamps as RFC 3339. The messages a client sends (a process's
//! start, input, selector) serialize too, and [`ProcessEvent::parse`] reads events back: the
//! client ([`crate::client`]) uses these same types.

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// `bytes` fields: base64 (standard or URL-safe alphabet, padding optional on input).
pub mod bytes_b64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b64().encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }

    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        let std: String = s
            .chars()
            .filter(|c| *c != '=')
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(std.as_bytes())
            .map_err(|e| format!("invalid base64: {e}"))
    }
}

/// A number that JSON may carry as a number or a string (64-bit integers).
fn de_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        N(u32),
        S(String),
    }
    match N::deserialize(d)? {
        N::N(n) => Ok(n),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

fn de_opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    de_u32(d).map(Some)
}

// ---- process.proto ----

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ProcessConfig {
    #[serde(default)]
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
pub struct PtySize {
    #[serde(default, deserialize_with = "de_u32")]
    pub cols: u32,
    #[serde(default, deserialize_with = "de_u32")]
    pub rows: u32,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
pub struct Pty {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<PtySize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StartRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

/// `ProcessSelector`: a oneof of `pid` and `tag`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ProcessSelector {
    #[serde(
        default,
        deserialize_with = "de_opt_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SelectorRequest {
    #[serde(default)]
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct UpdateRequest {
    #[serde(default)]
    pub process: Option<ProcessSelector>,
    #[serde(default)]
    pub pty: Option<Pty>,
}

/// `ProcessInput`: a oneof of `stdin` and `pty` bytes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ProcessInput {
    #[serde(default, with = "opt_bytes", skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Vec<u8>>,
    #[serde(default, with = "opt_bytes", skip_serializing_if = "Option::is_none")]
    pub pty: Option<Vec<u8>>,
}

impl ProcessInput {
    pub fn bytes(&self) -> Option<&[u8]> {
        self.stdin.as_deref().or(self.pty.as_deref())
    }
}

mod opt_bytes {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| bytes_b64::decode(&s).map_err(serde::de::Error::custom))
            .transpose()
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => bytes_b64::serialize(v, s),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SendInputRequest {
    #[serde(default)]
    pub process: Option<ProcessSelector>,
    #[serde(default)]
    pub input: Option<ProcessInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamInputStart {
    #[serde(default)]
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamInputData {
    #[serde(default)]
    pub input: Option<ProcessInput>,
}

/// `StreamInputRequest`: a oneof of `start`, `data` and `keepalive`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamInputRequest {
    #[serde(default)]
    pub start: Option<StreamInputStart>,
    #[serde(default)]
    pub data: Option<StreamInputData>,
    #[serde(default)]
    pub keepalive: Option<serde_json::Value>,
}

/// `Signal`, by name or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Unspecified,
    Sigterm,
    Sigkill,
    Other(i64),
}

impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Signal::Unspecified => s.serialize_str("SIGNAL_UNSPECIFIED"),
            Signal::Sigterm => s.serialize_str("SIGNAL_SIGTERM"),
            Signal::Sigkill => s.serialize_str("SIGNAL_SIGKILL"),
            Signal::Other(n) => s.serialize_i64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(match v {
            serde_json::Value::String(s) => match s.as_str() {
                "SIGNAL_SIGTERM" => Signal::Sigterm,
                "SIGNAL_SIGKILL" => Signal::Sigkill,
                "SIGNAL_UNSPECIFIED" => Signal::Unspecified,
                _ => Signal::Other(-1),
            },
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(15) => Signal::Sigterm,
                Some(9) => Signal::Sigkill,
                Some(0) => Signal::Unspecified,
                Some(n) => Signal::Other(n),
                None => Signal::Other(-1),
            },
            serde_json::Value::Null => Signal::Unspecified,
            _ => Signal::Other(-1),
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SendSignalRequest {
    #[serde(default)]
    pub process: Option<ProcessSelector>,
    #[serde(default = "unspecified")]
    pub signal: Signal,
}

fn unspecified() -> Signal {
    Signal::Unspecified
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    pub config: ProcessConfig,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListResponse {
    pub processes: Vec<ProcessInfo>,
}

/// `ProcessEvent.EndEvent` (read back with protobuf JSON's omitted defaults).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndEvent {
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub exited: bool,
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `ProcessEvent`'s oneof.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessEvent {
    Start { pid: u32 },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Pty(Vec<u8>),
    End(EndEvent),
    Keepalive,
}

impl ProcessEvent {
    /// The `StartResponse` / `ConnectResponse` carrying this event.
    pub fn response(&self) -> serde_json::Value {
        use serde_json::json;
        let ev = match self {
            ProcessEvent::Start { pid } => json!({"start": {"pid": pid}}),
            ProcessEvent::Stdout(b) => json!({"data": {"stdout": b64().encode(b)}}),
            ProcessEvent::Stderr(b) => json!({"data": {"stderr": b64().encode(b)}}),
            ProcessEvent::Pty(b) => json!({"data": {"pty": b64().encode(b)}}),
            ProcessEvent::End(e) => json!({"end": e}),
            ProcessEvent::Keepalive => json!({"keepalive": {}}),
        };
        json!({ "event": ev })
    }

    /// The event a `StartResponse` / `ConnectResponse` carries ([`ProcessEvent::response`]
    /// read back); None for a message that is none of them.
    pub fn parse(v: &serde_json::Value) -> Option<ProcessEvent> {
        let ev = v.get("event")?;
        let bytes = |v: &serde_json::Value| bytes_b64::decode(v.as_str()?).ok();
        if let Some(s) = ev.get("start") {
            let pid = s.get("pid").map(|p| de_u32(p.clone()).unwrap_or(0));
            return Some(ProcessEvent::Start {
                pid: pid.unwrap_or(0),
            });
        }
        if let Some(d) = ev.get("data") {
            return [
                (
                    "stdout",
                    ProcessEvent::Stdout as fn(Vec<u8>) -> ProcessEvent,
                ),
                ("stderr", ProcessEvent::Stderr),
                ("pty", ProcessEvent::Pty),
            ]
            .into_iter()
            .find_map(|(k, f)| d.get(k).and_then(bytes).map(f));
        }
        if let Some(e) = ev.get("end") {
            return serde_json::from_value(e.clone())
                .ok()
                .map(ProcessEvent::End);
        }
        ev.get("keepalive").map(|_| ProcessEvent::Keepalive)
    }
}

// ---- filesystem.proto ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FileType {
    #[serde(rename = "FILE_TYPE_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "FILE_TYPE_FILE")]
    File,
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory,
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink,
}

fn ser_i64_str<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileType,
    pub path: String,
    #[serde(serialize_with = "ser_i64_str")]
    pub size: i64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// The file's `user.e2b.*` xattrs, prefix stripped (envd 0.6.2). envd 0.6.4 has no
    /// `is_symlink` (a later field): a symlink is told by `symlinkTarget`, its type is the
    /// target's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PathRequest {
    #[serde(default)]
    pub path: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListDirRequest {
    #[serde(default)]
    pub path: String,
    #[serde(default, deserialize_with = "de_u32")]
    pub depth: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct MoveRequest {
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub destination: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchRequest {
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default, alias = "include_entry")]
    pub include_entry: bool,
    #[serde(default, alias = "allow_network_mounts")]
    pub allow_network_mounts: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatcherRequest {
    #[serde(default, alias = "watcher_id")]
    pub watcher_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventType {
    #[serde(rename = "EVENT_TYPE_CREATE")]
    Create,
    #[serde(rename = "EVENT_TYPE_WRITE")]
    Write,
    #[serde(rename = "EVENT_TYPE_REMOVE")]
    Remove,
    #[serde(rename = "EVENT_TYPE_RENAME")]
    Rename,
    #[serde(rename = "EVENT_TYPE_CHMOD")]
    Chmod,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FilesystemEvent {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// The `/files` upload answer's entries (envd.yaml `EntryInfo`).
#[derive(Debug, Clone, Serialize)]
pub struct UploadedEntry {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The metadata the file has after the upload (none: absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `GET /metrics`'s answer (envd.yaml `Metrics`; `packages/envd/internal/host/metrics.go`):
/// snake_case names, plain JSON numbers.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Metrics {
    /// Unix seconds.
    pub ts: i64,
    pub cpu_count: u32,
    /// 0..=100 (every CPU busy), two decimals.
    pub cpu_used_pct: f32,
    /// Bytes.
    pub mem_total: u64,
    pub mem_used: u64,
    /// Page cache, bytes.
    pub mem_cache: u64,
    /// envd's deprecated MiB fields (still sent by 0.6.4, rounded down).
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    /// Bytes of the root filesystem.
    pub disk_used: u64,
    pub disk_total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_the_sdk_sends_them() {
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"b"},"cwd":"/tmp"},"stdin":false,"tag":"t","pty":{"size":{"cols":80,"rows":"24"}}}"#,
        )
        .unwrap();
        let p = r.process.unwrap();
        assert_eq!(
            (p.cmd.as_str(), p.args.len(), p.cwd.as_deref()),
            ("/bin/bash", 3, Some("/tmp"))
        );
        assert_eq!(r.stdin, Some(false));
        assert_eq!(r.pty.unwrap().size.unwrap(), PtySize { cols: 80, rows: 24 });
        let s: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(
            (s.process.unwrap().pid, s.signal),
            (Some(42), Signal::Sigkill)
        );
        let s: SendSignalRequest = serde_json::from_str(r#"{"signal":15}"#).unwrap();
        assert_eq!(s.signal, Signal::Sigterm);
        let i: SendInputRequest =
            serde_json::from_str(r#"{"process":{"tag":"x"},"input":{"stdin":"aGk="}}"#).unwrap();
        assert_eq!(i.input.unwrap().bytes(), Some(&b"hi"[..]));
        let w: WatcherRequest = serde_json::from_str(r#"{"watcher_id":"w1"}"#).unwrap();
        assert_eq!(w.watcher_id, "w1");
        let w: WatchRequest =
            serde_json::from_str(r#"{"path":"/a","recursive":true,"includeEntry":true}"#).unwrap();
        assert!(w.recursive && w.include_entry);
        assert_eq!(bytes_b64::decode("aGk").unwrap(), b"hi");
        assert_eq!(bytes_b64::decode("-_8=").unwrap(), vec![0xfb, 0xff]);
    }

    #[test]
    fn events_serialize_in_the_json_mapping() {
        let v = ProcessEvent::Stdout(b"hi".to_vec()).response();
        assert_eq!(
            v,
            serde_json::json!({"event": {"data": {"stdout": "aGk="}}})
        );
        let v = ProcessEvent::End(EndEvent {
            exit_code: 1,
            exited: true,
            status: "exit status 1".into(),
            error: Some("exit status 1".into()),
        })
        .response();
        assert_eq!(v["event"]["end"]["exitCode"], 1);
        assert_eq!(v["event"]["end"]["error"], "exit status 1");
        let e = EntryInfo {
            name: "a".into(),
            kind: FileType::Directory,
            path: "/a".into(),
            size: 4096,
            mode: 0o755,
            permissions: "drwxr-xr-x".into(),
            owner: "root".into(),
            group: "root".into(),
            modified_time: Some("2024-01-01T00:00:00Z".into()),
            symlink_target: None,
            metadata: BTreeMap::new(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(v["size"], "4096");
        assert_eq!(v["modifiedTime"], "2024-01-01T00:00:00Z");
        assert!(v.get("symlinkTarget").is_none() && v.get("metadata").is_none());
        let with = EntryInfo {
            metadata: BTreeMap::from([("k".into(), "v".into())]),
            ..e
        };
        assert_eq!(serde_json::to_value(&with).unwrap()["metadata"]["k"], "v");
    }

    #[test]
    fn events_parse_back() {
        let end = EndEvent {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: Some("exit status 3".into()),
        };
        for ev in [
            ProcessEvent::Start { pid: 7 },
            ProcessEvent::Stdout(b"out".to_vec()),
            ProcessEvent::Stderr(vec![0, 255]),
            ProcessEvent::Pty(b"p".to_vec()),
            ProcessEvent::End(end),
            ProcessEvent::Keepalive,
        ] {
            assert_eq!(ProcessEvent::parse(&ev.response()), Some(ev));
        }
        // protobuf JSON leaves out defaults: exit code 0, a pid as a string.
        let v = serde_json::json!({"event": {"end": {"exited": true, "status": "exit status 0"}}});
        let Some(ProcessEvent::End(e)) = ProcessEvent::parse(&v) else {
            panic!("{v}")
        };
        assert_eq!((e.exit_code, e.exited), (0, true));
        let v = serde_json::json!({"event": {"start": {"pid": "12"}}});
        assert_eq!(
            ProcessEvent::parse(&v),
            Some(ProcessEvent::Start { pid: 12 })
        );
        assert_eq!(ProcessEvent::parse(&serde_json::json!({})), None);
        let sel = SelectorRequest {
            process: Some(ProcessSelector {
                pid: Some(5),
                tag: None,
            }),
        };
        assert_eq!(
            serde_json::to_value(&sel).unwrap(),
            serde_json::json!({"process": {"pid": 5}})
        );
    }
}
