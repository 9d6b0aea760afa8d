//! A DPDK ethdev port as smoltcp packet devices, one [`DpdkQueue`] (RX/TX queue pair) per reactor.
//!
//! Public surface:
//! - [`eal_init`]: DPDK's environment, once per process.
//! - [`DpdkPort`]: one configured and started port (mempool, queues, offloads, RSS, MTU).
//! - [`DpdkQueue`]: one queue pair, `Send`, implementing [`smoltcp::phy::Device`]; the reactor
//!   that owns it calls [`DpdkQueue::flush_tx`] after every smoltcp poll.
//! - [`Offloads`], [`PortStats`], [`QueueStats`], [`DpdkError`].
//!
//! Data path: RX hands smoltcp a slice of the mbuf's data area and frees the mbuf afterwards;
//! TX lets smoltcp write the frame straight into a fresh mbuf. No copy happens here, so smoltcp's
//! socket buffers stay the only copy per direction (DESIGN.md point 3).
//!
//! Checksums: smoltcp is told to skip exactly the checksums that the port offloads. On RX a packet
//! the NIC flagged BAD is dropped, and one it flagged UNKNOWN is verified here in software, so
//! smoltcp never accepts an unverified checksum. On TX the mbuf gets the offload flags and goes
//! through `rte_eth_tx_prepare` (which writes the pseudo-header sums that Intel-like NICs want).
//!
//! Threads: EAL pins the thread that calls [`eal_init`] to its main lcore (threads spawned later
//! inherit that affinity until they set their own). Queues may run on any thread, EAL or not:
//! non-EAL threads have no per-lcore mempool cache and use the multi-producer/consumer ring.

use std::collections::HashSet;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use dpdk_sys as sys;
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};

/// Packets per RX/TX burst, and smoltcp's `max_burst_size`.
pub const BURST: usize = 32;
/// Ethernet header length (no VLAN tag: smoltcp never emits one).
const ETH_HDR: usize = 14;
/// Descriptors asked per RX and per TX queue (the driver may round them).
const RING_DESC: u16 = 1024;
/// Per-lcore mempool cache when the pool is big enough for it.
const POOL_CACHE: u32 = 256;
/// The symmetric Toeplitz key: `0x6d5a` repeated hashes (a,b) and (b,a) alike, so both
/// directions of a TCP connection land on the same queue.
const RSS_KEY_WORD: [u8; 2] = [0x6d, 0x5a];

/// Why a DPDK call failed. `errno` values are positive (DPDK's `-errno` returns are negated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DpdkError {
    /// An EAL argument contains a NUL byte.
    ArgContainsNul(String),
    /// The argument list is empty or asks for something that would end the process (`--help`).
    InvalidEalArgs(String),
    /// `rte_eal_init` already ran in this process with other arguments.
    EalAlreadyInitialized { previous: Vec<String> },
    /// `rte_eal_init` failed.
    EalInit { errno: i32 },
    /// [`DpdkPort::open`] before a successful [`eal_init`].
    EalNotInitialized,
    /// No port has that id or device name.
    PortNotFound(String),
    /// The port is already open in this process.
    PortBusy(u16),
    /// `queues` is 0 or above what the device supports.
    InvalidQueueCount { requested: u16, max: u16 },
    /// The MTU is outside what the device (or the mbuf size limit) supports.
    InvalidMtu { mtu: u16, min: u16, max: u16 },
    /// Too few mbufs to fill the RX rings and the bursts.
    TooFewMbufs { requested: u32, needed: u32 },
    /// [`DpdkPort::queue`] with a queue id the port was not configured with.
    QueueOutOfRange { queue: u16, queues: u16 },
    /// [`DpdkPort::queue`] for a queue that another [`DpdkQueue`] already owns.
    QueueTaken(u16),
    /// A DPDK call returned an error.
    Call { op: &'static str, errno: i32 },
}

impl fmt::Display for DpdkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DpdkError::ArgContainsNul(a) => write!(f, "EAL argument {a:?} contains a NUL byte"),
            DpdkError::InvalidEalArgs(why) => write!(f, "invalid EAL arguments: {why}"),
            DpdkError::EalAlreadyInitialized { previous } => write!(
                f,
                "DPDK EAL is already initialised in this process with other arguments: {previous:?}"
            ),
            DpdkError::EalInit { errno } => {
                write!(
                    f,
                    "rte_eal_init failed: {} (errno {errno})",
                    strerror(*errno)
                )
            }
            DpdkError::EalNotInitialized => write!(f, "DPDK EAL is not initialised (eal_init)"),
            DpdkError::PortNotFound(p) => write!(f, "no DPDK port with id or name {p:?}"),
            DpdkError::PortBusy(p) => write!(f, "DPDK port {p} is already open"),
            DpdkError::InvalidQueueCount { requested, max } => {
                write!(
                    f,
                    "{requested} queues requested, the device supports 1..={max}"
                )
            }
            DpdkError::InvalidMtu { mtu, min, max } => {
                write!(f, "MTU {mtu} is outside the supported {min}..={max}")
            }
            DpdkError::TooFewMbufs { requested, needed } => {
                write!(
                    f,
                    "{requested} mbufs requested, the rings and bursts need {needed}"
                )
            }
            DpdkError::QueueOutOfRange { queue, queues } => {
                write!(f, "queue {queue} does not exist (the port has {queues})")
            }
            DpdkError::QueueTaken(q) => write!(f, "queue {q} is already in use"),
            DpdkError::Call { op, errno } => {
                write!(f, "{op} failed: {} (errno {errno})", strerror(*errno))
            }
        }
    }
}

impl std::error::Error for DpdkError {}

/// DPDK's message for a positive errno (covers DPDK's own `E_RTE_*` codes too).
fn strerror(errno: i32) -> String {
    // SAFETY: rte_strerror accepts any int and returns a NUL-terminated string (a static one or
    // a per-thread buffer) that stays valid until the next call on this thread; it is copied
    // before returning.
    let msg = unsafe { sys::rte_strerror(errno) };
    if msg.is_null() {
        return format!("error {errno}");
    }
    // SAFETY: non-null and NUL-terminated (see above).
    unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned()
}

/// Maps a DPDK return code: negative values are `-errno`.
fn check(op: &'static str, rc: c_int) -> Result<c_int, DpdkError> {
    if rc < 0 {
        Err(DpdkError::Call { op, errno: -rc })
    } else {
        Ok(rc)
    }
}

/// For calls that report failure through `rte_errno` (NULL or -1 returns).
fn rte_errno() -> i32 {
    // SAFETY: reads this thread's rte_errno; no preconditions.
    unsafe { sys::dpdk_sys_errno() }
}

// ---------------------------------------------------------------------------------------------
// EAL

/// What `rte_eal_init` was called with. A control-path lock, taken once per init and per open.
static EAL_ARGS: Mutex<Option<Vec<String>>> = Mutex::new(None);

/// Initialises DPDK's EAL with `args` (`args[0]` is the program name, as in `argv`).
///
/// EAL can be initialised once per process. A second call with the same arguments returns
/// `Ok(())` without doing anything; with other arguments it returns
/// [`DpdkError::EalAlreadyInitialized`]. After a failed call a retry is attempted, but DPDK may
/// refuse it (`EalInit { errno: EALREADY }`): treat a failure as final for the process.
/// `-h`/`--help` are refused because EAL would print its usage and exit the process.
pub fn eal_init(args: &[String]) -> Result<(), DpdkError> {
    if args.is_empty() {
        return Err(DpdkError::InvalidEalArgs(
            "empty: args[0] must be the program name".into(),
        ));
    }
    if args[1..]
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
    {
        return Err(DpdkError::InvalidEalArgs(
            "--help would exit the process".into(),
        ));
    }
    let argc = c_int::try_from(args.len())
        .map_err(|_| DpdkError::InvalidEalArgs("too many arguments".into()))?;
    let mut owned = Vec::with_capacity(args.len());
    for a in args {
        owned.push(CString::new(a.as_str()).map_err(|_| DpdkError::ArgContainsNul(a.clone()))?);
    }
    let mut state = EAL_ARGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(previous) = state.as_ref() {
        return if previous.as_slice() == args {
            Ok(())
        } else {
            Err(DpdkError::EalAlreadyInitialized {
                previous: previous.clone(),
            })
        };
    }
    // EAL keeps pointers into argv (and permutes the array): both live for the whole process.
    let owned: &'static [CString] = Box::leak(owned.into_boxed_slice());
    let argv: &'static mut [*mut c_char] = Box::leak(
        owned
            .iter()
            .map(|c| c.as_ptr().cast_mut())
            .chain(std::iter::once(std::ptr::null_mut()))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    // SAFETY: argc counts the argv entries, each a NUL-terminated string that is never freed,
    // followed by a NULL as C's argv; EAL_ARGS is held, so no other thread is in rte_eal_init.
    let rc = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
    if rc < 0 {
        return Err(DpdkError::EalInit { errno: rte_errno() });
    }
    log::info!("DPDK EAL initialised ({}): {:?}", dpdk_version(), args);
    *state = Some(args.to_vec());
    Ok(())
}

/// `rte_version()`, e.g. "DPDK 22.11.11".
pub fn dpdk_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    let v = unsafe { sys::rte_version() };
    if v.is_null() {
        return "DPDK (unknown version)".into();
    }
    // SAFETY: non-null, static, NUL-terminated.
    unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned()
}

fn eal_ready() -> bool {
    EAL_ARGS.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

// ---------------------------------------------------------------------------------------------
// Port

/// Offloads enabled on the port (each only when the device offered it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub rx_ipv4_cksum: bool,
    pub rx_tcp_cksum: bool,
    pub rx_udp_cksum: bool,
    pub tx_ipv4_cksum: bool,
    pub tx_tcp_cksum: bool,
    pub tx_udp_cksum: bool,
    /// TCP segmentation offload is enabled on the port; smoltcp emits MSS-sized segments, so no
    /// packet asks for it today.
    pub tso: bool,
    /// RSS over IP/TCP with the symmetric key (only with more than one queue).
    pub rss: bool,
    /// `RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE` (valid: one pool, refcount 1, no segments).
    pub mbuf_fast_free: bool,
}

impl Offloads {
    fn any_rx(&self) -> bool {
        self.rx_ipv4_cksum || self.rx_tcp_cksum || self.rx_udp_cksum
    }

    fn any_tx(&self) -> bool {
        self.tx_ipv4_cksum || self.tx_tcp_cksum || self.tx_udp_cksum
    }

    /// What smoltcp must still compute/verify itself.
    fn smoltcp_checksums(&self) -> ChecksumCapabilities {
        let mut c = ChecksumCapabilities::default();
        c.ipv4 = checksum_left(self.rx_ipv4_cksum, self.tx_ipv4_cksum);
        c.tcp = checksum_left(self.rx_tcp_cksum, self.tx_tcp_cksum);
        c.udp = checksum_left(self.rx_udp_cksum, self.tx_udp_cksum);
        c.icmpv4 = Checksum::Both;
        c.icmpv6 = Checksum::Both;
        c
    }
}

/// smoltcp's share of a checksum given what the NIC does.
fn checksum_left(rx_offloaded: bool, tx_offloaded: bool) -> Checksum {
    match (rx_offloaded, tx_offloaded) {
        (false, false) => Checksum::Both,
        (true, false) => Checksum::Tx,
        (false, true) => Checksum::Rx,
        (true, true) => Checksum::None,
    }
}

/// Port counters from `rte_eth_stats_get`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub ipackets: u64,
    pub opackets: u64,
    pub ibytes: u64,
    pub obytes: u64,
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
    pub rx_nombuf: u64,
}

/// Ports open in this process: opening one twice would reconfigure it under its first owner's
/// queues. A control-path lock (open/drop only).
static OPEN_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
/// Makes mempool names unique across re-opens.
static POOL_SEQ: AtomicU32 = AtomicU32::new(0);

/// What [`DpdkPort`] and its queues share; the last one dropped stops and closes the port.
struct PortShared {
    port_id: u16,
    pool: *mut sys::rte_mempool,
    configured: bool,
    started: bool,
    /// One flag per queue: owned by a live [`DpdkQueue`].
    taken: Box<[AtomicBool]>,
}

// SAFETY: the mempool is a multi-producer/multi-consumer ring (safe from any thread) and the
// ethdev control calls made through it (stop/close in Drop) run once, from whichever thread drops
// the last reference; nothing else in PortShared is thread-affine.
unsafe impl Send for PortShared {}
// SAFETY: shared access only reads `port_id`/`pool` and flips atomics.
unsafe impl Sync for PortShared {}

impl Drop for PortShared {
    fn drop(&mut self) {
        if self.started {
            // SAFETY: the port was started by us; every DpdkQueue is gone (they hold this Arc),
            // so no thread is bursting on it.
            let rc = unsafe { sys::rte_eth_dev_stop(self.port_id) };
            if rc < 0 {
                log::warn!("DPDK port {}: stop: {}", self.port_id, strerror(-rc));
            }
        }
        if self.configured {
            // SAFETY: stopped above; closing releases the queues and the mbufs they hold, which
            // must happen before the mempool is freed below.
            let rc = unsafe { sys::rte_eth_dev_close(self.port_id) };
            if rc < 0 {
                log::warn!("DPDK port {}: close: {}", self.port_id, strerror(-rc));
            }
        }
        if !self.pool.is_null() {
            // SAFETY: the pool was created by us; the port that used it is closed and every
            // queue freed the mbufs it held.
            unsafe { sys::rte_mempool_free(self.pool) };
        }
        let mut open = OPEN_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = open.as_mut() {
            set.remove(&self.port_id);
        }
    }
}

/// A configured and started DPDK port.
pub struct DpdkPort {
    shared: Arc<PortShared>,
    name: String,
    queues: u16,
    mtu: u16,
    mac: [u8; 6],
    offloads: Offloads,
}

impl fmt::Debug for DpdkPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpdkPort")
            .field("port_id", &self.shared.port_id)
            .field("name", &self.name)
            .field("queues", &self.queues)
            .field("mtu", &self.mtu)
            .field("mac", &format_mac(&self.mac))
            .field("offloads", &self.offloads)
            .finish()
    }
}

impl DpdkPort {
    /// Opens the port `port_id_or_name` (a port id such as "0", or an ethdev name such as
    /// "net_tap0" or "0000:3b:00.0"), with `queues` RX/TX queue pairs, one mempool of `mbufs`
    /// mbufs on the port's NUMA socket and the given IP `mtu`, and starts it.
    ///
    /// Bad arguments are refused before the device is touched. If a DPDK call fails after the
    /// device was configured, the port is closed (for vdevs such as net_tap DPDK then releases
    /// it, and it cannot be opened again in this process).
    pub fn open(
        port_id_or_name: &str,
        queues: u16,
        mbufs: u32,
        mtu: u16,
    ) -> Result<DpdkPort, DpdkError> {
        if !eal_ready() {
            return Err(DpdkError::EalNotInitialized);
        }
        let port_id = find_port(port_id_or_name)?;
        {
            let mut open = OPEN_PORTS.lock().unwrap_or_else(|e| e.into_inner());
            if !open.get_or_insert_with(HashSet::new).insert(port_id) {
                return Err(DpdkError::PortBusy(port_id));
            }
        }
        // From here on, dropping `shared` undoes whatever was done (see PortShared::drop).
        let mut shared = PortShared {
            port_id,
            pool: std::ptr::null_mut(),
            configured: false,
            started: false,
            taken: Box::new([]),
        };

        // SAFETY: rte_eth_dev_info is plain data (integers and pointers), valid when zeroed.
        let mut info: sys::rte_eth_dev_info = unsafe { std::mem::zeroed() };
        // SAFETY: valid port id, `info` is a writable rte_eth_dev_info.
        check("rte_eth_dev_info_get", unsafe {
            sys::rte_eth_dev_info_get(port_id, &mut info)
        })?;
        let max_queues = info.max_rx_queues.min(info.max_tx_queues);
        if queues == 0 || queues > max_queues {
            return Err(DpdkError::InvalidQueueCount {
                requested: queues,
                max: max_queues,
            });
        }
        let data_room = data_room_for(mtu);
        let max_mtu = device_max_mtu(&info).min(max_mtu_for_mbuf());
        if mtu < info.min_mtu.max(68) || mtu > max_mtu || data_room.is_none() {
            return Err(DpdkError::InvalidMtu {
                mtu,
                min: info.min_mtu.max(68),
                max: max_mtu,
            });
        }
        let data_room = data_room.unwrap_or(u16::MAX);

        let (mut nb_rxd, mut nb_txd) = (RING_DESC, RING_DESC);
        // SAFETY: valid port (the limits come from dev_info); both pointers are writable u16s.
        check("rte_eth_dev_adjust_nb_rx_tx_desc", unsafe {
            sys::rte_eth_dev_adjust_nb_rx_tx_desc(port_id, &mut nb_rxd, &mut nb_txd)
        })?;
        let cache = if mbufs >= 4 * POOL_CACHE {
            POOL_CACHE
        } else {
            0
        };
        let needed = mbufs_needed(queues, nb_rxd, nb_txd, cache);
        if mbufs < needed {
            return Err(DpdkError::TooFewMbufs {
                requested: mbufs,
                needed,
            });
        }

        let offloads = choose_offloads(&info, queues);
        // SAFETY: rte_eth_conf is plain data; all-zero is DPDK's documented default.
        let mut conf: sys::rte_eth_conf = unsafe { std::mem::zeroed() };
        conf.rxmode.mtu = u32::from(mtu);
        conf.rxmode.offloads = rx_offload_bits(&offloads);
        conf.txmode.offloads = tx_offload_bits(&offloads);
        let key_len = if info.hash_key_size == 0 {
            40
        } else {
            info.hash_key_size
        };
        let mut rss_key = symmetric_rss_key(usize::from(key_len));
        if offloads.rss {
            conf.rxmode.mq_mode = sys::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_key = rss_key.as_mut_ptr();
            conf.rx_adv_conf.rss_conf.rss_key_len = key_len;
            conf.rx_adv_conf.rss_conf.rss_hf =
                (sys::RTE_ETH_RSS_IP | sys::RTE_ETH_RSS_TCP) & info.flow_type_rss_offloads;
        }
        // SAFETY: valid port, not started; `conf` (and the RSS key it points to) outlive the
        // call, which copies them.
        check("rte_eth_dev_configure", unsafe {
            sys::rte_eth_dev_configure(port_id, queues, queues, &conf)
        })?;
        shared.configured = true;

        // SAFETY: valid port id; returns a socket id or SOCKET_ID_ANY (-1).
        let socket = unsafe { sys::rte_eth_dev_socket_id(port_id) };
        let pool_name = format!("isc{port_id}_{}", POOL_SEQ.fetch_add(1, Ordering::Relaxed));
        let c_name = CString::new(pool_name).expect("formatted without NUL");
        // SAFETY: NUL-terminated name shorter than RTE_MEMPOOL_NAMESIZE; sizes checked above.
        shared.pool = unsafe {
            sys::rte_pktmbuf_pool_create(c_name.as_ptr(), mbufs, cache, 0, data_room, socket)
        };
        if shared.pool.is_null() {
            return Err(DpdkError::Call {
                op: "rte_pktmbuf_pool_create",
                errno: rte_errno(),
            });
        }
        // rte_eth_*_queue_setup take the socket as unsigned: SOCKET_ID_ANY wraps as in C.
        let queue_socket = socket as u32;
        for q in 0..queues {
            // SAFETY: configured port, q < queues, default rxconf (NULL), pool is live.
            check("rte_eth_rx_queue_setup", unsafe {
                sys::rte_eth_rx_queue_setup(
                    port_id,
                    q,
                    nb_rxd,
                    queue_socket,
                    std::ptr::null(),
                    shared.pool,
                )
            })?;
            // SAFETY: as above, default txconf (NULL).
            check("rte_eth_tx_queue_setup", unsafe {
                sys::rte_eth_tx_queue_setup(port_id, q, nb_txd, queue_socket, std::ptr::null())
            })?;
        }
        // SAFETY: configured port. Some PMDs take the MTU only from rxmode.mtu.
        let rc = unsafe { sys::rte_eth_dev_set_mtu(port_id, mtu) };
        if rc < 0 && rc != -libc::ENOTSUP {
            return Err(DpdkError::Call {
                op: "rte_eth_dev_set_mtu",
                errno: -rc,
            });
        }
        // SAFETY: configured port with all queues set up.
        check("rte_eth_dev_start", unsafe {
            sys::rte_eth_dev_start(port_id)
        })?;
        shared.started = true;

        let mut addr = sys::rte_ether_addr::default();
        // SAFETY: valid port, `addr` is writable.
        check("rte_eth_macaddr_get", unsafe {
            sys::rte_eth_macaddr_get(port_id, &mut addr)
        })?;
        shared.taken = (0..queues).map(|_| AtomicBool::new(false)).collect();

        let port = DpdkPort {
            shared: Arc::new(shared),
            name: port_name(port_id).unwrap_or_else(|| port_id_or_name.to_owned()),
            queues,
            mtu,
            mac: addr.addr_bytes,
            offloads,
        };
        log::info!(
            "DPDK port {} ({}): {} queue(s), {} mbufs, MTU {}, MAC {}, link {}, offloads {:?}",
            port_id,
            port.name,
            queues,
            mbufs,
            mtu,
            format_mac(&port.mac),
            if port.link_up() { "up" } else { "down" },
            offloads
        );
        Ok(port)
    }

    /// Takes queue pair `q` for one reactor. Each queue can be owned by one [`DpdkQueue`] at a
    /// time (DPDK's bursts are not thread-safe per queue); dropping it makes `q` available again.
    pub fn queue(&self, q: u16) -> Result<DpdkQueue, DpdkError> {
        let flag = self
            .shared
            .taken
            .get(usize::from(q))
            .ok_or(DpdkError::QueueOutOfRange {
                queue: q,
                queues: self.queues,
            })?;
        if flag.swap(true, Ordering::AcqRel) {
            return Err(DpdkError::QueueTaken(q));
        }
        Ok(DpdkQueue {
            rx: RxRing {
                port_id: self.shared.port_id,
                queue_id: q,
                offloads: self.offloads,
                bufs: [std::ptr::null_mut(); BURST],
                head: 0,
                len: 0,
                stats: QueueStats::default(),
            },
            tx: TxBatch {
                port_id: self.shared.port_id,
                queue_id: q,
                pool: self.shared.pool,
                offloads: self.offloads,
                bufs: [std::ptr::null_mut(); BURST],
                lens: [0; BURST],
                len: 0,
                refused: 0,
                scratch: vec![0; usize::from(self.mtu) + ETH_HDR],
                stats: QueueStats::default(),
            },
            mtu: self.mtu,
            shared: Arc::clone(&self.shared),
        })
    }

    /// The DPDK port id.
    pub fn port_id(&self) -> u16 {
        self.shared.port_id
    }

    /// The ethdev name (e.g. "net_tap0").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port's own MAC address (promiscuous mode stays off).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The IP MTU the port was opened with.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Number of RX/TX queue pairs.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Offloads that were enabled.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// The link status now (`rte_eth_link_get_nowait`); false if it cannot be read.
    pub fn link_up(&self) -> bool {
        let mut link = sys::rte_eth_link::default();
        // SAFETY: started port; `link` is writable.
        let rc = unsafe { sys::rte_eth_link_get_nowait(self.shared.port_id, &mut link) };
        rc == 0 && u32::from(link.link_status()) == sys::RTE_ETH_LINK_UP
    }

    /// The port's counters (all zero if DPDK cannot read them).
    pub fn stats(&self) -> PortStats {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: valid port; `s` is writable.
        if unsafe { sys::rte_eth_stats_get(self.shared.port_id, &mut s) } != 0 {
            return PortStats::default();
        }
        PortStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        }
    }
}

/// A port id ("0") that exists, else a device name known to ethdev.
fn find_port(port_id_or_name: &str) -> Result<u16, DpdkError> {
    let not_found = || DpdkError::PortNotFound(port_id_or_name.to_owned());
    if let Ok(id) = port_id_or_name.parse::<u16>() {
        // SAFETY: any u16 may be asked about.
        if unsafe { sys::rte_eth_dev_is_valid_port(id) } == 1 {
            return Ok(id);
        }
    }
    let name = CString::new(port_id_or_name).map_err(|_| not_found())?;
    let mut id = 0u16;
    // SAFETY: NUL-terminated name; `id` is writable.
    let rc = unsafe { sys::rte_eth_dev_get_port_by_name(name.as_ptr(), &mut id) };
    if rc == 0 {
        Ok(id)
    } else {
        Err(not_found())
    }
}

fn port_name(port_id: u16) -> Option<String> {
    let mut buf = [0 as c_char; sys::RTE_ETH_NAME_MAX_LEN as usize];
    // SAFETY: the buffer has RTE_ETH_NAME_MAX_LEN bytes, as the API requires.
    if unsafe { sys::rte_eth_dev_get_name_by_port(port_id, buf.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: DPDK wrote a NUL-terminated name into the buffer.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The largest MTU `rte_eth_dev_configure` accepts: `max_mtu`, and `max_rx_pktlen` less the L2
/// overhead computed as ethdev does (`eth_dev_get_overhead_len`).
fn device_max_mtu(info: &sys::rte_eth_dev_info) -> u16 {
    let overhead = if info.max_mtu != u16::MAX && info.max_rx_pktlen > u32::from(info.max_mtu) {
        info.max_rx_pktlen - u32::from(info.max_mtu)
    } else {
        14 + 4 // Ethernet header + CRC
    };
    let by_pktlen = info.max_rx_pktlen.saturating_sub(overhead);
    info.max_mtu
        .min(u16::try_from(by_pktlen).unwrap_or(u16::MAX))
}

/// Offloads to enable: each only if the device offers it.
fn choose_offloads(info: &sys::rte_eth_dev_info, queues: u16) -> Offloads {
    let rx = info.rx_offload_capa;
    let tx = info.tx_offload_capa;
    Offloads {
        rx_ipv4_cksum: rx & sys::RTE_ETH_RX_OFFLOAD_IPV4_CKSUM != 0,
        rx_tcp_cksum: rx & sys::RTE_ETH_RX_OFFLOAD_TCP_CKSUM != 0,
        rx_udp_cksum: rx & sys::RTE_ETH_RX_OFFLOAD_UDP_CKSUM != 0,
        tx_ipv4_cksum: tx & sys::RTE_ETH_TX_OFFLOAD_IPV4_CKSUM != 0,
        tx_tcp_cksum: tx & sys::RTE_ETH_TX_OFFLOAD_TCP_CKSUM != 0,
        tx_udp_cksum: tx & sys::RTE_ETH_TX_OFFLOAD_UDP_CKSUM != 0,
        tso: tx & sys::RTE_ETH_TX_OFFLOAD_TCP_TSO != 0,
        mbuf_fast_free: tx & sys::RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE != 0,
        rss: queues > 1
            && info.flow_type_rss_offloads & (sys::RTE_ETH_RSS_IP | sys::RTE_ETH_RSS_TCP) != 0,
    }
}

fn rx_offload_bits(o: &Offloads) -> u64 {
    let mut bits = 0;
    if o.rx_ipv4_cksum {
        bits |= sys::RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
    }
    if o.rx_tcp_cksum {
        bits |= sys::RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
    }
    if o.rx_udp_cksum {
        bits |= sys::RTE_ETH_RX_OFFLOAD_UDP_CKSUM;
    }
    bits
}

fn tx_offload_bits(o: &Offloads) -> u64 {
    let mut bits = 0;
    if o.tx_ipv4_cksum {
        bits |= sys::RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
    }
    if o.tx_tcp_cksum {
        bits |= sys::RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
    }
    if o.tx_udp_cksum {
        bits |= sys::RTE_ETH_TX_OFFLOAD_UDP_CKSUM;
    }
    if o.tso {
        bits |= sys::RTE_ETH_TX_OFFLOAD_TCP_TSO;
    }
    if o.mbuf_fast_free {
        bits |= sys::RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE;
    }
    bits
}

fn symmetric_rss_key(len: usize) -> Vec<u8> {
    RSS_KEY_WORD.iter().copied().cycle().take(len).collect()
}

/// Frame bytes an RX buffer must hold for `mtu`: Ethernet header, one VLAN tag and the CRC
/// (some NICs DMA it), rounded up to a cache line.
fn rx_frame_room(mtu: u16) -> u32 {
    (u32::from(mtu) + 14 + 4 + 4).next_multiple_of(64)
}

/// mbuf data room (headroom + frame room, at least DPDK's default) for `mtu`, if it fits a u16.
fn data_room_for(mtu: u16) -> Option<u16> {
    let frame = rx_frame_room(mtu).max(sys::RTE_MBUF_DEFAULT_DATAROOM);
    u16::try_from(sys::RTE_PKTMBUF_HEADROOM + frame).ok()
}

/// The largest MTU whose frames fit one mbuf (we do not do scattered RX).
fn max_mtu_for_mbuf() -> u16 {
    let room = u32::from(u16::MAX) - sys::RTE_PKTMBUF_HEADROOM;
    // The largest multiple of 64 in `room`, less the header/tag/CRC allowance of rx_frame_room.
    let max = (room / 64 * 64).saturating_sub(22);
    u16::try_from(max).unwrap_or(u16::MAX)
}

/// mbufs the rings, the per-queue bursts and the lcore cache can hold at once.
fn mbufs_needed(queues: u16, nb_rxd: u16, nb_txd: u16, cache: u32) -> u32 {
    let per_queue = u32::from(nb_rxd) + u32::from(nb_txd) + 2 * BURST as u32;
    u32::from(queues) * per_queue + cache * 3 / 2
}

fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

// ---------------------------------------------------------------------------------------------
// Queue

/// Per-queue counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames handed to smoltcp.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames dropped on receive: bad checksum, or scattered over several mbufs.
    pub rx_dropped: u64,
    /// Frames the NIC took.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames dropped on transmit: no mbuf, refused twice by the NIC, or refused by tx_prepare.
    pub tx_dropped: u64,
}

/// One mbuf owned by Rust; freed on drop.
struct Mbuf(NonNull<sys::rte_mbuf>);

impl Mbuf {
    fn into_raw(self) -> *mut sys::rte_mbuf {
        let p = self.0.as_ptr();
        std::mem::forget(self);
        p
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf (from rx burst or alloc, not yet given to the NIC).
        unsafe { sys::dpdk_sys_pktmbuf_free(self.0.as_ptr()) }
    }
}

struct RxRing {
    port_id: u16,
    queue_id: u16,
    offloads: Offloads,
    /// bufs[head..len] are received and not yet handed out.
    bufs: [*mut sys::rte_mbuf; BURST],
    head: usize,
    len: usize,
    stats: QueueStats,
}

impl RxRing {
    /// The next acceptable frame, bursting from the NIC when the local batch is empty.
    fn next(&mut self) -> Option<Mbuf> {
        loop {
            if self.head == self.len {
                // SAFETY: started port, this queue is owned by this thread (DpdkQueue is not
                // Sync and is the only owner of queue_id), room for BURST pointers.
                let n = unsafe {
                    sys::dpdk_sys_rx_burst(
                        self.port_id,
                        self.queue_id,
                        self.bufs.as_mut_ptr(),
                        BURST as u16,
                    )
                };
                self.head = 0;
                self.len = usize::from(n).min(BURST);
                if self.len == 0 {
                    return None;
                }
            }
            let raw = self.bufs[self.head];
            self.head += 1;
            let Some(ptr) = NonNull::new(raw) else {
                continue;
            };
            let m = Mbuf(ptr);
            let p = m.0.as_ptr();
            // SAFETY: `p` is a valid mbuf that we own.
            let (segs, data_len, pkt_len) = unsafe {
                (
                    sys::dpdk_sys_pktmbuf_nb_segs(p),
                    sys::dpdk_sys_pktmbuf_data_len(p),
                    sys::dpdk_sys_pktmbuf_pkt_len(p),
                )
            };
            if segs != 1 || u32::from(data_len) != pkt_len {
                self.stats.rx_dropped += 1;
                continue;
            }
            if self.offloads.any_rx() {
                // SAFETY: as above.
                let flags = unsafe { sys::dpdk_sys_pktmbuf_ol_flags(p) };
                // SAFETY: data_len bytes from the data pointer are the received frame.
                let frame = unsafe { mbuf_bytes(p, data_len) };
                if !rx_checksums_ok(frame, flags, &self.offloads) {
                    self.stats.rx_dropped += 1;
                    continue;
                }
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += u64::from(data_len);
            return Some(m);
        }
    }
}

/// The `len` data bytes of mbuf `p`.
///
/// # Safety
/// `p` is a live single-segment mbuf owned by the caller with at least `len` data bytes, and no
/// mutable alias of them exists for the returned lifetime.
unsafe fn mbuf_bytes<'a>(p: *mut sys::rte_mbuf, len: u16) -> &'a [u8] {
    let data = sys::dpdk_sys_pktmbuf_mtod(p).cast::<u8>();
    if data.is_null() || len == 0 {
        return &[];
    }
    std::slice::from_raw_parts(data, usize::from(len))
}

struct TxBatch {
    port_id: u16,
    queue_id: u16,
    pool: *mut sys::rte_mempool,
    offloads: Offloads,
    /// bufs[..len] wait for the NIC; the first `refused` of them were refused once already.
    bufs: [*mut sys::rte_mbuf; BURST],
    lens: [u16; BURST],
    len: usize,
    refused: usize,
    /// Where smoltcp writes a frame that cannot get an mbuf (it is then dropped and counted).
    scratch: Vec<u8>,
    stats: QueueStats,
}

impl TxBatch {
    fn alloc(&mut self) -> Option<Mbuf> {
        // SAFETY: the pool is live as long as the port (held through DpdkQueue::shared).
        NonNull::new(unsafe { sys::dpdk_sys_pktmbuf_alloc(self.pool) }).map(Mbuf)
    }

    /// Offers the batch to the NIC. What it refuses stays for the next flush; what it refuses a
    /// second time is freed and counted in `tx_dropped`.
    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: started port, queue owned by this thread, bufs[..len] are mbufs we own.
        let sent = unsafe {
            sys::dpdk_sys_tx_burst(
                self.port_id,
                self.queue_id,
                self.bufs.as_mut_ptr(),
                self.len as u16,
            )
        };
        let sent = usize::from(sent).min(self.len);
        self.stats.tx_packets += sent as u64;
        self.stats.tx_bytes += self.lens[..sent].iter().map(|&l| u64::from(l)).sum::<u64>();
        let keep_from = sent.max(self.refused.min(self.len));
        for &m in &self.bufs[sent..keep_from] {
            // SAFETY: refused twice by the NIC, still ours.
            unsafe { sys::dpdk_sys_pktmbuf_free(m) };
            self.stats.tx_dropped += 1;
        }
        self.bufs.copy_within(keep_from..self.len, 0);
        self.lens.copy_within(keep_from..self.len, 0);
        self.len -= keep_from;
        self.refused = self.len;
    }

    /// Queues a written frame, flushing when the batch is full.
    fn push(&mut self, m: Mbuf, len: u16) {
        if self.len == BURST {
            self.flush();
            if self.len == BURST {
                // Everything was refused once: a second flush sends or frees them all.
                self.flush();
            }
        }
        self.bufs[self.len] = m.into_raw();
        self.lens[self.len] = len;
        self.len += 1;
        if self.len == BURST {
            self.flush();
        }
    }

    /// Writes a frame of `len` bytes with `f` straight into an mbuf (`pre` if given, else a new
    /// one) and queues it; without an mbuf the frame goes to scratch and is dropped.
    fn send<R, F>(&mut self, pre: Option<Mbuf>, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let m = pre.or_else(|| self.alloc());
        let data = match (m.as_ref(), u16::try_from(len)) {
            // SAFETY: we own the fresh mbuf; append fails (NULL) when tailroom < len.
            (Some(m), Ok(l16)) => unsafe { sys::dpdk_sys_pktmbuf_append(m.0.as_ptr(), l16) },
            _ => std::ptr::null_mut(),
        };
        let (Some(m), false) = (m, data.is_null()) else {
            self.stats.tx_dropped += 1;
            if self.scratch.len() < len {
                self.scratch.resize(len, 0);
            }
            return f(&mut self.scratch[..len]);
        };
        // SAFETY: append reserved `len` bytes at `data` inside the mbuf's data room, which only
        // we reference; the memory comes from the EAL heap (initialised bytes).
        let buf = unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), len) };
        let r = f(buf);
        if self.offloads.any_tx() {
            if let Some((flags, l2, l3)) = tx_offload_plan(buf, &self.offloads) {
                let mut p = m.0.as_ptr();
                // SAFETY: our mbuf; then tx_prepare on one packet of this queue, which may
                // rewrite header fields (pseudo-header checksum) in place.
                let ok = unsafe {
                    sys::dpdk_sys_pktmbuf_set_tx_offload(p, flags, l2, l3);
                    sys::dpdk_sys_tx_prepare(self.port_id, self.queue_id, &mut p, 1)
                };
                if ok != 1 {
                    self.stats.tx_dropped += 1;
                    return r; // `m` is freed here
                }
            }
        }
        self.push(m, len as u16);
        r
    }
}

/// RX checksum verdict for a frame the NIC flagged with `flags`: BAD drops it; UNKNOWN for a
/// checksum that smoltcp was told to skip is verified here.
fn rx_checksums_ok(frame: &[u8], flags: u64, o: &Offloads) -> bool {
    let ip = flags & sys::RTE_MBUF_F_RX_IP_CKSUM_MASK;
    let l4 = flags & sys::RTE_MBUF_F_RX_L4_CKSUM_MASK;
    if (o.rx_ipv4_cksum && ip == sys::RTE_MBUF_F_RX_IP_CKSUM_BAD)
        || ((o.rx_tcp_cksum || o.rx_udp_cksum) && l4 == sys::RTE_MBUF_F_RX_L4_CKSUM_BAD)
    {
        return false;
    }
    let check_ip = o.rx_ipv4_cksum && ip == sys::RTE_MBUF_F_RX_IP_CKSUM_UNKNOWN;
    let check_l4 = (o.rx_tcp_cksum || o.rx_udp_cksum) && l4 == sys::RTE_MBUF_F_RX_L4_CKSUM_UNKNOWN;
    if !(check_ip || check_l4) {
        return true;
    }
    verify_in_software(frame, o, check_ip, check_l4)
}

/// Verifies the checksums smoltcp will not; frames it cannot parse are left to smoltcp, which
/// rejects malformed headers itself.
fn verify_in_software(frame: &[u8], o: &Offloads, check_ip: bool, check_l4: bool) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return true;
    };
    let (src, dst, proto, payload) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return true;
            };
            if check_ip && !ip.verify_checksum() {
                return false;
            }
            if ip.more_frags() || ip.frag_offset() != 0 {
                return true; // not reassembled by our smoltcp build: dropped there
            }
            let (s, d) = (
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
            );
            (s, d, ip.next_header(), ip.payload())
        }
        EthernetProtocol::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
                return true;
            };
            let (s, d) = (
                IpAddress::Ipv6(ip.src_addr()),
                IpAddress::Ipv6(ip.dst_addr()),
            );
            (s, d, ip.next_header(), ip.payload())
        }
        _ => return true,
    };
    if !check_l4 {
        return true;
    }
    match proto {
        IpProtocol::Tcp if o.rx_tcp_cksum => {
            TcpPacket::new_checked(payload).map_or(true, |t| t.verify_checksum(&src, &dst))
        }
        IpProtocol::Udp if o.rx_udp_cksum => {
            // A zero UDP checksum over IPv4 means "none" (smoltcp accepts it too).
            UdpPacket::new_checked(payload).map_or(true, |u| u.verify_checksum(&src, &dst))
        }
        _ => true,
    }
}

/// TX offload metadata (`ol_flags`, l2_len, l3_len) for a frame smoltcp wrote, or None when it
/// needs none. smoltcp skipped exactly the checksums that are offloaded.
fn tx_offload_plan(frame: &[u8], o: &Offloads) -> Option<(u64, u16, u16)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (mut flags, l3_len, proto) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let mut flags = sys::RTE_MBUF_F_TX_IPV4;
            if o.tx_ipv4_cksum {
                flags |= sys::RTE_MBUF_F_TX_IP_CKSUM;
            }
            let fragment = ip.more_frags() || ip.frag_offset() != 0;
            let proto = if fragment {
                None
            } else {
                Some(ip.next_header())
            };
            (flags, u16::from(ip.header_len()), proto)
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            (sys::RTE_MBUF_F_TX_IPV6, 40, Some(ip.next_header()))
        }
        _ => return None,
    };
    match proto {
        Some(IpProtocol::Tcp) if o.tx_tcp_cksum => flags |= sys::RTE_MBUF_F_TX_TCP_CKSUM,
        Some(IpProtocol::Udp) if o.tx_udp_cksum => flags |= sys::RTE_MBUF_F_TX_UDP_CKSUM,
        _ => {}
    }
    let wants = sys::RTE_MBUF_F_TX_IP_CKSUM | sys::RTE_MBUF_F_TX_L4_MASK;
    (flags & wants != 0).then_some((flags, ETH_HDR as u16, l3_len))
}

/// One RX/TX queue pair of a [`DpdkPort`], driven by one reactor thread.
pub struct DpdkQueue {
    rx: RxRing,
    tx: TxBatch,
    mtu: u16,
    /// Keeps the port (and the mempool) alive; declared last so it drops after our mbufs.
    shared: Arc<PortShared>,
}

// SAFETY: the raw pointers are mbufs this queue owns exclusively and the port's mempool
// (thread-safe ring). DPDK requires a queue to be used by one thread at a time, which `&mut self`
// on every data-path method guarantees (DpdkQueue is not Sync and cannot be cloned).
unsafe impl Send for DpdkQueue {}

impl fmt::Debug for DpdkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpdkQueue")
            .field("port_id", &self.rx.port_id)
            .field("queue_id", &self.rx.queue_id)
            .field("stats", &self.stats())
            .finish()
    }
}

impl DpdkQueue {
    /// The DPDK port id.
    pub fn port_id(&self) -> u16 {
        self.rx.port_id
    }

    /// This queue pair's index on the port.
    pub fn queue_id(&self) -> u16 {
        self.rx.queue_id
    }

    /// Sends the queued TX batch. Call after every smoltcp poll.
    pub fn flush_tx(&mut self) {
        self.tx.flush();
    }

    /// Counters of this queue.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            rx_packets: self.rx.stats.rx_packets,
            rx_bytes: self.rx.stats.rx_bytes,
            rx_dropped: self.rx.stats.rx_dropped,
            tx_packets: self.tx.stats.tx_packets,
            tx_bytes: self.tx.stats.tx_bytes,
            tx_dropped: self.tx.stats.tx_dropped,
        }
    }
}

impl Drop for DpdkQueue {
    fn drop(&mut self) {
        self.tx.flush();
        for &m in self.tx.bufs[..self.tx.len]
            .iter()
            .chain(&self.rx.bufs[self.rx.head..self.rx.len])
        {
            if !m.is_null() {
                // SAFETY: mbufs still owned by this queue (not handed to the NIC or smoltcp).
                unsafe { sys::dpdk_sys_pktmbuf_free(m) };
            }
        }
        self.tx.len = 0;
        self.rx.head = self.rx.len;
        if let Some(flag) = self.shared.taken.get(usize::from(self.rx.queue_id)) {
            flag.store(false, Ordering::Release);
        }
    }
}

/// A received frame; the mbuf is freed once consumed (or dropped).
pub struct DpdkRxToken {
    mbuf: Mbuf,
}

impl smoltcp::phy::RxToken for DpdkRxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let p = self.mbuf.0.as_ptr();
        // SAFETY: we own this single-segment mbuf (checked in RxRing::next); the slice does
        // not outlive `self`, which frees the mbuf when it drops after `f` returns.
        let frame = unsafe { mbuf_bytes(p, sys::dpdk_sys_pktmbuf_data_len(p)) };
        f(frame)
    }
}

/// Permission to send one frame, written straight into an mbuf.
pub struct DpdkTxToken<'a> {
    tx: &'a mut TxBatch,
    /// Allocated by `transmit` (so that an empty pool shows as "no token"); `None` for the token
    /// paired with a received frame, which allocates when consumed.
    mbuf: Option<Mbuf>,
}

impl smoltcp::phy::TxToken for DpdkTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.tx.send(self.mbuf, len, f)
    }
}

impl Device for DpdkQueue {
    type RxToken<'a> = DpdkRxToken;
    type TxToken<'a> = DpdkTxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let mbuf = self.rx.next()?;
        Some((
            DpdkRxToken { mbuf },
            DpdkTxToken {
                tx: &mut self.tx,
                mbuf: None,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let mbuf = self.tx.alloc()?;
        Some(DpdkTxToken {
            tx: &mut self.tx,
            mbuf: Some(mbuf),
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(self.mtu) + ETH_HDR;
        caps.max_burst_size = Some(BURST);
        caps.checksum = self.rx.offloads.smoltcp_checksums();
        caps
    }
}

impl crate::net::stack::Phy for DpdkQueue {
    /// DPDK queues have no fd: the reactor polls them (at least every millisecond when idle).
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn flush(&mut self) {
        self.flush_tx();
    }

    fn describe(&self) -> String {
        format!("dpdk port {} queue {}", self.port_id(), self.queue_id())
    }

    fn counters(&self) -> String {
        let q = self.stats();
        format!(
            "queue: rx {} packets {} bytes {} dropped, tx {} packets {} bytes {} dropped",
            q.rx_packets, q.rx_bytes, q.rx_dropped, q.tx_packets, q.tx_bytes, q.tx_dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::phy::{RxToken as _, TxToken as _};
    use smoltcp::socket::tcp;
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetRepr, IpCidr, Ipv4Address,
        Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber,
    };

    const ALL_CKSUM: Offloads = Offloads {
        rx_ipv4_cksum: true,
        rx_tcp_cksum: true,
        rx_udp_cksum: true,
        tx_ipv4_cksum: true,
        tx_tcp_cksum: true,
        tx_udp_cksum: true,
        tso: false,
        rss: false,
        mbuf_fast_free: false,
    };

    /// A TCP SYN in Ethernet/IPv4 with every checksum filled in.
    fn tcp_frame() -> Vec<u8> {
        let src = Ipv4Address::new(10, 0, 0, 1);
        let dst = Ipv4Address::new(10, 0, 0, 2);
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: 3260,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(7),
            ack_number: None,
            window_len: 1024,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut frame);
        let mut ipp = Ipv4Packet::new_unchecked(frame.payload_mut());
        ip.emit(&mut ipp, &caps);
        let mut tcpp = TcpPacket::new_unchecked(ipp.payload_mut());
        tcp.emit(&mut tcpp, &src.into(), &dst.into(), &caps);
        buf
    }

    #[test]
    fn rss_key_is_symmetric_pattern() {
        let k = symmetric_rss_key(40);
        assert_eq!(k.len(), 40);
        assert!(k.chunks(2).all(|w| w == [0x6d, 0x5a]));
        assert_eq!(symmetric_rss_key(51).len(), 51);
    }

    #[test]
    fn smoltcp_computes_what_is_not_offloaded() {
        assert!(matches!(checksum_left(false, false), Checksum::Both));
        assert!(matches!(checksum_left(true, false), Checksum::Tx));
        assert!(matches!(checksum_left(false, true), Checksum::Rx));
        assert!(matches!(checksum_left(true, true), Checksum::None));
        let c = ALL_CKSUM.smoltcp_checksums();
        assert!(matches!(c.icmpv4, Checksum::Both));
        assert!(matches!(c.tcp, Checksum::None));
    }

    #[test]
    fn mbuf_sizing() {
        assert_eq!(data_room_for(1500), Some(128 + 2048));
        assert_eq!(data_room_for(9000), Some(128 + 9024));
        let max = max_mtu_for_mbuf();
        assert!(data_room_for(max).is_some());
        assert!(data_room_for(max + 64).is_none());
        assert_eq!(mbufs_needed(2, 1024, 1024, 256), 2 * (2048 + 64) + 384);
    }

    #[test]
    fn tx_plan_for_tcp_ipv4() {
        let f = tcp_frame();
        let (flags, l2, l3) = tx_offload_plan(&f, &ALL_CKSUM).expect("offloaded");
        assert_eq!((l2, l3), (14, 20));
        let want =
            sys::RTE_MBUF_F_TX_IPV4 | sys::RTE_MBUF_F_TX_IP_CKSUM | sys::RTE_MBUF_F_TX_TCP_CKSUM;
        assert_eq!(flags, want);
        assert_eq!(tx_offload_plan(&f, &Offloads::default()), None);
        let only_ip = Offloads {
            tx_ipv4_cksum: true,
            ..Offloads::default()
        };
        let (flags, _, _) = tx_offload_plan(&f, &only_ip).expect("ip offloaded");
        assert_eq!(flags & sys::RTE_MBUF_F_TX_L4_MASK, 0);
        // Garbage and truncated frames get no metadata, and never panic.
        assert_eq!(tx_offload_plan(&[0xff; 7], &ALL_CKSUM), None);
        assert_eq!(tx_offload_plan(&f[..30], &ALL_CKSUM), None);
    }

    #[test]
    fn rx_checksums_verified_when_nic_does_not_know() {
        let good = tcp_frame();
        let unknown = sys::RTE_MBUF_F_RX_IP_CKSUM_UNKNOWN | sys::RTE_MBUF_F_RX_L4_CKSUM_UNKNOWN;
        assert!(rx_checksums_ok(&good, unknown, &ALL_CKSUM));
        let mut bad_l4 = good.clone();
        let last = bad_l4.len() - 1;
        bad_l4[last] ^= 0x55; // inside the TCP options
        assert!(!rx_checksums_ok(&bad_l4, unknown, &ALL_CKSUM));
        let good_flags = sys::RTE_MBUF_F_RX_IP_CKSUM_GOOD | sys::RTE_MBUF_F_RX_L4_CKSUM_GOOD;
        assert!(
            rx_checksums_ok(&bad_l4, good_flags, &ALL_CKSUM),
            "NIC verdict trusted"
        );
        let mut bad_ip = good.clone();
        bad_ip[14 + 8] ^= 1; // TTL
        assert!(!rx_checksums_ok(&bad_ip, unknown, &ALL_CKSUM));
        let bad_flags = sys::RTE_MBUF_F_RX_IP_CKSUM_GOOD | sys::RTE_MBUF_F_RX_L4_CKSUM_BAD;
        assert!(!rx_checksums_ok(&good, bad_flags, &ALL_CKSUM));
        assert!(
            rx_checksums_ok(&[1, 2, 3], unknown, &ALL_CKSUM),
            "left to smoltcp"
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(matches!(eal_init(&[]), Err(DpdkError::InvalidEalArgs(_))));
        let help = ["x".to_string(), "--help".to_string()];
        assert!(matches!(eal_init(&help), Err(DpdkError::InvalidEalArgs(_))));
        let nul = ["x".to_string(), "-l\0".to_string()];
        assert!(matches!(eal_init(&nul), Err(DpdkError::ArgContainsNul(_))));
        match DpdkPort::open("no-such-port", 1, 4096, 1500) {
            Err(DpdkError::EalNotInitialized | DpdkError::PortNotFound(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
        let e = DpdkError::Call {
            op: "rte_eth_dev_start",
            errno: libc::EINVAL,
        };
        assert!(
            e.to_string().starts_with("rte_eth_dev_start failed: "),
            "{e}"
        );
    }

    // ---- Real DPDK (root, DPDK installed): DPDK_TESTS=1 ----

    fn sh(cmd: &str) {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .expect("sh");
        assert!(st.success(), "{cmd}: {st}");
    }

    fn kernel_rx_packets(iface: &str) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{iface}/statistics/rx_packets"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !f() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// EAL + net_tap: port/queue bookkeeping, a kernel UDP datagram received, a gratuitous ARP
    /// seen by the kernel, then TCP echo through a smoltcp Interface over the queue.
    #[test]
    fn tap_port_end_to_end() {
        if std::env::var("DPDK_TESTS").as_deref() != Ok("1") {
            eprintln!("net::dpdk: skipped (set DPDK_TESTS=1, as root, with DPDK installed)");
            return;
        }
        let iface = "dpdktest0";
        let args: Vec<String> = [
            "dataplane-test",
            "-l",
            "0",
            "--no-pci",
            "--no-huge",
            "-m",
            "256",
            &format!("--vdev=net_tap0,iface={iface}"),
            "--vdev=net_tap1,iface=dpdktest1",
            "--file-prefix",
            &format!("dpdk-test-{}", std::process::id()),
            "--log-level=notice",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        eal_init(&args).expect("eal_init");
        assert_eq!(eal_init(&args), Ok(()), "same args again");
        assert!(matches!(
            eal_init(&args[..1]),
            Err(DpdkError::EalAlreadyInitialized { .. })
        ));
        eprintln!("{}", dpdk_version());

        let open = |q, n, mtu| DpdkPort::open("net_tap0", q, n, mtu);
        assert!(matches!(
            open(0, 4096, 1500),
            Err(DpdkError::InvalidQueueCount { .. })
        ));
        assert!(matches!(
            open(1, 4096, 20),
            Err(DpdkError::InvalidMtu { .. })
        ));
        assert!(matches!(
            open(1, 64, 1500),
            Err(DpdkError::TooFewMbufs { .. })
        ));
        let port = open(1, 4096, 1500).expect("open net_tap0");
        assert!(matches!(open(1, 4096, 1500), Err(DpdkError::PortBusy(_))));
        eprintln!("{port:?}");
        let mac = port.mac();
        assert_ne!(mac, [0; 6]);
        assert_eq!(mac[0] & 1, 0, "unicast MAC");
        assert_eq!(port.queues(), 1);
        let mut q = port.queue(0).expect("queue 0");
        assert!(matches!(port.queue(0), Err(DpdkError::QueueTaken(0))));
        assert!(matches!(
            port.queue(1),
            Err(DpdkError::QueueOutOfRange { .. })
        ));
        fn assert_send<T: Send>() {}
        assert_send::<DpdkQueue>();
        let caps = q.capabilities();
        assert_eq!(caps.max_transmission_unit, 1514);
        assert_eq!(caps.max_burst_size, Some(BURST));

        sh(&format!("ip link set {iface} up"));
        sh(&format!("ip addr add 10.213.0.1/24 dev {iface}"));
        sh(&format!(
            "ip neigh replace 10.213.0.2 lladdr {} dev {iface} nud permanent",
            format_mac(&mac)
        ));
        wait_for("link up", 5, || port.link_up());

        // RX: a UDP datagram from the kernel reaches receive() as an Ethernet frame.
        let udp = std::net::UdpSocket::bind("10.213.0.1:0").expect("bind");
        let mut got = false;
        let mut sent_at = std::time::Instant::now() - std::time::Duration::from_secs(1);
        wait_for("UDP frame", 5, || {
            if sent_at.elapsed() > std::time::Duration::from_millis(200) {
                udp.send_to(b"hello dpdk", "10.213.0.2:9999")
                    .expect("send_to");
                sent_at = std::time::Instant::now();
            }
            while let Some((rx, _tx)) = q.receive(Instant::now()) {
                got |= rx.consume(|f| {
                    let Ok(eth) = EthernetFrame::new_checked(f) else {
                        return false;
                    };
                    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                        return false;
                    };
                    let Ok(u) = UdpPacket::new_checked(ip.payload()) else {
                        return false;
                    };
                    eth.dst_addr() == EthernetAddress(mac)
                        && u.dst_port() == 9999
                        && u.payload() == b"hello dpdk"
                });
            }
            got
        });

        // TX: a gratuitous ARP written straight into an mbuf reaches the kernel.
        let before = kernel_rx_packets(iface);
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(mac),
            source_protocol_addr: Ipv4Address::new(10, 213, 0, 2),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: Ipv4Address::new(10, 213, 0, 2),
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(mac),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let tok = q.transmit(Instant::now()).expect("tx token");
        tok.consume(eth.buffer_len() + arp.buffer_len(), |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
        q.flush_tx();
        wait_for("kernel rx_packets", 5, || kernel_rx_packets(iface) > before);
        let qs = q.stats();
        assert!(
            qs.rx_packets >= 1 && qs.tx_packets == 1 && qs.tx_dropped == 0,
            "{qs:?}"
        );

        // smoltcp over the queue: TCP echo with the kernel as the client.
        let mut iface_cfg = Config::new(EthernetAddress(mac).into());
        iface_cfg.random_seed = 0x5eed;
        let mut smol = Interface::new(iface_cfg, &mut q, Instant::now());
        smol.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(10, 213, 0, 2), 24))
                .expect("one address");
        });
        let mut sockets = SocketSet::new(vec![]);
        let mut listener = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 16384]),
            tcp::SocketBuffer::new(vec![0; 16384]),
        );
        listener.listen(3260).expect("listen");
        let h = sockets.add(listener);
        let payload: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
        let to_send = payload.clone();
        let client = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
            use std::io::{Read, Write};
            let addr = "10.213.0.2:3260".parse().expect("addr");
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(&to_send)?;
            let mut back = vec![0; to_send.len()];
            s.read_exact(&mut back)?;
            Ok(back)
        });
        wait_for("TCP echo", 15, || {
            smol.poll(Instant::now(), &mut q, &mut sockets);
            let s = sockets.get_mut::<tcp::Socket>(h);
            while s.can_recv() && s.send_capacity() - s.send_queue() >= 1024 {
                let mut b = [0u8; 1024];
                let n = s.recv_slice(&mut b).expect("recv");
                if n == 0 {
                    break;
                }
                s.send_slice(&b[..n]).expect("send");
            }
            smol.poll(Instant::now(), &mut q, &mut sockets);
            q.flush_tx();
            client.is_finished()
        });
        let back = client.join().expect("client thread").expect("client I/O");
        assert!(back == payload, "echo differs");
        let qs = q.stats();
        let ps = port.stats();
        eprintln!("queue {qs:?}\nport {ps:?}");
        assert!(
            ps.ipackets >= qs.rx_packets && ps.opackets >= qs.tx_packets,
            "{ps:?} {qs:?}"
        );
        assert_eq!(qs.tx_dropped, 0);

        drop(q);
        let q0 = port.queue(0).expect("queue 0 free again after drop");
        drop(q0);
        drop(port);
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{iface}")).exists(),
            "closing the port removes the tap interface"
        );

        // Two queue pairs (RSS only if net_tap offers it): both queues usable from two threads.
        assert!(matches!(
            DpdkPort::open("net_tap1", 2, 8192, 9000),
            Err(DpdkError::InvalidMtu { .. })
        ));
        let port2 = DpdkPort::open("net_tap1", 2, 8192, 1500).expect("open net_tap1");
        eprintln!("{port2:?}");
        assert_eq!(port2.queues(), 2);
        let queues = [port2.queue(0).expect("q0"), port2.queue(1).expect("q1")];
        for t in queues.map(|mut q| {
            std::thread::spawn(move || {
                let caps = q.capabilities();
                while q.receive(Instant::now()).is_some() {}
                q.flush_tx();
                caps.max_transmission_unit
            })
        }) {
            assert_eq!(t.join().expect("queue thread"), 1514);
        }
    }
}
