//! Block devices: asynchronous submit, completions polled by the owner.
//!
//! Nothing here blocks the I/O path: [`BlockDevice::submit`] only queues, and the reactor that
//! owns the device calls [`BlockDevice::poll`] to collect what finished. Buffers travel by value
//! inside the request and come back in the completion.
//!
//! Backends: [`malloc`] (RAM), [`file`](mod@file) (regular file or block device), [`null`] (benchmarks).

mod backing;
pub mod file;
pub mod malloc;
pub mod null;
pub mod uring;

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
    /// A file descriptor that becomes readable when completions are ready, for devices
    /// whose I/O finishes elsewhere (the kernel): the owner may then sleep in epoll while
    /// requests are in flight. None: the owner must keep polling while `in_flight() > 0`.
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Clears the completion fd's readiness after it fired.
    fn ack_completion(&mut self) {}

    /// Whether reads handed out views of the medium that are still alive (queued for
    /// sending somewhere): the device must not move to another thread until they are gone.
    fn views_out(&self) -> bool {
        false
    }
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

/// Checks construction parameters: the block size is 512 or 4096 and `size_bytes` a positive
/// multiple of it. Returns the capacity in blocks.
pub fn check_geometry(block_size: u32, size_bytes: u64) -> Result<u64, BdevError> {
    if block_size != 512 && block_size != 4096 {
        return Err(BdevError::Config(format!(
            "block size {block_size} is not 512 or 4096"
        )));
    }
    // The block size is a power of two: the low bits are the remainder.
    if size_bytes == 0 || size_bytes & (u64::from(block_size) - 1) != 0 {
        return Err(BdevError::Config(format!(
            "size {size_bytes} is not a positive multiple of the block size {block_size}"
        )));
    }
    Ok(size_bytes / u64::from(block_size))
}

/// The byte length of `blocks` blocks, or `None` when it does not fit in memory sizes.
pub fn byte_len(blocks: u64, block_size: u32) -> Option<usize> {
    blocks
        .checked_mul(u64::from(block_size))
        .and_then(|n| usize::try_from(n).ok())
}

/// Checks that a request carries the buffer its operation needs, of the right length.
/// Reads and writes need exactly `blocks * block_size` bytes; other operations take none
/// (a buffer given anyway is handed back untouched).
pub fn check_buffer(io: &BdevIo, block_size: u32) -> Result<(), BdevError> {
    let blocks = match io.op {
        BdevOp::Read { blocks, .. } | BdevOp::Write { blocks, .. } => blocks,
        _ => return Ok(()),
    };
    let got = io.buf.as_ref().map_or(0, IoBuf::len);
    match byte_len(u64::from(blocks), block_size) {
        Some(expected) if expected == got && io.buf.is_some() => Ok(()),
        Some(expected) => Err(BdevError::BadBuffer { expected, got }),
        None => Err(BdevError::BadBuffer {
            expected: usize::MAX,
            got,
        }),
    }
}

/// The block range an operation touches, for range checks (`None` for flush).
pub fn op_range(op: &BdevOp) -> Option<(u64, u64)> {
    match *op {
        BdevOp::Read { lba, blocks } | BdevOp::Write { lba, blocks, .. } => {
            Some((lba, u64::from(blocks)))
        }
        BdevOp::Unmap { lba, blocks } | BdevOp::WriteZeroes { lba, blocks } => Some((lba, blocks)),
        BdevOp::Flush => None,
    }
}

/// Range check of a whole request against a capacity.
pub fn check_op_range(op: &BdevOp, capacity: u64) -> Result<(), BdevError> {
    match op_range(op) {
        Some((lba, blocks)) => check_range(lba, blocks, capacity),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert_eq!(check_geometry(512, 4096), Ok(8));
        assert_eq!(check_geometry(4096, 4096), Ok(1));
        assert!(matches!(
            check_geometry(1024, 4096),
            Err(BdevError::Config(_))
        ));
        assert!(matches!(check_geometry(512, 0), Err(BdevError::Config(_))));
        assert!(matches!(
            check_geometry(512, 513),
            Err(BdevError::Config(_))
        ));
    }

    #[test]
    fn ranges_and_buffers() {
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
        assert!(check_range(6, 2, 8).is_ok());
        assert!(check_range(7, 2, 8).is_err());
        let io = BdevIo {
            tag: 1,
            op: BdevOp::Read { lba: 0, blocks: 2 },
            buf: Some(IoBuf::zeroed(1024)),
        };
        assert!(check_buffer(&io, 512).is_ok());
        assert_eq!(
            check_buffer(&io, 4096),
            Err(BdevError::BadBuffer {
                expected: 8192,
                got: 1024
            })
        );
        let io = BdevIo {
            tag: 1,
            op: BdevOp::Write {
                lba: 0,
                blocks: 1,
                fua: false,
            },
            buf: None,
        };
        assert_eq!(
            check_buffer(&io, 512),
            Err(BdevError::BadBuffer {
                expected: 512,
                got: 0
            })
        );
    }
}
