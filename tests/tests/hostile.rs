//! Hostile clients on raw sockets while fio verifies a good session: garbage headers,
//! absurd lengths, unknown opcodes, login stages out of order, PDUs cut short, logins never
//! finished, a flood of idle connections, and more connections from one address than
//! allowed. fio finishes with zero errors, the target stays up, and each bad connection
//! gets the answer RFC 7143 names or is closed.

use e2e::raw::RawSession;
use e2e::{artifacts_dir, fio_bin, parse_fio_terse, run_with_timeout, Target, DEFAULT_IQN};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn config() -> String {
    format!(
        r#"
[global]
login_timeout = 3
pdu_timeout = 1
max_connections_per_address = 150

[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

[[bdev]]
name = "M0"
type = "malloc"
size = "128MiB"

[[target]]
name = "{DEFAULT_IQN}"
luns = [ {{ lun = 0, bdev = "M0" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    )
}

/// Reads until the target closes the connection (EOF or reset), within `limit`; returns
/// what it sent before, and how long closing took.
fn until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (got, start.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    panic!("not closed within {limit:?}; got {} bytes", got.len());
}

fn login_pdu(csg: u8, nsg: u8, transit: bool, text: &str) -> Vec<u8> {
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x43;
    pdu[1] = if transit { 0x80 } else { 0 } | (csg << 2) | nsg;
    pdu[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x80, 0, 0xba, 0xd0, 0, 1]);
    pdu[16..20].copy_from_slice(&1u32.to_be_bytes());
    pdu[24..28].copy_from_slice(&1u32.to_be_bytes());
    pdu.extend_from_slice(text.as_bytes());
    pdu.resize(48 + text.len().div_ceil(4) * 4, 0);
    pdu
}

#[test]
fn hostile_clients_do_not_disturb_a_good_session() {
    let mut t = Target::start_with_config("hostile", &config(), DEFAULT_IQN, 0);
    let portal = t.portal();
    let dir = artifacts_dir().join(format!("hostile-{}", t.port()));
    fs::create_dir_all(&dir).unwrap();
    let terse = dir.join("fio.terse");
    let mut fio = Command::new(fio_bin());
    fio.current_dir(&dir)
        .arg("--name=good")
        .arg("--ioengine=libiscsi")
        .arg(format!("--filename={}", t.fio_filename()))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--rate_iops=4000",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--output={}", terse.display()));
    let fio = std::thread::spawn(move || run_with_timeout(&mut fio, Duration::from_secs(120)));
    std::thread::sleep(Duration::from_millis(500));
    let connect = || {
        let s = TcpStream::connect(&portal).expect("connect");
        s.set_nodelay(true).unwrap();
        s
    };

    // A flood of idle connections (never a byte): each dropped at the login timeout.
    let flood: Vec<TcpStream> = (0..100).map(|_| connect()).collect();

    // Garbage instead of a login: closed (an invalid opcode before login).
    let mut s = connect();
    s.write_all(&[0xa5u8; 48]).unwrap();
    until_closed(&mut s, Duration::from_secs(5));

    // An absurd data segment length: closed without reading 16 MiB.
    let mut s = connect();
    let mut pdu = login_pdu(1, 3, true, "");
    pdu[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    s.write_all(&pdu[..48]).unwrap();
    until_closed(&mut s, Duration::from_secs(5));

    // Login stages out of order (CSG 3, full feature, is not a login stage): login status
    // 0x0200, then closed.
    let mut s = connect();
    let text = format!("InitiatorName=iqn.2026-11.io.e2e:bad\0TargetName={DEFAULT_IQN}\0");
    s.write_all(&login_pdu(3, 3, true, &text)).unwrap();
    let (got, _) = until_closed(&mut s, Duration::from_secs(5));
    assert!(got.len() >= 48, "a login response");
    assert_eq!(
        (got[0] & 0x3f, got[36], got[37]),
        (0x23, 2, 0),
        "{:?}",
        &got[..48]
    );

    // Half a header, then silence: closed at the PDU timeout (1 s), not before.
    let mut s = connect();
    s.write_all(&login_pdu(1, 3, true, &text)[..20]).unwrap();
    let (_, took) = until_closed(&mut s, Duration::from_secs(6));
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");

    // In full feature phase: an unknown opcode gets a Reject, and the session goes on.
    let mut r = RawSession::login(&portal, "iqn.2026-11.io.e2e:ffp", DEFAULT_IQN);
    let mut p = [0u8; 48];
    p[0] = 0x1c; // not an initiator opcode
    p[1] = 0x80;
    p[16..20].copy_from_slice(&77u32.to_be_bytes());
    r.send_raw(&p);
    let rej = r.recv().expect("a Reject");
    assert_eq!(
        (rej.opcode(), rej.bhs[2]),
        (0x3f, 0x05),
        "Command not supported"
    );
    assert_eq!(r.tur(0).unwrap().status, 0, "the session goes on");

    // The idle flood is gone after the login timeout.
    for mut f in flood {
        until_closed(&mut f, Duration::from_secs(6));
    }

    let out = fio.join().unwrap();
    let text = fs::read_to_string(&terse).unwrap_or_default();
    assert!(out.success(), "{out}\n{text}");
    let jobs = parse_fio_terse(&text).unwrap();
    assert_eq!(
        (jobs[0].error, jobs[0].read_kib),
        (0, 64 * 1024),
        "{jobs:?}"
    );

    // More connections from one address than allowed: the extra one is closed at once.
    drop(r);
    std::thread::sleep(Duration::from_millis(300));
    let held: Vec<TcpStream> = (0..150).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = connect();
    let (_, took) = until_closed(&mut extra, Duration::from_secs(1));
    assert!(took < Duration::from_secs(1));
    drop(held);

    t.assert_running();
    let log = t.log_contents();
    assert!(log.contains("login not finished in time"), "{log}");
    assert!(log.contains("stopped in the middle of a PDU"), "{log}");
    assert!(log.contains("refused a connection from 127.0.0.1"), "{log}");
}

/// Write buffers a connection may hold are capped: past the cap, a write gets TASK SET
/// FULL at once (no R2T, no buffer), and the session goes on.
#[test]
fn a_write_past_the_buffer_budget_gets_task_set_full() {
    let toml = config().replace(
        "max_connections_per_address = 150",
        "max_connections_per_address = 150\nmax_connection_buffer_mib = 1",
    );
    let mut t = Target::start_with_config("hostile-budget", &toml, DEFAULT_IQN, 0);
    let mut r = RawSession::login(&t.portal(), "iqn.2026-11.io.e2e:budget", DEFAULT_IQN);
    // 2 MiB: more than the 1 MiB budget.
    let w = r.write10_no_data(0, 0, 4096).unwrap();
    assert_eq!(w.status, 0x28, "TASK SET FULL: {w:?}");
    assert_eq!(r.tur(0).unwrap().status, 0);
    t.assert_running();
}
