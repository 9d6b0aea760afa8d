//! Block devices: asynchronous submit, completions polled by the owner.
//!
//! Nothing here blocks the I/O path: [`BlockDevice::submit`] only queues, and the reactor that
//! owns the device calls [`BlockDevice::poll`] to collect what finished. Buffers travel by value
//! inside the request and come back in the completion.
//!
//! Backends: [`malloc`] (RAM), [`file`] (regular file or block device), [`null`] (benchmarks).

pub mod file;
pub mod malloc;
pub mod null;

use crate::mem::IoBuf;
use std::fmt;

/// What a request asks of the device. Offsets and lengths are in blocks of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevOp {
    /// Fill the request's buffer (exactly `blocks * block_size` bytes) from `lba`.
    Read { lba: u64, blocks: u32 },
    /// Write the request's buffer (exactly `blocks * block_size` bytes) at `lba`;
    /// `fua`: the data is durable when the completion arrives.
    Write { lba: u64, blocks: u32, fua: bool },
    /// Make every completed write durable.
    Flush,
    /// Deallocate blocks; later reads of them return zeroes.
    Unmap { lba: u64, blocks: u64 },
    /// Write zeroes without a data buffer (may deallocate on thin devices).
    WriteZeroes { lba: u64, blocks: u64 },
}

/// One request: an opaque tag for the submitter, the operation, and its buffer when it has one.
#[derive(Debug)]
pub struct BdevIo {
    pub tag: u64,
    pub op: BdevOp,
    pub buf: Option<IoBuf>,
}

/// A finished request: the submitter's tag, the outcome, and the buffer handed back.
#[derive(Debug)]
pub struct BdevCompletion {
    pub tag: u64,
    pub result: Result<(), BdevError>,
    pub buf: Option<IoBuf>,
}

/// Errors of the block-device layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevError {
    /// The range lies (partly) beyond the end of the device.
    OutOfRange {
        lba: u64,
        blocks: u64,
        capacity: u64,
    },
    /// The buffer's length does not match the request's block count.
    BadBuffer { expected: usize, got: usize },
    /// The device cannot do this operation (e.g. unmap on a thick device).
    Unsupported(&'static str),
    /// Too many requests in flight; resubmit after the next poll.
    QueueFull,
    /// The backend reported an I/O error (errno).
    Io(i32),
    /// Bad construction parameters.
    Config(String),
}

impl fmt::Display for BdevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BdevError::OutOfRange {
                lba,
                blocks,
                capacity,
            } => write!(
                f,
                "blocks {lba}+{blocks} beyond the device's {capacity} blocks"
            ),
            BdevError::BadBuffer { expected, got } => {
                write!(f, "buffer of {got} bytes where {expected} were expected")
            }
            BdevError::Unsupported(what) => write!(f, "operation not supported: {what}"),
            BdevError::QueueFull => write!(f, "queue full"),
            BdevError::Io(errno) => {
                write!(
                    f,
                    "I/O error: {}",
                    std::io::Error::from_raw_os_error(*errno)
                )
            }
            BdevError::Config(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for BdevError {}

/// Provisioning state of a run of blocks (GET LBA STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbaState {
    Mapped,
    Deallocated,
}

/// A block device. Owned by one reactor; `Send` so it can be handed to that reactor.
pub trait BlockDevice: Send {
    /// The name the configuration gave it.
    fn name(&self) -> &str;
    /// Bytes per logical block (512 or 4096).
    fn block_size(&self) -> u32;
    /// Capacity in logical blocks.
    fn num_blocks(&self) -> u64;
    /// True when unmapped blocks are really deallocated (thin provisioning).
    fn thin_provisioned(&self) -> bool;
    /// Queue a request. On error the request was not queued and its buffer is handed back.
    fn submit(&mut self, io: BdevIo) -> Result<(), (BdevError, BdevIo)>;
    /// Move finished requests into `out`; returns how many were added.
    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize;
    /// Requests submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
    /// The state of the run of blocks starting at `lba` and how many blocks it spans
    /// (at least 1). `lba` must be below `num_blocks()`.
    fn lba_status(&self, lba: u64) -> (LbaState, u64);
    /// Change the capacity (LUN resize). Backends that cannot grow return `Unsupported`.
    fn resize(&mut self, num_blocks: u64) -> Result<(), BdevError>;
    /// Make everything written so far durable, synchronously. Used at shutdown only.
    fn flush_blocking(&mut self) -> Result<(), BdevError>;
}

/// Checks a block range against a capacity without overflow.
pub fn check_range(lba: u64, blocks: u64, capacity: u64) -> Result<(), BdevError> {
    match lba.checked_add(blocks) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(BdevError::OutOfRange {
            lba,
            blocks,
            capacity,
        }),
    }
}
