//! CPU time and peak memory of this process and of others (Mosquitto, the publisher), read
//! from `/proc`. Linux only, like the gateway's deployment targets.

use std::time::{Duration, Instant};

/// Clock ticks per second of the `utime`/`stime` fields: `USER_HZ`, which the kernel fixes at
/// 100 for everything it reports through `/proc`, whatever its internal tick rate.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads, including those that have ended) of process `pid`,
/// or of this process for `None`.
pub fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain numbers.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), counted from 1 with the name as field 2.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / USER_HZ))
}

/// A point from which to measure CPU use as a share of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    wall: Instant,
    cpu: Option<Duration>,
}

impl CpuMark {
    pub fn now(pid: Option<u32>) -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu_time(pid),
        }
    }

    /// CPU used since `self` as a percentage of one core (100 = one core busy all the time).
    pub fn percent_until(&self, later: &Self) -> Option<f64> {
        let wall = later.wall.duration_since(self.wall).as_secs_f64();
        let cpu = later.cpu?.checked_sub(self.cpu?)?.as_secs_f64();
        (wall > 0.0).then(|| 100.0 * cpu / wall)
    }
}

/// Resets the kernel's peak-RSS counter of this process, so the next reading is the peak
/// from now on.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory (VmHWM) in MiB of process `pid`, or of this process for `None`.
pub fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path).ok().and_then(|status| {
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_a_peak_rss() {
        let start = CpuMark::now(None);
        let mut x = 0u64;
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let end = CpuMark::now(None);
        let percent = start.percent_until(&end).expect("readable /proc/self/stat");
        assert!(percent >= 0.0, "{percent}");
        assert!(peak_rss_mb(None).expect("readable /proc/self/status") > 0.0);
        assert!(cpu_time(Some(u32::MAX)).is_none());
    }
}
