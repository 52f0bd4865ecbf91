//! `kiln sandbox` (alias `kiln sbx`): sandboxes from images and snapshots, on this host's
//! default runtime (microvm where KVM has hardware virtualization, gVisor elsewhere), or with
//! `--server` through a `kiln serve`'s E2B API ([`remote`]). Parsing and printing only; the
//! lifecycle lives in the `runtime` crate, the API client in `kiln_server::client`.

mod remote;

use crate::cli::{print_json, Home};
use anyhow::{anyhow, bail, Context, Result};
use kiln_agent::client;
use kiln_agent::protocol::{FileRequest, Kind, TtySize};
use kiln_runtime::{
    CreateSpec, ExecOptions, OnTimeout, RuntimeKind, SandboxRecord, Sandboxes, Source, State,
};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    command: SandboxCommand,
}

/// Where the commands go: a `kiln serve` (any node of a cluster) instead of this home.
#[derive(clap::Args)]
struct ServerArgs {
    /// A kiln serve (or any node of a cluster) to drive through E2B's API instead of this
    /// home: http://HOST:PORT
    #[arg(long, global = true, env = "KILN_SERVER", value_name = "URL")]
    server: Option<String>,
    /// The server's API key (with --server)
    #[arg(
        long,
        global = true,
        env = "E2B_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox from an image (or a snapshot) and print its id
    ///
    /// The image's ENV, WORKDIR, USER and CMD are the defaults of every exec. Examples:
    ///   kiln sandbox create busybox --name dev --env MODE=test --timeout 600
    ///   kiln sandbox create --snapshot warm
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),
    /// List sandboxes (state, runtime, image, age)
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox's record
    Info {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox; streams its output and exits with its code
    ///
    /// stdin passes through. Examples:
    ///   kiln sandbox exec dev -- ls -la /
    ///   echo hi | kiln sandbox exec dev --cwd /tmp -- sh -c 'cat > x; wc -c x'
    ///   kiln sandbox exec -t dev -- sh
    #[command(verbatim_doc_comment)]
    Exec(ExecArgs),
    /// Copy a file into or out of a sandbox: `cp SRC ID:DST` or `cp ID:SRC DST`
    Cp { src: String, dst: String },
    /// Save a running sandbox as a named snapshot; it keeps running
    Snapshot {
        id: String,
        #[arg(long)]
        name: String,
        /// Also push it (with its image) to the default remote
        #[arg(long)]
        push: bool,
        #[arg(long)]
        json: bool,
    },
    /// List named sandbox snapshots, or remove them (`snapshots rm NAME...`)
    ///
    /// Examples:
    ///   kiln sandbox snapshots                 # NAME and ID of each
    ///   kiln sandbox snapshots rm warm old     # their data goes once no sandbox needs it,
    ///   kiln store gc                          # ... and their chunks with the next gc
    #[command(verbatim_doc_comment)]
    Snapshots {
        #[command(subcommand)]
        command: Option<SnapshotsCommand>,
        #[arg(long)]
        json: bool,
    },
    /// Start N sandboxes continuing from a running sandbox's present state
    Fork {
        id: String,
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: usize,
        #[arg(long)]
        json: bool,
    },
    /// Save a running sandbox to the store and stop it
    Pause {
        id: String,
        /// Also push its snapshot to the default remote (resume it in another home with
        /// `kiln sandbox resume SNAPSHOT-ID`)
        #[arg(long)]
        push: bool,
        /// Keep only its file system (no memory): a resume boots it afresh on its files
        #[arg(long)]
        files_only: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused sandbox, or start one from a snapshot id (e.g. pushed by another host)
    Resume {
        id: String,
        /// Boot it afresh on its saved files, leaving any saved memory unused
        #[arg(long)]
        reboot: bool,
        #[arg(long)]
        json: bool,
    },
    /// End sandboxes and remove them
    Kill {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print a sandbox's console log (its init's and runtime's output)
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Forward a host TCP port to a port inside a sandbox (through its agent) until interrupted
    ///
    /// Prints the address it listens on. Example:
    ///   kiln sandbox port dev 8080 --listen 127.0.0.1:18080 & curl 127.0.0.1:18080
    #[command(verbatim_doc_comment)]
    Port {
        id: String,
        port: u16,
        /// Host address to listen on (port 0: any free port)
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Set a sandbox's timeout, counted from now (0: none)
    Timeout { id: String, secs: u64 },
    /// Show or change a sandbox's egress policy (changes apply to a running sandbox at once)
    ///
    /// With no flags it prints the policy. A new connection to address A is allowed if A is in
    /// an --allow-out entry, else denied if in a --deny-out entry, else allowed only with
    /// internet on. Entries are CIDRs (10.0.0.0/8), addresses, host names (pypi.org) or
    /// wildcards (*.github.com); a name covers the addresses it resolves to, so a raw-IP
    /// connection never bypasses a name rule. Connections already open go on. Examples:
    ///   kiln sandbox network dev                         # print the policy
    ///   kiln sandbox network dev --internet off --allow-out pypi.org --allow-out files.pythonhosted.org
    ///   kiln sandbox network dev --deny-out 10.0.0.0/8   # add a rule
    ///   kiln sandbox network dev --clear --internet on   # back to the default
    #[command(verbatim_doc_comment)]
    Network(NetworkArgs),
}

#[derive(clap::Subcommand)]
pub enum SnapshotsCommand {
    /// Remove named snapshots (their data goes once no sandbox needs it)
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(clap::Args)]
pub struct NetworkArgs {
    id: String,
    /// Internet access for everything not listed
    #[arg(long, value_enum)]
    internet: Option<OnOff>,
    /// Allow connections to a CIDR, address or host name (repeatable; wins over --deny-out)
    #[arg(long = "allow-out", value_name = "DEST", value_parser = parse_dest)]
    allow_out: Vec<kiln_network::Dest>,
    /// Deny connections to a CIDR, address or host name (repeatable)
    #[arg(long = "deny-out", value_name = "DEST", value_parser = parse_dest)]
    deny_out: Vec<kiln_network::Dest>,
    /// Start from empty allow and deny lists (before adding this call's entries)
    #[arg(long)]
    clear: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum OnOff {
    On,
    Off,
}

fn parse_dest(s: &str) -> Result<kiln_network::Dest, String> {
    s.parse()
        .map_err(|e: kiln_network::DestError| e.to_string())
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// Image name or id (see `kiln image ls`)
    #[arg(required_unless_present = "snapshot", conflicts_with = "snapshot")]
    image: Option<String>,
    /// Start from a sandbox snapshot instead (name or id)
    #[arg(long)]
    snapshot: Option<String>,
    /// A unique name to address the sandbox by
    #[arg(long)]
    name: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    runtime: RuntimeArg,
    /// vCPUs [default: the snapshot's, else 2 on gVisor (at most the host's), 1 on a microVM]
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory in MiB [default: 512, or the snapshot's]
    #[arg(long)]
    memory: Option<u64>,
    /// Disk size in MiB: bounds what the sandbox's files can take (gVisor: the writable
    /// layer, on host disk) [default: the image's disk size, at least 2048; or the snapshot's]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=kiln_runtime::MAX_DISK_MIB))]
    disk: Option<u64>,
    /// Environment for every exec, K=V (repeatable)
    #[arg(long = "env", value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Metadata, K=V (repeatable)
    #[arg(long = "metadata", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    /// Seconds until the sandbox is killed (or paused with --on-timeout pause) [default: none;
    /// with --server 300, as E2B's SDKs ask]
    #[arg(long)]
    timeout: Option<u64>,
    #[arg(long, value_enum, default_value = "kill")]
    on_timeout: OnTimeoutArg,
    /// Deny internet access: only --allow-out destinations are reachable [default: internet
    /// on, or the snapshot's policy]
    #[arg(long)]
    no_internet: bool,
    /// Allow connections to a CIDR, address, host name or *.wildcard (repeatable; wins over
    /// --deny-out; with --no-internet, a whitelist)
    #[arg(long = "allow-out", value_name = "DEST", value_parser = parse_dest)]
    allow_out: Vec<kiln_network::Dest>,
    /// Deny connections to a CIDR, address, host name or *.wildcard (repeatable)
    #[arg(long = "deny-out", value_name = "DEST", value_parser = parse_dest)]
    deny_out: Vec<kiln_network::Dest>,
    /// No network device at all (loopback only)
    #[arg(long, conflicts_with_all = ["no_internet", "allow_out", "deny_out"])]
    no_network: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum RuntimeArg {
    Auto,
    Microvm,
    Gvisor,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum OnTimeoutArg {
    Kill,
    Pause,
    /// Pause keeping only the file system
    PauseFiles,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Run on a pseudo-terminal (raw mode, window size passed on)
    #[arg(short = 't', long)]
    tty: bool,
    /// K=V (repeatable), over the image's and the sandbox's environment
    #[arg(long = "env", value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Working directory [default: the image's WORKDIR]
    #[arg(long)]
    cwd: Option<String>,
    /// User name, uid or uid:gid [default: the image's USER]
    #[arg(long)]
    user: Option<String>,
    /// Sandbox id or name
    id: String,
    /// The command [default: the image's CMD]
    #[arg(last = true)]
    cmd: Vec<String>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// The sandboxes of this home, with every driver this build has, in order of preference.
pub fn open(home: &Home) -> Result<Sandboxes> {
    let store = crate::store::open_with_remote(home, None, false)?;
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    Ok(kiln_runtime::host_sandboxes(home.root(), store, exe))
}

pub fn run(home: &Home, a: SandboxArgs) -> Result<()> {
    match a.server.server.filter(|s| !s.trim().is_empty()) {
        Some(url) => {
            let client = kiln_server::client::Client::new(&url, a.server.api_key)?;
            remote::run(&client, a.command)
        }
        None => local(home, a.command),
    }
}

fn local(home: &Home, c: SandboxCommand) -> Result<()> {
    let sbx = open(home)?;
    match c {
        SandboxCommand::Create(a) => create(&sbx, a),
        SandboxCommand::Ls { json } => ls(&sbx, json),
        SandboxCommand::Info { id, json } => {
            let rec = sbx.get(&id)?;
            if json {
                print_json(&rec)
            } else {
                print_record(&rec);
                Ok(())
            }
        }
        SandboxCommand::Exec(a) => exec(&sbx, a),
        SandboxCommand::Cp { src, dst } => cp(&sbx, &src, &dst),
        SandboxCommand::Snapshot {
            id,
            name,
            push,
            json,
        } => {
            let snap = sbx.snapshot(&id, Some(&name))?;
            if push {
                kiln_runtime::sandbox_snapshot::push(sbx.store(), &snap, Some(&name))?;
            }
            if json {
                print_json(&serde_json::json!({"name": name, "id": snap, "pushed": push}))
            } else {
                println!("{snap}");
                Ok(())
            }
        }
        SandboxCommand::Snapshots {
            command: Some(SnapshotsCommand::Rm { names }),
            ..
        } => {
            let mut missing = Vec::new();
            for n in &names {
                if !sbx.remove_snapshot(n)? {
                    missing.push(n.as_str());
                }
            }
            if !missing.is_empty() {
                bail!("no snapshot named {}", missing.join(", "));
            }
            Ok(())
        }
        SandboxCommand::Snapshots { json, .. } => {
            let list = kiln_runtime::sandbox_snapshot::list(sbx.store())?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|(n, id)| serde_json::json!({"name": n, "id": id}))
                    .collect();
                return print_json(&v);
            }
            println!("{:<24} ID", "NAME");
            for (n, id) in list {
                println!("{n:<24} {id}");
            }
            Ok(())
        }
        SandboxCommand::Fork { id, count, json } => {
            let forks = sbx.fork(
                &id,
                kiln_runtime::ForkSpec {
                    count,
                    timeout_secs: None,
                },
            )?;
            if json {
                return print_json(&forks);
            }
            for f in forks {
                println!("{}", f.id);
            }
            Ok(())
        }
        SandboxCommand::Pause {
            id,
            push,
            files_only,
            json,
        } => pause(&sbx, &id, push, files_only, json),
        SandboxCommand::Resume { id, reboot, json } => {
            let mode = match reboot {
                true => kiln_runtime::ResumeMode::Reboot,
                false => kiln_runtime::ResumeMode::Restore,
            };
            let rec = match sbx.get(&id) {
                Ok(_) => sbx.resume_with(&id, None, mode)?,
                Err(kiln_runtime::Error::NotFound(_)) => sbx
                    .create(CreateSpec::new(Source::Snapshot(id.clone())))
                    .with_context(|| format!("{id:?} is neither a sandbox here nor a snapshot"))?,
                Err(e) => return Err(e.into()),
            };
            if json {
                return print_json(&rec);
            }
            println!("{}", rec.id);
            Ok(())
        }
        SandboxCommand::Kill { ids } => {
            for id in ids {
                sbx.kill(&id)?;
                println!("{id} killed");
            }
            Ok(())
        }
        SandboxCommand::Logs { id, follow } => logs(&sbx.log_path(&id)?, follow),
        SandboxCommand::Port { id, port, listen } => {
            let rec = sbx.get(&id)?;
            if !listen.ip().is_loopback() {
                eprintln!("warning: forwarding from {listen}, reachable from other hosts");
            }
            let l = std::net::TcpListener::bind(listen)
                .with_context(|| format!("listening on {listen}"))?;
            println!("{}", l.local_addr()?);
            std::io::stdout().flush()?;
            let sid = rec.id.clone();
            kiln_runtime::ports::forward(
                l,
                move || sbx.dial(&sid, port),
                move |e| eprintln!("sandbox {id} port {port}: {e}"),
            )?;
            Ok(())
        }
        SandboxCommand::Timeout { id, secs } => {
            let rec = sbx.set_timeout(&id, (secs > 0).then_some(secs))?;
            println!("{} {}", rec.id, describe_deadline(&rec));
            Ok(())
        }
        SandboxCommand::Network(a) => set_network(&sbx, a),
    }
}

fn set_network(sbx: &Sandboxes, a: NetworkArgs) -> Result<()> {
    let rec = sbx.get(&a.id)?;
    let Some(mut policy) = rec.network.clone() else {
        bail!(
            "sandbox {} has no network device (created with --no-network)",
            rec.id
        );
    };
    let change =
        a.internet.is_some() || a.clear || !a.allow_out.is_empty() || !a.deny_out.is_empty();
    let rec = if change {
        if a.clear {
            policy.allow_out.clear();
            policy.deny_out.clear();
        }
        if let Some(i) = a.internet {
            policy.internet = matches!(i, OnOff::On);
        }
        for d in a.allow_out {
            policy.allow(d);
        }
        for d in a.deny_out {
            policy.deny(d);
        }
        sbx.set_network(&rec.id, policy)?
    } else {
        rec
    };
    if a.json {
        return print_json(&rec.network);
    }
    println!(
        "{}",
        rec.network
            .as_ref()
            .map(|p| p.summary())
            .unwrap_or_default()
    );
    Ok(())
}

fn pause(sbx: &Sandboxes, id: &str, push: bool, files_only: bool, json: bool) -> Result<()> {
    let mode = match files_only {
        true => kiln_runtime::PauseMode::Filesystem,
        false => kiln_runtime::PauseMode::Full,
    };
    let rec = sbx.pause_with(id, mode)?;
    let State::Paused { saved: snapshot } = &rec.state else {
        bail!("sandbox {id} did not pause");
    };
    let pushed = match push {
        true => Some(kiln_runtime::sandbox_snapshot::push(
            sbx.store(),
            snapshot,
            None,
        )?),
        false => None,
    };
    if json {
        // The record, and the bytes this pause stored and uploaded (only what was new).
        let mut v = serde_json::to_value(&rec)?;
        v["stored_bytes"] = sbx.store().stats().bytes_written.into();
        if let Some(b) = pushed {
            v["pushed_bytes"] = b.into();
        }
        return print_json(&v);
    }
    println!("{} paused (snapshot {snapshot})", rec.id);
    Ok(())
}

fn create(sbx: &Sandboxes, a: CreateArgs) -> Result<()> {
    let source = match (a.image, a.snapshot) {
        (_, Some(s)) => Source::Snapshot(s),
        (Some(i), None) => Source::Image(i),
        (None, None) => bail!("give an image or --snapshot"),
    };
    let mut spec = CreateSpec::new(source);
    spec.name = a.name;
    spec.runtime = match a.runtime {
        RuntimeArg::Auto => None,
        RuntimeArg::Microvm => Some(RuntimeKind::Microvm),
        RuntimeArg::Gvisor => Some(RuntimeKind::Gvisor),
    };
    spec.cpus = a.cpus;
    spec.memory_mib = a.memory;
    spec.disk_mib = a.disk;
    spec.env = a.env.into_iter().collect();
    spec.metadata = a.metadata.into_iter().collect();
    spec.timeout_secs = a.timeout;
    spec.on_timeout = match a.on_timeout {
        OnTimeoutArg::Kill => OnTimeout::Kill,
        OnTimeoutArg::Pause => OnTimeout::Pause,
        OnTimeoutArg::PauseFiles => OnTimeout::PauseFilesystem,
    };
    spec.no_network = a.no_network;
    if a.no_internet || !a.allow_out.is_empty() || !a.deny_out.is_empty() {
        let mut p = kiln_network::NetworkPolicy {
            internet: !a.no_internet,
            ..Default::default()
        };
        for d in a.allow_out {
            p.allow(d);
        }
        for d in a.deny_out {
            p.deny(d);
        }
        spec.network = Some(p);
    }
    let rec = sbx.create(spec)?;
    if a.json {
        return print_json(&rec);
    }
    println!("{}", rec.id);
    Ok(())
}

fn ls(sbx: &Sandboxes, json: bool) -> Result<()> {
    let list = sbx.list()?;
    if json {
        return print_json(&list);
    }
    list_row(["ID", "NAME", "STATE", "RUNTIME", "SOURCE", "CREATED"]);
    for r in list {
        list_row([
            &r.id,
            r.name.as_deref().unwrap_or("-"),
            r.state.name(),
            &r.runtime.to_string(),
            &truncate(&r.source, 20),
            &age(r.created_ms),
        ]);
    }
    Ok(())
}

/// One line of `ls`'s table (local or through a server).
fn list_row(cols: [&str; 6]) {
    let [id, name, state, runtime, source, created] = cols;
    println!("{id:<16} {name:<14} {state:<8} {runtime:<8} {source:<20} {created}");
}

fn print_record(r: &SandboxRecord) {
    println!("id:       {}", r.id);
    if let Some(n) = &r.name {
        println!("name:     {n}");
    }
    println!("state:    {}", r.state.name());
    if let State::Failed { cause } = &r.state {
        println!("cause:    {cause}");
    }
    if let State::Paused { saved: snapshot } = &r.state {
        println!("snapshot: {snapshot}");
    }
    println!("runtime:  {}", r.runtime);
    println!("source:   {} (image {})", r.source, r.image);
    println!(
        "cpus:     {}  memory: {} MiB  disk: {} MiB",
        r.cpus, r.memory_mib, r.disk_mib
    );
    println!("created:  {} ago", age(r.created_ms));
    println!("timeout:  {}", describe_deadline(r));
    match (&r.network, &r.net) {
        (None, _) => println!("network:  none (no network device, loopback only)"),
        (Some(p), att) => {
            println!("network:  {}", p.summary());
            if let Some(a) = att {
                println!(
                    "address:  {}/{} via {} (namespace {}, uplink {} on {})",
                    a.guest_ip, a.prefix, a.gateway, a.router_ns, a.uplink_ip, a.host_if
                );
            }
        }
    }
    let a = &r.access;
    let mut needs = Vec::new();
    if a.secure {
        needs.push("envd access token");
    }
    if a.private_traffic {
        needs.push("traffic access token for its ports");
    }
    if !needs.is_empty() {
        println!("access:   {}", needs.join(", "));
    }
    for (k, v) in &r.metadata {
        println!("meta:     {k}={v}");
    }
}

fn describe_deadline(r: &SandboxRecord) -> String {
    match r.deadline_ms {
        None => "none".into(),
        Some(d) => {
            let left = d.saturating_sub(kiln_runtime::record::now_ms()) / 1000;
            let what = match r.on_timeout {
                OnTimeout::Kill => "killed",
                OnTimeout::Pause => "paused",
                OnTimeout::PauseFilesystem => "paused (files only)",
            };
            format!("{what} in {left} s")
        }
    }
}

fn age(ms: u64) -> String {
    let s = kiln_runtime::record::now_ms().saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('~');
        t
    }
}

fn exec(sbx: &Sandboxes, a: ExecArgs) -> Result<()> {
    let (rec, mut stream) = sbx.connect(&a.id)?;
    let mut req = sbx.exec_request(
        &rec,
        ExecOptions {
            argv: a.cmd,
            env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
            cwd: a.cwd,
            user: a.user,
        },
    );
    if req.argv.is_empty() {
        bail!("no command given and the image has no CMD: kiln sandbox exec ID -- CMD...");
    }
    let _raw = if a.tty {
        req.tty = Some(terminal_size());
        RawMode::enter()
    } else {
        None
    };
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let status = client::exec_stream(
        &mut stream,
        &req,
        Some(Box::new(std::io::stdin())),
        |_| {},
        |kind, data| {
            let _ = match kind {
                Kind::Stderr => stderr.lock().write_all(data),
                _ => stdout
                    .lock()
                    .write_all(data)
                    .and_then(|_| stdout.lock().flush()),
            };
        },
    )
    .map_err(|e| anyhow!("sandbox {}: {e}", rec.id))?;
    drop(_raw);
    let _ = stdout.lock().flush();
    let code = match (status.code, status.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    };
    std::process::exit(code);
}

/// `ID:PATH` -> (ID, PATH); a local path otherwise.
fn sandbox_path(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (!id.is_empty() && !id.contains('/')).then_some((id, path))
}

fn cp(sbx: &Sandboxes, src: &str, dst: &str) -> Result<()> {
    match (sandbox_path(src), sandbox_path(dst)) {
        (None, Some((id, path))) => {
            let (f, mode) = copy_in_source(src)?;
            let (_, mut s) = sbx.connect(id)?;
            let req = FileRequest {
                path: path.to_string(),
                mode: Some(mode),
                ..FileRequest::default()
            };
            client::write_file(&mut s, &req, std::io::BufReader::new(f))
                .map_err(|e| anyhow!("sandbox {id}: {e}"))?;
            Ok(())
        }
        (Some((id, path)), None) => {
            let (_, mut s) = sbx.connect(id)?;
            copy_out(path, dst, |w| {
                client::read_file(&mut s, path, w)
                    .map(|_| ())
                    .map_err(|e| anyhow!("sandbox {id}: {e}"))
            })
        }
        (Some(_), Some(_)) => bail!("copy between two sandboxes: copy out, then in"),
        (None, None) => bail!("one side must be ID:PATH"),
    }
}

/// A local file to copy into a sandbox: opened, and its permission bits; a directory is
/// refused.
fn copy_in_source(src: &str) -> Result<(std::fs::File, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::File::open(src).with_context(|| format!("opening {src}"))?;
    let meta = f.metadata()?;
    if meta.is_dir() {
        bail!("{src} is a directory: cp copies single files");
    }
    Ok((f, meta.permissions().mode() & 0o7777))
}

/// Copies sandbox file `path` to local `dst` (a file, or a directory to put it in by its
/// name) with `read`, atomically: a failed copy leaves no partial file.
fn copy_out(
    path: &str,
    dst: &str,
    read: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let dst = Path::new(dst);
    let dst: PathBuf = if dst.is_dir() {
        dst.join(
            Path::new(path)
                .file_name()
                .ok_or_else(|| anyhow!("{path} has no file name"))?,
        )
    } else {
        dst.to_path_buf()
    };
    let tmp = dst.with_file_name(format!(
        ".{}.kiln-cp",
        dst.file_name().unwrap_or_default().to_string_lossy()
    ));
    let out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(out);
    let copied =
        read(&mut w).and_then(|_| Ok(w.into_inner().map_err(|e| e.into_error())?.sync_all()?));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
    Ok(())
}

fn logs(path: &Path, follow: bool) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        if !follow || !path.exists() {
            return Ok(());
        }
        out.flush()?;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn terminal_size() -> TtySize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills the winsize we own; a failure leaves zeros, replaced below.
    unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    TtySize {
        cols: if ws.ws_col == 0 { 80 } else { ws.ws_col },
        rows: if ws.ws_row == 0 { 24 } else { ws.ws_row },
    }
}

/// The local terminal in raw mode for `exec -t`, restored when dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal (checked above); t is a valid out-pointer.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the struct we own; tcsetattr applies it to fd 0.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
