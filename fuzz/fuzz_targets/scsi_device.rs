//! CDBs (with Data-Out) through the SCSI device: decoder, checks and execution on a RAM
//! disk. Input: repeated [nexus, lun, cdb length, cdb..., data length (2 bytes), data...];
//! a first byte from 0xFC on is an event instead (LUN reset, target reset, a session of
//! nexus `lun` % 3 ending or starting on portal group 1 or 2), followed by two bytes.
#![no_main]
use dataplane::bdev::malloc::MallocBdev;
use dataplane::mem::IoBuf;
use dataplane::scsi::{DataDirection, Device, ItNexus, LunIdentity, ScsiTask};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut d = Device::new();
    let id = LunIdentity {
        vendor: "FUZZ".into(),
        product: "fuzz".into(),
        revision: "1".into(),
        serial: "1".into(),
        naa: 0x5000_0000_0000_0001,
        target_name: "iqn.2026-11.io.fuzz:t".into(),
        // No APTPL state file: a fuzzer must not write to the disk.
        pr_file: None,
    };
    let Ok(b) = MallocBdev::new("m", 512, 256 * 1024) else {
        return;
    };
    let _ = d.add_lun(0, Box::new(b), id);
    d.set_ports(vec![1, 2]);
    let mut at = 0;
    let mut tag = 0u64;
    while at + 3 <= data.len() {
        if data[at] >= 0xFC {
            let n = u64::from(data[at + 1] % 3);
            match data[at] {
                0xFC => d.lun_reset(0, n),
                0xFD => d.target_reset(n, data[at + 2] & 1 == 1),
                0xFE => d.nexus_removed(n),
                _ => d.nexus_added(
                    n,
                    ItNexus::new(
                        "iqn.2026-11.io.fuzz:i",
                        [0x40, 0, 0, 0, 0, n as u8],
                        1 + u16::from(data[at + 2] & 1),
                    ),
                ),
            }
            at += 3;
            continue;
        }
        let nexus = u64::from(data[at] % 3);
        let lun = u64::from(data[at + 1] % 2);
        let cdb_len = usize::from(data[at + 2] % 33);
        at += 3;
        let Some(cdb) = data.get(at..at + cdb_len) else {
            return;
        };
        at += cdb_len;
        let dlen = match data.get(at..at + 2) {
            Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])) % 8193,
            None => 0,
        };
        at += 2;
        let payload = data.get(at..(at + dlen).min(data.len())).unwrap_or(&[]);
        at += payload.len();
        tag += 1;
        d.submit(ScsiTask {
            tag,
            nexus,
            lun,
            cdb: cdb.to_vec(),
            expected_len: payload.len() as u32,
            direction: if payload.is_empty() {
                DataDirection::Read
            } else {
                DataDirection::Write
            },
            data_out: (!payload.is_empty()).then(|| IoBuf::from_vec(payload.to_vec())),
        });
        let mut out = Vec::new();
        for _ in 0..4 {
            d.poll(&mut out);
        }
    }
});
