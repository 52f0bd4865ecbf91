//! `kiln serve`: the daemon whose HTTP API is E2B's (control plane) and envd's (data plane),
//! so E2B's SDKs drive kiln sandboxes unchanged. Parsing and wiring only; the service is the
//! `server` crate.

use crate::cli::Home;
use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback unless --allow-remote)
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: std::net::SocketAddr,
    /// Domain of sandbox host names (`{port}-{id}.{domain}`) and of create responses
    /// [default: localhost:<port>]
    #[arg(long)]
    domain: Option<String>,
    /// Allow a non-loopback listen address (kiln serve has no TLS: put it behind a proxy)
    #[arg(long)]
    allow_remote: bool,
    /// Cluster mode: join the cluster coordinated by these etcd client URLs
    /// (`http://host:port`, comma-separated); without it, this host alone, no etcd
    #[arg(long, value_delimiter = ',', value_name = "URL[,URL...]")]
    cluster_etcd: Vec<String>,
    /// Cluster mode: this node's id, unique in the cluster [default: the host name]
    #[arg(long, requires = "cluster_etcd")]
    node_id: Option<String>,
    /// Cluster mode: the URL other nodes reach this one at [default: http://<listen>]
    #[arg(long, requires = "cluster_etcd")]
    advertise: Option<String>,
    /// Cluster mode: a file holding the secret every node of the cluster shares
    /// (authenticates node-to-node requests)
    #[arg(long, requires = "cluster_etcd", value_name = "FILE")]
    cluster_secret_file: Option<std::path::PathBuf>,
    /// Cluster mode: seconds a node may be gone (its 5 s lease expired) before the other
    /// nodes declare its running sandboxes lost (`failed`, stopped when it returns); a node
    /// restarted within them keeps its sandboxes
    #[arg(
        long,
        requires = "cluster_etcd",
        value_name = "SECS",
        default_value_t = 30
    )]
    cluster_lost_after: u64,
}

/// The cluster settings, when `--cluster-etcd` was given.
fn cluster(a: &ServeArgs) -> Result<Option<kiln_server::ClusterConfig>> {
    if a.cluster_etcd.is_empty() {
        return Ok(None);
    }
    let file = a
        .cluster_secret_file
        .as_ref()
        .context("--cluster-etcd needs --cluster-secret-file (the secret every node shares)")?;
    let secret = std::fs::read_to_string(file)
        .with_context(|| format!("reading the cluster secret {}", file.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(
        secret.len() >= 16,
        "the cluster secret in {} is shorter than 16 characters",
        file.display()
    );
    let node_id = match &a.node_id {
        Some(id) => id.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name for --node-id")?
            .trim()
            .to_string(),
    };
    Ok(Some(kiln_server::ClusterConfig {
        etcd: a.cluster_etcd.clone(),
        node_id,
        advertise: a
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", a.listen)),
        secret,
        lost_after: std::time::Duration::from_secs(a.cluster_lost_after),
    }))
}

pub fn run(home: &Home, a: ServeArgs) -> Result<()> {
    kiln_server::check_listen(a.listen, a.allow_remote)?;
    let cluster = cluster(&a)?;
    let sandboxes = crate::sandbox::open(home)?;
    let cfg = kiln_server::ServeConfig {
        listen: a.listen,
        domain: a.domain,
        allow_remote: a.allow_remote,
        api_key: std::env::var("KILN_API_KEY").ok(),
        home: home.root().to_path_buf(),
        cluster,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(kiln_server::run(cfg, sandboxes, |addr, key_file| {
        match key_file {
            Some(p) => eprintln!("kiln serve: API key in {} (X-API-Key)", p.display()),
            None => eprintln!("kiln serve: API key from KILN_API_KEY"),
        }
        eprintln!("kiln serve: listening on http://{addr}");
    }))
    .context("kiln serve")
}
