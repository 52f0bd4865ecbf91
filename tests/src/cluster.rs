//! `kiln serve --cluster-etcd` nodes on loopback for the cluster tests (tests/tests/cluster*.rs):
//! their arguments, a cluster of them over one etcd ([`crate::etcd`]), and their lists.

use crate::e2b::{self, Serve};
use crate::etcd::Etcd;
use crate::s3::S3Server;
use crate::Kiln;
use std::path::{Path, PathBuf};

/// What every cluster test starts from: E2B's Python SDK, a 3-member etcd, SeaweedFS (the
/// S3 remote every home's store shares, as the `origin` remote; the homes' processes get its
/// credentials), and `homes` whose first has the `sdk` image (the others are empty until
/// [`Fixture::share_image`]), in one temp dir with the cluster secret's file; every sandbox
/// of every home is killed at the end. Fields drop in order: declare nodes after it, so they
/// go first.
pub struct Fixture {
    pub py: PathBuf,
    pub etcd: Etcd,
    pub homes: Vec<Kiln>,
    pub secret: PathBuf,
    _cleanup: Vec<crate::sandbox::KillAll>,
    pub s3: S3Server,
    pub tmp: tempfile::TempDir,
}

/// [`Fixture`] with `nodes` homes and the secret `secret`; None after a SKIP line.
pub fn fixture(secret: &str, nodes: usize) -> Option<Fixture> {
    let py = e2b::python_or_skip()?;
    let etcd = Etcd::start_or_skip()?;
    let s3 = S3Server::start_or_skip("cluster").unwrap()?;
    let (tmp, k1) = e2b::sdk_home()?;
    let secret_file = tmp.path().join("cluster-secret");
    std::fs::write(&secret_file, secret).unwrap();
    let mut homes = vec![k1];
    homes.extend((2..=nodes).map(|i| Kiln::new(tmp.path().join(format!("home{i}")))));
    let homes: Vec<Kiln> = homes
        .into_iter()
        .map(|k| {
            let k = k.with_env(s3.env());
            s3.add_origin(&k, &format!("s3://{}/cluster", crate::s3::BUCKET));
            k
        })
        .collect();
    Some(Fixture {
        py,
        etcd,
        _cleanup: homes
            .iter()
            .map(|k| crate::sandbox::KillAll(k.clone()))
            .collect(),
        homes,
        secret: secret_file,
        s3,
        tmp,
    })
}

impl Fixture {
    /// Makes image `name` of the first home usable by the same name in every other home:
    /// pushed to the remote, pulled there (its data comes lazily).
    pub fn share_image(&self, name: &str) {
        let out = self.homes[0].ok(["image", "push", name]);
        let id = String::from_utf8(out).unwrap().trim().to_string();
        for k in &self.homes[1..] {
            k.ok(["image", "pull-from-remote", &id, "--name", name]);
        }
    }
}

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

/// One node per home, `n1`, `n2`, ... in order, each on a free port, all with API key `key`;
/// a node gone `lost_after` seconds loses its running sandboxes (`--cluster-lost-after`).
pub fn start_nodes(
    etcd: &Etcd,
    homes: &[Kiln],
    key: &str,
    secret_file: &Path,
    lost_after: u64,
) -> Vec<Serve> {
    homes
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let port = e2b::free_port();
            let mut args = node_args(&etcd.urls_arg(), &format!("n{}", i + 1), port, secret_file);
            args.extend(["--cluster-lost-after".into(), lost_after.to_string()]);
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

/// Runs `read` (a read of the cluster's keys) against `etcd` with kiln's own etcd client.
pub fn read_etcd<T, F>(etcd: &Etcd, read: impl FnOnce(std::sync::Arc<kiln_cluster::Etcd>) -> F) -> T
where
    F: std::future::Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = std::sync::Arc::new(kiln_cluster::Etcd::new(&etcd.urls()).unwrap());
    rt.block_on(read(client))
}
