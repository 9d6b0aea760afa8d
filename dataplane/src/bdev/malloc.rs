//! A RAM block device.
//!
//! The data lives in one zero-initialised heap allocation obtained with `alloc_zeroed`, so the
//! kernel hands out pages lazily and an unwritten device costs no memory (hugepages come later
//! behind the same type). Requests are executed when submitted, but their completions are only handed out by
//! the next [`BlockDevice::poll`], exactly as an asynchronous backend would.
//!
//! The device is thin provisioned: a bitmap keeps one bit per block, set when the block has
//! been written. A fresh device is deallocated everywhere and reads zeroes; `Unmap` and
//! `WriteZeroes` zero the data and clear the bits again.

use super::{
    byte_len, check_buffer, check_geometry, check_op_range, BdevCompletion, BdevError, BdevIo,
    BdevOp, BlockDevice, LbaState,
};
use crate::mem::region::{HugePages, Medium, Region};
use crate::mem::IoBuf;
use std::collections::VecDeque;
use std::sync::Arc;

/// A RAM-backed, thin-provisioned block device.
#[derive(Debug)]
pub struct MallocBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
    /// The medium, in hugepages when the machine has them reserved. Reads hand out views of
    /// it, so Data-In leaves straight from the RAM disk.
    data: Arc<Medium>,
    /// One bit per block: set when mapped (written), clear when deallocated.
    mapped: Bitmap,
    done: VecDeque<BdevCompletion>,
}

impl MallocBdev {
    /// A device of `size_bytes` (a positive multiple of `block_size`, which is 512 or 4096).
    pub fn new(name: &str, block_size: u32, size_bytes: u64) -> Result<Self, BdevError> {
        let num_blocks = check_geometry(block_size, size_bytes)?;
        let len = byte_len(num_blocks, block_size)
            .ok_or_else(|| BdevError::Config(format!("size {size_bytes} too large")))?;
        let data = zeroed_region(len).map_err(|e| {
            BdevError::Config(format!(
                "cannot allocate {size_bytes} bytes for {name}: {e}"
            ))
        })?;
        Ok(MallocBdev {
            name: name.to_string(),
            block_size,
            num_blocks,
            data: Arc::new(Medium::new(data)),
            mapped: Bitmap::new(num_blocks),
            done: VecDeque::new(),
        })
    }

    fn byte_range(&self, lba: u64, blocks: u64) -> Result<std::ops::Range<usize>, BdevError> {
        let bad = || BdevError::OutOfRange {
            lba,
            blocks,
            capacity: self.num_blocks,
        };
        let start = byte_len(lba, self.block_size).ok_or_else(bad)?;
        let len = byte_len(blocks, self.block_size).ok_or_else(bad)?;
        let end = start.checked_add(len).ok_or_else(bad)?;
        // The region may be rounded up to whole hugepages: the capacity is the bound.
        let capacity = byte_len(self.num_blocks, self.block_size).ok_or_else(bad)?;
        if end > capacity || end > self.data.len() {
            return Err(bad());
        }
        Ok(start..end)
    }

    fn execute(&mut self, io: &mut BdevIo) -> Result<(), BdevError> {
        check_op_range(&io.op, self.num_blocks)?;
        match io.op {
            BdevOp::Read { lba, blocks } => {
                let range = self.byte_range(lba, u64::from(blocks))?;
                if io.buf.is_some() {
                    // The caller's buffer is replaced by a view of the medium: no copy.
                    io.buf = Some(IoBuf::view(self.data.clone(), range.start, range.len()));
                }
            }
            BdevOp::Write { lba, blocks, .. } => {
                let range = self.byte_range(lba, u64::from(blocks))?;
                if let Some(buf) = io.buf.as_ref() {
                    self.data.write_at(range.start, buf.as_slice());
                }
                self.mapped.set_range(lba, u64::from(blocks), true);
            }
            BdevOp::Flush => {}
            BdevOp::Unmap { lba, blocks } | BdevOp::WriteZeroes { lba, blocks } => {
                let range = self.byte_range(lba, blocks)?;
                self.data.zero(range.start, range.len());
                self.mapped.set_range(lba, blocks, false);
            }
        }
        Ok(())
    }
}

impl BlockDevice for MallocBdev {
    fn views_out(&self) -> bool {
        Arc::strong_count(&self.data) > 1
    }

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
        true
    }

    fn submit(&mut self, mut io: BdevIo) -> Result<(), (BdevError, BdevIo)> {
        if let Err(e) = check_buffer(&io, self.block_size) {
            return Err((e, io));
        }
        let result = self.execute(&mut io);
        self.done.push_back(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn lba_status(&self, lba: u64) -> (LbaState, u64) {
        if lba >= self.num_blocks {
            return (LbaState::Deallocated, 1);
        }
        let state = self.mapped.get(lba);
        let end = self.mapped.run_end(lba, state, self.num_blocks);
        let state = if state {
            LbaState::Mapped
        } else {
            LbaState::Deallocated
        };
        (state, end - lba)
    }

    fn resize(&mut self, num_blocks: u64) -> Result<(), BdevError> {
        if num_blocks == 0 {
            return Err(BdevError::Config("cannot resize to 0 blocks".into()));
        }
        let len = byte_len(num_blocks, self.block_size)
            .ok_or_else(|| BdevError::Config(format!("{num_blocks} blocks too large")))?;
        let mut data = zeroed_region(len)
            .map_err(|e| BdevError::Config(format!("cannot allocate {len} bytes: {e}")))?;
        let old = byte_len(self.num_blocks, self.block_size).unwrap_or(0);
        let keep = len.min(old).min(self.data.len());
        self.data.read_into(0, &mut data[..keep]);
        // Views of the old medium keep it alive until their Data-In is sent.
        self.data = Arc::new(Medium::new(data));
        self.mapped.resize(num_blocks);
        self.num_blocks = num_blocks;
        Ok(())
    }

    fn flush_blocking(&mut self) -> Result<(), BdevError> {
        Ok(())
    }
}

/// `len` zero bytes of medium: hugepages when reserved (faulted in now, so I/O never waits
/// for a fault), otherwise ordinary pages backed lazily on first write.
fn zeroed_region(len: usize) -> std::io::Result<Region> {
    Region::new(len, HugePages::Prefer, true).or_else(|_| Region::new(len, HugePages::Never, false))
}

/// A fixed-size bit set, one bit per block.
#[derive(Debug, Clone)]
struct Bitmap {
    words: Vec<u64>,
    bits: u64,
}

impl Bitmap {
    fn new(bits: u64) -> Self {
        Bitmap {
            words: vec![0; Self::words_for(bits)],
            bits,
        }
    }

    fn words_for(bits: u64) -> usize {
        usize::try_from(bits.div_ceil(64)).unwrap_or(usize::MAX)
    }

    fn get(&self, bit: u64) -> bool {
        let w = (bit / 64) as usize;
        self.words
            .get(w)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }

    fn set_range(&mut self, start: u64, count: u64, value: bool) {
        let end = start.saturating_add(count).min(self.bits);
        let mut bit = start;
        while bit < end {
            let w = (bit / 64) as usize;
            let off = bit % 64;
            let n = (64 - off).min(end - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << off
            };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            bit += n;
        }
    }

    /// The first bit at or after `start` (and below `limit`) whose value differs from `value`,
    /// or `limit`.
    fn run_end(&self, start: u64, value: bool, limit: u64) -> u64 {
        let limit = limit.min(self.bits);
        let mut bit = start;
        while bit < limit {
            let w = (bit / 64) as usize;
            let off = bit % 64;
            // Bits that differ from `value`, at positions >= off.
            let word = if value { !self.words[w] } else { self.words[w] };
            let differing = word & (u64::MAX << off);
            if differing != 0 {
                let pos = (w as u64) * 64 + u64::from(differing.trailing_zeros());
                return pos.min(limit);
            }
            bit = (w as u64 + 1) * 64;
        }
        limit
    }

    fn resize(&mut self, bits: u64) {
        if bits < self.bits {
            // Clear the bits beyond the new end so a later grow starts deallocated.
            self.set_range(bits, self.bits - bits, false);
        }
        self.words.resize(Self::words_for(bits), 0);
        self.bits = bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::IoBuf;

    fn io(tag: u64, op: BdevOp, buf: Option<IoBuf>) -> BdevIo {
        BdevIo { tag, op, buf }
    }

    fn run(dev: &mut MallocBdev, op: BdevOp, buf: Option<IoBuf>) -> BdevCompletion {
        dev.submit(io(9, op, buf)).expect("queued");
        let mut out = Vec::new();
        assert_eq!(dev.poll(&mut out), 1);
        out.pop().expect("one completion")
    }

    #[test]
    fn geometry_checked() {
        assert!(MallocBdev::new("m", 1000, 1 << 20).is_err());
        assert!(MallocBdev::new("m", 512, 1000).is_err());
        assert!(MallocBdev::new("m", 512, 0).is_err());
        let d = MallocBdev::new("m", 4096, 1 << 20).unwrap();
        assert_eq!(d.num_blocks(), 256);
        assert_eq!(d.block_size(), 4096);
        assert_eq!(d.name(), "m");
        assert!(d.thin_provisioned());
        // Large devices are allocated lazily and start deallocated.
        let big = MallocBdev::new("big", 512, 1 << 30).unwrap();
        assert_eq!(big.lba_status(0), (LbaState::Deallocated, 1 << 21));
    }

    #[test]
    fn round_trip_and_queue_semantics() {
        let mut d = MallocBdev::new("m", 512, 64 * 512).unwrap();
        let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        d.submit(io(
            1,
            BdevOp::Write {
                lba: 3,
                blocks: 2,
                fua: true,
            },
            Some(IoBuf::from_vec(data.clone())),
        ))
        .unwrap();
        d.submit(io(2, BdevOp::Flush, None)).unwrap();
        assert_eq!(d.in_flight(), 2);
        let mut out = Vec::new();
        assert_eq!(d.poll(&mut out), 2);
        assert_eq!(d.in_flight(), 0);
        assert_eq!(out[0].tag, 1);
        assert_eq!(out[0].result, Ok(()));
        assert_eq!(out[0].buf.as_ref().map(IoBuf::len), Some(1024));
        assert_eq!(out[1].tag, 2);
        assert_eq!(d.poll(&mut out), 0);

        let c = run(
            &mut d,
            BdevOp::Read { lba: 3, blocks: 2 },
            Some(IoBuf::zeroed(1024)),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.buf.unwrap().as_slice(), &data[..]);
    }

    #[test]
    fn unmap_zeroes_and_lba_status() {
        let mut d = MallocBdev::new("m", 512, 200 * 512).unwrap();
        assert_eq!(d.lba_status(0), (LbaState::Deallocated, 200));
        let c = run(
            &mut d,
            BdevOp::Write {
                lba: 10,
                blocks: 100,
                fua: false,
            },
            Some(IoBuf::from_vec(vec![0xaa; 100 * 512])),
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(d.lba_status(0), (LbaState::Deallocated, 10));
        assert_eq!(d.lba_status(10), (LbaState::Mapped, 100));
        assert_eq!(d.lba_status(50), (LbaState::Mapped, 60));
        assert_eq!(d.lba_status(110), (LbaState::Deallocated, 90));

        let c = run(
            &mut d,
            BdevOp::Unmap {
                lba: 20,
                blocks: 70,
            },
            None,
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(d.lba_status(10), (LbaState::Mapped, 10));
        assert_eq!(d.lba_status(20), (LbaState::Deallocated, 70));
        assert_eq!(d.lba_status(90), (LbaState::Mapped, 20));

        let c = run(
            &mut d,
            BdevOp::WriteZeroes {
                lba: 100,
                blocks: 5,
            },
            None,
        );
        assert_eq!(c.result, Ok(()));
        assert_eq!(d.lba_status(90), (LbaState::Mapped, 10));
        assert_eq!(d.lba_status(100), (LbaState::Deallocated, 5));

        let c = run(
            &mut d,
            BdevOp::Read { lba: 19, blocks: 2 },
            Some(IoBuf::from_vec(vec![0x55; 1024])),
        );
        let buf = c.buf.unwrap();
        assert!(buf.as_slice()[..512].iter().all(|&b| b == 0xaa));
        assert!(buf.as_slice()[512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn out_of_range_and_bad_buffer() {
        let mut d = MallocBdev::new("m", 512, 8 * 512).unwrap();
        let c = run(
            &mut d,
            BdevOp::Read { lba: 7, blocks: 2 },
            Some(IoBuf::zeroed(1024)),
        );
        assert!(matches!(c.result, Err(BdevError::OutOfRange { .. })));
        assert!(c.buf.is_some());
        let c = run(
            &mut d,
            BdevOp::Unmap {
                lba: u64::MAX,
                blocks: 2,
            },
            None,
        );
        assert!(matches!(c.result, Err(BdevError::OutOfRange { .. })));
        let c = run(
            &mut d,
            BdevOp::WriteZeroes {
                lba: 0,
                blocks: u64::MAX,
            },
            None,
        );
        assert!(matches!(c.result, Err(BdevError::OutOfRange { .. })));

        let (e, back) = d
            .submit(io(
                5,
                BdevOp::Write {
                    lba: 0,
                    blocks: 1,
                    fua: false,
                },
                Some(IoBuf::zeroed(100)),
            ))
            .unwrap_err();
        assert_eq!(
            e,
            BdevError::BadBuffer {
                expected: 512,
                got: 100
            }
        );
        assert_eq!(back.tag, 5);
        assert_eq!(d.in_flight(), 0);
        let (e, _) = d
            .submit(io(6, BdevOp::Read { lba: 0, blocks: 1 }, None))
            .unwrap_err();
        assert!(matches!(e, BdevError::BadBuffer { got: 0, .. }));
    }

    #[test]
    fn resize_grows_deallocated_and_shrinks() {
        let mut d = MallocBdev::new("m", 512, 8 * 512).unwrap();
        run(
            &mut d,
            BdevOp::Write {
                lba: 0,
                blocks: 8,
                fua: false,
            },
            Some(IoBuf::from_vec(vec![1; 8 * 512])),
        );
        assert_eq!(d.lba_status(0), (LbaState::Mapped, 8));
        d.resize(4).unwrap();
        assert_eq!(d.num_blocks(), 4);
        d.resize(100).unwrap();
        assert_eq!(d.num_blocks(), 100);
        assert_eq!(d.lba_status(0), (LbaState::Mapped, 4));
        assert_eq!(d.lba_status(4), (LbaState::Deallocated, 96));
        let c = run(
            &mut d,
            BdevOp::Read { lba: 4, blocks: 1 },
            Some(IoBuf::from_vec(vec![9; 512])),
        );
        assert!(c.buf.unwrap().as_slice().iter().all(|&b| b == 0));
        assert!(d.resize(0).is_err());
        assert!(d.flush_blocking().is_ok());
    }

    #[test]
    fn bitmap_runs_across_words() {
        let mut b = Bitmap::new(300);
        b.set_range(60, 150, true);
        assert_eq!(b.run_end(0, false, 300), 60);
        assert_eq!(b.run_end(60, true, 300), 210);
        assert_eq!(b.run_end(64, true, 300), 210);
        assert_eq!(b.run_end(210, false, 300), 300);
        b.set_range(128, 64, false);
        assert_eq!(b.run_end(60, true, 300), 128);
        assert_eq!(b.run_end(128, false, 300), 192);
    }
}
