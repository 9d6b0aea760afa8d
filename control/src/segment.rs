//! The segment: layout, creation by the dataplane, validated opening by readers, and the
//! per-reactor statistics seqlocks.

use crate::{ABI_MAGIC, ABI_VERSION};
use memmap2::{MmapMut, MmapOptions};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Latency histogram buckets: bucket `i` counts commands that took below `2^i` µs (the last
/// one everything slower).
pub const LATENCY_BUCKETS: usize = 24;
/// Size reserved for the header.
const HEADER_SIZE: usize = 4096;
/// Size of one reactor's statistics block.
const STATS_STRIDE: usize = 512;
/// Most reactors a segment describes.
const MAX_REACTORS: usize = 256;
/// Slots in the command ring and in the response ring.
pub const RING_SLOTS: usize = 8;
/// Bytes per ring slot: its 16-byte header (generation, length) and the record. A whole
/// configuration travels in one record (`save`, `apply`); pages never written cost nothing.
pub const SLOT_SIZE: usize = 1 << 20;
/// Object statistics blocks (LUNs, connections) each reactor may publish.
pub const OBJECTS_PER_REACTOR: usize = 1024;
/// Size of one object's block.
const OBJECT_STRIDE: usize = 768;
/// Longest object name kept (bytes of UTF-8).
pub const OBJECT_NAME_BYTES: usize = 256;
/// Largest record a slot carries.
pub const MAX_RECORD: usize = SLOT_SIZE - SLOT_HEADER;
const SLOT_HEADER: usize = 16;

/// The segment header. Every field is atomic: a reader may look at it while the dataplane
/// writes it, and the magic is stored last, so a half-created segment never looks valid.
#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub abi_version: AtomicU32,
    pub header_size: AtomicU32,
    pub segment_size: AtomicU64,
    pub pid: AtomicU32,
    pub reactors: AtomicU32,
    pub start_unix_ms: AtomicU64,
    /// Milliseconds since start, refreshed by the dataplane every 100 ms or so.
    pub heartbeat_ms: AtomicU64,
    pub stats_offset: AtomicU64,
    pub stats_stride: AtomicU64,
    /// The command ring's slots, then the response ring's, `ring_slots` of `slot_size` each.
    pub ring_offset: AtomicU64,
    pub ring_slots: AtomicU32,
    pub slot_size: AtomicU32,
    /// Commands submitted so far (written by `iscsictl`, one at a time under a file lock).
    pub cmd_head: AtomicU64,
    /// Commands the dataplane has taken so far (written by the dataplane).
    pub cmd_tail: AtomicU64,
    /// Records the dataplane refused as malformed.
    pub bad_records: AtomicU64,
    /// Per-object statistics: `objects_per_reactor` blocks of `object_stride` bytes for
    /// each reactor in turn.
    pub objects_offset: AtomicU64,
    pub objects_per_reactor: AtomicU32,
    pub object_stride: AtomicU32,
}

/// One ring slot's header; the record follows it.
#[repr(C)]
struct SlotHeader {
    /// Command number + 1 once the record of that command is complete (0: never written).
    generation: AtomicU64,
    len: AtomicU32,
    _pad: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<SlotHeader>() == SLOT_HEADER);

/// What the dataplane found at the next command slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Command number `seq` and its record.
    Record { seq: u64, record: Vec<u8> },
    /// Command number `seq` was malformed (`why`); the dataplane answers it with an error.
    Bad { seq: u64, why: String },
}

/// One reactor's statistics block (behind its seqlock sequence).
#[repr(C)]
struct StatsBlock {
    seq: AtomicU64,
    connections: AtomicU64,
    sessions: AtomicU64,
    io: Counters,
}

/// One object's statistics block (behind its seqlock sequence). Kind 0 is a free block.
#[repr(C)]
struct ObjectBlock {
    seq: AtomicU64,
    kind: AtomicU64,
    id: AtomicU64,
    name_len: AtomicU64,
    name: [AtomicU64; OBJECT_NAME_BYTES / 8],
    io: Counters,
}

/// The command counters and latency histogram both kinds of block end with (the same
/// layout as the fields it replaced).
#[repr(C)]
struct Counters {
    commands: AtomicU64,
    read_commands: AtomicU64,
    write_commands: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_us_sum: AtomicU64,
}

impl Counters {
    /// Relaxed loads into `s` (inside a seqlock read).
    fn load_into(&self, s: &mut ReactorStats) {
        s.commands = self.commands.load(Ordering::Relaxed);
        s.read_commands = self.read_commands.load(Ordering::Relaxed);
        s.write_commands = self.write_commands.load(Ordering::Relaxed);
        s.read_bytes = self.read_bytes.load(Ordering::Relaxed);
        s.write_bytes = self.write_bytes.load(Ordering::Relaxed);
        s.errors = self.errors.load(Ordering::Relaxed);
        for (d, a) in s.latency.iter_mut().zip(self.latency.iter()) {
            *d = a.load(Ordering::Relaxed);
        }
        s.latency_us_sum = self.latency_us_sum.load(Ordering::Relaxed);
    }

    /// Relaxed stores from `s` (inside a seqlock write).
    fn store(&self, s: &ReactorStats) {
        self.commands.store(s.commands, Ordering::Relaxed);
        self.read_commands.store(s.read_commands, Ordering::Relaxed);
        self.write_commands
            .store(s.write_commands, Ordering::Relaxed);
        self.read_bytes.store(s.read_bytes, Ordering::Relaxed);
        self.write_bytes.store(s.write_bytes, Ordering::Relaxed);
        self.errors.store(s.errors, Ordering::Relaxed);
        for (a, v) in self.latency.iter().zip(s.latency.iter()) {
            a.store(*v, Ordering::Relaxed);
        }
        self.latency_us_sum
            .store(s.latency_us_sum, Ordering::Relaxed);
    }
}

const _: () = assert!(std::mem::size_of::<ObjectBlock>() <= OBJECT_STRIDE);
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);
const _: () = assert!(std::mem::size_of::<StatsBlock>() <= STATS_STRIDE);

/// A consistent copy of one reactor's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReactorStats {
    pub connections: u64,
    pub sessions: u64,
    pub commands: u64,
    pub read_commands: u64,
    pub write_commands: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Commands that ended with a status other than GOOD.
    pub errors: u64,
    pub latency: [u64; LATENCY_BUCKETS],
    /// Sum of the commands' latencies in microseconds (with `commands`: the mean).
    pub latency_us_sum: u64,
}

impl ReactorStats {
    /// Adds another block (totals over reactors).
    pub fn add(&mut self, o: &ReactorStats) {
        self.connections += o.connections;
        self.sessions += o.sessions;
        self.commands += o.commands;
        self.read_commands += o.read_commands;
        self.write_commands += o.write_commands;
        self.read_bytes += o.read_bytes;
        self.write_bytes += o.write_bytes;
        self.errors += o.errors;
        for (a, b) in self.latency.iter_mut().zip(o.latency.iter()) {
            *a += b;
        }
        self.latency_us_sum += o.latency_us_sum;
    }

    /// Records one command's latency in microseconds.
    pub fn record_latency(&mut self, micros: u64) {
        let bucket = (64 - micros.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency[bucket] += 1;
        self.latency_us_sum = self.latency_us_sum.wrapping_add(micros);
    }
}

/// What an object statistics block describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A LUN: `id` is target id << 32 | LUN, the name `TARGET/LUN`. Each reactor counts
    /// the commands its connections sent to it: readers add the blocks of one name up.
    Lun = 1,
    /// A connection: `id` is its connection id, the name `PEER INITIATOR -> TARGET`. Its
    /// counters cover its whole life (they move with it between reactors).
    Connection = 2,
}

/// A consistent copy of one object's block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStats {
    pub reactor: usize,
    pub kind: ObjectKind,
    pub id: u64,
    pub name: String,
    /// Command counters and latency (`connections` and `sessions` stay 0).
    pub stats: ReactorStats,
}

/// Why a segment cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbiError {
    /// No segment at that path: the dataplane is not running (with this instance name).
    NotFound(PathBuf),
    Io(String),
    /// Smaller than a header, or than what the header says.
    Truncated {
        size: u64,
        expected: u64,
    },
    BadMagic(u64),
    Version {
        found: u32,
        expected: u32,
    },
    /// Offsets or counts that do not fit the segment.
    Corrupt(&'static str),
    /// Another live dataplane owns this instance.
    InUse {
        pid: u32,
    },
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbiError::NotFound(p) => write!(
                f,
                "no control segment at {} (is iscsi-tgt running with this --instance?)",
                p.display()
            ),
            AbiError::Io(e) => write!(f, "{e}"),
            AbiError::Truncated { size, expected } => {
                write!(f, "segment of {size} bytes, expected {expected}")
            }
            AbiError::BadMagic(m) => write!(f, "not an iscsi-tgt control segment (magic {m:#x})"),
            AbiError::Version { found, expected } => write!(
                f,
                "control ABI version {found}, this iscsictl speaks {expected}: use the matching iscsictl"
            ),
            AbiError::Corrupt(what) => write!(f, "corrupt control segment: {what}"),
            AbiError::InUse { pid } => write!(
                f,
                "another iscsi-tgt (pid {pid}) is running with this instance name"
            ),
        }
    }
}

impl std::error::Error for AbiError {}

/// The segment path of an instance.
pub fn segment_path(instance: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/iscsi-tgt.{instance}"))
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks whether the process exists.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// A mapped segment, as its creator (the dataplane) or a reader (`iscsictl`).
pub struct Segment {
    map: MmapMut,
    path: PathBuf,
    owner: bool,
    /// The layout, as created or as validated at open. Never re-read from the mapping:
    /// another process may scribble over the header at any time.
    reactors: usize,
    stats_offset: usize,
    stats_stride: usize,
    objects_offset: usize,
    ring_offset: usize,
}

// SAFETY: all shared access goes through atomics inside the mapping.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates (or replaces a stale) segment for `reactors` reactors. Fails when a live
    /// dataplane owns the instance.
    pub fn create(path: &Path, reactors: usize) -> Result<Segment, AbiError> {
        if reactors == 0 || reactors > MAX_REACTORS {
            return Err(AbiError::Corrupt("reactor count out of range"));
        }
        if let Ok(old) = Segment::open(path) {
            let pid = old.header().pid.load(Ordering::Acquire);
            if pid != std::process::id() && pid_alive(pid) {
                return Err(AbiError::InUse { pid });
            }
        }
        // A stale or foreign file: replace it (unlink first so a reader still mapping the
        // old one keeps a consistent view of it).
        let _ = std::fs::remove_file(path);
        let objects_offset = HEADER_SIZE + reactors * STATS_STRIDE;
        let ring_offset = objects_offset + reactors * OBJECTS_PER_REACTOR * OBJECT_STRIDE;
        let size = ring_offset + 2 * RING_SLOTS * SLOT_SIZE;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| AbiError::Io(format!("create {}: {e}", path.display())))?;
        file.set_len(size as u64)
            .map_err(|e| AbiError::Io(format!("size {}: {e}", path.display())))?;
        // SAFETY: we just created and sized the file; the mapping is shared so readers see
        // our stores; all concurrent access goes through atomics.
        let map = unsafe { MmapOptions::new().len(size).map_mut(&file) }
            .map_err(|e| AbiError::Io(format!("map {}: {e}", path.display())))?;
        let seg = Segment {
            map,
            path: path.to_path_buf(),
            owner: true,
            reactors,
            stats_offset: HEADER_SIZE,
            stats_stride: STATS_STRIDE,
            objects_offset,
            ring_offset,
        };
        let h = seg.header();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        h.abi_version.store(ABI_VERSION, Ordering::Relaxed);
        h.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
        h.segment_size.store(size as u64, Ordering::Relaxed);
        h.pid.store(std::process::id(), Ordering::Relaxed);
        h.reactors.store(reactors as u32, Ordering::Relaxed);
        h.start_unix_ms.store(now_ms, Ordering::Relaxed);
        h.heartbeat_ms.store(0, Ordering::Relaxed);
        h.stats_offset.store(HEADER_SIZE as u64, Ordering::Relaxed);
        h.stats_stride.store(STATS_STRIDE as u64, Ordering::Relaxed);
        h.ring_offset.store(ring_offset as u64, Ordering::Relaxed);
        h.ring_slots.store(RING_SLOTS as u32, Ordering::Relaxed);
        h.slot_size.store(SLOT_SIZE as u32, Ordering::Relaxed);
        h.cmd_head.store(0, Ordering::Relaxed);
        h.cmd_tail.store(0, Ordering::Relaxed);
        h.bad_records.store(0, Ordering::Relaxed);
        h.objects_offset
            .store(objects_offset as u64, Ordering::Relaxed);
        h.objects_per_reactor
            .store(OBJECTS_PER_REACTOR as u32, Ordering::Relaxed);
        h.object_stride
            .store(OBJECT_STRIDE as u32, Ordering::Relaxed);
        // Last: the magic makes the segment valid for readers.
        h.magic.store(ABI_MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Opens and validates an existing segment.
    pub fn open(path: &Path) -> Result<Segment, AbiError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => AbiError::NotFound(path.to_path_buf()),
                _ => AbiError::Io(format!("open {}: {e}", path.display())),
            })?;
        let size = file
            .metadata()
            .map_err(|e| AbiError::Io(e.to_string()))?
            .len();
        if size < HEADER_SIZE as u64 {
            return Err(AbiError::Truncated {
                size,
                expected: HEADER_SIZE as u64,
            });
        }
        // SAFETY: a shared mapping of the whole file; we only touch it through atomics and
        // only within bounds validated below.
        let map = unsafe { MmapOptions::new().len(size as usize).map_mut(&file) }
            .map_err(|e| AbiError::Io(format!("map {}: {e}", path.display())))?;
        let mut seg = Segment {
            map,
            path: path.to_path_buf(),
            owner: false,
            reactors: 0,
            stats_offset: 0,
            stats_stride: 0,
            objects_offset: 0,
            ring_offset: 0,
        };
        let (reactors, off, stride) = seg.validate(size)?;
        seg.reactors = reactors;
        seg.stats_offset = off;
        seg.stats_stride = stride;
        seg.objects_offset = seg.validate_objects(off + stride * reactors)?;
        let objects_end = seg.objects_offset + reactors * OBJECTS_PER_REACTOR * OBJECT_STRIDE;
        seg.ring_offset = seg.validate_ring(size, objects_end)?;
        Ok(seg)
    }

    /// Checks the header against the file; returns the layout (reactors, offset, stride).
    fn validate(&self, size: u64) -> Result<(usize, usize, usize), AbiError> {
        let h = self.header();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != ABI_MAGIC {
            return Err(AbiError::BadMagic(magic));
        }
        let version = h.abi_version.load(Ordering::Relaxed);
        if version != ABI_VERSION {
            return Err(AbiError::Version {
                found: version,
                expected: ABI_VERSION,
            });
        }
        let declared = h.segment_size.load(Ordering::Relaxed);
        if declared != size {
            return Err(AbiError::Truncated {
                size,
                expected: declared,
            });
        }
        let off = h.stats_offset.load(Ordering::Relaxed);
        let stride = h.stats_stride.load(Ordering::Relaxed);
        let n = u64::from(h.reactors.load(Ordering::Relaxed));
        if off < HEADER_SIZE as u64 || stride < std::mem::size_of::<StatsBlock>() as u64 {
            return Err(AbiError::Corrupt("statistics layout"));
        }
        if n == 0 || n > MAX_REACTORS as u64 {
            return Err(AbiError::Corrupt("reactor count"));
        }
        let end = stride
            .checked_mul(n)
            .and_then(|b| b.checked_add(off))
            .ok_or(AbiError::Corrupt("statistics size overflows"))?;
        if end > size || !off.is_multiple_of(8) || !stride.is_multiple_of(8) {
            return Err(AbiError::Corrupt("statistics beyond the segment"));
        }
        Ok((n as usize, off as usize, stride as usize))
    }

    /// Checks the object blocks' layout: this version's count and stride, right after the
    /// reactors' statistics (the rings' check bounds their end).
    fn validate_objects(&self, stats_end: usize) -> Result<usize, AbiError> {
        let h = self.header();
        let off = h.objects_offset.load(Ordering::Relaxed);
        if h.objects_per_reactor.load(Ordering::Relaxed) as usize != OBJECTS_PER_REACTOR
            || h.object_stride.load(Ordering::Relaxed) as usize != OBJECT_STRIDE
            || off != stats_end as u64
        {
            return Err(AbiError::Corrupt("object statistics layout"));
        }
        Ok(off as usize)
    }

    /// Checks the rings' layout: this version's slot count and size, after the statistics.
    fn validate_ring(&self, size: u64, stats_end: usize) -> Result<usize, AbiError> {
        let h = self.header();
        let off = h.ring_offset.load(Ordering::Relaxed);
        if h.ring_slots.load(Ordering::Relaxed) as usize != RING_SLOTS
            || h.slot_size.load(Ordering::Relaxed) as usize != SLOT_SIZE
        {
            return Err(AbiError::Corrupt("ring geometry"));
        }
        let end = off.checked_add((2 * RING_SLOTS * SLOT_SIZE) as u64);
        if off < stats_end as u64 || !off.is_multiple_of(8) || end.is_none_or(|e| e > size) {
            return Err(AbiError::Corrupt("rings beyond the segment"));
        }
        Ok(off as usize)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Slot `i` of the command ring (`response` false) or the response ring.
    fn slot(&self, response: bool, i: usize) -> (&SlotHeader, *mut u8) {
        let idx = i % RING_SLOTS + if response { RING_SLOTS } else { 0 };
        let off = self.ring_offset + idx * SLOT_SIZE;
        debug_assert!(off + SLOT_SIZE <= self.map.len());
        // SAFETY: the ring layout was created or validated to lie inside the mapping, slots
        // are 8-byte aligned, SlotHeader is repr(C) of atomics; the record area follows it
        // and is only accessed by byte copies.
        unsafe {
            let base = self.map.as_ptr().add(off) as *mut u8;
            (&*(base as *const SlotHeader), base.add(SLOT_HEADER))
        }
    }

    /// Writes a record and its generation into a slot (the record first, then, released,
    /// the generation that makes it valid).
    fn put(&self, response: bool, seq: u64, record: &[u8]) -> Result<(), AbiError> {
        if record.len() > MAX_RECORD {
            return Err(AbiError::Io(format!(
                "record of {} bytes exceeds {MAX_RECORD}",
                record.len()
            )));
        }
        let (h, data) = self.slot(response, seq as usize);
        h.generation.store(0, Ordering::Relaxed);
        fence(Ordering::Release);
        // SAFETY: data has MAX_RECORD bytes (slot layout); the source is our own buffer.
        unsafe { std::ptr::copy_nonoverlapping(record.as_ptr(), data, record.len()) };
        h.len.store(record.len() as u32, Ordering::Relaxed);
        h.generation.store(seq + 1, Ordering::Release);
        Ok(())
    }

    /// Reads the record of command `seq` from a slot, if its generation says it is there.
    /// Never trusts the length: another process may have scribbled anything.
    fn take(&self, response: bool, seq: u64) -> Result<Option<Vec<u8>>, String> {
        let (h, data) = self.slot(response, seq as usize);
        let generation = h.generation.load(Ordering::Acquire);
        if generation != seq + 1 {
            return if response {
                Ok(None)
            } else {
                Err(format!(
                    "slot generation {generation}, expected {}",
                    seq + 1
                ))
            };
        }
        let len = h.len.load(Ordering::Relaxed) as usize;
        if len > MAX_RECORD {
            return Err(format!("record length {len} beyond {MAX_RECORD}"));
        }
        let mut out = vec![0u8; len];
        // SAFETY: len is within the slot's record area (checked); the destination is ours.
        unsafe { std::ptr::copy_nonoverlapping(data, out.as_mut_ptr(), len) };
        fence(Ordering::Acquire);
        if h.generation.load(Ordering::Relaxed) != generation {
            return Err("slot rewritten while read".into());
        }
        Ok(Some(out))
    }

    /// The next command for the dataplane (the segment's owner), which keeps its own count
    /// `next` of commands taken and never trusts the shared one. A head that went backwards
    /// or jumped beyond the ring is garbage: the count resynchronises to it and the jump is
    /// reported as one bad record.
    pub fn next_command(&self, next: &mut u64) -> Option<Incoming> {
        let h = self.header();
        let head = h.cmd_head.load(Ordering::Acquire);
        if head == *next {
            return None;
        }
        let seq = *next;
        if head < seq || head - seq > RING_SLOTS as u64 {
            *next = head;
            h.cmd_tail.store(head, Ordering::Release);
            h.bad_records.fetch_add(1, Ordering::Relaxed);
            return Some(Incoming::Bad {
                seq: head.wrapping_sub(1),
                why: format!("command head {head} out of step with {seq}: resynchronised"),
            });
        }
        *next = seq + 1;
        h.cmd_tail.store(seq + 1, Ordering::Release);
        match self.take(false, seq) {
            Ok(Some(record)) => Some(Incoming::Record { seq, record }),
            Ok(None) => None,
            Err(why) => {
                h.bad_records.fetch_add(1, Ordering::Relaxed);
                Some(Incoming::Bad { seq, why })
            }
        }
    }

    /// Answers command `seq` (the dataplane).
    pub fn respond(&self, seq: u64, record: &[u8]) {
        if let Err(e) = self.put(true, seq, record) {
            let msg = format!("{{\"ok\":false,\"error\":\"response too large: {e}\"}}");
            let _ = self.put(true, seq, msg.as_bytes());
        }
    }

    /// Sends one command and waits for its answer (`iscsictl`). Commands from several
    /// processes are serialised by an exclusive lock on the segment file; a process killed
    /// mid-command leaves at most an unanswered command, which the next one skips.
    pub fn submit(&self, record: &[u8], timeout: std::time::Duration) -> Result<Vec<u8>, AbiError> {
        let lock = File::open(&self.path)
            .map_err(|e| AbiError::Io(format!("open {}: {e}", self.path.display())))?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // SAFETY: flock on an fd we own; released when the file is closed.
            let r = unsafe {
                libc::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&lock),
                    libc::LOCK_EX | libc::LOCK_NB,
                )
            };
            if r == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(AbiError::Io(
                    "another iscsictl holds the command lock".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let h = self.header();
        // Let the dataplane take whatever an earlier (killed) iscsictl left.
        while h.cmd_tail.load(Ordering::Acquire) < h.cmd_head.load(Ordering::Acquire) {
            if std::time::Instant::now() > deadline {
                return Err(AbiError::Io("the dataplane does not take commands".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let seq = h.cmd_head.load(Ordering::Acquire);
        self.put(false, seq, record)?;
        h.cmd_head.store(seq + 1, Ordering::Release);
        loop {
            match self.take(true, seq) {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => {}
                Err(why) => return Err(AbiError::Io(format!("bad response: {why}"))),
            }
            if std::time::Instant::now() > deadline {
                return Err(AbiError::Io(format!(
                    "no answer from the dataplane within {timeout:?}"
                )));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_SIZE bytes (checked at open/create) and
        // page-aligned; Header is repr(C) of atomics, valid for any bit pattern.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// Reactors described.
    pub fn reactors(&self) -> usize {
        self.reactors
    }

    fn block(&self, i: usize) -> Option<&StatsBlock> {
        if i >= self.reactors {
            return None;
        }
        let off = self.stats_offset + i * self.stats_stride;
        if off + std::mem::size_of::<StatsBlock>() > self.map.len() {
            return None;
        }
        // SAFETY: in bounds (checked), 8-byte aligned (validated offset and stride on a
        // page-aligned mapping), and StatsBlock is repr(C) of atomics.
        Some(unsafe { &*(self.map.as_ptr().add(off) as *const StatsBlock) })
    }

    /// The writer for reactor `i`'s block (the dataplane; one writer per block).
    pub fn stats_writer(&self, i: usize) -> Option<StatsWriter<'_>> {
        self.block(i).map(|b| StatsWriter { block: b })
    }

    /// A consistent snapshot of reactor `i`'s statistics; None if the writer kept it busy
    /// through every retry (or it does not exist).
    pub fn read_stats(&self, i: usize) -> Option<ReactorStats> {
        let b = self.block(i)?;
        for _ in 0..1000 {
            let s1 = b.seq.load(Ordering::Acquire);
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let mut s = ReactorStats {
                connections: b.connections.load(Ordering::Relaxed),
                sessions: b.sessions.load(Ordering::Relaxed),
                ..ReactorStats::default()
            };
            b.io.load_into(&mut s);
            fence(Ordering::Acquire);
            if b.seq.load(Ordering::Relaxed) == s1 {
                return Some(s);
            }
        }
        None
    }

    /// Statistics summed over every reactor.
    pub fn total_stats(&self) -> Option<ReactorStats> {
        let mut t = ReactorStats::default();
        for i in 0..self.reactors() {
            t.add(&self.read_stats(i)?);
        }
        Some(t)
    }

    /// Refreshes the heartbeat (the dataplane).
    pub fn beat(&self) {
        let h = self.header();
        let start = h.start_unix_ms.load(Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        h.heartbeat_ms
            .store(now.saturating_sub(start), Ordering::Release);
    }
}

impl Segment {
    fn object(&self, reactor: usize, slot: usize) -> Option<&ObjectBlock> {
        if reactor >= self.reactors || slot >= OBJECTS_PER_REACTOR {
            return None;
        }
        let off = self.objects_offset + (reactor * OBJECTS_PER_REACTOR + slot) * OBJECT_STRIDE;
        if off + std::mem::size_of::<ObjectBlock>() > self.map.len() {
            return None;
        }
        // SAFETY: in bounds (checked), 8-byte aligned (validated offset, stride a multiple
        // of 8, page-aligned mapping), and ObjectBlock is repr(C) of atomics.
        Some(unsafe { &*(self.map.as_ptr().add(off) as *const ObjectBlock) })
    }

    /// The writer of reactor `reactor`'s object block `slot` (the dataplane; one writer per
    /// block: each reactor owns its own blocks).
    pub fn object_writer(&self, reactor: usize, slot: usize) -> Option<ObjectWriter<'_>> {
        self.object(reactor, slot)
            .map(|block| ObjectWriter { block })
    }

    /// Every published object, each block read consistently (a block kept busy through
    /// every retry, or holding a bad name, is left out).
    pub fn read_objects(&self) -> Vec<ObjectStats> {
        let mut out = Vec::new();
        for r in 0..self.reactors {
            for slot in 0..OBJECTS_PER_REACTOR {
                if let Some(o) = self.object(r, slot).and_then(|b| read_object(b, r)) {
                    out.push(o);
                }
            }
        }
        out
    }
}

fn read_object(b: &ObjectBlock, reactor: usize) -> Option<ObjectStats> {
    for _ in 0..1000 {
        let s1 = b.seq.load(Ordering::Acquire);
        if s1 % 2 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let kind = match b.kind.load(Ordering::Relaxed) {
            0 => return None,
            1 => ObjectKind::Lun,
            2 => ObjectKind::Connection,
            _ => return None,
        };
        let id = b.id.load(Ordering::Relaxed);
        let len = b.name_len.load(Ordering::Relaxed) as usize;
        let mut name = Vec::with_capacity(OBJECT_NAME_BYTES);
        for w in &b.name {
            name.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let mut s = ReactorStats::default();
        b.io.load_into(&mut s);
        fence(Ordering::Acquire);
        if b.seq.load(Ordering::Relaxed) != s1 {
            continue;
        }
        if len > OBJECT_NAME_BYTES {
            return None;
        }
        name.truncate(len);
        return Some(ObjectStats {
            reactor,
            kind,
            id,
            name: String::from_utf8_lossy(&name).into_owned(),
            stats: s,
        });
    }
    None
}

/// Publishes one object's statistics.
pub struct ObjectWriter<'a> {
    block: &'a ObjectBlock,
}

impl ObjectWriter<'_> {
    /// Stores the object (its name cut to [`OBJECT_NAME_BYTES`] at a character boundary)
    /// and its counters under the seqlock.
    pub fn publish(&self, kind: ObjectKind, id: u64, name: &str, s: &ReactorStats) {
        let b = self.block;
        let mut end = name.len().min(OBJECT_NAME_BYTES);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; OBJECT_NAME_BYTES];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        let seq = b.seq.load(Ordering::Relaxed);
        b.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        b.kind.store(kind as u64, Ordering::Relaxed);
        b.id.store(id, Ordering::Relaxed);
        b.name_len.store(end as u64, Ordering::Relaxed);
        for (w, c) in b.name.iter().zip(bytes.chunks_exact(8)) {
            w.store(
                u64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
                Ordering::Relaxed,
            );
        }
        b.io.store(s);
        b.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// Marks the block free (the object is gone).
    pub fn clear(&self) {
        let b = self.block;
        let seq = b.seq.load(Ordering::Relaxed);
        b.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        b.kind.store(0, Ordering::Relaxed);
        b.seq.store(seq.wrapping_add(2), Ordering::Release);
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owner {
            // Readers that still map it keep their copy; new readers find no segment.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Publishes one reactor's statistics.
pub struct StatsWriter<'a> {
    block: &'a StatsBlock,
}

impl StatsWriter<'_> {
    /// Stores a new snapshot under the seqlock.
    pub fn publish(&self, s: &ReactorStats) {
        let b = self.block;
        let seq = b.seq.load(Ordering::Relaxed);
        b.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        b.connections.store(s.connections, Ordering::Relaxed);
        b.sessions.store(s.sessions, Ordering::Relaxed);
        b.io.store(s);
        b.seq.store(seq.wrapping_add(2), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("iscsi-ctl-test-{}-{name}", std::process::id()))
    }

    #[test]
    fn objects_publish_read_and_clear() {
        let p = temp("objects");
        let seg = Segment::create(&p, 2).unwrap();
        let reader = Segment::open(&p).unwrap();
        assert!(reader.read_objects().is_empty());
        let mut s = ReactorStats {
            commands: 7,
            read_bytes: 4096,
            ..ReactorStats::default()
        };
        s.record_latency(100);
        let w = seg.object_writer(1, OBJECTS_PER_REACTOR - 1).unwrap();
        w.publish(ObjectKind::Lun, 5, "iqn.x:t/0", &s);
        let long = "é".repeat(200); // 400 bytes: cut at a character boundary
        seg.object_writer(0, 0)
            .unwrap()
            .publish(ObjectKind::Connection, 9, &long, &s);
        assert!(seg.object_writer(2, 0).is_none());
        assert!(seg.object_writer(0, OBJECTS_PER_REACTOR).is_none());
        let objs = reader.read_objects();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].kind, ObjectKind::Connection);
        assert_eq!(objs[0].name, "é".repeat(128));
        assert_eq!(
            (objs[1].reactor, objs[1].id, objs[1].name.as_str()),
            (1, 5, "iqn.x:t/0")
        );
        assert_eq!(objs[1].stats, s);
        w.clear();
        assert_eq!(reader.read_objects().len(), 1);
    }

    #[test]
    fn create_publish_read_and_remove() {
        let p = temp("rw");
        let seg = Segment::create(&p, 2).unwrap();
        let mut s = ReactorStats {
            commands: 10,
            read_commands: 6,
            write_commands: 4,
            read_bytes: 6 * 4096,
            ..ReactorStats::default()
        };
        s.record_latency(30);
        seg.stats_writer(1).unwrap().publish(&s);
        seg.beat();
        let reader = Segment::open(&p).unwrap();
        assert_eq!(reader.reactors(), 2);
        assert_eq!(reader.read_stats(1).unwrap(), s);
        assert_eq!(reader.read_stats(0).unwrap(), ReactorStats::default());
        assert_eq!(reader.total_stats().unwrap().commands, 10);
        assert_eq!(reader.total_stats().unwrap().latency[5], 1, "30 us < 32 us");
        assert_eq!(
            reader.header().pid.load(Ordering::Relaxed),
            std::process::id()
        );
        assert!(reader.read_stats(2).is_none());
        drop(reader);
        drop(seg);
        assert!(matches!(Segment::open(&p), Err(AbiError::NotFound(_))));
    }

    #[test]
    fn garbage_truncation_and_versions_are_refused() {
        let p = temp("bad");
        std::fs::write(&p, vec![0xAB; 100]).unwrap();
        assert!(matches!(
            Segment::open(&p),
            Err(AbiError::Truncated { size: 100, .. })
        ));
        std::fs::write(&p, vec![0xAB; 8192]).unwrap();
        assert!(matches!(Segment::open(&p), Err(AbiError::BadMagic(_))));
        // A valid segment with another version.
        let seg = Segment::create(&p, 1).unwrap();
        seg.header().abi_version.store(99, Ordering::Relaxed);
        assert!(matches!(
            Segment::open(&p),
            Err(AbiError::Version { found: 99, .. })
        ));
        seg.header()
            .abi_version
            .store(ABI_VERSION, Ordering::Relaxed);
        seg.header().reactors.store(100_000, Ordering::Relaxed);
        assert!(matches!(Segment::open(&p), Err(AbiError::Corrupt(_))));
        seg.header().reactors.store(1, Ordering::Relaxed);
        seg.header()
            .stats_offset
            .store(u64::MAX - 10, Ordering::Relaxed);
        assert!(matches!(Segment::open(&p), Err(AbiError::Corrupt(_))));
    }

    /// A dataplane stand-in: answers every command by echoing it, until told to stop.
    fn echo_owner(seg: &Segment, stop: &std::sync::atomic::AtomicBool) -> Vec<Incoming> {
        let mut next = 0;
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match seg.next_command(&mut next) {
                Some(Incoming::Record { seq, record }) => {
                    seg.respond(seq, &record);
                    seen.push(Incoming::Record { seq, record });
                }
                Some(bad) => seen.push(bad),
                None => std::thread::sleep(std::time::Duration::from_micros(100)),
            }
        }
        seen
    }

    #[test]
    fn commands_and_answers_go_round_in_order_through_the_rings() {
        let p = temp("ring");
        let seg = Segment::create(&p, 1).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            let owner = sc.spawn(|| echo_owner(&seg, &stop));
            let client = Segment::open(&p).unwrap();
            let t = std::time::Duration::from_secs(5);
            // More commands than slots: the ring wraps.
            for i in 0..(3 * RING_SLOTS) {
                let rec = format!("{{\"n\":{i}}}");
                assert_eq!(client.submit(rec.as_bytes(), t).unwrap(), rec.as_bytes());
            }
            // Two clients at once are serialised by the file lock.
            let other = Segment::open(&p).unwrap();
            std::thread::scope(|c2| {
                let a = c2.spawn(|| {
                    (0..20)
                        .map(|_| client.submit(b"a", t).unwrap())
                        .collect::<Vec<_>>()
                });
                let b = c2.spawn(|| {
                    (0..20)
                        .map(|_| other.submit(b"b", t).unwrap())
                        .collect::<Vec<_>>()
                });
                assert!(a.join().unwrap().iter().all(|r| r == b"a"));
                assert!(b.join().unwrap().iter().all(|r| r == b"b"));
            });
            // Too large a record is refused before it is written.
            assert!(client.submit(&vec![b'x'; MAX_RECORD + 1], t).is_err());
            stop.store(true, Ordering::Relaxed);
            let seen = owner.join().unwrap();
            assert_eq!(seen.len(), 3 * RING_SLOTS + 40);
            assert!(seen.iter().all(|i| matches!(i, Incoming::Record { .. })));
        });
        assert_eq!(seg.header().bad_records.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn malformed_records_and_heads_are_reported_not_trusted() {
        let p = temp("ringbad");
        let seg = Segment::create(&p, 1).unwrap();
        let h = seg.header();
        let mut next = 0;
        // A head that advanced over a slot never written (a killed or lying producer).
        h.cmd_head.store(1, Ordering::Release);
        assert!(matches!(
            seg.next_command(&mut next),
            Some(Incoming::Bad { seq: 0, .. })
        ));
        // A record whose length lies.
        let (slot, _) = seg.slot(false, 1);
        slot.len.store(u32::MAX, Ordering::Relaxed);
        slot.generation.store(2, Ordering::Release);
        h.cmd_head.store(2, Ordering::Release);
        assert!(matches!(
            seg.next_command(&mut next),
            Some(Incoming::Bad { seq: 1, .. })
        ));
        // A head far ahead: resynchronised, reported once.
        h.cmd_head.store(1_000_000, Ordering::Release);
        assert!(matches!(
            seg.next_command(&mut next),
            Some(Incoming::Bad { .. })
        ));
        assert_eq!(next, 1_000_000);
        assert_eq!(seg.next_command(&mut next), None);
        // A head that went backwards.
        h.cmd_head.store(5, Ordering::Release);
        assert!(matches!(
            seg.next_command(&mut next),
            Some(Incoming::Bad { .. })
        ));
        assert_eq!(next, 5);
        assert_eq!(h.bad_records.load(Ordering::Relaxed), 4);
        // Random bytes over the whole ring area never panic the owner.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for round in 0..200 {
            for i in 0..(2 * RING_SLOTS * SLOT_SIZE / 8) {
                if (i + round) % 97 != 0 {
                    continue;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = seg.ring_offset + i * 8;
                // SAFETY: inside the mapping, 8-byte aligned.
                unsafe {
                    (*(seg.map.as_ptr().add(off) as *const AtomicU64)).store(x, Ordering::Relaxed)
                };
            }
            h.cmd_head.store(x % 64, Ordering::Release);
            while let Some(i) = seg.next_command(&mut next) {
                if let Incoming::Record { seq, .. } = i {
                    seg.respond(seq, b"{}");
                }
            }
        }
    }

    #[test]
    fn the_owner_ignores_scribbles_on_the_header() {
        let p = temp("scribble");
        let seg = Segment::create(&p, 2).unwrap();
        // Another process overwrites the layout fields: the owner keeps its own layout.
        seg.header().reactors.store(u32::MAX, Ordering::Relaxed);
        seg.header().stats_offset.store(3, Ordering::Relaxed);
        seg.header().stats_stride.store(u64::MAX, Ordering::Relaxed);
        let s = ReactorStats {
            commands: 5,
            ..ReactorStats::default()
        };
        seg.stats_writer(1).unwrap().publish(&s);
        assert!(seg.stats_writer(2).is_none());
        assert_eq!(seg.read_stats(1).unwrap(), s);
        // A reader opening it now refuses the scribbled layout.
        assert!(matches!(Segment::open(&p), Err(AbiError::Corrupt(_))));
    }

    #[test]
    fn a_live_owner_keeps_its_instance_and_a_stale_one_is_replaced() {
        let p = temp("owner");
        let seg = Segment::create(&p, 1).unwrap();
        // A different live process (pid 1) claims it: refused.
        seg.header().pid.store(1, Ordering::Relaxed);
        assert_eq!(
            Segment::create(&p, 1).err(),
            Some(AbiError::InUse { pid: 1 })
        );
        // A dead owner: replaced.
        seg.header().pid.store(u32::MAX - 1, Ordering::Relaxed);
        std::mem::forget(seg);
        let fresh = Segment::create(&p, 1).unwrap();
        assert_eq!(
            fresh.header().pid.load(Ordering::Relaxed),
            std::process::id()
        );
    }

    #[test]
    fn readers_never_see_a_torn_block() {
        let p = temp("seqlock");
        let seg = std::sync::Arc::new(Segment::create(&p, 1).unwrap());
        let w = seg.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let writer = std::thread::spawn(move || {
            let sw = w.stats_writer(0).unwrap();
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) && n < 2_000_000 {
                n += 1;
                let s = ReactorStats {
                    commands: n,
                    read_commands: n,
                    write_commands: n,
                    read_bytes: n,
                    ..ReactorStats::default()
                };
                sw.publish(&s);
            }
        });
        let reader = Segment::open(&p).unwrap();
        let mut seen = 0;
        for _ in 0..20_000 {
            if let Some(s) = reader.read_stats(0) {
                assert_eq!(s.commands, s.read_commands);
                assert_eq!(s.commands, s.write_commands);
                assert_eq!(s.commands, s.read_bytes);
                seen += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(seen > 0);
    }
}
