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
//! # negotiation defaults the target offers (RFC 7143 ranges):
//! max_recv_data_segment_length = 262144   # 512..=16777215
//! max_burst_length = 1048576        # 512..=16777215
//! first_burst_length = 65536        # 512..=max_burst_length
//! max_outstanding_r2t = 1           # 1..=65535
//! immediate_data = true
//! initial_r2t = true
//! default_time2wait = 2             # 0..=3600
//! default_time2retain = 20          # 0..=3600
//! error_recovery_level = 0          # 0..=2
//! max_connections = 1               # 1..=65535
//!
//! [[portal_group]]                  # at least one
//! tag = 1                           # 1..=65535, unique
//! portals = ["127.0.0.1:3260", "[::1]:3260"]   # IP literal and port; unique across groups
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
//!
//! [[target]]                        # none at all: discovery only
//! name = "iqn.2026-11.io.example:disk1"   # iqn./eui./naa. name, unique
//! alias = "Disk 1"                  # optional
//! queue_depth = 128                 # 1..=4096 (default 128)
//! luns = [ { lun = 0, bdev = "Malloc0" }, { lun = 1, bdev = "Disk1" } ]
//! mappings = [ { portal_group = 1, initiator_group = 1 } ]
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

use super::{
    BdevConfig, BdevKind, Config, Global, InitiatorGroup, LunMapping, Netmask, PortGroupMapping,
    PortalGroup, TargetNode, DEFAULT_PORTAL, DEFAULT_TARGET_NAME,
};
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
        }],
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortalGroup {
    tag: Option<S<i64>>,
    portals: Option<S<Vec<S<String>>>>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Option<S<String>>,
    alias: Option<S<String>>,
    queue_depth: Option<S<i64>>,
    luns: Option<S<Vec<S<RawLun>>>>,
    mappings: Option<S<Vec<S<RawMapping>>>>,
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
        let message = e.message().trim().to_string();
        // For an unknown key the span covers the key itself: name it.
        let key = e
            .span()
            .filter(|_| message.starts_with("unknown field"))
            .and_then(|s| self.text.get(s))
            .map(|k| k.trim().trim_matches('"').to_string())
            .unwrap_or_default();
        self.err(e.span(), &key, message)
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
        let mut targets: Vec<TargetNode> = Vec::new();
        let mut bdev_users: HashMap<String, String> = HashMap::new();
        for (i, t) in raw.target.iter().enumerate() {
            let base = format!("target[{i}]");
            let target = self.target(t, &base, &bdev_names, &pg_tags, &ig_tags, &mut bdev_users)?;
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
        Ok(Config {
            global,
            portal_groups,
            initiator_groups,
            bdevs,
            targets,
        })
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
        Ok(PortalGroup { tag, portals })
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
                BdevKind::File {
                    path: PathBuf::from(path.get_ref()),
                    size,
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
        })
    }
}
