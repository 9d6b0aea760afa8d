//! Reactors: one pinned thread per CPU of the core mask, each driving to completion the
//! connections it owns and the SCSI devices homed on it.
//!
//! - Placement: reactor 0 accepts on every portal and gives each new connection to the
//!   least-loaded reactor (connections owned plus commands in flight).
//! - Devices: each target's device lives on one reactor (its home); a command from a
//!   connection on another reactor travels there and back over bounded crossbeam channels.
//!   No lock is taken on the I/O path.
//! - Sleep: a reactor polls while it has work (commands in a device, unread bytes, queued
//!   messages) and otherwise sleeps in epoll, so an idle target burns no CPU.
//! - Parking: a connection idle for `idle_park_ms` leaves its reactor for the parking lot
//!   ([`park`]) and comes back, when it speaks again, to whichever reactor is least loaded.
//!
//! - Userspace TCP: portal groups with `transport = "tap"` (or `"dpdk"`) are served by a
//!   smoltcp stack ([`crate::net::stack`]) that reactor 0 owns with its packet device; their
//!   connections stay on reactor 0 (a socket lives in its stack) and are never parked, while
//!   their commands still reach devices homed elsewhere by message.
//!
//! - Sessions: all connections of a session live on the reactor of its first one (a
//!   connection joining by TSIH moves there after its login; MC/S and ERL 2 sessions are
//!   never parked), so CmdSN ordering never spans reactors. The reactor keeps the command
//!   window of sessions with several connections (`env.windows`) and, when one connection
//!   moves it, lets the others deliver what they held; it keeps the tasks of connections
//!   that failed at ERL 2 until they are reassigned or their time runs out.

mod commands;
mod env;
pub mod park;
pub mod shared;

use crate::iscsi::conn::{sn_lt, CloseReason, Connection, CountCommand, Keepalive, SiblingTmf};
use crate::iscsi::TargetId;
use crate::mem::pool::{set_thread_pool, BufferPool};
use crate::mem::region::HugePages;
use crate::net::stack::{self, Stack, UserStack};
use crate::net::tcp;
use crate::scsi::Device;
use crate::tgt::live::{build_devices, BuildError, Model};
use crate::tgt::{Config, Transport};
use control::ObjectKind;
use env::ReactorEnv;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use shared::{Mailbox, Moving, Msg, ParkMsg, Shared, INBOX_CAPACITY};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes read from one connection before the reactor turns to others (fairness).
const READ_BUDGET: usize = 4 * 1024 * 1024;
/// Most iovecs handed to one writev.
const MAX_IOV: usize = 64;
/// How often keepalive timers and parking are checked.
const TICK: Duration = Duration::from_millis(100);
/// Longest sleep in epoll when idle (also bounds how late a shutdown request is seen).
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Listener tokens are below this; the waker has its own; connections start above.
const WAKER_TOKEN: Token = Token(1 << 20);
/// Block devices' completion fds (io_uring eventfds) share one token.
const COMPLETION_TOKEN: Token = Token((1 << 20) + 1);
/// The userspace stack's packet device (TAP fd).
const USER_TOKEN: Token = Token((1 << 20) + 2);
const FIRST_CONN_TOKEN: usize = (1 << 20) + 3;
/// Longest sleep of a reactor whose userspace stack has no fd to wake it (DPDK).
const POLLED_DEVICE_WAIT: Duration = Duration::from_millis(1);
/// How long such a reactor keeps polling without sleeping after its last packet: a DPDK
/// queue cannot wake a sleeping reactor, so under traffic it is polled continuously (one
/// core, like any DPDK poll-mode application) and only an idle port drops to one look per
/// millisecond.
const POLLED_DEVICE_SPIN: Duration = Duration::from_millis(200);

/// Errors starting the dataplane.
#[derive(Debug)]
pub enum StartError {
    Build(BuildError),
    Io(String),
    Cpu(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Build(e) => write!(f, "{e}"),
            StartError::Io(e) => write!(f, "{e}"),
            StartError::Cpu(e) => write!(f, "cpumask: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The CPUs a mask names, checked against the CPUs this process may run on.
pub fn cpus_of_mask(mask: u64) -> Result<Vec<usize>, StartError> {
    let allowed = allowed_cpus();
    let mut cpus = Vec::new();
    for cpu in 0..64 {
        if mask & (1u64 << cpu) != 0 {
            if !allowed.contains(&cpu) {
                return Err(StartError::Cpu(format!(
                    "CPU {cpu} is not available (this process may use CPUs {allowed:?})"
                )));
            }
            cpus.push(cpu);
        }
    }
    if cpus.is_empty() {
        return Err(StartError::Cpu("the mask selects no CPU".into()));
    }
    Ok(cpus)
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..64).collect();
        }
        (0..64).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: as above; sched_setaffinity(0, ..) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::warn!(
                "cannot pin reactor to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// The running dataplane: its reactor threads and the parking lot.
pub struct Dataplane {
    threads: Vec<JoinHandle<io::Result<()>>>,
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
}

impl Dataplane {
    /// Builds the devices, binds the portals and starts one reactor per CPU of the mask.
    pub fn start(config: Config, stop: &'static AtomicBool) -> Result<Dataplane, StartError> {
        check_config(&config)?;
        let cpus = cpus_of_mask(config.global.cpumask)?;
        crate::mem::region::allow_hugepages(config.global.hugepages);
        if let Some((total, free)) = crate::mem::region::hugepages_available() {
            log::info!("hugepages (2 MiB): {total} reserved, {free} free");
        }
        let (devices, spare) = build_devices(&config).map_err(StartError::Build)?;
        let mut spare = Some(spare);
        let n = cpus.len();

        let mut polls = Vec::new();
        let mut mailboxes = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..n {
            let poll = Poll::new().map_err(|e| StartError::Io(e.to_string()))?;
            let waker = Arc::new(
                Waker::new(poll.registry(), WAKER_TOKEN)
                    .map_err(|e| StartError::Io(e.to_string()))?,
            );
            let (tx, rx) = crossbeam_channel::bounded(INBOX_CAPACITY);
            mailboxes.push(Mailbox {
                tx,
                waker,
                load: AtomicUsize::new(0),
                sleeping: AtomicBool::new(false),
            });
            inboxes.push(rx);
            polls.push(poll);
        }
        let park_poll = Poll::new().map_err(|e| StartError::Io(e.to_string()))?;
        let park_waker = Arc::new(
            Waker::new(park_poll.registry(), park::WAKER_TOKEN)
                .map_err(|e| StartError::Io(e.to_string()))?,
        );
        let (park_tx, park_rx) = crossbeam_channel::bounded(INBOX_CAPACITY);

        // Kernel listeners belong to reactor 0. A userspace portal group gets one stack per
        // queue of its device: one on reactor 0, or one per reactor on a multi-queue port.
        let mut portals = Vec::new();
        let mut user_addrs = Vec::new();
        let mut stacks: Vec<Vec<Box<dyn UserStack>>> = Vec::new();
        for pg in &config.portal_groups {
            if pg.transport != Transport::Kernel {
                let sts = build_stack(pg, &config, cpus.len())?;
                for st in &sts {
                    log::info!(
                        "portal group {}: userspace TCP on {}, listening on {}",
                        pg.tag,
                        st.describe(),
                        pg.portals
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                user_addrs.extend(pg.portals.iter().copied());
                stacks.push(sts);
                continue;
            }
            for addr in &pg.portals {
                let mut listener = tcp::listen(*addr)
                    .map_err(|e| StartError::Io(format!("cannot listen on {addr}: {e}")))?;
                let token = Token(portals.len());
                polls[0]
                    .registry()
                    .register(&mut listener, token, Interest::READABLE)
                    .map_err(|e| StartError::Io(e.to_string()))?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| StartError::Io(e.to_string()))?;
                log::info!("listening on {} (portal group {})", bound, pg.tag);
                portals.push(Some(Portal {
                    listener,
                    pg_tag: pg.tag,
                    addr: bound,
                }));
            }
        }
        let addrs = portals
            .iter()
            .flatten()
            .map(|p| p.addr)
            .chain(user_addrs)
            .collect();
        if stacks.len() > 1 {
            return Err(StartError::Io(
                "one userspace portal group per dataplane for now".into(),
            ));
        }
        // Stack i goes to reactor i.
        let mut user: Vec<Option<Box<dyn UserStack>>> = (0..n).map(|_| None).collect();
        for (i, st) in stacks.pop().unwrap_or_default().into_iter().enumerate() {
            user[i % n] = Some(st);
        }

        let g = &config.global;
        let keepalive = Keepalive {
            interval: (g.nop_in_interval_s > 0)
                .then(|| Duration::from_secs(u64::from(g.nop_in_interval_s))),
            timeout: Duration::from_secs(u64::from(g.nop_in_timeout_s.max(1))),
            login: Duration::from_secs(u64::from(g.login_timeout_s.max(1))),
            pdu: Duration::from_secs(u64::from(g.pdu_timeout_s.max(1))),
            buffer_cap: g.max_connection_buffer_mib as usize * (1 << 20),
        };
        let park_after =
            (g.idle_park_ms > 0).then(|| Duration::from_millis(u64::from(g.idle_park_ms)));
        let pool_bytes = g.buffer_pool_mib as usize * (1 << 20);
        let spin = Duration::from_micros(u64::from(g.poll_spin_us));
        let seg_path = control::segment_path(&config.global.instance);
        let segment = match control::Segment::create(&seg_path, n) {
            Ok(s) => {
                log::info!("control segment {}", seg_path.display());
                Some(s)
            }
            Err(e @ control::AbiError::InUse { .. }) => {
                return Err(StartError::Io(format!(
                    "instance {:?}: {e}",
                    config.global.instance
                )))
            }
            Err(e) => {
                log::warn!("no control segment ({e}); iscsictl cannot reach this dataplane");
                None
            }
        };
        let shared = Arc::new(Shared::new(
            Model::new(config),
            mailboxes,
            park_tx,
            park_waker,
            stop,
            segment,
        ));

        // Hand each device to its home reactor.
        let mut homed: Vec<HashMap<usize, Device>> = (0..n).map(|_| HashMap::new()).collect();
        for (t, d) in devices.into_iter().enumerate() {
            homed[shared.home_of(t)].insert(t, d);
        }

        let mut threads = Vec::new();
        let lot = park::ParkingLot::new(park_poll, park_rx, shared.clone());
        threads.push(
            std::thread::Builder::new()
                .name("parking-lot".into())
                .spawn(move || lot.run())
                .map_err(|e| StartError::Io(e.to_string()))?,
        );
        let mut portals = Some(portals);
        for (i, ((poll, rx), devs)) in polls.into_iter().zip(inboxes).zip(homed).enumerate() {
            let cpu = cpus[i];
            let shared = shared.clone();
            let my_portals = if i == 0 {
                portals.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            let my_user = user[i].take();
            let my_spare = if i == 0 {
                spare.take().unwrap_or_default()
            } else {
                Default::default()
            };
            let handle = std::thread::Builder::new()
                .name(format!("reactor-{i}"))
                .spawn(move || {
                    pin_to(cpu);
                    log::info!("reactor {i} on CPU {cpu} with {} device(s)", devs.len());
                    if pool_bytes > 0 {
                        match BufferPool::new(pool_bytes, HugePages::Prefer) {
                            Ok(pool) => {
                                log::info!(
                                    "reactor {i}: {} MiB of I/O buffers in {}",
                                    pool.bytes() >> 20,
                                    if pool.is_huge() {
                                        "hugepages"
                                    } else {
                                        "4 KiB pages"
                                    }
                                );
                                set_thread_pool(Some(pool));
                            }
                            Err(e) => log::warn!(
                                "reactor {i}: no buffer pool ({e}); buffers come from the heap"
                            ),
                        }
                    }
                    let mut env = ReactorEnv::new(i, shared, devs);
                    env.pool = my_spare;
                    let mut r = Reactor {
                        poll,
                        rx,
                        portals: my_portals,
                        conns: HashMap::new(),
                        uid_to_token: HashMap::new(),
                        env,
                        next_token: FIRST_CONN_TOKEN,
                        keepalive,
                        park_after,
                        spin,
                        stats: control::ReactorStats::default(),
                        user: my_user,
                        cmd_next: 0,
                        gathering: HashMap::new(),
                        change: None,
                        lun_stats: HashMap::new(),
                        objects: ObjectSlots::new(),
                    };
                    r.run()
                })
                .map_err(|e| StartError::Io(e.to_string()))?;
            threads.push(handle);
        }
        Ok(Dataplane {
            threads,
            addrs,
            shared,
        })
    }

    /// Addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Connections parked so far, and woken from the parking lot so far.
    pub fn park_stats(&self) -> (u64, u64) {
        (
            self.shared.parked_total.load(Ordering::Relaxed),
            self.shared.woken_total.load(Ordering::Relaxed),
        )
    }

    /// Waits for every thread to finish (after the stop flag is set).
    pub fn join(self) -> io::Result<()> {
        let shared = self.shared.clone();
        let mut result = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("a reactor thread panicked")),
            }
        }
        log::info!(
            "idle connections: {} parked, {} woken",
            shared.parked_total.load(Ordering::Relaxed),
            shared.woken_total.load(Ordering::Relaxed)
        );
        result
    }
}

/// An object with a statistics block in the control segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ObjKey {
    Lun(TargetId, u64),
    Conn(u64),
}

/// This reactor's object statistics blocks: which object has which, and the commands it
/// had when last written.
struct ObjectSlots {
    slots: HashMap<ObjKey, (usize, u64)>,
    free: Vec<usize>,
    warned: bool,
}

impl ObjectSlots {
    fn new() -> Self {
        ObjectSlots {
            slots: HashMap::new(),
            free: (0..control::OBJECTS_PER_REACTOR).rev().collect(),
            warned: false,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        seg: &control::Segment,
        me: usize,
        key: ObjKey,
        kind: ObjectKind,
        id: u64,
        name: &str,
        s: &control::ReactorStats,
    ) -> bool {
        let (slot, last) = match self.slots.get(&key) {
            Some(&(slot, last)) => (slot, Some(last)),
            None => match self.free.pop() {
                Some(slot) => (slot, None),
                None => {
                    if !self.warned {
                        self.warned = true;
                        log::warn!(
                            "reactor {me}: more than {} LUNs and connections; the rest have \
                             no statistics block",
                            control::OBJECTS_PER_REACTOR
                        );
                    }
                    return false;
                }
            },
        };
        if last != Some(s.commands) {
            if let Some(w) = seg.object_writer(me, slot) {
                w.publish(kind, id, name, s);
            }
            self.slots.insert(key, (slot, s.commands));
        }
        true
    }

    /// Frees the blocks of objects not in `live`.
    fn retire(&mut self, seg: &control::Segment, me: usize, live: &[ObjKey]) {
        if self.slots.len() == live.len() {
            return;
        }
        let live: std::collections::HashSet<&ObjKey> = live.iter().collect();
        let gone: Vec<ObjKey> = self
            .slots
            .keys()
            .filter(|k| !live.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some((slot, _)) = self.slots.remove(&k) {
                if let Some(w) = seg.object_writer(me, slot) {
                    w.clear();
                }
                self.free.push(slot);
            }
        }
    }
}

struct Portal {
    listener: TcpListener,
    pg_tag: u16,
    addr: SocketAddr,
}

/// How a connection's bytes travel.
enum Link {
    Kernel(TcpStream),
    /// A socket of the reactor's userspace stack.
    User(smoltcp::iface::SocketHandle),
}

struct Entry {
    link: Link,
    conn: Connection,
    /// More bytes may be waiting (the read budget ran out).
    read_pending: bool,
    writable_interest: bool,
}

struct Reactor {
    poll: Poll,
    rx: crossbeam_channel::Receiver<Msg>,
    /// Kernel listeners (reactor 0); a portal's token is its index, a closed one leaves a
    /// hole that the next new portal fills.
    portals: Vec<Option<Portal>>,
    conns: HashMap<Token, Entry>,
    uid_to_token: HashMap<u64, Token>,
    env: ReactorEnv,
    next_token: usize,
    keepalive: Keepalive,
    park_after: Option<Duration>,
    /// How long to keep polling after the last work before sleeping in epoll.
    spin: Duration,
    /// This reactor's counters, published to the control segment every tick.
    stats: control::ReactorStats,
    /// The userspace TCP stack this reactor runs, if any.
    user: Option<Box<dyn UserStack>>,
    /// Control commands taken so far (reactor 0; the segment's own count is not trusted).
    cmd_next: u64,
    /// `connections` answers being gathered from the reactors: parts still due, rows.
    gathering: HashMap<u64, (usize, Vec<String>)>,
    /// Reactor 0: the configuration change waiting for its home reactors.
    change: Option<commands::PendingChange>,
    /// Commands this reactor's connections finished, per target and LUN.
    lun_stats: HashMap<(TargetId, u64), control::ReactorStats>,
    objects: ObjectSlots,
}

impl Reactor {
    fn mailbox(&self) -> &Mailbox {
        &self.env.shared.mailboxes[self.env.me]
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        // Devices that finish I/O in the kernel wake the reactor through their completion
        // fd, so it can sleep while their requests are in flight.
        self.env.registry = Some(self.poll.registry().try_clone()?);
        self.env.watch_completions();
        if let Some(fd) = self.user.as_ref().and_then(|u| u.fd()) {
            self.poll.registry().register(
                &mut mio::unix::SourceFd(&fd),
                USER_TOKEN,
                Interest::READABLE,
            )?;
        }
        let mut last_tick = Instant::now();
        let stop = self.env.shared.stop;
        let mut outbox_left = false;
        let mut last_work = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let busy = outbox_left
                || !self.env.devices_can_sleep()
                || !self.env.responses.is_empty()
                || self.conns.values().any(|e| e.read_pending);
            // Right after work, keep polling for a short while: at low queue depth the next
            // command arrives within microseconds, and catching it without a sleep and a
            // wakeup is most of the latency a target can save. Past the spin the reactor
            // sleeps, so an idle target costs nothing.
            let spin = if self.user.as_ref().is_some_and(|u| u.fd().is_none()) {
                self.spin.max(POLLED_DEVICE_SPIN)
            } else {
                self.spin
            };
            let spinning = !busy && last_work.elapsed() < spin;
            let mut timeout = if busy || spinning {
                Duration::ZERO
            } else {
                // Announce the sleep, then look at the inbox once more: a sender that saw
                // `sleeping` false has already queued its message where we now find it.
                self.mailbox().sleeping.store(true, Ordering::SeqCst);
                if self.rx.is_empty() {
                    IDLE_WAIT
                } else {
                    Duration::ZERO
                }
            };
            if let Some(u) = self.user.as_mut() {
                // TCP's timers (retransmission, delayed close), and a device without an fd
                // must be looked at regularly.
                if let Some(d) = u.poll_delay(Instant::now()) {
                    timeout = timeout.min(d);
                }
                if u.fd().is_none() {
                    timeout = timeout.min(POLLED_DEVICE_WAIT);
                }
            }
            let polled = self.poll.poll(&mut events, Some(timeout));
            self.mailbox().sleeping.store(false, Ordering::SeqCst);
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if !events.is_empty() || busy {
                last_work = now;
            }
            for ev in events.iter() {
                let token = ev.token();
                if token == WAKER_TOKEN {
                    continue;
                }
                if token == COMPLETION_TOKEN {
                    self.env.ack_completions();
                    continue;
                }
                if token == USER_TOKEN {
                    continue;
                }
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
            self.drain_inbox(now);
            if self.env.me == 0 {
                self.poll_commands();
            }
            if self.poll_user(now) {
                last_work = now;
            }
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
                self.park_idle(now);
                self.env.expire_orphans(now);
                self.publish_stats();
            }
            self.flush_and_reap();
            // Push out what the connections just queued. This also takes in packets that
            // arrived meanwhile and drains the device's fd, so their connections must be
            // marked now: no epoll edge will announce those bytes again.
            self.poll_user(Instant::now());
            outbox_left = self.env.flush_outbox();
            let load = self.conns.len() + self.env.local_in_flight();
            self.mailbox().load.store(load, Ordering::Relaxed);
        }
        self.shutdown();
        Ok(())
    }

    fn drain_inbox(&mut self, now: Instant) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Accepted {
                    stream,
                    peer,
                    local,
                    pg_tag,
                    ticket,
                } => {
                    let uid = self.env.shared.new_uid();
                    let mut conn = Connection::new(uid, peer, local, pg_tag, self.keepalive, now);
                    if let Some(t) = ticket {
                        conn.attach(Box::new(t));
                    }
                    self.adopt(stream, conn);
                }
                Msg::Adopt(m) => {
                    let m = *m;
                    let uid = m.conn.uid();
                    self.adopt(m.stream, m.conn);
                    // A connection that joined a session here: the bytes that followed its
                    // login.
                    if let Some(&token) = self.uid_to_token.get(&uid) {
                        self.arrive(token, now);
                    }
                }
                Msg::ControlDone { seq, answer } => {
                    if let Some(seg) = self.env.shared.segment.as_ref() {
                        seg.respond(seq, answer.as_bytes());
                    }
                }
                Msg::Model(m) => {
                    if self.env.adopt_model(m) {
                        self.end_unmapped_sessions();
                    }
                }
                Msg::ListConnections { seq } => {
                    let list = self.connection_list(now);
                    self.env.send(0, Msg::Connections { seq, list });
                }
                Msg::Connections { seq, list } => self.gathered(seq, list),
                Msg::Prepared { seq, errors } => self.prepared(seq, errors),
                other => self.env.device_msg(other),
            }
        }
    }

    fn adopt(&mut self, mut stream: TcpStream, mut conn: Connection) {
        let token = Token(self.next_token);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE)
        {
            log::warn!("conn {}: cannot register: {e}", conn.uid());
            conn.force_close(CloseReason::PeerClosed);
            conn.teardown(&mut self.env);
            return;
        }
        self.insert(Link::Kernel(stream), conn);
    }

    /// Polls the userspace stack and takes its new connections; marks the connections with
    /// bytes waiting. Returns whether anything happened.
    fn poll_user(&mut self, now: Instant) -> bool {
        let Some(u) = self.user.as_mut() else {
            return false;
        };
        let mut changed = u.poll(now);
        let mut accepted = Vec::new();
        while let Some(a) = u.accept() {
            accepted.push(a);
        }
        for a in accepted {
            changed = true;
            log::debug!("accepted {} on {} (userspace)", a.peer, a.local);
            let uid = self.env.shared.new_uid();
            let mut conn = Connection::new(uid, a.peer, a.local, a.pg_tag, self.keepalive, now);
            match self.take_places(a.peer, a.pg_tag) {
                Ok(t) => conn.attach(Box::new(t)),
                Err(why) => {
                    log::warn!("refused a connection from {}: {why}", a.peer);
                    conn.force_close(CloseReason::PeerClosed);
                }
            }
            self.insert(Link::User(a.handle), conn);
        }
        if let Some(u) = self.user.as_mut() {
            let mut scratch = [0u8; 512];
            for e in self.conns.values_mut() {
                let Link::User(h) = e.link else { continue };
                if !u.readable(h) {
                    continue;
                }
                if e.conn.closing() {
                    // It takes no more input while its last PDUs drain: discard what
                    // arrives (so the socket does not stay readable and spin the reactor),
                    // and let it go at once if the peer is gone.
                    loop {
                        match u.recv(h, &mut scratch) {
                            Ok(Some(0)) | Err(_) => {
                                e.conn.force_close(CloseReason::PeerClosed);
                                break;
                            }
                            Ok(Some(_)) => continue,
                            Ok(None) => break,
                        }
                    }
                    continue;
                }
                e.read_pending = true;
                changed = true;
            }
        }
        changed
    }

    /// A new connection's places in the per-address and per-portal-group counts, or why
    /// it is refused.
    fn take_places(&self, peer: SocketAddr, pg_tag: u16) -> Result<shared::AddressTicket, String> {
        use shared::CountKey;
        let g = self.env.model.global();
        let wanted = [
            (CountKey::Address(peer.ip()), g.max_connections_per_address),
            (
                CountKey::PortalGroup(pg_tag),
                g.max_connections_per_portal_group,
            ),
        ];
        self.env
            .shared
            .per_address
            .take(&wanted)
            .map_err(|full| match full {
                CountKey::Address(ip) => format!(
                    "{} connections from {ip} already",
                    g.max_connections_per_address
                ),
                CountKey::PortalGroup(t) => format!(
                    "{} connections through portal group {t} already",
                    g.max_connections_per_portal_group
                ),
            })
    }

    /// Ends the sessions the current model no longer carries: their target was removed,
    /// or their portal group, or the target is no longer exposed through it. Each gets an
    /// Async Message, then its connection closes.
    fn end_unmapped_sessions(&mut self) {
        for e in self.conns.values_mut() {
            if e.conn.closing() {
                continue;
            }
            if let Some(why) = unmapped(&self.env.model, &e.conn) {
                log::info!("conn {}: {}", e.conn.uid(), why.1);
                e.conn.end_session(why.0);
            }
        }
    }

    fn insert(&mut self, link: Link, mut conn: Connection) {
        // A connection woken from the parking lot may belong to a target removed meanwhile.
        if let Some((why, _)) = unmapped(&self.env.model, &conn) {
            conn.end_session(why);
        }
        let token = Token(self.next_token);
        self.next_token += 1;
        log::debug!(
            "conn {}: on reactor {} ({} connections)",
            conn.uid(),
            self.env.me,
            self.conns.len() + 1
        );
        self.uid_to_token.insert(conn.uid(), token);
        self.conns.insert(
            token,
            Entry {
                link,
                conn,
                read_pending: true,
                writable_interest: false,
            },
        );
    }

    fn accept(&mut self, portal: usize, now: Instant) {
        loop {
            let Some(p) = self.portals.get(portal).and_then(Option::as_ref) else {
                return;
            };
            let (stream, peer) = match p.listener.accept() {
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
            let local = stream.local_addr().unwrap_or(p.addr);
            let pg_tag = p.pg_tag;
            let ticket = match self.take_places(peer, pg_tag) {
                Ok(t) => t,
                Err(why) => {
                    log::warn!("refused a connection from {peer}: {why}");
                    drop(stream);
                    continue;
                }
            };
            let to = self.env.shared.least_loaded();
            // Count it now so a burst of accepts spreads over the reactors.
            self.env.shared.mailboxes[to]
                .load
                .fetch_add(1, Ordering::Relaxed);
            log::debug!("accepted {peer} on {local} for reactor {to}");
            if to == self.env.me {
                let uid = self.env.shared.new_uid();
                let mut conn = Connection::new(uid, peer, local, pg_tag, self.keepalive, now);
                conn.attach(Box::new(ticket));
                self.adopt(stream, conn);
            } else {
                self.env.send(
                    to,
                    Msg::Accepted {
                        stream,
                        peer,
                        local,
                        pg_tag,
                        ticket: Some(ticket),
                    },
                );
            }
        }
    }

    fn read_conn(&mut self, token: Token, now: Instant) {
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        e.read_pending = false;
        // MC/S: the command window is the session's, whichever connection moves it.
        if let Some(t) = e.conn.mcs_session() {
            if let Some(&(exp, max)) = self.env.windows.get(&t) {
                e.conn.set_window(exp, max);
            }
        }
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
            let got = match (&mut e.link, self.user.as_mut()) {
                (Link::Kernel(s), _) => tcp::read_some(s, &mut buf[..want]),
                (Link::User(h), Some(u)) => u.recv(*h, &mut buf[..want]),
                (Link::User(_), None) => Ok(Some(0)),
            };
            match got {
                Ok(Some(0)) => {
                    e.conn.force_close(CloseReason::PeerClosed);
                    break;
                }
                Ok(Some(n)) => {
                    budget -= n;
                    e.conn.rx_filled(n, &mut self.env, now);
                }
                Ok(None) => break,
                Err(err) => {
                    log::debug!("conn {}: read error: {err}", e.conn.uid());
                    e.conn.force_close(CloseReason::PeerClosed);
                    break;
                }
            }
        }
        // Sessions of one connection (the common case) need nothing more.
        if e.conn.needs_session_work() {
            self.after_read(token, now);
        }
    }

    /// After a connection took in bytes: a connection that joined a session on another
    /// reactor moves there; a connection of a session with several connections hands the
    /// session's window on, and the others deliver what was waiting for it.
    fn after_read(&mut self, token: Token, now: Instant) {
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        if let Some(home) = e.conn.take_home() {
            self.send_home(token, home, now);
            return;
        }
        self.remove_named_connection(token);
        self.sibling_tmfs(token);
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        let Some(tsih) = e.conn.mcs_session() else {
            return;
        };
        let (exp, max) = e.conn.window();
        let before = self.env.windows.get(&tsih).copied();
        let max = before.map_or(max, |(_, m)| if sn_lt(max, m) { m } else { max });
        self.env.windows.insert(tsih, (exp, max));
        if before.is_some_and(|(x, _)| x != exp) {
            self.resume_session(tsih, now);
        }
    }

    /// A Logout on `token` named another connection of its session (it lives here too):
    /// it closes (as failed when removed for recovery).
    fn remove_named_connection(&mut self, token: Token) {
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        let Some((cid, recovery)) = e.conn.take_remove_cid() else {
            return;
        };
        let tsih = e.conn.tsih();
        let why = if recovery {
            CloseReason::RemovedForRecovery
        } else {
            CloseReason::Logout
        };
        for (t, other) in self.conns.iter_mut() {
            if *t != token && other.conn.tsih() == tsih && other.conn.cid() == cid {
                other.conn.force_close(why.clone());
            }
        }
    }

    /// Task management `token` received for its whole session (MC/S): applied to the
    /// session's other connections (they live here too), and an ABORT TASK answered.
    fn sibling_tmfs(&mut self, token: Token) {
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        let requests = e.conn.take_sibling_tmf();
        if requests.is_empty() {
            return;
        }
        let tsih = e.conn.tsih();
        for r in requests {
            let mut found = false;
            for (t, other) in self.conns.iter_mut() {
                if *t != token && other.conn.tsih() == tsih {
                    found |= other.conn.abort_for_sibling(&r);
                }
            }
            if let SiblingTmf::AbortTask { tmf_itt, .. } = r {
                if let Some(e) = self.conns.get_mut(&token) {
                    e.conn.sibling_answered(tmf_itt, found);
                }
            }
        }
    }

    /// Lets every connection of session `tsih` deliver the commands it holds for CmdSNs
    /// that are now due, until none moves the window further.
    fn resume_session(&mut self, tsih: u16, now: Instant) {
        let members: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.mcs_session() == Some(tsih))
            .map(|(t, _)| *t)
            .collect();
        // Each round delivers at least one command or ends; bounded by what is held.
        for _ in 0..=members.len() * crate::iscsi::conn::MAX_HELD_PER_SESSION {
            let mut moved = false;
            for t in &members {
                let Some(e) = self.conns.get_mut(t) else {
                    continue;
                };
                let Some(&(exp, max)) = self.env.windows.get(&tsih) else {
                    return;
                };
                e.conn.set_window(exp, max);
                e.conn.resume(&mut self.env, now);
                let (exp2, max2) = e.conn.window();
                let max = if sn_lt(max, max2) { max2 } else { max };
                self.env.windows.insert(tsih, (exp2, max));
                moved |= exp2 != exp;
                self.remove_named_connection(*t);
                self.sibling_tmfs(*t);
            }
            if !moved {
                return;
            }
        }
    }

    /// A connection that joined a session is where its session lives: it takes the
    /// session's command window, then what it received after its login.
    fn arrive(&mut self, token: Token, now: Instant) {
        let Some(e) = self.conns.get_mut(&token) else {
            return;
        };
        if let Some(t) = e.conn.mcs_session() {
            if let Some(&(exp, max)) = self.env.windows.get(&t) {
                e.conn.set_window(exp, max);
            }
        }
        e.conn.replay_held(&mut self.env, now);
        self.after_read(token, now);
    }

    /// Moves a connection that joined a session to the session's reactor (kernel TCP), or
    /// carries on here when that is this reactor.
    fn send_home(&mut self, token: Token, home: usize, now: Instant) {
        if home == self.env.me {
            self.arrive(token, now);
            return;
        }
        let Some(mut e) = self.conns.remove(&token) else {
            return;
        };
        self.uid_to_token.remove(&e.conn.uid());
        match e.link {
            Link::Kernel(mut stream) => {
                let _ = self.poll.registry().deregister(&mut stream);
                log::info!("conn {}: joins its session on reactor {home}", e.conn.uid());
                let m = Box::new(Moving {
                    stream,
                    conn: e.conn,
                });
                self.env.send(home, Msg::Adopt(m));
            }
            Link::User(_) => {
                // A userspace-TCP socket lives in reactor 0's stack and cannot move.
                log::warn!(
                    "conn {}: cannot join its session on reactor {home} from a userspace                      portal; closing",
                    e.conn.uid()
                );
                e.conn.force_close(CloseReason::ProtocolError(
                    "MC/S session on another reactor".into(),
                ));
                self.unlink(&mut e.link);
                e.conn.teardown(&mut self.env);
            }
        }
    }

    fn complete_scsi(&mut self) {
        self.env.poll_devices();
        self.env.reap_removed_devices();
        for r in std::mem::take(&mut self.env.responses) {
            if let Some(token) = self.uid_to_token.get(&(r.tag >> 32)) {
                if let Some(e) = self.conns.get_mut(token) {
                    if let Some(d) = e.conn.scsi_done(r) {
                        self.stats.count(&d);
                        if let Some(t) = e.conn.target() {
                            self.lun_stats.entry((t, d.lun)).or_default().count(&d);
                        }
                    }
                }
                continue;
            }
            // A failed connection's task (ERL 2): kept, or sent where it was reassigned
            // (which may have failed too).
            let mut next = Some(r);
            let mut hops = 0;
            let found = loop {
                let Some(resp) = next.take() else {
                    break None;
                };
                if self.uid_to_token.contains_key(&(resp.tag >> 32)) {
                    break Some(resp);
                }
                hops += 1;
                if hops > 4 {
                    break None;
                }
                next = self.env.orphan_response(resp);
            };
            let Some(r) = found else {
                continue;
            };
            let uid = r.tag >> 32;
            if let Some(token) = self.uid_to_token.get(&uid) {
                if let Some(e) = self.conns.get_mut(token) {
                    if let Some(d) = e.conn.scsi_done(r) {
                        self.stats.count(&d);
                        if let Some(t) = e.conn.target() {
                            self.lun_stats.entry((t, d.lun)).or_default().count(&d);
                        }
                    }
                }
            }
        }
    }

    /// Publishes this reactor's counters (and, on reactor 0, the heartbeat).
    fn publish_stats(&mut self) {
        let Some(seg) = self.env.shared.segment.as_ref() else {
            return;
        };
        self.stats.connections = self.conns.len() as u64;
        self.stats.sessions = self.conns.values().filter(|e| e.conn.tsih() != 0).count() as u64;
        if let Some(w) = seg.stats_writer(self.env.me) {
            w.publish(&self.stats);
        }
        if self.env.me == 0 {
            seg.beat();
        }
        self.publish_objects();
    }

    /// Publishes this reactor's per-LUN and per-connection counters, each in its own block
    /// (rewritten only when it changed), and frees the blocks of LUNs and connections
    /// that are gone.
    fn publish_objects(&mut self) {
        let shared = self.env.shared.clone();
        let Some(seg) = shared.segment.as_ref() else {
            return;
        };
        let me = self.env.me;
        let model = self.env.model.clone();
        self.lun_stats.retain(|(t, l), _| model.lun_exists(*t, *l));
        let mut live = Vec::with_capacity(self.lun_stats.len() + self.conns.len());
        for ((t, l), s) in &self.lun_stats {
            let name = format!("{}/{l}", model.config().targets[*t].name);
            let id = ((*t as u64) << 32) | *l;
            let key = ObjKey::Lun(*t, *l);
            if self
                .objects
                .publish(seg, me, key, ObjectKind::Lun, id, &name, s)
            {
                live.push(key);
            }
        }
        for e in self.conns.values() {
            if e.conn.tsih() == 0 {
                continue;
            }
            let (peer, _, initiator, _, _) = e.conn.describe();
            let target = e
                .conn
                .target()
                .and_then(|t| model.config().targets.get(t))
                .map_or("discovery", |t| t.name.as_str());
            let key = ObjKey::Conn(e.conn.uid());
            let name = format!("{peer} {initiator} -> {target}");
            if self.objects.publish(
                seg,
                me,
                key,
                ObjectKind::Connection,
                e.conn.uid(),
                &name,
                e.conn.stats(),
            ) {
                live.push(key);
            }
        }
        self.objects.retire(seg, me, &live);
    }

    /// Sends connections that have been idle long enough to the parking lot.
    fn park_idle(&mut self, now: Instant) {
        let Some(after) = self.park_after else {
            return;
        };
        let idle: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, e)| {
                matches!(e.link, Link::Kernel(_))
                    && !e.conn.pinned()
                    && e.conn.is_idle()
                    && !e.read_pending
                    && now.duration_since(e.conn.last_rx()) >= after
            })
            .map(|(t, _)| *t)
            .collect();
        for t in idle {
            let Some(e) = self.conns.remove(&t) else {
                continue;
            };
            let Link::Kernel(mut stream) = e.link else {
                continue;
            };
            self.uid_to_token.remove(&e.conn.uid());
            let _ = self.poll.registry().deregister(&mut stream);
            log::debug!("conn {}: parked by reactor {}", e.conn.uid(), self.env.me);
            self.env.shared.parked_total.fetch_add(1, Ordering::Relaxed);
            let moving = Box::new(Moving {
                stream,
                conn: e.conn,
            });
            match self.env.shared.park_tx.try_send(ParkMsg::Park(moving)) {
                Ok(()) => {
                    let _ = self.env.shared.park_waker.wake();
                }
                Err(err) => {
                    // The parking lot is full: keep serving the connection here.
                    let ParkMsg::Park(m) = err.into_inner() else {
                        continue;
                    };
                    let m = *m;
                    self.adopt(m.stream, m.conn);
                }
            }
        }
    }

    fn flush_and_reap(&mut self) {
        for (uid, replaced) in std::mem::take(&mut self.env.close_local) {
            if let Some(token) = self.uid_to_token.get(&uid) {
                if let Some(e) = self.conns.get_mut(token) {
                    if replaced {
                        log::info!("conn {uid}: replaced by a new connection with its CID");
                        e.conn.force_close(CloseReason::Replaced);
                    } else {
                        log::info!("conn {uid}: session reinstated by a new login");
                        e.conn.force_close(CloseReason::Reinstated);
                    }
                }
            }
        }
        let mut dead = Vec::new();
        for (token, e) in self.conns.iter_mut() {
            if e.conn.has_tx() {
                if let Err(err) = flush(e, self.user.as_mut()) {
                    log::debug!("conn {}: write error: {err}", e.conn.uid());
                    e.conn.force_close(CloseReason::PeerClosed);
                }
                let want_writable = e.conn.has_tx();
                if let Link::Kernel(stream) = &mut e.link {
                    if want_writable != e.writable_interest {
                        let interest = if want_writable {
                            Interest::READABLE | Interest::WRITABLE
                        } else {
                            Interest::READABLE
                        };
                        let _ = self.poll.registry().reregister(stream, *token, interest);
                        e.writable_interest = want_writable;
                    }
                }
            }
            if e.conn.wants_close().is_some() {
                dead.push(*token);
            }
        }
        let mut ended_sessions = Vec::new();
        for token in dead {
            if let Some(mut e) = self.conns.remove(&token) {
                if e.conn.ends_session() {
                    ended_sessions.push(e.conn.tsih());
                }
                log::info!(
                    "conn {}: closed ({:?})",
                    e.conn.uid(),
                    e.conn
                        .wants_close()
                        .cloned()
                        .unwrap_or(CloseReason::PeerClosed)
                );
                self.unlink(&mut e.link);
                e.conn.teardown(&mut self.env);
                self.uid_to_token.remove(&e.conn.uid());
            }
        }
        // Logout "close the session": its other connections go too (they live here).
        for tsih in ended_sessions.into_iter().filter(|t| *t != 0) {
            for e in self.conns.values_mut() {
                if e.conn.tsih() == tsih {
                    e.conn.force_close(CloseReason::Logout);
                }
            }
        }
    }

    fn shutdown(&mut self) {
        self.publish_stats();
        log::info!(
            "reactor {}: shutting down: closing {} connections",
            self.env.me,
            self.conns.len()
        );
        // Let commands already in the local devices finish so acknowledged writes are
        // durable.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.env.local_in_flight() > 0 && Instant::now() < deadline {
            self.complete_scsi();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.complete_scsi();
        let conns: Vec<Entry> = self.conns.drain().map(|(_, e)| e).collect();
        for mut e in conns {
            // Async Message "the target will drop the session" (DefaultTime2Wait, then the
            // initiator may log in again: a restart), then the close.
            e.conn.end_session(CloseReason::Shutdown);
            let _ = flush(&mut e, self.user.as_mut());
            self.unlink(&mut e.link);
            e.conn.teardown(&mut self.env);
        }
        if let Some(u) = self.user.as_mut() {
            // Let the userspace stack send what was queued and the FINs; whatever has not
            // finished by then is reset.
            u.shutdown(Duration::from_millis(200));
            log::info!("{}: {}", u.describe(), u.counters());
        }
        self.env.flush_devices();
    }

    /// Detaches a closing connection's transport: epoll for the kernel's, a graceful close
    /// for the userspace stack's.
    fn unlink(&mut self, link: &mut Link) {
        match link {
            Link::Kernel(s) => {
                let _ = self.poll.registry().deregister(s);
            }
            Link::User(h) => {
                if let Some(u) = self.user.as_mut() {
                    u.close(*h);
                }
            }
        }
    }
}

/// What can be checked without starting: the core mask, and that every portal group's
/// transport is compiled in.
/// Whether the model still carries a connection's session; if not, why.
fn unmapped(model: &Model, conn: &Connection) -> Option<(CloseReason, &'static str)> {
    let pg = conn.pg_tag();
    if !model.config().portal_groups.iter().any(|p| p.tag == pg) {
        return Some((CloseReason::Unmapped, "its portal group was removed"));
    }
    let t = conn.target()?;
    if !model.is_live(t) {
        return Some((CloseReason::TargetRemoved, "its target was removed"));
    }
    let exposed = model.config().targets[t]
        .mappings
        .iter()
        .any(|m| m.portal_group == pg);
    (!exposed).then_some((
        CloseReason::Unmapped,
        "its target is no longer exposed on its portal group",
    ))
}

pub fn check_config(config: &Config) -> Result<(), StartError> {
    cpus_of_mask(config.global.cpumask)?;
    for pg in &config.portal_groups {
        if pg.transport == Transport::Dpdk && !cfg!(feature = "dpdk") {
            return Err(no_dpdk(pg.tag));
        }
    }
    Ok(())
}

fn no_dpdk(tag: u16) -> StartError {
    StartError::Io(format!(
        "portal group {tag}: transport \"dpdk\" needs a build with the cargo feature `dpdk` \
         (cargo build --release --features dpdk)"
    ))
}

/// Builds the userspace stacks of a portal group on its packet device: one per queue.
fn build_stack(
    pg: &crate::tgt::PortalGroup,
    config: &Config,
    reactors: usize,
) -> Result<Vec<Box<dyn UserStack>>, StartError> {
    let net = pg
        .userspace
        .as_ref()
        .ok_or_else(|| StartError::Io(format!("portal group {}: no userspace settings", pg.tag)))?;
    let portals: Vec<(SocketAddr, u16)> = pg.portals.iter().map(|p| (*p, pg.tag)).collect();
    let err = |e: stack::StackError| StartError::Io(format!("portal group {}: {e}", pg.tag));
    match pg.transport {
        Transport::Tap => {
            let phy = stack::TapPhy::open(&net.device).map_err(err)?;
            Ok(vec![Box::new(Stack::new(phy, net, &portals).map_err(err)?)])
        }
        Transport::Dpdk => build_dpdk_stack(pg, net, &portals, config, reactors),
        Transport::Kernel => Err(StartError::Io("not a userspace portal group".into())),
    }
}

/// Starts DPDK's EAL (once per process) and opens the portal group's port with one queue
/// per reactor when it has that many (RSS, or AF_PACKET's fanout, spreads flows over them;
/// each reactor runs a stack on its queue), else with one queue for reactor 0's stack.
#[cfg(feature = "dpdk")]
fn build_dpdk_stack(
    pg: &crate::tgt::PortalGroup,
    net: &crate::tgt::UserspaceNet,
    portals: &[(SocketAddr, u16)],
    config: &Config,
    reactors: usize,
) -> Result<Vec<Box<dyn UserStack>>, StartError> {
    use crate::net::dpdk;
    let err = |m: String| StartError::Io(format!("portal group {}: DPDK: {m}", pg.tag));
    let d = config.dpdk.clone().unwrap_or_default();
    if !d.no_huge {
        let free = crate::mem::region::hugepages_available().map_or(0, |(_, free)| free);
        if free == 0 {
            return Err(err(
                "no free hugepages: reserve some (echo 1024 > /proc/sys/vm/nr_hugepages) \
                 or set [dpdk] no_huge = true"
                    .into(),
            ));
        }
    }
    let cpus = cpus_of_mask(config.global.cpumask)?;
    let args = crate::net::eal_args(&d, &config.global.instance, &cpus);
    // EAL pins the calling thread to its first core; the threads started after it (the
    // parking lot) must not inherit that.
    let affinity = current_affinity();
    log::info!("DPDK {}: EAL {}", dpdk::dpdk_version(), args.join(" "));
    let eal = dpdk::eal_init(&args);
    restore_affinity(affinity);
    eal.map_err(|e| err(e.to_string()))?;
    let want = u16::try_from(reactors).unwrap_or(1).max(1);
    let port = match dpdk::DpdkPort::open(&net.device, want, d.mbufs, net.mtu) {
        Ok(p) => p,
        Err(e @ dpdk::DpdkError::InvalidQueueCount { .. }) if want > 1 => {
            log::warn!(
                "DPDK port {:?}: {e}; one queue, steered in software by reactor 0 (one \
                 queue per reactor needs {want} queues, e.g. net_af_packet's qpairs={want})",
                net.device
            );
            dpdk::DpdkPort::open(&net.device, 1, d.mbufs, net.mtu)
                .map_err(|e| err(format!("port {:?}: {e}", net.device)))?
        }
        Err(e) => {
            return Err(err(format!(
                "port {:?}: {e} (is it bound to a DPDK driver, or given with --vdev?)",
                net.device
            )))
        }
    };
    if !port.link_up() {
        log::warn!("DPDK port {:?}: link is down", net.device);
    }
    let mut net = net.clone();
    if net.mac.is_none() {
        net.mac = Some(port.mac());
    }
    let mut stacks: Vec<Box<dyn UserStack>> = Vec::new();
    if port.queues() == 1 && reactors > 1 {
        // One queue, several reactors: reactor 0 steers each flow to its reactor's stack.
        let steer = stack::Steering::new(reactors);
        let q = port.queue(0).map_err(|e| err(e.to_string()))?;
        let name = crate::net::stack::Phy::describe(&q);
        let head = stack::SteerHead::new(q, steer.clone());
        let caps = smoltcp::phy::Device::capabilities(&head);
        let cfg_err = |e| StartError::Io(format!("portal group {}: {e}", pg.tag));
        stacks.push(Box::new(Stack::new(head, &net, portals).map_err(cfg_err)?));
        for i in 1..reactors {
            let tail = stack::SteerTail::new(steer.clone(), i, caps.clone(), name.clone());
            stacks.push(Box::new(Stack::new(tail, &net, portals).map_err(cfg_err)?));
        }
        return Ok(stacks);
    }
    let share = stack::NeighbourShare::new(usize::from(port.queues()));
    for qid in 0..port.queues() {
        let q = port.queue(qid).map_err(|e| err(e.to_string()))?;
        let cfg_err = |e| StartError::Io(format!("portal group {}: {e}", pg.tag));
        if port.queues() == 1 {
            stacks.push(Box::new(Stack::new(q, &net, portals).map_err(cfg_err)?));
        } else {
            let q = stack::Sharing::new(q, share.clone(), usize::from(qid));
            stacks.push(Box::new(Stack::new(q, &net, portals).map_err(cfg_err)?));
        }
    }
    Ok(stacks)
}

#[cfg(feature = "dpdk")]
fn current_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is valid; the call fills it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    }
}

#[cfg(feature = "dpdk")]
fn restore_affinity(set: Option<libc::cpu_set_t>) {
    if let Some(set) = set {
        // SAFETY: a set obtained from sched_getaffinity for this thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
}

#[cfg(not(feature = "dpdk"))]
fn build_dpdk_stack(
    pg: &crate::tgt::PortalGroup,
    _net: &crate::tgt::UserspaceNet,
    _portals: &[(SocketAddr, u16)],
    _config: &Config,
    _reactors: usize,
) -> Result<Vec<Box<dyn UserStack>>, StartError> {
    Err(no_dpdk(pg.tag))
}

/// Writes as much of the connection's queue as the socket takes.
fn flush(e: &mut Entry, mut user: Option<&mut Box<dyn UserStack>>) -> io::Result<()> {
    loop {
        let written = {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOV);
            e.conn.tx_iovecs(&mut iov, MAX_IOV);
            if iov.is_empty() {
                return Ok(());
            }
            match (&mut e.link, user.as_deref_mut()) {
                (Link::Kernel(s), _) => tcp::write_some(s, &iov)?,
                (Link::User(h), Some(u)) => u.send(*h, &iov)?,
                (Link::User(_), None) => return Err(io::Error::other("no userspace stack")),
            }
        };
        match written {
            Some(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer gone")),
            Some(n) => e.conn.tx_consumed(n),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
