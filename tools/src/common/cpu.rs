//! The CPU a run used, from Linux `/proc`: this tool's process, the server's (when its pid is
//! known) and the whole machine's, so a report shows how much of the machine other work took.
//! Where `/proc` cannot be read the figures are `None` and print as `n/a`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::percentiles::round2;

/// `/proc` counts in ticks of USER_HZ, which is 100 on every Linux the tools target.
fn ticks(n: u64) -> Duration {
    Duration::from_millis(n * 10)
}

/// CPU time (user + system) a process (`self` or a pid) has used so far, from `/proc/<pid>/stat`.
pub fn process_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    read_process_time(&stat)
}

fn read_process_time(stat: &str) -> Option<Duration> {
    // The command name (field 2) may contain spaces, so count the fields after its ')'. They
    // start at field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ticks(utime + stime))
}

/// The whole machine's CPU time so far, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineTime {
    /// user, nice, system, irq and softirq: not idle, not waiting for I/O, not stolen.
    pub busy: Duration,
    /// Time the hypervisor gave to other guests.
    pub steal: Duration,
}

pub fn machine_time() -> Option<MachineTime> {
    read_machine_time(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn read_machine_time(stat: &str) -> Option<MachineTime> {
    let counts: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = counts[..] else {
        return None;
    };
    Some(MachineTime {
        busy: ticks(user + nice + system + irq + softirq),
        steal: ticks(steal),
    })
}

/// `/proc/loadavg`'s three load averages, e.g. `2.41 1.98 1.50`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The machine's cores, as the tools report them.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Started before the measured part of a run, finished after it.
pub struct CpuMeter {
    at: Instant,
    own: Option<Duration>,
    server_pid: Option<String>,
    server: Option<Duration>,
    machine: Option<MachineTime>,
}

/// Percent of one core each consumer used between `start` and `finish`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// This tool.
    pub own: Option<f64>,
    pub server: Option<f64>,
    /// The whole machine, steal excluded.
    pub machine: Option<f64>,
    pub steal: Option<f64>,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> CpuMeter {
        let server_pid = server_pid.map(|p| p.to_string());
        CpuMeter {
            at: Instant::now(),
            own: process_time("self"),
            server: server_pid.as_deref().and_then(process_time),
            server_pid,
            machine: machine_time(),
        }
    }

    pub fn finish(&self) -> CpuUse {
        let wall = self.at.elapsed();
        let server_now = self.server_pid.as_deref().and_then(process_time);
        let machine_now = machine_time();
        CpuUse {
            own: percent(self.own, process_time("self"), wall),
            server: percent(self.server, server_now, wall),
            machine: percent(
                self.machine.map(|m| m.busy),
                machine_now.map(|m| m.busy),
                wall,
            ),
            steal: percent(
                self.machine.map(|m| m.steal),
                machine_now.map(|m| m.steal),
                wall,
            ),
        }
    }
}

/// `now - before` in percent of `wall`, rounded to hundredths.
fn percent(before: Option<Duration>, now: Option<Duration>, wall: Duration) -> Option<f64> {
    let used = now?.checked_sub(before?)?;
    Some(round2(
        100.0 * used.as_secs_f64() / wall.as_secs_f64().max(1e-3),
    ))
}

impl CpuUse {
    /// A percentage as the reports print it: `37%`, or `n/a`.
    fn show(percent: Option<f64>) -> String {
        percent.map_or("n/a".to_string(), |p| format!("{p:.0}%"))
    }

    /// `server 96%, baton-load 8%, whole machine 152% of 200% (steal 0%); percent of one core`
    pub fn line_with_machine(&self, tool: &str) -> String {
        format!(
            "server {}, {tool} {}, whole machine {} of {}% (steal {}); percent of one core",
            CpuUse::show(self.server),
            CpuUse::show(self.own),
            CpuUse::show(self.machine),
            cores() * 100,
            CpuUse::show(self.steal),
        )
    }

    /// `server 16%, baton-fanout 2% (percent of one core; the machine has 2); load average 4.39 2.75 2.29`
    pub fn line_with_load_average(&self, tool: &str) -> String {
        format!(
            "server {}, {tool} {} (percent of one core; the machine has {}); load average {}",
            CpuUse::show(self.server),
            CpuUse::show(self.own),
            cores(),
            load_average()
        )
    }

    /// `{"server", "load", "machine", "steal"}`.
    pub fn json(&self) -> Value {
        json!({
            "server": self.server,
            "load": self.own,
            "machine": self.machine,
            "steal": self.steal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files() {
        let stat = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(read_process_time(stat), Some(Duration::from_secs(3)));
        assert_eq!(read_process_time("garbage"), None);
        let machine = "cpu  100 5 45 9000 30 10 40 7 0 0\ncpu0 1 2 3\n";
        assert_eq!(
            read_machine_time(machine),
            Some(MachineTime {
                busy: Duration::from_secs(2),
                steal: Duration::from_millis(70),
            })
        );
        assert_eq!(read_machine_time("cpu 1 2"), None);
    }

    #[test]
    fn percents() {
        let s = Duration::from_secs;
        assert_eq!(percent(Some(s(1)), Some(s(2)), s(4)), Some(25.0));
        assert_eq!(percent(Some(s(2)), Some(s(1)), s(4)), None);
        assert_eq!(percent(None, Some(s(1)), s(4)), None);
        let used = CpuUse {
            own: Some(8.4),
            server: Some(96.3),
            machine: None,
            steal: Some(0.0),
        };
        assert_eq!(
            used.line_with_machine("tool"),
            format!(
                "server 96%, tool 8%, whole machine n/a of {}% (steal 0%); percent of one core",
                cores() * 100
            )
        );
        assert!(
            used.line_with_load_average("tool")
                .starts_with("server 96%, tool 8% (percent of one core; the machine has ")
        );
        // This process can read its own figures on Linux.
        let used = CpuMeter::start(None).finish();
        assert!(used.own.is_some() && used.server.is_none());
    }
}
