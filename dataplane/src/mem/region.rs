//! Memory regions for buffers that the NIC or the disk touch: 2 MiB hugepages when the
//! machine has them reserved (fewer TLB misses, memory that never moves or swaps), ordinary
//! pages with a warning otherwise.

use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// Size of the hugepages we ask for.
pub const HUGEPAGE_SIZE: usize = 2 * 1024 * 1024;

/// One mapping. Its bytes are zero when it is created.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    huge: bool,
}

// SAFETY: a Region owns its mapping exclusively, like a Box<[u8]>.
unsafe impl Send for Region {}
// SAFETY: &Region only reads; mutation needs &mut Region (or goes through raw pointers
// handed to the kernel by the owner).
unsafe impl Sync for Region {}

static WARNED: AtomicBool = AtomicBool::new(false);
static ALLOWED: AtomicBool = AtomicBool::new(true);

/// Turns hugepages off (or back on) for every later [`HugePages::Prefer`] region
/// (`[global] hugepages = false`).
pub fn allow_hugepages(allowed: bool) {
    ALLOWED.store(allowed, Ordering::Relaxed);
}

/// How hugepages should be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// Use them when available, ordinary pages (with a warning) otherwise.
    Prefer,
    /// Ordinary pages only (tests, tiny regions).
    Never,
}

impl Region {
    /// Maps `len` bytes (rounded up to whole hugepages when hugepages are used). With
    /// `populate`, every page is faulted in now rather than at first touch, so I/O never
    /// waits for a page fault.
    pub fn new(len: usize, huge: HugePages, populate: bool) -> io::Result<Region> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty region"));
        }
        if huge == HugePages::Prefer && ALLOWED.load(Ordering::Relaxed) {
            let rounded = len.div_ceil(HUGEPAGE_SIZE) * HUGEPAGE_SIZE;
            match map(rounded, libc::MAP_HUGETLB, populate) {
                Ok(ptr) => {
                    return Ok(Region {
                        ptr,
                        len: rounded,
                        huge: true,
                    })
                }
                Err(e) => {
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "no hugepages for a {} MiB region ({e}); using ordinary pages. \
                             Reserve them with: echo N > /proc/sys/vm/nr_hugepages \
                             (N = 2 MiB pages, see README: Memory)",
                            rounded >> 20
                        );
                    }
                }
            }
        }
        let ptr = map(len, 0, populate)?;
        Ok(Region {
            ptr,
            len,
            huge: false,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the region is backed by hugepages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is len bytes, readable, initialised (zero-filled by mmap).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

fn map(len: usize, extra_flags: libc::c_int, populate: bool) -> io::Result<NonNull<u8>> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags;
    if populate {
        flags |= libc::MAP_POPULATE;
    }
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; we check
    // the result before using it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() returned; nothing borrows it any more.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl std::ops::Deref for Region {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for Region {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Region({} bytes, {})",
            self.len,
            if self.huge {
                "hugepages"
            } else {
                "4 KiB pages"
            }
        )
    }
}

/// A region that a block device keeps its medium in and lends out read-only views of
/// ([`IoBuf::view`](super::IoBuf)), so a READ's Data-In leaves straight from the medium.
///
/// All access goes through raw pointers at the moment of the copy; no reference to the
/// bytes outlives one call, so writes to the medium and views of it never hold overlapping
/// borrows. Views only live on the thread that owns the device (see
/// `IoBuf::into_owned_if_view` for crossing threads).
pub struct Medium {
    region: Region,
}

impl fmt::Debug for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Medium({:?})", self.region)
    }
}

impl Medium {
    pub fn new(region: Region) -> Self {
        Medium { region }
    }

    pub fn len(&self) -> usize {
        self.region.len()
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    pub fn is_huge(&self) -> bool {
        self.region.is_huge()
    }

    /// Copies `data` into the medium at `offset`. The caller checked the range.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.region.len(),
            "medium write in range"
        );
        // SAFETY: the range lies inside the mapping (asserted); the source is a separate
        // buffer, so the ranges do not overlap; no reference into the medium is live while
        // the owning thread runs this copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.region.as_ptr().add(offset),
                data.len(),
            )
        };
    }

    /// Zeroes `len` bytes at `offset`. The caller checked the range.
    pub fn zero(&self, offset: usize, len: usize) {
        assert!(offset + len <= self.region.len(), "medium zeroing in range");
        // SAFETY: as in write_at.
        unsafe { std::ptr::write_bytes(self.region.as_ptr().add(offset), 0, len) };
    }

    /// Copies `out.len()` bytes at `offset` into `out`.
    pub fn read_into(&self, offset: usize, out: &mut [u8]) {
        assert!(
            offset + out.len() <= self.region.len(),
            "medium read in range"
        );
        // SAFETY: as in write_at, in the other direction.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.region.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// The address of byte `offset` (for views).
    pub(crate) fn ptr_at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.region.len());
        // SAFETY: within the mapping (asserted).
        unsafe { self.region.as_ptr().add(offset) }
    }
}

/// Hugepages of the default size: (total, free) as /proc/meminfo reports them.
pub fn hugepages_available() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
    };
    Some((field("HugePages_Total:")?, field("HugePages_Free:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_region_is_zeroed_and_writable() {
        let mut r = Region::new(10_000, HugePages::Never, false).unwrap();
        assert_eq!(r.len(), 10_000);
        assert!(!r.is_huge());
        assert!(r.iter().all(|&b| b == 0));
        r[9_999] = 7;
        assert_eq!(r[9_999], 7);
    }

    #[test]
    fn prefer_falls_back_or_rounds_to_hugepages() {
        let r = Region::new(3 << 20, HugePages::Prefer, true).unwrap();
        if r.is_huge() {
            assert_eq!(r.len(), 4 << 20);
        } else {
            assert_eq!(r.len(), 3 << 20);
        }
        assert_eq!(r.as_ptr() as usize % 4096, 0);
        assert!(Region::new(0, HugePages::Never, false).is_err());
    }
}
