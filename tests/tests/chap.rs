//! CHAP at login, through libiscsi's own CHAP (credentials in the URL, the target's in
//! LIBISCSI_CHAP_TARGET_USERNAME/PASSWORD): one-way and mutual, for targets and for
//! discovery, with the refusals the RFC names (login status 0x0201).

use e2e::{run_with_timeout, CmdOutput, Target};
use std::process::Command;
use std::time::Duration;

const CHAP: &str = "iqn.2026-11.io.e2e:chap";
const MUTUAL: &str = "iqn.2026-11.io.e2e:mutual";
const OPEN: &str = "iqn.2026-11.io.e2e:open";

fn config() -> String {
    format!(
        r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["127.0.0.0/8"]

[[auth_group]]
tag = 1
secrets = [ {{ user = "alice", secret = "alice-secret-12", mutual_user = "target-a", mutual_secret = "target-secret-9" }} ]

[[auth_group]]
tag = 2
secrets = [ {{ user = "disco", secret = "disco-secret-12" }} ]

[discovery]
auth_group = 2
require_chap = true

[[bdev]]
name = "M0"
type = "null"
size = "16MiB"

[[bdev]]
name = "M1"
type = "null"
size = "16MiB"

[[bdev]]
name = "M2"
type = "null"
size = "16MiB"

[[target]]
name = "{CHAP}"
auth_group = 1
require_chap = true
luns = [ {{ lun = 0, bdev = "M0" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]

[[target]]
name = "{MUTUAL}"
auth_group = 1
mutual_chap = true
luns = [ {{ lun = 0, bdev = "M1" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]

[[target]]
name = "{OPEN}"
luns = [ {{ lun = 0, bdev = "M2" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    )
}

fn inq(url: &str, target_creds: Option<(&str, &str)>) -> CmdOutput {
    let mut c = Command::new("iscsi-inq");
    c.arg(url);
    if let Some((u, p)) = target_creds {
        c.env("LIBISCSI_CHAP_TARGET_USERNAME", u)
            .env("LIBISCSI_CHAP_TARGET_PASSWORD", p);
    }
    run_with_timeout(&mut c, Duration::from_secs(30))
}

#[test]
fn chap_one_way_mutual_and_discovery() {
    let mut t = Target::start_with_config("chap", &config(), OPEN, 0);
    let p = t.portal();
    let url = |creds: &str, iqn: &str| format!("iscsi://{creds}{p}/{iqn}/0");

    // One-way: the right secret logs in; a wrong one, an unknown user, none at all do not.
    let ok = inq(&url("alice%alice-secret-12@", CHAP), None);
    assert!(ok.success(), "{ok}");
    assert!(ok.stdout.contains("iscsi-tgt"), "{ok}");
    for creds in ["alice%wrong-secret-1@", "mallory%alice-secret-12@", ""] {
        let bad = inq(&url(creds, CHAP), None);
        assert!(!bad.success(), "{creds}: {bad}");
        assert!(
            bad.stderr.contains("Authentication failure"),
            "{creds}: {bad}"
        );
    }
    // Skipping the security stage is refused the same way.
    assert_eq!(
        e2e::raw::login_status(&p, "iqn.2026-11.io.e2e:skip", CHAP),
        (2, 1)
    );
    assert_eq!(
        e2e::raw::login_status(&p, "iqn.2026-11.io.e2e:skip", OPEN),
        (0, 0)
    );

    // Mutual: the initiator checks the target's answer; without asking, it is refused.
    let ok = inq(
        &url("alice%alice-secret-12@", MUTUAL),
        Some(("target-a", "target-secret-9")),
    );
    assert!(ok.success(), "{ok}");
    let fooled = inq(
        &url("alice%alice-secret-12@", MUTUAL),
        Some(("target-a", "not-the-secret")),
    );
    assert!(!fooled.success(), "{fooled}");
    assert!(
        fooled.stderr.contains("Invalid CHAP_R response"),
        "{fooled}"
    );
    let one_way = inq(&url("alice%alice-secret-12@", MUTUAL), None);
    assert!(!one_way.success(), "{one_way}");
    // A target without CHAP takes logins without credentials.
    assert!(inq(&url("", OPEN), None).success());

    // Discovery CHAP guards SendTargets.
    let ls = |creds: &str| {
        run_with_timeout(
            Command::new("iscsi-ls").arg(format!("iscsi://{creds}{p}")),
            Duration::from_secs(30),
        )
    };
    let bad = ls("");
    assert!(!bad.success() && !bad.stdout.contains(CHAP), "{bad}");
    let bad = ls("disco%wrong-secret-12@");
    assert!(!bad.success() && !bad.stdout.contains(CHAP), "{bad}");
    let good = ls("disco%disco-secret-12@");
    assert!(good.success(), "{good}");
    for iqn in [CHAP, MUTUAL, OPEN] {
        assert!(good.stdout.contains(&format!("Target:{iqn} ")), "{good}");
    }

    t.assert_running();
    let log = t.log_contents();
    assert!(log.contains("CHAP user \"alice\" authenticated"), "{log}");
    assert!(
        log.contains("wrong CHAP response for user \"alice\""),
        "{log}"
    );
    assert!(log.contains("mutual CHAP required"), "{log}");
    for secret in [
        "alice-secret-12",
        "target-secret-9",
        "disco-secret-12",
        "wrong-secret",
    ] {
        assert!(!log.contains(secret), "a secret in the log: {secret}");
    }
}
