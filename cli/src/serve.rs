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
}

pub fn run(home: &Home, a: ServeArgs) -> Result<()> {
    kiln_server::check_listen(a.listen, a.allow_remote)?;
    let sandboxes = crate::sandbox::open(home)?;
    let cfg = kiln_server::ServeConfig {
        listen: a.listen,
        domain: a.domain,
        allow_remote: a.allow_remote,
        api_key: std::env::var("KILN_API_KEY").ok(),
        home: home.root().to_path_buf(),
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
