//! `kiln serve --cluster-etcd` nodes on loopback for the cluster tests (tests/tests/cluster*.rs):
//! their arguments, a cluster of them over one etcd ([`crate::etcd`]), and their lists.

use crate::e2b::{self, Serve};
use crate::etcd::Etcd;
use crate::Kiln;
use std::path::Path;

/// `kiln serve`'s cluster arguments for node `id` listening on `port`.
pub fn node_args(etcd: &str, id: &str, port: u16, secret_file: &Path) -> Vec<String> {
    vec![
        "--cluster-etcd".into(),
        etcd.into(),
        "--node-id".into(),
        id.into(),
        "--advertise".into(),
        format!("http://127.0.0.1:{port}"),
        "--cluster-secret-file".into(),
        secret_file.to_str().unwrap().into(),
    ]
}

/// One node per home, `n1`, `n2`, ... in order, each on a free port, all with API key `key`.
pub fn start_nodes(etcd: &Etcd, homes: &[Kiln], key: &str, secret_file: &Path) -> Vec<Serve> {
    homes
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let port = e2b::free_port();
            let args = node_args(&etcd.urls_arg(), &format!("n{}", i + 1), port, secret_file);
            Serve::start_with(k, key, port, &args)
        })
        .collect()
}

/// A list through `s`: (sandbox id, clientID, state) of each.
pub fn listed(s: &Serve, path: &str) -> Vec<(String, String, String)> {
    let (code, body) = s.api("GET", path, None);
    assert_eq!(code, 200, "{path} through :{}: {body}", s.port);
    body.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["sandboxID"].as_str().unwrap().to_string(),
                e["clientID"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
