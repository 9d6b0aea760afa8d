//! The remote-initiator benchmark runner (scripts/bench/remote.sh) exercised against the
//! local target over loopback with fio's libiscsi engine and a short run: the report, the
//! chart, and a second run compared with the first as its baseline. The open-iscsi path's
//! job files (the same files, libaio on a block device) are checked with `fio --parse-only`.

use e2e::{artifacts_dir, fio_bin, run_with_timeout, workspace_root, Target};
use std::fs;
use std::process::Command;
use std::time::Duration;

fn remote(t: &Target, out: &std::path::Path, baseline: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("scripts/bench/remote.sh"))
        .args([
            "--mode",
            "libiscsi",
            "--portal",
            &t.portal(),
            "--target",
            t.iqn(),
        ])
        .args(["--runtime", "1", "--reps", "1"])
        .args([
            "--only",
            "randread-4k-qd1,write-128k-qd8,randread-4k-qd8-2s",
        ])
        .arg("--out")
        .arg(out)
        .env("FIO", fio_bin());
    if let Some(b) = baseline {
        cmd.arg("--baseline").arg(b);
    }
    let o = run_with_timeout(&mut cmd, Duration::from_secs(120));
    assert!(o.success(), "{o}");
    fs::read_to_string(out.join("results.md")).expect("results.md")
}

#[test]
fn remote_runner_over_loopback_with_a_baseline() {
    let t = Target::start("bench-remote");
    let dir = artifacts_dir().join(format!("bench-remote-{}", std::process::id()));
    let (first, second) = (dir.join("first"), dir.join("second"));
    let md = remote(&t, &first, None);
    for case in [
        "4K random read, QD1",
        "128K seq write, QD8",
        "4K rand read, 2 sessions x QD8",
    ] {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {case} |")))
            .unwrap_or_else(|| panic!("{case} in\n{md}"));
        let iops: f64 = row
            .split('|')
            .nth(2)
            .unwrap()
            .trim()
            .replace(',', "")
            .parse()
            .unwrap();
        assert!(iops > 0.0, "{row}");
    }
    assert!(first.join("chart.png").metadata().unwrap().len() > 1000);
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(first.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["cases"].as_array().unwrap().len(), 3);
    let md2 = remote(&t, &second, Some(&first.join("results.json")));
    assert!(md2.contains("| IOPS vs baseline |"), "{md2}");
    let row = md2
        .lines()
        .find(|l| l.starts_with("| 4K random read, QD1 |"))
        .unwrap();
    let ratio: f64 = row.split('|').nth(6).unwrap().trim().parse().unwrap();
    assert!(ratio > 0.0, "{row}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn open_iscsi_job_files_parse() {
    let jobs: Vec<_> = fs::read_dir(workspace_root().join("scripts/bench/jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "fio"))
        .collect();
    assert_eq!(jobs.len(), 10);
    let mut cmd = Command::new(fio_bin());
    cmd.arg("--parse-only")
        .args(&jobs)
        .env("FIO_ENGINE", "libaio")
        .env(
            "FIO_TARGET",
            "/dev/disk/by-path/ip-10.0.0.2:3260-iscsi-iqn.2026-11.io.example:disk0-lun-0",
        )
        .env("FIO_DIRECT", "1")
        .env("FIO_RUNTIME", "10");
    let o = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert!(o.success(), "{o}");
}
