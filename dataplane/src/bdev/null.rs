//! A block device that stores nothing: writes are discarded, reads return zeroes.
//!
//! Meant for benchmarking the layers above storage. Completions are handed out by the next
//! [`BlockDevice::poll`]. Every block reports as mapped (the device is not thin provisioned);
//! unmap and write-zeroes are accepted and do nothing.

use super::{
    check_buffer, check_geometry, check_op_range, BdevCompletion, BdevError, BdevIo, BdevOp,
    BlockDevice, LbaState,
};
use std::collections::VecDeque;

/// The null block device.
#[derive(Debug)]
pub struct NullBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
    done: VecDeque<BdevCompletion>,
}

impl NullBdev {
    /// A device of `size_bytes` (a positive multiple of `block_size`, which is 512 or 4096).
    pub fn new(name: &str, block_size: u32, size_bytes: u64) -> Result<Self, BdevError> {
        let num_blocks = check_geometry(block_size, size_bytes)?;
        Ok(NullBdev {
            name: name.to_string(),
            block_size,
            num_blocks,
            done: VecDeque::new(),
        })
    }
}

impl BlockDevice for NullBdev {
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
        false
    }

    fn submit(&mut self, mut io: BdevIo) -> Result<(), (BdevError, BdevIo)> {
        if let Err(e) = check_buffer(&io, self.block_size) {
            return Err((e, io));
        }
        let result = check_op_range(&io.op, self.num_blocks);
        if result.is_ok() {
            if let (BdevOp::Read { .. }, Some(buf)) = (&io.op, io.buf.as_mut()) {
                // The buffer may be recycled from an earlier request: zero it.
                buf.as_mut_slice().fill(0);
            }
        }
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
        (LbaState::Mapped, self.num_blocks.saturating_sub(lba).max(1))
    }

    fn resize(&mut self, num_blocks: u64) -> Result<(), BdevError> {
        if num_blocks == 0 {
            return Err(BdevError::Config("cannot resize to 0 blocks".into()));
        }
        self.num_blocks = num_blocks;
        Ok(())
    }

    fn flush_blocking(&mut self) -> Result<(), BdevError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::IoBuf;

    #[test]
    fn reads_zeroes_discards_writes() {
        assert!(NullBdev::new("n", 520, 1 << 20).is_err());
        assert!(NullBdev::new("n", 512, 100).is_err());
        let mut d = NullBdev::new("n", 512, 1 << 20).unwrap();
        assert_eq!(d.num_blocks(), 2048);
        assert!(!d.thin_provisioned());
        d.submit(BdevIo {
            tag: 1,
            op: BdevOp::Write {
                lba: 0,
                blocks: 1,
                fua: true,
            },
            buf: Some(IoBuf::from_vec(vec![7; 512])),
        })
        .unwrap();
        d.submit(BdevIo {
            tag: 2,
            op: BdevOp::Read { lba: 0, blocks: 1 },
            buf: Some(IoBuf::from_vec(vec![7; 512])),
        })
        .unwrap();
        d.submit(BdevIo {
            tag: 3,
            op: BdevOp::Read {
                lba: 2048,
                blocks: 1,
            },
            buf: Some(IoBuf::zeroed(512)),
        })
        .unwrap();
        d.submit(BdevIo {
            tag: 4,
            op: BdevOp::Unmap { lba: 0, blocks: 10 },
            buf: None,
        })
        .unwrap();
        assert_eq!(d.in_flight(), 4);
        let mut out = Vec::new();
        assert_eq!(d.poll(&mut out), 4);
        assert_eq!(d.in_flight(), 0);
        assert_eq!(out[0].result, Ok(()));
        assert!(out[1]
            .buf
            .as_ref()
            .unwrap()
            .as_slice()
            .iter()
            .all(|&b| b == 0));
        assert!(matches!(out[2].result, Err(BdevError::OutOfRange { .. })));
        assert_eq!(out[3].result, Ok(()));
        assert_eq!(d.lba_status(48), (LbaState::Mapped, 2000));

        let (e, _) = d
            .submit(BdevIo {
                tag: 5,
                op: BdevOp::Read { lba: 0, blocks: 2 },
                buf: Some(IoBuf::zeroed(512)),
            })
            .unwrap_err();
        assert!(matches!(e, BdevError::BadBuffer { expected: 1024, .. }));
        d.resize(10).unwrap();
        assert_eq!(d.num_blocks(), 10);
        assert!(d.resize(0).is_err());
    }
}
