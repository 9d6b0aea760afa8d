//! The configuration file: TOML in, a validated [`Config`] out.
//!
//! Every error names the file, the line (1-based) and the key it is about, for syntax errors
//! and unknown keys as well as for semantic ones (an unknown bdev reference points at the line
//! of that reference):
//!
//! ```text
//! /etc/iscsi-tgt.toml:42: target[1].luns[0].bdev: no bdev named "Disk9"
//! ```
//!
//! # Format
//!
//! ```toml
//! [global]                          # optional, every key optional (defaults shown)
//! log_level = "info"                # error | warn | info | debug | trace
//! nop_in_interval = 30              # seconds between NOP-In pings, 0 disables (0..=3600)
//! nop_in_timeout = 30               # seconds to wait for the answer (1..=3600)
//! max_sessions = 1024               # 1..=65535
//! cpumask = "0x1"                   # CPUs for the reactors, one pinned thread per bit
//! buffer_pool_mib = 128             # I/O buffers per reactor, in hugepages when reserved
//! hugepages = true                  # buffers and malloc bdevs in hugepages when available
//! poll_spin_us = 50                 # keep polling this long after work before sleeping
//! instance = "default"              # control segment /dev/shm/iscsi-tgt.<instance>
//! state_dir = "/var/lib/iscsi-tgt"  # APTPL persistent reservations (pr/), made when needed
//! idle_park_ms = 1000               # park a connection idle this long (0: never)
//! # negotiation defaults the target offers (RFC 7143 ranges):
//! max_recv_data_segment_length = 262144   # 512..=16777215
//! max_burst_length = 1048576        # 512..=16777215
//! first_burst_length = 262144       # 512..=max_burst_length
//! max_outstanding_r2t = 1           # 1..=65535
//! immediate_data = true
//! initial_r2t = false              # allow unsolicited Data-Out up to first_burst_length
//! default_time2wait = 2             # 0..=3600
//! default_time2retain = 20          # 0..=3600
//! error_recovery_level = 0          # 0..=2 (2 settles at 1: no connection recovery)
//! max_connections = 1               # 1..=65535
//!
//! [[portal_group]]                  # at least one
//! tag = 1                           # 1..=65535, unique
//! portals = ["127.0.0.1:3260", "[::1]:3260"]   # IP literal and port; unique across groups
//!
//! [[portal_group]]                  # userspace TCP (smoltcp) instead of the kernel's
//! tag = 2
//! portals = ["10.0.0.2:3260"]       # each on one of the stack's addresses
//! transport = "tap"                 # kernel (default) | tap | dpdk (a build with --features dpdk)
//! [portal_group.userspace]          # required with tap and dpdk, refused with kernel
//! device = "iscsi0"                 # tap: interface (created if missing); dpdk: port name or number
//! addresses = ["10.0.0.2/24"]       # the stack's own addresses/prefixes, 1 to 4, IPv4 and IPv6
//! gateways = ["10.0.0.1"]           # optional default routes: one IPv4, one IPv6 at most
//! mac = "02:00:00:00:00:02"         # optional; default: the DPDK port's, or derived from device
//! socket_buffer = "512KiB"          # receive and transmit window per connection, 16KiB..=64MiB
//! listen_backlog = 16               # listening sockets kept ready per portal, 1..=256
//! max_connections = 1024            # connections on this stack, 1..=65535
//! mtu = 1500                        # DPDK port's IP MTU, 576..=9600 (TAP: the interface's)
//!
//! [dpdk]                            # optional; EAL settings for transport = "dpdk"
//! eal_args = ["--vdev=net_tap0,iface=dtap0"]   # extra EAL arguments
//! pci_allow = ["0000:3b:00.0"]      # NICs DPDK may take (-a)
//! no_huge = false                   # --no-huge (tests, machines without hugepages)
//! memory_mib = 512                  # -m, 64..
//! file_prefix = "iscsi-tgt-default" # default: iscsi-tgt-<instance>
//! mbufs = 16383                     # packet buffers in the port's mempool
//!
//! [[initiator_group]]
//! tag = 1                           # 1..=65535, unique
//! initiators = ["ANY"]              # exact names, "ANY", or "!name" to deny
//! netmasks = ["127.0.0.0/8", "::1/128"]   # CIDR, a bare address, or "ANY"
//!
//! [[bdev]]
//! name = "Malloc0"                  # unique
//! type = "malloc"                   # malloc | file | null
//! size = "1GiB"                     # integer bytes or string with K/M/G/T(iB) suffix
//! block_size = 512                  # 512 | 4096 (default 512)
//!
//! [[bdev]]
//! name = "Disk1"
//! type = "file"
//! path = "/var/lib/iscsi-tgt/disk1.img"   # regular file (created if missing) or block device
//! size = "10GiB"                    # optional for existing files and block devices
//! engine = "uring"                  # uring (default) | threads
//! direct = true                     # O_DIRECT; default true with uring
//!
//! [[auth_group]]                    # CHAP credentials
//! tag = 1
//! secrets = [ { user = "host1", secret = "host1-secret-123", mutual_user = "array1", mutual_secret = "array1-secret-45" } ]
//!
//! [discovery]                       # optional: CHAP for discovery sessions
//! auth_group = 1
//! require_chap = true
//!
//! [[target]]                        # none at all: discovery only
//! name = "iqn.2026-11.io.example:disk1"   # iqn./eui./naa. name, unique
//! alias = "Disk 1"                  # optional
//! queue_depth = 128                 # 1..=4096 (default 128)
//! luns = [ { lun = 0, bdev = "Malloc0" }, { lun = 1, bdev = "Disk1" } ]
//! mappings = [ { portal_group = 1, initiator_group = 1 } ]
//! auth_group = 1                    # optional: CHAP or None (require_chap, mutual_chap,
//! mutual_chap = true                # disable_chap as the README says)
//! ```
//!
//! Rules beyond the ranges above:
//!
//! - Unknown keys are errors.
//! - Portals are IP literals with a port (`"10.0.0.1:3260"`, `"[fe80::1]:3260"`); host names
//!   such as `localhost` are not resolved.
//! - Sizes: a positive integer of bytes, or a string like `"512M"`, `"10GiB"`, `"4 KiB"`;
//!   K, M, G, T (with or without `iB`) are powers of 1024. The size must be a multiple of the
//!   block size. `malloc` and `null` bdevs need a size; `file` bdevs need a path.
//! - Target names follow RFC 7143 §4.2.7 (`iqn.yyyy-mm.reversed.domain[:anything]`,
//!   `eui.` and 16 hex digits, `naa.` and 16 or 32 hex digits), at most 223 bytes, restricted
//!   to ASCII letters, digits, `-`, `.` and `:`; they are stored lower-case.
//! - A target needs at least one LUN (numbers 0..=16383, unique within the target) and at
//!   least one mapping; mappings refer to existing portal and initiator groups, at most one
//!   mapping per portal group.
//! - Every LUN's bdev must exist, and a bdev backs one LUN only: sharing one bdev between
//!   LUNs or targets is not supported yet.

use super::{AuthGroup, AuthSettings, DigestPolicy, DpdkConfig, Transport, UserspaceNet};
use super::{
    BdevConfig, BdevKind, Config, FileEngine, Global, InitiatorGroup, LunMapping, Netmask,
    PortGroupMapping, PortalGroup, TargetNode, DEFAULT_PORTAL, DEFAULT_TARGET_NAME,
};
use crate::iscsi::chap::ChapSecret;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// A configuration that cannot be used: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or other origin) the text came from.
    pub origin: String,
    /// 1-based line the error is about, when it is about one.
    pub line: Option<usize>,
    /// The key path, e.g. `target[1].luns[0].bdev`, when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates the configuration file at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        origin: origin.clone(),
        line: None,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, &origin)
}

/// Parses and validates configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let cx = Cx { text, origin };
    let raw: RawFile = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    cx.validate(raw)
}

/// The configuration used when none is given: one portal group (tag 1) on `listen` or
/// [`DEFAULT_PORTAL`], one initiator group (tag 1) allowing any initiator from anywhere, a
/// 1 GiB malloc bdev "Malloc0" with 512-byte blocks, and the target [`DEFAULT_TARGET_NAME`]
/// with LUN 0 on Malloc0, exposed on portal group 1 to initiator group 1.
///
/// A `listen` that is not an IP literal with a port is logged and replaced by the default
/// portal; use [`default_config_checked`] to get the error instead.
pub fn default_config(listen: Option<&str>) -> Config {
    match default_config_checked(listen) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}; listening on {DEFAULT_PORTAL} instead");
            default_config_checked(None).unwrap_or_else(|_| built_in(default_portal()))
        }
    }
}

/// [`default_config`], failing on a `listen` address that does not parse.
pub fn default_config_checked(listen: Option<&str>) -> Result<Config, ConfigError> {
    let portal = match listen {
        None => default_portal(),
        Some(s) => parse_portal(s).map_err(|message| ConfigError {
            origin: "--listen".into(),
            line: None,
            key: None,
            message,
        })?,
    };
    Ok(built_in(portal))
}

fn default_portal() -> SocketAddr {
    DEFAULT_PORTAL
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 3260)))
}

fn built_in(portal: SocketAddr) -> Config {
    Config {
        global: Global::default(),
        portal_groups: vec![PortalGroup {
            tag: 1,
            portals: vec![portal],
            transport: Transport::Kernel,
            userspace: None,
        }],
        initiator_groups: vec![InitiatorGroup {
            tag: 1,
            initiators: vec!["ANY".into()],
            netmasks: vec![Netmask::Any],
        }],
        bdevs: vec![BdevConfig {
            name: "Malloc0".into(),
            block_size: 512,
            kind: BdevKind::Malloc { size: 1 << 30 },
        }],
        targets: vec![TargetNode {
            name: DEFAULT_TARGET_NAME.into(),
            alias: None,
            luns: vec![LunMapping {
                lun: 0,
                bdev: "Malloc0".into(),
            }],
            mappings: vec![PortGroupMapping {
                portal_group: 1,
                initiator_group: 1,
            }],
            queue_depth: 128,
            auth: AuthSettings::default(),
        }],
        dpdk: None,
        auth_groups: Vec::new(),
        discovery_auth: AuthSettings::default(),
    }
}

/// Parses a portal address: an IP literal and a port (`1.2.3.4:3260`, `[::1]:3260`).
pub fn parse_portal(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not an IP address with a port (e.g. \"10.0.0.1:3260\" or \"[::1]:3260\")")
    })
}

/// Parses a size: a decimal number of bytes with an optional K, M, G or T suffix (powers of
/// 1024, also written KiB, MiB, GiB, TiB, or a plain B), case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, suffix) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a size (e.g. 1048576, \"512M\", \"10GiB\")"
        ));
    }
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size suffix {:?} (use K, M, G, T or KiB, MiB, GiB, TiB)",
                suffix.trim()
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a netmask: "ANY", an address with a prefix length (`10.0.0.0/8`, `fd00::/8`), or a
/// bare address (a single host).
pub fn parse_netmask(s: &str) -> Result<Netmask, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("any") {
        return Ok(Netmask::Any);
    }
    let (addr, prefix) = match t.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (t, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not \"ANY\" or an address/prefix (e.g. \"10.0.0.0/8\")"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
        },
    };
    Ok(Netmask::Cidr { addr, prefix })
}

/// Parses an interface address with its prefix length (`10.0.0.2/24`, `fd00::2/64`).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{s:?} is not an address/prefix (e.g. \"10.0.0.2/24\")");
    let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let unicast = match addr {
        IpAddr::V4(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()),
        IpAddr::V6(v6) => !(v6.is_multicast() || v6.is_unspecified()),
    };
    if !unicast {
        return Err(format!("{s:?}: the stack's address must be unicast"));
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match p.parse::<u8>() {
        Ok(p) if (1..=max).contains(&p) => Ok((addr, p)),
        _ => Err(format!("{s:?}: prefix length must be 1..={max}")),
    }
}

/// Parses an Ethernet address (`02:00:00:00:00:01`); a multicast address is refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not an Ethernet address (e.g. \"02:00:00:00:00:01\")");
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split([':', '-']);
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s:?} is a multicast address"));
    }
    Ok(mac)
}

/// Checks an iSCSI name (RFC 7143 §4.2.7) and returns it lower-cased.
pub fn check_iscsi_name(name: &str) -> Result<String, String> {
    if name.len() > 223 {
        return Err(format!("{} bytes long, at most 223 allowed", name.len()));
    }
    let n = name.to_ascii_lowercase();
    if let Some(c) = n
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')))
    {
        return Err(format!(
            "{name:?}: character {c:?} not allowed (letters, digits, '-', '.', ':')"
        ));
    }
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
    if let Some(rest) = n.strip_prefix("eui.") {
        return if rest.len() == 16 && hex(rest) {
            Ok(n)
        } else {
            Err(format!("{name:?}: eui. must be followed by 16 hex digits"))
        };
    }
    if let Some(rest) = n.strip_prefix("naa.") {
        return if (rest.len() == 16 || rest.len() == 32) && hex(rest) {
            Ok(n)
        } else {
            Err(format!(
                "{name:?}: naa. must be followed by 16 or 32 hex digits"
            ))
        };
    }
    let Some(rest) = n.strip_prefix("iqn.") else {
        return Err(format!(
            "{name:?} is not an iSCSI name (iqn.yyyy-mm.reversed.domain[:id], eui.<16 hex>, naa.<16|32 hex>)"
        ));
    };
    let bad_iqn = || format!("{name:?}: an iqn. name is iqn.yyyy-mm.reversed.domain[:identifier]");
    let b = rest.as_bytes();
    let date_ok = b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && matches!(
            &rest[5..7],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        )
        && b[7] == b'.';
    if !date_ok {
        return Err(bad_iqn());
    }
    let (authority, id) = match rest[8..].split_once(':') {
        Some((a, id)) => (a, Some(id)),
        None => (&rest[8..], None),
    };
    let labels_ok = !authority.is_empty()
        && authority
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !labels_ok || id.is_some_and(str::is_empty) {
        return Err(bad_iqn());
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// The file as written: every value spanned so errors can point at it.

type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    global: Option<S<RawGlobal>>,
    #[serde(default)]
    portal_group: Vec<S<RawPortalGroup>>,
    #[serde(default)]
    initiator_group: Vec<S<RawInitiatorGroup>>,
    #[serde(default)]
    bdev: Vec<S<RawBdev>>,
    #[serde(default)]
    target: Vec<S<RawTarget>>,
    dpdk: Option<S<RawDpdk>>,
    #[serde(default)]
    auth_group: Vec<S<RawAuthGroup>>,
    discovery: Option<S<RawDiscovery>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthGroup {
    tag: Option<S<i64>>,
    secrets: Option<S<Vec<S<RawSecret>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    user: Option<S<String>>,
    secret: Option<S<String>>,
    mutual_user: Option<S<String>>,
    mutual_secret: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    auth_group: Option<S<i64>>,
    require_chap: Option<S<bool>>,
    mutual_chap: Option<S<bool>>,
    disable_chap: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDpdk {
    eal_args: Option<S<Vec<S<String>>>>,
    pci_allow: Option<S<Vec<S<String>>>>,
    no_huge: Option<S<bool>>,
    memory_mib: Option<S<i64>>,
    file_prefix: Option<S<String>>,
    mbufs: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserspace {
    device: Option<S<String>>,
    addresses: Option<S<Vec<S<String>>>>,
    gateways: Option<S<Vec<S<String>>>>,
    mac: Option<S<String>>,
    socket_buffer: Option<S<toml::Value>>,
    listen_backlog: Option<S<i64>>,
    max_connections: Option<S<i64>>,
    mtu: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    log_level: Option<S<String>>,
    nop_in_interval: Option<S<i64>>,
    nop_in_timeout: Option<S<i64>>,
    max_sessions: Option<S<i64>>,
    max_recv_data_segment_length: Option<S<i64>>,
    max_burst_length: Option<S<i64>>,
    first_burst_length: Option<S<i64>>,
    max_outstanding_r2t: Option<S<i64>>,
    immediate_data: Option<S<bool>>,
    initial_r2t: Option<S<bool>>,
    default_time2wait: Option<S<i64>>,
    default_time2retain: Option<S<i64>>,
    error_recovery_level: Option<S<i64>>,
    max_connections: Option<S<i64>>,
    cpumask: Option<S<toml::Value>>,
    idle_park_ms: Option<S<i64>>,
    buffer_pool_mib: Option<S<i64>>,
    hugepages: Option<S<bool>>,
    poll_spin_us: Option<S<i64>>,
    instance: Option<S<String>>,
    state_dir: Option<S<String>>,
    header_digest: Option<S<String>>,
    data_digest: Option<S<String>>,
    login_timeout: Option<S<i64>>,
    pdu_timeout: Option<S<i64>>,
    max_connections_per_address: Option<S<i64>>,
    max_sessions_per_target: Option<S<i64>>,
    max_sessions_per_initiator: Option<S<i64>>,
    max_connections_per_portal_group: Option<S<i64>>,
    max_connection_buffer_mib: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortalGroup {
    tag: Option<S<i64>>,
    portals: Option<S<Vec<S<String>>>>,
    transport: Option<S<String>>,
    userspace: Option<S<RawUserspace>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInitiatorGroup {
    tag: Option<S<i64>>,
    initiators: Option<S<Vec<S<String>>>>,
    netmasks: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBdev {
    name: Option<S<String>>,
    #[serde(rename = "type")]
    kind: Option<S<String>>,
    size: Option<S<toml::Value>>,
    block_size: Option<S<i64>>,
    path: Option<S<String>>,
    engine: Option<S<String>>,
    direct: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Option<S<String>>,
    alias: Option<S<String>>,
    queue_depth: Option<S<i64>>,
    luns: Option<S<Vec<S<RawLun>>>>,
    mappings: Option<S<Vec<S<RawMapping>>>>,
    auth_group: Option<S<i64>>,
    require_chap: Option<S<bool>>,
    mutual_chap: Option<S<bool>>,
    disable_chap: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLun {
    lun: Option<S<i64>>,
    bdev: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    portal_group: Option<S<i64>>,
    initiator_group: Option<S<i64>>,
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// The text being validated and where it came from.
struct Cx<'a> {
    text: &'a str,
    origin: &'a str,
}

type R<T> = Result<T, ConfigError>;

impl Cx<'_> {
    /// 1-based line of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            origin: self.origin.to_string(),
            line: span.map(|s| self.line_of(s.start)),
            key: (!key.is_empty()).then(|| key.to_string()),
            message: message.into(),
        }
    }

    fn at<T>(&self, v: &S<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.err(Some(v.span()), key, message)
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        let Some(span) = e.span() else {
            return self.err(None, "", message);
        };
        // For an unknown key the span covers the key itself.
        let unknown = if message.starts_with("unknown field") {
            self.text
                .get(span.clone())
                .map(|k| k.trim().trim_matches('"').to_string())
        } else {
            None
        };
        let key = self.key_path_at(span.start, unknown.as_deref());
        self.err(Some(span), &key, message)
    }

    /// Best-effort key path of a byte offset, for errors the TOML parser reports with a span
    /// only: the enclosing table header (array-of-tables entries numbered from 0), the key at
    /// the start of the line, and the unknown key itself when there is one.
    fn key_path_at(&self, offset: usize, unknown: Option<&str>) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut table = String::new();
        let mut line_key = None;
        let mut pos = 0;
        for line in self.text.split_inclusive('\n') {
            let start = pos;
            pos += line.len();
            let t = line.trim();
            let on_line = offset >= start && offset < pos.max(start + 1);
            let header_name = |h: &(&str, &str)| {
                h.0.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
            };
            if let Some(h) = t
                .strip_prefix("[[")
                .and_then(|r| r.split_once("]]"))
                .filter(header_name)
            {
                let name = h.0.trim().to_string();
                let n = counts
                    .entry(name.clone())
                    .and_modify(|n| *n += 1)
                    .or_insert(0);
                table = format!("{name}[{n}]");
            } else if let Some(h) = t
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .filter(header_name)
            {
                // `[a.b]` below `[[a]]` belongs to the latest `a` entry.
                let name = h.0.trim();
                table = match name.split_once('.') {
                    Some((first, rest)) => match counts.get(first.trim()) {
                        Some(n) => format!("{}[{n}].{}", first.trim(), rest.trim()),
                        None => name.to_string(),
                    },
                    None => name.to_string(),
                };
            } else if on_line {
                line_key = t
                    .split_once('=')
                    .map(|(k, _)| k.trim().trim_matches('"').to_string())
                    .filter(|k| !k.is_empty());
            }
            if on_line {
                break;
            }
        }
        let mut parts: Vec<String> = Vec::new();
        if !table.is_empty() {
            parts.push(table.clone());
        }
        if let Some(k) = &line_key {
            if Some(k.as_str()) != unknown {
                parts.push(k.clone());
            }
        }
        if let Some(u) = unknown {
            if !table.ends_with(u) || line_key.is_some() {
                parts.push(u.to_string());
            }
        }
        parts.join(".")
    }

    fn required<'v, T>(
        &self,
        v: &'v Option<S<T>>,
        parent: &S<impl Sized>,
        key: &str,
    ) -> R<&'v S<T>> {
        v.as_ref()
            .ok_or_else(|| self.at(parent, key, "missing (required)"))
    }

    fn int(&self, v: &S<i64>, key: &str, lo: i64, hi: i64) -> R<i64> {
        let n = *v.get_ref();
        if (lo..=hi).contains(&n) {
            Ok(n)
        } else {
            Err(self.at(v, key, format!("{n} out of range {lo}..={hi}")))
        }
    }

    fn u32_or(&self, v: &Option<S<i64>>, key: &str, lo: u32, hi: u32, default: u32) -> R<u32> {
        match v {
            None => Ok(default),
            Some(v) => {
                let n = self.int(v, key, i64::from(lo), i64::from(hi))?;
                Ok(u32::try_from(n).unwrap_or(default))
            }
        }
    }

    fn tag(&self, v: &S<i64>, key: &str) -> R<u16> {
        let n = self.int(v, key, 1, i64::from(u16::MAX))?;
        Ok(u16::try_from(n).unwrap_or(u16::MAX))
    }

    fn validate(&self, raw: RawFile) -> R<Config> {
        let global = match &raw.global {
            Some(g) => self.global(g.get_ref())?,
            None => Global::default(),
        };
        if raw.portal_group.is_empty() {
            return Err(self.err(
                None,
                "portal_group",
                "at least one [[portal_group]] is required",
            ));
        }
        let mut portal_groups = Vec::new();
        let mut pg_tags: HashMap<u16, usize> = HashMap::new();
        let mut portals_seen: HashMap<SocketAddr, String> = HashMap::new();
        for (i, pg) in raw.portal_group.iter().enumerate() {
            let base = format!("portal_group[{i}]");
            let group = self.portal_group(pg, &base, &mut portals_seen)?;
            if let Some(prev) = pg_tags.insert(group.tag, i) {
                let tag_value = self.required(&pg.get_ref().tag, pg, &format!("{base}.tag"))?;
                return Err(self.at(
                    tag_value,
                    &format!("{base}.tag"),
                    format!("tag {} already used by portal_group[{prev}]", group.tag),
                ));
            }
            portal_groups.push(group);
        }
        let mut initiator_groups = Vec::new();
        let mut ig_tags: HashMap<u16, usize> = HashMap::new();
        for (i, ig) in raw.initiator_group.iter().enumerate() {
            let base = format!("initiator_group[{i}]");
            let group = self.initiator_group(ig, &base)?;
            if let Some(prev) = ig_tags.insert(group.tag, i) {
                let tag_value = self.required(&ig.get_ref().tag, ig, &format!("{base}.tag"))?;
                return Err(self.at(
                    tag_value,
                    &format!("{base}.tag"),
                    format!("tag {} already used by initiator_group[{prev}]", group.tag),
                ));
            }
            initiator_groups.push(group);
        }
        let mut bdevs = Vec::new();
        let mut bdev_names: HashMap<String, usize> = HashMap::new();
        for (i, b) in raw.bdev.iter().enumerate() {
            let base = format!("bdev[{i}]");
            let bdev = self.bdev(b, &base)?;
            if let Some(prev) = bdev_names.insert(bdev.name.clone(), i) {
                let name = self.required(&b.get_ref().name, b, &format!("{base}.name"))?;
                return Err(self.at(
                    name,
                    &format!("{base}.name"),
                    format!("name {:?} already used by bdev[{prev}]", bdev.name),
                ));
            }
            bdevs.push(bdev);
        }
        let mut auth_groups: Vec<AuthGroup> = Vec::new();
        for (i, g) in raw.auth_group.iter().enumerate() {
            let base = format!("auth_group[{i}]");
            let group = self.auth_group(g, &base)?;
            if let Some(prev) = auth_groups.iter().position(|o| o.tag == group.tag) {
                let tag_value = self.required(&g.get_ref().tag, g, &format!("{base}.tag"))?;
                return Err(self.at(
                    tag_value,
                    &format!("{base}.tag"),
                    format!("tag {} already used by auth_group[{prev}]", group.tag),
                ));
            }
            auth_groups.push(group);
        }
        let discovery_auth = match &raw.discovery {
            None => AuthSettings::default(),
            Some(d) => {
                let r = d.get_ref();
                self.auth_settings(
                    d,
                    "discovery",
                    [&r.require_chap, &r.mutual_chap, &r.disable_chap],
                    &r.auth_group,
                    &auth_groups,
                )?
            }
        };
        let mut targets: Vec<TargetNode> = Vec::new();
        let mut bdev_users: HashMap<String, String> = HashMap::new();
        for (i, t) in raw.target.iter().enumerate() {
            let base = format!("target[{i}]");
            let mut target =
                self.target(t, &base, &bdev_names, &pg_tags, &ig_tags, &mut bdev_users)?;
            let r = t.get_ref();
            target.auth = self.auth_settings(
                t,
                &base,
                [&r.require_chap, &r.mutual_chap, &r.disable_chap],
                &r.auth_group,
                &auth_groups,
            )?;
            if let Some(prev) = targets.iter().position(|o| o.name == target.name) {
                let name = self.required(&t.get_ref().name, t, &format!("{base}.name"))?;
                return Err(self.at(
                    name,
                    &format!("{base}.name"),
                    format!("name {:?} already used by target[{prev}]", target.name),
                ));
            }
            targets.push(target);
        }
        let mut devices: HashMap<&str, usize> = HashMap::new();
        for (i, pg) in portal_groups.iter().enumerate() {
            if let Some(u) = &pg.userspace {
                if let Some(prev) = devices.insert(u.device.as_str(), i) {
                    return Err(self.err(
                        None,
                        &format!("portal_group[{i}].userspace.device"),
                        format!("device {:?} already used by portal_group[{prev}]", u.device),
                    ));
                }
            }
        }
        let dpdk = match &raw.dpdk {
            Some(d) => Some(self.dpdk(d)?),
            None if portal_groups.iter().any(|p| p.transport == Transport::Dpdk) => {
                Some(DpdkConfig::default())
            }
            None => None,
        };
        Ok(Config {
            global,
            portal_groups,
            initiator_groups,
            bdevs,
            targets,
            dpdk,
            auth_groups,
            discovery_auth,
        })
    }

    fn auth_group(&self, g: &S<RawAuthGroup>, base: &str) -> R<AuthGroup> {
        let raw = g.get_ref();
        let tag_key = format!("{base}.tag");
        let tag = self.tag(self.required(&raw.tag, g, &tag_key)?, &tag_key)?;
        let key = format!("{base}.secrets");
        let list = self.required(&raw.secrets, g, &key)?;
        if list.get_ref().is_empty() {
            return Err(self.at(list, &key, "an auth group needs at least one secret"));
        }
        let mut secrets: Vec<ChapSecret> = Vec::new();
        for (i, e) in list.get_ref().iter().enumerate() {
            let k = format!("{key}[{i}]");
            let r = e.get_ref();
            let name = |v: &S<String>, what: &str| -> R<String> {
                let n = v.get_ref();
                if n.is_empty() || n.len() > 255 || n.chars().any(char::is_control) {
                    return Err(self.at(v, &format!("{k}.{what}"), "1 to 255 bytes, no controls"));
                }
                Ok(n.clone())
            };
            let secret = |v: &S<String>, what: &str| -> R<Vec<u8>> {
                let n = v.get_ref().len();
                if !(12..=255).contains(&n) {
                    // RFC 7143 §12.1.3: at least 12 bytes (96 bits) for CHAP secrets.
                    return Err(self.at(
                        v,
                        &format!("{k}.{what}"),
                        format!("a CHAP secret has 12 to 255 bytes (this one has {n})"),
                    ));
                }
                Ok(v.get_ref().as_bytes().to_vec())
            };
            let user = name(self.required(&r.user, e, &format!("{k}.user"))?, "user")?;
            let sec = secret(
                self.required(&r.secret, e, &format!("{k}.secret"))?,
                "secret",
            )?;
            let (mutual_user, mutual_secret) = match (&r.mutual_user, &r.mutual_secret) {
                (None, None) => (None, None),
                (Some(u), Some(m)) => {
                    let ms = secret(m, "mutual_secret")?;
                    if ms == sec {
                        return Err(self.at(
                            m,
                            &format!("{k}.mutual_secret"),
                            "the target's secret must differ from the initiator's",
                        ));
                    }
                    (Some(name(u, "mutual_user")?), Some(ms))
                }
                _ => return Err(self.at(e, &k, "mutual_user and mutual_secret come together")),
            };
            if secrets.iter().any(|s| s.user == user) {
                return Err(self.at(e, &format!("{k}.user"), format!("user {user:?} twice")));
            }
            secrets.push(ChapSecret {
                user,
                secret: sec,
                mutual_user,
                mutual_secret,
            });
        }
        Ok(AuthGroup { tag, secrets })
    }

    /// A target's or discovery's authentication keys, checked against the auth groups.
    fn auth_settings<T>(
        &self,
        parent: &S<T>,
        base: &str,
        [require, mutual, disable]: [&Option<S<bool>>; 3],
        group: &Option<S<i64>>,
        groups: &[AuthGroup],
    ) -> R<AuthSettings> {
        let flag = |v: &Option<S<bool>>| v.as_ref().is_some_and(|b| *b.get_ref());
        let a = AuthSettings {
            group: match group {
                None => None,
                Some(g) => {
                    let key = format!("{base}.auth_group");
                    let tag = self.tag(g, &key)?;
                    let Some(found) = groups.iter().find(|x| x.tag == tag) else {
                        return Err(self.at(g, &key, format!("no auth group with tag {tag}")));
                    };
                    if flag(mutual) && !found.secrets.iter().any(|s| s.mutual_secret.is_some()) {
                        return Err(self.at(
                            g,
                            &key,
                            format!("mutual_chap needs mutual secrets in auth group {tag}"),
                        ));
                    }
                    Some(tag)
                }
            },
            require_chap: flag(require),
            mutual_chap: flag(mutual),
            disable_chap: flag(disable),
        };
        if a.disable_chap && (a.require_chap || a.mutual_chap) {
            return Err(self.at(
                parent,
                &format!("{base}.disable_chap"),
                "disable_chap contradicts require_chap and mutual_chap",
            ));
        }
        if (a.require_chap || a.mutual_chap) && a.group.is_none() {
            return Err(self.at(
                parent,
                &format!("{base}.auth_group"),
                "require_chap and mutual_chap need an auth_group",
            ));
        }
        Ok(a)
    }

    fn global(&self, g: &RawGlobal) -> R<Global> {
        let d = Global::default();
        let log_level = match &g.log_level {
            None => d.log_level,
            Some(l) => {
                let lower = l.get_ref().to_ascii_lowercase();
                if !matches!(
                    lower.as_str(),
                    "error" | "warn" | "info" | "debug" | "trace"
                ) {
                    return Err(self.at(
                        l,
                        "global.log_level",
                        format!(
                            "{:?} is not one of error, warn, info, debug, trace",
                            l.get_ref()
                        ),
                    ));
                }
                lower
            }
        };
        const SEG_MAX: u32 = 16_777_215;
        let max_burst_length = self.u32_or(
            &g.max_burst_length,
            "global.max_burst_length",
            512,
            SEG_MAX,
            d.max_burst_length,
        )?;
        let first_burst_length = match &g.first_burst_length {
            // Not given: the default, lowered to a smaller MaxBurstLength.
            None => d.first_burst_length.min(max_burst_length),
            Some(v) => {
                let n = self.int(v, "global.first_burst_length", 512, i64::from(SEG_MAX))?;
                if n > i64::from(max_burst_length) {
                    return Err(self.at(
                        v,
                        "global.first_burst_length",
                        format!("{n} exceeds max_burst_length ({max_burst_length})"),
                    ));
                }
                u32::try_from(n).unwrap_or(max_burst_length)
            }
        };
        let flag =
            |v: &Option<S<bool>>, default: bool| v.as_ref().map_or(default, |b| *b.get_ref());
        Ok(Global {
            log_level,
            nop_in_interval_s: self.u32_or(
                &g.nop_in_interval,
                "global.nop_in_interval",
                0,
                3600,
                d.nop_in_interval_s,
            )?,
            nop_in_timeout_s: self.u32_or(
                &g.nop_in_timeout,
                "global.nop_in_timeout",
                1,
                3600,
                d.nop_in_timeout_s,
            )?,
            max_recv_data_segment_length: self.u32_or(
                &g.max_recv_data_segment_length,
                "global.max_recv_data_segment_length",
                512,
                SEG_MAX,
                d.max_recv_data_segment_length,
            )?,
            max_burst_length,
            first_burst_length,
            max_outstanding_r2t: self.u32_or(
                &g.max_outstanding_r2t,
                "global.max_outstanding_r2t",
                1,
                65535,
                d.max_outstanding_r2t,
            )?,
            immediate_data: flag(&g.immediate_data, d.immediate_data),
            initial_r2t: flag(&g.initial_r2t, d.initial_r2t),
            default_time2wait: self.u32_or(
                &g.default_time2wait,
                "global.default_time2wait",
                0,
                3600,
                d.default_time2wait,
            )?,
            default_time2retain: self.u32_or(
                &g.default_time2retain,
                "global.default_time2retain",
                0,
                3600,
                d.default_time2retain,
            )?,
            error_recovery_level: self.u32_or(
                &g.error_recovery_level,
                "global.error_recovery_level",
                0,
                2,
                d.error_recovery_level,
            )?,
            max_connections: self.u32_or(
                &g.max_connections,
                "global.max_connections",
                1,
                65535,
                d.max_connections,
            )?,
            max_sessions: self.u32_or(
                &g.max_sessions,
                "global.max_sessions",
                1,
                65535,
                d.max_sessions,
            )?,
            cpumask: match &g.cpumask {
                None => d.cpumask,
                Some(v) => {
                    let mask = match v.get_ref() {
                        toml::Value::String(s) => parse_cpumask(s),
                        toml::Value::Integer(n) => u64::try_from(*n).ok(),
                        _ => None,
                    };
                    match mask {
                        Some(m) if m != 0 => m,
                        _ => {
                            return Err(self.at(
                                v,
                                "global.cpumask",
                                "expected a non-zero CPU mask such as \"0x3\" or 3",
                            ))
                        }
                    }
                }
            },
            buffer_pool_mib: self.u32_or(
                &g.buffer_pool_mib,
                "global.buffer_pool_mib",
                0,
                65536,
                d.buffer_pool_mib,
            )?,
            hugepages: flag(&g.hugepages, d.hugepages),
            instance: match &g.instance {
                None => d.instance,
                Some(v) => {
                    if !valid_instance(v.get_ref()) {
                        return Err(self.at(
                            v,
                            "global.instance",
                            "1 to 64 of the characters A-Z a-z 0-9 . _ -",
                        ));
                    }
                    v.get_ref().clone()
                }
            },
            state_dir: match &g.state_dir {
                None => d.state_dir,
                Some(v) => {
                    let p = v.get_ref();
                    if !p.starts_with('/') || p.len() > 1024 || p.contains('\0') {
                        return Err(self.at(
                            v,
                            "global.state_dir",
                            "an absolute directory path (at most 1024 bytes)",
                        ));
                    }
                    p.clone()
                }
            },
            poll_spin_us: self.u32_or(
                &g.poll_spin_us,
                "global.poll_spin_us",
                0,
                1_000_000,
                d.poll_spin_us,
            )?,
            idle_park_ms: self.u32_or(
                &g.idle_park_ms,
                "global.idle_park_ms",
                0,
                3_600_000,
                d.idle_park_ms,
            )?,
            header_digest: self.digest(&g.header_digest, "global.header_digest")?,
            data_digest: self.digest(&g.data_digest, "global.data_digest")?,
            login_timeout_s: self.u32_or(
                &g.login_timeout,
                "global.login_timeout",
                1,
                3600,
                d.login_timeout_s,
            )?,
            pdu_timeout_s: self.u32_or(
                &g.pdu_timeout,
                "global.pdu_timeout",
                1,
                3600,
                d.pdu_timeout_s,
            )?,
            max_connections_per_address: self.u32_or(
                &g.max_connections_per_address,
                "global.max_connections_per_address",
                0,
                65535,
                d.max_connections_per_address,
            )?,
            max_sessions_per_target: self.u32_or(
                &g.max_sessions_per_target,
                "global.max_sessions_per_target",
                0,
                65535,
                d.max_sessions_per_target,
            )?,
            max_sessions_per_initiator: self.u32_or(
                &g.max_sessions_per_initiator,
                "global.max_sessions_per_initiator",
                0,
                65535,
                d.max_sessions_per_initiator,
            )?,
            max_connections_per_portal_group: self.u32_or(
                &g.max_connections_per_portal_group,
                "global.max_connections_per_portal_group",
                0,
                1_000_000,
                d.max_connections_per_portal_group,
            )?,
            max_connection_buffer_mib: self.u32_or(
                &g.max_connection_buffer_mib,
                "global.max_connection_buffer_mib",
                0,
                1 << 20,
                d.max_connection_buffer_mib,
            )?,
        })
    }

    fn digest(&self, v: &Option<S<String>>, key: &str) -> R<DigestPolicy> {
        Ok(match v {
            None => DigestPolicy::Any,
            Some(s) => match s.get_ref().to_ascii_lowercase().as_str() {
                "none" => DigestPolicy::None,
                "crc32c" => DigestPolicy::Crc32c,
                "any" => DigestPolicy::Any,
                _ => return Err(self.at(s, key, "expected \"none\", \"crc32c\" or \"any\"")),
            },
        })
    }

    /// A non-empty list of strings, each checked by `item`.
    fn list<T>(
        &self,
        v: &Option<S<Vec<S<String>>>>,
        parent: &S<impl Sized>,
        key: &str,
        mut item: impl FnMut(&S<String>, &str) -> R<T>,
    ) -> R<Vec<T>> {
        let list = self.required(v, parent, key)?;
        if list.get_ref().is_empty() {
            return Err(self.at(list, key, "must not be empty"));
        }
        list.get_ref()
            .iter()
            .enumerate()
            .map(|(i, s)| item(s, &format!("{key}[{i}]")))
            .collect()
    }

    fn portal_group(
        &self,
        pg: &S<RawPortalGroup>,
        base: &str,
        seen: &mut HashMap<SocketAddr, String>,
    ) -> R<PortalGroup> {
        let raw = pg.get_ref();
        let tag_key = format!("{base}.tag");
        let tag = self.tag(self.required(&raw.tag, pg, &tag_key)?, &tag_key)?;
        let portals = self.list(&raw.portals, pg, &format!("{base}.portals"), |s, key| {
            let addr = parse_portal(s.get_ref()).map_err(|m| self.at(s, key, m))?;
            if let Some(prev) = seen.insert(addr, key.to_string()) {
                return Err(self.at(s, key, format!("portal {addr} already listed as {prev}")));
            }
            Ok(addr)
        })?;
        let transport = match &raw.transport {
            None => Transport::Kernel,
            Some(t) => match t.get_ref().as_str() {
                "kernel" => Transport::Kernel,
                "tap" => Transport::Tap,
                "dpdk" => Transport::Dpdk,
                other => {
                    return Err(self.at(
                        t,
                        &format!("{base}.transport"),
                        format!("{other:?} is not one of kernel, tap, dpdk"),
                    ))
                }
            },
        };
        let us_key = format!("{base}.userspace");
        let userspace = match (&raw.userspace, transport) {
            (None, Transport::Kernel) => None,
            (Some(u), Transport::Kernel) => {
                return Err(self.at(u, &us_key, "only for transport = \"tap\" or \"dpdk\""))
            }
            (None, _) => {
                return Err(self.at(
                    pg,
                    &us_key,
                    format!("missing (required with transport = {:?})", transport.name()),
                ))
            }
            (Some(u), _) => Some(self.userspace(u, &us_key, &portals)?),
        };
        Ok(PortalGroup {
            tag,
            portals,
            transport,
            userspace,
        })
    }

    fn userspace(
        &self,
        u: &S<RawUserspace>,
        base: &str,
        portals: &[SocketAddr],
    ) -> R<UserspaceNet> {
        let raw = u.get_ref();
        let dev_key = format!("{base}.device");
        let device = self.required(&raw.device, u, &dev_key)?;
        if device.get_ref().is_empty() || device.get_ref().len() > 64 {
            return Err(self.at(device, &dev_key, "must be 1 to 64 characters"));
        }
        let addresses = self.list(&raw.addresses, u, &format!("{base}.addresses"), |s, key| {
            parse_cidr(s.get_ref()).map_err(|m| self.at(s, key, m))
        })?;
        if addresses.is_empty() {
            return Err(self.at(
                u,
                &format!("{base}.addresses"),
                "at least one address/prefix",
            ));
        }
        if addresses.len() > 4 {
            return Err(self.at(u, &format!("{base}.addresses"), "at most 4 addresses"));
        }
        let gateways = match &raw.gateways {
            None => Vec::new(),
            Some(_) => self.list(&raw.gateways, u, &format!("{base}.gateways"), |s, key| {
                s.get_ref()
                    .trim()
                    .parse::<IpAddr>()
                    .map_err(|_| self.at(s, key, format!("{:?} is not an IP address", s.get_ref())))
            })?,
        };
        if gateways.iter().filter(|g| g.is_ipv4()).count() > 1
            || gateways.iter().filter(|g| g.is_ipv6()).count() > 1
        {
            return Err(self.at(
                u,
                &format!("{base}.gateways"),
                "at most one IPv4 and one IPv6 gateway",
            ));
        }
        for p in portals {
            if !addresses.iter().any(|(a, _)| *a == p.ip()) {
                return Err(self.at(
                    u,
                    &format!("{base}.addresses"),
                    format!("portal {p} is not on one of the stack's addresses"),
                ));
            }
        }
        let mac = match &raw.mac {
            None => None,
            Some(m) => {
                Some(parse_mac(m.get_ref()).map_err(|e| self.at(m, &format!("{base}.mac"), e))?)
            }
        };
        let sb_key = format!("{base}.socket_buffer");
        let socket_buffer = match &raw.socket_buffer {
            None => 512 * 1024,
            Some(v) => {
                let bytes = match v.get_ref() {
                    toml::Value::Integer(n) => u64::try_from(*n).ok(),
                    toml::Value::String(s) => {
                        Some(parse_size(s).map_err(|m| self.at(v, &sb_key, m))?)
                    }
                    _ => None,
                };
                match bytes {
                    Some(b) if (16 * 1024..=64 << 20).contains(&b) => b as usize,
                    _ => return Err(self.at(v, &sb_key, "expected 16KiB..=64MiB")),
                }
            }
        };
        let listen_backlog = self.u32_or(
            &raw.listen_backlog,
            &format!("{base}.listen_backlog"),
            1,
            256,
            16,
        )? as u16;
        let max_connections = self.u32_or(
            &raw.max_connections,
            &format!("{base}.max_connections"),
            1,
            65_535,
            1024,
        )?;
        let mtu = self.u32_or(&raw.mtu, &format!("{base}.mtu"), 576, 9600, 1500)? as u16;
        Ok(UserspaceNet {
            mtu,
            device: device.get_ref().clone(),
            addresses,
            gateways,
            mac,
            socket_buffer,
            listen_backlog,
            max_connections,
        })
    }

    fn dpdk(&self, d: &S<RawDpdk>) -> R<DpdkConfig> {
        let raw = d.get_ref();
        let def = DpdkConfig::default();
        let strings = |v: &Option<S<Vec<S<String>>>>, key: &str| -> R<Vec<String>> {
            match v {
                None => Ok(Vec::new()),
                Some(_) => self.list(v, d, key, |s, _| Ok(s.get_ref().clone())),
            }
        };
        let file_prefix = match &raw.file_prefix {
            None => None,
            Some(p) => {
                if !valid_instance(p.get_ref()) {
                    return Err(self.at(p, "dpdk.file_prefix", "use 1 to 64 of [A-Za-z0-9._-]"));
                }
                Some(p.get_ref().clone())
            }
        };
        Ok(DpdkConfig {
            eal_args: strings(&raw.eal_args, "dpdk.eal_args")?,
            pci_allow: strings(&raw.pci_allow, "dpdk.pci_allow")?,
            no_huge: raw.no_huge.as_ref().map_or(def.no_huge, |b| *b.get_ref()),
            memory_mib: self.u32_or(
                &raw.memory_mib,
                "dpdk.memory_mib",
                64,
                1 << 20,
                def.memory_mib,
            )?,
            file_prefix,
            mbufs: self.u32_or(&raw.mbufs, "dpdk.mbufs", 1023, 1 << 22, def.mbufs)?,
        })
    }

    fn initiator_group(&self, ig: &S<RawInitiatorGroup>, base: &str) -> R<InitiatorGroup> {
        let raw = ig.get_ref();
        let tag_key = format!("{base}.tag");
        let tag = self.tag(self.required(&raw.tag, ig, &tag_key)?, &tag_key)?;
        let initiators = self.list(
            &raw.initiators,
            ig,
            &format!("{base}.initiators"),
            |s, key| {
                let name = s.get_ref().trim();
                let bare = name.strip_prefix('!').unwrap_or(name);
                if bare.is_empty() || bare.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(self.at(
                        s,
                        key,
                        format!(
                            "{:?} is not an initiator name, \"ANY\" or \"!name\"",
                            s.get_ref()
                        ),
                    ));
                }
                if bare.eq_ignore_ascii_case("any") {
                    Ok(format!("{}ANY", &name[..name.len() - bare.len()]))
                } else {
                    Ok(name.to_string())
                }
            },
        )?;
        let netmasks = self.list(&raw.netmasks, ig, &format!("{base}.netmasks"), |s, key| {
            parse_netmask(s.get_ref()).map_err(|m| self.at(s, key, m))
        })?;
        Ok(InitiatorGroup {
            tag,
            initiators,
            netmasks,
        })
    }

    fn bdev(&self, b: &S<RawBdev>, base: &str) -> R<BdevConfig> {
        let raw = b.get_ref();
        let name_key = format!("{base}.name");
        let name = self.required(&raw.name, b, &name_key)?;
        if name.get_ref().trim().is_empty() || name.get_ref().chars().any(char::is_control) {
            return Err(self.at(name, &name_key, "a bdev needs a non-empty name"));
        }
        let bs_key = format!("{base}.block_size");
        let block_size = match &raw.block_size {
            None => 512,
            Some(v) => match *v.get_ref() {
                512 => 512,
                4096 => 4096,
                n => return Err(self.at(v, &bs_key, format!("{n} is not 512 or 4096"))),
            },
        };
        let size_key = format!("{base}.size");
        let size = match &raw.size {
            None => None,
            Some(v) => {
                let bytes = match v.get_ref() {
                    toml::Value::Integer(n) if *n > 0 => u64::try_from(*n).ok(),
                    toml::Value::Integer(n) => {
                        return Err(self.at(v, &size_key, format!("{n} is not a positive size")))
                    }
                    toml::Value::String(s) => {
                        Some(parse_size(s).map_err(|m| self.at(v, &size_key, m))?)
                    }
                    _ => None,
                };
                let Some(bytes) = bytes else {
                    return Err(self.at(
                        v,
                        &size_key,
                        "expected bytes as an integer or a string such as \"10GiB\"",
                    ));
                };
                if bytes == 0 || bytes % u64::from(block_size) != 0 {
                    return Err(self.at(
                        v,
                        &size_key,
                        format!(
                            "{bytes} bytes is not a positive multiple of the block size {block_size}"
                        ),
                    ));
                }
                Some(bytes)
            }
        };
        let type_key = format!("{base}.type");
        let kind_value = self.required(&raw.kind, b, &type_key)?;
        let path_key = format!("{base}.path");
        let need_size = |what: &str| -> R<u64> {
            size.ok_or_else(|| {
                self.at(
                    b,
                    &size_key,
                    format!("missing (a {what} bdev needs a size)"),
                )
            })
        };
        let no_path = || -> R<()> {
            match &raw.path {
                Some(p) => Err(self.at(p, &path_key, "only file bdevs take a path")),
                None => Ok(()),
            }
        };
        let kind = match kind_value.get_ref().as_str() {
            "malloc" => {
                no_path()?;
                BdevKind::Malloc {
                    size: need_size("malloc")?,
                }
            }
            "null" => {
                no_path()?;
                BdevKind::Null {
                    size: need_size("null")?,
                }
            }
            "file" => {
                let path = self.required(&raw.path, b, &path_key)?;
                if path.get_ref().is_empty() {
                    return Err(self.at(path, &path_key, "must not be empty"));
                }
                let engine = match &raw.engine {
                    None => FileEngine::Uring,
                    Some(e) => match e.get_ref().as_str() {
                        "uring" => FileEngine::Uring,
                        "threads" => FileEngine::Threads,
                        other => {
                            return Err(self.at(
                                e,
                                &format!("{base}.engine"),
                                format!("{other:?} is not one of uring, threads"),
                            ))
                        }
                    },
                };
                let direct = match &raw.direct {
                    None => engine == FileEngine::Uring,
                    Some(d) => {
                        if *d.get_ref() && engine == FileEngine::Threads {
                            return Err(self.at(
                                d,
                                &format!("{base}.direct"),
                                "O_DIRECT needs engine = \"uring\"",
                            ));
                        }
                        *d.get_ref()
                    }
                };
                BdevKind::File {
                    path: PathBuf::from(path.get_ref()),
                    size,
                    engine,
                    direct,
                }
            }
            other => {
                return Err(self.at(
                    kind_value,
                    &type_key,
                    format!("{other:?} is not one of malloc, file, null"),
                ))
            }
        };
        Ok(BdevConfig {
            name: name.get_ref().clone(),
            block_size,
            kind,
        })
    }

    fn target(
        &self,
        t: &S<RawTarget>,
        base: &str,
        bdevs: &HashMap<String, usize>,
        pg_tags: &HashMap<u16, usize>,
        ig_tags: &HashMap<u16, usize>,
        bdev_users: &mut HashMap<String, String>,
    ) -> R<TargetNode> {
        let raw = t.get_ref();
        let name_key = format!("{base}.name");
        let name_value = self.required(&raw.name, t, &name_key)?;
        let name = check_iscsi_name(name_value.get_ref().trim())
            .map_err(|m| self.at(name_value, &name_key, m))?;
        let alias = match &raw.alias {
            None => None,
            Some(a) if a.get_ref().len() > 255 => {
                return Err(self.at(a, &format!("{base}.alias"), "longer than 255 bytes"))
            }
            Some(a) => Some(a.get_ref().clone()),
        };
        let queue_depth = self.u32_or(
            &raw.queue_depth,
            &format!("{base}.queue_depth"),
            1,
            4096,
            128,
        )?;

        let luns_key = format!("{base}.luns");
        let luns_value = self.required(&raw.luns, t, &luns_key)?;
        if luns_value.get_ref().is_empty() {
            return Err(self.at(luns_value, &luns_key, "a target needs at least one LUN"));
        }
        let mut luns: Vec<LunMapping> = Vec::new();
        for (i, l) in luns_value.get_ref().iter().enumerate() {
            let key = format!("{luns_key}[{i}]");
            let lun_key = format!("{key}.lun");
            let lun_value = self.required(&l.get_ref().lun, l, &lun_key)?;
            let lun = self.int(lun_value, &lun_key, 0, 16383)?;
            let lun = u64::try_from(lun).unwrap_or(0);
            if let Some(prev) = luns.iter().position(|m| m.lun == lun) {
                return Err(self.at(
                    lun_value,
                    &lun_key,
                    format!("LUN {lun} already defined by {luns_key}[{prev}]"),
                ));
            }
            let bdev_key = format!("{key}.bdev");
            let bdev = self.required(&l.get_ref().bdev, l, &bdev_key)?;
            if !bdevs.contains_key(bdev.get_ref()) {
                return Err(self.at(
                    bdev,
                    &bdev_key,
                    format!("no bdev named {:?}", bdev.get_ref()),
                ));
            }
            if let Some(prev) = bdev_users.insert(bdev.get_ref().clone(), bdev_key.clone()) {
                return Err(self.at(
                    bdev,
                    &bdev_key,
                    format!(
                        "bdev {:?} already used by {prev} (a bdev backs one LUN only)",
                        bdev.get_ref()
                    ),
                ));
            }
            luns.push(LunMapping {
                lun,
                bdev: bdev.get_ref().clone(),
            });
        }
        luns.sort_by_key(|m| m.lun);

        let maps_key = format!("{base}.mappings");
        let maps_value = self.required(&raw.mappings, t, &maps_key)?;
        if maps_value.get_ref().is_empty() {
            return Err(self.at(
                maps_value,
                &maps_key,
                "a target needs at least one portal group mapping",
            ));
        }
        let mut mappings: Vec<PortGroupMapping> = Vec::new();
        for (i, m) in maps_value.get_ref().iter().enumerate() {
            let key = format!("{maps_key}[{i}]");
            let pg_key = format!("{key}.portal_group");
            let pg_value = self.required(&m.get_ref().portal_group, m, &pg_key)?;
            let portal_group = self.tag(pg_value, &pg_key)?;
            if !pg_tags.contains_key(&portal_group) {
                return Err(self.at(
                    pg_value,
                    &pg_key,
                    format!("no portal group with tag {portal_group}"),
                ));
            }
            if mappings.iter().any(|o| o.portal_group == portal_group) {
                return Err(self.at(
                    pg_value,
                    &pg_key,
                    format!("portal group {portal_group} mapped twice"),
                ));
            }
            let ig_key = format!("{key}.initiator_group");
            let ig_value = self.required(&m.get_ref().initiator_group, m, &ig_key)?;
            let initiator_group = self.tag(ig_value, &ig_key)?;
            if !ig_tags.contains_key(&initiator_group) {
                return Err(self.at(
                    ig_value,
                    &ig_key,
                    format!("no initiator group with tag {initiator_group}"),
                ));
            }
            mappings.push(PortGroupMapping {
                portal_group,
                initiator_group,
            });
        }
        Ok(TargetNode {
            name,
            alias,
            luns,
            mappings,
            queue_depth,
            auth: AuthSettings::default(),
        })
    }
}

/// Whether an instance name is usable in a file name.
pub fn valid_instance(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != ".."
}

/// Parses a CPU mask: hexadecimal with `0x` (`"0x3"`) or decimal (`"3"`).
pub fn parse_cpumask(s: &str) -> Option<u64> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"[global]
log_level = "info"
nop_in_interval = 30        # seconds, 0 disables
nop_in_timeout = 30
max_sessions = 1024
# negotiation defaults the target offers:
max_recv_data_segment_length = 262144
max_burst_length = 1048576
first_burst_length = 262144
max_outstanding_r2t = 1
immediate_data = true
initial_r2t = false
default_time2wait = 2
default_time2retain = 20
error_recovery_level = 0
max_connections = 1

[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260", "[::1]:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]              # exact names, "ANY", or "!name" to deny
netmasks = ["127.0.0.0/8", "::1/128"]   # CIDR or "ANY"

[[bdev]]
name = "Malloc0"
type = "malloc"                   # malloc | file | null
size = "1GiB"                     # integer bytes or string with K/M/G/T(iB) suffix
block_size = 512                  # 512 | 4096

[[bdev]]
name = "Disk1"
type = "file"
path = "/var/lib/iscsi-tgt/disk1.img"
size = "10GiB"                    # optional for existing files and block devices

[[target]]
name = "iqn.2026-11.io.example:disk1"
alias = "Disk 1"
queue_depth = 128
luns = [ { lun = 0, bdev = "Malloc0" }, { lun = 1, bdev = "Disk1" } ]
mappings = [ { portal_group = 1, initiator_group = 1 } ]
"#;

    /// A small valid configuration; tests edit it and expect errors at known lines.
    const BASE: &str = r#"[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

[[bdev]]
name = "Malloc0"
type = "malloc"
size = "1MiB"

[[target]]
name = "iqn.2026-11.io.example:t0"
luns = [ { lun = 0, bdev = "Malloc0" } ]
mappings = [ { portal_group = 1, initiator_group = 1 } ]
"#;

    fn err(text: &str) -> String {
        match parse(text, "t.toml") {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn chap_settings_are_checked() {
        let group = "\n[[auth_group]]\ntag = 3\nsecrets = [ { user = \"alice\", secret = \"alice-secret-1\" } ]\n";
        let with = |target_keys: &str, extra: &str| {
            format!(
                "{}{group}{extra}",
                BASE.replacen("mappings = [", &format!("{target_keys}\nmappings = ["), 1)
            )
        };
        let c = parse(&with("auth_group = 3\nrequire_chap = true", ""), "t.toml").unwrap();
        assert_eq!(c.targets[0].auth.group, Some(3));
        assert!(c.targets[0].auth.require_chap);
        assert_eq!(c.auth_groups[0].secrets[0].user, "alice");
        let e = err(&with("require_chap = true", ""));
        assert!(
            e.contains("target[0].auth_group: require_chap and mutual_chap need an auth_group"),
            "{e}"
        );
        let e = err(&with("auth_group = 9", ""));
        assert!(e.contains("no auth group with tag 9"), "{e}");
        let e = err(&with("auth_group = 3\nmutual_chap = true", ""));
        assert!(e.contains("mutual_chap needs mutual secrets"), "{e}");
        let e = err(&with(
            "auth_group = 3\nrequire_chap = true\ndisable_chap = true",
            "",
        ));
        assert!(e.contains("contradicts"), "{e}");
        let short = with("", "").replace("alice-secret-1", "short");
        let e = err(&short);
        assert!(e.contains("auth_group[0].secrets[0].secret: a CHAP secret has 12 to 255 bytes (this one has 5)"), "{e}");
        assert!(
            !e.contains("short\""),
            "the secret itself is not echoed: {e}"
        );
        let same = with("", "").replace(
            "secret = \"alice-secret-1\" }",
            "secret = \"alice-secret-1\", mutual_user = \"t\", mutual_secret = \"alice-secret-1\" }",
        );
        assert!(err(&same).contains("must differ"));
        let c = parse(
            &with("", "\n[discovery]\nauth_group = 3\nrequire_chap = true\n"),
            "t.toml",
        )
        .unwrap();
        assert!(c.discovery_auth.require_chap);
    }

    fn edited(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from}");
        BASE.replacen(from, to, 1)
    }

    #[track_caller]
    fn expect(text: &str, prefix: &str) {
        let e = err(text);
        assert!(e.starts_with(prefix), "got {e:?}, expected {prefix:?}...");
    }

    #[test]
    fn example_parses_exactly() {
        let c = parse(EXAMPLE, "example.toml").unwrap();
        let expected = Config {
            global: Global {
                log_level: "info".into(),
                nop_in_interval_s: 30,
                nop_in_timeout_s: 30,
                max_recv_data_segment_length: 262_144,
                max_burst_length: 1_048_576,
                first_burst_length: 262_144,
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
            },
            portal_groups: vec![PortalGroup {
                tag: 1,
                portals: vec![
                    "127.0.0.1:3260".parse().unwrap(),
                    "[::1]:3260".parse().unwrap(),
                ],
                transport: Transport::Kernel,
                userspace: None,
            }],
            initiator_groups: vec![InitiatorGroup {
                tag: 1,
                initiators: vec!["ANY".into()],
                netmasks: vec![
                    Netmask::Cidr {
                        addr: "127.0.0.0".parse().unwrap(),
                        prefix: 8,
                    },
                    Netmask::Cidr {
                        addr: "::1".parse().unwrap(),
                        prefix: 128,
                    },
                ],
            }],
            bdevs: vec![
                BdevConfig {
                    name: "Malloc0".into(),
                    block_size: 512,
                    kind: BdevKind::Malloc { size: 1 << 30 },
                },
                BdevConfig {
                    name: "Disk1".into(),
                    block_size: 512,
                    kind: BdevKind::File {
                        path: "/var/lib/iscsi-tgt/disk1.img".into(),
                        size: Some(10 << 30),
                        engine: FileEngine::Uring,
                        direct: true,
                    },
                },
            ],
            targets: vec![TargetNode {
                name: "iqn.2026-11.io.example:disk1".into(),
                alias: Some("Disk 1".into()),
                luns: vec![
                    LunMapping {
                        lun: 0,
                        bdev: "Malloc0".into(),
                    },
                    LunMapping {
                        lun: 1,
                        bdev: "Disk1".into(),
                    },
                ],
                mappings: vec![PortGroupMapping {
                    portal_group: 1,
                    initiator_group: 1,
                }],
                queue_depth: 128,
                auth: AuthSettings::default(),
            }],
            dpdk: None,
            auth_groups: Vec::new(),
            discovery_auth: AuthSettings::default(),
        };
        assert_eq!(c, expected);
        // Every [global] value of the example is the default.
        assert_eq!(c.global, Global::default());
    }

    /// The example in this module's documentation (the README's copy) is valid.
    #[test]
    fn documented_example_parses() {
        let source = include_str!("config.rs");
        let doc: String = source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| {
                format!(
                    "{}\n",
                    l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
                )
            })
            .collect();
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let len = doc[start..].find("```").expect("its end");
        let mut c = parse(&doc[start..start + len], "doc").unwrap();
        // Beyond the brief's example: a userspace portal group and the DPDK settings.
        assert_eq!(c.portal_groups.len(), 2);
        let pg = c.portal_groups.remove(1);
        assert_eq!(pg.transport, Transport::Tap);
        assert_eq!(
            pg.userspace,
            Some(UserspaceNet {
                device: "iscsi0".into(),
                addresses: vec![("10.0.0.2".parse().unwrap(), 24)],
                gateways: vec!["10.0.0.1".parse().unwrap()],
                mac: Some([2, 0, 0, 0, 0, 2]),
                socket_buffer: 512 * 1024,
                listen_backlog: 16,
                max_connections: 1024,
                mtu: 1500,
            })
        );
        assert_eq!(
            c.dpdk.take(),
            Some(DpdkConfig {
                eal_args: vec!["--vdev=net_tap0,iface=dtap0".into()],
                pci_allow: vec!["0000:3b:00.0".into()],
                no_huge: false,
                memory_mib: 512,
                file_prefix: Some("iscsi-tgt-default".into()),
                mbufs: 16383,
            })
        );
        // CHAP: an auth group, discovery and the target use it.
        assert_eq!(c.auth_groups[0].secrets[0].user, "host1");
        assert_eq!(c.discovery_auth.group, Some(1));
        assert!(c.targets[0].auth.mutual_chap);
        c.auth_groups.clear();
        c.discovery_auth = AuthSettings::default();
        c.targets[0].auth = AuthSettings::default();
        let mut expected = parse(EXAMPLE, "example").unwrap();
        // Otherwise the documented example differs from the brief's only in comments.
        expected.global = Global::default();
        assert_eq!(c, expected);
    }

    #[test]
    fn base_parses_with_defaults() {
        let c = parse(BASE, "t.toml").unwrap();
        assert_eq!(c.global, Global::default());
        assert_eq!(c.targets[0].queue_depth, 128);
        assert_eq!(c.targets[0].alias, None);
        assert_eq!(c.initiator_groups[0].netmasks, vec![Netmask::Any]);
        assert_eq!(c.bdevs[0].kind, BdevKind::Malloc { size: 1 << 20 });
    }

    #[test]
    fn zero_targets_is_discovery_only() {
        let text = &BASE[..BASE.find("[[target]]").unwrap()];
        let c = parse(text, "t.toml").unwrap();
        assert!(c.targets.is_empty());
        assert_eq!(c.bdevs.len(), 1);
    }

    #[test]
    fn luns_sorted_names_lowercased_null_and_4k() {
        let text = edited(
            "[[target]]",
            "[[bdev]]\nname = \"N\"\ntype = \"null\"\nsize = 8192\nblock_size = 4096\n\n[[target]]",
        )
        .replacen(
            "{ lun = 0, bdev = \"Malloc0\" }",
            "{ lun = 5, bdev = \"N\" }, { lun = 0, bdev = \"Malloc0\" }",
            1,
        )
        .replacen("iqn.2026-11.io.example:t0", "IQN.2026-11.IO.Example:T0", 1);
        let c = parse(&text, "t.toml").unwrap();
        let t = &c.targets[0];
        assert_eq!(t.name, "iqn.2026-11.io.example:t0");
        assert_eq!(t.luns[0].lun, 0);
        assert_eq!(t.luns[1].lun, 5);
        assert_eq!(c.bdevs[1].block_size, 4096);
        assert_eq!(c.bdevs[1].kind, BdevKind::Null { size: 8192 });
    }

    #[test]
    fn no_portal_group_is_an_error() {
        assert_eq!(
            err(""),
            "t.toml: portal_group: at least one [[portal_group]] is required"
        );
    }

    #[test]
    fn syntax_and_type_errors_have_lines() {
        expect("[[portal_group]\n", "t.toml:1: invalid table header");
        expect(
            &edited("tag = 1\nportals", "tag = \"one\"\nportals"),
            "t.toml:2: portal_group[0].tag: invalid type",
        );
        expect(
            &edited("netmasks = [\"ANY\"]", "netmasks = \"ANY\""),
            "t.toml:8: initiator_group[0].netmasks: invalid type",
        );
    }

    #[test]
    fn unknown_keys_have_lines() {
        expect(
            &edited(
                "name = \"iqn.2026-11.io.example:t0\"",
                "name = \"iqn.2026-11.io.example:t0\"\nlunz = 1",
            ),
            "t.toml:17: target[0].lunz: unknown field `lunz`",
        );
        expect(
            &edited("bdev = \"Malloc0\" }", "bdev = \"Malloc0\", ro = true }"),
            "t.toml:17: target[0].luns.ro: unknown field `ro`",
        );
        expect(
            &format!("[global]\nloglevel = 1\n{BASE}"),
            "t.toml:2: global.loglevel: unknown field `loglevel`",
        );
        expect(
            &format!("portal = 1\n{BASE}"),
            "t.toml:1: portal: unknown field `portal`",
        );
        expect(
            &edited("type = \"malloc\"", "type = \"malloc\"\nsize_mb = 1"),
            "t.toml:13: bdev[0].size_mb: unknown field",
        );
    }

    #[test]
    fn portal_group_errors() {
        expect(
            &edited("\"127.0.0.1:3260\"", "\"localhost:3260\""),
            "t.toml:3: portal_group[0].portals[0]: \"localhost:3260\" is not an IP address",
        );
        expect(
            &edited("\"127.0.0.1:3260\"", "\"::1:3260\""),
            "t.toml:3: portal_group[0].portals[0]: ",
        );
        expect(
            &edited("portals = [\"127.0.0.1:3260\"]", "portals = []"),
            "t.toml:3: portal_group[0].portals: must not be empty",
        );
        expect(
            &edited("portals = [\"127.0.0.1:3260\"]\n", ""),
            "t.toml:1: portal_group[0].portals: missing (required)",
        );
        expect(
            &edited("tag = 1\nportals", "tag = 0\nportals"),
            "t.toml:2: portal_group[0].tag: 0 out of range 1..=65535",
        );
        expect(
            &format!("{BASE}\n[[portal_group]]\ntag = 2\nportals = [\"[::1]:3260\", \"127.0.0.1:3260\"]\n"),
            "t.toml:22: portal_group[1].portals[1]: portal 127.0.0.1:3260 already listed as portal_group[0].portals[0]",
        );
        expect(
            &format!("{BASE}\n[[portal_group]]\ntag = 1\nportals = [\"127.0.0.1:3261\"]\n"),
            "t.toml:21: portal_group[1].tag: tag 1 already used by portal_group[0]",
        );
        let tap = |extra: &str| {
            format!(
                "{BASE}\n[[portal_group]]\ntag = 2\nportals = [\"10.0.0.2:3260\"]\n\
                 transport = \"tap\"\n{extra}"
            )
        };
        expect(
            &tap(""),
            "t.toml:20: portal_group[1].userspace: missing (required with transport = \"tap\")",
        );
        expect(
            &edited(
                "portals = [\"127.0.0.1:3260\"]",
                "portals = [\"127.0.0.1:3260\"]\ntransport = \"rdma\"",
            ),
            "t.toml:4: portal_group[0].transport: \"rdma\" is not one of kernel, tap, dpdk",
        );
        expect(
            &edited(
                "portals = [\"127.0.0.1:3260\"]",
                "portals = [\"127.0.0.1:3260\"]\nuserspace = { device = \"x\", addresses = [\"127.0.0.1/8\"] }",
            ),
            "t.toml:4: portal_group[0].userspace: only for transport = \"tap\" or \"dpdk\"",
        );
        expect(
            &tap("[portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.1.2/24\"]\n"),
            "t.toml:24: portal_group[1].userspace.addresses: portal 10.0.0.2:3260 is not on one of the stack's addresses",
        );
        expect(
            &tap("[portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.0.2\"]\n"),
            "t.toml:26: portal_group[1].userspace.addresses[0]: \"10.0.0.2\" is not an address/prefix",
        );
        expect(
            &tap("[portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.0.2/24\", \"224.0.0.1/4\"]\n"),
            "t.toml:26: portal_group[1].userspace.addresses[1]: \"224.0.0.1/4\": the stack's address must be unicast",
        );
        expect(
            &tap("[portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.0.2/24\"]\nmac = \"01:00:5e:00:00:01\"\n"),
            "t.toml:27: portal_group[1].userspace.mac: \"01:00:5e:00:00:01\" is a multicast address",
        );
        expect(
            &tap("[portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.0.2/24\"]\nsocket_buffer = \"1KiB\"\n"),
            "t.toml:27: portal_group[1].userspace.socket_buffer: expected 16KiB..=64MiB",
        );
        expect(
            &format!(
                "{}\n[[portal_group]]\ntag = 3\nportals = [\"10.0.0.3:3260\"]\ntransport = \"tap\"\n\
                 [portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.0.3/24\"]\n",
                tap("[portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.0.2/24\"]\n")
            ),
            "t.toml: portal_group[2].userspace.device: device \"t0\" already used by portal_group[1]",
        );
        let ok = parse(
            &tap("[portal_group.userspace]\ndevice = \"t0\"\naddresses = [\"10.0.0.2/24\", \"fd00::2/64\"]\n"),
            "t.toml",
        )
        .unwrap();
        let u = ok.portal_groups[1].userspace.as_ref().unwrap();
        assert_eq!(u.mac, None);
        assert_eq!(u.socket_buffer, 512 * 1024);
        assert_eq!((u.listen_backlog, u.max_connections), (16, 1024));
        assert_eq!(ok.dpdk, None);
    }

    #[test]
    fn initiator_group_errors() {
        expect(
            &edited("netmasks = [\"ANY\"]", "netmasks = [\"ANY\", \"10.0.0.0/33\"]"),
            "t.toml:8: initiator_group[0].netmasks[1]: \"10.0.0.0/33\": prefix length must be 0..=32",
        );
        expect(
            &edited("netmasks = [\"ANY\"]", "netmasks = [\"10.0.0.300/8\"]"),
            "t.toml:8: initiator_group[0].netmasks[0]: ",
        );
        expect(
            &edited("initiators = [\"ANY\"]", "initiators = []"),
            "t.toml:7: initiator_group[0].initiators: must not be empty",
        );
        expect(
            &edited("initiators = [\"ANY\"]", "initiators = [\"ANY\", \"!\"]"),
            "t.toml:7: initiator_group[0].initiators[1]: \"!\" is not an initiator name",
        );
        expect(
            &format!("{BASE}\n[[initiator_group]]\ntag = 1\ninitiators = [\"ANY\"]\nnetmasks = [\"ANY\"]\n"),
            "t.toml:21: initiator_group[1].tag: tag 1 already used by initiator_group[0]",
        );
        let c = parse(
            &edited(
                "initiators = [\"ANY\"]",
                "initiators = [\"!iqn.1994-05.com.redhat:bad\", \"any\"]",
            ),
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.initiator_groups[0].initiators,
            vec!["!iqn.1994-05.com.redhat:bad".to_string(), "ANY".to_string()]
        );
    }

    #[test]
    fn bdev_errors() {
        expect(
            &format!("{BASE}\n[[bdev]]\nname = \"Malloc0\"\ntype = \"null\"\nsize = 4096\n"),
            "t.toml:21: bdev[1].name: name \"Malloc0\" already used by bdev[0]",
        );
        expect(
            &edited("type = \"malloc\"", "type = \"ram\""),
            "t.toml:12: bdev[0].type: \"ram\" is not one of malloc, file, null",
        );
        expect(
            &edited("size = \"1MiB\"", "size = 1000"),
            "t.toml:13: bdev[0].size: 1000 bytes is not a positive multiple of the block size 512",
        );
        expect(
            &edited("size = \"1MiB\"", "size = 0"),
            "t.toml:13: bdev[0].size: 0 is not a positive size",
        );
        expect(
            &edited("size = \"1MiB\"", "size = \"1MB\""),
            "t.toml:13: bdev[0].size: \"1MB\": unknown size suffix",
        );
        expect(
            &edited("size = \"1MiB\"", "size = 1.5"),
            "t.toml:13: bdev[0].size: expected bytes",
        );
        expect(
            &edited("size = \"1MiB\"", "size = \"1MiB\"\nblock_size = 1024"),
            "t.toml:14: bdev[0].block_size: 1024 is not 512 or 4096",
        );
        expect(
            &edited("size = \"1MiB\"", "size = 6144\nblock_size = 4096"),
            "t.toml:13: bdev[0].size: 6144 bytes is not a positive multiple of the block size 4096",
        );
        expect(
            &edited("type = \"malloc\"", "type = \"file\""),
            "t.toml:10: bdev[0].path: missing (required)",
        );
        expect(
            &edited("size = \"1MiB\"\n", ""),
            "t.toml:10: bdev[0].size: missing (a malloc bdev needs a size)",
        );
        expect(
            &edited("size = \"1MiB\"", "size = \"1MiB\"\npath = \"/x\""),
            "t.toml:14: bdev[0].path: only file bdevs take a path",
        );
        expect(
            &edited("name = \"Malloc0\"", "name = \"\""),
            "t.toml:11: bdev[0].name: a bdev needs a non-empty name",
        );
        // A file bdev without a size is fine.
        let c = parse(
            &edited(
                "type = \"malloc\"\nsize = \"1MiB\"",
                "type = \"file\"\npath = \"/dev/sdz\"",
            ),
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.bdevs[0].kind,
            BdevKind::File {
                path: "/dev/sdz".into(),
                size: None,
                engine: FileEngine::Uring,
                direct: true,
            }
        );
        let c = parse(
            &edited(
                "type = \"malloc\"\nsize = \"1MiB\"",
                "type = \"file\"\npath = \"/x.img\"\nengine = \"threads\"",
            ),
            "t.toml",
        )
        .unwrap();
        assert!(matches!(
            c.bdevs[0].kind,
            BdevKind::File {
                engine: FileEngine::Threads,
                direct: false,
                ..
            }
        ));
        expect(
            &edited(
                "type = \"malloc\"\nsize = \"1MiB\"",
                "type = \"file\"\npath = \"/x.img\"\nengine = \"aio\"",
            ),
            "t.toml:14: bdev[0].engine: \"aio\" is not one of uring, threads",
        );
    }

    #[test]
    fn target_errors() {
        expect(
            &edited("iqn.2026-11.io.example:t0", "iqn.2026-13.io.example"),
            "t.toml:16: target[0].name: \"iqn.2026-13.io.example\": an iqn. name is",
        );
        expect(
            &edited("iqn.2026-11.io.example:t0", "disk1"),
            "t.toml:16: target[0].name: \"disk1\" is not an iSCSI name",
        );
        expect(
            &format!(
                "{BASE}\n[[bdev]]\nname = \"B1\"\ntype = \"null\"\nsize = 4096\n\n[[target]]\n\
                 name = \"IQN.2026-11.io.example:T0\"\nluns = [ {{ lun = 0, bdev = \"B1\" }} ]\n\
                 mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]\n"
            ),
            "t.toml:26: target[1].name: name \"iqn.2026-11.io.example:t0\" already used by target[0]",
        );
        expect(
            &edited("bdev = \"Malloc0\"", "bdev = \"Nope\""),
            "t.toml:17: target[0].luns[0].bdev: no bdev named \"Nope\"",
        );
        expect(
            &edited(
                "{ lun = 0, bdev = \"Malloc0\" }",
                "{ lun = 0, bdev = \"Malloc0\" }, { lun = 1, bdev = \"Malloc0\" }",
            ),
            "t.toml:17: target[0].luns[1].bdev: bdev \"Malloc0\" already used by target[0].luns[0].bdev",
        );
        expect(
            &edited(
                "{ lun = 0, bdev = \"Malloc0\" }",
                "{ lun = 0, bdev = \"Malloc0\" }, { lun = 0, bdev = \"X\" }",
            ),
            "t.toml:17: target[0].luns[1].lun: LUN 0 already defined by target[0].luns[0]",
        );
        expect(
            &edited("lun = 0", "lun = 16384"),
            "t.toml:17: target[0].luns[0].lun: 16384 out of range 0..=16383",
        );
        expect(
            &edited("lun = 0, ", ""),
            "t.toml:17: target[0].luns[0].lun: missing (required)",
        );
        expect(
            &edited("luns = [ { lun = 0, bdev = \"Malloc0\" } ]", "luns = []"),
            "t.toml:17: target[0].luns: a target needs at least one LUN",
        );
        expect(
            &edited("portal_group = 1,", "portal_group = 7,"),
            "t.toml:18: target[0].mappings[0].portal_group: no portal group with tag 7",
        );
        expect(
            &edited("initiator_group = 1 }", "initiator_group = 9 }"),
            "t.toml:18: target[0].mappings[0].initiator_group: no initiator group with tag 9",
        );
        expect(
            &edited(
                "{ portal_group = 1, initiator_group = 1 }",
                "{ portal_group = 1, initiator_group = 1 }, { portal_group = 1, initiator_group = 1 }",
            ),
            "t.toml:18: target[0].mappings[1].portal_group: portal group 1 mapped twice",
        );
        expect(
            &edited(
                "mappings = [ { portal_group = 1, initiator_group = 1 } ]\n",
                "",
            ),
            "t.toml:15: target[0].mappings: missing (required)",
        );
        expect(
            &edited(
                "name = \"iqn.2026-11.io.example:t0\"",
                "name = \"iqn.2026-11.io.example:t0\"\nqueue_depth = 0",
            ),
            "t.toml:17: target[0].queue_depth: 0 out of range 1..=4096",
        );
        expect(
            &edited(
                "name = \"iqn.2026-11.io.example:t0\"",
                "name = \"iqn.2026-11.io.example:t0\"\nqueue_depth = 4097",
            ),
            "t.toml:17: target[0].queue_depth: 4097 out of range 1..=4096",
        );
    }

    #[test]
    fn global_errors() {
        expect(
            &format!("[global]\nmax_burst_length = 4096\nfirst_burst_length = 8192\n{BASE}"),
            "t.toml:3: global.first_burst_length: 8192 exceeds max_burst_length (4096)",
        );
        expect(
            &format!("[global]\nlog_level = \"loud\"\n{BASE}"),
            "t.toml:2: global.log_level: \"loud\" is not one of error, warn, info, debug, trace",
        );
        for (key, value, range) in [
            ("max_recv_data_segment_length", "511", "512..=16777215"),
            ("max_recv_data_segment_length", "16777216", "512..=16777215"),
            ("max_burst_length", "0", "512..=16777215"),
            ("first_burst_length", "100", "512..=16777215"),
            ("max_outstanding_r2t", "0", "1..=65535"),
            ("max_outstanding_r2t", "65536", "1..=65535"),
            ("default_time2wait", "3601", "0..=3600"),
            ("default_time2retain", "-1", "0..=3600"),
            ("error_recovery_level", "3", "0..=2"),
            ("max_connections", "0", "1..=65535"),
            ("max_sessions", "0", "1..=65535"),
            ("nop_in_interval", "3601", "0..=3600"),
            ("nop_in_timeout", "0", "1..=3600"),
        ] {
            expect(
                &format!("# comment\n[global]\n{key} = {value}\n{BASE}"),
                &format!("t.toml:3: global.{key}: {value} out of range {range}"),
            );
        }
        // A small MaxBurstLength lowers the default FirstBurstLength with it.
        let c = parse(
            &format!("[global]\nmax_burst_length = 4096\nlog_level = \"DEBUG\"\n{BASE}"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.global.first_burst_length, 4096);
        assert_eq!(c.global.log_level, "debug");
    }

    #[test]
    fn default_config_is_complete() {
        let c = default_config(None);
        assert_eq!(c.portal_groups.len(), 1);
        assert_eq!(c.portal_groups[0].tag, 1);
        assert_eq!(
            c.portal_groups[0].portals,
            vec![DEFAULT_PORTAL.parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            c.initiator_groups,
            vec![InitiatorGroup {
                tag: 1,
                initiators: vec!["ANY".into()],
                netmasks: vec![Netmask::Any],
            }]
        );
        assert_eq!(
            c.bdevs,
            vec![BdevConfig {
                name: "Malloc0".into(),
                block_size: 512,
                kind: BdevKind::Malloc { size: 1 << 30 },
            }]
        );
        assert_eq!(c.targets.len(), 1);
        let t = &c.targets[0];
        assert_eq!(t.name, DEFAULT_TARGET_NAME);
        assert_eq!(
            t.luns,
            vec![LunMapping {
                lun: 0,
                bdev: "Malloc0".into()
            }]
        );
        assert_eq!(
            t.mappings,
            vec![PortGroupMapping {
                portal_group: 1,
                initiator_group: 1
            }]
        );
        assert_eq!(t.queue_depth, 128);
        assert_eq!(c.global, Global::default());
        assert!(check_iscsi_name(DEFAULT_TARGET_NAME).is_ok());

        let c = default_config(Some("[::]:3261"));
        assert_eq!(
            c.portal_groups[0].portals,
            vec!["[::]:3261".parse::<SocketAddr>().unwrap()]
        );
        assert!(default_config_checked(Some("nowhere")).is_err());
        assert_eq!(default_config(Some("nowhere")), default_config(None));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size(" 2 TiB "), Ok(2 << 40));
        assert_eq!(parse_size("3g"), Ok(3 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1PB").is_err());
        assert!(parse_size("1KB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216T").is_err());
    }

    #[test]
    fn netmasks() {
        assert_eq!(parse_netmask("ANY"), Ok(Netmask::Any));
        assert_eq!(parse_netmask("any"), Ok(Netmask::Any));
        assert_eq!(
            parse_netmask("10.0.0.0/8"),
            Ok(Netmask::Cidr {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 8
            })
        );
        assert_eq!(
            parse_netmask("192.168.1.7"),
            Ok(Netmask::Cidr {
                addr: "192.168.1.7".parse().unwrap(),
                prefix: 32
            })
        );
        assert_eq!(
            parse_netmask("fd00::/8"),
            Ok(Netmask::Cidr {
                addr: "fd00::".parse().unwrap(),
                prefix: 8
            })
        );
        assert_eq!(
            parse_netmask("::1"),
            Ok(Netmask::Cidr {
                addr: "::1".parse().unwrap(),
                prefix: 128
            })
        );
        assert!(parse_netmask("0.0.0.0/0").is_ok());
        assert!(parse_netmask("::/128").is_ok());
        assert!(parse_netmask("::/129").is_err());
        assert!(parse_netmask("1.2.3.4/33").is_err());
        assert!(parse_netmask("1.2.3.4/").is_err());
        assert!(parse_netmask("1.2.3.4/-1").is_err());
        assert!(parse_netmask("host/8").is_err());
        assert!(parse_netmask("").is_err());
    }

    #[test]
    fn iscsi_names() {
        assert_eq!(
            check_iscsi_name("iqn.2026-11.io.Example:Disk1").as_deref(),
            Ok("iqn.2026-11.io.example:disk1")
        );
        assert!(check_iscsi_name("iqn.1994-05.com.redhat").is_ok());
        assert!(check_iscsi_name("iqn.1994-05.com.redhat:a:b.c-d").is_ok());
        assert!(check_iscsi_name("eui.02004567A425678D").is_ok());
        assert!(check_iscsi_name("naa.52004567BA64678D").is_ok());
        assert!(check_iscsi_name("naa.62004567BA64678D0123456789ABCDEF").is_ok());
        for bad in [
            "",
            "iqn.",
            "iqn.2026-11",
            "iqn.2026-11.",
            "iqn.2026-00.io.x",
            "iqn.26-11.io.x",
            "iqn.2026-11.io..x",
            "iqn.2026-11.io.x:",
            "iqn.2026-11.io x",
            "iqn.2026-11.io.x:a b",
            "iqn.2026-11.io.x:é",
            "eui.0200",
            "eui.02004567A425678G",
            "naa.0123456789abcdef0",
            "iscsi.disk",
        ] {
            assert!(check_iscsi_name(bad).is_err(), "{bad:?}");
        }
        let long = format!("iqn.2026-11.io.x:{}", "a".repeat(206));
        assert_eq!(long.len(), 223);
        assert!(check_iscsi_name(&long).is_ok());
        assert!(check_iscsi_name(&format!("{long}a")).is_err());
    }

    #[test]
    fn load_file_reports_path() {
        let path =
            std::env::temp_dir().join(format!("iscsi-tgt-config-{}.toml", std::process::id()));
        std::fs::write(&path, BASE.replacen("lun = 0", "lun = -1", 1)).unwrap();
        let e = load_file(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:17: target[0].luns[0].lun: -1 out of range 0..=16383",
                path.display()
            )
        );
        std::fs::write(&path, BASE).unwrap();
        assert!(load_file(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
        let e = load_file(&path).unwrap_err();
        assert_eq!(e.line, None);
        assert!(e.to_string().contains("cannot read"));
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "\u{0}",
            "[[",
            "[[target]]\n[[target]]\n",
            "[global]\n[global]\n",
            "target = []\nportal_group = [{}]",
            "portal_group = [{ tag = 99999999999, portals = [\"1.1.1.1:1\"] }]",
            "[[portal_group]]\ntag = 1\nportals = [1]\n",
            "[[bdev]]\nsize = 9223372036854775807\n",
        ] {
            let _ = parse(text, "g.toml");
        }
        expect(
            "portal_group = [{ tag = 99999999999, portals = [\"1.1.1.1:1\"] }]",
            "t.toml:1: portal_group[0].tag: 99999999999 out of range",
        );
    }
}
