//! What the file backends ([`super::file`] and [`super::uring`]) share about their backing: a
//! regular file or a host block device. Opening it (inspecting the path, creating a missing
//! regular file, never truncating), sizing it, and the synchronous system calls both make on
//! it (`SEEK_DATA`/`SEEK_HOLE` for `lba_status`, `set_len` for `resize`, `fsync`).

use super::{byte_len, check_geometry, BdevError, LbaState};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: u64 = 0x8008_1272;

/// The errno of the last failed system call (`EIO` when there is none).
pub(super) fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The errno of an I/O error (`EIO` when it has none).
pub(super) fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The configuration error "`name`: `what` `path`: `e`".
pub(super) fn config_err(name: &str, path: &Path, what: &str, e: std::io::Error) -> BdevError {
    BdevError::Config(format!("{name}: {what} {}: {e}", path.display()))
}

/// The size of a block device in bytes (`BLKGETSIZE64`).
pub(super) fn blk_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`, alive
    // for the call; the descriptor belongs to `file`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// A backing file just opened by [`open`].
#[derive(Debug)]
pub(super) struct Opened {
    pub file: File,
    /// A host block device rather than a regular file.
    pub is_block_device: bool,
    /// The regular file did not exist and this open created it.
    pub created: bool,
}

/// Opens `path` read-write: a block device, or a regular file, created when missing (which
/// needs a `size`) and never truncated. Anything else is refused.
pub(super) fn open(name: &str, path: &Path, size: Option<u64>) -> Result<Opened, BdevError> {
    let mut created = false;
    let is_block_device = match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => true,
        Ok(m) if m.is_file() => false,
        Ok(_) => {
            return Err(BdevError::Config(format!(
                "{name}: {} is neither a regular file nor a block device",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if size.is_none() {
                return Err(BdevError::Config(format!(
                    "{name}: {} does not exist and no size was given to create it",
                    path.display()
                )));
            }
            created = true;
            false
        }
        Err(e) => return Err(config_err(name, path, "cannot inspect", e)),
    };
    // A failed open created nothing.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!is_block_device)
        .truncate(false)
        .open(path)
        .map_err(|e| config_err(name, path, "cannot open", e))?;
    Ok(Opened {
        file,
        is_block_device,
        created,
    })
}

/// Sizes an opened backing and returns its number of blocks.
///
/// Regular files: `size` given extends a shorter file to it (a longer file is left as it is
/// and only its first `size` bytes are used); `None` uses the current length. Block devices:
/// the device's size (without a tail shorter than a block), or `size` when given and not
/// larger. The size must be a non-zero multiple of `block_size`.
pub(super) fn size_blocks(
    name: &str,
    path: &Path,
    opened: &Opened,
    block_size: u32,
    size: Option<u64>,
) -> Result<u64, BdevError> {
    let err = |what: &str, e: std::io::Error| config_err(name, path, what, e);
    let file = &opened.file;
    let size = if opened.is_block_device {
        let dev_size = blk_size(file).map_err(|e| err("cannot get the size of", e))?;
        match size {
            Some(s) if s > dev_size => {
                return Err(BdevError::Config(format!(
                    "{name}: size {s} larger than the device's {dev_size} bytes"
                )))
            }
            Some(s) => s,
            // A device whose size is not a multiple of the block size: ignore the tail.
            None => dev_size - dev_size % u64::from(block_size),
        }
    } else {
        match size {
            Some(s) => {
                check_geometry(block_size, s)?;
                let current = file.metadata().map_err(|e| err("cannot inspect", e))?.len();
                // Grow a shorter file; never truncate a longer one (its tail is data).
                if current < s {
                    file.set_len(s).map_err(|e| err("cannot size", e))?;
                }
                s
            }
            None => file.metadata().map_err(|e| err("cannot inspect", e))?.len(),
        }
    };
    check_geometry(block_size, size)
        .map_err(|e| BdevError::Config(format!("{name} ({}): {e}", path.display())))
}

/// Byte offset of the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) at or after `off`,
/// or the errno (`ENXIO`: none before the end of the file).
pub(super) fn seek(file: &File, off: u64, whence: libc::c_int) -> Result<u64, i32> {
    let off = libc::off_t::try_from(off).map_err(|_| libc::EOVERFLOW)?;
    // SAFETY: lseek takes integers only. The file position it moves is never used: all
    // I/O carries explicit offsets.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    u64::try_from(r).map_err(|_| last_errno())
}

/// GET LBA STATUS for a backing of `num_blocks` blocks: the state of block `lba` and how many
/// blocks from it share that state. Block devices report every block as mapped; regular files
/// report the holes `SEEK_DATA`/`SEEK_HOLE` find.
pub(super) fn lba_status(
    file: &File,
    is_block_device: bool,
    block_size: u32,
    num_blocks: u64,
    lba: u64,
) -> (LbaState, u64) {
    let left = num_blocks.saturating_sub(lba).max(1);
    if is_block_device {
        return (LbaState::Mapped, left);
    }
    let bs = u64::from(block_size);
    let Some(off) = byte_len(lba, block_size).map(|o| o as u64) else {
        return (LbaState::Mapped, left);
    };
    match seek(file, off, libc::SEEK_DATA) {
        // Data starts at `off`: mapped until the next hole. A block that holds any data
        // counts as mapped, so round the hole's start up.
        Ok(d) if d < off.saturating_add(bs) => {
            let hole = seek(file, off, libc::SEEK_HOLE).unwrap_or(u64::MAX);
            let blocks = (hole.saturating_sub(off)).div_ceil(bs);
            (LbaState::Mapped, blocks.clamp(1, left))
        }
        // A hole up to `d`: every block wholly before the block holding `d` is deallocated.
        Ok(d) => (LbaState::Deallocated, ((d - off) / bs).clamp(1, left)),
        // No data after `off`: a hole to the end.
        Err(libc::ENXIO) => (LbaState::Deallocated, left),
        // The file system cannot tell: report mapped.
        Err(_) => (LbaState::Mapped, left),
    }
}

/// Sets a regular file's length to `num_blocks` blocks (block devices cannot be resized).
pub(super) fn resize(
    file: &File,
    is_block_device: bool,
    block_size: u32,
    num_blocks: u64,
) -> Result<(), BdevError> {
    if is_block_device {
        return Err(BdevError::Unsupported("resizing a block device"));
    }
    let size = num_blocks
        .checked_mul(u64::from(block_size))
        .ok_or_else(|| BdevError::Config(format!("{num_blocks} blocks too large")))?;
    check_geometry(block_size, size)?;
    file.set_len(size).map_err(|e| BdevError::Io(io_errno(&e)))
}

/// `fsync`: data and metadata.
pub(super) fn sync_all(file: &File) -> Result<(), BdevError> {
    file.sync_all().map_err(|e| BdevError::Io(io_errno(&e)))
}

/// Helpers shared by the file backends' tests.
#[cfg(test)]
pub(super) mod test_util {
    use crate::bdev::{BdevCompletion, BdevIo, BdevOp, BlockDevice};
    use crate::mem::IoBuf;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    /// A temporary file path removed on drop.
    pub struct TempPath(pub PathBuf);

    impl TempPath {
        /// A fresh `iscsi-tgt-{kind}-{pid}-{tag}-{n}.img` in `dir`.
        pub fn new_in(dir: &Path, kind: &str, tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            TempPath(dir.join(format!(
                "iscsi-tgt-{kind}-{}-{tag}-{n}.img",
                std::process::id()
            )))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Polls `dev` until `n` completions arrived, sleeping `nap` between empty polls.
    pub fn wait_for<D: BlockDevice>(dev: &mut D, n: usize, nap: Duration) -> Vec<BdevCompletion> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < n {
            assert!(Instant::now() < deadline, "completions did not arrive");
            if dev.poll(&mut out) == 0 {
                std::thread::sleep(nap);
            }
        }
        out
    }

    /// Submits one request and waits for its completion.
    pub fn run<D: BlockDevice>(
        dev: &mut D,
        op: BdevOp,
        buf: Option<IoBuf>,
        nap: Duration,
    ) -> BdevCompletion {
        dev.submit(BdevIo { tag: 77, op, buf }).expect("queued");
        let mut out = wait_for(dev, 1, nap);
        assert_eq!(dev.in_flight(), 0);
        out.pop().expect("one completion")
    }
}
