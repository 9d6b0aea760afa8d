//! SCSI command emulation (SPC-4, SBC-3) for the logical units of one target.
//!
//! The iSCSI layer hands complete commands to a [`Device`] (one per target node) with
//! [`Device::submit`] and collects answers with [`Device::poll`]. Commands that touch the
//! medium become asynchronous block-device requests; everything else is answered from
//! emulation. Nothing here knows about sockets, sessions or time.
//!
//! Contract with the iSCSI layer:
//! - A WRITE-direction task arrives with all its Data-Out already gathered in `data_out`
//!   (`min(expected_len, bytes received)` bytes). The response's `data_out_wanted` says how
//!   many bytes the CDB called for, so the caller can compute residuals.
//! - A READ-direction response carries `data_in` holding everything the command produced
//!   (possibly more than `expected_len`: the caller sends `min` and reports the overflow).
//! - Every submitted task produces exactly one response, even when the iSCSI layer has
//!   meanwhile aborted it (the caller drops such responses). Aborts and resets therefore need
//!   no cancellation here, only the side effects on state (unit attentions, reservations).
//! - A WRITE whose Data-Out is shorter than the CDB asks writes only the whole blocks that
//!   arrived (GOOD; the caller reports the underflow). COMPARE AND WRITE, ORWRITE and WRITE
//!   SAME instead refuse Data-Out of the wrong size with INVALID FIELD IN CDB.
//! - A nexus that was never announced with [`Device::nexus_added`] is added on its first
//!   command (with a made-up initiator port). A new nexus starts without unit attentions,
//!   except those persistent reservation changes left for its initiator port while it was
//!   away. [`Device::nexus_removed`] drops its unit attentions, RESERVE(6) and PREVENT ALLOW
//!   state; persistent reservation registrations belong to the initiator and target ports
//!   ([`ItNexus`]) and stay (SPC-4 5.12.5).
//! - Aborts by the device itself (LOGICAL UNIT RESET, target resets, PREEMPT AND ABORT)
//!   complete the affected tasks with TASK ABORTED (the control mode page says TAS=1); the
//!   issuing session drops those of its own tasks it already answered for.
//!
//! Layout: `cdb` (operation table, decoding), `sense`, `inquiry` (standard data, VPD),
//! `mode` (mode pages), `opcodes` (REPORT SUPPORTED OPERATION CODES), `pr` (persistent
//! reservations), `lun` (per-LUN state and command execution); the [`Device`] below routes
//! tasks, answers REPORT LUNS and unknown LUNs, and applies unit attentions and reservations.

// The implementation modules are private to the layer; the types below are its surface.
mod cdb;
mod inquiry;
mod lun;
mod mode;
mod opcodes;
mod pr;
mod sense;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;

use cdb::Command;
use lun::{response, Lun};
use sense::{asc, Sense};

use crate::bdev::BlockDevice;
use crate::mem::IoBuf;

/// Identifies one I_T nexus (initiator port × target port), i.e. one iSCSI session.
pub type NexusId = u64;

/// A device's sessions and the I_T nexus (ports) of each.
pub(crate) type Nexuses = HashMap<NexusId, ItNexus>;

/// The SCSI ports behind an I_T nexus (RFC 7143 §4.4.1): initiator port = initiator name and
/// ISID, target port = target name and portal group tag (the target name is the device's).
/// Persistent reservations are keyed by it, so a new session of the same initiator port
/// through the same portal group is the same I_T nexus again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ItNexus {
    /// iSCSI initiator name, lower-case (names compare without case).
    pub initiator: String,
    pub isid: [u8; 6],
    /// Relative target port identifier: the target portal group tag.
    pub port: u16,
}

impl ItNexus {
    pub fn new(initiator: &str, isid: [u8; 6], port: u16) -> Self {
        ItNexus {
            initiator: initiator.to_ascii_lowercase(),
            isid,
            port,
        }
    }

    /// A stand-in for a nexus that was never announced (unit tests, fuzzing).
    fn unannounced(nexus: NexusId) -> Self {
        let b = nexus.to_be_bytes();
        ItNexus::new(
            "iqn.0000-00.invalid:unannounced",
            [b[2], b[3], b[4], b[5], b[6], b[7]],
            1,
        )
    }

    /// The initiator port name: `name,i,0xISID`.
    pub fn initiator_port(&self) -> String {
        let isid: String = self.isid.iter().map(|b| format!("{b:02x}")).collect();
        format!("{},i,0x{isid}", self.initiator)
    }
}

/// SCSI status codes (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ScsiStatus {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    AcaActive = 0x30,
    TaskAborted = 0x40,
}

/// The direction of the data phase as the iSCSI header declared it (R/W bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    None,
    Read,
    Write,
    Bidirectional,
}

/// One SCSI command addressed to a logical unit of the device.
#[derive(Debug)]
pub struct ScsiTask {
    /// The submitter's token, returned unchanged in the response.
    pub tag: u64,
    /// The I_T nexus the command came from (unit attentions, reservations).
    pub nexus: NexusId,
    /// LUN number as decoded from the 8-byte LUN field (flat/peripheral addressing).
    pub lun: u64,
    /// The CDB, 6 to 260 bytes (extended CDBs arrive already joined with their AHS).
    pub cdb: Vec<u8>,
    /// Expected Data Transfer Length from the iSCSI header, in bytes.
    pub expected_len: u32,
    /// Data phase direction from the iSCSI header.
    pub direction: DataDirection,
    /// Write data gathered by the iSCSI layer (WRITE and bidirectional commands).
    pub data_out: Option<IoBuf>,
}

/// The outcome of one [`ScsiTask`].
#[derive(Debug)]
pub struct ScsiResponse {
    pub tag: u64,
    pub status: ScsiStatus,
    /// Sense data (fixed or descriptor format per the LUN's D_SENSE), empty unless
    /// `status` is CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Data for the initiator, as much as the command produced.
    pub data_in: Option<IoBuf>,
    /// Bytes of Data-Out the CDB called for (0 for commands without Data-Out).
    pub data_out_wanted: u32,
}

/// Identity strings and numbers a logical unit reports in INQUIRY and its VPD pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunIdentity {
    /// T10 vendor identification, up to 8 ASCII characters.
    pub vendor: String,
    /// Product identification, up to 16 ASCII characters.
    pub product: String,
    /// Product revision level, up to 4 ASCII characters.
    pub revision: String,
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
    /// 64-bit NAA identifier (NAA type 6 high nibble or 5, already formed) for VPD 0x83.
    pub naa: u64,
    /// The iSCSI name of the target node (VPD 0x83 SCSI name string designators).
    pub target_name: String,
    /// Where persistent reservations are kept while an initiator asks them to persist
    /// through power loss (APTPL); None: APTPL is refused.
    pub pr_file: Option<PathBuf>,
}

/// The logical units of one target node and the state they share (unit attentions per
/// I_T nexus, reservations).
pub struct Device {
    luns: BTreeMap<u64, Lun>,
    nexuses: Nexuses,
    /// Relative target port identifiers (portal group tags) the target is reached through.
    ports: Vec<u16>,
    /// Responses decided without a LUN (unknown LUN, REPORT LUNS, CDB errors).
    done: VecDeque<ScsiResponse>,
    in_flight: usize,
    /// Removed LUNs finishing the commands they had: no new command reaches them.
    retiring: Vec<(u64, Lun)>,
    /// Block devices of removed LUNs whose commands have all finished (flushed).
    released: Vec<Box<dyn BlockDevice>>,
    /// Reset acknowledgements waiting for the tasks the reset aborted to end.
    acks: Vec<ScsiResponse>,
}

/// REPORT LUNS single-level LUN encoding (SAM-5 4.7): peripheral below 256, else flat.
fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else if lun < 0x4000 {
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = lun as u8;
    } else {
        b = lun.to_be_bytes();
    }
    b
}

impl Device {
    /// A device with no logical units.
    pub fn new() -> Self {
        Device {
            luns: BTreeMap::new(),
            nexuses: HashMap::new(),
            ports: vec![1],
            done: VecDeque::new(),
            in_flight: 0,
            retiring: Vec::new(),
            released: Vec::new(),
            acks: Vec::new(),
        }
    }

    /// Adds logical unit `lun` backed by `bdev`. Errors when the number is taken.
    pub fn add_lun(
        &mut self,
        lun: u64,
        bdev: Box<dyn BlockDevice>,
        identity: LunIdentity,
    ) -> Result<(), String> {
        if self.luns.contains_key(&lun) {
            return Err(format!("LUN {lun} already exists"));
        }
        let bs = bdev.block_size();
        if bs == 0 {
            return Err(format!("LUN {lun}: block size 0"));
        }
        let l = self.new_lun(bdev, identity);
        self.luns_changed();
        self.luns.insert(lun, l);
        Ok(())
    }

    /// Removes logical unit `lun`: new commands for it get LOGICAL UNIT NOT SUPPORTED, the
    /// ones it has finish normally, then its block device is flushed and handed out by
    /// [`Device::take_released`]. Every nexus gets REPORTED LUNS DATA HAS CHANGED on the
    /// remaining LUNs. False when there is no such LUN.
    pub fn remove_lun(&mut self, lun: u64) -> bool {
        let Some(l) = self.luns.remove(&lun) else {
            return false;
        };
        self.retiring.push((lun, l));
        self.luns_changed();
        true
    }

    /// Replaces logical unit `lun` by a new one on `bdev` (the old one retires). The LUN
    /// list is the same; every nexus learns through the LUN itself that its inquiry data
    /// and capacity changed.
    pub fn replace_lun(
        &mut self,
        lun: u64,
        bdev: Box<dyn BlockDevice>,
        identity: LunIdentity,
    ) -> Result<(), String> {
        if bdev.block_size() == 0 {
            return Err(format!("LUN {lun}: block size 0"));
        }
        if let Some(old) = self.luns.remove(&lun) {
            self.retiring.push((lun, old));
        }
        let mut l = self.new_lun(bdev, identity);
        l.raise_ua(asc::INQUIRY_DATA_CHANGED, None);
        l.raise_ua(asc::CAPACITY_DATA_CHANGED, None);
        self.luns.insert(lun, l);
        Ok(())
    }

    fn new_lun(&self, bdev: Box<dyn BlockDevice>, identity: LunIdentity) -> Lun {
        let mut l = Lun::new(bdev, identity);
        l.set_ports(&self.ports);
        for (&n, it) in &self.nexuses {
            l.add_nexus(n, it);
        }
        l
    }

    /// The target ports (portal group tags) the target is reached through: REPORT TARGET
    /// PORT GROUPS lists them and REGISTER AND MOVE may name them.
    pub fn set_ports(&mut self, mut ports: Vec<u16>) {
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            ports.push(1);
        }
        if ports != self.ports {
            for l in self.luns.values_mut() {
                l.set_ports(&ports);
            }
            self.ports = ports;
        }
    }

    /// The answer to a command whose data arrived with a bad data digest: CHECK CONDITION,
    /// ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (RFC 7143 §7.8).
    pub fn crc_error_response(tag: u64) -> ScsiResponse {
        response(
            tag,
            ScsiStatus::CheckCondition,
            Sense::new(sense::key::ABORTED_COMMAND, asc::PROTOCOL_SERVICE_CRC_ERROR).encode(false),
            None,
            0,
        )
    }

    /// The answer to a command for a device that is gone (its target was removed while
    /// the command travelled to it).
    pub fn gone_response(tag: u64) -> ScsiResponse {
        response(
            tag,
            ScsiStatus::CheckCondition,
            Sense::illegal(asc::LUN_NOT_SUPPORTED).encode(false),
            None,
            0,
        )
    }

    /// SPC-4 6.37: the LUN inventory changed; each nexus learns it through any LUN.
    fn luns_changed(&mut self) {
        for l in self.luns.values_mut() {
            l.raise_ua(asc::REPORTED_LUNS_DATA_CHANGED, None);
        }
    }

    /// Block devices of removed LUNs that have finished their last commands.
    pub fn take_released(&mut self) -> Vec<Box<dyn BlockDevice>> {
        std::mem::take(&mut self.released)
    }

    /// Every block device, LUNs removed or not (the device is being dropped).
    pub fn into_bdevs(self) -> Vec<Box<dyn BlockDevice>> {
        let mut v = self.released;
        v.extend(self.luns.into_values().map(Lun::into_bdev));
        v.extend(self.retiring.into_iter().map(|(_, l)| l.into_bdev()));
        v
    }

    /// LUN numbers in ascending order.
    pub fn luns(&self) -> Vec<u64> {
        self.luns.keys().copied().collect()
    }

    fn report_luns(&self, select: u8, alloc: u32) -> Result<Vec<u8>, Sense> {
        if alloc < 16 {
            return Err(Sense::invalid_cdb(6, None));
        }
        let luns: Vec<u64> = match select {
            0 | 2 => self.luns.keys().copied().collect(),
            // No well-known logical units.
            1 => Vec::new(),
            _ => return Err(Sense::invalid_cdb(2, None)),
        };
        let mut v = vec![0u8; 8];
        v[0..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
        for l in luns {
            v.extend_from_slice(&encode_lun(l));
        }
        Ok(v)
    }

    /// Queue a command. Its response appears in a later [`Device::poll`].
    pub fn submit(&mut self, task: ScsiTask) {
        self.in_flight += 1;
        if !self.nexuses.contains_key(&task.nexus) {
            self.nexus_added(task.nexus, ItNexus::unannounced(task.nexus));
        }
        let tag = task.tag;
        let decoded = cdb::decode(&task.cdb);
        let opcode = task.cdb.first().copied().unwrap_or(0);
        // REPORT LUNS answers for the whole target, whichever LUN it is addressed to, and
        // neither unit attentions nor reservations hold it back.
        if let Ok(Command::ReportLuns { select, alloc }) = decoded {
            let d_sense = self.luns.get(&task.lun).is_some_and(|l| l.mode.d_sense);
            let r = match self.report_luns(select, alloc) {
                Ok(mut data) => {
                    data.truncate(alloc as usize);
                    let data = Some(IoBuf::from_vec(data));
                    response(tag, ScsiStatus::Good, Vec::new(), data, 0)
                }
                Err(sense) => response(
                    tag,
                    ScsiStatus::CheckCondition,
                    sense.encode(d_sense),
                    None,
                    0,
                ),
            };
            self.done.push_back(r);
            return;
        }
        let Some(lun) = self.luns.get_mut(&task.lun) else {
            let r = self.no_such_lun(tag, opcode, decoded);
            self.done.push_back(r);
            return;
        };
        // A pending unit attention outranks CDB errors (SAM-5 5.14): only INQUIRY, REPORT
        // LUNS and REQUEST SENSE get past it, whatever the rest of their CDB says.
        if !Command::opcode_passes_unit_attention(opcode) {
            if let Some(code) = lun.take_ua(task.nexus) {
                let r = lun.check(tag, Sense::unit_attention(code), 0);
                self.done.push_back(r);
                return;
            }
        }
        let cmd = match decoded {
            Ok(c) => c,
            Err(sense) => {
                let r = lun.check(tag, sense, 0);
                self.done.push_back(r);
                return;
            }
        };
        // A command that needs Data-Out announced as a read cannot get its data: refuse it.
        // The opposite (a READ flagged as a write, with Data-Out attached) is executed as
        // the read it is; the iSCSI layer reports the residual. libiscsi 1.19's
        // iSCSIResiduals.Read10Invalid expects GOOD for that case.
        let wrong_direction =
            task.direction == DataDirection::Read && cmd.has_data_out() && task.expected_len > 0;
        if wrong_direction {
            let r = lun.check(tag, Sense::illegal(asc::INVALID_FIELD_IN_COMMAND_IU), 0);
            self.done.push_back(r);
            return;
        }
        if lun.conflicts(task.nexus, &self.nexuses, &cmd) {
            self.done.push_back(response(
                tag,
                ScsiStatus::ReservationConflict,
                Vec::new(),
                None,
                0,
            ));
            return;
        }
        lun.execute(task, cmd, &self.nexuses);
    }

    fn no_such_lun(&self, tag: u64, opcode: u8, decoded: Result<Command, Sense>) -> ScsiResponse {
        let not_supported = Sense::illegal(asc::LUN_NOT_SUPPORTED);
        let fail = |s: Sense| response(tag, ScsiStatus::CheckCondition, s.encode(false), None, 0);
        let data = |mut v: Vec<u8>, alloc: u32| {
            v.truncate(alloc as usize);
            response(
                tag,
                ScsiStatus::Good,
                Vec::new(),
                Some(IoBuf::from_vec(v)),
                0,
            )
        };
        match decoded {
            Ok(Command::Inquiry {
                evpd: false,
                page: 0,
                alloc,
            }) => data(inquiry::no_lun(), alloc),
            Ok(Command::Inquiry { .. }) => fail(not_supported),
            // SPC-4 5.12: sense data reporting the missing LUN, with GOOD status.
            Ok(Command::RequestSense { desc, alloc }) => data(not_supported.encode(desc), alloc),
            Err(s) if matches!(opcode, 0x12 | 0xA0 | 0x03) => fail(s),
            _ => fail(not_supported),
        }
    }

    /// Drives block-device completions and moves finished responses into `out`.
    pub fn poll(&mut self, out: &mut Vec<ScsiResponse>) -> usize {
        let before = out.len();
        out.extend(self.done.drain(..));
        for l in self.luns.values_mut() {
            l.poll();
            out.append(&mut l.done);
        }
        if !self.retiring.is_empty() {
            self.poll_retiring(out);
        }
        if !self.acks.is_empty() && self.luns.values().all(|l| !l.aborting()) {
            out.append(&mut self.acks);
        }
        let n = out.len() - before;
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    fn poll_retiring(&mut self, out: &mut Vec<ScsiResponse>) {
        let mut i = 0;
        while i < self.retiring.len() {
            let l = &mut self.retiring[i].1;
            l.poll();
            out.append(&mut l.done);
            if l.idle() {
                let (n, mut l) = self.retiring.swap_remove(i);
                if let Err(e) = l.flush_blocking() {
                    log::error!("removed LUN {n}: flush failed: {e}");
                }
                self.released.push(l.into_bdev());
            } else {
                i += 1;
            }
        }
    }

    /// Whether any of its bdevs still has views of its medium out (see
    /// [`BlockDevice::views_out`]).
    pub fn views_out(&self) -> bool {
        self.luns
            .values()
            .chain(self.retiring.iter().map(|(_, l)| l))
            .any(|l| l.views_out())
    }

    /// Tasks submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the owner may sleep until a completion fd fires: no response is ready and
    /// every block device with requests in flight signals its completions.
    pub fn can_sleep(&self) -> bool {
        self.done.is_empty()
            && self.luns.values().all(|l| l.can_sleep())
            && self.retiring.iter().all(|(_, l)| l.can_sleep())
            && (self.acks.is_empty() || self.luns.values().any(|l| l.aborting()))
    }

    /// The completion fds of the block devices that have one.
    pub fn completion_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.luns
            .values()
            .chain(self.retiring.iter().map(|(_, l)| l))
            .filter_map(|l| l.completion_fd())
            .collect()
    }

    /// Clears every completion fd after one fired.
    pub fn ack_completions(&mut self) {
        for l in self.luns.values_mut() {
            l.ack_completion();
        }
        for (_, l) in self.retiring.iter_mut() {
            l.ack_completion();
        }
    }

    /// A new session (`nexus`) of the I_T nexus `it` starts using this device.
    pub fn nexus_added(&mut self, nexus: NexusId, it: ItNexus) {
        for l in self.luns.values_mut() {
            l.add_nexus(nexus, &it);
        }
        self.nexuses.insert(nexus, it);
    }

    /// A session is gone (closed or reinstated): drop its state but for persistent
    /// reservations.
    pub fn nexus_removed(&mut self, nexus: NexusId) {
        self.nexuses.remove(&nexus);
        for l in self.luns.values_mut() {
            l.remove_nexus(nexus);
        }
    }

    /// LOGICAL UNIT RESET issued by `by`: unit attentions, reservations released, mode
    /// parameters as the reset requires.
    pub fn lun_reset(&mut self, lun: u64, by: NexusId) {
        // SAM-5 6.3.3: every I_T nexus, the issuer included, gets the unit attention.
        let _ = by;
        if let Some(l) = self.luns.get_mut(&lun) {
            l.abort_tasks(|_| true);
            l.reset(asc::BUS_DEVICE_RESET, false);
        }
    }

    /// Answers `tag` with GOOD once every task a reset aborted has left the block devices:
    /// the acknowledgement of a reset (the issuing connection answers its TMF only then, so
    /// no aborted write reaches the medium after the initiator hears the reset is done).
    pub fn acknowledge(&mut self, tag: u64) {
        self.in_flight += 1;
        self.acks
            .push(response(tag, ScsiStatus::Good, Vec::new(), None, 0));
    }

    /// TARGET WARM RESET (`cold == false`) or TARGET COLD RESET issued by `by`.
    pub fn target_reset(&mut self, by: NexusId, cold: bool) {
        let _ = by;
        // 29h/00h for both kinds: initiators (libiscsi among them) treat POWER ON, RESET, OR
        // BUS DEVICE RESET OCCURRED as the benign after-reset attention and retry.
        let code = asc::POWER_ON_RESET;
        for l in self.luns.values_mut() {
            l.abort_tasks(|_| true);
            l.reset(code, cold);
        }
    }

    /// Changes a LUN's capacity and raises CAPACITY DATA HAS CHANGED for every nexus.
    pub fn resize_lun(&mut self, lun: u64, num_blocks: u64) -> Result<(), String> {
        let l = self
            .luns
            .get_mut(&lun)
            .ok_or_else(|| format!("no LUN {lun}"))?;
        l.resize(num_blocks).map_err(|e| e.to_string())
    }

    /// Flushes every block device synchronously (shutdown).
    pub fn flush_all(&mut self) {
        let retiring = self.retiring.iter_mut().map(|(n, l)| (&*n, l));
        for (n, l) in self.luns.iter_mut().chain(retiring) {
            if let Err(e) = l.flush_blocking() {
                log::error!("LUN {n}: flush failed: {e}");
            }
        }
    }
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests;
