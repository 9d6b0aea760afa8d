//! `iscsictl` against a running target: status, and statistics that match what fio did.

use e2e::{artifacts_dir, ctl_bin, fio_bin, parse_fio_terse, run_with_timeout, Target};
use std::fs;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn ctl(instance: &str, args: &[&str]) -> e2e::CmdOutput {
    run_with_timeout(
        Command::new(ctl_bin())
            .arg("--instance")
            .arg(instance)
            .args(args),
        TIMEOUT,
    )
}

fn json(out: &e2e::CmdOutput) -> serde_json::Value {
    out.assert_success();
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn status_and_stats_match_fio() {
    let t = Target::start("control");
    let instance = format!("e2e-{}", t.port());

    let st = json(&ctl(&instance, &["--json", "status"]));
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["reactors"], 1);
    assert!(st["pid"].as_u64().unwrap() > 1);
    assert!(st["heartbeat_age_ms"].as_u64().unwrap() < 5_000, "{st}");
    let human = ctl(&instance, &["status"]);
    human.assert_success();
    assert!(human.stdout.contains("state      running"), "{human}");

    // 4096 writes of 4 KiB, then fio reads all of them back to verify.
    let dir = artifacts_dir().join(format!("control-fio-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let terse = dir.join("fio.terse");
    let out = run_with_timeout(
        Command::new(fio_bin())
            .current_dir(&dir)
            .arg("--name=ctl")
            .arg("--ioengine=libiscsi")
            .arg(format!("--filename={}", t.fio_filename()))
            .args([
                "--rw=randwrite",
                "--bs=4k",
                "--size=16M",
                "--iodepth=8",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .arg(format!("--output={}", terse.display())),
        TIMEOUT,
    );
    out.assert_success();
    let jobs = parse_fio_terse(&fs::read_to_string(&terse).unwrap()).unwrap();
    let fio_writes = jobs[0].write_kib / 4;
    let fio_reads = jobs[0].read_kib / 4;
    assert_eq!((fio_writes, fio_reads), (4096, 4096));

    // The reactor publishes every 100 ms: wait until the writes show, bounded.
    let mut total = serde_json::Value::Null;
    for _ in 0..50 {
        let v = json(&ctl(&instance, &["--json", "stats"]));
        total = v["total"].clone();
        // Counters are published every 100 ms: wait for the last publication to cover
        // the whole run (writes and the verify reads).
        if total["write_commands"].as_u64().unwrap_or(0) >= fio_writes
            && total["read_commands"].as_u64().unwrap_or(0) >= fio_reads
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let within_1pct = |ours: u64, fio: u64| ours >= fio && ours - fio <= fio / 100;
    let writes = total["write_commands"].as_u64().unwrap();
    let reads = total["read_commands"].as_u64().unwrap();
    // The initiator's own INQUIRY/READ CAPACITY/... are a handful of extra reads.
    assert!(
        within_1pct(writes, fio_writes),
        "writes {writes} vs fio {fio_writes}: {total}"
    );
    assert!(
        within_1pct(reads, fio_reads),
        "reads {reads} vs fio {fio_reads}: {total}"
    );
    assert_eq!(total["write_bytes"].as_u64().unwrap(), fio_writes * 4096);
    assert!(within_1pct(
        total["read_bytes"].as_u64().unwrap(),
        fio_reads * 4096
    ));
    let buckets: u64 = total["latency_us_buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(buckets, total["commands"].as_u64().unwrap());
    let table = ctl(&instance, &["stats"]);
    table.assert_success();
    assert!(
        table.stdout.lines().any(|l| l.starts_with("total")),
        "{table}"
    );
}

#[test]
fn missing_and_garbage_segments_get_clear_errors() {
    let out = ctl("e2e-nobody-runs-this", &["status"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("no control segment"), "{out}");
    let name = format!("e2e-garbage-{}", std::process::id());
    let path = format!("/dev/shm/iscsi-tgt.{name}");
    fs::write(&path, vec![0x5a; 8192]).unwrap();
    let out = ctl(&name, &["status"]);
    let _ = fs::remove_file(&path);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("not an iscsi-tgt control segment"),
        "{out}"
    );
}
