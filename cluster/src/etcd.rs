//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant|keepalive|revoke`; keys and values base64, 64-bit integers as strings).
//!
//! Why not the `etcd-client` crate: it speaks gRPC (tonic, prost, and protoc at build time),
//! which adds minutes to a clean build on a 2-core machine for the handful of calls kiln makes;
//! the gateway is part of every etcd server (3.4 and later serve it under `/v3/`) and hyper is
//! already in the build for `kiln serve`.
//!
//! Each call tries the endpoints in turn, starting with the one that answered last, so the
//! loss of one member of a cluster is survived as long as another answers. A call that fails
//! after its request was sent may have been applied: every write kiln makes is a transaction
//! comparing revisions, so a retry of an applied one fails its comparison instead of applying
//! twice (callers re-read then).

use crate::{Error, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long one request to one endpoint may take (connect, send, answer).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A key's value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the key's last change: what compare-and-swap compares.
    pub mod_revision: i64,
    pub lease: i64,
}

/// An etcd cluster, through any of its members' client URLs.
pub struct Etcd {
    /// `host:port` of each member's client URL.
    endpoints: Vec<String>,
    /// The endpoint that answered last: tried first.
    preferred: AtomicUsize,
}

impl Etcd {
    /// A client for endpoints `http://host:port` (the scheme may be left out; no TLS).
    pub fn new<S: AsRef<str>>(urls: &[S]) -> Result<Etcd> {
        let endpoints = urls
            .iter()
            .map(|u| crate::authority(u.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            return Err(Error::Endpoint(String::new()));
        }
        Ok(Etcd {
            endpoints,
            preferred: AtomicUsize::new(0),
        })
    }

    /// The endpoints, as `host:port`.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// One gateway call: the first endpoint that answers (an endpoint that cannot be reached,
    /// times out or answers 5xx is skipped); its JSON answer.
    async fn call(&self, path: &str, body: Value) -> Result<Value> {
        let body = bytes::Bytes::from(body.to_string());
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let ep = &self.endpoints[idx];
            match tokio::time::timeout(CALL_TIMEOUT, post(ep, path, body.clone())).await {
                Ok(Ok((status, answer))) if status < 500 => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    if status != 200 {
                        return Err(Error::Refused {
                            path: path.to_string(),
                            status,
                            body: String::from_utf8_lossy(&answer).into_owned(),
                        });
                    }
                    return serde_json::from_slice(&answer).map_err(|e| Error::BadAnswer {
                        path: path.to_string(),
                        why: e.to_string(),
                    });
                }
                Ok(Ok((status, answer))) => failures.push(format!(
                    "{ep}: HTTP {status} {}",
                    String::from_utf8_lossy(&answer).trim()
                )),
                Ok(Err(e)) => failures.push(format!("{ep}: {e}")),
                Err(_) => failures.push(format!("{ep}: no answer in {CALL_TIMEOUT:?}")),
            }
        }
        Err(Error::Unreachable(failures.join("; ")))
    }

    /// The key's value, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>> {
        let v = self
            .call("/v3/kv/range", json!({ "key": b64(key) }))
            .await?;
        Ok(kvs(&v)?.into_iter().next())
    }

    /// Every key under `prefix`, in key order.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<Kv>> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({ "key": b64(prefix), "range_end": B64.encode(prefix_end(prefix)) }),
            )
            .await?;
        kvs(&v)
    }

    /// Writes `value` at `key` if the key does not exist: its mod revision, or None when it
    /// exists.
    pub async fn create(&self, key: &str, value: &[u8], lease: i64) -> Result<Option<i64>> {
        self.put_when(key, value, lease, &[Cond::Absent(key)]).await
    }

    /// Writes `value` at `key` if the key's last change is `mod_revision` (compare-and-swap):
    /// the new mod revision, or None when the key changed (or was removed) since.
    pub async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
        lease: i64,
    ) -> Result<Option<i64>> {
        self.put_when(key, value, lease, &[Cond::ModIs(key, mod_revision)])
            .await
    }

    /// Removes `key` if its last change is `mod_revision`: false when it changed since.
    pub async fn delete_if(&self, key: &str, mod_revision: i64) -> Result<bool> {
        self.delete_when(key, &[Cond::ModIs(key, mod_revision)])
            .await
    }

    /// Writes `value` at `key` if every condition holds (one transaction): the revision
    /// after it, or None when one did not.
    pub async fn put_when(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
        conds: &[Cond<'_>],
    ) -> Result<Option<i64>> {
        self.txn(conds, put_op(key, value, lease)).await
    }

    /// Removes `key` if every condition holds (one transaction): false when one did not.
    pub async fn delete_when(&self, key: &str, conds: &[Cond<'_>]) -> Result<bool> {
        let op = json!({ "request_delete_range": { "key": b64(key) } });
        Ok(self.txn(conds, op).await?.is_some())
    }

    /// The conditions, one operation when they all hold: the revision after it, or None when
    /// one did not.
    async fn txn(&self, conds: &[Cond<'_>], success: Value) -> Result<Option<i64>> {
        let compare: Vec<Value> = conds.iter().map(Cond::json).collect();
        let v = self
            .call(
                "/v3/kv/txn",
                json!({ "compare": compare, "success": [success] }),
            )
            .await?;
        if !v.get("succeeded").and_then(Value::as_bool).unwrap_or(false) {
            return Ok(None);
        }
        Ok(Some(int(&v["header"]["revision"])))
    }

    /// A new lease of `ttl_secs`: its id.
    pub async fn grant(&self, ttl_secs: u64) -> Result<i64> {
        let v = self
            .call("/v3/lease/grant", json!({ "TTL": ttl_secs.to_string() }))
            .await?;
        match int(&v["ID"]) {
            0 => Err(Error::BadAnswer {
                path: "/v3/lease/grant".into(),
                why: format!("no lease id in {v}"),
            }),
            id => Ok(id),
        }
    }

    /// Renews lease `id`: its remaining TTL in seconds, 0 when it has expired.
    pub async fn keepalive(&self, id: i64) -> Result<i64> {
        let v = self
            .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
            .await?;
        // A streaming call through the gateway: one `{"result": ...}` per message.
        Ok(int(&v["result"]["TTL"]))
    }

    /// Ends lease `id` and removes its keys.
    pub async fn revoke(&self, id: i64) -> Result<()> {
        self.call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
            .await
            .map(drop)
    }
}

/// A condition of a transaction.
#[derive(Clone, Copy, Debug)]
pub enum Cond<'a> {
    /// The key's last change is this mod revision (so the key exists).
    ModIs(&'a str, i64),
    /// The key does not exist (a key under an expired lease is gone).
    Absent(&'a str),
}

impl Cond<'_> {
    fn json(&self) -> Value {
        match *self {
            Cond::ModIs(key, rev) => {
                json!({ "key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": rev.to_string() })
            }
            Cond::Absent(key) => {
                json!({ "key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0" })
            }
        }
    }
}

fn put_op(key: &str, value: &[u8], lease: i64) -> Value {
    let mut put = json!({ "key": b64(key), "value": B64.encode(value) });
    if lease != 0 {
        put["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": put })
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The end of the range holding every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// An int64 field: the gateway writes them as strings (and leaves out zeros).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kvs(v: &Value) -> Result<Vec<Kv>> {
    let bad = |why: String| Error::BadAnswer {
        path: "/v3/kv/range".into(),
        why,
    };
    let Some(list) = v.get("kvs").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|kv| {
            let dec = |f: &str| {
                B64.decode(kv[f].as_str().unwrap_or_default())
                    .map_err(|e| bad(format!("{f}: {e}")))
            };
            Ok(Kv {
                key: String::from_utf8(dec("key")?).map_err(|e| bad(e.to_string()))?,
                value: dec("value")?,
                mod_revision: int(&kv["mod_revision"]),
                lease: int(&kv["lease"]),
            })
        })
        .collect()
}

/// One HTTP/1.1 POST over a fresh connection: (status, body).
async fn post(
    authority: &str,
    path: &str,
    body: bytes::Bytes,
) -> std::result::Result<(u16, bytes::Bytes), String> {
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("nodes/"), b"nodes0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn endpoints_parse() {
        let e = Etcd::new(&["http://127.0.0.1:2379", "127.0.0.1:2380/"]).unwrap();
        assert_eq!(e.endpoints(), ["127.0.0.1:2379", "127.0.0.1:2380"]);
        assert!(Etcd::new(&["https://x:1"]).is_err());
        assert!(Etcd::new(&["http://x:1/path"]).is_err());
        assert!(Etcd::new::<&str>(&[]).is_err());
        assert!(Etcd::new(&["http://x"]).is_err());
        assert!(Etcd::new(&["http://u@x:1"]).is_err());
    }
}
