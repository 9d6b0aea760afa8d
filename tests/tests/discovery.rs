//! Discovery, INQUIRY and login failures, driven by libiscsi's command line tools.

use e2e::{run_with_timeout, Target, DEFAULT_IQN};
use std::process::Command;
use std::time::Duration;

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

fn lines(s: &str) -> Vec<&str> {
    s.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn sendtargets_lists_exactly_the_default_target() {
    let t = Target::start("discovery-ls");
    let out = run_with_timeout(Command::new("iscsi-ls").arg(t.portal_url()), TOOL_TIMEOUT);
    out.assert_success();
    // TargetName + TargetAddress "127.0.0.1:PORT,<portal group tag 1>".
    assert_eq!(
        lines(&out.stdout),
        [format!("Target:{} Portal:{},1", t.iqn(), t.portal())],
        "{out}"
    );
}

#[test]
fn sendtargets_with_luns_shows_the_1gib_disk() {
    let t = Target::start("discovery-ls-s");
    let out = run_with_timeout(
        Command::new("iscsi-ls").arg("-s").arg(t.portal_url()),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    let got = lines(&out.stdout);
    assert_eq!(
        got.first().copied(),
        Some(format!("Target:{} Portal:{},1", t.iqn(), t.portal()).as_str()),
        "{out}"
    );
    if !t.is_external() {
        assert_eq!(t.iqn(), DEFAULT_IQN);
        // iscsi-ls prints (last LBA * block size) >> 20: 2097151 * 512 -> 1023M.
        assert_eq!(
            got,
            [
                format!("Target:{DEFAULT_IQN} Portal:{},1", t.portal()).as_str(),
                "Lun:0    Type:DIRECT_ACCESS (Size:1023M)",
            ],
            "{out}"
        );
    }
}

#[test]
fn inquiry_reports_a_connected_direct_access_device() {
    let mut t = Target::start("discovery-inq");
    let out = run_with_timeout(Command::new("iscsi-inq").arg(t.lun_url()), TOOL_TIMEOUT);
    out.assert_success();
    let got = lines(&out.stdout);
    for want in [
        "Peripheral Qualifier:CONNECTED",
        "Peripheral Device Type:DIRECT_ACCESS",
        "Removable:0",
    ] {
        assert!(got.contains(&want), "missing {want:?}:\n{out}");
    }
    assert!(
        got.iter().any(|l| l.starts_with("Vendor:"))
            && got.iter().any(|l| l.starts_with("Product:")),
        "no Vendor/Product lines:\n{out}"
    );
    t.assert_running();
}

#[test]
fn login_to_unknown_target_fails_with_target_not_found() {
    let mut t = Target::start("discovery-nologin");
    let url = format!(
        "iscsi://{}/iqn.2026-11.io.iscsi-tgt:no-such-target/0",
        t.portal()
    );
    let out = run_with_timeout(Command::new("iscsi-inq").arg(&url), TOOL_TIMEOUT);
    assert!(!out.timed_out, "{out}");
    // iscsi-inq exits 10 when the login fails; the target must answer the
    // Login Request with status class 2 / detail 3 = 0x0203 "Not found" (515).
    assert_eq!(out.code(), Some(10), "{out}");
    assert_eq!(
        lines(&out.stderr),
        ["Login Failed. Failed to log in to target. Status: Target not found(515)"],
        "{out}"
    );
    // The target must survive that and still serve a good login.
    t.assert_running();
    let ok = run_with_timeout(Command::new("iscsi-inq").arg(t.lun_url()), TOOL_TIMEOUT);
    ok.assert_success();
}
