//! The reactor: one thread that owns listeners, connections and targets and drives them to
//! completion. It polls while there is work (commands in a device, bytes left unread) and
//! sleeps in epoll when everything is idle, so an idle target burns no CPU.
//!
//! One reactor today; per-core reactors with connection placement arrive with the per-core
//! issue, each owning its connections exactly like this one.

use crate::iscsi::conn::{CloseReason, Connection, Keepalive};
use crate::net::tcp;
use crate::scsi::ScsiResponse;
use crate::tgt::live::Targets;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bytes read from one connection before the reactor turns to others (fairness).
const READ_BUDGET: usize = 4 * 1024 * 1024;
/// Most iovecs handed to one writev.
const MAX_IOV: usize = 64;
/// How often keepalive timers are checked.
const TICK: Duration = Duration::from_millis(500);
/// Longest sleep in epoll when idle (also bounds how late a shutdown request is seen).
const IDLE_WAIT: Duration = Duration::from_millis(100);

struct Portal {
    listener: TcpListener,
    pg_tag: u16,
    addr: SocketAddr,
}

struct Entry {
    stream: TcpStream,
    conn: Connection,
    /// More bytes may be waiting (the read budget ran out).
    read_pending: bool,
    writable_interest: bool,
}

/// A single-threaded event loop serving a set of targets.
pub struct Reactor {
    poll: Poll,
    portals: Vec<Portal>,
    conns: HashMap<Token, Entry>,
    uid_to_token: HashMap<u64, Token>,
    targets: Targets,
    next_token: usize,
    next_uid: u64,
    keepalive: Keepalive,
    responses: Vec<ScsiResponse>,
}

/// Listener tokens come first; connection tokens start here.
const FIRST_CONN_TOKEN: usize = 1 << 20;

impl Reactor {
    /// Binds every portal of the configuration.
    pub fn new(targets: Targets) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut portals = Vec::new();
        for pg in &targets.config().portal_groups {
            for addr in &pg.portals {
                let mut listener = tcp::listen(*addr).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
                let token = Token(portals.len());
                poll.registry()
                    .register(&mut listener, token, Interest::READABLE)?;
                let bound = listener.local_addr()?;
                log::info!("listening on {} (portal group {})", bound, pg.tag);
                portals.push(Portal {
                    listener,
                    pg_tag: pg.tag,
                    addr: bound,
                });
            }
        }
        let g = &targets.config().global;
        let keepalive = Keepalive {
            interval: (g.nop_in_interval_s > 0)
                .then(|| Duration::from_secs(u64::from(g.nop_in_interval_s))),
            timeout: Duration::from_secs(u64::from(g.nop_in_timeout_s.max(1))),
        };
        Ok(Reactor {
            poll,
            portals,
            conns: HashMap::new(),
            uid_to_token: HashMap::new(),
            targets,
            next_token: FIRST_CONN_TOKEN,
            next_uid: 1,
            keepalive,
            responses: Vec::new(),
        })
    }

    /// Addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.portals.iter().map(|p| p.addr).collect()
    }

    /// Runs until `stop` is set, then closes every session and flushes the devices.
    pub fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_tick = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let busy = self.targets.in_flight() > 0 || self.conns.values().any(|e| e.read_pending);
            let timeout = if busy { Duration::ZERO } else { IDLE_WAIT };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for ev in events.iter() {
                let token = ev.token();
                if token.0 < FIRST_CONN_TOKEN {
                    self.accept(token.0, now);
                } else {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.read_conn(token, now);
                    }
                    if let Some(e) = self.conns.get_mut(&token) {
                        if ev.is_writable() {
                            e.writable_interest = true;
                        }
                    }
                }
            }
            // Connections whose read budget ran out continue without a new event.
            let pending: Vec<Token> = self
                .conns
                .iter()
                .filter(|(_, e)| e.read_pending)
                .map(|(t, _)| *t)
                .collect();
            for t in pending {
                self.read_conn(t, now);
            }
            self.complete_scsi();
            if now.duration_since(last_tick) >= TICK {
                last_tick = now;
                for e in self.conns.values_mut() {
                    e.conn.on_tick(now);
                }
            }
            self.flush_and_reap();
        }
        self.shutdown();
        Ok(())
    }

    fn accept(&mut self, portal: usize, now: Instant) {
        loop {
            let (mut stream, peer) = match self.portals[portal].listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: keep serving the connections we have.
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            if let Err(e) = tcp::configure(&stream) {
                log::warn!("cannot configure connection from {peer}: {e}");
            }
            let local = stream.local_addr().unwrap_or(self.portals[portal].addr);
            let token = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
            {
                log::warn!("cannot register connection from {peer}: {e}");
                continue;
            }
            let uid = self.next_uid;
            self.next_uid += 1;
            let conn = Connection::new(
                uid,
                peer,
                local,
                self.portals[portal].pg_tag,
                self.keepalive,
                now,
            );
            log::debug!("conn {uid}: accepted from {peer} on {local}");
            self.uid_to_token.insert(uid, token);
            self.conns.insert(
                token,
                Entry {
                    stream,
                    conn,
                    read_pending: true,
                    writable_interest: false,
                },
            );
        }
    }

    fn read_conn(&mut self, token: Token, now: Instant) {
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        e.read_pending = false;
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                e.read_pending = true;
                break;
            }
            let buf = e.conn.rx_buf();
            if buf.is_empty() {
                break;
            }
            let want = buf.len().min(budget);
            match tcp::read_some(&mut e.stream, &mut buf[..want]) {
                Ok(Some(0)) => {
                    e.conn.force_close(CloseReason::PeerClosed);
                    break;
                }
                Ok(Some(n)) => {
                    budget -= n;
                    e.conn.rx_filled(n, &mut self.targets, now);
                }
                Ok(None) => break,
                Err(err) => {
                    log::debug!("conn {}: read error: {err}", e.conn.uid());
                    e.conn.force_close(CloseReason::PeerClosed);
                    break;
                }
            }
        }
    }

    fn complete_scsi(&mut self) {
        self.responses.clear();
        self.targets.poll_devices(&mut self.responses);
        for r in self.responses.drain(..) {
            let uid = r.tag >> 32;
            if let Some(token) = self.uid_to_token.get(&uid) {
                if let Some(e) = self.conns.get_mut(token) {
                    e.conn.scsi_done(r);
                }
            }
        }
    }

    fn flush_and_reap(&mut self) {
        for uid in std::mem::take(&mut self.targets.to_close) {
            if let Some(token) = self.uid_to_token.get(&uid) {
                if let Some(e) = self.conns.get_mut(token) {
                    log::info!("conn {uid}: session reinstated by a new login");
                    e.conn.force_close(CloseReason::Reinstated);
                }
            }
        }
        let mut dead = Vec::new();
        for (token, e) in self.conns.iter_mut() {
            if e.conn.has_tx() {
                if let Err(err) = flush(e) {
                    log::debug!("conn {}: write error: {err}", e.conn.uid());
                    e.conn.force_close(CloseReason::PeerClosed);
                }
                let want_writable = e.conn.has_tx();
                if want_writable != e.writable_interest {
                    let interest = if want_writable {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    let _ = self
                        .poll
                        .registry()
                        .reregister(&mut e.stream, *token, interest);
                    e.writable_interest = want_writable;
                }
            }
            if e.conn.wants_close().is_some() {
                dead.push(*token);
            }
        }
        for token in dead {
            if let Some(mut e) = self.conns.remove(&token) {
                log::info!(
                    "conn {}: closed ({:?})",
                    e.conn.uid(),
                    e.conn
                        .wants_close()
                        .cloned()
                        .unwrap_or(CloseReason::PeerClosed)
                );
                let _ = self.poll.registry().deregister(&mut e.stream);
                e.conn.teardown(&mut self.targets);
                self.uid_to_token.remove(&e.conn.uid());
            }
        }
    }

    fn shutdown(&mut self) {
        log::info!("shutting down: closing {} connections", self.conns.len());
        // Let commands already in the devices finish so acknowledged writes are durable.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.targets.in_flight() > 0 && Instant::now() < deadline {
            self.complete_scsi();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.complete_scsi();
        for (_, mut e) in self.conns.drain() {
            let _ = flush(&mut e);
            e.conn.teardown(&mut self.targets);
        }
        self.targets.flush_all();
    }
}

/// Writes as much of the connection's queue as the socket takes.
fn flush(e: &mut Entry) -> io::Result<()> {
    loop {
        let written = {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOV);
            e.conn.tx_iovecs(&mut iov, MAX_IOV);
            if iov.is_empty() {
                return Ok(());
            }
            tcp::write_some(&mut e.stream, &iov)?
        };
        match written {
            Some(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer gone")),
            Some(n) => e.conn.tx_consumed(n),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tgt::config;
    use std::io::{Read, Write};
    use std::sync::Arc;

    fn login_pdu(keys: &str) -> Vec<u8> {
        let mut h = [0u8; 48];
        h[0] = 0x43;
        h[1] = 0x87; // T, CSG=1, NSG=3
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 9]);
        let data = keys.replace(';', "\0");
        let len = (data.len() as u32).to_be_bytes();
        h[5..8].copy_from_slice(&len[1..]);
        let mut v = h.to_vec();
        v.extend_from_slice(data.as_bytes());
        v.resize(v.len().div_ceil(4) * 4, 0);
        v
    }

    #[test]
    fn serves_a_login_over_real_sockets_and_stops_on_request() {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let cfg = config::default_config(Some("127.0.0.1:0"));
            let targets = Targets::build(cfg).unwrap();
            let mut r = Reactor::new(targets).unwrap();
            tx.send(r.local_addrs()[0]).unwrap();
            r.run(&stop2).unwrap();
        });
        let addr = rx.recv().unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let pdu = login_pdu(
            "InitiatorName=iqn.2026-11.test:i;TargetName=iqn.2026-11.io.iscsi-tgt:default;",
        );
        // Byte by byte: the framing must cope with any split.
        for b in &pdu {
            s.write_all(std::slice::from_ref(b)).unwrap();
        }
        let mut hdr = [0u8; 48];
        s.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[0], 0x23, "login response");
        assert_eq!((hdr[36], hdr[37]), (0, 0), "success");
        assert_eq!(hdr[1], 0x87);
        assert_ne!(u16::from_be_bytes([hdr[14], hdr[15]]), 0, "TSIH assigned");
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        // The reactor closed the session on its way out.
        let mut rest = Vec::new();
        let n = s.read_to_end(&mut rest).unwrap_or(0);
        assert!(n < 1 << 20);
    }
}
