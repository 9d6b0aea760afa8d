//! Drives a [`Connection`] in memory with hand-built initiator PDUs and a mock environment,
//! stepping deterministically (no sockets, no clock).

use super::*;
use crate::iscsi::{DiscoveryEntry, LoginStatus, Registered, SessionKey, TargetInfo};
use crate::tgt::Global;

/// A mock device: READ(10) returns `blocks * 512` bytes of 0xAB; WRITE(10) wants
/// `blocks * 512`; everything else GOOD with no data. Completions wait until `complete`.
#[derive(Default)]
struct MockEnv {
    global: Global,
    submitted: Vec<ScsiTask>,
    sessions: Vec<(SessionKey, u64)>,
    resets: Vec<String>,
    /// Reset acknowledgements the device owes.
    acks: Vec<u64>,
    target_count: usize,
}

impl MockEnv {
    fn new() -> Self {
        MockEnv {
            global: Global::default(),
            target_count: 40,
            ..Default::default()
        }
    }
}

impl TargetEnv for MockEnv {
    fn global(&self) -> &Global {
        &self.global
    }
    fn login_target(
        &self,
        name: &str,
        _initiator: &str,
        _peer: SocketAddr,
        _pg: u16,
    ) -> Result<TargetInfo, LoginStatus> {
        match name {
            "iqn.t" => Ok(TargetInfo {
                id: 0,
                name: "iqn.t".into(),
                alias: Some("alias".into()),
                queue_depth: 4,
            }),
            "iqn.denied" => Err(LoginStatus::AUTHORIZATION_FAILED),
            _ => Err(LoginStatus::NOT_FOUND),
        }
    }
    fn discover(
        &self,
        _i: &str,
        _p: SocketAddr,
        _l: SocketAddr,
        only: Option<&str>,
    ) -> Vec<DiscoveryEntry> {
        (0..self.target_count)
            .map(|i| DiscoveryEntry {
                name: format!("iqn.2026-11.io.example:target-with-a-long-name-{i:04}"),
                addresses: vec![format!("127.0.0.1:3260,1"), format!("[::1]:3260,1")],
            })
            .filter(|e| only.is_none_or(|o| o == e.name))
            .collect()
    }
    fn register_session(
        &mut self,
        key: SessionKey,
        uid: u64,
        _cid: u16,
        _params: &crate::iscsi::params::SessionParams,
        _nexus: NexusId,
    ) -> Result<Registered, LoginStatus> {
        self.sessions.push((key, uid));
        Ok(Registered {
            tsih: self.sessions.len() as u16,
            reinstated: Vec::new(),
            ended: None,
        })
    }
    /// One connection per session here (the registry has MC/S unit tests of its own).
    fn session_to_join(
        &self,
        tsih: u16,
        _key: &SessionKey,
        _cid: u16,
    ) -> Result<crate::iscsi::params::SessionParams, LoginStatus> {
        if (tsih as usize) <= self.sessions.len() && tsih > 0 {
            Err(LoginStatus::TOO_MANY_CONNECTIONS)
        } else {
            Err(LoginStatus::SESSION_DOES_NOT_EXIST)
        }
    }
    fn join_session(
        &mut self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
        _uid: u64,
    ) -> Result<crate::iscsi::Joined, LoginStatus> {
        self.session_to_join(tsih, key, cid).map(|_| unreachable!())
    }
    fn unregister_session(&mut self, _tsih: u16, _uid: u64) -> bool {
        // One connection per session: it ends with it.
        false
    }
    fn lun_exists(&self, _t: TargetId, lun: u64) -> bool {
        lun == 0
    }
    fn scsi_submit(&mut self, _t: TargetId, task: ScsiTask) {
        self.submitted.push(task);
    }
    fn nexus_added(&mut self, _t: TargetId, _n: NexusId, _it: crate::scsi::ItNexus) {}
    fn nexus_removed(&mut self, _t: TargetId, _n: NexusId) {}
    fn lun_reset(&mut self, _t: TargetId, lun: u64, _by: NexusId, ack: u64) {
        self.resets.push(format!("lun {lun}"));
        self.acks.push(ack);
    }
    fn target_reset(&mut self, _t: TargetId, _by: NexusId, cold: bool, ack: u64) {
        self.resets.push(format!("target cold={cold}"));
        self.acks.push(ack);
    }
}

fn complete(task: ScsiTask) -> ScsiResponse {
    let blocks = u32::from(u16::from_be_bytes([task.cdb[7], task.cdb[8]]));
    match task.cdb[0] {
        0x28 => ScsiResponse {
            tag: task.tag,
            status: ScsiStatus::Good,
            sense: vec![],
            data_in: Some(IoBuf::from_vec(vec![0xab; blocks as usize * 512])),
            data_out_wanted: 0,
        },
        0x2a => ScsiResponse {
            tag: task.tag,
            status: ScsiStatus::Good,
            sense: vec![],
            data_in: None,
            data_out_wanted: blocks * 512,
        },
        _ => ScsiResponse {
            tag: task.tag,
            status: ScsiStatus::CheckCondition,
            sense: vec![0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0],
            data_in: None,
            data_out_wanted: 0,
        },
    }
}

struct Harness {
    conn: Connection,
    env: MockEnv,
    now: Instant,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One received PDU as the initiator sees it.
#[derive(Debug)]
struct Got {
    bhs: Bhs,
    data: Vec<u8>,
}

impl Got {
    fn op(&self) -> u8 {
        self.bhs.opcode()
    }
    fn u32(&self, at: usize) -> u32 {
        self.bhs.u32_at(at)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).replace('\0', "\n")
    }
}

impl Harness {
    fn new() -> Self {
        let now = Instant::now();
        let ka = Keepalive {
            interval: Some(Duration::from_secs(5)),
            timeout: Duration::from_secs(5),
            login: Duration::from_secs(15),
            pdu: Duration::from_secs(30),
            buffer_cap: 256 << 20,
        };
        Harness {
            conn: Connection::new(
                1,
                addr("127.0.0.1:5000"),
                addr("127.0.0.1:3260"),
                1,
                ka,
                now,
            ),
            env: MockEnv::new(),
            now,
        }
    }

    /// Feeds raw bytes in deliberately awkward pieces (7 bytes at most per read).
    fn feed(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            let buf = self.conn.rx_buf();
            if buf.is_empty() {
                return;
            }
            let n = buf.len().min(7).min(bytes.len() - at);
            buf[..n].copy_from_slice(&bytes[at..at + n]);
            at += n;
            self.conn.rx_filled(n, &mut self.env, self.now);
        }
    }

    fn send(&mut self, bhs: Bhs, data: &[u8]) {
        let mut b = bhs;
        let len = (data.len() as u32).to_be_bytes();
        b.0[5..8].copy_from_slice(&len[1..]);
        let mut wire = b.0.to_vec();
        wire.extend_from_slice(data);
        wire.resize(wire.len() + pdu::pad_len(data.len()), 0);
        self.feed(&wire);
    }

    /// Drains everything the connection wants to send and splits it into PDUs.
    fn recv(&mut self) -> Vec<Got> {
        let mut wire = Vec::new();
        loop {
            let mut iov = Vec::new();
            self.conn.tx_iovecs(&mut iov, 3);
            if iov.is_empty() {
                break;
            }
            let first = iov[0].to_vec();
            drop(iov);
            wire.extend_from_slice(&first);
            self.conn.tx_consumed(first.len());
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let bhs = Bhs::from_slice(&wire[at..]).unwrap();
            let dl = bhs.data_segment_len() as usize;
            let data = wire[at + 48..at + 48 + dl].to_vec();
            at += 48 + dl + pdu::pad_len(dl);
            out.push(Got { bhs, data });
        }
        out
    }

    fn complete_all(&mut self) {
        for t in std::mem::take(&mut self.env.submitted) {
            self.conn.scsi_done(complete(t));
        }
    }

    fn login_pdu(csg: u8, nsg: u8, transit: bool, keys: &[(&str, &str)]) -> (Bhs, Vec<u8>) {
        let mut h = Bhs::new();
        h.0[0] = 0x43;
        h.0[1] = (if transit { 0x80 } else { 0 }) | (csg << 2) | nsg;
        h.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        h.0[16..20].copy_from_slice(&7u32.to_be_bytes());
        h.0[24..28].copy_from_slice(&10u32.to_be_bytes());
        let mut d = Vec::new();
        for (k, v) in keys {
            text::push(&mut d, k, v);
        }
        (h, d)
    }

    fn login(&mut self, extra: &[(&str, &str)]) -> Vec<Got> {
        let mut keys = vec![
            ("InitiatorName", "iqn.i"),
            ("TargetName", "iqn.t"),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ];
        keys.extend_from_slice(extra);
        let (h, d) = Self::login_pdu(0, 1, true, &keys);
        self.send(h, &d);
        let mut got = self.recv();
        let (h, d) = Self::login_pdu(1, 3, true, &[("MaxRecvDataSegmentLength", "4096")]);
        self.send(h, &d);
        got.extend(self.recv());
        got
    }

    fn command(&mut self, itt: u32, cmdsn: u32, cdb: &[u8], edtl: u32, write: bool, imm: &[u8]) {
        let mut h = Bhs::new();
        h.0[0] = 0x01;
        h.0[1] = 0x80 | if write { 0x20 } else { 0x40 } | 1;
        h.0[16..20].copy_from_slice(&itt.to_be_bytes());
        h.0[20..24].copy_from_slice(&edtl.to_be_bytes());
        h.0[24..28].copy_from_slice(&cmdsn.to_be_bytes());
        h.0[32..32 + cdb.len()].copy_from_slice(cdb);
        self.send(h, imm);
    }

    fn data_out(&mut self, itt: u32, ttt: u32, datasn: u32, offset: u32, fin: bool, data: &[u8]) {
        let mut h = Bhs::new();
        h.0[0] = 0x05;
        h.0[1] = if fin { 0x80 } else { 0 };
        h.0[16..20].copy_from_slice(&itt.to_be_bytes());
        h.0[20..24].copy_from_slice(&ttt.to_be_bytes());
        h.0[36..40].copy_from_slice(&datasn.to_be_bytes());
        h.0[40..44].copy_from_slice(&offset.to_be_bytes());
        self.send(h, data);
    }
}

fn read10(blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(blocks: u16) -> Vec<u8> {
    let mut c = read10(blocks);
    c[0] = 0x2a;
    c
}

#[test]
fn login_security_then_operational_then_full_feature() {
    let mut h = Harness::new();
    let got = h.login(&[]);
    assert_eq!(got.len(), 2);
    let first = &got[0];
    assert_eq!(first.op(), pdu::opcode::LOGIN_RESPONSE);
    assert_eq!(first.bhs.0[1], 0x81, "T=1 CSG=0 NSG=1");
    assert_eq!((first.bhs.0[36], first.bhs.0[37]), (0, 0));
    assert!(first.text().contains("TargetPortalGroupTag=1"));
    assert!(first.text().contains("TargetAlias=alias"));
    assert!(first.text().contains("AuthMethod=None"));
    let last = &got[1];
    assert_eq!(last.bhs.0[1], 0x87, "T=1 CSG=1 NSG=3");
    assert_eq!(
        u16::from_be_bytes([last.bhs.0[14], last.bhs.0[15]]),
        1,
        "TSIH set"
    );
    assert!(last.text().contains("MaxRecvDataSegmentLength=262144"));
    assert_eq!(last.u32(28), 10, "ExpCmdSN = the login's CmdSN");
    assert_eq!(last.u32(32), 13, "MaxCmdSN = ExpCmdSN + queue depth 4 - 1");
    assert!(h.conn.in_full_feature());
    assert_eq!(
        first.u32(24).wrapping_add(1),
        last.u32(24),
        "StatSN advances"
    );
}

#[test]
fn login_failures_carry_status_and_close() {
    for (target, status) in [("iqn.nope", (2, 3)), ("iqn.denied", (2, 2))] {
        let mut h = Harness::new();
        let (b, d) = Harness::login_pdu(
            0,
            1,
            true,
            &[("InitiatorName", "iqn.i"), ("TargetName", target)],
        );
        h.send(b, &d);
        let got = h.recv();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].bhs.0[36], got[0].bhs.0[37]), status);
        assert!(h.conn.wants_close().is_some());
    }
    // Missing InitiatorName.
    let mut h = Harness::new();
    let (b, d) = Harness::login_pdu(0, 1, true, &[("TargetName", "iqn.t")]);
    h.send(b, &d);
    let got = h.recv();
    assert_eq!((got[0].bhs.0[36], got[0].bhs.0[37]), (2, 7));
    // Unsupported version.
    let mut h = Harness::new();
    let (mut b, d) = Harness::login_pdu(
        0,
        1,
        true,
        &[("InitiatorName", "i"), ("TargetName", "iqn.t")],
    );
    b.0[3] = 1;
    h.send(b, &d);
    assert_eq!((h.recv()[0].bhs.0[36]), 2);
    // Adding a connection to a session that does not exist.
    let mut h = Harness::new();
    let (mut b, d) = Harness::login_pdu(
        0,
        1,
        true,
        &[("InitiatorName", "i"), ("TargetName", "iqn.t")],
    );
    b.0[14..16].copy_from_slice(&9u16.to_be_bytes());
    h.send(b, &d);
    let got = h.recv();
    assert_eq!((got[0].bhs.0[36], got[0].bhs.0[37]), (2, 0x0a));
}

#[test]
fn a_non_login_pdu_before_full_feature_closes() {
    let mut h = Harness::new();
    h.command(1, 0, &read10(1), 512, false, &[]);
    assert!(h.conn.wants_close().is_some());
}

#[test]
fn read_is_split_by_mrdsl_with_status_in_last_data_in() {
    let mut h = Harness::new();
    h.login(&[]);
    h.command(0x10, 10, &read10(20), 20 * 512, false, &[]);
    assert_eq!(h.env.submitted.len(), 1);
    h.complete_all();
    let got = h.recv();
    // 10240 bytes at MRDSL 4096: 4096 + 4096 + 2048.
    assert_eq!(got.len(), 3);
    let lens: Vec<u32> = got.iter().map(|g| g.data.len() as u32).collect();
    assert_eq!(lens, vec![4096, 4096, 2048]);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.op(), pdu::opcode::DATA_IN);
        assert_eq!(g.u32(36), i as u32, "DataSN");
        assert_eq!(g.u32(40), i as u32 * 4096, "BufferOffset");
    }
    assert_eq!(got[2].bhs.0[1], 0x81, "F and S on the last only");
    assert_eq!(got[0].bhs.0[1], 0);
    assert!(got[2].data.iter().all(|&b| b == 0xab));
}

#[test]
fn read_residuals_underflow_and_overflow() {
    let mut h = Harness::new();
    h.login(&[]);
    h.command(1, 10, &read10(1), 10000, false, &[]);
    h.complete_all();
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].bhs.0[1], 0x80 | 0x01 | 0x02, "underflow");
    assert_eq!(got[0].u32(44), 10000 - 512);
    h.command(2, 11, &read10(1), 200, false, &[]);
    h.complete_all();
    let got = h.recv();
    assert_eq!(got[0].data.len(), 200);
    assert_eq!(got[0].bhs.0[1], 0x80 | 0x01 | 0x04, "overflow");
    assert_eq!(got[0].u32(44), 312);
    // EDTL 0: no Data-In at all, a SCSI Response with overflow 512.
    h.command(3, 12, &read10(1), 0, false, &[]);
    h.complete_all();
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].op(), pdu::opcode::SCSI_RESPONSE);
    assert_eq!(got[0].bhs.0[1], 0x84);
    assert_eq!(got[0].u32(44), 512);
}

#[test]
fn write_with_immediate_data_and_r2ts() {
    let mut h = Harness::new();
    // Small bursts so one write needs several R2Ts.
    h.env.global.max_burst_length = 1024;
    h.login(&[
        ("ImmediateData", "Yes"),
        ("InitialR2T", "Yes"),
        ("MaxBurstLength", "1024"),
        ("MaxOutstandingR2T", "1"),
    ]);
    let imm = vec![1u8; 512];
    h.command(0x20, 10, &write10(6), 3072, true, &imm);
    let got = h.recv();
    assert_eq!(got.len(), 1, "one R2T outstanding at a time");
    let r2t = &got[0];
    assert_eq!(r2t.op(), pdu::opcode::R2T);
    assert_eq!((r2t.u32(36), r2t.u32(40), r2t.u32(44)), (0, 512, 1024));
    let ttt = r2t.u32(20);
    h.data_out(0x20, ttt, 0, 512, false, &[2u8; 512]);
    assert!(h.recv().is_empty());
    h.data_out(0x20, ttt, 1, 1024, true, &[3u8; 512]);
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].u32(36), got[0].u32(40), got[0].u32(44)),
        (1, 1536, 1024)
    );
    let ttt2 = got[0].u32(20);
    assert_ne!(ttt, ttt2);
    h.data_out(0x20, ttt2, 0, 1536, true, &[4u8; 1024]);
    let got = h.recv();
    assert_eq!(
        (got[0].u32(36), got[0].u32(40), got[0].u32(44)),
        (2, 2560, 512)
    );
    h.data_out(0x20, got[0].u32(20), 0, 2560, true, &[5u8; 512]);
    assert_eq!(h.env.submitted.len(), 1);
    let data = h.env.submitted[0]
        .data_out
        .as_ref()
        .unwrap()
        .as_slice()
        .to_vec();
    assert_eq!(data.len(), 3072);
    assert!(data[..512].iter().all(|&b| b == 1));
    assert!(data[512..1024].iter().all(|&b| b == 2));
    assert!(data[2560..].iter().all(|&b| b == 5));
    h.complete_all();
    let got = h.recv();
    assert_eq!(got[0].op(), pdu::opcode::SCSI_RESPONSE);
    assert_eq!(got[0].bhs.0[1], 0x80, "no residual");
}

#[test]
fn unsolicited_data_out_when_initial_r2t_is_no() {
    let mut h = Harness::new();
    h.env.global.initial_r2t = false;
    h.login(&[("InitialR2T", "No"), ("FirstBurstLength", "65536")]);
    // No immediate data, F=0: unsolicited Data-Out follows.
    let mut b = Bhs::new();
    b.0[0] = 0x01;
    b.0[1] = 0x20 | 1;
    b.0[16..20].copy_from_slice(&5u32.to_be_bytes());
    b.0[20..24].copy_from_slice(&1024u32.to_be_bytes());
    b.0[24..28].copy_from_slice(&10u32.to_be_bytes());
    b.0[32..42].copy_from_slice(&write10(2));
    h.send(b, &[]);
    assert!(h.recv().is_empty(), "no R2T for unsolicited data");
    h.data_out(5, RESERVED_TAG, 0, 0, false, &[7u8; 512]);
    h.data_out(5, RESERVED_TAG, 1, 512, true, &[8u8; 512]);
    assert_eq!(h.env.submitted.len(), 1);
}

#[test]
fn bad_datasn_rejects_and_fails_the_command() {
    let mut h = Harness::new();
    h.login(&[("ImmediateData", "No")]);
    h.command(9, 10, &write10(2), 1024, true, &[]);
    let r2t = h.recv().remove(0);
    h.data_out(9, r2t.u32(20), 5, 0, false, &[0u8; 512]);
    let got = h.recv();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].op(), pdu::opcode::REJECT);
    assert_eq!(got[0].bhs.0[2], 0x04);
    assert_eq!(got[1].op(), pdu::opcode::SCSI_RESPONSE);
    assert_eq!(got[1].bhs.0[3], 0x02);
    assert_eq!((got[1].data[2 + 2], got[1].data[2 + 12]), (0x0b, 0x4b));
    // The rest of the command's data is dropped; the connection stays up.
    h.data_out(9, r2t.u32(20), 1, 512, true, &[0u8; 512]);
    assert!(h.recv().is_empty());
    assert!(h.conn.wants_close().is_none());
    assert!(h.env.submitted.is_empty());
    h.command(10, 11, &read10(1), 512, false, &[]);
    assert_eq!(h.env.submitted.len(), 1);
}

#[test]
fn login_may_start_in_the_operational_stage() {
    let mut h = Harness::new();
    let (b, d) = Harness::login_pdu(
        1,
        3,
        true,
        &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t")],
    );
    h.send(b, &d);
    let got = h.recv();
    assert_eq!((got[0].bhs.0[36], got[0].bhs.0[37]), (0, 0));
    assert_eq!(got[0].bhs.0[1], 0x87);
    assert!(h.conn.in_full_feature());
}

#[test]
fn cmdsn_window_holds_out_of_order_and_drops_outside() {
    let mut h = Harness::new();
    h.login(&[]);
    // Window is [10, 13]. CmdSN 11 arrives first: held.
    h.command(2, 11, &read10(1), 512, false, &[]);
    assert!(h.env.submitted.is_empty());
    // CmdSN 14 is beyond MaxCmdSN: dropped silently.
    h.command(3, 14, &read10(1), 512, false, &[]);
    // CmdSN 9 is below ExpCmdSN: dropped.
    h.command(4, 9, &read10(1), 512, false, &[]);
    h.command(1, 10, &read10(1), 512, false, &[]);
    let tags: Vec<u32> = h.env.submitted.iter().map(|t| t.tag as u32).collect();
    assert_eq!(tags, vec![1, 2], "delivered in CmdSN order");
    h.complete_all();
    let got = h.recv();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].u32(28), 12, "ExpCmdSN");
    assert_eq!(got[1].u32(32), 15, "window reopened: 12 + 4 - 1");
    // Immediate commands are delivered at once without consuming a CmdSN.
    let mut b = Bhs::new();
    b.0[0] = 0x41;
    b.0[1] = 0xc1;
    b.0[16..20].copy_from_slice(&7u32.to_be_bytes());
    b.0[20..24].copy_from_slice(&512u32.to_be_bytes());
    b.0[24..28].copy_from_slice(&12u32.to_be_bytes());
    b.0[32..42].copy_from_slice(&read10(1));
    h.send(b, &[]);
    assert_eq!(h.env.submitted.len(), 1);
    h.complete_all();
    assert_eq!(h.recv()[0].u32(28), 12);
}

#[test]
fn sense_goes_in_a_scsi_response() {
    let mut h = Harness::new();
    h.login(&[]);
    h.command(1, 10, &[0xff, 0, 0, 0, 0, 0], 0, false, &[]);
    h.complete_all();
    let got = h.recv();
    assert_eq!(got[0].op(), pdu::opcode::SCSI_RESPONSE);
    assert_eq!(got[0].bhs.0[3], 2);
    assert_eq!(&got[0].data[..2], &18u16.to_be_bytes());
    assert_eq!(got[0].data[2 + 12], 0x20);
}

#[test]
fn abort_task_waits_for_the_device() {
    let mut h = Harness::new();
    h.login(&[]);
    h.command(1, 10, &read10(1), 512, false, &[]);
    let mut t = Bhs::new();
    t.0[0] = 0x42;
    t.0[1] = 0x81;
    t.0[16..20].copy_from_slice(&50u32.to_be_bytes());
    t.0[20..24].copy_from_slice(&1u32.to_be_bytes());
    t.0[24..28].copy_from_slice(&11u32.to_be_bytes());
    h.send(t, &[]);
    assert!(
        h.recv().is_empty(),
        "answer only once the task left the device"
    );
    h.complete_all();
    let got = h.recv();
    assert_eq!(got.len(), 1, "no response for the aborted task");
    assert_eq!(got[0].op(), pdu::opcode::TASK_MGMT_RESPONSE);
    assert_eq!(got[0].bhs.0[2], 0);
    // Unknown task.
    t.0[20..24].copy_from_slice(&99u32.to_be_bytes());
    h.send(t, &[]);
    assert_eq!(h.recv()[0].bhs.0[2], 1);
}

#[test]
fn abort_of_a_task_waiting_for_data_out_answers_at_once() {
    let mut h = Harness::new();
    h.login(&[("ImmediateData", "No")]);
    h.command(1, 10, &write10(2), 1024, true, &[]);
    let r2t = h.recv().remove(0);
    assert_eq!(r2t.op(), pdu::opcode::R2T);
    let mut t = Bhs::new();
    t.0[0] = 0x42;
    t.0[1] = 0x81;
    t.0[16..20].copy_from_slice(&50u32.to_be_bytes());
    t.0[20..24].copy_from_slice(&1u32.to_be_bytes());
    h.send(t, &[]);
    let got = h.recv();
    assert_eq!(got[0].bhs.0[2], 0);
    // Late Data-Out for the aborted task is dropped without closing.
    h.data_out(1, r2t.u32(20), 0, 0, true, &[0u8; 1024]);
    assert!(h.conn.wants_close().is_none());
    assert!(h.env.submitted.is_empty());
}

#[test]
fn lun_reset_and_missing_lun() {
    let mut h = Harness::new();
    h.login(&[]);
    let mut t = Bhs::new();
    t.0[0] = 0x42;
    t.0[1] = 0x85;
    t.0[16..20].copy_from_slice(&50u32.to_be_bytes());
    h.send(t, &[]);
    // No answer until the device has reset.
    assert!(h.recv().is_empty());
    assert_eq!(h.env.resets, vec!["lun 0"]);
    let ack = h.env.acks.pop().unwrap();
    assert_eq!(ack as u32, 50);
    assert!(h
        .conn
        .scsi_done(ScsiResponse {
            tag: ack,
            status: ScsiStatus::Good,
            sense: vec![],
            data_in: None,
            data_out_wanted: 0,
        })
        .is_none());
    assert_eq!(h.recv()[0].bhs.0[2], 0);
    t.0[8..16].copy_from_slice(&pdu::encode_lun(3).to_be_bytes());
    h.send(t, &[]);
    assert_eq!(h.recv()[0].bhs.0[2], 2, "LUN does not exist");
}

#[test]
fn nop_out_echoes_data_and_keepalive_pings() {
    let mut h = Harness::new();
    h.login(&[]);
    let mut n = Bhs::new();
    n.0[0] = 0x40;
    n.0[1] = 0x80;
    n.0[16..20].copy_from_slice(&3u32.to_be_bytes());
    n.0[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
    h.send(n, b"ping");
    let got = h.recv();
    assert_eq!(got[0].op(), pdu::opcode::NOP_IN);
    assert_eq!(got[0].data, b"ping");
    assert_eq!(got[0].u32(16), 3);
    // Silence for the interval: a ping with a TTT.
    let later = h.now + Duration::from_secs(6);
    h.conn.on_tick(later);
    let ping = h.recv().remove(0);
    assert_eq!(ping.u32(16), RESERVED_TAG);
    let ttt = ping.u32(20);
    assert_ne!(ttt, RESERVED_TAG);
    // No answer within the timeout: the connection closes.
    h.conn.on_tick(later + Duration::from_secs(6));
    assert_eq!(h.conn.wants_close(), Some(&CloseReason::NopTimeout));
}

#[test]
fn discovery_spans_several_text_responses() {
    let mut h = Harness::new();
    let (b, d) = Harness::login_pdu(
        0,
        3,
        true,
        &[
            ("InitiatorName", "iqn.i"),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
            ("MaxRecvDataSegmentLength", "512"),
        ],
    );
    h.send(b, &d);
    let got = h.recv();
    assert_eq!((got[0].bhs.0[36], got[0].bhs.0[37]), (0, 0));
    assert!(h.conn.in_full_feature());
    let mut t = Bhs::new();
    t.0[0] = 0x44;
    t.0[1] = 0x80;
    t.0[16..20].copy_from_slice(&8u32.to_be_bytes());
    t.0[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
    t.0[24..28].copy_from_slice(&10u32.to_be_bytes());
    let mut body = Vec::new();
    text::push(&mut body, "SendTargets", "All");
    h.send(t, &body);
    let mut all = Vec::new();
    let mut rounds = 0;
    loop {
        let got = h.recv();
        assert_eq!(got.len(), 1);
        let g = &got[0];
        assert!(g.data.len() <= 512);
        all.extend_from_slice(&g.data);
        rounds += 1;
        if g.bhs.final_bit() {
            assert_eq!(g.u32(20), RESERVED_TAG);
            break;
        }
        assert_eq!(g.bhs.0[1] & 0x40, 0x40, "C bit while more follows");
        // Ask for more with the TTT we were given.
        let mut c = t;
        c.0[20..24].copy_from_slice(&g.u32(20).to_be_bytes());
        c.0[24..28].copy_from_slice(&(10 + rounds as u32).to_be_bytes());
        h.send(c, &[]);
        assert!(rounds < 100);
    }
    assert!(rounds > 5);
    let pairs = text::parse(&all).unwrap();
    let names = pairs.iter().filter(|(k, _)| k == "TargetName").count();
    assert_eq!(names, 40);
    assert_eq!(
        pairs.iter().filter(|(k, _)| k == "TargetAddress").count(),
        80
    );
    // SCSI commands are not allowed in a discovery session.
    h.command(1, 20, &read10(1), 512, false, &[]);
    assert_eq!(h.recv()[0].op(), pdu::opcode::REJECT);
}

#[test]
fn logout_answers_then_closes() {
    let mut h = Harness::new();
    h.login(&[]);
    let mut l = Bhs::new();
    l.0[0] = 0x46;
    l.0[1] = 0x80;
    l.0[16..20].copy_from_slice(&4u32.to_be_bytes());
    l.0[24..28].copy_from_slice(&10u32.to_be_bytes());
    h.send(l, &[]);
    assert!(h.conn.wants_close().is_none(), "response first");
    let got = h.recv();
    assert_eq!(got[0].op(), pdu::opcode::LOGOUT_RESPONSE);
    assert_eq!(got[0].bhs.0[2], 0);
    assert_eq!(h.conn.wants_close(), Some(&CloseReason::Logout));
}

#[test]
fn garbage_never_panics() {
    // A deterministic pseudo-random byte stream through a logged-in connection.
    let mut h = Harness::new();
    h.login(&[]);
    let mut x: u64 = 0x1234_5678;
    let mut bytes = Vec::new();
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.push(x as u8);
    }
    h.feed(&bytes);
    h.complete_all();
    let _ = h.recv();
}

#[test]
fn unknown_opcode_gets_reject_command_not_supported() {
    let mut h = Harness::new();
    h.login(&[]);
    let mut b = Bhs::new();
    b.0[0] = 0x1c;
    b.0[1] = 0x80;
    h.send(b, &[]);
    let got = h.recv();
    assert_eq!(got[0].op(), pdu::opcode::REJECT);
    assert_eq!(got[0].bhs.0[2], 0x05);
    assert_eq!(&got[0].data[..], &b.0[..]);
}

#[test]
fn serial_arithmetic() {
    assert!(sn_lt(1, 2));
    assert!(sn_lt(0xffff_fff0, 5));
    assert!(!sn_lt(5, 0xffff_fff0));
    assert!(sn_le(7, 7));
}

#[test]
fn large_segments_are_read_straight_into_the_task_buffer() {
    let mut h = Harness::new();
    h.login(&[("ImmediateData", "Yes"), ("FirstBurstLength", "65536")]);
    // 16 KiB of immediate data: after the header (staged), the rest of the segment is
    // handed out as the task buffer itself.
    let data: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
    let mut b = Bhs::new();
    b.0[0] = 0x01;
    b.0[1] = 0x80 | 0x20 | 1;
    b.0[16..20].copy_from_slice(&3u32.to_be_bytes());
    b.0[20..24].copy_from_slice(&16384u32.to_be_bytes());
    b.0[24..28].copy_from_slice(&10u32.to_be_bytes());
    b.0[32..42].copy_from_slice(&write10(32));
    let len = 16384u32.to_be_bytes();
    b.0[5..8].copy_from_slice(&len[1..]);
    // Header alone first, as a socket might deliver it.
    let buf = h.conn.rx_buf();
    buf[..48].copy_from_slice(&b.0);
    h.conn.rx_filled(48, &mut h.env, h.now);
    let direct = h.conn.rx_buf();
    assert_eq!(direct.len(), 16384, "the whole segment's final place");
    direct.copy_from_slice(&data);
    h.conn.rx_filled(16384, &mut h.env, h.now);
    assert_eq!(h.env.submitted.len(), 1);
    assert_eq!(
        h.env.submitted[0].data_out.as_ref().unwrap().as_slice(),
        &data[..]
    );
}

#[test]
fn many_small_pdus_in_one_read() {
    let mut h = Harness::new();
    h.login(&[]);
    // Four READ commands arrive in one read of the staging buffer.
    let mut wire = Vec::new();
    for i in 0..4u32 {
        let mut b = Bhs::new();
        b.0[0] = 0x01;
        b.0[1] = 0xc1;
        b.0[16..20].copy_from_slice(&(100 + i).to_be_bytes());
        b.0[20..24].copy_from_slice(&512u32.to_be_bytes());
        b.0[24..28].copy_from_slice(&(10 + i).to_be_bytes());
        b.0[32..42].copy_from_slice(&read10(1));
        wire.extend_from_slice(&b.0);
    }
    let buf = h.conn.rx_buf();
    assert!(buf.len() >= wire.len());
    buf[..wire.len()].copy_from_slice(&wire);
    h.conn.rx_filled(wire.len(), &mut h.env, h.now);
    assert_eq!(h.env.submitted.len(), 4);
}

impl Harness {
    fn snack(&mut self, kind: u8, itt: u32, beg: u32, run: u32, exp_statsn: u32) {
        let mut h = Bhs::new();
        h.0[0] = 0x10;
        h.0[1] = 0x80 | kind;
        h.0[16..20].copy_from_slice(&itt.to_be_bytes());
        h.0[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
        h.0[28..32].copy_from_slice(&exp_statsn.to_be_bytes());
        h.0[40..44].copy_from_slice(&beg.to_be_bytes());
        h.0[44..48].copy_from_slice(&run.to_be_bytes());
        self.send(h, &[]);
    }

    fn login_erl1(&mut self, extra: &[(&str, &str)]) {
        self.env.global.error_recovery_level = 1;
        let mut keys = vec![("ErrorRecoveryLevel", "1")];
        keys.extend_from_slice(extra);
        let got = self.login(&keys);
        assert!(
            got.iter()
                .any(|g| g.text().contains("ErrorRecoveryLevel=1")),
            "ERL 1 negotiated"
        );
    }
}

#[test]
fn snack_at_erl_0_is_rejected() {
    let mut h = Harness::new();
    h.login(&[]);
    h.snack(0, 1, 0, 0, 0);
    let got = h.recv();
    assert_eq!(got[0].op(), pdu::opcode::REJECT);
    assert_eq!(got[0].bhs.0[2], 0x04);
}

#[test]
fn erl1_data_snack_resends_the_asked_data_in_pdus() {
    let mut h = Harness::new();
    h.login_erl1(&[]);
    h.command(0x10, 10, &read10(20), 20 * 512, false, &[]);
    h.complete_all();
    let first = h.recv();
    assert_eq!(first.len(), 3);
    let statsn = first[2].u32(24);
    // DataSN 1 got lost: asked for again (RunLength 1), it comes back byte for byte.
    h.snack(0, 0x10, 1, 1, statsn);
    let again = h.recv();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].op(), pdu::opcode::DATA_IN);
    assert_eq!((again[0].u32(36), again[0].u32(40)), (1, 4096));
    assert_eq!(again[0].data, first[1].data);
    // RunLength 0: from BegRun to the end, the status-bearing last PDU included.
    h.snack(0, 0x10, 1, 0, statsn);
    let again = h.recv();
    assert_eq!(again.len(), 2);
    assert_eq!(again[1].bhs.0[1], 0x81);
    assert_eq!(again[1].u32(24), statsn, "the same StatSN");
    // Status SNACK for the read's StatSN: the last Data-In (it carries the status).
    h.snack(1, 0, statsn, 1, statsn);
    let again = h.recv();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].u32(36), 2);
    // Once acknowledged (ExpStatSN past it), nothing is kept: a SNACK is rejected.
    h.command(0x11, 11, &[0u8; 6], 0, false, &[]);
    h.env.submitted.clear();
    let mut n = Bhs::new();
    n.0[0] = 0x40;
    n.0[1] = 0x80;
    n.0[16..20].copy_from_slice(&7u32.to_be_bytes());
    n.0[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
    n.0[24..28].copy_from_slice(&12u32.to_be_bytes());
    n.0[28..32].copy_from_slice(&(statsn + 1).to_be_bytes());
    h.send(n, &[]);
    let _ = h.recv();
    h.snack(0, 0x10, 0, 0, statsn + 1);
    let got = h.recv();
    assert_eq!(got[0].op(), pdu::opcode::REJECT);
}

#[test]
fn erl1_r2t_and_status_snack_and_data_ack() {
    let mut h = Harness::new();
    h.login_erl1(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
    h.command(0x20, 10, &write10(2), 1024, true, &[]);
    let r2t = h.recv().remove(0);
    assert_eq!(r2t.op(), pdu::opcode::R2T);
    // The R2T got lost: R2T SNACK (Data/R2T type, BegRun = R2TSN 0).
    h.snack(0, 0x20, 0, 1, 0);
    let again = h.recv();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].op(), pdu::opcode::R2T);
    assert_eq!(again[0].u32(20), r2t.u32(20), "the same TTT");
    assert_eq!(again[0].u32(36), 0, "the same R2TSN");
    h.data_out(0x20, r2t.u32(20), 0, 0, true, &[9u8; 1024]);
    h.complete_all();
    let resp = h.recv().remove(0);
    assert_eq!(resp.op(), pdu::opcode::SCSI_RESPONSE);
    let statsn = resp.u32(24);
    // The response got lost: Status SNACK.
    h.snack(1, 0, statsn, 1, statsn);
    let again = h.recv();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].op(), pdu::opcode::SCSI_RESPONSE);
    assert_eq!((again[0].u32(16), again[0].u32(24)), (0x20, statsn));
    // A read acknowledged with DataACK is not kept.
    h.command(0x21, 11, &read10(1), 512, false, &[]);
    h.complete_all();
    let d = h.recv().remove(0);
    h.snack(2, 0x21, 0, 0, d.u32(24));
    assert!(h.recv().is_empty());
    h.snack(0, 0x21, 0, 0, d.u32(24));
    assert_eq!(h.recv()[0].op(), pdu::opcode::REJECT);
}
