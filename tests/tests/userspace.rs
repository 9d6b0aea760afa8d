//! The userspace TCP transports (smoltcp) end to end: the target runs in a network namespace
//! of the test's own with its stack on a TAP interface, or on a DPDK port (`net_af_packet`
//! on one end of a veth pair), and libiscsi tools and fio connect from the kernel side.
//!
//! The DPDK tests need a binary built with `--features dpdk`; without it they are skipped,
//! unless `E2E_REQUIRE_DPDK=1` (CI) makes that a failure. (The full `iscsi-test-cu` claimed
//! list over both transports runs in `compliance.rs`.)

use e2e::{
    artifacts_dir, dpdk_available, fio_bin, parse_fio_terse, run_with_timeout, target_bin,
    userspace_portal_group, NetNs, Target, Wire,
};
use std::fs;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

const FIO_TIMEOUT: Duration = Duration::from_secs(300);
const IQN_A: &str = "iqn.2026-11.io.iscsi-tgt:tap-a";
const IQN_B: &str = "iqn.2026-11.io.iscsi-tgt:tap-b";

/// One namespace-and-fio test at a time on the 2-core CI machines.
static SERIAL: Mutex<()> = Mutex::new(());

/// Two targets behind one userspace portal group (and a kernel portal group on the
/// namespace's loopback for target A): with two reactors, target B's device lives on
/// reactor 1 while the stack and its connections stay on reactor 0.
fn config(wire: &Wire, net: u8) -> String {
    let pg = userspace_portal_group(
        wire,
        net,
        "listen_backlog = 4\nsocket_buffer = \"256KiB\"\n",
    );
    format!(
        r#"
[global]
cpumask = "0x3"

{pg}
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

/// A namespace with the wire and the target running on it; None (test skipped) where
/// namespaces cannot be made, or for DPDK in a build without it.
fn setup(label: &str, wire: Wire, net: u8) -> Option<(NetNs, Target)> {
    if matches!(wire, Wire::DpdkVeth { .. }) && !dpdk_available() {
        return None;
    }
    let ns = match NetNs::new(label) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipped: cannot make a network namespace here: {e}");
            return None;
        }
    };
    ns.add_wire(&wire, &format!("10.{net}.0.1/24"))
        .expect("network interface");
    let portal = format!("10.{net}.0.2:3260").parse().unwrap();
    let t = Target::start_in_netns(label, &ns, &config(&wire, net), portal, IQN_A, 0, &[]);
    Some((ns, t))
}

#[test]
fn discovery_and_login_over_tap() {
    discovery_and_login("tap-disc", Wire::Tap { dev: "ttap1" }, 81, "tap ttap1");
}

#[test]
fn discovery_and_login_over_dpdk() {
    let wire = Wire::DpdkVeth {
        kernel: "dveth1",
        dpdk: "dveth1p",
        queues: 1,
    };
    discovery_and_login(
        "dpdk-disc",
        wire,
        84,
        "dpdk port 0 queue 0 stack 0 of 2 (software steering)",
    );
}

fn discovery_and_login(label: &str, wire: Wire, net: u8, described: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, mut t)) = setup(label, wire, net) else {
        return;
    };
    let portal = format!("10.{net}.0.2:3260");
    let out = run_with_timeout(
        ns.command("iscsi-ls")
            .args(["-s", &format!("iscsi://{portal}")]),
        Duration::from_secs(30),
    );
    out.assert_success();
    // SendTargets lists both targets with the TAP portal; A also with its kernel portal.
    assert!(
        out.stdout
            .contains(&format!("Target:{IQN_A} Portal:{portal},1")),
        "{out}"
    );
    assert!(
        out.stdout
            .contains(&format!("Target:{IQN_B} Portal:{portal},1")),
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
            .arg(format!("iscsi://{portal}/{IQN_B}/0")),
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
                .arg(format!("iscsi://{portal}/{IQN_A}/0")),
            Duration::from_secs(30),
        );
        assert!(out.success(), "login {i}: {out}");
    }
    t.assert_running();
    let log = t.log_contents();
    assert!(
        log.contains(&format!("userspace TCP on {described} (10.{net}.0.2/24)")),
        "{log}"
    );
}

/// fio with crc32c verify over the TAP stack against both targets at once (target B's
/// device on the other reactor), zero errors, every byte read back.
#[test]
fn fio_verify_over_tap_two_targets() {
    fio_verify_two_targets("tap-fio", Wire::Tap { dev: "ttap2" }, 82);
}

/// The same over DPDK (`net_af_packet` on a veth pair).
#[test]
fn fio_verify_over_dpdk_two_targets() {
    let wire = Wire::DpdkVeth {
        kernel: "dveth2",
        dpdk: "dveth2p",
        queues: 1,
    };
    fio_verify_two_targets("dpdk-fio", wire, 85);
}

fn fio_verify_two_targets(label: &str, wire: Wire, net: u8) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, mut t)) = setup(label, wire, net) else {
        return;
    };
    let portal = format!("10.{net}.0.2:3260");
    let dir = artifacts_dir().join(label);
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
                e2e::fio_iscsi_filename(&portal, iqn, 0)
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

/// Two reactors, each with its own stack on its own queue of one DPDK port (AF_PACKET
/// fanout, `qpairs=2`, hashes each flow to one queue): a dozen sessions spread over both
/// stacks and carry verified I/O. A segment of a flow arriving at the other reactor's stack
/// would find no socket there and reset the connection, failing fio.
#[test]
fn dpdk_two_queues_keep_each_flow_on_its_reactor() {
    flows_over_two_reactors("dpdk-2q", "dveth3", "dveth3p", 2, 86);
}

/// The same with a single-queue port: reactor 0 steers each flow to its reactor's stack in
/// software, and sends for the other stack.
#[test]
fn dpdk_one_queue_steers_each_flow_to_its_reactor() {
    flows_over_two_reactors("dpdk-1q", "dveth4", "dveth4p", 1, 87);
}

fn flows_over_two_reactors(
    label: &str,
    kernel: &'static str,
    dpdk: &'static str,
    queues: u8,
    net: u8,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wire = Wire::DpdkVeth {
        kernel,
        dpdk,
        queues,
    };
    let Some((ns, mut t)) = setup(label, wire, net) else {
        return;
    };
    let portal = format!("10.{net}.0.2:3260");
    let dir = artifacts_dir().join(label);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let terse = dir.join("fio.terse");
    let per_job: u64 = 8 << 20;
    let mut cmd = ns.command(fio_bin().to_str().unwrap());
    cmd.current_dir(&dir)
        .arg("--name=flows")
        .arg("--ioengine=libiscsi")
        .arg(format!(
            "--filename={}",
            e2e::fio_iscsi_filename(&portal, IQN_A, 0)
        ))
        .args([
            "--numjobs=12",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
            "--runtime=240",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--size={per_job}"))
        .arg(format!("--offset_increment={per_job}"))
        .arg(format!("--output={}", terse.display()));
    let out = run_with_timeout(&mut cmd, FIO_TIMEOUT);
    let text = fs::read_to_string(&terse).unwrap_or_default();
    fs::write(dir.join("fio.log"), format!("{out}\n{text}")).unwrap();
    assert!(out.success(), "fio:\n{out}\n{text}");
    let jobs = parse_fio_terse(&text).unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(jobs.len(), 12, "{text}");
    for j in &jobs {
        assert_eq!(j.error, 0, "{j:?}");
        assert_eq!(j.read_kib * 1024, per_job, "verified: {j:?}");
    }
    let (status, _) = t.stop().expect("stopped");
    assert!(status.success(), "{status:?}");
    let log = t.log_contents();
    // Each reactor's stack accepted some of the connections (counters logged at exit).
    let tag = format!("(10.{net}.0.2/24): ");
    let accepted: Vec<u64> = log
        .lines()
        .filter(|l| l.contains(&tag) && l.contains("connections accepted"))
        .map(|l| {
            let rest = &l[l.find(&tag).unwrap() + tag.len()..];
            rest.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(accepted.len(), 2, "one stack per reactor:\n{log}");
    assert!(
        accepted.iter().all(|&n| n > 0),
        "connections per stack {accepted:?}:\n{log}"
    );
    // 12 fio sessions (and the start-up probe).
    assert!(accepted.iter().sum::<u64>() >= 12, "{log}");
}
