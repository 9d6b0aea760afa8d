//! CRC32C digests on the wire: a raw client that computes and checks both digests, a data
//! digest error (Reject, then the command ends with PROTOCOL SERVICE CRC ERROR), a header
//! digest error (the connection ends), and a fio verify run with header digests through
//! libiscsi.

use e2e::raw::RawSession;
use e2e::{artifacts_dir, fio_bin, parse_fio_terse, run_with_timeout, Target};
use std::fs;
use std::process::Command;
use std::time::Duration;

const IQN: &str = "iqn.2026-11.io.e2e:digests";

fn config(digest: &str) -> String {
    format!(
        r#"
[global]
header_digest = "{digest}"

[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

[[bdev]]
name = "M0"
type = "malloc"
size = "64MiB"

[[target]]
name = "{IQN}"
luns = [ {{ lun = 0, bdev = "M0" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    )
}

#[test]
fn data_and_header_digests_with_a_raw_client() {
    let mut t = Target::start_with_config("digests-raw", &config("any"), IQN, 0);
    let mut s = RawSession::login_with(&t.portal(), "iqn.2026-11.io.e2e:crc", IQN, true);
    // Every PDU from the target carries digests the client checks (it panics otherwise).
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let w = s.write10(0, 8, &data).unwrap();
    assert_eq!(w.status, 0, "{w:?}");
    let r = s.read10(0, 8, 8).unwrap();
    assert_eq!((r.status, &r.data), (0, &data));

    // A bad data digest on immediate data: Reject (Data-Digest-Error), then the command
    // ends with CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR; the medium
    // keeps its data.
    s.corrupt_next_data_digest = true;
    let w = s.write10(0, 8, &vec![0xee; 4096]).unwrap();
    assert_eq!(s.rejects.len(), 1);
    assert_eq!(s.rejects[0].bhs[2], 0x02, "reason Data-Digest-Error");
    assert_eq!(
        (w.status, w.key_asc_ascq()),
        (2, Some((0x0b, 0x47, 0x05))),
        "{w:?}"
    );
    let r = s.read10(0, 8, 8).unwrap();
    assert_eq!(r.data, data, "the corrupted write never reached the medium");

    // A bad header digest: the connection ends.
    s.send_bad_header_digest();
    assert!(s.recv().is_none(), "the connection closes");
    t.assert_running();
    let log = t.log_contents();
    assert!(log.contains("digests CRC32C/CRC32C"), "{log}");
    assert!(log.contains("data digest error"), "{log}");
    assert!(log.contains("header digest error"), "{log}");

    // Required digests: a login offering only None fails (initiator error).
    let mut req = Target::start_with_config("digests-req", &config("crc32c"), IQN, 0);
    assert_eq!(
        e2e::raw::login_status(&req.portal(), "iqn.2026-11.io.e2e:none", IQN),
        (2, 0)
    );
    req.assert_running();
}

#[test]
fn fio_verify_with_header_digests() {
    let mut t = Target::start_with_config("digests-fio", &config("crc32c"), IQN, 0);
    let dir = artifacts_dir().join(format!("digests-fio-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let terse = dir.join("fio.terse");
    let out = run_with_timeout(
        Command::new(fio_bin())
            .current_dir(&dir)
            .arg("--name=hd")
            .arg("--ioengine=libiscsi")
            .arg(format!(
                "--filename={}",
                e2e::fio_iscsi_filename(&t.portal(), IQN, 0)
            ))
            .args([
                "--rw=randwrite",
                "--bsrange=4k-128k",
                "--size=32M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .arg(format!("--output={}", terse.display())),
        Duration::from_secs(120),
    );
    assert!(out.success(), "{out}");
    let jobs = parse_fio_terse(&fs::read_to_string(&terse).unwrap()).unwrap();
    assert_eq!(
        (jobs[0].error, jobs[0].read_kib),
        (0, 32 * 1024),
        "{jobs:?}"
    );
    t.assert_running();
    let log = t.log_contents();
    assert!(log.contains("digests CRC32C/None"), "{log}");
    assert!(!log.contains("digest error"), "{log}");
}
