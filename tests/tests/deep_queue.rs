//! Deep command queues on one session: `queue_depth = 256` and `1024`.
//!
//! * the login grants exactly `queue_depth` commands (MaxCmdSN - ExpCmdSN + 1),
//! * iscsi-perf keeps 512 random 4 KiB-block reads in flight on one session for
//!   3 s: it must finish cleanly with a positive average, the target log (at
//!   debug level, where dropped out-of-window commands and rejects are logged)
//!   must show no protocol error, no dropped command, no reject,
//! * then fio (8 sessions, random 4k writes with crc32c verify) on the same
//!   target must read back everything it wrote.

use e2e::{artifacts_dir, fio_bin, parse_fio_terse, run_with_timeout, Target};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

const IQN: &str = "iqn.2026-11.io.e2e:deep";
const MIB: u64 = 1 << 20;
const FIO_JOBS: u64 = 8;
const FIO_JOB_BYTES: u64 = 16 * MIB;

/// One heavy test at a time (2-core machines).
static SERIAL: Mutex<()> = Mutex::new(());

fn config(queue_depth: u32) -> String {
    format!(
        r#"
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
size = "128MiB"

[[target]]
name = "{IQN}"
queue_depth = {queue_depth}
luns = [ {{ lun = 0, bdev = "M0" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    )
}

/// Log in to a normal session with a raw socket and return the command window
/// the Login Response grants: MaxCmdSN - ExpCmdSN + 1.
fn login_window(portal: &str) -> u32 {
    let mut s = TcpStream::connect(portal).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let text = format!(
        "InitiatorName=iqn.2026-11.io.e2e:window-probe\0SessionType=Normal\0TargetName={IQN}\0\
         HeaderDigest=None\0DataDigest=None\0"
    );
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x43; // immediate | Login Request
    pdu[1] = 0x80 | (1 << 2) | 3; // T, CSG=1 (operational), NSG=3 (full feature)
    let len = text.len() as u32;
    pdu[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x80, 0x00, 0xab, 0xcd, 0x00, 0x01]);
    pdu[16..20].copy_from_slice(&1u32.to_be_bytes()); // ITT
    pdu[24..28].copy_from_slice(&7u32.to_be_bytes()); // CmdSN
    pdu.extend_from_slice(text.as_bytes());
    pdu.resize(48 + ((text.len() + 3) & !3), 0);
    s.write_all(&pdu).expect("send login");
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs).expect("login response");
    assert_eq!(bhs[0] & 0x3f, 0x23, "not a Login Response: {bhs:?}");
    assert_eq!((bhs[36], bhs[37]), (0, 0), "login status");
    let u32_at = |o: usize| u32::from_be_bytes(bhs[o..o + 4].try_into().unwrap());
    let (exp_cmdsn, max_cmdsn) = (u32_at(28), u32_at(32));
    assert_eq!(exp_cmdsn, 7, "ExpCmdSN after a login with CmdSN 7");
    max_cmdsn.wrapping_sub(exp_cmdsn).wrapping_add(1)
}

/// The last "iops average N" iscsi-perf printed (its final summary).
fn iops_average(out: &str) -> Option<u64> {
    let at = out.rfind("iops average ")?;
    out[at + "iops average ".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn log_problems(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            [
                " WARN ",
                " ERROR ",
                "ProtocolError",
                "dropping",
                "reject",
                "NopTimeout",
                "panic",
            ]
            .iter()
            .any(|bad| l.contains(bad))
        })
        // Expected on machines without reserved hugepages: not a problem of the run.
        .filter(|l| !l.contains("no hugepages for a"))
        .collect()
}

fn deep_queue(queue_depth: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Dropped out-of-window commands and rejects are logged at debug level.
    // (Set under the lock; every test of this file sets the same value.)
    if std::env::var_os("E2E_LOG_LEVEL").is_none() {
        std::env::set_var("E2E_LOG_LEVEL", "debug");
    }
    let name = format!("deep-qd{queue_depth}");
    let mut t = Target::start_with_config(&name, &config(queue_depth), IQN, 0);

    assert_eq!(login_window(&t.portal()), queue_depth, "command window");

    // 512 random reads of 8 blocks in flight on one session for 3 s.
    let perf = run_with_timeout(
        Command::new("iscsi-perf")
            .args(["-m", "512", "-b", "8", "-t", "3", "-r"])
            .arg(t.lun_url()),
        Duration::from_secs(30),
    );
    t.assert_running();
    assert!(perf.success(), "iscsi-perf failed:\n{perf}");
    let iops = iops_average(&perf.stdout).unwrap_or_else(|| panic!("no iops average:\n{perf}"));
    assert!(iops > 0, "{perf}");
    assert!(
        perf.stdout
            .contains("performing RANDOM READ with 512 parallel requests"),
        "{perf}"
    );
    assert!(perf.stdout.contains("finished."), "{perf}");
    eprintln!("queue_depth {queue_depth}: iscsi-perf iops average {iops}");
    let log = t.log_contents();
    // iscsi-perf's session ended with its Logout, not with an error.
    let perf_conn = log
        .lines()
        .find(|l| l.contains(":iscsi-perf logged in from"))
        .and_then(|l| l.split("] conn ").nth(1)?.split(':').next())
        .unwrap_or_else(|| panic!("no iscsi-perf login in the log:\n{log}"))
        .to_string();
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("] conn {perf_conn}: closed (")))
        .collect();
    assert_eq!(closed.len(), 1, "{log}");
    assert!(closed[0].ends_with("closed (Logout)"), "{}", closed[0]);
    let problems = log_problems(&log);
    assert!(problems.is_empty(), "target log: {problems:#?}");

    // Then fio verify on the same target: 8 sessions, 16 MiB each.
    let dir = artifacts_dir().join(format!("{name}-fio-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let terse = dir.join("fio.terse");
    let mut cmd = Command::new(fio_bin());
    cmd.current_dir(&dir)
        .arg("--name=deep")
        .arg("--ioengine=libiscsi")
        .arg(format!("--filename={}", t.fio_filename()))
        .arg(format!("--numjobs={FIO_JOBS}"))
        .arg(format!("--size={FIO_JOB_BYTES}"))
        .arg(format!("--offset_increment={FIO_JOB_BYTES}"))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_dump=0",
            "--verify_state_save=0",
            "--randrepeat=0",
            "--runtime=50",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--output={}", terse.display()));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(90));
    let terse_text = fs::read_to_string(&terse).unwrap_or_default();
    t.assert_running();
    assert!(out.success(), "fio failed:\n{out}\n{terse_text}");
    assert!(
        !out.stderr.contains("verify failed") && !terse_text.contains("verify failed"),
        "{out}\n{terse_text}"
    );
    let jobs = parse_fio_terse(&terse_text).unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(jobs.len() as u64, FIO_JOBS, "{terse_text}");
    for j in &jobs {
        assert_eq!(j.error, 0, "{j:?}");
        assert_eq!(j.write_kib * 1024, FIO_JOB_BYTES, "written: {j:?}");
        assert_eq!(j.read_kib * 1024, FIO_JOB_BYTES, "verified: {j:?}");
    }
    let log = t.log_contents();
    let problems = log_problems(&log);
    assert!(problems.is_empty(), "target log after fio: {problems:#?}");
    t.assert_running();
}

#[test]
fn queue_depth_256_with_512_in_flight() {
    deep_queue(256);
}

#[test]
fn queue_depth_1024_with_512_in_flight() {
    deep_queue(1024);
}
