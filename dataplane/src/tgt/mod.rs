//! The object model: portal groups, initiator groups, block devices and target nodes, and
//! the configuration file that describes them.
//!
//! [`config`] turns a TOML file (or the built-in default) into a validated [`Config`]; the
//! reactor builds its live targets from it.

pub mod config;
pub mod live;
pub mod save;

use std::net::SocketAddr;

/// The IQN of the target served when no configuration is given.
pub const DEFAULT_TARGET_NAME: &str = "iqn.2026-11.io.iscsi-tgt:default";
/// Where the built-in default listens.
pub const DEFAULT_PORTAL: &str = "127.0.0.1:3260";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub global: Global,
    pub portal_groups: Vec<PortalGroup>,
    pub initiator_groups: Vec<InitiatorGroup>,
    pub bdevs: Vec<BdevConfig>,
    pub targets: Vec<TargetNode>,
    /// DPDK's environment; None unless `[dpdk]` is given.
    pub dpdk: Option<DpdkConfig>,
    /// CHAP credentials, by tag.
    pub auth_groups: Vec<AuthGroup>,
    /// How discovery sessions authenticate.
    pub discovery_auth: AuthSettings,
}

/// CHAP credentials targets and discovery refer to by tag.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthGroup {
    pub tag: u16,
    pub secrets: Vec<crate::iscsi::chap::ChapSecret>,
}

/// How logins to a target (or discovery sessions) authenticate. With none of the flags, a
/// target with an auth group lets the initiator choose CHAP or None; without one, None.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuthSettings {
    pub group: Option<u16>,
    pub require_chap: bool,
    /// The initiator must also authenticate the target.
    pub mutual_chap: bool,
    pub disable_chap: bool,
}

/// Settings that are not tied to one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Log level name: error, warn, info, debug, trace.
    pub log_level: String,
    /// Seconds between target-initiated NOP-In pings on an idle connection (0: never).
    pub nop_in_interval_s: u32,
    /// Seconds to wait for the NOP-Out answering a ping before dropping the connection.
    pub nop_in_timeout_s: u32,
    /// Operational defaults the target offers in negotiation.
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
    pub max_connections: u32,
    /// Sessions in total the target accepts.
    pub max_sessions: u32,
    /// MiB of I/O buffers each reactor carves from hugepages (0: allocate per I/O).
    pub buffer_pool_mib: u32,
    /// Put buffers and RAM disks in hugepages when the machine has them reserved.
    pub hugepages: bool,
    /// Microseconds a reactor keeps polling after its last work before it sleeps.
    pub poll_spin_us: u32,
    /// Name of this dataplane for the control plane: its segment is
    /// `/dev/shm/iscsi-tgt.<instance>` and `iscsictl --instance` finds it there.
    pub instance: String,
    /// Directory for state that must outlive the process: persistent reservations of
    /// initiators that asked for them to survive power loss (APTPL), under `pr/`.
    pub state_dir: String,
    /// CPUs to run reactors on: one pinned reactor thread per set bit.
    pub cpumask: u64,
    /// A connection with no command for this long is parked (0: never), and handed to the
    /// least-loaded reactor when it speaks again.
    pub idle_park_ms: u32,
    /// Which HeaderDigest and DataDigest values the target accepts.
    pub header_digest: DigestPolicy,
    pub data_digest: DigestPolicy,
    /// Seconds a connection may take to log in before it is dropped.
    pub login_timeout_s: u32,
    /// Seconds a PDU may take to arrive once its first byte has (a peer that stops in the
    /// middle of a PDU is dropped).
    pub pdu_timeout_s: u32,
    /// Connections at most from one IP address (0: no limit).
    pub max_connections_per_address: u32,
    /// Sessions at most per target (0: no limit).
    pub max_sessions_per_target: u32,
    /// Sessions at most per initiator name, over all targets (0: no limit).
    pub max_sessions_per_initiator: u32,
    /// Connections at most through one portal group (0: no limit).
    pub max_connections_per_portal_group: u32,
    /// MiB of large write buffers (over 256 KiB each) one connection's commands may hold
    /// at once; a write past it gets TASK SET FULL (0: no limit).
    pub max_connection_buffer_mib: u32,
}

/// The digests a target accepts for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestPolicy {
    /// None only.
    None,
    /// CRC32C only: a login that does not agree to it fails.
    Crc32c,
    /// Either, the first the initiator offers.
    #[default]
    Any,
}

impl DigestPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DigestPolicy::None => "none",
            DigestPolicy::Crc32c => "crc32c",
            DigestPolicy::Any => "any",
        }
    }
}

impl Default for Global {
    fn default() -> Self {
        Global {
            log_level: "info".into(),
            nop_in_interval_s: 30,
            nop_in_timeout_s: 30,
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: false,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            max_connections: 1,
            max_sessions: 1024,
            buffer_pool_mib: 128,
            hugepages: true,
            poll_spin_us: 50,
            instance: "default".into(),
            state_dir: "/var/lib/iscsi-tgt".into(),
            cpumask: 0x1,
            idle_park_ms: 1000,
            header_digest: DigestPolicy::Any,
            data_digest: DigestPolicy::Any,
            login_timeout_s: 15,
            pdu_timeout_s: 30,
            max_connections_per_address: 256,
            max_sessions_per_target: 256,
            max_sessions_per_initiator: 256,
            max_connections_per_portal_group: 4096,
            max_connection_buffer_mib: 256,
        }
    }
}

/// A portal group: a tag and the addresses it listens on.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalGroup {
    pub tag: u16,
    pub portals: Vec<SocketAddr>,
    /// How the portals' TCP is carried.
    pub transport: Transport,
    /// The userspace stack's settings (`Tap` and `Dpdk` only).
    pub userspace: Option<UserspaceNet>,
}

/// The TCP/IP stack behind a portal group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// The kernel's TCP through sockets (the default).
    #[default]
    Kernel,
    /// smoltcp in the dataplane over a TAP interface.
    Tap,
    /// smoltcp in the dataplane over a DPDK port (cargo feature `dpdk`).
    Dpdk,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Kernel => "kernel",
            Transport::Tap => "tap",
            Transport::Dpdk => "dpdk",
        }
    }
}

/// A userspace TCP/IP stack (smoltcp) on one packet device.
#[derive(Debug, Clone, PartialEq)]
pub struct UserspaceNet {
    /// TAP: the interface name (created when missing). DPDK: the port's device name (e.g.
    /// `net_tap0`, a PCI address) or its number.
    pub device: String,
    /// The stack's own addresses with their prefix lengths; every portal of the group is on
    /// one of them.
    pub addresses: Vec<(std::net::IpAddr, u8)>,
    /// Default routes (at most one IPv4 and one IPv6).
    pub gateways: Vec<std::net::IpAddr>,
    /// Ethernet address; None: the DPDK port's own, or a fixed locally administered one
    /// derived from the device name for TAP.
    pub mac: Option<[u8; 6]>,
    /// Bytes of receive and of transmit buffer per connection (the TCP window).
    pub socket_buffer: usize,
    /// Listening sockets kept ready per portal (concurrent connection attempts).
    pub listen_backlog: u16,
    /// Connections at most on this stack (each packet scans the stack's sockets).
    pub max_connections: u32,
    /// IP MTU of a DPDK port (jumbo frames: up to 9600). A TAP stack uses its interface's.
    pub mtu: u16,
}

/// DPDK's environment (EAL), for portal groups with `transport = "dpdk"`.
#[derive(Debug, Clone, PartialEq)]
pub struct DpdkConfig {
    /// Extra EAL arguments, e.g. `--vdev=net_tap0,iface=dtap0` or `--no-pci`.
    pub eal_args: Vec<String>,
    /// PCI devices DPDK may use (`-a`); empty: as the EAL arguments say.
    pub pci_allow: Vec<String>,
    /// Run without hugepages (`--no-huge`, for tests and machines without them).
    pub no_huge: bool,
    /// MiB of memory for the EAL (`-m`).
    pub memory_mib: u32,
    /// EAL file prefix, so several instances can run; None: `iscsi-tgt-<instance>`.
    pub file_prefix: Option<String>,
    /// Packet buffers in the port's mempool.
    pub mbufs: u32,
}

impl Default for DpdkConfig {
    fn default() -> Self {
        DpdkConfig {
            eal_args: Vec::new(),
            pci_allow: Vec::new(),
            no_huge: false,
            memory_mib: 512,
            file_prefix: None,
            mbufs: 16383,
        }
    }
}

/// An initiator group: who may log in. An initiator is allowed when its name matches one of
/// `initiators` (exact, case-insensitive, or "ANY"; a leading '!' denies) and its address
/// lies in one of `netmasks` ("ANY" or CIDR, IPv4 or IPv6).
#[derive(Debug, Clone, PartialEq)]
pub struct InitiatorGroup {
    pub tag: u16,
    pub initiators: Vec<String>,
    pub netmasks: Vec<Netmask>,
}

/// An address range an initiator's address must fall in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netmask {
    Any,
    Cidr { addr: std::net::IpAddr, prefix: u8 },
}

/// The kind of storage behind a block device, with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum BdevKind {
    /// RAM, `size` bytes.
    Malloc { size: u64 },
    /// A regular file (created/extended to `size` when given) or a block device.
    File {
        path: std::path::PathBuf,
        size: Option<u64>,
        engine: FileEngine,
        /// O_DIRECT (bypass the page cache): only with the io_uring engine.
        direct: bool,
    },
    /// Discards writes, reads zeroes, `size` bytes.
    Null { size: u64 },
}

/// How a `file` bdev does its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileEngine {
    /// io_uring, completions polled by the owning reactor (the default).
    Uring,
    /// pread/pwrite on worker threads (for kernels without io_uring).
    Threads,
}

/// A block device: a name LUNs refer to, a block size and what backs it.
#[derive(Debug, Clone, PartialEq)]
pub struct BdevConfig {
    pub name: String,
    /// 512 or 4096.
    pub block_size: u32,
    pub kind: BdevKind,
}

/// A target node.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetNode {
    /// iSCSI name (iqn., eui. or naa. form), stored lower-case.
    pub name: String,
    pub alias: Option<String>,
    /// LUN number → bdev name, ascending by LUN.
    pub luns: Vec<LunMapping>,
    /// Which portal groups expose the target, and to which initiator group each.
    pub mappings: Vec<PortGroupMapping>,
    /// Outstanding commands per session (sets MaxCmdSN's window).
    pub queue_depth: u32,
    pub auth: AuthSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LunMapping {
    pub lun: u64,
    pub bdev: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortGroupMapping {
    pub portal_group: u16,
    pub initiator_group: u16,
}
