//! The userspace TCP transport (smoltcp) over a TAP interface, end to end: the target runs
//! in a network namespace of the test's own with its stack on a TAP interface, and libiscsi
//! tools and fio connect from the kernel side of that interface.
//!
//! (The full `iscsi-test-cu` claimed list over TAP runs in `compliance.rs`.)

use e2e::{artifacts_dir, fio_bin, parse_fio_terse, run_with_timeout, target_bin, NetNs, Target};
use std::fs;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

const FIO_TIMEOUT: Duration = Duration::from_secs(300);
const IQN_A: &str = "iqn.2026-11.io.iscsi-tgt:tap-a";
const IQN_B: &str = "iqn.2026-11.io.iscsi-tgt:tap-b";

/// One namespace-and-fio test at a time on the 2-core CI machines.
static SERIAL: Mutex<()> = Mutex::new(());

/// Two targets behind one TAP portal group (and a kernel portal group on the namespace's
/// loopback for target A): with two reactors, target B's device lives on reactor 1 while
/// the stack and its connections stay on reactor 0.
fn config(dev: &str, net: u8) -> String {
    format!(
        r#"
[global]
cpumask = "0x3"

[[portal_group]]
tag = 1
portals = ["10.{net}.0.2:3260"]
transport = "tap"
[portal_group.userspace]
device = "{dev}"
addresses = ["10.{net}.0.2/24"]
listen_backlog = 4
socket_buffer = "256KiB"

[[portal_group]]
tag = 2
portals = ["127.0.0.1:3260"]

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
size = "256MiB"

[[target]]
name = "{IQN_A}"
luns = [ {{ lun = 0, bdev = "A" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }}, {{ portal_group = 2, initiator_group = 1 }} ]

[[target]]
name = "{IQN_B}"
luns = [ {{ lun = 0, bdev = "B" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    )
}

/// A namespace with a TAP interface and the target running on it; None (test skipped)
/// where namespaces cannot be made.
fn setup(label: &str, dev: &str, net: u8) -> Option<(NetNs, Target)> {
    let ns = match NetNs::new(label) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipped: cannot make a network namespace here: {e}");
            return None;
        }
    };
    ns.add_tap(dev, &format!("10.{net}.0.1/24"))
        .expect("TAP interface");
    let portal = format!("10.{net}.0.2:3260").parse().unwrap();
    let t = Target::start_in_netns(label, &ns, &config(dev, net), portal, IQN_A, 0, &[]);
    Some((ns, t))
}

#[test]
fn discovery_and_login_over_tap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, mut t)) = setup("tap-disc", "ttap1", 81) else {
        return;
    };
    let out = run_with_timeout(
        ns.command("iscsi-ls")
            .args(["-s", "iscsi://10.81.0.2:3260"]),
        Duration::from_secs(30),
    );
    out.assert_success();
    // SendTargets lists both targets with the TAP portal; A also with its kernel portal.
    assert!(
        out.stdout
            .contains(&format!("Target:{IQN_A} Portal:10.81.0.2:3260,1")),
        "{out}"
    );
    assert!(
        out.stdout
            .contains(&format!("Target:{IQN_B} Portal:10.81.0.2:3260,1")),
        "{out}"
    );
    assert!(
        out.stdout
            .contains(&format!("Target:{IQN_A} Portal:127.0.0.1:3260,2")),
        "{out}"
    );
    assert_eq!(
        out.stdout
            .matches("Lun:0    Type:DIRECT_ACCESS (Size:255M)")
            .count(),
        3,
        "{out}"
    );
    // Standard INQUIRY through a login over the userspace stack.
    let out = run_with_timeout(
        ns.command("iscsi-inq")
            .arg(format!("iscsi://10.81.0.2:3260/{IQN_B}/0")),
        Duration::from_secs(30),
    );
    out.assert_success();
    assert!(
        out.stdout.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{out}"
    );
    // Many short sessions in a row: listeners are replenished and closed sockets reaped.
    for i in 0..40 {
        let out = run_with_timeout(
            ns.command("iscsi-inq")
                .arg(format!("iscsi://10.81.0.2:3260/{IQN_A}/0")),
            Duration::from_secs(30),
        );
        assert!(out.success(), "login {i}: {out}");
    }
    t.assert_running();
    let log = t.log_contents();
    assert!(
        log.contains("userspace TCP on tap ttap1 (10.81.0.2/24)"),
        "{log}"
    );
}

/// fio with crc32c verify over the TAP stack against both targets at once (target B's
/// device on the other reactor), zero errors, every byte read back.
#[test]
fn fio_verify_over_tap_two_targets() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, mut t)) = setup("tap-fio", "ttap2", 82) else {
        return;
    };
    let dir = artifacts_dir().join("tap-fio");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let per_job: u64 = 32 << 20;
    let mut runs = Vec::new();
    for (name, iqn, bs) in [
        ("a", IQN_A, "--bssplit=4k/20:16k/20:64k/30:128k/30"),
        ("b", IQN_B, "--bs=4k"),
    ] {
        let terse = dir.join(format!("{name}.terse"));
        let mut cmd = ns.command(fio_bin().to_str().unwrap());
        cmd.current_dir(&dir)
            .arg(format!("--name={name}"))
            .arg("--ioengine=libiscsi")
            .arg(format!(
                "--filename={}",
                e2e::fio_iscsi_filename("10.82.0.2:3260", iqn, 0)
            ))
            .args([
                "--numjobs=2",
                "--rw=randwrite",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--randrepeat=0",
                "--runtime=240",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .arg(bs)
            .arg(format!("--size={per_job}"))
            .arg(format!("--offset_increment={per_job}"))
            .arg(format!("--output={}", terse.display()));
        runs.push((
            name,
            terse,
            std::thread::spawn(move || run_with_timeout(&mut cmd, FIO_TIMEOUT)),
        ));
    }
    // Every fio finishes (or times out) before anything is asserted.
    let done: Vec<_> = runs
        .into_iter()
        .map(|(name, terse, h)| (name, terse, h.join().unwrap()))
        .collect();
    for (name, terse, out) in done {
        let text = fs::read_to_string(&terse).unwrap_or_default();
        fs::write(dir.join(format!("{name}.log")), format!("{out}\n{text}")).unwrap();
        assert!(out.success(), "fio {name}:\n{out}\n{text}");
        let jobs = parse_fio_terse(&text).unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert_eq!(jobs.len(), 2, "{text}");
        for j in &jobs {
            assert_eq!(j.error, 0, "{j:?}");
            assert_eq!(j.write_kib * 1024, per_job, "written: {j:?}");
            assert_eq!(j.read_kib * 1024, per_job, "verified: {j:?}");
        }
    }
    t.assert_running();
    // A clean stop with sessions gone.
    let (status, graceful) = t.stop().expect("stopped");
    assert!(status.success() && graceful, "{status:?}");
}

/// A DPDK portal group in a build without the `dpdk` feature is refused at start with a
/// message that says how to get one.
#[test]
fn dpdk_transport_without_the_feature_is_a_clear_error() {
    let version = run_with_timeout(
        Command::new(target_bin()).arg("--version"),
        Duration::from_secs(10),
    );
    if version.stdout.contains("dpdk") {
        eprintln!("skipped: this build has the dpdk feature");
        return;
    }
    let dir = artifacts_dir().join("dpdk-missing");
    fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    fs::write(
        &cfg,
        r#"
[[portal_group]]
tag = 1
portals = ["10.83.0.2:3260"]
transport = "dpdk"
[portal_group.userspace]
device = "net_tap0"
addresses = ["10.83.0.2/24"]
"#,
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(target_bin())
            .arg("--config")
            .arg(&cfg)
            .args(["--instance", "e2e-dpdk-missing"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(
            "portal group 1: transport \"dpdk\" needs a build with the cargo feature `dpdk`"
        ),
        "{out}"
    );
}
