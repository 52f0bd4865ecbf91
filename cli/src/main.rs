//! The `kiln` command line: one binary, clap subcommands, one module per area.
//!
//! Each area's module owns its subcommands (`store`, `remote`, `vm`, `snapshot`, `image`,
//! `build`); this file only wires them together, sets up logging and resolves the home.

mod cli;
mod helper;
mod image;
mod node;
mod sandbox;
mod serve;
mod store;
mod vm;
mod vm_snapshot;

use clap::{Parser, Subcommand};

/// kiln: build VM images, boot microVMs, snapshot, restore and fork them, with every byte in
/// one content-addressed block store (local disk + S3).
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Home directory holding the store, VMs and configuration
    /// [default: /var/lib/kiln for root, $XDG_DATA_HOME/kiln otherwise]
    #[arg(long, global = true, env = "KILN_HOME", value_name = "DIR")]
    home: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Store, read, verify and garbage-collect blobs in the block store
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Configure S3-compatible remotes the store pushes to and reads from lazily
    #[command(subcommand)]
    Remote(store::RemoteCommand),
    /// Run and control microVMs
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Snapshot running VMs
    #[command(subcommand)]
    Snapshot(vm_snapshot::SnapshotCommand),
    /// Pull, import, inspect and export VM images
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Build a VM image from a Dockerfile
    Build(image::BuildArgs),
    /// Sandboxes: create from an image, exec, cp, snapshot, fork, pause, resume, kill (here,
    /// or through a kiln serve or cluster with --server)
    ///
    /// On this host's home by default. With --server URL (or KILN_SERVER) the commands go
    /// through E2B's API of that `kiln serve` instead: any node of a cluster, which lists the
    /// whole cluster and reaches every sandbox in it. The API key comes from --api-key or
    /// E2B_API_KEY (the server's KILN_API_KEY, or its KILN_HOME/serve/api-key). Commands
    /// with no API counterpart (logs, port, network) need a home and exit with code 2.
    /// Examples:
    ///   kiln sandbox create busybox --timeout 600
    ///   export KILN_SERVER=http://10.0.0.11:3000 E2B_API_KEY=kiln_...   # node 1 of a cluster
    ///   id=$(kiln sbx create sdk --metadata team=ci)
    ///   kiln sbx --server http://10.0.0.13:3000 ls     # the whole cluster, through node 3
    ///   kiln sbx exec $id -- cat /etc/hostname
    ///   kiln sbx pause $id; kiln sbx resume $id; kiln sbx kill $id
    #[command(visible_alias = "sbx", verbatim_doc_comment)]
    Sandbox(sandbox::SandboxArgs),
    /// Serve E2B's HTTP API (control plane and envd data plane) over this host's sandboxes
    Serve(serve::ServeArgs),
    /// The nodes of a cluster of `kiln serve --cluster-etcd`: list, drain, undrain (through
    /// etcd)
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// A helper process kiln starts itself, from the spec in DIR (kiln_runtime::helpers)
    #[command(name = "__helper", hide = true)]
    Helper { dir: std::path::PathBuf },
}

fn main() -> std::process::ExitCode {
    cli::init_logging();
    let cli = Cli::parse();
    let home = cli::Home::resolve(cli.home);
    let result = match cli.command {
        Command::Store(c) => store::run(&home, c),
        Command::Remote(c) => store::run_remote(&home, c),
        Command::Vm(c) => vm::run(&home, c),
        Command::Snapshot(c) => vm_snapshot::run(&home, c),
        Command::Image(c) => image::run(&home, c),
        Command::Build(a) => image::build(&home, a),
        Command::Sandbox(a) => sandbox::run(&home, a),
        Command::Serve(a) => serve::run(&home, a),
        Command::Node(c) => node::run(c),
        Command::Helper { dir } => helper::run(&dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<cli::UsageError>() {
                Some(_) => std::process::ExitCode::from(2),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}
