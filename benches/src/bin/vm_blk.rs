//! Guest block I/O through `kiln vm run` (virtio-blk, io_uring engine, O_DIRECT) against fio
//! with io_uring on the same backing file in the same run: 4 KiB random reads at QD32 (IOPS)
//! and 128 KiB sequential reads at QD32 (MB/s); then the same guest runs over a warm block-store
//! overlay of the same data. The in-guest driver is the test guest's `kt.mode=bench`; its
//! timing uses the TSC, whose rate is measured on the host.
//!
//! The random-read comparison runs `--rounds` times (fio, then the guest, alternating) and
//! reports the median of the per-round ratios: other load on a shared host moves single runs
//! by +-30%.
//!
//! `cargo run --release -p kiln-benches --bin vm_blk [-- --size-mb 256 --secs 4 --rounds 5]`
//! (backing file under $KILN_BENCH_DIR, default /var/tmp: a real disk, not tmpfs;
//! `--blkidle US` is passed to the guest as kt.blkidle=, 0 = the guest spins, never idles;
//! `--rand-only` stops after the random-read rounds)

use kiln_benches::{arg, median};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kiln_next_to_me() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return p.into();
    }
    let p = std::env::current_exe()
        .expect("current_exe")
        .with_file_name("kiln");
    if p.exists() {
        return p;
    }
    kiln_tests::kiln_bin()
}

/// Host TSC rate (Hz): the guest reports TSC cycles, and KVM runs it at the host's rate.
fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let r = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), r());
    std::thread::sleep(Duration::from_millis(300));
    let (c1, t1) = (r(), Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

/// fio on `file`: returns (IOPS, MB/s).
fn fio(file: &Path, rw: &str, bs: u32, secs: u64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("fio")
        .args([
            "--name=kiln",
            "--ioengine=io_uring",
            "--iodepth=32",
            "--direct=1",
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--time_based",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let read = &v["jobs"][0]["read"];
    Ok((
        read["iops"].as_f64().unwrap_or(0.0),
        read["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    ))
}

/// The test guest's benchmark against `disk` (a file or a blob name): (IOPS, MB/s).
#[allow(clippy::too_many_arguments)] // one flat call per benchmark row reads best here
fn guest(
    kiln: &Path,
    home: &Path,
    disk: &str,
    random: bool,
    bs: u64,
    n: u64,
    span: u64,
    hz: f64,
) -> anyhow::Result<(f64, f64)> {
    let mut cmdline = format!(
        "kt.mode=bench kt.bench={} kt.bs={bs} kt.qd=32 kt.n={n} kt.span={span} kt.exit=1",
        if random { "rand" } else { "seq" }
    );
    if let Some(us) = std::env::args().skip_while(|a| a != "--blkidle").nth(1) {
        cmdline.push_str(&format!(" kt.blkidle={us}"));
    }
    let out = Command::new(kiln)
        .env("KILN_HOME", home)
        .args([
            "vm", "run", "--entry", "user", "--mem", "64", "--disk", disk,
        ])
        .arg("--kernel")
        .arg(kiln_testguest::elf_path())
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "guest run failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = text
        .lines()
        .find_map(|l| l.strip_prefix("kt: bench done "))
        .ok_or_else(|| anyhow::anyhow!("no bench result in guest output:\n{text}"))?;
    let v: serde_json::Value = serde_json::from_str(json)?;
    anyhow::ensure!(v["errors"] == 0, "guest saw I/O errors: {v}");
    let reqs = v["requests"].as_f64().unwrap_or(0.0);
    let secs = v["tsc_cycles"].as_f64().unwrap_or(f64::NAN) / hz;
    Ok((reqs / secs, reqs * bs as f64 / secs / 1e6))
}

fn main() -> anyhow::Result<()> {
    if !kiln_benches::kvm_usable() {
        eprintln!("SKIP: /dev/kvm not usable");
        return Ok(());
    }
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("SKIP: fio is not installed (apt-get install fio)");
        return Ok(());
    }
    let size = arg("--size-mb", 256) << 20;
    let secs = arg("--secs", 4);
    let base = std::env::var_os("KILN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or("/var/tmp".into());
    let dir = tempfile::tempdir_in(&base)?;
    let home = dir.path().join("home");
    let kiln = kiln_next_to_me();
    let file = dir.path().join("disk.img");
    {
        // Real data (no holes), flushed, so both sides read the device.
        let mut f = std::fs::File::create(&file)?;
        let chunk = kiln_tests::pseudo_random(4 << 20, 1);
        for _ in 0..size / chunk.len() as u64 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    let hz = tsc_hz();
    let fstr = file.to_str().unwrap();

    // Size the guest runs to take about as long as fio's.
    let rounds = arg("--rounds", 5u32).max(1);
    let (mut fio_runs, mut guest_runs, mut ratios) = (vec![], vec![], vec![]);
    let mut n_rand = 0;
    for _ in 0..rounds {
        let (f, _) = fio(&file, "randread", 4096, secs)?;
        n_rand = ((f * secs as f64) as u64).clamp(10_000, 2_000_000);
        let (g, _) = guest(&kiln, &home, fstr, true, 4096, n_rand, size, hz)?;
        fio_runs.push(f.round());
        guest_runs.push(g.round());
        ratios.push(g / f);
    }
    let ratio = median(ratios.clone());
    let (fio_iops, g_iops) = (median(fio_runs.clone()), median(guest_runs.clone()));
    if std::env::args().any(|a| a == "--rand-only") {
        let out = serde_json::json!({
            "bench": "vm_blk",
            "randread_4k_qd32": {
                "fio_iops": fio_iops, "guest_raw_iops": g_iops, "guest_raw_ratio": ratio,
                "rounds": { "fio_iops": fio_runs, "guest_raw_iops": guest_runs, "ratio": ratios },
            },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let (_, fio_mbs) = fio(&file, "read", 128 << 10, secs)?;
    let n_seq = ((fio_mbs * 1e6 * secs as f64 / (128 << 10) as f64) as u64).clamp(1000, 1_000_000);
    let (_, g_mbs) = guest(&kiln, &home, fstr, false, 128 << 10, n_seq, size, hz)?;

    // The same data as a blob, booted through an overlay; one full sequential pass warms it.
    let st = Command::new(&kiln)
        .env("KILN_HOME", &home)
        .args(["store", "put", fstr, "--name", "benchdisk"])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "kiln store put failed");
    guest(
        &kiln,
        &home,
        "benchdisk",
        false,
        128 << 10,
        size / (128 << 10),
        size,
        hz,
    )?;
    let (o_iops, _) = guest(&kiln, &home, "benchdisk", true, 4096, n_rand, size, hz)?;
    let (_, o_mbs) = guest(&kiln, &home, "benchdisk", false, 128 << 10, n_seq, size, hz)?;

    let out = serde_json::json!({
        "bench": "vm_blk",
        "disk_bytes": size,
        "tsc_hz": hz,
        "randread_4k_qd32": {
            "fio_iops": fio_iops,
            "guest_raw_iops": g_iops,
            "guest_raw_ratio": ratio,
            "rounds": { "fio_iops": fio_runs, "guest_raw_iops": guest_runs, "ratio": ratios },
            "guest_overlay_warm_iops": o_iops,
            "guest_overlay_ratio": o_iops / fio_iops,
        },
        "seqread_128k_qd32": {
            "fio_mbs": fio_mbs,
            "guest_raw_mbs": g_mbs,
            "guest_raw_ratio": g_mbs / fio_mbs,
            "guest_overlay_warm_mbs": o_mbs,
            "guest_overlay_ratio": o_mbs / fio_mbs,
        },
        "goal_ratio": 0.9,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
