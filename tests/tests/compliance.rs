//! libiscsi's SCSI/iSCSI conformance suite (`iscsi-test-cu -d -t ALL`) against
//! a fresh target.
//!
//! * every test in tests/claimed-tests.txt must pass (and not be skipped),
//! * the CUnit run summary must report 0 failed tests,
//! * the run must be complete: the parsed results must cover exactly the tests
//!   `iscsi-test-cu -l` lists for the ALL family.
//!
//! It runs on one reactor (the default); on two reactors with two paths (two portal groups,
//! the second given to iscsi-test-cu as its multipath URL, so the MultipathIO tests run);
//! with CRC32C header digests; and over the userspace TCP stack (smoltcp) in a network
//! namespace of its own: on a TAP interface, and on a DPDK port (`net_af_packet` on a veth
//! pair; needs a build with `--features dpdk`). Claimed tests that need a second path
//! (`ALL.MultipathIO.*`) are only required of the two-path run.
//!
//! Full output: target/e2e/<label>-iscsi-test-cu.log; really passing tests (candidates
//! for the claimed list): target/e2e/<label>-iscsi-test-cu-passing.txt.

use e2e::{
    artifacts_dir, dpdk_available, free_port, malloc_bdev, one_lun_config, parse_claimed,
    parse_iscsi_test_cu, run_with_timeout, userspace_portal_group, workspace_root, NetNs, Target,
    Wire,
};
use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::time::Duration;

const FAMILY: &str = "ALL";

fn cu_timeout() -> Duration {
    let secs = std::env::var("E2E_CU_TIMEOUT_SECS")
        .ok()
        .map(|s| s.parse().expect("E2E_CU_TIMEOUT_SECS is a number"))
        .unwrap_or(15 * 60);
    Duration::from_secs(secs)
}

fn listed_tests() -> BTreeSet<String> {
    let out = run_with_timeout(
        Command::new("iscsi-test-cu").arg("-l"),
        Duration::from_secs(30),
    );
    out.assert_success();
    let prefix = format!("{FAMILY}.");
    let set: BTreeSet<String> = out
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&prefix) && l.split('.').count() == 3)
        .map(String::from)
        .collect();
    assert!(
        set.len() > 100,
        "iscsi-test-cu -l lists only {} tests",
        set.len()
    );
    set
}

#[test]
fn iscsi_test_cu_all() {
    run_suite("compliance", &[]);
}

/// The same suite with two reactors and two paths: the connections of the run spread over
/// both reactors while the device lives on one, so commands cross between reactors; the
/// target is reached through two portal groups (127.0.0.1 and 127.0.0.2), and the second is
/// iscsi-test-cu's multipath URL (the same LUN through another target port).
#[test]
fn iscsi_test_cu_all_two_reactors_two_paths() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped: this machine has {cpus} CPU");
        return;
    }
    let iqn = e2e::DEFAULT_IQN;
    let second = free_port();
    // The one-LUN configuration with a second portal group mapped too.
    let toml = one_lun_config("cpumask = \"0x3\"", &malloc_bdev("Malloc0", "1GiB"), "Malloc0")
        .replace(
            "[[initiator_group]]",
            &format!("[[portal_group]]\ntag = 2\nportals = [\"127.0.0.2:{second}\"]\n\n[[initiator_group]]"),
        )
        .replace(
            "mappings = [ { portal_group = 1, initiator_group = 1 } ]",
            "mappings = [ { portal_group = 1, initiator_group = 1 }, { portal_group = 2, initiator_group = 1 } ]",
        );
    assert!(
        toml.contains("127.0.0.2") && toml.contains("portal_group = 2"),
        "{toml}"
    );
    let t = Target::start_with_config("compliance-2r", &toml, iqn, 0);
    let path2 = format!("iscsi://127.0.0.2:{second}/{iqn}/0");
    let mut t = run_suite_paths("compliance-2r", t, None, "", Some(&path2));
    let log = t.log_contents();
    assert!(log.contains(&format!("127.0.0.2:{second}")), "{log}");
    t.stop();
}

/// The suite with CRC32C header digests on every connection: the target requires them
/// (libiscsi offers "None,CRC32C" and computes and checks them; it has no data digests,
/// which tests/digests.rs covers with a raw client).
#[test]
fn iscsi_test_cu_all_header_digests() {
    let iqn = e2e::DEFAULT_IQN;
    let toml = one_lun_config(
        "header_digest = \"crc32c\"",
        &malloc_bdev("Malloc0", "1GiB"),
        "Malloc0",
    );
    let t = Target::start_with_config("compliance-hd", &toml, iqn, 0);
    let mut t = run_suite_on("compliance-hd", t, None, "");
    let log = t.log_contents();
    assert!(log.contains("digests CRC32C/None"), "{log}");
    assert!(
        !log.contains("digests None/None)"),
        "every connection: {log}"
    );
    assert!(!log.contains("digest error"), "{log}");
    t.stop();
}

/// The suite over the userspace TCP stack: the target runs smoltcp on a TAP interface
/// inside a network namespace, and iscsi-test-cu connects from the kernel side of it.
#[test]
fn iscsi_test_cu_all_tap() {
    run_suite_userspace("compliance-tap", Wire::Tap { dev: "cutap0" }, 78);
}

/// The suite over DPDK: smoltcp on a DPDK `net_af_packet` port on one end of a veth pair.
#[test]
fn iscsi_test_cu_all_dpdk() {
    if !dpdk_available() {
        return;
    }
    let wire = Wire::DpdkVeth {
        kernel: "cuveth0",
        dpdk: "cuveth0p",
        queues: 1,
    };
    run_suite_userspace("compliance-dpdk", wire, 79);
}

fn run_suite_userspace(label: &str, wire: Wire, net: u8) {
    let ns = match NetNs::new(label) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipped: cannot make a network namespace here: {e}");
            return;
        }
    };
    ns.add_wire(&wire, &format!("10.{net}.0.1/24"))
        .expect("network interface");
    let iqn = "iqn.2026-11.io.iscsi-tgt:userspace";
    let pg = userspace_portal_group(&wire, net, "");
    let toml = format!(
        r#"
{pg}

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

[[bdev]]
name = "Malloc0"
type = "malloc"
size = "1GiB"

[[target]]
name = "{iqn}"
luns = [ {{ lun = 0, bdev = "Malloc0" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    );
    let portal = format!("10.{net}.0.2:3260").parse().unwrap();
    let t = Target::start_in_netns(label, &ns, &toml, portal, iqn, 0, &[]);
    run_suite_on(label, t, Some(&ns), "");
}

fn run_suite(label: &str, args: &[&str]) {
    let t = Target::start_with_args(label, args);
    run_suite_on(label, t, None, "");
}

/// Runs the suite against `t` (its URL plus `url_args`); returns the target, still running.
fn run_suite_on(label: &str, t: Target, ns: Option<&NetNs>, url_args: &str) -> Target {
    run_suite_paths(label, t, ns, url_args, None)
}

/// Claimed tests that need iscsi-test-cu's second (multipath) URL.
const NEEDS_SECOND_PATH: &str = "ALL.MultipathIO.";

/// [`run_suite_on`] with an optional second path to the same LUN.
fn run_suite_paths(
    label: &str,
    mut t: Target,
    ns: Option<&NetNs>,
    url_args: &str,
    second: Option<&str>,
) -> Target {
    let claimed_path = workspace_root().join("tests/claimed-tests.txt");
    let claimed = parse_claimed(
        &fs::read_to_string(&claimed_path)
            .unwrap_or_else(|e| panic!("{}: {e}", claimed_path.display())),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let listed = listed_tests();

    let mut cu = match ns {
        Some(ns) => ns.command("iscsi-test-cu"),
        None => Command::new("iscsi-test-cu"),
    };
    cu.args(["-d", "-t", FAMILY])
        .arg(format!("{}{url_args}", t.lun_url()));
    if let Some(url) = second {
        cu.arg(url);
    }
    let out = run_with_timeout(&mut cu, cu_timeout());
    let log = artifacts_dir().join(format!("{label}-iscsi-test-cu.log"));
    fs::write(&log, format!("{out}\n")).expect("write iscsi-test-cu.log");
    eprintln!(
        "iscsi-test-cu took {:.1?}; full output in {}",
        out.elapsed,
        log.display()
    );
    assert!(
        !out.timed_out,
        "iscsi-test-cu timed out after {:?}; see {}",
        cu_timeout(),
        log.display()
    );
    t.assert_running();

    let report = parse_iscsi_test_cu(&out.stdout, FAMILY).unwrap_or_else(|e| {
        panic!(
            "cannot parse iscsi-test-cu output ({e}); see {}",
            log.display()
        )
    });

    // Completeness: exactly the listed tests ran.
    let ran: BTreeSet<String> = report.tests.iter().map(|t| t.name.clone()).collect();
    let missing: Vec<_> = listed.difference(&ran).collect();
    let extra: Vec<_> = ran.difference(&listed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "parsed results differ from `iscsi-test-cu -l`: missing {missing:?}, unexpected {extra:?}"
    );

    let passing: Vec<&str> = report.really_passed().map(|t| t.name.as_str()).collect();
    fs::write(
        artifacts_dir().join(format!("{label}-iscsi-test-cu-passing.txt")),
        passing.iter().map(|n| format!("{n}\n")).collect::<String>(),
    )
    .expect("write iscsi-test-cu-passing.txt");

    // Claimed tests.
    let mut problems = Vec::new();
    for name in &claimed {
        if second.is_none() && name.starts_with(NEEDS_SECOND_PATH) {
            continue;
        }
        match report.get(name) {
            None => problems.push(format!("claimed test {name} did not run (unknown name?)")),
            Some(t) if t.outcome == e2e::Outcome::Failed => problems.push(format!(
                "claimed test {name} FAILED: {}",
                t.output.join(" | ")
            )),
            Some(t) if t.skipped => problems.push(format!(
                "claimed test {name} was SKIPPED: {}",
                t.output.join(" | ")
            )),
            Some(_) => {}
        }
    }

    let claimed_set: BTreeSet<&str> = claimed.iter().map(String::as_str).collect();
    let unclaimed: Vec<&str> = passing
        .iter()
        .copied()
        .filter(|n| !claimed_set.contains(n))
        .collect();
    let failed: Vec<String> = report
        .failed()
        .map(|t| format!("  {} -- {}", t.name, t.output.join(" | ")))
        .collect();
    let skipped: Vec<String> = report
        .skipped()
        .map(|t| {
            format!(
                "  {} -- {}",
                t.name,
                t.output.first().map(String::as_str).unwrap_or("")
            )
        })
        .collect();

    eprintln!(
        "iscsi-test-cu ({label}): {} tests, {} passed ({} of them skipped), {} failed; {} claimed",
        report.summary.ran,
        report.summary.passed.unwrap_or(0),
        skipped.len(),
        report.summary.failed,
        claimed.len()
    );
    eprintln!("skipped ({}):\n{}", skipped.len(), skipped.join("\n"));
    eprintln!("failed ({}):\n{}", failed.len(), failed.join("\n"));
    eprintln!(
        "passing but not claimed yet ({}; add to tests/claimed-tests.txt):\n{}",
        unclaimed.len(),
        unclaimed.join("\n")
    );

    if report.summary.failed > 0 {
        problems.push(format!(
            "Run Summary reports {} failed tests (must be 0):\n{}",
            report.summary.failed,
            failed.join("\n")
        ));
    } else {
        // iscsi-test-cu exits non-zero iff a test failed.
        assert!(
            out.success(),
            "0 failed tests but iscsi-test-cu exited {:?}",
            out.status
        );
    }
    assert!(
        problems.is_empty(),
        "compliance problems (full output {}):\n{}",
        log.display(),
        problems.join("\n")
    );
    t
}
