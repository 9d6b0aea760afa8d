//! Sense data (SPC-4 4.5): fixed (0x70) and descriptor (0x72) formats.

/// Sense keys (SPC-4 table 27).
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ABORTED_COMMAND: u8 = 0x0B;
    pub const MISCOMPARE: u8 = 0x0E;
}

/// Additional sense code and qualifier pairs, `(asc << 8) | ascq`.
pub mod asc {
    pub const NO_ADDITIONAL: u16 = 0x0000;
    pub const WRITE_ERROR: u16 = 0x0C00;
    pub const INVALID_FIELD_IN_COMMAND_IU: u16 = 0x0E03;
    pub const UNRECOVERED_READ_ERROR: u16 = 0x1100;
    pub const MISCOMPARE_DURING_VERIFY: u16 = 0x1D00;
    pub const PARAMETER_LIST_LENGTH_ERROR: u16 = 0x1A00;
    pub const INVALID_COMMAND_OPCODE: u16 = 0x2000;
    pub const LBA_OUT_OF_RANGE: u16 = 0x2100;
    pub const INVALID_FIELD_IN_CDB: u16 = 0x2400;
    pub const LUN_NOT_SUPPORTED: u16 = 0x2500;
    pub const INVALID_FIELD_IN_PARAMETER_LIST: u16 = 0x2600;
    pub const INVALID_RELEASE_OF_PR: u16 = 0x2604;
    pub const WRITE_PROTECTED: u16 = 0x2700;
    pub const POWER_ON_RESET: u16 = 0x2900;
    pub const BUS_DEVICE_RESET: u16 = 0x2903;
    pub const MODE_PARAMETERS_CHANGED: u16 = 0x2A01;
    pub const RESERVATIONS_PREEMPTED: u16 = 0x2A03;
    pub const RESERVATIONS_RELEASED: u16 = 0x2A04;
    pub const REGISTRATIONS_PREEMPTED: u16 = 0x2A05;
    pub const CAPACITY_DATA_CHANGED: u16 = 0x2A09;
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: u16 = 0x3900;
    pub const INQUIRY_DATA_CHANGED: u16 = 0x3F03;
    pub const REPORTED_LUNS_DATA_CHANGED: u16 = 0x3F0E;
    pub const INTERNAL_TARGET_FAILURE: u16 = 0x4400;
    pub const PROTOCOL_SERVICE_CRC_ERROR: u16 = 0x4705;
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: u16 = 0x5504;
}

/// Where in the CDB or parameter list an invalid field sits (sense-key specific bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// True for the CDB, false for the parameter list.
    pub in_cdb: bool,
    pub byte: u16,
    /// The bit of the byte when known (BPV).
    pub bit: Option<u8>,
}

/// The content of one sense report, independent of its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub code: u16,
    /// INFORMATION field (e.g. the miscompare offset).
    pub info: Option<u64>,
    pub field: Option<FieldPointer>,
}

impl Sense {
    pub fn new(key: u8, code: u16) -> Self {
        Sense {
            key,
            code,
            info: None,
            field: None,
        }
    }

    pub fn illegal(code: u16) -> Self {
        Sense::new(key::ILLEGAL_REQUEST, code)
    }

    /// INVALID FIELD IN CDB pointing at `byte` (and `bit` when it is a single-bit field).
    pub fn invalid_cdb(byte: usize, bit: Option<u8>) -> Self {
        Sense {
            field: Some(FieldPointer {
                in_cdb: true,
                byte: u16::try_from(byte).unwrap_or(u16::MAX),
                bit,
            }),
            ..Sense::illegal(asc::INVALID_FIELD_IN_CDB)
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` of the Data-Out.
    pub fn invalid_param(byte: usize, bit: Option<u8>) -> Self {
        Sense {
            field: Some(FieldPointer {
                in_cdb: false,
                byte: u16::try_from(byte).unwrap_or(u16::MAX),
                bit,
            }),
            ..Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST)
        }
    }

    pub fn lba_out_of_range() -> Self {
        Sense::illegal(asc::LBA_OUT_OF_RANGE)
    }

    pub fn miscompare(offset: u64) -> Self {
        Sense {
            info: Some(offset),
            ..Sense::new(key::MISCOMPARE, asc::MISCOMPARE_DURING_VERIFY)
        }
    }

    pub fn unit_attention(code: u16) -> Self {
        Sense::new(key::UNIT_ATTENTION, code)
    }

    fn sks(&self) -> Option<[u8; 3]> {
        let f = self.field?;
        let mut b0 = 0x80;
        if f.in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = f.bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let [hi, lo] = f.byte.to_be_bytes();
        Some([b0, hi, lo])
    }

    /// Encodes the sense data in descriptor format when `descriptor`, else fixed format.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        let [asc, ascq] = self.code.to_be_bytes();
        if descriptor {
            let mut v = vec![0x72, self.key & 0x0F, asc, ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                v.extend_from_slice(&[0x00, 0x0A, 0x80, 0]);
                v.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.sks() {
                v.extend_from_slice(&[0x02, 0x06, 0, 0]);
                v.extend_from_slice(&sks);
                v.push(0);
            }
            v[7] = (v.len() - 8) as u8;
            v
        } else {
            let mut v = vec![0u8; 18];
            v[0] = 0x70;
            v[2] = self.key & 0x0F;
            if let Some(info) = self.info {
                // The fixed format holds only 32 bits; larger values cannot be VALID.
                if let Ok(info) = u32::try_from(info) {
                    v[0] |= 0x80;
                    v[3..7].copy_from_slice(&info.to_be_bytes());
                }
            }
            v[7] = 10;
            v[12] = asc;
            v[13] = ascq;
            if let Some(sks) = self.sks() {
                v[15..18].copy_from_slice(&sks);
            }
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_invalid_field_with_pointer() {
        let s = Sense::invalid_cdb(1, Some(5)).encode(false);
        assert_eq!(
            s,
            vec![0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xCD, 0, 1]
        );
    }

    #[test]
    fn fixed_byte_pointer_without_bit() {
        let s = Sense::invalid_cdb(300, None).encode(false);
        assert_eq!(&s[15..18], &[0xC0, 0x01, 0x2C]);
        let p = Sense::invalid_param(2, None).encode(false);
        assert_eq!(p[12], 0x26);
        assert_eq!(&p[15..18], &[0x80, 0, 2]);
    }

    #[test]
    fn fixed_miscompare_information() {
        let s = Sense::miscompare(0x1234).encode(false);
        assert_eq!(s[0], 0xF0);
        assert_eq!(s[2], 0x0E);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!((s[12], s[13]), (0x1D, 0));
    }

    #[test]
    fn descriptor_format() {
        let s = Sense::lba_out_of_range().encode(true);
        assert_eq!(s, vec![0x72, 5, 0x21, 0, 0, 0, 0, 0]);
        let m = Sense::miscompare(7).encode(true);
        assert_eq!(&m[..8], &[0x72, 0x0E, 0x1D, 0, 0, 0, 0, 12]);
        assert_eq!(&m[8..12], &[0, 0x0A, 0x80, 0]);
        assert_eq!(&m[12..20], &7u64.to_be_bytes());
        let f = Sense::invalid_cdb(2, None).encode(true);
        assert_eq!(&f[8..16], &[0x02, 0x06, 0, 0, 0xC0, 0, 2, 0]);
        assert_eq!(f[7], 8);
    }
}
