//! `iscsictl`: the control-plane process. It reads the dataplane's control segment; it never
//! makes the dataplane wait.
//!
//! `status` and `stats` read the segment directly (`stats --watch SECONDS`); `ping`,
//! `targets`, `sessions` and `lun resize` go through the command ring and wait for the
//! dataplane's answer. Every read command takes `--json`; human output is aligned tables.

use control::{segment_path, ObjectKind, ObjectStats, ReactorStats, Segment, LATENCY_BUCKETS};
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

const USAGE: &str = "\
usage: iscsictl [--instance NAME] [--json] COMMAND

commands:
  status                 the dataplane: pid, uptime, heartbeat, reactors, bad records
  stats [--watch SECS] [--prometheus]
                         commands, bytes, errors and latency: per reactor and in total,
                         per LUN and per connection (--prometheus: Prometheus text format,
                         e.g. for node_exporter's textfile collector)
  ping                   a round trip through the command ring
  targets | target list  the targets, their LUNs and mappings
  sessions               the logged-in sessions (TSIH, initiator, ISID, target)
  connections            every connection: reactor, transport, peer, initiator, target,
                         phase, commands in progress, idle time (parked ones counted)
  target add NAME --pg TAG --ig TAG --lun SPEC [--lun SPEC ...] [--alias A] [--queue-depth N]
                         a new target on an existing portal group and initiator group;
                         SPEC: N:malloc:SIZE[:BLOCK], N:null:SIZE[:BLOCK], N:file:PATH[:SIZE]
                         (a new bdev TARGET/lunN) or N:bdev:NAME (an existing free bdev)
  target del NAME [--keep-bdevs]
                         removes a target: its sessions get an Async Message and are
                         closed, its LUNs finish their commands, its bdevs close (or stay
                         defined and free with --keep-bdevs)
  lun add TARGET SPEC    a LUN on a running target (sessions get REPORTED LUNS DATA HAS
                         CHANGED)
  lun del TARGET LUN [--keep-bdev]
                         removes a LUN once its commands have finished
  lun resize TARGET LUN SIZE
                         a LUN's new size (bytes, or 512M, 10GiB, ...); the initiators get
                         CAPACITY DATA HAS CHANGED
  bdevs | bdev list      the bdevs: type, size, block size, the LUN using each
  bdev add NAME KIND     a bdev no LUN uses yet; KIND: malloc:SIZE[:BLOCK],
                         null:SIZE[:BLOCK], file:PATH[:SIZE]
  bdev del NAME          removes a bdev no LUN uses
  portal-group add TAG ADDRESS:PORT [ADDRESS:PORT ...]
                         a kernel-TCP portal group, listening at once
  portal-group del TAG   stops listening; refused while a target is mapped to it
  initiator-group add TAG --initiator NAME|ANY [...] --netmask CIDR|ANY [...]
  initiator-group del TAG
                         initiator groups (refused while a target is mapped to one)
  apply FILE.toml [--dry-run]
                         brings the running configuration to the file's, as a diff, and
                         prints each change (--dry-run: only prints them)
  config                 prints the running configuration (the format --config reads)
  save FILE.toml         writes the running configuration (run-time changes included) for
                         --config at the next start
  version                this tool's version and control ABI

--instance NAME selects the dataplane started with the same --instance (default: default).
";

struct Args {
    instance: String,
    json: bool,
    prometheus: bool,
    command: String,
    rest: Vec<String>,
    watch: Option<u64>,
    /// `target add` options.
    opts: TargetOpts,
}

#[derive(Default)]
struct TargetOpts {
    pg: Option<String>,
    ig: Option<String>,
    luns: Vec<String>,
    alias: Option<String>,
    queue_depth: Option<String>,
    initiators: Vec<String>,
    netmasks: Vec<String>,
    keep_bdevs: bool,
    dry_run: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        instance: "default".into(),
        json: false,
        prometheus: false,
        command: String::new(),
        rest: Vec::new(),
        watch: None,
        opts: TargetOpts::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--instance" => a.instance = it.next().ok_or("--instance needs a name")?,
            "--json" => a.json = true,
            "--prometheus" => a.prometheus = true,
            "--pg" => a.opts.pg = Some(it.next().ok_or("--pg needs a tag")?),
            "--ig" => a.opts.ig = Some(it.next().ok_or("--ig needs a tag")?),
            "--lun" => a.opts.luns.push(it.next().ok_or("--lun needs a spec")?),
            "--initiator" => a
                .opts
                .initiators
                .push(it.next().ok_or("--initiator needs a name")?),
            "--netmask" => a
                .opts
                .netmasks
                .push(it.next().ok_or("--netmask needs a CIDR")?),
            "--keep-bdevs" | "--keep-bdev" => a.opts.keep_bdevs = true,
            "--dry-run" => a.opts.dry_run = true,
            "--alias" => a.opts.alias = Some(it.next().ok_or("--alias needs a value")?),
            "--queue-depth" => {
                a.opts.queue_depth = Some(it.next().ok_or("--queue-depth needs a number")?)
            }
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
            c if !c.starts_with('-') => a.rest.push(c.to_string()),
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
                "commands_taken": h.cmd_tail.load(Ordering::Relaxed),
                "bad_records": h.bad_records.load(Ordering::Relaxed),
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
            (
                "commands",
                format!(
                    "{} taken, {} bad records",
                    h.cmd_tail.load(Ordering::Relaxed),
                    h.bad_records.load(Ordering::Relaxed)
                ),
            ),
        ];
        for (k, v) in rows {
            println!("{k:<10} {v}");
        }
    }
}

fn counters_json(s: &ReactorStats) -> serde_json::Value {
    json!({
        "commands": s.commands,
        "read_commands": s.read_commands,
        "write_commands": s.write_commands,
        "read_bytes": s.read_bytes,
        "write_bytes": s.write_bytes,
        "errors": s.errors,
        "p50_below_us": percentile_us(s, 0.5),
        "p99_below_us": percentile_us(s, 0.99),
        "latency_us_buckets": (0..LATENCY_BUCKETS)
            .map(|i| json!({"below_us": 1u64 << i, "count": s.latency[i]}))
            .collect::<Vec<_>>(),
    })
}

fn stats_json(
    per: &[ReactorStats],
    total: &ReactorStats,
    luns: &[(String, ReactorStats)],
    conns: &[ObjectStats],
) -> serde_json::Value {
    let one = |s: &ReactorStats| {
        let mut v = counters_json(s);
        v["connections"] = json!(s.connections);
        v["sessions"] = json!(s.sessions);
        v
    };
    json!({
        "reactors": per.iter().map(one).collect::<Vec<_>>(),
        "total": one(total),
        "luns": luns.iter().map(|(name, s)| {
            let mut v = counters_json(s);
            v["name"] = json!(name);
            v
        }).collect::<Vec<_>>(),
        "connections": conns.iter().map(|o| {
            let mut v = counters_json(&o.stats);
            v["id"] = json!(o.id);
            v["reactor"] = json!(o.reactor);
            v["name"] = json!(o.name);
            v
        }).collect::<Vec<_>>(),
    })
}

/// Per-LUN statistics summed over the reactors (each counts what its connections sent),
/// and the connections', from the object blocks.
fn objects(seg: &Segment) -> (Vec<(String, ReactorStats)>, Vec<ObjectStats>) {
    let mut luns: std::collections::BTreeMap<String, ReactorStats> = Default::default();
    let mut conns = Vec::new();
    for o in seg.read_objects() {
        match o.kind {
            ObjectKind::Lun => luns.entry(o.name).or_default().add(&o.stats),
            ObjectKind::Connection => conns.push(o),
        }
    }
    conns.sort_by_key(|o| o.id);
    (luns.into_iter().collect(), conns)
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

/// Every reactor's statistics block, and their sum.
fn reactor_stats(seg: &Segment) -> Result<(Vec<ReactorStats>, ReactorStats), String> {
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
    Ok((per, total))
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The statistics in the Prometheus text exposition format (0.0.4): counters and a
/// latency histogram per reactor, per LUN (summed over reactors) and per connection;
/// connections and sessions per reactor as gauges.
fn stats_prometheus(
    per: &[ReactorStats],
    luns: &[(String, ReactorStats)],
    conns: &[ObjectStats],
) -> String {
    use std::fmt::Write;
    let mut series: Vec<(&str, Vec<(String, &ReactorStats)>)> = Vec::new();
    series.push((
        "reactor",
        per.iter()
            .enumerate()
            .map(|(i, s)| (format!("reactor=\"{i}\""), s))
            .collect(),
    ));
    series.push((
        "lun",
        luns.iter()
            .map(|(name, s)| {
                let (target, lun) = name.rsplit_once('/').unwrap_or((name.as_str(), ""));
                (
                    format!("target=\"{}\",lun=\"{}\"", label(target), label(lun)),
                    s,
                )
            })
            .collect(),
    ));
    series.push((
        "connection",
        conns
            .iter()
            .map(|o| {
                (
                    format!(
                        "id=\"{}\",reactor=\"{}\",connection=\"{}\"",
                        o.id,
                        o.reactor,
                        label(&o.name)
                    ),
                    &o.stats,
                )
            })
            .collect(),
    ));
    type Get = fn(&ReactorStats) -> u64;
    let counters: [(&str, &str, Get); 6] = [
        ("commands_total", "SCSI commands completed", |s| s.commands),
        (
            "read_commands_total",
            "Commands with a Data-In phase",
            |s| s.read_commands,
        ),
        (
            "write_commands_total",
            "Commands with a Data-Out phase",
            |s| s.write_commands,
        ),
        (
            "read_bytes_total",
            "Bytes sent to initiators (Data-In)",
            |s| s.read_bytes,
        ),
        (
            "write_bytes_total",
            "Bytes received from initiators (Data-Out)",
            |s| s.write_bytes,
        ),
        (
            "errors_total",
            "Commands that ended with a status other than GOOD",
            |s| s.errors,
        ),
    ];
    let mut o = String::new();
    for (scope, rows) in &series {
        for (name, help, get) in counters {
            let _ = writeln!(o, "# HELP iscsi_tgt_{scope}_{name} {help}, per {scope}.");
            let _ = writeln!(o, "# TYPE iscsi_tgt_{scope}_{name} counter");
            for (labels, s) in rows {
                let _ = writeln!(o, "iscsi_tgt_{scope}_{name}{{{labels}}} {}", get(s));
            }
        }
        let h = format!("iscsi_tgt_{scope}_command_latency_seconds");
        let _ = writeln!(
            o,
            "# HELP {h} Command latency, arrival to answer, per {scope}."
        );
        let _ = writeln!(o, "# TYPE {h} histogram");
        for (labels, s) in rows {
            let mut cumulative = 0u64;
            for i in 0..LATENCY_BUCKETS - 1 {
                cumulative += s.latency[i];
                let le = (1u64 << i) as f64 / 1e6;
                let _ = writeln!(o, "{h}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let count: u64 = s.latency.iter().sum();
            let _ = writeln!(o, "{h}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(o, "{h}_sum{{{labels}}} {}", s.latency_us_sum as f64 / 1e6);
            let _ = writeln!(o, "{h}_count{{{labels}}} {count}");
        }
    }
    for (name, help, get) in [
        (
            "connections",
            "Connections a reactor serves",
            (|s| s.connections) as Get,
        ),
        (
            "sessions",
            "Logged-in sessions of a reactor's connections",
            |s| s.sessions,
        ),
    ] {
        let _ = writeln!(o, "# HELP iscsi_tgt_reactor_{name} {help}.");
        let _ = writeln!(o, "# TYPE iscsi_tgt_reactor_{name} gauge");
        for (i, s) in per.iter().enumerate() {
            let _ = writeln!(o, "iscsi_tgt_reactor_{name}{{reactor=\"{i}\"}} {}", get(s));
        }
    }
    o
}

fn stats(seg: &Segment, as_json: bool) -> Result<(), String> {
    let (per, total) = reactor_stats(seg)?;
    let (luns, conns) = objects(seg);
    if as_json {
        println!("{}", stats_json(&per, &total, &luns, &conns));
    } else {
        stats_table(&per, &total);
        let rows = |list: Vec<(String, &ReactorStats)>| -> Vec<Vec<String>> {
            list.into_iter()
                .map(|(name, s)| {
                    let p = |q| percentile_us(s, q).map_or("-".to_string(), |v| v.to_string());
                    vec![
                        name,
                        s.commands.to_string(),
                        s.read_commands.to_string(),
                        s.write_commands.to_string(),
                        s.read_bytes.to_string(),
                        s.write_bytes.to_string(),
                        s.errors.to_string(),
                        p(0.5),
                        p(0.99),
                    ]
                })
                .collect()
        };
        let head = |first| {
            [
                first,
                "commands",
                "reads",
                "writes",
                "read bytes",
                "write bytes",
                "errors",
                "p50 <us",
                "p99 <us",
            ]
        };
        if !luns.is_empty() {
            println!();
            table(
                &head("LUN"),
                &rows(luns.iter().map(|(n, s)| (n.clone(), s)).collect()),
            );
        }
        if !conns.is_empty() {
            println!();
            table(
                &head("connection"),
                &rows(
                    conns
                        .iter()
                        .map(|o| (format!("{} {}", o.id, o.name), &o.stats))
                        .collect(),
                ),
            );
        }
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
        "stats" if a.prometheus => {
            let seg = open(&a.instance)?;
            let (per, _) = reactor_stats(&seg)?;
            let (luns, conns) = objects(&seg);
            print!("{}", stats_prometheus(&per, &luns, &conns));
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
        "ping" | "targets" | "sessions" | "connections" | "target" | "lun" | "save" | "bdevs"
        | "bdev" | "portal-group" | "initiator-group" | "apply" | "config" => ring_command(&a),
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

/// Bytes from "4096", "512M", "10GiB", ... (K, M, G, T powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return Err(format!("{s:?}: unknown unit")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The record for a ring command.
fn ring_request(a: &Args) -> Result<serde_json::Value, String> {
    let rest: Vec<&str> = a.rest.iter().map(String::as_str).collect();
    match (a.command.as_str(), rest.as_slice()) {
        ("ping", []) => Ok(json!({"op": "ping"})),
        ("targets", []) | ("target", ["list"]) => Ok(json!({"op": "targets"})),
        ("sessions", []) => Ok(json!({"op": "sessions"})),
        ("connections", []) => Ok(json!({"op": "connections"})),
        ("save", [_]) | ("config", []) => Ok(json!({"op": "config"})),
        ("target", ["add", name]) => target_add_request(name, &a.opts),
        ("target", ["del", name]) => Ok(json!({
            "op": "target-del",
            "target": name,
            "keep_bdevs": a.opts.keep_bdevs,
        })),
        ("lun", ["add", target, spec]) => {
            let mut v = lun_spec(spec)?;
            v["op"] = json!("lun-add");
            v["target"] = json!(target);
            Ok(v)
        }
        ("lun", ["del", target, lun]) => Ok(json!({
            "op": "lun-del",
            "target": target,
            "lun": number("LUN", lun)?,
            "keep_bdev": a.opts.keep_bdevs,
        })),
        ("lun", ["resize", target, lun, size]) => Ok(json!({
            "op": "lun-resize",
            "target": target,
            "lun": number("LUN", lun)?,
            "size": parse_size(size)?,
        })),
        ("bdevs", []) | ("bdev", ["list"]) => Ok(json!({"op": "bdevs"})),
        ("bdev", ["add", name, kind]) => {
            let mut v = bdev_spec(kind).map_err(|e| format!("bdev add {name}: {e}"))?;
            v["op"] = json!("bdev-add");
            v["name"] = json!(name);
            Ok(v)
        }
        ("bdev", ["del", name]) => Ok(json!({"op": "bdev-del", "name": name})),
        ("portal-group", ["add", tag, portals @ ..]) if !portals.is_empty() => Ok(json!({
            "op": "pg-add",
            "tag": number("tag", tag)?,
            "portals": portals,
        })),
        ("portal-group", ["del", tag]) => Ok(json!({"op": "pg-del", "tag": number("tag", tag)?})),
        ("initiator-group", ["add", tag]) => Ok(json!({
            "op": "ig-add",
            "tag": number("tag", tag)?,
            "initiators": a.opts.initiators,
            "netmasks": a.opts.netmasks,
        })),
        ("initiator-group", ["del", tag]) => {
            Ok(json!({"op": "ig-del", "tag": number("tag", tag)?}))
        }
        ("apply", [file]) => {
            let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
            if text.len() > control::MAX_RECORD - 4096 {
                return Err(format!(
                    "{file}: {} bytes is more than a command record carries ({} bytes)",
                    text.len(),
                    control::MAX_RECORD - 4096
                ));
            }
            Ok(json!({
                "op": "apply",
                "toml": text,
                "origin": file,
                "dry_run": a.opts.dry_run,
            }))
        }
        _ => Err(format!(
            "{} {}: wrong arguments\n{USAGE}",
            a.command,
            a.rest.join(" ")
        )),
    }
}

fn number(what: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("{what} {v:?} is not a number"))
}

/// A bdev spec: malloc:SIZE[:BLOCK], null:SIZE[:BLOCK] or file:PATH[:SIZE].
fn bdev_spec(spec: &str) -> Result<serde_json::Value, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        [kind @ ("malloc" | "null"), size, rest @ ..] if rest.len() <= 1 => {
            let mut v = json!({"type": kind, "size": parse_size(size)?});
            if let [bs] = rest {
                v["block_size"] = json!(number("block size", bs)?);
            }
            Ok(v)
        }
        ["file", path, rest @ ..] if rest.len() <= 1 && !path.is_empty() => {
            let mut v = json!({"type": "file", "path": path});
            if let [size] = rest {
                v["size"] = json!(parse_size(size)?);
            }
            Ok(v)
        }
        _ => Err(format!(
            "{spec:?}: expected malloc:SIZE[:BLOCK], null:SIZE[:BLOCK] or file:PATH[:SIZE]"
        )),
    }
}

/// A LUN spec: N:KIND (see [`bdev_spec`]) or N:bdev:NAME.
fn lun_spec(spec: &str) -> Result<serde_json::Value, String> {
    let (n, rest) = spec
        .split_once(':')
        .ok_or_else(|| format!("LUN spec {spec:?}: expected N:KIND or N:bdev:NAME"))?;
    let lun = number("LUN", n)?;
    let mut v = match rest.strip_prefix("bdev:") {
        Some(name) if !name.is_empty() => json!({"bdev": name}),
        _ => bdev_spec(rest).map_err(|e| format!("LUN spec {spec:?}: {e}"))?,
    };
    v["lun"] = json!(lun);
    Ok(v)
}

fn target_add_request(name: &str, o: &TargetOpts) -> Result<serde_json::Value, String> {
    let pg = o.pg.as_deref().ok_or("target add needs --pg TAG")?;
    let ig = o.ig.as_deref().ok_or("target add needs --ig TAG")?;
    if o.luns.is_empty() {
        return Err("target add needs at least one --lun".into());
    }
    let luns = o
        .luns
        .iter()
        .map(|s| lun_spec(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut v = json!({
        "op": "target-add",
        "name": name,
        "portal_group": number("portal group", pg)?,
        "initiator_group": number("initiator group", ig)?,
        "luns": luns,
    });
    if let Some(a) = &o.alias {
        v["alias"] = json!(a);
    }
    if let Some(q) = &o.queue_depth {
        v["queue_depth"] = json!(number("queue depth", q)?);
    }
    Ok(v)
}

/// Sends a command through the ring and prints the answer.
fn ring_command(a: &Args) -> Result<(), String> {
    let req = ring_request(a)?;
    let seg = open(&a.instance)?;
    let raw = seg
        .submit(req.to_string().as_bytes(), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let answer: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| format!("unreadable answer: {e}"))?;
    if answer["ok"] != json!(true) {
        if answer["applied"] == json!(true) {
            print_changes(&answer);
        }
        return Err(answer["error"]
            .as_str()
            .unwrap_or("the dataplane refused the command")
            .to_string());
    }
    if a.json && req["op"] != "config" {
        println!("{answer}");
        return Ok(());
    }
    match req["op"].as_str().unwrap_or("") {
        "ping" => println!("dataplane pid {} answered", answer["pid"]),
        "targets" => print_targets(&answer),
        "sessions" => print_sessions(&answer),
        "connections" => print_connections(&answer),
        "bdevs" => print_bdevs(&answer),
        "config" if a.command == "config" => print!("{}", text(&answer["toml"])),
        "config" => {
            let path = std::path::Path::new(&a.rest[0]);
            let toml = answer["toml"]
                .as_str()
                .ok_or("no configuration in the answer")?;
            // Write beside it, then rename: a crash never leaves half a file.
            let tmp = path.with_extension("toml.tmp");
            std::fs::write(&tmp, toml)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            println!("configuration written to {}", path.display());
        }
        _ if answer.get("changes").is_some() => print_changes(&answer),
        _ => println!("{answer}"),
    }
    Ok(())
}

/// What a configuration change did (or, with --dry-run, would do).
fn print_changes(answer: &serde_json::Value) {
    let list = |k: &str| -> Vec<String> {
        answer[k]
            .as_array()
            .map(|a| a.iter().map(text).collect())
            .unwrap_or_default()
    };
    let changes = list("changes");
    if changes.is_empty() {
        println!("no changes");
    }
    let verb = if answer["applied"] == json!(true) {
        ""
    } else {
        "(dry run) "
    };
    for c in changes {
        println!("{verb}{c}");
    }
}

fn print_bdevs(answer: &serde_json::Value) {
    let rows: Vec<Vec<String>> = answer["bdevs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    vec![
                        text(&b["name"]),
                        text(&b["type"]),
                        text(&b["size"]),
                        text(&b["block_size"]),
                        text(&b["used_by"]),
                        text(&b["path"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["bdev", "type", "bytes", "block", "used by", "path"],
        &rows,
    );
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Prints rows as a table with columns as wide as their widest cell.
fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn print_targets(answer: &serde_json::Value) {
    let mut rows = Vec::new();
    for t in answer["targets"].as_array().into_iter().flatten() {
        let maps: Vec<String> = t["mappings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!("pg{}/ig{}", m["portal_group"], m["initiator_group"]))
            .collect();
        for l in t["luns"].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&t["name"]),
                text(&l["lun"]),
                text(&l["bdev"]),
                text(&l["type"]),
                text(&l["block_size"]),
                maps.join(","),
            ]);
        }
    }
    table(
        &["target", "lun", "bdev", "type", "block", "mappings"],
        &rows,
    );
}

fn print_connections(answer: &serde_json::Value) {
    let rows: Vec<Vec<String>> = answer["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            [
                "id",
                "reactor",
                "transport",
                "peer",
                "initiator",
                "target",
                "tsih",
                "phase",
                "commands",
                "idle_ms",
            ]
            .iter()
            .map(|k| text(&c[*k]))
            .collect()
        })
        .collect();
    table(
        &[
            "id",
            "reactor",
            "transport",
            "peer",
            "initiator",
            "target",
            "tsih",
            "phase",
            "cmds",
            "idle ms",
        ],
        &rows,
    );
    println!("parked: {}", text(&answer["parked"]));
}

fn print_sessions(answer: &serde_json::Value) {
    let rows: Vec<Vec<String>> = answer["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                text(&s["tsih"]),
                text(&s["type"]),
                text(&s["initiator"]),
                text(&s["isid"]),
                text(&s["target"]),
                text(&s["connection"]),
            ]
        })
        .collect();
    table(
        &["tsih", "type", "initiator", "isid", "target", "conn"],
        &rows,
    );
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
    fn sizes_and_requests() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("12X").is_err() && parse_size("G").is_err());
        let args = |c: &str, rest: &[&str]| Args {
            instance: "x".into(),
            json: false,
            prometheus: false,
            command: c.into(),
            rest: rest.iter().map(|s| s.to_string()).collect(),
            watch: None,
            opts: TargetOpts::default(),
        };
        assert_eq!(
            lun_spec("1:malloc:64M:4096").unwrap(),
            json!({"lun": 1, "type": "malloc", "size": 64u64 << 20, "block_size": 4096})
        );
        assert_eq!(
            lun_spec("0:file:/tmp/x.img:1G").unwrap(),
            json!({"lun": 0, "type": "file", "path": "/tmp/x.img", "size": 1u64 << 30})
        );
        assert!(lun_spec("0:floppy:1M").is_err() && lun_spec("x:malloc:1M").is_err());
        let mut a = args("target", &["add", "iqn.2026-11.x:new"]);
        assert!(ring_request(&a).is_err(), "no --pg");
        a.opts.pg = Some("1".into());
        a.opts.ig = Some("1".into());
        a.opts.luns = vec!["0:malloc:1M".into()];
        assert_eq!(ring_request(&a).unwrap()["op"], "target-add");
        assert_eq!(
            ring_request(&args("lun", &["resize", "iqn.x:t", "1", "1G"])).unwrap(),
            json!({"op": "lun-resize", "target": "iqn.x:t", "lun": 1, "size": 1u64 << 30})
        );
        assert_eq!(
            ring_request(&args("target", &["list"])).unwrap(),
            json!({"op": "targets"})
        );
        assert!(ring_request(&args("lun", &["resize", "t", "x", "1G"])).is_err());
        assert!(ring_request(&args("sessions", &["extra"])).is_err());
    }

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
            &[("iqn.x:t/0".to_string(), a.clone())],
            &[],
        );
        assert_eq!(v["total"]["commands"], 6);
        assert_eq!(v["luns"][0]["name"], "iqn.x:t/0");
        assert_eq!(v["luns"][0]["commands"], 3);
        assert_eq!(v["reactors"][1]["commands"], 3);
    }

    #[test]
    fn prometheus_text() {
        let mut s = ReactorStats {
            commands: 3,
            read_bytes: 4096,
            ..ReactorStats::default()
        };
        s.record_latency(100);
        s.record_latency(100);
        s.record_latency(3000);
        let conn = ObjectStats {
            reactor: 1,
            kind: ObjectKind::Connection,
            id: 7,
            name: "127.0.0.1:5 iqn.\"x\" -> iqn.t".into(),
            stats: s.clone(),
        };
        let text = stats_prometheus(
            std::slice::from_ref(&s),
            &[("iqn.t/0".to_string(), s.clone())],
            &[conn],
        );
        for line in [
            "iscsi_tgt_reactor_commands_total{reactor=\"0\"} 3",
            "iscsi_tgt_lun_read_bytes_total{target=\"iqn.t\",lun=\"0\"} 4096",
            r#"iscsi_tgt_connection_commands_total{id="7",reactor="1",connection="127.0.0.1:5 iqn.\"x\" -> iqn.t"} 3"#,
            "iscsi_tgt_reactor_command_latency_seconds_bucket{reactor=\"0\",le=\"0.000064\"} 0",
            "iscsi_tgt_reactor_command_latency_seconds_bucket{reactor=\"0\",le=\"0.000128\"} 2",
            "iscsi_tgt_reactor_command_latency_seconds_bucket{reactor=\"0\",le=\"0.004096\"} 3",
            "iscsi_tgt_reactor_command_latency_seconds_bucket{reactor=\"0\",le=\"+Inf\"} 3",
            "iscsi_tgt_reactor_command_latency_seconds_sum{reactor=\"0\"} 0.0032",
            "iscsi_tgt_reactor_command_latency_seconds_count{reactor=\"0\"} 3",
            "# TYPE iscsi_tgt_reactor_sessions gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
