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

// The implementation modules are private to the layer; the types below are its surface.

use crate::bdev::BlockDevice;
use crate::mem::IoBuf;

/// Identifies one I_T nexus (initiator port × target port), i.e. one iSCSI session.
pub type NexusId = u64;

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
    /// Target portal group tag of the port the LUN is reached through.
    pub portal_group_tag: u16,
    /// Relative target port identifier (VPD 0x83).
    pub relative_port: u16,
}

/// The logical units of one target node and the state they share (unit attentions per
/// I_T nexus, reservations).
pub struct Device {
    // Filled in by the implementation.
}

impl Device {
    /// A device with no logical units.
    pub fn new() -> Self {
        unimplemented!()
    }

    /// Adds logical unit `lun` backed by `bdev`. Errors when the number is taken.
    pub fn add_lun(
        &mut self,
        lun: u64,
        bdev: Box<dyn BlockDevice>,
        identity: LunIdentity,
    ) -> Result<(), String> {
        let _ = (lun, bdev, identity);
        unimplemented!()
    }

    /// LUN numbers in ascending order.
    pub fn luns(&self) -> Vec<u64> {
        unimplemented!()
    }

    /// Queue a command. Its response appears in a later [`Device::poll`].
    pub fn submit(&mut self, task: ScsiTask) {
        let _ = task;
        unimplemented!()
    }

    /// Drives block-device completions and moves finished responses into `out`.
    pub fn poll(&mut self, out: &mut Vec<ScsiResponse>) -> usize {
        let _ = out;
        unimplemented!()
    }

    /// Tasks submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        unimplemented!()
    }

    /// A new I_T nexus (session) starts using this device.
    pub fn nexus_added(&mut self, nexus: NexusId) {
        let _ = nexus;
        unimplemented!()
    }

    /// An I_T nexus is gone (session closed or reinstated): drop its state.
    pub fn nexus_removed(&mut self, nexus: NexusId) {
        let _ = nexus;
        unimplemented!()
    }

    /// LOGICAL UNIT RESET issued by `by`: unit attentions, reservations released, mode
    /// parameters as the reset requires.
    pub fn lun_reset(&mut self, lun: u64, by: NexusId) {
        let _ = (lun, by);
        unimplemented!()
    }

    /// TARGET WARM RESET (`cold == false`) or TARGET COLD RESET issued by `by`.
    pub fn target_reset(&mut self, by: NexusId, cold: bool) {
        let _ = (by, cold);
        unimplemented!()
    }

    /// Changes a LUN's capacity and raises CAPACITY DATA HAS CHANGED for every nexus.
    pub fn resize_lun(&mut self, lun: u64, num_blocks: u64) -> Result<(), String> {
        let _ = (lun, num_blocks);
        unimplemented!()
    }

    /// Flushes every block device synchronously (shutdown).
    pub fn flush_all(&mut self) {
        unimplemented!()
    }
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}
