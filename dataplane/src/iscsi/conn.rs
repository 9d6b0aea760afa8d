//! One iSCSI connection and its part of the session: framing, login, the CmdSN window
//! (session-wide with MC/S: the reactor hands it between a session's connections, see
//! `window`/`set_window`/`resume`), R2T and Data-Out sequencing, Data-In generation, task
//! management, NOPs, text, logout, and error recovery (ERL 1: SNACK and recovery R2Ts;
//! ERL 2: a failed connection's tasks handed over for TASK REASSIGN).
//!
//! Driving it (the transport's side of the contract):
//! - receive: [`Connection::rx_buf`] is the slice the next bytes from the socket belong in
//!   (a header, or a data segment's final place, such as a WRITE's buffer);
//!   read into it, then call [`Connection::rx_filled`] with how many bytes arrived.
//! - transmit: [`Connection::tx_iovecs`] lists what to write (headers and data slices, Data-In
//!   straight from the read buffer); after a write call [`Connection::tx_consumed`].
//! - SCSI: completions from the target's device go to [`Connection::scsi_done`].
//! - time: [`Connection::on_tick`] drives keepalive NOP-Ins and their timeout.
//! - [`Connection::wants_close`] says when the transport should close the socket.

use super::login::{Established, Login, LoginStep};
use super::params::{ConnParams, SessionParams, SessionType};
use super::pdu::{
    self, build, Bhs, DataOut, LogoutReason, NopOut, PduError, RejectReason, Request, Residual,
    ScsiCommand, SeqNumbers, SnackRequest, TaskMgmtRequest, TextRequest, TmfFunction, TmfResponse,
    BHS_LEN, RESERVED_TAG,
};
use super::{text, TargetEnv, TargetId};
use crate::mem::IoBuf;
use crate::scsi::{DataDirection, ItNexus, NexusId, ScsiResponse, ScsiStatus, ScsiTask};
use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest write we gather into one buffer (Expected Data Transfer Length).
pub const MAX_WRITE_LEN: u32 = 64 * 1024 * 1024;
/// Fixed-format sense: ABORTED COMMAND, DATA PHASE ERROR (0x4B/0x00).
const DATA_PHASE_ERROR_SENSE: [u8; 18] = [
    0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4b, 0x00, 0, 0, 0, 0,
];
/// A data segment with at least this much still to come is read straight into place.
pub const DIRECT_RX_MIN: usize = 4096;
/// Size of the receive staging buffer.
const RX_STASH: usize = 16 * 1024;
/// Largest data segment accepted during login (RFC 7143 default MRDSL).
const LOGIN_MRDSL: u32 = 8192;

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers: `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// What a finished SCSI command amounts to, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandDone {
    /// From the command's arrival to its response being queued.
    pub latency: Duration,
    pub read: bool,
    pub write: bool,
    /// Data sent to the initiator.
    pub bytes_in: u64,
    /// Data received from the initiator.
    pub bytes_out: u64,
    /// Status GOOD.
    pub good: bool,
    /// The LUN it was for.
    pub lun: u64,
}

/// Adding finished commands to statistics counters.
pub trait CountCommand {
    fn count(&mut self, d: &CommandDone);
}

impl CountCommand for control::ReactorStats {
    fn count(&mut self, d: &CommandDone) {
        self.commands += 1;
        self.read_commands += u64::from(d.read);
        self.write_commands += u64::from(d.write);
        self.read_bytes += d.bytes_in;
        self.write_bytes += d.bytes_out;
        self.errors += u64::from(!d.good);
        self.record_latency(d.latency.as_micros() as u64);
    }
}

/// Why a connection is closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    LoginFailed(u8, u8),
    Logout,
    ProtocolError(String),
    NopTimeout,
    Reinstated,
    PeerClosed,
    /// The control plane removed the session's target.
    TargetRemoved,
    /// The control plane removed the portal group the session came through, or no longer
    /// exposes its target there.
    Unmapped,
    /// The login did not finish in time.
    LoginTimeout,
    /// The peer stopped in the middle of a PDU.
    PduTimeout,
    /// Logout "remove the connection for recovery" (ERL 2) from another connection.
    RemovedForRecovery,
    /// A new connection of the session logged in with this one's CID (connection
    /// reinstatement, RFC 7143 §6.3.4): at ERL 2 its tasks wait for reassignment.
    Replaced,
    /// The target is stopping.
    Shutdown,
}

impl CloseReason {
    /// Whether the connection failed (rather than ended by logout, reinstatement or the
    /// control plane): at ERL 2 its tasks wait for reassignment to another connection.
    fn is_failure(&self) -> bool {
        matches!(
            self,
            CloseReason::PeerClosed
                | CloseReason::NopTimeout
                | CloseReason::PduTimeout
                | CloseReason::ProtocolError(_)
                | CloseReason::RemovedForRecovery
                | CloseReason::Replaced
        )
    }
}

/// A task of a connection that failed at ERL 2, kept for DefaultTime2Wait +
/// DefaultTime2Retain until TASK REASSIGN moves it to another connection of its session
/// (RFC 7143 §7.2.2, connection recovery).
#[derive(Debug)]
pub struct OrphanTask {
    itt: u32,
    state: OrphanState,
}

#[derive(Debug)]
enum OrphanState {
    /// Not answered yet: still collecting data, or in the device (its answer comes tagged
    /// with the failed connection's uid, or has come: `response`).
    Open {
        task: Box<Task>,
        response: Option<ScsiResponse>,
    },
    /// Answered, but the initiator never acknowledged the status: the PDUs to send again
    /// (Data-In and status; StatSN renumbered on the new connection).
    Answered(Vec<OutPdu>),
}

impl OrphanTask {
    pub fn itt(&self) -> u32 {
        self.itt
    }

    /// Whether the device still owes this task's answer.
    pub fn in_device(&self) -> bool {
        matches!(&self.state, OrphanState::Open { task, response: None } if task.state == TaskState::Submitted)
    }

    /// The device's answer, arrived after the connection failed.
    pub fn answered(&mut self, r: ScsiResponse) {
        if let OrphanState::Open { response, .. } = &mut self.state {
            *response = Some(r);
        }
    }
}

/// The data part of an outgoing PDU.
#[derive(Debug, Clone)]
enum OutData {
    None,
    Owned(Vec<u8>),
    /// A slice of a shared buffer (Data-In straight from the device's read buffer).
    Shared(Arc<IoBuf>, usize, usize),
}

impl OutData {
    fn bytes(&self) -> &[u8] {
        match self {
            OutData::None => &[],
            OutData::Owned(v) => v,
            OutData::Shared(b, off, len) => &b.as_slice()[*off..*off + *len],
        }
    }
}

#[derive(Debug, Clone)]
struct OutPdu {
    bhs: Bhs,
    data: OutData,
    /// CRC32C of the header and of the data segment, when the connection uses them.
    header_digest: Option<[u8; 4]>,
    data_digest: Option<[u8; 4]>,
}

const ZERO_PAD: [u8; 3] = [0; 3];

impl OutPdu {
    fn wire_len(&self) -> usize {
        let d = self.data.bytes().len();
        BHS_LEN
            + d
            + pdu::pad_len(d)
            + 4 * usize::from(self.header_digest.is_some())
            + 4 * usize::from(self.data_digest.is_some())
    }
}

/// Whether a PDU the target sends carries a StatSN of its own (Status SNACK can ask for it
/// again): responses, Data-In with status, Rejects, Async Messages, NOP-In answers.
fn carries_status(bhs: &Bhs) -> bool {
    match bhs.opcode() {
        pdu::opcode::DATA_IN => bhs.0[1] & 0x01 != 0,
        pdu::opcode::NOP_IN => bhs.u32_at(16) != RESERVED_TAG,
        pdu::opcode::R2T => false,
        _ => true,
    }
}

/// The iSCSI digest of some bytes: CRC32C, sent least significant byte first (as Linux
/// and libiscsi do).
fn crc32c_of(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// One solicited transfer (R2T) of a write task.
#[derive(Debug, Clone)]
struct R2t {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_datasn: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    /// Received, waiting for its turn in CmdSN order.
    Waiting,
    /// Delivered; gathering Data-Out.
    Collecting,
    /// Handed to the SCSI device.
    Submitted,
}

#[derive(Debug)]
struct Task {
    itt: u32,
    /// When the command's header arrived (latency statistics).
    received_at: Instant,
    lun_raw: u64,
    lun: u64,
    cmd: ScsiCommand,
    state: TaskState,
    buf: Option<IoBuf>,
    /// Bytes of unsolicited data (immediate plus unsolicited Data-Out) this command carries.
    unsolicited_len: u32,
    unsolicited_received: u32,
    unsol_next_datasn: u32,
    /// Next byte offset not yet solicited by an R2T.
    next_solicit: u32,
    r2ts: Vec<R2t>,
    r2tsn: u32,
    /// Total bytes of Data-Out received (unsolicited and solicited).
    received: u32,
    aborted: bool,
    /// Some of its data came with a bad data digest: it ends with CHECK CONDITION once
    /// all its data is in, without reaching the device.
    digest_failed: bool,
    /// Its write buffer would exceed the connection's budget: it ends with TASK SET FULL
    /// (the initiator retries later) without soliciting its data.
    over_budget: bool,
    /// ERL 1: ranges (offset, length) whose Data-Out came with a bad data digest; they are
    /// asked for again with recovery R2Ts once the rest is in.
    redo: Vec<(u32, u32)>,
    /// Recovery R2Ts sent so far (bounded: a path that corrupts everything fails the
    /// command instead).
    recoveries: u32,
}

impl Task {
    fn data_complete(&self) -> bool {
        !self.cmd.write || self.received >= self.cmd.edtl
    }
}

/// Commands one connection holds for their CmdSN at most (the window bounds them: a
/// queue depth is at most 4096).
pub const MAX_HELD_PER_SESSION: usize = 4096;

/// Recovery R2Ts one command may take before it fails with PROTOCOL SERVICE CRC ERROR.
const MAX_RECOVERIES: u32 = 16;
/// Status-bearing PDUs kept for Status SNACK until acknowledged (oldest dropped beyond).
const MAX_RETAINED_STATUS: usize = 1024;
/// Finished reads whose Data-In is kept for Data SNACK until acknowledged.
const MAX_RETAINED_READS: usize = 256;
/// Bytes of read data kept per connection for Data SNACK; the oldest reads go first, and
/// a larger read is not kept (a SNACK for it is rejected: the initiator retries the
/// command).
const MAX_RETAINED_READ_BYTES: usize = 64 << 20;

impl Retained {
    fn read_len(pdus: &[OutPdu]) -> usize {
        pdus.iter().map(|p| p.data.bytes().len()).sum()
    }

    fn forget_read(&mut self, itt: u32) {
        if let Some((_, pdus)) = self.reads.remove(&itt) {
            self.read_bytes = self.read_bytes.saturating_sub(Self::read_len(&pdus));
        }
    }

    /// Keeps a finished read's Data-In, making room by dropping the oldest reads.
    fn keep_read(&mut self, itt: u32, statsn: u32, now_sn: u32, pdus: Vec<OutPdu>) {
        self.forget_read(itt);
        let len = Self::read_len(&pdus);
        if len > MAX_RETAINED_READ_BYTES {
            return;
        }
        while !self.reads.is_empty()
            && (self.reads.len() >= MAX_RETAINED_READS
                || self.read_bytes + len > MAX_RETAINED_READ_BYTES)
        {
            let oldest = self
                .reads
                .iter()
                .max_by_key(|(_, (sn, _))| now_sn.wrapping_sub(*sn))
                .map(|(itt, _)| *itt);
            match oldest {
                Some(o) => self.forget_read(o),
                None => break,
            }
        }
        self.read_bytes += len;
        self.reads.insert(itt, (statsn, pdus));
    }
}

/// ERL 1 (RFC 7143 §7.2): what was sent and may be asked for again with a SNACK, kept
/// until the initiator acknowledges it (ExpStatSN past its status, or a DataACK).
#[derive(Debug, Default)]
struct Retained {
    /// Status-bearing PDUs with their StatSN, oldest first.
    status: VecDeque<(u32, OutPdu)>,
    /// Data-In PDUs of finished reads: ITT -> (StatSN of the read's status, PDUs in DataSN
    /// order).
    reads: HashMap<u32, (u32, Vec<OutPdu>)>,
    /// Bytes of read data `reads` holds (bounded by [`MAX_RETAINED_READ_BYTES`]).
    read_bytes: usize,
    /// R2Ts of tasks still collecting data, by ITT, in R2TSN order.
    r2ts: HashMap<u32, Vec<OutPdu>>,
}

/// MC/S: task management that reaches the session's other connections (the reactor
/// applies it there, see [`Connection::take_sibling_tmf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiblingTmf {
    /// ABORT TASK for a task this connection does not carry: answered once the other
    /// connections were asked ([`Connection::sibling_answered`]).
    AbortTask { tmf_itt: u32, referenced: u32 },
    /// The session's tasks on a LUN (None: every LUN) end on the other connections too,
    /// without answers (ABORT/CLEAR TASK SET, resets).
    AbortSet { lun: Option<u64> },
}

/// A task-management request waiting for aborted tasks to leave the device.
#[derive(Debug)]
struct PendingTmf {
    itt: u32,
    waiting_for: Vec<u32>,
    response: TmfResponse,
    close_after: bool,
}

/// A non-immediate request held until its CmdSN comes up.
#[derive(Debug)]
enum Deferred {
    Scsi(u32),
    Other(Request, Vec<u8>, Bhs),
}

/// Where the bytes being received go.
#[derive(Debug)]
enum RxStage {
    Header {
        got: usize,
    },
    Ahs {
        got: usize,
    },
    Data {
        dest: RxDest,
        len: usize,
        got: usize,
    },
    Pad {
        got: usize,
        len: usize,
    },
    /// The header digest after the header and AHS.
    HeaderDigest {
        got: usize,
    },
    /// The data digest after the data segment and its padding.
    DataDigest {
        got: usize,
    },
}

#[derive(Debug, Clone, Copy)]
enum RxDest {
    /// The connection's scratch buffer (login, text, NOP data).
    Scratch,
    /// Straight into a write task's buffer at `offset`.
    Task { itt: u32, offset: usize },
}

/// A SendTargets answer that spans several Text Responses.
#[derive(Debug)]
struct TextContinuation {
    itt: u32,
    ttt: u32,
    data: Vec<u8>,
    sent: usize,
}

#[derive(Debug)]
enum Phase {
    Login(Box<Login>),
    FullFeature,
    Closing,
}

/// Keepalive settings.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Option<Duration>,
    pub timeout: Duration,
    /// Longest a login may take.
    pub login: Duration,
    /// Longest one PDU may take to arrive once it started.
    pub pdu: Duration,
    /// Bytes of write buffers the connection's commands may hold at once (0: no limit).
    pub buffer_cap: usize,
}

/// Write buffers up to this size are not counted against the connection's budget: the
/// command window already bounds them (queue depth x this).
const SMALL_WRITE: usize = 256 * 1024;

/// One iSCSI connection.
pub struct Connection {
    uid: u64,
    peer: SocketAddr,
    local: SocketAddr,
    phase: Phase,
    close: Option<CloseReason>,
    // Receive framing.
    rx_stage: RxStage,
    rx_hdr: [u8; BHS_LEN],
    rx_ahs: Vec<u8>,
    rx_scratch: Vec<u8>,
    rx_pad: [u8; 4],
    /// A received header or data digest.
    rx_digest: [u8; 4],
    /// Where the current PDU's data segment went, and its length (for its digest).
    rx_data: (RxDest, usize),
    rx_req: Option<Result<Request, PduError>>,
    /// Staging for headers and small segments (see `rx_buf`).
    rx_stash: Vec<u8>,
    /// Whether the last `rx_buf` handed out a final destination rather than the stash.
    rx_direct: bool,
    // Session state (full feature phase).
    session_type: SessionType,
    target: Option<TargetId>,
    target_name: Option<String>,
    initiator_name: String,
    tsih: u16,
    cid: u16,
    nexus: NexusId,
    sp: SessionParams,
    cp: ConnParams,
    queue_depth: u32,
    exp_cmdsn: u32,
    max_cmdsn: u32,
    statsn: u32,
    deferred: HashMap<u32, Deferred>,
    tasks: HashMap<u32, Task>,
    pending_tmfs: Vec<PendingTmf>,
    next_ttt: u32,
    text_cont: Option<TextContinuation>,
    text_partial: Vec<u8>,
    /// ERL 1 retransmission state (empty at ERL 0).
    retained: Retained,
    /// The reactor of the session this connection joined, until the reactor moves it there.
    home: Option<usize>,
    /// A Logout closed the whole session.
    session_logout: bool,
    /// Bytes received after the login of a connection that must first move to its
    /// session's reactor.
    rx_held: Vec<u8>,
    /// Another connection of the session to remove for recovery (Logout reason 2).
    remove_cid: Option<(u16, bool)>,
    /// Answers that came after the connection failed at ERL 2, before its teardown.
    late: HashMap<u32, ScsiResponse>,
    /// Task management for the session's other connections (MC/S).
    sibling_tmf: Vec<SiblingTmf>,
    /// The task created for the data of the command PDU being received (ERL 1 discards
    /// it with the PDU when the data digest is bad).
    rx_new_task: Option<u32>,
    // Transmit queue.
    out: VecDeque<OutPdu>,
    out_offset: usize,
    // Keepalive.
    keepalive: Keepalive,
    last_rx: Instant,
    nop_outstanding: Option<(u32, Instant)>,
    /// Close once the transmit queue is flushed.
    close_after_flush: bool,
    /// The portal group the connection came in through.
    pg_tag: u16,
    /// Commands finished on this connection, for the control plane.
    stats: control::ReactorStats,
    /// When the connection was accepted (login timeout).
    created: Instant,
    /// When the first byte of the PDU being received arrived.
    pdu_started: Instant,
    /// Dropped with the connection (e.g. its place in a per-address count).
    ticket: Option<Box<dyn Send>>,
}

impl Connection {
    pub fn new(
        uid: u64,
        peer: SocketAddr,
        local: SocketAddr,
        pg_tag: u16,
        keepalive: Keepalive,
        now: Instant,
    ) -> Self {
        Connection {
            uid,
            peer,
            local,
            phase: Phase::Login(Box::new(Login::new(uid, peer, pg_tag))),
            close: None,
            rx_stage: RxStage::Header { got: 0 },
            rx_hdr: [0; BHS_LEN],
            rx_ahs: Vec::new(),
            rx_scratch: Vec::new(),
            rx_pad: [0; 4],
            rx_digest: [0; 4],
            rx_data: (RxDest::Scratch, 0),
            rx_req: None,
            rx_stash: Vec::new(),
            rx_direct: false,
            session_type: SessionType::Normal,
            target: None,
            target_name: None,
            initiator_name: String::new(),
            tsih: 0,
            cid: 0,
            nexus: uid,
            sp: SessionParams::default(),
            cp: ConnParams::default(),
            queue_depth: 1,
            exp_cmdsn: 0,
            max_cmdsn: 0,
            statsn: 0,
            deferred: HashMap::new(),
            tasks: HashMap::new(),
            pending_tmfs: Vec::new(),
            next_ttt: 1,
            text_cont: None,
            text_partial: Vec::new(),
            retained: Retained::default(),
            home: None,
            session_logout: false,
            rx_held: Vec::new(),
            remove_cid: None,
            late: HashMap::new(),
            sibling_tmf: Vec::new(),
            rx_new_task: None,
            out: VecDeque::new(),
            out_offset: 0,
            keepalive,
            last_rx: now,
            nop_outstanding: None,
            close_after_flush: false,
            pg_tag,
            stats: control::ReactorStats::default(),
            created: now,
            pdu_started: now,
            ticket: None,
        }
    }

    /// Keeps `ticket` until the connection is dropped.
    pub fn attach(&mut self, ticket: Box<dyn Send>) {
        self.ticket = Some(ticket);
    }

    /// What this connection's commands amount to so far.
    pub fn stats(&self) -> &control::ReactorStats {
        &self.stats
    }

    /// The portal group the connection came in through.
    pub fn pg_tag(&self) -> u16 {
        self.pg_tag
    }

    /// Ends the session from the target's side (its target, LUN mapping or portal group
    /// was removed): a session in full feature phase gets an Async Message saying the
    /// target drops all its connections (event 3, Time2Wait 2 s, Time2Retain 0: nothing
    /// to recover), then the connection closes once that is sent. It takes no more input;
    /// commands already in the device finish there.
    pub fn end_session(&mut self, why: CloseReason) {
        if self.close.is_some() {
            return;
        }
        if matches!(self.phase, Phase::FullFeature) {
            let seq = self.seq_status();
            let b = build::async_message(0, seq, 3, 0, 0, 2, 0, 0);
            self.push(b, OutData::None);
            self.close_after_flush = true;
        }
        self.close_with(why);
    }

    pub fn uid(&self) -> u64 {
        self.uid
    }

    pub fn tsih(&self) -> u16 {
        self.tsih
    }

    pub fn in_full_feature(&self) -> bool {
        matches!(self.phase, Phase::FullFeature)
    }

    /// True when nothing is in progress: logged in, no command, no PDU half received, nothing
    /// to send, no TMF or text exchange pending. Only such a connection may be parked.
    /// Whether this connection failed in a session at ERL 2: its tasks outlive it.
    fn keeps_orphans(&self) -> bool {
        self.sp.error_recovery_level >= 2
            && self.session_type == SessionType::Normal
            && self.target.is_some()
            && self.close.as_ref().is_some_and(CloseReason::is_failure)
    }

    /// The tasks a failed connection leaves for reassignment: those delivered and not
    /// answered, and those answered without the initiator acknowledging the status.
    fn orphans(&mut self) -> Vec<OrphanTask> {
        let mut v = Vec::new();
        let tasks: Vec<(u32, Task)> = self.tasks.drain().collect();
        for (itt, task) in tasks {
            let delivered = matches!(task.state, TaskState::Collecting | TaskState::Submitted);
            if delivered && !task.aborted {
                v.push(OrphanTask {
                    itt,
                    state: OrphanState::Open {
                        task: Box::new(task),
                        response: self.late.remove(&itt),
                    },
                });
            }
        }
        self.late.clear();
        let mut answered: HashMap<u32, Vec<OutPdu>> = HashMap::new();
        for (itt, (_, pdus)) in self.retained.reads.drain() {
            answered.entry(itt).or_default().extend(pdus);
        }
        for (_, p) in self.retained.status.drain(..) {
            if p.bhs.opcode() == pdu::opcode::SCSI_RESPONSE {
                answered.entry(p.bhs.u32_at(16)).or_default().push(p);
            }
        }
        v.extend(answered.into_iter().map(|(itt, pdus)| OrphanTask {
            itt,
            state: OrphanState::Answered(pdus),
        }));
        v
    }

    /// TASK REASSIGN: a task of a failed connection continues here (allegiance moves).
    /// Data-In the initiator has (below `exp_datasn`) is not sent again.
    fn adopt_orphan(&mut self, o: OrphanTask, exp_datasn: u32) {
        let itt = o.itt;
        match o.state {
            OrphanState::Answered(pdus) => {
                // The answer again, with this connection's StatSN and window.
                for p in pdus {
                    let mut bhs = p.bhs;
                    if bhs.opcode() == pdu::opcode::DATA_IN
                        && !carries_status(&bhs)
                        && bhs.u32_at(36) < exp_datasn
                    {
                        continue;
                    }
                    if carries_status(&bhs) {
                        bhs.0[24..28].copy_from_slice(&self.statsn.to_be_bytes());
                        self.statsn = self.statsn.wrapping_add(1);
                    }
                    self.update_window();
                    bhs.0[28..32].copy_from_slice(&self.exp_cmdsn.to_be_bytes());
                    bhs.0[32..36].copy_from_slice(&self.max_cmdsn.to_be_bytes());
                    self.push(bhs, p.data);
                }
            }
            OrphanState::Open { mut task, response } => match response {
                Some(mut r) => {
                    r.tag = self.tag(itt);
                    self.tasks.insert(itt, *task);
                    if let Some(done) = self.scsi_done(r) {
                        self.stats.count(&done);
                    }
                }
                // In the device: its answer is redirected here.
                None if task.state == TaskState::Submitted => {
                    self.tasks.insert(itt, *task);
                }
                None => {
                    // Still collecting data: all of it is solicited again here.
                    task.r2ts.clear();
                    task.redo.clear();
                    task.received = 0;
                    task.next_solicit = 0;
                    self.tasks.insert(itt, *task);
                    self.send_r2ts(itt);
                }
            },
        }
    }

    /// Whether the reactor has session work after this connection read: a move to its
    /// session's reactor, a sibling to close, or the window of a session with several
    /// connections.
    pub fn needs_session_work(&self) -> bool {
        self.home.is_some()
            || self.remove_cid.is_some()
            || !self.sibling_tmf.is_empty()
            || self.mcs_session().is_some()
    }

    /// Task management this connection received that the reactor must apply to the
    /// session's other connections.
    pub fn take_sibling_tmf(&mut self) -> Vec<SiblingTmf> {
        std::mem::take(&mut self.sibling_tmf)
    }

    /// Applies another connection's task management here; true when it matched a task.
    /// The matched tasks end without an answer (their device answers are dropped).
    pub fn abort_for_sibling(&mut self, what: &SiblingTmf) -> bool {
        let itts: Vec<u32> = match *what {
            SiblingTmf::AbortTask { referenced, .. } => self
                .tasks
                .contains_key(&referenced)
                .then_some(referenced)
                .into_iter()
                .collect(),
            SiblingTmf::AbortSet { lun } => self.tasks_on_lun(lun, RESERVED_TAG),
        };
        for &itt in &itts {
            self.abort_task(itt);
        }
        !itts.is_empty()
    }

    /// The reactor asked the other connections about an ABORT TASK this one received.
    pub fn sibling_answered(&mut self, tmf_itt: u32, found: bool) {
        let response = if found {
            TmfResponse::Complete
        } else {
            TmfResponse::TaskDoesNotExist
        };
        self.send_tmf_response(tmf_itt, response, false);
    }

    /// Marks a task aborted: one not in the device yet goes at once; one in the device
    /// goes when its answer comes (dropped). True when it is in the device.
    fn abort_task(&mut self, itt: u32) -> bool {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return false;
        };
        task.aborted = true;
        task.r2ts.clear();
        if task.state == TaskState::Submitted {
            return true;
        }
        self.tasks.remove(&itt);
        self.deferred
            .retain(|_, d| !matches!(d, Deferred::Scsi(i) if *i == itt));
        false
    }

    /// The CID of this connection.
    pub fn cid(&self) -> u16 {
        self.cid
    }

    /// A Logout named this other connection of the session (CID, and whether it is
    /// removed for recovery: then it closes as failed, its tasks kept at ERL 2).
    pub fn take_remove_cid(&mut self) -> Option<(u16, bool)> {
        self.remove_cid.take()
    }

    /// The TSIH of a session that may have several connections (MaxConnections > 1): its
    /// command window is session-wide, kept by the reactor (see [`Connection::window`]).
    pub fn mcs_session(&self) -> Option<u16> {
        (self.sp.max_connections > 1 && self.tsih != 0 && matches!(self.phase, Phase::FullFeature))
            .then_some(self.tsih)
    }

    /// Whether the connection must stay on its reactor: connections of a session that may
    /// have several live where the session does, and are never parked.
    pub fn pinned(&self) -> bool {
        // ERL 2 too: a failed connection's tasks stay on the session's reactor.
        self.sp.max_connections > 1 || self.sp.error_recovery_level >= 2
    }

    /// A connection that joined a session living on another reactor: where it must go.
    pub fn take_home(&mut self) -> Option<usize> {
        self.home.take()
    }

    /// ExpCmdSN and MaxCmdSN as this connection knows them.
    pub fn window(&self) -> (u32, u32) {
        (self.exp_cmdsn, self.max_cmdsn)
    }

    /// Takes the session's window (MC/S): ExpCmdSN as the session has it, MaxCmdSN never
    /// lower than what any connection announced.
    pub fn set_window(&mut self, exp_cmdsn: u32, max_cmdsn: u32) {
        self.exp_cmdsn = exp_cmdsn;
        if sn_lt(self.max_cmdsn, max_cmdsn) {
            self.max_cmdsn = max_cmdsn;
        }
    }

    /// Delivers the commands held for CmdSNs another connection of the session has
    /// meanwhile filled in (MC/S).
    pub fn resume(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        if !matches!(self.phase, Phase::FullFeature) {
            return;
        }
        while let Some(d) = self.deferred.remove(&self.exp_cmdsn) {
            self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
            match d {
                Deferred::Scsi(itt) => self.deliver_command(itt, env),
                Deferred::Other(req, data, bhs) => self.execute_other(req, bhs, data, env, now),
            }
            if self.close.is_some() {
                return;
            }
        }
        // MC/S: a CmdSN another connection delivered first (an initiator's retry there)
        // leaves this copy behind the window: it is a duplicate.
        if self.sp.max_connections > 1 && !self.deferred.is_empty() {
            let exp = self.exp_cmdsn;
            let stale: Vec<u32> = self
                .deferred
                .keys()
                .copied()
                .filter(|sn| sn_lt(*sn, exp))
                .collect();
            for sn in stale {
                if let Some(Deferred::Scsi(itt)) = self.deferred.remove(&sn) {
                    self.tasks.remove(&itt);
                }
            }
        }
    }

    /// Whether this connection ended its whole session (Logout "close the session"): the
    /// other connections of the session close too.
    pub fn ends_session(&self) -> bool {
        self.session_logout
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::FullFeature)
            && self.close.is_none()
            && self.tasks.is_empty()
            && self.deferred.is_empty()
            && self.pending_tmfs.is_empty()
            && self.text_cont.is_none()
            && self.out.is_empty()
            && matches!(self.rx_stage, RxStage::Header { got: 0 })
    }

    /// When the connection last received bytes.
    pub fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// Set when the socket should be closed now (after a final flush attempt).
    pub fn wants_close(&self) -> Option<&CloseReason> {
        if self.close_after_flush && !self.out.is_empty() {
            return None;
        }
        self.close.as_ref()
    }

    /// A one-line description for the control plane: peer, local address, initiator name,
    /// phase ("login", "full feature", "closing") and commands in progress.
    pub fn describe(&self) -> (SocketAddr, SocketAddr, &str, &'static str, usize) {
        let phase = match self.phase {
            Phase::Login(_) => "login",
            Phase::FullFeature => "full feature",
            Phase::Closing => "closing",
        };
        (
            self.peer,
            self.local,
            &self.initiator_name,
            phase,
            self.tasks.len(),
        )
    }

    /// The target of the session, once logged in to one.
    pub fn target(&self) -> Option<TargetId> {
        self.target
    }

    /// Whether the connection is on its way out (it takes no more input).
    pub fn closing(&self) -> bool {
        self.close.is_some()
    }

    /// Marks the connection closed from outside (peer hung up, session reinstated).
    pub fn force_close(&mut self, why: CloseReason) {
        self.phase = Phase::Closing;
        self.close_after_flush = false;
        if self.close.is_none() {
            self.close = Some(why);
        }
    }

    /// Tells the environment this connection's session is gone. Call once, when the
    /// transport drops the connection.
    pub fn teardown(&mut self, env: &mut dyn TargetEnv) {
        if self.tsih != 0 && self.keeps_orphans() {
            // ERL 2: the session outlives the connection; its tasks wait for TASK REASSIGN
            // on another (or a new) connection for DefaultTime2Wait + DefaultTime2Retain.
            let orphans = self.orphans();
            let retain = Duration::from_secs(
                u64::from(self.sp.default_time2wait) + u64::from(self.sp.default_time2retain),
            );
            log::info!(
                "conn {}: failed; {} tasks of session {} kept {retain:?} for reassignment",
                self.uid,
                orphans.len(),
                self.tsih
            );
            env.keep_orphans(self.tsih, self.uid, orphans, retain);
            self.tsih = 0;
        }
        if self.tsih != 0 {
            // The I_T nexus ends with the session's last connection (MC/S); the tasks of
            // this one end with it (RFC 7143 §6.3: implicitly terminated).
            let lives_on = env.unregister_session(self.tsih, self.uid);
            if let (Some(t), false) = (self.target, lives_on) {
                env.nexus_removed(t, self.nexus);
            }
            self.tsih = 0;
        }
        self.tasks.clear();
        self.deferred.clear();
    }

    fn close_with(&mut self, why: CloseReason) {
        log::debug!("conn {}: closing: {:?}", self.uid, why);
        self.phase = Phase::Closing;
        if self.close.is_none() {
            self.close = Some(why);
        }
    }

    // ----- sequence numbers -----

    fn seq(&self) -> SeqNumbers {
        SeqNumbers {
            statsn: self.statsn,
            exp_cmdsn: self.exp_cmdsn,
            max_cmdsn: self.max_cmdsn,
        }
    }

    /// Sequence numbers for a status-bearing PDU; advances StatSN.
    fn seq_status(&mut self) -> SeqNumbers {
        self.update_window();
        let s = self.seq();
        self.statsn = self.statsn.wrapping_add(1);
        s
    }

    /// Sequence numbers for a PDU that carries no status (R2T, Data-In without S, NOP-In
    /// pings).
    fn seq_plain(&mut self) -> SeqNumbers {
        self.update_window();
        self.seq()
    }

    /// MaxCmdSN = ExpCmdSN - 1 + free task slots; it never moves backwards.
    fn update_window(&mut self) {
        let used = self.tasks.len() as u32 + self.deferred.len() as u32;
        let free = self.queue_depth.saturating_sub(used);
        let candidate = self.exp_cmdsn.wrapping_sub(1).wrapping_add(free);
        if sn_lt(self.max_cmdsn, candidate) {
            self.max_cmdsn = candidate;
        }
    }

    fn push(&mut self, bhs: Bhs, data: OutData) {
        let header_digest = self
            .cp
            .header_digest
            .then(|| crc32c_of(&[&bhs.0]).to_le_bytes());
        let data_digest = {
            let d = data.bytes();
            (self.cp.data_digest && !d.is_empty())
                .then(|| crc32c_of(&[d, &ZERO_PAD[..pdu::pad_len(d.len())]]).to_le_bytes())
        };
        let pdu = OutPdu {
            bhs,
            data,
            header_digest,
            data_digest,
        };
        // Data-In with status is kept with its read (see `respond_scsi`), not here: each
        // would hold the whole read buffer.
        if self.sp.error_recovery_level > 0
            && carries_status(&pdu.bhs)
            && pdu.bhs.opcode() != pdu::opcode::DATA_IN
        {
            if self.retained.status.len() >= MAX_RETAINED_STATUS {
                self.retained.status.pop_front();
            }
            let statsn = pdu.bhs.u32_at(24);
            self.retained.status.push_back((statsn, pdu.clone()));
        }
        self.out.push_back(pdu);
    }

    /// ERL 1: the initiator has everything before `exp_statsn`; what it acknowledged
    /// need not be kept for retransmission.
    fn acknowledged(&mut self, exp_statsn: u32) {
        if self.sp.error_recovery_level == 0 {
            return;
        }
        let r = &mut self.retained;
        while r
            .status
            .front()
            .is_some_and(|(sn, _)| sn_lt(*sn, exp_statsn))
        {
            r.status.pop_front();
        }
        let gone: Vec<u32> = r
            .reads
            .iter()
            .filter(|(_, (sn, _))| sn_lt(*sn, exp_statsn))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in gone {
            r.forget_read(itt);
        }
    }

    /// Sends a kept PDU again, with the current ExpCmdSN and MaxCmdSN (and digests).
    fn resend(&mut self, p: OutPdu) {
        let mut bhs = p.bhs;
        self.update_window();
        bhs.0[28..32].copy_from_slice(&self.exp_cmdsn.to_be_bytes());
        bhs.0[32..36].copy_from_slice(&self.max_cmdsn.to_be_bytes());
        let header_digest = self
            .cp
            .header_digest
            .then(|| crc32c_of(&[&bhs.0]).to_le_bytes());
        self.out.push_back(OutPdu {
            bhs,
            header_digest,
            ..p
        });
    }

    /// SNACK (ERL 1, RFC 7143 §11.16): Data/R2T, Status, DataACK and R-Data requests.
    fn on_snack(&mut self, s: SnackRequest, bhs: &Bhs) {
        if self.sp.error_recovery_level == 0 {
            // ERL 0: SNACK is not supported.
            self.reject(RejectReason::ProtocolError, bhs);
            return;
        }
        self.acknowledged(s.exp_statsn);
        let in_run = |sn: u32| {
            sn_le(s.beg_run, sn)
                && (s.run_length == 0 || sn_lt(sn, s.beg_run.wrapping_add(s.run_length)))
        };
        let again: Vec<OutPdu> = match s.kind {
            // Data/R2T SNACK. (R-Data SNACK, type 3, asks for data resegmented after a new
            // MaxRecvDataSegmentLength and for a fresh response carrying the SNACK Tag: not
            // supported, rejected below.)
            0 => {
                let live: std::collections::HashSet<u32> = self.tasks.keys().copied().collect();
                self.retained.r2ts.retain(|itt, _| live.contains(itt));
                if let Some((_, pdus)) = self.retained.reads.get(&s.itt) {
                    pdus.iter()
                        .filter(|p| in_run(p.bhs.u32_at(36)))
                        .cloned()
                        .collect()
                } else if let Some(pdus) = self.retained.r2ts.get(&s.itt) {
                    pdus.iter()
                        .filter(|p| in_run(p.bhs.u32_at(36)))
                        .cloned()
                        .collect()
                } else {
                    Vec::new()
                }
            }
            1 => {
                // Responses, and reads whose status rode in their last Data-In.
                let mut v: Vec<(u32, OutPdu)> = self
                    .retained
                    .status
                    .iter()
                    .filter(|(sn, _)| in_run(*sn))
                    .cloned()
                    .collect();
                for (sn, pdus) in self.retained.reads.values() {
                    if let Some(last) = pdus.last().filter(|p| carries_status(&p.bhs)) {
                        if in_run(*sn) {
                            v.push((*sn, last.clone()));
                        }
                    }
                }
                v.sort_by_key(|(sn, _)| sn.wrapping_sub(s.beg_run));
                v.into_iter().map(|(_, p)| p).collect()
            }
            2 => {
                // DataACK: the initiator has the read's data (we never ask for it with the
                // A bit, but an initiator may acknowledge anyway).
                self.retained.forget_read(s.itt);
                return;
            }
            _ => Vec::new(),
        };
        if again.is_empty() {
            log::debug!(
                "conn {}: SNACK type {} for ITT {:#x} run {}+{}: nothing to send again",
                self.uid,
                s.kind,
                s.itt,
                s.beg_run,
                s.run_length
            );
            self.reject(RejectReason::ProtocolError, bhs);
            return;
        }
        log::debug!(
            "conn {}: SNACK type {}: sending {} PDUs again",
            self.uid,
            s.kind,
            again.len()
        );
        for p in again {
            self.resend(p);
        }
    }

    fn reject(&mut self, reason: RejectReason, hdr: &Bhs) {
        let seq = self.seq_status();
        let bhs = build::reject(reason, seq, 0);
        self.push(bhs, OutData::Owned(hdr.0.to_vec()));
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    // ----- receive -----

    /// Where the next received bytes belong. Empty when nothing is wanted (closing).
    ///
    /// A data segment with at least [`DIRECT_RX_MIN`] bytes still to come is read straight
    /// into its final place (a WRITE's buffer); everything else (headers, small segments)
    /// goes through a staging buffer, so one read takes in many small PDUs and the bytes of
    /// a data segment that came along are copied once into place.
    pub fn rx_buf(&mut self) -> &mut [u8] {
        if self.close.is_some() || self.home.is_some() {
            return &mut [];
        }
        self.rx_direct =
            matches!(self.rx_stage, RxStage::Data { len, got, .. } if len - got >= DIRECT_RX_MIN);
        if self.rx_direct {
            return self.stage_buf();
        }
        if self.rx_stash.len() < RX_STASH {
            self.rx_stash.resize(RX_STASH, 0);
        }
        &mut self.rx_stash[..]
    }

    /// `n` bytes were written into the slice [`rx_buf`](Self::rx_buf) returned.
    pub fn rx_filled(&mut self, n: usize, env: &mut dyn TargetEnv, now: Instant) {
        if n == 0 {
            return;
        }
        self.last_rx = now;
        if self.rx_direct {
            self.stage_filled(n, env, now);
            return;
        }
        let stash = std::mem::take(&mut self.rx_stash);
        self.feed(&stash[..n], env, now);
        self.rx_stash = stash;
    }

    /// Runs received bytes through the receive stages. A connection that joined a session
    /// living on another reactor stops at its login's end and keeps the rest for there.
    fn feed(&mut self, bytes: &[u8], env: &mut dyn TargetEnv, now: Instant) {
        let mut at = 0;
        while at < bytes.len() && self.close.is_none() {
            if self.home.is_some() {
                self.rx_held.extend_from_slice(&bytes[at..]);
                return;
            }
            let dst = self.stage_buf();
            let k = dst.len().min(bytes.len() - at);
            if k == 0 {
                break;
            }
            dst[..k].copy_from_slice(&bytes[at..at + k]);
            at += k;
            self.stage_filled(k, env, now);
        }
    }

    /// On the session's reactor at last: the bytes that came after the login.
    pub fn replay_held(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        let held = std::mem::take(&mut self.rx_held);
        if !held.is_empty() {
            self.feed(&held, env, now);
        }
    }

    /// The destination of the current receive stage.
    fn stage_buf(&mut self) -> &mut [u8] {
        match &mut self.rx_stage {
            RxStage::Header { got } => &mut self.rx_hdr[*got..],
            RxStage::Ahs { got } => &mut self.rx_ahs[*got..],
            RxStage::Pad { got, len } => &mut self.rx_pad[*got..*len],
            RxStage::HeaderDigest { got } | RxStage::DataDigest { got } => {
                &mut self.rx_digest[*got..]
            }
            RxStage::Data { dest, len, got } => match *dest {
                RxDest::Scratch => &mut self.rx_scratch[*got..*len],
                RxDest::Task { itt, offset } => {
                    let (len, got) = (*len, *got);
                    match self.tasks.get_mut(&itt).and_then(|t| t.buf.as_mut()) {
                        Some(b) => &mut b.as_mut_slice()[offset + got..offset + len],
                        None => {
                            // The task vanished (aborted) while its data streamed in.
                            self.rx_scratch.resize(len, 0);
                            self.rx_stage = RxStage::Data {
                                dest: RxDest::Scratch,
                                len,
                                got,
                            };
                            &mut self.rx_scratch[got..len]
                        }
                    }
                }
            },
        }
    }

    /// `n` bytes were written into the slice [`stage_buf`](Self::stage_buf) returned.
    fn stage_filled(&mut self, n: usize, env: &mut dyn TargetEnv, now: Instant) {
        match &mut self.rx_stage {
            RxStage::Header { got } => {
                if *got == 0 {
                    self.pdu_started = now;
                }
                *got += n;
                if *got == BHS_LEN {
                    self.on_header(env, now);
                }
            }
            RxStage::Ahs { got } => {
                *got += n;
                if *got == self.rx_ahs.len() {
                    self.header_done(env, now);
                }
            }
            RxStage::Data { got, len, .. } => {
                *got += n;
                if *got == *len {
                    let pad = pdu::pad_len(*len);
                    if pad > 0 {
                        self.rx_stage = RxStage::Pad { got: 0, len: pad };
                    } else {
                        self.data_done(env, now);
                    }
                }
            }
            RxStage::Pad { got, len } => {
                *got += n;
                if *got == *len {
                    self.data_done(env, now);
                }
            }
            RxStage::HeaderDigest { got } => {
                *got += n;
                if *got == 4 {
                    let want = crc32c_of(&[&self.rx_hdr, &self.rx_ahs]);
                    if u32::from_le_bytes(self.rx_digest) != want {
                        // RFC 7143 §7.8: the header cannot be trusted, not even its
                        // length: the connection ends.
                        log::warn!("conn {}: header digest error", self.uid);
                        self.close_with(CloseReason::ProtocolError("header digest error".into()));
                        return;
                    }
                    self.after_ahs(env, now);
                }
            }
            RxStage::DataDigest { got } => {
                *got += n;
                if *got == 4 {
                    self.check_data_digest(env, now);
                }
            }
        }
    }

    /// Header and AHS are in: its digest follows when the connection uses one.
    fn header_done(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        if self.cp.header_digest {
            self.rx_stage = RxStage::HeaderDigest { got: 0 };
        } else {
            self.after_ahs(env, now);
        }
    }

    /// The data segment and its padding are in: its digest follows when the connection
    /// uses one.
    fn data_done(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        if self.cp.data_digest && self.rx_data.1 > 0 {
            self.rx_stage = RxStage::DataDigest { got: 0 };
        } else {
            self.pdu_complete(env, now);
        }
    }

    /// Checks a data segment's digest. A bad one gets a Reject (Data-Digest-Error); the
    /// PDU is discarded, except that data for a command still counts towards its transfer
    /// and the command then ends with CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE
    /// CRC ERROR once all its data is in (RFC 7143 §7.8, error recovery level 0).
    fn check_data_digest(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        let (dest, len) = self.rx_data;
        let pad = &self.rx_pad[..pdu::pad_len(len)];
        let data: Option<&[u8]> = match dest {
            RxDest::Scratch => self.rx_scratch.get(..len),
            RxDest::Task { itt, offset } => self
                .tasks
                .get(&itt)
                .and_then(|t| t.buf.as_ref())
                .and_then(|b| b.as_slice().get(offset..offset + len)),
        };
        // A task that vanished meanwhile took its buffer along: nothing to check.
        let good = data.is_none_or(|d| crc32c_of(&[d, pad]) == u32::from_le_bytes(self.rx_digest));
        if good {
            self.pdu_complete(env, now);
            return;
        }
        let bhs = Bhs(self.rx_hdr);
        log::warn!(
            "conn {}: data digest error (opcode {:#04x})",
            self.uid,
            bhs.0[0] & 0x3f
        );
        self.reject(RejectReason::DataDigestError, &bhs);
        let erl1 = self.sp.error_recovery_level > 0;
        match self.rx_req {
            Some(Ok(Request::ScsiCommand(_))) if erl1 => {
                // ERL 1 (RFC 7143 §7.8): the whole command PDU is discarded; the
                // initiator retries it, immediate data included. The task made for its
                // data at header time goes.
                if let Some(itt) = self.rx_new_task.take() {
                    self.tasks.remove(&itt);
                    self.retained.r2ts.remove(&itt);
                }
                self.rx_req = None;
                self.rx_stage = RxStage::Header { got: 0 };
            }
            Some(Ok(Request::DataOut(_))) if erl1 => {
                // ERL 1: the range is asked for again with a recovery R2T once the rest
                // of the data is in.
                if let (RxDest::Task { itt, offset }, len) = self.rx_data {
                    if let Some(t) = self.tasks.get_mut(&itt) {
                        t.redo.push((offset as u32, len as u32));
                    }
                }
                self.pdu_complete(env, now);
            }
            Some(Ok(Request::ScsiCommand(_))) | Some(Ok(Request::DataOut(_))) => {
                let itt = u32::from_be_bytes([bhs.0[16], bhs.0[17], bhs.0[18], bhs.0[19]]);
                if let Some(t) = self.tasks.get_mut(&itt) {
                    t.digest_failed = true;
                }
                self.pdu_complete(env, now);
            }
            _ => {
                self.rx_req = None;
                self.rx_stage = RxStage::Header { got: 0 };
            }
        }
    }

    fn on_header(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        let bhs = Bhs(self.rx_hdr);
        let ahs_len = bhs.total_ahs_len();
        if ahs_len > 0 {
            self.rx_ahs.clear();
            self.rx_ahs.resize(ahs_len, 0);
            self.rx_stage = RxStage::Ahs { got: 0 };
        } else {
            self.rx_ahs.clear();
            self.header_done(env, now);
        }
    }

    fn after_ahs(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        let bhs = Bhs(self.rx_hdr);
        let parsed = Request::parse(&bhs, &self.rx_ahs);
        let dsl = bhs.data_segment_len();
        let limit = match self.phase {
            Phase::Login(_) => LOGIN_MRDSL,
            _ => self.cp.target_mrdsl,
        };
        if dsl > limit {
            self.close_with(CloseReason::ProtocolError(format!(
                "data segment of {dsl} bytes exceeds MaxRecvDataSegmentLength {limit}"
            )));
            return;
        }
        if let Err(PduError::Fatal(why)) = &parsed {
            self.close_with(CloseReason::ProtocolError(why.to_string()));
            return;
        }
        let dest = match &parsed {
            Ok(Request::ScsiCommand(cmd)) if dsl > 0 => self.prepare_command(cmd, dsl),
            Ok(Request::DataOut(d)) if dsl > 0 => self.data_out_dest(d),
            _ => Some(RxDest::Scratch),
        };
        let Some(dest) = dest else {
            // The header was answered already (or the connection is closing).
            if self.close.is_some() {
                return;
            }
            // Swallow the data segment into scratch and drop it.
            self.rx_req = None;
            self.begin_data(RxDest::Scratch, dsl as usize, None, env, now);
            return;
        };
        self.begin_data(dest, dsl as usize, Some(parsed), env, now);
    }

    fn begin_data(
        &mut self,
        dest: RxDest,
        len: usize,
        parsed: Option<Result<Request, PduError>>,
        env: &mut dyn TargetEnv,
        now: Instant,
    ) {
        self.rx_req = parsed;
        self.rx_data = (dest, len);
        if let RxDest::Scratch = dest {
            self.rx_scratch.clear();
            self.rx_scratch.resize(len, 0);
        }
        if len == 0 {
            self.pdu_complete(env, now);
        } else {
            self.rx_stage = RxStage::Data { dest, len, got: 0 };
        }
    }

    fn pdu_complete(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        self.rx_new_task = None;
        let bhs = Bhs(self.rx_hdr);
        self.rx_stage = RxStage::Header { got: 0 };
        let Some(parsed) = self.rx_req.take() else {
            return;
        };
        let data = std::mem::take(&mut self.rx_scratch);
        match parsed {
            Err(PduError::Reject(reason, why)) => {
                log::debug!("conn {}: reject {:?}: {}", self.uid, reason, why);
                if matches!(self.phase, Phase::Login(_)) {
                    self.close_with(CloseReason::ProtocolError(why.into()));
                } else {
                    self.reject(reason, &bhs);
                }
            }
            Err(PduError::Fatal(why)) => self.close_with(CloseReason::ProtocolError(why.into())),
            Ok(req) => self.handle_request(req, bhs, data, env, now),
        }
    }

    // ----- dispatch -----

    fn handle_request(
        &mut self,
        req: Request,
        bhs: Bhs,
        data: Vec<u8>,
        env: &mut dyn TargetEnv,
        now: Instant,
    ) {
        match &mut self.phase {
            Phase::Closing => {}
            Phase::Login(_) => self.handle_login(req, data, env),
            Phase::FullFeature => self.handle_ffp(req, bhs, data, env, now),
        }
    }

    fn handle_login(&mut self, req: Request, data: Vec<u8>, env: &mut dyn TargetEnv) {
        let Request::Login(lr) = req else {
            // Only Login Requests are allowed before full feature phase: answer with a
            // login reject and close (RFC 7143 §6.3 "invalid during login").
            self.close_with(CloseReason::LoginFailed(0x02, 0x0b));
            return;
        };
        let Phase::Login(login) = &mut self.phase else {
            return;
        };
        match login.handle(&lr, &data, env) {
            LoginStep::Continue(bhs, d) => self.push(bhs, OutData::Owned(d)),
            LoginStep::Failed(bhs, d, status) => {
                self.push(bhs, OutData::Owned(d));
                self.close_after_flush = true;
                self.close_with(CloseReason::LoginFailed(status.0, status.1));
                self.phase = Phase::Closing;
            }
            LoginStep::Done(bhs, d, est) => {
                self.push(bhs, OutData::Owned(d));
                self.enter_full_feature(*est, env);
            }
        }
    }

    fn enter_full_feature(&mut self, est: Established, env: &mut dyn TargetEnv) {
        self.session_type = est.session_type;
        self.initiator_name = est.initiator_name;
        self.tsih = est.tsih;
        self.cid = est.cid;
        self.sp = est.session;
        self.cp = est.conn;
        self.exp_cmdsn = est.exp_cmdsn;
        self.statsn = est.statsn;
        self.queue_depth = super::login::session_window(est.target.as_ref());
        self.max_cmdsn = self.exp_cmdsn.wrapping_sub(1);
        self.update_window();
        if let Some(t) = est.target {
            self.target = Some(t.id);
            self.target_name = Some(t.name);
            match est.joined {
                Some(j) => {
                    // One more connection of an existing session: its I_T nexus, its home.
                    self.nexus = j.nexus;
                    self.home = Some(j.reactor);
                }
                None => {
                    let it = ItNexus::new(&self.initiator_name, est.isid, self.pg_tag);
                    env.nexus_added(t.id, self.nexus, it);
                }
            }
        }
        self.phase = Phase::FullFeature;
        let digest = |on: bool| if on { "CRC32C" } else { "None" };
        log::info!(
            "conn {}: {} logged in from {} ({:?} session, tsih {}, digests {}/{})",
            self.uid,
            self.initiator_name,
            self.peer,
            self.session_type,
            self.tsih,
            digest(self.cp.header_digest),
            digest(self.cp.data_digest)
        );
    }

    /// CmdSN acceptance for a non-immediate request: Some(true) deliver now, Some(false)
    /// hold until earlier CmdSNs arrive, None drop (outside the window).
    fn cmdsn_check(&self, cmdsn: u32) -> Option<bool> {
        if cmdsn == self.exp_cmdsn {
            Some(true)
        } else if sn_lt(self.exp_cmdsn, cmdsn) && sn_le(cmdsn, self.max_cmdsn) {
            if self.deferred.contains_key(&cmdsn) {
                None
            } else {
                Some(false)
            }
        } else {
            None
        }
    }

    /// After ExpCmdSN moved, delivers the requests that were waiting for it.
    fn advance_cmdsn(&mut self, env: &mut dyn TargetEnv, now: Instant) {
        self.exp_cmdsn = self.exp_cmdsn.wrapping_add(1);
        self.resume(env, now);
    }

    fn handle_ffp(
        &mut self,
        req: Request,
        bhs: Bhs,
        data: Vec<u8>,
        env: &mut dyn TargetEnv,
        now: Instant,
    ) {
        if self.sp.error_recovery_level > 0 {
            // Every full-feature request carries ExpStatSN here (RFC 7143 §11).
            self.acknowledged(bhs.u32_at(28));
        }
        match req {
            Request::DataOut(d) => self.on_data_out(d, env),
            Request::ScsiCommand(cmd) => self.on_command(cmd, bhs, env, now),
            Request::Snack(s) => self.on_snack(s, &bhs),
            Request::Login(_) => {
                self.reject(RejectReason::ProtocolError, &bhs);
            }
            other => {
                let (immediate, cmdsn) = match &other {
                    Request::NopOut(n) => (n.immediate, n.cmdsn),
                    Request::TaskMgmt(t) => (t.immediate, t.cmdsn),
                    Request::Text(t) => (t.immediate, t.cmdsn),
                    Request::Logout(l) => (l.immediate, l.cmdsn),
                    _ => (true, 0),
                };
                // A NOP-Out answering our ping (ITT reserved) carries no CmdSN to consume.
                let is_ping_reply = matches!(&other, Request::NopOut(n) if n.itt == RESERVED_TAG);
                if immediate || is_ping_reply {
                    self.execute_other(other, bhs, data, env, now);
                    return;
                }
                match self.cmdsn_check(cmdsn) {
                    Some(true) => {
                        self.execute_other(other, bhs, data, env, now);
                        if self.close.is_none() || self.close_after_flush {
                            self.advance_cmdsn(env, now);
                        }
                    }
                    Some(false) => {
                        self.deferred
                            .insert(cmdsn, Deferred::Other(other, data, bhs));
                    }
                    None => log::debug!(
                        "conn {}: dropping request with CmdSN {} outside [{}, {}]",
                        self.uid,
                        cmdsn,
                        self.exp_cmdsn,
                        self.max_cmdsn
                    ),
                }
            }
        }
    }

    fn execute_other(
        &mut self,
        req: Request,
        bhs: Bhs,
        data: Vec<u8>,
        env: &mut dyn TargetEnv,
        now: Instant,
    ) {
        match req {
            Request::NopOut(n) => self.on_nop_out(n, data, now),
            Request::TaskMgmt(t) => self.on_tmf(t, env),
            Request::Text(t) => self.on_text(t, bhs, data, env),
            Request::Logout(l) => {
                let recovery = l.reason == LogoutReason::RemoveForRecovery;
                let mut close_self = None;
                let response = match l.reason {
                    LogoutReason::CloseSession => {
                        self.session_logout = true;
                        close_self = Some(CloseReason::Logout);
                        0
                    }
                    // Connection recovery needs ERL 2.
                    LogoutReason::RemoveForRecovery if self.sp.error_recovery_level < 2 => 2,
                    _ if l.cid == self.cid => {
                        close_self = Some(if recovery {
                            CloseReason::RemovedForRecovery
                        } else {
                            CloseReason::Logout
                        });
                        0
                    }
                    // Another connection of the session (MC/S): the reactor closes it.
                    _ if env.session_has_cid(self.tsih, l.cid) => {
                        self.remove_cid = Some((l.cid, recovery));
                        0
                    }
                    _ => 1,
                };
                let seq = self.seq_status();
                let b = build::logout_response(
                    l.itt,
                    response,
                    seq,
                    self.sp.default_time2wait as u16,
                    self.sp.default_time2retain as u16,
                );
                self.push(b, OutData::None);
                if let Some(why) = close_self {
                    self.close_after_flush = true;
                    self.close_with(why);
                }
            }
            _ => self.reject(RejectReason::ProtocolError, &bhs),
        }
    }

    // ----- SCSI commands -----

    /// Called at header time for a command with immediate data: creates the task and its
    /// buffer so the data lands in place. Returns where the data goes, or None when the
    /// command was refused (its data is then discarded).
    fn prepare_command(&mut self, cmd: &ScsiCommand, dsl: u32) -> Option<RxDest> {
        if !matches!(self.phase, Phase::FullFeature) || self.session_type != SessionType::Normal {
            return Some(RxDest::Scratch);
        }
        if !self.sp.immediate_data || dsl > cmd.edtl || dsl > self.sp.first_burst_length {
            let hdr = Bhs(self.rx_hdr);
            self.reject(RejectReason::ProtocolError, &hdr);
            return None;
        }
        if !cmd.immediate && self.cmdsn_check(cmd.cmdsn).is_none() {
            return None;
        }
        if self.tasks.contains_key(&cmd.itt) {
            let hdr = Bhs(self.rx_hdr);
            self.reject(RejectReason::TaskInProgress, &hdr);
            return None;
        }
        if cmd.edtl > MAX_WRITE_LEN {
            return None;
        }
        self.create_task(cmd.clone());
        self.rx_new_task = Some(cmd.itt);
        Some(RxDest::Task {
            itt: cmd.itt,
            offset: 0,
        })
    }

    fn create_task(&mut self, cmd: ScsiCommand) {
        if !self.retained.r2ts.is_empty() {
            // A reused ITT starts afresh.
            self.retained.r2ts.remove(&cmd.itt);
        }
        let lun = pdu::decode_lun(cmd.lun);
        let len = cmd.edtl as usize;
        // Large write buffers count against the connection's budget (small ones are bounded
        // by the command window); summing the held ones is rare work for large I/O only.
        let over_budget = cmd.write
            && len > SMALL_WRITE
            && self.keepalive.buffer_cap > 0
            && self
                .tasks
                .values()
                .filter_map(|t| t.buf.as_ref())
                .map(|b| b.len())
                .filter(|&n| n > SMALL_WRITE)
                .sum::<usize>()
                + len
                > self.keepalive.buffer_cap;
        if over_budget {
            log::debug!(
                "conn {}: a {len}-byte write would pass the buffer budget: TASK SET FULL",
                self.uid
            );
        }
        let buf = if cmd.write && cmd.edtl > 0 && !over_budget {
            Some(IoBuf::for_io(len))
        } else {
            None
        };
        let task = Task {
            itt: cmd.itt,
            lun_raw: cmd.lun,
            lun,
            state: TaskState::Waiting,
            buf,
            unsolicited_len: 0,
            unsolicited_received: 0,
            unsol_next_datasn: 0,
            next_solicit: 0,
            r2ts: Vec::new(),
            r2tsn: 0,
            received: 0,
            aborted: false,
            digest_failed: false,
            over_budget,
            redo: Vec::new(),
            recoveries: 0,
            received_at: self.last_rx,
            cmd,
        };
        self.tasks.insert(task.itt, task);
    }

    fn on_command(&mut self, cmd: ScsiCommand, bhs: Bhs, env: &mut dyn TargetEnv, now: Instant) {
        if self.session_type != SessionType::Normal {
            self.reject(RejectReason::ProtocolError, &bhs);
            return;
        }
        let dsl = bhs.data_segment_len();
        let itt = cmd.itt;
        if dsl == 0 {
            if !cmd.immediate && self.cmdsn_check(cmd.cmdsn).is_none() {
                log::debug!(
                    "conn {}: dropping command CmdSN {} outside [{}, {}]",
                    self.uid,
                    cmd.cmdsn,
                    self.exp_cmdsn,
                    self.max_cmdsn
                );
                return;
            }
            if self.tasks.contains_key(&itt) {
                self.reject(RejectReason::TaskInProgress, &bhs);
                return;
            }
            if cmd.write && cmd.edtl > MAX_WRITE_LEN {
                self.reject(RejectReason::LongOperationReject, &bhs);
                return;
            }
        }
        let (immediate, cmdsn) = (cmd.immediate, cmd.cmdsn);
        let unsolicited_len = if cmd.write && !cmd.final_bit && !self.sp.initial_r2t {
            self.sp.first_burst_length.min(cmd.edtl).max(dsl)
        } else {
            dsl
        };
        if dsl == 0 {
            self.create_task(cmd);
        }
        // With immediate data the task was created at header time.
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        task.received = dsl;
        task.unsolicited_received = dsl;
        task.unsolicited_len = unsolicited_len;
        task.next_solicit = unsolicited_len;
        if immediate {
            self.deliver_command(itt, env);
            return;
        }
        match self.cmdsn_check(cmdsn) {
            Some(true) => {
                self.deliver_command(itt, env);
                self.advance_cmdsn(env, now);
            }
            Some(false) => {
                self.deferred.insert(cmdsn, Deferred::Scsi(itt));
            }
            None => {
                self.tasks.remove(&itt);
            }
        }
    }

    /// The command's turn has come: solicit its data or hand it to the device.
    fn deliver_command(&mut self, itt: u32, env: &mut dyn TargetEnv) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        task.state = TaskState::Collecting;
        if task.over_budget {
            task.state = TaskState::Submitted;
            let r = ScsiResponse {
                tag: (self.uid << 32) | u64::from(itt),
                status: ScsiStatus::TaskSetFull,
                sense: Vec::new(),
                data_in: None,
                data_out_wanted: 0,
            };
            self.scsi_done(r);
            return;
        }
        if task.data_complete() {
            self.data_in_hand(itt, env);
        } else {
            self.send_r2ts(itt);
        }
    }

    /// All of a command's data has arrived: to the device, unless parts came with bad
    /// data digests (ERL 1): those are asked for again with recovery R2Ts first.
    fn data_in_hand(&mut self, itt: u32, env: &mut dyn TargetEnv) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        if task.redo.is_empty() {
            self.submit(itt, env);
            return;
        }
        if task.recoveries >= MAX_RECOVERIES {
            log::warn!(
                "conn {}: ITT {itt:#x}: data still corrupt after {MAX_RECOVERIES} recovery R2Ts",
                self.uid
            );
            task.redo.clear();
            task.digest_failed = true;
            self.submit(itt, env);
            return;
        }
        // Everything from the first bad byte on is solicited again, in bursts and within
        // MaxOutstandingR2T like any solicitation (good data in between comes again too).
        let first = task.redo.iter().map(|r| r.0).min().unwrap_or(0);
        task.redo.clear();
        task.recoveries += 1;
        task.next_solicit = first;
        log::debug!(
            "conn {}: ITT {itt:#x}: recovery R2Ts from offset {first}",
            self.uid
        );
        self.send_r2ts(itt);
    }

    /// Sends an R2T, keeping it for R2T SNACK at ERL 1.
    fn push_r2t(&mut self, itt: u32, b: Bhs) {
        self.push(b, OutData::None);
        if self.sp.error_recovery_level > 0 {
            if let Some(p) = self.out.back().cloned() {
                self.retained.r2ts.entry(itt).or_default().push(p);
            }
        }
    }

    fn send_r2ts(&mut self, itt: u32) {
        let max_out = self.sp.max_outstanding_r2t.max(1) as usize;
        let burst = self.sp.max_burst_length.max(512);
        loop {
            let Some(task) = self.tasks.get(&itt) else {
                return;
            };
            if task.aborted || task.r2ts.len() >= max_out || task.next_solicit >= task.cmd.edtl {
                return;
            }
            let offset = task.next_solicit;
            let len = burst.min(task.cmd.edtl - offset);
            let lun_raw = task.lun_raw;
            let ttt = self.alloc_ttt();
            let seq = self.seq_plain();
            let task = self.tasks.get_mut(&itt).expect("task exists");
            let r2tsn = task.r2tsn;
            task.r2tsn = task.r2tsn.wrapping_add(1);
            task.next_solicit = offset + len;
            task.r2ts.push(R2t {
                ttt,
                offset,
                len,
                received: 0,
                next_datasn: 0,
            });
            let b = build::r2t(itt, lun_raw, ttt, seq, r2tsn, offset, len);
            self.push_r2t(itt, b);
        }
    }

    /// Validates a Data-Out header and says where its data goes.
    fn data_out_dest(&mut self, d: &DataOut) -> Option<RxDest> {
        if !matches!(self.phase, Phase::FullFeature) {
            return Some(RxDest::Scratch);
        }
        match self.check_data_out(d) {
            Ok(offset) => Some(RxDest::Task {
                itt: d.itt,
                offset: offset as usize,
            }),
            Err(DataOutError::UnknownTask) => {
                // A task aborted meanwhile: its data is silently dropped.
                Some(RxDest::Scratch)
            }
            Err(DataOutError::Sequence(why)) => {
                let hdr = Bhs(self.rx_hdr);
                self.data_sequence_error(d.itt, why, &hdr);
                None
            }
        }
    }

    /// A Data-Out broke its sequence (DataSN, offset, TTT). At ERL 0 there is no recovery
    /// within the command: the PDU is rejected and the command ends with CHECK CONDITION,
    /// ABORTED COMMAND / DATA PHASE ERROR, so the initiator learns at once instead of
    /// timing out; the connection and the other commands on it carry on. Later Data-Out
    /// PDUs of that command find no task and are dropped.
    fn data_sequence_error(&mut self, itt: u32, why: &str, hdr: &Bhs) {
        log::debug!("conn {}: ITT {itt:#x}: {why}", self.uid);
        self.reject(RejectReason::ProtocolError, hdr);
        let Some(task) = self.tasks.get(&itt) else {
            return;
        };
        if task.state == TaskState::Submitted {
            return;
        }
        let task = self.tasks.remove(&itt).expect("task exists");
        self.deferred
            .retain(|_, d| !matches!(d, Deferred::Scsi(i) if *i == itt));
        let residual = Residual::of(task.cmd.edtl, 0);
        self.send_response(
            itt,
            ScsiStatus::CheckCondition as u8,
            residual,
            0,
            &DATA_PHASE_ERROR_SENSE,
        );
        self.update_window();
    }

    fn check_data_out(&self, d: &DataOut) -> Result<u32, DataOutError> {
        let task = self.tasks.get(&d.itt).ok_or(DataOutError::UnknownTask)?;
        if task.aborted {
            return Err(DataOutError::UnknownTask);
        }
        if !task.cmd.write {
            return Err(DataOutError::Sequence(
                "Data-Out for a command without W bit",
            ));
        }
        let end = d
            .buffer_offset
            .checked_add(d.len)
            .ok_or(DataOutError::Sequence("Data-Out offset overflow"))?;
        if end > task.cmd.edtl {
            return Err(DataOutError::Sequence(
                "Data-Out beyond the expected length",
            ));
        }
        if d.ttt == RESERVED_TAG {
            if d.datasn != task.unsol_next_datasn {
                return Err(DataOutError::Sequence(
                    "unsolicited Data-Out DataSN out of order",
                ));
            }
            if d.buffer_offset != task.unsolicited_received || end > task.unsolicited_len {
                return Err(DataOutError::Sequence(
                    "unsolicited Data-Out at a wrong offset",
                ));
            }
        } else {
            let r2t = task
                .r2ts
                .iter()
                .find(|r| r.ttt == d.ttt)
                .ok_or(DataOutError::Sequence("Data-Out with an unknown TTT"))?;
            if d.datasn != r2t.next_datasn {
                return Err(DataOutError::Sequence("Data-Out DataSN out of order"));
            }
            if d.buffer_offset != r2t.offset + r2t.received || end > r2t.offset + r2t.len {
                return Err(DataOutError::Sequence("Data-Out outside its R2T"));
            }
        }
        Ok(d.buffer_offset)
    }

    fn on_data_out(&mut self, d: DataOut, env: &mut dyn TargetEnv) {
        // Headers without data were not checked at header time.
        if d.len == 0 {
            match self.check_data_out(&d) {
                Ok(_) => {}
                Err(DataOutError::UnknownTask) => return,
                Err(DataOutError::Sequence(why)) => {
                    let hdr = Bhs(self.rx_hdr);
                    self.data_sequence_error(d.itt, why, &hdr);
                    return;
                }
            }
        }
        let Some(task) = self.tasks.get_mut(&d.itt) else {
            return;
        };
        if task.aborted {
            return;
        }
        task.received += d.len;
        let mut r2t_done = false;
        if d.ttt == RESERVED_TAG {
            task.unsol_next_datasn += 1;
            task.unsolicited_received += d.len;
        } else if let Some(i) = task.r2ts.iter().position(|r| r.ttt == d.ttt) {
            let r = &mut task.r2ts[i];
            r.next_datasn += 1;
            r.received += d.len;
            if r.received >= r.len {
                if !d.final_bit {
                    log::debug!("conn {}: R2T satisfied without F bit", self.uid);
                }
                task.r2ts.remove(i);
                r2t_done = true;
            }
        }
        let complete =
            task.data_complete() && task.r2ts.is_empty() && task.next_solicit >= task.cmd.edtl;
        let state = task.state;
        if state != TaskState::Collecting {
            return;
        }
        if complete {
            self.data_in_hand(d.itt, env);
        } else if r2t_done
            || (d.ttt == RESERVED_TAG && d.final_bit && self.tasks[&d.itt].r2ts.is_empty())
        {
            self.send_r2ts(d.itt);
        }
    }

    /// The device tag of this connection's task `itt`.
    fn tag(&self, itt: u32) -> u64 {
        (self.uid << 32) | u64::from(itt)
    }

    fn submit(&mut self, itt: u32, env: &mut dyn TargetEnv) {
        let Some(target) = self.target else {
            return;
        };
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        task.state = TaskState::Submitted;
        if !self.retained.r2ts.is_empty() {
            self.retained.r2ts.remove(&itt);
        }
        if task.digest_failed {
            let r = crate::scsi::Device::crc_error_response((self.uid << 32) | u64::from(itt));
            self.scsi_done(r);
            return;
        }
        let direction = match (task.cmd.read, task.cmd.write) {
            (true, true) => DataDirection::Bidirectional,
            (true, false) => DataDirection::Read,
            (false, true) => DataDirection::Write,
            (false, false) => DataDirection::None,
        };
        let st = ScsiTask {
            tag: (self.uid << 32) | u64::from(itt),
            nexus: self.nexus,
            lun: task.lun,
            // The CDB is not needed once the command is submitted.
            cdb: std::mem::take(&mut task.cmd.cdb),
            expected_len: task.cmd.edtl,
            direction,
            data_out: task.buf.take(),
        };
        env.scsi_submit(target, st);
    }

    /// A response from the device for one of this connection's tasks.
    pub fn scsi_done(&mut self, resp: ScsiResponse) -> Option<CommandDone> {
        let itt = resp.tag as u32;
        let Some(task) = self.tasks.remove(&itt) else {
            // A reset's acknowledgement (tagged with its TMF's ITT).
            self.task_gone(itt);
            return None;
        };
        if !task.aborted && self.keeps_orphans() {
            // Failed at ERL 2, not torn down yet: the answer waits with its task.
            self.tasks.insert(itt, task);
            self.late.insert(itt, resp);
            return None;
        }
        if task.aborted || !matches!(self.phase, Phase::FullFeature) {
            self.task_gone(itt);
            return None;
        }
        let done = CommandDone {
            latency: task.received_at.elapsed(),
            read: task.cmd.read,
            write: task.cmd.write,
            bytes_in: if task.cmd.read {
                resp.data_in
                    .as_ref()
                    .map_or(0, |b| (b.len() as u64).min(u64::from(task.cmd.edtl)))
            } else {
                0
            },
            bytes_out: if task.cmd.write {
                u64::from(task.received)
            } else {
                0
            },
            good: resp.status == ScsiStatus::Good,
            lun: task.lun,
        };
        self.stats.count(&done);
        self.respond_scsi(&task, resp);
        self.update_window();
        Some(done)
    }

    fn respond_scsi(&mut self, task: &Task, resp: ScsiResponse) {
        let edtl = task.cmd.edtl;
        let status = resp.status as u8;
        let data_len = resp.data_in.as_ref().map_or(0, |b| b.len()) as u32;
        let residual = if task.cmd.write && !task.cmd.read {
            Residual::of(edtl, resp.data_out_wanted)
        } else {
            Residual::of(edtl, data_len)
        };
        let send_len = data_len.min(edtl);
        let has_sense = !resp.sense.is_empty();
        if send_len > 0 && task.cmd.read {
            let mut data_in = resp.data_in.expect("data_in present when data_len > 0");
            let erl1 = self.sp.error_recovery_level > 0;
            if erl1 {
                // Kept for Data SNACK: a view of a RAM disk could change meanwhile.
                data_in = data_in.into_owned_if_view();
            }
            let buf = Arc::new(data_in);
            let first = self.out.len();
            let seg = self.cp.initiator_mrdsl.max(512);
            let burst = self.sp.max_burst_length.max(512);
            let mut offset = 0u32;
            let mut datasn = 0u32;
            let mut in_burst = 0u32;
            // Status rides in the last Data-In when there is no sense data to send.
            let status_in_data = !has_sense && resp.status == ScsiStatus::Good;
            while offset < send_len {
                let len = seg.min(send_len - offset).min(burst - in_burst);
                let last = offset + len == send_len;
                in_burst += len;
                let end_of_burst = last || in_burst == burst;
                let with_status = last && status_in_data;
                let seq = if with_status {
                    self.seq_status()
                } else {
                    self.seq_plain()
                };
                let b = build::data_in(
                    task.itt,
                    task.lun_raw,
                    end_of_burst,
                    with_status.then_some((status, residual)),
                    seq,
                    datasn,
                    offset,
                    len,
                );
                self.push(
                    b,
                    OutData::Shared(buf.clone(), offset as usize, len as usize),
                );
                if end_of_burst {
                    in_burst = 0;
                }
                offset += len;
                datasn += 1;
            }
            if !status_in_data {
                self.send_response(task.itt, status, residual, datasn, &resp.sense);
            }
            if erl1 {
                let pdus: Vec<OutPdu> = self
                    .out
                    .iter()
                    .skip(first)
                    .filter(|p| p.bhs.opcode() == pdu::opcode::DATA_IN)
                    .cloned()
                    .collect();
                let statsn = self.statsn.wrapping_sub(1);
                let now_sn = self.statsn;
                self.retained.keep_read(task.itt, statsn, now_sn, pdus);
            }
        } else {
            // ExpDataSN counts the R2Ts (and Data-Ins) sent for the command.
            self.send_response(task.itt, status, residual, task.r2tsn, &resp.sense);
        }
    }

    fn send_response(
        &mut self,
        itt: u32,
        status: u8,
        residual: Residual,
        datasn: u32,
        sense: &[u8],
    ) {
        let data = if sense.is_empty() {
            Vec::new()
        } else {
            let mut d = Vec::with_capacity(2 + sense.len());
            d.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            d.extend_from_slice(sense);
            d
        };
        let seq = self.seq_status();
        let b = build::scsi_response(itt, status, residual, seq, datasn, data.len() as u32);
        self.push(b, OutData::Owned(data));
    }

    // ----- task management -----

    fn on_tmf(&mut self, t: TaskMgmtRequest, env: &mut dyn TargetEnv) {
        let Some(target) = self.target else {
            let seq = self.seq_status();
            let b = build::tmf_response(t.itt, TmfResponse::NotSupported, seq);
            self.push(b, OutData::None);
            return;
        };
        if self.tasks.contains_key(&t.itt) {
            // Its ITT names a command in progress (and would name the reset's
            // acknowledgement too).
            let hdr = Bhs(self.rx_hdr);
            self.reject(RejectReason::TaskInProgress, &hdr);
            return;
        }
        let lun = pdu::decode_lun(t.lun);
        // A reset is answered once the device has done it (its acknowledgement comes back
        // tagged with the TMF's ITT), so no command from another connection can get past
        // it before the initiator hears it is done.
        let mut reset = false;
        let mut reassigned = None;
        let (response, victims, close_after): (TmfResponse, Vec<u32>, bool) = match t.function {
            TmfFunction::AbortTask => {
                if self.tasks.contains_key(&t.referenced_tag) {
                    (TmfResponse::Complete, vec![t.referenced_tag], false)
                } else if self.mcs_session().is_some() {
                    // Perhaps another connection of the session carries it.
                    self.sibling_tmf.push(SiblingTmf::AbortTask {
                        tmf_itt: t.itt,
                        referenced: t.referenced_tag,
                    });
                    return;
                } else {
                    (TmfResponse::TaskDoesNotExist, vec![], false)
                }
            }
            TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet => {
                if !env.lun_exists(target, lun) {
                    (TmfResponse::LunDoesNotExist, vec![], false)
                } else {
                    let v = self.tasks_on_lun(Some(lun), t.itt);
                    (TmfResponse::Complete, v, false)
                }
            }
            TmfFunction::LogicalUnitReset => {
                if !env.lun_exists(target, lun) {
                    (TmfResponse::LunDoesNotExist, vec![], false)
                } else {
                    let v = self.tasks_on_lun(Some(lun), t.itt);
                    env.lun_reset(target, lun, self.nexus, self.tag(t.itt));
                    reset = true;
                    (TmfResponse::Complete, v, false)
                }
            }
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                let cold = t.function == TmfFunction::TargetColdReset;
                let v = self.tasks_on_lun(None, t.itt);
                env.target_reset(target, self.nexus, cold, self.tag(t.itt));
                reset = true;
                // A cold reset ends every session, this one included, once answered.
                (TmfResponse::Complete, v, cold)
            }
            TmfFunction::ClearAca => (TmfResponse::NotSupported, vec![], false),
            TmfFunction::TaskReassign if self.sp.error_recovery_level < 2 => {
                (TmfResponse::ReassignmentNotSupported, vec![], false)
            }
            TmfFunction::TaskReassign => {
                match env.reclaim_orphan(self.tsih, t.referenced_tag, self.uid) {
                    Some(o) => {
                        reassigned = Some(o);
                        (TmfResponse::Complete, vec![], false)
                    }
                    None => (TmfResponse::TaskDoesNotExist, vec![], false),
                }
            }
            TmfFunction::Unknown(_) => (TmfResponse::Rejected, vec![], false),
        };
        let mut waiting = Vec::new();
        if reset {
            waiting.push(t.itt);
        }
        for itt in victims {
            if self.abort_task(itt) {
                waiting.push(itt);
            }
        }
        if self.mcs_session().is_some() && response == TmfResponse::Complete {
            // The task set is the session's: its other connections' tasks end too.
            let lun = match t.function {
                TmfFunction::AbortTaskSet
                | TmfFunction::ClearTaskSet
                | TmfFunction::LogicalUnitReset => Some(Some(lun)),
                TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => Some(None),
                _ => None,
            };
            if let Some(lun) = lun {
                self.sibling_tmf.push(SiblingTmf::AbortSet { lun });
            }
        }
        if waiting.is_empty() {
            self.send_tmf_response(t.itt, response, close_after);
            if let Some(o) = reassigned {
                self.adopt_orphan(o, t.exp_datasn);
            }
        } else {
            self.pending_tmfs.push(PendingTmf {
                itt: t.itt,
                waiting_for: waiting,
                response,
                close_after,
            });
        }
    }

    fn send_tmf_response(&mut self, itt: u32, response: TmfResponse, close_after: bool) {
        let seq = self.seq_status();
        let b = build::tmf_response(itt, response, seq);
        self.push(b, OutData::None);
        if close_after {
            self.close_after_flush = true;
            self.close_with(CloseReason::Logout);
        }
    }

    fn tasks_on_lun(&self, lun: Option<u64>, except: u32) -> Vec<u32> {
        self.tasks
            .values()
            .filter(|t| t.itt != except && lun.is_none_or(|l| t.lun == l))
            .map(|t| t.itt)
            .collect()
    }

    /// An aborted task left the device: answer TMFs that waited for it.
    fn task_gone(&mut self, itt: u32) {
        let mut ready = Vec::new();
        for p in &mut self.pending_tmfs {
            p.waiting_for.retain(|&i| i != itt);
            if p.waiting_for.is_empty() {
                ready.push((p.itt, p.response, p.close_after));
            }
        }
        self.pending_tmfs.retain(|p| !p.waiting_for.is_empty());
        for (itt, resp, close) in ready {
            self.send_tmf_response(itt, resp, close);
        }
    }

    // ----- NOP -----

    fn on_nop_out(&mut self, n: NopOut, data: Vec<u8>, now: Instant) {
        if n.itt == RESERVED_TAG {
            // The answer to our NOP-In ping (or a ping that wants no answer).
            if let Some((ttt, _)) = self.nop_outstanding {
                if ttt == n.ttt {
                    self.nop_outstanding = None;
                }
            }
            return;
        }
        let _ = now;
        let seq = self.seq_status();
        let b = build::nop_in(n.itt, RESERVED_TAG, n.lun, seq, data.len() as u32);
        self.push(b, OutData::Owned(data));
    }

    /// Drives keepalive: sends a NOP-In ping after `interval` of silence and closes the
    /// connection when its answer does not come within `timeout`.
    pub fn on_tick(&mut self, now: Instant) {
        if self.close.is_some() {
            return;
        }
        if matches!(self.phase, Phase::Login(_))
            && now.duration_since(self.created) >= self.keepalive.login
        {
            log::info!(
                "conn {}: login not finished in time from {}",
                self.uid,
                self.peer
            );
            self.close_with(CloseReason::LoginTimeout);
            return;
        }
        if !matches!(self.rx_stage, RxStage::Header { got: 0 })
            && now.duration_since(self.pdu_started) >= self.keepalive.pdu
        {
            log::info!(
                "conn {}: {} stopped in the middle of a PDU",
                self.uid,
                self.peer
            );
            self.close_with(CloseReason::PduTimeout);
            return;
        }
        if !matches!(self.phase, Phase::FullFeature) {
            return;
        }
        if let Some((_, sent)) = self.nop_outstanding {
            if now.duration_since(sent) >= self.keepalive.timeout {
                self.close_with(CloseReason::NopTimeout);
            }
            return;
        }
        let Some(interval) = self.keepalive.interval else {
            return;
        };
        if now.duration_since(self.last_rx) >= interval {
            let ttt = self.alloc_ttt();
            let seq = self.seq_plain();
            let b = build::nop_in(RESERVED_TAG, ttt, 0, seq, 0);
            self.push(b, OutData::None);
            self.nop_outstanding = Some((ttt, now));
        }
    }

    // ----- text -----

    fn on_text(&mut self, t: TextRequest, bhs: Bhs, data: Vec<u8>, env: &mut dyn TargetEnv) {
        // Continuing a long answer of ours.
        if t.ttt != RESERVED_TAG {
            match self.text_cont.take() {
                Some(c) if c.ttt == t.ttt && c.itt == t.itt => {
                    self.text_cont = Some(c);
                    self.send_text_chunk(t.lun);
                }
                _ => self.reject(RejectReason::ProtocolError, &bhs),
            }
            return;
        }
        self.text_cont = None;
        if self.text_partial.len() + data.len() > 64 * 1024 {
            self.text_partial.clear();
            self.reject(RejectReason::LongOperationReject, &bhs);
            return;
        }
        self.text_partial.extend_from_slice(&data);
        if t.cont {
            // The initiator continues its request: answer empty, ask for more.
            let seq = self.seq_status();
            let ttt = self.alloc_ttt();
            let b = build::text_response(false, false, t.lun, t.itt, ttt, seq, 0);
            self.push(b, OutData::None);
            return;
        }
        let request = std::mem::take(&mut self.text_partial);
        let pairs = match text::parse(&request) {
            Ok(p) => p,
            Err(_) => {
                self.reject(RejectReason::ProtocolError, &bhs);
                return;
            }
        };
        let mut reply = Vec::new();
        for (k, v) in &pairs {
            if k == "SendTargets" {
                let only = match v.as_str() {
                    "All" => {
                        if self.session_type != SessionType::Discovery {
                            // Normal sessions may only ask about their own target.
                            self.target_name.clone()
                        } else {
                            None
                        }
                    }
                    "" => self.target_name.clone(),
                    name => Some(name.to_string()),
                };
                if self.session_type == SessionType::Normal && only.is_none() {
                    continue;
                }
                let entries =
                    env.discover(&self.initiator_name, self.peer, self.local, only.as_deref());
                for e in entries {
                    text::push(&mut reply, "TargetName", &e.name);
                    for a in &e.addresses {
                        text::push(&mut reply, "TargetAddress", a);
                    }
                }
            } else {
                // Renegotiation in full feature phase is not offered.
                text::push(&mut reply, k, "Reject");
            }
        }
        self.text_cont = Some(TextContinuation {
            itt: t.itt,
            ttt: RESERVED_TAG,
            data: reply,
            sent: 0,
        });
        self.send_text_chunk(t.lun);
    }

    /// Sends the next piece of a text answer, no larger than the initiator accepts.
    fn send_text_chunk(&mut self, lun: u64) {
        let Some(mut c) = self.text_cont.take() else {
            return;
        };
        let max = self.cp.initiator_mrdsl.max(512) as usize;
        let remaining = c.data.len() - c.sent;
        let len = remaining.min(max);
        let chunk = c.data[c.sent..c.sent + len].to_vec();
        c.sent += len;
        let last = c.sent == c.data.len();
        let ttt = if last { RESERVED_TAG } else { self.alloc_ttt() };
        let seq = self.seq_status();
        let b = build::text_response(last, !last, lun, c.itt, ttt, seq, len as u32);
        self.push(b, OutData::Owned(chunk));
        if !last {
            c.ttt = ttt;
            self.text_cont = Some(c);
        }
    }

    // ----- transmit -----

    /// True when PDUs are waiting to be written.
    pub fn has_tx(&self) -> bool {
        !self.out.is_empty()
    }

    /// Fills `iov` with the bytes to write next (up to `max` slices).
    pub fn tx_iovecs<'a>(&'a self, iov: &mut Vec<IoSlice<'a>>, max: usize) {
        let mut skip = self.out_offset;
        for p in &self.out {
            if iov.len() >= max {
                break;
            }
            let data = p.data.bytes();
            let pad = pdu::pad_len(data.len());
            let hd = p.header_digest.as_ref().map_or(&[][..], |d| &d[..]);
            let dd = p.data_digest.as_ref().map_or(&[][..], |d| &d[..]);
            for part in [&p.bhs.0[..], hd, data, &ZERO_PAD[..pad], dd] {
                if part.is_empty() {
                    continue;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                iov.push(IoSlice::new(&part[skip..]));
                skip = 0;
                if iov.len() >= max {
                    break;
                }
            }
        }
    }

    /// `n` bytes of what [`tx_iovecs`](Self::tx_iovecs) listed were written.
    pub fn tx_consumed(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.out.front() else {
                break;
            };
            let left = front.wire_len() - self.out_offset;
            if n >= left {
                n -= left;
                self.out.pop_front();
                self.out_offset = 0;
            } else {
                self.out_offset += n;
                n = 0;
            }
        }
    }
}

#[derive(Debug)]
enum DataOutError {
    UnknownTask,
    Sequence(&'static str),
}

#[cfg(test)]
mod tests;
