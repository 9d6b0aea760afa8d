//! `iscsictl`: the control-plane process. It reads the dataplane's control segment; it never
//! makes the dataplane wait.
//!
//! Commands today: `status` and `stats` (with `--json`, and `--watch SECONDS` for stats).
//! Changing targets, LUNs and access rules arrives with the command ring.

use control::{segment_path, ReactorStats, Segment, LATENCY_BUCKETS};
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

const USAGE: &str = "\
usage: iscsictl [--instance NAME] [--json] COMMAND

commands:
  status                 the dataplane: pid, uptime, heartbeat, reactors
  stats [--watch SECS]   commands, bytes, errors and latency, per reactor and in total
  version                this tool's version and control ABI

--instance NAME selects the dataplane started with the same --instance (default: default).
";

struct Args {
    instance: String,
    json: bool,
    command: String,
    watch: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        instance: "default".into(),
        json: false,
        command: String::new(),
        watch: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--instance" => a.instance = it.next().ok_or("--instance needs a name")?,
            "--json" => a.json = true,
            "--watch" => {
                let v = it.next().ok_or("--watch needs seconds")?;
                a.watch = Some(
                    v.parse()
                        .ok()
                        .filter(|&s| s > 0)
                        .ok_or(format!("--watch {v}: expected whole seconds > 0"))?,
                );
            }
            "-h" | "--help" | "help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            c if !c.starts_with('-') && a.command.is_empty() => a.command = c.to_string(),
            other => return Err(format!("unexpected argument {other:?}\n{USAGE}")),
        }
    }
    if a.command.is_empty() {
        return Err(USAGE.to_string());
    }
    Ok(a)
}

fn open(instance: &str) -> Result<Segment, String> {
    Segment::open(&segment_path(instance)).map_err(|e| e.to_string())
}

fn status(seg: &Segment, as_json: bool) {
    let h = seg.header();
    let pid = h.pid.load(Ordering::Relaxed);
    let start_ms = h.start_unix_ms.load(Ordering::Relaxed);
    let beat_ms = h.heartbeat_ms.load(Ordering::Acquire);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let uptime_ms = now_ms.saturating_sub(start_ms);
    let beat_age_ms = uptime_ms.saturating_sub(beat_ms);
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    let state = if !alive {
        "stopped"
    } else if beat_age_ms > 5_000 {
        "not responding"
    } else {
        "running"
    };
    if as_json {
        println!(
            "{}",
            json!({
                "instance_segment": seg.path().display().to_string(),
                "pid": pid,
                "state": state,
                "uptime_ms": uptime_ms,
                "heartbeat_age_ms": beat_age_ms,
                "reactors": seg.reactors(),
                "abi_version": control::ABI_VERSION,
            })
        );
    } else {
        let rows = [
            ("segment", seg.path().display().to_string()),
            ("state", state.to_string()),
            ("pid", pid.to_string()),
            ("uptime", format!("{:.1} s", uptime_ms as f64 / 1000.0)),
            ("heartbeat", format!("{beat_age_ms} ms ago")),
            ("reactors", seg.reactors().to_string()),
        ];
        for (k, v) in rows {
            println!("{k:<10} {v}");
        }
    }
}

fn stats_json(per: &[ReactorStats], total: &ReactorStats) -> serde_json::Value {
    let one = |s: &ReactorStats| {
        json!({
            "connections": s.connections,
            "sessions": s.sessions,
            "commands": s.commands,
            "read_commands": s.read_commands,
            "write_commands": s.write_commands,
            "read_bytes": s.read_bytes,
            "write_bytes": s.write_bytes,
            "errors": s.errors,
            "latency_us_buckets": (0..LATENCY_BUCKETS)
                .map(|i| json!({"below_us": 1u64 << i, "count": s.latency[i]}))
                .collect::<Vec<_>>(),
        })
    };
    json!({
        "reactors": per.iter().map(one).collect::<Vec<_>>(),
        "total": one(total),
    })
}

/// The latency below which `q` of the commands completed, from the histogram.
fn percentile_us(s: &ReactorStats, q: f64) -> Option<u64> {
    let n: u64 = s.latency.iter().sum();
    if n == 0 {
        return None;
    }
    let want = (n as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (i, c) in s.latency.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Some(1u64 << i);
        }
    }
    None
}

fn stats_table(per: &[ReactorStats], total: &ReactorStats) {
    println!(
        "{:<8} {:>6} {:>8} {:>12} {:>12} {:>12} {:>14} {:>14} {:>8} {:>10} {:>10}",
        "reactor",
        "conns",
        "sessions",
        "commands",
        "reads",
        "writes",
        "read bytes",
        "write bytes",
        "errors",
        "p50 <us",
        "p99 <us"
    );
    let row = |name: String, s: &ReactorStats| {
        let p = |q| percentile_us(s, q).map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:<8} {:>6} {:>8} {:>12} {:>12} {:>12} {:>14} {:>14} {:>8} {:>10} {:>10}",
            name,
            s.connections,
            s.sessions,
            s.commands,
            s.read_commands,
            s.write_commands,
            s.read_bytes,
            s.write_bytes,
            s.errors,
            p(0.5),
            p(0.99)
        );
    };
    for (i, s) in per.iter().enumerate() {
        row(i.to_string(), s);
    }
    row("total".into(), total);
}

fn stats(seg: &Segment, as_json: bool) -> Result<(), String> {
    let per: Vec<ReactorStats> = (0..seg.reactors())
        .map(|i| {
            seg.read_stats(i)
                .ok_or_else(|| format!("reactor {i}: statistics stayed busy; try again"))
        })
        .collect::<Result<_, _>>()?;
    let mut total = ReactorStats::default();
    for s in &per {
        total.add(s);
    }
    if as_json {
        println!("{}", stats_json(&per, &total));
    } else {
        stats_table(&per, &total);
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let a = parse_args()?;
    match a.command.as_str() {
        "version" => {
            println!(
                "iscsictl {} (control ABI v{})",
                env!("CARGO_PKG_VERSION"),
                control::ABI_VERSION
            );
            Ok(())
        }
        "status" => {
            status(&open(&a.instance)?, a.json);
            Ok(())
        }
        "stats" => {
            let seg = open(&a.instance)?;
            match a.watch {
                None => stats(&seg, a.json),
                Some(secs) => loop {
                    stats(&seg, a.json)?;
                    std::thread::sleep(Duration::from_secs(secs));
                    if !a.json {
                        println!();
                    }
                },
            }
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iscsictl: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_the_histogram() {
        let mut s = ReactorStats::default();
        assert_eq!(percentile_us(&s, 0.5), None);
        for us in [10, 20, 30, 40, 1000] {
            s.record_latency(us);
        }
        assert_eq!(percentile_us(&s, 0.5), Some(32));
        assert_eq!(percentile_us(&s, 0.99), Some(1024));
    }

    #[test]
    fn json_totals() {
        let a = ReactorStats {
            commands: 3,
            ..ReactorStats::default()
        };
        let v = stats_json(
            &[a.clone(), a.clone()],
            &ReactorStats {
                commands: 6,
                ..ReactorStats::default()
            },
        );
        assert_eq!(v["total"]["commands"], 6);
        assert_eq!(v["reactors"][1]["commands"], 3);
    }
}
