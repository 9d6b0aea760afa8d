//! INQUIRY: standard data and the vital product data pages; REPORT TARGET PORT GROUPS.
//!
//! ALUA (SPC-4 5.16): implicit only (TPGS 01b). Every target port (portal group) of a target
//! is in one target port group, id [`TARGET_PORT_GROUP`], always active/optimized: a
//! multipath initiator sees one device with as many equal paths as portal groups.

use super::sense::Sense;
use super::LunIdentity;

/// Largest data transfer of one command; bounds the buffers a single CDB can make us allocate.
const MAX_TRANSFER_BYTES: u32 = 32 << 20;
/// COMPARE AND WRITE blocks per command (VPD B0 byte 5 holds at most 255).
pub const MAX_COMPARE_AND_WRITE: u32 = 255;
/// UNMAP limits (VPD B0).
pub const MAX_UNMAP_BLOCKS: u32 = 0x0010_0000;
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// The block limits the LUN enforces and advertises; one place so the two agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_transfer_blocks: u32,
    pub max_write_same_blocks: u32,
}

impl Limits {
    pub fn for_block_size(block_size: u32) -> Self {
        let max = MAX_TRANSFER_BYTES / block_size.max(1);
        Limits {
            max_transfer_blocks: max,
            // Non-UNMAP WRITE SAME builds the whole range in one buffer.
            max_write_same_blocks: max,
        }
    }
}

/// The one target port group every port of a target belongs to.
pub const TARGET_PORT_GROUP: u16 = 1;

/// What INQUIRY needs to know about the LUN besides its identity.
#[derive(Debug, Clone, Copy)]
pub struct LunFacts {
    pub thin: bool,
    pub limits: Limits,
    /// The target port (portal group tag) the command came through.
    pub port: u16,
}

const VERSION_DESCRIPTORS: [u16; 4] = [
    0x00A0, // SAM-5
    0x0960, // iSCSI
    0x0460, // SPC-4
    0x04C0, // SBC-3
];

const SUPPORTED_VPD: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

fn padded(s: &str, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..0x7F).contains(&b) { b } else { b' ' })
        .take(len)
        .collect();
    v.resize(len, b' ');
    v
}

/// Standard INQUIRY data for an existing LUN (96 bytes).
pub fn standard(id: &LunIdentity) -> Vec<u8> {
    let mut v = vec![0u8; 96];
    v[0] = 0x00; // connected, direct access block device
    v[2] = 0x06; // SPC-4
    v[3] = 0x10 | 0x02; // HiSup, response data format 2
    v[4] = (96 - 5) as u8;
    v[5] = 0x10; // TPGS 01b: implicit asymmetric access
    v[7] = 0x02; // CmdQue
    v[8..16].copy_from_slice(&padded(&id.vendor, 8));
    v[16..32].copy_from_slice(&padded(&id.product, 16));
    v[32..36].copy_from_slice(&padded(&id.revision, 4));
    for (i, d) in VERSION_DESCRIPTORS.iter().enumerate() {
        v[58 + 2 * i..60 + 2 * i].copy_from_slice(&d.to_be_bytes());
    }
    v
}

/// Standard INQUIRY data for a LUN that does not exist (SPC-4 6.6.2: qualifier 011b).
pub fn no_lun() -> Vec<u8> {
    let mut v = vec![0u8; 36];
    v[0] = 0x7F;
    v[2] = 0x06;
    v[3] = 0x12;
    v[4] = 31;
    v
}

fn page(code: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0, code];
    v.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn designator(code_set_proto: u8, piv_assoc_type: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![code_set_proto, piv_assoc_type, 0, value.len() as u8];
    v.extend_from_slice(value);
    v
}

/// A SCSI name string: UTF-8, NUL-terminated, padded to a multiple of four bytes.
fn name_string(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(251).collect();
    v.push(0);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

fn device_identification(id: &LunIdentity, port: u16) -> Vec<u8> {
    let mut body = Vec::new();
    // NAA, associated with the logical unit.
    body.extend(designator(0x01, 0x03, &id.naa.to_be_bytes()));
    // T10 vendor ID: vendor followed by the serial number.
    let mut t10 = padded(&id.vendor, 8);
    t10.extend(
        id.serial
            .bytes()
            .filter(|b| (0x20..0x7F).contains(b))
            .take(200),
    );
    body.extend(designator(0x02, 0x01, &t10));
    // iSCSI (protocol 5) target port designators carry PIV=1, association 01b.
    // The port is the one the command came through: each path reports its own.
    let port_name = format!("{},t,0x{:04x}", id.target_name, port);
    body.extend(designator(0x53, 0x98, &name_string(&port_name)));
    let mut rel = [0u8; 4];
    rel[2..].copy_from_slice(&port.to_be_bytes());
    body.extend(designator(0x51, 0x94, &rel));
    let mut group = [0u8; 4];
    group[2..].copy_from_slice(&TARGET_PORT_GROUP.to_be_bytes());
    body.extend(designator(0x51, 0x95, &group));
    // The target device (association 10b) by its iSCSI name.
    body.extend(designator(0x53, 0xA8, &name_string(&id.target_name)));
    page(0x83, &body)
}

fn block_limits(facts: &LunFacts) -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    let l = facts.limits;
    b[0] = 0x01; // WSNZ: a zero-length WRITE SAME would mean "to the end", which we refuse
    b[1] = MAX_COMPARE_AND_WRITE as u8;
    b[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal transfer length granularity
    b[4..8].copy_from_slice(&l.max_transfer_blocks.to_be_bytes());
    b[8..12].copy_from_slice(&l.max_transfer_blocks.to_be_bytes()); // optimal transfer length
    b[12..16].copy_from_slice(&l.max_transfer_blocks.to_be_bytes()); // max prefetch length
    if facts.thin {
        b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
        b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        b[24..28].copy_from_slice(&1u32.to_be_bytes()); // optimal unmap granularity
    }
    b[32..40].copy_from_slice(&u64::from(l.max_write_same_blocks).to_be_bytes());
    // WRITE ATOMIC(16): up to the maximum transfer length, no alignment or granularity
    // constraints, no atomic boundaries.
    b[40..44].copy_from_slice(&l.max_transfer_blocks.to_be_bytes());
    page(0xB0, &b)
}

fn block_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
    page(0xB1, &b)
}

fn logical_block_provisioning(facts: &LunFacts) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if facts.thin {
        // LBPU, LBPWS, LBPWS10, LBPRZ (bit 2); DP = 0.
        b[1] = 0x80 | 0x40 | 0x20 | 0x04;
        b[2] = 0x02; // thin provisioned
    }
    page(0xB2, &b)
}

/// The VPD page `code`, or INVALID FIELD IN CDB (page code byte) when unsupported.
pub fn vpd(code: u8, id: &LunIdentity, facts: &LunFacts) -> Result<Vec<u8>, Sense> {
    Ok(match code {
        0x00 => page(0x00, &SUPPORTED_VPD),
        0x80 => {
            let serial: Vec<u8> = id
                .serial
                .bytes()
                .filter(|b| (0x20..0x7F).contains(b))
                .take(250)
                .collect();
            page(0x80, &serial)
        }
        0x83 => device_identification(id, facts.port),
        0xB0 => block_limits(facts),
        0xB1 => block_characteristics(),
        0xB2 => logical_block_provisioning(facts),
        _ => return Err(Sense::invalid_cdb(2, None)),
    })
}

/// REPORT TARGET PORT GROUPS parameter data (SPC-4 6.36): one group, active/optimized,
/// holding `ports`; `extended` selects the extended header (format 001b).
pub fn report_target_port_groups(ports: &[u16], extended: bool) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0] = 0x80; // PREF, asymmetric access state 0h: active/optimized
    d[1] = 0x01; // AO_SUP: the only state a port here is ever in
    d[2..4].copy_from_slice(&TARGET_PORT_GROUP.to_be_bytes());
    d[7] = u8::try_from(ports.len()).unwrap_or(u8::MAX);
    for p in ports.iter().take(255) {
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(&p.to_be_bytes());
    }
    let mut v = Vec::with_capacity(8 + d.len());
    let extra = if extended { 4 } else { 0 };
    v.extend_from_slice(&((d.len() + extra) as u32).to_be_bytes());
    if extended {
        // FORMAT TYPE 001b; implicit transitions take no time (there are none).
        v.extend_from_slice(&[0x10, 0, 0, 0]);
    }
    v.extend(d);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ident() -> LunIdentity {
        LunIdentity {
            vendor: "RUST".into(),
            product: "malloc0".into(),
            revision: "0.1".into(),
            serial: "SN123".into(),
            naa: 0x6001_4050_0000_0001,
            target_name: "iqn.2024-01.org.example:t1".into(),
            pr_file: None,
        }
    }

    fn facts(thin: bool) -> LunFacts {
        LunFacts {
            thin,
            limits: Limits::for_block_size(512),
            port: 1,
        }
    }

    #[test]
    fn standard_fields() {
        let v = standard(&ident());
        assert_eq!(&v[0..8], &[0, 0, 6, 0x12, 91, 0x10, 0, 2]);
        assert_eq!(&v[8..16], b"RUST    ");
        assert_eq!(&v[16..32], b"malloc0         ");
        assert_eq!(&v[32..36], b"0.1 ");
        assert_eq!(
            &v[58..66],
            &[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]
        );
        assert_eq!(no_lun()[0], 0x7F);
    }

    #[test]
    fn supported_pages_and_serial() {
        let v = vpd(0, &ident(), &facts(true)).unwrap();
        assert_eq!(v, vec![0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
        let s = vpd(0x80, &ident(), &facts(true)).unwrap();
        assert_eq!(s, b"\x00\x80\x00\x05SN123".to_vec());
        assert_eq!(
            vpd(0x81, &ident(), &facts(true)).unwrap_err(),
            Sense::invalid_cdb(2, None)
        );
    }

    #[test]
    fn device_identification_designators() {
        let v = vpd(0x83, &ident(), &facts(true)).unwrap();
        assert_eq!(usize::from(u16::from_be_bytes([v[2], v[3]])), v.len() - 4);
        assert_eq!(&v[4..8], &[0x01, 0x03, 0, 8]);
        assert_eq!(&v[8..16], &0x6001_4050_0000_0001u64.to_be_bytes());
        assert_eq!(&v[16..20], &[0x02, 0x01, 0, 13]);
        assert_eq!(&v[20..33], b"RUST    SN123");
        let name = b"iqn.2024-01.org.example:t1,t,0x0001\0";
        assert_eq!(&v[33..37], &[0x53, 0x98, 0, 36]);
        assert_eq!(&v[37..37 + name.len()], name);
        let rel = 37 + 36;
        assert_eq!(&v[rel..rel + 8], &[0x51, 0x94, 0, 4, 0, 0, 0, 1]);
        assert_eq!(&v[rel + 8..rel + 16], &[0x51, 0x95, 0, 4, 0, 0, 0, 1]);
        // Through portal group 7: that port's name and relative port, the same group.
        let f = LunFacts {
            port: 7,
            ..facts(true)
        };
        let v = vpd(0x83, &ident(), &f).unwrap();
        assert_eq!(
            &v[37..37 + name.len()],
            b"iqn.2024-01.org.example:t1,t,0x0007\0"
        );
        assert_eq!(
            &v[rel..rel + 16],
            &[0x51, 0x94, 0, 4, 0, 0, 0, 7, 0x51, 0x95, 0, 4, 0, 0, 0, 1]
        );
        assert_eq!(&v[8..16], &0x6001_4050_0000_0001u64.to_be_bytes());
    }

    #[test]
    fn target_port_groups() {
        let v = report_target_port_groups(&[1, 2], false);
        assert_eq!(
            v,
            vec![0, 0, 0, 16, 0x80, 0x01, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]
        );
        let x = report_target_port_groups(&[3], true);
        assert_eq!(
            x,
            vec![0, 0, 0, 16, 0x10, 0, 0, 0, 0x80, 0x01, 0, 1, 0, 0, 0, 1, 0, 0, 0, 3]
        );
    }

    #[test]
    fn block_limits_consistent() {
        let v = vpd(0xB0, &ident(), &facts(true)).unwrap();
        assert_eq!(&v[0..4], &[0, 0xB0, 0, 0x3C]);
        assert_eq!(v[4] & 1, 1);
        assert_eq!(v[5], 255);
        let max_xfer = u32::from_be_bytes(v[8..12].try_into().unwrap());
        assert_eq!(max_xfer, 65536);
        let max_ws = u64::from_be_bytes(v[36..44].try_into().unwrap());
        assert_eq!(max_ws, 65536);
        assert_eq!(&v[20..24], &MAX_UNMAP_BLOCKS.to_be_bytes());
        let thick = vpd(0xB0, &ident(), &facts(false)).unwrap();
        assert_eq!(&thick[20..28], &[0; 8]);
    }

    #[test]
    fn provisioning_page() {
        let v = vpd(0xB2, &ident(), &facts(true)).unwrap();
        assert_eq!(v, vec![0, 0xB2, 0, 4, 0, 0xE4, 2, 0]);
        let v = vpd(0xB2, &ident(), &facts(false)).unwrap();
        assert_eq!(v, vec![0, 0xB2, 0, 4, 0, 0, 0, 0]);
        let c = vpd(0xB1, &ident(), &facts(false)).unwrap();
        assert_eq!(&c[4..6], &[0, 1]);
    }
}
