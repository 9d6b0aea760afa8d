//! The systemd units (scripts/systemd/*.service.in, rendered by scripts/install.sh) pass
//! `systemd-analyze verify` with this build's binaries, and the example configuration
//! install.sh puts in /etc passes `iscsi-tgt --check`.

use e2e::{artifacts_dir, run_with_timeout, target_bin, workspace_root};
use std::fs;
use std::process::Command;
use std::time::Duration;

#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    let dir = artifacts_dir().join(format!("units-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let bindir = target_bin().parent().unwrap().to_path_buf();
    let mut render = Command::new("bash");
    render
        .arg(workspace_root().join("scripts/install.sh"))
        .arg("--render-units")
        .arg(&dir)
        .env("BINDIR", &bindir)
        .env("LIBDIR", workspace_root().join("scripts"))
        .env("DOCDIR", workspace_root());
    let out = run_with_timeout(&mut render, Duration::from_secs(30));
    assert!(out.success(), "{out}");
    let units: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(units.len(), 5, "{units:?}");
    let unit = fs::read_to_string(dir.join("iscsi-tgt.service")).unwrap();
    assert!(unit.contains(&format!(
        "ExecStart={}/iscsi-tgt --config",
        bindir.display()
    )));
    assert!(unit.contains("ExecReload=") && unit.contains("iscsictl apply"));
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").args(&units);
    let out = run_with_timeout(&mut verify, Duration::from_secs(60));
    assert!(out.success(), "systemd-analyze verify: {out}");
    // Warnings about our units fail too (other units of the machine may warn: ignored).
    let ours: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| l.contains("iscsi-tgt"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn example_configuration_checks() {
    let mut check = Command::new(target_bin());
    check
        .arg("--config")
        .arg(workspace_root().join("scripts/systemd/iscsi-tgt.example.toml"))
        .arg("--check");
    let out = run_with_timeout(&mut check, Duration::from_secs(30));
    assert!(out.success(), "{out}");
}
