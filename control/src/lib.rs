//! The control plane's shared-memory ABI, used by both the dataplane and `iscsictl`.
//!
//! Thin until the control-plane issue: only the ABI identity lives here so both sides agree on
//! it from the start.

/// Magic at the start of the control segment ("ISCSICTL" little-endian).
pub const ABI_MAGIC: u64 = u64::from_le_bytes(*b"ISCSICTL");
/// Bumped on every incompatible change of the segment layout.
pub const ABI_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    #[test]
    fn magic_spells_its_name() {
        assert_eq!(&super::ABI_MAGIC.to_le_bytes(), b"ISCSICTL");
    }
}
