//! One logical unit: its block device, mode state, unit attentions, SPC-2 and persistent
//! reservations and the execution of commands, medium ones as asynchronous block-device
//! requests.

use std::collections::{HashMap, HashSet, VecDeque};

use super::cdb::{ByteCheck, Command};
use super::inquiry::{self, Limits, LunFacts, MAX_COMPARE_AND_WRITE};
use super::mode::{self, ModeState, SenseRequest};
use super::opcodes;
use super::pr::{Effects, Pr, PrError};
use super::sense::{asc, key, Sense};
use super::{ItNexus, LunIdentity, NexusId, Nexuses, ScsiResponse, ScsiStatus, ScsiTask};
use crate::bdev::{BdevCompletion, BdevError, BdevIo, BdevOp, BlockDevice, LbaState};
use crate::mem::IoBuf;

/// Unit attentions kept per nexus; older ones are dropped beyond this (SAM-5 allows it).
const MAX_UA_PER_NEXUS: usize = 16;
/// GET LBA STATUS descriptors returned at most per command.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

pub(super) fn response(
    tag: u64,
    status: ScsiStatus,
    sense: Vec<u8>,
    data_in: Option<IoBuf>,
    data_out_wanted: u32,
) -> ScsiResponse {
    ScsiResponse {
        tag,
        status,
        sense,
        data_in,
        data_out_wanted,
    }
}

/// A response with data truncated to the allocation length.
/// GOOD status without data.
fn good(tag: u64, wanted: u32) -> ScsiResponse {
    response(tag, ScsiStatus::Good, Vec::new(), None, wanted)
}

fn with_data(tag: u64, mut data: Vec<u8>, alloc: u32, wanted: u32) -> ScsiResponse {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    response(
        tag,
        ScsiStatus::Good,
        Vec::new(),
        Some(IoBuf::from_vec(data)),
        wanted,
    )
}

fn map_bdev_error(e: &BdevError, writing: bool) -> Sense {
    match e {
        BdevError::OutOfRange { .. } => Sense::lba_out_of_range(),
        BdevError::Io(_) if writing => Sense::new(key::MEDIUM_ERROR, asc::WRITE_ERROR),
        BdevError::Io(_) => Sense::new(key::MEDIUM_ERROR, asc::UNRECOVERED_READ_ERROR),
        BdevError::Unsupported(_) => Sense::invalid_cdb(0, None),
        _ => Sense::new(key::HARDWARE_ERROR, asc::INTERNAL_TARGET_FAILURE),
    }
}

/// Where the transfer length sits in a block command's CDB (for field pointers).
fn length_field(cdb: &[u8]) -> usize {
    // WRITE ATOMIC(16) keeps its ATOMIC BOUNDARY where other 16-byte CDBs have the length.
    if cdb.first() == Some(&0x9C) {
        return 12;
    }
    match cdb.first().map(|op| op >> 5) {
        Some(0) => 4,
        Some(5) => 6,
        Some(4) => 10,
        _ => 7,
    }
}

/// The offset of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// What a medium operation still has to do; advanced as its requests complete.
enum Kind {
    Read {
        lba: u64,
        blocks: u32,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
        buf: Option<IoBuf>,
    },
    /// WRITE SAME with UNMAP, or without a data block (NDOB).
    Deallocate {
        lba: u64,
        blocks: u64,
        unmap: bool,
    },
    Flush,
    Unmap {
        ranges: Vec<(u64, u64)>,
    },
    Verify {
        lba: u64,
        blocks: u32,
        data: IoBuf,
        one_block: bool,
    },
    /// COMPARE AND WRITE (`or == false`) and ORWRITE: read, then compare or merge, then write.
    ReadModifyWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
        data: IoBuf,
        or: bool,
        writing: bool,
    },
}

impl Kind {
    fn writes(&self) -> bool {
        !matches!(self, Kind::Read { .. } | Kind::Verify { .. })
    }
}

struct Op {
    tag: u64,
    nexus: NexusId,
    /// Aborted by a reset or PREEMPT AND ABORT: answered with TASK ABORTED.
    aborted: bool,
    wanted: u32,
    kind: Kind,
    pending: usize,
    error: Option<Sense>,
    /// Data-In produced when the op finishes.
    data_in: Option<IoBuf>,
    /// Block range held exclusively while the op runs.
    lock: Option<(u64, u64)>,
}

pub(super) struct Lun {
    bdev: Box<dyn BlockDevice>,
    pub identity: LunIdentity,
    pub mode: ModeState,
    limits: Limits,
    ua: HashMap<NexusId, VecDeque<u16>>,
    /// Persistent reservation attentions for registered I_T nexuses with no session now.
    away_ua: HashMap<ItNexus, VecDeque<u16>>,
    /// The target's relative port identifiers.
    ports: Vec<u16>,
    /// The nexus of the command being executed (ops started now belong to it).
    running: NexusId,
    /// SPC-2 RESERVE(6) holder.
    reservation: Option<NexusId>,
    pr: Pr,
    prevent: HashSet<NexusId>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    /// Ops waiting for their block range, in arrival order.
    waiting: VecDeque<u64>,
    /// Requests the device refused with QueueFull, resubmitted in order on the next poll.
    retry: VecDeque<BdevIo>,
    completions: Vec<BdevCompletion>,
    /// Finished responses not yet collected by the device.
    pub done: Vec<ScsiResponse>,
    /// Responses that wait until the tasks their command aborted have ended (PREEMPT AND
    /// ABORT: the preempted initiator's writes are fenced off before the preemptor hears).
    held: Vec<ScsiResponse>,
}

impl Lun {
    pub fn new(bdev: Box<dyn BlockDevice>, identity: LunIdentity) -> Self {
        let limits = Limits::for_block_size(bdev.block_size());
        let pr = Self::load_pr(&identity);
        Lun {
            bdev,
            identity,
            mode: ModeState::default(),
            limits,
            ua: HashMap::new(),
            away_ua: HashMap::new(),
            ports: vec![1],
            running: 0,
            reservation: None,
            pr,
            prevent: HashSet::new(),
            ops: HashMap::new(),
            next_op: 1,
            waiting: VecDeque::new(),
            retry: VecDeque::new(),
            completions: Vec::new(),
            done: Vec::new(),
            held: Vec::new(),
        }
    }

    fn block_size(&self) -> u32 {
        self.bdev.block_size()
    }

    fn capacity(&self) -> u64 {
        self.bdev.num_blocks()
    }

    fn thin(&self) -> bool {
        self.bdev.thin_provisioned()
    }

    pub fn check(&self, tag: u64, sense: Sense, wanted: u32) -> ScsiResponse {
        response(
            tag,
            ScsiStatus::CheckCondition,
            sense.encode(self.mode.d_sense),
            None,
            wanted,
        )
    }

    // ---- unit attentions, reservations, nexus state ----

    /// Persistent reservations saved by an earlier run (APTPL), or none.
    fn load_pr(identity: &LunIdentity) -> Pr {
        let Some(path) = identity.pr_file.as_ref() else {
            return Pr::default();
        };
        match std::fs::read_to_string(path) {
            Ok(text) => match Pr::load(&text) {
                Ok(pr) => {
                    log::info!("{}: persistent reservations restored", path.display());
                    pr
                }
                Err(e) => {
                    log::error!(
                        "{}: unusable persistent reservation state ({e}); starting without",
                        path.display()
                    );
                    Pr::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Pr::default(),
            Err(e) => {
                log::error!(
                    "{}: {e}; starting without persistent reservations",
                    path.display()
                );
                Pr::default()
            }
        }
    }

    /// Writes the persistent reservation state while APTPL asks for it (atomically: a
    /// temporary file, fsync, rename), and removes the file otherwise.
    fn store_pr(&self) -> Result<(), String> {
        let Some(path) = self.identity.pr_file.as_ref() else {
            return Ok(());
        };
        if !self.pr.aptpl() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            };
        }
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.pr.save().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn set_ports(&mut self, ports: &[u16]) {
        self.ports = ports.to_vec();
    }

    pub fn add_nexus(&mut self, nexus: NexusId, it: &ItNexus) {
        let q = self.ua.entry(nexus).or_default();
        if let Some(away) = self.away_ua.remove(it) {
            for code in away {
                Self::push_ua(q, code);
            }
        }
    }

    pub fn remove_nexus(&mut self, nexus: NexusId) {
        self.ua.remove(&nexus);
        self.prevent.remove(&nexus);
        if self.reservation == Some(nexus) {
            self.reservation = None;
        }
    }

    /// True when a reservation held elsewhere forbids `cmd` from session `nexus` (its I_T
    /// nexus in `nexuses`).
    pub fn conflicts(&self, nexus: NexusId, nexuses: &Nexuses, cmd: &Command) -> bool {
        if self.reservation.is_none() && !self.pr.active() {
            // No reservation of either kind: the common case, decided without lookups.
            return false;
        }
        if self.reservation.is_some_and(|h| h != nexus) && !cmd.passes_reservation() {
            return true;
        }
        // SPC-4 5.12.3 (CRH 0): RESERVE/RELEASE(6) meet persistent reservations and
        // registrations with a conflict.
        if matches!(cmd, Command::Reserve6 | Command::Release6) && self.pr.active() {
            return true;
        }
        match nexuses.get(&nexus) {
            Some(it) => !self.pr.allows(it, cmd.access()),
            None => !self.pr.allows(&ItNexus::unannounced(nexus), cmd.access()),
        }
    }

    /// Applies what a PERSISTENT RESERVE OUT did to others: unit attentions (kept for
    /// registered I_T nexuses without a session until one logs in), aborted tasks.
    fn pr_effects(&mut self, fx: Effects, nexuses: &Nexuses) {
        for (target_it, code) in fx.attentions {
            let mut delivered = false;
            for (n, it) in nexuses {
                if *it == target_it {
                    if let Some(q) = self.ua.get_mut(n) {
                        Self::push_ua(q, code);
                        delivered = true;
                    }
                }
            }
            // Registrants (and those just preempted or cleared) learn it when they return.
            let keep = self.away_ua.len() < super::pr::MAX_REGISTRATIONS
                || self.away_ua.contains_key(&target_it);
            if !delivered && keep {
                Self::push_ua(self.away_ua.entry(target_it).or_default(), code);
            }
        }
        if !fx.aborted.is_empty() {
            let sessions: HashSet<NexusId> = nexuses
                .iter()
                .filter(|(_, it)| fx.aborted.contains(it))
                .map(|(n, _)| *n)
                .collect();
            self.abort_tasks(|n| sessions.contains(&n));
        }
    }

    /// Aborts the tasks of the sessions `which` selects: those waiting for their blocks end
    /// now, those in the block device when it finishes them; all with TASK ABORTED.
    pub fn abort_tasks(&mut self, which: impl Fn(NexusId) -> bool) {
        let mut now = Vec::new();
        for (&id, op) in self.ops.iter_mut() {
            if which(op.nexus) {
                op.aborted = true;
                if self.waiting.contains(&id) {
                    now.push(id);
                }
            }
        }
        for id in now {
            self.waiting.retain(|w| *w != id);
            self.finish(id);
        }
        // Requests the device refused for now are not sent at all.
        let mut dropped: HashMap<u64, usize> = HashMap::new();
        let ops = &self.ops;
        self.retry.retain(|io| {
            let abort = ops.get(&io.tag).is_some_and(|o| o.aborted);
            if abort {
                *dropped.entry(io.tag).or_default() += 1;
            }
            !abort
        });
        for (id, n) in dropped {
            if let Some(op) = self.ops.get_mut(&id) {
                op.pending = op.pending.saturating_sub(n);
                if op.pending == 0 {
                    self.finish(id);
                }
            }
        }
    }

    /// Whether aborted tasks are still in the block device.
    pub fn aborting(&self) -> bool {
        self.ops.values().any(|o| o.aborted)
    }

    /// Releases held responses once no aborted task is left.
    fn release_held(&mut self) {
        if !self.held.is_empty() && !self.aborting() {
            self.done.append(&mut self.held);
        }
    }

    fn push_ua(q: &mut VecDeque<u16>, code: u16) {
        if !q.contains(&code) {
            if q.len() >= MAX_UA_PER_NEXUS {
                q.pop_front();
            }
            q.push_back(code);
        }
    }

    /// Raises a unit attention for every known nexus except `except`.
    pub fn raise_ua(&mut self, code: u16, except: Option<NexusId>) {
        for (n, q) in self.ua.iter_mut() {
            if Some(*n) != except {
                Self::push_ua(q, code);
            }
        }
    }

    pub fn take_ua(&mut self, nexus: NexusId) -> Option<u16> {
        self.ua.get_mut(&nexus).and_then(|q| q.pop_front())
    }

    /// The reset side effects shared by LOGICAL UNIT RESET and target resets.
    pub fn reset(&mut self, code: u16, power_on: bool) {
        self.raise_ua(code, None);
        self.reservation = None;
        self.prevent.clear();
        if power_on {
            self.mode = ModeState::default();
            // A power on ends persistent reservations unless they persist through power
            // loss (SPC-4 5.12.4).
            if !self.pr.aptpl() {
                self.pr = Pr::default();
            }
        }
    }

    pub fn resize(&mut self, num_blocks: u64) -> Result<(), BdevError> {
        self.bdev.resize(num_blocks)?;
        self.raise_ua(asc::CAPACITY_DATA_CHANGED, None);
        Ok(())
    }

    pub fn flush_blocking(&mut self) -> Result<(), BdevError> {
        self.bdev.flush_blocking()
    }

    /// Whether no command is in progress here (queued, waiting for a range, in the block
    /// device, or finished and not yet collected).
    pub fn idle(&self) -> bool {
        self.ops.is_empty()
            && self.waiting.is_empty()
            && self.retry.is_empty()
            && self.done.is_empty()
            && self.held.is_empty()
            && self.bdev.in_flight() == 0
            && !self.bdev.views_out()
    }

    pub fn views_out(&self) -> bool {
        self.bdev.views_out()
    }

    /// Gives the block device back (the LUN is gone).
    pub fn into_bdev(self) -> Box<dyn BlockDevice> {
        self.bdev
    }

    // ---- command execution ----

    fn range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.capacity() => Ok(()),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// Bytes for `blocks` blocks, saturated for the `data_out_wanted` report.
    fn bytes(&self, blocks: u64) -> u32 {
        u32::try_from(blocks.saturating_mul(u64::from(self.block_size()))).unwrap_or(u32::MAX)
    }

    /// Refuses transfers beyond the advertised maximum, pointing at the CDB's length field.
    fn transfer_ok(&self, blocks: u32, cdb: &[u8]) -> Result<(), Sense> {
        if blocks > self.limits.max_transfer_blocks {
            Err(Sense::invalid_cdb(length_field(cdb), None))
        } else {
            Ok(())
        }
    }

    fn facts(&self, port: u16) -> LunFacts {
        LunFacts {
            thin: self.thin(),
            limits: self.limits,
            port,
        }
    }

    /// Runs one decoded command from `task`; the response lands in `self.done` now or later.
    /// `nexuses`: the device's sessions and their I_T nexuses.
    pub fn execute(&mut self, task: ScsiTask, cmd: Command, nexuses: &Nexuses) {
        let tag = task.tag;
        let wanted = self.wanted(&cmd);
        self.running = task.nexus;
        match self.run(task, cmd, wanted, nexuses) {
            Ok(Some(r)) => self.done.push(r),
            Ok(None) => {}
            Err(sense) => {
                let r = self.check(tag, sense, wanted);
                self.done.push(r);
            }
        }
        self.start_waiting();
    }

    /// Data-Out bytes the CDB calls for.
    fn wanted(&self, cmd: &Command) -> u32 {
        match *cmd {
            Command::Write { blocks, .. }
            | Command::WriteVerify { blocks, .. }
            | Command::OrWrite { blocks, .. } => self.bytes(u64::from(blocks)),
            Command::Verify { blocks, bytchk, .. } => match bytchk {
                ByteCheck::None => 0,
                ByteCheck::Full => self.bytes(u64::from(blocks)),
                ByteCheck::OneBlock => self.block_size(),
            },
            Command::CompareAndWrite { blocks, .. } => self.bytes(2 * u64::from(blocks)),
            Command::WriteSame { ndob, .. } => {
                if ndob {
                    0
                } else {
                    self.block_size()
                }
            }
            Command::Unmap { len }
            | Command::ModeSelect { len, .. }
            | Command::PrOut { len, .. } => len,
            _ => 0,
        }
    }

    fn run(
        &mut self,
        task: ScsiTask,
        cmd: Command,
        wanted: u32,
        nexuses: &Nexuses,
    ) -> Result<Option<ScsiResponse>, Sense> {
        let tag = task.tag;
        let nexus = task.nexus;
        let it_of = |n: NexusId| {
            nexuses
                .get(&n)
                .cloned()
                .unwrap_or_else(|| ItNexus::unannounced(n))
        };
        let good = || Ok(Some(good(tag, wanted)));
        if self.mode.swp && cmd.writes_medium() {
            return Err(Sense::new(key::DATA_PROTECT, asc::WRITE_PROTECTED));
        }
        match cmd {
            Command::TestUnitReady => good(),
            Command::RequestSense { desc, alloc } => {
                let sense = match self.take_ua(nexus) {
                    Some(code) => Sense::unit_attention(code),
                    None => Sense::new(key::NO_SENSE, asc::NO_ADDITIONAL),
                };
                Ok(Some(with_data(tag, sense.encode(desc), alloc, 0)))
            }
            Command::Inquiry { evpd, page, alloc } => {
                let data = if evpd {
                    inquiry::vpd(page, &self.identity, &self.facts(it_of(nexus).port))?
                } else if page != 0 {
                    return Err(Sense::invalid_cdb(2, None));
                } else {
                    inquiry::standard(&self.identity)
                };
                Ok(Some(with_data(tag, data, alloc, 0)))
            }
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => {
                let req = SenseRequest {
                    ten,
                    dbd,
                    llbaa,
                    pc,
                    page,
                    subpage,
                    block_size: self.block_size(),
                    num_blocks: self.capacity(),
                };
                let data = mode::mode_sense(&req, self.mode)?;
                Ok(Some(with_data(tag, data, alloc, 0)))
            }
            Command::ModeSelect { ten, pf, sp, len } => {
                let data = task.data_out.as_ref().map(IoBuf::as_slice).unwrap_or(&[]);
                let data = &data[..data.len().min(len as usize)];
                let next = mode::mode_select(ten, pf, sp, data, self.mode, self.block_size())?;
                if next != self.mode {
                    self.mode = next;
                    self.raise_ua(asc::MODE_PARAMETERS_CHANGED, Some(nexus));
                }
                good()
            }
            Command::Reserve6 => match self.reservation {
                Some(holder) if holder != nexus => Ok(Some(response(
                    tag,
                    ScsiStatus::ReservationConflict,
                    Vec::new(),
                    None,
                    0,
                ))),
                _ => {
                    self.reservation = Some(nexus);
                    good()
                }
            },
            Command::Release6 => {
                if self.reservation == Some(nexus) {
                    self.reservation = None;
                }
                good()
            }
            // The medium is not removable, so it can be neither ejected nor loaded.
            Command::StartStop { loej: true, .. } => Err(Sense::invalid_cdb(4, Some(1))),
            Command::StartStop { .. } => good(),
            Command::PreventAllow { prevent } => {
                match prevent {
                    0 => {
                        self.prevent.remove(&nexus);
                    }
                    1 => {
                        self.prevent.insert(nexus);
                    }
                    _ => return Err(Sense::invalid_cdb(4, Some(1))),
                }
                good()
            }
            Command::ReadCapacity10 { .. } => {
                let last = self.capacity().saturating_sub(1);
                let mut v = Vec::with_capacity(8);
                v.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                v.extend_from_slice(&self.block_size().to_be_bytes());
                Ok(Some(with_data(tag, v, 8, 0)))
            }
            Command::ReadCapacity16 { alloc } => {
                let mut v = vec![0u8; 32];
                v[0..8].copy_from_slice(&self.capacity().saturating_sub(1).to_be_bytes());
                v[8..12].copy_from_slice(&self.block_size().to_be_bytes());
                // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT stays 0: reporting 4 KiB physical
                // blocks on 512-byte LUNs makes libiscsi's GetLBAStatus.UnmapSingle expect
                // descriptors aligned to physical blocks, which SBC-3 does not ask for.
                if self.thin() {
                    v[14] = 0x80 | 0x40; // LBPME, LBPRZ
                }
                Ok(Some(with_data(tag, v, alloc, 0)))
            }
            Command::GetLbaStatus { lba, alloc } => {
                if lba >= self.capacity() {
                    return Err(Sense::lba_out_of_range());
                }
                Ok(Some(with_data(tag, self.lba_status(lba, alloc), alloc, 0)))
            }
            Command::ReportOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc,
            } => {
                let data = opcodes::report(rctd, options, opcode, sa)?;
                Ok(Some(with_data(tag, data, alloc, 0)))
            }
            Command::ReportLuns { .. } => Err(Sense::invalid_cdb(0, None)),
            Command::ReadDefectData {
                twelve,
                lists,
                alloc,
            } => {
                // No defects: the requested lists and format are echoed with length zero.
                let data = if twelve {
                    vec![0, lists, 0, 0, 0, 0, 0, 0]
                } else {
                    vec![0, lists, 0, 0]
                };
                Ok(Some(with_data(tag, data, alloc, 0)))
            }
            Command::ReportTargetPortGroups { extended, alloc } => {
                let data = inquiry::report_target_port_groups(&self.ports, extended);
                Ok(Some(with_data(tag, data, alloc, 0)))
            }
            Command::PrIn { sa, alloc } => {
                let data = self.pr.read(sa)?;
                Ok(Some(with_data(tag, data, alloc, 0)))
            }
            Command::PrOut {
                sa,
                scope_type,
                len,
            } => {
                let data = task.data_out.as_ref().map(IoBuf::as_slice).unwrap_or(&[]);
                let data = &data[..data.len().min(len as usize)];
                let who = it_of(nexus);
                let before = self.pr.clone();
                let result = self.pr.out(&who, sa, scope_type, data, &self.ports);
                match result {
                    Ok(fx) => {
                        if fx.changed || before.aptpl() != self.pr.aptpl() {
                            if let Err(e) = self.store_pr() {
                                // Refuse what cannot be kept: the initiator asked for it to
                                // survive power loss.
                                log::error!("persistent reservation state not saved: {e}");
                                self.pr = before;
                                return Err(Sense::new(
                                    key::HARDWARE_ERROR,
                                    asc::INTERNAL_TARGET_FAILURE,
                                ));
                            }
                        }
                        let fences = !fx.aborted.is_empty();
                        self.pr_effects(fx, nexuses);
                        if fences && self.aborting() {
                            self.held.push(response(
                                tag,
                                ScsiStatus::Good,
                                Vec::new(),
                                None,
                                wanted,
                            ));
                            return Ok(None);
                        }
                        good()
                    }
                    Err(PrError::Check(sense)) => Err(sense),
                    Err(PrError::Conflict) => Ok(Some(response(
                        tag,
                        ScsiStatus::ReservationConflict,
                        Vec::new(),
                        None,
                        wanted,
                    ))),
                }
            }
            Command::Read { lba, blocks } => {
                self.range(lba, u64::from(blocks))?;
                self.transfer_ok(blocks, &task.cdb)?;
                if blocks == 0 {
                    return good();
                }
                self.start(tag, wanted, Kind::Read { lba, blocks }, None)
            }
            Command::Write { lba, blocks, fua } => {
                self.write(task, lba, blocks, fua || !self.mode.wce, wanted)
            }
            Command::WriteVerify { lba, blocks, .. } => {
                // Verification after the write can only compare the data with itself.
                self.write(task, lba, blocks, true, wanted)
            }
            Command::Verify {
                lba,
                blocks,
                bytchk,
            } => {
                self.range(lba, u64::from(blocks))?;
                self.transfer_ok(blocks, &task.cdb)?;
                if blocks == 0 || bytchk == ByteCheck::None {
                    return good();
                }
                let need = if bytchk == ByteCheck::OneBlock {
                    self.block_size() as usize
                } else {
                    wanted as usize
                };
                let mut data = match task.data_out {
                    Some(d) if d.len() >= need => d,
                    _ => return Err(Sense::invalid_cdb(0, None)),
                };
                data.truncate(need);
                let kind = Kind::Verify {
                    lba,
                    blocks,
                    data,
                    one_block: bytchk == ByteCheck::OneBlock,
                };
                self.start(tag, wanted, kind, None)
            }
            Command::PreFetch { lba, blocks } => {
                self.range(lba, u64::from(blocks))?;
                good()
            }
            Command::SyncCache { lba, blocks } => {
                self.range(lba, u64::from(blocks))?;
                self.start(tag, wanted, Kind::Flush, None)
            }
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            } => self.write_same(task, lba, blocks, unmap, ndob, wanted),
            Command::Unmap { len } => self.unmap(task, len, wanted),
            Command::CompareAndWrite { lba, blocks, fua } => {
                let blocks = u32::from(blocks);
                if blocks > MAX_COMPARE_AND_WRITE {
                    return Err(Sense::invalid_cdb(13, None));
                }
                self.read_modify_write(task, lba, blocks, fua, false, wanted)
            }
            Command::OrWrite { lba, blocks, fua } => {
                self.read_modify_write(task, lba, blocks, fua, true, wanted)
            }
        }
    }

    fn lba_status(&self, lba: u64, alloc: u32) -> Vec<u8> {
        let room = (alloc as usize).saturating_sub(8) / 16;
        let max = room.clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let cap = self.capacity();
        let mut v = vec![0u8; 8];
        let mut at = lba;
        while at < cap && (v.len() - 8) / 16 < max {
            let (state, span) = self.bdev.lba_status(at);
            let span = span.clamp(1, cap - at).min(u64::from(u32::MAX));
            v.extend_from_slice(&at.to_be_bytes());
            v.extend_from_slice(&(span as u32).to_be_bytes());
            v.push(match state {
                LbaState::Mapped => 0,
                LbaState::Deallocated => 1,
            });
            v.extend_from_slice(&[0; 3]);
            at += span;
        }
        let len = (v.len() - 4) as u32;
        v[0..4].copy_from_slice(&len.to_be_bytes());
        v
    }

    fn write(
        &mut self,
        task: ScsiTask,
        lba: u64,
        blocks: u32,
        fua: bool,
        wanted: u32,
    ) -> Result<Option<ScsiResponse>, Sense> {
        self.range(lba, u64::from(blocks))?;
        self.transfer_ok(blocks, &task.cdb)?;
        // Only whole blocks that actually arrived are written: with an Expected Data Transfer
        // Length below the CDB's, the initiator sees the rest as residual.
        let bs = self.block_size() as usize;
        let have = task.data_out.as_ref().map_or(0, IoBuf::len) / bs;
        let blocks = blocks.min(u32::try_from(have).unwrap_or(u32::MAX));
        if blocks == 0 {
            return Ok(Some(good(task.tag, wanted)));
        }
        let mut buf = task.data_out.unwrap_or_default();
        buf.truncate(blocks as usize * bs);
        let kind = Kind::Write {
            lba,
            blocks,
            fua,
            buf: Some(buf),
        };
        self.start(task.tag, wanted, kind, Some((lba, u64::from(blocks))))
    }

    fn write_same(
        &mut self,
        task: ScsiTask,
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
        wanted: u32,
    ) -> Result<Option<ScsiResponse>, Sense> {
        let len_byte = length_field(&task.cdb);
        self.range(lba, u64::from(blocks))?;
        if blocks == 0 {
            // WSNZ = 1 in the block limits page.
            return Err(Sense::invalid_cdb(len_byte, None));
        }
        if blocks > self.limits.max_write_same_blocks {
            return Err(Sense::invalid_cdb(len_byte, None));
        }
        let bs = self.block_size() as usize;
        let block = if ndob {
            None
        } else {
            match task.data_out {
                Some(d) if d.len() == bs => Some(d),
                _ => return Err(Sense::invalid_cdb(len_byte, None)),
            }
        };
        if unmap && !self.thin() {
            // LBPWS/LBPWS10 are clear on a thick LUN, so UNMAP may not be asked for.
            return Err(Sense::invalid_cdb(1, Some(3)));
        }
        let lock = Some((lba, u64::from(blocks)));
        if unmap || block.is_none() {
            let kind = Kind::Deallocate {
                lba,
                blocks: u64::from(blocks),
                unmap,
            };
            return self.start(task.tag, wanted, kind, lock);
        }
        let block = block.unwrap_or_default();
        let mut data = Vec::with_capacity(bs * blocks as usize);
        for _ in 0..blocks {
            data.extend_from_slice(block.as_slice());
        }
        let kind = Kind::Write {
            lba,
            blocks,
            fua: !self.mode.wce,
            buf: Some(IoBuf::from_vec(data)),
        };
        self.start(task.tag, wanted, kind, lock)
    }

    fn unmap(
        &mut self,
        task: ScsiTask,
        len: u32,
        wanted: u32,
    ) -> Result<Option<ScsiResponse>, Sense> {
        if !self.thin() {
            return Err(Sense::illegal(asc::INVALID_COMMAND_OPCODE));
        }
        if len == 0 {
            return Ok(Some(good(task.tag, wanted)));
        }
        let data = task.data_out.as_ref().map(IoBuf::as_slice).unwrap_or(&[]);
        let data = &data[..data.len().min(len as usize)];
        if data.len() < 8 {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let bddl = usize::from(u16::from_be_bytes([data[2], data[3]]));
        let descs = &data[8..];
        let bddl = bddl.min(descs.len()) / 16 * 16;
        let count = bddl / 16;
        if count > inquiry::MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::invalid_param(2, None));
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total: u64 = 0;
        for (i, d) in descs[..bddl].chunks_exact(16).enumerate() {
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or([0; 8]));
            let n = u64::from(u32::from_be_bytes(d[8..12].try_into().unwrap_or([0; 4])));
            self.range(lba, n)?;
            total = total.saturating_add(n);
            if total > u64::from(inquiry::MAX_UNMAP_BLOCKS) {
                return Err(Sense::invalid_param(8 + 16 * i + 8, None));
            }
            if n > 0 {
                ranges.push((lba, n));
            }
        }
        if ranges.is_empty() {
            return Ok(Some(good(task.tag, wanted)));
        }
        self.start(task.tag, wanted, Kind::Unmap { ranges }, None)
    }

    fn read_modify_write(
        &mut self,
        task: ScsiTask,
        lba: u64,
        blocks: u32,
        fua: bool,
        or: bool,
        wanted: u32,
    ) -> Result<Option<ScsiResponse>, Sense> {
        self.range(lba, u64::from(blocks))?;
        if or {
            self.transfer_ok(blocks, &task.cdb)?;
        }
        // The Data-Out must match the CDB exactly, even for zero blocks: a mismatch means the
        // initiator and the CDB disagree about the operation (libiscsi encodes 256 blocks
        // as 0 in COMPARE AND WRITE's one-byte field and expects a refusal).
        let data_len = task.data_out.as_ref().map_or(0, IoBuf::len);
        if data_len != wanted as usize {
            return Err(Sense::invalid_cdb(if or { 10 } else { 13 }, None));
        }
        if blocks == 0 {
            return Ok(Some(good(task.tag, wanted)));
        }
        let data = task.data_out.unwrap_or_default();
        let kind = Kind::ReadModifyWrite {
            lba,
            blocks,
            fua: fua || !self.mode.wce,
            data,
            or,
            writing: false,
        };
        self.start(task.tag, wanted, kind, Some((lba, u64::from(blocks))))
    }

    // ---- asynchronous machinery ----

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
    }

    fn range_busy(&self, range: (u64, u64), ahead_of: Option<u64>) -> bool {
        let held = self
            .ops
            .iter()
            .filter(|(id, op)| op.lock.is_some() && !self.waiting.contains(id))
            .any(|(_, op)| op.lock.is_some_and(|l| Self::overlaps(l, range)));
        let queued = self
            .waiting
            .iter()
            .take_while(|id| Some(**id) != ahead_of)
            .filter_map(|id| self.ops.get(id).and_then(|o| o.lock))
            .any(|l| Self::overlaps(l, range));
        held || queued
    }

    /// Registers an op and starts it, or queues it behind overlapping ones.
    fn start(
        &mut self,
        tag: u64,
        wanted: u32,
        kind: Kind,
        lock: Option<(u64, u64)>,
    ) -> Result<Option<ScsiResponse>, Sense> {
        let id = self.next_op;
        self.next_op = self.next_op.wrapping_add(1);
        let busy = lock.is_some_and(|l| self.range_busy(l, None));
        self.ops.insert(
            id,
            Op {
                tag,
                nexus: self.running,
                aborted: false,
                wanted,
                kind,
                pending: 0,
                error: None,
                data_in: None,
                lock,
            },
        );
        if busy {
            self.waiting.push_back(id);
        } else {
            self.begin(id);
        }
        Ok(None)
    }

    fn start_waiting(&mut self) {
        loop {
            let ready = self.waiting.iter().copied().find(|id| {
                let lock = self.ops.get(id).and_then(|o| o.lock);
                lock.is_none_or(|l| !self.range_busy(l, Some(*id)))
            });
            let Some(id) = ready else { break };
            self.waiting.retain(|w| *w != id);
            self.begin(id);
        }
    }

    fn submit_io(&mut self, io: BdevIo) -> Result<(), BdevError> {
        if !self.retry.is_empty() {
            self.retry.push_back(io);
            return Ok(());
        }
        match self.bdev.submit(io) {
            Ok(()) => Ok(()),
            Err((BdevError::QueueFull, io)) => {
                self.retry.push_back(io);
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    /// Issues an op's first requests.
    fn begin(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        let bs = self.bdev.block_size() as usize;
        let mut ios: Vec<(BdevOp, Option<IoBuf>)> = Vec::new();
        match &mut op.kind {
            Kind::Read { lba, blocks } => ios.push((
                BdevOp::Read {
                    lba: *lba,
                    blocks: *blocks,
                },
                Some(IoBuf::for_io(*blocks as usize * bs)),
            )),
            Kind::Verify { lba, blocks, .. } | Kind::ReadModifyWrite { lba, blocks, .. } => ios
                .push((
                    BdevOp::Read {
                        lba: *lba,
                        blocks: *blocks,
                    },
                    Some(IoBuf::for_io(*blocks as usize * bs)),
                )),
            Kind::Write {
                lba,
                blocks,
                fua,
                buf,
            } => ios.push((
                BdevOp::Write {
                    lba: *lba,
                    blocks: *blocks,
                    fua: *fua,
                },
                buf.take(),
            )),
            Kind::Deallocate { lba, blocks, unmap } => {
                let op = if *unmap {
                    BdevOp::Unmap {
                        lba: *lba,
                        blocks: *blocks,
                    }
                } else {
                    BdevOp::WriteZeroes {
                        lba: *lba,
                        blocks: *blocks,
                    }
                };
                ios.push((op, None));
            }
            Kind::Flush => ios.push((BdevOp::Flush, None)),
            Kind::Unmap { ranges } => {
                for &(lba, blocks) in ranges.iter() {
                    ios.push((BdevOp::Unmap { lba, blocks }, None));
                }
            }
        }
        self.issue(id, ios);
    }

    fn issue(&mut self, id: u64, ios: Vec<(BdevOp, Option<IoBuf>)>) {
        for (bop, buf) in ios {
            let writing = !matches!(bop, BdevOp::Read { .. });
            let io = BdevIo {
                tag: id,
                op: bop,
                buf,
            };
            match self.submit_io(io) {
                Ok(()) => {
                    if let Some(op) = self.ops.get_mut(&id) {
                        op.pending += 1;
                    }
                }
                Err(e) => {
                    if let Some(op) = self.ops.get_mut(&id) {
                        op.error = Some(map_bdev_error(&e, writing));
                    }
                    break;
                }
            }
        }
        if self.ops.get(&id).is_some_and(|op| op.pending == 0) {
            self.finish(id);
        }
    }

    fn finish(&mut self, id: u64) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        let r = match op.error {
            _ if op.aborted => response(op.tag, ScsiStatus::TaskAborted, Vec::new(), None, 0),
            Some(sense) => self.check(op.tag, sense, op.wanted),
            None => response(op.tag, ScsiStatus::Good, Vec::new(), op.data_in, op.wanted),
        };
        self.done.push(r);
    }

    /// Whether the owner may sleep: nothing ready or to retry, and any requests in the
    /// block device will announce their completion on its completion fd.
    pub fn can_sleep(&self) -> bool {
        self.retry.is_empty()
            && self.done.is_empty()
            && (self.held.is_empty() || self.aborting())
            && (self.bdev.in_flight() == 0 || self.bdev.completion_fd().is_some())
    }

    /// The block device's completion fd, if it has one.
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.bdev.completion_fd()
    }

    /// Clears the block device's completion fd after it fired.
    pub fn ack_completion(&mut self) {
        self.bdev.ack_completion();
    }

    /// Drives the block device; finished responses accumulate in `self.done`.
    pub fn poll(&mut self) {
        while let Some(io) = self.retry.pop_front() {
            let id = io.tag;
            let writing = !matches!(io.op, BdevOp::Read { .. });
            match self.bdev.submit(io) {
                Ok(()) => {}
                Err((BdevError::QueueFull, io)) => {
                    self.retry.push_front(io);
                    break;
                }
                Err((e, _)) => self.io_done(id, Err(e), None, writing),
            }
        }
        let mut comps = std::mem::take(&mut self.completions);
        self.bdev.poll(&mut comps);
        for c in comps.drain(..) {
            let writing = self.ops.get(&c.tag).is_some_and(|o| {
                o.kind.writes() && !matches!(o.kind, Kind::ReadModifyWrite { writing: false, .. })
            });
            self.io_done(c.tag, c.result, c.buf, writing);
        }
        self.completions = comps;
        self.start_waiting();
        self.release_held();
    }

    fn io_done(
        &mut self,
        id: u64,
        result: Result<(), BdevError>,
        buf: Option<IoBuf>,
        writing: bool,
    ) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.pending = op.pending.saturating_sub(1);
        if let Err(e) = &result {
            if op.error.is_none() {
                op.error = Some(map_bdev_error(e, writing));
            }
        }
        if op.pending > 0 {
            return;
        }
        if op.error.is_some() || op.aborted {
            // An aborted COMPARE AND WRITE or ORWRITE does not go on to its write.
            self.finish(id);
            return;
        }
        let bs = self.bdev.block_size() as usize;
        let mut next: Option<(BdevOp, Option<IoBuf>)> = None;
        match &mut op.kind {
            Kind::Read { .. } => op.data_in = buf,
            Kind::Verify {
                data, one_block, ..
            } => {
                let medium = buf.unwrap_or_default();
                let m = medium.as_slice();
                let diff = if *one_block {
                    m.chunks(bs.max(1)).enumerate().find_map(|(i, blk)| {
                        first_difference(blk, data.as_slice()).map(|o| i * bs + o)
                    })
                } else {
                    first_difference(m, data.as_slice())
                };
                if let Some(off) = diff {
                    op.error = Some(Sense::miscompare(off as u64));
                }
            }
            Kind::ReadModifyWrite {
                lba,
                blocks,
                fua,
                data,
                or,
                writing,
            } if !*writing => {
                let n = *blocks as usize * bs;
                let mut medium = buf.unwrap_or_default();
                let d = data.as_slice();
                if *or {
                    for (m, x) in medium.as_mut_slice().iter_mut().zip(d) {
                        *m |= *x;
                    }
                } else if let Some(off) = first_difference(medium.as_slice(), &d[..n]) {
                    op.error = Some(Sense::miscompare(off as u64));
                } else {
                    medium = IoBuf::from_vec(d[n..].to_vec());
                }
                if op.error.is_none() {
                    *writing = true;
                    next = Some((
                        BdevOp::Write {
                            lba: *lba,
                            blocks: *blocks,
                            fua: *fua,
                        },
                        Some(medium),
                    ));
                }
            }
            _ => {}
        }
        match next {
            Some(io) => self.issue(id, vec![io]),
            None => self.finish(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::testutil::MockBdev;
    use crate::scsi::DataDirection;

    fn lun(limit: Option<usize>) -> Lun {
        let (mut m, _) = MockBdev::new(512, 64, true);
        m.queue_limit = limit;
        let id = LunIdentity {
            vendor: "V".into(),
            product: "P".into(),
            revision: "1".into(),
            serial: "S".into(),
            naa: 0x6000_0000_0000_0002,
            target_name: "iqn.t".into(),
            pr_file: None,
        };
        Lun::new(Box::new(m), id)
    }

    fn task(tag: u64, data: Option<Vec<u8>>) -> ScsiTask {
        ScsiTask {
            tag,
            nexus: 1,
            lun: 0,
            cdb: Vec::new(),
            expected_len: 0,
            direction: DataDirection::Write,
            data_out: data.map(IoBuf::from_vec),
        }
    }

    #[test]
    fn queue_full_requests_are_retried_in_order() {
        let mut l = lun(Some(1));
        for tag in 0..3u64 {
            let cmd = Command::Write {
                lba: tag,
                blocks: 1,
                fua: false,
            };
            l.execute(
                task(tag, Some(vec![tag as u8 + 1; 512])),
                cmd,
                &Nexuses::new(),
            );
        }
        assert!(l.done.is_empty());
        let mut tags = Vec::new();
        for _ in 0..5 {
            l.poll();
            tags.extend(l.done.drain(..).map(|r| (r.tag, r.status)));
        }
        assert_eq!(
            tags,
            vec![
                (0, ScsiStatus::Good),
                (1, ScsiStatus::Good),
                (2, ScsiStatus::Good)
            ]
        );
        l.execute(
            task(9, None),
            Command::Read { lba: 2, blocks: 1 },
            &Nexuses::new(),
        );
        l.poll();
        let r = l.done.pop().unwrap();
        assert_eq!(r.data_in.unwrap().as_slice(), &[3u8; 512][..]);
    }

    #[test]
    fn overlapping_writes_wait_for_each_other_but_reads_do_not() {
        let mut l = lun(None);
        let w = |lba| Command::Write {
            lba,
            blocks: 4,
            fua: false,
        };
        l.execute(task(1, Some(vec![1; 2048])), w(0), &Nexuses::new());
        l.execute(task(2, Some(vec![2; 2048])), w(2), &Nexuses::new());
        l.execute(task(3, Some(vec![3; 2048])), w(8), &Nexuses::new());
        assert_eq!(l.waiting.len(), 1);
        l.execute(
            task(4, None),
            Command::Read { lba: 0, blocks: 8 },
            &Nexuses::new(),
        );
        assert_eq!(l.waiting.len(), 1);
        l.poll();
        let done: Vec<u64> = l.done.drain(..).map(|r| r.tag).collect();
        assert_eq!(done, vec![1, 3, 4]);
        l.poll();
        assert_eq!(l.done.pop().map(|r| r.tag), Some(2));
        assert!(l.ops.is_empty() && l.waiting.is_empty());
    }

    #[test]
    fn unit_attention_queue_is_bounded_and_deduplicated() {
        let mut l = lun(None);
        l.add_nexus(1, &ItNexus::unannounced(1));
        l.add_nexus(2, &ItNexus::unannounced(2));
        l.raise_ua(asc::BUS_DEVICE_RESET, None);
        l.raise_ua(asc::BUS_DEVICE_RESET, None);
        l.raise_ua(asc::MODE_PARAMETERS_CHANGED, Some(2));
        assert_eq!(l.take_ua(1), Some(asc::BUS_DEVICE_RESET));
        assert_eq!(l.take_ua(1), Some(asc::MODE_PARAMETERS_CHANGED));
        assert_eq!(l.take_ua(1), None);
        assert_eq!(l.take_ua(2), Some(asc::BUS_DEVICE_RESET));
        assert_eq!(l.take_ua(2), None);
        for code in 0..40u16 {
            l.raise_ua(code, None);
        }
        assert_eq!(l.ua[&1].len(), MAX_UA_PER_NEXUS);
        l.remove_nexus(1);
        assert_eq!(l.take_ua(1), None);
    }
}
