//! A block device backed by a regular file or a host block device.
//!
//! The reactor never waits for the disk: [`BlockDevice::submit`] checks the request and hands
//! it to a small pool of worker threads through a channel; each worker does the blocking
//! `pread`/`pwrite`/`fdatasync`/`fallocate` and sends the completion back through another
//! channel, which [`BlockDevice::poll`] drains without blocking.
//!
//! The execution of one request is [`execute`], a plain function of the backing [`Backing`];
//! the thread pool (`WorkerPool`) only moves requests to it and completions back, so a
//! different engine (io_uring with O_DIRECT) can replace the pool without touching the rest.
//!
//! Regular files are thin provisioned: unmap and write-zeroes punch holes, and GET LBA STATUS
//! reports holes found with `SEEK_HOLE`/`SEEK_DATA`. Block devices use `BLKDISCARD` and
//! `BLKZEROOUT`, and report every block as mapped.

use super::backing::{self, io_errno, last_errno};
use super::{
    check_buffer, check_geometry, check_op_range, BdevCompletion, BdevError, BdevIo, BdevOp,
    BlockDevice, LbaState,
};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Worker threads per device unless told otherwise.
pub const DEFAULT_WORKERS: usize = 2;

/// `_IO(0x12, 119)`: discard a byte range `[start, len]` of a block device.
const BLKDISCARD: u64 = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range `[start, len]` of a block device.
const BLKZEROOUT: u64 = 0x127f;

/// The open file and what the workers need to know about it.
#[derive(Debug)]
pub struct Backing {
    file: File,
    block_size: u32,
    is_block_device: bool,
}

impl Backing {
    fn byte_offset(&self, lba: u64) -> Result<u64, BdevError> {
        lba.checked_mul(u64::from(self.block_size))
            .ok_or(BdevError::Io(libc::EOVERFLOW))
    }

    fn byte_range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), BdevError> {
        let start = self.byte_offset(lba)?;
        let len = blocks
            .checked_mul(u64::from(self.block_size))
            .ok_or(BdevError::Io(libc::EOVERFLOW))?;
        Ok((start, len))
    }

    fn sync(&self) -> Result<(), BdevError> {
        self.file
            .sync_data()
            .map_err(|e| BdevError::Io(io_errno(&e)))
    }

    /// Punches a hole (regular file) or discards (block device); reads then return zeroes.
    fn deallocate(&self, start: u64, len: u64) -> Result<(), BdevError> {
        if len == 0 {
            return Ok(());
        }
        if self.is_block_device {
            return self.blk_range_ioctl(BLKDISCARD, start, len);
        }
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) else {
            return Err(BdevError::Io(libc::EOVERFLOW));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `self.file` and stays open for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            match last_errno() {
                libc::EOPNOTSUPP | libc::ENOSYS => {
                    Err(BdevError::Unsupported("hole punching on this file system"))
                }
                errno => Err(BdevError::Io(errno)),
            }
        }
    }

    fn blk_range_ioctl(&self, request: u64, start: u64, len: u64) -> Result<(), BdevError> {
        let range: [u64; 2] = [start, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64s (start, length) from the pointer, which
        // points at `range`, alive for the call; the descriptor is owned by `self.file`.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            match last_errno() {
                libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL => {
                    Err(BdevError::Unsupported("discard on this block device"))
                }
                errno => Err(BdevError::Io(errno)),
            }
        }
    }

    /// Writes zero bytes over `[start, start + len)` in bounded chunks.
    fn write_zeroes_slow(&self, start: u64, len: u64) -> Result<(), BdevError> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.file
                .write_all_at(&zeroes[..n as usize], start + done)
                .map_err(|e| BdevError::Io(io_errno(&e)))?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, start: u64, len: u64) -> Result<(), BdevError> {
        if len == 0 {
            return Ok(());
        }
        let fast = if self.is_block_device {
            self.blk_range_ioctl(BLKZEROOUT, start, len)
        } else {
            self.deallocate(start, len)
        };
        match fast {
            Err(BdevError::Unsupported(_)) => self.write_zeroes_slow(start, len),
            other => other,
        }
    }
}

/// Executes one request against the backing file, blocking. The request's range and buffer
/// were checked at submission.
pub fn execute(backing: &Backing, io: &mut BdevIo) -> Result<(), BdevError> {
    match io.op {
        BdevOp::Read { lba, .. } => {
            let off = backing.byte_offset(lba)?;
            let buf = io.buf.as_mut().ok_or(BdevError::BadBuffer {
                expected: 1,
                got: 0,
            })?;
            backing
                .file
                .read_exact_at(buf.as_mut_slice(), off)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        // The file shrank under us (resize or outside truncation).
                        BdevError::Io(libc::EIO)
                    } else {
                        BdevError::Io(io_errno(&e))
                    }
                })
        }
        BdevOp::Write { lba, fua, .. } => {
            let off = backing.byte_offset(lba)?;
            let buf = io.buf.as_ref().ok_or(BdevError::BadBuffer {
                expected: 1,
                got: 0,
            })?;
            backing
                .file
                .write_all_at(buf.as_slice(), off)
                .map_err(|e| BdevError::Io(io_errno(&e)))?;
            if fua {
                backing.sync()?;
            }
            Ok(())
        }
        BdevOp::Flush => backing.sync(),
        BdevOp::Unmap { lba, blocks } => {
            let (start, len) = backing.byte_range(lba, blocks)?;
            backing.deallocate(start, len)
        }
        BdevOp::WriteZeroes { lba, blocks } => {
            let (start, len) = backing.byte_range(lba, blocks)?;
            backing.write_zeroes(start, len)
        }
    }
}

/// Worker threads that run [`execute`] on requests from a shared channel.
#[derive(Debug)]
struct WorkerPool {
    jobs: Option<Sender<BdevIo>>,
    done: Receiver<BdevCompletion>,
    workers: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    fn start(name: &str, backing: Arc<Backing>, threads: usize) -> Result<Self, BdevError> {
        let (job_tx, job_rx) = mpsc::channel::<BdevIo>();
        let (done_tx, done_rx) = mpsc::channel::<BdevCompletion>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut pool = WorkerPool {
            jobs: Some(job_tx),
            done: done_rx,
            workers: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let backing = Arc::clone(&backing);
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("bdev-{name}-{i}"))
                .spawn(move || worker_loop(&backing, &job_rx, &done_tx))
                .map_err(|e| {
                    BdevError::Config(format!("cannot start I/O thread for {name}: {e}"))
                })?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Hands a request to the workers; gives it back if they are gone.
    fn send(&self, io: BdevIo) -> Result<(), BdevIo> {
        match &self.jobs {
            Some(tx) => tx.send(io).map_err(|e| e.0),
            None => Err(io),
        }
    }

    fn stop(&mut self) {
        // Closing the job channel makes every worker's `recv` fail once the queue is empty.
        self.jobs = None;
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                log::error!("block device I/O thread panicked");
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn worker_loop(backing: &Backing, jobs: &Mutex<Receiver<BdevIo>>, done: &Sender<BdevCompletion>) {
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut io) = next else { return };
        let result = execute(backing, &mut io);
        let completion = BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        };
        if done.send(completion).is_err() {
            return;
        }
    }
}

/// A block device on a regular file or a host block device.
#[derive(Debug)]
pub struct FileBdev {
    name: String,
    path: PathBuf,
    backing: Arc<Backing>,
    num_blocks: u64,
    /// Completions produced on the submitting thread (range errors), handed out by `poll`.
    local: VecDeque<BdevCompletion>,
    pool: WorkerPool,
    in_flight: usize,
}

impl FileBdev {
    /// Opens (creating a missing regular file) `path` with [`DEFAULT_WORKERS`] I/O threads.
    ///
    /// Regular files: `size` given extends a shorter file to it (a longer file is left as it is
    /// and only its first `size` bytes are used); `None` uses the current length, which must
    /// not be 0, and a missing file without a size is an error. Block devices: the capacity is the device's size, or `size` when
    /// given and not larger. Sizes must be multiples of `block_size` (512 or 4096).
    pub fn open(
        name: &str,
        path: &Path,
        block_size: u32,
        size: Option<u64>,
    ) -> Result<Self, BdevError> {
        Self::open_with_workers(name, path, block_size, size, DEFAULT_WORKERS)
    }

    /// As [`FileBdev::open`], with `workers` I/O threads (at least 1).
    pub fn open_with_workers(
        name: &str,
        path: &Path,
        block_size: u32,
        size: Option<u64>,
        workers: usize,
    ) -> Result<Self, BdevError> {
        check_geometry(block_size, u64::from(block_size))?;
        // A file this open creates is left behind if a later step fails.
        let opened = backing::open(name, path, size)?;
        let num_blocks = backing::size_blocks(name, path, &opened, block_size, size)?;
        let backing::Opened {
            file,
            is_block_device,
            ..
        } = opened;
        let backing = Arc::new(Backing {
            file,
            block_size,
            is_block_device,
        });
        let pool = WorkerPool::start(name, Arc::clone(&backing), workers)?;
        Ok(FileBdev {
            name: name.to_string(),
            path: path.to_path_buf(),
            backing,
            num_blocks,
            local: VecDeque::new(),
            pool,
            in_flight: 0,
        })
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the backing is a host block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.backing.is_block_device
    }
}

impl BlockDevice for FileBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.backing.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    fn thin_provisioned(&self) -> bool {
        !self.backing.is_block_device
    }

    fn submit(&mut self, io: BdevIo) -> Result<(), (BdevError, BdevIo)> {
        if let Err(e) = check_buffer(&io, self.backing.block_size) {
            return Err((e, io));
        }
        if let Err(e) = check_op_range(&io.op, self.num_blocks) {
            self.local.push_back(BdevCompletion {
                tag: io.tag,
                result: Err(e),
                buf: io.buf,
            });
            self.in_flight += 1;
            return Ok(());
        }
        match self.pool.send(io) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(io) => Err((BdevError::Io(libc::EIO), io)),
        }
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let mut n = self.local.len();
        out.extend(self.local.drain(..));
        while let Ok(c) = self.pool.done.try_recv() {
            out.push(c);
            n += 1;
        }
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn lba_status(&self, lba: u64) -> (LbaState, u64) {
        backing::lba_status(
            &self.backing.file,
            self.backing.is_block_device,
            self.backing.block_size,
            self.num_blocks,
            lba,
        )
    }

    fn resize(&mut self, num_blocks: u64) -> Result<(), BdevError> {
        backing::resize(
            &self.backing.file,
            self.backing.is_block_device,
            self.backing.block_size,
            num_blocks,
        )?;
        self.num_blocks = num_blocks;
        Ok(())
    }

    fn flush_blocking(&mut self) -> Result<(), BdevError> {
        backing::sync_all(&self.backing.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::backing::test_util::{self, TempPath};
    use crate::mem::IoBuf;
    use std::time::Duration;

    /// Temporary files of these tests.
    trait NewTempPath {
        fn new(tag: &str) -> Self;
    }

    impl NewTempPath for TempPath {
        fn new(tag: &str) -> Self {
            TempPath::new_in(&std::env::temp_dir(), "filebdev", tag)
        }
    }

    const NAP: Duration = Duration::from_millis(1);

    fn wait_for(dev: &mut FileBdev, n: usize) -> Vec<BdevCompletion> {
        test_util::wait_for(dev, n, NAP)
    }

    fn run(dev: &mut FileBdev, op: BdevOp, buf: Option<IoBuf>) -> BdevCompletion {
        test_util::run(dev, op, buf, NAP)
    }

    #[test]
    fn open_checks_geometry() {
        let p = TempPath::new("geom");
        assert!(matches!(
            FileBdev::open("f", &p.0, 512, None),
            Err(BdevError::Config(_))
        ));
        assert!(!p.0.exists(), "a failed open must not leave a file behind");
        std::fs::write(&p.0, b"").unwrap();
        assert!(matches!(
            FileBdev::open("f", &p.0, 512, None),
            Err(BdevError::Config(_))
        ));
        assert!(FileBdev::open("f", &p.0, 512, Some(1000)).is_err());
        assert!(FileBdev::open("f", &p.0, 1024, Some(4096)).is_err());
        let d = FileBdev::open("f", &p.0, 512, Some(1 << 20)).unwrap();
        assert_eq!(d.num_blocks(), 2048);
        assert!(d.thin_provisioned());
        assert!(!d.is_block_device());
        assert_eq!(d.path(), p.0.as_path());
        drop(d);
        // Reopened without a size: keeps the existing length.
        let d = FileBdev::open("f", &p.0, 4096, None).unwrap();
        assert_eq!(d.num_blocks(), 256);
        drop(d);
        // A smaller size uses the front of the file without truncating it.
        let d = FileBdev::open("f", &p.0, 512, Some(4096)).unwrap();
        assert_eq!(d.num_blocks(), 8);
        assert_eq!(std::fs::metadata(&p.0).unwrap().len(), 1 << 20);
        assert!(FileBdev::open("f", Path::new("/proc/self"), 512, None).is_err());
    }

    #[test]
    fn round_trip_fua_flush() {
        let p = TempPath::new("rw");
        let mut d = FileBdev::open("f", &p.0, 512, Some(64 * 512)).unwrap();
        let data: Vec<u8> = (0..2048).map(|i| (i * 7 % 256) as u8).collect();
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
        assert!(out.iter().all(|c| c.result.is_ok()));
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, [1, 2]);
        assert_eq!(d.in_flight(), 0);

        let c = run(
            &mut d,
            BdevOp::Read { lba: 4, blocks: 4 },
            Some(IoBuf::zeroed(2048)),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.buf.unwrap().as_slice(), &data[..]);
        // The bytes are really in the file.
        let on_disk = std::fs::read(&p.0).unwrap();
        assert_eq!(&on_disk[2048..4096], &data[..]);
        assert!(d.flush_blocking().is_ok());
    }

    #[test]
    fn out_of_range_and_bad_buffer() {
        let p = TempPath::new("range");
        let mut d = FileBdev::open("f", &p.0, 4096, Some(8 * 4096)).unwrap();
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
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn punch_hole_visible_in_lba_status() {
        let p = TempPath::new("hole");
        let bs = 4096u64;
        let mut d = FileBdev::open("f", &p.0, 4096, Some(256 * bs)).unwrap();
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
            return; // e.g. a tmpfs too old to punch holes: nothing more to check
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
            BdevOp::Read {
                lba: 100,
                blocks: 4,
            },
            Some(IoBuf::from_vec(vec![1; 4 * 4096])),
        );
        assert!(c.buf.unwrap().as_slice().iter().all(|&b| b == 0));
        assert_eq!(d.lba_status(100), (LbaState::Deallocated, 4));
    }

    #[test]
    fn resize_file() {
        let p = TempPath::new("resize");
        let mut d = FileBdev::open("f", &p.0, 512, Some(16 * 512)).unwrap();
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
    }

    #[test]
    fn drop_with_requests_in_flight_joins_workers() {
        let p = TempPath::new("drop");
        let mut d = FileBdev::open_with_workers("f", &p.0, 512, Some(1 << 20), 3).unwrap();
        for i in 0..32 {
            d.submit(BdevIo {
                tag: i,
                op: BdevOp::Write {
                    lba: i,
                    blocks: 1,
                    fua: false,
                },
                buf: Some(IoBuf::zeroed(512)),
            })
            .unwrap();
        }
        drop(d);
    }
}
