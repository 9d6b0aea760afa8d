//! A block device on a regular file or a host block device, driven by io_uring.
//!
//! The ring belongs to the device, and the device to one reactor thread: no worker threads
//! and no locks. [`BlockDevice::submit`] checks a request, parks it (tag, operation, buffer)
//! in a slab slot whose index is the SQE's `user_data`, and pushes the SQE into the
//! submission queue **without** a system call. [`BlockDevice::poll`] hands every pending SQE
//! to the kernel with one `io_uring_enter` (so all submits of one reactor iteration cost one
//! syscall) and then drains the completion queue, which is shared memory: no waiting and no
//! syscall when nothing is pending. [`UringBdev::submit_pending`] does the first half alone.
//!
//! **Reactor contract.** SQEs reach the kernel only in `poll` (or `submit_pending`): a
//! reactor must call one of them after its last `submit` before it sleeps. To sleep while
//! I/O is in flight, add [`UringBdev::completion_fd`] (an eventfd registered with the ring,
//! signalled on every completion) to the reactor's epoll set, readable interest; after a
//! wake-up call [`UringBdev::ack_completion_fd`] (level-triggered epoll needs it; with
//! edge-triggered epoll it only keeps the counter small) and `poll`. With mio:
//! `registry.register(&mut SourceFd(&fd), token, Interest::READABLE)`.
//!
//! Operations:
//! - Read/Write: `IORING_OP_READ`/`IORING_OP_WRITE` straight from/into the request's
//!   [`IoBuf`]; a write with `fua` carries `RWF_DSYNC`. A short transfer is resubmitted for
//!   the remainder (a transfer of 0 bytes is an I/O error, never a silent success); requests
//!   larger than [`MAX_CHUNK`] are issued in chunks the same way.
//! - Flush: `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`.
//! - Unmap: `IORING_OP_FALLOCATE` with `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`. On a
//!   regular file this punches a hole; on a block device the kernel turns it into a
//!   zeroing discard (write-zeroes with unmap, no fallback), which is exactly what Unmap
//!   promises (later reads return zeroes). `EOPNOTSUPP` becomes [`BdevError::Unsupported`].
//! - WriteZeroes: the same punch first; if the file system or device cannot, then
//!   `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE` (block devices: write-zeroes without
//!   unmap, with the kernel's own fallback), and if that is refused too, plain writes of a
//!   shared aligned zero buffer through the ring, chunk after chunk.
//!
//! Why no helper thread for block devices: `BLKDISCARD`/`BLKZEROOUT` are blocking ioctls,
//! but the block device's `fallocate` does the same work (`blkdev_issue_zeroout`) and
//! io_uring always runs `IORING_OP_FALLOCATE` on its own io-wq workers, so the reactor never
//! blocks. (The 6.12+ `uring_cmd` `BLOCK_URING_CMD_DISCARD` only discards, without the
//! zeroes guarantee Unmap needs, so it is not used.)
//!
//! O_DIRECT (the default, [`UringOptions::direct`]): buffers come from [`IoBuf`] (4096-byte
//! aligned), lengths and offsets are multiples of the block size, and `open` refuses a block
//! size below the device's logical block size (`BLKSSZGET`, or `statx` `STATX_DIOALIGN` for a
//! file), so every request satisfies the O_DIRECT alignment rules. A file system that
//! refuses O_DIRECT (e.g. tmpfs) makes `open` fail with a message saying to set
//! `direct = false`.
//!
//! Regular files are thin provisioned and report holes found with `SEEK_DATA`/`SEEK_HOLE`
//! (as [`super::file`]); block devices report every block as mapped. `lba_status`, `resize`
//! and `flush_blocking` are synchronous system calls, as in the file backend.
//!
//! Dropping the device waits for every request the kernel still holds, so the kernel never
//! reads from or writes into a freed buffer.
//!
//! Registered buffers: on its first request the device registers the buffer pool of the
//! thread that drives it (the reactor's hugepage pool) with the ring as one fixed buffer;
//! requests whose buffer lies in that pool then use `ReadFixed`/`WriteFixed`, so the kernel
//! neither pins nor maps their pages per I/O. Buffers from elsewhere (the heap, another
//! reactor's pool) use plain reads and writes.

use super::backing::{self, config_err};
use super::{
    check_buffer, check_geometry, check_op_range, BdevCompletion, BdevError, BdevIo, BdevOp,
    BlockDevice, LbaState,
};
use crate::mem::{IoBuf, IO_ALIGN};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Default number of requests in flight per device (and submission queue entries).
pub const DEFAULT_QUEUE_DEPTH: u32 = 256;
/// Largest queue depth accepted (the kernel's limit on submission queue entries).
pub const MAX_QUEUE_DEPTH: u32 = 32768;
/// Largest transfer of one SQE; bigger requests go in chunks (Linux caps one read/write at
/// just under 2 GiB anyway). A multiple of every block size.
pub const MAX_CHUNK: u64 = 1 << 30;
/// Size of the shared zero buffer used when write-zeroes must really write.
const ZERO_CHUNK: usize = 1 << 20;
/// Resubmissions of a request that got `EAGAIN`/`EINTR` before it is reported failed.
const MAX_RETRIES: u8 = 8;

/// `_IO(0x12, 104)`: the logical block size of a block device (an `int`).
const BLKSSZGET: u64 = 0x1268;

/// How to open a [`UringBdev`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// Requests in flight at most (the slab size); the submission queue has at least as many
    /// entries. 1 ..= [`MAX_QUEUE_DEPTH`].
    pub queue_depth: u32,
    /// Open with O_DIRECT (bypass the page cache). Must be false on file systems that refuse
    /// it, such as tmpfs.
    pub direct: bool,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            direct: true,
        }
    }
}

/// Which system operation a slot's current SQE performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Read or write of the request's buffer, from byte `done` on.
    Rw,
    /// fdatasync.
    Fsync,
    /// fallocate(PUNCH_HOLE | KEEP_SIZE).
    Punch,
    /// fallocate(ZERO_RANGE | KEEP_SIZE) (write-zeroes whose punch was refused).
    ZeroRange,
    /// Writes of the zero buffer from byte `done` on (write-zeroes, last resort).
    ZeroWrites,
}

/// One request the device holds, at the slab index that is its SQE's `user_data`.
#[derive(Debug)]
struct Slot {
    tag: u64,
    op: BdevOp,
    /// The request's buffer; the kernel may use it while the slot has an SQE in the ring.
    buf: Option<IoBuf>,
    /// Byte offset of the request in the file.
    offset: u64,
    /// Bytes the request covers.
    len: u64,
    /// Bytes already transferred (Rw, ZeroWrites).
    done: u64,
    stage: Stage,
    retries: u8,
}

/// What to do with a slot after one of its completions.
enum Next {
    Finished(Result<(), BdevError>),
    Resubmit,
}

/// A block device on a regular file or host block device, with its own io_uring.
pub struct UringBdev {
    name: String,
    path: PathBuf,
    file: File,
    block_size: u32,
    is_block_device: bool,
    direct: bool,
    num_blocks: u64,
    ring: IoUring,
    /// Slab of requests in the ring (or waiting for SQ space); index = `user_data`.
    slots: Vec<Option<Slot>>,
    /// Free slab indices.
    free: Vec<u32>,
    /// Slots with an SQE pushed (pending or in the kernel) whose CQE has not been reaped.
    in_ring: usize,
    /// Slots to resubmit that found the submission queue full (never expected: see `submit`).
    backlog: VecDeque<u32>,
    /// Completions produced without the kernel (range errors, empty requests).
    local: VecDeque<BdevCompletion>,
    /// Aligned zeroes for the write-zeroes fallback; allocated once, read-only, never
    /// replaced while the device lives (SQEs point into it).
    zero_buf: Option<IoBuf>,
    /// Eventfd registered with the ring: readable after completions.
    eventfd: Option<OwnedFd>,
    /// Scratch for reaped (user_data, result) pairs, kept to avoid allocating per poll.
    reaped: Vec<(u64, i32)>,
    /// The pool registered as fixed buffer 0, kept alive while registered.
    fixed: Option<FixedPool>,
    /// Whether registration was attempted (once per device).
    fixed_tried: bool,
    /// Reads and writes that went through the registered buffer.
    fixed_ops: u64,
}

/// The registered pool and the address range it covers.
struct FixedPool {
    _pool: std::sync::Arc<crate::mem::pool::BufferPool>,
    base: usize,
    len: usize,
}

impl FixedPool {
    /// Whether `len` bytes at `ptr` lie inside the registered range.
    fn covers(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        p >= self.base
            && p.checked_add(len)
                .is_some_and(|end| end <= self.base + self.len)
    }
}

impl std::fmt::Debug for UringBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBdev")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("block_size", &self.block_size)
            .field("num_blocks", &self.num_blocks)
            .field("is_block_device", &self.is_block_device)
            .field("direct", &self.direct)
            .field("queue_depth", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// The logical block size of a block device (`BLKSSZGET`).
fn blk_logical_block_size(file: &File) -> std::io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `lbs`, alive for
    // the call; the descriptor belongs to `file`, open for the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKSSZGET as _,
            &mut lbs as *mut libc::c_int,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(lbs).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// O_DIRECT alignment of an open file from `statx(STATX_DIOALIGN)`: `Some((memory, offset))`,
/// `Some((0, 0))` when the file system does not support direct I/O on it, `None` when the
/// kernel cannot tell.
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated empty string and AT_EMPTY_PATH makes statx look at
    // the descriptor itself (owned by `file`, open for the call); `stx` is a valid, writable
    // statx that outlives the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Turns O_DIRECT on for an open descriptor; EINVAL means the file system refuses it.
fn set_direct(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL takes no pointer; the descriptor belongs to `file`.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an integer argument; the descriptor belongs to `file`.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking close-on-exec eventfd.
fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes integers only.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd, is valid and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl UringBdev {
    /// Opens (creating a missing regular file) `path` and sets up its ring.
    ///
    /// Sizes as [`super::file::FileBdev::open`]: regular files are grown to `size` when
    /// shorter and never truncated (`None`: the current, non-zero length; a missing file
    /// needs a size); block devices use their size, or `size` when given and not larger.
    /// Sizes must be multiples of `block_size` (512 or 4096). With `opts.direct`, the block
    /// size must be a multiple of the device's logical block size.
    pub fn open(
        name: &str,
        path: &Path,
        block_size: u32,
        size: Option<u64>,
        opts: UringOptions,
    ) -> Result<Self, BdevError> {
        let mut created = false;
        let r = Self::open_inner(name, path, block_size, size, opts, &mut created);
        if r.is_err() && created {
            // Do not leave behind a file this failed open created.
            let _ = std::fs::remove_file(path);
        }
        r
    }

    fn open_inner(
        name: &str,
        path: &Path,
        block_size: u32,
        size: Option<u64>,
        opts: UringOptions,
        created: &mut bool,
    ) -> Result<Self, BdevError> {
        let err = |what: &str, e: std::io::Error| config_err(name, path, what, e);
        check_geometry(block_size, u64::from(block_size))?;
        if opts.queue_depth == 0 || opts.queue_depth > MAX_QUEUE_DEPTH {
            return Err(BdevError::Config(format!(
                "{name}: queue depth {} is not in 1..={MAX_QUEUE_DEPTH}",
                opts.queue_depth
            )));
        }
        let opened = backing::open(name, path, size)?;
        *created = opened.created;
        let (file, is_block_device) = (&opened.file, opened.is_block_device);

        if opts.direct {
            match set_direct(file) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Err(BdevError::Config(format!(
                        "{name}: the file system of {} refuses O_DIRECT (tmpfs does): \
                         set direct = false for this device",
                        path.display()
                    )))
                }
                Err(e) => return Err(err("cannot enable O_DIRECT on", e)),
            }
            let (mem_align, lbs) = if is_block_device {
                let lbs = blk_logical_block_size(file)
                    .map_err(|e| err("cannot get the logical block size of", e))?;
                (lbs, lbs)
            } else {
                match dio_align(file) {
                    Some((0, _)) | Some((_, 0)) => {
                        return Err(BdevError::Config(format!(
                            "{name}: the file system of {} does not support O_DIRECT on it: \
                             set direct = false for this device",
                            path.display()
                        )))
                    }
                    Some(a) => a,
                    // Old kernel: unknown; misaligned I/O would fail with EINVAL.
                    None => (1, 1),
                }
            };
            if lbs > block_size || !block_size.is_multiple_of(lbs) {
                return Err(BdevError::Config(format!(
                    "{name}: block size {block_size} is smaller than the logical block size \
                     {lbs} that O_DIRECT needs on {}: use block size {lbs}, or direct = false",
                    path.display()
                )));
            }
            if mem_align as usize > IO_ALIGN {
                return Err(BdevError::Config(format!(
                    "{name}: {} needs O_DIRECT buffers aligned to {mem_align} bytes, more than \
                     the {IO_ALIGN} I/O buffers have: set direct = false",
                    path.display()
                )));
            }
        }

        let num_blocks = backing::size_blocks(name, path, &opened, block_size, size)?;
        let backing::Opened { file, .. } = opened;

        // Default setup (no SQPOLL, no COOP_TASKRUN, no SINGLE_ISSUER): completions are
        // posted without the owner entering the kernel, and the device may be created on one
        // thread and moved to its reactor. The CQ has twice the SQ's entries and at most
        // `queue_depth` requests are in flight, so it never overflows.
        let ring =
            IoUring::new(opts.queue_depth).map_err(|e| err("cannot set up io_uring for", e))?;
        let eventfd = match new_eventfd() {
            Ok(fd) => match ring.submitter().register_eventfd(fd.as_raw_fd()) {
                Ok(()) => Some(fd),
                Err(e) => {
                    log::warn!("{name}: cannot register a completion eventfd: {e}");
                    None
                }
            },
            Err(e) => {
                log::warn!("{name}: cannot create a completion eventfd: {e}");
                None
            }
        };
        let depth = opts.queue_depth as usize;
        let mut slots = Vec::with_capacity(depth);
        slots.resize_with(depth, || None);
        // Pop from the end: lowest indices first.
        let free: Vec<u32> = (0..opts.queue_depth).rev().collect();
        Ok(UringBdev {
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            block_size,
            is_block_device,
            direct: opts.direct,
            num_blocks,
            ring,
            slots,
            free,
            in_ring: 0,
            backlog: VecDeque::new(),
            local: VecDeque::new(),
            zero_buf: None,
            eventfd,
            reaped: Vec::with_capacity(depth),
            fixed: None,
            fixed_tried: false,
            fixed_ops: 0,
        })
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the backing is a host block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// True when the device was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The most requests in flight at once (`UringOptions::queue_depth`).
    pub fn queue_depth(&self) -> usize {
        self.slots.len()
    }

    /// The io_uring's descriptor (for diagnostics; prefer [`Self::completion_fd`] for epoll).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// An eventfd the kernel signals on every completion: the reactor adds it to its epoll
    /// set (readable) to sleep while I/O is in flight, then calls [`Self::ack_completion_fd`]
    /// and `poll`. `None` if the eventfd could not be set up (then the reactor must poll).
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.eventfd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Resets the completion eventfd's counter (non-blocking); returns the count read
    /// (completions signalled since the last reset), 0 if none or no eventfd.
    pub fn ack_completion_fd(&self) -> u64 {
        let Some(fd) = &self.eventfd else { return 0 };
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into `count`, alive and writable for the call; the
        // eventfd is owned by `self` and non-blocking.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut count as *mut u64).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        if n == 8 {
            count
        } else {
            0
        }
    }

    /// Hands every queued SQE to the kernel with one `io_uring_enter`, without waiting.
    /// `poll` does this itself; call it when the reactor is about to sleep after submits.
    /// Returns how many SQEs the kernel took.
    pub fn submit_pending(&mut self) -> usize {
        self.push_backlog();
        let pending = !self.ring.submission().is_empty();
        let overflow = self.ring.submission().cq_overflow();
        if !pending && !overflow {
            return 0;
        }
        match self.ring.submit() {
            Ok(n) => n,
            // Transient (out of kernel resources, signal): the SQEs stay queued and are
            // handed over by the next call.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) =>
            {
                0
            }
            Err(e) => {
                log::error!("{}: io_uring_enter failed: {e}", self.name);
                0
            }
        }
    }

    /// The SQE for a slot's current stage (`user_data` = slot index).
    /// Registers the driving thread's buffer pool with the ring, once. A failure (no pool,
    /// RLIMIT_MEMLOCK, an old kernel) only means plain reads and writes.
    fn register_thread_pool(&mut self) {
        if self.fixed_tried {
            return;
        }
        self.fixed_tried = true;
        let Some(pool) = crate::mem::pool::thread_pool() else {
            return;
        };
        let (base, len) = pool.span();
        let iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        // SAFETY: the iovec describes the pool's mapping, which stays mapped while this
        // device holds the Arc (kept in `fixed`); the registration is dropped with the ring.
        match unsafe { self.ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => {
                log::info!(
                    "bdev {}: {} MiB of pool buffers registered with io_uring",
                    self.name,
                    len >> 20
                );
                self.fixed = Some(FixedPool {
                    _pool: pool,
                    base: base as usize,
                    len,
                });
            }
            Err(e) => log::warn!(
                "bdev {}: cannot register buffers with io_uring ({e}); using plain I/O",
                self.name
            ),
        }
    }

    /// Reads and writes that used the registered pool.
    pub fn fixed_ops(&self) -> u64 {
        self.fixed_ops
    }

    fn sqe(&mut self, idx: u32) -> Option<squeue::Entry> {
        let fd = types::Fd(self.file.as_raw_fd());
        if self
            .slots
            .get(idx as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.stage == Stage::ZeroWrites)
            && self.zero_buf.is_none()
        {
            self.zero_buf = Some(IoBuf::zeroed(ZERO_CHUNK));
        }
        let zero_ptr = self.zero_buf.as_ref().map(IoBuf::as_ptr);
        self.register_thread_pool();
        let fixed = &self.fixed;
        let fixed_ops = &mut self.fixed_ops;
        let slot = self.slots.get_mut(idx as usize)?.as_mut()?;
        let remaining = slot.len.saturating_sub(slot.done);
        let at = slot.offset.checked_add(slot.done)?;
        let entry = match slot.stage {
            Stage::Rw => {
                let chunk = remaining.min(MAX_CHUNK);
                let skip = usize::try_from(slot.done).ok()?;
                // Buffers inside the registered pool go through fixed buffer 0.
                match slot.op {
                    BdevOp::Read { .. } => {
                        let buf = slot.buf.as_mut()?.as_mut_slice().get_mut(skip..)?;
                        if fixed
                            .as_ref()
                            .is_some_and(|f| f.covers(buf.as_ptr(), chunk as usize))
                        {
                            *fixed_ops += 1;
                            opcode::ReadFixed::new(fd, buf.as_mut_ptr(), chunk as u32, 0)
                                .offset(at)
                                .build()
                        } else {
                            opcode::Read::new(fd, buf.as_mut_ptr(), chunk as u32)
                                .offset(at)
                                .build()
                        }
                    }
                    BdevOp::Write { fua, .. } => {
                        let buf = slot.buf.as_ref()?.as_slice().get(skip..)?;
                        let flags = if fua { libc::RWF_DSYNC } else { 0 };
                        if fixed
                            .as_ref()
                            .is_some_and(|f| f.covers(buf.as_ptr(), chunk as usize))
                        {
                            *fixed_ops += 1;
                            opcode::WriteFixed::new(fd, buf.as_ptr(), chunk as u32, 0)
                                .offset(at)
                                .rw_flags(flags)
                                .build()
                        } else {
                            opcode::Write::new(fd, buf.as_ptr(), chunk as u32)
                                .offset(at)
                                .rw_flags(flags)
                                .build()
                        }
                    }
                    _ => return None,
                }
            }
            Stage::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Stage::Punch => opcode::Fallocate::new(fd, slot.len)
                .offset(slot.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Stage::ZeroRange => opcode::Fallocate::new(fd, slot.len)
                .offset(slot.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Stage::ZeroWrites => {
                let chunk = remaining.min(ZERO_CHUNK as u64);
                opcode::Write::new(fd, zero_ptr?, chunk as u32)
                    .offset(at)
                    .build()
            }
        };
        Some(entry.user_data(u64::from(idx)))
    }

    /// Pushes the SQE of slot `idx`. Err(()) when the submission queue is full.
    fn push_slot(&mut self, idx: u32) -> Result<(), ()> {
        let Some(entry) = self.sqe(idx) else {
            // Unreachable with checked requests; finish the slot rather than lose it.
            self.finish(idx, Err(BdevError::Io(libc::EINVAL)));
            return Ok(());
        };
        // SAFETY: the SQE points into the slot's IoBuf (a heap allocation that does not move
        // when the IoBuf value moves) or into `zero_buf` (never replaced or dropped while the
        // device lives). The slot keeps its buffer, and is neither freed nor reused, until
        // this SQE's completion is reaped (`in_ring` counts it); `Drop` waits for all of them.
        // The file descriptor stays open as long as the ring (same struct, Drop waits).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        match pushed {
            Ok(()) => {
                self.in_ring += 1;
                Ok(())
            }
            Err(_) => Err(()),
        }
    }

    /// Retries resubmissions that found the submission queue full.
    fn push_backlog(&mut self) {
        while let Some(&idx) = self.backlog.front() {
            if self.push_slot(idx).is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }

    /// Frees slot `idx` and queues its completion.
    fn finish(&mut self, idx: u32, result: Result<(), BdevError>) {
        if let Some(slot) = self.slots.get_mut(idx as usize).and_then(Option::take) {
            self.free.push(idx);
            self.local.push_back(BdevCompletion {
                tag: slot.tag,
                result,
                buf: slot.buf,
            });
        }
    }

    /// Decides what a completion means for its slot.
    fn on_cqe(&mut self, idx: u32, res: i32) -> Next {
        let is_block_device = self.is_block_device;
        let Some(slot) = self.slots.get_mut(idx as usize).and_then(Option::as_mut) else {
            return Next::Finished(Err(BdevError::Io(libc::EIO)));
        };
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                return Next::Resubmit;
            }
            let unsupported = matches!(errno, libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY);
            return match (slot.stage, &slot.op) {
                (Stage::Punch, BdevOp::Unmap { .. }) if unsupported => {
                    Next::Finished(Err(BdevError::Unsupported(if is_block_device {
                        "unmap on this block device"
                    } else {
                        "hole punching on this file system"
                    })))
                }
                (Stage::Punch, BdevOp::WriteZeroes { .. }) if unsupported => {
                    slot.stage = Stage::ZeroRange;
                    slot.retries = 0;
                    Next::Resubmit
                }
                (Stage::ZeroRange, _) if unsupported || errno == libc::EINVAL => {
                    slot.stage = Stage::ZeroWrites;
                    slot.done = 0;
                    slot.retries = 0;
                    Next::Resubmit
                }
                _ => Next::Finished(Err(BdevError::Io(errno))),
            };
        }
        match slot.stage {
            Stage::Rw | Stage::ZeroWrites => {
                let n = res as u64; // res >= 0 here
                if n == 0 {
                    // No progress: end of file (the file shrank) or a device that stopped
                    // accepting data. Never report a short transfer as success.
                    return Next::Finished(Err(BdevError::Io(libc::EIO)));
                }
                slot.done = slot.done.saturating_add(n).min(slot.len);
                slot.retries = 0;
                if slot.done < slot.len {
                    Next::Resubmit
                } else {
                    Next::Finished(Ok(()))
                }
            }
            Stage::Fsync | Stage::Punch | Stage::ZeroRange => Next::Finished(Ok(())),
        }
    }

    /// Moves the completion queue's entries into `reaped` (no syscall).
    fn drain_cq(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        self.reaped
            .extend((&mut cq).map(|c| (c.user_data(), c.result())));
    }

    /// Processes reaped completions: finish or resubmit their slots.
    fn process_reaped(&mut self) {
        let reaped = std::mem::take(&mut self.reaped);
        for &(user_data, res) in &reaped {
            self.in_ring = self.in_ring.saturating_sub(1);
            let Ok(idx) = u32::try_from(user_data) else {
                log::error!("{}: completion for unknown request {user_data}", self.name);
                continue;
            };
            if self.slots.get(idx as usize).is_none_or(Option::is_none) {
                log::error!("{}: completion for unknown request {user_data}", self.name);
                continue;
            }
            match self.on_cqe(idx, res) {
                Next::Finished(result) => self.finish(idx, result),
                Next::Resubmit => {
                    if self.push_slot(idx).is_err() {
                        self.backlog.push_back(idx);
                    }
                }
            }
        }
        self.reaped = reaped;
        self.reaped.clear();
    }

    /// Byte offset and length of a block range.
    fn byte_range(&self, lba: u64, blocks: u64) -> Option<(u64, u64)> {
        let bs = u64::from(self.block_size);
        Some((lba.checked_mul(bs)?, blocks.checked_mul(bs)?))
    }
}

impl BlockDevice for UringBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    fn thin_provisioned(&self) -> bool {
        !self.is_block_device
    }

    fn submit(&mut self, io: BdevIo) -> Result<(), (BdevError, BdevIo)> {
        if let Err(e) = check_buffer(&io, self.block_size) {
            return Err((e, io));
        }
        if let Err(e) = check_op_range(&io.op, self.num_blocks) {
            self.local.push_back(BdevCompletion {
                tag: io.tag,
                result: Err(e),
                buf: io.buf,
            });
            return Ok(());
        }
        let (stage, lba, blocks) = match io.op {
            BdevOp::Read { lba, blocks } | BdevOp::Write { lba, blocks, .. } => {
                (Stage::Rw, lba, u64::from(blocks))
            }
            BdevOp::Flush => (Stage::Fsync, 0, 0),
            BdevOp::Unmap { lba, blocks } | BdevOp::WriteZeroes { lba, blocks } => {
                (Stage::Punch, lba, blocks)
            }
        };
        let Some((offset, len)) = self.byte_range(lba, blocks) else {
            return Err((BdevError::Io(libc::EOVERFLOW), io));
        };
        if len == 0 && stage != Stage::Fsync {
            // Nothing to transfer (fallocate would reject a zero length).
            self.local.push_back(BdevCompletion {
                tag: io.tag,
                result: Ok(()),
                buf: io.buf,
            });
            return Ok(());
        }
        // Every slot has at most one SQE in the submission queue and the queue has at least
        // as many entries as there are slots, so a free slot means a free SQE (checked anyway).
        let Some(idx) = self.free.pop() else {
            return Err((BdevError::QueueFull, io));
        };
        if self.ring.submission().is_full() {
            self.free.push(idx);
            return Err((BdevError::QueueFull, io));
        }
        let BdevIo { tag, op, buf } = io;
        if let Some(slot) = self.slots.get_mut(idx as usize) {
            *slot = Some(Slot {
                tag,
                op,
                buf,
                offset,
                len,
                done: 0,
                stage,
                retries: 0,
            });
        }
        if self.push_slot(idx).is_err() {
            // Not reached (checked above): take the request back out.
            let slot = self.slots.get_mut(idx as usize).and_then(Option::take);
            self.free.push(idx);
            if let Some(s) = slot {
                return Err((
                    BdevError::QueueFull,
                    BdevIo {
                        tag: s.tag,
                        op: s.op,
                        buf: s.buf,
                    },
                ));
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        self.submit_pending();
        self.drain_cq();
        if !self.reaped.is_empty() {
            self.process_reaped();
            // Resubmissions (short transfers, fallbacks) go to the kernel right away.
            if !self.ring.submission().is_empty() {
                self.submit_pending();
            }
        }
        let n = self.local.len();
        out.extend(self.local.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        (self.slots.len() - self.free.len()) + self.local.len()
    }

    fn lba_status(&self, lba: u64) -> (LbaState, u64) {
        backing::lba_status(
            &self.file,
            self.is_block_device,
            self.block_size,
            self.num_blocks,
            lba,
        )
    }

    fn resize(&mut self, num_blocks: u64) -> Result<(), BdevError> {
        backing::resize(
            &self.file,
            self.is_block_device,
            self.block_size,
            num_blocks,
        )?;
        self.num_blocks = num_blocks;
        Ok(())
    }

    fn flush_blocking(&mut self) -> Result<(), BdevError> {
        backing::sync_all(&self.file)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        UringBdev::completion_fd(self)
    }

    fn ack_completion(&mut self) {
        self.ack_completion_fd();
    }
}

impl Drop for UringBdev {
    /// Waits until the kernel has finished every SQE pushed, so that no buffer is freed while
    /// the kernel may still read or write it. Requests are not resubmitted: their buffers
    /// are simply dropped after their last completion.
    fn drop(&mut self) {
        while self.in_ring > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // Cannot wait: leak the buffers rather than let the kernel write into
                    // freed memory.
                    log::error!(
                        "{}: cannot wait for {} requests in flight ({e}); leaking their buffers",
                        self.name,
                        self.in_ring
                    );
                    for slot in self.slots.iter_mut().filter_map(Option::take) {
                        std::mem::forget(slot.buf);
                    }
                    std::mem::forget(self.zero_buf.take());
                    return;
                }
            }
            let mut cq = self.ring.completion();
            cq.sync();
            let n = (&mut cq).count();
            drop(cq);
            self.in_ring = self.in_ring.saturating_sub(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::backing::blk_size;
    use crate::bdev::backing::test_util::{self, TempPath};
    use std::fs::OpenOptions;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// A directory where O_DIRECT works (temp_dir, or /var/tmp when temp_dir is e.g. tmpfs),
    /// or `None` when neither supports it.
    fn direct_dir() -> Option<&'static Path> {
        static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
        DIR.get_or_init(|| {
            for dir in [std::env::temp_dir(), PathBuf::from("/var/tmp")] {
                let probe = dir.join(format!("iscsi-tgt-uring-probe-{}", std::process::id()));
                let ok = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&probe)
                    .map(|f| set_direct(&f).is_ok())
                    .unwrap_or(false);
                let _ = std::fs::remove_file(&probe);
                if ok {
                    return Some(dir);
                }
            }
            None
        })
        .as_deref()
    }

    /// Temporary files of these tests.
    trait NewTempPath {
        /// In temp_dir, or in a directory where O_DIRECT works when `direct`.
        fn new(tag: &str, direct: bool) -> Self;
    }

    impl NewTempPath for TempPath {
        fn new(tag: &str, direct: bool) -> Self {
            let dir = if direct {
                direct_dir().map_or_else(std::env::temp_dir, Path::to_path_buf)
            } else {
                std::env::temp_dir()
            };
            TempPath::new_in(&dir, "uringbdev", tag)
        }
    }

    /// The modes to test: buffered always, O_DIRECT where some directory supports it.
    fn modes() -> Vec<bool> {
        if direct_dir().is_some() {
            vec![false, true]
        } else {
            eprintln!("no directory supports O_DIRECT: testing buffered mode only");
            vec![false]
        }
    }

    fn opts(direct: bool) -> UringOptions {
        UringOptions {
            direct,
            ..UringOptions::default()
        }
    }

    fn open(tag: &str, direct: bool, bs: u32, size: u64) -> (TempPath, UringBdev) {
        let p = TempPath::new(tag, direct);
        let d = UringBdev::open("u", &p.0, bs, Some(size), opts(direct)).unwrap();
        (p, d)
    }

    const NAP: Duration = Duration::from_micros(200);

    fn wait_for(dev: &mut UringBdev, n: usize) -> Vec<BdevCompletion> {
        test_util::wait_for(dev, n, NAP)
    }

    fn run(dev: &mut UringBdev, op: BdevOp, buf: Option<IoBuf>) -> BdevCompletion {
        test_util::run(dev, op, buf, NAP)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn open_checks_geometry_and_options() {
        let p = TempPath::new("geom", false);
        let o = opts(false);
        assert!(matches!(
            UringBdev::open("u", &p.0, 512, None, o),
            Err(BdevError::Config(_))
        ));
        assert!(!p.0.exists(), "a failed open must not leave a file behind");
        assert!(UringBdev::open("u", &p.0, 512, Some(1000), o).is_err());
        assert!(!p.0.exists(), "a failed open must not leave a file behind");
        std::fs::write(&p.0, b"").unwrap();
        assert!(matches!(
            UringBdev::open("u", &p.0, 512, None, o),
            Err(BdevError::Config(_))
        ));
        assert!(UringBdev::open("u", &p.0, 1024, Some(4096), o).is_err());
        for depth in [0, MAX_QUEUE_DEPTH + 1] {
            let bad = UringOptions {
                queue_depth: depth,
                direct: false,
            };
            assert!(matches!(
                UringBdev::open("u", &p.0, 512, Some(4096), bad),
                Err(BdevError::Config(_))
            ));
        }
        let d = UringBdev::open("u", &p.0, 512, Some(1 << 20), o).unwrap();
        assert_eq!(d.num_blocks(), 2048);
        assert!(d.thin_provisioned());
        assert!(!d.is_block_device());
        assert!(!d.is_direct());
        assert_eq!(d.queue_depth(), 256);
        assert_eq!(d.path(), p.0.as_path());
        assert!(d.ring_fd() >= 0);
        assert!(d.completion_fd().is_some());
        drop(d);
        // Reopened without a size: keeps the existing length.
        let d = UringBdev::open("u", &p.0, 4096, None, o).unwrap();
        assert_eq!(d.num_blocks(), 256);
        drop(d);
        // A smaller size uses the front of the file without truncating it.
        let d = UringBdev::open("u", &p.0, 512, Some(4096), o).unwrap();
        assert_eq!(d.num_blocks(), 8);
        assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 1 << 20);
        assert!(UringBdev::open("u", Path::new("/proc/self"), 512, None, o).is_err());
    }

    #[test]
    fn direct_open_checks_alignment() {
        if direct_dir().is_none() {
            return;
        }
        let p = TempPath::new("align", true);
        let d = UringBdev::open("u", &p.0, 4096, Some(1 << 20), opts(true)).unwrap();
        assert!(d.is_direct());
        let lbs = dio_align(&d.file).map_or(512, |(_, o)| o);
        drop(d);
        let small = UringBdev::open("u", &p.0, 512, None, opts(true));
        if lbs > 512 {
            match small {
                Err(BdevError::Config(msg)) => assert!(msg.contains("logical block size"), "{msg}"),
                other => panic!("512-byte blocks on a {lbs}-byte device: {other:?}"),
            }
        } else {
            assert!(small.is_ok(), "{small:?}");
        }
    }

    #[test]
    fn direct_refused_by_tmpfs_says_so() {
        // /dev/shm is tmpfs on Linux; newer kernels may accept O_DIRECT there.
        let dir = Path::new("/dev/shm");
        if !dir.is_dir() {
            return;
        }
        let p = TempPath(dir.join(format!(
            "iscsi-tgt-uringbdev-{}-shm.img",
            std::process::id()
        )));
        match UringBdev::open("u", &p.0, 4096, Some(1 << 16), opts(true)) {
            Ok(d) => assert!(d.is_direct()),
            Err(BdevError::Config(msg)) => {
                assert!(msg.contains("direct = false"), "{msg}");
                assert!(!p.0.exists(), "a failed open must not leave a file behind");
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn round_trip_fua_flush() {
        for direct in modes() {
            let (p, mut d) = open("rw", direct, 512, 64 * 512);
            let data = pattern(2048, 7);
            d.submit(BdevIo {
                tag: 1,
                op: BdevOp::Write {
                    lba: 4,
                    blocks: 4,
                    fua: true,
                },
                buf: Some(IoBuf::from_vec(data.clone())),
            })
            .unwrap();
            d.submit(BdevIo {
                tag: 2,
                op: BdevOp::Flush,
                buf: None,
            })
            .unwrap();
            assert_eq!(d.in_flight(), 2);
            let out = wait_for(&mut d, 2);
            assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
            let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
            tags.sort_unstable();
            assert_eq!(tags, [1, 2]);
            assert_eq!(d.in_flight(), 0);
            // The write's buffer comes back.
            let w = out.iter().find(|c| c.tag == 1).unwrap();
            assert_eq!(w.buf.as_ref().unwrap().as_slice(), &data[..]);

            let c = run(
                &mut d,
                BdevOp::Read { lba: 4, blocks: 4 },
                Some(IoBuf::zeroed(2048)),
            );
            assert_eq!(c.result, Ok(()));
            assert_eq!(c.buf.unwrap().as_slice(), &data[..]);
            // A non-FUA write too.
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 63,
                    blocks: 1,
                    fua: false,
                },
                Some(IoBuf::from_vec(pattern(512, 9))),
            );
            assert_eq!(c.result, Ok(()));
            assert!(d.flush_blocking().is_ok());
            // The bytes are really in the file.
            let on_disk = std::fs::read(&p.0).unwrap();
            assert_eq!(&on_disk[2048..4096], &data[..]);
            assert_eq!(&on_disk[63 * 512..], &pattern(512, 9)[..]);
        }
    }

    #[test]
    fn pool_buffers_use_the_registered_fixed_buffer() {
        use crate::mem::pool::{set_thread_pool, BufferPool};
        use crate::mem::region::HugePages;
        let pool = BufferPool::new(9 * 64 * 1024, HugePages::Never).unwrap();
        for direct in modes() {
            set_thread_pool(Some(pool.clone()));
            let (_p, mut d) = open("fixed", direct, 512, 64 * 512);
            let data = pattern(4096, 3);
            let mut w = IoBuf::for_io(4096);
            w.as_mut_slice().copy_from_slice(&data);
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 8,
                    blocks: 8,
                    fua: false,
                },
                Some(w),
            );
            assert_eq!(c.result, Ok(()));
            let c = run(
                &mut d,
                BdevOp::Read { lba: 8, blocks: 8 },
                Some(IoBuf::for_io(4096)),
            );
            assert_eq!(c.result, Ok(()));
            assert_eq!(c.buf.unwrap().as_slice(), &data[..]);
            assert_eq!(d.fixed_ops(), 2, "both pool requests used fixed buffer 0");
            // A buffer from outside the pool still works, through a plain read.
            set_thread_pool(None);
            let c = run(
                &mut d,
                BdevOp::Read { lba: 8, blocks: 8 },
                Some(IoBuf::zeroed(4096)),
            );
            assert_eq!(c.result, Ok(()));
            assert_eq!(c.buf.unwrap().as_slice(), &data[..]);
            assert_eq!(d.fixed_ops(), 2);
        }
    }

    #[test]
    fn large_request_in_chunks() {
        // Bigger than ZERO_CHUNK and several blocks: exercises the multi-SQE paths.
        for direct in modes() {
            let (_p, mut d) = open("big", direct, 4096, 1024 * 4096);
            let data = pattern(3 << 20, 3);
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 10,
                    blocks: 768,
                    fua: false,
                },
                Some(IoBuf::from_vec(data.clone())),
            );
            assert_eq!(c.result, Ok(()));
            let c = run(
                &mut d,
                BdevOp::Read {
                    lba: 10,
                    blocks: 768,
                },
                Some(IoBuf::zeroed(3 << 20)),
            );
            assert_eq!(c.result, Ok(()));
            assert!(c.buf.unwrap().as_slice() == &data[..]);
        }
    }

    #[test]
    fn out_of_range_and_bad_buffer() {
        for direct in modes() {
            let (_p, mut d) = open("range", direct, 4096, 8 * 4096);
            d.submit(BdevIo {
                tag: 3,
                op: BdevOp::Read { lba: 8, blocks: 1 },
                buf: Some(IoBuf::zeroed(4096)),
            })
            .unwrap();
            // Queued, not completed, until poll.
            assert_eq!(d.in_flight(), 1);
            let out = wait_for(&mut d, 1);
            assert!(matches!(out[0].result, Err(BdevError::OutOfRange { .. })));
            assert!(out[0].buf.is_some());
            let c = run(
                &mut d,
                BdevOp::Unmap {
                    lba: 1,
                    blocks: u64::MAX,
                },
                None,
            );
            assert!(matches!(c.result, Err(BdevError::OutOfRange { .. })));
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: u64::MAX,
                    blocks: 2,
                    fua: true,
                },
                Some(IoBuf::zeroed(8192)),
            );
            assert!(matches!(c.result, Err(BdevError::OutOfRange { .. })));
            let (e, back) = d
                .submit(BdevIo {
                    tag: 4,
                    op: BdevOp::Write {
                        lba: 0,
                        blocks: 2,
                        fua: false,
                    },
                    buf: Some(IoBuf::zeroed(4096)),
                })
                .unwrap_err();
            assert_eq!(
                e,
                BdevError::BadBuffer {
                    expected: 8192,
                    got: 4096
                }
            );
            assert_eq!(back.tag, 4);
            let (e, _) = d
                .submit(BdevIo {
                    tag: 5,
                    op: BdevOp::Read { lba: 0, blocks: 1 },
                    buf: None,
                })
                .unwrap_err();
            assert!(matches!(e, BdevError::BadBuffer { .. }));
            // Empty requests complete at once, successfully.
            let c = run(&mut d, BdevOp::Unmap { lba: 8, blocks: 0 }, None);
            assert_eq!(c.result, Ok(()));
            let c = run(
                &mut d,
                BdevOp::Read { lba: 0, blocks: 0 },
                Some(IoBuf::zeroed(0)),
            );
            assert_eq!(c.result, Ok(()));
            // A buffer given to a flush is handed back untouched.
            let c = run(&mut d, BdevOp::Flush, Some(IoBuf::from_slice(&[5; 16])));
            assert_eq!(c.result, Ok(()));
            assert_eq!(c.buf.unwrap().as_slice(), &[5; 16]);
            assert_eq!(d.in_flight(), 0);
        }
    }

    #[test]
    fn unmap_then_zeroes_and_lba_status() {
        for direct in modes() {
            let bs = 4096u64;
            let (_p, mut d) = open("hole", direct, 4096, 256 * bs);
            // A fresh sparse file is one hole.
            assert_eq!(d.lba_status(0), (LbaState::Deallocated, 256));
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 0,
                    blocks: 128,
                    fua: false,
                },
                Some(IoBuf::from_vec(vec![0xcd; 128 * 4096])),
            );
            assert_eq!(c.result, Ok(()));
            let (state, run_len) = d.lba_status(0);
            assert_eq!(state, LbaState::Mapped);
            assert!(run_len >= 128, "{run_len}");
            assert_eq!(d.lba_status(200), (LbaState::Deallocated, 56));

            let c = run(
                &mut d,
                BdevOp::Unmap {
                    lba: 32,
                    blocks: 64,
                },
                None,
            );
            if c.result == Err(BdevError::Unsupported("hole punching on this file system")) {
                continue; // nothing more to check on such a file system
            }
            assert_eq!(c.result, Ok(()));
            assert_eq!(d.lba_status(0), (LbaState::Mapped, 32));
            assert_eq!(d.lba_status(32), (LbaState::Deallocated, 64));
            assert_eq!(d.lba_status(40), (LbaState::Deallocated, 56));
            assert_eq!(d.lba_status(96), (LbaState::Mapped, 32));

            let c = run(
                &mut d,
                BdevOp::Read { lba: 31, blocks: 2 },
                Some(IoBuf::from_vec(vec![1; 8192])),
            );
            let buf = c.buf.unwrap();
            assert!(buf.as_slice()[..4096].iter().all(|&b| b == 0xcd));
            assert!(buf.as_slice()[4096..].iter().all(|&b| b == 0));

            let c = run(
                &mut d,
                BdevOp::WriteZeroes {
                    lba: 100,
                    blocks: 4,
                },
                None,
            );
            assert_eq!(c.result, Ok(()));
            let c = run(
                &mut d,
                BdevOp::Read { lba: 99, blocks: 6 },
                Some(IoBuf::from_vec(vec![1; 6 * 4096])),
            );
            let buf = c.buf.unwrap();
            assert!(buf.as_slice()[..4096].iter().all(|&b| b == 0xcd));
            assert!(buf.as_slice()[4096..5 * 4096].iter().all(|&b| b == 0));
            assert!(buf.as_slice()[5 * 4096..].iter().all(|&b| b == 0xcd));
            assert_eq!(d.lba_status(100), (LbaState::Deallocated, 4));
        }
    }

    #[test]
    fn write_zeroes_fallback_stages() {
        // Drive the fallback chain directly: ZERO_RANGE, then plain zero writes.
        for direct in modes() {
            let (_p, mut d) = open("zfall", direct, 512, 8192 * 512);
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 0,
                    blocks: 8192,
                    fua: false,
                },
                Some(IoBuf::from_vec(vec![0xab; 8192 * 512])),
            );
            assert_eq!(c.result, Ok(()));
            for (stage, lba, blocks) in [(Stage::ZeroRange, 1, 3), (Stage::ZeroWrites, 10, 4000)] {
                // Queue a slot that starts directly at the fallback stage.
                let idx = d.free.pop().unwrap();
                d.slots[idx as usize] = Some(Slot {
                    tag: 9,
                    op: BdevOp::WriteZeroes { lba, blocks },
                    buf: None,
                    offset: lba * 512,
                    len: blocks * 512,
                    done: 0,
                    stage,
                    retries: 0,
                });
                d.push_slot(idx).unwrap();
                let out = wait_for(&mut d, 1);
                assert_eq!(out[0].result, Ok(()), "{stage:?}");
                let c = run(
                    &mut d,
                    BdevOp::Read {
                        lba: lba - 1,
                        blocks: blocks as u32 + 2,
                    },
                    Some(IoBuf::zeroed((blocks as usize + 2) * 512)),
                );
                let b = c.buf.unwrap();
                let s = b.as_slice();
                assert!(s[..512].iter().all(|&x| x == 0xab));
                assert!(s[512..s.len() - 512].iter().all(|&x| x == 0), "{stage:?}");
                assert!(s[s.len() - 512..].iter().all(|&x| x == 0xab));
            }
        }
    }

    #[test]
    fn on_cqe_handles_short_transfers_and_errors() {
        let (_p, mut d) = open("cqe", false, 512, 64 * 512);
        let mk = |d: &mut UringBdev, op: BdevOp, stage: Stage, len: u64| {
            let idx = d.free.pop().unwrap();
            d.slots[idx as usize] = Some(Slot {
                tag: 1,
                op,
                buf: Some(IoBuf::zeroed(len as usize)),
                offset: 0,
                len,
                done: 0,
                stage,
                retries: 0,
            });
            idx
        };
        let read = BdevOp::Read { lba: 0, blocks: 4 };
        let i = mk(&mut d, read.clone(), Stage::Rw, 2048);
        assert!(matches!(d.on_cqe(i, 1024), Next::Resubmit));
        assert_eq!(d.slots[i as usize].as_ref().unwrap().done, 1024);
        assert!(matches!(d.on_cqe(i, 1024), Next::Finished(Ok(()))));
        let i2 = mk(&mut d, read.clone(), Stage::Rw, 2048);
        // Zero bytes: EOF, an error, never success.
        assert!(matches!(
            d.on_cqe(i2, 0),
            Next::Finished(Err(BdevError::Io(libc::EIO)))
        ));
        let i3 = mk(&mut d, read, Stage::Rw, 2048);
        for _ in 0..MAX_RETRIES {
            assert!(matches!(d.on_cqe(i3, -libc::EAGAIN), Next::Resubmit));
        }
        assert!(matches!(
            d.on_cqe(i3, -libc::EAGAIN),
            Next::Finished(Err(BdevError::Io(libc::EAGAIN)))
        ));
        let u = mk(
            &mut d,
            BdevOp::Unmap { lba: 0, blocks: 4 },
            Stage::Punch,
            2048,
        );
        assert!(matches!(
            d.on_cqe(u, -libc::EOPNOTSUPP),
            Next::Finished(Err(BdevError::Unsupported(_)))
        ));
        let z = mk(
            &mut d,
            BdevOp::WriteZeroes { lba: 0, blocks: 4 },
            Stage::Punch,
            2048,
        );
        assert!(matches!(d.on_cqe(z, -libc::EOPNOTSUPP), Next::Resubmit));
        assert_eq!(
            d.slots[z as usize].as_ref().unwrap().stage,
            Stage::ZeroRange
        );
        assert!(matches!(d.on_cqe(z, -libc::EOPNOTSUPP), Next::Resubmit));
        assert_eq!(
            d.slots[z as usize].as_ref().unwrap().stage,
            Stage::ZeroWrites
        );
        assert!(matches!(
            d.on_cqe(z, -libc::EIO),
            Next::Finished(Err(BdevError::Io(libc::EIO)))
        ));
        // Unknown slots are errors, not panics.
        assert!(matches!(d.on_cqe(60_000, 0), Next::Finished(Err(_))));
        for i in [i, i2, i3, u, z] {
            d.finish(i, Ok(()));
        }
        d.local.clear();
    }

    #[test]
    fn short_read_at_end_of_shrunk_file_is_an_error() {
        for direct in modes() {
            let (p, mut d) = open("short", direct, 4096, 16 * 4096);
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 0,
                    blocks: 16,
                    fua: false,
                },
                Some(IoBuf::from_vec(vec![7; 16 * 4096])),
            );
            assert_eq!(c.result, Ok(()));
            // Shrink the file behind the device's back: a read across the new end gets a
            // short transfer, then 0 bytes.
            OpenOptions::new()
                .write(true)
                .open(&p.0)
                .unwrap()
                .set_len(6 * 4096)
                .unwrap();
            let c = run(
                &mut d,
                BdevOp::Read { lba: 4, blocks: 4 },
                Some(IoBuf::zeroed(4 * 4096)),
            );
            assert_eq!(c.result, Err(BdevError::Io(libc::EIO)));
            assert!(c.buf.is_some());
        }
    }

    #[test]
    fn queue_full_with_tiny_depth() {
        for direct in modes() {
            let p = TempPath::new("qfull", direct);
            let o = UringOptions {
                queue_depth: 2,
                direct,
            };
            let mut d = UringBdev::open("u", &p.0, 512, Some(64 * 512), o).unwrap();
            for tag in 0..2 {
                d.submit(BdevIo {
                    tag,
                    op: BdevOp::Write {
                        lba: tag,
                        blocks: 1,
                        fua: false,
                    },
                    buf: Some(IoBuf::zeroed(512)),
                })
                .unwrap();
            }
            let (e, back) = d
                .submit(BdevIo {
                    tag: 2,
                    op: BdevOp::Read { lba: 0, blocks: 1 },
                    buf: Some(IoBuf::from_slice(&[3; 512])),
                })
                .unwrap_err();
            assert_eq!(e, BdevError::QueueFull);
            assert_eq!(back.tag, 2);
            assert_eq!(back.buf.as_ref().unwrap().as_slice(), &[3; 512]);
            assert_eq!(d.in_flight(), 2);
            // Range errors do not take a slot.
            d.submit(BdevIo {
                tag: 5,
                op: BdevOp::Read { lba: 64, blocks: 1 },
                buf: Some(IoBuf::zeroed(512)),
            })
            .unwrap();
            let out = wait_for(&mut d, 3);
            assert_eq!(out.len(), 3);
            assert_eq!(d.in_flight(), 0);
            // Room again.
            let c = run(&mut d, back.op, back.buf);
            assert_eq!(c.result, Ok(()));
        }
    }

    #[test]
    fn many_concurrent_requests() {
        for direct in modes() {
            let blocks = 512u64;
            let (_p, mut d) = open("many", direct, 4096, blocks * 4096);
            // Writes of different sizes, all in flight at once.
            let mut tag = 0u64;
            let mut lba = 0u64;
            let mut expect = Vec::new();
            while lba < blocks {
                let n = (tag % 7 + 1).min(blocks - lba);
                let data = pattern(n as usize * 4096, tag as u8);
                d.submit(BdevIo {
                    tag,
                    op: BdevOp::Write {
                        lba,
                        blocks: n as u32,
                        fua: tag.is_multiple_of(5),
                    },
                    buf: Some(IoBuf::from_vec(data.clone())),
                })
                .unwrap();
                expect.push((tag, lba, n, data));
                tag += 1;
                lba += n;
            }
            let out = wait_for(&mut d, expect.len());
            assert_eq!(out.len(), expect.len());
            assert!(out.iter().all(|c| c.result.is_ok()));
            let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
            tags.sort_unstable();
            assert_eq!(tags, (0..expect.len() as u64).collect::<Vec<_>>());

            // Reads in reverse, with one large read first: completions may come in any order.
            d.submit(BdevIo {
                tag: 10_000,
                op: BdevOp::Read {
                    lba: 0,
                    blocks: blocks as u32,
                },
                buf: Some(IoBuf::zeroed(blocks as usize * 4096)),
            })
            .unwrap();
            for (t, lba, n, _) in expect.iter().rev() {
                d.submit(BdevIo {
                    tag: *t,
                    op: BdevOp::Read {
                        lba: *lba,
                        blocks: *n as u32,
                    },
                    buf: Some(IoBuf::zeroed(*n as usize * 4096)),
                })
                .unwrap();
            }
            assert_eq!(d.in_flight(), expect.len() + 1);
            let out = wait_for(&mut d, expect.len() + 1);
            assert_eq!(d.in_flight(), 0);
            let mut whole = Vec::new();
            for c in out {
                assert_eq!(c.result, Ok(()));
                let buf = c.buf.unwrap();
                if c.tag == 10_000 {
                    whole = buf.into_vec();
                    continue;
                }
                let (_, _, _, data) = &expect[c.tag as usize];
                assert!(buf.as_slice() == &data[..], "tag {}", c.tag);
            }
            let mut off = 0;
            for (_, _, n, data) in &expect {
                assert!(whole[off..off + *n as usize * 4096] == data[..]);
                off += *n as usize * 4096;
            }
        }
    }

    #[test]
    fn completion_eventfd_becomes_readable() {
        for direct in modes() {
            let (_p, mut d) = open("efd", direct, 4096, 16 * 4096);
            let fd = d.completion_fd().expect("eventfd");
            let readable = |timeout_ms: i32| {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, alive for the call.
                let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
                n == 1 && pfd.revents & libc::POLLIN != 0
            };
            assert!(!readable(0));
            d.submit(BdevIo {
                tag: 1,
                op: BdevOp::Write {
                    lba: 3,
                    blocks: 1,
                    fua: false,
                },
                buf: Some(IoBuf::zeroed(4096)),
            })
            .unwrap();
            // Not yet handed to the kernel: submit only queues.
            assert_eq!(d.submit_pending(), 1);
            assert!(readable(10_000), "no completion signalled");
            assert!(d.ack_completion_fd() >= 1);
            assert!(!readable(0));
            let mut out = Vec::new();
            assert_eq!(d.poll(&mut out), 1);
            assert_eq!(out[0].result, Ok(()));
            assert_eq!(d.submit_pending(), 0);
        }
    }

    #[test]
    fn resize_file() {
        for direct in modes() {
            let (p, mut d) = open("resize", direct, 512, 16 * 512);
            d.resize(64).unwrap();
            assert_eq!(d.num_blocks(), 64);
            assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 64 * 512);
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 63,
                    blocks: 1,
                    fua: false,
                },
                Some(IoBuf::zeroed(512)),
            );
            assert_eq!(c.result, Ok(()));
            d.resize(8).unwrap();
            let c = run(
                &mut d,
                BdevOp::Read { lba: 8, blocks: 1 },
                Some(IoBuf::zeroed(512)),
            );
            assert!(matches!(c.result, Err(BdevError::OutOfRange { .. })));
            assert!(d.resize(0).is_err());
            assert!(d.resize(u64::MAX).is_err());
            assert_eq!(d.num_blocks(), 8);
        }
    }

    #[test]
    fn drop_with_requests_in_flight_waits() {
        for direct in modes() {
            for hand_over in [false, true] {
                let (_p, mut d) = open("drop", direct, 512, 1 << 22);
                for i in 0..64 {
                    let op = if i % 2 == 0 {
                        BdevOp::Write {
                            lba: i * 64,
                            blocks: 64,
                            fua: i % 4 == 0,
                        }
                    } else {
                        BdevOp::Read {
                            lba: i * 64,
                            blocks: 64,
                        }
                    };
                    d.submit(BdevIo {
                        tag: i,
                        op,
                        buf: Some(IoBuf::zeroed(64 * 512)),
                    })
                    .unwrap();
                }
                d.submit(BdevIo {
                    tag: 99,
                    op: BdevOp::WriteZeroes {
                        lba: 0,
                        blocks: 100,
                    },
                    buf: None,
                })
                .unwrap();
                if hand_over {
                    d.submit_pending();
                }
                assert!(d.in_flight() > 0);
                drop(d);
            }
        }
    }

    /// On a real block device (it is overwritten!), e.g. a loop device:
    /// `URING_BDEV_TEST_DEV=/dev/loopN cargo test -p dataplane --lib bdev::uring -- --ignored`
    #[test]
    #[ignore]
    fn block_device_from_env() {
        let Some(dev) = std::env::var_os("URING_BDEV_TEST_DEV") else {
            eprintln!("URING_BDEV_TEST_DEV not set: skipped");
            return;
        };
        let path = PathBuf::from(dev);
        let file = File::open(&path).unwrap();
        let lbs = blk_logical_block_size(&file).unwrap();
        let size = blk_size(&file).unwrap();
        drop(file);
        if lbs > 512 {
            match UringBdev::open("b", &path, 512, None, opts(true)) {
                Err(BdevError::Config(msg)) => assert!(msg.contains("logical block size"), "{msg}"),
                other => panic!("512-byte blocks on a {lbs}-byte device: {other:?}"),
            }
        }
        for direct in [true, false] {
            let mut d = UringBdev::open("b", &path, 4096, None, opts(direct)).unwrap();
            assert!(d.is_block_device());
            assert!(!d.thin_provisioned());
            assert_eq!(d.num_blocks(), size / 4096);
            assert!(d.open_blocks_too_large_is_refused(&path, size));
            assert_eq!(d.lba_status(0), (LbaState::Mapped, d.num_blocks()));
            assert!(matches!(d.resize(1), Err(BdevError::Unsupported(_))));
            let data = pattern(8 * 4096, 1);
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba: 8,
                    blocks: 8,
                    fua: true,
                },
                Some(IoBuf::from_vec(data.clone())),
            );
            assert_eq!(c.result, Ok(()));
            assert_eq!(run(&mut d, BdevOp::Flush, None).result, Ok(()));
            let read = |d: &mut UringBdev| {
                let c = run(
                    d,
                    BdevOp::Read { lba: 8, blocks: 8 },
                    Some(IoBuf::zeroed(8 * 4096)),
                );
                assert_eq!(c.result, Ok(()));
                c.buf.unwrap().into_vec()
            };
            assert!(read(&mut d) == data);
            let c = run(&mut d, BdevOp::Unmap { lba: 9, blocks: 2 }, None);
            eprintln!(
                "{}: unmap (direct={direct}): {:?}",
                path.display(),
                c.result
            );
            if c.result.is_ok() {
                let back = read(&mut d);
                assert!(back[4096..3 * 4096].iter().all(|&b| b == 0));
                assert!(back[..4096] == data[..4096]);
            }
            let c = run(&mut d, BdevOp::WriteZeroes { lba: 12, blocks: 3 }, None);
            assert_eq!(c.result, Ok(()));
            let back = read(&mut d);
            assert!(back[4 * 4096..7 * 4096].iter().all(|&b| b == 0));
            assert!(back[7 * 4096..] == data[7 * 4096..]);
        }
    }

    impl UringBdev {
        /// A size larger than the device is refused.
        fn open_blocks_too_large_is_refused(&self, path: &Path, size: u64) -> bool {
            matches!(
                UringBdev::open("b", path, 4096, Some(size + 4096), opts(false)),
                Err(BdevError::Config(_))
            )
        }
    }

    /// Quick throughput self-check (not part of the normal run):
    /// `cargo test -p dataplane --lib bdev::uring::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_random_4k_reads_qd32() {
        let direct = direct_dir().is_some();
        let blocks: u64 = 65536; // 256 MiB
        let (_p, mut d) = open("bench", direct, 4096, blocks * 4096);
        // Fill the file so reads hit real data, not holes.
        let chunk = 256u64;
        for lba in (0..blocks).step_by(chunk as usize) {
            let c = run(
                &mut d,
                BdevOp::Write {
                    lba,
                    blocks: chunk as u32,
                    fua: false,
                },
                Some(IoBuf::from_vec(vec![0x5a; chunk as usize * 4096])),
            );
            assert_eq!(c.result, Ok(()));
        }
        d.flush_blocking().unwrap();
        let depth = 32;
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next_lba = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        };
        let mut bufs: Vec<IoBuf> = (0..depth).map(|_| IoBuf::zeroed(4096)).collect();
        for (i, b) in bufs.drain(..).enumerate() {
            d.submit(BdevIo {
                tag: i as u64,
                op: BdevOp::Read {
                    lba: next_lba(),
                    blocks: 1,
                },
                buf: Some(b),
            })
            .unwrap();
        }
        let start = Instant::now();
        let mut done = 0u64;
        let mut out = Vec::with_capacity(depth);
        while start.elapsed() < Duration::from_secs(3) {
            d.poll(&mut out);
            for c in out.drain(..) {
                assert_eq!(c.result, Ok(()));
                done += 1;
                d.submit(BdevIo {
                    tag: c.tag,
                    op: BdevOp::Read {
                        lba: next_lba(),
                        blocks: 1,
                    },
                    buf: c.buf,
                })
                .unwrap();
            }
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "uring bdev (direct={direct}): 4 KiB random reads, QD {depth}: {:.0} IOPS ({:.1} MiB/s)",
            done as f64 / secs,
            done as f64 * 4096.0 / secs / (1 << 20) as f64
        );
    }
}
