//! A userspace TCP/IP stack (smoltcp) owned by one reactor, over a packet device: a TAP
//! interface, or a DPDK port queue with the cargo feature `dpdk`.
//!
//! The reactor sees it through [`UserStack`]: it polls the stack, takes the connections
//! that were accepted, and moves each connection's bytes with [`UserStack::recv`] and
//! [`UserStack::send`], which copy between the socket rings and the connection's buffers
//! (Data-Out lands in the command's buffer, Data-In leaves from the bdev's buffer: one copy
//! per direction, which smoltcp's rings force).
//!
//! smoltcp's defaults and limits, and what this module does about each:
//! - Nagle and a 10 ms delayed ACK are on by default: both are turned off on every socket,
//!   since iSCSI answers PDUs and waits for the next command.
//! - A listening socket becomes the connection: each portal keeps `listen_backlog`
//!   listening sockets and replenishes them after every poll; a SYN that finds none gets a
//!   reset (the initiator retries).
//! - The out-of-order assembler keeps a fixed number of gaps: built with 32 (the cargo
//!   feature `assembler-max-segment-count-32`) instead of 4; segments beyond it are dropped
//!   and retransmitted.
//! - Every packet scans the socket set: the stack refuses connections beyond
//!   `max_connections` (the portal's listeners stop being replenished).
//! - Retransmission: the RTO is estimated from the RTT and kept between 10 ms and 10 s
//!   (smoltcp 0.12); there is no congestion control unless smoltcp's Reno/Cubic features
//!   are built in, which they are not (a dedicated storage network is assumed).
//! - Window scaling follows from the socket buffer size (`socket_buffer`), which should
//!   cover the bandwidth-delay product (512 KiB: 10 Gbit/s at 400 µs RTT).

use crate::tgt::UserspaceNet;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use std::fmt;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Why a stack could not be built.
#[derive(Debug)]
pub enum StackError {
    /// The packet device could not be opened.
    Device(String),
    /// The settings do not fit smoltcp's limits.
    Config(String),
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StackError::Device(m) => write!(f, "packet device: {m}"),
            StackError::Config(m) => write!(f, "userspace stack: {m}"),
        }
    }
}

impl std::error::Error for StackError {}

/// A connection the stack accepted.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub handle: SocketHandle,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub pg_tag: u16,
}

/// Counters of one stack, for logs and the control plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackStats {
    pub accepted: u64,
    /// Times the stack was at `max_connections` with no listener left on a portal.
    pub refused_full: u64,
    pub polls: u64,
}

/// What a reactor needs from a userspace stack, whatever its packet device.
pub trait UserStack: Send {
    /// A name for logs: transport and device.
    fn describe(&self) -> String;
    /// Moves packets both ways and runs TCP's timers; returns whether anything changed.
    fn poll(&mut self, now: Instant) -> bool;
    /// Connections established since the last call.
    fn accept(&mut self) -> Option<Accepted>;
    /// Reads received bytes: Some(0) at end of stream, None when nothing is waiting.
    fn recv(&mut self, h: SocketHandle, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Queues bytes for sending: how many were taken, None when the ring is full.
    fn send(&mut self, h: SocketHandle, iov: &[IoSlice<'_>]) -> io::Result<Option<usize>>;
    /// Whether `recv` has something to say (data or the end of the stream).
    fn readable(&self, h: SocketHandle) -> bool;
    /// Closes a connection (FIN after what is queued) and forgets it once TCP is done.
    fn close(&mut self, h: SocketHandle);
    /// How long the stack can wait before its next poll (timers), None: until a packet.
    fn poll_delay(&mut self, now: Instant) -> Option<Duration>;
    /// A file descriptor that becomes readable when packets arrive, for epoll; None: the
    /// device must be polled (DPDK).
    fn fd(&self) -> Option<RawFd>;
    /// The stack's and its device's counters in one line, for the log.
    fn counters(&self) -> String;
    /// Stops: waits up to `grace` for closing connections to finish, then resets every
    /// socket still open and sends the resets.
    fn shutdown(&mut self, grace: Duration);
}

/// One portal on the stack: its endpoint and its ready listening sockets.
struct PortalListen {
    local: SocketAddr,
    pg_tag: u16,
    listening: Vec<SocketHandle>,
}

/// A packet device the stack can run on: smoltcp's `Device` plus what the reactor needs.
pub trait Phy: Device + Send {
    fn raw_fd(&self) -> Option<RawFd>;
    /// Pushes out packets the device batched during a poll.
    fn flush(&mut self) {}
    fn describe(&self) -> String;
    /// The device's counters in one line, for the log.
    fn counters(&self) -> String {
        String::new()
    }
}

/// The TAP backend: a kernel TAP interface read and written frame by frame, with one
/// receive and one transmit frame buffer reused for every packet.
pub struct TapPhy {
    fd: std::os::fd::OwnedFd,
    name: String,
    /// Ethernet frame size: the interface MTU plus the 14-byte header.
    frame: usize,
    rx: Vec<u8>,
    tx: Vec<u8>,
    /// Frames the kernel refused (its queue full): dropped, TCP retransmits.
    pub tx_dropped: u64,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    /// ifr_flags or ifr_mtu, padded to the size of the kernel's union.
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<IfReq, StackError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(StackError::Config(format!(
                "interface name {name:?} must be 1 to {} bytes",
                libc::IFNAMSIZ - 1
            )));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }
}

impl TapPhy {
    /// Attaches to the TAP interface `name`, creating it when missing (a persistent one made
    /// with `ip tuntap add dev NAME mode tap` keeps its addresses across restarts). The
    /// operator brings the kernel side up; the stack has its own addresses.
    pub fn open(name: &str) -> Result<TapPhy, StackError> {
        use std::os::fd::FromRawFd;
        let mut req = IfReq::new(name)?;
        let path = c"/dev/net/tun";
        // SAFETY: a valid C string; the returned fd is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(StackError::Device(format!(
                "cannot open /dev/net/tun: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: fd was just opened and is owned here only.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq is laid out as.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(StackError::Device(format!(
                "cannot attach to TAP {name:?}: {}",
                io::Error::last_os_error()
            )));
        }
        let mtu = interface_mtu(name).unwrap_or(1500);
        let frame = mtu + 14;
        Ok(TapPhy {
            fd,
            name: name.to_string(),
            frame,
            // Whole frames even beyond the MTU (VLAN tags, an MTU raised later) are read,
            // so nothing is truncated into garbage.
            rx: vec![0; 65_536],
            tx: vec![0; frame],
            tx_dropped: 0,
        })
    }
}

/// The MTU of a network interface (SIOCGIFMTU).
fn interface_mtu(name: &str) -> Option<usize> {
    let mut req = IfReq::new(name).ok()?;
    // SAFETY: a plain datagram socket for the ioctl, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return None;
    }
    // SAFETY: SIOCGIFMTU fills ifr_mtu of an ifreq.
    let r = unsafe { libc::ioctl(sock, libc::SIOCGIFMTU, &mut req) };
    // SAFETY: sock is ours.
    unsafe { libc::close(sock) };
    if r < 0 {
        return None;
    }
    let mtu = i32::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]]);
    usize::try_from(mtu)
        .ok()
        .filter(|m| (576..=65_535).contains(m))
}

/// A received frame, borrowed from the TAP's receive buffer.
pub struct TapRx<'a>(&'a [u8]);

/// Room for one frame in the TAP's transmit buffer; written to the fd when consumed.
pub struct TapTx<'a> {
    fd: RawFd,
    buf: &'a mut Vec<u8>,
    dropped: &'a mut u64,
}

impl smoltcp::phy::RxToken for TapRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for TapTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let r = f(&mut self.buf[..len]);
        // SAFETY: writes len initialised bytes of buf to our fd.
        let n = unsafe { libc::write(self.fd, self.buf.as_ptr().cast(), len) };
        if n != len as isize {
            *self.dropped += 1;
        }
        r
    }
}

impl Device for TapPhy {
    type RxToken<'a> = TapRx<'a>;
    type TxToken<'a> = TapTx<'a>;

    fn receive(&mut self, _t: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // SAFETY: reads at most rx.len() bytes into rx.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                self.rx.as_mut_ptr().cast(),
                self.rx.len(),
            )
        };
        if n <= 0 {
            return None;
        }
        let fd = self.fd.as_raw_fd();
        Some((
            TapRx(&self.rx[..n as usize]),
            TapTx {
                fd,
                buf: &mut self.tx,
                dropped: &mut self.tx_dropped,
            },
        ))
    }

    fn transmit(&mut self, _t: SmolInstant) -> Option<Self::TxToken<'_>> {
        Some(TapTx {
            fd: self.fd.as_raw_fd(),
            buf: &mut self.tx,
            dropped: &mut self.tx_dropped,
        })
    }

    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        let mut c = smoltcp::phy::DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.frame;
        c
    }
}

impl Phy for TapPhy {
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }

    fn counters(&self) -> String {
        format!("{} frames refused by the kernel", self.tx_dropped)
    }
}

/// A locally administered, unicast Ethernet address derived from a device name.
pub fn derived_mac(name: &str) -> [u8; 6] {
    // FNV-1a over the name: stable across restarts, so neighbours' caches stay right.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[1], b[2], b[3], b[4], b[5]]
}

fn to_smol_ip(ip: IpAddr) -> IpAddress {
    match ip {
        IpAddr::V4(a) => IpAddress::Ipv4(a),
        IpAddr::V6(a) => IpAddress::Ipv6(a),
    }
}

fn to_std(ep: IpEndpoint) -> SocketAddr {
    let ip = match ep.addr {
        IpAddress::Ipv4(a) => IpAddr::V4(a),
        IpAddress::Ipv6(a) => IpAddr::V6(a),
    };
    SocketAddr::new(ip, ep.port)
}

/// Address resolution shared by the stacks of one multi-queue port. Each queue's stack has
/// its own neighbour cache, and smoltcp learns neighbours from ARP and NDP only, but the NIC
/// (RSS, AF_PACKET fanout) delivers an ARP reply or neighbour advertisement to one queue,
/// not necessarily that of the stack which asked. So every stack hands a copy of each such
/// frame it receives to the others, which take it in before their own queue.
pub struct NeighbourShare {
    inboxes: Vec<crossbeam_queue::ArrayQueue<Vec<u8>>>,
    /// Copies dropped because a stack's inbox was full.
    pub dropped: std::sync::atomic::AtomicU64,
}

impl NeighbourShare {
    /// For `stacks` stacks.
    pub fn new(stacks: usize) -> std::sync::Arc<NeighbourShare> {
        std::sync::Arc::new(NeighbourShare {
            inboxes: (0..stacks)
                .map(|_| crossbeam_queue::ArrayQueue::new(256))
                .collect(),
            dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn share(&self, from: usize, frame: &[u8]) {
        for (i, q) in self.inboxes.iter().enumerate() {
            if i != from && q.push(frame.to_vec()).is_err() {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Whether an Ethernet frame is ARP, or an IPv6 neighbour solicitation or advertisement.
pub fn is_neighbour_frame(f: &[u8]) -> bool {
    if f.len() < 14 {
        return false;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0806 => true,
        // IPv6 without extension headers, next header ICMPv6, type 135 or 136.
        0x86DD => f.len() > 54 && f[20] == 58 && matches!(f[54], 135 | 136),
        _ => false,
    }
}

/// A device whose neighbour frames are shared with the other stacks of its port.
pub struct Sharing<D: Phy> {
    inner: D,
    share: std::sync::Arc<NeighbourShare>,
    me: usize,
    injected: Option<Vec<u8>>,
}

impl<D: Phy> Sharing<D> {
    pub fn new(inner: D, share: std::sync::Arc<NeighbourShare>, me: usize) -> Self {
        Sharing {
            inner,
            share,
            me,
            injected: None,
        }
    }
}

/// A frame from the device, or one another stack shared.
pub enum SharingRx<'a, R> {
    Device(R, &'a NeighbourShare, usize),
    Shared(Vec<u8>),
}

impl<R: smoltcp::phy::RxToken> smoltcp::phy::RxToken for SharingRx<'_, R> {
    fn consume<T, F: FnOnce(&[u8]) -> T>(self, f: F) -> T {
        match self {
            SharingRx::Device(r, share, me) => r.consume(|frame| {
                if is_neighbour_frame(frame) {
                    share.share(me, frame);
                }
                f(frame)
            }),
            SharingRx::Shared(v) => f(&v),
        }
    }
}

impl<D: Phy> Device for Sharing<D> {
    type RxToken<'a>
        = SharingRx<'a, D::RxToken<'a>>
    where
        D: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        D: 'a;

    fn receive(&mut self, t: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.injected = self.share.inboxes[self.me].pop();
        if let Some(v) = self.injected.take() {
            let tx = self.inner.transmit(t)?;
            return Some((SharingRx::Shared(v), tx));
        }
        let (rx, tx) = self.inner.receive(t)?;
        Some((SharingRx::Device(rx, &self.share, self.me), tx))
    }

    fn transmit(&mut self, t: SmolInstant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(t)
    }

    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        self.inner.capabilities()
    }
}

impl<D: Phy> Phy for Sharing<D> {
    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    fn flush(&mut self) {
        self.inner.flush();
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn counters(&self) -> String {
        format!(
            "{}; {} shared neighbour frames dropped",
            self.inner.counters(),
            self.share
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

/// Software steering for a port with one queue and several reactors: reactor 0 owns the
/// queue and passes each TCP segment to the reactor that owns its flow (a symmetric hash of
/// the two endpoints, so both directions agree), over bounded rings; the other reactors'
/// stacks send through reactor 0. ARP and NDP frames go to every stack. Costs one copy per
/// steered frame each way, and a frame waits for the next poll of the reactor it goes to.
pub struct Steering {
    /// Frames for stack i (index 0 unused).
    rx: Vec<crossbeam_queue::ArrayQueue<Vec<u8>>>,
    /// Frames the other stacks send, for reactor 0 to put on the queue.
    tx: crossbeam_queue::ArrayQueue<Vec<u8>>,
    /// Frames dropped because a ring was full (TCP retransmits them).
    pub dropped: std::sync::atomic::AtomicU64,
}

/// Frames a steering ring holds (per stack, and for the shared transmit ring).
const STEER_RING: usize = 4096;

impl Steering {
    pub fn new(stacks: usize) -> std::sync::Arc<Steering> {
        std::sync::Arc::new(Steering {
            rx: (0..stacks.max(1))
                .map(|_| crossbeam_queue::ArrayQueue::new(STEER_RING))
                .collect(),
            tx: crossbeam_queue::ArrayQueue::new(STEER_RING),
            dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn stacks(&self) -> usize {
        self.rx.len()
    }

    fn push(&self, q: &crossbeam_queue::ArrayQueue<Vec<u8>>, frame: Vec<u8>) {
        if q.push(frame).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The stack that owns the TCP flow of an Ethernet frame among `n`: a hash of its two
/// (address, port) endpoints taken in a fixed order, so both directions of a connection
/// give the same answer. None for frames that are not TCP over IPv4 or IPv6.
pub fn flow_owner(f: &[u8], n: usize) -> Option<usize> {
    if f.len() < 14 || n == 0 {
        return None;
    }
    let (src, dst, l4) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => {
            let ihl = usize::from(*f.get(14)? & 0x0f) * 4;
            if *f.get(23)? != 6 || ihl < 20 {
                return None;
            }
            (f.get(26..30)?, f.get(30..34)?, 14 + ihl)
        }
        0x86DD => {
            if *f.get(20)? != 6 {
                return None;
            }
            (f.get(22..38)?, f.get(38..54)?, 54)
        }
        _ => return None,
    };
    let ports = f.get(l4..l4 + 4)?;
    let a = (src, &ports[0..2]);
    let b = (dst, &ports[2..4]);
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in lo.0.iter().chain(lo.1).chain(hi.0).chain(hi.1) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits follow the parity of the input bytes (Linux picks even source ports),
    // so mix the high bits down before taking the remainder.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    Some((h % n as u64) as usize)
}

/// Reactor 0's device under steering: the port's queue.
pub struct SteerHead<D: Phy> {
    inner: D,
    steer: std::sync::Arc<Steering>,
}

impl<D: Phy> SteerHead<D> {
    pub fn new(inner: D, steer: std::sync::Arc<Steering>) -> Self {
        SteerHead { inner, steer }
    }

    /// Puts what the other stacks sent on the queue.
    fn send_for_others(&mut self, t: SmolInstant) {
        while let Some(frame) = self.steer.tx.pop() {
            match self.inner.transmit(t) {
                Some(tok) => {
                    use smoltcp::phy::TxToken as _;
                    tok.consume(frame.len(), |buf| buf.copy_from_slice(&frame));
                }
                None => {
                    self.steer
                        .dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}

/// A frame from the queue: given to this stack, or passed on (this stack then sees an empty
/// frame, which smoltcp discards).
pub struct SteerRx<'a, R> {
    inner: R,
    steer: &'a Steering,
}

impl<R: smoltcp::phy::RxToken> smoltcp::phy::RxToken for SteerRx<'_, R> {
    fn consume<T, F: FnOnce(&[u8]) -> T>(self, f: F) -> T {
        let steer = self.steer;
        self.inner.consume(|frame| {
            let n = steer.stacks();
            if is_neighbour_frame(frame) {
                for i in 1..n {
                    steer.push(&steer.rx[i], frame.to_vec());
                }
                return f(frame);
            }
            match flow_owner(frame, n) {
                Some(owner) if owner != 0 => {
                    steer.push(&steer.rx[owner], frame.to_vec());
                    f(&[])
                }
                _ => f(frame),
            }
        })
    }
}

impl<D: Phy> Device for SteerHead<D> {
    type RxToken<'a>
        = SteerRx<'a, D::RxToken<'a>>
    where
        D: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        D: 'a;

    fn receive(&mut self, t: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.send_for_others(t);
        let (rx, tx) = self.inner.receive(t)?;
        Some((
            SteerRx {
                inner: rx,
                steer: &self.steer,
            },
            tx,
        ))
    }

    fn transmit(&mut self, t: SmolInstant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(t)
    }

    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        self.inner.capabilities()
    }
}

impl<D: Phy> Phy for SteerHead<D> {
    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    fn flush(&mut self) {
        self.send_for_others(SmolInstant::from_micros(0));
        self.inner.flush();
    }

    fn describe(&self) -> String {
        format!(
            "{} stack 0 of {} (software steering)",
            self.inner.describe(),
            self.steer.stacks()
        )
    }

    fn counters(&self) -> String {
        format!(
            "{}; {} steered frames dropped",
            self.inner.counters(),
            self.steer
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

/// Another reactor's device under steering: frames come from and go to reactor 0.
pub struct SteerTail {
    steer: std::sync::Arc<Steering>,
    me: usize,
    caps: smoltcp::phy::DeviceCapabilities,
    name: String,
    tx: Vec<u8>,
}

impl SteerTail {
    /// Stack `me` (1..) of a port whose reactor-0 device has `caps` and is called `name`.
    pub fn new(
        steer: std::sync::Arc<Steering>,
        me: usize,
        caps: smoltcp::phy::DeviceCapabilities,
        name: String,
    ) -> Self {
        SteerTail {
            steer,
            me,
            caps,
            name,
            tx: Vec::new(),
        }
    }
}

/// A frame reactor 0 passed on.
pub struct OwnedRx(Vec<u8>);

impl smoltcp::phy::RxToken for OwnedRx {
    fn consume<T, F: FnOnce(&[u8]) -> T>(self, f: F) -> T {
        f(&self.0)
    }
}

/// A frame for reactor 0 to send.
pub struct SteerTx<'a> {
    steer: &'a Steering,
    buf: &'a mut Vec<u8>,
}

impl smoltcp::phy::TxToken for SteerTx<'_> {
    fn consume<T, F: FnOnce(&mut [u8]) -> T>(self, len: usize, f: F) -> T {
        self.buf.clear();
        self.buf.resize(len, 0);
        let r = f(&mut self.buf[..]);
        self.steer.push(&self.steer.tx, std::mem::take(self.buf));
        r
    }
}

impl Device for SteerTail {
    type RxToken<'a> = OwnedRx;
    type TxToken<'a> = SteerTx<'a>;

    fn receive(&mut self, _t: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.steer.rx[self.me].pop()?;
        Some((
            OwnedRx(frame),
            SteerTx {
                steer: &self.steer,
                buf: &mut self.tx,
            },
        ))
    }

    fn transmit(&mut self, _t: SmolInstant) -> Option<Self::TxToken<'_>> {
        Some(SteerTx {
            steer: &self.steer,
            buf: &mut self.tx,
        })
    }

    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        self.caps.clone()
    }
}

impl Phy for SteerTail {
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn describe(&self) -> String {
        format!("{} stack {} of {}", self.name, self.me, self.steer.stacks())
    }
}

/// A smoltcp interface, its sockets and its device.
pub struct Stack<D: Phy> {
    phy: D,
    iface: Interface,
    sockets: SocketSet<'static>,
    portals: Vec<PortalListen>,
    /// Established connections handed to the reactor and not closed yet.
    open: usize,
    /// Connections closed by the reactor, removed once TCP has finished with them.
    closing: Vec<(SocketHandle, Instant)>,
    accepted: std::collections::VecDeque<Accepted>,
    socket_buffer: usize,
    backlog: usize,
    max_connections: usize,
    epoch: Instant,
    stats: StackStats,
}

/// Egress passes per poll: segments a socket may send before the stack looks at input again.
const MAX_EGRESS_PASSES: usize = 256;

/// How long a closed connection may linger (FIN handshake, TIME-WAIT) before it is reset.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// A listener whose handshake stalls this long is given back.
const LISTEN_TIMEOUT: SmolDuration = SmolDuration::from_secs(5);
/// TCP keepalive on connections, and how long a silent peer is kept.
const KEEPALIVE: SmolDuration = SmolDuration::from_secs(15);
const CONN_TIMEOUT: SmolDuration = SmolDuration::from_secs(60);

impl<D: Phy> Stack<D> {
    /// A stack with the settings of `net` on `phy`, listening on `portals` (portal, group tag).
    pub fn new(
        mut phy: D,
        net: &UserspaceNet,
        portals: &[(SocketAddr, u16)],
    ) -> Result<Stack<D>, StackError> {
        let mac = net.mac.unwrap_or_else(|| derived_mac(&net.device));
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = seed();
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut phy, SmolInstant::from_micros(0));
        let mut full = false;
        iface.update_ip_addrs(|addrs| {
            for (ip, prefix) in &net.addresses {
                if addrs.push(IpCidr::new(to_smol_ip(*ip), *prefix)).is_err() {
                    full = true;
                }
            }
        });
        if full {
            return Err(StackError::Config("too many addresses".into()));
        }
        for gw in &net.gateways {
            let r = match gw {
                IpAddr::V4(a) => iface.routes_mut().add_default_ipv4_route(*a).map(|_| ()),
                IpAddr::V6(a) => iface.routes_mut().add_default_ipv6_route(*a).map(|_| ()),
            };
            r.map_err(|_| StackError::Config(format!("cannot add a route via {gw}")))?;
        }
        let mut stack = Stack {
            phy,
            iface,
            sockets: SocketSet::new(Vec::new()),
            portals: portals
                .iter()
                .map(|&(local, pg_tag)| PortalListen {
                    local,
                    pg_tag,
                    listening: Vec::new(),
                })
                .collect(),
            open: 0,
            closing: Vec::new(),
            accepted: std::collections::VecDeque::new(),
            socket_buffer: net.socket_buffer,
            backlog: usize::from(net.listen_backlog.max(1)),
            max_connections: net.max_connections as usize,
            epoch,
            stats: StackStats::default(),
        };
        stack.replenish()?;
        Ok(stack)
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        let rx = tcp::SocketBuffer::new(vec![0u8; self.socket_buffer]);
        let tx = tcp::SocketBuffer::new(vec![0u8; self.socket_buffer]);
        let mut s = tcp::Socket::new(rx, tx);
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        // A listener's handshake that does not complete (lost or spoofed SYNs) gives the
        // listener back soon; `accepted` sets the connection's own timeouts.
        s.set_timeout(Some(LISTEN_TIMEOUT));
        s
    }

    /// Moves listening sockets that got a connection to the accept queue, and tops every
    /// portal's listeners back up to the backlog while connections are below the limit.
    fn replenish(&mut self) -> Result<(), StackError> {
        for p in 0..self.portals.len() {
            let mut still = Vec::with_capacity(self.backlog);
            for h in std::mem::take(&mut self.portals[p].listening) {
                let s = self.sockets.get::<tcp::Socket>(h);
                match s.state() {
                    tcp::State::Listen | tcp::State::SynReceived => still.push(h),
                    // CloseWait: the peer already sent its data and FIN (all acknowledged):
                    // the connection still gets it.
                    tcp::State::Established | tcp::State::CloseWait => {
                        let (Some(peer), Some(local)) = (s.remote_endpoint(), s.local_endpoint())
                        else {
                            self.sockets.remove(h);
                            continue;
                        };
                        // smoltcp's timeout counts from the last segment received, whatever
                        // is queued: keepalive probes make an idle but live peer answer, so
                        // only a peer gone silent is dropped.
                        let s = self.sockets.get_mut::<tcp::Socket>(h);
                        s.set_keep_alive(Some(KEEPALIVE));
                        s.set_timeout(Some(CONN_TIMEOUT));
                        self.open += 1;
                        self.stats.accepted += 1;
                        self.accepted.push_back(Accepted {
                            handle: h,
                            peer: to_std(peer),
                            local: to_std(local),
                            pg_tag: self.portals[p].pg_tag,
                        });
                    }
                    // Reset during the handshake, or closed at once: a fresh listener is what
                    // is useful now; this one is reset and reaped.
                    _ => {
                        self.sockets.get_mut::<tcp::Socket>(h).abort();
                        self.closing.push((h, Instant::now()));
                    }
                }
            }
            self.portals[p].listening = still;
        }
        // Every listener may become a connection: together with the open ones they stay
        // within max_connections.
        for p in 0..self.portals.len() {
            let listening: usize = self.portals.iter().map(|q| q.listening.len()).sum();
            let room = self
                .max_connections
                .saturating_sub(self.open + listening - self.portals[p].listening.len());
            let want = self.backlog.min(room);
            if room == 0 && self.portals[p].listening.is_empty() {
                self.stats.refused_full += 1;
            }
            while self.portals[p].listening.len() < want {
                let mut s = self.new_socket();
                let local = self.portals[p].local;
                s.listen(IpEndpoint::new(to_smol_ip(local.ip()), local.port()))
                    .map_err(|e| StackError::Config(format!("cannot listen on {local}: {e}")))?;
                let h = self.sockets.add(s);
                self.portals[p].listening.push(h);
            }
        }
        Ok(())
    }

    /// Forgets closed connections. One that lingered too long is reset first and forgotten
    /// on a later call, after a poll has sent the reset.
    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.closing.len() {
            let (h, since) = self.closing[i];
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            let done = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if done {
                self.sockets.remove(h);
                self.closing.swap_remove(i);
                continue;
            }
            if now.saturating_duration_since(since) > CLOSE_LINGER {
                s.abort();
            }
            i += 1;
        }
    }
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id())
    }
}

impl<D: Phy> UserStack for Stack<D> {
    fn describe(&self) -> String {
        let addrs: Vec<String> = self
            .iface
            .ip_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        format!("{} ({})", self.phy.describe(), addrs.join(", "))
    }

    fn poll(&mut self, now: Instant) -> bool {
        self.stats.polls += 1;
        let t = self.smol_now(now);
        use smoltcp::iface::PollResult;
        let mut changed = matches!(
            self.iface.poll(t, &mut self.phy, &mut self.sockets),
            PollResult::SocketStateChanged
        );
        // smoltcp emits at most one segment per socket per egress pass: keep passing while
        // segments leave (a 128 KiB Data-In is ~90 of them), bounded for fairness.
        for _ in 0..MAX_EGRESS_PASSES {
            match self.iface.poll_egress(t, &mut self.phy, &mut self.sockets) {
                PollResult::SocketStateChanged => changed = true,
                PollResult::None => break,
            }
        }
        self.phy.flush();
        // Reap before replenishing: a socket reset now is forgotten only after the next
        // poll has sent its reset.
        if !self.closing.is_empty() {
            self.reap(now);
        }
        if changed {
            if let Err(e) = self.replenish() {
                log::warn!("{}: {e}", self.phy.describe());
            }
        }
        changed
    }

    fn accept(&mut self) -> Option<Accepted> {
        self.accepted.pop_front()
    }

    fn recv(&mut self, h: SocketHandle, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        match s.recv_slice(buf) {
            Ok(0) if !s.may_recv() => Ok(Some(0)),
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(tcp::RecvError::Finished) => Ok(Some(0)),
            Err(tcp::RecvError::InvalidState) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset",
            )),
        }
    }

    fn send(&mut self, h: SocketHandle, iov: &[IoSlice<'_>]) -> io::Result<Option<usize>> {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        if !s.may_send() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ));
        }
        let mut total = 0;
        for part in iov {
            let n = s
                .send_slice(part)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))?;
            total += n;
            if n < part.len() {
                break;
            }
        }
        Ok((total > 0).then_some(total))
    }

    fn readable(&self, h: SocketHandle) -> bool {
        let s = self.sockets.get::<tcp::Socket>(h);
        s.can_recv() || !s.may_recv()
    }

    fn close(&mut self, h: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(h).close();
        self.open = self.open.saturating_sub(1);
        self.closing.push((h, Instant::now()));
        // Room for a new connection again.
        if let Err(e) = self.replenish() {
            log::warn!("{}: {e}", self.phy.describe());
        }
    }

    fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let t = self.smol_now(now);
        self.iface
            .poll_delay(t, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    fn fd(&self) -> Option<RawFd> {
        self.phy.raw_fd()
    }

    fn shutdown(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while !self.closing.is_empty() && Instant::now() < deadline {
            self.poll(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
        let handles: Vec<SocketHandle> = self.sockets.iter().map(|(h, _)| h).collect();
        for h in handles {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
        }
        for _ in 0..3 {
            self.poll(Instant::now());
        }
    }

    fn counters(&self) -> String {
        format!(
            "{} connections accepted, {} refused at the limit; {}",
            self.stats.accepted,
            self.stats.refused_full,
            self.phy.counters()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Loopback, RxToken, TxToken};

    /// smoltcp's loopback device as a Phy, so two stacks' worth of sockets can talk.
    struct Lo(Loopback);

    impl Device for Lo {
        type RxToken<'a> = <Loopback as Device>::RxToken<'a>;
        type TxToken<'a> = <Loopback as Device>::TxToken<'a>;
        fn receive(&mut self, t: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
            self.0.receive(t)
        }
        fn transmit(&mut self, t: SmolInstant) -> Option<Self::TxToken<'_>> {
            self.0.transmit(t)
        }
        fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
            self.0.capabilities()
        }
    }

    impl Phy for Lo {
        fn raw_fd(&self) -> Option<RawFd> {
            None
        }
        fn describe(&self) -> String {
            "loopback".into()
        }
    }

    // Keep the token traits in use for readers of the test (the loopback device implements
    // them; the stack consumes them through Interface::poll).
    #[allow(dead_code)]
    fn _tokens<R: RxToken, T: TxToken>() {}

    fn net(backlog: u16, max: u32) -> UserspaceNet {
        UserspaceNet {
            device: "lo-test".into(),
            addresses: vec![("127.0.0.1".parse().unwrap(), 8)],
            gateways: Vec::new(),
            mac: None,
            socket_buffer: 64 * 1024,
            listen_backlog: backlog,
            max_connections: max,
            mtu: 1500,
        }
    }

    /// A client socket added to the stack's own socket set (loopback: same interface).
    fn connect(stack: &mut Stack<Lo>, port: u16, local_port: u16) -> SocketHandle {
        let mut s = stack.new_socket();
        let cx = stack.iface.context();
        s.connect(cx, (IpAddress::v4(127, 0, 0, 1), port), local_port)
            .unwrap();
        stack.sockets.add(s)
    }

    fn run(stack: &mut Stack<Lo>, rounds: usize) {
        for _ in 0..rounds {
            stack.poll(Instant::now());
        }
    }

    #[test]
    fn accepts_and_moves_bytes_both_ways_with_listeners_replenished() {
        let portal: SocketAddr = "127.0.0.1:3260".parse().unwrap();
        let mut st = Stack::new(
            Lo(Loopback::new(Medium::Ethernet)),
            &net(2, 16),
            &[(portal, 7)],
        )
        .unwrap();
        assert_eq!(st.portals[0].listening.len(), 2);
        let c = connect(&mut st, 3260, 40000);
        run(&mut st, 10);
        let a = st.accept().expect("accepted");
        assert_eq!(a.pg_tag, 7);
        assert_eq!(a.local, portal);
        assert_eq!(a.peer, "127.0.0.1:40000".parse().unwrap());
        // The used listener was replaced.
        assert_eq!(st.portals[0].listening.len(), 2);
        // Client -> server.
        let s = st.sockets.get_mut::<tcp::Socket>(c);
        assert_eq!(s.send_slice(b"hello iscsi").unwrap(), 11);
        run(&mut st, 10);
        assert!(st.readable(a.handle));
        let mut buf = [0u8; 64];
        assert_eq!(st.recv(a.handle, &mut buf).unwrap(), Some(11));
        assert_eq!(&buf[..11], b"hello iscsi");
        assert_eq!(st.recv(a.handle, &mut buf).unwrap(), None);
        // Server -> client, from two iovecs.
        let iov = [IoSlice::new(b"data-"), IoSlice::new(b"in")];
        assert_eq!(st.send(a.handle, &iov).unwrap(), Some(7));
        run(&mut st, 10);
        let s = st.sockets.get_mut::<tcp::Socket>(c);
        let n = s.recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"data-in");
        // Nagle and delayed ACK are off on accepted sockets.
        let srv = st.sockets.get::<tcp::Socket>(a.handle);
        assert!(!srv.nagle_enabled());
        assert_eq!(srv.ack_delay(), None);
        // The client closes: the server reads the end of the stream.
        st.sockets.get_mut::<tcp::Socket>(c).close();
        run(&mut st, 10);
        assert_eq!(st.recv(a.handle, &mut buf).unwrap(), Some(0));
        st.close(a.handle);
        run(&mut st, 10);
        assert_eq!(st.open, 0);
    }

    #[test]
    fn connections_beyond_the_limit_find_no_listener() {
        let portal: SocketAddr = "127.0.0.1:3260".parse().unwrap();
        let mut st = Stack::new(
            Lo(Loopback::new(Medium::Ethernet)),
            &net(1, 1),
            &[(portal, 1)],
        )
        .unwrap();
        let _c1 = connect(&mut st, 3260, 40001);
        run(&mut st, 10);
        let a = st.accept().expect("first accepted");
        // At the limit: no listener is kept, so a second connection is refused.
        assert!(st.portals[0].listening.is_empty());
        let c2 = connect(&mut st, 3260, 40002);
        run(&mut st, 10);
        assert!(st.accept().is_none());
        assert!(!st.sockets.get::<tcp::Socket>(c2).is_active());
        // Closing the first makes room again.
        st.close(a.handle);
        assert_eq!(st.portals[0].listening.len(), 1);
    }

    /// A device that yields queued frames and records what is sent.
    struct Frames {
        rx: std::collections::VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }
    struct FrameRx(Vec<u8>);
    struct FrameTx<'a>(&'a mut Vec<Vec<u8>>);
    impl RxToken for FrameRx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }
    impl TxToken for FrameTx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut v = vec![0; len];
            let r = f(&mut v);
            self.0.push(v);
            r
        }
    }
    impl Device for Frames {
        type RxToken<'a> = FrameRx;
        type TxToken<'a> = FrameTx<'a>;
        fn receive(&mut self, _: SmolInstant) -> Option<(FrameRx, FrameTx<'_>)> {
            let f = self.rx.pop_front()?;
            Some((FrameRx(f), FrameTx(&mut self.sent)))
        }
        fn transmit(&mut self, _: SmolInstant) -> Option<FrameTx<'_>> {
            Some(FrameTx(&mut self.sent))
        }
        fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
            smoltcp::phy::DeviceCapabilities::default()
        }
    }
    impl Phy for Frames {
        fn raw_fd(&self) -> Option<RawFd> {
            None
        }
        fn describe(&self) -> String {
            "frames".into()
        }
    }

    fn frame(ethertype: u16, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        f
    }

    #[test]
    fn neighbour_frames_reach_every_stack_of_the_port() {
        let arp = frame(0x0806, 42);
        let mut na = frame(0x86DD, 86);
        na[20] = 58;
        na[54] = 136;
        let mut tcp6 = na.clone();
        tcp6[20] = 6;
        let ip4 = frame(0x0800, 60);
        assert!(is_neighbour_frame(&arp) && is_neighbour_frame(&na));
        assert!(!is_neighbour_frame(&tcp6) && !is_neighbour_frame(&ip4));
        assert!(!is_neighbour_frame(&arp[..10]));

        let share = NeighbourShare::new(2);
        let dev = |frames: Vec<Vec<u8>>| Frames {
            rx: frames.into(),
            sent: Vec::new(),
        };
        let mut q0 = Sharing::new(dev(vec![ip4.clone(), arp.clone()]), share.clone(), 0);
        let mut q1 = Sharing::new(dev(vec![]), share.clone(), 1);
        let t = SmolInstant::from_micros(0);
        // Queue 0 takes in its own frames; only the ARP one is copied to queue 1.
        let mut seen0 = Vec::new();
        while let Some((rx, _)) = q0.receive(t) {
            seen0.push(rx.consume(|f| f.to_vec()));
        }
        assert_eq!(seen0, vec![ip4, arp.clone()]);
        let (rx, _) = q1.receive(t).expect("the shared ARP frame");
        assert_eq!(rx.consume(|f| f.to_vec()), arp);
        assert!(q1.receive(t).is_none());
        // Nothing comes back to the queue that shared it.
        assert!(q0.receive(t).is_none());
        assert_eq!(share.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut f = frame(0x0800, 54);
        f[14] = 0x45;
        f[23] = 6;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn flow_owner_is_symmetric_and_spreads_flows() {
        // Even source ports only, as Linux hands them out for connect().
        let mut seen = [0usize; 4];
        for port in (40000..40128u16).step_by(2) {
            let there = tcp4([10, 0, 0, 1], port, [10, 0, 0, 2], 3260);
            let back = tcp4([10, 0, 0, 2], 3260, [10, 0, 0, 1], port);
            let o = flow_owner(&there, 4).unwrap();
            assert_eq!(Some(o), flow_owner(&back, 4));
            seen[o] += 1;
        }
        assert!(seen.iter().all(|&n| n >= 6), "{seen:?}");
        assert_eq!(flow_owner(&frame(0x0806, 42), 4), None);
        let mut udp = tcp4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2);
        udp[23] = 17;
        assert_eq!(flow_owner(&udp, 4), None);
        assert_eq!(flow_owner(&udp[..20], 4), None);
        // Truncated TCP headers are not read past their end.
        assert_eq!(flow_owner(&tcp4([1; 4], 1, [2; 4], 2)[..36], 2), None);
    }

    #[test]
    fn steering_passes_flows_to_their_stack_and_sends_through_the_head() {
        let steer = Steering::new(2);
        // One flow for each stack.
        let mut mine = None;
        let mut theirs = None;
        for port in 40000..40100u16 {
            let f = tcp4([10, 0, 0, 1], port, [10, 0, 0, 2], 3260);
            match flow_owner(&f, 2) {
                Some(0) if mine.is_none() => mine = Some(f),
                Some(1) if theirs.is_none() => theirs = Some(f),
                _ => {}
            }
        }
        let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
        let arp = frame(0x0806, 42);
        let mut head = SteerHead::new(
            Frames {
                rx: vec![mine.clone(), theirs.clone(), arp.clone()].into(),
                sent: Vec::new(),
            },
            steer.clone(),
        );
        let caps = head.capabilities();
        let mut tail = SteerTail::new(steer.clone(), 1, caps, "frames".into());
        let t = SmolInstant::from_micros(0);
        let mut at_head = Vec::new();
        while let Some((rx, _)) = head.receive(t) {
            at_head.push(rx.consume(|f| f.to_vec()));
        }
        // The head's stack sees its own flow, an empty frame for the passed-on one, and ARP.
        assert_eq!(at_head, vec![mine, Vec::new(), arp.clone()]);
        let mut at_tail = Vec::new();
        while let Some((rx, _)) = tail.receive(t) {
            at_tail.push(rx.consume(|f| f.to_vec()));
        }
        assert_eq!(at_tail, vec![theirs, arp]);
        // The tail's transmissions leave through the head's device.
        tail.transmit(t)
            .unwrap()
            .consume(3, |b| b.copy_from_slice(&[1, 2, 3]));
        head.flush();
        assert_eq!(head.inner.sent, vec![vec![1, 2, 3]]);
        assert_eq!(steer.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(tail.describe().ends_with("stack 1 of 2"));
    }

    #[test]
    fn derived_macs_are_unicast_local_and_stable() {
        let a = derived_mac("iscsi0");
        assert_eq!(a, derived_mac("iscsi0"));
        assert_ne!(a, derived_mac("iscsi1"));
        assert_eq!(a[0], 0x02);
    }
}
