//! Process start -> the test guest's first serial line, through the real `kiln vm run` binary
//! (fork/exec, KVM setup, ELF load, vCPU entry, serial). Median over N runs, plus the process
//! exec baseline (`kiln --version`) measured in the same run.
//!
//! `cargo run --release -p kiln-benches --bin vm_boot [-- --runs 30]`

use kiln_benches::arg;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    if !kiln_benches::kvm_usable() {
        eprintln!("SKIP: /dev/kvm not usable");
        return Ok(());
    }
    let runs = arg("--runs", 30);
    let kiln = kiln_tests::kiln_bin();
    let guest = kiln_testguest::elf_path();
    let home = tempfile::tempdir()?;
    let mut first_line = Vec::new();
    let mut total = Vec::new();
    let mut exec = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let st = Command::new(&kiln)
            .arg("--version")
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success());
        exec.push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        let mut child = Command::new(&kiln)
            .env("KILN_HOME", home.path())
            .args([
                "vm",
                "run",
                "--entry",
                "user",
                "--mem",
                "64",
                "--id",
                &format!("b{i}"),
            ])
            .arg("--kernel")
            .arg(guest)
            .args(["--cmdline", "kt.exit=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = child.stdout.take().unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 256];
        let mut seen = None;
        loop {
            let n = out.read(&mut byte)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&byte[..n]);
            if seen.is_none() && buf.contains(&b'\n') {
                seen = Some(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let st = child.wait()?;
        total.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(st.success(), "VM run {i} failed");
        let line = String::from_utf8_lossy(&buf);
        anyhow::ensure!(
            line.starts_with(kiln_testguest::BANNER),
            "unexpected first line: {line}"
        );
        first_line.push(seen.expect("a first line"));
    }
    let out = serde_json::json!({
        "bench": "vm_boot",
        "runs": runs,
        "guest": "kiln-testguest (entry=user, 64 MiB)",
        "first_serial_line_ms": {
            "median": percentile(&mut first_line, 0.5),
            "p90": percentile(&mut first_line, 0.9),
            "min": percentile(&mut first_line, 0.0),
        },
        "process_exit_ms_median": percentile(&mut total, 0.5),
        "exec_baseline_ms_median": percentile(&mut exec, 0.5),
        "goal_ms": 10.0,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
