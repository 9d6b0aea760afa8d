//! SIGINT and SIGTERM stop the target promptly and cleanly (exit status 0,
//! "stopped" logged) while sessions are logged in: an idle one (a raw login
//! that sends nothing more) and a busy one (iscsi-perf reading).
//!
//! The processes are spawned here rather than through `e2e::Target` because
//! the tests need the pid to send SIGINT and to time the exit.

use e2e::{artifacts_dir, free_port, target_bin, wait_for_port, DEFAULT_IQN};
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const EXIT_LIMIT: Duration = Duration::from_secs(2);

struct Proc {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Proc {
    /// `iscsi-tgt` with its default config (1 GiB malloc LUN 0) on a free port.
    fn start(name: &str) -> Proc {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir = artifacts_dir().join(format!("{name}-{port}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("iscsi-tgt.log");
        let f = File::create(&log).unwrap();
        let child = Command::new(target_bin())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--instance")
            .arg(format!("e2e-{port}"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .process_group(0)
            .spawn()
            .expect("spawn iscsi-tgt");
        let mut p = Proc { child, addr, log };
        assert!(
            wait_for_port(addr, Duration::from_secs(10)),
            "iscsi-tgt does not listen on {addr}:\n{}",
            p.log_contents()
        );
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "{}",
            p.log_contents()
        );
        p
    }

    fn log_contents(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    /// Wait up to `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some((s, start.elapsed()));
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A normal session logged in with a raw socket, then left idle.
fn idle_session(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let text = format!(
        "InitiatorName=iqn.2026-11.io.e2e:idle\0SessionType=Normal\0TargetName={DEFAULT_IQN}\0\
         HeaderDigest=None\0DataDigest=None\0"
    );
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x43; // immediate | Login Request
    pdu[1] = 0x80 | (1 << 2) | 3; // T, CSG=1, NSG=3
    pdu[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x80, 0x00, 0x51, 0x6e, 0x00, 0x01]);
    pdu[16..20].copy_from_slice(&1u32.to_be_bytes());
    pdu[24..28].copy_from_slice(&1u32.to_be_bytes());
    pdu.extend_from_slice(text.as_bytes());
    pdu.resize(48 + ((text.len() + 3) & !3), 0);
    s.write_all(&pdu).unwrap();
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs).expect("login response");
    assert_eq!(bhs[0] & 0x3f, 0x23, "not a Login Response");
    assert_eq!((bhs[36], bhs[37]), (0, 0), "login status");
    assert_eq!(bhs[1] & 0x83, 0x83, "full feature phase");
    let dlen = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut data = vec![0u8; (dlen + 3) & !3];
    s.read_exact(&mut data).unwrap();
    s
}

/// After the target went away, the session's socket reaches EOF (or reset).
/// Reads until the target closes the session's socket; returns what came before.
fn assert_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    for _ in 0..1000 {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]), // e.g. an Async Message
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("session socket not closed: {e}"),
        }
    }
    panic!("session socket keeps receiving data");
}

fn stop_with_idle_session(sig: &str) {
    let mut p = Proc::start(&format!("signals-{}", sig.to_lowercase()));
    let mut s = idle_session(p.addr);
    // Let the session be really idle for a moment.
    thread::sleep(Duration::from_millis(300));
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "{}",
        p.log_contents()
    );

    p.signal(sig);
    let (status, took) = p.wait_exit(EXIT_LIMIT).unwrap_or_else(|| {
        panic!(
            "iscsi-tgt still running {EXIT_LIMIT:?} after SIG{sig}; log:\n{}",
            p.log_contents()
        )
    });
    let log = p.log_contents();
    assert_eq!(status.code(), Some(0), "SIG{sig}: {status}; log:\n{log}");
    eprintln!("SIG{sig}: exited after {took:?}");
    assert!(
        log.lines()
            .any(|l| l.ends_with("shutting down: closing 1 connections")),
        "log:\n{log}"
    );
    assert!(
        log.lines().last().is_some_and(|l| l.ends_with("] stopped")),
        "last log line is not 'stopped':\n{log}"
    );
    // The session heard why: Async Message, event 3 (the target drops the session),
    // Parameter2 DefaultTime2Wait 2, before the close.
    let got = assert_closed(&mut s);
    assert!(got.len() >= 48, "{got:?}");
    assert_eq!(
        (got[0] & 0x3f, got[36], got[41]),
        (0x32, 3, 2),
        "{:?}",
        &got[..48]
    );
}

#[test]
fn sigterm_with_an_idle_session() {
    stop_with_idle_session("TERM");
}

#[test]
fn sigint_with_an_idle_session() {
    stop_with_idle_session("INT");
}

#[test]
fn sigterm_during_io() {
    let mut p = Proc::start("signals-busy");
    let url = format!("iscsi://{}/{DEFAULT_IQN}/0", p.addr);
    let mut perf = Command::new("iscsi-perf")
        .args(["-m", "64", "-b", "8", "-t", "30", "-r", "-x", "0"])
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn iscsi-perf");
    // Wait (bounded) until iscsi-perf has logged in.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.log_contents().contains(":iscsi-perf logged in") {
        assert!(Instant::now() < deadline, "no login:\n{}", p.log_contents());
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(500));

    p.signal("TERM");
    let res = p.wait_exit(EXIT_LIMIT);
    let _ = perf.kill();
    let _ = perf.wait();
    let (status, _) = res.unwrap_or_else(|| {
        panic!(
            "iscsi-tgt still running {EXIT_LIMIT:?} after SIGTERM during I/O; log:\n{}",
            p.log_contents()
        )
    });
    let log = p.log_contents();
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.ends_with("shutting down: closing 1 connections")),
        "log:\n{log}"
    );
    assert!(
        log.lines().last().is_some_and(|l| l.ends_with("] stopped")),
        "log:\n{log}"
    );
}
