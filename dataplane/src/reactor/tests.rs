//! Reactors over real loopback sockets, driven by a minimal in-test initiator.

use super::*;
use crate::tgt::config;
use std::io::{Read, Write};

/// A minimal initiator: login, READ(10)/WRITE(10) with immediate data, TEST UNIT READY.
struct Client {
    s: std::net::TcpStream,
    itt: u32,
    cmdsn: u32,
}

fn pdu(op: u8, flags: u8, data: &[u8], fill: impl FnOnce(&mut [u8; 48])) -> Vec<u8> {
    let mut h = [0u8; 48];
    h[0] = op;
    h[1] = flags;
    let len = (data.len() as u32).to_be_bytes();
    h[5..8].copy_from_slice(&len[1..]);
    fill(&mut h);
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

impl Client {
    fn login(addr: SocketAddr, target: &str, isid_low: u8) -> Client {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            s,
            itt: 1,
            cmdsn: 1,
        };
        let keys = format!(
            "InitiatorName=iqn.2026-11.test:i{isid_low}\0TargetName={target}\0\
             MaxRecvDataSegmentLength=65536\0ImmediateData=Yes\0"
        );
        let p = pdu(0x43, 0x87, keys.as_bytes(), |h| {
            h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, isid_low]);
            h[24..28].copy_from_slice(&1u32.to_be_bytes());
        });
        c.s.write_all(&p).unwrap();
        let (hdr, _) = c.recv();
        assert_eq!(hdr[0], 0x23, "login response");
        assert_eq!((hdr[36], hdr[37]), (0, 0), "login status");
        c
    }

    fn recv(&mut self) -> ([u8; 48], Vec<u8>) {
        let mut hdr = [0u8; 48];
        self.s.read_exact(&mut hdr).unwrap();
        let len = u32::from_be_bytes([0, hdr[5], hdr[6], hdr[7]]) as usize;
        let mut data = vec![0u8; len.div_ceil(4) * 4];
        self.s.read_exact(&mut data).unwrap();
        data.truncate(len);
        (hdr, data)
    }

    fn command(&mut self, cdb: &[u8], read_len: u32, write: &[u8]) -> (u8, Vec<u8>) {
        let itt = self.itt;
        self.itt += 1;
        let cmdsn = self.cmdsn;
        self.cmdsn += 1;
        let flags = 0x80
            | 1
            | if read_len > 0 { 0x40 } else { 0 }
            | if write.is_empty() { 0 } else { 0x20 };
        let edtl = read_len.max(write.len() as u32);
        let p = pdu(0x01, flags, write, |h| {
            h[16..20].copy_from_slice(&itt.to_be_bytes());
            h[20..24].copy_from_slice(&edtl.to_be_bytes());
            h[24..28].copy_from_slice(&cmdsn.to_be_bytes());
            h[32..32 + cdb.len()].copy_from_slice(cdb);
        });
        self.s.write_all(&p).unwrap();
        let mut data = Vec::new();
        loop {
            let (hdr, d) = self.recv();
            match hdr[0] & 0x3f {
                0x25 => {
                    data.extend_from_slice(&d);
                    if hdr[1] & 0x01 != 0 {
                        return (hdr[3], data);
                    }
                }
                0x21 => return (hdr[3], data),
                0x20 => continue, // a keepalive ping: ignore
                op => panic!("unexpected opcode {op:#x}"),
            }
        }
    }

    fn write10(&mut self, lba: u32, data: &[u8]) -> u8 {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&((data.len() / 512) as u16).to_be_bytes());
        self.command(&cdb, 0, data).0
    }

    fn read10(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let (status, data) = self.command(&cdb, u32::from(blocks) * 512, &[]);
        assert_eq!(status, 0);
        data
    }
}

fn two_targets(cpumask: &str, park_ms: u32) -> Config {
    let instance = instance();
    config::parse(
        &format!(
            r#"
[global]
cpumask = "{cpumask}"
idle_park_ms = {park_ms}
instance = "{instance}"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:0"]
[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]
[[bdev]]
name = "A"
type = "malloc"
size = "4MiB"
[[bdev]]
name = "B"
type = "malloc"
size = "4MiB"
[[target]]
name = "iqn.2026-11.test:a"
luns = [ {{ lun = 0, bdev = "A" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
[[target]]
name = "iqn.2026-11.test:b"
luns = [ {{ lun = 0, bdev = "B" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
        ),
        "test.toml",
    )
    .unwrap()
}

/// A control-segment instance name no other test uses.
fn instance() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "unit-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn stop_flag() -> &'static AtomicBool {
    Box::leak(Box::new(AtomicBool::new(false)))
}

fn cpus_available() -> usize {
    allowed_cpus().len()
}

#[test]
fn serves_login_and_io_over_real_sockets_and_stops_on_request() {
    let stop = stop_flag();
    let mut cfg = config::default_config(Some("127.0.0.1:0"));
    cfg.bdevs[0].kind = crate::tgt::BdevKind::Malloc { size: 4 << 20 };
    cfg.global.cpumask = 1 << allowed_cpus()[0];
    cfg.global.instance = instance();
    let dp = Dataplane::start(cfg, stop).unwrap();
    let addr = dp.local_addrs()[0];
    // The login byte by byte: the framing must cope with any split.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let keys = "InitiatorName=iqn.2026-11.test:i\0TargetName=iqn.2026-11.io.iscsi-tgt:default\0";
    let p = pdu(0x43, 0x87, keys.as_bytes(), |h| {
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 9]);
    });
    for b in &p {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    let mut hdr = [0u8; 48];
    s.read_exact(&mut hdr).unwrap();
    assert_eq!(hdr[0], 0x23, "login response");
    assert_eq!((hdr[36], hdr[37]), (0, 0), "success");
    assert_ne!(u16::from_be_bytes([hdr[14], hdr[15]]), 0, "TSIH assigned");
    let mut c = Client::login(addr, "iqn.2026-11.io.iscsi-tgt:default", 1);
    assert_eq!(c.write10(8, &[0x5a; 1024]), 0);
    assert_eq!(c.read10(8, 2), vec![0x5a; 1024]);
    stop.store(true, Ordering::Relaxed);
    dp.join().unwrap();
    // The dataplane closed the sessions on its way out.
    let mut rest = Vec::new();
    assert!(s.read_to_end(&mut rest).is_ok());
}

#[test]
fn two_reactors_serve_devices_homed_on_either() {
    if cpus_available() < 2 {
        eprintln!("skipped: fewer than 2 CPUs available");
        return;
    }
    let cpus = allowed_cpus();
    let mask = (1u64 << cpus[0]) | (1u64 << cpus[1]);
    let stop = stop_flag();
    let dp = Dataplane::start(two_targets(&format!("{mask:#x}"), 0), stop).unwrap();
    let addr = dp.local_addrs()[0];
    // Several connections to both targets: placement spreads them over both reactors, and
    // each target's device lives on one of them, so commands cross reactors both ways.
    let mut clients: Vec<(Client, u8)> = (0..6u8)
        .map(|i| {
            let t = if i % 2 == 0 { "a" } else { "b" };
            (
                Client::login(addr, &format!("iqn.2026-11.test:{t}"), 10 + i),
                i,
            )
        })
        .collect();
    for round in 0..20u32 {
        for (c, i) in clients.iter_mut() {
            let lba = u32::from(*i) * 64 + round % 32;
            let fill = (*i).wrapping_mul(31).wrapping_add(round as u8);
            assert_eq!(c.write10(lba, &vec![fill; 512]), 0);
            assert_eq!(c.read10(lba, 1), vec![fill; 512]);
        }
    }
    let loads: Vec<usize> = dp
        .shared
        .mailboxes
        .iter()
        .map(|m| m.load.load(Ordering::Relaxed))
        .collect();
    assert!(
        loads.iter().all(|&l| l > 0),
        "both reactors own connections: {loads:?}"
    );
    stop.store(true, Ordering::Relaxed);
    dp.join().unwrap();
}

#[test]
fn idle_connections_are_parked_and_woken_without_losing_io() {
    let cpus = allowed_cpus();
    let mask = cpus.iter().take(2).fold(0u64, |m, c| m | 1 << c);
    let stop = stop_flag();
    let dp = Dataplane::start(two_targets(&format!("{mask:#x}"), 50), stop).unwrap();
    let addr = dp.local_addrs()[0];
    let mut a = Client::login(addr, "iqn.2026-11.test:a", 1);
    let mut b = Client::login(addr, "iqn.2026-11.test:b", 2);
    for round in 0..5u8 {
        assert_eq!(a.write10(u32::from(round), &vec![round; 512]), 0);
        assert_eq!(b.write10(u32::from(round), &vec![!round; 512]), 0);
        // Idle well past idle_park_ms: both go to the parking lot.
        std::thread::sleep(Duration::from_millis(400));
        let (parked, _) = dp.park_stats();
        assert!(parked >= 2 * (u64::from(round) + 1), "parked {parked}");
        // Speaking again wakes them onto a reactor; the data is all there.
        assert_eq!(a.read10(u32::from(round), 1), vec![round; 512]);
        assert_eq!(b.read10(u32::from(round), 1), vec![!round; 512]);
    }
    let (parked, woken) = dp.park_stats();
    assert!(
        woken >= 10 && parked >= 10,
        "parked {parked}, woken {woken}"
    );
    for round in 0..5u8 {
        assert_eq!(a.read10(u32::from(round), 1), vec![round; 512]);
    }
    stop.store(true, Ordering::Relaxed);
    dp.join().unwrap();
}

#[test]
fn cpumask_is_checked() {
    assert!(matches!(cpus_of_mask(0), Err(StartError::Cpu(_))));
    let first = allowed_cpus()[0];
    assert_eq!(cpus_of_mask(1 << first).unwrap(), vec![first]);
    if let Some(missing) = (0..64).find(|c| !allowed_cpus().contains(c)) {
        assert!(matches!(
            cpus_of_mask(1 << missing),
            Err(StartError::Cpu(_))
        ));
    }
}
