//! I/O buffers shared by the network, SCSI and block-device layers.
//!
//! An [`IoBuf`] is a block of memory aligned to [`IO_ALIGN`] (so O_DIRECT and NVMe can use it
//! as is) that moves by value through the layers: a bdev read fills the buffer it was handed
//! and gives it back in the completion, the connection sends Data-In straight from it, and a
//! WRITE's Data-Out is read from the socket straight into it. Data is never copied between the
//! storage and network layers.
//!
//! Buffers come from the reactor's hugepage [`pool`] when it has a slot that fits, from the
//! heap otherwise; [`region`] maps the memory (also the malloc bdev's).

pub mod pool;
pub mod region;

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every I/O buffer: the largest logical block size we serve, which also
/// satisfies O_DIRECT on 512e and 4Kn devices.
pub const IO_ALIGN: usize = 4096;

/// A buffer that carries one I/O's data between the network and the block device.
///
/// Its length is the number of valid bytes; its capacity never changes after allocation.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    origin: Origin,
}

enum Origin {
    Heap,
    Pool(Arc<pool::BufferPool>, u8),
    /// A read-only window onto a device's medium; the Arc keeps the medium mapped.
    View {
        _medium: Arc<region::Medium>,
    },
}

// SAFETY: an IoBuf owns its allocation exclusively (like a Box<[u8]>): moving it to another
// thread moves that ownership, and shared references only allow reads.
unsafe impl Send for IoBuf {}
// SAFETY: &IoBuf only hands out &[u8]; there is no interior mutability.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer for `len` bytes that the caller will overwrite entirely (a read's
    /// destination, a write's Data-Out): from the thread's pool when possible, so the I/O
    /// path allocates nothing. Its contents are unspecified until written.
    pub fn for_io(len: usize) -> Self {
        if len > 0 {
            if let Some(b) = pool::take_from_thread_pool(len) {
                return b;
            }
        }
        Self::heap_zeroed(len)
    }

    /// A zero-filled, [`IO_ALIGN`]-aligned buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::for_io(len);
        if matches!(b.origin, Origin::Pool(..)) {
            b.as_mut_slice().fill(0);
        }
        b
    }

    pub(crate) fn from_pool(
        ptr: *mut u8,
        cap: usize,
        len: usize,
        pool: Arc<pool::BufferPool>,
        class: u8,
    ) -> Self {
        IoBuf {
            ptr: NonNull::new(ptr).expect("pool slots are never null"),
            cap,
            len,
            origin: Origin::Pool(pool, class),
        }
    }

    /// A read-only view of `len` bytes of `medium` at `offset`: a READ's data without a
    /// copy. Writing to it (`as_mut_slice`) first copies it into a buffer of its own, so the
    /// medium can never be changed through a view.
    pub fn view(medium: Arc<region::Medium>, offset: usize, len: usize) -> Self {
        assert!(offset + len <= medium.len(), "view within the medium");
        let ptr = NonNull::new(medium.ptr_at(offset)).expect("mapping is never null");
        IoBuf {
            ptr,
            cap: len,
            len,
            origin: Origin::View { _medium: medium },
        }
    }

    /// Whether this buffer is a view of a device's medium.
    pub fn is_view(&self) -> bool {
        matches!(self.origin, Origin::View { .. })
    }

    /// Turns a view into a buffer of its own (before it leaves the device's thread).
    pub fn into_owned_if_view(self) -> Self {
        if self.is_view() {
            IoBuf::from_slice(self.as_slice())
        } else {
            self
        }
    }

    fn heap_zeroed(len: usize) -> Self {
        if len == 0 {
            return IoBuf {
                ptr: NonNull::dangling(),
                cap: 0,
                len: 0,
                origin: Origin::Heap,
            };
        }
        let layout = Layout::from_size_align(len, IO_ALIGN).expect("I/O buffer size overflows");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            cap: len,
            len,
            origin: Origin::Heap,
        }
    }

    /// Copies bytes that already exist (emulated command responses, tests) into a buffer.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self::from_slice(&data)
    }

    /// Copies `data` into a new buffer.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::for_io(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.cap == 0 {
            return &[];
        }
        // SAFETY: ptr is valid for cap >= len initialised (zeroed at allocation) bytes, and
        // we own it; the returned borrow ties it to &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.is_view() {
            // Copy on write: a view must never change the medium.
            *self = IoBuf::from_slice(self.as_slice());
        }
        if self.cap == 0 {
            return &mut [];
        }
        // SAFETY: as in as_slice, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start of the buffer, for handing to the kernel (io_uring, O_DIRECT).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Shortens the valid length; never grows it.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Grows (up to the capacity, zero-filling) or shrinks the valid length; grows beyond
    /// the capacity by reallocating.
    pub fn resize(&mut self, len: usize) {
        if self.is_view() {
            *self = IoBuf::from_slice(self.as_slice());
        }
        if len <= self.cap {
            if len > self.len {
                // SAFETY: [len..new len) lies within the allocation.
                unsafe {
                    std::ptr::write_bytes(self.ptr.as_ptr().add(self.len), 0, len - self.len)
                };
            }
            self.len = len;
        } else {
            let mut bigger = IoBuf::heap_zeroed(len);
            bigger.as_mut_slice()[..self.len].copy_from_slice(self.as_slice());
            *self = bigger;
        }
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.as_slice().to_vec()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Pool(pool, class) => pool.release(*class, self.ptr.as_ptr()),
            Origin::Heap if self.cap != 0 => {
                let layout = Layout::from_size_align(self.cap, IO_ALIGN).expect("valid at alloc");
                // SAFETY: allocated in heap_zeroed() with exactly this layout.
                unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
            }
            Origin::Heap | Origin::View { .. } => {}
        }
    }
}

impl Default for IoBuf {
    fn default() -> Self {
        IoBuf::heap_zeroed(0)
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        IoBuf::from_slice(self.as_slice())
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for IoBuf {}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_then_truncated() {
        let mut b = IoBuf::zeroed(8);
        b.as_mut_slice()[0] = 7;
        b.truncate(3);
        assert_eq!(b.as_slice(), &[7, 0, 0]);
        b.truncate(10);
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn aligned_for_direct_io() {
        for len in [1usize, 512, 4096, 100_000] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
        assert!(IoBuf::zeroed(0).is_empty());
        assert_eq!(IoBuf::from_vec(vec![1, 2, 3]).as_slice(), &[1, 2, 3]);
    }

    #[test]
    fn views_are_read_only_windows_onto_a_medium() {
        let medium = Arc::new(region::Medium::new(
            region::Region::new(8192, region::HugePages::Never, false).unwrap(),
        ));
        medium.write_at(4096, &[5; 16]);
        let mut v = IoBuf::view(medium.clone(), 4096, 16);
        assert!(v.is_view());
        assert_eq!(v.as_slice(), &[5; 16]);
        // Writing through the view copies first: the medium is untouched.
        v.as_mut_slice()[0] = 9;
        assert!(!v.is_view());
        let mut back = [0u8; 16];
        medium.read_into(4096, &mut back);
        assert_eq!(back, [5; 16]);
        let w = IoBuf::view(medium, 0, 4).into_owned_if_view();
        assert!(!w.is_view());
    }

    #[test]
    fn resize_within_and_beyond_capacity() {
        let mut b = IoBuf::from_slice(&[9; 16]);
        b.truncate(4);
        b.resize(8);
        assert_eq!(b.as_slice(), &[9, 9, 9, 9, 0, 0, 0, 0]);
        b.resize(32);
        assert_eq!(b.len(), 32);
        assert_eq!(&b.as_slice()[..4], &[9; 4]);
        assert!(b.as_slice()[4..].iter().all(|&x| x == 0));
        let c = b.clone();
        assert_eq!(c, b);
    }
}
