//! Per-reactor buffer pools carved from one hugepage region: size classes from 4 KiB to
//! 1 MiB, each a lock-free free list of fixed slots. Taking and returning a buffer costs a
//! queue pop and push, no allocation, no lock, and no page fault (the region is prefaulted).
//!
//! Each reactor installs its pool as the thread's current pool
//! ([`set_thread_pool`]); `IoBuf::for_io` takes from it. A buffer may be dropped on any
//! thread (a file worker, another reactor): it goes back to the pool it came from.

use super::region::{HugePages, Region};
use super::IoBuf;
use crossbeam_queue::ArrayQueue;
use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The smallest and largest pooled buffer sizes.
pub const MIN_CLASS: usize = 4096;
pub const MAX_CLASS: usize = 1 << 20;

struct SizeClass {
    size: usize,
    /// Offset of the class's first slot in the region.
    base: usize,
    free: ArrayQueue<u32>,
}

/// A pool of I/O buffers in one region.
pub struct BufferPool {
    region: Region,
    classes: Vec<SizeClass>,
    /// Requests the pool could not serve (too large, or the class was empty).
    misses: AtomicU64,
}

impl BufferPool {
    /// Carves `bytes` (split evenly between the size classes) from a new region.
    pub fn new(bytes: usize, huge: HugePages) -> io::Result<Arc<BufferPool>> {
        let mut sizes = Vec::new();
        let mut s = MIN_CLASS;
        while s <= MAX_CLASS {
            sizes.push(s);
            s *= 2;
        }
        let per_class = bytes / sizes.len();
        let counts: Vec<usize> = sizes.iter().map(|&s| (per_class / s).max(1)).collect();
        let total: usize = sizes.iter().zip(&counts).map(|(s, c)| s * c).sum();
        let region = Region::new(total, huge, true)?;
        let mut classes = Vec::new();
        let mut base = 0;
        for (&size, &count) in sizes.iter().zip(&counts) {
            let free = ArrayQueue::new(count);
            for i in 0..count {
                let _ = free.push(i as u32);
            }
            classes.push(SizeClass { size, base, free });
            base += size * count;
        }
        Ok(Arc::new(BufferPool {
            region,
            classes,
            misses: AtomicU64::new(0),
        }))
    }

    /// Whether the pool lives in hugepages.
    pub fn is_huge(&self) -> bool {
        self.region.is_huge()
    }

    /// Bytes of the region.
    pub fn bytes(&self) -> usize {
        self.region.len()
    }

    /// Buffers currently free, over all classes.
    pub fn free_buffers(&self) -> usize {
        self.classes.iter().map(|c| c.free.len()).sum()
    }

    /// The address range of the region (for registering it with io_uring).
    pub fn span(&self) -> (*mut u8, usize) {
        (self.region.as_ptr(), self.region.len())
    }

    /// Requests that fell back to the heap.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// A buffer of `len` valid bytes (contents unspecified) from the smallest class that
    /// fits, or None.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        let class = self.classes.iter().position(|c| c.size >= len);
        let Some(ci) = class else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let c = &self.classes[ci];
        let Some(slot) = c.free.pop() else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let offset = c.base + slot as usize * c.size;
        // SAFETY: offset + size lies within the region (slots were laid out from it), the
        // slot is ours alone until released, and its bytes are initialised (the region was
        // zeroed at creation and only ever written since).
        let ptr = unsafe { self.region.as_ptr().add(offset) };
        Some(IoBuf::from_pool(ptr, c.size, len, self.clone(), ci as u8))
    }

    /// Returns a slot (called from `IoBuf::drop`).
    pub(super) fn release(&self, class: u8, ptr: *const u8) {
        let Some(c) = self.classes.get(class as usize) else {
            return;
        };
        let offset = ptr as usize - self.region.as_ptr() as usize;
        let slot = ((offset - c.base) / c.size) as u32;
        // The queue has room for every slot of the class, so this cannot fail.
        let _ = c.free.push(slot);
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<BufferPool>>> = const { RefCell::new(None) };
}

/// Installs the pool this thread's I/O buffers come from (a reactor, at start).
pub fn set_thread_pool(pool: Option<Arc<BufferPool>>) {
    CURRENT.with(|c| *c.borrow_mut() = pool);
}

/// The pool this thread's buffers come from, if any.
pub fn thread_pool() -> Option<Arc<BufferPool>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// A buffer from this thread's pool, if it has one that fits.
pub(super) fn take_from_thread_pool(len: usize) -> Option<IoBuf> {
    CURRENT.with(|c| c.borrow().as_ref().and_then(|p| p.take(len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_to_their_class() {
        let pool = BufferPool::new(9 * 64 * 1024, HugePages::Never).unwrap();
        let before = pool.free_buffers();
        let a = pool.take(512).unwrap();
        let b = pool.take(5000).unwrap();
        assert_eq!((a.len(), a.capacity()), (512, 4096));
        assert_eq!((b.len(), b.capacity()), (5000, 8192));
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        assert_eq!(pool.free_buffers(), before - 2);
        // Dropped on another thread: still returns to this pool.
        std::thread::spawn(move || drop(b)).join().unwrap();
        drop(a);
        assert_eq!(pool.free_buffers(), before);
        assert!(pool.take(MAX_CLASS + 1).is_none());
        assert_eq!(pool.misses(), 1);
    }

    #[test]
    fn an_empty_class_misses_and_the_thread_pool_falls_back_to_the_heap() {
        let pool = BufferPool::new(9 * 4096, HugePages::Never).unwrap();
        let held = pool.take(4096).unwrap();
        assert!(pool.take(4096).is_none());
        set_thread_pool(Some(pool.clone()));
        let b = IoBuf::for_io(4096);
        assert_eq!(b.len(), 4096);
        drop(held);
        let c = IoBuf::for_io(100);
        assert_eq!(c.capacity(), 4096, "pooled again");
        set_thread_pool(None);
        assert!(pool.misses() >= 2);
    }

    #[test]
    fn zeroed_buffers_from_the_pool_are_zero() {
        let pool = BufferPool::new(9 * 4096, HugePages::Never).unwrap();
        set_thread_pool(Some(pool.clone()));
        let mut b = IoBuf::for_io(4096);
        b.as_mut_slice().fill(0xee);
        drop(b);
        let z = IoBuf::zeroed(4096);
        assert!(z.as_slice().iter().all(|&x| x == 0));
        set_thread_pool(None);
    }
}
