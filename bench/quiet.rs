//! Keeping other work on the machine out of the figures: how much CPU other processes took
//! during a measurement, waiting for a quiet machine, and a higher priority for the bench.
//!
//! On a 2-core machine a concurrent build moves every figure by tens of percent. "Other
//! processes" are user-space processes outside the bench's own process tree; kernel threads
//! are left out because most of their work here is ours (write-back of cache files, loopback
//! softirqs).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Others' CPU share above which a measurement round counts as disturbed.
pub const DISTURBED: f64 = 0.10;

/// CPU time counters at one moment.
pub struct CpuSnapshot {
    /// All CPU time of the machine (every state, every core), in clock ticks.
    total: u64,
    steal: u64,
    /// Other processes: pid -> own + waited-for children's CPU ticks.
    others: HashMap<u32, u64>,
}

impl CpuSnapshot {
    pub fn take() -> CpuSnapshot {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let get = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total = (0..8).map(get).sum();
        let ours = crate::contestants::descendants(std::process::id());
        let mut others = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if ours.contains(&pid) {
                    continue;
                }
                if let Some((ppid, ticks)) = proc_ticks(pid) {
                    // pid 2 is kthreadd, the parent of every kernel thread.
                    if pid != 2 && ppid != 2 {
                        others.insert(pid, ticks);
                    }
                }
            }
        }
        CpuSnapshot {
            total,
            steal: get(7),
            others,
        }
    }

    /// (share of the machine's CPU time other processes used since this snapshot, share
    /// stolen by the host).
    pub fn others_since(&self) -> (f64, f64) {
        let now = CpuSnapshot::take();
        let total = now.total.saturating_sub(self.total).max(1) as f64;
        let used: u64 = now
            .others
            .iter()
            .map(|(pid, t)| t.saturating_sub(self.others.get(pid).copied().unwrap_or(0)))
            .sum();
        let steal = now.steal.saturating_sub(self.steal) as f64;
        ((used as f64 / total).min(1.0), steal / total)
    }
}

/// (parent pid, utime + stime + cutime + cstime) of a process, in clock ticks.
fn proc_ticks(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    // After "pid (comm) ": state is field 3, ppid 4, utime 14, stime 15, cutime 16, cstime 17.
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((num(4) as u32, num(14) + num(15) + num(16) + num(17)))
}

/// Waits until other processes leave the CPU idle (under [`DISTURBED`] for two 1 s windows in
/// a row), at most `limit`.
pub fn wait_idle(limit: Duration) {
    if limit.is_zero() {
        return;
    }
    let deadline = Instant::now() + limit;
    let mut quiet = 0;
    let mut said = false;
    while Instant::now() < deadline {
        let snap = CpuSnapshot::take();
        std::thread::sleep(Duration::from_secs(1));
        let (others, _) = snap.others_since();
        quiet = if others < DISTURBED { quiet + 1 } else { 0 };
        if quiet >= 2 {
            return;
        }
        if !said {
            println!(
                "  (waiting up to {} s for other processes to leave the CPU: they use {:.0} %)",
                limit.as_secs(),
                others * 100.0
            );
            said = true;
        }
    }
    println!("  (the machine did not become idle; going on)");
}

/// `renice` this process; false when not allowed. Call it before any thread exists: nice is
/// per thread on Linux, and threads and children inherit it from their creator.
pub fn renice(level: i32) -> bool {
    Command::new("renice")
        .args([
            "-n",
            &level.to_string(),
            "-p",
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
