//! `iscsictl` against a running target: status, and statistics that match what fio did.

use e2e::raw::RawSession;
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
    // Every command went to the one LUN: its block says the same as the reactor's.
    let v = json(&ctl(&instance, &["--json", "stats"]));
    let luns = v["luns"].as_array().unwrap();
    assert_eq!(luns.len(), 1, "{v}");
    assert_eq!(luns[0]["name"], format!("{}/0", e2e::DEFAULT_IQN));
    for k in [
        "commands",
        "read_commands",
        "write_commands",
        "read_bytes",
        "write_bytes",
    ] {
        assert_eq!(luns[0][k], v["total"][k], "{k}: {v}");
    }

    // A connection's block counts its own commands: 10 TEST UNIT READY and a REPORT LUNS
    // (a read: it has Data-In).
    let mut s = RawSession::login(&t.portal(), "iqn.2026-11.io.e2e:stats", e2e::DEFAULT_IQN);
    for _ in 0..10 {
        assert_eq!(s.tur(0).unwrap().status, 0);
    }
    assert_eq!(s.report_luns(), [0]);
    let mut conn = serde_json::Value::Null;
    for _ in 0..50 {
        let v = json(&ctl(&instance, &["--json", "stats"]));
        conn = v["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["name"]
                    .as_str()
                    .unwrap()
                    .contains("iqn.2026-11.io.e2e:stats")
            })
            .cloned()
            .unwrap_or_default();
        if conn["commands"] == 11 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        (&conn["commands"], &conn["read_commands"], &conn["errors"]),
        (
            &serde_json::json!(11),
            &serde_json::json!(1),
            &serde_json::json!(0)
        ),
        "{conn}"
    );
    assert!(
        conn["name"]
            .as_str()
            .unwrap()
            .ends_with(&format!("iqn.2026-11.io.e2e:stats -> {}", e2e::DEFAULT_IQN)),
        "{conn}"
    );
    // The same numbers in Prometheus text format (nothing runs now: they stay put).
    let now = json(&ctl(&instance, &["--json", "stats"]));
    let prom = ctl(&instance, &["stats", "--prometheus"]);
    prom.assert_success();
    let lun_commands = format!(
        "iscsi_tgt_lun_commands_total{{target=\"{}\",lun=\"0\"}} {}",
        e2e::DEFAULT_IQN,
        now["luns"][0]["commands"]
    );
    assert!(
        prom.stdout.contains(&lun_commands),
        "{lun_commands} in {prom}"
    );
    let conn_line = prom
        .stdout
        .lines()
        .find(|l| {
            l.starts_with("iscsi_tgt_connection_commands_total{")
                && l.contains("iqn.2026-11.io.e2e:stats")
        })
        .unwrap_or_default();
    assert!(conn_line.ends_with(" 11"), "{conn_line:?} in {prom}");
    assert!(
        prom.stdout.lines().all(|l| l.starts_with('#')
            || l.rsplit_once(' ')
                .is_some_and(|(_, v)| v.parse::<f64>().is_ok())),
        "{prom}"
    );
    let table = ctl(&instance, &["stats"]);
    table.assert_success();
    assert!(
        table.stdout.lines().any(|l| l.starts_with("total")),
        "{table}"
    );
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with(&format!("{}/0 ", e2e::DEFAULT_IQN))),
        "{table}"
    );
    assert!(table.stdout.contains("iqn.2026-11.io.e2e:stats"), "{table}");
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

/// Two targets; fio with verify runs against the first while `iscsictl` works on the second
/// through the command ring: targets, sessions, a LUN resize the initiator sees, and then
/// random bytes over the ring and its head. fio finishes with zero errors, the dataplane
/// reports the bad records and still answers.
#[test]
fn ring_commands_and_garbage_while_io_runs() {
    let second = "iqn.2026-11.io.iscsi-tgt:second";
    let toml = format!(
        r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:1"]
[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]
[[bdev]]
name = "A"
type = "malloc"
size = "256MiB"
[[bdev]]
name = "B"
type = "malloc"
size = "64MiB"
[[target]]
name = "{}"
luns = [ {{ lun = 0, bdev = "A" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
[[target]]
name = "{second}"
luns = [ {{ lun = 0, bdev = "B" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#,
        e2e::DEFAULT_IQN
    );
    let mut t = Target::start_with_config("control-ring", &toml, e2e::DEFAULT_IQN, 0);
    let instance = format!("e2e-{}", t.port());
    let dir = artifacts_dir().join(format!("control-ring-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let terse = dir.join("fio.terse");
    let mut fio = Command::new(fio_bin());
    fio.current_dir(&dir)
        .arg("--name=ring")
        .arg("--ioengine=libiscsi")
        .arg(format!("--filename={}", t.fio_filename()))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--numjobs=2",
            "--offset_increment=64M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // Slow enough that the commands below happen while it runs.
            "--rate_iops=4000",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--output={}", terse.display()));
    let fio = std::thread::spawn(move || run_with_timeout(&mut fio, Duration::from_secs(120)));
    std::thread::sleep(Duration::from_millis(500));

    let ping = json(&ctl(&instance, &["--json", "ping"]));
    assert_eq!(ping["ok"], true, "{ping}");
    let targets = json(&ctl(&instance, &["--json", "targets"]));
    let names: Vec<&str> = targets["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [e2e::DEFAULT_IQN, second]);
    // fio's two jobs log in one after the other (bounded wait on a busy machine).
    let mut sessions = serde_json::Value::Null;
    let mut on_first = 0;
    for _ in 0..100 {
        sessions = json(&ctl(&instance, &["--json", "sessions"]));
        on_first = sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["target"] == e2e::DEFAULT_IQN && s["type"] == "normal")
            .count();
        if on_first == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(on_first, 2, "fio's two sessions: {sessions}");
    let conns = json(&ctl(&instance, &["--json", "connections"]));
    let fio_conns: Vec<&serde_json::Value> = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["target"] == e2e::DEFAULT_IQN)
        .collect();
    assert_eq!(fio_conns.len(), 2, "{conns}");
    for c in &fio_conns {
        assert_eq!(c["phase"], "full feature", "{c}");
        assert_eq!(c["transport"], "kernel", "{c}");
        assert!(c["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{c}");
    }
    let human = ctl(&instance, &["targets"]);
    human.assert_success();
    assert!(human.stdout.starts_with("target "), "{human}");

    // Resize the second target's LUN: the initiator reads the new capacity.
    let url = format!("iscsi://{}/{second}/0", t.portal());
    let out = json(&ctl(
        &instance,
        &["--json", "lun", "resize", second, "0", "128MiB"],
    ));
    // (Named after its target and LUN, from the configuration the test started with.)
    assert!(
        out["changes"][0]
            .as_str()
            .is_some_and(|c| c.ends_with("resized to 134217728 bytes")),
        "{out}"
    );
    let cap = run_with_timeout(
        Command::new("iscsi-readcapacity16").arg(&url),
        Duration::from_secs(30),
    );
    assert!(
        cap.stdout.contains(&format!(
            "RETURNED LOGICAL BLOCK ADDRESS:{}",
            (128u64 << 20) / 512 - 1
        )),
        "{cap}"
    );
    // Refusals are errors with exit status 2.
    let bad = ctl(&instance, &["lun", "resize", second, "7", "1G"]);
    assert_eq!(bad.code(), Some(2), "{bad}");
    assert!(bad.stderr.contains("has no LUN 7"), "{bad}");
    let bad = ctl(&instance, &["lun", "resize", second, "0", "1000"]);
    assert_eq!(bad.code(), Some(2), "{bad}");

    // Random bytes over the command ring, the response ring and the command head.
    let path = control::segment_path(&instance);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut word = [0u8; 8];
    file.read_at(&mut word, 64).unwrap();
    let ring_offset = u64::from_le_bytes(word);
    let ring_len = 2 * control::RING_SLOTS as u64 * 64 * 1024;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..50 {
        let chunk: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        let off = ring_offset + next() % (ring_len - 4096);
        file.write_at(&chunk, off).unwrap();
        file.write_at(&next().to_le_bytes(), 80).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    // The dataplane resynchronises and answers the next command.
    std::thread::sleep(Duration::from_millis(200));
    let st = json(&ctl(&instance, &["--json", "status"]));
    assert!(st["bad_records"].as_u64().unwrap() > 0, "{st}");
    let ping = json(&ctl(&instance, &["--json", "ping"]));
    assert_eq!(ping["ok"], true, "{ping}");
    t.assert_running();
    assert!(t.log_contents().contains("control: bad command record"));

    let out = fio.join().unwrap();
    let text = fs::read_to_string(&terse).unwrap_or_default();
    assert!(out.success(), "fio:\n{out}\n{text}");
    let jobs = parse_fio_terse(&text).unwrap();
    assert_eq!(jobs.len(), 2, "{text}");
    for j in &jobs {
        assert_eq!(j.error, 0, "{j:?}");
        assert_eq!(j.write_kib, 64 * 1024, "{j:?}");
        assert_eq!(j.read_kib, 64 * 1024, "{j:?}");
    }
}

fn fio_job(dir: &std::path::Path, name: &str, filename: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(fio_bin());
    c.current_dir(dir)
        .arg(format!("--name={name}"))
        .arg("--ioengine=libiscsi")
        .arg(format!("--filename={filename}"))
        .args(["--output-format=terse", "--terse-version=3"])
        .arg(format!(
            "--output={}",
            dir.join(format!("{name}.terse")).display()
        ))
        .args(extra);
    c
}

/// A target added and removed through `iscsictl` on a running two-reactor dataplane while
/// fio verifies another target: the new target serves a verified fio run from its own
/// reactor, after its removal logins find no such target and its device is released, and
/// the other target's run has no error.
#[test]
fn target_add_and_del_while_io_runs() {
    let mut t = Target::start_with_args("control-add", &["--cpumask", "0x3"]);
    let instance = format!("e2e-{}", t.port());
    let dir = artifacts_dir().join(format!("control-add-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let mut main = fio_job(
        &dir,
        "main",
        &t.fio_filename(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--rate_iops=5000",
        ],
    );
    let main = std::thread::spawn(move || run_with_timeout(&mut main, Duration::from_secs(120)));
    std::thread::sleep(Duration::from_millis(300));

    let new = "iqn.2026-11.io.iscsi-tgt:added";
    let out = json(&ctl(
        &instance,
        &[
            "--json",
            "target",
            "add",
            new,
            "--pg",
            "1",
            "--ig",
            "1",
            "--lun",
            "0:malloc:64M",
            "--lun",
            "3:malloc:16M:4096",
        ],
    ));
    assert_eq!(
        out["changes"],
        serde_json::json!([
            format!("bdev {new}/lun0 added"),
            format!("bdev {new}/lun3 added"),
            format!("target {new} added"),
        ]),
        "{out}"
    );
    let bad = ctl(
        &instance,
        &[
            "target",
            "add",
            new,
            "--pg",
            "1",
            "--ig",
            "1",
            "--lun",
            "0:malloc:1M",
        ],
    );
    assert_eq!(bad.code(), Some(2), "{bad}");
    assert!(bad.stderr.contains("exists"), "{bad}");
    let ls = run_with_timeout(
        Command::new("iscsi-ls").args(["-s", &t.portal_url()]),
        Duration::from_secs(30),
    );
    assert!(ls.stdout.contains(&format!("Target:{new} ")), "{ls}");
    assert!(
        ls.stdout.contains("Lun:3    Type:DIRECT_ACCESS (Size:15M)"),
        "{ls}"
    );
    let new_file = e2e::fio_iscsi_filename(&t.portal(), new, 0);
    let out = run_with_timeout(
        &mut fio_job(
            &dir,
            "added",
            &new_file,
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--size=16M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ],
        ),
        Duration::from_secs(60),
    );
    assert!(out.success(), "{out}");
    let jobs = parse_fio_terse(&fs::read_to_string(dir.join("added.terse")).unwrap()).unwrap();
    assert_eq!(
        (jobs[0].error, jobs[0].read_kib),
        (0, 16 * 1024),
        "{jobs:?}"
    );

    // Saved, the configuration starts a dataplane that has the added target.
    let saved = dir.join("saved.toml");
    let out = ctl(&instance, &["save", saved.to_str().unwrap()]);
    out.assert_success();
    let text = fs::read_to_string(&saved).unwrap();
    assert!(text.contains(&format!("name = \"{new}\"")), "{text}");
    let mut again = Target::start_with_config("control-saved", &text, new, 3);
    let ls = run_with_timeout(
        Command::new("iscsi-ls").args(["-s", &again.portal_url()]),
        Duration::from_secs(30),
    );
    assert!(ls.stdout.contains(&format!("Target:{new} ")), "{ls}");
    assert!(
        ls.stdout.contains("Lun:3    Type:DIRECT_ACCESS (Size:15M)"),
        "{ls}"
    );
    again.stop();

    // (A session busy on the target while it is removed is closed by the dataplane, but
    // libiscsi then retries its login in a loop that fio cannot leave: that case is left
    // to a raw-socket test.)
    let out = json(&ctl(&instance, &["--json", "target", "del", new]));
    assert_eq!(
        out["changes"],
        serde_json::json!([
            format!("bdev {new}/lun0 removed"),
            format!("bdev {new}/lun3 removed"),
            format!("target {new} removed"),
        ]),
        "{out}"
    );
    let inq = run_with_timeout(
        Command::new("iscsi-inq").arg(format!("iscsi://{}/{new}/0", t.portal())),
        Duration::from_secs(30),
    );
    assert!(
        !inq.success() && inq.stderr.contains("Target not found"),
        "{inq}"
    );
    let targets = json(&ctl(&instance, &["--json", "targets"]));
    assert_eq!(targets["targets"].as_array().unwrap().len(), 1, "{targets}");

    let out = main.join().unwrap();
    let text = fs::read_to_string(dir.join("main.terse")).unwrap_or_default();
    assert!(out.success(), "{out}\n{text}");
    let jobs = parse_fio_terse(&text).unwrap();
    assert_eq!(
        (jobs[0].error, jobs[0].read_kib),
        (0, 64 * 1024),
        "{jobs:?}"
    );
    t.assert_running();
    let log = t.log_contents();
    // Its id was 1: its device lived on reactor 1 of 2, which released it.
    assert!(log.contains("device of removed target 1 released"), "{log}");
    assert!(log.contains(&format!("bdev {new}/lun0 closed")), "{log}");
}

const IQN_A: &str = "iqn.2026-11.io.e2e:a";
const IQN_B: &str = "iqn.2026-11.io.e2e:b";

/// Targets A (reactor 0) and B (reactor 1) on two reactors, 64 MiB each.
fn two_targets() -> String {
    format!(
        r#"
[global]
cpumask = "0x3"

[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["127.0.0.0/8"]

[[bdev]]
name = "MA"
type = "malloc"
size = "64MiB"

[[bdev]]
name = "MB"
type = "malloc"
size = "64MiB"

[[target]]
name = "{IQN_A}"
luns = [ {{ lun = 0, bdev = "MA" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]

[[target]]
name = "{IQN_B}"
luns = [ {{ lun = 0, bdev = "MB" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    )
}

/// A rate-limited fio verify run on target B for the length of a test.
fn verify_b(t: &Target, dir: &std::path::Path) -> std::thread::JoinHandle<e2e::CmdOutput> {
    let mut job = fio_job(
        dir,
        "b",
        &e2e::fio_iscsi_filename(&t.portal(), IQN_B, 0),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--rate_iops=3000",
        ],
    );
    std::thread::spawn(move || run_with_timeout(&mut job, Duration::from_secs(120)))
}

fn assert_verified(dir: &std::path::Path, out: e2e::CmdOutput) {
    let text = fs::read_to_string(dir.join("b.terse")).unwrap_or_default();
    assert!(out.success(), "{out}\n{text}");
    let jobs = parse_fio_terse(&text).unwrap();
    assert_eq!(
        (jobs[0].error, jobs[0].read_kib),
        (0, 32 * 1024),
        "{jobs:?}"
    );
}

fn changes(out: &serde_json::Value) -> Vec<String> {
    out["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes in {out}"))
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// LUNs added to and removed from a target while a session stays logged in to it: the
/// session learns of each change through REPORTED LUNS DATA HAS CHANGED, sees the new
/// LUNs and loses the removed ones; the target's removal ends it with an Async Message.
/// Meanwhile fio verifies the other target (on the other reactor) without an error.
#[test]
fn luns_come_and_go_under_a_live_session() {
    let mut t = Target::start_with_config("control-luns", &two_targets(), IQN_A, 0);
    let instance = format!("e2e-{}", t.port());
    let dir = artifacts_dir().join(format!("control-luns-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let fio = verify_b(&t, &dir);
    let mut s = RawSession::login(&t.portal(), "iqn.2026-11.io.e2e:raw", IQN_A);
    assert_eq!(s.tur(0).unwrap().status, 0);
    let ua = Some((6, 0x3f, 0x0e));

    let out = json(&ctl(
        &instance,
        &["--json", "lun", "add", IQN_A, "1:malloc:8M"],
    ));
    assert_eq!(
        changes(&out),
        [
            format!("bdev {IQN_A}/lun1 added"),
            format!("target {IQN_A}: LUN 1 added (bdev {IQN_A}/lun1)"),
        ],
        "{out}"
    );
    let r = s.tur(0).unwrap();
    assert_eq!((r.status, r.key_asc_ascq()), (2, ua), "{r:?}");
    assert_eq!(
        s.tur(0).unwrap().status,
        0,
        "the attention is reported once"
    );
    assert_eq!(s.report_luns(), [0, 1]);
    let cap = s.capacity(1).unwrap();
    assert_eq!(cap.status, 0, "{cap:?}");
    assert_eq!(
        &cap.data[0..12],
        &[0, 0, 0, 0, 0, 0, 0x3f, 0xff, 0, 0, 2, 0]
    );

    // A bdev on its own, then mapped as LUN 2.
    json(&ctl(
        &instance,
        &["--json", "bdev", "add", "spare", "null:4M"],
    ));
    let out = json(&ctl(
        &instance,
        &["--json", "lun", "add", IQN_A, "2:bdev:spare"],
    ));
    assert_eq!(
        changes(&out),
        [format!("target {IQN_A}: LUN 2 added (bdev spare)")]
    );
    let bad = ctl(&instance, &["bdev", "del", "spare"]);
    assert_eq!(bad.code(), Some(2), "{bad}");
    assert!(bad.stderr.contains("backs a LUN of"), "{bad}");
    assert_eq!(s.tur(0).unwrap().key_asc_ascq(), ua);
    assert_eq!(s.report_luns(), [0, 1, 2]);

    // LUN 2 removed, its bdev kept: the session loses the LUN, the bdev is free again.
    let out = json(&ctl(
        &instance,
        &["--json", "lun", "del", IQN_A, "2", "--keep-bdev"],
    ));
    assert_eq!(changes(&out), [format!("target {IQN_A}: LUN 2 removed")]);
    assert_eq!(s.tur(0).unwrap().key_asc_ascq(), ua);
    let r = s.tur(2).unwrap();
    assert_eq!(
        (r.status, r.key_asc_ascq()),
        (2, Some((5, 0x25, 0))),
        "{r:?}"
    );
    let mut free = false;
    for _ in 0..50 {
        let b = json(&ctl(&instance, &["--json", "bdevs"]));
        let spare = b["bdevs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "spare")
            .cloned()
            .unwrap();
        if spare["used_by"].is_null() && spare["open"] == true {
            free = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(free, "the spare bdev came back to the pool");
    json(&ctl(&instance, &["--json", "bdev", "del", "spare"]));

    // The target goes: the session gets an Async Message (the target drops all its
    // connections, Time2Wait 2, Time2Retain 0), then the connection closes.
    let out = json(&ctl(&instance, &["--json", "target", "del", IQN_A]));
    assert!(
        changes(&out).contains(&format!("target {IQN_A} removed")),
        "{out}"
    );
    let m = s.recv().expect("an Async Message");
    assert_eq!(m.opcode(), 0x32);
    assert_eq!(m.bhs[36], 3, "AsyncEvent: the target drops the session");
    assert_eq!(&m.bhs[38..44], &[0, 0, 0, 2, 0, 0]);
    assert!(s.recv().is_none(), "the connection closes after it");

    assert_verified(&dir, fio.join().unwrap());
    t.assert_running();
    let log = t.log_contents();
    assert!(log.contains("target 0 LUN 2 removed"), "{log}");
    assert!(log.contains("bdev spare closed"), "{log}");
    assert!(log.contains("device of removed target 0 released"), "{log}");
}

/// `apply` brings the running configuration to a file's, exactly as the dry run said,
/// and back again, while fio verifies an untouched target.
#[test]
fn apply_makes_exactly_the_difference() {
    let mut t = Target::start_with_config("control-apply", &two_targets(), IQN_B, 0);
    let instance = format!("e2e-{}", t.port());
    let dir = artifacts_dir().join(format!("control-apply-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let fio = verify_b(&t, &dir);

    let running = ctl(&instance, &["config"]);
    running.assert_success();
    let before = running.stdout.clone();
    let p2 = e2e::free_port();
    let a_luns = "luns = [{ lun = 0, bdev = \"MA\" }]";
    assert!(before.contains(a_luns), "{before}");
    let after = before
        .replace(
            a_luns,
            "luns = [{ lun = 0, bdev = \"MA\" }, { lun = 1, bdev = \"M1\" }]",
        )
        .replace("max_sessions = 1024", "max_sessions = 512")
        .replace("cpumask = \"0x3\"", "cpumask = \"0x7\"")
        + &format!(
            r#"
[[portal_group]]
tag = 2
portals = ["127.0.0.1:{p2}"]

[[initiator_group]]
tag = 2
initiators = ["ANY"]
netmasks = ["127.0.0.1/32"]

[[bdev]]
name = "M1"
type = "malloc"
size = "8MiB"

[[bdev]]
name = "MC"
type = "malloc"
size = "16MiB"

[[target]]
name = "iqn.2026-11.io.e2e:c"
luns = [ {{ lun = 0, bdev = "MC" }} ]
mappings = [ {{ portal_group = 2, initiator_group = 2 }} ]
"#
        );
    let file = dir.join("after.toml");
    fs::write(&file, &after).unwrap();
    let file = file.to_str().unwrap();
    let expected = [
        "global.max_sessions: 1024 -> 512".to_string(),
        format!("portal group 2 added (127.0.0.1:{p2})"),
        "initiator group 2 added".into(),
        "bdev M1 added".into(),
        "bdev MC added".into(),
        format!("target {IQN_A}: LUN 1 added (bdev M1)"),
        "target iqn.2026-11.io.e2e:c added".into(),
        "global.cpumask: 3 -> 7 (restart to apply)".into(),
    ];
    let dry = json(&ctl(&instance, &["--json", "apply", file, "--dry-run"]));
    assert_eq!(dry["applied"], false, "{dry}");
    assert_eq!(changes(&dry), expected);
    let targets = json(&ctl(&instance, &["--json", "targets"]));
    assert_eq!(targets["targets"].as_array().unwrap().len(), 2, "{targets}");

    let out = json(&ctl(&instance, &["--json", "apply", file]));
    assert_eq!(out["applied"], true, "{out}");
    assert_eq!(changes(&out), expected);
    // C answers on the new portal, A has its LUN 1.
    let c_url = format!("iscsi://127.0.0.1:{p2}/iqn.2026-11.io.e2e:c/0");
    let cap = run_with_timeout(
        Command::new("iscsi-readcapacity16").arg(&c_url),
        Duration::from_secs(30),
    );
    assert!(
        cap.stdout.contains(&format!(
            "RETURNED LOGICAL BLOCK ADDRESS:{}",
            (16 << 11) - 1
        )),
        "{cap}"
    );
    let cap = run_with_timeout(
        Command::new("iscsi-readcapacity16").arg(format!("iscsi://{}/{IQN_A}/1", t.portal())),
        Duration::from_secs(30),
    );
    assert!(
        cap.stdout
            .contains(&format!("RETURNED LOGICAL BLOCK ADDRESS:{}", (8 << 11) - 1)),
        "{cap}"
    );
    // C is not exposed on portal group 1.
    let inq = run_with_timeout(
        Command::new("iscsi-inq").arg(format!("iscsi://{}/iqn.2026-11.io.e2e:c/0", t.portal())),
        Duration::from_secs(30),
    );
    assert!(
        !inq.success() && inq.stderr.contains("Target not found"),
        "{inq}"
    );
    // Once applied, only what needs a restart still differs.
    let again = json(&ctl(&instance, &["--json", "apply", file]));
    assert_eq!(
        changes(&again),
        ["global.cpumask: 3 -> 7 (restart to apply)"]
    );
    let human = ctl(&instance, &["apply", file, "--dry-run"]);
    human.assert_success();
    assert_eq!(
        human.stdout,
        "(dry run) global.cpumask: 3 -> 7 (restart to apply)\n"
    );

    // And back: everything added goes, the new portal stops listening.
    let first = dir.join("before.toml");
    fs::write(&first, &before).unwrap();
    let out = json(&ctl(
        &instance,
        &["--json", "apply", first.to_str().unwrap()],
    ));
    assert_eq!(
        changes(&out),
        [
            "global.max_sessions: 512 -> 1024".to_string(),
            "portal group 2 removed".into(),
            "initiator group 2 removed".into(),
            "bdev M1 removed".into(),
            "bdev MC removed".into(),
            format!("target {IQN_A}: LUN 1 removed"),
            "target iqn.2026-11.io.e2e:c removed".into(),
        ]
    );
    let p2_addr: std::net::SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    assert!(
        std::net::TcpStream::connect(p2_addr).is_err(),
        "port {p2} closed"
    );
    let now = ctl(&instance, &["config"]);
    assert_eq!(now.stdout, before);

    // A file with an error changes nothing and names the line.
    let broken = dir.join("broken.toml");
    fs::write(
        &broken,
        before.replace("size = 67108864", "size = \"lots\""),
    )
    .unwrap();
    let bad = ctl(&instance, &["apply", broken.to_str().unwrap()]);
    assert_eq!(bad.code(), Some(2), "{bad}");
    assert!(bad.stderr.contains("broken.toml:"), "{bad}");

    assert_verified(&dir, fio.join().unwrap());
    t.assert_running();
}
