//! IPv6 portals: discovery and login over `[::1]`, and an initiator group
//! whose netmask admits the IPv6 loopback only.
//!
//! The harness's `--listen 127.0.0.1:PORT` replaces the portals of the first
//! portal group, so the IPv6 portal lives in portal group 2. The tests are
//! skipped (with a note) when the machine has no IPv6 loopback.

use e2e::{run_with_timeout, Target};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
const BOTH_IQN: &str = "iqn.2026-11.io.e2e:v6-both";
const V6ONLY_IQN: &str = "iqn.2026-11.io.e2e:v6-only-initiators";

/// A free port on `[::1]`, or None when IPv6 loopback is unavailable.
fn free_port_v6() -> Option<u16> {
    let l = TcpListener::bind("[::1]:0").ok()?;
    Some(l.local_addr().ok()?.port())
}

fn config(v6_port: u16) -> String {
    format!(
        r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:1"]

[[portal_group]]
tag = 2
portals = ["[::1]:{v6_port}"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

[[initiator_group]]
tag = 2
initiators = ["ANY"]
netmasks = ["::1/128"]

[[bdev]]
name = "M0"
type = "malloc"
size = "8MiB"

[[bdev]]
name = "M1"
type = "malloc"
size = "8MiB"

[[target]]
name = "{BOTH_IQN}"
luns = [ {{ lun = 0, bdev = "M0" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }}, {{ portal_group = 2, initiator_group = 1 }} ]

[[target]]
name = "{V6ONLY_IQN}"
luns = [ {{ lun = 0, bdev = "M1" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 2 }}, {{ portal_group = 2, initiator_group = 2 }} ]
"#
    )
}

fn start(name: &str) -> Option<(Target, String)> {
    let Some(port) = free_port_v6() else {
        eprintln!("NOTE: no IPv6 loopback ([::1]:0 cannot be bound); skipping {name}");
        return None;
    };
    let t = Target::start_with_config(name, &config(port), BOTH_IQN, 0);
    Some((t, format!("[::1]:{port}")))
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

#[test]
fn discovery_and_login_over_ipv6() {
    let Some((mut t, v6)) = start("ipv6-both") else {
        return;
    };

    // Through the IPv6 portal: both targets (the initiator is ::1), the first
    // with both its addresses, the second with the same two addresses.
    let out = run_with_timeout(
        Command::new("iscsi-ls").arg(format!("iscsi://{v6}")),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    let mut want = vec![
        format!("Target:{BOTH_IQN} Portal:{},1", t.portal()),
        format!("Target:{BOTH_IQN} Portal:{v6},2"),
        format!("Target:{V6ONLY_IQN} Portal:{},1", t.portal()),
        format!("Target:{V6ONLY_IQN} Portal:{v6},2"),
    ];
    want.sort();
    assert_eq!(sorted_lines(&out.stdout), want, "{out}");

    // INQUIRY and READ CAPACITY over IPv6.
    let out = run_with_timeout(
        Command::new("iscsi-inq").arg(format!("iscsi://{v6}/{BOTH_IQN}/0")),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.trim_end() == "Peripheral Device Type:DIRECT_ACCESS"),
        "{out}"
    );
    let out = run_with_timeout(
        Command::new("iscsi-readcapacity16").arg(format!("iscsi://{v6}/{BOTH_IQN}/0")),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.trim_end() == "Total size:8388608"),
        "{out}"
    );

    // The target saw an IPv6 peer.
    let log = t.log_contents();
    assert!(
        log.contains("logged in from [::1]:"),
        "no login from [::1] in the log:\n{log}"
    );
    t.assert_running();
}

#[test]
fn ipv6_netmask_admits_only_the_ipv6_loopback() {
    let Some((mut t, v6)) = start("ipv6-netmask") else {
        return;
    };

    // Over IPv4 the initiator (127.0.0.1) is not in ::1/128.
    let out = run_with_timeout(Command::new("iscsi-ls").arg(t.portal_url()), TOOL_TIMEOUT);
    out.assert_success();
    let mut want = vec![
        format!("Target:{BOTH_IQN} Portal:{},1", t.portal()),
        format!("Target:{BOTH_IQN} Portal:{v6},2"),
    ];
    want.sort();
    assert_eq!(sorted_lines(&out.stdout), want, "{out}");

    let out = run_with_timeout(
        Command::new("iscsi-inq").arg(format!("iscsi://{}/{V6ONLY_IQN}/0", t.portal())),
        TOOL_TIMEOUT,
    );
    assert!(!out.timed_out, "{out}");
    assert_eq!(out.code(), Some(10), "{out}");
    assert_eq!(
        out.stderr.trim_end(),
        "Login Failed. Failed to log in to target. Status: Authorization failure(514)",
        "{out}"
    );

    // Over IPv6 it is.
    let out = run_with_timeout(
        Command::new("iscsi-inq").arg(format!("iscsi://{v6}/{V6ONLY_IQN}/0")),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    t.assert_running();
}
