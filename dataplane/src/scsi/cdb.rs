//! CDB decoding: the table of supported operation codes (also the source of REPORT
//! SUPPORTED OPERATION CODES usage data) and the typed commands the LUN executes.

use super::pr::Access;
use super::sense::{asc, Sense};

/// One supported command: its CDB usage bitmap validates incoming CDBs and is what REPORT
/// SUPPORTED OPERATION CODES reports, so the two can never disagree.
pub struct OpInfo {
    pub opcode: u8,
    pub service_action: Option<u16>,
    pub usage: &'static [u8],
}

macro_rules! op {
    // The name only documents the table row.
    ($name:expr, $op:expr, $sa:expr, [$($b:expr),* $(,)?]) => {
        OpInfo { opcode: $op, service_action: $sa, usage: &[$($b),*] }
    };
}

const F: u8 = 0xFF;
const CTL: u8 = 0x07;

/// Every operation code the emulation implements, in opcode order.
pub static OPS: &[OpInfo] = &[
    op!("TEST UNIT READY", 0x00, None, [0x00, 0, 0, 0, 0, CTL]),
    op!("REQUEST SENSE", 0x03, None, [0x03, 0x01, 0, 0, F, CTL]),
    op!("READ(6)", 0x08, None, [0x08, 0x1F, F, F, F, CTL]),
    op!("WRITE(6)", 0x0A, None, [0x0A, 0x1F, F, F, F, CTL]),
    op!("INQUIRY", 0x12, None, [0x12, 0x01, F, F, F, CTL]),
    op!("MODE SELECT(6)", 0x15, None, [0x15, 0x11, 0, 0, F, CTL]),
    op!("RESERVE(6)", 0x16, None, [0x16, 0, 0, 0, 0, CTL]),
    op!("RELEASE(6)", 0x17, None, [0x17, 0, 0, 0, 0, CTL]),
    op!("MODE SENSE(6)", 0x1A, None, [0x1A, 0x08, F, F, F, CTL]),
    op!(
        "START STOP UNIT",
        0x1B,
        None,
        [0x1B, 0x01, 0, 0x0F, 0xF7, CTL]
    ),
    op!(
        "PREVENT ALLOW MEDIUM REMOVAL",
        0x1E,
        None,
        [0x1E, 0, 0, 0, 0x03, CTL]
    ),
    op!(
        "READ CAPACITY(10)",
        0x25,
        None,
        [0x25, 0, F, F, F, F, 0, 0, 0x01, CTL]
    ),
    op!(
        "READ(10)",
        0x28,
        None,
        [0x28, 0xFE, F, F, F, F, 0x3F, F, F, CTL]
    ),
    op!(
        "WRITE(10)",
        0x2A,
        None,
        [0x2A, 0xFA, F, F, F, F, 0x3F, F, F, CTL]
    ),
    op!(
        "WRITE AND VERIFY(10)",
        0x2E,
        None,
        [0x2E, 0xF6, F, F, F, F, 0x3F, F, F, CTL]
    ),
    op!(
        "VERIFY(10)",
        0x2F,
        None,
        [0x2F, 0xF6, F, F, F, F, 0x3F, F, F, CTL]
    ),
    op!(
        "PRE-FETCH(10)",
        0x34,
        None,
        [0x34, 0x02, F, F, F, F, 0x3F, F, F, CTL]
    ),
    op!(
        "SYNCHRONIZE CACHE(10)",
        0x35,
        None,
        [0x35, 0x06, F, F, F, F, 0x3F, F, F, CTL]
    ),
    op!(
        "READ DEFECT DATA(10)",
        0x37,
        None,
        [0x37, 0, 0x1F, 0, 0, 0, 0, F, F, CTL]
    ),
    op!(
        "WRITE SAME(10)",
        0x41,
        None,
        [0x41, 0xF8, F, F, F, F, 0x3F, F, F, CTL]
    ),
    op!(
        "UNMAP",
        0x42,
        None,
        [0x42, 0x01, 0, 0, 0, 0, 0x3F, F, F, CTL]
    ),
    op!(
        "MODE SELECT(10)",
        0x55,
        None,
        [0x55, 0x11, 0, 0, 0, 0, 0, F, F, CTL]
    ),
    op!(
        "MODE SENSE(10)",
        0x5A,
        None,
        [0x5A, 0x18, F, F, 0, 0, 0, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE IN / READ KEYS",
        0x5E,
        Some(0),
        [0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE IN / READ RESERVATION",
        0x5E,
        Some(1),
        [0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE IN / REPORT CAPABILITIES",
        0x5E,
        Some(2),
        [0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE IN / READ FULL STATUS",
        0x5E,
        Some(3),
        [0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / REGISTER",
        0x5F,
        Some(0),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / RESERVE",
        0x5F,
        Some(1),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / RELEASE",
        0x5F,
        Some(2),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / CLEAR",
        0x5F,
        Some(3),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / PREEMPT",
        0x5F,
        Some(4),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / PREEMPT AND ABORT",
        0x5F,
        Some(5),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY",
        0x5F,
        Some(6),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "PERSISTENT RESERVE OUT / REGISTER AND MOVE",
        0x5F,
        Some(7),
        [0x5F, 0x1F, F, 0, 0, F, F, F, F, CTL]
    ),
    op!(
        "READ(16)",
        0x88,
        None,
        [0x88, 0xFE, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "COMPARE AND WRITE",
        0x89,
        None,
        [0x89, 0xFA, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0x3F, CTL]
    ),
    op!(
        "WRITE(16)",
        0x8A,
        None,
        [0x8A, 0xFA, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "ORWRITE(16)",
        0x8B,
        None,
        [0x8B, 0xFA, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "WRITE AND VERIFY(16)",
        0x8E,
        None,
        [0x8E, 0xF6, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "VERIFY(16)",
        0x8F,
        None,
        [0x8F, 0xF6, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "PRE-FETCH(16)",
        0x90,
        None,
        [0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "SYNCHRONIZE CACHE(16)",
        0x91,
        None,
        [0x91, 0x06, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "WRITE SAME(16)",
        0x93,
        None,
        [0x93, 0xF9, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "WRITE ATOMIC(16)",
        0x9C,
        None,
        [0x9C, 0xFA, F, F, F, F, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "READ CAPACITY(16)",
        0x9E,
        Some(0x10),
        [0x9E, 0x1F, F, F, F, F, F, F, F, F, F, F, F, F, 0x01, CTL]
    ),
    op!(
        "GET LBA STATUS",
        0x9E,
        Some(0x12),
        [0x9E, 0x1F, F, F, F, F, F, F, F, F, F, F, F, F, 0, CTL]
    ),
    op!(
        "REPORT LUNS",
        0xA0,
        None,
        [0xA0, 0, F, 0, 0, 0, F, F, F, F, 0, CTL]
    ),
    op!(
        "REPORT TARGET PORT GROUPS",
        0xA3,
        Some(0x0A),
        [0xA3, 0xFF, 0, 0, 0, 0, F, F, F, F, 0, CTL]
    ),
    op!(
        "REPORT SUPPORTED OPERATION CODES",
        0xA3,
        Some(0x0C),
        [0xA3, 0x1F, 0x87, F, F, F, F, F, F, F, 0, CTL]
    ),
    op!(
        "READ(12)",
        0xA8,
        None,
        [0xA8, 0xFE, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "WRITE(12)",
        0xAA,
        None,
        [0xAA, 0xFA, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "WRITE AND VERIFY(12)",
        0xAE,
        None,
        [0xAE, 0xF6, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "VERIFY(12)",
        0xAF,
        None,
        [0xAF, 0xF6, F, F, F, F, F, F, F, F, 0x3F, CTL]
    ),
    op!(
        "READ DEFECT DATA(12)",
        0xB7,
        None,
        [0xB7, 0x1F, 0, 0, 0, 0, F, F, F, F, 0, CTL]
    ),
];

/// Operation codes whose byte 1 carries a service action in its low five bits.
pub fn has_service_action(opcode: u8) -> bool {
    matches!(opcode, 0x5E | 0x5F | 0x9E | 0xA3)
}

/// Looks a CDB's operation up in [`OPS`].
pub fn lookup(opcode: u8, sa: Option<u16>) -> Option<&'static OpInfo> {
    OPS.iter()
        .find(|o| o.opcode == opcode && (o.service_action.is_none() || o.service_action == sa))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModePc {
    Current,
    Changeable,
    Default,
    Saved,
}

/// How VERIFY compares (BYTCHK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteCheck {
    None,
    Full,
    /// One block of Data-Out compared against every block of the range.
    OneBlock,
}

/// A decoded command. Block counts are as the CDB gives them (READ(6) 0 already mapped to 256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: ModePc,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        len: u32,
    },
    Reserve6,
    Release6,
    StartStop {
        start: bool,
        loej: bool,
        power_condition: u8,
    },
    PreventAllow {
        prevent: u8,
    },
    ReadCapacity10 {
        pmi: bool,
        lba: u32,
    },
    ReadCapacity16 {
        alloc: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    PrIn {
        sa: u8,
        alloc: u32,
    },
    ReadDefectData {
        twelve: bool,
        lists: u8,
        alloc: u32,
    },
    PrOut {
        sa: u8,
        scope_type: u8,
        len: u32,
    },
    ReportTargetPortGroups {
        /// PARAMETER DATA FORMAT 001b: the extended header.
        extended: bool,
        alloc: u32,
    },
    ReportOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    WriteVerify {
        lba: u64,
        blocks: u32,
        bytchk: bool,
    },
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: ByteCheck,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        fua: bool,
    },
    OrWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
}

impl Command {
    /// True for the operation codes a pending unit attention does not block (SAM-5 5.14).
    pub fn opcode_passes_unit_attention(opcode: u8) -> bool {
        matches!(opcode, 0x12 | 0xA0 | 0x03)
    }

    /// True when the command takes Data-Out from the initiator.
    pub fn has_data_out(&self) -> bool {
        match self {
            Command::Verify { bytchk, .. } => *bytchk != ByteCheck::None,
            Command::WriteSame { ndob, .. } => !ndob,
            Command::Write { .. }
            | Command::WriteVerify { .. }
            | Command::Unmap { .. }
            | Command::CompareAndWrite { .. }
            | Command::OrWrite { .. }
            | Command::ModeSelect { .. }
            | Command::PrOut { .. } => true,
            _ => false,
        }
    }

    /// True for commands that modify the medium (refused while write protected).
    pub fn writes_medium(&self) -> bool {
        matches!(
            self,
            Command::Write { .. }
                | Command::WriteVerify { .. }
                | Command::WriteSame { .. }
                | Command::Unmap { .. }
                | Command::CompareAndWrite { .. }
                | Command::OrWrite { .. }
        )
    }

    /// True for commands allowed from a nexus that does not hold an SPC-2 reservation
    /// held by another nexus (SPC-2 table 12; RELEASE is then a no-op).
    pub fn passes_reservation(&self) -> bool {
        matches!(
            self,
            Command::Inquiry { .. }
                | Command::ReportLuns { .. }
                | Command::RequestSense { .. }
                | Command::Release6
                | Command::PreventAllow { prevent: 0 }
                | Command::ReportOpcodes { .. }
                | Command::ReportTargetPortGroups { .. }
                | Command::PrIn { .. }
        )
    }

    /// The command's class under a persistent reservation (SPC-4 table 49).
    pub fn access(&self) -> Access {
        match self {
            Command::Inquiry { .. }
            | Command::ReportLuns { .. }
            | Command::RequestSense { .. }
            | Command::TestUnitReady
            | Command::ReadCapacity10 { .. }
            | Command::ReadCapacity16 { .. }
            | Command::ReportOpcodes { .. }
            | Command::ReportTargetPortGroups { .. }
            | Command::PrIn { .. }
            | Command::PrOut { .. }
            | Command::Reserve6
            | Command::Release6
            | Command::PreventAllow { prevent: 0 } => Access::Always,
            Command::Read { .. }
            | Command::Verify { .. }
            | Command::PreFetch { .. }
            | Command::GetLbaStatus { .. }
            | Command::ReadDefectData { .. }
            | Command::ModeSense { .. } => Access::Read,
            _ => Access::Write,
        }
    }
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

fn be32(b: &[u8]) -> u32 {
    b.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x))
}

/// Decodes and validates a CDB against the opcode table.
pub fn decode(cdb: &[u8]) -> Result<Command, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::illegal(asc::INVALID_COMMAND_OPCODE));
    };
    let sa = if has_service_action(opcode) {
        cdb.get(1).map(|b| u16::from(b & 0x1F))
    } else {
        None
    };
    let Some(info) = lookup(opcode, sa) else {
        if has_service_action(opcode) && OPS.iter().any(|o| o.opcode == opcode) {
            return Err(Sense::invalid_cdb(1, Some(4)));
        }
        return Err(Sense::illegal(asc::INVALID_COMMAND_OPCODE));
    };
    let n = info.usage.len();
    if cdb.len() < n {
        return Err(Sense::invalid_cdb(cdb.len(), None));
    }
    // Reserved bits must be zero; the control byte is left alone (NACA/LINK are not used
    // by iSCSI initiators and rejecting them helps nobody).
    for (i, (&b, &u)) in cdb.iter().zip(info.usage).enumerate().take(n - 1).skip(1) {
        let bad = b & !u;
        if bad != 0 {
            return Err(Sense::invalid_cdb(i, Some(7 - bad.leading_zeros() as u8)));
        }
    }
    let c = cdb;
    let protect = |byte1: u8| -> Result<(), Sense> {
        if byte1 & 0xE0 != 0 {
            Err(Sense::invalid_cdb(1, Some(7)))
        } else {
            Ok(())
        }
    };
    let fua = c.get(1).is_some_and(|b| b & 0x08 != 0);
    let bytchk = |b: u8| -> Result<ByteCheck, Sense> {
        match (b >> 1) & 3 {
            0 => Ok(ByteCheck::None),
            1 => Ok(ByteCheck::Full),
            3 => Ok(ByteCheck::OneBlock),
            _ => Err(Sense::invalid_cdb(1, Some(2))),
        }
    };
    let cmd = match opcode {
        0x00 => Command::TestUnitReady,
        0x03 => Command::RequestSense {
            desc: c[1] & 1 != 0,
            alloc: u32::from(c[4]),
        },
        0x08 | 0x0A => {
            let lba = be(&c[1..4]) & 0x1F_FFFF;
            let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
            if opcode == 0x08 {
                Command::Read { lba, blocks }
            } else {
                Command::Write {
                    lba,
                    blocks,
                    fua: false,
                }
            }
        }
        0x12 => Command::Inquiry {
            evpd: c[1] & 1 != 0,
            page: c[2],
            alloc: be32(&c[3..5]),
        },
        0x15 | 0x55 => Command::ModeSelect {
            ten: opcode == 0x55,
            pf: c[1] & 0x10 != 0,
            sp: c[1] & 0x01 != 0,
            len: if opcode == 0x15 {
                u32::from(c[4])
            } else {
                be32(&c[7..9])
            },
        },
        0x16 => Command::Reserve6,
        0x17 => Command::Release6,
        0x1A | 0x5A => {
            let pc = match c[2] >> 6 {
                0 => ModePc::Current,
                1 => ModePc::Changeable,
                2 => ModePc::Default,
                _ => ModePc::Saved,
            };
            Command::ModeSense {
                ten: opcode == 0x5A,
                dbd: c[1] & 0x08 != 0,
                llbaa: opcode == 0x5A && c[1] & 0x10 != 0,
                pc,
                page: c[2] & 0x3F,
                subpage: c[3],
                alloc: if opcode == 0x1A {
                    u32::from(c[4])
                } else {
                    be32(&c[7..9])
                },
            }
        }
        0x1B => Command::StartStop {
            start: c[4] & 1 != 0,
            loej: c[4] & 2 != 0,
            power_condition: c[4] >> 4,
        },
        0x1E => Command::PreventAllow { prevent: c[4] & 3 },
        0x25 => {
            let pmi = c[8] & 1 != 0;
            let lba = be32(&c[2..6]);
            if !pmi && lba != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Command::ReadCapacity10 { pmi, lba }
        }
        0x28 | 0xA8 | 0x88 => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c, opcode);
            Command::Read { lba, blocks }
        }
        0x2A | 0xAA | 0x8A => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c, opcode);
            Command::Write { lba, blocks, fua }
        }
        0x9C => {
            protect(c[1])?;
            // We advertise a maximum atomic boundary size of 0: boundaries are refused.
            if be32(&c[10..12]) != 0 {
                return Err(Sense::invalid_cdb(10, None));
            }
            // Every write holds the LUN's range lock while it runs, so a write of up to the
            // maximum transfer length is already atomic with respect to other commands.
            Command::Write {
                lba: be(&c[2..10]),
                blocks: be32(&c[12..14]),
                fua,
            }
        }
        0x2E | 0xAE | 0x8E => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c, opcode);
            let bytchk = match bytchk(c[1])? {
                ByteCheck::None => false,
                ByteCheck::Full => true,
                ByteCheck::OneBlock => return Err(Sense::invalid_cdb(1, Some(2))),
            };
            Command::WriteVerify {
                lba,
                blocks,
                bytchk,
            }
        }
        0x2F | 0xAF | 0x8F => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c, opcode);
            Command::Verify {
                lba,
                blocks,
                bytchk: bytchk(c[1])?,
            }
        }
        0x34 | 0x90 => {
            let (lba, blocks) = lba_len(c, opcode);
            Command::PreFetch { lba, blocks }
        }
        0x35 | 0x91 => {
            let (lba, blocks) = lba_len(c, opcode);
            Command::SyncCache { lba, blocks }
        }
        0x41 | 0x93 => {
            protect(c[1])?;
            if c[1] & 0x10 != 0 {
                // ANCHOR needs ANC_SUP, which we do not claim.
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            let (lba, blocks) = lba_len(c, opcode);
            Command::WriteSame {
                lba,
                blocks,
                unmap: c[1] & 0x08 != 0,
                ndob: opcode == 0x93 && c[1] & 0x01 != 0,
            }
        }
        0x42 => {
            if c[1] & 1 != 0 {
                return Err(Sense::invalid_cdb(1, Some(0)));
            }
            Command::Unmap {
                len: be32(&c[7..9]),
            }
        }
        0x89 => {
            protect(c[1])?;
            Command::CompareAndWrite {
                lba: be(&c[2..10]),
                blocks: c[13],
                fua,
            }
        }
        0x8B => {
            protect(c[1])?;
            let (lba, blocks) = lba_len(c, opcode);
            Command::OrWrite { lba, blocks, fua }
        }
        0x37 => Command::ReadDefectData {
            twelve: false,
            lists: c[2] & 0x1F,
            alloc: be32(&c[7..9]),
        },
        0xB7 => Command::ReadDefectData {
            twelve: true,
            lists: c[1] & 0x1F,
            alloc: be32(&c[6..10]),
        },
        0x5E => Command::PrIn {
            sa: c[1] & 0x1F,
            alloc: be32(&c[7..9]),
        },
        0x5F => Command::PrOut {
            sa: c[1] & 0x1F,
            scope_type: c[2],
            len: be32(&c[5..9]),
        },
        0x9E if sa == Some(0x10) => Command::ReadCapacity16 {
            alloc: be32(&c[10..14]),
        },
        0x9E => Command::GetLbaStatus {
            lba: be(&c[2..10]),
            alloc: be32(&c[10..14]),
        },
        0xA0 => Command::ReportLuns {
            select: c[2],
            alloc: be32(&c[6..10]),
        },
        0xA3 if sa == Some(0x0A) => {
            let format = c[1] >> 5;
            if format > 1 {
                return Err(Sense::invalid_cdb(1, Some(7)));
            }
            Command::ReportTargetPortGroups {
                extended: format == 1,
                alloc: be32(&c[6..10]),
            }
        }
        0xA3 => Command::ReportOpcodes {
            rctd: c[2] & 0x80 != 0,
            options: c[2] & 0x07,
            opcode: c[3],
            sa: u16::from_be_bytes([c[4], c[5]]),
            alloc: be32(&c[6..10]),
        },
        _ => return Err(Sense::illegal(asc::INVALID_COMMAND_OPCODE)),
    };
    Ok(cmd)
}

/// LBA and transfer length of the 10/12/16-byte block command layouts.
fn lba_len(c: &[u8], opcode: u8) -> (u64, u32) {
    match opcode >> 5 {
        // Group 1/2: 10-byte CDBs.
        1 | 2 => (be(&c[2..6]), be32(&c[7..9])),
        // Group 5: 12-byte CDBs.
        5 => (be(&c[2..6]), be32(&c[6..10])),
        // Group 4: 16-byte CDBs.
        _ => (be(&c[2..10]), be32(&c[10..14])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read10_fields() {
        let cdb = [0x28, 0x08, 0, 0, 1, 0, 0, 0, 8, 0];
        assert_eq!(
            decode(&cdb),
            Ok(Command::Read {
                lba: 256,
                blocks: 8
            })
        );
    }

    #[test]
    fn read6_zero_means_256() {
        let cdb = [0x08, 0x01, 0x02, 0x03, 0, 0];
        assert_eq!(
            decode(&cdb),
            Ok(Command::Read {
                lba: 0x010203,
                blocks: 256
            })
        );
    }

    #[test]
    fn write16_fua() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8A;
        cdb[1] = 0x08;
        cdb[9] = 5;
        cdb[13] = 2;
        assert_eq!(
            decode(&cdb),
            Ok(Command::Write {
                lba: 5,
                blocks: 2,
                fua: true
            })
        );
    }

    #[test]
    fn rdprotect_rejected_with_pointer() {
        let cdb = [0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0];
        let e = decode(&cdb).unwrap_err();
        assert_eq!(e, Sense::invalid_cdb(1, Some(7)));
    }

    #[test]
    fn reserved_bit_rejected() {
        let cdb = [0x00, 0, 0, 0x10, 0, 0];
        assert_eq!(decode(&cdb).unwrap_err(), Sense::invalid_cdb(3, Some(4)));
    }

    #[test]
    fn unknown_opcode() {
        let e = decode(&[0xC7, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e, Sense::illegal(asc::INVALID_COMMAND_OPCODE));
        let e = decode(&[0x9E, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e, Sense::invalid_cdb(1, Some(4)));
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn short_cdb_rejected() {
        assert!(decode(&[0x28, 0, 0]).is_err());
    }

    #[test]
    fn verify_bytchk_values() {
        let mut cdb = [0x2F, 0x02, 0, 0, 0, 0, 0, 0, 1, 0];
        assert!(matches!(
            decode(&cdb),
            Ok(Command::Verify {
                bytchk: ByteCheck::Full,
                ..
            })
        ));
        cdb[1] = 0x04;
        assert!(decode(&cdb).is_err());
        cdb[1] = 0x06;
        assert!(matches!(
            decode(&cdb),
            Ok(Command::Verify {
                bytchk: ByteCheck::OneBlock,
                ..
            })
        ));
    }

    #[test]
    fn usage_tables_are_consistent() {
        for o in OPS {
            assert_eq!(o.usage[0], o.opcode);
            assert!(matches!(o.usage.len(), 6 | 10 | 12 | 16));
            assert_eq!(o.service_action.is_some(), has_service_action(o.opcode));
        }
    }
}
