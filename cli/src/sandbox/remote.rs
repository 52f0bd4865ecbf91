//! `kiln sandbox --server URL ...`: the sandbox commands through E2B's API of a `kiln serve`
//! (any node of a cluster) with `kiln_server::client`. What has no API counterpart is refused
//! with a [`UsageError`] (exit code 2) that says it needs a local home.

use super::*;
use crate::cli::UsageError;
use kiln_server::client::{Client, Exec, Output};
use kiln_server::control::types::{
    ListedSandbox, NetworkConfig, NewSandbox, SandboxDetail, SandboxOnTimeout, SandboxState,
};
use kiln_server::envd::types::PtySize;

/// The time to live a create asks for when `--timeout` is not given: E2B's SDKs' default
/// (the API's own, 15 s, is too short for commands typed by hand).
const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// Refuses `what` with exit code 2.
fn needs_home(what: &str) -> anyhow::Error {
    UsageError(format!(
        "{what} has no counterpart in E2B's API: it needs a local home (run it without \
         --server / KILN_SERVER, on the sandbox's host)"
    ))
    .into()
}

pub(super) fn run(c: &Client, cmd: SandboxCommand) -> Result<()> {
    match cmd {
        SandboxCommand::Create(a) => create(c, a),
        SandboxCommand::Ls { json } => ls(c, json),
        SandboxCommand::Info { id, json } => {
            let d = c.get(&id)?;
            match json {
                true => print_json(&d),
                false => {
                    print_detail(&d);
                    Ok(())
                }
            }
        }
        SandboxCommand::Exec(a) => exec(c, a),
        SandboxCommand::Cp { src, dst } => cp(c, &src, &dst),
        SandboxCommand::Snapshot {
            id,
            name,
            push,
            json,
        } => {
            if push {
                return Err(needs_home("snapshot --push"));
            }
            let snap = c.snapshot(&id, &name)?;
            match json {
                true => print_json(&snap),
                false => {
                    println!("{}", snap.snapshot_id);
                    Ok(())
                }
            }
        }
        SandboxCommand::Snapshots {
            command: Some(SnapshotsCommand::Rm { .. }),
            ..
        } => Err(needs_home("snapshots rm")),
        SandboxCommand::Snapshots { json, .. } => {
            let list = c.snapshots()?;
            if json {
                return print_json(&list);
            }
            println!("{:<24} ID", "NAME");
            for s in list {
                println!("{:<24} {}", s.names.join(","), s.snapshot_id);
            }
            Ok(())
        }
        SandboxCommand::Fork { id, count, json } => {
            let forks = c.fork(&id, count, None)?;
            if json {
                return print_json(&forks);
            }
            for f in forks {
                println!("{}", f.sandbox.sandbox_id);
            }
            Ok(())
        }
        SandboxCommand::Pause {
            id,
            push,
            files_only,
            json,
        } => {
            if push {
                // A cluster's pause pushes anyway (any node may resume it); one server has
                // no remote of its own in the API.
                return Err(needs_home("pause --push"));
            }
            c.pause(&id, !files_only)?;
            if json {
                return print_json(&c.get(&id)?);
            }
            println!("{id} paused");
            Ok(())
        }
        SandboxCommand::Resume { id, reboot, json } => {
            let (sbx, resumed) = c.connect(&id, None, !reboot)?;
            if !resumed {
                eprintln!("sandbox {} was running already", sbx.sandbox_id);
            }
            if json {
                return print_json(&sbx);
            }
            println!("{}", sbx.sandbox_id);
            Ok(())
        }
        SandboxCommand::Kill { ids } => {
            for id in ids {
                c.kill(&id)?;
                println!("{id} killed");
            }
            Ok(())
        }
        SandboxCommand::Timeout { id, secs } => {
            if secs == 0 {
                return Err(needs_home("timeout 0 (no timeout)"));
            }
            c.set_timeout(&id, secs)?;
            let d = c.get(&id)?;
            println!("{} {}", d.listed.sandbox_id, describe_end(&d));
            Ok(())
        }
        SandboxCommand::Logs { .. } => Err(needs_home("logs")),
        SandboxCommand::Port { .. } => Err(needs_home("port")),
        SandboxCommand::Network(_) => Err(needs_home("network")),
    }
}

fn create(c: &Client, a: CreateArgs) -> Result<()> {
    // What a template decides in E2B's API, or what it has no field for.
    let refused = [
        (a.name.is_some(), "--name"),
        (!matches!(a.runtime, RuntimeArg::Auto), "--runtime"),
        (a.cpus.is_some(), "--cpus"),
        (a.memory.is_some(), "--memory"),
        (a.disk.is_some(), "--disk"),
        (a.no_network, "--no-network"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        return Err(needs_home(&format!("create {flag}")));
    }
    let template_id = match (a.image, a.snapshot) {
        (_, Some(s)) => s,
        (Some(i), None) => i,
        (None, None) => bail!("give an image or --snapshot"),
    };
    let (auto_pause, auto_pause_memory) = match a.on_timeout {
        OnTimeoutArg::Kill => (None, None),
        OnTimeoutArg::Pause => (Some(true), None),
        OnTimeoutArg::PauseFiles => (Some(true), Some(false)),
    };
    let strings = |v: Vec<kiln_network::Dest>| {
        (!v.is_empty()).then(|| v.iter().map(|d| d.to_string()).collect())
    };
    let network = (!a.allow_out.is_empty() || !a.deny_out.is_empty()).then(|| NetworkConfig {
        allow_out: strings(a.allow_out),
        deny_out: strings(a.deny_out),
        ..NetworkConfig::default()
    });
    let req = NewSandbox {
        template_id,
        timeout: Some(a.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS).into()),
        auto_pause,
        auto_pause_memory,
        // As E2B's SDKs ask: the data plane needs the sandbox's access token.
        secure: Some(true),
        allow_internet_access: a.no_internet.then_some(false),
        network,
        metadata: (!a.metadata.is_empty()).then(|| a.metadata.into_iter().collect()),
        env_vars: (!a.env.is_empty()).then(|| a.env.into_iter().collect()),
        ..NewSandbox::default()
    };
    let sbx = c.create(&req)?;
    if a.json {
        return print_json(&sbx);
    }
    println!("{}", sbx.sandbox_id);
    Ok(())
}

fn ls(c: &Client, json: bool) -> Result<()> {
    let mut list = c.list()?;
    if json {
        return print_json(&list);
    }
    // Oldest first, as the local list.
    list.sort_by_key(started_ms);
    list_row(["ID", "NAME", "STATE", "NODE", "SOURCE", "CREATED"]);
    for s in list {
        list_row([
            &s.sandbox_id,
            s.alias.as_deref().unwrap_or("-"),
            state_name(s.state),
            &truncate(&s.client_id, 8),
            &truncate(&s.template_id, 20),
            &age(started_ms(&s)),
        ]);
    }
    Ok(())
}

fn started_ms(s: &ListedSandbox) -> u64 {
    kiln_server::timefmt::parse_rfc3339(&s.started_at).unwrap_or(0)
}

fn state_name(s: SandboxState) -> &'static str {
    match s {
        SandboxState::Running => "running",
        SandboxState::Paused => "paused",
    }
}

fn print_detail(d: &SandboxDetail) {
    let s = &d.listed;
    println!("id:       {}", s.sandbox_id);
    if let Some(n) = &s.alias {
        println!("name:     {n}");
    }
    println!("state:    {}", state_name(s.state));
    println!("node:     {}", s.client_id);
    println!("source:   {}", s.template_id);
    println!(
        "cpus:     {}  memory: {} MiB  disk: {} MiB",
        s.cpu_count, s.memory_mb, s.disk_size_mb
    );
    println!("created:  {} ago", age(started_ms(s)));
    println!("timeout:  {}", describe_end(d));
    let n = &d.network;
    let mut net = vec![format!(
        "internet {}",
        if d.allow_internet_access { "on" } else { "off" }
    )];
    if !n.allow_out.is_empty() {
        net.push(format!("allow {}", n.allow_out.join(",")));
    }
    if !n.deny_out.is_empty() {
        net.push(format!("deny {}", n.deny_out.join(",")));
    }
    println!("network:  {}", net.join("; "));
    let mut needs = Vec::new();
    if d.envd_access_token.is_some() {
        needs.push("envd access token");
    }
    if !n.allow_public_traffic {
        needs.push("traffic access token for its ports");
    }
    if !needs.is_empty() {
        println!("access:   {}", needs.join(", "));
    }
    for (k, v) in &s.metadata {
        println!("meta:     {k}={v}");
    }
}

/// "killed in N s" from the detail's `endAt` ("none" past year 9999, kiln's no deadline).
fn describe_end(d: &SandboxDetail) -> String {
    let Some(end) = kiln_server::timefmt::parse_rfc3339(&d.listed.end_at) else {
        return d.listed.end_at.clone();
    };
    if kiln_server::timefmt::rfc3339(end).starts_with("9999-") {
        return "none".into();
    }
    let left = end.saturating_sub(kiln_runtime::record::now_ms()) / 1000;
    let what = match d.lifecycle.on_timeout {
        SandboxOnTimeout::Kill => "killed",
        SandboxOnTimeout::Pause => "paused",
    };
    format!("{what} in {left} s")
}

fn exec(c: &Client, a: ExecArgs) -> Result<()> {
    if a.cmd.is_empty() {
        bail!("no command given: kiln sandbox --server URL exec ID -- CMD...");
    }
    let tty = a.tty.then(|| {
        let s = terminal_size();
        PtySize {
            cols: s.cols.into(),
            rows: s.rows.into(),
        }
    });
    let raw = if tty.is_some() {
        RawMode::enter()
    } else {
        None
    };
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let end = c.exec(
        &a.id,
        Exec {
            argv: a.cmd,
            env: a.env.into_iter().collect(),
            cwd: a.cwd,
            user: a.user,
            stdin: Some(Box::new(std::io::stdin())),
            // On a terminal ^C goes to the command itself (raw mode).
            end_on_signal: tty.is_none(),
            tty,
        },
        |out| {
            let _ = match out {
                Output::Stderr(b) => stderr.lock().write_all(b),
                Output::Stdout(b) => stdout
                    .lock()
                    .write_all(b)
                    .and_then(|_| stdout.lock().flush()),
            };
        },
    );
    drop(raw);
    let end = match end {
        Err(kiln_server::client::ClientError::Interrupted { signal }) => {
            std::process::exit(128 + signal)
        }
        r => r?,
    };
    let _ = stdout.lock().flush();
    let code = match (
        end.exited,
        kiln_server::envd::process::signal_of(&end.status),
    ) {
        (true, _) => end.exit_code,
        (false, Some(sig)) => 128 + sig,
        (false, None) => 1,
    };
    std::process::exit(code);
}

fn cp(c: &Client, src: &str, dst: &str) -> Result<()> {
    match (sandbox_path(src), sandbox_path(dst)) {
        (None, Some((id, path))) => {
            // E2B's upload takes no mode: the file gets the sandbox's default one.
            let (f, _mode) = copy_in_source(src)?;
            c.write_file(id, path, None, std::io::BufReader::new(f))?;
            Ok(())
        }
        (Some((id, path)), None) => copy_out(path, dst, |w| {
            c.read_file(id, path, None, w)?;
            Ok(())
        }),
        (Some(_), Some(_)) => bail!("copy between two sandboxes: copy out, then in"),
        (None, None) => bail!("one side must be ID:PATH"),
    }
}
