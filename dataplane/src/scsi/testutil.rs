//! An in-memory block device for the layer's tests: requests complete on the next poll.

use std::sync::{Arc, Mutex};

use crate::bdev::{check_range, BdevCompletion, BdevError, BdevIo, BdevOp, BlockDevice, LbaState};

/// What the mock saw, shared with the test that boxed it.
#[derive(Default)]
pub struct Log {
    pub ops: Vec<BdevOp>,
}

pub struct MockBdev {
    bs: u32,
    data: Vec<u8>,
    mapped: Vec<bool>,
    thin: bool,
    queued: Vec<BdevCompletion>,
    /// Requests accepted between polls before QueueFull is returned.
    pub queue_limit: Option<usize>,
    pub log: Arc<Mutex<Log>>,
}

impl MockBdev {
    pub fn new(bs: u32, blocks: u64, thin: bool) -> (Self, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let m = MockBdev {
            bs,
            data: vec![0; bs as usize * blocks as usize],
            mapped: vec![false; blocks as usize],
            thin,
            queued: Vec::new(),
            queue_limit: None,
            log: log.clone(),
        };
        (m, log)
    }

    fn span(&self, lba: u64, blocks: u64) -> std::ops::Range<usize> {
        let bs = self.bs as usize;
        lba as usize * bs..(lba + blocks) as usize * bs
    }

    fn exec(&mut self, io: &mut BdevIo) -> Result<(), BdevError> {
        let cap = self.num_blocks();
        match io.op {
            BdevOp::Read { lba, blocks } => {
                check_range(lba, u64::from(blocks), cap)?;
                let r = self.span(lba, u64::from(blocks));
                let buf = io.buf.as_mut().ok_or(BdevError::BadBuffer {
                    expected: r.len(),
                    got: 0,
                })?;
                if buf.len() != r.len() {
                    return Err(BdevError::BadBuffer {
                        expected: r.len(),
                        got: buf.len(),
                    });
                }
                buf.as_mut_slice().copy_from_slice(&self.data[r]);
            }
            BdevOp::Write { lba, blocks, .. } => {
                check_range(lba, u64::from(blocks), cap)?;
                let r = self.span(lba, u64::from(blocks));
                let buf = io.buf.as_ref().map(|b| b.as_slice()).unwrap_or(&[]);
                if buf.len() != r.len() {
                    return Err(BdevError::BadBuffer {
                        expected: r.len(),
                        got: buf.len(),
                    });
                }
                self.data[r].copy_from_slice(buf);
                for m in &mut self.mapped[lba as usize..(lba + u64::from(blocks)) as usize] {
                    *m = true;
                }
            }
            BdevOp::Flush => {}
            BdevOp::Unmap { lba, blocks } | BdevOp::WriteZeroes { lba, blocks } => {
                check_range(lba, blocks, cap)?;
                let r = self.span(lba, blocks);
                self.data[r].fill(0);
                let unmap = matches!(io.op, BdevOp::Unmap { .. });
                for m in &mut self.mapped[lba as usize..(lba + blocks) as usize] {
                    *m = !unmap;
                }
            }
        }
        Ok(())
    }
}

impl BlockDevice for MockBdev {
    fn name(&self) -> &str {
        "mock"
    }
    fn block_size(&self) -> u32 {
        self.bs
    }
    fn num_blocks(&self) -> u64 {
        self.mapped.len() as u64
    }
    fn thin_provisioned(&self) -> bool {
        self.thin
    }
    fn submit(&mut self, mut io: BdevIo) -> Result<(), (BdevError, BdevIo)> {
        if self.queue_limit.is_some_and(|l| self.queued.len() >= l) {
            return Err((BdevError::QueueFull, io));
        }
        self.log.lock().unwrap().ops.push(io.op.clone());
        // Executed at submit but reported on the next poll, like a real asynchronous device.
        let result = self.exec(&mut io);
        self.queued.push(BdevCompletion {
            tag: io.tag,
            result,
            buf: io.buf,
        });
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let n = self.queued.len();
        out.append(&mut self.queued);
        n
    }
    fn in_flight(&self) -> usize {
        self.queued.len()
    }
    fn lba_status(&self, lba: u64) -> (LbaState, u64) {
        let i = lba as usize;
        let state = self.mapped[i];
        let run = self.mapped[i..].iter().take_while(|m| **m == state).count();
        let s = if state {
            LbaState::Mapped
        } else {
            LbaState::Deallocated
        };
        (s, run as u64)
    }
    fn resize(&mut self, num_blocks: u64) -> Result<(), BdevError> {
        self.mapped.resize(num_blocks as usize, false);
        self.data.resize(num_blocks as usize * self.bs as usize, 0);
        Ok(())
    }
    fn flush_blocking(&mut self) -> Result<(), BdevError> {
        Ok(())
    }
}
