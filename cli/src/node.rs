//! `kiln node`: the nodes of a cluster (`kiln serve --cluster-etcd`), straight through etcd
//! (no node's API, no API key): list them, drain one, undrain it. The work is
//! [`kiln_cluster::admin`]'s; this parses, calls and prints.

use anyhow::{Context, Result};
use kiln_cluster::admin::{self, Event, Follow, Outcome, Settled};
use kiln_cluster::SandboxState;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// List the cluster's nodes
    ///
    /// Each node: live or not, draining (`yes`; `asked` until it has seen its drain), its
    /// sandboxes in the catalog (running, paused, and released: let go by a drain, not yet
    /// taken over), its free memory and advertise URL. Nodes that are gone are listed while
    /// a drain or a sandbox names them.
    #[command(visible_alias = "list")]
    Ls {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// One JSON array of the nodes
        #[arg(long)]
        json: bool,
    },
    /// Move a node's sandboxes to the other nodes, to take the node out
    ///
    /// The node takes no new sandbox, pauses its running ones (memory and files) and pushes
    /// them to the store's S3 remote, and lets each go; the next request for one through any
    /// node resumes it on another node, as `Sandbox.connect` does after a pause (its clients
    /// see a pause: open connections end). The node keeps running, and stays drained (across
    /// restarts too) until `kiln node undrain`. A sandbox whose pause or push fails stays
    /// where it is, running, and is listed with why; run the drain again to retry it. Failed
    /// sandboxes are left alone.
    ///
    /// Prints each sandbox as it is let go, then a summary; exits non-zero when some could
    /// not be, or the timeout came first.
    ///
    /// Example: kiln node drain n3 --cluster-etcd http://10.0.0.10:2379,http://10.0.0.11:2379
    Drain {
        /// The node's id (its `kiln serve --node-id`)
        node: String,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Follow it for at most this long (the drain itself goes on)
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout: u64,
        /// Ask for the drain and return at once
        #[arg(long)]
        no_wait: bool,
        /// Print one JSON object at the end instead of lines
        #[arg(long)]
        json: bool,
    },
    /// End a node's drain: placement may pick it again
    ///
    /// The sandboxes it let go stay where they resumed (or resume wherever they are next
    /// asked for); those it could not let go are its own, as before.
    Undrain {
        /// The node's id (its `kiln serve --node-id`)
        node: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(clap::Args)]
pub struct EtcdArgs {
    /// The cluster's etcd client URLs (`http://host:port`, comma-separated), as its nodes'
    /// `kiln serve --cluster-etcd`
    #[arg(
        long,
        env = "KILN_CLUSTER_ETCD",
        value_delimiter = ',',
        value_name = "URL[,URL...]",
        required = true
    )]
    cluster_etcd: Vec<String>,
}

impl EtcdArgs {
    fn client(&self) -> Result<Arc<kiln_cluster::Etcd>> {
        Ok(Arc::new(kiln_cluster::Etcd::new(&self.cluster_etcd)?))
    }
}

pub fn run(c: NodeCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match c {
        NodeCommand::Ls { etcd, json } => {
            let rows = rt.block_on(admin::nodes(etcd.client()?))?;
            if json {
                return crate::cli::print_json(&rows);
            }
            println!(
                "{:<20} {:<6} {:<10} {:>7} {:>6} {:>8} {:>9}  ADVERTISE",
                "NODE", "LIVE", "DRAINING", "RUNNING", "PAUSED", "RELEASED", "FREE MiB"
            );
            for r in rows {
                let draining = match (r.draining, r.draining_seen) {
                    (true, true) => "yes",
                    (true, false) => "asked",
                    (false, true) => "ending",
                    (false, false) => "no",
                };
                println!(
                    "{:<20} {:<6} {:<10} {:>7} {:>6} {:>8} {:>9}  {}",
                    r.id,
                    if r.live { "yes" } else { "no" },
                    draining,
                    r.running,
                    r.paused,
                    r.released,
                    r.free_memory_mib.map_or("-".into(), |m| m.to_string()),
                    r.advertise.as_deref().unwrap_or("-"),
                );
            }
            Ok(())
        }
        NodeCommand::Drain {
            node,
            etcd,
            timeout,
            no_wait,
            json,
        } => {
            let follow = Follow {
                wait: !no_wait,
                timeout: Duration::from_secs(timeout),
                every: Duration::from_millis(250),
            };
            let print = |e: &Event| {
                if !json {
                    print_event(&node, e);
                }
            };
            let report = rt.block_on(admin::drain(etcd.client()?, &node, follow, print))?;
            if json {
                crate::cli::print_json(&report)?;
            } else {
                print_summary(&report, no_wait);
            }
            let kept = report.count(Outcome::Kept);
            if !no_wait && report.live && (!report.complete || kept > 0) {
                anyhow::bail!(
                    "node {node} is not drained: {kept} sandbox(es) kept, {} not settled",
                    report.pending.len()
                );
            }
            Ok(())
        }
        NodeCommand::Undrain { node, etcd } => {
            let client = etcd.client()?;
            if rt.block_on(kiln_cluster::drain::cancel(&client, &node))? {
                println!("node {node} is no longer draining: placement may pick it again");
            } else {
                println!("node {node} was not draining");
            }
            Ok(())
        }
    }
}

fn print_event(node: &str, e: &Event) {
    match e {
        Event::Asked {
            running,
            paused,
            live: true,
        } => println!(
            "drain of node {node} asked: {} sandbox(es) to let go ({running} running, {paused} paused)",
            running + paused
        ),
        Event::Asked {
            running, paused, ..
        } => println!(
            "drain of node {node} asked; the node is not live, so it starts when the node joins \
             ({running} running, {paused} paused: its paused ones with a pushed snapshot resume \
             elsewhere already)"
        ),
        Event::Started { ms } => println!("node {node} began draining ({:.1} s)", secs(*ms)),
        Event::Settled(s) => println!("{}", settled_line(s)),
    }
}

fn settled_line(s: &Settled) -> String {
    let was = match s.was {
        SandboxState::Running => "running",
        SandboxState::Paused => "paused",
        SandboxState::Failed => "failed",
    };
    let at = secs(s.ms);
    let what = match s.outcome {
        Outcome::Released if s.was == SandboxState::Running => {
            "released: paused, pushed; resumes on the next node asked".to_string()
        }
        Outcome::Released => "released: pushed; resumes on the next node asked".to_string(),
        Outcome::Elsewhere => format!(
            "released and already taken over by node {}",
            s.node.as_deref().unwrap_or("?")
        ),
        Outcome::Gone => "gone (killed meanwhile)".to_string(),
        Outcome::Failed => format!("failed meanwhile: {}", s.cause.as_deref().unwrap_or("?")),
        Outcome::Kept => format!(
            "KEPT on the node: {}",
            s.cause.as_deref().unwrap_or("it could not be let go")
        ),
    };
    format!("{} (was {was}) {what} [{at:.1} s]", s.id)
}

fn print_summary(r: &admin::DrainReport, no_wait: bool) {
    let released = r.count(Outcome::Released) + r.count(Outcome::Elsewhere);
    let kept = r.count(Outcome::Kept);
    let node = &r.node;
    if no_wait || !r.live {
        println!("follow it with `kiln node ls`; end it with `kiln node undrain {node}`");
    } else if r.complete && kept > 0 {
        println!(
            "node {node} is draining, but {kept} sandbox(es) stay on it (above), as they were; \
             {released} released in {:.1} s. Run `kiln node drain {node}` again to retry them",
            r.secs
        );
    } else if r.complete {
        println!(
            "node {node} is drained in {:.1} s: {released} released, {kept} kept, {} gone or failed \
             meanwhile. It keeps running and takes no new sandbox: stop it, or `kiln node undrain \
             {node}` to give it sandboxes again",
            r.secs,
            r.count(Outcome::Gone) + r.count(Outcome::Failed)
        );
    } else if r.cancelled {
        println!(
            "the drain of node {node} was ended (undrain) after {:.1} s: {released} released",
            r.secs
        );
    } else if r.node_left {
        println!(
            "node {node} left the cluster during its drain ({released} released): its running \
             sandboxes are lost if it is not back within --cluster-lost-after, its pushed paused \
             ones resume elsewhere"
        );
    } else {
        println!(
            "still draining after {:.1} s: {released} released, {kept} kept, {} not yet ({}); \
             the node goes on: follow it with `kiln node ls`",
            r.secs,
            r.pending.len(),
            r.pending.join(", ")
        );
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}
