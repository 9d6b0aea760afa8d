//! Error recovery level 1 against the real target, with a raw initiator that plays the lossy
//! path: it corrupts a Data-Out's data digest, corrupts a command's immediate data, "loses"
//! a Data-In PDU and a SCSI Response, and recovers each the way RFC 7143 §7 says
//! (recovery R2T, command retry, Data SNACK, Status SNACK). Every write is read back.

use e2e::raw::{RawPdu, RawSession};
use e2e::{malloc_bdev, one_lun_config, Target, DEFAULT_IQN};

const HOST: &str = "iqn.2026-11.io.test:erl1";

fn config() -> String {
    one_lun_config(
        "error_recovery_level = 1\nheader_digest = \"crc32c\"\ndata_digest = \"crc32c\"",
        &malloc_bdev("M0", "64MiB"),
        "M0",
    )
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// A SCSI Command header: `write` sets W, `read` R; F always.
fn command(
    s: &mut RawSession,
    itt: u32,
    cdb: &[u8],
    edtl: u32,
    write: bool,
    cmdsn: u32,
) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = 0x01;
    b[1] = 0x80 | if write { 0x20 } else { 0x40 } | 0x01;
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&edtl.to_be_bytes());
    b[24..28].copy_from_slice(&cmdsn.to_be_bytes());
    b[28..32].copy_from_slice(&s.exp_statsn().to_be_bytes());
    b[32..32 + cdb.len()].copy_from_slice(cdb);
    b
}

fn data_out(itt: u32, ttt: u32, datasn: u32, offset: u32, fin: bool) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = 0x05;
    b[1] = if fin { 0x80 } else { 0 };
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&ttt.to_be_bytes());
    b[36..40].copy_from_slice(&datasn.to_be_bytes());
    b[40..44].copy_from_slice(&offset.to_be_bytes());
    b
}

fn snack(kind: u8, itt: u32, beg: u32, run: u32, exp_statsn: u32) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = 0x10;
    b[1] = 0x80 | kind;
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    b[28..32].copy_from_slice(&exp_statsn.to_be_bytes());
    b[40..44].copy_from_slice(&beg.to_be_bytes());
    b[44..48].copy_from_slice(&run.to_be_bytes());
    b
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn recv(s: &mut RawSession) -> RawPdu {
    s.recv().expect("a PDU from the target")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect()
}

#[test]
fn erl1_recovers_digest_errors_and_lost_pdus() {
    let mut t = Target::start_with_config("erl1", &config(), DEFAULT_IQN, 0);
    let portal = t.portal();

    // 1. A solicited Data-Out with a bad data digest: Reject (Data-Digest-Error), then a
    //    recovery R2T for exactly that range; sent again, the write completes.
    let mut s = RawSession::login_full(
        &portal,
        HOST,
        DEFAULT_IQN,
        true,
        &[
            ("ErrorRecoveryLevel", "1"),
            ("ImmediateData", "No"),
            ("InitialR2T", "Yes"),
            ("MaxRecvDataSegmentLength", "4096"),
        ],
    );
    let a = pattern(1, 4096);
    let b = pattern(100, 4096);
    let cmdsn = s.take_cmdsn();
    let hdr = command(&mut s, 0x100, &cdb10(0x2A, 100, 16), 8192, true, cmdsn);
    s.send_pdu(hdr, &[]);
    let r2t = recv(&mut s);
    assert_eq!(r2t.opcode(), 0x31);
    assert_eq!(
        (
            u32_at(&r2t.bhs, 36),
            u32_at(&r2t.bhs, 40),
            u32_at(&r2t.bhs, 44)
        ),
        (0, 0, 8192)
    );
    let ttt = u32_at(&r2t.bhs, 20);
    s.send_pdu(data_out(0x100, ttt, 0, 0, false), &a);
    s.corrupt_next_data_digest = true;
    s.send_pdu(data_out(0x100, ttt, 1, 4096, true), &b);
    let reject = recv(&mut s);
    assert_eq!(
        (reject.opcode(), reject.bhs[2]),
        (0x3f, 0x02),
        "Reject: Data-Digest-Error"
    );
    let recovery = recv(&mut s);
    assert_eq!(recovery.opcode(), 0x31, "a recovery R2T");
    assert_eq!(
        (
            u32_at(&recovery.bhs, 36),
            u32_at(&recovery.bhs, 40),
            u32_at(&recovery.bhs, 44)
        ),
        (1, 4096, 4096),
        "R2TSN 1 for the corrupted range"
    );
    let ttt2 = u32_at(&recovery.bhs, 20);
    assert_ne!(ttt2, ttt);
    s.send_pdu(data_out(0x100, ttt2, 0, 4096, true), &b);
    let resp = recv(&mut s);
    assert_eq!((resp.opcode(), resp.bhs[3]), (0x21, 0), "GOOD");

    // 2. A lost Data-In PDU: the read comes in two 4 KiB PDUs (the initiator's
    //    MaxRecvDataSegmentLength); DataSN 0 is "lost" and asked for again with a Data
    //    SNACK; the assembled data equals what was written.
    let cmdsn = s.take_cmdsn();
    let hdr = command(&mut s, 0x101, &cdb10(0x28, 100, 16), 8192, false, cmdsn);
    s.send_pdu(hdr, &[]);
    let mut got = vec![0u8; 8192];
    let mut seen = Vec::new();
    let statsn = loop {
        let p = recv(&mut s);
        assert_eq!(p.opcode(), 0x25);
        let (datasn, off) = (u32_at(&p.bhs, 36), u32_at(&p.bhs, 40) as usize);
        seen.push(datasn);
        if datasn != 0 {
            got[off..off + p.data.len()].copy_from_slice(&p.data);
        }
        if p.bhs[1] & 0x01 != 0 {
            break u32_at(&p.bhs, 24);
        }
    };
    assert_eq!(seen, vec![0, 1]);
    // DataSN 0 was dropped above: ask for it, without acknowledging the status yet.
    s.send_pdu(snack(0, 0x101, 0, 1, statsn), &[]);
    let again = recv(&mut s);
    assert_eq!((again.opcode(), u32_at(&again.bhs, 36)), (0x25, 0));
    got[..again.data.len()].copy_from_slice(&again.data);
    assert_eq!(&got[..4096], &a[..]);
    assert_eq!(&got[4096..], &b[..]);

    // 3. A lost SCSI Response: Status SNACK for its StatSN brings it again.
    let cmdsn = s.take_cmdsn();
    let mut hdr = command(&mut s, 0x102, &[0u8; 6], 0, false, cmdsn);
    hdr[1] = 0x80 | 0x01;
    s.send_pdu(hdr, &[]);
    let resp = recv(&mut s);
    assert_eq!((resp.opcode(), resp.bhs[3]), (0x21, 0));
    let sn = u32_at(&resp.bhs, 24);
    s.send_pdu(snack(1, 0, sn, 1, sn), &[]);
    let again = recv(&mut s);
    assert_eq!(
        (
            again.opcode(),
            u32_at(&again.bhs, 16),
            u32_at(&again.bhs, 24)
        ),
        (0x21, 0x102, sn)
    );
    drop(s);

    // 4. Immediate data with a bad digest: the whole command PDU is discarded (Reject);
    //    the initiator sends the same command again (same ITT and CmdSN) and it completes.
    let mut s = RawSession::login_full(
        &portal,
        HOST,
        DEFAULT_IQN,
        true,
        &[("ErrorRecoveryLevel", "1")],
    );
    let c = pattern(200, 4096);
    let cmdsn = s.take_cmdsn();
    let hdr = command(&mut s, 0x200, &cdb10(0x2A, 300, 8), 4096, true, cmdsn);
    s.corrupt_next_data_digest = true;
    s.send_pdu(hdr, &c);
    let reject = recv(&mut s);
    assert_eq!((reject.opcode(), reject.bhs[2]), (0x3f, 0x02));
    s.send_pdu(hdr, &c);
    let resp = recv(&mut s);
    assert_eq!(
        (resp.opcode(), u32_at(&resp.bhs, 16), resp.bhs[3]),
        (0x21, 0x200, 0)
    );
    let r = s.read10(0, 300, 8).expect("read back");
    assert_eq!(r.status, 0);
    assert_eq!(r.data, c);
    drop(s);

    t.assert_running();
    let log = t.log_contents();
    assert!(log.contains("data digest error"), "{log}");
    t.stop();
}

/// ERL 2 (RFC 7143 §7.2.2, connection recovery): a connection fails with a read and a write
/// unanswered (their answers are lost with it); a new connection of the same session takes
/// them over with TASK REASSIGN and gets their data and status; a task nobody knows is
/// "does not exist"; a session no connection comes back to ends after DefaultTime2Wait +
/// DefaultTime2Retain.
#[test]
fn erl2_reassigns_the_tasks_of_a_failed_connection() {
    let toml = one_lun_config(
        "error_recovery_level = 2",
        &malloc_bdev("M0", "64MiB"),
        "M0",
    );
    let mut t = Target::start_with_config("erl2", &toml, DEFAULT_IQN, 0);
    let portal = t.portal();
    let keys = [
        ("ErrorRecoveryLevel", "2"),
        ("DefaultTime2Wait", "0"),
        ("DefaultTime2Retain", "2"),
    ];
    let mut a = RawSession::login_full(&portal, HOST, DEFAULT_IQN, false, &keys);
    assert!(
        a.login_text.contains("ErrorRecoveryLevel=2"),
        "{}",
        a.login_text
    );
    // Time2Wait is the larger offer (the target's 2), Time2Retain the smaller (ours, 2).
    assert!(
        a.login_text.contains("DefaultTime2Wait=2"),
        "{}",
        a.login_text
    );
    assert!(
        a.login_text.contains("DefaultTime2Retain=2"),
        "{}",
        a.login_text
    );
    let tsih = a.tsih;
    let x = pattern(7, 4096);
    let y = pattern(9, 4096);
    assert_eq!(a.write10(0, 500, &x).expect("write").status, 0);
    let read_itt = a.start_command(0, &cdb10(0x28, 500, 8), 4096, &[]);
    let write_itt = a.start_command(0, &cdb10(0x2A, 600, 8), 0, &y);
    let cmdsn = a.cmdsn();
    // The answers arrive but are never read: closing with unread data resets the
    // connection, and the target sees it fail.
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(a);
    std::thread::sleep(std::time::Duration::from_millis(200));

    let mut b = RawSession::join(&portal, HOST, DEFAULT_IQN, tsih, 0, cmdsn).expect("rejoin");
    b.skip_itts_past(write_itt.max(read_itt));
    let tmf = b.start_tmf(8, 0, read_itt);
    let got = b.drain(std::time::Duration::from_millis(700));
    let resp = got
        .iter()
        .find(|p| p.opcode() == 0x22)
        .expect("TMF response");
    assert_eq!(
        (u32_at(&resp.bhs, 16), resp.bhs[2]),
        (tmf, 0),
        "function complete"
    );
    let data: Vec<u8> = got
        .iter()
        .filter(|p| p.opcode() == 0x25 && u32_at(&p.bhs, 16) == read_itt)
        .flat_map(|p| p.data.clone())
        .collect();
    assert_eq!(data, x, "the read's data on the new connection");
    let last = got
        .iter()
        .rev()
        .find(|p| p.opcode() == 0x25)
        .expect("Data-In");
    assert_eq!(
        (last.bhs[1] & 0x01, last.bhs[3]),
        (1, 0),
        "status GOOD with the data"
    );

    let tmf = b.start_tmf(8, 0, write_itt);
    let got = b.drain(std::time::Duration::from_millis(700));
    let resp = got
        .iter()
        .find(|p| p.opcode() == 0x22)
        .expect("TMF response");
    assert_eq!((u32_at(&resp.bhs, 16), resp.bhs[2]), (tmf, 0));
    let w = got
        .iter()
        .find(|p| p.opcode() == 0x21 && u32_at(&p.bhs, 16) == write_itt)
        .expect("the write's response");
    assert_eq!(w.bhs[3], 0);
    // Nothing left to reassign under that ITT.
    b.start_tmf(8, 0, write_itt);
    let got = b.drain(std::time::Duration::from_millis(500));
    assert_eq!(
        got.iter().find(|p| p.opcode() == 0x22).map(|p| p.bhs[2]),
        Some(1)
    );
    let r = b.read10(0, 600, 8).expect("read back");
    assert_eq!((r.status, r.data == y), (0, true));

    // The last connection fails; nobody comes back within 2 + 2 s: the session ends.
    drop(b);
    std::thread::sleep(std::time::Duration::from_millis(4600));
    assert_eq!(
        RawSession::join(&portal, HOST, DEFAULT_IQN, tsih, 0, cmdsn + 1).err(),
        Some((0x02, 0x0a)),
        "session ended after Time2Retain"
    );
    t.assert_running();
    let log = t.log_contents();
    assert!(
        log.contains("kept") && log.contains("for reassignment"),
        "{log}"
    );
    assert!(log.contains("no connection came back"), "{log}");
    t.stop();
}
