//! Device-level tests: routing, unit attentions, reservations and medium commands against the
//! in-memory mock block device.

use std::sync::{Arc, Mutex};

use super::testutil::{Log, MockBdev};
use super::*;
use crate::bdev::BdevOp;

const BS: u32 = 512;
const BLOCKS: u64 = 1024;
const N1: NexusId = 1;
const N2: NexusId = 2;

fn identity() -> LunIdentity {
    LunIdentity {
        vendor: "RUST".into(),
        product: "mock".into(),
        revision: "1".into(),
        serial: "S1".into(),
        naa: 0x6000_0000_0000_0001,
        target_name: "iqn.2024-01.test:t".into(),
        pr_file: None,
    }
}

/// The I_T nexus of session `n`: initiator host<n>, ISID ending in n, portal group 1.
fn it(n: NexusId) -> ItNexus {
    ItNexus::new(
        &format!("iqn.2024-01.test:host{n}"),
        [0x40, 0, 0, 0, 0, n as u8],
        1,
    )
}

fn device(thin: bool) -> (Device, Arc<Mutex<Log>>) {
    let (m, log) = MockBdev::new(BS, BLOCKS, thin);
    let mut d = Device::new();
    d.add_lun(0, Box::new(m), identity()).unwrap();
    d.nexus_added(N1, it(N1));
    d.nexus_added(N2, it(N2));
    (d, log)
}

fn task(nexus: NexusId, lun: u64, cdb: &[u8], data: Option<Vec<u8>>) -> ScsiTask {
    let mut c = cdb.to_vec();
    c.resize(c.len().max(16), 0);
    ScsiTask {
        tag: 7,
        nexus,
        lun,
        cdb: c,
        expected_len: data.as_ref().map_or(0, |d| d.len() as u32),
        direction: if data.is_some() {
            DataDirection::Write
        } else {
            DataDirection::Read
        },
        data_out: data.map(IoBuf::from_vec),
    }
}

/// Submits and polls until the response arrives.
fn run(d: &mut Device, t: ScsiTask) -> ScsiResponse {
    d.submit(t);
    let mut out = Vec::new();
    for _ in 0..10 {
        d.poll(&mut out);
        if let Some(r) = out.pop() {
            assert!(out.is_empty());
            return r;
        }
    }
    panic!("no response");
}

fn cmd(d: &mut Device, nexus: NexusId, cdb: &[u8], data: Option<Vec<u8>>) -> ScsiResponse {
    run(d, task(nexus, 0, cdb, data))
}

fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
    assert_eq!(r.status, ScsiStatus::CheckCondition, "{r:?}");
    if r.sense[0] & 0x7F == 0x72 {
        (r.sense[1], r.sense[2], r.sense[3])
    } else {
        (r.sense[2], r.sense[12], r.sense[13])
    }
}

fn data(r: &ScsiResponse) -> &[u8] {
    assert_eq!(r.status, ScsiStatus::Good, "{r:?}");
    r.data_in.as_ref().map_or(&[], |b| b.as_slice())
}

fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn write(d: &mut Device, lba: u32, fill: u8, blocks: u16) {
    let r = cmd(
        d,
        N1,
        &rw10(0x2A, lba, blocks),
        Some(vec![fill; blocks as usize * BS as usize]),
    );
    assert_eq!(r.status, ScsiStatus::Good);
}

fn read(d: &mut Device, lba: u32, blocks: u16) -> Vec<u8> {
    let r = cmd(d, N1, &rw10(0x28, lba, blocks), None);
    data(&r).to_vec()
}

#[test]
fn write_then_read_back() {
    let (mut d, _) = device(true);
    write(&mut d, 10, 0xAB, 2);
    let v = read(&mut d, 10, 2);
    assert_eq!(v, vec![0xAB; 1024]);
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn lba_out_of_range_errors() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &rw10(0x28, BLOCKS as u32 - 1, 2), None);
    assert_eq!(sense_of(&r), (5, 0x21, 0));
    let mut c16 = vec![0x88, 0];
    c16.extend_from_slice(&u64::MAX.to_be_bytes());
    c16.extend_from_slice(&1u32.to_be_bytes());
    c16.extend_from_slice(&[0, 0]);
    let r = cmd(&mut d, N1, &c16, None);
    assert_eq!(sense_of(&r), (5, 0x21, 0));
    // Zero blocks is GOOD, but the LBA is still checked.
    let r = cmd(&mut d, N1, &rw10(0x28, 5, 0), None);
    assert_eq!(r.status, ScsiStatus::Good);
    let r = cmd(&mut d, N1, &rw10(0x28, BLOCKS as u32 + 1, 0), None);
    assert_eq!(sense_of(&r), (5, 0x21, 0));
}

#[test]
fn short_data_out_writes_only_whole_blocks() {
    let (mut d, _) = device(true);
    write(&mut d, 0, b'a', 2);
    let r = cmd(&mut d, N1, &rw10(0x2A, 0, 2), Some(vec![b'b'; 512]));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(r.data_out_wanted, 1024);
    let v = read(&mut d, 0, 2);
    assert!(v[..512].iter().all(|&b| b == b'b'));
    assert!(v[512..].iter().all(|&b| b == b'a'));
}

#[test]
fn unknown_opcode_and_lun() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &[0xC7, 0, 0, 0, 0, 0], None);
    assert_eq!(sense_of(&r), (5, 0x20, 0));
    let r = run(&mut d, task(N1, 3, &[0, 0, 0, 0, 0, 0], None));
    assert_eq!(sense_of(&r), (5, 0x25, 0));
    let r = run(&mut d, task(N1, 3, &[0x12, 0, 0, 0, 36, 0], None));
    assert_eq!(data(&r)[0], 0x7F);
    let r = run(
        &mut d,
        task(N1, 3, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None),
    );
    assert_eq!(data(&r), &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn report_luns() {
    let (m, _) = MockBdev::new(BS, 8, false);
    let (mut d, _) = device(true);
    d.add_lun(300, Box::new(m), identity()).unwrap();
    assert!(d
        .add_lun(0, Box::new(MockBdev::new(BS, 8, false).0), identity())
        .is_err());
    assert_eq!(d.luns(), vec![0, 300]);
    let r = cmd(&mut d, N1, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None);
    let v = data(&r);
    assert_eq!(&v[0..8], &[0, 0, 0, 16, 0, 0, 0, 0]);
    assert_eq!(&v[8..16], &[0; 8]);
    assert_eq!(&v[16..18], &[0x41, 0x2C]);
    // Allocation length below 16 is invalid; 16 truncates the list.
    let r = cmd(&mut d, N1, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0], None);
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    let r = cmd(&mut d, N1, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], None);
    assert_eq!(data(&r).len(), 16);
    let r = cmd(&mut d, N1, &[0xA0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0], None);
    assert_eq!(&data(&r)[0..4], &[0; 4]);
}

#[test]
fn inquiry_allocation_length_and_evpd() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &[0x12, 0, 0, 0, 10, 0], None);
    assert_eq!(data(&r).len(), 10);
    let r = cmd(&mut d, N1, &[0x12, 0, 0x80, 0, 255, 0], None);
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    assert_eq!(&r.sense[15..18], &[0xC0, 0, 2]);
    let r = cmd(&mut d, N1, &[0x12, 1, 0xB2, 0, 255, 0], None);
    assert_eq!(data(&r)[5], 0xE4);
}

#[test]
fn read_capacity() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None);
    assert_eq!(data(&r), &[0, 0, 0x03, 0xFF, 0, 0, 2, 0]);
    let mut c = vec![0x9E, 0x10];
    c.resize(16, 0);
    c[13] = 32;
    let r = cmd(&mut d, N1, &c, None);
    let v = data(&r);
    assert_eq!(v.len(), 32);
    assert_eq!(&v[0..8], &1023u64.to_be_bytes());
    assert_eq!(v[13], 0, "one logical block per physical block");
    assert_eq!(v[14], 0xC0);
    c[13] = 12;
    assert_eq!(data(&cmd(&mut d, N1, &c, None)).len(), 12);
}

#[test]
fn unit_attention_after_lun_reset_is_delivered_once() {
    let (mut d, _) = device(true);
    d.lun_reset(0, N1);
    // INQUIRY passes a pending unit attention without clearing it.
    let r = cmd(&mut d, N1, &[0x12, 0, 0, 0, 36, 0], None);
    assert_eq!(r.status, ScsiStatus::Good);
    let r = cmd(&mut d, N1, &[0, 0, 0, 0, 0, 0], None);
    assert_eq!(sense_of(&r), (6, 0x29, 0x03));
    let r = cmd(&mut d, N1, &[0, 0, 0, 0, 0, 0], None);
    assert_eq!(r.status, ScsiStatus::Good);
    // The other nexus gets it through REQUEST SENSE, which clears it too.
    let r = cmd(&mut d, N2, &[0x03, 0, 0, 0, 252, 0], None);
    let v = data(&r);
    assert_eq!((v[0], v[2], v[12], v[13]), (0x70, 6, 0x29, 0x03));
    let r = cmd(&mut d, N2, &[0x03, 0, 0, 0, 252, 0], None);
    assert_eq!(data(&r)[2], 0);
    assert_eq!(cmd(&mut d, N2, &[0; 6], None).status, ScsiStatus::Good);
}

#[test]
fn new_nexus_gets_no_unit_attention() {
    let (mut d, _) = device(true);
    d.nexus_added(9, it(9));
    assert_eq!(cmd(&mut d, 9, &[0; 6], None).status, ScsiStatus::Good);
}

#[test]
fn capacity_change_and_target_reset() {
    let (mut d, _) = device(true);
    d.resize_lun(0, 2048).unwrap();
    assert!(d.resize_lun(5, 1).is_err());
    let r = cmd(&mut d, N2, &[0; 6], None);
    assert_eq!(sense_of(&r), (6, 0x2A, 0x09));
    d.target_reset(N1, false);
    let r = cmd(&mut d, N2, &[0; 6], None);
    assert_eq!(sense_of(&r), (6, 0x29, 0x00));
}

fn mode_sense6_control(d: &mut Device, nexus: NexusId) -> Vec<u8> {
    let r = cmd(d, nexus, &[0x1A, 0x08, 0x0A, 0, 255, 0], None);
    data(&r).to_vec()
}

#[test]
fn mode_select_d_sense_switches_sense_format() {
    let (mut d, _) = device(true);
    let cur = mode_sense6_control(&mut d, N1);
    assert_eq!(cur[3], 0);
    let mut page = cur[4..].to_vec();
    page[2] |= 0x04;
    let mut list = vec![0, 0, 0, 0];
    list.extend(&page);
    let len = list.len() as u8;
    let r = cmd(&mut d, N1, &[0x15, 0x10, 0, 0, len, 0], Some(list.clone()));
    assert_eq!(r.status, ScsiStatus::Good, "{r:?}");
    assert_eq!(mode_sense6_control(&mut d, N1)[6] & 0x04, 0x04);
    let r = cmd(&mut d, N1, &rw10(0x28, u32::MAX, 1), None);
    assert_eq!(&r.sense[..4], &[0x72, 5, 0x21, 0]);
    // Only the other nexus hears about the change.
    let r = cmd(&mut d, N2, &[0; 6], None);
    assert_eq!(sense_of(&r), (6, 0x2A, 0x01));
    // PF = 0 is refused.
    let r = cmd(&mut d, N1, &[0x15, 0, 0, 0, len, 0], Some(list));
    assert_eq!(sense_of(&r), (5, 0x24, 0));
}

#[test]
fn mode_sense_saved_not_supported() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &[0x1A, 0, 0xCA, 0, 255, 0], None);
    assert_eq!(sense_of(&r), (5, 0x39, 0));
}

fn caw_cdb(lba: u64, blocks: u8) -> Vec<u8> {
    let mut c = vec![0x89, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, blocks, 0, 0]);
    c
}

#[test]
fn compare_and_write_miscompare_offset() {
    let (mut d, _) = device(true);
    write(&mut d, 4, 0x11, 1);
    let mut buf = vec![0x11; 1024];
    buf[300] = 0x12;
    let r = cmd(&mut d, N1, &caw_cdb(4, 1), Some(buf));
    assert_eq!(sense_of(&r), (0x0E, 0x1D, 0));
    assert_eq!(&r.sense[3..7], &300u32.to_be_bytes());
    assert_eq!(r.sense[0], 0xF0);
    let mut ok = vec![0x11; 512];
    ok.extend(vec![0x22; 512]);
    let r = cmd(&mut d, N1, &caw_cdb(4, 1), Some(ok));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(read(&mut d, 4, 1), vec![0x22; 512]);
    // Data-Out of the wrong size is refused.
    let r = cmd(&mut d, N1, &caw_cdb(4, 1), Some(vec![0; 2048]));
    assert_eq!(r.status, ScsiStatus::CheckCondition);
}

#[test]
fn compare_and_write_is_atomic_against_overlapping_write() {
    let (mut d, log) = device(true);
    write(&mut d, 8, 0x33, 2);
    log.lock().unwrap().ops.clear();
    let mut caw = vec![0x33; 512];
    caw.extend(vec![0x44; 512]);
    let mut t = task(N1, 0, &caw_cdb(8, 1), Some(caw));
    t.tag = 1;
    d.submit(t);
    let mut t = task(N1, 0, &rw10(0x2A, 7, 2), Some(vec![0x55; 1024]));
    t.tag = 2;
    d.submit(t);
    let mut out = Vec::new();
    for _ in 0..6 {
        d.poll(&mut out);
    }
    let tags: Vec<(u64, ScsiStatus)> = out.iter().map(|r| (r.tag, r.status)).collect();
    assert_eq!(tags, vec![(1, ScsiStatus::Good), (2, ScsiStatus::Good)]);
    let ops = log.lock().unwrap().ops.clone();
    assert_eq!(
        ops,
        vec![
            BdevOp::Read { lba: 8, blocks: 1 },
            BdevOp::Write {
                lba: 8,
                blocks: 1,
                fua: false
            },
            BdevOp::Write {
                lba: 7,
                blocks: 2,
                fua: false
            },
        ]
    );
    assert_eq!(read(&mut d, 7, 2), vec![0x55; 1024]);
}

#[test]
fn verify_bytchk() {
    let (mut d, _) = device(true);
    write(&mut d, 0, 0x5A, 2);
    let mut c = rw10(0x2F, 0, 2);
    c[1] = 0x02;
    let r = cmd(&mut d, N1, &c, Some(vec![0x5A; 1024]));
    assert_eq!(r.status, ScsiStatus::Good);
    let mut bad = vec![0x5A; 1024];
    bad[700] = 0;
    let r = cmd(&mut d, N1, &c, Some(bad));
    assert_eq!(sense_of(&r), (0x0E, 0x1D, 0));
    assert_eq!(&r.sense[3..7], &700u32.to_be_bytes());
    c[1] = 0x06;
    let r = cmd(&mut d, N1, &c, Some(vec![0x5A; 512]));
    assert_eq!(r.status, ScsiStatus::Good);
    c[1] = 0;
    let r = cmd(&mut d, N1, &rw10(0x2F, BLOCKS as u32, 1), None);
    assert_eq!(sense_of(&r), (5, 0x21, 0));
}

fn ws10(lba: u32, blocks: u16, unmap: bool) -> Vec<u8> {
    let mut c = rw10(0x41, lba, blocks);
    if unmap {
        c[1] = 0x08;
    }
    c
}

#[test]
fn write_same_and_unmap() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &ws10(0, 4, false), Some(vec![0x77; 512]));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(read(&mut d, 0, 4), vec![0x77; 2048]);
    let r = cmd(&mut d, N1, &ws10(0, 4, true), Some(vec![0xFF; 512]));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(read(&mut d, 0, 4), vec![0; 2048]);
    let r = cmd(&mut d, N1, &ws10(0, 4, true), Some(vec![0xFF; 1024]));
    assert_eq!(r.status, ScsiStatus::CheckCondition);
    let r = cmd(
        &mut d,
        N1,
        &ws10(BLOCKS as u32 + 1, 0, false),
        Some(vec![0; 512]),
    );
    assert_eq!(sense_of(&r), (5, 0x21, 0));
    let r = cmd(&mut d, N1, &ws10(0, 0, false), Some(vec![0; 512]));
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    // ANCHOR is not supported.
    let mut c = ws10(0, 1, true);
    c[1] |= 0x10;
    let r = cmd(&mut d, N1, &c, Some(vec![0; 512]));
    assert_eq!(sense_of(&r), (5, 0x24, 0));

    write(&mut d, 100, 0x99, 4);
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&100u64.to_be_bytes());
    list.extend_from_slice(&2u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let r = cmd(
        &mut d,
        N1,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        Some(list.clone()),
    );
    assert_eq!(r.status, ScsiStatus::Good);
    let v = read(&mut d, 100, 4);
    assert!(v[..1024].iter().all(|&b| b == 0) && v[1024..].iter().all(|&b| b == 0x99));
    list[8..16].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    let r = cmd(&mut d, N1, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], Some(list));
    assert_eq!(sense_of(&r), (5, 0x21, 0));

    // GET LBA STATUS: 100..102 deallocated, 102..104 mapped.
    let mut c = vec![0x9E, 0x12];
    c.extend_from_slice(&100u64.to_be_bytes());
    c.extend_from_slice(&40u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    let r = cmd(&mut d, N1, &c, None);
    let v = data(&r);
    assert_eq!(&v[0..4], &[0, 0, 0, 36]);
    assert_eq!(&v[8..16], &100u64.to_be_bytes());
    assert_eq!(&v[16..21], &[0, 0, 0, 2, 1]);
    assert_eq!(&v[24..32], &102u64.to_be_bytes());
    assert_eq!(v[36], 0);
    c[2..10].copy_from_slice(&BLOCKS.to_be_bytes());
    assert_eq!(sense_of(&cmd(&mut d, N1, &c, None)), (5, 0x21, 0));
}

#[test]
fn reservations() {
    let (mut d, _) = device(true);
    let reserve = [0x16, 0, 0, 0, 0, 0];
    let release = [0x17, 0, 0, 0, 0, 0];
    assert_eq!(cmd(&mut d, N1, &reserve, None).status, ScsiStatus::Good);
    assert_eq!(cmd(&mut d, N1, &reserve, None).status, ScsiStatus::Good);
    assert_eq!(
        cmd(&mut d, N2, &reserve, None).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(cmd(&mut d, N2, &release, None).status, ScsiStatus::Good);
    let ms = [0x1A, 0, 0x3F, 0, 255, 0];
    assert_eq!(cmd(&mut d, N1, &ms, None).status, ScsiStatus::Good);
    assert_eq!(
        cmd(&mut d, N2, &ms, None).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        cmd(&mut d, N2, &[0x12, 0, 0, 0, 36, 0], None).status,
        ScsiStatus::Good
    );
    d.nexus_removed(N1);
    assert_eq!(cmd(&mut d, N2, &ms, None).status, ScsiStatus::Good);
    assert_eq!(cmd(&mut d, N2, &reserve, None).status, ScsiStatus::Good);
    d.lun_reset(0, N2);
    let _ = cmd(&mut d, N1, &[0; 6], None);
    let r = cmd(&mut d, N1, &ms, None);
    assert_eq!(r.status, ScsiStatus::Good);
}

#[test]
fn report_supported_opcodes_through_device() {
    let (mut d, _) = device(true);
    let r = cmd(
        &mut d,
        N1,
        &[0xA3, 0x0C, 0x01, 0x28, 0, 0, 0, 0, 1, 0, 0, 0],
        None,
    );
    assert_eq!(&data(&r)[..5], &[0, 3, 0, 10, 0x28]);
    let r = cmd(
        &mut d,
        N1,
        &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0],
        None,
    );
    assert_eq!(data(&r).len(), 4);
}

#[test]
fn sync_cache_prefetch_and_misc() {
    let (mut d, log) = device(true);
    let r = cmd(&mut d, N1, &rw10(0x35, 0, 8), None);
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(log.lock().unwrap().ops.last(), Some(&BdevOp::Flush));
    let r = cmd(&mut d, N1, &rw10(0x35, BLOCKS as u32, 1), None);
    assert_eq!(sense_of(&r), (5, 0x21, 0));
    assert_eq!(
        cmd(&mut d, N1, &rw10(0x34, 0, 8), None).status,
        ScsiStatus::Good
    );
    let r = cmd(&mut d, N1, &rw10(0x34, BLOCKS as u32, 1), None);
    assert_eq!(sense_of(&r), (5, 0x21, 0));
    assert_eq!(
        cmd(&mut d, N1, &[0x1B, 1, 0, 0, 0x01, 0], None).status,
        ScsiStatus::Good
    );
    let r = cmd(&mut d, N1, &[0x1B, 1, 0, 0, 0x02, 0], None);
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    assert_eq!(
        cmd(&mut d, N1, &[0x1E, 0, 0, 0, 1, 0], None).status,
        ScsiStatus::Good
    );
    // FUA reaches the device.
    let mut c = rw10(0x2A, 0, 1);
    c[1] = 0x08;
    assert_eq!(
        cmd(&mut d, N1, &c, Some(vec![1; 512])).status,
        ScsiStatus::Good
    );
    assert!(matches!(
        log.lock().unwrap().ops.last(),
        Some(BdevOp::Write { fua: true, .. })
    ));
}

#[test]
fn orwrite_merges() {
    let (mut d, _) = device(true);
    write(&mut d, 3, 0x0F, 1);
    let mut c = vec![0x8B, 0];
    c.extend_from_slice(&3u64.to_be_bytes());
    c.extend_from_slice(&1u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    let r = cmd(&mut d, N1, &c, Some(vec![0xF0; 512]));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(read(&mut d, 3, 1), vec![0xFF; 512]);
}

#[test]
fn garbage_cdbs_never_panic() {
    let (mut d, _) = device(true);
    let mut x: u32 = 12345;
    for i in 0..3000u32 {
        let mut c = Vec::new();
        let len = [6, 10, 12, 16][(i % 4) as usize];
        for _ in 0..len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            c.push((x >> 16) as u8);
        }
        c[0] = (i % 256) as u8;
        let data = if i % 3 == 0 {
            Some(vec![0xA5; (x % 3000) as usize])
        } else {
            None
        };
        let t = ScsiTask {
            tag: u64::from(i),
            nexus: N1,
            lun: 0,
            cdb: c,
            expected_len: 0,
            direction: DataDirection::None,
            data_out: data.map(IoBuf::from_vec),
        };
        d.submit(t);
        let mut out = Vec::new();
        for _ in 0..4 {
            d.poll(&mut out);
        }
    }
    let mut out = Vec::new();
    d.poll(&mut out);
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn software_write_protect() {
    let (mut d, _) = device(true);
    let cur = mode_sense6_control(&mut d, N1);
    let mut list = vec![0, 0, 0, 0];
    list.extend(&cur[4..]);
    list[4 + 4] |= 0x08;
    let len = list.len() as u8;
    let r = cmd(&mut d, N1, &[0x15, 0x10, 0, 0, len, 0], Some(list.clone()));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(mode_sense6_control(&mut d, N1)[2], 0x90);
    let r = cmd(&mut d, N1, &rw10(0x2A, 0, 1), Some(vec![0; 512]));
    assert_eq!(sense_of(&r), (7, 0x27, 0));
    assert_eq!(read(&mut d, 0, 1).len(), 512);
    list[4 + 4] &= !0x08;
    let r = cmd(&mut d, N1, &[0x15, 0x10, 0, 0, len, 0], Some(list));
    assert_eq!(r.status, ScsiStatus::Good);
    write(&mut d, 0, 1, 1);
}

#[test]
fn compare_and_write_zero_blocks_with_data_is_refused() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &caw_cdb(0, 0), None);
    assert_eq!(r.status, ScsiStatus::Good);
    let r = cmd(&mut d, N1, &caw_cdb(0, 0), Some(vec![0x41; 512 * 512]));
    assert_eq!(sense_of(&r), (5, 0x24, 0));
}

#[test]
fn unit_attention_outranks_cdb_errors() {
    let (mut d, _) = device(true);
    d.lun_reset(0, N1);
    let r = cmd(&mut d, N1, &[0xC7, 0, 0, 0, 0, 0], None);
    assert_eq!(sense_of(&r), (6, 0x29, 0x03));
    let r = cmd(&mut d, N1, &[0xC7, 0, 0, 0, 0, 0], None);
    assert_eq!(sense_of(&r), (5, 0x20, 0));
}

fn prout(d: &mut Device, n: NexusId, sa: u8, kind: u8, key: u64, sa_key: u64) -> ScsiStatus {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    cmd(d, n, &[0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0], Some(p)).status
}

#[test]
fn persistent_reservation_access() {
    let (mut d, _) = device(true);
    assert_eq!(prout(&mut d, N1, 6, 0, 0, 0x11), ScsiStatus::Good);
    assert_eq!(prout(&mut d, N2, 6, 0, 0, 0x22), ScsiStatus::Good);
    assert_eq!(prout(&mut d, N1, 1, 3, 0x11, 0), ScsiStatus::Good);
    // Exclusive access: the holder reads, the registered other nexus does not.
    assert_eq!(
        cmd(&mut d, N1, &rw10(0x28, 0, 1), None).status,
        ScsiStatus::Good
    );
    assert_eq!(
        cmd(&mut d, N2, &rw10(0x28, 0, 1), None).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(cmd(&mut d, N2, &[0; 6], None).status, ScsiStatus::Good);
    assert_eq!(
        cmd(&mut d, N2, &[0x16, 0, 0, 0, 0, 0], None).status,
        ScsiStatus::ReservationConflict
    );
    let r = cmd(&mut d, N2, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0], None);
    let v = data(&r);
    assert_eq!(&v[8..16], &0x11u64.to_be_bytes());
    assert_eq!(v[21], 3);
    // An unknown service action.
    let r = cmd(
        &mut d,
        N1,
        &[0x5F, 8, 3, 0, 0, 0, 0, 0, 24, 0],
        Some(vec![0; 24]),
    );
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    assert_eq!(prout(&mut d, N1, 2, 3, 0x11, 0), ScsiStatus::Good);
    assert_eq!(
        cmd(&mut d, N2, &rw10(0x28, 0, 1), None).status,
        ScsiStatus::Good
    );
    assert_eq!(prout(&mut d, N1, 0, 0, 0x11, 0), ScsiStatus::Good);
    assert_eq!(prout(&mut d, N2, 0, 0, 0x22, 0), ScsiStatus::Good);
    let r = cmd(&mut d, N1, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], None);
    assert_eq!(&data(&r)[4..8], &[0; 4]);
    let r = cmd(&mut d, N1, &[0x5E, 4, 0, 0, 0, 0, 0, 0, 64, 0], None);
    assert_eq!(sense_of(&r), (5, 0x24, 0));
}

#[test]
fn transfer_beyond_block_limits_is_refused() {
    let (m, _) = MockBdev::new(BS, 1 << 20, true);
    let mut d = Device::new();
    d.add_lun(0, Box::new(m), identity()).unwrap();
    let mut c = vec![0x88, 0];
    c.extend_from_slice(&0u64.to_be_bytes());
    c.extend_from_slice(&0x1_0001u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    let r = cmd(&mut d, N1, &c, None);
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    assert_eq!(&r.sense[15..18], &[0xC0, 0, 10]);
}

#[test]
fn cold_reset_restores_default_mode_and_raises_reset_attention() {
    let (mut d, _) = device(true);
    let cur = mode_sense6_control(&mut d, N1);
    let mut list = vec![0, 0, 0, 0];
    list.extend(&cur[4..]);
    list[6] |= 0x04;
    let len = list.len() as u8;
    assert_eq!(
        cmd(&mut d, N1, &[0x15, 0x10, 0, 0, len, 0], Some(list)).status,
        ScsiStatus::Good
    );
    d.target_reset(N2, true);
    let r = cmd(&mut d, N1, &[0; 6], None);
    assert_eq!(&r.sense[..4], &[0x70, 0, 6, 0]);
    assert_eq!((r.sense[12], r.sense[13]), (0x29, 0));
    assert_eq!(mode_sense6_control(&mut d, N1)[6] & 0x04, 0);
}

#[test]
fn data_phase_in_the_wrong_direction() {
    let (mut d, _) = device(true);
    // task() marks commands with Data-Out as WRITE: a READ with Data-Out still reads.
    let r = cmd(&mut d, N1, &rw10(0x28, 0, 1), Some(vec![0; 4096]));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(r.data_in.as_ref().map(|b| b.len()), Some(512));
    // A WRITE announced as READ with a length fails too; without a length it is harmless.
    let mut t = task(N1, 0, &rw10(0x2A, 0, 1), None);
    t.expected_len = 512;
    assert_eq!(sense_of(&run(&mut d, t)), (5, 0x0E, 0x03));
    let mut t = task(N1, 0, &rw10(0x2A, 0, 1), None);
    t.direction = DataDirection::None;
    assert_eq!(run(&mut d, t).status, ScsiStatus::Good);
}

#[test]
fn thick_lun_refuses_unmap_requests() {
    let (mut d, _) = device(false);
    let r = cmd(&mut d, N1, &ws10(0, 1, true), Some(vec![0; 512]));
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    let r = cmd(&mut d, N1, &ws10(0, 1, false), Some(vec![7; 512]));
    assert_eq!(r.status, ScsiStatus::Good);
    let r = cmd(
        &mut d,
        N1,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 8, 0],
        Some(vec![0; 8]),
    );
    assert_eq!(sense_of(&r), (5, 0x20, 0));
    let mut c = vec![0x9E, 0x10];
    c.resize(16, 0);
    c[13] = 32;
    assert_eq!(data(&cmd(&mut d, N1, &c, None))[14], 0);
}

#[test]
fn request_sense_formats_and_mode_sense10() {
    let (mut d, _) = device(true);
    d.lun_reset(0, N1);
    let r = cmd(&mut d, N1, &[0x03, 1, 0, 0, 252, 0], None);
    assert_eq!(data(&r), &[0x72, 6, 0x29, 0x03, 0, 0, 0, 0]);
    let r = cmd(&mut d, N1, &[0x03, 0, 0, 0, 4, 0], None);
    assert_eq!(data(&r), &[0x70, 0, 0, 0]);
    let r = cmd(
        &mut d,
        N1,
        &[0x5A, 0x10, 0x3F, 0, 0, 0, 0, 0x01, 0, 0],
        None,
    );
    let v = data(&r);
    assert_eq!(usize::from(u16::from_be_bytes([v[0], v[1]])), v.len() - 2);
    assert_eq!((v[3], v[4], v[7]), (0x10, 0x01, 16));
    assert_eq!(&v[8..16], &BLOCKS.to_be_bytes());
    let r = cmd(&mut d, N1, &[0x5A, 0x08, 0x08, 0, 0, 0, 0, 0, 12, 0], None);
    assert_eq!(data(&r).len(), 12);
    assert_eq!(&data(&r)[8..12], &[0x08, 18, 0x04, 0]);
}

#[test]
fn read_defect_data_reports_empty_lists() {
    let (mut d, _) = device(true);
    let r = cmd(&mut d, N1, &[0x37, 0, 0x18 | 5, 0, 0, 0, 0, 0, 32, 0], None);
    assert_eq!(data(&r), &[0, 0x1D, 0, 0]);
    let r = cmd(
        &mut d,
        N1,
        &[0xB7, 0x08, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0],
        None,
    );
    assert_eq!(data(&r), &[0, 0x08, 0, 0]);
}

#[test]
fn random_cdbs_never_panic_and_always_answer() {
    // Every opcode with pseudo-random fields, lengths and Data-Out; a deterministic
    // xorshift stream so a failure reproduces.
    let (mut d, _) = device(true);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..20_000u32 {
        let opcode = (round % 256) as u8;
        let len = 6 + (next() % 27) as usize;
        let mut cdb: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        cdb[0] = opcode;
        // Keep lengths mostly small so the run stays fast, but sometimes huge.
        if next() % 4 != 0 {
            for b in cdb.iter_mut().skip(2).take(4) {
                *b = 0;
            }
        }
        let data = match next() % 3 {
            0 => None,
            1 => Some(vec![0u8; (next() % 4096) as usize]),
            _ => Some((0..(next() % 600)).map(|_| next() as u8).collect()),
        };
        let nexus = if next() % 2 == 0 { N1 } else { N2 };
        let mut t = task(nexus, next() % 3, &cdb, data);
        t.cdb.truncate(len.max(6));
        t.expected_len = (next() % 70_000) as u32;
        let r = run(&mut d, t);
        assert_eq!(r.tag, 7);
        if r.status == ScsiStatus::CheckCondition {
            assert!(r.sense.len() >= 8, "{opcode:#04x}: sense {:?}", r.sense);
        }
    }
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn write_atomic16_writes_and_refuses_boundaries() {
    let (mut d, _) = device(true);
    let mut c = vec![0x9C, 0x08];
    c.extend_from_slice(&5u64.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, 2, 0, 0]);
    let r = cmd(&mut d, N1, &c, Some(vec![0x5A; 1024]));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(read(&mut d, 5, 2), vec![0x5A; 1024]);
    // A non-zero ATOMIC BOUNDARY: we advertise a maximum boundary size of 0.
    c[11] = 1;
    let r = cmd(&mut d, N1, &c, Some(vec![0; 1024]));
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    assert_eq!(&r.sense[15..18], &[0xC0, 0, 10], "field pointer at byte 10");
    // Beyond the end of the medium.
    c[11] = 0;
    c[2..10].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    let r = cmd(&mut d, N1, &c, Some(vec![0; 1024]));
    assert_eq!(sense_of(&r), (5, 0x21, 0));
}

#[test]
fn removed_lun_finishes_its_commands_then_releases_its_bdev() {
    let (mut d, _log) = device(false);
    let (m1, _) = MockBdev::new(BS, BLOCKS, false);
    d.add_lun(1, Box::new(m1), identity()).unwrap();
    // The add raised REPORTED LUNS DATA HAS CHANGED on LUN 0 for both nexuses.
    let tur = [0u8; 6];
    assert_eq!(sense_of(&cmd(&mut d, N1, &tur, None)), (6, 0x3F, 0x0E));
    assert_eq!(cmd(&mut d, N1, &tur, None).status, ScsiStatus::Good);
    // A READ(10) of LUN 1 is in the mock when the LUN is removed.
    let read = [0x28u8, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    d.submit(task(N1, 1, &read, None));
    assert!(d.remove_lun(1));
    assert!(!d.remove_lun(1));
    assert_eq!(d.luns(), vec![0]);
    assert!(d.take_released().is_empty(), "still busy");
    // The command in flight completes with its data; then the bdev is released.
    let mut out = Vec::new();
    d.poll(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].status, ScsiStatus::Good);
    assert_eq!(
        out[0].data_in.as_ref().map(|b| b.len()),
        Some(8 * BS as usize)
    );
    assert_eq!(d.in_flight(), 0);
    // New commands to LUN 1 are refused.
    let r = run(&mut d, task(N1, 1, &tur, None));
    assert_eq!(sense_of(&r), (5, 0x25, 0x00));
    let released = d.take_released();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].num_blocks(), BLOCKS);
    // N2 learns of both inventory changes once (the queue holds a code once).
    assert_eq!(sense_of(&cmd(&mut d, N2, &tur, None)), (6, 0x3F, 0x0E));
    assert_eq!(cmd(&mut d, N2, &tur, None).status, ScsiStatus::Good);
    // And the device gives every bdev back when dropped.
    assert_eq!(d.into_bdevs().len(), 1);
}

#[test]
fn replaced_lun_tells_every_nexus_its_data_changed() {
    let (mut d, _log) = device(false);
    let (m, _) = MockBdev::new(BS, BLOCKS * 2, false);
    d.replace_lun(0, Box::new(m), identity()).unwrap();
    assert_eq!(d.luns(), vec![0]);
    let tur = [0u8; 6];
    for n in [N1, N2] {
        assert_eq!(sense_of(&cmd(&mut d, n, &tur, None)), (6, 0x3F, 0x03));
        assert_eq!(sense_of(&cmd(&mut d, n, &tur, None)), (6, 0x2A, 0x09));
        assert_eq!(cmd(&mut d, n, &tur, None).status, ScsiStatus::Good);
    }
    let mut out = Vec::new();
    d.poll(&mut out);
    assert_eq!(
        d.take_released().len(),
        1,
        "the old bdev, idle, is released"
    );
}

fn write_tagged(d: &mut Device, n: NexusId, tag: u64, lba: u32) {
    let mut t = task(n, 0, &rw10(0x2A, lba, 1), Some(vec![0xAB; BS as usize]));
    t.tag = tag;
    d.submit(t);
}

fn collect(d: &mut Device) -> Vec<ScsiResponse> {
    let mut out = Vec::new();
    for _ in 0..10 {
        d.poll(&mut out);
    }
    out
}

#[test]
fn registrations_outlive_the_session_and_return_with_its_ports() {
    let (mut d, _) = device(true);
    assert_eq!(prout(&mut d, N1, 6, 0, 0, 0x11), ScsiStatus::Good);
    assert_eq!(prout(&mut d, N1, 1, 1, 0x11, 0), ScsiStatus::Good);
    d.nexus_removed(N1);
    // Still reserved (write exclusive) for everyone else.
    assert_eq!(
        cmd(&mut d, N2, &rw10(0x2A, 0, 1), Some(vec![0; 512])).status,
        ScsiStatus::ReservationConflict
    );
    // A new session of the same initiator port holds it again.
    d.nexus_added(5, it(N1));
    assert_eq!(
        cmd(&mut d, 5, &rw10(0x2A, 0, 1), Some(vec![0; 512])).status,
        ScsiStatus::Good
    );
    // While N2 preempts, the holder is away: it learns on its return.
    assert_eq!(prout(&mut d, N2, 6, 0, 0, 0x22), ScsiStatus::Good);
    d.nexus_removed(5);
    assert_eq!(prout(&mut d, N2, 4, 1, 0x22, 0x11), ScsiStatus::Good);
    d.nexus_added(6, it(N1));
    let r = cmd(&mut d, 6, &[0; 6], None);
    assert_eq!(sense_of(&r), (6, 0x2A, 0x05));
}

#[test]
fn preempt_and_abort_aborts_the_preempted_tasks() {
    let (mut d, _) = device(true);
    assert_eq!(prout(&mut d, N1, 6, 0, 0, 0x11), ScsiStatus::Good);
    assert_eq!(prout(&mut d, N2, 6, 0, 0, 0x22), ScsiStatus::Good);
    assert_eq!(prout(&mut d, N1, 1, 1, 0x11, 0), ScsiStatus::Good);
    // Two overlapping writes of N1: one in the block device, one waiting for its blocks.
    write_tagged(&mut d, N1, 100, 3);
    write_tagged(&mut d, N1, 101, 3);
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&0x22u64.to_be_bytes());
    p[8..16].copy_from_slice(&0x11u64.to_be_bytes());
    let mut t = task(N2, 0, &[0x5F, 5, 1, 0, 0, 0, 0, 0, 24, 0], Some(p));
    t.tag = 102;
    d.submit(t);
    let out = collect(&mut d);
    let status = |tag| out.iter().find(|r| r.tag == tag).map(|r| r.status);
    assert_eq!(status(100), Some(ScsiStatus::TaskAborted));
    assert_eq!(status(101), Some(ScsiStatus::TaskAborted));
    assert_eq!(status(102), Some(ScsiStatus::Good));
    assert_eq!(d.in_flight(), 0);
    let r = cmd(&mut d, N1, &[0; 6], None);
    assert_eq!(sense_of(&r), (6, 0x2A, 0x05));
    // The control mode page says so: TAS is set.
    assert_eq!(mode_sense6_control(&mut d, N2)[4 + 5] & 0x40, 0x40);
}

#[test]
fn lun_reset_aborts_other_sessions_tasks() {
    let (mut d, _) = device(true);
    write_tagged(&mut d, N2, 200, 9);
    write_tagged(&mut d, N2, 201, 9);
    d.lun_reset(0, N1);
    let out = collect(&mut d);
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|r| r.status == ScsiStatus::TaskAborted));
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn each_path_reports_its_own_port_and_the_one_group() {
    let (mut d, _) = device(true);
    d.set_ports(vec![2, 1]);
    d.nexus_added(
        7,
        ItNexus::new("iqn.2024-01.test:host1", [0x40, 0, 0, 0, 0, 1], 2),
    );
    let r = cmd(&mut d, 7, &[0x12, 1, 0x83, 0, 255, 0], None);
    let v = data(&r).to_vec();
    let rel = v.windows(4).position(|w| w == [0x51, 0x94, 0, 4]).unwrap();
    assert_eq!(&v[rel + 4..rel + 8], &[0, 0, 0, 2]);
    assert_eq!(&v[rel + 8..rel + 16], &[0x51, 0x95, 0, 4, 0, 0, 0, 1]);
    let r = cmd(&mut d, N1, &[0x12, 1, 0x83, 0, 255, 0], None);
    let v1 = data(&r).to_vec();
    assert_eq!(&v1[rel + 4..rel + 8], &[0, 0, 0, 1]);
    assert_eq!(&v1[4..16], &v[4..16], "the same logical unit designator");
    let std = data(&cmd(&mut d, N1, &[0x12, 0, 0, 0, 96, 0], None)).to_vec();
    assert_eq!(std[5] & 0x30, 0x10);
    // REPORT TARGET PORT GROUPS: one group, active/optimized, both ports.
    let r = cmd(
        &mut d,
        N2,
        &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        None,
    );
    assert_eq!(
        data(&r),
        &[0, 0, 0, 16, 0x80, 0x01, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]
    );
    let r = cmd(
        &mut d,
        N2,
        &[0xA3, 0x4A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        None,
    );
    assert_eq!(sense_of(&r), (5, 0x24, 0));
    // REGISTER AND MOVE to the session on port 2.
    assert_eq!(prout(&mut d, N1, 6, 0, 0, 0x11), ScsiStatus::Good);
    assert_eq!(prout(&mut d, N1, 1, 3, 0x11, 0), ScsiStatus::Good);
    let dest = ItNexus::new("iqn.2024-01.test:host1", [0x40, 0, 0, 0, 0, 1], 2);
    let tid = pr::transport_id(&dest);
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&0x11u64.to_be_bytes());
    p[8..16].copy_from_slice(&0x77u64.to_be_bytes());
    p[18..20].copy_from_slice(&2u16.to_be_bytes());
    p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend(tid);
    let len = p.len() as u8;
    let r = cmd(&mut d, N1, &[0x5F, 7, 3, 0, 0, 0, 0, 0, len, 0], Some(p));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(
        cmd(&mut d, 7, &rw10(0x28, 0, 1), None).status,
        ScsiStatus::Good
    );
    assert_eq!(
        cmd(&mut d, N1, &rw10(0x28, 0, 1), None).status,
        ScsiStatus::ReservationConflict
    );
}

#[test]
fn aptpl_state_is_written_and_read_back() {
    let dir = std::env::temp_dir().join(format!("iscsi-tgt-pr-test-{}", std::process::id()));
    let file = dir.join("pr").join("lun0.json");
    let _ = std::fs::remove_dir_all(&dir);
    let ident = LunIdentity {
        pr_file: Some(file.clone()),
        ..identity()
    };
    let (m, _) = MockBdev::new(BS, BLOCKS, true);
    let mut d = Device::new();
    d.add_lun(0, Box::new(m), ident.clone()).unwrap();
    d.nexus_added(N1, it(N1));
    let mut p = vec![0u8; 24];
    p[8..16].copy_from_slice(&0x99u64.to_be_bytes());
    p[20] = 0x01;
    assert_eq!(
        cmd(&mut d, N1, &[0x5F, 6, 0, 0, 0, 0, 0, 0, 24, 0], Some(p)).status,
        ScsiStatus::Good
    );
    assert_eq!(prout(&mut d, N1, 1, 1, 0x99, 0), ScsiStatus::Good);
    assert!(file.exists());
    // A new device (a restart) finds the registration and the reservation.
    let (m, _) = MockBdev::new(BS, BLOCKS, true);
    let mut d2 = Device::new();
    d2.add_lun(0, Box::new(m), ident.clone()).unwrap();
    d2.nexus_added(N2, it(N2));
    assert_eq!(
        cmd(&mut d2, N2, &rw10(0x2A, 0, 1), Some(vec![0; 512])).status,
        ScsiStatus::ReservationConflict
    );
    let caps = data(&cmd(&mut d2, N2, &[0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0], None)).to_vec();
    assert_eq!(caps[3] & 0x01, 0x01, "PTPL_A");
    d2.nexus_added(N1, it(N1));
    assert_eq!(
        cmd(&mut d2, N1, &rw10(0x2A, 0, 1), Some(vec![0; 512])).status,
        ScsiStatus::Good
    );
    // Unregistering the last key removes the file.
    assert_eq!(prout(&mut d2, N1, 0, 0, 0x99, 0), ScsiStatus::Good);
    assert!(!file.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
