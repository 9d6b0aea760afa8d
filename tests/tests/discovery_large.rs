//! SendTargets with 200 targets.
//!
//! * `iscsi_ls_lists_all_200_targets`: iscsi-ls lists exactly the 200 names,
//!   each with its portal. libiscsi declares MaxRecvDataSegmentLength=262144
//!   and cannot read a Text Response with the C bit (libiscsi 1.19 fails with
//!   "unsupported flags in text reply 40"), so with iscsi-ls the answer
//!   (about 17 KB) must fit in one PDU.
//! * `sendtargets_answer_spans_many_text_pdus`: a raw discovery session that
//!   declares MaxRecvDataSegmentLength=512 and follows the target's Text
//!   Response continuations (C bit, TTT) until the final one; the reassembled
//!   answer must list exactly the 200 targets with their addresses.

use e2e::{free_port, run_with_timeout, Target};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

const TARGETS: usize = 200;

fn target_name(i: usize) -> String {
    format!("iqn.2026-11.io.e2e:large-{i:03}")
}

/// 200 targets on 1 MiB null bdevs; portal group 1 is the harness port, the
/// odd-numbered targets are also mapped to portal group 2 on `pg2_port`.
fn config(pg2_port: u16) -> String {
    let mut s = format!(
        r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:1"]

[[portal_group]]
tag = 2
portals = ["127.0.0.1:{pg2_port}"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]
"#
    );
    for i in 0..TARGETS {
        let pg2 = if i % 2 == 1 {
            ", { portal_group = 2, initiator_group = 1 }"
        } else {
            ""
        };
        write!(
            s,
            r#"
[[bdev]]
name = "Null{i}"
type = "null"
size = "1MiB"

[[target]]
name = "{name}"
luns = [ {{ lun = 0, bdev = "Null{i}" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }}{pg2} ]
"#,
            name = target_name(i)
        )
        .unwrap();
    }
    s
}

fn start(name: &str) -> (Target, u16) {
    let pg2_port = free_port();
    let t = Target::start_with_config(name, &config(pg2_port), &target_name(0), 0);
    (t, pg2_port)
}

/// The (target, "address,tag") pairs the target must announce, sorted.
fn expected_pairs(t: &Target, pg2_port: u16) -> Vec<(String, String)> {
    let mut want = Vec::new();
    for i in 0..TARGETS {
        want.push((target_name(i), format!("{},1", t.portal())));
        if i % 2 == 1 {
            want.push((target_name(i), format!("127.0.0.1:{pg2_port},2")));
        }
    }
    want.sort();
    want
}

#[test]
fn iscsi_ls_lists_all_200_targets() {
    let (mut t, pg2_port) = start("discovery-large-ls");
    let out = run_with_timeout(
        Command::new("iscsi-ls").arg(t.portal_url()),
        Duration::from_secs(30),
    );
    out.assert_success();
    let mut got: Vec<(String, String)> = out
        .stdout
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let rest = l
                .strip_prefix("Target:")
                .unwrap_or_else(|| panic!("unexpected line {l:?}"));
            let (name, portal) = rest
                .split_once(" Portal:")
                .unwrap_or_else(|| panic!("unexpected line {l:?}"));
            (name.to_string(), portal.to_string())
        })
        .collect();
    got.sort();
    let want = expected_pairs(&t, pg2_port);
    assert_eq!(got.len(), want.len(), "{out}");
    assert_eq!(got, want);
    let mut names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    assert_eq!(names.len(), TARGETS);
    t.assert_running();
}

// ---------------------------------------------------------------- raw client

const MRDSL: usize = 512;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

struct Pdu {
    bhs: [u8; 48],
    data: Vec<u8>,
}

fn send_pdu(s: &mut TcpStream, mut bhs: [u8; 48], data: &[u8]) {
    let len = data.len() as u32;
    bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    let mut buf = bhs.to_vec();
    buf.extend_from_slice(data);
    buf.resize(48 + pad4(data.len()), 0);
    s.write_all(&buf).expect("send PDU");
}

fn recv_pdu(s: &mut TcpStream) -> Pdu {
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs).expect("read BHS");
    assert_eq!(bhs[4], 0, "unexpected AHS");
    let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut data = vec![0u8; pad4(len)];
    s.read_exact(&mut data).expect("read data segment");
    data.truncate(len);
    Pdu { bhs, data }
}

fn text_pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {kv:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn sendtargets_answer_spans_many_text_pdus() {
    let (mut t, pg2_port) = start("discovery-large-raw");
    let mut s = TcpStream::connect(t.portal()).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();

    // Login straight from the operational stage to full feature phase.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43; // immediate | Login Request
    bhs[1] = 0x80 | (1 << 2) | 3; // T, CSG=1, NSG=3
    bhs[8..14].copy_from_slice(&[0x80, 0x00, 0x12, 0x34, 0x56, 0x78]);
    put_u32(&mut bhs, 16, 1); // ITT
    put_u32(&mut bhs, 24, 1); // CmdSN
    let login = format!(
        "InitiatorName=iqn.2026-11.io.e2e:raw-discovery\0SessionType=Discovery\0\
         HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength={MRDSL}\0"
    );
    send_pdu(&mut s, bhs, login.as_bytes());
    let rsp = recv_pdu(&mut s);
    assert_eq!(rsp.bhs[0] & 0x3f, 0x23, "expected a Login Response");
    assert_eq!(
        (rsp.bhs[36], rsp.bhs[37]),
        (0, 0),
        "login status; text {:?}",
        text_pairs(&rsp.data)
    );
    assert_eq!(rsp.bhs[1] & 0x83, 0x83, "T bit and NSG=3 (full feature)");
    let mut exp_statsn = get_u32(&rsp.bhs, 24).wrapping_add(1);
    let mut cmdsn = get_u32(&rsp.bhs, 28); // ExpCmdSN

    // SendTargets=All, then empty continuation requests while the target
    // answers with the C bit.
    let itt = 0x1000u32;
    let mut ttt = 0xffff_ffffu32;
    let mut answer = Vec::new();
    let mut sizes = Vec::new();
    for n in 0.. {
        assert!(n < 1000, "more than 1000 Text Responses");
        let mut bhs = [0u8; 48];
        bhs[0] = 0x04; // Text Request
        bhs[1] = 0x80; // F
        put_u32(&mut bhs, 16, itt);
        put_u32(&mut bhs, 20, ttt);
        put_u32(&mut bhs, 24, cmdsn);
        put_u32(&mut bhs, 28, exp_statsn);
        let req: &[u8] = if n == 0 { b"SendTargets=All\0" } else { b"" };
        send_pdu(&mut s, bhs, req);
        cmdsn = cmdsn.wrapping_add(1);

        let rsp = recv_pdu(&mut s);
        assert_eq!(rsp.bhs[0] & 0x3f, 0x24, "PDU {n}: expected a Text Response");
        assert_eq!(get_u32(&rsp.bhs, 16), itt, "PDU {n}: ITT");
        assert_eq!(get_u32(&rsp.bhs, 24), exp_statsn, "PDU {n}: StatSN");
        exp_statsn = exp_statsn.wrapping_add(1);
        let (fin, cont) = (rsp.bhs[1] & 0x80 != 0, rsp.bhs[1] & 0x40 != 0);
        assert!(
            fin != cont,
            "PDU {n}: exactly one of F and C, flags {:#x}",
            rsp.bhs[1]
        );
        assert!(rsp.data.len() <= MRDSL, "PDU {n}: {} bytes", rsp.data.len());
        sizes.push(rsp.data.len());
        answer.extend_from_slice(&rsp.data);
        if fin {
            assert_eq!(get_u32(&rsp.bhs, 20), 0xffff_ffff, "final PDU: TTT");
            break;
        }
        ttt = get_u32(&rsp.bhs, 20);
        assert_ne!(ttt, 0xffff_ffff, "PDU {n}: C bit without a TTT");
    }

    // Every PDU but the last is full; the answer needs many of them.
    let total = answer.len();
    assert_eq!(sizes.len(), total.div_ceil(MRDSL), "PDU sizes {sizes:?}");
    assert!(
        sizes[..sizes.len() - 1].iter().all(|&n| n == MRDSL),
        "{sizes:?}"
    );
    assert!(sizes.len() >= 20, "only {} PDUs", sizes.len());

    // Reassembled: TargetName followed by its TargetAddress keys.
    let mut got = Vec::new();
    let mut current: Option<String> = None;
    for (k, v) in text_pairs(&answer) {
        match k.as_str() {
            "TargetName" => current = Some(v),
            "TargetAddress" => got.push((
                current
                    .clone()
                    .expect("TargetAddress before any TargetName"),
                v,
            )),
            other => panic!("unexpected key {other}={v}"),
        }
    }
    got.sort();
    assert_eq!(got, expected_pairs(&t, pg2_port));

    // Logout (close the session).
    let mut bhs = [0u8; 48];
    bhs[0] = 0x46; // immediate | Logout Request
    bhs[1] = 0x80;
    put_u32(&mut bhs, 16, itt + 1);
    put_u32(&mut bhs, 24, cmdsn);
    put_u32(&mut bhs, 28, exp_statsn);
    send_pdu(&mut s, bhs, &[]);
    let rsp = recv_pdu(&mut s);
    assert_eq!(rsp.bhs[0] & 0x3f, 0x26, "expected a Logout Response");
    assert_eq!(rsp.bhs[2], 0, "logout response code");
    t.assert_running();
}
