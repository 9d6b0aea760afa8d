//! I/O buffers shared by the network, SCSI and block-device layers.
//!
//! Today an [`IoBuf`] is a heap buffer; hugepage regions and per-reactor pools arrive with the
//! per-core issue behind the same type, so callers never learn where the bytes live.

/// A buffer that carries one I/O's data between the network and the block device.
///
/// Its length is the number of valid bytes. Buffers move by value through the layers (a bdev
/// read fills the buffer it was handed and gives it back in the completion), so data is never
/// copied between storage and network.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IoBuf {
    data: Vec<u8>,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        IoBuf { data: vec![0; len] }
    }

    /// Wraps bytes that already exist (emulated command responses, tests).
    pub fn from_vec(data: Vec<u8>) -> Self {
        IoBuf { data }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Shortens the valid length; never grows it.
    pub fn truncate(&mut self, len: usize) {
        self.data.truncate(len);
    }

    /// Grows or shrinks the buffer to `len` bytes, zero-filling new bytes.
    pub fn resize(&mut self, len: usize) {
        self.data.resize(len, 0);
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.data
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
}
