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
    /// Sandboxes: create from an image, exec, cp, snapshot, fork, pause, resume, kill
    #[command(subcommand, visible_alias = "sbx")]
    Sandbox(sandbox::SandboxCommand),
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
        Command::Sandbox(c) => sandbox::run(&home, c),
        Command::Serve(a) => serve::run(&home, a),
        Command::Node(c) => node::run(c),
        Command::Helper { dir } => helper::run(&dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
