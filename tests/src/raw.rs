//! A minimal iSCSI initiator over a raw socket, for tests that must see what libiscsi's
//! tools hide: unit attentions on a session that stays logged in, Async Messages, the
//! connection closing. One connection, no digests, immediate login to full feature phase,
//! commands without Data-Out.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One PDU as received: its 48-byte header and its data segment (padding removed).
pub struct RawPdu {
    pub bhs: [u8; 48],
    pub data: Vec<u8>,
}

impl RawPdu {
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
}

/// The outcome of a SCSI command.
#[derive(Debug, Default)]
pub struct Reply {
    pub status: u8,
    /// Sense data (fixed or descriptor format), empty without CHECK CONDITION.
    pub sense: Vec<u8>,
    pub data: Vec<u8>,
}

impl Reply {
    /// Sense key, ASC and ASCQ (either sense format); None without sense data.
    pub fn key_asc_ascq(&self) -> Option<(u8, u8, u8)> {
        let s = &self.sense;
        match s.first()? & 0x7f {
            0x72 | 0x73 if s.len() >= 4 => Some((s[1] & 0x0f, s[2], s[3])),
            0x70 | 0x71 if s.len() >= 14 => Some((s[2] & 0x0f, s[12], s[13])),
            _ => None,
        }
    }
}

/// A logged-in normal session.
pub struct RawSession {
    s: TcpStream,
    cmdsn: u32,
    exp_statsn: u32,
    itt: u32,
    /// Async Messages received so far (while waiting for command answers).
    pub async_messages: Vec<RawPdu>,
    /// Reject PDUs received so far.
    pub rejects: Vec<RawPdu>,
    /// CRC32C header and data digests (after login).
    digests: bool,
    /// Corrupt the data digest of the next PDU sent with data.
    pub corrupt_next_data_digest: bool,
    /// Everything sent, for the fuzzing corpus (see [`Drop`]).
    sent: Vec<u8>,
    /// The Expected Data Transfer Length of a write sent without data.
    write_expecting: u32,
    /// The session's TSIH (from the login response).
    pub tsih: u16,
    /// The login response's text.
    pub login_text: String,
}

/// With `FUZZ_SEED_DIR` set, each session leaves what it sent there
/// (`<dir>/connection/<pid>-<n>`): real sessions seed the connection fuzzer's corpus.
impl Drop for RawSession {
    fn drop(&mut self) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let Some(dir) = std::env::var_os("FUZZ_SEED_DIR") else {
            return;
        };
        let dir = std::path::Path::new(&dir).join("connection");
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if std::fs::create_dir_all(&dir).is_ok() && !self.sent.is_empty() {
            // The fuzz target takes its first 8 bytes as read sizes.
            let mut seed = vec![255u8; 8];
            seed.extend_from_slice(&self.sent);
            let _ = std::fs::write(dir.join(format!("{}-{n}", std::process::id())), seed);
        }
    }
}

fn crc(parts: &[&[u8]]) -> [u8; 4] {
    parts
        .iter()
        .fold(0, |c, p| crc32c::crc32c_append(c, p))
        .to_le_bytes()
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// The status class and detail of a one-PDU login straight to the operational stage
/// (skipping the security stage).
pub fn login_status(portal: &str, initiator: &str, target: &str) -> (u8, u8) {
    let mut s = TcpStream::connect(portal).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let text = format!(
        "InitiatorName={initiator}\0SessionType=Normal\0TargetName={target}\0\
         HeaderDigest=None\0DataDigest=None\0"
    );
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x43;
    pdu[1] = 0x80 | (1 << 2) | 3;
    pdu[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x80, 0x00, 0x7e, 0x58, 0x00, 0x01]);
    pdu[16..20].copy_from_slice(&1u32.to_be_bytes());
    pdu[24..28].copy_from_slice(&1u32.to_be_bytes());
    pdu.extend_from_slice(text.as_bytes());
    pdu.resize(48 + text.len().div_ceil(4) * 4, 0);
    s.write_all(&pdu).expect("send login");
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs).expect("login response");
    assert_eq!(bhs[0] & 0x3f, 0x23, "not a Login Response");
    (bhs[36], bhs[37])
}

impl RawSession {
    /// Logs in to `target` at `portal` as `initiator` (one Login Request straight to full
    /// feature phase); panics unless the login succeeds.
    pub fn login(portal: &str, initiator: &str, target: &str) -> RawSession {
        Self::login_with(portal, initiator, target, false)
    }

    /// Like [`login`](Self::login), asking for CRC32C header and data digests (and
    /// checking that the target agreed).
    pub fn login_with(portal: &str, initiator: &str, target: &str, digests: bool) -> RawSession {
        Self::login_full(portal, initiator, target, digests, &[])
    }

    /// [`RawSession::login_with`] offering more keys (or other values for the usual ones:
    /// MaxRecvDataSegmentLength, ImmediateData).
    pub fn login_full(
        portal: &str,
        initiator: &str,
        target: &str,
        digests: bool,
        keys: &[(&str, &str)],
    ) -> RawSession {
        Self::try_login(portal, initiator, target, digests, keys, (0, 0, 1))
            .unwrap_or_else(|s| panic!("login status {s:?}"))
    }

    /// Adds connection `cid` to session `tsih` (MC/S; same initiator name and ISID) with
    /// the session's next CmdSN; Err: the login status class and detail.
    pub fn join(
        portal: &str,
        initiator: &str,
        target: &str,
        tsih: u16,
        cid: u16,
        cmdsn: u32,
    ) -> Result<RawSession, (u8, u8)> {
        Self::try_login(portal, initiator, target, false, &[], (tsih, cid, cmdsn))
    }

    /// One-PDU login (operational stage straight to full feature) with TSIH, CID and CmdSN.
    pub fn try_login(
        portal: &str,
        initiator: &str,
        target: &str,
        digests: bool,
        keys: &[(&str, &str)],
        (tsih, cid, cmdsn): (u16, u16, u32),
    ) -> Result<RawSession, (u8, u8)> {
        let s = TcpStream::connect(portal).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = RawSession {
            s,
            cmdsn,
            exp_statsn: 0,
            itt: 1,
            async_messages: Vec::new(),
            rejects: Vec::new(),
            digests: false,
            corrupt_next_data_digest: false,
            sent: Vec::new(),
            write_expecting: 0,
            tsih: 0,
            login_text: String::new(),
        };
        let d = if digests { "CRC32C" } else { "None" };
        let mut text = format!(
            "InitiatorName={initiator}\0SessionType=Normal\0TargetName={target}\0\
             HeaderDigest={d}\0DataDigest={d}\0"
        );
        let defaults = [
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
        ];
        for (k, v) in defaults
            .iter()
            .filter(|(k, _)| !keys.iter().any(|(o, _)| o == k))
        {
            text.push_str(&format!("{k}={v}\0"));
        }
        for (k, v) in keys {
            text.push_str(&format!("{k}={v}\0"));
        }
        let mut bhs = [0u8; 48];
        bhs[0] = 0x43; // immediate | Login Request
        bhs[1] = 0x80 | (1 << 2) | 3; // T, CSG=1 (operational), NSG=3 (full feature)
        bhs[8..14].copy_from_slice(&[0x80, 0x00, 0x7e, 0x57, 0x00, 0x01]);
        bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
        bhs[16..20].copy_from_slice(&r.next_itt().to_be_bytes());
        bhs[20..22].copy_from_slice(&cid.to_be_bytes());
        bhs[24..28].copy_from_slice(&r.cmdsn.to_be_bytes());
        r.send(bhs, text.as_bytes());
        let p = r.recv().expect("login response");
        assert_eq!(p.opcode(), 0x23, "not a Login Response");
        if (p.bhs[36], p.bhs[37]) != (0, 0) {
            return Err((p.bhs[36], p.bhs[37]));
        }
        assert_eq!(p.bhs[1] & 0x83, 0x83, "full feature phase");
        r.tsih = u16::from_be_bytes([p.bhs[14], p.bhs[15]]);
        r.login_text = String::from_utf8_lossy(&p.data).replace('\0', "\n");
        if digests {
            let text = String::from_utf8_lossy(&p.data);
            assert!(text.contains("HeaderDigest=CRC32C"), "{text}");
            assert!(text.contains("DataDigest=CRC32C"), "{text}");
        }
        r.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
        r.digests = digests;
        Ok(r)
    }

    /// Sets the CmdSN of the next non-immediate request (the session's, with MC/S).
    pub fn set_cmdsn(&mut self, cmdsn: u32) {
        self.cmdsn = cmdsn;
    }

    pub fn cmdsn(&self) -> u32 {
        self.cmdsn
    }

    /// Moves this connection's ITTs past `itt` (tasks reassigned here keep theirs).
    pub fn skip_itts_past(&mut self, itt: u32) {
        self.itt = self.itt.max(itt);
    }

    /// An immediate NOP-Out ping; returns the NOP-In (ExpCmdSN at bytes 28..32).
    pub fn ping(&mut self) -> RawPdu {
        let itt = self.next_itt();
        let mut bhs = [0u8; 48];
        bhs[0] = 0x40; // immediate NOP-Out
        bhs[1] = 0x80;
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        bhs[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmdsn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_statsn.to_be_bytes());
        self.send(bhs, &[]);
        loop {
            let p = self.recv().expect("NOP-In");
            if p.opcode() == 0x20 && u32_at(&p.bhs, 16) == itt {
                self.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
                return p;
            }
            if matches!(p.opcode(), 0x21 | 0x32 | 0x3f) {
                self.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
            }
        }
    }

    /// Logout with `reason` (0 close the session, 1 close this connection); the response.
    pub fn logout(&mut self, reason: u8, cid: u16) -> RawPdu {
        let itt = self.next_itt();
        let mut bhs = [0u8; 48];
        bhs[0] = 0x40 | 0x06;
        bhs[1] = 0x80 | reason;
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        bhs[20..22].copy_from_slice(&cid.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmdsn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_statsn.to_be_bytes());
        self.send(bhs, &[]);
        loop {
            let p = self.recv().expect("Logout Response");
            if p.opcode() == 0x26 {
                return p;
            }
        }
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    fn send(&mut self, mut bhs: [u8; 48], data: &[u8]) {
        bhs[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        let mut pdu = bhs.to_vec();
        if self.digests {
            pdu.extend_from_slice(&crc(&[&bhs]));
        }
        let start = pdu.len();
        pdu.extend_from_slice(data);
        pdu.resize(start + data.len().div_ceil(4) * 4, 0);
        if self.digests && !data.is_empty() {
            let mut d = crc(&[&pdu[start..]]);
            if std::mem::take(&mut self.corrupt_next_data_digest) {
                d[0] ^= 0xff;
            }
            pdu.extend_from_slice(&d);
        }
        self.sent.extend_from_slice(&pdu);
        self.s.write_all(&pdu).expect("send PDU");
    }

    /// Sends a PDU as it is (digests added when the session uses them).
    pub fn send_pdu(&mut self, bhs: [u8; 48], data: &[u8]) {
        self.send(bhs, data);
    }

    /// The CmdSN for the next non-immediate request (and counts it as used).
    pub fn take_cmdsn(&mut self) -> u32 {
        let c = self.cmdsn;
        self.cmdsn = self.cmdsn.wrapping_add(1);
        c
    }

    /// The StatSN this initiator expects next (what it acknowledges).
    pub fn exp_statsn(&self) -> u32 {
        self.exp_statsn
    }

    /// Sends a 48-byte header as it is (no data).
    pub fn send_raw(&mut self, bhs: &[u8; 48]) {
        self.send(*bhs, &[]);
    }

    /// Sends a header whose digest is wrong (the target must drop the connection).
    pub fn send_bad_header_digest(&mut self) {
        let mut bhs = [0u8; 48];
        bhs[0] = 0x40; // NOP-Out, immediate
        bhs[1] = 0x80;
        bhs[16..20].copy_from_slice(&0x1234u32.to_be_bytes());
        bhs[20..24].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        let mut pdu = bhs.to_vec();
        let mut d = crc(&[&bhs]);
        d[3] ^= 0x01;
        pdu.extend_from_slice(&d);
        self.s.write_all(&pdu).expect("send PDU");
    }

    /// WRITE (10) of `data` (whole blocks of 512 bytes) as immediate data.
    pub fn write10(&mut self, lun: u64, lba: u32, data: &[u8]) -> Option<Reply> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&((data.len() / 512) as u16).to_be_bytes());
        self.command_with(lun, &cdb, 0, data)
    }

    /// WRITE (10) of `blocks` blocks of 512 bytes with no data sent: the target solicits
    /// it with R2Ts (which this client does not answer), or answers at once.
    pub fn write10_no_data(&mut self, lun: u64, lba: u32, blocks: u16) -> Option<Reply> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.write_expecting = u32::from(blocks) * 512;
        let r = self.command_with(lun, &cdb, 0, &[]);
        self.write_expecting = 0;
        r
    }

    /// READ (10) of `blocks` blocks of 512 bytes.
    pub fn read10(&mut self, lun: u64, lba: u32, blocks: u16) -> Option<Reply> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.command(lun, &cdb, u32::from(blocks) * 512)
    }

    /// The next PDU; None when the target closed the connection.
    pub fn recv(&mut self) -> Option<RawPdu> {
        let mut bhs = [0u8; 48];
        match self.s.read_exact(&mut bhs) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("receive: {e}"),
        }
        let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        if self.digests {
            let mut d = [0u8; 4];
            self.s.read_exact(&mut d).ok()?;
            assert_eq!(d, crc(&[&bhs]), "the target's header digest");
        }
        let mut data = vec![0u8; len.div_ceil(4) * 4];
        self.s.read_exact(&mut data).ok()?;
        if self.digests && len > 0 {
            let mut d = [0u8; 4];
            self.s.read_exact(&mut d).ok()?;
            assert_eq!(d, crc(&[&data]), "the target's data digest");
        }
        data.truncate(len);
        Some(RawPdu { bhs, data })
    }

    /// Sends a command for `lun` that reads at most `read_len` bytes (0: no data) and
    /// waits for its status. Async Messages met on the way are kept.
    pub fn command(&mut self, lun: u64, cdb: &[u8], read_len: u32) -> Option<Reply> {
        self.command_with(lun, cdb, read_len, &[])
    }

    /// A command with `immediate` data (a write of that many bytes) or reading up to
    /// `read_len` bytes. Rejects met on the way are kept in `rejects`.
    pub fn command_with(
        &mut self,
        lun: u64,
        cdb: &[u8],
        read_len: u32,
        immediate: &[u8],
    ) -> Option<Reply> {
        let itt = self.start_command(lun, cdb, read_len, immediate);
        self.wait_for(itt)
    }

    /// Sends a command (as [`RawSession::command_with`]) without waiting; returns its ITT.
    pub fn start_command(&mut self, lun: u64, cdb: &[u8], read_len: u32, immediate: &[u8]) -> u32 {
        let itt = self.next_itt();
        let mut bhs = [0u8; 48];
        bhs[0] = 0x01;
        bhs[1] = 0x80
            | if read_len > 0 { 0x40 } else { 0 }
            | if immediate.is_empty() && self.write_expecting == 0 {
                0
            } else {
                0x20
            }
            | 0x01;
        // Single-level LUN: peripheral addressing below 256, flat above.
        if lun < 256 {
            bhs[9] = lun as u8;
        } else {
            bhs[8] = 0x40 | (lun >> 8) as u8;
            bhs[9] = lun as u8;
        }
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        let edtl = if self.write_expecting > 0 {
            self.write_expecting
        } else if immediate.is_empty() {
            read_len
        } else {
            immediate.len() as u32
        };
        bhs[20..24].copy_from_slice(&edtl.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmdsn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_statsn.to_be_bytes());
        bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmdsn = self.cmdsn.wrapping_add(1);
        self.send(bhs, immediate);
        itt
    }

    /// Reads PDUs until the status of task `itt` (Async Messages and Rejects are kept).
    pub fn wait_for(&mut self, itt: u32) -> Option<Reply> {
        let mut reply = Reply::default();
        loop {
            let p = self.recv()?;
            match p.opcode() {
                0x25 if u32_at(&p.bhs, 16) == itt => {
                    reply.data.extend_from_slice(&p.data);
                    if p.bhs[1] & 0x01 != 0 {
                        reply.status = p.bhs[3];
                        self.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
                        return Some(reply);
                    }
                }
                0x21 if u32_at(&p.bhs, 16) == itt => {
                    reply.status = p.bhs[3];
                    if p.data.len() >= 2 {
                        let n = u16::from_be_bytes([p.data[0], p.data[1]]) as usize;
                        reply.sense = p.data[2..(2 + n).min(p.data.len())].to_vec();
                    }
                    self.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
                    return Some(reply);
                }
                0x32 => {
                    self.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
                    self.async_messages.push(p);
                }
                0x3f => {
                    self.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
                    self.rejects.push(p);
                }
                op => panic!("unexpected PDU opcode {op:#x}"),
            }
        }
    }

    /// TEST UNIT READY.
    pub fn tur(&mut self, lun: u64) -> Option<Reply> {
        self.command(lun, &[0u8; 6], 0)
    }

    /// The LUN numbers REPORT LUNS lists (single-level, below 16384).
    pub fn report_luns(&mut self) -> Vec<u64> {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xa0;
        cdb[6..10].copy_from_slice(&4096u32.to_be_bytes());
        let r = self.command(0, &cdb, 4096).expect("REPORT LUNS");
        assert_eq!(r.status, 0, "REPORT LUNS status");
        let n = u32_at(&r.data, 0) as usize / 8;
        (0..n)
            .map(|i| {
                let e = &r.data[8 + 8 * i..16 + 8 * i];
                (u64::from(e[0] & 0x3f) << 8) | u64::from(e[1])
            })
            .collect()
    }

    /// READ CAPACITY (16): the number of blocks and the block size.
    /// Sends an immediate task management request (`function`: 1 ABORT TASK, 5 LOGICAL
    /// UNIT RESET, 6 TARGET WARM RESET, ...) for `lun` and task `referenced`; returns its ITT.
    pub fn start_tmf(&mut self, function: u8, lun: u64, referenced: u32) -> u32 {
        let itt = self.next_itt();
        let mut bhs = [0u8; 48];
        bhs[0] = 0x40 | 0x02;
        bhs[1] = 0x80 | function;
        bhs[9] = lun as u8;
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        bhs[20..24].copy_from_slice(&referenced.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmdsn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_statsn.to_be_bytes());
        self.send(bhs, &[]);
        itt
    }

    /// Reads every PDU until the target has been quiet for `quiet` (or closed).
    pub fn drain(&mut self, quiet: Duration) -> Vec<RawPdu> {
        self.s.set_read_timeout(Some(quiet)).unwrap();
        let mut got = Vec::new();
        loop {
            let mut first = [0u8; 1];
            match self.s.peek(&mut first) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("receive: {e}"),
            }
            let Some(p) = self.recv() else { break };
            let op = p.opcode();
            if matches!(op, 0x21 | 0x22 | 0x32 | 0x3f) || (op == 0x25 && p.bhs[1] & 0x01 != 0) {
                self.exp_statsn = u32_at(&p.bhs, 24).wrapping_add(1);
            }
            got.push(p);
        }
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        got
    }

    pub fn capacity(&mut self, lun: u64) -> Option<Reply> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[10..14].copy_from_slice(&32u32.to_be_bytes());
        self.command(lun, &cdb, 32)
    }
}
