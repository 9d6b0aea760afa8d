//! Data integrity through a real initiator: fio's libiscsi engine writes with
//! crc32c verify headers, then reads everything back and checks it.
//!
//! fio prints "queue depth will be capped at 1" for its libiscsi engine (the engine is
//! flagged FIO_SYNCIO), but the engine queues asynchronously and the depth is real: fio's
//! own "IO depths" histogram reaches the configured depth, and 4k random reads at
//! iodepth=32 run over ten times faster than at iodepth=1.

use e2e::{
    artifacts_dir, fio_bin, parse_fio_terse, run_with_timeout, Target, DEFAULT_IQN,
    DEFAULT_LUN_BYTES,
};
use std::fs;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

const FIO_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// The fio tests run one at a time: each starts its own target (1 GiB LUN) and
/// 4 fio processes, too much in parallel on the 2-core CI machines.
static SERIAL: Mutex<()> = Mutex::new(());

/// Start a target and run one fio job description against it; every job must
/// finish with error 0 and must have written and then read back exactly
/// `per_job_bytes` (job i covers [i * per_job_bytes, (i + 1) * per_job_bytes)).
fn run_fio(name: &str, numjobs: u64, per_job_bytes: u64, extra: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut t = Target::start(&format!("fio-{name}"));
    let t = &mut t;
    assert!(numjobs * per_job_bytes <= DEFAULT_LUN_BYTES);
    let dir = artifacts_dir().join(format!("fio-{name}-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let terse = dir.join("fio.terse");
    let mut cmd = Command::new(fio_bin());
    cmd.current_dir(&dir)
        .arg(format!("--name={name}"))
        .arg("--ioengine=libiscsi")
        .arg(format!("--filename={}", t.fio_filename()))
        .arg(format!("--numjobs={numjobs}"))
        .arg(format!("--size={per_job_bytes}"))
        .arg(format!("--offset_increment={per_job_bytes}"))
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_dump=0",
            "--randrepeat=0",
            "--runtime=240",
            "--iodepth=16",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--output={}", terse.display()))
        .args(extra);
    let out = run_with_timeout(&mut cmd, FIO_TIMEOUT);
    let terse_text = fs::read_to_string(&terse).unwrap_or_default();
    fs::write(
        dir.join("fio.log"),
        format!("{out}\n--- terse ---\n{terse_text}"),
    )
    .unwrap();
    t.assert_running();
    assert!(
        out.success(),
        "fio failed:\n{out}\n--- terse ---\n{terse_text}"
    );
    for bad in [
        "verify failed",
        "bad magic",
        "bad header",
        "mismatch",
        "error=",
    ] {
        assert!(
            !out.stdout.contains(bad) && !out.stderr.contains(bad) && !terse_text.contains(bad),
            "fio output mentions {bad:?}:\n{out}\n{terse_text}"
        );
    }
    let jobs = parse_fio_terse(&terse_text).unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(jobs.len() as u64, numjobs, "{terse_text}");
    for j in &jobs {
        assert_eq!(j.name, name);
        assert_eq!(j.error, 0, "{j:?}");
        assert_eq!(j.write_kib * 1024, per_job_bytes, "written: {j:?}");
        // The verify phase read back everything that was written.
        assert_eq!(j.read_kib * 1024, per_job_bytes, "verified: {j:?}");
    }
}

#[test]
fn randwrite_4k_verify_crc32c_4_jobs() {
    run_fio("rw4k", 4, 64 * MIB, &["--rw=randwrite", "--bs=4k"]);
}

/// Sixteen sessions at once, each with 16 commands in flight.
#[test]
fn randwrite_4k_verify_crc32c_16_sessions() {
    run_fio("sessions16", 16, 16 * MIB, &["--rw=randwrite", "--bs=4k"]);
}

#[test]
fn randwrite_mixed_bs_up_to_128k_verify() {
    run_fio(
        "mixed",
        4,
        64 * MIB,
        &["--rw=randwrite", "--bssplit=4k/20:16k/20:64k/30:128k/30"],
    );
}

#[test]
fn seqwrite_128k_verify_crc32c() {
    run_fio("seq128k", 2, 128 * MIB, &["--rw=write", "--bs=128k"]);
}

/// Two reactors, connections spread over both, and connections parked and woken while the
/// run pauses between bursts (idle_park_ms = 20 and fio's thinktime): no I/O may be lost.
#[test]
fn two_reactors_with_parking_verify_crc32c() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped: this machine has {cpus} CPU");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let toml = format!(
        r#"
[global]
cpumask = "0x3"
idle_park_ms = 20
[[portal_group]]
tag = 1
portals = ["127.0.0.1:1"]
[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]
[[bdev]]
name = "M0"
type = "malloc"
size = "256MiB"
[[bdev]]
name = "M1"
type = "malloc"
size = "256MiB"
[[target]]
name = "{DEFAULT_IQN}"
luns = [ {{ lun = 0, bdev = "M0" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
[[target]]
name = "iqn.2026-11.io.iscsi-tgt:second"
luns = [ {{ lun = 0, bdev = "M1" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    );
    let mut t = Target::start_with_config("fio-2r", &toml, DEFAULT_IQN, 0);
    let dir = artifacts_dir().join(format!("fio-2r-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let mut children = Vec::new();
    // One fio per target, 4 sessions each: both devices' homes are busy, and sessions of
    // both targets land on both reactors.
    for (name, iqn) in [
        ("first", DEFAULT_IQN),
        ("second", "iqn.2026-11.io.iscsi-tgt:second"),
    ] {
        let terse = dir.join(format!("{name}.terse"));
        let mut cmd = Command::new(fio_bin());
        cmd.current_dir(&dir)
            .arg(format!("--name={name}"))
            .arg("--ioengine=libiscsi")
            .arg(format!(
                "--filename={}",
                e2e::fio_iscsi_filename(&t.portal(), iqn, 0)
            ))
            .args([
                "--numjobs=4",
                "--size=32M",
                "--offset_increment=32M",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                // Pause 100 ms every 512 I/Os: long enough to be parked, then woken.
                "--thinktime=100ms",
                "--thinktime_blocks=512",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--runtime=240",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .arg(format!("--output={}", terse.display()));
        children.push((
            name,
            terse,
            std::thread::spawn(move || run_with_timeout(&mut cmd, FIO_TIMEOUT)),
        ));
    }
    for (name, terse, h) in children {
        let out = h.join().unwrap();
        let terse_text = fs::read_to_string(&terse).unwrap_or_default();
        assert!(out.success(), "fio {name} failed:\n{out}\n{terse_text}");
        let jobs = parse_fio_terse(&terse_text).unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert_eq!(jobs.len(), 4, "{terse_text}");
        for j in &jobs {
            assert_eq!(j.error, 0, "{j:?}");
            assert_eq!(j.write_kib * 1024, 32 * MIB, "written: {j:?}");
            assert_eq!(j.read_kib * 1024, 32 * MIB, "verified: {j:?}");
        }
    }
    t.assert_running();
    let (status, on_its_own) = t.stop().expect("target was running");
    assert!(status.success() && on_its_own, "clean exit: {status:?}");
    let log = t.log_contents();
    assert!(
        log.contains("reactor 1 on CPU"),
        "two reactors started:\n{log}"
    );
    // "idle connections: N parked, M woken": the pauses parked and woke connections.
    let line = log
        .lines()
        .find(|l| l.contains("idle connections:"))
        .unwrap_or_else(|| panic!("no parking summary in the log:\n{log}"));
    let nums: Vec<u64> = line
        .rsplit("idle connections:")
        .next()
        .unwrap_or("")
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert!(nums[0] >= 8 && nums[1] >= 8, "parked/woken: {line}");
}
