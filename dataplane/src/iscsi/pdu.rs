//! The iSCSI PDU codec (RFC 7143 §11): a view over the 48-byte Basic Header Segment, typed
//! requests parsed from it, and typed responses emitted into a caller's header buffer.
//!
//! Parsing is split in two so the transport can read a header first and then the data segment
//! straight into its final place: [`Bhs::total_ahs_len`] and [`Bhs::data_segment_len`] tell
//! how many bytes follow (plus [`pad_len`] padding), and [`Request::parse`] turns a complete
//! header (+ AHS) into a typed value. Nothing here panics on any input: every malformed
//! header maps to a [`PduError`] that names the Reject reason to answer with.

use std::fmt;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Reserved tag value: "no task" (ITT/TTT).
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// The largest data segment a 24-bit DataSegmentLength can describe.
pub const MAX_DATA_SEGMENT: u32 = 0x00ff_ffff;

/// Initiator opcodes (RFC 7143 §11.1.1).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    LongOperationReject = 0x0a,
    WaitingForLogout = 0x0c,
}

/// Why a header could not be accepted, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PduError {
    /// Answer with a Reject of this reason carrying the offending header; the connection
    /// stays up.
    Reject(RejectReason, &'static str),
    /// The byte stream cannot be trusted any more (framing lost): close the connection.
    Fatal(&'static str),
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PduError::Reject(r, why) => write!(f, "reject ({r:?}): {why}"),
            PduError::Fatal(why) => write!(f, "fatal: {why}"),
        }
    }
}

impl std::error::Error for PduError {}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Padding that brings `len` to a multiple of 4.
pub fn pad_len(len: usize) -> usize {
    (4 - (len & 3)) & 3
}

/// A Basic Header Segment, as received or about to be sent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl fmt::Debug for Bhs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Bhs(op={:#04x} itt={:#010x} dsl={})",
            self.opcode(),
            self.itt(),
            self.data_segment_len()
        )
    }
}

impl Bhs {
    pub fn new() -> Self {
        Bhs([0; BHS_LEN])
    }

    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let arr: [u8; BHS_LEN] = b.get(..BHS_LEN)?.try_into().ok()?;
        Some(Bhs(arr))
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }

    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }

    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }

    pub fn total_ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }

    pub fn data_segment_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    pub fn lun_raw(&self) -> u64 {
        be64(&self.0, 8)
    }

    pub fn itt(&self) -> u32 {
        be32(&self.0, 16)
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.0, at)
    }

    fn set_opcode(&mut self, op: u8) {
        self.0[0] = op & 0x3f;
    }

    fn set_data_segment_len(&mut self, len: u32) {
        let b = len.min(MAX_DATA_SEGMENT).to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..4]);
    }

    fn set_u32(&mut self, at: usize, v: u32) {
        put32(&mut self.0, at, v);
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Self::new()
    }
}

/// Decodes an 8-byte LUN field (SAM-5 §4.7): peripheral and flat addressing of the first
/// level. Other address methods map to a number no LUN has, so they get "LUN not supported".
pub fn decode_lun(raw: u64) -> u64 {
    let first = (raw >> 48) as u16;
    match first >> 14 {
        // Peripheral device addressing: bus 0 only.
        0b00 if first >> 8 == 0 => u64::from(first & 0xff),
        // Flat space addressing.
        0b01 => u64::from(first & 0x3fff),
        _ => u64::MAX,
    }
}

/// Encodes a LUN number the way targets report it back (peripheral below 256, flat above).
pub fn encode_lun(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

/// Task attributes of a SCSI Command (RFC 7143 §11.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAttr {
    Untagged,
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// SCSI Command request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_bit: bool,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttr,
    pub lun: u64,
    pub itt: u32,
    pub edtl: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    /// The whole CDB: the 16 header bytes, extended by an Extended-CDB AHS when present.
    pub cdb: Vec<u8>,
    /// Expected Bidirectional Read Data Length from its AHS, when present.
    pub bidi_read_len: Option<u32>,
}

/// Task management functions (RFC 7143 §11.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfFunction {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
    TaskReassign,
    Unknown(u8),
}

impl TmfFunction {
    fn from_code(c: u8) -> Self {
        match c {
            1 => TmfFunction::AbortTask,
            2 => TmfFunction::AbortTaskSet,
            3 => TmfFunction::ClearAca,
            4 => TmfFunction::ClearTaskSet,
            5 => TmfFunction::LogicalUnitReset,
            6 => TmfFunction::TargetWarmReset,
            7 => TmfFunction::TargetColdReset,
            8 => TmfFunction::TaskReassign,
            other => TmfFunction::Unknown(other),
        }
    }
}

/// TMF responses (RFC 7143 §11.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TmfResponse {
    Complete = 0,
    TaskDoesNotExist = 1,
    LunDoesNotExist = 2,
    TaskStillAllegiant = 3,
    ReassignmentNotSupported = 4,
    NotSupported = 5,
    AuthorizationFailed = 6,
    Rejected = 255,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: u64,
    pub itt: u32,
    pub referenced_tag: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub ref_cmdsn: u32,
    pub exp_datasn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_bit: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_bit: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_statsn: u32,
    pub datasn: u32,
    pub buffer_offset: u32,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

/// Logout reasons (RFC 7143 §11.14.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutReason {
    CloseSession,
    CloseConnection,
    RemoveForRecovery,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmdsn: u32,
    pub exp_statsn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnackRequest {
    pub kind: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_statsn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// A request from the initiator, parsed from its BHS (and AHS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmt(TaskMgmtRequest),
    Login(LoginRequest),
    Text(TextRequest),
    DataOut(DataOut),
    Logout(LogoutRequest),
    Snack(SnackRequest),
}

impl Request {
    /// Parses a request header. `ahs` holds exactly the header's TotalAHSLength bytes.
    pub fn parse(bhs: &Bhs, ahs: &[u8]) -> Result<Request, PduError> {
        let b = &bhs.0;
        if ahs.len() != bhs.total_ahs_len() {
            return Err(PduError::Fatal("AHS length does not match TotalAHSLength"));
        }
        let imm = bhs.immediate();
        let fin = bhs.final_bit();
        let dsl = bhs.data_segment_len();
        let lun = bhs.lun_raw();
        let itt = bhs.itt();
        match bhs.opcode() {
            opcode::NOP_OUT => Ok(Request::NopOut(NopOut {
                immediate: imm,
                lun,
                itt,
                ttt: be32(b, 20),
                cmdsn: be32(b, 24),
                exp_statsn: be32(b, 28),
            })),
            opcode::SCSI_COMMAND => {
                let (cdb, bidi) = parse_command_ahs(&b[32..48], ahs)?;
                let flags = b[1];
                let attr = match flags & 0x07 {
                    0 => TaskAttr::Untagged,
                    1 => TaskAttr::Simple,
                    2 => TaskAttr::Ordered,
                    3 => TaskAttr::HeadOfQueue,
                    4 => TaskAttr::Aca,
                    _ => {
                        return Err(PduError::Reject(
                            RejectReason::InvalidPduField,
                            "reserved task attribute",
                        ))
                    }
                };
                let read = flags & 0x40 != 0;
                let write = flags & 0x20 != 0;
                if !write && !fin {
                    return Err(PduError::Reject(
                        RejectReason::ProtocolError,
                        "F bit clear on a command without write data",
                    ));
                }
                if itt == RESERVED_TAG {
                    return Err(PduError::Reject(
                        RejectReason::InvalidPduField,
                        "reserved ITT on a SCSI command",
                    ));
                }
                let edtl = be32(b, 20);
                if dsl > 0 && !write {
                    return Err(PduError::Reject(
                        RejectReason::ProtocolError,
                        "immediate data on a command without the W bit",
                    ));
                }
                Ok(Request::ScsiCommand(ScsiCommand {
                    immediate: imm,
                    final_bit: fin,
                    read,
                    write,
                    attr,
                    lun,
                    itt,
                    edtl,
                    cmdsn: be32(b, 24),
                    exp_statsn: be32(b, 28),
                    cdb,
                    bidi_read_len: bidi,
                }))
            }
            opcode::TASK_MGMT_REQUEST => {
                if !fin {
                    return Err(PduError::Reject(
                        RejectReason::ProtocolError,
                        "TMF request without the F bit",
                    ));
                }
                Ok(Request::TaskMgmt(TaskMgmtRequest {
                    immediate: imm,
                    function: TmfFunction::from_code(b[1] & 0x7f),
                    lun,
                    itt,
                    referenced_tag: be32(b, 20),
                    cmdsn: be32(b, 24),
                    exp_statsn: be32(b, 28),
                    ref_cmdsn: be32(b, 32),
                    exp_datasn: be32(b, 36),
                }))
            }
            opcode::LOGIN_REQUEST => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Ok(Request::Login(LoginRequest {
                    transit: b[1] & 0x80 != 0,
                    cont: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 0x03,
                    nsg: b[1] & 0x03,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt,
                    cid: be16(b, 20),
                    cmdsn: be32(b, 24),
                    exp_statsn: be32(b, 28),
                }))
            }
            opcode::TEXT_REQUEST => {
                let cont = b[1] & 0x40 != 0;
                if fin && cont {
                    return Err(PduError::Reject(
                        RejectReason::ProtocolError,
                        "text request with both F and C bits",
                    ));
                }
                Ok(Request::Text(TextRequest {
                    immediate: imm,
                    final_bit: fin,
                    cont,
                    lun,
                    itt,
                    ttt: be32(b, 20),
                    cmdsn: be32(b, 24),
                    exp_statsn: be32(b, 28),
                }))
            }
            opcode::DATA_OUT => Ok(Request::DataOut(DataOut {
                final_bit: fin,
                lun,
                itt,
                ttt: be32(b, 20),
                exp_statsn: be32(b, 28),
                datasn: be32(b, 36),
                buffer_offset: be32(b, 40),
                len: dsl,
            })),
            opcode::LOGOUT_REQUEST => {
                let reason = match b[1] & 0x7f {
                    0 => LogoutReason::CloseSession,
                    1 => LogoutReason::CloseConnection,
                    2 => LogoutReason::RemoveForRecovery,
                    _ => {
                        return Err(PduError::Reject(
                            RejectReason::InvalidPduField,
                            "unknown logout reason",
                        ))
                    }
                };
                Ok(Request::Logout(LogoutRequest {
                    immediate: imm,
                    reason,
                    itt,
                    cid: be16(b, 20),
                    cmdsn: be32(b, 24),
                    exp_statsn: be32(b, 28),
                }))
            }
            opcode::SNACK_REQUEST => Ok(Request::Snack(SnackRequest {
                kind: b[1] & 0x0f,
                lun,
                itt,
                ttt: be32(b, 20),
                exp_statsn: be32(b, 28),
                beg_run: be32(b, 40),
                run_length: be32(b, 44),
            })),
            // Target opcodes sent by an initiator, and unknown ones.
            _ => Err(PduError::Reject(
                RejectReason::CommandNotSupported,
                "unknown or target-only opcode",
            )),
        }
    }
}

/// Joins the header CDB with an Extended-CDB AHS and reads a Bidirectional Read Length AHS.
fn parse_command_ahs(cdb16: &[u8], mut ahs: &[u8]) -> Result<(Vec<u8>, Option<u32>), PduError> {
    let mut cdb = cdb16.to_vec();
    let mut bidi = None;
    let mut seen_ext = false;
    while !ahs.is_empty() {
        if ahs.len() < 4 {
            return Err(PduError::Fatal("truncated AHS"));
        }
        let ahs_len = be16(ahs, 0) as usize;
        let ahs_type = ahs[2];
        // AHSLength counts from the reserved byte (ahs[3]) on, and the segment is padded.
        let body_end = 3 + ahs_len;
        let seg_end = body_end + pad_len(body_end);
        if ahs_len == 0 || seg_end > ahs.len() {
            return Err(PduError::Fatal("AHS segment overruns TotalAHSLength"));
        }
        match ahs_type {
            1 => {
                if seen_ext {
                    return Err(PduError::Reject(
                        RejectReason::InvalidPduField,
                        "two extended CDB AHS",
                    ));
                }
                seen_ext = true;
                cdb.extend_from_slice(&ahs[4..body_end]);
            }
            2 => {
                if ahs_len != 5 {
                    return Err(PduError::Reject(
                        RejectReason::InvalidPduField,
                        "bidirectional read length AHS of wrong size",
                    ));
                }
                bidi = Some(be32(ahs, 4));
            }
            _ => {
                return Err(PduError::Reject(
                    RejectReason::InvalidPduField,
                    "unknown AHS type",
                ))
            }
        }
        ahs = &ahs[seg_end..];
    }
    Ok((cdb, bidi))
}

/// Sequence numbers every status-bearing target PDU carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqNumbers {
    pub statsn: u32,
    pub exp_cmdsn: u32,
    pub max_cmdsn: u32,
}

fn with_seq(bhs: &mut Bhs, seq: SeqNumbers) {
    bhs.set_u32(24, seq.statsn);
    bhs.set_u32(28, seq.exp_cmdsn);
    bhs.set_u32(32, seq.max_cmdsn);
}

/// Residual count and its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residual {
    #[default]
    None,
    Underflow(u32),
    Overflow(u32),
}

impl Residual {
    /// The residual of a transfer the initiator expected `expected` bytes of when the
    /// command called for `actual`.
    pub fn of(expected: u32, actual: u32) -> Residual {
        match expected.cmp(&actual) {
            std::cmp::Ordering::Equal => Residual::None,
            std::cmp::Ordering::Greater => Residual::Underflow(expected - actual),
            std::cmp::Ordering::Less => Residual::Overflow(actual - expected),
        }
    }

    fn flags(self) -> u8 {
        match self {
            Residual::None => 0,
            Residual::Underflow(_) => 0x02,
            Residual::Overflow(_) => 0x04,
        }
    }

    fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Underflow(n) | Residual::Overflow(n) => n,
        }
    }
}

/// Builders for target PDUs. Each returns the BHS; the caller sends the data segment
/// (whose length is set here) after it.
pub mod build {
    use super::*;

    pub fn nop_in(itt: u32, ttt: u32, lun: u64, seq: SeqNumbers, data_len: u32) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::NOP_IN);
        h.0[1] = 0x80;
        h.set_data_segment_len(data_len);
        put64(&mut h.0, 8, lun);
        h.set_u32(16, itt);
        h.set_u32(20, ttt);
        with_seq(&mut h, seq);
        h
    }

    /// SCSI Response; `data_len` is the sense segment length (2 + sense bytes, or 0).
    pub fn scsi_response(
        itt: u32,
        status: u8,
        residual: Residual,
        seq: SeqNumbers,
        exp_datasn: u32,
        data_len: u32,
    ) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::SCSI_RESPONSE);
        h.0[1] = 0x80 | residual.flags();
        h.0[2] = 0; // command completed at target
        h.0[3] = status;
        h.set_data_segment_len(data_len);
        h.set_u32(16, itt);
        h.set_u32(20, 0); // SNACK tag
        with_seq(&mut h, seq);
        h.set_u32(36, exp_datasn);
        h.set_u32(44, residual.count());
        h
    }

    /// Data-In. With `status` set the PDU also carries the command's status (S bit), its
    /// StatSN and residual.
    #[allow(clippy::too_many_arguments)]
    pub fn data_in(
        itt: u32,
        lun: u64,
        final_bit: bool,
        status: Option<(u8, Residual)>,
        seq: SeqNumbers,
        datasn: u32,
        offset: u32,
        data_len: u32,
    ) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::DATA_IN);
        let mut flags = if final_bit { 0x80 } else { 0 };
        if let Some((st, res)) = status {
            flags |= 0x80 | 0x01 | res.flags();
            h.0[3] = st;
            h.set_u32(44, res.count());
        }
        h.0[1] = flags;
        h.set_data_segment_len(data_len);
        put64(&mut h.0, 8, lun);
        h.set_u32(16, itt);
        h.set_u32(20, RESERVED_TAG);
        h.set_u32(24, if status.is_some() { seq.statsn } else { 0 });
        h.set_u32(28, seq.exp_cmdsn);
        h.set_u32(32, seq.max_cmdsn);
        h.set_u32(36, datasn);
        h.set_u32(40, offset);
        h
    }

    #[allow(clippy::too_many_arguments)]
    pub fn r2t(
        itt: u32,
        lun: u64,
        ttt: u32,
        seq: SeqNumbers,
        r2tsn: u32,
        offset: u32,
        length: u32,
    ) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::R2T);
        h.0[1] = 0x80;
        put64(&mut h.0, 8, lun);
        h.set_u32(16, itt);
        h.set_u32(20, ttt);
        with_seq(&mut h, seq);
        h.set_u32(36, r2tsn);
        h.set_u32(40, offset);
        h.set_u32(44, length);
        h
    }

    pub fn tmf_response(itt: u32, response: TmfResponse, seq: SeqNumbers) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::TASK_MGMT_RESPONSE);
        h.0[1] = 0x80;
        h.0[2] = response as u8;
        h.set_u32(16, itt);
        with_seq(&mut h, seq);
        h
    }

    /// Login Response. `status` is (class, detail).
    #[allow(clippy::too_many_arguments)]
    pub fn login_response(
        transit: bool,
        cont: bool,
        csg: u8,
        nsg: u8,
        isid: [u8; 6],
        tsih: u16,
        itt: u32,
        seq: SeqNumbers,
        status: (u8, u8),
        data_len: u32,
    ) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::LOGIN_RESPONSE);
        let mut f = ((csg & 3) << 2) | (nsg & 3);
        if transit {
            f |= 0x80;
        }
        if cont {
            f |= 0x40;
        }
        h.0[1] = f;
        h.0[2] = 0; // version max
        h.0[3] = 0; // version active
        h.set_data_segment_len(data_len);
        h.0[8..14].copy_from_slice(&isid);
        put16(&mut h.0, 14, tsih);
        h.set_u32(16, itt);
        with_seq(&mut h, seq);
        h.0[36] = status.0;
        h.0[37] = status.1;
        h
    }

    pub fn text_response(
        final_bit: bool,
        cont: bool,
        lun: u64,
        itt: u32,
        ttt: u32,
        seq: SeqNumbers,
        data_len: u32,
    ) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::TEXT_RESPONSE);
        h.0[1] = if final_bit { 0x80 } else { 0 } | if cont { 0x40 } else { 0 };
        h.set_data_segment_len(data_len);
        put64(&mut h.0, 8, lun);
        h.set_u32(16, itt);
        h.set_u32(20, ttt);
        with_seq(&mut h, seq);
        h
    }

    pub fn logout_response(
        itt: u32,
        response: u8,
        seq: SeqNumbers,
        time2wait: u16,
        time2retain: u16,
    ) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::LOGOUT_RESPONSE);
        h.0[1] = 0x80;
        h.0[2] = response;
        h.set_u32(16, itt);
        with_seq(&mut h, seq);
        put16(&mut h.0, 40, time2wait);
        put16(&mut h.0, 42, time2retain);
        h
    }

    #[allow(clippy::too_many_arguments)]
    pub fn async_message(
        lun: u64,
        seq: SeqNumbers,
        event: u8,
        vcode: u8,
        p1: u16,
        p2: u16,
        p3: u16,
        data_len: u32,
    ) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::ASYNC_MESSAGE);
        h.0[1] = 0x80;
        h.set_data_segment_len(data_len);
        put64(&mut h.0, 8, lun);
        h.set_u32(16, RESERVED_TAG);
        with_seq(&mut h, seq);
        h.0[36] = event;
        h.0[37] = vcode;
        put16(&mut h.0, 38, p1);
        put16(&mut h.0, 40, p2);
        put16(&mut h.0, 42, p3);
        h
    }

    /// Reject; the data segment is the rejected PDU's 48-byte header.
    pub fn reject(reason: RejectReason, seq: SeqNumbers, datasn_r2tsn: u32) -> Bhs {
        let mut h = Bhs::new();
        h.set_opcode(opcode::REJECT);
        h.0[1] = 0x80;
        h.0[2] = reason as u8;
        h.set_data_segment_len(BHS_LEN as u32);
        h.set_u32(16, RESERVED_TAG);
        with_seq(&mut h, seq);
        h.set_u32(36, datasn_r2tsn);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(op: u8, flags: u8) -> Bhs {
        let mut h = Bhs::new();
        h.0[0] = op;
        h.0[1] = flags;
        h
    }

    #[test]
    fn scsi_command_fields() {
        let mut h = header(0x41, 0xc1); // immediate, F, R, simple
        h.0[4] = 0;
        put64(&mut h.0, 8, encode_lun(3));
        put32(&mut h.0, 16, 0x1234);
        put32(&mut h.0, 20, 4096);
        put32(&mut h.0, 24, 7);
        put32(&mut h.0, 28, 9);
        h.0[32] = 0x28;
        let Request::ScsiCommand(c) = Request::parse(&h, &[]).unwrap() else {
            panic!("not a command")
        };
        assert!(c.immediate && c.final_bit && c.read && !c.write);
        assert_eq!(c.attr, TaskAttr::Simple);
        assert_eq!(decode_lun(c.lun), 3);
        assert_eq!((c.itt, c.edtl, c.cmdsn, c.exp_statsn), (0x1234, 4096, 7, 9));
        assert_eq!(c.cdb.len(), 16);
        assert_eq!(c.cdb[0], 0x28);
    }

    #[test]
    fn extended_cdb_and_bidi_ahs() {
        let mut h = header(0x01, 0xe1);
        // Extended CDB of 4 more bytes: AHSLength = 5, type 1, reserved, 4 bytes -> 8 bytes
        // padded; bidi AHS: length 5, type 2, reserved, 4 bytes.
        let mut ahs = vec![0, 5, 1, 0, 0xaa, 0xbb, 0xcc, 0xdd];
        ahs.extend_from_slice(&[0, 5, 2, 0, 0, 0, 0x10, 0]);
        h.0[4] = (ahs.len() / 4) as u8;
        let Request::ScsiCommand(c) = Request::parse(&h, &ahs).unwrap() else {
            panic!()
        };
        assert_eq!(c.cdb.len(), 20);
        assert_eq!(&c.cdb[16..], &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(c.bidi_read_len, Some(4096));
    }

    #[test]
    fn malformed_ahs_is_fatal_not_a_panic() {
        let mut h = header(0x01, 0x81);
        let ahs = vec![0, 200, 1, 0];
        h.0[4] = 1;
        assert!(matches!(Request::parse(&h, &ahs), Err(PduError::Fatal(_))));
        // Declared AHS length that the caller did not supply.
        h.0[4] = 2;
        assert!(matches!(Request::parse(&h, &ahs), Err(PduError::Fatal(_))));
    }

    #[test]
    fn unknown_and_target_opcodes_are_rejected() {
        for op in [0x07u8, 0x1c, 0x21, 0x25, 0x3f] {
            let h = header(op, 0x80);
            assert_eq!(
                Request::parse(&h, &[]),
                Err(PduError::Reject(
                    RejectReason::CommandNotSupported,
                    "unknown or target-only opcode"
                ))
            );
        }
    }

    #[test]
    fn every_initiator_opcode_parses() {
        for op in [0x00u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10] {
            let mut h = header(op, 0x80);
            put32(&mut h.0, 16, 1);
            assert!(Request::parse(&h, &[]).is_ok(), "opcode {op:#x}");
        }
    }

    #[test]
    fn login_request_stages() {
        let mut h = header(0x43, 0x87); // T, CSG=1, NSG=3
        h.0[8..14].copy_from_slice(&[0x80, 1, 2, 3, 4, 5]);
        put16(&mut h.0, 14, 0);
        put16(&mut h.0, 20, 1);
        let Request::Login(l) = Request::parse(&h, &[]).unwrap() else {
            panic!()
        };
        assert!(l.transit && !l.cont);
        assert_eq!((l.csg, l.nsg, l.cid), (1, 3, 1));
        assert_eq!(l.isid, [0x80, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn data_in_with_status_sets_s_f_and_residual() {
        let seq = SeqNumbers {
            statsn: 5,
            exp_cmdsn: 6,
            max_cmdsn: 70,
        };
        let h = build::data_in(
            9,
            0,
            true,
            Some((0, Residual::Underflow(100))),
            seq,
            2,
            8192,
            512,
        );
        assert_eq!(h.opcode(), opcode::DATA_IN);
        assert_eq!(h.0[1], 0x80 | 0x01 | 0x02);
        assert_eq!(h.data_segment_len(), 512);
        assert_eq!(h.u32_at(24), 5);
        assert_eq!(h.u32_at(36), 2);
        assert_eq!(h.u32_at(40), 8192);
        assert_eq!(h.u32_at(44), 100);
        let h = build::data_in(9, 0, false, None, seq, 0, 0, 512);
        assert_eq!(h.0[1], 0);
        assert_eq!(h.u32_at(24), 0);
        assert_eq!(h.u32_at(20), RESERVED_TAG);
    }

    #[test]
    fn scsi_response_residual_flags() {
        let seq = SeqNumbers::default();
        let h = build::scsi_response(1, 2, Residual::Overflow(512), seq, 0, 20);
        assert_eq!(h.0[1], 0x84);
        assert_eq!(h.0[3], 2);
        assert_eq!(h.u32_at(44), 512);
        assert_eq!(h.data_segment_len(), 20);
    }

    #[test]
    fn residual_of() {
        assert_eq!(Residual::of(10000, 512), Residual::Underflow(9488));
        assert_eq!(Residual::of(0, 512), Residual::Overflow(512));
        assert_eq!(Residual::of(512, 512), Residual::None);
    }

    #[test]
    fn lun_encoding_round_trips() {
        for lun in [0u64, 1, 255, 256, 16383] {
            assert_eq!(decode_lun(encode_lun(lun)), lun);
        }
        assert_eq!(decode_lun(0xc000_0000_0000_0000), u64::MAX);
    }

    #[test]
    fn padding() {
        assert_eq!(pad_len(0), 0);
        assert_eq!(pad_len(1), 3);
        assert_eq!(pad_len(4), 0);
        assert_eq!(pad_len(7), 1);
    }

    #[test]
    fn login_response_layout() {
        let seq = SeqNumbers {
            statsn: 1,
            exp_cmdsn: 2,
            max_cmdsn: 3,
        };
        let h = build::login_response(true, false, 1, 3, [1; 6], 7, 0x10, seq, (2, 3), 10);
        assert_eq!(h.0[0], 0x23);
        assert_eq!(h.0[1], 0x87);
        assert_eq!(be16(&h.0, 14), 7);
        assert_eq!((h.0[36], h.0[37]), (2, 3));
        assert_eq!(h.data_segment_len(), 10);
    }

    #[test]
    fn reject_carries_reason() {
        let h = build::reject(RejectReason::ProtocolError, SeqNumbers::default(), 0);
        assert_eq!(h.0[2], 0x04);
        assert_eq!(h.data_segment_len(), 48);
        assert_eq!(h.itt(), RESERVED_TAG);
    }
}
