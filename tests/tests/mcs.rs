//! Multiple connections per session (MC/S) against the real target on two reactors, with a
//! raw initiator: a second connection joins by TSIH (moving to the session's reactor when
//! it landed on the other one), commands go out on both connections with one session-wide
//! CmdSN sequence (a command that runs ahead on one connection waits for the one before it
//! on the other), each answer comes back on the connection that carried the command, a
//! connection dropped in the middle of a run leaves the session serving the other, and the
//! initiator's recovery (RFC 7143 §6.1, ERL 0: commands the target had acknowledged through
//! ExpCmdSN are reissued, the others sent again with their CmdSN) loses and duplicates no
//! write: every block reads back as written, every write has exactly one GOOD.

use e2e::raw::RawSession;
use e2e::{malloc_bdev, one_lun_config, Target, DEFAULT_IQN};
use std::collections::HashMap;

const HOST: &str = "iqn.2026-11.io.test:mcs";

fn config() -> String {
    one_lun_config(
        "cpumask = \"0x3\"\nmax_connections = 4",
        &malloc_bdev("M0", "64MiB"),
        "M0",
    )
}

fn write_cdb(lba: u32) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x2A;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&8u16.to_be_bytes());
    c
}

fn block(lba: u32) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (lba.wrapping_mul(31) ^ (i / 13)) as u8)
        .collect()
}

/// The session: its connections and its CmdSN, which every connection shares.
struct Session {
    conns: Vec<Option<RawSession>>,
    cmdsn: u32,
}

impl Session {
    /// Starts WRITE(10) of `lba` on connection `c` with CmdSN `cmdsn`; returns its ITT.
    fn start_write(&mut self, c: usize, lba: u32, cmdsn: u32) -> u32 {
        let s = self.conns[c].as_mut().expect("connection up");
        s.set_cmdsn(cmdsn);
        s.start_command(0, &write_cdb(lba), 0, &block(lba))
    }

    fn next_cmdsn(&mut self) -> u32 {
        let c = self.cmdsn;
        self.cmdsn = self.cmdsn.wrapping_add(1);
        c
    }
}

#[test]
fn mcs_session_survives_a_dropped_connection_without_losing_writes() {
    let mut t = Target::start_with_config("mcs", &config(), DEFAULT_IQN, 0);
    let portal = t.portal();
    let a = RawSession::login_full(
        &portal,
        HOST,
        DEFAULT_IQN,
        false,
        &[("MaxConnections", "2")],
    );
    assert!(
        a.login_text.contains("MaxConnections=2"),
        "{}",
        a.login_text
    );
    let tsih = a.tsih;
    let mut s = Session {
        cmdsn: a.cmdsn(),
        conns: vec![Some(a)],
    };
    // Connection 1 joins; a third would pass MaxConnections=2; another ISID or an unknown
    // TSIH cannot join.
    let b = RawSession::join(&portal, HOST, DEFAULT_IQN, tsih, 1, s.cmdsn).expect("join");
    assert_eq!(b.tsih, tsih);
    s.conns.push(Some(b));
    assert_eq!(
        RawSession::join(&portal, HOST, DEFAULT_IQN, tsih, 2, s.cmdsn).err(),
        Some((0x02, 0x06)),
        "TOO MANY CONNECTIONS"
    );
    assert_eq!(
        RawSession::join(
            &portal,
            "iqn.2026-11.io.test:other",
            DEFAULT_IQN,
            tsih,
            2,
            s.cmdsn
        )
        .err(),
        Some((0x02, 0x0a)),
        "SESSION DOES NOT EXIST"
    );
    assert_eq!(
        RawSession::join(
            &portal,
            HOST,
            DEFAULT_IQN,
            tsih.wrapping_add(77),
            2,
            s.cmdsn
        )
        .err(),
        Some((0x02, 0x0a))
    );

    // 1. One CmdSN sequence over both connections, sent out of order: each pair goes
    //    second-CmdSN first on connection 1, so it waits for the first on connection 0.
    let mut good: HashMap<u32, u32> = HashMap::new();
    for pair in 0..16u32 {
        let (lba0, lba1) = (pair * 16, pair * 16 + 8);
        let (n0, n1) = (s.next_cmdsn(), s.next_cmdsn());
        let i1 = s.start_write(1, lba1, n1);
        let i0 = s.start_write(0, lba0, n0);
        for (c, itt, lba) in [(0, i0, lba0), (1, i1, lba1)] {
            // Allegiance: the answer comes on the connection that carried the command.
            let r = s.conns[c].as_mut().unwrap().wait_for(itt).expect("status");
            assert_eq!(r.status, 0, "write {lba}");
            *good.entry(lba).or_default() += 1;
        }
    }

    // 2. Connection 1 carries 12 writes and drops before their answers; connection 0 goes
    //    on with its own.
    // The first six have time to reach the target (their answers are lost with the
    // connection), the last six are cut off with it.
    let dropped: Vec<(u32, u32, u32)> = (0..12u32)
        .map(|i| {
            if i == 6 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let lba = 4096 + i * 8;
            let n = s.next_cmdsn();
            let itt = s.start_write(1, lba, n);
            (lba, n, itt)
        })
        .collect();
    drop(s.conns[1].take());
    // The target reads what the connection had sent before it noticed the close; the
    // initiator's recovery starts after that (as an initiator's would, after its
    // connection timeout).
    std::thread::sleep(std::time::Duration::from_millis(500));
    // What did the target take in? ExpCmdSN, from an immediate ping on connection 0.
    let ping = s.conns[0].as_mut().unwrap().ping();
    let exp = u32::from_be_bytes(ping.bhs[28..32].try_into().unwrap());
    // Recovery: commands below ExpCmdSN reached the target (their tasks ended with the
    // connection): reissued with new CmdSNs; the rest are sent again with their own CmdSN
    // (filling the gap), in order, then the reissues.
    let mut resent: Vec<(u32, u32)> = Vec::new();
    for &(lba, n, _) in dropped.iter().filter(|(_, n, _)| !e2e_sn_lt(*n, exp)) {
        resent.push((lba, s.start_write(0, lba, n)));
    }
    let after = dropped
        .iter()
        .filter(|(_, n, _)| e2e_sn_lt(*n, exp))
        .map(|(lba, _, _)| *lba)
        .collect::<Vec<_>>();
    let mut next = dropped.last().map_or(s.cmdsn, |d| d.1.wrapping_add(1));
    s.cmdsn = next;
    for lba in after {
        next = s.next_cmdsn();
        resent.push((lba, s.start_write(0, lba, next)));
    }
    for (lba, itt) in resent {
        let r = s.conns[0].as_mut().unwrap().wait_for(itt).expect("status");
        assert_eq!(r.status, 0, "rewrite {lba}");
        *good.entry(lba).or_default() += 1;
    }
    eprintln!(
        "dropped connection: {} of 12 writes had reached the target (ExpCmdSN {exp})",
        dropped
            .iter()
            .filter(|(_, n, _)| e2e_sn_lt(*n, exp))
            .count()
    );

    // 3. A new connection joins again (CID 1 is free), and every block reads back as
    //    written, through both connections.
    let mut c = RawSession::join(&portal, HOST, DEFAULT_IQN, tsih, 1, s.cmdsn).expect("rejoin");
    let a = s.conns[0].as_mut().unwrap();
    for (&lba, &n) in &good {
        assert_eq!(n, 1, "block {lba}: one GOOD");
        let conn = if lba % 16 == 0 { &mut *a } else { &mut c };
        conn.set_cmdsn(s.cmdsn);
        let r = conn.read10(0, lba, 8).expect("read");
        s.cmdsn = s.cmdsn.wrapping_add(1);
        assert_eq!(r.status, 0);
        assert_eq!(r.data, block(lba), "block {lba}");
    }
    assert_eq!(good.len(), 32 + 12);

    // 4. Logout "close the session" on one connection closes the other too.
    a.set_cmdsn(s.cmdsn);
    let resp = a.logout(0, 0);
    assert_eq!(resp.bhs[2], 0, "logout response");
    assert!(
        c.recv().is_none(),
        "the other connection closes with the session"
    );
    t.assert_running();
    let log = t.log_contents();
    assert!(!log.contains("panicked"), "{log}");
    t.stop();
}

/// Serial number "less than" (RFC 1982), as iSCSI compares CmdSNs.
fn e2e_sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// A WRITE(10) header on `s` with no data (the target solicits it with an R2T).
fn write_without_data(s: &mut RawSession, itt: u32, lba: u32, cmdsn: u32) {
    let mut b = [0u8; 48];
    b[0] = 0x01;
    b[1] = 0x80 | 0x20 | 0x01;
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&4096u32.to_be_bytes());
    b[24..28].copy_from_slice(&cmdsn.to_be_bytes());
    b[28..32].copy_from_slice(&s.exp_statsn().to_be_bytes());
    b[32..42].copy_from_slice(&write_cdb(lba));
    s.send_pdu(b, &[]);
}

/// Task management covers the session's task set on every connection (MC/S): ABORT TASK
/// sent on one connection finds a write another carries, a LUN RESET ends the other
/// connection's tasks without answers there, and an unknown task is "does not exist".
#[test]
fn task_management_spans_the_session_connections() {
    let mut t = Target::start_with_config("mcs-tmf", &config(), DEFAULT_IQN, 0);
    let portal = t.portal();
    let keys = [
        ("MaxConnections", "2"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "No"),
    ];
    let mut a = RawSession::login_full(&portal, HOST, DEFAULT_IQN, false, &keys);
    let mut cmdsn = a.cmdsn();
    let mut b = RawSession::join(&portal, HOST, DEFAULT_IQN, a.tsih, 1, cmdsn).expect("join");
    a.skip_itts_past(0x1000);
    for (round, function) in [(0u32, 1u8), (1, 5)] {
        // A write on connection 1 waits for its data.
        let itt = 0x500 + round;
        write_without_data(&mut b, itt, 64 * round, cmdsn);
        cmdsn += 1;
        let r2t = b.recv().expect("R2T");
        assert_eq!(r2t.opcode(), 0x31, "round {round}");
        let ttt = u32::from_be_bytes(r2t.bhs[20..24].try_into().unwrap());
        // The TMF on connection 0.
        a.set_cmdsn(cmdsn);
        let tmf = a.start_tmf(function, 0, itt);
        let got = a.drain(std::time::Duration::from_millis(500));
        let resp = got
            .iter()
            .find(|p| p.opcode() == 0x22)
            .expect("TMF response");
        assert_eq!(
            (
                u32::from_be_bytes(resp.bhs[16..20].try_into().unwrap()),
                resp.bhs[2]
            ),
            (tmf, 0),
            "round {round}: function complete"
        );
        // Its data comes late: dropped, and the write is never answered.
        let mut d = [0u8; 48];
        d[0] = 0x05;
        d[1] = 0x80;
        d[16..20].copy_from_slice(&itt.to_be_bytes());
        d[20..24].copy_from_slice(&ttt.to_be_bytes());
        b.send_pdu(d, &[7u8; 4096]);
        let late = b.drain(std::time::Duration::from_millis(400));
        assert!(
            late.iter()
                .all(|p| u32::from_be_bytes(p.bhs[16..20].try_into().unwrap()) != itt),
            "round {round}: no answer for the aborted write"
        );
        // Both connections carry on; the reset's unit attention is the session's (one
        // I_T nexus): the first command after it, on whichever connection, gets it once.
        for (i, s) in [&mut a, &mut b].into_iter().enumerate() {
            s.set_cmdsn(cmdsn);
            let mut r = s.tur(0).expect("TUR");
            cmdsn += 1;
            if function == 5 && i == 0 {
                assert_eq!(r.key_asc_ascq(), Some((6, 0x29, 0x03)), "round {round}");
                s.set_cmdsn(cmdsn);
                r = s.tur(0).expect("TUR");
                cmdsn += 1;
            }
            assert_eq!(r.status, 0, "round {round}");
        }
    }
    a.set_cmdsn(cmdsn);
    a.start_tmf(1, 0, 0x7777);
    let got = a.drain(std::time::Duration::from_millis(500));
    assert_eq!(
        got.iter().find(|p| p.opcode() == 0x22).map(|p| p.bhs[2]),
        Some(1)
    );
    t.assert_running();
    t.stop();
}
