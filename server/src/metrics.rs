//! Sandbox metrics: samples of each running sandbox's CPU, memory and disk
//! ([`kiln_runtime::Sandboxes::usage`]), taken by the daemon every [`PERIOD`] (as E2B's
//! orchestrator exports them every 5 s), kept in memory only, the last [`MAX_SAMPLES`] per
//! sandbox (a restarted daemon starts over). A sandbox's samples stay while it is paused and
//! go with it.
//!
//! CPU is a share of the sandbox's CPUs over the time since the previous sample (envd's
//! `cpu_used_pct`: 100 = every CPU busy); a sandbox's first sample after it starts, restores
//! or the daemon starts comes one sweep (about a second) after it is first seen, measured
//! over that second.

use kiln_runtime::{SandboxRecord, Sandboxes, State, Usage};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a running sandbox is sampled.
pub const PERIOD: Duration = Duration::from_secs(5);
/// Samples kept per sandbox: 4 hours at [`PERIOD`] (48 bytes each, ~140 KiB a sandbox).
pub const MAX_SAMPLES: usize = 2880;
/// How soon after a sandbox is first seen running its first sample is taken.
const FIRST_AFTER: Duration = Duration::from_millis(900);

/// One sample of one sandbox.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Unix seconds.
    pub at_secs: u64,
    pub cpu_count: u32,
    /// 0..=100, two decimals.
    pub cpu_used_pct: f32,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// Where the CPU share of the next sample is measured from.
struct Baseline {
    /// The record's generation: a restore starts the sandbox's cgroups (and CPU time) anew.
    generation: u64,
    cpu_ns: u64,
    at: Instant,
    /// When the next sample is due.
    due: Instant,
}

impl Baseline {
    /// The share of `rec`'s CPUs its processes used from this baseline to `usage` read at
    /// `now` (0..=100, two decimals).
    fn cpu_used_pct(&self, usage: &Usage, now: Instant, rec: &SandboxRecord) -> f32 {
        let wall = now.saturating_duration_since(self.at).as_nanos().max(1) as f64;
        let used = usage.cpu_ns.saturating_sub(self.cpu_ns) as f64;
        let pct = used * 100.0 / (wall * f64::from(rec.cpus.max(1)));
        ((pct.clamp(0.0, 100.0) * 100.0).round() / 100.0) as f32
    }
}

/// The sample of `rec` from `usage` read at `at_secs` with CPU share `cpu_used_pct`.
fn sample(rec: &SandboxRecord, usage: &Usage, at_secs: u64, cpu_used_pct: f32) -> Sample {
    Sample {
        at_secs,
        cpu_count: rec.cpus.max(1),
        cpu_used_pct,
        mem_used: usage.mem_used,
        mem_total: rec.memory_mib.saturating_mul(1 << 20),
        mem_cache: usage.mem_cache,
        disk_used: usage.disk_used,
        disk_total: usage.disk_total,
    }
}

#[derive(Default)]
struct Series {
    samples: VecDeque<Sample>,
    baseline: Option<Baseline>,
}

/// Every sandbox's samples.
#[derive(Default)]
pub struct Metrics {
    series: Mutex<HashMap<String, Series>>,
}

impl Metrics {
    /// Takes the samples that are due of the sandboxes in `list` (every sandbox there is;
    /// samples of sandboxes not in it are dropped). Blocking: reads the sandboxes' cgroups.
    pub fn sweep(&self, sandboxes: &Sandboxes, list: &[SandboxRecord]) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
            series.retain(|id, _| list.iter().any(|r| r.id == *id));
            for rec in list {
                let s = series.entry(rec.id.clone()).or_default();
                let running = rec.state == State::Running && rec.op.is_none();
                match &s.baseline {
                    _ if !running => s.baseline = None,
                    Some(b) if b.generation == rec.generation && now < b.due => {}
                    _ => due.push(rec),
                }
            }
        }
        // Read outside the lock: queries are answered meanwhile.
        let read: Vec<_> = due
            .into_iter()
            .filter_map(|rec| Some((rec, sandboxes.usage(rec)?)))
            .collect();
        let now = Instant::now();
        let at_secs = kiln_runtime::record::now_ms() / 1000;
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for (rec, usage) in read {
            let Some(s) = series.get_mut(&rec.id) else {
                continue;
            };
            let fresh = |due| Baseline {
                generation: rec.generation,
                cpu_ns: usage.cpu_ns,
                at: now,
                due,
            };
            let b = match s.baseline.take() {
                Some(b) if b.generation == rec.generation && b.cpu_ns <= usage.cpu_ns => b,
                // First seen, or restored since: measure from here.
                _ => {
                    s.baseline = Some(fresh(now + FIRST_AFTER));
                    continue;
                }
            };
            if s.samples.len() == MAX_SAMPLES {
                s.samples.pop_front();
            }
            s.samples.push_back(sample(
                rec,
                &usage,
                at_secs,
                b.cpu_used_pct(&usage, now, rec),
            ));
            s.baseline = Some(fresh(now + PERIOD));
        }
    }

    /// A sample of sandbox `rec` taken now (envd's `GET /metrics`), its CPU share measured
    /// since the sweep's last reading (0 when there is none yet for this run of the sandbox);
    /// None when the sandbox does not run. Blocking: reads the sandbox's cgroups. Leaves the
    /// series as it is.
    pub fn now(&self, sandboxes: &Sandboxes, rec: &SandboxRecord) -> Option<Sample> {
        let usage = sandboxes.usage(rec)?;
        let now = Instant::now();
        let pct = {
            let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
            match series.get(&rec.id).and_then(|s| s.baseline.as_ref()) {
                Some(b) if b.generation == rec.generation && b.cpu_ns <= usage.cpu_ns => {
                    b.cpu_used_pct(&usage, now, rec)
                }
                _ => 0.0,
            }
        };
        Some(sample(
            rec,
            &usage,
            kiln_runtime::record::now_ms() / 1000,
            pct,
        ))
    }

    /// The samples of sandbox `id` taken at `start..=end` (Unix seconds; default: from its
    /// first sample, to its last).
    pub fn range(&self, id: &str, start: Option<u64>, end: Option<u64>) -> Vec<Sample> {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = series.get(id) else {
            return Vec::new();
        };
        let start = start.unwrap_or(0);
        let end = end.unwrap_or(u64::MAX);
        s.samples
            .iter()
            .filter(|x| (start..=end).contains(&x.at_secs))
            .copied()
            .collect()
    }

    /// The latest sample of sandbox `id`, if it has one.
    pub fn latest(&self, id: &str) -> Option<Sample> {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series.get(id)?.samples.back().copied()
    }
}

/// E2B's step for a range of `secs` (its API returns fewer than 1,000 points): 5 s under an
/// hour, then 30 s, 1 min, 2 min, 5 min, 15 min from a week.
pub fn step_secs(secs: u64) -> u64 {
    const HOUR: u64 = 3600;
    match secs {
        s if s < HOUR => 5,
        s if s < 6 * HOUR => 30,
        s if s < 12 * HOUR => 60,
        s if s < 24 * HOUR => 120,
        s if s < 7 * 24 * HOUR => 300,
        _ => 900,
    }
}

/// `samples` (in time order) in buckets of `step` seconds aligned to the epoch, each field
/// the bucket's largest and the bucket's start its time, as E2B's query groups them.
pub fn buckets(samples: &[Sample], step: u64) -> Vec<Sample> {
    let step = step.max(1);
    let mut out: Vec<Sample> = Vec::new();
    for s in samples {
        let at = s.at_secs - s.at_secs % step;
        match out.last_mut() {
            Some(b) if b.at_secs == at => {
                b.cpu_count = b.cpu_count.max(s.cpu_count);
                b.cpu_used_pct = b.cpu_used_pct.max(s.cpu_used_pct);
                b.mem_used = b.mem_used.max(s.mem_used);
                b.mem_total = b.mem_total.max(s.mem_total);
                b.mem_cache = b.mem_cache.max(s.mem_cache);
                b.disk_used = b.disk_used.max(s.disk_used);
                b.disk_total = b.disk_total.max(s.disk_total);
            }
            _ => out.push(Sample { at_secs: at, ..*s }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_secs: u64, cpu: f32, mem: u64) -> Sample {
        Sample {
            at_secs,
            cpu_count: 1,
            cpu_used_pct: cpu,
            mem_used: mem,
            mem_total: 100,
            mem_cache: 0,
            disk_used: 0,
            disk_total: 0,
        }
    }

    #[test]
    fn buckets_take_each_fields_maximum_at_the_buckets_start() {
        let s = [
            at(100, 5.0, 1),
            at(104, 1.0, 9),
            at(105, 2.0, 2),
            at(131, 0.5, 3),
        ];
        let b = buckets(&s, 5);
        assert_eq!(
            b.iter().map(|x| x.at_secs).collect::<Vec<_>>(),
            [100, 105, 130]
        );
        assert_eq!((b[0].cpu_used_pct, b[0].mem_used), (5.0, 9));
        let b = buckets(&s, 30);
        assert_eq!(b.len(), 2, "buckets at 90 and 120: {b:?}");
        assert_eq!(buckets(&s, 900).len(), 1);
    }

    #[test]
    fn steps_follow_e2b() {
        assert_eq!(step_secs(0), 5);
        assert_eq!(step_secs(3599), 5);
        assert_eq!(step_secs(3600), 30);
        assert_eq!(step_secs(86_400), 300);
        assert_eq!(step_secs(u64::MAX), 900);
    }
}
